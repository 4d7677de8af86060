"""Turn every frankenmerge recipe syntax into a layer order (a list of weight indices).

Accepted recipe syntaxes (:func:`resolve` dispatches on the type of its argument):

* a list/tuple of ints -- the order itself: ``[0, 1, 2, 1, 2, 3]``;
* a spec string in the frankenllama grammar (:mod:`frankenllama.order`):
  ``"0-15,8-23,16-31"`` (``a-b`` inclusive);
* an exllamav3-style string of inclusive ``a..b`` ranges: ``"0..15,8..23"``
  (single indices allowed, ``a..b`` with ``a > b`` counts down, ``-`` ranges and
  ``..`` ranges cannot be mixed in one string);
* a list of exllamav2-style half-open ``(start, end)`` pairs: ``[(0, 20), (10, 30)]``
  runs ``range(0, 20)`` then ``range(10, 30)``;
* a path (``str`` or :class:`~pathlib.Path`) to a mergekit passthrough ``.yaml``/
  ``.yml`` file (:func:`from_mergekit_yaml`) or a Llama Blocks block file ``.txt``/
  ``.blocks`` (:func:`from_block_file`);
* an already-loaded mergekit config (a mapping).

Llama Blocks block files (``.txt``/``.blocks``) are described in :mod:`frankenllama.blocks`:
``WeightBlock; start; end; weight_start; input_block`` (``end`` excluded), ``MergeBlock; a;
scale_a; b; scale_b`` and ``TotalLayers; n``.  :func:`from_block_file` reads one that is a
plain chain as an order; :func:`block_program` reads any, branches and merges included.

Layer programs (damped positions, branches, merges; :mod:`frankenllama.program`) come from
:func:`resolve_program`, which takes every recipe above too, and from :func:`damped` and
:func:`every_layer_damped`.

Generators: :func:`rewind`, :func:`repeat_block`, :func:`rys`, :func:`drop`; they check the
length of the order they would build (at most ``MAX_POSITIONS``) before building it.

Every function raises :class:`~frankenllama.order.LayerOrderError` (a ValueError) for bad
input, naming the bad item or line.

Named classic recipes (data for tests and docs): :data:`CLASSIC_RECIPES`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any, Union

import yaml

from .blocks import parse_block_file
from .order import (
    MAX_POSITIONS,
    WHITESPACE,
    LayerOrderError,
    _reject_nul,
    parse_spec,
    validate_order,
)
from .program import Layers, LayerProgram, Parallel, build, is_program_spec, parse_program

__all__ = [
    "Recipe",
    "resolve",
    "from_half_open_ranges",
    "from_exl3_spec",
    "from_mergekit_yaml",
    "from_mergekit_config",
    "from_block_file",
    "block_program",
    "resolve_program",
    "damped",
    "every_layer_damped",
    "rewind",
    "repeat_block",
    "rys",
    "drop",
    "ClassicRecipe",
    "CLASSIC_RECIPES",
]

#: Anything :func:`resolve` understands.
Recipe = Union[Sequence[int], Sequence[Sequence[int]], str, Path, Mapping[str, Any]]

YAML_SUFFIXES = (".yaml", ".yml")
BLOCK_SUFFIXES = (".txt", ".blocks")
_EXL3_ITEM = re.compile(r"([0-9]+)(?:\.\.([0-9]+))?")


def _is_int(value: object) -> bool:
    """True for ints (numpy ints included) but not bools."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _require_int(value: object, what: str) -> int:
    """Return ``value`` as an int or raise LayerOrderError naming ``what``."""
    if not _is_int(value):
        raise LayerOrderError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _check_n_layers(n_layers: object) -> int:
    """Return a positive layer count or raise LayerOrderError."""
    if not _is_int(n_layers) or int(n_layers) < 1:
        raise LayerOrderError(f"n_layers must be a positive integer, got {n_layers!r}")
    return int(n_layers)


def _looks_like_path(value: str, suffixes: tuple[str, ...]) -> bool:
    """True for a one-line string ending with one of ``suffixes`` (case-insensitive)."""
    return "\n" not in value and value.strip().lower().endswith(suffixes)


