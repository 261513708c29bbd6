//! The small element-wise and per-row operations of a transformer block, each with the
//! rounding of ggml's CPU implementation (squares summed in f64 by the norms, the fused
//! multiply-adds GCC makes of RoPE, ggml's vector `expf` in the softmax; see `ggml_f32`).
//! Scalar and plain: they are a small share of the time next to the matrix products.

use std::sync::OnceLock;

use crate::kernels::ggml_f32::{self, dispatch, exp_shifted_sum};

/// `out = x / rms(x) * weight`, with rms computed in f64 like ggml's rms_norm so long rows
/// do not lose precision in the sum of squares.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), weight.len());
    debug_assert_eq!(x.len(), out.len());
    // ggml squares in f32 and sums the squares in f64.
    let sum_sq: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum_sq / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// In-place RMS normalisation of one row without a weight (used before Gemma's
/// `1 + weight` convention is folded in, and by the Q/K norms).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    // ggml squares in f32 and sums the squares in f64.
    let sum_sq: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum_sq / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = *v * scale * w;
    }
}

/// Rows whose sums of squares [`rms_norm_rows`] runs side by side. Each row's f64 sum is a
/// chain of dependent additions (ggml's order, which the bits depend on), so a row alone
/// waits on the adder's latency at every element; eight independent chains keep it busy.
pub const NORM_ROWS: usize = 8;

/// The factor [`rms_norm`] scales each of `rows` by: `1 / sqrt(mean(x^2) + eps)`, with the
/// squares summed in f64 in element order, the rows' chains interleaved.
#[inline(always)]
fn rms_scales<const R: usize>(rows: [&[f32]; R], eps: f32) -> [f32; R] {
    let n = rows[0].len();
    let rows = rows.map(|row| &row[..n]);
    let mut sums = [0f64; R];
    for i in 0..n {
        for (sum, row) in sums.iter_mut().zip(&rows) {
            *sum += f64::from(row[i] * row[i]);
        }
    }
    sums.map(|sum| {
        let mean = (sum / n as f64) as f32;
        1.0 / (mean + eps).sqrt()
    })
}

/// [`rms_norm`] of every `weight.len()`-long row of `x` into the same row of `out`: the
/// same bits, eight rows at a time.
pub fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    debug_assert_eq!(x.len(), out.len());
    let (mut xs, mut outs) = (
        x.chunks_exact(d * NORM_ROWS),
        out.chunks_exact_mut(d * NORM_ROWS),
    );
    for (x8, out8) in xs.by_ref().zip(outs.by_ref()) {
        let scales = rms_scales::<NORM_ROWS>(std::array::from_fn(|r| &x8[r * d..(r + 1) * d]), eps);
        for ((x, o), scale) in x8.chunks_exact(d).zip(out8.chunks_exact_mut(d)).zip(scales) {
            for ((o, &v), &w) in o.iter_mut().zip(x).zip(weight) {
                *o = v * scale * w;
            }
        }
    }
    for (x, o) in xs
        .remainder()
        .chunks_exact(d)
        .zip(outs.into_remainder().chunks_exact_mut(d))
    {
        rms_norm(x, weight, eps, o);
    }
}

/// [`rms_norm_in_place`] of every `weight.len()`-long row of `x`, eight rows at a time.
pub fn rms_norm_in_place_rows(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    let mut groups = x.chunks_exact_mut(d * NORM_ROWS);
    for x8 in groups.by_ref() {
        let scales = rms_scales::<NORM_ROWS>(std::array::from_fn(|r| &x8[r * d..(r + 1) * d]), eps);
        for (x, scale) in x8.chunks_exact_mut(d).zip(scales) {
            for (v, &w) in x.iter_mut().zip(weight) {
                *v = *v * scale * w;
            }
        }
    }
    for x in groups.into_remainder().chunks_exact_mut(d) {
        rms_norm_in_place(x, weight, eps);
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
        let angle = freq_scale * (theta / factor);
        cos[i] = angle.cos();
        sin[i] = angle.sin();
        theta *= theta_scale;
    }
}

/// `(a cos - b sin, a sin + b cos)` as ggml's `rotate_pairs` is compiled (GCC contracts
/// `x0*cos - x1*sin` into one fused multiply-add of the first product).
#[inline(always)]
fn rotate(a: f32, b: f32, c: f32, s: f32) -> (f32, f32) {
    (a.mul_add(c, -(b * s)), a.mul_add(s, b * c))
}

