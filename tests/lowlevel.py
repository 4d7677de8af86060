"""Logits straight from llama.cpp through llama_cpp's low-level bindings.

Used in-process (with frankenllama's patched library) and in a subprocess with the unpatched
library (``python tests/lowlevel.py ...``), so both sides of a comparison run the same code.
Several sequences can share one batch, which ``llama_cpp.Llama`` cannot do.
"""
from __future__ import annotations

import argparse
import os
import ctypes
import json
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Step:
    """One token of a batch: token id, position, sequence id."""

    token: int
    pos: int
    seq: int


class RawModel:
    """A model and one context; ``decode`` returns the logits of every token of a batch.

    A context manager: ``with RawModel(path) as model:`` closes it at the end of the block.
    """

    def __init__(self, path: "str | os.PathLike[str]", *, kv_overrides: dict[str, str] | None = None, n_ctx: int = 512,
                 n_seq_max: int = 2, f32_kv: bool = True, flash_attn: bool = False, type_k: int | None = None,
                 embeddings: bool = False, n_threads: int = 2, use_mmap: bool = True) -> None:
        import llama_cpp

        self.ll = llama_cpp
        self._embeddings = embeddings
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        self._overrides = None
        if kv_overrides:
            arr = (llama_cpp.llama_model_kv_override * (len(kv_overrides) + 1))()
            for i, (key, value) in enumerate(kv_overrides.items()):
                arr[i].key = key.encode()
                arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                raw = value.encode()
                ctypes.memmove(ctypes.addressof(arr[i].value), raw, len(raw))
            arr[len(kv_overrides)].key = b"\0"
            mparams.kv_overrides = arr
            self._overrides = arr
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise ValueError(f"failed to load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.flash_attn_type = 1 if flash_attn else 0
        cparams.embeddings = embeddings
        if f32_kv:
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
        if type_k is not None:
            cparams.type_k = type_k
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ValueError("failed to create a context")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)

    def n_layer(self) -> int:
        return self.ll.llama_model_n_layer(self.model)

    def decode(self, steps: Sequence[Step]) -> np.ndarray:
        """Decode one batch; logits (or embeddings) of every step, shape [len(steps), n_vocab]."""
        ll = self.ll
        batch = ll.llama_batch_init(len(steps), 0, 1)
        try:
            for i, step in enumerate(steps):
                batch.token[i] = step.token
                batch.pos[i] = step.pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = step.seq
                batch.logits[i] = True
            batch.n_tokens = len(steps)
            rc = ll.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with {rc}")
            rows = []
            for i in range(len(steps)):
                if self.embeddings:
                    ptr = ll.llama_get_embeddings_ith(self.ctx, i)
                    rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy())
                else:
                    ptr = ll.llama_get_logits_ith(self.ctx, i)
                    rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
            return np.stack(rows)
        finally:
            ll.llama_batch_free(batch)

    @property
    def embeddings(self) -> bool:
        return bool(getattr(self, "_embeddings", False))

    def clear(self) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def close(self) -> None:
        if self.ctx:
            self.ll.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "RawModel":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def identical(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    """Per-sequence logits equal bit for bit (same shapes, max |diff| == 0)."""
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def assert_identical(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> None:
    """Assert ``identical``, reporting the largest difference."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape, (x.shape, y.shape)
        assert np.array_equal(x, y), f"max |diff| = {np.abs(x - y).max()}"


def sequences_batch(seqs: Sequence[Sequence[int]]) -> list[Step]:
    """All tokens of several sequences in one batch."""
    return [Step(tok, pos, s) for s, toks in enumerate(seqs) for pos, tok in enumerate(toks)]


def run(model: RawModel, seqs: Sequence[Sequence[int]], mode: str) -> list[np.ndarray]:
    """Logits per sequence: "batch" = all tokens of all sequences in one decode;
    "incremental" = token by token through the KV cache, the sequences interleaved."""
    model.clear()
    if mode == "batch":
        steps = sequences_batch(seqs)
        logits = model.decode(steps)
        out, start = [], 0
        for toks in seqs:
            out.append(logits[start:start + len(toks)])
            start += len(toks)
        return out
    rows: list[list[np.ndarray]] = [[] for _ in seqs]
    for pos in range(max(len(t) for t in seqs)):
        live = [(s, toks[pos]) for s, toks in enumerate(seqs) if pos < len(toks)]
        logits = model.decode([Step(tok, pos, s) for s, tok in live])
        for (s, _), row in zip(live, logits):
            rows[s].append(row)
    return [np.stack(r) for r in rows]


def main() -> int:
    """Subprocess entry: print logits as JSON-free .npy into --out (used with the unpatched library)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--seqs", required=True, help="JSON list of token lists")
    parser.add_argument("--mode", choices=["batch", "incremental"], default="batch")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--f16-kv", action="store_true")
    args = parser.parse_args()
    with RawModel(args.model, n_ctx=args.n_ctx, f32_kv=not args.f16_kv) as model:
        out = run(model, json.loads(args.seqs), args.mode)
    np.savez(args.out, *out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
