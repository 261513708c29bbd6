//! Causal self-attention over the KV cache, split across the thread pool.
//!
//! Query heads that share a KV head (grouped-query attention) are computed together, so
//! each key and value is read from the cache once per token rather than once per query
//! head. The visible positions are taken in fixed chunks ([`chunk_len`] positions, at most
//! [`CHUNK`]), aligned to absolute positions: each chunk gives a partial result (the
//! maximum score, the sum of `exp(score - max)` and the correspondingly weighted sum of
//! values, per query head), and the partials are merged in position order ("online
//! softmax"), then normalised.
//!
//! Work is shared as (token, KV head) items, each merging its chunks in order; a single
//! decoded token has too few of those for two threads, so then the (KV head, chunk) pieces
//! are shared instead and merged afterwards, in the same order with the same operations.
//! Either way every output is computed identically, whichever thread takes which piece,
//! so results are bit-identical for any thread count.
//!
//! The inner loops (scores of a chunk's keys against the group's queries, and the weighted
//! sum of its values) have AVX2+FMA versions chosen at run time where the CPU has them,
//! and portable versions with independent partial sums elsewhere.

use std::ops::Range;
use std::sync::OnceLock;

use crate::error::{EngineError, Result};
use crate::kernels::ops;
use crate::kv_cache::{KvCache, PAGE_POSITIONS};
use crate::quant;
use crate::threads::{DisjointSlice, ThreadPool};

/// Most positions per chunk. A chunk's keys (or values) should stay in L1 while every query
/// head of the group uses them: [`chunk_len`] takes 16 KiB of them, so 64 positions of a
/// 64-wide head and 16 of a 256-wide one. Chunk lengths divide `PAGE_POSITIONS`, so a
/// chunk never straddles two cache pages.
pub const CHUNK: usize = 64;
const _: () = assert!(PAGE_POSITIONS.is_multiple_of(CHUNK));

/// Positions per chunk for heads of `head_dim` values: a power of two from 8 to `CHUNK`.
/// It depends on the model only, so every call splits a sequence the same way.
pub fn chunk_len(head_dim: usize) -> usize {
    let fitting = (4096 / head_dim.max(1)).clamp(8, CHUNK);
    1 << fitting.ilog2()
}

/// The attention geometry of one layer.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Multiplies every score before the softmax (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
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

/// The chunks (absolute, `len`-aligned) that `visible` touches, clipped to it.
fn chunks(visible: Range<usize>, len: usize) -> impl Iterator<Item = Range<usize>> {
    let first_chunk = visible.start / len;
    let last_chunk = visible.end.div_ceil(len);
    (first_chunk..last_chunk)
        .map(move |c| (c * len).max(visible.start)..((c + 1) * len).min(visible.end))
}

/// Buffers reused from call to call (kept by the sequence, so decoding does not allocate):
/// per thread, scores and one chunk's partial result; for a decoded token, the partials
/// of every (KV head, chunk) piece.
#[derive(Default)]
pub struct AttentionScratch {
    per_thread: Vec<f32>,
    pieces: Vec<f32>,
}

/// A partial result for the query heads of one group: per head, the maximum score, the
/// sum of `exp(score - max)`, and the `head_dim` values weighted by those exponentials.
struct Partial<'a> {
    max: &'a mut [f32],
    sum: &'a mut [f32],
    out: &'a mut [f32],
}

/// Floats one `Partial` of `group` heads occupies.
fn partial_len(group: usize, hd: usize) -> usize {
    group * (hd + 2)
}

impl<'a> Partial<'a> {
    fn new(buf: &'a mut [f32], group: usize) -> Self {
        let (max, rest) = buf.split_at_mut(group);
        let (sum, out) = rest.split_at_mut(group);
        Self { max, sum, out }
    }

    /// Folds `next` (the partial of the positions that follow) into `self`.
    fn merge(&mut self, next: &Partial<'_>, hd: usize) {
        for h in 0..self.max.len() {
            let max = self.max[h].max(next.max[h]);
            let (a, b) = ((self.max[h] - max).exp(), (next.max[h] - max).exp());
            self.max[h] = max;
            self.sum[h] = a * self.sum[h] + b * next.sum[h];
            let (out, add) = (
                &mut self.out[h * hd..(h + 1) * hd],
                &next.out[h * hd..(h + 1) * hd],
            );
            for (o, &x) in out.iter_mut().zip(add) {
                *o = a * *o + b * x;
            }
        }
    }

