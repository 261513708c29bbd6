//! Causal self-attention over the KV cache, computed as llama.cpp's CPU backend computes
//! it (F32 cache, no flash attention), so that its outputs equal llama.cpp's to the bit
//! (see `ggml_f32` for why bits matter):
//!
//! 1. scores `q · k` by `ggml_vec_dot_f32`, times the scale (then the soft-cap, if any);
//! 2. the softmax over the visible positions: the maximum, `exp(s - max)` by ggml's vector
//!    `expf`, summed in blocks of 16 cache slots counted from slot 0 (each block's sum by
//!    the halving tree, the block sums in f64), and every exponential times `1 / sum`;
//! 3. the output `Σ p_j v_j`, one sum per output value along the positions, in the order
//!    of the product llama.cpp uses for it: for a call of several tokens (a prompt)
//!    llamafile's tinyBLAS, 16 lanes with position `j` in lane `j mod 16`; for a single
//!    token `ggml_vec_dot_f32`, 64 partial sums (`j mod 64`) combined as in `ggml_f32::dot`.
//!    A masked position adds an exact zero there, so it is simply left out here.
//!
//! Step 3 runs vectorised along the head dimension: partial sum `k` of every output value
//! is one row of `head_dim` floats, and the rows are combined in the reduction's order.
//!
//! With an f16 cache (llama.cpp's default), llama.cpp converts the other operand of each
//! product to f16 as well: the query before the scores and the probabilities before the
//! values (`vec_dot_type` of f16 is f16). Its f16 dots then widen both sides and sum in the
//! f32 order of the f32 dots above, and a product of two f16 values is exact in f32, so
//! the same code computes them once the query and probabilities are rounded to f16 and the
//! cached rows widened.
//!
//! Work is shared as (token, query heads) items: for a batch, the query heads of a group
//! (up to four, sharing a KV head) go together, so each value is loaded once for all of
//! them; a lone token's heads go one by one. Every output is computed within one item, by
//! the same operations in the same order whichever thread takes it and whichever heads
//! share the item, so results are bit-identical for any thread count and whether or not
//! other sequences share the call.

use std::ops::Range;

use crate::error::{EngineError, Result};
use crate::kernels::ggml_f32::{self, dispatch, round_to_f16, LANES};
use crate::kv_cache::{CacheRows, HeadRun, KvCache, KvType};
use crate::threads::{DisjointSlice, ThreadPool};

/// The attention geometry of one layer.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Multiplies every score before the softmax (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
    /// Whether llama.cpp's graph applies `scale` to the query before the products (gemma3)
    /// rather than to the scores. The same bits either way with an f32 cache (the scale is
    /// a power of two); with an f16 cache the query is rounded after scaling, and a small
    /// component of the scaled query may fall among the f16 subnormals, losing bits that
    /// rounding the unscaled query keeps.
    pub scale_on_query: bool,
    /// `cap · tanh(score / cap)` on every scaled score before the softmax (grok).
    pub logit_softcap: Option<f32>,
    /// Sliding-window layers: a token at `pos` sees only positions `pos + 1 - window ..= pos`.
    pub window: Option<usize>,
}

impl AttentionShape {
    /// Positions a token at `pos` attends to.
    pub fn visible(&self, pos: usize) -> Range<usize> {
        let first = self
            .window
            .map_or(0, |w| (pos + 1).saturating_sub(w.max(1)));
        first..pos + 1
    }

    fn group(&self) -> usize {
        self.n_head / self.n_head_kv
    }
}

/// How llama.cpp sums the weighted values: it depends on how many tokens the call holds,
/// because a product of one column never goes through tinyBLAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueSum {
    /// Several tokens: tinyBLAS, one 16-lane accumulator.
    Batch,
    /// One token: `ggml_vec_dot_f32`, four 16-lane accumulators.
    Single,
}

impl ValueSum {
    fn new(batched: bool) -> Self {
        if batched {
            Self::Batch
        } else {
            Self::Single
        }
    }

    /// Partial sums per output value. ggml's NEON build (without FP16 arithmetic) sums a
    /// batch with tinyBLAS's one 4-lane accumulator and a single token with
    /// `ggml_vec_dot_f16`'s four.
    fn partials(self) -> usize {
        match (self, ggml_f32::arm_arithmetic()) {
            (Self::Batch, false) => LANES,
            (Self::Single, false) => ggml_f32::DOT_STEP,
            (Self::Batch, true) => 4,
            (Self::Single, true) => 16,
        }
    }
}

/// The order of llama.cpp's score products: `ggml_vec_dot_f32` (or `_f16`, whose order is
/// the same) unless the query is converted to f16 for a batch of several tokens. The
/// converted copy is contiguous, and llamafile's tinyBLAS then takes the product (it needs
/// whole vectors of 16 along the head).
///
/// ggml's NEON build without FP16 arithmetic has no tinyBLAS for an f16 query, so every
/// product with an f16 cache goes through its `ggml_vec_dot_f16` ([`Self::F16Neon`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScoreSum {
    VecDot,
    TinyBlas,
    F16Neon,
}

impl ScoreSum {
    fn new(kv_type: KvType, batched: bool, head_dim: usize) -> Self {
        if kv_type == KvType::F16 && ggml_f32::arm_arithmetic() {
            Self::F16Neon
        } else if kv_type == KvType::F16 && batched && head_dim.is_multiple_of(LANES) {
            Self::TinyBlas
        } else {
            Self::VecDot
        }
    }
}

/// Buffers reused from call to call (kept by the sequence, so decoding does not allocate):
/// per thread, one head's scores and partial sums, and which KV head's entries it holds
/// widened from an f16 cache.
#[derive(Default)]
pub struct AttentionScratch {
    per_thread: Vec<f32>,
    widened_for: Vec<Option<WidenedKey>>,
}

/// Which entries a thread's widened copies hold: (job, bit `h` set when KV head `h`'s
/// entries over the job's span are there). Valid within one parallel region only (a cache
/// may change between calls).
type WidenedKey = (usize, u64);

