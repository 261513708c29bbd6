//! Named tensor lookup: turns the GGUF tensor table into typed per-layer weights, checking
//! every shape against the config so the forward pass can index without further checks.

use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, TensorInfo};
use crate::kernels::matmul::WeightMatrix;
use crate::model::config::{Architecture, ModelConfig, MoeConfig};
use crate::quant::GgmlType;

pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: WeightMatrix,
    pub wk: WeightMatrix,
    pub wv: WeightMatrix,
    pub wo: WeightMatrix,
    /// Q/K/V projection biases (qwen2), lengths q_dim, kv_dim, kv_dim.
    pub q_bias: Option<Vec<f32>>,
    pub k_bias: Option<Vec<f32>>,
    pub v_bias: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub ffn: FfnWeights,
    /// Per-head query/key RMS-norm weights (gemma3), length head_dim.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// Norms applied to the attention and feed-forward outputs before the residual add
    /// (gemma3: `post_attention_norm`, `post_ffw_norm`; grok: `attn_output_norm`,
    /// `layer_output_norm` or `post_ffw_norm`).
    pub attn_post_norm: Option<Vec<f32>>,
    pub ffn_post_norm: Option<Vec<f32>>,
}

/// The feed-forward block of one layer.
pub enum FfnWeights {
    Dense(DenseFfn),
    Moe(MoeFfn),
}

/// One gated FFN: `down(act(gate(x)) * up(x))`.
pub struct DenseFfn {
    pub gate: WeightMatrix,
    pub up: WeightMatrix,
    pub down: WeightMatrix,
}

/// A router and `n_expert` gated FFNs, each stored as one slice of a 3-D tensor.
pub struct MoeFfn {
    pub config: MoeConfig,
    /// `ffn_gate_inp`: n_embd inputs → one logit per expert.
    pub router: WeightMatrix,
    pub gate: ExpertMatrices,
    pub up: ExpertMatrices,
    pub down: ExpertMatrices,
}

/// A GGUF tensor of dims `[row_len, n_rows, n_expert]`: expert `e`'s matrix is the `e`-th
/// contiguous run of `n_rows` rows. Each expert is a `WeightMatrix` pointing at its own
/// offset in the mapped file, so nothing is copied.
#[derive(Clone, Debug)]
pub struct ExpertMatrices {
    experts: Vec<WeightMatrix>,
}

