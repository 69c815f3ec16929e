//! Loader tests: Pillow agreement, crop statistics vs torchvision, order determinism, ranks,
//! resume, failure handling. Fixtures: tests/fixtures/loader (override with
//! DROPPOS_LOADER_FIXTURES); see its PROVENANCE.md and scripts/make_resize_fixtures.py.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Int32Array, ListArray, StringArray};
use arrow::datatypes::{DataType, Field, Int32Type, Schema};
use arrow::record_batch::RecordBatch;
use droppos_shards::loader::resample::Precision;
use droppos_shards::loader::rng::Rng;
use droppos_shards::loader::transform::{
    random_resized_crop_box, Augment, CropBox, Geometry, ImageSlot, RrcParams, SampleIn, SampleOut,
    TransformConfig, Worker,
};
use droppos_shards::loader::{Batch, Images, Loader, LoaderConfig, LoaderError, OnError, ShardSet};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    std::env::var_os("DROPPOS_LOADER_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/loader"))
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Runs one fixture case through the loader's per-sample path; returns HWC RGB.
/// Evaluation or pre-training (no flip) geometry at `size`, patch size 16, no RandAugment.
fn transform_cfg(eval: bool, size: usize, dct: bool, resample: Precision) -> TransformConfig {
    TransformConfig {
        augment: if eval {
            Augment::Eval
        } else {
            Augment::Pretrain {
                rrc: RrcParams::default(),
                flip: false,
            }
        },
        size,
        dct_scaling: dct,
        patch_size: 16,
        randaug: None,
        resample,
    }
}

fn run_case(case: &Value, dct: bool, resample: Precision) -> (Vec<u8>, usize) {
    let dir = fixtures();
    let bytes = std::fs::read(dir.join("images").join(case["image"].as_str().unwrap())).unwrap();
    let size = case["size"].as_u64().unwrap() as usize;
    let eval = case["kind"] == "eval";
    let cfg = transform_cfg(eval, size, dct, resample);
    let mut w = Worker::new().unwrap();
    let hdr = w.header(&bytes).unwrap();
    let cb = if eval {
        CropBox {
            i: 0,
            j: 0,
            h: hdr.height,
            w: hdr.width,
        }
    } else {
        let b: Vec<usize> = case["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        CropBox {
            i: b[0],
            j: b[1],
            h: b[2],
            w: b[3],
        }
    };
    let (out, _) = apply(&mut w, &cfg, &bytes, &hdr, cb, false);
    // CHW → HWC
    let plane = size * size;
    let mut hwc = vec![0u8; 3 * plane];
    for c in 0..3 {
        for p in 0..plane {
            hwc[p * 3 + c] = out[c * plane + p];
        }
    }
    (hwc, size)
}

/// One sample through `Worker::process_geometry` with a given crop and flip: u8 CHW pixels and
/// the geometry it reports.
fn apply(
    w: &mut Worker,
    cfg: &TransformConfig,
    image: &[u8],
    hdr: &droppos_shards::loader::decode::Header,
    crop: CropBox,
    flip: bool,
) -> (Vec<u8>, Geometry) {
    let mut out = vec![0u8; 3 * cfg.size * cfg.size];
    let input = SampleIn {
        image,
        mask: None,
        patch_labels: None,
    };
    let so = SampleOut {
        image: ImageSlot::U8(&mut out),
        mask: None,
        patch_labels: None,
    };
    let g = w
        .process_geometry(cfg, input, hdr, crop, flip, None, so)
        .unwrap();
    (out, g)
}

fn diff(a: &[u8], b: &[u8]) -> (f64, u8) {
    assert_eq!(a.len(), b.len());
    let mut sum = 0u64;
    let mut max = 0u8;
    for (x, y) in a.iter().zip(b) {
        let d = x.abs_diff(*y);
        sum += d as u64;
        max = max.max(d);
    }
    (sum as f64 / a.len() as f64, max)
}

