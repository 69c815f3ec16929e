//! `droppos-pipeline shard|verify|stats` end to end on the bundled sample data.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{bin, data_root, fails_with, run_ok};

fn shard_all(tmp: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let d = data_root();
    let inet = tmp.join("imagenet");
    run_ok(
        bin()
            .args(["shard", "imagenet", "--quiet", "--shard-rows", "16"])
            .args([
                "--root".as_ref(),
                d.join("imagenet/train").as_os_str(),
                "--classes".as_ref(),
                d.join("imagenet/synset_words.txt").as_os_str(),
                "--out".as_ref(),
                inet.as_os_str(),
            ]),
    );
    let coco = tmp.join("coco");
    run_ok(
        bin().args(["shard", "coco", "--quiet"]).args([
            "--images".as_ref(),
            d.join("coco/val2017").as_os_str(),
            "--annotations".as_ref(),
            d.join("coco/annotations/instances_val2017.json")
                .as_os_str(),
            "--out".as_ref(),
            coco.as_os_str(),
        ]),
    );
    let ade = tmp.join("ade");
    run_ok(
        bin()
            .args(["shard", "ade20k", "--quiet", "--split", "validation"])
            .args([
                "--root".as_ref(),
                d.join("ade20k/ADEChallengeData2016").as_os_str(),
                "--out".as_ref(),
                ade.as_os_str(),
            ]),
    );
    (inet, coco, ade)
}

#[test]
fn shard_verify_stats_and_pyarrow_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (inet, coco, ade) = shard_all(tmp.path());
    for dir in [&inet, &coco, &ade] {
        let out = run_ok(bin().arg("verify").arg(dir).arg("--decode"));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok:"));
    }
    let out = run_ok(bin().arg("stats").arg(&inet).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dataset"], "imagenet");
    let per_class: u64 = v["rows_per_class"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(per_class, v["rows"].as_u64().unwrap());
    assert!(v["width"]["min"].as_f64().unwrap() >= 75.0);
    let out = run_ok(bin().arg("stats").arg(&coco));
    assert!(String::from_utf8_lossy(&out.stdout).contains("annotations:"));

    // COCO: images and annotations per category, against the annotation json itself.
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(data_root().join("coco/annotations/instances_val2017.json")).unwrap(),
    )
    .unwrap();
    let mut want: std::collections::BTreeMap<String, (std::collections::BTreeSet<i64>, u64)> =
        Default::default();
    for a in json["annotations"].as_array().unwrap() {
        let e = want.entry(a["category_id"].to_string()).or_default();
        e.0.insert(a["image_id"].as_i64().unwrap());
        e.1 += 1;
    }
    let out = run_ok(bin().arg("stats").arg(&coco).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: std::collections::BTreeMap<String, (u64, u64)> = v["rows_per_class"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                (
                    c["rows"].as_u64().unwrap(),
                    c["annotations"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    let want: std::collections::BTreeMap<String, (u64, u64)> = want
        .into_iter()
        .map(|(k, (imgs, n))| (k, (imgs.len() as u64, n)))
        .collect();
    assert_eq!(got, want);
    // ADE20K: rows and patch-layout cells per class present.
    let out = run_ok(bin().arg("stats").arg(&ade).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let classes = v["rows_per_class"].as_array().unwrap();
    assert!(!classes.is_empty());
    for c in classes {
        let rows = c["rows"].as_u64().unwrap();
        assert!(rows >= 1 && rows <= v["rows"].as_u64().unwrap(), "{c}");
        assert!(c["patches"].as_u64().unwrap() >= rows, "{c}");
        assert!(c["name"].is_string(), "{c}");
    }
    assert_eq!(classes[0]["name"], "wall");

    // Plain Parquet: pyarrow reads every row with no custom code.
    let python = std::env::var("DROPPOS_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import pyarrow, PIL"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pyarrow_readback.py");
            let o = Command::new(&python)
                .arg(script)
                .arg(data_root())
                .args([&inet, &coco, &ade])
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "pyarrow read-back failed:\n{}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            eprint!("{}", String::from_utf8_lossy(&o.stdout));
        }
        _ => eprintln!(
            "SKIPPED pyarrow read-back: no python with pyarrow and pillow at {python:?} \
             (set DROPPOS_PYTHON, e.g. by `source scripts/env.sh`)"
        ),
    }
}

#[test]
fn verify_names_the_bad_shard_and_exits_non_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let (inet, _, _) = shard_all(tmp.path());
    let f = inet.join("shard-000000.parquet");
    let mut b = std::fs::read(&f).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    std::fs::write(&f, &b).unwrap();
    let out = bin().arg("verify").arg(&inet).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shard-000000.parquet"), "{err}");
}

#[test]
fn killed_run_resumes_to_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data_root();
    let args = |out: &Path| {
        let mut c = bin();
        c.args([
            "shard",
            "imagenet",
            "--quiet",
            "--threads",
            "1",
            "--shard-rows",
            "4",
        ])
        .args(["--validate", "decode", "--zstd-level", "12"])
        .arg("--root")
        .arg(d.join("imagenet/train"))
        .arg("--out")
        .arg(out);
        c
    };
    let fresh = tmp.path().join("fresh");
    run_ok(&mut args(&fresh));
    let out = tmp.path().join("killed");
    let mut child = args(&out).spawn().unwrap();
    // Kill as soon as the first shard is journaled (or whenever the run gets that far).
    let t0 = std::time::Instant::now();
    loop {
        let journaled = std::fs::read_dir(out.join(".progress"))
            .map(|r| r.count())
            .unwrap_or(0);
        if journaled > 0 || t0.elapsed().as_secs() > 60 {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    let killed_early = !out.join("manifest.json").exists();
    eprintln!("killed before the manifest: {killed_early}");
    run_ok(&mut args(&out));
    let snap = |p: &Path| {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(p)
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
    };
    assert_eq!(snap(&out), snap(&fresh));
}

#[test]
fn fail_mode_exits_non_zero_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("train/n00000001");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("empty.JPEG"), b"").unwrap();
    let out = bin()
        .args([
            "shard",
            "imagenet",
            "--quiet",
            "--on-error",
            "fail",
            "--root",
        ])
        .arg(tmp.path().join("train"))
        .arg("--out")
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("empty.JPEG") && err.contains("empty file"),
        "{err}"
    );
}

#[test]
fn a_run_that_skips_every_input_says_so() {
    // COCO annotations against an empty image folder (a wrong --images): every image is
    // skipped while listing. Under the default skip policy that is still a successful run (the
    // manifest lists every skip), but the command warns that no rows were written.
    let tmp = tempfile::tempdir().unwrap();
    let d = data_root();
    let empty = tmp.path().join("images");
    std::fs::create_dir_all(&empty).unwrap();
    let out_dir = tmp.path().join("out");
    let out = bin()
        .args(["shard", "coco", "--quiet", "--images"])
        .arg(&empty)
        .arg("--annotations")
        .arg(d.join("coco/annotations/instances_val2017.json"))
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no rows were written"), "{err}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["num_rows"], 0);
    let skipped = manifest["skipped"].as_array().unwrap();
    assert!(!skipped.is_empty());

    // Under --on-error fail the same run stops before writing, naming the first missing image.
    let fail_dir = tmp.path().join("fail");
    let out = bin()
        .args(["shard", "coco", "--quiet", "--on-error", "fail", "--images"])
        .arg(&empty)
        .arg("--annotations")
        .arg(d.join("coco/annotations/instances_val2017.json"))
        .arg("--out")
        .arg(&fail_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let first = skipped[0]["path"].as_str().unwrap();
    assert!(
        err.contains(first) && err.contains("missing from the image folder"),
        "{err}"
    );
    assert!(!fail_dir.join("manifest.json").exists());
}

/// `bench jpeg-decode` on the sample photos: the resize path's own decoder handles the colour
/// JPEGs and gives TurboJPEG's planes for every one of them (where the CPU has what it needs).
#[test]
fn bench_jpeg_decode_reports_identical_planes() {
    let mut c = bin();
    c.args(["bench", "jpeg-decode", "--rounds", "1", "--images"])
        .arg(data_root().join("imagenet/train"));
    #[cfg(target_arch = "x86_64")]
    let fast_path = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("bmi2");
    #[cfg(not(target_arch = "x86_64"))]
    let fast_path = false;
    if !fast_path {
        let out = c.output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("AVX2 and BMI2"), "{err}");
        return;
    }
    let out = run_ok(&mut c);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let handled = report["baseline_handles"].as_u64().unwrap();
    assert_eq!(report["identical"].as_u64(), Some(handled), "{report}");
    assert!(
        handled > 0 && handled <= report["planar"].as_u64().unwrap(),
        "{report}"
    );
    assert!(report["baseline_ms_per_image"].as_f64().unwrap() > 0.0);
}

