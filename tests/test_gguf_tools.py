"""GGUF tools: stack fine-tunes into one file, materialize an order; atomic, streaming, clear errors."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import re
import signal
import stat
import struct
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
from frankenllama.recipes import resolve, resolve_program
from lowlevel import RawModel, identical, run
from tiny_model import write_gguf, write_tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from gguf_tools_bench import run_child, write_synthetic_model  # noqa: E402

SEQS = [[1, 75, 108, 229, 153, 132, 119, 107, 104, 117], [1, 40, 41, 42]]


def _logits(path, order=None, mode="batch", seqs=SEQS):
    with RawModel(path, kv_overrides=override_keys("llama", order) if order else None, n_threads=1) as model:
        return run(model, seqs, mode), model.n_layer()


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
    write_gguf(writer)
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
    real = gguf_tools._Output.copy

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gguf_tools._Output, "copy", failing)
    out = tmp_path / "out.gguf"
    with pytest.raises(KeyboardInterrupt):
        if tool == "materialize":
            materialize(a, [0, 1, 1, 2], out, progress=False)
        else:
            stack([a, b], out, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either
    assert (_sha(a), _sha(b)) == hashes


# A writer child that sleeps 10 ms before copying each tensor, so that a signal surely arrives in
# the middle of its tensor data.
SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from frankenllama import gguf_tools
    real = gguf_tools._Output.copy
    def slow(*args):
        time.sleep(0.01)
        return real(*args)
    gguf_tools._Output.copy = slow
    gguf_tools.materialize(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
""")


def _parts(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".part"))


