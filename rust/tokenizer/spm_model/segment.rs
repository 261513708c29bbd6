//! The four SentencePiece segmenters over normalized text. Each appends `(piece range, id)`
//! pairs covering the text in order; `id` is the unknown piece's when the piece is not in the
//! vocabulary (the caller turns those into byte pieces or one merged unknown).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::ops::Range;

use super::normalizer::{PrefixMatcher, SPACE_MARK};
use super::PieceType;
use crate::tokenizer::index::TokenTable;

/// What the segmenters need to know about the vocabulary.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pieces<'a> {
    pub table: &'a TokenTable,
    pub kinds: &'a [PieceType],
    pub scores: &'a [f32],
    pub unk: u32,
}

impl Pieces<'_> {
    fn kind(&self, id: u32) -> PieceType {
        self.kinds
            .get(id as usize)
            .copied()
            .unwrap_or(PieceType::Unknown)
    }

    fn score(&self, id: u32) -> f32 {
        self.scores.get(id as usize).copied().unwrap_or(0.0)
    }

    /// SentencePiece's `PieceToId`: any piece, else the unknown piece.
    fn piece_to_id(&self, piece: &str) -> u32 {
        self.table.get(piece).unwrap_or(self.unk)
    }

    /// A piece the segmenters may produce: normal, user-defined or unused (control, unknown
    /// and byte pieces are reserved and only ever looked up whole).
    fn segment_id(&self, piece: &str) -> Option<u32> {
        self.table.get(piece).filter(|&id| {
            matches!(
                self.kind(id),
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused
            )
        })
    }
}

pub(super) type Segments = Vec<(Range<usize>, u32)>;

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
    /// A user-defined piece: never merged with its neighbours.
    frozen: bool,
}

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
    /// The heap's maximum is merged first: highest score, then leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
            .then_with(|| other.right.cmp(&self.right))
    }
}

/// SentencePiece BPE: start from characters (a user-defined piece is one frozen symbol), merge
/// the adjacent pair with the best-scoring piece (leftmost on ties) until none is left, then
/// split any merge that produced an unused piece back into the pair it came from.
pub(super) fn bpe(
    text: &str,
    pieces: Pieces<'_>,
    user_defined: &PrefixMatcher,
    out: &mut Segments,
) {
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    let mut pos = 0;
    while pos < text.len() {
        let (len, frozen) = user_defined.prefix_len(&text[pos..]);
        if len == 0 {
            break;
        }
        let index = symbols.len();
        symbols.push(Symbol {
            start: pos,
            len,
            prev: index.checked_sub(1),
            next: None,
            frozen,
        });
        if let Some(prev) = index.checked_sub(1) {
            symbols[prev].next = Some(index);
        }
        pos += len;
    }

    // Merged text -> the two texts it was made of, for merges into unused pieces.
    let mut unused_merges = UnusedMerges::new();
    let mut queue = BinaryHeap::new();
    for right in 1..symbols.len() {
        push_pair(
            text,
            pieces,
            &symbols,
            &mut queue,
            &mut unused_merges,
            right - 1,
            right,
        );
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
            push_pair(
                text,
                pieces,
                &symbols,
                &mut queue,
                &mut unused_merges,
                prev,
                pair.left,
            );
        }
        if let Some(next) = r.next {
            push_pair(
                text,
                pieces,
                &symbols,
                &mut queue,
                &mut unused_merges,
                pair.left,
                next,
            );
        }
    }

    let mut pending: Vec<Range<usize>> = Vec::new();
    let mut index = if symbols.is_empty() { None } else { Some(0) };
    while let Some(i) = index {
        let symbol = symbols[i];
        index = symbol.next;
        // Depth-first, left before right, without recursion (a hostile vocabulary could
        // chain unused merges as deep as the text is long).
        pending.push(symbol.start..symbol.start + symbol.len);
        while let Some(range) = pending.pop() {
            let piece = &text[range.clone()];
            let id = pieces.piece_to_id(piece);
            match unused_merges.get(piece) {
                Some((left, right)) if pieces.kind(id) == PieceType::Unused => {
                    pending.push(right.clone());
                    pending.push(left.clone());
                }
                _ => out.push((range, id)),
            }
        }
    }
}

type UnusedMerges<'t> = HashMap<&'t str, (Range<usize>, Range<usize>)>;

/// Queues the merge of `left` and `right` if their concatenation is a piece.
fn push_pair<'t>(
    text: &'t str,
    pieces: Pieces<'_>,
    symbols: &[Symbol],
    queue: &mut BinaryHeap<Pair>,
    unused_merges: &mut UnusedMerges<'t>,
    left: usize,
    right: usize,
) {
    let (l, r) = (symbols[left], symbols[right]);
    if l.frozen || r.frozen {
        return;
    }
    let size = l.len + r.len;
    // Live symbols are contiguous in `text`, so the pair's text is one slice.
    let Some(merged) = text.get(l.start..l.start + size) else {
        return;
    };
    let Some(id) = pieces.segment_id(merged) else {
        return;
    };
    queue.push(Pair {
        score: pieces.score(id),
        left,
        right,
        size,
    });
    if pieces.kind(id) == PieceType::Unused {
        unused_merges.insert(merged, (l.start..l.start + l.len, r.start..r.start + r.len));
    }
}

