//! Scalar dequantisation, bit-exact with ggml's `dequantize_row_*`: every element is computed
//! with the same f32 operations in the same order, so results match to the last bit. This is
//! the oracle the dot products and any SIMD kernels are tested against.

use super::blocks::{
    bf16_bits_to_f32, blocks, f16_bits_to_f32, k4_scales_mins, q3k_scales, q5_values, widen, Block,
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, QK_K,
};
use super::GgmlType;
use crate::error::{EngineError, Result};

/// Dequantises whole blocks of type `ty` from `bytes` into `out`.
///
/// `out.len()` must be a multiple of the type's block size and `bytes.len()` exactly the
/// size of that many elements; otherwise an `InvalidArgument` error names the type and both
/// lengths. Bit-exact with ggml's `dequantize_row_*` (Q8_1, which ggml never dequantises,
/// is `q * d`).
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let expected = ty.bytes_for(out.len() as u64);
    if expected != Some(bytes.len() as u64) {
        let need = match expected {
            Some(n) => format!("{n} bytes"),
            None => format!("a multiple of {} elements", ty.block_size()),
        };
        return Err(EngineError::invalid(
            format!("{ty} data"),
            format!(
                "{} bytes cannot be dequantised into {} values (need {need})",
                bytes.len(),
                out.len()
            ),
        ));
    }
    match ty {
        GgmlType::F32 => f32s(bytes, out),
        GgmlType::F16 => f16s(bytes, out),
        GgmlType::BF16 => bf16s(bytes, out),
        GgmlType::Q4_0 => q4_0(bytes, out),
        GgmlType::Q4_1 => q4_1(bytes, out),
        GgmlType::Q5_0 => q5_0(bytes, out),
        GgmlType::Q5_1 => q5_1(bytes, out),
        GgmlType::Q8_0 => q8_0(bytes, out),
        GgmlType::Q8_1 => q8_1(bytes, out),
        GgmlType::Q2K => q2_k(bytes, out),
        GgmlType::Q3K => q3_k(bytes, out),
        GgmlType::Q4K => q4_k(bytes, out),
        GgmlType::Q5K => q5_k(bytes, out),
        GgmlType::Q6K => q6_k(bytes, out),
        GgmlType::Q8K => q8_k(bytes, out),
    }
    Ok(())
}

/// `out` split into fixed-size output blocks.
fn out_blocks<const N: usize>(out: &mut [f32]) -> impl Iterator<Item = &mut [f32; N]> {
    out.chunks_exact_mut(N).filter_map(|c| c.try_into().ok())
}

/// Each block of `bytes` with the output block it fills.
fn pairs<'a, B: Block, const N: usize>(
    bytes: &'a [u8],
    out: &'a mut [f32],
) -> impl Iterator<Item = (B, &'a mut [f32; N])> {
    blocks::<B>(bytes).zip(out_blocks::<N>(out))
}

/// The little-endian `N`-byte scalars in `bytes`.
pub(super) fn scalars<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes
        .chunks_exact(N)
        .filter_map(|c| c.first_chunk::<N>().copied())
}

fn f32s(bytes: &[u8], out: &mut [f32]) {
    for (y, b) in out.iter_mut().zip(scalars(bytes)) {
        *y = f32::from_le_bytes(b);
    }
}

fn f16s(bytes: &[u8], out: &mut [f32]) {
    for (y, b) in out.iter_mut().zip(scalars(bytes)) {
        *y = f16_bits_to_f32(u16::from_le_bytes(b));
    }
}

fn bf16s(bytes: &[u8], out: &mut [f32]) {
    for (y, b) in out.iter_mut().zip(scalars(bytes)) {
        *y = bf16_bits_to_f32(u16::from_le_bytes(b));
    }
}

fn q4_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in pairs::<BlockQ4_0, 32>(bytes, out) {
        let d = widen(b.d);
        for (j, q) in b.qs.iter().enumerate() {
            y[j] = (i32::from(q & 0x0F) - 8) as f32 * d;
            y[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
        }
    }
}

fn q4_1(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in pairs::<BlockQ4_1, 32>(bytes, out) {
        let (d, m) = (widen(b.d), widen(b.m));
        for (j, q) in b.qs.iter().enumerate() {
            y[j] = f32::from(q & 0x0F) * d + m;
            y[j + 16] = f32::from(q >> 4) * d + m;
        }
    }
}

fn q5_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in pairs::<BlockQ5_0, 32>(bytes, out) {
        let d = widen(b.d);
        for (y, v) in y.iter_mut().zip(q5_values(b.qh, &b.qs)) {
            *y = (i32::from(v) - 16) as f32 * d;
        }
    }
}

fn q5_1(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in pairs::<BlockQ5_1, 32>(bytes, out) {
        let (d, m) = (widen(b.d), widen(b.m));
        for (y, v) in y.iter_mut().zip(q5_values(b.qh, &b.qs)) {
            *y = f32::from(v) * d + m;
        }
    }
}

fn q8_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in pairs::<BlockQ8_0, 32>(bytes, out) {
        let d = widen(b.d);
        for (y, q) in y.iter_mut().zip(b.qs) {
            *y = f32::from(q) * d;
        }
    }
}

fn q8_1(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in pairs::<BlockQ8_1, 32>(bytes, out) {
        let d = widen(b.d);
        for (y, q) in y.iter_mut().zip(b.qs) {
            *y = f32::from(q) * d;
        }
    }
}