/// Score slots a head needs: the visible positions widened to whole blocks of 16.
fn scores_len(capacity: usize) -> usize {
    capacity.div_ceil(LANES) * LANES + LANES
}

/// Cached rows widened to f32 at a time (from an f16 cache).
const ROW_CHUNK: usize = 2 * LANES;

/// Query heads one work item covers at most. The query heads of a group read the same
/// keys and values, and the value sum loads each value once for all the item's heads.
const MAX_ITEM_HEADS: usize = 4;

/// Query heads per work item of a job of `n_tokens`: for a batch, the largest of 4, 3 and
/// 2 that divides the group (the heads sharing a KV head); for a lone token 1, so that its
/// few items still spread over the threads.
fn heads_per_item(group: usize, n_tokens: usize) -> usize {
    if n_tokens < 2 {
        return 1;
    }
    [4, 3, 2]
        .into_iter()
        .find(|&g| g <= MAX_ITEM_HEADS && group.is_multiple_of(g))
        .unwrap_or(1)
}

/// Work items of a job of `n_tokens`: (token, run of query heads) pairs.
fn job_items(shape: &AttentionShape, n_tokens: usize) -> usize {
    n_tokens * (shape.n_head / heads_per_item(shape.group(), n_tokens))
}

/// Floats of an f16 cache's keys (and as many of its values) a thread widens to f32 at
/// most, over every KV head: the entries a job's tokens see (the span from the first
/// token's window to the last token), widened once per KV head and thread and then read by
/// every query head and token of the job as from an f32 cache. The conversion is paid once
/// per entry, not once per (token, query head). Longer spans are widened a chunk at a time
/// per item instead.
const WIDENED_FLOATS: usize = 1 << 18;

/// Positions of one KV head a thread's widened copies hold (none for an f32 cache).
fn widened_positions(capacity: usize, hd: usize, n_head_kv: usize, kv_type: KvType) -> usize {
    match kv_type {
        KvType::F32 => 0,
        KvType::F16 if n_head_kv > 64 => 0,
        KvType::F16 => capacity.min(WIDENED_FLOATS / (hd * n_head_kv).max(1)),
    }
}

/// Floats of one thread's work buffer: per query head of an item, scores, partial sums and
/// the query as the products see it; a chunk of widened rows; then the widened keys and
/// values of every KV head.
fn work_len(capacity: usize, hd: usize, n_head_kv: usize, kv_type: KvType) -> usize {
    MAX_ITEM_HEADS * (scores_len(capacity) + ggml_f32::DOT_STEP * hd + hd)
        + ROW_CHUNK * hd
        + 2 * n_head_kv * widened_positions(capacity, hd, n_head_kv, kv_type) * hd
}

/// Where one head's visible keys and values are read: the cache's own runs, or a single
/// run widened to f32 beforehand.
#[derive(Clone, Copy)]
enum Entries<'a> {
    /// (cache, layer, KV head).
    Cache(&'a KvCache, usize, usize),
    /// (first position, keys, values).
    Widened(usize, &'a [f32], &'a [f32]),
}

impl<'a> Entries<'a> {
    fn runs(self, visible: Range<usize>) -> impl Iterator<Item = HeadRun<'a>> + 'a {
        let (cached, widened) = match self {
            Self::Cache(kv, layer, kv_head) => (Some(kv.head_runs(layer, kv_head, visible)), None),
            Self::Widened(start, keys, values) => (
                None,
                Some(HeadRun {
                    start,
                    keys: CacheRows::F32(keys),
                    values: CacheRows::F32(values),
                }),
            ),
        };
        cached.into_iter().flatten().chain(widened)
    }
}

/// Rows `first..` of `rows` (whole rows of `hd` values) as f32: an f32 cache's rows as
/// they are, to the end; an f16 cache's widened into `buffer`, up to [`ROW_CHUNK`] of them.
/// (A loop over chunks rather than a callback: a closure would not inherit the caller's
/// target features, and its multiply-adds would become calls.)
#[inline(always)]
fn widened_rows<'r>(
    rows: CacheRows<'r>,
    first: usize,
    hd: usize,
    buffer: &'r mut [f32],
) -> &'r [f32] {
    match rows {
        CacheRows::F32(values) => &values[first * hd..],
        CacheRows::F16(_) => {
            let n = ROW_CHUNK.min(rows.len() / hd - first);
            let widened = &mut buffer[..n * hd];
            rows.widen_into(first * hd..(first + n) * hd, widened);
            widened
        }
    }
}

/// The query as the score products see it, and the factor left for the scores: `q`
/// itself and `shape.scale` for an f32 cache; for an f16 one, `q` rounded to f16 in
/// `buffer`, scaled first where llama.cpp scales the query (then the scores keep 1).
fn query_for<'q>(
    kv: &KvCache,
    shape: &AttentionShape,
    q: &'q [f32],
    buffer: &'q mut [f32],
) -> (&'q [f32], f32) {
    match kv.kv_type() {
        KvType::F32 => (q, shape.scale),
        KvType::F16 => {
            let score_scale = if shape.scale_on_query {
                buffer
                    .iter_mut()
                    .zip(q)
                    .for_each(|(b, &x)| *b = x * shape.scale);
                1.0
            } else {
                buffer.copy_from_slice(q);
                shape.scale
            };
            round_to_f16(buffer);
            (buffer, score_scale)
        }
    }
}

/// Every thread's work buffer (`len` floats) and widened-entries key, the keys cleared.
fn thread_buffers<'s>(
    scratch: &'s mut AttentionScratch,
    n_threads: usize,
    len: usize,
) -> (
    DisjointSlice<'s, f32>,
    DisjointSlice<'s, Option<WidenedKey>>,
) {
    if scratch.per_thread.len() < n_threads * len {
        scratch.per_thread.resize(n_threads * len, 0.0);
    }
    scratch.widened_for.clear();
    scratch.widened_for.resize(n_threads, None);
    (
        DisjointSlice::new(&mut scratch.per_thread[..n_threads * len]),
        DisjointSlice::new(&mut scratch.widened_for[..]),
    )
}

