//! The vocabulary as plain data: what a GGUF file (or a test) says about the tokens, before
//! any of llama.cpp's load-time adjustments. [`crate::tokenizer::Tokenizer::new`] validates it
//! and derives everything else (lookup tables, special-token matcher, end-of-generation set).

/// A token's type as GGUF stores it in `tokenizer.ggml.token_type` (1..=6; 0, "undefined",
/// is read as `Normal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TokenKind {
    #[default]
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    /// Maps a GGUF `token_type` value; `None` for values outside 0..=6.
    pub fn from_gguf(value: i32) -> Option<TokenKind> {
        match value {
            0 | 1 => Some(TokenKind::Normal),
            2 => Some(TokenKind::Unknown),
            3 => Some(TokenKind::Control),
            4 => Some(TokenKind::UserDefined),
            5 => Some(TokenKind::Unused),
            6 => Some(TokenKind::Byte),
            _ => None,
        }
    }
}

/// Everything needed to build a [`crate::tokenizer::Tokenizer`].
///
/// `kinds` and `scores` may be left empty (every token `Normal`, every score 0); otherwise
/// they must have one entry per token. Special-token ids left `None` stay unset, except that
/// the tokenizer finds `eot`, `eom` and the FIM tokens by their text as llama.cpp does.
#[derive(Debug, Clone, Default)]
pub struct Vocab {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: the BPE pre-tokenizer; ignored by SentencePiece.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub kinds: Vec<TokenKind>,
    pub scores: Vec<f32>,
    /// BPE merges, "left right", highest priority first.
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    /// Fill-in-the-middle tokens that llama.cpp counts as end of generation.
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// SentencePiece: prefix the text (and any text right after a special token) with a space.
    pub add_space_prefix: bool,
    /// Special tokens that swallow the whitespace before them when matched in text.
    pub lstrip: Vec<u32>,
    /// Special tokens that swallow the whitespace after them when matched in text.
    pub rstrip: Vec<u32>,
}
