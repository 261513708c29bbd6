//! The numeric steps before the draw, in the order Grok-1's `sample_token` applies them:
//! temperature and mask ([`scale_logits`]), softmax weights ([`softmax_weights`]), then the
//! nucleus filter over candidates sorted by scaled logit ([`nucleus_cut`]). Each is a pure
//! function over slices; the arithmetic is specified in the [module docs](super) because the
//! fast path and the full-sort reference must agree bit for bit.

use super::mask::TokenMask;
use crate::error::{EngineError, Result};

/// Below this argument [`exp32`] returns exactly 0. e^-87 ≈ 1.6e-38 is still a normal f32,
/// so every nonzero weight keeps full precision.
pub(crate) const EXP_UNDERFLOW: f32 = -87.0;

/// How far apart (in scaled-logit units) two arguments of [`exp32`] must be for the smaller
/// one's result to be strictly smaller. `exp32` is within 2e-7 relative of e^x, so any gap
/// above ~4e-7 would do; this one leaves a wide margin.
pub(crate) const EXP_ORDER_GAP: f32 = 1e-4;

/// Number of interleaved f64 accumulators in [`lane_sum`] (and of lanes in [`lane_max`]).
const LANES: usize = 8;

/// Logits as sampling sees them: NaN (a numerically broken model) counts as -inf, so it
/// can never be drawn, and +inf as the largest finite f32, so +inf tokens share the
/// probability mass at every temperature instead of producing NaN.
#[inline]
pub(crate) fn sanitize(logit: f32) -> f32 {
    if logit.is_nan() {
        f32::NEG_INFINITY
    } else if logit == f32::INFINITY {
        f32::MAX
    } else {
        logit
    }
}

/// e^x for x <= 0 (and x = -inf), in portable f32 arithmetic: the same bits on every
/// platform, within 2e-7 relative of the true value on [-87, 0], exactly 1 at 0 and exactly
/// 0 below [`EXP_UNDERFLOW`]. Branch-free so the weight loops vectorise; libm's `expf` is a
/// call per element and costs ~4x more on a 262k vocabulary.
///
/// Method: x = k ln2 + r with k = round(x / ln2) (the 1.5 * 2^23 trick rounds to nearest
/// even and leaves k in the low mantissa bits), ln2 split in two so r is exact to ~1 ulp,
/// then a degree-7 Taylor polynomial for e^r on |r| <= ln2 / 2 (truncation < 6e-9), scaled
/// by 2^k assembled from the exponent bits (k >= -126, so 2^k is a normal number).
#[inline]
pub(crate) fn exp32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375: few mantissa bits, so k * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUNDER: f32 = 12_582_912.0; // 1.5 * 2^23
    let clamped = if x < EXP_UNDERFLOW { EXP_UNDERFLOW } else { x };
    let shifted = clamped * LOG2_E + ROUNDER;
    let k = shifted - ROUNDER;
    let k_int = shifted.to_bits() as i32 - ROUNDER.to_bits() as i32;
    let r = (clamped - k * LN2_HI) - k * LN2_LO;
    let poly = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let two_to_k = f32::from_bits(((k_int + 127) as u32) << 23);
    let value = poly * two_to_k;
    if x < EXP_UNDERFLOW {
        0.0
    } else {
        value
    }
}

/// The maximum of `values` (which must hold no NaN); -inf for an empty slice.
pub(crate) fn lane_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane = if value > *lane { value } else { *lane };
        }
    }
    for (lane, &value) in lanes.iter_mut().zip(rest) {
        *lane = if value > *lane { value } else { *lane };
    }
    lanes.iter().fold(
        f32::NEG_INFINITY,
        |max, &lane| if lane > max { lane } else { max },
    )
}

/// Combines the interleaved accumulators in a fixed tree order (part of the canonical sum).
fn combine_lanes(lanes: &[f64; LANES]) -> f64 {
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
}

/// The canonical sum of f32 terms: term `i` is added in f64 to accumulator `i % 8`, the
/// accumulators are then combined as ((0+1)+(2+3))+((4+5)+(6+7)). Independent accumulators
/// let the loop vectorise; the fixed order makes the result reproducible.
pub(crate) fn lane_sum(terms: &[f32]) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let chunks = terms.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &term) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(term);
        }
    }
    for (lane, &term) in lanes.iter_mut().zip(rest) {
        *lane += f64::from(term);
    }
    combine_lanes(&lanes)
}

