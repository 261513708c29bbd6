//! Arm NEON twins of `dot_scalar` and of the activation quantisers, with the bits
//! llama.cpp's Arm build computes: GCC-built `ggml-cpu` (`arch/arm/quants.c`,
//! `vec.cpp`) for `armv8-a` (level `neon`) or `armv8.2-a+dotprod` (level `dotprod`),
//! without the FP16-arithmetic, i8mm or SVE paths. `tests/golden/ggml_arm_*.txt`, printed
//! by that build under qemu (`tests/scripts/arm_kernels/`), holds the bits these kernels
//! are tested against.
//!
//! Where the rounding comes from:
//! - **The lane an integer product lands in.** The 32-element formats convert four i32
//!   lanes per block to f32, scale each and add them to per-lane accumulators, so which
//!   products share a lane changes the result. `sdot` (dotprod) sums bytes `4i..4i+4` of a
//!   16-byte vector into lane `i`; without it ggml's `ggml_vdotq_s32` widens
//!   (`vmull_s8` + `vpaddlq_s16`) and lane `i` gets bytes `2i, 2i+1, 8+2i, 9+2i`.
//!   [`LaneSums`] is that choice, and the two levels differ only in it.
//! - **Fused or not.** GCC keeps `vmlaq_n_f32` a multiply then an add, but contracts the
//!   scalar `a += b * c` of the tails and the K-quant super-block sums into `fmadd`; each
//!   kernel spells out which (`mul_add` is the fused one).
//! - **Reductions.** `vaddvq_f32` is `(l0 + l1) + (l2 + l3)`; F32 and F16 rows keep four
//!   4-lane accumulators folded as `(a0 + a2) + (a1 + a3)`.
//!
//! The K-quants sum every super-block exactly in integers before any float operation, so
//! there the lanes do not matter: weights are decoded by the portable `values()` and the
//! products summed with [`LaneSums`].

use std::arch::aarch64::*;

use super::activation;
use super::blocks::{
    f16_bits_to_f32, k4_scales_mins, q3k_scales, Block, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K,
    BlockQ6K, BlockQ8K, QK_K,
};
use super::dispatch::{batch_one_by_one, tokens_one_by_one, ArmChecked, FourRows, Kernels};
use super::dot::Dot4Fn;
use super::GgmlType;

/// How a vector of sixteen 8-bit products is summed into four i32 lanes (see the module
/// documentation).
pub(super) trait LaneSums {
    /// `acc + products of a and b`, four products per lane.
    ///
    /// # Safety
    /// The CPU must run the instructions the implementation uses.
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t;
}

/// ggml's `ggml_vdotq_s32` without `__ARM_FEATURE_DOTPROD`: widening products, pairwise sums.
pub(super) struct Widening;

impl LaneSums for Widening {
    #[inline(always)]
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let low = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let high = vmull_s8(vget_high_s8(a), vget_high_s8(b));
        vaddq_s32(acc, vaddq_s32(vpaddlq_s16(low), vpaddlq_s16(high)))
    }
}

/// The `sdot` instruction (Armv8.2 dot product). Written as assembly because the
/// `vdotq_s32` intrinsic is not stable in Rust; only ever inlined into functions compiled
/// with the `dotprod` feature.
pub(super) struct Sdot;

impl LaneSums for Sdot {
    #[inline(always)]
    unsafe fn dot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    }
}

