//! One error type for the whole engine. Every variant names what was wrong (a parameter,
//! a metadata key, a tensor, a byte offset) so the message is actionable on its own; the
//! Python binding maps each variant to an exception class in exactly one place.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A caller-supplied value is out of range or inconsistent (Python: ValueError).
    #[error("{param}: {message}")]
    InvalidArgument { param: String, message: String },

    /// A caller-supplied value has the wrong kind (Python: TypeError).
    #[error("{param}: {message}")]
    WrongType { param: String, message: String },

    #[error("model file not found: {}", path.display())]
    FileNotFound { path: PathBuf },

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is not a well-formed GGUF (or .model) file. `context` says where
    /// (header, a metadata key, a tensor name, a byte offset).
    #[error("malformed model file ({context}): {message}")]
    MalformedFile { context: String, message: String },

    /// Well-formed, but uses something this engine does not implement
    /// (an architecture, a tensor type, a tokenizer model).
    #[error("unsupported {what}: {message}")]
    Unsupported { what: String, message: String },

    #[error("model is missing tensor '{name}'")]
    MissingTensor { name: String },

    #[error("model metadata is missing key '{key}'")]
    MissingKey { key: String },

    /// The prompt plus requested tokens do not fit the context window.
    #[error("prompt of {prompt_tokens} tokens does not fit the context of {context_size} tokens")]
    ContextOverflow {
        prompt_tokens: usize,
        context_size: usize,
    },

    /// A bug in the engine (including a caught panic). Never the user's fault.
    #[error("internal error in sampler-sdk (please report this bug): {0}")]
    Internal(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            param: param.into(),
            message: message.into(),
        }
    }

    pub fn malformed(context: impl Into<String>, message: impl Into<String>) -> Self {
        Self::MalformedFile {
            context: context.into(),
            message: message.into(),
        }
    }

    pub fn unsupported(what: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Unsupported {
            what: what.into(),
            message: message.into(),
        }
    }
}

/// The message of a caught panic's payload (`panic!` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
