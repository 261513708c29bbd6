//! Cross-checks of the whole module against independent references.
//!
//! The fixtures in `tests/quant_fixtures/` are written by `tests/scripts/make_quant_fixtures.py`
//! from the `gguf` package's numpy (de)quantisers and numpy transcriptions of ggml's reference
//! quantisers; they include rows of real SmolLM2 and Gemma 3 tensors, so these tests need no
//! model file and no Python.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use half::f16;

use super::blocks::{
    blocks, k4_scales_mins, BlockQ2K, BlockQ4K, BlockQ4_1, BlockQ5K, BlockQ5_1, BlockQ8_1,
};
use super::*;

pub(super) fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("quant_fixtures")
}

pub(super) fn read_fixture(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

pub(super) fn f32s_from(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

pub(super) struct Case {
    pub(super) kind: String,
    pub(super) name: String,
    pub(super) ty: GgmlType,
    pub(super) n: usize,
}

pub(super) fn manifest() -> Vec<Case> {
    let text = String::from_utf8(read_fixture("manifest.txt")).expect("manifest is UTF-8");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 4, "bad manifest line {line:?}");
            let ty = GgmlType::ALL
                .into_iter()
                .find(|t| t.name() == f[2])
                .expect("known type");
            Case {
                kind: f[0].into(),
                name: f[1].into(),
                ty,
                n: f[3].parse().expect("element count"),
            }
        })
        .collect()
}

pub(super) fn dequantized(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize(ty, bytes, &mut out).expect("valid lengths");
    out
}

#[test]
fn dequantisation_is_bit_exact_with_gguf() {
    let cases: Vec<Case> = manifest()
        .into_iter()
        .filter(|c| c.kind == "dequant")
        .collect();
    let types: std::collections::HashSet<GgmlType> = cases.iter().map(|c| c.ty).collect();
    assert_eq!(types.len(), GgmlType::ALL.len(), "every type has a fixture");
    for case in &cases {
        let bytes = read_fixture(&format!("{}.bin", case.name));
        let expected = f32s_from(&read_fixture(&format!("{}.f32", case.name)));
        assert_eq!(expected.len(), case.n, "{}", case.name);
        let got = dequantized(case.ty, &bytes, case.n);
        if let Some(i) = (0..case.n).find(|&i| got[i].to_bits() != expected[i].to_bits()) {
            panic!(
                "{} ({}): element {i} (block {}) is {:e}, gguf gives {:e}",
                case.name,
                case.ty,
                i / case.ty.block_size(),
                got[i],
                expected[i]
            );
        }
    }
}

/// A weight type whose dot products use activations in `format`.
fn weight_type_for(format: GgmlType) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|&t| activation_type(t) == format && t != format)
        .unwrap_or(format)
}

