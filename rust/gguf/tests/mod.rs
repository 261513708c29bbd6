//! Tests of the whole reader: valid files round-trip, every malformation is an error that
//! names the problem, random damage never panics, and the real models (when present) parse.

mod malformed;
mod malformed_files;
mod properties;
mod real_models;
mod valid;
pub mod writer;
