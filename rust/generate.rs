//! The decode loop of one sequence: prefill the prompt in chunks, then repeatedly sample,
//! check the stop conditions and feed the sampled token back. Every token is handed to a
//! callback as soon as it is sampled; a cancel flag is checked between prefill chunks and
//! between tokens so a consumer that goes away stops the work within one step.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{EngineError, Result};
use crate::model::transformer::{BatchEntry, BatchScratch, SequenceState};
use crate::model::Model;
use crate::sampling::{Rng, Sampler, SamplingParams};
use crate::text::{StopMatcher, Utf8Stream};

/// Prompt tokens evaluated per forward call (see `model::transformer`); also the
/// granularity at which a long prefill can be cancelled.
pub use crate::model::transformer::{BatchPlace, PREFILL_CHUNK};

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

/// What a sequence does in its next forward call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Evaluating the prompt from this position on, a chunk per call.
    Prefill(usize),
    /// Feeding back the token sampled last.
    Decode(u32),
}

/// The result of handing one forward call's logits to a [`SequenceRun`].
pub struct StepOutput {
    /// The sampled token, to deliver (none while prefilling or when sampling ended it).
    pub token: Option<GeneratedToken>,
    /// Set when the run is over; the token, if any, is delivered first.
    pub stop: Option<StopReason>,
}

/// One request's decode loop as a state machine, so a sequence can be driven alone
/// ([`generate`]) or as one entry of a batched forward call (`crate::batching`), by the
/// same code: both take the same steps, hence produce the same tokens.
pub struct SequenceRun {
    request: GenerateRequest,
    seq: SequenceState,
    phase: Phase,
    stop_matcher: StopMatcher,
    utf8: Utf8Stream,
    sampler: Sampler,
    rng: Rng,
    end_of_generation: Vec<u32>,
    usage: Usage,
}

impl SequenceRun {
    /// Validates the request and allocates its sequence (the KV cache grows page by page).
    pub fn new(model: &Model, request: GenerateRequest) -> Result<Self> {
        validate(model, &request)?;
        let limit = request
            .context_limit
            .unwrap_or(usize::MAX)
            .min(model.config.n_ctx_train);
        let capacity = limit.min(request.prompt.len().saturating_add(request.max_len));
        let mut seq = model.new_sequence(capacity);
        seq.record_attention(request.return_attention);
        Ok(Self {
            stop_matcher: StopMatcher::new(&request.stop_strings)?,
            utf8: Utf8Stream::new(),
            sampler: Sampler::new(),
            rng: Rng::from_seed(request.seed),
            end_of_generation: model.tokenizer.end_of_generation_ids().to_vec(),
            usage: Usage {
                prompt_tokens: request.prompt.len(),
                sampled_tokens: 0,
            },
            phase: Phase::Prefill(0),
            seq,
            request,
        })
    }

    /// This run's part of the next forward call.
    pub fn next_entry(&mut self) -> BatchEntry<'_> {
        let prompt = &self.request.prompt;
        match &self.phase {
            Phase::Prefill(from) => {
                let to = (from + PREFILL_CHUNK).min(prompt.len());
                BatchEntry {
                    seq: &mut self.seq,
                    tokens: &prompt[*from..to],
                    n_logits: usize::from(to == prompt.len()),
                    place: BatchPlace::in_prompt(*from, prompt.len()),
                }
            }
            Phase::Decode(token) => BatchEntry {
                seq: &mut self.seq,
                tokens: std::slice::from_ref(token),
                n_logits: 1,
                place: BatchPlace::whole(1),
            },
        }
    }

    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    /// Advances past the forward call that consumed [`Self::next_entry`]; `logits` is this
    /// run's row of its output (empty while a prefill chunk yields none).
    pub fn after_forward(&mut self, model: &Model, logits: &[f32]) -> Result<StepOutput> {
        let nothing = StepOutput {
            token: None,
            stop: None,
        };
        if let Phase::Prefill(from) = self.phase {
            let to = (from + PREFILL_CHUNK).min(self.request.prompt.len());
            if to < self.request.prompt.len() {
                self.phase = Phase::Prefill(to);
                return Ok(nothing);
            }
        }
        let sampled = self
            .sampler
            .sample(logits, &self.request.sampling, &mut self.rng)?;
        let id = sampled.id;
        if self.request.stop_token_ids.contains(&id) {
            return Ok(self.stopped(StopReason::StopToken(id)));
        }
        if self.end_of_generation.contains(&id) {
            return Ok(self.stopped(StopReason::EndOfSequence(id)));
        }
        let bytes = model.tokenizer.token_bytes(id, false).to_vec();
        let text = self.utf8.push(&bytes);
        let matched = self.stop_matcher.push(&bytes);
        self.usage.sampled_tokens += 1;
        let token = GeneratedToken {
            id,
            bytes,
            text,
            prob: sampled.prob,
            logprob_raw: sampled.logprob_raw,
            top_k: sampled.top_k,
            attention: self.seq.take_attention(),
        };
        let stop = if let Some(index) = matched {
            Some(StopReason::StopString(index))
        } else if self.usage.sampled_tokens >= self.request.max_len {
            Some(StopReason::MaxLen)
        } else if self.seq.len() + 1 > self.seq.capacity() {
            Some(StopReason::ContextFull)
        } else {
            None
        };
        self.phase = Phase::Decode(id);
        Ok(StepOutput {
            token: Some(token),
            stop,
        })
    }

    fn stopped(&self, reason: StopReason) -> StepOutput {
        StepOutput {
            token: None,
            stop: Some(reason),
        }
    }

    /// The run's result once it stopped for `stop_reason`: usage and the bytes still held
    /// back for want of a complete character.
    pub fn finish(mut self, stop_reason: StopReason) -> Outcome {
        Outcome {
            stop_reason,
            usage: self.usage.clone(),
            trailing_text: self.utf8.finish(),
        }
    }
}

/// Runs the request to completion, calling `on_token` for every emitted token. `on_token`
/// returns false to stop early (the consumer went away), which ends with `Cancelled`.
pub fn generate(
    model: &Model,
    req: &GenerateRequest,
    cancel: &AtomicBool,
    mut on_token: impl FnMut(GeneratedToken) -> bool,
) -> Result<Outcome> {
    let mut run = SequenceRun::new(model, req.clone())?;
    let mut scratch = BatchScratch::default();
    let stop_reason = loop {
        if cancel.load(Ordering::Relaxed) {
            break StopReason::Cancelled;
        }
        let logits = model.forward_batch(&mut scratch, &mut [run.next_entry()])?;
        let step = run.after_forward(model, logits)?;
        if let Some(token) = step.token {
            if !on_token(token) {
                break StopReason::Cancelled;
            }
        }
        if let Some(reason) = step.stop {
            break reason;
        }
    };
    Ok(run.finish(stop_reason))
}
