"""llama.cpp features keep working with a layer order.

Unless noted, each feature is run in situ (the original file with an order) and on the materialized
twin (the same order physically written into a new file, run with no order), and the two must agree
bit for bit.
"""
from __future__ import annotations

import contextlib
import functools
import re

import llama_cpp
import numpy as np
import pytest

from frankenllama import Llama, StateMismatchError, _native
from frankenllama.gguf_tools import materialize, tensor_bytes_per_layer
from frankenllama.order import override_keys, parse_spec
from helpers import THREADS, eval_scores, load, raw_logits, scores_so_far
from lora_adapter import write_lora_pair
from lowlevel import RawModel, assert_identical, run

TINY_SEQS = [[1, 75, 108, 229, 153, 132, 119, 107, 104, 117], [1, 40, 41, 42, 43, 44, 45]]
TINY_PROMPT = TINY_SEQS[0]
TINY_MORE = [60, 61, 62, 63, 64]
SMOL_PROMPT = [1, 504, 3575, 282, 4649, 314, 1345, 28, 3575, 282, 4649, 314, 253, 2272, 3458, 30]
SMOL_SPEC = "0-29,8-22"

_llama = functools.partial(load, n_ctx=64)


@pytest.fixture(scope="module")
def tiny_twin(tiny, tmp_path_factory):
    """Materialized twins of tiny orders, written on demand: twin(order) -> path."""
    out = tmp_path_factory.mktemp("tiny-twins")
    cache: dict[tuple[int, ...], str] = {}

    def twin(order):
        key = tuple(order)
        if key not in cache:
            path = out / ("twin-" + "_".join(map(str, key)) + ".gguf")
            materialize(tiny.path, list(order), path, progress=False)
            cache[key] = str(path)
        return cache[key]

    return twin


# --------------------------------------------------------------------------- 1. state save / load


def test_state_save_load_with_order(tiny, tiny_twin):
    order = [0, 1, 1, 2]
    llm = _llama(tiny.path, layer_order=order, logits_all=True)
    llm.eval(TINY_PROMPT)
    state = llm.save_state()
    llm.eval(TINY_MORE)
    first = scores_so_far(llm)
    llm.load_state(state)
    assert llm.n_tokens == len(TINY_PROMPT)
    llm.eval(TINY_MORE)
    second = scores_so_far(llm)
    llm.close()
    assert np.array_equal(first, second)

    twin = _llama(tiny_twin(order), logits_all=True)
    want = eval_scores(twin, TINY_PROMPT, TINY_MORE)
    twin.close()
    assert np.array_equal(second, want), f"max |diff| = {np.abs(second - want).max()}"


def test_state_from_another_order_is_refused(tiny):
    a = _llama(tiny.path, layer_order=[0, 1, 2, 3], logits_all=True)
    a.eval(TINY_PROMPT)
    state = a.save_state()
    a.close()

    b = _llama(tiny.path, layer_order=[3, 2, 1, 0], logits_all=True)
    before = eval_scores(b, TINY_PROMPT)
    assert not np.array_equal(before, np.array(state.scores[: len(TINY_PROMPT)]))  # the orders differ
    n_tokens, input_ids = b.n_tokens, b.input_ids.copy()
    with pytest.raises(StateMismatchError, match="saved under another layer order") as refused:
        b.load_state(state)
    assert isinstance(refused.value, RuntimeError)  # what llama-cpp-python raises
    assert (b.n_tokens, b.input_ids.tolist()) == (n_tokens, input_ids.tolist())
    after = eval_scores(b, TINY_PROMPT)  # the model still works, and still runs its own order
    b.close()
    assert np.array_equal(before, after)


def test_state_from_same_order_other_instance_loads(tiny):
    """The refusal above is about the order, not about the instance: the same order loads fine."""
    a = _llama(tiny.path, layer_order=[3, 2, 1, 0], logits_all=True)
    a.eval(TINY_PROMPT)
    state = a.save_state()
    a.eval(TINY_MORE)
    want = scores_so_far(a)
    a.close()
    b = _llama(tiny.path, layer_order=[3, 2, 1, 0], logits_all=True)
    b.load_state(state)
    b.eval(TINY_MORE)
    got = scores_so_far(b)
    b.close()
    assert np.array_equal(got, want)


# --------------------------------------------------------------------------- 2. embeddings


@pytest.mark.parametrize("mode", ["batch", "incremental"])
def test_embeddings_with_order(tiny, tiny_twin, mode):
    order = [0, 1, 1, 2]

    def embeddings(path, kv_overrides=None):
        return raw_logits(path, TINY_SEQS, mode, kv_overrides=kv_overrides, embeddings=True, n_threads=THREADS)

    got = embeddings(tiny.path, override_keys("llama", order))
    want = embeddings(tiny_twin(order))
    differ = embeddings(tiny.path, override_keys("llama", [2, 1, 1, 0]))
    assert got[0].shape == (len(TINY_SEQS[0]), tiny.n_embd)
    assert_identical(got, want)
    assert np.abs(got[0] - differ[0]).max() > 1e-2  # the comparison can fail


