#!/usr/bin/env bash
# Runs each test file alone, RUNS times (default 5), optionally with both cores kept busy by
# stress-ng (STRESS=1), and prints one line per run: what `make test-alone` does. A file is a
# module of the integration binary (tests/integration/<file>.rs, run as `integration <file>::`)
# or a test binary of its own (tests/<file>.rs: the browser, Docker, npm, Python, promtool and
# make tests). A test that passes only on a quiet machine, or only next to the others, shows up
# here.
#
#   scripts/test-alone.sh [file ...]      # e.g. scripts/test-alone.sh faults presence browser
#   RUNS=10 STRESS=1 scripts/test-alone.sh
#
# Logs of failed runs are kept in target/test-alone/.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
STRESS=${STRESS:-0}
out=target/test-alone
mkdir -p "$out"

# The test binaries as `cargo test --workspace` builds them (building them alone would
# unify features differently and rebuild everything).
cargo build --workspace --bins --quiet
bins=$(cargo test --workspace --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["test"] and m.get("executable"):
        print(m["target"]["name"], m["executable"])
')
# The integration binary's modules, each a file of its own here.
modules=$(ls tests/integration/*.rs | xargs -n1 basename | sed 's/\.rs$//' | grep -vx main)
files=("$@")
[ ${#files[@]} -gt 0 ] || files=($modules $(echo "$bins" | awk '$1 != "integration" {print $1}' | sort))

stress_pid=
if [ "$STRESS" = 1 ]; then
  command -v stress-ng >/dev/null || { echo "STRESS=1 needs stress-ng (apt-get install stress-ng)" >&2; exit 2; }
  stress-ng --cpu 2 --timeout 3h >/dev/null 2>&1 &
  stress_pid=$!
  trap 'kill $stress_pid 2>/dev/null' EXIT
fi

failed=0
for file in "${files[@]}"; do
  filter=()
  if echo "$modules" | grep -qx "$file"; then
    bin=$(echo "$bins" | awk '$1 == "integration" {print $2}')
    filter=("$file::")
  else
    bin=$(echo "$bins" | awk -v n="$file" '$1 == n {print $2}')
  fi
  [ -n "$bin" ] || { echo "no test file tests/$file.rs or tests/integration/$file.rs" >&2; exit 2; }
  for run in $(seq 1 "$RUNS"); do
    log="$out/$file.$run.log"
    start=$(date +%s)
    if timeout 900 "$bin" "${filter[@]}" >"$log" 2>&1; then
      echo "$file: run $run passed ($(( $(date +%s) - start )) s)"
      rm -f "$log"
    else
      echo "$file: run $run FAILED ($(( $(date +%s) - start )) s), log in $log"
      grep -E "panicked|timed out" "$log" | head -3 | sed 's/^/    /'
      failed=$((failed + 1))
    fi
  done
done
echo "test-alone: $(( ${#files[@]} * RUNS - failed )) passed, $failed failed"
[ "$failed" = 0 ]
