"""The CUDA runtime at import (_native.load_cuda_runtime): nothing at all for a build without CUDA;
for a CUDA build, libggml-cuda's own RUNPATH first, else a preload from NVIDIA's wheels on sys.path.

The CUDA build itself is checked by scripts/cuda_check.sh; these tests use the installed (CPU-only)
build and a stand-in "CUDA build" of two tiny C libraries: a libggml-cuda.so that needs a library
only a wheel folder on sys.path holds.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from frankenllama import _native

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="ELF sonames and /proc/self/maps")


def test_cpu_build_imports_without_touching_cuda():
    """A CPU-only build: importing frankenllama opens no CUDA library (not even tries one) and
    preloads nothing. ctypes.CDLL is watched from before the import."""
    if _native.cuda_runtime_info() is not None:
        pytest.skip("this installation is a CUDA build (scripts/cuda_check.sh checks it)")
    code = textwrap.dedent("""
        import ctypes, json, os
        opened = []
        real_init = ctypes.CDLL.__init__
        def watching_init(self, name, *args, **kwargs):
            opened.append(str(name))
            return real_init(self, name, *args, **kwargs)
        ctypes.CDLL.__init__ = watching_init
        import frankenllama
        from frankenllama import _native
        maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
        print(json.dumps({"opened": opened, "preloaded": _native.cuda_runtime_preloaded,
                          "info": _native.cuda_runtime_info(),
                          "cuda_mapped": [w for w in ("libcudart", "libcublas", "libggml-cuda") if w in maps]}))
    """)
    bare = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "LD_PRELOAD")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=bare)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(Path(p).name.startswith("libllama") for p in result["opened"]), result  # the watch works
    assert not [p for p in result["opened"] if "cuda" in Path(p).name or "cublas" in Path(p).name], result
    assert result["preloaded"] == [] and result["info"] is None and result["cuda_mapped"] == []


def test_no_cuda_backend_means_no_load_attempt(monkeypatch, tmp_path):
    """load_cuda_runtime on a library folder without libggml-cuda opens nothing, whatever else is there."""
    (tmp_path / _native.CUDA_RUNTIME_FILE).write_text('{"cuda_version": "13.0", "libraries": ["libcublas.so.13"]}')
    monkeypatch.setenv("FRANKENLLAMA_LIB_DIR", str(tmp_path))

    def no_dlopen(*args, **kwargs):
        raise AssertionError(f"dlopen attempted: {args}")

    monkeypatch.setattr(_native.ctypes, "CDLL", no_dlopen)
    assert _native.cuda_runtime_info() is None
    assert _native.load_cuda_runtime() is None


def _fake_cuda_build(tmp_path: Path) -> tuple[Path, Path, str]:
    """A library folder whose libggml-cuda.so needs ``libfakecublas<id>.so.99``, which only
    ``<site>/nvidia/cu99/lib`` holds; returns (library folder, site folder, soname)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    soname = f"libfakecublas{uuid.uuid4().hex[:8]}.so.99"  # unique: the loader remembers sonames
    site = tmp_path / "site"
    wheel_dir = site / "nvidia" / "cu99" / "lib"
    wheel_dir.mkdir(parents=True)
    lib_dir = tmp_path / "frankenllama" / "lib"
    lib_dir.mkdir(parents=True)
    (tmp_path / "dep.c").write_text("int fake_cublas_version(void) { return 99; }\n")
    (tmp_path / "cuda.c").write_text("int fake_cublas_version(void);\n"
                                     "int fake_ggml_cuda(void) { return fake_cublas_version(); }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(wheel_dir / soname), f"-Wl,-soname,{soname}",
                    str(tmp_path / "dep.c")], check=True)
    # linked by path: NEEDED is the soname, and no RUNPATH leads to it
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib_dir / "libggml-cuda.so"), str(tmp_path / "cuda.c"),
                    str(wheel_dir / soname)], check=True)
    (lib_dir / _native.CUDA_RUNTIME_FILE).write_text(json.dumps(
        {"cuda_version": "99.0", "wheel_lib_dir": "nvidia/cu99/lib", "libraries": [soname]}))
    return lib_dir, site, soname


@linux_only
def test_cuda_runtime_missing_says_what_to_install(monkeypatch, tmp_path):
    lib_dir, _site, soname = _fake_cuda_build(tmp_path)
    monkeypatch.setenv("FRANKENLLAMA_LIB_DIR", str(lib_dir))
    monkeypatch.setattr(_native, "cuda_runtime_preloaded", [])
    with pytest.raises(ImportError, match=r"CUDA build \(CUDA 99\.0\).*frankenllama\[cuda\]") as err:
        _native.load_cuda_runtime()
    assert soname in str(err.value)  # the loader's own message names the missing library
    assert _native.cuda_runtime_preloaded == []


@linux_only
def test_cuda_runtime_preloaded_from_a_wheel_folder_on_sys_path(monkeypatch, tmp_path):
    lib_dir, site, soname = _fake_cuda_build(tmp_path)
    monkeypatch.setenv("FRANKENLLAMA_LIB_DIR", str(lib_dir))
    monkeypatch.setattr(_native, "cuda_runtime_preloaded", [])
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    wheel_dir = (site / "nvidia" / "cu99" / "lib").resolve()
    assert _native.load_cuda_runtime() == wheel_dir
    assert _native.cuda_runtime_preloaded == [str(wheel_dir / soname)]
    assert ctypes.CDLL(str(lib_dir / "libggml-cuda.so")).fake_ggml_cuda() == 99