def test_llama_embed_with_order(tiny, tiny_twin):
    order = [3, 3, 0]
    text = "hello world"
    a = _llama(tiny.path, layer_order=order, embedding=True)
    b = _llama(tiny_twin(order), embedding=True)
    got, want = np.array(a.embed(text)), np.array(b.embed(text))
    a.close()
    b.close()
    assert got.size > 0 and np.all(np.isfinite(got))
    assert np.array_equal(got, want)


# --------------------------------------------------------------------------- 3. LoRA


def test_lora_with_order(tiny, tiny_twin, tmp_path):
    order = [0, 1, 1, 2]
    adapter, twin_adapter = tmp_path / "lora.gguf", tmp_path / "lora-twin.gguf"
    write_lora_pair(tiny, order, [1, 2], adapter, twin_adapter, seed=3)

    plain = _llama(tiny.path, layer_order=order, logits_all=True)
    base = eval_scores(plain, TINY_PROMPT)
    plain.close()
    a = _llama(tiny.path, layer_order=order, logits_all=True, lora_path=str(adapter))
    assert a.layer_order == order
    got = eval_scores(a, TINY_PROMPT)
    got_incr = eval_scores(a, TINY_PROMPT, incremental=True)
    a.close()
    b = _llama(tiny_twin(order), logits_all=True, lora_path=str(twin_adapter))
    want = eval_scores(b, TINY_PROMPT)
    want_incr = eval_scores(b, TINY_PROMPT, incremental=True)
    b.close()

    assert np.abs(got - base).max() > 1e-2, "the adapter does not change the logits"
    assert np.array_equal(got, want), f"max |diff| = {np.abs(got - want).max()}"
    assert np.array_equal(got_incr, want_incr), f"max |diff| = {np.abs(got_incr - want_incr).max()}"


def test_lora_then_set_layer_order(tiny, tiny_twin, tmp_path):
    """An adapter loaded with the file's order follows a runtime re-order (set_layer_order)."""
    order = [3, 2, 2, 0]
    adapter, twin_adapter = tmp_path / "lora.gguf", tmp_path / "lora-twin.gguf"
    write_lora_pair(tiny, order, [0, 1, 2, 3], adapter, twin_adapter, seed=5)
    a = _llama(tiny.path, logits_all=True, lora_path=str(adapter))
    a.set_layer_order(order)
    assert a.layer_order == order
    got = eval_scores(a, TINY_PROMPT)
    a.close()
    b = _llama(tiny_twin(order), logits_all=True, lora_path=str(twin_adapter))
    want = eval_scores(b, TINY_PROMPT)
    b.close()
    assert np.array_equal(got, want), f"max |diff| = {np.abs(got - want).max()}"


# --------------------------------------------------------------------------- 4. KV cache types, flash attention


