"""The C order parser (what the loader runs) against the Python grammar: property tests and fuzzing.

The C parser is reached through ``llama_layer_order_parse``, the same function the loader uses,
so thousands of inputs run without loading a model. ``FRANKENLLAMA_FUZZ_N`` raises the count for a
longer run (CI uses the fixed default).
"""
from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frankenllama import Llama
from frankenllama._native import parse_spec_native
from frankenllama.order import format_spec, override_chunks, parse_spec

FUZZ_N = int(os.environ.get("FRANKENLLAMA_FUZZ_N", "10000"))
FUZZ_SEED = 20261121


@st.composite
def orders(draw):
    n_layers = draw(st.integers(1, 80))
    order = draw(st.lists(st.integers(0, n_layers - 1), min_size=1, max_size=512))
    return n_layers, order


@settings(max_examples=300, deadline=None)
@given(orders())
def test_c_parser_reads_what_python_writes(case):
    n_layers, order = case
    spec = format_spec(order)
    assert parse_spec_native(spec, n_layers) == order
    assert "".join(override_chunks(spec)) == spec
    assert all(len(piece.encode()) <= 127 for piece in override_chunks(spec))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=40, max_size=300))
def test_long_orders_travel_through_continuation_keys(tiny, order):
    """Orders longer than one 127-byte override are split into <arch>.layer_order.N keys and rejoined."""
    llm = Llama(str(tiny.path), layer_order=order, verbose=False, n_ctx=32)
    try:
        assert llm.layer_order == order
    finally:
        llm.close()


def _python_result(spec: str, n_layers: int):
    try:
        return parse_spec(spec, n_layers)
    except ValueError:
        return None


def _native_result(spec: str, n_layers: int):
    try:
        return parse_spec_native(spec, n_layers)
    except ValueError as err:
        assert str(err).startswith("layer_order:"), str(err)
        return None


def _fuzz_input(rng: random.Random) -> str:
    kind = rng.randrange(6)
    alphabet = "0123456789-, \t\n\r"
    if kind == 0:  # random bytes (no NUL: C strings end there)
        return bytes(rng.randrange(1, 256) for _ in range(rng.randrange(0, 64))).decode("latin-1")
    if kind == 1:  # near-valid: grammar characters only
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    if kind == 2:  # huge and negative numbers
        return ",".join(rng.choice(["-", ""]) + str(rng.randrange(0, 10 ** rng.randrange(1, 14)))
                        for _ in range(rng.randrange(1, 5)))
    if kind == 3:  # a valid spec with one mutation
        spec = format_spec([rng.randrange(0, 40) for _ in range(rng.randrange(1, 60))])
        i = rng.randrange(len(spec))
        return spec[:i] + rng.choice(alphabet + "x;.+") + spec[i + rng.randrange(0, 2):]
    if kind == 4:  # around the 127-byte override boundary
        spec = format_spec([rng.randrange(0, 40) for _ in range(200)])
        return spec[: rng.randrange(120, 135)]
    return "-".join(str(rng.randrange(0, 600)) for _ in range(rng.randrange(1, 4)))  # ranges, long ones too


def test_fuzz_c_parser_agrees_with_python():
    """Zero crashes; every input is accepted by both parsers with the same result, or rejected by both."""
    rng = random.Random(FUZZ_SEED)
    rejected = 0
    for _ in range(FUZZ_N):
        spec = _fuzz_input(rng)
        n_layers = rng.choice([1, 4, 30, 80, 512])
        want = _python_result(spec, n_layers)
        got = _native_result(spec, n_layers)
        assert got == want, f"spec {spec!r} n_layers {n_layers}: C {got} vs Python {want}"
        rejected += got is None
    assert 0 < rejected < FUZZ_N  # the generator exercises both outcomes


@pytest.mark.parametrize("spec, message", [
    ("", "empty"), ("1,,2", "empty"), ("0-5;7", "not an index"), ("-1", "not an index"),
    ("0--5", "not an index"), ("9999999999", "not an index"), ("0-30", "out of range"),
    ("0-9," * 3, "empty"), (",".join(["0-29"] * 18), "more than 512"),
])
def test_c_parser_messages(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec_native(spec, 30)
