"""Layer programs: the grammar, its canonical form, block files, recipes (pure Python)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frankenllama.order import LayerOrderError, format_spec, parse_spec
from frankenllama.program import EMBEDDINGS, LayerProgram, Layers, Parallel, build, parse_program
from frankenllama.recipes import block_program, damped, every_layer_damped, from_block_file, resolve_program
from reference import program_logits, reference_logits
from tiny_model import write_tiny_llama

# the three examples of the Llama Blocks design, for a 60-layer file (two 40-layer halves)
ONE_BLOCK = "WeightBlock; 0; 40; 0; -1\nTotalLayers; 40\n"
TWO_BLOCKS = "WeightBlock; 0; 20; 0; -1\nWeightBlock; 20; 40; 40; 0\nTotalLayers; 40\n"
MERGE_BLOCKS = ("WeightBlock; 0; 20; 0; -1\nWeightBlock; 20; 40; 20; 0\nWeightBlock; 40; 60; 40; 0\n"
                "MergeBlock; 1; 0.5; 2; 0.5\nTotalLayers; 60\n")


def test_plain_specs_stay_orders() -> None:
    for spec in ("0-29,8-22", "31-0", "5", "0,0,0"):
        program = parse_program(spec)
        assert program.is_plain and list(program.order) == parse_spec(spec) and program.spec == format_spec(program.order)


def test_groups_compile_to_routes_and_merges() -> None:
    program = parse_program("0-19,(20-39|40-59),60-79")
    assert program.spec == "0-39,40-59<19,60-79<39*0.5+59*0.5"
    assert program.input_of(40) == ((19, 1.0),) and program.input_of(60) == ((39, 0.5), (59, 0.5))
    assert program.input_of(0) == ((EMBEDDINGS, 1.0),) and program.output is None
    weighted = parse_program("0-3,(4-5*0.3|6-7*0.7)")
    assert weighted.output == ((5, np.float32(0.3).item()), (7, np.float32(0.7).item()))
    nested = parse_program("0,(1,(2|3)|4)@0.5")
    assert nested.scales == (1.0, 0.5, 0.5, 0.5, 0.5)
    assert nested.output == ((2, 0.25), (3, 0.25), (4, 0.5))
    assert parse_program("(0-1|2-3)").input_of(2) == ((EMBEDDINGS, 1.0),)


def test_damping_syntax_and_recipes() -> None:
    program = parse_program("5@0.25,5@0.25,6-9@0.5")
    assert program.order == (5, 5, 6, 7, 8, 9) and program.scales == (0.25, 0.25, 0.5, 0.5, 0.5, 0.5)
    assert damped("2-3", 2, 0.5, n_layers=4).spec == "2-3@0.5,2-3@0.5"
    kalomaze = every_layer_damped(3, 4)
    assert kalomaze.order == (0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2) and set(kalomaze.scales) == {0.25}
    assert kalomaze.spec == "0@0.25,0@0.25,0@0.25,0-1@0.25,1@0.25,1@0.25,1-2@0.25,2@0.25,2@0.25,2@0.25"


def test_python_objects_build_the_same_programs() -> None:
    built = build(Layers(0, 19), Parallel(Layers(20, 39), Layers(40, 59)), Layers(60, 79))
    assert built == parse_program("0-19,(20-39|40-59),60-79")
    assert build("0-3", Parallel("4-5", [Layers(6), Layers(7, 7, 0.5)], weights=(0.25, 0.75))) == \
        parse_program("0-3,(4-5*0.25|6,7@0.5*0.75)")
    assert resolve_program(built, 80) is built
    assert resolve_program([0, 1, 1], 2) == LayerProgram.from_order([0, 1, 1])


@pytest.mark.parametrize("spec, fragment", [
    ("(0|)", "column 4"), ("(0-3)", "at least two branches"), ("0,5<7", "reads 7"), ("0-3<1", "reads 1"),
    ("0@3", "between 1e-06 and 2"), ("0@0.0000001", "between 1e-06 and 2"), ("(0*1|1)", "a weight, or none"),
    ("0;", "position number"), ("0;5", "reads 5"), ("(0*0|1*0)", "weight 0"), ("0,1<0+0", "twice"),
    ("0@nan", "unexpected character"), ("0@-1", "column 3"), ("((0*2|1*2)*2|2*2)", "between 1e-06 and 2"), ("0)", "column 2"),
    ("0\x00", "NUL"), ("1<e,2<1", "reads 1"), ("", "empty"),
])
def test_malformed_programs_name_the_problem(spec: str, fragment: str) -> None:
    with pytest.raises(LayerOrderError) as info:
        parse_program(spec)
    assert fragment in str(info.value)


def test_layer_range_checked() -> None:
    with pytest.raises(LayerOrderError, match="out of range"):
        parse_program("0,(1|9)", 4)


@st.composite
def programs(draw, depth: int = 0) -> str:
    items = []
    for _ in range(draw(st.integers(1, 3))):
        if depth < 2 and draw(st.booleans()):
            branches = [draw(programs(depth + 1)) for _ in range(draw(st.integers(2, 3)))]
            if draw(st.booleans()):
                branches = [f"{b}*{draw(st.sampled_from(['0.5', '0.25', '1', '0.3']))}" for b in branches]
            items.append("(" + "|".join(branches) + ")")
        else:
            a, b = draw(st.integers(0, 7)), draw(st.integers(0, 7))
            scale = draw(st.sampled_from(["", "@0.25", "@0", "@1", "@0.5", "@1.5"]))
            items.append(f"{a}-{b}{scale}" if a != b else f"{a}{scale}")
    return ",".join(items)


@settings(max_examples=300, deadline=None)
@given(programs())
def test_canonical_form_round_trips(spec: str) -> None:
    try:
        program = parse_program(spec)
    except LayerOrderError:
        return  # e.g. nested weights over the limit
    again = parse_program(program.spec)
    assert again == program and again.spec == program.spec


def test_block_file_examples_of_the_design() -> None:
    assert from_block_file(ONE_BLOCK) == list(range(40))
    assert from_block_file(TWO_BLOCKS) == list(range(20)) + list(range(40, 60))
    merged = block_program(MERGE_BLOCKS)
    assert merged == parse_program("0-19,(20-39|40-59)")
    assert merged.spec == "0-39,40-59<19;39*0.5+59*0.5"
    with pytest.raises(LayerOrderError, match="layer program, not an order"):
        from_block_file(MERGE_BLOCKS)


@pytest.mark.parametrize("text, fragment", [
    ("", "no WeightBlock"), ("TotalLayers 4\n", "no WeightBlock"), ("Block; 0; 1; 0; -1", "line 1: unknown line"),
    ("WeightBlock; 0; 1; 0", "line 1: expected 'WeightBlock"), ("WeightBlock; a; 1; 0; -1", "start 'a'"),
    ("WeightBlock; 0; 0; 0; -1", "end 0 must be after start 0"), ("WeightBlock; 1; 2; 0; -1", "starts at position 1"),
    ("WeightBlock; 0; 2; 0; -1\nWeightBlock; 3; 4; 0; 0", "line 2: block 1 starts at position 3"),
    ("WeightBlock; 0; 1; 0; 0", "is not an earlier block"), ("WeightBlock; 0; 1; 0; -2", "input_block '-2'"),
    ("WeightBlock; 0; 600; 0; -1", "at most 512"), ("TotalLayers 3\nWeightBlock; 0; 2; 0; -1", "TotalLayers is 3"),
    ("TotalLayers 2\nTotalLayers 2\nWeightBlock; 0; 2; 0; -1", "line 2: TotalLayers given twice"),
    ("TotalLayers 0\nWeightBlock; 0; 1; 0; -1", "TotalLayers must be"),
    ("WeightBlock; 0; 2; 0; -1\nWeightBlock; 2; 4; 2; -1", "line 1: block 0's output is never used"),
    ("WeightBlock; 0; 2; 0; -1\nMergeBlock; 0; 0.5; 0; 0.5", "two different blocks"),
    ("WeightBlock; 0; 2; 0; -1\nMergeBlock; 0; 0.5; 1; 0.5", "block_b 1 is not an earlier block"),
    ("WeightBlock; 0; 2; 0; -1\nWeightBlock; 2; 4; 2; 0\nMergeBlock; 0; x; 1; 0.5", "scale_a 'x'"),
    ("WeightBlock; 0; 2; 0; -1\nWeightBlock; 2; 4; 2; 0\nMergeBlock; 0; 3; 1; 0.5", "between 1e-06 and 2"),
    ("WeightBlock; 0; 2; 0; -1\nWeightBlock; 2; 4; 2; 0\nMergeBlock; 0; 0; 1; 0", "both scales 0"),
])
def test_block_file_errors_name_the_line(text: str, fragment: str) -> None:
    with pytest.raises(LayerOrderError) as info:
        block_program(text)
    assert fragment in str(info.value)


def test_block_file_merge_feeding_a_later_block() -> None:
    text = ("WeightBlock; 0; 2; 0; -1\nWeightBlock; 2; 4; 2; 0\nWeightBlock; 4; 6; 4; 0\n"
            "MergeBlock; 1; 0.5; 2; 0.5\nWeightBlock; 6; 8; 6; 3\n")
    assert block_program(text) == parse_program("0-1,(2-3|4-5),6-7")


# --------------------------------------------------------------------------- the NumPy reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "t.gguf", n_layer=4, seed=5)


TOKENS = [1, 7, 3, 9, 2]


def test_reference_identities(tiny) -> None:
    """The reference's own identities (the native library is checked against the reference)."""
    plain = reference_logits(tiny, TOKENS, [0, 1, 2, 2, 3])
    assert np.array_equal(program_logits(tiny, TOKENS, parse_program("0-2,2@1,3")), plain)
    assert np.array_equal(program_logits(tiny, TOKENS, parse_program("0-2,1@0,2-3")), reference_logits(tiny, TOKENS, [0, 1, 2, 2, 3]))
    assert np.array_equal(program_logits(tiny, TOKENS, parse_program("0-1,(2-3*1|1-2*0)")),
                          reference_logits(tiny, TOKENS, [0, 1, 2, 3]))
    damped_logits = program_logits(tiny, TOKENS, parse_program("0-2,2@0.5,3"))
    assert not np.allclose(damped_logits, plain)
