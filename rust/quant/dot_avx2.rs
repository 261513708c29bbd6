//! AVX2 + FMA + F16C twins of the `dot_scalar` kernels and of the activation quantisers.
//!
//! Each weight type has a single-row kernel (the [`DotFn`]) and a four-row kernel (the
//! [`Dot4Fn`]). The four-row kernels of the 32-element formats load each activation block
//! once for four rows: Q8_0's is the single-row function instantiated for four rows (same
//! per-row operations), the 4/5-bit formats pack two rows per register and keep the same
//! eight lanes per row as their single-row kernel; Q4_K's shares the activation block's
//! loads and the folding of its integer sums between rows. For the other K-quants and the
//! float formats four single-row calls are faster (see `RowKernel::FUSED_FOUR`).
//! Either way a four-row result has exactly the bits of a single-row call (tested), so a
//! matmul may mix them freely and its output does not depend on how rows are split.
//!
//! Rows-by-tokens kernels ([`DotTokensFn`], prefill and batched decoding) dot four rows with
//! a group of tokens: each weight block is loaded and unpacked (nibbles, high bits, scales)
//! once for the group, and every (row, token) pair then goes through the single-row kernel's
//! operations in its order, so each result again has the single-row bits (tested). The
//! 4/5-bit formats keep the two-rows-per-register lanes; Q8_0 and the K-quants take one row
//! at a time against the group. Types without one make a four-row call per token.
//!
//! Batch kernels ([`DotBatchFn`]) are the rows-by-tokens kernels with, for Q4_K and Q6_K,
//! the other arithmetic llama.cpp uses for some tokens of a batch (Q4_K: the gemm of its
//! repacked kernels, see the Q4_K section; Q6_K: its tiled kernel, see
//! `q6_k_tokens_body`).
//!
//! llama.cpp: the 32-element formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), Q6_K and the
//! Q8_0/Q8_1 activation quantisers do the f32 operations of ggml's AVX2 code in its order
//! (`ggml_vec_dot_*`), so their results have the bits of llama.cpp's x86 builds for one
//! token; Q4_K does those of its repacked kernels (`ggml_gemv_q4_K_8x8_q8_K`; see the
//! Q4_K section). The batch kernels of Q4_K and Q6_K also have the bits of llama.cpp's
//! batched kernels. `ggml_x86_tests` checks all of these against transcriptions of that
//! code. The Q2_K, Q3_K, Q5_K, Q8_K and float kernels do not have llama.cpp's bits, nor
//! do the Q4_0 kernels for matrices whose row count is a multiple of 8 (llama.cpp repacks
//! those, `q4_0_8x8_q8_0`); see [`DotBatchFn`] for batches.
//!
//! Accuracy: within a block the integer sum of products is exact, as in the scalar kernels;
//! only the f32 arithmetic after it differs. The scalar kernels add one f32 term per block
//! (per lane for K-quants) in element order; these add four or eight lanes per block and
//! sum the lanes at the end (Q4_K: one term per super-block, the minimum's apart). Each is
//! within `(terms + 8) * 2^-24 * M` of the exact sum of the block terms, where `terms` is
//! the number of blocks (or `n / 8` for the float formats, whose scalar kernels sum in f64)
//! and `M = sum |w_i| |x_i|` plus the magnitudes of the `min` parts; so they differ by at
//! most `2 * (terms + 8) * 2^-24 * M`. That is the bound `kernel_tests` checks; the largest
//! difference seen on random rows is about a tenth of it. Activation quantisation is
//! bit-identical to the scalar quantisers.
//!
//! Memory is read through raw pointers, but only below `blocks * block_size` for the
//! block count [`common_blocks`] takes from the slice lengths: a short row or activation
//! gives a wrong number, never a read past the slice, exactly as in `dot_scalar`.

#![allow(clippy::needless_range_loop)] // `for r in 0..R` indexes several per-row arrays.

use std::arch::x86_64::*;

use super::activation::{activation_type, QuantizedActivations};
use super::dispatch::{batch_one_by_one, tokens_one_by_one, Avx2Checked, FourRows, Kernels};
use super::dot::{Dot4Fn, DotBatchFn, DotFn, DotTokensFn};
use super::GgmlType;

// ---- Entry points ---------------------------------------------------------------------

/// The single-row and four-row kernels of weight type `TY`. `four` must return exactly the
/// bits of four `one` calls when all rows hold the same number of blocks.
pub(super) trait RowKernel {
    const TY: GgmlType;
    /// The proof of CPU support [`set`] demands before it installs the kernel.
    type Proof: Copy;
    /// Whether `four` beats four `one` calls. It does not for the K-quant and float
    /// kernels: their per-row state is large, and sharing a 256-element activation block
    /// (already in L1) saves little next to the register spills of four rows.
    const FUSED_FOUR: bool = true;
    /// # Safety
    /// The CPU must support the instruction set of the module that installs the kernel.
    unsafe fn one(row: &[u8], act: &[u8], n: usize) -> f32;
    /// # Safety
    /// As for [`Self::one`].
    unsafe fn four(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4];
}

/// Whole blocks of `ty` that `n` elements, every row and the activations all contain.
#[inline(always)]
pub(super) fn common_blocks<const R: usize>(
    ty: GgmlType,
    rows: &[&[u8]; R],
    act: &[u8],
    n: usize,
) -> usize {
    let mut blocks = (n / ty.block_size()).min(act.len() / activation_type(ty).type_size());
    for row in rows {
        blocks = blocks.min(row.len() / ty.type_size());
    }
    blocks
}

/// Safe [`DotFn`], [`Dot4Fn`] and (a four-row call per token) [`DotTokensFn`] and
/// [`DotBatchFn`] for `K`, given the proof that the CPU runs `K`'s instructions.
fn entry_points<K: RowKernel>(_proof: K::Proof) -> (DotFn, Dot4Fn, DotTokensFn, DotBatchFn) {
    fn single<K: RowKernel>(row: &[u8], act: &[u8], n: usize) -> f32 {
        // SAFETY: these functions only leave `entry_points`, which demands a `K::Proof`,
        // and a proof only exists once the CPU has been found to run `K`'s instructions.
        unsafe { K::one(row, act, n) }
    }
    fn four<K: RowKernel>(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4] {
        let blocks = common_blocks(K::TY, &[rows[0]], act, n);
        if K::FUSED_FOUR
            && rows
                .iter()
                .all(|row| common_blocks(K::TY, &[row], act, n) == blocks)
        {
            // SAFETY: as in `single`.
            unsafe { K::four(rows, act, n) }
        } else {
            // Also for rows of different lengths: each row gets its own block count.
            rows.map(|row| single::<K>(row, act, n))
        }
    }
    struct Rows<K>(std::marker::PhantomData<K>);
    impl<K: RowKernel> FourRows for Rows<K> {
        fn four(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4] {
            four::<K>(rows, act, n)
        }
    }
    (
        single::<K>,
        four::<K>,
        tokens_one_by_one::<Rows<K>>,
        batch_one_by_one::<Rows<K>>,
    )
}

/// Installs `K` in `table`.
pub(super) fn set<K: RowKernel>(table: &mut Kernels, proof: K::Proof) {
    let (single, four, tokens, batch) = entry_points::<K>(proof);
    table.set_dot(K::TY, single, four, tokens, batch);
}

/// A rows-by-tokens kernel: four rows against a group of `T` tokens, sharing the unpacking
/// of each weight block among the tokens.
pub(super) trait TokensKernel: RowKernel {
    /// Whether groups of eight tokens beat two groups of four (they need twice the
    /// accumulators; only the AVX-512 level has the registers).
    const WIDE: bool = false;
    /// Whether groups are at most two tokens (kernels whose accumulators for four tokens
    /// would not fit the registers).
    const NARROW: bool = false;
    /// f32 block scales per activation block the kernel reads from `block_scales`.
    const SCALES: usize = 0;
    /// Offset shares per activation block the kernel reads from `neg_offset_sums`.
    const OFFSET_SUMS: usize = 0;
    /// # Safety
    /// As for [`RowKernel::one`]; besides, every row and every activation row holds the
    /// same number of whole blocks (`common_blocks` of any one pair, for `acts[0].len()`
    /// elements), and every activation row has `SCALES` block scales and `OFFSET_SUMS`
    /// offset shares per block.
    unsafe fn group<const T: usize>(
        rows: [&[u8]; 4],
        acts: [&QuantizedActivations; T],
    ) -> [[f32; 4]; T];
    /// How many of the first tokens of a batch of `batch` llama.cpp multiplies with other
    /// float arithmetic than a single token, which [`Self::group_batched`] reproduces (for
    /// `Kernels::dot_batch`); 0 where it does not, or where these kernels do not reproduce it.
    fn batched_tokens(_batch: usize) -> usize {
        0
    }
    /// [`Self::group`] with llama.cpp's batched arithmetic (`T` is 4 or 8).
    /// # Safety
    /// As for [`Self::group`].
    unsafe fn group_batched<const T: usize>(
        rows: [&[u8]; 4],
        acts: [&QuantizedActivations; T],
    ) -> [[f32; 4]; T] {
        Self::group::<T>(rows, acts)
    }
}

/// Installs `K`'s rows-by-tokens kernel in `table` (after [`set`] installed its row kernels),
/// and its batch kernel.
pub(super) fn set_tokens<K: TokensKernel>(table: &mut Kernels, _proof: K::Proof) {
    table.set_dot_tokens(K::TY, run::<K>, run_batch::<K>);
}

/// `K`'s row kernel, for rows and activations of different lengths.
fn single<K: RowKernel>(row: &[u8], act: &[u8], n: usize) -> f32 {
    // SAFETY: only reachable through `set_tokens`, which demands a `K::Proof`.
    unsafe { K::one(row, act, n) }
}

/// Whether every row and every activation row hold the same number of whole blocks, and
/// the activations the block scales and offset shares `K` reads (the group kernels'
/// precondition). Otherwise `out` gets single-row calls and the answer is no.
fn uniform_or_single<K: TokensKernel>(
    rows: [&[u8]; 4],
    acts: &[QuantizedActivations],
    out: &mut [[f32; 4]],
) -> bool {
    let Some(first) = acts.first() else {
        return false;
    };
    let n = first.len();
    let blocks = common_blocks(K::TY, &[rows[0]], first.bytes(), n);
    // One pair's block count bounds them all when every row agrees with the first
    // activation row and every activation row with the first row.
    let uniform = rows
        .iter()
        .all(|row| common_blocks(K::TY, &[row], first.bytes(), n) == blocks)
        && acts.iter().all(|act| {
            common_blocks(K::TY, &[rows[0]], act.bytes(), n) == blocks
                && act.block_scales().len() >= blocks * K::SCALES
                && act.neg_offset_sums().len() >= blocks * K::OFFSET_SUMS
        });
    if !uniform {
        for (act, o) in acts.iter().zip(out) {
            *o = rows.map(|row| single::<K>(row, act.bytes(), n));
        }
    }
    uniform
}

/// `K`'s rows-by-tokens kernel over any number of tokens, in groups of up to eight.
fn run<K: TokensKernel>(rows: [&[u8]; 4], acts: &[QuantizedActivations], out: &mut [[f32; 4]]) {
    if uniform_or_single::<K>(rows, acts, out) {
        // SAFETY: `K::Proof` was presented to `set_tokens`; blocks and scales are uniform.
        unsafe { run_groups::<K>(rows, acts, out) }
    }
}

/// `K`'s batch kernel ([`DotBatchFn`]): the tokens among the first `K::batched_tokens(batch)`
/// of the batch through [`TokensKernel::group_batched`], in groups of four (eight where
/// `K::WIDE`; a last partial group is filled up with copies of its last token), the others
/// as in [`run`].
fn run_batch<K: TokensKernel>(
    rows: [&[u8]; 4],
    acts: &[QuantizedActivations],
    first: usize,
    batch: usize,
    out: &mut [[f32; 4]],
) {
    if !uniform_or_single::<K>(rows, acts, out) {
        return;
    }
    let batched = K::batched_tokens(batch)
        .saturating_sub(first)
        .min(acts.len());
    let mut done = 0;
    while done < batched {
        let (a, o) = (&acts[done..batched], &mut out[done..batched]);
        // SAFETY: as in `run`.
        done += unsafe {
            if a.len() >= 8 && K::WIDE {
                let a = [&a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &a[7]];
                o[..8].copy_from_slice(&K::group_batched::<8>(rows, a));
                8
            } else {
                let last = a.len().min(4) - 1;
                let a = [0, 1, 2, 3].map(|i| &a[i.min(last)]);
                o[..=last].copy_from_slice(&K::group_batched::<4>(rows, a)[..=last]);
                last + 1
            }
        };
    }
    // SAFETY: as in `run`.
    unsafe { run_groups::<K>(rows, &acts[batched..], &mut out[batched..]) }
}

