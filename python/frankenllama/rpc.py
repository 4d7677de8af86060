"""llama.cpp's RPC backend: remote devices that ``n_gpu_layers`` offloads to, and their server.

An RPC server (``frankenllama-rpc-server -p 50052``) exposes a machine's backend (its CPU here,
a GPU where there is one) over TCP. :func:`add_rpc_servers` registers servers as devices the way
llama.cpp's own ``--rpc`` option does; models loaded afterwards in this process offload
``n_gpu_layers`` weight layers to them (and the K/V of every execution position that runs one of
those layers). llama-cpp-python 0.3.36 has no such option: ``frankenllama.Llama(...,
rpc_servers=[...])`` adds it.

Registration is process-wide and permanent, as in llama.cpp.  A load offloads to the servers its
``Llama`` names, or to every registered one that still accepts connections when it names none,
and to none when ``n_gpu_layers`` is 0 (:func:`load_devices`).

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
import threading
import warnings
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
size_t             ggml_backend_dev_count(void);
ggml_backend_dev_t ggml_backend_dev_get(size_t index);
int                ggml_backend_dev_type(ggml_backend_dev_t device);
ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device);
const char *       ggml_backend_reg_name(ggml_backend_reg_t reg);
struct ggml_backend_dev_props {
    const char * name; const char * description; size_t memory_free; size_t memory_total;
    int type; const char * device_id;
    bool caps[64];  /* struct ggml_backend_dev_caps (a few bools), with room to grow */
};
void               ggml_backend_dev_get_props(ggml_backend_dev_t device, struct ggml_backend_dev_props * props);
"""

#: devices a model can use besides the CPU (GGML_SCHED_MAX_BACKENDS is 16)
_MAX_DEVICES = 15
#: enum ggml_backend_dev_type (ggml-backend.h)
_DEVICE_GPU, _DEVICE_IGPU = 1, 2

_ENDPOINT = re.compile(r"([A-Za-z0-9.\-]+):([0-9]{1,5})", re.ASCII)
_lock = threading.Lock()  # registrations: check and register at once
_pid = os.getpid()  # ggml-rpc's connections (and their threads) belong to this process
_registered: dict[str, list[str]] = {}  # endpoint -> device names
_addresses: dict[tuple[str, int], str] = {}  # (IPv4 address, port) -> the endpoint registered for it


def _ggml() -> tuple[cffi.FFI, Any]:
    return open_native_library("ggml", _CDEF)


