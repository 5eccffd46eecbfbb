#!/usr/bin/env bash
# Build an offline wheelhouse for a board: the edgeward wheel, built from this repository, and the
# binary wheels of its `device` extra for the board's platform. Copy the directory to the board and
# install from it without a network (README.md, docs/raspberry-pi.md):
#
#   python3 -m venv /opt/edgeward
#   /opt/edgeward/bin/pip install --no-index --find-links WHEELHOUSE 'edgeward[device]'
#
#   scripts/wheelhouse.sh [--out DIR] [--python-version X.Y] [--arch ARCH] [--glibc X.Y]
#                         [--extra NAME] [--constraint FILE]
#
#   --out DIR             where the wheels go (default: wheelhouse/ in the repository)
#   --python-version X.Y  the board's Python (default 3.11: Raspberry Pi OS bookworm)
#   --arch ARCH           the board's machine (default aarch64)
#   --glibc X.Y           the board's glibc: manylinux wheels up to it are accepted (default 2.36: bookworm)
#   --extra NAME          the edgeward extra to include (default device; repeatable, e.g. --extra tflite)
#   --constraint FILE     pip constraints (e.g. exact versions to match another machine)
#
# Needs a Python 3.11+ with pip on this machine (the workstation) and access to a package index.
# Only binary wheels are taken (--only-binary=:all:): nothing is compiled on the board. Exit codes:
# 0 done, 2 usage, 4 environment (no Python, no index, no wheel for the platform).
set -euo pipefail
exec </dev/null

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$REPO/wheelhouse"
PYVER=3.11
ARCH=aarch64
GLIBC=2.36
EXTRAS=()
CONSTRAINT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --python-version) PYVER="${2:?--python-version needs X.Y}"; shift 2 ;;
    --arch) ARCH="${2:?--arch needs a machine name}"; shift 2 ;;
    --glibc) GLIBC="${2:?--glibc needs X.Y}"; shift 2 ;;
    --extra) EXTRAS+=("${2:?--extra needs a name}"); shift 2 ;;
    --constraint) CONSTRAINT="${2:?--constraint needs a file}"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "wheelhouse: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "${#EXTRAS[@]}" -gt 0 ] || EXTRAS=(device)
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "wheelhouse: --python-version must look like 3.11" >&2; exit 2; }
[[ "$GLIBC" =~ ^2\.([0-9]+)$ ]] || { echo "wheelhouse: --glibc must look like 2.36" >&2; exit 2; }
GLIBC_MINOR="${BASH_REMATCH[1]}"
[ "$GLIBC_MINOR" -ge 17 ] || { echo "wheelhouse: --glibc must be 2.17 or newer (manylinux2014)" >&2; exit 2; }
[[ "$ARCH" =~ ^[a-z0-9_]+$ ]] || { echo "wheelhouse: --arch must be a machine name such as aarch64" >&2; exit 2; }
for e in "${EXTRAS[@]}"; do
  [[ "$e" =~ ^[a-z0-9_-]+$ ]] || { echo "wheelhouse: --extra $e is not an extra name" >&2; exit 2; }
done
if [ -n "$CONSTRAINT" ] && [ ! -f "$CONSTRAINT" ]; then echo "wheelhouse: --constraint $CONSTRAINT does not exist" >&2; exit 2; fi

PY="${EDGEWARD_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3 || true)"; fi
fi
[ -n "$PY" ] && "$PY" -m pip --version >/dev/null 2>&1 ||
  { echo "wheelhouse: needs python3 with pip on this machine (set EDGEWARD_PYTHON)" >&2; exit 4; }

# Every manylinux tag the board's glibc accepts, newest first (pip takes each --platform as given).
PLATFORMS=()
for ((m = GLIBC_MINOR; m >= 17; m--)); do PLATFORMS+=(--platform "manylinux_2_${m}_${ARCH}"); done
PLATFORMS+=(--platform "manylinux2014_${ARCH}")

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUILD="$(mktemp -d -t edgeward-wheel.XXXXXX)"
trap 'rm -rf "$BUILD"' EXIT

echo "==> building the edgeward wheel from $REPO" >&2
# A copy, so that the build leaves nothing (build/, *.egg-info) in the repository.
tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=wheelhouse --exclude='.arm64-root*' \
  --exclude=__pycache__ --exclude=tests -cf - . | tar -C "$BUILD" -xf - --one-top-level=src
"$PY" -m pip wheel --disable-pip-version-check --quiet --no-deps -w "$BUILD/dist" "$BUILD/src" >&2 ||
  { echo "wheelhouse: building the edgeward wheel failed" >&2; exit 4; }
WHEEL="$(ls "$BUILD"/dist/edgeward-*.whl)"
rm -f "$OUT"/edgeward-*.whl
cp "$WHEEL" "$OUT/"
WHEEL="$OUT/$(basename "$WHEEL")"

SPEC="$WHEEL[$(IFS=,; echo "${EXTRAS[*]}")]"
echo "==> downloading the wheels of edgeward[$(IFS=,; echo "${EXTRAS[*]}")] for cp${PYVER/./} ${ARCH}, glibc ${GLIBC}" >&2
args=(download --disable-pip-version-check --quiet --dest "$OUT" --only-binary=:all:
      --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}")
[ -n "$CONSTRAINT" ] && args+=(--constraint "$CONSTRAINT")
# (this machine's pip configuration may name indexes that are absent: pip warns, its exit code decides)
if ! "$PY" -m pip "${args[@]}" "$SPEC" >"$BUILD/pip.log" 2>&1; then
  grep -v '^WARNING: Location' "$BUILD/pip.log" >&2 || true
  echo "wheelhouse: pip could not find binary wheels for every dependency on $ARCH (Python $PYVER, glibc $GLIBC)" >&2
  exit 4
fi

(cd "$OUT" && sha256sum -- *.whl > SHA256SUMS)
echo "wheelhouse: $(ls "$OUT"/*.whl | wc -l) wheels in $OUT ($(du -sh "$OUT" | cut -f1)); checksums in SHA256SUMS"
echo "on the board: python3 -m venv /opt/edgeward && /opt/edgeward/bin/pip install --no-index --find-links $(basename "$OUT") 'edgeward[$(IFS=,; echo "${EXTRAS[*]}")]'"
