//! `droppos-pipeline export --random-init` and `eval knn|linear|position|dense|classify` end to end through
//! the binary: shards made here from the bundled sample data (ImageNet train/val, COCO, ADE20K),
//! ONNX exports of the tiny recipe's architecture, ONNX Runtime over the loader. Checks the
//! result JSON's structure and counts (accuracies of an untrained model are only range-checked)
//! and that wrong inputs fail with messages that say what is wrong.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;
use common::{
    bin, broken_copy, data_root, fails_with, manifest_rows, run_ok, shard, shard_imagenet_sample,
};

fn recipe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-cpu.toml")
}

fn export(tmp: &Path, what: &str, seed: u32) -> PathBuf {
    let out = tmp.join(format!("{what}.onnx"));
    let o = run_ok(
        bin()
            .args(["export", "--random-init", "--what", what])
            .arg("--seed")
            .arg(seed.to_string())
            .arg("--config")
            .arg(recipe())
            .arg("--out")
            .arg(&out),
    );
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["random_init_seed"], seed);
    assert_eq!(report["img_size"], 64);
    out
}

/// A `--random-init` classifier of the tiny recipe's encoder with `classes` classes.
fn export_classifier(tmp: &Path, classes: u32) -> PathBuf {
    let out = tmp.join(format!("classifier{classes}.onnx"));
    let o = run_ok(
        bin()
            .args(["export", "--random-init", "--what", "classifier"])
            .arg("--num-classes")
            .arg(classes.to_string())
            .arg("--config")
            .arg(recipe())
            .arg("--out")
            .arg(&out),
    );
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["what"], "classifier");
    assert_eq!(
        report["global_pool"], "avg",
        "the recipe's MAE-style head: {report}"
    );
    out
}

fn eval(sub: &str, model: &Path, args: &[&str], dirs: &[(&str, &Path)]) -> Command {
    let mut c = bin();
    c.args(["eval", sub, "--json", "--no-progress", "--threads", "1"])
        .args(["--batch-size", "8", "--model"])
        .arg(model)
        .args(args);
    for (flag, d) in dirs {
        c.arg(flag).arg(d);
    }
    c
}

fn json(c: &mut Command) -> Value {
    let o = run_ok(c);
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(text.trim().lines().count(), 1, "one JSON object: {text}");
    serde_json::from_str(text.trim()).unwrap()
}

fn unit(v: &Value) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    assert!((0.0..=1.0).contains(&x), "{x}");
    x
}

