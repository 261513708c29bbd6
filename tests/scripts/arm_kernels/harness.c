// Prints what llama.cpp's CPU backend, built for one Arm target, computes for the operations
// sampler-sdk's Arm kernels must reproduce bit for bit: activation quantisation
// (`from_float` of each `vec_dot_type`) and each weight type's `vec_dot` on one row.
//
// Built and run by make_golden.sh (cross-compiled, run under qemu-user). Output, one record
// per line, hex little-endian bytes:
//   quantize <type> <n> <x as f32> <quantised bytes>
//   dot <weight type> <n> <weight row bytes> <activation bytes> <result as f32 bits>
// Inputs come from a fixed xorshift generator, so reruns print the same file.

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "ggml-cpu.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t next_u64(void) {
    // xorshift64*
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static float uniform(void) { return (float)((next_u64() >> 40) * (1.0 / 16777216.0)); }

// Roughly normal values whose spread changes every 32 elements, with rare outliers, so
// blocks get different scales and some block maxima are far from the rest.
static void fill(float * x, int n) {
    float spread = 1.0f;
    for (int i = 0; i < n; i++) {
        if (i % 32 == 0) spread = 0.05f + 2.0f * uniform();
        float v = (uniform() + uniform() + uniform() + uniform() - 2.0f) * spread;
        if (next_u64() % 97 == 0) v *= 12.0f;
        x[i] = v;
    }
}

static void hex(const void * data, size_t len) {
    const unsigned char * b = data;
    putchar(' ');
    for (size_t i = 0; i < len; i++) printf("%02x", b[i]);
}

static void quantize_case(enum ggml_type type, int n) {
    float * x = malloc(n * sizeof(float));
    size_t size = ggml_row_size(type, n);
    void * q = malloc(size);
    fill(x, n);
    ggml_get_type_traits_cpu(type)->from_float(x, q, n);
    printf("quantize %s %d", ggml_type_name(type), n);
    hex(x, n * sizeof(float));
    hex(q, size);
    putchar('\n');
    free(x);
    free(q);
}

static void dot_case(enum ggml_type type, int n) {
    const struct ggml_type_traits_cpu * traits = ggml_get_type_traits_cpu(type);
    enum ggml_type act_type = traits->vec_dot_type;
    float * w = malloc(n * sizeof(float));
    float * x = malloc(n * sizeof(float));
    size_t w_size = ggml_row_size(type, n);
    size_t a_size = ggml_row_size(act_type, n);
    void * wq = malloc(w_size);
    void * aq = malloc(a_size);
    fill(w, n);
    fill(x, n);
    if (type == GGML_TYPE_F32) {
        memcpy(wq, w, w_size);
    } else {
        ggml_quantize_chunk(type, w, wq, 0, 1, n, NULL);
    }
    if (act_type == GGML_TYPE_F32) {
        memcpy(aq, x, a_size);
    } else {
        ggml_get_type_traits_cpu(act_type)->from_float(x, aq, n);
    }
    float s = 0.0f;
    traits->vec_dot(n, &s, 0, wq, 0, aq, 0, 1);
    printf("dot %s %d", ggml_type_name(type), n);
    hex(wq, w_size);
    hex(aq, a_size);
    hex(&s, sizeof s);
    putchar('\n');
    free(w);
    free(x);
    free(wq);
    free(aq);
}

int main(void) {
    ggml_cpu_init();

    const enum ggml_type activations[] = {GGML_TYPE_Q8_0, GGML_TYPE_Q8_1, GGML_TYPE_Q8_K};
    for (size_t t = 0; t < sizeof activations / sizeof *activations; t++) {
        int block = ggml_blck_size(activations[t]);
        quantize_case(activations[t], block);
        quantize_case(activations[t], 4 * 256);
    }

    // Many single blocks (the scalar tail alone, where the fused and unfused roundings of
    // one term tell apart), an odd count (block pairs and a tail), and a row as long as
    // SmolLM2's hidden size.
    const enum ggml_type blocks_of_32[] = {
        GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q8_0,
    };
    const struct { int n, repeats; } sizes_32[] = {{32, 16}, {7 * 32, 6}, {576, 2}};
    for (size_t t = 0; t < sizeof blocks_of_32 / sizeof *blocks_of_32; t++)
        for (size_t c = 0; c < 3; c++)
            for (int r = 0; r < sizes_32[c].repeats; r++) dot_case(blocks_of_32[t], sizes_32[c].n);

    const enum ggml_type k_quants[] = {
        GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K,
    };
    const struct { int n, repeats; } sizes_k[] = {{256, 16}, {3 * 256, 4}, {1536, 1}};
    for (size_t t = 0; t < sizeof k_quants / sizeof *k_quants; t++)
        for (size_t c = 0; c < 3; c++)
            for (int r = 0; r < sizes_k[c].repeats; r++) dot_case(k_quants[t], sizes_k[c].n);

    // Counts that end inside and outside the 16-element main loop.
    const enum ggml_type floats[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16};
    const struct { int n, repeats; } sizes_f[] = {{7, 8}, {64, 2}, {576, 2}, {1001, 2}};
    for (size_t t = 0; t < sizeof floats / sizeof *floats; t++)
        for (size_t c = 0; c < 4; c++)
            for (int r = 0; r < sizes_f[c].repeats; r++) dot_case(floats[t], sizes_f[c].n);
    return 0;
}
