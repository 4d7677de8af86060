"""Layer programs in the patched library: against the NumPy reference, and identities that can fail."""
from __future__ import annotations

import os

import numpy as np
import pytest

from frankenllama import _native
from frankenllama.order import LayerOrderError
from frankenllama.program import LayerProgram, parse_program, program_override_keys
from frankenllama.recipes import block_program
from helpers import eval_scores, load
from lowlevel import RawModel, run
from reference import reference_logits

SEQS = [[1, 75, 108, 229, 153, 132, 119, 107, 104, 117], [1, 40, 41, 42, 43, 44, 45]]
PROGRAMS = {
    "damped-repeats": "0-1,2@0.5,2@0.5,3",
    "damped-first": "0@0.25,0@0.25,1-3",
    "two-branches": "0,(1-2|3-1),3",
    "weighted-merge-at-end": "0-1,(2-3*0.3|3-2*0.7)",
    "nested-damped": "0,(1,(2|3)|2@0.5)@0.75,3",
    "embeddings-route": "(0-1|2-3),3",
    "output-sum": "0-3;e*0.25+1*0.25+3*0.5",
    "block-file-merge": "WeightBlock; 0; 1; 0; -1\nWeightBlock; 1; 3; 1; 0\nWeightBlock; 3; 5; 2; 0\n"
                        "MergeBlock; 1; 0.5; 2; 0.5\nTotalLayers; 5\n",
}


def _program(spec: str):
    return block_program(spec) if "Block" in spec else parse_program(spec, 4)


@pytest.fixture(scope="module", params=list(PROGRAMS))
def program_and_model(request, tiny):
    program = _program(PROGRAMS[request.param])
    with RawModel(tiny.path, kv_overrides=program_override_keys("llama", program)) as model:
        yield program, model


@pytest.mark.parametrize("mode", ["batch", "incremental"])
def test_matches_numpy_reference(program_and_model, tiny, mode):
    """Two sequences, in one batch and token by token (each position keeps its own K/V)."""
    program, model = program_and_model
    assert model.n_layer() == len(program.order)
    for seq, logits in zip(SEQS, run(model, SEQS, mode)):
        np.testing.assert_allclose(logits, reference_logits(tiny, seq, layer_order=program), rtol=1e-4, atol=1e-4)


def test_reference_tells_programs_apart(tiny):
    """The tolerance is far tighter than what damping changes: the test above can fail."""
    damped = reference_logits(tiny, SEQS[0], layer_order=parse_program("0-1,2@0.5,2@0.5,3"))
    plain = reference_logits(tiny, SEQS[0], layer_order=[0, 1, 2, 2, 3])
    assert np.abs(damped - plain).max() > 1e-2


def _scores(path, spec: str | list[int], mode: str = "batch") -> list[np.ndarray]:
    program = parse_program(spec) if isinstance(spec, str) else LayerProgram.from_order(spec)
    with RawModel(path, kv_overrides=program_override_keys(_arch(path), program)) as model:
        return run(model, SEQS, mode)


def _arch(path) -> str:
    from frankenllama.gguf_info import check_header

    return check_header(str(path), None).arch


def _identical(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["batch", "incremental"])
def test_identities(tiny, mode):
    path = tiny.path
    repeat = _scores(path, [0, 1, 2, 2, 3], mode)
    # s = 1 is the plain order, bit for bit (it is computed as the plain order)
    assert _identical(_scores(path, "0-2,2@1,3", mode), repeat)
    # s = 0 leaves the stream unchanged: the same as leaving the position out
    assert _identical(_scores(path, "0-2,1@0,3", mode), _scores(path, [0, 1, 2, 3], mode))
    # a merge with weights (1, 0) is the first branch alone
    assert _identical(_scores(path, "0-1,(2-3*1|3-2*0)", mode), _scores(path, [0, 1, 2, 3], mode))
    # default routing written out is the plain order
    assert _identical(_scores(path, "0-1,2<1,3<2", mode), _scores(path, [0, 1, 2, 3], mode))
    # 0.5/0.5 of two identical branches is one branch (0.5x + 0.5x = x exactly)
    assert _identical(_scores(path, "0-1,(2-3|2-3)", mode), _scores(path, [0, 1, 2, 3], mode))
    # and damping does change the output
    assert not np.allclose(_scores(path, "0-2,2@0.5,3", mode)[0], repeat[0], atol=1e-3)


def test_real_models_identities_and_damping(smollm2_path, gemma3_path):
    """SmolLM2 (llama) and Gemma 3 (sliding-window layers, embeddings scaled inside the builder)."""
    for path, n in ((smollm2_path, 30), (gemma3_path, 18)):
        half = n // 2
        base = _scores(path, list(range(n)))
        assert _identical(_scores(path, f"0-{n - 1}@1"), base)
        assert _identical(_scores(path, f"0-{half - 1},{half}@0,{half}-{n - 1}"), base)
        assert _identical(_scores(path, f"0-{half - 1},({half}-{n - 1}*1|{half}-{n - 1}*0)"), base)
        assert _identical(_scores(path, f"(0-{n - 1}|0-{n - 1})"), base)
        damped = _scores(path, f"0-{n - 1},{half}@0.25,{n - 1}")
        assert not np.allclose(damped[0], base[0], atol=1e-3)


