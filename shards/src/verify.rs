//! `verify`: checks a dataset folder against its manifest (size, sha256 and row count of every
//! shard; optionally decodes every image and mask), and per-row statistics for `stats`.

use std::fs::File;
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int32Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use rayon::prelude::*;

use crate::codec;
use crate::error::{Result, ShardError};
use crate::format::{columns, grid_cells, Dataset};
use crate::manifest::Manifest;

/// What `verify` checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub shards: usize,
    pub rows: u64,
    pub bytes: u64,
    pub decoded_images: u64,
    pub decoded_masks: u64,
}

fn open(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let f = File::open(path).map_err(|e| ShardError::io(path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| ShardError::parquet(path, e))
}

/// Verifies every shard of the dataset in `dir`; with `decode`, also decodes every image and
/// mask and checks `width`/`height` and the patch-layout length. The first failure (in shard
/// order) is returned, naming the file and, for content errors, the row.
pub fn verify_dataset(dir: &Path, decode: bool) -> Result<VerifyReport> {
    let m = Manifest::load(dir)?;
    let results: Vec<Result<VerifyReport>> = (0..m.shards.len())
        .into_par_iter()
        .map(|i| verify_one(&m, i, decode))
        .collect();
    let mut total = VerifyReport::default();
    for r in results {
        let r = r?;
        total.shards += r.shards;
        total.rows += r.rows;
        total.bytes += r.bytes;
        total.decoded_images += r.decoded_images;
        total.decoded_masks += r.decoded_masks;
    }
    Ok(total)
}

fn verify_one(m: &Manifest, i: usize, decode: bool) -> Result<VerifyReport> {
    let entry = &m.shards[i];
    let path = m.shard_path(i);
    m.verify_shard(i)?;
    let builder = open(&path)?;
    let rows = builder.metadata().file_metadata().num_rows() as u64;
    if rows != entry.rows {
        return Err(ShardError::ShardMismatch {
            path,
            what: "row count",
            expected: entry.rows.to_string(),
            actual: rows.to_string(),
        });
    }
    check_schema(&path, builder.schema(), m.dataset)?;
    let mut report = VerifyReport {
        shards: 1,
        rows,
        bytes: entry.bytes,
        ..Default::default()
    };
    if !decode {
        return Ok(report);
    }
    let reader = builder
        .with_batch_size(64)
        .build()
        .map_err(|e| ShardError::parquet(&path, e))?;
    let mut row0 = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| ShardError::parquet(&path, e))?;
        check_batch(m, &path, &batch, row0, &mut report)?;
        row0 += batch.num_rows() as u64;
    }
    Ok(report)
}

