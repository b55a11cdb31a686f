"""Long-context tasks of our own, in RULER's formats, fitted to a length in the model's tokens.

Every task is built from a seed alone (no downloads except the pinned prose corpus), so a run is
reproducible and two servers see byte-identical prompts. A task is a `Draft`: a function that
renders the prompt for a given haystack size (in units: words, needles, list items, JSON pairs)
plus the expected answers. `generate_sample` searches the unit count so that the final prompt
(chat template included when used) has as many tokens as asked, or a few fewer, never more; tasks
whose units are large (a needle line, a JSON pair) fill the last tokens with the neutral noise
sentence so they land just as close.

Formats follow RULER (Hsieh et al., 2024): the same needle sentences, questions and answer
prefixes; scoring is RULER's "all expected strings present" (`scoring.py`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import string
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from lsa_sglang.bench.drafts import Draft, TaskSpec, join_words
from lsa_sglang.bench.drafts import prose as _prose
from lsa_sglang.bench.realtext import TASKS as _REAL_TEXT
from lsa_sglang.bench.tokens import TokenCounter, as_counter
from lsa_sglang.bench.words import ADJECTIVES, NOUNS, VOCABULARY

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_NOISE_WORDS = NOISE.split()
_SENTENCE_END = (".", "?", "!")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt and what a correct answer must contain."""

    prompt_text: str
    answers: list[str]
    task: str
    n_tokens: int
    target_tokens: int = 0
    seed: int = 0
    max_new_tokens: int = 32
    template: str = "raw"
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- helpers -----------------------------------------------------------------------------------


def noise_words(n: int) -> list[str]:
    """The first n words of RULER's repeated noise paragraph."""
    reps = n // len(_NOISE_WORDS) + 1
    return (_NOISE_WORDS * reps)[:n]


def insert_sentences(words: Sequence[str], items: Sequence[str], depths: Sequence[float]) -> str:
    """Insert each item as its own sentence at the sentence boundary at or before depth * len(words).

    Depth 0 is the start of the haystack, 1 its end; items at the same boundary keep their order.
    """
    n = len(words)
    bounds = [0] + [i + 1 for i, w in enumerate(words) if w.endswith(_SENTENCE_END)]
    if bounds[-1] != n:
        bounds.append(n)
    placed: dict[int, list[str]] = {}
    for item, depth in zip(items, depths):
        want = depth * n
        pos = max(b for b in bounds if b <= want + 1e-9) if n else 0
        placed.setdefault(pos, []).append(item)
    out: list[str] = []
    for i in range(n + 1):
        out.extend(placed.get(i, []))
        if i < n:
            out.append(words[i])
    return join_words(out)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _distinct(rng: random.Random, make: Callable[[random.Random], str], n: int, avoid: set[str]) -> list[str]:
    out: list[str] = []
    seen = set(avoid)
    while len(out) < n:
        v = make(rng)
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _noise(_rng: random.Random) -> Callable[[int], list[str]]:
    return noise_words


# --- needle-in-a-haystack family -----------------------------------------------------------------

