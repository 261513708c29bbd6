//! Portable dot products of one weight row with quantised activations: the reference every
//! SIMD twin (`dot_avx2.rs`, ...) is tested against, and the fallback on any CPU.
//!
//! Each `dot_<weights>_<activations>(row, act, n)` does the arithmetic of ggml's
//! `ggml_vec_dot_*_generic`: exact integer sums within a block, then the same f32 scale
//! products accumulated in the same order (Rust never fuses them into FMAs). llama.cpp's SIMD
//! kernels accumulate in other orders, so they agree with these to f32 rounding, not bits.
//! `row` and `act` hold `n` elements each; blocks past the shorter of the two are ignored,
//! so a length mismatch gives a wrong number, never an out-of-bounds read.

use super::blocks::{
    bf16_bits_to_f32, blocks, f16_bits_to_f32, k4_scales_mins, q3k_scales, q5_values, widen, Block,
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, QK_K,
};
use super::dequant::scalars;

/// Weight blocks paired with the activation blocks covering the same elements.
fn block_pairs<'a, W: Block, A: Block>(
    row: &'a [u8],
    act: &'a [u8],
    n: usize,
) -> impl Iterator<Item = (W, A)> + 'a {
    blocks::<W>(row).zip(blocks::<A>(act)).take(n / W::ELEMENTS)
}

/// Sum of products of two blocks of 8-bit integers.
#[inline]
fn int_dot(w: &[i8], q8: &[i8]) -> i32 {
    w.iter()
        .zip(q8)
        .map(|(&w, &q)| i32::from(w) * i32::from(q))
        .sum()
}

// ---- 32-element formats -------------------------------------------------------------

pub fn dot_q4_0_q8_0(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in block_pairs::<BlockQ4_0, BlockQ8_0>(row, act, n) {
        let mut w = [0i8; 32];
        for (j, q) in x.qs.iter().enumerate() {
            w[j] = (q & 0x0F) as i8 - 8;
            w[j + 16] = (q >> 4) as i8 - 8;
        }
        let sumi = int_dot(&w, &y.qs);
        sumf += sumi as f32 * widen(x.d) * widen(y.d);
    }
    sumf
}

pub fn dot_q4_1_q8_1(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in block_pairs::<BlockQ4_1, BlockQ8_1>(row, act, n) {
        let mut w = [0i8; 32];
        for (j, q) in x.qs.iter().enumerate() {
            w[j] = (q & 0x0F) as i8;
            w[j + 16] = (q >> 4) as i8;
        }
        let sumi = int_dot(&w, &y.qs);
        // The minimum contributes m * sum(x) = m * s, with s precomputed by the quantiser.
        sumf += (widen(x.d) * widen(y.d)) * sumi as f32 + widen(x.m) * widen(y.s);
    }
    sumf
}

pub fn dot_q5_0_q8_0(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in block_pairs::<BlockQ5_0, BlockQ8_0>(row, act, n) {
        let w = q5_values(x.qh, &x.qs).map(|v| v as i8 - 16);
        let sumi = int_dot(&w, &y.qs);
        sumf += (widen(x.d) * widen(y.d)) * sumi as f32;
    }
    sumf
}

pub fn dot_q5_1_q8_1(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in block_pairs::<BlockQ5_1, BlockQ8_1>(row, act, n) {
        let w = q5_values(x.qh, &x.qs).map(|v| v as i8);
        let sumi = int_dot(&w, &y.qs);
        sumf += (widen(x.d) * widen(y.d)) * sumi as f32 + widen(x.m) * widen(y.s);
    }
    sumf
}

pub fn dot_q8_0_q8_0(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in block_pairs::<BlockQ8_0, BlockQ8_0>(row, act, n) {
        let sumi = int_dot(&x.qs, &y.qs);
        sumf += sumi as f32 * (widen(x.d) * widen(y.d));
    }
    sumf
}

/// Q8_1 weights exist only as a ggml activation format; defined like Q8_0 x Q8_0.
pub fn dot_q8_1_q8_1(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in block_pairs::<BlockQ8_1, BlockQ8_1>(row, act, n) {
        let sumi = int_dot(&x.qs, &y.qs);
        sumf += sumi as f32 * (widen(x.d) * widen(y.d));
    }
    sumf
}

