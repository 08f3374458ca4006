# Shared by scripts/run.sh and scripts/run-geo.sh (sourced, not run): starting processes with
# their output prefixed by their name, waiting for them, and stopping them in order on ctrl-c.
# The caller appends fanout processes' PIDs to `pids` and NATS servers' to `nats_pids`.

pids=()      # fanout processes (and helpers), stopped first
nats_pids=() # NATS servers, stopped last

# A port is taken if something accepts a connection on it.
in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

stop() {
  trap - INT TERM EXIT
  echo "[run] stopping"
  if ((${#pids[@]})); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  if ((${#nats_pids[@]})); then
    kill -TERM "${nats_pids[@]}" 2>/dev/null || true
    wait "${nats_pids[@]}" 2>/dev/null || true
  fi
  echo "[run] stopped"
}
# Call once the checks are done: from then on ctrl-c, TERM and any exit stop everything.
stop_on_exit() {
  trap 'stop; exit 0' INT TERM
  trap stop EXIT
}

# start NAME COMMAND...: runs COMMAND with its output prefixed by [NAME]; $! is COMMAND itself.
# The prefixing sed ignores ctrl-c so that it prints the servers' last lines.
start() {
  local name=$1
  shift
  "$@" > >(trap '' INT; exec sed -u "s/^/[$name] /") 2>&1 &
}

# wait_ready NAME URL [SECONDS]: until URL answers 2xx (default 10 s), else exit 1.
wait_ready() {
  local name=$1 url=$2 seconds=${3:-10}
  for _ in $(seq 1 $((seconds * 10))); do
    if curl -fsS -o /dev/null "$url" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "[run] $name did not become ready at $url" >&2
  exit 1
}
