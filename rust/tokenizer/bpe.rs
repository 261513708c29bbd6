//! Byte-level BPE (GPT-2 family): each pre-tokenized word, written in GPT-2's byte-level
//! characters, starts as one symbol per character; the adjacent pair with the best
//! (lowest) merge rank is merged, leftmost first among equal ranks, until no pair has a rank.
//! The resulting symbols are looked up in the vocabulary.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::error::{EngineError, Result};

use super::index::TokenTable;
use super::pretokenize::{byte_level_encode, PreTokenizer, PreTokenizerSpec};

/// Merge ranks over interned pieces: a piece is a vocabulary token (id = token id) or a merge
/// operand that is not one (ids from `n_vocab` up).
#[derive(Debug)]
pub(crate) struct BpeModel {
    pre_tokenizer: PreTokenizer,
    ignore_merges: bool,
    extra_pieces: HashMap<Box<str>, u32>,
    ranks: HashMap<(u32, u32), u32>,
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
    piece: Option<u32>,
}

impl BpeModel {
    pub fn new(spec: &PreTokenizerSpec, merges: &[String], table: &TokenTable) -> Result<BpeModel> {
        let n_vocab = table.len();
        let pre_tokenizer = PreTokenizer::new(spec)?;
        let mut extra_pieces: HashMap<Box<str>, u32> = HashMap::new();
        let mut ranks = HashMap::with_capacity(merges.len());
        let mut next_extra = u32::try_from(n_vocab).map_err(|_| {
            EngineError::malformed("tokenizer.ggml.tokens", "more than 2^32 tokens")
        })?;
        let mut intern = |piece: &str| -> Result<u32> {
            if let Some(id) = table.get(piece) {
                return Ok(id);
            }
            if let Some(&id) = extra_pieces.get(piece) {
                return Ok(id);
            }
            let id = next_extra;
            next_extra = next_extra.checked_add(1).ok_or_else(|| {
                EngineError::malformed("tokenizer.ggml.merges", "too many distinct merge pieces")
            })?;
            extra_pieces.insert(piece.into(), id);
            Ok(id)
        };
        for (rank, merge) in merges.iter().enumerate() {
            // As llama.cpp: the separator is the first space after the first byte.
            let split = merge.bytes().skip(1).position(|b| b == b' ').map(|i| i + 1);
            let Some(split) = split else {
                return Err(EngineError::malformed(
                    format!("tokenizer.ggml.merges[{rank}]"),
                    format!("merge {merge:?} has no space separating its two parts"),
                ));
            };
            let left = intern(&merge[..split])?;
            let right = intern(&merge[split + 1..])?;
            let rank = u32::try_from(rank).map_err(|_| {
                EngineError::malformed("tokenizer.ggml.merges", "more than 2^32 merges")
            })?;
            // A repeated pair keeps its first (best) rank.
            ranks.entry((left, right)).or_insert(rank);
        }
        Ok(BpeModel {
            pre_tokenizer,
            ignore_merges: spec.ignore_merges,
            extra_pieces,
            ranks,
        })
    }

    fn piece_id(&self, table: &TokenTable, piece: &str) -> Option<u32> {
        table
            .get(piece)
            .or_else(|| self.extra_pieces.get(piece).copied())
    }

    /// Appends the token ids of a raw-text fragment.
    pub fn encode(&self, text: &str, table: &TokenTable, out: &mut Vec<u32>) {
        let mut word = String::new();
        let mut symbols = Vec::new();
        let mut queue = BinaryHeap::new();
        for raw_word in self.pre_tokenizer.split(text) {
            word.clear();
            byte_level_encode(raw_word, &mut word);
            if self.ignore_merges {
                if let Some(id) = table.get(&word) {
                    out.push(id);
                    continue;
                }
            }
            self.merge_word(&word, table, &mut symbols, &mut queue);
            for symbol in symbols.iter().filter(|s| s.len > 0) {
                let piece = &word[symbol.start..symbol.start + symbol.len];
                match table.get(piece) {
                    Some(id) => out.push(id),
                    None => {
                        // As llama.cpp: fall back to single-byte tokens, dropping bytes that
                        // have none (a well-formed byte-level vocabulary has them all).
                        for byte in piece.bytes() {
                            let single = [byte];
                            if let Some(id) =
                                std::str::from_utf8(&single).ok().and_then(|s| table.get(s))
                            {
                                out.push(id);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Leaves `symbols` holding the word's final segmentation (merged-away symbols have
    /// length 0), in order.
    fn merge_word(
        &self,
        word: &str,
        table: &TokenTable,
        symbols: &mut Vec<Symbol>,
        queue: &mut BinaryHeap<Reverse<(u32, usize, usize, usize)>>,
    ) {
        symbols.clear();
        queue.clear();
        let mut chars = word.char_indices().peekable();
        while let Some((start, c)) = chars.next() {
            let index = symbols.len();
            let len = c.len_utf8();
            symbols.push(Symbol {
                start,
                len,
                prev: index.checked_sub(1),
                next: chars.peek().map(|_| index + 1),
                piece: self.piece_id(table, &word[start..start + len]),
            });
        }
        let push_pair =
            |symbols: &[Symbol], queue: &mut BinaryHeap<_>, left: usize, right: usize| {
                let (l, r) = (&symbols[left], &symbols[right]);
                if let (Some(pl), Some(pr)) = (l.piece, r.piece) {
                    if let Some(&rank) = self.ranks.get(&(pl, pr)) {
                        queue.push(Reverse((rank, left, right, l.len + r.len)));
                    }
                }
            };
        for left in 1..symbols.len() {
            push_pair(symbols, queue, left - 1, left);
        }
        while let Some(Reverse((_, left, right, size))) = queue.pop() {
            let (l, r) = (symbols[left], symbols[right]);
            // Stale: one side was merged away or grew since the pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != size {
                continue;
            }
            let merged = &word[l.start..l.start + size];
            symbols[left].len = size;
            symbols[left].next = r.next;
            symbols[left].piece = self.piece_id(table, merged);
            symbols[right].len = 0;
            if let Some(next) = r.next {
                symbols[next].prev = Some(left);
            }
            if let Some(prev) = l.prev {
                push_pair(symbols, queue, prev, left);
            }
            if let Some(next) = r.next {
                push_pair(symbols, queue, left, next);
            }
        }
    }
}
