"""Tests for frankenllama.recipes: every recipe syntax -> a layer order."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frankenllama.order import MAX_POSITIONS, LayerOrderError, format_spec, parse_spec
from frankenllama.recipes import (
    CLASSIC_RECIPES,
    drop,
    from_block_file,
    from_exl3_spec,
    from_half_open_ranges,
    from_mergekit_config,
    from_mergekit_yaml,
    repeat_block,
    resolve,
    rewind,
    rys,
)

SOLAR = list(range(24)) + list(range(8, 32))

SOLAR_YAML = """\
slices:
  - sources:
      - model: mistralai/Mistral-7B-v0.1
        layer_range: [0, 24]
  - sources:
      - model: mistralai/Mistral-7B-v0.1
        layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
"""

TWO_MODEL_YAML = """\
merge_method: passthrough
slices:
  - sources:
      - model: a
        layer_range: [0, 3]
  - sources:
      - model: b
        layer_range: [1, 4]
  - sources:
      - model: a
        layer_range: [3, 4]
"""

SOLAR_BLOCKS = """\
# SOLAR-style depth up-scaling of a 32-layer model
TotalLayers 48

WeightBlock; 0; 24; 0; -1   # positions 0..23 run weights 0..23 (end excluded)
WeightBlock; 24; 48; 8; 0   # positions 24..47 run weights 8..31
"""


# ------------------------------------------------------------------ resolve


def test_resolve_int_list_and_tuple() -> None:
    assert resolve([0, 1, 1, 2], 3) == [0, 1, 1, 2]
    assert resolve((2, 1, 0), 3) == [2, 1, 0]


def test_resolve_numpy_ints() -> None:
    import numpy as np
    result = resolve(list(np.arange(4, dtype=np.int64)), 4)
    assert result == [0, 1, 2, 3] and all(type(x) is int for x in result)


def test_resolve_spec_string() -> None:
    assert resolve("0-23, 8-31", 32) == SOLAR
    assert resolve("0-15,8-23,16-31", 32) == rewind(32, 16, 8)


def test_resolve_exl3_string() -> None:
    assert resolve("0..23,8..31", 32) == SOLAR
    assert resolve(" 3 .. 1 , 5", 8) == [3, 2, 1, 5]


def test_resolve_half_open_pairs() -> None:
    assert resolve([(0, 24), (8, 32)], 32) == SOLAR
    assert resolve([[0, 2], [1, 3]], 3) == [0, 1, 1, 2]


def test_resolve_yaml_file(tmp_path: Path) -> None:
    for name in ("solar.yaml", "solar.yml", "SOLAR.YAML"):
        path = tmp_path / name
        path.write_text(SOLAR_YAML)
        assert resolve(path, 32) == SOLAR
        assert resolve(str(path), 32) == SOLAR


def test_resolve_block_file(tmp_path: Path) -> None:
    for name in ("solar.txt", "solar.blocks"):
        path = tmp_path / name
        path.write_text(SOLAR_BLOCKS)
        assert resolve(path, 32) == SOLAR
        assert resolve(str(path), 32) == SOLAR


def test_resolve_yaml_with_models(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(TWO_MODEL_YAML)
    assert resolve(path, 8, models=["a", "b"]) == [0, 1, 2, 5, 6, 7, 3]


def test_resolve_mapping() -> None:
    config = {"slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}]}]}
    assert resolve(config, 4) == [0, 1]


@pytest.mark.parametrize(
    ("recipe", "n_layers", "fragment"),
    [
        ([], 4, "empty recipe"),
        ([0, 4], 4, "position 1: layer 4 is out of range"),
        ([0, (1, 2)], 4, "position 1"),
        ([True], 4, "position 0: layer index must be an int"),
        ([(0, 2), 5], 4, "range 1 5: expected a (start, end) pair"),
        ([(0, 2, 3)], 4, "range 0"),
        ([(2, 2)], 4, "0 <= start < end"),
        ([(3, 1)], 4, "0 <= start < end"),
        ([(-1, 1)], 4, "0 <= start < end"),
        ([(0, 5)], 4, "position 4: layer 4 is out of range"),
        ([(0, 1.5)], 4, "end must be an integer"),
        ([("0", 1)], 4, "start must be an integer"),
        ([(0, 300), (0, 300)], 300, "exceed 512 positions"),
        ("0-4", 4, "item 1 '0-4'"),
        ("", 4, "empty layer order spec"),
        ("0..3,4-5", 8, "do not mix '-' and '..'"),
        ("0...3", 8, "exllamav3 range item 1 '0...3'"),
        ("0..", 8, "exllamav3 range item 1"),
        ("..3", 8, "exllamav3 range item 1"),
        ("0..3,", 8, "exllamav3 range item 2 ''"),
        ("0..9", 8, "out of range for a model with 8 layers"),
        (3.5, 4, "unsupported recipe type float"),
        (None, 4, "unsupported recipe type NoneType"),
        (b"0-3", 4, "unsupported recipe type bytes"),
        (Path("recipe.json"), 4, "unknown suffix '.json'"),
        ("missing-recipe.yaml", 4, "cannot read mergekit YAML file"),
        (Path("missing-recipe.txt"), 4, "cannot read block file"),
        ([0], 0, "n_layers must be a positive integer"),
        ([0], True, "n_layers must be a positive integer"),
    ],
)
def test_resolve_rejects(recipe: object, n_layers: object, fragment: str) -> None:
    with pytest.raises(LayerOrderError) as info:
        resolve(recipe, n_layers)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_resolve_checks_range_of_file_recipes(tmp_path: Path) -> None:
    path = tmp_path / "solar.txt"
    path.write_text(SOLAR_BLOCKS)
    with pytest.raises(ValueError, match=r"position 40: layer 24 is out of range .*24 layers"):
        resolve(path, 24)


def test_half_open_ranges_direct() -> None:
    assert from_half_open_ranges([(0, 3)]) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least one"):
        from_half_open_ranges([])


def test_exl3_direct() -> None:
    assert from_exl3_spec("0..2,2..0") == [0, 1, 2, 2, 1, 0]
    with pytest.raises(ValueError, match="exllamav3 range item 1 ''"):
        from_exl3_spec("")


# ------------------------------------------------------------------ generators


def test_rewind_examples() -> None:
    assert rewind(32) == parse_spec("0-15,8-23,16-31")
    assert rewind(80, 16, 8) == parse_spec("0-15,8-23,16-31,24-39,32-47,40-55,48-63,56-71,64-79")
    assert rewind(10, 4, 1) == parse_spec("0-3,3-6,6-9")
    assert rewind(10, 4, 2) == parse_spec("0-3,2-5,4-7,6-9")
    assert rewind(11, 4, 2) == parse_spec("0-3,2-5,4-7,6-9,8-10")
    assert rewind(8, 16, 8) == list(range(8))
    assert rewind(8, 3, 0) == list(range(8))
    assert rewind(1, 1, 0) == [0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((32, 8, 8), "compute > rewind >= 0"),
        ((32, 4, 8), "compute > rewind >= 0"),
        ((32, 8, -1), "compute > rewind >= 0"),
        ((32, 0, 0), "compute > rewind >= 0"),
        ((0, 16, 8), "n_layers"),
        ((32, 16.0, 8), "compute must be an integer"),
        ((32, 16, True), "rewind must be an integer"),
        ((400, 4, 3), "exceeds 512 positions"),
    ],
)
def test_rewind_rejects(args: tuple[object, ...], fragment: str) -> None:
    with pytest.raises(LayerOrderError) as info:
        rewind(*args)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_repeat_block() -> None:
    assert repeat_block(2, 4, 1, 6) == [0, 1, 2, 3, 2, 3, 4, 5]
    assert repeat_block(2, 4, 2, 6) == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]
    assert repeat_block(2, 4, 0, 6) == list(range(6))
    assert repeat_block(3, 3, 5, 6) == list(range(6))
    assert repeat_block(0, 6, 1, 6) == list(range(6)) * 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((4, 2, 1, 6), "0 <= i <= j <= n_layers"),
        ((0, 7, 1, 6), "0 <= i <= j <= n_layers"),
        ((-1, 2, 1, 6), "0 <= i <= j <= n_layers"),
        ((0, 2, -1, 6), "times must be >= 0"),
        ((0, 2, True, 6), "times must be an integer"),
        ((0, 2, 1, 0), "n_layers"),
        ((0, 80, 6, 80), "exceeds 512 positions"),
    ],
)
def test_repeat_block_rejects(args: tuple[object, ...], fragment: str) -> None:
    with pytest.raises(LayerOrderError) as info:
        repeat_block(*args)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_rys() -> None:
    assert rys(2, 4, 6) == [0, 1, 2, 3, 2, 3, 4, 5]
    assert rys(3, 3, 6) == list(range(6))
    order = rys(45, 52, 80)
    assert len(order) == 87 and order[52:59] == list(range(45, 52))
    with pytest.raises(ValueError, match="0 <= i <= j <= n_layers"):
        rys(5, 4, 6)
    with pytest.raises(ValueError, match="i must be an integer"):
        rys("1", 4, 6)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_rys_is_repeat_block_once(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 80))
    j = data.draw(st.integers(0, n))
    i = data.draw(st.integers(0, j))
    assert rys(i, j, n) == repeat_block(i, j, 1, n)
    assert len(rys(i, j, n)) == n + j - i


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 80), st.integers(1, 40), st.data())
def test_rewind_properties(n: int, compute: int, data: st.DataObject) -> None:
    back = data.draw(st.integers(0, compute - 1))
    try:
        order = rewind(n, compute, back)
    except ValueError as err:
        assert "exceeds 512" in str(err)
        return
    assert order[0] == 0 and order[-1] == n - 1
    assert set(order) == set(range(n))
    assert parse_spec(format_spec(order), n) == order


def test_drop() -> None:
    assert drop([1, 3], 5) == [0, 2, 4]
    assert drop([3, 1, 3], 5) == [0, 2, 4]
    assert drop([], 3) == [0, 1, 2]
    assert drop((0,), 2) == [1]


@pytest.mark.parametrize(
    ("indices", "n_layers", "fragment"),
    [
        ([0, 1], 2, "remove every layer"),
        ([2], 2, "drop index 0: layer 2 is out of range"),
        ([0, -1], 2, "drop index 1: layer -1"),
        ([True], 2, "drop index 0 must be an integer"),
        ("01", 2, "needs a list of layer indices"),
        (1, 2, "needs a list of layer indices"),
        ([0], 0, "n_layers"),
    ],
)
def test_drop_rejects(indices: object, n_layers: object, fragment: str) -> None:
    with pytest.raises(LayerOrderError) as info:
        drop(indices, n_layers)  # type: ignore[arg-type]
    assert fragment in str(info.value)


# Each call would build a list of about a billion layers if it checked the length afterwards.
HUGE_CALLS = [
    "rys(8, 16, 10**9)",
    "drop([3], 10**9)",
    "rewind(10**9, 10**9, 0)",
    "rewind(10**9, 400, 0)",
    "repeat_block(0, 1, 10**9, 4)",
    "from_half_open_ranges([(0, 10**9)])",
    "from_mergekit_yaml('slices: [{sources: [{model: m, layer_range: [0, 1000000000]}]}]')",
    "from_block_file('WeightBlock; 0; 999999999; 0; -1')",
    "resolve('0-999999999', 10**9)",
]


def test_generators_refuse_huge_orders_before_building_them() -> None:
    """Under a 1 GiB address-space limit (a subprocess, so that a regression cannot exhaust this
    machine's memory) every call answers with LayerOrderError about the number of positions."""
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from frankenllama.order import LayerOrderError
        from frankenllama.recipes import *
        for call in {HUGE_CALLS!r}:
            try:
                eval(call)
            except LayerOrderError as err:
                print("REFUSED", err)
            except BaseException as err:
                print("FAILED", call, type(err).__name__, err)
            else:
                print("ACCEPTED", call)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(HUGE_CALLS), proc.stdout
    for line in lines:
        assert line.startswith("REFUSED") and str(MAX_POSITIONS) in line, line


def test_huge_n_layers_is_fine_for_short_orders() -> None:
    """A big n_layers alone costs nothing: only orders are built, never a list of all layers."""
    assert resolve("0-3", 10**9) == [0, 1, 2, 3]
    assert rys(0, 2, 510) == list(range(2)) + list(range(510))
    assert drop(list(range(4, 10**4)), 10**4) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "call",
    [
        lambda: resolve("0-5\x00junk", 8),
        lambda: resolve("0..5\x00junk", 8),
        lambda: resolve("merge\x00.yaml", 8),
        lambda: resolve(Path("merge\x00.yaml"), 8),
        lambda: from_exl3_spec("0..3\x00"),
        lambda: from_block_file("WeightBlock; 0; 1; 0; -1\x00junk"),
        lambda: from_mergekit_yaml("slices: []\x00"),
    ],
    ids=["spec", "exl3", "yaml-path", "path-object", "exl3-direct", "block-text", "yaml-text"],
)
def test_nul_is_refused_by_name(call) -> None:
    """llama.cpp reads C strings: what follows a NUL would silently vanish."""
    with pytest.raises(LayerOrderError, match=r"NUL character \('\\x00'\) at column \d+"):
        call()


