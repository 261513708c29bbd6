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

/// Defines `$name`, which runs `$body` compiled for AVX-512F (as `$avx512`) or AVX2 (as
/// `$avx2`) as the kernel set in use does (the widest the CPU has, or what
/// `SAMPLER_SDK_SIMD` forces), and as plain baseline code otherwise. The passes over
/// the vocabulary dominate a call and vectorise as wide as the registers. Rust never fuses a
/// multiply and an add on its own, so every copy performs the same IEEE operations in the
/// same order: identical results.
macro_rules! with_simd_dispatch {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident / $avx2:ident, $avx512:ident = $body:ident ($($arg:ident : $ty:ty),* $(,)?)
        $(-> $ret:ty)?
    ) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            match crate::quant::kernels().level() {
                // SAFETY: a kernel set's level is one the CPU runs (AVX-512 implies
                // AVX-512F, AVX2 is AVX2 itself).
                crate::quant::SimdLevel::Avx512 => return unsafe { $avx512($($arg),*) },
                crate::quant::SimdLevel::Avx2 => return unsafe { $avx2($($arg),*) },
                _ => {}
            }
            $body($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2($($arg: $ty),*) $(-> $ret)? {
            $body($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $avx512($($arg: $ty),*) $(-> $ret)? {
            $body($($arg),*)
        }
    };
}

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

/// e^x for x <= 0 (and x = -inf; positive x give meaningless values), in portable f32
/// arithmetic: the same bits on every platform, within 2e-7 relative of the true value on
/// [-87, 0], exactly 1 at 0 and exactly 0 below [`EXP_UNDERFLOW`] and for NaN. Branch-free
/// so the weight loops vectorise; libm's `expf` is a call per element and costs several
/// times more on a 262k vocabulary.
///
/// Method: x = k ln2 + r with k = round(x / ln2) (adding 1.5 * 2^23 rounds to nearest
/// even and leaves k in the low mantissa bits), ln2 split in two so r is exact to ~1 ulp,
/// then a degree-7 Taylor polynomial for e^r on |r| <= ln2 / 2 (truncation < 6e-9), scaled
/// by 2^k assembled from the exponent bits (k >= -126, so 2^k is a normal number).
#[inline]
pub(crate) fn exp32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln2 = LN2_HI + LN2_LO, LN2_HI = 355/512 with few mantissa bits so k * LN2_HI is exact.
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUNDER: f32 = 1.5 * 8_388_608.0;
    // Written as `x >= limit` so that NaN, like anything below the limit, gives 0.
    let clamped = if x >= EXP_UNDERFLOW { x } else { EXP_UNDERFLOW };
    let shifted = clamped * LOG2_E + ROUNDER;
    let k = shifted - ROUNDER;
    // Wrapping only matters outside the domain (x > 0): a meaningless value, never a panic.
    let k_int = shifted.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    let r = (clamped - k * LN2_HI) - k * LN2_LO;
    let poly = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let two_to_k = f32::from_bits((k_int.wrapping_add(127) as u32) << 23);
    let value = poly * two_to_k;
    if x >= EXP_UNDERFLOW {
        value
    } else {
        0.0
    }
}

with_simd_dispatch! {
    /// The maximum of `values`, ignoring NaN; -inf for an empty slice (or only NaN).
    pub(crate) fn lane_max / lane_max_avx2, lane_max_avx512 = lane_max_body(values: &[f32]) -> f32
}

