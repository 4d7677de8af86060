#!/usr/bin/env bash
# Leak check of the layer-order patch: load with an order / generate / re-order / free cycles
# (tests/leakcheck/leak_cycles.c) under valgrind memcheck (summary at exit, plus the growth of every
# leak kind between cycle 10 and the last cycle) and LeakSanitizer (100 cycles), then the max RSS
# of 10 vs 100 plain cycles and the heap in use after cycle 10 vs 100.  Every check is run twice:
# "patch" mode (load-time override, re-order, state fingerprint, invalid override / order / state
# error paths) and "baseline" mode (no override, no re-order), so that what only "patch" mode
# shows comes from the layer-order features, and what both show from code that runs without them.
# Both leak tools are self-tested with a leak injected on purpose.
#
# Usage: tests/leakcheck/run_leakcheck.sh [--short] [LIB_DIR]
#   --short          (or LEAK_SHORT=1) the quick pass tests/test_leakcheck.py runs: valgrind runs 10
#                    cycles (growth from cycle 1 to 10) instead of about VG_BUDGET_S seconds' worth;
#                    the other checks take seconds and stay as they are
#   LIB_DIR          directory with libllama / libggml* (default: $FRANKENLLAMA_LIB_DIR, else the
#                    frankenllama package that PYTHON imports: its frankenllama/lib)
# Environment:
#   PYTHON           python with frankenllama's dependencies (gguf, numpy), to find the package and
#                    generate the model (default: python3)
#   LLAMA_SRC        patched llama.cpp tree for the headers (default: vendor/llama.cpp once a build
#                    has prepared it, else `scripts/llama_source.py prepare --dest LEAK_WORK/llama.cpp`)
#   LEAK_MODEL       tiny 4-layer llama GGUF (default LEAK_WORK/tiny.gguf, generated if missing)
#   LEAK_WORK        scratch directory for binaries and logs (default /tmp/frankenllama-leakcheck)
#   VG_CYCLES        valgrind cycle count (default: chosen from the time of 5 cycles so that one
#                    run takes about VG_BUDGET_S seconds, between 5 and 100; 10 with --short)
#   VG_BUDGET_S      default 90
#   RSS_SLACK_KB     allowed max-RSS growth from 10 to 100 cycles (default 2048)
#   HEAP_SLACK_B     allowed growth of the heap in use (mallinfo2, glibc tcache off) from cycle 10
#                    to 100 (default 0)
#
# A leg whose tool is missing is skipped with a line saying so ("SKIP: ..."): valgrind when it is not
# installed or cannot run these libraries, LeakSanitizer when the compiler cannot link it.
#
# Valgrind and GGML_NATIVE: a -march=native ggml-cpu on an AVX-512 host contains EVEX
# instructions that valgrind (no AVX-512 support) cannot decode (SIGILL in ggml_cpu_init).  In
# that case the script recompiles ggml-cpu only, with -march=native replaced by -march=x86-64-v3
# (AVX2/FMA/F16C), into LEAK_WORK/vglib, and runs valgrind against that directory: libllama, libggml
# and libggml-base - where the patch lives - are the very files of LIB_DIR (symlinked); only the CPU
# kernels differ.  The compile commands come from LIB_DIR/../compile_commands.json (a CMake build
# folder's bin/), else from configuring LLAMA_SRC with CMake (nothing else of it is built).
#
# Exit status: 0 if no check failed, 2 if the checks could not be set up.
set -u -o pipefail

SHORT=${LEAK_SHORT:-0}
if [ "${1:-}" = "--short" ]; then SHORT=1; shift; fi
case "$SHORT" in 0|"") SHORT=0 ;; *) SHORT=1 ;; esac

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=${LEAK_WORK:-/tmp/frankenllama-leakcheck}
MODEL=${LEAK_MODEL:-$WORK/tiny.gguf}
VG_BUDGET_S=${VG_BUDGET_S:-90}
RSS_SLACK_KB=${RSS_SLACK_KB:-2048}
HEAP_SLACK_B=${HEAP_SLACK_B:-0}
CC=${CC:-gcc}
[ "$SHORT" = 1 ] && VG_CYCLES=${VG_CYCLES:-10}

mkdir -p "$WORK"
FAIL=0
SKIPPED=()
fail() { echo "FAIL: $*"; FAIL=1; }
skip() { echo "SKIP: $1: $2"; SKIPPED+=("$1"); }
die() { echo "leakcheck: cannot run: $*" >&2; exit 2; }