    /// `out[h] = partial out / sum`, the attention output of each head.
    fn finish(&self, hd: usize, out: &mut [f32]) {
        for (h, dst) in out.chunks_exact_mut(hd).enumerate() {
            let inv = 1.0 / self.sum[h];
            for (d, &x) in dst.iter_mut().zip(&self.out[h * hd..(h + 1) * hd]) {
                *d = x * inv;
            }
        }
    }
}

/// The partial of one chunk of positions (within one cache page) for the `group` query
/// heads `q` (`group × head_dim`, contiguous) of KV head `kv_head`.
#[allow(clippy::too_many_arguments)]
fn chunk_partial(
    kv: &KvCache,
    layer: usize,
    kv_head: usize,
    q: &[f32],
    positions: Range<usize>,
    shape: &AttentionShape,
    scores: &mut [f32],
    partial: &mut Partial<'_>,
) {
    let hd = shape.head_dim;
    let n = positions.len();
    let Some(run) = kv.head_runs(layer, kv_head, positions).next() else {
        return;
    };
    let scores = &mut scores[..partial.max.len() * n];
    group_scores(q, run.keys, hd, shape.scale, scores);
    for (h, row) in scores.chunks_exact_mut(n).enumerate() {
        if let Some(cap) = shape.logit_softcap {
            row.iter_mut().for_each(|s| *s = cap * (*s / cap).tanh());
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // libm's exp, not the vectorised one: attention weights feed every later layer, and
        // the 2-ulp polynomial moved Gemma 3 tail log-probs past the llama.cpp tolerance
        // (worst 0.90 → 1.12 in tests/test_golden.py).
        row.iter_mut().for_each(|s| *s = (*s - max).exp());
        partial.max[h] = max;
        partial.sum[h] = row.iter().sum();
    }
    partial.out.fill(0.0);
    group_weighted_sum(scores, run.values, hd, partial.out);
    debug_assert_eq!(run.values.len(), n * hd);
}

/// The attention output of the `group` query heads `q` of KV head `kv_head` for a token
/// seeing `visible`: chunk partials merged in position order. `work` holds two partials
/// and the chunk's scores.
#[allow(clippy::too_many_arguments)]
fn attend_group(
    kv: &KvCache,
    layer: usize,
    kv_head: usize,
    q: &[f32],
    visible: Range<usize>,
    shape: &AttentionShape,
    work: &mut [f32],
    out: &mut [f32],
) {
    let (group, hd) = (shape.group(), shape.head_dim);
    let plen = partial_len(group, hd);
    let (running, rest) = work.split_at_mut(plen);
    let (next, scores) = rest.split_at_mut(plen);
    let mut running = Partial::new(running, group);
    let mut next = Partial::new(next, group);
    for (i, chunk) in chunks(visible, chunk_len(hd)).enumerate() {
        if i == 0 {
            chunk_partial(kv, layer, kv_head, q, chunk, shape, scores, &mut running);
        } else {
            chunk_partial(kv, layer, kv_head, q, chunk, shape, scores, &mut next);
            running.merge(&next, hd);
        }
    }
    running.finish(hd, out);
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
/// When `last_probs` is given (`n_head * (start + n_tokens)` values), it receives each
/// head's attention probabilities of the last token, zero outside its window.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    pool: &ThreadPool,
    kv: &KvCache,
    layer: usize,
    start: usize,
    n_tokens: usize,
    shape: &AttentionShape,
    q: &[f32],
    scratch: &mut AttentionScratch,
    out: &mut [f32],
    last_probs: Option<&mut [f32]>,
) -> Result<()> {
    let (n_head, n_kv, hd) = (shape.n_head, shape.n_head_kv, shape.head_dim);
    let q_dim = n_head * hd;
    let end = start + n_tokens;
    check_shapes(layer, shape, kv, start, n_tokens, q.len(), out.len())?;
    if last_probs.as_ref().is_some_and(|p| p.len() != n_head * end) {
        return Err(EngineError::Internal(format!(
            "attention of layer {layer}: room for the last token's probabilities must be \
             {n_head} x {end} values"
        )));
    }
    let group = shape.group();
    let plen = partial_len(group, hd);
    let chunk = chunk_len(hd);
    let work_len = 2 * plen + group * chunk;
    let n_threads = pool.n_threads();
    if scratch.per_thread.len() < n_threads * work_len {
        scratch.per_thread.resize(n_threads * work_len, 0.0);
    }
    let per_thread = DisjointSlice::new(&mut scratch.per_thread[..n_threads * work_len]);
    let group_q = group * hd;

    if n_tokens == 1 && n_threads > 1 {
        // One token: share the (KV head, chunk) pieces, then merge each head's in order.
        let visible = shape.visible(start);
        let first_chunk = visible.start / chunk;
        let n_chunks = visible.end.div_ceil(chunk) - first_chunk;
        let pieces_len = n_kv * n_chunks * plen;
        if scratch.pieces.len() < pieces_len {
            scratch
                .pieces
                .resize(kv.capacity().div_ceil(chunk) * n_kv * plen, 0.0);
        }
        {
            let pieces = DisjointSlice::new(&mut scratch.pieces[..pieces_len]);
            pool.parallel_for_slots(n_kv * n_chunks, 1, |slot, items| {
                // SAFETY: a slot is used by one thread at a time and owns its work buffer.
                let work = unsafe { per_thread.part(slot * work_len..(slot + 1) * work_len) };
                let scores = &mut work[2 * plen..];
                for item in items {
                    let (g, c) = (item / n_chunks, item % n_chunks);
                    let abs = first_chunk + c;
                    let positions =
                        (abs * chunk).max(visible.start)..((abs + 1) * chunk).min(visible.end);
                    // SAFETY: piece `item` is written by the one thread that takes it.
                    let buf = unsafe { pieces.part(item * plen..(item + 1) * plen) };
                    let mut partial = Partial::new(buf, group);
                    let q_group = &q[g * group_q..(g + 1) * group_q];
                    chunk_partial(
                        kv,
                        layer,
                        g,
                        q_group,
                        positions,
                        shape,
                        scores,
                        &mut partial,
                    );
                }
            });
        }
        for g in 0..n_kv {
            let pieces = &mut scratch.pieces[g * n_chunks * plen..(g + 1) * n_chunks * plen];
            let (running, later) = pieces.split_at_mut(plen);
            let mut running = Partial::new(running, group);
            for next in later.chunks_exact_mut(plen) {
                let next = Partial::new(next, group);
                running.merge(&next, hd);
            }
            running.finish(hd, &mut out[g * group_q..(g + 1) * group_q]);
        }
    } else {
        let out = DisjointSlice::new(&mut *out);
        pool.parallel_for_slots(n_tokens * n_kv, 1, |slot, items| {
            // SAFETY: a slot is used by one thread at a time and owns its work buffer.
            let work = unsafe { per_thread.part(slot * work_len..(slot + 1) * work_len) };
            for item in items {
                let (t, g) = (item / n_kv, item % n_kv);
                let at = t * q_dim + g * group_q;
                // SAFETY: each item's heads are written by the one thread that takes it.
                let dst = unsafe { out.part(at..at + group_q) };
                let visible = shape.visible(start + t);
                attend_group(
                    kv,
                    layer,
                    g,
                    &q[at..at + group_q],
                    visible,
                    shape,
                    work,
                    dst,
                );
            }
        });
    }

    if let Some(all) = last_probs {
        last_token_attention(
            kv,
            layer,
            start + n_tokens - 1,
            shape,
            &q[(n_tokens - 1) * q_dim..],
            all,
        );
    }
    Ok(())
}

/// One sequence's part of [`attention_batch`]: `n_tokens` queries at positions
/// `start..`, laid out as for [`attention`].
pub struct AttentionJob<'a> {
    pub kv: &'a KvCache,
    pub start: usize,
    pub n_tokens: usize,
    pub q: &'a [f32],
    pub out: &'a mut [f32],
}

