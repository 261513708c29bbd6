//! Prefill and decode timing of a GGUF model: `cargo run --profile dev-opt --example
//! prefill_bench -- MODEL.gguf [threads] [repeats]`. Prefill feeds 255 tokens in chunks of
//! 64 (the decode loop's prefill chunk); decode feeds 32 single tokens after it. Prints the
//! median of `repeats` runs and the tensor types of the file.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use sampler_sdk::gguf::file::GgufFile;
use sampler_sdk::model::Model;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = Path::new(
        args.get(1)
            .ok_or("usage: prefill_bench MODEL [threads] [repeats]")?,
    );
    let threads: usize = args.get(2).map_or(Ok(1), |s| s.parse())?;
    let repeats: usize = args.get(3).map_or(Ok(5), |s| s.parse())?;

    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for t in GgufFile::open(path)?.tensors() {
        *types.entry(format!("{:?}", t.ggml_type)).or_default() += 1;
    }
    println!("tensor types: {types:?}");

    let model = Model::load_with_threads(path, threads)?;
    let prompt: Vec<u32> = (0..255u32).map(|i| 100 + (i * 37) % 5000).collect();
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    let mut checksum = 0f32;
    for _ in 0..repeats {
        let mut seq = model.new_sequence(512);
        let start = Instant::now();
        for chunk in prompt.chunks(64) {
            let logits = model.forward(&mut seq, chunk, 1)?;
            checksum += logits[0];
        }
        prefill.push(prompt.len() as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        for i in 0..32u32 {
            let logits = model.forward(&mut seq, &[200 + i], 1)?;
            checksum += logits[0];
        }
        decode.push(32.0 / start.elapsed().as_secs_f64());
    }
    println!(
        "threads {threads}: prefill {:.1} tok/s, decode {:.1} tok/s (median of {repeats}; checksum {checksum:e})",
        median(prefill),
        median(decode)
    );
    Ok(())
}