#[test]
fn every_eval_runs_on_sample_shards_and_bad_inputs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let d = data_root();
    let (train, val) = shard_imagenet_sample(t);
    let (n_train, n_val) = (manifest_rows(&train), manifest_rows(&val));
    let coco = shard(
        t,
        "coco",
        &["coco"],
        &[
            ("--images", d.join("coco/train2017")),
            (
                "--annotations",
                d.join("coco/annotations/instances_train2017.json"),
            ),
        ],
    );
    let ade = shard(
        t,
        "ade",
        &["ade20k", "--split", "validation"],
        &[("--root", d.join("ade20k/ADEChallengeData2016"))],
    );
    let enc = export(t, "encoder", 3);
    let dp = export(t, "droppos", 3);
    // --random-init is the seeded trainer initialisation: same seed, same bytes; another seed,
    // other weights.
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    let again = t.join("again");
    std::fs::create_dir(&again).unwrap();
    assert_eq!(bytes(&export(&again, "encoder", 3)), bytes(&enc));
    assert_ne!(bytes(&export(&again, "encoder", 4)), bytes(&enc));

    // k-NN: memory bank = train shards, queries = val shards; and leave-one-out on train.
    let r = json(&mut eval(
        "knn",
        &enc,
        &[],
        &[("--train", &train), ("--val", &val)],
    ));
    assert_eq!(r["eval"], "knn");
    assert_eq!(
        (r["k"].as_u64(), r["temperature"].as_f64()),
        (Some(20), Some(0.07f32 as f64))
    );
    assert_eq!(
        (r["num_train"].as_u64(), r["num_queries"].as_u64()),
        (Some(n_train), Some(n_val))
    );
    assert!(unit(&r["top1"]) <= unit(&r["top5"]));
    let r = json(&mut eval(
        "knn",
        &enc,
        &["--k", "5"],
        &[("--train", &train)],
    ));
    assert_eq!(r["leave_one_out"], true);
    assert_eq!(r["num_queries"], n_train);
    assert!(unit(&r["top1"]) <= unit(&r["top5"]));
    let out = t.join("knn.json");
    let mut c = eval("knn", &enc, &["--limit", "10"], &[("--train", &train)]);
    let r = json(c.arg("--out").arg(&out));
    assert_eq!(r["num_train"], 10);
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(saved["top1"], r["top1"]);
    assert_eq!(saved["skipped_images"], 0);
    // An undecodable image is skipped, logged, and counted in the results.
    let broken = broken_copy(&train, &t.join("train-broken"));
    let o = run_ok(&mut eval("knn", &enc, &[], &[("--train", &broken)]));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (r["num_train"].as_u64(), r["skipped_images"].as_u64()),
        (Some(n_train - 1), Some(1))
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("shard-000000.parquet") && err.contains("1 undecodable"),
        "{err}"
    );

    // Linear probe trained in Rust.
    let r = json(&mut eval(
        "linear",
        &enc,
        &["--epochs", "3"],
        &[("--train", &train), ("--val", &val)],
    ));
    assert_eq!(
        (r["num_train"].as_u64(), r["num_val"].as_u64()),
        (Some(n_train), Some(n_val))
    );
    assert!(unit(&r["top1"]) <= unit(&r["top5"]));
    unit(&r["train_top1"]);
    assert!(r["final_train_loss"].as_f64().unwrap().is_finite());
    // Probe settings it cannot train with are refused by name, and a probe whose loss diverges
    // is an error, not a score.
    for (args, needle) in [
        (&["--lr", "nan"][..], "--lr must be a positive"),
        (&["--lr", "inf"][..], "--lr must be a positive"),
        (&["--weight-decay", "inf"][..], "--weight-decay must be"),
        (
            &["--probe-batch-size", "0"][..],
            "--probe-batch-size must be",
        ),
        (&["--lr", "1e30", "--epochs", "3"][..], "lower --lr"),
    ] {
        fails_with(
            &mut eval(
                "linear",
                &enc,
                args,
                &[("--train", &train), ("--val", &val)],
            ),
            needle,
        );
    }

    // Position accuracy at two mask ratios: 16 patches; ratio 0.5 keeps 8 and drops the
    // positions of int(8 · 0.75) = 6 of them; 0.75 keeps 4 and drops 3.
    let r = json(&mut eval(
        "position",
        &dp,
        &["--mask-ratio", "0.5,0.75", "--seed", "1"],
        &[("--data", &val)],
    ));
    assert_eq!(
        (r["images"].as_u64(), r["num_positions"].as_u64()),
        (Some(n_val), Some(16))
    );
    let s = r["scores"].as_array().unwrap();
    assert_eq!(s.len(), 2);
    for (s, (visible, dropped)) in s.iter().zip([(8, 6), (4, 3)]) {
        assert_eq!(s["visible"], visible);
        assert_eq!(s["predictions_visible"], n_val * visible);
        assert_eq!(s["predictions_dropped"], n_val * dropped);
        assert_eq!(s["chance"], 1.0 / 16.0);
        unit(&s["acc_dropped"]);
        unit(&s["acc_visible"]);
    }
    // Same seed, same masks, same numbers.
    let again = json(&mut eval(
        "position",
        &dp,
        &["--mask-ratio", "0.5,0.75", "--seed", "1"],
        &[("--data", &val)],
    ));
    assert_eq!(again["scores"], r["scores"]);
    // Masks are drawn per image: the batch size changes nothing (batches of 5 vs 8).
    let by_batch = |size: &str| {
        let mut c = bin();
        c.args([
            "eval",
            "position",
            "--json",
            "--no-progress",
            "--threads",
            "1",
        ])
        .args(["--batch-size", size, "--mask-ratio", "0.75", "--seed", "3"])
        .arg("--model")
        .arg(&dp)
        .arg("--data")
        .arg(&train);
        json(&mut c)["scores"].clone()
    };
    assert_eq!(by_batch("5"), by_batch("8"));
    // Three mask draws per image: three times the predictions.
    let r = json(&mut eval(
        "position",
        &dp,
        &["--mask-ratio", "0.5", "--repeats", "3"],
        &[("--data", &val)],
    ));
    assert_eq!(r["scores"][0]["predictions_visible"], 3 * n_val * 8);

    // Dense probe on COCO (train = val here) and ADE20K patch labels.
    for (dirs, extra) in [(&coco, None), (&ade, Some("--ignore-label=0"))] {
        let mut args = vec!["--epochs", "3"];
        args.extend(extra);
        let r = json(&mut eval(
            "dense",
            &enc,
            &args,
            &[("--train", dirs), ("--val", dirs)],
        ));
        let images = r["val_images"].as_u64().unwrap();
        assert!(images > 0);
        assert!(r["val_patches"].as_u64().unwrap() <= images * 16);
        assert!(r["classes_scored"].as_u64().unwrap() >= 1);
        unit(&r["patch_accuracy"]);
        unit(&r["miou"]);
    }

    // Human summary without --json.
    let o = run_ok(
        bin()
            .args(["eval", "knn", "--no-progress", "--model"])
            .arg(&enc)
            .arg("--train")
            .arg(&train),
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("top-1") && text.contains("leave-one-out"),
        "{text}"
    );

    // classify: a random-init classifier over the 1000 synset_words classes scores the val
    // shards (chance-level accuracy, range-checked), counts every image once.
    let cls_model = export_classifier(t, 1000);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(val.join("manifest.json")).unwrap()).unwrap();
    let r = json(&mut eval("classify", &cls_model, &[], &[("--data", &val)]));
    assert_eq!(r["eval"], "classify");
    assert_eq!(r["images"], manifest["num_rows"]);
    assert_eq!(r["num_classes"], 1000);
    let (top1, top5) = (unit(&r["top1"]), unit(&r["top5"]));
    assert!(top1 <= top5, "{r}");
    unit(&r["mean_class_top1"]);
    // A batch far larger than the data is allocated for the data only (it aborted the process).
    let mut huge = bin();
    huge.args([
        "eval",
        "classify",
        "--json",
        "--no-progress",
        "--threads",
        "1",
    ])
    .args(["--batch-size", "100000000", "--model"])
    .arg(&cls_model)
    .arg("--data")
    .arg(&val);
    assert_eq!(json(&mut huge)["images"], manifest["num_rows"]);
    // Settings that leave nothing to measure are refused.
    for (args, needle) in [
        (&["--k", "0"][..], "--k must be at least 1"),
        (
            &["--temperature", "0"][..],
            "--temperature must be a positive",
        ),
        (
            &["--temperature=-1"][..],
            "--temperature must be a positive",
        ),
        (&["--limit", "0"][..], "--limit 0"),
        // Leave-one-out with one image: nothing to vote.
        (&["--limit", "1"][..], "needs at least 2 images"),
    ] {
        fails_with(&mut eval("knn", &enc, args, &[("--train", &train)]), needle);
    }
    fails_with(
        bin()
            .args([
                "eval",
                "knn",
                "--no-progress",
                "--batch-size",
                "0",
                "--model",
            ])
            .arg(&enc)
            .arg("--train")
            .arg(&train),
        "--batch-size must be at least 1",
    );
    // `--out` in a folder that does not exist yet: made before the work, not failed after.
    let out = t.join("results/knn/r.json");
    let mut c = eval("knn", &enc, &["--limit", "4"], &[("--train", &train)]);
    c.arg("--out").arg(&out);
    run_ok(&mut c);
    let written: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(written["eval"], "knn");
    // Another class count than the shards' list (labels could not index the logits); an
    // encoder is not a classifier; a pre-training checkpoint has no head; a random classifier
    // needs its class count.
    let small = export_classifier(t, 3);
    fails_with(
        &mut eval("classify", &small, &[], &[("--data", &val)]),
        "list 1000 classes but the classifier predicts 3",
    );
    fails_with(
        &mut eval("classify", &enc, &[], &[("--data", &val)]),
        "--what classifier",
    );
    fails_with(
        &mut eval("classify", &cls_model, &[], &[("--data", &coco)]),
        "do not all have class labels",
    );
    fails_with(
        bin()
            .args([
                "export",
                "--random-init",
                "--what",
                "classifier",
                "--config",
            ])
            .arg(recipe())
            .arg("--out")
            .arg(t.join("x.onnx")),
        "--num-classes",
    );

    // Wrong model kind, wrong shard kind, mismatched patch grid.
    fails_with(
        &mut eval("position", &enc, &[], &[("--data", &val)]),
        "--what droppos",
    );
    fails_with(
        &mut eval("knn", &dp, &[], &[("--train", &train)]),
        "--what encoder",
    );
    fails_with(
        &mut eval("knn", &enc, &[], &[("--train", &coco)]),
        "do not all have class labels",
    );
    // Train labelled by the folder order, val by synset_words.txt: label 3 means two classes.
    let train_folders = shard(
        t,
        "inet-train-folders",
        &["imagenet"],
        &[("--root", d.join("imagenet/train"))],
    );
    fails_with(
        &mut eval(
            "knn",
            &enc,
            &[],
            &[("--train", &train_folders), ("--val", &val)],
        ),
        "different class lists",
    );
    fails_with(
        &mut eval(
            "dense",
            &enc,
            &[],
            &[("--train", &train), ("--val", &train)],
        ),
        "do not all have patch_labels",
    );
    let ade8 = shard(
        t,
        "ade8",
        &["ade20k", "--split", "validation", "--patch-size", "8"],
        &[("--root", d.join("ade20k/ADEChallengeData2016"))],
    );
    fails_with(
        &mut eval("dense", &enc, &[], &[("--train", &ade8), ("--val", &ade8)]),
        "patch grid",
    );
    fails_with(
        &mut eval("knn", &enc, &[], &[("--train", &t.join("missing"))]),
        "missing",
    );
}

/// `bench onnx` on a tiny encoder: one JSON line, ort and tch agree on `cls`.
#[test]
fn bench_onnx_reports_both_engines() {
    let o = run_ok(bin().args([
        "bench",
        "onnx",
        "--model",
        "vit_tiny_patch16_32",
        "--batch",
        "2",
        "--threads",
        "1",
        "--iters",
        "1",
    ]));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (r["img_size"].as_i64(), r["batch"].as_i64()),
        (Some(32), Some(2))
    );
    assert!(r["ort_images_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["tch_images_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["onnx_bytes"].as_u64().unwrap() > 0);
    assert!(r["cls_max_abs_diff"].as_f64().unwrap() <= 1e-4, "{r}");
}
