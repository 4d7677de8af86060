"""Several models with different orders, in threads, in one process: each matches its single-model
result bit for bit.

Each (model, order) is first evaluated alone, sequentially; then several ``Llama`` objects run
concurrently in threads (llama-cpp-python releases the GIL in the native calls, so the decodes
really overlap), each evaluating its prompts several times.  With ``n_threads=1`` a decode is
deterministic, so any leak of one model's order, weights or KV cache into another shows up as a
difference in the logits.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from frankenllama import Llama
from helpers import eval_scores, load

PROMPTS = (b"Frankenmerges stack layers", b"of one model", b"abc def ghi jkl")
ROUNDS = 3

TINY_ORDERS = ([0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 1, 2, 2, 3], [2, 0])
SMOL_A, SMOL_B = "0-29,8-22", "0-9,20-29"


def _load(path: str, order: Any) -> Llama:
    # verbose=True: with verbose=False llama-cpp-python redirects the process's stdout/stderr file
    # descriptors around each load, which is not thread-safe (upstream, with any library)
    return load(path, layer_order=order, verbose=True, n_ctx=128, logits_all=True)


def _alone(path: str, order: Any) -> list[np.ndarray]:
    llm = _load(path, order)
    try:
        return [eval_scores(llm, p) for p in PROMPTS]
    finally:
        llm.close()


def _mismatches(got: list[list[np.ndarray]], want: list[np.ndarray]) -> list[tuple[int, int]]:
    """(round, prompt) pairs whose logits differ from the single-model result."""
    return [(r, i) for r, scores in enumerate(got) for i, s in enumerate(scores) if not np.array_equal(s, want[i])]


def _worker(path: str, order: Any, start: threading.Barrier) -> tuple[list[list[np.ndarray]], list[int]]:
    """Load in this thread, wait for the others, then evaluate every prompt ROUNDS times."""
    llm = _load(path, order)
    try:
        applied = llm.layer_order
        start.wait(timeout=120)
        return [[eval_scores(llm, p) for p in PROMPTS] for _ in range(ROUNDS)], applied
    finally:
        llm.close()


def _switcher(path: str, orders: list[Any], start: threading.Barrier) -> list[tuple[Any, list[np.ndarray]]]:
    """One model that changes its own order with set_layer_order while the other threads run."""
    llm = _load(path, None)
    try:
        start.wait(timeout=120)
        results = []
        for order in orders:
            llm.set_layer_order(order)
            results.append((order, [eval_scores(llm, p) for p in PROMPTS]))
        return results
    finally:
        llm.close()


def test_tiny_orders_in_threads(tiny):
    path = str(tiny.path)
    want = [_alone(path, order) for order in TINY_ORDERS]
    # the orders really differ, so a mix-up between the models could not go unnoticed
    for a in range(len(TINY_ORDERS)):
        for b in range(a + 1, len(TINY_ORDERS)):
            assert not np.array_equal(want[a][0], want[b][0])

    start = threading.Barrier(len(TINY_ORDERS))
    with ThreadPoolExecutor(len(TINY_ORDERS)) as pool:
        futures = [pool.submit(_worker, path, order, start) for order in TINY_ORDERS]
        results = [f.result(timeout=300) for f in futures]

    for order, expected, (got, applied) in zip(TINY_ORDERS, want, results):
        assert applied == order
        assert not _mismatches(got, expected), f"order {order}: logits differ from the single-model run"


def test_mixed_models_and_runtime_reorder_in_threads(tiny, smollm2_path):
    """SmolLM2 in two orders and the tiny model in threads, while a fourth thread re-orders its
    own SmolLM2 (A, B, the file's order, A again) with set_layer_order."""
    tiny_path = str(tiny.path)
    fixed = [(smollm2_path, SMOL_A), (smollm2_path, SMOL_B), (tiny_path, [3, 1, 1, 0])]
    switches = [SMOL_B, None, SMOL_A, SMOL_B]
    want = {(path, str(order)): _alone(path, order) for path, order in [*fixed, (smollm2_path, None)]}

    start = threading.Barrier(len(fixed) + 1)
    with ThreadPoolExecutor(len(fixed) + 1) as pool:
        futures = [pool.submit(_worker, path, order, start) for path, order in fixed]
        switched = pool.submit(_switcher, smollm2_path, switches, start)
        results = [f.result(timeout=300) for f in futures]
        switched_results = switched.result(timeout=300)

    for (path, order), (got, _) in zip(fixed, results):
        assert not _mismatches(got, want[path, str(order)]), f"{path} order {order}: logits differ"
    assert [order for order, _ in switched_results] == switches
    for order, got in switched_results:
        assert not _mismatches([got], want[smollm2_path, str(order)]), \
            f"after set_layer_order({order!r}) in a thread: logits differ from a fresh load"


def test_nested_log_captures_keep_their_own_records(tiny):
    """Nested captures with equal records (both see the same messages): the inner one's exit must
    not end the outer one's capture."""
    from frankenllama import _native

    with _native.capture_llama_log() as outer:
        with _native.capture_llama_log() as inner:
            Llama(str(tiny.path), verbose=False, n_ctx=32).close()
        seen = len(outer)
        assert inner == outer and seen > 0
        Llama(str(tiny.path), verbose=False, n_ctx=32).close()
    assert len(outer) > seen and len(inner) == seen
