"""Layer programs: orders whose positions are damped, branch off earlier outputs and merge.

A *layer program* says, for every execution position ``p``:

* the weight layer it runs (as an order does),
* its residual scale ``s``: the position's output is ``h + s·(F(h) − h)`` for its input ``h``
  and block ``F`` (``s = 1``: plain; ``s = 0``: the position changes nothing),
* its input: by default the previous position's output (the token embeddings for ``p = 0``),
  else a weighted sum of earlier positions' outputs and/or the embeddings (a branch, a merge),

plus the model's output stream (by default the last position's output).  A plain order is the
program with default inputs, ``s = 1`` everywhere and the default output.

Spec grammar (what :func:`parse_program` accepts; a plain order spec is one)::

    program := seq [ ';' combo ]
    seq     := item ( ',' item )*
    item    := range [ '@' decimal ] [ '<' combo ]   # a-b inclusive, as in orders
             | group [ '@' decimal ]
    group   := '(' branch ( '|' branch )+ ')'
    branch  := seq [ '*' decimal ]
    combo   := term ( '+' term )*
    term    := ( number | 'e' ) [ '*' decimal ]     # a position's output, or the embeddings
    decimal := digit+ [ '.' digit+ ]

* ``a-b@s``: every position of the item has residual scale ``s`` (``5@0.25`` for one layer).
  On a group, ``@s`` scales every position inside that has no scale of its own.
* ``(A|B|...)``: every branch starts from the stream at the group's start; the group's output
  is the weighted sum of the branches' outputs, ``1/k`` each unless every branch gives its
  weight (``(20-39*0.3|40-59*0.7)``).  Groups nest; a branch is any sequence.
* ``<combo`` routes the input of the item's first position: ``40-59<19`` starts a run from
  position 19's output, ``60<39*0.5+59*0.5`` merges two outputs, ``e`` is the embeddings.
  ``;combo`` at the end sets the output stream the same way.  Positions are numbered 0, 1, ...
  in the order they appear (branches in turn), and a term names an earlier position.
* Scales and weights are decimals in [0, :data:`MAX_FACTOR`]; a nonzero one must be at least
  :data:`MIN_FACTOR`.  Whitespace is ignored as in orders.

Canonical form (:func:`format_program`): groups are written as routes, ranges and scales as
short as they go (``"0-19,20-39,40-59<19,60-79<39*0.5+59*0.5"`` for
``"0-19,(20-39|40-59),60-79"``); a plain order's canonical form is :func:`~frankenllama.order.format_spec`'s.
Scales and weights are float32, written with the fewest digits that read back the same.
The canonical form is what travels to llama.cpp (in ``<arch>.layer_order``, continued in
``.1``, ``.2``, ... as orders are) and what the patched library parses.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from .order import (MAX_OVERRIDE_BYTES, MAX_POSITIONS, WHITESPACE, LayerOrderError, format_spec, override_key_name,
                    override_keys, parse_spec, validate_order)

__all__ = ["program_override_keys", "EMBEDDINGS", "MAX_FACTOR", "MIN_FACTOR", "LayerProgram", "Layers", "Parallel", "parse_program",
           "format_program", "is_program_spec"]

#: A term's source that is the token embeddings (the stream before position 0).
EMBEDDINGS = -1
#: Largest residual scale or branch weight.
MAX_FACTOR = 2.0
#: Smallest nonzero residual scale or branch weight.
MIN_FACTOR = 1e-6

Combo = tuple[tuple[int, float], ...]  #: a weighted sum: ((source, weight), ...), source EMBEDDINGS or a position
_PROGRAM_CHARS = frozenset("@<;()|*+.e")
_ORDER_CHARS = frozenset("0123456789,-") | WHITESPACE


def _f32(value: float) -> float:
    return float(np.float32(value))


def _format_factor(value: float) -> str:
    return np.format_float_positional(np.float32(value), unique=True, trim="-")


def _check_factor(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LayerOrderError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= MAX_FACTOR or 0.0 < value < MIN_FACTOR:
        raise LayerOrderError(f"{what} is {value}: scales and weights are 0, or between {MIN_FACTOR} and {MAX_FACTOR}")
    return _f32(value)


@dataclass(frozen=True)
class LayerProgram:
    """A layer program in its executable form (see the module docstring).

    ``inputs[p]`` is None for the default input (the previous position, the embeddings at 0);
    ``output`` is None for the default output (the last position).
    """

    order: tuple[int, ...]
    scales: tuple[float, ...]
    inputs: tuple[Combo | None, ...]
    output: Combo | None = None
    spec: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        n = len(self.order)
        if not 1 <= n <= MAX_POSITIONS:
            raise LayerOrderError(f"a layer program has 1..{MAX_POSITIONS} positions, got {n}")
        if len(self.scales) != n or len(self.inputs) != n:
            raise LayerOrderError("order, scales and inputs of a layer program must have one entry per position")
        for p, combo in enumerate(self.inputs):
            if combo is not None:
                _check_combo(combo, p, f"position {p}'s input")
        if self.output is not None:
            _check_combo(self.output, n, "the output")
        if not self.spec:
            object.__setattr__(self, "spec", format_program(self))

    @classmethod
    def from_order(cls, order: Sequence[int]) -> "LayerProgram":
        order = validate_order(order, 10**9)
        return cls(tuple(order), (1.0,) * len(order), (None,) * len(order))

    @property
    def is_plain(self) -> bool:
        """Whether this is a plain order (no scales, routes or merges)."""
        return self.output is None and all(s == 1.0 for s in self.scales) and all(c is None for c in self.inputs)

    def input_of(self, p: int) -> Combo:
        """The input of position ``p`` as a weighted sum (the default made explicit)."""
        return self.inputs[p] if self.inputs[p] is not None else ((p - 1 if p else EMBEDDINGS, 1.0),)

    def output_combo(self) -> Combo:
        """The output stream as a weighted sum (the default made explicit)."""
        return self.output if self.output is not None else ((len(self.order) - 1, 1.0),)

    def check_layers(self, n_layers: int) -> "LayerProgram":
        """Raise LayerOrderError unless every weight layer is below ``n_layers``; return self."""
        validate_order(list(self.order), n_layers)
        return self

    def __str__(self) -> str:
        return self.spec


def _check_combo(combo: Combo, before: int, what: str) -> None:
    if not combo:
        raise LayerOrderError(f"{what} is an empty sum")
    seen = set()
    for source, weight in combo:
        if isinstance(source, bool) or not isinstance(source, int) or not EMBEDDINGS <= source < before:
            raise LayerOrderError(f"{what} reads {source!r}: a term names an earlier position (0..{before - 1}) "
                                  "or the embeddings; later positions and cycles are not allowed")
        if source in seen:
            raise LayerOrderError(f"{what} names {'e' if source == EMBEDDINGS else source} twice: add the weights")
        seen.add(source)
        _check_factor(weight, f"{what}: the weight of {'e' if source == EMBEDDINGS else source}")


# --------------------------------------------------------------------------- building programs


@dataclass(frozen=True)
class Layers:
    """Weight layers ``first..last`` (inclusive, counting down if ``last < first``), each position with
    residual scale ``scale``: an item of :class:`Parallel` branches or of :meth:`build`."""

    first: int
    last: int | None = None
    scale: float = 1.0

    def indices(self) -> list[int]:
        last = self.first if self.last is None else self.last
        step = 1 if last >= self.first else -1
        return list(range(self.first, last + step, step))


@dataclass(frozen=True)
class Parallel:
    """Branches that all start from the same stream; their outputs are summed with ``weights``
    (``1/k`` each by default).  A branch is a spec string, a :class:`Layers`, a :class:`Parallel`
    or a list of those."""

    branches: tuple
    weights: tuple[float, ...] | None = None

    def __init__(self, *branches: object, weights: Sequence[float] | None = None) -> None:
        object.__setattr__(self, "branches", tuple(branches))
        object.__setattr__(self, "weights", None if weights is None else tuple(weights))


Item = Union[str, Layers, Parallel, Sequence]


class _Builder:
    """Accumulates positions while a program's items are laid out."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.scales: list[float] = []
        self.inputs: list[Combo | None] = []

    def run(self, layers: list[int], scale: float, stream: Combo) -> Combo:
        for il in layers:
            p = len(self.order)
            if p >= MAX_POSITIONS:
                raise LayerOrderError(f"the layer program would exceed {MAX_POSITIONS} positions")
            default = ((p - 1 if p else EMBEDDINGS, 1.0),)
            self.order.append(il)
            self.scales.append(scale)
            self.inputs.append(None if stream == default else stream)
            stream = ((p, 1.0),)
        return stream

    def parallel(self, branches: list, weights: Sequence[float] | None, stream: Combo, lay_out) -> Combo:
        if len(branches) < 2:
            raise LayerOrderError("a parallel group needs at least two branches")
        if weights is None:
            weights = [_f32(1.0 / len(branches))] * len(branches)
        elif len(weights) != len(branches):
            raise LayerOrderError(f"{len(weights)} weights for {len(branches)} branches")
        total: dict[int, float] = {}
        for number, (branch, weight) in enumerate(zip(branches, weights), start=1):
            weight = _check_factor(weight, f"the weight of branch {number}")
            out = lay_out(branch, stream)
            for source, w in out:
                total[source] = total.get(source, 0.0) + weight * w
        merged = tuple((source, _f32(w)) for source, w in sorted(total.items()) if w != 0.0)
        if not merged:
            raise LayerOrderError("every branch of a parallel group has weight 0")
        return merged

    def program(self, output: Combo) -> LayerProgram:
        last = ((len(self.order) - 1, 1.0),)
        return LayerProgram(tuple(self.order), tuple(self.scales), tuple(self.inputs), None if output == last else output)