def _read_text(value: str | Path, suffixes: tuple[str, ...], kind: str) -> str:
    """Return file contents for a path (Path, or str ending in ``suffixes``), else text."""
    if isinstance(value, (str, Path)):
        _reject_nul(str(value), f"{kind} text or path")
    if isinstance(value, str) and _looks_like_path(value, suffixes):
        value = Path(value.strip())
    if isinstance(value, Path):
        path = value.expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as err:
            reason = err.strerror or err
            raise LayerOrderError(f"cannot read {kind} file {str(path)!r}: {reason}") from err
    if isinstance(value, str):
        return value
    raise LayerOrderError(f"expected {kind} text or a path, got {type(value).__name__}")


# --------------------------------------------------------------------------- resolve


def resolve(recipe: Recipe, n_layers: int, *, models: Sequence[str] | None = None) -> list[int]:
    """Turn any supported recipe into an order validated against ``n_layers``.

    See the module docstring for the accepted forms.  ``models`` is passed to
    :func:`from_mergekit_yaml` for multi-model mergekit recipes on a stacked file.
    Raises LayerOrderError (a ValueError) naming the bad item or line.
    """
    n_layers = _check_n_layers(n_layers)
    if isinstance(recipe, (str, Path)):
        _reject_nul(str(recipe), "recipe")
    if isinstance(recipe, Path):
        order = _resolve_file(recipe, n_layers, models)
    elif isinstance(recipe, str):
        order = _resolve_string(recipe, n_layers, models)
    elif isinstance(recipe, Mapping):
        order = from_mergekit_config(recipe, n_layers=n_layers, models=models)
    elif isinstance(recipe, Sequence) and not isinstance(recipe, (bytes, bytearray)):
        order = _resolve_sequence(recipe)
    else:
        raise LayerOrderError(
            f"unsupported recipe type {type(recipe).__name__}: give a list of layer "
            f"indices, a spec string like '0-15,8-23', or a .yaml/.txt recipe path"
        )
    return validate_order(order, n_layers)


def _resolve_file(path: Path, n_layers: int, models: Sequence[str] | None) -> list[int]:
    """Dispatch a recipe file on its suffix."""
    suffix = path.suffix.lower()
    if suffix in YAML_SUFFIXES:
        return from_mergekit_yaml(path, n_layers=n_layers, models=models)
    if suffix in BLOCK_SUFFIXES:
        return from_block_file(path)
    raise LayerOrderError(
        f"recipe file {str(path)!r}: unknown suffix {path.suffix!r}; use .yaml/.yml for "
        f"mergekit configs or .txt/.blocks for Llama Blocks block files"
    )


def _resolve_string(recipe: str, n_layers: int, models: Sequence[str] | None) -> list[int]:
    """A string is a recipe path (by suffix), an exllamav3 ``a..b`` spec, or a spec."""
    if _looks_like_path(recipe, YAML_SUFFIXES + BLOCK_SUFFIXES):
        return _resolve_file(Path(recipe.strip()), n_layers, models)
    if ".." in recipe:
        return from_exl3_spec(recipe, n_layers)
    return parse_spec(recipe, n_layers)


def _resolve_sequence(recipe: Sequence[Any]) -> list[int]:
    """A sequence is either the order itself (ints) or half-open (start, end) pairs.

    The first element decides; a bad element is then named by
    :func:`from_half_open_ranges` or :func:`~frankenllama.order.validate_order`.
    """
    if len(recipe) == 0:
        raise LayerOrderError("empty recipe: a layer order needs at least one position")
    if _is_pair_like(recipe[0]):
        return from_half_open_ranges(recipe)
    return list(recipe)


