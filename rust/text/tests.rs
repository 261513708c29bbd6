//! Property tests: for any token segmentation, streaming equals decoding or searching the
//! whole output at once.

use super::{StopMatcher, Utf8Stream};
use proptest::prelude::*;
use proptest::sample::Index;

/// Characters of 1 to 4 bytes, weighted so that texts repeat them (which makes stop strings
/// overlap), plus any char now and then.
fn text_char() -> impl Strategy<Value = char> {
    prop_oneof![
        6 => prop::sample::select(vec![
            'a', 'b', ' ', '\n', 'é', 'ß', '中', '文', '😀', '👍', '\u{10FFFF}',
        ]),
        1 => any::<char>(),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(text_char(), 0..40).prop_map(|chars| chars.into_iter().collect())
}

/// Bytes that make valid, truncated and invalid UTF-8 likely: ASCII, continuation bytes,
/// lead bytes (including ones with restricted second bytes: E0, ED, F0, F4) and never-valid
/// bytes.
fn stream_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => prop::sample::select(vec![
            b'a', b'b', 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC2, 0xC3, 0xE0, 0xE4,
            0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xFF,
        ]),
        1 => any::<u8>(),
    ]
}

fn byte_stream() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(stream_byte(), 0..40)
}

/// Cut points for splitting `len` bytes into segments; repeats give empty segments.
fn cuts() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..12)
}

/// Splits `bytes` at the cut points (taken modulo `len + 1`).
fn segment<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let points: Vec<usize> = cuts.iter().map(|cut| cut.index(bytes.len() + 1)).collect();
    split_at_points(bytes, points)
}

fn split_at_points(bytes: &[u8], mut points: Vec<usize>) -> Vec<&[u8]> {
    points.sort_unstable();
    let mut segments = Vec::with_capacity(points.len() + 1);
    let mut start = 0;
    for point in points.into_iter().chain([bytes.len()]) {
        segments.push(&bytes[start..point]);
        start = point;
    }
    segments
}

/// Short strings over a small alphabet, so they overlap each other ("aab", "ab", "b").
fn small_string() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!['a', 'b', 'é', '中', '😀']), 1..4)
        .prop_map(|chars| chars.into_iter().collect())
}

/// Non-empty substrings of `text` (on character boundaries) plus random short strings,
/// shuffled so a substring is not always listed first.
fn stop_set(text: String) -> impl Strategy<Value = (String, Vec<String>)> {
    let chars: Vec<char> = text.chars().collect();
    let substrings =
        prop::collection::vec((any::<Index>(), any::<Index>()), 0..3).prop_map(move |ranges| {
            if chars.is_empty() {
                return Vec::new();
            }
            ranges
                .iter()
                .map(|(a, b)| {
                    let (a, b) = (a.index(chars.len()), b.index(chars.len()));
                    chars[a.min(b)..=a.max(b)].iter().collect::<String>()
                })
                .collect::<Vec<String>>()
        });
    let random = prop::collection::vec(small_string(), 0..4);
    (substrings, random)
        .prop_flat_map(|(mut substrings, random)| {
            substrings.extend(random);
            Just(substrings).prop_shuffle()
        })
        .prop_map(move |stops| (text.clone(), stops))
}

