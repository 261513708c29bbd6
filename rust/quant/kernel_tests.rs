//! Every SIMD kernel set this CPU runs, checked against the scalar kernels: dot products
//! within the f32 summation-order bound, four-row kernels bit-identical to single rows,
//! activation quantisers bit-identical.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use super::tests::{dequantized, manifest, min_parts, read_fixture, sanitise_floats, Rng};
use super::*;

/// The SIMD levels this machine can run (the scalar level is the reference).
fn simd_levels() -> Vec<&'static Kernels> {
    let levels: Vec<_> = SimdLevel::ALL[1..]
        .iter()
        .filter_map(|&l| kernels_for(l))
        .collect();
    if levels.is_empty() {
        eprintln!("no SIMD level runs on this CPU: only the scalar kernels are tested");
    }
    levels
}

fn scalar() -> &'static Kernels {
    kernels_for(SimdLevel::Scalar).expect("the scalar level always builds")
}

/// Largest `|simd - scalar|` the summation orders allow, from the magnitude
/// `M = sum (|w_i| + 2 |min_i|) |xq_i|` (dequantised weights, their min parts, dequantised
/// activations). Each kernel rounds every block's (or lane's) term a few times and adds the
/// terms one by one, so it is within `(additions + 8) * 2^-24 * M` of the exact sum; two
/// kernels differ by at most twice that. The scalar float kernels sum in f64; the SIMD ones
/// accumulate `n / 8` products per f32 lane.
fn order_bound(ty: GgmlType, row: &[u8], act: &QuantizedActivations) -> f64 {
    let n = act.len();
    let w = dequantized(ty, row, n);
    let xq = dequantized(act.format(), act.bytes(), n);
    let mins = min_parts(ty, row, n);
    let magnitude: f64 = (0..n)
        .map(|i| (f64::from(w[i]).abs() + 2.0 * mins[i]) * f64::from(xq[i]).abs())
        .sum();
    let additions = match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => n / 8,
        _ => n / ty.block_size(),
    };
    2.0 * (additions + 8) as f64 * 2f64.powi(-24) * magnitude + 1e-30
}

/// Checks one row against the scalar kernel; returns the error as a fraction of the bound.
fn check_against_scalar(
    label: &str,
    kernels: &Kernels,
    ty: GgmlType,
    row: &[u8],
    act: &QuantizedActivations,
) -> f64 {
    let want = scalar().dot(ty)(row, act.bytes(), act.len());
    let got = kernels.dot(ty)(row, act.bytes(), act.len());
    let bound = order_bound(ty, row, act);
    let error = (f64::from(got) - f64::from(want)).abs();
    assert!(
        error <= bound,
        "{label} ({}): {got:e}, scalar {want:e}, difference {error:e} exceeds {bound:e}",
        kernels.level().name()
    );
    error / bound
}

/// Four rows through the fused kernel give the bits of four single-row calls.
fn check_four_rows(
    label: &str,
    kernels: &Kernels,
    ty: GgmlType,
    rows: [&[u8]; 4],
    act: &QuantizedActivations,
) {
    let single = rows.map(|row| kernels.dot(ty)(row, act.bytes(), act.len()).to_bits());
    let four = kernels.dot4(ty)(rows, act.bytes(), act.len()).map(f32::to_bits);
    assert_eq!(
        four,
        single,
        "{label} ({}): four-row kernel",
        kernels.level().name()
    );
}

fn random_row(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
    let size = ty.bytes_for(n as u64).expect("whole blocks") as usize;
    let mut row: Vec<u8> = (0..size).map(|_| rng.next_u64() as u8).collect();
    sanitise_floats(ty, &mut row, rng);
    row
}

