//! A loaded model: the mapped GGUF file, its hyperparameters, typed weights that point
//! into the mapping (nothing is dequantized at load), and its tokenizer.

pub mod config;
pub mod transformer;
pub mod weights;

use std::path::Path;

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

pub use config::{Architecture, ModelConfig};
pub use transformer::SequenceState;
pub use weights::ModelWeights;

pub struct Model {
    pub(crate) file: GgufFile,
    pub config: ModelConfig,
    pub weights: ModelWeights,
    pub tokenizer: Tokenizer,
}

impl Model {
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_gguf(GgufFile::open(path)?)
    }

    /// Loads the model with `tokenizer` in place of the file's vocabulary (e.g. a
    /// SentencePiece `.model` for a GGUF without one); `None` reads the file's.
    pub fn load_with_tokenizer(path: &Path, tokenizer: Option<Tokenizer>) -> Result<Self> {
        Self::from_gguf_with_tokenizer(GgufFile::open(path)?, tokenizer)
    }

    pub fn from_gguf(file: GgufFile) -> Result<Self> {
        Self::from_gguf_with_tokenizer(file, None)
    }

    pub fn from_gguf_with_tokenizer(file: GgufFile, tokenizer: Option<Tokenizer>) -> Result<Self> {
        let md = file.metadata();
        let embd = file
            .tensor("token_embd.weight")
            .ok_or_else(|| EngineError::MissingTensor {
                name: "token_embd.weight".into(),
            })?;
        let n_vocab = usize::try_from(embd.n_rows())
            .map_err(|_| EngineError::malformed("tensor token_embd.weight", "too many rows"))?;
        let config = ModelConfig::from_metadata(md, n_vocab)?;
        let (tokenizer, vocab_source) = match tokenizer {
            Some(tokenizer) => (tokenizer, "the tokenizer file"),
            None => (file_tokenizer(md)?, "tokenizer.ggml.tokens"),
        };
        if tokenizer.n_vocab() > n_vocab {
            return Err(EngineError::malformed(
                vocab_source,
                format!(
                    "{} tokens but the embedding has only {n_vocab} rows",
                    tokenizer.n_vocab()
                ),
            ));
        }
        let weights = ModelWeights::load(&file, &config)?;
        Ok(Self {
            file,
            config,
            weights,
            tokenizer,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// Greedy continuation of `prompt`: up to `max_tokens` argmax tokens, stopping after an
    /// end-of-generation token (which is included).
    pub fn generate_greedy(&self, prompt: &[u32], max_tokens: usize) -> Result<Vec<u32>> {
        let mut seq = self.new_sequence(prompt.len() + max_tokens);
        let mut logits = self.forward(&mut seq, prompt, 1)?;
        let mut out = Vec::with_capacity(max_tokens);
        for i in 0..max_tokens {
            let next = argmax(&logits);
            out.push(next);
            if self.tokenizer.end_of_generation_ids().contains(&next) || i + 1 == max_tokens {
                break;
            }
            logits = self.forward(&mut seq, &[next], 1)?;
        }
        Ok(out)
    }
}

/// The tokenizer the file's metadata describes; a file without a vocabulary (Grok-1 GGUFs
/// may have none) gets an error that says how to supply one.
fn file_tokenizer(md: &crate::gguf::Metadata) -> Result<Tokenizer> {
    let model = md.get_str("tokenizer.ggml.model")?;
    let no_vocab = matches!(model, Some("no_vocab" | "none"));
    if no_vocab || md.get("tokenizer.ggml.tokens").is_none() {
        return Err(EngineError::malformed(
            "tokenizer.ggml.tokens",
            "the model file has no vocabulary; pass a tokenizer file \
             (a SentencePiece .model, e.g. Model(path, tokenizer=PATH))",
        ));
    }
    Tokenizer::from_gguf_metadata(md)
}

/// Index of the largest value; the lowest index wins ties, as llama.cpp's greedy sampler.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}
