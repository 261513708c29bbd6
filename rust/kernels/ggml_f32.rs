//! The f32 arithmetic of llama.cpp's CPU backend (ggml built for x86-64 with AVX-512),
//! operation for operation, so that our results equal its results to the bit.
//!
//! Results of a transformer are chaotic in the last bits: activations are rounded to 8-bit
//! blocks before every matrix product, so one ulp anywhere can move a quant by one step, and
//! thirty layers later two engines that each sum "correctly" in their own order part by
//! tenths of a logit and eventually pick different greedy tokens. Equality with llama.cpp
//! therefore needs its summation orders and its approximations, not just its formulas:
//!
//! - `ggml_vec_dot_f32` (attention scores, and weighted values of a single decoded token):
//!   four 16-lane accumulators over blocks of 64 elements, added pairwise (0+2, 1+3, then
//!   the two), then the 16 lanes by `_mm512_reduce_add_ps`'s halving tree ([`reduce16`]);
//!   elements past the last whole 64 are added one by one with a fused multiply-add.
//! - llamafile's tinyBLAS F32 product (weighted values of a batch of tokens): one 16-lane
//!   accumulator along the whole sum, then the same halving tree.
//! - `ggml_v_expf` ([`expf`]): a degree-5 polynomial after a split by `ln 2`, scaled by
//!   `2^n`; within 1.5 ulp of `exp`, but not `exp`, and used by the softmax and SiLU.
//! - `ggml_vec_soft_max_f32`: `exp(x - max)` in blocks of 16 positions counted from the
//!   first cache slot, each block's sum by the halving tree, the block sums added in f64.
//! - `ggml_vec_swiglu_f32`: `x / (1 + expf(-x)) * g`, the vector `expf` on whole blocks of 16
//!   and libm's `expf` on the remainder.
//!
//! With the Arm kernel levels (`neon`, `dotprod`; [`arm_arithmetic`]) the same operations
//! follow ggml's NEON build instead: its own `expf` ([`expf_neon`]), the softmax and SiLU in
//! blocks of 4, and `ggml_vec_dot_f16`'s four 4-lane accumulators ([`dot_f16_neon`]).
//!
//! The arithmetic is written once, portably (`f32::mul_add` is one rounding, as the FMA
//! instructions ggml uses), and compiled three times: for AVX-512, for AVX2+FMA and plain
//! (see [`dispatch!`]); the compiler vectorises the lane loops where it can, and every build
//! gives the same bits.

use std::sync::OnceLock;

use crate::quant::{self, SimdLevel};

/// Lanes of the vectors whose order ggml's reductions follow (`__m512`).
pub const LANES: usize = 16;
/// Elements per step of `ggml_vec_dot_f32`: four accumulators of 16 lanes.
pub const DOT_STEP: usize = 4 * LANES;

/// The SIMD level the kernels of this module are compiled for in this process: the
/// quantized kernels' choice (so `SAMPLER_SDK_SIMD=scalar` forces the plain build here too).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| quant::kernels().level())
}

/// Whether this process reproduces llama.cpp's Arm NEON build (the `neon` and `dotprod`
/// kernel levels) rather than its x86-64 AVX-512 one: the two differ in `expf` and in the
/// width of the blocks the softmax and SiLU take.
#[inline]
pub(crate) fn arm_arithmetic() -> bool {
    static ARM: OnceLock<bool> = OnceLock::new();
    *ARM.get_or_init(|| {
        matches!(
            quant::kernels().level(),
            SimdLevel::Neon | SimdLevel::Dotprod
        )
    })
}

/// Runs an `#[inline(always)]` body compiled for the best instruction set the process
/// uses: `dispatch!(body(args..))`. Every build computes the same bits; only speed differs.
macro_rules! dispatch {
    ($body:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R { f() }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R { f() }
            // The closures must be inlined into the wrappers to get their target features:
            // left to the optimiser, a change elsewhere in the crate once made it outline
            // the SwiGLU closure, whose multiply-adds then became `fmaf` calls (a third of
            // a prefill).
            match $crate::kernels::ggml_f32::level() {
                // SAFETY: the level was chosen from the CPU's features.
                $crate::quant::SimdLevel::Avx512 => unsafe {
                    avx512(#[inline(always)] || $body($($arg),*))
                },
                // SAFETY: as above.
                $crate::quant::SimdLevel::Avx2 => unsafe {
                    avx2(#[inline(always)] || $body($($arg),*))
                },
                // Scalar, and the Arm levels: this module has no NEON builds yet.
                _ => $body($($arg),*),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body($($arg),*)
        }
    }};
}
pub(crate) use dispatch;

/// `_mm512_reduce_add_ps`: lanes `l` and `l + 8` first, then `l` and `l + 4`, then `l` and
/// `l + 2`, then the last two.
#[inline(always)]
pub fn reduce16(v: &[f32; LANES]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|l| v[l + 8] + v[l]);
    let g: [f32; 4] = std::array::from_fn(|l| h[l + 4] + h[l]);
    (g[2] + g[0]) + (g[3] + g[1])
}

