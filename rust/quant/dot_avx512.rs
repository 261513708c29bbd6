//! The AVX-512 (F, BW, VL) + VNNI level. It installs the AVX2 kernels first, then:
//! - four-row kernels for Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, where a 512-bit register holds
//!   four rows' blocks of a 4/5-bit format or two rows' Q8_0 blocks and `vpdpbusd` (u8 x i8
//!   products summed in fours into i32 lanes) replaces AVX2's `vpmaddubsw` + `vpmaddwd`;
//!   their single-row kernels stay the AVX2 ones;
//! - the AVX2 K-quant kernels recompiled with AVX-512 enabled (VNNI fuses `vpmaddwd` +
//!   `vpaddd` into `vpdpwssd`); their four-row kernels are four single-row calls, except
//!   Q4_K's, which is the AVX2 four-row body recompiled;
//! - rows-by-tokens kernels: the 4/5-bit formats and Q8_0 in the four-row kernels' register
//!   layouts, the K-quants as the AVX2 bodies recompiled; all in groups of up to eight
//!   tokens, whose accumulators the 32 vector registers hold (measured faster than fours);
//!   the Q4_K and Q6_K batch kernels (`Kernels::dot_batch`) likewise.
//!   F16 takes `dot_f16`'s 512-bit kernels (ggml's sixteen lanes in one register), BF16 the
//!   AVX2 body recompiled;
//! - lanes kernels (`Kernels::dot_lanes`) for Q4_0, Q5_0, Q8_0 and Q4_K: sixteen tokens
//!   across a register (see `token_lanes`), what prefill spends most of its time in.
//!
//! Each row's lanes see the same integer sums and the same f32 operations as in the AVX2
//! single-row kernel, so every result here is bit-identical to the AVX2 level's (see
//! `dot_avx2` for the lane layouts), and four-row results to single-row calls.

// The AVX-512 intrinsics are stable since Rust 1.89 and safe `#[target_feature]` functions
// since 1.86; Cargo.toml's `rust-version` (1.80) predates both and needs raising to 1.89.
#![allow(clippy::incompatible_msrv)]
#![allow(clippy::needless_range_loop)] // `for t in 0..T` indexes several per-token arrays.

use std::arch::x86_64::*;

use super::dispatch::{Avx512Checked, Kernels};
use super::dot_avx2::{
    bf16_bf16, bit4_from_bits_32, common_blocks, f16_gather4, high_bits, hsum,
    k4_scales_mins_packed, load128, load256, next_rows, prefetch, q4_k_gemm_tokens,
    q6_k_tiled_tokens, q6_k_values, q8_0_q8_0, row_kernel, rows_by_tokens, set, set_tokens,
    small_finish, small_min_parts, small_one, small_scales4, tokens_kernel, Q4_0Format, Q4_1Format,
    Q5_0Format, Q5_1Format, RowKernel, SmallFormat, TokensKernel,
};
use super::token_lanes::{lanes_offset, TokenLanes, LANE_TOKENS};
use super::{GgmlType, QuantizedActivations};

/// The proof the kernels of this module need.
type Proof = Avx512Checked;

row_kernel!(
    Q4_0,
    GgmlType::Q4_0,
    small_one::<Q4_0Format>,
    small_four::<Q4_0Format>
);
row_kernel!(
    Q4_1,
    GgmlType::Q4_1,
    small_one::<Q4_1Format>,
    small_four::<Q4_1Format>
);
row_kernel!(
    Q5_0,
    GgmlType::Q5_0,
    small_one::<Q5_0Format>,
    small_four::<Q5_0Format>
);
row_kernel!(
    Q5_1,
    GgmlType::Q5_1,
    small_one::<Q5_1Format>,
    small_four::<Q5_1Format>
);
row_kernel!(Q8_0, GgmlType::Q8_0, q8_0_one, q8_0_four);
row_kernel!(Q2K, GgmlType::Q2K, q2_k_q8_k, single_rows);
row_kernel!(Q3K, GgmlType::Q3K, q3_k_q8_k, single_rows);
row_kernel!(Q4K, GgmlType::Q4K, q4_k_q8_k);
row_kernel!(Q5K, GgmlType::Q5K, q5_k_q8_k, single_rows);
row_kernel!(Q6K, GgmlType::Q6K, q6_k_q8_k, single_rows);
// The AVX2 float row kernels (which stay installed), for the rows-by-tokens fallback.
row_kernel!(F16, GgmlType::F16, f16_vec_dot);
row_kernel!(BF16, GgmlType::BF16, bf16_bf16, single_rows);
tokens_kernel!(Q4_0, small_tokens, Q4_0Format, true);
tokens_kernel!(Q4_1, small_tokens, Q4_1Format, true);
tokens_kernel!(Q5_0, small_tokens, Q5_0Format, true);
tokens_kernel!(Q5_1, small_tokens, Q5_1Format, true);
tokens_kernel!(Q8_0, q8_0_tokens, scales 1, true);
tokens_kernel!(Q4K, batched q4_k_tokens, q4_k_gemm_tokens, wide true);
tokens_kernel!(Q5K, q5_k_tokens, wide true);
tokens_kernel!(Q6K, batched q6_k_tokens, q6_k_tiled_tokens, wide true);
impl TokensKernel for F16 {
    const SCALES: usize = 0;
    fn batched_tokens(batch: usize) -> usize {
        super::dot_f16::tiny_blas_tokens(batch)
    }
    unsafe fn group<const T: usize>(
        rows: [&[u8]; 4],
        acts: [&QuantizedActivations; T],
    ) -> [[f32; 4]; T] {
        f16_tokens::<T, false>(rows, acts)
    }
    unsafe fn group_batched<const T: usize>(
        rows: [&[u8]; 4],
        acts: [&QuantizedActivations; T],
    ) -> [[f32; 4]; T] {
        f16_tokens::<T, true>(rows, acts)
    }
}
tokens_kernel!(BF16, bf16_tokens);

