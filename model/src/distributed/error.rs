use thiserror::Error;

/// Errors of the distributed layer. Messages come from c10d with C++ backtraces removed.
#[derive(Debug, Error)]
pub enum DistError {
    /// The launcher's environment (torchrun / Slurm variables) is incomplete or malformed.
    #[error("distributed environment: {0}")]
    Env(String),
    /// A c10d operation failed: a peer never joined, died, hung past the timeout, or the
    /// tensors were unusable.
    #[error("{op} failed on rank {rank}/{world_size}: {message}")]
    Collective {
        op: &'static str,
        rank: usize,
        world_size: usize,
        message: String,
    },
    /// This build or device cannot run the requested backend.
    #[error("{0}")]
    Unsupported(String),
    /// The built-in launcher (`--nproc-per-node`) failed.
    #[error("launcher: {0}")]
    Launch(String),
}

pub type Result<T, E = DistError> = std::result::Result<T, E>;

/// Drops anything that still looks like a C++ backtrace (defence in depth: the shim strips
/// them already, but messages wrapped by other layers may carry one).
pub(crate) fn clean_message(msg: &str) -> String {
    let mut out = msg;
    for marker in ["Exception raised from ", "frame #0"] {
        if let Some(at) = out.find(marker) {
            out = &out[..at];
        }
    }
    let out = out.trim_end();
    if out.is_empty() {
        "c10d error (no message)".into()
    } else {
        out.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::clean_message;

    #[test]
    fn backtraces_are_removed() {
        let m = "Connection closed by peer [127.0.0.1]:1234\nException raised from recvBytes at \
                 /pytorch/torch/csrc/distributed/c10d/Utils.hpp:672 (most recent call first):\n\
                 frame #0: c10::Error::Error(...)";
        assert_eq!(
            clean_message(m),
            "Connection closed by peer [127.0.0.1]:1234"
        );
        assert_eq!(clean_message("plain"), "plain");
    }
}
