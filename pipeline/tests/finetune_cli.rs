//! `droppos-pipeline finetune` end to end: a tiny DropPos pre-training run, its encoder
//! fine-tuned as a classifier on the bundled ImageNet sample, exported with `export --what
//! classifier` (no flags: the config travels in the checkpoint) and scored with `eval classify`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;
use common::{bin, broken_copy, fails_with, manifest_rows, run_ok, shard_imagenet_sample};

fn recipe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-cpu.toml")
}

fn finetune(train: &Path, val: &Path, out: &Path, init: &Path, epochs: &str) -> Command {
    let mut c = bin();
    c.args(["finetune", "--quiet", "--threads", "2", "--batch-size", "8"])
        .args(["--warmup-epochs", "1", "--epochs", epochs])
        .arg("--data")
        .arg(train)
        .arg("--val")
        .arg(val)
        .arg("--init")
        .arg(init)
        .arg("--output")
        .arg(out);
    c
}

fn tensors(path: &Path) -> Vec<(String, tch::Tensor)> {
    let (mut t, _) = droppos_model::checkpoint::load(path).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn finetune_from_pretraining_then_export_and_classify() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (train, val) = shard_imagenet_sample(t);
    // A short pre-training run gives the encoder (and a config in its checkpoint metadata).
    let pre = t.join("pre");
    let mut c = bin();
    c.arg("train")
        .arg("--config")
        .arg(recipe())
        .arg("--data")
        .arg(&train)
        .arg("--output")
        .arg(&pre);
    for s in [
        "train.epochs=1",
        "train.batch_size=16",
        "runtime.progress=false",
        "runtime.device=cpu",
        "data.workers=2",
    ] {
        c.arg("--set").arg(s);
    }
    run_ok(&mut c);

    // 0 epochs: the saved classifier holds exactly the pre-trained encoder (decoder and `norm`
    // dropped), plus fc_norm and a head over the shards' 1000 classes.
    let zero = t.join("ft0");
    run_ok(&mut finetune(&train, &val, &zero, &pre, "0"));
    let ft = tensors(&zero.join("model.safetensors"));
    let latest = std::fs::read_dir(pre.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let pretrained = tensors(&latest.join("model.safetensors"));
    let names: Vec<&str> = ft.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"head.weight") && names.contains(&"fc_norm.weight"));
    assert!(!names
        .iter()
        .any(|n| n.starts_with("norm.") || n.starts_with("decoder")));
    let head = &ft.iter().find(|(n, _)| n == "head.weight").unwrap().1;
    assert_eq!(head.size()[0], 1000);
    for (name, w) in &ft {
        if let Some((_, p)) = pretrained.iter().find(|(n, _)| n == name) {
            assert!(w.equal(p), "{name} differs from the pre-trained weight");
        } else {
            assert!(
                name.starts_with("head.") || name.starts_with("fc_norm."),
                "{name}"
            );
        }
    }

    // 2 epochs: finite losses every step, a validation score per epoch, the summary line.
    let run = t.join("ft");
    let o = run_ok(&mut finetune(&train, &val, &run, &pre, "2"));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps = lines.iter().filter(|v| v.get("loss").is_some()).count();
    assert_eq!(steps as u64, summary["steps"].as_u64().unwrap());
    assert!(steps >= 2, "{metrics}");
    assert!(lines
        .iter()
        .filter_map(|v| v.get("loss"))
        .all(|l| l.as_f64().unwrap().is_finite()));
    assert!(lines
        .iter()
        .all(|v| (0.0..=1.0).contains(&v["acc1"].as_f64().unwrap())));
    let evals = std::fs::read_to_string(run.join("eval.jsonl")).unwrap();
    assert_eq!(
        evals.lines().filter(|l| l.contains("val_top1")).count(),
        2,
        "{evals}"
    );
    for l in evals.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["val_skipped_images"], 0, "{l}");
    }
    // The trainer's metrics format: `plot` draws the run.
    run_ok(bin().arg("plot").arg(&run));
    assert!(run.join("curves.png").is_file());

    // Split into two invocations (stop after epoch 1, then --resume): the same losses and
    // the same final weights, bit for bit, as the uninterrupted run.
    let split = t.join("ft-split");
    let o = run_ok(
        finetune(&train, &val, &split, &pre, "2")
            .arg("--stop-after-epochs")
            .arg("1"),
    );
    let stopped: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stopped["stopped_after_epoch"], 1);
    assert!(!split.join("model.safetensors").exists());
    // A fresh run into a folder with checkpoints is refused; --resume continues it.
    let o = finetune(&train, &val, &split, &pre, "2").output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    let o = finetune(&train, &val, &split, &pre, "3")
        .arg("--resume")
        .output()
        .unwrap();
    assert!(!o.status.success(), "other settings must be refused");
    run_ok(finetune(&train, &val, &split, &pre, "2").arg("--resume"));
    let losses = |dir: &Path| -> Vec<u64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["loss"].as_f64().unwrap().to_bits()
            })
            .collect()
    };
    assert_eq!(losses(&split), losses(&run));
    let (a, b) = (
        tensors(&run.join("model.safetensors")),
        tensors(&split.join("model.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs after resume");
    }
    let evals = std::fs::read_to_string(split.join("eval.jsonl")).unwrap();
    assert_eq!(evals.lines().count(), 2, "{evals}");

    // Export without flags (heads, size and pooling come from the checkpoint) and score.
    let onnx = t.join("cls.onnx");
    run_ok(
        bin()
            .args(["export", "--what", "classifier", "--checkpoint"])
            .arg(&run)
            .arg("--out")
            .arg(&onnx),
    );
    let o = run_ok(
        bin()
            .args(["eval", "classify", "--json", "--no-progress", "--model"])
            .arg(&onnx)
            .arg("--data")
            .arg(&val),
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["num_classes"], 1000);
    assert_eq!(r["images"], manifest_rows(&val));

    // An undecodable validation image is counted in eval.jsonl, not silently dropped.
    let broken_val = broken_copy(&val, &t.join("val-broken"));
    let one = t.join("ft-broken-val");
    run_ok(&mut finetune(&train, &broken_val, &one, &pre, "1"));
    let evals = std::fs::read_to_string(one.join("eval.jsonl")).unwrap();
    let v: Value = serde_json::from_str(evals.lines().last().unwrap()).unwrap();
    assert_eq!(v["val_skipped_images"], 1, "{evals}");
    assert_eq!(v["val_images"], manifest_rows(&val) - 1, "{evals}");

    // An existing model is not overwritten; the architecture must be known.
    fails_with(
        &mut finetune(&train, &val, &run, &pre, "1"),
        "already holds",
    );
    fails_with(
        bin()
            .args(["finetune", "--quiet", "--data"])
            .arg(&train)
            .arg("--output")
            .arg(t.join("x")),
        "--model",
    );

    // Settings no run can use are refused by name before anything is trained; so is an --init
    // file without encoder weights under the reference names (it trained from random weights).
    for (extra, needle) in [
        (&["--drop-path", "1.5"][..], "--drop-path must be in"),
        (&["--blr", "NaN"][..], "--blr must be"),
        (&["--min-lr", "nan"][..], "--min-lr must be"),
        (&["--smoothing", "2"][..], "--smoothing must be in"),
        (
            &["--num-classes", "0"][..],
            "--num-classes must be positive",
        ),
    ] {
        fails_with(
            finetune(&train, &val, &t.join("bad"), &pre, "1").args(extra),
            needle,
        );
    }
    let prefixed = t.join("prefixed.safetensors");
    let w = tch::Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu));
    tch::Tensor::write_safetensors(&[("encoder.blocks.0.norm1.weight", &w)], &prefixed).unwrap();
    fails_with(
        bin()
            .args(["finetune", "--quiet", "--model", "vit_tiny_patch16_64"])
            .arg("--data")
            .arg(&train)
            .arg("--init")
            .arg(&prefixed)
            .arg("--output")
            .arg(t.join("bad2")),
        "no encoder parameters",
    );
}