/// Replaces the AVX2 kernels of `table` with AVX-512 ones where they are faster.
pub(super) fn install(table: &mut Kernels, proof: Avx512Checked) {
    set::<Q4_0>(table, proof);
    set::<Q4_1>(table, proof);
    set::<Q5_0>(table, proof);
    set::<Q5_1>(table, proof);
    set::<Q8_0>(table, proof);
    set::<Q2K>(table, proof);
    set::<Q3K>(table, proof);
    set::<Q4K>(table, proof);
    set::<Q5K>(table, proof);
    set::<Q6K>(table, proof);
    set_tokens::<Q4_0>(table, proof);
    set_tokens::<Q4_1>(table, proof);
    set_tokens::<Q5_0>(table, proof);
    set_tokens::<Q5_1>(table, proof);
    set_tokens::<Q8_0>(table, proof);
    set_tokens::<Q4K>(table, proof);
    set_tokens::<Q5K>(table, proof);
    set_tokens::<Q6K>(table, proof);
    set_tokens::<F16>(table, proof);
    set_tokens::<BF16>(table, proof);
    install_lanes(table, proof);
}

/// The AVX2 K-quant kernels compiled for this level, where LLVM fuses `vpmaddwd` +
/// `vpaddd` into VNNI's `vpdpwssd`. Same arithmetic, so the same bits as the AVX2 level.
macro_rules! k_quant_kernel {
    ($name:ident, $body:ident) => {
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn $name<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
            super::dot_avx2::$body::<R>(rows, act, n)
        }
    };
}

k_quant_kernel!(q2_k_q8_k, q2_k_body);
k_quant_kernel!(q3_k_q8_k, q3_k_body);
k_quant_kernel!(q4_k_q8_k, q4_k_body);
k_quant_kernel!(q5_k_q8_k, q5_k_body);
k_quant_kernel!(q6_k_q8_k, q6_k_body);

/// The AVX2 K-quant rows-by-tokens bodies compiled for this level: AVX-512VL's 32 vector
/// registers hold every token's accumulators, and VNNI fuses `vpmaddwd` + `vpaddd`.
macro_rules! k_quant_tokens_kernel {
    ($name:ident, $body:ident) => {
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn $name<const T: usize>(
            rows: [&[u8]; 4],
            acts: [&[u8]; T],
            n: usize,
        ) -> [[f32; 4]; T] {
            rows_by_tokens::<T>(rows, |row, ahead| {
                super::dot_avx2::$body::<T>(row, ahead, acts, n)
            })
        }
    };
}

/// The AVX2 Q4_K and Q6_K rows-by-tokens bodies (single-token or batched arithmetic)
/// compiled for this level, as `k_quant_tokens_kernel!` does for the others.
macro_rules! k_quant_batched_tokens_kernel {
    ($name:ident, $body:ident) => {
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn $name<const T: usize, const BATCHED: bool>(
            rows: [&[u8]; 4],
            acts: [&[u8]; T],
            n: usize,
        ) -> [[f32; 4]; T] {
            rows_by_tokens::<T>(rows, |row, ahead| {
                super::dot_avx2::$body::<T, BATCHED>(row, ahead, acts, n)
            })
        }
    };
}

k_quant_batched_tokens_kernel!(q4_k_tokens, q4_k_tokens_body);
k_quant_batched_tokens_kernel!(q6_k_tokens, q6_k_tokens_body);
k_quant_tokens_kernel!(q5_k_tokens, q5_k_tokens_body);

/// The float rows-by-tokens body with 32 registers: four tokens' accumulators fit.
macro_rules! float_tokens_kernel {
    ($name:ident, $elements:ty) => {
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn $name<const T: usize>(
            rows: [&[u8]; 4],
            acts: [&[u8]; T],
            n: usize,
        ) -> [[f32; 4]; T] {
            rows_by_tokens::<T>(rows, |row, ahead| {
                super::dot_avx2::float_tokens_body::<$elements, T>(row, ahead, acts, n)
            })
        }
    };
}

use super::dot_f16::{tokens_avx512 as f16_tokens, vec_dot_avx512 as f16_vec_dot};