#[test]
fn resize_agrees_with_pillow() {
    let dir = fixtures();
    let cases = read_json(&dir.join("cases.json"));
    let mut exact = 0;
    let cases = cases.as_array().unwrap();
    for case in cases {
        let reference = image::open(dir.join("ref").join(case["ref"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        for (dct, resample) in [
            (false, Precision::Exact),
            (true, Precision::Exact),
            (false, Precision::Fast),
            (true, Precision::Fast),
        ] {
            let (ours, size) = run_case(case, dct, resample);
            assert_eq!(reference.dimensions(), (size as u32, size as u32));
            let (mean, max) = diff(&ours, reference.as_raw());
            eprintln!(
                "{} {} dct={dct} {resample:?}: mean |Δ| {mean:.4}, max {max}",
                case["ref"], case["image"]
            );
            assert!(
                mean < 1.0,
                "{case} {resample:?}: mean abs difference {mean} ≥ 1 grey level"
            );
            if !dct && resample == Precision::Exact && max == 0 {
                exact += 1;
            }
        }
    }
    eprintln!(
        "{exact}/{} cases bit-exact without DCT scaling (exact arithmetic)",
        cases.len()
    );
}

/// The DCT-scaled decode (1/2-1/8) is checked against the full decode, which the Pillow test
/// above pins: the fixture crops are too small to take it since the thresholds rose.
#[test]
fn dct_scaled_decode_stays_within_a_grey_level_of_the_full_decode() {
    use droppos_shards::loader::transform::{dct_denom, DCT_MIN_OUTPUT};
    let src = image::open(fixtures().join("images/n04179913_sewing_machine.JPEG"))
        .unwrap()
        .to_rgb8();
    // A 4x upscale of a real photo, re-encoded: large enough for DCT scaling at 64-96 px.
    let big = image::imageops::resize(
        &src,
        src.width() * 4,
        src.height() * 4,
        image::imageops::FilterType::CatmullRom,
    );
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&big)
        .unwrap();
    let mut w = Worker::new().unwrap();
    let hdr = w.header(&jpeg).unwrap();
    let (bw, bh) = (hdr.width, hdr.height);
    assert_eq!(dct_denom(bw, bh, DCT_MIN_OUTPUT - 1, DCT_MIN_OUTPUT - 1), 1);
    let mut triggered = 0;
    for (size, crop) in [
        (
            64,
            CropBox {
                i: 0,
                j: 0,
                h: bh,
                w: bw,
            },
        ),
        (
            96,
            CropBox {
                i: 100,
                j: 300,
                h: bh - 200,
                w: bw - 600,
            },
        ),
        (
            64,
            CropBox {
                i: 37,
                j: 411,
                h: 1100,
                w: 1300,
            },
        ),
    ] {
        let denom = dct_denom(crop.w, crop.h, size, size);
        triggered += (denom > 1) as usize;
        let cfg = |dct| transform_cfg(false, size, dct, Precision::Exact);
        let (full, _) = apply(&mut w, &cfg(false), &jpeg, &hdr, crop, false);
        let (scaled, _) = apply(&mut w, &cfg(true), &jpeg, &hdr, crop, false);
        let (mean, max) = diff(&full, &scaled);
        eprintln!("{size} px from {crop:?} (DCT 1/{denom}): mean |Δ| {mean:.3}, max {max}");
        assert!(mean < 1.0, "{size} px, {crop:?}, 1/{denom}: {mean}");
    }
    assert_eq!(triggered, 3, "every case takes the DCT-scaled path");
}

#[test]
fn crop_box_statistics_match_torchvision() {
    let stats = read_json(&fixtures().join("crop_stats.json"));
    let p = RrcParams::default();
    for s in stats.as_array().unwrap() {
        let (w, h) = (
            s["width"].as_u64().unwrap() as usize,
            s["height"].as_u64().unwrap() as usize,
        );
        let n = s["draws"].as_u64().unwrap() as usize;
        let fb: Vec<usize> = s["fallback_box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let mut rng = Rng::from_key(99);
        let mut feats: Vec<[f64; 6]> = Vec::with_capacity(n);
        let mut fallbacks = 0usize;
        for _ in 0..n {
            let b = random_resized_crop_box(w, h, &p, &mut rng);
            if [b.i, b.j, b.h, b.w] == fb[..] {
                fallbacks += 1;
            }
            assert!(b.i + b.h <= h && b.j + b.w <= w && b.h > 0 && b.w > 0);
            feats.push([
                b.i as f64,
                b.j as f64,
                b.h as f64,
                b.w as f64,
                (b.h * b.w) as f64 / (w * h) as f64,
                (b.w as f64 / b.h as f64).ln(),
            ]);
        }
        for (k, name) in ["i", "j", "h", "w", "area", "log_aspect"]
            .iter()
            .enumerate()
        {
            let ours = feats.iter().map(|f| f[k]).sum::<f64>() / n as f64;
            let theirs = s["mean"][name].as_f64().unwrap();
            let sd = s["std"][name].as_f64().unwrap();
            // Two independent samples of n: the difference of means has sd·sqrt(2/n).
            let se = (sd * (2.0 / n as f64).sqrt()).max(1e-9);
            let z = (ours - theirs) / se;
            assert!(
                z.abs() < 5.0 || sd == 0.0 && (ours - theirs).abs() < 1e-9,
                "{w}x{h} {name}: ours {ours}, torchvision {theirs} (z = {z:.2})"
            );
        }
        let f_ours = fallbacks as f64 / n as f64;
        let f_theirs = s["fallback_fraction"].as_f64().unwrap();
        let pbar = ((f_ours + f_theirs) / 2.0).max(1.0 / n as f64);
        let se = (2.0 * pbar * (1.0 - pbar) / n as f64).sqrt();
        assert!(
            (f_ours - f_theirs).abs() < 5.0 * se + 1e-9,
            "{w}x{h} fallback: ours {f_ours}, torchvision {f_theirs}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// A small dataset written in the shard format.

struct Row {
    key: String,
    image: Vec<u8>,
    label: i32,
}

fn fixture_images() -> Vec<(String, Vec<u8>)> {
    let dir = fixtures().join("images");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v.into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// Writes `rows` as shards of `per_shard` rows with row groups of `per_group` rows.
fn write_dataset(dir: &Path, rows: &[Row], per_shard: usize, per_group: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("image", DataType::Binary, false),
        Field::new("width", DataType::Int32, false),
        Field::new("height", DataType::Int32, false),
        Field::new("label", DataType::Int32, false),
    ]));
    let mut shards = vec![];
    for (si, chunk) in rows.chunks(per_shard).enumerate() {
        let file = format!("shard-{si:06}.parquet");
        let path = dir.join(&file);
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(per_group))
            .build();
        let f = std::fs::File::create(&path).unwrap();
        let mut w = ArrowWriter::try_new(f, schema.clone(), Some(props)).unwrap();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                chunk.iter().map(|r| r.key.clone()),
            )),
            Arc::new(BinaryArray::from_iter_values(
                chunk.iter().map(|r| r.image.as_slice()),
            )),
            Arc::new(Int32Array::from(vec![0; chunk.len()])),
            Arc::new(Int32Array::from(vec![0; chunk.len()])),
            Arc::new(Int32Array::from_iter_values(chunk.iter().map(|r| r.label))),
        ];
        w.write(&RecordBatch::try_new(schema.clone(), cols).unwrap())
            .unwrap();
        w.close().unwrap();
        let (bytes, sha) = (
            std::fs::metadata(&path).unwrap().len(),
            droppos_shards::manifest::hash_file(&path).unwrap().1,
        );
        shards.push(json!({"file": file, "rows": chunk.len(), "bytes": bytes, "sha256": sha}));
    }
    write_manifest(dir, "imagenet", rows.len(), shards);
}

