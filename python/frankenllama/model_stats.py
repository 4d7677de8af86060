"""What a GGUF model costs: tensor bytes per block and K/V cache bytes per position, from its header.

Used by ``frankenllama info``/``order`` to show what an order loads and what its cache takes,
before anything is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .gguf_info import check_header
from .order import format_spec


@dataclass
class ModelStats:
    """Tensor sizes and attention shape of a GGUF model, from one read of its header."""

    arch: str
    n_layer: int
    layer_bytes: dict[int, int]     # bytes of the tensors of each block (blk.N.*)
    other_bytes: int                # token embedding, output head, norms ...
    kv_bytes_per_layer: list[int]   # f16 K+V cache bytes per token of each weight layer
    stored_orders: dict[str, str]   # order-related metadata found in the file

    @property
    def total_bytes(self) -> int:
        return self.other_bytes + sum(self.layer_bytes.values())

    def weight_bytes(self, order: Sequence[int]) -> int:
        """Bytes loaded for ``order``: each distinct block once, plus the non-block tensors."""
        return self.other_bytes + sum(self.layer_bytes.get(il, 0) for il in set(order))

    def kv_bytes(self, order: Sequence[int]) -> int:
        """KV cache bytes per token position of ``order`` (every position has its own cache)."""
        return sum(self.kv_bytes_per_layer[il] for il in order)


def _per_layer(value: Any, n_layer: int, default: int | None) -> list[int | None]:
    """A metadata value that is a scalar or a per-layer array, as one value per layer."""
    if value is None:
        return [default] * n_layer
    if isinstance(value, (list, tuple)):
        values = [int(v) for v in value]
        if len(values) == n_layer:
            return values
        return [values[0] if values else default] * n_layer
    return [int(value)] * n_layer


def read_model_stats(path: str | Path) -> ModelStats:
    """Read tensor sizes and the attention shape with gguf-py (one pass over the header).

    KV cache per token and layer = (n_embd_k_gqa + n_embd_v_gqa) * 2 bytes (f16 cache), where
    n_embd_k_gqa = key_length * head_count_kv and n_embd_v_gqa = value_length * head_count_kv;
    key_length and value_length default to embedding_length / head_count, head_count_kv to
    head_count.  Per-layer arrays are honoured.  This is the full-attention size: sliding-window
    layers may keep a shorter cache and recurrent state is not counted.
    """
    from .gguf_tools import ModelFile

    path = Path(path)
    info = check_header(path)  # friendly errors for broken files, before gguf-py reads them
    model = ModelFile(path)
    arch, n_layer = info.arch, info.n_layer
    field = model.field
    layer_bytes = {il: sum(int(t.n_bytes) for t in tensors) for il, tensors in model.blocks.items()}
    other = sum(int(t.n_bytes) for t in model.others)

    n_embd = field(f"{arch}.embedding_length")
    n_head = _per_layer(field(f"{arch}.attention.head_count"), n_layer, None)
    n_head_kv = _per_layer(field(f"{arch}.attention.head_count_kv"), n_layer, None)
    key_len = _per_layer(field(f"{arch}.attention.key_length"), n_layer, None)
    val_len = _per_layer(field(f"{arch}.attention.value_length"), n_layer, None)
    kv: list[int] = []
    for il in range(n_layer):
        heads = n_head[il]
        heads_kv = n_head_kv[il] if n_head_kv[il] is not None else heads
        head_dim = int(n_embd) // heads if n_embd and heads else 0
        k = key_len[il] if key_len[il] is not None else head_dim
        v = val_len[il] if val_len[il] is not None else head_dim
        kv.append(((k + v) * (heads_kv or 0)) * 2)

    stored = {}
    for key in (f"{arch}.layer_order", "frankenllama.source_layer_order"):
        value = field(key)
        if value is not None:
            stored[key] = value if isinstance(value, str) else format_spec([int(v) for v in value])
    return ModelStats(arch, n_layer, layer_bytes, other, kv, stored)
