//! `droppos-pipeline doctor --json`: machine-readable and honest about versions.

mod common;
use common::{bin, run_ok};

fn is_release(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() >= 3 && parts[..3].iter().all(|p| p.parse::<u32>().is_ok())
}

#[test]
fn doctor_reports_library_versions_as_releases() {
    let out = run_ok(bin().args(["doctor", "--json"]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor --json is JSON");
    let torch = v["libtorch_version"].as_str().unwrap();
    assert!(torch.starts_with("2.11."), "libtorch {torch}");
    assert!(v["libtorch_cuda_linked"].is_boolean());
    // ONNX Runtime is optional at run time; when it is found its version is a release number
    // read from the library (not the wheel's git branch, e.g. "HEAD").
    if let Some(ok) = v["onnxruntime"].get("Ok") {
        let ver = ok["version"].as_str().unwrap();
        assert!(is_release(ver), "onnxruntime version {ver:?}");
    } else {
        assert!(v["onnxruntime"]["Err"].is_string());
    }
}
