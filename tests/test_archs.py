"""Layer orders on every architecture family the project supports, on tiny random models.

For qwen2, qwen3, gemma2 (sliding-window layers), phi3, mamba (recurrent) and jamba (hybrid:
attention + Mamba layers) -- llama and gemma3 are covered by test_materialized.py:

* the identity order computes exactly what no order does;
* an order in situ computes exactly what the same order materialized into a new file does, in one
  batch and token by token (the latter through each position's own KV cache / recurrent state);
* the comparison can fail: two different orders give different logits.

And an architecture the patched llama.cpp refuses to re-order fails to load with a clear error.
All comparisons are bit-identical (np.array_equal), with two sequences decoded together.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import frankenllama
from frankenllama.gguf_tools import materialize
from frankenllama.order import override_keys
from helpers import raw_logits
from lowlevel import RawModel, assert_identical
from tiny_archs import ARCHS, REFUSED_ARCH, write_tiny

N_LAYER = 4
N_CTX = 64
ORDERS = {
    "repeated": [0, 1, 2, 1, 2, 3],
    "reversed": [3, 2, 1, 0],
    "pruned": [0, 2],  # gemma2: sliding-window layers only
}
# per architecture: orders replacing or adding to ORDERS
ARCH_ORDERS = {
    "gemma2": {"full-attention-only": [1, 3]},  # no sliding-window layer runs
    # jamba's even layers are Mamba layers, odd ones attention layers: [0, 2] would run Mamba layers
    # only, which llama.cpp cannot run (see test_jamba_single_kind_order_does_not_crash)
    "jamba": {"pruned": [0, 3]},
}
CASES = [(arch, name) for arch in ARCHS for name in {**ORDERS, **ARCH_ORDERS.get(arch, {})}]
MODES = ["batch", "incremental"]

_rng = np.random.default_rng(7)
# BOS + byte tokens; longer than gemma2's 4-token sliding window and Mamba's 4-wide convolution
SEQS = [[1, *map(int, _rng.integers(3, 259, 13))], [1, *map(int, _rng.integers(3, 259, 6))]]


def _order(arch: str, name: str) -> list[int]:
    return {**ORDERS, **ARCH_ORDERS.get(arch, {})}[name]


def _logits(path, mode: str, kv_overrides=None) -> list[np.ndarray]:
    # one thread: the models are tiny, and busy-waiting threads on shared cores cost seconds
    return raw_logits(path, SEQS, mode, kv_overrides=kv_overrides, n_ctx=N_CTX, n_threads=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("tiny-archs")
    return {arch: str(write_tiny(arch, out / f"{arch}.gguf", n_layer=N_LAYER, seed=3))
            for arch in (*ARCHS, REFUSED_ARCH)}


@pytest.fixture(scope="module")
def twins(models, tmp_path_factory) -> dict[tuple[str, str], str]:
    out = tmp_path_factory.mktemp("tiny-arch-twins")
    paths = {}
    for arch, name in CASES:
        path = out / f"{arch}-{name}.gguf"
        assert materialize(models[arch], _order(arch, name), path, progress=False) == _order(arch, name)
        paths[arch, name] = str(path)
    return paths


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_order_equals_no_order(models, arch, mode):
    identity = _logits(models[arch], mode, override_keys(arch, list(range(N_LAYER))))
    assert_identical(identity, _logits(models[arch], mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch,name", CASES)
def test_in_situ_equals_materialized(models, twins, arch, name, mode):
    in_situ = _logits(models[arch], mode, override_keys(arch, _order(arch, name)))
    assert_identical(in_situ, _logits(twins[arch, name], mode))


@pytest.mark.parametrize("arch", ARCHS)
def test_different_orders_differ(models, twins, arch):
    """The comparisons above can fail: another order gives other logits."""
    reversed_ = _logits(models[arch], "batch", override_keys(arch, ORDERS["reversed"]))
    for other in (_logits(models[arch], "batch"), _logits(twins[arch, "repeated"], "batch")):
        for x, y in zip(reversed_, other):
            assert np.abs(x - y).max() > 0.1


def test_refused_architecture_fails_clearly(models):
    """smallthinker picks its layers without RoPE by layer index: non-identity orders are refused
    at load time with the reason, while the identity order loads and runs the file's network."""
    path = models[REFUSED_ARCH]
    with pytest.raises(ValueError):
        RawModel(path, kv_overrides=override_keys(REFUSED_ARCH, [1, 0, 2, 3]), n_ctx=N_CTX)
    with pytest.raises(ValueError, match="do not support layer orders") as err:
        frankenllama.Llama(path, layer_order=[0, 1, 2, 1, 2, 3], n_ctx=N_CTX, verbose=False)
    assert REFUSED_ARCH in str(err.value)

    assert_identical(_logits(path, "batch", override_keys(REFUSED_ARCH, list(range(N_LAYER)))),
                      _logits(path, "batch"))
    llm = frankenllama.Llama(path, layer_order=list(range(N_LAYER)), n_ctx=N_CTX, verbose=False)
    try:
        assert llm.layer_order == list(range(N_LAYER))
    finally:
        llm.close()


_CHILD = textwrap.dedent("""
    import json
    import sys
    sys.path.insert(0, sys.argv[1])
    import frankenllama
    from frankenllama.order import override_keys
    from lowlevel import RawModel, run
    try:
        llm = frankenllama.Llama(sys.argv[2], layer_order=json.loads(sys.argv[3]), n_ctx=64, verbose=False)
    except ValueError as err:
        print("refused:", err)
    else:
        llm.eval([1, 5, 6, 7, 8, 9])
        print("ran")
""")


@pytest.mark.parametrize("order", [[0, 2], [1, 3]], ids=["mamba-only", "attention-only"])
def test_jamba_single_kind_order_does_not_crash(models, order):
    """An order running only one kind of layer of a hybrid model is refused at load (llama.cpp's hybrid
    memory aborts without both kinds, stock library included), and the process survives."""
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, os.path.dirname(__file__), models["jamba"], json.dumps(order)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-500:]}"
    assert "refused:" in proc.stdout and "at least one recurrent and one attention layer" in proc.stdout, proc.stdout
