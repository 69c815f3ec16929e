//! Determinism, resume, bad inputs, verify and worker parts.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{data_root, read_all, snapshot, write, write_fail};
use droppos_shards::codec::{encode_jpeg, Pixels};
use droppos_shards::datasets::{imagenet, Listing};
use droppos_shards::verify::verify_dataset;
use droppos_shards::writer::{merge_parts, write_dataset, NoProgress, Progress, WriteOptions};

fn imagenet_train() -> Listing {
    let root = data_root().join("imagenet");
    imagenet::list(&imagenet::ImagenetOptions {
        root: root.join("train"),
        classes: Some(root.join("synset_words.txt")),
        ..Default::default()
    })
    .unwrap()
}

/// An ImageFolder tree with labels from its folder names.
fn folder_listing(root: &Path) -> Listing {
    imagenet::list(&imagenet::ImagenetOptions {
        root: root.to_path_buf(),
        ..Default::default()
    })
    .unwrap()
}

/// The manifest's skipped entries, path -> reason.
fn skip_reasons(m: &droppos_shards::manifest::Manifest) -> std::collections::HashMap<&str, &str> {
    m.skipped
        .iter()
        .map(|e| (e.path.as_str(), e.reason.as_str()))
        .collect()
}

#[test]
fn identical_bytes_for_any_thread_count() {
    let listing = imagenet_train();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    write(&listing, a.path(), |o| {
        o.threads = 1;
        o.shard_rows = 7;
        o.row_group_rows = 3;
    });
    write(&listing, b.path(), |o| {
        o.threads = 4;
        o.shard_rows = 7;
        o.row_group_rows = 3;
    });
    let (sa, sb) = (snapshot(a.path()), snapshot(b.path()));
    assert!(sa.len() > 3, "several shards");
    assert_eq!(sa, sb);
    // A different seed changes the assignment; --no-shuffle keeps key order.
    let c = tempfile::tempdir().unwrap();
    write(&listing, c.path(), |o| {
        o.shard_rows = 7;
        o.row_group_rows = 3;
        o.seed = 1;
    });
    assert_ne!(snapshot(c.path()), sa);
    let d = tempfile::tempdir().unwrap();
    write(&listing, d.path(), |o| o.shuffle = false);
    let (_, rows) = read_all(d.path());
    let keys: Vec<&String> = rows.iter().map(|r| &r.key).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
}

#[test]
fn rerun_over_damaged_output_is_byte_identical() {
    let listing = imagenet_train();
    let full = tempfile::tempdir().unwrap();
    let set = |o: &mut WriteOptions| {
        o.shard_rows = 6;
        o.row_group_rows = 4;
    };
    let s = write(&listing, full.path(), set);
    assert_eq!(s.reused_shards, 0);
    let want = snapshot(full.path());

    // Damage a finished output as a crash or a careless copy would: no manifest, a stale temp
    // file, one shard missing, one truncated. Without journal records nothing is trusted.
    let part = tempfile::tempdir().unwrap();
    write(&listing, part.path(), set);
    std::fs::remove_file(part.path().join("manifest.json")).unwrap();
    std::fs::remove_file(part.path().join("shard-000001.parquet")).unwrap();
    let f = part.path().join("shard-000002.parquet");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(
        part.path().join(".shard-000003.parquet.tmp-99999"),
        b"partial",
    )
    .unwrap();
    let s = write(&listing, part.path(), set);
    assert_eq!(snapshot(part.path()), want);
    assert_eq!(s.written_shards, s.manifest.shards.len());
}

/// Progress hook that "kills" the run (panics inside the writer) after `limit` rows.
struct KillAfter {
    done: AtomicU64,
    limit: u64,
}

impl Progress for KillAfter {
    fn advance(&self, rows: u64) {
        if self.done.fetch_add(rows, Ordering::SeqCst) + rows >= self.limit {
            panic!("simulated kill");
        }
    }
}

