//! `.model` parsing and SentencePiece encoding on hand-built models (every expectation worked
//! out from SentencePiece's algorithm by hand), malformed files, and the Grok-1 tokenizer
//! when `../shared/data/grok-1-tokenizer.model` is present (ids from `sentencepiece` 0.2.3).
//! Parity with the `sentencepiece` package on trained models and a large corpus is tested
//! from Python (tests/test_spm_model.py).

use std::path::PathBuf;

use proptest::prelude::*;

use super::proto::write;
use super::*;

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

const UNIGRAM: u64 = 1;
const BPE: u64 = 2;
const WORD: u64 = 3;
const CHAR: u64 = 4;

/// A `.model` file: `pieces` as (text, score, type), then the trainer and normalizer specs
/// (already-encoded message bodies).
fn model_bytes(pieces: &[(&str, f32, i32)], trainer: &[u8], normalizer: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(text, score, kind) in pieces {
        let mut piece = Vec::new();
        write::bytes(&mut piece, 1, text.as_bytes());
        write::float(&mut piece, 2, score);
        if kind != NORMAL {
            write::int32(&mut piece, 3, kind);
        }
        write::bytes(&mut out, 1, &piece);
    }
    write::bytes(&mut out, 2, trainer);
    write::bytes(&mut out, 3, normalizer);
    out
}

fn trainer(model_type: u64, byte_fallback: bool) -> Vec<u8> {
    let mut t = Vec::new();
    write::uint(&mut t, 3, model_type);
    write::uint(&mut t, 35, u64::from(byte_fallback));
    t
}

/// Grok-1's normalizer: identity, keep spaces, add the dummy prefix.
fn identity_normalizer() -> Vec<u8> {
    let mut n = Vec::new();
    write::bytes(&mut n, 1, b"identity");
    write::uint(&mut n, 3, 1);
    write::uint(&mut n, 4, 0);
    n
}

fn specials() -> Vec<(&'static str, f32, i32)> {
    vec![
        ("<unk>", 0.0, UNKNOWN),
        ("<s>", 0.0, CONTROL),
        ("</s>", 0.0, CONTROL),
    ]
}

fn byte_pieces() -> Vec<(String, f32, i32)> {
    (0..=255u8)
        .map(|b| (format!("<0x{b:02X}>"), 0.0, BYTE))
        .collect()
}

fn tokenizer(pieces: &[(&str, f32, i32)], trainer: &[u8], normalizer: &[u8]) -> Tokenizer {
    Tokenizer::from_sentencepiece_bytes(&model_bytes(pieces, trainer, normalizer)).unwrap()
}

