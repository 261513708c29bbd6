//! Matrix-vector products and transformer ops.
pub mod matmul;
pub mod ops;