#[test]
fn simd_dots_match_scalar_on_random_blocks() {
    let mut rng = Rng(23);
    let mut acts = QuantizedActivations::new();
    for kernels in simd_levels() {
        for ty in GgmlType::ALL {
            let block = ty.block_size().max(activation_type(ty).block_size());
            // Odd block counts exercise every tail path; 18 and 48 are SmolLM2's row lengths.
            let mut lengths: Vec<usize> = [1, 2, 3, 5, 7, 18, 48].map(|b| b * block).to_vec();
            if block == 1 {
                lengths.extend([1, 3, 7, 13, 31, 33, 65, 127, 576 + 5]);
            }
            let mut worst = 0f64;
            for n in lengths {
                for trial in 0..4 {
                    let rows: Vec<Vec<u8>> = (0..4).map(|_| random_row(ty, n, &mut rng)).collect();
                    acts.quantize(ty, &rng.activations(n))
                        .expect("whole blocks");
                    let label = format!("random {ty} n={n} trial {trial}");
                    for row in &rows {
                        worst = worst.max(check_against_scalar(&label, kernels, ty, row, &acts));
                    }
                    let rows = [&rows[0][..], &rows[1], &rows[2], &rows[3]];
                    check_four_rows(&label, kernels, ty, rows, &acts);
                }
            }
            eprintln!(
                "{} {ty}: worst |simd - scalar| / bound {worst:.2e}",
                kernels.level().name()
            );
        }
    }
}

#[test]
fn simd_dots_match_scalar_on_fixture_rows() {
    let mut rng = Rng(29);
    let mut acts = QuantizedActivations::new();
    let cases: Vec<_> = manifest()
        .into_iter()
        .filter(|c| c.kind == "dequant")
        .collect();
    for kernels in simd_levels() {
        for case in &cases {
            let row = read_fixture(&format!("{}.bin", case.name));
            if dequantized(case.ty, &row, case.n)
                .iter()
                .any(|w| w.abs() > 1e30)
            {
                continue; // products overflow f32 in every kernel; see tests.rs
            }
            acts.quantize(case.ty, &rng.activations(case.n))
                .expect("whole blocks");
            check_against_scalar(&case.name, kernels, case.ty, &row, &acts);
            // The fixture's rows split in four (real models' rows are this short and shorter).
            let block = case
                .ty
                .block_size()
                .max(activation_type(case.ty).block_size());
            let n = case.n / 4 / block * block;
            let bytes = case.ty.bytes_for(n as u64).expect("whole blocks") as usize;
            let rows = [0, 1, 2, 3].map(|i| &row[i * bytes..(i + 1) * bytes]);
            acts.quantize(case.ty, &rng.activations(n))
                .expect("whole blocks");
            check_four_rows(&case.name, kernels, case.ty, rows, &acts);
        }
    }
}

#[test]
fn four_row_kernels_handle_rows_of_different_lengths() {
    let mut rng = Rng(31);
    let mut acts = QuantizedActivations::new();
    for kernels in simd_levels().into_iter().chain([scalar()]) {
        for ty in GgmlType::ALL {
            let block = ty.block_size().max(activation_type(ty).block_size());
            let n = 3 * block;
            let row = random_row(ty, n, &mut rng);
            acts.quantize(ty, &rng.activations(n))
                .expect("whole blocks");
            let size = row.len() / 3;
            // Short rows are truncated to whole blocks, as by the single-row kernels.
            let rows = [&row[..], &row[..size], &row[..2 * size + 1], &[][..]];
            check_four_rows(&format!("uneven {ty}"), kernels, ty, rows, &acts);
        }
    }
}

/// `out[t][i]` of the rows-by-tokens kernel has the bits of the single-row kernel for
/// `rows[i]` and `acts[t]`.
fn check_rows_by_tokens(
    label: &str,
    kernels: &Kernels,
    ty: GgmlType,
    rows: [&[u8]; 4],
    acts: &[QuantizedActivations],
) {
    let bytes: Vec<&[u8]> = acts.iter().map(QuantizedActivations::bytes).collect();
    let n = acts[0].len();
    let mut out = vec![[f32::NAN; 4]; acts.len()];
    kernels.dot_tokens(ty)(rows, acts, &mut out);
    for (t, act) in bytes.iter().enumerate() {
        let single = rows.map(|row| kernels.dot(ty)(row, act, n).to_bits());
        assert_eq!(
            out[t].map(f32::to_bits),
            single,
            "{label} ({}): rows-by-tokens kernel, token {t} of {}",
            kernels.level().name(),
            acts.len()
        );
    }
}

