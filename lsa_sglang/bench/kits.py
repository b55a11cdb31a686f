"""SGLang's own server test kits (`sglang.test.kits`) against a running server, as a table.

The kits are unittest mixins that probe one HTTP surface each (API contract, decode sanity,
scheduler stress, abort-all, matched stop, constrained decoding, prefix-cache branching, the
radix tree, pause/resume). `run_kits` binds the applicable ones to a server URL and returns one
outcome per kit test, so the same kits run against stock SGLang and against LSA and any test
that passes on stock and fails with LSA stands out.

Their prompts are short, so LSA would keep every chunk resident. The `long` variant puts a
document of SGLang's own long test prompt (`sglang/test/long_prompt.txt`, ~2.7K tokens by
default) in front of every text prompt a kit sends, so LSA releases most of the prompt's chunks
while the kit checks its answers. Kits that send token ids or compare cache counters keep their
own prompts (their expectations depend on them).
"""

from __future__ import annotations

import importlib
import sys
import time
import unittest
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import requests

# kit name -> (module in sglang.test.kits, mixin class, class attributes, long variant applies)
KITS: dict[str, tuple[str, str, dict[str, Any], bool]] = {
    "api_contract": ("basic_api_contract_kit", "BasicAPIContractMixin", {}, True),
    "decode_correctness": ("basic_decode_correctness_kit", "BasicDecodeCorrectnessMixin", {}, True),
    "scheduler_stress": ("basic_scheduler_stress_kit", "BasicSchedulerStressMixin", {}, True),
    # 16000 new tokens would not fit an 8K context: the kit only needs requests still running.
    "abort_all": ("abort_timeout_kit", "AbortAllMixin", {"abort_all_max_new_tokens": 2000}, True),
    "matched_stop": ("matched_stop_kit", "MatchedStopMixin", {}, True),
    "json_constrained": ("json_constrained_kit", "JSONConstrainedMixin", {}, True),
    "json_mode": ("json_mode_kit", "JSONModeMixin", {}, False),
    "regex_constrained": ("regex_constrained_kit", "RegexConstrainedMixin", {}, True),
    "ebnf_constrained": ("ebnf_constrained_kit", "EBNFConstrainedMixin", {}, True),
    "prefix_cache_branching": ("prefix_cache_branching_kit", "PrefixCacheBranchingMixin", {}, False),
    "radix_cache": ("radix_cache_server_kit", "run_radix_attention_test", {}, False),
    "pause_generation": ("pause_generation_kit", "PauseResumeInPlaceMixin",
                         {"pause_num_requests": 8, "pause_max_new_tokens": 256}, True),
}
# Kits of sglang.test.kits left out, and why (they need another server or the network).
NOT_APPLICABLE = {
    "waiting/running timeout (abort_timeout_kit)": "needs SGLANG_REQ_*_TIMEOUT and --max-running-requests 1",
    "kl_divergence, eval_accuracy, lm_eval, unified_radix_cache": "download datasets (LongBench, GSM8K)",
    "cache_hit, perf_bench, fwd_occupancy": "benchmarks (timings, no pass/fail contract on one CPU server)",
    "streaming_session": "needs --enable-streaming-session",
    "spec_decoding, reasoning, anthropic_messages, mmmu/vlm, dsa_metadata, pd_parity": "model or deployment specific",
}
# Left out of the long variant: minutes of CPU decode per server (1000 tokens; 40 x 128 tokens),
# and the short variant runs them.
LONG_SKIP = {"matched_stop.test_finish_stop_str", "json_constrained.test_mix_json_and_other"}
LONG_DOC_CHARS = 12000


@dataclass
class KitResult:
    kit: str
    test: str
    variant: str
    outcome: str  # pass | fail | error | skip
    seconds: float
    message: str = ""


@dataclass
class _Alive:
    """Stands in for the kits' `self.process`: `poll()` is None while the server answers /health."""

    url: str

    def poll(self) -> int | None:
        try:
            return None if requests.get(self.url + "/health", timeout=30).status_code == 200 else 1
        except requests.RequestException:
            return 1


def long_document(chars: int = LONG_DOC_CHARS) -> str:
    text = resources.files("sglang.test").joinpath("long_prompt.txt").read_text()
    # The file holds literal "\n" sequences; cut at a sentence end.
    text = text.replace("\\n", "\n")[:chars]
    return text[: text.rfind(".") + 1]


