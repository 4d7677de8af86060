"""Bootstrap intervals, gains under a ranking metric, and the Pareto front of overhead vs gain."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

#: ranking metrics: what "gain" means (always higher = better)
RANKS = ("ppl", "kl", "probe")
#: tokens per text block for the block bootstrap
BLOCK_TOKENS = 32
N_BOOT = 1000
LEVEL = 0.95


def block_sums(values: np.ndarray, block: int = BLOCK_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """Sums and counts of ``values`` over consecutive blocks of ``block`` entries."""
    n = len(values)
    starts = np.arange(0, n, block)
    return np.add.reduceat(values, starts) if n else np.zeros(0), np.diff(np.append(starts, n))


def bootstrap_ci(sums: np.ndarray, counts: np.ndarray, *, n_boot: int = N_BOOT, level: float = LEVEL,
                 seed: int = 0) -> list[float]:
    """Percentile interval of sum(sums)/sum(counts) over units resampled with replacement (a fixed
    seed: the same inputs always give the same interval)."""
    n = len(sums)
    if n < 2:
        value = float(np.sum(sums) / max(1, np.sum(counts)))
        return [value, value]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def gain(row: dict[str, Any], rank: str) -> float:
    """How much better than the base order ``row`` is under ``rank`` (higher is better):
    ``ppl``: mean NLL saved per token (nats); ``kl``: minus the KL from the base; ``probe``: probe
    score over the base's."""
    if rank == "ppl":
        return -float(row["dnll"]) + 0.0  # + 0.0: no -0.0
    if rank == "kl":
        return -float(row["kl"]) + 0.0
    if rank == "probe":
        if row.get("dprobe") is None:
            raise ValueError("rank 'probe' needs probe scores: the scan was run without probes")
        return float(row["dprobe"])
    raise ValueError(f"unknown rank {rank!r}: use one of {', '.join(RANKS)}")


def penalized(row: dict[str, Any], rank: str, penalty: float, n_layer: int) -> float:
    """Gain minus ``penalty`` per 100 % extra compute (extra positions / weight layers)."""
    return gain(row, rank) - penalty * float(row["extra_positions"]) / n_layer


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, gain) that no other point beats: no other has cost <= and
    gain >= with one of them strict.  Sorted by cost."""
    order = sorted(range(len(points)), key=lambda k: (points[k][0], -points[k][1]))
    front: list[int] = []
    best = -np.inf
    for k in order:
        if points[k][1] > best:
            front.append(k)
            best = points[k][1]
    return front