def _is_pair_like(value: object) -> bool:
    """True for a non-string sequence (a candidate (start, end) pair)."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def from_half_open_ranges(ranges: Sequence[Sequence[int]]) -> list[int]:
    """exllamav2-style half-open ranges: ``[(0, 20), (10, 30)]`` -> 0..19, 10..29.

    Each pair needs integer ``0 <= start < end``.
    """
    if len(ranges) == 0:
        raise LayerOrderError("empty range list: give at least one (start, end) pair")
    order: list[int] = []
    for index, pair in enumerate(ranges):
        what = f"range {index} {pair!r}"
        if not _is_pair_like(pair) or len(pair) != 2:
            raise LayerOrderError(f"{what}: expected a (start, end) pair")
        start = _require_int(pair[0], f"{what}: start")
        end = _require_int(pair[1], f"{what}: end")
        if not 0 <= start < end:
            raise LayerOrderError(
                f"{what}: half-open ranges need 0 <= start < end (end is excluded, so "
                f"(0, 20) runs layers 0..19)"
            )
        if len(order) + end - start > MAX_POSITIONS:
            raise LayerOrderError(f"{what}: the order would exceed {MAX_POSITIONS} positions")
        order.extend(range(start, end))
    return order


def from_exl3_spec(spec: str, n_layers: int | None = None) -> list[int]:
    """exllamav3-style inclusive ``a..b`` ranges: ``"0..15,8..23"`` -> 0..15, 8..23.

    Items are single indices or ``a..b`` (inclusive, counts down when ``a > b``);
    whitespace is ignored.  Translated to the frankenllama grammar and parsed by
    :func:`~frankenllama.order.parse_spec` (with ``n_layers`` when given).
    """
    if not isinstance(spec, str):
        raise LayerOrderError(f"exllamav3 range spec must be a string, got {type(spec).__name__}")
    _reject_nul(spec, "exllamav3 range spec")
    items = "".join(ch for ch in spec if ch not in WHITESPACE).split(",")
    translated: list[str] = []
    for index, item in enumerate(items, start=1):
        match = _EXL3_ITEM.fullmatch(item)
        if match is None:
            hint = " (do not mix '-' and '..' ranges)" if "-" in item else ""
            raise LayerOrderError(
                f"exllamav3 range item {index} {item!r}: expected an index or an inclusive "
                f"range 'a..b'{hint}, e.g. '0..15,8..23'"
            )
        first, last = match.group(1), match.group(2)
        translated.append(first if last is None else f"{first}-{last}")
    return parse_spec(",".join(translated), n_layers)


# --------------------------------------------------------------------------- generators


def rewind(n_layers: int, compute: int = 16, rewind: int = 8) -> list[int]:
    """kalomaze's compute/rewind pattern: run ``compute`` layers, step back ``rewind``.

    Windows start at 0, ``compute - rewind``, ``2 * (compute - rewind)``, ...; each runs
    ``[start, start + compute)`` clipped to ``n_layers``; stops after the window that
    runs the last layer.  ``rewind(32, 16, 8)`` is ``0-15,8-23,16-31`` (48 positions).
    Needs ``compute > rewind >= 0``.
    """
    n_layers = _check_n_layers(n_layers)
    compute = _require_int(compute, "compute")
    back = _require_int(rewind, "rewind")
    if not compute > back >= 0:
        raise LayerOrderError(
            f"rewind needs compute > rewind >= 0, got compute={compute}, rewind={back}"
        )
    order: list[int] = []
    start = 0
    while True:
        end = min(start + compute, n_layers)
        if len(order) + end - start > MAX_POSITIONS:
            raise LayerOrderError(
                f"rewind(n_layers={n_layers}, compute={compute}, rewind={back}) exceeds "
                f"{MAX_POSITIONS} positions; use a larger compute - rewind step"
            )
        order.extend(range(start, end))
        if end == n_layers:
            return validate_order(order, n_layers)
        start += compute - back


def _check_block(i: int, j: int, n_layers: int) -> tuple[int, int, int]:
    """Validate a duplication block ``[i, j)`` of an ``n_layers`` model."""
    n_layers = _check_n_layers(n_layers)
    i = _require_int(i, "i")
    j = _require_int(j, "j")
    if not 0 <= i <= j <= n_layers:
        raise LayerOrderError(
            f"block [{i}, {j}) needs 0 <= i <= j <= n_layers ({n_layers}); the block runs "
            f"layers i..j-1"
        )
    return i, j, n_layers


def repeat_block(i: int, j: int, times: int, n_layers: int) -> list[int]:
    """Run layers ``0..j-1``, then the block ``i..j-1`` ``times`` more times, then ``j..n-1``.

    ``times=0`` (or ``i == j``) gives the unmodified order; ``times=1`` equals
    :func:`rys`.  Needs ``0 <= i <= j <= n_layers`` and ``times >= 0``.
    """
    i, j, n_layers = _check_block(i, j, n_layers)
    times = _require_int(times, "times")
    if times < 0:
        raise LayerOrderError(f"times must be >= 0, got {times}")
    if j + times * (j - i) + (n_layers - j) > MAX_POSITIONS:
        raise LayerOrderError(
            f"repeat_block({i}, {j}, times={times}) on {n_layers} layers exceeds "
            f"{MAX_POSITIONS} positions; repeat fewer times"
        )
    order = list(range(0, j)) + list(range(i, j)) * times + list(range(j, n_layers))
    return validate_order(order, n_layers)


def rys(i: int, j: int, n_layers: int) -> list[int]:
    """RYS ("repeat your self", dnhkng): ``list(range(0, j)) + list(range(i, n_layers))``.

    Layers ``i..j-1`` run twice.  ``i == j`` is the unmodified baseline of an (i, j)
    sweep.  Needs ``0 <= i <= j <= n_layers``.
    """
    i, j, n_layers = _check_block(i, j, n_layers)
    if j + n_layers - i > MAX_POSITIONS:
        raise LayerOrderError(
            f"rys({i}, {j}) on {n_layers} layers has {j + n_layers - i} positions, more than "
            f"{MAX_POSITIONS}"
        )
    return validate_order(list(range(0, j)) + list(range(i, n_layers)), n_layers)


def drop(indices: Sequence[int], n_layers: int) -> list[int]:
    """All layers ``0..n_layers-1`` in order except ``indices`` (pruning).

    Duplicated indices are fine; each must be in range; dropping every layer is an error.
    """
    n_layers = _check_n_layers(n_layers)
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
        raise LayerOrderError(f"drop() needs a list of layer indices, got {indices!r}")
    dropped: set[int] = set()
    for position, value in enumerate(indices):
        layer = _require_int(value, f"drop index {position}")
        if not 0 <= layer < n_layers:
            raise LayerOrderError(
                f"drop index {position}: layer {layer} is out of range for a model with "
                f"{n_layers} layers (valid 0..{n_layers - 1})"
            )
        dropped.add(layer)
    if len(dropped) == n_layers:
        raise LayerOrderError("drop() would remove every layer; keep at least one")
    if n_layers - len(dropped) > MAX_POSITIONS:
        raise LayerOrderError(
            f"drop() would keep {n_layers - len(dropped)} of {n_layers} layers, more than "
            f"{MAX_POSITIONS} positions"
        )
    order = [layer for layer in range(n_layers) if layer not in dropped]
    return validate_order(order, n_layers)


# --------------------------------------------------------------------------- mergekit

_SLICE_KEYS = frozenset({"sources"})
_SOURCE_KEYS = frozenset({"model", "layer_range"})


def from_mergekit_yaml(
    text_or_path: str | Path,
    n_layers: int | None = None,
    models: Sequence[str] | None = None,
) -> list[int]:
    """Order from a mergekit ``passthrough`` config (YAML text or a .yaml/.yml path).

    ``slices: - sources: - model: X, layer_range: [a, b]`` -- half-open ranges,
    exactly one source per slice.  With one distinct model the result is a self-merge
    order over that model's layers.  ``models`` (ordered names of the models stacked
    into one file) maps model ``k``'s layer ``i`` to ``k * (n_layers // len(models)) + i``
    and needs ``n_layers``.  Several distinct models without ``models`` is an error:
    stack them first with ``frankenllama stack``.
    """
    text = _read_text(text_or_path, YAML_SUFFIXES, "mergekit YAML")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise LayerOrderError(f"mergekit config is not valid YAML: {err}") from err
    return from_mergekit_config(config, n_layers=n_layers, models=models)


def from_mergekit_config(
    config: Any,
    n_layers: int | None = None,
    models: Sequence[str] | None = None,
) -> list[int]:
    """Order from an already-loaded mergekit config; see :func:`from_mergekit_yaml`."""
    if not isinstance(config, Mapping):
        raise LayerOrderError(
            "mergekit config must be a mapping with a 'slices' list "
            "(slices: - sources: - model: X, layer_range: [a, b])"
        )
    method = config.get("merge_method")
    if method is not None and str(method).strip().lower() != "passthrough":
        raise LayerOrderError(
            f"merge_method {method!r} is not supported: frankenllama only reorders layers, "
            f"so only 'passthrough' configs can be run"
        )
    slices = config.get("slices")
    if not isinstance(slices, list) or not slices:
        hint = " ('models:' lists whole models, not layer slices)" if "models" in config else ""
        raise LayerOrderError(f"mergekit config needs a non-empty 'slices' list{hint}")
    parsed = [_parse_slice(number, entry) for number, entry in enumerate(slices, start=1)]
    if n_layers is not None:
        n_layers = _check_n_layers(n_layers)
    names = list(dict.fromkeys(model for model, _, _, _ in parsed))
    if models is None:
        if len(names) > 1:
            raise LayerOrderError(
                f"mergekit config uses {len(names)} models ({', '.join(map(repr, names))}); "
                f"stack them into one file first (frankenllama stack) and pass "
                f"models=[...] in stacking order"
            )
        return _self_merge(parsed, n_layers)
    return _stacked_merge(parsed, n_layers, models)


def _parse_slice(number: int, entry: Any) -> tuple[str, int, int, str]:
    """Validate one slice; returns (model, start, end, description)."""
    where = f"mergekit slice {number}"
    if not isinstance(entry, Mapping) or "sources" not in entry:
        raise LayerOrderError(f"{where}: expected a mapping with 'sources'")
    extra = set(entry) - _SLICE_KEYS
    if extra:
        raise LayerOrderError(
            f"{where}: unsupported key(s) {sorted(map(str, extra))}; frankenllama only "
            f"reorders layers (no per-slice parameters)"
        )
    sources = entry["sources"]
    if not isinstance(sources, list) or len(sources) != 1:
        raise LayerOrderError(f"{where}: passthrough needs exactly one source per slice")
    source = sources[0]
    if not isinstance(source, Mapping):
        raise LayerOrderError(f"{where}: source must be a mapping with 'model' and 'layer_range'")
    extra = set(source) - _SOURCE_KEYS
    if extra:
        raise LayerOrderError(
            f"{where}: unsupported source key(s) {sorted(map(str, extra))}; frankenllama "
            f"only reorders layers (no scale/parameters)"
        )
    model = source.get("model")
    if not isinstance(model, str) or not model.strip():
        raise LayerOrderError(f"{where}: 'model' must be a model name string")
    layer_range = source.get("layer_range")
    where = f"{where} (model {model!r}, layer_range {layer_range!r})"
    if not isinstance(layer_range, list) or len(layer_range) != 2:
        raise LayerOrderError(f"{where}: layer_range must be a [start, end] pair")
    start = _require_int(layer_range[0], f"{where}: start")
    end = _require_int(layer_range[1], f"{where}: end")
    if not 0 <= start < end:
        raise LayerOrderError(
            f"{where}: layer_range is half-open and needs 0 <= start < end "
            f"([0, 16] runs layers 0..15)"
        )
    return model, start, end, where


def _self_merge(parsed: list[tuple[str, int, int, str]], n_layers: int | None) -> list[int]:
    """Concatenate the slices of a single-model config."""
    order: list[int] = []
    for _, start, end, where in parsed:
        if n_layers is not None and end > n_layers:
            raise LayerOrderError(f"{where}: end {end} exceeds the model's {n_layers} layers")
        if len(order) + end - start > MAX_POSITIONS:
            raise LayerOrderError(f"{where}: the order would exceed {MAX_POSITIONS} positions")
        order.extend(range(start, end))
    return order


def _stacked_merge(
    parsed: list[tuple[str, int, int, str]],
    n_layers: int | None,
    models: Sequence[str],
) -> list[int]:
    """Map each slice through the model's offset in a stacked file."""
    if isinstance(models, str) or not models or not all(isinstance(m, str) for m in models):
        raise LayerOrderError("models must be a non-empty list of model names in stacking order")
    if len(set(models)) != len(models):
        raise LayerOrderError(f"models lists a model twice: {list(models)!r}")
    if n_layers is None:
        raise LayerOrderError("models=[...] needs n_layers, the layer count of the stacked file")
    if n_layers % len(models):
        raise LayerOrderError(
            f"stacked file has {n_layers} layers, not a multiple of {len(models)} models"
        )
    per_model = n_layers // len(models)
    offsets = {name: k * per_model for k, name in enumerate(models)}
    order: list[int] = []
    for model, start, end, where in parsed:
        if model not in offsets:
            raise LayerOrderError(f"{where}: model is not in models={list(models)!r}")
        if end > per_model:
            raise LayerOrderError(f"{where}: end {end} exceeds the {per_model} layers per model")
        if len(order) + end - start > MAX_POSITIONS:
            raise LayerOrderError(f"{where}: the order would exceed {MAX_POSITIONS} positions")
        order.extend(range(offsets[model] + start, offsets[model] + end))
    return order


