//! Tokenizers built from GGUF vocabularies, giving the same token ids as llama.cpp's
//! `llama_tokenize` and the same bytes as its `llama_token_to_piece`.
//!
//! - [`vocab`]: [`Vocab`], the vocabulary as plain data (from a GGUF file or built by hand);
//! - `special`: cutting special-token text out of the input (llama.cpp's partitioning);
//! - `pretokenize`: the regex word splitting of each `tokenizer.ggml.pre`, and GPT-2's byte map;
//! - `bpe`: byte-level BPE over ranked merges (`tokenizer.ggml.model = gpt2`);
//! - `spm`: SentencePiece's score-ordered merges with byte fallback (`model = llama`);
//! - `spm_model`: SentencePiece `.model` files, tokenized exactly as the `sentencepiece`
//!   library does ([`Tokenizer::from_sentencepiece_file`]);
//! - `gguf_vocab`: reading a [`Vocab`] from GGUF metadata with llama.cpp's defaults.
//!
//! [`Tokenizer::new`] also applies llama.cpp's load-time rules that are keyed on token text
//! (end-of-turn and FIM tokens found by name become control tokens and end generation), so a
//! hand-built vocabulary behaves like the same vocabulary loaded from a file.

mod bpe;
mod gguf_vocab;
mod index;
mod pretokenize;
mod special;
mod spm;
mod spm_model;
pub mod vocab;

use std::collections::HashSet;
use std::path::Path;

use crate::error::{EngineError, Result};

use bpe::BpeModel;
use index::TokenTable;
use pretokenize::{byte_level_decode, PreTokenizerSpec};
use special::{Fragment, SpecialMatcher, SpecialToken};
pub use vocab::{TokenKind, Vocab};

/// llama.cpp's token attributes: a token can carry several (a user-defined token that
/// llama.cpp also treats as control, a control token marked unused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Attr(u16);

impl Attr {
    const UNKNOWN: u16 = 1 << 0;
    const UNUSED: u16 = 1 << 1;
    const NORMAL: u16 = 1 << 2;
    const CONTROL: u16 = 1 << 3;
    const USER_DEFINED: u16 = 1 << 4;
    const BYTE: u16 = 1 << 5;

    fn from_kind(kind: TokenKind) -> Attr {
        Attr(match kind {
            TokenKind::Normal => Self::NORMAL,
            TokenKind::Unknown => Self::UNKNOWN,
            TokenKind::Control => Self::CONTROL,
            TokenKind::UserDefined => Self::USER_DEFINED,
            TokenKind::Unused => Self::UNUSED,
            TokenKind::Byte => Self::BYTE,
        })
    }

    fn has(self, flags: u16) -> bool {
        self.0 & flags != 0
    }

    /// Hidden from decoded text unless special tokens are rendered.
    fn is_hidden(self) -> bool {
        self.has(Self::CONTROL | Self::UNKNOWN)
    }

    fn kind(self) -> TokenKind {
        if self.has(Self::CONTROL) {
            TokenKind::Control
        } else if self.has(Self::USER_DEFINED) {
            TokenKind::UserDefined
        } else if self.has(Self::UNKNOWN) {
            TokenKind::Unknown
        } else if self.has(Self::BYTE) {
            TokenKind::Byte
        } else if self.has(Self::UNUSED) {
            TokenKind::Unused
        } else {
            TokenKind::Normal
        }
    }
}

#[derive(Debug)]
enum Model {
    Bpe(BpeModel),
    Spm {
        byte_tokens: Box<[Option<u32>; 256]>,
    },
    /// Read from a SentencePiece `.model` file: encodes and decodes as `sentencepiece` does.
    SentencePiece(Box<spm_model::SentencePieceEncoder>),
}

/// A tokenizer for one vocabulary; immutable once built, so one instance serves any number
/// of threads.
#[derive(Debug)]
pub struct Tokenizer {
    model: Model,
    table: TokenTable,
    attrs: Vec<Attr>,
    scores: Vec<f32>,
    /// Every token's decoded bytes (special tokens rendered), concatenated; token `i` is
    /// `piece_bytes[piece_offsets[i]..piece_offsets[i + 1]]`.
    piece_bytes: Vec<u8>,
    piece_offsets: Vec<usize>,
    special: SpecialMatcher,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    end_of_generation: Vec<u32>,
}