#[inline(always)]
fn lane_max_body(values: &[f32]) -> f32 {
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

/// Logits per chunk in [`chunk_maxima`].
pub(crate) const MAXIMA_CHUNK: usize = 64;

with_simd_dispatch! {
    /// The maximum of every [`MAXIMA_CHUNK`] consecutive values of `values` (the last chunk
    /// may be shorter), ignoring NaN, into `out` (cleared first).
    pub(crate) fn chunk_maxima / chunk_maxima_avx2, chunk_maxima_avx512 = chunk_maxima_body(
        values: &[f32],
        out: &mut Vec<f32>,
    )
}

#[inline(always)]
fn chunk_maxima_body(values: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.extend(values.chunks(MAXIMA_CHUNK).map(lane_max_body));
}

/// A distance below `max` within which at least `count` of `values` lie: the gap to the
/// `count`-th largest of the chunk maxima (each of those chunks holds a value at least that
/// large). `None` when fewer than `count` chunks hold a finite value. `maxima` is scratch.
pub(crate) fn distance_holding(
    values: &[f32],
    max: f32,
    count: usize,
    maxima: &mut Vec<f32>,
) -> Option<f32> {
    chunk_maxima(values, maxima);
    if count == 0 || maxima.len() < count {
        return None;
    }
    let (_, kth, _) = maxima.select_nth_unstable_by(count - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    kth.is_finite().then_some(max - kth)
}

/// Combines the interleaved accumulators in a fixed tree order (part of the canonical sum).
fn combine_lanes(lanes: &[f64; LANES]) -> f64 {
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
}

/// The canonical sum of f32 terms: term `i` is added in f64 to accumulator `i % 8`, the
/// accumulators are then combined as ((0+1)+(2+3))+((4+5)+(6+7)). Independent accumulators
/// let the loop vectorise; the fixed order makes the result reproducible.
#[inline(always)]
pub(crate) fn lane_sum(terms: &[f32]) -> f64 {
    let mut lanes = [0.0f64; LANES];
    accumulate_lanes(&mut lanes, terms);
    combine_lanes(&lanes)
}

/// Adds `terms[j]` to `lanes[j % 8]`; a caller summing in blocks keeps every block but the
/// last a multiple of 8 long, so term `i` of the whole still lands in accumulator `i % 8`.
#[inline(always)]
fn accumulate_lanes(lanes: &mut [f64; LANES], terms: &[f32]) {
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
    fill_scaled(logits, mask, scaled, 0.0, temperature);
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
    fill_scaled(logits, mask, scaled, raw_max, temperature);
    Ok(lane_max(scaled))
}

/// `(sanitize(logit) - shift) / temperature`, plus 0.0 so that -0.0 becomes +0.0 and equal
/// logits have equal bits (they sort as ties).
#[inline(always)]
fn scale_one(logit: f32, shift: f32, temperature: f32) -> f32 {
    (sanitize(logit) - shift) / temperature + 0.0
}

/// Writes the scaled logit of every allowed token and -inf for the others, touching each
/// disallowed token once when few are disallowed and each allowed one once when few are allowed.
fn fill_scaled(
    logits: &[f32],
    mask: Option<&TokenMask>,
    scaled: &mut Vec<f32>,
    shift: f32,
    temperature: f32,
) {
    match mask {
        Some(mask) if mask.n_allowed() < logits.len() / 2 => {
            scaled.clear();
            scaled.resize(logits.len(), f32::NEG_INFINITY);
            mask.for_each_allowed(|index| {
                scaled[index] = scale_one(logits[index], shift, temperature)
            });
        }
        _ => {
            // Every element is overwritten: resize only when the vocabulary size changes.
            scaled.resize(logits.len(), 0.0);
            scale_all(logits, scaled, shift, temperature);
            if let Some(mask) = mask {
                mask.for_each_disallowed(|index| scaled[index] = f32::NEG_INFINITY);
            }
        }
    }
}

with_simd_dispatch! {
    fn scale_all / scale_all_avx2, scale_all_avx512 = scale_all_body(
        logits: &[f32],
        scaled: &mut [f32],
        shift: f32,
        temperature: f32,
    )
}

#[inline(always)]
fn scale_all_body(logits: &[f32], scaled: &mut [f32], shift: f32, temperature: f32) {
    for (value, &logit) in scaled.iter_mut().zip(logits) {
        *value = scale_one(logit, shift, temperature);
    }
}

/// Softmax numerators: `weights[i] = exp32(scaled[i] - max)`, and their canonical
/// [`lane_sum`], the softmax normaliser Z. Disallowed tokens (-inf) get weight 0.
pub(crate) fn softmax_weights(scaled: &[f32], max: f32, weights: &mut Vec<f32>) -> f64 {
    // Every element is overwritten: resize (and zero) only when the vocabulary size changes.
    weights.resize(scaled.len(), 0.0);
    weights_into(scaled, max, weights)
}

with_simd_dispatch! {
    fn weights_into / softmax_weights_avx2, softmax_weights_avx512 = softmax_weights_body(
        scaled: &[f32],
        max: f32,
        weights: &mut [f32],
    ) -> f64
}

with_simd_dispatch! {
    /// The log-softmax of the raw logits (sanitized, unmasked, temperature 1) needs their
    /// maximum M and normaliser Z = canonical sum of exp32(logit - M); computed without storing.
    pub(crate) fn raw_log_normaliser / raw_log_normaliser_avx2, raw_log_normaliser_avx512 = raw_log_normaliser_body(
        logits: &[f32],
    ) -> (f32, f64)
}

#[inline(always)]
fn softmax_weights_body(scaled: &[f32], max: f32, weights: &mut [f32]) -> f64 {
    for (weight, &value) in weights.iter_mut().zip(scaled) {
        *weight = exp32(value - max);
    }
    lane_sum(weights)
}

#[inline(always)]
fn raw_log_normaliser_body(logits: &[f32]) -> (f32, f64) {
    // Exponentials go through a small buffer so the f32 work vectorises apart from the
    // widening f64 sums; the block length is a multiple of 8 as `accumulate_lanes` needs.
    const BLOCK: usize = 256;
    // NaN never compares greater, so the plain maximum skips it as `sanitize` would.
    let max = sanitize(lane_max_body(logits));
    let mut lanes = [0.0f64; LANES];
    let mut buffer = [0.0f32; BLOCK];
    for block in logits.chunks(BLOCK) {
        let terms = &mut buffer[..block.len()];
        for (term, &logit) in terms.iter_mut().zip(block) {
            // Equal to exp32(sanitize(logit) - max) with two operations fewer: NaN stays NaN
            // (exp32 gives 0), and +inf - max is clamped to 0 like MAX - MAX.
            let shifted = logit - max;
            *term = exp32(if shifted > 0.0 { 0.0 } else { shifted });
        }
        accumulate_lanes(&mut lanes, terms);
    }
    (max, combine_lanes(&lanes))
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

/// Resolution of [`DistanceHistogram`]: buckets this wide in scaled-logit units.
const BUCKETS_PER_UNIT: f32 = 4.0;

/// Enough buckets to cover every token of nonzero weight (less than 88 units below the max).
pub(crate) const N_BUCKETS: usize = 88 * BUCKETS_PER_UNIT as usize + 1;

/// Mass and count of the collected candidates by distance below the maximum scaled logit,
/// used to guess how much of a band must be sorted before the result is settled.
#[derive(Debug, Default)]
pub(crate) struct DistanceHistogram {
    mass: Vec<f64>,
    count: Vec<u32>,
}

impl DistanceHistogram {
    pub fn clear(&mut self) {
        self.mass.clear();
        self.mass.resize(N_BUCKETS, 0.0);
        self.count.clear();
        self.count.resize(N_BUCKETS, 0);
    }

    fn add(&mut self, max: f32, candidate: &Candidate) {
        let bucket = (((max - candidate.logit) * BUCKETS_PER_UNIT) as usize).min(N_BUCKETS - 1);
        self.mass[bucket] += f64::from(candidate.weight);
        self.count[bucket] = self.count[bucket].saturating_add(1);
    }

    /// The highest cut (a scaled logit, at least `floor`) such that the candidates at or
    /// above it are estimated to hold more than `min_mass` weight and at least `min_count`
    /// tokens; `floor` when the collected candidates do not suffice. Only an estimate: the
    /// caller verifies the outcome and sorts more when it falls short.
    pub fn cut_for(&self, max: f32, floor: f32, min_mass: f64, min_count: usize) -> f32 {
        let mut mass = 0.0f64;
        let mut count = 0usize;
        for (bucket, (&bucket_mass, &bucket_count)) in self.mass.iter().zip(&self.count).enumerate()
        {
            mass += bucket_mass;
            count += bucket_count as usize;
            if mass > min_mass && count >= min_count {
                let cut = max - (bucket + 1) as f32 / BUCKETS_PER_UNIT;
                return if cut > floor { cut } else { floor };
            }
        }
        floor
    }
}

/// Appends to `out` every token with `upper > scaled >= lower` and a nonzero weight, in
/// index order (unsorted), and records them in `histogram`. Called with decreasing bounds,
/// it extends a top set of the vocabulary without collecting anything twice.
pub(crate) fn collect_candidates(
    scaled: &[f32],
    weights: &[f32],
    max: f32,
    (lower, upper): (f32, f32),
    out: &mut Vec<Candidate>,
    histogram: &mut DistanceHistogram,
) {
    let first_new = out.len();
    scan_band(scaled, weights, lower, upper, out);
    for candidate in &out[first_new..] {
        histogram.add(max, candidate);
    }
}

with_simd_dispatch! {
    fn scan_band / scan_band_avx2, scan_band_avx512 = scan_band_body(
        scaled: &[f32],
        weights: &[f32],
        lower: f32,
        upper: f32,
        out: &mut Vec<Candidate>,
    )
}

#[inline(always)]
fn scan_band_body(
    scaled: &[f32],
    weights: &[f32],
    lower: f32,
    upper: f32,
    out: &mut Vec<Candidate>,
) {
    const CHUNK: usize = 64;
    let mut found = [Candidate {
        id: 0,
        logit: 0.0,
        weight: 0.0,
    }; CHUNK];
    let mut start = 0;
    let chunks = scaled.chunks_exact(CHUNK);
    let rest = chunks.remainder();
    for chunk in chunks {
        // Most chunks hold no candidate; test them whole, without branches, first.
        if chunk
            .iter()
            .fold(false, |any, &logit| any | (logit >= lower))
        {
            collect_chunk(
                start,
                chunk,
                &weights[start..start + CHUNK],
                (lower, upper),
                &mut found,
                out,
            );
        }
        start += CHUNK;
    }
    collect_chunk(
        start,
        rest,
        &weights[start..],
        (lower, upper),
        &mut found,
        out,
    );
}

/// Appends the candidates among `logits` (token ids from `start`). Every token is written to
/// `found` and only candidates advance the count: no unpredictable branch when a band holds a
/// large share of the vocabulary.
#[inline(always)]
fn collect_chunk(
    start: usize,
    logits: &[f32],
    weights: &[f32],
    (lower, upper): (f32, f32),
    found: &mut [Candidate],
    out: &mut Vec<Candidate>,
) {
    let last = found.len() - 1;
    let mut n_found = 0;
    for (offset, (&logit, &weight)) in logits.iter().zip(weights).enumerate() {
        // The logit count was checked to fit u32 before sampling began.
        found[n_found.min(last)] = Candidate {
            id: (start + offset) as u32,
            logit,
            weight,
        };
        n_found += usize::from(logit >= lower && logit < upper && weight > 0.0);
    }
    out.extend_from_slice(&found[..n_found]);
}

/// The distances below the maximum scaled logit at which successive candidate bands end.
///
/// Most of a language model's probability lies within a few units of the top logit, so the
/// first band is narrow and each next one half as wide again. For a nucleus below 1 there
/// is also a distance that surely suffices: the tokens beyond it, each lighter than
/// e^-distance, hold at most half of the mass the nucleus leaves out. The schedule stops
/// there rather than growing past it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BandSchedule {
    distance: f32,
    sufficient: f32,
}

impl BandSchedule {
    const FIRST_DISTANCE: f32 = 8.0;
    const GROWTH: f32 = 1.5;

    pub fn new(n_allowed: usize, normaliser: f64, nucleus_p: f32) -> Self {
        let sufficient = if nucleus_p >= 1.0 {
            f32::INFINITY
        } else {
            let budget = normaliser * (1.0 - f64::from(nucleus_p)) / 2.0;
            let distance = (n_allowed as f64 / budget).ln();
            if distance.is_nan() {
                f32::INFINITY
            } else {
                distance.clamp(1.0, f64::from(f32::MAX)) as f32
            }
        };
        BandSchedule {
            distance: Self::FIRST_DISTANCE.min(sufficient),
            sufficient,
        }
    }

    /// Starts with a band no wider than `distance` (when that is narrower than the first
    /// band would be): for a caller who knows that band already holds what it needs. Kept
    /// above a floor so that widening grows it.
    pub fn starting_within(mut self, distance: f32) -> Self {
        const NARROWEST: f32 = 0.25;
        self.distance = self.distance.min(distance.max(NARROWEST));
        self
    }

    /// Where the current band ends.
    pub fn distance(&self) -> f32 {
        self.distance
    }

    pub fn widen(&mut self) {
        let grown = self.distance * Self::GROWTH;
        self.distance = if self.distance < self.sufficient && grown > self.sufficient {
            self.sufficient
        } else {
            grown
        };
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
        assert_eq!(exp32(f32::NAN), 0.0);
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
    #[cfg(target_arch = "x86_64")]
    fn simd_passes_match_the_baseline_bit_for_bit() {
        type WeightsFn = unsafe fn(&[f32], f32, &mut [f32]) -> f64;
        type RawFn = unsafe fn(&[f32]) -> (f32, f64);
        let logits: Vec<f32> = (0..1003u32)
            .map(|i| match i % 97 {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                _ => ((i.wrapping_mul(2_654_435_761) >> 8) as f32 / 16_777_216.0) * 60.0 - 40.0,
            })
            .collect();
        let scaled: Vec<f32> = logits.iter().map(|&l| sanitize(l) / 0.7).collect();
        let max = lane_max_body(&scaled);
        let mut baseline = vec![0.0; scaled.len()];
        let baseline_sum = softmax_weights_body(&scaled, max, &mut baseline);
        let baseline_raw = raw_log_normaliser_body(&logits);
        assert_eq!(baseline_sum.to_bits(), lane_sum(&baseline).to_bits());
        let widths: [(&str, bool, WeightsFn, RawFn); 2] = [
            (
                "avx2",
                std::arch::is_x86_feature_detected!("avx2"),
                softmax_weights_avx2,
                raw_log_normaliser_avx2,
            ),
            (
                "avx512f",
                std::arch::is_x86_feature_detected!("avx512f"),
                softmax_weights_avx512,
                raw_log_normaliser_avx512,
            ),
        ];
        for (name, supported, weights_fn, raw_fn) in widths {
            if !supported {
                eprintln!("skipped {name}: this CPU lacks it");
                continue;
            }
            let mut weights = vec![0.0; scaled.len()];
            // SAFETY: support for the feature was checked just above.
            let (sum, raw) = unsafe { (weights_fn(&scaled, max, &mut weights), raw_fn(&logits)) };
            assert_eq!(baseline_sum.to_bits(), sum.to_bits(), "{name}");
            assert!(
                baseline
                    .iter()
                    .zip(&weights)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}"
            );
            assert_eq!(
                (baseline_raw.0.to_bits(), baseline_raw.1.to_bits()),
                (raw.0.to_bits(), raw.1.to_bits()),
                "{name}"
            );
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
        let mut list = [
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
