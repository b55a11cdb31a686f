"""The few HTTP routes lsa-bench uses, on any SGLang-compatible server.

`/generate` (raw text in, so the prompt is exactly what the generator fitted; or token ids,
streamed, for time to first token), `/tokenize`, `/model_info`,
`/server_info`, `/v1/loads` (SGLang's live load: running requests, used KV tokens) and, on an LSA
server, `/lsa/stats` (per-request device/full KV bytes). A route a server lacks reads as None.
"""

from __future__ import annotations

import json
import time
from typing import Any

import requests


class ServerError(RuntimeError):
    """A request the server refused or failed; the message carries its answer."""


class ServerClient:
    def __init__(self, url: str, timeout: float = 7200) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._is_lsa: bool | None = None

    def _get(self, route: str, timeout: float = 120) -> dict[str, Any] | None:
        try:
            r = requests.get(self.url + route, timeout=timeout)
        except requests.RequestException:
            return None
        if r.status_code != 200:
            return None
        try:
            return r.json()
        except ValueError:
            return None

    def healthy(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def generate(self, text: str, max_new_tokens: int, lsa: dict[str, Any] | None = None,
                 *, ignore_eos: bool = False) -> dict[str, Any]:
        """Greedy decode of `text`; `lsa` goes into `custom_params` (per-request LSA overrides)."""
        params: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
        if ignore_eos:
            params["ignore_eos"] = True
        if lsa is not None:
            params["custom_params"] = {"lsa": lsa}
        try:
            r = requests.post(self.url + "/generate", json={"text": text, "sampling_params": params},
                              timeout=self.timeout)
        except requests.RequestException as e:
            raise ServerError(f"{self.url}/generate: {e}") from e
        if r.status_code != 200:
            raise ServerError(f"{self.url}/generate: HTTP {r.status_code}: {r.text[:500]}")
        out = r.json()
        finish = (out.get("meta_info") or {}).get("finish_reason") or {}
        if isinstance(finish, dict) and finish.get("type") == "abort":
            raise ServerError(f"{self.url}/generate: aborted: {finish.get('message')}")
        return out

    def stream(self, input_ids: list[int], sampling_params: dict[str, Any]) -> dict[str, Any]:
        """Streamed `/generate` of token ids: the last chunk (`output_ids`, `meta_info`) plus
        `ttft_s` (seconds to the first chunk) and `total_s`."""
        body = {"input_ids": input_ids, "sampling_params": sampling_params, "stream": True}
        t0 = time.perf_counter()
        first, last = None, None
        try:
            with requests.post(self.url + "/generate", json=body, stream=True, timeout=self.timeout) as r:
                if r.status_code != 200:
                    raise ServerError(f"{self.url}/generate: HTTP {r.status_code}: {r.text[:500]}")
                for line in r.iter_lines():
                    if line.startswith(b"data: ") and line != b"data: [DONE]":
                        first = first or time.perf_counter()
                        last = json.loads(line[6:])
        except requests.RequestException as e:
            raise ServerError(f"{self.url}/generate: {e}") from e
        if last is None:
            raise ServerError(f"{self.url}/generate: the stream carried no output")
        return {**last, "ttft_s": first - t0, "total_s": time.perf_counter() - t0}

    def tokenize(self, text: str) -> list[int]:
        try:
            r = requests.post(self.url + "/tokenize", json={"prompt": text}, timeout=120)
        except requests.RequestException as e:
            raise ServerError(f"{self.url}/tokenize: {e}") from e
        if r.status_code != 200:
            raise ServerError(f"{self.url}/tokenize: HTTP {r.status_code}: {r.text[:500]}")
        return r.json()["tokens"]

    def model_info(self) -> dict[str, Any]:
        return self._get("/model_info") or self._get("/get_model_info") or {}

    def server_info(self) -> dict[str, Any]:
        return self._get("/server_info") or self._get("/get_server_info") or {}

    def loads(self) -> dict[str, Any] | None:
        """SGLang's `/v1/loads`, summed over DP ranks: num_running_reqs, num_used_tokens, ..."""
        data = self._get("/v1/loads", timeout=10)
        if not data or not data.get("loads"):
            return None
        keys = ("num_running_reqs", "num_waiting_reqs", "num_used_tokens", "max_total_num_tokens")
        return {k: sum(int(x.get(k, 0) or 0) for x in data["loads"]) for k in keys}

    def lsa_stats(self) -> dict[str, Any] | None:
        stats = self._get("/lsa/stats")
        if stats is not None and "ranks" in stats:  # several TP ranks: rank 0 speaks for requests
            stats = stats["ranks"][0]
        if self._is_lsa is None:
            self._is_lsa = stats is not None
        return stats

    def is_lsa(self) -> bool:
        if self._is_lsa is None:
            self.lsa_stats()
        return bool(self._is_lsa)

    def request_stats(self, rid: str) -> dict[str, Any] | None:
        """The `/lsa/stats` entry of one request (the server keeps the last 32 finished ones)."""
        stats = self.lsa_stats()
        if not stats:
            return None
        return next((r for r in stats.get("requests", []) if r.get("rid") == rid), None)