/// The fixtures hold ggml's reference quantisers' output. That is what llama.cpp's x86
/// build computes for Q8_K, F16 and BF16, so those must match to the byte. For Q8_0 and
/// Q8_1 the x86 build runs its AVX2 quantisers instead (`127 / amax` for `1 / d`, halves
/// to even for `roundf`), which the engine follows: there the bytes must be those of
/// `ggml_x86_tests::ggml_x86_quantize`, and differ from the reference's only in quants
/// off by one (and the Q8_1 sums that follow from them).
#[test]
fn activation_quantisation_is_bit_exact_with_ggml() {
    let mut acts = QuantizedActivations::new();
    let cases: Vec<Case> = manifest().into_iter().filter(|c| c.kind == "act").collect();
    assert!(cases.len() >= 5);
    for case in cases {
        let x = f32s_from(&read_fixture(&format!("{}.x.f32", case.name)));
        let reference = read_fixture(&format!("{}.bin", case.name));
        acts.quantize(weight_type_for(case.ty), &x)
            .expect("whole blocks");
        let expected = match case.ty {
            GgmlType::Q8_0 | GgmlType::Q8_1 => {
                let with_sum = case.ty == GgmlType::Q8_1;
                let x86 = super::ggml_x86_tests::ggml_x86_quantize(&x, with_sum);
                let (size, qs) = if with_sum { (36, 4) } else { (34, 2) };
                assert_eq!(x86.len(), reference.len(), "{}", case.name);
                let mut changed = 0;
                for (a, b) in x86.chunks_exact(size).zip(reference.chunks_exact(size)) {
                    assert_eq!(a[..2], b[..2], "{}: the scale d is the same", case.name);
                    for (&qa, &qb) in a[qs..].iter().zip(&b[qs..]) {
                        let step = i32::from(qa as i8) - i32::from(qb as i8);
                        assert!(step.abs() <= 1, "{}: quants {qa} and {qb}", case.name);
                        changed += usize::from(step != 0);
                    }
                }
                eprintln!(
                    "{}: {changed} quants differ from the reference's",
                    case.name
                );
                x86
            }
            _ => reference,
        };
        assert_eq!(acts.format(), case.ty, "{}", case.name);
        assert_eq!(acts.len(), case.n, "{}", case.name);
        assert_eq!(acts.bytes().len(), expected.len(), "{}", case.name);
        if let Some(i) = (0..expected.len()).find(|&i| acts.bytes()[i] != expected[i]) {
            let size = case.ty.type_size();
            panic!(
                "{}: byte {i} (block {}, offset {}) is {:#04x}, expected {:#04x}",
                case.name,
                i / size,
                i % size,
                acts.bytes()[i],
                expected[i]
            );
        }
    }
}

/// splitmix64: a fixed, dependency-free source of test data.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub(super) fn signed_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Activations whose magnitude changes from block to block, as hidden states do.
    pub(super) fn activations(&mut self, n: usize) -> Vec<f32> {
        let mut scale = 1.0f32;
        (0..n)
            .map(|i| {
                if i % 32 == 0 {
                    scale = 10f32.powf(3.0 * self.signed_unit());
                }
                scale * self.signed_unit()
            })
            .collect()
    }
}

/// |min part| of each dequantised weight, for the formats whose values are `d * q - min`
/// (Q4_1/Q5_1 store `+m`): the kernels compute the two parts separately, so their sizes,
/// not just the size of their difference, bound the f32 rounding.
pub(super) fn min_parts(ty: GgmlType, row: &[u8], n: usize) -> Vec<f64> {
    // One |min| per group of `group` elements.
    let (group, mins): (usize, Vec<f64>) = match ty {
        GgmlType::Q4_1 => (
            32,
            blocks::<BlockQ4_1>(row)
                .map(|b| b.m.to_f64().abs())
                .collect(),
        ),
        GgmlType::Q5_1 => (
            32,
            blocks::<BlockQ5_1>(row)
                .map(|b| b.m.to_f64().abs())
                .collect(),
        ),
        GgmlType::Q2K => (
            16,
            blocks::<BlockQ2K>(row)
                .flat_map(|b| {
                    b.scales
                        .map(|s| (b.dmin.to_f64() * f64::from(s >> 4)).abs())
                })
                .collect(),
        ),
        GgmlType::Q4K => (
            32,
            blocks::<BlockQ4K>(row)
                .flat_map(|b| {
                    k4_scales_mins(&b.scales)
                        .1
                        .map(|m| (b.dmin.to_f64() * f64::from(m)).abs())
                })
                .collect(),
        ),
        GgmlType::Q5K => (
            32,
            blocks::<BlockQ5K>(row)
                .flat_map(|b| {
                    k4_scales_mins(&b.scales)
                        .1
                        .map(|m| (b.dmin.to_f64() * f64::from(m)).abs())
                })
                .collect(),
        ),
        _ => return vec![0.0; n],
    };
    (0..n).map(|i| mins[i / group]).collect()
}

