//! Reusable pieces of a training loop that sit at the libtorch level: per-sample masking noise
//! keyed by (seed, epoch, position), the resumable train state, atomic checkpoint folders, and
//! CUDA precision settings. The loop itself lives in the `droppos-pipeline` binary.

pub mod checkpoint;
pub mod error;
pub mod noise;
pub mod precision;
pub mod state;

pub use checkpoint::{Checkpoint, CheckpointStore};
pub use error::TrainerError;
pub use noise::SampleNoise;
pub use state::TrainState;
