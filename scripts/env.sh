#!/usr/bin/env bash
# Build/run environment for droppos-pipeline. Source it: `source scripts/env.sh`.
#
# Idempotent: on first use it installs the Debian packages the build needs and creates a Python
# venv that provides libtorch (torch==2.11.0, what tch 0.24 links against) and the ONNX Runtime
# shared library (onnxruntime==1.31.1, loaded by ort at run time). Later calls reuse both when
# they hold the right versions. Python is only a library provider and a baseline for tests and
# benchmarks: the droppos-pipeline binary never starts an interpreter.
#
# Settings (environment variables):
#   DROPPOS_CACHE     cache folder                         (default ~/.cache/droppos-pipeline)
#   DROPPOS_VENV      the venv                             (default $DROPPOS_CACHE/venv)
#   CARGO_TARGET_DIR  cargo's build folder, kept across clones (default $DROPPOS_CACHE/target)
#   DROPPOS_SKIP_APT  set to 1 to skip the Debian package check

_droppos_setup() {
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    export DROPPOS_ROOT="$root"
    export DROPPOS_CACHE="${DROPPOS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/droppos-pipeline}"
    export DROPPOS_VENV="${DROPPOS_VENV:-$DROPPOS_CACHE/venv}"
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$DROPPOS_CACHE/target}"
    mkdir -p "$DROPPOS_CACHE" || return 1

    # --- Debian packages: cmake + nasm build libjpeg-turbo with SIMD; libgloo-dev for c10d.
    if [ "${DROPPOS_SKIP_APT:-0}" != 1 ] && command -v dpkg >/dev/null 2>&1; then
        local need=() p
        for p in cmake nasm pkg-config g++ libgloo-dev; do
            dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
        done
        if [ ${#need[@]} -gt 0 ]; then
            echo "[env] installing Debian packages: ${need[*]}" >&2
            local sudo=""
            [ "$(id -u)" = 0 ] || sudo="sudo"
            $sudo apt-get update -qq >&2 &&
                DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >&2 || {
                echo "[env] could not install ${need[*]}; install them and retry" >&2
                return 1
            }
        fi
    fi

    # --- Python venv with pinned versions; a stamp records what it was made with.
    local reqs="$root/scripts/requirements.txt"
    local stamp="$DROPPOS_VENV/.droppos-requirements"
    if [ ! -x "$DROPPOS_VENV/bin/python" ] || ! cmp -s "$reqs" "$stamp" ||
        ! "$DROPPOS_VENV/bin/python" - <<'PY' 2>/dev/null; then
from importlib.metadata import version
assert version("torch").split("+")[0] == "2.11.0"
assert version("onnxruntime") == "1.31.1"
PY
        echo "[env] preparing the Python venv at $DROPPOS_VENV (torch, onnxruntime; a few minutes the first time)" >&2
        local py="${DROPPOS_BASE_PYTHON:-python3}"
        [ -x "$DROPPOS_VENV/bin/python" ] || "$py" -m venv "$DROPPOS_VENV" >&2 || return 1
        "$DROPPOS_VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$reqs" >&2 || {
            echo "[env] pip install failed; see the messages above" >&2
            return 1
        }
        cp "$reqs" "$stamp"
    fi

    local site
    site="$("$DROPPOS_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
    export PATH="$DROPPOS_VENV/bin:$PATH"
    export LIBTORCH_USE_PYTORCH=1
    export DROPPOS_PYTHON="$DROPPOS_VENV/bin/python"
    local ort
    ort="$(ls "$site"/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n 1)"
    [ -n "$ort" ] && export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ort}"
    return 0
}

_droppos_setup || { echo "[env] set-up failed" >&2; return 1 2>/dev/null || exit 1; }