# ------------------------------------------------------------------ mergekit


def test_mergekit_self_merge() -> None:
    assert from_mergekit_yaml(SOLAR_YAML) == SOLAR
    assert from_mergekit_yaml(SOLAR_YAML, n_layers=32) == SOLAR


def test_mergekit_without_merge_method() -> None:
    text = "slices:\n  - sources:\n      - {model: m, layer_range: [2, 4]}\n"
    assert from_mergekit_yaml(text) == [2, 3]


def test_mergekit_merge_method_case_insensitive() -> None:
    text = "merge_method: Passthrough\n" + SOLAR_YAML.replace("merge_method: passthrough\n", "")
    assert from_mergekit_yaml(text) == SOLAR


def test_mergekit_path_objects(tmp_path: Path) -> None:
    path = tmp_path / "solar.yml"
    path.write_text(SOLAR_YAML)
    assert from_mergekit_yaml(path) == SOLAR
    assert from_mergekit_yaml(str(path)) == SOLAR


def test_mergekit_stacked_models() -> None:
    assert from_mergekit_yaml(TWO_MODEL_YAML, n_layers=8, models=["a", "b"]) == [0, 1, 2, 5, 6, 7, 3]
    assert from_mergekit_yaml(TWO_MODEL_YAML, n_layers=8, models=["b", "a"]) == [4, 5, 6, 1, 2, 3, 7]
    # a single-model config can also be mapped onto a stacked file
    assert from_mergekit_yaml(SOLAR_YAML, n_layers=64, models=["x", "mistralai/Mistral-7B-v0.1"]) == [
        32 + i for i in SOLAR
    ]


