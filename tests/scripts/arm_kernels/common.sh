# Shared by make_golden.sh and compare_model.sh: a llama.cpp source tree and its
# cross-built libraries for one Arm target. Needs (Debian): gcc-aarch64-linux-gnu
# g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user cmake, and pip.
#
# LLAMA_CPP_DIR may point at a llama.cpp tree; by default the one vendored in the
# llama-cpp-python sdist the other golden files were made with is downloaded into $work.

llama_cpp_python_version=0.3.36

# Sets LLAMA_CPP_DIR (downloading the sdist into $work unless it is set already).
fetch_llama_cpp() {
    if [[ -z "${LLAMA_CPP_DIR:-}" ]]; then
        python -m pip download --quiet --no-deps --no-binary :all: \
            "llama-cpp-python==$llama_cpp_python_version" -d "$work"
        tar -xzf "$work/llama_cpp_python-$llama_cpp_python_version.tar.gz" -C "$work"
        LLAMA_CPP_DIR="$work/llama_cpp_python-$llama_cpp_python_version/vendor/llama.cpp"
    fi
}

# build_llama_cpp ARCH TARGET...: configures $work/build-ARCH for -march=ARCH (GCC, no
# OpenMP, static libraries) and builds the given targets.
build_llama_cpp() {
    local arch="$1"
    shift
    cat > "$work/toolchain.cmake" <<'CMAKE'
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
CMAKE
    cmake -S "$LLAMA_CPP_DIR" -B "$work/build-$arch" -DCMAKE_TOOLCHAIN_FILE="$work/toolchain.cmake" \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$arch" \
        -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_SERVER=OFF >/dev/null
    cmake --build "$work/build-$arch" -j"$(nproc)" --target "$@" >/dev/null
}

run_arm() {
    QEMU_LD_PREFIX=/usr/aarch64-linux-gnu qemu-aarch64 "$@"
}
