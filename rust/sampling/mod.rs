//! Choosing the next token from a vector of logits, as Grok-1's reference `sample_token`
//! does (xai-org/grok-1 `runners.py`): divide by the temperature, mask disallowed tokens,
//! keep the nucleus, draw from the renormalised distribution, and report the drawn token's
//! probability and the 8 most probable tokens of that final distribution.
//!
//! # Semantics
//!
//! For logits `l` over a vocabulary of `n` tokens and [`SamplingParams`] `(T, p, mask)`:
//!
//! 1. **Sanitising.** A NaN logit counts as -inf (never drawn); +inf counts as `f32::MAX`, so
//!    several +inf tokens share the mass. No input makes the sampler panic or return NaN.
//! 2. **Temperature and mask.** For allowed tokens `s_i = l_i / T` in f32, as the reference
//!    divides. Disallowed tokens are removed outright (the reference sets them to -1e10,
//!    which gives them probability exactly 0 unless every allowed logit is below about
//!    -1e10; removal also covers that case). If the division overflows f32 (a tiny `T`, or
//!    a +inf logit with `T` < 1), `s_i = (l_i - max_allowed l) / T` instead: the same
//!    distribution, computed without infinities.
//! 3. **Softmax.** With `m = max s`, each allowed token's weight is `w_i = exp(s_i - m)`,
//!    computed by a portable f32 exponential (`steps::exp32`, within 2e-7 of e^x, exactly 0
//!    below -87) so that the same logits give the same bits on every platform, and
//!    `Z = Σ w_i` in f64 (a fixed summation order, `steps::lane_sum`). Tokens whose weight
//!    is 0 (far below the maximum) are outside the support and can never be drawn.
//! 4. **Nucleus.** Order the support by `s` descending (ties by id). Walking groups of equal
//!    `s` from the top, keep a group while the mass of the groups above it (their weights
//!    summed in f64 in that order) divided by `Z` is at most `p`. This is the reference's
//!    `top_p_filter` read from the other end: it sorts ascending, finds the first index
//!    where the cumulative f32 softmax reaches `1 - p`, and keeps every logit >= the logit
//!    there (so ties at the threshold are kept); in exact arithmetic both keep the same
//!    tokens. Summing from the top in f64 avoids the reference's rounding over a long tail
//!    of tiny probabilities, which can only matter when a cumulative sum lies within
//!    rounding error of the threshold. `p = 1` keeps the whole support (the reference keeps
//!    every token, but those outside the support have probability 0 there too).
//! 5. **Draw.** The final distribution is `q_i = w_i / Z_kept` over the kept tokens
//!    (`Z_kept` = their weights summed in f64 in sorted order; `Z` itself when `p = 1`).
//!    One uniform `u` in [0, 1) from [`Rng::next_f64`] picks the first kept token, in sorted
//!    order, at which the running weight sum exceeds `u * Z_kept` (inverse CDF). The
//!    reference draws with `jax.random.categorical` (Gumbel-max on JAX's threefry), so a
//!    seed cannot give the reference's tokens, only the same distribution.
//! 6. **Report.** `prob = q_drawn`, rounded to f32. `top_k` holds up to 8 kept tokens with
//!    nonzero `q`, by `q` descending then id ascending. The reference always returns 8,
//!    padding with probability-0 tokens when the nucleus is smaller; those carry no
//!    information, so they are left out. `logprob_raw` is the log-softmax of the raw logits
//!    (sanitised, unmasked, temperature 1) at the drawn token: the model's own log-probability,
//!    unaffected by temperature, mask and nucleus, which is what scoring needs.
//!
//! **Temperature 0 is greedy** (the reference would divide by zero): the drawn token is the
//! argmax of the masked logits, lowest id on ties, and no random number is consumed. The
//! final distribution is then the point mass on it, so `prob = 1.0`. A point mass has no
//! alternatives worth reporting, so `top_k` instead describes the distribution the choice
//! was made from: the masked softmax at temperature 1 without the nucleus, whose first entry
//! is the drawn token (with its probability there, generally below 1). A temperature above 0
//! consumes exactly one `next_f64` per call.
//!
//! # Where this differs from the reference, and why
//!
//! - Temperature 0 is greedy instead of a division by zero (above).
//! - NaN and +inf logits are defined (step 1) instead of poisoning the softmax.
//! - Masked tokens are removed rather than set to -1e10 (step 2): identical unless every
//!   allowed logit is below about -1e10, where the reference would start drawing masked tokens.
//! - The nucleus sums from the top in f64 (step 4), not from the bottom in f32.
//! - The draw is an inverse CDF on our own pinned RNG (step 5), not JAX's Gumbel-max.
//! - `top_k` omits probability-0 entries rather than padding to 8 (step 6).
//! - `logprob_raw` is an addition of ours.
//!
//! # Randomness
//!
//! [`Rng`] is xoshiro256** seeded through SplitMix64, implemented here and checked against
//! the algorithms' published reference outputs, so a seed means the same stream forever on
//! every platform. [`derive_call_seed`] gives the documented per-call seed of a sampler
//! created with an initial seed. Together with the portable exponential, the same logits,
//! parameters and seed give the same token and the same reported probabilities everywhere.
//!
//! # Speed
//!
//! A call makes a few linear passes over the vocabulary (scale, maximum, weights and their
//! sum, plus one for the raw log-softmax when `T` != 1 or a mask is set). They are compiled
//! three times, for the baseline CPU, AVX2 and AVX-512F, the widest chosen at run time; Rust
//! never fuses a multiply and an add on its own, so all perform the same IEEE operations and
//! give the same bits.
//! Nothing is sorted wholesale: candidates are collected in bands below the maximum scaled
//! logit (8 units first, each next band half as wide again), and within a band a histogram
//! of weight by distance picks the prefix predicted to settle the nucleus, the draw and the
//! top-8 list; only that prefix is sorted, then the rest of the band or the next band if
//! the prediction fell short. The result is always the one a full sort gives: the tests
//! keep that full-sort version (`tests::sample_reference`) and compare bit for bit. On a
//! 262k vocabulary with language-model-like logits a call costs about 0.3 ms of one core
//! with AVX-512 (0.17 ms greedy; 0.6 and 0.3 ms with AVX2; see the ignored
//! `timing_on_a_262k_vocabulary` test), nearly all of it in the exponential passes.

