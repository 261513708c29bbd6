//! AVX2 + FMA + F16C twins of the `dot_scalar` kernels and of the activation quantisers.
//!
//! Every kernel is a `#[target_feature]` function generic over `R`, the number of weight
//! rows dotted with one activation row: `R = 1` is the [`DotFn`], `R = 4` the [`Dot4Fn`],
//! which loads each activation block once for four rows. Both run the same per-row
//! operations in the same order, so the four-row kernel returns exactly the bits of four
//! single-row calls (a matmul may mix them freely).
//!
//! Within a block the integer sum of products is exact, as in the scalar kernels; only the
//! f32 arithmetic after it differs: the scalar kernels add one f32 per block (or per lane)
//! in element order, these add eight lanes per block and sum the lanes at the end. Both are
//! within `(blocks + 8) * 2^-24 * sum |block term|` of the exact sum of the block terms, so
//! they differ by at most twice that (see `tests::check_against_scalar`).
//!
//! Memory is read through raw pointers, but only below `blocks * block_size` for the
//! block count [`common_blocks`] takes from the slice lengths: a short row or activation
//! gives a wrong number, never a read past the slice, exactly as in `dot_scalar`.

#![allow(clippy::needless_range_loop)] // `for r in 0..R` indexes several per-row arrays.

use std::arch::x86_64::*;

use super::activation::activation_type;
use super::dispatch::{Avx2Checked, Kernels};
use super::dot::{Dot4Fn, DotFn};
use super::GgmlType;

// ---- Entry points ---------------------------------------------------------------------

/// A kernel computing `R` weight rows of type `TY` against one activation row.
pub(super) trait RowKernel {
    const TY: GgmlType;
    /// # Safety
    /// The CPU must support the instruction set of the module that installs the kernel.
    unsafe fn rows<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R];
}

/// Whole blocks of `ty` that `n` elements, every row and the activations all contain.
#[inline(always)]
pub(super) fn common_blocks<const R: usize>(
    ty: GgmlType,
    rows: &[&[u8]; R],
    act: &[u8],
    n: usize,
) -> usize {
    let mut blocks = (n / ty.block_size()).min(act.len() / activation_type(ty).type_size());
    for row in rows {
        blocks = blocks.min(row.len() / ty.type_size());
    }
    blocks
}

/// The kernel set's [`DotFn`] and [`Dot4Fn`] for `K`. The caller vouches that the CPU runs
/// `K`'s instructions; the functions are only reachable through the table it fills.
pub(super) fn entry_points<K: RowKernel>() -> (DotFn, Dot4Fn) {
    fn single<K: RowKernel>(row: &[u8], act: &[u8], n: usize) -> f32 {
        // SAFETY: `entry_points` is only called by `install` functions holding a proof of
        // the CPU features (dispatch::Avx2Checked / Avx512Checked).
        unsafe { K::rows::<1>([row], act, n)[0] }
    }
    fn four<K: RowKernel>(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4] {
        let blocks = common_blocks(K::TY, &[rows[0]], act, n);
        if rows
            .iter()
            .all(|row| common_blocks(K::TY, &[row], act, n) == blocks)
        {
            // SAFETY: as in `single`.
            unsafe { K::rows::<4>(rows, act, n) }
        } else {
            // Rows of different lengths: each row gets its own block count.
            rows.map(|row| single::<K>(row, act, n))
        }
    }
    (single::<K>, four::<K>)
}

fn set<K: RowKernel>(table: &mut Kernels) {
    let (single, four) = entry_points::<K>();
    table.set_dot(K::TY, single, four);
}

/// Declares a [`RowKernel`] named `$name` for `$ty` running the AVX2 function `$f`.
macro_rules! row_kernel {
    ($name:ident, $ty:expr, $f:ident) => {
        pub(super) struct $name;
        impl RowKernel for $name {
            const TY: GgmlType = $ty;
            unsafe fn rows<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
                $f::<R>(rows, act, n)
            }
        }
    };
}

row_kernel!(Q4_1, GgmlType::Q4_1, q4_1_q8_1);
row_kernel!(Q8_0, GgmlType::Q8_0, q8_0_q8_0);

/// Replaces the scalar kernels of `table` with the AVX2 ones.
pub(super) fn install(table: &mut Kernels, _proof: Avx2Checked) {
    set::<Q4_1>(table);
    set::<Q8_0>(table);
}

// ---- Shared pieces --------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load256(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load128(p: *const u8) -> __m128i {
    _mm_loadu_si128(p.cast())
}

/// The f16 at `p`, widened exactly, in all eight lanes. (Broadcasting before the
/// conversion writes the whole register: a scalar conversion lets LLVM insert the 16 bits
/// into a register that is still in use, and the kernel then waits on that register.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_splat(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(p.cast::<i16>().read_unaligned()))
}

/// The two adjacent f16 at `p`, widened exactly: lanes `[a, b, a, b, a, b, a, b]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_pair_splat(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi32(p.cast::<i32>().read_unaligned()))
}

/// Sum of the eight lanes, in a fixed order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Products of unsigned bytes `x` (at most 255; here at most 63) and signed bytes `y`
/// summed in fours: eight i32 lanes. Exact: a pair of products is at most 2 * 63 * 128 in
/// magnitude, inside `maddubs`' saturation limit.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_u8_i8(x: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
}

/// Products of signed bytes summed in fours. `maddubs` wants one unsigned operand, so the
/// sign of `x` moves onto `y`: |x| * (y * sign x). Exact unless `y` holds -128 (the
/// quantisers never write it: their quants are within ±127).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_i8_i8(x: __m256i, y: __m256i) -> __m256i {
    dot_u8_i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

/// The 32 4-bit values of 16 packed bytes in element order: low nibbles, then high ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn nibbles(q: __m128i) -> __m256i {
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(q), q);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

// ---- 32-element formats ---------------------------------------------------------------

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_q8_0<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    const SIZE: usize = 34;
    let blocks = common_blocks(GgmlType::Q8_0, &rows, act, n);
    let a = act.as_ptr();
    let w = rows.map(<[u8]>::as_ptr);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let y = a.add(b * SIZE);
        let qy = load256(y.add(2));
        let dy = f16_splat(y);
        for r in 0..R {
            let x = w[r].add(b * SIZE);
            let sums = dot_i8_i8(load256(x.add(2)), qy);
            let d = _mm256_mul_ps(f16_splat(x), dy);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_q8_1<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    const SIZE: usize = 20;
    const ACT: usize = 36;
    let blocks = common_blocks(GgmlType::Q4_1, &rows, act, n);
    let a = act.as_ptr();
    let w = rows.map(<[u8]>::as_ptr);
    let mut acc = [_mm256_setzero_ps(); R];
    // Odd lanes: the minimum's share, m * s per block, summed apart from the products.
    let mut min_part = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let y = a.add(b * ACT);
        let qy = load256(y.add(4));
        let ds_y = f16_pair_splat(y);
        for r in 0..R {
            let x = w[r].add(b * SIZE);
            let sums = dot_u8_i8(nibbles(load128(x.add(4))), qy);
            // [d * dy, m * s] four times
            let scales = _mm256_mul_ps(f16_pair_splat(x), ds_y);
            let d = _mm256_moveldup_ps(scales);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[r]);
            min_part[r] = _mm256_add_ps(min_part[r], scales);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let m = _mm_movehdup_ps(_mm256_castps256_ps128(min_part[r]));
        out[r] = hsum(acc[r]) + _mm_cvtss_f32(m);
    }
    out
}
