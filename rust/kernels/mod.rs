//! Matrix-vector products and transformer ops.
pub mod attention;
pub mod ggml_f32;
pub mod matmul;
pub mod ops;
pub mod resident;
