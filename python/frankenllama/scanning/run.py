"""``frankenllama.scan``: score many layer orders of one loaded model, resumably, into a JSONL file."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .._version import __version__
from ..gguf_info import check_header
from ..gguf_tools import file_layer_order
from ..model_stats import read_model_stats
from ..order import format_spec
from .engine import Evaluator, Scores, prepare_llama
from .errors import ScanError
from .inputs import ProbeItem, build_dataset, read_probes, read_text, sha256_text, split_text
from .results import ResultsFile, check_compatible, model_identity, ranked
from .stats import BLOCK_TOKENS, LEVEL, N_BOOT, RANKS, block_sums, bootstrap_ci
from .sweeps import Config, SweepSpec, plan

DEFAULT_N_CTX = 512


@dataclass
class ScanSummary:
    """What :func:`scan` did."""

    path: Path
    header: dict[str, Any]
    rows: list[dict[str, Any]]       # every result row of the file, in file order
    scored: int                      # configurations computed by this call
    reused: int                      # configurations found in the file already
    prefix_cache: str                # whether hidden states of shared prefixes were reused, and why not
    rank: str
    plots: list[Path] = field(default_factory=list)
    plot_note: str = ""
    seconds: float = 0.0
    positions_run: int = 0           # execution positions decoded (summed over decodes)


def default_rank(sweep: str, has_probes: bool) -> str:
    """``kl`` for pruning (least damage), else ``probe`` with probes, else ``ppl``."""
    if sweep == "prune":
        return "kl"
    return "probe" if has_probes else "ppl"


def _sweep_spec(sweep: str | SweepSpec, options: dict[str, Any]) -> SweepSpec:
    if isinstance(sweep, SweepSpec):
        if options:
            raise ScanError("give sweep options either in the SweepSpec or as keywords, not both")
        return sweep
    names = {f.name for f in dataclasses.fields(SweepSpec)} - {"name"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ScanError(f"unknown sweep option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    if "layer_range" in options and options["layer_range"] is not None:
        options = {**options, "layer_range": tuple(options["layer_range"])}
    if not isinstance(sweep, str):
        raise ScanError(f"sweep must be a name or a SweepSpec, got {sweep!r}")
    return SweepSpec(sweep, **options)


def _row(config: Config, split: str, scores: Scores, base: Scores, items: Sequence[ProbeItem],
         base_order: Sequence[int], kv_per_layer: Sequence[int]) -> dict[str, Any]:
    order = list(config.order)
    dnll = scores.nll - base.nll
    row: dict[str, Any] = {
        "kind": "result", "split": split, "sweep": config.sweep, "params": config.params,
        "order": format_spec(order), "positions": len(order),
        "extra_positions": len(order) - len(base_order),
        "extra_kv_bytes": int(sum(kv_per_layer[il] for il in order) - sum(kv_per_layer[il] for il in base_order)),
        "ppl": float(np.exp(scores.nll.mean())), "nll": float(scores.nll.mean()),
        "dnll": float(dnll.mean()), "dnll_ci": bootstrap_ci(*block_sums(dnll)),
        "kl": float(scores.kl.mean()), "kl_ci": bootstrap_ci(*block_sums(scores.kl)),
    }
    if items:
        item_scores, base_scores = _probe_item_scores(scores, items), _probe_item_scores(base, items)
        answers = [k for k, it in enumerate(items) if it.answer is not None]
        choices = [k for k, it in enumerate(items) if it.answer is None]
        diff = item_scores - base_scores
        row.update({
            "probe_logprob": float(item_scores[answers].mean()) if answers else None,
            "probe_acc": float(item_scores[choices].mean()) if choices else None,
            "probe_score": float(item_scores.mean()),
            "dprobe": float(diff.mean()),
            "dprobe_ci": bootstrap_ci(diff, np.ones(len(diff))),
        })
    return row


def _probe_item_scores(scores: Scores, items: Sequence[ProbeItem]) -> np.ndarray:
    """Per item: the answer's mean log-probability per token, or 1.0/0.0 for a right/wrong choice."""
    out = np.zeros(len(items))
    k = 0
    for index, item in enumerate(items):
        n = len(item.continuations)
        lp, nt = scores.probe_logprob[k:k + n], scores.probe_tokens[k:k + n]
        out[index] = lp[0] / nt[0] if item.answer is not None else float(int(np.argmax(lp)) == item.label)
        k += n
    return out


