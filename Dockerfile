# One Dockerfile, two images: `--target api` (fanout-api) and `--target ws` (fanout-ws).
#   docker build --target api -t fanout-api .
#   docker build --target ws  -t fanout-ws  .

ARG RUST_VERSION=1.95

# ---- build ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src

# Dependencies first, in a layer that changes only with the manifests: a code change
# rebuilds fanout's own crates, not the ~300 dependencies.
# Every workspace member's manifest must be here for cargo to load the workspace.
COPY Cargo.toml Cargo.lock ./
COPY api/Cargo.toml api/
COPY ws/Cargo.toml ws/
COPY all-in-one/Cargo.toml all-in-one/
COPY bench/Cargo.toml bench/
COPY testkit/Cargo.toml testkit/
RUN mkdir -p src api/src ws/src all-in-one/src bench/src testkit/src \
 && touch src/lib.rs api/src/lib.rs ws/src/lib.rs all-in-one/src/lib.rs testkit/src/lib.rs \
 && echo 'fn main() {}' > api/src/main.rs \
 && echo 'fn main() {}' > ws/src/main.rs \
 && echo 'fn main() {}' > all-in-one/src/main.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && cargo build --release --locked -p fanout-api -p fanout-ws \
 && rm -rf src api/src ws/src

COPY src src
COPY api/src api/src
COPY ws/src ws/src
# The demo page is compiled into fanout-api, each binary's OpenAPI document into it.
COPY web web
COPY clients/js/fanout.js clients/js/
COPY api/openapi.json api/
COPY ws/openapi.json ws/
RUN touch src/lib.rs api/src/lib.rs ws/src/lib.rs \
 && cargo build --release --locked -p fanout-api -p fanout-ws \
 && mkdir /out && cp target/release/fanout-api target/release/fanout-ws /out/

# ---- runtime base: small, non-root -----------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin fanout
USER 10001:10001
ENV RUST_LOG=info

# ---- fanout-api ----------------------------------------------------------------------------
FROM runtime AS api
COPY --from=build /out/fanout-api /usr/local/bin/fanout-api
ENV FANOUT_LISTEN=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=2s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["fanout-api"]

# ---- fanout-ws -----------------------------------------------------------------------------
FROM runtime AS ws
COPY --from=build /out/fanout-ws /usr/local/bin/fanout-ws
ENV FANOUT_LISTEN=0.0.0.0:8081
EXPOSE 8081
HEALTHCHECK --interval=5s --timeout=2s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8081/readyz || exit 1
ENTRYPOINT ["fanout-ws"]
