"""A stateful property test of ``frankenllama.Llama``'s public, stateful API (issue 16).

Hypothesis interleaves loads, completions, partly consumed streams, ``set_layer_order``,
``save_state``/``load_state``, a prompt cache switched on and off (one cache object shared by every
model of the run), pickling and ``reset`` over several orders of a tiny model.  After every step,
unless a stream is open, a greedy completion must equal a fresh load of the current order's; a
resumed stream must either finish with a fresh load's text or stop with
``GenerationInterruptedError`` when something changed the context under it; refused calls must
leave the model as it was.  Nothing may crash.

CI runs a bounded, derandomized number of examples; ``FRANKENLLAMA_STATEFUL_EXAMPLES=500`` runs
more, with fresh random choices.
"""
from __future__ import annotations

import os
import pickle

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from llama_cpp import LlamaRAMCache

from frankenllama import GenerationInterruptedError, LayerOrderChangedError, Llama, StateMismatchError
from tiny_model import write_tiny_llama

ORDERS = [(0, 1, 2, 3), (0, 1, 2, 2, 3), (3, 2, 1, 0), (0, 2), (1, 1, 1)]
PROMPTS = ["abc", "abcdef", "hello"]
N_GEN = 6
EXAMPLES = int(os.environ.get("FRANKENLLAMA_STATEFUL_EXAMPLES", "40"))
LLAMA_KW = dict(verbose=False, n_ctx=96, n_threads=2)

_model_path: str | None = None
_fresh: dict[tuple[tuple[int, ...], str, bool], str] = {}


def _complete(llm: Llama, prompt: str) -> str:
    return llm(prompt, max_tokens=N_GEN, temperature=0.0)["choices"][0]["text"]


def _stream_text(stream) -> str:
    return "".join(chunk["choices"][0]["text"] for chunk in stream)


def fresh_answer(order: tuple[int, ...], prompt: str, stream: bool = False) -> str:
    """Greedy completion of a fresh load of ``order`` (streamed: llama-cpp-python streams the
    bytes of these random tokens a little differently from a plain completion)."""
    if (order, prompt, stream) not in _fresh:
        llm = Llama(_model_path, layer_order=list(order), **LLAMA_KW)
        if stream:
            _fresh[(order, prompt, stream)] = _stream_text(llm(prompt, max_tokens=N_GEN, temperature=0.0, stream=True))
        else:
            _fresh[(order, prompt, stream)] = _complete(llm, prompt)
        llm.close()
    return _fresh[(order, prompt, stream)]


def finish_or_stop(stream, text: str, order: tuple[int, ...], prompt: str, error: type[Exception]) -> None:
    """A stream whose context changed stops with ``error``, unless its generation had already
    ended (the chunks left are buffered text): then its text must be a fresh load's."""
    try:
        text += _stream_text(stream)
    except error:
        return
    assert text == fresh_answer(order, prompt, stream=True)


