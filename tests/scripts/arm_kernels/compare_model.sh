#!/usr/bin/env bash
# Greedy decoding of one GGUF model by llama.cpp cross-built for an Arm target and by
# sampler-sdk cross-built for AArch64, both under qemu-user, printed step by step
# (logits_trace.c, examples/logits_trace.rs: argmax and a hash of every logit's bits) and
# compared, with every f32 tensor of the last call (TRACE_DIR / SAMPLER_SDK_TRACE_DIR) kept in
# $work for finding where two runs part. Not run by CI.
#
#   compare_model.sh MODEL.gguf [ARCH] [DECODED] [PROMPT_IDS]
#
# ARCH is armv8-a (compared with SAMPLER_SDK_SIMD=neon) or armv8.2-a+dotprod (dotprod);
# PROMPT_IDS a comma-separated list of token ids. Tools and LLAMA_CPP_DIR: see common.sh;
# WORK_DIR keeps the llama.cpp build between runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
work="${WORK_DIR:-$(mktemp -d)}"
source "$here/common.sh"

model="$1"
arch="${2:-armv8-a}"
decoded="${3:-8}"
prompt="${4:-1,504,3158,25,3555,282,253}"
case "$arch" in
    armv8-a) level=neon ;;
    armv8.2-a+dotprod) level=dotprod ;;
    *) echo "ARCH must be armv8-a or armv8.2-a+dotprod" >&2; exit 2 ;;
esac

fetch_llama_cpp
build_llama_cpp "$arch" llama
build="$work/build-$arch"
aarch64-linux-gnu-g++ -O2 -x c -I"$LLAMA_CPP_DIR/include" -I"$LLAMA_CPP_DIR/ggml/include" \
    "$here/logits_trace.c" -x none "$build/src/libllama.a" "$build/ggml/src/libggml.a" \
    "$build/ggml/src/libggml-cpu.a" "$build/ggml/src/libggml-base.a" -lm -lpthread -static \
    -o "$build/logits_trace" 2>/dev/null

(cd "$repo" && CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    cargo build --quiet --release --target aarch64-unknown-linux-gnu --example logits_trace)
ours="$repo/target/aarch64-unknown-linux-gnu/release/examples/logits_trace"

mkdir -p "$work/trace-llama" "$work/trace-ours"
TRACE_DIR="$work/trace-llama" run_arm "$build/logits_trace" "$model" 2 "$decoded" "$prompt" \
    > "$work/llama.txt"
SAMPLER_SDK_TRACE_DIR="$work/trace-ours" SAMPLER_SDK_SIMD="$level" \
    run_arm "$ours" "$model" 2 "$decoded" "$prompt" > "$work/ours.txt"
echo "llama.cpp ($arch) | sampler-sdk ($level): step, argmax, logits hash"
paste -d'|' <(cut -d' ' -f2,4,6 "$work/llama.txt") <(cut -d' ' -f2,4,6 "$work/ours.txt")
if cmp -s <(cut -d' ' -f1-6 "$work/llama.txt") <(cut -d' ' -f1-6 "$work/ours.txt"); then
    echo "bit-identical at every step"
else
    echo "differs"
    exit 1
fi