/// Temperature and mask: writes `sanitize(logit) / temperature` for every allowed token and
/// -inf for every disallowed one into `scaled`, and returns the largest allowed value.
///
/// When that division overflows f32 (a tiny temperature, or a +inf logit below temperature
/// 1), the logits are first shifted by their allowed maximum: `(logit - max) / temperature`,
/// the same distribution without the infinities. Errors when no allowed token has a finite
/// logit, since no distribution exists then.
pub(crate) fn scale_logits(
    logits: &[f32],
    mask: Option<&TokenMask>,
    temperature: f32,
    scaled: &mut Vec<f32>,
) -> Result<f32> {
    // `+ 0.0` turns -0.0 into +0.0, so equal logits sort as equal by bits too.
    let scale = |logit: f32, shift: f32| (sanitize(logit) - shift) / temperature + 0.0;
    fill_scaled(logits, mask, scaled, |logit| scale(logit, 0.0));
    let max = lane_max(scaled);
    if max.is_finite() {
        return Ok(max);
    }
    let mut raw_max = f32::NEG_INFINITY;
    let mut track = |index: usize| raw_max = raw_max.max(sanitize(logits[index]));
    match mask {
        Some(mask) => mask.for_each_allowed(&mut track),
        None => (0..logits.len()).for_each(&mut track),
    }
    if raw_max == f32::NEG_INFINITY {
        let scope = match mask {
            Some(mask) => format!(", among the tokens {} leaves", mask.param_name()),
            None => String::new(),
        };
        return Err(EngineError::invalid(
            "logits",
            format!("no token has a finite logit (all are -inf or NaN){scope}"),
        ));
    }
    fill_scaled(logits, mask, scaled, |logit| scale(logit, raw_max));
    Ok(lane_max(scaled))
}

/// Writes `scale(logit)` for allowed tokens and -inf for the others, touching each
/// disallowed token once when few are disallowed and each allowed one once when few are allowed.
fn fill_scaled(
    logits: &[f32],
    mask: Option<&TokenMask>,
    scaled: &mut Vec<f32>,
    scale: impl Fn(f32) -> f32,
) {
    scaled.clear();
    match mask {
        None => scaled.extend(logits.iter().map(|&logit| scale(logit))),
        Some(mask) if mask.n_allowed() >= logits.len() / 2 => {
            scaled.extend(logits.iter().map(|&logit| scale(logit)));
            mask.for_each_disallowed(|index| scaled[index] = f32::NEG_INFINITY);
        }
        Some(mask) => {
            scaled.resize(logits.len(), f32::NEG_INFINITY);
            mask.for_each_allowed(|index| scaled[index] = scale(logits[index]));
        }
    }
}

/// Softmax numerators: `weights[i] = exp32(scaled[i] - max)`, and their canonical
/// [`lane_sum`], the softmax normaliser Z. Disallowed tokens (-inf) get weight 0.
pub(crate) fn softmax_weights(scaled: &[f32], max: f32, weights: &mut Vec<f32>) -> f64 {
    weights.clear();
    weights.extend(scaled.iter().map(|&value| exp32(value - max)));
    lane_sum(weights)
}

/// The log-softmax of the raw logits (sanitized, unmasked, temperature 1) needs their
/// maximum M and normaliser Z = canonical sum of exp32(logit - M); computed without storing.
pub(crate) fn raw_log_normaliser(logits: &[f32]) -> (f32, f64) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for (index, &logit) in logits.iter().enumerate() {
        let lane = &mut lanes[index % LANES];
        let value = sanitize(logit);
        *lane = if value > *lane { value } else { *lane };
    }
    let max = lanes.iter().fold(
        f32::NEG_INFINITY,
        |max, &lane| if lane > max { lane } else { max },
    );
    let mut sums = [0.0f64; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (sum, &logit) in sums.iter_mut().zip(chunk) {
            *sum += f64::from(exp32(sanitize(logit) - max));
        }
    }
    for (sum, &logit) in sums.iter_mut().zip(rest) {
        *sum += f64::from(exp32(sanitize(logit) - max));
    }
    (max, combine_lanes(&sums))
}

/// One token of the support (allowed, nonzero weight), with what sorting and drawing need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Candidate {
    pub id: u32,
    /// Scaled logit (temperature and overflow shift applied).
    pub logit: f32,
    /// exp32(logit - max): the unnormalised probability.
    pub weight: f32,
}

impl Candidate {
    /// Sorting by this key orders by scaled logit descending, then id ascending: the high 32
    /// bits are the logit mapped to an order-preserving integer and inverted, the low 32 the id.
    #[inline]
    pub fn descending_key(&self) -> u64 {
        let bits = self.logit.to_bits();
        let ascending = if bits & 0x8000_0000 != 0 {
            !bits
        } else {
            bits | 0x8000_0000
        };
        (u64::from(!ascending) << 32) | u64::from(self.id)
    }
}

