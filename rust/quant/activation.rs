//! Activations converted to the format a weight type's dot product consumes (ggml's
//! `vec_dot_type`), with the rounding of ggml's x86 quantisers: Q8_0 and Q8_1 as ggml's
//! AVX2 `quantize_row_q8_0` / `quantize_row_q8_1` (scale `127 / amax`, halves rounded to
//! even), which the x86 builds of llama.cpp use in place of the portable
//! `quantize_row_q8_0_ref` / `quantize_row_q8_1_ref`; Q8_K as `quantize_row_q8_K_ref`
//! (ggml's x86 Q8_K quantiser is the reference one).

use half::f16;

use super::blocks::{Block as _, BlockQ8K, BlockQ8_0, BlockQ8_1, QK_K};
use super::dispatch::Kernels;
use super::GgmlType;
use crate::error::{EngineError, Result};

/// The format activations are converted to before a dot product with a weight row of type
/// `ty` (ggml's `vec_dot_type`). Q8_1 and Q8_K, which only ggml's activations use, pair
/// with themselves.
pub fn activation_type(ty: GgmlType) -> GgmlType {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => GgmlType::Q8_0,
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => GgmlType::Q8_1,
        GgmlType::Q2K
        | GgmlType::Q3K
        | GgmlType::Q4K
        | GgmlType::Q5K
        | GgmlType::Q6K
        | GgmlType::Q8K => GgmlType::Q8K,
        GgmlType::F16 => GgmlType::F16,
        GgmlType::BF16 => GgmlType::BF16,
        GgmlType::F32 => GgmlType::F32,
    }
}

/// One row of activations in the format of [`activation_type`]. The byte buffer is reused:
/// quantising rows of a length seen before does not allocate, so the decode loop does not.
#[derive(Clone, Debug)]
pub struct QuantizedActivations {
    format: GgmlType,
    n: usize,
    bytes: Vec<u8>,
    /// The f16 block scales of Q8_0 (`d`) and Q8_1 (`d`, `s`) widened to f32, block by
    /// block: the rows-by-tokens kernels read them once per (quad of rows, block, token),
    /// where widening in the kernel cost more than the dot product itself.
    block_scales: Vec<f32>,
    /// Q8_0 only: per block, the offset shares `-8 * sum y[4k..4k+4]` of the eight lanes
    /// k = 0..8 of ggml's AVX2 dot products (lanes 0..4 meet the low nibbles of a 4/5-bit
    /// block, lanes 4..8 the high nibbles), then `-16 * sum y[4k..4k+4]`. Q4_0 and Q5_0
    /// kernels multiply stored values `w + 8` and `w + 16` and take these shares off their
    /// lane sums for every (quad of rows, block, token); reading them here spares those
    /// multiply-adds (or shifts).
    neg_offset_sums: Vec<i32>,
    /// F16 only: the values widened back to f32 (exactly), which the batch kernels read
    /// rather than converting every token's values again for every four rows.
    widened: Vec<f32>,
    /// Where this row sits in the batch llama.cpp would multiply it in: row `index` of
    /// `batch_len` (see `quant::DotBatchFn`).
    batch_index: usize,
    batch_len: usize,
}

impl Default for QuantizedActivations {
    fn default() -> Self {
        Self::new()
    }
}

impl QuantizedActivations {
    pub fn new() -> Self {
        Self {
            format: GgmlType::F32,
            n: 0,
            bytes: Vec::new(),
            block_scales: Vec::new(),
            neg_offset_sums: Vec::new(),
            widened: Vec::new(),
            batch_index: 0,
            batch_len: 1,
        }
    }

    /// Places this row as row `index` of a batch of `len` (a lone row is `(0, 1)`).
    pub fn set_batch_place(&mut self, index: usize, len: usize) {
        self.batch_index = index;
        self.batch_len = len.max(1);
    }

    /// `(index, len)`: this row's place in its batch.
    pub fn batch_place(&self) -> (usize, usize) {
        (self.batch_index, self.batch_len)
    }

    /// Quantises `x` for dot products with weights of type `weight_type`, rounding exactly
    /// as ggml's x86 quantisers and its fp32->fp16 / fp32->bf16 conversions do.
    /// `x.len()` must be a multiple of the weight type's block size.
    pub fn quantize(&mut self, weight_type: GgmlType, x: &[f32]) -> Result<()> {
        self.quantize_with(super::dispatch::kernels(), weight_type, x)
    }

