#!/usr/bin/env bash
# Writes tests/golden/arm_generation.txt: greedy generations of the registered models by
# llama.cpp cross-built for Arm (armv8-a, armv8.2-a+dotprod) and run under qemu-user,
# as logits_trace.c prints them (per step: argmax and an FNV-1a hash of every logit's
# bits). rust/model/arm_generation_tests.rs checks this engine against it on AArch64.
# Needs the models pulled (python -m sampler_sdk models pull smollm2-135m-instruct
# gemma3-270m). Tools and LLAMA_CPP_DIR: see common.sh; WORK_DIR keeps the builds.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
work="${WORK_DIR:-$(mktemp -d)}"
source "$here/common.sh"
cache="${SAMPLER_SDK_CACHE:-$HOME/.cache/sampler-sdk}/models"
fetch_llama_cpp

ids() { # N FIRST: N token ids spread over the vocabulary
    python -c "print(','.join(str($2 + (i * 37) % 5000) for i in range($1)))"
}

# name file arch decoded prompt-ids
cases=(
    "smollm2-135m-instruct SmolLM2-135M-Instruct.Q4_1.gguf armv8-a 8 $(ids 30 100)"
    "smollm2-135m-instruct SmolLM2-135M-Instruct.Q4_1.gguf armv8.2-a+dotprod 8 $(ids 30 100)"
    "gemma3-270m gemma-3-270m-q4_k_m.gguf armv8-a 4 $(ids 20 2)"
    "gemma3-270m gemma-3-270m-q4_k_m.gguf armv8.2-a+dotprod 4 $(ids 22 2)"
)

out="$repo/tests/golden/arm_generation.txt"
{
    echo "# llama.cpp (llama-cpp-python $llama_cpp_python_version vendor tree), GCC $(aarch64-linux-gnu-gcc -dumpversion), 2 threads, by tests/scripts/arm_kernels/make_generation_golden.sh"
    echo "# case <model> <file> <arch> <decoded> <prompt ids>, then: step <i> argmax <token> hash <FNV-1a 64>"
    for c in "${cases[@]}"; do
        read -r name file arch decoded prompt <<< "$c"
        build="$work/build-$arch"
        if [[ ! -x "$build/logits_trace" ]]; then
            build_llama_cpp "$arch" llama
            aarch64-linux-gnu-g++ -O2 -x c -I"$LLAMA_CPP_DIR/include" -I"$LLAMA_CPP_DIR/ggml/include" \
                "$here/logits_trace.c" -x none "$build/src/libllama.a" "$build/ggml/src/libggml.a" \
                "$build/ggml/src/libggml-cpu.a" "$build/ggml/src/libggml-base.a" -lm -lpthread \
                -static -o "$build/logits_trace" 2>/dev/null
        fi
        echo "case $name $file $arch $decoded $prompt"
        run_arm "$build/logits_trace" "$cache/$name/$file" 2 "$decoded" "$prompt" | cut -d' ' -f1-6
    done
} > "$out"
echo "wrote $out"