fn write_manifest(dir: &Path, dataset: &str, rows: usize, shards: Vec<Value>) {
    let m = json!({
        "format_version": 1, "tool": "test", "tool_version": "0", "dataset": dataset,
        "split": "train", "num_rows": rows, "classes": [], "patch_size": 16,
        "shards": shards, "skipped": [], "options": {},
        "inputs": {"count": rows, "sha256": ""}
    });
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&m).unwrap(),
    )
    .unwrap();
}

/// `n` rows cycling through the fixture images, row i keyed "iiii/<name>" with label i and the
/// image bytes `image(i, bytes)`.
fn fixture_rows(n: usize, image: impl Fn(usize, &[u8]) -> Vec<u8>) -> Vec<Row> {
    let imgs = fixture_images();
    (0..n)
        .map(|i| {
            let (name, bytes) = &imgs[i % imgs.len()];
            Row {
                key: format!("{i:04}/{name}"),
                image: image(i, bytes),
                label: i as i32,
            }
        })
        .collect()
}

fn dataset(n: usize, corrupt: Option<usize>) -> (tempfile::TempDir, Arc<ShardSet>) {
    let rows = fixture_rows(n, |i, bytes| {
        if Some(i) == corrupt {
            b"\xFF\xD8\xFFnot really a jpeg".to_vec()
        } else {
            bytes.to_vec()
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    write_dataset(tmp.path(), &rows, 11, 4);
    let set = Arc::new(ShardSet::open(&[tmp.path().to_path_buf()], true).unwrap());
    (tmp, set)
}

fn small_cfg() -> LoaderConfig {
    LoaderConfig {
        window_blocks: 2,
        threads: 2,
        ..LoaderConfig::pretrain(32, 4)
    }
}

/// [`small_cfg`] in stored order, keeping a short last batch.
fn ordered_cfg() -> LoaderConfig {
    LoaderConfig {
        shuffle: false,
        drop_last: false,
        ..small_cfg()
    }
}

/// The first error of epoch 0 (the test fails if there is none).
fn first_error(set: Arc<ShardSet>, cfg: LoaderConfig) -> LoaderError {
    let results: Vec<_> = Loader::new(set, cfg)
        .unwrap()
        .epoch(0, 0)
        .unwrap()
        .collect();
    results.into_iter().find_map(|r| r.err()).expect("an error")
}

fn collect(loader: &Loader, epoch: u64, consumed: u64) -> Vec<Batch> {
    loader
        .epoch(epoch, consumed)
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

#[test]
fn batches_are_deterministic_and_thread_independent() {
    let (_t, set) = dataset(23, None);
    let a = collect(&Loader::new(set.clone(), small_cfg()).unwrap(), 3, 0);
    let one = LoaderConfig {
        threads: 1,
        ..small_cfg()
    };
    let b = collect(&Loader::new(set.clone(), one).unwrap(), 3, 0);
    assert_eq!(a, b);
    assert_eq!(a.len(), 5); // 23 samples, batch 4, drop_last
    let c = collect(&Loader::new(set.clone(), small_cfg()).unwrap(), 4, 0);
    assert_ne!(a[0].keys, c[0].keys, "a new epoch reshuffles");
    for batch in &a {
        assert_eq!(batch.image_shape(), [4, 3, 32, 32]);
        assert!(matches!(&batch.images, Images::U8(v) if v.len() == 4 * 3 * 32 * 32));
        for (k, l) in batch.keys.iter().zip(&batch.labels) {
            assert_eq!(
                k[..4].parse::<i64>().unwrap(),
                *l,
                "label travels with its key"
            );
        }
    }
    let f = LoaderConfig {
        pixel_format: droppos_shards::loader::PixelFormat::F32Normalized,
        ..small_cfg()
    };
    let fb = collect(&Loader::new(set, f).unwrap(), 3, 0);
    let (Images::U8(u), Images::F32(x)) = (&a[0].images, &fb[0].images) else {
        panic!("formats")
    };
    let plane = 32 * 32;
    for (idx, (&u, &x)) in u.iter().zip(x).enumerate() {
        let c = idx / plane % 3;
        let want = (u as f32 / 255.0 - droppos_shards::loader::IMAGENET_MEAN[c])
            / droppos_shards::loader::IMAGENET_STD[c];
        assert_eq!(want, x);
    }
}

#[test]
fn each_batch_reports_the_geometry_it_applied() {
    let rows: std::collections::HashMap<String, Vec<u8>> = fixture_rows(12, |_, b| b.to_vec())
        .into_iter()
        .map(|r| (r.key, r.image))
        .collect();
    let (_t, set) = dataset(12, None);
    let mut w = Worker::new().unwrap();
    for cfg in [small_cfg(), LoaderConfig::eval(32, 4)] {
        let tcfg = TransformConfig {
            augment: cfg.augment,
            size: 32,
            dct_scaling: cfg.dct_scaling,
            patch_size: 16,
            randaug: None,
            resample: cfg.resample,
        };
        let mut flips = 0;
        for b in collect(&Loader::new(set.clone(), cfg).unwrap(), 1, 0) {
            let Images::U8(px) = &b.images else {
                panic!("u8")
            };
            assert_eq!(b.geometry.len(), b.len());
            for (k, g) in b.geometry.iter().enumerate() {
                let image = &rows[&b.keys[k]];
                let hdr = w.header(image).unwrap();
                // Re-applying the reported geometry gives the batch's pixels exactly.
                let (crop, flip) = match *g {
                    Geometry::Pretrain { source, crop, flip } => {
                        assert_eq!(source, (hdr.width, hdr.height));
                        (crop, flip)
                    }
                    Geometry::Eval {
                        source,
                        resized,
                        center,
                        flip,
                    } => {
                        assert_eq!(source, (hdr.width, hdr.height));
                        let want = droppos_shards::loader::transform::eval_geometry(
                            hdr.width, hdr.height, 32,
                        );
                        assert_eq!((resized, center), want);
                        assert!(!flip);
                        (
                            CropBox {
                                i: 0,
                                j: 0,
                                h: hdr.height,
                                w: hdr.width,
                            },
                            flip,
                        )
                    }
                };
                flips += flip as usize;
                let (out, again) = apply(&mut w, &tcfg, image, &hdr, crop, flip);
                assert_eq!(&again, g);
                let per = out.len();
                assert_eq!(&px[k * per..(k + 1) * per], &out[..], "{}", b.keys[k]);
            }
        }
        if matches!(cfg.augment, Augment::Pretrain { .. }) {
            assert!(flips > 0, "flips reported");
        }
    }
}

#[test]
fn ranks_are_disjoint_equal_and_cover_everything() {
    let n = 23;
    let (_t, set) = dataset(n, None);
    for world in [1usize, 2, 3, 4] {
        let mut keys = HashSet::new();
        let mut total = 0;
        let mut lens = vec![];
        for rank in 0..world {
            let cfg = LoaderConfig {
                world,
                rank,
                drop_last: false,
                ..small_cfg()
            };
            let loader = Loader::new(set.clone(), cfg).unwrap();
            let batches = collect(&loader, 1, 0);
            let len: usize = batches.iter().map(|b| b.len()).sum();
            assert_eq!(len as u64, loader.samples_per_epoch());
            lens.push(len);
            total += len;
            for b in &batches {
                keys.extend(b.keys.iter().cloned());
            }
        }
        assert!(lens.iter().all(|&l| l == n.div_ceil(world)), "{lens:?}");
        assert_eq!(keys.len(), n, "every sample seen once per epoch");
        assert_eq!(
            total - keys.len(),
            lens[0] * world - n,
            "only wrap padding repeats"
        );
    }
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let (_t, set) = dataset(23, None);
    let cfg = LoaderConfig {
        world: 2,
        rank: 1,
        drop_last: false,
        ..small_cfg()
    };
    let loader = Loader::new(set, cfg).unwrap();
    let full = collect(&loader, 2, 0);
    for k in 0..full.len() {
        let resumed = collect(&loader, 2, full[k].consumed);
        assert_eq!(&full[k + 1..], &resumed[..], "resume after batch {k}");
    }
}

#[test]
fn corrupt_sample_is_skipped_or_fails_by_policy() {
    let (_t, set) = dataset(16, Some(5));
    let cfg = ordered_cfg();
    let batches = collect(&Loader::new(set.clone(), cfg).unwrap(), 0, 0);
    let skipped: Vec<_> = batches.iter().flat_map(|b| b.skipped.clone()).collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0].key.starts_with("0005/"), "{skipped:?}");
    assert!(skipped[0].shard.ends_with("shard-000000.parquet"));
    assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), 15);
    assert_eq!(batches[1].keys[0][..4].to_string(), "0004");
    assert_eq!(
        batches[1].keys[1][..4].to_string(),
        "0006",
        "the hole is filled by the next"
    );

    let fail = LoaderConfig {
        on_error: OnError::Fail,
        ..cfg
    };
    let err = first_error(set, fail);
    match &err {
        LoaderError::Sample { shard, key, .. } => {
            assert!(shard.ends_with("shard-000000.parquet"));
            assert!(key.starts_with("0005/"));
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn skips_after_the_last_batch_are_reported() {
    // 17 samples, the last one corrupt: batches of 4 leave it alone in a fifth batch that comes
    // out empty, so its skip belongs to no batch.
    let (_t, set) = dataset(17, Some(16));
    let cfg = ordered_cfg();
    let loader = Loader::new(set, cfg).unwrap();
    let mut it = loader.epoch(0, 0).unwrap();
    let batches: Vec<Batch> = it.by_ref().map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 4);
    assert!(batches.iter().all(|b| b.skipped.is_empty()));
    let tail = it.skipped_after_last_batch();
    assert_eq!(tail.len(), 1, "{tail:?}");
    assert!(tail[0].key.starts_with("0016/"), "{tail:?}");
}

#[test]
fn corrupt_shard_is_an_error_naming_it() {
    let (t, set) = dataset(16, None);
    drop(set);
    let path = t.path().join("shard-000001.parquet");
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&path, bytes).unwrap();
    let set = Arc::new(ShardSet::open(&[t.path().to_path_buf()], true).unwrap());
    let cfg = LoaderConfig {
        shuffle: false,
        ..small_cfg()
    };
    let msg = first_error(set, cfg).to_string();
    assert!(
        msg.contains("shard-000001.parquet") && msg.contains("sha256"),
        "{msg}"
    );
}

#[test]
fn dense_masks_and_patch_labels_follow_the_geometry() {
    // An image whose mask and patch labels encode the source patch index.
    let (w, h, p) = (96usize, 64usize, 16usize);
    let (gw, gh) = (w / p, h / p);
    let rgb = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, 7])
    });
    let mut png = vec![];
    rgb.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let label_at = |x: usize, y: usize| (1 + (y / p) * gw + x / p) as u8;
    let mask = image::GrayImage::from_fn(w as u32, h as u32, |x, y| {
        image::Luma([label_at(x as usize, y as usize)])
    });
    let mut mpng = vec![];
    mask.write_to(
        &mut std::io::Cursor::new(&mut mpng),
        image::ImageFormat::Png,
    )
    .unwrap();
    let pl: Vec<i32> = (0..gh * gw).map(|i| 1 + i as i32).collect();

    let tmp = tempfile::tempdir().unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("image", DataType::Binary, false),
        Field::new("mask", DataType::Binary, false),
        patch_labels_field(),
    ]));
    let n = 6;
    let lists = int32_lists((0..n).map(|_| pl.clone()));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            (0..n).map(|i| format!("k{i}")),
        )),
        Arc::new(BinaryArray::from_iter_values(
            (0..n).map(|_| png.as_slice()),
        )),
        Arc::new(BinaryArray::from_iter_values(
            (0..n).map(|_| mpng.as_slice()),
        )),
        Arc::new(lists),
    ];
    let entry = write_single_shard(tmp.path(), schema, cols);
    write_manifest(tmp.path(), "ade20k", n, vec![entry]);
    let set = Arc::new(ShardSet::open(&[tmp.path().to_path_buf()], true).unwrap());
    for cfg in [LoaderConfig::pretrain(32, 3), LoaderConfig::eval(32, 3)] {
        let batches = collect(&Loader::new(set.clone(), cfg).unwrap(), 0, 0);
        let s = 32;
        let g = s / p;
        let mut agree = 0;
        let mut total = 0;
        for b in &batches {
            let masks = b.masks.as_ref().expect("masks");
            let pls = b.patch_labels.as_ref().expect("patch labels");
            assert_eq!(masks.len(), b.len() * s * s);
            assert_eq!(pls.len(), b.len() * g * g);
            assert!(b.labels.iter().all(|&l| l == -1));
            for k in 0..b.len() {
                for py in 0..g {
                    for px in 0..g {
                        // The patch centre lies between output pixels p/2 - 1 and p/2 on
                        // each axis; nearest sampling gives it the label of one of them.
                        let want = pls[k * g * g + py * g + px];
                        let near = [
                            (p / 2 - 1, p / 2 - 1),
                            (p / 2 - 1, p / 2),
                            (p / 2, p / 2 - 1),
                            (p / 2, p / 2),
                        ];
                        let hit = near.iter().any(|&(dy, dx)| {
                            masks[k * s * s + (py * p + dy) * s + px * p + dx] as i32 == want
                        });
                        total += 1;
                        agree += hit as usize;
                    }
                }
            }
        }
        assert_eq!(
            agree, total,
            "patch labels agree with the mask at every patch centre"
        );
    }
}

