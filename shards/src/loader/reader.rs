//! Shard access for the loader: the blocks (row groups) of one or more dataset folders, read one
//! row group at a time, with each shard's size and sha256 checked against the manifest the
//! first time the loader touches it.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, BinaryArray, Int32Array, ListArray, StringArray};
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::LoaderError;
use crate::manifest::Manifest;

/// Column names of the shard format (issue 3's `format::columns`).
mod columns {
    pub const KEY: &str = "key";
    pub const IMAGE: &str = "image";
    pub const LABEL: &str = "label";
    pub const MASK: &str = "mask";
    pub const PATCH_LABELS: &str = "patch_labels";
}

/// One shard file.
#[derive(Debug, Clone)]
pub struct ShardFile {
    pub path: PathBuf,
    /// Manifest index within its dataset folder.
    manifest: usize,
    entry: usize,
}

/// One block: a row group of a shard.
#[derive(Debug, Clone, Copy)]
pub struct BlockInfo {
    pub shard: usize,
    pub row_group: usize,
    pub rows: u64,
}

/// Which optional columns the shards carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Columns {
    pub label: bool,
    pub mask: bool,
    pub patch_labels: bool,
}

impl Columns {
    /// The columns both carry.
    pub fn intersection(self, o: Columns) -> Columns {
        Columns {
            label: self.label && o.label,
            mask: self.mask && o.mask,
            patch_labels: self.patch_labels && o.patch_labels,
        }
    }

    /// Names of the columns carried, e.g. "label, patch_labels" ("none" when none is).
    pub fn names(self) -> String {
        let v: Vec<&str> = [
            (self.label, columns::LABEL),
            (self.mask, columns::MASK),
            (self.patch_labels, columns::PATCH_LABELS),
        ]
        .into_iter()
        .filter_map(|(has, name)| has.then_some(name))
        .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }

    /// The columns either carries.
    pub fn union(self, o: Columns) -> Columns {
        Columns {
            label: self.label || o.label,
            mask: self.mask || o.mask,
            patch_labels: self.patch_labels || o.patch_labels,
        }
    }
}

/// All shards of one or more dataset folders, as blocks in manifest order.
#[derive(Debug)]
pub struct ShardSet {
    manifests: Vec<Manifest>,
    shards: Vec<ShardFile>,
    blocks: Vec<BlockInfo>,
    columns: Columns,
    patch_size: usize,
    verify: bool,
    verified: Mutex<HashSet<usize>>,
}