mod draw;
mod mask;
mod params;
mod rng;
mod steps;

#[cfg(test)]
mod tests;

pub use draw::TOP_K;
pub use mask::TokenMask;
pub use params::SamplingParams;
pub use rng::{derive_call_seed, Rng};

use crate::error::{EngineError, Result};
use steps::Candidate;

/// A search this many units below the maximum scaled logit holds every token of nonzero
/// weight (`exp32` is 0 below -87), so it stands for "the whole support".
const WHOLE_SUPPORT_DISTANCE: f32 = 88.0;

/// How many times the tokens it must settle the greedy search's first band holds at least:
/// room for the top-k list's proof (a lighter token, then one clearly lighter still).
const TOP_COUNT_MARGIN: usize = 2;

/// One sampled token with the probabilities reported to the user.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    /// Probability of `id` in the final (tempered, masked, nucleus-filtered) distribution;
    /// 1.0 when greedy.
    pub prob: f32,
    /// Log-softmax of the raw logits at `id` (temperature 1, no mask, no nucleus).
    pub logprob_raw: f32,
    /// Up to [`TOP_K`] most probable tokens of the final distribution (of the masked softmax
    /// at temperature 1 when greedy), by probability descending, ties by id.
    pub top_k: Vec<(u32, f32)>,
}

/// Samples tokens, reusing its buffers: after the first call on a vocabulary size, a call
/// allocates only the returned `top_k` vector. One per sequence (or per thread).
#[derive(Debug, Default)]
pub struct Sampler {
    scaled: Vec<f32>,
    weights: Vec<f32>,
    candidates: Vec<Candidate>,
    histogram: steps::DistanceHistogram,
    /// Scratch of the greedy search's first band.
    chunk_maxima: Vec<f32>,
}