# --------------------------------------------------------------------------- block files


def block_program(text_or_path: str | Path) -> LayerProgram:
    """The layer program of a Llama Blocks block file (text, or a .txt/.blocks path); the format
    is in :mod:`frankenllama.blocks`."""
    return parse_block_file(_read_text(text_or_path, BLOCK_SUFFIXES, "block"))


def from_block_file(text_or_path: str | Path) -> list[int]:
    """Order from a block file that is one chain of WeightBlocks (see :mod:`frankenllama.blocks`).

    A block file with branches or a MergeBlock is a layer program, not an order: it raises
    LayerOrderError here; :func:`block_program` (and ``Llama(layer_order=path)``) read it.
    """
    program = block_program(text_or_path)
    if not program.is_plain:
        raise LayerOrderError("this block file branches or merges, so it is a layer program, not an order: "
                              "use block_program() or resolve_program(), or give it to Llama(layer_order=...)")
    return list(program.order)


# --------------------------------------------------------------------------- classics


@dataclass(frozen=True)
class ClassicRecipe:
    """A well-known frankenmerge, as data.

    ``recipe`` is a spec string (``kind="spec"``) or mergekit YAML text
    (``kind="mergekit"``, resolved over a stacked file of ``models``); ``n_layers`` is
    the base depth the order indexes; ``depth`` the resulting number of positions.
    """

    name: str
    kind: str
    recipe: str
    n_layers: int
    depth: int
    description: str
    models: tuple[str, ...] = ()

    def order(self) -> list[int]:
        """Resolve this recipe to its order."""
        if self.kind == "mergekit":
            return from_mergekit_yaml(self.recipe, n_layers=self.n_layers, models=list(self.models))
        return resolve(self.recipe, self.n_layers)


