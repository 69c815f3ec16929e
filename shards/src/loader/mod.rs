//! Streaming loader: shuffled, rank-partitioned, resumable, augmented batches from shards.
//!
//! ```no_run
//! use std::sync::Arc;
//! use droppos_shards::loader::{Loader, LoaderConfig};
//! let set = Arc::new(droppos_shards::loader::ShardSet::open(&["out/train".into()], true)?);
//! let loader = Loader::new(set, LoaderConfig::pretrain(224, 64))?;
//! for batch in loader.epoch(0, 0)? {
//!     let batch = batch?; // images [B, 3, 224, 224] u8, labels, keys
//!     // resume later with loader.epoch(batch.epoch, batch.consumed)
//! }
//! # Ok::<(), droppos_shards::loader::LoaderError>(())
//! ```
//!
//! Modules: [`sampler`] (order and rank slices), [`rng`] (per-sample random streams),
//! [`transform`] (crop geometry and per-sample processing), [`resample`] (Pillow-exact bicubic),
//! [`decode`] (libjpeg-turbo with crop/DCT scaling), [`batch`] (batch buffers), [`reader`]
//! (row-group access to shards) and [`pipeline`] (threads and bounded queues).
//!
//! Memory bound (resident, independent of dataset size apart from O(row groups) metadata):
//! the current shuffle window (`window_blocks` row groups of compressed image bytes) plus the
//! window being started, ≤ 2·B samples in the reader queue, the batch being filled, ≤ `prefetch`
//! finished batches (B·3·S² bytes each for u8, 4× that for f32) and one decoded image per
//! decode thread.

pub mod batch;
pub mod decode;
pub mod pipeline;
pub mod randaug;
pub mod reader;
pub use crate::resample;
pub mod rng;
pub mod sampler;
pub mod transform;

use std::sync::Arc;

pub use crate::error::OnError;
pub use batch::{Batch, Images, PixelFormat, SkippedSample, IMAGENET_MEAN, IMAGENET_STD};
pub use pipeline::EpochLoader;
pub use randaug::RandAugment;
pub use reader::ShardSet;
pub use sampler::{Pad, Partition};
pub use transform::{Augment, CropBox, Geometry, RrcParams};

use std::path::{Path, PathBuf};

/// Loader errors.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: parquet: {message}", path.display())]
    Parquet { path: PathBuf, message: String },
    /// The manifest is unreadable, or a shard differs from its manifest entry (size, sha256 or
    /// row count): the shard format's own errors.
    #[error(transparent)]
    Shard(#[from] crate::error::ShardError),
    /// A sample could not be decoded and the policy is `Fail`.
    #[error("{shard}: sample {key:?}: {reason}")]
    Sample {
        shard: String,
        key: String,
        reason: String,
    },
    #[error("loader configuration: {0}")]
    Config(String),
}

impl LoaderError {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> LoaderError {
        LoaderError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

/// Loader settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Output side S.
    pub size: usize,
    pub augment: Augment,
    pub pixel_format: PixelFormat,
    pub seed: u64,
    pub shuffle: bool,
    /// Row groups per shuffle window (memory vs mixing; see [`sampler`]).
    pub window_blocks: usize,
    pub world: usize,
    pub rank: usize,
    pub pad: Pad,
    /// How the epoch order is cut among ranks (strided, like DistributedSampler, by default).
    pub partition: Partition,
    /// Drop a last batch smaller than `batch_size`.
    pub drop_last: bool,
    /// Decode threads.
    pub threads: usize,
    /// Finished batches buffered ahead of the consumer.
    pub prefetch: usize,
    pub on_error: OnError,
    /// DCT-domain downscaling for crops at least 2 x [`transform::DCT_MIN_RATIO`] times the
    /// output size.
    pub dct_scaling: bool,
    /// RandAugment on the pre-training crops (fine-tuning; classification datasets only).
    pub randaug: Option<RandAugment>,
    /// Resampling arithmetic: [`resample::Precision::Fast`] (default; within rounding of
    /// Pillow) or [`resample::Precision::Exact`] (Pillow's bytes, ~1.1x slower loading: BENCHMARKS.md).
    pub resample: resample::Precision,
}

impl LoaderConfig {
    /// Pre-training defaults: RandomResizedCrop + flip, shuffled, u8 output.
    pub fn pretrain(size: usize, batch_size: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            size,
            augment: Augment::Pretrain {
                rrc: RrcParams::default(),
                flip: true,
            },
            pixel_format: PixelFormat::U8,
            seed: 0,
            shuffle: true,
            window_blocks: 8,
            world: 1,
            rank: 0,
            pad: Pad::Wrap,
            partition: Partition::Strided,
            drop_last: true,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            prefetch: 2,
            on_error: OnError::Skip,
            dct_scaling: true,
            randaug: None,
            resample: resample::Precision::Fast,
        }
    }