/// [`attention`] for the sequences of a batched forward call, in one parallel region of
/// (sequence, token, KV head) items: several sequences' single decode tokens give the
/// threads enough items to share without splitting chunks, and one region replaces one
/// per sequence. Every output is computed as the solo call computes it (see the module
/// documentation), so batching changes no bit.
pub fn attention_batch(
    pool: &ThreadPool,
    layer: usize,
    shape: &AttentionShape,
    jobs: &mut [AttentionJob<'_>],
    scratch: &mut AttentionScratch,
) -> Result<()> {
    if let [job] = jobs {
        return attention(
            pool,
            job.kv,
            layer,
            job.start,
            job.n_tokens,
            shape,
            job.q,
            scratch,
            job.out,
            None,
        );
    }
    let (n_head, n_kv, hd) = (shape.n_head, shape.n_head_kv, shape.head_dim);
    let q_dim = n_head * hd;
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
    let group = shape.group();
    let work_len = 2 * partial_len(group, hd) + group * chunk_len(hd);
    let n_threads = pool.n_threads();
    if scratch.per_thread.len() < n_threads * work_len {
        scratch.per_thread.resize(n_threads * work_len, 0.0);
    }
    let per_thread = DisjointSlice::new(&mut scratch.per_thread[..n_threads * work_len]);
    // Item ranges of the jobs, end to end.
    let job_ends: Vec<usize> = jobs
        .iter()
        .scan(0, |end, job| {
            *end += job.n_tokens * n_kv;
            Some(*end)
        })
        .collect();
    let total = job_ends.last().copied().unwrap_or(0);
    // (cache, start, tokens, queries, output) of each job, the output shareable by threads.
    type View<'v> = (&'v KvCache, usize, usize, &'v [f32], DisjointSlice<'v, f32>);
    let views: Vec<View<'_>> = jobs
        .iter_mut()
        .map(|job| {
            let (kv, start, n_tokens, q) = (job.kv, job.start, job.n_tokens, job.q);
            (kv, start, n_tokens, q, DisjointSlice::new(&mut *job.out))
        })
        .collect();
    let group_q = group * hd;
    pool.parallel_for_slots(total, 1, |slot, items| {
        // SAFETY: a slot is used by one thread at a time and owns its work buffer.
        let work = unsafe { per_thread.part(slot * work_len..(slot + 1) * work_len) };
        for item in items {
            let j = job_ends.partition_point(|&end| end <= item);
            let (kv, start, n_tokens, q, out) = &views[j];
            let local = item - (job_ends[j] - n_tokens * n_kv);
            let (t, g) = (local / n_kv, local % n_kv);
            let at = t * q_dim + g * group_q;
            // SAFETY: each item's heads are written by the one thread that takes it.
            let dst = unsafe { out.part(at..at + group_q) };
            attend_group(
                kv,
                layer,
                g,
                &q[at..at + group_q],
                shape.visible(start + t),
                shape,
                work,
                dst,
            );
        }
    });
    Ok(())
}