/// Runs `f` compiled with the `dotprod` feature, so the `sdot` of [`Sdot`] inlined into it
/// assembles.
///
/// # Safety
/// The CPU must have the dot-product extension.
#[target_feature(enable = "dotprod")]
unsafe fn with_dotprod<R>(f: impl FnOnce() -> R) -> R {
    f()
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

/// Whole blocks of `size` bytes covering `n` elements that both rows hold.
fn block_count(row: &[u8], row_block: usize, act: &[u8], act_block: usize, n: usize) -> usize {
    (n / 32)
        .min(row.len() / row_block)
        .min(act.len() / act_block)
}

/// `vmlaq_n_f32(acc, vcvtq_f32_s32(lanes), scale)` as GCC compiles it: multiply, then add.
#[inline(always)]
unsafe fn scale_and_add(acc: float32x4_t, lanes: int32x4_t, scale: f32) -> float32x4_t {
    vaddq_f32(acc, vmulq_n_f32(vcvtq_f32_s32(lanes), scale))
}

// ---- 32-element formats -------------------------------------------------------------
//
// Each kernel takes pairs of blocks into two accumulators and finishes an odd block with
// ggml's scalar tail, as `ggml_vec_dot_*` does.

/// The low and high nibbles of a 16-byte run: elements 0..16 and 16..32 of a 4-bit block.
#[inline(always)]
unsafe fn nibbles(qs: *const u8) -> (int8x16_t, int8x16_t) {
    let bytes = vld1q_u8(qs);
    (
        vreinterpretq_s8_u8(vandq_u8(bytes, vdupq_n_u8(0x0F))),
        vreinterpretq_s8_u8(vshrq_n_u8(bytes, 4)),
    )
}

/// Bit 4 of each of a 5-bit block's 32 elements (`qh`, little-endian: element `j` takes
/// bit `j`), as 0 or 0x10 bytes: each `qh` byte is copied to eight lanes and tested
/// against that lane's bit.
#[inline(always)]
unsafe fn fifth_bits(qh: &[u8]) -> (int8x16_t, int8x16_t) {
    const LANE_BITS: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    let lane_bits = vld1q_u8(LANE_BITS.as_ptr());
    let spread = |low: u8, high: u8| {
        let bytes = vcombine_u8(vdup_n_u8(low), vdup_n_u8(high));
        vreinterpretq_s8_u8(vandq_u8(vtstq_u8(bytes, lane_bits), vdupq_n_u8(0x10)))
    };
    (spread(qh[0], qh[1]), spread(qh[2], qh[3]))
}

/// A block's 32 quants against 32 activation quants, four i32 lanes.
#[inline(always)]
unsafe fn block_lanes<L: LaneSums>(w: (int8x16_t, int8x16_t), q8: *const i8) -> int32x4_t {
    let low = L::dot(vdupq_n_s32(0), w.0, vld1q_s8(q8));
    let high = L::dot(vdupq_n_s32(0), w.1, vld1q_s8(q8.add(16)));
    vaddq_s32(low, high)
}

/// Exact sum of a block's products, for the scalar tails.
fn tail_sum(w: &[i8; 32], q8: &[u8]) -> f32 {
    let sum: i32 = w
        .iter()
        .zip(q8)
        .map(|(&w, &q)| i32::from(w) * i32::from(q as i8))
        .sum();
    sum as f32
}

/// The signed weights of 32-element blocks, the one thing the five formats differ in.
trait Block32 {
    const SIZE: usize;
    /// Offset of the 16 nibble bytes (or of the 32 quants for Q8_0).
    const QS: usize;
    /// The block's 32 signed quants as the dot products take them.
    ///
    /// # Safety
    /// `block` holds `SIZE` bytes.
    unsafe fn quants(block: &[u8]) -> (int8x16_t, int8x16_t);
    /// The same values for the scalar tail.
    fn scalar_quants(block: &[u8]) -> [i8; 32];
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;
struct Q8_0;

impl Block32 for Q4_0 {
    const SIZE: usize = 18;
    const QS: usize = 2;
    #[inline(always)]
    unsafe fn quants(block: &[u8]) -> (int8x16_t, int8x16_t) {
        let (low, high) = nibbles(block.as_ptr().add(Self::QS));
        let eight = vdupq_n_s8(8);
        (vsubq_s8(low, eight), vsubq_s8(high, eight))
    }
    fn scalar_quants(block: &[u8]) -> [i8; 32] {
        nibble_values(&block[Self::QS..Self::QS + 16]).map(|v| v as i8 - 8)
    }
}

impl Block32 for Q4_1 {
    const SIZE: usize = 20;
    const QS: usize = 4;
    #[inline(always)]
    unsafe fn quants(block: &[u8]) -> (int8x16_t, int8x16_t) {
        nibbles(block.as_ptr().add(Self::QS))
    }
    fn scalar_quants(block: &[u8]) -> [i8; 32] {
        nibble_values(&block[Self::QS..Self::QS + 16]).map(|v| v as i8)
    }
}

impl Block32 for Q5_0 {
    const SIZE: usize = 22;
    const QS: usize = 6;
    #[inline(always)]
    unsafe fn quants(block: &[u8]) -> (int8x16_t, int8x16_t) {
        let (low, high) = nibbles(block.as_ptr().add(Self::QS));
        let (bit_low, bit_high) = fifth_bits(&block[2..6]);
        let sixteen = vdupq_n_s8(16);
        (
            vsubq_s8(vorrq_s8(low, bit_low), sixteen),
            vsubq_s8(vorrq_s8(high, bit_high), sixteen),
        )
    }
    fn scalar_quants(block: &[u8]) -> [i8; 32] {
        five_bit_values(block, 2, Self::QS).map(|v| v as i8 - 16)
    }
}

impl Block32 for Q5_1 {
    const SIZE: usize = 24;
    const QS: usize = 8;
    #[inline(always)]
    unsafe fn quants(block: &[u8]) -> (int8x16_t, int8x16_t) {
        let (low, high) = nibbles(block.as_ptr().add(Self::QS));
        let (bit_low, bit_high) = fifth_bits(&block[4..8]);
        (vorrq_s8(low, bit_low), vorrq_s8(high, bit_high))
    }
    fn scalar_quants(block: &[u8]) -> [i8; 32] {
        five_bit_values(block, 4, Self::QS).map(|v| v as i8)
    }
}

impl Block32 for Q8_0 {
    const SIZE: usize = 34;
    const QS: usize = 2;
    #[inline(always)]
    unsafe fn quants(block: &[u8]) -> (int8x16_t, int8x16_t) {
        let qs = block.as_ptr().add(Self::QS).cast::<i8>();
        (vld1q_s8(qs), vld1q_s8(qs.add(16)))
    }
    fn scalar_quants(block: &[u8]) -> [i8; 32] {
        std::array::from_fn(|j| block[Self::QS + j] as i8)
    }
}

fn nibble_values(qs: &[u8]) -> [u8; 32] {
    std::array::from_fn(|j| {
        if j < 16 {
            qs[j] & 0x0F
        } else {
            qs[j - 16] >> 4
        }
    })
}

fn five_bit_values(block: &[u8], qh: usize, qs: usize) -> [u8; 32] {
    let bits = u32::from_le_bytes([block[qh], block[qh + 1], block[qh + 2], block[qh + 3]]);
    let low = nibble_values(&block[qs..qs + 16]);
    std::array::from_fn(|j| low[j] | ((((bits >> j) & 1) as u8) << 4))
}

const Q8_0_SIZE: usize = 34;
const Q8_1_SIZE: usize = 36;

/// `ggml_vec_dot_q4_0_q8_0`, `ggml_vec_dot_q5_0_q8_0` and `ggml_vec_dot_q8_0_q8_0`: one
/// scale per block pair term, no minimum.
#[inline(always)]
unsafe fn dot_symmetric<W: Block32, L: LaneSums>(row: &[u8], act: &[u8], n: usize) -> f32 {
    let blocks = block_count(row, W::SIZE, act, Q8_0_SIZE, n);
    let mut sum0 = vdupq_n_f32(0.0);
    let mut sum1 = vdupq_n_f32(0.0);
    let mut ib = 0;
    while ib + 1 < blocks {
        for (k, sum) in [&mut sum0, &mut sum1].into_iter().enumerate() {
            let x = &row[(ib + k) * W::SIZE..];
            let y = &act[(ib + k) * Q8_0_SIZE..];
            let lanes = block_lanes::<L>(W::quants(x), y.as_ptr().add(2).cast());
            *sum = scale_and_add(*sum, lanes, f16_at(x, 0) * f16_at(y, 0));
        }
        ib += 2;
    }
    let mut sumf = vaddvq_f32(sum0) + vaddvq_f32(sum1);
    if ib < blocks {
        let x = &row[ib * W::SIZE..];
        let y = &act[ib * Q8_0_SIZE..];
        let sumi = tail_sum(&W::scalar_quants(x), &y[2..34]);
        let (dx, dy) = (f16_at(x, 0), f16_at(y, 0));
        // Q4_0's tail is `sumi * dx * dy`, the others' `(dx * dy) * sumi`; both fused into
        // the add.
        sumf = if W::QS == Q4_0::QS && W::SIZE == Q4_0::SIZE {
            (sumi * dx).mul_add(dy, sumf)
        } else {
            (dx * dy).mul_add(sumi, sumf)
        };
    }
    sumf
}

/// `ggml_vec_dot_q4_1_q8_1` and `ggml_vec_dot_q5_1_q8_1`: the minimum contributes
/// `m * s` per block, summed apart from the lanes; the two kernels group those terms
/// differently.
#[inline(always)]
unsafe fn dot_with_minimum<W: Block32, L: LaneSums>(row: &[u8], act: &[u8], n: usize) -> f32 {
    let blocks = block_count(row, W::SIZE, act, Q8_1_SIZE, n);
    let five_bit = W::SIZE == Q5_1::SIZE;
    let mut sum0 = vdupq_n_f32(0.0);
    let mut sum1 = vdupq_n_f32(0.0);
    let mut mins = [0f32; 2];
    let mut ib = 0;
    while ib + 1 < blocks {
        let x0 = &row[ib * W::SIZE..];
        let x1 = &row[(ib + 1) * W::SIZE..];
        let y0 = &act[ib * Q8_1_SIZE..];
        let y1 = &act[(ib + 1) * Q8_1_SIZE..];
        let (m0, s0) = (f16_at(x0, 2), f16_at(y0, 2));
        let (m1, s1) = (f16_at(x1, 2), f16_at(y1, 2));
        if five_bit {
            // `summs0 += m0 * s0; summs1 += m1 * s1;`
            mins[0] = m0.mul_add(s0, mins[0]);
            mins[1] = m1.mul_add(s1, mins[1]);
        } else {
            // `summs += m0 * s0 + m1 * s1;`
            mins[0] += m1.mul_add(s1, m0 * s0);
        }
        let lanes0 = block_lanes::<L>(W::quants(x0), y0.as_ptr().add(4).cast());
        let lanes1 = block_lanes::<L>(W::quants(x1), y1.as_ptr().add(4).cast());
        sum0 = scale_and_add(sum0, lanes0, f16_at(x0, 0) * f16_at(y0, 0));
        sum1 = scale_and_add(sum1, lanes1, f16_at(x1, 0) * f16_at(y1, 0));
        ib += 2;
    }
    let mut sumf = vaddvq_f32(sum0) + vaddvq_f32(sum1) + mins[0];
    if five_bit {
        sumf += mins[1];
    }
    if ib < blocks {
        let x = &row[ib * W::SIZE..];
        let y = &act[ib * Q8_1_SIZE..];
        let sumi = tail_sum(&W::scalar_quants(x), &y[4..36]);
        let scale = f16_at(x, 0) * f16_at(y, 0);
        sumf += scale.mul_add(sumi, f16_at(x, 2) * f16_at(y, 2));
    }
    sumf
}

/// A 32-element format as llama.cpp's dotprod build multiplies a repacked matrix (row
/// count a multiple of 4: `q8_0_4x4_q8_0`, `q4_0_4x4_q8_0`): each block's exact sum added
/// to one accumulator per row, `acc = fma(isum, d_x * d_w, acc)` (`vfmaq_f32`). Q8_0's
/// gemm, for whole groups of four tokens of a batch, multiplies the scale by the sum first
/// and adds unfused (`vmlaq_f32`, `GEMM`); Q4_0's gemm (assembly) fuses as its gemv.
#[inline(always)]
unsafe fn dot_repacked_32<W: Block32, const GEMM: bool, L: LaneSums>(
    row: &[u8],
    act: &[u8],
    n: usize,
) -> f32 {
    let blocks = block_count(row, W::SIZE, act, Q8_0_SIZE, n);
    let mut acc = 0f32;
    for b in 0..blocks {
        let x = &row[b * W::SIZE..];
        let y = &act[b * Q8_0_SIZE..];
        let isum = vaddvq_s32(block_lanes::<L>(W::quants(x), y.as_ptr().add(2).cast())) as f32;
        let (dx, dy) = (f16_at(x, 0), f16_at(y, 0));
        acc = if GEMM {
            acc + (dx * dy) * isum
        } else {
            isum.mul_add(dy * dx, acc)
        };
    }
    acc
}

#[inline(always)]
unsafe fn dot_q8_0_repacked<const GEMM: bool, L: LaneSums>(
    row: &[u8],
    act: &[u8],
    n: usize,
) -> f32 {
    dot_repacked_32::<Q8_0, GEMM, L>(row, act, n)
}

#[inline(always)]
unsafe fn dot_q4_0_repacked<L: LaneSums>(row: &[u8], act: &[u8], n: usize) -> f32 {
    dot_repacked_32::<Q4_0, false, L>(row, act, n)
}

/// A module with the dotprod level's forms of a repacked format whose gemm rounds unlike
/// its gemv: the gemv (`$kernel::<false, _>`) for single tokens, and for a batch the gemm
/// (`$kernel::<true, _>`) on its whole groups of four tokens, the gemv on the rest. Rows of
/// different lengths are not one repacked matrix: single-row calls.
macro_rules! repacked_forms {
    ($module:ident, $kernel:ident) => {
        mod $module {
            use super::super::activation::QuantizedActivations;
            use super::super::dot::DotBatchFn;
            use super::super::{DotFn, DotTokensFn};
            use super::{with_dotprod, $kernel, Dot4Fn, Sdot};

            fn gemv(row: &[u8], act: &[u8], n: usize) -> f32 {
                // SAFETY: only installed by `install` for a CPU with the dot product.
                unsafe {
                    with_dotprod(
                        #[inline(always)]
                        || $kernel::<false, Sdot>(row, act, n),
                    )
                }
            }

            fn gemm(row: &[u8], act: &[u8], n: usize) -> f32 {
                // SAFETY: as above.
                unsafe {
                    with_dotprod(
                        #[inline(always)]
                        || $kernel::<true, Sdot>(row, act, n),
                    )
                }
            }

            fn four(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4] {
                rows.map(|row| gemv(row, act, n))
            }

            fn tokens(rows: [&[u8]; 4], acts: &[QuantizedActivations], out: &mut [[f32; 4]]) {
                for (act, o) in acts.iter().zip(out) {
                    *o = four(rows, act.bytes(), act.len());
                }
            }

            fn batch(
                rows: [&[u8]; 4],
                acts: &[QuantizedActivations],
                first: usize,
                batch: usize,
                out: &mut [[f32; 4]],
            ) {
                let grouped = if rows.iter().all(|r| r.len() == rows[0].len()) {
                    batch - batch % 4
                } else {
                    0
                };
                for (t, (act, o)) in acts.iter().zip(out).enumerate() {
                    let kernel = if first + t < grouped { gemm } else { gemv };
                    *o = rows.map(|row| kernel(row, act.bytes(), act.len()));
                }
            }

            pub(super) const FORMS: (DotFn, Dot4Fn, DotTokensFn, DotBatchFn) =
                (gemv, four, tokens, batch);
        }
    };
}

repacked_forms!(q8_0_repacked, dot_q8_0_repacked);
repacked_forms!(q6_k_repacked_forms, dot_q6_k_repacked);

// ---- K-quants -----------------------------------------------------------------------

/// Sum of the products of 16 weights with 16 activation quants.
#[inline(always)]
unsafe fn sum16<L: LaneSums>(w: &[i8], q8: &[i8]) -> i32 {
    vaddvq_s32(L::dot(
        vdupq_n_s32(0),
        vld1q_s8(w.as_ptr()),
        vld1q_s8(q8.as_ptr()),
    ))
}

/// `Σ scale[g] · (weights · q8 over group g)` for groups of 16 elements.
#[inline(always)]
unsafe fn scaled_sum<L: LaneSums>(w: &[i8; QK_K], q8: &[i8; QK_K], scales: &[i32; 16]) -> i32 {
    let mut isum = 0;
    for (g, &scale) in scales.iter().enumerate() {
        isum += sum16::<L>(&w[16 * g..], &q8[16 * g..]) * scale;
    }
    isum
}

fn k_blocks<'a, W: Block>(
    row: &'a [u8],
    act: &'a [u8],
    n: usize,
) -> impl Iterator<Item = (W, BlockQ8K)> + 'a {
    super::blocks::blocks::<W>(row)
        .zip(super::blocks::blocks::<BlockQ8K>(act))
        .take(n / QK_K)
}

