//! The Arm levels against what llama.cpp's Arm builds compute:
//! `tests/golden/ggml_arm_kernels.txt`, printed by ggml-cpu cross-built with GCC for
//! `armv8.2-a+dotprod` and `armv8-a` and run under qemu-user
//! (`tests/scripts/arm_kernels/make_golden.sh`). Every `dot` line must come out with the
//! dotprod build's bits at the `dotprod` level and the armv8-a build's at `neon`, and every
//! activation block as ggml's NEON quantiser wrote it. The exception is `dotprod`,
//! whose build repacks Q4_0, Q8_0, Q4_K, Q5_K and Q6_K matrices: there the reference is a
//! transcription of its gemv.
//!
//! The quantiser has a portable transcription here ([`ggml_arm_quantize`]), checked against
//! the file on every architecture, so the file and its reading are tested on x86 CI too;
//! the kernels themselves only run on AArch64 (`cargo test --target
//! aarch64-unknown-linux-gnu` under qemu; the README has the command).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use super::*;

/// One line of the golden file.
#[derive(Debug)]
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
pub(super) enum Case {
    Quantize {
        format: GgmlType,
        x: Vec<f32>,
        bytes: Vec<u8>,
    },
    Dot {
        ty: GgmlType,
        n: usize,
        row: Vec<u8>,
        act: Vec<u8>,
        /// Result bits of the armv8.2-a+dotprod build, then of the armv8-a build.
        dotprod: u32,
        neon: u32,
    },
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

fn type_named(name: &str) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|ty| ty.name().eq_ignore_ascii_case(name))
        .unwrap_or_else(|| panic!("unknown type {name}"))
}

fn bits(text: &str) -> u32 {
    u32::from_le_bytes(unhex(text).try_into().expect("four bytes"))
}

pub(super) fn golden_cases() -> Vec<Case> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/ggml_arm_kernels.txt"
    );
    let text = std::fs::read_to_string(path).expect("golden file");
    let mut cases = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split(' ').collect();
        let n: usize = fields[2].parse().expect("count");
        match fields[0] {
            "quantize" => {
                let x: Vec<f32> = unhex(fields[3])
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                assert_eq!(x.len(), n, "{line:.40}");
                cases.push(Case::Quantize {
                    format: type_named(fields[1]),
                    x,
                    bytes: unhex(fields[4]),
                });
            }
            "dot" => cases.push(Case::Dot {
                ty: type_named(fields[1]),
                n,
                row: unhex(fields[3]),
                act: unhex(fields[4]),
                dotprod: bits(fields[5]),
                neon: bits(fields[6]),
            }),
            other => panic!("unknown record {other}"),
        }
    }
    cases
}

/// ggml's NEON `quantize_row_q8_0` (`with_sum = false`) or `quantize_row_q8_1`, one block of
/// 32 at a time: `amax = max |x|`, `d = amax / 127`, `id = 1 / d` (0 if `d` is 0) — where
/// the x86 build takes `127 / amax` —, `q = vcvtnq_s32_f32(x * id)` (nearest, halves to
/// even) stored as `int8_t` (never outside ±127 here), `d` as fp16 and, for Q8_1,
/// `s = fp16(d * (float) sum(q))`.
pub(super) fn ggml_arm_quantize(x: &[f32], with_sum: bool) -> Vec<u8> {
    super::ggml_x86_tests::ggml_quantize_q8(x, with_sum, |amax| {
        let d = amax / 127.0;
        if d != 0.0 {
            1.0 / d
        } else {
            0.0
        }
    })
}