/// Each head's attention probabilities for the token at `pos` (query `q`; `n_head × (pos +
/// 1)` values), zero outside its window: the plain softmax, computed apart from the output
/// because only callers who record attention patterns need it.
pub fn last_token_attention(
    kv: &KvCache,
    layer: usize,
    pos: usize,
    shape: &AttentionShape,
    q: &[f32],
    all: &mut [f32],
) {
    let (hd, group) = (shape.head_dim, shape.group());
    let visible = shape.visible(pos);
    let width = pos + 1;
    for (h, row) in all.chunks_exact_mut(width).enumerate().take(shape.n_head) {
        row.fill(0.0);
        let q_head = &q[h * hd..(h + 1) * hd];
        for run in kv.head_runs(layer, h / group, visible.clone()) {
            let n = run.keys.len() / hd;
            group_scores(
                q_head,
                run.keys,
                hd,
                shape.scale,
                &mut row[run.start..run.start + n],
            );
        }
        let probs = &mut row[visible.clone()];
        if let Some(cap) = shape.logit_softcap {
            probs.iter_mut().for_each(|s| *s = cap * (*s / cap).tanh());
        }
        ops::softmax_in_place(probs);
    }
}

/// Whether the AVX2+FMA loops may run: the quantized kernels' choice for this process
/// (so `SAMPLER_SDK_SIMD=scalar` forces the portable loops here too).
fn use_avx2() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| quant::kernels().level() >= quant::SimdLevel::Avx2)
}