def test_mergekit_multi_model_needs_stack() -> None:
    with pytest.raises(ValueError, match=r"frankenllama stack.*models=\[\.\.\.\]"):
        from_mergekit_yaml(TWO_MODEL_YAML)
    with pytest.raises(ValueError, match="frankenllama stack"):
        from_mergekit_yaml(TWO_MODEL_YAML, n_layers=8)


def _slice(model: str = "m", layer_range: object = (0, 2), **extra: object) -> dict[str, object]:
    source: dict[str, object] = {"model": model, "layer_range": list(layer_range)}  # type: ignore[call-overload]
    source.update(extra)
    return {"sources": [source]}


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (None, "must be a mapping"),
        ([1, 2], "must be a mapping"),
        ({"merge_method": "slerp", "slices": [_slice()]}, "merge_method 'slerp' is not supported"),
        ({"merge_method": "passthrough"}, "non-empty 'slices' list"),
        ({"slices": []}, "non-empty 'slices' list"),
        ({"models": [{"model": "m"}]}, "'models:' lists whole models"),
        ({"slices": ["x"]}, "mergekit slice 1: expected a mapping with 'sources'"),
        ({"slices": [_slice(), {"sources": []}]}, "mergekit slice 2: passthrough needs exactly one source"),
        (
            {"slices": [{"sources": [_slice()["sources"][0]] * 2}]},  # type: ignore[index]
            "exactly one source",
        ),
        ({"slices": [{"sources": ["m"]}]}, "source must be a mapping"),
        ({"slices": [{**_slice(), "parameters": {"scale": 0}}]}, "unsupported key(s) ['parameters']"),
        ({"slices": [_slice(parameters={"scale": 0})]}, "unsupported source key(s) ['parameters']"),
        ({"slices": [{"sources": [{"layer_range": [0, 2]}]}]}, "'model' must be a model name"),
        ({"slices": [_slice(model="")]}, "'model' must be a model name"),
        ({"slices": [{"sources": [{"model": "m"}]}]}, "layer_range must be a [start, end] pair"),
        ({"slices": [_slice(layer_range=(0, 1, 2))]}, "layer_range must be a [start, end] pair"),
        ({"slices": [_slice(layer_range=(2, 2))]}, "half-open and needs 0 <= start < end"),
        ({"slices": [_slice(layer_range=(-1, 2))]}, "half-open"),
        ({"slices": [_slice(layer_range=(0, "2"))]}, "end must be an integer"),
        ({"slices": [_slice(layer_range=(False, 2))]}, "start must be an integer"),
        ({"slices": [_slice(layer_range=(0, 300))] * 2}, "mergekit slice 2"),
    ],
)
def test_mergekit_config_rejects(config: object, fragment: str) -> None:
    with pytest.raises(LayerOrderError) as info:
        from_mergekit_config(config)
    assert fragment in str(info.value)