def test_llama_api_runs_programs_and_reorders(tiny):
    plain_order = [0, 1, 2, 3]
    llm = load(tiny.path, layer_order="0-1,(2-3|3-2)", n_ctx=64, logits_all=True, type_k=0, type_v=0, flash_attn=False)
    try:
        assert llm.layer_order == [0, 1, 2, 3, 3, 2]
        assert llm.layer_program.spec == "0-3,3-2<1;3*0.5+5*0.5"
        want = reference_logits(tiny, SEQS[0], layer_order=parse_program("0-1,(2-3|3-2)"))
        np.testing.assert_allclose(eval_scores(llm, SEQS[0]), want, rtol=1e-4, atol=1e-4)
        llm.set_layer_order(plain_order)
        assert llm.layer_program.is_plain
        np.testing.assert_allclose(eval_scores(llm, SEQS[0]), reference_logits(tiny, SEQS[0], plain_order),
                                   rtol=1e-4, atol=1e-4)
        llm.set_layer_order("0,1@0.5,1@0.5,2-3")
        np.testing.assert_allclose(eval_scores(llm, SEQS[0]),
                                   reference_logits(tiny, SEQS[0], layer_order=parse_program("0,1@0.5,1@0.5,2-3")),
                                   rtol=1e-4, atol=1e-4)
        with pytest.raises(LayerOrderError, match="column"):
            llm.set_layer_order("0,(1|")
        assert llm.layer_program.spec == "0,1@0.5,1@0.5,2-3"  # unchanged by the refused one
    finally:
        llm.close()


def test_state_of_one_program_is_refused_by_another(tiny):
    from frankenllama.llama import StateMismatchError

    a = load(tiny.path, layer_order="0-2,2@0.5,3", n_ctx=64)
    a.eval(SEQS[0])
    state = a.save_state()
    a.set_layer_order("0-2,2@0.25,3")  # the same positions and weights, another scale
    with pytest.raises(StateMismatchError):
        a.load_state(state)
    a.set_layer_order("0-2,2@0.5,3")
    a.load_state(state)
    a.close()


def test_native_parser_refuses_what_python_refuses(tiny):
    """The C side checks again: a malformed program sent straight to llama.cpp is an error, not an abort."""
    llm = load(tiny.path, n_ctx=64)
    ffi, lib = _native.ffi_lib()
    model = _native.model_ptr(llm._model)
    llm._ctx.close()
    try:
        for bad in ("0,1<5", "0@3", "0@0.0000001", "0;", "0;9", "0<1", "0,1<0+0", "0@x", "0<e*nan", "9", "0,,1"):
            assert lib.llama_model_set_layer_program(model, bad.encode()) == -1, bad
        assert lib.llama_model_set_layer_program(model, b"0-3;3*0.5+e*0.5") == 0
    finally:
        lib.llama_model_set_layer_order(model, ffi.NULL, 0)
        llm._open_context()
        llm.close()


FUZZ_N = int(os.environ.get("FRANKENLLAMA_FUZZ_N", "10000"))
_TOKENS = ["0", "1", "2", "3", "5", "9", "12", "-", ",", "@", "0.5", "0.25", "1", "2", "3", ".", "<", "+", "*", "e",
           ";", " ", "0000000001", "1.0000001", "0.0000001"]


def _python_program(spec: str, n_layers: int) -> list[int] | None:
    try:
        return list(parse_program(spec, n_layers).order)
    except LayerOrderError:
        return None


def test_fuzz_c_parser_agrees_with_python(tiny):
    """Random specs in the canonical (flat) program syntax: the patched library accepts exactly
    what Python accepts, with the same positions."""
    import random

    rng = random.Random(20261122)
    llm = load(tiny.path, n_ctx=32)
    ffi, lib = _native.ffi_lib()
    model = _native.model_ptr(llm._model)
    llm._ctx.close()
    disagreements = []
    try:
        for _ in range(FUZZ_N):
            spec = "".join(rng.choice(_TOKENS) for _ in range(rng.randint(1, 12)))
            want = _python_program(spec, 4)
            rc = lib.llama_model_set_layer_program(model, spec.encode())
            got = None
            if rc == 0:
                n = lib.llama_model_n_layer(model)
                order = ffi.new("int32_t[]", n)
                lib.llama_model_get_layer_order(model, order, n)
                got = list(order)
            if got != want:
                disagreements.append((spec, want, got))
    finally:
        lib.llama_model_set_layer_order(model, ffi.NULL, 0)
        llm._open_context()
        llm.close()
    assert not disagreements, disagreements[:10]


def test_cli_order_and_run_show_programs(tiny, capsys):
    from frankenllama.cli import main

    assert main(["order", "-m", str(tiny.path), "--layer-order", "0-1,(2-3|3-2)"]) == 0
    out = capsys.readouterr().out
    assert "program:        0-3,3-2<1;3*0.5+5*0.5" in out and "order:          0-3,3-2" in out
    assert main(["run", "-m", str(tiny.path), "--layer-order", "0-3@0.5", "-p", "hi", "-n", "2"]) == 0
    assert "layer program 0-3@0.5, 4 positions" in capsys.readouterr().err
    assert main(["materialize", str(tiny.path), "--layer-order", "0-3@0.5", "-o", "/tmp/never.gguf"]) == 2
    assert "no GGUF file can express" in capsys.readouterr().err


def test_pickle_and_prompt_cache_follow_the_program(tiny):
    import pickle

    a = load(tiny.path, layer_order="0-2,2@0.5,3", n_ctx=64, logits_all=True)
    b = load(tiny.path, layer_order="0-2,2@0.25,3", n_ctx=64)  # same positions and weights, other scale
    try:
        assert a._cache_namespace() != b._cache_namespace()
        copy = pickle.loads(pickle.dumps(a))
        try:
            assert copy.layer_program == a.layer_program and copy.layer_program.spec == "0-2,2@0.5,3"
            assert np.array_equal(eval_scores(copy, SEQS[0]), eval_scores(a, SEQS[0]))
        finally:
            copy.close()
    finally:
        a.close()
        b.close()
