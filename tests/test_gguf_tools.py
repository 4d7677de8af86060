"""GGUF tools: stack fine-tunes into one file, materialize an order; atomic, streaming, clear errors."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from frankenllama import gguf_tools
from frankenllama.cli import main as cli_main
from frankenllama.gguf_tools import BLOCK_SOURCES_KEY, materialize, stack
from frankenllama.order import override_keys
from lowlevel import RawModel, identical, run
from tiny_model import write_tiny_llama

SEQS = [[1, 75, 108, 229, 153, 132, 119, 107, 104, 117], [1, 40, 41, 42]]


def _logits(path, order=None, mode="batch", seqs=SEQS):
    model = RawModel(path, kv_overrides=override_keys("llama", order) if order else None, n_threads=1)
    try:
        return run(model, seqs, mode), model.n_layer()
    finally:
        model.close()


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fine_tune(base: Path, out: Path, seed: int) -> Path:
    """A "fine-tune" of a tiny float32 model: same embeddings and head, every block perturbed."""
    reader = gguf.GGUFReader(base)
    writer = gguf.GGUFWriter(out, arch="llama")
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    rng = np.random.default_rng(seed)
    for tensor in reader.tensors:
        data = np.array(tensor.data, dtype=np.float32)
        if tensor.name.startswith("blk."):
            data = data + rng.normal(0, 0.05, data.shape).astype(np.float32)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def two_tunes(tmp_path_factory):
    out = tmp_path_factory.mktemp("tunes")
    a = write_tiny_llama(out / "a.gguf", n_layer=4, seed=11).path
    b = _fine_tune(a, out / "b.gguf", seed=22)
    stacked = out / "ab.gguf"
    stack([a, b], stacked, progress=False)
    return a, b, stacked


@pytest.mark.parametrize("mode", ["batch", "incremental"])
def test_stacked_file_runs_each_input(two_tunes, mode):
    a, b, stacked = two_tunes
    by_default, n = _logits(stacked, mode=mode)
    assert n == 4
    assert identical(by_default, _logits(a, mode=mode)[0])
    as_b, _ = _logits(stacked, [4, 5, 6, 7], mode=mode)
    assert identical(as_b, _logits(b, mode=mode)[0])
    assert not identical(by_default, as_b)


@pytest.mark.parametrize("mode", ["batch", "incremental"])
def test_mixed_order_matches_its_materialized_twin(two_tunes, tmp_path, mode):
    _, _, stacked = two_tunes
    mixed = [0, 5, 2, 7, 3]
    twin = tmp_path / "mixed.gguf"
    materialize(stacked, mixed, twin, progress=False)
    in_situ, n = _logits(stacked, mixed, mode=mode)
    assert n == len(mixed)
    assert identical(in_situ, _logits(twin, mode=mode)[0])


def test_stack_metadata(two_tunes):
    a, b, stacked = two_tunes
    reader = gguf.GGUFReader(stacked)
    assert reader.get_field("llama.block_count").contents() == 8
    assert list(reader.get_field("llama.layer_order").contents()) == [0, 1, 2, 3]
    sources = reader.get_field(BLOCK_SOURCES_KEY).contents()
    assert sources == [f"a.gguf:{i}" for i in range(4)] + [f"b.gguf:{i}" for i in range(4)]
    # tensors are copied byte for byte
    src = {t.name: t for t in gguf.GGUFReader(b).tensors}
    out = {t.name: t for t in reader.tensors}
    assert np.array_equal(np.asarray(out["blk.6.ffn_up.weight"].data), np.asarray(src["blk.2.ffn_up.weight"].data))


def test_smollm2_stacked_with_itself(smollm2_path, tmp_path):
    stacked = tmp_path / "smol2x.gguf"
    stack([smollm2_path, smollm2_path], stacked, progress=False)
    seqs = [[1, 504, 3575, 282, 4649, 314, 1345]]
    want, _ = _logits(smollm2_path, seqs=seqs)
    got, n = _logits(stacked, list(range(30, 60)), seqs=seqs)
    assert n == 30
    assert identical(got, want)


def test_materialize_is_byte_exact_for_quantized_blocks(smollm2_path, tmp_path):
    out = tmp_path / "swap.gguf"
    materialize(smollm2_path, "1,0,2-29", out, progress=False)
    src = {t.name: t for t in gguf.GGUFReader(smollm2_path).tensors}
    dst = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert dst["blk.0.attn_q.weight"].tensor_type == src["blk.1.attn_q.weight"].tensor_type
    assert np.asarray(dst["blk.0.attn_q.weight"].data).tobytes() == np.asarray(src["blk.1.attn_q.weight"].data).tobytes()
    assert gguf.GGUFReader(out).get_field(gguf_tools.SOURCE_ORDER_KEY).contents() == "1-0,2-29"


def test_mismatched_inputs(tmp_path, two_tunes, smollm2_path):
    a, _, _ = two_tunes
    deeper = write_tiny_llama(tmp_path / "deep.gguf", n_layer=6, seed=1).path
    wider = write_tiny_llama(tmp_path / "wide.gguf", n_layer=4, n_embd=96, n_head=6, seed=1).path
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match="4 vs 6 blocks|6 vs 4 blocks"):
        stack([a, deeper], out)
    with pytest.raises(ValueError, match="embedding_length|hyper-parameter"):
        stack([a, wider], out)
    with pytest.raises(ValueError, match="blocks|vocabulary|hyper-parameter"):
        stack([a, smollm2_path], out)
    with pytest.raises(ValueError, match="at least two"):
        stack([a], out)
    assert not out.exists()


def test_bad_specs_and_outputs(two_tunes, tmp_path):
    a, _, _ = two_tunes
    before = _sha(a)
    out = tmp_path / "out.gguf"
    for spec in ("0-9", "x", "", [0, -1]):
        with pytest.raises(ValueError):
            materialize(a, spec, out, progress=False)
    with pytest.raises(FileNotFoundError):
        materialize(a, [0, 1], tmp_path / "no" / "such" / "dir.gguf", progress=False)
    with pytest.raises(ValueError, match="overwrite the input"):
        materialize(a, [0, 1], a, progress=False)
    with pytest.raises(IsADirectoryError):
        materialize(a, [0, 1], tmp_path, progress=False)
    assert not out.exists()
    assert _sha(a) == before
    assert list(tmp_path.glob("*.part")) == []


@pytest.mark.parametrize("tool", ["materialize", "stack"])
def test_interrupted_write_leaves_nothing(two_tunes, tmp_path, monkeypatch, tool):
    a, b, _ = two_tunes
    hashes = (_sha(a), _sha(b))
    calls = {"n": 0}
    real = gguf.GGUFWriter.write_tensor_data

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    out = tmp_path / "out.gguf"
    with pytest.raises(KeyboardInterrupt):
        if tool == "materialize":
            materialize(a, [0, 1, 1, 2], out, progress=False)
        else:
            stack([a, b], out, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either
    assert (_sha(a), _sha(b)) == hashes


def test_killed_process_leaves_no_output(smollm2_path, tmp_path):
    """SIGKILL in the middle of a write: nothing appears under the output name, the input is intact."""
    out = tmp_path / "killed.gguf"
    before = _sha(smollm2_path)
    code = textwrap.dedent(f"""
        from frankenllama.gguf_tools import materialize
        materialize({smollm2_path!r}, "0-29,0-29,0-29,0-29", {str(out)!r}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.suffix == ".part" and p.stat().st_size > 1 << 20
                                             for p in tmp_path.iterdir()):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert _sha(smollm2_path) == before