def build(*items: Item) -> LayerProgram:
    """A program from items laid out one after the other, e.g.
    ``build(Layers(0, 19), Parallel(Layers(20, 39), Layers(40, 59)), Layers(60, 79))``."""
    builder = _Builder()

    def lay_out(item: object, stream: Combo) -> Combo:
        if isinstance(item, str):
            return _lay_out_ast(_Parser(item).parse_seq_only(), builder, stream)
        if isinstance(item, Layers):
            return builder.run(item.indices(), _check_factor(item.scale, "a scale"), stream)
        if isinstance(item, Parallel):
            return builder.parallel(list(item.branches), item.weights, stream, lay_out)
        if isinstance(item, Sequence) and item:
            for part in item:
                stream = lay_out(part, stream)
            return stream
        raise LayerOrderError(f"a program item is a spec string, Layers, Parallel or a non-empty list, not {item!r}")

    if not items:
        raise LayerOrderError("a layer program needs at least one item")
    return builder.program(lay_out(list(items), ((EMBEDDINGS, 1.0),)))


# --------------------------------------------------------------------------- the spec grammar


@dataclass
class _Run:
    first: int
    last: int
    scale: float | None
    route: Combo | None


@dataclass
class _Group:
    branches: list  # of (items, weight or None)
    scale: float | None


