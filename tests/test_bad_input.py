"""Bad input never takes the process down: every case raises an exception naming the problem, and a
valid model loads and runs afterwards in the same process.

Three ways an order reaches the library: ``frankenllama.Llama(layer_order=...)`` (validated in
Python first), a raw ``kv_overrides`` entry (only the C parser sees it), and the GGUF key
``<arch>.layer_order`` of the file itself.
"""
from __future__ import annotations

import functools
import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from frankenllama import LayerOrderError, Llama
from frankenllama.gguf_info import check_header
from helpers import load, scores_so_far
from tiny_model import rewrite_gguf

TOKENS = [1, 75, 108, 229, 153, 132]


_load = functools.partial(load, n_ctx=32)


def _check_alive(tiny) -> None:
    """The process survived: a valid model with an order loads and computes finite logits."""
    llm = _load(tiny.path, layer_order=[0, 1, 1, 2], logits_all=True)
    try:
        assert llm.layer_order == [0, 1, 1, 2]
        llm.eval(TOKENS)
        scores = scores_so_far(llm)
    finally:
        llm.close()
    assert scores.shape == (len(TOKENS), tiny.n_vocab)
    assert np.all(np.isfinite(scores))


# --------------------------------------------------------------------------- Python-side validation

MALFORMED = {
    "0-5;7": "the output reads 7",
    "0-5:7": "unexpected character ':'",
    "1,,2": "empty item",
    "": "empty layer order spec",
    "-1": "negative",
    "0--5": "single '-'",
    "a": "unexpected character 'a'",
}


@pytest.mark.parametrize("spec", list(MALFORMED))
def test_malformed_spec(tiny, spec):
    with pytest.raises(ValueError, match=MALFORMED[spec]):
        _load(tiny.path, layer_order=spec)
    _check_alive(tiny)


def test_out_of_range_smollm2(smollm2_path, tiny):
    with pytest.raises(ValueError, match=r"layer 30 is out of range for a model with 30 layers"):
        _load(smollm2_path, layer_order="0-30")
    _check_alive(tiny)


@pytest.mark.parametrize("order", ["4", [0, 4], [0, -1]])
def test_out_of_range_tiny(tiny, order):
    with pytest.raises(ValueError, match="out of range"):
        _load(tiny.path, layer_order=order)
    _check_alive(tiny)


@pytest.mark.parametrize("order, message", [
    ([], "at least one position"),
    ([0] * 513, "at most 512 positions"),
    (",".join(["0-3"] * 128) + ",0", "exceed 512 positions"),
    ([True, False], "must be an int"),
    ([0, 1.0], "must be an int"),
    (["0", "1"], "must be an int"),
])
def test_bad_order_values(tiny, order, message):
    with pytest.raises(ValueError, match=message):
        _load(tiny.path, layer_order=order)
    _check_alive(tiny)


def test_set_layer_order_bad_input(tiny):
    llm = _load(tiny.path, layer_order=[0, 1, 1, 2])
    try:
        with pytest.raises(ValueError, match="out of range"):
            llm.set_layer_order("0-9")
        with pytest.raises(ValueError, match=r"weight layer\(s\) 3 were not loaded"):
            llm.set_layer_order([3, 2, 1, 0])
        assert llm.layer_order == [0, 1, 1, 2]  # a refused order leaves the model as it was
    finally:
        llm.close()
    _check_alive(tiny)


# --------------------------------------------------------------------------- raw override (C parser only)

RAW = {
    "0-3;7": "reads position 7, which does not come before it",
    "0-3;": "does not name a position",
    "1,,2": "is empty",
    "": "the order is empty",
    " \t ": "the order is empty",
    "-1": "not an index or a range",
    "0--5": "not an index or a range",
    "a": "not an index or a range",
    "5-": "not an index or a range",
    "4": "out of range",
    "0-4": "out of range",
    "0000000001": "not an index or a range",  # 10 digits
    "1,": "is empty",
}


@pytest.mark.parametrize("spec", list(RAW))
def test_raw_override_rejected_by_c(tiny, spec):
    with pytest.raises(ValueError, match=RAW[spec]) as err:
        _load(tiny.path, kv_overrides={"llama.layer_order": spec})
    assert "layer_order:" in str(err.value)
    _check_alive(tiny)


def test_raw_override_out_of_range_smollm2(smollm2_path, tiny):
    with pytest.raises(ValueError, match=r"layer index 30 out of range, the model has 30 layers"):
        _load(smollm2_path, kv_overrides={"llama.layer_order": "0-30"})
    _check_alive(tiny)


