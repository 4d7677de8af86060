"""No silent wrong answers around the core: states, prompt caches, pickling, streams, threads,
failed re-orders, replaced contexts (issue 16).  Each test is built from a reproduction of a bug
that returned wrong text with no error, or crashed the process."""
from __future__ import annotations

import copy
import gc
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from llama_cpp import LlamaRAMCache

from frankenllama import GenerationInterruptedError, LayerOrderChangedError, Llama, StateMismatchError
from helpers import load
from tiny_model import write_tiny_llama

PROMPT = "The capital of France is"
OTHER = "0-29,10-20"  # a 41-position order of SmolLM2


def _smol(path: str, order: object = None, **kw) -> Llama:
    return load(path, layer_order=order, **{"n_ctx": 256, "n_threads": 2, "n_threads_batch": None, **kw})


def _complete(llm: Llama, prompt: str = PROMPT, n: int = 8) -> str:
    return llm(prompt, max_tokens=n, temperature=0.0)["choices"][0]["text"]


@pytest.fixture(scope="module")
def fresh(smollm2_path):
    """Greedy completion of a fresh load, per (order, prompt): what every path must reproduce."""
    answers: dict[tuple[object, str], str] = {}

    def answer(order: object, prompt: str = PROMPT) -> str:
        if (order, prompt) not in answers:
            llm = _smol(smollm2_path, order)
            answers[(order, prompt)] = _complete(llm, prompt)
            llm.close()
        return answers[(order, prompt)]

    return answer


# ------------------------------------------------------------------ 1. refused states and caches


def test_refused_state_leaves_the_model_as_it_was(smollm2_path, fresh):
    """A state of another order, whose tokens the next prompt shares, must not make the model
    believe it holds K/V it does not have."""
    other = _smol(smollm2_path, OTHER)
    _complete(other, PROMPT)
    foreign = other.save_state()
    other.close()

    llm = _smol(smollm2_path)
    _complete(llm, "Once upon a time")
    n_tokens, input_ids = llm.n_tokens, llm.input_ids[: llm.n_tokens].tolist()
    with pytest.raises(StateMismatchError, match="another layer order"):
        llm.load_state(foreign)
    assert (llm.n_tokens, llm.input_ids[: llm.n_tokens].tolist()) == (n_tokens, input_ids)
    assert _complete(llm, PROMPT) == fresh(None)
    llm.close()


def test_ram_cache_filled_before_set_layer_order(smollm2_path, fresh):
    llm = _smol(smollm2_path)
    llm.set_cache(LlamaRAMCache())
    assert _complete(llm) == fresh(None)
    llm.set_layer_order(OTHER)
    assert _complete(llm) == fresh(OTHER)
    assert _complete(llm) == fresh(OTHER)  # second call: served from the cache of this order
    llm.set_layer_order(None)
    assert _complete(llm) == fresh(None)
    llm.close()


def test_one_cache_shared_by_two_orders(smollm2_path, fresh):
    shared = LlamaRAMCache()
    a, b = _smol(smollm2_path), _smol(smollm2_path, OTHER)
    a.set_cache(shared)
    b.set_cache(shared)
    for _ in range(2):
        assert _complete(a) == fresh(None)
        assert _complete(b) == fresh(OTHER)
    assert a.cache.inner is shared and b.cache.inner is shared
    a.close()
    b.close()


def test_unrestorable_cache_entry_is_evicted_as_a_miss(smollm2_path, fresh):
    """An entry stored under this order's key but holding another order's state (planted by hand)
    is a miss: evicted, computed normally."""
    other = _smol(smollm2_path, OTHER)
    _complete(other)
    foreign = other.save_state()
    other.close()

    cache = LlamaRAMCache()
    llm = _smol(smollm2_path)
    llm.set_cache(cache)
    llm.cache[foreign.input_ids[: foreign.n_tokens].tolist()] = foreign
    assert len(cache.cache_state) == 1
    assert _complete(llm) == fresh(None)
    assert all(state is not foreign for state in cache.cache_state.values())
    assert _complete(llm) == fresh(None)
    llm.close()


