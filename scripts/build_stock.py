#!/usr/bin/env python3
"""Build the *unpatched* llama.cpp library from the same pinned source, for comparisons.

Tests and benchmarks compare frankenllama against stock llama.cpp built from the very tree
frankenllama patches (same commit, same compiler flags, no patches).  The build is cached in
``$FRANKENLLAMA_CACHE/stock-<sha256 prefix>/`` and reused; nothing of it is committed.

    build_stock.py            build if needed, print the folder holding libllama
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_source  # noqa: E402

# the same configuration as CMakeLists.txt, without the patches
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
    *[f"-DLLAMA_BUILD_{opt}=OFF" for opt in ("COMMON", "TESTS", "TOOLS", "EXAMPLES", "SERVER", "APP")],
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
]
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def stock_dir() -> Path:
    return llama_source.cache_dir() / f"stock-{llama_source.SDIST_SHA256[:12]}"


def library_dir() -> Path:
    return stock_dir() / "bin"


def build() -> Path:
    """Build (once) and return the folder holding the unpatched libllama."""
    lib = library_dir()
    if (lib / "libllama.so").exists() or (lib / "libllama.dylib").exists():
        return lib
    with tempfile.TemporaryDirectory(dir=llama_source.cache_dir()) as tmp:
        src = Path(tmp) / "llama.cpp"
        llama_source.extract(llama_source.fetch_sdist(), src)
        build_dir = Path(tmp) / "build"
        flags = list(CMAKE_FLAGS)
        if platform.machine().lower() in ("x86_64", "amd64"):
            flags += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        log = stock_dir().with_suffix(".log")
        stock_dir().parent.mkdir(parents=True, exist_ok=True)
        print(f"building the unpatched llama.cpp library (log: {log})", file=sys.stderr, flush=True)
        with open(log, "w") as out:
            for cmd in (["cmake", "-S", str(src), "-B", str(build_dir), *generator, *flags],
                        ["cmake", "--build", str(build_dir), "--target", "llama", "-j", str(os.cpu_count() or 2)]):
                if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    raise RuntimeError(f"building the unpatched library failed, see {log}")
        staged = Path(tmp) / "stock"
        (staged / "bin").mkdir(parents=True)
        for f in (build_dir / "bin").iterdir():
            if ".so" in f.name or f.suffix in (".dylib", ".dll"):
                shutil.copy(f, staged / "bin" / f.name, follow_symlinks=False)
        if stock_dir().exists():
            shutil.rmtree(stock_dir())
        os.replace(staged, stock_dir())
    return lib


if __name__ == "__main__":
    print(build())
