//! Whole-sampler tests: hand-made distributions with exact expected probabilities, a
//! straightforward full-sort reference that the fast path must equal bit for bit, property
//! tests, a chi-square test of the draws, and an ignored timing test on a 262k vocabulary.

use super::steps::{exp32, sanitize};
use super::*;
use super::{Result, Rng};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// The module docs' semantics written the obvious way: every allowed token scaled, the whole
/// support sorted, the nucleus walked, the draw walked, the top-8 found by sorting by
/// probability. Shares only `exp32` and `sanitize` with the sampler (the arithmetic must be
/// the same for the results to be equal bit for bit).
fn sample_reference(
    logits: &[f32],
    params: &SamplingParams,
    rng: &mut Rng,
) -> Result<SampledToken> {
    let (distribution, greedy_id) = reference_distribution(logits, params)?;
    let (id, prob) = match greedy_id {
        Some(id) => (id, 1.0),
        None => {
            let target = rng.next_f64() * distribution.kept_normaliser;
            let mut cumulative = 0.0f64;
            let mut drawn = distribution.kept[distribution.kept.len() - 1];
            for &(id, weight) in &distribution.kept {
                cumulative += f64::from(weight);
                if cumulative > target {
                    drawn = (id, weight);
                    break;
                }
            }
            (
                drawn.0,
                (f64::from(drawn.1) / distribution.kept_normaliser) as f32,
            )
        }
    };
    let mut top_k: Vec<(u32, f32)> = distribution
        .kept
        .iter()
        .map(|&(id, weight)| {
            (
                id,
                (f64::from(weight) / distribution.kept_normaliser) as f32,
            )
        })
        .filter(|&(_, prob)| prob > 0.0)
        .collect();
    top_k.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
    top_k.truncate(TOP_K);

    let clean: Vec<f32> = logits.iter().map(|&l| sanitize(l)).collect();
    let raw_max = clean.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let raw_terms: Vec<f32> = clean.iter().map(|&l| exp32(l - raw_max)).collect();
    let raw_normaliser = reference_lane_sum(&raw_terms);
    let logprob_raw = (f64::from(clean[id as usize] - raw_max) - raw_normaliser.ln()) as f32;
    Ok(SampledToken {
        id,
        prob,
        logprob_raw,
        top_k,
    })
}

/// The kept tokens in sorted order as (id, weight), and their normaliser.
struct ReferenceDistribution {
    kept: Vec<(u32, f32)>,
    kept_normaliser: f64,
    /// Scaled logit of every token (-inf when disallowed).
    scaled: Vec<f32>,
    normaliser: f64,
}

impl ReferenceDistribution {
    fn probabilities(&self) -> Vec<(u32, f64)> {
        self.kept
            .iter()
            .map(|&(id, w)| (id, f64::from(w) / self.kept_normaliser))
            .collect()
    }
}

/// Steps 1-5 of the module docs by full sort; also returns the argmax when greedy.
fn reference_distribution(
    logits: &[f32],
    params: &SamplingParams,
) -> Result<(ReferenceDistribution, Option<u32>)> {
    params.validate()?;
    assert!(!logits.is_empty());
    let greedy = params.temperature == 0.0;
    let (temperature, nucleus_p) = if greedy {
        (1.0f32, 1.0f32)
    } else {
        (params.temperature, params.nucleus_p)
    };
    let allowed: Vec<usize> = (0..logits.len())
        .filter(|&i| match &params.mask {
            Some(mask) => mask.is_allowed(i as u32),
            None => true,
        })
        .collect();
    let clean: Vec<f32> = logits.iter().map(|&l| sanitize(l)).collect();
    let mut scaled = vec![f32::NEG_INFINITY; logits.len()];
    for &i in &allowed {
        scaled[i] = clean[i] / temperature + 0.0;
    }
    let mut max = allowed
        .iter()
        .map(|&i| scaled[i])
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        let raw_max = allowed
            .iter()
            .map(|&i| clean[i])
            .fold(f32::NEG_INFINITY, f32::max);
        if raw_max == f32::NEG_INFINITY {
            return Err(EngineError::invalid("logits", "no finite logit"));
        }
        for &i in &allowed {
            scaled[i] = (clean[i] - raw_max) / temperature + 0.0;
        }
        max = allowed
            .iter()
            .map(|&i| scaled[i])
            .fold(f32::NEG_INFINITY, f32::max);
    }
    let weights: Vec<f32> = scaled.iter().map(|&s| exp32(s - max)).collect();
    let normaliser = reference_lane_sum(&weights);

    let mut support: Vec<usize> = allowed.into_iter().filter(|&i| weights[i] > 0.0).collect();
    support.sort_by(|&a, &b| scaled[b].partial_cmp(&scaled[a]).unwrap().then(a.cmp(&b)));
    let (n_kept, kept_normaliser) = if nucleus_p >= 1.0 {
        (support.len(), normaliser)
    } else {
        let mut mass_above = 0.0f64;
        let mut n_kept = 0;
        while n_kept < support.len() && mass_above / normaliser <= f64::from(nucleus_p) {
            let group = scaled[support[n_kept]];
            while n_kept < support.len() && scaled[support[n_kept]] == group {
                mass_above += f64::from(weights[support[n_kept]]);
                n_kept += 1;
            }
        }
        (n_kept, mass_above)
    };
    let kept: Vec<(u32, f32)> = support[..n_kept]
        .iter()
        .map(|&i| (i as u32, weights[i]))
        .collect();
    let greedy_id = greedy.then(|| kept[0].0);
    Ok((
        ReferenceDistribution {
            kept,
            kept_normaliser,
            scaled,
            normaliser,
        },
        greedy_id,
    ))
}

