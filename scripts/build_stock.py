#!/usr/bin/env python3
"""Build the *unpatched* llama.cpp library from the same pinned source, for comparisons.

Tests and benchmarks compare frankenllama against stock llama.cpp built from the very tree
frankenllama patches.  The stock library is built by the project's own CMakeLists.txt with
``-DFRANKENLLAMA_PATCHES=OFF``, so both sides share one configuration: the same compiler flags,
backends, AMX setting and ``$ORIGIN`` RUNPATH (the libraries find each other wherever they lie).
``CMAKE_ARGS`` is honoured as ``pip install .`` honours it.

The installed libraries are cached in ``$FRANKENLLAMA_CACHE/stock-<key>/frankenllama/lib``, where
the key covers the source archive, CMakeLists.txt and ``CMAKE_ARGS``; nothing of it is committed.

    build_stock.py            build if needed, print the folder holding libllama
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_source  # noqa: E402

LIBRARY_NAMES = ("libllama.so", "libllama.dylib", "llama.dll")


def _cmake_args() -> list[str]:
    return shlex.split(os.environ.get("CMAKE_ARGS", ""))


def _build_key() -> str:
    digest = hashlib.sha256(llama_source.SDIST_SHA256.encode())
    digest.update((llama_source.ROOT / "CMakeLists.txt").read_bytes())
    digest.update("\0".join(_cmake_args()).encode())
    return digest.hexdigest()[:12]


def stock_dir() -> Path:
    return llama_source.cache_dir() / f"stock-{_build_key()}"


def library_dir() -> Path:
    """Where the unpatched libllama and its ggml libraries are installed (built or not)."""
    return stock_dir() / "frankenllama" / "lib"


def build() -> Path:
    """Build (once) and return the folder holding the unpatched libllama."""
    lib = library_dir()
    if any((lib / name).exists() for name in LIBRARY_NAMES):
        return lib
    cache = llama_source.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    log = stock_dir().with_suffix(".log")
    print(f"building the unpatched llama.cpp library (log: {log})", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        build_dir, staged = Path(tmp) / "build", Path(tmp) / "stock"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        steps = [
            ["cmake", "-S", str(llama_source.ROOT), "-B", str(build_dir), *generator,
             "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
             *_cmake_args(), "-DFRANKENLLAMA_PATCHES=OFF"],
            ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)],
            ["cmake", "--install", str(build_dir), "--component", "frankenllama", "--prefix", str(staged)],
        ]
        with open(log, "w") as out:
            for cmd in steps:
                if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    raise RuntimeError(f"building the unpatched library failed, see {log}")
        if stock_dir().exists():
            shutil.rmtree(stock_dir())
        os.replace(staged, stock_dir())
    return lib


if __name__ == "__main__":
    print(build())
