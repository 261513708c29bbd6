//! F16 weights with the arithmetic of llama.cpp's x86 AVX-512 build, at the AVX2 and
//! AVX-512 levels (the AVX2 level keeps each 16-lane register as two 8-lane halves, lane
//! for lane the same operations, so both levels give the same bits).
//!
//! - One token (`ggml_vec_dot_f16`): per 64 elements, four 16-lane accumulators take one
//!   FMA each; at the end `(s0 + s2) + (s1 + s3)`, then `_mm512_reduce_add_ps`
//!   ([`reduce16`]'s tree), widened to f64, plus the last `n % 64` products (each rounded
//!   to f32, then added in f64), rounded back to f32.
//! - Two or more tokens of a batch with rows a multiple of 16 long (llamafile's tinyBLAS,
//!   `tinyBLAS<16, __m512, __m512, ggml_fp16_t, ...>`): one 16-lane accumulator per
//!   (row, token), an FMA per 16 elements, then `_mm512_reduce_add_ps`. (tinyBLAS also
//!   wants the row count a multiple of 4; a matrix without is multiplied by the vec_dot,
//!   which these kernels do not follow there.)
//!
//! Activations are F16 too (ggml converts them with round-to-nearest-even, as
//! `activation::convert_f16` does), so every product is of two exact f16 values.

#![allow(clippy::incompatible_msrv)]
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::blocks::f16_bits_to_f32;
use super::dot_avx2::{hsum, next_rows, prefetch};
use super::QuantizedActivations;

/// Elements per step of `ggml_vec_dot_f16`: four registers of sixteen.
const STEP: usize = 64;

/// How many tokens of a batch of `batch` llama.cpp multiplies with tinyBLAS: all of a batch
/// of two or more (`llamafile_sgemm` declines a single column).
pub(super) fn tiny_blas_tokens(batch: usize) -> usize {
    if batch >= 2 {
        batch
    } else {
        0
    }
}

/// The f16 values `p[i]` widened.
#[inline(always)]
unsafe fn element(p: *const u8, i: usize) -> f32 {
    f16_bits_to_f32(p.add(2 * i).cast::<u16>().read_unaligned())
}

/// `sum` (the reduced vector part) plus the products of elements `from..n`, as
/// `ggml_vec_dot_f16` adds its leftovers: in f64, each product rounded to f32 first.
#[inline(always)]
unsafe fn add_leftovers(sum: f32, x: *const u8, y: *const u8, from: usize, n: usize) -> f32 {
    let mut total = f64::from(sum);
    for i in from..n {
        total += f64::from(element(x, i) * element(y, i));
    }
    total as f32
}

// ---- AVX2: sixteen lanes as two halves ---------------------------------------------------

/// Eight f16 at `p`, widened.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
}

/// `_mm512_reduce_add_ps` of the register whose lanes 0..8 are `lo` and 8..16 `hi`: lanes
/// `l` and `l + 8` added first, then as `hsum` adds eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn reduce16_halves(lo: __m256, hi: __m256) -> f32 {
    hsum(_mm256_add_ps(hi, lo))
}

/// `ggml_vec_dot_f16` over `n` elements of each.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot_avx2(row: &[u8], act: &[u8], n: usize) -> f32 {
    let n = n.min(row.len() / 2).min(act.len() / 2);
    let (x, y) = (row.as_ptr(), act.as_ptr());
    let whole = n - n % STEP;
    let mut sum = [[_mm256_setzero_ps(); 2]; 4];
    let mut i = 0;
    while i < whole {
        for j in 0..4 {
            for h in 0..2 {
                let at = 2 * (i + 16 * j + 8 * h);
                sum[j][h] = _mm256_fmadd_ps(load8(x.add(at)), load8(y.add(at)), sum[j][h]);
            }
        }
        i += STEP;
    }
    let half = |h: usize| {
        _mm256_add_ps(
            _mm256_add_ps(sum[0][h], sum[2][h]),
            _mm256_add_ps(sum[1][h], sum[3][h]),
        )
    };
    add_leftovers(reduce16_halves(half(0), half(1)), x, y, whole, n)
}

/// Four rows, [`vec_dot_avx2`] each.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn vec_dot4_avx2(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4] {
    rows.map(|row| vec_dot_avx2(row, act, n))
}