/// RandAugment in the loader: deterministic for a seed and independent of the thread count,
/// changes the images but not the order or labels, and is refused for the evaluation transform.
#[test]
fn randaug_batches_are_deterministic_and_only_change_pixels() {
    use droppos_shards::loader::RandAugment;
    let (_t, set) = dataset(23, None);
    let plain = collect(&Loader::new(set.clone(), small_cfg()).unwrap(), 2, 0);
    let ra = LoaderConfig {
        randaug: Some(RandAugment::default()),
        ..small_cfg()
    };
    let a = collect(&Loader::new(set.clone(), ra).unwrap(), 2, 0);
    let b = collect(
        &Loader::new(set.clone(), LoaderConfig { threads: 1, ..ra }).unwrap(),
        2,
        0,
    );
    assert_eq!(a, b);
    assert_eq!(a.len(), plain.len());
    let mut changed = 0;
    for (x, y) in a.iter().zip(&plain) {
        assert_eq!(x.keys, y.keys);
        assert_eq!(x.labels, y.labels);
        let (Images::U8(p), Images::U8(q)) = (&x.images, &y.images) else {
            panic!("u8 batches")
        };
        let per = 3 * 32 * 32;
        changed += p
            .chunks(per)
            .zip(q.chunks(per))
            .filter(|(i, j)| i != j)
            .count();
    }
    // About one op per image on average: most images differ from the plain crops.
    assert!(changed >= 8, "{changed} of 20 images changed");
    let bad = LoaderConfig {
        randaug: Some(RandAugment::default()),
        ..LoaderConfig::eval(32, 4)
    };
    let err = Loader::new(set, bad).unwrap_err().to_string();
    assert!(err.contains("RandAugment"), "{err}");
}