// ---- K-quants -----------------------------------------------------------------------

/// ggml's generic K-quant kernels accumulate `scale * w * q8` in eight integer lanes (lane =
/// element index mod 8) and turn each lane into f32 separately; keeping the lanes keeps the
/// f32 rounding identical. `scales[g]` is the scale of 16-element group `g`.
#[inline]
fn lane_sums(w: &[i8; QK_K], q8: &[i8; QK_K], scales: &[i32; 16]) -> [i32; 8] {
    let mut lanes = [0i32; 8];
    for ((w, q8), &scale) in w.chunks_exact(16).zip(q8.chunks_exact(16)).zip(scales) {
        for (i, (&w, &q)) in w.iter().zip(q8).enumerate() {
            lanes[i % 8] += scale * (i32::from(w) * i32::from(q));
        }
    }
    lanes
}

/// Eight f32 lane accumulators shared across the blocks of a row, as ggml's `sums[8]`.
#[derive(Default)]
struct Lanes([f32; 8]);

impl Lanes {
    #[inline]
    fn add(&mut self, d: f32, lanes: [i32; 8]) {
        for (sum, lane) in self.0.iter_mut().zip(lanes) {
            *sum += d * lane as f32;
        }
    }

    #[inline]
    fn total(&self, start: f32) -> f32 {
        self.0.iter().fold(start, |acc, s| acc + s)
    }
}

/// Q4_K/Q5_K group scales (one per 32 elements) spread to one per 16 elements, and the
/// integer sum of `min * q8` over the block, which ggml takes from the Q8_K `bsums`.
#[inline]
fn k4_scales_and_min_sum(packed: &[u8; 12], bsums: &[i16; 16]) -> ([i32; 16], i32) {
    let (scales, mins) = k4_scales_mins(packed);
    let mut per16 = [0i32; 16];
    let mut min_sum = 0i32;
    for (j, (scale, &bsum)) in per16.iter_mut().zip(bsums).enumerate() {
        *scale = i32::from(scales[j / 2]);
        min_sum += i32::from(bsum) * i32::from(mins[j / 2]);
    }
    (per16, min_sum)
}

pub fn dot_q2_k_q8_k(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in block_pairs::<BlockQ2K, BlockQ8K>(row, act, n) {
        let min_sum: i32 = x
            .scales
            .iter()
            .zip(&y.bsums)
            .map(|(&sc, &b)| i32::from(b) * i32::from(sc >> 4))
            .sum();
        let dall = y.d * widen(x.d);
        let dmin = y.d * widen(x.dmin);
        let w = x.values();
        let mut isum = 0i32;
        for ((w, q8), &sc) in w.chunks_exact(16).zip(y.qs.chunks_exact(16)).zip(&x.scales) {
            let group: i32 = w
                .iter()
                .zip(q8)
                .map(|(&w, &q)| i32::from(w) * i32::from(q))
                .sum();
            isum += i32::from(sc & 0x0F) * group;
        }
        sumf += dall * isum as f32 - dmin * min_sum as f32;
    }
    sumf
}

pub fn dot_q3_k_q8_k(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sums = Lanes::default();
    for (x, y) in block_pairs::<BlockQ3K, BlockQ8K>(row, act, n) {
        let lanes = lane_sums(&x.values(), &y.qs, &q3k_scales(&x.scales));
        sums.add(widen(x.d) * y.d, lanes);
    }
    sums.total(0.0)
}

pub fn dot_q4_k_q8_k(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sums = Lanes::default();
    let mut sumf = 0f32;
    for (x, y) in block_pairs::<BlockQ4K, BlockQ8K>(row, act, n) {
        let (scales, min_sum) = k4_scales_and_min_sum(&x.scales, &y.bsums);
        let w = x.values().map(|v| v as i8);
        sums.add(widen(x.d) * y.d, lane_sums(&w, &y.qs, &scales));
        sumf -= widen(x.dmin) * y.d * min_sum as f32;
    }
    sums.total(sumf)
}

