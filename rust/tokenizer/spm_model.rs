//! Reading SentencePiece `.model` files (a serialized `sentencepiece.ModelProto`, e.g. the
//! Grok-1 tokenizer) and tokenizing exactly as the `sentencepiece` library (0.2.3) does.
//!
//! - `proto`: the protobuf wire format, read by hand with every length checked;
//! - `normalizer`: the precompiled character map and the whitespace rules of `NormalizerSpec`;
//! - `segment`: the unigram (Viterbi), BPE, word and character segmenters.
//!
//! The result is an ordinary [`Tokenizer`] (ids, token bytes, end-of-generation set as for a
//! GGUF vocabulary) whose `encode` and `decode` follow `SentencePieceProcessor::EncodeAsIds`
//! and `DecodeIds` instead of llama.cpp: user-defined pieces are matched leftmost-longest
//! while normalizing rather than cut out beforehand, control-token text is ordinary text, no
//! BOS or EOS is added (the processor's default, and what Grok-1's reference code does), an
//! unknown piece becomes its UTF-8 bytes with `byte_fallback` and is merged with its unknown
//! neighbours without, and decoding drops the dummy-prefix space and turns invalid byte
//! pieces into U+FFFD one byte at a time.
//!
//! Versions: the unigram encoder follows 0.2.3, which sums scores in `f32`, rebases running
//! scores past ±100,000 and scores a user-defined piece `0.1 * (bytes - 1)`; 0.2.1 and
//! earlier scored user-defined pieces `bytes * max_score - 0.1` and can break ties between
//! equal-scoring segmentations differently. BPE (Grok-1's model type) is the same in both.
//!
//! Differences, all outside what `sentencepiece` itself accepts or offers:
//! - two extensions: `parse_special` cuts control and unknown piece text out of the input
//!   first (each remaining run is normalized on its own, dummy prefix included), and
//!   `render_special` decodes control pieces as their text;
//! - piece texts must be unique across all piece types (the engine's token table needs it;
//!   `sentencepiece` lets a unigram, word or character model reuse a control piece's text for
//!   a normal piece), else loading fails naming the duplicate;
//! - a character-map replacement that is not UTF-8 (only a corrupt file has one) leaves the
//!   character unchanged instead of inserting the raw bytes.

mod normalizer;
mod proto;
mod segment;

use crate::error::{EngineError, Result};

use super::index::TokenTable;
use super::special::{Fragment, SpecialMatcher, SpecialToken};
use super::{Attr, Model, TokenKind, Tokenizer, Vocab};
use normalizer::{Normalizer, PrefixMatcher, SPACE_MARK};
use proto::ProtoReader;
use segment::{Pieces, Segments, UnigramParams};

/// `ModelProto.SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum PieceType {
    #[default]
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    /// proto2 keeps an enum value it does not know as an unknown field, leaving the default.
    fn from_wire(value: i32) -> PieceType {
        match value {
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => PieceType::Normal,
        }
    }

    fn token_kind(self) -> TokenKind {
        match self {
            PieceType::Normal => TokenKind::Normal,
            PieceType::Unknown => TokenKind::Unknown,
            PieceType::Control => TokenKind::Control,
            PieceType::UserDefined => TokenKind::UserDefined,
            PieceType::Unused => TokenKind::Unused,
            PieceType::Byte => TokenKind::Byte,
        }
    }
}

/// `TrainerSpec.ModelType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum ModelType {
    #[default]
    Unigram,
    Bpe,
    Word,
    Char,
}

