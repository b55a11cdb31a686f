"""A bounded soak of one LSA server: mixed traffic and bad input for a fixed number of requests,
then everything back at baseline.

The traffic is mixed on purpose: short prompts and prompts near the context (and host-mirror)
limit, long documents shared by many requests (prefix cache), chat turns that carry the previous
answer, per-request LSA overrides, JSON-schema constrained decoding, long decodes that cross
window boundaries, streaming clients that hang up mid-answer, `/abort_request` for one request
and for all, and bad requests (prompt over the context, invalid sampling params, invalid
`custom_params.lsa`, malformed bodies). Checks:

- the server never dies (SGLang's own idle leak checker ends it on a leaked KV page or request
  slot, so a leak shows here too);
- every bad request gets a 4xx whose message names the problem; every good request succeeds;
- a sample of greedy requests is replayed alone afterwards and must give the same tokens;
- after the run and a cache flush the device pool, the host mirror, its reservations and the
  running requests are back at the baseline taken before;
- the host mirror never holds more than its capacity (host_pool_gb).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import requests

from lsa_sglang.bench.words import ADJECTIVES, NOUNS

# job kind -> weight in the mix (abort-all rounds come on top, every `abort_all_every` jobs)
MIX: dict[str, float] = {
    "short": 26, "long_shared": 8, "long_cold": 0.6, "decode_long": 5, "chat": 6, "override": 9,
    "json": 5, "stream_disconnect": 6, "abort_one": 3,
    "bad_too_long": 5, "bad_sampling": 7, "bad_lsa": 9, "bad_body": 4, "pair_greedy": 3,
}
BAD_SAMPLING = [  # (sampling params, a word the error must name)
    ({"max_new_tokens": 4, "temperature": -1}, "temperature"),
    ({"max_new_tokens": 4, "top_p": 1.5}, "top_p"),
    ({"max_new_tokens": -2}, "max_new_tokens"),
    ({"max_new_tokens": 4, "min_p": 2}, "min_p"),
    ({"max_new_tokens": 4, "repetition_penalty": 0}, "repetition_penalty"),
    ({"max_new_tokens": 4, "frequency_penalty": 9}, "frequency_penalty"),
]
BAD_LSA = [  # (custom_params["lsa"], a word the error must name)
    ({"policy": "oracle"}, "policy"),
    ({"page_budget": 0}, "page_budget"),
    ({"page_budget": "8"}, "page_budget"),
    ({"threshold": 1.5}, "threshold"),
    ({"enabled": "yes"}, "enabled"),
    ({"tau": 8}, "tau"),
    ({"min_pages": 10**12}, "min_pages"),
    ("recency", "lsa"),
]
JSON_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                "year": {"type": "integer"}},
               "required": ["city", "year"], "additionalProperties": False}


@dataclass
class Outcome:
    kind: str
    ok: bool
    detail: str = ""
    requests: int = 1


@dataclass
class Report:
    requests: int = 0
    server_deaths: int = 0
    wall_s: float = 0.0
    outcomes: Counter = field(default_factory=Counter)  # "kind:ok" / "kind:fail"
    failures: list[dict[str, Any]] = field(default_factory=list)
    solo_checked: int = 0
    solo_mismatches: list[dict[str, Any]] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    peak_host_bytes: int = 0
    host_capacity_bytes: int = 0
    host_waits: int = 0
    windows: int = 0
    timeline: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (self.server_deaths == 0 and not self.failures and not self.solo_mismatches
                and not self.leaked and self.peak_host_bytes <= self.host_capacity_bytes)

    def failures_by_kind(self) -> dict[str, int]:
        return dict(Counter(f["kind"] for f in self.failures))

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "requests": self.requests, "server_deaths": self.server_deaths,
            "leaked": len(self.leaked), "leaked_detail": self.leaked, "wall_s": round(self.wall_s, 1),
            "failures": len(self.failures), "failures_by_kind": self.failures_by_kind(),
            "failure_detail": self.failures[:50], "outcomes": dict(sorted(self.outcomes.items())),
            "solo_checked": self.solo_checked, "solo_mismatches": len(self.solo_mismatches),
            "solo_mismatch_detail": self.solo_mismatches[:20], "peak_host_bytes": self.peak_host_bytes,
            "host_capacity_bytes": self.host_capacity_bytes, "host_waits": self.host_waits,
            "lsa_windows": self.windows, "timeline": self.timeline,
        }


def _document_ids(url: str) -> list[int]:
    """SGLang's own long test prompt, tokenized by the server: the soak's prose."""
    text = resources.files("sglang.test").joinpath("long_prompt.txt").read_text().replace("\\n", "\n")
    return _tokenize(url, text)


def _tokenize(url: str, text: str) -> list[int]:
    r = requests.post(url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=120)
    r.raise_for_status()
    return list(r.json()["tokens"])


class Soak:
    """The traffic of one soak, generated from a seed, against the server at `url`."""

    def __init__(self, url: str, n_requests: int = 1000, concurrency: int = 12, seed: int = 0,
                 abort_all_every: int = 250, solo_fraction: float = 0.12, timeout: float = 900,
                 sample_interval: float = 1.0, progress: bool = False, shared_docs: int = 2,
                 mix: dict[str, float] | None = None) -> None:
        self.url = url.rstrip("/")
        self.n = n_requests
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.abort_all_every = abort_all_every
        self.solo_fraction = solo_fraction
        self.timeout = timeout
        self.sample_interval = sample_interval
        self.progress = progress
        self.mix = dict(MIX if mix is None else mix)
        unknown = sorted(set(self.mix) - set(MIX))
        if unknown:
            raise ValueError(f"unknown soak job kind {unknown[0]!r}; known: {', '.join(MIX)}")
        info = requests.get(self.url + "/get_server_info", timeout=60).json()
        self.context = int(info["context_length"])
        stats = self._stats()
        chunk = int(info.get("page_size") or 64)
        host_tokens = stats["host_capacity_bytes"] // stats["chunk_bytes"] * chunk
        # The longest prompt the server takes: the context and the host mirror both bound it.
        self.long_len = min(self.context, host_tokens) - 160
        self.doc = _document_ids(self.url)
        self.question = _tokenize(self.url, "\n\nQuestion: in one sentence, what is this text about? Answer:")
        self.shared = [self._unique_ids(self.long_len - 200, tag=f"shared document {i}") for i in range(shared_docs)]
        self.solo: list[tuple[dict[str, Any], list[int]]] = []
        self._lock = threading.Lock()
        self._rid = 0

    # -- prompts --------------------------------------------------------------------------------
    def _words(self, n: int) -> list[int]:
        text = " ".join(f"{self.rng.choice(ADJECTIVES)} {self.rng.choice(NOUNS)}" for _ in range(n))
        return _tokenize(self.url, text)

    def _unique_ids(self, n: int, tag: str | None = None) -> list[int]:
        """n tokens of prose that no other prompt starts with (a random header, then the document
        from a random offset, wrapping around)."""
        head = _tokenize(self.url, (tag or f"note {self.rng.randrange(10**9)}") + ": ") + self._words(6)
        start = self.rng.randrange(len(self.doc))
        body = [self.doc[(start + i) % len(self.doc)] for i in range(max(0, n - len(head)))]
        return (head + body)[:n]

    def _prompt(self, lo: int, hi: int) -> list[int]:
        n = self.rng.randint(lo, min(hi, self.long_len))
        return self._unique_ids(n - len(self.question)) + self.question

    def _next_rid(self, kind: str) -> str:
        with self._lock:
            self._rid += 1
            return f"soak-{kind}-{self._rid}"

    # -- one job per kind ---------------------------------------------------------------------
    def _post(self, route: str, body: Any, **kw: Any) -> requests.Response:
        if isinstance(body, (bytes, str)):
            return requests.post(self.url + route, data=body, timeout=self.timeout,
                                 headers={"Content-Type": "application/json"}, **kw)
        return requests.post(self.url + route, json=body, timeout=self.timeout, **kw)

    def _greedy(self, ids: list[int], n: int, lsa: Any = None, check: bool = False, **extra: Any) -> Outcome:
        params: dict[str, Any] = {"max_new_tokens": n, "temperature": 0, **extra}
        if lsa is not None:
            params["custom_params"] = {"lsa": lsa}
        body = {"input_ids": ids, "sampling_params": params}
        r = self._post("/generate", body)
        if r.status_code != 200:
            return Outcome("", False, f"HTTP {r.status_code}: {r.text[:300]}")
        out = r.json()
        finish = out["meta_info"]["finish_reason"]
        if finish.get("type") == "abort":
            return Outcome("", False, f"aborted: {finish}")
        if check:
            with self._lock:
                self.solo.append((body, out["output_ids"]))
        return Outcome("", True)

    def _expect_4xx(self, r: requests.Response, word: str) -> Outcome:
        """A 4xx naming `word`; a streamed /generate reports it as its error event (HTTP 200)."""
        text, status = r.text, r.status_code
        if status == 200 and text.startswith("data:") and '"error"' in text:
            if text.count("data: {") > 1:
                return Outcome("", False, f"output streamed around the error: {text[:300]}")
            event = json.loads(text.splitlines()[0][5:])
            status, text = int(event["error"].get("code", 200)), event["error"].get("message", "")
        if not 400 <= status < 500:
            return Outcome("", False, f"expected a 4xx naming {word!r}, got {status}: {text[:300]}")
        if word.lower() not in text.lower():
            return Outcome("", False, f"{status} does not name {word!r}: {text[:300]}")
        return Outcome("", True)

    def job(self, kind: str) -> Outcome:
        with self._lock:  # the workers share one random stream
            spec = self._spec(kind, self.rng.random() < self.solo_fraction)
        out = spec()
        out.kind = kind
        return out

    def _spec(self, kind: str, check: bool):
        """Draw everything random for one job under the lock; return the function that sends it."""
        rng = self.rng
        if kind == "short":
            ids, n, ignore_eos = self._prompt(24, 400), rng.randint(4, 32), rng.random() < 0.3
            return lambda: self._greedy(ids, n, check=check, ignore_eos=ignore_eos)
        if kind == "long_shared":
            doc = rng.choice(self.shared)
            ids = doc + self._words(rng.randint(4, 40)) + self.question
            n = rng.randint(8, 24)
            return lambda: self._greedy(ids, n, check=check)
        if kind == "long_cold":
            ids, n = self._prompt(self.long_len // 2, self.long_len), rng.randint(4, 12)
            return lambda: self._greedy(ids, n, check=check)
        if kind == "decode_long":
            ids, n = self._prompt(400, 1000), rng.randint(96, 160)
            return lambda: self._greedy(ids, n, check=check, ignore_eos=True)
        if kind == "override":
            from lsa_sglang.config import POLICIES

            lsa: dict[str, Any] = {"policy": rng.choice([p for p in POLICIES if p != "random" or not check])}
            if rng.random() < 0.5:
                lsa["page_budget"] = rng.randint(2, 12)
            if rng.random() < 0.2:
                lsa = {"enabled": False}
            ids, n = self._prompt(300, 1200), rng.randint(8, 48)
            return lambda: self._greedy(ids, n, lsa=lsa, check=check)
        if kind == "pair_greedy":
            # The same prompt twice at once: both must give the same tokens (and match alone).
            ids, n = self._prompt(200, 800), rng.randint(8, 24)
            return lambda: self._pair(ids, n)
        if kind == "json":
            ids = self._prompt(40, 600)[: -len(self.question)] + _tokenize(
                self.url, "\nName a city and the year it was founded, as JSON:")
            return lambda: self._json(ids, check)
        if kind == "chat":
            turns = [" ".join(rng.choice(NOUNS) for _ in range(rng.randint(8, 200))) for _ in range(rng.randint(2, 3))]
            return lambda: self._chat(turns)
        if kind == "stream_disconnect":
            ids, keep = self._prompt(100, 800), rng.randint(1, 12)
            return lambda: self._disconnect(ids, keep)
        if kind == "abort_one":
            ids, wait = self._prompt(100, 800), rng.uniform(0.5, 4.0)
            return lambda: self._abort_one(ids, wait)
        if kind == "bad_too_long":
            n = self.context + rng.randint(1, 600)
            ids = [rng.randrange(1000, 5000) for _ in range(n)]
            return lambda: self._expect_4xx(self._post("/generate", {
                "input_ids": ids, "sampling_params": {"max_new_tokens": 4}}), "context length")
        if kind == "bad_sampling":
            params, word = rng.choice(BAD_SAMPLING)
            ids = self._prompt(24, 200)
            route = rng.choice(["/generate", "/v1/completions"])
            if route == "/generate":
                body: Any = {"input_ids": ids, "sampling_params": params}
            else:
                body = {"model": "default", "prompt": ids,
                        **{("max_tokens" if k == "max_new_tokens" else k): v for k, v in params.items()}}
                word = "max_tokens" if word == "max_new_tokens" else word
            return lambda: self._expect_4xx(self._post(route, body), word)
        if kind == "bad_lsa":
            lsa, word = rng.choice(BAD_LSA)
            ids, stream = self._prompt(24, 400), rng.random() < 0.5
            if rng.random() < 0.5:
                body = {"input_ids": ids, "stream": stream,
                        "sampling_params": {"max_new_tokens": 8, "custom_params": {"lsa": lsa}}}
                return lambda: self._expect_4xx(self._post("/generate", body), word)
            body = {"model": "default", "prompt": ids, "max_tokens": 8, "stream": stream,
                    "custom_params": {"lsa": lsa}}
            return lambda: self._expect_4xx(self._post("/v1/completions", body), word)
        if kind == "bad_body":
            body = rng.choice(['{"text": "unterminated', '[1, 2, 3]', '{"text": 5, "sampling_params": 7}',
                               '{"input_ids": "abc"}'])
            return lambda: self._expect_4xx(self._post("/generate", body), "")
        raise ValueError(f"unknown soak job kind {kind!r}")

    def _pair(self, ids: list[int], n: int) -> Outcome:
        with cf.ThreadPoolExecutor(2) as ex:
            a, b = ex.map(lambda _: self._post("/generate", {
                "input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0}}).json(), range(2))
        if a.get("output_ids") != b.get("output_ids"):
            return Outcome("", False, f"same prompt twice at once gave different tokens: {a.get('output_ids')} "
                                      f"vs {b.get('output_ids')}", requests=2)
        return Outcome("", True, requests=2)

    def _json(self, ids: list[int], check: bool) -> Outcome:
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 64, "temperature": 0,
                                                      "json_schema": json.dumps(JSON_SCHEMA)}}
        r = self._post("/generate", body)
        if r.status_code != 200:
            return Outcome("", False, f"HTTP {r.status_code}: {r.text[:300]}")
        out = r.json()
        if out["meta_info"]["finish_reason"].get("type") == "stop":
            try:
                obj = json.loads(out["text"])
            except ValueError:
                return Outcome("", False, f"constrained output is not JSON: {out['text'][:200]!r}")
            if set(obj) != {"city", "year"} or not isinstance(obj["year"], int):
                return Outcome("", False, f"constrained output breaks the schema: {obj}")
        if check:
            with self._lock:
                self.solo.append((body, out["output_ids"]))
        return Outcome("", True)

    def _chat(self, turns: list[str]) -> Outcome:
        messages: list[dict[str, str]] = []
        for i, text in enumerate(turns):
            messages.append({"role": "user", "content": f"Repeat the last word of this list: {text}"})
            r = self._post("/v1/chat/completions", {"model": "default", "messages": messages,
                                                    "max_tokens": 12, "temperature": 0})
            if r.status_code != 200:
                return Outcome("", False, f"turn {i}: HTTP {r.status_code}: {r.text[:300]}", requests=i + 1)
            choice = r.json()["choices"][0]
            if choice["finish_reason"] not in ("stop", "length"):
                return Outcome("", False, f"turn {i}: finish_reason {choice['finish_reason']}", requests=i + 1)
            messages.append({"role": "assistant", "content": choice["message"]["content"] or ""})
        return Outcome("", True, requests=len(turns))

    def _disconnect(self, ids: list[int], keep: int) -> Outcome:
        body = {"input_ids": ids, "stream": True,
                "sampling_params": {"max_new_tokens": 300, "temperature": 0, "ignore_eos": True}}
        with self._post("/generate", body, stream=True) as r:
            if r.status_code != 200:
                return Outcome("", False, f"HTTP {r.status_code}: {r.text[:300]}")
            events = 0
            for line in r.iter_lines():
                events += bool(line)
                if events >= keep:
                    break
        return Outcome("", True)

    def _abort_one(self, ids: list[int], wait: float) -> Outcome:
        rid = self._next_rid("abort")
        body = {"input_ids": ids, "rid": rid,
                "sampling_params": {"max_new_tokens": 600, "temperature": 0, "ignore_eos": True}}
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(self._post, "/generate", body)
            time.sleep(wait)
            a = requests.post(self.url + "/abort_request", json={"rid": rid}, timeout=60)
            r = fut.result()
        if a.status_code != 200:
            return Outcome("", False, f"/abort_request: HTTP {a.status_code}: {a.text[:200]}", requests=2)
        if r.status_code != 200 and "abort" not in r.text.lower():
            return Outcome("", False, f"aborted request: HTTP {r.status_code}: {r.text[:300]}", requests=2)
        return Outcome("", True, requests=2)

    def abort_all_round(self, n: int = 4) -> Outcome:
        """Only sacrificial requests run: each must end as aborted, none may hang."""
        prompts = [self._prompt(100, 1500) for _ in range(n)]
        with cf.ThreadPoolExecutor(n) as ex:
            futs = [ex.submit(self._post, "/generate", {"input_ids": p, "sampling_params": {
                "max_new_tokens": 2000, "temperature": 0, "ignore_eos": True}}) for p in prompts]
            time.sleep(3)
            a = requests.post(self.url + "/abort_request", json={"abort_all": True}, timeout=60)
            res = [f.result() for f in futs]
        types = [((r.json().get("meta_info") or {}).get("finish_reason") or {}).get("type")
                 if r.status_code == 200 else f"HTTP {r.status_code}" for r in res]
        ok = a.status_code == 200 and all(t == "abort" or "abort" in r.text.lower() for t, r in zip(types, res))
        return Outcome("abort_all", ok, "" if ok else f"finish types {types}", requests=n + 1)

    # -- the run --------------------------------------------------------------------------------
    def _stats(self) -> dict[str, Any]:
        r = requests.get(self.url + "/lsa/stats", timeout=60)
        r.raise_for_status()
        return r.json()["server"]

    def _alive(self, patience: float = 300) -> bool:
        """Whether /health answers within `patience` seconds (a long CPU prefill holds it up)."""
        deadline = time.monotonic() + patience
        while True:
            try:
                if requests.get(self.url + "/health", timeout=30).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(2)

    def settle(self, flush: bool = True, timeout: float = 300) -> dict[str, Any]:
        """Stats once nothing runs (and, with `flush`, after SGLang emptied the prefix cache)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self._stats()
            if s["running_requests"] == 0 and s["host_reserved_bytes"] == 0:
                if not flush:
                    return s
                r = requests.post(self.url + "/flush_cache", timeout=60)
                if r.ok and "Cache flushed" in r.text:
                    time.sleep(0.5)
                    return self._stats()
            time.sleep(0.5)
        raise RuntimeError(f"the server did not settle in {timeout:.0f} s: {self._stats()}")

    def run(self) -> Report:
        rep = Report()
        base = self.settle()
        rep.host_capacity_bytes = base["host_capacity_bytes"]
        kinds, weights = list(self.mix), list(self.mix.values())
        stop = threading.Event()
        sampler = threading.Thread(target=self._sample, args=(rep, stop), daemon=True)
        t0 = time.monotonic()
        sampler.start()
        try:
            self._traffic(rep, kinds, weights)
            if rep.server_deaths == 0:
                self._replay_alone(rep)
        finally:
            stop.set()
            sampler.join()
        if rep.server_deaths == 0 and self._alive():
            end = self.settle()
            for key in ("device_free_tokens", "host_kv_bytes", "host_cached_bytes", "host_reserved_bytes",
                        "running_requests", "device_kv_bytes"):
                if end[key] != base[key]:
                    rep.leaked.append(f"{key}: {base[key]} before, {end[key]} after")
            rep.host_waits = end["host_waits"] - base["host_waits"]
            rep.windows = end.get("windows", 0) - base.get("windows", 0)
        elif rep.server_deaths == 0:
            rep.server_deaths = 1
        rep.wall_s = time.monotonic() - t0
        return rep

    def _traffic(self, rep: Report, kinds: list[str], weights: list[float]) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.n, desc="soak requests", unit="req", disable=not self.progress)
        while rep.requests < self.n and rep.server_deaths == 0:
            batch = min(self.abort_all_every, self.n - rep.requests)
            with cf.ThreadPoolExecutor(self.concurrency) as ex:
                futs = [ex.submit(self.job, k) for k in self.rng.choices(kinds, weights, k=batch)]
                for f in cf.as_completed(futs):
                    try:
                        out = f.result()
                    except requests.RequestException as e:
                        out = Outcome("transport", False, f"{type(e).__name__}: {e}")
                    self._record(rep, out)
                    bar.update(out.requests)
                    if not out.ok and not self._alive():
                        rep.server_deaths += 1
                        break
            if rep.server_deaths == 0 and rep.requests < self.n:
                out = self.abort_all_round()
                self._record(rep, out)
                bar.update(out.requests)
        bar.close()

    def _record(self, rep: Report, out: Outcome) -> None:
        rep.requests += out.requests
        rep.outcomes[f"{out.kind}:{'ok' if out.ok else 'fail'}"] += 1
        if not out.ok:
            rep.failures.append({"kind": out.kind, "detail": out.detail})

    def _replay_alone(self, rep: Report) -> None:
        """The sampled greedy requests again, one at a time on an idle server."""
        self.settle(flush=False)
        for body, tokens in self.solo:
            r = self._post("/generate", body)
            rep.requests += 1
            alone = r.json().get("output_ids") if r.status_code == 200 else f"HTTP {r.status_code}"
            rep.solo_checked += 1
            if alone != tokens:
                params = {k: v for k, v in body["sampling_params"].items() if k != "json_schema"}
                first = next((i for i, (a, b) in enumerate(zip(tokens, alone)) if a != b), min(len(tokens), len(alone)))
                rep.solo_mismatches.append({"prompt_tokens": len(body["input_ids"]), "params": params,
                                            "first_difference": first, "under_load": tokens, "alone": alone})

    def _sample(self, rep: Report, stop: threading.Event) -> None:
        t0 = time.monotonic()
        while not stop.wait(self.sample_interval):
            try:
                s = self._stats()
            except (requests.RequestException, ValueError, KeyError):
                continue
            host = s["host_kv_bytes"] + s["host_cached_bytes"]
            rep.peak_host_bytes = max(rep.peak_host_bytes, host)
            rep.timeline.append({"t": round(time.monotonic() - t0, 1), "requests": rep.requests,
                                 "running": s["running_requests"], "device_free_tokens": s["device_free_tokens"],
                                 "device_kv_bytes": s["device_kv_bytes"], "host_bytes": host,
                                 "host_reserved_bytes": s["host_reserved_bytes"]})


