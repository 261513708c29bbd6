//! SentencePiece BPE as llama.cpp runs it for `tokenizer.ggml.model = llama`: the text (spaces
//! already written as "▁") starts as one symbol per character; the adjacent pair whose
//! concatenation is a vocabulary token with the highest score is merged, leftmost first among
//! equal scores, until no adjacent pair forms a token. A final symbol that is not a token is
//! written as byte tokens (`<0xNN>`).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use super::index::TokenTable;

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge; the heap's maximum is the best one.
#[derive(Debug, Clone, Copy)]
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Pair {}

impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pair {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| Reverse(self.left).cmp(&Reverse(other.left)))
            .then_with(|| Reverse(self.right).cmp(&Reverse(other.right)))
    }
}

/// Appends the token ids of `text` (already space-escaped). `byte_tokens[b]` is the token for
/// byte `b`, if the vocabulary has one; `unk` stands in for a byte without one.
pub(crate) fn encode(
    text: &str,
    table: &TokenTable,
    scores: &[f32],
    byte_tokens: &[Option<u32>; 256],
    unk: Option<u32>,
    out: &mut Vec<u32>,
) {
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        let index = symbols.len();
        symbols.push(Symbol {
            start,
            len: c.len_utf8(),
            prev: index.checked_sub(1),
            next: chars.peek().map(|_| index + 1),
        });
    }

    let mut queue = BinaryHeap::new();
    let push_pair =
        |symbols: &[Symbol], queue: &mut BinaryHeap<Pair>, left: usize, right: usize| {
            let start = symbols[left].start;
            let size = symbols[left].len + symbols[right].len;
            // Symbols are contiguous in `text`, so the pair's text is one slice.
            let Some(pair_text) = text.get(start..start + size) else {
                return;
            };
            if let Some(id) = table.get(pair_text) {
                let score = scores.get(id as usize).copied().unwrap_or(0.0);
                queue.push(Pair {
                    score,
                    left,
                    right,
                    size,
                });
            }
        };
    for left in 1..symbols.len() {
        push_pair(&symbols, &mut queue, left - 1, left);
    }
    while let Some(pair) = queue.pop() {
        let (l, r) = (symbols[pair.left], symbols[pair.right]);
        // Stale: one side was merged away or grew since the pair was queued.
        if l.len == 0 || r.len == 0 || l.len + r.len != pair.size {
            continue;
        }
        symbols[pair.left].len = pair.size;
        symbols[pair.left].next = r.next;
        symbols[pair.right].len = 0;
        if let Some(next) = r.next {
            symbols[next].prev = Some(pair.left);
        }
        if let Some(prev) = l.prev {
            push_pair(&symbols, &mut queue, prev, pair.left);
        }
        if let Some(next) = r.next {
            push_pair(&symbols, &mut queue, pair.left, next);
        }
    }

    for symbol in symbols.iter().filter(|s| s.len > 0) {
        let piece = &text[symbol.start..symbol.start + symbol.len];
        if let Some(id) = table.get(piece) {
            out.push(id);
            continue;
        }
        // Merged symbols are always tokens, so this is a single character with no token.
        for byte in piece.bytes() {
            if let Some(id) = byte_tokens[usize::from(byte)].or(unk) {
                out.push(id);
            }
        }
    }
}
