#!/usr/bin/env bash
# Regions on one machine, without Docker: per region a 3-server NATS cluster (JetStream,
# joined to the other regions by gateways), a fanout-api and two fanout-ws nodes. Every
# gateway link passes through a delay proxy (`fanout-bench delay-proxy`) adding GEO_DELAY_MS
# (default 40) each way: a WAN on loopback (netem is not available here).
#
#   make run REGIONS=2     # eu, us        (REGIONS=3: eu, us, ap)
#
# Region r (0, 1, 2) listens on: API 8080+100r, ws nodes 8081+100r and 8082+100r, NATS
# clients 4222+10r..4224+10r, monitoring 8222+10r.., routes 6222+10r.., gateways 7222+10r..
# (their proxies 7322+10r..), each plus PORT_OFFSET (default 0). Data in .run/geo/. Log lines are prefixed with their process's
# name; ctrl-c stops everything.
set -euo pipefail
set -m
cd "$(dirname "$0")/.."

REGIONS=${REGIONS:-2}
PORT_OFFSET=${PORT_OFFSET:-0}
GEO_DELAY_MS=${GEO_DELAY_MS:-40}
NATS_SERVER=${NATS_SERVER_BIN:-.tools/bin/nats-server}
BIN=${BIN:-target/debug}
RUN_DIR=${RUN_DIR:-.run/geo}
NAMES=(eu us ap)

if ! [[ "$REGIONS" =~ ^[23]$ ]]; then
  echo "run: REGIONS must be 2 or 3 (got '$REGIONS')" >&2
  exit 2
fi
if ! [[ "$PORT_OFFSET" =~ ^[0-9]+$ ]]; then
  echo "run: PORT_OFFSET must be a number (got '$PORT_OFFSET')" >&2
  exit 2
fi
if ! [[ "$GEO_DELAY_MS" =~ ^[0-9]+$ ]]; then
  echo "run: GEO_DELAY_MS must be a number of milliseconds (got '$GEO_DELAY_MS')" >&2
  exit 2
fi
for bin in "$NATS_SERVER" "$BIN/fanout-api" "$BIN/fanout-ws" "$BIN/fanout-bench"; do
  [[ -x "$bin" ]] || { echo "run: $bin is missing; use 'make run REGIONS=$REGIONS'" >&2; exit 2; }
done
names=("${NAMES[@]:0:$REGIONS}")
regions=$(IFS=,; echo "${names[*]}")

ports=()
for r in $(seq 0 $((REGIONS - 1))); do
  ports+=($((PORT_OFFSET + 8080 + 100 * r)) $((PORT_OFFSET + 8081 + 100 * r)) $((PORT_OFFSET + 8082 + 100 * r)))
  for i in 0 1 2; do
    ports+=($((PORT_OFFSET + 4222 + 10 * r + i)) $((PORT_OFFSET + 8222 + 10 * r + i)) $((PORT_OFFSET + 6222 + 10 * r + i)) $((PORT_OFFSET + 7222 + 10 * r + i)) $((PORT_OFFSET + 7322 + 10 * r + i)))
  done
done
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
for port in "${ports[@]}"; do
  if in_use "$port"; then
    echo "run: port $port is already in use; stop what holds it (e.g. an earlier 'make run')" >&2
    exit 1
  fi
done

stop_on_exit
mkdir -p "$RUN_DIR"
# The WAN: a proxy in front of every server's gateway port; servers advertise the proxy.
pairs=""
for r in $(seq 0 $((REGIONS - 1))); do
  for i in 0 1 2; do
    pairs+="${pairs:+,}127.0.0.1:$((PORT_OFFSET + 7322 + 10 * r + i))=127.0.0.1:$((PORT_OFFSET + 7222 + 10 * r + i))"
  done
done
start wan "$BIN/fanout-bench" delay-proxy --delay-ms "$GEO_DELAY_MS" --pairs "$pairs"
pids+=($!)

gateways=""
for r in $(seq 0 $((REGIONS - 1))); do
  urls=""
  for i in 0 1 2; do urls+="${urls:+, }\"nats://127.0.0.1:$((PORT_OFFSET + 7322 + 10 * r + i))\""; done
  gateways+="    { name: ${names[$r]}, urls: [$urls] }"$'\n'