_GOLIATH_MODELS = ("Xwin-LM/Xwin-LM-70B-V0.1", "Sao10K/Euryale-1.3-L2-70B")
_GOLIATH_RANGES = (
    (0, 0, 16), (1, 8, 24), (0, 17, 32), (1, 25, 40), (0, 33, 48),
    (1, 41, 56), (0, 49, 64), (1, 57, 72), (0, 65, 80),
)
_GOLIATH_YAML = "merge_method: passthrough\nslices:\n" + "".join(
    f"  - sources:\n      - model: {_GOLIATH_MODELS[k]}\n        layer_range: [{a}, {b}]\n"
    for k, a, b in _GOLIATH_RANGES
)

CLASSIC_RECIPES: dict[str, ClassicRecipe] = {
    recipe.name: recipe
    for recipe in (
        ClassicRecipe(
            name="solar-10.7b",
            kind="spec",
            recipe="0-23,8-31",
            n_layers=32,
            depth=48,
            description="SOLAR 10.7B depth up-scaling: a 32-layer Mistral-7B, layers 0-23 "
            "then 8-31 (the paper then continued pretraining).",
        ),
        ClassicRecipe(
            name="venus-120b",
            kind="spec",
            recipe="0-19,10-29,20-39,30-49,40-59,50-69,60-79",
            n_layers=80,
            depth=140,
            description="Venus-120b self-merge of an 80-layer 70B: slices of 20 layers "
            "overlapping by 10.",
        ),
        ClassicRecipe(
            name="goliath-120b",
            kind="mergekit",
            recipe=_GOLIATH_YAML,
            n_layers=160,
            depth=137,
            description="Goliath-120b: Xwin-70B and Euryale-70B (80 layers each) interleaved "
            "in 16-layer slices, run over a stacked 160-layer file (Xwin 0-79, Euryale "
            "80-159); layer ranges as published on the model card.",
            models=_GOLIATH_MODELS,
        ),
        ClassicRecipe(
            name="rys-xlarge",
            kind="spec",
            recipe="0-51,45-79",
            n_layers=80,
            depth=87,
            description="RYS-XLarge (dnhkng): (i, j) = (45, 52) on an 80-layer Qwen2-72B "
            "fine-tune, i.e. rys(45, 52, 80): layers 45-51 run twice.",
        ),
    )
}