def scan(model: str | Path, sweep: str | SweepSpec = "rys", *, out: str | Path, text: str | Path | None = None,
         probes: str | Path | None = None, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None,
         validate: int = 0, rank: str | None = None, prefix_cache: bool = True,
         cache_bytes: int = 2 << 30, progress: bool = True, plots: bool = True,
         on_row: Callable[[dict[str, Any]], None] | None = None, **sweep_options: Any) -> ScanSummary:
    """Score the layer orders of a sweep on one loaded model; append one JSON row per order to ``out``.

    Args:
        model: GGUF model file (loaded once; orders switch with ``set_layer_order``).
        sweep: ``rys``, ``prune``, ``repeat``, ``beam`` or ``orders`` (see :class:`SweepSpec`), or a
            SweepSpec; sweep options (``stride``, ``layer_range``, ``drop_k``, ``max_times``, ``block``,
            ``width``, ``depth``, ``seeds``, ``penalty``, ``max_extra``, ``orders_file``) as keywords.
        out: results file (JSON lines).  An existing file of the same model, text, probes, sweep and
            settings is resumed: its orders are not scored again.
        text: a UTF-8 text file for perplexity and KL (default: the text the package ships).
        probes: a JSONL file of ``{"prompt", "answer"}`` / ``{"prompt", "choices", "label"}`` items.
        n_ctx: tokens per decode (text chunks are this long).
        n_threads: CPU threads (default: llama-cpp-python's).
        validate: re-score the best ``validate`` orders on a held-out split (the second half of the
            text, every other probe item); the search uses the rest.
        rank: what "best" means: ``ppl``, ``kl`` or ``probe`` (default :func:`default_rank`).
        prefix_cache: resume orders from cached hidden states of shared prefixes (exact; see
            :mod:`frankenllama.scanning.engine`); False recomputes every order in full.
        cache_bytes: memory for cached hidden states.
        progress: a tqdm progress bar on stderr.
        plots: write PNG plots next to ``out`` (needs matplotlib: ``pip install frankenllama[plot]``).
        on_row: called with every row written.

    Returns:
        a :class:`ScanSummary`.

    Raises:
        ScanError: bad input (the message names it); KeyboardInterrupt leaves every finished row
        in the file, which stays valid for resuming.
    """
    started = time.perf_counter()
    spec = _sweep_spec(sweep, sweep_options)
    if n_ctx < 16:
        raise ScanError(f"n_ctx must be at least 16, got {n_ctx}")
    if validate < 0:
        raise ScanError(f"validate must be >= 0, got {validate}")
    model_path = Path(model).expanduser()
    if not model_path.is_file():
        raise ScanError(f"model file not found: {model_path}")
    try:
        info = check_header(model_path)
        base = file_layer_order(model_path)
    except ValueError as err:
        raise ScanError(f"cannot read {model_path}: {err}") from None
    n_layer = info.n_layer
    text_str = read_text(text)
    items, probes_sha = read_probes(probes) if probes is not None else ([], None)
    rank = rank or default_rank(spec.name, bool(items))
    if rank not in RANKS:
        raise ScanError(f"unknown rank {rank!r}: use one of {', '.join(RANKS)}")
    if rank == "probe" and not items:
        raise ScanError("rank 'probe' needs probes (--probes FILE)")
    if rank == "probe" and validate and len(items) < 2:
        raise ScanError("--validate with rank 'probe' needs at least 2 probe items (every other one is held out)")

    header = {
        "model": model_identity(model_path),
        "text": {"sha256": sha256_text(text_str)},
        "text_source": str(text) if text is not None else "default",
        "probes": {"sha256": probes_sha, "items": len(items)} if items else None,
        "sweep": spec.header(),
        "settings": {"n_ctx": n_ctx, "validate": validate, "rank": rank, "block_tokens": BLOCK_TOKENS,
                     "bootstrap": N_BOOT, "level": LEVEL},
        "n_layer": n_layer, "base_order": format_spec(base), "frankenllama": __version__,
    }
    check_compatible(out, header)  # before loading anything
    kv = read_model_stats(model_path).kv_bytes_per_layer

    with _quiet_llama_log():
        return _scan_loaded(model_path, spec, header, out, text_str, items, n_layer, base, kv, n_ctx, n_threads,
                            validate, rank, prefix_cache, cache_bytes, progress, plots, on_row, started)


@contextlib.contextmanager
def _quiet_llama_log() -> Iterator[None]:
    """Keep llama.cpp's per-context notices (one per re-order) off stderr during a scan; errors
    still reach the exceptions (they are captured per call)."""
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(max(level, logging.CRITICAL + 1))
    try:
        yield
    finally:
        logger.setLevel(level)


