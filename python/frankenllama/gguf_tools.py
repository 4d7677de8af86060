"""GGUF layer tools: write a layer order into a standalone model file.

``materialize`` copies the blocks of a model, byte for byte in their own quantization type, into
the order given, so that any llama.cpp (unpatched included) runs the same network that
``frankenllama.Llama(model, layer_order=order)`` runs in situ.  Reading and writing go through
gguf-py; the source is memory-mapped and tensors are written one at a time, so memory stays flat
whatever the model size.  The output is written to a temporary file beside the target and renamed
only once complete: an interrupted run never leaves a partial model under the final name, and the
input is never touched.
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
# arch -> (default period, dense_first) as in llama.cpp's load_swa_pattern() calls
SWA_PERIODS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma-embedding": (6, False), "cohere2": (4, False),
    "exaone4": (4, False), "olmo2": (4, False), "openai-moe": (2, False), "plamo3": (8, False),
    "mellum": (4, False), "muse-glimmer": (4, False), "modern-bert": (3, True),
}

#: metadata key recording the order a materialized or stacked file was built from
SOURCE_ORDER_KEY = "frankenllama.source_layer_order"


def _field_value(field: gguf.ReaderField) -> Any:
    return field.contents()


def _swa_flags(reader: gguf.GGUFReader, arch: str, n_layer: int) -> list[bool] | None:
    """Per weight layer: is it a sliding-window layer? None if the architecture has no SWA pattern."""
    field = reader.get_field(f"{arch}.attention.sliding_window_pattern")
    if field is not None and field.types[0] == gguf.GGUFValueType.ARRAY:
        return [bool(v) for v in field.contents()]
    if arch not in SWA_PERIODS or reader.get_field(f"{arch}.attention.sliding_window") is None:
        return None
    period, dense_first = SWA_PERIODS[arch]
    if field is not None:
        period = int(field.contents())
    if dense_first:
        return [period == 0 or il % period != 0 for il in range(n_layer)]
    return [period == 0 or il % period < period - 1 for il in range(n_layer)]


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"output folder is not writable: {path.parent}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _open(path: str | Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as err:  # gguf-py raises several types on broken files
        raise ValueError(f"{path} is not a readable GGUF file: {err}") from None


def _arch_and_depth(reader: gguf.GGUFReader, path: Path) -> tuple[str, int]:
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise ValueError(f"{path} has no general.architecture: not a llama.cpp model")
    arch = str(arch_field.contents())
    count = reader.get_field(f"{arch}.block_count")
    if count is None:
        raise ValueError(f"{path} has no {arch}.block_count")
    nextn = reader.get_field(f"{arch}.nextn_predict_layers")
    if nextn is not None and int(nextn.contents()) > 0:
        raise ValueError(f"{path}: models with nextn/MTP layers cannot be materialized yet")
    return arch, int(count.contents())


def _copy_tensor(writer: gguf.GGUFWriter, tensor: gguf.ReaderTensor, name: str) -> None:
    writer.add_tensor_info(name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)


def materialize(model_path: str | Path, layer_order: Recipe, out_path: str | Path, *, progress: bool = True) -> list[int]:
    """Write ``model_path`` with its blocks in ``layer_order`` to ``out_path`` as a standalone GGUF.

    Blocks are copied byte for byte and renumbered, ``block_count`` becomes the order's length,
    every per-layer metadata array is remapped, sliding-window layers are listed explicitly (they
    follow their weights, as in frankenllama), and the order is recorded under
    ``frankenllama.source_layer_order``.  Returns the order written.

    Raises:
        ValueError: bad order or unreadable model; FileNotFoundError/PermissionError: bad output path.
    """
    model_path, out_path = Path(model_path), Path(out_path)
    if out_path.resolve() == model_path.resolve():
        raise ValueError("the output would overwrite the input model; choose another output path")
    reader = _open(model_path)
    arch, n_layer = _arch_and_depth(reader, model_path)
    order = resolve(layer_order, n_layer)

    blocks: dict[int, list[gguf.ReaderTensor]] = {}
    others: list[gguf.ReaderTensor] = []
    for tensor in reader.tensors:
        match = _BLOCK_TENSOR.match(tensor.name)
        if match:
            blocks.setdefault(int(match.group(1)), []).append(tensor)
        else:
            others.append(tensor)

    with atomic_output(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
        swa = _swa_flags(reader, arch, n_layer)
        run_swa = swa is not None and any(swa[il] for il in order)
        for field in reader.fields.values():
            name = field.name
            if name == gguf.Keys.General.ARCHITECTURE or name.startswith("GGUF."):
                continue
            if name in (f"{arch}.block_count", f"{arch}.layer_order", SOURCE_ORDER_KEY,
                        f"{arch}.attention.sliding_window_pattern"):
                continue
            if name == f"{arch}.attention.sliding_window" and not run_swa:
                continue  # no sliding-window layer runs: llama.cpp needs the file to be non-SWA
            value_type = field.types[0]
            value = _field_value(field)
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            if sub_type is not None and name.startswith(f"{arch}.") and len(value) == n_layer:
                value = [value[il] for il in order]  # a per-layer array
            writer.add_key_value(name, value, value_type, sub_type=sub_type)
        writer.add_uint32(f"{arch}.block_count", len(order))
        if run_swa:
            writer.add_array(f"{arch}.attention.sliding_window_pattern", [swa[il] for il in order])
        writer.add_string(SOURCE_ORDER_KEY, format_spec(order))

        plan: list[tuple[gguf.ReaderTensor, str]] = [(t, t.name) for t in others]
        for pos, il in enumerate(order):
            for tensor in blocks.get(il, []):
                plan.append((tensor, f"blk.{pos}.{_BLOCK_TENSOR.match(tensor.name).group(2)}"))
        for tensor, name in plan:
            _copy_tensor(writer, tensor, name)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(int(t.n_bytes) for t, _ in plan)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"materialize {out_path.name}",
                  disable=not progress) as bar:
            for tensor, _ in plan:
                writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
                bar.update(int(tensor.n_bytes))
        writer.close()
    return order


def tensor_bytes_per_layer(model_path: str | Path) -> dict[int, int]:
    """Bytes of the tensors of each block, from the GGUF tensor table."""
    reader = _open(model_path)
    sizes: dict[int, int] = {}
    for tensor in reader.tensors:
        match = _BLOCK_TENSOR.match(tensor.name)
        if match:
            sizes[int(match.group(1))] = sizes.get(int(match.group(1)), 0) + int(tensor.n_bytes)
    return sizes


__all__: Sequence[str] = ["materialize", "atomic_output", "tensor_bytes_per_layer", "SOURCE_ORDER_KEY"]
_ = np  # numpy arrays come back from gguf-py readers