def plot(rep: dict[str, Any], path: Any, title: str) -> Any:
    """Pool curves over the run: device free tokens, LSA device KV, host mirror, running requests."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tl = rep["timeline"]
    if not tl:
        return None
    t = [p["t"] for p in tl]
    panels = (("device_free_tokens", "device pool: free tokens", 1),
              ("device_kv_bytes", "LSA device KV (MiB)", 2**20),
              ("host_bytes", "host mirror in use (MiB)", 2**20),
              ("running", "running requests", 1))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, label, scale) in zip(axes, panels):
        ax.plot(t, [p[key] / scale for p in tl], lw=0.8)
        if key == "host_bytes":
            ax.axhline(rep["host_capacity_bytes"] / scale, color="red", ls="--", lw=0.8, label="host_pool_gb")
            ax.legend(fontsize=8)
        ax.set_xlabel("seconds")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"soak: {'PASSED' if rep['passed'] else 'FAILED'}: {rep['requests']} requests in {rep['wall_s']:.0f} s, "
             f"server deaths {rep['server_deaths']}, leaked {rep['leaked']}, failures {rep['failures']}, "
             f"solo replays {rep['solo_checked']} ({rep['solo_mismatches']} differ), host peak "
             f"{rep['peak_host_bytes'] / 2**20:.0f} of {rep['host_capacity_bytes'] / 2**20:.0f} MiB, "
             f"host waits {rep['host_waits']}, LSA windows {rep['lsa_windows']}"]
    for kind, n in rep["outcomes"].items():
        lines.append(f"  {kind:28s} {n}")
    for f in rep["failure_detail"][:10]:
        lines.append(f"  FAIL {f['kind']}: {f['detail'][:200]}")
    for m in rep["solo_mismatch_detail"][:10]:
        lines.append(f"  DIFFERS ALONE at token {m['first_difference']}: {m['prompt_tokens']}-token prompt, {m['params']}")
    for leak in rep["leaked_detail"]:
        lines.append(f"  LEAK {leak}")
    return "\n".join(lines)