# --------------------------------------------------------------------------- layer programs

#: Anything :func:`resolve_program` understands: every recipe, program specs, block files with
#: merges, and programs built from :class:`~frankenllama.program.Layers`/``Parallel``.
ProgramRecipe = Union[Recipe, LayerProgram, Layers, Parallel]


def resolve_program(recipe: ProgramRecipe, n_layers: int, *, models: Sequence[str] | None = None) -> LayerProgram:
    """Turn any recipe or program into a :class:`~frankenllama.program.LayerProgram` for a model
    of ``n_layers`` weight layers; a plain recipe gives a plain program (its order).

    Raises LayerOrderError (a ValueError) naming the bad item, column or line.
    """
    n_layers = _check_n_layers(n_layers)
    if isinstance(recipe, LayerProgram):
        return recipe.check_layers(n_layers)
    if isinstance(recipe, (Layers, Parallel)):
        return build(recipe).check_layers(n_layers)
    path: Path | None = None
    if isinstance(recipe, Path):
        path = recipe
    elif isinstance(recipe, str):
        _reject_nul(recipe, "recipe")
        if _looks_like_path(recipe, BLOCK_SUFFIXES):
            path = Path(recipe.strip())
        elif is_program_spec(recipe) and ".." not in recipe:
            return parse_program(recipe, n_layers)
    if path is not None and path.suffix.lower() in BLOCK_SUFFIXES:
        return block_program(path).check_layers(n_layers)
    return LayerProgram.from_order(resolve(recipe, n_layers, models=models))


