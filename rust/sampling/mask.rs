//! Which tokens may be sampled: a bitset over the vocabulary built from the user's
//! `allowed_tokens` or `disallowed_tokens`.

use crate::error::{EngineError, Result};

/// Which user parameter a mask came from, so errors about it name that parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MaskSource {
    AllowedTokens,
    DisallowedTokens,
}

/// A set of allowed token ids over a vocabulary of `n_vocab` tokens.
///
/// Built either from the ids that are allowed ([`TokenMask::allow_only`]) or from those
/// that are not ([`TokenMask::disallow`]); duplicates are harmless. A mask always allows
/// at least one token: a mask that would allow none is refused when built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    /// Bit `id % 64` of word `id / 64` is set when token `id` is allowed; bits past
    /// `n_vocab` are always clear.
    words: Vec<u64>,
    n_vocab: usize,
    n_allowed: usize,
    source: MaskSource,
}

impl TokenMask {
    /// Only `ids` may be sampled. Errors (naming `allowed_tokens`) on an id outside the
    /// vocabulary or an empty list.
    pub fn allow_only(n_vocab: usize, ids: &[u32]) -> Result<TokenMask> {
        let source = MaskSource::AllowedTokens;
        let mut mask = TokenMask::filled(n_vocab, false, source);
        for &id in ids {
            let index = mask.checked_index(id)?;
            mask.words[index / 64] |= 1u64 << (index % 64);
        }
        mask.finish()
    }

    /// Every token except `ids` may be sampled. Errors (naming `disallowed_tokens`) on an id
    /// outside the vocabulary or when nothing would remain.
    pub fn disallow(n_vocab: usize, ids: &[u32]) -> Result<TokenMask> {
        let source = MaskSource::DisallowedTokens;
        let mut mask = TokenMask::filled(n_vocab, true, source);
        for &id in ids {
            let index = mask.checked_index(id)?;
            mask.words[index / 64] &= !(1u64 << (index % 64));
        }
        mask.finish()
    }

    /// Whether `id` may be sampled; ids outside the vocabulary never may.
    pub fn is_allowed(&self, id: u32) -> bool {
        let index = id as usize;
        index < self.n_vocab && self.words[index / 64] & (1u64 << (index % 64)) != 0
    }

    /// How many tokens may be sampled (at least 1).
    pub fn n_allowed(&self) -> usize {
        self.n_allowed
    }