float_tokens_kernel!(bf16_tokens, super::dot_avx2::Bf16Elements);

/// The values of the four blocks at `x` (one per row) of a 4/5-bit format, row k in
/// lanes 4k..4k+4: elements 0..16 of each block (low nibbles, with bit 4 for the 5-bit
/// formats), then elements 16..32 (high nibbles).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack_four_blocks<F: SmallFormat>(x: [*const u8; 4]) -> (__m512i, __m512i) {
    let low4 = _mm512_set1_epi8(0x0F);
    let q = _mm512_inserti32x4::<3>(
        _mm512_inserti32x4::<2>(
            _mm512_inserti32x4::<1>(
                _mm512_castsi128_si512(load128(x[0].add(F::QS))),
                load128(x[1].add(F::QS)),
            ),
            load128(x[2].add(F::QS)),
        ),
        load128(x[3].add(F::QS)),
    );
    let mut lo = _mm512_and_si512(q, low4);
    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), low4);
    if F::QH.is_some() {
        let bits = x.map(|x| u64::from(high_bits::<F>(x)));
        let lo_bits = bits
            .iter()
            .enumerate()
            .fold(0u64, |m, (k, b)| m | ((b & 0xFFFF) << (16 * k)));
        let hi_bits = bits
            .iter()
            .enumerate()
            .fold(0u64, |m, (k, b)| m | ((b >> 16) << (16 * k)));
        lo = _mm512_or_si512(lo, bit4_from_mask(lo_bits));
        hi = _mm512_or_si512(hi, bit4_from_mask(hi_bits));
    }
    (lo, hi)
}

/// Lanes `4k..4k+4` take lane `k` of `v`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn spread4(v: __m128) -> __m512 {
    let index = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    _mm512_permutexvar_ps(index, _mm512_castps128_ps512(v))
}

/// `bits` (16 per row, row k at bit 16k) as 0x10 bytes: byte `j` of the result is 0x10
/// where bit `j` is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn bit4_from_mask(bits: u64) -> __m512i {
    _mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(0x10))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn small_four<F: SmallFormat>(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4] {
    let blocks = common_blocks(F::TY, &rows, act, n);
    let w = rows.map(<[u8]>::as_ptr);
    let a = act.as_ptr();
    let next = next_rows(&rows);
    // Row k in lanes 4k..4k+4 of both: its ggml lanes 0..4 (low nibbles) in `acc_lo`,
    // 4..8 (high nibbles) in `acc_hi`.
    let mut acc_lo = _mm512_setzero_ps();
    let mut acc_hi = _mm512_setzero_ps();
    let mut min_part = _mm256_setzero_ps();
    let zero = _mm512_setzero_si512();
    for b in 0..blocks {
        if let Some(next) = next {
            prefetch(next.wrapping_add(b * 4 * F::SIZE), 4 * F::SIZE);
        }
        let y = a.add(b * F::ACT);
        let x = w.map(|w| w.add(b * F::SIZE));
        let y_lo = _mm512_broadcast_i32x4(load128(y.add(F::ACT_QS)));
        let y_hi = _mm512_broadcast_i32x4(load128(y.add(F::ACT_QS + 16)));
        // The sums start from minus the offset's share, so `vpdpbusd` leaves w * y.
        let (start_lo, start_hi) = if F::OFFSET != 0 {
            let offset = _mm512_set1_epi8(F::OFFSET);
            (
                _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, offset, y_lo)),
                _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, offset, y_hi)),
            )
        } else {
            (zero, zero)
        };
        let scales = small_scales4::<F>(x, y);
        if F::HAS_MIN {
            min_part = _mm256_add_ps(min_part, scales);
        }
        let (lo, hi) = unpack_four_blocks::<F>(x);
        let sums_lo = _mm512_dpbusd_epi32(start_lo, lo, y_lo);
        let sums_hi = _mm512_dpbusd_epi32(start_hi, hi, y_hi);
        let d = spread4(_mm256_castps256_ps128(scales));
        acc_lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums_lo), d, acc_lo);
        acc_hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums_hi), d, acc_hi);
    }
    small_finish::<F>(
        quarters(_mm512_add_ps(acc_hi, acc_lo)),
        _mm256_extractf128_ps::<1>(min_part),
    )
}

/// The four 128-bit lanes of `v`, row k's `hi + lo` in quarter k.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn quarters(v: __m512) -> [__m128; 4] {
    [
        _mm512_extractf32x4_ps::<0>(v),
        _mm512_extractf32x4_ps::<1>(v),
        _mm512_extractf32x4_ps::<2>(v),
        _mm512_extractf32x4_ps::<3>(v),
    ]
}