/// Four rows by `T` tokens: with `BATCHED` and rows a multiple of 16 long, tinyBLAS's
/// arithmetic; otherwise [`vec_dot_avx2`] per pair. Every row and activation row holds at
/// least `n` elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tokens_avx2<const T: usize, const BATCHED: bool>(
    rows: [&[u8]; 4],
    acts: [&[u8]; T],
    n: usize,
) -> [[f32; 4]; T] {
    if !BATCHED || !n.is_multiple_of(16) {
        return acts.map(|act| vec_dot4_avx2(rows, act, n));
    }
    let mut out = [[0f32; 4]; T];
    for r in 0..4 {
        let x = rows[r].as_ptr();
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        let mut i = 0;
        while i < n {
            for h in 0..2 {
                let at = 2 * (i + 8 * h);
                let w = load8(x.add(at));
                for t in 0..T {
                    acc[t][h] = _mm256_fmadd_ps(w, load8(acts[t].as_ptr().add(at)), acc[t][h]);
                }
            }
            i += 16;
        }
        for t in 0..T {
            out[t][r] = reduce16_halves(acc[t][0], acc[t][1]);
        }
    }
    out
}

// ---- AVX-512 ------------------------------------------------------------------------------

/// Sixteen f16 at `p`, widened.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn load16(p: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
}

/// `_mm512_reduce_add_ps` of four registers at once: lanes `l` and `l + 8`, then `l` and
/// `l + 4`, then `(g0 + g2) + (g1 + g3)`, each addition serving all four (the shuffles put
/// the registers' halves, then quarters, side by side).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn reduce16_four(v: [__m512; 4]) -> [f32; 4] {
    let halves = |a: __m512, b: __m512| {
        let firsts = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
        let lasts = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
        _mm512_add_ps(lasts, firsts)
    };
    let (h01, h23) = (halves(v[0], v[1]), halves(v[2], v[3]));
    // Quarter k: register k's eight sums folded to four.
    let g = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b11_01_11_01>(h01, h23),
        _mm512_shuffle_f32x4::<0b10_00_10_00>(h01, h23),
    );
    let b = _mm512_add_ps(g, _mm512_permute_ps::<0b01_00_11_10>(g));
    let c = _mm512_add_ps(b, _mm512_permute_ps::<0b10_11_00_01>(b));
    let mut lanes = [0f32; 16];
    // SAFETY: `lanes` holds sixteen f32.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), c) };
    [lanes[0], lanes[4], lanes[8], lanes[12]]
}

/// `ggml_vec_dot_f16` for `R` rows (at most four) sharing the activation loads.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn vec_dot_avx512<const R: usize>(
    rows: [&[u8]; R],
    act: &[u8],
    n: usize,
) -> [f32; R] {
    let n = rows
        .iter()
        .fold(n.min(act.len() / 2), |n, row| n.min(row.len() / 2));
    let x = rows.map(<[u8]>::as_ptr);
    let y = act.as_ptr();
    let whole = n - n % STEP;
    let mut sum = [[_mm512_setzero_ps(); 4]; R];
    let mut i = 0;
    while i < whole {
        for j in 0..4 {
            let at = 2 * (i + 16 * j);
            let a = load16(y.add(at));
            for r in 0..R {
                sum[r][j] = _mm512_fmadd_ps(load16(x[r].add(at)), a, sum[r][j]);
            }
        }
        i += STEP;
    }
    let mut folded = [_mm512_setzero_ps(); 4];
    for r in 0..R {
        let s = sum[r];
        folded[r] = _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3]));
    }
    let reduced = reduce16_four(folded);
    std::array::from_fn(|r| add_leftovers(reduced[r], x[r], y, whole, n))
}

/// [`tokens_avx2`] with 512-bit registers: tinyBLAS's sixteen lanes in one register per
/// (row, token). The activations come widened already (`QuantizedActivations::widened`,
/// the same values), so each step converts only the four rows.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn tokens_avx512<const T: usize, const BATCHED: bool>(
    rows: [&[u8]; 4],
    acts: [&QuantizedActivations; T],
) -> [[f32; 4]; T] {
    let n = acts[0].len();
    let widened_ok = acts.iter().all(|a| a.widened().len() >= n);
    if !BATCHED || !n.is_multiple_of(16) || !widened_ok {
        return acts.map(|act| vec_dot_avx512::<4>(rows, act.bytes(), n));
    }
    let x = rows.map(<[u8]>::as_ptr);
    let y = acts.map(|a| a.widened().as_ptr());
    let next = next_rows(&rows);
    let mut acc = [[_mm512_setzero_ps(); 4]; T];
    let mut i = 0;
    while i < n {
        let at = 2 * i;
        if let Some(next) = next {
            // The following four rows, as much of them as these steps cover of these.
            prefetch(next.wrapping_add(4 * at), 128);
        }
        let w = x.map(|x| load16(x.add(at)));
        for t in 0..T {
            let a = _mm512_loadu_ps(y[t].add(i));
            for r in 0..4 {
                acc[t][r] = _mm512_fmadd_ps(w[r], a, acc[t][r]);
            }
        }
        i += 16;
    }
    acc.map(|a| reduce16_four(a))
}