fn widen_scale(value: half::f16) -> f32 {
    f16_bits_to_f32(value.to_bits())
}

/// The Q4_K/Q5_K group scales spread to groups of 16, and `Σ min_j · (bsums of group j)`.
fn k4_groups(packed: &[u8; 12], bsums: &[i16; 16]) -> ([i32; 16], i32) {
    let (scales, mins) = k4_scales_mins(packed);
    let per16 = std::array::from_fn(|g| i32::from(scales[g / 2]));
    let min_sum = (0..16)
        .map(|g| i32::from(bsums[g]) * i32::from(mins[g / 2]))
        .sum();
    (per16, min_sum)
}

#[inline(always)]
unsafe fn dot_q2_k<L: LaneSums>(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sum = 0f32;
    for (x, y) in k_blocks::<BlockQ2K>(row, act, n) {
        let d = y.d * widen_scale(x.d);
        let dmin = -(y.d * widen_scale(x.dmin));
        let min_sum: i32 = (0..16)
            .map(|g| i32::from(y.bsums[g]) * i32::from(x.scales[g] >> 4))
            .sum();
        let scales = std::array::from_fn(|g| i32::from(x.scales[g] & 0x0F));
        let w = x.values().map(|v| v as i8);
        let isum = scaled_sum::<L>(&w, &y.qs, &scales);
        sum = (min_sum as f32).mul_add(dmin, sum);
        sum = (isum as f32).mul_add(d, sum);
    }
    sum
}

