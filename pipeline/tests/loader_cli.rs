//! `droppos-pipeline bench loader --keys-out`: the batch order from the command line, checked for
//! determinism, disjoint and complete rank slices, and resumption.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

mod common;
use common::{bin, break_first_image, data_root, run_ok, shard};

/// Runs the loader (tiny outputs, so it is quick) and returns its `--keys-out` lines.
fn batches(shards: &Path, tmp: &Path, name: &str, args: &[&str]) -> Vec<Value> {
    let keys = tmp.join(format!("{name}.jsonl"));
    run_ok(
        bin()
            .args(["bench", "loader", "--size", "32", "--batch-size", "4"])
            .args(["--no-verify", "--data"])
            .arg(shards)
            .arg("--keys-out")
            .arg(&keys)
            .args(args),
    );
    std::fs::read_to_string(&keys)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The sample ImageNet train folder as shards under `tmp/inet`.
fn imagenet_train(tmp: &Path) -> std::path::PathBuf {
    shard(
        tmp,
        "inet",
        &["imagenet"],
        &[("--root", data_root().join("imagenet/train"))],
    )
}

fn keys_of(lines: &[Value], epoch: u64) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l["epoch"] == epoch)
        .flat_map(|l| l["keys"].as_array().unwrap().clone())
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn rank_slices_epochs_and_resumption_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = imagenet_train(tmp.path());
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(shards.join("manifest.json")).unwrap()).unwrap();
    let n = manifest["num_rows"].as_u64().unwrap() as usize;

    let two = ["--epochs", "2", "--threads", "2"];
    let r0 = batches(
        &shards,
        tmp.path(),
        "r0",
        &[&two[..], &["--world-size", "2", "--rank", "0"]].concat(),
    );
    let r1 = batches(
        &shards,
        tmp.path(),
        "r1",
        &[&two[..], &["--world-size", "2", "--rank", "1"]].concat(),
    );
    for epoch in 0..2 {
        let (a, b) = (keys_of(&r0, epoch), keys_of(&r1, epoch));
        let (sa, sb): (BTreeSet<_>, BTreeSet<_>) = (a.iter().collect(), b.iter().collect());
        // Equal lengths, together everything; only the wrap-around padding of an odd count
        // (DistributedSampler's) appears on both ranks.
        let per_rank = n.div_ceil(2);
        assert_eq!((a.len(), b.len()), (per_rank, per_rank));
        assert_eq!(
            sa.union(&sb).count(),
            n,
            "epoch {epoch}: a sample is missing"
        );
        assert_eq!(
            sa.intersection(&sb).count(),
            2 * per_rank - n,
            "epoch {epoch}: ranks overlap"
        );
    }
    // Each epoch is reshuffled.
    assert_ne!(keys_of(&r0, 0), keys_of(&r0, 1));
    // The same command again gives the same order (any thread count).
    let again = batches(
        &shards,
        tmp.path(),
        "again",
        &[
            "--epochs",
            "2",
            "--world-size",
            "2",
            "--rank",
            "0",
            "--threads",
            "1",
        ],
    );
    assert_eq!(keys_of(&again, 0), keys_of(&r0, 0));
    assert_eq!(keys_of(&again, 1), keys_of(&r0, 1));
    // Resuming epoch 1 after its third batch continues with exactly the uninterrupted batches.
    let epoch1: Vec<&Value> = r0.iter().filter(|l| l["epoch"] == 1).collect();
    let consumed = epoch1[2]["consumed"].as_u64().unwrap().to_string();
    let resumed = batches(
        &shards,
        tmp.path(),
        "resumed",
        &[
            "--world-size",
            "2",
            "--rank",
            "0",
            "--start-epoch",
            "1",
            "--resume-samples",
            &consumed,
        ],
    );
    let want: Vec<&Value> = epoch1[3..].to_vec();
    assert_eq!(resumed.len(), want.len());
    for (got, want) in resumed.iter().zip(want) {
        assert_eq!(got["keys"], want["keys"]);
        assert_eq!(got["labels"], want["labels"]);
        assert_eq!(got["consumed"], want["consumed"]);
    }
}

