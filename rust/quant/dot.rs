//! Choosing the dot-product kernel for a weight type. Today every type has one portable
//! kernel in `dot_scalar`; SIMD twins with the same names will be chosen per CPU by a
//! runtime table (dispatch.rs) behind [`kernel_for`], without callers changing.

use super::activation::{activation_type, QuantizedActivations};
use super::dot_scalar as scalar;
use super::GgmlType;

/// A dot product of `n` elements: one weight row's bytes with quantised activation bytes.
pub type DotFn = fn(row: &[u8], act: &[u8], n: usize) -> f32;

/// The kernel for weight rows of type `ty` against activations in `activation_type(ty)`.
pub fn kernel_for(ty: GgmlType) -> DotFn {
    match ty {
        GgmlType::F32 => scalar::dot_f32_f32,
        GgmlType::F16 => scalar::dot_f16_f16,
        GgmlType::BF16 => scalar::dot_bf16_bf16,
        GgmlType::Q4_0 => scalar::dot_q4_0_q8_0,
        GgmlType::Q4_1 => scalar::dot_q4_1_q8_1,
        GgmlType::Q5_0 => scalar::dot_q5_0_q8_0,
        GgmlType::Q5_1 => scalar::dot_q5_1_q8_1,
        GgmlType::Q8_0 => scalar::dot_q8_0_q8_0,
        GgmlType::Q8_1 => scalar::dot_q8_1_q8_1,
        GgmlType::Q2K => scalar::dot_q2_k_q8_k,
        GgmlType::Q3K => scalar::dot_q3_k_q8_k,
        GgmlType::Q4K => scalar::dot_q4_k_q8_k,
        GgmlType::Q5K => scalar::dot_q5_k_q8_k,
        GgmlType::Q6K => scalar::dot_q6_k_q8_k,
        GgmlType::Q8K => scalar::dot_q8_k_q8_k,
    }
}

/// Dot product of one weight row of type `ty` (the bytes of `act.len()` elements) with
/// activations quantised for `ty`, computed as ggml's reference `ggml_vec_dot_*` does.
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
