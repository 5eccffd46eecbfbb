#!/usr/bin/env bash
# Install what the tests need (a .venv, mosquitto, PostgreSQL, softhsm2,
# chromium, mkfs.ext4) and run every check:
#   1. static checks: ruff, mypy (device_agent packager fleet), bandit (the same packages)
#   2. the pytest suite
#   3. the ARM64 check: the agent end to end under qemu-aarch64-static, then a subset of the
#      agent's own tests inside the emulated aarch64 Python (all of them with --slow)
#
#   scripts/test.sh            the default run (well under 20 minutes on 2 cores)
#   scripts/test.sh --slow     also the long soak and fuzz runs (atheris), and every agent test on ARM64
#   scripts/test.sh -k bundle  extra arguments go to pytest, and only pytest runs (a focused run)
#
# Every step runs even when an earlier one failed; the script exits 1 if any step failed and
# prints each step's result and wall-clock time at the end.
set -euo pipefail
exec </dev/null
source "$(dirname "$0")/lib/env.sh"
cd "$EW_ROOT"
args=()
slow=0
for a in "$@"; do
  if [ "$a" = "--slow" ]; then slow=1; export EDGEWARD_SLOW=1; else args+=("$a"); fi
done
ensure_venv
ensure_mosquitto || true
ensure_postgresql || true
ensure_softhsm || true
ensure_loopfs || true
ensure_chromium || true
[ "$slow" = 1 ] && { ensure_fuzz || true; }

results=()
failed=0
step() {  # step NAME COMMAND...: run one step, time it, record its result
  local name="$1" t0 t1 rc
  shift
  ew_log "$name"
  t0=$(date +%s)
  set +e
  "$@"
  rc=$?
  set -e
  t1=$(date +%s)
  if [ "$rc" = 0 ]; then
    results+=("$(printf 'PASS  %5ss  %s' "$((t1 - t0))" "$name")")
  else
    results+=("$(printf 'FAIL  %5ss  %s (exit %s)' "$((t1 - t0))" "$name" "$rc")")
    failed=1
  fi
}

if [ "${#args[@]}" -gt 0 ]; then
  ew_log "pytest arguments given (${args[*]}): a focused run, pytest only"
  exec "$EW_PY" -m pytest -q "${args[@]}"
fi

step "ruff check ." "$EW_PY" -m ruff check .
step "mypy (device_agent packager fleet)" "$EW_PY" -m mypy
step "bandit -r device_agent packager fleet" "$EW_PY" -m bandit -q -c pyproject.toml -r device_agent packager fleet
# The ARM64 check runs as its own step below, so pytest leaves out its wrapper test.
step "pytest" "$EW_PY" -m pytest -q --deselect tests/test_arm64.py::test_agent_runs_on_arm64_under_emulation
if [ "$slow" = 1 ]; then
  step "ARM64 check (emulated board, every agent test)" bash scripts/arm64-check.sh --tests all
else
  step "ARM64 check (emulated board, agent test subset)" bash scripts/arm64-check.sh --tests quick
fi

echo
ew_log "summary (wall clock)"
printf '  %s\n' "${results[@]}"
exit "$failed"
