"""Tiny random float32 GGUFs for the architectures beyond llama that layer orders must support.

`write_tiny(arch, path, n_layer=4, seed=0)` writes a model that the pinned llama.cpp loads as
``arch``; tensor names, shapes and hyper-parameter keys follow the loaders in
``src/models/<arch>.cpp`` (``load_arch_hparams`` / ``load_arch_tensors``) of the pinned source.

* ``qwen2``   -- separate Q/K/V with biases, untied output.
* ``qwen3``   -- Q/K RMS norms, tied output (no ``output.weight``).
* ``gemma2``  -- post-attention and post-FFN norms, logit soft-capping, a 4-token sliding window
  on the default period-2 pattern (even layers sliding-window, odd layers full attention).
* ``phi3``    -- fused ``attn_qkv``, fused gate+up ``ffn_up`` (2 * n_ff rows).
* ``mamba``   -- pure recurrent (Mamba-1 selective SSM), d_inner = 2 * n_embd.
* ``jamba``   -- hybrid: per-layer ``attention.head_count_kv`` (0 = Mamba layer); odd layers are
  attention layers, even layers Mamba layers (with the dt/B/C norms Jamba has).
* ``smallthinker`` -- a MoE model that the patched llama.cpp refuses to re-order (its graph picks
  the layers without RoPE by layer index); used to test the refusal.

Shapes are small (n_embd 64, 4 heads of 16, 2 KV heads, n_ff 128, 272-token vocab); weights are
~N(0, 1/fan_in), norm weights ~1 + N(0, 0.1).  The tokenizer is the byte-level SPM vocab of
`tiny_model` (id 1 = BOS, byte b = id 3 + b).
"""
from __future__ import annotations

from pathlib import Path
import gguf
import numpy as np

from tiny_model import add_tokenizer, write_gguf

ARCHS = ("qwen2", "qwen3", "gemma2", "phi3", "mamba", "jamba")
#: an architecture whose non-identity orders the patched llama.cpp refuses
REFUSED_ARCH = "smallthinker"

N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF, N_VOCAB, N_CTX_TRAIN = 64, 4, 2, 16, 128, 272, 256
# Mamba: d_inner = 2 * n_embd (the only expansion llama.cpp supports), dt_rank = n_embd / 16
D_CONV, D_INNER, D_STATE, DT_RANK = 4, 2 * N_EMBD, 16, 4
SLIDING_WINDOW = 4
N_EXPERT, N_EXPERT_USED, N_FF_EXP = 4, 2, 32


def jamba_attention_layers(n_layer: int) -> list[int]:
    """Weight layers of the tiny Jamba that are attention layers (the others are Mamba layers)."""
    return [il for il in range(n_layer) if _jamba_is_attention(il)]


def _jamba_is_attention(il: int) -> bool:
    return il % 2 == 1


def gemma2_swa_layers(n_layer: int) -> list[int]:
    """Weight layers of the tiny Gemma 2 that use the sliding window (llama.cpp's period-2 default)."""
    return [il for il in range(n_layer) if il % 2 == 0]


