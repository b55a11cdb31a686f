"""Token counting for prompt lengths, with the served model's own tokenizer.

A length of "8K" must mean 8K tokens of the model under test, counted the way the server counts
the text it gets on `/generate` (the tokenizer's default special tokens included). Two sources:
the Hugging Face tokenizer from the model folder (fast, offline, and it has the chat template) or
the server's `/tokenize` route (any SGLang-compatible server, no local files; raw prompts only).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TokenCounter(Protocol):
    """What the generator needs from a tokenizer."""

    name: str

    def count(self, text: str) -> int: ...

    def chat(self, messages: str | list[dict[str, str]]) -> str | None:
        """The chat-templated text of one user turn (a str) or of a conversation (role/content
        dicts) ready for the assistant's next turn, or None if no template."""
        ...


class HFTokenCounter:
    """A transformers tokenizer: counts as SGLang's tokenizer manager does (`tokenizer(text)`)."""

    def __init__(self, tokenizer: Any, name: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.name = name or getattr(tokenizer, "name_or_path", type(tokenizer).__name__)

    def count(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def chat(self, messages: str | list[dict[str, str]]) -> str | None:
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class ServerTokenCounter:
    """The server's `/tokenize` route: the exact count for any SGLang server, one HTTP call each."""

    def __init__(self, url: str, timeout: float = 120) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.name = f"{self.url}/tokenize"

    def count(self, text: str) -> int:
        import requests

        r = requests.post(self.url + "/tokenize", json={"prompt": text}, timeout=self.timeout)
        r.raise_for_status()
        data = r.json()
        return int(data["count"]) if "count" in data else len(data["tokens"])

    def chat(self, messages: str | list[dict[str, str]]) -> str | None:
        return None


class FnTokenCounter:
    """Any `text -> token count` function (tests, other tokenizers)."""

    def __init__(self, fn: Callable[[str], int], name: str = "function") -> None:
        self.fn = fn
        self.name = name

    def count(self, text: str) -> int:
        return int(self.fn(text))

    def chat(self, messages: str | list[dict[str, str]]) -> str | None:
        return None


@lru_cache(maxsize=4)
def load_hf_tokenizer(path: str) -> HFTokenCounter:
    """The tokenizer of a local model folder (loaded once per process)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer

    return HFTokenCounter(AutoTokenizer.from_pretrained(path), name=path)


def as_counter(tokenizer: Any) -> TokenCounter:
    """Accept a TokenCounter, a transformers tokenizer, a model folder path or a callable."""
    if isinstance(tokenizer, (HFTokenCounter, ServerTokenCounter, FnTokenCounter)):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_hf_tokenizer(str(tokenizer))
    if hasattr(tokenizer, "apply_chat_template") and callable(tokenizer):
        return HFTokenCounter(tokenizer)
    if isinstance(tokenizer, TokenCounter):
        return tokenizer
    if callable(tokenizer):
        return FnTokenCounter(tokenizer)
    raise TypeError(f"cannot count tokens with {type(tokenizer).__name__}")
