#!/usr/bin/env bash
# Run EdgeWard's benchmarks (each benchmarks/*.py script, in name order) with the project venv.
#   benchmarks/run.sh                 every benchmark
#   benchmarks/run.sh bundle agent    only benchmarks/bundle.py and benchmarks/agent.py
# Each script prints its figures next to their targets with PASS/MISS and exits non-zero when a
# target is missed; this script runs them all and exits 1 if any of them did (2 for a bad name).
set -uo pipefail
source "$(dirname "$0")/../scripts/lib/env.sh"
cd "$EW_ROOT"
ensure_venv
ensure_bench

scripts=()
if [ "$#" -gt 0 ]; then
  for name in "$@"; do
    f="benchmarks/${name%.py}.py"
    [ -f "$f" ] || { echo "no benchmark $f; available: $(cd benchmarks && ls ./[!_]*.py | xargs -n1 basename | tr '\n' ' ')" >&2; exit 2; }
    scripts+=("$f")
  done
else
  shopt -s nullglob
  for f in benchmarks/*.py; do
    case "$(basename "$f")" in _*) ;; *) scripts+=("$f") ;; esac  # _*.py: shared helpers
  done
  shopt -u nullglob
fi
[ "${#scripts[@]}" -gt 0 ] || { echo "no benchmarks/*.py scripts found" >&2; exit 2; }

failed=()
for f in "${scripts[@]}"; do
  ew_log "benchmark $f"
  if ! "$EW_PY" "$f"; then
    failed+=("$f")
  fi
  echo
done
if [ "${#failed[@]}" -gt 0 ]; then
  ew_log "targets missed or errors in: ${failed[*]}"
  exit 1
fi
ew_log "all benchmarks met their targets"