/// The probabilities of one query head `q` (as [`query_for`] gives it) over `visible`
/// (keys of `kv_head`): written to `scores[j - base]` for the returned `base` (the first
/// visible position rounded down to a block of 16), zero elsewhere in the blocks.
/// `rows` is room for [`ROW_CHUNK`] widened keys.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn head_probabilities(
    entries: Entries<'_>,
    q: &[f32],
    score_scale: f32,
    score_sum: ScoreSum,
    fused: bool,
    visible: Range<usize>,
    shape: &AttentionShape,
    scores: &mut [f32],
    rows: &mut [f32],
) -> usize {
    let hd = shape.head_dim;
    let base = visible.start / LANES * LANES;
    let width = visible.end.div_ceil(LANES) * LANES - base;
    let scores = &mut scores[..width];
    scores.fill(f32::NEG_INFINITY);
    for run in entries.runs(visible.clone()) {
        let at = run.start - base;
        let n_rows = run.keys.len() / hd;
        let dst = &mut scores[at..at + n_rows];
        let mut first = 0;
        if let (true, CacheRows::F16(keys)) = (fused, run.keys) {
            let tinyblas = score_sum == ScoreSum::TinyBlas;
            first = ggml_f32::f16_key_dots(q, keys, tinyblas, dst);
        }
        while first < n_rows {
            let keys = widened_rows(run.keys, first, hd, rows);
            let n = keys.len() / hd;
            let dst = &mut dst[first..first + n];
            match score_sum {
                ScoreSum::VecDot => ggml_f32::dots(q, keys, dst),
                ScoreSum::TinyBlas => ggml_f32::tinyblas_dots(q, keys, dst),
                ScoreSum::F16Neon => ggml_f32::dots_f16_neon(q, keys, dst),
            }
            first += n;
        }
        for s in dst {
            let scaled = *s * score_scale;
            *s = match shape.logit_softcap {
                Some(cap) => cap * (scaled / cap).tanh(),
                None => scaled,
            };
        }
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total = ggml_f32::exp_shifted_sum(scores, max);
    let inv = (1.0 / total) as f32;
    scores.iter_mut().for_each(|p| *p *= inv);
    base
}

/// The attention outputs `out` (`head_dim` values per head) of the query heads `q` (as
/// many, at most [`MAX_ITEM_HEADS`], all of KV head `kv_head`) over `visible`. From an f16
/// cache, the KV head's entries over `span` (which holds `visible`) are first widened into
/// their place at the end of `work`, unless `widened` says they are there already (from an
/// earlier item of the job); returns whether they are there now.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_heads(
    kv: &KvCache,
    layer: usize,
    kv_head: usize,
    q: &[f32],
    visible: Range<usize>,
    span: Range<usize>,
    shape: &AttentionShape,
    order: ValueSum,
    work: &mut [f32],
    widened: bool,
    fused_f16: bool,
    out: &mut [f32],
) -> bool {
    let hd = shape.head_dim;
    let heads = (q.len() / hd).min(MAX_ITEM_HEADS);
    let n_scores = scores_len(kv.capacity());
    let n_partial_floats = ggml_f32::DOT_STEP * hd;
    let (all_scores, rest) = work.split_at_mut(MAX_ITEM_HEADS * n_scores);
    let (all_partials, rest) = rest.split_at_mut(MAX_ITEM_HEADS * n_partial_floats);
    let (queries, rest) = rest.split_at_mut(MAX_ITEM_HEADS * hd);
    let (rows, wide) = rest.split_at_mut(ROW_CHUNK * hd);
    // KV head h's widened keys and values: the h-th of n_head_kv equal slots.
    let slot = wide.len() / kv.n_head_kv().max(1);
    let wide = &mut wide[kv_head * slot..(kv_head + 1) * slot];
    #[cfg(target_arch = "x86_64")]
    let registers =
        ggml_f32::level() == crate::quant::SimdLevel::Avx512 && hd.is_multiple_of(LANES);
    #[cfg(not(target_arch = "x86_64"))]
    let registers = false;
    // An f16 cache read directly, each value widened in the registers as it is used.
    let fused = fused_f16 && registers && kv.kv_type() == KvType::F16;
    let widens = !fused && kv.kv_type() == KvType::F16 && 2 * span.len() * hd <= slot;
    let (wide_keys, wide_values) = wide.split_at_mut(slot / 2);
    if widens && !widened {
        for run in kv.head_runs(layer, kv_head, span.clone()) {
            let at = (run.start - span.start) * hd;
            let n = run.keys.len();
            run.keys.widen_into(0..n, &mut wide_keys[at..at + n]);
            run.values.widen_into(0..n, &mut wide_values[at..at + n]);
        }
    }
    let entries = if widens {
        let seen = (visible.start - span.start) * hd..(visible.end - span.start) * hd;
        Entries::Widened(visible.start, &wide_keys[seen.clone()], &wide_values[seen])
    } else {
        Entries::Cache(kv, layer, kv_head)
    };
    let score_sum = ScoreSum::new(kv.kv_type(), order == ValueSum::Batch, hd);
    // The first visible position rounded down to a block: the same for every head.
    let mut base = visible.start / LANES * LANES;
    for g in 0..heads {
        let scores = &mut all_scores[g * n_scores..(g + 1) * n_scores];
        let query = &mut queries[g * hd..(g + 1) * hd];
        let (q, score_scale) = query_for(kv, shape, &q[g * hd..(g + 1) * hd], query);
        base = head_probabilities(
            entries,
            q,
            score_scale,
            score_sum,
            fused,
            visible.clone(),
            shape,
            scores,
            rows,
        );
        // The probabilities are converted to f16 for `ggml_vec_dot_f16`; ggml's NEON build
        // gives a batch's f32 probabilities to tinyBLAS as they are.
        let arm_batch = ggml_f32::arm_arithmetic() && order == ValueSum::Batch;
        if kv.kv_type() == KvType::F16 && !arm_batch {
            round_to_f16(&mut scores[visible.start - base..visible.end - base]);
        }
    }
    let n_partials = order.partials();
    // Partial sum k takes the positions j ≡ k (mod n_partials), in order; a partial that
    // no position reaches stays zero.
    let mut touched = 0u64;
    for run in entries.runs(visible.clone()) {
        let n_rows = run.values.len() / hd;
        let mut first = 0;
        while first < n_rows {
            #[cfg(target_arch = "x86_64")]
            if registers {
                let fresh = touched == 0;
                touched = u64::MAX;
                let place = ValuePlace {
                    base,
                    start: run.start + first,
                    hd,
                    n_partials,
                    fresh,
                };
                // f16 rows are read as they are (widened in the registers) when fused,
                // every row at once; otherwise a chunk widened to f32 at a time.
                let (values, n) = match run.values {
                    CacheRows::F16(v) if fused => {
                        (CacheRows::F16(&v[first * hd..]), n_rows - first)
                    }
                    _ => {
                        let values = widened_rows(run.values, first, hd, rows);
                        (CacheRows::F32(values), values.len() / hd)
                    }
                };
                // SAFETY: AVX-512 (with F16C) is the level in use; `hd` is a multiple of 16,
                // the partial count (16 or 64) one of every pass width, and each head's
                // scores cover the run's positions from `base`.
                unsafe {
                    accumulate_heads(
                        heads,
                        all_scores,
                        n_scores,
                        values,
                        all_partials,
                        n_partial_floats,
                        place,
                    )
                };
                first += n;
                continue;
            }
            let values = widened_rows(run.values, first, hd, rows);
            for (i, v) in values.chunks_exact(hd).enumerate() {
                let j = run.start + first + i;
                let k = j % n_partials;
                let fresh = touched & (1 << k) == 0;
                touched |= 1 << k;
                for g in 0..heads {
                    let p = all_scores[g * n_scores + j - base];
                    let at = g * n_partial_floats + k * hd;
                    let row = &mut all_partials[at..at + hd];
                    if fresh {
                        row.iter_mut()
                            .zip(v)
                            .for_each(|(r, &x)| *r = p.mul_add(x, 0.0));
                    } else {
                        row.iter_mut()
                            .zip(v)
                            .for_each(|(r, &x)| *r = p.mul_add(x, *r));
                    }
                }
            }
            first += values.len() / hd;
        }
    }
    for (g, out) in out.chunks_exact_mut(hd).take(heads).enumerate() {
        let partials = &mut all_partials[g * n_partial_floats..][..n_partials * hd];
        reduce_partials(partials, touched, hd, order, out);
    }
    widens
}

