//! SentencePiece's text normalizer: the precompiled character map (a Darts-clone double-array
//! trie over UTF-8 bytes whose values point at NUL-terminated replacement strings), then its
//! whitespace rules: drop leading, trailing and repeated spaces, add the dummy "▁" prefix (or
//! suffix), and write spaces as "▁". User-defined pieces bypass the character map, so they
//! reach the segmenter exactly as typed.

use crate::error::Result;

use super::proto::malformed;
use super::NormalizerSpec;

/// The space marker SentencePiece writes for ' ' (U+2581, LOWER ONE EIGHTH BLOCK).
pub(super) const SPACE_MARK: char = '\u{2581}';
const SPACE_MARK_STR: &str = "\u{2581}";

/// Longest-prefix matching over a set of strings (SentencePiece's `PrefixMatcher`, used for
/// user-defined pieces): a byte trie with sorted children.
#[derive(Debug, Clone, Default)]
pub(super) struct PrefixMatcher {
    /// (children sorted by byte, whether a string ends here); node 0 is the root.
    nodes: Vec<(Vec<(u8, u32)>, bool)>,
}

impl PrefixMatcher {
    pub fn new<'s>(strings: impl IntoIterator<Item = &'s str>) -> PrefixMatcher {
        let mut nodes: Vec<(Vec<(u8, u32)>, bool)> = vec![(Vec::new(), false)];
        for string in strings {
            if string.is_empty() {
                continue;
            }
            let mut node = 0usize;
            for &byte in string.as_bytes() {
                node = match nodes[node].0.binary_search_by_key(&byte, |&(b, _)| b) {
                    Ok(i) => nodes[node].0[i].1 as usize,
                    Err(i) => {
                        let child = nodes.len();
                        nodes[node].0.insert(i, (byte, child as u32));
                        nodes.push((Vec::new(), false));
                        child
                    }
                };
            }
            nodes[node].1 = true;
        }
        PrefixMatcher { nodes }
    }

    /// The byte length of the longest string that starts `text`, if any.
    pub fn longest_match(&self, text: &str) -> Option<usize> {
        let mut node = 0usize;
        let mut longest = None;
        for (i, &byte) in text.as_bytes().iter().enumerate() {
            let children = &self.nodes.get(node)?.0;
            match children.binary_search_by_key(&byte, |&(b, _)| b) {
                Ok(k) => node = children[k].1 as usize,
                Err(_) => break,
            }
            if self.nodes.get(node).is_some_and(|n| n.1) {
                longest = Some(i + 1);
            }
        }
        longest
    }

    /// SentencePiece's `PrefixMatch`: the longest string here that starts `text`, else one
    /// character; and whether it was a match.
    pub fn prefix_len(&self, text: &str) -> (usize, bool) {
        match self.longest_match(text) {
            Some(len) => (len, true),
            None => (text.chars().next().map_or(0, char::len_utf8), false),
        }
    }
}

/// The compiled character map: `<u32 trie size><trie units><replacement strings>`.
#[derive(Debug, Clone)]
struct CharsMap {
    units: Vec<u32>,
    /// NUL-terminated replacement strings; trie values are offsets into this.
    replacements: Vec<u8>,
}

/// SentencePiece keeps at most this many prefix matches per position and takes the longest.
const MAX_TRIE_RESULTS: usize = 32;

fn has_leaf(unit: u32) -> bool {
    (unit >> 8) & 1 == 1
}

fn value(unit: u32) -> u32 {
    unit & 0x7fff_ffff
}

/// A leaf unit (bit 31 set) has a label no byte can equal.
fn label(unit: u32) -> u32 {
    unit & 0x8000_00ff
}

fn offset(unit: u32) -> usize {
    ((unit >> 10) << ((unit & (1 << 9)) >> 6)) as usize
}