/// Four rows by `T` tokens, four rows per register as in [`small_four`], each block
/// unpacked once for all the tokens; per (row, token) lane the AVX2 `small_one` sums and
/// float operations (`d * dy` and `m * s` are the same products, added in the same order).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn small_tokens<F: SmallFormat, const T: usize>(
    rows: [&[u8]; 4],
    acts: [&QuantizedActivations; T],
) -> [[f32; 4]; T] {
    let blocks = common_blocks(F::TY, &rows, acts[0].bytes(), acts[0].len());
    let w = rows.map(<[u8]>::as_ptr);
    let a = acts.map(|act| act.bytes().as_ptr());
    let act_scales = acts.map(|act| act.block_scales().as_ptr());
    let scales_per_block = if F::HAS_MIN { 2 } else { 1 };
    let offset_sums = acts.map(|act| {
        act.neg_offset_sums()
            .as_ptr()
            .wrapping_add(F::OFFSET_SUMS_AT)
    });
    let next = next_rows(&rows);
    let zero = _mm512_setzero_si512();
    // Row k in lanes 4k..4k+4, low and high nibbles' lanes apart as in `small_four`.
    let mut acc_lo = [_mm512_setzero_ps(); T];
    let mut acc_hi = [_mm512_setzero_ps(); T];
    for b in 0..blocks {
        if let Some(next) = next {
            prefetch(next.wrapping_add(b * 4 * F::SIZE), 4 * F::SIZE);
        }
        let x = w.map(|w| w.add(b * F::SIZE));
        let (lo, hi) = unpack_four_blocks::<F>(x);
        let d = spread4(f16_gather4(x));
        for t in 0..T {
            let y = a[t].add(b * F::ACT);
            let y_lo = _mm512_broadcast_i32x4(load128(y.add(F::ACT_QS)));
            let y_hi = _mm512_broadcast_i32x4(load128(y.add(F::ACT_QS + 16)));
            // Starting from minus the offset's share leaves w * y, as in `small_four`.
            let (start_lo, start_hi) = if F::OFFSET != 0 {
                let neg = offset_sums[t].add(16 * b);
                (
                    _mm512_broadcast_i32x4(load128(neg.cast())),
                    _mm512_broadcast_i32x4(load128(neg.add(4).cast())),
                )
            } else {
                (zero, zero)
            };
            let sums_lo = _mm512_dpbusd_epi32(start_lo, lo, y_lo);
            let sums_hi = _mm512_dpbusd_epi32(start_hi, hi, y_hi);
            let dy = _mm512_set1_ps(act_scales[t].add(b * scales_per_block).read());
            let scale = _mm512_mul_ps(d, dy);
            acc_lo[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums_lo), scale, acc_lo[t]);
            acc_hi[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums_hi), scale, acc_hi[t]);
        }
    }
    let min_part = small_min_parts::<F, T>(w, act_scales, blocks);
    let mut out = [[0f32; 4]; T];
    for t in 0..T {
        out[t] = small_finish::<F>(quarters(_mm512_add_ps(acc_hi[t], acc_lo[t])), min_part[t]);
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_one(row: &[u8], act: &[u8], n: usize) -> f32 {
    q8_0_q8_0::<1>([row], act, n)[0]
}

/// Q8_0, two rows per register, with the AVX2 kernel's lanes: lane k of a row sums
/// elements 4k..4k+4 of each block and is scaled by `d * dy`. `vpdpbusd` wants unsigned
/// weights, so it gets `x + 128` (the sign bit flipped) and starts from `-128 * y`, which
/// the four rows share.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0_four(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4] {
    const SIZE: usize = 34;
    let blocks = common_blocks(GgmlType::Q8_0, &rows, act, n);
    let w = rows.map(<[u8]>::as_ptr);
    let a = act.as_ptr();
    let flip = _mm512_set1_epi8(-128);
    let next = next_rows(&rows);
    let mut acc = [_mm512_setzero_ps(); 2];
    for b in 0..blocks {
        if let Some(next) = next {
            prefetch(next.wrapping_add(b * 4 * SIZE), 4 * SIZE);
        }
        let y = a.add(b * SIZE);
        let x = w.map(|w| w.add(b * SIZE));
        let qy = _mm512_broadcast_i64x4(load256(y.add(2)));
        let zero = _mm512_setzero_si512();
        let start = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, flip, qy));
        let dy = _mm_cvtph_ps(_mm_set1_epi16(y.cast::<i16>().read_unaligned()));
        let d = _mm512_castps128_ps512(_mm_mul_ps(f16_gather4(x), dy));
        for p in 0..2 {
            let qx = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(load256(x[2 * p].add(2))),
                load256(x[2 * p + 1].add(2)),
            );
            let sums = _mm512_dpbusd_epi32(start, _mm512_xor_si512(qx, flip), qy);
            let lane = (2 * p) as i32;
            let (l0, l1) = (lane, lane + 1);
            let index = _mm512_setr_epi32(
                l0, l0, l0, l0, l0, l0, l0, l0, l1, l1, l1, l1, l1, l1, l1, l1,
            );
            let scale = _mm512_permutexvar_ps(index, d);
            acc[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[p]);
        }
    }
    [
        hsum(_mm512_castps512_ps256(acc[0])),
        hsum(upper256(acc[0])),
        hsum(_mm512_castps512_ps256(acc[1])),
        hsum(upper256(acc[1])),
    ]
}

