"""Real-text tasks: text no selection rule was fitted to, and answers not planted in it.

The sources ship with Python itself, so every machine that runs lsa-bench has them and nothing is
downloaded: the language reference (`pydoc_data.topics`, the text `help()` shows) and the
standard library's own source files, plus the public-domain prose corpus of `corpus.py`.

- `doc_qa`: a question the reference answers in other words, the section that answers it among
  other sections; judged by a short list of accepted answers (any one found).
- `code_return`: what a real standard-library function returns (the expression of its only
  `return`), the function among other modules' source; judged whitespace-insensitively.
- `code_caller`: which function calls a given helper; the two functions apart in other source.
- `chat_recall`: a multi-turn chat (the model's chat template) whose last turn asks which
  statement the user's first or second message was about; the replies are reference sections;
  judged by the statement's keyword as a whole word.
- `summary`: a summary of a long stretch of prose, judged against dense attention's greedy
  summary of the same prompt (ROUGE-L F1 over tokens, `accuracy.judge_against_reference`).

Prompts depend on the Python that builds them (its reference text and sources): the sample's
`meta` records the version. The questions of `doc_qa` are ours; their answers are read from the
reference, not written into it.
"""

from __future__ import annotations

import ast
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

from lsa_sglang.bench.drafts import Draft, TaskSpec, join_words, prose

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"

# (topic, question, accepted answers): the topic's section of the reference answers the question.
DOC_QUESTIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("assert", "Which command-line option makes the interpreter drop assert statements?", ("-O",)),
    ("assert", "Which built-in variable decides whether an assertion is checked at all?", ("__debug__",)),
    ("del", "What error do you get when you delete a name that is not bound?", ("NameError",)),
    ("shifting", "Shifting an integer right by n bits equals floor division by what?", ("pow(2", "2**n", "2 ** n", "2^n")),
    ("truth", "Which two methods can a class define so that its instances can test false?", ("__bool__", "__len__")),
    ("break", "Which clause of a loop is skipped when the loop is left with break?", ("else",)),
    ("return", "What exception does a return statement inside a generator cause?", ("StopIteration",)),
    ("return", "What does an empty return in an asynchronous generator cause to be raised?", ("StopAsyncIteration",)),
    ("nonlocal", "Which PEP specified the statement that rebinds names of an enclosing function scope?", ("3104",)),
    ("imaginary", "What is the real part of the number an imaginary literal yields?", ("0.0", "zero")),
    ("lambda", "Besides statements, what can a function made by a lambda expression not contain?", ("annotation",)),
    ("integers", "Which earlier notation is the reason leading zeros are not allowed in non-zero decimal "
                 "numbers?", ("octal",)),
    ("integers", "In which Python version did underscores for grouping digits become allowed?", ("3.6",)),
    ("floating", "In which radix are the integer and exponent parts of a float literal always read?", ("10", "ten")),
    ("dict", "If a dictionary display gives the same key twice, which value does the key keep?", ("last",)),
    ("dict", "Which PEP proposed unpacking into dictionary displays?", ("448",)),
    ("in", "What does a membership test on a string check for?", ("substring",)),
    ("in", "Which special method lets a class answer membership tests directly?", ("__contains__",)),
    ("bltin-ellipsis-object", "Besides its name, how else can the ellipsis object be written?", ("...",)),
    ("bltin-null-object", "What object do functions return when they return no value explicitly?", ("None",)),
    ("await", "In which Python version was the await expression added?", ("3.5",)),
    ("typesmodules", "Which special attribute of a module holds its symbol table?", ("__dict__",)),
    ("context-managers", "Which method of a context manager runs when the with block is entered?", ("__enter__",)),
    ("augassign", "In an augmented assignment, which side is evaluated first?", ("left",)),
    ("pass", "What happens when a pass statement is executed?", ("nothing",)),
    ("while", "Which statement makes a while loop end without running its else clause?", ("break",)),
    ("global", "Names listed in which statement are interpreted as module-level names?", ("global",)),
)


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def _lines(text: str) -> list[str]:
    return text.strip("\n").split("\n")


def _insert_blocks(lines: Sequence[str], blocks: Sequence[Sequence[str]], depths: Sequence[float],
                   boundary: Callable[[Sequence[str], int], bool]) -> list[str]:
    """Each block inserted at the last boundary line index at or before depth * len(lines)."""
    n = len(lines)
    bounds = [0] + [i for i in range(1, n) if boundary(lines, i)] + [n]
    placed: dict[int, list[str]] = {}
    for block, depth in zip(blocks, depths):
        pos = max(b for b in bounds if b <= depth * n + 1e-9)
        placed.setdefault(pos, []).extend(["", *block, ""])
    out: list[str] = []
    for i in range(n + 1):
        out.extend(placed.get(i, []))
        if i < n:
            out.append(lines[i])
    return out


def _blank_before(lines: Sequence[str], i: int) -> bool:
    return not lines[i - 1].strip()