#[test]
fn rows_by_tokens_kernels_give_single_row_bits() {
    let mut rng = Rng(43);
    for kernels in simd_levels().into_iter().chain([scalar()]) {
        for ty in GgmlType::ALL {
            let block = ty.block_size().max(activation_type(ty).block_size());
            // Float rows of a multiple of 32 elements take the AVX-512 level's own path.
            let float_lengths: &[usize] = if block == 1 { &[64, 96] } else { &[] };
            for &blocks in [1, 3, 18].iter().chain(float_lengths) {
                let n = blocks * block;
                for n_tokens in 1..=9 {
                    let rows: Vec<Vec<u8>> = (0..4).map(|_| random_row(ty, n, &mut rng)).collect();
                    let rows = [&rows[0][..], &rows[1], &rows[2], &rows[3]];
                    let acts: Vec<QuantizedActivations> = (0..n_tokens)
                        .map(|_| {
                            let mut act = QuantizedActivations::new();
                            act.quantize(ty, &rng.activations(n)).expect("whole blocks");
                            act
                        })
                        .collect();
                    let label = format!("{ty} with {blocks} blocks");
                    check_rows_by_tokens(&label, kernels, ty, rows, &acts);
                }
            }
        }
    }
}

#[test]
fn lanes_kernels_give_single_row_bits() {
    let mut rng = Rng(53);
    let mut checked = 0;
    for kernels in simd_levels() {
        for ty in GgmlType::ALL {
            let Some(lanes_kernel) = kernels.dot_lanes(ty) else {
                continue;
            };
            let offset = lanes_offset(ty).expect("a lanes kernel implies an offset");
            let k_quant = matches!(ty, GgmlType::Q4K | GgmlType::Q6K);
            let block = ty.block_size();
            let block_counts: &[usize] = if k_quant { &[1, 3, 4] } else { &[1, 3, 18, 48] };
            for &blocks in block_counts {
                let n = blocks * block;
                for n_tokens in [1, 2, 7, 15, 16] {
                    let rows: Vec<Vec<u8>> = (0..2).map(|_| random_row(ty, n, &mut rng)).collect();
                    let acts: Vec<QuantizedActivations> = (0..n_tokens)
                        .map(|_| {
                            let mut act = QuantizedActivations::new();
                            act.quantize(ty, &rng.activations(n)).expect("whole blocks");
                            act
                        })
                        .collect();
                    // Q4_K: the gemm's arithmetic (the tokens of a batch of 16, a multiple of
                    // 4) and the gemv's (a lone token's).
                    let modes: &[bool] = match ty {
                        GgmlType::Q4K => &[false, true],
                        GgmlType::Q6K => &[true],
                        _ => &[false],
                    };
                    for &batched in modes {
                        let mut lanes = TokenLanes::new();
                        let built = if k_quant {
                            lanes.build_q8_k(&acts, batched)
                        } else {
                            lanes.build(&acts, offset)
                        };
                        assert!(built, "{ty}: lanes of {n_tokens} tokens");
                        assert_eq!((lanes.tokens(), lanes.blocks()), (n_tokens, blocks));
                        let mut out = [[f32::NAN; 2]; LANE_TOKENS];
                        lanes_kernel([&rows[0], &rows[1]], &lanes, &mut out);
                        let rows4 = [&rows[0][..], &rows[1], &rows[0], &rows[1]];
                        let mut expected = vec![[0f32; 4]; n_tokens];
                        let batch = if batched { LANE_TOKENS } else { 1 };
                        for (t, e) in expected.iter_mut().enumerate() {
                            let first = if batched { t } else { 0 };
                            let act = std::slice::from_ref(&acts[t]);
                            kernels.dot_batch(ty)(
                                rows4,
                                act,
                                first,
                                batch,
                                std::slice::from_mut(e),
                            );
                        }
                        for (t, act) in acts.iter().enumerate() {
                            if !batched {
                                let single =
                                    [0, 1].map(|i| kernels.dot(ty)(&rows[i], act.bytes(), n));
                                assert_eq!(
                                    single.map(f32::to_bits),
                                    [0, 1].map(|i| expected[t][i].to_bits())
                                );
                            }
                            assert_eq!(
                                out[t].map(f32::to_bits),
                                [0, 1].map(|i| expected[t][i].to_bits()),
                                "{ty} ({}), {blocks} blocks, batched {batched}: token {t} of {n_tokens}",
                                kernels.level().name()
                            );
                        }
                    }
                    // Lanes laid out for another format are refused, not misread.
                    let mut wrong = TokenLanes::new();
                    let q8_0_rows: Vec<QuantizedActivations> = (0..n_tokens)
                        .map(|_| {
                            let mut act = QuantizedActivations::new();
                            act.quantize(GgmlType::Q8_0, &rng.activations(n))
                                .expect("whole blocks");
                            act
                        })
                        .collect();
                    assert!(wrong.build(&q8_0_rows, offset + 1));
                    let mut out = [[0f32; 2]; LANE_TOKENS];
                    lanes_kernel([&rows[0], &rows[1]], &wrong, &mut out);
                    assert!(out[0][0].is_nan(), "{ty}: lanes of another offset");
                    checked += 1;
                }
            }
        }
    }
    if SimdLevel::Avx512.is_supported() {
        assert!(checked > 0, "the AVX-512 level has lanes kernels");
    }
}