#[test]
fn restart_marked_shards_give_the_same_batches() {
    // The same images with restart markers added losslessly: the loader then entropy-decodes
    // only the MCUs around each crop, and every batch must still be the same bytes.
    let plain_rows = fixture_rows(30, |_, b| b.to_vec());
    let marked_rows = fixture_rows(30, |_, b| {
        droppos_shards::jpeg_restart::add_restarts(b).unwrap_or(b.to_vec())
    });
    let marked = marked_rows
        .iter()
        .filter(|r| droppos_shards::jpeg_restart::Layout::parse(&r.image).is_some())
        .count();
    assert!(
        marked >= 20,
        "only {marked} images got usable restart markers"
    );
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_dataset(a.path(), &plain_rows, 11, 4);
    write_dataset(b.path(), &marked_rows, 11, 4);
    let open = |p: &Path| Arc::new(ShardSet::open(&[p.to_path_buf()], true).unwrap());
    let (sa, sb) = (open(a.path()), open(b.path()));
    // 32 px: large crops use DCT scaling; 224 px: mostly full-resolution crops; and eval.
    for cfg in [
        LoaderConfig::pretrain(32, 4),
        LoaderConfig::pretrain(224, 4),
        LoaderConfig::eval(64, 4),
    ] {
        let cfg = LoaderConfig {
            threads: 2,
            window_blocks: 2,
            ..cfg
        };
        for epoch in 0..2 {
            let x = collect(&Loader::new(sa.clone(), cfg).unwrap(), epoch, 0);
            let y = collect(&Loader::new(sb.clone(), cfg).unwrap(), epoch, 0);
            assert!(!x.is_empty());
            assert!(x == y, "{:?} epoch {epoch}", cfg.augment);
        }
    }
}

