"""Runtime re-order: a loaded model switches order without reloading its weights."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from frankenllama import Llama, _native
from helpers import eval_scores, load

A = "0-29,8-22"
B = "0-9,20-29"
TEXT = b"Frankenmerges stack layers of one model"

_load = functools.partial(load, n_ctx=128, n_threads=2, n_threads_batch=None, logits_all=True)


def test_round_trip_equals_fresh_load(smollm2_path):
    fresh = _load(smollm2_path, layer_order=A)
    want = eval_scores(fresh, TEXT)
    fresh.close()

    llm = _load(smollm2_path)
    base = eval_scores(llm, TEXT)
    llm.set_layer_order(A)
    assert llm.layer_order == fresh_order(A)
    first = eval_scores(llm, TEXT)
    llm.set_layer_order(B)
    assert len(llm.layer_order) == 20
    other = eval_scores(llm, TEXT)
    llm.set_layer_order(A)
    again = eval_scores(llm, TEXT)
    llm.set_layer_order(None)
    restored = eval_scores(llm, TEXT)
    llm.close()

    assert np.array_equal(first, want)
    assert np.array_equal(again, want)
    assert np.array_equal(restored, base)
    assert not np.array_equal(other, want)


def fresh_order(spec: str) -> list[int]:
    from frankenllama.order import parse_spec

    return parse_spec(spec)


def test_reorder_then_generate(smollm2_path):
    llm = _load(smollm2_path)
    llm.set_layer_order([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 3)
    out = llm("Hello", max_tokens=4, temperature=0)
    assert out["usage"]["completion_tokens"] >= 1
    assert llm.metadata["llama.layer_order"] == "0-9,0-9,0-9"
    llm.close()


def test_layers_not_loaded_cannot_run(tiny):
    llm = Llama(str(tiny.path), layer_order=[0, 1], verbose=False, n_ctx=64)
    with pytest.raises(ValueError, match="were not loaded"):
        llm.set_layer_order([0, 1, 2])
    llm.set_layer_order([1, 0, 1])  # loaded layers can still be re-ordered
    assert llm.layer_order == [1, 0, 1]
    llm.close()


def test_invalid_order_leaves_model_intact(tiny):
    llm = Llama(str(tiny.path), verbose=False, n_ctx=64, logits_all=True)
    before = eval_scores(llm, b"abc")
    with pytest.raises(ValueError):
        llm.set_layer_order([0, 7])
    assert llm.layer_order == [0, 1, 2, 3]
    assert np.array_equal(eval_scores(llm, b"abc"), before)
    llm.close()


def test_c_api_error_codes(tiny):
    """The C API returns error codes instead of aborting: a live context, a bad order, bad arguments."""
    ffi, lib = _native.ffi_lib()
    llm = Llama(str(tiny.path), verbose=False, n_ctx=64)
    model = _native.model_ptr(llm._model)
    assert lib.llama_model_set_layer_order(model, ffi.new("int32_t[]", [0, 1]), 2) == -2  # llm's context is alive
    llm._ctx.close()
    assert lib.llama_model_set_layer_order(model, ffi.new("int32_t[]", [0, 9]), 2) == -1  # out of range
    assert lib.llama_model_set_layer_order(model, ffi.NULL, 3) == -1                      # no array
    assert lib.llama_model_set_layer_order(model, ffi.new("int32_t[]", [0]), -1) == -1    # negative length
    assert lib.llama_model_set_layer_order(model, ffi.new("int32_t[]", [3, 3]), 2) == 0
    assert lib.llama_model_n_layer(model) == 2
    assert lib.llama_model_n_layer_weights(model) == 4
    assert lib.llama_model_set_layer_order(model, ffi.NULL, 0) == 0                       # file order
    assert lib.llama_model_n_layer(model) == 4
    llm.close()


def test_two_models_with_different_orders_do_not_interfere(smollm2_path):
    alone_a = _load(smollm2_path, layer_order=A)
    want_a = eval_scores(alone_a, TEXT)
    alone_a.close()
    alone_b = _load(smollm2_path, layer_order=B)
    want_b = eval_scores(alone_b, TEXT)
    alone_b.close()

    a = _load(smollm2_path, layer_order=A)
    b = _load(smollm2_path, layer_order=B)
    assert np.array_equal(eval_scores(a, TEXT), want_a)
    assert np.array_equal(eval_scores(b, TEXT), want_b)
    b.set_layer_order("29-20,9-0")  # re-ordering b (within its loaded layers) leaves a alone
    assert np.array_equal(eval_scores(a, TEXT), want_a)
    assert a.layer_order == fresh_order(A)
    a.close()
    b.close()


def test_many_reorders_keep_one_context(tiny):
    """Re-ordering replaces the context; the old ones are freed, not piled up in the Llama object."""
    import gc

    from llama_cpp import _internals

    llm = Llama(str(tiny.path), verbose=False, n_ctx=64)
    for i in range(20):
        llm.set_layer_order([i % 4, (i + 1) % 4])
    gc.collect()
    mine = [o for o in gc.get_objects() if isinstance(o, _internals.LlamaContext) and o.model is llm._model]
    assert len([o for o in mine if o.ctx is not None]) == 1
    assert len(mine) <= 2  # the current one and the load-time one (llama_cpp.Llama keeps it); none per call
    assert llm.kv_devices() == ["CPU", "CPU"]
    llm.close()
    assert llm._ctx.ctx is None
