//! Dataset readers: each turns a dataset on disk into a [`Listing`], the sorted list of inputs
//! (paths and labels/annotations, never pixels) that the writer streams into shards.

pub mod ade20k;
pub mod coco;
pub mod imagenet;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Result, ShardError};
use crate::format::Dataset;
use crate::manifest::{ClassEntry, InputsInfo, SkippedEntry};

pub use coco::{CocoAnnotation, Segmentation};

/// What is known about one input before its bytes are read.
#[derive(Debug, Clone, PartialEq)]
pub struct InputItem {
    /// The row key: path relative to the root with `/` separators, or the COCO `file_name`.
    pub key: String,
    /// Where the image is on disk.
    pub path: PathBuf,
    /// File size at listing time (part of the inputs fingerprint used by resume).
    pub size: u64,
    pub target: Target,
}

/// Per-dataset supervision for one input.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// ImageNet class index.
    Label(i32),
    /// COCO image id and its annotations in json order.
    Coco {
        image_id: i64,
        annotations: Vec<CocoAnnotation>,
    },
    /// ADE20K annotation PNG.
    Mask(PathBuf),
}

/// A dataset ready to be written.
#[derive(Debug, Clone)]
pub struct Listing {
    pub dataset: Dataset,
    pub split: String,
    pub classes: Vec<ClassEntry>,
    /// Sorted by key (bytewise); unique keys.
    pub items: Vec<InputItem>,
    /// Inputs rejected while listing (e.g. a file in a folder that is not a class).
    pub skipped: Vec<SkippedEntry>,
    /// Dataset-specific settings that shaped the listing (class list file, label list, ...).
    pub options: serde_json::Map<String, serde_json::Value>,
}

impl Listing {
    /// Count and sha256 over every item's key, size and target: identifies the input set.
    pub fn fingerprint(&self) -> InputsInfo {
        let mut h = Sha256::new();
        for it in &self.items {
            h.update(it.key.as_bytes());
            h.update([0]);
            h.update(it.size.to_le_bytes());
            match &it.target {
                Target::Label(l) => h.update(l.to_le_bytes()),
                Target::Coco {
                    image_id,
                    annotations,
                } => {
                    h.update(image_id.to_le_bytes());
                    // Every field (bbox, area, segmentation...): an edited json is new input.
                    // `{:?}` prints floats exactly (shortest round-trip form).
                    for a in annotations {
                        h.update(format!("{a:?}").as_bytes());
                        h.update([0]);
                    }
                }
                Target::Mask(p) => {
                    // The file name and size: the fingerprint must not depend on where the root
                    // is mounted.
                    h.update(
                        p.file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                            .as_bytes(),
                    );
                    h.update(std::fs::metadata(p).map_or(0, |m| m.len()).to_le_bytes());
                }
            }
            h.update([b'\n']);
        }
        for s in &self.skipped {
            h.update(s.path.as_bytes());
            h.update([0]);
        }
        InputsInfo {
            count: self.items.len() as u64,
            sha256: hex::encode(h.finalize()),
            stamp: self.stamp(),
        }
    }

    /// sha256 over the modification times of every input file (and ADE20K mask): a file
    /// rewritten in place at the same size changes it. Resume compares it (a shard of older
    /// inputs is redone); `shard merge` does not (each node's copy has its own times).
    fn stamp(&self) -> String {
        use rayon::prelude::*;
        let mtime = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos())
        };
        let times: Vec<(u128, u128)> = self
            .items
            .par_iter()
            .map(|it| {
                let mask = match &it.target {
                    Target::Mask(p) => mtime(p),
                    _ => 0,
                };
                (mtime(&it.path), mask)
            })
            .collect();
        let mut h = Sha256::new();
        for (image, mask) in times {
            h.update(image.to_le_bytes());
            h.update(mask.to_le_bytes());
        }
        hex::encode(h.finalize())
    }

    pub(crate) fn finish(mut self) -> Result<Self> {
        self.items.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(w) = self.items.windows(2).find(|w| w[0].key == w[1].key) {
            return Err(ShardError::InvalidOptions(format!(
                "duplicate input key {:?}",
                w[0].key
            )));
        }
        self.skipped.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(self)
    }
}

/// Key of `path` under `root`: relative, `/`-separated, UTF-8 (lossy for odd names).
pub(crate) fn rel_key(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Checks that `dir` is a readable folder, with an error naming it.
pub(crate) fn require_dir(dir: &Path, what: &str) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(_) => Ok(()),
        Err(e) => Err(ShardError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(e.kind(), format!("{what}: {e}")),
        }),
    }
}

enum EntryKind {
    Dir,
    /// A regular file (size in bytes), or a dangling symlink (size 0): the latter is listed so
    /// that reading it fails under the `--on-error` policy with a reason, not lost silently.
    File(u64),
    /// Sockets, FIFOs, devices: never dataset files.
    Other,
}

/// What `path` is, following symlinks (datasets are often linked farms).
fn kind_of(path: &Path) -> Result<EntryKind> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(EntryKind::Dir),
        Ok(m) if m.is_file() => Ok(EntryKind::File(m.len())),
        Ok(_) => Ok(EntryKind::Other),
        Err(e) => match std::fs::symlink_metadata(path) {
            Ok(l) if l.file_type().is_symlink() => Ok(EntryKind::File(0)),
            _ => Err(ShardError::io(path, e)),
        },
    }
}

/// Why `path` could not be read: a dangling symlink says where it points.
pub(crate) fn read_error(path: &Path, e: &std::io::Error) -> String {
    match std::fs::read_link(path) {
        Ok(target) if std::fs::metadata(path).is_err() => format!(
            "broken symbolic link (its target {} does not exist)",
            target.display()
        ),
        _ => e.to_string(),
    }
}

/// Regular files under `dir`, recursively, sorted by path. Hidden entries are included (they
/// are reported as skipped later if they are not images, never silently dropped).
pub(crate) fn walk_files(dir: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(|e| ShardError::io(&d, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| ShardError::io(&d, e))?;
            let path = entry.path();
            match kind_of(&path)? {
                EntryKind::Dir => stack.push(path),
                EntryKind::File(len) => out.push((path, len)),
                EntryKind::Other => {}
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Immediate subfolders of `dir`, sorted by name.
pub(crate) fn subdirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| ShardError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| ShardError::io(dir, e))?;
        let path = entry.path();
        if matches!(kind_of(&path)?, EntryKind::Dir) {
            out.push((entry.file_name().to_string_lossy().into_owned(), path));
        }
    }
    out.sort();
    Ok(out)
}

/// Files directly inside `dir`, sorted by name.
pub(crate) fn files_in(dir: &Path) -> Result<Vec<(String, PathBuf, u64)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| ShardError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| ShardError::io(dir, e))?;
        let path = entry.path();
        if let EntryKind::File(len) = kind_of(&path)? {
            out.push((entry.file_name().to_string_lossy().into_owned(), path, len));
        }
    }
    out.sort();
    Ok(out)
}
