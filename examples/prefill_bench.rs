//! Prefill and decode timing of a GGUF model: `cargo run --profile dev-opt --example
//! prefill_bench -- MODEL.gguf [threads] [repeats] [decoded]`. Prefill feeds 255 tokens through
//! `Model::prefill` (the decode loop's chunks, placed in one llama.cpp batch); decode feeds `decoded` (default 32) single
//! tokens after it. Prints the median of `repeats` runs, a hash of every logit's bits and
//! the tensor types of the file; `PREFILL_ALL_LOGITS=1` asks for every prompt token's logits,
//! `PREFILL_KV_TYPE=f32` an f32 KV cache.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use sampler_sdk::gguf::file::GgufFile;
use sampler_sdk::kv_cache::KvType;
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
    let decoded: u32 = args.get(4).map_or(Ok(32), |s| s.parse())?;
    // Every prompt token's logits (the output projection over whole chunks), for checking
    // bit-identity of more outputs rather than for timing.
    let all_logits = std::env::var_os("PREFILL_ALL_LOGITS").is_some();

    let mut types: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in GgufFile::open(path)?.tensors() {
        types
            .entry(format!("{:?}", t.ggml_type))
            .or_default()
            .push(t.name.clone());
    }
    let types: BTreeMap<_, _> = types
        .into_iter()
        .map(|(ty, names)| {
            let mut kinds: Vec<String> = names
                .iter()
                .map(|n| n.rsplit('.').nth(1).unwrap_or(n).to_string())
                .collect();
            kinds.sort();
            kinds.dedup();
            (ty, (names.len(), kinds))
        })
        .collect();
    println!("tensor types: {types:?}");

    let kv_type = match std::env::var("PREFILL_KV_TYPE") {
        Ok(name) => KvType::from_name(&name)?,
        Err(_) => KvType::default(),
    };
    let model = Model::load_with_threads(path, threads)?.with_kv_type(kv_type);
    let prompt: Vec<u32> = (0..255u32).map(|i| 100 + (i * 37) % 5000).collect();
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    // FNV-1a over the bits of every logit: equal hashes mean bit-identical outputs.
    let mut checksum = 0xcbf2_9ce4_8422_2325u64;
    let mut hash = |logits: &[f32]| {
        for v in logits {
            checksum = (checksum ^ u64::from(v.to_bits())).wrapping_mul(0x100_0000_01b3);
        }
    };
    for _ in 0..repeats {
        let mut seq = model.new_sequence(512);
        let start = Instant::now();
        let logits = model.prefill(&mut seq, &prompt, if all_logits { prompt.len() } else { 1 })?;
        hash(&logits);
        prefill.push(prompt.len() as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        for i in 0..decoded {
            let logits = model.forward(&mut seq, &[200 + i], 1)?;
            hash(&logits);
        }
        decode.push(f64::from(decoded) / start.elapsed().as_secs_f64());
    }
    println!(
        "threads {threads}: prefill {:.1} tok/s, decode {:.1} tok/s (median of {repeats}; logits hash {checksum:016x})",
        median(prefill),
        median(decode)
    );
    Ok(())
}
