"""The layer-order grammar: the one definition shared by Python and the patched llama.cpp.

An *order* is a list of weight-layer indices: execution position ``p`` runs weight
layer ``order[p]``.  Repeats and skips are allowed; every index is ``0 <= i < n_layers``
and an order has 1..512 positions.

Spec grammar (what :func:`parse_spec` accepts, and what the C parser must accept)::

    spec   := item ( ',' item )*
    item   := number | number '-' number      # 'a-b' is inclusive; a > b counts down
    number := digit{1,9}                      # ASCII '0'..'9' only, at most 9 digits

* Whitespace -- exactly the four bytes space, tab, ``\\n`` and ``\\r`` -- is removed
  *everywhere* before parsing, even between two digits: ``"1 2"`` reads as ``12``.
  Any other byte (``+``, ``.``, ``;``, non-ASCII digits or spaces ...) is an error.
* Leading zeros are allowed and count towards the 9-digit limit (``"0000000001"``
  has 10 digits and is rejected as out of range).
* ``a-a`` is the single position ``a``.
* Errors (:class:`LayerOrderError`, a ValueError): a NUL character anywhere (C strings
  end there, so llama.cpp would silently cut the spec), an empty spec, an empty item
  (``"1,,2"``, trailing ``","``), a leading ``-`` (negative), more than one ``-`` in an
  item (``"0--5"``), a range missing an end (``"5-"``), a number of more than 9 digits,
  an index ``>= n_layers`` when ``n_layers`` is known, and more than
  :data:`MAX_POSITIONS` positions after expansion.

Canonical form (what :func:`format_spec` writes): scan left to right; a *run* is a
maximal stretch whose steps are all +1, or all -1 (the direction is fixed by the first
step).  A run of two or more indices is written ``a-b``, anything else as ``a``;
items are joined with ``,`` and no spaces.  E.g. ``[0,1,2,3,2,3,4] -> "0-3,2-4"``,
``[5,4,3] -> "5-3"``, ``[1,1] -> "1,1"``, ``[3,4,3] -> "3-4,3"``.

GGUF metadata transport: a llama.cpp string KV override holds at most 127 bytes, so a
long canonical spec travels as several keys (:func:`override_keys`)::

    <arch>.layer_order      piece 0
    <arch>.layer_order.1    piece 1
    <arch>.layer_order.2    ...

Pieces are cut only *after* a comma and the comma stays on the left piece, so every
piece except the last ends with ``','`` and the reader concatenates the pieces verbatim
(keys ``.1``, ``.2``, ... read in order until the first missing one).
:func:`check_kv_overrides` refuses the keys llama.cpp would silently ignore.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from numbers import Integral

__all__ = [
    "LayerOrderError",
    "MAX_LAYERS",
    "MAX_POSITIONS",
    "MAX_OVERRIDE_BYTES",
    "MAX_DIGITS",
    "WHITESPACE",
    "parse_spec",
    "format_spec",
    "validate_order",
    "override_chunks",
    "override_keys",
    "override_key_name",
    "check_kv_overrides",
]


class LayerOrderError(ValueError):
    """A layer order, recipe or layer-order override that frankenllama refuses (bad input)."""


#: Most decoder blocks llama.cpp loads (``LLAMA_MAX_LAYERS`` in src/llama-hparams.h).
MAX_LAYERS = 512
#: Most execution positions an order may have (llama.cpp checks ``LLAMA_MAX_LAYERS``; a model
#: with nextn/MTP blocks has that many fewer).
MAX_POSITIONS = MAX_LAYERS
#: Longest string value a llama.cpp KV override can carry (128-byte buffer minus NUL).
MAX_OVERRIDE_BYTES = 127
#: Longest number accepted in a spec; longer numbers are rejected as out of range.
MAX_DIGITS = 9
_WS = " \t\n\r"
#: The only bytes a spec may contain besides digits, ',' and '-'; they are ignored.
WHITESPACE = frozenset(_WS)

_DIGITS = frozenset("0123456789")
_HINT = "write comma-separated layer indices or inclusive ranges, e.g. '0-15,8-23,16-31'"


def _reject_nul(text: str, what: str) -> None:
    """Refuse a string holding NUL: llama.cpp reads C strings and would silently drop the rest."""
    column = text.find("\0")
    if column >= 0:
        raise LayerOrderError(
            f"{what} contains a NUL character ('\\x00') at column {column + 1}; llama.cpp would "
            f"silently cut it there: remove it"
        )


def _describe(index: int, raw: str, column: int) -> str:
    """Name a spec item for an error message: 1-based item number, text and the 1-based
    column of its first non-whitespace character (``column`` is where the item starts)."""
    text = raw.lstrip(_WS)
    shown = text.rstrip(_WS)
    return f"layer order item {index} {shown!r} (column {column + len(raw) - len(text)})"


def _parse_number(text: str, where: str, n_layers: int | None) -> int:
    """Parse one whitespace-free number of an item, checking digits, length and range."""
    for ch in text:
        if ch not in _DIGITS:
            raise LayerOrderError(f"{where}: unexpected character {ch!r}; {_HINT}")
    if len(text) > MAX_DIGITS:
        raise LayerOrderError(
            f"{where}: number {text} is out of range (more than {MAX_DIGITS} digits)"
        )
    value = int(text)
    if n_layers is not None and value >= n_layers:
        raise LayerOrderError(
            f"{where}: layer {value} is out of range for a model with {n_layers} layers "
            f"(valid indices are 0..{n_layers - 1})"
        )
    return value


def _parse_item(item: str, where: str, n_layers: int | None) -> tuple[int, int]:
    """Parse one whitespace-free item into an inclusive (first, last) pair."""
    if item == "":
        raise LayerOrderError(f"{where}: empty item (doubled or trailing comma?); {_HINT}")
    parts = item.split("-")
    if len(parts) == 1:
        value = _parse_number(item, where, n_layers)
        return value, value
    if len(parts) > 2:
        raise LayerOrderError(
            f"{where}: a range is two numbers joined by a single '-' and indices cannot "
            f"be negative; {_HINT}"
        )
    first_text, last_text = parts
    if first_text == "":
        raise LayerOrderError(f"{where}: negative layer indices are not allowed; {_HINT}")
    if last_text == "":
        raise LayerOrderError(f"{where}: range is missing its end after '-'; {_HINT}")
    return (
        _parse_number(first_text, where, n_layers),
        _parse_number(last_text, where, n_layers),
    )


def _split_items(spec: str) -> list[tuple[str, int]]:
    """Split on ',' keeping each raw item with its 1-based start column."""
    items: list[tuple[str, int]] = []
    start = 0
    while True:
        comma = spec.find(",", start)
        end = len(spec) if comma < 0 else comma
        items.append((spec[start:end], start + 1))
        if comma < 0:
            return items
        start = comma + 1


def _check_n_layers(n_layers: object) -> None:
    """Reject a layer count that is not a positive int."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, Integral) or n_layers < 1:
        raise LayerOrderError(f"n_layers must be a positive integer, got {n_layers!r}")