def damped(order_or_block: Recipe, passes: int, scale: float, *, n_layers: int) -> LayerProgram:
    """Run ``order_or_block`` (e.g. ``"8-15"``) ``passes`` times in a row, every position with
    residual scale ``scale``: each pass adds ``scale`` of its update, h <- h + s*(F(h) - h).

    Use it inside a larger program with :func:`~frankenllama.program.build`, or on its own.
    """
    passes = _require_int(passes, "passes")
    if passes < 1:
        raise LayerOrderError(f"passes must be at least 1, got {passes}")
    block = resolve(order_or_block, n_layers)
    return build(*[Layers(il, il, scale) for _ in range(passes) for il in block]).check_layers(n_layers)


def every_layer_damped(n_layers: int, passes: int) -> LayerProgram:
    """kalomaze's damped repeats: every weight layer ``passes`` times in place, each pass at scale
    ``1/passes`` (``0@0.25,0@0.25,0@0.25,0@0.25,1@0.25,...`` for 4 passes)."""
    n_layers = _check_n_layers(n_layers)
    passes = _require_int(passes, "passes")
    if not 1 <= passes or n_layers * passes > MAX_POSITIONS:
        raise LayerOrderError(f"{n_layers} layers x {passes} passes must be 1..{MAX_POSITIONS} positions")
    return build(*[Layers(il, il, 1.0 / passes) for il in range(n_layers) for _ in range(passes)])
