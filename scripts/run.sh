#!/usr/bin/env bash
# The whole tier without Docker: one nats-server (JetStream, data in .run/), one fanout-api
# on :8080 and $WS fanout-ws nodes on :8081, :8082, ... (ids ws-1, ws-2, ...), each also
# taking WebTransport sessions on UDP :8443, :8444, ... (self-signed; the page pins its hash).
# Each process's log lines are prefixed with its name; ctrl-c stops everything.
# Run it through `make run` (which builds the binaries and installs nats-server first).
set -euo pipefail
# Job control: each child gets its own process group, so ctrl-c reaches only this script,
# which then stops the servers in order (fanout first, NATS last).
set -m
cd "$(dirname "$0")/.."

WS=${WS:-3}
API_PORT=${API_PORT:-8080}
NATS_PORT=${NATS_PORT:-4222}
NATS_MONITOR_PORT=${NATS_MONITOR_PORT:-8222}
WT_PORT=${WT_PORT:-8442}
NATS_SERVER=${NATS_SERVER_BIN:-.tools/bin/nats-server}
BIN=${BIN:-target/debug}
RUN_DIR=${RUN_DIR:-.run}

if ! [[ "$WS" =~ ^[1-9][0-9]?$ ]]; then
  echo "run: WS must be a number of ws nodes from 1 to 99 (got '$WS')" >&2
  exit 2
fi
for bin in "$NATS_SERVER" "$BIN/fanout-api" "$BIN/fanout-ws"; do
  [[ -x "$bin" ]] || { echo "run: $bin is missing; use 'make run'" >&2; exit 2; }
done

# A FANOUT_* variable in this shell that a binary would refuse stops here, with the reason,
# before anything starts (`--check` prints the settings, or what is wrong).
for bin in fanout-api fanout-ws; do
  "$BIN/$bin" --check > /dev/null || { echo "run: fix the settings above" >&2; exit 2; }
done

ws_port() { echo $((API_PORT + $1)); }
wt_port() { echo $((WT_PORT + $1)); }
# WebTransport on each node's own UDP port; FANOUT_WEBTRANSPORT_LISTEN= (empty) turns it off.
wt_listen() {
  if [[ -v FANOUT_WEBTRANSPORT_LISTEN && -z "$FANOUT_WEBTRANSPORT_LISTEN" ]]; then echo ""; else echo "0.0.0.0:$(wt_port "$1")"; fi
}

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ports=("$NATS_PORT" "$NATS_MONITOR_PORT" "$API_PORT")
for i in $(seq 1 "$WS"); do ports+=("$(ws_port "$i")"); done
for port in "${ports[@]}"; do
  if in_use "$port"; then
    echo "run: port $port is already in use; stop what holds it (e.g. an earlier 'make run') or set API_PORT / NATS_PORT / NATS_MONITOR_PORT" >&2
    exit 1
  fi
done

stop_on_exit
mkdir -p "$RUN_DIR/nats"
start nats "$NATS_SERVER" -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MONITOR_PORT" -js -sd "$RUN_DIR/nats" -n fanout-nats
nats_pids+=($!)
wait_ready nats "http://127.0.0.1:$NATS_MONITOR_PORT/healthz"

export FANOUT_NATS_URL="nats://127.0.0.1:$NATS_PORT"
# The page offers these nodes; {host} is the host the browser loaded the page from.
ws_urls=""
for i in $(seq 1 "$WS"); do ws_urls+="${ws_urls:+,}ws-$i=ws://{host}:$(ws_port "$i")/ws"; done
FANOUT_NODE_ID=api-1 FANOUT_LISTEN="0.0.0.0:$API_PORT" FANOUT_WS_URLS="$ws_urls" start api "$BIN/fanout-api"
pids+=($!)
for i in $(seq 1 "$WS"); do
  FANOUT_NODE_ID="ws-$i" FANOUT_LISTEN="0.0.0.0:$(ws_port "$i")" \
    FANOUT_WEBTRANSPORT_LISTEN="$(wt_listen "$i")" \
    start "ws-$i" "$BIN/fanout-ws"
  pids+=($!)
done

wait_ready api "http://127.0.0.1:$API_PORT/readyz"
for i in $(seq 1 "$WS"); do wait_ready "ws-$i" "http://127.0.0.1:$(ws_port "$i")/readyz"; done

echo "[run] ready:"
echo "[run]   open       http://localhost:$API_PORT/?node=1  and  http://localhost:$API_PORT/?node=2  in two tabs"
echo "[run]   API        http://localhost:$API_PORT   (try: curl -X POST localhost:$API_PORT/ping)"
for i in $(seq 1 "$WS"); do
  echo "[run]   ws-$i       ws://localhost:$(ws_port "$i")/ws$([[ -n "$(wt_listen "$i")" ]] && echo "  and  https://localhost:$(wt_port "$i")/wt (WebTransport, UDP)")"
done
echo "[run]   NATS       nats://localhost:$NATS_PORT  (monitoring http://localhost:$NATS_MONITOR_PORT)"
echo "[run] ctrl-c stops everything"
wait -n "${pids[@]}" "${nats_pids[@]}" || true
echo "[run] a process exited; stopping the rest" >&2
exit 1