def test_raw_override_too_many_positions(tiny):
    # 513 positions in one 127-byte-safe key on a 30-layer model would need a bigger model; on the tiny
    # model they take continuation keys: 128 x "0-3," + "0"
    items = ["0-3,"] * 128 + ["0"]
    pieces, cur = [], ""
    for item in items:
        if len(cur) + len(item) > 127:
            pieces.append(cur)
            cur = ""
        cur += item
    pieces.append(cur)
    overrides = {("llama.layer_order" if i == 0 else f"llama.layer_order.{i}"): p for i, p in enumerate(pieces)}
    with pytest.raises(ValueError, match="more than 512 positions"):
        _load(tiny.path, kv_overrides=overrides)
    _check_alive(tiny)


def test_raw_override_too_many_positions_one_key(smollm2_path, tiny):
    spec = ",".join(["0-29"] * 17) + ",0-2"  # 513 positions, 88 bytes
    with pytest.raises(ValueError, match="more than 512 positions"):
        _load(smollm2_path, kv_overrides={"llama.layer_order": spec})
    _check_alive(tiny)


def test_raw_override_128_bytes(tiny):
    spec = "0," * 63 + "00"  # exactly 128 bytes: fills llama.cpp's buffer with no room for the NUL
    assert len(spec.encode()) == 128
    with pytest.raises(ValueError, match=r"longer than 127 bytes, continue it in llama\.layer_order\.1"):
        _load(tiny.path, kv_overrides={"llama.layer_order": spec})
    _check_alive(tiny)


def test_raw_override_127_bytes_loads(tiny):
    """The boundary: 127 bytes are accepted (64 positions)."""
    spec = "0," * 63 + "0"
    assert len(spec.encode()) == 127
    llm = _load(tiny.path, kv_overrides={"llama.layer_order": spec})
    assert llm.layer_order == [0] * 64
    llm.close()


@pytest.mark.parametrize("overrides, missing", [
    ({"llama.layer_order": "0", "llama.layer_order.2": "1"}, "llama.layer_order.1"),  # .2 without .1
    ({"llama.layer_order.1": "0,1"}, "llama.layer_order"),  # a continuation with no first piece
    ({"llama.layer_order": "0,", "llama.layer_order.1": "1,", "llama.layer_order.3": "2"}, "llama.layer_order.2"),
])
def test_raw_override_non_contiguous_keys(tiny, overrides, missing):
    with pytest.raises(ValueError, match=f"is not contiguous, {missing} is missing"):
        _load(tiny.path, kv_overrides=overrides)
    _check_alive(tiny)


@pytest.mark.parametrize("value", [5, 1.5, True])
def test_raw_override_not_a_string(tiny, value):
    with pytest.raises(ValueError, match=r"override llama\.layer_order must be a string"):
        _load(tiny.path, kv_overrides={"llama.layer_order": value})
    _check_alive(tiny)


def test_raw_override_continuation_not_a_string(tiny):
    with pytest.raises(ValueError, match=r"override llama\.layer_order\.1 must be a string"):
        _load(tiny.path, kv_overrides={"llama.layer_order": "0,", "llama.layer_order.1": 1})
    _check_alive(tiny)


def test_layer_order_and_raw_override_conflict(tiny):
    with pytest.raises(ValueError, match="conflicts with kv_overrides"):
        _load(tiny.path, layer_order=[0, 1], kv_overrides={"llama.layer_order.1": "2"})
    _check_alive(tiny)


# --------------------------------------------------------------------------- the GGUF key


