//! Expert routing for mixture-of-experts feed-forward blocks (Mixtral, Grok-1).
//!
//! A router turns each token's normed hidden state into one logit per expert; the softmax
//! of those logits over *all* experts gives probabilities, the `k` most probable experts
//! run, and their outputs are summed weighted by gates. Mixtral's gates are the chosen
//! probabilities divided by their sum (llama.cpp's `build_moe_ffn` with `norm_w`); Grok-1's
//! are the chosen probabilities as they are (`MoELayer._inference_call` in xAI's model.py
//! multiplies by `expert_gate`, the raw `top_k` of the softmax).
//!
//! This module only decides which experts run with which weights; `ffn.rs` runs them.

use crate::kernels::ops;

/// One chosen expert of one token.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct Route {
    pub expert: usize,
    pub gate: f32,
}

/// Chooses `k` experts from `router_logits` (one per expert) and appends them to `out`,
/// most probable first.
///
/// Equal probabilities go to the lower expert index first, as `jax.lax.top_k` orders
/// them, so the choice is deterministic and independent of how tokens are batched.
/// `probs` is scratch space for the softmax.
pub fn route(
    router_logits: &[f32],
    k: usize,
    renormalize: bool,
    probs: &mut Vec<f32>,
    out: &mut Vec<Route>,
) {
    probs.clear();
    probs.extend_from_slice(router_logits);
    ops::softmax_in_place(probs);
    let first = out.len();
    for _ in 0..k.min(probs.len()) {
        // Linear scans: k is 1 or 2 and there are at most a few hundred experts. A strict
        // `>` keeps the lowest index among equals; chosen experts are skipped.
        let mut best: Option<usize> = None;
        for (e, &p) in probs.iter().enumerate() {
            if out[first..].iter().any(|r| r.expert == e) {
                continue;
            }
            let better = match best {
                None => true,
                Some(b) => p > probs[b],
            };
            if better {
                best = Some(e);
            }
        }
        let Some(expert) = best else { break };
        out.push(Route {
            expert,
            gate: probs[expert],
        });
    }
    if renormalize {
        let chosen = &mut out[first..];
        let sum: f32 = chosen.iter().map(|r| r.gate).sum();
        // Softmax outputs are positive, so the sum of any k of them is too; the guard only
        // keeps a NaN router from turning into a division by zero.
        if sum > 0.0 {
            chosen.iter_mut().for_each(|r| r.gate /= sum);
        }
    }
}

/// The routes of a batch of tokens regrouped by expert, so that each expert's weights are
/// read once per batch and multiplied with all the tokens that chose it.
#[derive(Default)]
pub struct ExpertGroups {
    /// For each expert, `(token, gate)` pairs in token order.
    groups: Vec<Vec<(usize, f32)>>,
}

impl ExpertGroups {
    /// Empties every group (keeping the buffers) for a batch routed over `n_expert` experts.
    pub fn reset(&mut self, n_expert: usize) {
        self.groups.resize_with(n_expert, Vec::new);
        self.groups.iter_mut().for_each(Vec::clear);
    }

    /// Records that `token` runs `route.expert` with weight `route.gate`. Add tokens in
    /// increasing order to keep each group in token order.
    pub fn add(&mut self, token: usize, route: Route) {
        if let Some(group) = self.groups.get_mut(route.expert) {
            group.push((token, route.gate));
        }
    }

