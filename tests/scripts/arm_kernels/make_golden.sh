#!/usr/bin/env bash
# Writes tests/golden/ggml_arm_kernels.txt: what llama.cpp's CPU backend, cross-built with
# GCC for two Arm targets and run under qemu-user, computes for each weight type's vec_dot
# and each activation quantiser (see harness.c). The Arm kernels (`rust/quant/dot_neon.rs`)
# are tested against it; CI does not run this script.
#
#   armv8.2-a+dotprod -> the `dotprod` level (sdot lanes)
#   armv8-a           -> the `neon` level (ggml's widening fallback for sdot)
#
# Tools and LLAMA_CPP_DIR: see common.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
work="${WORK_DIR:-$(mktemp -d)}"
source "$here/common.sh"
fetch_llama_cpp

run_harness() {
    local arch="$1" build="$work/build-$1"
    build_llama_cpp "$arch" ggml-cpu ggml-base
    aarch64-linux-gnu-gcc -O2 -I"$LLAMA_CPP_DIR/ggml/include" "$here/harness.c" \
        "$build/ggml/src/libggml-cpu.a" "$build/ggml/src/libggml-base.a" \
        -lstdc++ -lm -lpthread -o "$build/harness"
    run_arm "$build/harness" > "$work/$arch.txt"
}

run_harness armv8.2-a+dotprod
run_harness armv8-a

# Both builds see the same inputs; only dot results may differ. One line per case, with the
# dotprod result then the armv8-a result on `dot` lines.
out="$repo/tests/golden/ggml_arm_kernels.txt"
{
    echo "# llama.cpp (llama-cpp-python $llama_cpp_python_version vendor tree) ggml-cpu, GCC $(aarch64-linux-gnu-gcc -dumpversion), by tests/scripts/arm_kernels/make_golden.sh"
    echo "# quantize <type> <n> <x f32 hex> <quantised hex>"
    echo "# dot <type> <n> <weights hex> <activations hex> <f32 bits: armv8.2-a+dotprod> <f32 bits: armv8-a>"
    paste -d' ' "$work/armv8.2-a+dotprod.txt" "$work/armv8-a.txt" | awk '{
        half = NF / 2
        for (i = 1; i < half; i++) if ($i != $(i + half)) { print "inputs differ on line " NR > "/dev/stderr"; exit 1 }
        if ($1 == "dot") print join(half) " " $(NF)
        else print join(half)
    }
    function join(k,   s, i) { s = $1; for (i = 2; i <= k; i++) s = s " " $i; return s }'
} > "$out"
echo "wrote $out ($(wc -l < "$out") lines)"
