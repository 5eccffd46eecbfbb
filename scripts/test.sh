#!/usr/bin/env bash
# Install what the tests need (a .venv, mosquitto, PostgreSQL, softhsm2, chromium, mkfs.ext4) and run them.
#   scripts/test.sh            the default suite (well under 15 minutes on 2 cores)
#   scripts/test.sh --slow     also the long soak and fuzz runs
#   scripts/test.sh -k bundle  extra arguments go to pytest
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
cd "$EW_ROOT"
args=()
for a in "$@"; do
  if [ "$a" = "--slow" ]; then export EDGEWARD_SLOW=1; else args+=("$a"); fi
done
ensure_venv
ensure_mosquitto || true
ensure_postgresql || true
ensure_softhsm || true
ensure_loopfs || true
ensure_chromium || true
ew_log "running the tests"
exec "$EW_PY" -m pytest -q "${args[@]}"
