//! ImageNet in the ImageFolder layout (`ROOT/<wnid>/<file>`).
//!
//! Labels: by default the sorted folder names (torchvision's `ImageFolder` order). A class file
//! (`synset_words.txt`, `LOC_synset_mapping.txt`: first token = class id, 0-based line number =
//! label) fixes the order instead. A label list (`relative/path label` lines, as MAE-style
//! train.txt/val.txt; Caffe's val.txt with bare file names also works: names are matched to
//! files anywhere under the root; a label may also be a class id such as a wnid; Kaggle's
//! `LOC_val_solution.csv` is read as such a list) gives labels per file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{
    files_in, rel_key, require_dir, subdirs, utf8_key, walk_files, FileStat, InputItem, Listing,
    Target, NOT_UTF8,
};
use crate::error::{Result, ShardError};
use crate::format::Dataset;
use crate::manifest::{ClassEntry, SkippedEntry};

/// Options of the ImageNet reader.
#[derive(Debug, Clone, Default)]
pub struct ImagenetOptions {
    pub root: PathBuf,
    /// Class list file (first token = id, line number = label).
    pub classes: Option<PathBuf>,
    /// Label list file (`path label` lines).
    pub list: Option<PathBuf>,
    /// Split name for the manifest; default: the root folder's name.
    pub split: Option<String>,
}

/// Reads a class file: one class per non-empty line, `id rest-of-line-as-name`.
pub fn read_class_file(path: &Path) -> Result<Vec<ClassEntry>> {
    let text = std::fs::read_to_string(path).map_err(|e| ShardError::io(path, e))?;
    // Editors on Windows save a byte-order mark, which would become part of the first id.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut classes = Vec::new();
    let mut seen = HashMap::new();
    // A label is its class's 0-based line number: a blank line before the last class would
    // either shift every label after it or leave a label with no class, so it is an error
    // (blank lines at the end are harmless).
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let used = lines
        .iter()
        .rposition(|l| !l.is_empty())
        .map_or(0, |i| i + 1);
    for (n, &line) in lines[..used].iter().enumerate() {
        if line.is_empty() {
            return Err(ShardError::dataset(
                path,
                format!(
                    "line {} is blank: each line is one class and its 0-based line number is \
                     the label, so a blank line between classes is ambiguous; remove it",
                    n + 1
                ),
            ));
        }
        let (id, name) = match line.split_once(char::is_whitespace) {
            Some((id, rest)) => (id, rest.trim()),
            None => (line, ""),
        };
        if let Some(prev) = seen.insert(id.to_string(), n + 1) {
            return Err(ShardError::dataset(
                path,
                format!("class id {id} appears on lines {prev} and {}", n + 1),
            ));
        }
        classes.push(ClassEntry {
            index: classes.len() as u32,
            id: id.to_string(),
            name: if name.is_empty() { id } else { name }.to_string(),
        });
    }
    if classes.is_empty() {
        return Err(ShardError::dataset(path, "no classes in the class file"));
    }
    Ok(classes)
}

fn file_name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The split's default name: the root folder's own name, also when the root is given as `.`
/// or `..` (which have none until resolved).
fn split_name(root: &Path) -> String {
    match root.file_name() {
        Some(n) => n.to_string_lossy().into_owned(),
        None => root
            .canonicalize()
            .map(|r| file_name_of(&r))
            .unwrap_or_default(),
    }
}