#[inline(always)]
unsafe fn dot_q3_k<L: LaneSums>(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sum = 0f32;
    for (x, y) in k_blocks::<BlockQ3K>(row, act, n) {
        let d = y.d * widen_scale(x.d);
        let isum = scaled_sum::<L>(&x.values(), &y.qs, &q3k_scales(&x.scales));
        sum = (isum as f32).mul_add(d, sum);
    }
    sum
}

/// What Q4_K and Q5_K share: six-bit group scales and minimums, unsigned quants.
trait K4Block: Block {
    fn scale_parts(&self) -> (half::f16, half::f16, &[u8; 12]);
    fn quants(&self) -> [u8; QK_K];
}

impl K4Block for BlockQ4K {
    fn scale_parts(&self) -> (half::f16, half::f16, &[u8; 12]) {
        (self.d, self.dmin, &self.scales)
    }
    fn quants(&self) -> [u8; QK_K] {
        self.values()
    }
}

impl K4Block for BlockQ5K {
    fn scale_parts(&self) -> (half::f16, half::f16, &[u8; 12]) {
        (self.d, self.dmin, &self.scales)
    }
    fn quants(&self) -> [u8; QK_K] {
        self.values()
    }
}

/// A Q4_K/Q5_K super-block's `d`, `dmin`, scaled quant sum and minimum sum.
#[inline(always)]
unsafe fn k4_terms<L: LaneSums, W: K4Block>(x: &W, y: &BlockQ8K) -> (f32, f32, i32, i32) {
    let (d, dmin, packed) = x.scale_parts();
    let (scales, min_sum) = k4_groups(packed, &y.bsums);
    let w = x.quants().map(|v| v as i8);
    let isum = scaled_sum::<L>(&w, &y.qs, &scales);
    (y.d * widen_scale(d), y.d * widen_scale(dmin), isum, min_sum)
}

