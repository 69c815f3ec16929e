//! Errors of the training-loop building blocks.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{path}: invalid train state: {source}")]
    State {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
}

impl TrainerError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