/// Where a chunk of values sits for [`accumulate_heads`]: scores are indexed from `base`,
/// the chunk's first row is position `start`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct ValuePlace {
    base: usize,
    start: usize,
    hd: usize,
    n_partials: usize,
    fresh: bool,
}

/// `x86::accumulate_values` for the first `heads` heads (each `n_scores` floats of
/// `all_scores`, `n_partial_floats` of `all_partials`), with as many partials per pass as
/// fit the registers next to that many heads.
///
/// # Safety
/// As for `x86::accumulate_values`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn accumulate_heads(
    heads: usize,
    all_scores: &[f32],
    n_scores: usize,
    values: CacheRows<'_>,
    all_partials: &mut [f32],
    n_partial_floats: usize,
    place: ValuePlace,
) {
    let (rows, f16) = match values {
        CacheRows::F32(v) => (x86::Values(v.as_ptr().cast(), v.len() / place.hd), false),
        CacheRows::F16(v) => (x86::Values(v.as_ptr().cast(), v.len() / place.hd), true),
    };
    let accumulate = if f16 {
        accumulate_rows::<true>
    } else {
        accumulate_rows::<false>
    };
    // SAFETY: forwarded from the caller.
    unsafe {
        accumulate(
            heads,
            all_scores,
            n_scores,
            rows,
            all_partials,
            n_partial_floats,
            place,
        )
    }
}

/// [`accumulate_heads`] for rows of one element type.
///
/// # Safety
/// As for `x86::accumulate_values`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn accumulate_rows<const F16: bool>(
    heads: usize,
    all_scores: &[f32],
    n_scores: usize,
    values: x86::Values,
    all_partials: &mut [f32],
    n_partial_floats: usize,
    place: ValuePlace,
) {
    fn each_head<const G: usize>(all: &mut [f32], stride: usize) -> [&mut [f32]; G] {
        let mut rest = all;
        std::array::from_fn(|_| {
            let len = stride.min(rest.len());
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            head
        })
    }
    let probs = |g: usize| &all_scores[(g * n_scores).min(all_scores.len())..];
    let ValuePlace {
        base,
        start,
        hd,
        n_partials,
        fresh,
    } = place;
    let parts = all_partials;
    let stride = n_partial_floats;
    // `G` heads with `P` partials each in registers.
    macro_rules! heads_of {
        ($g:literal, $p:literal) => {
            x86::accumulate_values::<$g, $p, F16>(
                std::array::from_fn(probs),
                base,
                start,
                values,
                hd,
                n_partials,
                each_head(parts, stride),
                fresh,
            )
        };
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match heads {
            4 => heads_of!(4, 4),
            3 => heads_of!(3, 8),
            2 => heads_of!(2, 8),
            _ => heads_of!(1, 16),
        }
    }
}

