#!/usr/bin/env python3
"""`frankenllama scan` speed: a RYS sweep with prefix caching vs naive recompute, same machine, one run.

    python benchmarks/scan_bench.py [--quick] [--stride S] [--models smollm2,gemma3] [--threads 2]

For each model: the text is the package's default text cut to at most ``--tokens`` (512) tokens of
that model; ``n_ctx`` = ``--tokens``, so the whole text is one decode per order.  The same sweep runs
twice in one process on one loaded model, naive (``prefix_cache=False``) and cached, one order of
each in turn (so that load from other processes hits both alike); the figures are the orders per
second of each, their ratio, the execution positions each decoded, each sweep's total time (decodes,
re-ordering and scoring; the results file is not written), and whether both gave bit-identical
scores (they must: caching is exact).  The full
sweep is every RYS (i, j) (466 orders for SmolLM2's 30 layers, 172 for Gemma 3's 18); ``--stride S``
(``--quick``: 3) scans the (i, j) grid 0, S, 2S, ... which keeps the mix of prefix lengths.
Writes ``--out/scan_bench.json`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import gemma3_path, smollm2_path  # noqa: E402  (benchmarks/run.py: the model locations)

MODELS = {"smollm2": ("SmolLM2-135M Q4_1", smollm2_path), "gemma3": ("Gemma-3-270M Q4_K_M", gemma3_path)}


def fixed_text(model: str, n_tokens: int) -> tuple[str, int]:
    """The longest prefix of the default text (whole lines) that is at most ``n_tokens`` tokens."""
    import frankenllama
    from frankenllama.scanning import default_text

    llm = frankenllama.Llama(model, vocab_only=True, verbose=False)
    try:
        def count(text: str) -> int:
            return len(llm.tokenize(text.encode(), add_bos=True, special=False))
        words = default_text().split(" ")
        lo, hi = 1, len(words)
        while lo < hi:  # most words whose text fits
            mid = (lo + hi + 1) // 2
            if count(" ".join(words[:mid])) <= n_tokens:
                lo = mid
            else:
                hi = mid - 1
        text = " ".join(words[:lo])
        return text, count(text)
    finally:
        llm.close()


def run_interleaved(model: str, text: str, n_tokens: int, stride: int, threads: int) -> dict[str, Any]:
    """Score the sweep naive and cached, one order of each in turn (machine noise hits both alike)."""
    from frankenllama.scanning import run as scan_run

    with scan_run._quiet_llama_log():
        return _interleaved(scan_run, model, text, n_tokens, stride, threads)


def _interleaved(scan_run: Any, model: str, text: str, n_tokens: int, stride: int, threads: int) -> dict[str, Any]:
    import numpy as np

    from frankenllama.scanning.engine import Evaluator, prepare_llama
    from frankenllama.scanning.inputs import build_dataset
    from frankenllama.scanning.sweeps import rys_configs

    llm = scan_run._load(Path(model), n_tokens, threads)
    try:
        tokenize = scan_run._tokenizer(llm)
        dataset = build_dataset("search", tokenize(text, True), [], tokenize, n_tokens)
        prepare_llama(llm, n_tokens, dataset.n_seqs_max)
        base = llm.file_layer_order()
        orders = [base] + [list(c.order) for c in rys_configs(len(base), stride)]
        runs = {"naive": Evaluator(llm, dataset, base, prefix_cache=False),
                "cached": Evaluator(llm, dataset, base, prefix_cache=True)}
        gens = {k: ev.score_many(orders) for k, ev in runs.items()}
        seconds = {k: 0.0 for k in runs}
        identical = True
        for index in range(len(orders)):
            got = {}
            for k in (("naive", "cached") if index % 2 == 0 else ("cached", "naive")):
                t0 = time.perf_counter()
                got[k] = next(gens[k])[1]
                seconds[k] += time.perf_counter() - t0
            a, b = got["naive"], got["cached"]
            identical &= bool(np.array_equal(a.nll, b.nll) and np.array_equal(a.kl, b.kl))
            print(f"\r  {index + 1}/{len(orders)} naive {seconds['naive']:.0f} s, cached {seconds['cached']:.0f} s",
                  end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        out = {k: {"configs": len(orders), "seconds": seconds[k], "configs_per_s": len(orders) / seconds[k],
                   "positions_run": ev.positions_run, "decodes": ev.decodes, "prefix_cache": ev.prefix_note}
               for k, ev in runs.items()}
        for ev in runs.values():
            ev.close()
        return {**out, "identical_scores": identical}
    finally:
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="stride 3 (56 SmolLM2 orders, 22 Gemma 3 orders)")
    ap.add_argument("--stride", type=int, help="(i, j) grid step (default 1: the full sweep)")
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    stride = args.stride or (3 if args.quick else 1)
    args.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "commit": commit, "cpu": platform.processor()
            or platform.machine(), "cpus": os.cpu_count(), "load_start": os.getloadavg()[0],
            "threads": args.threads, "stride": stride, "tokens": args.tokens}
    results: dict[str, Any] = {}
    started = time.perf_counter()
    if True:
        for key in args.models.split(","):
            name, locate = MODELS[key]
            model = locate()
            text, n = fixed_text(model, args.tokens)
            print(f"{name}: {n} tokens, stride {stride}", file=sys.stderr)
            r = run_interleaved(model, text, args.tokens, stride, args.threads)
            results[key] = {"name": name, "text_tokens": n, **r,
                            "speedup": r["cached"]["configs_per_s"] / r["naive"]["configs_per_s"]}
    meta["load_end"] = os.getloadavg()[0]
    meta["minutes"] = (time.perf_counter() - started) / 60
    (args.out / "scan_bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\n{meta['date']} · commit {commit} · {meta['cpu']} ({meta['cpus']} CPUs, load avg at start "
          f"{meta['load_start']:.2f}, end {meta['load_end']:.2f}) · {args.threads} threads · "
          f"{meta['minutes']:.1f} min\n")
    print("| Model | sweep | text tokens | orders | naive orders/s | cached orders/s | ratio (goal ≥ 1.8×) | "
          "positions decoded naive / cached | sweep time naive / cached | scores identical |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---|")
    for r in results.values():
        nv, ch = r["naive"], r["cached"]
        sweep = "rys, full" if stride == 1 else f"rys, stride {stride}"
        print(f"| {r['name']} | {sweep} | {r['text_tokens']} | {nv['configs']} | {nv['configs_per_s']:.3f} | "
              f"{ch['configs_per_s']:.3f} | {r['speedup']:.2f}× {'yes' if r['speedup'] >= 1.8 else '**no**'} | "
              f"{nv['positions_run']:,} / {ch['positions_run']:,} | {nv['seconds']:.0f} s / {ch['seconds']:.0f} s | "
              f"{'yes' if r['identical_scores'] else '**no**'} |")


if __name__ == "__main__":
    main()
