"""The one place that touches SGLang internals: registration through `sglang.srt.plugins`.

SGLang calls `register()` early in every process it starts (CLI, Engine, scheduler,
detokenizer). Everything here is idempotent.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BACKEND_NAME = "lsa"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    @register_attention_backend(BACKEND_NAME)
    def _create_lsa_backend(runner):
        from lsa_sglang.attention.backend import create_backend

        return create_backend(runner)

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    _registered = True
    logger.debug("lsa-sglang plugin registered")


def is_registered() -> bool:
    return _registered