def parse_spec(spec: str, n_layers: int | None = None) -> list[int]:
    """Parse a layer-order spec such as ``"0-15, 8-23, 16-31"`` into a list of indices.

    ``a-b`` is inclusive and counts down when ``a > b``.  With ``n_layers`` every index
    must be below it.  Raises :class:`LayerOrderError` (a ValueError) naming the offending
    item (1-based number, text and column) for anything the C parser would reject, and for a
    NUL character, which the C parser would never see; see the module docstring.
    """
    if not isinstance(spec, str):
        raise LayerOrderError(f"layer order spec must be a string, got {type(spec).__name__}")
    _reject_nul(spec, "layer order spec")
    if n_layers is not None:
        _check_n_layers(n_layers)
    if all(ch in WHITESPACE for ch in spec):
        raise LayerOrderError(f"empty layer order spec; {_HINT}")
    order: list[int] = []
    for index, (raw, column) in enumerate(_split_items(spec), start=1):
        where = _describe(index, raw, column)
        item = "".join(ch for ch in raw if ch not in WHITESPACE)
        first, last = _parse_item(item, where, n_layers)
        if len(order) + abs(last - first) + 1 > MAX_POSITIONS:
            raise LayerOrderError(
                f"{where}: the order would exceed {MAX_POSITIONS} positions; "
                f"use a shorter order"
            )
        step = 1 if last >= first else -1
        order.extend(range(first, last + step, step))
    return order


