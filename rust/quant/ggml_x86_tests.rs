//! The 32-element formats against a plain scalar transcription of what llama.cpp's x86
//! build (ggml's AVX2 code in `ggml-cpu/arch/x86/quants.c`, also used by its AVX-512
//! builds) computes: activation quantisation by `quantize_row_q8_0` / `quantize_row_q8_1`
//! and the dot products `ggml_vec_dot_{q4_0,q5_0,q8_0}_q8_0` and
//! `ggml_vec_dot_{q4_1,q5_1}_q8_1`. Every SIMD level must give exactly these bits; the
//! scalar level's quantisers too (its dot products keep ggml's generic order and are only
//! checked within a rounding bound, in `kernel_tests`).
//!
//! The transcription is written from the C, element by element, and shares no code with
//! the kernels: weights are decoded to signed integers here, and the f32 operations are
//! spelled out one by one (`mul_add` is the FMA).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use half::f16;

use super::tests::{sanitise_floats, Rng};
use super::*;

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// ggml's AVX2 `quantize_row_q8_0` (`with_sum = false`) or `quantize_row_q8_1`, one block
/// of 32 at a time: `amax = max |x|`, `d = amax / 127`, `id = 127 / amax` (0 if amax is 0),
/// `q = _mm256_round_ps(x * id, _MM_ROUND_NEAREST)` (halves to even) packed with signed
/// saturation, `d` stored as fp16 and, for Q8_1, `s = fp16(d * (float) sum(q))`.
pub(super) fn ggml_x86_quantize(x: &[f32], with_sum: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for block in x.chunks_exact(32) {
        let mut amax = 0f32;
        for v in block {
            if v.abs() > amax {
                amax = v.abs();
            }
        }
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let q: Vec<i32> = block
            .iter()
            .map(|v| ((v * id).round_ties_even() as i32).clamp(-128, 127))
            .collect();
        out.extend(f16::from_f32(d).to_le_bytes());
        if with_sum {
            let sum: i32 = q.iter().sum();
            out.extend(f16::from_f32(d * sum as f32).to_le_bytes());
        }
        out.extend(q.iter().map(|&q| q as i8 as u8));
    }
    out
}

/// One weight block as ggml's AVX2 kernels see it: 32 signed values (offset removed: Q4_0
/// and Q5_0 values are `u - 8` and `u - 16`), the scale `d` and the minimum `m` (0 if none).
/// Element j < 16 is the low nibble of `qs[j]`, element 16 + j its high nibble; 5-bit
/// formats add bit j of `qh` as bit 4 of element j.
fn weight_block(ty: GgmlType, block: &[u8]) -> ([i32; 32], f32, f32) {
    let mut v = [0i32; 32];
    let (d, m) = match ty {
        GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::Q5_0 => (f16_at(block, 0), 0.0),
        _ => (f16_at(block, 0), f16_at(block, 2)),
    };
    match ty {
        GgmlType::Q8_0 => {
            for j in 0..32 {
                v[j] = i32::from(block[2 + j] as i8);
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (qs, offset) = if ty == GgmlType::Q4_0 { (2, 8) } else { (4, 0) };
            for j in 0..16 {
                v[j] = i32::from(block[qs + j] & 15) - offset;
                v[16 + j] = i32::from(block[qs + j] >> 4) - offset;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (qh, offset) = if ty == GgmlType::Q5_0 {
                (2, 16)
            } else {
                (4, 0)
            };
            let qs = qh + 4;
            let bits = u32::from_le_bytes([block[qh], block[qh + 1], block[qh + 2], block[qh + 3]]);
            let bit = |j: usize| ((bits >> j) & 1) as i32 * 16;
            for j in 0..16 {
                v[j] = (i32::from(block[qs + j] & 15) | bit(j)) - offset;
                v[16 + j] = (i32::from(block[qs + j] >> 4) | bit(16 + j)) - offset;
            }
        }
        _ => unreachable!("not a 32-element weight format: {ty}"),
    }
    (v, d, m)
}

/// ggml's AVX2 `ggml_vec_dot_<ty>_q8_<0|1>` over the whole blocks of `row` and `act`:
/// per block, eight i32 lanes `lane_i = sum_{k<4} w[4i+k] * y[4i+k]`, then
/// `acc_i = fma(d * dy, (float) lane_i, acc_i)`; `summs += m * s` (Q4_1, Q5_1); the result
/// is `hsum_float_8(acc) + summs` with `hsum_float_8` adding `h_l = acc_{l+4} + acc_l` as
/// `(h0 + h2) + (h1 + h3)`.
pub(super) fn ggml_x86_dot(ty: GgmlType, row: &[u8], act: &[u8]) -> f32 {
    let has_min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
    let (act_size, act_qs) = if has_min { (36, 4) } else { (34, 2) };
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (block, y) in row
        .chunks_exact(ty.type_size())
        .zip(act.chunks_exact(act_size))
    {
        let (w, dx, m) = weight_block(ty, block);
        let dy = f16_at(y, 0);
        let q = |j: usize| i32::from(y[act_qs + j] as i8);
        let dd = dx * dy;
        for (i, acc) in acc.iter_mut().enumerate() {
            let lane: i32 = (4 * i..4 * i + 4).map(|j| w[j] * q(j)).sum();
            *acc = dd.mul_add(lane as f32, *acc);
        }
        if has_min {
            summs += m * f16_at(y, 2);
        }
    }
    let h: Vec<f32> = (0..4).map(|l| acc[l + 4] + acc[l]).collect();
    let total = (h[0] + h[2]) + (h[1] + h[3]);
    if has_min {
        total + summs
    } else {
        total
    }
}

const FORMATS: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];

fn levels() -> Vec<&'static Kernels> {
    SimdLevel::ALL
        .iter()
        .filter_map(|&l| kernels_for(l))
        .collect()
}

