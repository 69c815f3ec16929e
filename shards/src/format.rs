//! The on-disk format: column names, Arrow schemas per dataset, shard file names.
//!
//! A dataset folder holds `manifest.json` (see [`crate::manifest`]) and Parquet files named
//! `shard-NNNNNN.parquet`. Every shard has the columns below; they are plain Parquet (zstd), so
//! pyarrow, polars, DuckDB and Hugging Face `datasets` read them without custom code.
//!
//! | column | type | datasets | meaning |
//! |---|---|---|---|
//! | `key` | utf8 | all | path relative to the dataset root (ImageNet, ADE20K) or the COCO `file_name` |
//! | `image` | binary | all | an encoded JPEG or PNG that decodes to 8-bit RGB or gray |
//! | `width`, `height` | int32 | all | size of the stored image |
//! | `orig_width`, `orig_height` | int32 | all | size of the source image (differs only with `--resize-short-side`) |
//! | `label` | int32 | imagenet | class index (see the manifest's `classes`) |
//! | `image_id` | int64 | coco | the COCO image id |
//! | `annotations` | list<struct> | coco | every annotation of the image, see [`annotation_fields`] |
//! | `mask` | binary | ade20k | the annotation PNG (8-bit gray, 0 = other, v = class index v-1) |
//! | `patch_labels` | list<int32> | coco, ade20k | row-major ceil(h/p) x ceil(w/p) patch layout of the stored image |

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

/// Version of the shard layout and manifest written by this build. Readers refuse newer ones.
pub const FORMAT_VERSION: u32 = 1;

/// File name of the manifest inside a dataset folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Column names (the contract shared with the loader and external tools).
pub mod columns {
    pub const KEY: &str = "key";
    pub const IMAGE: &str = "image";
    pub const WIDTH: &str = "width";
    pub const HEIGHT: &str = "height";
    pub const ORIG_WIDTH: &str = "orig_width";
    pub const ORIG_HEIGHT: &str = "orig_height";
    pub const LABEL: &str = "label";
    pub const IMAGE_ID: &str = "image_id";
    pub const ANNOTATIONS: &str = "annotations";
    pub const MASK: &str = "mask";
    pub const PATCH_LABELS: &str = "patch_labels";
}

/// Field names inside one COCO `annotations` struct.
pub mod annotation {
    /// COCO annotation id (int64).
    pub const ID: &str = "id";
    /// COCO category id as in the json (int32).
    pub const CATEGORY_ID: &str = "category_id";
    /// Contiguous 0-based class index (position in the manifest's `classes`).
    pub const CATEGORY_INDEX: &str = "category_index";
    /// `[x, y, width, height]` in source-image pixels (list<float64>).
    pub const BBOX: &str = "bbox";
    /// Area from the json (float64).
    pub const AREA: &str = "area";
    /// 0 or 1 (int32).
    pub const ISCROWD: &str = "iscrowd";
    /// Polygon segmentation `[[x, y, ...], ...]`, null for RLE (list<list<float64>>).
    pub const POLYGONS: &str = "polygons";
    /// RLE `size` = `[height, width]`, null for polygons (list<int32>).
    pub const RLE_SIZE: &str = "rle_size";
    /// Uncompressed RLE counts, null otherwise (list<int64>).
    pub const RLE_COUNTS: &str = "rle_counts";
    /// Compressed (string) RLE counts, null otherwise (utf8).
    pub const RLE_STRING: &str = "rle_string";
    /// Any other keys of the json record, as a JSON object text; null when there are none.
    pub const EXTRA: &str = "extra";
}

/// The three supported datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    Imagenet,
    Coco,
    Ade20k,
}

impl Dataset {
    /// The lowercase name used in manifests and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Imagenet => "imagenet",
            Dataset::Coco => "coco",
            Dataset::Ade20k => "ade20k",
        }
    }

    /// Whether shards of this dataset carry a `patch_labels` column.
    pub fn has_patch_labels(self) -> bool {
        !matches!(self, Dataset::Imagenet)
    }
}

impl std::fmt::Display for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn list_of(item: DataType, nullable_items: bool) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, nullable_items)))
}

