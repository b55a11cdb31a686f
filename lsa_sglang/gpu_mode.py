"""GPU mode without sgl-kernel or FlashInfer ("torch mode").

SGLang's CUDA route assumes its `sgl-kernel` wheel (built for one torch/CUDA pair) and FlashInfer.
A GPU host whose torch has no matching sgl-kernel wheel, or that cannot reach a package index, can
still serve Llama/Qwen2/Mistral-family models with torch and Triton alone once:
- every fused op (RMSNorm, SiLU-and-mul, rotary embedding) runs its torch form
  (`SGLANG_FORCE_FUSED_OP_BACKEND=torch`), the sgl-kernel version check is skipped and the radix
  tree runs its Python core (its Rust core links another libtorch);
- attention is SGLang's Triton backend (stock, and everything dense inside LSA), sampling is torch's,
  and prefill CUDA graphs are off (their breakable form calls `sgl_kernel.weak_ref_tensor`);
- three SGLang attributes that reach sgl-kernel or CUTLASS are replaced (`patch_sglang`), in every
  SGLang process: the plugin calls it when `LSA_SGLANG_GPU_MODE=torch` is in the environment.
`sgl_kernel` itself is then the stand-in of `lsa_sglang.cpu_stub` (every function raises if called).

The launcher picks the mode when CUDA is there and no real `sgl_kernel` is importable;
`--lsa-gpu-mode torch` forces it, `--lsa-gpu-mode sgl-kernel` refuses it.
"""

from __future__ import annotations

import os

ENV_VAR = "LSA_SGLANG_GPU_MODE"
MODES = ("auto", "torch", "sgl-kernel")
ENVIRONMENT = {
    "SGLANG_FORCE_FUSED_OP_BACKEND": "torch",
    "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",
    "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python",
}
# Flags the mode adds unless the command line gives them.
FLAGS = (("--sampling-backend", "pytorch"), ("--cuda-graph-backend-prefill", "disabled"))
ATTENTION_BACKEND = "triton"
# Each reaches sgl-kernel or CUTLASS on CUDA; replaced by: False (no PDL launch), None (no fused
# dual GEMM), False (KV written by indexing instead of a JIT kernel).
REPLACED = (
    ("sglang.srt.layers.attention.triton_backend", "is_arch_support_pdl"),
    ("sglang.srt.layers.dual_gemm", "DualGemm._select_mode"),
    ("sglang.srt.mem_cache.memory_pool", "can_use_store_cache"),
)


def real_sgl_kernel() -> bool:
    """A real `sgl_kernel` is importable (not the stand-in)."""
    from lsa_sglang import cpu_stub

    return cpu_stub.real_spec() is not None


def choose(requested: str, cuda: bool) -> str | None:
    """The mode for a host: "torch", or None for SGLang's own CUDA route (and on CPU)."""
    if requested not in MODES:
        raise ValueError(f"--lsa-gpu-mode: expected one of {', '.join(MODES)}, got {requested!r}")
    if not cuda:
        return None
    if requested == "torch" or (requested == "auto" and not real_sgl_kernel()):
        return "torch"
    return None


def add_flags(argv: list[str], env: dict[str, str], *, stock: bool) -> list[str]:
    """`argv` with the mode's flags (those the command line names stay as given) and `env` with its
    variables. `stock`: a stock SGLang server, whose attention backend becomes Triton too."""
    env.update(ENVIRONMENT)
    env[ENV_VAR] = "torch"
    argv = list(argv)
    wanted = list(FLAGS) + ([("--attention-backend", ATTENTION_BACKEND)] if stock else [])
    for flag, value in wanted:
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            argv += [flag, value]
    return argv


def describe() -> str:
    return ("GPU mode without sgl-kernel: torch fused ops, SGLang's Triton attention, torch sampling, "
            "no prefill CUDA graphs (LSA_SGLANG_GPU_MODE=torch)")


def active() -> bool:
    return os.environ.get(ENV_VAR) == "torch"


def patch_sglang() -> list[str]:
    """Replace the attributes of `REPLACED`; returns their dotted names. Idempotent."""
    from sglang.srt.layers import dual_gemm
    from sglang.srt.layers.attention import triton_backend
    from sglang.srt.mem_cache import memory_pool

    def false(*args, **kwargs) -> bool:
        return False

    def no_dual_gemm(self, *args, **kwargs):
        return None

    triton_backend.is_arch_support_pdl = false
    dual_gemm.DualGemm._select_mode = no_dual_gemm
    memory_pool.can_use_store_cache = false
    return [f"{module}.{attr}" for module, attr in REPLACED]