@pytest.fixture(scope="module")
def bad_files(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-gguf")
    files = {}
    # write_tiny_llama refuses out-of-range entries itself: add the key with gguf-py directly
    files["out-of-range"] = str(rewrite_gguf(tiny.path, out / "oor.gguf", extra=[
        ("llama.layer_order", [0, 9], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)]))
    files["negative"] = str(rewrite_gguf(tiny.path, out / "neg.gguf", extra=[
        ("llama.layer_order", [0, -1], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)]))
    files["float32"] = str(rewrite_gguf(tiny.path, out / "f32.gguf", extra=[
        ("llama.layer_order", [0.0, 1.0], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32)]))
    files["int-scalar"] = str(rewrite_gguf(tiny.path, out / "int.gguf", extra=[
        ("llama.layer_order", 2, gguf.GGUFValueType.INT32, None)]))
    files["bad-string"] = str(rewrite_gguf(tiny.path, out / "str.gguf", extra=[
        ("llama.layer_order", "0-9", gguf.GGUFValueType.STRING, None)]))
    files["too-long"] = str(rewrite_gguf(tiny.path, out / "long.gguf", extra=[
        ("llama.layer_order", [0] * 513, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)]))
    files["empty"] = str(_empty_array_file(tiny.path, out / "empty.gguf"))
    return files


def _empty_array_file(src: Path, dst: Path) -> Path:
    """gguf-py refuses to write an empty array: write [7] followed by a 4-byte string, then patch the
    bytes to an empty array followed by an 8-byte string (the file keeps its size and alignment)."""
    rewrite_gguf(src, dst, extra=[
        ("llama.layer_order", [7], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
        ("zz.pad", "abcd", gguf.GGUFValueType.STRING, None)])
    key = b"llama.layer_order"
    pad_key = struct.pack("<Q", 6) + b"zz.pad"
    before = (struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 5, 1) + struct.pack("<i", 7)
              + pad_key + struct.pack("<IQ", 8, 4) + b"abcd")
    after = (struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 5, 0)
             + pad_key + struct.pack("<IQ", 8, 8) + b"abcdabcd")
    assert len(before) == len(after)
    data = dst.read_bytes()
    assert data.count(before) == 1
    dst.write_bytes(data.replace(before, after))
    return dst


