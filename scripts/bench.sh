#!/usr/bin/env bash
# Run every benchmark once (benchmarks/run.sh) and write one report, docs/benchmarks.md: each
# figure beside its target (PASS/MISS), measured side by side in this run, with the machine it ran
# on (CPU, cores, memory, Python, onnxruntime and the other runtimes' versions, date).
#
#   scripts/bench.sh               writes docs/benchmarks.md (about 5 minutes on 2 cores)
#   scripts/bench.sh --out FILE    writes FILE instead
#
# Exit code: benchmarks/run.sh's (0 every target met, 1 a target missed or a script failed);
# the report is written either way, and says which.
set -uo pipefail
exec </dev/null
source "$(dirname "$0")/lib/env.sh"
cd "$EW_ROOT"
out="docs/benchmarks.md"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a file}"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
ensure_venv
ensure_mosquitto || exit 4  # benchmarks/fleet.py runs a private mosquitto

results="$(mktemp -t edgeward-bench.XXXXXX)"
trap 'rm -f "$results"' EXIT
t0=$(date +%s)
EDGEWARD_BENCH_RESULTS="$results" bash benchmarks/run.sh
rc=$?
"$EW_PY" benchmarks/_report.py "$results" "$out" --status "$rc" --seconds "$(($(date +%s) - t0))" || exit 70
exit "$rc"
