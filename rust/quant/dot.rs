//! The dot-product entry points: the kernel for a weight type comes from the table
//! `dispatch` chose for this CPU (scalar, AVX2, AVX-512, NEON or NEON with `sdot`).

use super::activation::{activation_type, QuantizedActivations};
use super::dispatch::kernels;
use super::GgmlType;

/// A dot product of `n` elements: one weight row's bytes with quantised activation bytes.
pub type DotFn = fn(row: &[u8], act: &[u8], n: usize) -> f32;

/// Four weight rows dotted with the same activations, sharing the activation loads.
/// Element `i` of the result is bit-identical to `DotFn(rows[i], act, n)` of the same level.
pub type Dot4Fn = fn(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4];

/// Four weight rows dotted with the activations of several tokens: `out[t][i] = rows[i] ·
/// acts[t]` for `t < acts.len()` (`out` holds at least as many entries; every activation
/// row has `acts[0].len()` elements and the format `activation_type` of the weights). Each weight block
/// is unpacked once for all the tokens, which is what makes prefill and batched decoding
/// cheaper than one [`Dot4Fn`] call per token. Every `out[t][i]` is bit-identical to
/// `DotFn(rows[i], acts[t].bytes(), n)` of the same level: the pair goes through the single-row
/// kernel's float operations in the single-row kernel's order, only loads and unpacking are shared.
pub type DotTokensFn = fn(rows: [&[u8]; 4], acts: &[QuantizedActivations], out: &mut [[f32; 4]]);

/// The kernel for weight rows of type `ty` against activations in `activation_type(ty)`,
/// from the kernel set chosen for this CPU (see [`super::simd_level`]). Look it up once
/// per matrix, not per row.
pub fn kernel_for(ty: GgmlType) -> DotFn {
    kernels().dot(ty)
}

/// The four-row kernel for `ty` (see [`Dot4Fn`]). Every type has one; types without a
/// fused SIMD version make four single-row calls.
pub fn kernel4_for(ty: GgmlType) -> Dot4Fn {
    kernels().dot4(ty)
}

/// Four weight rows dotted with tokens `first..first + acts.len()` of a batch of `batch`
/// tokens that are multiplied by the matrix together, with the arithmetic llama.cpp's x86
/// build uses for that batch: `out[t]` as [`DotTokensFn`] gives it, except where llama.cpp's
/// batched kernels round differently from its single-token ones. Reproduced (SIMD levels;
/// the scalar level is [`DotTokensFn`]):
/// - Q4_K: llama.cpp repacks a Q4_K matrix whose row count is a multiple of 8 and computes
///   the first `batch - batch % 4` tokens with `ggml_gemm_q4_K_8x8_q8_K`, which adds a
///   super-block to the floats in four steps where the single-token
///   `ggml_gemv_q4_K_8x8_q8_K` (and [`DotFn`]) adds it in one; the last `batch % 4` tokens
///   go through the gemv;
/// - Q6_K: a batch of 8 or more tokens goes through ggml's tiled kernel
///   (`ggml-cpu/tiled`), which rounds `S * d_x` before `fma(.., d_y, acc)` where
///   `ggml_vec_dot_q6_K_q8_K` keeps eight lanes; a smaller batch through the vec_dot;
/// - F16: a batch of 2 or more tokens with rows a multiple of 16 long goes through
///   llamafile's tinyBLAS (one 16-lane accumulator per pair, see `dot_f16`), where
///   `ggml_vec_dot_f16` keeps four.
///
/// For Q8_0, Q5_0 and Q4_1, llama.cpp's batches round as its single tokens do (checked
/// against libggml 0.25.3 for batches of up to 33 tokens), so [`DotTokensFn`] has its bits.
/// Not reproduced, here or by the single-token kernels: Q2_K, Q3_K and Q5_K (vec_dot, and
/// the tiled kernel for batches of 8 or more), and Q4_0 matrices whose row count is a
/// multiple of 8, which llama.cpp's AVX2 build repacks (`q4_0_8x8_q8_0`, other arithmetic
/// than `ggml_vec_dot_q4_0_q8_0` even for one token). Rows or activation rows of different
/// lengths get [`DotFn`] calls.
pub type DotBatchFn = fn(
    rows: [&[u8]; 4],
    acts: &[QuantizedActivations],
    first: usize,
    batch: usize,
    out: &mut [[f32; 4]],
);

/// The rows-by-tokens kernel for `ty` (see [`DotTokensFn`]).
pub fn kernel_tokens_for(ty: GgmlType) -> DotTokensFn {
    kernels().dot_tokens(ty)
}

/// The batch kernel for `ty` (see [`DotBatchFn`]).
pub fn kernel_batch_for(ty: GgmlType) -> DotBatchFn {
    kernels().dot_batch(ty)
}

/// Dot product of one weight row of type `ty` (the bytes of `act.len()` elements) with
/// activations quantised for `ty`. The scalar level does ggml's reference `ggml_vec_dot_*`
/// arithmetic; SIMD levels agree with it to f32 summation order (see `dot_avx2`), and for
/// the 32-element formats, Q4_K and Q6_K have the bits of what llama.cpp's x86 builds
/// compute for one token: ggml's AVX2 `ggml_vec_dot_*` (F16: the AVX-512 build's
/// `ggml_vec_dot_f16`), and for Q4_K the repacked
/// `ggml_gemv_q4_K_8x8_q8_K` (llama.cpp repacks Q4_K matrices whose row count is a multiple
/// of 8; one with another row count it multiplies with `ggml_vec_dot_q4_K_q8_K`, whose bits
/// these kernels do not reproduce). It repacks Q4_0 matrices of such row counts too, and
/// there these kernels (`ggml_vec_dot_q4_0_q8_0`'s arithmetic) do not have its bits. The
/// Arm levels have the bits of llama.cpp's Arm `ggml_vec_dot_*` for every format (see
/// `dot_neon`).
///
/// Shapes are the caller's contract (matvec checks them once at model load), so they are
/// only debug-asserted. In release a mismatch cannot read out of bounds: a row of the wrong
/// length yields a wrong number, and activations quantised for another format yield NaN.
pub fn dot_row(ty: GgmlType, row: &[u8], act: &QuantizedActivations) -> f32 {
    let n = act.len();
    debug_assert_eq!(
        act.format(),
        activation_type(ty),
        "activations quantised for another weight type"
    );
    debug_assert_eq!(
        ty.bytes_for(n as u64),
        Some(row.len() as u64),
        "{ty} row length"
    );
    if act.format() != activation_type(ty) {
        return f32::NAN;
    }
    kernel_for(ty)(row, act.bytes(), n)
}
