#!/usr/bin/env python3
"""Layer programs on real models: what they say, how far they move, what they cost.

    python benchmarks/programs_bench.py [--quick] [--reps N] [--out benchmarks/results]

For SmolLM2-135M (30 layers) and Gemma 3 270M (18 layers, with --quick SmolLM2 only), runs the
three block-file examples of the Llama Blocks design scaled to the model's depth (one block; two
blocks, the second from another part of the file; three blocks whose last two both read the first
and are merged 50:50) and a damped-repeat program, and prints for each:

* a greedy continuation of a fixed prompt next to the original order's;
* the mean KL divergence of its next-token distributions from the original order's over a fixed
  text (``KL(original || program)``, nats per token);
* prompt-processing time against a plain order with the same positions (the same weight layer at
  every position, no damping or routing), measured back to back in alternating order, median of
  the per-repetition ratios (goal: at most 1.02x), and the compute buffer of both (the program
  keeps the outputs that later positions read: the difference is those tensors).

Writes ``programs.md`` and ``programs.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import gemma3_path, smollm2_path  # noqa: E402

import frankenllama  # noqa: E402,F401  (binds the patched library first)
from frankenllama import Llama, _native  # noqa: E402
from frankenllama.program import LayerProgram  # noqa: E402
from frankenllama.recipes import block_program, resolve_program  # noqa: E402

PROMPT = "The old lighthouse keeper looked at the sea and said"
TEXT = ("The river ran past the mill and under the stone bridge, where children stood every morning to "
        "watch the water. In spring it rose with the melting snow and carried branches, leaves and once "
        "a small wooden boat that nobody ever claimed. The miller said the boat had come from the hills, "
        "where a carpenter lived alone and built things he never sold. The children did not believe him, "
        "but they kept the boat in the barn, and every year they painted it a different colour.")
COMPUTE = re.compile(r"(\S+) compute buffer size =\s*([\d.]+) MiB")


def examples(n: int) -> dict[str, str]:
    """The Llama Blocks examples and a damped repeat, for a model of ``n`` layers."""
    half, quarter, third = n // 2, n // 4, n // 3
    return {
        "one block": f"WeightBlock; 0; {n}; 0; -1\nTotalLayers; {n}\n",
        "two blocks": (f"WeightBlock; 0; {half}; 0; -1\nWeightBlock; {half}; {n}; {quarter}; 0\n"
                       f"TotalLayers; {n}\n"),
        "three blocks, 50:50 merge": (
            f"WeightBlock; 0; {half}; 0; -1\nWeightBlock; {half}; {n}; {half}; 0\n"
            f"WeightBlock; {n}; {2 * n - half}; {quarter}; 0\nMergeBlock; 1; 0.5; 2; 0.5\n"
            f"TotalLayers; {2 * n - half}\n"),
        "damped repeat": ",".join([f"0-{third - 1}"] + [f"{il}@0.5,{il}@0.5" for il in range(third, 2 * third)]
                                  + [f"{2 * third}-{n - 1}"]),
    }


def program_of(recipe: str, n: int) -> LayerProgram:
    return block_program(recipe) if "Block" in recipe else resolve_program(recipe, n)


def load(path: str, program: LayerProgram | list[int], threads: int) -> tuple[Llama, float]:
    with _native.capture_llama_log() as log:
        llm = Llama(path, layer_order=program, n_ctx=512, n_batch=512, logits_all=True, n_threads=threads,
                    n_threads_batch=threads, verbose=False)
    compute = sum(float(m.group(2)) for _, text in log for m in [COMPUTE.search(text)] if m)
    return llm, compute


def log_probs(llm: Llama, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def mean_kl(p_log: np.ndarray, q_log: np.ndarray) -> float:
    return float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=1)))


def greedy(llm: Llama, n: int = 24) -> str:
    llm.reset()
    return llm(PROMPT, max_tokens=n, temperature=0.0)["choices"][0]["text"].strip().replace("\n", " ")


def prompt_seconds(llm: Llama, tokens: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    return time.perf_counter() - start


def bench_model(name: str, path: str, n: int, reps: int, threads: int) -> list[dict]:
    base, _ = load(path, list(range(n)), threads)
    tokens = base.tokenize(TEXT.encode())
    reference = log_probs(base, tokens)
    base_text = greedy(base)
    base.close()
    rows = [{"model": name, "program": "original order", "spec": f"0-{n - 1}", "positions": n, "kl": 0.0,
             "text": base_text}]
    for label, recipe in examples(n).items():
        program = program_of(recipe, n)
        llm, compute = load(path, program, threads)
        row = {"model": name, "program": label, "spec": program.spec, "positions": len(program.order),
               "kl": mean_kl(reference, log_probs(llm, tokens)), "text": greedy(llm)}
        if not program.is_plain:
            plain, plain_compute = load(path, list(program.order), threads)
            ratios = []
            for rep in range(reps):
                pair = (llm, plain) if rep % 2 == 0 else (plain, llm)
                times = {id(m): prompt_seconds(m, tokens) for m in pair}
                ratios.append(times[id(llm)] / times[id(plain)])
            plain.close()
            row.update(time_ratio=statistics.median(ratios), compute_mib=compute, plain_compute_mib=plain_compute)
        llm.close()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | program | positions | mean KL vs original | time vs plain order | compute buffer (plain) | greedy continuation |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        time_ratio = f"{r['time_ratio']:.3f}x" if "time_ratio" in r else "-"
        buffers = f"{r['compute_mib']:.1f} MiB ({r['plain_compute_mib']:.1f})" if "compute_mib" in r else "-"
        lines.append(f"| {r['model']} | {r['program']} `{r['spec']}` | {r['positions']} | {r['kl']:.3f} | {time_ratio} "
                     f"| {buffers} | {r['text'][:90]} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    models = [("SmolLM2-135M Q4_1", smollm2_path(), 30)]
    if not args.quick:
        models.append(("Gemma-3-270M Q4_K_M", gemma3_path(), 18))
    rows = [row for name, path, n in models for row in bench_model(name, path, n, args.reps, args.threads)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "programs.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (args.out / "programs.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