class _Gen:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def lin(self, n_out: int, n_in: int) -> np.ndarray:
        """(n_out, n_in) matrix, y = W @ x; llama.cpp sees ne = {n_in, n_out}."""
        return (self.rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    def norm(self, n: int) -> np.ndarray:
        return (1.0 + 0.1 * self.rng.standard_normal(n)).astype(np.float32)

    def bias(self, n: int) -> np.ndarray:
        return (0.1 * self.rng.standard_normal(n)).astype(np.float32)

    def experts(self, n_out: int, n_in: int) -> np.ndarray:
        """(n_expert, n_out, n_in); llama.cpp sees ne = {n_in, n_out, n_expert}."""
        return (self.rng.standard_normal((N_EXPERT, n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)


Tensors = dict[str, np.ndarray]


def _attn_qkv(g: _Gen, t: Tensors, p: str, *, bias: bool = False) -> None:
    t[f"{p}.attn_q.weight"] = g.lin(N_HEAD * HEAD_DIM, N_EMBD)
    t[f"{p}.attn_k.weight"] = g.lin(N_HEAD_KV * HEAD_DIM, N_EMBD)
    t[f"{p}.attn_v.weight"] = g.lin(N_HEAD_KV * HEAD_DIM, N_EMBD)
    if bias:
        t[f"{p}.attn_q.bias"] = g.bias(N_HEAD * HEAD_DIM)
        t[f"{p}.attn_k.bias"] = g.bias(N_HEAD_KV * HEAD_DIM)
        t[f"{p}.attn_v.bias"] = g.bias(N_HEAD_KV * HEAD_DIM)
    t[f"{p}.attn_output.weight"] = g.lin(N_EMBD, N_HEAD * HEAD_DIM)


def _ffn(g: _Gen, t: Tensors, p: str) -> None:
    t[f"{p}.ffn_norm.weight"] = g.norm(N_EMBD)
    t[f"{p}.ffn_gate.weight"] = g.lin(N_FF, N_EMBD)
    t[f"{p}.ffn_up.weight"] = g.lin(N_FF, N_EMBD)
    t[f"{p}.ffn_down.weight"] = g.lin(N_EMBD, N_FF)


def _mamba(g: _Gen, t: Tensors, p: str, *, jamba: bool = False) -> None:
    t[f"{p}.ssm_in.weight"] = g.lin(2 * D_INNER, N_EMBD)
    t[f"{p}.ssm_conv1d.weight"] = (g.rng.standard_normal((D_INNER, D_CONV)) / np.sqrt(D_CONV)).astype(np.float32)
    t[f"{p}.ssm_conv1d.bias"] = g.bias(D_INNER)
    t[f"{p}.ssm_x.weight"] = g.lin(DT_RANK + 2 * D_STATE, D_INNER)
    t[f"{p}.ssm_dt.weight"] = g.lin(D_INNER, DT_RANK)
    # dt = softplus(... + bias) starts in [1e-3, 1e-1] as in Mamba's init
    dt = np.exp(g.rng.uniform(np.log(1e-3), np.log(1e-1), D_INNER))
    t[f"{p}.ssm_dt.bias"] = np.log(np.expm1(dt)).astype(np.float32)
    # A = -exp(A_log), A_log = log(1..d_state) (+ noise); the file stores A itself
    a = np.tile(np.arange(1, D_STATE + 1, dtype=np.float64), (D_INNER, 1))
    t[f"{p}.ssm_a"] = (-a * np.exp(0.1 * g.rng.standard_normal(a.shape))).astype(np.float32)
    t[f"{p}.ssm_d"] = g.norm(D_INNER)
    t[f"{p}.ssm_out.weight"] = g.lin(N_EMBD, D_INNER)
    if jamba:
        t[f"{p}.ssm_dt_norm.weight"] = g.norm(DT_RANK)
        t[f"{p}.ssm_b_norm.weight"] = g.norm(D_STATE)
        t[f"{p}.ssm_c_norm.weight"] = g.norm(D_STATE)


def _block(arch: str, g: _Gen, t: Tensors, il: int) -> None:
    p = f"blk.{il}"
    t[f"{p}.attn_norm.weight"] = g.norm(N_EMBD)
    if arch == "qwen2":
        _attn_qkv(g, t, p, bias=True)
        _ffn(g, t, p)
    elif arch == "qwen3":
        _attn_qkv(g, t, p)
        t[f"{p}.attn_q_norm.weight"] = g.norm(HEAD_DIM)
        t[f"{p}.attn_k_norm.weight"] = g.norm(HEAD_DIM)
        _ffn(g, t, p)
    elif arch == "gemma2":
        _attn_qkv(g, t, p)
        t[f"{p}.post_attention_norm.weight"] = g.norm(N_EMBD)
        _ffn(g, t, p)
        t[f"{p}.post_ffw_norm.weight"] = g.norm(N_EMBD)
    elif arch == "phi3":
        t[f"{p}.attn_qkv.weight"] = g.lin((N_HEAD + 2 * N_HEAD_KV) * HEAD_DIM, N_EMBD)
        t[f"{p}.attn_output.weight"] = g.lin(N_EMBD, N_HEAD * HEAD_DIM)
        t[f"{p}.ffn_norm.weight"] = g.norm(N_EMBD)
        t[f"{p}.ffn_up.weight"] = g.lin(2 * N_FF, N_EMBD)  # gate and up, fused
        t[f"{p}.ffn_down.weight"] = g.lin(N_EMBD, N_FF)
    elif arch == "mamba":
        _mamba(g, t, p)
    elif arch == "jamba":
        if _jamba_is_attention(il):
            _attn_qkv(g, t, p)
        else:
            _mamba(g, t, p, jamba=True)
        _ffn(g, t, p)
    elif arch == "smallthinker":
        _attn_qkv(g, t, p)
        t[f"{p}.ffn_norm.weight"] = g.norm(N_EMBD)
        t[f"{p}.ffn_gate_inp.weight"] = g.lin(N_EXPERT, N_EMBD)
        t[f"{p}.ffn_gate_exps.weight"] = g.experts(N_FF_EXP, N_EMBD)
        t[f"{p}.ffn_up_exps.weight"] = g.experts(N_FF_EXP, N_EMBD)
        t[f"{p}.ffn_down_exps.weight"] = g.experts(N_EMBD, N_FF_EXP)
    else:
        raise ValueError(f"no tiny generator for architecture {arch!r}")


# arch -> writes its hyper-parameters (beyond block_count, context and embedding length)
def _hparams(arch: str, w: gguf.GGUFWriter, n_layer: int) -> None:
    def key(name: str) -> str:
        return f"{arch}.{name}"

    attention = arch != "mamba"
    if attention:
        w.add_uint32(key("attention.head_count"), N_HEAD)
        if arch == "jamba":
            kv = [N_HEAD_KV if _jamba_is_attention(il) else 0 for il in range(n_layer)]
            w.add_array(key("attention.head_count_kv"), kv)
        else:
            w.add_uint32(key("attention.head_count_kv"), N_HEAD_KV)
        w.add_uint32(key("feed_forward_length"), N_FF)
    else:  # as convert_hf_to_gguf.py writes Mamba
        w.add_uint32(key("attention.head_count"), 0)
        w.add_uint32(key("feed_forward_length"), 0)
    w.add_float32(key("attention.layer_norm_rms_epsilon"), 1e-6 if arch == "gemma2" else 1e-5)
    if arch in ("qwen2", "qwen3", "gemma2", "phi3", "smallthinker"):
        w.add_float32(key("rope.freq_base"), 10000.0)
        w.add_uint32(key("rope.dimension_count"), HEAD_DIM)
    if arch in ("qwen3", "gemma2"):
        w.add_uint32(key("attention.key_length"), HEAD_DIM)
        w.add_uint32(key("attention.value_length"), HEAD_DIM)
    if arch == "gemma2":
        w.add_uint32(key("attention.sliding_window"), SLIDING_WINDOW)
        w.add_float32(key("attn_logit_softcapping"), 50.0)
        w.add_float32(key("final_logit_softcapping"), 30.0)
    if arch in ("mamba", "jamba"):
        w.add_uint32(key("ssm.conv_kernel"), D_CONV)
        w.add_uint32(key("ssm.inner_size"), D_INNER)
        w.add_uint32(key("ssm.state_size"), D_STATE)
        w.add_uint32(key("ssm.time_step_rank"), DT_RANK)
    if arch == "smallthinker":
        w.add_uint32(key("expert_count"), N_EXPERT)
        w.add_uint32(key("expert_used_count"), N_EXPERT_USED)
        w.add_uint32(key("expert_feed_forward_length"), N_FF_EXP)
        w.add_uint32(key("expert_gating_func"), 1)  # softmax


# architectures whose output projection is tied to token_embd (no output.weight in the file)
_TIED = {"qwen3", "gemma2"}


def write_tiny(arch: str, path: str | Path, n_layer: int = 4, seed: int = 0) -> Path:
    """Write a random float32 ``arch`` GGUF with ``n_layer`` blocks to ``path``; returns the path."""
    if arch not in ARCHS and arch != REFUSED_ARCH:
        raise ValueError(f"no tiny generator for architecture {arch!r}; have {ARCHS + (REFUSED_ARCH,)}")
    g = _Gen(seed)
    t: Tensors = {"token_embd.weight": g.rng.standard_normal((N_VOCAB, N_EMBD)).astype(np.float32)}
    for il in range(n_layer):
        _block(arch, g, t, il)
    t["output_norm.weight"] = g.norm(N_EMBD)
    if arch not in _TIED:
        t["output.weight"] = g.lin(N_VOCAB, N_EMBD)

    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("frankenllama-tiny")  # not the arch: "phi3" in the name switches on Phi-3 token attributes
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_block_count(n_layer)
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    _hparams(arch, w, n_layer)

    add_tokenizer(w, N_VOCAB)

    for name, arr in t.items():
        w.add_tensor(name, arr)
    write_gguf(w)
    return path

