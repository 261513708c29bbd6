//! The small element-wise and per-row operations of a transformer block.
//! Scalar and plain where they are a small share of the time next to the matrix products;
//! the exponentials of attention and of the SwiGLU gate (a few percent of a forward pass
//! with libm's `expf`) have an AVX2 version, chosen at run time, tested against `f32::exp`.

use std::sync::OnceLock;

/// `out = x / rms(x) * weight`, with rms computed in f64 like ggml's rms_norm so long rows
/// do not lose precision in the sum of squares.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), weight.len());
    debug_assert_eq!(x.len(), out.len());
    let sum_sq: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let mean = (sum_sq / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// In-place RMS normalisation of one row without a weight (used before Gemma's
/// `1 + weight` convention is folded in, and by the Q/K norms).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let sum_sq: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let mean = (sum_sq / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = *v * scale * w;
    }
}

/// Rotary position embedding tables for one position: cos/sin per rotated pair.
/// `freq_factors` (llama3-style `rope_freqs.weight`) divide the base frequency per pair.
pub fn rope_angles(
    pos: usize,
    n_rot: usize,
    base: f32,
    freq_scale: f32,
    freq_factors: Option<&[f32]>,
    cos: &mut [f32],
    sin: &mut [f32],
) {
    let half = n_rot / 2;
    // theta_i = p * base^(-2i/n_rot), built by repeated multiplication in f32 as ggml does,
    // so angles (and therefore logits) match llama.cpp's bit for bit where possible.
    let theta_scale = base.powf(-2.0 / n_rot as f32);
    let mut theta = pos as f32;
    for i in 0..half {
        let factor = freq_factors.map_or(1.0, |f| f[i]);
        let angle = freq_scale * theta / factor;
        cos[i] = angle.cos();
        sin[i] = angle.sin();
        theta *= theta_scale;
    }
}

/// RoPE on adjacent pairs (x[2i], x[2i+1]): llama.cpp's "normal" mode, used by the
/// `llama` architecture whose Q/K weights were permuted at conversion time.
pub fn rope_adjacent_pairs(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
        let (a, b) = (head[2 * i], head[2 * i + 1]);
        head[2 * i] = a * c - b * s;
        head[2 * i + 1] = a * s + b * c;
    }
}

/// RoPE on split halves (x[i], x[i + n_rot/2]): llama.cpp's "NeoX" mode, used by
/// qwen2, gemma3 and grok.
pub fn rope_split_halves(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
        let (a, b) = (head[i], head[i + half]);
        head[i] = a * c - b * s;
        head[i + half] = a * s + b * c;
    }
}

/// Numerically stable softmax in place.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    exp_shifted_in_place(x, max);
    let sum: f64 = x.iter().map(|&v| f64::from(v)).sum();
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Whether the AVX2+FMA versions may run: the quantized kernels' choice for this process
/// (so `SAMPLER_SDK_SIMD=scalar` forces `f32::exp` here too).
fn use_avx2() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| crate::quant::kernels().level() >= crate::quant::SimdLevel::Avx2)
}

/// `x[i] = exp(x[i] - shift)`. The AVX2 version is within 2 ulp of `f32::exp` and flushes
/// results below `f32::MIN_POSITIVE` to zero.
pub fn exp_shifted_in_place(x: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked by `use_avx2`).
        unsafe { avx2::exp_shifted_in_place(x, shift) };
        return;
    }
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `gate[i] = silu(gate[i]) * up[i]`: SwiGLU on a slice, vectorised where the CPU allows.
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: as in `exp_shifted_in_place`.
        unsafe { avx2::swiglu_in_place(gate, up) };
        return;
    }
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `gate[i] = gelu_tanh(gate[i]) * up[i]` (GeGLU).
pub fn geglu_tanh_in_place(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh(*g) * u;
    }
}