@pytest.fixture(scope="module")
def smol_twin(smollm2_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("smol-twin") / "merge.gguf"
    materialize(smollm2_path, SMOL_SPEC, path, progress=False)
    return str(path)


KV_CONFIGS = {
    "q8_0-k-no-fa": dict(f32_kv=False, type_k=8, flash_attn=False),  # GGML_TYPE_Q8_0 K, f16 V
    "f16-fa": dict(f32_kv=False, flash_attn=True),
}


@pytest.mark.parametrize("config", list(KV_CONFIGS))
@pytest.mark.parametrize("mode", ["batch", "incremental"])
def test_kv_types_and_flash_attention(smollm2_path, smol_twin, config, mode):
    kw = KV_CONFIGS[config]
    with RawModel(smollm2_path, kv_overrides=override_keys("llama", parse_spec(SMOL_SPEC)), n_ctx=64,
                  n_threads=THREADS, **kw) as in_situ, RawModel(smol_twin, n_ctx=64, n_threads=THREADS, **kw) as twin:
        assert in_situ.n_layer() == 45
        seqs = [SMOL_PROMPT] if mode == "batch" else [SMOL_PROMPT[:10]]
        got = run(in_situ, seqs, mode)
        want = run(twin, seqs, mode)
    assert np.all(np.isfinite(got[0]))
    assert_identical(got, want)


# --------------------------------------------------------------------------- 5. saving a reordered model


def test_save_reordered_model_refused(tiny, tmp_path):
    llm = _llama(tiny.path, layer_order=[0, 1, 1, 2])
    out = tmp_path / "reordered.gguf"
    llama_cpp.llama_model_save_to_file(llm.model, str(out).encode())
    llm.close()
    assert not out.exists()


def test_save_without_order_writes_loadable_file(tiny, tmp_path):
    llm = _llama(tiny.path, logits_all=True)
    want = eval_scores(llm, TINY_PROMPT)
    out = tmp_path / "saved.gguf"
    llama_cpp.llama_model_save_to_file(llm.model, str(out).encode())
    llm.close()
    assert out.is_file()
    again = _llama(out, logits_all=True)
    assert again.layer_order == [0, 1, 2, 3]
    got = eval_scores(again, TINY_PROMPT)
    again.close()
    assert np.array_equal(got, want)


# --------------------------------------------------------------------------- 6. deep orders


def test_510_positions(smollm2_path):
    spec = ",".join(["0-29"] * 17)
    llm = _llama(smollm2_path, layer_order=spec, n_ctx=32, logits_all=True)
    try:
        assert llama_cpp.llama_model_n_layer(llm.model) == 510
        assert len(llm.layer_order) == 510
        assert llm.n_weight_layers == 30
        scores = eval_scores(llm, SMOL_PROMPT[:6])
    finally:
        llm.close()
    assert scores.shape[0] == 6
    assert np.all(np.isfinite(scores))


# --------------------------------------------------------------------------- 7. Gemma 3, full attention only


def _greedy(llm: Llama, prompt: list[int], n: int) -> list[int]:
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        out.append(tok)
        if len(out) == n:
            break
    return out


def test_gemma3_full_attention_only_generates(gemma3_path):
    """test_materialized.py checks these logits against the twin; here the order generates text."""
    llm = _llama(gemma3_path, layer_order="5,11,17", n_ctx=128, logits_all=True)
    try:
        assert llm.layer_order == [5, 11, 17]
        assert llama_cpp.llama_model_n_layer(llm.model) == 3
        prompt = llm.tokenize(b"The capital of France is")
        got = _greedy(llm, prompt, 5)
        scores = scores_so_far(llm)
    finally:
        llm.close()
    assert len(got) == 5
    assert all(0 <= t < scores.shape[1] for t in got)
    assert np.all(np.isfinite(scores))
    # greedy: each generated token is the argmax of the logits before it
    n = len(prompt)
    assert [int(scores[n - 1 + i].argmax()) for i in range(4)] == got[:4]


# --------------------------------------------------------------------------- 8. unreferenced layers not loaded

_BUF = re.compile(r"model buffer size =\s*([0-9.]+) MiB")


def _model_buffer_mib(path: str, spec: str) -> float:
    """Sum of the 'model buffer size' lines llama.cpp logs while reading ``path`` into memory with ``spec``."""
    with _native.capture_llama_log() as log:
        RawModel(path, kv_overrides=override_keys("llama", parse_spec(spec)), n_ctx=64, use_mmap=False).close()
    lines = [text for _, text in log]
    assert any("load_mode = none" in line for line in lines), "the model was not read into memory"
    sizes = [float(m.group(1)) for line in lines for m in [_BUF.search(line)] if m]
    assert sizes, "no 'model buffer size' line in the log"
    return sum(sizes)


def test_unreferenced_layers_not_loaded(smollm2_path):
    full = _model_buffer_mib(smollm2_path, "0-29")
    pruned = _model_buffer_mib(smollm2_path, "0-19,25-29")
    repeated = _model_buffer_mib(smollm2_path, "0-29,0-29")
    per_layer = tensor_bytes_per_layer(smollm2_path)
    dropped = sum(per_layer[il] for il in range(20, 25)) / 2**20
    assert dropped > 1.0
    assert abs((full - pruned) - dropped) <= 0.05, (full, pruned, dropped)
    assert repeated == full, (repeated, full)


# --------------------------------------------------------------------------- 9. two models in one process


def test_two_orders_in_one_process(tiny):
    a_order, b_order = [0, 1, 1, 2], [3, 2, 1, 0]
    halves = (TINY_PROMPT[:5], TINY_PROMPT[5:])

    def alone(order):
        llm = _llama(tiny.path, layer_order=order, logits_all=True)
        scores = eval_scores(llm, *halves)
        llm.close()
        return scores

    want_a, want_b = alone(a_order), alone(b_order)
    a = _llama(tiny.path, layer_order=a_order, logits_all=True)
    b = _llama(tiny.path, layer_order=b_order, logits_all=True)
    a.reset()
    b.reset()
    a.eval(halves[0])
    b.eval(halves[0])
    a.eval(halves[1])
    b.eval(halves[1])
    got_a, got_b = scores_so_far(a), scores_so_far(b)
    assert a.layer_order == a_order and b.layer_order == b_order
    a.close()
    b.close()
    assert np.array_equal(got_a, want_a)
    assert np.array_equal(got_b, want_b)
    assert not np.array_equal(got_a, got_b)


def test_two_smollm2_orders_in_one_process(smollm2_path):
    specs = ("0-9,15-29", SMOL_SPEC)

    def logits(model):
        return run(model, [SMOL_PROMPT], "batch")[0]

    kw = [dict(kv_overrides=override_keys("llama", parse_spec(spec)), n_ctx=64, n_threads=THREADS) for spec in specs]
    alone = [raw_logits(smollm2_path, [SMOL_PROMPT], **k)[0] for k in kw]
    with contextlib.ExitStack() as stack:
        models = [stack.enter_context(RawModel(smollm2_path, **k)) for k in kw]
        together = [logits(m) for m in models]
        together_again = [logits(m) for m in reversed(models)][::-1]
    for x, y, z in zip(alone, together, together_again):
        assert np.array_equal(x, y)
        assert np.array_equal(x, z)