/// `ggml_vec_dot_f32(x, y)` (see the module documentation).
#[inline(always)]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    // The compiler does not vectorise the fused multiply-adds of the portable version, and
    // attention scores are this product per (head, position): explicit vectors where the
    // CPU has them, the same operations lane for lane.
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the level was chosen from the CPU's features.
        SimdLevel::Avx512 => return unsafe { x86::dot_avx512(x, y) },
        // SAFETY: as above.
        SimdLevel::Avx2 => return unsafe { x86::dot_avx2(x, y) },
        _ => {}
    }
    dot_portable(x, y)
}

/// `out[p] = dot(q, keys[p * q.len()..(p + 1) * q.len()])` for every position `p` of `out`
/// (attention scores of one query over consecutive keys), with [`dot`]'s bits. With
/// AVX-512, sixteen keys at a time share one reduction: their sixteen lane vectors are
/// folded together, each addition `reduce16` makes serving all of them.
#[inline(always)]
pub fn dots(q: &[f32], keys: &[f32], out: &mut [f32]) {
    dots_with::<false>(q, keys, out, dot);
}

/// `ggml_vec_dot_f16` of ggml's NEON build without FP16 arithmetic, on values already
/// widened from f16: four 4-lane fused accumulators over steps of 16, folded as
/// `(a0 + a2) + (a1 + a3)` and summed `(l0 + l1) + (l2 + l3)`; the elements past the last
/// whole step are added one by one in f64.
#[inline(always)]
pub fn dot_f16_neon(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let main = n - n % 16;
    let mut acc = [[0f32; 4]; 4];
    for (xs, ys) in x[..main].chunks_exact(16).zip(y[..main].chunks_exact(16)) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, v) in a.iter_mut().enumerate() {
                *v = xs[4 * j + l].mul_add(ys[4 * j + l], *v);
            }
        }
    }
    let c: [f32; 4] = std::array::from_fn(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]));
    let mut total = f64::from((c[0] + c[1]) + (c[2] + c[3]));
    for (a, b) in x[main..n].iter().zip(&y[main..n]) {
        total += f64::from(a * b);
    }
    total as f32
}

/// [`dot_f16_neon`] of `q` with every key.
pub fn dots_f16_neon(q: &[f32], keys: &[f32], out: &mut [f32]) {
    let hd = q.len();
    for (o, key) in out.iter_mut().zip(keys.chunks_exact(hd)) {
        *o = dot_f16_neon(q, key);
    }
}

/// `out[p] = one(q, key p)` for every key, sixteen keys at a time through
/// [`sixteen_key_dots`] where it can; `one` must be the same order for a single key.
#[inline(always)]
fn dots_with<const TINYBLAS: bool>(
    q: &[f32],
    keys: &[f32],
    out: &mut [f32],
    one: impl Fn(&[f32], &[f32]) -> f32,
) {
    let hd = q.len();
    let done = sixteen_key_dots::<TINYBLAS, f32>(q, keys, out);
    for (p, o) in out.iter_mut().enumerate().skip(done) {
        *o = one(q, &keys[p * hd..(p + 1) * hd]);
    }
}

/// [`dots`] (or, `tinyblas`, [`tinyblas_dots`]) of `q` with an f16 cache's keys, widened in
/// the registers rather than copied to f32 first, for the keys [`sixteen_key_dots`] takes.
/// Returns how many keys it did (from the first); the caller computes the others.
pub fn f16_key_dots(q: &[f32], keys: &[half::f16], tinyblas: bool, out: &mut [f32]) -> usize {
    if tinyblas {
        sixteen_key_dots::<true, half::f16>(q, keys, out)
    } else {
        sixteen_key_dots::<false, half::f16>(q, keys, out)
    }
}

/// The element types of keys [`sixteen_key_dots`] reads.
trait KeyElement: Copy {
    /// Whether the elements are f16 (widened in the registers) rather than f32.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const F16: bool;
}

impl KeyElement for f32 {
    const F16: bool = false;
}

impl KeyElement for half::f16 {
    const F16: bool = true;
}

