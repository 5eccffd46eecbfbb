# Shared set-up for scripts/test.sh, scripts/demo.sh and benchmarks/run.sh (sourced, not run).
# Creates .venv with everything EdgeWard and its tests need, and mosquitto, PostgreSQL and
# softhsm2 when they are missing.

EW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EW_VENV="${EDGEWARD_VENV:-$EW_ROOT/.venv}"
EW_PY="$EW_VENV/bin/python"

ew_log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# pip, quietly: this machine's pip config names package indexes that may be absent locally.
ew_pip() { "$EW_PY" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }

ensure_venv() {
  local stamp="$EW_VENV/.edgeward-installed" want
  want="$(cat "$EW_ROOT/pyproject.toml" "$EW_ROOT/scripts/lib/env.sh" | sha256sum | cut -d' ' -f1)"
  if [ -x "$EW_PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  ew_log "installing EdgeWard and its test dependencies into $EW_VENV (first run only)"
  command -v python3 >/dev/null || { echo "python3 (3.11+) is required" >&2; exit 4; }
  [ -x "$EW_PY" ] || python3 -m venv "$EW_VENV"
  ew_pip install --quiet -e "$EW_ROOT[all]"
  # Real third-party models that ship inside wheels; their heavy runtime deps (torch) are not needed.
  ew_pip install --quiet --no-deps "silero-vad==6.2.*"
  # RapidOCR's recogniser keeps its character dictionary in metadata_props (hardening tests).
  ew_pip install --quiet --no-deps "rapidocr-onnxruntime==1.4.*"
  echo "$want" > "$stamp"
}

# Install Debian packages as root (the package index is refreshed once per run); otherwise say
# what to install and why (the caller goes on: the tests that need the package skip or fail).
ew_apt_install() {
  local what="$1" why="$2"; shift 2
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    ew_log "installing $what"
    if [ -z "${EW_APT_UPDATED:-}" ]; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
      EW_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "$why" >&2
    return 1
  fi
}

# atheris (the `fuzz` extra) for the coverage-guided fuzz run of scripts/test.sh --slow. Binary
# wheels only: where none exists for this Python, the fuzz tests say so and the long hypothesis
# run in tests/test_fuzz.py covers the same parsers.
ensure_fuzz() {
  "$EW_PY" -c 'import atheris' 2>/dev/null && return 0
  ew_log "installing atheris (the fuzz extra) for the coverage-guided fuzz run"
  if ! ew_pip install --quiet --only-binary=atheris "atheris>=2.3"; then
    echo "atheris has no binary wheel for this Python: the atheris fuzz run is skipped (the hypothesis run remains)" >&2
    return 1
  fi
}

# model_signing (the bench extra) for benchmarks/bundle.py's comparison with OpenSSF model signing;
# without it that row says it was skipped.
ensure_bench() {
  "$EW_PY" -c 'import model_signing' 2>/dev/null && return 0
  ew_log "installing the bench extra (model-signing) for the benchmarks"
  ew_pip install --quiet -e "$EW_ROOT[bench]" || echo "could not install model-signing: its benchmark row is skipped" >&2
}

ensure_mosquitto() {
  command -v mosquitto >/dev/null && return 0
  [ -x /usr/sbin/mosquitto ] && return 0
  ew_apt_install "mosquitto (Debian package)" "mosquitto is not installed: run 'sudo apt-get install mosquitto' (MQTT tests need it)" mosquitto
}

# PostgreSQL for the monitor-store tests: they make a throwaway cluster with initdb (Debian package).
ensure_postgresql() {
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
  command -v initdb >/dev/null && return 0
  ew_apt_install "postgresql (Debian package)" "PostgreSQL is not installed: run 'sudo apt-get install postgresql' (monitor-store tests need it)" postgresql
}

# SoftHSM2 (Debian's softhsm2: PKCS#11 3.0 with Ed25519) for the tests and the docs that sign
# through a PKCS#11 token; each test makes its own token in a temporary directory.
ensure_softhsm() {
  command -v softhsm2-util >/dev/null && return 0
  ew_apt_install "softhsm2 (Debian package)" "softhsm2 is not installed: run 'sudo apt-get install softhsm2' (PKCS#11 signing tests need it)" softhsm2
}

# mkfs.ext4 (e2fsprogs) and losetup/mount (mount) for the raw-disk wipe test (Debian packages);
# the test itself needs root and a free loop device, and says so when it skips.
ensure_loopfs() {
  local missing=() dirs="/usr/sbin:/sbin:$PATH"
  PATH="$dirs" command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
  PATH="$dirs" command -v losetup >/dev/null || missing+=(mount)
  [ "${#missing[@]}" = 0 ] && return 0
  ew_apt_install "${missing[*]} (Debian packages)" "${missing[*]} not installed: run 'sudo apt-get install ${missing[*]}' (the raw-disk wipe test needs it)" "${missing[@]}"
}

# Headless Chromium and its WebDriver for the dashboard test (Debian packages).
ensure_chromium() {
  command -v chromium >/dev/null && command -v chromedriver >/dev/null && return 0
  ew_apt_install "chromium and chromium-driver (Debian packages)" "chromium is not installed: run 'sudo apt-get install chromium chromium-driver' (dashboard test needs it)" chromium chromium-driver
}
