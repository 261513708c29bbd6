//! Hyperparameters read from GGUF metadata (`<arch>.*` keys), with every default explicit
//! and every value range-checked before the loader sizes anything by it.

use crate::error::{EngineError, Result};
use crate::gguf::Metadata;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama, and Mixtral-style mixtures of experts when `llama.expert_count` is set.
    Llama,
    Qwen2,
    Gemma3,
    /// Grok-1.
    Grok,
}

impl Architecture {
    pub const ALL: [Self; 4] = [Self::Llama, Self::Qwen2, Self::Gemma3, Self::Grok];

    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|arch| arch.name() == name)
            .ok_or_else(|| {
                let supported: Vec<&str> = Self::ALL.iter().map(|a| a.name()).collect();
                EngineError::unsupported(
                    "architecture",
                    format!(
                        "'{name}' (general.architecture); supported: {}",
                        supported.join(", ")
                    ),
                )
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
            Self::Grok => "grok",
        }
    }
}

/// The gate nonlinearity of the gated feed-forward block.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FfnActivation {
    /// silu(gate) * up (llama, qwen2, mixtral).
    Silu,
    /// gelu_tanh(gate) * up with the tanh approximation in f32 (grok: `jax.nn.gelu`, whose
    /// default is the tanh form, in xAI's reference code).
    GeluTanh,
    /// gelu_tanh(gate) * up as ggml's CPU backend evaluates it, through a table of f16
    /// values (gemma3, whose tests compare against llama.cpp's own outputs).
    GeluTanhF16Table,
}

/// A mixture-of-experts feed-forward block: a router picks `n_expert_used` of `n_expert`
/// gated FFNs per token (see `model::moe`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    pub n_expert: usize,
    pub n_expert_used: usize,
    /// Hidden width of each expert.
    pub n_ff_expert: usize,
    /// Divide the selected experts' router probabilities by their sum (Mixtral) or use
    /// them as they are (Grok-1).
    pub renormalize_gates: bool,
}

/// How RoPE pairs dimensions: adjacent (x[2i], x[2i+1]) or split halves (x[i], x[i+d/2]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    AdjacentPairs,
    SplitHalves,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub rope_freq_scale: f32,
    /// Dimensions of each head that RoPE rotates (the rest pass through).
    pub n_rot: usize,
    pub rope_style: RopeStyle,
    /// Multiplies q·k before the softmax.
    pub attn_scale: f32,
    pub ffn_activation: FfnActivation,
    /// Gemma multiplies the token embeddings by sqrt(n_embd).
    pub embedding_scale: Option<f32>,
    /// RMS norms on each head's query and key (gemma3).
    pub qk_norm: bool,
    /// Extra RMS norms on the attention and feed-forward outputs (gemma3).
    pub post_norms: bool,
    /// Per layer: `Some(window)` when the layer attends only to the last `window`
    /// positions (itself included), None for global attention.
    pub layer_window: Vec<Option<usize>>,
    /// RoPE base of sliding-window layers (gemma3 uses a smaller one than global layers).
    pub rope_base_local: f32,
    /// Learned biases on the Q, K and V projections (qwen2).
    pub qkv_bias: bool,
    /// `cap * tanh(score / cap)` on every attention score after `attn_scale` (grok).
    pub attn_logit_softcap: Option<f32>,
    /// `cap * tanh(logit / cap)` on the output logits, after `logit_scale`.
    pub final_logit_softcap: Option<f32>,
    /// Multiplies the output logits (grok).
    pub logit_scale: Option<f32>,
    /// Routed experts instead of one dense FFN in every layer.
    pub moe: Option<MoeConfig>,
}

/// Upper bounds that keep a hostile file from making the loader allocate absurd buffers;
/// far beyond any model this engine can run on a CPU.
const MAX_DIM: u32 = 1 << 20;
const MAX_LAYERS: u32 = 1024;
const MAX_HEADS: u32 = 4096;
/// llama.cpp's LLAMA_MAX_EXPERTS.
const MAX_EXPERTS: u32 = 512;

