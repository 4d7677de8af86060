"""Tiny random float32 llama-architecture GGUF fixtures.

`write_tiny_llama` writes a GGUF that stock llama.cpp loads as LLM_ARCH_LLAMA and
returns a `TinyModel` holding the very same weights as numpy arrays, for use by
`tests/reference.py`.

Conventions (must match llama.cpp):

* Every 2-D weight is stored as a numpy array of shape (n_out, n_in), so that
  y = W @ x.  gguf-py writes it row-major, which llama.cpp sees as
  ne = {n_in, n_out} -- exactly what `create_tensor` expects (e.g. token_embd
  (n_vocab, n_embd) -> ne {n_embd, n_vocab}).
* Q/K are NOT permuted (they are random anyway); llama.cpp uses NORM rope for
  LLM_ARCH_LLAMA, i.e. it rotates adjacent pairs (x[2i], x[2i+1]) of each head.
* Tokenizer: SentencePiece-style ("llama" model, LLAMA_VOCAB_TYPE_SPM) with
  id 0 = <unk>, 1 = <s> (BOS), 2 = </s> (EOS), ids 3..258 = byte tokens
  <0x00>..<0xFF>, and any further ids are <unused_N> padding.  Byte b has id
  `BYTE_TOKEN_OFFSET + b`.  See `TinyModel.text_to_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import gguf

ARCH = "llama"
N_SPECIAL = 3
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_TOKEN_OFFSET = N_SPECIAL
MIN_VOCAB = N_SPECIAL + 256
LAYER_ORDER_KEY = f"{ARCH}.layer_order"


@dataclass
class LayerWeights:
    """One decoder block; every matrix is (n_out, n_in), float32."""

    attn_norm: np.ndarray  # (n_embd,)
    wq: np.ndarray  # (n_head * head_dim, n_embd)
    wk: np.ndarray  # (n_head_kv * head_dim, n_embd)
    wv: np.ndarray  # (n_head_kv * head_dim, n_embd)
    wo: np.ndarray  # (n_embd, n_head * head_dim)
    ffn_norm: np.ndarray  # (n_embd,)
    ffn_gate: np.ndarray  # (n_ff[i], n_embd)
    ffn_up: np.ndarray  # (n_ff[i], n_embd)
    ffn_down: np.ndarray  # (n_embd, n_ff[i])


@dataclass
class TinyModel:
    """Hyper-parameters and weights of a GGUF written by `write_tiny_llama`."""

    path: Path
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: list[int]  # per weight layer (all equal unless per_layer_ff was given)
    n_vocab: int
    n_ctx_train: int
    rope_freq_base: float
    rms_eps: float
    token_embd: np.ndarray  # (n_vocab, n_embd)
    output_norm: np.ndarray  # (n_embd,)
    output: np.ndarray  # (n_vocab, n_embd)
    layers: list[LayerWeights]
    layer_order: list[int] | None = None  # as written to llama.layer_order, if any
    tokens: list[str] = field(default_factory=list)

    @property
    def head_dim(self) -> int:
        """Per-head dimension (= n_rot for llama)."""
        return self.n_embd // self.n_head

    @staticmethod
    def text_to_ids(text: str, add_bos: bool = True) -> list[int]:
        """Ids that llama.cpp's tokenizer gives for `text` on this vocab.

        llama_tokenize(vocab, text, add_special=True, parse_special=False) on
        these GGUFs = BOS + the UTF-8 bytes of `text` with every ' ' replaced by
        U+2581 (SPM whitespace escaping; no leading space prefix is added).
        Checked against stock llama.cpp.  Feeding ids directly is the robust path.
        """
        data = text.replace(" ", "\u2581").encode("utf-8")
        return ([BOS_ID] if add_bos else []) + [BYTE_TOKEN_OFFSET + b for b in data]


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types for the tiny SPM vocab."""
    if n_vocab < MIN_VOCAB:
        raise ValueError(f"n_vocab must be >= {MIN_VOCAB}")
    T = gguf.TokenType
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    for i in range(len(toks), n_vocab):
        toks.append(f"<unused_{i}>")
        types.append(T.UNUSED)
    return toks, [0.0] * n_vocab, [int(t) for t in types]


def add_tokenizer(w: gguf.GGUFWriter, n_vocab: int) -> None:
    """Write the byte-level "llama" (SentencePiece-style) tokenizer of the tiny models."""
    tokens, scores, types = _vocab(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)


