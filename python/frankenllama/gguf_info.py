"""What frankenllama needs to know about a GGUF file before llama.cpp loads it.

The header is read with ggml's own GGUF reader (``gguf_init_from_file`` in the packaged
libggml-base, through cffi): it is what llama.cpp will read, and it is fast where a pure-Python
reader spends seconds on the tokenizer arrays.

:func:`check_header` also refuses, with a ValueError, the headers on which llama.cpp would abort
the whole process in an assert instead of failing the load (a block count of 0 or above
``LLAMA_MAX_LAYERS``, more nextn/MTP blocks than blocks), kv_overrides included.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cffi

from ._native import open_native_library
from .order import MAX_LAYERS, check_kv_overrides

__all__ = ["GGUFInfo", "check_header", "read_gguf_info"]

_CDEF = """
struct gguf_context;
struct ggml_context;
struct gguf_init_params { bool no_alloc; struct ggml_context ** ctx; };
struct gguf_context * gguf_init_from_file(const char * fname, struct gguf_init_params params);
void         gguf_free(struct gguf_context * ctx);
int64_t      gguf_find_key(const struct gguf_context * ctx, const char * key);
int          gguf_get_kv_type(const struct gguf_context * ctx, int64_t key_id);
uint32_t     gguf_get_val_u32(const struct gguf_context * ctx, int64_t key_id);
int32_t      gguf_get_val_i32(const struct gguf_context * ctx, int64_t key_id);
uint64_t     gguf_get_val_u64(const struct gguf_context * ctx, int64_t key_id);
int64_t      gguf_get_val_i64(const struct gguf_context * ctx, int64_t key_id);
const char * gguf_get_val_str(const struct gguf_context * ctx, int64_t key_id);
"""

# enum gguf_type
_UINT32, _INT32, _STRING, _UINT64, _INT64 = 4, 5, 8, 10, 11


@dataclass(frozen=True)
class GGUFInfo:
    """Architecture and depth of a GGUF model."""

    path: Path
    arch: str
    n_layer: int        # decoder blocks a layer order indexes (block_count minus the nextn/MTP blocks)
    n_layer_nextn: int  # nextn/MTP blocks, which stay last whatever the order


def _ggml_base() -> tuple[cffi.FFI, Any]:
    return open_native_library("ggml-base", _CDEF)


def _int(ffi: Any, lib: Any, ctx: Any, key: str) -> int | None:
    kid = lib.gguf_find_key(ctx, key.encode())
    if kid < 0:
        return None
    getter = {_UINT32: lib.gguf_get_val_u32, _INT32: lib.gguf_get_val_i32,
              _UINT64: lib.gguf_get_val_u64, _INT64: lib.gguf_get_val_i64}.get(lib.gguf_get_kv_type(ctx, kid))
    return None if getter is None else int(getter(ctx, kid))


@contextlib.contextmanager
def _gguf_header(path: Path) -> Iterator[Any]:
    """ggml's context on the header of a GGUF file, freed after the block; ValueError for a file
    ggml cannot read."""
    ffi, lib = _ggml_base()
    params = ffi.new("struct gguf_init_params *", {"no_alloc": True, "ctx": ffi.NULL})
    ctx = lib.gguf_init_from_file(str(path).encode(), params[0])
    if ctx == ffi.NULL:
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt header)")
    try:
        yield ctx
    finally:
        lib.gguf_free(ctx)


def _read_header(path: Path) -> tuple[str, int | None, int | None]:
    """``general.architecture``, ``<arch>.block_count`` and ``<arch>.nextn_predict_layers`` of a
    GGUF file (None for a missing or non-integer key); ValueError for a file ggml cannot read."""
    ffi, lib = _ggml_base()
    with _gguf_header(path) as ctx:
        kid = lib.gguf_find_key(ctx, b"general.architecture")
        if kid < 0 or lib.gguf_get_kv_type(ctx, kid) != _STRING:
            raise ValueError(f"{path} has no general.architecture: not a llama.cpp model")
        arch = ffi.string(lib.gguf_get_val_str(ctx, kid)).decode()
        return (arch, _int(ffi, lib, ctx, f"{arch}.block_count"),
                _int(ffi, lib, ctx, f"{arch}.nextn_predict_layers"))


def _effective(path: Path, key: str, stored: int | None,
               kv_overrides: Mapping[str, Any]) -> tuple[int | None, str, str]:
    """The value llama.cpp will use for the integer key ``key`` (an int override replaces the
    file's), where it comes from and what to do about a bad one, for error messages."""
    if key not in kv_overrides:
        return stored, f"{path} has {key}", "the file is broken: convert or download it again"
    value = kv_overrides[key]
    if isinstance(value, bool) or not isinstance(value, int):
        # llama.cpp would ignore it with a warning and use the file's value
        raise ValueError(f"kv_overrides[{key!r}] must be an int, got {value!r}")
    return value, f"kv_overrides sets {key}", "fix or remove the override"


def check_header(path: str | os.PathLike[str], kv_overrides: Mapping[str, Any] | None = None) -> GGUFInfo:
    """Read a model's GGUF header and check it before llama.cpp loads it.

    Refuses what llama.cpp would not fail on cleanly but abort the process for (an upstream
    ``GGML_ASSERT``), with ``kv_overrides`` applied the way llama.cpp applies them (an int value
    replaces the file's): ``<arch>.block_count`` must be 1..512 (``LLAMA_MAX_LAYERS``) and
    ``<arch>.nextn_predict_layers`` at most the block count.  The layer-order override keys are
    checked with :func:`frankenllama.order.check_kv_overrides`.

    Raises:
        ValueError: ``Model path does not exist: {path}`` (llama-cpp-python's wording) for a
            missing path, ``Model path is not a readable file: ...`` for a folder or a file that
            cannot be opened, otherwise a message naming the file or override, the key and the
            value.  Layer-order override keys raise :class:`~frankenllama.order.LayerOrderError`.
    """
    if not os.path.exists(path):
        raise ValueError(f"Model path does not exist: {path}")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"Model path is not a readable file: {path}")
    path = Path(path)
    overrides: Mapping[str, Any] = kv_overrides or {}
    arch, stored_blocks, stored_nextn = _read_header(path)
    check_kv_overrides(arch, overrides)
    key = f"{arch}.block_count"
    n_blocks, source, fix = _effective(path, key, stored_blocks, overrides)
    if n_blocks is None:
        raise ValueError(f"{path} has no {key}: it has no decoder blocks to order")
    if not 1 <= n_blocks <= MAX_LAYERS:
        raise ValueError(
            f"{source} = {n_blocks}, but llama.cpp loads 1..{MAX_LAYERS} decoder blocks "
            f"(LLAMA_MAX_LAYERS); {fix}"
        )
    key_nextn = f"{arch}.nextn_predict_layers"
    n_nextn, source, fix = _effective(path, key_nextn, stored_nextn, overrides)
    n_nextn = n_nextn or 0
    if not 0 <= n_nextn <= n_blocks:
        raise ValueError(f"{source} = {n_nextn}, but the model has {n_blocks} blocks ({key}); {fix}")
    return GGUFInfo(path=path, arch=arch, n_layer=n_blocks - n_nextn, n_layer_nextn=n_nextn)


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Read the architecture and block count of a GGUF model (header only), checked like
    :func:`check_header` without overrides.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a GGUF model llama.cpp could load (the message says why).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    return check_header(path)
