#!/usr/bin/env bash
# Makes a throwaway CA and certificates for TLS on every NATS link (clients, routes,
# gateways), for tests and for docker-compose.geo.yml:
#   scripts/certs.sh OUT_DIR NAME...
# writes OUT_DIR/ca.pem (and ca.key), OUT_DIR/NAME.pem and NAME.key for each NAME (valid for
# the DNS name NAME, the names in $EXTRA_SANS (comma-separated), localhost and 127.0.0.1;
# server and client use), and client.pem / client.key for fanout's processes when servers
# verify clients. ECDSA P-256, 30 days.
# Not for production: use your own CA there.
set -euo pipefail
EXTRA_SANS=${EXTRA_SANS:-}
out=${1:?usage: certs.sh OUT_DIR NAME...}
shift
mkdir -p "$out"
cd "$out"
days=30
if [ ! -f ca.pem ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout ca.key -out ca.pem -days "$days" -subj "/CN=fanout test CA" 2>/dev/null
fi
issue() {
  local name=$1
  local sans="DNS:$name,DNS:localhost,IP:127.0.0.1"
  local extra
  for extra in ${EXTRA_SANS//,/ }; do sans+=",DNS:$extra"; done
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$name.key" -out "$name.csr" -subj "/CN=$name" 2>/dev/null
  printf '%s\n' \
    "basicConstraints=CA:FALSE" \
    "keyUsage=digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth,clientAuth" \
    "subjectAltName=$sans" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -out "$name.pem" -days "$days" -extfile "$name.ext" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
for name in "$@" client; do
  issue "$name"
done
chmod 644 ./*.pem ./*.key
echo "certificates in $out: ca.pem, $* client"
