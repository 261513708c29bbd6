//! Causal self-attention over the KV cache, split across the thread pool.
//!
//! The unit of work is one (token, query head) pair: its scores against every visible key,
//! a softmax, and the probability-weighted sum of values. Threads claim chunks of pairs as
//! they go, which balances causal prefill (later tokens see more positions) and decode
//! (a few heads per thread). A pair is always computed the same way, whichever thread
//! takes it, so the output is bit-identical for any thread count.
//!
//! The two inner loops (scores of many keys against one query, and the weighted sum of
//! many value rows) run over contiguous per-head runs of the cache (see
//! [`KvCache::head_runs`]), with AVX2+FMA versions chosen at run time where the CPU has
//! them and portable versions with eight independent accumulators elsewhere.

use std::ops::Range;
use std::sync::OnceLock;

use crate::error::{EngineError, Result};
use crate::kernels::ops;
use crate::kv_cache::KvCache;
use crate::quant;
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
}

/// Score buffers, one per thread, each as long as the sequence's capacity; kept by the
/// sequence so the decode loop does not allocate.
#[derive(Default)]
pub struct AttentionScratch {
    scores: Vec<f32>,
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
    let (n_head, hd) = (shape.n_head, shape.head_dim);
    let q_dim = n_head * hd;
    let end = start + n_tokens;
    let shape_ok = hd == kv.head_dim()
        && shape.n_head_kv == kv.n_head_kv()
        && shape.n_head_kv > 0
        && n_head % shape.n_head_kv == 0
        && q.len() == n_tokens * q_dim
        && out.len() == n_tokens * q_dim
        && end <= kv.capacity()
        && last_probs
            .as_ref()
            .map_or(true, |p| p.len() == n_head * end);
    if !shape_ok {
        return Err(EngineError::Internal(format!(
            "attention of layer {layer}: {shape:?}, {n_tokens} tokens from {start}, \
             q {} / out {} values, cache of {} heads x {} (capacity {})",
            q.len(),
            out.len(),
            kv.n_head_kv(),
            kv.head_dim(),
            kv.capacity()
        )));
    }
    let group = n_head / shape.n_head_kv;
    let n_threads = pool.n_threads();
    let per_thread = kv.capacity();
    if scratch.scores.len() < n_threads * per_thread {
        scratch.scores.resize(n_threads * per_thread, 0.0);
    }
    let scores = DisjointSlice::new(&mut scratch.scores[..n_threads * per_thread]);
    let out = DisjointSlice::new(out);
    let last_probs = last_probs.map(DisjointSlice::new);
    let n_pairs = n_tokens * n_head;
    pool.parallel_for_slots(n_pairs, 1, |slot, pairs| {
        // SAFETY: a slot is used by one thread at a time, and slot `slot` alone uses score
        // buffer `slot`.
        let scores = unsafe { scores.part(slot * per_thread..(slot + 1) * per_thread) };
        for pair in pairs {
            let (t, h) = (pair / n_head, pair % n_head);
            let pos = start + t;
            let visible = shape.visible(pos);
            let at = t * q_dim + h * hd;
            // SAFETY: each pair's output head is written by the one thread that takes it.
            let head_out = unsafe { out.part(at..at + hd) };
            let probs = &mut scores[..visible.len()];
            attend_one(
                kv,
                layer,
                h / group,
                &q[at..at + hd],
                visible.clone(),
                shape.scale,
                shape.logit_softcap,
                probs,
                head_out,
            );
            if let (Some(all), true) = (&last_probs, t + 1 == n_tokens) {
                // SAFETY: head `h`'s row of the last token belongs to this pair alone.
                let row = unsafe { all.part(h * end..(h + 1) * end) };
                row.fill(0.0);
                row[visible].copy_from_slice(probs);
            }
        }
    });
    Ok(())
}

/// One query head of one token: scores, softmax (left in `probs`), weighted sum of values.
#[allow(clippy::too_many_arguments)]
fn attend_one(
    kv: &KvCache,
    layer: usize,
    kv_head: usize,
    q: &[f32],
    visible: Range<usize>,
    scale: f32,
    logit_softcap: Option<f32>,
    probs: &mut [f32],
    out: &mut [f32],
) {
    let first = visible.start;
    for run in kv.head_runs(layer, kv_head, visible.clone()) {
        let at = run.start - first;
        let n = run.keys.len() / q.len();
        scaled_dots(q, run.keys, scale, &mut probs[at..at + n]);
    }
    if let Some(cap) = logit_softcap {
        probs.iter_mut().for_each(|s| *s = cap * (*s / cap).tanh());
    }
    ops::softmax_in_place(probs);
    out.fill(0.0);
    for run in kv.head_runs(layer, kv_head, visible) {
        let at = run.start - first;
        let n = run.values.len() / out.len();
        weighted_sum(&probs[at..at + n], run.values, out);
    }
}

/// Whether the AVX2+FMA loops may run: the quantized kernels' choice for this process
/// (so `SAMPLER_SDK_SIMD=scalar` forces the portable loops here too).
fn use_avx2() -> bool {
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| quant::kernels().level() >= quant::SimdLevel::Avx2)
}

