"""Write a small LoRA adapter GGUF for the tiny llama model (tests/tiny_model.py).

llama.cpp (src/llama-adapter.cpp) reads: general.type == "adapter", general.architecture equal to the
model's, adapter.type == "lora", adapter.lora.alpha (f32), and for each adapted weight W of ne
{n_in, n_out} a pair "<W name>.lora_a" with ne {n_in, rank} and "<W name>.lora_b" with ne {rank, n_out}.
gguf-py writes numpy arrays row-major, so lora_a is numpy (rank, n_in) and lora_b numpy (n_out, rank),
and the adapted product is W x + scale * (alpha / rank) * B (A x).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import gguf
import numpy as np

from tiny_model import TinyModel, write_gguf

#: projections of a tiny block that an adapter may adapt: name -> attribute of LayerWeights
PROJECTIONS = {"attn_q": "wq", "attn_v": "wv", "ffn_up": "ffn_up"}


def make_lora_tensors(tiny: TinyModel, layers: list[int], *, rank: int = 2, seed: int = 0,
                      scale: float = 1.0) -> dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Random (A, B) pairs for every projection of each weight layer in ``layers``.

    Returns {weight layer: {projection: (A numpy (rank, n_in), B numpy (n_out, rank))}}.  B is not
    zero (unlike a freshly initialised LoRA) so that the adapter visibly changes the logits.
    """
    rng = np.random.default_rng(seed)
    out: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for il in layers:
        per: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for proj, attr in PROJECTIONS.items():
            w = getattr(tiny.layers[il], attr)
            n_out, n_in = w.shape
            a = (scale * rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
            b = (scale * rng.standard_normal((n_out, rank)) / np.sqrt(rank)).astype(np.float32)
            per[proj] = (a, b)
        out[il] = per
    return out


def write_lora(path: str | Path, blocks: Mapping[int, Mapping[str, tuple[np.ndarray, np.ndarray]]], *,
               alpha: float = 2.0, arch: str = "llama") -> Path:
    """Write an adapter whose block ``blk.N`` gets the (A, B) pairs of ``blocks[N]``."""
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("adapter")
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for blk in sorted(blocks):
        for proj, (a, b) in blocks[blk].items():
            w.add_tensor(f"blk.{blk}.{proj}.weight.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            w.add_tensor(f"blk.{blk}.{proj}.weight.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    write_gguf(w)
    return path


def write_lora_pair(tiny: TinyModel, order: list[int], adapted: list[int], in_situ_path: str | Path,
                    twin_path: str | Path, *, rank: int = 2, seed: int = 0, alpha: float = 2.0) -> None:
    """An adapter for weight layers ``adapted`` of the original file, and the same adapter for the
    materialized twin of ``order``: there every position that runs an adapted layer gets its tensors."""
    tensors = make_lora_tensors(tiny, adapted, rank=rank, seed=seed)
    write_lora(in_situ_path, tensors, alpha=alpha)
    write_lora(twin_path, {pos: tensors[il] for pos, il in enumerate(order) if il in tensors}, alpha=alpha)