class _Parser:
    """Recursive descent over a whitespace-free spec; errors name the column."""

    def __init__(self, spec: str) -> None:
        if not isinstance(spec, str):
            raise LayerOrderError(f"a layer program spec must be a string, got {type(spec).__name__}")
        if "\0" in spec:
            raise LayerOrderError(f"layer program spec contains a NUL character at column {spec.index(chr(0)) + 1}")
        self.columns = [i for i, ch in enumerate(spec) if ch not in WHITESPACE]
        self.text = "".join(spec[i] for i in self.columns)
        self.pos = 0
        if not self.text:
            raise LayerOrderError("empty layer program spec")

    def error(self, message: str) -> LayerOrderError:
        column = self.columns[self.pos] + 1 if self.pos < len(self.columns) else (self.columns[-1] + 2)
        shown = self.text[self.pos:self.pos + 12] or "end of spec"
        return LayerOrderError(f"layer program, column {column} (at {shown!r}): {message}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def accept(self, ch: str) -> bool:
        if self.peek() == ch:
            self.pos += 1
            return True
        return False

    def number(self, what: str) -> int:
        match = re.compile(r"[0-9]+").match(self.text, self.pos)
        if not match:
            raise self.error(f"expected {what}")
        if len(match.group()) > 9:
            raise self.error("a number has at most 9 digits")
        self.pos = match.end()
        return int(match.group())

    def decimal(self, what: str) -> float:
        match = re.compile(r"[0-9]{1,20}(?:\.[0-9]{1,20})?").match(self.text, self.pos)
        if not match:
            raise self.error(f"expected {what} (a decimal such as 0.25)")
        value = float(match.group())
        start, self.pos = self.pos, match.end()
        try:
            return _check_factor(value, what)
        except LayerOrderError as err:
            self.pos = start
            raise self.error(str(err)) from None

    def combo(self) -> Combo:
        terms = []
        while True:
            source = EMBEDDINGS if self.accept("e") else self.number("a position number or 'e'")
            weight = self.decimal("a weight") if self.accept("*") else 1.0
            terms.append((source, weight))
            if not self.accept("+"):
                return tuple(terms)

    def item(self):
        if self.accept("("):
            branches = []
            while True:
                items = self.seq()
                weight = self.decimal("a branch weight") if self.accept("*") else None
                branches.append((items, weight))
                if self.accept(")"):
                    break
                if not self.accept("|"):
                    raise self.error("expected '|' or ')' after a branch")
            if len(branches) < 2:
                raise self.error("a group needs at least two branches: (A|B)")
            if len({w is None for _, w in branches}) > 1:
                raise self.error("give every branch of a group a weight, or none")
            scale = self.decimal("a scale") if self.accept("@") else None
            return _Group(branches, scale)
        first = self.number("a layer index, a range or '('")
        last = self.number("the end of the range") if self.accept("-") else first
        scale = self.decimal("a scale") if self.accept("@") else None
        route = self.combo() if self.accept("<") else None
        return _Run(first, last, scale, route)

    def seq(self) -> list:
        items = [self.item()]
        while self.accept(","):
            items.append(self.item())
        return items

    def parse(self) -> tuple[list, Combo | None]:
        items = self.seq()
        output = self.combo() if self.accept(";") else None
        if self.pos != len(self.text):
            raise self.error("unexpected character")
        return items, output

    def parse_seq_only(self) -> list:
        items, output = self.parse()
        if output is not None:
            raise LayerOrderError("';' (the output stream) belongs at the end of a whole program, not in an item")
        return items


def _lay_out_ast(items: list, builder: _Builder, stream: Combo, scale: float | None = None) -> Combo:
    for item in items:
        if isinstance(item, _Run):
            if item.route is not None:
                p = len(builder.order)
                _check_combo(item.route, p, f"the input of position {p}")
                stream = item.route
            step = 1 if item.last >= item.first else -1
            own = item.scale if item.scale is not None else scale
            stream = builder.run(list(range(item.first, item.last + step, step)), 1.0 if own is None else own, stream)
        else:
            own = item.scale if item.scale is not None else scale
            weights = None if item.branches[0][1] is None else [w for _, w in item.branches]
            stream = builder.parallel([b for b, _ in item.branches], weights, stream,
                                      lambda branch, start: _lay_out_ast(branch, builder, start, own))
    return stream


def parse_program(spec: str, n_layers: int | None = None) -> LayerProgram:
    """Parse a layer-program spec (module docstring); a plain order spec gives a plain program.

    Raises :class:`~frankenllama.order.LayerOrderError` naming the column of the problem.
    """
    if not is_program_spec(spec):
        program = LayerProgram.from_order(parse_spec(spec, n_layers))
    else:
        items, output = _Parser(spec).parse()
        builder = _Builder()
        stream = _lay_out_ast(items, builder, ((EMBEDDINGS, 1.0),))
        if output is not None:
            _check_combo(output, len(builder.order), "the output")
            stream = output
        program = builder.program(stream)
    if n_layers is not None:
        program.check_layers(n_layers)
    return program


def is_program_spec(spec: object) -> bool:
    """Whether a string is written in program syntax: only its characters, and one of those an
    order spec does not use (else it is a plain order spec, or not a spec at all, e.g. a path)."""
    return (isinstance(spec, str) and any(ch in _PROGRAM_CHARS for ch in spec)
            and all(ch in _PROGRAM_CHARS or ch in _ORDER_CHARS for ch in spec))


def _format_combo(combo: Combo) -> str:
    return "+".join(("e" if source == EMBEDDINGS else str(source)) + ("" if weight == 1.0 else "*" + _format_factor(weight))
                    for source, weight in combo)


def format_program(program: LayerProgram) -> str:
    """The canonical spec of ``program`` (module docstring): runs of +-1 steps with one scale and
    default inputs are joined into ``a-b``; a routed position starts a new item."""
    if program.is_plain:
        return format_spec(program.order)
    items: list[str] = []
    p, n = 0, len(program.order)
    while p < n:
        q = p
        step = 0
        while q + 1 < n and program.inputs[q + 1] is None and program.scales[q + 1] == program.scales[p]:
            delta = program.order[q + 1] - program.order[q]
            if abs(delta) != 1 or (step and delta != step):
                break
            step, q = delta, q + 1
        text = str(program.order[p]) if q == p else f"{program.order[p]}-{program.order[q]}"
        if program.scales[p] != 1.0:
            text += "@" + _format_factor(program.scales[p])
        if program.inputs[p] is not None:
            text += "<" + _format_combo(program.inputs[p])
        items.append(text)
        p = q + 1
    spec = ",".join(items)
    return spec if program.output is None else spec + ";" + _format_combo(program.output)


def program_override_keys(arch: str, program: LayerProgram) -> dict[str, str]:
    """KV overrides carrying ``program`` for architecture ``arch``: the canonical spec in pieces of
    at most 127 bytes (``<arch>.layer_order``, ``.1``, ``.2``, ...; llama.cpp joins them as they
    are).  A plain program travels exactly as its order does (:func:`~frankenllama.order.override_keys`)."""
    if program.is_plain:
        return override_keys(arch, program.order)
    tokens = re.findall(r"[^,+;]*[,+;]?", program.spec)
    pieces = [""]
    for token in filter(None, tokens):
        if len(token) > MAX_OVERRIDE_BYTES:
            raise LayerOrderError(f"a term of the layer program is longer than {MAX_OVERRIDE_BYTES} bytes: {token!r}")
        if len(pieces[-1]) + len(token) > MAX_OVERRIDE_BYTES:
            pieces.append("")
        pieces[-1] += token
    override_keys(arch, [0])  # the same check of the architecture name
    return {override_key_name(arch, n): piece for n, piece in enumerate(pieces)}
