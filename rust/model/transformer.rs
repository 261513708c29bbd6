//! The forward pass, top to bottom like llama2.c's `forward`: embed, then per layer
//! norm → Q/K/V → RoPE → cache → attention → output projection → residual → norm →
//! feed-forward (dense or experts, `ffn.rs`) → residual, then the final norm and the
//! vocabulary projection. Architecture differences are config switches read here in
//! order: embedding scale, Q/K/V biases, Q/K norms, attention scale and soft-cap, post
//! norms, logit scale and soft-cap.
//! A call processes consecutive tokens of one or several sequences (prefill chunks or one
//! decode step each), all through the same matrix products.

use crate::error::{EngineError, Result};
use crate::kernels::attention::{
    attention, attention_batch, last_token_attention, AttentionJob, AttentionScratch,
    AttentionShape,
};
use crate::kernels::matmul::{matmul, matmul_fused, ActivationBatch, Product};
use crate::kernels::ops;
use crate::kv_cache::KvCache;
use crate::model::config::{Architecture, RopeStyle};
use crate::model::ffn::{feed_forward, FfnScratch};
use crate::model::{trace, Model};
use crate::threads::{DisjointSlice, ThreadPool};

/// Prompt tokens evaluated per forward call by [`Model::prefill`] and the decode loop:
/// bounds the scratch memory of a long prompt (a 255-token prompt in one call held 25 MB
/// more at its peak) and fits the tiles of the matrix products.
pub const PREFILL_CHUNK: usize = 64;

/// Largest batch llama.cpp evaluates at once with its default `n_ubatch`; a longer prompt
/// is split into batches of this many tokens.
pub const LLAMA_UBATCH: usize = 512;

/// Where the tokens of a forward call sit in the batch llama.cpp would evaluate them in:
/// tokens `first..` of a batch of `len`. A prompt is evaluated in one batch (of up to
/// [`LLAMA_UBATCH`] tokens), a decoded token in a batch of its own. Some of llama.cpp's
/// kernels round differently by batch size and position in the batch (attention values, see
/// `kernels::attention`; K-quant products, see `quant::DotBatchFn`), so the chunks a long
/// prompt goes through in say where they fall, and compute as that one batch would.
///
/// The same holds for the rows whose logits are wanted: llama.cpp runs the rest of the last
/// layer and the output projection on those rows of the whole batch together. `outputs`,
/// when set, is where this part's wanted rows fall among them: `(first, total)`; unset,
/// the part's own wanted rows are the whole output batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPlace {
    pub first: usize,
    pub len: usize,
    pub outputs: Option<(usize, usize)>,
}

impl BatchPlace {
    /// `n` tokens evaluated together, on their own.
    pub fn whole(n: usize) -> Self {
        Self {
            first: 0,
            len: n,
            outputs: None,
        }
    }

    /// Tokens from `from` on of a prompt of `prompt_len` tokens.
    pub fn in_prompt(from: usize, prompt_len: usize) -> Self {
        let batch_start = from / LLAMA_UBATCH * LLAMA_UBATCH;
        Self {
            first: from - batch_start,
            len: (prompt_len - batch_start).min(LLAMA_UBATCH),
            outputs: None,
        }
    }

    /// [`Self::in_prompt`] for a part starting at `from` when the logits of the prompt's
    /// tokens from `first_wanted` on are wanted: where the part's wanted rows fall among
    /// those of its llama.cpp batch.
    pub fn with_outputs(self, from: usize, first_wanted: usize) -> Self {
        let batch_start = from - self.first;
        let batch_end = batch_start + self.len;
        let outputs_start = first_wanted.clamp(batch_start, batch_end);
        Self {
            outputs: Some((
                from.clamp(outputs_start, batch_end) - outputs_start,
                batch_end - outputs_start,
            )),
            ..self
        }
    }

    /// Whether llama.cpp evaluates these tokens with others (its batched code paths).
    pub fn is_batch(&self) -> bool {
        self.len > 1
    }
}

/// One sequence's part of a batched forward call: `tokens` are appended to `seq`, and the
/// logits of the last `n_logits` of them are returned.
pub struct BatchEntry<'a> {
    pub seq: &'a mut SequenceState,
    pub tokens: &'a [u32],
    pub n_logits: usize,
    pub place: BatchPlace,
}

/// Everything one sequence owns while it runs: its KV cache and reusable buffers, so the
/// decode loop does not allocate per token.
pub struct SequenceState {
    pub(crate) kv: KvCache,
    scratch: BatchScratch,
    /// When set, the last token's attention weights of each forward call are averaged
    /// over layers and heads into `attention`.
    record_attention: bool,
    attention: Option<Vec<f32>>,
}

