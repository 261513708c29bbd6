//! Cutting special-token text out of the input before the model tokenizer sees it.
//!
//! llama.cpp (`tokenizer_st_partition`) takes the special tokens longest first and, for each,
//! splits every still-raw text fragment at each leftmost non-overlapping occurrence; a token
//! with the lstrip/rstrip attribute also drops the whitespace next to it. Control and unknown
//! tokens take part only when `parse_special` is on; user-defined tokens always do.
//!
//! Doing that literally costs one substring search per special token (Gemma 3 has over 6,000).
//! Instead, one pass over the text with a byte trie finds every occurrence of every special
//! token; the occurrences are then taken in llama.cpp's order (token priority, then position),
//! keeping those that still lie entirely in raw text. That selects exactly what the
//! fragment-by-fragment search selects, because a fragment is a maximal run of raw text and
//! the search within it takes the leftmost occurrence that fits.

/// A piece of the input after partitioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fragment<'t> {
    Token(u32),
    Text(&'t str),
}

#[derive(Debug, Clone)]
struct Candidate {
    id: u32,
    len: usize,
    /// Control or unknown: matched only with `parse_special`.
    needs_parse_special: bool,
    lstrip: bool,
    rstrip: bool,
}

#[derive(Debug, Clone, Default)]
struct TrieNode {
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
    /// Index into `candidates` of the token ending here.
    candidate: Option<u32>,
}

/// One special token as the matcher needs it.
#[derive(Debug, Clone)]
pub(crate) struct SpecialToken<'a> {
    pub id: u32,
    pub text: &'a str,
    pub needs_parse_special: bool,
    pub lstrip: bool,
    pub rstrip: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct SpecialMatcher {
    /// In llama.cpp's processing order: longest text first, then lowest id.
    candidates: Vec<Candidate>,
    nodes: Vec<TrieNode>,
    any_without_parse_special: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ByteState {
    Raw,
    Token,
    Stripped,
}

impl SpecialMatcher {
    pub fn new(tokens: Vec<SpecialToken<'_>>) -> SpecialMatcher {
        let mut tokens: Vec<_> = tokens.into_iter().filter(|t| !t.text.is_empty()).collect();
        // llama.cpp sorts by length with an unstable sort; ties only matter for equal-length
        // tokens that overlap in the text, and lowest id first is the natural choice.
        tokens.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));

        let mut nodes = vec![TrieNode::default()];
        let mut candidates = Vec::with_capacity(tokens.len());
        for token in &tokens {
            let mut node = 0usize;
            for &byte in token.text.as_bytes() {
                node = match nodes[node]
                    .children
                    .binary_search_by_key(&byte, |&(b, _)| b)
                {
                    Ok(i) => nodes[node].children[i].1 as usize,
                    Err(i) => {
                        let child = nodes.len();
                        nodes[node].children.insert(i, (byte, child as u32));
                        nodes.push(TrieNode::default());
                        child
                    }
                };
            }
            // Texts are unique in a vocabulary, so no node ends two tokens.
            nodes[node].candidate = Some(candidates.len() as u32);
            candidates.push(Candidate {
                id: token.id,
                len: token.text.len(),
                needs_parse_special: token.needs_parse_special,
                lstrip: token.lstrip,
                rstrip: token.rstrip,
            });
        }
        let any_without_parse_special = candidates.iter().any(|c| !c.needs_parse_special);
        SpecialMatcher {
            candidates,
            nodes,
            any_without_parse_special,
        }
    }

    pub fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        if text.is_empty() {
            return Vec::new();
        }
        if self.candidates.is_empty() || !(parse_special || self.any_without_parse_special) {
            return vec![Fragment::Text(text)];
        }
        let bytes = text.as_bytes();

        // (candidate index, start) of every occurrence of an eligible token, by start.
        let mut occurrences: Vec<(u32, usize)> = Vec::new();
        for start in 0..bytes.len() {
            let mut node = 0usize;
            for &byte in &bytes[start..] {
                let children = &self.nodes[node].children;
                match children.binary_search_by_key(&byte, |&(b, _)| b) {
                    Ok(i) => node = children[i].1 as usize,
                    Err(_) => break,
                }
                if let Some(c) = self.nodes[node].candidate {
                    if parse_special || !self.candidates[c as usize].needs_parse_special {
                        occurrences.push((c, start));
                    }
                }
            }
        }
        if occurrences.is_empty() {
            return vec![Fragment::Text(text)];
        }
        let occurrences = group_by_candidate(&occurrences, self.candidates.len());

        let mut state = vec![ByteState::Raw; bytes.len()];
        let mut matches: Vec<(usize, usize, u32)> = Vec::new();
        for &(c, start) in &occurrences {
            let candidate = &self.candidates[c as usize];
            let end = start + candidate.len;
            if state[start..end].iter().any(|&s| s != ByteState::Raw) {
                continue;
            }
            state[start..end].fill(ByteState::Token);
            matches.push((start, end, candidate.id));
            if candidate.lstrip {
                let mut i = start;
                while i > 0 && state[i - 1] == ByteState::Raw && is_c_space(bytes[i - 1]) {
                    state[i - 1] = ByteState::Stripped;
                    i -= 1;
                }
            }
            if candidate.rstrip {
                let mut i = end;
                while i < bytes.len() && state[i] == ByteState::Raw && is_c_space(bytes[i]) {
                    state[i] = ByteState::Stripped;
                    i += 1;
                }
            }
        }
        matches.sort_unstable();

        let mut fragments = Vec::with_capacity(matches.len() * 2 + 1);
        let mut pos = 0;
        for &(start, end, id) in &matches {
            push_raw_runs(text, &state, pos, start, &mut fragments);
            fragments.push(Fragment::Token(id));
            pos = end;
        }
        push_raw_runs(text, &state, pos, bytes.len(), &mut fragments);
        fragments
    }
}