def _start_slow_writer(model: str, order: str, out: Path) -> subprocess.Popen:
    """Start a slow materialize and return once it is copying tensor data (its part file is > 4 MiB)."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, model, order, str(out)])
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if any(p.stat().st_size > 4 << 20 for p in _parts(out.parent)):
            return proc
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"the writer did not get to its tensor data (exit status {proc.poll()})")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signal_removes_the_part_and_keeps_the_target(smollm2_path, tmp_path, signum):
    """SIGTERM/SIGHUP (our handler) and SIGINT (Python's KeyboardInterrupt) mid-write: no part, target intact."""
    out = tmp_path / "model.gguf"
    out.write_bytes(b"the previous model")
    out.chmod(0o640)
    before = _sha(smollm2_path)
    proc = _start_slow_writer(smollm2_path, "0-29,0-29", out)
    proc.send_signal(signum)
    proc.wait(timeout=60)
    assert proc.returncode == -signum  # the process still ends by that signal
    assert _parts(tmp_path) == []
    assert out.read_bytes() == b"the previous model"
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert _sha(smollm2_path) == before


def test_sigkill_leaves_a_part_that_the_next_run_removes(smollm2_path, tmp_path):
    """Nothing runs on SIGKILL: the part stays, and the next write of the same output removes it (only it)."""
    out = tmp_path / "killed.gguf"
    before = _sha(smollm2_path)
    proc = _start_slow_writer(smollm2_path, "0-29,0-29", out)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert _sha(smollm2_path) == before
    [stale] = _parts(tmp_path)
    assert re.fullmatch(rf"\.killed\.gguf\.{proc.pid}\.[0-9a-f]{{8}}\.part", stale.name)

    dead = proc.pid  # reaped above: no process has this ID now
    kept = [tmp_path / f".killed.gguf.{os.getpid()}.0123abcd.part",  # a running writer (this process)
            tmp_path / f".killed.gguf.{dead}.4567abcd.part",  # locked below: a writer in another PID namespace
            tmp_path / f".other.gguf.{dead}.0123abcd.part",  # another output's
            tmp_path / f".killed.gguf.{dead}.part",  # not the pattern
            tmp_path / f"killed.gguf.{dead}.0123abcd.part",
            tmp_path / f".killed.gguf.{dead}.0123ABCD.part"]
    for path in kept:
        path.write_bytes(b"x")
    link = tmp_path / f".killed.gguf.{dead}.89abcdef.part"  # not a regular file
    link.symlink_to(kept[2])
    folder = tmp_path / f".killed.gguf.{dead}.fedcba98.part"
    folder.mkdir()
    with open(kept[1], "rb") as locked:
        fcntl.flock(locked, fcntl.LOCK_EX)
        materialize(smollm2_path, "0-3", out, progress=False)
    assert out.exists() and not stale.exists()
    assert all(p.exists() for p in kept) and link.is_symlink() and folder.is_dir()


def test_signal_handlers_are_restored(two_tunes, tmp_path, monkeypatch):
    """Our handler is installed only where the default action would kill the process, and only while writing."""
    a, _, _ = two_tunes
    seen = []
    real = gguf_tools._Output.write

    def spy(self, data):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real(self, data)

    monkeypatch.setattr(gguf_tools._Output, "write", spy)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        materialize(a, [0, 1], tmp_path / "one.gguf", progress=False)
        assert seen[0] not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

        def mine(signum, frame):
            pass

        signal.signal(signal.SIGTERM, mine)
        seen.clear()
        materialize(a, [0, 1], tmp_path / "two.gguf", progress=False)
        assert set(seen) == {mine}
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outputs_that_are_not_regular_files_are_refused(two_tunes, tmp_path, capsys):
    """A FIFO, or a link to one or to a device, is refused before anything is written, and left as it was."""
    a, b, _ = two_tunes
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    to_fifo = tmp_path / "to-fifo.gguf"
    to_fifo.symlink_to(fifo)
    to_null = tmp_path / "to-null.gguf"
    to_null.symlink_to("/dev/null")
    for target in (fifo, to_fifo, to_null):
        with pytest.raises(ValueError, match="FIFO|character device"):
            materialize(a, [0, 1], target, progress=False)
        with pytest.raises(ValueError, match="refusing to replace it"):
            stack([a, b], target, progress=False)
        with pytest.raises(ValueError, match="not a regular file"):
            with gguf_tools.atomic_output(target):
                pytest.fail("atomic_output accepted a FIFO or a device")
        assert cli_main(["materialize", str(a), "--layer-order", "0,1", "-o", str(target), "-f", "-q"]) == 2
        assert "not a regular file; refusing to replace it" in capsys.readouterr().err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert os.readlink(to_fifo) == str(fifo) and os.readlink(to_null) == "/dev/null"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.gguf", "to-fifo.gguf", "to-null.gguf"]


def test_dev_null_is_refused():
    """The check alone (it writes nothing), on the real /dev/null: `-o /dev/null -f` as root must not replace it."""
    with pytest.raises(ValueError, match="/dev/null is a character device, not a regular file"):
        gguf_tools._check_output(Path("/dev/null"), [])


def test_permissions(two_tunes, tmp_path):
    """A new file gets 0666 minus the umask; an overwritten file keeps its permission bits."""
    a, _, _ = two_tunes
    old_umask = os.umask(0o027)
    try:
        materialize(a, [0, 1], tmp_path / "new.gguf", progress=False)
        assert stat.S_IMODE((tmp_path / "new.gguf").stat().st_mode) == 0o640
        for mode in (0o604, 0o444):
            target = tmp_path / f"old-{mode:o}.gguf"
            target.write_bytes(b"old")
            target.chmod(mode)
            materialize(a, [0, 1], target, progress=False)
            assert stat.S_IMODE(target.stat().st_mode) == mode
            assert target.read_bytes() == (tmp_path / "new.gguf").read_bytes()
    finally:
        os.umask(old_umask)
    assert _parts(tmp_path) == []


def test_changed_source_is_refused(two_tunes, tmp_path, monkeypatch):
    """A source that changes between reading its header and copying its tensors is an error, not a garbled file."""
    a, _, _ = two_tunes
    src = tmp_path / "src.gguf"
    src.write_bytes(a.read_bytes())

    def touching_resolve(*args, **kwargs):
        os.utime(src, ns=(0, 0))
        return resolve_program(*args, **kwargs)

    monkeypatch.setattr(gguf_tools, "resolve_program", touching_resolve)
    with pytest.raises(ValueError, match="changed on disk"):
        materialize(src, [0, 1], tmp_path / "out.gguf", progress=False)
    assert _parts(tmp_path) == [] and not (tmp_path / "out.gguf").exists()


def test_source_written_during_the_copy_is_refused(two_tunes, tmp_path, monkeypatch):
    """A source that changes while its tensors are copied (after the copy began) is an error too."""
    a, _, _ = two_tunes
    src = tmp_path / "src.gguf"
    src.write_bytes(a.read_bytes())
    copy = gguf_tools._Output.copy

    def copy_then_touch(self, *args):
        copy(self, *args)
        os.utime(src, ns=(0, 0))

    monkeypatch.setattr(gguf_tools._Output, "copy", copy_then_touch)
    with pytest.raises(ValueError, match="changed on disk while it was being copied"):
        materialize(src, [0, 1], tmp_path / "out.gguf", progress=False)
    assert _parts(tmp_path) == [] and not (tmp_path / "out.gguf").exists()


def test_in_place_rewrite_keeping_size_and_mtime_is_refused(two_tunes, tmp_path, monkeypatch):
    """`rsync --inplace -t` style: same size, mtime put back; the inode's ctime still tells."""
    a, _, _ = two_tunes
    src = tmp_path / "src.gguf"
    src.write_bytes(a.read_bytes())
    copy = gguf_tools._Output.copy

    def copy_then_rewrite(self, *args):
        copy(self, *args)
        st = os.stat(src)
        with open(src, "r+b") as f:
            f.seek(st.st_size - 4)
            f.write(b"\x00\x01\x02\x03")
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))

    monkeypatch.setattr(gguf_tools._Output, "copy", copy_then_rewrite)
    with pytest.raises(ValueError, match="changed on disk"):
        materialize(src, [0, 1], tmp_path / "out.gguf", progress=False)
    assert _parts(tmp_path) == [] and not (tmp_path / "out.gguf").exists()


