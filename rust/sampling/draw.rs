//! The final draw, the drawn token's probability, and the top-8 alternatives, over the kept
//! tokens sorted by scaled logit (descending, ties by id).

use super::steps::{exp32, Candidate, EXP_ORDER_GAP};

/// How many alternatives a sampled token reports (Grok-1's `TOP_K`).
pub const TOP_K: usize = 8;

/// A kept token's probability in the final distribution: its weight over the final
/// normaliser, divided in f64 and rounded once to f32.
#[inline]
pub(crate) fn final_prob(weight: f32, normaliser: f64) -> f32 {
    (f64::from(weight) / normaliser) as f32
}

/// Inverse-CDF draw: with `target = uniform * normaliser`, the first kept token (in sorted
/// order) at which the running f64 sum of weights exceeds `target`.
///
/// `kept` may be a prefix of the kept tokens; `whole` says whether it is all of them. If the
/// running sum never exceeds the target (rounding, when the normaliser was summed in another
/// order), the last kept token is chosen when `kept` is whole, and `None` asks the caller for
/// more tokens otherwise.
pub(crate) fn draw_index(
    kept: &[Candidate],
    normaliser: f64,
    uniform: f64,
    whole: bool,
) -> Option<usize> {
    let target = uniform * normaliser;
    let mut cumulative = 0.0f64;
    for (index, candidate) in kept.iter().enumerate() {
        cumulative += f64::from(candidate.weight);
        if cumulative > target {
            return Some(index);
        }
    }
    if whole {
        kept.len().checked_sub(1)
    } else {
        None
    }
}

/// Fills `top` with up to [`TOP_K`] kept tokens of nonzero final probability, ordered by
/// probability descending then id ascending. Returns false when `kept` is not `whole` and the
/// answer may depend on tokens after it.
///
/// Probabilities decrease along `kept` only up to rounding (the exponential is approximated),
/// so the scan does not stop at the first lighter token. It stops once it has seen a token
/// lighter than the current 8th (a witness) and then a token whose shifted logit is at least
/// [`EXP_ORDER_GAP`] below the witness's: from there on every weight, hence every
/// probability, is at most the witness's, strictly below the 8th.
pub(crate) fn top_k(
    kept: &[Candidate],
    normaliser: f64,
    max_logit: f32,
    whole: bool,
    top: &mut Vec<(u32, f32)>,
) -> bool {
    top.clear();
    let mut witness_shifted: Option<f32> = None;
    for candidate in kept {
        let shifted = candidate.logit - max_logit;
        if let Some(witness) = witness_shifted {
            if shifted <= witness - EXP_ORDER_GAP {
                debug_assert!(exp32(shifted) < exp32(witness) || exp32(shifted) == 0.0);
                return true;
            }
        }
        let prob = final_prob(candidate.weight, normaliser);
        let entry = (candidate.id, prob);
        if top.len() < TOP_K {
            if prob > 0.0 {
                insert_ranked(top, entry);
            }
        } else if ranks_before(entry, top[TOP_K - 1]) {
            top.pop();
            insert_ranked(top, entry);
        } else if witness_shifted.is_none() && prob < top[TOP_K - 1].1 {
            witness_shifted = Some(shifted);
        }
    }
    whole
}

/// Probability descending, then id ascending.
fn ranks_before(a: (u32, f32), b: (u32, f32)) -> bool {
    a.1 > b.1 || (a.1 == b.1 && a.0 < b.0)
}

fn insert_ranked(top: &mut Vec<(u32, f32)>, entry: (u32, f32)) {
    let position = top
        .iter()
        .position(|&other| ranks_before(entry, other))
        .unwrap_or(top.len());
    top.insert(position, entry);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(weights: &[f32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(id, &weight)| Candidate {
                id: id as u32,
                logit: weight.ln(),
                weight,
            })
            .collect()
    }

    #[test]
    fn draw_walks_the_cumulative_weights() {
        let list = kept(&[0.5, 0.25, 0.25]);
        assert_eq!(draw_index(&list, 1.0, 0.0, true), Some(0));
        assert_eq!(draw_index(&list, 1.0, 0.4999, true), Some(0));
        assert_eq!(draw_index(&list, 1.0, 0.5, true), Some(1));
        assert_eq!(draw_index(&list, 1.0, 0.75, true), Some(2));
        assert_eq!(draw_index(&list, 1.0, 0.999_999, true), Some(2));
        // Normaliser larger than the walked sum: the last token when whole, else "need more".
        assert_eq!(draw_index(&list, 1.5, 0.9, true), Some(2));
        assert_eq!(draw_index(&list, 1.5, 0.9, false), None);
        assert_eq!(draw_index(&[], 1.0, 0.5, true), None);
    }

    #[test]
    fn top_k_orders_by_probability_then_id_and_drops_zeros() {
        let mut top = Vec::new();
        let list = kept(&[0.5, 0.25, 0.25]);
        assert!(top_k(&list, 1.0, list[0].logit, true, &mut top));
        assert_eq!(top, vec![(0, 0.5), (1, 0.25), (2, 0.25)]);
        // Not whole and fewer than 8 seen: undecided.
        assert!(!top_k(&list, 1.0, list[0].logit, false, &mut top));
    }

    #[test]
    fn top_k_keeps_the_lowest_ids_among_equal_probabilities() {
        // Twelve equal weights but listed with ids descending: ties must resolve to ids 0..8.
        let list: Vec<Candidate> = (0..12u32)
            .rev()
            .map(|id| Candidate {
                id,
                logit: 0.0,
                weight: 1.0,
            })
            .collect();
        let mut top = Vec::new();
        assert!(top_k(&list, 12.0, 0.0, true, &mut top));
        let ids: Vec<u32> = top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, (0..8).collect::<Vec<_>>());
        // The equal run reaches the end of an incomplete prefix: undecided.
        assert!(!top_k(&list, 12.0, 0.0, false, &mut top));
    }

    #[test]
    fn top_k_stops_early_once_the_rest_is_provably_lighter() {
        let mut list: Vec<Candidate> = (0..9u32)
            .map(|id| Candidate {
                id,
                logit: -(id as f32),
                weight: exp32(-(id as f32)),
            })
            .collect();
        let mut top = Vec::new();
        // Token 8 is the witness; an incomplete prefix ending just after it is undecided, one
        // reaching a token EXP_ORDER_GAP lower is decided.
        assert!(!top_k(&list, 2.0, 0.0, false, &mut top));
        list.push(Candidate {
            id: 9,
            logit: -9.0,
            weight: exp32(-9.0),
        });
        assert!(top_k(&list, 2.0, 0.0, false, &mut top));
        assert_eq!(top.len(), TOP_K);
        assert_eq!(top[7].0, 7);
    }
}
