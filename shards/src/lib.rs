//! droppos-shards: dataset readers (ImageNet, COCO, ADE20K), the zstd Parquet shard writer,
//! the manifest, verification and the streaming loader. No libtorch.
//!
//! Reader-side entry points: [`manifest::Manifest::load`], [`manifest::Manifest::shard_path`],
//! [`manifest::Manifest::verify_shard`]; the column contract is in [`format`].
//!
//! Writing: list a dataset with [`datasets::imagenet::list`], [`datasets::coco::list`] or
//! [`datasets::ade20k::list`], then [`writer::write_dataset`]; check with
//! [`verify::verify_dataset`].

mod baseline_jpeg;
pub mod codec;
pub mod datasets;
pub mod error;
pub mod format;
pub mod hash_pairs;
pub mod jpeg_restart;
pub mod loader;
pub mod lock;
pub mod manifest;
pub mod patch_layout;
pub mod resample;
pub mod sha256;
mod turbo;
pub mod verify;
pub mod writer;

pub use error::{ImageRejection, OnError, ShardError};
pub use format::{Dataset, FORMAT_VERSION, MANIFEST_FILE};
pub use manifest::Manifest;