# ---- the library: LIB_DIR, FRANKENLLAMA_LIB_DIR, or the installed package -----------------------
LIB_DIR=${1:-${FRANKENLLAMA_LIB_DIR:-}}
if [ -z "$LIB_DIR" ]; then
    # find_spec: where the package is, without importing it (which would load the library)
    LIB_DIR=$("$PYTHON" -c 'import importlib.util, pathlib
spec = importlib.util.find_spec("frankenllama")
print(pathlib.Path(spec.origin).parent / "lib" if spec else "")') \
        || die "$PYTHON cannot look for the frankenllama package (set PYTHON or pass LIB_DIR)"
    [ -n "$LIB_DIR" ] || die "frankenllama is not installed for $PYTHON: pip install . (or pass LIB_DIR)"
fi
LIB_DIR=$(cd "$LIB_DIR" 2>/dev/null && pwd -P) || die "no library directory $LIB_DIR"
[ -e "$LIB_DIR/libllama.so" ] || die "$LIB_DIR has no libllama.so (this script runs on Linux)"

# ---- the headers: LLAMA_SRC, vendor/llama.cpp after a build, or a freshly prepared tree ---------
patched_tree() { grep -qs llama_layer_order_version "$1/include/llama.h"; }
if [ -z "${LLAMA_SRC:-}" ]; then
    if patched_tree "$REPO/vendor/llama.cpp"; then
        LLAMA_SRC="$REPO/vendor/llama.cpp"
    else
        echo "== preparing the patched llama.cpp source in $WORK/llama.cpp"
        LLAMA_SRC=$("$PYTHON" "$REPO/scripts/llama_source.py" prepare --dest "$WORK/llama.cpp") \
            || die "could not prepare the llama.cpp source (set LLAMA_SRC to a patched tree)"
    fi
fi
patched_tree "$LLAMA_SRC" || die "$LLAMA_SRC/include/llama.h is missing or not patched"

echo "== lib dir: $LIB_DIR"
echo "== headers: $LLAMA_SRC/include $LLAMA_SRC/ggml/include"
echo "== work dir: $WORK"
[ "$SHORT" = 1 ] && echo "== short mode: valgrind $VG_CYCLES cycles"

# ---- model -------------------------------------------------------------------------------------
if [ ! -s "$MODEL" ]; then
    echo "== generating $MODEL"
    "$PYTHON" - "$REPO/tests" "$MODEL" <<'EOF' || die "cannot generate $MODEL with $PYTHON"
import sys
sys.path.insert(0, sys.argv[1])
from tiny_model import write_tiny_llama
write_tiny_llama(sys.argv[2], n_layer=4, seed=1)
EOF
fi
echo "== model: $MODEL"

# ---- build -------------------------------------------------------------------------------------
CFLAGS=(-std=c11 -O1 -g -fno-omit-frame-pointer -Wall -Wextra -Werror
        -I"$LLAMA_SRC/include" -I"$LLAMA_SRC/ggml/include")
LIBS=(-L"$LIB_DIR" -lllama -lggml -lggml-base)
set -x
"$CC" "${CFLAGS[@]}" "$HERE/leak_cycles.c" -o "$WORK/leak_cycles" "${LIBS[@]}" -Wl,-rpath,"$LIB_DIR" || exit 2
# no rpath: valgrind runs pick their libraries with LD_LIBRARY_PATH
"$CC" "${CFLAGS[@]}" "$HERE/leak_cycles.c" -o "$WORK/leak_cycles_norpath" "${LIBS[@]}" || exit 2
{ set +x; } 2>/dev/null
HAVE_LSAN=1
"$CC" "${CFLAGS[@]}" -fsanitize=leak "$HERE/leak_cycles.c" -o "$WORK/leak_cycles_lsan" "${LIBS[@]}" \
    -Wl,-rpath,"$LIB_DIR" 2> "$WORK/lsan-build.log" || HAVE_LSAN=0

# ---- functional smoke --------------------------------------------------------------------------
for mode in patch baseline; do
    "$WORK/leak_cycles" "$MODEL" 3 $mode || fail "leak_cycles 3 $mode"
done

# ---- valgrind ----------------------------------------------------------------------------------
VG=(valgrind --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=1 --num-callers=30)

soname() { readelf -d "$1" 2>/dev/null | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p'; }

ggml_cpu_compile_commands() {  # print the path of a compile_commands.json that builds ggml-cpu
    local cc_json="$LIB_DIR/../compile_commands.json"
    if [ -f "$cc_json" ]; then echo "$cc_json"; return 0; fi
    command -v cmake >/dev/null || { echo "no $cc_json and no cmake to make one" >&2; return 1; }
    echo "== no $cc_json: configuring $LLAMA_SRC with CMake for ggml-cpu's compile commands" >&2
    cmake -S "$LLAMA_SRC" -B "$WORK/vgcmake" -DCMAKE_BUILD_TYPE=Release -DCMAKE_EXPORT_COMPILE_COMMANDS=ON \
        -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF \
        > "$WORK/vgcmake.log" 2>&1 || { echo "configuring failed (see $WORK/vgcmake.log)" >&2; return 1; }
    echo "$WORK/vgcmake/compile_commands.json"
}

build_vglib() {  # valgrind-compatible ggml-cpu (see the header), into $WORK/vglib
    local out="$WORK/vglib" cc_json cpu_name
    cc_json=$(ggml_cpu_compile_commands) || return 1
    cpu_name=$(soname "$LIB_DIR/libggml-cpu.so")
    [ -n "$cpu_name" ] || { echo "no soname in $LIB_DIR/libggml-cpu.so"; return 1; }
    rm -rf "$out"; mkdir -p "$out/obj"
    echo "== rebuilding ggml-cpu with -march=x86-64-v3 for valgrind (from $cc_json)"
    "$PYTHON" - "$cc_json" "$out/obj" > "$out/compile.sh" <<'EOF' || return 1
import json, shlex, sys
entries = [e for e in json.load(open(sys.argv[1])) if "/ggml-cpu.dir/" in e.get("output", "")]
if not entries:
    sys.exit("no ggml-cpu entries")
for i, e in enumerate(entries):
    args = shlex.split(e["command"]) if "command" in e else e["arguments"]
    args = ["-march=x86-64-v3" if a == "-march=native" else a for a in args]
    args[args.index("-o") + 1] = f"{sys.argv[2]}/{i:02d}.o"
    print(f"cd {shlex.quote(e['directory'])} && {shlex.join(args)}")
EOF
    # two jobs at most: the host is shared
    tr '\n' '\0' < "$out/compile.sh" | xargs -0 -P 2 -I{} bash -c '{}' || return 1
    g++ -shared -Wl,-soname,"$cpu_name" -o "$out/$cpu_name" "$out"/obj/*.o \
        -L"$LIB_DIR" -lggml-base -fopenmp -lpthread || return 1
    local l name
    for l in llama ggml ggml-base ggml-rpc; do  # the unversioned files the package ships, or versioned ones
        [ -e "$LIB_DIR/lib$l.so" ] || continue
        name=$(soname "$LIB_DIR/lib$l.so")
        ln -sf "$(readlink -f "$LIB_DIR/lib$l.so")" "$out/${name:-lib$l.so}"
    done
    echo "$LIB_DIR" > "$out/lib-dir"
    # the patch's code must come from LIB_DIR, only ggml-cpu from vglib
    LD_LIBRARY_PATH="$out" ldd "$WORK/leak_cycles_norpath" | grep -E 'libllama|libggml'
    return 0
}

VG_LIB=""
if ! command -v valgrind >/dev/null; then
    skip "valgrind" "valgrind is not installed (apt-get install valgrind): its checks are left out"
else
    VG_LIB="$LIB_DIR"
    echo "== valgrind probe (1 cycle) against $VG_LIB"
    # (in a child shell: a SIGILL here is expected on AVX-512 hosts, keep its report quiet)
    bash -c '"$@"; exit $?' probe env LD_LIBRARY_PATH="$VG_LIB" "${VG[@]}" --log-file="$WORK/vg-probe.log" \
        "$WORK/leak_cycles_norpath" "$MODEL" 1 patch >/dev/null 2>&1
    if grep -q "Unrecognised instruction" "$WORK/vg-probe.log"; then
        grep -m1 "unhandled instruction bytes" "$WORK/vg-probe.log"
        echo "valgrind cannot decode $LIB_DIR/libggml-cpu.so (built with -march=native on an AVX-512 host)"
        cpu_name=$(soname "$LIB_DIR/libggml-cpu.so")
        if [ -n "$cpu_name" ] && [ "$WORK/vglib/$cpu_name" -nt "$LIB_DIR/libggml-cpu.so" ] \
                && [ "$(cat "$WORK/vglib/lib-dir" 2>/dev/null)" = "$LIB_DIR" ]; then
            echo "== reusing $WORK/vglib"
            VG_LIB="$WORK/vglib"
        elif build_vglib; then
            VG_LIB="$WORK/vglib"
        else
            VG_LIB=""
            skip "valgrind" "valgrind cannot run these libraries and ggml-cpu could not be rebuilt for it (see above)"
        fi
    fi
fi

if [ -n "$VG_LIB" ]; then
    if [ -z "${VG_CYCLES:-}" ]; then
        t0=$(date +%s.%N)
        LD_LIBRARY_PATH="$VG_LIB" "${VG[@]}" --log-file="$WORK/vg-time5.log" "$WORK/leak_cycles_norpath" "$MODEL" 5 patch >/dev/null
        t1=$(date +%s.%N)
        VG_CYCLES=$("$PYTHON" -c "t=$t1-$t0; print(max(5, min(100, int($VG_BUDGET_S / (t / 5)))))")
        echo "== valgrind, 5 cycles: $("$PYTHON" -c "print(f'{$t1-$t0:.1f}')") s -> $VG_CYCLES cycles per run (budget ${VG_BUDGET_S} s)"
    fi
    for mode in patch baseline; do
        log="$WORK/vg-$mode.log"
        echo "== valgrind $mode, $VG_CYCLES cycles (LD_LIBRARY_PATH=$VG_LIB)"
        echo "   LD_LIBRARY_PATH=$VG_LIB ${VG[*]} --log-file=$log $WORK/leak_cycles_norpath $MODEL $VG_CYCLES $mode"
        t0=$(date +%s)
        LD_LIBRARY_PATH="$VG_LIB" "${VG[@]}" --log-file="$log" "$WORK/leak_cycles_norpath" "$MODEL" "$VG_CYCLES" "$mode"
        rc=$?
        echo "   exit $rc, $(( $(date +%s) - t0 )) s"
        # the summary at exit, and the one of the added leak search after the last cycle, which has
        # the growth since the leak search after cycle 10 (1 for 10 cycles or fewer) in parentheses
        echo "   growth from cycle $([ "$VG_CYCLES" -gt 10 ] && echo 10 || echo 1) to the last cycle (added leak search):"
        grep -A6 "added leak search" "$log" | grep -E "lost:|reachable:" | sed 's/^==[0-9]*==/     /'
        echo "   at exit:"
        sed -n '/HEAP SUMMARY/,$p' "$log" | grep -E "in use at exit:|total heap usage:|definitely lost:|indirectly lost:|possibly lost:|still reachable:|suppressed:|ERROR SUMMARY:" | sed 's/^==[0-9]*==/     /'
        [ $rc -eq 0 ] || fail "valgrind $mode exit $rc (see $log)"
        if grep -q "added leak search" "$log"; then
            grow=$(grep -A6 "added leak search" "$log" | grep -E "lost:|reachable:" | grep -c -v "(+0) bytes in [0-9,]* (+0) blocks")
            [ "$grow" -eq 0 ] || fail "valgrind $mode: a leak kind grew between the leak searches (see $log)"
        else
            echo "   (no added leak search: leak_cycles was built without <valgrind/memcheck.h>)"
        fi
    done

    # the tool itself must see a leak that is there: 2 cycles lose 1 block of 4096 bytes
    LEAK_CYCLES_INJECT_LEAK=1 LD_LIBRARY_PATH="$VG_LIB" "${VG[@]}" --log-file="$WORK/vg-inject.log" \
        "$WORK/leak_cycles_norpath" "$MODEL" 2 patch >/dev/null
    rc=$?
    if [ $rc -eq 1 ] && grep -q "definitely lost: 4,096 bytes in 1 blocks" "$WORK/vg-inject.log"; then
        echo "== valgrind self-test (injected leak): $(grep -o 'definitely lost:.*' "$WORK/vg-inject.log" | tail -1), exit $rc"
    else
        fail "valgrind did not report the injected leak (exit $rc, see $WORK/vg-inject.log)"
    fi
    # and a reachable block kept per cycle must show as growth in the added leak search (+2 blocks
    # between the two searches: cycle 10 and 12, or with --short, as its runs, cycle 1 and 3)
    n_inject=$([ "$SHORT" = 1 ] && echo 3 || echo 12)
    LEAK_CYCLES_INJECT_LEAK=reachable LD_LIBRARY_PATH="$VG_LIB" "${VG[@]}" --log-file="$WORK/vg-inject-reachable.log" \
        "$WORK/leak_cycles_norpath" "$MODEL" "$n_inject" patch >/dev/null
    growth=$(grep -A6 "added leak search" "$WORK/vg-inject-reachable.log" | grep -o "still reachable:.*")
    if echo "$growth" | grep -q "(+8,192) bytes in [0-9,]* (+2) blocks"; then
        echo "== valgrind self-test (injected reachable growth, $n_inject cycles): $growth"
    else
        fail "the added leak search did not show the injected reachable growth (see $WORK/vg-inject-reachable.log)"
    fi
fi

# ---- LeakSanitizer (gcc's liblsan; shared libraries need no instrumentation) ---------------------
if [ "$HAVE_LSAN" = 0 ]; then
    skip "LeakSanitizer" "$CC cannot build with -fsanitize=leak: $(tail -1 "$WORK/lsan-build.log")"
else
    for mode in patch baseline; do
        echo "== LeakSanitizer $mode, 100 cycles"
        echo "   LSAN_OPTIONS=exitcode=23 $WORK/leak_cycles_lsan $MODEL 100 $mode"
        LSAN_OPTIONS=exitcode=23 "$WORK/leak_cycles_lsan" "$MODEL" 100 $mode > "$WORK/lsan-$mode.out" 2> "$WORK/lsan-$mode.log"
        rc=$?
        cat "$WORK/lsan-$mode.out"
        grep -E "SUMMARY: LeakSanitizer|ERROR: LeakSanitizer" "$WORK/lsan-$mode.log" || echo "   no leaks reported (exit $rc)"
        [ $rc -eq 0 ] || fail "LeakSanitizer $mode exit $rc (see $WORK/lsan-$mode.log)"
    done
    # the tool itself must see a leak that is there
    LSAN_OPTIONS=exitcode=23 LEAK_CYCLES_INJECT_LEAK=1 "$WORK/leak_cycles_lsan" "$MODEL" 2 patch >/dev/null 2> "$WORK/lsan-inject.log"
    if [ $? -eq 23 ] && grep -q "SUMMARY: LeakSanitizer" "$WORK/lsan-inject.log"; then
        echo "== LeakSanitizer self-test (injected leak): $(grep 'SUMMARY: LeakSanitizer' "$WORK/lsan-inject.log")"
    else
        fail "LeakSanitizer did not report the injected leak (see $WORK/lsan-inject.log)"
    fi
fi

# ---- RSS: 10 vs 100 plain cycles ---------------------------------------------------------------
max_rss_kb() {  # max_rss_kb OUT CMD...: run CMD (stdout into OUT), print its max RSS in KB
    "$PYTHON" -c 'import resource, subprocess, sys
with open(sys.argv[1], "w") as out:
    rc = subprocess.call(sys.argv[2:], stdout=out)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(rc)' "$@"
}
for mode in patch baseline; do
    rss10=$(max_rss_kb "$WORK/rss-$mode-10.out" "$WORK/leak_cycles" "$MODEL" 10 $mode) || fail "leak_cycles 10 $mode"
    rss100=$(max_rss_kb "$WORK/rss-$mode-100.out" "$WORK/leak_cycles" "$MODEL" 100 $mode) || fail "leak_cycles 100 $mode"
    grep -E "VmRSS|heap in use" "$WORK/rss-$mode-100.out" | sed 's/^/   /'
    growth=$(( rss100 - rss10 ))
    echo "== max RSS $mode ($WORK/leak_cycles $MODEL N $mode): 10 cycles $rss10 KB, 100 cycles $rss100 KB, growth $growth KB"
    [ $growth -le "$RSS_SLACK_KB" ] || fail "max RSS of $mode grew by $growth KB from 10 to 100 cycles"
done

# ---- heap in use (glibc mallinfo2, tcache off: its chunks count as in use) after cycle 10 vs 100
for mode in patch baseline; do
    GLIBC_TUNABLES=glibc.malloc.tcache_count=0 "$WORK/leak_cycles" "$MODEL" 100 $mode > "$WORK/heap-$mode.out" \
        || fail "leak_cycles 100 $mode (tcache off)"
    line=$(grep "heap in use" "$WORK/heap-$mode.out")
    h10=$(echo "$line" | sed -n 's/.*after cycle 10: \([0-9-]*\) B.*/\1/p')
    h100=$(echo "$line" | sed -n 's/.*after the last cycle: \([0-9-]*\) B.*/\1/p')
    echo "== heap in use $mode (GLIBC_TUNABLES=glibc.malloc.tcache_count=0 $WORK/leak_cycles $MODEL 100 $mode): after cycle 10 $h10 B, after cycle 100 $h100 B, growth $(( h100 - h10 )) B"
    [ "$h10" -ge 0 ] && [ $(( h100 - h10 )) -le "$HEAP_SLACK_B" ] || fail "heap in use of $mode grew by $(( h100 - h10 )) B from cycle 10 to 100"
done

skipped=""
[ ${#SKIPPED[@]} -eq 0 ] || skipped=" (skipped: ${SKIPPED[*]})"
if [ $FAIL -eq 0 ]; then echo "leakcheck: OK$skipped"; else echo "leakcheck: FAILED$skipped"; fi
exit $FAIL
