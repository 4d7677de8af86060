"""Scanning layer orders: score many orders of one loaded model by perplexity, KL divergence from
the model's own order and probe log-probabilities, resumably, with exact prefix caching.

``frankenllama.scan(model, "rys", out="results.jsonl")`` is :func:`run.scan`; see README.md.
"""
from __future__ import annotations

from .errors import ScanError
from .inputs import default_text, example_probes_path
from .results import front, ranked, read_results
from .run import ScanSummary, default_rank, scan
from .stats import RANKS, gain
from .sweeps import SWEEPS, SweepSpec, chain_order

__all__ = ["scan", "ScanError", "ScanSummary", "SweepSpec", "SWEEPS", "RANKS", "read_results", "ranked", "front",
           "gain", "default_rank", "default_text", "example_probes_path", "chain_order"]
