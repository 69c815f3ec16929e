//! Where a run stands: everything besides tensors that a resume needs to continue exactly
//! (masking noise needs no state: it is a function of the position, see [`super::noise`]).

use serde::{Deserialize, Serialize};

/// The loop's position, saved at an optimizer-step boundary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// The epoch in progress (0-based).
    pub epoch: u64,
    /// Samples this rank has trained on in `epoch` (optimizer steps × samples per step).
    pub samples_in_epoch: u64,
    /// The loader's resume position in `epoch` (samples of this rank's slice consumed, skipped
    /// undecodable ones included); `None` in checkpoints written before it existed, where it
    /// equals `samples_in_epoch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader_position: Option<u64>,
    /// Processes in the run and this one's rank (1 and 0 for single-process training).
    pub world_size: u64,
    pub rank: u64,
    /// Why this checkpoint was written: `interval`, `epoch_end`, `interrupted`, `non_finite`, `final`.
    pub reason: String,
    /// Loss of the last completed step (None before the first).
    pub last_loss: Option<f64>,
    /// What the run trains on (a hash of its shard folders' manifests: every shard's SHA-256
    /// and rows, in order), so that a resumed run refuses other data; `None` in checkpoints
    /// written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}