/// [`TokensKernel::group`] over `acts` in groups of up to eight.
/// # Safety
/// As for [`TokensKernel::group`].
unsafe fn run_groups<K: TokensKernel>(
    rows: [&[u8]; 4],
    acts: &[QuantizedActivations],
    out: &mut [[f32; 4]],
) {
    let mut done = 0;
    while done < acts.len() {
        let (a, o) = (&acts[done..], &mut out[done..]);
        done += match a.len() {
            8.. if K::WIDE => {
                let a = [&a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &a[7]];
                o[..8].copy_from_slice(&K::group::<8>(rows, a));
                8
            }
            4.. if !K::NARROW => {
                o[..4].copy_from_slice(&K::group::<4>(rows, [&a[0], &a[1], &a[2], &a[3]]));
                4
            }
            3 if !K::NARROW => {
                o[..3].copy_from_slice(&K::group::<3>(rows, [&a[0], &a[1], &a[2]]));
                3
            }
            2.. => {
                o[..2].copy_from_slice(&K::group::<2>(rows, [&a[0], &a[1]]));
                2
            }
            _ => {
                o[..1].copy_from_slice(&K::group::<1>(rows, [&a[0]]));
                1
            }
        };
    }
}

/// Declares a [`RowKernel`] named `$name` for `$ty` (requiring the `Proof` type in scope
/// where it is invoked), either from one `#[target_feature]`
/// function generic over the row count, or from separate single- and four-row functions.
macro_rules! row_kernel {
    ($name:ident, $ty:expr, $f:ident) => {
        pub(super) struct $name;
        impl RowKernel for $name {
            const TY: GgmlType = $ty;
            type Proof = Proof;
            unsafe fn one(row: &[u8], act: &[u8], n: usize) -> f32 {
                $f::<1>([row], act, n)[0]
            }
            unsafe fn four(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4] {
                $f::<4>(rows, act, n)
            }
        }
    };
    ($name:ident, $ty:expr, $f:ident, single_rows) => {
        pub(super) struct $name;
        impl RowKernel for $name {
            const TY: GgmlType = $ty;
            type Proof = Proof;
            const FUSED_FOUR: bool = false;
            unsafe fn one(row: &[u8], act: &[u8], n: usize) -> f32 {
                $f::<1>([row], act, n)[0]
            }
            unsafe fn four(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4] {
                rows.map(|row| $f::<1>([row], act, n)[0])
            }
        }
    };
    ($name:ident, $ty:expr, $one:expr, $four:expr) => {
        pub(super) struct $name;
        impl RowKernel for $name {
            const TY: GgmlType = $ty;
            type Proof = Proof;
            unsafe fn one(row: &[u8], act: &[u8], n: usize) -> f32 {
                $one(row, act, n)
            }
            unsafe fn four(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4] {
                $four(rows, act, n)
            }
        }
    };
}
pub(super) use row_kernel;

/// Implements [`TokensKernel`] for the row kernel `$name` with the group function `$group`
/// (generic over the token count, after the format type when one is given; with `batched`,
/// also over whether it does llama.cpp's batched arithmetic, for the first
/// `$batched(batch)` tokens of a batch).
macro_rules! tokens_kernel {
    ($name:ident, batched $group:ident, $batched:expr $(, wide $wide:literal)?) => {
        impl TokensKernel for $name {
            $(const WIDE: bool = $wide;)?
            fn batched_tokens(batch: usize) -> usize {
                $batched(batch)
            }
            unsafe fn group<const T: usize>(
                rows: [&[u8]; 4],
                acts: [&QuantizedActivations; T],
            ) -> [[f32; 4]; T] {
                $group::<T, false>(rows, acts.map(QuantizedActivations::bytes), acts[0].len())
            }
            unsafe fn group_batched<const T: usize>(
                rows: [&[u8]; 4],
                acts: [&QuantizedActivations; T],
            ) -> [[f32; 4]; T] {
                $group::<T, true>(rows, acts.map(QuantizedActivations::bytes), acts[0].len())
            }
        }
    };
    ($name:ident, $group:ident $(, wide $wide:literal)? $(, narrow $narrow:literal)?) => {
        impl TokensKernel for $name {
            $(const WIDE: bool = $wide;)?
            $(const NARROW: bool = $narrow;)?
            unsafe fn group<const T: usize>(
                rows: [&[u8]; 4],
                acts: [&QuantizedActivations; T],
            ) -> [[f32; 4]; T] {
                $group::<T>(rows, acts.map(QuantizedActivations::bytes), acts[0].len())
            }
        }
    };
    ($name:ident, $group:ident, scales $scales:literal $(, $wide:ident)?) => {
        impl TokensKernel for $name {
            $(const WIDE: bool = $wide;)?
            const SCALES: usize = $scales;
            unsafe fn group<const T: usize>(
                rows: [&[u8]; 4],
                acts: [&QuantizedActivations; T],
            ) -> [[f32; 4]; T] {
                $group::<T>(rows, acts)
            }
        }
    };
    ($name:ident, $group:ident, $format:ty $(, $wide:ident)?) => {
        impl TokensKernel for $name {
            $(const WIDE: bool = $wide;)?
            const SCALES: usize = if <$format as SmallFormat>::HAS_MIN { 2 } else { 1 };
            const OFFSET_SUMS: usize = if <$format as SmallFormat>::OFFSET != 0 { 16 } else { 0 };
            unsafe fn group<const T: usize>(
                rows: [&[u8]; 4],
                acts: [&QuantizedActivations; T],
            ) -> [[f32; 4]; T] {
                $group::<$format, T>(rows, acts)
            }
        }
    };
}
pub(super) use tokens_kernel;

row_kernel!(
    Q4_0,
    GgmlType::Q4_0,
    small_one::<Q4_0Format>,
    small_four::<Q4_0Format>
);
row_kernel!(
    Q4_1,
    GgmlType::Q4_1,
    small_one::<Q4_1Format>,
    small_four::<Q4_1Format>
);
row_kernel!(
    Q5_0,
    GgmlType::Q5_0,
    small_one::<Q5_0Format>,
    small_four::<Q5_0Format>
);
row_kernel!(
    Q5_1,
    GgmlType::Q5_1,
    small_one::<Q5_1Format>,
    small_four::<Q5_1Format>
);
row_kernel!(Q8_0, GgmlType::Q8_0, q8_0_q8_0);
row_kernel!(Q8_1, GgmlType::Q8_1, q8_1_q8_1, single_rows);
row_kernel!(Q2K, GgmlType::Q2K, q2_k_q8_k, single_rows);
row_kernel!(Q3K, GgmlType::Q3K, q3_k_q8_k, single_rows);
row_kernel!(Q4K, GgmlType::Q4K, q4_k_q8_k);
row_kernel!(Q5K, GgmlType::Q5K, q5_k_q8_k, single_rows);
row_kernel!(Q6K, GgmlType::Q6K, q6_k_q8_k, single_rows);
row_kernel!(Q8K, GgmlType::Q8K, q8_k_q8_k, single_rows);
row_kernel!(F32, GgmlType::F32, f32_f32, single_rows);
row_kernel!(
    F16,
    GgmlType::F16,
    super::dot_f16::vec_dot_avx2,
    super::dot_f16::vec_dot4_avx2
);
row_kernel!(BF16, GgmlType::BF16, bf16_bf16, single_rows);
tokens_kernel!(Q4_0, small_tokens, Q4_0Format);
tokens_kernel!(Q4_1, small_tokens, Q4_1Format);
tokens_kernel!(Q5_0, small_tokens, Q5_0Format);
tokens_kernel!(Q5_1, small_tokens, Q5_1Format);
tokens_kernel!(Q8_0, q8_0_tokens, scales 1);
tokens_kernel!(Q4K, batched q4_k_tokens, q4_k_gemm_tokens);
tokens_kernel!(Q5K, q5_k_tokens);
tokens_kernel!(Q6K, batched q6_k_tokens, q6_k_tiled_tokens);
tokens_kernel!(F16, batched f16_tokens, super::dot_f16::tiny_blas_tokens);
tokens_kernel!(BF16, bf16_tokens, narrow true);

/// Replaces the scalar kernels of `table` with the AVX2 ones.
pub(super) fn install(table: &mut Kernels, proof: Avx2Checked) {
    set::<Q4_0>(table, proof);
    set::<Q4_1>(table, proof);
    set::<Q5_0>(table, proof);
    set::<Q5_1>(table, proof);
    set::<Q8_0>(table, proof);
    set::<Q8_1>(table, proof);
    set::<Q2K>(table, proof);
    set::<Q3K>(table, proof);
    set::<Q4K>(table, proof);
    set::<Q5K>(table, proof);
    set::<Q6K>(table, proof);
    set::<Q8K>(table, proof);
    set::<F32>(table, proof);
    set::<F16>(table, proof);
    set::<BF16>(table, proof);
    set_tokens::<Q4_0>(table, proof);
    set_tokens::<Q4_1>(table, proof);
    set_tokens::<Q5_0>(table, proof);
    set_tokens::<Q5_1>(table, proof);
    set_tokens::<Q8_0>(table, proof);
    set_tokens::<Q4K>(table, proof);
    set_tokens::<Q5K>(table, proof);
    set_tokens::<Q6K>(table, proof);
    set_tokens::<F16>(table, proof);
    set_tokens::<BF16>(table, proof);
    table.quantize_q8_0 = quantize_q8_0;
    table.quantize_q8_1 = quantize_q8_1;
    table.quantize_q8_k = quantize_q8_k;
    table.convert_f16 = convert_f16;
}

/// The proof the kernels of this module need.
type Proof = Avx2Checked;

fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    // SAFETY: only reachable through `install`, which holds an `Avx2Checked`.
    unsafe { quantize_q8_0_or_1::<false>(x, out) }
}

fn quantize_q8_1(x: &[f32], out: &mut [u8]) {
    // SAFETY: as above.
    unsafe { quantize_q8_0_or_1::<true>(x, out) }
}

fn quantize_q8_k(x: &[f32], out: &mut [u8]) {
    // SAFETY: as above.
    unsafe { quantize_q8_k_blocks(x, out) }
}

fn convert_f16(x: &[f32], out: &mut [u8]) {
    // SAFETY: as above.
    unsafe { convert_f16_lanes(x, out) }
}

/// [`super::activation::convert_f16`] eight values at a time: the same `vcvtps2ph`
/// rounding the scalar conversion uses one value at a time.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn convert_f16_lanes(x: &[f32], out: &mut [u8]) {
    let n = x.len().min(out.len() / 2);
    let mut i = 0;
    while i + 8 <= n {
        let halves =
            _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.as_ptr().add(i)));
        _mm_storeu_si128(out.as_mut_ptr().add(2 * i).cast(), halves);
        i += 8;
    }
    super::activation::convert_f16(&x[i..n], &mut out[2 * i..2 * n]);
}

// ---- Shared pieces --------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load256(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load128(p: *const u8) -> __m128i {
    _mm_loadu_si128(p.cast())
}

/// The f16 at `p`, widened exactly, in all eight lanes. (Broadcasting before the
/// conversion writes the whole register: a scalar conversion lets LLVM insert the 16 bits
/// into a register that is still in use, and the kernel then waits on that register.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_splat(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(p.cast::<i16>().read_unaligned()))
}

/// The f16 at each of `ptrs`, widened exactly, in lanes 0..4: one conversion serves the
/// block scales of four rows. The four 16-bit fields are combined in a general register,
/// which costs no vector shuffles (`vpinsrw` would take one each).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_gather4(ptrs: [*const u8; 4]) -> __m128 {
    let at = |k: usize| u64::from(ptrs[k].cast::<u16>().read_unaligned()) << (16 * k);
    let bits = at(0) | at(1) | at(2) | at(3);
    _mm_cvtph_ps(_mm_cvtsi64_si128(bits as i64))
}

/// Where the multi-row kernels prefetch: [`PREFETCH_LEAD`] bytes past `rows` when they
/// are consecutive in memory (rows of one matrix), in the rows a matvec's next calls read.
/// The kernels prefetch those bytes block by block: reading four rows side by side makes
/// four short streams, which the hardware prefetcher does not follow, and without the
/// prefetch a four-row matvec streams from DRAM at a quarter to half the rate of a
/// single-row one.
#[inline(always)]
pub(super) fn next_rows<const R: usize>(rows: &[&[u8]; R]) -> Option<*const u8> {
    let consecutive = R > 1
        && rows
            .windows(2)
            .all(|pair| pair[0].as_ptr_range().end == pair[1].as_ptr());
    rows.last()
        .filter(|_| consecutive)
        .map(|row| row.as_ptr_range().end.wrapping_add(PREFETCH_LEAD))
}

/// How far past the end of the current rows the prefetches reach. Prefetching just the
/// next rows left a one-thread matvec waiting on DRAM; 4 KiB further, the decode step's
/// products over every matrix took 5-13% less time on one thread (SmolLM2 Q8_0, Q4_1,
/// Q4_K_M, Gemma 3; `examples/decode_matvec_bench`, both settings alternating step by
/// step in one process) and the same on two, where the two cores together saturate the
/// memory bus; 8 KiB gained less and 16 KiB lost.
const PREFETCH_LEAD: usize = 4096;

