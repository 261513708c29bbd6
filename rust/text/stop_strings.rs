//! Streaming stop-string matching over the output bytes.
//!
//! Stop strings are matched against the raw bytes the model produces, not against each
//! token's text, so an occurrence may begin inside one token (even between the bytes of one
//! character), span any number of tokens, and be found in the token that completes it.
//!
//! [`StopMatcher`] is an Aho-Corasick automaton over the stop strings' bytes, compiled once
//! into a complete DFA: every (state, byte) has its next state precomputed, so each pushed
//! byte costs one table lookup whatever the length of the output so far, and the whole
//! matching state between tokens is one state number. Bytes are first mapped to classes
//! (one per distinct byte that occurs in some stop string, plus one for all the others), which
//! keeps the table at `states x classes` instead of `states x 256`.

use crate::error::{EngineError, Result};

/// Upper bound on the total bytes of one request's stop strings. It bounds the transition
/// table to about 16 MiB in the worst case (every byte value used); real stop strings are a
/// few bytes to a few hundred.
pub const MAX_STOP_STRING_BYTES: usize = 16 * 1024;

/// Marks "no stop string ends in this state" in [`StopMatcher::match_at`].
const NO_MATCH: u32 = u32::MAX;

/// Marks a transition not yet filled in while the trie is being built.
const NO_STATE: u32 = u32::MAX;

const START: u32 = 0;

/// Finds stop strings in a byte stream fed one token at a time.
///
/// Reporting rule: [`push`](Self::push) reports the occurrence that **ends first** in the
/// stream; among stop strings ending at the same byte the **longest** one wins (it began
/// earliest), and among equal strings listed twice the **first listed**. Empty stop strings
/// are rejected (an empty string would "occur" before any output, which no caller means).
///
/// ```
/// use sampler_sdk::text::StopMatcher;
///
/// let stops = vec!["\n\nUser:".to_string(), "</s>".to_string()];
/// let mut matcher = StopMatcher::new(&stops)?;
/// assert_eq!(matcher.push(b"Sure.\n"), None);
/// assert_eq!(matcher.push(b"\nUs"), None);
/// assert_eq!(matcher.push(b"er: hi"), Some(0)); // spans three tokens
/// # Ok::<(), sampler_sdk::EngineError>(())
/// ```
#[derive(Debug, Clone)]
pub struct StopMatcher {
    /// Byte value -> column in `transitions`.
    class_of_byte: [u16; 256],
    class_count: usize,
    /// `transitions[state * class_count + class]` is the state after reading a byte of `class`.
    transitions: Vec<u32>,
    /// Per state: the stop string to report when the input read so far ends in that state,
    /// i.e. the longest stop string that is a suffix of the state's trie path (`NO_MATCH` if
    /// none).
    match_at: Vec<u32>,
    stop_string_count: usize,
    state: u32,
}

impl StopMatcher {
    /// Compiles the automaton for `stop_strings`. An empty list gives a matcher that never
    /// matches. Errors (`InvalidArgument` naming `stop_strings`) for an empty string or more
    /// than [`MAX_STOP_STRING_BYTES`] bytes in total.
    pub fn new(stop_strings: &[String]) -> Result<StopMatcher> {
        let mut total_bytes = 0usize;
        for (index, stop) in stop_strings.iter().enumerate() {
            if stop.is_empty() {
                return Err(EngineError::invalid(
                    "stop_strings",
                    format!("stop string {index} is empty; an empty string cannot mark a stop"),
                ));
            }
            total_bytes = total_bytes.saturating_add(stop.len());
        }
        if total_bytes > MAX_STOP_STRING_BYTES {
            return Err(EngineError::invalid(
                "stop_strings",
                format!(
                    "stop strings total {total_bytes} bytes, more than the limit of \
                     {MAX_STOP_STRING_BYTES}"
                ),
            ));
        }

        let (class_of_byte, class_count) = byte_classes(stop_strings);
        let mut builder = Builder::new(class_count);
        for (index, stop) in stop_strings.iter().enumerate() {
            builder.insert(stop.as_bytes(), &class_of_byte, index);
        }
        let (transitions, match_at) = builder.into_dfa();
        Ok(StopMatcher {
            class_of_byte,
            class_count,
            transitions,
            match_at,
            stop_string_count: stop_strings.len(),
            state: START,
        })
    }