#[test]
fn resume_after_a_kill_reuses_finished_shards_and_is_byte_identical() {
    let listing = imagenet_train();
    let opts = |out: &Path| WriteOptions {
        out: out.to_path_buf(),
        shard_rows: 6,
        row_group_rows: 2,
        threads: 1,
        ..Default::default()
    };
    let fresh = tempfile::tempdir().unwrap();
    write_dataset(&listing, &opts(fresh.path()), &NoProgress).unwrap();

    let out = tempfile::tempdir().unwrap();
    // Killed in the middle of the fourth shard: three finished, one partial temp file.
    let killer = KillAfter {
        done: AtomicU64::new(0),
        limit: 3 * 6 + 4,
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        write_dataset(&listing, &opts(out.path()), &killer)
    }));
    assert!(r.is_err(), "the run was killed");
    assert!(!out.path().join("manifest.json").exists());
    let temps = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .count();
    assert_eq!(temps, 1, "the shard being written is left as a temp file");
    // A partial output never passes verify (no manifest yet).
    assert!(verify_dataset(out.path(), false).is_err());

    let s = write_dataset(&listing, &opts(out.path()), &NoProgress).unwrap();
    assert_eq!(s.reused_shards, 3);
    assert_eq!(s.written_shards, s.manifest.shards.len() - 3);
    assert_eq!(snapshot(out.path()), snapshot(fresh.path()));
}

/// A class folder with good and bad files made here.
fn bad_inputs_root(dir: &Path) {
    // The smallest real JPEG of the sample.
    let good = imagenet_train()
        .items
        .iter()
        .map(|i| std::fs::read(&i.path).unwrap())
        .filter(|b| b.starts_with(&[0xFF, 0xD8]))
        .min_by_key(|b| b.len())
        .unwrap();
    let c = dir.join("n00000001");
    std::fs::create_dir_all(&c).unwrap();
    std::fs::write(c.join("good.JPEG"), &good).unwrap();
    std::fs::write(c.join("empty.JPEG"), b"").unwrap();
    std::fs::write(c.join("notes.JPEG"), b"this is not an image\n").unwrap();
    std::fs::write(c.join("truncated.JPEG"), &good[..good.len() / 2]).unwrap();
    // Corrupt: valid header, then garbage in the entropy-coded data and no end marker.
    let mut corrupt = good[..good.len() / 3].to_vec();
    corrupt.extend((0..2000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 0x80));
    std::fs::write(c.join("corrupt.JPEG"), &corrupt).unwrap();
    // Decompression bomb: a tiny JPEG whose header claims 65000 x 65000.
    let mut bomb = encode_jpeg(
        &Pixels {
            width: 8,
            height: 8,
            channels: 1,
            data: vec![128; 64],
        },
        90,
    )
    .unwrap();
    let sof = bomb.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    bomb[sof + 5..sof + 7].copy_from_slice(&65000u16.to_be_bytes());
    bomb[sof + 7..sof + 9].copy_from_slice(&65000u16.to_be_bytes());
    std::fs::write(c.join("bomb.JPEG"), &bomb).unwrap();
}

#[test]
fn bad_inputs_are_skipped_and_listed_or_fail_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("train");
    bad_inputs_root(&root);
    let listing = folder_listing(&root);
    let out = tmp.path().join("out");
    let s = write(&listing, &out, |_| {});
    assert_eq!(s.manifest.num_rows, 1);
    let reasons = skip_reasons(&s.manifest);
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    assert_eq!(reasons["n00000001/empty.JPEG"], "empty file");
    assert!(reasons["n00000001/notes.JPEG"].starts_with("not an image"));
    assert!(reasons["n00000001/truncated.JPEG"].starts_with("truncated jpeg"));
    assert!(
        reasons["n00000001/corrupt.JPEG"].starts_with("corrupt jpeg")
            || reasons["n00000001/corrupt.JPEG"].starts_with("truncated jpeg"),
        "{}",
        reasons["n00000001/corrupt.JPEG"]
    );
    assert!(reasons["n00000001/bomb.JPEG"].contains("decompression bomb"));
    verify_dataset(&out, true).unwrap();

    let out2 = tmp.path().join("out2");
    let err = write_fail(&listing, &out2, |o| o.shuffle = false);
    // Sorted order: bomb.JPEG is the first bad file.
    assert!(err.to_string().contains("bomb.JPEG"), "{err}");
    assert!(!out2.join("manifest.json").exists());
}

