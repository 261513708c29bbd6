//! The matrix-vector products of one decode step alone (every weight matrix of the model
//! times one token, no attention or norms), as the memory-bound scan they are:
//! `cargo run --profile dev-opt --example decode_matvec_bench -- MODEL.gguf [threads]`.
//! Prints milliseconds per step and the weight bytes read per second, median of 15 steps.

use std::path::Path;
use std::time::Instant;

use sampler_sdk::kernels::matmul::{matmul, WeightMatrix};
use sampler_sdk::model::weights::FfnWeights;
use sampler_sdk::model::Model;
use sampler_sdk::quant::QuantizedActivations;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: decode_matvec_bench MODEL [threads]")?;
    let threads: usize = args.next().map_or(Ok(1), |t| t.parse())?;
    let model = Model::load_with_threads(Path::new(&path), threads)?;
    let mut matrices: Vec<&WeightMatrix> = Vec::new();
    for layer in &model.weights.layers {
        matrices.extend([&layer.wq, &layer.wk, &layer.wv, &layer.wo]);
        if let FfnWeights::Dense(ffn) = &layer.ffn {
            matrices.extend([&ffn.gate, &ffn.up, &ffn.down]);
        }
    }
    matrices.push(&model.weights.output);
    let inputs: Vec<(Vec<QuantizedActivations>, Vec<f32>)> = matrices
        .iter()
        .map(|w| {
            let x: Vec<f32> = (0..w.row_len)
                .map(|i| ((i * 7919) % 200) as f32 / 100.0 - 1.0)
                .collect();
            let mut act = QuantizedActivations::new();
            act.quantize(w.ty, &x)?;
            Ok((vec![act], vec![0f32; w.n_rows]))
        })
        .collect::<sampler_sdk::Result<_>>()?;
    let bytes: usize = matrices
        .iter()
        .map(|w| w.ty.bytes_for((w.row_len * w.n_rows) as u64).unwrap_or(0) as usize)
        .sum();
    let mut inputs = inputs;
    let mut times = Vec::new();
    for _ in 0..15 {
        let start = Instant::now();
        for (w, (acts, out)) in matrices.iter().zip(inputs.iter_mut()) {
            matmul(model.pool(), w, model.weight_bytes(), acts, out)?;
        }
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{path}: {threads} thread(s), {:.1} MB of weights: {:.2} ms per step, {:.1} GB/s",
        bytes as f64 / 1e6,
        median * 1e3,
        bytes as f64 / median / 1e9
    );
    Ok(())
}