def _check_entries(order: object, n_layers: int | None) -> list[int]:
    """Shared checks for an order given as a sequence of ints; returns plain ints."""
    if isinstance(order, (str, bytes)) or not isinstance(order, Sequence):
        raise LayerOrderError(
            f"a layer order must be a list of ints, got {type(order).__name__}; "
            f"parse spec strings with parse_spec()"
        )
    if len(order) == 0:
        raise LayerOrderError("a layer order needs at least one position")
    if len(order) > MAX_POSITIONS:
        raise LayerOrderError(
            f"a layer order has at most {MAX_POSITIONS} positions, got {len(order)}"
        )
    limit = n_layers if n_layers is not None else 10**MAX_DIGITS
    result: list[int] = []
    for position, value in enumerate(order):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise LayerOrderError(
                f"position {position}: layer index must be an int, got {value!r}"
            )
        if not 0 <= value < limit:
            valid = (
                f"0..{n_layers - 1} for a model with {n_layers} layers"
                if n_layers is not None
                else f"0..{limit - 1}"
            )
            raise LayerOrderError(
                f"position {position}: layer {int(value)} is out of range (valid: {valid})"
            )
        result.append(int(value))
    return result


def validate_order(order: Sequence[int], n_layers: int) -> list[int]:
    """Check an order against a model with ``n_layers`` weight layers.

    Entries must be ints (bools rejected) with ``0 <= i < n_layers`` and the order must
    have 1..512 positions.  Returns a new list of plain ints; raises :class:`LayerOrderError`
    naming the first bad position.
    """
    _check_n_layers(n_layers)
    return _check_entries(order, int(n_layers))