/// One row of ggml's `ggml_gemv_q8_0_4x4_q8_0` or `ggml_gemv_q4_0_4x4_q8_0` (dotprod
/// build) on a repacked matrix: per block the exact sum of products, then
/// `acc = fma(sum, d_act * d_weight, acc)` (`vfmaq_f32(acc, vcvtq_f32_s32(ret),
/// vmulq_f32(ad, bd))`; Q4_0's `vcvtq_n_f32_s32(ret, 4)` undoes its nibbles' `<< 4` exactly).
#[cfg(target_arch = "aarch64")]
fn ggml_arm_gemv_32(ty: GgmlType, row: &[u8], act: &[u8], n: usize) -> f32 {
    let size = ty.type_size();
    let mut acc = 0f32;
    for (x, y) in row
        .chunks_exact(size)
        .zip(act.chunks_exact(34))
        .take(n / 32)
    {
        let weight = |j: usize| -> i32 {
            if ty == GgmlType::Q4_0 {
                let byte = x[2 + j % 16];
                i32::from(if j < 16 { byte & 15 } else { byte >> 4 }) - 8
            } else {
                i32::from(x[2 + j] as i8)
            }
        };
        let sum: i32 = (0..32).map(|j| weight(j) * i32::from(y[2 + j] as i8)).sum();
        acc = (sum as f32).mul_add(f16_at(y, 0) * f16_at(x, 0), acc);
    }
    acc
}

/// Q8_K activation block `b`: its scale, quants and sums of 16.
#[cfg(target_arch = "aarch64")]
fn q8k_block(act: &[u8], b: usize) -> (f32, &[u8], Vec<i32>) {
    let block = &act[b * 292..(b + 1) * 292];
    let d = f32::from_le_bytes(block[..4].try_into().unwrap());
    let bsums = (0..16)
        .map(|g| i32::from(i16::from_le_bytes([block[260 + 2 * g], block[261 + 2 * g]])))
        .collect();
    (d, &block[4..260], bsums)
}

#[cfg(target_arch = "aarch64")]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// One row of ggml's `ggml_gemv_q4_K_8x4_q8_K` or `ggml_gemv_q5_K_8x4_q8_K` (dotprod
/// build), from its C: per 64 elements `acc = fma(d * d_act, sc_lo * sum_lo + sc_hi *
/// sum_hi, acc)` (`vfmaq_f32`), then per super-block `acc = acc - bias * (dmin * d_act)`
/// unfused (`vmlsq_f32`), `bias` the sum of each 32-group's minimum times its two Q8_K sums
/// of 16.
#[cfg(target_arch = "aarch64")]
fn ggml_arm_gemv_k4(ty: GgmlType, row: &[u8], act: &[u8], n: usize) -> f32 {
    let size = ty.type_size();
    let mut acc = 0f32;
    for b in 0..n / 256 {
        let x = &row[b * size..(b + 1) * size];
        let (dy, q8, bsums) = q8k_block(act, b);
        let (scales, mins) = super::blocks::k4_scales_mins(x[4..16].try_into().unwrap());
        // Q5_K: 32 bytes of fifth bits (bit `i / 32` of byte `i % 32`) before the nibbles.
        let (qh, qs) = if ty == GgmlType::Q5K {
            (Some(&x[16..48]), &x[48..])
        } else {
            (None, &x[16..])
        };
        let value = |i: usize| {
            let byte = qs[32 * (i / 64) + i % 32];
            let low = i32::from(if i % 64 < 32 { byte & 15 } else { byte >> 4 });
            low + qh.map_or(0, |h| i32::from((h[i % 32] >> (i / 32)) & 1) << 4)
        };
        let group = |j: usize| -> i32 {
            (32 * j..32 * j + 32)
                .map(|i| value(i) * i32::from(q8[i] as i8))
                .sum()
        };
        for sb in 0..4 {
            let isum = i32::from(scales[2 * sb]) * group(2 * sb)
                + i32::from(scales[2 * sb + 1]) * group(2 * sb + 1);
            acc = (f16_at(x, 0) * dy).mul_add(isum as f32, acc);
        }
        let bias: i32 = (0..8)
            .map(|j| i32::from(mins[j]) * (bsums[2 * j] + bsums[2 * j + 1]))
            .sum();
        acc -= bias as f32 * (f16_at(x, 2) * dy);
    }
    acc
}