/// Reorders occurrences listed by start into candidate order (llama.cpp's processing order),
/// keeping start order within a candidate: a counting sort, since long runs of a repeated
/// character can produce hundreds of thousands of overlapping occurrences.
fn group_by_candidate(by_start: &[(u32, usize)], n_candidates: usize) -> Vec<(u32, usize)> {
    let mut first_slot = vec![0usize; n_candidates + 1];
    for &(c, _) in by_start {
        first_slot[c as usize + 1] += 1;
    }
    for i in 1..first_slot.len() {
        first_slot[i] += first_slot[i - 1];
    }
    let mut grouped = vec![(0u32, 0usize); by_start.len()];
    for &(c, start) in by_start {
        let slot = &mut first_slot[c as usize];
        grouped[*slot] = (c, start);
        *slot += 1;
    }
    grouped
}

/// Pushes each maximal run of raw bytes in `text[from..to]` (stripped whitespace separates
/// nothing but a token from its neighbour, so there is at most one run on each side).
fn push_raw_runs<'t>(
    text: &'t str,
    state: &[ByteState],
    from: usize,
    to: usize,
    fragments: &mut Vec<Fragment<'t>>,
) {
    let mut pos = from;
    while pos < to {
        if state[pos] != ByteState::Raw {
            pos += 1;
            continue;
        }
        let start = pos;
        while pos < to && state[pos] == ByteState::Raw {
            pos += 1;
        }
        // Special tokens are whole UTF-8 strings, so cuts fall on char boundaries.
        if let Some(piece) = text.get(start..pos) {
            fragments.push(Fragment::Text(piece));
        }
    }
}

/// C's `isspace` in the "C" locale, which llama.cpp uses for lstrip/rstrip.
fn is_c_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn matcher(tokens: &[(u32, &str, bool)]) -> SpecialMatcher {
        SpecialMatcher::new(
            tokens
                .iter()
                .map(|&(id, text, control)| SpecialToken {
                    id,
                    text,
                    needs_parse_special: control,
                    lstrip: false,
                    rstrip: false,
                })
                .collect(),
        )
    }

    use Fragment::{Text, Token};

    #[test]
    fn control_tokens_need_parse_special() {
        let m = matcher(&[(1, "<|im_start|>", true), (2, "<|im_end|>", true)]);
        let text = "<|im_start|>user\nhi<|im_end|>";
        assert_eq!(
            m.partition(text, true),
            [Token(1), Text("user\nhi"), Token(2)]
        );
        assert_eq!(m.partition(text, false), [Text(text)]);
    }

    #[test]
    fn user_defined_tokens_are_always_cut_out() {
        let m = matcher(&[(7, "  ", false), (8, "\n", false)]);
        assert_eq!(
            m.partition("a  b\nc", false),
            [Text("a"), Token(7), Text("b"), Token(8), Text("c")]
        );
    }

    #[test]
    fn longest_token_wins_everywhere_before_shorter_ones() {
        // llama.cpp processes "bcd" over the whole text before "ab", so "abcd" becomes
        // "a" + bcd, not ab + "cd" as a leftmost-longest scan would give.
        let m = matcher(&[(1, "ab", false), (2, "bcd", false)]);
        assert_eq!(m.partition("abcd", false), [Text("a"), Token(2)]);
        assert_eq!(
            m.partition("ab abcd ab", false),
            [Token(1), Text(" a"), Token(2), Text(" "), Token(1)]
        );
    }

    #[test]
    fn repeated_and_adjacent_tokens() {
        let m = matcher(&[(3, "\n", false), (4, "\n\n", false)]);
        assert_eq!(m.partition("\n\n\n", false), [Token(4), Token(3)]);
        assert_eq!(m.partition("\n\n\n\n", false), [Token(4), Token(4)]);
    }

    #[test]
    fn strip_attributes_drop_neighbouring_whitespace() {
        let m = SpecialMatcher::new(vec![
            SpecialToken {
                id: 5,
                text: "<mask>",
                needs_parse_special: false,
                lstrip: true,
                rstrip: false,
            },
            SpecialToken {
                id: 6,
                text: "<end>",
                needs_parse_special: false,
                lstrip: false,
                rstrip: true,
            },
        ]);
        assert_eq!(
            m.partition("a  <mask> b", false),
            [Text("a"), Token(5), Text(" b")]
        );
        assert_eq!(
            m.partition("a <end> \n b", false),
            [Text("a "), Token(6), Text("b")]
        );
        assert_eq!(m.partition("  <mask>", false), [Token(5)]);
    }

    #[test]
    fn empty_text_has_no_fragments() {
        let m = matcher(&[(1, "x", false)]);
        assert!(m.partition("", true).is_empty());
    }
}