impl ShardSet {
    /// Opens the manifests of `dirs` and reads every shard's Parquet footer (row-group sizes).
    /// With `verify`, each shard's size and sha256 are checked the first time it is read.
    pub fn open(dirs: &[PathBuf], verify: bool) -> Result<ShardSet, LoaderError> {
        if dirs.is_empty() {
            return Err(LoaderError::Config("no dataset folder given".into()));
        }
        let mut manifests = Vec::new();
        let mut shards = Vec::new();
        let mut blocks = Vec::new();
        let mut columns: Option<Columns> = None;
        let mut any = Columns::default();
        let mut patch_size: Option<(u32, &PathBuf)> = None;
        let mut patch_size_clash = None;
        let mut seen: Vec<(PathBuf, &PathBuf)> = Vec::new();
        for dir in dirs {
            // The same folder twice would silently double every sample.
            let real = std::fs::canonicalize(dir).map_err(|e| LoaderError::io(dir, e))?;
            if let Some((_, first)) = seen.iter().find(|(r, _)| *r == real) {
                return Err(LoaderError::Config(format!(
                    "{} is given twice (also as {}): every sample would be seen twice per epoch",
                    dir.display(),
                    first.display()
                )));
            }
            seen.push((real, dir));
            let m = Manifest::load(dir)?;
            let mi = manifests.len();
            match patch_size {
                None => patch_size = Some((m.patch_size, dir)),
                Some((p, first)) if p != m.patch_size && patch_size_clash.is_none() => {
                    patch_size_clash = Some(format!(
                        "{}: patch_size {} differs from {}'s {p}",
                        dir.display(),
                        m.patch_size,
                        first.display()
                    ));
                }
                _ => {}
            }
            for (ei, entry) in m.shards.iter().enumerate() {
                let path = m.shard_path(ei);
                let file = File::open(&path).map_err(|e| LoaderError::io(&path, e))?;
                let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                    .map_err(|e| parquet_err(&path, e))?;
                let schema = builder.schema();
                let has = |name: &str| schema.field_with_name(name).is_ok();
                if !has(columns::KEY) || !has(columns::IMAGE) {
                    return Err(LoaderError::Parquet {
                        path: path.clone(),
                        message: "missing the key or image column".into(),
                    });
                }
                let c = Columns {
                    label: has(columns::LABEL),
                    mask: has(columns::MASK),
                    patch_labels: has(columns::PATCH_LABELS),
                };
                // Folders of different datasets mix (e.g. ImageNet + COCO for pre-training): the
                // set carries the columns every shard has.
                columns = Some(columns.map_or(c, |a| a.intersection(c)));
                any = any.union(c);
                let md = builder.metadata();
                let si = shards.len();
                let mut rows = 0u64;
                for rg in 0..md.num_row_groups() {
                    let n = md.row_group(rg).num_rows() as u64;
                    rows += n;
                    if n > 0 {
                        blocks.push(BlockInfo {
                            shard: si,
                            row_group: rg,
                            rows: n,
                        });
                    }
                }
                if rows != entry.rows {
                    return Err(LoaderError::Shard(
                        crate::error::ShardError::ShardMismatch {
                            path,
                            what: "row count",
                            expected: entry.rows.to_string(),
                            actual: rows.to_string(),
                        },
                    ));
                }
                shards.push(ShardFile {
                    path,
                    manifest: mi,
                    entry: ei,
                });
            }
            manifests.push(m);
        }
        // Folders of one dataset must agree on what each label means (labels are used as they
        // are); different datasets (ImageNet + COCO) share no label column anyway.
        for (i, m) in manifests.iter().enumerate() {
            if manifests[..i].iter().any(|o| o.dataset == m.dataset) {
                continue;
            }
            let same = manifests
                .iter()
                .filter(|o| o.dataset == m.dataset)
                .map(|o| (o.dir.as_path(), &o.classes[..]));
            crate::manifest::merge_class_lists(same).map_err(LoaderError::Config)?;
        }
        let columns = columns.unwrap_or_default();
        if any != columns {
            tracing::info!(
                carried_by_some = %any.names(),
                carried_by_all = %columns.names(),
                "the folders' shards differ in their optional columns; batches hold those all carry"
            );
        }
        // Patch labels of different grids cannot share a batch; without them the sizes are moot.
        if let (true, Some(clash)) = (columns.patch_labels, patch_size_clash) {
            return Err(LoaderError::Config(clash));
        }
        Ok(ShardSet {
            manifests,
            shards,
            blocks,
            columns,
            patch_size: patch_size.map_or(16, |(p, _)| p) as usize,
            verify,
            verified: Mutex::new(HashSet::new()),
        })
    }

    pub fn blocks(&self) -> &[BlockInfo] {
        &self.blocks
    }

    pub fn block_sizes(&self) -> Vec<u64> {
        self.blocks.iter().map(|b| b.rows).collect()
    }

    pub fn num_samples(&self) -> u64 {
        self.blocks.iter().map(|b| b.rows).sum()
    }

    pub fn columns(&self) -> Columns {
        self.columns
    }

    pub fn patch_size(&self) -> usize {
        self.patch_size
    }

    pub fn manifests(&self) -> &[Manifest] {
        &self.manifests
    }

    /// Display name of a shard (its path).
    pub fn shard_name(&self, shard: usize) -> String {
        self.shards[shard].path.display().to_string()
    }

    /// Checks every shard now (size + sha256), instead of on first use.
    pub fn verify_all(&self) -> Result<(), LoaderError> {
        for s in 0..self.shards.len() {
            self.ensure_verified(s)?;
        }
        Ok(())
    }

    fn ensure_verified(&self, shard: usize) -> Result<(), LoaderError> {
        if !self.verify {
            return Ok(());
        }
        if self.verified.lock().expect("lock").contains(&shard) {
            return Ok(());
        }
        let f = &self.shards[shard];
        self.manifests[f.manifest].verify_shard(f.entry)?;
        self.verified.lock().expect("lock").insert(shard);
        Ok(())
    }

