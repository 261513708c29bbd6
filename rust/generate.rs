//! The decode loop of one sequence: prefill the prompt in chunks, then repeatedly sample,
//! check the stop conditions and feed the sampled token back. Every token is handed to a
//! callback as soon as it is sampled; a cancel flag is checked between prefill chunks and
//! between tokens so a consumer that goes away stops the work within one step.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{EngineError, Result};
use crate::model::Model;
use crate::sampling::{Rng, Sampler, SamplingParams};
use crate::text::{StopMatcher, Utf8Stream};

/// Prompt tokens evaluated per forward call: bounds scratch memory and is the
/// granularity at which a long prefill can be cancelled.
pub const PREFILL_CHUNK: usize = 64;

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_len: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    /// Sampling one of these ends the stream; the token is not emitted.
    pub stop_token_ids: Vec<u32>,
    /// The token whose bytes complete one of these is emitted, then the stream ends.
    pub stop_strings: Vec<String>,
    /// Attach the attention pattern used to sample each token.
    pub return_attention: bool,
    /// Largest context to allocate (prompt + sampled tokens); the model's training
    /// context bounds it too.
    pub context_limit: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    MaxLen,
    StopToken(u32),
    /// Index into `GenerateRequest::stop_strings`.
    StopString(usize),
    EndOfSequence(u32),
    ContextFull,
    Cancelled,
}

impl StopReason {
    pub fn name(&self) -> &'static str {
        match self {
            Self::MaxLen => "max_len",
            Self::StopToken(_) => "stop_token",
            Self::StopString(_) => "stop_string",
            Self::EndOfSequence(_) => "end_of_sequence",
            Self::ContextFull => "context_full",
            Self::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug)]
pub struct GeneratedToken {
    pub id: u32,
    /// This token's raw bytes.
    pub bytes: Vec<u8>,
    /// The whole characters this token completes (see `text::Utf8Stream`).
    pub text: String,
    pub prob: f32,
    pub logprob_raw: f32,
    pub top_k: Vec<(u32, f32)>,
    /// Attention weights over the context positions 0..=pos used to sample this token,
    /// averaged over every layer and head.
    pub attention: Option<Vec<f32>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub sampled_tokens: usize,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub stop_reason: StopReason,
    pub usage: Usage,
    /// Bytes held back at the end because they did not form a complete character,
    /// already rendered as U+FFFD.
    pub trailing_text: String,
}

/// Checks a request against the model without running it, so callers can reject bad
/// arguments before starting a thread.
pub fn validate(model: &Model, req: &GenerateRequest) -> Result<()> {
    req.sampling.validate()?;
    if req.max_len == 0 {
        return Err(EngineError::invalid("max_len", "must be at least 1"));
    }
    if req.prompt.is_empty() {
        return Err(EngineError::invalid(
            "prompt",
            "the context is empty: give a prompt or inputs",
        ));
    }
    let n_vocab = model.config.n_vocab;
    if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(EngineError::invalid(
            "prompt",
            format!("token id {bad} is outside the vocabulary of {n_vocab}"),
        ));
    }
    let limit = req
        .context_limit
        .unwrap_or(usize::MAX)
        .min(model.config.n_ctx_train);
    if req.prompt.len() >= limit {
        return Err(EngineError::ContextOverflow {
            prompt_tokens: req.prompt.len(),
            context_size: limit,
        });
    }
    if let Some(&bad) = req.stop_token_ids.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(EngineError::invalid(
            "stop_tokens",
            format!("token id {bad} is outside the vocabulary of {n_vocab}"),
        ));
    }
    if req.stop_strings.iter().any(String::is_empty) {
        return Err(EngineError::invalid(
            "stop_strings",
            "an empty stop string would stop before any output",
        ));
    }
    Ok(())
}

/// Runs the request to completion, calling `on_token` for every emitted token. `on_token`
/// returns false to stop early (the consumer went away), which ends with `Cancelled`.
pub fn generate(
    model: &Model,
    req: &GenerateRequest,
    cancel: &AtomicBool,
    mut on_token: impl FnMut(GeneratedToken) -> bool,
) -> Result<Outcome> {
    validate(model, req)?;
    let limit = req
        .context_limit
        .unwrap_or(usize::MAX)
        .min(model.config.n_ctx_train);
    let capacity = limit.min(req.prompt.len().saturating_add(req.max_len));
    let mut seq = model.new_sequence(capacity);
    seq.record_attention(req.return_attention);
    let mut stop_matcher = StopMatcher::new(&req.stop_strings)?;
    let mut utf8 = Utf8Stream::new();
    let mut sampler = Sampler::new();
    let mut rng = Rng::from_seed(req.seed);
    let eog = model.tokenizer.end_of_generation_ids();
    let mut usage = Usage {
        prompt_tokens: req.prompt.len(),
        sampled_tokens: 0,
    };

    let mut logits = Vec::new();
    for (i, chunk) in req.prompt.chunks(PREFILL_CHUNK).enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Ok(Outcome {
                stop_reason: StopReason::Cancelled,
                usage,
                trailing_text: String::new(),
            });
        }
        let last = (i + 1) * PREFILL_CHUNK >= req.prompt.len();
        logits = model.forward(&mut seq, chunk, usize::from(last))?;
    }

    let stop_reason = loop {
        if cancel.load(Ordering::Relaxed) {
            break StopReason::Cancelled;
        }
        let sampled = sampler.sample(&logits, &req.sampling, &mut rng)?;
        let id = sampled.id;
        if req.stop_token_ids.contains(&id) {
            break StopReason::StopToken(id);
        }
        if eog.contains(&id) {
            break StopReason::EndOfSequence(id);
        }
        let bytes = model.tokenizer.token_bytes(id, false).to_vec();
        let text = utf8.push(&bytes);
        let matched = stop_matcher.push(&bytes);
        usage.sampled_tokens += 1;
        let token = GeneratedToken {
            id,
            bytes,
            text,
            prob: sampled.prob,
            logprob_raw: sampled.logprob_raw,
            top_k: sampled.top_k,
            attention: seq.take_attention(),
        };
        if !on_token(token) {
            break StopReason::Cancelled;
        }
        if let Some(index) = matched {
            break StopReason::StopString(index);
        }
        if usage.sampled_tokens >= req.max_len {
            break StopReason::MaxLen;
        }
        if seq.len() + 1 > seq.capacity() {
            break StopReason::ContextFull;
        }
        logits = model.forward(&mut seq, &[id], 1)?;
    };
    Ok(Outcome {
        stop_reason,
        usage,
        trailing_text: utf8.finish(),
    })
}