def format_spec(order: Sequence[int]) -> str:
    """Write ``order`` in canonical compact form, e.g. ``[0,1,2,3,2,3,4] -> "0-3,2-4"``.

    Greedy: a run starts at the current index, takes its direction (+1 or -1) from the
    first step, and is extended as far as possible.  ``parse_spec`` of the result gives
    back ``order``.  Raises :class:`LayerOrderError` for an order the grammar cannot express (empty,
    over 512 positions, negative or non-int entries, numbers over 9 digits).
    """
    values = _check_entries(order, None)
    items: list[str] = []
    i = 0
    while i < len(values):
        j = i
        if i + 1 < len(values) and abs(values[i + 1] - values[i]) == 1:
            step = values[i + 1] - values[i]
            j = i + 1
            while j + 1 < len(values) and values[j + 1] - values[j] == step:
                j += 1
        items.append(str(values[i]) if j == i else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(items)


def override_chunks(spec: str) -> list[str]:
    """Split a spec into pieces of at most 127 bytes for llama.cpp string KV overrides.

    Cuts happen only after a comma and the comma stays on the left piece, so every
    piece but the last ends with ``','`` and ``"".join(pieces) == spec``.  Pieces are
    packed greedily (as many whole items as fit).  The spec is validated with
    :func:`parse_spec`; pass a canonical spec (:func:`format_spec`) to get no whitespace.
    """
    parse_spec(spec)
    items = spec.split(",")
    pieces: list[str] = []
    current = ""
    for index, item in enumerate(items):
        token = item if index == len(items) - 1 else item + ","
        size = len(token.encode("utf-8"))
        if size > MAX_OVERRIDE_BYTES:
            raise LayerOrderError(
                f"layer order item {index + 1} {item.strip()!r} is longer than "
                f"{MAX_OVERRIDE_BYTES} bytes; write the spec in canonical form with "
                f"format_spec()"
            )
        if current and len(current.encode("utf-8")) + size > MAX_OVERRIDE_BYTES:
            pieces.append(current)
            current = ""
        current += token
    pieces.append(current)
    return pieces


def override_key_name(arch: str, piece: int) -> str:
    """Metadata key of piece ``piece``: ``<arch>.layer_order`` then ``.layer_order.<n>``."""
    base = f"{arch}.layer_order"
    return base if piece == 0 else f"{base}.{piece}"


def override_keys(arch: str, order: Sequence[int]) -> dict[str, str]:
    """KV overrides carrying ``order`` for architecture ``arch`` (e.g. ``"llama"``).

    Returns ``{"<arch>.layer_order": piece0, "<arch>.layer_order.1": piece1, ...}``
    built from :func:`format_spec` and :func:`override_chunks`, in key order.
    """
    if not isinstance(arch, str) or not arch or any(ch.isspace() for ch in arch):
        raise LayerOrderError(
            f"arch must be a GGUF architecture name such as 'llama', got {arch!r}"
        )
    pieces = override_chunks(format_spec(order))
    return {override_key_name(arch, n): piece for n, piece in enumerate(pieces)}


_ORDER_KEY = re.compile(r"(?P<arch>.+)\.layer_order(?:\.(?P<piece>.*))?", re.DOTALL)
_PIECE = re.compile(r"[1-9][0-9]*")


def check_kv_overrides(arch: str, kv_overrides: Mapping[str, object] | None) -> None:
    """Refuse the layer-order ``kv_overrides`` that llama.cpp would silently ignore.

    ``arch`` is the model's ``general.architecture``.  Raises :class:`LayerOrderError` naming
    the key for:

    * ``<other>.layer_order`` (or a continuation of it) for another architecture, e.g.
      ``qwen2.layer_order`` on a llama model;
    * a continuation key other than ``<arch>.layer_order.1``, ``.2``, ... (``.0``, ``.01``,
      ``.x``);
    * a string value holding a NUL character (llama.cpp would cut the spec there), or any key
      holding one;
    * a key that is a layer-order key but for case or spaces (``llama.Layer_Order``).

    Everything else (value types, missing pieces, the spec itself) is left to llama.cpp,
    which reports it when loading.  Pure Python; ``None`` means no overrides.
    """
    if not isinstance(arch, str) or not arch:
        raise LayerOrderError(
            f"arch must be a GGUF architecture name such as 'llama', got {arch!r}"
        )
    for key, value in (kv_overrides or {}).items():
        if isinstance(key, str) and "\x00" in key:
            raise LayerOrderError(f"kv_overrides key {key!r} contains a NUL character: llama.cpp would "
                                  "read only the part before it")
        match = _ORDER_KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            near = _ORDER_KEY.fullmatch("".join(key.split()).lower()) if isinstance(key, str) else None
            if near is not None:
                raise LayerOrderError(f"kv_overrides key {key!r} is not {override_key_name(arch, 0)!r} "
                                      "(keys are case- and space-sensitive), so llama.cpp would ignore it")
            continue
        base = override_key_name(arch, 0)
        if match["arch"] != arch:
            raise LayerOrderError(
                f"kv_overrides key {key!r} is for the {match['arch']!r} architecture, but "
                f"the model is {arch!r}, so llama.cpp would ignore it: use {base!r}"
            )
        piece = match["piece"]
        if piece is not None and not _PIECE.fullmatch(piece):
            raise LayerOrderError(
                f"kv_overrides key {key!r} is not a layer-order continuation key: llama.cpp reads "
                f"only {base}, {base}.1, {base}.2, ... (no leading zeros); rename or remove it"
            )
        if isinstance(value, str):
            _reject_nul(value, f"kv_overrides[{key!r}]")
