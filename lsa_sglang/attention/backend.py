"""The `lsa` attention backend: dense prefill with stock kernels, decode through LSA."""

from __future__ import annotations

import logging

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from lsa_sglang.config import LSAConfig

logger = logging.getLogger(__name__)


class LSAAttnBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner, config: LSAConfig) -> None:
        super().__init__(model_runner)
        self.config = config


def create_backend(model_runner) -> LSAAttnBackend:
    config = LSAConfig.from_env()
    logger.info("lsa attention backend: %s", config)
    return LSAAttnBackend(model_runner, config)