/// Combines one head's partial sums (`n_partials` rows of `hd`; those not in `touched`
/// are zero) into `out` in the order of the reduction llama.cpp's product ends with.
fn reduce_partials(
    partials: &mut [f32],
    touched: u64,
    hd: usize,
    order: ValueSum,
    out: &mut [f32],
) {
    let n_partials = order.partials();
    for k in 0..n_partials {
        if touched & (1 << k) == 0 {
            partials[k * hd..(k + 1) * hd].fill(0.0);
        }
    }
    // Row-wise `a[into] = a[into] + a[from]`.
    let add_rows = |partials: &mut [f32], into: usize, from: usize| {
        let (low, high) = partials.split_at_mut(from * hd);
        let (dst, src) = (&mut low[into * hd..(into + 1) * hd], &high[..hd]);
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
    };
    if ggml_f32::arm_arithmetic() {
        if order == ValueSum::Single {
            // `ggml_vec_dot_f16`'s four 4-lane accumulators: 0 += 2, 1 += 3, 0 += 1.
            for l in 0..4 {
                add_rows(partials, l, 8 + l);
                add_rows(partials, 4 + l, 12 + l);
            }
            for l in 0..4 {
                add_rows(partials, l, 4 + l);
            }
        }
        // `vaddvq_f32`: (0 + 1) + (2 + 3).
        let row = |k: usize| &partials[k * hd..(k + 1) * hd];
        for (d, o) in out.iter_mut().enumerate().take(hd) {
            *o = (row(0)[d] + row(1)[d]) + (row(2)[d] + row(3)[d]);
        }
        return;
    }
    if order == ValueSum::Single {
        // The four accumulators of `ggml_vec_dot_f32`: 0 += 2, 1 += 3, 0 += 1.
        for l in 0..LANES {
            add_rows(partials, l, 2 * LANES + l);
            add_rows(partials, LANES + l, 3 * LANES + l);
        }
        for l in 0..LANES {
            add_rows(partials, l, LANES + l);
        }
    }
    // `reduce16` on rows: l += l + 8, l += l + 4, then (2 + 0) + (3 + 1).
    for l in 0..8 {
        add_rows(partials, l, l + 8);
    }
    for l in 0..4 {
        add_rows(partials, l, l + 4);
    }
    let row = |k: usize| &partials[k * hd..(k + 1) * hd];
    for (d, o) in out.iter_mut().enumerate().take(hd) {
        *o = (row(2)[d] + row(0)[d]) + (row(3)[d] + row(1)[d]);
    }
}

/// Checks that `n_tokens` queries (`q_len` values) and outputs (`out_len`) at positions
/// `start..` fit `shape` and the cache `kv`.
fn check_shapes(
    layer: usize,
    shape: &AttentionShape,
    kv: &KvCache,
    start: usize,
    n_tokens: usize,
    q_len: usize,
    out_len: usize,
) -> Result<()> {
    let (n_head, n_kv, hd) = (shape.n_head, shape.n_head_kv, shape.head_dim);
    let values = n_tokens * n_head * hd;
    let shape_ok = hd == kv.head_dim()
        && n_kv == kv.n_head_kv()
        && n_kv > 0
        && n_head % n_kv == 0
        && q_len == values
        && out_len == values
        && start + n_tokens <= kv.capacity();
    if shape_ok {
        return Ok(());
    }
    Err(EngineError::Internal(format!(
        "attention of layer {layer}: {shape:?}, {n_tokens} tokens from {start}, \
         q {q_len} / out {out_len} values, cache of {} heads x {} (capacity {})",
        kv.n_head_kv(),
        kv.head_dim(),
        kv.capacity()
    )))
}

/// For every token `t` of `n_tokens` (at positions `start + t`, whose keys and values are
/// already in `kv`) and every query head `h`:
/// `out[t][h] = softmax(scale * q[t][h] · K[visible]) · V[visible]`, with `q` and `out`
/// laid out `[token][head][head_dim]`.
///
/// `batched`: whether llama.cpp would evaluate these tokens as (part of) a batch of several,
/// which sums the values in another order than a lone token (see the module documentation).
///
/// When `last_probs` is given (`n_head * (start + n_tokens)` values), it receives each
/// head's attention probabilities of the last token, zero outside its window.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    pool: &ThreadPool,
    kv: &KvCache,
    layer: usize,
    start: usize,
    n_tokens: usize,
    batched: bool,
    shape: &AttentionShape,
    q: &[f32],
    scratch: &mut AttentionScratch,
    out: &mut [f32],
    last_probs: Option<&mut [f32]>,
) -> Result<()> {
    let n_head = shape.n_head;
    let end = start + n_tokens;
    check_shapes(layer, shape, kv, start, n_tokens, q.len(), out.len())?;
    if last_probs.as_ref().is_some_and(|p| p.len() != n_head * end) {
        return Err(EngineError::Internal(format!(
            "attention of layer {layer}: room for the last token's probabilities must be \
             {n_head} x {end} values"
        )));
    }
    let len = work_len(kv.capacity(), shape.head_dim, kv.n_head_kv(), kv.kv_type());
    let (per_thread, widened_for) = thread_buffers(scratch, pool.n_threads(), len);
    let views = [(kv, start, n_tokens, batched, q, DisjointSlice::new(out))];
    run_items(
        pool,
        layer,
        shape,
        &per_thread,
        &widened_for,
        &views,
        &[job_items(shape, n_tokens)],
    );
    if let Some(all) = last_probs {
        let q_dim = n_head * shape.head_dim;
        let q_last = &q[(n_tokens - 1) * q_dim..];
        last_token_attention(kv, layer, end - 1, batched, shape, q_last, all);
    }
    Ok(())
}

/// One sequence's part of [`attention_batch`]: `n_tokens` queries at positions
/// `start..`, laid out as for [`attention`].
pub struct AttentionJob<'a> {
    pub kv: &'a KvCache,
    pub start: usize,
    pub n_tokens: usize,
    /// As for [`attention`].
    pub batched: bool,
    pub q: &'a [f32],
    pub out: &'a mut [f32],
}

