//! The 32-element formats, Q4_K and Q6_K against a plain scalar transcription of what
//! llama.cpp's x86 build (ggml's AVX2 code in `ggml-cpu/arch/x86/quants.c` and
//! `arch/x86/repack.cpp`, also used by its AVX-512 builds) computes: activation
//! quantisation by `quantize_row_q8_0` / `quantize_row_q8_1`, the dot products
//! `ggml_vec_dot_{q4_0,q5_0,q8_0}_q8_0`, `ggml_vec_dot_{q4_1,q5_1}_q8_1` and
//! `ggml_vec_dot_q6_K_q8_K`, and the repacked Q4_K products `ggml_gemv_q4_K_8x8_q8_K` /
//! `ggml_gemm_q4_K_8x8_q8_K`; and F16 by `ggml_vec_dot_f16` (AVX-512 build) for one token
//! and llamafile's tinyBLAS for a batch. Every SIMD level must give exactly these bits; the scalar
//! level's quantisers too (its dot products keep ggml's generic order and are only checked
//! within a rounding bound, in `kernel_tests`).
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
    ggml_quantize_q8(
        x,
        with_sum,
        |amax| {
            if amax != 0.0 {
                127.0 / amax
            } else {
                0.0
            }
        },
    )
}

/// ggml's Q8_0/Q8_1 activation quantisers, which differ only in the multiplier `id` they
/// derive from a block's `amax`: `d = amax / 127`, `q = x * id` rounded to nearest (halves
/// to even) and saturated to `int8_t`, `d` stored as fp16 and, for Q8_1,
/// `s = fp16(d * (float) sum(q))`.
pub(super) fn ggml_quantize_q8(x: &[f32], with_sum: bool, id_of: impl Fn(f32) -> f32) -> Vec<u8> {
    let mut out = Vec::new();
    for block in x.chunks_exact(32) {
        let mut amax = 0f32;
        for v in block {
            if v.abs() > amax {
                amax = v.abs();
            }
        }
        let d = amax / 127.0;
        let id = id_of(amax);
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

/// The levels this CPU runs that are meant to have these bits: scalar and the x86 ones
/// (the Arm levels have llama.cpp's Arm bits, see `ggml_arm_tests`).
fn levels() -> Vec<&'static Kernels> {
    SimdLevel::ALL
        .iter()
        .filter(|l| l.runs_on(SimdLevel::Avx512))
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

// ---- K-quants --------------------------------------------------------------------------
//
// Q6_K: llama.cpp's x86 build runs `ggml_vec_dot_q6_K_q8_K` (its AVX2 branch, the first in
// `arch/x86/quants.c`, also in AVX-512 builds; x86 has no Q6_K repacking). Q4_K: matrices
// whose row count is a multiple of 8 are repacked on AVX2 machines (`q4_K_8x8_q8_K`) and
// multiplied by `ggml_gemv_q4_K_8x8_q8_K` (one activation row) or `ggml_gemm_q4_K_8x8_q8_K`
// (whole groups of four activation rows) in `arch/x86/repack.cpp`; the two differ in where
// the integer sums become floats.

const Q8K_SIZE: usize = 292;

/// The f32 scale, the 256 quants and the sixteen 16-element sums of a Q8_K block.
fn q8k_block(y: &[u8]) -> (f32, Vec<i32>, Vec<i32>) {
    let d = f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
    let q = y[4..260].iter().map(|&b| i32::from(b as i8)).collect();
    let bsums = (0..16)
        .map(|k| i32::from(i16::from_le_bytes([y[260 + 2 * k], y[261 + 2 * k]])))
        .collect();
    (d, q, bsums)
}

/// `hsum_float_8`: `h_l = x[l + 4] + x[l]`, then `(h0 + h2) + (h1 + h3)`.
fn hsum_float_8(x: [f32; 8]) -> f32 {
    let h: Vec<f32> = (0..4).map(|l| x[l + 4] + x[l]).collect();
    (h[0] + h[2]) + (h[1] + h[3])
}

/// ggml's AVX2 `ggml_vec_dot_q6_K_q8_K`. Per super-block, `d = y.d * fp16(x.d)`; each of
/// the eight 32-element chunks (`j` = 0, 1 halves of `ql`/`qh`, four vectors `q4_0..q4_3`
/// each) meets its 32 quants in `maddubs` (unsigned 6-bit values 0..63 times q8, adjacent
/// pairs in i16) and `madd` with its two 16-element scales, giving eight i32 lanes, lane
/// `l` holding chunk bytes `4l..4l+4`; the chunks are added lane by lane, and
/// `q8sclsub` (lane `l`: `32 * (bsums[2l] * scales[2l] + bsums[2l+1] * scales[2l+1])`) is
/// subtracted. Then `acc_l = fma(d, lane_l, acc_l)`, and the result is `hsum_float_8(acc)`.
pub(super) fn ggml_x86_q6_k_dot(row: &[u8], act: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in row.chunks_exact(210).zip(act.chunks_exact(Q8K_SIZE)) {
        let (dy, q8, bsums) = q8k_block(y);
        let d = dy * f16_at(x, 208);
        let (ql, qh) = (&x[..128], &x[128..192]);
        let scales: Vec<i32> = x[192..208].iter().map(|&s| i32::from(s as i8)).collect();
        let mut lanes = [0i32; 8];
        for j in 0..2 {
            let bits1 = &ql[64 * j..64 * j + 32];
            let bits2 = &ql[64 * j + 32..64 * j + 64];
            let bits_h = &qh[32 * j..32 * j + 32];
            for p in 0..32 {
                let u = [
                    (bits1[p] & 15) | ((bits_h[p] & 3) << 4),
                    (bits2[p] & 15) | ((bits_h[p] & 12) << 2),
                    (bits1[p] >> 4) | (bits_h[p] & 48),
                    (bits2[p] >> 4) | ((bits_h[p] & 192) >> 2),
                ];
                for (k, &u) in u.iter().enumerate() {
                    // `get_scale_shuffle(is + k)`, is = 4j: scale 2(4j + k) for bytes 0..16.
                    let scale = scales[2 * (4 * j + k) + p / 16];
                    lanes[p / 4] += scale * i32::from(u) * q8[128 * j + 32 * k + p];
                }
            }
        }
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane -= 32 * (bsums[2 * l] * scales[2 * l] + bsums[2 * l + 1] * scales[2 * l + 1]);
        }
        for (acc, &lane) in acc.iter_mut().zip(&lanes) {
            *acc = d.mul_add(lane as f32, *acc);
        }
    }
    hsum_float_8(acc)
}

/// A Q4_K block's eight scales and eight minimums, unpacked as ggml's x86 kernels do
/// (`utmp` and the masks `kmask1..3`): scales in the bytes of `utmp[0..2]`, minimums in
/// those of `utmp[2..4]`.
fn q4_k_scales_mins(x: &[u8]) -> ([i32; 8], [i32; 8]) {
    let word =
        |i: usize| u32::from_le_bytes([x[4 + 4 * i], x[5 + 4 * i], x[6 + 4 * i], x[7 + 4 * i]]);
    let (kmask1, kmask2, kmask3) = (0x3f3f_3f3fu32, 0x0f0f_0f0fu32, 0x0303_0303u32);
    let mut utmp = [word(0), word(1), word(2), 0];
    utmp[3] = ((utmp[2] >> 4) & kmask2) | (((utmp[1] >> 6) & kmask3) << 4);
    let uaux = utmp[1] & kmask1;
    utmp[1] = (utmp[2] & kmask2) | (((utmp[0] >> 6) & kmask3) << 4);
    utmp[2] = uaux;
    utmp[0] &= kmask1;
    let bytes: Vec<i32> = utmp
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .map(i32::from)
        .collect();
    let mut scales = [0; 8];
    let mut mins = [0; 8];
    scales.copy_from_slice(&bytes[..8]);
    mins.copy_from_slice(&bytes[8..]);
    (scales, mins)
}

/// A Q4_K super-block against a Q8_K one, per sub-block `k` (32 elements): the integer
/// `scale_k * sum(q4 * q8)` and `min_k * (bsums[2k] + bsums[2k+1])`. Sub-block `2j` is the
/// low nibbles of `qs[32j..32j+32]`, `2j + 1` their high nibbles.
fn q4_k_sub_block_sums(x: &[u8], y: &[u8]) -> ([i32; 8], [i32; 8]) {
    let (_, q8, bsums) = q8k_block(y);
    let (scales, mins) = q4_k_scales_mins(x);
    let qs = &x[16..144];
    let mut s = [0i32; 8];
    let mut m = [0i32; 8];
    for k in 0..8 {
        let (j, shift) = (k / 2, 4 * (k % 2));
        let dot: i32 = (0..32)
            .map(|l| i32::from((qs[32 * j + l] >> shift) & 15) * q8[32 * k + l])
            .sum();
        s[k] = scales[k] * dot;
        m[k] = mins[k] * (bsums[2 * k] + bsums[2 * k + 1]);
    }
    (s, m)
}

/// llama.cpp's repacked Q4_K product for one (weight row, activation row) pair, as
/// `ggml_gemv_q4_K_8x8_q8_K` (`gemm = false`) or `ggml_gemm_q4_K_8x8_q8_K` (`gemm = true`,
/// both its AVX-512 and its AVX2 code) compute it. The gemv adds a super-block's eight
/// sub-block sums in integers, `acc = fma(S, d * dy, acc)` and `acc_min = fma(M, dmin * dy,
/// acc_min)` once per super-block; the gemm does the same once per pair of sub-blocks (four
/// times per super-block, pairs in order). The result is `acc - acc_min`. The integer sums
/// are exact in both (their i16 partial sums hold at most sixteen products of 15 and 128).
pub(super) fn ggml_x86_q4_k_dot(row: &[u8], act: &[u8], gemm: bool) -> f32 {
    let mut acc = 0f32;
    let mut acc_min = 0f32;
    for (x, y) in row.chunks_exact(144).zip(act.chunks_exact(Q8K_SIZE)) {
        let (dy, _, _) = q8k_block(y);
        let dd = f16_at(x, 0) * dy;
        let dmin = f16_at(x, 2) * dy;
        let (s, m) = q4_k_sub_block_sums(x, y);
        let steps: Vec<(i32, i32)> = if gemm {
            (0..4)
                .map(|p| (s[2 * p] + s[2 * p + 1], m[2 * p] + m[2 * p + 1]))
                .collect()
        } else {
            vec![(s.iter().sum(), m.iter().sum())]
        };
        for (s, m) in steps {
            acc = (s as f32).mul_add(dd, acc);
            acc_min = (m as f32).mul_add(dmin, acc_min);
        }
    }
    acc - acc_min
}

/// K-quant rows of random bytes; block scales from `scale`.
fn random_k_row(ty: GgmlType, blocks: usize, rng: &mut Rng, large: bool) -> Vec<u8> {
    let mut row: Vec<u8> = (0..blocks * ty.type_size())
        .map(|_| rng.next_u64() as u8)
        .collect();
    sanitise_floats(ty, &mut row, rng);
    if large {
        // Scales up to the f16 maximum: products of the size where f32 rounding is coarse
        // (and, with large activations, overflow to infinity as in ggml).
        let at: &[usize] = if ty == GgmlType::Q6K { &[208] } else { &[0, 2] };
        for block in row.chunks_exact_mut(ty.type_size()) {
            for &a in at {
                let v = 1000.0 + 64000.0 * (rng.next_u64() % 1024) as f32 / 1024.0;
                let v = if rng.next_u64() & 1 == 0 { v } else { -v };
                block[a..a + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
    }
    row
}

/// llama.cpp's tiled Q6_K kernel (`ggml-cpu/tiled`, for batches of 8 tokens or more), its
/// `tiled_run_microtile` for one (weight row, activation row) pair: per super-block and
/// 16-element sub-block `s`, `corr = Σ u q8 - 32 bsums[s]` (u the unsigned 6-bit values),
/// `S = Σ_s scale_s corr` (exact), then `r = (float) S * d_x` and `acc = fma(r, d_y, acc)`
/// (the AVX2 kernel's `_mm256_fmadd_ps`; its AVX-512 VNNI twin writes `acc + r * d_y`, which
/// GCC contracts into the same FMA), super-block after super-block from `acc = 0`.
pub(super) fn ggml_x86_q6_k_tiled_dot(row: &[u8], act: &[u8]) -> f32 {
    let mut acc = 0f32;
    for (x, y) in row.chunks_exact(210).zip(act.chunks_exact(Q8K_SIZE)) {
        let (dy, q8, bsums) = q8k_block(y);
        let dx = f16_at(x, 208);
        let mut total = 0i32;
        for s in 0..16 {
            let raw: i32 = (16 * s..16 * s + 16)
                .map(|e| {
                    // Element e: half h, quarter c (32 elements each), position l.
                    let (h, c, l) = (e / 128, (e % 128) / 32, e % 32);
                    let ql = x[64 * h + 32 * (c % 2) + l];
                    let low = if c < 2 { ql & 15 } else { ql >> 4 };
                    let high = (x[128 + 32 * h + l] >> (2 * c)) & 3;
                    i32::from(low | (high << 4)) * q8[e]
                })
                .sum();
            total += i32::from(x[192 + s] as i8) * (raw - 32 * bsums[s]);
        }
        let r = total as f32 * dx;
        acc = r.mul_add(dy, acc);
    }
    acc
}

/// What llama.cpp computes for token `index` of a batch of `batch` tokens.
fn ggml_x86_k_dot(ty: GgmlType, row: &[u8], act: &[u8], index: usize, batch: usize) -> f32 {
    match ty {
        GgmlType::Q6K if batch >= 8 => ggml_x86_q6_k_tiled_dot(row, act),
        GgmlType::Q6K => ggml_x86_q6_k_dot(row, act),
        GgmlType::Q4K => ggml_x86_q4_k_dot(row, act, index < batch - batch % 4),
        _ => unreachable!("no transcription for {ty}"),
    }
}

/// Every SIMD level's Q4_K and Q6_K kernels (single-row, four-row, rows-by-tokens) give
/// the bits of the transcriptions above: Q6_K those of `ggml_vec_dot_q6_K_q8_K`, Q4_K those
/// of `ggml_gemv_q4_K_8x8_q8_K` (what llama.cpp computes for one token).
#[test]
fn k_quant_simd_dots_give_the_bits_of_ggml_x86() {
    let mut rng = Rng(109);
    for kernels in levels()
        .into_iter()
        .filter(|k| k.level() != SimdLevel::Scalar)
    {
        for ty in [GgmlType::Q4K, GgmlType::Q6K] {
            for (blocks, large) in [
                (1, false),
                (2, false),
                (3, true),
                (5, false),
                (8, true),
                (12, false),
            ] {
                let n = 256 * blocks;
                let rows: Vec<Vec<u8>> = (0..4)
                    .map(|_| random_k_row(ty, blocks, &mut rng, large))
                    .collect();
                let rows = [&rows[0][..], &rows[1], &rows[2], &rows[3]];
                let mut xs = activation_rows(&mut rng, n);
                let mut loud = rng.activations(n);
                loud.iter_mut().for_each(|v| *v *= 1e3);
                xs.push(loud);
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
                for (t, act) in acts.iter().enumerate() {
                    let want = rows.map(|row| ggml_x86_k_dot(ty, row, act.bytes(), 0, 1).to_bits());
                    let label = format!(
                        "{} {ty} {blocks} blocks{}, token {t}",
                        kernels.level().name(),
                        if large { " (large scales)" } else { "" }
                    );
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

/// The transcriptions decode weights as `dequantize` does: Q6_K's `d * (u - 32)` and Q4_K's
/// `d * scale * q - dmin * min`, element by element, give the dequantised row.
#[test]
fn k_quant_transcriptions_decode_weights_as_dequantize() {
    let mut rng = Rng(113);
    for ty in [GgmlType::Q4K, GgmlType::Q6K] {
        let row = random_k_row(ty, 2, &mut rng, false);
        let mut want = vec![0f32; 512];
        dequantize(ty, &row, &mut want).expect("whole blocks");
        for (b, x) in row.chunks_exact(ty.type_size()).enumerate() {
            for e in (0..256).step_by(7).chain([255]) {
                // An activation block that picks out element e: quant 1 there, scale 1.
                let mut y = vec![0u8; Q8K_SIZE];
                y[..4].copy_from_slice(&1f32.to_le_bytes());
                y[4 + e] = 1;
                y[260 + 2 * (e / 16)] = 1;
                let got = if ty == GgmlType::Q6K {
                    // lane sums of (u - 32) * scale, times d: exactly scale * (u - 32) * d.
                    ggml_x86_q6_k_dot(x, &y)
                } else {
                    let (s, m) = q4_k_sub_block_sums(x, &y);
                    let (s, m): (i32, i32) = (s.iter().sum(), m.iter().sum());
                    f16_at(x, 0) * s as f32 - f16_at(x, 2) * m as f32
                };
                // Both sides' products are exact (an f16 times integers of at most 13 bits),
                // rounded at most once by the same subtraction; zeros may differ in sign.
                let expect = want[256 * b + e];
                assert!(
                    got == expect,
                    "{ty} block {b} element {e}: {got} != {expect}"
                );
            }
        }
    }
}

/// `dot_batch` gives the bits of llama.cpp's x86 build for every token of a batch: Q4_K
/// its gemm for the first `batch - batch % 4` tokens and its gemv for the rest, Q6_K its
/// tiled kernel for batches of 8 or more and `ggml_vec_dot_q6_K_q8_K` otherwise; for the
/// whole batch in one call and in slices at any token.
#[test]
fn k_quant_batch_kernels_give_the_bits_of_ggml_x86() {
    let mut rng = Rng(127);
    for kernels in levels()
        .into_iter()
        .filter(|k| k.level() != SimdLevel::Scalar)
    {
        for ty in [GgmlType::Q4K, GgmlType::Q6K] {
            for (blocks, large) in [(1, false), (3, true), (8, false)] {
                let n = 256 * blocks;
                let rows: Vec<Vec<u8>> = (0..4)
                    .map(|_| random_k_row(ty, blocks, &mut rng, large))
                    .collect();
                let rows = [&rows[0][..], &rows[1], &rows[2], &rows[3]];
                for batch in (1..=13).chain([16, 19]) {
                    let acts: Vec<QuantizedActivations> = (0..batch)
                        .map(|_| {
                            let mut act = QuantizedActivations::new();
                            act.quantize_with(kernels, ty, &rng.activations(n))
                                .expect("whole blocks");
                            act
                        })
                        .collect();
                    let want: Vec<[u32; 4]> = acts
                        .iter()
                        .enumerate()
                        .map(|(i, act)| {
                            rows.map(|row| ggml_x86_k_dot(ty, row, act.bytes(), i, batch).to_bits())
                        })
                        .collect();
                    // The whole batch, then in slices of 5 and of 3 tokens.
                    for slice in [batch, 5, 3] {
                        let mut out = vec![[f32::NAN; 4]; batch];
                        for first in (0..batch).step_by(slice) {
                            let end = (first + slice).min(batch);
                            kernels.dot_batch(ty)(
                                rows,
                                &acts[first..end],
                                first,
                                batch,
                                &mut out[first..end],
                            );
                        }
                        for (i, (got, want)) in out.iter().zip(&want).enumerate() {
                            assert_eq!(
                                got.map(f32::to_bits),
                                *want,
                                "{} {ty} {blocks} blocks, token {i} of {batch}, slices of {slice}",
                                kernels.level().name()
                            );
                        }
                    }
                }
            }
        }
    }
}

/// `_mm512_reduce_add_ps` as GCC expands it: lanes `l + 8` and `l`, then `l + 4` and `l`,
/// then `(g0 + g2) + (g1 + g3)`.
fn reduce_add_16(v: [f32; 16]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|l| v[l + 8] + v[l]);
    let g: [f32; 4] = std::array::from_fn(|l| h[l + 4] + h[l]);
    (g[0] + g[2]) + (g[1] + g[3])
}

/// The f16 values of a little-endian F16 row.
fn f16_values(bytes: &[u8]) -> Vec<f32> {
    (0..bytes.len() / 2).map(|i| f16_at(bytes, 2 * i)).collect()
}

/// `ggml_vec_dot_f16` of the AVX-512 build (`GGML_F16_STEP` 64, `GGML_F16_EPR` 16): four
/// accumulators of sixteen lanes, `GGML_F16_VEC_REDUCE` (`x0 + x2`, `x1 + x3`, their sum,
/// `_mm512_reduce_add_ps`) into a `ggml_float`, the leftovers added in double.
fn ggml_vec_dot_f16(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len();
    let whole = n - n % 64;
    let mut sum = [[0f32; 16]; 4];
    for i in (0..whole).step_by(64) {
        for (j, acc) in sum.iter_mut().enumerate() {
            for (l, a) in acc.iter_mut().enumerate() {
                let k = i + 16 * j + l;
                *a = x[k].mul_add(y[k], *a);
            }
        }
    }
    let folded: [f32; 16] =
        std::array::from_fn(|l| (sum[0][l] + sum[2][l]) + (sum[1][l] + sum[3][l]));
    let mut total = f64::from(reduce_add_16(folded));
    for k in whole..n {
        total += f64::from(x[k] * y[k]);
    }
    total as f32
}

/// llamafile's `tinyBLAS<16, __m512, __m512, ggml_fp16_t, ggml_fp16_t, float>` for one
/// (row, column): `Cv = madd(A, B, Cv)` per sixteen elements, then `hsum`
/// (`_mm512_reduce_add_ps`).
fn tiny_blas_f16(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for i in (0..x.len()).step_by(16) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = x[i + l].mul_add(y[i + l], *a);
        }
    }
    reduce_add_16(acc)
}

#[test]
fn f16_simd_dots_give_the_bits_of_ggml_x86() {
    let mut rng = Rng(131);
    for kernels in levels()
        .into_iter()
        .filter(|k| k.level() != SimdLevel::Scalar)
    {
        let ty = GgmlType::F16;
        // Multiples of 64, of 16 only, and neither (the vec_dot's leftovers; no tinyBLAS).
        for n in [64, 576, 80, 1536, 70] {
            let rows: Vec<Vec<u8>> = (0..4)
                .map(|_| {
                    let mut row: Vec<u8> = (0..2 * n).map(|_| rng.next_u64() as u8).collect();
                    sanitise_floats(ty, &mut row, &mut rng);
                    row
                })
                .collect();
            let rows = [&rows[0][..], &rows[1], &rows[2], &rows[3]];
            let values = rows.map(f16_values);
            for batch in [1, 2, 3, 5, 9] {
                let acts: Vec<QuantizedActivations> = (0..batch)
                    .map(|_| {
                        let mut act = QuantizedActivations::new();
                        act.quantize_with(kernels, ty, &rng.activations(n))
                            .expect("f16 activations");
                        act
                    })
                    .collect();
                let label = format!("{} F16 of {n}, batch of {batch}", kernels.level().name());
                let mut out = vec![[f32::NAN; 4]; batch];
                kernels.dot_batch(ty)(rows, &acts, 0, batch, &mut out);
                let mut tokens = vec![[f32::NAN; 4]; batch];
                kernels.dot_tokens(ty)(rows, &acts, &mut tokens);
                for (t, act) in acts.iter().enumerate() {
                    let y = f16_values(act.bytes());
                    let single = values.clone().map(|x| ggml_vec_dot_f16(&x, &y).to_bits());
                    let batched = if batch >= 2 && n % 16 == 0 {
                        values.clone().map(|x| tiny_blas_f16(&x, &y).to_bits())
                    } else {
                        single
                    };
                    assert_eq!(out[t].map(f32::to_bits), batched, "{label}: token {t}");
                    assert_eq!(
                        tokens[t].map(f32::to_bits),
                        single,
                        "{label}: rows by tokens"
                    );
                    let one = rows.map(|row| kernels.dot(ty)(row, act.bytes(), n).to_bits());
                    assert_eq!(one, single, "{label}: single row");
                    let four = kernels.dot4(ty)(rows, act.bytes(), n).map(f32::to_bits);
                    assert_eq!(four, single, "{label}: four rows");
                }
            }
        }
    }
}