fn check_batch(
    m: &Manifest,
    path: &Path,
    b: &RecordBatch,
    row0: u64,
    report: &mut VerifyReport,
) -> Result<()> {
    let col = |name: &str| {
        b.column_by_name(name)
            .cloned()
            .ok_or_else(|| ShardError::parquet(path, format!("column {name} missing")))
    };
    let images = col(columns::IMAGE)?;
    let images = images.as_binary::<i32>();
    let widths = col(columns::WIDTH)?;
    let widths = widths.as_primitive::<Int32Type>();
    let heights = col(columns::HEIGHT)?;
    let heights = heights.as_primitive::<Int32Type>();
    let masks = b.column_by_name(columns::MASK).cloned();
    let patches = b.column_by_name(columns::PATCH_LABELS).cloned();
    let labels = b.column_by_name(columns::LABEL).cloned();
    // A null would read as whatever value sits under it: refused by name.
    for name in [
        columns::IMAGE,
        columns::WIDTH,
        columns::HEIGHT,
        columns::LABEL,
    ] {
        if let Some(c) = b.column_by_name(name) {
            if let Some(r) = (0..c.len()).find(|&r| c.is_null(r)) {
                return Err(ShardError::BadRow {
                    path: path.to_path_buf(),
                    row: row0 + r as u64,
                    message: format!("{name} is null"),
                });
            }
        }
    }
    for r in 0..b.num_rows() {
        let bad = |message: String| ShardError::BadRow {
            path: path.to_path_buf(),
            row: row0 + r as u64,
            message,
        };
        let px = codec::decode(images.value(r), codec::DEFAULT_MAX_PIXELS)
            .map_err(|e| bad(format!("image: {e}")))?;
        // The writer stores only what decodes to 8-bit RGB or gray everywhere (it converts the
        // rest): an RGBA or 16-bit image here came from elsewhere.
        let info = codec::read_header(images.value(r), codec::DEFAULT_MAX_PIXELS)
            .map_err(|e| bad(format!("image: {e}")))?;
        if !info.is_storable_as_is() {
            return Err(bad(format!(
                "image is {}, not an 8-bit RGB or gray JPEG or PNG",
                info.describe()
            )));
        }
        let (w, h) = (widths.value(r), heights.value(r));
        if (px.width as i32, px.height as i32) != (w, h) {
            return Err(bad(format!(
                "image decodes to {}x{} but width/height say {w}x{h}",
                px.width, px.height
            )));
        }
        report.decoded_images += 1;
        if let Some(l) = &labels {
            let v = l.as_primitive::<Int32Type>().value(r);
            if v < 0 || v as usize >= m.classes.len() {
                return Err(bad(format!("label {v} outside 0..{}", m.classes.len())));
            }
        }
        if let Some(mk) = &masks {
            let mask =
                codec::decode_mask(mk.as_binary::<i32>().value(r), codec::DEFAULT_MAX_PIXELS)
                    .map_err(|e| bad(format!("mask: {e}")))?;
            if (mask.width as i32, mask.height as i32) != (w, h) {
                return Err(bad(format!(
                    "mask is {}x{}, image {w}x{h}",
                    mask.width, mask.height
                )));
            }
            report.decoded_masks += 1;
        }
        if let Some(p) = &patches {
            let len = p.as_list::<i32>().value(r).len();
            let want = grid_cells(w as u32, m.patch_size) as usize
                * grid_cells(h as u32, m.patch_size) as usize;
            if len != want {
                return Err(bad(format!(
                    "patch_labels has {len} cells, the {w}x{h} image at patch {} needs {want}",
                    m.patch_size
                )));
            }
        }
    }
    Ok(())
}

/// Per-row numbers for `stats` (no pixel data): class label (ImageNet) or number of
/// annotations (COCO), stored size and encoded bytes, and which classes each row holds.
#[derive(Debug, Clone, Default)]
pub struct RowStats {
    pub shard: Vec<u32>,
    pub label: Vec<Option<i32>>,
    pub annotations: Vec<Option<u32>>,
    pub width: Vec<i32>,
    pub height: Vec<i32>,
    pub image_bytes: Vec<u64>,
    /// COCO and ADE20K: one entry per (row, class) the row holds.
    pub present: ClassPresence,
}

/// Classes present in rows, as three parallel columns: the row (0-based over all shards in
/// manifest order), the class index, and how much of it the row holds: COCO annotations of that
/// category, ADE20K patch-layout cells of that class (cells labelled 0, "other", not counted).
#[derive(Debug, Clone, Default)]
pub struct ClassPresence {
    pub row: Vec<u64>,
    pub class: Vec<i32>,
    pub count: Vec<u32>,
}

impl ClassPresence {
    /// Adds one row's class values (any order, repeats counted).
    fn add_row(&mut self, row: u64, classes: &mut [i32]) {
        classes.sort_unstable();
        for run in classes.chunk_by(|a, b| a == b) {
            self.row.push(row);
            self.class.push(run[0]);
            self.count.push(run.len() as u32);
        }
    }
}

/// Checks that the shard has every column of the dataset's schema, with its type (nested field
/// names aside: other writers name list items differently), so that reading them cannot fail
/// half-way (or panic on a column of another type).
fn check_schema(path: &Path, schema: &arrow::datatypes::Schema, dataset: Dataset) -> Result<()> {
    for f in crate::format::schema(dataset).fields() {
        let Ok(have) = schema.field_with_name(f.name()) else {
            return Err(ShardError::parquet(
                path,
                format!("column {} missing", f.name()),
            ));
        };
        if !have.data_type().equals_datatype(f.data_type()) {
            return Err(ShardError::parquet(
                path,
                format!(
                    "column {} is {}, the format says {}",
                    f.name(),
                    have.data_type(),
                    f.data_type()
                ),
            ));
        }
    }
    Ok(())
}