/// Rows of random bytes with ordinary block scales; Q8_0 quants kept within ±127, as
/// ggml's quantisers write them (the kernels' `vpmaddubsw` sign trick, ggml's included,
/// needs that).
fn random_row(ty: GgmlType, blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let mut row: Vec<u8> = (0..blocks * ty.type_size())
        .map(|_| rng.next_u64() as u8)
        .collect();
    sanitise_floats(ty, &mut row, rng);
    if ty == GgmlType::Q8_0 {
        for block in row.chunks_exact_mut(34) {
            for q in &mut block[2..] {
                if *q == 0x80 {
                    *q = 0x81;
                }
            }
        }
    }
    row
}

/// Activation rows that stress the quantiser: random magnitudes, all-zero blocks, exact
/// ties (a block with amax 127 has `id = 1`), scales where `127 / amax` and `1 / d`
/// differ, and largest magnitudes of either sign.
fn activation_rows(rng: &mut Rng, n: usize) -> Vec<Vec<f32>> {
    let mut rows: Vec<Vec<f32>> = (0..4).map(|_| rng.activations(n)).collect();
    let mut special = rng.activations(n);
    for (b, block) in special.chunks_mut(32).enumerate() {
        match b % 4 {
            0 => block.fill(0.0),
            1 => {
                for (j, v) in block.iter_mut().enumerate() {
                    // Halves from -126.5 to 126.5.
                    *v = (j as f32 * 9.0) % 254.0 - 127.0 + 0.5;
                }
                block[7] = -127.0;
            }
            2 => {
                // amax 1.0625: 1 / d and 127 / amax differ in the last bit.
                block[0] = 1.0625;
                block[1] = f32::from_bits(0x3cef_dfbf);
                block[2] = -f32::from_bits(0x3cef_dfbf);
            }
            _ => block[31] = -1e4,
        }
    }
    rows.push(special);
    rows
}

#[test]
fn quantisers_give_the_bits_of_ggml_x86() {
    let mut rng = Rng(101);
    for x in activation_rows(&mut rng, 32 * 24) {
        for (weight, with_sum) in [(GgmlType::Q4_0, false), (GgmlType::Q4_1, true)] {
            let want = ggml_x86_quantize(&x, with_sum);
            for kernels in levels() {
                let mut acts = QuantizedActivations::new();
                acts.quantize_with(kernels, weight, &x)
                    .expect("whole blocks");
                let got = acts.bytes();
                assert_eq!(got.len(), want.len());
                if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
                    panic!(
                        "{} {}: byte {i} is {:#04x}, ggml's x86 quantiser writes {:#04x}",
                        kernels.level().name(),
                        acts.format(),
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }
}

#[test]
fn simd_dots_give_the_bits_of_ggml_x86() {
    let mut rng = Rng(103);
    for kernels in levels()
        .into_iter()
        .filter(|k| k.level() != SimdLevel::Scalar)
    {
        for ty in FORMATS {
            let with_sum = activation_type(ty) == GgmlType::Q8_1;
            for blocks in [1, 2, 3, 7, 18, 64] {
                let n = 32 * blocks;
                let rows: Vec<Vec<u8>> = (0..4).map(|_| random_row(ty, blocks, &mut rng)).collect();
                let rows = [&rows[0][..], &rows[1], &rows[2], &rows[3]];
                let xs = activation_rows(&mut rng, n);
                let acts: Vec<QuantizedActivations> = xs
                    .iter()
                    .map(|x| {
                        let mut act = QuantizedActivations::new();
                        act.quantize_with(kernels, ty, x).expect("whole blocks");
                        act
                    })
                    .collect();
                let mut tokens = vec![[0f32; 4]; acts.len()];
                kernels.dot_tokens(ty)(rows, &acts, &mut tokens);
                for (t, (x, act)) in xs.iter().zip(&acts).enumerate() {
                    let y = ggml_x86_quantize(x, with_sum);
                    let want = rows.map(|row| ggml_x86_dot(ty, row, &y).to_bits());
                    let label =
                        format!("{} {ty} {blocks} blocks, token {t}", kernels.level().name());
                    let one = rows.map(|row| kernels.dot(ty)(row, act.bytes(), n).to_bits());
                    assert_eq!(one, want, "{label}: single-row kernel");
                    let four = kernels.dot4(ty)(rows, act.bytes(), n).map(f32::to_bits);
                    assert_eq!(four, want, "{label}: four-row kernel");
                    assert_eq!(
                        tokens[t].map(f32::to_bits),
                        want,
                        "{label}: rows-by-tokens kernel"
                    );
                }
            }
        }
    }
}

/// The transcription's decoding of weight blocks agrees with `dequantize` (which is checked
/// against gguf's numpy dequantisers): `d * value + m` is every dequantised element.
#[test]
fn transcription_decodes_weights_as_dequantize() {
    let mut rng = Rng(107);
    for ty in FORMATS {
        let row = random_row(ty, 8, &mut rng);
        let mut want = vec![0f32; 8 * 32];
        dequantize(ty, &row, &mut want).expect("whole blocks");
        for (b, block) in row.chunks_exact(ty.type_size()).enumerate() {
            let (v, d, m) = weight_block(ty, block);
            for j in 0..32 {
                let got = if m != 0.0 {
                    d * v[j] as f32 + m
                } else {
                    d * v[j] as f32
                };
                assert_eq!(
                    got.to_bits(),
                    want[32 * b + j].to_bits(),
                    "{ty} block {b} element {j}"
                );
            }
        }
    }
}
