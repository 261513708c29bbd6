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
//! Work is shared as (token, query head) items; every output is computed within one item,
//! the same way whichever thread takes it, so results are bit-identical for any thread
//! count and whether or not other sequences share the call.

use std::ops::Range;

use crate::error::{EngineError, Result};
use crate::kernels::ggml_f32::{self, dispatch, LANES};
use crate::kv_cache::KvCache;
use crate::threads::{DisjointSlice, ThreadPool};

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

    /// Partial sums per output value.
    fn partials(self) -> usize {
        match self {
            Self::Batch => LANES,
            Self::Single => ggml_f32::DOT_STEP,
        }
    }
}

/// Buffers reused from call to call (kept by the sequence, so decoding does not allocate):
/// per thread, one head's scores and partial sums.
#[derive(Default)]
pub struct AttentionScratch {
    per_thread: Vec<f32>,
}

/// Score slots a head needs: the visible positions widened to whole blocks of 16.
fn scores_len(capacity: usize) -> usize {
    capacity.div_ceil(LANES) * LANES + LANES
}

/// Floats of one thread's work buffer.
fn work_len(capacity: usize, hd: usize) -> usize {
    scores_len(capacity) + ggml_f32::DOT_STEP * hd
}

fn thread_buffers<'s>(
    scratch: &'s mut AttentionScratch,
    n_threads: usize,
    len: usize,
) -> DisjointSlice<'s, f32> {
    if scratch.per_thread.len() < n_threads * len {
        scratch.per_thread.resize(n_threads * len, 0.0);
    }
    DisjointSlice::new(&mut scratch.per_thread[..n_threads * len])
}

/// The probabilities of one query head `q` over `visible` (keys of `kv_head`): written to
/// `scores[j - base]` for the returned `base` (the first visible position rounded down to
/// a block of 16), zero elsewhere in the blocks.
#[inline(always)]
fn head_probabilities(
    kv: &KvCache,
    layer: usize,
    kv_head: usize,
    q: &[f32],
    visible: Range<usize>,
    shape: &AttentionShape,
    scores: &mut [f32],
) -> usize {
    let hd = shape.head_dim;
    let base = visible.start / LANES * LANES;
    let width = visible.end.div_ceil(LANES) * LANES - base;
    let scores = &mut scores[..width];
    scores.fill(f32::NEG_INFINITY);
    for run in kv.head_runs(layer, kv_head, visible.clone()) {
        let at = run.start - base;
        let dst = &mut scores[at..at + run.keys.len() / hd];
        ggml_f32::dots(q, run.keys, dst);
        for s in dst {
            let scaled = *s * shape.scale;
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

/// The attention output `out` (`head_dim` values) of query head `q` over `visible`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_head(
    kv: &KvCache,
    layer: usize,
    kv_head: usize,
    q: &[f32],
    visible: Range<usize>,
    shape: &AttentionShape,
    order: ValueSum,
    work: &mut [f32],
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let (scores, partials) = work.split_at_mut(scores_len(kv.capacity()));
    let base = head_probabilities(kv, layer, kv_head, q, visible.clone(), shape, scores);
    let n_partials = order.partials();
    let partials = &mut partials[..n_partials * hd];
    // Partial sum k takes the positions j ≡ k (mod n_partials), in order; a partial that
    // no position reaches stays zero.
    let mut touched = 0u64;
    for run in kv.head_runs(layer, kv_head, visible.clone()) {
        for (i, v) in run.values.chunks_exact(hd).enumerate() {
            let j = run.start + i;
            let p = scores[j - base];
            let k = j % n_partials;
            let row = &mut partials[k * hd..(k + 1) * hd];
            if touched & (1 << k) == 0 {
                touched |= 1 << k;
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
    let per_thread = thread_buffers(
        scratch,
        pool.n_threads(),
        work_len(kv.capacity(), shape.head_dim),
    );
    let views = [(kv, start, n_tokens, batched, q, DisjointSlice::new(out))];
    run_items(
        pool,
        layer,
        shape,
        &per_thread,
        &views,
        &[n_tokens * n_head],
    );
    if let Some(all) = last_probs {
        let q_dim = n_head * shape.head_dim;
        last_token_attention(kv, layer, end - 1, shape, &q[(n_tokens - 1) * q_dim..], all);
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
    let (n_head, hd) = (shape.n_head, shape.head_dim);
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
    let capacity = jobs.iter().map(|j| j.kv.capacity()).max().unwrap_or(0);
    let per_thread = thread_buffers(scratch, pool.n_threads(), work_len(capacity, hd));
    // Item ranges of the jobs, end to end.
    let job_ends: Vec<usize> = jobs
        .iter()
        .scan(0, |end, job| {
            *end += job.n_tokens * n_head;
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
    run_items(pool, layer, shape, &per_thread, &views, &job_ends);
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
    views: &[View<'_>],
    job_ends: &[usize],
) {
    let (n_head, hd, group) = (shape.n_head, shape.head_dim, shape.group());
    let total = job_ends.last().copied().unwrap_or(0);
    let work_len = per_thread.len() / pool.n_threads();
    pool.parallel_for_slots(total, 1, |slot, items| {
        // SAFETY: a slot is used by one thread at a time and owns its work buffer.
        let work = unsafe { per_thread.part(slot * work_len..(slot + 1) * work_len) };
        for item in items {
            let j = job_ends.partition_point(|&end| end <= item);
            let (kv, start, n_tokens, batched, q, out) = &views[j];
            let local = item - (job_ends[j] - n_tokens * n_head);
            let (t, h) = (local / n_head, local % n_head);
            let at = (t * n_head + h) * hd;
            // SAFETY: each item's head is written by the one thread that takes it.
            let dst = unsafe { out.part(at..at + hd) };
            let order = ValueSum::new(*batched);
            dispatch!(attend_head(
                kv,
                layer,
                h / group,
                &q[at..at + hd],
                shape.visible(start + t),
                shape,
                order,
                &mut *work,
                &mut *dst,
            ));
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
    shape: &AttentionShape,
    q: &[f32],
    all: &mut [f32],
) {
    let (hd, group) = (shape.head_dim, shape.group());
    let visible = shape.visible(pos);
    let width = pos + 1;
    let mut scores = vec![0f32; scores_len(width)];
    for (h, row) in all.chunks_exact_mut(width).enumerate().take(shape.n_head) {
        row.fill(0.0);
        let q_head = &q[h * hd..(h + 1) * hd];
        let base = dispatch!(head_probabilities(
            kv,
            layer,
            h / group,
            q_head,
            visible.clone(),
            shape,
            &mut scores,
        ));
        let probs = &scores[visible.start - base..visible.end - base];
        row[visible.clone()].copy_from_slice(probs);
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