#[test]
fn token_lanes_refuse_what_they_cannot_lay_out() {
    let mut rng = Rng(59);
    let act = |ty: GgmlType, n: usize, rng: &mut Rng| {
        let mut act = QuantizedActivations::new();
        act.quantize(ty, &rng.activations(n)).expect("whole blocks");
        act
    };
    let mut lanes = TokenLanes::new();
    assert!(!lanes.build(&[], 16), "no tokens");
    let too_many: Vec<_> = (0..LANE_TOKENS + 1)
        .map(|_| act(GgmlType::Q8_0, 64, &mut rng))
        .collect();
    assert!(!lanes.build(&too_many, 16), "more tokens than lanes");
    assert_eq!(lanes.tokens(), 0);
    let q8_1 = [act(GgmlType::Q4_1, 64, &mut rng)];
    assert!(!lanes.build(&q8_1, 16), "Q8_1 activations");
    let mixed = [
        act(GgmlType::Q8_0, 64, &mut rng),
        act(GgmlType::Q8_0, 96, &mut rng),
    ];
    assert!(!lanes.build(&mixed, 16), "rows of different lengths");
    assert!(lanes.build(&mixed[..1], 16));
    assert_eq!((lanes.tokens(), lanes.blocks(), lanes.offset()), (1, 2, 16));
}

#[test]
fn rows_by_tokens_kernels_handle_rows_of_different_lengths() {
    let mut rng = Rng(47);
    for kernels in simd_levels().into_iter().chain([scalar()]) {
        for ty in GgmlType::ALL {
            let block = ty.block_size().max(activation_type(ty).block_size());
            let n = 3 * block;
            let row = random_row(ty, n, &mut rng);
            let acts: Vec<QuantizedActivations> = (0..5)
                .map(|_| {
                    let mut act = QuantizedActivations::new();
                    act.quantize(ty, &rng.activations(n)).expect("whole blocks");
                    act
                })
                .collect();
            let size = row.len() / 3;
            // Short rows are truncated to whole blocks, as by the single-row kernels.
            let rows = [&row[..], &row[..size], &row[..2 * size + 1], &[][..]];
            check_rows_by_tokens(&format!("uneven {ty}"), kernels, ty, rows, &acts);
            let uniform = [&row[..]; 4];
            // A short activation row: the block count differs between tokens.
            let mut short = QuantizedActivations::new();
            short
                .quantize(ty, &rng.activations(2 * block))
                .expect("whole blocks");
            let mut acts = acts;
            acts.push(short);
            let mut out = vec![[f32::NAN; 4]; acts.len()];
            kernels.dot_tokens(ty)(uniform, &acts, &mut out);
            for (t, act) in acts.iter().enumerate() {
                let single = uniform.map(|row| kernels.dot(ty)(row, act.bytes(), n).to_bits());
                assert_eq!(
                    out[t].map(f32::to_bits),
                    single,
                    "short activations {ty} token {t}"
                );
            }
        }
    }
}

/// Inputs that stress the quantisers: ordinary rows, all-zero blocks, exact ties of the
/// rounding (a block whose largest magnitude is 127 has scale 1), a negative extreme, and
/// the same magnitude with both signs (the first one decides the Q8_K scale's sign).
fn quantiser_inputs(rng: &mut Rng) -> Vec<Vec<f32>> {
    let mut inputs: Vec<Vec<f32>> = (1..=6)
        .map(|blocks| rng.activations(blocks * 256))
        .collect();
    inputs.push(vec![0.0; 512]);
    let mut ties: Vec<f32> = (0..512).map(|i| (i % 255) as f32 - 127.0 + 0.5).collect();
    for block in ties.chunks_mut(32) {
        block[0] = 127.0;
    }
    inputs.push(ties);
    let mut negative = rng.activations(256);
    negative[77] = -1e4;
    negative[200] = 1e4;
    inputs.push(negative);
    let mut mixed = rng.activations(512);
    mixed[256..288].fill(0.0);
    inputs.push(mixed);
    inputs
}