def test_mergekit_end_beyond_model() -> None:
    with pytest.raises(ValueError, match=r"mergekit slice 2 .*end 32 exceeds the model's 24 layers"):
        from_mergekit_yaml(SOLAR_YAML, n_layers=24)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"n_layers": 8, "models": ["a"]}, "model is not in models=['a']"),
        ({"n_layers": 8, "models": ["a", "b", "c", "d"]}, "exceeds the 2 layers per model"),
        ({"n_layers": 9, "models": ["a", "b"]}, "not a multiple of 2 models"),
        ({"models": ["a", "b"]}, "needs n_layers"),
        ({"n_layers": 8, "models": ["a", "a"]}, "lists a model twice"),
        ({"n_layers": 8, "models": "ab"}, "non-empty list of model names"),
        ({"n_layers": 8, "models": []}, "non-empty list of model names"),
        ({"n_layers": 0, "models": ["a", "b"]}, "n_layers must be a positive integer"),
    ],
)
def test_mergekit_models_rejects(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(LayerOrderError) as info:
        from_mergekit_yaml(TWO_MODEL_YAML, **kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_mergekit_invalid_yaml() -> None:
    with pytest.raises(ValueError, match="not valid YAML"):
        from_mergekit_yaml("slices: [\n  - {")


def test_mergekit_scalar_yaml() -> None:
    with pytest.raises(ValueError, match="must be a mapping"):
        from_mergekit_yaml("just a string")


def test_mergekit_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read mergekit YAML file"):
        from_mergekit_yaml(tmp_path / "nope.yaml")


def test_mergekit_bad_argument_type() -> None:
    with pytest.raises(ValueError, match="expected mergekit YAML text or a path"):
        from_mergekit_yaml(42)  # type: ignore[arg-type]


# ------------------------------------------------------------------ block files
# (their semantics, merges included, are tested in test_programs.py)


def test_block_file_text_and_path(tmp_path: Path) -> None:
    assert from_block_file(SOLAR_BLOCKS) == SOLAR
    path = tmp_path / "x.blocks"
    path.write_text(SOLAR_BLOCKS)
    assert from_block_file(path) == SOLAR
    assert from_block_file(str(path)) == SOLAR


def test_block_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read block file"):
        from_block_file(tmp_path / "missing.txt")


# ------------------------------------------------------------------ classics


@pytest.mark.parametrize("name", sorted(CLASSIC_RECIPES))
def test_classic_depth(name: str) -> None:
    recipe = CLASSIC_RECIPES[name]
    order = recipe.order()
    assert len(order) == recipe.depth
    assert max(order) < recipe.n_layers
    assert parse_spec(format_spec(order), recipe.n_layers) == order
    assert recipe.description and recipe.name == name


def test_classic_contents() -> None:
    assert CLASSIC_RECIPES["solar-10.7b"].order() == SOLAR
    assert CLASSIC_RECIPES["rys-xlarge"].order() == rys(45, 52, 80)
    venus = CLASSIC_RECIPES["venus-120b"]
    assert venus.order() == from_half_open_ranges([(s, s + 20) for s in range(0, 61, 10)])
    assert venus.order() == rewind(80, 20, 10)
    goliath = CLASSIC_RECIPES["goliath-120b"]
    order = goliath.order()
    assert (goliath.n_layers, len(goliath.models)) == (160, 2)
    assert order[:16] == list(range(16))
    assert order[16:32] == list(range(80 + 8, 80 + 24))  # Euryale's layers 8..23
    assert order[-15:] == list(range(65, 80))
    assert sum(1 for i in order if i < 80) == 16 + 4 * 15  # Xwin positions
    with pytest.raises(ValueError, match="frankenllama stack"):
        from_mergekit_yaml(goliath.recipe)


def test_classics_fit_in_positions() -> None:
    assert all(r.depth <= MAX_POSITIONS for r in CLASSIC_RECIPES.values())


# ------------------------------------------------------------------ properties


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 79), min_size=1, max_size=MAX_POSITIONS))
def test_resolve_spec_roundtrip(order: list[int]) -> None:
    spec = format_spec(order)
    assert resolve(spec, 80) == order
    assert resolve(spec.replace("-", ".."), 80) == order
    assert resolve(order, 80) == order