/// [`attention`] for the sequences of a batched forward call, in one parallel region of
/// (sequence, token, query head) items. Each job's outputs are computed as a call with
/// that job alone computes them, so batching changes no bit.
pub fn attention_batch(
    pool: &ThreadPool,
    layer: usize,
    shape: &AttentionShape,
    jobs: &mut [AttentionJob<'_>],
    scratch: &mut AttentionScratch,
) -> Result<()> {
    let hd = shape.head_dim;
    for job in jobs.iter() {
        check_shapes(
            layer,
            shape,
            job.kv,
            job.start,
            job.n_tokens,
            job.q.len(),
            job.out.len(),
        )?;
    }
    let len = jobs
        .iter()
        .map(|j| work_len(j.kv.capacity(), hd, j.kv.n_head_kv(), j.kv.kv_type()))
        .max()
        .unwrap_or(0);
    let (per_thread, widened_for) = thread_buffers(scratch, pool.n_threads(), len);
    // Item ranges of the jobs, end to end.
    let job_ends: Vec<usize> = jobs
        .iter()
        .scan(0, |end, job| {
            *end += job_items(shape, job.n_tokens);
            Some(*end)
        })
        .collect();
    let views: Vec<View<'_>> = jobs
        .iter_mut()
        .map(|job| {
            let (kv, start, n_tokens, q) = (job.kv, job.start, job.n_tokens, job.q);
            (
                kv,
                start,
                n_tokens,
                job.batched,
                q,
                DisjointSlice::new(&mut *job.out),
            )
        })
        .collect();
    run_items(
        pool,
        layer,
        shape,
        &per_thread,
        &widened_for,
        &views,
        &job_ends,
    );
    Ok(())
}

/// A job as the threads see it: (cache, start, tokens, batched, queries, shareable output).
type View<'v> = (
    &'v KvCache,
    usize,
    usize,
    bool,
    &'v [f32],
    DisjointSlice<'v, f32>,
);

