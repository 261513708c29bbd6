//! Reading a [`Vocab`] from GGUF metadata, with the defaults llama.cpp's `llama_vocab::load`
//! applies when a key is absent (they differ between SentencePiece and BPE vocabularies, and
//! some BPE pre-tokenizers change them).

use crate::error::{EngineError, Result};
use crate::gguf::Metadata;

use super::pretokenize::PreTokenizerSpec;
use super::vocab::{TokenKind, Vocab};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

impl Vocab {
    /// The vocabulary described by `tokenizer.*` keys, with llama.cpp's defaults.
    pub fn from_gguf_metadata(md: &Metadata) -> Result<Vocab> {
        let model = md
            .get_str(KEY_MODEL)?
            .ok_or_else(|| EngineError::MissingKey {
                key: KEY_MODEL.into(),
            })?
            .to_string();
        let pre = md.get_str(KEY_PRE)?.map(str::to_string);
        match model.as_str() {
            "llama" | "gpt2" => {}
            "no_vocab" | "none" => {
                return Err(EngineError::unsupported(
                    "tokenizer model",
                    format!("{KEY_MODEL} = '{model}': the model file has no vocabulary"),
                ))
            }
            other => {
                return Err(EngineError::unsupported(
                    "tokenizer model",
                    format!("{KEY_MODEL} = '{other}' is not implemented"),
                ))
            }
        }
        let tokens = md
            .get_str_array(KEY_TOKENS)?
            .ok_or_else(|| EngineError::MissingKey {
                key: KEY_TOKENS.into(),
            })?
            .to_vec();
        let n_vocab = tokens.len();

        let mut vocab = Vocab {
            model: model.clone(),
            pre: pre.clone(),
            tokens,
            ..Vocab::default()
        };
        match model.as_str() {
            "llama" => {
                vocab.bos = Some(1);
                vocab.eos = Some(2);
                vocab.unk = Some(0);
                vocab.add_space_prefix = true;
                vocab.add_bos = true;
            }
            "gpt2" => {
                let spec = PreTokenizerSpec::for_name(pre.as_deref())?;
                vocab.bos = (!spec.no_default_bos).then_some(11);
                vocab.eos = Some(11);
                vocab.add_bos = spec.default_add_bos;
                vocab.merges = md
                    .get_str_array(KEY_MERGES)?
                    .ok_or_else(|| EngineError::MissingKey {
                        key: KEY_MERGES.into(),
                    })?
                    .to_vec();
            }
            _ => {}
        }
        // A default id the vocabulary is too small for is dropped, as llama.cpp does.
        for id in [&mut vocab.bos, &mut vocab.eos, &mut vocab.unk] {
            if id.is_some_and(|i| i as usize >= n_vocab) {
                *id = None;
            }
        }

        let special_ids: [(&str, &mut Option<u32>); 9] = [
            ("tokenizer.ggml.bos_token_id", &mut vocab.bos),
            ("tokenizer.ggml.eos_token_id", &mut vocab.eos),
            ("tokenizer.ggml.eot_token_id", &mut vocab.eot),
            ("tokenizer.ggml.eom_token_id", &mut vocab.eom),
            ("tokenizer.ggml.unknown_token_id", &mut vocab.unk),
            ("tokenizer.ggml.padding_token_id", &mut vocab.pad),
            ("tokenizer.ggml.fim_pad_token_id", &mut vocab.fim_pad),
            ("tokenizer.ggml.fim_rep_token_id", &mut vocab.fim_rep),
            ("tokenizer.ggml.fim_sep_token_id", &mut vocab.fim_sep),
        ];
        for (key, slot) in special_ids {
            match md.get_u32(key)? {
                // llama.cpp ignores an out-of-range id and keeps the default.
                Some(id) if (id as usize) < n_vocab => *slot = Some(id),
                Some(id) => {
                    log::warn!("{key} = {id} is out of range for {n_vocab} tokens; ignored")
                }
                None => {}
            }
        }

        if let Some(v) = md.get_bool("tokenizer.ggml.add_space_prefix")? {
            vocab.add_space_prefix = v;
        }
        if let Some(v) = md.get_bool("tokenizer.ggml.add_bos_token")? {
            vocab.add_bos = v;
        }
        if let Some(v) = md.get_bool("tokenizer.ggml.add_eos_token")? {
            vocab.add_eos = v;
        }

        vocab.scores = read_scores(md, n_vocab)?;
        if let Some(types) = md.get_i32_array(KEY_TOKEN_TYPE)? {
            if types.len() < n_vocab {
                return Err(EngineError::malformed(
                    KEY_TOKEN_TYPE,
                    format!("{} token types for {n_vocab} tokens", types.len()),
                ));
            }
            // llama.cpp reads unknown type values as "undefined", which we read as normal.
            vocab.kinds = types[..n_vocab]
                .iter()
                .map(|&t| TokenKind::from_gguf(t).unwrap_or(TokenKind::Normal))
                .collect();
        }

        set_strip_attributes(md, &mut vocab)?;
        Ok(vocab)
    }
}

fn read_scores(md: &Metadata, n_vocab: usize) -> Result<Vec<f32>> {
    let scores = match md.get_f32_array(KEY_SCORES) {
        Ok(Some(scores)) => scores.to_vec(),
        Ok(None) => return Ok(Vec::new()),
        // Some converters store integer scores.
        Err(f32_error) => match md.get_i32_array(KEY_SCORES) {
            Ok(Some(scores)) => scores.iter().map(|&s| s as f32).collect(),
            _ => return Err(f32_error),
        },
    };
    if scores.len() < n_vocab {
        return Err(EngineError::malformed(
            KEY_SCORES,
            format!("{} scores for {n_vocab} tokens", scores.len()),
        ));
    }
    Ok(scores)
}

/// llama.cpp sets lstrip/rstrip by model name, since GGUF does not store them.
fn set_strip_attributes(md: &Metadata, vocab: &mut Vocab) -> Result<()> {
    let name = md.get_str("general.name")?.unwrap_or("").to_lowercase();
    let arch = md.get_str("general.architecture")?.unwrap_or("");
    let pre = vocab.pre.as_deref().unwrap_or("");
    let find = |text: &str| {
        vocab
            .tokens
            .iter()
            .position(|t| t == text)
            .map(|i| i as u32)
    };

    if ["jina-v2-de", "jina-v2-es", "jina-v2-code"]
        .iter()
        .any(|p| pre.contains(p))
        || ["nomic-bert-moe", "jina-bert-v3"]
            .iter()
            .any(|a| arch.contains(a))
    {
        vocab.lstrip.extend(find("<mask>"));
    } else if name.contains("phi-3") || name.contains("phi3") {
        // Every special token strips the whitespace after it, except these three; only
        // special tokens are matched in text, so marking every other id is harmless.
        let keep: Vec<u32> = ["<unk>", "<s>", "<|endoftext|>"]
            .into_iter()
            .filter_map(find)
            .collect();
        vocab.rstrip = (0..vocab.tokens.len() as u32)
            .filter(|id| !keep.contains(id))
            .collect();
    } else if name.contains("modern-bert") {
        vocab.lstrip.extend(find("[MASK]"));
    }
    Ok(())
}
