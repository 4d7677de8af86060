"""frankenllama scan: scores, exact prefix caching, resumable results, plots, bad input.

SmolLM2 (llama) and Gemma 3 (sliding window) check the numbers: the base order's perplexity
against an independent computation, and prefix-cached scores against naive recompute.  The tiny
random llama model (milliseconds per order) checks the mechanics: resume, plots, sweeps, errors.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import frankenllama
from frankenllama import cli
from frankenllama.order import parse_spec
from frankenllama.recipes import drop, repeat_block, rys
from frankenllama.scanning import ScanError, SweepSpec, chain_order, gain, ranked, read_results, scan
from frankenllama.scanning import inputs, results as results_mod
from frankenllama.scanning.stats import block_sums, bootstrap_ci, pareto_front
from helpers import THREADS, load, token_nll
from tiny_archs import REFUSED_ARCH, write_tiny
from tiny_model import write_tiny_llama

TEXT = inputs.default_text()
N_TINY = 6


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_llama(tmp_path_factory.mktemp("scan") / "tiny6.gguf", n_layer=N_TINY, seed=3).path)


@pytest.fixture
def short_text(tmp_path: Path) -> Path:
    """About 60 SmolLM2 tokens (and 300 byte tokens of the tiny model)."""
    path = tmp_path / "text.txt"
    path.write_text(TEXT[:300], encoding="utf-8")
    return path


def _scan(model: str, sweep: str, out: Path, **kw):
    kw = {"n_threads": THREADS, "progress": False, "plots": False, **kw}
    return scan(model, sweep, out=out, **kw)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- numbers (real models)


def test_base_perplexity_matches_an_independent_computation(smollm2_path, short_text, tmp_path):
    """The base row's perplexity is exp(mean NLL of every token after the first), as computed
    from llama_cpp's own logits with NumPy; its KL is exactly 0, and another order's is not."""
    out = tmp_path / "r.jsonl"
    _scan(smollm2_path, "rys", out, text=short_text, n_ctx=128, layer_range=(28, 30), stride=2)
    rows = _lines(out)[1:]
    base = next(r for r in rows if r["sweep"] == "base")
    assert base["order"] == "0-29" and base["kl"] == 0.0 and base["dnll"] == 0.0

    llm = load(smollm2_path, n_ctx=128, logits_all=True)
    try:
        tokens = llm.tokenize(short_text.read_text(encoding="utf-8").encode(), add_bos=True, special=False)
        assert len(tokens) <= 128  # one chunk, like the scan's
        llm.eval(tokens)
        nll = token_nll(np.array(llm.scores[: len(tokens)]), tokens)
    finally:
        llm.close()
    assert len(nll) == len(tokens) - 1
    assert base["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-4)
    assert base["nll"] == pytest.approx(nll.mean(), abs=1e-4)
    other = next(r for r in rows if r["sweep"] == "rys")
    assert other["order"] == "0-29,28-29" and other["kl"] > 1e-4 and other["ppl"] != base["ppl"]


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_prefix_cached_scores_equal_naive_recompute(request, which, short_text, tmp_path):
    """Every row (perplexity, KL, probe scores, intervals) is bit-identical with and without prefix
    caching, and caching ran fewer positions (it was really used)."""
    path = request.getfixturevalue(f"{which}_path")
    n = 30 if which == "smollm2" else 18
    probes = inputs.example_probes_path()
    kw = dict(text=short_text, probes=probes, n_ctx=96, layer_range=(n - 6, n), stride=2)
    cached = _scan(path, "rys", tmp_path / "cached.jsonl", **kw)
    naive = _scan(path, "rys", tmp_path / "naive.jsonl", prefix_cache=False, **kw)
    assert cached.prefix_cache.startswith("on (checked") and naive.prefix_cache == "off (asked)"
    assert len(cached.rows) == 7  # base + 6 (i, j) pairs on the grid n-6, n-4, n-2, n
    assert cached.rows == naive.rows
    assert cached.positions_run < naive.positions_run
    assert len({r["ppl"] for r in cached.rows}) == len(cached.rows)  # the orders really differ


def test_cache_budget_bounds_the_cached_states(tiny6, short_text, tmp_path):
    """With no memory for cached states the scan recomputes prefixes (more positions), same rows."""
    kw = dict(text=short_text, n_ctx=64)
    roomy = _scan(tiny6, "prune", tmp_path / "a.jsonl", **kw)
    tight = _scan(tiny6, "prune", tmp_path / "b.jsonl", cache_bytes=0, **kw)
    assert roomy.rows == tight.rows
    assert roomy.positions_run < tight.positions_run


def test_unverified_architecture_falls_back_to_naive_recompute(tmp_path, short_text):
    path = write_tiny("qwen2", tmp_path / "qwen2.gguf")
    summary = _scan(str(path), "prune", tmp_path / "q.jsonl", text=short_text, n_ctx=128)
    assert summary.prefix_cache.startswith("off: not verified for architecture 'qwen2'")
    assert len(summary.rows) == 5


# --------------------------------------------------------------------------- results file


def test_resume_after_interrupt_gives_the_same_file(tiny6, short_text, tmp_path):
    """Ctrl-C after some rows keeps them (the file stays valid); running again finishes the same
    file byte for byte as an uninterrupted run, also after a torn last line."""
    kw = dict(text=short_text, probes=inputs.example_probes_path(), n_ctx=128, validate=2)
    whole = tmp_path / "whole.jsonl"
    _scan(tiny6, "rys", whole, **kw)

    part = tmp_path / "part.jsonl"
    seen: list[dict] = []

    def interrupt(row: dict) -> None:
        seen.append(row)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _scan(tiny6, "rys", part, on_row=interrupt, **kw)
    header, rows = read_results(part)
    assert rows == seen and len(rows) == 5
    assert part.read_bytes() == whole.read_bytes()[:len(part.read_bytes())]
    with open(part, "ab") as f:
        f.write(b'{"kind": "result", "split": "sea')  # a row cut short by a crash
    resumed = _scan(tiny6, "rys", part, **kw)
    assert resumed.reused == 4 and resumed.scored == len(_lines(whole)) - 1 - 5
    assert part.read_bytes() == whole.read_bytes()
    heldout = [r for r in _lines(whole) if r.get("split") == "heldout"]
    assert len(heldout) == 3 and heldout[0]["sweep"] == "base"  # the base and the best 2, re-scored

    again = _scan(tiny6, "rys", part, **kw)  # nothing left to do
    assert again.scored == 0 and part.read_bytes() == whole.read_bytes()


def test_sigint_during_a_decode_keeps_the_file_valid(smollm2_path, short_text, tmp_path):
    """A real SIGINT in the middle of a scan (in llama.cpp's decode, or inside the eval callback,
    which re-raises it after the decode) stops it with KeyboardInterrupt, not an error; the rows
    before it are whole and a rerun resumes."""
    out = tmp_path / "r.jsonl"
    kw = dict(text=short_text, n_ctx=128, layer_range=(26, 30), stride=2)

    def interrupt_soon(row: dict) -> None:
        if row["sweep"] == "base":  # the next order is decoding when the signal arrives
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()

    with pytest.raises(KeyboardInterrupt):
        _scan(smollm2_path, "rys", out, on_row=interrupt_soon, **kw)
    _, rows = read_results(out)
    assert 1 <= len(rows) < 4 and rows[0]["sweep"] == "base"
    resumed = _scan(smollm2_path, "rys", out, **kw)
    assert resumed.reused + resumed.scored == 3 and len(read_results(out)[1]) == 4


def test_resume_refuses_another_model_text_or_sweep(tiny6, short_text, tmp_path):
    out = tmp_path / "r.jsonl"
    _scan(tiny6, "prune", out, text=short_text, n_ctx=64)
    before = out.read_bytes()
    other_text = tmp_path / "other.txt"
    other_text.write_text(TEXT[300:700], encoding="utf-8")
    with pytest.raises(ScanError, match="another text"):
        _scan(tiny6, "prune", out, text=other_text, n_ctx=64)
    other_model = write_tiny_llama(tmp_path / "other.gguf", n_layer=N_TINY, seed=4).path
    with pytest.raises(ScanError, match="another model"):
        _scan(str(other_model), "prune", out, text=short_text, n_ctx=64)
    with pytest.raises(ScanError, match="other sweep"):
        _scan(tiny6, "prune", out, text=short_text, n_ctx=64, drop_k=2)
    assert out.read_bytes() == before
    stranger = tmp_path / "notes.jsonl"
    stranger.write_text('{"hello": 1}\n')
    with pytest.raises(ScanError, match="not a frankenllama scan results file"):
        _scan(tiny6, "prune", stranger, text=short_text, n_ctx=64)


def test_rows_report_overhead_and_intervals(tiny6, short_text, tmp_path):
    summary = _scan(tiny6, "repeat", tmp_path / "r.jsonl", text=short_text, n_ctx=128, max_times=3,
                    probes=inputs.example_probes_path())
    per_layer_kv = (summary.rows[0]["extra_kv_bytes"], None)[0]
    assert per_layer_kv == 0
    for row in summary.rows[1:]:
        order = parse_spec(row["order"], N_TINY)
        assert row["positions"] == len(order) and row["extra_positions"] == len(order) - N_TINY
        # tiny model: 2 KV heads of 16 for K and V, f16: 2 * 2 * 16 * 2 bytes per position
        assert row["extra_kv_bytes"] == row["extra_positions"] * 128
        lo, hi = row["dnll_ci"]
        assert lo <= row["dnll"] <= hi and lo < hi
        lo, hi = row["dprobe_ci"]
        assert lo <= row["dprobe"] <= hi
        assert row["probe_acc"] in {k / 5 for k in range(6)}


# --------------------------------------------------------------------------- sweeps


def test_sweeps_score_the_orders_they_promise(tiny6, short_text, tmp_path):
    kw = dict(text=short_text, n_ctx=64)
    n = N_TINY
    orders = lambda s: [r["order"] for r in s.rows[1:]]  # noqa: E731
    spec = lambda o: ",".join(map(str, o))  # noqa: E731
    full = _scan(tiny6, "rys", tmp_path / "rys.jsonl", **kw)
    assert len(full.rows) == n * (n + 1) // 2 + 1
    assert {parse_spec(o, n) == rys(i, j, n) for o, (i, j) in
            zip(orders(full), [(r["params"]["i"], r["params"]["j"]) for r in full.rows[1:]])} == {True}

    prune = _scan(tiny6, "prune", tmp_path / "prune.jsonl", drop_k=2, **kw)
    singles = [r for r in prune.rows if r["params"].get("k") == 1]
    assert [parse_spec(r["order"], n) for r in singles] == [drop([il], n) for il in range(n)]
    best = min(singles, key=lambda r: r["kl"])  # default rank for prune: least KL
    pairs = [r for r in prune.rows if r["params"].get("k") == 2]
    assert len(pairs) == n - 1
    assert all(set(parse_spec(r["order"], n)) < set(parse_spec(best["order"], n)) for r in pairs)

    rep = _scan(tiny6, "repeat", tmp_path / "rep.jsonl", max_times=3, block=2, **kw)
    assert [parse_spec(o, n) for o in orders(rep)] == [repeat_block(i, i + 2, t - 1, n)
                                                       for i in range(n - 1) for t in (2, 3)]

    beam = _scan(tiny6, "beam", tmp_path / "beam.jsonl", width=2, depth=2, seeds=3, stride=2, **kw)
    chains = [r for r in beam.rows if r["sweep"] == "beam"]
    assert chains and all(len(r["params"]["blocks"]) == 2 for r in chains)
    for r in chains:
        assert parse_spec(r["order"], n) == chain_order([tuple(b) for b in r["params"]["blocks"]], n)

    listing = tmp_path / "orders.txt"
    listing.write_text(f"# mine\n{spec([0, 1, 2, 3, 4, 5, 5])}\n0..2,1..5\n\n")
    lst = _scan(tiny6, "orders", tmp_path / "list.jsonl", orders_file=str(listing), **kw)
    assert orders(lst) == ["0-5,5", "0-2,1-5"]
    listing.write_text("0-5\n0-9\n")
    with pytest.raises(ScanError, match=r"orders.txt:2: .*9"):
        _scan(tiny6, "orders", tmp_path / "bad.jsonl", orders_file=str(listing), **kw)


def test_chain_order_and_pareto_front():
    assert chain_order([(2, 4)], 6) == rys(2, 4, 6)
    assert chain_order([(3, 5), (1, 2)], 6) == [0, 1, 1, 2, 3, 4, 3, 4, 5]
    points = [(0, 0.0), (1, 0.5), (2, 0.4), (2, 0.9), (3, 0.9), (-1, -0.2)]
    assert pareto_front(points) == [5, 0, 1, 3]
    sums, counts = block_sums(np.arange(10.0), 4)
    assert sums.tolist() == [6.0, 22.0, 17.0] and counts.tolist() == [4, 4, 2]
    lo, hi = bootstrap_ci(np.array([1.0, 2.0, 3.0, 10.0]), np.ones(4))
    assert 1.0 <= lo < 4.0 < hi <= 10.0


def test_probe_log_probabilities_match_an_independent_computation(tiny6, tmp_path):
    """Each probe sequence's answer log-probability equals the one computed from llama_cpp's own
    logits, also when first-fit packing puts a later sequence into an earlier decode."""
    from frankenllama.scanning.engine import Evaluator, prepare_llama
    from frankenllama.scanning.run import _load, _tokenizer

    items = [inputs.ProbeItem(1, "x" * 50, answer=" long"),       # (byte tokens) nearly a decode of its own
             inputs.ProbeItem(2, "y" * 20, choices=(" ab", " c")),
             inputs.ProbeItem(3, "z", answer="!")]                 # short: packed into an earlier decode
    llm = _load(Path(tiny6), 64, 1)
    try:
        tokenize = _tokenizer(llm)
        dataset = inputs.build_dataset("search", tokenize(TEXT[:200], True), items, tokenize, 64)
        packed = [s.index for b in dataset.bins for s in b.seqs if s.kind == "probe"]
        assert packed != sorted(packed)  # the case this test is about
        prepare_llama(llm, 64, dataset.n_seqs_max)
        ev = Evaluator(llm, dataset, list(range(N_TINY)))
        (_, scores), = ev.score_many([list(range(N_TINY))])
        ev.close()
    finally:
        llm.close()
    ref = load(tiny6, n_ctx=64, logits_all=True)
    try:
        expected, lengths = [], []
        for item in items:
            prompt = ref.tokenize(item.prompt.encode(), add_bos=True, special=False)
            for cont in item.continuations:
                answer = ref.tokenize(cont.encode(), add_bos=False, special=False)
                tokens = prompt + answer
                ref.reset()
                ref.eval(tokens)
                nll = token_nll(np.array(ref.scores[: len(tokens)]), tokens)
                expected.append(-nll[len(prompt) - 1:].sum())
                lengths.append(len(answer))
    finally:
        ref.close()
    assert scores.probe_logprob == pytest.approx(np.array(expected), abs=1e-4)
    assert scores.probe_tokens.tolist() == lengths
    assert len(set(np.round(expected, 3))) == len(expected)  # distinct values: a mix-up would show


def test_text_chunks_predict_every_token_once():
    tokens = list(range(100, 230))
    seqs = inputs.text_chunks(tokens, 50)
    targets = [t for s in seqs for t in s.targets]
    assert targets == tokens[1:]
    assert all(len(s.tokens) <= 50 for s in seqs)
    for s in seqs:  # output k of a chunk predicts the token after it
        assert [s.tokens[p + 1] for p in s.out_pos] == s.targets


# --------------------------------------------------------------------------- plots and CLI


def test_heatmap_pixels_match_the_rows(tiny6, short_text, tmp_path):
    """Each cell's colour in the PNG, read back and inverted through the colour map, is the gain of
    the row of that (i, j), taken from the JSONL file."""
    import matplotlib
    import matplotlib.image

    out = tmp_path / "r.jsonl"
    summary = _scan(tiny6, "rys", out, text=short_text, n_ctx=64, plots=True, rank="ppl")
    png, side = tmp_path / "r.rys.png", tmp_path / "r.rys.json"
    assert png in summary.plots and side in summary.plots and (tmp_path / "r.pareto.png") in summary.plots
    cellmap = json.loads(side.read_text())
    image = matplotlib.image.imread(png)
    lut = matplotlib.colormaps[cellmap["cmap"]](np.linspace(0, 1, 256))[:, :3]
    vmin, vmax = cellmap["vmin"], cellmap["vmax"]
    expected = {(r["params"]["i"], r["params"]["j"]): gain(r, "ppl") for r in _lines(out)[1:] if r["sweep"] == "rys"}
    assert len(expected) == N_TINY * (N_TINY + 1) // 2
    assert {(c["i"], c["j"]) for c in cellmap["cells"]} == set(expected)
    decoded = {}
    for c in cellmap["cells"]:
        rgb = image[c["py"], c["px"], :3]
        index = int(np.argmin(((lut - rgb) ** 2).sum(axis=1)))
        decoded[c["i"], c["j"]] = vmin + index / 255 * (vmax - vmin)
    step = (vmax - vmin) / 255
    for key, value in expected.items():
        assert decoded[key] == pytest.approx(value, abs=1.5 * step), key
    assert np.ptp(list(expected.values())) > 20 * step  # the cells differ: a mix-up would show


def test_prune_bar_chart_is_a_png(tiny6, short_text, tmp_path):
    summary = _scan(tiny6, "prune", tmp_path / "p.jsonl", text=short_text, n_ctx=64, plots=True)
    assert (tmp_path / "p.prune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tmp_path / "p.prune.png" in summary.plots
    umask = os.umask(0)
    os.umask(umask)
    for made in (tmp_path / "p.jsonl", tmp_path / "p.prune.png"):  # like any new file, not 0600
        assert made.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_without_matplotlib_the_scan_says_so(tiny6, short_text, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    summary = _scan(tiny6, "prune", tmp_path / "p.jsonl", text=short_text, n_ctx=64, plots=True)
    assert summary.plots == [] and "matplotlib is not installed" in summary.plot_note
    assert len(summary.rows) == N_TINY + 1


def test_cli_scan_and_top(tiny6, short_text, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    rc = cli.main(["scan", "-m", tiny6, "--sweep", "rys", "--range", "2-6", "--out", str(out), "--text",
                   str(short_text), "-c", "64", "-t", "1", "-q", "--no-plots", "--show", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"{out}: 11 order(s) scored" in printed
    rc = cli.main(["scan", "--top", "2", str(out), "--rank", "kl"])
    assert rc == 0
    printed = capsys.readouterr().out
    best = ranked(read_results(out)[1], "kl")
    lines = [line for line in printed.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 2
    assert lines[0].split()[-1] == best[0]["order"] == "0-5"  # least KL: the base order itself
    assert lines[1].split()[-1] == best[1]["order"]
    assert f'layer_order="{best[1]["order"]}"' in printed  # the best order other than the base


def test_cli_ctrl_c_keeps_finished_rows(tiny6, short_text, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.jsonl"
    append = results_mod.ResultsFile.append
    calls = []

    def append_then_interrupt(self, row):
        append(self, row)
        calls.append(row)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(results_mod.ResultsFile, "append", append_then_interrupt)
    rc = cli.main(["scan", "-m", tiny6, "--sweep", "prune", "--out", str(out), "--text", str(short_text),
                   "-c", "64", "-t", "1", "-q", "--no-plots"])
    assert rc == 130
    assert "interrupted: 3 finished row(s)" in capsys.readouterr().err
    assert read_results(out)[1] == calls


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error(tiny6, short_text, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ScanError, match="is empty"):
        _scan(tiny6, "rys", out, text=empty)
    tiny_text = tmp_path / "short.txt"
    tiny_text.write_text("Hi there.")
    with pytest.raises(ScanError, match="at least 32"):
        _scan(tiny6, "rys", out, text=tiny_text)
    with pytest.raises(ScanError, match="unknown sweep 'zigzag'"):
        _scan(tiny6, "zigzag", out, text=short_text)
    with pytest.raises(ScanError, match="unknown sweep option"):
        _scan(tiny6, "rys", out, text=short_text, strid=2)
    with pytest.raises(ScanError, match="needs probes"):
        _scan(tiny6, "rys", out, text=short_text, rank="probe")
    with pytest.raises(ScanError, match="model file not found"):
        _scan(str(tmp_path / "nope.gguf"), "rys", out, text=short_text)
    for line, message in [('{"prompt": "x"}', "missing \"answer\""),
                          ('{"answer": "x"}', "\"prompt\""),
                          ('{"prompt": "x", "choices": ["a", "b"], "label": 2}', "label"),
                          ('{"prompt": "x", "choices": ["a"], "label": 0}', "two or more"),
                          ('{"prompt": "x", "answer": ""}', "non-empty"),
                          ("not json", "not valid JSON")]:
        probes = tmp_path / "p.jsonl"
        probes.write_text('{"prompt": "a", "answer": "b"}\n' + line + "\n")
        with pytest.raises(ScanError, match=f"p.jsonl:2: .*{message}"):
            _scan(tiny6, "rys", out, text=short_text, probes=probes)
    probes.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(ScanError, match="at least 2 probe items"):
        _scan(tiny6, "rys", out, text=short_text, probes=probes, rank="probe", validate=1)
    assert not out.exists()  # nothing was written for refused input
    with pytest.raises(ScanError, match="tokenizes to nothing"):
        inputs.probe_seqs([inputs.ProbeItem(3, "q", answer="\u200b")], lambda s, bos: [1] if bos else [], 64)
    assert cli.main(["scan", "-m", tiny6, "--sweep", "zigzag", "--out", str(out)]) == 2
    assert "invalid choice: 'zigzag'" in capsys.readouterr().err
    assert cli.main(["scan", "-m", tiny6, "--out", str(out)]) == 2
    assert "needs --sweep" in capsys.readouterr().err


def test_model_that_refuses_orders(tmp_path, short_text):
    path = write_tiny(REFUSED_ARCH, tmp_path / "refused.gguf")
    with pytest.raises(ScanError, match="refuses layer orders.*do not support layer orders"):
        _scan(str(path), "prune", tmp_path / "r.jsonl", text=short_text, n_ctx=64)


def test_package_exports_scan():
    assert frankenllama.scan is scan and issubclass(frankenllama.ScanError, ValueError)
    assert len(TEXT.split()) > 450 and inputs.read_probes(inputs.example_probes_path())[0]
    assert SweepSpec("rys").header() == {"name": "rys", "stride": 1, "layer_range": None}