/// `out[p] = q · key p` for whole groups of sixteen keys through [`x86::dots16_avx512`],
/// where AVX-512 is in use and the head length suits `TINYBLAS`'s order (a multiple of 16
/// for tinyBLAS, of DOT_STEP for `ggml_vec_dot_f32`). Returns how many keys it did (from
/// the first; 0 otherwise).
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables, unused_mut))]
fn sixteen_key_dots<const TINYBLAS: bool, K: KeyElement>(
    q: &[f32],
    keys: &[K],
    out: &mut [f32],
) -> usize {
    let hd = q.len();
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if level() == SimdLevel::Avx512
        && hd > 0
        && hd.is_multiple_of(if TINYBLAS { LANES } else { DOT_STEP })
    {
        let n = out.len().min(keys.len() / hd);
        while done + LANES <= n {
            let group = keys[done * hd..(done + LANES) * hd].as_ptr().cast();
            // SAFETY: the level was chosen from the CPU's features (AVX-512 implies F16C
            // here); `group` holds sixteen keys of `hd` elements, a multiple of the step.
            let sums = unsafe {
                if K::F16 {
                    x86::dots16_avx512::<TINYBLAS, true>(q, group)
                } else {
                    x86::dots16_avx512::<TINYBLAS, false>(q, group)
                }
            };
            out[done..done + LANES].copy_from_slice(&sums);
            done += LANES;
        }
    }
    done
}

/// [`dot`] in plain Rust: the definition the vector versions are tested against.
pub fn dot_portable(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let whole = n - n % DOT_STEP;
    let mut acc = [[0f32; LANES]; 4];
    for (xs, ys) in x[..whole]
        .chunks_exact(DOT_STEP)
        .zip(y[..whole].chunks_exact(DOT_STEP))
    {
        for (c, a) in acc.iter_mut().enumerate() {
            for l in 0..LANES {
                a[l] = xs[c * LANES + l].mul_add(ys[c * LANES + l], a[l]);
            }
        }
    }
    let mut sum = [0f32; LANES];
    for l in 0..LANES {
        sum[l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    add_products_from(x, y, whole, reduce16(&sum))
}

/// `total` plus the products of `x` and `y` from element `from` on, one fused multiply-add
/// each: `ggml_vec_dot_f32`'s leftover elements.
fn add_products_from(x: &[f32], y: &[f32], from: usize, mut total: f32) -> f32 {
    for i in from..x.len().min(y.len()) {
        total = x[i].mul_add(y[i], total);
    }
    total
}

/// llamafile's tinyBLAS dot product of `x` and `y` (lengths a multiple of 16): one 16-lane
/// accumulator along the whole sum, then [`reduce16`]. llama.cpp's attention scores take
/// this order for a batch of tokens over an f16 cache (the query, converted to f16, is then
/// contiguous and tinyBLAS accepts the product).
#[inline(always)]
pub fn tinyblas_dot(x: &[f32], y: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    for (xs, ys) in x.chunks_exact(LANES).zip(y.chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] = xs[l].mul_add(ys[l], lanes[l]);
        }
    }
    reduce16(&lanes)
}

/// [`tinyblas_dot`] of `q` with each of the consecutive keys in `keys`, into `out`; with
/// AVX-512, sixteen keys at a time share one reduction as in [`dots`].
#[inline(always)]
pub fn tinyblas_dots(q: &[f32], keys: &[f32], out: &mut [f32]) {
    dots_with::<true>(q, keys, out, tinyblas_dot);
}

/// `dst[i] = src[i]` as f32 (exact): an f16 cache's entries, widened for the f32 code.
pub fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen_f16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the level was chosen from the CPU's features (AVX2's includes F16C).
        SimdLevel::Avx512 => return unsafe { x86::widen_f16_avx512(src, dst) },
        // SAFETY: as above.
        SimdLevel::Avx2 => return unsafe { x86::widen_f16_avx2(src, dst) },
        _ => {}
    }
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
}