STOCK_FILL = """
import sys
from llama_cpp import Llama, LlamaDiskCache
llm = Llama(sys.argv[1], verbose=False, n_ctx=256, n_threads=2)
llm.set_cache(LlamaDiskCache(sys.argv[2]))
print("STOCK", repr(llm({prompt!r}, max_tokens=8, temperature=0.0)["choices"][0]["text"]))
"""

FRANKEN_USE = """
import sys
from frankenllama import Llama
from llama_cpp import LlamaDiskCache
llm = Llama(sys.argv[1], verbose=False, n_ctx=256, n_threads=2)
llm.set_cache(LlamaDiskCache(sys.argv[2]))
for _ in range(2):
    print("FRANKEN", repr(llm({prompt!r}, max_tokens=8, temperature=0.0)["choices"][0]["text"]))
"""


def test_disk_cache_filled_by_stock_llama_cpp_python(smollm2_path, stock_lib_dir, tmp_path, fresh):
    """No order at all: a LlamaDiskCache written by stock llama-cpp-python is ignored (its entries are
    not of frankenllama's format), in this process and in the next."""
    cache_dir = str(tmp_path / "cache")
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": stock_lib_dir}
    env.pop("FRANKENLLAMA_LIB_DIR", None)
    stock = subprocess.run([sys.executable, "-c", STOCK_FILL.format(prompt=PROMPT), smollm2_path, cache_dir],
                           capture_output=True, text=True, env=env)
    assert "STOCK" in stock.stdout, stock.stderr[-2000:]
    want = repr(fresh(None))
    assert stock.stdout.split("STOCK ", 1)[1].strip() == want  # same answer from the stock library
    for _ in range(2):  # two processes: the second sees what the first wrote back
        ours = subprocess.run([sys.executable, "-c", FRANKEN_USE.format(prompt=PROMPT), smollm2_path, cache_dir],
                              capture_output=True, text=True)
        answers = [line.split(" ", 1)[1] for line in ours.stdout.splitlines() if line.startswith("FRANKEN ")]
        assert answers == [want, want], ours.stderr[-3000:]


# ------------------------------------------------------------------ 2. pickling


def test_pickle_and_deepcopy_rebuild_the_current_order(smollm2_path, fresh):
    llm = _smol(smollm2_path, "0-29,0-5")
    llm.set_layer_order(OTHER)
    assert not any("layer_order" in k for k in (llm.kv_overrides or {}))
    for clone in (pickle.loads(pickle.dumps(llm)), copy.deepcopy(llm)):
        assert clone.layer_order == llm.layer_order
        assert _complete(clone) == fresh(OTHER)
        clone.close()
    llm.close()


def test_pickle_keeps_the_users_other_overrides(tiny):
    llm = Llama(str(tiny.path), verbose=False, n_ctx=32, kv_overrides={"llama.layer_order": "3-0",
                                                                       "llama.expert_count": 0})
    llm.set_layer_order([1, 2])
    state = llm.__getstate__()
    assert state["kv_overrides"] == {"llama.expert_count": 0}
    assert state["layer_order"] == [1, 2]
    llm.close()


# ------------------------------------------------------------------ 3. re-order during a stream


def test_stream_stops_when_the_order_changes(smollm2_path, fresh):
    llm = _smol(smollm2_path)
    stream = llm(PROMPT, max_tokens=16, temperature=0.0, stream=True)
    next(stream)
    llm.set_layer_order(OTHER)
    with pytest.raises(LayerOrderChangedError, match="start the generation again"):
        next(stream)
    assert _complete(llm) == fresh(OTHER)  # the model itself is fine
    llm.close()


def test_generator_not_started_before_a_reorder_runs_the_new_order(tiny):
    """Nothing was computed before its first token: it runs (from scratch) under the order of the
    moment, exactly as a generator created then."""
    llm = Llama(str(tiny.path), verbose=False, n_ctx=64)
    early = llm.generate([1, 2, 3], temp=0.0)
    llm.set_layer_order([0, 1])
    got = [next(early) for _ in range(5)]
    early.close()
    llm.reset()
    late = llm.generate([1, 2, 3], temp=0.0)
    assert got == [next(late) for _ in range(5)]
    llm.close()


