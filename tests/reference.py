"""NumPy reference forward pass matching llama.cpp's LLM_ARCH_LLAMA graph.

Mirrors src/models/llama.cpp: x = tok_embd[ids]; per block
  h = x + Wo @ attn(rope(Wq @ rms(x)*g1), rope(Wk @ rms(x)*g1), Wv @ rms(x)*g1)
  x = h + Wdown @ (silu(Wgate @ rms(h)*g2) * (Wup @ rms(h)*g2))
then logits = Wout @ (rms(x) * g_out).  rms(x) = x / sqrt(mean(x^2) + eps)
(ggml_rms_norm), rope is ggml NORM mode (adjacent pairs, theta_i = pos *
base^(-2i/head_dim)), softmax(q.k / sqrt(head_dim) + causal mask), and q head
h reads kv head h // (n_head // n_head_kv) (ggml mul_mat broadcasting).
Computed in float64.

Checked against stock libllama (CPU, n_threads=1): max |logit diff| ~1e-6 with
type_k=type_v=F32 and flash attention disabled; ~1e-6..7e-5 vs f16_attn=True with
F16 KV cache and FA disabled; ~2.5e-3 with F16 KV + flash attention (the default).
"""

from __future__ import annotations

import numpy as np

from frankenllama.program import EMBEDDINGS, LayerProgram

try:  # works both as tests.reference and as top-level module
    from .tiny_model import LayerWeights, TinyModel
except ImportError:
    from tiny_model import LayerWeights, TinyModel  # type: ignore[no-redef]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """ggml_rms_norm followed by the elementwise weight (build_norm LLM_NORM_RMS)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_norm(x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
    """GGML_ROPE_TYPE_NORMAL on x [n_tok, n_heads, head_dim]: rotate (x[2i], x[2i+1])."""
    d = x.shape[-1]
    theta = pos[:, None] * base ** (-np.arange(0, d, 2) / d)  # [n_tok, d/2]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def block(m: TinyModel, L: LayerWeights, x: np.ndarray, f16_attn: bool, rope: bool = True) -> np.ndarray:
    """One llama decoder block on the residual stream x [n_tok, n_embd] (rope=False: a NoPE layer)."""
    T, hd = x.shape[0], m.head_dim
    f16 = (lambda a: a.astype(np.float16).astype(np.float64)) if f16_attn else (lambda a: a)
    h = rms_norm(x, L.attn_norm, m.rms_eps)
    pos = np.arange(T, dtype=np.float64)
    q = (h @ L.wq.T).reshape(T, m.n_head, hd)
    k = (h @ L.wk.T).reshape(T, m.n_head_kv, hd)
    if rope:
        q, k = rope_norm(q, pos, m.rope_freq_base), rope_norm(k, pos, m.rope_freq_base)
    v = (h @ L.wv.T).reshape(T, m.n_head_kv, hd)
    rep = m.n_head // m.n_head_kv  # GQA: q head j uses kv head j // rep
    k, v = np.repeat(f16(k), rep, axis=1), np.repeat(f16(v), rep, axis=1)
    att = np.einsum("qhd,khd->hqk", f16(q), k) / np.sqrt(hd)
    att = att + np.triu(np.full((T, T), -np.inf), k=1)  # causal mask
    att = np.exp(att - att.max(axis=-1, keepdims=True))
    att = f16(att / att.sum(axis=-1, keepdims=True))
    y = np.einsum("hqk,khd->qhd", att, v).reshape(T, m.n_head * hd)
    x = x + y @ L.wo.T
    h = rms_norm(x, L.ffn_norm, m.rms_eps)
    g, u = h @ L.ffn_gate.T, h @ L.ffn_up.T
    return x + (g / (1.0 + np.exp(-g)) * u) @ L.ffn_down.T  # SwiGLU (LLM_FFN_SILU, PAR)