/// Rounds every value to the nearest f16 (ties to even), kept as f32: what ggml's
/// `fp32_to_fp16` conversion (F16C's `vcvtps2ph` with round-to-nearest) leaves of it.
pub fn round_to_f16(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: the level was chosen from the CPU's features (AVX2's includes F16C).
        SimdLevel::Avx512 => return unsafe { x86::round_to_f16_avx512(values) },
        // SAFETY: as above.
        SimdLevel::Avx2 => return unsafe { x86::round_to_f16_avx2(values) },
        _ => {}
    }
    values
        .iter_mut()
        .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Widens whole vectors with `vcvtph2ps`, the tail one value at a time.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn widen_f16_avx512(src: &[half::f16], dst: &mut [f32]) {
        let whole = src.len() / 16 * 16;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for i in (0..whole).step_by(16) {
            _mm512_storeu_ps(
                d.add(i),
                _mm512_cvtph_ps(_mm256_loadu_si256(s.add(i).cast())),
            );
        }
        for i in whole..src.len() {
            dst[i] = src[i].to_f32();
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn widen_f16_avx2(src: &[half::f16], dst: &mut [f32]) {
        let whole = src.len() / 8 * 8;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for i in (0..whole).step_by(8) {
            _mm256_storeu_ps(d.add(i), _mm256_cvtph_ps(_mm_loadu_si128(s.add(i).cast())));
        }
        for i in whole..src.len() {
            dst[i] = src[i].to_f32();
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn round_to_f16_avx512(values: &mut [f32]) {
        const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let whole = values.len() / 16 * 16;
        let p = values.as_mut_ptr();
        for i in (0..whole).step_by(16) {
            let halves = _mm512_cvtps_ph::<NEAREST>(_mm512_loadu_ps(p.add(i)));
            _mm512_storeu_ps(p.add(i), _mm512_cvtph_ps(halves));
        }
        for v in &mut values[whole..] {
            *v = half::f16::from_f32(*v).to_f32();
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn round_to_f16_avx2(values: &mut [f32]) {
        let whole = values.len() / 8 * 8;
        let p = values.as_mut_ptr();
        for i in (0..whole).step_by(8) {
            let halves = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(p.add(i)));
            _mm256_storeu_ps(p.add(i), _mm256_cvtph_ps(halves));
        }
        for v in &mut values[whole..] {
            *v = half::f16::from_f32(*v).to_f32();
        }
    }

    use super::{add_products_from, DOT_STEP};

    /// `(g2 + g0) + (g3 + g1)` of the four lanes `g`, the end of [`super::reduce16`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn finish4(g: __m128) -> f32 {
        let t = _mm_add_ps(_mm_movehl_ps(g, g), g);
        _mm_cvtss_f32(_mm_add_ss(_mm_movehdup_ps(t), t))
    }

    /// `ggml_vec_dot_f32`'s four accumulators over the first `whole` elements (a multiple
    /// of DOT_STEP) of `x` and `y`, folded `(s0 + s2) + (s1 + s3)`: sixteen lanes left for
    /// `reduce16`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn folded_lanes<const F16: bool>(xp: *const f32, yp: *const u8, whole: usize) -> __m512 {
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i < whole {
            for (c, a) in acc.iter_mut().enumerate() {
                let at = i + 16 * c;
                *a = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(at)), load16::<F16>(yp, at), *a);
            }
            i += DOT_STEP;
        }
        _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]))
    }

    /// tinyBLAS's one accumulator over the first `n` elements (a multiple of 16).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn single_accumulator<const F16: bool>(
        xp: *const f32,
        yp: *const u8,
        n: usize,
    ) -> __m512 {
        let mut acc = _mm512_setzero_ps();
        for at in (0..n).step_by(16) {
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(at)), load16::<F16>(yp, at), acc);
        }
        acc
    }

    /// Elements `at..at + 16` of a row of f32 (`F16` false) or f16 values at `p`, as f32
    /// (an f16 widened exactly, in the register).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(crate) unsafe fn load16<const F16: bool>(p: *const u8, at: usize) -> __m512 {
        if F16 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * at).cast()))
        } else {
            _mm512_loadu_ps(p.cast::<f32>().add(at))
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn dot_avx512(x: &[f32], y: &[f32]) -> f32 {
        let n = x.len().min(y.len());
        let whole = n - n % DOT_STEP;
        let sum = folded_lanes::<false>(x.as_ptr(), y.as_ptr().cast(), whole);
        // The upper eight lanes (through the f64 view: AVX-512F, where the f32 extract
        // needs AVX-512DQ and would not inline here).
        let upper = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(sum)));
        let h = _mm256_add_ps(upper, _mm512_castps512_ps256(sum));
        let g = _mm_add_ps(_mm256_extractf128_ps::<1>(h), _mm256_castps256_ps128(h));
        add_products_from(x, y, whole, finish4(g))
    }

    /// [`dot_avx512`] of `q` with each of the sixteen keys in `keys` (`q.len()` elements each,
    /// a multiple of DOT_STEP): per key the same FMAs and `(s0 + s2) + (s1 + s3)`, then the
    /// sixteen `reduce16` trees side by side. `reduce16(v)` adds lanes `l` and `l + 8`, then
    /// `l` and `l + 4`, then `(g2 + g0) + (g3 + g1)`; here the first step puts two keys' eight
    /// sums in one register, the second four keys' four, the third adds `g2 + g0` and
    /// `g3 + g1` for four keys per instruction and the fourth their pairs, which leaves key
    /// `4i + q` in lane `4q + i`, put back in order by a permutation.
    ///
    /// `TINYBLAS`: each key's sixteen lanes are tinyBLAS's single accumulator instead (`hd` a
    /// multiple of 16), for [`super::tinyblas_dots`].
    ///
    /// `F16`: the keys are f16 values (`keys` points at `16 * hd` of them), widened in the
    /// registers; otherwise f32.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn dots16_avx512<const TINYBLAS: bool, const F16: bool>(
        q: &[f32],
        keys: *const u8,
    ) -> [f32; 16] {
        let hd = q.len();
        let step = if TINYBLAS { 16 } else { DOT_STEP };
        debug_assert!(hd.is_multiple_of(step));
        let qp = q.as_ptr();
        let element = if F16 { 2 } else { 4 };
        let sums: [__m512; 16] = std::array::from_fn(|p| {
            let key = keys.add(p * hd * element);
            if TINYBLAS {
                single_accumulator::<F16>(qp, key, hd)
            } else {
                folded_lanes::<F16>(qp, key, hd)
            }
        });
        // Keys 2i and 2i + 1: lanes l + 8 and l added, eight each.
        let halves: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (sums[2 * i], sums[2 * i + 1]);
            let low = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
            let high = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
            _mm512_add_ps(high, low)
        });
        // Keys 4i..4i + 4: lanes l + 4 and l added, four each (key 4i + q in quarter q).
        let quads: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (halves[2 * i], halves[2 * i + 1]);
            let low = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
            let high = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
            _mm512_add_ps(high, low)
        });
        // Per quarter q: [g2 + g0, g3 + g1] of keys 4i + q and 4(i + 1) + q side by side.
        let pair = |a: __m512, b: __m512| {
            let g01 = _mm512_shuffle_ps::<0b01_00_01_00>(a, b);
            let g23 = _mm512_shuffle_ps::<0b11_10_11_10>(a, b);
            _mm512_add_ps(g23, g01)
        };
        let (u01, u23) = (pair(quads[0], quads[1]), pair(quads[2], quads[3]));
        let even = _mm512_shuffle_ps::<0b10_00_10_00>(u01, u23);
        let odd = _mm512_shuffle_ps::<0b11_01_11_01>(u01, u23);
        // Lane 4q + i: key 4i + q.
        let totals = _mm512_add_ps(even, odd);
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let mut out = [0f32; 16];
        _mm512_storeu_ps(out.as_mut_ptr(), _mm512_permutexvar_ps(order, totals));
        out
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(x: &[f32], y: &[f32]) -> f32 {
        let n = x.len().min(y.len());
        let whole = n - n % DOT_STEP;
        let (xp, yp) = (x.as_ptr(), y.as_ptr());
        // Accumulator c of 16 lanes as two halves: lanes 0..8 and 8..16.
        let mut lo = [_mm256_setzero_ps(); 4];
        let mut hi = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < whole {
            for c in 0..4 {
                let at = i + 16 * c;
                lo[c] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(xp.add(at)),
                    _mm256_loadu_ps(yp.add(at)),
                    lo[c],
                );
                hi[c] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(xp.add(at + 8)),
                    _mm256_loadu_ps(yp.add(at + 8)),
                    hi[c],
                );
            }
            i += DOT_STEP;
        }
        let sum_lo = _mm256_add_ps(_mm256_add_ps(lo[0], lo[2]), _mm256_add_ps(lo[1], lo[3]));
        let sum_hi = _mm256_add_ps(_mm256_add_ps(hi[0], hi[2]), _mm256_add_ps(hi[1], hi[3]));
        let h = _mm256_add_ps(sum_hi, sum_lo);
        let g = _mm_add_ps(_mm256_extractf128_ps::<1>(h), _mm256_castps256_ps128(h));
        add_products_from(x, y, whole, finish4(g))
    }
}

