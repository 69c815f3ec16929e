//! ADE20K SceneParsing (`ADEChallengeData2016/{images,annotations}/<split>/`): each image with
//! its annotation PNG (stored unchanged: 8-bit, 0 = other, v = class index v-1).

use std::path::{Path, PathBuf};

use super::{rel_key, require_dir, utf8_key, walk_files, InputItem, Listing, Target};
use crate::error::{Result, ShardError};
use crate::format::Dataset;
use crate::manifest::{ClassEntry, SkippedEntry};

/// Options of the ADE20K reader.
#[derive(Debug, Clone, Default)]
pub struct Ade20kOptions {
    /// The `ADEChallengeData2016` folder.
    pub root: PathBuf,
    /// `training` or `validation`.
    pub split: String,
}

/// Reads `objectInfo150.txt` (`Idx Ratio Train Val Name` with a header line): class `Idx` has
/// index `Idx - 1`.
pub fn read_object_info(path: &Path) -> Result<Vec<ClassEntry>> {
    let text = std::fs::read_to_string(path).map_err(|e| ShardError::io(path, e))?;
    let mut classes = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        let bad = || {
            ShardError::dataset(
                path,
                format!(
                    "line {}: expected `Idx\\tRatio\\tTrain\\tVal\\tName`",
                    n + 1
                ),
            )
        };
        if cols.len() < 5 {
            return Err(bad());
        }
        let idx: u32 = cols[0].trim().parse().map_err(|_| bad())?;
        if idx as usize != classes.len() + 1 {
            return Err(ShardError::dataset(
                path,
                format!("line {}: Idx {idx} out of order", n + 1),
            ));
        }
        classes.push(ClassEntry {
            index: idx - 1,
            id: idx.to_string(),
            name: cols[4].trim().to_string(),
        });
    }
    if classes.is_empty() {
        return Err(ShardError::dataset(path, "no classes"));
    }
    Ok(classes)
}

/// Lists an ADE20K split. An image without its annotation PNG, and an annotation without its
/// image, are listed in `skipped` with the reason (an error under `--on-error fail`).
pub fn list(opts: &Ade20kOptions) -> Result<Listing> {
    let root = &opts.root;
    require_dir(root, "ADE20K root")?;
    let img_dir = root.join("images").join(&opts.split);
    let ann_dir = root.join("annotations").join(&opts.split);
    require_dir(&img_dir, "ADE20K image folder")?;
    require_dir(&ann_dir, "ADE20K annotation folder")?;
    let info = root.join("objectInfo150.txt");
    let classes = if info.is_file() {
        read_object_info(&info)?
    } else {
        // Without objectInfo150.txt: the 150 classes by number.
        (1..=150)
            .map(|i| ClassEntry {
                index: i - 1,
                id: i.to_string(),
                name: format!("class {i}"),
            })
            .collect()
    };
    let mut items = Vec::new();
    let mut skipped = Vec::new();
    let mut paired = std::collections::HashSet::new();
    // Recursive, like the ImageNet walk: an image in a subfolder is found (its annotation sits
    // in the same subfolder under annotations/<split>), never silently left out.
    for (path, stat) in walk_files(&img_dir)? {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rel = path.strip_prefix(&img_dir).unwrap_or(&path);
        let mask = ann_dir.join(rel).with_extension("png");
        if !mask.is_file() {
            // A stray Thumbs.db or an image without its label: bad input, listed with the
            // reason (the summary counts it), as unreadable images are.
            let reason = if name.starts_with('.') {
                "hidden file".into()
            } else {
                format!("no annotation PNG (expected {})", rel_key(root, &mask))
            };
            skipped.push(SkippedEntry {
                path: rel_key(root, &path),
                reason,
            });
            continue;
        }
        paired.insert(mask.clone());
        let Some(key) = utf8_key(root, &path) else {
            skipped.push(SkippedEntry {
                path: rel_key(root, &path),
                reason: super::NOT_UTF8.into(),
            });
            continue;
        };
        items.push(InputItem {
            key,
            path,
            size: stat.len,
            modified: stat.modified,
            target: Target::Mask(mask),
        });
    }
    // Annotations whose image is missing are not rows, but they are listed: nothing is
    // dropped without a note.
    for (path, _) in walk_files(&ann_dir)? {
        if !paired.contains(&path) {
            skipped.push(SkippedEntry {
                path: rel_key(root, &path),
                reason: "annotation without an image".into(),
            });
        }
    }
    let mut options = serde_json::Map::new();
    options.insert(
        "class_list".into(),
        if info.is_file() {
            "objectInfo150.txt"
        } else {
            "numbered"
        }
        .into(),
    );
    Listing {
        dataset: Dataset::Ade20k,
        split: opts.split.clone(),
        classes,
        items,
        skipped,
        options,
    }
    .finish()
}