#[inline(always)]
unsafe fn dot_q4_k<L: LaneSums>(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sum = 0f32;
    for (x, y) in k_blocks::<BlockQ4K>(row, act, n) {
        let (d, dmin, isum, min_sum) = k4_terms::<L, _>(&x, &y);
        // `sumf -= dmin * mins` (fmsub), then `sumf += d * isum` (fmadd).
        sum = (-(min_sum as f32)).mul_add(dmin, sum);
        sum = (isum as f32).mul_add(d, sum);
    }
    sum
}

#[inline(always)]
unsafe fn dot_q5_k<L: LaneSums>(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sum = 0f32;
    for (x, y) in k_blocks::<BlockQ5K>(row, act, n) {
        let (d, dmin, isum, min_sum) = k4_terms::<L, _>(&x, &y);
        // `sumf += d * sumi - dmin * mins`: the product with `d` fused into the subtraction.
        sum += (isum as f32).mul_add(d, -(min_sum as f32 * dmin));
    }
    sum
}

/// Q4_K as llama.cpp's dotprod build multiplies a matrix whose row count is a multiple of
/// 8, repacked (`ggml_gemv_q4_K_8x4_q8_K`, and its gemm, which rounds the same way): per
/// 64 elements `acc = fma(d_w * d_x, isum, acc)`, then per super-block the minimum term
/// subtracted unfused (`vmlsq_f32`).
#[inline(always)]
unsafe fn dot_q4_k_repacked<L: LaneSums>(row: &[u8], act: &[u8], n: usize) -> f32 {
    dot_k4_repacked::<BlockQ4K, L>(row, act, n)
}

