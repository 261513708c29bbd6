//! The token strings with a text-to-id index over them.
//!
//! Encoding looks up a token for nearly every candidate merge, and Gemma's vocabulary has
//! 262k entries: an open-addressing table of ids that compares against the token strings in
//! place builds without a second copy of every string and hashes faster than SipHash (the
//! keys are the model's own tokens, not attacker-chosen table sizes, so HashDoS resistance
//! buys nothing here).

const EMPTY: u32 = u32::MAX;

/// The vocabulary's token strings, indexed by text.
#[derive(Debug, Clone)]
pub(crate) struct TokenTable {
    tokens: Vec<String>,
    slots: Vec<u32>,
    shift: u32,
}

/// FxHash-style mixing over 8-byte words.
fn hash(text: &str) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h: u64 = text.len() as u64;
    let mut chunks = text.as_bytes().chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
    }
    let mut tail = [0u8; 8];
    let rest = chunks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    h = (h.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    // Fold the well-mixed high bits down; the slot is taken from the top bits.
    h ^ (h >> 29)
}

impl TokenTable {
    /// Indexes `tokens` (ids must fit in u32); on a duplicate, returns the ids of its first
    /// and second occurrence.
    pub fn new(tokens: Vec<String>) -> Result<TokenTable, (u32, u32, String)> {
        let capacity = (tokens.len().max(1) * 2).next_power_of_two().max(16);
        let shift = 64 - capacity.trailing_zeros();
        let mut index = TokenTable {
            tokens: Vec::new(),
            slots: vec![EMPTY; capacity],
            shift,
        };
        for (id, token) in tokens.iter().enumerate() {
            let mut slot = index.home(token);
            loop {
                match index.slots[slot] {
                    EMPTY => {
                        index.slots[slot] = id as u32;
                        break;
                    }
                    other if tokens[other as usize] == *token => {
                        return Err((other, id as u32, token.clone()))
                    }
                    _ => slot = (slot + 1) & (capacity - 1),
                }
            }
        }
        index.tokens = tokens;
        Ok(index)
    }

    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    fn home(&self, text: &str) -> usize {
        (hash(text).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    /// The id of the token whose text is exactly `text`.
    pub fn get(&self, text: &str) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut slot = self.home(text);
        loop {
            match self.slots[slot] {
                EMPTY => return None,
                id if self.tokens.get(id as usize).is_some_and(|t| t == text) => return Some(id),
                _ => slot = (slot + 1) & mask,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_token_and_nothing_else() {
        let tokens: Vec<String> = (0..5000)
            .map(|i| format!("tok{i}"))
            .chain(["".into(), "a".into()])
            .collect();
        let table = TokenTable::new(tokens.clone()).unwrap();
        for (id, token) in tokens.iter().enumerate() {
            assert_eq!(table.get(token), Some(id as u32));
        }
        assert_eq!(table.get("tok5000"), None);
        assert_eq!(table.get("b"), None);
    }

    #[test]
    fn reports_duplicates() {
        let tokens: Vec<String> = ["x", "y", "x"].map(String::from).to_vec();
        assert_eq!(
            TokenTable::new(tokens).unwrap_err(),
            (0, 2, "x".to_string())
        );
    }
}
