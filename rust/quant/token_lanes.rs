//! Q8_0 activations of up to [`LANE_TOKENS`] tokens laid out with the tokens across the
//! lanes of a 512-bit register, for the AVX-512 prefill kernels of the 32-element formats.
//!
//! The rows-by-tokens kernels keep a (row, token) pair's eight ggml lanes in one half of a
//! register, so every (row, token, block) needs its own `d * dy` product and activation
//! loads: per 64 multiply-adds of `vpdpbusd`, a multiply, a conversion and an FMA besides.
//! With sixteen tokens across the register instead, a weight dword is broadcast to all
//! of them and one `d * dy` vector serves a whole block of a row, so the only float work
//! left per `vpdpbusd` is what the arithmetic demands (ggml's conversion and FMA per lane).
//! The lane sums and float operations of each (row, token) pair stay those of the
//! single-token kernels (`dot_avx2`'s `q8_0_q8_0` and `small_one`): the same results, bit
//! for bit, only computed sixteen tokens at a time.

use super::{GgmlType, QuantizedActivations};

/// Tokens per register (16 lanes of 32 bits).
pub const LANE_TOKENS: usize = 16;

/// ggml's lanes per block of 32 elements: lane `k` sums elements `4k..4k+4`.
const LANES_PER_BLOCK: usize = 8;

/// Vectors per Q8_0 block: eight of quants, eight of starting sums, one of scales.
const VECTORS_PER_BLOCK: usize = 2 * LANES_PER_BLOCK + 1;

/// Vectors per Q8_K super-block: 64 of quants, four of 32-element sums, one of scales,
/// eight of 16-element sums.
const VECTORS_PER_SUPER_BLOCK: usize = 64 + 4 + 1 + 8;

/// One 512-bit vector: a 32-bit value per token.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
pub struct TokenVector(pub [u32; LANE_TOKENS]);

/// Up to [`LANE_TOKENS`] tokens' Q8_0 activation rows, transposed for weights whose stored
/// values exceed the weights by `offset` (0 for none, 8 for Q4_0, 16 for Q5_0, 128 for Q8_0
/// weights stored with the sign bit flipped). Per block, vector by vector:
/// - lanes `k = 0..8`: each token's quants `4k..4k+4` as one little-endian dword;
/// - lanes `k = 0..8`: each token's `-offset * sum(y[4k..4k+4])`, the share a product with
///   offset weights starts from so that `vpdpbusd` leaves `sum(w * y)`;
/// - each token's block scale `dy` (f32 bits).
///
/// Or, built by [`Self::build_q8_k`], Q8_K rows for the K-quant kernels; per super-block:
/// - dwords `k = 0..64` of each token's 256 quants;
/// - pairs `p = 0..4`: each token's sums over sub-blocks `2p` and `2p + 1` (32 quants each,
///   from its `bsums`), as two i16 in a dword, for `vpmaddwd` with the pair's minimums;
/// - each token's `d` (f32 bits);
/// - pairs `i = 0..8`: each token's `bsums[2i]` and `bsums[2i + 1]` (sums of 16 quants), two
///   i16 in a dword, for `vpmaddwd` with Q6_K's pairs of scales.
///
/// Tokens past [`Self::tokens`] are zero (their results are zero and ignored). Buffers are
/// kept between builds, so rebuilding for inputs of the same size does not allocate.
#[derive(Clone, Debug, Default)]
pub struct TokenLanes {
    tokens: usize,
    blocks: usize,
    offset: i32,
    /// Whether the tokens take llama.cpp's batched arithmetic (see `quant::DotBatchFn`).
    batched: bool,
    per_block: usize,
    vectors: Vec<TokenVector>,
}

