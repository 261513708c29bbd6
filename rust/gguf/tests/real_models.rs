//! The two real models, when pulled into the model cache (see `crate::test_models`).

use std::time::{Duration, Instant};

use crate::gguf::GgufFile;
use crate::quant::GgmlType;

use crate::test_models::{self, GEMMA3, SMOLLM2};

/// Opening only parses the header, metadata and tensor table; the 262k-string Gemma
/// vocabulary takes tens of milliseconds. The bound is loose for a busy shared machine.
const OPEN_TIME_LIMIT: Duration = Duration::from_secs(2);

fn open_if_present(model: (&str, &str)) -> Option<GgufFile> {
    let path = test_models::path(model)?;
    let path = path.as_path();
    let started = Instant::now();
    let file = GgufFile::open(path).unwrap();
    let elapsed = started.elapsed();
    eprintln!("opened {} in {elapsed:?}", path.display());
    assert!(
        elapsed < OPEN_TIME_LIMIT,
        "opening {} took {elapsed:?}",
        path.display()
    );
    Some(file)
}

fn check_every_tensor_in_bounds(file: &GgufFile) {
    for t in file.tensors() {
        assert_eq!(file.tensor_data(t).len() as u64, t.size_bytes, "{}", t.name);
        assert_eq!(t.offset % file.alignment(), 0, "{}", t.name);
        assert_eq!(file.tensor(&t.name), Some(t));
    }
}

#[test]
fn smollm2_known_facts() {
    let Some(file) = open_if_present(SMOLLM2) else {
        return;
    };
    assert_eq!(file.version(), 3);
    assert_eq!(file.tensors().len(), 272);
    let md = file.metadata();
    assert_eq!(md.require_str("general.architecture").unwrap(), "llama");
    assert_eq!(md.require_u32("llama.block_count").unwrap(), 30);
    assert_eq!(md.require_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(
        md.get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap()
            .len(),
        49152
    );
    let embd = file.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);
    assert_eq!(embd.dims, [576, 49152]);
    assert_eq!(embd.row_len(), 576);
    assert_eq!(embd.n_rows(), 49152);
    check_every_tensor_in_bounds(&file);
}

#[test]
fn gemma3_known_facts() {
    let Some(file) = open_if_present(GEMMA3) else {
        return;
    };
    assert_eq!(file.tensors().len(), 236);
    let md = file.metadata();
    assert_eq!(md.require_str("general.architecture").unwrap(), "gemma3");
    assert_eq!(md.require_str("tokenizer.ggml.model").unwrap(), "llama");
    let tokens = md.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap();
    assert_eq!(tokens.len(), 262_144);
    assert_eq!(
        md.get_f32_array("tokenizer.ggml.scores")
            .unwrap()
            .unwrap()
            .len(),
        262_144
    );
    assert_eq!(
        md.get_u32_array("tokenizer.ggml.token_type")
            .unwrap()
            .unwrap()
            .len(),
        262_144
    );
    let types: std::collections::HashSet<GgmlType> =
        file.tensors().iter().map(|t| t.ggml_type).collect();
    for expected in [
        GgmlType::F32,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
        GgmlType::Q5_0,
    ] {
        assert!(
            types.contains(&expected),
            "no {expected} tensor in {types:?}"
        );
    }
    check_every_tensor_in_bounds(&file);
}