def write_gguf(w: gguf.GGUFWriter) -> None:
    """Write out what was added to ``w`` (header, metadata, tensors) and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_llama(
    path: str | Path,
    *,
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_vocab: int = 272,
    n_ctx_train: int = 256,
    rope_freq_base: float = 10000.0,
    rms_eps: float = 1e-5,
    seed: int = 0,
    per_layer_ff: Sequence[int] | None = None,
    layer_order: Sequence[int] | None = None,
) -> TinyModel:
    """Write a random float32 llama GGUF to `path` and return its weights.

    per_layer_ff: if given (length n_layer), `llama.feed_forward_length` is
        written as a UINT32 array and layer i gets n_ff = per_layer_ff[i].
        NOTE: stock llama.cpp's llama loader sizes every layer with
        hparams.n_ff() (= layer 0), so non-uniform values only load once the
        loader uses n_ff(i).
    layer_order: if given, written as INT32 array `llama.layer_order`.

    Scales: token_embd ~ N(0, 1); projections ~ N(0, 1/fan_in) (~0.09-0.125
    std for the defaults); norm weights ~ 1 + N(0, 0.1).  Residual-stream
    RMS stays O(1), attention is clearly non-uniform and logits are O(1).
    """
    if n_embd % n_head or n_head % n_head_kv or (n_embd // n_head) % 2:
        raise ValueError("need n_embd % n_head == 0, n_head % n_head_kv == 0, even head_dim")
    ffs = [int(f) for f in per_layer_ff] if per_layer_ff is not None else [n_ff] * n_layer
    if len(ffs) != n_layer:
        raise ValueError("per_layer_ff must have n_layer entries")
    if layer_order is not None and not all(0 <= i < n_layer for i in layer_order):
        raise ValueError("layer_order entries must be in [0, n_layer)")

    rng = np.random.default_rng(seed)
    hd = n_embd // n_head

    def lin(n_out: int, n_in: int) -> np.ndarray:
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)

    token_embd = rng.standard_normal((n_vocab, n_embd)).astype(np.float32)
    layers = [
        LayerWeights(
            attn_norm=norm(),
            wq=lin(n_head * hd, n_embd),
            wk=lin(n_head_kv * hd, n_embd),
            wv=lin(n_head_kv * hd, n_embd),
            wo=lin(n_embd, n_head * hd),
            ffn_norm=norm(),
            ffn_gate=lin(f, n_embd),
            ffn_up=lin(f, n_embd),
            ffn_down=lin(n_embd, f),
        )
        for f in ffs
    ]
    output_norm = norm()
    output = lin(n_vocab, n_embd)
    tokens = _vocab(n_vocab)[0]

    path = Path(path)
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name("frankenllama-tiny")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    if per_layer_ff is None:
        w.add_feed_forward_length(n_ff)
    else:
        w.add_key_value(gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch=ARCH), ffs,
                        gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(rope_freq_base)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_rope_dimension_count(hd)
    if layer_order is not None:
        w.add_key_value(LAYER_ORDER_KEY, [int(i) for i in layer_order],
                        gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)

    add_tokenizer(w, n_vocab)

    w.add_tensor("token_embd.weight", token_embd)
    for i, L in enumerate(layers):
        for name, arr in [
            ("attn_norm", L.attn_norm), ("attn_q", L.wq), ("attn_k", L.wk),
            ("attn_v", L.wv), ("attn_output", L.wo), ("ffn_norm", L.ffn_norm),
            ("ffn_gate", L.ffn_gate), ("ffn_up", L.ffn_up), ("ffn_down", L.ffn_down),
        ]:
            w.add_tensor(f"blk.{i}.{name}.weight", arr)
    w.add_tensor("output_norm.weight", output_norm)
    w.add_tensor("output.weight", output)

    write_gguf(w)

    return TinyModel(
        path=path, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        n_ff=ffs, n_vocab=n_vocab, n_ctx_train=n_ctx_train, rope_freq_base=rope_freq_base,
        rms_eps=rms_eps, token_embd=token_embd, output_norm=output_norm, output=output,
        layers=layers, layer_order=list(layer_order) if layer_order is not None else None,
        tokens=tokens,
    )


def rewrite_gguf(src: Path, dst: Path, *, arch: str | None = None, drop: tuple[str, ...] = (),
             extra: list[tuple[str, object, gguf.GGUFValueType, gguf.GGUFValueType | None]] = ()) -> Path:
    """Copy a float32 GGUF, optionally renaming the architecture (and its "<arch>." keys), dropping
    keys and appending extra ones (in order, after the copied keys)."""
    reader = gguf.GGUFReader(src, "r")
    old_arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    new_arch = arch or old_arch
    writer = gguf.GGUFWriter(str(dst), new_arch)
    for field in reader.fields.values():
        name = field.name
        if name == gguf.Keys.General.ARCHITECTURE or name.startswith("GGUF.") or name in drop:
            continue
        if name.startswith(old_arch + "."):
            name = new_arch + name[len(old_arch):]
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for key, value, vtype, sub in extra:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    write_gguf(writer)
    return dst