/// For Q4_1/Q5_1 the kernel adds `m * s` where `s = fp16(d32 * sum(q))` was rounded on its
/// own, while the dequantised activations give `m * fp16(d32) * sum(q)`: the difference is
/// part of the quantised-activation error, computed here exactly per block.
fn q8_1_sum_error(ty: GgmlType, row: &[u8], act: &[u8]) -> f64 {
    let ms: Vec<f64> = match ty {
        GgmlType::Q4_1 => blocks::<BlockQ4_1>(row).map(|b| b.m.to_f64()).collect(),
        GgmlType::Q5_1 => blocks::<BlockQ5_1>(row).map(|b| b.m.to_f64()).collect(),
        _ => return 0.0,
    };
    ms.iter()
        .zip(blocks::<BlockQ8_1>(act))
        .map(|(m, y)| {
            let sum: f64 = y.qs.iter().map(|&q| f64::from(q)).sum();
            (m * (y.s.to_f64() - y.d.to_f64() * sum)).abs()
        })
        .sum()
}

/// Checks `dot_row` against the f64 dot product of the dequantised row with the activations.
///
/// The two differ by (a) the activation quantisation, exactly `sum |w_i| |xq_i - x_i|` at
/// most, with `xq` the dequantised activations (plus the Q8_1 `s` rounding, see
/// `q8_1_sum_error`), and (b) f32 rounding in the kernel: every partial product goes through
/// at most 4 roundings before it is accumulated, and the accumulation of one f32 per block
/// (or per lane) adds one rounding per block, so the rounding error is at most
/// `(blocks + 8) * 2^-23 * sum (|w_i| + 2 |min_i|) |xq_i|` (2^-23 = two units of roundoff,
/// a factor 2 of slack), where the min parts enter because the kernels add `d*q` and `min`
/// terms separately. Returns both errors as fractions of their bounds.
fn check_dot(
    label: &str,
    ty: GgmlType,
    row: &[u8],
    x: &[f32],
    acts: &mut QuantizedActivations,
) -> [f64; 2] {
    let n = x.len();
    acts.quantize(ty, x).expect("whole blocks");
    let got = f64::from(dot_row(ty, row, acts));

    let w = dequantized(ty, row, n);
    let xq = dequantized(acts.format(), acts.bytes(), n);
    let mins = min_parts(ty, row, n);
    let exact: f64 = w
        .iter()
        .zip(x)
        .map(|(&w, &x)| f64::from(w) * f64::from(x))
        .sum();
    let exact_q: f64 = w
        .iter()
        .zip(&xq)
        .map(|(&w, &x)| f64::from(w) * f64::from(x))
        .sum();
    let act_error: f64 = w
        .iter()
        .zip(x.iter().zip(&xq))
        .map(|(&w, (&x, &q))| f64::from(w).abs() * f64::from(x - q).abs())
        .sum();
    let sum_error = q8_1_sum_error(ty, row, acts.bytes());
    let magnitude: f64 = (0..n)
        .map(|i| (f64::from(w[i]).abs() + 2.0 * mins[i]) * f64::from(xq[i]).abs())
        .sum();
    let rounding = (n / ty.block_size() + 8) as f64 * 2f64.powi(-23) * magnitude + 1e-30;

    let kernel_bound = sum_error + rounding;
    assert!(
        (got - exact_q).abs() <= kernel_bound,
        "{label}: dot_row = {got:e}, dequantised row . dequantised activations = {exact_q:e}, \
         difference {:e} exceeds {kernel_bound:e}",
        (got - exact_q).abs()
    );
    let bound = act_error + kernel_bound;
    assert!(
        (got - exact).abs() <= bound,
        "{label}: dot_row = {got:e}, dequantised row . x = {exact:e}, difference {:e} exceeds {bound:e}",
        (got - exact).abs()
    );
    [
        (got - exact_q).abs() / kernel_bound,
        (got - exact).abs() / bound,
    ]
}