    /// The vocabulary size the mask was built for.
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// The user parameter this mask came from, for error messages.
    pub fn param_name(&self) -> &'static str {
        match self.source {
            MaskSource::AllowedTokens => "allowed_tokens",
            MaskSource::DisallowedTokens => "disallowed_tokens",
        }
    }

    /// Calls `visit` with every allowed index in increasing order; the cost is one step per
    /// 64 tokens plus one per allowed token.
    pub(crate) fn for_each_allowed(&self, mut visit: impl FnMut(usize)) {
        for (word_index, &word) in self.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                visit(word_index * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
    }

    /// Calls `visit` with every disallowed index (below `n_vocab`) in increasing order.
    pub(crate) fn for_each_disallowed(&self, mut visit: impl FnMut(usize)) {
        for (word_index, &word) in self.words.iter().enumerate() {
            let mut bits = !word & self.valid_bits(word_index);
            while bits != 0 {
                visit(word_index * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
    }

    fn filled(n_vocab: usize, allowed: bool, source: MaskSource) -> TokenMask {
        let n_words = n_vocab.div_ceil(64);
        let mut mask = TokenMask {
            words: vec![if allowed { u64::MAX } else { 0 }; n_words],
            n_vocab,
            n_allowed: 0,
            source,
        };
        if let Some(last) = n_words.checked_sub(1) {
            mask.words[last] &= mask.valid_bits(last);
        }
        mask
    }

    /// The bits of word `word_index` that stand for tokens inside the vocabulary.
    fn valid_bits(&self, word_index: usize) -> u64 {
        let first = word_index * 64;
        match self.n_vocab.saturating_sub(first) {
            remaining if remaining >= 64 => u64::MAX,
            remaining => (1u64 << remaining) - 1,
        }
    }

    fn checked_index(&self, id: u32) -> Result<usize> {
        let index = id as usize;
        if index < self.n_vocab {
            Ok(index)
        } else {
            Err(EngineError::invalid(
                self.param_name(),
                format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    self.n_vocab
                ),
            ))
        }
    }

    fn finish(mut self) -> Result<TokenMask> {
        self.n_allowed = self
            .words
            .iter()
            .map(|word| word.count_ones() as usize)
            .sum();
        if self.n_allowed == 0 {
            let message = match self.source {
                MaskSource::AllowedTokens => "no token is allowed (the list is empty)",
                MaskSource::DisallowedTokens => "every token of the vocabulary is disallowed",
            };
            return Err(EngineError::invalid(self.param_name(), message));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed_ids(mask: &TokenMask) -> Vec<usize> {
        let mut ids = Vec::new();
        mask.for_each_allowed(|id| ids.push(id));
        ids
    }

    fn disallowed_ids(mask: &TokenMask) -> Vec<usize> {
        let mut ids = Vec::new();
        mask.for_each_disallowed(|id| ids.push(id));
        ids
    }

    #[test]
    fn allow_only_allows_exactly_the_listed_ids() {
        let mask = TokenMask::allow_only(130, &[0, 64, 129, 64]).unwrap();
        assert_eq!(mask.n_allowed(), 3);
        assert_eq!(mask.n_vocab(), 130);
        assert_eq!(allowed_ids(&mask), vec![0, 64, 129]);
        assert_eq!(disallowed_ids(&mask).len(), 127);
        assert!(mask.is_allowed(129) && !mask.is_allowed(1) && !mask.is_allowed(130));
        assert_eq!(mask.param_name(), "allowed_tokens");
    }

    #[test]
    fn disallow_removes_exactly_the_listed_ids() {
        let mask = TokenMask::disallow(70, &[3, 69]).unwrap();
        assert_eq!(mask.n_allowed(), 68);
        assert_eq!(disallowed_ids(&mask), vec![3, 69]);
        assert_eq!(allowed_ids(&mask).len(), 68);
        assert!(!mask.is_allowed(3) && mask.is_allowed(4) && !mask.is_allowed(70));
        assert_eq!(mask.param_name(), "disallowed_tokens");
    }

    #[test]
    fn out_of_range_ids_are_refused_naming_the_parameter() {
        let err = TokenMask::allow_only(10, &[2, 10]).unwrap_err().to_string();
        assert!(
            err.contains("allowed_tokens") && err.contains("token id 10"),
            "{err}"
        );
        let err = TokenMask::disallow(10, &[u32::MAX])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("disallowed_tokens") && err.contains("vocabulary of 10"),
            "{err}"
        );
    }

    #[test]
    fn masks_that_allow_nothing_are_refused() {
        let err = TokenMask::allow_only(10, &[]).unwrap_err().to_string();
        assert!(err.contains("allowed_tokens"), "{err}");
        let all: Vec<u32> = (0..64).collect();
        let err = TokenMask::disallow(64, &all).unwrap_err().to_string();
        assert!(err.contains("disallowed_tokens"), "{err}");
        assert!(TokenMask::disallow(0, &[]).is_err());
    }

    #[test]
    fn vocabulary_sizes_on_word_boundaries() {
        for n_vocab in [1usize, 63, 64, 65, 128] {
            let mask = TokenMask::disallow(n_vocab, &[]).unwrap();
            assert_eq!(mask.n_allowed(), n_vocab);
            assert_eq!(allowed_ids(&mask), (0..n_vocab).collect::<Vec<_>>());
            assert!(disallowed_ids(&mask).is_empty());
        }
    }
}
