#!/usr/bin/env bash
# Creates .venv with Python 3.11 and everything lsa-sglang needs. Idempotent.
#  - CUDA host (nvidia-smi works): the full SGLang stack, `pip install -e .[gpu,test]`.
#  - CPU host: SGLang's exact torch pin and its pure-Python requirements from
#    requirements/cpu.lock, SGLang itself without its GPU-only dependencies, and a
#    .pth hook that makes `sgl_kernel` importable in every process (lsa_sglang/cpu_stub.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv
SGLANG_VERSION=0.5.23

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] >= (3, 11), sys.version' \
  || { echo "setup: SGLang $SGLANG_VERSION needs Python >= 3.11" >&2; exit 1; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: CUDA host: installing the full SGLang stack" >&2
  "${PIP[@]}" install -e ".[gpu,test]"
else
  echo "setup: CPU host: SGLang $SGLANG_VERSION without GPU-only dependencies" >&2
  "${PIP[@]}" install -r requirements/cpu.lock
  "${PIP[@]}" install --no-deps "sglang==$SGLANG_VERSION"
  "${PIP[@]}" install --no-deps -e .
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import lsa_sglang.cpu_stub as _lsa_stub; _lsa_stub.install()" > "$SITE/lsa_sglang_cpu_stub.pth"
fi
"$VENV/bin/python" -c 'import sglang, sgl_kernel, lsa_sglang.plugin; print("setup: ok, sglang", sglang.__version__)' 2>&1 | tail -1