fn ids(tok: &Tokenizer, pieces: &[&str]) -> Vec<u32> {
    pieces
        .iter()
        .map(|p| tok.token_id(p).unwrap_or_else(|| panic!("no piece {p:?}")))
        .collect()
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> String {
    String::from_utf8(tok.decode(ids, false)).unwrap()
}

#[test]
fn parses_pieces_and_specs() {
    let mut t = trainer(BPE, false);
    write::int32(&mut t, 43, -1);
    write::bytes(&mut t, 44, b"[UNK]");
    write::uint(&mut t, 24, 1);
    let bytes = model_bytes(
        &[("<unk>", 0.0, UNKNOWN), ("▁x", -1.5, NORMAL)],
        &t,
        &identity_normalizer(),
    );
    let model = ModelProto::parse(&bytes).unwrap();
    assert_eq!(
        model.pieces,
        [
            Piece {
                text: "<unk>".into(),
                score: 0.0,
                kind: PieceType::Unknown
            },
            Piece {
                text: "▁x".into(),
                score: -1.5,
                kind: PieceType::Normal
            },
        ]
    );
    assert_eq!(model.trainer_spec.model_type, ModelType::Bpe);
    assert_eq!(model.trainer_spec.pad_id, -1);
    assert_eq!(model.trainer_spec.unk_surface.as_deref(), Some("[UNK]"));
    assert!(model.trainer_spec.treat_whitespace_as_suffix);
    assert_eq!(model.trainer_spec.bos_piece, "<s>");
    assert_eq!(model.normalizer_spec.name, "identity");
    assert!(model.normalizer_spec.add_dummy_prefix);
    assert!(!model.normalizer_spec.remove_extra_whitespaces);
    assert!(model.normalizer_spec.escape_whitespaces);
    assert_eq!(model.denormalizer_spec, None);
}

#[test]
fn unknown_fields_are_skipped_and_unknown_enums_keep_defaults() {
    let mut t = trainer(9, false);
    write::bytes(&mut t, 1, b"input.txt");
    write::float(&mut t, 10, 0.9995);
    let mut bytes = model_bytes(&[("<unk>", 0.0, UNKNOWN), ("a", 0.0, 42)], &t, &[]);
    // self_test_data and an extension field.
    write::bytes(&mut bytes, 4, b"");
    write::uint(&mut bytes, 200, 7);
    let model = ModelProto::parse(&bytes).unwrap();
    assert_eq!(model.trainer_spec.model_type, ModelType::Unigram);
    assert_eq!(model.pieces[1].kind, PieceType::Normal);
    assert!(model.normalizer_spec.remove_extra_whitespaces);
}

#[test]
fn validation_follows_sentencepiece_load_checks() {
    let err = |pieces: &[(&str, f32, i32)], byte_fallback: bool| {
        Tokenizer::from_sentencepiece_bytes(&model_bytes(pieces, &trainer(BPE, byte_fallback), &[]))
            .unwrap_err()
            .to_string()
    };
    assert!(err(&[("a", 0.0, NORMAL)], false).contains("UNKNOWN"));
    assert!(
        err(&[("<unk>", 0.0, UNKNOWN), ("<u2>", 0.0, UNKNOWN)], false).contains("second unknown")
    );
    assert!(err(&[("<unk>", 0.0, UNKNOWN), ("", 0.0, NORMAL)], false).contains("pieces[1]"));
    assert!(
        err(&[("<unk>", 0.0, UNKNOWN), ("<0x41>", 0.0, BYTE)], false)
            .contains("byte_fallback is false")
    );
    assert!(err(&[("<unk>", 0.0, UNKNOWN), ("<0x4g>", 0.0, BYTE)], true).contains("<0xNN>"));
    assert!(err(&[("<unk>", 0.0, UNKNOWN), ("<0x41>", 0.0, BYTE)], true).contains("<0x00>"));
    assert!(err(
        &[
            ("<unk>", 0.0, UNKNOWN),
            ("a", 0.0, NORMAL),
            ("a", 0.0, NORMAL)
        ],
        false
    )
    .contains("duplicate"));
    assert!(err(&[], false).contains("no pieces"));
    let not_a_model = Tokenizer::from_sentencepiece_bytes(b"GGUF\x03\x00\x00\x00").unwrap_err();
    assert!(
        not_a_model.to_string().contains("SentencePiece model"),
        "{not_a_model}"
    );
}

#[test]
fn missing_file_is_file_not_found() {
    let err = Tokenizer::from_sentencepiece_file(std::path::Path::new("/nonexistent/x.model"))
        .unwrap_err();
    assert!(matches!(err, EngineError::FileNotFound { .. }), "{err}");
}

fn bpe_pieces() -> Vec<(&'static str, f32, i32)> {
    let mut p = specials();
    p.extend([
        ("▁", -10.0, NORMAL),
        ("a", -11.0, NORMAL),
        ("b", -12.0, NORMAL),
        ("c", -13.0, NORMAL),
        ("ab", -1.0, NORMAL),
        ("▁ab", -2.0, NORMAL),
        ("abc", -3.0, NORMAL),
        ("▁abc", -4.0, NORMAL),
        ("x", -14.0, NORMAL),
        ("xy", -0.5, UNUSED),
        ("▁xy", -0.6, NORMAL),
        ("y", -15.0, NORMAL),
        ("<sep>", 0.0, USER),
        ("bc", 0.0, USER),
    ]);
    p
}

#[test]
fn bpe_merges_best_score_first_then_leftmost() {
    let tok = tokenizer(&bpe_pieces(), &trainer(BPE, false), &identity_normalizer());
    // "▁abc▁ab": ab, ab (leftmost first), then ▁ab, ▁ab, then ▁abc; "abc" went stale.
    // But "bc" is user-defined, so "abc" here is ▁ a [bc] and never merges into "abc".
    assert_eq!(
        tok.encode("abc ab", false, false),
        ids(&tok, &["▁", "a", "bc", "▁ab"])
    );
    assert_eq!(
        tok.encode("ab ab", false, false),
        ids(&tok, &["▁ab", "▁ab"])
    );
    // No BOS/EOS even with add_special: sentencepiece's encode adds none.
    assert_eq!(tok.encode("ab", true, false), ids(&tok, &["▁ab"]));
    assert_eq!(tok.encode("", false, false), Vec::<u32>::new());
}

#[test]
fn bpe_splits_unused_pieces_back() {
    let tok = tokenizer(&bpe_pieces(), &trainer(BPE, false), &identity_normalizer());
    // "▁xy": xy (unused) merges first, then ▁xy absorbs it.
    assert_eq!(tok.encode("xy", false, false), ids(&tok, &["▁xy"]));
    // "▁axy": xy merges but nothing absorbs it, so it is split back into x, y.
    assert_eq!(
        tok.encode("axy", false, false),
        ids(&tok, &["▁", "a", "x", "y"])
    );
}

#[test]
fn user_defined_pieces_are_matched_while_normalizing() {
    let tok = tokenizer(&bpe_pieces(), &trainer(BPE, false), &identity_normalizer());
    assert_eq!(
        tok.encode("a<sep>ab", false, false),
        ids(&tok, &["▁", "a", "<sep>", "ab"])
    );
    // Control text is ordinary text (unknown characters merge into one <unk>) ...
    let unk = tok.unk().unwrap();
    let s_ids = tok.encode("<s>", false, false);
    assert_eq!(s_ids, vec![tok.token_id("▁").unwrap(), unk]);
    // ... unless parse_special asks for it, as llama.cpp does.
    assert_eq!(
        tok.encode("<s>ab", false, true),
        vec![tok.bos().unwrap(), tok.token_id("▁ab").unwrap()]
    );
}

#[test]
fn unknown_runs_merge_without_byte_fallback_and_become_bytes_with_it() {
    let tok = tokenizer(&bpe_pieces(), &trainer(BPE, false), &identity_normalizer());
    let unk = tok.unk().unwrap();
    assert_eq!(
        tok.encode("ab zz", false, false),
        vec![
            tok.token_id("▁ab").unwrap(),
            tok.token_id("▁").unwrap(),
            unk
        ]
    );

    let mut pieces: Vec<(String, f32, i32)> = bpe_pieces()
        .iter()
        .map(|&(t, s, k)| (t.to_string(), s, k))
        .collect();
    pieces.extend(byte_pieces());
    let pieces: Vec<(&str, f32, i32)> = pieces
        .iter()
        .map(|(t, s, k)| (t.as_str(), *s, *k))
        .collect();
    let tok = tokenizer(&pieces, &trainer(BPE, true), &identity_normalizer());
    assert_eq!(
        tok.encode("ab zé", false, false),
        ids(&tok, &["▁ab", "▁", "<0x7A>", "<0xC3>", "<0xA9>"])
    );
}

fn unigram_pieces() -> Vec<(&'static str, f32, i32)> {
    let mut p = specials();
    p.extend([
        ("▁", -2.0, NORMAL),
        ("a", -3.0, NORMAL),
        ("b", -3.0, NORMAL),
        ("ab", -4.0, NORMAL),
        ("▁a", -2.5, NORMAL),
        ("▁ab", -7.0, NORMAL),
        ("x", -1.0, UNUSED),
        ("bc", 0.0, USER),
    ]);
    p
}

#[test]
fn unigram_finds_the_best_scoring_segmentation() {
    let tok = tokenizer(
        &unigram_pieces(),
        &trainer(UNIGRAM, false),
        &identity_normalizer(),
    );
    // ▁a+b = -5.5 beats ▁+ab = -6, ▁ab = -7 and ▁+a+b = -8.
    assert_eq!(tok.encode("ab", false, false), ids(&tok, &["▁a", "b"]));
    // Unknown characters are one node each, merged into one <unk>; unused pieces never appear.
    let unk = tok.unk().unwrap();
    let mut expected = ids(&tok, &["▁a", "b"]);
    expected.push(unk);
    assert_eq!(tok.encode("abxx", false, false), expected);
    // A user-defined piece scores 0.1 * (bytes - 1) and wins over b + unknown c.
    assert_eq!(tok.encode("abc", false, false), ids(&tok, &["▁a", "bc"]));
}

#[test]
fn unigram_ties_keep_the_first_path_found() {
    let mut p = specials();
    p.extend([
        ("▁", -1.0, NORMAL),
        ("a", -1.0, NORMAL),
        ("▁a", -2.0, NORMAL),
    ]);
    let tok = tokenizer(&p, &trainer(UNIGRAM, false), &identity_normalizer());
    // ▁a and ▁+a both score -2; ▁a reaches the end first (from position 0) and a later path
    // must score strictly higher to replace it (checked against sentencepiece).
    assert_eq!(tok.encode("a", false, false), ids(&tok, &["▁a"]));
    assert_eq!(tok.encode("aa", false, false), ids(&tok, &["▁a", "a"]));
}

#[test]
fn unigram_sums_scores_in_f32_as_the_released_library_does() {
    // Scores from a model trained on a corpus containing "Ж" * 50. Every arrangement of three
    // Ж16 and two Ж scores the same up to rounding; which one wins depends on f32 rounding of
    // the running sums (expected ids from sentencepiece 0.2.3; f64 sums pick another).
    for (space_score, expected) in [
        (-3.0f32, ["▁", "Ж", "Ж", "Ж16", "Ж16", "Ж16"]),
        (-2.686_784_3, ["▁", "Ж", "Ж16", "Ж", "Ж16", "Ж16"]),
    ] {
        let long = "Ж".repeat(16);
        let p = [
            ("<unk>", 0.0, UNKNOWN),
            ("▁", space_score, NORMAL),
            ("Ж", -10.645_881, NORMAL),
            (long.as_str(), -9.145_91, NORMAL),
        ];
        let tok = tokenizer(&p, &trainer(UNIGRAM, false), &identity_normalizer());
        let expected: Vec<&str> = expected
            .iter()
            .map(|&e| if e == "Ж16" { long.as_str() } else { e })
            .collect();
        assert_eq!(
            tok.encode(&"Ж".repeat(50), false, false),
            ids(&tok, &expected)
        );
    }
}

#[test]
fn reserved_pieces_are_never_segments() {
    // "q" is a control piece and "<0x71>" the byte piece for 'q': a segment spelled like a
    // reserved piece is unknown, so it becomes its bytes (checked against sentencepiece; the
    // word model's unknown word "▁qa" keeps its "▁" as bytes, which decode as "▁").
    let mut pieces: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, UNKNOWN),
        ("q".into(), 0.0, CONTROL),
        ("▁".into(), -1.0, NORMAL),
        ("a".into(), -1.0, NORMAL),
    ];
    pieces.extend(byte_pieces());
    let pieces: Vec<(&str, f32, i32)> = pieces
        .iter()
        .map(|(t, s, k)| (t.as_str(), *s, *k))
        .collect();
    for model_type in [UNIGRAM, BPE, WORD, CHAR] {
        let tok = tokenizer(&pieces, &trainer(model_type, true), &identity_normalizer());
        let ids = tok.encode("qa", false, false);
        assert!(!ids.contains(&1), "model type {model_type}: {ids:?}");
        let expected = if model_type == WORD { "▁qa" } else { "qa" };
        assert_eq!(decode(&tok, &ids), expected, "model type {model_type}");
    }
}