#[test]
fn with_several_threads_a_failure_names_the_lowest_bad_shards_file() {
    // Threads take shards one after another as they finish theirs; under `--on-error fail` the
    // reported file must still be the one a single thread would hit first.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("train");
    bad_inputs_root(&root);
    let c = root.join("n00000001");
    let good = std::fs::read(c.join("good.JPEG")).unwrap();
    for f in ["bomb", "corrupt", "empty", "notes", "truncated"] {
        std::fs::remove_file(c.join(format!("{f}.JPEG"))).unwrap();
    }
    for k in 0..12 {
        std::fs::write(c.join(format!("g{k:02}.JPEG")), &good).unwrap();
    }
    // Sorted order with two rows a shard: g07x is in shard 4, g10x in shard 6.
    std::fs::write(c.join("g07x.JPEG"), b"").unwrap();
    std::fs::write(c.join("g10x.JPEG"), b"not an image").unwrap();
    let listing = folder_listing(&root);
    for threads in [1, 3, 8] {
        for run in 0..3 {
            let out = tmp.path().join(format!("out-{threads}-{run}"));
            let err = write_fail(&listing, &out, |o| {
                o.shuffle = false;
                o.shard_rows = 2;
                o.row_group_rows = 1;
                o.threads = threads;
            });
            assert!(
                err.to_string().contains("g07x.JPEG"),
                "{threads} threads: {err}"
            );
            assert!(!out.join("manifest.json").exists());
        }
    }
}

#[cfg(unix)]
#[test]
fn dangling_symlinks_are_skipped_with_their_reason_not_fatal() {
    // Link farms are common for datasets; one link whose target is gone must not stop a
    // 1.28 M-image run, nor be lost: it is skipped (or fails) under the policy, named.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("train");
    let class = root.join("n00000001");
    std::fs::create_dir_all(&class).unwrap();
    std::fs::write(class.join("ok.JPEG"), tagged_jpeg(b"OKOK")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("gone.JPEG"), class.join("link.JPEG")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("gone"), root.join("n00000002")).unwrap();
    let listing = folder_listing(&root);
    assert_eq!(
        listing.classes.len(),
        1,
        "a dangling link is no class folder"
    );
    let out = tmp.path().join("out");
    let s = write(&listing, &out, |_| {});
    assert_eq!(s.manifest.num_rows, 1);
    let reasons = skip_reasons(&s.manifest);
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons["n00000001/link.JPEG"].contains("broken symbolic link"),
        "{reasons:?}"
    );
    assert!(
        reasons["n00000002"].contains("broken symbolic link"),
        "{reasons:?}"
    );

    let err = write_fail(&listing, &tmp.path().join("out2"), |_| {});
    // The dangling folder link is refused while listing, before any image is read.
    let e = err.to_string();
    assert!(
        e.contains("n00000002") && e.contains("broken symbolic link"),
        "{e}"
    );
    // Without it, the dangling file link stops the run while writing.
    let mut only_file = listing.clone();
    only_file.skipped.retain(|s| s.path != "n00000002");
    let err = write_fail(&only_file, &tmp.path().join("out3"), |_| {});
    assert!(err.to_string().contains("link.JPEG"), "{err}");
}

#[test]
fn verify_catches_a_flipped_byte_and_partial_shards() {
    let listing = imagenet_train();
    let out = tempfile::tempdir().unwrap();
    write(&listing, out.path(), |o| o.shard_rows = 20);
    let r = verify_dataset(out.path(), true).unwrap();
    assert_eq!(r.rows as usize, listing.items.len());
    assert_eq!(r.decoded_images as usize, listing.items.len());
    let f = out.path().join("shard-000001.parquet");
    let mut bytes = std::fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&f, &bytes).unwrap();
    let err = verify_dataset(out.path(), false).unwrap_err();
    assert!(err.to_string().contains("shard-000001.parquet"), "{err}");
    assert!(err.to_string().contains("sha256"), "{err}");
    bytes[mid] ^= 0x01;
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let err = verify_dataset(out.path(), false).unwrap_err();
    assert!(err.to_string().contains("shard-000001.parquet"), "{err}");
}

