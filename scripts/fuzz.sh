#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS each (default 60), FUZZ_JOBS at
# a time (default 1), with cargo fuzz on the nightly toolchain (installed when missing).
# Each starts from its seed corpus (fuzz/corpus/<target>, never written to) plus what earlier
# runs found (target/fuzz/corpus/<target>); a crash stops the run with the input saved in
# target/fuzz/artifacts/<target>/. Prints the executions per target.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-60}
JOBS=${FUZZ_JOBS:-1}
TARGETS=${FUZZ_TARGETS:-frames upgrade op cursor jwt publish_body batch_body}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz --version 0.13.2
(cd fuzz && cargo +nightly fuzz build)
out=target/fuzz
mkdir -p "$out"
run() {
  local t=$1
  mkdir -p "$out/corpus/$t" "$out/artifacts/$t"
  if (cd fuzz && cargo +nightly fuzz run "$t" "../$out/corpus/$t" "corpus/$t" -- \
      -max_total_time="$SECONDS_EACH" -artifact_prefix="../$out/artifacts/$t/" \
      -print_final_stats=1) >"$out/$t.log" 2>&1; then
    local runs
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out/$t.log" | grep -o '[0-9]*$' | tail -1)
    echo "$t: ${runs:-?} executions in ${SECONDS_EACH} s, no crash"
  else
    echo "$t: FAILED, see $out/$t.log and $out/artifacts/$t/" >&2
    return 1
  fi
}
status=0
running=0
for t in $TARGETS; do
  run "$t" || status=1 &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n || status=1; running=$((running - 1)); fi
done
while [ "$running" -gt 0 ]; do wait -n || status=1; running=$((running - 1)); done
exit $status
