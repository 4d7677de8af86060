"""Llama Blocks block files: layer programs written as numbered blocks.

The format (line oriented; ``#`` starts a comment; blank lines are ignored; keywords are
case-insensitive; fields are separated by ``;`` with optional whitespace)::

    WeightBlock; 0; 20; 0; -1         # block 0: positions 0..19 run weights 0..19, fed by the embeddings
    WeightBlock; 20; 40; 20; 0        # block 1: positions 20..39 run weights 20..39, fed by block 0
    WeightBlock; 40; 60; 40; 0        # block 2: positions 40..59 run weights 40..59, also fed by block 0
    MergeBlock; 1; 0.5; 2; 0.5        # block 3: 0.5 * block 1 + 0.5 * block 2
    TotalLayers; 60

* Blocks are numbered 0, 1, 2, ... in file order; a ``MergeBlock`` takes a number too.
* ``WeightBlock; start; end; weight_start; input_block``: execution positions ``start`` up to
  ``end`` **excluded** run weight layers ``weight_start, weight_start + 1, ...``.  WeightBlocks
  follow each other: each starts where the previous one ended (the first at 0).  Its first
  position reads the output of block ``input_block`` (an earlier block), or the token embeddings
  for ``-1``; the other positions read the previous position, as in an order.
* ``MergeBlock; block_a; scale_a; block_b; scale_b``: the stream ``scale_a * out(a) +
  scale_b * out(b)`` of two earlier, different blocks (scales as in layer programs: 0, or
  1e-6..2).  It computes nothing by itself: a later WeightBlock can read it, and as the last
  block it is the model's output.
* ``TotalLayers; n`` (or ``TotalLayers n``), optional, at most once: the number of positions.
* The model's output is the last block's.  Every other block must feed a later block.

A block file is a plain order when it is one chain from the embeddings with no MergeBlock.
Every problem is a :class:`~frankenllama.order.LayerOrderError` naming the line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .order import MAX_POSITIONS, LayerOrderError
from .program import EMBEDDINGS, Combo, LayerProgram, _Builder, _check_factor

__all__ = ["parse_block_file"]


@dataclass(frozen=True)
class _Line:
    number: int
    kind: str
    fields: tuple[str, ...]


def _int(text: str, what: str, line: int, allow_minus_one: bool = False) -> int:
    if re.fullmatch(r"-1|[0-9]{1,9}" if allow_minus_one else r"[0-9]{1,9}", text) is None:
        allowed = "a block number or -1 (the embeddings)" if allow_minus_one else "a non-negative integer"
        raise LayerOrderError(f"block file line {line}: {what} {text!r} must be {allowed}")
    return int(text)


def _lines(text: str) -> list[_Line]:
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        content = raw.split("#", 1)[0].strip()
        if not content:
            continue
        match = re.fullmatch(r"(?i)(totallayers)\s*;?\s*(.*)", content)
        if match:
            lines.append(_Line(number, "totallayers", (match.group(2).strip(),)))
            continue
        fields = tuple(f.strip() for f in content.split(";"))
        kind = fields[0].lower()
        if kind not in ("weightblock", "mergeblock"):
            raise LayerOrderError(f"block file line {number}: unknown line {raw.strip()!r}; expected "
                                  "'WeightBlock; start; end; weight_start; input_block', "
                                  "'MergeBlock; block_a; scale_a; block_b; scale_b' or 'TotalLayers; n'")
        if len(fields) != 5:
            usage = ("WeightBlock; start; end; weight_start; input_block" if kind == "weightblock"
                     else "MergeBlock; block_a; scale_a; block_b; scale_b")
            raise LayerOrderError(f"block file line {number}: expected '{usage}' (5 fields), got {raw.strip()!r}")
        lines.append(_Line(number, kind, fields[1:]))
    return lines


def parse_block_file(text: str) -> LayerProgram:
    """The layer program of a block file's text (see the module docstring)."""
    builder = _Builder()
    streams: list[Combo] = []  # the output of each block
    used: list[bool] = []
    block_lines: list[int] = []
    total: int | None = None
    for line in _lines(text):
        if line.kind == "totallayers":
            if total is not None:
                raise LayerOrderError(f"block file line {line.number}: TotalLayers given twice")
            total = _int(line.fields[0], "TotalLayers", line.number)
            if not 1 <= total <= MAX_POSITIONS:
                raise LayerOrderError(f"block file line {line.number}: TotalLayers must be 1..{MAX_POSITIONS}")
            continue
        block = len(streams)

        def source(text: str, what: str, allow_minus_one: bool = False) -> Combo:
            ref = _int(text, what, line.number, allow_minus_one)
            if ref == -1:
                return ((EMBEDDINGS, 1.0),)
            if ref >= block:
                raise LayerOrderError(f"block file line {line.number}: {what} {ref} is not an earlier block "
                                      f"(this is block {block}; blocks are numbered 0, 1, ... in file order)")
            used[ref] = True
            return streams[ref]

        if line.kind == "weightblock":
            start, end, weight_start = (_int(f, name, line.number) for f, name in
                                        zip(line.fields[:3], ("start", "end", "weight_start")))
            if start != len(builder.order):
                raise LayerOrderError(f"block file line {line.number}: block {block} starts at position {start}, "
                                      f"but the WeightBlocks before it end at {len(builder.order)} "
                                      "(end is excluded: 'WeightBlock; 0; 20; ...' covers positions 0..19)")
            if end <= start:
                raise LayerOrderError(f"block file line {line.number}: end {end} must be after start {start} "
                                      "(end is excluded)")
            if end > MAX_POSITIONS:
                raise LayerOrderError(f"block file line {line.number}: a program has at most {MAX_POSITIONS} positions")
            stream = source(line.fields[3], "input_block", allow_minus_one=True)
            streams.append(builder.run(list(range(weight_start, weight_start + end - start)), 1.0, stream))
        else:
            first = source(line.fields[0], "block_a")
            scale_a = _check_factor(float(_decimal(line.fields[1], "scale_a", line.number)), f"block file line {line.number}: scale_a")
            second = source(line.fields[2], "block_b")
            scale_b = _check_factor(float(_decimal(line.fields[3], "scale_b", line.number)), f"block file line {line.number}: scale_b")
            if line.fields[0] == line.fields[2]:
                raise LayerOrderError(f"block file line {line.number}: a MergeBlock merges two different blocks")
            merged: dict[int, float] = {}
            for combo, scale in ((first, scale_a), (second, scale_b)):
                for src, weight in combo:
                    merged[src] = merged.get(src, 0.0) + scale * weight
            terms = tuple((src, w) for src, w in sorted(merged.items()) if w != 0.0)
            if not terms:
                raise LayerOrderError(f"block file line {line.number}: a MergeBlock with both scales 0")
            streams.append(tuple((src, _check_factor(w, f"block file line {line.number}: merged weight"))
                                 for src, w in terms))
        used.append(False)
        block_lines.append(line.number)
    if not builder.order:
        raise LayerOrderError("block file has no WeightBlock lines")
    for block, is_used in enumerate(used[:-1]):
        if not is_used:
            raise LayerOrderError(f"block file line {block_lines[block]}: block {block}'s output is never used "
                                  "(every block but the last must feed a later block)")
    if total is not None and total != len(builder.order):
        raise LayerOrderError(f"block file: TotalLayers is {total} but the WeightBlocks cover "
                              f"{len(builder.order)} positions")
    return builder.program(streams[-1])


def _decimal(text: str, what: str, line: int) -> str:
    if re.fullmatch(r"[0-9]{1,20}(?:\.[0-9]{1,20})?", text) is None:
        raise LayerOrderError(f"block file line {line}: {what} {text!r} must be a decimal such as 0.5")
    return text