pub fn dot_q5_k_q8_k(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sums = Lanes::default();
    let mut sumf = 0f32;
    for (x, y) in block_pairs::<BlockQ5K, BlockQ8K>(row, act, n) {
        let (scales, min_sum) = k4_scales_and_min_sum(&x.scales, &y.bsums);
        let w = x.values().map(|v| v as i8);
        sums.add(widen(x.d) * y.d, lane_sums(&w, &y.qs, &scales));
        sumf -= widen(x.dmin) * y.d * min_sum as f32;
    }
    sums.total(sumf)
}

pub fn dot_q6_k_q8_k(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sums = Lanes::default();
    for (x, y) in block_pairs::<BlockQ6K, BlockQ8K>(row, act, n) {
        let scales = x.scales.map(i32::from);
        sums.add(widen(x.d) * y.d, lane_sums(&x.values(), &y.qs, &scales));
    }
    sums.total(0.0)
}

/// Q8_K weights exist only as a ggml activation format; defined like Q8_0 x Q8_0.
pub fn dot_q8_k_q8_k(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in block_pairs::<BlockQ8K, BlockQ8K>(row, act, n) {
        let sumi = int_dot(&x.qs, &y.qs);
        sumf += sumi as f32 * (x.d * y.d);
    }
    sumf
}

// ---- Float formats: f32 products summed in f64, as ggml's ggml_vec_dot_f32/f16/bf16 ------

pub fn dot_f32_f32(row: &[u8], act: &[u8], n: usize) -> f32 {
    let pairs = scalars::<4>(row).zip(scalars::<4>(act)).take(n);
    let sum: f64 = pairs
        .map(|(x, y)| f64::from(f32::from_le_bytes(x) * f32::from_le_bytes(y)))
        .sum();
    sum as f32
}

pub fn dot_f16_f16(row: &[u8], act: &[u8], n: usize) -> f32 {
    let pairs = scalars::<2>(row).zip(scalars::<2>(act)).take(n);
    let sum: f64 = pairs
        .map(|(x, y)| {
            f64::from(
                f16_bits_to_f32(u16::from_le_bytes(x)) * f16_bits_to_f32(u16::from_le_bytes(y)),
            )
        })
        .sum();
    sum as f32
}

pub fn dot_bf16_bf16(row: &[u8], act: &[u8], n: usize) -> f32 {
    let pairs = scalars::<2>(row).zip(scalars::<2>(act)).take(n);
    let sum: f64 = pairs
        .map(|(x, y)| {
            f64::from(
                bf16_bits_to_f32(u16::from_le_bytes(x)) * bf16_bits_to_f32(u16::from_le_bytes(y)),
            )
        })
        .sum();
    sum as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn q8_0_block(d: f32, qs: [i8; 32]) -> Vec<u8> {
        let mut out = vec![0u8; 34];
        let _ = BlockQ8_0 {
            d: f16::from_f32(d),
            qs,
        }
        .write(&mut out);
        out
    }

    #[test]
    fn q4_0_block_dot_by_hand() {
        // Weights: d = 0.5, nibble 9 everywhere -> w = (9 - 8) * 0.5 = 0.5.
        let mut row = f16::from_f32(0.5).to_le_bytes().to_vec();
        row.extend([0x99u8; 16]);
        let mut qs = [0i8; 32];
        qs[0] = 10;
        qs[31] = -4;
        let act = q8_0_block(0.25, qs);
        // sum(w_int * q) = 6, times 0.5 * 0.25.
        assert_eq!(dot_q4_0_q8_0(&row, &act, 32), 6.0 * 0.5 * 0.25);
    }

    #[test]
    fn short_inputs_are_truncated_not_read_past() {
        let act = q8_0_block(1.0, [1; 32]);
        let row = q8_0_block(1.0, [2; 32]);
        assert_eq!(dot_q8_0_q8_0(&row, &act, 32), 64.0);
        assert_eq!(dot_q8_0_q8_0(&row[..33], &act, 32), 0.0);
        assert_eq!(dot_q8_0_q8_0(&row, &act, 64), 64.0);
        assert_eq!(dot_f32_f32(&[0, 0, 128, 63], &[0, 0, 0, 64, 1], 5), 2.0);
    }
}