/// Reads the per-row numbers of every shard, one row group at a time.
pub fn row_stats(m: &Manifest) -> Result<RowStats> {
    let mut s = RowStats::default();
    for i in 0..m.shards.len() {
        let path = m.shard_path(i);
        let builder = open(&path)?;
        check_schema(&path, builder.schema(), m.dataset)?;
        let wanted: Vec<&str> = match m.dataset {
            Dataset::Imagenet => vec![
                columns::IMAGE,
                columns::WIDTH,
                columns::HEIGHT,
                columns::LABEL,
            ],
            Dataset::Coco => vec![
                columns::IMAGE,
                columns::WIDTH,
                columns::HEIGHT,
                columns::ANNOTATIONS,
            ],
            Dataset::Ade20k => vec![
                columns::IMAGE,
                columns::WIDTH,
                columns::HEIGHT,
                columns::PATCH_LABELS,
            ],
        };
        let roots: Vec<usize> = wanted
            .iter()
            .map(|c| {
                builder
                    .schema()
                    .index_of(c)
                    .map_err(|e| ShardError::parquet(&path, e))
            })
            .collect::<Result<_>>()?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(256)
            .build()
            .map_err(|e| ShardError::parquet(&path, e))?;
        for batch in reader {
            let b = batch.map_err(|e| ShardError::parquet(&path, e))?;
            let n = b.num_rows();
            let get = |name: &str| {
                b.column_by_name(name)
                    .cloned()
                    .ok_or_else(|| ShardError::parquet(&path, format!("column {name} missing")))
            };
            let img = get(columns::IMAGE)?;
            let img = img.as_binary::<i32>();
            let w = get(columns::WIDTH)?;
            let h = get(columns::HEIGHT)?;
            // Nulls would count as whatever values sit under them.
            if w.null_count() + h.null_count() > 0 {
                return Err(ShardError::parquet(
                    &path,
                    "width or height is null in some rows (verify --decode names them)",
                ));
            }
            let first_row = s.width.len() as u64;
            s.width
                .extend(w.as_primitive::<Int32Type>().values().iter());
            s.height
                .extend(h.as_primitive::<Int32Type>().values().iter());
            s.image_bytes
                .extend((0..n).map(|r| img.value_length(r) as u64));
            s.shard.extend(std::iter::repeat_n(i as u32, n));
            match m.dataset {
                Dataset::Imagenet => {
                    let l = get(columns::LABEL)?;
                    if l.null_count() > 0 {
                        return Err(ShardError::parquet(
                            &path,
                            "label is null in some rows (verify --decode names them)",
                        ));
                    }
                    s.label.extend(
                        l.as_primitive::<Int32Type>()
                            .values()
                            .iter()
                            .map(|&v| Some(v)),
                    );
                    s.annotations.extend(std::iter::repeat_n(None, n));
                }
                Dataset::Coco => {
                    let a = get(columns::ANNOTATIONS)?;
                    let a = a.as_list::<i32>();
                    s.annotations
                        .extend((0..n).map(|r| Some(a.value_length(r) as u32)));
                    s.label.extend(std::iter::repeat_n(None, n));
                    let cats = a
                        .values()
                        .as_struct()
                        .column_by_name(crate::format::annotation::CATEGORY_INDEX)
                        .ok_or_else(|| {
                            ShardError::parquet(&path, "annotations have no category_index")
                        })?
                        .as_primitive::<Int32Type>();
                    let mut classes = Vec::new();
                    for r in 0..n {
                        let range =
                            a.value_offsets()[r] as usize..a.value_offsets()[r + 1] as usize;
                        classes.clear();
                        classes.extend(range.filter(|&i| cats.is_valid(i)).map(|i| cats.value(i)));
                        s.present.add_row(first_row + r as u64, &mut classes);
                    }
                }
                Dataset::Ade20k => {
                    s.label.extend(std::iter::repeat_n(None, n));
                    s.annotations.extend(std::iter::repeat_n(None, n));
                    let p = get(columns::PATCH_LABELS)?;
                    let p = p.as_list::<i32>();
                    let cells = p.values().as_primitive::<Int32Type>();
                    let mut classes = Vec::new();
                    for r in 0..n {
                        let range =
                            p.value_offsets()[r] as usize..p.value_offsets()[r + 1] as usize;
                        classes.clear();
                        // Cell value v is class index v - 1; 0 is "other".
                        classes.extend(
                            range
                                .filter(|&i| cells.is_valid(i) && cells.value(i) > 0)
                                .map(|i| cells.value(i) - 1),
                        );
                        s.present.add_row(first_row + r as u64, &mut classes);
                    }
                }
            }
        }
    }
    Ok(s)
}
