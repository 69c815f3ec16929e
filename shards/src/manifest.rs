//! `manifest.json`: what a dataset folder holds, and the reader-side API.
//!
//! The manifest is written last and atomically (temp file, fsync, rename), so a folder with a
//! manifest is complete. Readers use [`Manifest::load`], [`Manifest::shard_path`] and
//! [`Manifest::verify_shard`] (or [`verify_shard_file`]) to resolve and check shard files.
//!
//! ```no_run
//! use droppos_shards::manifest::Manifest;
//! let m = Manifest::load("out/imagenet-train".as_ref())?;
//! for (i, shard) in m.shards.iter().enumerate() {
//!     m.verify_shard(i)?; // size + sha256
//!     println!("{} rows in {}", shard.rows, m.shard_path(i).display());
//! }
//! # Ok::<(), droppos_shards::error::ShardError>(())
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, ShardError};
use crate::format::{Dataset, FORMAT_VERSION, MANIFEST_FILE};

/// One class: `index` is the label value stored in shards (ImageNet `label`, COCO
/// `category_index`; patch layouts store `index + 1`, 0 meaning background/other). `id` is the
/// dataset's own identifier as text (ImageNet wnid, COCO category id, ADE20K `Idx`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassEntry {
    pub index: u32,
    pub id: String,
    pub name: String,
}

/// Merges the class lists of several dataset folders, checking that every label means one
/// thing: wherever two lists define an index their ids agree (a shorter list may stop early,
/// an empty one says nothing). `Err` names the first disagreement, e.g. a train folder sharded
/// with `--classes synset_words.txt` and a val folder with the folder order.
pub fn merge_class_lists<'a>(
    lists: impl IntoIterator<Item = (&'a Path, &'a [ClassEntry])>,
) -> std::result::Result<Vec<ClassEntry>, String> {
    let mut merged: std::collections::BTreeMap<u32, (&ClassEntry, &Path)> = Default::default();
    for (dir, list) in lists {
        for c in list {
            match merged.get(&c.index) {
                Some((first, first_dir)) if first.id != c.id => {
                    return Err(format!(
                        "{}: label {} is `{}` ({}) there but `{}` ({}) in {}: the folders were \
                         sharded with different class lists (e.g. --classes FILE for one, the \
                         folder order for the other); re-shard one with the other's list",
                        dir.display(),
                        c.index,
                        c.id,
                        c.name,
                        first.id,
                        first.name,
                        first_dir.display()
                    ))
                }
                Some(_) => {}
                None => {
                    merged.insert(c.index, (c, dir));
                }
            }
        }
    }
    Ok(merged.into_values().map(|(c, _)| c.clone()).collect())
}

/// One shard file, relative to the manifest's folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name relative to the dataset folder, e.g. `shard-000000.parquet`.
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: String,
}

/// An input that was not stored, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedEntry {
    /// Path relative to the dataset root (or COCO file name).
    pub path: String,
    pub reason: String,
}

/// An input stored in a different form than its source bytes (e.g. a PNG named `.JPEG`
/// with alpha, stored as an RGB PNG).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversionEntry {
    pub key: String,
    /// What the source was, e.g. `png rgba8`.
    pub from: String,
    /// What was stored, e.g. `png rgb8`.
    pub to: String,
}

/// Set for the manifest of one `--num-workers` part; absent for a complete dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    pub worker_index: u32,
    pub num_workers: u32,
    /// Shards of the whole dataset (all parts together).
    pub total_shards: u32,
}

/// Fingerprint of the input listing: count and sha256 over the sorted keys and sizes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputsInfo {
    pub count: u64,
    pub sha256: String,
    /// sha256 over the inputs' modification times (see `Listing::fingerprint`); resume
    /// reuses a shard only when it matches, `shard merge` ignores it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stamp: String,
}