#[test]
fn byte_fallback_models_may_lack_an_unknown_piece() {
    let mut pieces: Vec<(String, f32, i32)> =
        vec![("▁".into(), -1.0, NORMAL), ("a".into(), -1.0, NORMAL)];
    pieces.extend(byte_pieces());
    let pieces: Vec<(&str, f32, i32)> = pieces
        .iter()
        .map(|(t, s, k)| (t.as_str(), *s, *k))
        .collect();
    for model_type in [UNIGRAM, BPE] {
        let tok = tokenizer(&pieces, &trainer(model_type, true), &identity_normalizer());
        assert_eq!(tok.unk(), None);
        assert_eq!(
            tok.encode("ab", false, false),
            ids(&tok, &["▁", "a", "<0x62>"])
        );
    }
}

#[test]
fn unused_words_and_characters_are_unknown() {
    let mut p = specials();
    p.extend([("▁ab", 0.0, UNUSED), ("▁", 0.0, NORMAL), ("a", 0.0, UNUSED)]);
    let unk = 0;
    let word = tokenizer(&p, &trainer(WORD, false), &identity_normalizer());
    assert_eq!(word.encode("ab", false, false), vec![unk]);
    let chars = tokenizer(&p, &trainer(CHAR, false), &identity_normalizer());
    assert_eq!(chars.encode("a", false, false), vec![4, unk]);
}