_NIAH_INTRO = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n"
)
_NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
_NIAH_QUESTION = "\nWhat are all the special magic {kind} for {query} mentioned in the provided text?"
_NIAH_PREFIX = " The special magic {kind} for {query} mentioned in the provided text are"


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _niah_haystack(
    haystack: str,
    kind: str,
    make_key: Callable[[random.Random], str],
    make_value: Callable[[random.Random], str],
    n_keys: int = 1,
    n_values: int = 1,
    n_queries: int = 1,
) -> Callable[[random.Random, int], Draft]:
    """Needles in noise or prose: n_keys keys (the first n_queries asked), n_values values each."""

    def build(rng: random.Random, _target: int) -> Draft:
        words_of = _prose(rng) if haystack == "prose" else _noise(rng)
        keys = _distinct(rng, make_key, n_keys, set())
        values = {k: _distinct(rng, make_value, n_values, set()) for k in keys}
        needles = [_NIAH_NEEDLE.format(kind=kind, key=k, value=v) for k in keys for v in values[k]]
        depths = [rng.random() for _ in needles]
        order = list(range(len(needles)))
        rng.shuffle(order)  # distractor and asked needles interleave
        needles = [needles[i] for i in order]
        queries = keys[:n_queries]
        query = _join_keys(queries)
        answers = [v for k in queries for v in values[k]]
        head = _NIAH_INTRO.format(kind=kind)
        tail = _NIAH_QUESTION.format(kind=kind, query=query)

        def render(n: int, _pad: int) -> str:
            return head + insert_sentences(words_of(n), needles, depths) + tail

        meta = {"haystack": haystack, "keys": keys, "queries": queries, "depths": [depths[i] for i in order]}
        return Draft(render, _NIAH_PREFIX.format(kind=kind, query=query), answers, meta)

    return build


def _niah_needles(kind: str, make_key: Callable[[random.Random], str],
                  make_value: Callable[[random.Random], str]) -> Callable[[random.Random, int], Draft]:
    """The haystack is made of needles (RULER multikey 2/3): one asked key among many distractors."""

    def build(rng: random.Random, _target: int) -> Draft:
        base = rng.getrandbits(64)
        query = make_key(rng)
        answer = make_value(rng)
        depth = rng.random()
        # One stream per task instance, extended on demand: the first n distractors are the same
        # for every n, so the prompt grows monotonically while the fit searches n.
        stream = random.Random(f"{base}:distractors")
        cache: list[tuple[str, str]] = []
        seen = {query}

        def distractors(n: int) -> list[tuple[str, str]]:
            while len(cache) < n:
                k = make_key(stream)
                if k not in seen:
                    seen.add(k)
                    cache.append((k, make_value(stream)))
            return cache[:n]

        head = _NIAH_INTRO.format(kind=kind)
        tail = _NIAH_QUESTION.format(kind=kind, query=query)

        def render(n: int, pad: int) -> str:
            lines = [_NIAH_NEEDLE.format(kind=kind, key=k, value=v) for k, v in distractors(n)]
            pos = round(depth * n)
            lines.insert(pos, _NIAH_NEEDLE.format(kind=kind, key=query, value=answer))
            filler = join_words(noise_words(pad))
            return head + (filler + "\n" if pad else "") + "\n".join(lines) + tail

        return Draft(render, _NIAH_PREFIX.format(kind=kind, query=query), [answer],
                     {"haystack": "needles", "keys": [query], "depths": [depth]}, paddable=True)

    return build


def _num7(rng: random.Random) -> str:
    return _number(rng, 7)


# --- variable tracking --------------------------------------------------------------------------

_VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
_VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
_VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {n} variables "
              "are assigned the value {value}, they are:")


def _vt(n_hops: int = 4) -> Callable[[random.Random, int], Draft]:
    def build(rng: random.Random, _target: int) -> Draft:
        names = _distinct(rng, lambda r: "".join(r.choices(string.ascii_uppercase, k=5)), n_hops + 1, set())
        value = _number(rng, 5)
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, n_hops + 1)]
        depths = sorted(rng.random() for _ in chain)  # the chain appears in order

        def render(n: int, _pad: int) -> str:
            return _VT_INTRO + insert_sentences(noise_words(n), chain, depths) + _VT_QUESTION.format(value=value)

        return Draft(render, _VT_PREFIX.format(n=len(names), value=value), names,
                     {"haystack": "noise", "depths": depths, "hops": n_hops})

    return build


# --- common / frequent word extraction ----------------------------------------------------------

_CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.\n")
_CWE_QUESTION = "\nQuestion: What are the 10 most common words in the above list?"
_CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"