/// Four Q8_0 rows by `T` tokens, two rows per register with [`q8_0_four`]'s lanes: the
/// weights and scales are loaded once for all the tokens. Here the activations take the
/// unsigned side of `vpdpbusd` (`y + 128`, the sign bit flipped) and the signed weights the
/// other, so the sums start from `-128 * x`, which each register pair computes once per
/// block for all the tokens (rather than `-128 * y` once per token and block). The lane
/// sums are the same exact integers as [`q8_0_four`]'s, so the results have its bits.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0_tokens<const T: usize>(
    rows: [&[u8]; 4],
    acts: [&QuantizedActivations; T],
) -> [[f32; 4]; T] {
    const SIZE: usize = 34;
    let blocks = common_blocks(GgmlType::Q8_0, &rows, acts[0].bytes(), acts[0].len());
    let w = rows.map(<[u8]>::as_ptr);
    let a = acts.map(|act| act.bytes().as_ptr());
    let act_scales = acts.map(|act| act.block_scales().as_ptr());
    let flip = _mm512_set1_epi8(-128);
    let zero = _mm512_setzero_si512();
    let next = next_rows(&rows);
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    for b in 0..blocks {
        if let Some(next) = next {
            prefetch(next.wrapping_add(b * 4 * SIZE), 4 * SIZE);
        }
        let x = w.map(|w| w.add(b * SIZE));
        let d = _mm512_castps128_ps512(f16_gather4(x));
        let mut qx = [zero; 2];
        let mut start = [zero; 2];
        let mut dx = [_mm512_setzero_ps(); 2];
        for p in 0..2 {
            qx[p] = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(load256(x[2 * p].add(2))),
                load256(x[2 * p + 1].add(2)),
            );
            start[p] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, flip, qx[p]));
            let (l0, l1) = ((2 * p) as i32, (2 * p + 1) as i32);
            let index = _mm512_setr_epi32(
                l0, l0, l0, l0, l0, l0, l0, l0, l1, l1, l1, l1, l1, l1, l1, l1,
            );
            dx[p] = _mm512_permutexvar_ps(index, d);
        }
        for t in 0..T {
            let qy = _mm512_broadcast_i64x4(load256(a[t].add(b * SIZE + 2)));
            let qy = _mm512_xor_si512(qy, flip);
            let dy = _mm512_set1_ps(act_scales[t].add(b).read());
            for p in 0..2 {
                let sums = _mm512_dpbusd_epi32(start[p], qy, qx[p]);
                let scale = _mm512_mul_ps(dx[p], dy);
                acc[t][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[t][p]);
            }
        }
    }
    acc.map(|[a01, a23]| {
        [
            hsum(_mm512_castps512_ps256(a01)),
            hsum(upper256(a01)),
            hsum(_mm512_castps512_ps256(a23)),
            hsum(upper256(a23)),
        ]
    })
}

/// Lanes 8..16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn upper256(v: __m512) -> __m256 {
    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
}

/// A 32-element weight format as the lanes kernels read it.
trait LanesWeights {
    const TY: GgmlType;
    const SIZE: usize;
    /// A block's 32 values as unsigned bytes in element order: the weights plus the
    /// format's `lanes_offset`.
    ///
    /// # Safety
    /// `x` points at a whole block; the CPU runs this module's instructions.
    unsafe fn unsigned_values(x: *const u8) -> __m256i;
}

/// Q8_0 with the sign bit flipped (`w + 128`).
struct Q8_0Lanes;

/// Q4_0 or Q5_0: the stored nibbles (and fifth bits) are already `w + 8` or `w + 16`.
struct SmallLanes<F>(std::marker::PhantomData<F>);

impl LanesWeights for Q8_0Lanes {
    const TY: GgmlType = GgmlType::Q8_0;
    const SIZE: usize = 34;
    #[inline(always)]
    unsafe fn unsigned_values(x: *const u8) -> __m256i {
        _mm256_xor_si256(load256(x.add(2)), _mm256_set1_epi8(-128))
    }
}

impl<F: SmallFormat> LanesWeights for SmallLanes<F> {
    const TY: GgmlType = F::TY;
    const SIZE: usize = F::SIZE;
    #[inline(always)]
    unsafe fn unsigned_values(x: *const u8) -> __m256i {
        let q = load128(x.add(F::QS));
        let nibbles = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16::<4>(q), q),
            _mm256_set1_epi8(0x0F),
        );
        if F::QH.is_some() {
            _mm256_or_si256(nibbles, bit4_from_bits_32(high_bits::<F>(x)))
        } else {
            nibbles
        }
    }
}

/// Whole blocks of `size` bytes both rows and every token of `lanes` hold.
fn lane_blocks(rows: &[&[u8]; 2], lanes: &TokenLanes, size: usize) -> usize {
    rows.iter()
        .fold(lanes.blocks(), |b, row| b.min(row.len() / size))
}