#[test]
fn dot_row_matches_dequantised_dot_on_every_fixture_row() {
    let mut rng = Rng(7);
    let mut acts = QuantizedActivations::new();
    let mut checked = std::collections::HashSet::new();
    for case in manifest().into_iter().filter(|c| c.kind == "dequant") {
        let row = read_fixture(&format!("{}.bin", case.name));
        // The float-format fixtures span the whole exponent range; with activations up to 1e3
        // their f32 products overflow (in ggml too), so those rows only test dequantisation.
        if dequantized(case.ty, &row, case.n)
            .iter()
            .any(|w| w.abs() > 1e30)
        {
            continue;
        }
        // Row lengths of 1, 2 and all blocks of the fixture.
        let block = case
            .ty
            .block_size()
            .max(activation_type(case.ty).block_size());
        for n in [block, 2 * block, case.n] {
            let bytes = case.ty.bytes_for(n as u64).expect("whole blocks") as usize;
            for trial in 0..3 {
                let x = rng.activations(n);
                check_dot(
                    &format!("{} n={n} trial {trial}", case.name),
                    case.ty,
                    &row[..bytes],
                    &x,
                    &mut acts,
                );
            }
        }
        checked.insert(case.ty);
    }
    assert_eq!(checked.len(), GgmlType::ALL.len());
}

#[test]
fn dot_row_matches_dequantised_dot_on_random_blocks() {
    // Random bytes everywhere except the scale fields, which get ordinary finite values.
    let mut rng = Rng(11);
    let mut acts = QuantizedActivations::new();
    for ty in GgmlType::ALL {
        let n = 4 * QK_K;
        let mut worst = [0f64; 2];
        for trial in 0..20 {
            let size = ty.bytes_for(n as u64).expect("whole blocks") as usize;
            let mut row: Vec<u8> = (0..size).map(|_| rng.next_u64() as u8).collect();
            sanitise_floats(ty, &mut row, &mut rng);
            let x = rng.activations(n);
            let ratios = check_dot(
                &format!("random {ty} trial {trial}"),
                ty,
                &row,
                &x,
                &mut acts,
            );
            worst = [worst[0].max(ratios[0]), worst[1].max(ratios[1])];
        }
        eprintln!(
            "{ty}: worst error / bound: kernel {:.4}, with activation quantisation {:.3}",
            worst[0], worst[1]
        );
    }
}

/// Overwrites the floating-point fields of random block bytes with ordinary finite values:
/// block scales of either sign between 1e-5 and 1e-1, elements of F32/F16/BF16 in [-1, 1).
pub(super) fn sanitise_floats(ty: GgmlType, row: &mut [u8], rng: &mut Rng) {
    let mut scale = || {
        let magnitude = 10f32.powf(-3.0 + 2.0 * rng.signed_unit());
        if rng.next_u64() & 1 == 0 {
            magnitude
        } else {
            -magnitude
        }
    };
    // Byte offsets of the f16 fields in each block (Q8_K: one f32 at offset 0).
    let f16_fields: &[usize] = match ty {
        GgmlType::F32 => {
            for c in row.chunks_exact_mut(4) {
                c.copy_from_slice(&scale().to_le_bytes());
            }
            return;
        }
        GgmlType::F16 | GgmlType::BF16 => {
            for c in row.chunks_exact_mut(2) {
                let v = scale();
                let bytes = if ty == GgmlType::F16 {
                    f16::from_f32(v).to_le_bytes()
                } else {
                    half::bf16::from_f32(v).to_le_bytes()
                };
                c.copy_from_slice(&bytes);
            }
            return;
        }
        GgmlType::Q8K => {
            for c in row.chunks_exact_mut(ty.type_size()) {
                c[..4].copy_from_slice(&scale().to_le_bytes());
            }
            return;
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
    };
    for c in row.chunks_exact_mut(ty.type_size()) {
        for &offset in f16_fields {
            c[offset..offset + 2].copy_from_slice(&f16::from_f32(scale()).to_le_bytes());
        }
    }
}