    /// [`Self::quantize`] with the quantisers of a given kernel set (benchmarks and tests
    /// compare levels with it); every level writes the same bytes.
    pub fn quantize_with(
        &mut self,
        kernels: &Kernels,
        weight_type: GgmlType,
        x: &[f32],
    ) -> Result<()> {
        let format = activation_type(weight_type);
        let block = weight_type.block_size().max(format.block_size());
        let size = format
            .bytes_for(x.len() as u64)
            .and_then(|s| usize::try_from(s).ok());
        let size = match size {
            Some(size) if x.len().is_multiple_of(block) => size,
            _ => {
                return Err(EngineError::invalid(
                    "activations",
                    format!(
                        "{} values cannot be quantised for {weight_type} weights: \
                         the length must be a multiple of {block}",
                        x.len()
                    ),
                ))
            }
        };
        // Every byte is overwritten below, so resizing (which allocates only when the row
        // grows past the capacity) is all the preparation needed.
        self.bytes.resize(size, 0);
        self.format = format;
        self.n = x.len();
        let out = self.bytes.as_mut_slice();
        match format {
            GgmlType::Q8_0 => (kernels.quantize_q8_0)(x, out),
            GgmlType::Q8_1 => (kernels.quantize_q8_1)(x, out),
            GgmlType::Q8K => (kernels.quantize_q8_k)(x, out),
            GgmlType::F16 => (kernels.convert_f16)(x, out),
            GgmlType::BF16 => {
                for (v, o) in x.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&fp32_to_bf16_bits(*v).to_le_bytes());
                }
            }
            GgmlType::F32 => {
                for (v, o) in x.iter().zip(out.chunks_exact_mut(4)) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            // activation_type never returns these; the match keeps new types a compile error.
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K => {
                return Err(EngineError::Internal(format!(
                    "{format} is not an activation format"
                )))
            }
        }
        self.block_scales.clear();
        let scaled_blocks = match format {
            GgmlType::Q8_0 => Some((34, 1)),
            GgmlType::Q8_1 => Some((36, 2)),
            _ => None,
        };
        if let Some((block_bytes, scales)) = scaled_blocks {
            for block in self.bytes.chunks_exact(block_bytes) {
                for pair in block[..2 * scales].chunks_exact(2) {
                    let bits = u16::from_le_bytes([pair[0], pair[1]]);
                    self.block_scales.push(f16::from_bits(bits).to_f32());
                }
            }
        }
        self.widened.clear();
        if format == GgmlType::F16 {
            // The f16 values widened back are `x` rounded to f16 (both conversions round to
            // nearest even), which the vector rounding gets in one pass over a copy.
            self.widened.extend_from_slice(x);
            crate::kernels::ggml_f32::round_to_f16(&mut self.widened);
        }
        self.neg_offset_sums.clear();
        if format == GgmlType::Q8_0 {
            for block in self.bytes.chunks_exact(34) {
                let q = |i: usize| i32::from(block[2 + i] as i8);
                let sums: [i32; 8] = std::array::from_fn(|k| (4 * k..4 * k + 4).map(q).sum());
                for offset in [8, 16] {
                    self.neg_offset_sums.extend(sums.map(|sum| -offset * sum));
                }
            }
        }
        Ok(())
    }

    /// Number of activation values.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn format(&self) -> GgmlType {
        self.format
    }

    /// The quantised row, `format().bytes_for(len())` bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The block scales as f32 (exact widenings of the f16 fields): one per Q8_0 block
    /// (`d`), two per Q8_1 block (`d`, `s`), none for other formats.
    pub fn block_scales(&self) -> &[f32] {
        &self.block_scales
    }

    /// F16 only (otherwise empty): the f16 values widened to f32.
    pub fn widened(&self) -> &[f32] {
        &self.widened
    }

    /// Q8_0 only (otherwise empty): sixteen per block, `-8 * sum q[4k..4k+4]` for lanes
    /// k = 0..8, then `-16 * sum q[4k..4k+4]`.
    pub fn neg_offset_sums(&self) -> &[i32] {
        &self.neg_offset_sums
    }
}

/// ggml's fp32 -> bf16: round to nearest even, NaNs kept NaN (forced quiet).
pub fn fp32_to_bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 64) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    ((u64::from(bits) + u64::from(rounding)) >> 16) as u16
}