/// [`rotate`] as GCC vectorises the adjacent-pairs `rotate_pairs` for AArch64, four pairs
/// at a time: `fmls` fuses the second product of `x0*cos - x1*sin`. (The NeoX loop keeps
/// the scalar contraction there, as measured against llama.cpp's armv8-a build on Gemma 3.)
#[inline(always)]
fn rotate_arm_vector(a: f32, b: f32, c: f32, s: f32) -> (f32, f32) {
    ((-b).mul_add(s, a * c), a.mul_add(s, b * c))
}

/// RoPE on adjacent pairs (x[2i], x[2i+1]): llama.cpp's "normal" mode, used by the
/// `llama` architecture whose Q/K weights were permuted at conversion time.
pub fn rope_adjacent_pairs(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    // Compiled with FMA where the CPU has it (`f32::mul_add` is otherwise a libm call).
    dispatch!(rope_adjacent_pairs_body(head, cos, sin))
}

#[inline(always)]
fn rope_adjacent_pairs_body(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    // ggml's Arm build takes whole groups of four pairs through its vector loop and the
    // rest through the scalar one; x86 takes every pair the scalar way.
    let vector_pairs = if ggml_f32::arm_arithmetic() {
        cos.len() - cos.len() % 4
    } else {
        0
    };
    for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
        let (a, b) = (head[2 * i], head[2 * i + 1]);
        (head[2 * i], head[2 * i + 1]) = if i < vector_pairs {
            rotate_arm_vector(a, b, c, s)
        } else {
            rotate(a, b, c, s)
        };
    }
}

/// RoPE on split halves (x[i], x[i + n_rot/2]): llama.cpp's "NeoX" mode, used by
/// qwen2, gemma3 and grok.
pub fn rope_split_halves(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    dispatch!(rope_split_halves_body(head, cos, sin))
}

#[inline(always)]
fn rope_split_halves_body(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
        let (a, b) = (head[i], head[i + half]);
        (head[i], head[i + half]) = rotate(a, b, c, s);
    }
}

/// Softmax in place, as ggml's `soft_max` computes it (`ggml_f32::exp_shifted_sum`).
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total = dispatch!(exp_shifted_sum(x, max));
    let inv = (1.0 / total) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `gate[i] = gelu_tanh(gate[i]) * up[i]` (GeGLU).
pub fn geglu_tanh_in_place(gate: &mut [f32], up: &[f32]) {
    dispatch!(geglu_tanh_body(gate, up))
}

#[inline(always)]
fn geglu_tanh_body(gate: &mut [f32], up: &[f32]) {
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
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF: f32 = 0.044_715;
    // `1 + COEF*x*x` as GCC compiles ggml's `ggml_gelu_f32`: one fused multiply-add.
    let inner = (COEF * x).mul_add(x, 1.0);
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * inner).tanh())
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
    fn norms_of_many_rows_equal_the_one_row_norms_bit_for_bit() {
        // Rows of lengths that do and do not fill whole groups, with values spanning many
        // magnitudes so the f64 sums' order matters.
        for (d, n_rows) in [(64, 1), (576, 8), (576, 13), (256, 27), (7, 17)] {
            let x: Vec<f32> = (0..d * n_rows)
                .map(|i| {
                    let v = ((i * 2_654_435_761) % 10_007) as f32 / 97.0 - 51.0;
                    v * 10f32.powi((i % 9) as i32 - 4)
                })
                .collect();
            let weight: Vec<f32> = (0..d).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
            let mut expected = vec![0f32; x.len()];
            for (row, out) in x.chunks_exact(d).zip(expected.chunks_exact_mut(d)) {
                rms_norm(row, &weight, 1e-6, out);
            }
            let mut rows = vec![0f32; x.len()];
            rms_norm_rows(&x, &weight, 1e-6, &mut rows);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&rows), bits(&expected), "d {d}, {n_rows} rows");
            let mut in_place = x.clone();
            rms_norm_in_place_rows(&mut in_place, &weight, 1e-6);
            let mut expected_in_place = x.clone();
            for row in expected_in_place.chunks_exact_mut(d) {
                rms_norm_in_place(row, &weight, 1e-6);
            }
            assert_eq!(bits(&in_place), bits(&expected_in_place), "in place, d {d}");
        }
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
