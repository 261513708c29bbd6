//! Incremental UTF-8 assembly for streamed tokens.
//!
//! A token's raw bytes need not end on a character boundary (byte-fallback tokens, byte-level
//! BPE merges that cut an emoji). [`Utf8Stream`] holds the bytes of a character that is not
//! finished yet and hands out text only in whole characters, so the token that completes a
//! character carries all of it and the tokens before it carry `""`.
//!
//! Invalid input is replaced exactly as [`String::from_utf8_lossy`] does (one U+FFFD per
//! "maximal subpart" of an ill-formed sequence, the Unicode/WHATWG rule), and as early as
//! possible: bytes are held only while they are still a prefix of some valid character. So
//! for any split of a byte string into pushes,
//! `pushes.concat() + finish() == String::from_utf8_lossy(bytes)`.

/// The longest prefix of a valid character that is not yet a character itself.
const MAX_INCOMPLETE: usize = 3;

/// Turns a stream of byte chunks into text, emitting each character once it is complete.
///
/// ```
/// use sampler_sdk::text::Utf8Stream;
///
/// // "é" is C3 A9: split over two tokens, the second one carries it.
/// let mut stream = Utf8Stream::new();
/// assert_eq!(stream.push(b"caf\xC3"), "caf");
/// assert_eq!(stream.pending(), b"\xC3");
/// assert_eq!(stream.push(b"\xA9!"), "\u{e9}!");
/// assert_eq!(stream.finish(), "");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Utf8Stream {
    incomplete: [u8; MAX_INCOMPLETE],
    incomplete_len: usize,
}

impl Utf8Stream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next chunk of bytes and returns the characters it completes: those begun in
    /// earlier chunks and finished here, and those wholly inside it. A trailing incomplete
    /// character is kept for the next push; invalid bytes come out as U+FFFD right away.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let mut text = String::with_capacity(bytes.len() + MAX_INCOMPLETE);
        if self.incomplete_len == 0 {
            self.decode_into(bytes, &mut text);
        } else {
            // The held bytes must be decoded together with the new ones: whether they form a
            // character, and how many U+FFFD they become if not, depends on what follows.
            let mut joined = Vec::with_capacity(self.incomplete_len + bytes.len());
            joined.extend_from_slice(self.pending());
            joined.extend_from_slice(bytes);
            self.incomplete_len = 0;
            self.decode_into(&joined, &mut text);
        }
        text
    }

    /// Ends the stream: a character left incomplete becomes one U+FFFD (as in
    /// `from_utf8_lossy`), never silently dropped. The stream is then empty and reusable.
    pub fn finish(&mut self) -> String {
        if self.incomplete_len == 0 {
            String::new()
        } else {
            self.incomplete_len = 0;
            String::from(char::REPLACEMENT_CHARACTER)
        }
    }

    /// The bytes held back because they begin a character that is not complete yet
    /// (at most 3).
    pub fn pending(&self) -> &[u8] {
        &self.incomplete[..self.incomplete_len]
    }

    /// Appends the decoded `bytes` to `text`, keeping a trailing incomplete character back.
    /// Expects nothing to be held on entry.
    fn decode_into(&mut self, bytes: &[u8], text: &mut String) {
        let mut chunks = bytes.utf8_chunks().peekable();
        while let Some(chunk) = chunks.next() {
            text.push_str(chunk.valid());
            let invalid = chunk.invalid();
            if invalid.is_empty() {
                continue;
            }
            // A chunk's invalid part is one maximal subpart. If it is the last thing in the
            // input and still a prefix of a valid character, more bytes may complete it;
            // otherwise it is known bad now and becomes U+FFFD.
            let at_end = chunks.peek().is_none();
            if at_end && invalid.len() <= MAX_INCOMPLETE && is_truncated_character(invalid) {
                self.incomplete[..invalid.len()].copy_from_slice(invalid);
                self.incomplete_len = invalid.len();
            } else {
                text.push(char::REPLACEMENT_CHARACTER);
            }
        }
    }
}