/// Prefetches the cache lines of `len` bytes from `p` into L1. A prefetch never faults,
/// so `p` need not be valid (it is never dereferenced).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn prefetch(p: *const u8, len: usize) {
    let mut offset = 0;
    while offset < len {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(offset).cast());
        offset += 64;
    }
}

/// Sum of the eight lanes, in a fixed order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Products of unsigned bytes `x` (at most 255; here at most 63) and signed bytes `y`
/// summed in fours: eight i32 lanes. Exact: a pair of products is at most 2 * 63 * 128 in
/// magnitude, inside `maddubs`' saturation limit.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_u8_i8(x: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
}

/// Products of signed bytes summed in fours. `maddubs` wants one unsigned operand, so the
/// sign of `x` moves onto `y`: |x| * (y * sign x). Exact unless `y` holds -128 (the
/// quantisers never write it: their quants are within ±127).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_i8_i8(x: __m256i, y: __m256i) -> __m256i {
    dot_u8_i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

// ---- 32-element formats ---------------------------------------------------------------

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q8_0_q8_0<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    const SIZE: usize = 34;
    let blocks = common_blocks(GgmlType::Q8_0, &rows, act, n);
    let a = act.as_ptr();
    let w = rows.map(<[u8]>::as_ptr);
    let next = next_rows(&rows);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        if let Some(next) = next {
            prefetch(next.wrapping_add(b * R * SIZE), R * SIZE);
        }
        let y = a.add(b * SIZE);
        let qy = load256(y.add(2));
        let dy = f16_splat(y);
        for r in 0..R {
            let x = w[r].add(b * SIZE);
            let sums = dot_i8_i8(load256(x.add(2)), qy);
            let d = _mm256_mul_ps(f16_splat(x), dy);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
    out
}

/// Four Q8_0 rows by `T` tokens, one row at a time: a block's weights and their absolute
/// values are loaded once for all the tokens; per (row, token), [`q8_0_q8_0`]'s operations.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_tokens<const T: usize>(
    rows: [&[u8]; 4],
    acts: [&QuantizedActivations; T],
) -> [[f32; 4]; T] {
    const SIZE: usize = 34;
    let blocks = common_blocks(GgmlType::Q8_0, &rows, acts[0].bytes(), acts[0].len());
    let a = acts.map(|act| act.bytes().as_ptr());
    let act_scales = acts.map(|act| act.block_scales().as_ptr());
    rows_by_tokens::<T>(rows, |row, ahead| {
        let w = row.as_ptr();
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..blocks {
            if let Some(ahead) = ahead {
                prefetch(ahead.wrapping_add(b * SIZE), SIZE);
            }
            let x = w.add(b * SIZE);
            let qx = load256(x.add(2));
            let abs_x = _mm256_sign_epi8(qx, qx);
            let dx = f16_splat(x);
            for t in 0..T {
                let qy = load256(a[t].add(b * SIZE + 2));
                // `dot_i8_i8` with the weights' absolute values shared.
                let sums = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(abs_x, _mm256_sign_epi8(qy, qx)),
                    _mm256_set1_epi16(1),
                );
                let d = _mm256_mul_ps(dx, _mm256_set1_ps(act_scales[t].add(b).read()));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[t]);
            }
        }
        let mut out = [0f32; T];
        for t in 0..T {
            out[t] = hsum(acc[t]);
        }
        out
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_1_q8_1<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    const SIZE: usize = 36;
    let blocks = common_blocks(GgmlType::Q8_1, &rows, act, n);
    let a = act.as_ptr();
    let w = rows.map(<[u8]>::as_ptr);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let y = a.add(b * SIZE);
        let qy = load256(y.add(4));
        let dy = f16_splat(y);
        for r in 0..R {
            let x = w[r].add(b * SIZE);
            let sums = dot_i8_i8(load256(x.add(4)), qy);
            let d = _mm256_mul_ps(f16_splat(x), dy);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
    out
}

// ---- 4- and 5-bit formats: Q4_0, Q4_1, Q5_0, Q5_1 ------------------------------------
//
// The f32 arithmetic is that of ggml's AVX2 `ggml_vec_dot_q{4,5}_{0,1}_q8_{0,1}`, so the
// results have llama.cpp's x86 bits: per block, the 32 integer products are summed in eight
// i32 lanes, lane i holding elements 4i..4i+4 (lanes 0..4 the low nibbles, elements 0..16;
// lanes 4..8 the high nibbles, elements 16..32); each lane is converted to f32 and added as
// `acc_i = fma(d * dy, lane_i, acc_i)`, block after block; the row's result is
// `hsum_float_8(acc) + summs`, where `hsum_float_8` adds `h_l = acc_{l+4} + acc_l` as
// `(h0 + h2) + (h1 + h3)` and `summs` (Q4_1, Q5_1) is the f32 sum of `m * s`, block after
// block. Only the f32 operations and their order matter: the lane sums are exact integers
// however they are formed.
//
// The single-row kernel is ggml's, lanes 0..8 in one 256-bit register. A block's 16 bytes
// of nibbles fill half a 256-bit register once widened, so the four-row kernel packs two
// rows per register (four per 512-bit register at the AVX-512 level): the low nibbles meet
// a register holding activations 0..16 in every 128-bit lane, the high nibbles one holding
// activations 16..32, and the two give each row its lanes 0..4 and 4..8 in separate
// accumulators (`lo` and `hi`); a row's result is then `hsum4(hi + lo) + summs`, which adds
// the same operands in the same order as `hsum_float_8`. So every kernel agrees to the bit
// with ggml and with the others.
// Unsigned values `u = w + OFFSET` meet the activations; `OFFSET * sum(y)` is subtracted
// per lane, exactly, before the conversion to f32 (ggml subtracts the offset from the
// weights instead: the same integers).

/// Layout of a 32-element 4/5-bit format and of its activation block (Q8_0 or Q8_1).
pub(super) trait SmallFormat {
    const TY: GgmlType;
    /// Bytes per weight block.
    const SIZE: usize;
    /// Whether the block has a minimum `m` after `d` (Q4_1, Q5_1; activations are Q8_1).
    const HAS_MIN: bool;
    /// Offset of the 32 high bits of 5-bit formats, if any.
    const QH: Option<usize>;
    /// Offset of the 16 bytes of nibbles.
    const QS: usize;
    /// What the stored (unsigned) values exceed the weights by (0, 8 or 16).
    const OFFSET: i8;
    /// Where this format's shares start among a block's `neg_offset_sums` (Q4_0's first,
    /// Q5_0's after them).
    const OFFSET_SUMS_AT: usize = if Self::OFFSET == 16 { 8 } else { 0 };
    /// Bytes per activation block and the offset of its quants.
    const ACT: usize = if Self::HAS_MIN { 36 } else { 34 };
    const ACT_QS: usize = if Self::HAS_MIN { 4 } else { 2 };
}

pub(super) struct Q4_0Format;
pub(super) struct Q4_1Format;
pub(super) struct Q5_0Format;
pub(super) struct Q5_1Format;

impl SmallFormat for Q4_0Format {
    const TY: GgmlType = GgmlType::Q4_0;
    const SIZE: usize = 18;
    const HAS_MIN: bool = false;
    const QH: Option<usize> = None;
    const QS: usize = 2;
    const OFFSET: i8 = 8;
}

impl SmallFormat for Q4_1Format {
    const TY: GgmlType = GgmlType::Q4_1;
    const SIZE: usize = 20;
    const HAS_MIN: bool = true;
    const QH: Option<usize> = None;
    const QS: usize = 4;
    const OFFSET: i8 = 0;
}

impl SmallFormat for Q5_0Format {
    const TY: GgmlType = GgmlType::Q5_0;
    const SIZE: usize = 22;
    const HAS_MIN: bool = false;
    const QH: Option<usize> = Some(2);
    const QS: usize = 6;
    const OFFSET: i8 = 16;
}

impl SmallFormat for Q5_1Format {
    const TY: GgmlType = GgmlType::Q5_1;
    const SIZE: usize = 24;
    const HAS_MIN: bool = true;
    const QH: Option<usize> = Some(4);
    const QS: usize = 8;
    const OFFSET: i8 = 0;
}

/// The 32 high bits of a 5-bit block at `x` (0 for 4-bit formats).
#[inline(always)]
pub(super) unsafe fn high_bits<F: SmallFormat>(x: *const u8) -> u32 {
    match F::QH {
        Some(at) => x.add(at).cast::<u32>().read_unaligned(),
        None => 0,
    }
}

/// Byte `j` is 0x10 where bit `j` of `bits` is set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn bit4_from_bits_32(bits: u32) -> __m256i {
    // Byte j takes byte j / 8 of the 32 bits, then tests bit j % 8 of it.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let select = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// The activation lanes' excess `OFFSET * sum y[4k..4k+4]`, lane k of each 128-bit half
/// summing four consecutive quants of `y` (what the unsigned products `u * y` exceed
/// `w * y` by, lane for lane).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn small_excess(offset: i8, y: __m256i) -> __m256i {
    dot_u8_i8(_mm256_set1_epi8(offset), y)
}

/// Sum of four lanes as `(v0 + v2) + (v1 + v3)`, the order every small-format kernel uses;
/// with `v = hi + lo` it is ggml's `hsum_float_8` of the eight lanes `lo, hi`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum4(v: __m128) -> f32 {
    let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// `[d * dy, m * s]` of the block at `x` and activation block `y` in lanes 0 and 1 (m and s
/// only for formats with a minimum).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn small_scales<F: SmallFormat>(x: *const u8, y: *const u8) -> __m128 {
    let read = |p: *const u8| -> i32 {
        if F::HAS_MIN {
            p.cast::<i32>().read_unaligned()
        } else {
            i32::from(p.cast::<u16>().read_unaligned())
        }
    };
    let wx = _mm_cvtph_ps(_mm_cvtsi32_si128(read(x)));
    let wy = _mm_cvtph_ps(_mm_cvtsi32_si128(read(y)));
    _mm_mul_ps(wx, wy)
}

/// ggml's AVX2 kernel: the block's 32 values in one register (`bytes_from_nibbles_32`),
/// eight lanes of four products, one FMA per block, `hsum_float_8` at the end.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn small_one<F: SmallFormat>(row: &[u8], act: &[u8], n: usize) -> f32 {
    let blocks = common_blocks(F::TY, &[row], act, n);
    let (w, a) = (row.as_ptr(), act.as_ptr());
    let low4 = _mm256_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut min_part = 0f32;
    for b in 0..blocks {
        let y = a.add(b * F::ACT);
        let x = w.add(b * F::SIZE);
        let qy = load256(y.add(F::ACT_QS));
        let q = load128(x.add(F::QS));
        // Elements 0..16 (low nibbles) in the low half, 16..32 (high nibbles) in the high.
        let mut qx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(q), q), low4);
        if F::QH.is_some() {
            qx = _mm256_or_si256(qx, bit4_from_bits_32(high_bits::<F>(x)));
        }
        let mut sums = dot_u8_i8(qx, qy);
        if F::OFFSET != 0 {
            sums = _mm256_sub_epi32(sums, small_excess(F::OFFSET, qy));
        }
        let scales = small_scales::<F>(x, y);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_broadcastss_ps(scales), acc);
        if F::HAS_MIN {
            min_part += _mm_cvtss_f32(_mm_movehdup_ps(scales));
        }
    }
    hsum(acc) + min_part
}

/// The block scale products of four rows: `d * dy` in lanes 0..4 and, for formats with a
/// minimum, `m * s` in lanes 4..8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn small_scales4<F: SmallFormat>(x: [*const u8; 4], y: *const u8) -> __m256 {
    if F::HAS_MIN {
        let read = |k: usize| u64::from(x[k].cast::<u32>().read_unaligned());
        // [d0, m0, d1, m1, d2, m2, d3, m3] * [dy, s, dy, s, ...], then d's first.
        let pairs = _mm_set_epi64x(
            (read(2) | (read(3) << 32)) as i64,
            (read(0) | (read(1) << 32)) as i64,
        );
        let wx = _mm256_cvtph_ps(pairs);
        let wy = _mm256_cvtph_ps(_mm_set1_epi32(y.cast::<i32>().read_unaligned()));
        let products = _mm256_mul_ps(wx, wy);
        _mm256_permutevar8x32_ps(products, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7))
    } else {
        let d = _mm_mul_ps(
            f16_gather4(x),
            _mm_cvtph_ps(_mm_set1_epi16(y.cast::<i16>().read_unaligned())),
        );
        _mm256_castps128_ps256(d)
    }
}