/// Fields of one element of the COCO `annotations` list.
pub fn annotation_fields() -> Fields {
    use annotation::*;
    Fields::from(vec![
        Field::new(ID, DataType::Int64, false),
        Field::new(CATEGORY_ID, DataType::Int32, false),
        Field::new(CATEGORY_INDEX, DataType::Int32, false),
        Field::new(BBOX, list_of(DataType::Float64, false), false),
        Field::new(AREA, DataType::Float64, false),
        Field::new(ISCROWD, DataType::Int32, false),
        Field::new(
            POLYGONS,
            list_of(list_of(DataType::Float64, false), false),
            true,
        ),
        Field::new(RLE_SIZE, list_of(DataType::Int32, false), true),
        Field::new(RLE_COUNTS, list_of(DataType::Int64, false), true),
        Field::new(RLE_STRING, DataType::Utf8, true),
        Field::new(EXTRA, DataType::Utf8, true),
    ])
}

/// The Arrow schema of a shard of `dataset`.
pub fn schema(dataset: Dataset) -> SchemaRef {
    use columns::*;
    let mut fields = vec![
        Field::new(KEY, DataType::Utf8, false),
        Field::new(IMAGE, DataType::Binary, false),
        Field::new(WIDTH, DataType::Int32, false),
        Field::new(HEIGHT, DataType::Int32, false),
        Field::new(ORIG_WIDTH, DataType::Int32, false),
        Field::new(ORIG_HEIGHT, DataType::Int32, false),
    ];
    match dataset {
        Dataset::Imagenet => fields.push(Field::new(LABEL, DataType::Int32, false)),
        Dataset::Coco => {
            fields.push(Field::new(IMAGE_ID, DataType::Int64, false));
            fields.push(Field::new(
                ANNOTATIONS,
                list_of(DataType::Struct(annotation_fields()), false),
                false,
            ));
        }
        Dataset::Ade20k => fields.push(Field::new(MASK, DataType::Binary, false)),
    }
    if dataset.has_patch_labels() {
        fields.push(Field::new(
            PATCH_LABELS,
            list_of(DataType::Int32, false),
            false,
        ));
    }
    Arc::new(Schema::new(fields))
}

/// File name of shard `index`: `shard-000042.parquet`. Names are global across
/// `--num-workers` parts, so parts never collide and merge is a concatenation.
pub fn shard_file_name(index: u32) -> String {
    format!("shard-{index:06}.parquet")
}

/// Inverse of [`shard_file_name`].
pub fn parse_shard_index(file_name: &str) -> Option<u32> {
    let digits = file_name.strip_prefix("shard-")?.strip_suffix(".parquet")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Number of patches along one side: ceil(len / patch).
pub fn grid_cells(len: u32, patch: u32) -> u32 {
    len.div_ceil(patch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_round_trip() {
        assert_eq!(shard_file_name(42), "shard-000042.parquet");
        assert_eq!(parse_shard_index("shard-000042.parquet"), Some(42));
        assert_eq!(parse_shard_index("shard-.parquet"), None);
        assert_eq!(parse_shard_index("shard-00x1.parquet"), None);
        assert_eq!(parse_shard_index("other.parquet"), None);
    }

    #[test]
    fn schemas_have_contract_columns() {
        let names = |d| -> Vec<String> {
            schema(d)
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect()
        };
        let base = ["key", "image", "width", "height"];
        for d in [Dataset::Imagenet, Dataset::Coco, Dataset::Ade20k] {
            let n = names(d);
            for b in base {
                assert!(n.iter().any(|x| x == b), "{d}: {b} missing");
            }
            assert_eq!(n.iter().any(|x| x == "patch_labels"), d.has_patch_labels());
        }
        assert!(names(Dataset::Imagenet).contains(&"label".to_string()));
        assert!(names(Dataset::Coco).contains(&"annotations".to_string()));
        assert!(names(Dataset::Ade20k).contains(&"mask".to_string()));
        let s = schema(Dataset::Ade20k);
        assert_eq!(
            s.field_with_name("patch_labels").unwrap().data_type(),
            &list_of(DataType::Int32, false)
        );
    }

    #[test]
    fn grid() {
        assert_eq!(grid_cells(224, 16), 14);
        assert_eq!(grid_cells(225, 16), 15);
        assert_eq!(grid_cells(1, 16), 1);
    }
}