/// `gate[i] = gelu_tanh_f16_rounded(gate[i]) * up[i]` (GeGLU as ggml's CPU backend).
pub fn geglu_tanh_f16_rounded_in_place(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh_f16_rounded(*g) * u;
    }
}

/// GELU with the tanh approximation, as ggml_gelu and Gemma/Grok use.
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF: f32 = 0.044_715;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF * x * x)).tanh())
}

/// GELU as ggml evaluates it on the CPU: the input rounded to f16 and looked up in a
/// table of f16 results, saturating beyond ±10. Matching this keeps gemma's logits within
/// llama.cpp's own noise; the full-precision `gelu_tanh` differs by up to 1e-3 per value.
pub fn gelu_tanh_f16_rounded(x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        // The result depends only on the f16 input, so it is tabulated once (as ggml's
        // `ggml_table_gelu_f16`): a `tanh` per element was 5 % of a Gemma decode step.
        let table = GELU_F16_TABLE.get_or_init(gelu_f16_table);
        let bits = half::f16::from_f32(x).to_bits();
        half::f16::from_bits(table[usize::from(bits)]).to_f32()
    }
}

static GELU_F16_TABLE: OnceLock<Box<[u16]>> = OnceLock::new();

/// f16 bits of `gelu_tanh` of every f16 value, rounded to f16.
fn gelu_f16_table() -> Box<[u16]> {
    (0..=u16::MAX)
        .map(|bits| {
            let x = half::f16::from_bits(bits).to_f32();
            half::f16::from_f32(gelu_tanh(x)).to_bits()
        })
        .collect()
}