/// The nibbles (with bit 4 for the 5-bit formats) of the blocks at `x0` and `x1`: elements
/// 0..16 of `x0` then of `x1`, and elements 16..32 of `x0` then of `x1`.
#[inline(always)]
unsafe fn unpack_two_blocks<F: SmallFormat>(x0: *const u8, x1: *const u8) -> (__m256i, __m256i) {
    let low4 = _mm256_set1_epi8(0x0F);
    let q = _mm256_set_m128i(load128(x1.add(F::QS)), load128(x0.add(F::QS)));
    let mut lo = _mm256_and_si256(q, low4);
    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
    if F::QH.is_some() {
        let (b0, b1) = (high_bits::<F>(x0), high_bits::<F>(x1));
        lo = _mm256_or_si256(lo, bit4_from_bits_32((b0 & 0xFFFF) | (b1 << 16)));
        hi = _mm256_or_si256(hi, bit4_from_bits_32((b0 >> 16) | (b1 & 0xFFFF_0000)));
    }
    (lo, hi)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn small_four<F: SmallFormat>(rows: [&[u8]; 4], act: &[u8], n: usize) -> [f32; 4] {
    let blocks = common_blocks(F::TY, &rows, act, n);
    let w = rows.map(<[u8]>::as_ptr);
    let a = act.as_ptr();
    let next = next_rows(&rows);
    // lo[p], hi[p]: the lanes 0..4 and 4..8 of rows 2p (lanes 0..4) and 2p + 1 (lanes 4..8).
    let mut acc_lo = [_mm256_setzero_ps(); 2];
    let mut acc_hi = [_mm256_setzero_ps(); 2];
    let mut min_part = _mm256_setzero_ps();
    for b in 0..blocks {
        if let Some(next) = next {
            prefetch(next.wrapping_add(b * 4 * F::SIZE), 4 * F::SIZE);
        }
        let y = a.add(b * F::ACT);
        let x = w.map(|w| w.add(b * F::SIZE));
        let y_lo = _mm256_broadcastsi128_si256(load128(y.add(F::ACT_QS)));
        let y_hi = _mm256_broadcastsi128_si256(load128(y.add(F::ACT_QS + 16)));
        let scales = small_scales4::<F>(x, y);
        if F::HAS_MIN {
            min_part = _mm256_add_ps(min_part, scales);
        }
        for p in 0..2 {
            let (lo, hi) = unpack_two_blocks::<F>(x[2 * p], x[2 * p + 1]);
            let mut sums_lo = dot_u8_i8(lo, y_lo);
            let mut sums_hi = dot_u8_i8(hi, y_hi);
            if F::OFFSET != 0 {
                sums_lo = _mm256_sub_epi32(sums_lo, small_excess(F::OFFSET, y_lo));
                sums_hi = _mm256_sub_epi32(sums_hi, small_excess(F::OFFSET, y_hi));
            }
            let lane = (2 * p) as i32;
            let (l0, l1) = (lane, lane + 1);
            let d =
                _mm256_permutevar8x32_ps(scales, _mm256_setr_epi32(l0, l0, l0, l0, l1, l1, l1, l1));
            acc_lo[p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums_lo), d, acc_lo[p]);
            acc_hi[p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums_hi), d, acc_hi[p]);
        }
    }
    let s01 = _mm256_add_ps(acc_hi[0], acc_lo[0]);
    let s23 = _mm256_add_ps(acc_hi[1], acc_lo[1]);
    small_finish::<F>(
        [
            _mm256_castps256_ps128(s01),
            _mm256_extractf128_ps::<1>(s01),
            _mm256_castps256_ps128(s23),
            _mm256_extractf128_ps::<1>(s23),
        ],
        _mm256_extractf128_ps::<1>(min_part),
    )
}

/// Per-row results from the four rows' `hi + lo` lane sums and (lane r) minimum shares.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn small_finish<F: SmallFormat>(acc: [__m128; 4], min_part: __m128) -> [f32; 4] {
    let mut mins = [0f32; 4];
    // SAFETY: `mins` holds four f32.
    unsafe { _mm_storeu_ps(mins.as_mut_ptr(), min_part) };
    let mut out = [0f32; 4];
    for r in 0..4 {
        out[r] = hsum4(acc[r]) + if F::HAS_MIN { mins[r] } else { 0.0 };
    }
    out
}

/// Four rows by `T` tokens, two rows per register as in [`small_four`]: the rows' blocks
/// are unpacked once for all the tokens, and each token's activation loads, scale and
/// offset share serve both rows of a register. Each (row, token) lane sees `small_one`'s
/// integer sums and float operations: the block scale `d * dy` and minimum `m * s` are the
/// same products, accumulated in the same order. One pair of rows at a time: the
/// accumulators of both pairs (16 registers for four tokens) would not fit the 16 AVX2
/// registers with the operands.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn small_tokens<F: SmallFormat, const T: usize>(
    rows: [&[u8]; 4],
    acts: [&QuantizedActivations; T],
) -> [[f32; 4]; T] {
    let blocks = common_blocks(F::TY, &rows, acts[0].bytes(), acts[0].len());
    let w = rows.map(<[u8]>::as_ptr);
    let a = acts.map(|act| act.bytes().as_ptr());
    let act_scales = acts.map(|act| act.block_scales().as_ptr());
    let offset_sums = acts.map(|act| {
        act.neg_offset_sums()
            .as_ptr()
            .wrapping_add(F::OFFSET_SUMS_AT)
    });
    let next = next_rows(&rows);
    // Per token, the horizontal sums `hsum4(hi + lo)` of the four rows.
    let mut sums = [[0f32; 4]; T];
    for p in 0..2 {
        // Each pass prefetches half of the following rows' bytes.
        let ahead = next.map(|next| next.wrapping_add(p * blocks * 2 * F::SIZE));
        let pair = small_tokens_pair::<F, T>(
            [w[2 * p], w[2 * p + 1]],
            a,
            act_scales,
            offset_sums,
            blocks,
            ahead,
        );
        for t in 0..T {
            sums[t][2 * p..2 * p + 2].copy_from_slice(&pair[t]);
        }
    }
    let min_part = small_min_parts::<F, T>(w, act_scales, blocks);
    let mut out = [[0f32; 4]; T];
    for t in 0..T {
        let mut mins = [0f32; 4];
        _mm_storeu_ps(mins.as_mut_ptr(), min_part[t]);
        for r in 0..4 {
            out[t][r] = sums[t][r] + if F::HAS_MIN { mins[r] } else { 0.0 };
        }
    }
    out
}

/// Two rows by `T` tokens for [`small_tokens`]: per token, `hsum4(hi + lo)` of each row.
/// Not inlined: unrolled into the caller's loop over the two pairs of rows, the two
/// passes' accumulators would not fit the registers.
/// # Safety
/// As for [`small_tokens`], with `blocks` the common block count, `a`, `act_scales` and
/// `offset_sums` the activations' bytes, block scales and this format's offset shares.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn small_tokens_pair<F: SmallFormat, const T: usize>(
    w: [*const u8; 2],
    a: [*const u8; T],
    act_scales: [*const f32; T],
    offset_sums: [*const i32; T],
    blocks: usize,
    ahead: Option<*const u8>,
) -> [[f32; 2]; T] {
    let scales_per_block = if F::HAS_MIN { 2 } else { 1 };
    // Rows 0 (lanes 0..4) and 1 (lanes 4..8) of token t, lanes 0..4 and 4..8 of ggml's
    // eight apart.
    let mut acc_lo = [_mm256_setzero_ps(); T];
    let mut acc_hi = [_mm256_setzero_ps(); T];
    for b in 0..blocks {
        if let Some(ahead) = ahead {
            prefetch(ahead.wrapping_add(b * 2 * F::SIZE), 2 * F::SIZE);
        }
        let (x0, x1) = (w[0].add(b * F::SIZE), w[1].add(b * F::SIZE));
        let (lo, hi) = unpack_two_blocks::<F>(x0, x1);
        let bits = u32::from(x0.cast::<u16>().read_unaligned())
            | (u32::from(x1.cast::<u16>().read_unaligned()) << 16);
        let d = _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))),
            _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
        );
        for t in 0..T {
            let y = a[t].add(b * F::ACT);
            let y_lo = _mm256_broadcastsi128_si256(load128(y.add(F::ACT_QS)));
            let y_hi = _mm256_broadcastsi128_si256(load128(y.add(F::ACT_QS + 16)));
            let mut sums_lo = dot_u8_i8(lo, y_lo);
            let mut sums_hi = dot_u8_i8(hi, y_hi);
            if F::OFFSET != 0 {
                // `-OFFSET * (lane sums of y)`: what the unsigned products exceed w * y by.
                let neg = offset_sums[t].add(16 * b);
                let neg_lo = _mm256_broadcastsi128_si256(load128(neg.cast()));
                let neg_hi = _mm256_broadcastsi128_si256(load128(neg.add(4).cast()));
                sums_lo = _mm256_add_epi32(sums_lo, neg_lo);
                sums_hi = _mm256_add_epi32(sums_hi, neg_hi);
            }
            let dy = _mm256_set1_ps(act_scales[t].add(b * scales_per_block).read());
            let scale = _mm256_mul_ps(d, dy);
            acc_lo[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums_lo), scale, acc_lo[t]);
            acc_hi[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums_hi), scale, acc_hi[t]);
        }
    }
    let mut out = [[0f32; 2]; T];
    for t in 0..T {
        let s = _mm256_add_ps(acc_hi[t], acc_lo[t]);
        out[t] = [
            hsum4(_mm256_castps256_ps128(s)),
            hsum4(_mm256_extractf128_ps::<1>(s)),
        ];
    }
    out
}

/// Per token, lane r: row r's sum of `m * s` over the blocks, in block order (zero for
/// formats without a minimum). A pass of its own after the lane sums: in their loop the
/// `T` running sums would take registers the accumulators need.
/// # Safety
/// Every row at `w` holds `blocks` blocks; every `act_scales` holds two scales per block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn small_min_parts<F: SmallFormat, const T: usize>(
    w: [*const u8; 4],
    act_scales: [*const f32; T],
    blocks: usize,
) -> [__m128; T] {
    let mut min_part = [_mm_setzero_ps(); T];
    if F::HAS_MIN {
        for b in 0..blocks {
            let mins = f16_gather4(w.map(|w| w.add(b * F::SIZE + 2)));
            for t in 0..T {
                let s = _mm_set1_ps(act_scales[t].add(2 * b + 1).read());
                min_part[t] = _mm_add_ps(min_part[t], _mm_mul_ps(mins, s));
            }
        }
    }
    min_part
}

