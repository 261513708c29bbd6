//! Greedy decoding that prints, per step, the argmax, an FNV-1a hash of every logit's bits
//! and the first logits, in the format of `tests/scripts/arm_kernels/logits_trace.c` (the
//! same loop on llama.cpp), so two engines or two builds can be compared line by line:
//! `cargo run --release --example logits_trace -- MODEL THREADS DECODED ID,ID,...`.
//! The prompt goes through `Model::prefill` in one call; `SAMPLER_SDK_SIMD` picks the kernels.

use std::path::Path;

use sampler_sdk::model::trace::logits_fingerprint;
use sampler_sdk::model::Model;

fn report(step: usize, logits: &[f32]) -> u32 {
    let (best, hash) = logits_fingerprint(logits);
    let head: Vec<String> = logits.iter().take(4).map(|v| format!("{v:.9e}")).collect();
    println!(
        "step {step} argmax {best} hash {hash:016x} head {}",
        head.join(" ")
    );
    best
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: logits_trace MODEL THREADS DECODED ID,ID,...";
    let path = Path::new(args.get(1).ok_or(usage)?);
    let threads: usize = args.get(2).ok_or(usage)?.parse()?;
    let decoded: usize = args.get(3).ok_or(usage)?.parse()?;
    let prompt = args
        .get(4)
        .ok_or(usage)?
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<u32>, _>>()?;

    let model = Model::load_with_threads(path, threads)?;
    let mut seq = model.new_sequence(512);
    let logits = model.prefill(&mut seq, &prompt, 1)?;
    let mut next = report(0, &logits);
    for step in 1..=decoded {
        let logits = model.forward(&mut seq, &[next], 1)?;
        next = report(step, &logits);
    }
    Ok(())
}