def _top_level_start(lines: Sequence[str], i: int) -> bool:
    """Line i starts a top-level statement after a blank line (safe place for a code block)."""
    return not lines[i - 1].strip() and bool(lines[i]) and not lines[i][0].isspace()


def _stream(rng: random.Random, items: Sequence[str],
            text: Callable[[str], list[str]]) -> Callable[[int, int], list[str]]:
    """(n, pad) -> the first n lines of the items' texts in a seeded order (wrapping), then the
    first `pad` words of the next line (lines are coarse units; the fit pads with words)."""
    order = list(items)
    rng.shuffle(order)
    cache: list[str] = []
    taken = 0  # items already in the cache: a longer prompt goes on with the next one

    def take(n: int, pad: int = 0) -> list[str]:
        nonlocal taken
        while len(cache) <= n and order:
            cache.extend(text(order[taken % len(order)]) + [""])
            taken += 1
        partial = " ".join(cache[n].split()[:pad]) if pad else ""
        return cache[:n] + ([partial] if partial else [])

    return take


# --- doc_qa -------------------------------------------------------------------------------------

_DOC_INTRO = "Below are sections of the Python language reference.\n\n"
_DOC_QUESTION = "\n\nAnswer the question from the sections above, in a few words.\nQuestion: {q}"


def _doc_qa(rng: random.Random, _target: int) -> Draft:
    topics = _topics()
    topic, question, answers = DOC_QUESTIONS[rng.randrange(len(DOC_QUESTIONS))]
    block = _lines(topics[topic])
    others = _stream(rng, [k for k in sorted(topics) if k != topic], lambda k: _lines(topics[k]))
    depth = rng.random()

    def render(n: int, pad: int) -> str:
        return _DOC_INTRO + "\n".join(_insert_blocks(others(n), [block], [depth], _blank_before) +
                                       others(n, pad)[n:]) + _DOC_QUESTION.format(q=question)

    return Draft(render, "Answer:", list(answers),
                 {"source": f"pydoc_data.topics[{topic!r}] (Python {PYTHON})", "topic": topic,
                  "question": question, "depths": [depth], "match": "any"}, paddable=True)


# --- code ---------------------------------------------------------------------------------------

_WORD = re.compile(r"\b\w+\b")
_SKIP_MODULES = {"this.py", "antigravity.py", "__future__.py", "__hello__.py"}


@lru_cache(maxsize=1)
def _stdlib() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(name, lines) of the standard library's top-level modules of 4-60 KB, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.glob("*.py")):
        if p.name in _SKIP_MODULES or p.name.startswith("_"):
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        if 4000 <= len(text) <= 60000:
            out.append((p.name, tuple(text.split("\n"))))
    return tuple(out)


@lru_cache(maxsize=1)
def _functions() -> tuple[dict, ...]:
    """Top-level functions of the pool whose name appears in no other module of it, with their
    source lines, the source of their return expressions and the names they call."""
    pool = _stdlib()
    found = []
    for name, lines in pool:
        text = "\n".join(lines)
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
                continue
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            src = lines[start:node.end_lineno]
            returns = [r for r in ast.walk(node) if isinstance(r, ast.Return) and r.value is not None]
            calls = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
            found.append({"module": name, "name": node.name, "lines": tuple(src), "calls": calls,
                          "returns": [ast.get_source_segment(text, r.value) or "" for r in returns]})
    modules_with: dict[str, int] = {}  # identifier -> how many modules of the pool contain it
    for _name, lines in pool:
        for w in set(_WORD.findall("\n".join(lines))):
            modules_with[w] = modules_with.get(w, 0) + 1
    # a name that occurs in another module too would make the question ambiguous
    out = [f for f in found if modules_with.get(f["name"], 0) == 1]
    return tuple(out)


def _is_simple(expr: str) -> bool:
    return 4 <= len(expr) <= 48 and "\n" not in expr and expr not in ("None", "True", "False", "self")


def _code_haystack(rng: random.Random, skip: str) -> Callable[[int], list[str]]:
    pool = dict(_stdlib())
    return _stream(rng, [m for m in pool if m != skip], lambda m: [f"# file: Lib/{m}", *pool[m]])


_CODE_INTRO = "Below is Python source code from several modules of the standard library.\n\n"


def _code_return(rng: random.Random, _target: int) -> Draft:
    cands = [f for f in _functions() if len(f["returns"]) == 1 and _is_simple(f["returns"][0])
             and len(f["lines"]) <= 40]
    f = cands[rng.randrange(len(cands))]
    hay, depth = _code_haystack(rng, f["module"]), rng.random()
    q = (f"\n\nQuestion: What does the function `{f['name']}` in the code above return? "
         "Answer with the expression of its return statement only.")

    def render(n: int, pad: int) -> str:
        return _CODE_INTRO + "\n".join(_insert_blocks(hay(n), [f["lines"]], [depth], _top_level_start) +
                                        hay(n, pad)[n:]) + q

    return Draft(render, "Answer:", [f["returns"][0]],
                 {"source": f"Lib/{f['module']} {f['name']} (Python {PYTHON})", "depths": [depth], "match": "code"},
                 paddable=True)