impl ModelType {
    fn from_wire(value: i32) -> Option<ModelType> {
        match value {
            1 => Some(ModelType::Unigram),
            2 => Some(ModelType::Bpe),
            3 => Some(ModelType::Word),
            4 => Some(ModelType::Char),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: PieceType,
}

/// The fields of `TrainerSpec` that matter when encoding and decoding.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TrainerSpec {
    pub model_type: ModelType,
    pub vocab_size: i32,
    pub treat_whitespace_as_suffix: bool,
    pub byte_fallback: bool,
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
    pub unk_piece: String,
    pub bos_piece: String,
    pub eos_piece: String,
    pub pad_piece: String,
    /// What an unknown piece decodes to; `None` when the file does not set it.
    pub unk_surface: Option<String>,
}

impl Default for TrainerSpec {
    /// The defaults in sentencepiece_model.proto.
    fn default() -> Self {
        TrainerSpec {
            model_type: ModelType::Unigram,
            vocab_size: 8000,
            treat_whitespace_as_suffix: false,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            unk_piece: "<unk>".into(),
            bos_piece: "<s>".into(),
            eos_piece: "</s>".into(),
            pad_piece: "<pad>".into(),
            unk_surface: None,
        }
    }
}

/// `NormalizerSpec`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NormalizerSpec {
    pub name: String,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        NormalizerSpec {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// A parsed `ModelProto` (fields this engine does not use are skipped).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ModelProto {
    pub pieces: Vec<Piece>,
    pub trainer_spec: TrainerSpec,
    pub normalizer_spec: NormalizerSpec,
    pub denormalizer_spec: Option<NormalizerSpec>,
}

/// What SentencePiece prints for an unknown piece when the model does not say.
const DEFAULT_UNK_SURFACE: &str = " \u{2047} ";

impl ModelProto {
    /// Parses the bytes of a `.model` file. Errors name the message, field and byte offset.
    pub fn parse(data: &[u8]) -> Result<ModelProto> {
        const MSG: &str = "ModelProto";
        let mut model = ModelProto::default();
        let mut reader = ProtoReader::new(data, 0, MSG);
        while let Some(field) = reader.next_field()? {
            match field.number {
                1 => {
                    let name = format!("ModelProto.pieces[{}]", model.pieces.len());
                    let bytes = field.bytes(MSG, "pieces")?;
                    model
                        .pieces
                        .push(parse_piece(bytes, field.payload_offset, &name)?);
                }
                2 => {
                    let bytes = field.bytes(MSG, "trainer_spec")?;
                    // A repeated embedded message merges into the earlier one, as protobuf does.
                    parse_trainer_spec(bytes, field.payload_offset, &mut model.trainer_spec)?;
                }
                3 => {
                    let bytes = field.bytes(MSG, "normalizer_spec")?;
                    parse_normalizer_spec(
                        bytes,
                        field.payload_offset,
                        "ModelProto.normalizer_spec",
                        &mut model.normalizer_spec,
                    )?;
                }
                5 => {
                    let bytes = field.bytes(MSG, "denormalizer_spec")?;
                    let spec = model.denormalizer_spec.get_or_insert_with(Default::default);
                    parse_normalizer_spec(
                        bytes,
                        field.payload_offset,
                        "ModelProto.denormalizer_spec",
                        spec,
                    )?;
                }
                _ => {}
            }
        }
        Ok(model)
    }
}

fn parse_piece(data: &[u8], base: usize, name: &str) -> Result<Piece> {
    let mut piece = Piece {
        text: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    let mut reader = ProtoReader::new(data, base, name);
    while let Some(field) = reader.next_field()? {
        match field.number {
            1 => piece.text = field.string(name, "piece")?,
            2 => piece.score = field.float(name, "score")?,
            3 => piece.kind = PieceType::from_wire(field.int32(name, "type")?),
            _ => {}
        }
    }
    Ok(piece)
}

fn parse_trainer_spec(data: &[u8], base: usize, spec: &mut TrainerSpec) -> Result<()> {
    const MSG: &str = "ModelProto.trainer_spec";
    let mut reader = ProtoReader::new(data, base, MSG);
    while let Some(field) = reader.next_field()? {
        match field.number {
            3 => {
                if let Some(t) = ModelType::from_wire(field.int32(MSG, "model_type")?) {
                    spec.model_type = t;
                }
            }
            4 => spec.vocab_size = field.int32(MSG, "vocab_size")?,
            24 => {
                spec.treat_whitespace_as_suffix = field.bool(MSG, "treat_whitespace_as_suffix")?
            }
            35 => spec.byte_fallback = field.bool(MSG, "byte_fallback")?,
            40 => spec.unk_id = field.int32(MSG, "unk_id")?,
            41 => spec.bos_id = field.int32(MSG, "bos_id")?,
            42 => spec.eos_id = field.int32(MSG, "eos_id")?,
            43 => spec.pad_id = field.int32(MSG, "pad_id")?,
            44 => spec.unk_surface = Some(field.string(MSG, "unk_surface")?),
            45 => spec.unk_piece = field.string(MSG, "unk_piece")?,
            46 => spec.bos_piece = field.string(MSG, "bos_piece")?,
            47 => spec.eos_piece = field.string(MSG, "eos_piece")?,
            48 => spec.pad_piece = field.string(MSG, "pad_piece")?,
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer_spec(
    data: &[u8],
    base: usize,
    name: &str,
    spec: &mut NormalizerSpec,
) -> Result<()> {
    let mut reader = ProtoReader::new(data, base, name);
    while let Some(field) = reader.next_field()? {
        match field.number {
            1 => spec.name = field.string(name, "name")?,
            2 => spec.precompiled_charsmap = field.bytes(name, "precompiled_charsmap")?.to_vec(),
            3 => spec.add_dummy_prefix = field.bool(name, "add_dummy_prefix")?,
            4 => spec.remove_extra_whitespaces = field.bool(name, "remove_extra_whitespaces")?,
            5 => spec.escape_whitespaces = field.bool(name, "escape_whitespaces")?,
            _ => {}
        }
    }
    Ok(())
}

/// The byte of a byte piece: exactly SentencePiece's `<0x%02X>`.
fn byte_of_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[derive(Debug, Clone, Copy)]
enum Algorithm {
    Unigram(UnigramParams),
    Bpe,
    Word,
    Char,
}

/// The SentencePiece side of a [`Tokenizer`] read from a `.model` file.
#[derive(Debug)]
pub(crate) struct SentencePieceEncoder {
    algorithm: Algorithm,
    /// Piece types as the file gives them (the tokenizer's attributes also carry llama.cpp's
    /// adjustments, which SentencePiece does not make).
    kinds: Vec<PieceType>,
    normalizer: Normalizer,
    denormalizer: Option<Normalizer>,
    user_defined: PrefixMatcher,
    /// The unknown piece; a model with byte fallback may have none.
    unk: Option<u32>,
    /// The piece of each byte, when unknown pieces fall back to bytes.
    byte_pieces: Option<Box<[u32; 256]>>,
    unk_surface: String,
    /// Decoding drops the "▁" that starts the text (SentencePiece: add_dummy_prefix or
    /// remove_extra_whitespaces).
    strip_leading_space: bool,
    remove_extra_whitespaces: bool,
    /// Control and unknown piece text, for `parse_special`.
    special: SpecialMatcher,
}

impl SentencePieceEncoder {
    fn pieces<'a>(&'a self, table: &'a TokenTable, scores: &'a [f32]) -> Pieces<'a> {
        Pieces {
            table,
            kinds: &self.kinds,
            scores,
            unk: self.unk,
        }
    }

    /// Appends the ids of `text` (`SentencePieceProcessor::EncodeAsIds`, plus the optional
    /// special-text partition described in the module docs).
    pub fn encode(
        &self,
        text: &str,
        parse_special: bool,
        table: &TokenTable,
        scores: &[f32],
        out: &mut Vec<u32>,
    ) {
        if !parse_special {
            self.encode_text(text, table, scores, out);
            return;
        }
        for fragment in self.special.partition(text, true) {
            match fragment {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(text) => self.encode_text(text, table, scores, out),
            }
        }
    }

    fn encode_text(&self, text: &str, table: &TokenTable, scores: &[f32], out: &mut Vec<u32>) {
        let normalized = self.normalizer.normalize(text, Some(&self.user_defined));
        if normalized.is_empty() {
            return;
        }
        let pieces = self.pieces(table, scores);
        let mut segments: Segments = Vec::with_capacity(normalized.len() / 2 + 1);
        match self.algorithm {
            Algorithm::Unigram(params) => {
                segment::unigram(&normalized, pieces, params, &mut segments)
            }
            Algorithm::Bpe => segment::bpe(&normalized, pieces, &self.user_defined, &mut segments),
            Algorithm::Word => segment::word(&normalized, pieces, &mut segments),
            Algorithm::Char => {
                segment::character(&normalized, pieces, &self.user_defined, &mut segments)
            }
        }
        let mut prev_unknown = false;
        for (range, id) in segments {
            let kind = id.and_then(|id| self.kinds.get(id as usize).copied());
            if let (Some(id), Some(PieceType::Control)) = (id, kind) {
                out.push(id);
                prev_unknown = false;
                continue;
            }
            let unknown = matches!(kind, None | Some(PieceType::Unknown));
            match &self.byte_pieces {
                Some(byte_pieces) if unknown => {
                    let bytes = normalized.as_bytes().get(range).unwrap_or_default();
                    out.extend(bytes.iter().map(|&b| byte_pieces[usize::from(b)]));
                }
                // A run of unknown pieces is one unknown token. (Only a model with byte
                // fallback may lack the unknown piece, so `id` is set here.)
                _ if unknown && prev_unknown => {}
                _ => out.extend(id),
            }
            prev_unknown = unknown;
        }
    }

    /// `SentencePieceProcessor::DecodeIds` (ids out of range contribute nothing).
    pub fn decode(&self, ids: &[u32], render_special: bool, table: &TokenTable) -> Vec<u8> {
        let tokens = table.tokens();
        let mut text = String::with_capacity(ids.len() * 4);
        let mut byte_run: Vec<u8> = Vec::new();
        // Whether the next piece's leading "▁" is the dummy prefix, to be dropped.
        let mut at_start = true;
        for &id in ids {
            let (Some(&kind), Some(piece)) = (self.kinds.get(id as usize), tokens.get(id as usize))
            else {
                continue;
            };
            if kind == PieceType::Byte {
                byte_run.extend(byte_of_piece(piece));
                continue;
            }
            push_bytes_replacing_invalid(&byte_run, &mut text);
            byte_run.clear();
            if !text.is_empty() {
                at_start = false;
            }
            if kind == PieceType::Control {
                if render_special {
                    text.push_str(piece);
                }
                continue;
            }
            let mut rest = piece.as_str();
            let mut dropped_prefix = false;
            if at_start && self.strip_leading_space {
                if let Some(stripped) = rest.strip_prefix(SPACE_MARK) {
                    rest = stripped;
                    // With extra whitespace removed, every leading space goes.
                    dropped_prefix = !self.remove_extra_whitespaces;
                }
            }
            if kind == PieceType::Unknown {
                text.push_str(&self.unk_surface);
            } else {
                for c in rest.chars() {
                    text.push(if c == SPACE_MARK { ' ' } else { c });
                }
            }
            if dropped_prefix || !text.is_empty() {
                at_start = false;
            }
        }
        push_bytes_replacing_invalid(&byte_run, &mut text);
        match &self.denormalizer {
            Some(denormalizer) => denormalizer.normalize(&text, None).into_bytes(),
            None => text.into_bytes(),
        }
    }
}

/// Appends `bytes` as text, each byte that does not start a valid UTF-8 character becoming
/// one U+FFFD (SentencePiece's rule; Python's "replace" would merge some of them).
fn push_bytes_replacing_invalid(mut bytes: &[u8], text: &mut String) {
    while !bytes.is_empty() {
        match std::str::from_utf8(bytes) {
            Ok(valid) => {
                text.push_str(valid);
                return;
            }
            Err(e) => {
                let (valid, rest) = bytes.split_at(e.valid_up_to());
                text.push_str(&String::from_utf8_lossy(valid));
                text.push('\u{fffd}');
                bytes = rest.get(1..).unwrap_or_default();
            }
        }
    }
}

/// SentencePiece rejects pieces this long (bytes).
const MAX_PIECE_BYTES: usize = 8000;

/// Applies the load-time rewrite of `SentencePieceProcessor::Load` (with byte fallback, a
/// "\0" piece that converters sometimes add is unused) and checks the rules its
/// `InitializePieces` and model constructors enforce.
fn prepare(model: &mut ModelProto) -> Result<()> {
    let context = "SentencePiece model, ModelProto.pieces";
    if model.pieces.is_empty() {
        return Err(EngineError::malformed(context, "the model has no pieces"));
    }
    let byte_fallback = model.trainer_spec.byte_fallback;
    let mut unk: Option<usize> = None;
    let mut bytes_found = [false; 256];
    for (id, piece) in model.pieces.iter_mut().enumerate() {
        let at = || format!("{context}[{id}]");
        if piece.text.len() >= MAX_PIECE_BYTES {
            return Err(EngineError::malformed(
                at(),
                format!("piece of {} bytes is too long", piece.text.len()),
            ));
        }
        if piece.text.is_empty() {
            return Err(EngineError::malformed(at(), "piece must not be empty"));
        }
        if piece.text == "\0" && byte_fallback {
            piece.kind = PieceType::Unused;
        }
        if piece.text.contains('\0') && !(piece.text == "\0" && piece.kind == PieceType::Unused) {
            return Err(EngineError::malformed(
                at(),
                "piece must not contain a NUL character",
            ));
        }
        if model.trainer_spec.model_type == ModelType::Unigram && !piece.score.is_finite() {
            return Err(EngineError::malformed(
                at(),
                format!("score {} is not finite", piece.score),
            ));
        }
        match piece.kind {
            PieceType::Unknown => {
                if let Some(first) = unk {
                    return Err(EngineError::malformed(
                        at(),
                        format!("a second unknown piece (the first is {first})"),
                    ));
                }
                unk = Some(id);
            }
            PieceType::Byte => {
                if !byte_fallback {
                    return Err(EngineError::malformed(
                        at(),
                        format!(
                            "byte piece {:?} found although trainer_spec.byte_fallback is false",
                            piece.text
                        ),
                    ));
                }
                let byte = byte_of_piece(&piece.text).ok_or_else(|| {
                    EngineError::malformed(
                        at(),
                        format!("byte piece {:?} is not of the form <0xNN>", piece.text),
                    )
                })?;
                bytes_found[usize::from(byte)] = true;
            }
            _ => {}
        }
    }
    if unk.is_none() && !byte_fallback {
        return Err(EngineError::malformed(
            context,
            "no piece has type UNKNOWN (required without byte_fallback)",
        ));
    }
    if byte_fallback {
        if let Some(missing) = bytes_found.iter().position(|&found| !found) {
            return Err(EngineError::malformed(
                context,
                format!(
                    "trainer_spec.byte_fallback is true but there is no byte piece <0x{missing:02X}>"
                ),
            ));
        }
    }
    Ok(())
}

/// Builds the tokenizer for the `.model` file in `data`.
pub(super) fn tokenizer_from_model(data: &[u8]) -> Result<Tokenizer> {
    let mut model = ModelProto::parse(data)?;
    prepare(&mut model)?;
    let ModelProto {
        pieces,
        trainer_spec,
        normalizer_spec,
        denormalizer_spec,
    } = model;

    let kinds: Vec<PieceType> = pieces.iter().map(|p| p.kind).collect();
    let id_of = |i: usize| u32::try_from(i).ok();
    let unk = kinds
        .iter()
        .position(|&k| k == PieceType::Unknown)
        .and_then(id_of);
    // As SentencePieceProcessor's bos_id() and friends: the id of the named piece, if it has
    // the right type.
    let find = |name: &str, default: &str, kind: PieceType| -> Option<u32> {
        let name = if name.is_empty() { default } else { name };
        let id = pieces.iter().position(|p| p.text == name)?;
        (pieces[id].kind == kind).then(|| id_of(id)).flatten()
    };
    let bos = find(&trainer_spec.bos_piece, "<s>", PieceType::Control);
    let eos = find(&trainer_spec.eos_piece, "</s>", PieceType::Control);
    let pad = find(&trainer_spec.pad_piece, "<pad>", PieceType::Control);

    let mut unigram = UnigramParams {
        min_score: f32::MAX,
        max_piece_bytes: 0,
    };
    let mut user_defined = Vec::new();
    for piece in &pieces {
        match piece.kind {
            PieceType::Normal => unigram.min_score = unigram.min_score.min(piece.score),
            PieceType::UserDefined => user_defined.push(piece.text.as_str()),
            _ => {}
        }
        if matches!(
            piece.kind,
            PieceType::Normal | PieceType::UserDefined | PieceType::Unused
        ) {
            unigram.max_piece_bytes = unigram.max_piece_bytes.max(piece.text.len());
        }
    }
    let user_defined = PrefixMatcher::new(user_defined);

    let byte_pieces = if trainer_spec.byte_fallback {
        let mut table = Box::new([0u32; 256]);
        for (id, piece) in pieces.iter().enumerate() {
            if piece.kind == PieceType::Byte {
                if let (Some(byte), Some(id)) = (byte_of_piece(&piece.text), id_of(id)) {
                    table[usize::from(byte)] = id;
                }
            }
        }
        Some(table)
    } else {
        None
    };

    let normalizer = Normalizer::new(
        &normalizer_spec,
        trainer_spec.treat_whitespace_as_suffix,
        "SentencePiece model, ModelProto.normalizer_spec",
    )?;
    let denormalizer = match &denormalizer_spec {
        Some(spec) if !spec.precompiled_charsmap.is_empty() => Some(Normalizer::new(
            spec,
            false,
            "SentencePiece model, ModelProto.denormalizer_spec",
        )?),
        _ => None,
    };
    let algorithm = match trainer_spec.model_type {
        ModelType::Unigram => Algorithm::Unigram(unigram),
        ModelType::Bpe => Algorithm::Bpe,
        ModelType::Word => Algorithm::Word,
        ModelType::Char => Algorithm::Char,
    };

    let vocab = Vocab {
        model: "llama".into(),
        tokens: pieces.iter().map(|p| p.text.clone()).collect(),
        kinds: kinds.iter().map(|k| k.token_kind()).collect(),
        scores: pieces.iter().map(|p| p.score).collect(),
        bos,
        eos,
        unk,
        pad,
        add_space_prefix: normalizer_spec.add_dummy_prefix,
        ..Vocab::default()
    };
    drop(pieces);
    let mut tokenizer = Tokenizer::new(vocab).map_err(|e| match e {
        EngineError::MalformedFile { context, message } => EngineError::MalformedFile {
            context: format!("SentencePiece model ({context})"),
            message,
        },
        other => other,
    })?;

    let special = SpecialMatcher::new(
        tokenizer
            .table
            .tokens()
            .iter()
            .zip(&tokenizer.attrs)
            .enumerate()
            .filter(|(_, (_, attr))| attr.has(Attr::CONTROL | Attr::UNKNOWN))
            .map(|(id, (text, _))| SpecialToken {
                id: id as u32,
                text,
                needs_parse_special: true,
                lstrip: false,
                rstrip: false,
            })
            .collect(),
    );
    tokenizer.model = Model::SentencePiece(Box::new(SentencePieceEncoder {
        algorithm,
        kinds,
        normalizer,
        denormalizer,
        user_defined,
        unk,
        byte_pieces,
        unk_surface: trainer_spec
            .unk_surface
            .unwrap_or_else(|| DEFAULT_UNK_SURFACE.to_string()),
        strip_leading_space: normalizer_spec.add_dummy_prefix
            || normalizer_spec.remove_extra_whitespaces,
        remove_extra_whitespaces: normalizer_spec.remove_extra_whitespaces,
        special,
    }));
    Ok(tokenizer)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