/// Whether `level` quantises `format` with ggml's Arm rounding (`id = 1 / d`), which the
/// scalar level (x86's `127 / amax`) does not share; `ggml_arm_tests` holds its reference.
fn arm_rounding(level: SimdLevel, format: GgmlType) -> bool {
    matches!(level, SimdLevel::Neon | SimdLevel::Dotprod)
        && matches!(format, GgmlType::Q8_0 | GgmlType::Q8_1)
}

#[test]
fn simd_quantisers_are_bit_identical_to_scalar() {
    let mut rng = Rng(37);
    let inputs = quantiser_inputs(&mut rng);
    for kernels in simd_levels() {
        for (format, block_bytes) in [
            (GgmlType::Q8_0, 34),
            (GgmlType::Q8_1, 36),
            (GgmlType::Q8K, 292),
            (GgmlType::F16, 2),
        ] {
            let pick = |k: &Kernels| match format {
                GgmlType::Q8_0 => k.quantize_q8_0,
                GgmlType::Q8_1 => k.quantize_q8_1,
                GgmlType::F16 => k.convert_f16,
                _ => k.quantize_q8_k,
            };
            for (i, x) in inputs.iter().enumerate() {
                let size = format.bytes_for(x.len() as u64).expect("whole blocks") as usize;
                let mut want = vec![0u8; size];
                let mut got = vec![0xAAu8; size];
                pick(scalar())(x, &mut want);
                if arm_rounding(kernels.level(), format) {
                    want = super::ggml_arm_tests::ggml_arm_quantize(x, format == GgmlType::Q8_1);
                }
                pick(kernels)(x, &mut got);
                if let Some(b) = (0..size).find(|&b| got[b] != want[b]) {
                    panic!(
                        "{} {format} input {i}: byte {b} (block {}, offset {}) is {:#04x}, scalar {:#04x}",
                        kernels.level().name(),
                        b / block_bytes,
                        b % block_bytes,
                        got[b],
                        want[b]
                    );
                }
            }
        }
    }
}

#[test]
fn avx512_level_gives_the_avx2_bits() {
    let (Some(avx2), Some(avx512)) = (kernels_for(SimdLevel::Avx2), kernels_for(SimdLevel::Avx512))
    else {
        eprintln!("this CPU lacks AVX2 or AVX-512: nothing to compare");
        return;
    };
    let mut rng = Rng(41);
    let mut acts = QuantizedActivations::new();
    for ty in GgmlType::ALL {
        let block = ty.block_size().max(activation_type(ty).block_size());
        for blocks in [1, 3, 18] {
            let n = blocks * block;
            let rows: Vec<Vec<u8>> = (0..4).map(|_| random_row(ty, n, &mut rng)).collect();
            let rows = [&rows[0][..], &rows[1], &rows[2], &rows[3]];
            acts.quantize(ty, &rng.activations(n))
                .expect("whole blocks");
            let (a, n) = (acts.bytes(), acts.len());
            let bits = |k: &Kernels| {
                let one = rows.map(|row| k.dot(ty)(row, a, n).to_bits());
                let mut tokens = [[0f32; 4]; 3];
                k.dot_tokens(ty)(
                    rows,
                    &[acts.clone(), acts.clone(), acts.clone()],
                    &mut tokens,
                );
                (
                    one,
                    k.dot4(ty)(rows, a, n).map(f32::to_bits),
                    tokens.map(|t| t.map(f32::to_bits)),
                )
            };
            assert_eq!(bits(avx512), bits(avx2), "{ty} with {blocks} blocks");
        }
    }
}