/// Reference for one push: searching the whole stream, the stop string to report for
/// occurrences ending within `stream[start..end]`: earliest end, then longest, then first
/// listed.
fn reference_match(stream: &[u8], start: usize, end: usize, stops: &[String]) -> Option<usize> {
    for match_end in start + 1..=end {
        let prefix = &stream[..match_end];
        let mut best: Option<usize> = None;
        for (index, stop) in stops.iter().enumerate() {
            let longer = match best {
                None => true,
                Some(b) => stop.len() > stops[b].len(),
            };
            if longer && prefix.ends_with(stop.as_bytes()) {
                best = Some(index);
            }
        }
        if best.is_some() {
            return best;
        }
    }
    None
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn check_stop_matcher(segments: &[&[u8]], stops: &[String]) {
    let stream = segments.concat();
    let stream = stream.as_slice();
    let mut matcher = StopMatcher::new(stops).unwrap();
    let reported: Vec<Option<usize>> = segments.iter().map(|seg| matcher.push(seg)).collect();

    // What each push reports equals searching the whole stream for occurrences ending in it.
    let mut expected = Vec::with_capacity(segments.len());
    let mut start = 0;
    for seg in segments {
        expected.push(reference_match(stream, start, start + seg.len(), stops));
        start += seg.len();
    }
    assert_eq!(
        reported, expected,
        "segments {segments:x?}, stops {stops:?}"
    );

    // The SPEC property: the first push that reports is the first segment i whose prefix
    // (segments 0..=i) contains a stop string.
    let mut prefix = Vec::new();
    let first_containing = segments.iter().position(|seg| {
        prefix.extend_from_slice(seg);
        stops.iter().any(|stop| contains(&prefix, stop.as_bytes()))
    });
    let first_reported = reported.iter().position(Option::is_some);
    assert_eq!(
        first_reported, first_containing,
        "segments {segments:x?}, stops {stops:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn utf8_stream_of_valid_text_emits_each_char_with_the_token_that_completes_it(
        text in text(),
        cuts in cuts(),
    ) {
        let bytes = text.as_bytes();
        let mut stream = Utf8Stream::new();
        let mut start = 0;
        let mut joined = String::new();
        for seg in segment(bytes, &cuts) {
            let end = start + seg.len();
            let completed: String = text
                .char_indices()
                .filter(|&(offset, c)| {
                    let char_end = offset + c.len_utf8();
                    start < char_end && char_end <= end
                })
                .map(|(_, c)| c)
                .collect();
            let out = stream.push(seg);
            prop_assert_eq!(&out, &completed);
            joined.push_str(&out);
            start = end;
        }
        prop_assert_eq!(stream.finish(), "");
        prop_assert_eq!(joined, text);
    }

    #[test]
    fn utf8_stream_of_any_bytes_equals_lossy_decoding_and_holds_only_a_truncated_char(
        bytes in byte_stream(),
        cuts in cuts(),
    ) {
        let mut stream = Utf8Stream::new();
        let mut joined = String::new();
        let mut seen = 0;
        for seg in segment(&bytes, &cuts) {
            joined.push_str(&stream.push(seg));
            seen += seg.len();
            // Everything known is emitted: only a truncated character (which would decode
            // as one U+FFFD if the stream ended now) is held back.
            let pending = stream.pending();
            prop_assert!(pending.len() <= 3);
            prop_assert!(bytes[..seen].ends_with(pending));
            let mut if_ended_now = joined.clone();
            if !pending.is_empty() {
                if_ended_now.push(char::REPLACEMENT_CHARACTER);
            }
            prop_assert_eq!(if_ended_now, String::from_utf8_lossy(&bytes[..seen]));
        }
        joined.push_str(&stream.finish());
        prop_assert_eq!(joined, String::from_utf8_lossy(&bytes));
        prop_assert!(stream.pending().is_empty());
    }

    #[test]
    fn stop_matcher_on_text_equals_searching_every_prefix(
        (text, stops) in text().prop_flat_map(stop_set),
        cuts in cuts(),
    ) {
        check_stop_matcher(&segment(text.as_bytes(), &cuts), &stops);
    }

    #[test]
    fn stop_matcher_on_any_bytes_equals_searching_every_prefix(
        bytes in byte_stream(),
        stops in prop::collection::vec(small_string(), 0..5),
        cuts in cuts(),
    ) {
        check_stop_matcher(&segment(&bytes, &cuts), &stops);
    }

    #[test]
    fn stop_matcher_after_reset_behaves_as_new(
        (text, stops) in text().prop_flat_map(stop_set),
        noise in byte_stream(),
        cuts in cuts(),
    ) {
        let segments = segment(text.as_bytes(), &cuts);
        let mut fresh = StopMatcher::new(&stops).unwrap();
        let mut reused = StopMatcher::new(&stops).unwrap();
        reused.push(&noise);
        reused.reset();
        for seg in segments {
            prop_assert_eq!(reused.push(seg), fresh.push(seg));
        }
    }
}

#[test]
fn overlapping_stop_strings_aab_and_ab_under_every_split() {
    let stops = ["aab".to_string(), "ab".to_string()];
    let stream = b"aaab";
    for first in 0..=stream.len() {
        for second in first..=stream.len() {
            check_stop_matcher(&split_at_points(stream, vec![first, second]), &stops);
        }
    }
}