/// What the candidate search settled: the drawn token and its final probability.
struct Choice {
    id: u32,
    prob: f32,
}

impl Sampler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Samples one token from `logits` (one per vocabulary entry) as the module docs
    /// specify. Errors (InvalidArgument) on bad parameters, empty logits, a mask built for
    /// another vocabulary size, or when no allowed token has a finite logit.
    pub fn sample(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        rng: &mut Rng,
    ) -> Result<SampledToken> {
        params.validate()?;
        let mask = params.mask.as_ref();
        let n_allowed = check_shapes(logits, params)?;
        let greedy = params.temperature == 0.0;
        let (temperature, nucleus_p) = if greedy {
            (1.0, 1.0)
        } else {
            (params.temperature, params.nucleus_p)
        };

        let max = steps::scale_logits(logits, mask, temperature, &mut self.scaled)?;
        let normaliser = steps::softmax_weights(&self.scaled, max, &mut self.weights);
        let uniform = if greedy { None } else { Some(rng.next_f64()) };
        let mut top_k = Vec::with_capacity(TOP_K);
        let choice = self.choose(n_allowed, max, normaliser, nucleus_p, uniform, &mut top_k)?;

        // Logit count fits u32 (checked), so the id indexes `logits`.
        let drawn_logit = steps::sanitize(logits[choice.id as usize]);
        let (raw_max, raw_normaliser) = if mask.is_none() && temperature == 1.0 {
            // At temperature 1 without a mask the scaled logits are the sanitised logits.
            (max, normaliser)
        } else {
            steps::raw_log_normaliser(logits)
        };
        let logprob_raw = (f64::from(drawn_logit - raw_max) - raw_normaliser.ln()) as f32;
        Ok(SampledToken {
            id: choice.id,
            prob: choice.prob,
            logprob_raw,
            top_k,
        })
    }

    /// Collects candidates in widening bands below the maximum and sorts them lazily: within
    /// a band, first only the part the histogram predicts will settle the nucleus, the draw
    /// and the top-8 list, then the rest of the band, then the next band.
    fn choose(
        &mut self,
        n_allowed: usize,
        max: f32,
        normaliser: f64,
        nucleus_p: f32,
        uniform: Option<f64>,
        top_k: &mut Vec<(u32, f32)>,
    ) -> Result<Choice> {
        // What a sorted prefix must hold to settle everything: more than p of the mass (the
        // nucleus), or more than the draw's target when p = 1; and, unless the nucleus
        // bounds the top-8 list, enough tokens to fill it and prove it complete. The small
        // slack covers sums accumulated in a different order.
        let slack = 1e-9 * normaliser;
        let (min_mass, min_count) = match uniform {
            _ if nucleus_p < 1.0 => (f64::from(nucleus_p) * normaliser + slack, 0),
            Some(uniform) => (uniform * normaliser + slack, 2 * TOP_K),
            None => (0.0, 2 * TOP_K),
        };
        self.candidates.clear();
        self.histogram.clear();
        let mut sorted_len = 0;
        let mut bands = steps::BandSchedule::new(n_allowed, normaliser, nucleus_p);
        if min_mass == 0.0 {
            // Only a count is needed (greedy): a band that surely holds a few times that
            // many tokens, often a few dozen where the first band would hold thousands.
            // (Where the top-k proof needs more, the band widens as usual.)
            if let Some(distance) = steps::distance_holding(
                &self.scaled,
                max,
                TOP_COUNT_MARGIN * min_count,
                &mut self.chunk_maxima,
            ) {
                bands = bands.starting_within(distance);
            }
        }
        let mut upper = f32::INFINITY;
        loop {
            let complete = bands.distance() >= WHOLE_SUPPORT_DISTANCE;
            let lower = if complete {
                f32::NEG_INFINITY
            } else {
                max - bands.distance()
            };
            steps::collect_candidates(
                &self.scaled,
                &self.weights,
                max,
                (lower, upper),
                &mut self.candidates,
                &mut self.histogram,
            );
            let cut = self.histogram.cut_for(max, lower, min_mass, min_count);
            let split = sorted_len
                + partition_in_place(&mut self.candidates[sorted_len..], |c| c.logit >= cut);
            if sorted_len < split && split < self.candidates.len() {
                self.candidates[sorted_len..split].sort_unstable_by_key(Candidate::descending_key);
                sorted_len = split;
                if let Some(choice) = settle(
                    &self.candidates[..split],
                    false,
                    max,
                    normaliser,
                    nucleus_p,
                    uniform,
                    top_k,
                ) {
                    return Ok(choice);
                }
            }
            self.candidates[sorted_len..].sort_unstable_by_key(Candidate::descending_key);
            sorted_len = self.candidates.len();
            if let Some(choice) = settle(
                &self.candidates,
                complete,
                max,
                normaliser,
                nucleus_p,
                uniform,
                top_k,
            ) {
                return Ok(choice);
            }
            if complete {
                return Err(EngineError::Internal(
                    "sampling: the whole support left the draw undecided".to_string(),
                ));
            }
            upper = lower;
            bands.widen();
        }
    }
}

