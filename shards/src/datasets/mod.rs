//! Dataset readers: each turns a dataset on disk into a [`Listing`], the sorted list of inputs
//! (paths and labels/annotations, never pixels) that the writer streams into shards.

pub mod ade20k;
pub mod coco;
pub mod imagenet;

use std::path::{Path, PathBuf};

use rayon::prelude::*;
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
    /// Modification time at listing time, ns since the epoch (0 if unknown): resume's stamp.
    pub modified: u128,
    pub target: Target,
}

/// Size and modification time of a file, from one `stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FileStat {
    pub len: u64,
    /// ns since the epoch; 0 when the platform or file system has none.
    pub modified: u128,
}

impl FileStat {
    pub fn of(m: &std::fs::Metadata) -> Self {
        let modified = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Self {
            len: m.len(),
            modified,
        }
    }
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
        // Modification times (of images, from the listing, and of masks) go into the stamp:
        // resume compares it (a file rewritten in place at the same size changes it), `shard
        // merge` does not (each node's copy of a dataset has its own times).
        let mut stamp = Sha256::new();
        for it in &self.items {
            stamp.update(it.modified.to_le_bytes());
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
                    let mask = std::fs::metadata(p)
                        .map(|m| FileStat::of(&m))
                        .unwrap_or_default();
                    h.update(mask.len.to_le_bytes());
                    stamp.update(mask.modified.to_le_bytes());
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
            stamp: hex::encode(stamp.finalize()),
        }
    }

    pub(crate) fn finish(mut self) -> Result<Self> {
        self.items.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(w) = self.items.windows(2).find(|w| w[0].key == w[1].key) {
            let how = if w[0].path == w[1].path {
                format!(
                    "{} is listed twice (two lines of a --list file, or two images of an annotation json)",
                    w[0].path.display()
                )
            } else {
                format!(
                    "{} and {} would be the same row",
                    w[0].path.display(),
                    w[1].path.display()
                )
            };
            return Err(ShardError::InvalidOptions(format!(
                "duplicate input key {:?}: {how}",
                w[0].key
            )));
        }
        self.skipped.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(self)
    }
}

/// The row key of `path` under `root` (relative, `/`-separated), or `None` when a name in it is
/// not valid UTF-8: keys are UTF-8 text, and a lossy one would name no file (and two such
/// names can become one key).
pub(crate) fn utf8_key(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let parts = rel
        .components()
        .map(|c| c.as_os_str().to_str())
        .collect::<Option<Vec<_>>>()?;
    Some(parts.join("/"))
}

/// Why an input whose name is not UTF-8 is skipped (see [`utf8_key`]).
pub(crate) const NOT_UTF8: &str =
    "file or folder name is not valid UTF-8 (row keys are UTF-8 text): rename it";

/// Key of `path` under `root` for messages and skip lists: relative, `/`-separated, UTF-8
/// (lossy for odd names).
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

/// A folder's identity (device and inode), where the platform has one.
type FolderId = (u64, u64);