    /// Feeds the next token's bytes. Returns the index (into the `stop_strings` given to
    /// [`new`](Self::new)) of the stop string whose occurrence ends earliest within `bytes`,
    /// by the rule in the type's documentation, or `None` if none ends here.
    ///
    /// All of `bytes` is consumed even after a match, so the matcher keeps following the
    /// stream: a later push reports occurrences ending in its own bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut state = self.state as usize;
        let mut found = None;
        for &byte in bytes {
            let class = usize::from(self.class_of_byte[usize::from(byte)]);
            state = self.transitions[state * self.class_count + class] as usize;
            if found.is_none() {
                let stop = self.match_at[state];
                if stop != NO_MATCH {
                    found = Some(stop as usize);
                }
            }
        }
        // State numbers come from a table sized by a u32-bounded count, so this is lossless.
        self.state = state as u32;
        found
    }

    /// Forgets the bytes seen so far, as if the stream started anew.
    pub fn reset(&mut self) {
        self.state = START;
    }

    /// True when there are no stop strings (the matcher never matches).
    pub fn is_empty(&self) -> bool {
        self.stop_string_count == 0
    }

    /// The number of stop strings, counting repeats.
    pub fn len(&self) -> usize {
        self.stop_string_count
    }
}

/// Gives each byte value that occurs in some stop string its own class (numbered from 1 in
/// order of byte value) and every other byte class 0: bytes no stop string contains all act
/// alike, sending the automaton back to the start.
fn byte_classes(stop_strings: &[String]) -> ([u16; 256], usize) {
    let mut used = [false; 256];
    for stop in stop_strings {
        for &byte in stop.as_bytes() {
            used[usize::from(byte)] = true;
        }
    }
    let mut class_of_byte = [0u16; 256];
    let mut next_class = 1u16;
    for (byte, &is_used) in used.iter().enumerate() {
        if is_used {
            class_of_byte[byte] = next_class;
            next_class += 1;
        }
    }
    (class_of_byte, usize::from(next_class))
}

/// The trie of stop strings, turned into a DFA by [`Builder::into_dfa`].
struct Builder {
    class_count: usize,
    /// Same layout as `StopMatcher::transitions`; `NO_STATE` where the trie has no edge.
    transitions: Vec<u32>,
    /// Per state: the first listed stop string spelled exactly by the state's trie path.
    stop_ending_here: Vec<u32>,
}

impl Builder {
    fn new(class_count: usize) -> Self {
        let mut builder = Builder {
            class_count,
            transitions: Vec::new(),
            stop_ending_here: Vec::new(),
        };
        builder.add_state();
        builder
    }

    /// The caller bounds the total stop-string bytes, hence the state count (at most one
    /// state per byte, plus the start) and the table size, far below `u32::MAX`.
    fn add_state(&mut self) -> u32 {
        let id = self.stop_ending_here.len() as u32;
        self.transitions
            .resize(self.transitions.len() + self.class_count, NO_STATE);
        self.stop_ending_here.push(NO_MATCH);
        id
    }

    fn insert(&mut self, stop: &[u8], class_of_byte: &[u16; 256], index: usize) {
        let mut state = START;
        for &byte in stop {
            let slot =
                state as usize * self.class_count + usize::from(class_of_byte[usize::from(byte)]);
            state = match self.transitions[slot] {
                NO_STATE => {
                    let child = self.add_state();
                    self.transitions[slot] = child;
                    child
                }
                child => child,
            };
        }
        let ending = &mut self.stop_ending_here[state as usize];
        if *ending == NO_MATCH {
            // Index bounded by MAX_STOP_STRING_BYTES (every stop string has a byte).
            *ending = index as u32;
        }
    }

    /// Fills every missing edge with the edge of the state's failure link (the longest proper
    /// suffix of its path that is also a trie path), visiting states by depth so the failure
    /// state's row is complete before it is copied from.
    fn into_dfa(self) -> (Vec<u32>, Vec<u32>) {
        let Builder {
            class_count,
            mut transitions,
            stop_ending_here,
        } = self;
        let state_count = stop_ending_here.len();
        let mut failure = vec![START; state_count];
        let mut match_at = stop_ending_here.clone();
        let mut queue = std::collections::VecDeque::with_capacity(state_count);

        // The start state's missing edges loop back to it; its children fail to it.
        for edge in &mut transitions[..class_count] {
            if *edge == NO_STATE {
                *edge = START;
            } else {
                failure[*edge as usize] = START;
                queue.push_back(*edge);
            }
        }
        while let Some(state) = queue.pop_front() {
            let row = state as usize * class_count;
            let failure_row = failure[state as usize] as usize * class_count;
            for class in 0..class_count {
                let via_failure = transitions[failure_row + class];
                let child = transitions[row + class];
                if child == NO_STATE {
                    transitions[row + class] = via_failure;
                } else {
                    let child = child as usize;
                    failure[child] = via_failure;
                    // The child's own stop string, if any, is the longest suffix ending here;
                    // otherwise the best one ending at its failure state (already final,
                    // being shallower).
                    if stop_ending_here[child] == NO_MATCH {
                        match_at[child] = match_at[via_failure as usize];
                    }
                    queue.push_back(child as u32);
                }
            }
        }
        (transitions, match_at)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        StopMatcher::new(&stops).unwrap()
    }