// ---- K-quants -------------------------------------------------------------------------
//
// A Q8_K activation block: f32 scale at 0, 256 quants at 4, sixteen i16 sums of 16 quants
// at 260. The weights' integer products are formed unsigned (`maddubs`), scaled per group
// with `madd` and summed in eight i32 lanes per block; offsets and minimums are applied
// through the activation's group sums.

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2_k_q8_k<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    q2_k_body::<R>(rows, act, n)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3_k_q8_k<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    q3_k_body::<R>(rows, act, n)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_q8_k<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    q4_k_body::<R>(rows, act, n)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_q8_k<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    q5_k_body::<R>(rows, act, n)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_q8_k<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    q6_k_body::<R>(rows, act, n)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_tokens<const T: usize, const GEMM: bool>(
    rows: [&[u8]; 4],
    acts: [&[u8]; T],
    n: usize,
) -> [[f32; 4]; T] {
    rows_by_tokens::<T>(rows, |row, ahead| {
        q4_k_tokens_body::<T, GEMM>(row, ahead, acts, n)
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_tokens<const T: usize>(
    rows: [&[u8]; 4],
    acts: [&[u8]; T],
    n: usize,
) -> [[f32; 4]; T] {
    rows_by_tokens::<T>(rows, |row, ahead| {
        q5_k_tokens_body::<T>(row, ahead, acts, n)
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_tokens<const T: usize, const TILED: bool>(
    rows: [&[u8]; 4],
    acts: [&[u8]; T],
    n: usize,
) -> [[f32; 4]; T] {
    rows_by_tokens::<T>(rows, |row, ahead| {
        q6_k_tokens_body::<T, TILED>(row, ahead, acts, n)
    })
}

/// `out[t][r] = row_by_tokens(rows[r], ahead)[t]`, where `ahead` is where row `r + 4`
/// probably starts (just past `rows` when they are consecutive rows of one matrix, see
/// [`next_rows`]): a body walking one row prefetches the same blocks of that row, as the
/// four-row kernels do, since matrices larger than the caches otherwise stream from DRAM at
/// half the rate.
#[inline(always)]
pub(super) fn rows_by_tokens<const T: usize>(
    rows: [&[u8]; 4],
    mut row_by_tokens: impl FnMut(&[u8], Option<*const u8>) -> [f32; T],
) -> [[f32; 4]; T] {
    let next = next_rows(&rows);
    let mut out = [[0f32; 4]; T];
    for (r, row) in rows.into_iter().enumerate() {
        let ahead = next.map(|p| p.wrapping_add(r * row.len()));
        for (o, v) in out.iter_mut().zip(row_by_tokens(row, ahead)) {
            o[r] = v;
        }
    }
    out
}

const Q8K_SIZE: usize = 292;
const Q8K_QS: usize = 4;
const Q8K_BSUMS: usize = 260;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f32_splat(p: *const u8) -> __m256 {
    _mm256_set1_ps(p.cast::<f32>().read_unaligned())
}

/// `vpshufb` patterns over eight i16 held in both 128-bit halves of a register:
/// `SELECT_ONE[g]` puts element `g` in all sixteen i16 lanes, `SELECT_PAIR[k]` element `2k`
/// in the low half and `2k + 1` in the high half (the two 16-element groups of chunk `k`).
/// Tables in memory rather than `_mm256_setr_epi8` calls, which LLVM rebuilds byte by byte
/// when the index is a loop variable.
static SELECT_ONE: [[u8; 32]; 8] = select_table(false);
static SELECT_PAIR: [[u8; 32]; 8] = select_table(true);

const fn select_table(pair: bool) -> [[u8; 32]; 8] {
    let mut table = [[0u8; 32]; 8];
    let mut g = 0;
    while g < 8 {
        let mut i = 0;
        while i < 32 {
            let element = if pair { 2 * (g % 4) + i / 16 } else { g };
            table[g][i] = (2 * element + i % 2) as u8;
            i += 1;
        }
        g += 1;
    }
    table
}

/// See [`SELECT_ONE`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale_one(scales: __m256i, g: usize) -> __m256i {
    // SAFETY: SELECT_ONE[g] is 32 bytes.
    let select = unsafe { load256(SELECT_ONE[g].as_ptr()) };
    _mm256_shuffle_epi8(scales, select)
}

/// See [`SELECT_PAIR`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale_pair(scales: __m256i, k: usize) -> __m256i {
    // SAFETY: SELECT_PAIR[k] is 32 bytes.
    let select = unsafe { load256(SELECT_PAIR[k].as_ptr()) };
    _mm256_shuffle_epi8(scales, select)
}

/// Q4_K/Q5_K's twelve scale bytes as (eight scales, eight minimums), one byte each,
/// packed in u64s (the layout of `blocks::k4_scales_mins`, four groups per 32-bit word).
#[inline(always)]
pub(super) unsafe fn k4_scales_mins_packed(p: *const u8) -> (u64, u64) {
    let a = p.cast::<u32>().read_unaligned();
    let b = p.add(4).cast::<u32>().read_unaligned();
    let c = p.add(8).cast::<u32>().read_unaligned();
    let scales_lo = a & 0x3F3F_3F3F;
    let mins_lo = b & 0x3F3F_3F3F;
    let scales_hi = (c & 0x0F0F_0F0F) | (((a >> 6) & 0x0303_0303) << 4);
    let mins_hi = ((c >> 4) & 0x0F0F_0F0F) | (((b >> 6) & 0x0303_0303) << 4);
    (
        u64::from(scales_lo) | (u64::from(scales_hi) << 32),
        u64::from(mins_lo) | (u64::from(mins_hi) << 32),
    )
}

/// Q3_K's twelve scale bytes as sixteen 6-bit scales minus 32 (see `blocks::q3k_scales`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q3k_scales_i8(p: *const u8) -> __m128i {
    let a = p.cast::<u32>().read_unaligned();
    let b = p.add(4).cast::<u32>().read_unaligned();
    let c = p.add(8).cast::<u32>().read_unaligned();
    let s0 = (a & 0x0F0F_0F0F) | ((c & 0x0303_0303) << 4);
    let s1 = (b & 0x0F0F_0F0F) | (((c >> 2) & 0x0303_0303) << 4);
    let s2 = ((a >> 4) & 0x0F0F_0F0F) | (((c >> 4) & 0x0303_0303) << 4);
    let s3 = ((b >> 4) & 0x0F0F_0F0F) | (((c >> 6) & 0x0303_0303) << 4);
    let unsigned = _mm_setr_epi32(s0 as i32, s1 as i32, s2 as i32, s3 as i32);
    _mm_sub_epi8(unsigned, _mm_set1_epi8(32))
}

// ---- Q4_K: the arithmetic of llama.cpp's repacked Q4_K kernels ---------------------------
//
// On AVX2 machines llama.cpp repacks every Q4_K matrix whose row count is a multiple of 8
// (`ggml_repack_get_optimal_repack_type` -> `q4_K_8x8_q8_K`) and multiplies it with
// `ggml_gemv_q4_K_8x8_q8_K` (one activation row) or `ggml_gemm_q4_K_8x8_q8_K` (whole groups
// of four activation rows; `forward_mul_mat_one_chunk` gives the last `n % 4` rows of a
// batch to the gemv) in `ggml-cpu/arch/x86/repack.cpp`. Per (weight row, activation row)
// pair, each super-block gives two exact integers, `S = Σ_k scale_k Σ q4 q8` over its eight
// 32-element sub-blocks and `M = Σ_k min_k (bsums[2k] + bsums[2k+1])`, and the floats are
// `acc = fma(S, d * dy, acc)`, `acc_min = fma(M, dmin * dy, acc_min)`, super-block after
// super-block, with the result `acc - acc_min` (one float lane per pair). That is the gemv;
// the gemm does the same per pair of sub-blocks (`S` and `M` of sub-blocks 2p and 2p + 1,
// p = 0..4: four steps per super-block). ggml's i16 partial sums hold at most sixteen
// products of a nibble and a quant (|sum| <= 16 * 15 * 128 < 2^15), so its integers are
// exact, as are these.
//
// Every kernel here does the gemv arithmetic ([`DotFn`], [`Dot4Fn`], [`DotTokensFn`]),
// except the batch kernel ([`DotBatchFn`]), which does the gemm's for the tokens that
// llama.cpp gives the gemm ([`q4_k_gemm_tokens`]). A Q4_K matrix whose row count is not a
// multiple of 8 is not repacked: llama.cpp multiplies it with `ggml_vec_dot_q4_K_q8_K`
// (eight i32 lanes per super-block, as in `q5_k_body`), or with its tiled kernel for a
// batch of 8 tokens or more; these kernels reproduce neither. The activations are Q8_K
// from `quantize_row_q8_K_ref` (the gemm's `ggml_quantize_mat_q8_K_4x8` differs only when
// `+max` and `-max` of a block tie and the negative one comes first; it then negates every
// quant and the scale, which leaves every product, and so these results, unchanged).
//
// The integer work is `q5_k_body`'s (unsigned nibbles in `maddubs`, the sub-block scale in
// `madd`, here through `vpshufb`s of an opaque table, [`select_one_opaque`]). The eight i32
// lanes of the products and those of the minimums times `bsums` are then interleaved and
// added ([`q4_k_interleave`]) and folded to `[S_a, M_a, S_b, M_b]` two rows or tokens at a
// time ([`q4_k_totals`]), which meet `[d_a dy_a, dmin_a dy_a, d_b dy_b, dmin_b dy_b]` in one
// 128-bit FMA; a single row folds to `[S, S, M, M]` without `hadd`s ([`q4_k_one`]).

const Q4K_SIZE: usize = 144;

pub(super) use super::token_lanes::q4_k_gemm_tokens;

/// The Q4_K block at `x`: its eight sub-block scales as i16 in both 128-bit halves (for
/// [`q4_k_pair_scales`]), and its eight minimums as i16, each twice (`[m0, m0, m1, m1, ..]`,
/// for the two `bsums` of each sub-block).
#[inline(always)]
unsafe fn q4_k_scales_mins(x: *const u8) -> (__m256i, __m256i) {
    let (scales, mins) = k4_scales_mins_packed(x.add(4));
    let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(scales as i64)));
    let mins = _mm_cvtsi64_si128(mins as i64);
    (scales, _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins, mins)))
}

/// A super-block's scaled products (eight i32 lanes) and its minimums times the sixteen
/// `bsums` of `y` (eight lanes, `min_k (bsums[2k] + bsums[2k + 1])` in lane k), interleaved
/// in pairs and added: `[s, s, m, m | s, s, m, m]`, the two `s` lanes and the two `m` lanes
/// of each half summing to `S` and `M`. [`q4_k_totals`] completes two of them.
#[inline(always)]
unsafe fn q4_k_interleave(sums: __m256i, mins_twice: __m256i, y: *const u8) -> __m256i {
    let m = _mm256_madd_epi16(mins_twice, load256(y.add(Q8K_BSUMS)));
    _mm256_add_epi32(
        _mm256_unpacklo_epi64(sums, m),
        _mm256_unpackhi_epi64(sums, m),
    )
}

/// `[S_a, M_a, S_b, M_b]` from two [`q4_k_interleave`]d super-blocks.
#[inline(always)]
unsafe fn q4_k_totals(a: __m256i, b: __m256i) -> __m128i {
    let z = _mm256_hadd_epi32(a, b);
    _mm_add_epi32(_mm256_castsi256_si128(z), _mm256_extracti128_si256::<1>(z))
}

/// Sub-blocks `2j` (low nibbles of `qs[32j..32j + 32]`) and `2j + 1` (high nibbles) of the
/// Q4_K block at `x`, one byte per element.
#[inline(always)]
unsafe fn q4_k_nibbles(x: *const u8, j: usize) -> (__m256i, __m256i) {
    let low4 = _mm256_set1_epi8(0x0F);
    let q = load256(x.add(16 + 32 * j));
    (
        _mm256_and_si256(q, low4),
        _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4),
    )
}

/// Sub-blocks `lo` and `hi` times the 64 quants at `qy`, scaled by `s_lo` and `s_hi`, in eight
/// i32 lanes whose sum is `scale_lo Σ lo q8 + scale_hi Σ hi q8`.
#[inline(always)]
unsafe fn q4_k_pair_products(
    (lo, hi): (__m256i, __m256i),
    (s_lo, s_hi): (__m256i, __m256i),
    qy: *const u8,
) -> __m256i {
    let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load256(qy)), s_lo);
    let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load256(qy.add(32))), s_hi);
    _mm256_add_epi32(p_lo, p_hi)
}

/// [`SELECT_ONE`] through a pointer the compiler cannot see through. From the constant
/// table LLVM builds each broadcast with two shuffles (`vpshufd` or a shift, then
/// `vpbroadcastw`); from memory it keeps one `vpshufb` per scale (measured faster).
#[inline(always)]
fn select_one_opaque() -> *const [u8; 32] {
    std::hint::black_box(SELECT_ONE.as_ptr())
}

/// The scales of sub-blocks `2j` and `2j + 1`, each in all sixteen i16 lanes; `select` is
/// [`select_one_opaque`].
#[inline(always)]
unsafe fn q4_k_pair_scales(
    scales: __m256i,
    j: usize,
    select: *const [u8; 32],
) -> (__m256i, __m256i) {
    (
        _mm256_shuffle_epi8(scales, load256(select.add(2 * j).cast())),
        _mm256_shuffle_epi8(scales, load256(select.add(2 * j + 1).cast())),
    )
}

/// `[d_a, dmin_a, d_b, dmin_b]`: the f16 scales of the Q4_K blocks at `a` and `b`, widened.
#[inline(always)]
unsafe fn q4_k_d_dmin(a: *const u8, b: *const u8) -> __m128 {
    let a = u64::from(a.cast::<u32>().read_unaligned());
    let b = u64::from(b.cast::<u32>().read_unaligned());
    _mm_cvtph_ps(_mm_cvtsi64_si128((a | (b << 32)) as i64))
}

/// `acc - acc_min` of both pairs held in `acc` (`[acc_a, acc_min_a, acc_b, acc_min_b]`).
#[inline(always)]
unsafe fn q4_k_results(acc: __m128) -> [f32; 2] {
    let mut v = [0f32; 4];
    _mm_storeu_ps(v.as_mut_ptr(), acc);
    [v[0] - v[1], v[2] - v[3]]
}

/// `R` Q4_K rows (one or four) by one activation row, with the gemv's arithmetic.
/// # Safety
/// Inlined into `#[target_feature]` wrappers of every level that runs AVX2 (they differ in
/// registers and instruction selection, not in arithmetic).
#[inline(always)]
pub(super) unsafe fn q4_k_body<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    if R == 1 {
        let mut out = [0f32; R];
        out[0] = q4_k_one(rows[0], act, n);
        return out;
    }
    let blocks = common_blocks(GgmlType::Q4K, &rows, act, n);
    let a = act.as_ptr();
    let w = rows.map(<[u8]>::as_ptr);
    let next = next_rows(&rows);
    let select = select_one_opaque();
    // Rows 2p and 2p + 1 in acc[p].
    let mut acc = [_mm_setzero_ps(); R];
    for b in 0..blocks {
        if let Some(next) = next {
            prefetch(next.wrapping_add(b * R * Q4K_SIZE), R * Q4K_SIZE);
        }
        let y = a.add(b * Q8K_SIZE);
        let qy = y.add(Q8K_QS);
        let dy = _mm_set1_ps(y.cast::<f32>().read_unaligned());
        let x = w.map(|w| w.add(b * Q4K_SIZE));
        let mut interleaved = [_mm256_setzero_si256(); R];
        for r in 0..R {
            let (scales, mins_twice) = q4_k_scales_mins(x[r]);
            let mut sums = _mm256_setzero_si256();
            for j in 0..4 {
                let p = q4_k_pair_products(
                    q4_k_nibbles(x[r], j),
                    q4_k_pair_scales(scales, j, select),
                    qy.add(64 * j),
                );
                sums = _mm256_add_epi32(sums, p);
            }
            interleaved[r] = q4_k_interleave(sums, mins_twice, y);
        }
        for p in 0..R.div_ceil(2) {
            let (ra, rb) = (2 * p, (2 * p + 1).min(R - 1));
            let totals = q4_k_totals(interleaved[ra], interleaved[rb]);
            let scale = _mm_mul_ps(q4_k_d_dmin(x[ra], x[rb]), dy);
            acc[p] = _mm_fmadd_ps(_mm_cvtepi32_ps(totals), scale, acc[p]);
        }
    }
    std::array::from_fn(|r| q4_k_results(acc[r / 2])[r % 2])
}