/// `bench loader --dump DIR`: the dumped samples and their `samples.jsonl` lines.
fn dump(shards: &Path, dir: &Path, args: &[&str]) -> Vec<Value> {
    run_ok(
        bin()
            .args(["bench", "loader", "--size", "32", "--batch-size", "4"])
            .args(["--threads", "2", "--no-verify", "--data"])
            .arg(shards)
            .arg("--dump")
            .arg(dir)
            .args(args),
    );
    std::fs::read_to_string(dir.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn usize_of(v: &Value, k: &str) -> usize {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}")) as usize
}

#[test]
fn dump_writes_the_samples_with_the_geometry_torchvision_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = imagenet_train(tmp.path());
    let seed = ["--seed", "3", "--dump-limit", "10"];
    let u8s = dump(
        &shards,
        &tmp.path().join("u8"),
        &[&seed[..], &["--format", "u8"]].concat(),
    );
    let f32s = dump(
        &shards,
        &tmp.path().join("f32"),
        &[&seed[..], &["--format", "f32"]].concat(),
    );
    assert_eq!(u8s.len(), 10, "--dump-limit");
    assert_eq!(
        u8s, f32s,
        "same samples and geometry whatever the pixel format"
    );
    let mut flips = 0;
    for s in &u8s {
        let a = image::open(tmp.path().join("u8").join(s["file"].as_str().unwrap())).unwrap();
        let b = image::open(tmp.path().join("f32").join(s["file"].as_str().unwrap())).unwrap();
        assert_eq!((a.width(), a.height()), (32, 32));
        // f32 output de-normalised gives back exactly the u8 output.
        assert_eq!(a.to_rgb8(), b.to_rgb8(), "{s}");
        let g = &s["geometry"];
        assert_eq!(g["kind"], "pretrain");
        let (sw, sh) = (usize_of(g, "source_width"), usize_of(g, "source_height"));
        let (i, j, h, w) = (
            usize_of(g, "i"),
            usize_of(g, "j"),
            usize_of(g, "h"),
            usize_of(g, "w"),
        );
        assert!(h > 0 && w > 0 && i + h <= sh && j + w <= sw, "{g}");
        flips += g["flip"].as_bool().unwrap() as usize;
        assert!(s["mask_file"].is_null());
    }
    assert!(flips > 0 && flips < 10, "flip drawn per sample: {flips}/10");

    // Evaluation: torchvision's Resize(int(S / 0.875)) + CenterCrop(S) parameters.
    for s in dump(&shards, &tmp.path().join("eval"), &["--eval"]) {
        let g = &s["geometry"];
        assert_eq!(g["kind"], "eval");
        let (sw, sh) = (usize_of(g, "source_width"), usize_of(g, "source_height"));
        let (rw, rh) = (usize_of(g, "resize_w"), usize_of(g, "resize_h"));
        assert_eq!(rw.min(rh), 36, "{g}");
        let long = (36.0 * sw.max(sh) as f64 / sw.min(sh) as f64) as usize;
        assert_eq!(rw.max(rh), long, "{g}");
        assert_eq!((usize_of(g, "h"), usize_of(g, "w")), (32, 32));
        // torchvision: int(round((rh - 32) / 2.0)), Python's half-to-even rounding.
        let (d, half) = (rh - 32, (rh - 32) / 2);
        let top = if d % 2 == 1 && half % 2 == 1 {
            half + 1
        } else {
            half
        };
        assert_eq!(usize_of(g, "i"), top, "{g}");
        assert_eq!(g["flip"], false);
    }
}

#[test]
fn dump_writes_masks_of_dense_datasets() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = shard(
        tmp.path(),
        "ade",
        &["ade20k", "--split", "validation"],
        &[("--root", data_root().join("ade20k/ADEChallengeData2016"))],
    );
    let samples = dump(&shards, &tmp.path().join("d"), &[]);
    assert!(!samples.is_empty());
    for s in samples {
        let m = image::open(tmp.path().join("d").join(s["mask_file"].as_str().unwrap())).unwrap();
        assert_eq!((m.width(), m.height()), (32, 32));
        assert!(matches!(m, image::DynamicImage::ImageLuma8(_)));
    }
}

/// `bench loader` over `dirs`, expected to fail: its stderr.
fn loader_error(dirs: &[&Path]) -> String {
    let out = bin()
        .args(["bench", "loader", "--size", "32", "--no-verify", "--data"])
        .args(dirs)
        .output()
        .unwrap();
    assert!(!out.status.success(), "expected a failure for {dirs:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn folders_that_disagree_on_labels_or_repeat_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let by_folder = imagenet_train(tmp.path());
    let by_list = shard(
        tmp.path(),
        "inet-list",
        &["imagenet"],
        &[
            ("--root", data_root().join("imagenet/train")),
            ("--classes", data_root().join("imagenet/synset_words.txt")),
        ],
    );
    let e = loader_error(&[&by_folder, &by_list]);
    assert!(e.contains("different class lists"), "{e}");
    let e = loader_error(&[&by_folder, &by_folder]);
    assert!(e.contains("given twice"), "{e}");
}

#[test]
fn undecodable_samples_are_skipped_and_counted_or_fail_by_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = imagenet_train(tmp.path());
    break_first_image(&shards);
    let run = |policy: &str| {
        bin()
            .args(["bench", "loader", "--size", "32", "--json"])
            .args(["--on-error", policy, "--data"])
            .arg(&shards)
            .output()
            .unwrap()
    };
    let skip = run("skip");
    assert!(skip.status.success(), "{skip:?}");
    let report: Value = serde_json::from_str(String::from_utf8_lossy(&skip.stdout).trim()).unwrap();
    assert_eq!(report["skipped"], 1, "{report}");
    let fail = run("fail");
    assert!(!fail.status.success());
    let e = String::from_utf8_lossy(&fail.stderr);
    assert!(e.contains("shard-000000.parquet"), "{e}");
}
