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
    /// The heap's maximum is merged first: highest score (SentencePiece orders scores by their
    /// bits, which is `total_cmp`), then leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
            .then_with(|| other.right.cmp(&self.right))
    }
}

/// Merged text -> the two texts it was made of, for merges into unused pieces.
type UnusedMerges<'t> = HashMap<&'t str, (Range<usize>, Range<usize>)>;

/// How deep SentencePiece splits unused pieces back before giving up.
const MAX_RESEGMENT_DEPTH: usize = 100;

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

    // Depth-first, left before right, without recursion.
    let mut pending: Vec<(Range<usize>, usize)> = Vec::new();
    let mut index = if symbols.is_empty() { None } else { Some(0) };
    while let Some(i) = index {
        let symbol = symbols[i];
        index = symbol.next;
        pending.push((symbol.start..symbol.start + symbol.len, 0));
        while let Some((range, depth)) = pending.pop() {
            let piece = &text[range.clone()];
            let id = pieces.table.get(piece);
            if depth > MAX_RESEGMENT_DEPTH {
                out.push((range, id.or(pieces.unk)));
                continue;
            }
            let Some(id) = pieces.segment_id(piece) else {
                out.push((range, pieces.unk));
                continue;
            };
            if pieces.kind(id) != PieceType::Unused {
                out.push((range, Some(id)));
                continue;
            }
            match unused_merges.get(piece) {
                Some((left, right)) => {
                    pending.push((right.clone(), depth + 1));
                    pending.push((left.clone(), depth + 1));
                }
                None => out.push((range, pieces.unk)),
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
