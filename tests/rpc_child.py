"""Child process for tests/test_rpc.py: one RPC scenario, a JSON report on the last stdout line.

    rpc_child.py offload MODEL ORDER N_GPU_LAYERS ENDPOINT [ENDPOINT...]
    rpc_child.py upload MODEL PRUNED_ORDER ENDPOINT
    rpc_child.py unreachable MODEL ENDPOINT
    rpc_child.py server-dies MODEL
    rpc_child.py hangs MODEL
    rpc_child.py registrations MODEL UNUSED_ENDPOINT
    rpc_child.py exit-with-dead-server MODEL
    rpc_child.py dead-and-stopped MODEL
    rpc_child.py malformed MODEL
    rpc_child.py threads MODEL
    rpc_child.py down-at-first-use MODEL
    rpc_child.py shared-server MODEL
"""
from __future__ import annotations

import json
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings

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
    report["idle_named"] = _outcome(lambda: Llama(model, n_ctx=128, n_threads=1, rpc_servers=f"127.0.0.1:{port}",
                                                  n_gpu_layers=99, verbose=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = Llama(model, n_ctx=256, n_threads=1, n_gpu_layers=99, verbose=False)  # every registered server
    report["idle_unnamed_devices"] = sorted(set(llm.layer_devices()))
    report["idle_unnamed_right"] = llm("Tell me a story", max_tokens=8, temperature=0.0)["choices"][0]["text"] == want
    report["idle_unnamed_warnings"] = [str(w.message) for w in caught]
    llm.close()
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
    for bad in ("127.0.0.1:99999", "127.0.0.1:0", "nohost", "a b:1", "[::1]:5", "127.0.0.1:5\n"):
        errors[bad] = _outcome(lambda: add_rpc_servers([bad]))
    errors["timeout=-1"] = _outcome(lambda: add_rpc_servers([], timeout=-1))
    errors["timeout=nan"] = _outcome(lambda: add_rpc_servers([], timeout=float("nan")))
    add_rpc_servers([], timeout=0)
    errors["timeout=0 sets"] = os.environ["GGML_RPC_TIMEOUT"]
    _outcome(lambda: add_rpc_servers([endpoint]))  # warm up whatever the first call allocates
    before = open_fds()
    failed = [_outcome(lambda: add_rpc_servers(endpoint)) for _ in range(100)]
    return {"errors": errors, "fds_before": before, "fds_after": open_fds(),
            "all_connection_errors": all(f.startswith("ConnectionError") for f in failed)}


def exit_with_dead_server(model: str) -> dict:
    """The server dies while a model on it is idle, and the program ends without closing it."""
    server, port = start_rpc_server()
    llm = Llama(model, n_ctx=128, n_threads=1, rpc_servers=f"127.0.0.1:{port}", n_gpu_layers=99, verbose=False)
    llm.eval(llm.tokenize(b"Hello"))
    server.kill(); server.wait()
    return {"exiting": True}  # the process must now exit (the test times it)


def dead_and_stopped(model: str) -> dict:
    """One registered server killed, one stopped (SIGSTOP), one healthy: loads that don't need the
    broken ones neither fail nor wait for them."""
    cpu, _ = _load(model)
    want = _scores(cpu)[0]
    cpu.close()
    (dead, dead_port), (stopped, stopped_port), (healthy, healthy_port) = (start_rpc_server() for _ in range(3))
    dead_ep, stopped_ep, healthy_ep = (f"127.0.0.1:{p}" for p in (dead_port, stopped_port, healthy_port))
    for endpoint in (dead_ep, stopped_ep, healthy_ep):
        _load(model, rpc_servers=[endpoint], n_gpu_layers=99)[0].close()
    healthy_devices = frankenllama.rpc.add_rpc_servers(healthy_ep)
    report: dict = {}
    dead.kill(); dead.wait()
    report["dead_requested"] = _outcome(lambda: Llama(model, rpc_servers=[dead_ep], n_gpu_layers=99, verbose=False))
    stopped.send_signal(signal.SIGSTOP)
    try:
        t0 = time.time()
        llm = _load(model, n_gpu_layers=0)[0]
        report["cpu_only_s"] = time.time() - t0
        report["cpu_only_identical"] = bool(np.array_equal(_scores(llm)[0], want))
        llm.close()
        t0 = time.time()
        llm = _load(model, rpc_servers=[healthy_ep], n_gpu_layers=99)[0]
        report["healthy_s"] = time.time() - t0
        report["healthy_devices"] = sorted(set(llm.layer_devices()))
        report["healthy_identical"] = bool(np.array_equal(_scores(llm)[0], want))
        llm.close()
    finally:
        stopped.send_signal(signal.SIGCONT)
    stopped.kill(); stopped.wait()
    llm = _load(model, n_gpu_layers=99)[0]  # every registered server: the two broken ones are left out
    report["all_devices"] = sorted(set(llm.layer_devices()))
    report["all_identical"] = bool(np.array_equal(_scores(llm)[0], want))
    llm.close()
    report["healthy_names"] = healthy_devices
    healthy.kill()
    return report


class FakeServer(threading.Thread):
    """An RPC server that speaks the protocol but lies: ``device_count`` devices, and buffers of
    half the requested size.  Anything else closes the connection."""

    HELLO, DEVICE_COUNT, ALLOC_BUFFER, GET_ALIGNMENT, GET_MAX_SIZE = 14, 15, 0, 1, 2
    GET_DEVICE_MEMORY, GET_ALLOC_SIZE, BUFFER_GET_BASE = 11, 13, 3

    def __init__(self, device_count: int, *, alignment: int = 32, alloc_size: int = 0, base: int = 0x10000,
                 short: bool = True) -> None:
        super().__init__(daemon=True)
        self.device_count = device_count
        self.alignment, self.alloc_size, self.base, self.short = alignment, alloc_size, base, short
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    @staticmethod
    def _recv(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    def _reply(self, cmd: int, request: bytes) -> bytes | None:
        if cmd == self.HELLO:
            return bytes([7, 0, 0, 0]) + bytes(24)
        if cmd == self.DEVICE_COUNT:
            return struct.pack("<I", self.device_count)
        if cmd == self.GET_DEVICE_MEMORY:
            return struct.pack("<QQ", 2**30, 2**30)
        if cmd == self.GET_ALIGNMENT:
            return struct.pack("<Q", self.alignment)
        if cmd == self.GET_MAX_SIZE:
            return struct.pack("<Q", 2**40)
        if cmd == self.GET_ALLOC_SIZE:
            return struct.pack("<Q", self.alloc_size)  # the client never uses less than the tensor's size
        if cmd == self.ALLOC_BUFFER:
            _, size = struct.unpack("<IQ", request)
            return struct.pack("<QQ", 0x10000, size // 2 if self.short else size)
        if cmd == self.BUFFER_GET_BASE:
            return struct.pack("<Q", self.base)
        return None

    def run(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            with conn:
                try:
                    while True:
                        cmd = self._recv(conn, 1)[0]
                        (size,) = struct.unpack("<Q", self._recv(conn, 8))
                        reply = self._reply(cmd, self._recv(conn, size))
                        if reply is None:
                            break
                        conn.sendall(struct.pack("<Q", len(reply)) + reply)
                except (ConnectionError, OSError):
                    pass


def malformed(model: str) -> dict:
    """A server whose replies are well framed but wrong: 4,294,967,295 devices, buffers smaller
    than asked.  Each is an exception in Python, not an abort or an out-of-memory death."""
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a runaway allocation fails here, not the machine
    report = {}
    many = FakeServer(0xFFFFFFFF)
    many.start()
    report["device_count"] = _outcome(lambda: frankenllama.rpc.add_rpc_servers(f"127.0.0.1:{many.port}"))
    short = FakeServer(1)
    short.start()
    report["short_buffer"] = _outcome(lambda: Llama(model, n_ctx=64, rpc_servers=f"127.0.0.1:{short.port}",
                                                    n_gpu_layers=99, verbose=False))
    for name, server in (("sixteen_devices", FakeServer(16)), ("alignment_3", FakeServer(1, alignment=3)),
                         ("unaligned_base", FakeServer(1, short=False, base=0x10001)),
                         ("huge_alloc_size", FakeServer(1, short=False, alloc_size=2**64 - 1))):
        server.start()
        report[name] = _outcome(lambda: Llama(model, n_ctx=64, rpc_servers=f"127.0.0.1:{server.port}",
                                              n_gpu_layers=99, verbose=False)("Hi", max_tokens=2))
    llm = Llama(model, n_ctx=64, verbose=False)
    report["alive"] = len(llm.tokenize(b"still here")) > 0
    return report


def threads(model: str) -> dict:
    """Two models on one server, decoding in two threads at once: each gets its own results."""
    server, port = start_rpc_server()
    orders = ["0-29", "0-29,8-22"]
    prompts = [PROMPT, b"A completely different prompt about the sea and its ships"]
    models = [_load(model, layer_order=o, rpc_servers=[f"127.0.0.1:{port}"], n_gpu_layers=99)[0] for o in orders]
    want = [eval_scores(llm, prompt) for llm, prompt in zip(models, prompts)]
    mismatches, errors = [], []

    def work(i: int) -> None:
        try:
            for _ in range(40):
                if not np.array_equal(eval_scores(models[i], prompts[i]), want[i]):
                    mismatches.append(i)
        except Exception as err:  # reported to the test
            errors.append(f"{type(err).__name__}: {err}")

    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for llm in models:
        llm.close()
    server_alive = server.poll() is None
    server.kill()
    return {"mismatches": len(mismatches), "errors": errors, "server_alive": server_alive}


def shared_server(model: str) -> dict:
    """Models sharing one server: closing or re-ordering one must not break another mid-stream; a
    state saved after the server died unnoticed is refused; a forked child neither uses nor waits
    for the parent's connections."""
    import os

    server, port = start_rpc_server()
    endpoint = f"127.0.0.1:{port}"
    cpu = Llama(model, n_ctx=256, n_threads=1, verbose=False)
    want = cpu("Tell me a story", max_tokens=12, temperature=0.0)["choices"][0]["text"]
    cpu.close()
    a = Llama(model, n_ctx=256, n_threads=1, rpc_servers=endpoint, n_gpu_layers=99, verbose=False)
    b = Llama(model, n_ctx=256, n_threads=1, rpc_servers=endpoint, n_gpu_layers=99, verbose=False)
    stream = a("Tell me a story", max_tokens=12, temperature=0.0, stream=True)
    text = next(stream)["choices"][0]["text"]
    b("Hi", max_tokens=2)
    b.set_layer_order("0-29,8-9")  # frees b's context buffers on the server
    b.close()                      # and its weights
    report = {"a_after_b_closed": _outcome(lambda: [None for _ in ()]), "a_text_right": False}
    try:
        text += "".join(chunk["choices"][0]["text"] for chunk in stream)
        report["a_text_right"] = text == want
    except Exception as err:  # reported
        report["a_after_b_closed"] = f"{type(err).__name__}: {err}"
    a.eval(a.tokenize(b"Hello"))
    pid = os.fork()
    if pid == 0:  # the child: exits at once (its inherited model must not be freed through RPC)
        os._exit(0 if _outcome(lambda: Llama(model, rpc_servers=endpoint, n_gpu_layers=99, verbose=False))
                 .startswith("RuntimeError") else 3)
    t0 = time.time()
    while time.time() - t0 < 30:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        status = -1
    report["fork_child_status"] = status
    server.kill(); server.wait()
    report["save_state_after_death"] = _outcome(a.save_state)
    a.close()
    return report


def down_at_first_use(model: str) -> dict:
    """The server does not answer when a load first asks for its buffer type, then answers again:
    the next load works (the buffer type is not stuck with the zero alignment of a failed reply)."""
    cpu, _ = _load(model)
    want = _scores(cpu)[0]
    cpu.close()
    server, port = start_rpc_server()
    endpoint = f"127.0.0.1:{port}"
    frankenllama.rpc.add_rpc_servers(endpoint, timeout=2)  # registered, but no buffer type asked for yet
    server.send_signal(signal.SIGSTOP)  # accepts connections (the kernel does), answers nothing
    t0 = time.time()
    report = {"down": _outcome(lambda: Llama(model, n_ctx=64, rpc_servers=endpoint, n_gpu_layers=99, verbose=False))}
    report["down_s"] = time.time() - t0
    server.send_signal(signal.SIGCONT)
    time.sleep(0.5)
    llm = _load(model, rpc_servers=[endpoint], n_gpu_layers=99)[0]
    report["devices"] = sorted(set(llm.layer_devices()))
    report["identical"] = bool(np.array_equal(_scores(llm)[0], want))
    llm.close()
    server.kill()
    return report


if __name__ == "__main__":
    assert frankenllama.native_library_path().is_file()
    mode, args = sys.argv[1], sys.argv[2:]
    result = {"offload": offload, "upload": upload, "unreachable": unreachable,
              "server-dies": server_dies, "hangs": hangs, "registrations": registrations,
              "exit-with-dead-server": exit_with_dead_server, "dead-and-stopped": dead_and_stopped,
              "malformed": malformed, "threads": threads, "down-at-first-use": down_at_first_use,
              "shared-server": shared_server}[mode](*args)
    print(json.dumps(result))
