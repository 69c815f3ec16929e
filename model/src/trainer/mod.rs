//! Reusable pieces of a training loop that sit at the libtorch level: the seeded noise generator
//! whose state travels in checkpoints, the resumable train state, atomic checkpoint folders, and
//! CUDA precision settings. The loop itself lives in the `droppos-pipeline` binary.

pub mod checkpoint;
pub mod error;
pub mod precision;
pub mod rng;
pub mod state;

pub use checkpoint::{Checkpoint, CheckpointStore};
pub use error::TrainerError;
pub use rng::NoiseRng;
pub use state::TrainState;
