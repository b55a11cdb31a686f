"""dump -> train -> eval -> serve on a tiny random-weight Llama (and Qwen2-style q bias), with the
dumped tensors checked against an independent recomputation in transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lsa_sglang.cli import main  # noqa: E402
from lsa_sglang.indexer import IndexerCheckpointError, load_indexer, read_metadata, spec_from_hf_config  # noqa: E402
from lsa_sglang.models.adapter import default_target_layers  # noqa: E402
from lsa_sglang.training.data import load_dump  # noqa: E402
from lsa_sglang.training.labels import chunk_mass, top_p_picks  # noqa: E402
from lsa_sglang.training.scoring import indexer_scores  # noqa: E402

CS, TAU, TOKENS = 16, 16, 384
WORDS = ("amber lantern falcon harbour violin orchard compass tower ribbon anchor meadow mirror kettle "
         "bridge saddle garden engine candle feather chapel river silent golden hollow").split()


def _tokenizer(folder: Path) -> None:
    """One token per byte (a BPE without merges): offsets are exact and nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alpha = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alpha)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(folder))


def tiny_model(root: Path, kind: str = "llama") -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024, rope_theta=10000.0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(head_dim=16, **common))
    else:  # Qwen2: q/k/v projections carry a bias
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():  # sharper attention than the 0.02-std init gives: labels with structure
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    folder = root / f"tiny-{kind}"
    model.save_pretrained(str(folder))
    _tokenizer(folder)
    return folder


def write_docs(path: Path, n: dict[str, int]) -> Path:
    import random

    rng = random.Random(0)
    with path.open("w") as fh:
        for split, count in n.items():
            for i in range(count):
                text = " ".join(rng.choice(WORDS) for _ in range(120))
                fh.write(json.dumps({"text": text, "split": split, "id": f"{split}-{i}"}) + "\n")
    return path


