"""llama.cpp's RPC backend: remote devices that ``n_gpu_layers`` offloads to, and their server.

An RPC server (``frankenllama-rpc-server -p 50052``) exposes a machine's backend (its CPU here,
a GPU where there is one) over TCP. :func:`add_rpc_servers` registers servers as devices the way
llama.cpp's own ``--rpc`` option does; models loaded afterwards in this process offload
``n_gpu_layers`` weight layers to them (and the K/V of every execution position that runs one of
those layers). llama-cpp-python 0.3.36 has no such option: ``frankenllama.Llama(...,
rpc_servers=[...])`` adds it.

Registration is process-wide and permanent, as in llama.cpp: every later load with
``n_gpu_layers > 0`` uses the registered servers.

A server that dies, stops answering or answers garbage never takes the process down (patch 0003):
ggml-rpc counts the connection as failed, every later operation on it fails, and
:func:`failed_servers` tells which servers a model depends on have failed, so ``Llama`` raises
``ConnectionError``.  Replies time out after ``GGML_RPC_TIMEOUT`` seconds (300 by default; set
it, or ``rpc_timeout=``, before a server is first used).  A restarted server on the same address is
reconnected by the next load.
"""
from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path
from typing import Any, Sequence

import cffi

from . import _native
from ._native import native_library_dir, open_native_library

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

_ENDPOINT = re.compile(r"^([A-Za-z0-9.\-]+):(\d{1,5})$")
_registered: dict[str, list[str]] = {}  # endpoint -> device names
_addresses: dict[tuple[str, int], str] = {}  # (IPv4 address, port) -> the endpoint registered for it


def _ggml() -> tuple[cffi.FFI, Any]:
    return open_native_library("ggml", _CDEF)


def _address(endpoint: str) -> tuple[str, int]:
    """``(IPv4 address, port)`` of ``"host:port"``; ValueError naming what is wrong."""
    match = _ENDPOINT.match(endpoint)
    if not match:
        raise ValueError(f"RPC server {endpoint!r} is not host:port (e.g. 127.0.0.1:50052; ggml-rpc speaks IPv4)")
    host, port = match.group(1), int(match.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"RPC server {endpoint!r}: port {port} is not in 1-65535")
    try:
        return socket.gethostbyname(host), port
    except OSError as err:
        raise ConnectionError(f"RPC server {endpoint}: cannot resolve {host!r} ({err})") from None


def _rpc_function(name: str, signature: str) -> Any:
    ffi, lib = _ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if reg == ffi.NULL:
        raise RuntimeError("this frankenllama build has no RPC backend; reinstall with CMAKE_ARGS=\"-DGGML_RPC=ON\"")
    return ffi.cast(signature, lib.ggml_backend_reg_get_proc_address(reg, name.encode()))


def add_rpc_servers(endpoints: Sequence[str] | str, *, timeout: float | None = None) -> list[str]:
    """Register RPC servers (``"host:port"``) as devices; return their device names (``RPC0``, ...).

    A single string is one endpoint.  An endpoint already registered (under any name resolving to
    the same address) is not registered again: one rpc-server serves one client at a time, and a
    second connection from this process would wait for the first forever.

    Args:
        timeout: seconds to wait for a connection or a reply (sets ``GGML_RPC_TIMEOUT`` for the
            connections made from now on); None keeps the current setting (300 s by default).

    Raises:
        ValueError: an endpoint is not ``host:port`` with a port in 1-65535, or names a server
            already registered under another name.
        RuntimeError: this build has no RPC backend.
        ConnectionError: a server does not answer (within the timeout).
    """
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if timeout is not None:
        os.environ["GGML_RPC_TIMEOUT"] = str(max(1, int(round(timeout))))
    ffi, lib = _ggml()
    add_server = _rpc_function("ggml_backend_rpc_add_server", "ggml_backend_reg_t (*)(const char *)")
    devices: list[str] = []
    for endpoint in endpoints:
        if not isinstance(endpoint, str):
            raise TypeError(f"an RPC server is a 'host:port' string, not {type(endpoint).__name__}")
        address = _address(endpoint)
        known = _addresses.get(address)
        if known is not None and known != endpoint:
            raise ValueError(f"RPC server {endpoint} is {known}, registered already: name it {known}")
        if endpoint not in _registered:
            server = add_server(endpoint.encode())
            if server == ffi.NULL:
                raise ConnectionError(f"RPC server {endpoint} does not answer; start one there with "
                                      "`frankenllama-rpc-server -H HOST -p PORT` (a server serves one client "
                                      "at a time: is another process using it?)")
            lib.ggml_backend_register(server)
            _registered[endpoint] = [ffi.string(lib.ggml_backend_dev_name(lib.ggml_backend_reg_dev_get(server, i))).decode()
                                     for i in range(lib.ggml_backend_reg_dev_count(server))]
            _addresses[address] = endpoint
        devices += _registered[endpoint]
    return devices


def failures() -> dict[str, int]:
    """Failed connections so far, per registered endpoint (a snapshot to compare with later)."""
    if not _registered:
        return {}
    get = _rpc_function("ggml_backend_rpc_get_failures", "uint32_t (*)(const char *)")
    return {endpoint: int(get(endpoint.encode())) for endpoint in _registered}


def failed_servers(since: dict[str, int], endpoints: Sequence[str]) -> list[str]:
    """Those of ``endpoints`` whose connection failed after the :func:`failures` snapshot ``since``."""
    now = failures() if endpoints else {}
    return [endpoint for endpoint in endpoints if now.get(endpoint, 0) > since.get(endpoint, 0)]


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
    # a CUDA build whose runtime libraries only frankenllama's preload reached at import (see
    # _native.load_cuda_runtime): the program gets the same folder through the loader's path
    folders = dict.fromkeys(str(Path(p).parent) for p in _native.cuda_runtime_preloaded)
    if folders:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([*folders, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
    os.execv(path, [str(path), *sys.argv[1:]])