const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // 0x1.715476p+0
const SHIFTER: f32 = f32::from_bits(0x4b40_0000); // 0x1.8p23: adding it rounds to an integer
const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0x1.62e4p-1
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e); // 0x1.7f7d1cp-20
const P0: f32 = f32::from_bits(0x3c07_2010);
const P1: f32 = f32::from_bits(0x3d2b_9f17);
const P2: f32 = f32::from_bits(0x3e2a_af33);
const P3: f32 = f32::from_bits(0x3eff_fedb);
const P4: f32 = f32::from_bits(0x3f7f_fff6);

/// `2^k` for `|k| <= 126`.
#[inline(always)]
fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

/// `ggml_v_expf`, one lane: `x = n ln 2 + b`, `exp(b)` by a polynomial, times `2^n`;
/// 0 below about -104 and infinity above about 88.7 (`|n| > 192`), NaN for NaN.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let n = x.mul_add(LOG2E, SHIFTER) - SHIFTER;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let u = b * b;
    let j = P0
        .mul_add(b, P1)
        .mul_add(u, P2.mul_add(b, P3))
        .mul_add(u, P4.mul_add(b, 1.0));
    // `vscalefps` multiplies by 2^n with one rounding; in two exact halves the first
    // product stays normal, so the second rounds exactly once too (subnormal results).
    let k = n as i32;
    let half = k >> 1;
    let scaled = j * pow2(half.clamp(-126, 126)) * pow2((k - half).clamp(-126, 126));
    if n.abs() > 192.0 {
        if n <= 0.0 {
            0.0
        } else {
            f32::INFINITY
        }
    } else {
        scaled
    }
}