/// The shards' `patch_labels` field: a non-null list of int32.
fn patch_labels_field() -> Field {
    Field::new(
        "patch_labels",
        DataType::List(Arc::new(Field::new("item", DataType::Int32, false))),
        false,
    )
}

/// `[[i32]]` rows as a non-null Arrow list column (the shards' `patch_labels` type).
fn int32_lists(rows: impl Iterator<Item = Vec<i32>>) -> ListArray {
    let lists = ListArray::from_iter_primitive::<Int32Type, _, _>(
        rows.map(|r| Some(r.into_iter().map(Some))),
    );
    ListArray::new(
        Arc::new(Field::new("item", DataType::Int32, false)),
        lists.offsets().clone(),
        lists.values().clone(),
        None,
    )
}

/// Writes `cols` as `dir/shard-000000.parquet`; returns its manifest entry.
fn write_single_shard(dir: &Path, schema: Arc<Schema>, cols: Vec<ArrayRef>) -> Value {
    let path = dir.join("shard-000000.parquet");
    let rows = cols[0].len();
    let mut w =
        ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema.clone(), None).unwrap();
    w.write(&RecordBatch::try_new(schema, cols).unwrap())
        .unwrap();
    w.close().unwrap();
    let (bytes, sha) = (
        std::fs::metadata(&path).unwrap().len(),
        droppos_shards::manifest::hash_file(&path).unwrap().1,
    );
    json!({"file": "shard-000000.parquet", "rows": rows, "bytes": bytes, "sha256": sha})
}

