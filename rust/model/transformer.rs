//! The forward pass, top to bottom like llama2.c's `forward`: embed, then per layer
//! norm → Q/K/V → RoPE → cache → attention → output projection → residual → norm →
//! feed-forward (dense or experts, `ffn.rs`) → residual, then the final norm and the
//! vocabulary projection. Architecture differences are config switches read here in
//! order: embedding scale, Q/K/V biases, Q/K norms, attention scale and soft-cap, post
//! norms, logit scale and soft-cap.
//! A call processes a batch of consecutive tokens of one sequence (prefill or one step).

use crate::error::{EngineError, Result};
use crate::kernels::attention::{attention, AttentionScratch, AttentionShape};
use crate::kernels::matmul::{matmul, matmul_fused, ActivationBatch, Product};
use crate::kernels::ops;
use crate::kv_cache::KvCache;
use crate::model::config::RopeStyle;
use crate::model::ffn::{feed_forward, FfnScratch};
use crate::model::Model;

/// Everything one sequence owns while it runs: its KV cache and reusable buffers, so the
/// decode loop does not allocate per token.
pub struct SequenceState {
    pub(crate) kv: KvCache,
    scratch: Scratch,
    /// When set, the last token's attention weights of each forward call are averaged
    /// over layers and heads into `attention`.
    record_attention: bool,
    attention: Option<Vec<f32>>,
}

#[derive(Default)]
struct Scratch {
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
    cos: Vec<f32>,
    sin: Vec<f32>,
    acts: ActivationBatch,
    ffn: FfnScratch,
}

fn resize(buf: &mut Vec<f32>, len: usize) {
    buf.clear();
    buf.resize(len, 0.0);
}

