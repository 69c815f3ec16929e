//! Data-parallel `train` on CPU (Gloo over loopback), through the binary:
//! - two ranks with batch B train like one process with batch 2B (same weights within float
//!   tolerance, same losses) and end with identical weights on both ranks;
//! - a distributed run resumes exactly;
//! - a killed rank makes the survivor exit with a clear error instead of hanging.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use droppos_model::checkpoint;

mod common;
use common::{bin, data_root, run_ok};

/// An ImageFolder of exactly `n` of the bundled ImageNet images, sharded. With n a multiple of
/// 2B both runs have the same number of steps per epoch (hence the same lr schedule); the
/// loader's strided rank partition makes step k's 2B samples the same in both.
fn shard_subset(tmp: &Path, n: usize) -> PathBuf {
    let src = data_root().join("imagenet/train");
    let dst = tmp.join("subset");
    let mut files: Vec<PathBuf> = Vec::new();
    let mut classes: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    classes.sort();
    for c in &classes {
        let mut f: Vec<_> = std::fs::read_dir(c)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        f.sort();
        files.extend(f);
    }
    assert!(files.len() >= n, "need {n} sample images");
    for f in files.iter().take(n) {
        let class = f.parent().unwrap().file_name().unwrap();
        std::fs::create_dir_all(dst.join(class)).unwrap();
        std::fs::copy(f, dst.join(class).join(f.file_name().unwrap())).unwrap();
    }
    let out = tmp.join("shards");
    run_ok(
        bin()
            .args(["shard", "imagenet", "--root"])
            .arg(&dst)
            .arg("--out")
            .arg(&out),
    );
    out
}

fn train_cmd(data: &Path, out: &Path, sets: &[&str]) -> Command {
    let mut c = bin();
    c.arg("train")
        .arg("--config")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-cpu.toml"))
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(out)
        .args(["--dist-timeout", "60"]);
    // The attention guide weights the loss by a batch-wide normalisation, which DDP (like the
    // reference) computes per rank; without it the loss is a per-sample mean and the
    // equivalence is exact up to float rounding.
    for s in [
        "train.epochs=4",
        "optim.warmup_epochs=1",
        "droppos.attn_guide=false",
        "checkpoint.every_steps=0",
        "runtime.progress=false",
        "runtime.device=cpu",
        "runtime.threads=1",
        "data.workers=1",
    ]
    .iter()
    .chain(sets)
    {
        c.arg("--set").arg(s);
    }
    c
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.ends_with('}'))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["loss"].as_f64().unwrap()
        })
        .collect()
}

fn final_weights(run: &Path) -> Vec<(String, tch::Tensor)> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    checkpoint::load(dirs.pop().unwrap().join("model.safetensors"))
        .unwrap()
        .0
}

#[test]
fn two_ranks_with_batch_b_train_like_one_process_with_batch_2b() {
    let tmp = tempfile::tempdir().unwrap();
    // 32 images, 2B = 8: four steps per epoch, two epochs.
    let data = shard_subset(tmp.path(), 32);

    let one = tmp.path().join("one");
    run_ok(&mut train_cmd(
        &data,
        &one,
        &["train.batch_size=8", "train.epochs=2"],
    ));
    let two = tmp.path().join("two");
    let out = run_ok(
        train_cmd(&data, &two, &["train.batch_size=4", "train.epochs=2"])
            .args(["--nproc-per-node", "2"]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("weights identical on all 2 ranks"),
        "{stdout}"
    );

    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!(l1.len(), 8);
    assert_eq!(l2.len(), 8);
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "losses {l1:?} vs {l2:?}");
    }
    let (w1, w2) = (final_weights(&one), final_weights(&two));
    assert_eq!(w1.len(), w2.len());
    // The key part of each qkv bias is excluded: softmax is invariant to it, so its true
    // gradient is exactly zero and what it gets is rounding noise, which Adam's normalisation
    // blows up to learning-rate size. Everything else must agree to float rounding.
    let mut worst = (0f64, String::new());
    for ((n1, t1), (n2, t2)) in w1.iter().zip(&w2) {
        assert_eq!(n1, n2);
        let parts: Vec<(tch::Tensor, tch::Tensor)> = if n1.ends_with("attn.qkv.bias") {
            let d = t1.size()[0] / 3;
            vec![
                (t1.narrow(0, 0, d), t2.narrow(0, 0, d)),
                (t1.narrow(0, 2 * d, d), t2.narrow(0, 2 * d, d)),
            ]
        } else {
            vec![(t1.shallow_clone(), t2.shallow_clone())]
        };
        for (a, b) in parts {
            let d = (a - b).abs().max().double_value(&[]);
            if d > worst.0 {
                worst = (d, n1.clone());
            }
        }
    }
    assert!(worst.0 < 1e-6, "max |Δw| = {} in {}", worst.0, worst.1);
    // The last step did move the weights (the comparison is not between frozen models).
    let earlier = std::fs::read_dir(one.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let (w_before, _) = checkpoint::load(earlier.join("model.safetensors")).unwrap();
    let moved = w_before.iter().zip(&w1).any(|((_, a), (_, b))| !a.equal(b));
    assert!(moved, "{earlier:?} equals the final weights");
}

