//! Matrix products of a real model's weights for a few tokens (sequences decoded together),
//! through `matmul` (rows-by-tokens kernels) and through a four-row call per token (the
//! previous path), on one thread: `cargo run --profile dev-opt --example batch_matmul_bench
//! -- MODEL.gguf`. Prints milliseconds per product, median of 7, for 1, 2, 4 and 8 tokens.

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use sampler_sdk::kernels::matmul::{matmul, ActivationBatch, WeightMatrix, TILE_ROWS};
use sampler_sdk::model::weights::FfnWeights;
use sampler_sdk::model::Model;
use sampler_sdk::quant::{kernel4_for, kernel_for, QuantizedActivations};
use sampler_sdk::threads::ThreadPool;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The previous single-thread product: tiles of rows, a four-row call per quad and token.
fn four_rows_per_token(
    w: &WeightMatrix,
    file: &[u8],
    acts: &[QuantizedActivations],
    out: &mut [f32],
) {
    let (one, four) = (kernel_for(w.ty), kernel4_for(w.ty));
    let n = w.row_len;
    for tile in (0..w.n_rows).step_by(TILE_ROWS) {
        let end = (tile + TILE_ROWS).min(w.n_rows);
        for (t, act) in acts.iter().enumerate() {
            let mut r = tile;
            while r + 4 <= end {
                let rows = [0, 1, 2, 3].map(|i| w.row(file, r + i));
                let v = four(rows, act.bytes(), n);
                out[t * w.n_rows + r..t * w.n_rows + r + 4].copy_from_slice(&v);
                r += 4;
            }
            for r in r..end {
                out[t * w.n_rows + r] = one(w.row(file, r), act.bytes(), n);
            }
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: batch_matmul_bench MODEL")?;
    let model = Model::load_with_threads(Path::new(&path), 1)?;
    let file = model.file().data();
    let pool = ThreadPool::new(1)?;
    let mut matrices = vec![("output", &model.weights.output)];
    if let FfnWeights::Dense(ffn) = &model.weights.layers[0].ffn {
        matrices.push(("ffn_up", &ffn.up));
        matrices.push(("ffn_down", &ffn.down));
    }
    for (name, w) in matrices {
        for n_tokens in [1usize, 2, 4, 8] {
            let x: Vec<f32> = (0..n_tokens * w.row_len)
                .map(|i| ((i * 7919 % 2000) as f32 / 1000.0) - 1.0)
                .collect();
            let mut batch = ActivationBatch::new();
            batch.set_input(n_tokens, w.row_len);
            let acts = batch.for_weight(w.ty, &x)?.to_vec();
            let mut out = vec![0f32; n_tokens * w.n_rows];
            let mut reference = vec![0f32; n_tokens * w.n_rows];
            let (mut new, mut old) = (Vec::new(), Vec::new());
            for _ in 0..7 {
                let start = Instant::now();
                matmul(&pool, w, file, black_box(&acts), &mut out)?;
                new.push(start.elapsed().as_secs_f64() * 1e3);
                let start = Instant::now();
                four_rows_per_token(w, file, black_box(&acts), &mut reference);
                old.push(start.elapsed().as_secs_f64() * 1e3);
            }
            let same = out
                .iter()
                .zip(&reference)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            println!(
                "{name} ({} x {}, {}) {n_tokens} tokens: rows-by-tokens {:.3} ms, four-row per token {:.3} ms, bit-identical {same}",
                w.n_rows,
                w.row_len,
                w.ty,
                median(new),
                median(old)
            );
        }
    }
    Ok(())
}
