#!/usr/bin/env python3
"""Scan SmolLM2-135M for the orders ``frankenllama demo`` runs and store them as package data.

    python scripts/derive_demo_orders.py [--threads N]

Writes ``python/frankenllama/scanning/resources/demo_orders.json`` (see
``frankenllama.scanning.demo_orders``): the 1.5x self-merge and the pruned order with the least KL
divergence from the original order among their candidates.  tests/test_cli.py derives them again
and compares.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from frankenllama.cli import _demo_model
    from frankenllama.scanning import demo_orders
    from frankenllama.scanning.results import atomic_write

    result = demo_orders.derive(_demo_model(), n_threads=args.threads, progress=True)
    target = ROOT / "python" / "frankenllama" / "scanning" / demo_orders.DATA
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(text, end="")
    print(f"wrote {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