/// Lists an ImageNet split.
pub fn list(opts: &ImagenetOptions) -> Result<Listing> {
    let root = &opts.root;
    require_dir(root, "ImageNet root")?;
    let split = opts.split.clone().unwrap_or_else(|| split_name(root));
    let folders = subdirs(root)?;
    let classes = match &opts.classes {
        Some(f) => read_class_file(f)?,
        None => folders
            .iter()
            .enumerate()
            .map(|(i, (name, _))| ClassEntry {
                index: i as u32,
                id: name.clone(),
                name: name.clone(),
            })
            .collect(),
    };
    let mut items = Vec::new();
    let mut skipped = Vec::new();
    let mut options = serde_json::Map::new();
    options.insert(
        "class_order".into(),
        match &opts.classes {
            Some(f) => format!("file:{}", file_name_of(f)),
            None => "sorted-folders".into(),
        }
        .into(),
    );

    if let Some(list_path) = &opts.list {
        options.insert(
            "labels".into(),
            format!("list:{}", file_name_of(list_path)).into(),
        );
        let text = std::fs::read_to_string(list_path).map_err(|e| ShardError::io(list_path, e))?;
        // Every file under the root: bare names (Caffe val.txt) are matched against it, and
        // files the list leaves out are counted (a subset list is legitimate, but never silent).
        let all_files = walk_files(root)?;
        let stats: HashMap<&Path, FileStat> =
            all_files.iter().map(|(p, s)| (p.as_path(), *s)).collect();
        let mut by_name: Option<HashMap<String, Vec<PathBuf>>> = None;
        let class_index: HashMap<&str, i64> = classes
            .iter()
            .map(|c| (c.id.as_str(), c.index as i64))
            .collect();
        // Kaggle's LOC_val_solution.csv: `ImageId,PredictionString` with the image's wnid first.
        let mut kaggle_csv = false;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim().trim_start_matches('\u{feff}');
            if line.is_empty() {
                continue;
            }
            if n == 0 && line.eq_ignore_ascii_case("ImageId,PredictionString") {
                kaggle_csv = true;
                continue;
            }
            let bad = |msg: &str| {
                ShardError::dataset(list_path, format!("line {}: {msg}: {line:?}", n + 1))
            };
            let (rel, label) = if kaggle_csv {
                let (id, pred) = line
                    .split_once(',')
                    .ok_or_else(|| bad("expected `ImageId,PredictionString`"))?;
                let wnid = pred
                    .split_whitespace()
                    .next()
                    .ok_or_else(|| bad("empty PredictionString"))?;
                (id.trim(), wnid)
            } else {
                line.rsplit_once(char::is_whitespace)
                    .ok_or_else(|| bad("expected `path label`"))?
            };
            let rel = rel.trim();
            // An integer label, or a class id of the class list (a wnid).
            let label: i64 = match (label.parse::<i64>(), class_index.get(label)) {
                (Ok(v), _) => v,
                (Err(_), Some(&i)) => i,
                (Err(_), None) => {
                    return Err(bad(&format!(
                        "label `{label}` is neither an integer nor a class id of {}",
                        if opts.classes.is_some() {
                            "the class list"
                        } else {
                            "the root's folders (pass --classes FILE)"
                        }
                    )))
                }
            };
            if label < 0 || label >= classes.len() as i64 {
                let hint = if opts.classes.is_none() {
                    format!(
                        " ({} classes from the root's folder names; pass --classes FILE with \
                         the class list the labels index, e.g. synset_words.txt)",
                        classes.len()
                    )
                } else {
                    String::new()
                };
                return Err(bad(&format!(
                    "label out of range 0..{}{hint}",
                    classes.len()
                )));
            }
            let direct = root.join(rel);
            let path = if direct.is_file() {
                direct
            } else if !rel.contains('/') {
                let index = match &mut by_name {
                    Some(m) => m,
                    None => {
                        let mut m: HashMap<String, Vec<PathBuf>> = HashMap::new();
                        for (p, _) in &all_files {
                            m.entry(file_name_of(p)).or_default().push(p.clone());
                        }
                        by_name.insert(m)
                    }
                };
                // Kaggle's ImageIds carry no extension.
                let found = index
                    .get(rel)
                    .or_else(|| index.get(&format!("{rel}.JPEG")))
                    .or_else(|| index.get(&format!("{rel}.jpeg")))
                    .or_else(|| index.get(&format!("{rel}.jpg")));
                match found.map(|v| v.as_slice()) {
                    Some([one]) => one.clone(),
                    Some(many) if many.len() > 1 => {
                        return Err(bad(&format!(
                            "{} files under the root are named {rel}",
                            many.len()
                        )))
                    }
                    _ => {
                        skipped.push(SkippedEntry {
                            path: rel.to_string(),
                            reason: format!("listed in {} but not found", file_name_of(list_path)),
                        });
                        continue;
                    }
                }
            } else {
                skipped.push(SkippedEntry {
                    path: rel.to_string(),
                    reason: format!("listed in {} but not found", file_name_of(list_path)),
                });
                continue;
            };
            // The walk's stat when it saw the file (the usual case), else one now.
            let stat = match stats.get(path.as_path()) {
                Some(&s) => s,
                None => {
                    FileStat::of(&std::fs::metadata(&path).map_err(|e| ShardError::io(&path, e))?)
                }
            };
            let Some(key) = utf8_key(root, &path) else {
                skipped.push(SkippedEntry {
                    path: rel_key(root, &path),
                    reason: NOT_UTF8.into(),
                });
                continue;
            };
            items.push(InputItem {
                key,
                path,
                size: stat.len,
                modified: stat.modified,
                target: Target::Label(label as i32),
            });
        }
        let listed: std::collections::HashSet<&Path> =
            items.iter().map(|i| i.path.as_path()).collect();
        let unlisted = all_files
            .iter()
            .filter(|(p, _)| !listed.contains(p.as_path()) && p != list_path)
            .count();
        options.insert("unlisted_files".into(), unlisted.into());
        if unlisted > 0 {
            tracing::warn!(
                "{unlisted} files under {} are not in {} and are not sharded (recorded as \
                 options.unlisted_files)",
                root.display(),
                file_name_of(list_path)
            );
        }
    } else {
        options.insert("labels".into(), "folders".into());
        let index: HashMap<&str, u32> = classes.iter().map(|c| (c.id.as_str(), c.index)).collect();
        // Class folders are listed in parallel too (most hold ~1,300 files, some a handful).
        let listed = folders
            .par_iter()
            .map(|(_, dir)| walk_files(dir))
            .collect::<Result<Vec<_>>>()?;
        for ((name, _), files) in folders.iter().zip(listed) {
            match index.get(name.as_str()) {
                Some(&label) => {
                    for (path, stat) in files {
                        let Some(key) = utf8_key(root, &path) else {
                            skipped.push(SkippedEntry {
                                path: rel_key(root, &path),
                                reason: NOT_UTF8.into(),
                            });
                            continue;
                        };
                        items.push(InputItem {
                            key,
                            path,
                            size: stat.len,
                            modified: stat.modified,
                            target: Target::Label(label as i32),
                        });
                    }
                }
                None => {
                    for (path, _) in files {
                        skipped.push(SkippedEntry {
                            path: rel_key(root, &path),
                            reason: format!("folder {name} is not in the class list"),
                        });
                    }
                }
            }
        }
        // Files directly under the root belong to no class.
        for (_, path, _) in files_in(root)? {
            let reason = match std::fs::metadata(&path) {
                Err(e) => super::read_error(&path, &e),
                Ok(_) => "not inside a class folder".into(),
            };
            skipped.push(SkippedEntry {
                path: rel_key(root, &path),
                reason,
            });
        }
    }
    Listing {
        dataset: Dataset::Imagenet,
        split,
        classes,
        items,
        skipped,
        options,
    }
    .finish()
}