/// `cap · tanh(x / cap)`: squashes `x` smoothly into (-cap, cap).
fn soft_cap(x: f32, cap: f32) -> f32 {
    cap * (x / cap).tanh()
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
            ),
            scratch: Scratch::default(),
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

    /// [`Self::forward`] returning the logits in the sequence's own buffer, valid until its
    /// next forward call: the decode loop's form, which allocates nothing per token.
    pub fn forward_logits<'s>(
        &self,
        seq: &'s mut SequenceState,
        tokens: &[u32],
        n_logits: usize,
    ) -> Result<&'s [f32]> {
        let cfg = &self.config;
        let n = tokens.len();
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
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.n_vocab) {
            return Err(EngineError::invalid(
                "tokens",
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    cfg.n_vocab
                ),
            ));
        }
        let start = seq.kv.len();
        let end = start + n;
        if end > seq.kv.capacity() {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: end,
                context_size: seq.kv.capacity(),
            });
        }
        seq.kv.reserve_to(end);

        let file = self.weight_bytes();
        let pool = &*self.pool;
        let w = &self.weights;
        let (d, q_dim, kv_dim, hd) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let s = &mut seq.scratch;
        resize(&mut s.x, n * d);
        resize(&mut s.normed, n * d);
        resize(&mut s.q, n * q_dim);
        resize(&mut s.k, n * kv_dim);
        resize(&mut s.v, n * kv_dim);
        resize(&mut s.attn, n * q_dim);
        resize(&mut s.proj, n * d);
        if seq.record_attention {
            resize(&mut s.head_probs, cfg.n_head * end);
        }
        resize(&mut s.cos, cfg.n_rot / 2);
        resize(&mut s.sin, cfg.n_rot / 2);

        for (t, &tok) in tokens.iter().enumerate() {
            w.token_embd
                .dequantize_row(file, tok as usize, &mut s.x[t * d..(t + 1) * d])?;
        }
        if let Some(scale) = cfg.embedding_scale {
            s.x.iter_mut().for_each(|v| *v *= scale);
        }

        let shape = AttentionShape {
            n_head: cfg.n_head,
            n_head_kv: cfg.n_head_kv,
            head_dim: hd,
            scale: cfg.attn_scale,
            logit_softcap: cfg.attn_logit_softcap,
            window: None,
        };
        let mut attention_sum = seq.record_attention.then(|| vec![0.0f32; end]);
        for (li, layer) in w.layers.iter().enumerate() {
            // Attention block.
            for t in 0..n {
                ops::rms_norm(
                    &s.x[t * d..(t + 1) * d],
                    &layer.attn_norm,
                    cfg.rms_eps,
                    &mut s.normed[t * d..(t + 1) * d],
                );
            }
            s.acts.set_input(n, d);
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

            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                s.q.chunks_exact_mut(hd)
                    .for_each(|head| ops::rms_norm_in_place(head, qn, cfg.rms_eps));
                s.k.chunks_exact_mut(hd)
                    .for_each(|head| ops::rms_norm_in_place(head, kn, cfg.rms_eps));
            }
            let window = cfg.layer_window[li];
            let (rope_base, rope_freq_scale) = match window {
                Some(_) => (cfg.rope_base_local, 1.0),
                None => (cfg.rope_base, cfg.rope_freq_scale),
            };
            for t in 0..n {
                let pos = start + t;
                ops::rope_angles(
                    pos,
                    cfg.n_rot,
                    rope_base,
                    rope_freq_scale,
                    w.rope_freq_factors.as_deref(),
                    &mut s.cos,
                    &mut s.sin,
                );
                let rotate = |head: &mut [f32]| match cfg.rope_style {
                    RopeStyle::AdjacentPairs => {
                        ops::rope_adjacent_pairs(&mut head[..cfg.n_rot], &s.cos, &s.sin)
                    }
                    RopeStyle::SplitHalves => {
                        ops::rope_split_halves(&mut head[..cfg.n_rot], &s.cos, &s.sin)
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

            let shape = AttentionShape { window, ..shape };
            let head_probs = attention_sum.is_some().then_some(&mut s.head_probs[..]);
            attention(
                pool,
                &seq.kv,
                li,
                start,
                n,
                &shape,
                &s.q,
                &mut s.attention,
                &mut s.attn,
                head_probs,
            )?;
            if let Some(sum) = attention_sum.as_mut() {
                for head in s.head_probs.chunks_exact(end) {
                    ops::add_in_place(sum, head);
                }
            }
            s.acts.set_input(n, q_dim);
            s.acts.prepare(pool, layer.wo.ty, &s.attn)?;
            matmul(pool, &layer.wo, file, s.acts.get(layer.wo.ty)?, &mut s.proj)?;
            if let Some(norm) = &layer.attn_post_norm {
                s.proj
                    .chunks_exact_mut(d)
                    .for_each(|row| ops::rms_norm_in_place(row, norm, cfg.rms_eps));
            }
            ops::add_in_place(&mut s.x, &s.proj);

            // Feed-forward block.
            for t in 0..n {
                ops::rms_norm(
                    &s.x[t * d..(t + 1) * d],
                    &layer.ffn_norm,
                    cfg.rms_eps,
                    &mut s.normed[t * d..(t + 1) * d],
                );
            }
            feed_forward(
                pool,
                &layer.ffn,
                cfg.ffn_activation,
                file,
                &s.normed,
                n,
                d,
                &mut s.ffn,
                &mut s.proj,
            )?;
            if let Some(norm) = &layer.ffn_post_norm {
                s.proj
                    .chunks_exact_mut(d)
                    .for_each(|row| ops::rms_norm_in_place(row, norm, cfg.rms_eps));
            }
            ops::add_in_place(&mut s.x, &s.proj);
        }
        seq.kv.set_len(end);
        if let Some(mut sum) = attention_sum {
            let inv = 1.0 / (cfg.n_layer * cfg.n_head) as f32;
            sum.iter_mut().for_each(|v| *v *= inv);
            seq.attention = Some(sum);
        }

        // Only the rows whose logits were asked for go through the vocabulary projection,
        // the most expensive matrix of a small model.
        let first = n - n_logits;
        for t in first..n {
            ops::rms_norm_in_place(&mut s.x[t * d..(t + 1) * d], &w.output_norm, cfg.rms_eps);
        }
        resize(&mut s.logits, n_logits * cfg.n_vocab);
        s.acts.set_input(n_logits, d);
        s.acts.prepare(pool, w.output.ty, &s.x[first * d..])?;
        matmul(
            pool,
            &w.output,
            file,
            s.acts.get(w.output.ty)?,
            &mut s.logits,
        )?;
        if let Some(scale) = cfg.logit_scale {
            s.logits.iter_mut().for_each(|v| *v *= scale);
        }
        if let Some(cap) = cfg.final_logit_softcap {
            s.logits.iter_mut().for_each(|v| *v = soft_cap(*v, cap));
        }
        Ok(&s.logits)
    }
}