#[test]
fn load_checks_of_sentencepiece_0_2_3() {
    let err = |pieces: &[(&str, f32, i32)], model_type: u64, byte_fallback: bool| {
        Tokenizer::from_sentencepiece_bytes(&model_bytes(
            pieces,
            &trainer(model_type, byte_fallback),
            &[],
        ))
        .unwrap_err()
        .to_string()
    };
    let long = "x".repeat(8000);
    assert!(err(&[("<unk>", 0.0, UNKNOWN), (&long, 0.0, NORMAL)], BPE, false).contains("too long"));
    assert!(err(
        &[("<unk>", 0.0, UNKNOWN), ("a\0b", 0.0, NORMAL)],
        BPE,
        false
    )
    .contains("NUL"));
    assert!(err(
        &[("<unk>", 0.0, UNKNOWN), ("a", f32::NAN, NORMAL)],
        UNIGRAM,
        false
    )
    .contains("finite"));
    // BPE ignores scores it never compares; a NaN score just sorts by its bits.
    let ok = model_bytes(
        &[("<unk>", 0.0, UNKNOWN), ("a", f32::INFINITY, NORMAL)],
        &trainer(BPE, false),
        &[],
    );
    assert!(Tokenizer::from_sentencepiece_bytes(&ok).is_ok());
    // With byte fallback, a "\0" piece (added by some converters) is unused, not an error.
    let mut pieces: Vec<(String, f32, i32)> =
        vec![("<unk>".into(), 0.0, UNKNOWN), ("\0".into(), 0.0, NORMAL)];
    pieces.extend(byte_pieces());
    let pieces: Vec<(&str, f32, i32)> = pieces
        .iter()
        .map(|(t, s, k)| (t.as_str(), *s, *k))
        .collect();
    let tok = tokenizer(&pieces, &trainer(BPE, true), &identity_normalizer());
    assert_eq!(tok.kind(1), TokenKind::Unused);
    assert_eq!(
        tok.encode("\0", false, false),
        ids(&tok, &["<0xE2>", "<0x96>", "<0x81>", "<0x00>"])
    );
}

