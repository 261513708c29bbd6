//! Named tensor lookup: turns the GGUF tensor table into typed per-layer weights, checking
//! every shape against the config so the forward pass can index without further checks.

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kernels::matmul::WeightMatrix;
use crate::model::config::ModelConfig;
use crate::quant::GgmlType;

pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: WeightMatrix,
    pub wk: WeightMatrix,
    pub wv: WeightMatrix,
    pub wo: WeightMatrix,
    pub ffn_norm: Vec<f32>,
    pub w_gate: WeightMatrix,
    pub w_up: WeightMatrix,
    pub w_down: WeightMatrix,
    /// Per-head query/key RMS-norm weights (gemma3), length head_dim.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// Norms applied to the attention and feed-forward outputs before the residual add.
    pub attn_post_norm: Option<Vec<f32>>,
    pub ffn_post_norm: Option<Vec<f32>>,
}

pub struct ModelWeights {
    pub token_embd: WeightMatrix,
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>,
    /// `output.weight`, or the token embedding when the model ties them.
    pub output: WeightMatrix,
    /// llama3-style per-pair RoPE frequency divisors (`rope_freqs.weight`).
    pub rope_freq_factors: Option<Vec<f32>>,
}

/// Reads a 1-D F32 (or F16/BF16/quantized) vector of exactly `len` values.
pub fn vector(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>> {
    let info = file
        .tensor(name)
        .ok_or_else(|| EngineError::MissingTensor {
            name: name.to_string(),
        })?;
    if info.n_elements != len as u64 || info.dims.iter().skip(1).any(|&d| d != 1) {
        return Err(EngineError::malformed(
            format!("tensor {name}"),
            format!("shape {:?}, expected [{len}]", info.dims),
        ));
    }
    let mut out = vec![0.0f32; len];
    crate::quant::dequantize(info.ggml_type, file.tensor_data(info), &mut out)?;
    Ok(out)
}

pub fn matrix(file: &GgufFile, name: &str, row_len: usize, n_rows: usize) -> Result<WeightMatrix> {
    let info = file
        .tensor(name)
        .ok_or_else(|| EngineError::MissingTensor {
            name: name.to_string(),
        })?;
    WeightMatrix::from_tensor(info, row_len, n_rows)
}

impl ModelWeights {
    pub fn load(file: &GgufFile, cfg: &ModelConfig) -> Result<Self> {
        let d = cfg.n_embd;
        let token_embd = matrix(file, "token_embd.weight", d, cfg.n_vocab)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let t = |suffix: &str| format!("blk.{i}.{suffix}.weight");
            layers.push(LayerWeights {
                attn_norm: vector(file, &t("attn_norm"), d)?,
                wq: matrix(file, &t("attn_q"), d, cfg.q_dim())?,
                wk: matrix(file, &t("attn_k"), d, cfg.kv_dim())?,
                wv: matrix(file, &t("attn_v"), d, cfg.kv_dim())?,
                wo: matrix(file, &t("attn_output"), cfg.q_dim(), d)?,
                ffn_norm: vector(file, &t("ffn_norm"), d)?,
                w_gate: matrix(file, &t("ffn_gate"), d, cfg.n_ff)?,
                w_up: matrix(file, &t("ffn_up"), d, cfg.n_ff)?,
                w_down: matrix(file, &t("ffn_down"), cfg.n_ff, d)?,
                q_norm: cfg
                    .qk_norm
                    .then(|| vector(file, &t("attn_q_norm"), cfg.head_dim))
                    .transpose()?,
                k_norm: cfg
                    .qk_norm
                    .then(|| vector(file, &t("attn_k_norm"), cfg.head_dim))
                    .transpose()?,
                attn_post_norm: cfg
                    .post_norms
                    .then(|| vector(file, &t("post_attention_norm"), d))
                    .transpose()?,
                ffn_post_norm: cfg
                    .post_norms
                    .then(|| vector(file, &t("post_ffw_norm"), d))
                    .transpose()?,
            });
        }
        let output_norm = vector(file, "output_norm.weight", d)?;
        let output = match file.tensor("output.weight") {
            Some(_) => matrix(file, "output.weight", d, cfg.n_vocab)?,
            None => token_embd.clone(),
        };
        let rope_freq_factors = match file.tensor("rope_freqs.weight") {
            Some(_) => Some(vector(file, "rope_freqs.weight", cfg.n_rot / 2)?),
            None => None,
        };
        for m in std::iter::once(&token_embd).chain(
            layers
                .iter()
                .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]),
        ) {
            if matches!(m.ty, GgmlType::Q8_1 | GgmlType::Q8K) {
                return Err(EngineError::unsupported(
                    "tensor type",
                    format!("{} in weight {} (an activation-only format)", m.ty, m.name),
                ));
            }
        }
        Ok(Self {
            token_embd,
            layers,
            output_norm,
            output,
            rope_freq_factors,
        })
    }
}
