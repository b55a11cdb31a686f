"""One SGLang process's LSA session: the config, read once, and the objects that serve it.

`plugin.register()` builds one per process and hands it to everything it registers: the
attention backend factory (which builds the memory manager here, `build_manager`), the radix
cache factory and the scheduler hooks. They reach each other only through it, never through
module globals, and whichever of the backend and the radix cache SGLang builds second links
them (`attach_manager` / `attach_radix`).

The config crosses from the launcher into SGLang's processes as JSON in `LSA_SGLANG_CONFIG`
(`lsa_sglang.launch_server` validates it, then SGLang spawns its scheduler and detokenizer
processes, which share no objects with it); `Session.from_environment` is its only reader.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

from lsa_sglang.config import ENV_VAR, LSAConfig

DENSE_ENV_VAR = "LSA_SGLANG_DENSE_BACKEND"  # the launcher's --lsa-dense-backend

if TYPE_CHECKING:
    from lsa_sglang.memory.manager import LSAMemoryManager
    from lsa_sglang.memory.radix import LSARadixCache

logger = logging.getLogger(__name__)


class Session:
    def __init__(self, config: LSAConfig | None) -> None:
        # None: this process was not started by lsa_sglang.launch_server (a stock
        # `sglang.launch_server` with this package installed keeps its behaviour; asked for the
        # `lsa` backend anyway, it serves the defaults)
        self.config = config
        self.manager: LSAMemoryManager | None = None  # None: no `lsa` backend in this process (yet)
        self.radix: LSARadixCache | None = None
        self.dense_backend: str | None = None  # None: the device's default (attention.backend)

    @classmethod
    def from_environment(cls) -> "Session":
        session = cls(LSAConfig.from_env() if os.environ.get(ENV_VAR) else None)
        session.dense_backend = os.environ.get(DENSE_ENV_VAR) or None
        return session

    @property
    def serving_config(self) -> LSAConfig:
        return self.config if self.config is not None else LSAConfig()

    def attach_manager(self, manager: "LSAMemoryManager | None") -> None:
        self.manager = manager
        self._link()

    def attach_radix(self, radix: "LSARadixCache") -> None:
        self.radix = radix
        self._link()

    def _link(self) -> None:
        if self.manager is not None:
            self.manager.link_radix(self.radix)


def build_manager(model_runner, config: LSAConfig) -> "LSAMemoryManager | None":
    """The memory manager, or None for a model we cannot capture (dense then, with a warning)."""
    from lsa_sglang.indexer import NeuralMemoryIndexer, load_indexer, spec_from_hf_config
    from lsa_sglang.indexer.checkpoint import model_id_from_path
    from lsa_sglang.memory.manager import LSAMemoryManager
    from lsa_sglang.models.adapter import (
        HiddenCapture,
        UnsupportedModel,
        attention_modules,
        backbone_query_weights,
        default_target_layers,
    )

    model = model_runner.model
    try:
        mods = attention_modules(model)
    except UnsupportedModel as e:
        logger.warning("%s; lsa decodes densely", e)
        return None
    layers = config.target_layers or default_target_layers(len(mods))
    hf_config = model_runner.model_config.hf_config
    model_id = model_id_from_path(getattr(model_runner.model_config, "model_path", ""))
    spec = spec_from_hf_config(
        hf_config, model_id, tuple(layers), config.chunk_size, config.tau, config.threshold
    )
    attn0 = mods[layers[0]]
    heads, head_dim = attn0.num_heads, attn0.head_dim
    if config.indexer_checkpoint:
        indexer = load_indexer(config.indexer_checkpoint, expected=spec, device=model_runner.device)
        for name in ("tau", "threshold"):  # run-time knobs: a mismatch is allowed, but say so
            trained, serving = getattr(indexer.spec, name), getattr(config, name)
            if trained != serving:
                logger.warning("lsa: indexer checkpoint %s was trained with %s=%s; this server uses %s=%s",
                               config.indexer_checkpoint, name, trained, name, serving)
    else:
        spec = dataclasses.replace(spec, prenormed=True, q_bias=mods[layers[0]].qkv_proj.bias is not None,
                                   num_heads=heads, head_dim=head_dim)
        ws, bs = zip(*(backbone_query_weights(mods[l], heads, head_dim) for l in layers))
        indexer = NeuralMemoryIndexer.from_backbone(
            spec, [w.float() for w in ws], None if bs[0] is None else [b.float() for b in bs]
        ).to(model_runner.device)
    indexer.eval()
    capture = HiddenCapture(model, tuple(layers))
    return LSAMemoryManager(config, model_runner, capture, indexer)