/// Grok-1's multipliers, which llama.cpp assumes for grok files written before the
/// converter stored them (`llama_model_grok::load_arch_hparams`, "defaults for old GGUFs").
/// Every one is read from the file when present.
pub const GROK_DEFAULT_ATTN_LOGIT_SOFTCAP: f32 = 30.0;
pub const GROK_DEFAULT_ATTN_OUTPUT_SCALE: f32 = 0.088_388_35; // 1/sqrt(128)
pub const GROK_DEFAULT_EMBEDDING_SCALE: f32 = 78.383_67; // sqrt(6144)
pub const GROK_DEFAULT_LOGIT_SCALE: f32 = 0.577_350_26; // 1/sqrt(3)

fn key(arch: &str, suffix: &str) -> String {
    format!("{arch}.{suffix}")
}

fn bounded(md: &Metadata, k: &str, max: u32) -> Result<usize> {
    let v = md.require_u32(k)?;
    if v == 0 || v > max {
        return Err(EngineError::malformed(
            format!("metadata key {k}"),
            format!("value {v} out of range 1..={max}"),
        ));
    }
    Ok(v as usize)
}

fn optional_bounded(md: &Metadata, k: &str, max: u32) -> Result<Option<usize>> {
    match md.get_u32(k)? {
        None => Ok(None),
        Some(v) if v == 0 || v > max => Err(EngineError::malformed(
            format!("metadata key {k}"),
            format!("value {v} out of range 1..={max}"),
        )),
        Some(v) => Ok(Some(v as usize)),
    }
}

/// An optional f32 key that must be a finite positive number when present.
fn optional_positive(md: &Metadata, k: &str) -> Result<Option<f32>> {
    match md.get_f32(k)? {
        Some(v) if !(v.is_finite() && v > 0.0) => Err(EngineError::malformed(
            format!("metadata key {k}"),
            format!("{v} is not a positive number"),
        )),
        other => Ok(other),
    }
}

/// Reads the expert counts. `Ok(None)` for a dense model (no `expert_count`, or 0).
/// `renormalize_gates` is the architecture's convention, used unless the file says.
fn read_moe(
    md: &Metadata,
    a: &str,
    n_ff: usize,
    renormalize_gates: bool,
) -> Result<Option<MoeConfig>> {
    let count_key = key(a, "expert_count");
    let n_expert = match md.get_u32(&count_key)? {
        None | Some(0) => return Ok(None),
        Some(v) if v > MAX_EXPERTS => {
            return Err(EngineError::malformed(
                format!("metadata key {count_key}"),
                format!("value {v} out of range 0..={MAX_EXPERTS}"),
            ))
        }
        Some(v) => v as usize,
    };
    let used_key = key(a, "expert_used_count");
    let n_expert_used = match md.get_u32(&used_key)? {
        None => return Err(EngineError::MissingKey { key: used_key }),
        Some(v) if v == 0 || v as usize > n_expert => {
            return Err(EngineError::malformed(
                format!("metadata key {used_key}"),
                format!("value {v} out of range 1..={n_expert} (the expert count)"),
            ))
        }
        Some(v) => v as usize,
    };
    let n_ff_expert =
        optional_bounded(md, &key(a, "expert_feed_forward_length"), MAX_DIM)?.unwrap_or(n_ff);
    // A file that states its gate normalisation overrides the architecture's convention.
    let renormalize_gates = md
        .get_bool(&key(a, "expert_weights_norm"))?
        .unwrap_or(renormalize_gates);
    Ok(Some(MoeConfig {
        n_expert,
        n_expert_used,
        n_ff_expert,
        renormalize_gates,
    }))
}

