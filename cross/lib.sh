# shellcheck shell=bash
# Shared by cross/wheelhouse, cross/sysroot and cross/run: the target table, the cache
# directory and a few helpers. Sourced, not run.

CROSS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$CROSS_DIR")"
# Everything built here is cached under this directory, keyed on its inputs, so a second
# run is fast. Delete it to start over.
CACHE_DIR="${EDGESEAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeseal}/cross"
HOST_PYTHON="${EDGESEAL_HOST_PYTHON:-python3}"

# Targets: Python version, glibc of the device's userland, what the device installs.
#   rpi-bookworm  Raspberry Pi OS bookworm 64-bit (Debian 12): Python 3.11, glibc 2.36
#   jetpack6      JetPack 6.x (Ubuntu 22.04, L4T r36): Python 3.10, glibc 2.35
#   jetpack5      JetPack 5.x (Ubuntu 20.04, L4T r35): Python 3.8, glibc 2.31
#   core22        the snap's base (Ubuntu 22.04): Python 3.10, glibc 2.35
#   core24        Ubuntu 24.04 / core24: Python 3.12, glibc 2.39
# edgeseal needs Python >= 3.10, so jetpack5 gets the runtimes only (see cross/jetson.md).
target_info() {
  case "$1" in
    rpi-bookworm) PYVER=3.11 GLIBC=36 REQS="edgeseal-agent[litert] edgeseal-ota" ;;
    jetpack6 | core22) PYVER=3.10 GLIBC=35 REQS="edgeseal-agent[litert] edgeseal-ota" ;;
    core24) PYVER=3.12 GLIBC=39 REQS="edgeseal-agent[litert] edgeseal-ota" ;;
    jetpack5) PYVER=3.8 GLIBC=31 REQS="onnxruntime tflite-runtime numpy<2" ;;
    *)
      echo "unknown target '$1' (rpi-bookworm, jetpack6, jetpack5, core22, core24)" >&2
      return 2
      ;;
  esac
  PYTAG="cp${PYVER/./}"
}

# pip does not expand manylinux_2_X to the older tags a glibc also accepts, and without
# them it silently picks old releases or nothing: list every tag up to the target's glibc.
platform_args() {
  local glibc="$1" v
  PLATFORM_ARGS=()
  for ((v = glibc; v >= 17; v--)); do PLATFORM_ARGS+=(--platform "manylinux_2_${v}_aarch64"); done
  PLATFORM_ARGS+=(--platform manylinux2014_aarch64 --implementation cp)
}

# A short digest of files and strings: the cache key of what they produce.
inputs_key() {
  local item
  for item in "$@"; do
    if [ -f "$item" ]; then sha256sum <"$item"; else printf '%s\n' "$item"; fi
  done | sha256sum | cut -c1-16
}

# Hold an exclusive lock on NAME (under the cache directory) until this shell exits, so
# two runs building the same cache entry take turns.
cache_lock() {
  mkdir -p "$CACHE_DIR"
  exec {CACHE_LOCK_FD}>"$CACHE_DIR/$1.lock"
  flock "$CACHE_LOCK_FD"
}

# Build edgeseal's device parts (pure Python) from this checkout as wheels into DIR.
build_edgeseal_wheels() {
  local dir="$1" isolation=()
  "$HOST_PYTHON" -c 'import hatchling' 2>/dev/null && isolation=(--no-build-isolation)
  (cd "$REPO_DIR" && "$HOST_PYTHON" -m pip wheel -q --no-deps "${isolation[@]}" -w "$dir" \
    ./core ./hardware ./agent ./ota)
}

# Digest of edgeseal's device sources: when it changes, their wheels are rebuilt.
sources_key() {
  local files
  mapfile -t files < <(cd "$REPO_DIR" && find core hardware agent ota -type f \
    \( -name '*.py' -o -name pyproject.toml -o -name py.typed \) -not -path '*/__pycache__/*' | sort)
  (cd "$REPO_DIR" && inputs_key "${files[@]}")
}

say() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() {
  say "$*"
  exit 1
}