def test_output_names_up_to_the_file_system_limit(two_tunes, tmp_path):
    """A 255-byte output name works (its temporary file gets a shortened name), and a stale
    temporary file of that name is cleaned up by the next write."""
    a, _, _ = two_tunes
    out = tmp_path / ("m" * 250 + ".gguf")
    materialize(a, [0, 1], out, progress=False)
    assert out.is_file() and _parts(tmp_path) == []
    stem = gguf_tools._part_stem(out)
    assert len(stem.encode()) < 200
    stale = tmp_path / f".{stem}.999999999.0123abcd.part"
    stale.write_bytes(b"x")
    materialize(a, [1, 0], out, progress=False)
    assert not stale.exists()


def test_nested_arrays_are_refused(tmp_path):
    """llama.cpp refuses arrays of arrays; a file nesting them deeply is a ValueError, not a RecursionError."""
    path = tmp_path / "nested.gguf"
    kv = b"".join([struct.pack("<Q", 4), b"deep", struct.pack("<I", 9)]
                  + [struct.pack("<IQ", 9, 1)] * 5000 + [struct.pack("<IQ", 4, 0)])
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv)
    with pytest.raises(ValueError, match="nested arrays"):
        gguf_tools.ModelFile(path)


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


# ---------------------------------------------------------------- byte identity with gguf-py

_READERS: dict[str, gguf.GGUFReader] = {}


def _reader(path) -> gguf.GGUFReader:
    if str(path) not in _READERS:
        _READERS[str(path)] = gguf.GGUFReader(path)
    return _READERS[str(path)]


def _fields(reader: gguf.GGUFReader):
    """(key, value, type, item type) of every stored field, as the previous implementation copied them."""
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        yield field.name, field.contents(), field.types[0], sub_type


def _blocks(reader: gguf.GGUFReader, layer: int, position: int):
    for t in reader.tensors:
        match = re.match(r"blk\.(\d+)\.(.+)$", t.name)
        if match and int(match.group(1)) == layer:
            yield t, f"blk.{position}.{match.group(2)}"


def _gguf_py_write(out: Path, reader: gguf.GGUFReader, arch: str, kv: list, tensors: list) -> None:
    """The slow way: every value decoded and re-packed by GGUFWriter, tensors through numpy."""
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    for key, value, value_type, sub_type in kv:
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    for t, name in tensors:
        writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, _ in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


