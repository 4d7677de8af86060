"""Child process for tests/test_rpc.py: one RPC scenario, a JSON report on the last stdout line.

    rpc_child.py offload MODEL ORDER N_GPU_LAYERS ENDPOINT [ENDPOINT...]
    rpc_child.py upload MODEL PRUNED_ORDER ENDPOINT
    rpc_child.py unreachable MODEL ENDPOINT
    rpc_child.py server-dies MODEL
    rpc_child.py hangs MODEL
    rpc_child.py registrations MODEL UNUSED_ENDPOINT
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import numpy as np

import frankenllama
from frankenllama import Llama, _native
from frankenllama.gguf_tools import tensor_bytes_per_layer
from frankenllama.order import parse_spec
from helpers import eval_scores, load, start_rpc_server

PROMPT = b"The Frankenstein monster was assembled from parts of"
_BUFFER = re.compile(r"(\S+?)(?:\[[^\]]*\])? (model|KV) buffer size =\s+([\d.]+) MiB")


def _buffers(log: list[tuple[int, str]], kind: str) -> dict[str, float]:
    sizes: dict[str, float] = {}
    for _, text in log:
        match = _BUFFER.search(text)
        if match and match.group(2) == kind:
            sizes[match.group(1)] = sizes.get(match.group(1), 0.0) + float(match.group(3))
    return sizes


def _scores(llm: Llama) -> list[np.ndarray]:
    """Logits of PROMPT, in one batch and token by token."""
    return [eval_scores(llm, PROMPT), eval_scores(llm, PROMPT, incremental=True)]


def _load(model: str, **kw) -> tuple[Llama, list[tuple[int, str]]]:
    with _native.capture_llama_log() as log:
        llm = load(model, n_ctx=128, n_threads_batch=None, logits_all=True, **kw)
    return llm, log


def offload(model: str, order: str, n_gpu_layers: str, *endpoints: str) -> dict:
    cpu, _ = _load(model, layer_order=order)
    want = _scores(cpu)
    cpu.close()
    ngl = int(n_gpu_layers)
    plain, _ = _load(model, rpc_servers=list(endpoints), n_gpu_layers=ngl)
    weight_devices = plain.layer_devices()  # no order: position i runs weight layer i
    plain.close()
    llm, log = _load(model, layer_order=order, rpc_servers=list(endpoints), n_gpu_layers=ngl)
    got = _scores(llm)
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


def _kill_after(server: subprocess.Popen, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, server.kill)
    timer.start()
    return timer


def _outcome(action) -> str:
    """What happened: 'ok', or the exception type (the process itself must survive)."""
    try:
        action()
        return "ok"
    except Exception as err:  # the test checks the type and the message
        return f"{type(err).__name__}: {err}"


def server_dies(model: str) -> dict:
    """Kill the server (SIGKILL) during prompt processing, token generation, model upload and while
    idle; after each, a CPU model in the same process must still answer exactly as before."""
    cpu = Llama(model, n_ctx=256, n_threads=1, verbose=False)
    want = cpu("Tell me a story", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    cpu.close()

    def cpu_still_right() -> bool:
        llm = Llama(model, n_ctx=256, n_threads=1, verbose=False)
        text = llm("Tell me a story", max_tokens=8, temperature=0.0)["choices"][0]["text"]
        llm.close()
        return text == want

    report: dict = {}
    long_prompt = "Once upon a time, " * 40

    # 1. during prompt processing (a long prompt, the kill lands while it is computed)
    server, port = start_rpc_server()
    llm = Llama(model, n_ctx=512, n_threads=1, rpc_servers=f"127.0.0.1:{port}", n_gpu_layers=99, verbose=False)
    timer = _kill_after(server, 0.05)
    report["prompt"] = _outcome(lambda: [llm(long_prompt, max_tokens=4, temperature=0.0) for _ in range(50)])
    timer.join(); server.wait()
    report["prompt_again"] = _outcome(lambda: llm("Hi", max_tokens=2))  # later calls fail the same way
    llm.close()
    report["prompt_cpu"] = cpu_still_right()

    # 2. during token generation (the server restarts on the same port: a reload must work)
    server, port = start_rpc_server(port)
    llm = Llama(model, n_ctx=512, n_threads=1, rpc_servers=f"127.0.0.1:{port}", n_gpu_layers=99, verbose=False)
    report["restarted_same"] = llm("Tell me a story", max_tokens=8, temperature=0.0)["choices"][0]["text"] == want
    stream = llm("Tell me a story", max_tokens=200, temperature=0.0, stream=True)
    next(stream)
    server.kill(); server.wait()
    report["generation"] = _outcome(lambda: [chunk for chunk in stream])
    llm.close()
    report["generation_cpu"] = cpu_still_right()

    # 3. during model upload
    server, port = start_rpc_server(port)
    timer = _kill_after(server, 0.02)
    report["upload"] = _outcome(lambda: Llama(model, n_ctx=128, n_threads=1, rpc_servers=f"127.0.0.1:{port}",
                                              n_gpu_layers=99, use_mmap=False, verbose=False)("Hi", max_tokens=2))
    timer.join(); server.wait()
    report["upload_cpu"] = cpu_still_right()

    # 5. only the output layer on the server (n_gpu_layers=1: every position runs on the CPU)
    server, port = start_rpc_server(port)
    llm = Llama(model, n_ctx=128, n_threads=1, rpc_servers=f"127.0.0.1:{port}", n_gpu_layers=1, verbose=False)
    llm.eval(llm.tokenize(b"Hello"))
    server.kill(); server.wait()
    report["output_only"] = _outcome(lambda: llm.eval(llm.tokenize(b" world")))
    llm.close()

    # 4. while idle: loads that don't use it work, loads that do fail cleanly
    server, port = start_rpc_server(port)
    Llama(model, n_ctx=128, n_threads=1, rpc_servers=f"127.0.0.1:{port}", n_gpu_layers=99, verbose=False).close()
    server.kill(); server.wait()
    report["idle_cpu"] = cpu_still_right()
    report["idle_offload"] = _outcome(lambda: Llama(model, n_ctx=128, n_threads=1, n_gpu_layers=99, verbose=False))
    return report


def hangs(model: str) -> dict:
    """Registrations that used to block forever: the same server under two names, a server that
    another client holds."""
    server, port = start_rpc_server()
    report = {}
    t0 = time.time()
    report["two_names"] = _outcome(lambda: Llama(model, rpc_servers=[f"127.0.0.1:{port}", f"localhost:{port}"],
                                                 n_gpu_layers=99, verbose=False))
    report["two_names_s"] = time.time() - t0
    other, other_port = start_rpc_server()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(other_port), model], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()  # another process holds that server now
    t0 = time.time()
    report["busy"] = _outcome(lambda: Llama(model, rpc_servers=[f"127.0.0.1:{other_port}"], rpc_timeout=2,
                                            n_gpu_layers=99, verbose=False))
    report["busy_s"] = time.time() - t0
    holder.kill(); server.kill(); other.kill()
    return report


HOLDER = """
import sys, time
from frankenllama import Llama
llm = Llama(sys.argv[2], rpc_servers=["127.0.0.1:" + sys.argv[1]], n_gpu_layers=99, verbose=False)
print("holding", flush=True)
time.sleep(60)
"""


def registrations(model: str, endpoint: str) -> dict:
    """Failed registrations leak no socket; malformed endpoints are refused before any."""
    import os

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    from frankenllama.rpc import add_rpc_servers

    errors = {}
    for bad in ("127.0.0.1:99999", "127.0.0.1:0", "nohost", "a b:1", "[::1]:5"):
        errors[bad] = _outcome(lambda: add_rpc_servers([bad]))
    _outcome(lambda: add_rpc_servers([endpoint]))  # warm up whatever the first call allocates
    before = open_fds()
    failed = [_outcome(lambda: add_rpc_servers(endpoint)) for _ in range(100)]
    return {"errors": errors, "fds_before": before, "fds_after": open_fds(),
            "all_connection_errors": all(f.startswith("ConnectionError") for f in failed)}


if __name__ == "__main__":
    assert frankenllama.native_library_path().is_file()
    mode, args = sys.argv[1], sys.argv[2:]
    result = {"offload": offload, "upload": upload, "unreachable": unreachable,
              "server-dies": server_dies, "hangs": hangs, "registrations": registrations}[mode](*args)
    print(json.dumps(result))