class LlamaMachine(RuleBasedStateMachine):
    """The model under test and what it must be running."""

    def __init__(self) -> None:
        super().__init__()
        self.llm: Llama | None = None
        self.order: tuple[int, ...] = ORDERS[0]
        self.loaded: set[int] = set()
        self.saved: list[tuple[tuple[int, ...], object]] = []
        self.cache = LlamaRAMCache(capacity_bytes=64 << 20)
        self.stream = None  # (iterator, prompt, order, text so far, interrupted?)

    # -- helpers

    def _changed_context(self) -> None:
        """A call that changes the context: an open stream must stop when resumed."""
        if self.stream is not None:
            self.stream = (*self.stream[:4], True)

    # -- rules

    @initialize(order=st.sampled_from(ORDERS))
    def load(self, order: tuple[int, ...]) -> None:
        self.llm = Llama(_model_path, layer_order=list(order), **LLAMA_KW)
        self.order, self.loaded = order, set(order)

    @rule(order=st.sampled_from(ORDERS))
    def reload(self, order: tuple[int, ...]) -> None:
        self.llm.close()
        self.stream = None
        self.load(order)

    @rule(prompt=st.sampled_from(PROMPTS))
    def complete(self, prompt: str) -> None:
        self._changed_context()
        assert _complete(self.llm, prompt) == fresh_answer(self.order, prompt)

    @precondition(lambda self: self.stream is None)
    @rule(prompt=st.sampled_from(PROMPTS), n=st.integers(1, 3))
    def start_stream(self, prompt: str, n: int) -> None:
        stream = self.llm(prompt, max_tokens=N_GEN, temperature=0.0, stream=True)
        text = "".join(next(stream)["choices"][0]["text"] for _ in range(n))
        self.stream = (stream, prompt, self.order, text, False)

    @precondition(lambda self: self.stream is not None)
    @rule()
    def resume_stream(self) -> None:
        stream, prompt, order, text, interrupted = self.stream
        self.stream = None
        if interrupted:
            finish_or_stop(stream, text, order, prompt, GenerationInterruptedError)
            return
        text += _stream_text(stream)
        assert text == fresh_answer(order, prompt, stream=True)

    @rule(order=st.sampled_from(ORDERS + [None]))
    def set_layer_order(self, order: tuple[int, ...] | None) -> None:
        target = ORDERS[0] if order is None else order
        if not set(target) <= self.loaded:
            before = self.llm.layer_order
            with pytest.raises(ValueError, match="were not loaded"):
                self.llm.set_layer_order(None if order is None else list(order))
            assert self.llm.layer_order == before
            return
        stream = self.stream
        self.llm.set_layer_order(None if order is None else list(order))
        self.order = target
        if stream is not None:
            self.stream = None
            finish_or_stop(stream[0], stream[3], stream[2], stream[1], LayerOrderChangedError)

    @rule()
    def save_state(self) -> None:
        self.saved.append((self.order, self.llm.save_state()))

    @precondition(lambda self: self.saved)
    @rule(pick=st.integers(0, 100))
    def load_state(self, pick: int) -> None:
        order, state = self.saved[pick % len(self.saved)]
        if order == self.order:
            self._changed_context()
            self.llm.load_state(state)
        else:
            n_tokens = self.llm.n_tokens
            with pytest.raises(StateMismatchError):
                self.llm.load_state(state)
            assert self.llm.n_tokens == n_tokens

    @rule(on=st.booleans())
    def cache(self, on: bool) -> None:
        self.llm.set_cache(self.cache if on else None)

    @rule()
    def pickle_round_trip(self) -> None:
        clone = pickle.loads(pickle.dumps(self.llm))
        try:
            assert tuple(clone.layer_order) == self.order
            assert _complete(clone, PROMPTS[0]) == fresh_answer(self.order, PROMPTS[0])
        finally:
            clone.close()

    @rule()
    def reset(self) -> None:
        self._changed_context()
        self.llm.reset()

    # -- what must hold after every step

    @invariant()
    def runs_the_expected_order(self) -> None:
        if self.llm is not None:
            assert tuple(self.llm.layer_order) == self.order

    @invariant()
    def answers_like_a_fresh_load(self) -> None:
        if self.llm is not None and self.stream is None:
            assert _complete(self.llm, PROMPTS[1]) == fresh_answer(self.order, PROMPTS[1])

    def teardown(self) -> None:
        if self.llm is not None:
            self.llm.close()


LlamaMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=25, deadline=None, derandomize="FRANKENLLAMA_STATEFUL_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.too_slow], database=None)


@pytest.fixture(scope="module", autouse=True)
def tiny_model_for_the_machine(tmp_path_factory):
    global _model_path
    _model_path = str(write_tiny_llama(tmp_path_factory.mktemp("stateful") / "tiny.gguf", n_layer=4, seed=11).path)
    _fresh.clear()
    yield
    _model_path = None


TestLlamaMachine = LlamaMachine.TestCase
