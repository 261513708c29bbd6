//! Matrix-vector products and transformer ops.
pub mod attention;
pub mod matmul;
pub mod ops;