def _cwe(n_common: int = 10) -> Callable[[random.Random, int], Draft]:
    """Ten words repeated `fc` times among many words repeated `fu` < fc times (RULER: 30 and 3;
    smaller for short prompts so the common words still leave room for the rest)."""

    def build(rng: random.Random, target: int) -> Draft:
        items_est = max(target // 5, 40)
        fc = max(4, min(30, int(items_est * 0.3 / n_common)))
        fu = 1 if fc < 12 else 3
        vocab = list(VOCABULARY)
        rng.shuffle(vocab)
        common, rest = vocab[:n_common], vocab[n_common:]
        compounds = [f"{a}-{b}" for a in ADJECTIVES for b in NOUNS]
        rng.shuffle(compounds)
        pool = rest + compounds  # single words first, then pairs for very long lists
        base = rng.getrandbits(64)

        def render(n: int, pad: int) -> str:
            n = min(n, len(pool))
            items = common * fc + pool[:n] * fu + pool[n : n + pad]  # pad: words seen once
            random.Random(f"{base}:{n}:{pad}").shuffle(items)
            body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
            return _CWE_INTRO + body + _CWE_QUESTION

        return Draft(render, _CWE_PREFIX, list(common), {"haystack": "list", "freq_common": fc, "freq_rare": fu},
                     paddable=True, max_units=len(pool) - 64)

    return build


_FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. "
              "Find the three most frequently appeared coded words. ")
_FWE_QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
                 "What are the three most frequently appeared words in the above coded text?")
_FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