fn reference_lane_sum(terms: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    for (i, &t) in terms.iter().enumerate() {
        lanes[i % 8] += f64::from(t);
    }
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
}

fn params(temperature: f32, nucleus_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        nucleus_p,
        mask: None,
    }
}

fn sample_once(logits: &[f32], params: &SamplingParams, seed: u64) -> SampledToken {
    Sampler::new()
        .sample(logits, params, &mut Rng::from_seed(seed))
        .unwrap()
}

/// Final probabilities indexed by token id (0 for tokens outside the final distribution).
fn final_distribution(logits: &[f32], params: &SamplingParams) -> Vec<f64> {
    let (distribution, _) = reference_distribution(logits, params).unwrap();
    let mut dense = vec![0.0; logits.len()];
    for (id, q) in distribution.probabilities() {
        dense[id as usize] = q;
    }
    dense
}

fn ln_probs(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|&p| p.ln() as f32).collect()
}

fn assert_close(actual: &[f64], expected: &[f64]) {
    assert_eq!(actual.len(), expected.len());
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() < 1e-6,
            "token {i}: got {a}, expected {e} (all: {actual:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Hand-made distributions (llama.cpp tests/test-sampling.cpp style).

#[test]
fn nucleus_on_a_four_token_distribution() {
    let logits = ln_probs(&[0.1, 0.2, 0.3, 0.4]);
    let cases: [(f32, [f64; 4]); 6] = [
        (1.0, [0.1, 0.2, 0.3, 0.4]),
        (0.95, [0.1, 0.2, 0.3, 0.4]),
        (0.75, [0.0, 2.0 / 9.0, 3.0 / 9.0, 4.0 / 9.0]),
        (0.5, [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]),
        (0.3, [0.0, 0.0, 0.0, 1.0]),
        (1e-6, [0.0, 0.0, 0.0, 1.0]),
    ];
    for (nucleus_p, expected) in cases {
        let actual = final_distribution(&logits, &params(1.0, nucleus_p));
        assert_close(&actual, &expected);
        // The sampler reports the same distribution through top_k.
        let token = sample_once(&logits, &params(1.0, nucleus_p), 3);
        let mut reported = [0.0f64; 4];
        for &(id, prob) in &token.top_k {
            reported[id as usize] = f64::from(prob);
        }
        assert_close(&reported, &expected);
        assert!(expected[token.id as usize] > 0.0);
        assert!((f64::from(token.prob) - expected[token.id as usize]).abs() < 1e-6);
    }
}

#[test]
fn temperature_sharpens_and_flattens() {
    let logits = ln_probs(&[0.1, 0.2, 0.3, 0.4]);
    // T = 0.5 squares the probabilities: 1, 4, 9, 16 over 30.
    assert_close(
        &final_distribution(&logits, &params(0.5, 1.0)),
        &[1.0 / 30.0, 4.0 / 30.0, 9.0 / 30.0, 16.0 / 30.0],
    );
    // T = 2 takes square roots.
    let roots: Vec<f64> = [0.1f64, 0.2, 0.3, 0.4].iter().map(|p| p.sqrt()).collect();
    let total: f64 = roots.iter().sum();
    let expected: Vec<f64> = roots.iter().map(|r| r / total).collect();
    assert_close(&final_distribution(&logits, &params(2.0, 1.0)), &expected);
    // The nucleus applies after the temperature: at T = 0.5, 16/30 + 9/30 > 0.6 >= 16/30.
    assert_close(
        &final_distribution(&logits, &params(0.5, 0.6)),
        &[0.0, 0.0, 9.0 / 25.0, 16.0 / 25.0],
    );
}

#[test]
fn nucleus_keeps_every_token_tied_at_the_threshold() {
    // Three tied tokens hold e/(3e+1) each; p = 0.3 is reached inside the tie, and Grok-1's
    // filter keeps every logit >= the threshold logit, so all three stay.
    let logits = [1.0, 1.0, 1.0, 0.0];
    assert_close(
        &final_distribution(&logits, &params(1.0, 0.3)),
        &[1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0],
    );
}

#[test]
fn masked_tokens_are_removed_before_the_nucleus() {
    let logits = ln_probs(&[0.1, 0.2, 0.3, 0.4]);
    let mut masked = params(1.0, 0.55);
    masked.mask = Some(TokenMask::disallow(4, &[3]).unwrap());
    // Without token 3: 1/6, 2/6, 3/6; 3/6 <= 0.55 so the 2/6 group stays too.
    assert_close(&final_distribution(&logits, &masked), &[0.0, 0.4, 0.6, 0.0]);
    masked.mask = Some(TokenMask::allow_only(4, &[0, 1]).unwrap());
    masked.nucleus_p = 1.0;
    assert_close(
        &final_distribution(&logits, &masked),
        &[1.0 / 3.0, 2.0 / 3.0, 0.0, 0.0],
    );
    for seed in 0..200 {
        let token = sample_once(&logits, &masked, seed);
        assert!(token.id < 2, "seed {seed} drew masked token {}", token.id);
    }
}

#[test]
fn greedy_takes_the_lowest_id_argmax_and_reports_the_temperature_one_alternatives() {
    let logits = [0.5, 2.0, -1.0, 2.0, f32::NAN];
    let token = sample_once(&logits, &SamplingParams::greedy(), 9);
    assert_eq!(token.id, 1);
    assert_eq!(token.prob, 1.0);
    let exps: Vec<f64> = [0.5f64, 2.0, -1.0, 2.0].iter().map(|l| l.exp()).collect();
    let total: f64 = exps.iter().sum();
    let expected_top: Vec<(u32, f64)> = vec![
        (1, exps[1] / total),
        (3, exps[3] / total),
        (0, exps[0] / total),
        (2, exps[2] / total),
    ];
    assert_eq!(
        token.top_k.len(),
        4,
        "NaN token must not be reported: {:?}",
        token.top_k
    );
    for (&(id, prob), &(expected_id, expected_prob)) in token.top_k.iter().zip(&expected_top) {
        assert_eq!(id, expected_id);
        assert!((f64::from(prob) - expected_prob).abs() < 1e-6);
    }
    assert!((f64::from(token.logprob_raw) - (exps[1] / total).ln()).abs() < 1e-6);
    // Greedy consumes no randomness.
    let mut rng = Rng::from_seed(5);
    Sampler::new()
        .sample(&logits, &SamplingParams::greedy(), &mut rng)
        .unwrap();
    assert_eq!(rng, Rng::from_seed(5));
    // A mask removes the argmax; the alternatives are renormalised over what is allowed.
    let mut masked = SamplingParams::greedy();
    masked.mask = Some(TokenMask::disallow(5, &[1, 3]).unwrap());
    let token = sample_once(&logits, &masked, 0);
    assert_eq!(token.id, 0);
    let allowed_total = exps[0] + exps[2];
    assert!((f64::from(token.top_k[0].1) - exps[0] / allowed_total).abs() < 1e-6);
    // logprob_raw ignores the mask: it is the model's own log-probability.
    assert!((f64::from(token.logprob_raw) - (exps[0] / total).ln()).abs() < 1e-6);
}

#[test]
fn logprob_raw_ignores_temperature_and_nucleus() {
    let logits = [3.0f32, 1.0, 0.0, -2.0];
    let total: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
    for seed in 0..20 {
        let token = sample_once(&logits, &params(1.7, 0.8), seed);
        let expected = f64::from(logits[token.id as usize]) - total.ln();
        assert!((f64::from(token.logprob_raw) - expected).abs() < 1e-6);
    }
}

#[test]
fn top_k_holds_at_most_eight_by_probability() {
    let logits: Vec<f32> = (0..20).map(|i| -(i as f32) * 0.3).collect();
    let token = sample_once(&logits, &params(1.0, 1.0), 1);
    let ids: Vec<u32> = token.top_k.iter().map(|&(id, _)| id).collect();
    assert_eq!(ids, (0..8).collect::<Vec<_>>());
    assert!(token.top_k.windows(2).all(|pair| pair[0].1 > pair[1].1));
}

#[test]
fn nan_and_infinite_logits_are_handled() {
    // NaN is never drawn; +inf tokens share the mass at every temperature.
    let logits = [
        f32::NAN,
        f32::INFINITY,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    for temperature in [0.0, 0.3, 1.0, 4.0] {
        for seed in 0..50 {
            let token = sample_once(&logits, &params(temperature, 0.9), seed);
            assert!(
                token.id == 1 || token.id == 3,
                "T={temperature}: drew {}",
                token.id
            );
            if temperature > 0.0 {
                assert_eq!(token.prob, 0.5);
            }
            assert!(token.logprob_raw.is_finite());
            assert!((token.logprob_raw - (0.5f32).ln()).abs() < 1e-6);
        }
    }
    let err = Sampler::new().sample(
        &[f32::NAN, f32::NEG_INFINITY],
        &params(1.0, 1.0),
        &mut Rng::from_seed(0),
    );
    assert!(err.unwrap_err().to_string().starts_with("logits:"));
}

#[test]
fn tiny_temperature_is_effectively_greedy() {
    let logits = [1.0f32, 3.0, 2.999, -5.0];
    let token = sample_once(&logits, &params(1e-30, 0.95), 4);
    assert_eq!((token.id, token.prob), (1, 1.0));
    assert_eq!(token.top_k, vec![(1, 1.0)]);
}

#[test]
fn invalid_inputs_name_the_parameter() {
    let mut sampler = Sampler::new();
    let mut rng = Rng::from_seed(0);
    let message = |result: Result<SampledToken>| result.unwrap_err().to_string();
    assert!(message(sampler.sample(&[], &params(1.0, 1.0), &mut rng)).starts_with("logits:"));
    assert!(
        message(sampler.sample(&[1.0], &params(-1.0, 1.0), &mut rng))
            .contains("temperature must be >= 0")
    );
    assert!(message(sampler.sample(&[1.0], &params(1.0, 1.5), &mut rng))
        .contains("nucleus_p must be in (0, 1]"));
    let mut masked = params(1.0, 1.0);
    masked.mask = Some(TokenMask::allow_only(3, &[0]).unwrap());
    let text = message(sampler.sample(&[1.0, 2.0], &masked, &mut rng));
    assert!(
        text.starts_with("allowed_tokens:")
            && text.contains("3 tokens")
            && text.contains("2 logits"),
        "{text}"
    );
    masked.mask = Some(TokenMask::disallow(2, &[0]).unwrap());
    let text = message(sampler.sample(&[1.0, f32::NAN], &masked, &mut rng));
    assert!(text.contains("disallowed_tokens"), "{text}");
}

#[test]
fn the_sampler_is_reusable_across_vocabulary_sizes() {
    let mut sampler = Sampler::new();
    let mut rng = Rng::from_seed(11);
    for n in [5usize, 500, 3, 64] {
        let logits: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 * 0.5).collect();
        let fast = sampler
            .sample(&logits, &params(0.8, 0.9), &mut rng.clone())
            .unwrap();
        let reference = sample_reference(&logits, &params(0.8, 0.9), &mut rng.clone()).unwrap();
        assert_eq!(fast, reference);
        rng.next_u64();
    }
}

/// Shapes that make the fast path widen its search: a tie run across the top-8 boundary
/// (the predicted prefix cannot prove the list complete), a draw landing in the tail at
/// nucleus 1, a flat distribution, and tokens spread over many bands.
#[test]
fn widening_searches_equal_the_reference() {
    let n = 5000;
    let mut tied_top = vec![-4.0f32; n];
    for logit in tied_top.iter_mut().take(40).skip(20) {
        *logit = 3.0;
    }
    let spread: Vec<f32> = (0..n)
        .map(|i| (i as f32 * 0.618).fract() * 200.0 - 100.0)
        .collect();
    let flat = vec![0.5f32; n];
    let mut heavy_tail = vec![0.0f32; n];
    heavy_tail[7] = 9.0;
    let cases = [tied_top, spread, flat, heavy_tail];
    let settings = [
        params(1.0, 1.0),
        params(0.7, 0.95),
        params(2.5, 0.99),
        SamplingParams::greedy(),
        params(0.3, 1.0),
    ];
    let mut sampler = Sampler::new();
    for (case, logits) in cases.iter().enumerate() {
        for params in &settings {
            for seed in 0..40 {
                let fast = sampler
                    .sample(logits, params, &mut Rng::from_seed(seed))
                    .unwrap();
                let reference =
                    sample_reference(logits, params, &mut Rng::from_seed(seed)).unwrap();
                assert_eq!(fast, reference, "case {case}, {params:?}, seed {seed}");
            }
        }
    }
}

/// Grok-1's `top_p_filter` literally (ascending sort, softmax, cumulative sum, first index
/// reaching 1 - p, keep logits >= the logit there), in f64.
fn grok_literal_kept(scaled: &[f32], nucleus_p: f64) -> Option<Vec<u32>> {
    let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = scaled
        .iter()
        .map(|&s| (f64::from(s) - f64::from(max)).exp())
        .collect();
    let total: f64 = exps.iter().sum();
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    order.sort_by(|&a, &b| scaled[a].partial_cmp(&scaled[b]).unwrap());
    let mut cumulative = 0.0;
    for &i in &order {
        cumulative += exps[i] / total;
        if (cumulative - (1.0 - nucleus_p)).abs() < 1e-6 {
            return None; // too close to call in any precision; skip the case
        }
        if cumulative >= 1.0 - nucleus_p {
            let threshold = scaled[i];
            return Some(
                (0..scaled.len() as u32)
                    .filter(|&j| scaled[j as usize] >= threshold)
                    .collect(),
            );
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// Property tests.

/// Logit vectors of several shapes: spread, peaked (a few spikes over a bulk, like a
/// language model), and heavily tied, with occasional NaN and infinities.
fn logits_strategy() -> impl Strategy<Value = Vec<f32>> {
    let value = prop_oneof![
        20 => -30.0f32..30.0,
        4 => (-4i32..4).prop_map(|v| v as f32),
        1 => Just(f32::NAN),
        1 => Just(f32::NEG_INFINITY),
    ];
    let spread = prop::collection::vec(value, 1..300);
    let peaked = (
        prop::collection::vec(-3.0f32..3.0, 1..3000),
        prop::collection::vec((0usize..3000, 5.0f32..25.0), 0..6),
    )
        .prop_map(|(mut bulk, spikes)| {
            let n = bulk.len();
            for (index, height) in spikes {
                bulk[index % n] = height;
            }
            bulk
        });
    let rare_infinity = prop::collection::vec(
        prop_oneof![9 => -5.0f32..5.0, 1 => Just(f32::INFINITY)],
        1..50,
    );
    prop_oneof![4 => spread, 3 => peaked, 1 => rare_infinity]
}

fn params_strategy(n_vocab: usize) -> impl Strategy<Value = SamplingParams> {
    let temperature =
        prop_oneof![2 => Just(0.0f32), 1 => Just(1.0f32), 6 => 0.05f32..3.0, 1 => Just(1e-30f32)];
    let nucleus_p = prop_oneof![2 => Just(1.0f32), 6 => 0.01f32..1.0, 1 => Just(0.999_999_9f32)];
    let ids = prop::collection::vec(0..n_vocab as u32, 0..n_vocab.min(40) + 1);
    let mask = (0u8..3, ids).prop_map(move |(kind, ids)| match kind {
        0 => None,
        1 => TokenMask::allow_only(n_vocab, &ids).ok(),
        _ => TokenMask::disallow(n_vocab, &ids).ok(),
    });
    (temperature, nucleus_p, mask).prop_map(|(temperature, nucleus_p, mask)| SamplingParams {
        temperature,
        nucleus_p,
        mask,
    })
}

fn case_strategy() -> impl Strategy<Value = (Vec<f32>, SamplingParams, u64)> {
    logits_strategy().prop_flat_map(|logits| {
        let n = logits.len();
        (Just(logits), params_strategy(n), any::<u64>())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn fast_path_equals_the_full_sort_reference((logits, params, seed) in case_strategy()) {
        check_fast_path_equals_reference(&logits, &params, seed)?;
    }

    #[test]
    fn final_distribution_is_a_tie_closed_nucleus((logits, params, _seed) in case_strategy()) {
        check_tie_closed_nucleus(&logits, &params)?;
    }

    #[test]
    fn draws_respect_the_mask_and_the_seed((logits, params, seed) in case_strategy()) {
        check_draw_properties(&logits, &params, seed)?;
    }
}

/// Greedy calls on vocabularies large enough for the first band to start from the chunk
/// maxima (at least `2 * 2 * TOP_K` chunks): spread, heavily tied, and clustered just below
/// a few spikes, so the top-k proof sometimes needs the band widened.
fn large_greedy_strategy() -> impl Strategy<Value = (Vec<f32>, SamplingParams)> {
    let bulk = prop_oneof![
        (2048usize..12_000).prop_map(|n| (0..n)
            .map(|i| ((i * 7919) % 600) as f32 / 100.0 - 3.0)
            .collect::<Vec<_>>()),
        (2048usize..12_000).prop_map(|n| (0..n).map(|i| ((i * 31) % 3) as f32).collect()),
        (2048usize..12_000, 0.0f32..1e-3).prop_map(|(n, step)| (0..n)
            .map(|i| 1.0 - step * ((i * 13) % 97) as f32)
            .collect()),
    ];
    let spikes = prop::collection::vec((any::<prop::sample::Index>(), -1.0f32..25.0), 0..40);
    (
        bulk,
        spikes,
        any::<bool>(),
        prop::collection::vec(any::<prop::sample::Index>(), 0..60),
    )
        .prop_map(|(mut logits, spikes, masked, ids)| {
            for (index, height) in spikes {
                let at = index.index(logits.len());
                logits[at] = height;
            }
            let n = logits.len();
            let ids: Vec<u32> = ids.iter().map(|i| i.index(n) as u32).collect();
            let mask = masked.then(|| TokenMask::disallow(n, &ids).ok()).flatten();
            let params = SamplingParams {
                temperature: 0.0,
                nucleus_p: 1.0,
                mask,
            };
            (logits, params)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 120, ..ProptestConfig::default() })]

    #[test]
    fn greedy_on_large_vocabularies_equals_the_full_sort_reference(
        (logits, params) in large_greedy_strategy(),
        seed in any::<u64>(),
    ) {
        check_fast_path_equals_reference(&logits, &params, seed)?;
    }
}

fn check_fast_path_equals_reference(
    logits: &[f32],
    params: &SamplingParams,
    seed: u64,
) -> Result<(), TestCaseError> {
    let fast = Sampler::new().sample(logits, params, &mut Rng::from_seed(seed));
    let reference = sample_reference(logits, params, &mut Rng::from_seed(seed));
    match (fast, reference) {
        (Ok(fast), Ok(reference)) => prop_assert_eq!(fast, reference),
        (Err(_), Err(_)) => {}
        (fast, reference) => prop_assert!(false, "fast {:?} vs reference {:?}", fast, reference),
    }
    Ok(())
}

/// The final distribution sums to 1 and is the smallest top set (by scaled logit, closed
/// under ties) whose mass exceeds p, the same tokens as Grok-1's filter computed literally.
fn check_tie_closed_nucleus(logits: &[f32], params: &SamplingParams) -> Result<(), TestCaseError> {
    let Ok((distribution, _)) = reference_distribution(logits, params) else {
        return Ok(());
    };
    let probabilities = distribution.probabilities();
    let total: f64 = probabilities.iter().map(|&(_, q)| q).sum();
    prop_assert!((total - 1.0).abs() < 1e-9, "sum {}", total);
    let scaled = &distribution.scaled;
    let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lowest_kept = probabilities
        .iter()
        .map(|&(id, _)| scaled[id as usize])
        .fold(f32::INFINITY, f32::min);
    let support_mass = |keep: &dyn Fn(f32) -> bool| -> f64 {
        let mass: f64 = scaled
            .iter()
            .filter(|&&s| keep(s))
            .map(|&s| f64::from(exp32(s - max)))
            .sum();
        mass / distribution.normaliser
    };
    // Tie-closed top set: every allowed token at or above the lowest kept logit is kept
    // (or has zero weight), and nothing below it is.
    for (i, &s) in scaled.iter().enumerate() {
        let kept = probabilities.iter().any(|&(id, _)| id as usize == i);
        let expected = s >= lowest_kept && exp32(s - max) > 0.0;
        prop_assert_eq!(kept, expected, "token {} scaled {}", i, s);
    }
    // Smallest such set reaching p: the kept groups above the last one hold at most p,
    // and the kept set holds more than p unless it is the whole support.
    let greedy = params.temperature == 0.0;
    let nucleus_p = if greedy {
        1.0
    } else {
        f64::from(params.nucleus_p)
    };
    let above_last = support_mass(&|s| s > lowest_kept);
    prop_assert!(
        above_last <= nucleus_p + 1e-12,
        "mass above the last group {} > p {}",
        above_last,
        nucleus_p
    );
    let kept_mass = support_mass(&|s| s >= lowest_kept);
    let whole = support_mass(&|s| s > f32::NEG_INFINITY);
    prop_assert!(kept_mass > nucleus_p - 1e-12 || (kept_mass - whole).abs() < 1e-12);
    // The same tokens as Grok-1's filter computed literally, away from rounding ties.
    if !greedy && params.nucleus_p < 1.0 {
        if let Some(literal) = grok_literal_kept_allowed(scaled, nucleus_p) {
            let mut ours: Vec<u32> = probabilities.iter().map(|&(id, _)| id).collect();
            ours.sort_unstable();
            prop_assert_eq!(ours, literal);
        }
    }
    Ok(())
}

/// Same seed, same token; masked ids and NaN logits never drawn or reported; probabilities
/// in range and ordered; greedy is the lowest-id argmax.
fn check_draw_properties(
    logits: &[f32],
    params: &SamplingParams,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut sampler = Sampler::new();
    let first = sampler.sample(logits, params, &mut Rng::from_seed(seed));
    let again = sampler.sample(logits, params, &mut Rng::from_seed(seed));
    let Ok(first) = first else {
        return Ok(());
    };
    prop_assert_eq!(&first, &again.unwrap());
    let allowed = |id: u32| match &params.mask {
        Some(mask) => mask.is_allowed(id),
        None => true,
    };
    prop_assert!(allowed(first.id));
    prop_assert!(first.top_k.iter().all(|&(id, _)| allowed(id)));
    prop_assert!(!logits[first.id as usize].is_nan());
    prop_assert!(first
        .top_k
        .iter()
        .all(|&(id, _)| !logits[id as usize].is_nan()));
    prop_assert!(first.prob > 0.0 && first.prob <= 1.0);
    prop_assert!(first.top_k.len() <= TOP_K && !first.top_k.is_empty());
    let ordered = |pair: &[(u32, f32)]| {
        pair[0].1 > pair[1].1 || (pair[0].1 == pair[1].1 && pair[0].0 < pair[1].0)
    };
    prop_assert!(first.top_k.windows(2).all(ordered));
    prop_assert!(first.logprob_raw <= 1e-6 && first.logprob_raw.is_finite());
    if params.temperature == 0.0 {
        // Greedy is the argmax of the allowed logits, lowest id on ties.
        let ids = 0..logits.len() as u32;
        let best = ids
            .clone()
            .filter(|&id| allowed(id))
            .map(|id| sanitize(logits[id as usize]))
            .fold(f32::NEG_INFINITY, f32::max);
        let argmax = ids
            .clone()
            .find(|&id| allowed(id) && sanitize(logits[id as usize]) == best);
        prop_assert_eq!(Some(first.id), argmax);
        prop_assert_eq!(first.prob, 1.0);
        prop_assert_eq!(first.top_k[0].0, first.id);
    } else {
        // The drawn token is listed with its probability, unless eight heavier ones fill the list.
        let listed = first
            .top_k
            .iter()
            .any(|&(id, prob)| id == first.id && prob == first.prob);
        prop_assert!(
            listed || (first.top_k.len() == TOP_K && first.prob <= first.top_k[TOP_K - 1].1)
        );
    }
    Ok(())
}

/// [`grok_literal_kept`] over the allowed tokens only (the reference gives the others
/// -1e10, i.e. zero probability, so they never reach the threshold), restricted to the
/// support, for comparison with our kept ids.
fn grok_literal_kept_allowed(scaled: &[f32], nucleus_p: f64) -> Option<Vec<u32>> {
    let allowed: Vec<usize> = (0..scaled.len())
        .filter(|&i| scaled[i] > f32::NEG_INFINITY)
        .collect();
    let values: Vec<f32> = allowed.iter().map(|&i| scaled[i]).collect();
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let kept = grok_literal_kept(&values, nucleus_p)?;
    Some(
        kept.into_iter()
            .map(|j| allowed[j as usize])
            .filter(|&i| exp32(scaled[i] - max) > 0.0)
            .map(|i| i as u32)
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------
// Statistics of the draws.

/// 20,000 draws at temperature 0.7 and nucleus 0.9 from a fixed seed: the counts must fit
/// the final distribution (chi-square below the 0.1% critical value), and nothing outside
/// the nucleus may ever be drawn.
#[test]
fn draws_follow_the_final_distribution() {
    let logits = [2.0f32, 1.6, 1.5, 1.0, 0.4, 0.0, -0.7, -1.0, -3.0, -6.0];
    let params = params(0.7, 0.9);
    let expected = final_distribution(&logits, &params);
    let support: Vec<usize> = (0..logits.len()).filter(|&i| expected[i] > 0.0).collect();
    assert!(
        support.len() >= 4 && support.len() < logits.len(),
        "nucleus {support:?}"
    );
    // Chi-square critical values at the 0.1% level, by degrees of freedom 1..=9.
    const CRITICAL: [f64; 9] = [
        10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88,
    ];
    let draws = 20_000;
    for seed in [1u64, 2, 3] {
        let mut sampler = Sampler::new();
        let mut rng = Rng::from_seed(seed);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(&logits, &params, &mut rng).unwrap().id as usize] += 1;
        }
        for i in 0..logits.len() {
            if expected[i] == 0.0 {
                assert_eq!(
                    counts[i], 0,
                    "seed {seed}: token {i} is outside the nucleus"
                );
            }
        }
        let chi_square: f64 = support
            .iter()
            .map(|&i| {
                let expected_count = expected[i] * draws as f64;
                (counts[i] as f64 - expected_count).powi(2) / expected_count
            })
            .sum();
        let critical = CRITICAL[support.len() - 2];
        assert!(
            chi_square < critical,
            "seed {seed}: chi-square {chi_square} >= {critical}; counts {counts:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Timing (run with `cargo test --release --lib sampling::tests::timing -- --ignored --nocapture`).

/// Logits shaped like a language model's over a 262k vocabulary: a bulk around 0 and a few
/// strong candidates.
fn peaked_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::from_seed(seed);
    let mut logits: Vec<f32> = (0..n)
        .map(|_| {
            // Box-Muller: standard normal, spread 2.5.
            let u1 = rng.next_f64().max(1e-300);
            let u2 = rng.next_f64();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * 2.5) as f32
        })
        .collect();
    for (rank, height) in [18.0f32, 16.5, 15.0, 14.0, 13.5, 12.0, 11.0, 10.0]
        .iter()
        .enumerate()
    {
        let index = (rng.next_u64() as usize) % n;
        logits[index] = *height - rank as f32 * 0.01;
    }
    logits
}

#[test]
#[ignore = "timing; run in release with --nocapture"]
fn timing_on_a_262k_vocabulary() {
    let n = 262_144;
    let logits = peaked_logits(n, 1);
    let mut sampler = Sampler::new();
    let mut rng = Rng::from_seed(0);
    let settings = [
        ("T=0.7 p=0.95", params(0.7, 0.95)),
        ("T=1.0 p=0.95", params(1.0, 0.95)),
        ("T=0.7 p=1.0", params(0.7, 1.0)),
        ("greedy", SamplingParams::greedy()),
        (
            "T=0.7 p=0.95 + mask",
            SamplingParams {
                mask: Some(TokenMask::disallow(n, &[1, 2, 3]).unwrap()),
                ..params(0.7, 0.95)
            },
        ),
    ];
    for (name, params) in settings {
        sampler.sample(&logits, &params, &mut rng).unwrap();
        // Minimum and median of single calls: the machine may be shared, and the minimum is
        // what the code costs.
        let mut times: Vec<std::time::Duration> = (0..200)
            .map(|_| {
                let start = std::time::Instant::now();
                std::hint::black_box(sampler.sample(&logits, &params, &mut rng).unwrap());
                start.elapsed()
            })
            .collect();
        times.sort_unstable();
        let per_call = format!("min {:?}, median {:?}", times[0], times[times.len() / 2]);
        let reference_start = std::time::Instant::now();
        let reference = sample_reference(&logits, &params, &mut rng.clone()).unwrap();
        let reference_time = reference_start.elapsed();
        assert_eq!(
            sampler.sample(&logits, &params, &mut rng.clone()).unwrap(),
            reference
        );
        println!("{name:>22}: {per_call} per call (full-sort reference: {reference_time:?})");
    }
}