/// The scale `d = amax / 127` and the multiplier `id = 127 / amax` (0 for an all-zero
/// block), as ggml's x86 `quantize_row_q8_0` / `q8_1` compute them. (The portable
/// reference takes `id = 1 / d`, which differs from `127 / amax` in the last bit for some
/// `amax`.)
fn q8_scale(x: &[f32; 32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    (d, id)
}

/// `_mm256_round_ps(v, _MM_ROUND_NEAREST)` (to nearest, halves to even; the reference's
/// `roundf` takes halves away from zero) then the `cvtps` / pack to `int8_t`; `as`
/// saturates, which only matters for NaN or infinite inputs, where ggml's result differs.
fn round_to_i8(v: f32) -> i8 {
    v.round_ties_even() as i8
}

fn activation_blocks<'a, const N: usize>(
    x: &'a [f32],
    out: &'a mut [u8],
    size: usize,
) -> impl Iterator<Item = (&'a [f32; N], &'a mut [u8])> {
    x.chunks_exact(N)
        .filter_map(|c| c.first_chunk::<N>())
        .zip(out.chunks_exact_mut(size))
}

/// ggml's fp32 -> fp16: IEEE round to nearest even, as `F16C`'s `vcvtps2ph` does.
pub fn convert_f16(x: &[f32], out: &mut [u8]) {
    for (v, o) in x.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
    }
}

/// ggml's x86 `quantize_row_q8_0`: `d = amax / 127`, `q = x * (127 / amax)` rounded to
/// nearest, halves to even; `d` stored as fp16.
pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (x, o) in activation_blocks::<32>(x, out, 34) {
        let (d, id) = q8_scale(x);
        let block = BlockQ8_0 {
            d: f16::from_f32(d),
            qs: x.map(|v| round_to_i8(v * id)),
        };
        // Cannot fail: `o` is exactly one block long.
        let _ = block.write(o);
    }
}

/// ggml's x86 `quantize_row_q8_1`: Q8_0 plus `s = fp16(d * sum(q))` with the unrounded `d`.
pub fn quantize_q8_1(x: &[f32], out: &mut [u8]) {
    for (x, o) in activation_blocks::<32>(x, out, 36) {
        let (d, id) = q8_scale(x);
        let qs = x.map(|v| round_to_i8(v * id));
        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        let block = BlockQ8_1 {
            d: f16::from_f32(d),
            s: f16::from_f32(sum as f32 * d),
            qs,
        };
        let _ = block.write(o);
    }
}

/// ggml's `quantize_row_q8_K_ref`: the scale comes from the signed value of largest
/// magnitude (`iscale = -127 / max`), quants are rounded half to even (ggml's `nearest_int`)
/// and capped at 127, `d = 1 / iscale`, and `bsums` holds the sum of each 16 quants.
pub fn quantize_q8_k(x: &[f32], out: &mut [u8]) {
    for (x, o) in activation_blocks::<QK_K>(x, out, BlockQ8K::SIZE) {
        let mut max = 0f32;
        let mut amax = 0f32;
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let block = if amax == 0.0 {
            BlockQ8K {
                d: 0.0,
                qs: [0; QK_K],
                bsums: [0; 16],
            }
        } else {
            let iscale = -127.0 / max;
            let qs = x.map(|v| nearest_int(iscale * v).min(127) as i8);
            let mut bsums = [0i16; 16];
            for (sum, group) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
                *sum = group.iter().map(|&q| i16::from(q)).sum();
            }
            BlockQ8K {
                d: 1.0 / iscale,
                qs,
                bsums,
            }
        };
        let _ = block.write(o);
    }
}

