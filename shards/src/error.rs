//! Typed errors of the shards crate.
//!
//! [`ShardError`] is what every fallible public function returns. [`ImageRejection`] is the
//! reason one input image cannot be stored; the writer turns it into a `skipped` entry of the
//! manifest (or a [`ShardError::BadInput`] with `--on-error fail`).

use std::fmt;
use std::path::{Path, PathBuf};

/// The policy for an input that cannot be used: an image the writer cannot store, a sample the
/// loader cannot decode. One policy for both, so that `shard`, `train` and `bench loader` mean
/// the same by `skip` and `fail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Go on without it, and say so: the writer lists it in the manifest's `skipped`; the loader
    /// logs it (shard and key), records it in `Batch::skipped` and fills the slot with the next
    /// sample of the order.
    #[default]
    Skip,
    /// Stop with an error naming it ([`ShardError::BadInput`] / [`ShardError::BadListing`] in
    /// the writer, `LoaderError::Sample` in the loader).
    Fail,
}

/// Result alias of the crate.
pub type Result<T, E = ShardError> = std::result::Result<T, E>;

/// Everything that can go wrong while writing, reading or checking shards.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `manifest.json` is missing fields, is not JSON, or names files outside its folder.
    #[error("{}: invalid manifest: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
    /// The manifest was written by a newer, incompatible format.
    #[error("{}: manifest format_version {found} is not supported (this build reads {supported})", path.display())]
    FormatVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// A shard file differs from what the manifest recorded (hash, size or row count).
    #[error("{}: {what}: manifest says {expected}, file has {actual}", path.display())]
    ShardMismatch {
        path: PathBuf,
        what: &'static str,
        expected: String,
        actual: String,
    },
    /// A Parquet or Arrow error while reading or writing a shard.
    #[error("{}: parquet: {message}", path.display())]
    Parquet { path: PathBuf, message: String },
    /// One row of a shard is unreadable (failed image/mask decode, bad column).
    #[error("{} row {row}: {message}", path.display())]
    BadRow {
        path: PathBuf,
        row: u64,
        message: String,
    },
    /// Another `shard` command (the same worker of the same output) is writing to this folder.
    #[error(
        "{}: another shard command is writing to this folder (lock {} held); wait for it to \
         finish or choose another --out",
        out.display(),
        lock.display()
    )]
    Busy { out: PathBuf, lock: PathBuf },
    /// A dataset's metadata (annotation json, class list, label list) is malformed or missing.
    #[error("{}: {message}", path.display())]
    Dataset { path: PathBuf, message: String },
    /// An input image was rejected and `--on-error fail` was requested.
    #[error("{}: {reason}", path.display())]
    BadInput {
        path: PathBuf,
        reason: ImageRejection,
    },
    /// An input found unusable while listing the dataset (a missing annotation PNG, a file the
    /// annotation json or a list names but the folder lacks, a folder outside the class list)
    /// and `--on-error fail` was requested. `path` is relative to the dataset's root.
    #[error("{path}: {reason} (--on-error fail)")]
    BadListing { path: String, reason: String },
    /// Options that contradict each other or the data on disk.
    #[error("{0}")]
    InvalidOptions(String),
}

impl ShardError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        ShardError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A dataset-metadata error naming its file.
    pub fn dataset(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        ShardError::Dataset {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// A Parquet/Arrow error naming its file.
    pub fn parquet(path: impl AsRef<Path>, err: impl fmt::Display) -> Self {
        ShardError::Parquet {
            path: path.as_ref().to_path_buf(),
            message: err.to_string(),
        }
    }

    /// A manifest error naming its file.
    pub fn manifest(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        ShardError::Manifest {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }
}

/// Why one input image (or ADE20K mask) cannot be stored. `Display` is the `reason` written to
/// the manifest's `skipped` list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRejection {
    /// Zero bytes.
    #[error("empty file")]
    Empty,
    /// The magic bytes match no image format.
    #[error("not an image (unrecognised magic bytes)")]
    NotAnImage,
    /// An image format this tool does not read (BigTIFF, ...).
    #[error("unsupported image format: {0}")]
    UnsupportedFormat(&'static str),
    /// The data ends before the image does.
    #[error("truncated {format}: {detail}")]
    Truncated {
        format: &'static str,
        detail: String,
    },
    /// The data is structurally broken or fails to decode.
    #[error("corrupt {format}: {detail}")]
    Corrupt {
        format: &'static str,
        detail: String,
    },
    /// `--resize-short-side` would give a side longer than a JPEG can hold (65,500 pixels).
    #[error("resized to {width}x{height}, beyond JPEG's 65,500-pixel side limit (keep original bytes or choose a smaller --resize-short-side)")]
    ResizedTooLong { width: u32, height: u32 },
    /// The header claims more pixels than allowed; refused before any pixel buffer is allocated.
    #[error("image too large: header claims {width}x{height} = {pixels} pixels, limit {limit} (possible decompression bomb)")]
    TooLarge {
        width: u64,
        height: u64,
        pixels: u64,
        limit: u64,
    },
    /// The file could not be read.
    #[error("unreadable: {0}")]
    Unreadable(String),
    /// A mask (ADE20K annotation) is unusable or does not fit its image.
    #[error("bad mask: {0}")]
    BadMask(String),
    /// A COCO annotation cannot be rasterised for this image (e.g. RLE size mismatch).
    #[error("bad annotation: {0}")]
    BadAnnotation(String),
}