/// One Q4_K row by one activation row, with the gemv's arithmetic: [`q4_k_body`]'s for a
/// single row, its minimum sums formed from the sixteen `bsums` (each minimum twice) and
/// the totals reduced without `hadd`s, which a single row cannot share.
/// # Safety
/// As for [`q4_k_body`].
#[inline(always)]
unsafe fn q4_k_one(row: &[u8], act: &[u8], n: usize) -> f32 {
    let blocks = common_blocks(GgmlType::Q4K, &[row], act, n);
    let a = act.as_ptr();
    let w = row.as_ptr();
    let select = select_one_opaque();
    // [acc, acc, acc_min, acc_min].
    let mut acc = _mm_setzero_ps();
    for b in 0..blocks {
        let y = a.add(b * Q8K_SIZE);
        let qy = y.add(Q8K_QS);
        let x = w.add(b * Q4K_SIZE);
        let (scales, mins_twice) = q4_k_scales_mins(x);
        let mut sums = _mm256_setzero_si256();
        for j in 0..4 {
            let p = q4_k_pair_products(
                q4_k_nibbles(x, j),
                q4_k_pair_scales(scales, j, select),
                qy.add(64 * j),
            );
            sums = _mm256_add_epi32(sums, p);
        }
        // The halves of the interleaved sums added, then the neighbours: [S, S, M, M].
        let v = q4_k_interleave(sums, mins_twice, y);
        let v = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let v = _mm_add_epi32(v, _mm_shuffle_epi32::<0b10_11_00_01>(v));
        // [d, d, dmin, dmin] * dy.
        let d = u64::from(x.cast::<u16>().read_unaligned());
        let dmin = u64::from(x.add(2).cast::<u16>().read_unaligned());
        let bits = (d | (d << 16)) | ((dmin | (dmin << 16)) << 32);
        let scale = _mm_cvtph_ps(_mm_cvtsi64_si128(bits as i64));
        let scale = _mm_mul_ps(scale, _mm_set1_ps(y.cast::<f32>().read_unaligned()));
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(v), scale, acc);
    }
    let mut v = [0f32; 4];
    _mm_storeu_ps(v.as_mut_ptr(), acc);
    v[0] - v[2]
}

/// One Q4_K row by `T` tokens: each block's nibbles and scales are unpacked once and meet
/// every token's activations. `GEMM = false`: per token, exactly [`q4_k_body`]'s (the
/// gemv's) arithmetic; `GEMM = true` ([`q4_k_gemm_body`]): the gemm's.
/// # Safety
/// As for [`q4_k_body`]; every activation row holds as many blocks as `row`; with `GEMM`,
/// `T` is a multiple of 4.
#[inline(always)]
pub(super) unsafe fn q4_k_tokens_body<const T: usize, const GEMM: bool>(
    row: &[u8],
    ahead: Option<*const u8>,
    acts: [&[u8]; T],
    n: usize,
) -> [f32; T] {
    if GEMM {
        return q4_k_gemm_body::<T>(row, ahead, acts, n);
    }
    let blocks = common_blocks(GgmlType::Q4K, &[row], acts[0], n);
    let a = acts.map(<[u8]>::as_ptr);
    let w = row.as_ptr();
    let select = select_one_opaque();
    // Tokens 2p and 2p + 1 in acc[p].
    let mut acc = [_mm_setzero_ps(); T];
    for b in 0..blocks {
        if let Some(ahead) = ahead {
            prefetch(ahead.wrapping_add(b * Q4K_SIZE), Q4K_SIZE);
        }
        let x = w.add(b * Q4K_SIZE);
        let (scales, mins_twice) = q4_k_scales_mins(x);
        let y = a.map(|a| a.add(b * Q8K_SIZE));
        let mut sums = [_mm256_setzero_si256(); T];
        for j in 0..4 {
            let nibbles = q4_k_nibbles(x, j);
            let pair_scales = q4_k_pair_scales(scales, j, select);
            for t in 0..T {
                let p = q4_k_pair_products(nibbles, pair_scales, y[t].add(Q8K_QS + 64 * j));
                sums[t] = _mm256_add_epi32(sums[t], p);
            }
        }
        let d_dmin = q4_k_d_dmin(x, x);
        for p in 0..T.div_ceil(2) {
            let (ta, tb) = (2 * p, (2 * p + 1).min(T - 1));
            let dy_a = y[ta].cast::<f32>().read_unaligned();
            let dy_b = y[tb].cast::<f32>().read_unaligned();
            let scale = _mm_mul_ps(d_dmin, _mm_setr_ps(dy_a, dy_a, dy_b, dy_b));
            let totals = q4_k_totals(
                q4_k_interleave(sums[ta], mins_twice, y[ta]),
                q4_k_interleave(sums[tb], mins_twice, y[tb]),
            );
            acc[p] = _mm_fmadd_ps(_mm_cvtepi32_ps(totals), scale, acc[p]);
        }
    }
    std::array::from_fn(|t| q4_k_results(acc[t / 2])[t % 2])
}

/// One Q4_K row by `T` tokens (a multiple of 4) with the gemm's arithmetic: per super-block
/// and token, the sums `S_p`, `M_p` of the four pairs of sub-blocks are added to the floats
/// in turn, `acc = fma(S_p, d dy, acc)`, `acc_min = fma(M_p, dmin dy, acc_min)`.
///
/// A pair's products (eight i32 lanes) are folded with `hadd`s into
/// `[p0 p1 p2 p3 | p0 p1 p2 p3]` (lanes 0..4 of each pair's, then lanes 4..8); four tokens
/// a, b, c, d then share each float step: register `[S_p M_p]` of a and b in the low half,
/// of c and d in the high half, for p = 0..4.
/// # Safety
/// As for [`q4_k_tokens_body`].
#[inline(always)]
unsafe fn q4_k_gemm_body<const T: usize>(
    row: &[u8],
    ahead: Option<*const u8>,
    acts: [&[u8]; T],
    n: usize,
) -> [f32; T] {
    let blocks = common_blocks(GgmlType::Q4K, &[row], acts[0], n);
    let a = acts.map(<[u8]>::as_ptr);
    let w = row.as_ptr();
    let select = select_one_opaque();
    // Tokens 4q..4q + 4 in acc[q]: lanes [acc, acc_min] of each in turn.
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..blocks {
        if let Some(ahead) = ahead {
            prefetch(ahead.wrapping_add(b * Q4K_SIZE), Q4K_SIZE);
        }
        let x = w.add(b * Q4K_SIZE);
        let (scales, mins_twice) = q4_k_scales_mins(x);
        let y = a.map(|a| a.add(b * Q8K_SIZE));
        // Pairs 0 and 2 wait in `held` for their partners.
        let mut sums = [_mm256_setzero_si256(); T];
        let mut held = [_mm256_setzero_si256(); T];
        for j in 0..4 {
            let nibbles = q4_k_nibbles(x, j);
            let pair_scales = q4_k_pair_scales(scales, j, select);
            for t in 0..T {
                let p = q4_k_pair_products(nibbles, pair_scales, y[t].add(Q8K_QS + 64 * j));
                match j {
                    0 | 2 => held[t] = p,
                    1 => sums[t] = _mm256_hadd_epi32(held[t], p),
                    _ => sums[t] = _mm256_hadd_epi32(sums[t], _mm256_hadd_epi32(held[t], p)),
                }
            }
        }
        let d_dmin = _mm256_broadcast_ps(&q4_k_d_dmin(x, x));
        for q in 0..T / 4 {
            let [ta, tb, tc, td] = [4 * q, 4 * q + 1, 4 * q + 2, 4 * q + 3];
            let dy = |t: usize| y[t].cast::<f32>().read_unaligned();
            let dy = _mm256_setr_ps(
                dy(ta),
                dy(ta),
                dy(tb),
                dy(tb),
                dy(tc),
                dy(tc),
                dy(td),
                dy(td),
            );
            let scale = _mm256_mul_ps(d_dmin, dy);
            // [S_0..4 of t | S_0..4 of u] and [M_0..4 of t | M_0..4 of u].
            let s = |t: usize, u: usize| {
                _mm256_add_epi32(
                    _mm256_permute2x128_si256::<0x20>(sums[t], sums[u]),
                    _mm256_permute2x128_si256::<0x31>(sums[t], sums[u]),
                )
            };
            let m = |t: usize, u: usize| {
                let mt = _mm256_madd_epi16(mins_twice, load256(y[t].add(Q8K_BSUMS)));
                let mu = _mm256_madd_epi16(mins_twice, load256(y[u].add(Q8K_BSUMS)));
                // [Mt0 Mt1 Mu0 Mu1 | Mt2 Mt3 Mu2 Mu3], then the middle quarters swapped.
                _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(mt, mu))
            };
            let (s_ac, m_ac) = (s(ta, tc), m(ta, tc));
            let (s_bd, m_bd) = (s(tb, td), m(tb, td));
            let halves = [
                (
                    _mm256_unpacklo_epi32(s_ac, m_ac),
                    _mm256_unpacklo_epi32(s_bd, m_bd),
                ),
                (
                    _mm256_unpackhi_epi32(s_ac, m_ac),
                    _mm256_unpackhi_epi32(s_bd, m_bd),
                ),
            ];
            for (u, v) in halves {
                // [S M of a, S M of b | S M of c, S M of d] of pair 2h, then of 2h + 1.
                let first = _mm256_unpacklo_epi64(u, v);
                let second = _mm256_unpackhi_epi64(u, v);
                acc[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(first), scale, acc[q]);
                acc[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(second), scale, acc[q]);
            }
        }
    }
    std::array::from_fn(|t| {
        let mut v = [0f32; 8];
        _mm256_storeu_ps(v.as_mut_ptr(), acc[t / 4]);
        let l = 2 * (t % 4);
        v[l] - v[l + 1]
    })
}

/// # Safety
/// Inlined into `#[target_feature]` wrappers of every level that runs AVX2 (they differ in
/// registers and instruction selection, not in arithmetic).
#[inline(always)]
pub(super) unsafe fn q5_k_body<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    const SIZE: usize = 176;
    let blocks = common_blocks(GgmlType::Q5K, &rows, act, n);
    let a = act.as_ptr();
    let w = rows.map(<[u8]>::as_ptr);
    let low4 = _mm256_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut min_acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let y = a.add(b * Q8K_SIZE);
        let dy = f32_splat(y);
        let qy = y.add(Q8K_QS);
        let bsums = load256(y.add(Q8K_BSUMS));
        for r in 0..R {
            let x = w[r].add(b * SIZE);
            let (scales, mins) = k4_scales_mins_packed(x.add(4));
            let mins = _mm_cvtsi64_si128(mins as i64);
            let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins, mins));
            let min_sums = _mm256_madd_epi16(mins, bsums);
            let dmin = _mm256_mul_ps(f16_splat(x.add(2)), dy);
            min_acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(min_sums), dmin, min_acc[r]);

            let scales =
                _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(scales as i64)));
            // Bit 2j of qh[l] is bit 4 of element 64j + l, bit 2j + 1 that of 64j + 32 + l.
            let mut qh = load256(x.add(16));
            let mut sums = _mm256_setzero_si256();
            for j in 0..4 {
                let q = load256(x.add(48 + 32 * j));
                let lo = _mm256_and_si256(q, low4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
                let lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16::<4>(qh), bit4));
                let hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16::<3>(qh), bit4));
                qh = _mm256_srli_epi16::<2>(qh);
                let p_lo = _mm256_maddubs_epi16(lo, load256(qy.add(64 * j)));
                let p_hi = _mm256_maddubs_epi16(hi, load256(qy.add(64 * j + 32)));
                let p_lo = _mm256_madd_epi16(p_lo, scale_one(scales, 2 * j));
                let p_hi = _mm256_madd_epi16(p_hi, scale_one(scales, 2 * j + 1));
                sums = _mm256_add_epi32(sums, _mm256_add_epi32(p_lo, p_hi));
            }
            let d = _mm256_mul_ps(f16_splat(x), dy);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]) - hsum(min_acc[r]);
    }
    out
}

/// The eight scales of half `h` of a Q6_K block (of the sixteen in `scales`, widened to
/// i16) in both 128-bit halves.
#[inline(always)]
unsafe fn q6_k_half_scales(scales: __m256i, h: usize) -> __m256i {
    if h == 0 {
        _mm256_permute2x128_si256::<0x00>(scales, scales)
    } else {
        _mm256_permute2x128_si256::<0x11>(scales, scales)
    }
}