def _fwe(alpha: float = 2.0, top: int = 3) -> Callable[[random.Random, int], Draft]:
    """Coded words with Zipf(alpha) frequencies; the answer is the `top` most frequent."""

    def build(rng: random.Random, _target: int) -> Draft:
        base = rng.getrandbits(64)
        words = _distinct(rng, lambda r: "".join(r.choices(string.ascii_lowercase, k=5)), 4096, set())

        def render(n: int, pad: int) -> str:
            vocab = max(8, min(len(words) - 64, n // 6))
            weights = [1.0 / (r + 1) ** alpha for r in range(vocab)]
            total = sum(weights)
            counts = [max(1, int(n * w / total)) for w in weights]
            seq = [w for w, c in zip(words, counts) for _ in range(c)] + words[vocab : vocab + pad]
            r = random.Random(f"{base}:{n}:{pad}")
            r.shuffle(seq)
            out: list[str] = []
            for i, w in enumerate(seq):
                out.append(w)
                if i % 10 == 9:
                    out.append("....")
            return _FWE_INTRO + " ".join(out) + _FWE_QUESTION

        return Draft(render, _FWE_PREFIX, words[:top], {"haystack": "coded", "alpha": alpha}, paddable=True)

    return build


# --- passkey, key-value retrieval ---------------------------------------------------------------

_PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the important information there.\n\n")
_PASSKEY_QUESTION = "\n\nWhat is the pass key?"
_PASSKEY_PREFIX = " The pass key is"


def _passkey() -> Callable[[random.Random, int], Draft]:
    def build(rng: random.Random, _target: int) -> Draft:
        key = _number(rng, 5)
        depth = rng.random()
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."

        def render(n: int, _pad: int) -> str:
            return _PASSKEY_INTRO + insert_sentences(noise_words(n), [needle], [depth]) + _PASSKEY_QUESTION

        return Draft(render, _PASSKEY_PREFIX, [key], {"haystack": "noise", "depths": [depth]})

    return build


_KV_INTRO = "Extract the value corresponding to the specified key in the JSON object below.\n\n"
_KV_QUESTION = '\n\nKey: "{key}"\nThe value associated with the specified key is:'


def _kv() -> Callable[[random.Random, int], Draft]:
    def build(rng: random.Random, _target: int) -> Draft:
        base = rng.getrandbits(64)
        key, value = _uuid(rng), _uuid(rng)
        depth = rng.random()
        stream = random.Random(f"{base}:pairs")
        cache: list[tuple[str, str]] = []

        def pairs(n: int) -> list[tuple[str, str]]:
            while len(cache) < n:
                cache.append((_uuid(stream), _uuid(stream)))
            return cache[:n]

        def render(n: int, pad: int) -> str:
            items = pairs(n)
            items.insert(round(depth * n), (key, value))
            filler = join_words(noise_words(pad)) + "\n\n" if pad else ""
            return _KV_INTRO + filler + "JSON data:\n" + json.dumps(dict(items)) + _KV_QUESTION.format(key=key)

        return Draft(render, "", [value], {"haystack": "json", "depths": [depth]}, paddable=True)

    return build


# --- registry -----------------------------------------------------------------------------------

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("niah_single", "one word key -> 7-digit number in the noise haystack (RULER niah_single_1)",
                 _niah_haystack("noise", "numbers", _word_key, _num7), 24),
        TaskSpec("niah_single_prose", "one word key -> 7-digit number in public-domain prose (niah_single_2)",
                 _niah_haystack("prose", "numbers", _word_key, _num7), 24, needs_prose=True),
        TaskSpec("niah_multikey", "asked key among a haystack of distractor needles, words -> numbers (niah_multikey_2)",
                 _niah_needles("numbers", _word_key, _num7), 24),
        TaskSpec("niah_multikey_uuid", "asked key among distractor needles, uuid -> uuid (niah_multikey_3)",
                 _niah_needles("uuids", _uuid, _uuid), 48),
        TaskSpec("niah_multikey_prose", "4 keys in prose, one asked (niah_multikey_1)",
                 _niah_haystack("prose", "numbers", _word_key, _num7, n_keys=4), 24, needs_prose=True),
        TaskSpec("niah_multivalue", "one key with 4 values in prose, all asked (niah_multivalue)",
                 _niah_haystack("prose", "numbers", _word_key, _num7, n_values=4), 64, needs_prose=True),
        TaskSpec("niah_manyvalues", "one key with 12 values in prose, all asked: the answer spans 3 windows of 64 "
                 "tokens and its needles outnumber a 9-page budget, so later windows are judged",
                 _niah_haystack("prose", "numbers", _word_key, _num7, n_values=12), 192, needs_prose=True),
        TaskSpec("niah_multiquery", "4 keys in prose, all asked (niah_multiquery)",
                 _niah_haystack("prose", "numbers", _word_key, _num7, n_keys=4, n_queries=4), 64, needs_prose=True),
        TaskSpec("vt", "variable tracking: one chain of 4 hops in noise (RULER vt)", _vt(), 40),
        TaskSpec("cwe", "10 most common words of a numbered list (RULER cwe)", _cwe(), 80),
        TaskSpec("fwe", "3 most frequent coded words, Zipf(2) frequencies (RULER fwe)", _fwe(), 32),
        TaskSpec("passkey", "5-digit pass key in the noise haystack", _passkey(), 16),
        TaskSpec("kv_retrieval", "uuid key -> uuid value in a JSON object", _kv(), 48),
    )
}


TASKS.update({t.name: t for t in _REAL_TEXT})
REAL_TEXT_TASKS = tuple(t.name for t in _REAL_TEXT)


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


# --- fitting ------------------------------------------------------------------------------------


def wrap_prompt(body: str | list[dict[str, str]], answer_prefix: str, counter: TokenCounter, template: str) -> str:
    """The text sent to /generate: the chat template around the task (if used), then the answer
    prefix the model continues from, as RULER does. A body that is a conversation (role/content
    dicts) becomes the template's turns, or "User: ..." / "Assistant: ..." paragraphs in raw text."""
    prefix = answer_prefix.strip()
    if template == "chat":
        chat = counter.chat(body)
        if chat is None:
            raise ValueError(f"tokenizer {counter.name} has no chat template; use template='raw'")
        return chat + prefix
    if not isinstance(body, str):
        body = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in body) + "\n\nAssistant:"
    return body + (" " + prefix if prefix else "")


