"""In situ = materialized: an order on the original file gives the logits of the same order
physically written into a new file (blocks copied byte for byte) and run with no order.

Bit-identical (max |diff| == 0), for one batch and token by token through the KV cache.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from frankenllama.gguf_tools import materialize
from frankenllama.order import override_keys, parse_spec
from helpers import raw_logits
from lowlevel import assert_identical

from conftest import run_stock

SMOL_ORDERS = {
    "1.5x-self-merge": "0-29,8-22",       # 45 positions, block 8-22 repeated
    "pruned": "0-9,15-29",                 # 25 positions, 5 layers dropped
    "reversed-block": "0-9,19-10,20-29",  # a block run backwards
}
GEMMA_ORDERS = {
    "repeated": "0-8,6-17",
    "pruned": "0-5,12-17",
    "full-attention-only": "5,11,17",     # no sliding-window layer runs
}
PROMPT = [1, 504, 3575, 282, 4649, 314, 1345, 28, 3575, 282, 4649, 314, 253, 2272, 3458, 30]


def _logits(path, mode, kv_overrides=None, seqs=(PROMPT,), **kw):
    return raw_logits(path, list(seqs), mode, kv_overrides=kv_overrides, **kw)


def _twins(path, orders, out) -> dict[str, str]:
    """name -> the file of each order of ``orders`` (name -> spec) materialized from ``path`` into ``out``."""
    return {name: str(out / f"{name}.gguf") for name, spec in orders.items()
            if materialize(path, spec, out / f"{name}.gguf", progress=False)}


@pytest.fixture(scope="module")
def smol_twins(smollm2_path, tmp_path_factory):
    return _twins(smollm2_path, SMOL_ORDERS, tmp_path_factory.mktemp("smol-twins"))


@pytest.mark.parametrize("name", list(SMOL_ORDERS))
@pytest.mark.parametrize("mode", ["batch", "incremental"])
def test_smollm2_in_situ_equals_materialized(smollm2_path, smol_twins, name, mode):
    spec = SMOL_ORDERS[name]
    order = parse_spec(spec)
    in_situ = _logits(smollm2_path, mode, override_keys("llama", order))
    twin = _logits(smol_twins[name], mode)
    assert_identical(in_situ, twin)


def test_different_orders_differ(smollm2_path, smol_twins):
    """The comparison can fail: a twin of another order gives other logits."""
    in_situ = _logits(smollm2_path, "batch", override_keys("llama", parse_spec(SMOL_ORDERS["pruned"])))
    other = _logits(smol_twins["reversed-block"], "batch")
    assert np.abs(in_situ[0] - other[0]).max() > 1.0


@pytest.mark.parametrize("mode", ["batch", "incremental"])
def test_kv_per_position_against_stock_library(smollm2_path, smol_twins, stock_lib_dir, tmp_path, mode):
    """Repeated layers keep their own K/V: token-by-token decoding through the cache matches what the
    unpatched library computes for the materialized twin (shared K/V would only show up here, in
    later decodes that read cells a second occurrence overwrote)."""
    twin = smol_twins["1.5x-self-merge"]
    out = tmp_path / "stock.npz"
    seqs = [PROMPT, PROMPT[:9]]
    run_stock(stock_lib_dir, ["--model", twin, "--seqs", json.dumps(seqs), "--mode", mode, "--out", str(out)])
    stock = [np.load(out)[f"arr_{i}"] for i in range(len(seqs))]
    in_situ = _logits(smollm2_path, mode, override_keys("llama", parse_spec(SMOL_ORDERS["1.5x-self-merge"])), seqs=seqs)
    assert_identical(in_situ, stock)


def test_no_order_equals_stock_library(smollm2_path, stock_lib_dir, tmp_path):
    """With no order the patched library computes exactly what the unpatched one does."""
    out = tmp_path / "stock.npz"
    for mode in ("batch", "incremental"):
        run_stock(stock_lib_dir, ["--model", smollm2_path, "--seqs", json.dumps([PROMPT]), "--mode", mode,
                                  "--out", str(out)])
        assert_identical(_logits(smollm2_path, mode), [np.load(out)["arr_0"]])


@pytest.fixture(scope="module")
def gemma_twins(gemma3_path, tmp_path_factory):
    return _twins(gemma3_path, GEMMA_ORDERS, tmp_path_factory.mktemp("gemma-twins"))


@pytest.mark.parametrize("name", list(GEMMA_ORDERS))
@pytest.mark.parametrize("mode", ["batch", "incremental"])
def test_gemma3_in_situ_equals_materialized(gemma3_path, gemma_twins, name, mode):
    """Sliding-window layers stay sliding-window wherever they run (the twin lists them explicitly)."""
    order = parse_spec(GEMMA_ORDERS[name])
    in_situ = _logits(gemma3_path, mode, override_keys("gemma3", order), n_ctx=256)
    twin = _logits(gemma_twins[name], mode, n_ctx=256)
    assert_identical(in_situ, twin)


def test_gemma3_incremental_close_to_batch(gemma3_path):
    """Token-by-token decoding through the per-position caches agrees with one batch as closely as it
    does without an order (the two differ by llama.cpp's kernel paths, not by the order)."""
    def gap(kv):
        batch = _logits(gemma3_path, "batch", kv, n_ctx=256)[0]
        incr = _logits(gemma3_path, "incremental", kv, n_ctx=256)[0]
        return np.abs(batch - incr).max(), (batch.argmax(-1) == incr.argmax(-1)).mean()

    base_gap, _ = gap(None)
    order_gap, agree = gap(override_keys("gemma3", parse_spec(GEMMA_ORDERS["repeated"])))
    assert agree >= 0.9
    assert order_gap < 3 * base_gap + 0.5, (order_gap, base_gap)


@pytest.mark.parametrize("mode", ["batch", "incremental"])
def test_gemma3_in_situ_equals_twin_on_stock_library(gemma3_path, gemma_twins, stock_lib_dir, tmp_path, mode):
    """The materialized Gemma 3 twin, run by the unpatched library, gives the in-situ logits."""
    out = tmp_path / "stock.npz"
    run_stock(stock_lib_dir, ["--model", gemma_twins["repeated"], "--seqs", json.dumps([PROMPT]), "--mode", mode,
                              "--out", str(out), "--n-ctx", "256"])
    in_situ = _logits(gemma3_path, mode, override_keys("gemma3", parse_spec(GEMMA_ORDERS["repeated"])), n_ctx=256)
    assert_identical(in_situ, [np.load(out)["arr_0"]])
