//! sampler-sdk's engine: runs raw language models stored as GGUF files on the CPU.
//!
//! Layers, each depending only on the ones below it:
//! - [`gguf`]: a bounded, validating reader of GGUF files over mmap;
//! - [`quant`]: ggml's tensor block formats, dequantisation and dot products;
//! - [`kernels`]: matrix-vector products and the small ops of a transformer;
//! - [`tokenizer`]: byte-level BPE and SentencePiece tokenizers built from GGUF metadata;
//! - [`model`]: hyperparameters, weights and the forward pass with its KV cache;
//! - [`threads`]: the persistent worker pool the kernels split their work over.
//!
//! Nothing here names Python; the `python` feature adds the one binding module.

pub mod batching;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod kv_cache;
pub mod model;
pub mod model_cache;
pub mod quant;
pub mod sampling;
pub mod text;
pub mod threads;
pub mod tokenizer;

#[cfg(test)]
mod test_models;

#[cfg(feature = "python")]
mod python;

pub use error::{EngineError, Result};