#[cfg(unix)]
fn folder_id(m: &std::fs::Metadata) -> Option<FolderId> {
    use std::os::unix::fs::MetadataExt;
    Some((m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn folder_id(_: &std::fs::Metadata) -> Option<FolderId> {
    None
}

enum EntryKind {
    Dir(Option<FolderId>),
    /// A regular file, or a dangling symlink (size 0): the latter is listed so that reading it
    /// fails under the `--on-error` policy with a reason, not lost silently.
    File(FileStat),
    /// Sockets, FIFOs, devices: never dataset files.
    Other,
}

/// What `path` is, following symlinks (datasets are often linked farms).
fn kind_of(path: &Path) -> Result<EntryKind> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(EntryKind::Dir(folder_id(&m))),
        Ok(m) if m.is_file() => Ok(EntryKind::File(FileStat::of(&m))),
        Ok(_) => Ok(EntryKind::Other),
        Err(e) => match std::fs::symlink_metadata(path) {
            Ok(l) if l.file_type().is_symlink() => Ok(EntryKind::File(FileStat::default())),
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
///
/// A folder's entries are looked at in parallel, on the current rayon pool: listing takes one
/// `stat` per file (for its size and time, which resume and the in-place reads rely on), a
/// round trip each on a network file system, 1.28 M of them for ImageNet's train split.
///
/// Symbolic links are followed (datasets are often linked farms), except a link to a folder
/// that contains it (`loop -> ..`): that would list the same files again under ever longer
/// paths, and two such links never end. Its files are already listed under their real path,
/// so it is passed over with a warning.
pub(crate) fn walk_files(dir: &Path) -> Result<Vec<(PathBuf, FileStat)>> {
    // The folder and every folder above it: a link back to any of them is a cycle.
    let above: Vec<FolderId> = dir
        .canonicalize()
        .map_err(|e| ShardError::io(dir, e))?
        .ancestors()
        .filter_map(|a| std::fs::metadata(a).ok().and_then(|m| folder_id(&m)))
        .collect();
    let mut out = files_below(dir, &above)?;
    // Paths are unique: sorting by them alone is a total order.
    out.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// What one folder entry holds for [`files_below`].
enum Walked {
    Files(Vec<(PathBuf, FileStat)>),
    File(PathBuf, FileStat),
    Nothing,
}

/// [`walk_files`] without the sort; `above` holds `d` and the folders above it.
fn files_below(d: &Path, above: &[FolderId]) -> Result<Vec<(PathBuf, FileStat)>> {
    let rd = std::fs::read_dir(d).map_err(|e| ShardError::io(d, e))?;
    let paths = rd
        .map(|entry| entry.map(|e| e.path()).map_err(|e| ShardError::io(d, e)))
        .collect::<Result<Vec<PathBuf>>>()?;
    let walked = paths
        .into_par_iter()
        .map(|path| {
            Ok(match kind_of(&path)? {
                EntryKind::Dir(Some(id)) if above.contains(&id) => {
                    tracing::warn!(
                        "{} links back to a folder that contains it: not followed (its files \
                         are listed under their own path)",
                        path.display()
                    );
                    Walked::Nothing
                }
                EntryKind::Dir(id) => {
                    let mut below = above.to_vec();
                    below.extend(id);
                    Walked::Files(files_below(&path, &below)?)
                }
                EntryKind::File(stat) => Walked::File(path, stat),
                EntryKind::Other => Walked::Nothing,
            })
        })
        .collect::<Result<Vec<Walked>>>()?;
    let mut out = Vec::new();
    for w in walked {
        match w {
            Walked::Files(files) => out.extend(files),
            Walked::File(path, stat) => out.push((path, stat)),
            Walked::Nothing => {}
        }
    }
    Ok(out)
}

/// Immediate subfolders of `dir`, sorted by name.
pub(crate) fn subdirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| ShardError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| ShardError::io(dir, e))?;
        let path = entry.path();
        if matches!(kind_of(&path)?, EntryKind::Dir(_)) {
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
        if let EntryKind::File(stat) = kind_of(&path)? {
            out.push((
                entry.file_name().to_string_lossy().into_owned(),
                path,
                stat.len,
            ));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_files_lists_every_file_below_sorted_with_its_size() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let mut want = Vec::new();
        for (k, rel) in [
            "b/x.JPEG",
            "a/deep/er/1.png",
            "a/.hidden",
            "a/z",
            "c/d/e/f/g.JPEG",
        ]
        .iter()
        .enumerate()
        {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, vec![7u8; 10 * k + 1]).unwrap();
            want.push((p, 10 * k as u64 + 1));
        }
        std::fs::create_dir_all(root.join("empty/folder")).unwrap();
        #[cfg(unix)]
        {
            // A dangling link is listed (size 0), so reading it fails with a reason later.
            std::os::unix::fs::symlink(root.join("gone"), root.join("b/link.JPEG")).unwrap();
            want.push((root.join("b/link.JPEG"), 0));
        }
        want.sort();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let got: Vec<(PathBuf, u64)> = pool
            .install(|| walk_files(root))
            .unwrap()
            .into_iter()
            .map(|(p, s)| (p, s.len))
            .collect();
        assert_eq!(got, want);
        let err = walk_files(&root.join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
