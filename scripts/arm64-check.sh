#!/usr/bin/env bash
# Prove the real board agent (device_agent/) works on aarch64, on this x86_64 machine, by running
# it under QEMU user-mode emulation (qemu-aarch64-static, QEMU_CPU=cortex-a72 as on a Pi 4).
#
#   scripts/arm64-check.sh [--root DIR] [--work DIR] [--keep] [--tests quick|all|none]
#
#   --root DIR   the arm64 root (Debian bookworm arm64 python3.11 + aarch64 wheels);
#                default .arm64-root/ in the repo. Built once, reused while its recipe holds.
#   --work DIR   where keys, model, board data dir and bundles go (default: a temp dir,
#                removed after a PASS unless --keep).
#   --keep       keep the work dir.
#   --tests SET  after the end-to-end check, run the agent's own pytest tests inside the emulated
#                aarch64 Python: quick (default; a subset of a few minutes), all, or none.
#
# Non-interactive (CI=true, no stdin). Installs what it needs: qemu-user-static and the arm64
# apt architecture (as root), the host .venv (scripts/lib/env.sh). Exit codes: 0 PASS, 1 a
# check failed, 2 usage, 4 environment (cannot set up). See docs/arm64.md.
set -euo pipefail
exec </dev/null
export DEBIAN_FRONTEND=noninteractive
source "$(dirname "$0")/lib/env.sh"

ROOT="$EW_ROOT/.arm64-root"
WORK=""
KEEP=0
TESTS=quick
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
    --root=*) ROOT="${1#--root=}"; shift ;;
    --work) WORK="${2:?--work needs a directory}"; shift 2 ;;
    --work=*) WORK="${1#--work=}"; shift ;;
    --keep) KEEP=1; shift ;;
    --tests) TESTS="${2:?--tests needs quick, all or none}"; shift 2 ;;
    --tests=*) TESTS="${1#--tests=}"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "arm64-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$TESTS" in quick|all|none) ;; *) echo "arm64-check: --tests must be quick, all or none, not $TESTS" >&2; exit 2 ;; esac