impl CharsMap {
    /// Parses and validates the blob with the checks `sentencepiece` 0.2.3 makes at load.
    fn parse(blob: &[u8], field: &str) -> Result<CharsMap> {
        let bad = |what: String| malformed(field, 0, format!("precompiled_charsmap: {what}"));
        if blob.len() <= 4 {
            return Err(bad(format!("{} bytes is too short", blob.len())));
        }
        let trie_size = u32::from_le_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
        if trie_size >= blob.len() - 4 {
            return Err(bad(format!(
                "trie of {trie_size} bytes does not fit the {}-byte blob",
                blob.len()
            )));
        }
        if trie_size < 1024 || !trie_size.is_multiple_of(1024) {
            return Err(bad(format!(
                "trie of {trie_size} bytes is not a positive multiple of 1024"
            )));
        }
        let units: Vec<u32> = blob[4..4 + trie_size]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let replacements = blob[4 + trie_size..].to_vec();
        if replacements.last() != Some(&0) {
            return Err(bad("replacement strings are not NUL-terminated".into()));
        }
        let map = CharsMap {
            units,
            replacements,
        };
        if !map.is_valid() {
            return Err(bad("the double-array trie is inconsistent".into()));
        }
        Ok(map)
    }

    /// Darts-clone's `validate`: every transition and leaf value stays inside the arrays, so
    /// lookups need no further checks (they are still bounds-checked).
    fn is_valid(&self) -> bool {
        let size = self.units.len();
        let Some(&root) = self.units.first() else {
            return false;
        };
        if label(root) != 0 || has_leaf(root) || offset(root) == 0 || (offset(root) | 0xff) >= size
        {
            return false;
        }
        self.units.iter().enumerate().skip(1).all(|(i, &unit)| {
            if label(unit) <= 0xff {
                let child = i ^ offset(unit);
                (child | 0xff) < size
                    && !(has_leaf(unit) && self.units.get(child).is_some_and(|&c| label(c) <= 0xff))
            } else {
                (value(unit) as usize) < self.replacements.len()
            }
        })
    }

    /// Darts-clone `commonPrefixSearch` keeping the first `MAX_TRIE_RESULTS` matches, of
    /// which the longest wins: (bytes matched, value).
    fn longest_prefix(&self, key: &[u8]) -> Option<(usize, u32)> {
        let mut node = offset(*self.units.first()?);
        let mut longest = None;
        let mut found = 0;
        for (i, &byte) in key.iter().enumerate() {
            node ^= usize::from(byte);
            let unit = *self.units.get(node)?;
            if label(unit) != u32::from(byte) {
                break;
            }
            node ^= offset(unit);
            if has_leaf(unit) {
                let leaf = *self.units.get(node)?;
                found += 1;
                if found > MAX_TRIE_RESULTS {
                    break;
                }
                longest = Some((i + 1, value(leaf)));
            }
        }
        longest
    }

    /// The NUL-terminated replacement at `value`, if it lies in the table and is UTF-8
    /// (validation guarantees the first; only a malformed file breaks the second).
    fn replacement(&self, value: u32) -> Option<&str> {
        let tail = self.replacements.get(value as usize..)?;
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).ok()
    }
}

#[derive(Debug, Clone)]
pub(super) struct Normalizer {
    charsmap: Option<CharsMap>,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    treat_whitespace_as_suffix: bool,
}

impl Normalizer {
    /// `field` names the spec in errors ("normalizer_spec" or "denormalizer_spec").
    pub fn new(
        spec: &NormalizerSpec,
        treat_whitespace_as_suffix: bool,
        field: &str,
    ) -> Result<Normalizer> {
        let charsmap = if spec.precompiled_charsmap.is_empty() {
            None
        } else {
            Some(CharsMap::parse(&spec.precompiled_charsmap, field)?)
        };
        Ok(Normalizer {
            charsmap,
            add_dummy_prefix: spec.add_dummy_prefix,
            remove_extra_whitespaces: spec.remove_extra_whitespaces,
            escape_whitespaces: spec.escape_whitespaces,
            treat_whitespace_as_suffix,
        })
    }

