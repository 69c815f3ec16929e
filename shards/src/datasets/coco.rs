//! COCO instances (`instances_*.json` + an image folder): one row per image listed in the json,
//! images without annotations included, every annotation kept whole.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{require_dir, InputItem, Listing, Target};
use crate::error::{Result, ShardError};
use crate::format::Dataset;
use crate::manifest::{ClassEntry, SkippedEntry};

/// Options of the COCO reader.
#[derive(Debug, Clone, Default)]
pub struct CocoOptions {
    pub images: PathBuf,
    pub annotations: PathBuf,
    /// Split name; default: from the json name (`instances_val2017.json` → `val2017`).
    pub split: Option<String>,
}

/// A segmentation as it appears in the json.
#[derive(Debug, Clone, PartialEq)]
pub enum Segmentation {
    /// `[[x, y, x, y, ...], ...]`.
    Polygons(Vec<Vec<f64>>),
    /// Uncompressed RLE: column-major run lengths starting with background.
    Rle { size: [u32; 2], counts: Vec<i64> },
    /// Compressed RLE string (pycocotools' LEB128-like encoding).
    RleString { size: [u32; 2], counts: String },
}

/// One annotation record.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoAnnotation {
    pub id: i64,
    pub category_id: i32,
    /// Contiguous 0-based index of the category (sorted by category id).
    pub category_index: i32,
    pub bbox: Vec<f64>,
    pub area: f64,
    pub iscrowd: i32,
    pub segmentation: Segmentation,
    /// Other keys of the record as JSON object text (None when there are none).
    pub extra: Option<String>,
}

#[derive(Deserialize)]
struct RawFile {
    images: Vec<RawImage>,
    #[serde(default)]
    annotations: Vec<RawAnn>,
    categories: Vec<RawCategory>,
}

#[derive(Deserialize)]
struct RawImage {
    id: i64,
    /// Absent in LVIS v1, whose images carry only `coco_url`.
    #[serde(default)]
    file_name: Option<String>,
    #[serde(default)]
    coco_url: Option<String>,
}

#[derive(Deserialize)]
struct RawCategory {
    id: i64,
    name: String,
}

#[derive(Deserialize)]
struct RawAnn {
    id: i64,
    image_id: i64,
    category_id: i64,
    bbox: Vec<f64>,
    area: f64,
    /// Absent in LVIS (no crowd annotations): 0.
    #[serde(default)]
    iscrowd: i64,
    /// Absent in box-only datasets (Objects365): no polygons.
    #[serde(default)]
    segmentation: RawSeg,
    #[serde(flatten)]
    extra: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSeg {
    Polygons(Vec<Vec<f64>>),
    Rle { counts: RawCounts, size: Vec<u32> },
}

impl Default for RawSeg {
    fn default() -> Self {
        RawSeg::Polygons(Vec::new())
    }
}

/// An image's file name relative to the image folder: `file_name`, or for LVIS v1 (which has
/// only `coco_url`) the URL's `split/name` when that exists under the folder, else its name.
fn image_file_name(im: &RawImage, images: &Path) -> Option<String> {
    if let Some(f) = &im.file_name {
        return Some(f.clone());
    }
    let url = im.coco_url.as_deref()?;
    let mut parts = url.rsplit('/').filter(|s| !s.is_empty());
    let name = parts.next()?.to_string();
    if let Some(split) = parts.next() {
        let with_split = format!("{split}/{name}");
        if images.join(&with_split).is_file() {
            return Some(with_split);
        }
    }
    Some(name)
}

/// Why an image's file name would not name a file inside the image folder, if it would not.
fn escapes_folder(file_name: &str) -> Option<&'static str> {
    use std::path::Component;
    if file_name.is_empty() {
        return Some("is empty");
    }
    for c in Path::new(file_name).components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Some("leaves the image folder through `..`"),
            Component::RootDir | Component::Prefix(_) => return Some("is an absolute path"),
        }
    }
    None
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCounts {
    List(Vec<i64>),
    Str(String),
}

fn split_from_json_name(p: &Path) -> String {
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    stem.strip_prefix("instances_").unwrap_or(&stem).to_string()
}