/// `out[t][r]` = lane `t` of `totals[r]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn write_lanes(totals: [__m512; 2], out: &mut [[f32; 2]; LANE_TOKENS]) {
    for (r, total) in totals.into_iter().enumerate() {
        let mut per_token = [0f32; LANE_TOKENS];
        // SAFETY: `per_token` holds sixteen f32.
        unsafe { _mm512_storeu_ps(per_token.as_mut_ptr(), total) };
        for (o, v) in out.iter_mut().zip(per_token) {
            o[r] = v;
        }
    }
}

/// Two rows against the sixteen tokens of `lanes` (see `quant::token_lanes`): for each
/// block and ggml lane `k`, the rows' dword `k` broadcast to every token meets the tokens'
/// quants `4k..4k+4` in one `vpdpbusd`, which starts from the tokens' offset shares, so
/// each token's lane gets the single-token kernels' exact integer sum. Then, per token,
/// the same float steps as those kernels: `acc_k = fma(float(sum), d * dy, acc_k)` block by
/// block, and at the end `((acc_0 + acc_4) + (acc_2 + acc_6)) + ((acc_1 + acc_5) +
/// (acc_3 + acc_7))`, the order of `hsum` (Q8_0) and `hsum4` of `hi + lo` (Q4_0, Q5_0).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn lanes_two_rows<W: LanesWeights>(
    rows: [&[u8]; 2],
    lanes: &TokenLanes,
    out: &mut [[f32; 2]; LANE_TOKENS],
) {
    let blocks = lane_blocks(&rows, lanes, W::SIZE);
    let w = rows.map(<[u8]>::as_ptr);
    let next = next_rows(&rows);
    let mut acc = [[_mm512_setzero_ps(); 8]; 2];
    // The rows' unsigned values of the current block, for broadcasting dword by dword.
    let mut values = [[0u32; 8]; 2];
    for b in 0..blocks {
        if let Some(next) = next {
            prefetch(next.wrapping_add(b * 2 * W::SIZE), 2 * W::SIZE);
        }
        let x = w.map(|w| w.add(b * W::SIZE));
        for r in 0..2 {
            _mm256_storeu_si256(values[r].as_mut_ptr().cast(), W::unsigned_values(x[r]));
        }
        // Through memory: a broadcast load per dword, where LLVM would otherwise extract
        // each from the register with two or three shuffles (the kernel's bottleneck).
        let values = std::hint::black_box(&values);
        let v = lanes.block(b);
        let dy = _mm512_load_ps(v[16].0.as_ptr().cast());
        let scale = x.map(|x| {
            let d = _mm_cvtph_ps(_mm_set1_epi16(x.cast::<i16>().read_unaligned()));
            _mm512_mul_ps(_mm512_broadcastss_ps(d), dy)
        });
        for k in 0..8 {
            let quants = _mm512_load_si512(v[k].0.as_ptr().cast());
            let start = _mm512_load_si512(v[8 + k].0.as_ptr().cast());
            for r in 0..2 {
                let weights = _mm512_set1_epi32(values[r][k] as i32);
                let sums = _mm512_dpbusd_epi32(start, weights, quants);
                acc[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale[r], acc[r][k]);
            }
        }
    }
    let totals = acc.map(|a| {
        let m = |k: usize| _mm512_add_ps(a[k], a[k + 4]);
        _mm512_add_ps(_mm512_add_ps(m(0), m(2)), _mm512_add_ps(m(1), m(3)))
    });
    write_lanes(totals, out);
}

/// The safe `DotLanesFn` of `W`: NaN results for lanes built for another offset.
fn lanes_entry<W: LanesWeights>(
    rows: [&[u8]; 2],
    lanes: &TokenLanes,
    out: &mut [[f32; 2]; LANE_TOKENS],
) {
    if lanes.is_q8_k() || Some(lanes.offset()) != lanes_offset(W::TY) {
        out.iter_mut().for_each(|o| *o = [f32::NAN; 2]);
        return;
    }
    // SAFETY: installed only by `install`, which demands an `Avx512Checked`; every block the
    // kernel reads is inside both rows and `lanes` (it takes the least count of them).
    unsafe { lanes_two_rows::<W>(rows, lanes, out) }
}