/// Appends to `out` every token with `upper > scaled >= lower` and a nonzero weight, in
/// index order (unsorted). Called with decreasing bounds, it extends a top set of the
/// vocabulary without collecting anything twice.
pub(crate) fn collect_candidates(
    scaled: &[f32],
    weights: &[f32],
    lower: f32,
    upper: f32,
    out: &mut Vec<Candidate>,
) {
    for (index, (&logit, &weight)) in scaled.iter().zip(weights).enumerate() {
        if logit >= lower && logit < upper && weight > 0.0 {
            // Logit count was checked to fit u32 before sampling began.
            out.push(Candidate {
                id: index as u32,
                logit,
                weight,
            });
        }
    }
}

/// Where the first candidate search stops, as a distance below the maximum scaled logit.
///
/// For a nucleus below 1 the excluded tokens, each lighter than e^-distance, may hold at
/// most half of the mass the nucleus leaves out, so the candidates (more than p of the mass)
/// settle the cut on the first try. With nucleus 1, or for greedy's alternatives, a short
/// distance is tried first and widened only when the draw or the top-k list runs past it.
pub(crate) fn first_search_distance(n_allowed: usize, normaliser: f64, nucleus_p: f32) -> f32 {
    const NUCLEUS_ONE_DISTANCE: f32 = 8.0;
    if nucleus_p >= 1.0 {
        return NUCLEUS_ONE_DISTANCE;
    }
    let budget = normaliser * (1.0 - f64::from(nucleus_p)) / 2.0;
    let distance = (n_allowed as f64 / budget).ln();
    if distance.is_nan() {
        f32::INFINITY
    } else {
        distance.clamp(1.0, f64::from(f32::MAX)) as f32
    }
}