/// Computes every (job, token, query head) item of `views`; `job_ends[j]` is the end of
/// job `j`'s items, counted over all jobs.
fn run_items(
    pool: &ThreadPool,
    layer: usize,
    shape: &AttentionShape,
    per_thread: &DisjointSlice<'_, f32>,
    widened_for: &DisjointSlice<'_, Option<WidenedKey>>,
    views: &[View<'_>],
    job_ends: &[usize],
) {
    let (n_head, hd, group) = (shape.n_head, shape.head_dim, shape.group());
    let total = job_ends.last().copied().unwrap_or(0);
    let work_len = per_thread.len() / pool.n_threads();
    pool.parallel_for_slots(total, 1, |slot, items| {
        // SAFETY: a slot is used by one thread at a time and owns its work buffer and key.
        let work = unsafe { per_thread.part(slot * work_len..(slot + 1) * work_len) };
        let widened_for = unsafe { &mut widened_for.part(slot..slot + 1)[0] };
        for item in items {
            let j = job_ends.partition_point(|&end| end <= item);
            let (kv, start, n_tokens, batched, q, out) = &views[j];
            let local = item - (job_ends[j] - job_items(shape, *n_tokens));
            let heads = heads_per_item(group, *n_tokens);
            let runs_per_token = n_head / heads;
            let (t, h) = (local / runs_per_token, local % runs_per_token * heads);
            let at = (t * n_head + h) * hd;
            let len = heads * hd;
            // SAFETY: each item's heads are written by the one thread that takes it.
            let dst = unsafe { out.part(at..at + len) };
            let order = ValueSum::new(*batched);
            let kv_head = h / group;
            // The job's span: from its first token's window to its last token.
            let span = shape.visible(*start).start..start + n_tokens;
            // No bit (never widened) past 64 KV heads, where widened_positions is 0.
            let bit = 1u64.checked_shl(kv_head as u32).unwrap_or(0);
            let held = match *widened_for {
                Some((job, heads)) if job == j => heads,
                _ => 0,
            };
            let widened = dispatch!(attend_heads(
                kv,
                layer,
                kv_head,
                &q[at..at + len],
                shape.visible(start + t),
                span,
                shape,
                order,
                &mut *work,
                held & bit != 0,
                // A lone token reads an f16 cache directly: widening a copy first would
                // convert every entry for one query only.
                *n_tokens == 1,
                &mut *dst,
            ));
            let held = if widened { held | bit } else { held };
            *widened_for = Some((j, held));
        }
    });
}

/// Each head's attention probabilities for the token at `pos` (query `q`; `n_head × (pos +
/// 1)` values), zero outside its window: the softmax of [`attention`], computed apart from
/// the output because only callers who record attention patterns need it.
pub fn last_token_attention(
    kv: &KvCache,
    layer: usize,
    pos: usize,
    batched: bool,
    shape: &AttentionShape,
    q: &[f32],
    all: &mut [f32],
) {
    let (hd, group) = (shape.head_dim, shape.group());
    let visible = shape.visible(pos);
    let width = pos + 1;
    let mut scores = vec![0f32; scores_len(width)];
    let (mut query, mut rows) = (vec![0f32; hd], vec![0f32; ROW_CHUNK * hd]);
    for (h, row) in all.chunks_exact_mut(width).enumerate().take(shape.n_head) {
        row.fill(0.0);
        let (q_head, score_scale) = query_for(kv, shape, &q[h * hd..(h + 1) * hd], &mut query);
        let base = dispatch!(head_probabilities(
            Entries::Cache(kv, layer, h / group),
            q_head,
            score_scale,
            ScoreSum::new(kv.kv_type(), batched, hd),
            false,
            visible.clone(),
            shape,
            &mut scores,
            &mut rows,
        ));
        let probs = &scores[visible.start - base..visible.end - base];
        row[visible.clone()].copy_from_slice(probs);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::kernels::ggml_f32::x86::load16;

    /// Rows of values: `.1` rows of `head_dim` f32 values, or f16 for an `F16` kernel, at
    /// `.0`.
    #[derive(Clone, Copy)]
    pub(super) struct Values(pub *const u8, pub usize);

    /// For every position `j` of `start..start + values.len() / hd` (row `j - start` of
    /// `values`) and every head `g` of the `G` query heads sharing these values:
    /// partial `j % n_partials` of head `g` (a row of `hd` in `partials[g]`) +=
    /// `probs[g][j - base]` times the row, by fused multiply-adds in position order, as the
    /// portable loop does for each head alone.
    ///
    /// The partials stay in registers: `P` of them per head at a time (`G * P` registers),
    /// over one 16-wide column of the head at a time, so a position costs one load of its
    /// values per column for all `G` heads, and no load or store of a partial. `fresh`: the
    /// partials start at zero (every one is written, touched or not).
    ///
    /// # Safety
    /// AVX-512F and F16C; `hd` a multiple of 16 and `n_partials` of `P`; `values` holds its
    /// rows; every `probs[g]` covers `base..start + n` and every `partials[g]` holds
    /// `n_partials * hd` floats.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn accumulate_values<const G: usize, const P: usize, const F16: bool>(
        probs: [&[f32]; G],
        base: usize,
        start: usize,
        values: Values,
        hd: usize,
        n_partials: usize,
        partials: [&mut [f32]; G],
        fresh: bool,
    ) {
        let Values(vp, n) = values;
        if n == 0 {
            return;
        }
        let end = start + n;
        debug_assert!(probs.iter().all(|p| p.len() >= end - base));
        debug_assert!(partials.iter().all(|p| p.len() >= n_partials * hd));
        let pp = probs.map(<[f32]>::as_ptr);
        let out = partials.map(<[f32]>::as_mut_ptr);
        let (first_block, last_block) = (start / n_partials, (end - 1) / n_partials);
        for column in (0..hd).step_by(16) {
            for group in (0..n_partials).step_by(P) {
                let slot = |g: usize, i: usize| out[g].add((group + i) * hd + column);
                let mut acc: [[__m512; P]; G] = std::array::from_fn(|g| {
                    std::array::from_fn(|i| {
                        if fresh {
                            _mm512_setzero_ps()
                        } else {
                            _mm512_loadu_ps(slot(g, i))
                        }
                    })
                });
                let mut add = |i: usize, j: usize| {
                    let v = load16::<F16>(vp, (j - start) * hd + column);
                    for g in 0..G {
                        let p = _mm512_set1_ps(*pp[g].add(j - base));
                        acc[g][i] = _mm512_fmadd_ps(p, v, acc[g][i]);
                    }
                };
                for block in first_block..=last_block {
                    let j0 = block * n_partials + group;
                    if j0 >= start && j0 + P <= end {
                        for i in 0..P {
                            add(i, j0 + i);
                        }
                    } else {
                        for i in 0..P {
                            if (start..end).contains(&(j0 + i)) {
                                add(i, j0 + i);
                            }
                        }
                    }
                }
                for (g, acc) in acc.iter().enumerate() {
                    for (i, a) in acc.iter().enumerate() {
                        _mm512_storeu_ps(slot(g, i), *a);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 20_000) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    /// The attention of one head in f64, straight from the definition.
    fn reference_head(
        q: &[f32],
        keys: &[Vec<f32>],
        values: &[Vec<f32>],
        scale: f32,
        cap: Option<f32>,
    ) -> (Vec<f64>, Vec<f64>) {
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| {
                q.iter()
                    .zip(k)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>()
            })
            .map(|s| s * f64::from(scale))
            .map(|s| cap.map_or(s, |c| f64::from(c) * (s / f64::from(c)).tanh()))
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exp: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = exp.iter().sum();
        let probs: Vec<f64> = exp.iter().map(|e| e / total).collect();
        let mut out = vec![0f64; q.len()];
        for (p, v) in probs.iter().zip(values) {
            for (o, &x) in out.iter_mut().zip(v) {
                *o += p * f64::from(x);
            }
        }
        (out, probs)
    }

    type PerHead = Vec<Vec<Vec<f32>>>;

    /// A cache of `n_pos` positions filled with pseudo-random keys and values, and the
    /// same entries per head for the reference.
    fn filled_cache(
        n_head_kv: usize,
        hd: usize,
        n_pos: usize,
        kv_type: KvType,
    ) -> (KvCache, PerHead, PerHead) {
        let mut kv = KvCache::new(1, n_head_kv, hd, n_pos, kv_type);
        kv.reserve_to(n_pos);
        let mut keys = vec![Vec::new(); n_head_kv];
        let mut values = vec![Vec::new(); n_head_kv];
        for pos in 0..n_pos {
            let k = pseudo_random(n_head_kv * hd, 10 + pos as u32);
            let v = pseudo_random(n_head_kv * hd, 5000 + pos as u32);
            kv.store(0, pos, &k, &v);
            for h in 0..n_head_kv {
                // As stored: rounded to f16 in an f16 cache.
                keys[h].push(kv.key(0, pos, h));
                values[h].push(kv.value(0, pos, h));
            }
        }
        kv.set_len(n_pos);
        (kv, keys, values)
    }

    #[test]
    fn matches_the_definition_across_pages_windows_and_thread_counts() {
        for kv_type in KvType::ALL {
            matches_the_definition_with(kv_type);
        }
    }

    /// The reference takes the entries as the cache stores them and, for an f16 cache,
    /// the query rounded to f16, which leaves the probabilities as tight as with f32; the
    /// outputs also carry the probabilities' rounding to f16 (up to 2^-11 of each term).
    fn matches_the_definition_with(kv_type: KvType) {
        let (n_head, n_head_kv, hd) = (6, 2, 16);
        let n_pos = crate::kv_cache::PAGE_POSITIONS + 40;
        let (kv, keys, values) = filled_cache(n_head_kv, hd, n_pos, kv_type);
        let output_tolerance = match kv_type {
            KvType::F32 => 1e-5,
            KvType::F16 => 1e-3,
        };
        let cases = [
            (None, None),
            (Some(1), None),
            (Some(100), None),
            (Some(100), Some(0.5)),
        ];
        // Several tokens (shared by token) and one token (shared by chunk of positions).
        let batches = [(n_pos - 5, 5), (n_pos - 1, 1), (7, 1)];
        for ((window, logit_softcap), (start, n_tokens)) in cases
            .into_iter()
            .flat_map(|c| batches.into_iter().map(move |b| (c, b)))
        {
            let q = pseudo_random(n_tokens * n_head * hd, 99);
            let end = start + n_tokens;
            let shape = AttentionShape {
                n_head,
                n_head_kv,
                head_dim: hd,
                scale: 0.25,
                scale_on_query: false,
                logit_softcap,
                window,
            };
            let mut outputs = Vec::new();
            for threads in [1, 2, 3, 4] {
                let pool = ThreadPool::new(threads).unwrap();
                let mut out = vec![0f32; q.len()];
                let mut probs = vec![f32::NAN; n_head * end];
                let mut scratch = AttentionScratch::default();
                attention(
                    &pool,
                    &kv,
                    0,
                    start,
                    n_tokens,
                    n_tokens > 1,
                    &shape,
                    &q,
                    &mut scratch,
                    &mut out,
                    Some(&mut probs),
                )
                .unwrap();
                outputs.push((out, probs));
            }
            for other in &outputs[1..] {
                assert_eq!(other.0, outputs[0].0, "window {window:?}");
                assert_eq!(other.1, outputs[0].1, "window {window:?}");
            }
            let (out, probs) = &outputs[0];
            for t in 0..n_tokens {
                let visible = shape.visible(start + t);
                for h in 0..n_head {
                    let kvh = h / (n_head / n_head_kv);
                    let at = (t * n_head + h) * hd;
                    let mut query = q[at..at + hd].to_vec();
                    if kv_type == KvType::F16 {
                        round_to_f16(&mut query);
                    }
                    let (expected, expected_probs) = reference_head(
                        &query,
                        &keys[kvh][visible.clone()],
                        &values[kvh][visible.clone()],
                        0.25,
                        logit_softcap,
                    );
                    for (o, e) in out[at..at + hd].iter().zip(&expected) {
                        let error = (f64::from(*o) - e).abs();
                        assert!(error < output_tolerance, "{kv_type:?} t {t} h {h}: {error}");
                    }
                    if t + 1 == n_tokens {
                        let row = &probs[h * end..(h + 1) * end];
                        assert!(row[..visible.start].iter().all(|&p| p == 0.0));
                        for (p, e) in row[visible.clone()].iter().zip(&expected_probs) {
                            assert!((f64::from(*p) - e).abs() < 1e-6, "{kv_type:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::single_range_in_vec_init)]
    fn register_blocked_values_sum_as_the_portable_loop() {
        if !crate::quant::SimdLevel::Avx512.is_supported() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let hd = 32;
        let n_scores = 400;
        // Values exact in f16, so the f16 rows and their f32 copy hold the same numbers.
        let halves: Vec<half::f16> = pseudo_random(400 * hd, 4)
            .into_iter()
            .map(half::f16::from_f32)
            .collect();
        let values: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
        for (heads, f16_rows) in (1..=MAX_ITEM_HEADS).flat_map(|h| [(h, false), (h, true)]) {
            // Each head's probabilities, end to end as in a work buffer.
            let all_scores: Vec<f32> = (0..heads)
                .flat_map(|g| pseudo_random(n_scores, 3 + g as u32))
                .collect();
            for n_partials in [LANES, ggml_f32::DOT_STEP] {
                let stride = ggml_f32::DOT_STEP * hd;
                // Runs starting mid-block and ending mid-block, and a second run added on top.
                for (base, runs) in [
                    (0, vec![0..300]),
                    (16, vec![21..90, 90..256, 256..333]),
                    (0, vec![5..6]),
                ] {
                    let mut expected = vec![0f32; heads * stride];
                    let mut got = vec![f32::NAN; heads * stride];
                    for (r, run) in runs.iter().enumerate() {
                        let rows = &values[(run.start - base) * hd..(run.end - base) * hd];
                        for (i, v) in rows.chunks_exact(hd).enumerate() {
                            let j = run.start + i;
                            let k = j % n_partials;
                            for g in 0..heads {
                                let p = all_scores[g * n_scores + j - base];
                                let row = &mut expected[g * stride + k * hd..][..hd];
                                for (e, &x) in row.iter_mut().zip(v) {
                                    *e = p.mul_add(x, *e);
                                }
                            }
                        }
                        let place = ValuePlace {
                            base,
                            start: run.start,
                            hd,
                            n_partials,
                            fresh: r == 0,
                        };
                        let cached = if f16_rows {
                            let at = (run.start - base) * hd..(run.end - base) * hd;
                            CacheRows::F16(&halves[at])
                        } else {
                            CacheRows::F32(rows)
                        };
                        // SAFETY: AVX-512 support was checked above.
                        unsafe {
                            accumulate_heads(
                                heads,
                                &all_scores,
                                n_scores,
                                cached,
                                &mut got,
                                stride,
                                place,
                            )
                        };
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    for g in 0..heads {
                        let used = g * stride..g * stride + n_partials * hd;
                        assert_eq!(
                            bits(&got[used.clone()]),
                            bits(&expected[used]),
                            "{heads} heads, head {g}, {n_partials} partials, {runs:?}, \
                             f16 rows {f16_rows}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let (kv, _, _) = filled_cache(1, 8, 4, KvType::F32);
        let shape = AttentionShape {
            n_head: 2,
            n_head_kv: 1,
            head_dim: 8,
            scale: 1.0,
            scale_on_query: false,
            logit_softcap: None,
            window: None,
        };
        let pool = ThreadPool::new(1).unwrap();
        let mut out = vec![0f32; 16];
        let err = attention(
            &pool,
            &kv,
            0,
            3,
            1,
            false,
            &shape,
            &[0.0; 8],
            &mut AttentionScratch::default(),
            &mut out,
            None,
        );
        assert!(err.is_err());
    }
}