impl TokenLanes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Empties the layout and, when `acts` are at most [`LANE_TOKENS`] whole rows of `format`
    /// of one length (with their block scales), makes room for them: `per_block` zeroed
    /// vectors per block. Returns the block count.
    fn reset(
        &mut self,
        acts: &[QuantizedActivations],
        format: GgmlType,
        per_block: usize,
    ) -> Option<usize> {
        self.tokens = 0;
        self.blocks = 0;
        let first = acts.first()?;
        let blocks = first.len() / format.block_size();
        let block_bytes = format.bytes_for((blocks * format.block_size()) as u64)? as usize;
        let scales = if format == GgmlType::Q8_0 { blocks } else { 0 };
        let usable = acts.len() <= LANE_TOKENS
            && acts.iter().all(|a| {
                a.format() == format
                    && a.len() == first.len()
                    && a.bytes().len() >= block_bytes
                    && a.block_scales().len() >= scales
            });
        if !usable {
            return None;
        }
        if acts.len() < LANE_TOKENS {
            // The lanes past the tokens must read zero.
            self.vectors.clear();
        }
        // A full group overwrites every lane, so the buffer is only resized, not zeroed.
        self.vectors
            .resize(blocks * per_block, TokenVector::default());
        Some(blocks)
    }

    /// Transposes `acts` (at most [`LANE_TOKENS`] Q8_0 rows of one length) for weights stored
    /// with `offset`. Returns false, leaving nothing usable, when the rows are not that.
    pub fn build(&mut self, acts: &[QuantizedActivations], offset: i32) -> bool {
        const BLOCK: usize = 34;
        let Some(blocks) = self.reset(acts, GgmlType::Q8_0, VECTORS_PER_BLOCK) else {
            return false;
        };
        // Block by block, so a block's vectors are filled while they sit in L1.
        for (b, block) in self.vectors.chunks_exact_mut(VECTORS_PER_BLOCK).enumerate() {
            for (t, act) in acts.iter().enumerate() {
                let (bytes, scales) = (act.bytes(), act.block_scales());
                let quants = &bytes[b * BLOCK + 2..(b + 1) * BLOCK];
                for (k, four) in quants.chunks_exact(4).enumerate() {
                    let sum: i32 = four.iter().map(|&q| i32::from(q as i8)).sum();
                    block[k].0[t] = u32::from_le_bytes([four[0], four[1], four[2], four[3]]);
                    block[LANES_PER_BLOCK + k].0[t] = (-offset * sum) as u32;
                }
                block[2 * LANES_PER_BLOCK].0[t] = scales[b].to_bits();
            }
        }
        self.tokens = acts.len();
        self.blocks = blocks;
        self.offset = offset;
        self.batched = false;
        self.per_block = VECTORS_PER_BLOCK;
        true
    }

    /// Transposes `acts` (at most [`LANE_TOKENS`] Q8_K rows of one length), to be multiplied
    /// with llama.cpp's batched arithmetic or not. Returns false, leaving nothing usable,
    /// when the rows are not that.
    pub fn build_q8_k(&mut self, acts: &[QuantizedActivations], batched: bool) -> bool {
        const BLOCK: usize = 292;
        const QS: usize = 4;
        const BSUMS: usize = 260;
        let Some(blocks) = self.reset(acts, GgmlType::Q8K, VECTORS_PER_SUPER_BLOCK) else {
            return false;
        };
        let vectors = self.vectors.chunks_exact_mut(VECTORS_PER_SUPER_BLOCK);
        for (b, block) in vectors.enumerate() {
            for (t, act) in acts.iter().enumerate() {
                let y = &act.bytes()[b * BLOCK..(b + 1) * BLOCK];
                for (k, four) in y[QS..BSUMS].chunks_exact(4).enumerate() {
                    block[k].0[t] = u32::from_le_bytes([four[0], four[1], four[2], four[3]]);
                }
                let bsum = |i: usize| i16::from_le_bytes([y[BSUMS + 2 * i], y[BSUMS + 2 * i + 1]]);
                // A sub-block's sum is at most 32 * 128 in magnitude: an i16.
                let sub_block = |s: usize| (bsum(2 * s) + bsum(2 * s + 1)) as u16;
                for p in 0..4 {
                    let pair =
                        u32::from(sub_block(2 * p)) | (u32::from(sub_block(2 * p + 1)) << 16);
                    block[64 + p].0[t] = pair;
                }
                block[68].0[t] = u32::from_le_bytes([y[0], y[1], y[2], y[3]]);
                for i in 0..8 {
                    let at = BSUMS + 4 * i;
                    block[69 + i].0[t] =
                        u32::from_le_bytes([y[at], y[at + 1], y[at + 2], y[at + 3]]);
                }
            }
        }
        self.tokens = acts.len();
        self.blocks = blocks;
        self.offset = 0;
        self.batched = batched;
        self.per_block = VECTORS_PER_SUPER_BLOCK;
        true
    }

    /// Whether the tokens take llama.cpp's batched arithmetic ([`Self::build_q8_k`]).
    pub fn batched(&self) -> bool {
        self.batched
    }

    /// Whether the layout is [`Self::build_q8_k`]'s.
    pub fn is_q8_k(&self) -> bool {
        self.per_block == VECTORS_PER_SUPER_BLOCK
    }

    /// Tokens held (the first lanes).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Blocks (of 32 elements, or of 256 for Q8_K) per token.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// The weight offset the starting sums are for.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Block `b`'s vectors in the order the type documentation gives; `b < blocks()`.
    pub fn block(&self, b: usize) -> &[TokenVector] {
        &self.vectors[b * self.per_block..(b + 1) * self.per_block]
    }
}

/// Two weight rows against the tokens of a [`TokenLanes`] built for their type (a 32-element
/// format's offset, or Q8_K for Q4_K): `out[t][i] = rows[i] · token t` for
/// `t < lanes.tokens()`, each bit-identical to `DotFn(rows[i], token t)` of the same kernel
/// set, or for lanes built `batched`, to `DotBatchFn` for a token llama.cpp multiplies with
/// its batched arithmetic. Lanes built for another type give NaN. Rows shorter than the
/// activations are the caller's error (results are then unspecified, never out of bounds);
/// see `Kernels::dot_lanes` for which types have one.
pub type DotLanesFn = fn(rows: [&[u8]; 2], lanes: &TokenLanes, out: &mut [[f32; 2]; LANE_TOKENS]);

/// The stored-value offset of `ty`'s weights in the lanes kernels, for the types that have
/// them (for Q4_K and Q6_K, whose lanes are Q8_K's, 0: their kernels take the offsets off
/// with the block sums).
pub fn lanes_offset(ty: GgmlType) -> Option<i32> {
    match ty {
        GgmlType::Q4_0 => Some(8),
        GgmlType::Q5_0 => Some(16),
        GgmlType::Q8_0 => Some(128),
        GgmlType::Q4K | GgmlType::Q6K => Some(0),
        _ => None,
    }
}

/// How many tokens of a batch of `batch` llama.cpp multiplies by a repacked Q4_K matrix with
/// its gemm (the first `batch - batch % 4`; the rest go through the gemv).
pub fn q4_k_gemm_tokens(batch: usize) -> usize {
    batch - batch % 4
}

/// How many tokens of a batch of `batch` llama.cpp multiplies by a Q6_K matrix with its
/// tiled kernel (`ggml-cpu/tiled`, taken by `ggml_compute_forward_mul_mat` for the K-quants
/// when the batch has at least 8 tokens, unless `GGML_CPU_TILED_MM=0`): all or none.
pub fn q6_k_tiled_tokens(batch: usize) -> usize {
    if batch >= 8 {
        batch
    } else {
        0
    }
}
