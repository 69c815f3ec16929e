//! Where batches come from: an epoch-addressable, resumable stream of image batches.

use anyhow::Result;
use tch::Tensor;

/// A deterministic batch stream: epoch `e` always yields the same sequence for this rank, and a
/// stream can start part-way into an epoch (the resume position).
pub trait BatchSource {
    /// Samples this rank sees per epoch.
    fn samples_per_epoch(&self) -> u64;

    /// Positions the stream at `epoch`, having skipped `samples_consumed` samples of it.
    fn start_epoch(&mut self, epoch: u64, samples_consumed: u64) -> Result<()>;

    /// The next micro-batch, or `None` at the end of the epoch.
    fn next_batch(&mut self) -> Result<Option<SourceBatch>>;

    /// What the source holds, as a hash (the same data gives the same hash), if it has one.
    fn data_fingerprint(&self) -> Option<String> {
        None
    }
}

/// One micro-batch for the loop.
pub struct SourceBatch {
    /// Normalised float images [B,3,S,S] on the training device.
    pub images: Tensor,
    /// Each sample's position in the whole epoch order (the same for any number of ranks):
    /// the masking noise is keyed by it.
    pub epoch_positions: Vec<u64>,
    /// Samples of this rank's epoch slice consumed after this batch (skipped ones included):
    /// where to resume to continue right after it.
    pub consumed: u64,
    /// Undecodable samples the source skipped while filling this batch.
    pub skipped: u64,
}