/// `bench sha256` runs in the data binary and reports all three rates; two streams are
/// interleaved exactly where the CPU has the SHA extensions.
#[test]
fn bench_sha256_reports_both_forms() {
    let mut c = bin();
    c.args(["bench", "sha256", "--mib", "1", "--rounds", "1"]);
    let out = run_ok(&mut c);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "sha2_crate_gb_per_s",
        "one_stream_gb_per_s",
        "two_streams_gb_per_s",
    ] {
        assert!(report[k].as_f64().unwrap() > 0.0, "{report}");
    }
    #[cfg(target_arch = "x86_64")]
    let sha = is_x86_feature_detected!("sha") && is_x86_feature_detected!("sse4.1");
    #[cfg(not(target_arch = "x86_64"))]
    let sha = false;
    assert_eq!(report["interleaved"].as_bool(), Some(sha), "{report}");
}

/// `bench store-floor` runs in the data binary over a folder's files, leaves no scratch file
/// behind, and its floor is the sum of its three parts.
#[test]
fn bench_store_floor_reports_the_sum_of_read_write_and_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = bin();
    c.args([
        "bench",
        "store-floor",
        "--rounds",
        "1",
        "--threads",
        "2",
        "--root",
    ])
    .arg(data_root().join("imagenet/train"))
    .arg("--out")
    .arg(tmp.path());
    let out = run_ok(&mut c);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = |k: &str| r[k].as_f64().unwrap();
    assert!(r["files"].as_u64().unwrap() > 0, "{r}");
    let sum = f("read_s") + f("write_s") + f("sha256_two_streams_s");
    assert!((f("floor_cpu_s") - sum).abs() < 1e-9, "{r}");
    assert!((f("floor_wall_s") - sum / 2.0).abs() < 1e-9, "{r}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "scratch file left"
    );
}

/// Thread counts far beyond any machine are refused by the parser (100,000 started that many
/// threads and hung), in the data commands and the torch binary's alike.
#[test]
fn absurd_thread_counts_are_refused() {
    let d = data_root();
    fails_with(
        bin()
            .args(["shard", "imagenet", "--threads", "100000", "--root"])
            .arg(d.join("imagenet/train"))
            .args(["--out", "/nonexistent/never-written"]),
        "at most 1024",
    );
    fails_with(
        bin().args([
            "eval",
            "knn",
            "--loader-threads",
            "100000",
            "--model",
            "m.onnx",
            "--train",
            "t",
        ]),
        "at most 1024",
    );
}