#[test]
fn word_and_char_models() {
    let mut p = specials();
    p.extend([
        ("▁ab", 0.0, NORMAL),
        ("▁c", 0.0, NORMAL),
        ("▁", 0.0, NORMAL),
        ("a", 0.0, NORMAL),
        ("b", 0.0, NORMAL),
        ("<sep>", 0.0, USER),
    ]);
    let word = tokenizer(&p, &trainer(WORD, false), &identity_normalizer());
    let unk = word.unk().unwrap();
    let mut expected = ids(&word, &["▁ab"]);
    expected.extend([unk, word.token_id("▁c").unwrap()]);
    assert_eq!(word.encode("ab abx c", false, false), expected);

    let chars = tokenizer(&p, &trainer(CHAR, false), &identity_normalizer());
    assert_eq!(
        chars.encode("ab<sep>", false, false),
        ids(&chars, &["▁", "a", "b", "<sep>"])
    );
}

#[test]
fn decode_follows_sentencepiece() {
    let mut pieces: Vec<(String, f32, i32)> = bpe_pieces()
        .iter()
        .map(|&(t, s, k)| (t.to_string(), s, k))
        .collect();
    pieces.extend(byte_pieces());
    let pieces: Vec<(&str, f32, i32)> = pieces
        .iter()
        .map(|(t, s, k)| (t.as_str(), *s, *k))
        .collect();
    let mut t = trainer(BPE, true);
    write::bytes(&mut t, 44, b"[UNK]");
    let tok = tokenizer(&pieces, &t, &identity_normalizer());
    let id = |p: &str| tok.token_id(p).unwrap();

    // The first "▁" is the dummy prefix, even after control pieces; later ones are spaces.
    assert_eq!(decode(&tok, &[id("▁ab"), id("▁ab")]), "ab ab");
    assert_eq!(decode(&tok, &[id("<s>"), id("▁ab")]), "ab");
    assert_eq!(decode(&tok, &[id("▁"), id("▁ab")]), " ab");
    assert_eq!(decode(&tok, &[id("<unk>"), id("▁ab")]), "[UNK] ab");
    // A byte piece is not a dummy prefix, and invalid bytes are one U+FFFD each.
    assert_eq!(decode(&tok, &[id("<0x20>"), id("▁ab")]), "  ab");
    assert_eq!(
        decode(&tok, &[id("<0xE4>"), id("<0xBD>"), id("ab")]),
        "\u{fffd}\u{fffd}ab"
    );
    assert_eq!(
        decode(&tok, &[id("<0xE4>"), id("<0xBD>"), id("<0xA0>")]),
        "你"
    );
    assert_eq!(
        String::from_utf8(tok.decode(&[id("<s>"), id("ab")], true)).unwrap(),
        "<s>ab"
    );
    // Ids out of range contribute nothing.
    assert_eq!(decode(&tok, &[9999, id("ab")]), "ab");
}

