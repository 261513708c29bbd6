//! The four SentencePiece segmenters over normalized text, as `sentencepiece` 0.2.3 runs
//! them. Each appends `(piece range, id)` pairs covering the text in order; the id is `None`
//! or the unknown piece's when the piece is not in the vocabulary (the caller turns those into
//! byte pieces or one merged unknown).

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
    /// The unknown piece; a model with byte fallback may have none.
    pub unk: Option<u32>,
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

    /// A piece the segmenters may produce: normal, user-defined or unused (control, unknown
    /// and byte pieces are reserved).
    fn segment_id(&self, piece: &str) -> Option<u32> {
        self.table.get(piece).filter(|&id| {
            matches!(
                self.kind(id),
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused
            )
        })
    }

    /// A whole word or character: its piece, with unused and reserved pieces unknown.
    fn lookup_or_unknown(&self, piece: &str) -> Option<u32> {
        match self.segment_id(piece) {
            Some(id) if self.kind(id) != PieceType::Unused => Some(id),
            _ => self.unk,
        }
    }
}

pub(super) type Segments = Vec<(Range<usize>, Option<u32>)>;

/// No symbol (before the first or after the last).
const NONE: u32 = u32::MAX;

/// A run of normalized text; indices are `u32` to keep the merge loop's memory small (the
/// priority queue of a long prompt does not fit in cache, and its entries' size is most of
/// the encoding time).
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: u32,
    len: u32,
    prev: u32,
    next: u32,
    /// A user-defined piece: never merged with its neighbours.
    frozen: bool,
}

/// A candidate merge of `left` with the symbol after it, into a piece of `size` bytes.
#[derive(Debug, Clone, Copy)]
struct Pair {
    /// Orders the heap: the piece's score (as `f32::total_cmp` orders it, which is how
    /// SentencePiece compares the bits) above the inverted left index, so the maximum is
    /// the best merge and the leftmost among equals.
    key: u64,
    size: u32,
    left: u32,
}

impl Pair {
    fn new(score: f32, left: u32, size: u32) -> Pair {
        let bits = score.to_bits();
        let ordered = if bits & 0x8000_0000 != 0 {
            !bits
        } else {
            bits | 0x8000_0000
        };
        Pair {
            key: (u64::from(ordered) << 32) | u64::from(!left),
            size,
            left,
        }
    }
}

impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Pair {}

impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pair {
    /// Entries with equal keys share their left symbol, and at most one of them is still
    /// valid when popped, so their order does not matter.
    fn cmp(&self, other: &Self) -> Ordering {
        self.key.cmp(&other.key)
    }
}

/// Merged text -> the two texts it was made of, for merges into unused pieces.
type UnusedMerges<'t> = HashMap<&'t str, (Range<usize>, Range<usize>)>;

/// How deep SentencePiece splits unused pieces back before giving up.
const MAX_RESEGMENT_DEPTH: usize = 100;

fn range(symbol: Symbol) -> Range<usize> {
    symbol.start as usize..(symbol.start + symbol.len) as usize
}

/// The merge of `left` with the symbol after it, if their concatenation is a piece.
fn merge_candidate<'t>(
    text: &'t str,
    pieces: Pieces<'_>,
    symbols: &[Symbol],
    unused_merges: &mut UnusedMerges<'t>,
    left: u32,
) -> Option<Pair> {
    let l = *symbols.get(left as usize)?;
    let r = *symbols.get(l.next as usize)?;
    if l.frozen || r.frozen {
        return None;
    }
    let size = l.len + r.len;
    // Live symbols are contiguous in `text`, so the pair's text is one slice.
    let merged = text.get(l.start as usize..(l.start + size) as usize)?;
    let id = pieces.segment_id(merged)?;
    if pieces.kind(id) == PieceType::Unused {
        unused_merges.insert(merged, (range(l), range(r)));
    }
    Some(Pair::new(pieces.score(id), left, size))
}

/// SentencePiece BPE: start from characters (a user-defined piece is one frozen symbol), merge
/// the adjacent pair with the best-scoring piece (leftmost on ties) until none is left, then
/// split any merge that produced an unused piece back into the pair it came from.
///
/// A text over 4 GiB is segmented in 4 GiB parts (no merge crosses a part boundary), which
/// keeps symbol indices in `u32`.
pub(super) fn bpe(
    text: &str,
    pieces: Pieces<'_>,
    user_defined: &PrefixMatcher,
    out: &mut Segments,
) {
    const MAX_PART: usize = u32::MAX as usize - 1;
    let mut offset = 0;
    while offset < text.len() {
        let mut end = text.len().min(offset + MAX_PART);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        bpe_part(&text[offset..end], offset, pieces, user_defined, out);
        offset = end;
    }
}

