//! ggml tensor formats: the block layouts, bit-exact dequantisation, activation
//! quantisation and the dot products a matrix-vector product is built from.
//!
//! - `types`: the type table (ids, block and byte sizes);
//! - `blocks`: one `#[repr(C)]` struct per block layout, read from unaligned bytes;
//! - `dequant`: [`dequantize`], bit-exact with ggml's `dequantize_row_*`;
//! - `activation`: [`QuantizedActivations`], the rounding of ggml's x86 activation quantisers;
//! - `dot_scalar`: portable `dot_<weights>_<activations>` kernels, ggml's generic arithmetic;
//! - `dot_avx2`, `dot_avx512`: SIMD twins of `dot_scalar` and of the activation quantisers;
//! - `dot_neon`: the Arm twins, with the bits of llama.cpp's Arm builds;
//! - `dot_f16`: F16 products with llama.cpp's arithmetic (`ggml_vec_dot_f16`, tinyBLAS);
//! - `dispatch`: picks one kernel set per process from the CPU's features ([`simd_level`]);
//! - `token_lanes`: [`TokenLanes`], activations of 16 tokens across a register's lanes, for
//!   the AVX-512 prefill kernels of the 32-element formats ([`Kernels::dot_lanes`]);
//! - `dot`: [`dot_row`], [`kernel_for`], [`kernel4_for`], [`kernel_tokens_for`] and
//!   [`kernel_batch_for`] (llama.cpp's arithmetic for a batch of tokens, where it differs).

mod activation;
mod blocks;
mod dequant;
mod dispatch;
mod dot;
#[cfg(target_arch = "x86_64")]
mod dot_avx2;
#[cfg(target_arch = "x86_64")]
mod dot_avx512;
#[cfg(target_arch = "x86_64")]
mod dot_f16;
#[cfg(target_arch = "aarch64")]
mod dot_neon;
mod dot_scalar;
mod token_lanes;
pub mod types;

#[cfg(test)]
mod ggml_arm_tests;
#[cfg(test)]
mod ggml_x86_tests;
#[cfg(test)]
mod kernel_tests;
#[cfg(test)]
mod tests;

pub use activation::{activation_type, QuantizedActivations};
pub use dequant::dequantize;
pub use dispatch::{kernels, kernels_for, simd_level, Kernels, SimdLevel, SIMD_ENV};
pub use dot::{
    dot_row, kernel4_for, kernel_batch_for, kernel_for, kernel_tokens_for, Dot4Fn, DotBatchFn,
    DotFn, DotTokensFn,
};
pub use token_lanes::{
    lanes_offset, q4_k_gemm_tokens, q6_k_tiled_tokens, DotLanesFn, TokenLanes, TokenVector,
    LANE_TOKENS,
};
pub use types::{GgmlType, QK_K};
