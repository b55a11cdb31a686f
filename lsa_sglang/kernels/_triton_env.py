"""Where Triton kernels can run in this process.

Triton's interpreter (``TRITON_INTERPRET=1``) is chosen once, when ``triton.language``
is first imported: every ``@triton.jit`` function, Triton's own standard library
included, is decorated then. Setting the variable later has no effect, so callers
ask here instead of reading the environment.
"""

from __future__ import annotations

import torch

INTERPRETER_HINT = (
    "Triton kernels on CPU tensors need the Triton interpreter: export TRITON_INTERPRET=1 "
    "before anything imports triton (`make test` does this on CPU hosts)."
)


def interpreter_active() -> bool:
    """True when this process's Triton runs kernels in the CPU interpreter."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.zeros, InterpretedFunction)


def triton_can_run_on(device: torch.device) -> bool:
    """True when a Triton launch on tensors of ``device`` can work in this process."""
    if device.type == "cuda":
        return not interpreter_active()
    if device.type == "cpu":
        return interpreter_active()
    return False


def require_triton_on(device: torch.device) -> None:
    """Raise a clear error instead of Triton's '0 active drivers'."""
    if triton_can_run_on(device):
        return
    if device.type == "cpu":
        raise RuntimeError(INTERPRETER_HINT)
    if device.type == "cuda":
        raise RuntimeError(
            "TRITON_INTERPRET=1 is set in a process that runs CUDA kernels; unset it to "
            "compile Triton kernels for the GPU."
        )
    raise RuntimeError(f"Triton kernels do not run on device type {device.type!r}")


def upcast_in_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a kernel must compute in fp32 after its loads.

    The interpreter computes bf16 arithmetic wrongly (numpy has no bf16), so on CPU
    bf16 loads are upcast to fp32. fp16 and fp32 stay native there (numpy has both),
    and on the GPU native bf16/fp16 ``tl.dot`` is kept.
    """
    return device.type == "cpu" and dtype == torch.bfloat16