def _reference_materialize(path, spec, out: Path) -> None:
    """materialize as the previous implementation wrote it, with gguf-py's reader and writer."""
    reader, model = _reader(path), gguf_tools.ModelFile(path)
    arch, order, swa = model.arch, resolve(spec, model.n_layer), model.swa_flags()
    runs_swa = swa is not None and any(swa[il] for il in order)
    dropped = {f"{arch}.block_count", f"{arch}.layer_order", f"{arch}.attention.sliding_window_pattern",
               gguf_tools.SOURCE_ORDER_KEY} | (set() if runs_swa else {f"{arch}.attention.sliding_window"})
    kv = []
    for key, value, value_type, sub_type in _fields(reader):
        if key in dropped:
            continue
        if sub_type is not None and key.startswith(f"{arch}.") and len(value) == model.n_layer:
            value = [value[il] for il in order]
        kv.append((key, value, value_type, sub_type))
    kv.append((f"{arch}.block_count", len(order), gguf.GGUFValueType.UINT32, None))
    if runs_swa:
        kv.append((f"{arch}.attention.sliding_window_pattern", [swa[il] for il in order],
                   gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL))
    kv.append((gguf_tools.SOURCE_ORDER_KEY, gguf_tools.format_spec(order), gguf.GGUFValueType.STRING, None))
    tensors = [(t, t.name) for t in reader.tensors if not t.name.startswith("blk.")]
    for pos, il in enumerate(order):
        tensors += _blocks(reader, il, pos)
    _gguf_py_write(out, reader, arch, kv, tensors)


def _reference_stack(paths, out: Path, base: int) -> None:
    """stack as the previous implementation wrote it, with gguf-py's reader and writer (inputs that
    store no order of their own)."""
    readers, models = [_reader(p) for p in paths], [gguf_tools.ModelFile(p) for p in paths]
    arch, n_layer = models[0].arch, models[0].n_layer
    dropped = {f"{arch}.block_count", f"{arch}.layer_order", f"{arch}.attention.sliding_window_pattern",
               BLOCK_SOURCES_KEY, gguf_tools.SOURCE_ORDER_KEY}
    kv = []
    for key, value, value_type, sub_type in _fields(readers[base]):
        if key in dropped:
            continue
        if sub_type is not None and key.startswith(f"{arch}.") and len(value) == n_layer:
            value = [v for r in readers for v in r.get_field(key).contents()]
        kv.append((key, value, value_type, sub_type))
    kv.append((f"{arch}.block_count", n_layer * len(paths), gguf.GGUFValueType.UINT32, None))
    # the base input's blocks (the previous implementation took input 0's, whatever the base)
    base_order = [base * n_layer + il for il in range(n_layer)]
    kv.append((f"{arch}.layer_order", base_order, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32))
    if models[0].swa_flags() is not None:
        kv.append((f"{arch}.attention.sliding_window_pattern", [f for m in models for f in m.swa_flags()],
                   gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL))
    kv.append((BLOCK_SOURCES_KEY, [f"{Path(p).name}:{il}" for p in paths for il in range(n_layer)],
               gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING))
    tensors = [(t, t.name) for t in readers[base].tensors if not t.name.startswith("blk.")]
    for k, reader in enumerate(readers):
        for il in range(n_layer):
            tensors += _blocks(reader, il, k * n_layer + il)
    _gguf_py_write(out, readers[base], arch, kv, tensors)


def _assert_same_file(ours: Path, reference: Path) -> None:
    assert ours.stat().st_size == reference.stat().st_size
    assert _sha(ours) == _sha(reference), "the output differs from what gguf-py writes"


@pytest.mark.parametrize("case", ["smollm2 materialize", "gemma3 materialize", "gemma3 materialize no-swa",
                                  "smollm2 stack", "gemma3 stack base=1"])
def test_outputs_are_byte_identical_to_gguf_py(case, smollm2_path, gemma3_path, tmp_path):
    """The fast path writes exactly the bytes that gguf-py's GGUFReader + GGUFWriter wrote before it."""
    model = smollm2_path if case.startswith("smollm2") else gemma3_path
    ours, reference = tmp_path / "ours.gguf", tmp_path / "reference.gguf"
    if "materialize" in case:
        spec = {"smollm2": "1,0,2-29,8-22", "gemma3": "0-12,4-17"}[case.split()[0]]
        spec = "5,11" if "no-swa" in case else spec  # runs only dense layers: written as a non-SWA model
        materialize(model, spec, ours, progress=False)
        _reference_materialize(model, spec, reference)
    else:
        base = 1 if "base=1" in case else 0
        stack([model, model], ours, base=base, progress=False)
        _reference_stack([model, model], reference, base)
    _assert_same_file(ours, reference)
    ours.unlink()  # hundreds of MB each: don't leave them in pytest's kept temporary folders
    reference.unlink()