pub fn add_in_place(acc: &mut [f32], x: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `exp(x)` on eight lanes, Cephes' `expf` scheme: `x = n ln 2 + r` with `|r| <= ln 2 / 2`,
    /// a degree-6 polynomial for `exp(r)`, and `2^n` built in the exponent bits. Inputs below
    /// `ln(f32::MIN_POSITIVE)` give 0, above `ln(f32::MAX)` give `f32::MAX`-ish (clamped).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp8(x: __m256) -> __m256 {
        const LOW: f32 = -87.336_54; // ln(f32::MIN_POSITIVE)
        const HIGH: f32 = 88.376_26;
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LOW));
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LOW)), _mm256_set1_ps(HIGH));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // r = x - n ln 2, with ln 2 split in two so n * hi is exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        // n in [-126, 128): 2^n as exponent bits; n = 128 only at HIGH, split as 2 * 2^127.
        let n_int = _mm256_cvtps_epi32(n);
        let n_low = _mm256_min_epi32(n_int, _mm256_set1_epi32(127));
        let extra = _mm256_sub_epi32(n_int, n_low);
        let pow_low = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            n_low,
            _mm256_set1_epi32(127),
        )));
        let pow_extra = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            extra,
            _mm256_set1_epi32(127),
        )));
        let result = _mm256_mul_ps(_mm256_mul_ps(y, pow_low), pow_extra);
        _mm256_andnot_ps(underflow, result)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_shifted_in_place(x: &mut [f32], shift: f32) {
        let s = _mm256_set1_ps(shift);
        let mut chunks = x.chunks_exact_mut(8);
        for c in chunks.by_ref() {
            // SAFETY: `c` holds exactly eight floats.
            unsafe {
                let v = _mm256_loadu_ps(c.as_ptr());
                _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_sub_ps(v, s)));
            }
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut buf = [0f32; 8];
            buf[..rest.len()].copy_from_slice(rest);
            // SAFETY: `buf` holds eight floats.
            unsafe {
                let v = _mm256_loadu_ps(buf.as_ptr());
                _mm256_storeu_ps(buf.as_mut_ptr(), exp8(_mm256_sub_ps(v, s)));
            }
            rest.copy_from_slice(&buf[..rest.len()]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n <= both lengths.
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
                _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(silu, u));
            }
            i += 8;
        }
        for (g, &u) in gate[i..n].iter_mut().zip(&up[i..n]) {
            *g = super::silu(*g) * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_weight_has_unit_rms() {
        let x = [1.0f32, -2.0, 3.0, 4.0];
        let mut out = [0.0; 4];
        rms_norm(&x, &[1.0; 4], 0.0, &mut out);
        let rms = (out.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut x = [1.0f32, 2.0, 3.0, 50.0];
        softmax_in_place(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[3] > x[2] && x[2] > x[1] && x[1] > 0.0);
        // A large score does not overflow; the others underflow to zero.
        let mut x = [1.0f32, 1000.0];
        softmax_in_place(&mut x);
        assert_eq!(x, [0.0, 1.0]);
    }

    #[test]
    fn rope_at_position_zero_is_identity() {
        let mut cos = [0.0; 4];
        let mut sin = [0.0; 4];
        rope_angles(0, 8, 10000.0, 1.0, None, &mut cos, &mut sin);
        let mut head = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let orig = head;
        rope_adjacent_pairs(&mut head, &cos, &sin);
        assert_eq!(head, orig);
        rope_split_halves(&mut head, &cos, &sin);
        assert_eq!(head, orig);
    }

    #[test]
    fn rope_rotation_preserves_pair_norms() {
        let mut cos = [0.0; 2];
        let mut sin = [0.0; 2];
        rope_angles(7, 4, 10000.0, 1.0, None, &mut cos, &mut sin);
        let mut head = [3.0f32, 4.0, 1.0, 0.0];
        rope_adjacent_pairs(&mut head, &cos, &sin);
        assert!(((head[0] * head[0] + head[1] * head[1]).sqrt() - 5.0).abs() < 1e-5);
        assert!(((head[2] * head[2] + head[3] * head[3]).sqrt() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn fast_exp_is_within_two_ulp_of_libm() {
        let mut worst = 0u32;
        let mut x: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.0437).collect();
        x.extend([
            0.0, -0.0, 1e-30, -1e-30, -87.0, -87.3, 88.0, 88.37, 0.5, -0.5,
        ]);
        let mut fast = x.clone();
        exp_shifted_in_place(&mut fast, 0.0);
        for (&v, &f) in x.iter().zip(&fast) {
            let exact = v.exp();
            if exact < f32::MIN_POSITIVE {
                assert!(
                    f == 0.0 || (f - exact).abs() <= f32::MIN_POSITIVE,
                    "{v}: {f}"
                );
                continue;
            }
            worst = worst.max(f.to_bits().abs_diff(exact.to_bits()));
        }
        assert!(worst <= 2, "{worst} ulp");
        let mut tiny = [-200.0f32, -100.0, f32::NEG_INFINITY];
        exp_shifted_in_place(&mut tiny, 0.0);
        assert_eq!(tiny, [0.0, 0.0, 0.0]);
        let mut shifted = [3.0f32];
        exp_shifted_in_place(&mut shifted, 3.0);
        assert_eq!(shifted, [1.0]);
    }

    #[test]
    fn swiglu_matches_the_scalar_definition() {
        let gate: Vec<f32> = (-300..300).map(|i| i as f32 * 0.05).collect();
        let up: Vec<f32> = (0..600).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut fast = gate.clone();
        swiglu_in_place(&mut fast, &up);
        for ((&g, &u), &f) in gate.iter().zip(&up).zip(&fast) {
            let exact = silu(g) * u;
            assert!(
                (f - exact).abs() <= 4.0 * f32::EPSILON * exact.abs().max(1e-6),
                "{g}"
            );
        }
    }

    #[test]
    fn tabulated_gelu_equals_the_direct_formula() {
        for i in -12_000..12_000 {
            let x = i as f32 * 0.001;
            let direct = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x
            } else {
                let rounded = half::f16::from_f32(x).to_f32();
                half::f16::from_f32(gelu_tanh(rounded)).to_f32()
            };
            assert_eq!(gelu_tanh_f16_rounded(x).to_bits(), direct.to_bits(), "{x}");
        }
    }
}
