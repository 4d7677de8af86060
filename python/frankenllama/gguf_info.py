"""What frankenllama needs to know about a GGUF file before llama.cpp loads it.

The header is read with ggml's own GGUF reader (``gguf_init_from_file`` in the packaged
libggml-base, through cffi): it is what llama.cpp will read, and it is fast where a pure-Python
reader spends seconds on the tokenizer arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import cffi

from ._native import native_library_dir

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


@lru_cache(maxsize=None)
def _ggml_base() -> tuple[cffi.FFI, Any]:
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    names = [p for p in native_library_dir().glob("*ggml-base*") if p.suffix in (".so", ".dylib", ".dll")]
    if not names:
        raise ImportError(f"libggml-base not found in {native_library_dir()}: reinstall frankenllama")
    return ffi, ffi.dlopen(str(sorted(names)[0]))


def _int(ffi: Any, lib: Any, ctx: Any, key: str) -> int | None:
    kid = lib.gguf_find_key(ctx, key.encode())
    if kid < 0:
        return None
    getter = {_UINT32: lib.gguf_get_val_u32, _INT32: lib.gguf_get_val_i32,
              _UINT64: lib.gguf_get_val_u64, _INT64: lib.gguf_get_val_i64}.get(lib.gguf_get_kv_type(ctx, kid))
    return None if getter is None else int(getter(ctx, kid))


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Read the architecture and block count of a GGUF model (header only).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a GGUF model llama.cpp could load (the message says why).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    ffi, lib = _ggml_base()
    params = ffi.new("struct gguf_init_params *", {"no_alloc": True, "ctx": ffi.NULL})
    ctx = lib.gguf_init_from_file(str(path).encode(), params[0])
    if ctx == ffi.NULL:
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt header)")
    try:
        kid = lib.gguf_find_key(ctx, b"general.architecture")
        if kid < 0 or lib.gguf_get_kv_type(ctx, kid) != _STRING:
            raise ValueError(f"{path} has no general.architecture: not a llama.cpp model")
        arch = ffi.string(lib.gguf_get_val_str(ctx, kid)).decode()
        n_blocks = _int(ffi, lib, ctx, f"{arch}.block_count")
        if not n_blocks or n_blocks <= 0:
            raise ValueError(f"{path} has no {arch}.block_count: it has no decoder blocks to order")
        n_nextn = _int(ffi, lib, ctx, f"{arch}.nextn_predict_layers") or 0
    finally:
        lib.gguf_free(ctx)
    return GGUFInfo(path=path, arch=arch, n_layer=n_blocks - n_nextn, n_layer_nextn=n_nextn)


_ARRAY_CDEF = """
size_t       gguf_get_arr_n(const struct gguf_context * ctx, int64_t key_id);
int          gguf_get_arr_type(const struct gguf_context * ctx, int64_t key_id);
const void * gguf_get_arr_data(const struct gguf_context * ctx, int64_t key_id);
"""
_ARRAY = 9


def read_stored_order(path: str | Path) -> list[int] | None:
    """The layer order a GGUF file stores (``<arch>.layer_order``: an int32 array or a spec
    string), or None when it stores none."""
    from .order import parse_spec

    info = read_gguf_info(path)
    arch = info.arch
    ffi, lib = _ggml_base()
    _bind_array_api(ffi)
    params = ffi.new("struct gguf_init_params *", {"no_alloc": True, "ctx": ffi.NULL})
    ctx = lib.gguf_init_from_file(str(path).encode(), params[0])
    if ctx == ffi.NULL:
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt header)")
    try:
        kid = lib.gguf_find_key(ctx, f"{arch}.layer_order".encode())
        if kid >= 0 and lib.gguf_get_kv_type(ctx, kid) == _STRING:
            return parse_spec(ffi.string(lib.gguf_get_val_str(ctx, kid)).decode(), info.n_layer)
        if kid < 0 or lib.gguf_get_kv_type(ctx, kid) != _ARRAY or lib.gguf_get_arr_type(ctx, kid) != _INT32:
            return None
        n = lib.gguf_get_arr_n(ctx, kid)
        data = ffi.cast("const int32_t *", lib.gguf_get_arr_data(ctx, kid))
        return [int(data[i]) for i in range(n)]
    finally:
        lib.gguf_free(ctx)


@lru_cache(maxsize=None)
def _bind_array_api(ffi: cffi.FFI) -> None:
    ffi.cdef(_ARRAY_CDEF)