    /// Reads one block's columns.
    pub fn read_block(&self, block: usize) -> Result<LoadedBlock, LoaderError> {
        let b = self.blocks[block];
        self.ensure_verified(b.shard)?;
        let path = &self.shards[b.shard].path;
        let file = File::open(path).map_err(|e| LoaderError::io(path, e))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_err(path, e))?;
        let mut names = vec![columns::KEY, columns::IMAGE];
        if self.columns.label {
            names.push(columns::LABEL);
        }
        if self.columns.mask {
            names.push(columns::MASK);
        }
        if self.columns.patch_labels {
            names.push(columns::PATCH_LABELS);
        }
        let mask = ProjectionMask::columns(builder.parquet_schema(), names.iter().copied());
        let reader = builder
            .with_row_groups(vec![b.row_group])
            .with_projection(mask)
            .with_batch_size(b.rows as usize)
            .build()
            .map_err(|e| parquet_err(path, e))?;
        let mut batches = Vec::new();
        for rb in reader {
            batches.push(rb.map_err(|e| parquet_err(path, e.into()))?);
        }
        let schema = batches
            .first()
            .map(|b| b.schema())
            .ok_or_else(|| bad(path, "empty row group"))?;
        let rb = arrow::compute::concat_batches(&schema, &batches)
            .map_err(|e| parquet_err(path, e.into()))?;
        let col = |name: &str| -> Result<Arc<dyn Array>, LoaderError> {
            rb.column_by_name(name)
                .cloned()
                .ok_or_else(|| bad(path, &format!("missing column {name}")))
        };
        let keys = col(columns::KEY)?;
        let keys = match keys.data_type() {
            DataType::Utf8 => keys.as_string::<i32>().clone(),
            DataType::LargeUtf8 | DataType::Utf8View => {
                let c = arrow::compute::cast(&keys, &DataType::Utf8)
                    .map_err(|e| parquet_err(path, e.into()))?;
                c.as_string::<i32>().clone()
            }
            t => return Err(bad(path, &format!("key column has type {t}"))),
        };
        let images = binary(col(columns::IMAGE)?, path)?;
        let labels = if self.columns.label {
            let c = col(columns::LABEL)?;
            let c = arrow::compute::cast(&c, &DataType::Int32)
                .map_err(|e| parquet_err(path, e.into()))?;
            Some(c.as_primitive::<arrow::datatypes::Int32Type>().clone())
        } else {
            None
        };
        let masks = if self.columns.mask {
            Some(binary(col(columns::MASK)?, path)?)
        } else {
            None
        };
        let patch_labels = if self.columns.patch_labels {
            let c = col(columns::PATCH_LABELS)?;
            Some(
                c.as_list_opt::<i32>()
                    .ok_or_else(|| bad(path, "patch_labels is not list<int32>"))?
                    .clone(),
            )
        } else {
            None
        };
        Ok(LoadedBlock {
            shard: b.shard,
            keys,
            images,
            labels,
            masks,
            patch_labels,
        })
    }
}

/// The columns of one row group in memory.
#[derive(Debug)]
pub struct LoadedBlock {
    pub shard: usize,
    keys: StringArray,
    images: BinaryArray,
    labels: Option<Int32Array>,
    masks: Option<BinaryArray>,
    patch_labels: Option<ListArray>,
}

impl LoadedBlock {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key(&self, row: usize) -> &str {
        self.keys.value(row)
    }

    pub fn image(&self, row: usize) -> &[u8] {
        if self.images.is_null(row) {
            &[]
        } else {
            self.images.value(row)
        }
    }

    pub fn label(&self, row: usize) -> i64 {
        self.labels
            .as_ref()
            .map(|l| {
                if l.is_null(row) {
                    -1
                } else {
                    l.value(row) as i64
                }
            })
            .unwrap_or(-1)
    }

    pub fn mask(&self, row: usize) -> Option<&[u8]> {
        self.masks.as_ref().map(|m| m.value(row))
    }

    /// Patch labels of a row (a slice of the list's values).
    pub fn patch_labels(&self, row: usize) -> Option<&[i32]> {
        let l = self.patch_labels.as_ref()?;
        let offs = l.value_offsets();
        let (a, b) = (offs[row] as usize, offs[row + 1] as usize);
        let vals = l
            .values()
            .as_primitive_opt::<arrow::datatypes::Int32Type>()?;
        Some(&vals.values()[a..b])
    }
}

fn binary(a: Arc<dyn Array>, path: &Path) -> Result<BinaryArray, LoaderError> {
    match a.data_type() {
        DataType::Binary => Ok(a.as_binary::<i32>().clone()),
        DataType::LargeBinary | DataType::BinaryView => {
            let c = arrow::compute::cast(&a, &DataType::Binary)
                .map_err(|e| parquet_err(path, e.into()))?;
            Ok(c.as_binary::<i32>().clone())
        }
        t => Err(bad(path, &format!("binary column has type {t}"))),
    }
}

fn parquet_err(path: &Path, e: parquet::errors::ParquetError) -> LoaderError {
    LoaderError::Parquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn bad(path: &Path, msg: &str) -> LoaderError {
    LoaderError::Parquet {
        path: path.to_path_buf(),
        message: msg.to_string(),
    }
}
