"""Which orders a sweep scores.  A sweep yields rounds (lists of :class:`Config`); a later round
may depend on the scores of earlier ones (greedy pruning, beam search), read with ``lookup``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..order import LayerOrderError, MAX_POSITIONS, format_spec
from ..recipes import drop, repeat_block, resolve, rys
from .errors import ScanError
from .stats import penalized

SWEEPS = ("rys", "prune", "repeat", "beam", "orders")

Lookup = Callable[[Sequence[int]], "dict[str, Any]"]  # scored row of an order (search split)


@dataclass(frozen=True)
class Config:
    """One order to score, and where it comes from."""

    order: tuple[int, ...]
    sweep: str
    params: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def spec(self) -> str:
        return format_spec(self.order)


@dataclass
class SweepSpec:
    """A sweep and its parameters (recorded in the results header).

    rys: ``stride``, ``layer_range`` (lo, hi): every (i, j) on the grid lo, lo+stride, ... <= hi
    with i < j.  prune: each layer dropped, then ``drop_k`` - 1 greedy rounds.  repeat: each block
    of ``block`` layers repeated 2..``max_times`` times.  beam: the rys grid, then ``depth`` - 1
    rounds adding one of the ``seeds`` best single blocks to each of the ``width`` best chains,
    ranked by gain minus ``penalty`` per 100 % extra compute, at most ``max_extra`` extra
    positions.  orders: every recipe line of ``orders_file``.
    """

    name: str
    stride: int = 1
    layer_range: tuple[int, int] | None = None
    drop_k: int = 1
    max_times: int = 3
    block: int = 1
    width: int = 4
    depth: int = 3
    seeds: int = 8
    penalty: float = 0.0
    max_extra: int | None = None
    orders_file: str | None = None

    def __post_init__(self) -> None:
        if self.name not in SWEEPS:
            raise ScanError(f"unknown sweep {self.name!r}: use one of {', '.join(SWEEPS)}")
        for name in ("stride", "drop_k", "block", "width", "depth", "seeds"):
            if int(getattr(self, name)) < 1:
                raise ScanError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_times < 2:
            raise ScanError(f"max_times must be at least 2 (a layer run twice), got {self.max_times}")
        if self.name == "orders" and not self.orders_file:
            raise ScanError("the orders sweep needs a file of orders (--orders FILE), one recipe per line")

    def header(self) -> dict[str, Any]:
        """The parameters that decide which orders are scored (compared when resuming)."""
        keys = {"rys": ("stride", "layer_range"), "prune": ("drop_k",), "repeat": ("max_times", "block"),
                "beam": ("stride", "layer_range", "width", "depth", "seeds", "penalty", "max_extra"),
                "orders": ()}[self.name]
        out: dict[str, Any] = {"name": self.name}
        for key in keys:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


def _grid(n: int, stride: int, layer_range: tuple[int, int] | None) -> list[int]:
    lo, hi = layer_range if layer_range is not None else (0, n)
    if not 0 <= lo < hi <= n:
        raise ScanError(f"layer range {lo}-{hi} needs 0 <= lo < hi <= {n} (the model's layers)")
    grid = list(range(lo, hi + 1, stride))
    if grid[-1] != hi:
        grid.append(hi)
    return grid


def rys_configs(n: int, stride: int = 1, layer_range: tuple[int, int] | None = None) -> list[Config]:
    """Every RYS (i, j) with i < j on the grid (layers 0..j-1 then i..n-1), grouped by j."""
    grid = _grid(n, stride, layer_range)
    return [Config(tuple(rys(i, j, n)), "rys", {"i": i, "j": j})
            for j in grid for i in grid if i < j and j + n - i <= MAX_POSITIONS]


def chain_order(blocks: Sequence[tuple[int, int]], n: int) -> list[int]:
    """Layers 0..j1-1, i1..j2-1, ..., ik..n-1 for blocks (i, j) sorted by j: each block runs twice."""
    order: list[int] = []
    start = 0
    for i, j in sorted(blocks, key=lambda b: b[1]):
        order.extend(range(start, j))
        start = i
    order.extend(range(start, n))
    return order


def plan(spec: SweepSpec, n: int, base: Sequence[int], lookup: Lookup, rank: str) -> Iterator[list[Config]]:
    """The rounds of ``spec`` on an ``n``-layer model whose own order is ``base``."""
    if spec.name == "rys":
        yield rys_configs(n, spec.stride, spec.layer_range)
    elif spec.name == "repeat":
        yield [Config(tuple(repeat_block(i, i + spec.block, t - 1, n)), "repeat",
                      {"i": i, "j": i + spec.block, "times": t})
               for i in range(0, n - spec.block + 1) for t in range(2, spec.max_times + 1)]
    elif spec.name == "prune":
        yield from _prune(spec, n, lookup, rank)
    elif spec.name == "orders":
        yield _orders_file(Path(spec.orders_file or ""), n)
    elif spec.name == "beam":
        yield from _beam(spec, n, lookup, rank)


def _prune(spec: SweepSpec, n: int, lookup: Lookup, rank: str) -> Iterator[list[Config]]:
    dropped: list[int] = []
    for k in range(1, min(spec.drop_k, n - 1) + 1):
        round_ = [Config(tuple(drop(dropped + [il], n)), "prune", {"dropped": format_spec(sorted(dropped + [il])),
                                                                   "k": k})
                  for il in range(n) if il not in dropped]
        yield round_
        best = max(round_, key=lambda c: penalized(lookup(c.order), rank, 0.0, n))
        dropped = [il for il in range(n) if il not in best.order]


def _orders_file(path: Path, n: int) -> list[Config]:
    if not path.is_file():
        raise ScanError(f"orders file not found: {path}")
    configs: list[Config] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        recipe = line.strip()
        if not recipe or recipe.startswith("#"):
            continue
        target: Any = recipe
        candidate = (path.parent / recipe).expanduser()
        if recipe.endswith((".yaml", ".yml", ".txt", ".blocks")) and candidate.is_file():
            target = candidate
        try:
            order = resolve(target, n)
        except (LayerOrderError, ValueError, OSError) as err:
            raise ScanError(f"{path}:{number}: {err}") from None
        configs.append(Config(tuple(order), "orders", {"recipe": recipe, "line": number}))
    if not configs:
        raise ScanError(f"orders file {path} lists no orders (one recipe per line; # starts a comment)")
    return configs


def _beam(spec: SweepSpec, n: int, lookup: Lookup, rank: str) -> Iterator[list[Config]]:
    singles = rys_configs(n, spec.stride, spec.layer_range)
    yield singles
    max_extra = spec.max_extra if spec.max_extra is not None else n

    def score(c: Config) -> float:
        return penalized(lookup(c.order), rank, spec.penalty, n)

    singles = [c for c in singles if c.params["j"] - c.params["i"] <= max_extra]
    seeds = sorted(singles, key=score, reverse=True)[:spec.seeds]
    seed_blocks = [(c.params["i"], c.params["j"]) for c in seeds]
    beam = [((c.params["i"], c.params["j"]),) for c in seeds[:spec.width]]
    seen = {tuple(sorted(b)) for b in beam}
    for _ in range(spec.depth - 1):
        candidates: list[Config] = []
        for chain in beam:
            ends = {j for _, j in chain}
            for block in seed_blocks:
                if block[1] in ends:
                    continue
                blocks = tuple(sorted(chain + (block,), key=lambda b: b[1]))
                if blocks in seen or sum(j - i for i, j in blocks) > max_extra:
                    continue
                order = chain_order(blocks, n)
                if len(order) > MAX_POSITIONS:
                    continue
                seen.add(blocks)
                candidates.append(Config(tuple(order), "beam", {"blocks": [list(b) for b in blocks]}))
        if not candidates:
            return
        yield candidates
        pool = [(score(c), tuple(tuple(b) for b in c.params["blocks"])) for c in candidates]
        pool += [(score(Config(tuple(chain_order(chain, n)), "beam")), chain) for chain in beam]
        pool.sort(key=lambda item: item[0], reverse=True)
        beam = [chain for _, chain in pool[:spec.width]]