#[test]
fn a_distributed_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shard_subset(tmp.path(), 16);
    let full = tmp.path().join("full");
    run_ok(train_cmd(&data, &full, &["train.batch_size=8"]).args(["--nproc-per-node", "2"]));
    let split = tmp.path().join("split");
    run_ok(
        train_cmd(&data, &split, &["train.batch_size=8", "train.max_steps=2"])
            .args(["--nproc-per-node", "2"]),
    );
    assert_eq!(losses(&split).len(), 2);
    run_ok(train_cmd(&data, &split, &["train.batch_size=8"]).args([
        "--nproc-per-node",
        "2",
        "--resume",
    ]));
    let (a, b) = (losses(&full), losses(&split));
    assert_eq!(a.len(), 4);
    assert_eq!(
        a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        "{a:?} vs {b:?}"
    );
    let (wa, wb) = (final_weights(&full), final_weights(&split));
    for ((n, x), (_, y)) in wa.iter().zip(&wb) {
        assert!(x.equal(y), "{n} differs after the distributed resume");
    }
}

#[test]
fn a_killed_rank_makes_the_survivor_exit_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shard_subset(tmp.path(), 16);
    let run = tmp.path().join("run");
    // Two ranks started the way torchrun starts them (its variables, rank 0 hosts the store).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let spawn = |rank: usize| {
        train_cmd(&data, &run, &["train.batch_size=8", "train.epochs=100000"])
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let survivor = spawn(0);
    let mut victim = spawn(1);
    let t0 = Instant::now();
    while losses(&run).len() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    victim.kill().unwrap();
    let _ = victim.wait();
    let killed_at = Instant::now();
    let out = survivor.wait_with_output().unwrap();
    let waited = killed_at.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the survivor must fail: {stderr}");
    // Well within the 60 s timeout: a dropped connection is noticed at once.
    assert!(waited < Duration::from_secs(90), "took {waited:?}");
    assert!(stderr.contains("rank 0/2"), "{stderr}");
    assert!(
        !stderr.contains("Exception raised from") && !stderr.contains("frame #"),
        "C++ stack trace leaked: {stderr}"
    );
}

/// SIGTERM to the `--nproc-per-node` launcher alone (as a job scheduler sends it) reaches every
/// rank: they save an `interrupted` checkpoint and the launcher exits 0, leaving no rank running.
#[cfg(unix)]
#[test]
fn sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = shard_subset(tmp.path(), 16);
    let run = tmp.path().join("run");
    let mut child = train_cmd(&data, &run, &["train.batch_size=4", "train.epochs=500"])
        .args(["--nproc-per-node", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::signal_after_steps(&mut child, &run, 3, "TERM");
    assert!(child.wait().unwrap().success());
    let mut reasons = Vec::new();
    for e in std::fs::read_dir(run.join("checkpoints")).unwrap() {
        let state = std::fs::read_to_string(e.unwrap().path().join("state.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&state).unwrap();
        reasons.push(v["reason"].as_str().unwrap().to_string());
    }
    assert!(reasons.iter().any(|r| r == "interrupted"), "{reasons:?}");
    // Both ranks have exited: nothing writes to the run folder any more.
    let n = losses(&run).len();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(losses(&run).len(), n);
}