/// `scores[h * n + j] = scale * (q[h] · keys[j])` for the query heads `q` (rows of `hd`)
/// and the `n` rows of `keys`.
pub fn group_scores(q: &[f32], keys: &[f32], hd: usize, scale: f32, scores: &mut [f32]) {
    if hd == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked by `use_avx2`).
        unsafe { avx2::group_scores(q, keys, hd, scale, scores) };
        return;
    }
    group_scores_portable(q, keys, hd, scale, scores);
}

/// `out[h] += sum_j probs[h * n + j] * values[j]` for the heads of `out` (rows of `hd`)
/// and the `n` rows of `values`.
pub fn group_weighted_sum(probs: &[f32], values: &[f32], hd: usize, out: &mut [f32]) {
    if hd == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: as in `group_scores`.
        unsafe { avx2::group_weighted_sum(probs, values, hd, out) };
        return;
    }
    group_weighted_sum_portable(probs, values, hd, out);
}

/// Dot product with eight independent partial sums (so the compiler can vectorise it and
/// the additions do not wait on each other), combined pairwise at the end.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() - a.len() % 8);
    let (b8, b_rest) = b.split_at(a8.len().min(b.len()));
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in a_rest.iter().zip(b_rest) {
        tail += x * y;
    }
    let quads = [
        lanes[0] + lanes[4],
        lanes[1] + lanes[5],
        lanes[2] + lanes[6],
        lanes[3] + lanes[7],
    ];
    (quads[0] + quads[2]) + (quads[1] + quads[3]) + tail
}

fn group_scores_portable(q: &[f32], keys: &[f32], hd: usize, scale: f32, scores: &mut [f32]) {
    let n = keys.len() / hd;
    if n == 0 {
        return;
    }
    for (q_head, row) in q.chunks_exact(hd).zip(scores.chunks_exact_mut(n)) {
        for (s, k) in row.iter_mut().zip(keys.chunks_exact(hd)) {
            *s = dot_portable(q_head, k) * scale;
        }
    }
}

