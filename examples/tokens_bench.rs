//! Rows-by-tokens kernels against four-row calls per token, per weight type and SIMD level:
//! `cargo run --profile dev-opt --example tokens_bench -- [n] [tokens]`. Synthetic rows of
//! `n` inputs (default 2048); prints nanoseconds per (row, token) pair, median of 9 runs.

use std::hint::black_box;
use std::time::Instant;

use half::f16;
use sampler_sdk::quant::{kernels_for, GgmlType, QuantizedActivations, SimdLevel};

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect()
}

fn scale_offsets(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        _ => &[],
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2048);
    let n_tokens: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    const ROWS: usize = 64;
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::F16,
    ];
    for ty in types {
        let Some(row_bytes) = ty.bytes_for(n as u64).map(|b| b as usize) else {
            continue;
        };
        let mut w = bytes(ROWS * row_bytes, 3);
        for (i, block) in w.chunks_exact_mut(ty.type_size()).enumerate() {
            for &at in scale_offsets(ty) {
                let scale = 0.01 + (i % 7) as f32 * 0.003;
                block[at..at + 2].copy_from_slice(&f16::from_f32(scale).to_le_bytes());
            }
        }
        if ty == GgmlType::F16 {
            for (i, v) in w.chunks_exact_mut(2).enumerate() {
                v.copy_from_slice(&f16::from_f32((i % 13) as f32 * 0.01).to_le_bytes());
            }
        }
        let acts: Vec<QuantizedActivations> = (0..n_tokens)
            .map(|t| {
                let x: Vec<f32> = bytes(n, 10 + t as u64)
                    .iter()
                    .map(|&b| (f32::from(b) - 127.5) / 64.0)
                    .collect();
                let mut a = QuantizedActivations::new();
                a.quantize(ty, &x).ok();
                a
            })
            .collect();
        let act_bytes: Vec<&[u8]> = acts.iter().map(QuantizedActivations::bytes).collect();
        let mut line = format!("{ty:>5} n={n} tokens={n_tokens}:");
        for level in [SimdLevel::Avx2, SimdLevel::Avx512] {
            let Some(k) = kernels_for(level) else {
                continue;
            };
            let (four, tokens) = (k.dot4(ty), k.dot_tokens(ty));
            let mut out = vec![[0f32; 4]; n_tokens];
            let quad = |q: usize| -> [&[u8]; 4] {
                [0, 1, 2, 3].map(|i| &w[(4 * q + i) * row_bytes..(4 * q + i + 1) * row_bytes])
            };
            let pairs = (ROWS * n_tokens) as f64;
            let mut time_four = Vec::new();
            let mut time_tokens = Vec::new();
            for _ in 0..9 {
                let start = Instant::now();
                for _ in 0..20 {
                    for q in 0..ROWS / 4 {
                        for a in &act_bytes {
                            black_box(four(quad(q), a, n));
                        }
                    }
                }
                time_four.push(start.elapsed().as_secs_f64() * 1e9 / (20.0 * pairs));
                let start = Instant::now();
                for _ in 0..20 {
                    for q in 0..ROWS / 4 {
                        tokens(quad(q), &acts, &mut out);
                        black_box(&out);
                    }
                }
                time_tokens.push(start.elapsed().as_secs_f64() * 1e9 / (20.0 * pairs));
            }
            line += &format!(
                "  {}: four {:.1} ns, tokens {:.1} ns",
                level.name(),
                median(time_four),
                median(time_tokens)
            );
        }
        println!("{line}");
    }
}