/// The content of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Name of the writing tool (`droppos-pipeline`).
    pub tool: String,
    /// Version of the writing tool.
    pub tool_version: String,
    pub dataset: Dataset,
    pub split: String,
    /// Rows over all shards listed here.
    pub num_rows: u64,
    pub classes: Vec<ClassEntry>,
    pub patch_size: u32,
    pub shards: Vec<ShardEntry>,
    pub skipped: Vec<SkippedEntry>,
    #[serde(default)]
    pub conversions: Vec<ConversionEntry>,
    /// Every setting that shaped the output bytes (seed, shuffle, shard rows, zstd level, ...).
    pub options: serde_json::Map<String, serde_json::Value>,
    pub inputs: InputsInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PartInfo>,
    /// Folder the manifest was loaded from (not serialised); shard paths resolve against it.
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Manifest {
    /// Reads `dir/manifest.json` (or `dir` itself when it is a `.json` file), checks the format
    /// version and that every shard file name stays inside the folder.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let (folder, file) = if dir.extension().is_some_and(|e| e == "json") && dir.is_file() {
            (
                dir.parent().unwrap_or(Path::new(".")).to_path_buf(),
                dir.to_path_buf(),
            )
        } else {
            (dir.to_path_buf(), dir.join(MANIFEST_FILE))
        };
        let text = std::fs::read_to_string(&file).map_err(|e| ShardError::io(&file, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ShardError::manifest(&file, e.to_string()))?;
        let found = match value.get("format_version") {
            None => return Err(ShardError::manifest(&file, "missing format_version")),
            Some(v) => v.as_u64().filter(|&v| v >= 1).ok_or_else(|| {
                ShardError::manifest(
                    &file,
                    format!("format_version {v} is not a version (1, 2, ...)"),
                )
            })?,
        };
        if found > FORMAT_VERSION as u64 {
            return Err(ShardError::FormatVersion {
                path: file,
                found: found as u32,
                supported: FORMAT_VERSION,
            });
        }
        let mut m: Manifest = serde_json::from_value(value)
            .map_err(|e| ShardError::manifest(&file, e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        for s in &m.shards {
            check_relative(&s.file).map_err(|msg| ShardError::manifest(&file, msg))?;
            // `a.parquet` and `./a.parquet` are one file: its rows would count twice.
            let normal: PathBuf = Path::new(&s.file)
                .components()
                .filter(|c| !matches!(c, Component::CurDir))
                .collect();
            if !seen.insert(normal) {
                return Err(ShardError::manifest(
                    &file,
                    format!("shard {} is listed twice", s.file),
                ));
            }
        }
        if m.patch_size == 0 {
            return Err(ShardError::manifest(&file, "patch_size is 0"));
        }
        // Checked: row counts near u64::MAX would wrap into a plausible total.
        let rows = m
            .shards
            .iter()
            .try_fold(0u64, |t, s| t.checked_add(s.rows))
            .ok_or_else(|| ShardError::manifest(&file, "the shards' row counts overflow"))?;
        if rows != m.num_rows {
            return Err(ShardError::manifest(
                &file,
                format!("num_rows is {} but the shards hold {rows}", m.num_rows),
            ));
        }
        m.dir = folder;
        Ok(m)
    }

    /// Writes `dir/<file_name>` atomically (temp file, fsync, rename). Deterministic bytes:
    /// pretty JSON with fields in declaration order and a final newline.
    pub fn save_as(&self, dir: &Path, file_name: &str) -> Result<PathBuf> {
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| ShardError::manifest(dir.join(file_name), e.to_string()))?;
        text.push('\n');
        let path = dir.join(file_name);
        write_atomic(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Writes `dir/manifest.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        self.save_as(dir, MANIFEST_FILE)
    }

    /// Absolute (or folder-relative) path of shard `i`. Panics if `i` is out of range.
    pub fn shard_path(&self, i: usize) -> PathBuf {
        self.dir.join(&self.shards[i].file)
    }

    /// Paths of all shards, in manifest order.
    pub fn shard_paths(&self) -> Vec<PathBuf> {
        (0..self.shards.len()).map(|i| self.shard_path(i)).collect()
    }

    /// Checks shard `i`'s size and sha256 against the manifest.
    pub fn verify_shard(&self, i: usize) -> Result<()> {
        verify_shard_file(&self.shard_path(i), &self.shards[i])
    }

    /// Index of the class with dataset id `id` (wnid, COCO category id, ADE20K Idx).
    pub fn class_index(&self, id: &str) -> Option<u32> {
        self.classes.iter().find(|c| c.id == id).map(|c| c.index)
    }
}

/// Rejects absolute paths and `..` so a manifest cannot point outside its folder.
fn check_relative(file: &str) -> std::result::Result<(), String> {
    let p = Path::new(file);
    if file.is_empty()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "shard file {file:?} must be a relative path inside the folder"
        ));
    }
    Ok(())
}

/// Size and sha256 of a file, streamed (never the whole file in memory).
pub fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = File::open(path).map_err(|e| ShardError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| ShardError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// Checks one shard file against its manifest entry: size first (cheap), then sha256.
pub fn verify_shard_file(path: &Path, entry: &ShardEntry) -> Result<()> {
    let len = std::fs::metadata(path)
        .map_err(|e| ShardError::io(path, e))?
        .len();
    if len != entry.bytes {
        return Err(ShardError::ShardMismatch {
            path: path.to_path_buf(),
            what: "size in bytes",
            expected: entry.bytes.to_string(),
            actual: len.to_string(),
        });
    }
    let (_, sha) = hash_file(path)?;
    if sha != entry.sha256 {
        return Err(ShardError::ShardMismatch {
            path: path.to_path_buf(),
            what: "sha256",
            expected: entry.sha256.clone(),
            actual: sha,
        });
    }
    Ok(())
}

/// Writes `bytes` to `path` through `path.tmp-<pid>`, fsyncs and renames, so readers see the
/// old file or the new one, never a partial one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let mut f = File::create(&tmp).map_err(|e| ShardError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| ShardError::io(&tmp, e))?;
    f.sync_all().map_err(|e| ShardError::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| ShardError::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// The temp name used while `path` is being written (`.<name>.tmp-<pid>`, hidden, unique per
/// process so concurrent workers never share one).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Best-effort fsync of a folder so a rename survives a power cut (no-op where unsupported).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_lists_merge_only_when_labels_agree() {
        let c = |index, id: &str| ClassEntry {
            index,
            id: id.into(),
            name: format!("name of {id}"),
        };
        let full = vec![c(0, "n01"), c(1, "n02"), c(2, "n03")];
        let prefix = [c(0, "n01"), c(1, "n02")];
        let (a, b) = (Path::new("train"), Path::new("val"));
        let merged = merge_class_lists([(a, &prefix[..]), (b, &full[..]), (b, &[][..])]).unwrap();
        assert_eq!(merged, full);
        // The val folder's own (sorted-folder) order: label 1 means another class.
        let other = [c(0, "n01"), c(1, "n03")];
        let e = merge_class_lists([(a, &full[..]), (b, &other[..])]).unwrap_err();
        assert!(
            e.starts_with("val: label 1 is `n03`") && e.contains("`n02`"),
            "{e}"
        );
    }

    fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            tool: "droppos-pipeline".into(),
            tool_version: "0.1.0".into(),
            dataset: Dataset::Imagenet,
            split: "train".into(),
            num_rows: 3,
            classes: vec![ClassEntry {
                index: 0,
                id: "n01440764".into(),
                name: "tench".into(),
            }],
            patch_size: 16,
            shards: vec![ShardEntry {
                file: "shard-000000.parquet".into(),
                rows: 3,
                bytes: 5,
                sha256: hex::encode(Sha256::digest(b"hello")),
            }],
            skipped: vec![SkippedEntry {
                path: "x/bad.JPEG".into(),
                reason: "empty file".into(),
            }],
            conversions: vec![],
            options: serde_json::Map::new(),
            inputs: InputsInfo {
                count: 4,
                sha256: "00".into(),
                stamp: String::new(),
            },
            part: None,
            dir: PathBuf::new(),
        }
    }

    #[test]
    fn save_load_round_trip_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        m.save(dir.path()).unwrap();
        std::fs::write(dir.path().join("shard-000000.parquet"), b"hello").unwrap();
        let back = Manifest::load(dir.path()).unwrap();
        assert_eq!(back.dir, dir.path());
        assert_eq!(back.shards, m.shards);
        assert_eq!(back.classes, m.classes);
        assert_eq!(back.shard_path(0), dir.path().join("shard-000000.parquet"));
        back.verify_shard(0).unwrap();
        // Also loadable from the file path itself.
        let again = Manifest::load(&dir.path().join(MANIFEST_FILE)).unwrap();
        assert_eq!(again.dir, dir.path());
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    }

    #[test]
    fn verify_catches_flipped_byte_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        m.save(dir.path()).unwrap();
        let p = dir.path().join("shard-000000.parquet");
        std::fs::write(&p, b"hellp").unwrap();
        let err = Manifest::load(dir.path())
            .unwrap()
            .verify_shard(0)
            .unwrap_err();
        assert!(
            matches!(err, ShardError::ShardMismatch { what: "sha256", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("shard-000000.parquet"));
        std::fs::write(&p, b"hell").unwrap();
        let err = verify_shard_file(&p, &m.shards[0]).unwrap_err();
        assert!(matches!(
            err,
            ShardError::ShardMismatch {
                what: "size in bytes",
                ..
            }
        ));
    }

    #[test]
    fn rejects_escaping_paths_newer_versions_and_bad_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample();
        m.shards[0].file = "../evil.parquet".into();
        m.save(dir.path()).unwrap();
        assert!(matches!(
            Manifest::load(dir.path()),
            Err(ShardError::Manifest { .. })
        ));
        let mut m = sample();
        m.format_version = FORMAT_VERSION + 1;
        m.save(dir.path()).unwrap();
        assert!(matches!(
            Manifest::load(dir.path()),
            Err(ShardError::FormatVersion { .. })
        ));
        let mut m = sample();
        m.num_rows = 7;
        m.save(dir.path()).unwrap();
        let err = Manifest::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("num_rows"), "{err}");
        std::fs::write(dir.path().join(MANIFEST_FILE), b"{not json").unwrap();
        assert!(matches!(
            Manifest::load(dir.path()),
            Err(ShardError::Manifest { .. })
        ));
        let missing = dir.path().join("nope");
        assert!(matches!(
            Manifest::load(&missing),
            Err(ShardError::Io { .. })
        ));
    }
}
