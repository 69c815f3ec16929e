//! Helpers shared by the CLI tests: the binary, the sample data, success checks.

#![allow(dead_code)] // each test binary uses a subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

/// The bundled sample data, or the folder named by `DROPPOS_TEST_DATA`.
pub fn data_root() -> PathBuf {
    match std::env::var_os("DROPPOS_TEST_DATA") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data"),
    }
}

/// The binary under test, logging warnings only.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_droppos-pipeline"));
    c.env("DROPPOS_LOG", "warn");
    c
}

/// Runs `c` and fails the test with its output unless it succeeds.
pub fn run_ok(c: &mut Command) -> Output {
    let out = c.output().expect("spawn droppos-pipeline");
    assert!(
        out.status.success(),
        "{:?} failed:\nstdout: {}\nstderr: {}",
        c,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `droppos-pipeline shard <args> --quiet [flag path]... --out tmp/name`; returns the output.
pub fn shard(tmp: &Path, name: &str, args: &[&str], paths: &[(&str, PathBuf)]) -> PathBuf {
    let out = tmp.join(name);
    let mut c = bin();
    c.arg("shard").args(args).arg("--quiet");
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    run_ok(c.arg("--out").arg(&out));
    out
}

/// `num_rows` of a shard folder's manifest: tests derive counts from it so that they also run
/// on other data (`DROPPOS_TEST_DATA`).
pub fn manifest_rows(shards: &Path) -> u64 {
    let text = std::fs::read_to_string(shards.join("manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["num_rows"].as_u64().unwrap()
}

/// The sample ImageNet train and val folders as shards under `tmp` (`inet-train`, `inet-val`),
/// labelled by the synset_words.txt class list (val via val.txt).
pub fn shard_imagenet_sample(tmp: &Path) -> (PathBuf, PathBuf) {
    let d = data_root();
    let classes = ("--classes", d.join("imagenet/synset_words.txt"));
    let train = shard(
        tmp,
        "inet-train",
        &["imagenet"],
        &[("--root", d.join("imagenet/train")), classes.clone()],
    );
    let val = shard(
        tmp,
        "inet-val",
        &["imagenet"],
        &[
            ("--root", d.join("imagenet/val")),
            ("--list", d.join("imagenet/val.txt")),
            classes,
        ],
    );
    (train, val)
}

/// A copy of the shard folder `shards` at `dst` with its first image broken (see
/// [`break_first_image`]).
pub fn broken_copy(shards: &Path, dst: &Path) -> PathBuf {
    std::fs::create_dir(dst).unwrap();
    for e in std::fs::read_dir(shards).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
    break_first_image(dst);
    dst.to_path_buf()
}

/// Breaks the first JPEG of the first shard (its start-of-image marker; image bytes are stored
/// uncompressed) and re-hashes the shard in the manifest, so that the shard opens and only the
/// sample fails to decode.
pub fn break_first_image(shards: &Path) {
    let file = shards.join("shard-000000.parquet");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes
        .windows(3)
        .position(|w| w == [0xFF, 0xD8, 0xFF])
        .expect("a JPEG in the shard");
    bytes[at..at + 3].copy_from_slice(&[0, 0, 0]);
    std::fs::write(&file, &bytes).unwrap();
    let path = shards.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["shards"][0]["sha256"] = hex::encode(Sha256::digest(&bytes)).into();
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// Runs `c`, which must fail with `needle` in its error output.
#[allow(dead_code)] // not every test binary uses it
pub fn fails_with(c: &mut Command, needle: &str) {
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{c:?} should fail");
    assert!(
        err.contains(needle),
        "{c:?}: expected `{needle}` in:\n{err}"
    );
}

/// Waits until the run at `run` has written `steps` metrics lines (the training is under way),
/// then sends `signal` (`INT`, `TERM`) to `child`.
#[cfg(unix)]
#[allow(dead_code)] // not every test binary uses it
pub fn signal_after_steps(child: &mut std::process::Child, run: &Path, steps: usize, signal: &str) {
    let lines = || {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .map(|t| t.lines().filter(|l| l.ends_with('}')).count())
            .unwrap_or(0)
    };
    let t0 = std::time::Instant::now();
    while lines() < steps {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(300),
            "no training progress"
        );
        assert!(child.try_wait().unwrap().is_none(), "train exited early");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}