/// `ggml_v_expf` of ggml's NEON build, one lane: the same reduction and polynomial as
/// [`expf`] but without its `+ 1`, which comes back as `k + k * j` with `k = 2^n` built
/// from the exponent bits; for `126 < |n| <= 192` the scale is split in two factors.
#[inline(always)]
pub fn expf_neon(x: f32) -> f32 {
    let z = x.mul_add(LOG2E, SHIFTER);
    let n = z - SHIFTER;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let e = z.to_bits() << 23;
    let u = b * b;
    let j = P0
        .mul_add(b, P1)
        .mul_add(u, P2.mul_add(b, P3))
        .mul_add(u, P4 * b);
    if n.abs() > 192.0 {
        let s1 =
            f32::from_bits(if n <= 0.0 { 0x8200_0000u32 } else { 0 }.wrapping_add(0x7f00_0000));
        s1 * s1
    } else if n.abs() > 126.0 {
        let d = if n <= 0.0 { 0x8200_0000u32 } else { 0 };
        let s1 = f32::from_bits(d.wrapping_add(0x7f00_0000));
        let s2 = f32::from_bits(e.wrapping_sub(d));
        j.mul_add(s2, s2) * s1
    } else {
        let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
        j.mul_add(k, k)
    }
}

/// `exp(x[i] - shift)` into `x`, and the softmax denominator ggml accumulates: the sum of
/// each block of 16 (`x` starts a block) by [`reduce16`], the block sums added in f64.
#[inline(always)]
pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f64 {
    if arm_arithmetic() {
        return exp_shifted_sum_neon(x, shift);
    }
    let mut total = 0f64;
    for block in x.chunks_mut(LANES) {
        let mut lanes = [0f32; LANES];
        for (lane, v) in lanes.iter_mut().zip(block.iter_mut()) {
            *v = expf(*v - shift);
            *lane = *v;
        }
        total += f64::from(reduce16(&lanes));
    }
    total
}

/// [`exp_shifted_sum`] of ggml's NEON build: blocks of 4 through [`expf_neon`], each
/// block's sum `(e0 + e1) + (e2 + e3)` added in f64; a last partial block through libm.
#[inline(always)]
fn exp_shifted_sum_neon(x: &mut [f32], shift: f32) -> f64 {
    let mut total = 0f64;
    let whole = x.len() - x.len() % 4;
    let (blocks, rest) = x.split_at_mut(whole);
    for block in blocks.chunks_exact_mut(4) {
        for v in block.iter_mut() {
            *v = expf_neon(*v - shift);
        }
        total += f64::from((block[0] + block[1]) + (block[2] + block[3]));
    }
    for v in rest {
        *v = (*v - shift).exp();
        total += f64::from(*v);
    }
    total
}

/// `gate[i] = silu(gate[i]) * up[i]` as `ggml_vec_swiglu_f32`.
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    dispatch!(swiglu_body(gate, up))
}