def _write_small_model(path: Path, *, endianess=gguf.GGUFEndian.LITTLE, alignment: int | None = None) -> Path:
    """A 3-block llama file with F32, F16 and Q8_0 tensors, a per-layer array and a float."""
    rng = np.random.default_rng(3)
    writer = gguf.GGUFWriter(path, arch="llama", endianess=endianess)
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_block_count(3)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_key_value("llama.attention.head_count_kv", [1, 2, 3], gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.UINT32)
    writer.add_token_list(["a", "bb", "ccc"])
    writer.add_tensor("token_embd.weight", rng.normal(size=(3, 40)).astype(np.float32))
    for il in range(3):
        writer.add_tensor(f"blk.{il}.attn_norm.weight", rng.normal(size=40).astype(np.float32))
        writer.add_tensor(f"blk.{il}.ffn_up.weight", rng.normal(size=(5, 40)).astype(np.float16))
        q8 = rng.integers(0, 256, size=(2, 34 * 2), dtype=np.uint8)  # 2 rows of 64 Q8_0 values
        writer.add_tensor(f"blk.{il}.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    write_gguf(writer)
    return path


@pytest.mark.parametrize("kind", ["big-endian", "alignment 64"])
def test_big_endian_and_custom_alignment(kind, tmp_path):
    """Byte order and general.alignment are kept; tensors land where gguf-py's reader looks for them."""
    src = tmp_path / "src.gguf"
    if kind == "big-endian":
        _write_small_model(src, endianess=gguf.GGUFEndian.BIG)
    else:
        _write_small_model(src, alignment=64)
    ours, reference = tmp_path / "ours.gguf", tmp_path / "reference.gguf"
    materialize(src, [2, 0, 0], ours, progress=False)
    _reference_materialize(src, [2, 0, 0], reference)
    _assert_same_file(ours, reference)
    source = {t.name: t for t in gguf.GGUFReader(src).tensors}
    written = gguf.GGUFReader(ours)
    assert written.get_field("llama.attention.head_count_kv").contents() == [3, 1, 1]
    for t in written.tensors:
        if kind == "alignment 64":
            assert t.data_offset % 64 == 0
        name = re.sub(r"^blk\.(\d)", lambda m: f"blk.{[2, 0, 0][int(m.group(1))]}", t.name)
        assert np.asarray(t.data).tobytes() == np.asarray(source[name].data).tobytes(), t.name
    stack([src, src], tmp_path / "stacked.gguf", progress=False)
    _reference_stack([src, src], tmp_path / "stacked-reference.gguf", 0)
    _assert_same_file(tmp_path / "stacked.gguf", tmp_path / "stacked-reference.gguf")


@pytest.mark.parametrize("path", ["default", "kernel", "sendfile", "buffered fallback", "buffered"])
def test_copy_paths_write_the_same_bytes(path, two_tunes, tmp_path, monkeypatch):
    """Every way of copying writes the same bytes; the kernel copies only ranges aligned alike in a page.

    "kernel": every range counts as aligned; "sendfile": copy_file_range is unsupported here;
    "buffered fallback": so is sendfile; "buffered": no range counts as aligned.
    """
    a, b, stacked = two_tunes
    calls: dict[str, list] = {"copy_file_range": [], "sendfile": [], "pread": []}

    def spy(name, fail_with=None):
        real = getattr(os, name)

        def call(*args):
            if name == "copy_file_range":
                src, dst, _, offset = args
            elif name == "sendfile":
                dst, src, offset, _ = args
            else:
                src, _, offset = args
                dst = None
            calls[name].append(None if dst is None else (offset - os.lseek(dst, 0, os.SEEK_CUR)) % mmap.PAGESIZE)
            if fail_with:
                raise OSError(fail_with, f"no {name} here")
            return real(*args)
        monkeypatch.setattr(os, name, call)

    spy("copy_file_range", fail_with=errno.EXDEV if path in ("sendfile", "buffered fallback") else None)
    spy("sendfile", fail_with=errno.ENOSYS if path == "buffered fallback" else None)
    spy("pread")
    alignment = {"default": mmap.PAGESIZE, "buffered": 1 << 62}.get(path, 1)
    monkeypatch.setattr(gguf_tools, "_KERNEL_COPY_ALIGNMENT", alignment)
    out = tmp_path / "out.gguf"
    stack([a, b], out, progress=False)
    assert out.read_bytes() == stacked.read_bytes()
    kernel = calls["copy_file_range"] + calls["sendfile"]
    assert all(misalignment % alignment == 0 for misalignment in kernel)
    if path == "default":
        assert calls["pread"], "the tiny model's tensors should not all be aligned alike"
    elif path == "kernel":
        assert calls["copy_file_range"] and not calls["sendfile"] and not calls["pread"]
    elif path in ("sendfile", "buffered fallback"):
        assert len(calls["copy_file_range"]) == 1  # tried once, then not again for this output
        assert bool(calls["sendfile"]) and (len(calls["sendfile"]) == 1) == (path == "buffered fallback")
        assert bool(calls["pread"]) == (path == "buffered fallback")
    else:
        assert not kernel and calls["pread"]


def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    """Peak RSS of a materialize process on a 256 MiB model: within 64 MiB of an empty interpreter.

    The previous implementation read tensors through a memory map, and its RSS grew by the model size.
    """
    src = write_synthetic_model(tmp_path / "synthetic.gguf", 256 << 20, n_layer=8, n_vocab=1000)
    empty = min(run_child("pass")["rss_mib"] for _ in range(2))
    used = run_child("materialize", str(src), "0-7,0-7", str(tmp_path / "out.gguf"))["rss_mib"]
    assert (tmp_path / "out.gguf").stat().st_size > src.stat().st_size
    assert used - empty <= 64, f"peak RSS {used:.1f} MiB, {used - empty:.1f} MiB above an empty interpreter"
    for path in tmp_path.iterdir():
        path.unlink()


# ---------------------------------------------------------------- the header index

@pytest.mark.parametrize("model", ["smollm2", "gemma3", "tiny"])
def test_index_reads_what_gguf_py_reads(model, smollm2_path, gemma3_path, tiny):
    """gguf_tools indexes the header itself; every field and tensor must equal gguf-py's reading."""
    path = {"smollm2": smollm2_path, "gemma3": gemma3_path, "tiny": str(tiny.path)}[model]
    ours = gguf_tools.ModelFile(path)
    theirs = _reader(path)
    assert list(ours.fields) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key, field in ours.fields.items():
        assert field.contents() == theirs.fields[key].contents(), key
        assert field.type == theirs.fields[key].types[0], key
    assert [(t.name, t.tensor_type, t.data_offset, t.n_bytes, t.shape) for t in ours.tensors] == \
           [(t.name, t.tensor_type, t.data_offset, int(t.n_bytes), tuple(int(d) for d in t.shape))
            for t in theirs.tensors]


def test_index_of_a_big_endian_file(tmp_path):
    src = _write_small_model(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG)
    ours, theirs = gguf_tools.ModelFile(src), gguf.GGUFReader(src)
    assert ours.byte_order == ">"
    for key, field in ours.fields.items():
        assert field.contents() == theirs.fields[key].contents(), key
    assert [t.data_offset for t in ours.tensors] == [t.data_offset for t in theirs.tensors]


def test_truncated_files_are_refused(tiny, tmp_path):
    data = tiny.path.read_bytes()
    for size in (10, 2000, len(data) - 1):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ValueError, match="not a readable GGUF file"):
            materialize(cut, [0], tmp_path / "out.gguf", progress=False)
    assert list(tmp_path.glob("out*")) == []


def test_stack_runs_as_the_base_input_in_its_stored_order(tmp_path):
    """Reproduction: a base input that stores its own order was stacked with 0..N-1 while the CLI
    said the result runs as that input."""
    a = write_tiny_llama(tmp_path / "a.gguf", n_layer=4, seed=31, layer_order=[0, 2, 2, 1])
    b = write_tiny_llama(tmp_path / "b.gguf", n_layer=4, seed=32)
    for base, want in ((0, [0, 2, 2, 1]), (1, [4, 5, 6, 7])):
        out = tmp_path / f"ab{base}.gguf"
        stack([a.path, b.path], out, base=base, progress=False)
        assert list(gguf.GGUFReader(out).get_field("llama.layer_order").contents()) == want
