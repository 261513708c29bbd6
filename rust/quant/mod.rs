//! ggml tensor formats: the block layouts, bit-exact dequantisation, activation
//! quantisation and the dot products a matrix-vector product is built from.
//!
//! - `types`: the type table (ids, block and byte sizes);
//! - `blocks`: one `#[repr(C)]` struct per block layout, read from unaligned bytes;
//! - `dequant`: [`dequantize`], bit-exact with ggml's `dequantize_row_*`;
//! - `activation`: [`QuantizedActivations`], ggml's `quantize_row_q8_*_ref` rounding;
//! - `dot_scalar`: portable `dot_<weights>_<activations>` kernels, ggml's generic arithmetic;
//! - `dot`: [`dot_row`] and the per-type kernel choice SIMD variants will plug into.

mod activation;
mod blocks;
mod dequant;
mod dot;
mod dot_scalar;
pub mod types;

#[cfg(test)]
mod tests;

pub use activation::{activation_type, QuantizedActivations};
pub use dequant::dequantize;
pub use dot::{dot_row, kernel_for, DotFn};
pub use types::{GgmlType, QK_K};