/// ggml's `nearest_int`: adding 1.5 * 2^23 rounds to an integer, half to even, for
/// |v| < 2^22 (here |v| <= 127 up to rounding); `round_ties_even` is the same operation.
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::blocks::Block;

    #[test]
    fn activation_types_follow_ggml_vec_dot_type() {
        use GgmlType::*;
        let expected = [
            (F32, F32),
            (F16, F16),
            (BF16, BF16),
            (Q4_0, Q8_0),
            (Q5_0, Q8_0),
            (Q8_0, Q8_0),
            (Q4_1, Q8_1),
            (Q5_1, Q8_1),
            (Q8_1, Q8_1),
            (Q2K, Q8K),
            (Q3K, Q8K),
            (Q4K, Q8K),
            (Q5K, Q8K),
            (Q6K, Q8K),
            (Q8K, Q8K),
        ];
        assert_eq!(expected.len(), GgmlType::ALL.len());
        for (weight, act) in expected {
            assert_eq!(activation_type(weight), act, "{weight}");
        }
    }

    #[test]
    fn rejects_lengths_that_are_not_whole_blocks() {
        let mut acts = QuantizedActivations::new();
        let err = acts
            .quantize(GgmlType::Q4K, &[0.0; 32])
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("activations: 32 values cannot be quantised for Q4_K weights: the length must be a multiple of 256")
        );
        assert!(acts.quantize(GgmlType::Q4_0, &[0.0; 31]).is_err());
        assert!(acts.quantize(GgmlType::F32, &[0.0; 3]).is_ok());
        assert_eq!(
            (acts.len(), acts.format(), acts.bytes().len()),
            (3, GgmlType::F32, 12)
        );
    }

    #[test]
    fn reuses_its_buffer() {
        let mut acts = QuantizedActivations::new();
        let x: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin()).collect();
        assert!(acts.quantize(GgmlType::Q4K, &x).is_ok());
        let ptr = acts.bytes().as_ptr();
        for ty in [GgmlType::Q6K, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q4K] {
            assert!(acts.quantize(ty, &x).is_ok());
            assert_eq!(acts.bytes().as_ptr(), ptr, "{ty}");
        }
        assert_eq!(acts.bytes().len(), 2 * BlockQ8K::SIZE);
    }

    #[test]
    fn q8_0_rounds_halves_to_even() {
        // amax = 127 gives id = 127 / 127 = 1 exactly, so x * id = x and ties stay ties.
        let mut x = [0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 0.5;
        x[4] = 3.5;
        x[5] = -1.5;
        x[6] = -0.5;
        let mut out = [0u8; 34];
        quantize_q8_0(&x, &mut out);
        let block = BlockQ8_0::read(&out);
        assert_eq!(
            block.map(|b| (b.d.to_f32(), b.qs[..7].to_vec())),
            Some((1.0, vec![127, 2, -2, 0, 4, -2, 0]))
        );
    }

    #[test]
    fn q8_scale_is_127_over_amax_not_the_inverse_of_d() {
        // amax = 1.0625: 1 / d = 119.52942 but 127 / amax = 119.52941 (one ulp apart).
        // For x = 0.029281495, x * (1 / d) is exactly 3.5 (4 with ties to even) while
        // x * (127 / amax) is 3.4999998: ggml's x86 quantiser gives 3.
        let amax = 1.0625f32;
        let d = amax / 127.0;
        assert_eq!((1.0 / d).to_bits(), 0x42ef_0f10);
        assert_eq!((127.0 / amax).to_bits(), 0x42ef_0f0f);
        let v = f32::from_bits(0x3cef_dfbf);
        let mut x = [0f32; 32];
        x[0] = -amax;
        x[1] = v;
        x[2] = -v;
        assert_eq!(q8_scale(&x), (d, 127.0 / amax));
        let mut out = [0u8; 36];
        quantize_q8_1(&x, &mut out);
        let block = BlockQ8_1::read(&out);
        assert_eq!(block.map(|b| b.qs[..3].to_vec()), Some(vec![-127, 3, -3]));
        assert_eq!(
            block.map(|b| (b.d.to_bits(), b.s.to_bits())),
            Some((
                f16::from_f32(d).to_bits(),
                f16::from_f32(d * -127.0).to_bits()
            ))
        );
    }

    #[test]
    fn q8_k_rounds_halves_to_even_and_caps_at_127() {
        let mut x = [0f32; QK_K];
        x[0] = -127.0; // max = -127 -> iscale = 1
        x[1] = 2.5;
        x[2] = -3.5;
        x[3] = 0.5;
        x[17] = 127.0;
        let mut out = vec![0u8; BlockQ8K::SIZE];
        quantize_q8_k(&x, &mut out);
        let block = BlockQ8K::read(&out);
        assert_eq!(
            block.map(|b| (b.d, b.qs[0], b.qs[1], b.qs[2], b.qs[3], b.qs[17])),
            Some((1.0, -127, 2, -4, 0, 127))
        );
        assert_eq!(block.map(|b| (b.bsums[0], b.bsums[1])), Some((-129, 127)));

        // A positive max flips the sign: iscale = -127 / max, d = 1 / iscale < 0.
        let mut x = [0f32; QK_K];
        x[5] = 508.0;
        x[6] = -254.0;
        quantize_q8_k(&x, &mut out);
        let block = BlockQ8K::read(&out);
        assert_eq!(
            block.map(|b| (b.d, b.qs[5], b.qs[6])),
            Some((-4.0, -127, 64))
        );
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(fp32_to_bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties to even (1.0).
        assert_eq!(fp32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(fp32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(fp32_to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(fp32_to_bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(fp32_to_bf16_bits(f32::INFINITY), 0x7f80);
    }
}
