//! Intermediate tensors of the forward pass written to files, to find the first operation
//! where a result parts from llama.cpp's (`tests/scripts/compare_with_llama_cpp.py` dumps
//! llama.cpp's tensors through its eval callback and compares them with these).
//!
//! Off unless `SAMPLER_SDK_TRACE_DIR` names a directory when the first forward pass runs;
//! then every call overwrites `<dir>/<name>-<layer>.f32` (raw little-endian f32, rows of
//! the call's tokens end to end) under the names llama.cpp's graph gives the same values.
//! Off, a trace point costs one load of a flag.

use std::sync::OnceLock;

/// Names the directory tensors are written to while tracing is on.
pub const TRACE_DIR_ENV: &str = "SAMPLER_SDK_TRACE_DIR";

fn directory() -> Option<&'static str> {
    static DIR: OnceLock<Option<String>> = OnceLock::new();
    DIR.get_or_init(|| std::env::var(TRACE_DIR_ENV).ok())
        .as_deref()
}

/// Writes `data` as tensor `name` of `layer` (or of the whole model) when tracing is on.
pub fn dump(name: &str, layer: Option<usize>, data: &[f32]) {
    let Some(dir) = directory() else {
        return;
    };
    let file = match layer {
        Some(l) => format!("{dir}/{name}-{l}.f32"),
        None => format!("{dir}/{name}.f32"),
    };
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    if let Err(e) = std::fs::write(&file, bytes) {
        // A diagnostic aid must not fail the forward pass it observes.
        eprintln!("sampler-sdk: cannot write trace {file}: {e}");
    }
}

/// The greedy choice (argmax, lowest id on ties) and an FNV-1a hash of the bits of every
/// logit: the per-step fingerprint `examples/logits_trace.rs` prints and the Arm
/// generation tests compare with llama.cpp's (`tests/scripts/arm_kernels/logits_trace.c`
/// computes the same).
pub fn logits_fingerprint(logits: &[f32]) -> (u32, u64) {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        hash = (hash ^ u64::from(v.to_bits())).wrapping_mul(0x100_0000_01b3);
        if *v > logits[best] {
            best = i;
        }
    }
    (best as u32, hash)
}