done
for r in $(seq 0 $((REGIONS - 1))); do
  name=${names[$r]}
  routes=""
  for i in 0 1 2; do routes+="${routes:+, }\"nats://127.0.0.1:$((PORT_OFFSET + 6222 + 10 * r + i))\""; done
  for i in 0 1 2; do
    conf="$RUN_DIR/$name-$i.conf"
    cat > "$conf" <<CONF
server_name: $name-$i
listen: 127.0.0.1:$((PORT_OFFSET + 4222 + 10 * r + i))
http: 127.0.0.1:$((PORT_OFFSET + 8222 + 10 * r + i))
jetstream { store_dir: "$RUN_DIR/js-$name-$i" }
cluster { name: $name, listen: 127.0.0.1:$((PORT_OFFSET + 6222 + 10 * r + i)), routes: [$routes] }
gateway {
  name: $name
  listen: 127.0.0.1:$((PORT_OFFSET + 7222 + 10 * r + i))
  advertise: "127.0.0.1:$((PORT_OFFSET + 7322 + 10 * r + i))"
  gateways: [
$gateways  ]
}
CONF
    "$NATS_SERVER" -t -c "$conf" >/dev/null 2>&1 || { "$NATS_SERVER" -t -c "$conf"; exit 1; }
    start "nats-$name-$i" "$NATS_SERVER" -c "$conf"
    nats_pids+=($!)
  done
done
for r in $(seq 0 $((REGIONS - 1))); do
  for i in 0 1 2; do wait_ready "nats-${names[$r]}-$i" "http://127.0.0.1:$((PORT_OFFSET + 8222 + 10 * r + i))/healthz" 30; done
done

for r in $(seq 0 $((REGIONS - 1))); do
  name=${names[$r]}
  nats_url="nats://127.0.0.1:$((PORT_OFFSET + 4222 + 10 * r)),nats://127.0.0.1:$((PORT_OFFSET + 4223 + 10 * r)),nats://127.0.0.1:$((PORT_OFFSET + 4224 + 10 * r))"
  common=(FANOUT_NATS_URL="$nats_url" FANOUT_REGION="$name" FANOUT_REGIONS="$regions" FANOUT_HISTORY_REPLICAS=3)
  start "api-$name" env "${common[@]}" FANOUT_NODE_ID="api-$name" \
    FANOUT_LISTEN="0.0.0.0:$((PORT_OFFSET + 8080 + 100 * r))" "$BIN/fanout-api"
  pids+=($!)
  for n in 1 2; do
    port=$((PORT_OFFSET + 8080 + 100 * r + n))
    start "ws-$name-$n" env "${common[@]}" FANOUT_NODE_ID="ws-$name-$n" \
      FANOUT_LISTEN="0.0.0.0:$port" "$BIN/fanout-ws"
    pids+=($!)
  done
done
for r in $(seq 0 $((REGIONS - 1))); do
  for port in $((PORT_OFFSET + 8080 + 100 * r)) $((PORT_OFFSET + 8081 + 100 * r)) $((PORT_OFFSET + 8082 + 100 * r)); do
    wait_ready "port $port" "http://127.0.0.1:$port/readyz" 30
  done
done

echo "[run] ready: regions $regions, ${GEO_DELAY_MS} ms each way between them"
for r in $(seq 0 $((REGIONS - 1))); do
  echo "[run]   ${names[$r]}: page http://localhost:$((PORT_OFFSET + 8080 + 100 * r))/  ws nodes :$((PORT_OFFSET + 8081 + 100 * r)) :$((PORT_OFFSET + 8082 + 100 * r))  NATS :$((PORT_OFFSET + 4222 + 10 * r))"
done
echo "[run]   pin tabs to nodes of different regions, then Call API in one of them"
echo "[run] ctrl-c stops everything"
wait -n "${pids[@]}" "${nats_pids[@]}" || true
echo "[run] a process exited; stopping the rest" >&2
exit 1