impl ModelConfig {
    /// Reads the hyperparameters. `n_vocab` comes from the token embedding, which is the
    /// tensor the model actually indexes, not from a metadata count that could disagree.
    pub fn from_metadata(md: &Metadata, n_vocab: usize) -> Result<Self> {
        let arch_name = md.require_str("general.architecture")?;
        let arch = Architecture::from_name(arch_name)?;
        let a = arch_name;
        let n_embd = bounded(md, &key(a, "embedding_length"), MAX_DIM)?;
        let n_layer = bounded(md, &key(a, "block_count"), MAX_LAYERS)?;
        let n_head = bounded(md, &key(a, "attention.head_count"), MAX_HEADS)?;
        let n_head_kv =
            optional_bounded(md, &key(a, "attention.head_count_kv"), MAX_HEADS)?.unwrap_or(n_head);
        if n_head % n_head_kv != 0 {
            return Err(EngineError::malformed(
                format!("metadata key {a}.attention.head_count_kv"),
                format!("{n_head} query heads are not a multiple of {n_head_kv} key/value heads"),
            ));
        }
        let head_dim = match optional_bounded(md, &key(a, "attention.key_length"), MAX_DIM)? {
            Some(d) => d,
            None => {
                if n_embd % n_head != 0 {
                    return Err(EngineError::malformed(
                        format!("metadata key {a}.attention.head_count"),
                        format!("embedding length {n_embd} is not a multiple of {n_head} heads"),
                    ));
                }
                n_embd / n_head
            }
        };
        if let Some(v) = optional_bounded(md, &key(a, "attention.value_length"), MAX_DIM)? {
            if v != head_dim {
                return Err(EngineError::unsupported(
                    "attention shape",
                    format!("value length {v} differs from key length {head_dim}"),
                ));
            }
        }
        let n_ff = bounded(md, &key(a, "feed_forward_length"), MAX_DIM)?;
        let n_ctx_train =
            optional_bounded(md, &key(a, "context_length"), u32::MAX)?.unwrap_or(2048);
        let rms_eps = md
            .get_f32(&key(a, "attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        let rope_base = md.get_f32(&key(a, "rope.freq_base"))?.unwrap_or(10_000.0);
        let rope_freq_scale = match md.get_str(&key(a, "rope.scaling.type"))? {
            None | Some("none") => 1.0,
            Some("linear") => {
                let factor = md.get_f32(&key(a, "rope.scaling.factor"))?.unwrap_or(1.0);
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(EngineError::malformed(
                        format!("metadata key {a}.rope.scaling.factor"),
                        format!("{factor} is not a positive number"),
                    ));
                }
                1.0 / factor
            }
            Some(other) => {
                return Err(EngineError::unsupported(
                    "rope scaling",
                    format!("'{other}' ({a}.rope.scaling.type)"),
                ))
            }
        };
        let n_rot =
            optional_bounded(md, &key(a, "rope.dimension_count"), MAX_DIM)?.unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(EngineError::malformed(
                format!("metadata key {a}.rope.dimension_count"),
                format!("{n_rot} must be even and at most the head size {head_dim}"),
            ));
        }
        for (name, v) in [
            ("attention.layer_norm_rms_epsilon", rms_eps),
            ("rope.freq_base", rope_base),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(EngineError::malformed(
                    format!("metadata key {a}.{name}"),
                    format!("{v} is not positive"),
                ));
            }
        }
        let rope_style = match arch {
            Architecture::Llama => RopeStyle::AdjacentPairs,
            Architecture::Qwen2 | Architecture::Gemma3 | Architecture::Grok => {
                RopeStyle::SplitHalves
            }
        };
        let mut attn_scale = 1.0 / (head_dim as f32).sqrt();
        let mut ffn_activation = FfnActivation::Silu;
        let mut embedding_scale = None;
        let (mut qk_norm, mut post_norms) = (false, false);
        let mut layer_window = vec![None; n_layer];
        let mut rope_base_local = rope_base;
        let qkv_bias = arch == Architecture::Qwen2;
        let (mut attn_logit_softcap, mut final_logit_softcap, mut logit_scale) = (None, None, None);
        let mut moe = None;
        if arch == Architecture::Llama {
            // Mixtral: softmax router, top-k, the chosen probabilities renormalised
            // (llama.cpp's build_moe_ffn with norm_w for LLM_ARCH_LLAMA).
            moe = read_moe(md, a, n_ff, true)?;
        }
        if arch == Architecture::Grok {
            // Grok-1 as xAI's model.py computes it: its router takes top-2 of the softmax and
            // uses those probabilities unnormalised (llama.cpp's grok graph renormalises them;
            // the reference code does not, and it is the reference we follow).
            moe = read_moe(md, a, n_ff, false)?;
            if moe.is_none() {
                return Err(EngineError::malformed(
                    format!("metadata key {a}.expert_count"),
                    "grok models route every feed-forward block through experts, \
                     but the expert count is missing or 0",
                ));
            }
            ffn_activation = FfnActivation::GeluTanh;
            post_norms = true;
            let multiplier = |suffix: &str, default: f32| -> Result<f32> {
                Ok(optional_positive(md, &key(a, suffix))?.unwrap_or(default))
            };
            embedding_scale = Some(multiplier("embedding_scale", GROK_DEFAULT_EMBEDDING_SCALE)?);
            attn_scale = multiplier("attention.output_scale", GROK_DEFAULT_ATTN_OUTPUT_SCALE)?;
            attn_logit_softcap = Some(multiplier(
                "attn_logit_softcapping",
                GROK_DEFAULT_ATTN_LOGIT_SOFTCAP,
            )?);
            logit_scale = Some(multiplier("logit_scale", GROK_DEFAULT_LOGIT_SCALE)?);
            // Grok-1 has no final cap; llama.cpp applies one when a (grok-2) file sets it.
            // 0 means "off" in llama.cpp's convention.
            let final_cap_key = key(a, "final_logit_softcapping");
            final_logit_softcap = match md.get_f32(&final_cap_key)? {
                Some(0.0) => None,
                _ => optional_positive(md, &final_cap_key)?,
            };
            // `grok.router_logit_softcapping` is deliberately not applied: neither
            // model.py nor llama.cpp's build_moe_ffn caps the router logits.
        }
        if arch == Architecture::Gemma3 {
            ffn_activation = FfnActivation::GeluTanhF16Table;
            embedding_scale = Some((n_embd as f32).sqrt());
            qk_norm = true;
            post_norms = true;
            // Gemma 3 27B scales queries by the model width per head, the others by the
            // head size (llama.cpp: LLM_TYPE_27B, the 62-layer model).
            if n_layer == 62 {
                attn_scale = 1.0 / ((n_embd / n_head) as f32).sqrt();
            }
            // Five sliding-window layers, then one global layer, repeating; local layers
            // use RoPE base 10000 whatever the file says for the global ones.
            let window = optional_bounded(md, &key(a, "attention.sliding_window"), u32::MAX)?
                .unwrap_or(4096);
            for (il, w) in layer_window.iter_mut().enumerate() {
                if il % 6 < 5 {
                    *w = Some(window);
                }
            }
            rope_base_local = 10_000.0;
        }
        Ok(Self {
            arch,
            n_vocab,
            n_ctx_train,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            rms_eps,
            rope_base,
            rope_freq_scale,
            n_rot,
            rope_style,
            attn_scale,
            ffn_activation,
            embedding_scale,
            qk_norm,
            post_norms,
            layer_window,
            rope_base_local,
            qkv_bias,
            attn_logit_softcap,
            final_logit_softcap,
            logit_scale,
            moe,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::gguf::MetadataValue;

    fn metadata(arch: &str, extra: &[(&str, MetadataValue)]) -> Metadata {
        let mut md = Metadata::default();
        let mut put = |k: String, v: MetadataValue| md.insert(k, v).unwrap();
        put(
            "general.architecture".into(),
            MetadataValue::String(arch.into()),
        );
        for (suffix, v) in [
            ("embedding_length", 64),
            ("block_count", 2),
            ("attention.head_count", 4),
            ("attention.head_count_kv", 2),
            ("feed_forward_length", 96),
        ] {
            put(format!("{arch}.{suffix}"), MetadataValue::U32(v));
        }
        for (k, v) in extra {
            put(k.replace("{arch}", arch), v.clone());
        }
        md
    }

    fn config(arch: &str, extra: &[(&str, MetadataValue)]) -> Result<ModelConfig> {
        ModelConfig::from_metadata(&metadata(arch, extra), 64)
    }

    fn experts(count: u32, used: u32) -> [(&'static str, MetadataValue); 2] {
        [
            ("{arch}.expert_count", MetadataValue::U32(count)),
            ("{arch}.expert_used_count", MetadataValue::U32(used)),
        ]
    }

    #[test]
    fn unsupported_architecture_is_named_with_the_supported_ones() {
        let message = config("mamba", &[]).unwrap_err().to_string();
        assert!(message.contains("'mamba'"), "{message}");
        assert!(message.contains("llama, qwen2, gemma3, grok"), "{message}");
    }

    #[test]
    fn qwen2_has_biases_and_rotates_halves() {
        let c = config("qwen2", &[]).unwrap();
        assert!(c.qkv_bias && c.moe.is_none());
        assert_eq!(c.rope_style, RopeStyle::SplitHalves);
        assert_eq!(c.ffn_activation, FfnActivation::Silu);
        let llama = config("llama", &[]).unwrap();
        assert!(!llama.qkv_bias && llama.moe.is_none());
        assert_eq!(llama.rope_style, RopeStyle::AdjacentPairs);
    }

    #[test]
    fn llama_with_experts_is_a_renormalising_mixture() {
        let moe = config("llama", &experts(8, 2)).unwrap().moe.unwrap();
        assert_eq!(
            moe,
            MoeConfig {
                n_expert: 8,
                n_expert_used: 2,
                n_ff_expert: 96,
                renormalize_gates: true
            }
        );
        let mut extra = experts(4, 1).to_vec();
        extra.push(("{arch}.expert_weights_norm", MetadataValue::Bool(false)));
        extra.push(("{arch}.expert_feed_forward_length", MetadataValue::U32(32)));
        let moe = config("llama", &extra).unwrap().moe.unwrap();
        assert!(!moe.renormalize_gates);
        assert_eq!(
            (moe.n_expert, moe.n_expert_used, moe.n_ff_expert),
            (4, 1, 32)
        );
        assert!(config("llama", &experts(0, 0)).unwrap().moe.is_none());
    }

    #[test]
    fn expert_counts_are_checked_and_named() {
        let used_too_many = config("llama", &experts(4, 5)).unwrap_err().to_string();
        assert!(
            used_too_many.contains("llama.expert_used_count"),
            "{used_too_many}"
        );
        let too_many = config("llama", &experts(MAX_EXPERTS + 1, 2))
            .unwrap_err()
            .to_string();
        assert!(too_many.contains("llama.expert_count"), "{too_many}");
        let missing = config("grok", &[("{arch}.expert_count", MetadataValue::U32(8))])
            .unwrap_err()
            .to_string();
        assert!(missing.contains("grok.expert_used_count"), "{missing}");
        let no_experts = config("grok", &[]).unwrap_err().to_string();
        assert!(no_experts.contains("grok.expert_count"), "{no_experts}");
    }

    #[test]
    fn grok_takes_llama_cpp_defaults_when_the_file_is_silent() {
        let c = config("grok", &experts(8, 2)).unwrap();
        assert_eq!(c.embedding_scale, Some(78.383_67));
        assert_eq!(c.attn_scale, 0.088_388_35);
        assert_eq!(c.attn_logit_softcap, Some(30.0));
        assert_eq!(c.logit_scale, Some(0.577_350_26));
        assert_eq!(c.final_logit_softcap, None);
        assert!(c.post_norms && !c.qkv_bias && !c.qk_norm);
        assert_eq!(c.rope_style, RopeStyle::SplitHalves);
        assert_eq!(c.ffn_activation, FfnActivation::GeluTanh);
        assert!(!c.moe.unwrap().renormalize_gates);
    }

    #[test]
    fn grok_reads_every_multiplier_from_the_file() {
        let mut extra = experts(8, 2).to_vec();
        extra.extend([
            ("{arch}.embedding_scale", MetadataValue::F32(3.0)),
            ("{arch}.attention.output_scale", MetadataValue::F32(0.2)),
            ("{arch}.attn_logit_softcapping", MetadataValue::F64(5.0)),
            ("{arch}.logit_scale", MetadataValue::F32(1.7)),
            ("{arch}.final_logit_softcapping", MetadataValue::F32(0.0)),
        ]);
        let c = config("grok", &extra).unwrap();
        assert_eq!(c.embedding_scale, Some(3.0));
        assert_eq!(c.attn_scale, 0.2);
        assert_eq!(c.attn_logit_softcap, Some(5.0));
        assert_eq!(c.logit_scale, Some(1.7));
        assert_eq!(c.final_logit_softcap, None, "0 means no cap");
        extra.push(("{arch}.expert_weights_norm", MetadataValue::Bool(true)));
        extra.retain(|(k, _)| !k.ends_with("final_logit_softcapping"));
        extra.push(("{arch}.final_logit_softcapping", MetadataValue::F32(50.0)));
        let c = config("grok", &extra).unwrap();
        assert!(c.moe.unwrap().renormalize_gates);
        assert_eq!(c.final_logit_softcap, Some(50.0));
    }

    #[test]
    fn grok_multipliers_must_be_positive() {
        let mut extra = experts(8, 2).to_vec();
        extra.push(("{arch}.logit_scale", MetadataValue::F32(-1.0)));
        let message = config("grok", &extra).unwrap_err().to_string();
        assert!(message.contains("grok.logit_scale"), "{message}");
    }
}
