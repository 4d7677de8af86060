"""Child process for tests/test_rpc.py: one RPC scenario, a JSON report on the last stdout line.

    rpc_child.py offload MODEL ORDER N_GPU_LAYERS ENDPOINT [ENDPOINT...]
    rpc_child.py upload MODEL PRUNED_ORDER ENDPOINT
    rpc_child.py unreachable MODEL ENDPOINT
    rpc_child.py server-dies MODEL
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import numpy as np

import frankenllama
from frankenllama import Llama, _native
from frankenllama.gguf_tools import tensor_bytes_per_layer
from frankenllama.order import parse_spec
from frankenllama.rpc import rpc_server_path

PROMPT = b"The Frankenstein monster was assembled from parts of"
_BUFFER = re.compile(r"(\S+?)(?:\[[^\]]*\])? (model|KV) buffer size =\s+([\d.]+) MiB")


def _buffers(log: list[tuple[int, str]], kind: str) -> dict[str, float]:
    sizes: dict[str, float] = {}
    for _, text in log:
        match = _BUFFER.search(text)
        if match and match.group(2) == kind:
            sizes[match.group(1)] = sizes.get(match.group(1), 0.0) + float(match.group(3))
    return sizes


def _scores(llm: Llama, incremental: bool) -> np.ndarray:
    llm.reset()
    tokens = llm.tokenize(PROMPT)
    if incremental:
        for tok in tokens:
            llm.eval([tok])
    else:
        llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


def _load(model: str, **kw) -> tuple[Llama, list[tuple[int, str]]]:
    with _native.capture_llama_log() as log:
        llm = Llama(model, n_ctx=128, n_threads=1, logits_all=True, verbose=False, **kw)
    return llm, log


def offload(model: str, order: str, n_gpu_layers: str, *endpoints: str) -> dict:
    cpu, _ = _load(model, layer_order=order)
    want = [_scores(cpu, False), _scores(cpu, True)]
    cpu.close()
    ngl = int(n_gpu_layers)
    plain, _ = _load(model, rpc_servers=list(endpoints), n_gpu_layers=ngl)
    weight_devices = plain.layer_devices()  # no order: position i runs weight layer i
    plain.close()
    llm, log = _load(model, layer_order=order, rpc_servers=list(endpoints), n_gpu_layers=ngl)
    got = [_scores(llm, False), _scores(llm, True)]
    report = {"order": llm.layer_order, "devices": llm.layer_devices(), "weight_devices": weight_devices,
              "kv_buffer_mib": _buffers(log, "KV"),
              "identical_batch": bool(np.array_equal(got[0], want[0])),
              "identical_incremental": bool(np.array_equal(got[1], want[1]))}
    llm.close()
    return report


def upload(model: str, pruned: str, endpoint: str) -> dict:
    sizes = {}
    for name, order in (("full", None), ("pruned", pruned)):
        llm, log = _load(model, layer_order=order, rpc_servers=[endpoint], n_gpu_layers=99, use_mmap=False)
        sizes[name] = sum(v for k, v in _buffers(log, "model").items() if k.startswith("RPC"))
        llm.close()
    kept = set(parse_spec(pruned))
    per_layer = tensor_bytes_per_layer(model)
    dropped = sum(b for il, b in per_layer.items() if il not in kept) / 2**20
    return {"full_rpc_mib": sizes["full"], "pruned_rpc_mib": sizes["pruned"], "dropped_layer_mib": dropped}


def unreachable(model: str, endpoint: str) -> dict:
    report = {"error": None, "message": ""}
    try:
        Llama(model, rpc_servers=[endpoint], n_gpu_layers=99, verbose=False)
    except Exception as err:  # the test checks the type
        report = {"error": type(err).__name__, "message": str(err)}
    llm = Llama(model, n_ctx=64, verbose=False)  # the process goes on
    report["alive"] = len(llm.tokenize(b"still here")) > 0
    llm.close()
    return report


def server_dies(model: str) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(rpc_server_path()), "-p", str(port), "-t", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    llm = Llama(model, n_ctx=128, n_threads=1, rpc_servers=[f"127.0.0.1:{port}"], n_gpu_layers=99, verbose=False)
    server.kill()
    server.wait()
    llm("Tell me a story", max_tokens=16)  # llama.cpp's RPC client aborts the process here
    return {"survived": True}


if __name__ == "__main__":
    assert frankenllama.native_library_path().is_file()
    mode, args = sys.argv[1], sys.argv[2:]
    result = {"offload": offload, "upload": upload, "unreachable": unreachable,
              "server-dies": server_dies}[mode](*args)
    print(json.dumps(result))