/// Q5_K through the dotprod build's `q5_K_8x4_q8_K`, which rounds as the Q4_K one.
#[inline(always)]
unsafe fn dot_q5_k_repacked<L: LaneSums>(row: &[u8], act: &[u8], n: usize) -> f32 {
    dot_k4_repacked::<BlockQ5K, L>(row, act, n)
}

#[inline(always)]
unsafe fn dot_k4_repacked<W: K4Block, L: LaneSums>(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut acc = 0f32;
    for (x, y) in k_blocks::<W>(row, act, n) {
        let (d, dmin, packed) = x.scale_parts();
        let (scales, mins) = k4_scales_mins(packed);
        let w = x.quants().map(|v| v as i8);
        let scale = widen_scale(d) * y.d;
        for sb in 0..QK_K / 64 {
            let group = |j: usize| {
                let (w, q) = (&w[32 * j..], &y.qs[32 * j..]);
                sum16::<L>(w, q) + sum16::<L>(&w[16..], &q[16..])
            };
            let isum = i32::from(scales[2 * sb]) * group(2 * sb)
                + i32::from(scales[2 * sb + 1]) * group(2 * sb + 1);
            acc = scale.mul_add(isum as f32, acc);
        }
        let bias: i32 = (0..8)
            .map(|j| {
                i32::from(mins[j]) * (i32::from(y.bsums[2 * j]) + i32::from(y.bsums[2 * j + 1]))
            })
            .sum();
        acc -= bias as f32 * (widen_scale(dmin) * y.d);
    }
    acc
}

/// Q6_K as llama.cpp's dotprod build multiplies a repacked matrix (`q6_K_8x4_q8_K`): each
/// super-block's exact sum times `d_w * d_x` added to the row's accumulator, fused in the
/// gemv (GCC contracts its `vmulq_f32` and `vaddq_f32`), unfused in the gemm (`vmlaq_f32`,
/// `GEMM`).
#[inline(always)]
unsafe fn dot_q6_k_repacked<const GEMM: bool, L: LaneSums>(
    row: &[u8],
    act: &[u8],
    n: usize,
) -> f32 {
    let mut acc = 0f32;
    for (x, y) in k_blocks::<BlockQ6K>(row, act, n) {
        let isum = scaled_sum::<L>(&x.values(), &y.qs, &x.scales.map(i32::from)) as f32;
        let scale = widen_scale(x.d) * y.d;
        acc = if GEMM {
            acc + isum * scale
        } else {
            isum.mul_add(scale, acc)
        };
    }
    acc
}

#[inline(always)]
unsafe fn dot_q6_k<L: LaneSums>(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut sum = 0f32;
    for (x, y) in k_blocks::<BlockQ6K>(row, act, n) {
        let scales = x.scales.map(i32::from);
        let isum = scaled_sum::<L>(&x.values(), &y.qs, &scales);
        sum = (widen_scale(x.d) * y.d).mul_add(isum as f32, sum);
    }
    sum
}

// ---- Float formats ------------------------------------------------------------------

/// ggml's NEON `GGML_F32_VEC_REDUCE` of four 4-lane accumulators.
#[inline(always)]
unsafe fn reduce4(sum: [float32x4_t; 4]) -> f32 {
    let a = vaddq_f32(sum[0], sum[2]);
    let b = vaddq_f32(sum[1], sum[3]);
    vaddvq_f32(vaddq_f32(a, b))
}

