"""Fast self-checks of tests/tiny_model.py and tests/reference.py (no llama.cpp needed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest

try:
    from .reference import reference_logits, rope_norm
    from .tiny_model import BOS_ID, BYTE_TOKEN_OFFSET, TinyModel, write_tiny_llama
except ImportError:
    from reference import reference_logits, rope_norm  # type: ignore[no-redef]
    from tiny_model import BOS_ID, BYTE_TOKEN_OFFSET, TinyModel, write_tiny_llama  # type: ignore[no-redef]

TOKENS = [1, 75, 104, 3, 200, 17, 258, 90, 44]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return write_tiny_llama(tmp_path_factory.mktemp("m") / "tiny.gguf", layer_order=[0, 0, 3, 1])


def _field(r: gguf.GGUFReader, key: str):
    return r.fields[key].contents()


def test_gguf_roundtrip(model: TinyModel) -> None:
    r = gguf.GGUFReader(model.path)
    assert _field(r, "general.architecture") == "llama"
    for key, want in [
        ("llama.block_count", 4), ("llama.context_length", 256), ("llama.embedding_length", 64),
        ("llama.feed_forward_length", 128), ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 2), ("llama.rope.dimension_count", 16),
        ("tokenizer.ggml.bos_token_id", 1), ("tokenizer.ggml.eos_token_id", 2),
    ]:
        assert _field(r, key) == want, key
    assert _field(r, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert r.fields["llama.layer_order"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert list(_field(r, "llama.layer_order")) == [0, 0, 3, 1]
    toks = _field(r, "tokenizer.ggml.tokens")
    assert len(toks) == model.n_vocab == len(_field(r, "tokenizer.ggml.token_type"))
    assert toks[BYTE_TOKEN_OFFSET + 0x0A] == "<0x0A>"

    t = {x.name: x for x in r.tensors}
    assert len(t) == 3 + 9 * model.n_layer
    ne = {  # llama.cpp create_tensor shapes (ne order)
        "token_embd.weight": [64, 272], "output.weight": [64, 272], "output_norm.weight": [64],
        "blk.2.attn_q.weight": [64, 64], "blk.2.attn_k.weight": [64, 32],
        "blk.2.attn_v.weight": [64, 32], "blk.2.attn_output.weight": [64, 64],
        "blk.2.ffn_gate.weight": [64, 128], "blk.2.ffn_up.weight": [64, 128],
        "blk.2.ffn_down.weight": [128, 64], "blk.2.attn_norm.weight": [64],
    }
    for name, shape in ne.items():
        assert list(t[name].shape) == shape, name
        assert t[name].tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(t["token_embd.weight"].data, model.token_embd)
    np.testing.assert_array_equal(t["blk.2.attn_k.weight"].data, model.layers[2].wk)
    np.testing.assert_array_equal(t["blk.3.ffn_down.weight"].data, model.layers[3].ffn_down)


def test_per_layer_ff(tmp_path: Path) -> None:
    m = write_tiny_llama(tmp_path / "ff.gguf", n_layer=3, per_layer_ff=[96, 128, 160], seed=3)
    r = gguf.GGUFReader(m.path)
    f = r.fields["llama.feed_forward_length"]
    assert f.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    assert list(f.contents()) == [96, 128, 160]
    assert "llama.layer_order" not in r.fields
    t = {x.name: x for x in r.tensors}
    assert list(t["blk.2.ffn_up.weight"].shape) == [64, 160]
    assert list(t["blk.0.ffn_down.weight"].shape) == [96, 64]
    assert reference_logits(m, TOKENS, [2, 0, 1, 2]).shape == (len(TOKENS), m.n_vocab)


def test_identity_order_equals_default(model: TinyModel) -> None:
    a = reference_logits(model, TOKENS)
    np.testing.assert_array_equal(a, reference_logits(model, TOKENS, [0, 1, 2, 3]))
    assert a.shape == (len(TOKENS), model.n_vocab) and np.isfinite(a).all()
    assert 0.3 < a.std() < 10  # activations are sane, logits O(1)


def test_order_matters(model: TinyModel) -> None:
    one = reference_logits(model, TOKENS, [0])
    assert np.abs(one - reference_logits(model, TOKENS, [0, 0])).max() > 0.1
    assert np.abs(reference_logits(model, TOKENS, [0, 1]) - reference_logits(model, TOKENS, [1, 0])).max() > 0.1
    empty = reference_logits(model, TOKENS, [])  # no blocks: output head on embeddings
    assert empty.shape == one.shape


def test_causal(model: TinyModel) -> None:
    full = reference_logits(model, TOKENS, [3, 1, 1])
    pre = reference_logits(model, TOKENS[:4], [3, 1, 1])
    np.testing.assert_allclose(full[:4], pre, rtol=1e-12, atol=1e-12)
    other = reference_logits(model, TOKENS[:4] + [5, 6, 7], [3, 1, 1])
    np.testing.assert_allclose(other[:4], pre, rtol=1e-12, atol=1e-12)


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=7)
    b = write_tiny_llama(tmp_path / "b.gguf", seed=7)
    c = write_tiny_llama(tmp_path / "c.gguf", seed=8)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert not np.array_equal(a.layers[0].wq, c.layers[0].wq)


def test_rope_norm_mode() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2, 8))
    pos = np.arange(5, dtype=np.float64)
    y = rope_norm(x, pos, 10000.0)
    np.testing.assert_array_equal(y[0], x[0])  # position 0 is the identity
    # NORM mode == complex multiply of adjacent pairs by exp(i * pos * base^(-2j/d))
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * pos[:, None, None] * 10000.0 ** (-np.arange(4) / 4))
    np.testing.assert_allclose(y[..., 0::2], z.real, atol=1e-12)
    np.testing.assert_allclose(y[..., 1::2], z.imag, atol=1e-12)
    # relative-position property: <rope(q, p), rope(k, p')> depends on p - p' only
    q, k = rng.standard_normal((1, 1, 8)), rng.standard_normal((1, 1, 8))
    d1 = np.sum(rope_norm(q, np.array([3.0]), 1e4) * rope_norm(k, np.array([1.0]), 1e4))
    d2 = np.sum(rope_norm(q, np.array([7.0]), 1e4) * rope_norm(k, np.array([5.0]), 1e4))
    assert d1 == pytest.approx(d2, abs=1e-12)


def test_gqa_head_mapping(model: TinyModel) -> None:
    """n_head_kv=2 equals n_head_kv=4 with each kv head duplicated for q heads 2g, 2g+1."""
    hd, rep = model.head_dim, model.n_head // model.n_head_kv

    def expand(w: np.ndarray) -> np.ndarray:
        return np.repeat(w.reshape(model.n_head_kv, hd, -1), rep, axis=0).reshape(model.n_head * hd, -1)

    layers = [dataclasses.replace(L, wk=expand(L.wk), wv=expand(L.wv)) for L in model.layers]
    mha = dataclasses.replace(model, n_head_kv=model.n_head, layers=layers)
    np.testing.assert_allclose(reference_logits(mha, TOKENS), reference_logits(model, TOKENS), atol=1e-10)


def test_f16_attn_is_close(model: TinyModel) -> None:
    a = reference_logits(model, TOKENS)
    b = reference_logits(model, TOKENS, f16_attn=True)
    assert 0 < np.abs(a - b).max() < 0.05


def test_text_to_ids() -> None:
    assert TinyModel.text_to_ids("A\n") == [BOS_ID, BYTE_TOKEN_OFFSET + 65, BYTE_TOKEN_OFFSET + 10]
    assert TinyModel.text_to_ids("", add_bos=False) == []
    # what stock llama.cpp's llama_tokenize returns for this vocab (space -> U+2581 bytes)
    assert TinyModel.text_to_ids("Hi there\n") == [1, 75, 108, 229, 153, 132, 119, 107, 104, 117, 104, 13]
