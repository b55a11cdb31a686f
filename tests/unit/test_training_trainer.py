"""Trainer: overfits a tiny learnable dump, is deterministic and resumable, scores what the server
scores, and fails clearly on corrupt or mismatched data and checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lsa_sglang.indexer import IndexerCheckpointError, IndexerSpec, NeuralMemoryIndexer, load_indexer, save_indexer
from lsa_sglang.training.data import load_dump
from lsa_sglang.training.dump import (
    INIT_CKPT,
    MANIFEST,
    DumpError,
    DumpParams,
    new_manifest,
    write_json_atomic,
    write_shard,
)
from lsa_sglang.training.scoring import indexer_logits
from lsa_sglang.training.trainer import TrainConfig, TrainError, sample_weights, train, validate

D, H, HK, DH, CS, TAU = 16, 2, 1, 8, 8, 8
HF = {"model_type": "llama", "hidden_size": D, "num_hidden_layers": 2, "num_attention_heads": H,
      "num_key_value_heads": HK, "head_dim": DH, "rope_theta": 10000.0, "vocab_size": 100}


def make_dump(root: Path, n_docs: int = 3, seed: int = 0, rotary: int = 0) -> Path:
    """A dump whose labels a linear query can learn: chunk c is positive for sample x when
    (A x) . key_c > 0.8 (A is hidden from the indexer, which starts from a random q projection)."""
    from lsa_sglang.indexer.checkpoint import config_hash

    g = torch.Generator().manual_seed(seed)
    spec = IndexerSpec(model_id="tiny", config_hash=config_hash(HF), target_layers=(1,), hidden_size=D, rank=D,
                       num_heads=H, head_dim=DH, num_kv_heads=HK, rope_theta=10000.0, rotary_dim=rotary,
                       chunk_size=CS, tau=TAU, threshold=0.5, prenormed=True)
    params = DumpParams(docs="synthetic", counts=None, doc_tokens=256, positions=12, min_position=64,
                        chunk_size=CS, tau=TAU, votes=1, vote_layers=(1,), target_layers=(1,), sink_chunks=1,
                        recent_chunks=2)
    root.mkdir(parents=True, exist_ok=True)
    init = NeuralMemoryIndexer.from_backbone(spec, [torch.randn(H * DH, D, generator=g) * 0.3])
    save_indexer(init, root / INIT_CKPT, training={"kind": "untrained-init"})
    manifest = new_manifest("tiny", "/nonexistent", HF, params, init.spec.to_dict())
    A = torch.randn(DH, D, generator=torch.Generator().manual_seed(99))
    for i in range(n_docs):
        N, P = 32, 12
        keys = torch.randn(N, 1, HK, DH, generator=g)
        hidden = torch.randn(P, 1, D, generator=g)
        pos = torch.randint(96, 256 - TAU, (P,), generator=g)
        ncomp = pos // CS
        score = torch.einsum("pd,nd->pn", hidden[:, 0] @ A.T, keys[:, 0, 0])
        labels = (score > 0.8) & (torch.arange(N)[None] < ncomp[:, None])
        votes = labels[:, None, :].expand(P, TAU, N).to(torch.uint8)
        split = "val" if i == n_docs - 1 else "train"
        tensors = {"hidden": hidden, "positions": pos, "n_complete": ncomp, "keys": keys, "kmin": keys - 1,
                   "kmax": keys + 1, "labels": labels, "votes": votes, "mass": score.clamp(min=0)}
        manifest["shards"].append(write_shard(root, i, f"doc{i}", split, tensors, 1, 2))
    manifest["complete"] = True
    write_json_atomic(root / MANIFEST, manifest)
    return root


CFG = TrainConfig(epochs=25, batch_size=8, lr=3e-2, q_lr=3e-2, anchor=0.0, budget=8, neg_ratio=3, seed=3,
                  operating_beta=0.0)


def test_trainer_overfits_a_tiny_dataset(tmp_path):
    data = make_dump(tmp_path / "d")
    dump = load_dump(data, splits=("train",))
    before = validate(load_indexer(data / INIT_CKPT, expected=dump.spec), dump.docs, CFG, 0.5)
    res = train(data, tmp_path / "ck.safetensors", CFG, log=False)
    after = validate(load_indexer(tmp_path / "ck.safetensors", expected=dump.spec), dump.docs, CFG, 0.5)
    assert after["auc"] > 0.95 and after["auc"] > before["auc"] + 0.2
    assert after["f1@thr"] > 0.8
    assert res["history"][-1]["loss"] < res["history"][0]["loss"] / 2


def test_training_is_deterministic_and_resumes_to_the_same_result(tmp_path, monkeypatch):
    data = make_dump(tmp_path / "d")
    cfg = dataclasses.replace(CFG, epochs=4)
    train(data, tmp_path / "a.safetensors", cfg, state=tmp_path / "sa.pt", log=False)
    train(data, tmp_path / "b.safetensors", cfg, state=tmp_path / "sb.pt", log=False)
    import lsa_sglang.training.trainer as tr

    calls = {"n": 0}
    real = tr.validate

    def dying(*a, **k):  # the run dies after epoch 2's state is saved (validate: init + 1 per epoch)
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "validate", dying)
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "c.safetensors", cfg, state=tmp_path / "sc.pt", log=False)
    monkeypatch.setattr(tr, "validate", real)
    assert torch.load(tmp_path / "sc.pt", weights_only=False)["epoch"] == 2
    train(data, tmp_path / "c.safetensors", cfg, state=tmp_path / "sc.pt", log=False)
    from safetensors.torch import load_file

    a, b, c = (load_file(str(tmp_path / f"{x}.safetensors")) for x in "abc")
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k


def test_resume_refuses_another_config(tmp_path):
    data = make_dump(tmp_path / "d")
    train(data, tmp_path / "a.safetensors", dataclasses.replace(CFG, epochs=1), state=tmp_path / "s.pt", log=False)
    with pytest.raises(TrainError, match="another dump or config"):
        train(data, tmp_path / "a.safetensors", dataclasses.replace(CFG, epochs=1, lr=1.0), state=tmp_path / "s.pt",
              log=False)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(TrainError, match="unreadable training state"):
        train(data, tmp_path / "a.safetensors", CFG, state=tmp_path / "bad.pt", log=False)


@pytest.mark.parametrize("rotary", [0, 8])
def test_training_logits_without_leak_are_the_servers(tmp_path, rotary):
    data = make_dump(tmp_path / "d", rotary=rotary)
    dump = load_dump(data)
    model = load_indexer(dump.init_checkpoint, expected=dump.spec)
    doc = dump.docs[0]
    got = indexer_logits(model, doc)
    for p in range(doc.num_samples):  # the manager's _score, one request at a time
        q, w = model(doc.hidden[p][None], doc.positions[p : p + 1])
        want = model.layer_logits(q, w, doc.keys)[0]
        assert torch.allclose(got[p], want, atol=1e-5)
    leaky = indexer_logits(model, doc, leak=0.1)
    assert not torch.allclose(leaky, got)


def test_negative_sampling_counts_and_hard_negatives():
    cfg = TrainConfig(neg_ratio=2, hard_fraction=0.5, pos_weight=3.0)
    z = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
    labels = torch.tensor([[False, False, True, False, False, False, False, True]])
    cand = torch.ones(1, 8, dtype=torch.bool)
    w = sample_weights(z, labels, cand, cfg, torch.Generator().manual_seed(0))
    assert w[0, 2] == 3.0 and w[0, 7] == 3.0  # positives
    chosen = ((w[0] == 1.0) & ~labels[0]).nonzero().flatten().tolist()
    assert len(chosen) == 4 and 0 in chosen and 1 in chosen  # 2 hardest negatives + 2 random ones
    none = sample_weights(z, torch.zeros_like(labels), cand, cfg, torch.Generator())
    assert int((none > 0).sum()) == 2  # no positives: still neg_ratio negatives


def _rewrite(path: Path, fn) -> None:
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_corrupt_and_mismatched_data_give_clear_errors(tmp_path):
    data = make_dump(tmp_path / "d")
    with pytest.raises(DumpError, match="dump directory not found"):
        load_dump(tmp_path / "nope")
    with pytest.raises(DumpError, match="no manifest.json"):
        load_dump(tmp_path)
    shard = data / "shard-00000.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DumpError, match="shard-00000.safetensors: has .* bytes, the manifest says"):
        load_dump(data)
    mid = len(raw) - 200
    shard.write_bytes(raw[:mid] + bytes(b ^ 0xFF for b in raw[mid : mid + 8]) + raw[mid + 8 :])
    with pytest.raises(DumpError, match="sha256 differs"):
        load_dump(data)
    shard.write_bytes(raw)
    _rewrite(data / MANIFEST, lambda m: m.update(format_version=99))
    with pytest.raises(DumpError, match="format_version"):
        load_dump(data)
    _rewrite(data / MANIFEST, lambda m: m.update(format_version=1, config_hash="0" * 16))
    with pytest.raises(DumpError, match="names another model"):
        load_dump(data)
    (data / MANIFEST).write_text("{not json")
    with pytest.raises(DumpError, match="not a readable manifest"):
        load_dump(data)


def test_shard_with_wrong_shapes_or_labels_is_refused(tmp_path):
    data = make_dump(tmp_path / "d", n_docs=2)
    m = json.loads((data / MANIFEST).read_text())
    from safetensors.torch import load_file

    t = load_file(str(data / "shard-00000.safetensors"))
    bad = dict(t, hidden=t["hidden"][:, :, :-1])
    m["shards"][0] = write_shard(data, 0, "doc0", "train", bad, 1, 2)
    write_json_atomic(data / MANIFEST, m)
    with pytest.raises(DumpError, match=r"tensor 'hidden' has shape \[12, 1, 15\], expected \[12, 1, 16\]"):
        load_dump(data)
    bad = dict(t, labels=t["labels"].to(torch.uint8) * 2)
    m["shards"][0] = write_shard(data, 0, "doc0", "train", bad, 1, 2)
    write_json_atomic(data / MANIFEST, m)
    with pytest.raises(DumpError, match="only 0 and 1"):
        load_dump(data)


def test_mismatched_init_checkpoint_and_empty_train_split(tmp_path):
    data = make_dump(tmp_path / "d")
    spec = load_dump(data).spec
    other = NeuralMemoryIndexer.from_backbone(dataclasses.replace(spec, target_layers=(0,)), [torch.zeros(H * DH, D)])
    save_indexer(other, data / INIT_CKPT)
    with pytest.raises(IndexerCheckpointError, match="target_layers"):
        train(data, tmp_path / "x.safetensors", CFG, log=False)
    data2 = make_dump(tmp_path / "d2", n_docs=1)  # its only document is the val one
    with pytest.raises(TrainError, match="no training samples"):
        train(data2, tmp_path / "x.safetensors", CFG, log=False)


def test_listwise_loss_known_values():
    from lsa_sglang.training.trainer import listwise_loss

    z = torch.tensor([[2.0, 0.0, 0.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    labels = torch.tensor([[True, False, False, False], [False, False, False, False]])
    cand = torch.tensor([[True, True, True, False], [True, True, True, True]])  # chunk 3 is not a candidate
    got = listwise_loss(z, labels, cand)
    want = -torch.log(torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 2))
    assert torch.allclose(got, torch.stack([want, torch.tensor(0.0)]), atol=1e-6)


def test_calibrate_lifts_dead_dots_and_puts_the_threshold_at_the_positive_rate():
    """Keys share one direction and the queries point away from it, so every dot is negative
    and the untrained scores are all exactly 0.5; calibration must undo both."""
    from lsa_sglang.training.data import DocData
    from lsa_sglang.training.scoring import indexer_scores
    from lsa_sglang.training.trainer import calibrate, with_q_bias

    g = torch.Generator().manual_seed(0)
    spec = IndexerSpec(model_id="t", config_hash="0" * 16, target_layers=(0, 1), hidden_size=D, rank=D,
                       num_heads=H, head_dim=DH, num_kv_heads=HK, rope_theta=10000.0, rotary_dim=0,
                       chunk_size=CS, tau=TAU, threshold=0.5, prenormed=True)
    common = torch.randn(DH, generator=g) * 3
    wq = [-(common[None, :].repeat(H, 1).reshape(H * DH, 1) * torch.ones(1, D) / D)
          + 0.05 * torch.randn(H * DH, D, generator=g) for _ in range(2)]
    model = with_q_bias(NeuralMemoryIndexer.from_backbone(spec, wq))
    docs = []
    for _ in range(3):
        P, N = 10, 24
        keys = common + 0.3 * torch.randn(N, 2, HK, DH, generator=g)
        pos = torch.randint(N * CS // 2, N * CS, (P,), generator=g)
        hidden = torch.randn(P, 2, D, generator=g).abs()
        labels = torch.rand(P, N, generator=g) < 0.2
        ncomp = pos // CS
        from lsa_sglang.training.labels import candidate_mask

        docs.append(DocData("d", "train", hidden, pos, ncomp, keys, keys, keys, labels, torch.zeros(P, N),
                            candidate_mask(ncomp, N, 1, 2)))
    before, _ = indexer_scores(model, docs[0], "max")
    assert torch.all(before[docs[0].candidates] == 0.5)
    calibrate(model, docs)
    rate = float(torch.cat([d.labels[d.candidates] for d in docs]).float().mean())
    _, per_layer = indexer_scores(model, docs[0], "max")
    for layer in range(2):
        kept = torch.cat([indexer_scores(model, d, "max")[1][:, layer][d.candidates] for d in docs]) > 0.5
        assert abs(float(kept.float().mean()) - rate) < 0.05
    assert per_layer[:, 0][docs[0].candidates].std() > 0  # scores carry a ranking again


def test_unrotating_keys_is_the_adjoint_of_rotating_queries():
    """calibrate() solves for a pre-RoPE q bias against keys turned back by -t."""
    from lsa_sglang.indexer.model import rope_neox

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    t = torch.tensor([0, 3, 17, 200, 4000])
    lhs = (rope_neox(q, t, 16, 1e4) * k).sum(-1)
    rhs = (q * rope_neox(k, -t, 16, 1e4)).sum(-1)
    assert torch.allclose(lhs, rhs, atol=1e-4)


def test_operating_point_trades_precision_for_recall_with_beta(tmp_path):
    from lsa_sglang.training.trainer import f_beta, tune_operating_point

    data = make_dump(tmp_path / "d")
    dump = load_dump(data)
    keep = {}
    for beta in (0.5, 3.0):
        model = load_indexer(dump.init_checkpoint, expected=dump.spec)
        cfg = dataclasses.replace(CFG, operating_beta=beta)
        shift = tune_operating_point(model, dump.docs, cfg, 0.5)
        v = validate(model, dump.docs, cfg, 0.5)
        keep[beta] = v["keep_ratio"]
        for other in (shift - 0.25, shift + 0.25):  # no neighbour on the grid does better
            m2 = load_indexer(dump.init_checkpoint, expected=dump.spec)
            with torch.no_grad():
                m2.layer_bias += other
            v2 = validate(m2, dump.docs, cfg, 0.5)
            assert f_beta(v2["served_precision"], v2["served_recall"], beta) <= \
                f_beta(v["served_precision"], v["served_recall"], beta) + 1e-9
    assert keep[3.0] > keep[0.5]
    assert f_beta(0.5, 0.5, 2.0) == pytest.approx(0.5) and f_beta(0.0, 0.0, 1.0) == 0.0