/// True when `bytes` is the beginning of a valid UTF-8 character that lacks its last
/// byte(s), as opposed to a sequence that no continuation can make valid.
fn is_truncated_character(bytes: &[u8]) -> bool {
    match std::str::from_utf8(bytes) {
        Ok(_) => false,
        Err(error) => error.valid_up_to() == 0 && error.error_len().is_none(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use super::*;

    fn pushes(chunks: &[&[u8]]) -> (Vec<String>, String) {
        let mut stream = Utf8Stream::new();
        let outputs = chunks.iter().map(|chunk| stream.push(chunk)).collect();
        (outputs, stream.finish())
    }

    #[test]
    fn ascii_passes_straight_through() {
        let (outputs, tail) = pushes(&[b"Hello", b", ", b"world"]);
        assert_eq!(outputs, ["Hello", ", ", "world"]);
        assert_eq!(tail, "");
    }

    #[test]
    fn character_split_across_three_tokens_is_emitted_by_the_last() {
        // U+1F600 (grinning face) is F0 9F 98 80.
        let (outputs, tail) = pushes(&[b"a\xF0", b"\x9F", b"\x98\x80b"]);
        assert_eq!(outputs, ["a", "", "\u{1F600}b"]);
        assert_eq!(tail, "");
    }

    #[test]
    fn cjk_character_split_one_byte_per_token() {
        // U+4E2D is E4 B8 AD.
        let mut stream = Utf8Stream::new();
        assert_eq!(stream.push(b"\xE4"), "");
        assert_eq!(stream.pending(), b"\xE4");
        assert_eq!(stream.push(b"\xB8"), "");
        assert_eq!(stream.pending(), b"\xE4\xB8");
        assert_eq!(stream.push(b"\xAD"), "\u{4E2D}");
        assert_eq!(stream.pending(), b"");
    }

    #[test]
    fn invalid_byte_is_replaced_immediately() {
        let mut stream = Utf8Stream::new();
        assert_eq!(stream.push(b"a\xFFb"), "a\u{FFFD}b");
        assert_eq!(stream.push(b"\x80"), "\u{FFFD}");
        assert_eq!(stream.pending(), b"");
    }

    #[test]
    fn held_bytes_broken_by_the_next_token_become_replacement_then_the_rest() {
        let mut stream = Utf8Stream::new();
        assert_eq!(stream.push(b"\xE2\x82"), "");
        // 'A' cannot continue E2 82: one U+FFFD for the maximal subpart, then 'A'.
        assert_eq!(stream.push(b"A"), "\u{FFFD}A");
        assert_eq!(stream.finish(), "");
    }

    #[test]
    fn bytes_that_can_never_start_a_character_are_not_held() {
        // C0 and F5..FF never begin a valid character; ED A0 would be a surrogate.
        let mut stream = Utf8Stream::new();
        assert_eq!(stream.push(b"\xC0"), "\u{FFFD}");
        assert_eq!(stream.push(b"\xF5"), "\u{FFFD}");
        assert_eq!(stream.push(b"\xED\xA0"), "\u{FFFD}\u{FFFD}");
        assert_eq!(stream.pending(), b"");
    }

    #[test]
    fn incomplete_tail_is_flushed_as_one_replacement() {
        let (outputs, tail) = pushes(&[b"ok\xF0\x9F\x98"]);
        assert_eq!(outputs, ["ok"]);
        assert_eq!(tail, "\u{FFFD}");
        assert_eq!(String::from_utf8_lossy(b"ok\xF0\x9F\x98"), "ok\u{FFFD}");
    }

    #[test]
    fn finish_resets_the_stream() {
        let mut stream = Utf8Stream::new();
        assert_eq!(stream.push(b"\xC3"), "");
        assert_eq!(stream.finish(), "\u{FFFD}");
        assert_eq!(stream.finish(), "");
        assert_eq!(stream.push(b"\xC3\xA9"), "\u{e9}");
    }

    #[test]
    fn empty_pushes_change_nothing() {
        let mut stream = Utf8Stream::new();
        assert_eq!(stream.push(b""), "");
        assert_eq!(stream.push(b"\xC3"), "");
        assert_eq!(stream.push(b""), "");
        assert_eq!(stream.pending(), b"\xC3");
        assert_eq!(stream.push(b"\xA9"), "\u{e9}");
    }

    #[test]
    fn matches_lossy_decoding_on_tricky_sequences() {
        let cases: &[&[u8]] = &[
            b"\xF0\x80\x80",     // overlong 4-byte start: each byte its own U+FFFD
            b"\xE0\x80\xAF",     // overlong 3-byte
            b"\xF4\x90\x80\x80", // above U+10FFFF
            b"\xED\xBF\xBF",     // surrogate
            b"\xF1\x80\x80\xE1\x80\xC2",
            b"\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64",
        ];
        for case in cases {
            for split in 0..=case.len() {
                let (head, tail) = case.split_at(split);
                let (outputs, end) = pushes(&[head, tail]);
                let joined = outputs.concat() + &end;
                assert_eq!(
                    joined,
                    String::from_utf8_lossy(case),
                    "{case:x?} split at {split}"
                );
            }
        }
    }
}