mkdir -p "$(dirname "$ROOT")"
ROOT="$(cd "$(dirname "$ROOT")" && pwd)/$(basename "$ROOT")"
case "$ROOT" in /|/usr|/usr/*|/etc|/etc/*|/bin|/lib|/home|"$EW_ROOT") echo "arm64-check: refusing --root $ROOT" >&2; exit 2 ;; esac

fail() { printf 'arm64 check: FAIL: %s\n' "$1" >&2; [ -n "${WORK:-}" ] && echo "work dir kept: $WORK" >&2; exit "${2:-1}"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
T_START=$(now)

# The arm64 packages: python3.11 and everything it links against (plus libstdc++ for
# onnxruntime), resolved by apt for arm64. Tools and scripts dpkg -x does not need are left out.
APT_SEEDS=(python3.11:arm64 libstdc++6:arm64)
APT_SKIP='^(dpkg|tar|install-info|perl|perl-base|perl-modules-5.36|debconf|readline-common|mailcap|media-types|mime-support):arm64$'
WHEELS=(numpy onnxruntime PyNaCl cryptography paho-mqtt)
PLATFORMS=(manylinux_2_34_aarch64 manylinux_2_28_aarch64 manylinux2014_aarch64 manylinux_2_17_aarch64)
RECIPE_VERSION=1

apt_install() {  # apt_install PKG...: as root, non-interactively
  [ "$(id -u)" = 0 ] || fail "$* is missing: run 'sudo apt-get install $*'" 4
  ew_log "installing $* (Debian packages)"
  apt-get update -qq >/dev/null
  apt-get install -y -qq "$@" >/dev/null
}

if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then fail "needs a Debian/Ubuntu host (apt-get, dpkg)" 4; fi
command -v qemu-aarch64-static >/dev/null || apt_install qemu-user-static
QEMU="$(command -v qemu-aarch64-static)"

# --- host side: the x86 venv with the whole project (what scripts/test.sh creates) -------------
ensure_venv
BIN="$EW_VENV/bin"

# Wheel versions: the same as the host venv, so both sides run the same library code.
mapfile -t PINS < <("$EW_PY" - "${WHEELS[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PY
)
RECIPE="v$RECIPE_VERSION ${APT_SEEDS[*]} skip=$APT_SKIP ${PINS[*]} ${PLATFORMS[*]} $(uname -m)"
RECIPE_HASH="$(printf '%s' "$RECIPE" | sha256sum | cut -d' ' -f1)"

# Run the arm64 python3.11 under emulation, as a Pi 4. QEMU's cortex-a72 model advertises the
# ARMv8 AES/PMULL/SHA1/SHA2 instructions in HWCAP, which the Pi 4's BCM2711 does not have:
# OPENSSL_armcap=0x1 (NEON only) keeps OpenSSL (in cryptography and in Python's hashlib/ssl) on
# the code paths a real Pi 4 takes. Without binfmt_misc every python3.11 is started through qemu.
arm64_py() {
  env -u PYTHONHOME -u VIRTUAL_ENV -u PYTHONSTARTUP OPENSSL_armcap=0x1 \
    QEMU_CPU=cortex-a72 PYTHONPATH="$ROOT/site:$EW_ROOT" PYTHONNOUSERSITE=1 \
    PYTHONDONTWRITEBYTECODE=1 "$QEMU" -L "$ROOT" "$ROOT/usr/bin/python3.11" "$@"
}

write_cpuinfo() {  # a Raspberry Pi 4 Model B's /proc/cpuinfo (4x Cortex-A72, no crypto extensions)
  mkdir -p "$1/proc"
  : > "$1/proc/cpuinfo"
  for i in 0 1 2 3; do
    cat >> "$1/proc/cpuinfo" <<EOF
processor	: $i
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3

EOF
  done
  cat >> "$1/proc/cpuinfo" <<'EOF'
Hardware	: BCM2835
Revision	: c03111
Serial		: 10000000deadbeef
Model		: Raspberry Pi 4 Model B Rev 1.1
EOF
}

build_root() {
  local part="$ROOT.partial" debs pkgs
  [ -e "$ROOT" ] && [ ! -f "$ROOT/.edgeward-root" ] && [ -n "$(ls -A "$ROOT")" ] &&
    fail "$ROOT exists and is not an arm64 root made by this script; pass another --root" 2
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    [ "$(id -u)" = 0 ] || fail "the arm64 apt architecture is not enabled: run 'sudo dpkg --add-architecture arm64 && sudo apt-get update'" 4
    ew_log "enabling the arm64 apt architecture (dpkg --add-architecture arm64)"
    dpkg --add-architecture arm64
  fi
  ew_log "apt-get update (arm64 package lists)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null; fi
  apt-cache show python3.11:arm64 >/dev/null 2>&1 ||
    fail "apt has no python3.11:arm64 (run apt-get update as root; the mirror must carry arm64)" 4

  rm -rf "$part"
  debs="$part/.debs"
  mkdir -p "$debs"
  mapfile -t pkgs < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
      --no-breaks --no-replaces --no-enhances "${APT_SEEDS[@]}" |
    grep -E '^[a-z0-9][^ ]*:arm64$' | sort -u | grep -Ev "$APT_SKIP" || true)
  [ "${#pkgs[@]}" -gt 3 ] || fail "could not resolve the arm64 python3.11 packages with apt-cache" 4
  ew_log "apt-get download ${#pkgs[@]} arm64 packages; dpkg -x each into $ROOT"
  (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "${pkgs[@]}" >/dev/null) ||
    fail "apt-get download failed for: ${pkgs[*]}" 4
  for d in "$debs"/*.deb; do
    dpkg -x "$d" "$part"
    # shellcheck disable=SC2016  # dpkg-deb's own ${Field} syntax
    dpkg-deb --show --showformat='${Package} ${Version} ${Architecture}\n' "$d" >> "$part/.edgeward-debs"
  done
  rm -rf "$debs"
  # A board's site-packages dirs exist and are empty: without them qemu -L would fall back to the
  # HOST's /usr/lib/python3/dist-packages (x86) and a missing wheel could hide behind it.
  mkdir -p "$part/usr/lib/python3/dist-packages" "$part/usr/local/lib/python3.11/dist-packages"
  write_cpuinfo "$part"

  ew_log "pip install aarch64 wheels for cp311 into $ROOT/site: ${PINS[*]}"
  local pipargs=(install --quiet --disable-pip-version-check --no-warn-script-location
    --target "$part/site" --only-binary=:all: --python-version 3.11 --implementation cp)
  for p in "${PLATFORMS[@]}"; do pipargs+=(--platform "$p"); done
  # (pip's exit code decides: run from the venv it also grumbles about the venv's own packages)
  if ! ew_pip "${pipargs[@]}" "${PINS[@]}" >"$part/.pip.log" 2>&1; then
    cat "$part/.pip.log" >&2
    echo "arm64-check: WARNING: the host venv's versions (${PINS[*]}) do not all resolve for aarch64; trying the newest aarch64 wheels" >&2
    rm -rf "$part/site"
    ew_pip "${pipargs[@]}" "${WHEELS[@]}" >"$part/.pip.log" 2>&1 ||
      { cat "$part/.pip.log" >&2; fail "pip could not install aarch64 wheels for ${WHEELS[*]}" 4; }
  fi
  grep -h '^Tag:' "$part"/site/*.dist-info/WHEEL | sort | uniq -c | sed 's/^/    /' >&2

  ew_log "smoke test: importing the board's dependencies under emulation"
  local saved="$ROOT"
  ROOT="$part"
  arm64_py -c 'import platform, numpy, onnxruntime, nacl, cryptography, paho.mqtt, ssl, sqlite3; assert platform.machine() == "aarch64", platform.machine()' ||
    { ROOT="$saved"; fail "the arm64 root does not import numpy/onnxruntime/nacl/cryptography/paho under emulation" 4; }
  ROOT="$saved"
  printf '%s\n%s\n' "$RECIPE_HASH" "$RECIPE" > "$part/.edgeward-root"
  rm -rf "$ROOT"
  mv "$part" "$ROOT"
}

# One run at a time per root: a rebuild replaces the root under any other run's feet.
exec 9>"$ROOT.lock"
flock -w 1800 9 || fail "another arm64 check holds $ROOT.lock" 4

T0=$(now)
if [ -f "$ROOT/.edgeward-root" ] && [ "$(head -n1 "$ROOT/.edgeward-root")" = "$RECIPE_HASH" ] &&
   [ -x "$ROOT/usr/bin/python3.11" ] && [ -f "$ROOT/proc/cpuinfo" ]; then
  SETUP_STATE="cached"
  ew_log "arm64 root $ROOT is up to date (cached)"
else
  SETUP_STATE="built"
  ew_log "building the arm64 root in $ROOT"
  build_root
fi
T_SETUP=$(secs "$T0" "$(now)")
echo "arm64 root: $SETUP_STATE in ${T_SETUP}s ($(du -sh "$ROOT" | cut -f1)); $(grep -E '^python3.11-minimal ' "$ROOT/.edgeward-debs" | cut -d' ' -f1-2)"

# --- the agent's own tests on the emulated board (--tests) ------------------------------------
# The board's packages stay in ROOT/site. What only the tests need goes to ROOT/test-site, at the
# host venv's versions: pytest and hypothesis; ai-edge-litert (the `tflite` extra a LiteRT board
# installs); onnx and the silero-vad wheel (its ONNX model), which the tests' fixtures read;
# scikit-learn (the detectors' tests load its digits data) and scipy (their reference Shapiro-Wilk).
# The tests pack their bundles with the real packager code inside the same emulated process.
TEST_WHEELS=(pytest hypothesis ai-edge-litert onnx scikit-learn scipy numpy)
TEST_NODEPS=(silero-vad)
# ai-edge-litert's aarch64 wheels are manylinux_2_27 (bookworm has glibc 2.36).
TEST_PLATFORMS=(manylinux_2_34_aarch64 manylinux_2_28_aarch64 manylinux_2_27_aarch64 manylinux2014_aarch64
  manylinux_2_17_aarch64)
# The agent's own tests: everything the board runs (bundle, trust, store, runtime, service,
# telemetry, commands, wipe). Host-only tests (packager, hardening, fleet, docs, CLI) are left out.
AGENT_TESTS_ALL=(test_agent_install test_audit test_budgets test_bundle_format test_bundle_reads test_commands
  test_commands_broker test_config test_datadir_layout test_detect test_hostile_formats test_input_bounds
  test_outbox test_serve_api test_serve_telemetry test_telemetry_faults test_throttle test_trust_core
  test_trusted_state test_upgrade test_wipe test_wipe_faults)
# A few minutes' worth: bundle verification and decryption, install and its refusals, the trust
# decisions, inference on onnxruntime and LiteRT, the sealed state, upgrade of old boards, wipe.
AGENT_TESTS_QUICK=(test_bundle_format test_agent_install test_trust_core test_trusted_state test_upgrade test_wipe)
# Left out under emulation: wall-clock bounds set for native speed (a child python3.11 alone takes
# seconds to start under qemu). They run natively in the pytest step.
AGENT_TESTS_NATIVE_ONLY=(
  "tests/test_bundle_reads.py::test_a_path_that_is_not_a_regular_file_is_refused_at_once"
  "tests/test_input_bounds.py::test_a_compressed_npz_bomb_is_refused_quickly_in_bounded_memory"
  "tests/test_input_bounds.py::test_the_http_api_answers_422_to_each_hostile_body"
)

host_pins() {  # host_pins NAME...: NAME==version as in the host venv
  "$EW_PY" - "$@" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PY
}

ensure_test_site() {
  local dir="$ROOT/test-site" pins nodeps recipe p
  mapfile -t pins < <(host_pins "${TEST_WHEELS[@]}")
  mapfile -t nodeps < <(host_pins "${TEST_NODEPS[@]}")
  recipe="v1 ${pins[*]} nodeps=${nodeps[*]} ${TEST_PLATFORMS[*]}"
  if [ -f "$dir/.edgeward-test-site" ] && [ "$(cat "$dir/.edgeward-test-site")" = "$recipe" ]; then
    return 0
  fi
  ew_log "pip install the tests' aarch64 wheels into $dir: ${pins[*]} ${nodeps[*]}"
  rm -rf "$dir" "$dir.partial"
  local pipargs=(install --quiet --disable-pip-version-check --no-warn-script-location
    --target "$dir.partial" --only-binary=:all: --python-version 3.11 --implementation cp)
  for p in "${TEST_PLATFORMS[@]}"; do pipargs+=(--platform "$p"); done
  { ew_pip "${pipargs[@]}" "${pins[@]}" && ew_pip "${pipargs[@]}" --no-deps "${nodeps[@]}"; } >"$ROOT/.test-pip.log" 2>&1 ||
    { cat "$ROOT/.test-pip.log" >&2; fail "pip could not install the tests' aarch64 wheels (${pins[*]})" 4; }
  echo "$recipe" > "$dir.partial/.edgeward-test-site"
  mv "$dir.partial" "$dir"
}

run_agent_tests() {  # run_agent_tests quick|all
  local set="$1" files=() names f rc
  if [ "$set" = all ]; then names=("${AGENT_TESTS_ALL[@]}"); else names=("${AGENT_TESTS_QUICK[@]}"); fi
  for f in "${names[@]}"; do files+=("tests/$f.py"); done
  for f in "${AGENT_TESTS_NATIVE_ONLY[@]}"; do files+=(--deselect "$f"); done
  ensure_test_site
  ew_log "host: the tests' model fixtures (trained with scikit-learn, which the board does not have)"
  (cd "$EW_ROOT" && "$EW_PY" -c 'from tests.conftest import CACHE
from tests.fixtures.hardening import digits_cnn
from tests.fixtures.models import build_digits
build_digits(CACHE / "digits"); digits_cnn()') || fail "could not build the test fixtures on the host"
  # No binfmt_misc here: the tests' child processes (sys.executable -m device_agent.cli ...) start
  # the emulated python3.11 through this wrapper, with the same environment as the pytest process.
  mkdir -p "$WORK/test-bin"
  {
    echo '#!/bin/sh'
    echo 'export OPENSSL_armcap=0x1 QEMU_CPU=cortex-a72 PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1'
    echo "export PYTHONPATH=\"$ROOT/site:$ROOT/test-site:$EW_ROOT\${PYTHONPATH:+:\$PYTHONPATH}\""
    echo 'unset PYTHONHOME VIRTUAL_ENV PYTHONSTARTUP'
    echo "exec \"$QEMU\" -L \"$ROOT\" \"$ROOT/usr/bin/python3.11\" \"\$@\""
  } > "$WORK/test-bin/python3.11"
  chmod 755 "$WORK/test-bin/python3.11"
  cat > "$WORK/run_tests.py" <<'PY'
"""Runs on the (emulated) board: pytest over the agent's own tests, on the arm64 root's wheels."""
import os, platform, sys
sys.executable = os.environ["EDGEWARD_ARM64_PYTHON"]  # child processes go through qemu too
if __name__ == "__main__":  # not in a multiprocessing "spawn" child, which imports this file again
    import cryptography, nacl, numpy, onnxruntime, ai_edge_litert, pytest
    root = os.environ["EDGEWARD_ARM64_ROOT"]
    assert platform.machine() == "aarch64", platform.machine()
    for m in (cryptography, nacl, numpy, onnxruntime, ai_edge_litert):
        assert m.__file__.startswith(root + "/"), f"{m.__name__} comes from {m.__file__}, not the arm64 root"
    print(f"aarch64 Python {platform.python_version()}: onnxruntime {onnxruntime.__version__}, "
          f"numpy {numpy.__version__}, cryptography {cryptography.__version__}, PyNaCl {nacl.__version__}", flush=True)
    sys.exit(pytest.main(sys.argv[1:]))
PY
  ew_log "board (arm64, emulated): the agent's own tests ($set: ${#names[@]} files) under pytest"
  # The tests set their own EDGEWARD_* variables: none of the check's (its KEK file) may leak in.
  local clean=(-u PYTHONPATH) v
  for v in $(compgen -e); do case "$v" in EDGEWARD_*) clean+=(-u "$v") ;; esac; done
  set +e
  (cd "$EW_ROOT" && env "${clean[@]}" EDGEWARD_ARM64_ROOT="$ROOT" \
    EDGEWARD_ARM64_PYTHON="$WORK/test-bin/python3.11" "$WORK/test-bin/python3.11" "$WORK/run_tests.py" \
    -q -p no:cacheprovider --basetemp "$WORK/pytest" "${files[@]}")
  rc=$?
  set -e
  [ "$rc" = 0 ] || fail "the agent's own tests ($set) failed on the emulated aarch64 board (pytest exit $rc)"
  echo "  ok   the agent's own tests ($set) pass on aarch64"
}

# --- the end-to-end check --------------------------------------------------------------------
if [ -z "$WORK" ]; then WORK="$(mktemp -d -t edgeward-arm64.XXXXXX)"; else mkdir -p "$WORK"; WORK="$(cd "$WORK" && pwd)"; fi
cd "$WORK"
rm -rf board enrolments release keys model kek venv wheelhouse piptool ./*.json ./*.npy ./*.ewb ./*.py ./*.txt
unset EDGEWARD_PASSPHRASE EDGEWARD_DEVICE_PASSPHRASE
# Device keys wrapped under a key file: Argon2id (the passphrase KDF) is very slow under emulation.
head -c 32 /dev/urandom > kek && chmod 600 kek
export EDGEWARD_DEVICE_KEK_FILE="$WORK/kek"
DEV=pi4-arm64

ew_log "host: publisher key and the digits model (tests.fixtures.models)"
"$BIN/edgeward" keys publisher --out keys --insecure-unencrypted-key >/dev/null
(cd "$EW_ROOT" && "$EW_PY" -m tests.fixtures.models "$WORK/model" >/dev/null)
"$EW_PY" - <<'PY'
import json, time
import numpy as np, onnxruntime as ort
z = np.load("model/digits_test.npz")
x, y = z["x"], z["y"]
np.save("x_test.npy", x); np.save("sample.npy", x[0])
s = ort.InferenceSession("model/digits_mlp.onnx", providers=["CPUExecutionProvider"])
t = time.perf_counter()
label, probs = s.run(None, {s.get_inputs()[0].name: x})[:2]
dt = time.perf_counter() - t
json.dump({"labels": label.astype(int).tolist(), "probs": np.asarray(probs, dtype=float).tolist(),
           "y": y.astype(int).tolist(), "seconds": dt}, open("host.json", "w"))
print(f"host onnxruntime {ort.__version__}: {len(y)} test digits, accuracy {(label == y).mean():.4f}, batch {dt*1e3:.2f} ms")
PY

ew_log "board (arm64, emulated): provision $DEV"
T0=$(now)
mkdir -p enrolments
arm64_py -m device_agent.cli provision --data-dir board --device-id "$DEV" \
  --publisher-pub keys/publisher.pub --export "enrolments/$DEV.json" ||
  fail "provision under emulation failed (exit $?)"
T_PROV=$(secs "$T0" "$(now)")

ew_log "host: edgeward pack --profile rpi4b for $DEV"
"$BIN/edgeward" pack model/digits_mlp.onnx --profile rpi4b --publisher-key keys/publisher.key \
  --device "enrolments/$DEV.json" --model-id digits --model-version 1 --out release --quiet --json > pack.json
CIPHER="$("$EW_PY" -c 'import json; print(json.load(open("pack.json"))["cipher"])')"
echo "bundle release/$DEV.ewb: $(stat -c %s "release/$DEV.ewb") bytes, cipher $CIPHER"
case "$CIPHER" in chacha20*) ;; *) fail "rpi4b bundle uses $CIPHER, expected ChaCha20-Poly1305 (the Pi 4 has no AES instructions)" ;; esac

ew_log "board (arm64, emulated): install"
T0=$(now)
arm64_py -m device_agent.cli install "release/$DEV.ewb" --data-dir board ||
  fail "install under emulation failed (exit $?)"
T_INST=$(secs "$T0" "$(now)")

# --- the board's install path (README.md "Install"): a wheelhouse built here, installed offline -----
ew_log "host: scripts/wheelhouse.sh (aarch64, Python 3.11, glibc 2.36; the host venv's versions)"
T0=$(now)
printf '%s\n' "${PINS[@]}" | grep -F '==' > constraints.txt || true
EDGEWARD_PYTHON="$EW_PY" bash "$EW_ROOT/scripts/wheelhouse.sh" --out wheelhouse --constraint constraints.txt >/dev/null ||
  fail "scripts/wheelhouse.sh could not build the aarch64 wheelhouse" 4
# pip itself (pure Python) to run on the board: ensurepip would start a child python3.11, which
# needs binfmt_misc under emulation; a real board's 'python3 -m venv' brings its own pip.
ew_pip download --quiet --no-deps --only-binary=:all: --dest piptool pip >/dev/null ||
  fail "could not download a pip wheel for the emulated board" 4
board_venv() {  # the agent exactly as pip installed it on the board: no repository on the path
  env -u PYTHONHOME -u VIRTUAL_ENV -u PYTHONSTARTUP -u PYTHONPATH OPENSSL_armcap=0x1 \
    QEMU_CPU=cortex-a72 PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 "$QEMU" -L "$ROOT" "$WORK/venv/bin/python3.11" "$@"
}
ew_log "board (arm64, emulated): python3.11 -m venv; pip install --no-index --find-links wheelhouse 'edgeward[device]'"
rm -rf venv
arm64_py -m venv --without-pip --copies venv || fail "python3.11 -m venv failed under emulation"
(cd / && board_venv "$(echo "$WORK"/piptool/pip-*.whl)/pip" install --quiet --disable-pip-version-check \
  --no-index --find-links "$WORK/wheelhouse" 'edgeward[device]') || fail "offline pip install from the wheelhouse failed"
WANT_VERSION="edgeward-agent $("$EW_PY" -c 'import device_agent; print(device_agent.__version__)')"
GOT_VERSION="$(cd / && board_venv "$WORK/venv/bin/edgeward-agent" --version)" || fail "edgeward-agent --version failed"
[ "$GOT_VERSION" = "$WANT_VERSION" ] || fail "edgeward-agent --version printed '$GOT_VERSION', expected '$WANT_VERSION'"
echo "  ok   $GOT_VERSION, installed from $(ls wheelhouse/*.whl | wc -l) wheels ($(du -sh wheelhouse | cut -f1)) into venv/"
WHERE="$(cd / && board_venv -c 'import device_agent, onnxruntime; print(device_agent.__file__)')"
case "$WHERE" in "$WORK/venv/"*) ;; *) fail "the installed agent was imported from $WHERE, not from the venv" ;; esac
INSTALLED_OUT="$(cd / && board_venv "$WORK/venv/bin/edgeward-agent" predict --data-dir "$WORK/board" --input "$WORK/sample.npy")" ||
  fail "predict with the agent installed from the wheelhouse failed"
INSTALLED_WANT="$("$EW_PY" -c 'import json; print(json.load(open("host.json"))["labels"][0])')"
[ "$INSTALLED_OUT" = "{\"label\": $INSTALLED_WANT}" ] ||
  fail "the installed agent predicted $INSTALLED_OUT, expected {\"label\": $INSTALLED_WANT}"
echo "  ok   installed edgeward-agent predict -> $INSTALLED_OUT"
T_WHEELS=$(secs "$T0" "$(now)")

cat > board_predict.py <<'PY'
"""Runs on the (emulated) board: the real Agent API over the whole digits test split."""
import json, platform, sys, time
t0 = time.perf_counter()
import numpy as np, onnxruntime, nacl, cryptography, paho.mqtt
from device_agent import Agent
t_import = time.perf_counter() - t0
x = np.load("x_test.npy")
agent = Agent("board")
t = time.perf_counter(); first = agent.predict(x[0]); t_load = time.perf_counter() - t
t = time.perf_counter(); batch = agent.predict(x); t_batch = time.perf_counter() - t
admin = agent.predict(x, role="admin")
t = time.perf_counter()
single = [agent.predict(row)["label"] for row in x]
t_single = time.perf_counter() - t
# Every loaded module's file must come from the arm64 root or the repo (never the host's x86 Python).
foreign = sorted(m for m in ("packager", "fleet") if m in sys.modules)
json.dump({
    "machine": platform.machine(),
    "python": platform.python_version(),
    "versions": {"numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
                 "PyNaCl": nacl.__version__, "cryptography": cryptography.__version__},
    "ort_providers": onnxruntime.get_available_providers(),
    "labels": [p["label"] for p in batch["predictions"]],
    "scores": [p["scores"] for p in admin["predictions"]],
    "single": single, "first": first, "host_modules_imported": foreign,
    "seconds": {"import": t_import, "first_predict_load": t_load, "batch": t_batch,
                "per_sample_loop": t_single, "n": len(x)},
}, open("board.json", "w"))
PY
ew_log "board (arm64, emulated): predict the whole test split via the Agent API"
T0=$(now)
arm64_py board_predict.py || fail "predict under emulation failed (exit $?)"
T_PRED=$(secs "$T0" "$(now)")

"$EW_PY" - <<'PY' || fail "arm64 predictions differ from the host's"
import json, sys
import numpy as np
h, b = json.load(open("host.json")), json.load(open("board.json"))
s = b["seconds"]
print(f"board: {b['machine']} Python {b['python']}, {b['versions']}, providers {b['ort_providers']}")
print(f"board: import {s['import']:.2f}s, first predict (verify+decrypt+load) {s['first_predict_load']:.2f}s, "
      f"batch of {s['n']} {s['batch']*1e3:.1f} ms, {s['n']} single predicts {s['per_sample_loop']:.2f}s "
      f"({s['per_sample_loop']/s['n']*1e3:.2f} ms each)")
ok = True
def check(cond, msg):
    global ok
    print(("  ok   " if cond else "  FAIL ") + msg)
    ok &= bool(cond)
check(b["machine"] == "aarch64", f"ran on {b['machine']}")
check(b["labels"] == h["labels"], f"batch labels identical to host onnxruntime ({len(h['labels'])} samples)")
check(b["single"] == h["labels"], "one-by-one labels identical to host onnxruntime")
check(b["first"] == {"label": h["labels"][0]}, f"default (user) output is a label only: {b['first']}")
d = float(np.abs(np.array(b["scores"]) - np.array(h["probs"])).max())
check(d <= 1e-4 + 1e-9, f"admin scores match host probabilities (max |diff| {d:.2e}, 4 decimals)")
acc = float(np.mean(np.array(b["labels"]) == np.array(h["y"])))
print(f"  accuracy on the board {acc:.4f}")
check(not b["host_modules_imported"], f"device_agent imported no host package ({b['host_modules_imported']})")
sys.exit(0 if ok else 1)
PY

ew_log "board (arm64, emulated): a bundle with one flipped bit is refused and the model keeps serving"
snapshot() { (cd board && find . -type f ! -name .lock -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1); }
BEFORE="$(snapshot)"
"$EW_PY" -c '
import sys
d = bytearray(open(sys.argv[1], "rb").read()); d[200] ^= 0x01
open("tampered.ewb", "wb").write(d)' "release/$DEV.ewb"
T0=$(now)
set +e
arm64_py -m device_agent.cli install tampered.ewb --data-dir board 2> refusal.err
RC=$?
set -e
T_REF=$(secs "$T0" "$(now)")
echo "  exit code $RC: $(cat refusal.err)"
[ "$RC" -eq 1 ] || fail "tampered bundle: expected exit code 1 (refused for security), got $RC"
[ "$(wc -l < refusal.err)" -eq 1 ] || fail "tampered bundle: expected one line on stderr"
[ "$(snapshot)" = "$BEFORE" ] || fail "the refused install changed the board's data dir"
echo "  ok   data dir unchanged by the refusal"
OUT="$(arm64_py -m device_agent.cli predict --data-dir board --input sample.npy)" ||
  fail "predict after the refusal failed"
WANT="$("$EW_PY" -c 'import json; print(json.load(open("host.json"))["labels"][0])')"
[ "$OUT" = "{\"label\": $WANT}" ] || fail "after the refusal, predict printed $OUT, expected {\"label\": $WANT}"
echo "  ok   still serving: edgeward-agent predict -> $OUT"
arm64_py -m device_agent.cli status --data-dir board | sed 's/^/  /'

T_TESTS=0.0
if [ "$TESTS" != none ]; then
  T0=$(now)
  run_agent_tests "$TESTS"
  T_TESTS=$(secs "$T0" "$(now)")
fi

T_ALL=$(secs "$T_START" "$(now)")
echo
echo "timings (seconds, wall clock; each emulated step includes starting python3.11 and its imports under qemu)"
printf '  %-34s %6s\n' "arm64 root set-up ($SETUP_STATE)" "$T_SETUP" \
  "emulated provision (KEK file)" "$T_PROV" "emulated install" "$T_INST" \
  "wheelhouse + emulated pip install" "$T_WHEELS" \
  "emulated predict (Agent API)" "$T_PRED" "emulated refused install" "$T_REF" \
  "emulated agent tests ($TESTS)" "$T_TESTS" "whole check" "$T_ALL"
if [ "$KEEP" = 1 ]; then echo "work dir kept: $WORK"; else cd /; rm -rf "$WORK"; fi
echo "arm64 check: PASS"
