//! Pre-tokenization for byte-level BPE: splitting text into words with the regexes llama.cpp
//! associates with each `tokenizer.ggml.pre` value, and GPT-2's byte-to-unicode mapping.
//!
//! llama.cpp applies a pre-tokenizer's regexes one after the other: each regex splits every
//! piece produced so far into its matches and the unmatched gaps between them (gaps are kept
//! as pieces too). It runs most regexes with `std::regex` over a "collapsed" copy of the text
//! in which every non-ASCII codepoint is replaced by one byte standing for its Unicode
//! category; running the same regexes with Unicode-aware fancy-regex gives the same words as
//! long as the regex only asks for the categories that collapsing preserves, which is why
//! `\p{Lu}`-style subcategories are rewritten to `\p{L}` (collapsing loses case) and the
//! pre-tokenizers whose regexes depend on `\d`, `\b` or `\p{S}` (whose collapsed ASCII range
//! omits `~`), on custom code in llama.cpp, or on long literal character ranges we could not
//! check character for character (deepseek-llm) are not offered.

use fancy_regex::Regex;

use crate::error::{EngineError, Result};

// GPT-2's regex without the trailing `|\s+`: a lone whitespace before a non-space is left as
// an unmatched gap, which becomes its own word anyway.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const PORO: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
const CONTRACTIONS: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";

/// How one `tokenizer.ggml.pre` value pre-tokenizes, as llama.cpp defines it.
#[derive(Debug, Clone)]
pub(crate) struct PreTokenizerSpec {
    regexes: Vec<String>,
    /// A word that is itself a vocabulary token is emitted whole, without running merges.
    pub ignore_merges: bool,
    /// llama.cpp's default for `add_bos` with this pre-tokenizer (the file may override it).
    pub default_add_bos: bool,
    /// llama.cpp clears the default BOS id for this pre-tokenizer (ChatGLM).
    pub no_default_bos: bool,
}

impl PreTokenizerSpec {
    fn new(regexes: &[&str]) -> Self {
        PreTokenizerSpec {
            regexes: regexes.iter().map(|r| r.to_string()).collect(),
            ignore_merges: false,
            default_add_bos: false,
            no_default_bos: false,
        }
    }

    fn ignoring_merges(mut self) -> Self {
        self.ignore_merges = true;
        self
    }

    fn adding_bos(mut self) -> Self {
        self.default_add_bos = true;
        self
    }