/// The 128 unsigned 6-bit values of half `h` of the Q6_K block at `x`, as four registers
/// of 32 bytes: low four bits from `ql`, bits 4 and 5 from `qh`.
#[inline(always)]
pub(super) unsafe fn q6_k_values(x: *const u8, h: usize) -> [__m256i; 4] {
    let (low4, bits45) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    let ql_a = load256(x.add(64 * h));
    let ql_b = load256(x.add(64 * h + 32));
    let qh = load256(x.add(128 + 32 * h));
    [
        _mm256_or_si256(
            _mm256_and_si256(ql_a, low4),
            _mm256_and_si256(_mm256_slli_epi16::<4>(qh), bits45),
        ),
        _mm256_or_si256(
            _mm256_and_si256(ql_b, low4),
            _mm256_and_si256(_mm256_slli_epi16::<2>(qh), bits45),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql_a), low4),
            _mm256_and_si256(qh, bits45),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql_b), low4),
            _mm256_and_si256(_mm256_srli_epi16::<2>(qh), bits45),
        ),
    ]
}

/// Q6_K: unsigned 6-bit values `u = w + 32`; `32 * sum(scale * bsum)` is taken off the
/// products before they become floats.
/// # Safety
/// Inlined into `#[target_feature]` wrappers of every level that runs AVX2 (they differ in
/// registers and instruction selection, not in arithmetic).
#[inline(always)]
pub(super) unsafe fn q6_k_body<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    const SIZE: usize = 210;
    let blocks = common_blocks(GgmlType::Q6K, &rows, act, n);
    let a = act.as_ptr();
    let w = rows.map(<[u8]>::as_ptr);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let y = a.add(b * Q8K_SIZE);
        let dy = f32_splat(y);
        let qy = y.add(Q8K_QS);
        let bsums = load256(y.add(Q8K_BSUMS));
        for r in 0..R {
            let x = w[r].add(b * SIZE);
            let scales = _mm256_cvtepi8_epi16(load128(x.add(192)));
            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(scales, bsums));
            let mut sums = _mm256_sub_epi32(_mm256_setzero_si256(), offset);
            for h in 0..2 {
                let half_scales = q6_k_half_scales(scales, h);
                let values = q6_k_values(x, h);
                for (k, u) in values.into_iter().enumerate() {
                    let p = _mm256_maddubs_epi16(u, load256(qy.add(128 * h + 32 * k)));
                    let p = _mm256_madd_epi16(p, scale_pair(half_scales, k));
                    sums = _mm256_add_epi32(sums, p);
                }
            }
            let d = _mm256_mul_ps(f16_splat(x.add(208)), dy);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
    out
}

// The steps Q4_K and Q5_K share in their rows-by-tokens kernels (block layout: f16 d,
// f16 dmin, 12 bytes of packed 6-bit scales and mins, then the quants), each doing per
// token exactly what the one-row kernels do.

/// Adds every token's `dmin · Σ min · bsum` share of block `b` (at `x`) to `min_acc` and
/// returns the block's eight sub-block scales, broadcast for [`k_pair_products`].
#[inline(always)]
unsafe fn k_block_mins<const T: usize>(
    x: *const u8,
    a: [*const u8; T],
    b: usize,
    min_acc: &mut [__m256; T],
) -> __m256i {
    let (scales, mins) = k4_scales_mins_packed(x.add(4));
    let mins = _mm_cvtsi64_si128(mins as i64);
    let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins, mins));
    let dmin_x = f16_splat(x.add(2));
    for t in 0..T {
        let y = a[t].add(b * Q8K_SIZE);
        let min_sums = _mm256_madd_epi16(mins, load256(y.add(Q8K_BSUMS)));
        let dmin = _mm256_mul_ps(dmin_x, f32_splat(y));
        min_acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(min_sums), dmin, min_acc[t]);
    }
    _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(scales as i64)))
}

/// Adds to every token's integer sums the scaled products of sub-blocks `2j` (`lo`) and
/// `2j + 1` (`hi`) of block `b` with its activations.
#[inline(always)]
unsafe fn k_pair_products<const T: usize>(
    lo: __m256i,
    hi: __m256i,
    scales: __m256i,
    j: usize,
    a: [*const u8; T],
    b: usize,
    sums: &mut [__m256i; T],
) {
    let (s_lo, s_hi) = (scale_one(scales, 2 * j), scale_one(scales, 2 * j + 1));
    for t in 0..T {
        let qy = a[t].add(b * Q8K_SIZE + Q8K_QS);
        let p_lo = _mm256_maddubs_epi16(lo, load256(qy.add(64 * j)));
        let p_hi = _mm256_maddubs_epi16(hi, load256(qy.add(64 * j + 32)));
        let p_lo = _mm256_madd_epi16(p_lo, s_lo);
        let p_hi = _mm256_madd_epi16(p_hi, s_hi);
        sums[t] = _mm256_add_epi32(sums[t], _mm256_add_epi32(p_lo, p_hi));
    }
}

/// Folds block `b`'s integer sums into every token's float accumulator, scaled by
/// `d · d_y`.
#[inline(always)]
unsafe fn k_block_scale<const T: usize>(
    x: *const u8,
    a: [*const u8; T],
    b: usize,
    sums: &[__m256i; T],
    acc: &mut [__m256; T],
) {
    let d_x = f16_splat(x);
    for t in 0..T {
        let d = _mm256_mul_ps(d_x, f32_splat(a[t].add(b * Q8K_SIZE)));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[t]), d, acc[t]);
    }
}

/// One Q5_K row by `T` tokens: each block's nibbles and scales are unpacked once and meet
/// every token's activations; per token, [`q5_k_body`]'s operations in its order.
/// # Safety
/// As for [`q5_k_body`]; every activation row holds as many blocks as `row`.
#[inline(always)]
pub(super) unsafe fn q5_k_tokens_body<const T: usize>(
    row: &[u8],
    ahead: Option<*const u8>,
    acts: [&[u8]; T],
    n: usize,
) -> [f32; T] {
    const SIZE: usize = 176;
    let blocks = common_blocks(GgmlType::Q5K, &[row], acts[0], n);
    let a = acts.map(<[u8]>::as_ptr);
    let w = row.as_ptr();
    let low4 = _mm256_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = [_mm256_setzero_ps(); T];
    let mut min_acc = [_mm256_setzero_ps(); T];
    for b in 0..blocks {
        if let Some(ahead) = ahead {
            prefetch(ahead.wrapping_add(b * SIZE), SIZE);
        }
        let x = w.add(b * SIZE);
        let scales = k_block_mins(x, a, b, &mut min_acc);
        let mut sums = [_mm256_setzero_si256(); T];
        let mut qh = load256(x.add(16));
        for j in 0..4 {
            let q = load256(x.add(48 + 32 * j));
            let lo = _mm256_and_si256(q, low4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
            let lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16::<4>(qh), bit4));
            let hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16::<3>(qh), bit4));
            qh = _mm256_srli_epi16::<2>(qh);
            k_pair_products(lo, hi, scales, j, a, b, &mut sums);
        }
        k_block_scale(x, a, b, &sums, &mut acc);
    }
    std::array::from_fn(|t| hsum(acc[t]) - hsum(min_acc[t]))
}

/// How many tokens of a batch of `batch` llama.cpp multiplies by a Q6_K matrix with its
/// tiled kernel (`ggml-cpu/tiled`, taken by `ggml_compute_forward_mul_mat` for the K-quants
/// when the batch has at least 8 tokens, unless `GGML_CPU_TILED_MM=0`): all or none.
pub(super) use super::token_lanes::q6_k_tiled_tokens;

/// One Q6_K row by `T` tokens, as [`q5_k_tokens_body`] is to [`q5_k_body`]. `TILED = false`:
/// per token, [`q6_k_body`]'s (`ggml_vec_dot_q6_K_q8_K`'s) arithmetic. `TILED = true`:
/// llama.cpp's tiled kernel's (`tiled_run_microtile`): per super-block the exact integer
/// `S = Σ scale (Σ q6 q8 - 32 bsum)` (the sum of the vec_dot's eight lanes), then
/// `r = (float) S * d_x` and `acc = fma(r, d_y, acc)`, super-block after super-block.
/// # Safety
/// As for [`q6_k_body`]; every activation row holds as many blocks as `row`.
#[inline(always)]
pub(super) unsafe fn q6_k_tokens_body<const T: usize, const TILED: bool>(
    row: &[u8],
    ahead: Option<*const u8>,
    acts: [&[u8]; T],
    n: usize,
) -> [f32; T] {
    const SIZE: usize = 210;
    let blocks = common_blocks(GgmlType::Q6K, &[row], acts[0], n);
    let a = acts.map(<[u8]>::as_ptr);
    let w = row.as_ptr();
    let mut acc = [_mm256_setzero_ps(); T];
    // TILED: tokens 4q..4q + 4 in the lanes of tiled4[q], any others in `tiled`.
    let mut tiled4 = [_mm_setzero_ps(); T];
    let mut tiled = [0f32; T];
    for b in 0..blocks {
        if let Some(ahead) = ahead {
            prefetch(ahead.wrapping_add(b * SIZE), SIZE);
        }
        let x = w.add(b * SIZE);
        let scales = _mm256_cvtepi8_epi16(load128(x.add(192)));
        let mut sums = [_mm256_setzero_si256(); T];
        for t in 0..T {
            let bsums = load256(a[t].add(b * Q8K_SIZE + Q8K_BSUMS));
            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(scales, bsums));
            sums[t] = _mm256_sub_epi32(_mm256_setzero_si256(), offset);
        }
        for h in 0..2 {
            let half_scales = q6_k_half_scales(scales, h);
            let values = q6_k_values(x, h);
            for (k, u) in values.into_iter().enumerate() {
                let scale = scale_pair(half_scales, k);
                for t in 0..T {
                    let qy = a[t].add(b * Q8K_SIZE + Q8K_QS + 128 * h + 32 * k);
                    let p = _mm256_maddubs_epi16(u, load256(qy));
                    sums[t] = _mm256_add_epi32(sums[t], _mm256_madd_epi16(p, scale));
                }
            }
        }
        if TILED {
            let d_x = super::blocks::f16_bits_to_f32(x.add(208).cast::<u16>().read_unaligned());
            let d_y = |t: usize| a[t].add(b * Q8K_SIZE).cast::<f32>().read_unaligned();
            // Four tokens at a time: their totals side by side (`hadd`s, then the halves).
            for q in 0..T / 4 {
                let [t0, t1, t2, t3] = [4 * q, 4 * q + 1, 4 * q + 2, 4 * q + 3];
                let h = _mm256_hadd_epi32(
                    _mm256_hadd_epi32(sums[t0], sums[t1]),
                    _mm256_hadd_epi32(sums[t2], sums[t3]),
                );
                let totals =
                    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
                let r = _mm_mul_ps(_mm_cvtepi32_ps(totals), _mm_set1_ps(d_x));
                let d_y = _mm_setr_ps(d_y(t0), d_y(t1), d_y(t2), d_y(t3));
                tiled4[q] = _mm_fmadd_ps(r, d_y, tiled4[q]);
            }
            for t in T / 4 * 4..T {
                let r = hsum_i32(sums[t]) as f32 * d_x;
                tiled[t] = r.mul_add(d_y(t), tiled[t]);
            }
        } else {
            let d_x = f16_splat(x.add(208));
            for t in 0..T {
                let d = _mm256_mul_ps(d_x, f32_splat(a[t].add(b * Q8K_SIZE)));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[t]), d, acc[t]);
            }
        }
    }
    if TILED {
        for q in 0..T / 4 {
            _mm_storeu_ps(tiled.as_mut_ptr().add(4 * q), tiled4[q]);
        }
        return tiled;
    }
    let mut out = [0f32; T];
    for t in 0..T {
        out[t] = hsum(acc[t]);
    }
    out
}

/// # Safety
/// Inlined into `#[target_feature]` wrappers of every level that runs AVX2 (they differ in
/// registers and instruction selection, not in arithmetic).
#[inline(always)]
pub(super) unsafe fn q2_k_body<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    const SIZE: usize = 84;
    let blocks = common_blocks(GgmlType::Q2K, &rows, act, n);
    let a = act.as_ptr();
    let w = rows.map(<[u8]>::as_ptr);
    let low2 = _mm256_set1_epi8(3);
    let low4 = _mm_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut min_acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let y = a.add(b * Q8K_SIZE);
        let dy = f32_splat(y);
        let qy = y.add(Q8K_QS);
        let bsums = load256(y.add(Q8K_BSUMS));
        for r in 0..R {
            let x = w[r].add(b * SIZE);
            let packed = load128(x);
            let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(packed), low4));
            let min_sums = _mm256_madd_epi16(mins, bsums);
            let dmin = _mm256_mul_ps(f16_splat(x.add(82)), dy);
            min_acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(min_sums), dmin, min_acc[r]);

            let scales = _mm256_cvtepu8_epi16(_mm_and_si128(packed, low4));
            let mut sums = _mm256_setzero_si256();
            for h in 0..2 {
                let half_scales = if h == 0 {
                    _mm256_permute2x128_si256::<0x00>(scales, scales)
                } else {
                    _mm256_permute2x128_si256::<0x11>(scales, scales)
                };
                let mut q = load256(x.add(16 + 32 * h));
                for k in 0..4 {
                    let u = _mm256_and_si256(q, low2);
                    q = _mm256_srli_epi16::<2>(q);
                    let p = _mm256_maddubs_epi16(u, load256(qy.add(128 * h + 32 * k)));
                    sums = _mm256_add_epi32(sums, _mm256_madd_epi16(p, scale_pair(half_scales, k)));
                }
            }
            let d = _mm256_mul_ps(f16_splat(x.add(80)), dy);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]) - hsum(min_acc[r]);
    }
    out
}