    /// The normalized form of the start of `input` and how many input bytes it covers.
    fn normalize_prefix<'a>(
        &'a self,
        input: &'a str,
        user_defined: Option<&PrefixMatcher>,
    ) -> (&'a str, usize) {
        if let Some(len) = user_defined.and_then(|m| m.longest_match(input)) {
            return (&input[..len], len);
        }
        let rule = self.charsmap.as_ref().and_then(|map| {
            let (len, value) = map.longest_prefix(input.as_bytes())?;
            Some((map.replacement(value)?, len))
        });
        if let Some((replacement, len)) = rule.filter(|&(_, len)| len <= input.len()) {
            return (replacement, len);
        }
        let len = input.chars().next().map_or(0, char::len_utf8);
        (&input[..len], len)
    }

    /// SentencePiece's `Normalizer::Normalize`.
    pub fn normalize(&self, input: &str, user_defined: Option<&PrefixMatcher>) -> String {
        let mut input = input;
        if self.remove_extra_whitespaces {
            while !input.is_empty() {
                let (piece, consumed) = self.normalize_prefix(input, user_defined);
                // Only a prefix that normalizes to exactly one space is dropped.
                if piece != " " || consumed == 0 {
                    break;
                }
                input = &input[consumed..];
            }
        }
        if input.is_empty() {
            return String::new();
        }

        let mut out = String::with_capacity(input.len() * 3);
        let space = if self.escape_whitespaces {
            SPACE_MARK_STR
        } else {
            " "
        };
        if !self.treat_whitespace_as_suffix && self.add_dummy_prefix {
            out.push_str(space);
        }
        let mut is_prev_space = self.remove_extra_whitespaces;
        while !input.is_empty() {
            let (mut piece, consumed) = self.normalize_prefix(input, user_defined);
            if is_prev_space {
                piece = piece.trim_start_matches(' ');
            }
            if !piece.is_empty() {
                for c in piece.chars() {
                    if c == ' ' {
                        out.push_str(space);
                    } else {
                        out.push(c);
                    }
                }
                is_prev_space = piece.ends_with(' ');
            }
            if consumed == 0 {
                break;
            }
            input = &input[consumed..];
            if !self.remove_extra_whitespaces {
                is_prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        if self.treat_whitespace_as_suffix && self.add_dummy_prefix {
            out.push_str(space);
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(super) mod tests {
    use super::*;

    fn spec(add_dummy_prefix: bool, remove_extra: bool, escape: bool) -> NormalizerSpec {
        NormalizerSpec {
            add_dummy_prefix,
            remove_extra_whitespaces: remove_extra,
            escape_whitespaces: escape,
            ..NormalizerSpec::default()
        }
    }

    fn normalize(spec: &NormalizerSpec, suffix: bool, text: &str) -> String {
        Normalizer::new(spec, suffix, "normalizer_spec")
            .unwrap()
            .normalize(text, None)
    }

    #[test]
    fn identity_keeps_every_space_and_adds_the_prefix() {
        let s = spec(true, false, true);
        assert_eq!(normalize(&s, false, " a  b "), "▁▁a▁▁b▁");
        assert_eq!(normalize(&s, false, ""), "");
        assert_eq!(normalize(&s, false, "x\ny"), "▁x\ny");
    }

    #[test]
    fn extra_whitespace_is_removed() {
        let s = spec(true, true, true);
        assert_eq!(normalize(&s, false, "  a   b  "), "▁a▁b");
        assert_eq!(normalize(&s, false, "   "), "");
        // Only U+0020 counts as whitespace here: the character map turns others into it.
        assert_eq!(normalize(&s, false, "a\t b"), "▁a\t▁b");
    }

    #[test]
    fn suffix_and_unescaped_spaces() {
        assert_eq!(normalize(&spec(true, false, true), true, "a b"), "a▁b▁");
        assert_eq!(normalize(&spec(false, false, false), false, "a b"), "a b");
        assert_eq!(normalize(&spec(true, true, false), false, " a  b "), " a b");
    }

    #[test]
    fn user_defined_pieces_skip_the_character_map() {
        let s = spec(true, false, true);
        let matcher = PrefixMatcher::new(["<sep>", "<s"]);
        let n = Normalizer::new(&s, false, "normalizer_spec").unwrap();
        assert_eq!(n.normalize("a<sep> b", Some(&matcher)), "▁a<sep>▁b");
        assert_eq!(matcher.prefix_len("<sep>x"), (5, true));
        assert_eq!(matcher.prefix_len("<sx"), (2, true));
        assert_eq!(matcher.prefix_len("éx"), (2, false));
        assert_eq!(matcher.prefix_len(""), (0, false));
    }

    /// A double array for the keys "A" -> "a" and "AB" -> "x y", laid out by hand:
    /// root at 0 with offset 64; 'A' (65) at 64^65 = 1; its children at 1^offset.
    pub(in crate::tokenizer::spm_model) fn tiny_charsmap() -> Vec<u8> {
        let unit = |label: u32, offset: u32, leaf: bool| -> u32 {
            // Offsets below 2^21 need no extension bit.
            (offset << 10) | (u32::from(leaf) << 8) | label
        };
        let mut units = vec![0u32; 256];
        units[0] = unit(0, 64, false);
        // Node for 'A' at 64 ^ 65 = 1, children based at 1 ^ 128 = 129.
        units[1] = unit(65, 128, true);
        // Leaf of 'A' at 129 ^ 0 = 129: value = offset of "a" in the strings (bit 31 marks
        // leaf units, so no label ever matches them).
        units[129] = 0x8000_0000;
        // 'B' (66) at 129 ^ 66 = 195, children at 195 ^ 2 = 193.
        units[195] = unit(66, 2, true);
        units[193] = 0x8000_0002; // value: offset of "x y"
        let mut blob = Vec::new();
        blob.extend_from_slice(&((units.len() * 4) as u32).to_le_bytes());
        for u in &units {
            blob.extend_from_slice(&u.to_le_bytes());
        }
        blob.extend_from_slice(b"a\0x y\0");
        blob
    }

    #[test]
    fn precompiled_charsmap_takes_the_longest_rule() {
        let s = NormalizerSpec {
            precompiled_charsmap: tiny_charsmap(),
            ..spec(true, false, true)
        };
        assert_eq!(normalize(&s, false, "AAB"), "▁ax▁y");
        assert_eq!(normalize(&s, false, "BA"), "▁Ba");
    }

    #[test]
    fn malformed_charsmaps_are_load_errors() {
        let short = NormalizerSpec {
            precompiled_charsmap: vec![1, 0, 0, 0],
            ..NormalizerSpec::default()
        };
        assert!(Normalizer::new(&short, false, "normalizer_spec").is_err());
        let oversized = NormalizerSpec {
            precompiled_charsmap: vec![0, 4, 0, 0, 1, 2, 3, 4],
            ..NormalizerSpec::default()
        };
        let err = Normalizer::new(&oversized, false, "normalizer_spec")
            .unwrap_err()
            .to_string();
        assert!(err.contains("normalizer_spec"), "{err}");
        // A trie whose transitions leave the array is rejected at load, as sentencepiece does.
        let mut blob = Vec::new();
        blob.extend_from_slice(&1024u32.to_le_bytes());
        blob.extend_from_slice(&0xffff_fe00u32.to_le_bytes());
        blob.extend_from_slice(&[0; 1020]);
        blob.extend_from_slice(b"a\0");
        let wild = NormalizerSpec {
            precompiled_charsmap: blob,
            ..spec(false, false, true)
        };
        let err = Normalizer::new(&wild, false, "normalizer_spec")
            .unwrap_err()
            .to_string();
        assert!(err.contains("inconsistent"), "{err}");
        // Replacement strings must end with NUL.
        let mut unterminated = tiny_charsmap();
        unterminated.pop();
        let spec = NormalizerSpec {
            precompiled_charsmap: unterminated,
            ..NormalizerSpec::default()
        };
        assert!(Normalizer::new(&spec, false, "normalizer_spec").is_err());
    }
}
