"""The package: patched library binding, drop-in Llama, refusal of foreign libraries."""
from __future__ import annotations

import importlib.metadata
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

import frankenllama
import llama_source
from frankenllama import Llama
from helpers import eval_scores, load


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    for key, value in env.items():
        if value == "":
            full_env.pop(key)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env)


def test_llama_cpp_uses_the_patched_library():
    loaded = Path(llama_cpp.llama_cpp._lib._name).resolve()
    assert loaded == frankenllama.native_library_path().resolve()
    assert loaded.is_file()
    llama_cpp.llama_cpp._lib.llama_layer_order_version.restype = llama_cpp.ctypes.c_char_p
    assert llama_cpp.llama_cpp._lib.llama_layer_order_version().decode() == frankenllama.LAYER_ORDER_VERSION


def test_version_and_commit_have_one_source():
    """The installed version (pyproject reads it from frankenllama/_version.py) and the llama.cpp
    commit the build fetches are the ones the package reports."""
    assert importlib.metadata.version("frankenllama") == frankenllama.__version__
    assert frankenllama.__llama_cpp_commit__ == llama_source.LLAMA_CPP_COMMIT


def test_subclass_of_llama_cpp_llama():
    assert issubclass(Llama, llama_cpp.Llama)


def test_accepts_every_llama_cpp_argument(tiny):
    """Every keyword of llama_cpp.Llama, passed explicitly with its default value, is accepted."""
    params = inspect.signature(llama_cpp.Llama.__init__).parameters
    kwargs = {name: p.default for name, p in params.items()
              if name not in ("self", "model_path") and p.kind is p.KEYWORD_ONLY}
    assert len(kwargs) > 40
    kwargs.update(verbose=False, n_ctx=512)
    llm = Llama(str(tiny.path), **kwargs)
    assert llm.n_ctx() == 512
    assert llm.layer_order == [0, 1, 2, 3]
    llm.close()


def test_order_metadata_confirms_the_order(tiny):
    llm = Llama(str(tiny.path), layer_order=[0, 1, 1, 3], verbose=False, n_ctx=64)
    assert llm.metadata["llama.layer_order"] == "0-1,1,3"
    assert llm.layer_order == [0, 1, 1, 3]
    assert llm.n_weight_layers == 4
    assert llama_cpp.llama_model_n_layer(llm.model) == 4
    llm.close()


def _smol_logits(path: str, mode: str, **kw) -> np.ndarray:
    llm = load(path, n_ctx=128, n_threads=2, n_threads_batch=None, logits_all=True, **kw)
    scores = eval_scores(llm, b"The quick brown fox jumps over the lazy dog. Then it", incremental=mode == "incremental")
    llm.close()
    return scores


@pytest.mark.parametrize("mode", ["batch", "incremental"])
def test_identity_order_bit_identical_to_no_order(smollm2_path, mode):
    none = _smol_logits(smollm2_path, mode)
    identity = _smol_logits(smollm2_path, mode, layer_order="0-29")
    assert np.array_equal(none, identity)
    other = _smol_logits(smollm2_path, mode, layer_order="0-28")
    assert not np.array_equal(none, other)


def test_importing_llama_cpp_first_gives_clear_import_error(tmp_path):
    """llama_cpp bound to another library before frankenllama is imported: ImportError saying what to do."""
    other = tmp_path / "lib"
    shutil.copytree(frankenllama.native_library_path().parent, other, symlinks=True)
    proc = _run_python("""
        import llama_cpp
        try:
            import frankenllama
        except ImportError as err:
            print("IMPORT-ERROR:", err)
    """, LLAMA_CPP_LIB_PATH=str(other), FRANKENLLAMA_LIB_DIR="")
    assert "IMPORT-ERROR: llama_cpp was imported before frankenllama" in proc.stdout, proc.stderr[-2000:]
    assert "Import frankenllama before llama_cpp" in proc.stdout