/// Lists a COCO split.
pub fn list(opts: &CocoOptions) -> Result<Listing> {
    require_dir(&opts.images, "COCO image folder")?;
    let path = &opts.annotations;
    let file = std::fs::File::open(path).map_err(|e| ShardError::io(path, e))?;
    let raw: RawFile = serde_json::from_reader(std::io::BufReader::with_capacity(1 << 20, file))
        .map_err(|e| ShardError::dataset(path, format!("malformed COCO json: {e}")))?;

    let mut cats: Vec<&RawCategory> = raw.categories.iter().collect();
    cats.sort_by_key(|c| c.id);
    let mut cat_index = HashMap::new();
    let mut classes = Vec::new();
    for (i, c) in cats.iter().enumerate() {
        // Stored as int32 (as in every COCO-format dataset we know): refuse, never wrap.
        if i32::try_from(c.id).is_err() {
            return Err(ShardError::dataset(
                path,
                format!("category id {} does not fit a 32-bit integer", c.id),
            ));
        }
        if cat_index.insert(c.id, i as i32).is_some() {
            return Err(ShardError::dataset(
                path,
                format!("category id {} appears twice", c.id),
            ));
        }
        classes.push(ClassEntry {
            index: i as u32,
            id: c.id.to_string(),
            name: c.name.clone(),
        });
    }

    let mut image_ids = HashMap::new();
    for (i, im) in raw.images.iter().enumerate() {
        if image_ids.insert(im.id, i).is_some() {
            return Err(ShardError::dataset(
                path,
                format!("image id {} appears twice", im.id),
            ));
        }
    }
    let mut per_image: Vec<Vec<CocoAnnotation>> = vec![Vec::new(); raw.images.len()];
    for a in raw.annotations {
        let bad = |msg: String| ShardError::dataset(path, format!("annotation {}: {msg}", a.id));
        let &img = image_ids
            .get(&a.image_id)
            .ok_or_else(|| bad(format!("image_id {} is not in images", a.image_id)))?;
        let &category_index = cat_index.get(&a.category_id).ok_or_else(|| {
            bad(format!(
                "category_id {} is not in categories",
                a.category_id
            ))
        })?;
        let segmentation = match a.segmentation {
            RawSeg::Polygons(p) => Segmentation::Polygons(p),
            RawSeg::Rle { counts, size } => {
                let size: [u32; 2] = size
                    .as_slice()
                    .try_into()
                    .map_err(|_| bad(format!("RLE size {size:?} is not [height, width]")))?;
                match counts {
                    RawCounts::List(counts) => Segmentation::Rle { size, counts },
                    RawCounts::Str(counts) => Segmentation::RleString { size, counts },
                }
            }
        };
        let iscrowd = i32::try_from(a.iscrowd)
            .map_err(|_| bad(format!("iscrowd {} is not 0 or 1", a.iscrowd)))?;
        let extra = if a.extra.is_empty() {
            None
        } else {
            Some(serde_json::to_string(&a.extra).map_err(|e| bad(e.to_string()))?)
        };
        per_image[img].push(CocoAnnotation {
            id: a.id,
            category_id: a.category_id as i32,
            category_index,
            bbox: a.bbox,
            area: a.area,
            iscrowd,
            segmentation,
            extra,
        });
    }

    let mut items = Vec::new();
    let mut skipped = Vec::new();
    for (im, annotations) in raw.images.into_iter().zip(per_image) {
        let file_name = image_file_name(&im, &opts.images).ok_or_else(|| {
            ShardError::dataset(
                path,
                format!("image {} has neither file_name nor coco_url", im.id),
            )
        })?;
        // The rows' keys and the files read must stay inside --images: an absolute name or a
        // `..` would read (and store) some other file, which no COCO-format tool intends.
        if let Some(why) = escapes_folder(&file_name) {
            return Err(ShardError::dataset(
                path,
                format!(
                    "image {}: file_name {file_name:?} {why}; file names must be relative to the \
                     image folder (--images) and stay inside it",
                    im.id
                ),
            ));
        }
        let p = opts.images.join(&file_name);
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => items.push(InputItem {
                key: file_name,
                path: p,
                size: m.len(),
                modified: super::FileStat::of(&m).modified,
                target: Target::Coco {
                    image_id: im.id,
                    annotations,
                },
            }),
            _ => skipped.push(SkippedEntry {
                path: file_name,
                reason: "listed in the annotation file but missing from the image folder".into(),
            }),
        }
    }
    let mut options = serde_json::Map::new();
    options.insert(
        "annotations".into(),
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .into(),
    );
    Listing {
        dataset: Dataset::Coco,
        split: opts
            .split
            .clone()
            .unwrap_or_else(|| split_from_json_name(path)),
        classes,
        items,
        skipped,
        options,
    }
    .finish()
}
