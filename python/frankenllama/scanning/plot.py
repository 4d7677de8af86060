"""PNG plots of a scan (matplotlib, an optional extra: ``pip install frankenllama[plot]``).

- ``<out>.rys.png``: triangular heatmap of the gain of every RYS (i, j) (y: i, the first repeated
  layer; x: j, one past the last), with ``<out>.rys.json``: the colour scale and the pixel centre
  of every cell, so the picture can be checked against the rows;
- ``<out>.prune.png``: bar chart of the gain of dropping each layer;
- ``<out>.pareto.png``: extra positions vs gain of every order, the Pareto front joined.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .results import atomic_write, front
from .stats import gain

CMAP = "RdBu"
DPI = 100
_LABEL = {"ppl": "gain: NLL saved per token (nats)", "kl": "gain: -KL from the base order (nats/token)",
          "probe": "gain: probe score over the base order"}


def _atomic_save(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))


def _atomic_json(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8"))


def plot_results(path: Path, header: dict[str, Any], rows: Sequence[dict[str, Any]], rank: str) -> tuple[list[Path], str]:
    """Write the plots that the rows allow; returns their paths and a note (why none, if so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return [], "no plots: matplotlib is not installed (pip install 'frankenllama[plot]')"
    search = [r for r in rows if r.get("split") == "search"]
    written: list[Path] = []
    stem = path.with_suffix("") if path.suffix == ".jsonl" else path
    rys = [r for r in search if r.get("sweep") == "rys"]
    if rys:
        written += heatmap(rys, int(header["n_layer"]), rank, Path(f"{stem}.rys.png"))
    prune = [r for r in search if r.get("sweep") == "prune" and r["params"].get("k") == 1]
    if prune:
        written.append(prune_bars(prune, int(header["n_layer"]), rank, Path(f"{stem}.prune.png")))
    if len(search) > 1:
        written.append(pareto(search, rank, Path(f"{stem}.pareto.png")))
    return written, ""


def heatmap(rows: Sequence[dict[str, Any]], n_layer: int, rank: str, png: Path) -> list[Path]:
    """Triangular (i, j) heatmap of the gain; writes ``png`` and its ``.json`` cell map."""
    import matplotlib.pyplot as plt

    rows_i = sorted({int(r["params"]["i"]) for r in rows})
    cols_j = sorted({int(r["params"]["j"]) for r in rows})
    matrix = np.full((len(rows_i), len(cols_j)), np.nan)
    for r in rows:
        matrix[rows_i.index(r["params"]["i"]), cols_j.index(r["params"]["j"])] = gain(r, rank)
    finite = matrix[np.isfinite(matrix)]
    vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    size = min(14.0, max(5.0, 0.25 * max(len(rows_i), len(cols_j)) + 2.5))
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=DPI)
    try:
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=CMAP, vmin=-vmax, vmax=vmax,
                          interpolation="nearest", origin="upper", aspect="auto")
        step = max(1, len(cols_j) // 16)
        ax.set_xticks(range(0, len(cols_j), step), [str(j) for j in cols_j[::step]])
        step = max(1, len(rows_i) // 16)
        ax.set_yticks(range(0, len(rows_i), step), [str(i) for i in rows_i[::step]])
        ax.set_xlabel("j (the repeat ends before layer j)")
        ax.set_ylabel("i (first repeated layer)")
        ax.set_title(f"RYS (i, j): layers 0..j-1 then i..{n_layer - 1}")
        fig.colorbar(image, ax=ax, label=_LABEL[rank])
        fig.canvas.draw()
        height = fig.canvas.get_width_height()[1]
        cells = []
        for a, b in zip(*np.nonzero(np.isfinite(matrix))):
            x, y = ax.transData.transform((float(b), float(a)))
            cells.append({"i": rows_i[a], "j": cols_j[b], "value": float(matrix[a, b]),
                          "px": int(math.floor(x)), "py": int(math.floor(height - y))})
        _atomic_save(fig, png)
    finally:
        plt.close(fig)
    side = png.with_suffix(".json")
    _atomic_json({"rank": rank, "cmap": CMAP, "vmin": -vmax, "vmax": vmax, "cells": cells}, side)
    return [png, side]


def prune_bars(rows: Sequence[dict[str, Any]], n_layer: int, rank: str, png: Path) -> Path:
    """Bar chart: the gain of dropping each single layer."""
    import matplotlib.pyplot as plt

    layers, values = [], []
    for r in rows:
        dropped = r["params"]["dropped"]
        layers.append(int(dropped))
        values.append(gain(r, rank))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * n_layer + 2), 4), dpi=DPI)
    try:
        ax.bar(layers, values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
        ax.set_xlabel("dropped layer")
        ax.set_ylabel(_LABEL[rank])
        ax.set_title("prune: each layer dropped alone")
        fig.tight_layout()
        _atomic_save(fig, png)
    finally:
        plt.close(fig)
    return png


def pareto(rows: Sequence[dict[str, Any]], rank: str, png: Path) -> Path:
    """Extra positions vs gain of every order; the Pareto front joined by a line."""
    import matplotlib.pyplot as plt

    xs = [r["extra_positions"] for r in rows]
    ys = [gain(r, rank) for r in rows]
    best = front(list(rows), rank)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=DPI)
    try:
        ax.scatter(xs, ys, s=10, alpha=0.5, label="orders")
        ax.plot([r["extra_positions"] for r in best], [gain(r, rank) for r in best], "o-", color="tab:red",
                label="Pareto front")
        for r in best[-8:]:
            ax.annotate(r["order"], (r["extra_positions"], gain(r, rank)), fontsize=6)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xlabel("extra positions (compute and K/V cache over the base order)")
        ax.set_ylabel(_LABEL[rank])
        ax.legend()
        fig.tight_layout()
        _atomic_save(fig, png)
    finally:
        plt.close(fig)
    return png