/// `ggml_vec_dot_f32` (`L` unused: no integer lanes here): 16 elements a step in four fused accumulators; the rest added one
/// by one to the f32 total.
#[inline(always)]
unsafe fn dot_f32<L: LaneSums>(row: &[u8], act: &[u8], n: usize) -> f32 {
    let n = n.min(row.len() / 4).min(act.len() / 4);
    let x = row.as_ptr().cast::<f32>();
    let y = act.as_ptr().cast::<f32>();
    let main = n & !15;
    let mut sum = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i < main {
        for (j, s) in sum.iter_mut().enumerate() {
            let at = i + 4 * j;
            *s = vfmaq_f32(*s, vld1q_f32(x.add(at)), vld1q_f32(y.add(at)));
        }
        i += 16;
    }
    let mut sumf = reduce4(sum);
    // GCC vectorises ggml's leftover loop `sumf += x[i] * y[i]` when it runs four times or
    // more: four products at a time, unfused, added in order; the last `% 4` stay fused.
    let leftovers = n - main;
    let unfused = if leftovers >= 4 { leftovers & !3 } else { 0 };
    for i in main..n {
        let (a, b) = (x.add(i).read_unaligned(), y.add(i).read_unaligned());
        sumf = if i < main + unfused {
            sumf + a * b
        } else {
            a.mul_add(b, sumf)
        };
    }
    sumf
}

/// Four f16 values widened to f32 (`fcvtl`, base Armv8; written as assembly because
/// `vcvt_f32_f16` is newer than this crate's minimum Rust).
#[inline(always)]
unsafe fn load_f16x4(p: *const u8) -> float32x4_t {
    let halves = vld1_u16(p.cast());
    let widened: float32x4_t;
    std::arch::asm!(
        "fcvtl {out:v}.4s, {halves:v}.4h",
        out = lateout(vreg) widened,
        halves = in(vreg) halves,
        options(pure, nomem, nostack, preserves_flags)
    );
    widened
}

/// `ggml_vec_dot_f16` without FP16 arithmetic: as [`dot_f32`] on widened values, but the
/// total and the leftovers (unfused f32 products) are summed in f64.
#[inline(always)]
unsafe fn dot_f16<L: LaneSums>(row: &[u8], act: &[u8], n: usize) -> f32 {
    let n = n.min(row.len() / 2).min(act.len() / 2);
    let main = n & !15;
    let mut sum = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i < main {
        for (j, s) in sum.iter_mut().enumerate() {
            let at = 2 * (i + 4 * j);
            *s = vfmaq_f32(
                *s,
                load_f16x4(row.as_ptr().add(at)),
                load_f16x4(act.as_ptr().add(at)),
            );
        }
        i += 16;
    }
    let mut sumf = f64::from(reduce4(sum));
    for i in main..n {
        sumf += f64::from(f16_at(row, 2 * i) * f16_at(act, 2 * i));
    }
    sumf as f32
}

// ---- Activation quantisation --------------------------------------------------------

/// ggml's NEON `quantize_row_q8_0` / `quantize_row_q8_1` for one block: `d = amax / 127`,
/// `id = 1 / d` (0 if `d` is 0), `q = vcvtnq(x * id)` (nearest, halves to even) and, for
/// Q8_1, `s = fp16(d * sum(q))`.
#[inline(always)]
unsafe fn quantize_block<const WITH_SUM: bool>(x: &[f32], out: &mut [u8]) {
    let p = x.as_ptr();
    let v: [float32x4_t; 8] = std::array::from_fn(|j| vld1q_f32(p.add(4 * j)));
    let mut amax = vdupq_n_f32(0.0);
    for v in v {
        amax = vmaxq_f32(amax, vabsq_f32(v));
    }
    let d = vmaxvq_f32(amax) / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let head = if WITH_SUM { 4 } else { 2 };
    let mut total = vdupq_n_s32(0);
    for (j, v) in v.into_iter().enumerate() {
        let q = vcvtnq_s32_f32(vmulq_n_f32(v, id));
        total = vaddq_s32(total, q);
        let mut lanes = [0i32; 4];
        vst1q_s32(lanes.as_mut_ptr(), q);
        for (o, q) in out[head + 4 * j..head + 4 * j + 4].iter_mut().zip(lanes) {
            *o = q as i8 as u8;
        }
    }
    out[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
    if WITH_SUM {
        let s = d * vaddvq_s32(total) as f32;
        out[2..4].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
    }
}

fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (x, o) in x.chunks_exact(32).zip(out.chunks_exact_mut(Q8_0_SIZE)) {
        // SAFETY: NEON is part of every AArch64 CPU; `x` holds 32 values, `o` a block.
        unsafe { quantize_block::<false>(x, o) }
    }
}

fn quantize_q8_1(x: &[f32], out: &mut [u8]) {
    for (x, o) in x.chunks_exact(32).zip(out.chunks_exact_mut(Q8_1_SIZE)) {
        // SAFETY: as above.
        unsafe { quantize_block::<true>(x, o) }
    }
}

// ---- Tables ---------------------------------------------------------------------------

/// One weight type's single-row kernel at one level.
trait RowKernel {
    fn dot(row: &[u8], act: &[u8], n: usize) -> f32;
}