@dataclass
class _LongPrompts:
    """`requests` as a kit sees it in the long variant: every text prompt gets the document first."""

    doc: str
    seen: list[str] = field(default_factory=list)

    def _prefix(self, text: Any) -> Any:
        head = f"Read this report first.\n\n{self.doc}\n\nNow a separate task.\n"
        if isinstance(text, str):
            return head + text
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            return [head + t for t in text]
        return text

    def post(self, url: str, *args: Any, json: Any = None, **kwargs: Any):
        if isinstance(json, dict):
            json = dict(json)
            if url.endswith("/generate") and "text" in json:
                json["text"] = self._prefix(json["text"])
            elif url.endswith("/v1/completions") and "prompt" in json:
                json["prompt"] = self._prefix(json["prompt"])
            elif url.endswith("/v1/chat/completions") and json.get("messages"):
                msgs = [dict(m) for m in json["messages"]]
                user = next((m for m in msgs if m.get("role") == "user"), None)
                if user is not None:
                    user["content"] = self._prefix(user.get("content"))
                json["messages"] = msgs
            self.seen.append(url)
        return requests.post(url, *args, json=json, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(requests, name)


def _test_case(kit: str, url: str, model: str, page_size: int) -> tuple[type[unittest.TestCase], Any]:
    """The kit bound to the server as a TestCase class, and the kit's module."""
    import openai

    module_name, obj_name, attrs, _ = KITS[kit]
    module = importlib.import_module(f"sglang.test.kits.{module_name}")
    obj = getattr(module, obj_name)
    base: dict[str, Any] = {
        "base_url": url, "process": _Alive(url), "model": model, "served_model_name": model,
        "cache_chunk_size": page_size, "client": openai.Client(api_key="EMPTY", base_url=url + "/v1"),
        "flush_cache": classmethod(lambda cls: requests.post(cls.base_url + "/flush_cache", timeout=60)),
        **attrs,
    }
    if isinstance(obj, type):
        return type(f"{obj_name}OnServer", (obj, unittest.TestCase), base), module

    def test_radix_tree(self) -> None:  # a kit that is one function
        obj(self.base_url)

    return type(f"{kit}_OnServer", (unittest.TestCase,), {**base, f"test_{kit}": test_radix_tree}), module


def select(kits: list[str] | None) -> dict[str, set[str] | None]:
    """`kit` (all its tests) or `kit.test_name` selectors -> {kit: test names or None}, checked
    against the kits before any server is touched."""
    chosen: dict[str, set[str] | None] = {}
    for sel in list(KITS) if kits is None else kits:
        kit, _, test = sel.partition(".")
        if kit not in KITS:
            raise ValueError(f"unknown kit {kit!r}; known: {', '.join(KITS)}")
        if test:
            names = unittest.TestLoader().getTestCaseNames(_test_case(kit, "http://127.0.0.1:9", "", 1)[0])
            if test not in names:
                raise ValueError(f"kit {kit!r} has no test {test!r}; it has {', '.join(names)}")
            if chosen.get(kit, set()) is not None:
                chosen.setdefault(kit, set()).add(test)
        else:
            chosen[kit] = None
    return chosen


def run_kits(url: str, kits: list[str] | None = None, variants: tuple[str, ...] = ("short",),
             progress: bool = False) -> list[KitResult]:
    """The chosen kits (`kit` for all its tests, `kit.test_name` for one; default all) against
    the server at `url`, in each variant."""
    chosen = select(kits)
    info = requests.get(url + "/get_server_info", timeout=60).json()
    model = requests.get(url + "/get_model_info", timeout=60).json()["model_path"]
    page_size = int(info.get("page_size") or 1)
    out: list[KitResult] = []
    for variant in variants:
        for kit, tests in chosen.items():
            if variant == "long" and not KITS[kit][3]:
                continue
            out += _run_one(kit, tests, variant, url, model, page_size, progress)
    return out


def _run_one(kit: str, tests: set[str] | None, variant: str, url: str, model: str, page_size: int,
             progress: bool) -> list[KitResult]:
    case, module = _test_case(kit, url, model, page_size)
    saved = getattr(module, "requests", None)
    results: list[KitResult] = []
    try:
        if variant == "long" and saved is not None:
            module.requests = _LongPrompts(long_document())
        for name in unittest.TestLoader().getTestCaseNames(case):
            if (tests is not None and name not in tests) or (variant == "long" and f"{kit}.{name}" in LONG_SKIP):
                continue
            t0 = time.monotonic()
            res = unittest.TestResult()
            unittest.TestSuite([case(name)]).run(res)
            outcome, message = "pass", ""
            for kind, items in (("fail", res.failures), ("error", res.errors)):
                if items:
                    outcome, message = kind, items[0][1].strip().splitlines()[-1][:500]
            if res.skipped:
                outcome, message = "skip", res.skipped[0][1][:500]
            r = KitResult(kit, name, variant, outcome, round(time.monotonic() - t0, 1), message)
            results.append(r)
            if progress:
                print(f"[kits] {variant:5s} {kit}.{name}: {outcome} ({r.seconds:.0f} s) {message[:160]}",
                      file=sys.stderr, flush=True)
    finally:
        if saved is not None:
            module.requests = saved
    return results


def parity(stock: list[KitResult], lsa: list[KitResult]) -> list[dict[str, Any]]:
    """One row per (variant, kit, test): stock's outcome, LSA's, and whether LSA regressed."""
    s = {(r.variant, r.kit, r.test): r for r in stock}
    rows = []
    for r in lsa:
        b = s.get((r.variant, r.kit, r.test))
        rows.append({"variant": r.variant, "kit": r.kit, "test": r.test,
                     "stock": b.outcome if b else None, "lsa": r.outcome,
                     "regression": bool(b and b.outcome == "pass" and r.outcome != "pass"),
                     "lsa_message": r.message, "stock_message": b.message if b else ""})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'variant':7s} {'kit':24s} {'test':44s} {'stock':6s} {'lsa':6s}"]
    for r in rows:
        mark = "  <- regression" if r["regression"] else ""
        lines.append(f"{r['variant']:7s} {r['kit']:24s} {r['test']:44s} {str(r['stock']):6s} {r['lsa']:6s}{mark}")
    return "\n".join(lines)