def reference_logits(
    model: TinyModel,
    tokens: list[int],
    layer_order: list[int] | None = None,
    *,
    f16_attn: bool = False,
    nope_layers: frozenset[int] | set[int] = frozenset(),
) -> np.ndarray:
    """Logits [n_tokens, n_vocab] (float64) for `tokens` at positions 0..n-1.

    Execution position p runs weight layer layer_order[p] (default: 0..n_layer-1);
    a repeated layer is simply recomputed with its own K/V.  f16_attn=True rounds
    Q, K, V and the softmax probabilities to float16, approximating llama.cpp's
    default F16 KV cache on the non-flash CPU path (mul_mat converts src1 to F16).
    Weight layers in nope_layers run without RoPE (smollm3 and llama4 have such layers).
    """
    m = model
    if isinstance(layer_order, LayerProgram):
        return program_logits(m, tokens, layer_order, f16_attn=f16_attn, nope_layers=nope_layers)
    order = list(range(m.n_layer)) if layer_order is None else list(layer_order)
    x = m.token_embd[np.asarray(tokens)].astype(np.float64)
    for il in order:
        x = block(m, m.layers[il], x, f16_attn, rope=il not in nope_layers)
    return rms_norm(x, m.output_norm, m.rms_eps) @ m.output.T.astype(np.float64)


def program_logits(model: TinyModel, tokens: list[int], program: LayerProgram, *, f16_attn: bool = False,
                   nope_layers: frozenset[int] | set[int] = frozenset()) -> np.ndarray:
    """Logits of a layer program: position p reads the weighted sum of its input terms (earlier
    positions' outputs, ``EMBEDDINGS``), runs its weight layer F and outputs h + s*(F(h) - h)
    (h itself for s = 0, F(h) for s = 1); the output stream is the program's output sum."""
    m = model
    embeddings = m.token_embd[np.asarray(tokens)].astype(np.float64)
    outputs: dict[int, np.ndarray] = {}

    def stream(combo) -> np.ndarray:
        return sum(w * (embeddings if src == EMBEDDINGS else outputs[src]) for src, w in combo)

    for p, il in enumerate(program.order):
        h = stream(program.input_of(p))
        s = program.scales[p]
        y = h if s == 0 else block(m, m.layers[il], h, f16_attn, rope=il not in nope_layers)
        outputs[p] = y if s == 1 else h + s * (y - h)
    x = stream(program.output_combo())
    return rms_norm(x, m.output_norm, m.rms_eps) @ m.output.T.astype(np.float64)


def shared_kv_decode_logits(model: TinyModel, tokens: list[int], layer_order: list[int]) -> np.ndarray:
    """Token-by-token decoding as it goes wrong when positions that run the same weight layer share
    ONE K/V cache (the bug of earlier layer-loop attempts): a later occurrence overwrites the K/V an
    earlier occurrence wrote, and the earlier one then attends to the overwritten entries.

    Used only to show that the per-position tests can tell the two apart."""
    m, hd = model, model.head_dim
    rep = m.n_head // m.n_head_kv
    cache_k = {il: np.zeros((len(tokens), m.n_head_kv, hd)) for il in set(layer_order)}
    cache_v = {il: np.zeros((len(tokens), m.n_head_kv, hd)) for il in set(layer_order)}
    rows = []
    for t, tok in enumerate(tokens):
        x = m.token_embd[tok][None, :].astype(np.float64)
        pos = np.array([float(t)])
        for il in layer_order:
            L = m.layers[il]
            h = rms_norm(x, L.attn_norm, m.rms_eps)
            q = rope_norm((h @ L.wq.T).reshape(1, m.n_head, hd), pos, m.rope_freq_base)
            cache_k[il][t] = rope_norm((h @ L.wk.T).reshape(1, m.n_head_kv, hd), pos, m.rope_freq_base)[0]
            cache_v[il][t] = (h @ L.wv.T).reshape(1, m.n_head_kv, hd)[0]
            k = np.repeat(cache_k[il][: t + 1], rep, axis=1)
            v = np.repeat(cache_v[il][: t + 1], rep, axis=1)
            att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
            att = np.exp(att - att.max(axis=-1, keepdims=True))
            att = att / att.sum(axis=-1, keepdims=True)
            x = x + np.einsum("hqk,khd->qhd", att, v).reshape(1, m.n_head * hd) @ L.wo.T
            h = rms_norm(x, L.ffn_norm, m.rms_eps)
            g, u = h @ L.ffn_gate.T, h @ L.ffn_up.T
            x = x + (g / (1.0 + np.exp(-g)) * u) @ L.ffn_down.T
        rows.append(rms_norm(x, m.output_norm, m.rms_eps) @ m.output.T.astype(np.float64))
    return np.concatenate(rows)