#[inline(always)]
fn swiglu_body(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    if arm_arithmetic() {
        // ggml's NEON build: blocks of 4 through its own vector `expf`.
        let whole = n - n % 4;
        for (g, &u) in gate[..whole].iter_mut().zip(&up[..whole]) {
            *g = *g / (1.0 + expf_neon(0.0 - *g)) * u;
        }
        for (g, &u) in gate[whole..n].iter_mut().zip(&up[whole..n]) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        return;
    }
    let whole = n - n % LANES;
    for (g, u) in gate[..whole]
        .chunks_exact_mut(LANES)
        .zip(up[..whole].chunks_exact(LANES))
    {
        for l in 0..LANES {
            g[l] = g[l] / (1.0 + expf(0.0 - g[l])) * u[l];
        }
    }
    for (g, &u) in gate[whole..n].iter_mut().zip(&up[whole..n]) {
        // `ggml_silu_f32`: libm's expf.
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ggml_v_expf` written with f64 for the exact steps (products of f32 fit in f64),
    /// as an independent check of the lane code.
    fn expf_reference(x: f32) -> f32 {
        let fma = |a: f32, b: f32, c: f32| -> f32 {
            // Exact product, one rounding of the sum to f64 then f32: exact for these
            // operands except in double-rounding ties, which the sample below avoids.
            (f64::from(a) * f64::from(b) + f64::from(c)) as f32
        };
        let n = fma(x, LOG2E, SHIFTER) - SHIFTER;
        let b = fma(-n, LN2_LO, fma(-n, LN2_HI, x));
        let u = b * b;
        let j = fma(fma(fma(P0, b, P1), u, fma(P2, b, P3)), u, fma(P4, b, 1.0));
        if n.abs() > 192.0 {
            return if n <= 0.0 { 0.0 } else { f32::INFINITY };
        }
        (f64::from(j) * 2f64.powi(n as i32)) as f32
    }

    #[test]
    fn f16_conversions_match_ieee_round_to_nearest_even_at_every_level() {
        // Ties both ways, subnormals, overflow to infinity, signed zeros, and an odd length
        // so that every vector path has a tail.
        let mut values: Vec<f32> = vec![
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            -(1.0 + 2f32.powi(-11)),
            65504.0,
            65519.0,
            65520.0,
            -1e9,
            3e-8,
            2.9802322e-8,
            6e-5,
            -0.0,
            0.0,
            f32::INFINITY,
        ];
        let mut state = 12345u32;
        values.extend((0..250).map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            f32::from_bits(state & 0xBFFF_FFFF) * 0.5
        }));
        let expected: Vec<f32> = values
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        let halves: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
        #[allow(clippy::type_complexity)]
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut levels: Vec<(
            &str,
            Box<dyn Fn(&mut [f32])>,
            Box<dyn Fn(&[half::f16], &mut [f32])>,
        )> = vec![(
            "dispatched",
            Box::new(|v: &mut [f32]| round_to_f16(v)),
            Box::new(|h: &[half::f16], d: &mut [f32]| widen_f16(h, d)),
        )];
        #[cfg(target_arch = "x86_64")]
        {
            if SimdLevel::Avx512.is_supported() {
                levels.push((
                    "avx512",
                    // SAFETY: supported, checked just above.
                    Box::new(|v: &mut [f32]| unsafe { x86::round_to_f16_avx512(v) }),
                    Box::new(|h: &[half::f16], d: &mut [f32]| unsafe {
                        x86::widen_f16_avx512(h, d)
                    }),
                ));
            }
            if SimdLevel::Avx2.is_supported() {
                levels.push((
                    "avx2",
                    // SAFETY: supported, checked just above.
                    Box::new(|v: &mut [f32]| unsafe { x86::round_to_f16_avx2(v) }),
                    Box::new(|h: &[half::f16], d: &mut [f32]| unsafe { x86::widen_f16_avx2(h, d) }),
                ));
            }
        }
        for (name, round, widen) in &levels {
            let mut rounded = values.clone();
            round(&mut rounded);
            let mut widened = vec![f32::NAN; halves.len()];
            widen(&halves, &mut widened);
            for (i, e) in expected.iter().enumerate() {
                assert_eq!(
                    rounded[i].to_bits(),
                    e.to_bits(),
                    "{name} round {}",
                    values[i]
                );
                assert_eq!(
                    widened[i].to_bits(),
                    e.to_bits(),
                    "{name} widen {}",
                    values[i]
                );
            }
        }
    }

    #[test]
    fn expf_is_ggml_v_expf() {
        let mut x = -110.0f32;
        while x < 90.0 {
            let (got, want) = (expf(x), expf_reference(x));
            assert_eq!(got.to_bits(), want.to_bits(), "x = {x}");
            let exact = f64::from(x).exp();
            if exact > 1e-37 && exact < 1e38 {
                assert!((f64::from(got) - exact).abs() <= 2.0 * exact * 2f64.powi(-23));
            }
            x += 0.0137;
        }
        assert_eq!(expf(-1000.0), 0.0);
        assert_eq!(expf(1000.0), f32::INFINITY);
        assert!(expf(f32::NAN).is_nan());
        assert_eq!(expf(0.0), 1.0);
    }

    #[test]
    fn reduce16_halves_the_lanes() {
        // Values whose sum depends on the order: only the halving tree gives `want`.
        let mut v = [0f32; 16];
        v[0] = 1.0;
        v[8] = 1e8;
        v[4] = -1e8;
        v[12] = 3.0;
        let want = ((1e8f32 + 1.0) + (3.0f32 + -1e8)) + 0.0;
        assert_eq!(reduce16(&v), want);
    }

    /// Pseudo-random values with magnitudes spread over many binades, so any other
    /// summation order shows.
    fn value(i: usize) -> f32 {
        let m = ((i * 2_654_435_761) % 1_000_003) as f32 / 1_000_003.0 - 0.5;
        m * 2f32.powi((i % 23) as i32 - 11)
    }

    #[test]
    fn dots_give_the_bits_of_one_dot_per_key() {
        for hd in [64, 128, 256, 80, 40] {
            let q: Vec<f32> = (0..hd).map(|i| value(i + 7)).collect();
            for n_keys in [0, 1, 15, 16, 17, 33, 48] {
                let keys: Vec<f32> = (0..n_keys * hd).map(|i| value(3 * i + 1)).collect();
                let mut got = vec![f32::NAN; n_keys];
                dots(&q, &keys, &mut got);
                for (p, g) in got.iter().enumerate() {
                    let want = dot(&q, &keys[p * hd..(p + 1) * hd]);
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "head of {hd}, key {p} of {n_keys}"
                    );
                    let portable = dot_portable(&q, &keys[p * hd..(p + 1) * hd]);
                    assert_eq!(g.to_bits(), portable.to_bits(), "portable, key {p}");
                }
            }
        }
    }

    #[test]
    fn tinyblas_dots_give_one_accumulator_then_reduce16_per_key() {
        for hd in [16, 64, 80, 256] {
            let q: Vec<f32> = (0..hd).map(|i| value(i + 7)).collect();
            for n_keys in [0, 1, 15, 16, 17, 33] {
                let keys: Vec<f32> = (0..n_keys * hd).map(|i| value(3 * i + 1)).collect();
                let mut got = vec![f32::NAN; n_keys];
                tinyblas_dots(&q, &keys, &mut got);
                for (p, g) in got.iter().enumerate() {
                    // tinyBLAS: lane l accumulates elements l, l + 16, ... by fused
                    // multiply-adds in order, then `_mm512_reduce_add_ps`.
                    let key = &keys[p * hd..(p + 1) * hd];
                    let mut lanes = [0f32; LANES];
                    for (i, (&a, &b)) in q.iter().zip(key).enumerate() {
                        lanes[i % LANES] = a.mul_add(b, lanes[i % LANES]);
                    }
                    let want = reduce16(&lanes);
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "head of {hd}, key {p} of {n_keys}"
                    );
                }
            }
        }
    }

    #[test]
    fn f16_key_dots_equal_the_dots_of_the_widened_keys() {
        for hd in [16, 64, 80, 128, 256] {
            let q: Vec<f32> = (0..hd).map(|i| value(i + 7)).collect();
            for n_keys in [0, 1, 15, 16, 17, 33, 48] {
                let keys: Vec<half::f16> = (0..n_keys * hd)
                    .map(|i| half::f16::from_f32(value(3 * i + 1)))
                    .collect();
                let widened: Vec<f32> = keys.iter().map(|k| k.to_f32()).collect();
                for tinyblas in [false, true] {
                    let mut want = vec![f32::NAN; n_keys];
                    if tinyblas {
                        tinyblas_dots(&q, &widened, &mut want);
                    } else {
                        dots(&q, &widened, &mut want);
                    }
                    let mut got = vec![f32::NAN; n_keys];
                    let done = f16_key_dots(&q, &keys, tinyblas, &mut got);
                    let step = if tinyblas { LANES } else { DOT_STEP };
                    if level() == SimdLevel::Avx512 && hd.is_multiple_of(step) {
                        assert_eq!(done, n_keys / LANES * LANES, "head of {hd}");
                    }
                    assert!(done <= n_keys && done.is_multiple_of(LANES));
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got[..done]),
                        bits(&want[..done]),
                        "head of {hd}, {n_keys} keys, tinyblas {tinyblas}"
                    );
                }
            }
        }
    }

    #[test]
    fn dot_follows_ggml_vec_dot_f32_and_every_build_agrees() {
        let x: Vec<f32> = (0..150)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let y: Vec<f32> = (0..150)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 3.0)
            .collect();
        // By hand: accumulators c = 0..4 of lanes l over the two whole steps.
        let mut acc = [[0f32; 16]; 4];
        for i in 0..128 {
            let (c, l) = ((i % 64) / 16, i % 16);
            acc[c][l] = x[i].mul_add(y[i], acc[c][l]);
        }
        let lanes: [f32; 16] =
            std::array::from_fn(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]));
        let mut want = reduce16(&lanes);
        for i in 128..150 {
            want = x[i].mul_add(y[i], want);
        }
        assert_eq!(dot_portable(&x, &y).to_bits(), want.to_bits());
        assert_eq!(dot(&x, &y).to_bits(), want.to_bits());
        #[cfg(target_arch = "x86_64")]
        for level in [SimdLevel::Avx2, SimdLevel::Avx512] {
            if crate::quant::kernels_for(level).is_none() {
                continue;
            }
            // SAFETY: this CPU runs the level's kernels.
            let got = unsafe {
                match level {
                    SimdLevel::Avx2 => x86::dot_avx2(&x, &y),
                    _ => x86::dot_avx512(&x, &y),
                }
            };
            assert_eq!(got.to_bits(), want.to_bits(), "{level:?}");
        }
    }

    #[test]
    fn swiglu_uses_the_vector_exp_on_whole_blocks() {
        let gate: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.7).collect();
        let up: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 0.1).collect();
        let mut got = gate.clone();
        swiglu_in_place(&mut got, &up);
        // Blocks of 16 through `expf` (ggml's AVX-512 build), or of 4 through `expf_neon`
        // (its NEON build, at the Arm levels); libm on the rest.
        let (block, vector_exp): (usize, fn(f32) -> f32) = if arm_arithmetic() {
            (4, expf_neon)
        } else {
            (LANES, expf)
        };
        let whole = 37 - 37 % block;
        for i in 0..37 {
            let g = gate[i];
            let e = if i < whole {
                vector_exp(0.0 - g)
            } else {
                (-g).exp()
            };
            assert_eq!(
                got[i].to_bits(),
                (g / (1.0 + e) * up[i]).to_bits(),
                "i = {i}"
            );
        }
    }
}
