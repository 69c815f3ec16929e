//! `droppos-pipeline bench loader --keys-out`: the batch order from the command line, checked for
//! determinism, disjoint and complete rank slices, and resumption.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

mod common;
use common::{bin, data_root, run_ok, shard};

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
    let shards = shard(
        tmp.path(),
        "inet",
        &["imagenet"],
        &[("--root", data_root().join("imagenet/train"))],
    );
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
