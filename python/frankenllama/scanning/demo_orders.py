"""The orders ``frankenllama demo`` runs, found by a scan of SmolLM2-135M and stored as package data.

The demo shows a 1.5x self-merge and a pruned order.  Among the RYS blocks of ``MERGE_EXTRA``
layers (every ``rys(i, i + 15)``: 45 positions) and the cuts of ``PRUNE`` consecutive layers (25
positions), it runs the one of each with the least KL divergence from the original order, as
scored by :func:`derive` on the start of the shipped text.  ``resources/demo_orders.json`` holds
the result (``python scripts/derive_demo_orders.py`` writes it again; a test re-derives it).
"""
from __future__ import annotations

import json
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from ..order import format_spec
from ..recipes import drop, rys
from .inputs import default_text, sha256_text

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MERGE_EXTRA = 15   # 30 layers -> 45 positions: 1.5x
PRUNE = 5          # 30 layers -> 25 positions
TEXT_CHARS = 700   # the start of the shipped text (about 150 tokens: the derivation stays quick)
N_CTX = 256
DATA = "resources/demo_orders.json"


def candidates(n_layer: int) -> dict[str, list[list[int]]]:
    """The self-merges and the pruned orders the demo chooses from."""
    return {"self_merge": [rys(i, i + MERGE_EXTRA, n_layer) for i in range(0, n_layer - MERGE_EXTRA + 1)],
            "pruned": [drop(list(range(a, a + PRUNE)), n_layer) for a in range(0, n_layer - PRUNE + 1)]}


def demo_text() -> str:
    return default_text()[:TEXT_CHARS]


def derive(model: str | Path, *, n_threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Scan the candidates on ``model`` (KL from its own order on :func:`demo_text`); the best of each."""
    from .run import scan

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        text.write_text(demo_text(), encoding="utf-8")
        n_layer = _n_layer(model)
        groups = candidates(n_layer)
        listing = Path(tmp) / "orders.txt"
        listing.write_text("".join(format_spec(o) + "\n" for group in groups.values() for o in group))
        summary = scan(model, "orders", out=Path(tmp) / "scan.jsonl", text=text, orders_file=str(listing),
                       n_ctx=N_CTX, n_threads=n_threads, rank="kl", progress=progress, plots=False)
    by_order = {r["order"]: r for r in summary.rows}
    out: dict[str, Any] = {"model": Path(model).name, "n_layer": n_layer, "text_chars": TEXT_CHARS,
                           "text_sha256": sha256_text(demo_text()), "n_ctx": N_CTX}
    for name, group in groups.items():
        rows = [by_order[format_spec(o)] for o in group]
        best, second = sorted(rows, key=lambda r: (r["kl"], r["order"]))[:2]
        out[name] = {"order": best["order"], "positions": best["positions"], "kl": best["kl"], "ppl": best["ppl"],
                     "candidates": len(rows), "runner_up": {"order": second["order"], "kl": second["kl"]}}
    return out


def _n_layer(model: str | Path) -> int:
    from ..gguf_info import check_header

    return check_header(Path(model)).n_layer


def stored() -> dict[str, Any]:
    """The stored result of :func:`derive` (package data)."""
    return json.loads(resources.files(__package__).joinpath(DATA).read_text(encoding="utf-8"))
