//! Shared helpers of the shards integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int32Type, Int64Type};
use droppos_shards::datasets::Listing;
use droppos_shards::manifest::Manifest;
use droppos_shards::writer::{write_dataset, NoProgress, OnError, WriteOptions, WriteSummary};
use droppos_shards::ShardError;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// Fixture root: `$DROPPOS_TEST_DATA`, else the repo's tests/fixtures/data.
pub fn data_root() -> PathBuf {
    match std::env::var_os("DROPPOS_TEST_DATA") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data"),
    }
}

pub fn write(listing: &Listing, out: &Path, tweak: impl FnOnce(&mut WriteOptions)) -> WriteSummary {
    let mut o = WriteOptions {
        out: out.to_path_buf(),
        threads: 2,
        ..Default::default()
    };
    tweak(&mut o);
    write_dataset(listing, &o, &NoProgress).expect("write_dataset")
}

/// [`write`] under `--on-error fail` (one thread), expected to fail: the error.
pub fn write_fail(
    listing: &Listing,
    out: &Path,
    tweak: impl FnOnce(&mut WriteOptions),
) -> ShardError {
    let mut o = WriteOptions {
        out: out.to_path_buf(),
        on_error: OnError::Fail,
        threads: 1,
        ..Default::default()
    };
    tweak(&mut o);
    write_dataset(listing, &o, &NoProgress).expect_err("write_dataset should fail")
}

/// One row read back from a shard.
#[derive(Debug, Clone)]
pub struct ReadRow {
    pub key: String,
    pub image: Vec<u8>,
    pub width: i32,
    pub height: i32,
    pub label: Option<i32>,
    pub image_id: Option<i64>,
    pub mask: Option<Vec<u8>>,
    pub patch_labels: Option<Vec<i32>>,
    /// COCO annotations as (id, category_id, category_index, bbox, area, iscrowd, polygons,
    /// rle_size, rle_counts, rle_string).
    pub annotations: Option<Vec<ReadAnn>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReadAnn {
    pub id: i64,
    pub category_id: i32,
    pub category_index: i32,
    pub bbox: Vec<f64>,
    pub area: f64,
    pub iscrowd: i32,
    pub polygons: Option<Vec<Vec<f64>>>,
    pub rle_size: Option<Vec<i32>>,
    pub rle_counts: Option<Vec<i64>>,
    pub rle_string: Option<String>,
}

fn f64_list(a: &dyn Array) -> Vec<f64> {
    a.as_primitive::<arrow::datatypes::Float64Type>()
        .values()
        .to_vec()
}

fn rows_of(b: &RecordBatch) -> Vec<ReadRow> {
    let s = |n: &str| b.column_by_name(n).cloned();
    let keys = s("key").unwrap();
    let keys = keys.as_string::<i32>();
    let imgs = s("image").unwrap();
    let imgs = imgs.as_binary::<i32>();
    let w = s("width").unwrap();
    let h = s("height").unwrap();
    (0..b.num_rows())
        .map(|r| ReadRow {
            key: keys.value(r).to_string(),
            image: imgs.value(r).to_vec(),
            width: w.as_primitive::<Int32Type>().value(r),
            height: h.as_primitive::<Int32Type>().value(r),
            label: s("label").map(|c| c.as_primitive::<Int32Type>().value(r)),
            image_id: s("image_id").map(|c| c.as_primitive::<Int64Type>().value(r)),
            mask: s("mask").map(|c| c.as_binary::<i32>().value(r).to_vec()),
            patch_labels: s("patch_labels").map(|c| {
                c.as_list::<i32>()
                    .value(r)
                    .as_primitive::<Int32Type>()
                    .values()
                    .to_vec()
            }),
            annotations: s("annotations").map(|c| {
                let l = c.as_list::<i32>().value(r);
                let st = l.as_struct();
                let col = |n: &str| st.column_by_name(n).unwrap().clone();
                (0..st.len())
                    .map(|i| {
                        let polys = col("polygons");
                        let polys = polys.as_list::<i32>();
                        let rs = col("rle_size");
                        let rs = rs.as_list::<i32>();
                        let rc = col("rle_counts");
                        let rc = rc.as_list::<i32>();
                        let rstr = col("rle_string");
                        let rstr = rstr.as_string::<i32>();
                        ReadAnn {
                            id: col("id").as_primitive::<Int64Type>().value(i),
                            category_id: col("category_id").as_primitive::<Int32Type>().value(i),
                            category_index: col("category_index")
                                .as_primitive::<Int32Type>()
                                .value(i),
                            bbox: f64_list(col("bbox").as_list::<i32>().value(i).as_ref()),
                            area: col("area")
                                .as_primitive::<arrow::datatypes::Float64Type>()
                                .value(i),
                            iscrowd: col("iscrowd").as_primitive::<Int32Type>().value(i),
                            polygons: (!polys.is_null(i)).then(|| {
                                let p = polys.value(i);
                                let p = p.as_list::<i32>();
                                (0..p.len())
                                    .map(|k| f64_list(p.value(k).as_ref()))
                                    .collect()
                            }),
                            rle_size: (!rs.is_null(i))
                                .then(|| rs.value(i).as_primitive::<Int32Type>().values().to_vec()),
                            rle_counts: (!rc.is_null(i))
                                .then(|| rc.value(i).as_primitive::<Int64Type>().values().to_vec()),
                            rle_string: (!rstr.is_null(i)).then(|| rstr.value(i).to_string()),
                        }
                    })
                    .collect()
            }),
        })
        .collect()
}

/// Every row of a dataset folder, in manifest order.
pub fn read_all(dir: &Path) -> (Manifest, Vec<ReadRow>) {
    let m = Manifest::load(dir).expect("manifest");
    let mut out = Vec::new();
    for p in m.shard_paths() {
        let f = std::fs::File::open(&p).unwrap();
        let r = ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap();
        for b in r {
            out.extend(rows_of(&b.unwrap()));
        }
    }
    (m, out)
}

/// All regular files of a folder (name -> bytes), for byte-identity checks.
pub fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Naive reference of the patch rule: most frequent value per cell, ties to the smaller.
pub fn naive_patch_labels(map: &[u8], w: usize, h: usize, p: usize) -> Vec<i32> {
    let mut out = Vec::new();
    for gy in 0..h.div_ceil(p) {
        for gx in 0..w.div_ceil(p) {
            let mut counts = std::collections::BTreeMap::<u8, usize>::new();
            for y in gy * p..((gy + 1) * p).min(h) {
                for x in gx * p..((gx + 1) * p).min(w) {
                    *counts.entry(map[y * w + x]).or_default() += 1;
                }
            }
            let best = counts
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .unwrap();
            out.push(*best.0 as i32);
        }
    }
    out
}