    /// `(expert, its (token, gate) pairs)` for every expert at least one token chose.
    pub fn non_empty(&self) -> impl Iterator<Item = (usize, &[(usize, f32)])> {
        self.groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .map(|(e, g)| (e, g.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(logits: &[f32], k: usize, renormalize: bool) -> Vec<Route> {
        let mut out = Vec::new();
        route(logits, k, renormalize, &mut Vec::new(), &mut out);
        out
    }

    fn softmax(logits: &[f32]) -> Vec<f32> {
        let mut p = logits.to_vec();
        ops::softmax_in_place(&mut p);
        p
    }

    #[test]
    fn picks_the_k_most_probable_best_first() {
        let logits = [0.1, 2.0, -1.0, 3.0, 0.5, 1.9, -4.0, 0.0];
        let chosen = routes(&logits, 2, false);
        let experts: Vec<usize> = chosen.iter().map(|r| r.expert).collect();
        assert_eq!(experts, [3, 1]);
        let p = softmax(&logits);
        assert_eq!(chosen[0].gate, p[3]);
        assert_eq!(chosen[1].gate, p[1]);
        let top1 = routes(&logits, 1, true);
        assert_eq!(top1.len(), 1);
        assert_eq!(top1[0].expert, 3);
        assert_eq!(top1[0].gate, 1.0);
    }

    #[test]
    fn without_renormalisation_gates_are_the_softmax_over_all_experts() {
        // Grok-1: two chosen of eight; the gates sum to less than one.
        let logits = [1.0, 0.0, 0.5, 2.0, -1.0, 0.25, 0.0, 1.5];
        let chosen = routes(&logits, 2, false);
        let denominator: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        for (r, expected_expert) in chosen.iter().zip([3, 7]) {
            assert_eq!(r.expert, expected_expert);
            let expected = f64::from(logits[expected_expert]).exp() / denominator;
            assert!((f64::from(r.gate) - expected).abs() < 1e-7);
        }
        let sum: f32 = chosen.iter().map(|r| r.gate).sum();
        assert!(sum < 0.7, "gates sum to {sum}");
    }

    #[test]
    fn renormalised_gates_sum_to_one_in_the_ratio_of_the_probabilities() {
        // Mixtral: the two chosen probabilities divided by their sum, which is a softmax
        // over the two chosen logits alone.
        let logits = [1.0, 0.0, 0.5, 2.0, -1.0, 0.25, 0.0, 1.5];
        let chosen = routes(&logits, 2, true);
        assert_eq!(chosen.iter().map(|r| r.expert).collect::<Vec<_>>(), [3, 7]);
        let sum: f32 = chosen.iter().map(|r| r.gate).sum();
        assert!((sum - 1.0).abs() < 1e-6);
        let pair = softmax(&[2.0, 1.5]);
        assert!((chosen[0].gate - pair[0]).abs() < 1e-6);
        assert!((chosen[1].gate - pair[1]).abs() < 1e-6);
    }

    #[test]
    fn ties_go_to_the_lower_expert_index() {
        let chosen = routes(&[0.0, 1.0, 1.0, 1.0, 0.0], 2, false);
        assert_eq!(chosen.iter().map(|r| r.expert).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(chosen[0].gate, chosen[1].gate);
        let all_equal = routes(&[0.5; 8], 3, true);
        assert_eq!(
            all_equal.iter().map(|r| r.expert).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        for r in &all_equal {
            assert!((r.gate - 1.0 / 3.0).abs() < 1e-6);
        }
    }

    #[test]
    fn routes_append_per_token_and_never_repeat_an_expert() {
        let mut out = Vec::new();
        let mut probs = Vec::new();
        route(&[0.0, 5.0, 1.0], 2, true, &mut probs, &mut out);
        route(&[3.0, 0.0, 1.0], 2, true, &mut probs, &mut out);
        let experts: Vec<usize> = out.iter().map(|r| r.expert).collect();
        assert_eq!(experts, [1, 2, 0, 2]);
        // k larger than the expert count chooses each expert once.
        let every = routes(&[0.0, 0.0], 5, false);
        assert_eq!(every.iter().map(|r| r.expert).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn nan_logits_do_not_panic() {
        let chosen = routes(&[f32::NAN, 1.0, 0.0], 2, true);
        assert_eq!(chosen.len(), 2);
    }

    #[test]
    fn groups_collect_tokens_per_expert_in_token_order() {
        let r = |expert, gate| Route { expert, gate };
        // Three tokens, two routes each.
        let routes = [
            (0, r(2, 0.6)),
            (0, r(0, 0.4)),
            (1, r(0, 0.7)),
            (1, r(1, 0.3)),
            (2, r(2, 0.5)),
            (2, r(1, 0.5)),
        ];
        let mut groups = ExpertGroups::default();
        groups.reset(4);
        routes.iter().for_each(|&(t, route)| groups.add(t, route));
        let got: Vec<(usize, Vec<(usize, f32)>)> =
            groups.non_empty().map(|(e, g)| (e, g.to_vec())).collect();
        assert_eq!(
            got,
            [
                (0, vec![(0, 0.4), (1, 0.7)]),
                (1, vec![(1, 0.3), (2, 0.5)]),
                (2, vec![(0, 0.6), (2, 0.5)]),
            ]
        );
        // A reset keeps the buffers and forgets the previous batch.
        groups.reset(4);
        routes[..2]
            .iter()
            .for_each(|&(t, route)| groups.add(t, route));
        assert_eq!(groups.non_empty().count(), 2);
    }
}