// K-quants: the per-block `values()` unpack the quants in element order (see blocks.rs);
// what remains here is ggml's arithmetic on them.

fn q2_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in pairs::<BlockQ2K, QK_K>(bytes, out) {
        let (d, dmin) = (widen(b.d), widen(b.dmin));
        for (g, (y, q)) in y
            .chunks_exact_mut(16)
            .zip(b.values().chunks_exact(16))
            .enumerate()
        {
            let dl = d * f32::from(b.scales[g] & 0x0F);
            let ml = dmin * f32::from(b.scales[g] >> 4);
            for (y, &q) in y.iter_mut().zip(q) {
                *y = dl * f32::from(q) - ml;
            }
        }
    }
}

fn q3_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in pairs::<BlockQ3K, QK_K>(bytes, out) {
        let d = widen(b.d);
        let scales = q3k_scales(&b.scales);
        for (g, (y, q)) in y
            .chunks_exact_mut(16)
            .zip(b.values().chunks_exact(16))
            .enumerate()
        {
            let dl = d * scales[g] as f32;
            for (y, &q) in y.iter_mut().zip(q) {
                *y = dl * f32::from(q);
            }
        }
    }
}

fn q4_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in pairs::<BlockQ4K, QK_K>(bytes, out) {
        let (d, dmin) = (widen(b.d), widen(b.dmin));
        let (scales, mins) = k4_scales_mins(&b.scales);
        for (g, (y, q)) in y
            .chunks_exact_mut(32)
            .zip(b.values().chunks_exact(32))
            .enumerate()
        {
            let d1 = d * f32::from(scales[g]);
            let m1 = dmin * f32::from(mins[g]);
            for (y, &q) in y.iter_mut().zip(q) {
                *y = d1 * f32::from(q) - m1;
            }
        }
    }
}

fn q5_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in pairs::<BlockQ5K, QK_K>(bytes, out) {
        let (d, dmin) = (widen(b.d), widen(b.dmin));
        let (scales, mins) = k4_scales_mins(&b.scales);
        for (g, (y, q)) in y
            .chunks_exact_mut(32)
            .zip(b.values().chunks_exact(32))
            .enumerate()
        {
            let d1 = d * f32::from(scales[g]);
            let m1 = dmin * f32::from(mins[g]);
            for (y, &q) in y.iter_mut().zip(q) {
                *y = d1 * f32::from(q) - m1;
            }
        }
    }
}

fn q6_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in pairs::<BlockQ6K, QK_K>(bytes, out) {
        let d = widen(b.d);
        for (g, (y, q)) in y
            .chunks_exact_mut(16)
            .zip(b.values().chunks_exact(16))
            .enumerate()
        {
            // ggml evaluates `d * sc * q` left to right: the group scale first.
            let dl = d * f32::from(b.scales[g]);
            for (y, &q) in y.iter_mut().zip(q) {
                *y = dl * f32::from(q);
            }
        }
    }
}

fn q8_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in pairs::<BlockQ8K, QK_K>(bytes, out) {
        for (y, q) in y.iter_mut().zip(b.qs) {
            *y = b.d * f32::from(q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn rejects_partial_blocks_and_wrong_byte_counts() {
        let mut out = [0f32; 33];
        let err = dequantize(GgmlType::Q4_0, &[0; 18], &mut out)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("Q4_0 data: 18 bytes cannot be dequantised into 33 values (need a multiple of 32 elements)")
        );
        let err = dequantize(GgmlType::Q6K, &[0; 209], &mut [0f32; 256])
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("Q6_K data: 209 bytes cannot be dequantised into 256 values (need 210 bytes)")
        );
        assert!(dequantize(GgmlType::F16, &[0; 2], &mut []).is_err());
        assert!(dequantize(GgmlType::Q8_0, &[], &mut []).is_ok());
    }

    #[test]
    fn q4_0_nibble_order_and_offset() {
        // d = 2.0; byte j holds element j (low nibble) and element j + 16 (high nibble).
        let mut bytes = vec![0x00, 0x40];
        bytes.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        assert!(dequantize(GgmlType::Q4_0, &bytes, &mut out).is_ok());
        assert_eq!(out[0], -16.0);
        assert_eq!(out[15], 14.0);
        assert_eq!(out[16], 14.0);
        assert_eq!(out[31], -16.0);
    }

    #[test]
    fn q5_values_take_bit_four_from_qh() {
        let qs = [0x21u8; 16];
        let v = q5_values([0b0000_0001, 0, 0b0000_0001, 0x80], &qs);
        assert_eq!(v[0], 0x11);
        assert_eq!(v[1], 0x01);
        assert_eq!(v[16], 0x12);
        assert_eq!(v[31], 0x12);
        assert_eq!(v[17], 0x02);
    }

    #[test]
    fn f16_and_bf16_are_exact_widenings() {
        let mut out = [0f32; 2];
        let bytes = [
            f16::from_f32(1.5).to_le_bytes(),
            f16::from_bits(0x0001).to_le_bytes(),
        ]
        .concat();
        assert!(dequantize(GgmlType::F16, &bytes, &mut out).is_ok());
        assert_eq!(out, [1.5, 2f32.powi(-24)]);
        let bytes = [half::bf16::from_f32(-3.0).to_le_bytes(), [0x80, 0x7F]].concat();
        assert!(dequantize(GgmlType::BF16, &bytes, &mut out).is_ok());
        assert_eq!(out, [-3.0, f32::INFINITY]);
    }
}