# ------------------------------------------------------------------ 4. set_layer_order(None)


def test_set_layer_order_none_restores_the_order_the_file_stores(tmp_path):
    model = write_tiny_llama(tmp_path / "stored.gguf", n_layer=4, seed=3, layer_order=[0, 2, 2, 1])
    llm = Llama(str(model.path), verbose=False, n_ctx=32)
    assert llm.layer_order == [0, 2, 2, 1]
    assert llm.file_layer_order() == [0, 2, 2, 1]
    llm.set_layer_order([1, 2])
    llm.set_layer_order(None)
    assert llm.layer_order == [0, 2, 2, 1]
    llm.close()


def test_set_layer_order_none_without_a_stored_order_runs_every_layer(tiny):
    llm = Llama(str(tiny.path), verbose=False, n_ctx=32)
    llm.set_layer_order([1, 1])
    llm.set_layer_order(None)
    assert llm.layer_order == [0, 1, 2, 3]
    llm.close()


# ------------------------------------------------------------------ 5. threads


THREADS = """
import sys, threading
from frankenllama import Llama, LayerOrderChangedError
llm = Llama(sys.argv[1], verbose=False, n_ctx=128, n_threads=1)
stop = threading.Event()
counts = {"tokens": 0, "interrupted": 0}

def generate():
    while not stop.is_set():
        try:
            for i, _ in enumerate(llm.generate([1, 5, 9, 13], temp=0.0)):
                counts["tokens"] += 1
                if i == 40:
                    break
        except LayerOrderChangedError:
            counts["interrupted"] += 1

worker = threading.Thread(target=generate)
worker.start()
for i in range(60):
    llm.set_layer_order([0, 1, 2, 3] * (1 + i % 3))
stop.set()
worker.join()
print("SURVIVED", counts["tokens"] > 0, llm.layer_order == [0, 1, 2, 3] * 3)
"""


def test_set_layer_order_while_another_thread_generates(tiny):
    """Reproduction: SIGSEGV in 9 of 9 runs.  Now each step of a generation and each re-order hold
    the object's lock; the generation notices the re-order and stops with an exception."""
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", THREADS, str(tiny.path)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "SURVIVED True True" in proc.stdout


# ------------------------------------------------------------------ 6. a context that can't be allocated


def test_failed_context_keeps_the_previous_order(tmp_path):
    """A re-order whose K/V cache cannot be allocated (~34 GB here) raises, and the model keeps
    running its previous order instead of crashing at the next call."""
    model = write_tiny_llama(tmp_path / "t.gguf", n_layer=4, seed=5)
    kw = dict(verbose=False, n_ctx=1 << 19, n_batch=8, n_ubatch=8, n_threads=2, logits_all=True)
    llm = Llama(str(model.path), **kw)
    llm.set_layer_order([0, 1])
    with pytest.raises(ValueError, match="keeps its previous order"):
        llm.set_layer_order([0, 1, 2, 3] * 125)
    assert llm.layer_order == [0, 1]
    llm.eval([1, 2, 3, 4])
    got = np.array(llm.scores[:4])
    llm.close()
    ref = Llama(str(model.path), layer_order=[0, 1], **kw)
    ref.eval([1, 2, 3, 4])
    want = np.array(ref.scores[:4])
    ref.close()
    assert np.array_equal(got, want)


# ------------------------------------------------------------------ 10. replaced contexts are freed


def test_replaced_contexts_do_not_pile_up(tiny):
    from llama_cpp import _internals

    llm = Llama(str(tiny.path), verbose=False, n_ctx=32)
    for i in range(200):
        llm.set_layer_order([i % 4, 3])
    gc.collect()
    mine = [o for o in gc.get_objects() if isinstance(o, _internals.LlamaContext) and o.model is llm._model]
    assert len(mine) <= 2
    llm.close()