/// Texts llama.cpp takes as the end-of-turn token when the file names none.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Texts llama.cpp treats as end of generation wherever they appear in a vocabulary.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
/// gpt-oss tokens llama.cpp always renders (forced to user-defined).
const ALWAYS_RENDERED_TEXTS: &[&str] =
    &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

impl Tokenizer {
    /// Validates `vocab` and builds the lookup tables. Errors name the offending key or token.
    pub fn new(vocab: Vocab) -> Result<Tokenizer> {
        let n_vocab = vocab.tokens.len();
        if n_vocab == 0 {
            return Err(EngineError::malformed(
                "tokenizer.ggml.tokens",
                "the vocabulary is empty",
            ));
        }
        if u32::try_from(n_vocab).is_err() {
            return Err(EngineError::malformed(
                "tokenizer.ggml.tokens",
                "more than 2^32 tokens",
            ));
        }
        // llama.cpp accepts longer type and score arrays and ignores the excess.
        if !vocab.kinds.is_empty() && vocab.kinds.len() < n_vocab {
            return Err(EngineError::malformed(
                "tokenizer.ggml.token_type",
                format!("{} token types for {n_vocab} tokens", vocab.kinds.len()),
            ));
        }
        if !vocab.scores.is_empty() && vocab.scores.len() < n_vocab {
            return Err(EngineError::malformed(
                "tokenizer.ggml.scores",
                format!("{} scores for {n_vocab} tokens", vocab.scores.len()),
            ));
        }
        let check_id = |id: Option<u32>, key: &str| -> Result<()> {
            match id {
                Some(id) if id as usize >= n_vocab => Err(EngineError::malformed(
                    format!("tokenizer.ggml.{key}"),
                    format!("token id {id} is out of range for a vocabulary of {n_vocab}"),
                )),
                _ => Ok(()),
            }
        };
        check_id(vocab.bos, "bos_token_id")?;
        check_id(vocab.eos, "eos_token_id")?;
        check_id(vocab.eot, "eot_token_id")?;
        check_id(vocab.eom, "eom_token_id")?;
        check_id(vocab.unk, "unknown_token_id")?;
        check_id(vocab.pad, "padding_token_id")?;
        check_id(vocab.fim_pad, "fim_pad_token_id")?;
        check_id(vocab.fim_rep, "fim_rep_token_id")?;
        check_id(vocab.fim_sep, "fim_sep_token_id")?;
        for &id in vocab.lstrip.iter().chain(&vocab.rstrip) {
            check_id(Some(id), "token attributes (lstrip/rstrip)")?;
        }
        if vocab.add_bos && vocab.bos.is_none() {
            return Err(EngineError::malformed(
                "tokenizer.ggml.add_bos_token",
                "is true, but tokenizer.ggml.bos_token_id is not set",
            ));
        }
        if vocab.add_eos && vocab.eos.is_none() {
            return Err(EngineError::malformed(
                "tokenizer.ggml.add_eos_token",
                "is true, but tokenizer.ggml.eos_token_id is not set",
            ));
        }

        let Vocab {
            model,
            pre,
            mut tokens,
            kinds,
            scores,
            merges,
            ..
        } = vocab;
        let is_spm = match model.as_str() {
            "llama" => true,
            "gpt2" => false,
            other => {
                return Err(EngineError::unsupported(
                    "tokenizer model",
                    format!("tokenizer.ggml.model = '{other}' is not implemented"),
                ))
            }
        };

        tokens.truncate(n_vocab);
        for (id, token) in tokens.iter_mut().enumerate() {
            if token.is_empty() {
                // As llama.cpp: an empty token gets a placeholder text that cannot collide.
                *token = format!("[EMPTY_{id}]");
            }
        }
        let table = TokenTable::new(tokens).map_err(|(first, second, text)| {
            EngineError::malformed(
                "tokenizer.ggml.tokens",
                format!("duplicate token {text:?} has ids {first} and {second}"),
            )
        })?;
        let tokens = table.tokens();
        let lookup = |texts: &[&str]| texts.iter().find_map(|t| table.get(t));

        let mut attrs: Vec<Attr> = if kinds.is_empty() {
            vec![Attr(Attr::NORMAL); n_vocab]
        } else {
            kinds[..n_vocab]
                .iter()
                .map(|&k| Attr::from_kind(k))
                .collect()
        };
        let mut make_control = |id: u32| attrs[id as usize].0 |= Attr::CONTROL;

        // Special tokens the file does not name are found by their text, and become control.
        let mut found = |given: Option<u32>, texts: &[&str]| -> Option<u32> {
            given.or_else(|| {
                let id = lookup(texts)?;
                make_control(id);
                Some(id)
            })
        };
        let eot = found(vocab.eot, EOT_TEXTS);
        let eom = found(vocab.eom, EOM_TEXTS);
        for texts in [FIM_PRE_TEXTS, FIM_SUF_TEXTS, FIM_MID_TEXTS] {
            found(None, texts);
        }
        let fim_pad = found(vocab.fim_pad, FIM_PAD_TEXTS);
        let fim_rep = found(vocab.fim_rep, FIM_REP_TEXTS);
        let fim_sep = found(vocab.fim_sep, FIM_SEP_TEXTS);

        for (attr, token) in attrs.iter_mut().zip(tokens) {
            if attr.has(Attr::CONTROL) && token.contains("unused") {
                attr.0 |= Attr::UNUSED;
            }
        }

        let mut end_of_generation: Vec<u32> =
            [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        for text in EOG_TEXTS {
            if let Some(id) = table.get(text) {
                end_of_generation.push(id);
                attrs[id as usize].0 |= Attr::CONTROL;
            }
        }
        for text in ALWAYS_RENDERED_TEXTS {
            if let Some(id) = table.get(text) {
                attrs[id as usize] = Attr(Attr::USER_DEFINED);
            }
        }
        end_of_generation.extend([vocab.eos, eot, eom].into_iter().flatten());
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        let eog_has =
            |eog: &[u32], text: &str| table.get(text).filter(|id| eog.binary_search(id).is_ok());
        // gpt-oss and solar-open use "<|end|>" between messages, not at the end of a turn.
        if let Some(end) = eog_has(&end_of_generation, "<|end|>") {
            let has = |t| eog_has(&end_of_generation, t).is_some();
            let has_call = has("<|call|>") || has("<|calls|>");
            if has_call && (has("<|return|>") || has("<|flush|>")) {
                end_of_generation.retain(|&id| id != end);
                attrs[end as usize] = Attr(Attr::USER_DEFINED);
            }
        }
        // Gemma 4 uses "</s>" as ordinary text.
        if eog_has(&end_of_generation, "<|tool_response>").is_some() {
            if let Some(s) = eog_has(&end_of_generation, "</s>") {
                end_of_generation.retain(|&id| id != s);
                attrs[s as usize] = Attr(Attr::NORMAL);
            }
        }

        let mut piece_bytes = Vec::new();
        let mut piece_offsets = Vec::with_capacity(n_vocab + 1);
        piece_offsets.push(0);
        for (token, &attr) in tokens.iter().zip(&attrs) {
            append_piece(token, attr, is_spm, &mut piece_bytes);
            piece_offsets.push(piece_bytes.len());
        }

        let lstrip: HashSet<u32> = vocab.lstrip.iter().copied().collect();
        let rstrip: HashSet<u32> = vocab.rstrip.iter().copied().collect();
        let special = SpecialMatcher::new(
            tokens
                .iter()
                .zip(&attrs)
                .enumerate()
                .filter(|(_, (_, attr))| {
                    attr.has(Attr::CONTROL | Attr::USER_DEFINED | Attr::UNKNOWN)
                })
                .map(|(id, (text, attr))| SpecialToken {
                    id: id as u32,
                    text,
                    needs_parse_special: attr.has(Attr::CONTROL | Attr::UNKNOWN),
                    lstrip: lstrip.contains(&(id as u32)),
                    rstrip: rstrip.contains(&(id as u32)),
                })
                .collect(),
        );

        let model = if is_spm {
            let mut byte_tokens = Box::new([None; 256]);
            for (byte, slot) in byte_tokens.iter_mut().enumerate() {
                let hex = format!("<0x{byte:02X}>");
                *slot = table.get(&hex).or_else(|| {
                    let c = char::from(u8::try_from(byte).ok()?);
                    c.is_ascii()
                        .then(|| table.get(c.to_string().as_str()))
                        .flatten()
                });
            }
            Model::Spm { byte_tokens }
        } else {
            let spec = PreTokenizerSpec::for_name(pre.as_deref())?;
            Model::Bpe(BpeModel::new(&spec, &merges, &table)?)
        };

        let scores = if scores.is_empty() {
            vec![0.0; n_vocab]
        } else {
            scores[..n_vocab].to_vec()
        };

        Ok(Tokenizer {
            model,
            table,
            attrs,
            scores,
            piece_bytes,
            piece_offsets,
            special,
            bos: vocab.bos,
            eos: vocab.eos,
            eot,
            unk: vocab.unk,
            pad: vocab.pad,
            add_bos: vocab.add_bos,
            add_eos: vocab.add_eos,
            add_space_prefix: vocab.add_space_prefix,
            end_of_generation,
        })
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf_metadata(md: &crate::gguf::Metadata) -> Result<Tokenizer> {
        Tokenizer::new(Vocab::from_gguf_metadata(md)?)
    }

    /// Reads a SentencePiece `.model` file (e.g. Grok-1's `tokenizer.model`). The tokenizer's
    /// `encode` and `decode` then give the ids and text of `sentencepiece`'s
    /// `SentencePieceProcessor.encode`/`decode`; it adds no BOS or EOS.
    pub fn from_sentencepiece_file(path: &Path) -> Result<Tokenizer> {
        let data = std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                EngineError::FileNotFound {
                    path: path.to_path_buf(),
                }
            } else {
                EngineError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Tokenizer::from_sentencepiece_bytes(&data).map_err(|e| match e {
            EngineError::MalformedFile { context, message } => EngineError::MalformedFile {
                context: format!("{}: {context}", path.display()),
                message,
            },
            other => other,
        })
    }

    /// [`Tokenizer::from_sentencepiece_file`] for the file's bytes.
    pub fn from_sentencepiece_bytes(data: &[u8]) -> Result<Tokenizer> {
        spm_model::tokenizer_from_model(data)
    }

    /// llama.cpp's `llama_tokenize(text, add_special, parse_special)`: `add_special` adds BOS
    /// and EOS as the vocabulary's flags say; `parse_special` turns control-token text such
    /// as "<|im_start|>" into its id (user-defined tokens are matched either way). A tokenizer
    /// read from a `.model` file encodes as `sentencepiece` does instead (see `spm_model`).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let fragments = match &self.model {
            Model::SentencePiece(_) => Vec::new(),
            _ => self.special.partition(text, parse_special),
        };
        match &self.model {
            Model::Bpe(bpe) => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(text) => bpe.encode(text, &self.table, &mut out),
                    }
                }
            }
            Model::Spm { byte_tokens } => {
                // The space prefix goes before the first text and before text that follows
                // a special token.
                let mut after_special = true;
                let mut escaped = String::new();
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                        Fragment::Text(text) => {
                            escaped.clear();
                            if self.add_space_prefix && after_special {
                                escaped.push('\u{2581}');
                            }
                            for c in text.chars() {
                                escaped.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            spm::encode(
                                &escaped,
                                &self.table,
                                &self.scores,
                                byte_tokens,
                                self.unk,
                                &mut out,
                            );
                            after_special = false;
                        }
                    }
                }
            }
            Model::SentencePiece(spm) => {
                spm.encode(text, parse_special, &self.table, &self.scores, &mut out)
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// The bytes `id` contributes to decoded text: byte-level characters mapped back to bytes
    /// (BPE), "▁" as a space and `<0xNN>` as that byte (SentencePiece). Control and unknown
    /// tokens give nothing unless `render_special`, which gives their text; so do ids out of
    /// range.
    pub fn token_bytes(&self, id: u32, render_special: bool) -> &[u8] {
        let index = id as usize;
        match self.attrs.get(index) {
            Some(attr) if render_special || !attr.is_hidden() => {
                &self.piece_bytes[self.piece_offsets[index]..self.piece_offsets[index + 1]]
            }
            _ => &[],
        }
    }

    /// The bytes of `ids` concatenated, without the space SentencePiece's prefix rule added
    /// before the first token (llama.cpp's `llama_detokenize` with `remove_special = false`).
    /// A tokenizer read from a `.model` file gives `sentencepiece`'s `decode` text instead
    /// (UTF-8, an invalid byte piece as U+FFFD, the unknown piece as its surface text).
    pub fn decode(&self, ids: &[u32], render_special: bool) -> Vec<u8> {
        if let Model::SentencePiece(spm) = &self.model {
            return spm.decode(ids, render_special, &self.table);
        }
        let mut out = Vec::with_capacity(ids.len() * 4);
        for (i, &id) in ids.iter().enumerate() {
            let bytes = self.token_bytes(id, render_special);
            let bytes = if i == 0 && self.add_space_prefix {
                bytes.strip_prefix(b" ").unwrap_or(bytes)
            } else {
                bytes
            };
            out.extend_from_slice(bytes);
        }
        out
    }

    /// The vocabulary's text for `id` ("" for ids out of range).
    pub fn token_to_piece(&self, id: u32) -> &str {
        self.table
            .tokens()
            .get(id as usize)
            .map_or("", String::as_str)
    }

    /// The id whose vocabulary text is exactly `piece`.
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.table.get(piece)
    }

    pub fn n_vocab(&self) -> usize {
        self.table.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The end-of-turn token (named by the file or found by its text).
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    pub fn pad(&self) -> Option<u32> {
        self.pad
    }

    /// Every token that ends generation, ascending: EOS, EOT, and the tokens llama.cpp
    /// recognises by text (e.g. "<|im_end|>", "<end_of_turn>", "<|endoftext|>").
    pub fn end_of_generation_ids(&self) -> &[u32] {
        &self.end_of_generation
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// The token's type after llama.cpp's adjustments (a token that ends generation is
    /// `Control`); `Unknown` for ids out of range.
    pub fn kind(&self, id: u32) -> TokenKind {
        self.attrs
            .get(id as usize)
            .map_or(TokenKind::Unknown, |a| a.kind())
    }

    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn add_eos(&self) -> bool {
        self.add_eos
    }
}

/// Appends a token's decoded bytes with special tokens rendered (llama.cpp's
/// `token_to_piece(special = true)`).
fn append_piece(token: &str, attr: Attr, is_spm: bool, out: &mut Vec<u8>) {
    if attr.has(Attr::CONTROL | Attr::UNKNOWN | Attr::USER_DEFINED) {
        out.extend_from_slice(token.as_bytes());
    } else if attr.has(Attr::NORMAL) {
        if is_spm {
            for c in token.chars() {
                match c {
                    '\u{2581}' => out.push(b' '),
                    c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
        } else {
            for c in token.chars() {
                match byte_level_decode(c) {
                    Some(byte) => out.push(byte),
                    None => {
                        // llama.cpp's marker for a character outside the byte map.
                        out.extend_from_slice(b"[UNK_BYTE_0x");
                        for b in c.encode_utf8(&mut [0; 4]).bytes() {
                            out.extend_from_slice(format!("{b:02x}").as_bytes());
                        }
                        out.extend_from_slice(token.as_bytes());
                        out.push(b']');
                    }
                }
            }
        }
    } else if attr.has(Attr::BYTE) {
        // "<0xNN>"
        if let Some(byte) = token
            .get(3..5)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
