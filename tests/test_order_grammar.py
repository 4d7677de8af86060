"""Tests for frankenllama.order: the layer-order grammar shared with the C parser.

``ACCEPT`` and ``REJECT`` below double as the conformance table for the C side.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frankenllama.order import (
    MAX_OVERRIDE_BYTES,
    MAX_POSITIONS,
    LayerOrderError,
    check_kv_overrides,
    format_spec,
    override_chunks,
    override_key_name,
    override_keys,
    parse_spec,
    validate_order,
)

# (spec, n_layers, expected order) -- the C parser must produce the same.
ACCEPT: list[tuple[str, int | None, list[int]]] = [
    ("0", None, [0]),
    ("7", 8, [7]),
    ("0-3", None, [0, 1, 2, 3]),
    ("9-5", None, [9, 8, 7, 6, 5]),
    ("4-4", None, [4]),
    ("0-3,2-4", None, [0, 1, 2, 3, 2, 3, 4]),
    ("1,1", None, [1, 1]),
    (" 0 - 2 ,\t5\n,\r\n3 ", None, [0, 1, 2, 5, 3]),
    ("1 2", None, [12]),  # whitespace is removed everywhere, even between digits
    ("007", None, [7]),
    ("000000007", None, [7]),  # 9 digits, leading zeros included
    ("999999999", None, [999999999]),
    ("999999998-999999999", None, [999999998, 999999999]),
    ("0-511", None, list(range(512))),
    ("511-0", 512, list(range(511, -1, -1))),
    ("0-255,0-255", 256, list(range(256)) * 2),
    ("0-15,8-23,16-31", 32, list(range(16)) + list(range(8, 24)) + list(range(16, 32))),
]

# (spec, n_layers, fragment of the error message) -- the C parser must reject these.
REJECT: list[tuple[str, int | None, str]] = [
    ("", None, "empty layer order spec"),
    ("  \t\n", None, "empty layer order spec"),
    (",", None, "item 1 '' (column 1): empty item"),
    ("1,", None, "item 2 '' (column 3): empty item"),
    ("1,,2", None, "item 2"),
    (",1", None, "item 1"),
    ("1, ,2", None, "empty item"),
    ("-5", None, "negative"),
    ("3,-5", None, "item 2 '-5'"),
    ("0--5", None, "single '-'"),
    ("1-2-3", None, "single '-'"),
    ("5-", None, "missing its end"),
    ("-", None, "negative"),
    ("a", None, "unexpected character 'a'"),
    ("1a", None, "unexpected character 'a'"),
    ("+1", None, "unexpected character '+'"),
    ("1.5", None, "unexpected character '.'"),
    ("1..5", None, "unexpected character '.'"),
    ("1;2", None, "unexpected character ';'"),
    ("0x10", None, "unexpected character 'x'"),
    ("\u0661", None, "unexpected character"),  # ARABIC-INDIC DIGIT ONE
    ("\u00b2", None, "unexpected character"),  # SUPERSCRIPT TWO
    ("1\u00a02", None, "unexpected character"),  # NO-BREAK SPACE is not whitespace here
    ("1\v2", None, "unexpected character"),  # vertical tab is not whitespace here
    ("1\f2", None, "unexpected character"),  # form feed is not whitespace here
    ("1000000000", None, "out of range"),
    ("0000000001", None, "out of range"),
    ("0-1000000000", None, "out of range"),
    ("8", 8, "out of range for a model with 8 layers"),
    ("0-8", 8, "item 1 '0-8'"),
    ("8-0", 8, "out of range"),
    ("0-512", None, "exceed 512 positions"),
    ("0-255,0-256", None, "item 2 '0-256'"),
    ("0-999999999", None, "exceed 512 positions"),
    (",".join(["0"] * 513), None, "item 513"),
]


@pytest.mark.parametrize(("spec", "n_layers", "expected"), ACCEPT)
def test_accept(spec: str, n_layers: int | None, expected: list[int]) -> None:
    assert parse_spec(spec, n_layers) == expected


@pytest.mark.parametrize(("spec", "n_layers", "fragment"), REJECT)
def test_reject(spec: str, n_layers: int | None, fragment: str) -> None:
    with pytest.raises(LayerOrderError) as info:
        parse_spec(spec, n_layers)
    assert fragment in str(info.value)


def test_error_names_item_and_column() -> None:
    with pytest.raises(ValueError, match=r"item 3 '2x' \(column 8\)"):
        parse_spec("0-1, 3,2x")
    with pytest.raises(ValueError, match=r"item 2 '3x' \(column 7\)"):
        parse_spec("0-1,  3x ,2")


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "8"])
def test_parse_rejects_bad_n_layers(bad: object) -> None:
    with pytest.raises(ValueError, match="n_layers"):
        parse_spec("0", bad)  # type: ignore[arg-type]


def test_parse_rejects_non_string() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_spec([0, 1])  # type: ignore[arg-type]


def test_layer_order_error_is_a_value_error() -> None:
    import frankenllama

    assert frankenllama.LayerOrderError is LayerOrderError
    assert issubclass(LayerOrderError, ValueError)


@pytest.mark.parametrize(("spec", "column"), [("0-5\x00junk", 4), ("\x00", 1), ("0,1\x00", 4)])
def test_parse_rejects_nul(spec: str, column: int) -> None:
    """The C parser reads a C string and would stop at the NUL, running "0-5" for "0-5\\0junk"."""
    with pytest.raises(LayerOrderError, match=rf"NUL character \('\\x00'\) at column {column}\b"):
        parse_spec(spec)


# ------------------------------------------------------------------ format_spec


@pytest.mark.parametrize(
    ("order", "spec"),
    [
        ([0], "0"),
        ([0, 1, 2, 3, 2, 3, 4], "0-3,2-4"),
        ([5, 4, 3], "5-3"),
        ([1, 1], "1,1"),
        ([3, 4, 3], "3-4,3"),
        ([3, 4, 3, 2], "3-4,3-2"),
        ([0, 2, 4], "0,2,4"),
        ([0, 1], "0-1"),
        ([1, 0, 1, 0], "1-0,1-0"),
        ([7, 7, 8, 9, 9], "7,7-9,9"),
        (list(range(16)) + list(range(8, 32)), "0-15,8-31"),
        ([999999999, 999999998], "999999999-999999998"),
    ],
)
def test_format_spec(order: list[int], spec: str) -> None:
    assert format_spec(order) == spec
    assert parse_spec(spec) == order


@pytest.mark.parametrize(
    ("order", "fragment"),
    [
        ([], "at least one position"),
        ([0] * 513, "at most 512"),
        ([-1], "position 0: layer -1 is out of range"),
        ([0, 10**9], "position 1"),
        ([0, True], "position 1: layer index must be an int"),
        ([0, 1.0], "must be an int"),
        ("0-3", "parse spec strings with parse_spec"),
        (5, "must be a list of ints"),
    ],
)
def test_format_spec_rejects(order: object, fragment: str) -> None:
    with pytest.raises(LayerOrderError) as info:
        format_spec(order)  # type: ignore[arg-type]
    assert fragment in str(info.value)


# ------------------------------------------------------------------ validate_order


def test_validate_order_accepts_and_copies() -> None:
    order = (0, 1, 1, 2)
    result = validate_order(order, 3)
    assert result == [0, 1, 1, 2] and isinstance(result, list)
    assert all(type(x) is int for x in result)


@pytest.mark.parametrize(
    ("order", "n_layers", "fragment"),
    [
        ([], 4, "at least one position"),
        ([0] * 513, 4, "at most 512"),
        ([0, 4], 4, "position 1: layer 4 is out of range (valid: 0..3 for a model with 4 layers)"),
        ([0, -1], 4, "position 1: layer -1"),
        ([False], 4, "position 0: layer index must be an int, got False"),
        ([0, None], 4, "position 1"),
        ([0, "1"], 4, "position 1"),
        ("0,1", 4, "parse_spec"),
        ({0, 1}, 4, "must be a list of ints"),
        ([0], 0, "n_layers must be a positive integer"),
        ([0], True, "n_layers"),
    ],
)
def test_validate_order_rejects(order: object, n_layers: object, fragment: str) -> None:
    with pytest.raises(LayerOrderError) as info:
        validate_order(order, n_layers)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_validate_order_max_positions_ok() -> None:
    assert len(validate_order([0] * MAX_POSITIONS, 1)) == MAX_POSITIONS


# ------------------------------------------------------------------ override chunks


def test_override_chunks_short_spec_is_one_piece() -> None:
    assert override_chunks("0-23,8-31") == ["0-23,8-31"]


def test_override_chunks_cut_after_comma() -> None:
    spec = ",".join(str(i) for i in range(0, 512, 2))
    pieces = override_chunks(spec)
    assert "".join(pieces) == spec
    assert len(pieces) > 1
    assert all(p.endswith(",") for p in pieces[:-1])
    assert not pieces[-1].endswith(",")
    assert all(len(p.encode()) <= MAX_OVERRIDE_BYTES for p in pieces)
    # greedy: the next item would not have fitted on the previous piece
    for left, right in zip(pieces, pieces[1:]):
        first_item = right.split(",")[0] + ("," if "," in right else "")
        assert len(left) + len(first_item) > MAX_OVERRIDE_BYTES


def test_override_chunks_exactly_127_bytes() -> None:
    spec = ",".join(["1"] * 64)  # 127 bytes
    assert len(spec) == MAX_OVERRIDE_BYTES
    assert override_chunks(spec) == [spec]
    assert override_chunks(spec + ",1") == [",".join(["1"] * 63) + ",", "1,1"]


@pytest.mark.parametrize("spec", ["", "1,", "a", "0-512"])
def test_override_chunks_rejects_invalid_spec(spec: str) -> None:
    with pytest.raises(ValueError):
        override_chunks(spec)


def test_override_keys_names() -> None:
    keys = override_keys("llama", list(range(0, 512, 2)))
    names = list(keys)
    assert names[0] == "llama.layer_order"
    assert names[1:] == [f"llama.layer_order.{n}" for n in range(1, len(names))]
    assert parse_spec("".join(keys.values())) == list(range(0, 512, 2))
    assert override_key_name("qwen2", 0) == "qwen2.layer_order"
    assert override_key_name("qwen2", 3) == "qwen2.layer_order.3"


def test_override_keys_short() -> None:
    assert override_keys("llama", [0, 1, 2, 1, 2, 3]) == {"llama.layer_order": "0-2,1-3"}


@pytest.mark.parametrize("arch", ["", "ll ama", None])
def test_override_keys_rejects_bad_arch(arch: object) -> None:
    with pytest.raises(ValueError, match="arch"):
        override_keys(arch, [0])  # type: ignore[arg-type]


# ------------------------------------------------------------------ check_kv_overrides


@pytest.mark.parametrize(
    "overrides",
    [
        None,
        {},
        {"llama.layer_order": "0-3"},
        override_keys("llama", list(range(0, 512, 2))),
        {"llama.block_count": 4, "qwen2.block_count": 4, "general.name": "x"},
        {"frankenllama.source_layer_order": "0-3", "llama.layer_orders": "x"},
        {"llama.layer_order": 5},  # a wrong type is llama.cpp's to report (it does, clearly)
    ],
)
def test_check_kv_overrides_accepts(overrides: dict | None) -> None:
    check_kv_overrides("llama", overrides)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        # continuation keys llama.cpp never reads: only .1, .2, ... continue an order
        ({"llama.layer_order": "0,", "llama.layer_order.0": "1"}, "llama.layer_order.0"),
        ({"llama.layer_order": "0,", "llama.layer_order.1": "1,", "llama.layer_order.01": "2"},
         "llama.layer_order.01"),
        ({"llama.layer_order": "0", "llama.layer_order.x": "1"}, "llama.layer_order.x"),
        ({"llama.layer_order": "0", "llama.layer_order.": "1"}, "llama.layer_order."),
        # another architecture's key: llama.cpp reads only <model arch>.layer_order
        ({"qwen2.layer_order": "3-0"}, "qwen2.layer_order"),
        ({"llama.layer_order": "0,", "qwen2.layer_order.1": "1"}, "qwen2.layer_order.1"),
        ({"llama.layer_order": "0-5\x00junk"}, "llama.layer_order"),  # llama.cpp would run 0-5
    ],
)
def test_check_kv_overrides_rejects(overrides: dict, key: str) -> None:
    with pytest.raises(LayerOrderError) as info:
        check_kv_overrides("llama", overrides)
    assert repr(key) in str(info.value)


def test_check_kv_overrides_says_what_to_do() -> None:
    with pytest.raises(LayerOrderError, match=r"for the 'qwen2' architecture, but the model is 'llama'.*"
                                              r"use 'llama\.layer_order'"):
        check_kv_overrides("llama", {"qwen2.layer_order": "0"})
    with pytest.raises(LayerOrderError, match=r"reads only llama\.layer_order, llama\.layer_order\.1, "):
        check_kv_overrides("llama", {"llama.layer_order.0": "0"})
    with pytest.raises(LayerOrderError, match="arch"):
        check_kv_overrides("", {})


def test_override_keys_rejects_bad_order() -> None:
    with pytest.raises(ValueError, match="at least one position"):
        override_keys("llama", [])


# ------------------------------------------------------------------ properties


@st.composite
def orders(draw: st.DrawFn, max_layers: int = 80) -> list[int]:
    """Random orders of 1..512 positions over up to 80 layers, built from runs."""
    n_layers = draw(st.integers(1, max_layers))
    order: list[int] = []
    target = draw(st.integers(1, MAX_POSITIONS))
    while len(order) < target:
        start = draw(st.integers(0, n_layers - 1))
        kind = draw(st.sampled_from(["up", "down", "single", "random"]))
        if kind == "up":
            stop = draw(st.integers(start, n_layers - 1))
            order.extend(range(start, stop + 1))
        elif kind == "down":
            stop = draw(st.integers(0, start))
            order.extend(range(start, stop - 1, -1))
        elif kind == "single":
            order.append(start)
        else:
            order.extend(draw(st.lists(st.integers(0, n_layers - 1), max_size=8)))
    return order[:target]


@settings(max_examples=300, deadline=None)
@given(orders())
def test_roundtrip(order: list[int]) -> None:
    spec = format_spec(order)
    assert parse_spec(spec) == order
    assert parse_spec(spec, max(order) + 1) == order
    assert format_spec(parse_spec(spec)) == spec
    assert re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", spec)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 79), min_size=1, max_size=MAX_POSITIONS))
def test_roundtrip_unstructured(order: list[int]) -> None:
    assert parse_spec(format_spec(order)) == order


@settings(max_examples=300, deadline=None)
@given(orders())
def test_chunks_roundtrip(order: list[int]) -> None:
    spec = format_spec(order)
    pieces = override_chunks(spec)
    assert "".join(pieces) == spec
    assert all(0 < len(p.encode()) <= MAX_OVERRIDE_BYTES for p in pieces)
    assert all(p.endswith(",") for p in pieces[:-1])
    keys = override_keys("llama", order)
    assert list(keys.values()) == pieces


@settings(max_examples=200, deadline=None)
@given(orders(), st.data())
def test_whitespace_anywhere_is_ignored(order: list[int], data: st.DataObject) -> None:
    spec = format_spec(order)
    noisy = "".join(
        ch + data.draw(st.text(alphabet=" \t\r\n", max_size=2)) for ch in spec
    )
    assert parse_spec(noisy) == order


_REFERENCE = re.compile(r"\d{1,9}(-\d{1,9})?(,\d{1,9}(-\d{1,9})?)*", re.ASCII)


def _reference_accepts(spec: str, n_layers: int | None) -> bool:
    """Independent acceptor: regex on the whitespace-free spec, then count and range."""
    compact = "".join(ch for ch in spec if ch not in " \t\r\n")
    if not _REFERENCE.fullmatch(compact):
        return False
    total = 0
    for item in compact.split(","):
        ends = [int(x) for x in item.split("-")]
        total += abs(ends[-1] - ends[0]) + 1
        if n_layers is not None and max(ends) >= n_layers:
            return False
    return total <= MAX_POSITIONS


@settings(max_examples=1000, deadline=None)
@given(
    st.text(alphabet="0123456789-, \t\n\r+.x\u00a0", max_size=24),
    st.one_of(st.none(), st.integers(1, 80)),
)
def test_matches_reference_acceptor(spec: str, n_layers: int | None) -> None:
    try:
        parse_spec(spec, n_layers)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == _reference_accepts(spec, n_layers)