#[test]
fn simd_f16_conversion_is_bit_identical_to_scalar_on_special_values() {
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        65504.0,
        65520.0, // rounds to infinity
        1e5,
        -1e5,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7fa0_0001), // signalling NaN with a payload
        5.96e-8,                     // the smallest f16 subnormal
        2.98e-8,                     // halfway to zero: ties to even (zero)
        1e-10,
        1.0 + 1.0 / 2048.0, // halfway between two f16 values
        1.0 + 3.0 / 2048.0,
        -3.0e-5,
    ];
    let mut rng = Rng(91);
    x.extend(rng.activations(256));
    for len in [0, 1, 7, 8, 9, x.len()] {
        let mut want = vec![0u8; 2 * len];
        activation::convert_f16(&x[..len], &mut want);
        for kernels in simd_levels() {
            let mut got = vec![0xAAu8; 2 * len];
            (kernels.convert_f16)(&x[..len], &mut got);
            assert_eq!(got, want, "{} len {len}", kernels.level().name());
        }
    }
}

/// `dot_batch`: where llama.cpp's batched arithmetic is its single-token one (every type
/// but Q4_K and Q6_K, and every type at the scalar level), or is not reproduced, the bits of
/// `dot_tokens`; Q4_K's last `batch % 4` tokens and the tokens of Q6_K batches of fewer than
/// 8 have the single-row bits (the rest are checked against llama.cpp's kernels in
/// `ggml_x86_tests`), and the AVX-512 level (groups of eight) gives the AVX2 level's bits;
/// at the `dotprod` level, Q8_0's and Q6_K's last `batch % 4` tokens have the single-row bits.
#[test]
fn batch_kernels_follow_their_contract() {
    let mut rng = Rng(53);
    for kernels in simd_levels().into_iter().chain([scalar()]) {
        for ty in GgmlType::ALL {
            let block = ty.block_size().max(activation_type(ty).block_size());
            let n = 3 * block;
            let rows: Vec<Vec<u8>> = (0..4).map(|_| random_row(ty, n, &mut rng)).collect();
            let rows = [&rows[0][..], &rows[1], &rows[2], &rows[3]];
            for batch in [1, 3, 4, 7, 8, 9, 12, 17] {
                let acts: Vec<QuantizedActivations> = (0..batch)
                    .map(|_| {
                        let mut act = QuantizedActivations::new();
                        act.quantize(ty, &rng.activations(n)).expect("whole blocks");
                        act
                    })
                    .collect();
                let run = |k: &Kernels, batched: bool| {
                    let mut out = vec![[f32::NAN; 4]; batch];
                    if batched {
                        k.dot_batch(ty)(rows, &acts, 0, batch, &mut out);
                    } else {
                        k.dot_tokens(ty)(rows, &acts, &mut out);
                    }
                    out.iter().map(|o| o.map(f32::to_bits)).collect::<Vec<_>>()
                };
                let (batched, single) = (run(kernels, true), run(kernels, false));
                let label = format!("{} {ty} batch of {batch}", kernels.level().name());
                let simd = kernels.level() != SimdLevel::Scalar;
                let differs_from = match ty {
                    GgmlType::Q4K if simd => batch - batch % 4,
                    GgmlType::Q8_0 | GgmlType::Q6K if kernels.level() == SimdLevel::Dotprod => {
                        batch - batch % 4
                    }
                    GgmlType::Q6K if simd && batch >= 8 => batch,
                    _ => 0,
                };
                assert_eq!(batched[differs_from..], single[differs_from..], "{label}");
                if let Some(avx2) = kernels_for(SimdLevel::Avx2).filter(|_| simd) {
                    assert_eq!(batched, run(avx2, true), "{label}: AVX2 bits");
                }
            }
            // Rows of different lengths: single-row calls, as `dot_tokens` makes them.
            let size = rows[0].len() / 3;
            let uneven = [rows[0], &rows[1][..size], &rows[2][..2 * size + 1], &[][..]];
            let acts: Vec<QuantizedActivations> = (0..9)
                .map(|_| {
                    let mut act = QuantizedActivations::new();
                    act.quantize(ty, &rng.activations(n)).expect("whole blocks");
                    act
                })
                .collect();
            let mut out = vec![[f32::NAN; 4]; acts.len()];
            kernels.dot_batch(ty)(uneven, &acts, 0, acts.len(), &mut out);
            for (t, act) in acts.iter().enumerate() {
                let single = uneven.map(|row| kernels.dot(ty)(row, act.bytes(), n).to_bits());
                assert_eq!(
                    out[t].map(f32::to_bits),
                    single,
                    "{} uneven {ty} token {t}",
                    kernels.level().name()
                );
            }
        }
    }
}