#[test]
fn worker_parts_merge_to_the_single_run() {
    let listing = imagenet_train();
    let single = tempfile::tempdir().unwrap();
    let set = |o: &mut WriteOptions| o.shard_rows = 5;
    write(&listing, single.path(), set);
    let parts = tempfile::tempdir().unwrap();
    let shared = parts.path().join("shared");
    for i in 0..3 {
        write(&listing, &shared, |o| {
            set(o);
            o.num_workers = 3;
            o.worker_index = i;
        });
    }
    assert!(!shared.join("manifest.json").exists());
    merge_parts(&shared, std::slice::from_ref(&shared)).unwrap();
    let mut got = snapshot(&shared);
    got.retain(|(n, _)| !n.starts_with("manifest.part-"));
    assert_eq!(got, snapshot(single.path()));
    // Missing part is an error.
    let other = parts.path().join("other");
    write(&listing, &other, |o| {
        set(o);
        o.num_workers = 2;
        o.worker_index = 0;
    });
    let err = merge_parts(&parts.path().join("merged"), std::slice::from_ref(&other)).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    // A part written with other settings is refused, naming the setting.
    let odd = parts.path().join("odd");
    write(&listing, &odd, |o| {
        set(o);
        o.num_workers = 2;
        o.worker_index = 1;
        o.image.resize_short_side = Some(64);
    });
    let err = merge_parts(&parts.path().join("merged2"), &[other, odd]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("option `resize_short_side`"), "{msg}");
    assert!(!msg.contains("option `seed`"), "{msg}");
}

/// A JPEG whose COM segment holds `tag`: same size, other bytes, still a valid image.
fn tagged_jpeg(tag: &[u8; 4]) -> Vec<u8> {
    let body = encode_jpeg(
        &Pixels {
            width: 16,
            height: 16,
            channels: 3,
            data: vec![90; 16 * 16 * 3],
        },
        90,
    )
    .unwrap();
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xFE, 0x00, 0x06];
    out.extend_from_slice(tag);
    out.extend_from_slice(&body[2..]);
    out
}

/// A temp dir with an ImageFolder root `train/` of one class folder holding `n` identical
/// `tagged_jpeg(b"AAAA")` files `0.JPEG`...: (dir, root, class folder).
fn one_class_of_tagged_jpegs(
    n: usize,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("train");
    let class = root.join("n00000001");
    std::fs::create_dir_all(&class).unwrap();
    for i in 0..n {
        std::fs::write(class.join(format!("{i}.JPEG")), tagged_jpeg(b"AAAA")).unwrap();
    }
    (tmp, root, class)
}