fn group_weighted_sum_portable(probs: &[f32], values: &[f32], hd: usize, out: &mut [f32]) {
    let n = values.len() / hd;
    if n == 0 {
        return;
    }
    for (row, out_head) in probs.chunks_exact(n).zip(out.chunks_exact_mut(hd)) {
        for (&p, v) in row.iter().zip(values.chunks_exact(hd)) {
            for (o, &x) in out_head.iter_mut().zip(v) {
                *o += p * x;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Sum of the eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn horizontal_sum(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps::<1>(quad, quad)))
    }

    /// `q · k` for one head (`hd` = `q.len()` = `k.len()`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot(q: &[f32], k: &[f32]) -> f32 {
        let hd = q.len().min(k.len());
        let full = hd - hd % 8;
        // Two accumulators hide the FMA latency for the usual 64..256-wide heads.
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= full {
            // SAFETY: i + 16 <= hd <= q.len(), k.len().
            unsafe {
                let q0 = _mm256_loadu_ps(q.as_ptr().add(i));
                let q1 = _mm256_loadu_ps(q.as_ptr().add(i + 8));
                acc0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k.as_ptr().add(i)), acc0);
                acc1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(k.as_ptr().add(i + 8)), acc1);
            }
            i += 16;
        }
        if i < full {
            // SAFETY: i + 8 <= full <= hd.
            unsafe {
                let q0 = _mm256_loadu_ps(q.as_ptr().add(i));
                acc0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k.as_ptr().add(i)), acc0);
            }
        }
        let mut sum = horizontal_sum(_mm256_add_ps(acc0, acc1));
        for j in full..hd {
            sum += q[j] * k[j];
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn group_scores(q: &[f32], keys: &[f32], hd: usize, scale: f32, scores: &mut [f32]) {
        let n = keys.len() / hd;
        if scores.len() < n * (q.len() / hd) {
            return;
        }
        // Key-major: each key is loaded into L1 once and used by every head of the group.
        for (j, k) in keys.chunks_exact(hd).enumerate() {
            for (h, q_head) in q.chunks_exact(hd).enumerate() {
                scores[h * n + j] = dot(q_head, k) * scale;
            }
        }
    }

    /// `W` registers (8 columns each) of `out` for heads `h0..h0 + H`, starting at column
    /// `col`, accumulated over the `n` rows of `values`; everything stays in registers.
    ///
    /// # Safety
    /// AVX2 and FMA; `col + 8 * W <= hd`, `(h0 + H) * hd <= out.len()`,
    /// `(h0 + H) * n <= probs.len()` and `n * hd <= values.len()`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn weighted_block<const H: usize, const W: usize>(
        probs: *const f32,
        values: *const f32,
        out: *mut f32,
        n: usize,
        hd: usize,
        h0: usize,
        col: usize,
    ) {
        // SAFETY (whole body): every offset is within the bounds the caller guarantees.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); W]; H];
            for (h, a) in acc.iter_mut().enumerate() {
                for (c, lane) in a.iter_mut().enumerate() {
                    *lane = _mm256_loadu_ps(out.add((h0 + h) * hd + col + 8 * c));
                }
            }
            for j in 0..n {
                let v = values.add(j * hd + col);
                let mut x = [_mm256_setzero_ps(); W];
                for (c, xc) in x.iter_mut().enumerate() {
                    *xc = _mm256_loadu_ps(v.add(8 * c));
                }
                for (h, a) in acc.iter_mut().enumerate() {
                    let p = _mm256_broadcast_ss(&*probs.add((h0 + h) * n + j));
                    for (lane, &xc) in a.iter_mut().zip(&x) {
                        *lane = _mm256_fmadd_ps(p, xc, *lane);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                for (c, lane) in a.iter().enumerate() {
                    _mm256_storeu_ps(out.add((h0 + h) * hd + col + 8 * c), *lane);
                }
            }
        }
    }

    /// Heads `h0..h0 + hs` (hs <= 4), columns `col..col + 8 * W`.
    ///
    /// # Safety
    /// As for `weighted_block`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn weighted_heads<const W: usize>(
        hs: usize,
        probs: *const f32,
        values: *const f32,
        out: *mut f32,
        n: usize,
        hd: usize,
        h0: usize,
        col: usize,
    ) {
        // SAFETY: forwarded contract.
        unsafe {
            match hs {
                1 => weighted_block::<1, W>(probs, values, out, n, hd, h0, col),
                2 => weighted_block::<2, W>(probs, values, out, n, hd, h0, col),
                3 => weighted_block::<3, W>(probs, values, out, n, hd, h0, col),
                _ => weighted_block::<4, W>(probs, values, out, n, hd, h0, col),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn group_weighted_sum(probs: &[f32], values: &[f32], hd: usize, out: &mut [f32]) {
        let n = values.len() / hd;
        let heads = out.len() / hd;
        if probs.len() < heads * n || n == 0 {
            return;
        }
        let full = hd - hd % 8;
        let (p, v, o) = (probs.as_ptr(), values.as_ptr(), out.as_mut_ptr());
        // Up to four heads by 16 columns (eight accumulators, two value registers and a
        // broadcast: no spills) per pass over the chunk's rows, which stay in L1.
        let mut h0 = 0;
        while h0 < heads {
            let hs = (heads - h0).min(4);
            let mut col = 0;
            while col + 16 <= full {
                // SAFETY: col + 16 <= hd, h0 + hs <= heads, sizes checked above.
                unsafe { weighted_heads::<2>(hs, p, v, o, n, hd, h0, col) };
                col += 16;
            }
            while col + 8 <= full {
                // SAFETY: as above with col + 8 <= hd.
                unsafe { weighted_heads::<1>(hs, p, v, o, n, hd, h0, col) };
                col += 8;
            }
            h0 += hs;
        }
        if full < hd {
            for h in 0..heads {
                for j in 0..n {
                    let p = probs[h * n + j];
                    let v = &values[j * hd + full..(j + 1) * hd];
                    for (o, &x) in out[h * hd + full..(h + 1) * hd].iter_mut().zip(v) {
                        *o += p * x;
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

    #[test]
    fn vector_loops_match_their_definitions() {
        for hd in [1, 7, 8, 16, 24, 64, 72, 256] {
            for heads in [1, 2, 3, 5] {
                let rows = 37;
                let q = pseudo_random(heads * hd, 1);
                let keys = pseudo_random(hd * rows, 2);
                let mut fast = vec![0f32; heads * rows];
                let mut portable = vec![0f32; heads * rows];
                group_scores(&q, &keys, hd, 0.5, &mut fast);
                group_scores_portable(&q, &keys, hd, 0.5, &mut portable);
                for h in 0..heads {
                    for j in 0..rows {
                        let exact: f64 = q[h * hd..(h + 1) * hd]
                            .iter()
                            .zip(&keys[j * hd..(j + 1) * hd])
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum::<f64>()
                            * 0.5;
                        for got in [fast[h * rows + j], portable[h * rows + j]] {
                            assert!((f64::from(got) - exact).abs() < 1e-5, "hd {hd} h {h} j {j}");
                        }
                    }
                }
                let probs = pseudo_random(heads * rows, 3);
                let mut fast = pseudo_random(heads * hd, 4);
                let mut portable = fast.clone();
                let mut exact: Vec<f64> = fast.iter().map(|&v| f64::from(v)).collect();
                group_weighted_sum(&probs, &keys, hd, &mut fast);
                group_weighted_sum_portable(&probs, &keys, hd, &mut portable);
                for h in 0..heads {
                    for j in 0..rows {
                        let p = f64::from(probs[h * rows + j]);
                        for (e, &v) in exact[h * hd..(h + 1) * hd]
                            .iter_mut()
                            .zip(&keys[j * hd..(j + 1) * hd])
                        {
                            *e += p * f64::from(v);
                        }
                    }
                }
                for ((f, p), e) in fast.iter().zip(&portable).zip(&exact) {
                    assert!((f64::from(*f) - e).abs() < 1e-5, "hd {hd} heads {heads}");
                    assert!((f64::from(*p) - e).abs() < 1e-5, "hd {hd} heads {heads}");
                }
            }
        }
    }

    /// Per KV head, per position, one head's entries.
    type PerHead = Vec<Vec<Vec<f32>>>;

    /// A cache of `n_pos` positions filled with pseudo-random keys and values, and the
    /// same entries per head for the reference.
    fn filled_cache(n_head_kv: usize, hd: usize, n_pos: usize) -> (KvCache, PerHead, PerHead) {
        let mut kv = KvCache::new(1, n_head_kv, hd, n_pos);
        kv.reserve_to(n_pos);
        let mut keys = vec![Vec::new(); n_head_kv];
        let mut values = vec![Vec::new(); n_head_kv];
        for pos in 0..n_pos {
            let k = pseudo_random(n_head_kv * hd, 10 + pos as u32);
            let v = pseudo_random(n_head_kv * hd, 5000 + pos as u32);
            kv.store(0, pos, &k, &v);
            for h in 0..n_head_kv {
                keys[h].push(k[h * hd..(h + 1) * hd].to_vec());
                values[h].push(v[h * hd..(h + 1) * hd].to_vec());
            }
        }
        kv.set_len(n_pos);
        (kv, keys, values)
    }

    #[test]
    fn matches_the_definition_across_pages_windows_and_thread_counts() {
        let (n_head, n_head_kv, hd) = (6, 2, 16);
        let n_pos = crate::kv_cache::PAGE_POSITIONS + 40;
        let (kv, keys, values) = filled_cache(n_head_kv, hd, n_pos);
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
                    let (expected, expected_probs) = reference_head(
                        &q[at..at + hd],
                        &keys[kvh][visible.clone()],
                        &values[kvh][visible.clone()],
                        0.25,
                        logit_softcap,
                    );
                    for (o, e) in out[at..at + hd].iter().zip(&expected) {
                        assert!((f64::from(*o) - e).abs() < 1e-5, "t {t} h {h}");
                    }
                    if t + 1 == n_tokens {
                        let row = &probs[h * end..(h + 1) * end];
                        assert!(row[..visible.start].iter().all(|&p| p == 0.0));
                        for (p, e) in row[visible.clone()].iter().zip(&expected_probs) {
                            assert!((f64::from(*p) - e).abs() < 1e-6);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let (kv, _, _) = filled_cache(1, 8, 4);
        let shape = AttentionShape {
            n_head: 2,
            n_head_kv: 1,
            head_dim: 8,
            scale: 1.0,
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
            &shape,
            &[0.0; 8],
            &mut AttentionScratch::default(),
            &mut out,
            None,
        );
        assert!(err.is_err());
    }
}