/// `scores[j] = scale * (q · keys[j])` for each row `j` of `keys` (rows of `q.len()`).
pub fn scaled_dots(q: &[f32], keys: &[f32], scale: f32, scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked by `use_avx2`).
        unsafe { avx2::scaled_dots(q, keys, scale, scores) };
        return;
    }
    scaled_dots_portable(q, keys, scale, scores);
}

/// `out += sum_j probs[j] * values[j]` over the rows `j` of `values` (rows of `out.len()`).
pub fn weighted_sum(probs: &[f32], values: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: as in `scaled_dots`.
        unsafe { avx2::weighted_sum(probs, values, out) };
        return;
    }
    weighted_sum_portable(probs, values, out);
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

fn scaled_dots_portable(q: &[f32], keys: &[f32], scale: f32, scores: &mut [f32]) {
    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(q.len())) {
        *s = dot_portable(q, k) * scale;
    }
}

fn weighted_sum_portable(probs: &[f32], values: &[f32], out: &mut [f32]) {
    for (&p, v) in probs.iter().zip(values.chunks_exact(out.len())) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += p * x;
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

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scaled_dots(q: &[f32], keys: &[f32], scale: f32, scores: &mut [f32]) {
        let hd = q.len();
        let full = hd - hd % 8;
        for (s, k) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
            // Two accumulators hide the FMA latency for the usual 64..256-wide heads.
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 16 <= full {
                // SAFETY: i + 16 <= hd = q.len() = k.len().
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
            *s = sum * scale;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn weighted_sum(probs: &[f32], values: &[f32], out: &mut [f32]) {
        let hd = out.len();
        // Columns in blocks of 64 (eight registers of output) kept in registers across
        // all rows; the tail of a head size that is not a multiple of 8 goes scalar.
        let full = hd - hd % 8;
        let mut col = 0;
        while col < full {
            let width = (full - col).min(64) / 8;
            let mut acc = [_mm256_setzero_ps(); 8];
            for (c, a) in acc.iter_mut().enumerate().take(width) {
                // SAFETY: col + 8c + 8 <= full <= out.len().
                *a = unsafe { _mm256_loadu_ps(out.as_ptr().add(col + 8 * c)) };
            }
            for (&p, v) in probs.iter().zip(values.chunks_exact(hd)) {
                let pv = _mm256_set1_ps(p);
                for (c, a) in acc.iter_mut().enumerate().take(width) {
                    // SAFETY: col + 8c + 8 <= full <= v.len().
                    let x = unsafe { _mm256_loadu_ps(v.as_ptr().add(col + 8 * c)) };
                    *a = _mm256_fmadd_ps(pv, x, *a);
                }
            }
            for (c, a) in acc.iter().enumerate().take(width) {
                // SAFETY: as above.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(col + 8 * c), *a) };
            }
            col += 8 * width;
        }
        if full < hd {
            for (&p, v) in probs.iter().zip(values.chunks_exact(hd)) {
                for (o, &x) in out[full..].iter_mut().zip(&v[full..]) {
                    *o += p * x;
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
            let q = pseudo_random(hd, 1);
            let rows = 37;
            let keys = pseudo_random(hd * rows, 2);
            let mut fast = vec![0f32; rows];
            let mut portable = vec![0f32; rows];
            scaled_dots(&q, &keys, 0.5, &mut fast);
            scaled_dots_portable(&q, &keys, 0.5, &mut portable);
            for (j, (f, p)) in fast.iter().zip(&portable).enumerate() {
                let exact: f64 = q
                    .iter()
                    .zip(&keys[j * hd..(j + 1) * hd])
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>()
                    * 0.5;
                assert!((f64::from(*f) - exact).abs() < 1e-5, "hd {hd} row {j}");
                assert!((f64::from(*p) - exact).abs() < 1e-5, "hd {hd} row {j}");
            }
            let probs = pseudo_random(rows, 3);
            let mut fast = pseudo_random(hd, 4);
            let mut portable = fast.clone();
            let mut exact: Vec<f64> = fast.iter().map(|&v| f64::from(v)).collect();
            weighted_sum(&probs, &keys, &mut fast);
            weighted_sum_portable(&probs, &keys, &mut portable);
            for (j, &p) in probs.iter().enumerate() {
                for (e, &v) in exact.iter_mut().zip(&keys[j * hd..(j + 1) * hd]) {
                    *e += f64::from(p) * f64::from(v);
                }
            }
            for ((f, p), e) in fast.iter().zip(&portable).zip(&exact) {
                assert!((f64::from(*f) - e).abs() < 1e-5, "hd {hd}");
                assert!((f64::from(*p) - e).abs() < 1e-5, "hd {hd}");
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
        let (start, n_tokens) = (n_pos - 5, 5);
        let q = pseudo_random(n_tokens * n_head * hd, 99);
        let cases = [
            (None, None),
            (Some(1), None),
            (Some(100), None),
            (Some(100), Some(0.5)),
        ];
        for (window, logit_softcap) in cases {
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
                let mut probs = vec![f32::NAN; n_head * n_pos];
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
                        let row = &probs[h * n_pos..(h + 1) * n_pos];
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