impl ExpertMatrices {
    pub fn from_tensor(
        info: &TensorInfo,
        row_len: usize,
        n_rows: usize,
        n_expert: usize,
    ) -> Result<Self> {
        let shape_ok = matches!(
            info.dims.as_slice(),
            [cols, rows, experts] | [cols, rows, experts, 1]
                if *cols == row_len as u64 && *rows == n_rows as u64 && *experts == n_expert as u64
        );
        if !shape_ok {
            return Err(EngineError::malformed(
                format!("tensor {}", info.name),
                format!(
                    "shape {:?}, expected [{row_len}, {n_rows}, {n_expert}]",
                    info.dims
                ),
            ));
        }
        let too_large = || {
            EngineError::malformed(
                format!("tensor {}", info.name),
                "size exceeds the address space",
            )
        };
        let row_bytes = info.row_bytes();
        let expert_bytes = row_bytes.checked_mul(n_rows).ok_or_else(too_large)?;
        let base = usize::try_from(info.offset).map_err(|_| too_large())?;
        let experts = (0..n_expert)
            .map(|e| {
                let offset = expert_bytes
                    .checked_mul(e)
                    .and_then(|o| o.checked_add(base))
                    .ok_or_else(too_large)?;
                Ok(WeightMatrix {
                    name: format!("{}[expert {e}]", info.name),
                    ty: info.ggml_type,
                    n_rows,
                    row_len,
                    row_bytes,
                    offset,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { experts })
    }

    pub fn n_expert(&self) -> usize {
        self.experts.len()
    }

    /// Expert `e`'s matrix. Panics if `e >= n_expert()`, which the router never produces.
    pub fn expert(&self, e: usize) -> &WeightMatrix {
        &self.experts[e]
    }

    pub fn iter(&self) -> impl Iterator<Item = &WeightMatrix> {
        self.experts.iter()
    }
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
    WeightMatrix::from_tensor(tensor(file, name)?, row_len, n_rows)
}

fn tensor<'a>(file: &'a GgufFile, name: &str) -> Result<&'a TensorInfo> {
    file.tensor(name).ok_or_else(|| EngineError::MissingTensor {
        name: name.to_string(),
    })
}

fn expert_matrices(
    file: &GgufFile,
    name: &str,
    row_len: usize,
    n_rows: usize,
    n_expert: usize,
) -> Result<ExpertMatrices> {
    ExpertMatrices::from_tensor(tensor(file, name)?, row_len, n_rows, n_expert)
}

/// The post-norm tensor suffixes `(attention, feed-forward)` of an architecture, each with
/// an alternative name to look for when the first is absent.
fn post_norm_names(arch: Architecture) -> [(&'static str, Option<&'static str>); 2] {
    match arch {
        // llama.cpp: LLM_TENSOR_LAYER_OUT_NORM, falling back to LLM_TENSOR_FFN_POST_NORM.
        Architecture::Grok => [
            ("attn_output_norm", None),
            ("layer_output_norm", Some("post_ffw_norm")),
        ],
        _ => [("post_attention_norm", None), ("post_ffw_norm", None)],
    }
}

/// Reads `blk.{layer}.{suffix}.weight`, or the alternative when only that one is present;
/// a missing-tensor error names the preferred tensor.
fn layer_vector_with_alternative(
    file: &GgufFile,
    layer: usize,
    (suffix, alternative): (&str, Option<&str>),
    len: usize,
) -> Result<Vec<f32>> {
    let preferred = format!("blk.{layer}.{suffix}.weight");
    let name = match alternative.map(|alt| format!("blk.{layer}.{alt}.weight")) {
        Some(alt) if file.tensor(&preferred).is_none() && file.tensor(&alt).is_some() => alt,
        _ => preferred,
    };
    vector(file, &name, len)
}

fn load_ffn(file: &GgufFile, cfg: &ModelConfig, layer: usize) -> Result<FfnWeights> {
    let d = cfg.n_embd;
    let t = |suffix: &str| format!("blk.{layer}.{suffix}.weight");
    match cfg.moe {
        None => Ok(FfnWeights::Dense(DenseFfn {
            gate: matrix(file, &t("ffn_gate"), d, cfg.n_ff)?,
            up: matrix(file, &t("ffn_up"), d, cfg.n_ff)?,
            down: matrix(file, &t("ffn_down"), cfg.n_ff, d)?,
        })),
        Some(moe) => {
            let (n_expert, ff) = (moe.n_expert, moe.n_ff_expert);
            // Grok-2 adds a dense FFN beside the experts and averages the two; Grok-1 and
            // Mixtral have none. Refuse rather than silently drop half the block.
            if let Some(dense) = ["ffn_up", "ffn_gate", "ffn_down"]
                .iter()
                .map(|s| t(s))
                .find(|n| file.tensor(n).is_some())
            {
                return Err(EngineError::unsupported(
                    "feed-forward layout",
                    format!(
                        "tensor {dense} is a dense feed-forward beside the routed experts \
                         (as in grok-2); only routed experts are implemented"
                    ),
                ));
            }
            Ok(FfnWeights::Moe(MoeFfn {
                config: moe,
                router: matrix(file, &t("ffn_gate_inp"), d, n_expert)?,
                gate: expert_matrices(file, &t("ffn_gate_exps"), d, ff, n_expert)?,
                up: expert_matrices(file, &t("ffn_up_exps"), d, ff, n_expert)?,
                down: expert_matrices(file, &t("ffn_down_exps"), ff, d, n_expert)?,
            }))
        }
    }
}

impl ModelWeights {
    pub fn load(file: &GgufFile, cfg: &ModelConfig) -> Result<Self> {
        let d = cfg.n_embd;
        let token_embd = matrix(file, "token_embd.weight", d, cfg.n_vocab)?;
        let [attn_post_name, ffn_post_name] = post_norm_names(cfg.arch);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let t = |suffix: &str| format!("blk.{i}.{suffix}.weight");
            let bias = |suffix: &str, len: usize| {
                cfg.qkv_bias
                    .then(|| vector(file, &format!("blk.{i}.{suffix}.bias"), len))
                    .transpose()
            };
            layers.push(LayerWeights {
                attn_norm: vector(file, &t("attn_norm"), d)?,
                wq: matrix(file, &t("attn_q"), d, cfg.q_dim())?,
                wk: matrix(file, &t("attn_k"), d, cfg.kv_dim())?,
                wv: matrix(file, &t("attn_v"), d, cfg.kv_dim())?,
                wo: matrix(file, &t("attn_output"), cfg.q_dim(), d)?,
                q_bias: bias("attn_q", cfg.q_dim())?,
                k_bias: bias("attn_k", cfg.kv_dim())?,
                v_bias: bias("attn_v", cfg.kv_dim())?,
                ffn_norm: vector(file, &t("ffn_norm"), d)?,
                ffn: load_ffn(file, cfg, i)?,
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
                    .then(|| layer_vector_with_alternative(file, i, attn_post_name, d))
                    .transpose()?,
                ffn_post_norm: cfg
                    .post_norms
                    .then(|| layer_vector_with_alternative(file, i, ffn_post_name, d))
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
        let weights = Self {
            token_embd,
            layers,
            output_norm,
            output,
            rope_freq_factors,
        };
        for m in weights.matrices() {
            if matches!(m.ty, GgmlType::Q8_1 | GgmlType::Q8K) {
                return Err(EngineError::unsupported(
                    "tensor type",
                    format!("{} in weight {} (an activation-only format)", m.ty, m.name),
                ));
            }
        }
        Ok(weights)
    }

    /// Every matrix the forward pass multiplies by (each expert counted separately).
    pub fn matrices(&self) -> impl Iterator<Item = &WeightMatrix> {
        let layer_matrices = self.layers.iter().flat_map(|l| {
            let attention = [&l.wq, &l.wk, &l.wv, &l.wo].into_iter();
            let ffn: Box<dyn Iterator<Item = &WeightMatrix>> = match &l.ffn {
                FfnWeights::Dense(f) => Box::new([&f.gate, &f.up, &f.down].into_iter()),
                FfnWeights::Moe(m) => Box::new(
                    std::iter::once(&m.router)
                        .chain(m.gate.iter())
                        .chain(m.up.iter())
                        .chain(m.down.iter()),
                ),
            };
            attention.chain(ffn)
        });
        [&self.token_embd, &self.output]
            .into_iter()
            .chain(layer_matrices)
    }
}
