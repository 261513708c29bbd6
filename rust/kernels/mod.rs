//! Matrix-vector products and transformer ops.