/// One row of ggml's `ggml_gemv_q6_K_8x4_q8_K` (dotprod build): per super-block the exact
/// sum of `scale * (q - 32) * q8`, then `acc = fma(sum, d * d_act, acc)` (GCC contracts the
/// C's `vmulq_f32` and `vaddq_f32`).
#[cfg(target_arch = "aarch64")]
fn ggml_arm_gemv_q6_k(row: &[u8], act: &[u8], n: usize) -> f32 {
    let mut acc = 0f32;
    for (b, x) in row.chunks_exact(210).take(n / 256).enumerate() {
        let (dy, q8, _) = q8k_block(act, b);
        let block = <super::blocks::BlockQ6K as super::blocks::Block>::read(x).unwrap();
        let values = block.values();
        let isum: i32 = (0..256)
            .map(|i| {
                i32::from(block.scales[i / 16]) * i32::from(values[i]) * i32::from(q8[i] as i8)
            })
            .sum();
        acc = (isum as f32).mul_add(f16_at(x, 208) * dy, acc);
    }
    acc
}

#[test]
fn golden_file_covers_every_arm_kernel() {
    let cases = golden_cases();
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
    ] {
        let count = cases
            .iter()
            .filter(|c| matches!(c, Case::Dot { ty: t, .. } if *t == ty))
            .count();
        assert!(count >= 4, "{ty}: {count} dot cases");
    }
    // The two builds round the 32-element formats differently somewhere in the file, so
    // the file can tell the levels apart.
    assert!(cases
        .iter()
        .any(|c| matches!(c, Case::Dot { dotprod, neon, .. } if dotprod != neon)));
}

#[test]
fn arm_quantiser_transcription_has_the_golden_bits() {
    let mut checked = 0;
    for case in golden_cases() {
        if let Case::Quantize { format, x, bytes } = case {
            let got = match format {
                GgmlType::Q8_0 => ggml_arm_quantize(&x, false),
                GgmlType::Q8_1 => ggml_arm_quantize(&x, true),
                // ggml's Arm Q8_K quantiser is the portable reference, the scalar one here.
                _ => {
                    let mut out = vec![0u8; bytes.len()];
                    activation::quantize_q8_k(&x, &mut out);
                    out
                }
            };
            assert_eq!(got, bytes, "{format} of {} values", x.len());
            checked += 1;
        }
    }
    assert!(checked >= 6);
}

#[cfg(target_arch = "aarch64")]
#[test]
fn arm_levels_have_the_golden_bits() {
    for level in [SimdLevel::Neon, SimdLevel::Dotprod] {
        let Some(kernels) = kernels_for(level) else {
            eprintln!("this CPU cannot run the {} level", level.name());
            continue;
        };
        for case in golden_cases() {
            match case {
                Case::Quantize { format, x, bytes } => {
                    let quantize = match format {
                        GgmlType::Q8_0 => kernels.quantize_q8_0,
                        GgmlType::Q8_1 => kernels.quantize_q8_1,
                        _ => kernels.quantize_q8_k,
                    };
                    let mut got = vec![0xAAu8; bytes.len()];
                    quantize(&x, &mut got);
                    assert_eq!(
                        got,
                        bytes,
                        "{} {format} of {} values",
                        level.name(),
                        x.len()
                    );
                }
                Case::Dot {
                    ty,
                    n,
                    row,
                    act,
                    dotprod,
                    neon,
                } => {
                    let want = match level {
                        // The dotprod build repacks Q4_0, Q8_0, Q4_K, Q5_K and Q6_K matrices
                        // (row counts a multiple of 4 or 8, all of them in practice) and
                        // multiplies one token with its gemv.
                        SimdLevel::Dotprod if matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0) => {
                            ggml_arm_gemv_32(ty, &row, &act, n).to_bits()
                        }
                        SimdLevel::Dotprod if matches!(ty, GgmlType::Q4K | GgmlType::Q5K) => {
                            ggml_arm_gemv_k4(ty, &row, &act, n).to_bits()
                        }
                        SimdLevel::Dotprod if ty == GgmlType::Q6K => {
                            ggml_arm_gemv_q6_k(&row, &act, n).to_bits()
                        }
                        SimdLevel::Dotprod => dotprod,
                        _ => neon,
                    };
                    let got = kernels.dot(ty)(&row, &act, n);
                    assert_eq!(
                        got.to_bits(),
                        want,
                        "{} {ty} n={n}: {got:e}, llama.cpp {:e}",
                        level.name(),
                        f32::from_bits(want)
                    );
                }
            }
        }
    }
}
