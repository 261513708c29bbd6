//! The user's sampling settings and the one place they are validated.

use super::mask::TokenMask;
use crate::error::{EngineError, Result};

/// How one token is chosen from a vector of logits (see the [module docs](super)).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature, finite and >= 0; 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus (top-p) threshold in (0, 1]; 1 keeps every token.
    pub nucleus_p: f32,
    /// The tokens that may be sampled; `None` allows the whole vocabulary.
    pub mask: Option<TokenMask>,
}

impl Default for SamplingParams {
    /// The SDK's defaults: temperature 0.7, nucleus_p 0.95, no mask.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.7,
            nucleus_p: 0.95,
            mask: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding over the whole vocabulary.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            nucleus_p: 1.0,
            mask: None,
        }
    }

    /// Checks every field; the error names the parameter and the value it got.
    /// (A mask is valid by construction; its size is checked against the logits when sampling.)
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(EngineError::invalid(
                "temperature",
                format!(
                    "temperature must be >= 0 and finite, got {}",
                    self.temperature
                ),
            ));
        }
        if !(self.nucleus_p > 0.0 && self.nucleus_p <= 1.0) {
            return Err(EngineError::invalid(
                "nucleus_p",
                format!("nucleus_p must be in (0, 1], got {}", self.nucleus_p),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(temperature: f32, nucleus_p: f32) -> Option<String> {
        let params = SamplingParams {
            temperature,
            nucleus_p,
            mask: None,
        };
        params.validate().err().map(|err| match err {
            EngineError::InvalidArgument { param, message } => format!("{param}|{message}"),
            other => panic!("unexpected error kind: {other}"),
        })
    }

    #[test]
    fn accepts_the_documented_ranges() {
        for (temperature, nucleus_p) in [(0.0, 1.0), (0.7, 0.95), (1e-30, 1e-30), (100.0, 0.5)] {
            assert_eq!(
                message(temperature, nucleus_p),
                None,
                "{temperature} {nucleus_p}"
            );
        }
        assert!(SamplingParams::default().validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
    }

    #[test]
    fn bad_temperature_is_named() {
        assert_eq!(
            message(-1.0, 0.9).as_deref(),
            Some("temperature|temperature must be >= 0 and finite, got -1")
        );
        assert_eq!(
            message(f32::INFINITY, 0.9).as_deref(),
            Some("temperature|temperature must be >= 0 and finite, got inf")
        );
        assert!(message(f32::NAN, 0.9).unwrap().starts_with("temperature|"));
    }

    #[test]
    fn bad_nucleus_p_is_named() {
        assert_eq!(
            message(0.7, 1.5).as_deref(),
            Some("nucleus_p|nucleus_p must be in (0, 1], got 1.5")
        );
        assert_eq!(
            message(0.7, 0.0).as_deref(),
            Some("nucleus_p|nucleus_p must be in (0, 1], got 0")
        );
        assert!(message(0.7, -0.5).unwrap().starts_with("nucleus_p|"));
        assert!(message(0.7, f32::NAN).unwrap().starts_with("nucleus_p|"));
    }
}
