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
# Usage: tests/leakcheck/run_leakcheck.sh [LIB_DIR]
#   LIB_DIR          directory with libllama.so / libggml*.so (default /work/build-dev/bin)
# Environment:
#   LLAMA_SRC        llama.cpp tree for the headers (default /work/dev/llama.cpp)
#   LEAK_MODEL       tiny 4-layer llama GGUF (default /tmp/leak-tiny.gguf, generated if missing)
#   LEAK_WORK        scratch directory for binaries and logs (default /tmp/frankenllama-leakcheck)
#   VG_CYCLES        valgrind cycle count (default: chosen from the time of 5 cycles so that one
#                    run takes about VG_BUDGET_S seconds, between 5 and 100)
#   VG_BUDGET_S      default 90
#   RSS_SLACK_KB     allowed max-RSS growth from 10 to 100 cycles (default 2048)
#   HEAP_SLACK_B     allowed growth of the heap in use (mallinfo2, glibc tcache off) from cycle 10
#                    to 100 (default 0)
#   PYTHON           python with gguf + numpy to generate the model (default /work/venv/bin/python)
#
# Valgrind and GGML_NATIVE: a -march=native ggml-cpu on an AVX-512 host contains EVEX
# instructions that valgrind (no AVX-512 support) cannot decode (SIGILL in ggml_cpu_init).  In
# that case the script recompiles ggml-cpu only, from LIB_DIR/../compile_commands.json with
# -march=native replaced by -march=x86-64-v3 (AVX2/FMA/F16C), into LEAK_WORK/vglib, and runs
# valgrind against that directory: libllama, libggml and libggml-base - where the patch lives -
# are the very files of LIB_DIR (symlinked); only the CPU kernels differ.
#
# Exit status: 0 if no check failed.
set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
LIB_DIR=$(cd "${1:-/work/build-dev/bin}" && pwd) || { echo "no lib dir" >&2; exit 2; }
LLAMA_SRC=${LLAMA_SRC:-/work/dev/llama.cpp}
MODEL=${LEAK_MODEL:-/tmp/leak-tiny.gguf}
WORK=${LEAK_WORK:-/tmp/frankenllama-leakcheck}
VG_BUDGET_S=${VG_BUDGET_S:-90}
RSS_SLACK_KB=${RSS_SLACK_KB:-2048}
HEAP_SLACK_B=${HEAP_SLACK_B:-0}
PYTHON=${PYTHON:-/work/venv/bin/python}
CC=${CC:-gcc}

mkdir -p "$WORK"
FAIL=0
fail() { echo "FAIL: $*"; FAIL=1; }

echo "== lib dir: $LIB_DIR"
echo "== headers: $LLAMA_SRC/include $LLAMA_SRC/ggml/include"
echo "== work dir: $WORK"

# ---- model -------------------------------------------------------------------------------------
if [ ! -s "$MODEL" ]; then
    echo "== generating $MODEL"
    (cd "$REPO" && "$PYTHON" -c "import sys; sys.path.insert(0, 'tests'); from tiny_model import write_tiny_llama; write_tiny_llama('$MODEL', n_layer=4, seed=1)") \
        || { echo "cannot generate $MODEL" >&2; exit 2; }
fi
echo "== model: $MODEL"

# ---- build -------------------------------------------------------------------------------------
CFLAGS=(-std=c11 -O1 -g -fno-omit-frame-pointer -Wall -Wextra -Werror
        -I"$LLAMA_SRC/include" -I"$LLAMA_SRC/ggml/include")
LIBS=(-L"$LIB_DIR" -lllama -lggml -lggml-base)
set -x
"$CC" "${CFLAGS[@]}" "$HERE/leak_cycles.c" -o "$WORK/leak_cycles" "${LIBS[@]}" -Wl,-rpath,"$LIB_DIR" || exit 2
"$CC" "${CFLAGS[@]}" -fsanitize=leak "$HERE/leak_cycles.c" -o "$WORK/leak_cycles_lsan" "${LIBS[@]}" -Wl,-rpath,"$LIB_DIR" || exit 2
# no rpath: valgrind runs pick their libraries with LD_LIBRARY_PATH
"$CC" "${CFLAGS[@]}" "$HERE/leak_cycles.c" -o "$WORK/leak_cycles_norpath" "${LIBS[@]}" || exit 2
{ set +x; } 2>/dev/null

