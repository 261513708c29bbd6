//! Where the unit tests find the real models: the model cache of the Python registry
//! (`$SAMPLER_SDK_CACHE`, else `$XDG_CACHE_HOME/sampler-sdk`, else `~/.cache/sampler-sdk`),
//! which the README's test command fills with `sampler-sdk models pull` before `cargo
//! test`. A test whose model is absent says so and passes without checking anything.

use std::path::PathBuf;

/// `(registry name, file name)` of the default model, SmolLM2-135M-Instruct Q4_1.
pub const SMOLLM2: (&str, &str) = ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf");
/// Gemma 3 270M Q4_K_M.
pub const GEMMA3: (&str, &str) = ("gemma3-270m", "gemma-3-270m-q4_k_m.gguf");

fn cache_dir() -> Option<PathBuf> {
    let non_empty = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty());
    if let Some(explicit) = non_empty("SAMPLER_SDK_CACHE") {
        return Some(PathBuf::from(explicit));
    }
    let base = non_empty("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| non_empty("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("sampler-sdk"))
}

/// The cached file of `model`, or `None` (with a note on stderr) when it is not pulled.
pub fn path((name, file): (&str, &str)) -> Option<PathBuf> {
    let found = cache_dir()
        .map(|dir| dir.join("models").join(name).join(file))
        .filter(|p| p.exists());
    if found.is_none() {
        eprintln!("skipped: model {name} is not pulled (sampler-sdk models pull {name})");
    }
    found
}