/// Work buffers of a forward call, reused from call to call: each sequence has one for
/// its solo calls, and a batcher one for its batched calls.
#[derive(Default)]
pub struct BatchScratch {
    x: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    attention: AttentionScratch,
    /// Each head's attention probabilities for the last token (only when recording).
    head_probs: Vec<f32>,
    logits: Vec<f32>,
    /// Every token's RoPE angles (`n_rot / 2` cos and sin per token), for the global
    /// layers' base and for the sliding-window layers' (see [`RopeTables`]).
    rope: [RopeTables; 2],
    acts: ActivationBatch,
    ffn: FfnScratch,
    /// Each token's `(index, len)` in its llama.cpp batch (see [`BatchPlace`]), and the same
    /// for the rows whose logits are wanted once the last layer keeps only those.
    places: Vec<(usize, usize)>,
    out_places: Vec<(usize, usize)>,
}

fn resize(buf: &mut Vec<f32>, len: usize) {
    buf.clear();
    buf.resize(len, 0.0);
}

/// The cos and sin of every token's RoPE angles for one (base, frequency scale), computed
/// once per forward call rather than once per layer (the sines and cosines were most of
/// the serial time between a prefill's matrix products).
#[derive(Debug, Default)]
struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTables {
    fn fill(
        &mut self,
        positions: impl Iterator<Item = usize>,
        n_rot: usize,
        (base, freq_scale): (f32, f32),
        freq_factors: Option<&[f32]>,
    ) {
        let half = n_rot / 2;
        self.cos.clear();
        self.sin.clear();
        for pos in positions {
            let at = self.cos.len();
            self.cos.resize(at + half, 0.0);
            self.sin.resize(at + half, 0.0);
            ops::rope_angles(
                pos,
                n_rot,
                base,
                freq_scale,
                freq_factors,
                &mut self.cos[at..],
                &mut self.sin[at..],
            );
        }
    }

    /// Row `t`'s cos and sin.
    fn row(&self, t: usize, half: usize) -> (&[f32], &[f32]) {
        let at = t * half..(t + 1) * half;
        (&self.cos[at.clone()], &self.sin[at])
    }
}

/// `normed` row `t` = `rms_norm(x row t)` for every row, after `x += add` row by row when
/// `add` is given, rows split across the pool (a prefill's norms were serial work that
/// left the other threads waiting).
fn add_and_norm_rows(
    pool: &ThreadPool,
    x: &mut [f32],
    add: Option<&[f32]>,
    weight: &[f32],
    eps: f32,
    normed: &mut [f32],
) {
    let d = weight.len();
    let n_rows = x.len() / d;
    let (xs, outs) = (
        DisjointSlice::new(x),
        DisjointSlice::new(&mut normed[..n_rows * d]),
    );
    // Chunks of whole interleaved groups.
    pool.parallel_for(n_rows, ops::NORM_ROWS, |rows| {
        let span = rows.start * d..rows.end * d;
        // SAFETY: parallel_for hands each thread its own rows.
        let (x, out) = unsafe { (xs.part(span.clone()), outs.part(span.clone())) };
        if let Some(add) = add {
            ops::add_in_place(x, &add[span]);
        }
        ops::rms_norm_rows(x, weight, eps, out);
    });
}

/// `cap · tanh(x / cap)`: squashes `x` smoothly into (-cap, cap).
fn soft_cap(x: f32, cap: f32) -> f32 {
    cap * (x / cap).tanh()
}

/// Moves the rows (`d` wide) of each entry's last `n_logits` tokens to the front of `rows`,
/// entry after entry, and drops the others.
fn keep_output_rows(entries: &[BatchEntry<'_>], d: usize, rows: &mut Vec<f32>) {
    let (mut from, mut to) = (0, 0);
    for e in entries {
        let len = e.tokens.len();
        for t in from + len - e.n_logits..from + len {
            rows.copy_within(t * d..(t + 1) * d, to * d);
            to += 1;
        }
        from += len;
    }
    rows.truncate(to * d);
}

/// Adds `bias` to each `bias.len()`-wide row of `rows`.
fn add_bias_to_rows(rows: &mut [f32], bias: &[f32]) {
    rows.chunks_exact_mut(bias.len())
        .for_each(|row| ops::add_in_place(row, bias));
}

impl SequenceState {
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.kv.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.kv.capacity()
    }

    /// Drops cached positions from `len` on, keeping the prefix for reuse.
    pub fn truncate(&mut self, len: usize) {
        self.kv.truncate(len);
    }

    pub fn kv_bytes(&self) -> usize {
        self.kv.allocated_bytes()
    }

    pub fn record_attention(&mut self, on: bool) {
        self.record_attention = on;
    }

    /// The attention pattern of the last token of the latest forward call: one weight per
    /// context position, averaged over all layers and heads (so it sums to 1).
    pub fn take_attention(&mut self) -> Option<Vec<f32>> {
        self.attention.take()
    }
}

