"""GGUF layer tools: stack fine-tunes into one file, write a layer order into a standalone model.

``stack`` puts every block of several models of one architecture into one file, so that a layer
order can pick each position from any of them.  ``materialize`` copies the blocks of a model,
byte for byte in their own quantization type, into the order given, so that any llama.cpp
(unpatched included) runs the same network that ``frankenllama.Llama(model, layer_order=order)``
runs in situ.

Reading and writing go through gguf-py.  Sources are memory-mapped and tensors are copied one at
a time from the mapping to the output, so no tensor data is held in Python memory.  Output goes to a temporary file beside the
target, renamed only once complete: an interrupted run never leaves a partial model under the
final name, and the inputs are never touched.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import gguf
import numpy as np
from tqdm import tqdm

from .order import format_spec
from .recipes import Recipe, resolve

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")

# architectures whose sliding-window layers follow a period unless the file lists them:
# arch -> (default period, dense_first), as in llama.cpp's load_swa_pattern() calls
SWA_PERIODS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma-embedding": (6, False), "cohere2": (4, False),
    "exaone4": (4, False), "olmo2": (4, False), "openai-moe": (2, False), "plamo3": (8, False),
    "mellum": (4, False), "muse-glimmer": (4, False), "modern-bert": (3, True),
}

#: metadata key recording the order a materialized file was built from
SOURCE_ORDER_KEY = "frankenllama.source_layer_order"
#: metadata key: per block of a stacked file, "<source file>:<layer>"
BLOCK_SOURCES_KEY = "frankenllama.block_sources"

Plan = list[tuple[gguf.ReaderTensor, str]]  # source tensor, name in the output


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"output folder is not writable: {path.parent}")
    if path.is_dir():
        raise IsADirectoryError(f"output path is a folder: {path}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class _Reader(gguf.GGUFReader):
    """gguf-py's reader, with arrays read in bulk.

    ``GGUFReader`` builds one memory-mapped view per array element, which costs seconds (and
    hundreds of MiB) on a tokenizer of 50k-250k entries.  Here an array of scalars is one view and
    an array of strings takes two plain views per string; ``ReaderField.contents()`` returns the
    same values.  Everything else (nested arrays, byte-swapped files) is gguf-py's own code.
    """

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list]:
        if gguf.GGUFValueType(raw_type) != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        length = self._get(orig_offs + 4, np.uint64)
        item_type = gguf.GGUFValueType(int(raw_itype[0]))
        types = [gguf.GGUFValueType.ARRAY, item_type]
        offs = orig_offs + 12
        scalar = self.gguf_scalar_to_np.get(item_type)
        if scalar is not None:
            values = self._get(offs, scalar, int(length[0]))
            return 12 + int(values.nbytes), [raw_itype, length, values], [2], types
        if item_type == gguf.GGUFValueType.STRING and self.byte_order == "I":
            raw = np.asarray(self.data)  # plain views: far cheaper than memmap views
            parts: list = [raw_itype, length]
            data: list[int] = []
            for _ in range(int(length[0])):
                n = int.from_bytes(raw[offs:offs + 8].tobytes(), "little")
                parts += [raw[offs:offs + 8].view(np.uint64), raw[offs + 8:offs + 8 + n]]
                data.append(len(parts) - 1)
                offs += 8 + n
            return offs - orig_offs, parts, data, types
        return super()._get_field_parts(orig_offs, raw_type)


class ModelFile:
    """A GGUF model opened for copying: metadata, blocks and the other tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        try:
            self.reader = _Reader(self.path, "r")
        except Exception as err:  # gguf-py raises several types on broken files
            raise ValueError(f"{self.path} is not a readable GGUF file: {err}") from None
        arch = self.field(gguf.Keys.General.ARCHITECTURE)
        if not isinstance(arch, str):
            raise ValueError(f"{self.path} has no general.architecture: not a llama.cpp model")
        self.arch = arch
        n_layer = self.field(f"{arch}.block_count")
        if not isinstance(n_layer, int):
            raise ValueError(f"{self.path} has no {arch}.block_count")
        if (self.field(f"{arch}.nextn_predict_layers") or 0) > 0:
            raise ValueError(f"{self.path}: models with nextn/MTP layers are not supported by the GGUF tools yet")
        self.n_layer = n_layer
        self.blocks: dict[int, list[gguf.ReaderTensor]] = {}
        self.others: list[gguf.ReaderTensor] = []
        for tensor in self.reader.tensors:
            match = _BLOCK_TENSOR.match(tensor.name)
            if match:
                self.blocks.setdefault(int(match.group(1)), []).append(tensor)
            else:
                self.others.append(tensor)

    def field(self, key: str) -> Any:
        field = self.reader.get_field(key)
        return None if field is None else field.contents()

    def metadata(self) -> Iterator[tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
        """(key, value, type, array item type) of every key a writer should copy."""
        for field in self.reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            yield field.name, field.contents(), value_type, sub_type

    def is_per_layer(self, key: str, value: Any, sub_type: Any) -> bool:
        return sub_type is not None and (key.startswith(f"{self.arch}.") or key == BLOCK_SOURCES_KEY) \
            and len(value) == self.n_layer

    def swa_flags(self) -> list[bool] | None:
        """Per block: is it a sliding-window layer? None if the architecture has no SWA pattern."""
        key = f"{self.arch}.attention.sliding_window_pattern"
        field = self.reader.get_field(key)
        if field is not None and field.types[0] == gguf.GGUFValueType.ARRAY:
            return [bool(v) for v in field.contents()]
        if self.arch not in SWA_PERIODS or not self.field(f"{self.arch}.attention.sliding_window"):
            return None
        period, dense_first = SWA_PERIODS[self.arch]
        if field is not None:
            period = int(field.contents())
        if dense_first:
            return [period == 0 or il % period != 0 for il in range(self.n_layer)]
        return [period == 0 or il % period < period - 1 for il in range(self.n_layer)]

    def block_plan(self, layer: int, position: int) -> Plan:
        return [(t, f"blk.{position}.{_BLOCK_TENSOR.match(t.name).group(2)}") for t in self.blocks.get(layer, [])]


def _write(out_path: Path, arch: str, endianess: Any, metadata: list[tuple[str, Any, Any, Any]],
           plan: Plan, progress: bool, desc: str) -> None:
    """Write metadata and tensors (streamed, one at a time) to out_path, atomically."""
    with atomic_output(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch, endianess=endianess)
        for key, value, value_type, sub_type in metadata:
            writer.add_key_value(key, value, value_type, sub_type=sub_type)
        for tensor, name in plan:
            writer.add_tensor_info(name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(int(t.n_bytes) for t, _ in plan), unit="B", unit_scale=True, desc=desc,
                  disable=not progress) as bar:
            for tensor, _ in plan:
                writer.write_tensor_data(tensor.data, tensor_endianess=endianess)
                bar.update(int(tensor.n_bytes))
        writer.close()


def _array(key: str, values: list, item_type: gguf.GGUFValueType) -> tuple[str, Any, Any, Any]:
    return key, values, gguf.GGUFValueType.ARRAY, item_type


def _check_output(out_path: Path, inputs: Sequence[Path]) -> None:
    for path in inputs:
        if out_path.resolve() == path.resolve():
            raise ValueError(f"the output would overwrite the input {path}; choose another output path")


def materialize(model_path: str | Path, layer_order: Recipe, out_path: str | Path, *, progress: bool = True) -> list[int]:
    """Write ``model_path`` with its blocks in ``layer_order`` to ``out_path`` as a standalone GGUF.

    Blocks are copied byte for byte and renumbered, ``block_count`` becomes the order's length,
    every per-layer metadata array is remapped, sliding-window layers are listed explicitly (they
    follow their weights, as in frankenllama; an order that runs none is written as a non-SWA
    model), and the order is recorded under ``frankenllama.source_layer_order``.  A stacked file
    is a valid input.  Returns the order written.

    Raises:
        ValueError: bad order or unreadable model; FileNotFoundError/PermissionError: bad output path.
    """
    out_path = Path(out_path)
    src = ModelFile(model_path)
    _check_output(out_path, [src.path])
    order = resolve(layer_order, src.n_layer)
    arch = src.arch
    swa = src.swa_flags()
    runs_swa = swa is not None and any(swa[il] for il in order)
    dropped = {f"{arch}.block_count", f"{arch}.layer_order", f"{arch}.attention.sliding_window_pattern",
               SOURCE_ORDER_KEY}
    if not runs_swa:
        dropped.add(f"{arch}.attention.sliding_window")  # llama.cpp needs a file without SWA layers to be non-SWA

    metadata = []
    for key, value, value_type, sub_type in src.metadata():
        if key in dropped:
            continue
        if src.is_per_layer(key, value, sub_type):
            value = [value[il] for il in order]
        metadata.append((key, value, value_type, sub_type))
    metadata.append((f"{arch}.block_count", len(order), gguf.GGUFValueType.UINT32, None))
    if runs_swa:
        metadata.append(_array(f"{arch}.attention.sliding_window_pattern", [swa[il] for il in order],
                               gguf.GGUFValueType.BOOL))
    metadata.append((SOURCE_ORDER_KEY, format_spec(order), gguf.GGUFValueType.STRING, None))

    plan: Plan = [(t, t.name) for t in src.others]
    for pos, il in enumerate(order):
        plan += src.block_plan(il, pos)
    _write(out_path, arch, src.reader.endianess, metadata, plan, progress, f"materialize {out_path.name}")
    return order


def _compare(first: ModelFile, other: ModelFile) -> None:
    """Raise ValueError naming the first way ``other`` cannot be stacked with ``first``."""
    where = f"{other.path.name} vs {first.path.name}"
    if other.arch != first.arch:
        raise ValueError(f"cannot stack {where}: architecture {other.arch} vs {first.arch}")
    if other.n_layer != first.n_layer:
        raise ValueError(f"cannot stack {where}: {other.n_layer} vs {first.n_layer} blocks")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
        if other.field(key) != first.field(key):
            raise ValueError(f"cannot stack {where}: different vocabulary ({key})")
    for key, value, _, sub_type in first.metadata():
        if not key.startswith(f"{first.arch}.") or key in (f"{first.arch}.layer_order",):
            continue
        if other.field(key) != value:
            raise ValueError(f"cannot stack {where}: hyper-parameter {key} differs ({other.field(key)} vs {value})")
    for il in range(first.n_layer):
        shapes = {_BLOCK_TENSOR.match(t.name).group(2): tuple(t.shape) for t in first.blocks.get(il, [])}
        other_shapes = {_BLOCK_TENSOR.match(t.name).group(2): tuple(t.shape) for t in other.blocks.get(il, [])}
        if shapes != other_shapes:
            diff = sorted(set(shapes.items()) ^ set(other_shapes.items()))
            raise ValueError(f"cannot stack {where}: block {il} tensors differ ({diff[0][0]})")


def stack(inputs: Sequence[str | Path], out_path: str | Path, *, base: int = 0, progress: bool = True) -> list[str]:
    """Write one GGUF holding every block of every input: input k's block i becomes block k*N + i.

    Tensors are copied byte for byte in their own quantization type (mixed types are fine).  The
    non-block tensors (embeddings, output norm, output) come from ``inputs[base]``.  Per-layer
    metadata arrays are concatenated, ``block_count`` is the total, ``<arch>.layer_order`` is set to
    the first input's blocks (the file runs as that model by default), and the source of each block
    is recorded under ``frankenllama.block_sources``.  Returns those block sources.

    Raises:
        ValueError: fewer than two inputs, or inputs that differ in architecture, depth, vocabulary,
            hyper-parameters or block tensor shapes (the message names the mismatch).
    """
    if len(inputs) < 2:
        raise ValueError("stack needs at least two models")
    if not 0 <= base < len(inputs):
        raise ValueError(f"base {base} is not the index of an input (0-{len(inputs) - 1})")
    out_path = Path(out_path)
    sources = [ModelFile(path) for path in inputs]
    _check_output(out_path, [s.path for s in sources])
    first = sources[0]
    for other in sources[1:]:
        _compare(first, other)
    arch, n_layer = first.arch, first.n_layer
    n_total = n_layer * len(sources)
    block_sources = [f"{s.path.name}:{il}" for s in sources for il in range(n_layer)]
    swa = [s.swa_flags() for s in sources]

    metadata = []
    per_layer: dict[str, list] = {}
    dropped = {f"{arch}.block_count", f"{arch}.layer_order", f"{arch}.attention.sliding_window_pattern",
               BLOCK_SOURCES_KEY, SOURCE_ORDER_KEY}
    for key, value, value_type, sub_type in sources[base].metadata():
        if key in dropped:
            continue
        if sources[base].is_per_layer(key, value, sub_type):
            per_layer[key] = [v for s in sources for v in s.field(key)]
            value = per_layer[key]
        metadata.append((key, value, value_type, sub_type))
    metadata.append((f"{arch}.block_count", n_total, gguf.GGUFValueType.UINT32, None))
    metadata.append(_array(f"{arch}.layer_order", list(range(n_layer)), gguf.GGUFValueType.INT32))
    if swa[0] is not None:
        metadata.append(_array(f"{arch}.attention.sliding_window_pattern", [f for flags in swa for f in flags],
                               gguf.GGUFValueType.BOOL))
    metadata.append(_array(BLOCK_SOURCES_KEY, block_sources, gguf.GGUFValueType.STRING))

    plan: Plan = [(t, t.name) for t in sources[base].others]
    for k, src in enumerate(sources):
        for il in range(n_layer):
            plan += src.block_plan(il, k * n_layer + il)
    _write(out_path, arch, first.reader.endianess, metadata, plan, progress, f"stack {out_path.name}")
    return block_sources


def tensor_bytes_per_layer(model_path: str | Path) -> dict[int, int]:
    """Bytes of the tensors of each block, from the GGUF tensor table."""
    src = ModelFile(model_path)
    return {il: sum(int(t.n_bytes) for t in tensors) for il, tensors in src.blocks.items()}


__all__ = ["ModelFile", "materialize", "stack", "atomic_output", "tensor_bytes_per_layer", "SOURCE_ORDER_KEY",
           "BLOCK_SOURCES_KEY", "SWA_PERIODS"]
