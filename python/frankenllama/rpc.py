"""llama.cpp's RPC backend: remote devices that ``n_gpu_layers`` offloads to, and their server.

An RPC server (``frankenllama-rpc-server -p 50052``) exposes a machine's backend (its CPU here,
a GPU where there is one) over TCP. :func:`add_rpc_servers` registers servers as devices the way
llama.cpp's own ``--rpc`` option does; models loaded afterwards in this process offload
``n_gpu_layers`` weight layers to them (and the K/V of every execution position that runs one of
those layers). llama-cpp-python 0.3.36 has no such option: ``frankenllama.Llama(...,
rpc_servers=[...])`` adds it.

Registration is process-wide and permanent, as in llama.cpp: every later load with
``n_gpu_layers > 0`` uses the registered servers.
"""
from __future__ import annotations

import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import cffi

from ._native import native_library_dir

_CDEF = """
typedef struct ggml_backend_reg * ggml_backend_reg_t;
typedef struct ggml_backend_device * ggml_backend_dev_t;
ggml_backend_reg_t ggml_backend_reg_by_name(const char * name);
void *             ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name);
void               ggml_backend_register(ggml_backend_reg_t reg);
size_t             ggml_backend_reg_dev_count(ggml_backend_reg_t reg);
ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index);
const char *       ggml_backend_dev_name(ggml_backend_dev_t device);
"""

_ENDPOINT = re.compile(r"^[A-Za-z0-9.\-]+:\d{1,5}$|^\[[0-9A-Fa-f:]+\]:\d{1,5}$")
_registered: dict[str, list[str]] = {}  # endpoint -> device names


@lru_cache(maxsize=None)
def _ggml() -> tuple[cffi.FFI, Any]:
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    names = {"darwin": "libggml.dylib", "win32": "ggml.dll"}
    return ffi, ffi.dlopen(str(native_library_dir() / names.get(sys.platform, "libggml.so")))


def add_rpc_servers(endpoints: Sequence[str]) -> list[str]:
    """Register RPC servers (``"host:port"``) as devices; return their device names (``RPC0``, ...).

    Raises:
        ValueError: an endpoint is not ``host:port``.
        RuntimeError: this build has no RPC backend.
        ConnectionError: a server does not answer.
    """
    ffi, lib = _ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if reg == ffi.NULL:
        raise RuntimeError("this frankenllama build has no RPC backend; reinstall with CMAKE_ARGS=\"-DGGML_RPC=ON\"")
    add_server = ffi.cast("ggml_backend_reg_t (*)(const char *)",
                          lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server"))
    devices: list[str] = []
    for endpoint in endpoints:
        if not _ENDPOINT.match(endpoint):
            raise ValueError(f"RPC server {endpoint!r} is not host:port (e.g. 127.0.0.1:50052)")
        if endpoint not in _registered:
            server = add_server(endpoint.encode())
            if server == ffi.NULL:
                raise ConnectionError(f"RPC server {endpoint} does not answer; start one there with "
                                      "`frankenllama-rpc-server -H HOST -p PORT`")
            lib.ggml_backend_register(server)
            _registered[endpoint] = [ffi.string(lib.ggml_backend_dev_name(lib.ggml_backend_reg_dev_get(server, i))).decode()
                                     for i in range(lib.ggml_backend_reg_dev_count(server))]
        devices += _registered[endpoint]
    return devices


def rpc_server_path() -> Path:
    """The ``rpc-server`` program built from the same patched, pinned llama.cpp."""
    lib_dir = native_library_dir()
    for candidate in (lib_dir.parent / "bin" / "rpc-server", lib_dir / "rpc-server"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"rpc-server is not installed next to {lib_dir}; reinstall frankenllama "
                            "with the RPC backend (the default)")


def server_main() -> None:
    """Console script ``frankenllama-rpc-server``: run llama.cpp's rpc-server with the given arguments."""
    path = rpc_server_path()
    os.execv(path, [str(path), *sys.argv[1:]])