/// Four single-row calls, so the multi-row forms have the single-row bits by construction.
/// A batch rounds as its tokens one by one, as llama.cpp's Arm builds do for these formats
/// (Q4_1, Q5_0, Q5_1, Q2_K, Q3_K; every format at `neon`). The dotprod build's repacked
/// kernels: Q8_0 and Q6_K, whose gemm rounds unlike their gemv, through
/// `repacked_forms!`; Q4_0, Q4_K and Q5_K, whose gemm rounds as their gemv, through these.
struct Rows<K>(std::marker::PhantomData<K>);

impl<K: RowKernel> FourRows for Rows<K> {
    fn four(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4] {
        rows.map(|row| K::dot(row, act, n))
    }
}

fn set_kernel<K: RowKernel>(table: &mut Kernels, ty: GgmlType) {
    table.set_dot(
        ty,
        K::dot,
        Rows::<K>::four,
        tokens_one_by_one::<Rows<K>>,
        batch_one_by_one::<Rows<K>>,
    );
}

/// For each kernel, a module with its [`RowKernel`] at each level: `Neon` and `Dotprod`.
macro_rules! arm_kernels {
    ($($module:ident => $kernel:ident $([$weights:ident])?, $ty:expr $(, $only:ident)?;)*) => {
        $(
            mod $module {
                use super::{$kernel, with_dotprod, RowKernel, Sdot, Widening};
                $(use super::$weights;)?

                pub(super) struct Neon;
                pub(super) struct Dotprod;

                impl RowKernel for Neon {
                    fn dot(row: &[u8], act: &[u8], n: usize) -> f32 {
                        // SAFETY: `Widening` is base NEON, which every AArch64 CPU has; the
                        // kernels bound their reads by the slice lengths.
                        unsafe { $kernel::<$($weights,)? Widening>(row, act, n) }
                    }
                }

                impl RowKernel for Dotprod {
                    fn dot(row: &[u8], act: &[u8], n: usize) -> f32 {
                        // SAFETY: only installed by `install` for a CPU with the dot-product
                        // extension (an `ArmChecked` from `ArmChecked::dotprod`).
                        unsafe {
                            with_dotprod(#[inline(always)] || $kernel::<$($weights,)? Sdot>(row, act, n))
                        }
                    }
                }
            }
        )*

        /// Installs the kernels of the `neon` level, or of `dotprod` when `dotprod` is set.
        /// Entries marked `dotprod_only` replace an earlier entry's kernel at that level.
        fn install_kernels(table: &mut Kernels, dotprod: bool) {
            $(
                let dotprod_only = false $(|| stringify!($only) == "dotprod_only")?;
                if dotprod {
                    set_kernel::<$module::Dotprod>(table, $ty);
                } else if !dotprod_only {
                    set_kernel::<$module::Neon>(table, $ty);
                }
            )*
        }
    };
}

arm_kernels! {
    q4_0 => dot_symmetric[Q4_0], GgmlType::Q4_0;
    q4_1 => dot_with_minimum[Q4_1], GgmlType::Q4_1;
    q5_0 => dot_symmetric[Q5_0], GgmlType::Q5_0;
    q5_1 => dot_with_minimum[Q5_1], GgmlType::Q5_1;
    q8_0 => dot_symmetric[Q8_0], GgmlType::Q8_0;
    q2_k => dot_q2_k, GgmlType::Q2K;
    q3_k => dot_q3_k, GgmlType::Q3K;
    q4_k => dot_q4_k, GgmlType::Q4K;
    q5_k => dot_q5_k, GgmlType::Q5K;
    q6_k => dot_q6_k, GgmlType::Q6K;
    f32 => dot_f32, GgmlType::F32;
    f16 => dot_f16, GgmlType::F16;
    // The dotprod build's repacked K-quant kernels, installed over the vec_dot ones there.
    q4_0_repacked => dot_q4_0_repacked, GgmlType::Q4_0, dotprod_only;
    q4_k_repacked => dot_q4_k_repacked, GgmlType::Q4K, dotprod_only;
    q5_k_repacked => dot_q5_k_repacked, GgmlType::Q5K, dotprod_only;
}

/// Installs the Arm kernels: the `dotprod` level's when `proof` is for that level, else
/// the `neon` level's. BF16 keeps the
/// scalar kernel: llama.cpp's Arm build (without the BF16 extension) sums BF16 products
/// one at a time in f64, which is exactly `dot_scalar`.
pub(super) fn install(table: &mut Kernels, proof: ArmChecked) {
    install_kernels(table, proof.has_dotprod());
    if proof.has_dotprod() {
        for (ty, (single, four, tokens, batch)) in [
            (GgmlType::Q8_0, q8_0_repacked::FORMS),
            (GgmlType::Q6K, q6_k_repacked_forms::FORMS),
        ] {
            table.set_dot(ty, single, four, tokens, batch);
        }
    }
    table.quantize_q8_0 = quantize_q8_0;
    table.quantize_q8_1 = quantize_q8_1;
    // ggml's Arm `quantize_row_q8_K` is the portable reference, as on x86.
    table.quantize_q8_k = activation::quantize_q8_k;
}