/// Moves the elements satisfying `keep` to the front (in no particular order) and returns
/// how many there are.
fn partition_in_place<T>(items: &mut [T], keep: impl Fn(&T) -> bool) -> usize {
    let mut front = 0;
    for index in 0..items.len() {
        if keep(&items[index]) {
            items.swap(front, index);
            front += 1;
        }
    }
    front
}

/// Validates the logits against the mask; returns how many tokens are allowed.
fn check_shapes(logits: &[f32], params: &SamplingParams) -> Result<usize> {
    if logits.is_empty() {
        return Err(EngineError::invalid(
            "logits",
            "no logits given (the vector is empty)",
        ));
    }
    if u32::try_from(logits.len()).is_err() {
        return Err(EngineError::invalid(
            "logits",
            format!("{} logits exceed the range of u32 token ids", logits.len()),
        ));
    }
    match &params.mask {
        None => Ok(logits.len()),
        Some(mask) if mask.n_vocab() != logits.len() => Err(EngineError::invalid(
            mask.param_name(),
            format!(
                "the mask covers {} tokens but there are {} logits",
                mask.n_vocab(),
                logits.len()
            ),
        )),
        Some(mask) if mask.n_allowed() == 0 => Err(EngineError::invalid(
            mask.param_name(),
            "every token is masked out",
        )),
        Some(mask) => Ok(mask.n_allowed()),
    }
}

/// Nucleus, draw and top-8 over `sorted`, a sorted prefix of the support (the whole
/// support when `complete`); `None` when the prefix is too short to decide.
fn settle(
    sorted: &[Candidate],
    complete: bool,
    max: f32,
    normaliser: f64,
    nucleus_p: f32,
    uniform: Option<f64>,
    top_k: &mut Vec<(u32, f32)>,
) -> Option<Choice> {
    let (kept, kept_normaliser, whole) = if nucleus_p >= 1.0 {
        (sorted, normaliser, complete)
    } else {
        let (n_kept, kept_normaliser) =
            steps::nucleus_cut(sorted, normaliser, nucleus_p, complete)?;
        (&sorted[..n_kept], kept_normaliser, true)
    };
    let (drawn, prob) = match uniform {
        // Greedy: the argmax (lowest id on ties) leads the sorted support.
        None => (kept.first()?, 1.0),
        Some(uniform) => {
            let drawn = kept.get(draw::draw_index(kept, kept_normaliser, uniform, whole)?)?;
            (drawn, draw::final_prob(drawn.weight, kept_normaliser))
        }
    };
    if !draw::top_k(kept, kept_normaliser, max, whole, top_k) {
        return None;
    }
    Some(Choice { id: drawn.id, prob })
}