GGUF_CASES = {
    "out-of-range": r"layer index 9 out of range, the model has 4 layers",
    "negative": r"layer index -1 out of range",
    "float32": r"llama\.layer_order must be an int32 array or a string, not f32",
    "int-scalar": r"llama\.layer_order must be an int32 array or a string, not i32",
    "bad-string": r"layer index 9 out of range",
    "too-long": r"holds 513 positions, at most 512",
    "empty": r"the order is empty",
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_bad_gguf_layer_order(bad_files, tiny, case):
    with pytest.raises(ValueError, match=GGUF_CASES[case]):
        _load(bad_files[case])
    _check_alive(tiny)


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_override_beats_bad_gguf_layer_order(bad_files, tiny, case):
    """An explicit order replaces the file's, broken or not."""
    llm = _load(bad_files[case], layer_order=[2, 1])
    assert llm.layer_order == [2, 1]
    llm.close()


# --------------------------------------------------------------------------- unsupported architecture


def test_unsupported_architecture(tiny, tmp_path):
    """minimax-01 is refused by the C table (its attention slopes come from the layer index).  The
    refusal comes while reading hyper-parameters, before tensors, so the llama tiny file renamed to
    minimax-01 (plus the one key its hparams loader requires) is enough to reach it."""
    path = rewrite_gguf(tiny.path, tmp_path / "minimax.gguf", arch="minimax-01", extra=[
        ("minimax-01.residual_scale", 1.0, gguf.GGUFValueType.FLOAT32, None)])
    with pytest.raises(ValueError, match=r"minimax-01 models do not support layer orders yet: "
                                         r"its attention slopes are computed from the layer index"):
        _load(path, layer_order=[1, 0])
    with pytest.raises(ValueError, match="do not support layer orders"):
        _load(path, kv_overrides={"minimax-01.layer_order": "0,0"})
    _check_alive(tiny)


def test_refused_set_layer_order_names_the_problem_once(tmp_path, tiny):
    """The C log line is "llama_model_set_layer_order: layer_order: ...": the function name must not
    make the message read "layer_order: layer_order: ..."."""
    import tiny_archs

    path = tiny_archs.write_tiny(tiny_archs.REFUSED_ARCH, tmp_path / "refused.gguf", n_layer=4, seed=3)
    llm = _load(path)
    try:
        with pytest.raises(ValueError) as err:
            llm.set_layer_order([0, 0, 1, 2, 3])
    finally:
        llm.close()
    message = str(err.value)
    assert message.count("layer_order") == 1, message
    assert f"layer_order: {tiny_archs.REFUSED_ARCH} models do not support layer orders" in message
    _check_alive(tiny)


def test_log_errors_drop_the_c_function_name():
    from frankenllama._native import GGML_LOG_LEVEL_ERROR, log_errors

    records = [(GGML_LOG_LEVEL_ERROR, "llama_model_set_layer_order: layer_order: the order is empty\n"),
               (GGML_LOG_LEVEL_ERROR, "llama_model_load: error loading model: layer_order: item 0 is empty\n"),
               (GGML_LOG_LEVEL_ERROR, "layer_order: a message without a function name\n"),
               (GGML_LOG_LEVEL_ERROR - 1, "llama_model_loader: a warning\n")]
    assert log_errors(records) == ["layer_order: the order is empty",
                                   "error loading model: layer_order: item 0 is empty",
                                   "layer_order: a message without a function name"]


def test_lora_for_unloaded_layer_does_not_crash(tiny, tmp_path):
    """An adapter for the whole model, with an order that leaves a layer out (so it is not loaded):
    the adapter loads, its tensors for the unloaded layer are skipped (they would never run).
    Run in a subprocess: a crash here must not take the test session down."""
    import subprocess
    import sys
    import textwrap

    from lora_adapter import make_lora_tensors, write_lora

    adapter = write_lora(tmp_path / "lora-all.gguf", make_lora_tensors(tiny, [0, 1, 2, 3]))
    code = textwrap.dedent(f"""
        import numpy as np
        import frankenllama
        try:
            llm = frankenllama.Llama({str(tiny.path)!r}, layer_order=[0, 1, 1, 2], lora_path={str(adapter)!r},
                                     verbose=False, n_ctx=32, n_threads=1, logits_all=True)
        except ValueError as err:
            print("VALUEERROR", err)
        else:
            llm.eval({TOKENS!r})
            assert np.all(np.isfinite(np.array(llm.scores[: llm.n_tokens])))
            llm.close()
            print("LOADED")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit status {proc.returncode}; stderr tail:\n{proc.stderr[-2000:]}"
    assert "LOADED" in proc.stdout, proc.stdout
    _check_alive(tiny)


def test_lora_for_wrong_model_is_a_clean_error(tiny, tmp_path):
    """An adapter naming a layer the model does not have: ValueError, not the crash llama-cpp-python
    0.3.36 would run into (it registers the failed, NULL adapter)."""
    import subprocess
    import sys
    import textwrap

    from lora_adapter import make_lora_tensors, write_lora
    from tiny_model import write_tiny_llama

    deeper = write_tiny_llama(tmp_path / "deeper.gguf", n_layer=6, seed=1)
    adapter = write_lora(tmp_path / "lora-6.gguf", make_lora_tensors(deeper, [5]))
    code = textwrap.dedent(f"""
        import frankenllama
        try:
            frankenllama.Llama({str(tiny.path)!r}, lora_path={str(adapter)!r}, verbose=False, n_ctx=32)
        except ValueError as err:
            print("VALUEERROR", err)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit status {proc.returncode}; stderr tail:\n{proc.stderr[-2000:]}"
    assert "VALUEERROR failed to load the LoRA adapter" in proc.stdout, proc.stdout
    assert "does not exist in base model" in proc.stdout


# --------------------------------------------------------------------------- broken files


@pytest.fixture(scope="module")
def broken_files(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("broken")
    data = Path(tiny.path).read_bytes()
    rng = np.random.default_rng(0)
    files = {
        "random-bytes": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty-file": b"",
        "magic-only": data[:4],
        "truncated-header": data[:200],
        "truncated-kv": data[:len(data) // 50],
        "truncated-data": data[: len(data) // 2],
        "one-byte-short": data[:-1],
    }
    paths = {}
    for name, content in files.items():
        path = out / f"{name}.gguf"
        path.write_bytes(content)
        paths[name] = str(path)
    return paths


BROKEN = ["random-bytes", "empty-file", "magic-only", "truncated-header", "truncated-kv", "truncated-data",
          "one-byte-short"]


@pytest.mark.parametrize("name", BROKEN)
@pytest.mark.parametrize("with_order", [True, False])
def test_broken_file(broken_files, tiny, name, with_order):
    kw = {"layer_order": [0, 1]} if with_order else {}
    with pytest.raises(ValueError) as err:
        _load(broken_files[name], **kw)
    message = str(err.value)
    assert broken_files[name] in message or "GGUF" in message or "gguf" in message, message
    _check_alive(tiny)


@pytest.mark.parametrize("with_order", [True, False])
def test_nonexistent_path(tmp_path, tiny, with_order):
    kw = {"layer_order": "0-1"} if with_order else {}
    with pytest.raises((FileNotFoundError, ValueError), match="does not exist|not found"):
        _load(tmp_path / "missing.gguf", **kw)
    _check_alive(tiny)


def test_directory_as_path(tmp_path, tiny):
    with pytest.raises((FileNotFoundError, ValueError, IsADirectoryError)):
        _load(tmp_path, layer_order="0-1")
    _check_alive(tiny)


# --------------------------------------------------------------------------- headers llama.cpp aborts on


def _with_key(tiny, path: Path, key: str, value: int) -> Path:
    return rewrite_gguf(tiny.path, path, drop=(key,), extra=[(key, value, gguf.GGUFValueType.UINT32, None)])


@pytest.mark.parametrize("key, value", [
    ("llama.block_count", 0), ("llama.block_count", 513), ("llama.block_count", 2**32 - 1),
    ("llama.nextn_predict_layers", 5),
])
def test_check_header_refuses_what_llama_cpp_asserts_on(tiny, tmp_path, key, value):
    """llama.cpp would abort the process (GGML_ASSERT) loading these files; check_header says why."""
    path = _with_key(tiny, tmp_path / "bad.gguf", key, value)
    with pytest.raises(ValueError, match=rf"^{re.escape(f'{path} has {key} = {value}, but ')}") as err:
        check_header(path)
    assert not isinstance(err.value, LayerOrderError)
    with pytest.raises(ValueError, match=rf"{key} = {value}"):
        check_header(str(path))
    with pytest.raises(ValueError, match=rf"{key} = {value}"):
        _load(path, layer_order=[0])
    with pytest.raises(ValueError, match=rf"{key} = {value}"):
        _load(path)  # no order at all: llama.cpp would still abort the process
    _check_alive(tiny)


@pytest.mark.parametrize("overrides, named", [
    ({"llama.block_count": 0}, "llama.block_count = 0"),
    ({"qwen2.layer_order": "0-3"}, "qwen2.layer_order"),
    ({"llama.layer_order": "0,", "llama.layer_order.0": "1"}, "llama.layer_order.0"),
])
def test_llama_checks_overrides_before_loading(tiny, overrides, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        Llama(str(tiny.path), kv_overrides=overrides, verbose=False)
    _check_alive(tiny)


@pytest.mark.parametrize("overrides, named", [
    ({"llama.block_count": 0}, "kv_overrides sets llama.block_count = 0"),
    ({"llama.block_count": 600}, "kv_overrides sets llama.block_count = 600"),
    ({"llama.block_count": -1}, "kv_overrides sets llama.block_count = -1"),
    ({"llama.nextn_predict_layers": 5}, "kv_overrides sets llama.nextn_predict_layers = 5"),
    ({"llama.block_count": 2, "llama.nextn_predict_layers": 3}, "llama.nextn_predict_layers = 3"),
    ({"llama.block_count": 4.0}, "kv_overrides['llama.block_count'] must be an int, got 4.0"),
    ({"llama.block_count": True}, "kv_overrides['llama.block_count'] must be an int, got True"),
])
def test_check_header_applies_kv_overrides(tiny, overrides, named):
    with pytest.raises(ValueError) as err:
        check_header(tiny.path, overrides)
    assert named in str(err.value)
    assert "fix or remove the override" in str(err.value) or "must be an int" in str(err.value)


def test_check_header_accepts(tiny):
    info = check_header(tiny.path)
    assert (info.arch, info.n_layer, info.n_layer_nextn) == ("llama", 4, 0)
    assert check_header(tiny.path, {"llama.block_count": 512, "general.name": "x"}).n_layer == 512
    info = check_header(tiny.path, {"llama.nextn_predict_layers": 1, "llama.layer_order": "0-2"})
    assert (info.n_layer, info.n_layer_nextn) == (3, 1)


@pytest.mark.parametrize("overrides, key", [
    ({"qwen2.layer_order": "0-3"}, "qwen2.layer_order"),
    ({"llama.layer_order": "0,", "llama.layer_order.0": "1"}, "llama.layer_order.0"),
    ({"llama.layer_order": "0,", "llama.layer_order.1": "1,", "llama.layer_order.01": "2"}, "llama.layer_order.01"),
    ({"llama.layer_order": "0-5\x00junk"}, "llama.layer_order"),
])
def test_check_header_refuses_override_keys_llama_cpp_ignores(tiny, overrides, key):
    """Loaded as is, each of these runs something other than what was asked, without a word."""
    with pytest.raises(LayerOrderError, match=re.escape(repr(key))):
        check_header(tiny.path, overrides)


def test_check_header_missing_and_unreadable(tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ValueError, match=rf"^Model path does not exist: {re.escape(str(missing))}$"):
        check_header(missing)
    with pytest.raises(ValueError, match=rf"^Model path is not a readable file: {re.escape(str(tmp_path))}$"):
        check_header(tmp_path)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        check_header(corrupt)


@pytest.mark.parametrize("key", ["llama.layer_order\x00x", "llama.Layer_Order", "llama.layer_order ", " llama.layer_order"])
def test_override_keys_llama_cpp_would_misread_are_refused(tiny, key):
    with pytest.raises(LayerOrderError, match="kv_overrides key"):
        Llama(str(tiny.path), kv_overrides={key: "0,1"}, verbose=False)
    _check_alive(tiny)