def test_stock_library_is_refused(stock_lib_dir):
    proc = _run_python("""
        try:
            import frankenllama
        except ImportError as err:
            print("IMPORT-ERROR:", err)
    """, FRANKENLLAMA_LIB_DIR=stock_lib_dir)
    assert "IMPORT-ERROR:" in proc.stdout, proc.stderr[-2000:]
    assert "not frankenllama's patched build" in proc.stdout


def test_stock_library_would_drop_the_order_silently(stock_lib_dir, tiny):
    """Why the check matters: the unpatched library ignores the override and runs all layers."""
    proc = _run_python(f"""
        import llama_cpp
        llm = llama_cpp.Llama({str(tiny.path)!r}, kv_overrides={{"llama.layer_order": "0,1"}}, verbose=False, n_ctx=32)
        print("N_LAYER", llama_cpp.llama_model_n_layer(llm.model))
    """, LLAMA_CPP_LIB_PATH=stock_lib_dir, FRANKENLLAMA_LIB_DIR="")
    assert "N_LAYER 4" in proc.stdout, proc.stderr[-2000:]


def test_layer_order_conflicting_with_kv_overrides(tiny):
    with pytest.raises(ValueError, match="conflicts with kv_overrides"):
        Llama(str(tiny.path), layer_order=[0, 1], kv_overrides={"llama.layer_order": "2,3"}, verbose=False)


def test_kv_overrides_alone_still_work(tiny):
    llm = Llama(str(tiny.path), kv_overrides={"llama.layer_order": "3-0"}, verbose=False, n_ctx=32)
    assert llm.layer_order == [3, 2, 1, 0]
    llm.close()


def _loads_in_a_bare_process(library: Path) -> tuple[subprocess.CompletedProcess, set[Path]]:
    """dlopen ``library`` in a new interpreter with no loader help (no LD_LIBRARY_PATH & co.); return
    the run and the folders its ggml libraries were loaded from (Linux: /proc/self/maps)."""
    bare = {k: v for k, v in os.environ.items()
            if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "DYLD_LIBRARY_PATH", "LLAMA_CPP_LIB_PATH",
                         "FRANKENLLAMA_LIB_DIR")}
    code = textwrap.dedent(f"""
        import ctypes, os
        lib = ctypes.CDLL({str(library)!r})
        print("LOADED", lib.llama_print_system_info is not None)
        if os.path.exists("/proc/self/maps"):
            for line in open("/proc/self/maps"):
                if "libggml" in line:
                    print("GGML", line.split(None, 5)[-1].strip())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=bare)
    folders = {Path(line.split(" ", 1)[1]).parent.resolve() for line in proc.stdout.splitlines()
               if line.startswith("GGML ")}
    return proc, folders


def test_stock_library_loads_from_its_cache_folder_alone(stock_lib_dir):
    """The cached unpatched libllama finds its ggml libraries beside it ($ORIGIN), from any process."""
    proc, folders = _loads_in_a_bare_process(Path(stock_lib_dir) / frankenllama.native_library_path().name)
    assert "LOADED True" in proc.stdout, proc.stderr[-2000:]
    if sys.platform == "linux":
        assert folders == {Path(stock_lib_dir).resolve()}


def test_packaged_library_loads_from_its_folder_alone():
    proc, folders = _loads_in_a_bare_process(frankenllama.native_library_path())
    assert "LOADED True" in proc.stdout, proc.stderr[-2000:]
    if sys.platform == "linux":
        assert folders == {frankenllama.native_library_path().parent.resolve()}


def test_stock_library_copied_elsewhere_loads_its_own_ggml(stock_lib_dir, tmp_path):
    """No RUNPATH into a build folder: a copy of the folder loads the ggml libraries beside it."""
    moved = tmp_path / "moved"
    shutil.copytree(stock_lib_dir, moved)
    proc, folders = _loads_in_a_bare_process(moved / frankenllama.native_library_path().name)
    assert "LOADED True" in proc.stdout, proc.stderr[-2000:]
    if sys.platform == "linux":
        assert folders == {moved.resolve()}