/// Parameters of the unigram model that SentencePiece derives from the whole vocabulary.
#[derive(Debug, Clone, Copy)]
pub(super) struct UnigramParams {
    /// Lowest and highest score of a normal piece (`FLT_MAX` and `FLT_MIN` when there is none).
    pub min_score: f32,
    pub max_score: f32,
    /// Longest piece the lattice can contain, in bytes.
    pub max_piece_bytes: usize,
}

/// Penalty SentencePiece gives an unknown character below the lowest piece score.
const UNK_PENALTY: f32 = 10.0;

#[derive(Debug, Clone, Copy)]
struct BestPath {
    id: u32,
    score: f32,
    starts_at: Option<usize>,
}

/// Unigram Viterbi as SentencePiece's optimized encoder runs it: for each position, the best
/// path ending there; a piece extends the best path ending at its start. A user-defined piece
/// scores `bytes * max_score - 0.1` so that it always wins; a character no piece starts with
/// becomes one unknown node. Ties keep the first candidate found (earlier start, then shorter).
/// The arithmetic follows the C++ types: scores are summed in double and stored in float.
pub(super) fn unigram(text: &str, pieces: Pieces<'_>, params: UnigramParams, out: &mut Segments) {
    let size = text.len();
    if size == 0 {
        return;
    }
    let unk_score = params.min_score - UNK_PENALTY;
    let mut best = vec![
        BestPath {
            id: pieces.unk,
            score: 0.0,
            starts_at: None,
        };
        size + 1
    ];
    let mut starts_at = 0;
    while starts_at < size {
        let best_here = best[starts_at].score;
        let rest = &text[starts_at..];
        let char_len = rest.chars().next().map_or(1, char::len_utf8);
        let mut has_single_char_piece = false;
        let limit = params.max_piece_bytes.min(rest.len());
        for (offset, c) in rest.char_indices() {
            let end = offset + c.len_utf8();
            if end > limit {
                break;
            }
            let Some(id) = pieces.segment_id(&rest[..end]) else {
                continue;
            };
            let kind = pieces.kind(id);
            if kind == PieceType::Unused {
                continue;
            }
            let score = if kind == PieceType::UserDefined {
                f64::from(end as f32 * params.max_score) - 0.1
            } else {
                f64::from(pieces.score(id))
            };
            let candidate = score + f64::from(best_here);
            let target = &mut best[starts_at + end];
            if target.starts_at.is_none() || candidate > f64::from(target.score) {
                *target = BestPath {
                    id,
                    score: candidate as f32,
                    starts_at: Some(starts_at),
                };
            }
            if end == char_len {
                has_single_char_piece = true;
            }
        }
        if !has_single_char_piece {
            let candidate = unk_score + best_here;
            let target = &mut best[starts_at + char_len];
            if target.starts_at.is_none() || candidate > target.score {
                *target = BestPath {
                    id: pieces.unk,
                    score: candidate,
                    starts_at: Some(starts_at),
                };
            }
        }
        starts_at += char_len;
    }

    let first = out.len();
    let mut end = size;
    while end > 0 {
        let node = best[end];
        // Every character position is reached (at worst by an unknown node), so the
        // back-pointer always exists and points backwards.
        let Some(start) = node.starts_at.filter(|&s| s < end) else {
            break;
        };
        out.push((start..end, node.id));
        end = start;
    }
    out[first..].reverse();
}

/// The word model: split before every "▁" (SentencePiece's `SplitIntoWords` with its
/// defaults) and look each word up whole.
pub(super) fn word(text: &str, pieces: Pieces<'_>, out: &mut Segments) {
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c == SPACE_MARK && i > start {
            out.push((start..i, pieces.piece_to_id(&text[start..i])));
            start = i;
        }
    }
    if start < text.len() {
        out.push((start..text.len(), pieces.piece_to_id(&text[start..])));
    }
}

/// The character model: one piece per character, or per user-defined piece.
pub(super) fn character(
    text: &str,
    pieces: Pieces<'_>,
    user_defined: &PrefixMatcher,
    out: &mut Segments,
) {
    let mut pos = 0;
    while pos < text.len() {
        let (len, _) = user_defined.prefix_len(&text[pos..]);
        if len == 0 {
            break;
        }
        out.push((pos..pos + len, pieces.piece_to_id(&text[pos..pos + len])));
        pos += len;
    }
}
