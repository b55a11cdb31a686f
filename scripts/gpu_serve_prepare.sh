#!/usr/bin/env bash
# Prepares, on a machine with the package index, what scripts/gpu_serve_check.sh carries to a bare
# GPU host: .gpu-carry/lsa-bundle.tar.xz (SGLang for Python 3.12 without what the host has,
# `lsa-sglang bundle build`) and the prose corpus of the benchmark prompts. About 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .gpu-carry/home
"$PY" -m lsa_sglang.bundle build --out .gpu-carry/lsa-bundle.tar.xz --python-version 3.12 >/dev/null
LSA_SGLANG_HOME=$PWD/.gpu-carry/home "$PY" -c 'from lsa_sglang.assets import fetch_shakespeare; print(fetch_shakespeare())'
du -sh .gpu-carry
