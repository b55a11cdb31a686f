"""Neural Memory Indexer: untrained default equals the backbone's q, scoring, keys, checkpoints."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lsa_sglang.indexer.checkpoint import (
    CHECKED_FIELDS,
    IndexerCheckpointError,
    config_hash,
    load_indexer,
    read_metadata,
    save_indexer,
    spec_from_hf_config,
)
from lsa_sglang.indexer.model import (
    IndexerSpec,
    NeuralMemoryIndexer,
    chunk_keys_from_pages,
    page_minmax,
    quest_scores,
    rope_neox,
)

D, H, HK, DH = 32, 4, 2, 8


def make_spec(**kw) -> IndexerSpec:
    base = dict(
        model_id="tiny/llama",
        config_hash="0123456789abcdef",
        target_layers=(1, 3),
        hidden_size=D,
        rank=D,
        num_heads=H,
        head_dim=DH,
        num_kv_heads=HK,
        rope_theta=10000.0,
        rotary_dim=DH,
        chunk_size=16,
        tau=64,
        threshold=0.5,
    )
    base.update(kw)
    return IndexerSpec(**base)


def rope_complex(x: torch.Tensor, pos: int, rotary_dim: int, theta: float) -> torch.Tensor:
    """Independent neox RoPE: pair dim i with i + rd/2 as one complex number, float64."""
    x = x.double()
    half = rotary_dim // 2
    i = torch.arange(half, dtype=torch.float64)
    rot = torch.exp(1j * pos * theta ** (-2.0 * i / rotary_dim))
    z = torch.complex(x[..., :half], x[..., half:rotary_dim]) * rot
    return torch.cat([z.real, z.imag, x[..., rotary_dim:]], dim=-1)


def backbone_weights(seed: int, layers: int = 2, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(H * DH, D, generator=g) * D**-0.5 for _ in range(layers)]
    bs = [torch.randn(H * DH, generator=g) * 0.1 for _ in range(layers)] if bias else None
    return ws, bs


# -- untrained default ------------------------------------------------------------------------
@pytest.mark.parametrize("rotary_dim", [DH, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_untrained_q_equals_backbone_query(rotary_dim: int, bias: bool) -> None:
    spec = make_spec(rotary_dim=rotary_dim, rope_theta=1e5)
    ws, bs = backbone_weights(0, bias=bias)
    model = NeuralMemoryIndexer.from_backbone(spec, ws, bs)
    assert model.spec.prenormed and model.spec.q_bias == bias
    x = torch.randn(4, 2, D, generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([0, 7, 1000, 5000])
    q, w = model(x, positions)
    assert q.shape == (4, 2, H, DH) and w.shape == (4, 2, H)
    for b in range(4):
        for layer in range(2):
            ref = x[b, layer].double() @ ws[layer].double().T
            if bias:
                ref = ref + bs[layer].double()
            ref = rope_complex(ref.view(H, DH), int(positions[b]), rotary_dim, 1e5)
            torch.testing.assert_close(q[b, layer].double(), ref, atol=3e-3, rtol=1e-4)
    # uniform positive head weights -> every score >= 0.5 (the default ranks, it does not threshold)
    torch.testing.assert_close(w, torch.full_like(w, (DH * H) ** -0.5))
    keys = torch.randn(9, 2, HK, DH)
    assert bool((model.scores(x, positions, keys) >= 0.5).all())


def test_from_backbone_rejects_bad_shapes() -> None:
    ws, _ = backbone_weights(0)
    with pytest.raises(ValueError, match="rank"):
        NeuralMemoryIndexer.from_backbone(make_spec(rank=16), ws)
    with pytest.raises(ValueError, match="one per target layer"):
        NeuralMemoryIndexer.from_backbone(make_spec(), ws[:1])
    with pytest.raises(ValueError, match="expected shape"):
        NeuralMemoryIndexer.from_backbone(make_spec(), [w[:, :-1] for w in ws])


def test_rope_is_relative_and_identity_at_zero() -> None:
    q, k = torch.randn(1, H, DH, dtype=torch.float64), torch.randn(1, H, DH, dtype=torch.float64)

    def dot(m: int, n: int) -> torch.Tensor:
        return (rope_neox(q, torch.tensor([m]), DH, 1e4) * rope_neox(k, torch.tensor([n]), DH, 1e4)).sum(-1)

    torch.testing.assert_close(dot(10, 3), dot(110, 103), atol=1e-5, rtol=1e-5)  # fp32 angles, like the backbone
    torch.testing.assert_close(rope_neox(q, torch.tensor([0]), DH, 1e4), q)


def test_rmsnorm_applies_when_not_prenormed() -> None:
    spec = make_spec(rank=12, rotary_dim=0)
    model = NeuralMemoryIndexer(spec)
    with torch.no_grad():
        model.q_norm.uniform_(0.5, 1.5)
    x = torch.randn(3, 2, D)
    q, _ = model(x, torch.zeros(3, dtype=torch.long))
    for layer in range(2):
        a = x[:, layer] @ model.wq_a[layer].T
        a = a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + spec.rms_eps) * model.q_norm[layer]
        ref = (a @ model.wq_b[layer].T).view(3, H, DH)
        torch.testing.assert_close(q[:, layer], ref, atol=1e-5, rtol=1e-5)


# -- scoring ------------------------------------------------------------------------------------
def trained_like(seed: int = 0) -> NeuralMemoryIndexer:
    torch.manual_seed(seed)
    model = NeuralMemoryIndexer(make_spec(q_bias=True))
    with torch.no_grad():
        model.layer_bias.copy_(torch.tensor([-0.7, 0.4]))
        model.weights_proj_bias.normal_()
        model.wq_b_bias.normal_()
    return model


def test_layer_logits_match_explicit_loop() -> None:
    model = trained_like()
    x, pos = torch.randn(2, 2, D), torch.tensor([5, 40])
    keys = torch.randn(6, 2, HK, DH)
    with torch.no_grad():
        q, w = model(x, pos)
        logits = model.layer_logits(q, w, keys)
    assert logits.shape == (2, 2, 6)
    for b in range(2):
        for layer in range(2):
            for n in range(6):
                ref = sum(
                    float(w[b, layer, h]) * max(0.0, float(q[b, layer, h] @ keys[n, layer, h // (H // HK)]))
                    for h in range(H)
                ) + float(model.layer_bias[layer].detach())
                assert math.isclose(float(logits[b, layer, n]), ref, rel_tol=1e-4, abs_tol=1e-5)


def test_scores_in_unit_interval_and_ensembles() -> None:
    model = trained_like(1)
    x, pos, keys = torch.randn(3, 2, D) * 4, torch.tensor([0, 9, 99]), torch.randn(20, 2, HK, DH) * 4
    per_layer = torch.sigmoid(model.layer_logits(*model(x, pos), keys))
    s_max, s_mean = model.scores(x, pos, keys, "max"), model.scores(x, pos, keys, "mean")
    assert s_max.shape == (3, 20)
    for s in (s_max, s_mean):
        assert bool(((s >= 0) & (s <= 1)).all())
    torch.testing.assert_close(s_max, per_layer.amax(1))
    torch.testing.assert_close(s_mean, per_layer.mean(1))
    assert bool((s_mean <= s_max + 1e-7).all())
    with pytest.raises(ValueError, match="ensemble"):
        model.scores(x, pos, keys, "sum")


def test_gradients_reach_every_parameter() -> None:
    model = trained_like(2)
    with torch.no_grad():
        model.layer_bias.zero_()
    s = model.scores(torch.randn(4, 2, D), torch.arange(4), torch.randn(5, 2, HK, DH))
    s.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_input_shape_errors() -> None:
    model = trained_like()
    with pytest.raises(ValueError, match="hidden"):
        model(torch.randn(2, 3, D), torch.arange(2))
    with pytest.raises(ValueError, match="keys"):
        q, w = model(torch.randn(2, 2, D), torch.arange(2))
        model.layer_logits(q, w, torch.randn(5, 2, HK + 1, DH))


# -- frozen keys and the Quest bound ----------------------------------------------------------
def test_chunk_keys_are_the_mean_key_per_head() -> None:
    k = torch.randn(5, 16, HK, DH)
    keys = chunk_keys_from_pages(k)
    assert keys.shape == (5, HK, DH)
    torch.testing.assert_close(keys[3, 1], sum(k[3, t, 1] for t in range(16)) / 16)
    kmin, kmax = page_minmax(k)
    assert bool((kmin[:, None] <= k).all() and (k <= kmax[:, None]).all())
    assert bool((k.amin(1) == kmin).all())


def test_quest_bound_dominates_every_key_in_the_chunk() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        k = torch.randn(7, 16, HK, DH, generator=g) * 3
        q = torch.randn(H, DH, generator=g)
        kmin, kmax = page_minmax(k)
        bound = quest_scores(q, kmin, kmax)
        grp = torch.arange(H) // (H // HK)
        exact = torch.einsum("hd,nthd->nth", q, k[:, :, grp]).amax(dim=(1, 2))
        assert bool((bound >= exact - 1e-5).all())
    # one token per chunk: the bound is tight
    k1 = torch.randn(4, 1, HK, DH)
    kmin, kmax = page_minmax(k1)
    exact = torch.einsum("hd,nhd->nh", q, k1[:, 0, grp]).amax(-1)
    torch.testing.assert_close(quest_scores(q, kmin, kmax), exact)
    # an explicit head->group map is honoured (all heads on group 1)
    custom = quest_scores(q, kmin, kmax, torch.ones(H, dtype=torch.long))
    torch.testing.assert_close(custom, torch.einsum("hd,nd->nh", q, k1[:, 0, 1]).amax(-1))


# -- checkpoints --------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = trained_like(4)
    path = tmp_path / "idx.safetensors"
    save_indexer(model, path, training={"epochs": 5, "recall@256": 0.91})
    loaded = load_indexer(path, make_spec())  # expected spec: backbone-facing fields only
    assert loaded.spec == model.spec
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    meta = read_metadata(path)
    assert meta["format_version"] == 1 and meta["training"]["epochs"] == 5
    x, pos, keys = torch.randn(2, 2, D), torch.tensor([3, 4]), torch.randn(5, 2, HK, DH)
    torch.testing.assert_close(model.scores(x, pos, keys), loaded.scores(x, pos, keys))


def test_checkpoint_with_smaller_rank_loads(tmp_path: Path) -> None:
    path = tmp_path / "r8.safetensors"
    save_indexer(NeuralMemoryIndexer(make_spec(rank=8)), path)
    assert load_indexer(path, make_spec()).spec.rank == 8


MISMATCHES = {
    "model_id": "other/model",
    "config_hash": "ffffffffffffffff",
    "target_layers": (1, 2),
    "hidden_size": 64,
    "num_heads": 8,
    "head_dim": 16,
    "num_kv_heads": 1,
    "rotary_dim": 4,
    "rope_theta": 1e6,
    "chunk_size": 32,
}


def test_mismatch_table_covers_checked_fields() -> None:
    assert set(MISMATCHES) == set(CHECKED_FIELDS)


@pytest.mark.parametrize("field", sorted(MISMATCHES))
def test_checkpoint_mismatch_names_the_field(tmp_path: Path, field: str) -> None:
    path = tmp_path / "idx.safetensors"
    save_indexer(NeuralMemoryIndexer(make_spec()), path)
    expected = make_spec(**{field: MISMATCHES[field]})
    with pytest.raises(IndexerCheckpointError) as e:
        load_indexer(path, expected)
    msg = str(e.value)
    assert e.value.field == field and f"'{field}'" in msg and str(path) in msg
    assert repr(getattr(expected, field)) in msg and repr(getattr(make_spec(), field)) in msg
    assert "\n" not in msg


def expect_error(path: Path, field: str, text: str) -> IndexerCheckpointError:
    with pytest.raises(IndexerCheckpointError) as e:
        load_indexer(path, make_spec())
    assert e.value.field == field, str(e.value)
    assert text in str(e.value) and str(path) in str(e.value)
    return e.value


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.safetensors", "path", "not found")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    expect_error(garbage, "format", "not a safetensors file")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    expect_error(empty, "format", "not a safetensors file")
    expect_error(tmp_path, "path", "not a file")


def _tampered(tmp_path: Path, edit_tensors=None, edit_meta=None) -> Path:
    model = NeuralMemoryIndexer(make_spec(q_bias=True))
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    meta = {"format": "lsa-indexer", "format_version": 1, "spec": model.spec.to_dict(), "training": {}}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"lsa_indexer": json.dumps(meta)})
    return path


def test_missing_extra_and_misshapen_tensors(tmp_path: Path) -> None:
    expect_error(_tampered(tmp_path, edit_tensors=lambda t: t.pop("wq_b")), "wq_b", "missing")
    expect_error(_tampered(tmp_path, edit_tensors=lambda t: t.pop("wq_b_bias")), "wq_b_bias", "missing")
    expect_error(_tampered(tmp_path, edit_tensors=lambda t: t.update(junk=torch.zeros(1))), "junk", "unexpected")
    err = expect_error(
        _tampered(tmp_path, edit_tensors=lambda t: t.update(weights_proj=torch.zeros(2, H, D + 1))),
        "weights_proj",
        "shape",
    )
    assert f"[2, {H}, {D + 1}]" in str(err) and f"[2, {H}, {D}]" in str(err)


def test_bad_metadata(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    expect_error(plain, "format", "no 'lsa_indexer' metadata")
    expect_error(_tampered(tmp_path, edit_meta=lambda m: m.update(format_version=99)), "format_version", "99")
    expect_error(_tampered(tmp_path, edit_meta=lambda m: m["spec"].pop("head_dim")), "head_dim", "missing")
    expect_error(_tampered(tmp_path, edit_meta=lambda m: m["spec"].update(colour=1)), "colour", "unknown")


# -- backbone identity ------------------------------------------------------------------------
QWEN = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "rope_theta": 1000000.0,
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "torch_dtype": "bfloat16",
    "_name_or_path": "/some/where",
}


def test_config_hash_is_stable_and_architecture_only() -> None:
    h = config_hash(QWEN)
    assert len(h) == 16 and int(h, 16) >= 0
    assert config_hash(dict(reversed(list(QWEN.items())))) == h
    assert config_hash({**QWEN, "torch_dtype": "float32", "_name_or_path": "x"}) == h
    assert config_hash({**QWEN, "head_dim": 64}) == h  # the default head_dim, spelled out
    tf5 = {k: v for k, v in QWEN.items() if k != "rope_theta"}
    tf5["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    assert config_hash(tf5) == h  # transformers 5 moved rope_theta
    for field, value in (("hidden_size", 1024), ("num_hidden_layers", 23), ("num_key_value_heads", 14),
                         ("rope_theta", 1e4), ("vocab_size", 1), ("model_type", "llama")):
        assert config_hash({**QWEN, field: value}) != h, field


def test_spec_from_hf_config() -> None:
    spec = spec_from_hf_config(QWEN, "qwen", (6, 12), chunk_size=64, tau=64, threshold=0.5)
    assert (spec.hidden_size, spec.rank, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (896, 896, 14, 2, 64)
    assert spec.rotary_dim == 64 and spec.rope_theta == 1e6 and spec.config_hash == config_hash(QWEN)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="multiple"):
        make_spec(num_heads=3)
    with pytest.raises(ValueError, match="rotary_dim"):
        make_spec(rotary_dim=DH + 2)
    with pytest.raises(ValueError, match="target_layers"):
        make_spec(target_layers=())
    assert dataclasses.replace(make_spec(), target_layers=[2, 5]).target_layers == (2, 5)