/// [`bpe`] on a part of at most `u32::MAX - 1` bytes that starts `offset` bytes into the text.
fn bpe_part(
    text: &str,
    offset: usize,
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
        let index = symbols.len() as u32;
        symbols.push(Symbol {
            start: pos as u32,
            len: len as u32,
            prev: index.checked_sub(1).unwrap_or(NONE),
            next: index + 1,
            frozen,
        });
        pos += len;
    }
    if let Some(last) = symbols.last_mut() {
        last.next = NONE;
    }

    let mut unused_merges = UnusedMerges::new();
    let initial: Vec<Pair> = (0..symbols.len().saturating_sub(1) as u32)
        .filter_map(|left| merge_candidate(text, pieces, &symbols, &mut unused_merges, left))
        .collect();
    // Building the heap in one go is linear; pushing one by one is not.
    let mut queue = BinaryHeap::from(initial);
    while let Some(pair) = queue.pop() {
        let Some(&l) = symbols.get(pair.left as usize) else {
            continue;
        };
        let Some(&r) = symbols.get(l.next as usize) else {
            continue;
        };
        // Stale: the left side was merged away or grew since the pair was queued (the right
        // side can only change by merging into the left one).
        if l.len == 0 || r.len == 0 || l.len + r.len != pair.size {
            continue;
        }
        let right = l.next;
        symbols[pair.left as usize].len = pair.size;
        symbols[pair.left as usize].next = r.next;
        symbols[right as usize].len = 0;
        if let Some(next) = symbols.get_mut(r.next as usize) {
            next.prev = pair.left;
        }
        if l.prev != NONE {
            queue.extend(merge_candidate(
                text,
                pieces,
                &symbols,
                &mut unused_merges,
                l.prev,
            ));
        }
        queue.extend(merge_candidate(
            text,
            pieces,
            &symbols,
            &mut unused_merges,
            pair.left,
        ));
    }

    let shift = |r: Range<usize>| r.start + offset..r.end + offset;
    // Depth-first, left before right, without recursion.
    let mut pending: Vec<(Range<usize>, usize)> = Vec::new();
    let mut index = if symbols.is_empty() { NONE } else { 0 };
    while let Some(&symbol) = symbols.get(index as usize) {
        index = symbol.next;
        pending.push((range(symbol), 0));
        while let Some((range, depth)) = pending.pop() {
            let piece = &text[range.clone()];
            let id = pieces.table.get(piece);
            if depth > MAX_RESEGMENT_DEPTH {
                out.push((shift(range), id.or(pieces.unk)));
                continue;
            }
            let Some(id) = pieces.segment_id(piece) else {
                out.push((shift(range), pieces.unk));
                continue;
            };
            if pieces.kind(id) != PieceType::Unused {
                out.push((shift(range), Some(id)));
                continue;
            }
            match unused_merges.get(piece) {
                Some((left, right)) => {
                    pending.push((right.clone(), depth + 1));
                    pending.push((left.clone(), depth + 1));
                }
                None => out.push((shift(range), pieces.unk)),
            }
        }
    }
}

/// Parameters of the unigram model that SentencePiece derives from the whole vocabulary.
#[derive(Debug, Clone, Copy)]
pub(super) struct UnigramParams {
    /// Lowest score of a normal piece (`f32::MAX` when there is none).
    pub min_score: f32,
    /// Longest piece the lattice can contain, in bytes.
    pub max_piece_bytes: usize,
}

/// Penalty SentencePiece gives an unknown character below the lowest piece score.
const UNK_PENALTY: f32 = 10.0;
/// Running scores beyond this are rebased to zero, to keep f32 sums precise on long inputs.
const SCORE_RESET_THRESHOLD: f32 = 100_000.0;

#[derive(Debug, Clone, Copy)]
struct BestPath {
    id: Option<u32>,
    score: f32,
    starts_at: Option<usize>,
}

/// A user-defined piece's score: `0.1 * (bytes - 1)`, which makes the longest user-defined
/// match win (computed in double and stored as float, as the C++ does).
fn user_defined_score(bytes: usize) -> f32 {
    (0.1 * (bytes as f64 - 1.0)) as f32
}

/// Unigram Viterbi as SentencePiece's optimized encoder runs it: for each byte position, the
/// best path ending there; a piece extends the best path ending at its start. A character no
/// piece starts with becomes one unknown node scoring 10 below the lowest piece. Ties keep
/// the first candidate found (earlier start, then shorter piece). Everything is `f32`, and a
/// running score past ±100,000 is rebased to 0 along with the paths it can still reach: the
/// rounding of these sums decides ties between equal-scoring arrangements of repeated pieces,
/// so it must be the library's.
pub(super) fn unigram(text: &str, pieces: Pieces<'_>, params: UnigramParams, out: &mut Segments) {
    let size = text.len();
    if size == 0 {
        return;
    }
    let unk_score = params.min_score - UNK_PENALTY;
    let mut best = vec![
        BestPath {
            id: None,
            score: 0.0,
            starts_at: None,
        };
        size + 1
    ];
    let mut max_frontier = 0usize;
    let mut starts_at = 0;
    while starts_at < size {
        let mut best_here = best[starts_at].score;
        // Written as the C++ compares, so a NaN (only from a sum overflowing) is never rebased.
        #[allow(clippy::manual_range_contains)]
        if best_here < -SCORE_RESET_THRESHOLD || best_here > SCORE_RESET_THRESHOLD {
            let offset = best_here;
            let reachable = best
                .get_mut(starts_at..=max_frontier.min(size))
                .unwrap_or_default();
            for (i, path) in reachable.iter_mut().enumerate() {
                if i == 0 || path.starts_at.is_some() {
                    path.score -= offset;
                }
            }
            best_here = 0.0;
        }
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
            max_frontier = max_frontier.max(starts_at + end);
            let score = if kind == PieceType::UserDefined {
                user_defined_score(end)
            } else {
                pieces.score(id)
            };
            let candidate = score + best_here;
            let target = &mut best[starts_at + end];
            if target.starts_at.is_none() || candidate > target.score {
                *target = BestPath {
                    id: Some(id),
                    score: candidate,
                    starts_at: Some(starts_at),
                };
            }
            if end == char_len {
                has_single_char_piece = true;
            }
        }
        if !has_single_char_piece {
            max_frontier = max_frontier.max(starts_at + char_len);
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
            out.push((start..i, pieces.lookup_or_unknown(&text[start..i])));
            start = i;
        }
    }
    if start < text.len() {
        out.push((start..text.len(), pieces.lookup_or_unknown(&text[start..])));
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
        out.push((
            pos..pos + len,
            pieces.lookup_or_unknown(&text[pos..pos + len]),
        ));
        pos += len;
    }
}