    /// Evaluation defaults: resize + centre crop, manifest order, every sample once.
    pub fn eval(size: usize, batch_size: usize) -> LoaderConfig {
        LoaderConfig {
            augment: Augment::Eval,
            shuffle: false,
            drop_last: false,
            ..LoaderConfig::pretrain(size, batch_size)
        }
    }

    fn validate(&self, set: &ShardSet) -> Result<(), LoaderError> {
        if self.batch_size == 0 || self.size == 0 {
            return Err(LoaderError::Config(
                "batch size and image size must be positive".into(),
            ));
        }
        // What one batch buffer takes (f32 is the larger format): refused beyond 64 GiB, and
        // the counts of queued batches and threads bounded, so that a mistyped number is an
        // error here rather than an aborted allocation or 100,000 threads later.
        let batch_bytes = (self.batch_size as u128) * 3 * (self.size as u128).pow(2) * 4;
        if self.size > 1 << 14 || batch_bytes > 1 << 36 {
            return Err(LoaderError::Config(format!(
                "a batch of {} images at {} px needs {:.1} GB; lower the batch size or image size",
                self.batch_size,
                self.size,
                batch_bytes as f64 / 1e9
            )));
        }
        if self.prefetch > 1024 || self.threads > 1024 {
            return Err(LoaderError::Config(format!(
                "prefetch {} / threads {}: at most 1024 each",
                self.prefetch, self.threads
            )));
        }
        if self.world == 0 || self.rank >= self.world {
            return Err(LoaderError::Config(format!(
                "rank {} out of world size {}",
                self.rank, self.world
            )));
        }
        if self.randaug.is_some()
            && (set.columns().mask
                || set.columns().patch_labels
                || !matches!(self.augment, Augment::Pretrain { .. }))
        {
            return Err(LoaderError::Config(
                "RandAugment applies to augmented classification images only (no masks or \
                 patch labels, not the evaluation transform)"
                    .into(),
            ));
        }
        if set.columns().patch_labels && !self.size.is_multiple_of(set.patch_size().max(1)) {
            return Err(LoaderError::Config(format!(
                "size {} is not a multiple of the patch size {}",
                self.size,
                set.patch_size()
            )));
        }
        Ok(())
    }
}

/// A loader over a shard set.
#[derive(Debug, Clone)]
pub struct Loader {
    set: Arc<ShardSet>,
    config: LoaderConfig,
    /// Decode threads and spare batch buffers shared by all epochs, so that a new epoch starts
    /// with warm per-thread decoders and recycled buffers instead of fresh threads and pages.
    shared: Arc<pipeline::Shared>,
}

impl Loader {
    pub fn new(set: Arc<ShardSet>, config: LoaderConfig) -> Result<Loader, LoaderError> {
        config.validate(&set)?;
        let shared = Arc::new(pipeline::Shared::new(&config)?);
        Ok(Loader {
            set,
            config,
            shared,
        })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    pub fn shard_set(&self) -> &Arc<ShardSet> {
        &self.set
    }

    /// Samples of this rank's slice per epoch.
    pub fn samples_per_epoch(&self) -> u64 {
        sampler::RankSlice::with_partition(
            self.set.num_samples(),
            self.config.world as u64,
            self.config.rank as u64,
            self.config.pad,
            self.config.partition,
        )
        .len
    }

    /// The batches of `epoch`, starting after `consumed` samples of this rank's slice (0 for a
    /// fresh epoch, or a batch's `consumed` to resume right after it).
    pub fn epoch(&self, epoch: u64, consumed: u64) -> Result<EpochLoader, LoaderError> {
        EpochLoader::start(
            self.set.clone(),
            self.config,
            self.shared.clone(),
            epoch,
            consumed,
        )
    }
}
