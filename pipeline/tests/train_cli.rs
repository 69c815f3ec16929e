//! `droppos-pipeline train` end to end: real DropPos model, real loader over shards of the
//! bundled ImageNet sample. Pins the contract through the binary: a resumed run's loss
//! sequence and weights equal an uninterrupted run's (CPU, bit for bit), SIGINT saves and the
//! run continues with --resume, and an existing run is never overwritten silently.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;
use common::{bin, break_first_image, data_root, manifest_rows, run_ok};

fn recipe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-cpu.toml")
}

fn shard_imagenet(tmp: &Path) -> PathBuf {
    let d = data_root();
    let out = tmp.join("imagenet");
    run_ok(
        bin()
            .args(["shard", "imagenet", "--root"])
            .arg(d.join("imagenet/train"))
            .arg("--out")
            .arg(&out),
    );
    out
}

/// The tiny recipe shrunk to a few fast steps: 8 images per step, 2 epochs, checkpoints every
/// 3 steps, 2 loader threads.
fn train_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.arg("train")
        .arg("--config")
        .arg(recipe())
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(out);
    for s in [
        "train.epochs=2",
        "train.batch_size=8",
        "checkpoint.every_steps=3",
        "runtime.progress=false",
        "runtime.device=cpu",
        "data.workers=2",
    ]
    .iter()
    .chain(extra)
    {
        c.arg("--set").arg(s);
    }
    c
}

/// (step, loss bits) per metrics line: compared exactly, not within a tolerance.
fn losses(run: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
            )
        })
        .collect()
}

fn checkpoints(run: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn resumed_training_equals_uninterrupted_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shard_imagenet(tmp.path());

    let full = tmp.path().join("full");
    run_ok(&mut train_cmd(&data, &full, &[]));
    let reference = losses(&full);
    // rows / 8 steps per epoch (the partial batch is dropped; 39 bundled images: 4), 2 epochs.
    let steps_per_epoch = manifest_rows(&data) as usize / 8;
    assert!(
        steps_per_epoch >= 3,
        "the resume check needs more than 5 steps in all"
    );
    assert_eq!(reference.len(), 2 * steps_per_epoch, "{reference:?}");
    assert!(reference
        .iter()
        .all(|(_, l)| f64::from_bits(*l).is_finite()));

    // Stop after step 5 (mid-epoch 1), then resume in a new process.
    let split = tmp.path().join("split");
    run_ok(&mut train_cmd(&data, &split, &["train.max_steps=5"]));
    assert_eq!(losses(&split).len(), 5);
    run_ok(train_cmd(&data, &split, &[]).arg("--resume"));
    assert_eq!(losses(&split), reference);

    // The final checkpoints' weights are identical files' worth of tensors.
    let a = checkpoints(&full).pop().unwrap();
    let b = checkpoints(&split).pop().unwrap();
    assert_eq!(a.file_name(), b.file_name());
    let wa = std::fs::read(a.join("model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ between {a:?} and {b:?}");

    // The checkpoint describes its own architecture: export needs no flags, from the run folder.
    for what in ["encoder", "droppos"] {
        let onnx = tmp.path().join(format!("{what}.onnx"));
        run_ok(
            bin()
                .args(["export", "--what", what, "--checkpoint"])
                .arg(&full)
                .arg("--out")
                .arg(&onnx),
        );
        assert!(std::fs::metadata(&onnx).unwrap().len() > 1_000_000);
    }

    // A run folder with checkpoints is not overwritten without --resume.
    let out = train_cmd(&data, &full, &[]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--resume"), "{err}");

    // A wrong --data fails before the run folder is made.
    let nowhere = tmp.path().join("never-made");
    let out = train_cmd(&tmp.path().join("no-data"), &nowhere, &[])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!nowhere.exists());

    // A checkpoint whose step disagrees with its epoch and position (an edited state.json; a
    // step of u64::MAX wrapped to 0 and the run lost its newest checkpoints) is refused.
    let newest = checkpoints(&split).pop().unwrap().join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&newest).unwrap()).unwrap();
    state["step"] = u64::MAX.into();
    std::fs::write(&newest, serde_json::to_vec(&state).unwrap()).unwrap();
    let out = train_cmd(&data, &split, &["train.epochs=3"])
        .arg("--resume")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("position is inconsistent"), "{err}");
}

#[cfg(unix)]
#[test]
fn sigint_saves_a_checkpoint_and_resume_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shard_imagenet(tmp.path());
    let run = tmp.path().join("run");
    // Long enough that the signal lands mid-run.
    let mut child = train_cmd(
        &data,
        &run,
        &[
            "train.epochs=500",
            "checkpoint.every_steps=0",
            "checkpoint.every_epoch=false",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    common::signal_after_steps(&mut child, &run, 3, "INT");
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("interrupted at step"), "{stdout}");
    let saved = checkpoints(&run);
    assert_eq!(saved.len(), 1, "{saved:?}");
    let at = losses(&run).len() as u64;

    // Resume with a smaller budget: continues from the saved step.
    run_ok(
        train_cmd(
            &data,
            &run,
            &[
                "train.epochs=500",
                "checkpoint.every_steps=0",
                "checkpoint.every_epoch=false",
            ],
        )
        .args(["--resume", "--set", &format!("train.max_steps={}", at + 2)]),
    );
    let steps: Vec<u64> = losses(&run).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, (1..=at + 2).collect::<Vec<_>>());
}

#[test]
fn undecodable_samples_follow_the_recipes_on_error_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shard_imagenet(tmp.path());
    break_first_image(&data);
    let short = ["train.epochs=1", "train.max_steps=2"];

    // Default: skipped, logged with its shard, and training goes on.
    let run = tmp.path().join("skip");
    let out = train_cmd(&data, &run, &short).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("shard-000000.parquet"), "{err}");
    assert_eq!(losses(&run).len(), 2);
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let skipped: u64 = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["skipped_samples"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(skipped, 1, "{text}");

    // `fail`: the run stops with an error naming the shard and the policy.
    let run = tmp.path().join("fail");
    let mut set = short.to_vec();
    set.push("data.on_error=fail");
    let out = train_cmd(&data, &run, &set).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("shard-000000.parquet"), "{err}");
    assert!(err.contains("data.on_error"), "{err}");

    // Anything else is refused before training starts.
    let run = tmp.path().join("bad");
    let out = train_cmd(&data, &run, &["data.on_error=ignore"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("data.on_error"), "{err}");
}
