#!/usr/bin/env bash
# Writes tests/golden/ggml_arm_kernels.txt: what llama.cpp's CPU backend, cross-built with
# GCC for two Arm targets and run under qemu-user, computes for each weight type's vec_dot
# and each activation quantiser (see harness.c). The Arm kernels (`rust/quant/dot_neon.rs`)
# are tested against it; CI does not run this script.
#
#   armv8.2-a+dotprod -> the `dotprod` level (sdot lanes)
#   armv8-a           -> the `neon` level (ggml's widening fallback for sdot)
#
# Needs (Debian): gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross
# qemu-user cmake, and pip. LLAMA_CPP_DIR may point at a llama.cpp tree; by default the one
# vendored in the llama-cpp-python sdist the other golden files were made with is used.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
work="${WORK_DIR:-$(mktemp -d)}"
version=0.3.36

if [[ -z "${LLAMA_CPP_DIR:-}" ]]; then
    python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
    tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
    LLAMA_CPP_DIR="$work/llama_cpp_python-$version/vendor/llama.cpp"
fi

cat > "$work/toolchain.cmake" <<'CMAKE'
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
CMAKE

run_harness() {
    local arch="$1" build="$work/build-$1"
    cmake -S "$LLAMA_CPP_DIR" -B "$build" -DCMAKE_TOOLCHAIN_FILE="$work/toolchain.cmake" \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$arch" \
        -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_SERVER=OFF >/dev/null
    cmake --build "$build" -j"$(nproc)" --target ggml-cpu ggml-base >/dev/null
    aarch64-linux-gnu-gcc -O2 -I"$LLAMA_CPP_DIR/ggml/include" "$here/harness.c" \
        "$build/ggml/src/libggml-cpu.a" "$build/ggml/src/libggml-base.a" \
        -lstdc++ -lm -lpthread -o "$build/harness"
    QEMU_LD_PREFIX=/usr/aarch64-linux-gnu qemu-aarch64 "$build/harness" > "$work/$arch.txt"
}

run_harness armv8.2-a+dotprod
run_harness armv8-a

# Both builds see the same inputs; only dot results may differ. One line per case, with the
# dotprod result then the armv8-a result on `dot` lines.
out="$repo/tests/golden/ggml_arm_kernels.txt"
{
    echo "# llama.cpp (llama-cpp-python $version vendor tree) ggml-cpu, GCC $(aarch64-linux-gnu-gcc -dumpversion), by tests/scripts/arm_kernels/make_golden.sh"
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