# ------------------------------------------------------------------ unclear errors


def test_vocab_only_with_an_order_says_why(tiny):
    with pytest.raises(ValueError, match="vocab_only=True loads no decoder blocks"):
        Llama(str(tiny.path), vocab_only=True, layer_order=[0, 1], verbose=False)


@pytest.mark.parametrize("order", [None, [0, 1]])
def test_missing_model_file_is_a_value_error_as_in_llama_cpp_python(tmp_path, order):
    with pytest.raises(ValueError, match="Model path does not exist"):
        Llama(str(tmp_path / "missing.gguf"), layer_order=order, verbose=False)


def test_stream_resumed_after_another_call_stops(smollm2_path, fresh):
    """Two generations on one object share one K/V cache: resuming the first after the second
    ran would continue from the wrong cache (silently, in llama-cpp-python)."""
    llm = _smol(smollm2_path)
    stream = llm(PROMPT, max_tokens=16, temperature=0.0, stream=True)
    next(stream)
    assert _complete(llm, "Once upon a time") == fresh(None, "Once upon a time")
    with pytest.raises(GenerationInterruptedError, match="another call"):
        next(stream)
    state = llm.save_state()  # reads only: a stream survives it
    stream = llm(PROMPT, max_tokens=8, temperature=0.0, stream=True)
    first = next(stream)["choices"][0]["text"]
    llm.save_state()
    with pytest.raises(StateMismatchError):
        llm.load_state(_foreign_state(smollm2_path))  # refused: nothing changed, the stream goes on
    rest = "".join(chunk["choices"][0]["text"] for chunk in stream)
    assert first + rest == fresh(None)
    llm.load_state(state)
    llm.close()


def _foreign_state(path: str):
    other = _smol(path, OTHER)
    other.eval(other.tokenize(b"Hello"))
    state = other.save_state()
    other.close()
    return state


# ------------------------------------------------------------------ attacks on the above (regressions)


def test_state_of_another_n_batch_is_refused_before_anything_changes(smollm2_path, fresh):
    """Scores of a logits_all=False state hold n_batch rows: restoring it where they don't fit used
    to fail after the native restore, leaving the K/V and the token bookkeeping out of step."""
    saver = _smol(smollm2_path, n_batch=8)
    saver.eval(saver.tokenize(PROMPT.encode() + b" a city of light and art"))
    state = saver.save_state()
    saver.close()
    llm = _smol(smollm2_path, n_batch=64)
    _complete(llm, "Once upon a time")
    with pytest.raises(StateMismatchError, match="n_batch"):
        llm.load_state(state)
    assert _complete(llm, PROMPT) == fresh(None)
    llm.close()


def test_states_and_caches_belong_to_one_model(tmp_path):
    """Two files of the same shape and order: neither serves the other's states."""
    a = write_tiny_llama(tmp_path / "a.gguf", n_layer=4, seed=21)
    b = write_tiny_llama(tmp_path / "b.gguf", n_layer=4, seed=22)

    def model(m):
        return Llama(str(m.path), verbose=False, n_ctx=64, n_threads=2)

    def complete(llm):
        return llm("abcabc", max_tokens=6, temperature=0.0)["choices"][0]["text"]

    fresh_b = complete(model(b))
    shared = LlamaRAMCache()
    la, lb = model(a), model(b)
    la.set_cache(shared)
    lb.set_cache(shared)
    complete(la)
    assert complete(lb) == fresh_b
    la.eval([1, 2, 3])
    with pytest.raises(StateMismatchError, match="another model"):
        lb.load_state(la.save_state())
    la.close()
    lb.close()