def test_cli_stack_and_materialize(two_tunes, tmp_path, capsys):
    a, b, _ = two_tunes
    out = tmp_path / "cli-ab.gguf"
    assert cli_main(["stack", str(a), str(b), "-o", str(out), "-q"]) == 0
    assert "blocks 4-7" in capsys.readouterr().out
    assert cli_main(["stack", str(a), str(b), "-o", str(out), "-q"]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    twin = tmp_path / "cli-twin.gguf"
    assert cli_main(["materialize", str(out), "--layer-order", "4-7", "-o", str(twin), "-q"]) == 0
    assert identical(_logits(twin)[0], _logits(b)[0])


@pytest.mark.parametrize("model", ["smollm2", "gemma3", "tiny"])
def test_bulk_reader_reads_what_gguf_py_reads(model, smollm2_path, gemma3_path, tiny):
    """gguf_tools reads arrays in bulk; every field and tensor must equal gguf-py's own reading."""
    path = {"smollm2": smollm2_path, "gemma3": gemma3_path, "tiny": str(tiny.path)}[model]
    ours = gguf_tools.ModelFile(path).reader
    theirs = gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        assert ours.fields[key].contents() == field.contents(), key
        assert ours.fields[key].types[0] == field.types[0], key
    assert [(t.name, t.tensor_type, t.data_offset) for t in ours.tensors] == \
           [(t.name, t.tensor_type, t.data_offset) for t in theirs.tensors]