/// Two Q4_K rows against the sixteen Q8_K tokens of `lanes`: per sub-block of 32, the
/// rows' nibble dwords broadcast to every token meet the tokens' quants in `vpdpbusd`s
/// (exact integer sums, in any order), which the sub-block scales weight into each pair's
/// `S_p`; the minimums times the tokens' sub-block sums make `M_p`. Then per token the
/// float steps of llama.cpp's repacked kernels: with `GEMM` (`ggml_gemm_q4_K_8x8_q8_K`,
/// `q4_k_gemm_body`) `acc = fma(S_p, d dy, acc)` and `acc_min = fma(M_p, dmin dy, acc_min)`
/// for each pair in turn, without (the gemv, `q4_k_body`) once per super-block with the
/// sums of all four pairs; the result is `acc - acc_min`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_k_lanes<const GEMM: bool>(
    rows: [&[u8]; 2],
    lanes: &TokenLanes,
    out: &mut [[f32; 2]; LANE_TOKENS],
) {
    const SIZE: usize = 144;
    let blocks = lane_blocks(&rows, lanes, SIZE);
    let w = rows.map(<[u8]>::as_ptr);
    let next = next_rows(&rows);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut acc_min = [_mm512_setzero_ps(); 2];
    // Per row: the 256 nibbles as bytes (sub-block s at dwords 8s..8s + 8), the eight
    // scales, and the minimums of each pair of sub-blocks as two i16.
    let mut values = [[0u32; 64]; 2];
    let mut scales = [[0i32; 8]; 2];
    let mut min_pairs = [[0i32; 4]; 2];
    for b in 0..blocks {
        if let Some(next) = next {
            prefetch(next.wrapping_add(b * 2 * SIZE), 2 * SIZE);
        }
        let x = w.map(|w| w.add(b * SIZE));
        let low4 = _mm256_set1_epi8(0x0F);
        for r in 0..2 {
            for j in 0..4 {
                let q = load256(x[r].add(16 + 32 * j));
                let lo = _mm256_and_si256(q, low4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
                _mm256_storeu_si256(values[r].as_mut_ptr().add(16 * j).cast(), lo);
                _mm256_storeu_si256(values[r].as_mut_ptr().add(16 * j + 8).cast(), hi);
            }
            let (sc, mn) = k4_scales_mins_packed(x[r].add(4));
            let byte = |v: u64, i: usize| ((v >> (8 * i)) & 0xFF) as i32;
            for s in 0..8 {
                scales[r][s] = byte(sc, s);
            }
            for p in 0..4 {
                min_pairs[r][p] = byte(mn, 2 * p) | (byte(mn, 2 * p + 1) << 16);
            }
        }
        // Through memory: broadcast loads, not shuffles (see `lanes_two_rows`).
        let (values, scales, min_pairs) = std::hint::black_box((&values, &scales, &min_pairs));
        let v = lanes.block(b);
        let dy = _mm512_load_ps(v[68].0.as_ptr().cast());
        // [d, dmin] of each row, widened, times every token's dy.
        let d_dmin = x.map(|x| _mm_cvtph_ps(_mm_cvtsi32_si128(x.cast::<i32>().read_unaligned())));
        let scale_d = d_dmin.map(|v| _mm512_mul_ps(_mm512_broadcastss_ps(v), dy));
        let scale_min =
            d_dmin.map(|v| _mm512_mul_ps(_mm512_broadcastss_ps(_mm_movehdup_ps(v)), dy));
        let mut s_all = [zero; 2];
        let mut m_all = [zero; 2];
        for p in 0..4 {
            let mut s_pair = [zero; 2];
            for s in [2 * p, 2 * p + 1] {
                // Two partial sums per row keep four `vpdpbusd` chains in flight.
                let mut sums = [[zero; 2]; 2];
                for k in 0..8 {
                    let quants = _mm512_load_si512(v[8 * s + k].0.as_ptr().cast());
                    for r in 0..2 {
                        let weights = _mm512_set1_epi32(values[r][8 * s + k] as i32);
                        sums[r][k % 2] = _mm512_dpbusd_epi32(sums[r][k % 2], weights, quants);
                    }
                }
                for r in 0..2 {
                    let sub_block = _mm512_add_epi32(sums[r][0], sums[r][1]);
                    let scaled = _mm512_mullo_epi32(sub_block, _mm512_set1_epi32(scales[r][s]));
                    s_pair[r] = _mm512_add_epi32(s_pair[r], scaled);
                }
            }
            let sub_block_sums = _mm512_load_si512(v[64 + p].0.as_ptr().cast());
            for r in 0..2 {
                let m_pair = _mm512_madd_epi16(_mm512_set1_epi32(min_pairs[r][p]), sub_block_sums);
                if GEMM {
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s_pair[r]), scale_d[r], acc[r]);
                    acc_min[r] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(m_pair), scale_min[r], acc_min[r]);
                } else {
                    s_all[r] = _mm512_add_epi32(s_all[r], s_pair[r]);
                    m_all[r] = _mm512_add_epi32(m_all[r], m_pair);
                }
            }
        }
        if !GEMM {
            for r in 0..2 {
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s_all[r]), scale_d[r], acc[r]);
                acc_min[r] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(m_all[r]), scale_min[r], acc_min[r]);
            }
        }
    }
    write_lanes([0, 1].map(|r| _mm512_sub_ps(acc[r], acc_min[r])), out);
}

/// The safe `DotLanesFn` of Q4_K: NaN results for lanes not built from Q8_K rows.
fn q4_k_lanes_entry(rows: [&[u8]; 2], lanes: &TokenLanes, out: &mut [[f32; 2]; LANE_TOKENS]) {
    if !lanes.is_q8_k() {
        out.iter_mut().for_each(|o| *o = [f32::NAN; 2]);
        return;
    }
    // SAFETY: as in `lanes_entry`.
    unsafe {
        if lanes.batched() {
            q4_k_lanes::<true>(rows, lanes, out);
        } else {
            q4_k_lanes::<false>(rows, lanes, out);
        }
    }
}

