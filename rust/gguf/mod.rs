//! GGUF files: a bounded, validating reader over mmap.
//!
//! - [`reader`]: little-endian cursor; every read checked against the bytes that remain;
//! - [`metadata`]: typed values and getters naming the missing or mistyped key;
//! - [`tensor_info`]: tensor descriptors with checked size arithmetic;
//! - [`file`]: [`GgufFile`], which owns the bytes and validates the whole layout at open.
//!
//! Everything a file declares (counts, lengths, dims, types, offsets) is validated before
//! it is used, so a truncated or hostile file yields an error, never a panic.

pub mod file;
pub mod metadata;
pub(crate) mod reader;
pub mod tensor_info;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

pub use file::GgufFile;
pub use metadata::{Metadata, MetadataArray, MetadataValue};
pub use tensor_info::TensorInfo;
