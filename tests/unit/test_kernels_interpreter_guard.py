"""Run the Triton-interpreter kernel tests in a fresh process when this one cannot.

TRITON_INTERPRET only takes effect if set before triton is first imported. When a
module collected earlier (SGLang, say) imported triton without it, or on a CUDA host,
the CPU Triton tests skip in-process; this test runs them in a subprocess with the
variable set, so they never silently go unrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lsa_sglang.kernels import interpreter_active  # noqa: E402

HERE = Path(__file__).resolve().parent
INTERPRETER_MODULES = ["test_kernels_triton_decode.py", "test_kernels_chunk_scoring.py"]


@pytest.mark.skipif(interpreter_active(), reason="the Triton interpreter is active: the tests ran in-process")
def test_triton_kernel_tests_pass_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    paths = [str(HERE / name) for name in INTERPRETER_MODULES]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]