    /// The pre-tokenizer for a `tokenizer.ggml.pre` value (`None`: llama.cpp's "default").
    pub fn for_name(pre: Option<&str>) -> Result<PreTokenizerSpec> {
        let name = pre.unwrap_or("default");
        let spec = match name {
            "default" => PreTokenizerSpec::new(&[
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ]),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" | "jina-v5-nano" => {
                PreTokenizerSpec::new(&[LLAMA3]).ignoring_merges().adding_bos()
            }
            "dbrx" | "smaug-bpe" => PreTokenizerSpec::new(&[LLAMA3]),
            "jais-2" => PreTokenizerSpec::new(&[concat!(
                r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+",
                r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"
            )]),
            "deepseek-coder" => PreTokenizerSpec::new(&[
                "[\r\n]",
                r"\s?\p{L}+",
                r"\s?\p{P}+",
                r"[一-龥ࠀ-一가-퟿]+",
                r"\p{N}",
            ]),
            "youtu" => PreTokenizerSpec::new(&[
                r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
                &format!(
                    r"[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]*[\p{{L}}\p{{M}}]+{c}?|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]+[\p{{L}}\p{{M}}]*{c}?|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                    c = CONTRACTIONS
                ),
            ])
            .ignoring_merges(),
            "falcon" => PreTokenizerSpec::new(&[
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2,
                r"[0-9][0-9][0-9]",
            ]),
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone"
            | "minerva-7b" | "mellum2" => PreTokenizerSpec::new(&[r"\p{N}", GPT2]),
            "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
            | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code"
            | "roberta-bpe" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling"
            | "exaone4" => PreTokenizerSpec::new(&[GPT2]),
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2"
            | "hunyuan" | "solar-open" | "grok-2" => PreTokenizerSpec::new(&[QWEN2]),
            "qwen35" => PreTokenizerSpec::new(&[&format!(
                r"{CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]+|\p{{N}}| ?[^\s\p{{L}}\p{{M}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            )]),
            "poro-chat" | "bloom" | "gpt3-finnish" => PreTokenizerSpec::new(&[PORO]),
            "viking" => PreTokenizerSpec::new(&[PORO, r"\p{N}"]),
            "glm4" | "chatglm-bpe" => {
                let mut spec = PreTokenizerSpec::new(&[LLAMA3]);
                spec.no_default_bos = true;
                spec
            }
            "tekken" => PreTokenizerSpec::new(&[
                r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ])
            .ignoring_merges()
            .adding_bos(),
            "chameleon" => PreTokenizerSpec::new(&[
                r"<sentinel:[0-9]+>",
                r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                r"([\t\n]|    |  )",
                r"\p{N}",
                r"[\p{P}!-/:-@\[-`{-~]",
                GPT2,
            ])
            .adding_bos(),
            "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => PreTokenizerSpec::new(&[
                &format!(
                    r"[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}])([^a-z]))*((?=[\p{{L}}])([^A-Z]))+{c}?|[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}])([^a-z]))+((?=[\p{{L}}])([^A-Z]))*{c}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                    c = CONTRACTIONS
                ),
            ]),
            "granite-embed-multi-97m" => PreTokenizerSpec::new(&[&format!(
                r"[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}\p{{M}}])([^a-z]))*((?=[\p{{L}}\p{{M}}])([^A-Z]))+{c}?|[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}\p{{M}}])([^a-z]))+((?=[\p{{L}}\p{{M}}])([^A-Z]))*{c}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                c = CONTRACTIONS
            )])
            .ignoring_merges(),
            "bailingmoe" | "bailingmoe2" | "llada-moe" => PreTokenizerSpec::new(&[
                r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
            ]),
            "seed-coder" => PreTokenizerSpec::new(&[&format!(
                r"{CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1}}| ?[^\s\p{{L}}\p{{N}}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
            )]),
            "ufakzeka" => PreTokenizerSpec::new(&[
                r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ]),
            "laguna" => PreTokenizerSpec::new(&[r"[^\n]+|[\n]+", QWEN2]),
            "exaone-moe" => PreTokenizerSpec::new(&[&format!(
                r"{CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?(?:\p{{L}}\p{{M}}*(?: \p{{L}}\p{{M}}*)*)+|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
            )]),
            "minicpm5" => PreTokenizerSpec::new(&[
                r"\p{N}{1,3}",
                &format!(
                    r"{CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}+| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                ),
            ])
            .ignoring_merges(),
            other => {
                return Err(EngineError::unsupported(
                    "pre-tokenizer",
                    format!("tokenizer.ggml.pre = '{other}' is not implemented"),
                ))
            }
        };
        Ok(spec)
    }
}

/// The compiled regexes of one pre-tokenizer.
#[derive(Debug)]
pub(crate) struct PreTokenizer {
    regexes: Vec<Regex>,
}

impl PreTokenizer {
    pub fn new(spec: &PreTokenizerSpec) -> Result<PreTokenizer> {
        let regexes = spec
            .regexes
            .iter()
            .map(|pattern| {
                Regex::new(pattern).map_err(|e| {
                    EngineError::Internal(format!("pre-tokenizer regex {pattern:?}: {e}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PreTokenizer { regexes })
    }

    /// Splits `text` into words; concatenating them gives back `text`.
    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        let mut next = Vec::new();
        for regex in &self.regexes {
            next.clear();
            for &piece in &pieces {
                split_one(regex, piece, &mut next);
            }
            std::mem::swap(&mut pieces, &mut next);
        }
        pieces.retain(|p| !p.is_empty());
        pieces
    }
}

fn split_one<'t>(regex: &Regex, piece: &'t str, out: &mut Vec<&'t str>) {
    let mut last_end = 0;
    for found in regex.find_iter(piece) {
        let found = match found {
            Ok(m) => m,
            Err(e) => {
                // Only the backtracking limit can fail here; keep the rest of the piece whole
                // rather than lose text.
                log::warn!(
                    "pre-tokenizer regex gave up on a {}-byte piece: {e}",
                    piece.len()
                );
                break;
            }
        };
        if found.start() > last_end {
            out.push(&piece[last_end..found.start()]);
        }
        if found.end() > found.start() {
            out.push(found.as_str());
        }
        last_end = found.end();
    }
    if last_end < piece.len() {
        out.push(&piece[last_end..]);
    }
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100.. in byte order.
const BYTE_TO_CHAR: [char; 256] = build_byte_to_char();

const fn is_printable_latin1(byte: u32) -> bool {
    (byte >= 0x21 && byte <= 0x7E)
        || (byte >= 0xA1 && byte <= 0xAC)
        || (byte >= 0xAE && byte <= 0xFF)
}

const fn build_byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_extra = 0x100u32;
    let mut byte = 0u32;
    while byte < 256 {
        let code = if is_printable_latin1(byte) {
            byte
        } else {
            next_extra += 1;
            next_extra - 1
        };
        table[byte as usize] = match char::from_u32(code) {
            Some(c) => c,
            None => '\0',
        };
        byte += 1;
    }
    table
}

pub(crate) fn byte_level_char(byte: u8) -> char {
    BYTE_TO_CHAR[usize::from(byte)]
}

/// Appends `text`'s bytes as GPT-2 byte-level characters.
pub(crate) fn byte_level_encode(text: &str, out: &mut String) {
    out.reserve(text.len() * 2);
    out.extend(text.bytes().map(byte_level_char));
}

/// The byte a GPT-2 byte-level character stands for.
pub(crate) fn byte_level_decode(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 0x100 {
        return if is_printable_latin1(code) {
            u8::try_from(code).ok()
        } else {
            None
        };
    }
    let index = usize::try_from(code - 0x100).ok()?;
    NON_PRINTABLE_BYTES.get(index).copied()
}

/// The 68 bytes without a printable Latin-1 character, in byte order: U+0100 + n stands for
/// the n-th of them.
const NON_PRINTABLE_BYTES: [u8; 68] = build_non_printable_bytes();

const fn build_non_printable_bytes() -> [u8; 68] {
    let mut table = [0u8; 68];
    let mut n = 0;
    let mut byte = 0u32;
    while byte < 256 {
        if !is_printable_latin1(byte) && n < 68 {
            table[n] = byte as u8;
            n += 1;
        }
        byte += 1;
    }
    table
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn words(pre: &str, text: &str) -> Vec<String> {
        let spec = PreTokenizerSpec::for_name(Some(pre)).unwrap();
        PreTokenizer::new(&spec)
            .unwrap()
            .split(text)
            .into_iter()
            .map(String::from)
            .collect()
    }

    #[test]
    fn byte_map_round_trips_every_byte() {
        for b in 0..=255u8 {
            assert_eq!(byte_level_decode(BYTE_TO_CHAR[usize::from(b)]), Some(b));
        }
        assert_eq!(BYTE_TO_CHAR[usize::from(b' ')], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[usize::from(b'\n')], 'Ċ');
        assert_eq!(BYTE_TO_CHAR[usize::from(b'A')], 'A');
        assert_eq!(byte_level_decode('\u{2581}'), None);
    }

    #[test]
    fn every_listed_pre_tokenizer_compiles() {
        for name in [
            "default",
            "llama3",
            "dbrx",
            "jais-2",
            "deepseek-coder",
            "youtu",
            "falcon",
            "smollm",
            "gpt-2",
            "qwen2",
            "qwen35",
            "poro-chat",
            "viking",
            "glm4",
            "tekken",
            "chameleon",
            "gpt-4o",
            "granite-embed-multi-97m",
            "bailingmoe",
            "seed-coder",
            "ufakzeka",
            "laguna",
            "exaone-moe",
            "minicpm5",
        ] {
            let spec = PreTokenizerSpec::for_name(Some(name)).unwrap();
            PreTokenizer::new(&spec).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn unknown_pre_tokenizer_is_unsupported_and_named() {
        let err = PreTokenizerSpec::for_name(Some("kimi-k2")).unwrap_err();
        assert!(matches!(err, EngineError::Unsupported { .. }));
        assert!(err.to_string().contains("kimi-k2"));
    }

    #[test]
    fn gpt2_words() {
        assert_eq!(words("gpt-2", "Hello world"), ["Hello", " world"]);
        assert_eq!(
            words("gpt-2", "I'm  here!!\n\nok"),
            ["I", "'m", " ", " here", "!!", "\n", "\n", "ok"]
        );
        assert_eq!(words("gpt-2", "a   "), ["a", "   "]);
        assert_eq!(words("gpt-2", "x\ty"), ["x", "\t", "y"]);
    }

    #[test]
    fn smollm_splits_each_digit() {
        assert_eq!(
            words("smollm", "in 2024!"),
            ["in", " ", "2", "0", "2", "4", "!"]
        );
    }

    #[test]
    fn llama3_groups_digits_by_three_and_newlines() {
        assert_eq!(
            words("llama3", "12345 ab\n\n  c"),
            ["123", "45", " ab", "\n\n", " ", " c"]
        );
        assert_eq!(words("llama3", "DON'T"), ["DON", "'T"]);
    }

    #[test]
    fn concatenated_words_give_back_the_text() {
        let text = "Ünïcödé  text 😀 with 123,456 and\t\ttabs\r\n<|im_start|> ok";
        for name in [
            "default",
            "llama3",
            "smollm",
            "qwen2",
            "gpt-4o",
            "deepseek-coder",
            "chameleon",
        ] {
            assert_eq!(words(name, text).concat(), text, "{name}");
        }
    }

    /// Compares word splits with reference files `$TOKENIZER_REFERENCE_DIR/pre_{name}.txt`,
    /// one line per text: hex of the text, a tab, the hex of each word separated by spaces.
    #[test]
    #[ignore = "needs TOKENIZER_REFERENCE_DIR with reference split files"]
    fn matches_reference_split_files() {
        let Ok(dir) = std::env::var("TOKENIZER_REFERENCE_DIR") else {
            return;
        };
        let unhex = |hex: &str| -> String {
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            String::from_utf8(bytes).unwrap()
        };
        let mut failures = 0;
        for name in ["llama3", "qwen2", "gpt-2"] {
            let Ok(content) = std::fs::read_to_string(format!("{dir}/pre_{name}.txt")) else {
                continue;
            };
            let spec = PreTokenizerSpec::for_name(Some(name)).unwrap();
            let pre_tokenizer = PreTokenizer::new(&spec).unwrap();
            for line in content.lines() {
                let (text, expected) = line.split_once('\t').unwrap();
                let text = unhex(text);
                let expected: Vec<String> = expected.split_whitespace().map(unhex).collect();
                let got = pre_tokenizer.split(&text);
                if got != expected {
                    failures += 1;
                    eprintln!("{name}: {text:?}\n  expected {expected:?}\n  got      {got:?}");
                }
            }
        }
        assert_eq!(failures, 0);
    }
}
