//! Threaded matrix products on SmolLM2-135M's real weights (Q4_1 layers, Q8_0 output):
//! matrix-vector (decode) and matrix-matrix over a 64-token chunk (prefill), on 1 and 2
//! threads, reported as GB/s of weight bytes read (compare with the machine's memory
//! bandwidth: about 20 GB/s on one core here, 30 GB/s on two) and GFLOP/s (2 per weight
//! per token). Plus one decode step of the whole model at a 256-token context.
//!
//! `cargo bench --bench matmul -- 'matvec/ffn_down'` runs a subset. Skips (with a message)
//! when the model file is absent. Times are wall time: threads run on several cores.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sampler_sdk::kernels::matmul::{matmul, ActivationBatch, WeightMatrix};
use sampler_sdk::model::weights::FfnWeights;
use sampler_sdk::model::Model;
use sampler_sdk::model_cache;
use sampler_sdk::threads::ThreadPool;

/// The default model, from the model cache (`python -m sampler_sdk models pull`).
const SMOLLM2: (&str, &str) = ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf");
const THREADS: [usize; 2] = [1, 2];

fn model(threads: usize) -> Option<Model> {
    let Some(path) = model_cache::cached_model(SMOLLM2.0, SMOLLM2.1) else {
        eprintln!("skipped: {} is not pulled", SMOLLM2.0);
        return None;
    };
    match Model::load_with_threads(&path, threads) {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// Deterministic activations in [-1, 1).
fn activations(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 % 2000) as f32 / 1000.0) - 1.0)
        .collect()
}

fn bench_products(c: &mut Criterion) {
    let Some(model) = model(1) else { return };
    let file = model.file().data();
    let FfnWeights::Dense(ffn) = &model.weights.layers[0].ffn else {
        eprintln!("skipped: layer 0 has experts, not one dense feed-forward");
        return;
    };
    let matrices: [(&str, &WeightMatrix); 3] = [
        ("ffn_gate", &ffn.gate),
        ("ffn_down", &ffn.down),
        ("output", &model.weights.output),
    ];
    for (group_name, n_tokens) in [("matvec", 1usize), ("matmul64", 64)] {
        let mut group = c.benchmark_group(group_name);
        group
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        for (name, w) in matrices {
            if n_tokens > 1 && name == "output" {
                continue; // prefill projects only the last token onto the vocabulary
            }
            let x = activations(n_tokens * w.row_len);
            let mut batch = ActivationBatch::new();
            batch.set_input(n_tokens, w.row_len);
            let Ok(acts) = batch.for_weight(w.ty, &x) else {
                eprintln!("skipped {name}: cannot quantize activations");
                continue;
            };
            let mut out = vec![0f32; n_tokens * w.n_rows];
            let bytes = (w.n_rows * w.row_bytes) as u64;
            group.throughput(Throughput::Bytes(bytes));
            for threads in THREADS {
                let Ok(pool) = ThreadPool::new(threads) else {
                    continue;
                };
                let id = BenchmarkId::new(format!("{name}/{}", w.ty), format!("{threads}t"));
                group.bench_function(id, |b| {
                    b.iter(|| matmul(&pool, w, file, black_box(acts), &mut out));
                });
            }
            let flops = 2 * w.n_rows * w.row_len * n_tokens;
            eprintln!(
                "{group_name} {name}: {} weight bytes, {:.1} MFLOP per call",
                bytes,
                flops as f64 / 1e6
            );
        }
        group.finish();
    }
}

fn bench_decode_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_step");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(30);
    for threads in THREADS {
        let Some(model) = model(threads) else { return };
        let prompt: Vec<u32> = (0..256).map(|i| 1 + (i * 7919) % 40_000).collect();
        let mut seq = model.new_sequence(prompt.len() + 1);
        if model.forward_logits(&mut seq, &prompt, 1).is_err() {
            eprintln!("skipped: prefill failed");
            return;
        }
        group.bench_function(
            BenchmarkId::new("smollm2_q4_1_ctx256", format!("{threads}t")),
            |b| {
                b.iter(|| {
                    // Decode the same position again and again: drop it, then recompute it.
                    seq.truncate(prompt.len());
                    let logits = model.forward_logits(&mut seq, &[42], 1);
                    black_box(logits.map(|l| l[0]).ok())
                });
            },
        );
    }
    group.finish();
}

/// The fixed cost of one parallel region: a decode step runs about 150 of them.
fn bench_pool(c: &mut Criterion) {
    let mut group = c.benchmark_group("pool");
    for threads in THREADS {
        let Ok(pool) = ThreadPool::new(threads) else {
            continue;
        };
        group.bench_function(
            BenchmarkId::new("empty_region", format!("{threads}t")),
            |b| {
                // Two chunks' worth of trivial items, so the region is really shared.
                b.iter(|| {
                    pool.parallel_for(2 * threads, 1, |r| {
                        black_box(r);
                    })
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_pool, bench_products, bench_decode_step);
criterion_main!(benches);
