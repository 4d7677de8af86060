"""Reference exactness: llama.cpp with a layer order vs a NumPy forward pass of the same order."""
from __future__ import annotations

import numpy as np
import pytest

from frankenllama.order import override_keys
from helpers import raw_logits
from lowlevel import RawModel, run
from reference import reference_logits

ORDERS = {
    "identity": [0, 1, 2, 3],
    "repeats": [0, 1, 2, 1, 2, 3],
    "skips": [0, 2, 3],
    "reversed": [3, 2, 1, 0],
    "single": [2],
    "repeat-first": [0, 0, 0, 3],
}
SEQS = [[1, 75, 108, 229, 153, 132, 119, 107, 104, 117], [1, 40, 41, 42, 43, 44, 45]]


@pytest.fixture(scope="module", params=list(ORDERS))
def order_and_model(request, tiny):
    order = ORDERS[request.param]
    with RawModel(tiny.path, kv_overrides=override_keys("llama", order)) as model:
        yield order, model


@pytest.mark.parametrize("mode", ["batch", "incremental"])
def test_matches_numpy_reference(order_and_model, tiny, mode):
    order, model = order_and_model
    assert model.n_layer() == len(order)
    got = run(model, SEQS, mode)
    for seq, logits in zip(SEQS, got):
        want = reference_logits(tiny, seq, layer_order=order)
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


def test_reference_tells_orders_apart(tiny):
    """The tolerance above is far tighter than the gap between two orders: the test can fail."""
    a = reference_logits(tiny, SEQS[0], layer_order=[0, 1, 2, 3])
    b = reference_logits(tiny, SEQS[0], layer_order=[0, 2, 1, 3])
    assert np.abs(a - b).max() > 1e-2


def test_no_order_is_the_file_order(tiny):
    got = raw_logits(tiny.path, SEQS)
    for seq, logits in zip(SEQS, got):
        np.testing.assert_allclose(logits, reference_logits(tiny, seq), rtol=1e-4, atol=1e-4)


def test_gguf_array_order(tmp_path):
    """A file can carry its default order as an int32 array; an override beats it."""
    from tiny_model import write_tiny_llama

    tm = write_tiny_llama(tmp_path / "ordered.gguf", n_layer=4, seed=1, layer_order=[3, 3, 0])
    with RawModel(tm.path) as model:
        assert model.n_layer() == 3
        logits = run(model, SEQS[:1], "batch")[0]
        np.testing.assert_allclose(logits, reference_logits(tm, SEQS[0], layer_order=[3, 3, 0]), rtol=1e-4, atol=1e-4)
    with RawModel(tm.path, kv_overrides=override_keys("llama", [1, 2])) as model:
        assert model.n_layer() == 2
        logits = run(model, SEQS[:1], "batch")[0]
        np.testing.assert_allclose(logits, reference_logits(tm, SEQS[0], layer_order=[1, 2]), rtol=1e-4, atol=1e-4)


def test_shared_kv_would_be_detected(tiny):
    """The token-by-token tests above can fail the way a shared-KV implementation would: emulating
    one cache per weight layer (instead of per position) moves the logits far outside the tolerance,
    while llama.cpp stays on the per-position reference."""
    from reference import shared_kv_decode_logits

    order = ORDERS["repeats"]
    got = raw_logits(tiny.path, SEQS[:1], "incremental", kv_overrides=override_keys("llama", order))[0]
    per_position = reference_logits(tiny, SEQS[0], layer_order=order)
    shared = shared_kv_decode_logits(tiny, SEQS[0], order)
    np.testing.assert_allclose(got, per_position, rtol=1e-4, atol=1e-4)
    assert np.abs(got - shared).max() > 1e-1
    # the emulation is faithful: without repeats there is nothing to share and it agrees
    np.testing.assert_allclose(shared_kv_decode_logits(tiny, SEQS[0], [0, 1, 2, 3]),
                               reference_logits(tiny, SEQS[0]), rtol=1e-9, atol=1e-9)
