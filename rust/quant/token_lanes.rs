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

/// Vectors per block: eight of quants, eight of starting sums, one of scales.
const VECTORS_PER_BLOCK: usize = 2 * LANES_PER_BLOCK + 1;

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
/// Tokens past [`Self::tokens`] are zero (their results are zero and ignored). Buffers are
/// kept between builds, so rebuilding for inputs of the same size does not allocate.
#[derive(Clone, Debug, Default)]
pub struct TokenLanes {
    tokens: usize,
    blocks: usize,
    offset: i32,
    vectors: Vec<TokenVector>,
}

impl TokenLanes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Transposes `acts` (at most [`LANE_TOKENS`] Q8_0 rows of one length) for weights stored
    /// with `offset`. Returns false, leaving nothing usable, when the rows are not that.
    pub fn build(&mut self, acts: &[QuantizedActivations], offset: i32) -> bool {
        const BLOCK: usize = 34;
        let Some(first) = acts.first() else {
            return false;
        };
        let blocks = first.len() / 32;
        let usable = acts.len() <= LANE_TOKENS
            && acts.iter().all(|a| {
                a.format() == GgmlType::Q8_0
                    && a.len() == first.len()
                    && a.bytes().len() >= blocks * BLOCK
                    && a.block_scales().len() >= blocks
            });
        self.tokens = 0;
        self.blocks = 0;
        if !usable {
            return false;
        }
        self.vectors.clear();
        self.vectors
            .resize(blocks * VECTORS_PER_BLOCK, TokenVector::default());
        for (t, act) in acts.iter().enumerate() {
            let (bytes, scales) = (act.bytes(), act.block_scales());
            for (b, block) in self.vectors.chunks_exact_mut(VECTORS_PER_BLOCK).enumerate() {
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
        true
    }

    /// Tokens held (the first lanes).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Blocks of 32 elements per token.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// The weight offset the starting sums are for.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Block `b`'s quants (lane `k` at `[k]`), starting sums (at `[8 + k]`) and scales
    /// (at `[16]`); `b < blocks()`.
    pub fn block(&self, b: usize) -> &[TokenVector] {
        &self.vectors[b * VECTORS_PER_BLOCK..(b + 1) * VECTORS_PER_BLOCK]
    }
}

/// Two weight rows of a 32-element format against the tokens of a [`TokenLanes`] built for
/// the format's offset: `out[t][i] = rows[i] · token t` for `t < lanes.tokens()`, each
/// bit-identical to `DotFn(rows[i], token t)` of the same kernel set. Rows shorter than
/// the activations are the caller's error (results are then unspecified, never out of
/// bounds); see `Kernels::dot_lanes` for which types have one.
pub type DotLanesFn = fn(rows: [&[u8]; 2], lanes: &TokenLanes, out: &mut [[f32; 2]; LANE_TOKENS]);

/// The stored-value offset of `ty`'s weights in the lanes kernels, for the types that have
/// them.
pub fn lanes_offset(ty: GgmlType) -> Option<i32> {
    match ty {
        GgmlType::Q4_0 => Some(8),
        GgmlType::Q5_0 => Some(16),
        GgmlType::Q8_0 => Some(128),
        _ => None,
    }
}