    #[test]
    fn finds_a_string_inside_one_token() {
        let mut m = matcher(&["stop"]);
        assert_eq!(m.push(b"please stop now"), Some(0));
    }

    #[test]
    fn completed_by_the_first_byte_of_a_token() {
        let mut m = matcher(&["ab\n"]);
        assert_eq!(m.push(b"xab"), None);
        assert_eq!(m.push(b"\nmore text"), Some(0));
    }

    #[test]
    fn spans_many_tokens() {
        let mut m = matcher(&["abcdef"]);
        for part in [&b"xa"[..], b"b", b"", b"cd", b"e"] {
            assert_eq!(m.push(part), None);
        }
        assert_eq!(m.push(b"fg"), Some(0));
    }

    #[test]
    fn stop_string_that_is_a_prefix_of_another() {
        // "ab" ends first, so it is reported even though "abc" is listed first.
        let mut m = matcher(&["abc", "ab"]);
        assert_eq!(m.push(b"xa"), None);
        assert_eq!(m.push(b"bc"), Some(1));
        // The longer one alone is found once it completes.
        let mut m = matcher(&["abc", "abd"]);
        assert_eq!(m.push(b"ab"), None);
        assert_eq!(m.push(b"d"), Some(1));
    }

    #[test]
    fn equal_end_prefers_the_longest_then_the_first_listed() {
        let mut m = matcher(&["ab", "aab"]);
        assert_eq!(m.push(b"aab"), Some(1));
        let mut m = matcher(&["b", "ab", "ab"]);
        assert_eq!(m.push(b"ab"), Some(1));
    }

    #[test]
    fn overlapping_strings_found_after_a_failed_partial_match() {
        // "aab" must be found in "aaab": after "aaa" the automaton must keep "aa".
        let mut m = matcher(&["aab"]);
        assert_eq!(m.push(b"aa"), None);
        assert_eq!(m.push(b"a"), None);
        assert_eq!(m.push(b"b"), Some(0));
    }

    #[test]
    fn multi_byte_stop_string_split_inside_a_character() {
        // "世界" is E4 B8 96 E7 95 8C; tokens cut inside both characters.
        let mut m = matcher(&["世界"]);
        assert_eq!(m.push("你好".as_bytes()), None);
        assert_eq!(m.push(b"\xE4\xB8"), None);
        assert_eq!(m.push(b"\x96\xE7"), None);
        assert_eq!(m.push(b"\x95\x8C!"), Some(0));
    }

    #[test]
    fn earliest_end_wins_within_one_token() {
        let mut m = matcher(&["world", "lo"]);
        assert_eq!(m.push(b"hello world"), Some(1));
    }

    #[test]
    fn bytes_after_a_match_are_still_consumed() {
        let mut m = matcher(&["ab"]);
        assert_eq!(m.push(b"ab a"), Some(0));
        assert_eq!(m.push(b"b"), Some(0));
    }

    #[test]
    fn reset_forgets_a_partial_match() {
        let mut m = matcher(&["ab"]);
        assert_eq!(m.push(b"a"), None);
        m.reset();
        assert_eq!(m.push(b"b"), None);
    }

    #[test]
    fn no_stop_strings_never_match() {
        let mut m = matcher(&[]);
        assert!(m.is_empty());
        assert_eq!(m.len(), 0);
        assert_eq!(m.push(b"anything at all"), None);
    }

    #[test]
    fn every_byte_value_can_be_a_stop_byte() {
        let all: String = (0u8..128)
            .map(char::from)
            .chain(['\u{80}', '\u{10FFFF}'])
            .collect();
        let mut m = StopMatcher::new(&[all.clone(), "\u{ff}".to_string()]).unwrap();
        assert_eq!(m.push(all.as_bytes()), Some(0));
        assert_eq!(m.push(b"\xC3"), None);
        assert_eq!(m.push(b"\xBF"), Some(1));
    }

    #[test]
    fn empty_stop_string_is_rejected_by_name() {
        let error = StopMatcher::new(&["ok".to_string(), String::new()]).unwrap_err();
        match error {
            EngineError::InvalidArgument { param, message } => {
                assert_eq!(param, "stop_strings");
                assert!(message.contains("stop string 1 is empty"), "{message}");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn oversized_stop_strings_are_rejected() {
        let too_long = "x".repeat(MAX_STOP_STRING_BYTES + 1);
        let error = StopMatcher::new(&[too_long]).unwrap_err();
        assert!(
            matches!(error, EngineError::InvalidArgument { ref param, .. } if param == "stop_strings")
        );
        let at_limit = "x".repeat(MAX_STOP_STRING_BYTES);
        assert!(StopMatcher::new(&[at_limit]).is_ok());
    }
}
