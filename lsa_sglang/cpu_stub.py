"""Importable stand-in for `sgl_kernel` on CPU-only hosts and in the GPU mode without it.

SGLang imports `sgl_kernel` (CUDA-only, no CPU wheel) at module level in many places,
even on paths that never call it on the CPU engine. On the CPU route `make setup`
drops a `.pth` file that imports this module in every Python process (launcher,
scheduler, detokenizer), so those imports succeed; on a GPU host without sgl-kernel the
offline bundle's install step does the same (`lsa_sglang.bundle`, `lsa_sglang.gpu_mode`). Unlike a MagicMock stub, every
function here raises when called: a CPU code path that really needs a CUDA kernel
fails loudly instead of computing garbage.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

_PREFIX = "sgl_kernel"


class UnavailableKernel:
    """Placeholder for any attribute of the stub; calling it raises."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"{self._name} needs the CUDA build of sgl_kernel; this is the CPU-only "
            "install (lsa_sglang.cpu_stub). Use a CUDA host or a torch-native code path."
        )

    def __getattr__(self, attr: str) -> "UnavailableKernel":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return UnavailableKernel(f"{self._name}.{attr}")

    def __repr__(self) -> str:
        return f"<unavailable {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return UnavailableKernel(f"{self.__name__}.{attr}")


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []  # a package, so `sgl_kernel.x` submodules resolve here too
        module.__version__ = "0.0.0+cpu-stub"
        return module

    def exec_module(self, module) -> None:
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == _PREFIX or fullname.startswith(_PREFIX + "."):
            return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
        return None


def is_stub(module: types.ModuleType) -> bool:
    return isinstance(module, _StubModule)


def real_spec():
    """The spec of a real `sgl_kernel` on sys.path (None: there is none), the stand-in ignored."""
    return importlib.machinery.PathFinder.find_spec(_PREFIX)


def install() -> bool:
    """Register the stub unless a real `sgl_kernel` is importable. Returns True if installed."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return True
    if importlib.util.find_spec(_PREFIX) is not None:
        return False
    sys.meta_path.append(_Finder())
    return True
