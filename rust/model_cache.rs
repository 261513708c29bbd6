//! Where sampler-sdk keeps downloaded models: the directory the Python registry fills
//! (`python -m sampler_sdk models pull NAME` puts `models/NAME/FILE` there), for Rust code
//! that wants the same files: benchmarks, tests, embedders sharing one cache.

use std::path::PathBuf;

/// `$SAMPLER_SDK_CACHE`, else `$XDG_CACHE_HOME/sampler-sdk`, else `~/.cache/sampler-sdk`;
/// `None` when none of those variables is set.
pub fn cache_dir() -> Option<PathBuf> {
    let set = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty());
    if let Some(explicit) = set("SAMPLER_SDK_CACHE") {
        return Some(PathBuf::from(explicit));
    }
    let base = set("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| set("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("sampler-sdk"))
}

/// The cached file `file` of registered model `name`, if it has been pulled.
pub fn cached_model(name: &str, file: &str) -> Option<PathBuf> {
    cache_dir()
        .map(|dir| dir.join("models").join(name).join(file))
        .filter(|p| p.exists())
}