def dump_args(model: Path, docs: Path, out: Path) -> list[str]:
    return ["dump", "--model-path", str(model), "--docs", str(docs), "--out", str(out), "--doc-tokens", str(TOKENS),
            "--positions", "6", "--chunk-size", str(CS), "--tau", str(TAU), "--min-position", "96",
            "--recent-chunks", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    model = tiny_model(root)
    docs = write_docs(root / "docs.jsonl", {"train": 3, "val": 1, "test": 2})
    data = root / "dump"
    assert main(dump_args(model, docs, data)) == 0
    return root, model, docs, data


def test_dump_train_eval_serve_round_trip(pipeline, capsys):
    root, model, docs, data = pipeline
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 6
    assert manifest["params"]["target_layers"] == list(default_target_layers(4))
    ckpt = root / "trained.safetensors"
    assert main(["train", "--data", str(data), "--out", str(ckpt), "--epochs", "3", "--threads", "1"]) == 0
    out_json = root / "eval.json"
    assert main(["eval", "--data", str(data), "--ckpt", str(ckpt), "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    for name in ("trained", "untrained", "recency", "random", "quest", "oracle"):
        assert name in result["methods"] and name in table
    assert result["documents"] == 2 and result["split"] == "test"
    meta = read_metadata(ckpt)["training"]
    assert meta["tau"] == TAU and meta["threshold"] == 0.5 and meta["chunk_size"] == CS

    # "serve": the spec the server builds for this model (build_manager) accepts the checkpoint,
    # and scoring a dumped sample the way manager._score does gives eval's scores.
    from transformers import AutoConfig

    spec = spec_from_hf_config(AutoConfig.from_pretrained(str(model)), model.name, default_target_layers(4),
                               CS, TAU, 0.5)
    indexer = load_indexer(ckpt, expected=spec)
    doc = load_dump(data, splits=("test",)).docs[0]
    want, _ = indexer_scores(indexer, doc, "max")
    for p in range(doc.num_samples):
        with torch.no_grad():
            q, w = indexer(doc.hidden[p][None], torch.tensor([int(doc.positions[p])]))
            probs = torch.sigmoid(indexer.layer_logits(q, w, doc.keys)[0])
        assert torch.allclose(probs.max(0).values, want[p], atol=1e-6)

    # a checkpoint of this model does not fit another chunk size or another model
    import dataclasses

    with pytest.raises(IndexerCheckpointError, match="chunk_size"):
        load_indexer(ckpt, expected=dataclasses.replace(spec, chunk_size=32))
    with pytest.raises(IndexerCheckpointError, match="model_id"):
        load_indexer(ckpt, expected=dataclasses.replace(spec, model_id="smollm2-135m"))

    # eval refuses a checkpoint of another model with one message, exit status 1
    from lsa_sglang.indexer import NeuralMemoryIndexer, save_indexer

    foreign = root / "foreign.safetensors"
    other = dataclasses.replace(indexer.spec, model_id="smollm2-135m")
    save_indexer(NeuralMemoryIndexer(other), foreign)
    capsys.readouterr()
    assert main(["eval", "--data", str(data), "--ckpt", str(foreign)]) == 1
    err = capsys.readouterr().err
    assert "lsa-sglang eval: error:" in err and "field 'model_id' expected 'tiny-llama'" in err
    assert main(["train", "--data", str(root / "nowhere"), "--out", str(foreign)]) == 1
    assert "dump directory not found" in capsys.readouterr().err


def test_dump_resumes_and_refuses_other_parameters(pipeline, capsys):
    root, model, docs, data = pipeline
    before = (data / "manifest.json").read_text()
    assert main(dump_args(model, docs, data)) == 0  # complete: nothing redone
    assert json.loads((data / "manifest.json").read_text())["shards"] == json.loads(before)["shards"]
    assert main(dump_args(model, docs, data) + ["--top-p", "0.9"]) == 1
    assert "different parameter 'top_p'" in capsys.readouterr().err


def test_trainer_never_touches_the_backbone(pipeline, tmp_path):
    """Train in a fresh interpreter where transformers cannot be imported and the model folder
    is gone: the dump must be self-contained."""
    root, model, docs, data = pipeline
    import shutil

    copy = tmp_path / "dump"
    shutil.copytree(data, copy)
    hidden_model = tmp_path / "model-gone"
    shutil.copytree(model, hidden_model)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model_path"] = str(tmp_path / "no-such-model")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from lsa_sglang.cli import main\n"
        f"rc = main(['train', '--data', {str(copy)!r}, '--out', {str(tmp_path / 'c.safetensors')!r}, '--epochs', '1'])\n"
        "assert 'transformers' not in sys.modules or sys.modules['transformers'] is None\n"
        "sys.exit(rc)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "c.safetensors").is_file()


def test_dumped_tensors_equal_an_independent_transformers_recomputation(tmp_path):
    """Hidden = input_layernorm(layer input); keys = the KV cache's post-RoPE keys averaged per
    chunk; votes = top-p of eager attention (head mean, chunk sums, no sink) counted over layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_model(tmp_path, "qwen2")
    docs = write_docs(tmp_path / "docs.jsonl", {"train": 1})
    data = tmp_path / "dump"
    assert main(dump_args(model_dir, docs, data)) == 0
    dump = load_dump(data)
    doc = dump.docs[0]
    params = dump.params
    text = json.loads(docs.read_text().splitlines()[0])["text"]
    ids = AutoTokenizer.from_pretrained(str(model_dir))(text).input_ids[:TOKENS]
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        out = m(torch.tensor([ids]), output_hidden_states=True, output_attentions=True, use_cache=True)
    T, N = len(ids), len(ids) // CS
    for i, layer in enumerate(params["target_layers"]):
        normed = m.model.layers[layer].input_layernorm(out.hidden_states[layer][0])
        assert torch.allclose(doc.hidden[:, i], normed[doc.positions], atol=1e-5)
        k = out.past_key_values.layers[layer].keys[0]  # [Hk, T, Dh], post-RoPE
        kc = k[:, : N * CS].reshape(k.shape[0], N, CS, -1)
        assert torch.allclose(doc.keys[:, i], kc.mean(2).transpose(0, 1), atol=1e-5)
        assert torch.allclose(doc.kmax[:, i], kc.amax(2).transpose(0, 1), atol=1e-5)
    # the untrained indexer's q is the backbone's own post-RoPE query (q bias included)
    init = load_indexer(dump.init_checkpoint, expected=dump.spec)
    assert init.spec.q_bias
    sink = torch.arange(-(-T // CS)) < params["sink_chunks"]
    from safetensors.torch import load_file

    votes = load_file(str(data / dump.manifest["shards"][0]["file"]))["votes"].long()  # [P, tau, N]
    for p in range(doc.num_samples):
        rows = int(doc.positions[p]) + torch.arange(TAU)
        count = torch.zeros(TAU, -(-T // CS), dtype=torch.long)
        for layer in params["vote_layers"]:
            att = out.attentions[layer][0].mean(0)[rows]  # [tau, T] eager softmax, head mean
            count += top_p_picks(chunk_mass(att, CS), params["top_p"], sink).long()
        assert torch.equal(votes[p], count[:, :N]), p