/// Q3_K: unsigned 3-bit values `u = w + 4`; `4 * sum(scale * bsum)` is taken off.
/// # Safety
/// Inlined into `#[target_feature]` wrappers of every level that runs AVX2 (they differ in
/// registers and instruction selection, not in arithmetic).
#[inline(always)]
pub(super) unsafe fn q3_k_body<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    const SIZE: usize = 110;
    let blocks = common_blocks(GgmlType::Q3K, &rows, act, n);
    let a = act.as_ptr();
    let w = rows.map(<[u8]>::as_ptr);
    let low2 = _mm256_set1_epi8(3);
    let bit2 = _mm256_set1_epi8(4);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let y = a.add(b * Q8K_SIZE);
        let dy = f32_splat(y);
        let qy = y.add(Q8K_QS);
        let bsums = load256(y.add(Q8K_BSUMS));
        for r in 0..R {
            let x = w[r].add(b * SIZE);
            let scales = _mm256_cvtepi8_epi16(q3k_scales_i8(x.add(96)));
            let offset = _mm256_slli_epi32::<2>(_mm256_madd_epi16(scales, bsums));
            let mut sums = _mm256_sub_epi32(_mm256_setzero_si256(), offset);
            // Bit 4h + k of hmask[l] is the high bit of element 128h + 32k + l.
            let mut hmask = load256(x);
            for h in 0..2 {
                let half_scales = if h == 0 {
                    _mm256_permute2x128_si256::<0x00>(scales, scales)
                } else {
                    _mm256_permute2x128_si256::<0x11>(scales, scales)
                };
                let mut q = load256(x.add(32 + 32 * h));
                for k in 0..4 {
                    let high = _mm256_and_si256(_mm256_slli_epi16::<2>(hmask), bit2);
                    hmask = _mm256_srli_epi16::<1>(hmask);
                    let u = _mm256_or_si256(_mm256_and_si256(q, low2), high);
                    q = _mm256_srli_epi16::<2>(q);
                    let p = _mm256_maddubs_epi16(u, load256(qy.add(128 * h + 32 * k)));
                    sums = _mm256_add_epi32(sums, _mm256_madd_epi16(p, scale_pair(half_scales, k)));
                }
            }
            let d = _mm256_mul_ps(f16_splat(x.add(108)), dy);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_k_q8_k<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    let blocks = common_blocks(GgmlType::Q8K, &rows, act, n);
    let a = act.as_ptr();
    let w = rows.map(<[u8]>::as_ptr);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let y = a.add(b * Q8K_SIZE);
        let dy = f32_splat(y);
        for r in 0..R {
            let x = w[r].add(b * Q8K_SIZE);
            let mut sums = _mm256_setzero_si256();
            for j in 0..8 {
                let qx = load256(x.add(Q8K_QS + 32 * j));
                let qy = load256(y.add(Q8K_QS + 32 * j));
                sums = _mm256_add_epi32(sums, dot_i8_i8(qx, qy));
            }
            let d = _mm256_mul_ps(f32_splat(x), dy);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), d, acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
    out
}

// ---- Float formats ----------------------------------------------------------------------
//
// Products summed in four f32 accumulators of eight lanes (32 elements per step), the
// remainder of fewer than 32 elements in eight-lane steps and then one by one. The scalar
// kernels sum in f64, so these agree with them to `(n / 8 + 8) * 2^-24 * sum |x y|`.

/// Widens eight elements at `p` to f32.
pub(super) trait FloatElements {
    const TY: GgmlType;
    const BYTES: usize;
    /// # Safety
    /// `p` must be readable for eight elements; the CPU must run AVX2/FMA/F16C.
    unsafe fn load8(p: *const u8) -> __m256;
    /// # Safety
    /// `p` must be readable for one element.
    unsafe fn load1(p: *const u8) -> f32;
}

struct F32Elements;
pub(super) struct Bf16Elements;

impl FloatElements for F32Elements {
    const TY: GgmlType = GgmlType::F32;
    const BYTES: usize = 4;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_loadu_ps(p.cast())
    }
    #[inline(always)]
    unsafe fn load1(p: *const u8) -> f32 {
        p.cast::<f32>().read_unaligned()
    }
}

impl FloatElements for Bf16Elements {
    const TY: GgmlType = GgmlType::BF16;
    const BYTES: usize = 2;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(load128(p))))
    }
    #[inline(always)]
    unsafe fn load1(p: *const u8) -> f32 {
        super::blocks::bf16_bits_to_f32(p.cast::<u16>().read_unaligned())
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_dot<E: FloatElements, const R: usize>(
    rows: [&[u8]; R],
    act: &[u8],
    n: usize,
) -> [f32; R] {
    let len = common_blocks(E::TY, &rows, act, n);
    let a = act.as_ptr();
    let w = rows.map(<[u8]>::as_ptr);
    let mut out = [0f32; R];
    for r in 0..R {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= len {
            for (k, acc) in acc.iter_mut().enumerate() {
                let at = (i + 8 * k) * E::BYTES;
                *acc = _mm256_fmadd_ps(E::load8(w[r].add(at)), E::load8(a.add(at)), *acc);
            }
            i += 32;
        }
        while i + 8 <= len {
            let at = i * E::BYTES;
            acc[0] = _mm256_fmadd_ps(E::load8(w[r].add(at)), E::load8(a.add(at)), acc[0]);
            i += 8;
        }
        let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut tail = 0f32;
        while i < len {
            let at = i * E::BYTES;
            tail += E::load1(w[r].add(at)) * E::load1(a.add(at));
            i += 1;
        }
        out[r] = hsum(total) + tail;
    }
    out
}

/// One row of a float format by `T` tokens: each group of eight weights is widened once
/// for all the tokens; per token, [`float_dot`]'s accumulators, order and tail.
/// # Safety
/// As for [`float_dot`]; every activation row holds as many elements as `row`.
#[inline(always)]
pub(super) unsafe fn float_tokens_body<E: FloatElements, const T: usize>(
    row: &[u8],
    ahead: Option<*const u8>,
    acts: [&[u8]; T],
    n: usize,
) -> [f32; T] {
    let len = common_blocks(E::TY, &[row], acts[0], n);
    let a = acts.map(<[u8]>::as_ptr);
    let w = row.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 4]; T];
    let mut i = 0;
    while i + 32 <= len {
        if let Some(ahead) = ahead {
            prefetch(ahead.wrapping_add(i * E::BYTES), 32 * E::BYTES);
        }
        for k in 0..4 {
            let at = (i + 8 * k) * E::BYTES;
            let x = E::load8(w.add(at));
            for t in 0..T {
                acc[t][k] = _mm256_fmadd_ps(x, E::load8(a[t].add(at)), acc[t][k]);
            }
        }
        i += 32;
    }
    while i + 8 <= len {
        let at = i * E::BYTES;
        let x = E::load8(w.add(at));
        for t in 0..T {
            acc[t][0] = _mm256_fmadd_ps(x, E::load8(a[t].add(at)), acc[t][0]);
        }
        i += 8;
    }
    let mut out = [0f32; T];
    for t in 0..T {
        let [a0, a1, a2, a3] = acc[t];
        let total = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        let mut tail = 0f32;
        for j in i..len {
            let at = j * E::BYTES;
            tail += E::load1(w.add(at)) * E::load1(a[t].add(at));
        }
        out[t] = hsum(total) + tail;
    }
    out
}

use super::dot_f16::tokens_avx2 as f16_tokens;

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_tokens<const T: usize>(
    rows: [&[u8]; 4],
    acts: [&[u8]; T],
    n: usize,
) -> [[f32; 4]; T] {
    rows_by_tokens::<T>(rows, |row, ahead| {
        float_tokens_body::<Bf16Elements, T>(row, ahead, acts, n)
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_f32<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    float_dot::<F32Elements, R>(rows, act, n)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bf16_bf16<const R: usize>(rows: [&[u8]; R], act: &[u8], n: usize) -> [f32; R] {
    float_dot::<Bf16Elements, R>(rows, act, n)
}

// ---- Activation quantisation ------------------------------------------------------------
//
// Bit-identical to `activation::quantize_q8_*` for finite input. A block holding NaN or
// infinity quantises differently (C leaves the conversion undefined there too).

/// Largest of the eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn abs(v: __m256) -> __m256 {
    _mm256_andnot_ps(_mm256_set1_ps(-0.0), v)
}

/// Four vectors of eight i32 (each within i8 range) as 32 bytes in element order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pack_i32_to_i8(q: [__m256i; 4]) -> __m256i {
    // The packs interleave the 128-bit halves; the permutation puts them back in order.
    let ab = _mm256_packs_epi32(q[0], q[1]);
    let cd = _mm256_packs_epi32(q[2], q[3]);
    let bytes = _mm256_packs_epi16(ab, cd);
    _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// f32 -> f16 bits, rounding to nearest even (as `half::f16::from_f32`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_bits(v: f32) -> u16 {
    let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v));
    _mm_extract_epi16::<0>(h) as u16
}

/// Q8_0 (`WITH_SUM = false`) or Q8_1 blocks of `x` into `out`: ggml's AVX2
/// `quantize_row_q8_0` / `quantize_row_q8_1`, operation for operation (multiplier
/// `127 / amax`, `vroundps` to nearest even, saturating packs).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_0_or_1<const WITH_SUM: bool>(x: &[f32], out: &mut [u8]) {
    let size = if WITH_SUM { 36 } else { 34 };
    let quants_at = size - 32;
    let blocks = (x.len() / 32).min(out.len() / size);
    let src = x.as_ptr();
    let dst = out.as_mut_ptr();
    for b in 0..blocks {
        let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(src.add(32 * b + 8 * k)));
        let amax = hmax(_mm256_max_ps(
            _mm256_max_ps(abs(v[0]), abs(v[1])),
            _mm256_max_ps(abs(v[2]), abs(v[3])),
        ));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let q = v.map(|v| {
            let scaled = _mm256_mul_ps(v, id);
            let rounded =
                _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(scaled);
            _mm256_cvtps_epi32(rounded)
        });
        let block = dst.add(b * size);
        block.cast::<u16>().write_unaligned(f16_bits(d));
        if WITH_SUM {
            let sum = hsum_i32(_mm256_add_epi32(
                _mm256_add_epi32(q[0], q[1]),
                _mm256_add_epi32(q[2], q[3]),
            ));
            block
                .add(2)
                .cast::<u16>()
                .write_unaligned(f16_bits(d * sum as f32));
        }
        _mm256_storeu_si256(block.add(quants_at).cast(), pack_i32_to_i8(q));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_k_blocks(x: &[f32], out: &mut [u8]) {
    let blocks = (x.len() / 256).min(out.len() / Q8K_SIZE);
    for b in 0..blocks {
        let src = x.as_ptr().add(256 * b);
        let block = out.as_mut_ptr().add(b * Q8K_SIZE);
        let mut m = _mm256_setzero_ps();
        for k in 0..32 {
            m = _mm256_max_ps(m, abs(_mm256_loadu_ps(src.add(8 * k))));
        }
        let amax = hmax(m);
        if amax == 0.0 {
            std::ptr::write_bytes(block, 0, Q8K_SIZE);
            continue;
        }
        // The signed value of the first element of largest magnitude sets the scale's sign.
        let target = _mm256_set1_ps(amax);
        let mut max = amax;
        for k in 0..32 {
            let v = _mm256_loadu_ps(src.add(8 * k));
            let hits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(abs(v), target));
            if hits != 0 {
                max = *src.add(8 * k + hits.trailing_zeros() as usize);
                break;
            }
        }
        let iscale = -127.0 / max;
        let scale = _mm256_set1_ps(iscale);
        let cap = _mm256_set1_epi32(127);
        for g in 0..8 {
            let q: [__m256i; 4] = std::array::from_fn(|k| {
                let v = _mm256_mul_ps(scale, _mm256_loadu_ps(src.add(32 * g + 8 * k)));
                let rounded =
                    _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                _mm256_min_epi32(_mm256_cvtps_epi32(rounded), cap)
            });
            _mm256_storeu_si256(block.add(Q8K_QS + 32 * g).cast(), pack_i32_to_i8(q));
            let sums = [
                hsum_i32(_mm256_add_epi32(q[0], q[1])),
                hsum_i32(_mm256_add_epi32(q[2], q[3])),
            ];
            for (i, sum) in sums.into_iter().enumerate() {
                let at = block.add(Q8K_BSUMS + 2 * (2 * g + i));
                at.cast::<i16>().write_unaligned(sum as i16);
            }
        }
        block.cast::<f32>().write_unaligned(1.0 / iscale);
    }
}