/// Key + image shards with a `patch_labels` column (a COCO / ADE20K-like folder), manifest
/// `patch_size` `p`.
fn write_dense_like(dir: &Path, rows: &[Row], p: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("image", DataType::Binary, false),
        patch_labels_field(),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.key.clone()),
        )),
        Arc::new(BinaryArray::from_iter_values(
            rows.iter().map(|r| r.image.as_slice()),
        )),
        Arc::new(int32_lists(rows.iter().map(|_| vec![1; 4]))),
    ];
    let entry = write_single_shard(dir, schema, cols);
    write_manifest(dir, "coco", rows.len(), vec![entry]);
    let mpath = dir.join("manifest.json");
    let mut m = read_json(&mpath);
    m["patch_size"] = json!(p);
    std::fs::write(&mpath, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

/// A manifest whose patch_size does not describe its shards' patch labels stops the loader
/// with an error naming the shard, whatever the skip policy (it is not one bad sample).
#[test]
fn patch_labels_off_the_manifest_grid_are_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("coco");
    // Four labels per row: a 2x2 grid, which no fixture image has at patch size 16.
    write_dense_like(&d, &fixture_rows(3, |_, b| b.to_vec()), 16);
    let set = Arc::new(ShardSet::open(&[d], true).unwrap());
    let cfg = LoaderConfig {
        on_error: OnError::Skip,
        ..ordered_cfg()
    };
    let e = first_error(set, cfg).to_string();
    assert!(e.contains("patch_size") && e.contains("shard-"), "{e}");
}

/// Folders of different datasets (ImageNet + COCO for pre-training) load together on the
/// columns they all carry; patch labels of different grids cannot mix.
#[test]
fn folders_of_different_datasets_mix_on_their_common_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("imagenet"),
        tmp.path().join("coco16"),
        tmp.path().join("coco32"),
    );
    let rows = fixture_rows(9, |_, bytes| bytes.to_vec());
    write_dataset(&a, &rows[..5], 3, 2);
    write_dense_like(&b, &rows[5..], 16);
    write_dense_like(&c, &rows[5..], 32);

    let set = Arc::new(ShardSet::open(&[a.clone(), b.clone()], true).unwrap());
    let cols = set.columns();
    assert!(!cols.label && !cols.mask && !cols.patch_labels, "{cols:?}");
    let cfg = LoaderConfig {
        drop_last: false,
        ..small_cfg()
    };
    let loader = Loader::new(set, cfg).unwrap();
    let batches = collect(&loader, 0, 0);
    let keys: HashSet<String> = batches.iter().flat_map(|b| b.keys.clone()).collect();
    assert_eq!(keys.len(), 9, "every sample of both folders");
    assert!(batches.iter().all(|b| b.patch_labels.is_none()));

    // Patch labels on both sides: the grids must agree (and a folder may not repeat).
    assert!(
        ShardSet::open(std::slice::from_ref(&b), true)
            .unwrap()
            .columns()
            .patch_labels
    );
    let e = ShardSet::open(&[b.clone(), b.clone()], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("given twice"), "{e}");
    let e = ShardSet::open(&[b.clone(), c.clone()], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("coco32") && e.contains("patch_size 32"), "{e}");
    // Without patch labels in common the grids do not matter.
    assert!(ShardSet::open(&[a, c], true).is_ok());
}