/// A 16-bit gray PNG: stored converted (to 8-bit), never as it is.
fn png16() -> Vec<u8> {
    let img =
        image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_pixel(8, 8, image::Luma([40_000]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn inputs_changed_after_listing_are_stored_as_they_are_when_read() {
    // Files are read straight into the row group's column buffer at offsets taken from the
    // listing's sizes; any file whose size changed since, vanished or needs converting must
    // still come out as a fresh read of it would, next to rows that stayed in the buffer.
    let (tmp, root, class) = one_class_of_tagged_jpegs(8);
    std::fs::write(class.join("8.png"), png16()).unwrap();
    let listing = folder_listing(&root);
    let mut longer = tagged_jpeg(b"BBBB");
    longer.splice(2..2, [0xFF, 0xFE, 0x00, 0x04, b'x', b'y']);
    std::fs::write(class.join("1.JPEG"), &longer).unwrap();
    let shorter = {
        let mut j = tagged_jpeg(b"CCCC");
        j.drain(2..10); // drop the comment segment
        j
    };
    std::fs::write(class.join("2.JPEG"), &shorter).unwrap();
    std::fs::remove_file(class.join("3.JPEG")).unwrap();
    std::fs::write(class.join("4.JPEG"), tagged_jpeg(b"DDDD")).unwrap(); // same size
    for group in [3, 4, 16] {
        let out = tmp.path().join(format!("out{group}"));
        let summary = write(&listing, &out, |o| {
            o.shuffle = false;
            o.row_group_rows = group;
        });
        let (m, rows) = read_all(&out);
        assert_eq!(m.num_rows, 8, "row groups of {group}");
        assert_eq!(skip_reasons(&m).len(), 1);
        assert!(skip_reasons(&m).contains_key("n00000001/3.JPEG"));
        assert_eq!(summary.converted, 1);
        let by_key: std::collections::HashMap<_, _> = rows
            .iter()
            .map(|r| (r.key.rsplit('/').next().unwrap(), r))
            .collect();
        assert_eq!(by_key["1.JPEG"].image, longer);
        assert_eq!(by_key["2.JPEG"].image, shorter);
        assert_eq!(by_key["4.JPEG"].image, tagged_jpeg(b"DDDD"));
        for k in ["0.JPEG", "5.JPEG", "6.JPEG", "7.JPEG"] {
            assert_eq!(by_key[k].image, tagged_jpeg(b"AAAA"), "{k}");
        }
        let png = &by_key["8.png"];
        assert_ne!(png.image, png16());
        assert_eq!((png.width, png.height), (8, 8));
    }
}

#[test]
fn rerunning_after_inputs_change_in_place_redoes_their_shards() {
    let (tmp, root, class) = one_class_of_tagged_jpegs(4);
    let out = tmp.path().join("out");
    let set = |o: &mut WriteOptions| {
        o.shard_rows = 2;
        o.shuffle = false;
    };
    write(&folder_listing(&root), &out, set);
    // The same size, new bytes (and, as any rewrite does, a new modification time).
    let edited = class.join("3.JPEG");
    std::fs::write(&edited, tagged_jpeg(b"BBBB")).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(10);
    std::fs::File::options()
        .write(true)
        .open(&edited)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let again = write(&folder_listing(&root), &out, set);
    assert!(
        again.reused_shards < 2,
        "the changed input's shard must be redone"
    );
    let (_, rows) = read_all(&out);
    let row = rows.iter().find(|r| r.key.ends_with("3.JPEG")).unwrap();
    assert_eq!(row.image, tagged_jpeg(b"BBBB"));
    // Untouched inputs: everything is reused.
    let third = write(&folder_listing(&root), &out, set);
    assert_eq!(third.reused_shards, 2);

    // An edited COCO annotation (same ids, new box) is new input too.
    let coco_root = data_root().join("coco");
    let json_path = tmp.path().join("instances_val2017.json");
    let mut json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(coco_root.join("annotations/instances_val2017.json")).unwrap(),
    )
    .unwrap();
    std::fs::write(&json_path, serde_json::to_vec(&json).unwrap()).unwrap();
    let coco_listing = || {
        droppos_shards::datasets::coco::list(&droppos_shards::datasets::coco::CocoOptions {
            images: coco_root.join("val2017"),
            annotations: json_path.clone(),
            split: None,
        })
        .unwrap()
    };
    let coco_out = tmp.path().join("coco");
    write(&coco_listing(), &coco_out, |_| {});
    let ann = &mut json["annotations"][0];
    let id = ann["id"].as_i64().unwrap();
    ann["bbox"] = serde_json::json!([1.0, 2.0, 3.0, 4.0]);
    std::fs::write(&json_path, serde_json::to_vec(&json).unwrap()).unwrap();
    write(&coco_listing(), &coco_out, |_| {});
    let (_, rows) = read_all(&coco_out);
    let got = rows
        .iter()
        .flat_map(|r| r.annotations.iter().flatten())
        .find(|a| a.id == id)
        .unwrap();
    assert_eq!(got.bbox, [1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn resized_shards_have_short_side_and_decode() {
    let listing = imagenet_train();
    let out = tempfile::tempdir().unwrap();
    write(&listing, out.path(), |o| {
        o.image.resize_short_side = Some(64);
        o.image.quality = 90;
    });
    let (m, rows) = read_all(out.path());
    assert_eq!(rows.len(), listing.items.len());
    for r in &rows {
        assert!(
            r.width.min(r.height) <= 64,
            "{} {}x{}",
            r.key,
            r.width,
            r.height
        );
        assert!(r.image.starts_with(&[0xFF, 0xD8]), "{}", r.key);
    }
    assert_eq!(m.options["resize_short_side"], 64);
    verify_dataset(out.path(), true).unwrap();
}

#[test]
fn rerunning_a_finished_command_reuses_everything_and_changes_nothing() {
    let listing = imagenet_train();
    let out = tempfile::tempdir().unwrap();
    let set = |o: &mut WriteOptions| o.shard_rows = 9;
    let first = write(&listing, out.path(), set);
    let want = snapshot(out.path());
    let again = write(&listing, out.path(), set);
    assert_eq!(again.reused_shards, first.manifest.shards.len());
    assert_eq!(again.written_shards, 0);
    assert_eq!(snapshot(out.path()), want);
    // Different options (one shard for all rows): everything is rewritten and stale extra
    // shards are removed.
    let all = listing.items.len();
    let other = write(&listing, out.path(), |o| o.shard_rows = all);
    assert_eq!(other.reused_shards, 0);
    let files: Vec<String> = snapshot(out.path()).into_iter().map(|f| f.0).collect();
    assert_eq!(files, vec!["manifest.json", "shard-000000.parquet"]);
}

#[test]
fn media_bytes_are_stored_as_they_are_unless_asked_and_the_rest_is_zstd() {
    use parquet::basic::Compression;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let listing = imagenet_train();
    let codecs = |out: &Path| -> Vec<(String, Compression)> {
        let file = std::fs::File::open(out.join("shard-000000.parquet")).unwrap();
        let r = SerializedFileReader::new(file).unwrap();
        let rg = r.metadata().row_group(0);
        rg.columns()
            .iter()
            .map(|c| (c.column_path().string(), c.compression()))
            .collect()
    };
    for compress_media in [false, true] {
        let out = tempfile::tempdir().unwrap();
        let m = write(&listing, out.path(), |o| o.compress_media = compress_media).manifest;
        let want = if compress_media { "zstd" } else { "none" };
        assert_eq!(m.options["media_compression"], want);
        let cols = codecs(out.path());
        assert!(cols.iter().any(|(n, _)| n == "image"), "{cols:?}");
        for (name, codec) in cols {
            let zstd = matches!(codec, Compression::ZSTD(_));
            assert_eq!(zstd, name != "image" || compress_media, "{name}: {codec:?}");
        }
        verify_dataset(out.path(), true).unwrap();
    }
}

#[test]
fn jpeg_restarts_keep_every_pixel_and_make_jpegs_cuttable() {
    use droppos_shards::codec::{decode, DEFAULT_MAX_PIXELS};
    use droppos_shards::jpeg_restart::Layout;
    let listing = imagenet_train();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(&listing, a.path(), |_| {});
    let m = write(&listing, b.path(), |o| o.image.jpeg_restarts = true).manifest;
    assert_eq!(m.options["jpeg_restarts"], true);
    let (_, plain) = read_all(a.path());
    let (_, marked) = read_all(b.path());
    assert_eq!(plain.len(), marked.len());
    let mut cuttable = 0;
    for (p, r) in plain.iter().zip(&marked) {
        assert_eq!((&p.key, p.width, p.height), (&r.key, r.width, r.height));
        let same = decode(&p.image, DEFAULT_MAX_PIXELS).unwrap()
            == decode(&r.image, DEFAULT_MAX_PIXELS).unwrap();
        assert!(same, "{}: pixels changed", p.key);
        if p.image.starts_with(&[0xFF, 0xD8]) {
            cuttable += usize::from(Layout::parse(&r.image).is_some());
        } else {
            assert_eq!(p.image, r.image, "{}: non-JPEG bytes kept", p.key);
        }
    }
    assert!(
        cuttable * 10 >= marked.len() * 8,
        "{cuttable}/{}",
        marked.len()
    );
    verify_dataset(b.path(), true).unwrap();
}

/// Options no image can be written with are refused up front, before any file is touched,
/// instead of failing (or panicking) image by image.
#[test]
fn impossible_image_options_are_refused_before_writing() {
    let l = imagenet_train();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let e = common::write_fail(&l, &out, |o| o.image.resize_short_side = Some(0)).to_string();
    assert!(e.contains("shorter side") && e.contains("positive"), "{e}");
    let e = common::write_fail(&l, &out, |o| o.image.quality = 0).to_string();
    assert!(e.contains("quality"), "{e}");
    assert!(!out.exists());
}

/// A second run into a folder another run (the same worker) is writing is refused with a clear
/// error instead of deleting the first one's temp files; once it is done, the folder holds no
/// journal or lock.
#[cfg(unix)]
#[test]
fn a_second_run_into_a_busy_folder_is_refused() {
    use std::os::fd::AsRawFd;
    let l = imagenet_train();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(out.join(".progress")).unwrap();
    let held = std::fs::File::create(out.join(".progress/lock-0-of-1")).unwrap();
    // SAFETY: plain syscall on a file this test owns.
    assert_eq!(
        unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let e = common::write_fail(&l, &out, |_| {}).to_string();
    assert!(e.contains("another shard command"), "{e}");
    // Another worker of a multi-worker run takes its own lock.
    common::write(&l, &out, |o| {
        o.num_workers = 2;
        o.worker_index = 1;
    });
    drop(held);
    common::write(&l, &out, |_| {});
    assert!(!out.join(".progress").exists());
}

/// Shards the ImageNet sample into a temp folder, then rewrites its first shard's column `name`
/// through `change` (its new field and values), as another tool would, recording the new size
/// and hash in the manifest. Returns the folder (and what keeps it).
fn with_column_rewritten(
    name: &str,
    change: impl Fn(&arrow::array::ArrayRef) -> (arrow::datatypes::Field, arrow::array::ArrayRef),
) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    write(&imagenet_train(), &out, |_| {});
    use arrow::array::RecordBatch;
    use arrow::datatypes::Schema;
    use droppos_shards::manifest::Manifest;
    use sha2::Digest;
    use std::sync::Arc;
    let mut m = Manifest::load(&out).unwrap();
    let path = m.shard_path(0);
    let batches: Vec<RecordBatch> =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&path).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let old = batches[0].schema();
    let mut schema = None;
    let mut new_batches = Vec::new();
    for b in &batches {
        let (fields, cols): (Vec<_>, Vec<_>) = old
            .fields()
            .iter()
            .zip(b.columns())
            .map(|(f, c)| {
                if f.name() == name {
                    change(c)
                } else {
                    (f.as_ref().clone(), c.clone())
                }
            })
            .unzip();
        let sc = Arc::new(Schema::new(fields));
        new_batches.push(RecordBatch::try_new(sc.clone(), cols).unwrap());
        schema = Some(sc);
    }
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&path).unwrap(),
        schema.unwrap(),
        None,
    )
    .unwrap();
    for b in &new_batches {
        w.write(b).unwrap();
    }
    w.close().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    m.shards[0].bytes = bytes.len() as u64;
    m.shards[0].sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    m.save_as(&out, droppos_shards::MANIFEST_FILE).unwrap();
    (tmp, out)
}

/// A shard whose hash matches its manifest but whose column has another type (rewritten by
/// another tool) is an error naming the file and column for `verify --decode` and `stats`, not
/// a panic; a manifest that lists one shard twice is refused (its rows would count twice).
#[test]
fn wrong_column_types_and_twice_listed_shards_are_named_errors() {
    use arrow::datatypes::{DataType, Field};
    use droppos_shards::manifest::Manifest;
    let (_tmp, out) = with_column_rewritten("width", |c| {
        (
            Field::new("width", DataType::Int64, false),
            arrow::compute::cast(c, &DataType::Int64).unwrap(),
        )
    });
    let e = verify_dataset(&out, true).unwrap_err().to_string();
    assert!(
        e.contains("shard-000000") && e.contains("column width is Int64"),
        "{e}"
    );
    let m = Manifest::load(&out).unwrap();
    let e = droppos_shards::verify::row_stats(&m)
        .unwrap_err()
        .to_string();
    assert!(e.contains("column width is Int64"), "{e}");

    let mut twice = m.clone();
    let mut again = twice.shards[0].clone();
    again.file = format!("./{}", again.file);
    twice.num_rows += again.rows;
    twice.shards.push(again);
    twice.save_as(&out, droppos_shards::MANIFEST_FILE).unwrap();
    let e = Manifest::load(&out).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("listed twice"), "{e}");
}

/// A null label (a shard rewritten by another tool) is named by `verify --decode` and refused by
/// `stats`' row reader, rather than counted as whatever value sits under it.
#[test]
fn null_labels_are_named_not_counted() {
    use arrow::array::{AsArray, Int32Array};
    use arrow::datatypes::{DataType, Field, Int32Type};
    use droppos_shards::manifest::Manifest;
    let (_tmp, out) = with_column_rewritten("label", |c| {
        let v = c.as_primitive::<Int32Type>();
        let with_null: Int32Array = (0..v.len()).map(|i| (i != 1).then(|| v.value(i))).collect();
        (
            Field::new("label", DataType::Int32, true),
            std::sync::Arc::new(with_null) as arrow::array::ArrayRef,
        )
    });
    let e = verify_dataset(&out, true).unwrap_err().to_string();
    assert!(e.contains("shard-000000") && e.contains("label"), "{e}");
    let m = Manifest::load(&out).unwrap();
    let e = droppos_shards::verify::row_stats(&m)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("label is null"), "{e}");
}