def test_interrupt_between_decode_and_bookkeeping(smollm2_path, fresh, monkeypatch):
    """Ctrl-C landing right after llama_decode returned: the next completion must decode again
    instead of sampling from the interrupted decode's logits."""
    import llama_cpp._internals as internals

    llm = _smol(smollm2_path)
    real, calls = internals.LlamaContext.decode, []

    def decode(ctx, batch):
        real(ctx, batch)
        calls.append(1)
        if len(calls) == 2:  # the first generated token
            raise KeyboardInterrupt

    monkeypatch.setattr(internals.LlamaContext, "decode", decode)
    with pytest.raises(KeyboardInterrupt):
        _complete(llm)
    monkeypatch.setattr(internals.LlamaContext, "decode", real)
    assert _complete(llm) == fresh(None)
    llm.close()


def test_embed_failing_part_way_resets_the_conversation(smollm2_path):
    kw = dict(n_ctx=1024, embedding=True)
    llm, ref = _smol(smollm2_path, **kw), _smol(smollm2_path, **kw)
    for m in (llm, ref):
        _complete(m, "Once upon a time")
    with pytest.raises(ValueError):
        llm.embed(["The weather is sunny " * 30, "b " * 600], truncate=False)
    assert _complete(llm, "Once upon a time, a dragon") == _complete(ref, "Once upon a time, a dragon")
    llm.close()
    ref.close()


def test_held_back_stream_chunks_notice_another_call(smollm2_path):
    """A stream yields held-back chunks (a possible stop sequence) after its last token: a completion
    between two of them must stop it, not hand it another conversation's logprobs."""
    llm = _smol(smollm2_path, logits_all=True)
    stream = llm(PROMPT, max_tokens=7, temperature=0.0, logprobs=1, stream=True, stop=["\n\nThe United Kingdom"])
    next(stream)
    llm("Cats and dogs are", max_tokens=3, temperature=0.0)
    with pytest.raises(GenerationInterruptedError):
        list(stream)
    llm.close()


def test_a_closed_model_raises_instead_of_crashing(tiny):
    """Reproduction: segfaults in save_state, tokenize, completions and streams after close()."""
    code = f"""
import sys
from frankenllama import Llama
llm = Llama({str(tiny.path)!r}, verbose=False, n_ctx=64)
stream = llm("abc", max_tokens=8, stream=True)
next(stream)
state = llm.save_state()
llm.close()
for name, call in [("stream", lambda: next(stream)), ("save_state", llm.save_state),
                   ("load_state", lambda: llm.load_state(state)), ("tokenize", lambda: llm.tokenize(b"x")),
                   ("complete", lambda: llm("abc", max_tokens=2)), ("eval", lambda: llm.eval([1])),
                   ("set_layer_order", lambda: llm.set_layer_order([0, 1]))]:
    try:
        call()
        print(name, "returned")
    except RuntimeError as err:
        print(name, type(err).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("\n")
    assert "stream LayerOrderChangedError" in lines
    for name in ("save_state", "load_state", "tokenize", "complete", "eval", "set_layer_order"):
        assert f"{name} RuntimeError" in lines, proc.stdout


def test_vocab_only_model_refuses_a_reorder(tiny):
    llm = Llama(str(tiny.path), vocab_only=True, verbose=False)
    for order in (None, [0, 1]):
        with pytest.raises(ValueError, match="vocab_only"):
            llm.set_layer_order(order)
    llm.close()


def test_state_of_another_n_ctx_is_refused(tiny):
    small = Llama(str(tiny.path), verbose=False, n_ctx=64)
    small.eval([1, 2, 3])
    state = small.save_state()
    small.close()
    big = Llama(str(tiny.path), verbose=False, n_ctx=128)
    with pytest.raises(StateMismatchError, match="n_ctx=64"):
        big.load_state(state)
    assert len(big.input_ids) == 128
    big.close()


def test_a_refused_reorder_keeps_the_load_time_override(tiny):
    llm = Llama(str(tiny.path), verbose=False, n_ctx=32, kv_overrides={"llama.layer_order": "3-0"})
    with pytest.raises(ValueError):
        llm.set_layer_order([0, 9])
    with pytest.raises(ValueError):
        llm.set_layer_order([0, 1] * 300)
    assert llm.kv_overrides == {"llama.layer_order": "3-0"} and llm.layer_order == [3, 2, 1, 0]
    llm.close()