def _scan_loaded(model_path: Path, spec: SweepSpec, header: dict[str, Any], out: str | Path, text_str: str,
                 items: list[ProbeItem], n_layer: int, base: list[int], kv: list[int], n_ctx: int,
                 n_threads: int | None, validate: int, rank: str, prefix_cache: bool, cache_bytes: int,
                 progress: bool, plots: bool, on_row: Callable[[dict[str, Any]], None] | None,
                 started: float) -> ScanSummary:
    llm = _load(model_path, n_ctx, n_threads)
    evaluators: list[Evaluator] = []
    bar = None
    counts = {"scored": 0, "reused": 0}
    try:
        _check_orders_supported(llm, base)
        tokenize = _tokenizer(llm)
        tokens = tokenize(text_str, True)
        splits: list[tuple[str, list[int], list[ProbeItem]]]
        if validate:
            bos = tokens[0] if tokens and tokens[0] == llm.token_bos() else None
            head, tail = split_text(tokens, bos)
            splits = [("search", head, items[0::2]), ("heldout", tail, items[1::2])]
        else:
            splits = [("search", tokens, items)]
        datasets = {name: build_dataset(name, toks, its, tokenize, n_ctx) for name, toks, its in splits}
        prepare_llama(llm, n_ctx, max(d.n_seqs_max for d in datasets.values()))
        split_items = {name: its for name, _, its in splits}
        results = ResultsFile(out, header)  # every input checked: now the file may be created

        from tqdm import tqdm

        bar = tqdm(total=0, unit="cfg", desc=f"scan {spec.name}", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)

        def run_round(ev: Evaluator, split: str, configs: Sequence[Config], base_scores: list[Scores]) -> None:
            todo: list[Config] = []
            seen: set[str] = set()
            if not base_scores:
                seen.add(format_spec(base))  # scored first anyway
            for c in configs:
                if c.spec in seen:
                    continue
                seen.add(c.spec)
                if results.get(split, c.spec) is None:
                    todo.append(c)
                else:
                    counts["reused"] += 1
            bar.total += len(todo) + (0 if base_scores else 1)
            bar.refresh()
            orders: list[list[int]] = ([] if base_scores else [list(base)]) + [list(c.order) for c in todo]
            configs_by_index = ([] if base_scores else [Config(tuple(base), "base")]) + todo
            for config, (_, scores) in zip(configs_by_index, ev.score_many(orders)):
                if not base_scores:
                    base_scores.append(scores)
                bar.update(1)
                if results.get(split, config.spec) is not None:  # the base row of a resumed file
                    continue
                row = _row(config, split, scores, base_scores[0], split_items[split], base, kv)
                results.append(row)
                counts["scored"] += 1
                if on_row is not None:
                    on_row(row)

        search = Evaluator(llm, datasets["search"], base, prefix_cache=prefix_cache, cache_bytes=cache_bytes)
        evaluators.append(search)
        search_base: list[Scores] = []
        lookup = _lookup(results, "search")
        for configs in plan(spec, n_layer, base, lookup, rank):
            run_round(search, "search", configs, search_base)
        if not search_base:  # every round was in the file: the base still has to be scored
            run_round(search, "search", [], search_base)
        note = search.prefix_note
        search.close()
        if validate:
            best = [r for r in ranked(results.rows, rank) if r["order"] != format_spec(base)][:validate]
            held = Evaluator(llm, datasets["heldout"], base, prefix_cache=prefix_cache, cache_bytes=cache_bytes)
            evaluators.append(held)
            configs = [Config(tuple(_order_of(r, n_layer)), r["sweep"], r["params"]) for r in best]
            run_round(held, "heldout", configs, [])
    finally:
        if bar is not None:
            bar.close()
        for ev in evaluators:
            ev.close()
        llm.close()

    rows = [r for r in results.rows if r.get("kind") == "result"]
    summary = ScanSummary(results.path, results.header, rows, counts["scored"], counts["reused"], note, rank,
                          positions_run=sum(ev.positions_run for ev in evaluators))
    if plots:
        from .plot import plot_results

        summary.plots, summary.plot_note = plot_results(results.path, results.header, rows, rank)
    summary.seconds = time.perf_counter() - started
    return summary


def _order_of(row: dict[str, Any], n_layer: int) -> list[int]:
    from ..order import parse_spec

    return parse_spec(row["order"], n_layer)


def _lookup(results: ResultsFile, split: str) -> Callable[[Sequence[int]], dict[str, Any]]:
    def lookup(order: Sequence[int]) -> dict[str, Any]:
        row = results.get(split, format_spec(list(order)))
        if row is None:
            raise ScanError(f"internal: no score for {format_spec(list(order))}")
        return row
    return lookup


def _load(model: Path, n_ctx: int, n_threads: int | None) -> Any:
    """The model, loaded once; llama-cpp-python's own batch stays small (the scan decodes itself)."""
    import io

    from ..llama import Llama

    kwargs: dict[str, Any] = {"n_ctx": n_ctx, "n_batch": 8, "n_ubatch": 8, "verbose": False}
    if n_threads is not None:
        kwargs.update(n_threads=n_threads, n_threads_batch=n_threads)
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level  # llama_cpp.Llama sets it (verbose=False: ERROR); keep the caller's
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return Llama(str(model), **kwargs)
    except ValueError as err:
        raise ScanError(f"cannot load {model}: {err}") from None
    finally:
        logger.setLevel(level)


def _check_orders_supported(llm: Any, base: Sequence[int]) -> None:
    """Refuse a model that cannot run a re-ordered stack (its first layer twice)."""
    try:
        llm.set_layer_order([base[0]] + list(base))
        llm.set_layer_order(list(base))
    except ValueError as err:
        raise ScanError(f"this model refuses layer orders, so it cannot be scanned: {err}") from None


def _tokenizer(llm: Any) -> Callable[[str, bool], list[int]]:
    def tokenize(text: str, bos: bool) -> list[int]:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=bos, special=False))
    return tokenize