/// `verify --decode` refuses an image the writer would never store (RGBA here: it converts
/// such inputs), put into a shard by another tool.
#[test]
fn verify_refuses_images_the_writer_would_have_converted() {
    let (_tmp, out) = with_column_rewritten("image", |c| {
        let imgs = arrow::array::AsArray::as_binary::<i32>(c.as_ref());
        let first =
            droppos_shards::codec::decode(imgs.value(0), droppos_shards::codec::DEFAULT_MAX_PIXELS)
                .unwrap();
        let rgb = if first.channels == 3 {
            first.data.clone()
        } else {
            first.data.iter().flat_map(|&v| [v, v, v]).collect()
        };
        let rgba: Vec<u8> = rgb
            .chunks(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect();
        use image::ImageEncoder;
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(
                &rgba,
                first.width,
                first.height,
                image::ExtendedColorType::Rgba8,
            )
            .unwrap();
        let values: Vec<&[u8]> = (0..c.len())
            .map(|r| if r == 0 { &png[..] } else { imgs.value(r) })
            .collect();
        let arr: arrow::array::ArrayRef =
            std::sync::Arc::new(arrow::array::BinaryArray::from(values));
        (
            arrow::datatypes::Field::new("image", arrow::datatypes::DataType::Binary, false),
            arr,
        )
    });
    let e = verify_dataset(&out, true).unwrap_err().to_string();
    assert!(
        e.contains("row 0") && e.contains("not an 8-bit RGB or gray"),
        "{e}"
    );
}

/// Parts written into one shared folder (a Slurm array's usual layout) are checked in place by
/// `merge` as parts in other folders are: a truncated shard is not merged.
#[test]
fn merge_checks_shards_in_a_shared_folder() {
    let l = imagenet_train();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for i in 0..2 {
        write(&l, &out, |o| {
            o.shard_rows = 8;
            o.num_workers = 2;
            o.worker_index = i;
        });
    }
    let shard = out.join("shard-000001.parquet");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let e = merge_parts(&out, std::slice::from_ref(&out))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("shard-000001"), "{e}");
    assert!(!out.join("manifest.json").exists());
}

/// Manifest fields that would crash or mislead a reader are refused when it is loaded: a
/// patch size of 0 (a division by zero in `verify --decode`), row counts that overflow into a
/// plausible total, a format_version of 0 or of another type.
#[test]
fn manifests_with_impossible_numbers_are_refused() {
    use droppos_shards::manifest::Manifest;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    write(&imagenet_train(), &out, |_| {});
    let path = out.join(droppos_shards::MANIFEST_FILE);
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    type Change = fn(&mut serde_json::Value);
    let cases: [(&str, Change); 4] = [
        ("patch_size is 0", |m| m["patch_size"] = 0.into()),
        ("overflow", |m| {
            let mut extra = m["shards"][0].clone();
            extra["file"] = "shard-000009.parquet".into();
            extra["rows"] = u64::MAX.into();
            m["shards"].as_array_mut().unwrap().push(extra);
        }),
        ("format_version 0", |m| m["format_version"] = 0.into()),
        ("format_version \"1\"", |m| m["format_version"] = "1".into()),
    ];
    for (needle, change) in cases {
        let mut m = original.clone();
        change(&mut m);
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        let e = Manifest::load(&out).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(needle), "{needle}: {e}");
    }
}