def _largest_fitting(f: Callable[[int], int], target: int, guess: int, upper: int | None = None) -> int:
    """Largest n >= 0 with f(n) <= target, assuming f grows with n and f(0) <= target."""
    guess = max(0, guess if upper is None else min(guess, upper))
    if f(guess) <= target:
        lo, step = guess, max(1, guess // 16)
        while True:
            hi = lo + step
            if upper is not None and hi > upper:
                hi = upper + 1
                break
            if f(hi) > target:
                break
            lo, step = hi, step * 2
    else:
        hi, step = guess, max(1, guess // 16)
        while True:
            lo = max(0, hi - step)
            if lo == 0 or f(lo) <= target:
                break
            hi, step = lo, step * 2
    while hi - lo > 1:  # f(lo) <= target < f(hi)
        mid = (lo + hi) // 2
        if f(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def generate_sample(
    task: str,
    n_tokens: int,
    seed: int,
    tokenizer: Any,
    *,
    template: str = "auto",
    tolerance: int = 4,
) -> Sample:
    """A prompt of `task` with at most `n_tokens` tokens of `tokenizer` (usually within `tolerance`).

    `tokenizer`: a model folder, a transformers tokenizer, a `TokenCounter` (e.g. the server's
    `/tokenize`) or a `text -> count` function. `template`: "chat" wraps the task in the model's
    chat template, "raw" sends it as plain text, "auto" uses chat when the tokenizer has a template.
    The same (task, seed) gives the same needles and answers at every length.
    """
    spec = get_task(task)
    counter = as_counter(tokenizer)
    if template == "auto":
        template = "chat" if counter.chat("x") is not None else "raw"
    if template not in ("chat", "raw"):
        raise ValueError(f"template must be chat, raw or auto, got {template!r}")
    rng = random.Random(f"lsa-bench:{task}:{seed}")
    draft = spec.build(rng, n_tokens)
    memo: dict[tuple[int, int], int] = {}

    def tokens(n: int, pad: int = 0) -> int:
        if (n, pad) not in memo:
            memo[(n, pad)] = counter.count(wrap_prompt(draft.render(n, pad), draft.answer_prefix, counter, template))
        return memo[(n, pad)]

    base = tokens(0)
    if base > n_tokens:
        raise ValueError(f"{task}: the prompt without a haystack already has {base} tokens, more than {n_tokens}")
    probe = 32 if draft.max_units is None else min(32, draft.max_units)
    per_unit = max((tokens(probe) - base) / probe, 0.1)
    n = _largest_fitting(tokens, n_tokens, int((n_tokens - base) / per_unit), draft.max_units)
    pad = 0
    if draft.paddable and n_tokens - tokens(n) > tolerance:
        pad = _largest_fitting(lambda k: tokens(n, k), n_tokens, int((n_tokens - tokens(n)) / 2), 64)
    text = wrap_prompt(draft.render(n, pad), draft.answer_prefix, counter, template)
    got = tokens(n, pad)
    meta = dict(draft.meta, units=n, pad_words=pad)
    return Sample(text, list(draft.answers), task, got, n_tokens, seed, spec.max_new_tokens, template, meta)


def generate_samples(
    tasks: Sequence[str], lengths: Sequence[int], n_samples: int, tokenizer: Any, *,
    seed: int = 0, template: str = "auto", progress: bool = True,
) -> list[Sample]:
    """`n_samples` per (task, length); sample i of every task and length uses seed `seed + i`."""
    from tqdm import tqdm

    counter = as_counter(tokenizer)
    jobs = [(t, L, seed + i) for L in lengths for t in tasks for i in range(n_samples)]
    for t in tasks:
        get_task(t)
    return [
        generate_sample(t, L, s, counter, template=template)
        for t, L, s in tqdm(jobs, desc="generating prompts", unit="prompt", disable=not progress)
    ]