/// The nucleus filter over candidates sorted by [`Candidate::descending_key`], the first
/// `sorted.len()` tokens of the full sorted support.
///
/// Walking tie groups (equal scaled logits) from the top, a group is kept while the mass of
/// the groups above it, accumulated in f64 in sorted order, divided by `normaliser`, is at
/// most `nucleus_p`. In exact arithmetic this keeps the same tokens as Grok-1's
/// `top_p_filter`: the first ascending index whose cumulative probability reaches 1 - p lies
/// in the last kept group, and every logit equal to it is kept.
///
/// Returns the number of kept candidates and their summed weight (the final normaliser), or
/// `None` when the answer depends on tokens after `sorted` (only possible unless `complete`).
pub(crate) fn nucleus_cut(
    sorted: &[Candidate],
    normaliser: f64,
    nucleus_p: f32,
    complete: bool,
) -> Option<(usize, f64)> {
    let nucleus_p = f64::from(nucleus_p);
    let mut mass_above = 0.0f64;
    let mut index = 0;
    while index < sorted.len() {
        if mass_above / normaliser > nucleus_p {
            return Some((index, mass_above));
        }
        let group_logit = sorted[index].logit;
        while index < sorted.len() && sorted[index].logit == group_logit {
            mass_above += f64::from(sorted[index].weight);
            index += 1;
        }
    }
    if complete || mass_above / normaliser > nucleus_p {
        Some((sorted.len(), mass_above))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp32_is_close_to_exp_on_its_domain() {
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x >= EXP_UNDERFLOW {
            let exact = f64::from(x).exp();
            let relative = ((f64::from(exp32(x)) - exact) / exact).abs();
            worst = worst.max(relative);
            x -= 1.7e-4;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp32_edges() {
        assert_eq!(exp32(0.0), 1.0);
        assert_eq!(exp32(-0.0), 1.0);
        assert_eq!(exp32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp32(-87.01), 0.0);
        assert_eq!(exp32(-1e30), 0.0);
        assert!(exp32(EXP_UNDERFLOW).is_normal());
        assert!((f64::from(exp32(EXP_UNDERFLOW)) / (-87f64).exp() - 1.0).abs() < 2e-7);
    }

    #[test]
    fn exp32_respects_the_order_gap() {
        // Sweep pairs EXP_ORDER_GAP apart across the domain: the lower argument must give a
        // strictly smaller result (the top-k early exit relies on it).
        let mut x = 0.0f32;
        while x - EXP_ORDER_GAP >= EXP_UNDERFLOW {
            assert!(exp32(x - EXP_ORDER_GAP) < exp32(x), "x = {x}");
            x -= 3.1e-3;
        }
    }

    #[test]
    fn sanitize_maps_nan_and_infinities() {
        assert_eq!(sanitize(f32::NAN), f32::NEG_INFINITY);
        assert_eq!(sanitize(f32::INFINITY), f32::MAX);
        assert_eq!(sanitize(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert_eq!(sanitize(1.5), 1.5);
    }

    #[test]
    fn lane_sum_uses_the_documented_order() {
        let terms: Vec<f32> = (0..19).map(|i| 1.0 / (i as f32 + 1.0)).collect();
        let mut lanes = [0.0f64; 8];
        for (i, &t) in terms.iter().enumerate() {
            lanes[i % 8] += f64::from(t);
        }
        let expected = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        assert_eq!(lane_sum(&terms).to_bits(), expected.to_bits());
        assert_eq!(lane_max(&[1.0, 5.0, -2.0]), 5.0);
        assert_eq!(lane_max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn scaling_divides_masks_and_normalises_signed_zero() {
        let mut scaled = Vec::new();
        let mask = TokenMask::disallow(4, &[1]).unwrap();
        let max = scale_logits(&[2.0, 9.0, -0.0, 1.0], Some(&mask), 0.5, &mut scaled).unwrap();
        assert_eq!(max, 4.0);
        assert_eq!(scaled, vec![4.0, f32::NEG_INFINITY, 0.0, 2.0]);
        assert!(scaled[2].is_sign_positive());
        let mask = TokenMask::allow_only(4, &[3]).unwrap();
        scale_logits(&[2.0, 9.0, 0.0, 1.0], Some(&mask), 1.0, &mut scaled).unwrap();
        assert_eq!(
            scaled,
            vec![f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY, 1.0]
        );
    }

    #[test]
    fn overflowing_division_shifts_by_the_maximum() {
        let mut scaled = Vec::new();
        let max = scale_logits(&[3e38, 2e38, f32::NAN], None, 1e-3, &mut scaled).unwrap();
        assert_eq!(max, 0.0);
        assert_eq!(scaled[0], 0.0);
        assert_eq!(scaled[1], f32::NEG_INFINITY);
        assert_eq!(scaled[2], f32::NEG_INFINITY);
        // +inf logits become the shared maximum; finite ones fall far behind.
        let max =
            scale_logits(&[f32::INFINITY, 5.0, f32::INFINITY], None, 0.5, &mut scaled).unwrap();
        assert_eq!(max, 0.0);
        assert_eq!((scaled[0], scaled[2]), (0.0, 0.0));
        assert_eq!(scaled[1], f32::NEG_INFINITY);
        // Hugely negative logits at a tiny temperature underflow to -inf when divided.
        let max = scale_logits(&[-3e38, -3.1e38], None, 1e-3, &mut scaled).unwrap();
        assert_eq!(max, 0.0);
        assert_eq!(scaled[1], f32::NEG_INFINITY);
    }

    #[test]
    fn no_finite_allowed_logit_is_an_error() {
        let mut scaled = Vec::new();
        let err = scale_logits(&[f32::NAN, f32::NEG_INFINITY], None, 1.0, &mut scaled).unwrap_err();
        assert!(err.to_string().starts_with("logits:"), "{err}");
        let mask = TokenMask::allow_only(3, &[1]).unwrap();
        let err = scale_logits(&[1.0, f32::NAN, 2.0], Some(&mask), 1.0, &mut scaled).unwrap_err();
        assert!(err.to_string().contains("allowed_tokens"), "{err}");
    }

    #[test]
    fn descending_key_orders_by_logit_then_id() {
        let candidate = |id, logit| Candidate {
            id,
            logit,
            weight: 1.0,
        };
        let mut list = vec![
            candidate(4, -1.0),
            candidate(2, 3.0),
            candidate(1, 3.0),
            candidate(0, f32::NEG_INFINITY),
            candidate(9, 0.0),
            candidate(3, f32::MAX),
            candidate(5, -1e-40),
        ];
        list.sort_unstable_by_key(Candidate::descending_key);
        let ids: Vec<u32> = list.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![3, 1, 2, 9, 5, 4, 0]);
    }

    #[test]
    fn nucleus_cut_keeps_groups_while_the_mass_above_is_at_most_p() {
        let sorted: Vec<Candidate> = [
            (0, 4.0, 0.5f32),
            (1, 3.0, 0.25),
            (2, 2.0, 0.125),
            (3, 2.0, 0.125),
        ]
        .iter()
        .map(|&(id, logit, weight)| Candidate { id, logit, weight })
        .collect();
        assert_eq!(nucleus_cut(&sorted, 1.0, 0.4, true), Some((1, 0.5)));
        assert_eq!(nucleus_cut(&sorted, 1.0, 0.5, true), Some((2, 0.75)));
        assert_eq!(nucleus_cut(&sorted, 1.0, 0.7, true), Some((2, 0.75)));
        // Mass above the tie group is exactly 0.75 <= 0.75: the whole group is kept.
        assert_eq!(nucleus_cut(&sorted, 1.0, 0.75, true), Some((4, 1.0)));
        // A prefix settles the cut only if its mass already exceeds p.
        assert_eq!(nucleus_cut(&sorted[..2], 1.0, 0.5, false), Some((2, 0.75)));
        assert_eq!(nucleus_cut(&sorted[..2], 1.0, 0.8, false), None);
        assert_eq!(nucleus_cut(&sorted[..2], 1.0, 0.8, true), Some((2, 0.75)));
    }
}