impl Model {
    /// A fresh sequence able to hold `capacity` positions (clamped to the training context).
    pub fn new_sequence(&self, capacity: usize) -> SequenceState {
        let cfg = &self.config;
        SequenceState {
            kv: KvCache::new(
                cfg.n_layer,
                cfg.n_head_kv,
                cfg.head_dim,
                capacity.min(cfg.n_ctx_train),
                self.kv_type(),
            ),
            scratch: BatchScratch::default(),
            record_attention: false,
            attention: None,
        }
    }

    /// Appends `tokens` to the sequence and returns the logits of its last
    /// `n_logits` tokens (row-major, `n_logits × n_vocab`).
    pub fn forward(
        &self,
        seq: &mut SequenceState,
        tokens: &[u32],
        n_logits: usize,
    ) -> Result<Vec<f32>> {
        self.forward_logits(seq, tokens, n_logits)
            .map(<[f32]>::to_vec)
    }

    /// [`Self::forward`] for a prompt of any length: `tokens` go through in chunks of
    /// [`PREFILL_CHUNK`], and the logits of the last `n_logits` of them are gathered.
    pub fn prefill(
        &self,
        seq: &mut SequenceState,
        tokens: &[u32],
        n_logits: usize,
    ) -> Result<Vec<f32>> {
        if tokens.is_empty() || n_logits > tokens.len() {
            // The error forward gives for these.
            return self.forward(seq, tokens, n_logits);
        }
        let first_wanted = tokens.len() - n_logits;
        let mut logits = Vec::with_capacity(n_logits * self.config.n_vocab);
        for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            let start = i * PREFILL_CHUNK;
            let end = start + chunk.len();
            let wanted = end - first_wanted.clamp(start, end);
            let place =
                BatchPlace::in_prompt(start, tokens.len()).with_outputs(start, first_wanted);
            logits.extend_from_slice(self.forward_logits_at(seq, chunk, wanted, place)?);
        }
        Ok(logits)
    }

    /// [`Self::forward`] returning the logits in the sequence's own buffer, valid until its
    /// next forward call: the decode loop's form, which allocates nothing per token.
    pub fn forward_logits<'s>(
        &self,
        seq: &'s mut SequenceState,
        tokens: &[u32],
        n_logits: usize,
    ) -> Result<&'s [f32]> {
        self.forward_logits_at(seq, tokens, n_logits, BatchPlace::whole(tokens.len()))
    }

    /// [`Self::forward_logits`] for tokens that are part `place` of a larger batch.
    pub fn forward_logits_at<'s>(
        &self,
        seq: &'s mut SequenceState,
        tokens: &[u32],
        n_logits: usize,
        place: BatchPlace,
    ) -> Result<&'s [f32]> {
        // The sequence lends its scratch to a batch of one, so a solo call and a batched
        // call run the very same code.
        let mut scratch = std::mem::take(&mut seq.scratch);
        let result = self
            .forward_batch(
                &mut scratch,
                &mut [BatchEntry {
                    seq: &mut *seq,
                    tokens,
                    n_logits,
                    place,
                }],
            )
            .map(|_| ());
        seq.scratch = scratch;
        result.map(|()| &seq.scratch.logits[..n_logits * self.config.n_vocab])
    }

    /// One forward pass over several sequences at once: every entry's tokens are appended
    /// to its own sequence, and each weight matrix is read once for all of them. Returns
    /// the logits of each entry's last `n_logits` tokens, entry after entry (row-major,
    /// `Σ n_logits × n_vocab`), valid until the next call with this scratch.
    ///
    /// Every token's values are computed by the same operations in the same order as when
    /// its sequence runs alone (matrix products are per (row, token), norms and RoPE per
    /// token, attention per sequence), so batching never changes a result.
    pub fn forward_batch<'s>(
        &self,
        s: &'s mut BatchScratch,
        entries: &mut [BatchEntry<'_>],
    ) -> Result<&'s [f32]> {
        let cfg = &self.config;
        if entries.is_empty() {
            return Err(EngineError::invalid(
                "entries",
                "a batch needs at least one sequence",
            ));
        }
        for e in entries.iter() {
            self.check_entry(e)?;
        }
        let n: usize = entries.iter().map(|e| e.tokens.len()).sum();
        let n_logits: usize = entries.iter().map(|e| e.n_logits).sum();
        for e in entries.iter_mut() {
            let end = e.seq.kv.len() + e.tokens.len();
            e.seq.kv.reserve_to(end);
        }

        let file = self.weight_bytes();
        let pool = &*self.pool;
        let w = &self.weights;
        let (d, q_dim, kv_dim, hd) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        resize(&mut s.x, n * d);
        resize(&mut s.normed, n * d);
        resize(&mut s.q, n * q_dim);
        resize(&mut s.k, n * kv_dim);
        resize(&mut s.v, n * kv_dim);
        resize(&mut s.attn, n * q_dim);
        resize(&mut s.proj, n * d);
        s.places.clear();
        s.out_places.clear();
        for e in entries.iter() {
            let (first, len) = (e.place.first, e.place.len);
            s.places
                .extend((0..e.tokens.len()).map(|t| (first + t, len)));
            s.out_places
                .extend((0..e.n_logits).map(|i| match e.place.outputs {
                    Some((first, total)) => (first + i, total),
                    None => (i, e.n_logits),
                }));
        }
        // Whether llama.cpp's batch keeps fewer rows for its last layer than it has tokens,
        // though all of this call's rows are wanted.
        let outputs_apart = entries.iter().any(|e| {
            e.place
                .outputs
                .is_some_and(|(_, total)| total < e.place.len)
        });
        // Rows the layers compute: every token until the last layer keeps only the rows
        // whose logits are wanted.
        let mut rows = n;

        let positions = || {
            entries
                .iter()
                .flat_map(|e| (0..e.tokens.len()).map(|t| e.seq.kv.len() + t))
        };
        let half_rot = cfg.n_rot / 2;
        let global_rope = (cfg.rope_base, cfg.rope_freq_scale);
        let local_rope = (cfg.rope_base_local, 1.0);
        let factors = w.rope_freq_factors.as_deref();
        s.rope[0].fill(positions(), cfg.n_rot, global_rope, factors);
        if cfg.layer_window.iter().any(Option::is_some) {
            s.rope[1].fill(positions(), cfg.n_rot, local_rope, factors);
        }

        let all_tokens = entries.iter().flat_map(|e| e.tokens.iter());
        for (&tok, x) in all_tokens.zip(s.x.chunks_exact_mut(d)) {
            w.token_embd.dequantize_row(file, tok as usize, x)?;
        }
        if let Some(scale) = cfg.embedding_scale {
            s.x.iter_mut().for_each(|v| *v *= scale);
        }

        let shape = AttentionShape {
            n_head: cfg.n_head,
            n_head_kv: cfg.n_head_kv,
            head_dim: hd,
            scale: cfg.attn_scale,
            scale_on_query: cfg.arch == Architecture::Gemma3,
            logit_softcap: cfg.attn_logit_softcap,
            window: None,
        };
        for e in entries.iter_mut() {
            let end = e.seq.kv.len() + e.tokens.len();
            e.seq.attention = e.seq.record_attention.then(|| vec![0.0f32; end]);
        }
        for (li, layer) in w.layers.iter().enumerate() {
            // Attention block.
            add_and_norm_rows(
                pool,
                &mut s.x,
                None,
                &layer.attn_norm,
                cfg.rms_eps,
                &mut s.normed,
            );
            trace::dump("attn_norm", Some(li), &s.normed);
            s.acts.set_input_placed(&s.places, d);
            for ty in [layer.wq.ty, layer.wk.ty, layer.wv.ty] {
                s.acts.prepare(pool, ty, &s.normed)?;
            }
            matmul_fused(
                pool,
                file,
                &mut [
                    Product {
                        w: &layer.wq,
                        acts: s.acts.get(layer.wq.ty)?,
                        out: &mut s.q,
                    },
                    Product {
                        w: &layer.wk,
                        acts: s.acts.get(layer.wk.ty)?,
                        out: &mut s.k,
                    },
                    Product {
                        w: &layer.wv,
                        acts: s.acts.get(layer.wv.ty)?,
                        out: &mut s.v,
                    },
                ],
            )?;
            for (rows, bias) in [
                (&mut s.q, &layer.q_bias),
                (&mut s.k, &layer.k_bias),
                (&mut s.v, &layer.v_bias),
            ] {
                if let Some(bias) = bias {
                    add_bias_to_rows(rows, bias);
                }
            }
            trace::dump("Qcur", Some(li), &s.q);
            trace::dump("Kcur", Some(li), &s.k);
            trace::dump("Vcur", Some(li), &s.v);

            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                ops::rms_norm_in_place_rows(&mut s.q, qn, cfg.rms_eps);
                ops::rms_norm_in_place_rows(&mut s.k, kn, cfg.rms_eps);
            }
            let window = cfg.layer_window[li];
            let rope = &s.rope[usize::from(window.is_some())];
            let shape = AttentionShape { window, ..shape };
            // Rows of the batch before the current entry's.
            let mut first = 0;
            for e in entries.iter_mut() {
                let seq = &mut *e.seq;
                let (start, len) = (seq.kv.len(), e.tokens.len());
                for t in first..first + len {
                    let pos = start + (t - first);
                    let (cos, sin) = rope.row(t, half_rot);
                    let rotate = |head: &mut [f32]| match cfg.rope_style {
                        RopeStyle::AdjacentPairs => {
                            ops::rope_adjacent_pairs(&mut head[..cfg.n_rot], cos, sin)
                        }
                        RopeStyle::SplitHalves => {
                            ops::rope_split_halves(&mut head[..cfg.n_rot], cos, sin)
                        }
                    };
                    s.q[t * q_dim..(t + 1) * q_dim]
                        .chunks_exact_mut(hd)
                        .for_each(&rotate);
                    s.k[t * kv_dim..(t + 1) * kv_dim]
                        .chunks_exact_mut(hd)
                        .for_each(&rotate);
                    seq.kv.store(
                        li,
                        pos,
                        &s.k[t * kv_dim..(t + 1) * kv_dim],
                        &s.v[t * kv_dim..(t + 1) * kv_dim],
                    );
                }

                first += len;
            }
            trace::dump("Qrope", Some(li), &s.q);
            trace::dump("Krope", Some(li), &s.k);
            if let [e] = entries {
                // One sequence (every decode step of a solo run): no job list to allocate.
                let (start, len) = (e.seq.kv.len(), e.tokens.len());
                attention(
                    pool,
                    &e.seq.kv,
                    li,
                    start,
                    len,
                    e.place.is_batch(),
                    &shape,
                    &s.q,
                    &mut s.attention,
                    &mut s.attn,
                    None,
                )?;
            } else {
                let mut jobs = Vec::with_capacity(entries.len());
                let (mut q_rest, mut out_rest) = (&s.q[..], &mut s.attn[..]);
                for e in entries.iter() {
                    let rows = e.tokens.len() * q_dim;
                    let (q, q_next) = q_rest.split_at(rows);
                    let (out, out_next) = std::mem::take(&mut out_rest).split_at_mut(rows);
                    (q_rest, out_rest) = (q_next, out_next);
                    jobs.push(AttentionJob {
                        kv: &e.seq.kv,
                        start: e.seq.kv.len(),
                        n_tokens: e.tokens.len(),
                        batched: e.place.is_batch(),
                        q,
                        out,
                    });
                }
                attention_batch(pool, li, &shape, &mut jobs, &mut s.attention)?;
            }
            // Sequences recording attention add this layer's pattern of their last token.
            let mut first = 0;
            for e in entries.iter_mut() {
                let (start, len) = (e.seq.kv.len(), e.tokens.len());
                if let Some(sum) = e.seq.attention.as_mut() {
                    let pos = start + len - 1;
                    resize(&mut s.head_probs, cfg.n_head * (pos + 1));
                    let q_last = &s.q[(first + len - 1) * q_dim..(first + len) * q_dim];
                    let batched = e.place.is_batch();
                    let kv = &e.seq.kv;
                    last_token_attention(kv, li, pos, batched, &shape, q_last, &mut s.head_probs);
                    for head in s.head_probs.chunks_exact(pos + 1) {
                        ops::add_in_place(sum, head);
                    }
                }
                first += len;
            }
            s.acts.set_input_placed(&s.places, q_dim);
            s.acts.prepare(pool, layer.wo.ty, &s.attn)?;
            matmul(pool, &layer.wo, file, s.acts.get(layer.wo.ty)?, &mut s.proj)?;
            trace::dump("kqv_out", Some(li), &s.attn);
            trace::dump("attn_out", Some(li), &s.proj);
            if li + 1 == cfg.n_layer && (n_logits < n || outputs_apart) {
                // As llama.cpp, the rest of the last layer runs on the rows whose logits are
                // wanted only: the others feed nothing. (Its products then see a batch of
                // those rows, which rounds some formats differently, so this is also needed
                // for equal results.)
                keep_output_rows(entries, d, &mut s.x);
                keep_output_rows(entries, d, &mut s.proj);
                s.normed.truncate(n_logits * d);
                rows = n_logits;
                std::mem::swap(&mut s.places, &mut s.out_places);
            }
            if rows == 0 {
                break;
            }
            if let Some(norm) = &layer.attn_post_norm {
                ops::rms_norm_in_place_rows(&mut s.proj, norm, cfg.rms_eps);
            }

            // Feed-forward block, its input the residual stream plus the attention output.
            add_and_norm_rows(
                pool,
                &mut s.x,
                Some(&s.proj),
                &layer.ffn_norm,
                cfg.rms_eps,
                &mut s.normed,
            );
            trace::dump("ffn_inp", Some(li), &s.x);
            trace::dump("ffn_norm", Some(li), &s.normed);
            feed_forward(
                pool,
                &layer.ffn,
                cfg.ffn_activation,
                file,
                &s.normed,
                &s.places[..rows],
                d,
                &mut s.ffn,
                &mut s.proj,
            )?;
            trace::dump("ffn_out", Some(li), &s.proj);
            if let Some(norm) = &layer.ffn_post_norm {
                ops::rms_norm_in_place_rows(&mut s.proj, norm, cfg.rms_eps);
            }
            ops::add_in_place(&mut s.x, &s.proj);
            trace::dump("l_out", Some(li), &s.x);
        }
        let inv_heads = 1.0 / (cfg.n_layer * cfg.n_head) as f32;
        for e in entries.iter_mut() {
            let end = e.seq.kv.len() + e.tokens.len();
            e.seq.kv.set_len(end);
            if let Some(sum) = e.seq.attention.as_mut() {
                sum.iter_mut().for_each(|v| *v *= inv_heads);
            }
        }

        // Only the rows whose logits were asked for go through the vocabulary projection,
        // the most expensive matrix of a small model: the last layer kept just those.
        for (x, normed) in
            s.x.chunks_exact(d)
                .zip(s.normed.chunks_exact_mut(d))
                .take(n_logits)
        {
            ops::rms_norm(x, &w.output_norm, cfg.rms_eps, normed);
        }
        // The output projection writes every logit: no zeroing first (a megabyte per token
        // for a 262k vocabulary).
        s.logits.resize(n_logits * cfg.n_vocab, 0.0);
        if n_logits > 0 {
            // The rows left are the outputs, and `places` theirs (swapped in with the rows
            // when the last layer kept only them).
            s.acts.set_input_placed(&s.places[..n_logits], d);
            s.acts
                .prepare(pool, w.output.ty, &s.normed[..n_logits * d])?;
            matmul(
                pool,
                &w.output,
                file,
                s.acts.get(w.output.ty)?,
                &mut s.logits,
            )?;
        }
        trace::dump("result_norm", None, &s.normed[..n_logits * d]);
        trace::dump("result_output", None, &s.logits);
        if let Some(scale) = cfg.logit_scale {
            s.logits.iter_mut().for_each(|v| *v *= scale);
        }
        if let Some(cap) = cfg.final_logit_softcap {
            s.logits.iter_mut().for_each(|v| *v = soft_cap(*v, cap));
        }
        Ok(&s.logits)
    }

    fn check_entry(&self, e: &BatchEntry<'_>) -> Result<()> {
        let (n, n_logits) = (e.tokens.len(), e.n_logits);
        if n == 0 {
            return Err(EngineError::invalid(
                "tokens",
                "at least one token is needed",
            ));
        }
        if n_logits > n {
            return Err(EngineError::invalid(
                "n_logits",
                format!("{n_logits} exceeds the {n} tokens given"),
            ));
        }
        let n_vocab = self.config.n_vocab;
        if let Some(&bad) = e.tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(EngineError::invalid(
                "tokens",
                format!("token id {bad} is outside the vocabulary of {n_vocab}"),
            ));
        }
        let end = e.seq.kv.len() + n;
        if end > e.seq.kv.capacity() {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: end,
                context_size: e.seq.kv.capacity(),
            });
        }
        Ok(())
    }
}