#[test]
fn tokenizer_metadata_comes_from_the_trainer_spec() {
    let mut p = specials();
    p.push(("a", 0.0, NORMAL));
    let mut t = trainer(BPE, false);
    write::bytes(&mut t, 46, b"</s>");
    write::bytes(&mut t, 47, b"a");
    let tok = tokenizer(&p, &t, &[]);
    // bos_piece names a control piece; eos_piece names a normal one, so there is no EOS.
    assert_eq!(tok.bos(), Some(2));
    assert_eq!(tok.eos(), None);
    assert_eq!(tok.unk(), Some(0));
    assert!(!tok.add_bos());
    assert_eq!(tok.kind(1), TokenKind::Control);
    assert_eq!(tok.token_bytes(3, false), b"a");
}

fn grok_path() -> Option<PathBuf> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/grok-1-tokenizer.model");
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipping: {} is absent", path.display());
        None
    }
}

#[test]
fn grok_tokenizer_matches_sentencepiece_on_samples() {
    let Some(path) = grok_path() else { return };
    let tok = Tokenizer::from_sentencepiece_file(&path).unwrap();
    assert_eq!(tok.n_vocab(), 131_072);
    assert_eq!(
        (tok.bos(), tok.eos(), tok.unk(), tok.pad()),
        (Some(1), Some(2), Some(3), Some(0))
    );
    // Expected ids from sentencepiece 0.2.3's SentencePieceProcessor.encode.
    let cases: &[(&str, &[u32])] = &[
        ("a  b", &[327, 325, 130110]),
        ("  ", &[1990]),
        ("a\n\n\nb", &[327, 6, 130110]),
        ("123", &[130089, 15, 16, 17]),
        (
            "[BOS]x<|separator|>",
            &[794, 130131, 2917, 130165, 130122, 47],
        ),
        (
            "😀 𝕏",
            &[130089, 309, 228, 221, 197, 130089, 309, 226, 218, 212],
        ),
        ("hi ", &[16462, 130089]),
        (" hi", &[325, 5831]),
        ("", &[]),
    ];
    for &(text, expected) in cases {
        let ids = tok.encode(text, false, false);
        assert_eq!(ids, expected, "{text:?}");
        assert_eq!(decode(&tok, &ids), text);
    }
    assert_eq!(decode(&tok, &[1, 3, 2, 0]), "[UNK]");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Corrupting a valid file anywhere gives a tokenizer or an error, never a panic, and a
    /// tokenizer that loads still encodes and decodes without panicking.
    #[test]
    fn mutated_model_files_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        model_type in 1u64..=4,
    ) {
        let mut pieces: Vec<(String, f32, i32)> = unigram_pieces().iter().map(|&(t, s, k)| (t.to_string(), s, k)).collect();
        pieces.extend(byte_pieces());
        let pieces: Vec<(&str, f32, i32)> = pieces.iter().map(|(t, s, k)| (t.as_str(), *s, *k)).collect();
        // Half the cases carry a character map, so corrupting it is exercised too.
        let mut normalizer = identity_normalizer();
        if model_type % 2 == 0 {
            write::bytes(&mut normalizer, 2, &super::normalizer::tests::tiny_charsmap());
        }
        let mut bytes = model_bytes(&pieces, &trainer(model_type, true), &normalizer);
        for (at, value) in &edits {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        if let Ok(tok) = Tokenizer::from_sentencepiece_bytes(&bytes) {
            for text in ["", "ab c", "  xé😀 <s>", "bcbc\n", "AAB BA"] {
                let ids = tok.encode(text, true, true);
                let _ = tok.decode(&ids, false);
                let _ = tok.decode(&ids, true);
            }
        }
    }

    /// Arbitrary bytes are an error or (rarely) a tokenizer, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(tok) = Tokenizer::from_sentencepiece_bytes(&bytes) {
            let ids = tok.encode("ab c", false, true);
            let _ = tok.decode(&ids, false);
        }
    }

    /// With byte fallback and Grok-1's normalizer, decoding gives back any text exactly.
    #[test]
    fn byte_fallback_round_trips_any_text(text in "\\PC{0,40}|[ \\tab\\n]{0,12}") {
        let mut pieces: Vec<(String, f32, i32)> = bpe_pieces().iter().map(|&(t, s, k)| (t.to_string(), s, k)).collect();
        pieces.extend(byte_pieces());
        let pieces: Vec<(&str, f32, i32)> = pieces.iter().map(|(t, s, k)| (t.as_str(), *s, *k)).collect();
        for model_type in [UNIGRAM, BPE] {
            let tok = tokenizer(&pieces, &trainer(model_type, true), &identity_normalizer());
            let ids = tok.encode(&text, false, false);
            prop_assert_eq!(decode(&tok, &ids), text.clone());
        }
    }
}