def _address(endpoint: str) -> tuple[str, int]:
    """``(IPv4 address, port)`` of ``"host:port"``; ValueError naming what is wrong."""
    match = _ENDPOINT.fullmatch(endpoint)
    if not match:
        raise ValueError(f"RPC server {endpoint!r} is not host:port (e.g. 127.0.0.1:50052; ggml-rpc speaks IPv4)")
    host, port = match.group(1), int(match.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"RPC server {endpoint!r}: port {port} is not in 1-65535")
    try:
        address = socket.gethostbyname(host)
    except (OSError, UnicodeError) as err:
        raise ConnectionError(f"RPC server {endpoint}: cannot resolve {host!r} ({err})") from None
    if address == "0.0.0.0" or address.startswith("127."):
        address = "127.0.0.1"  # this machine, however it is named
    return address, port


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
        timeout: seconds to wait for a connection or for the next bytes of a reply (sets
            ``GGML_RPC_TIMEOUT`` for the connections made from now on; 0 waits forever); None keeps
            the current setting (300 s by default).

    Raises:
        ValueError: an endpoint is not ``host:port`` with a port in 1-65535, or names a server
            already registered under another name; the timeout is negative.
        RuntimeError: this build has no RPC backend.
        ConnectionError: a server does not answer (within the timeout).
    """
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if timeout is not None:
        if not 0 <= timeout < float("inf"):
            raise ValueError(f"rpc_timeout must be >= 0 seconds (0: wait forever), not {timeout}")
        os.environ["GGML_RPC_TIMEOUT"] = str(max(1, round(timeout)) if timeout else 0)
    ffi, lib = _ggml()
    add_server = _rpc_function("ggml_backend_rpc_add_server", "ggml_backend_reg_t (*)(const char *)")
    devices: list[str] = []
    with _lock:
        _check_same_process()
        for endpoint in endpoints:
            devices += _register(endpoint, ffi, lib, add_server)
    return devices


def _check_same_process() -> None:
    if _registered and os.getpid() != _pid:
        raise RuntimeError("RPC servers were registered in the parent of this forked process; their "
                           "connections do not survive a fork: use RPC servers only in the process that "
                           "registered them (or start this one with the spawn method)")


def _register(endpoint: str, ffi: Any, lib: Any, add_server: Any) -> list[str]:
    """Register one endpoint (under the lock); its device names."""
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
    return _registered[endpoint]


def registered() -> list[str]:
    """The endpoints registered so far in this process."""
    return list(_registered)


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


def _answers(endpoint: str, timeout: float = 2.0) -> bool:
    """Whether something accepts connections at ``endpoint`` (a killed server does not)."""
    try:
        with socket.create_connection(_address(endpoint), timeout=timeout):
            return True
    except OSError:
        return False


def load_devices(endpoints: Sequence[str] | None, n_gpu_layers: int) -> tuple[list[int] | None, list[str]]:
    """The devices a model load should offload to (``ggml_backend_dev_t`` addresses, for
    ``llama_model_params.devices``; None for llama.cpp's own choice, when no RPC server is
    registered), and the RPC servers among them.

    llama.cpp's own choice is every GPU and every registered RPC server, each queried during every
    load, even one that offloads nothing: a dead server would fail the load and a stopped one would
    stall it for the whole timeout.  So a load uses:

    - no RPC server when ``n_gpu_layers`` is 0 (the CPU runs every layer; RPC devices take no
      other work);
    - else the servers in ``endpoints`` when given (the model's ``rpc_servers``; one that accepts
      no connection now is an error), or every registered one, leaving out (with a RuntimeWarning)
      those that accept no connection now.  A server restarted on the same address is used again.

    Local GPUs are kept as llama.cpp picks them (discrete GPUs once per device id; integrated
    ones only without a discrete one).

    Raises:
        ConnectionError: a server in ``endpoints`` failed and does not answer.
    """
    if not _registered:
        return None, []
    if n_gpu_layers != 0:
        _check_same_process()
    rpc_devices: list[str] = []
    used: list[str] = []
    if n_gpu_layers != 0:
        for endpoint in endpoints if endpoints is not None else list(_registered):
            if not _answers(endpoint):
                if endpoints is not None:
                    raise ConnectionError(f"RPC server {endpoint} does not answer any more; restart it there "
                                          "(`frankenllama-rpc-server -H HOST -p PORT`), or load without it")
                warnings.warn(f"RPC server {endpoint} does not answer any more: this load leaves it out",
                              RuntimeWarning, stacklevel=3)
                continue
            rpc_devices += _registered[endpoint]
            used.append(endpoint)
    ffi, lib = _ggml()
    chosen: list[Any] = []
    gpus, igpus, gpu_ids = [], [], set()
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        reg_name = ffi.string(lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev))).decode()
        kind = lib.ggml_backend_dev_type(dev)
        if reg_name == "RPC":
            if ffi.string(lib.ggml_backend_dev_name(dev)).decode() in rpc_devices:
                chosen.append(dev)
        elif kind == _DEVICE_GPU:
            props = ffi.new("struct ggml_backend_dev_props *")
            lib.ggml_backend_dev_get_props(dev, props)
            device_id = ffi.string(props.device_id).decode() if props.device_id != ffi.NULL else None
            if device_id is None or device_id not in gpu_ids:
                gpus.append(dev)
                gpu_ids.add(device_id)
        elif kind == _DEVICE_IGPU:
            if not igpus or lib.ggml_backend_dev_backend_reg(dev) == lib.ggml_backend_dev_backend_reg(igpus[-1]):
                igpus.append(dev)
    devices = chosen + gpus + (igpus if not gpus else [])
    if len(devices) > _MAX_DEVICES:
        raise ValueError(f"{len(devices)} devices ({len(chosen)} on RPC servers): llama.cpp's scheduler takes "
                         f"{_MAX_DEVICES} besides the CPU; name fewer servers with rpc_servers=")
    return [int(ffi.cast("uintptr_t", dev)) for dev in devices], used


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