/// An extreme panorama's evaluation crop is resized straight from its box in the source rather
/// than from a whole resize (a 1x12000 image made a 256x3,072,000 one, GBs per decode thread):
/// the pixels stay within a grey level of the whole resize + centre crop that torchvision
/// computes, and the mask is the same pixels exactly, flipped or not.
#[test]
fn eval_crop_of_a_panorama_matches_the_whole_resize() {
    use droppos_shards::loader::transform::eval_geometry;
    use droppos_shards::resample::{
        mirror_rows, resize_box, resize_nearest, Filter, ResizeOpts, Scratch, View,
    };
    let (w, h, size) = (30usize, 1500usize, 32usize);
    let rgb = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        image::Rgb([
            ((x * 37 + y * 3) % 256) as u8,
            ((y * 7) % 251) as u8,
            ((x * y) % 253) as u8,
        ])
    });
    let mask = image::GrayImage::from_fn(w as u32, h as u32, |x, y| {
        image::Luma([((x / 4 + y / 9) % 150) as u8])
    });
    let png = |img: image::DynamicImage| {
        let mut b = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
            .unwrap();
        b
    };
    let (img_png, mask_png) = (
        png(image::DynamicImage::ImageRgb8(rgb.clone())),
        png(image::DynamicImage::ImageLuma8(mask.clone())),
    );
    let ((rw, rh), ec) = eval_geometry(w, h, size);
    assert!(rw * rh > 16 * size * size, "takes the direct path");
    let mut full = vec![0u8; rw * rh * 3];
    resize_box(
        View::new(rgb.as_raw(), w, h, 3),
        [0.0, 0.0, w as f32, h as f32],
        rw,
        rh,
        ResizeOpts::exact(Filter::Bicubic),
        &mut full,
        &mut Scratch::default(),
    );
    let mut full_mask = vec![0u8; rw * rh];
    resize_nearest(View::new(mask.as_raw(), w, h, 1), rw, rh, &mut full_mask);
    let crop = |data: &[u8], c: usize| -> Vec<u8> {
        (ec.i..ec.i + size)
            .flat_map(|y| data[(y * rw + ec.j) * c..(y * rw + ec.j + size) * c].to_vec())
            .collect()
    };
    let cfg = transform_cfg(true, size, false, Precision::Exact);
    let mut wk = Worker::new().unwrap();
    let hdr = wk.header(&img_png).unwrap();
    for flip in [false, true] {
        let mut out = vec![0u8; 3 * size * size];
        let mut mo = vec![0u8; size * size];
        wk.process_geometry(
            &cfg,
            SampleIn {
                image: &img_png,
                mask: Some(&mask_png),
                patch_labels: None,
            },
            &hdr,
            CropBox { i: 0, j: 0, h, w },
            flip,
            None,
            SampleOut {
                image: ImageSlot::U8(&mut out),
                mask: Some(&mut mo),
                patch_labels: None,
            },
        )
        .unwrap();
        let (mut want, mut want_mask) = (crop(&full, 3), crop(&full_mask, 1));
        if flip {
            mirror_rows(&mut want, size, 3);
            mirror_rows(&mut want_mask, size, 1);
        }
        let plane = size * size;
        let hwc: Vec<u8> = (0..plane)
            .flat_map(|p| (0..3).map(move |c| (p, c)))
            .map(|(p, c)| out[c * plane + p])
            .collect();
        let (mean, max) = diff(&hwc, &want);
        assert!(max <= 1, "flip {flip}: mean {mean}, max {max}");
        assert_eq!(mo, want_mask, "flip {flip}");
    }
}

/// Sizes whose buffers could not be allocated, and thread or queue counts far beyond a machine,
/// are configuration errors (they aborted the process or started 100,000 threads).
#[test]
fn absurd_sizes_and_counts_are_configuration_errors() {
    let (_tmp, set) = dataset(4, None);
    let huge_batch = LoaderConfig {
        batch_size: 1_000_000_000_000,
        ..small_cfg()
    };
    let huge_size = LoaderConfig {
        size: 100_000,
        ..small_cfg()
    };
    let many_threads = LoaderConfig {
        threads: 100_000,
        ..small_cfg()
    };
    let deep_queue = LoaderConfig {
        prefetch: 1_000_000_000_000,
        ..small_cfg()
    };
    for (cfg, needle) in [
        (huge_batch, "GB"),
        (huge_size, "GB"),
        (many_threads, "at most 1024"),
        (deep_queue, "at most 1024"),
    ] {
        let e = Loader::new(set.clone(), cfg).map(|_| ()).unwrap_err();
        assert!(
            matches!(e, LoaderError::Config(_)) && e.to_string().contains(needle),
            "{e}"
        );
    }
}
