//! Typed errors of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong while building, running or persisting a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// An input tensor has the wrong shape, dtype or device.
    #[error("invalid input: {0}")]
    Input(String),
    /// A libtorch operation failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A checkpoint file could not be read or does not match the model.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// File-system error with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Serialising or parsing JSON (configurations stored in checkpoints).
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Result alias of the model crate.
pub type Result<T> = std::result::Result<T, ModelError>;
