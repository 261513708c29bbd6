//! The real models the unit tests read, from the model cache (`crate::model_cache`), which
//! the README's test command fills with `python -m sampler_sdk models pull` before `cargo
//! test`. A test whose model is absent says so and passes without checking anything.

use std::path::PathBuf;

/// `(registry name, file name)` of the default model, SmolLM2-135M-Instruct Q4_1.
pub const SMOLLM2: (&str, &str) = ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf");
/// Gemma 3 270M Q4_K_M.
pub const GEMMA3: (&str, &str) = ("gemma3-270m", "gemma-3-270m-q4_k_m.gguf");

/// The cached file of `model`, or `None` (with a note on stderr) when it is not pulled.
pub fn path((name, file): (&str, &str)) -> Option<PathBuf> {
    let found = crate::model_cache::cached_model(name, file);
    if found.is_none() {
        eprintln!("skipped: model {name} is not pulled (python -m sampler_sdk models pull {name})");
    }
    found
}