/// Two Q6_K rows against the sixteen Q8_K tokens of `lanes`, with the arithmetic of
/// llama.cpp's tiled kernel (`q6_k_tokens_body` with `TILED`): per super-block the exact
/// integer `S = Σ scale (Σ u q8) - 32 Σ scale bsum` (stored values `u = w + 32` broadcast
/// dword by dword to the tokens' quants; the offset's share from the 16-element block sums
/// by `vpmaddwd` with pairs of scales), then `acc = fma((float) S * d_x, d_y, acc)`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6_k_tiled_lanes(
    rows: [&[u8]; 2],
    lanes: &TokenLanes,
    out: &mut [[f32; 2]; LANE_TOKENS],
) {
    const SIZE: usize = 210;
    let blocks = lane_blocks(&rows, lanes, SIZE);
    let w = rows.map(<[u8]>::as_ptr);
    let next = next_rows(&rows);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); 2];
    // Per row: the 256 values as bytes in element order, the sixteen scales, and the scales
    // in pairs as two i16.
    let mut values = [[0u32; 64]; 2];
    let mut scales = [[0i32; 16]; 2];
    let mut scale_pairs = [[0i32; 8]; 2];
    for b in 0..blocks {
        if let Some(next) = next {
            prefetch(next.wrapping_add(b * 2 * SIZE), 2 * SIZE);
        }
        let x = w.map(|w| w.add(b * SIZE));
        for r in 0..2 {
            for h in 0..2 {
                for (k, v) in q6_k_values(x[r], h).into_iter().enumerate() {
                    _mm256_storeu_si256(values[r].as_mut_ptr().add(32 * h + 8 * k).cast(), v);
                }
            }
            for s in 0..16 {
                scales[r][s] = i32::from(x[r].add(192 + s).cast::<i8>().read());
            }
            for i in 0..8 {
                let pair = |s: usize| u32::from(scales[r][s] as i16 as u16);
                scale_pairs[r][i] = (pair(2 * i) | (pair(2 * i + 1) << 16)) as i32;
            }
        }
        // Through memory: broadcast loads, not shuffles (see `lanes_two_rows`).
        let (values, scales, scale_pairs) = std::hint::black_box((&values, &scales, &scale_pairs));
        let v = lanes.block(b);
        let dy = _mm512_load_ps(v[68].0.as_ptr().cast());
        let mut totals = [zero; 2];
        let mut offsets = [zero; 2];
        for s in 0..16 {
            let mut sums = [zero; 2];
            for k in 0..4 {
                let quants = _mm512_load_si512(v[4 * s + k].0.as_ptr().cast());
                for r in 0..2 {
                    let weights = _mm512_set1_epi32(values[r][4 * s + k] as i32);
                    sums[r] = _mm512_dpbusd_epi32(sums[r], weights, quants);
                }
            }
            for r in 0..2 {
                let scaled = _mm512_mullo_epi32(sums[r], _mm512_set1_epi32(scales[r][s]));
                totals[r] = _mm512_add_epi32(totals[r], scaled);
            }
        }
        for i in 0..8 {
            let bsums = _mm512_load_si512(v[69 + i].0.as_ptr().cast());
            for r in 0..2 {
                let share = _mm512_madd_epi16(_mm512_set1_epi32(scale_pairs[r][i]), bsums);
                offsets[r] = _mm512_add_epi32(offsets[r], share);
            }
        }
        for r in 0..2 {
            let total = _mm512_sub_epi32(totals[r], _mm512_slli_epi32::<5>(offsets[r]));
            let d_x = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                x[r].add(208).cast::<u16>().read_unaligned(),
            )));
            let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(total), _mm512_broadcastss_ps(d_x));
            acc[r] = _mm512_fmadd_ps(scaled, dy, acc[r]);
        }
    }
    write_lanes(acc, out);
}

/// The safe `DotLanesFn` of Q6_K: NaN results for lanes not built from Q8_K rows of tokens
/// the tiled kernel takes.
fn q6_k_lanes_entry(rows: [&[u8]; 2], lanes: &TokenLanes, out: &mut [[f32; 2]; LANE_TOKENS]) {
    if !lanes.is_q8_k() || !lanes.batched() {
        out.iter_mut().for_each(|o| *o = [f32::NAN; 2]);
        return;
    }
    // SAFETY: as in `lanes_entry`.
    unsafe { q6_k_tiled_lanes(rows, lanes, out) }
}

fn install_lanes(table: &mut Kernels, _proof: Avx512Checked) {
    table.set_dot_lanes(GgmlType::Q6K, q6_k_lanes_entry);
    table.set_dot_lanes(GgmlType::Q4K, q4_k_lanes_entry);
    table.set_dot_lanes(GgmlType::Q4_0, lanes_entry::<SmallLanes<Q4_0Format>>);
    table.set_dot_lanes(GgmlType::Q5_0, lanes_entry::<SmallLanes<Q5_0Format>>);
    table.set_dot_lanes(GgmlType::Q8_0, lanes_entry::<Q8_0Lanes>);
}