def _code_caller(rng: random.Random, _target: int) -> Draft:
    funcs = _functions()
    by_module: dict[str, dict[str, dict]] = {}
    for f in funcs:
        by_module.setdefault(f["module"], {})[f["name"]] = f
    pairs = []
    for mod, fs in sorted(by_module.items()):
        for callee in sorted(fs):
            callers = [c for c in fs.values() if callee in c["calls"] and c["name"] != callee]
            if len(callers) == 1 and len(callers[0]["lines"]) <= 40 and len(fs[callee]["lines"]) <= 40:
                pairs.append((callers[0], fs[callee]))
    caller, callee = pairs[rng.randrange(len(pairs))]
    hay = _code_haystack(rng, caller["module"])
    depths = sorted(rng.random() for _ in range(2))
    blocks = [caller["lines"], callee["lines"]] if rng.random() < 0.5 else [callee["lines"], caller["lines"]]
    q = (f"\n\nQuestion: Which function in the code above calls `{callee['name']}`? "
         "Answer with that function's name only.")

    def render(n: int, pad: int) -> str:
        return _CODE_INTRO + "\n".join(_insert_blocks(hay(n), blocks, depths, _top_level_start) +
                                        hay(n, pad)[n:]) + q

    return Draft(render, "Answer:", [caller["name"]],
                 {"source": f"Lib/{caller['module']} {caller['name']} -> {callee['name']} (Python {PYTHON})",
                  "depths": depths, "match": "code"}, paddable=True)


# --- chat_recall --------------------------------------------------------------------------------

_STATEMENT = re.compile(r'The "(\w+)" statement')
_TURN_LINES = 60  # an assistant turn is at most this many lines of its section


def _statements() -> list[tuple[str, str]]:
    """(topic, keyword) of the reference's statement sections ("The "assert" statement")."""
    out: dict[str, str] = {}
    for k, text in sorted(_topics().items()):
        m = _STATEMENT.match(text.lstrip())
        if m and m[1] not in out.values():  # "else" shows the "if" section again
            out[k] = m[1]
    return list(out.items())


def _chat_recall(rng: random.Random, _target: int) -> Draft:
    topics = _topics()
    statements = _statements()
    rng.shuffle(statements)
    asked_turn = rng.randrange(2)  # the first or the second message
    order = [k for k, _ in statements] + [k for k in sorted(topics) if k not in dict(statements)]
    head, rest = order[:len(statements)], order[len(statements):]
    rng.shuffle(rest)
    order = head[:2] + rest + head[2:]  # the asked turn is a statement; later turns anything
    keyword = dict(statements)[order[asked_turn]]
    ordinal = ("first", "second")[asked_turn]

    def title(k: str) -> str:
        return _lines(topics[k])[0].replace('"', "")

    def render(n: int, pad: int) -> list[dict[str, str]]:
        msgs: list[dict[str, str]] = []
        left = n  # lines of replies; then `pad` words of the next line of the last reply
        for k in order:
            if left <= 0:
                break
            section = _lines(topics[k])[2:2 + _TURN_LINES]
            reply = section[:left]
            left -= len(reply)
            if left <= 0 and pad and len(section) > len(reply):
                reply.append(" ".join(section[len(reply)].split()[:pad]))
            msgs += [{"role": "user", "content": f"Can you explain {title(k)} in Python?"},
                     {"role": "assistant", "content": "\n".join(reply)}]
        msgs.append({"role": "user", "content": f"Which statement did I ask you about in my {ordinal} message? "
                                                "Answer with its keyword only."})
        return msgs

    return Draft(render, "", [keyword], {"source": f"pydoc_data.topics (Python {PYTHON})", "asked_turn": asked_turn,
                                         "topics": order[:3], "match": "word"}, paddable=True)


# --- summary ------------------------------------------------------------------------------------


def _summary(rng: random.Random, _target: int) -> Draft:
    words = prose(rng)

    def render(n: int, _pad: int) -> str:
        return ("Read the following text.\n\n" + join_words(words(n)) +
                "\n\nSummarize the text above in three sentences.")

    return Draft(render, "Summary:", [], {"source": "prose corpus (corpus.py)", "match": "dense"})


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("doc_qa", "a question the Python reference answers in other words, among other sections", _doc_qa, 32),
    TaskSpec("code_return", "what a standard-library function returns, among other modules' source", _code_return, 32),
    TaskSpec("code_caller", "which standard-library function calls a given one, both among other source",
             _code_caller, 24),
    TaskSpec("chat_recall", "a multi-turn chat on the reference; the last turn asks about the first or second",
             _chat_recall, 16),
    TaskSpec("summary", "three-sentence summary of long prose, judged against dense's summary (ROUGE-L)",
             _summary, 64, needs_prose=True),
)