# ---- functional smoke --------------------------------------------------------------------------
for mode in patch baseline; do
    "$WORK/leak_cycles" "$MODEL" 3 $mode || fail "leak_cycles 3 $mode"
done

# ---- valgrind ----------------------------------------------------------------------------------
VG=(valgrind --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=1 --num-callers=30)

build_vglib() {  # valgrind-compatible ggml-cpu (see the header), into $WORK/vglib
    local cc_json="$LIB_DIR/../compile_commands.json" out="$WORK/vglib"
    [ -f "$cc_json" ] || { echo "no $cc_json: cannot rebuild ggml-cpu without AVX-512"; return 1; }
    rm -rf "$out"; mkdir -p "$out/obj"
    echo "== rebuilding ggml-cpu with -march=x86-64-v3 for valgrind (from $cc_json)"
    python3 - "$cc_json" "$out/obj" > "$out/compile.sh" <<'EOF' || return 1
import json, shlex, sys
entries = [e for e in json.load(open(sys.argv[1])) if "/ggml-cpu.dir/" in e.get("output", "")]
if not entries:
    sys.exit("no ggml-cpu entries")
for i, e in enumerate(entries):
    args = shlex.split(e["command"])
    args = ["-march=x86-64-v3" if a == "-march=native" else a for a in args]
    args[args.index("-o") + 1] = f"{sys.argv[2]}/{i:02d}.o"
    print(f"cd {shlex.quote(e['directory'])} && {shlex.join(args)}")
EOF
    # two jobs at most: the host is shared
    tr '\n' '\0' < "$out/compile.sh" | xargs -0 -P 2 -I{} bash -c '{}' || return 1
    g++ -shared -Wl,-soname,libggml-cpu.so.0 -o "$out/libggml-cpu.so.0" "$out"/obj/*.o \
        -L"$LIB_DIR" -lggml-base -fopenmp -lpthread || return 1
    local l
    for l in libllama.so.0 libggml.so.0 libggml-base.so.0 libggml-rpc.so.0; do
        [ -e "$LIB_DIR/$l" ] && ln -sf "$LIB_DIR/$l" "$out/$l"
    done
    # the patch's code must come from LIB_DIR, only ggml-cpu from vglib
    LD_LIBRARY_PATH="$out" ldd "$WORK/leak_cycles_norpath" | grep -E 'libllama|libggml'
    return 0
}

VG_LIB="$LIB_DIR"
echo "== valgrind probe (1 cycle) against $VG_LIB"
# (in a child shell: a SIGILL here is expected on AVX-512 hosts, keep its report quiet)
bash -c '"$@"; exit $?' probe env LD_LIBRARY_PATH="$VG_LIB" "${VG[@]}" --log-file="$WORK/vg-probe.log" \
    "$WORK/leak_cycles_norpath" "$MODEL" 1 patch >/dev/null 2>&1
if grep -q "Unrecognised instruction" "$WORK/vg-probe.log"; then
    grep -m1 "unhandled instruction bytes" "$WORK/vg-probe.log"
    echo "valgrind cannot decode $LIB_DIR/libggml-cpu.so (built with -march=native on an AVX-512 host)"
    if [ -e "$WORK/vglib/libggml-cpu.so.0" ] && [ "$WORK/vglib/libggml-cpu.so.0" -nt "$LIB_DIR/libggml-cpu.so.0" ]; then
        echo "== reusing $WORK/vglib"
        VG_LIB="$WORK/vglib"
    elif build_vglib; then
        VG_LIB="$WORK/vglib"
    else
        VG_LIB=""
    fi
fi

if [ -z "$VG_LIB" ]; then
    fail "valgrind unusable with these libraries (LeakSanitizer results below still apply)"
else
    if [ -z "${VG_CYCLES:-}" ]; then
        t0=$(date +%s.%N)
        LD_LIBRARY_PATH="$VG_LIB" "${VG[@]}" --log-file="$WORK/vg-time5.log" "$WORK/leak_cycles_norpath" "$MODEL" 5 patch >/dev/null
        t1=$(date +%s.%N)
        VG_CYCLES=$(python3 -c "t=$t1-$t0; print(max(5, min(100, int($VG_BUDGET_S / (t / 5)))))")
        echo "== valgrind, 5 cycles: $(python3 -c "print(f'{$t1-$t0:.1f}')") s -> $VG_CYCLES cycles per run (budget ${VG_BUDGET_S} s)"
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
        # the growth since the leak search after cycle 10 in parentheses
        echo "   growth from cycle 10 to the last cycle (added leak search):"
        grep -A6 "added leak search" "$log" | grep -E "lost:|reachable:" | sed 's/^==[0-9]*==/     /'
        echo "   at exit:"
        sed -n '/HEAP SUMMARY/,$p' "$log" | grep -E "in use at exit:|total heap usage:|definitely lost:|indirectly lost:|possibly lost:|still reachable:|suppressed:|ERROR SUMMARY:" | sed 's/^==[0-9]*==/     /'
        [ $rc -eq 0 ] || fail "valgrind $mode exit $rc (see $log)"
        if grep -q "added leak search" "$log"; then
            grow=$(grep -A6 "added leak search" "$log" | grep -E "lost:|reachable:" | grep -c -v "(+0) bytes in [0-9,]* (+0) blocks")
            [ "$grow" -eq 0 ] || fail "valgrind $mode: a leak kind grew between cycle 10 and the last cycle (see $log)"
        else
            echo "   (no added leak search: leak_cycles was built without <valgrind/memcheck.h>)"
        fi
    done
fi

# the tool itself must see a leak that is there: 2 cycles lose 1 block of 4096 bytes
if [ -n "$VG_LIB" ]; then
    LEAK_CYCLES_INJECT_LEAK=1 LD_LIBRARY_PATH="$VG_LIB" "${VG[@]}" --log-file="$WORK/vg-inject.log" \
        "$WORK/leak_cycles_norpath" "$MODEL" 2 patch >/dev/null
    rc=$?
    if [ $rc -eq 1 ] && grep -q "definitely lost: 4,096 bytes in 1 blocks" "$WORK/vg-inject.log"; then
        echo "== valgrind self-test (injected leak): $(grep -o 'definitely lost:.*' "$WORK/vg-inject.log" | tail -1), exit $rc"
    else
        fail "valgrind did not report the injected leak (exit $rc, see $WORK/vg-inject.log)"
    fi
    # and a reachable block kept per cycle must show as growth in the added leak search (12 cycles:
    # +2 blocks between cycle 10 and 12)
    LEAK_CYCLES_INJECT_LEAK=reachable LD_LIBRARY_PATH="$VG_LIB" "${VG[@]}" --log-file="$WORK/vg-inject-reachable.log" \
        "$WORK/leak_cycles_norpath" "$MODEL" 12 patch >/dev/null
    growth=$(grep -A6 "added leak search" "$WORK/vg-inject-reachable.log" | grep -o "still reachable:.*")
    if echo "$growth" | grep -q "(+8,192) bytes in [0-9,]* (+2) blocks"; then
        echo "== valgrind self-test (injected reachable growth, 12 cycles): $growth"
    else
        fail "the added leak search did not show the injected reachable growth (see $WORK/vg-inject-reachable.log)"
    fi
fi

# ---- LeakSanitizer (gcc's liblsan; shared libraries need no instrumentation) ---------------------
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

# ---- RSS: 10 vs 100 plain cycles ---------------------------------------------------------------
for mode in patch baseline; do
    for n in 10 100; do
        /usr/bin/time -v -o "$WORK/rss-$mode-$n.txt" "$WORK/leak_cycles" "$MODEL" $n $mode > "$WORK/rss-$mode-$n.out" \
            || fail "leak_cycles $n $mode"
    done
    grep -E "VmRSS|heap in use" "$WORK/rss-$mode-100.out" | sed 's/^/   /'
    rss10=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$WORK/rss-$mode-10.txt")
    rss100=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$WORK/rss-$mode-100.txt")
    growth=$(( rss100 - rss10 ))
    echo "== max RSS $mode (/usr/bin/time -v $WORK/leak_cycles $MODEL N $mode): 10 cycles $rss10 KB, 100 cycles $rss100 KB, growth $growth KB"
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

if [ $FAIL -eq 0 ]; then echo "leakcheck: OK"; else echo "leakcheck: FAILED"; fi
exit $FAIL
