//! Export parity tests: ONNX written by `droppos_model::onnx`, run in ONNX Runtime (from Rust and
//! from onnxruntime's Python API), against timm and against our tch modules.

use std::path::{Path, PathBuf};
use std::process::Command;

use droppos_model::onnx::{self, ExternalData, Opset, Weights};
use serde_json::{json, Value};

use crate::ort_runtime::{Input, OrtModel};

/// Parity tolerance (max |Δ|, fp32), from the issue.
pub const TOL: f32 = 1e-4;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `$DROPPOS_PYTHON` or `python3`, if it imports `modules`; otherwise why not.
pub fn python_with(modules: &[&str]) -> Result<String, String> {
    let py = std::env::var("DROPPOS_PYTHON").unwrap_or_else(|_| "python3".into());
    let code = format!("import {}", modules.join(", "));
    match Command::new(&py).args(["-c", &code]).output() {
        Ok(o) if o.status.success() => Ok(py),
        Ok(o) => Err(format!(
            "{py} cannot `{code}`: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Err(e) => Err(format!("cannot start {py}: {e}")),
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

pub fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn write_raw<T: Copy>(path: &Path, data: &[T], to_le: impl Fn(T) -> Vec<u8>) {
    let bytes: Vec<u8> = data.iter().flat_map(|&v| to_le(v)).collect();
    std::fs::write(path, bytes).unwrap();
}

/// A case for `tests/onnx/check_onnx.py`: raw tensors plus a description.
#[derive(Default)]
pub struct Case {
    inputs: serde_json::Map<String, Value>,
    expected: serde_json::Map<String, Value>,
}

impl Case {
    pub fn input_f32(&mut self, dir: &Path, name: &str, shape: &[i64], data: &[f32]) {
        let file = format!("in_{name}.bin");
        write_raw(&dir.join(&file), data, |v| v.to_le_bytes().to_vec());
        self.inputs.insert(
            name.into(),
            json!({"file": file, "shape": shape, "dtype": "float32"}),
        );
    }

    pub fn input_i64(&mut self, dir: &Path, name: &str, shape: &[i64], data: &[i64]) {
        let file = format!("in_{name}.bin");
        write_raw(&dir.join(&file), data, |v| v.to_le_bytes().to_vec());
        self.inputs.insert(
            name.into(),
            json!({"file": file, "shape": shape, "dtype": "int64"}),
        );
    }

    pub fn expect(&mut self, dir: &Path, name: &str, shape: &[i64], data: &[f32]) {
        let file = format!("exp_{name}.bin");
        write_raw(&dir.join(&file), data, |v| v.to_le_bytes().to_vec());
        self.expected
            .insert(name.into(), json!({"file": file, "shape": shape}));
    }

    pub fn write(&self, dir: &Path) -> PathBuf {
        let p = dir.join("case.json");
        let v = json!({"inputs": self.inputs, "expected": self.expected, "meta": {}});
        std::fs::write(&p, v.to_string()).unwrap();
        p
    }
}

/// Runs `onnx.checker` (full) and onnxruntime's Python API on `model` against `case`; panics on
/// failure, skips (printing why) without a suitable Python.
pub fn python_check(model: &Path, case: &Path) {
    let py = match python_with(&["onnx", "onnxruntime", "numpy"]) {
        Ok(py) => py,
        Err(why) => {
            eprintln!("SKIP python onnx.checker/onnxruntime check: {why}");
            return;
        }
    };
    let script = repo_root().join("tests/onnx/check_onnx.py");
    let out = Command::new(py)
        .arg(&script)
        .arg(model)
        .arg(case)
        .args(["--tol", &TOL.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("check_onnx.py {}: {stdout}", model.display());
    assert!(
        out.status.success(),
        "check_onnx.py failed for {}:\n{stdout}\n{}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `export` arguments for trained weights at the checkpoint's size, inline data.
pub fn export_args(
    checkpoint: &Path,
    what: crate::commands::export::What,
    out: &Path,
    num_heads: i64,
    opset: i64,
) -> crate::commands::export::Args {
    crate::commands::export::Args {
        checkpoint: Some(checkpoint.to_path_buf()),
        random_init: false,
        config: None,
        seed: 0,
        what,
        out: out.to_path_buf(),
        num_heads: Some(num_heads),
        decoder_num_heads: None,
        img_size: None,
        global_pool: None,
        num_classes: None,
        opset,
        external_data: crate::commands::export::ExternalArg::Never,
    }
}

fn opsets() -> [Opset; 2] {
    [Opset::V17, Opset::V20]
}

/// Runs `tests/onnx/timm_reference.py` into `d`; returns its case.json.
fn timm_case(py: &str, d: &Path, args: &[&str]) -> Value {
    let script = repo_root().join("tests/onnx/timm_reference.py");
    let out = Command::new(py)
        .arg(&script)
        .arg(d)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "timm_reference.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(d.join("case.json")).unwrap()).unwrap()
}

/// A tiny timm ViT saved with safetensors: our export (IR 10, opset 17 and 20, inline and
/// external data) must match timm's `forward_features` in ort from Rust and in Python.
#[test]
fn timm_vit_encoder_matches_timm() {
    let py = match python_with(&["torch", "timm", "safetensors", "numpy"]) {
        Ok(py) => py,
        Err(why) => {
            eprintln!("SKIP timm parity: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let case = timm_case(&py, d, &[]);
    let meta = &case["meta"];
    let (img, heads) = (
        meta["img"].as_i64().unwrap(),
        meta["heads"].as_i64().unwrap(),
    );
    let w = Weights::load_safetensors(&d.join("vit.safetensors")).unwrap();
    let spec = onnx::EncoderSpec::infer(&w, img, heads).unwrap();
    assert_eq!(spec.depth, meta["depth"].as_u64().unwrap() as usize);
    let images = read_f32(&d.join("images.bin"));
    let ishape: Vec<i64> =
        serde_json::from_value(case["inputs"]["images"]["shape"].clone()).unwrap();
    for (opset, ext) in [
        (Opset::V17, ExternalData::Never),
        (Opset::V20, ExternalData::Always),
    ] {
        let path = d.join(format!("enc_{}.onnx", opset.version()));
        if opset == Opset::V17 {
            // Through the command, heads from the command line (timm files carry no config).
            crate::commands::export::run(export_args(
                &d.join("vit.safetensors"),
                crate::commands::export::What::Encoder,
                &path,
                heads,
                17,
            ))
            .unwrap();
        } else {
            let model = onnx::encoder_model(&w, &spec, opset).unwrap();
            let written = onnx::write_model(model, &path, ext).unwrap();
            assert_eq!(written.data.is_some(), ext == ExternalData::Always);
        }
        let mut m = OrtModel::load(&path, 1).unwrap();
        let names = ["cls", "patch_tokens", "feature_map"];
        let outs = m
            .run(&[Input::f32("images", &ishape, &images)], &names)
            .unwrap();
        for (name, o) in names.iter().zip(&outs) {
            let exp = read_f32(&d.join(format!("{name}.bin")));
            let want: Vec<i64> =
                serde_json::from_value(case["expected"][name]["shape"].clone()).unwrap();
            assert_eq!(o.shape, want, "{name} shape");
            let diff = max_abs_diff(&o.data, &exp);
            eprintln!(
                "timm parity opset {} {name}: max |Δ| {diff:e}",
                opset.version()
            );
            assert!(diff <= TOL, "{name}: max |Δ| {diff} > {TOL}");
        }
        python_check(&path, &d.join("case.json"));
    }
}

/// Deterministic synthetic weights with reference names: a ViT (width d, patch p, `depth`
/// blocks) and, when `dec` = Some((width, depth)), the DropPos position decoder.
pub fn synthetic_weights(
    d: i64,
    p: i64,
    img: i64,
    depth: usize,
    dec: Option<(i64, usize)>,
) -> Weights {
    let mut w = Weights::new();
    let l = (img / p) * (img / p);
    let mut seed = 0u32;
    let mut add = |name: &str, dims: Vec<i64>| {
        let n: i64 = dims.iter().product();
        seed += 1;
        let data = (0..n)
            .map(|i| ((i as f32 + 1.0) * 0.37 + seed as f32 * 1.3).sin() * 0.2)
            .collect();
        w.insert(name, onnx::HostTensor::new(dims, data).unwrap());
    };
    let block = |add: &mut dyn FnMut(&str, Vec<i64>), prefix: &str, d: i64| {
        for n in ["norm1", "norm2"] {
            add(&format!("{prefix}.{n}.weight"), vec![d]);
            add(&format!("{prefix}.{n}.bias"), vec![d]);
        }
        for (n, o, i) in [
            ("attn.qkv", 3 * d, d),
            ("attn.proj", d, d),
            ("mlp.fc1", 4 * d, d),
            ("mlp.fc2", d, 4 * d),
        ] {
            add(&format!("{prefix}.{n}.weight"), vec![o, i]);
            add(&format!("{prefix}.{n}.bias"), vec![o]);
        }
    };
    add("patch_embed.proj.weight", vec![d, 3, p, p]);
    add("patch_embed.proj.bias", vec![d]);
    add("cls_token", vec![1, 1, d]);
    add("pos_embed", vec![1, 1 + l, d]);
    for i in 0..depth {
        block(&mut add, &format!("blocks.{i}"), d);
    }
    add("norm.weight", vec![d]);
    add("norm.bias", vec![d]);
    if let Some((dd, ddepth)) = dec {
        add("mask_pos_token", vec![1, 1, d]);
        add("decoder_embed.weight", vec![dd, d]);
        add("decoder_embed.bias", vec![dd]);
        for j in 0..ddepth {
            block(&mut add, &format!("decoder_blocks.{j}"), dd);
        }
        add("decoder_norm.weight", vec![dd]);
        add("decoder_norm.bias", vec![dd]);
        add("decoder_pred.weight", vec![l, dd]);
        add("decoder_pred.bias", vec![l]);
    }
    w
}

/// Graph-level checks that need no Python: the model proto's header fields.
#[test]
fn model_header_fields() {
    use prost::Message;
    let img = 8;
    let w = synthetic_weights(8, 4, img, 1, None);
    let spec = onnx::EncoderSpec::infer(&w, img, 2).unwrap();
    for opset in opsets() {
        let m = onnx::encoder_model(&w, &spec, opset).unwrap();
        let bytes = m.encode_to_vec();
        let back = onnx::proto::ModelProto::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.ir_version, Some(10));
        assert_eq!(back.opset_import[0].version, Some(opset.version()));
        let g = back.graph.unwrap();
        assert_eq!(g.name.as_deref(), Some("droppos_vit_encoder"));
        let ops: Vec<&str> = g.node.iter().filter_map(|n| n.op_type.as_deref()).collect();
        assert_eq!(ops.contains(&"Gelu"), opset == Opset::V20);
        assert_eq!(ops.contains(&"Erf"), opset == Opset::V17);
    }
    // Missing or mis-shaped parameters are errors, not panics.
    assert!(onnx::EncoderSpec::infer(&w, 10, 2).is_err());
    assert!(onnx::EncoderSpec::infer(&w, img, 3).is_err());
    let spec_big = onnx::EncoderSpec {
        img_size: 16,
        ..spec
    };
    assert!(matches!(
        onnx::encoder_model(&w, &spec_big, Opset::V17),
        Err(onnx::OnnxError::Shape { .. })
    ));
    let mut no_norm = Weights::new();
    for n in w.names().filter(|n| !n.starts_with("norm.")) {
        no_norm.insert(n, w.get(n).unwrap().clone());
    }
    assert!(matches!(
        onnx::encoder_model(&no_norm, &spec, Opset::V17),
        Err(onnx::OnnxError::MissingWeight(n)) if n == "norm.weight"
    ));
}

/// The DropPos graph's interface (names, dynamic batch and visible axes), dropped positions
/// really using mask_pos_token, and the same numbers from onnxruntime's Python API after
/// onnx.checker's full check. (Numerical parity with our tch forward is in onnx_tch_tests.)
#[test]
fn droppos_graph_interface_and_python_runtime() {
    use droppos_model::onnx::droppos_io;
    let (img, p) = (16i64, 4i64);
    let l = (img / p) * (img / p);
    let w = synthetic_weights(12, p, img, 2, Some((8, 1)));
    let spec = onnx::EncoderSpec::infer(&w, img, 3).unwrap();
    let dec = onnx::DecoderSpec::infer(&w, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dp.onnx");
    onnx::write_model(
        onnx::droppos_model(&w, &spec, &dec, Opset::V17).unwrap(),
        &path,
        ExternalData::Always,
    )
    .unwrap();
    let mut m = OrtModel::load(&path, 1).unwrap();
    assert_eq!(m.input_names(), vec!["images", "ids_keep", "mask_pos"]);
    assert_eq!(m.output_names(), vec!["position_logits"]);
    assert_eq!(m.input_shape("images"), Some(vec![-1, 3, img, img]));
    assert_eq!(m.output_shape("position_logits"), Some(vec![-1, -1, l]));
    let mut case = Case::default();
    for (n, k) in [(2i64, 5i64), (1, 16)] {
        let images: Vec<f32> = (0..n * 3 * img * img)
            .map(|i| (i as f32 * 0.013).cos())
            .collect();
        let ids: Vec<i64> = (0..n * k).map(|i| (i * 7 + 3) % l).collect();
        let run = |m: &mut OrtModel, mask: &[f32]| {
            m.run(
                &[
                    Input::f32(droppos_io::IMAGES, &[n, 3, img, img], &images),
                    Input::i64(droppos_io::IDS_KEEP, &[n, k], &ids),
                    Input::f32(droppos_io::MASK_POS, &[n, k], mask),
                ],
                &[droppos_io::LOGITS],
            )
            .unwrap()
            .remove(0)
        };
        let none = vec![0f32; (n * k) as usize];
        let some: Vec<f32> = (0..n * k).map(|i| (i % 2) as f32).collect();
        let a = run(&mut m, &none);
        let b = run(&mut m, &some);
        assert_eq!(a.shape, vec![n, k, l]);
        assert!(a.data.iter().all(|v| v.is_finite()));
        assert!(
            max_abs_diff(&a.data, &b.data) > 1e-3,
            "dropping positions changed nothing"
        );
        if n == 2 {
            case.input_f32(dir.path(), droppos_io::IMAGES, &[n, 3, img, img], &images);
            case.input_i64(dir.path(), droppos_io::IDS_KEEP, &[n, k], &ids);
            case.input_f32(dir.path(), droppos_io::MASK_POS, &[n, k], &some);
            case.expect(dir.path(), droppos_io::LOGITS, &b.shape, &b.data);
        }
    }
    python_check(&path, &case.write(dir.path()));
}

/// `export` from a timm-named safetensors checkpoint, heads from the config metadata or the
/// command line; errors name what is missing.
#[test]
fn export_command_reads_checkpoints() {
    use crate::commands::export::{self, ArchHints, What};
    let dir = tempfile::tempdir().unwrap();
    let w = synthetic_weights(12, 4, 16, 1, Some((8, 1)));
    // A safetensors checkpoint with a DropPos config in its metadata (as the trainer writes).
    let named: Vec<(String, tch::Tensor)> = w
        .names()
        .map(|n| {
            let t = w.get(n).unwrap();
            (
                format!("module.{n}"),
                tch::Tensor::from_slice(&t.data).reshape(t.dims.as_slice()),
            )
        })
        .collect();
    let ckpt = dir.path().join("ckpt.safetensors");
    tch::Tensor::write_safetensors(&named, &ckpt).unwrap();
    let (w2, hints) = export::load_checkpoint(&ckpt).unwrap();
    assert_eq!(w2.get("cls_token").unwrap(), w.get("cls_token").unwrap());
    assert_eq!(hints, ArchHints::default());
    assert_eq!(export::trained_img_size(&w2).unwrap(), 16);
    let cfg = json!({"encoder": {"img_size": 16, "num_heads": 3}, "decoder": {"num_heads": 2}, "mask_token_type": "zeros"});
    let hints = export::hints_from_config(&cfg);
    assert_eq!(hints.num_heads, Some(3));
    assert_eq!(hints.decoder_num_heads, Some(2));
    // The reference's flat config (`decoder_num_heads` beside `num_heads`).
    let flat = export::hints_from_config(&json!({"num_heads": 3, "decoder_num_heads": 2}));
    assert_eq!((flat.num_heads, flat.decoder_num_heads), (Some(3), Some(2)));
    let err = export::build(&w2, &ArchHints::default(), What::Encoder, 16, Opset::V17).unwrap_err();
    assert!(err.to_string().contains("--num-heads"), "{err}");
    let err = export::build(&w2, &hints, What::Droppos, 32, Opset::V17).unwrap_err();
    assert!(err.to_string().contains("16px"), "{err}");
    let wrong = ArchHints {
        mask_token_type: Some("wrong_pos".into()),
        ..hints.clone()
    };
    assert!(export::build(&w2, &wrong, What::Droppos, 16, Opset::V17).is_err());
    // Zero mask tokens: the exported token is zeros.
    let m = export::build(&w2, &hints, What::Droppos, 16, Opset::V17).unwrap();
    let g = m.graph.unwrap();
    let tok = g
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some("mask_pos_token"))
        .unwrap();
    assert!(tok.raw_data.as_ref().unwrap().iter().all(|&b| b == 0));
    // Through the command itself.
    let out = dir.path().join("sub/enc.onnx");
    export::run(export_args(&ckpt, What::Encoder, &out, 3, 20)).unwrap();
    assert!(out.is_file());
    assert!(!dir.path().join("sub/enc.onnx.data").exists());
    // A checkpoint holding a NaN is refused, naming the tensor.
    let mut named = named;
    named[0].1 = named[0].1.fill(f64::NAN);
    let bad = dir.path().join("nan.safetensors");
    tch::Tensor::write_safetensors(&named, &bad).unwrap();
    let err = export::load_checkpoint(&bad).map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("non-finite"), "{err}");
}

/// timm classifiers (class-token pooling after `norm`; mean pooling + `fc_norm` without `norm`)
/// saved with safetensors: `export --what classifier` must match timm's logits, pooling taken
/// from the weights as timm decides it.
#[test]
fn timm_classifier_matches_timm() {
    let py = match python_with(&["torch", "timm", "safetensors", "numpy"]) {
        Ok(py) => py,
        Err(why) => {
            eprintln!("SKIP timm classifier parity: {why}");
            return;
        }
    };
    for pool in ["token", "avg"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let case = timm_case(&py, d, &["--classes", "11", "--pool", pool, "--seed", "3"]);
        assert_eq!(case["expected"]["logits"]["shape"][1], 11);
        export_matches_case(d, &case, crate::commands::export::What::Classifier);
    }
}

/// Exports `vit.safetensors` in `d` as `what` through the command and compares every expected
/// output of the case with ort's.
fn export_matches_case(d: &Path, case: &Value, what: crate::commands::export::What) {
    let heads = case["meta"]["heads"].as_i64().unwrap();
    let path = d.join("model.onnx");
    crate::commands::export::run(export_args(
        &d.join("vit.safetensors"),
        what,
        &path,
        heads,
        17,
    ))
    .unwrap();
    let images = read_f32(&d.join("images.bin"));
    let ishape: Vec<i64> =
        serde_json::from_value(case["inputs"]["images"]["shape"].clone()).unwrap();
    let names: Vec<&str> = case["expected"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut m = OrtModel::load(&path, 1).unwrap();
    let outs = m
        .run(&[Input::f32("images", &ishape, &images)], &names)
        .unwrap();
    for (name, o) in names.iter().zip(&outs) {
        let diff = max_abs_diff(&o.data, &read_f32(&d.join(format!("{name}.bin"))));
        eprintln!("timm variant {:?} {name}: max |Δ| {diff:e}", case["meta"]);
        assert!(diff <= TOL, "{name}: max |Δ| {diff} > {TOL}");
    }
    python_check(&path, &d.join("case.json"));
}

/// timm ViT variants our graphs implement (mean pooling with fc_norm and no final norm; no qkv
/// bias; LayerScale; other patch sizes, widths, head counts, depths and mlp ratios) match timm,
/// and one they do not (register tokens) is refused by name.
#[test]
fn timm_variants_match_timm_or_are_refused() {
    use crate::commands::export::What;
    let py = match python_with(&["torch", "timm", "safetensors", "numpy"]) {
        Ok(py) => py,
        Err(why) => {
            eprintln!("SKIP timm variants: {why}");
            return;
        }
    };
    for (args, what) in [
        (&["--pool", "avg"][..], What::Encoder),
        (
            &[
                "--img",
                "56",
                "--patch",
                "14",
                "--dim",
                "36",
                "--heads",
                "6",
                "--depth",
                "3",
                "--mlp-ratio",
                "2.5",
            ][..],
            What::Encoder,
        ),
        (
            &[
                "--img",
                "64",
                "--patch",
                "16",
                "--dim",
                "64",
                "--heads",
                "4",
                "--mlp-ratio",
                "3",
                "--batch",
                "1",
            ][..],
            What::Encoder,
        ),
        (
            &["--no-qkv-bias", "--init-values", "0.1"][..],
            What::Encoder,
        ),
        (
            &[
                "--classes",
                "5",
                "--pool",
                "avg",
                "--no-qkv-bias",
                "--init-values",
                "0.1",
            ][..],
            What::Classifier,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let case = timm_case(&py, dir.path(), args);
        export_matches_case(dir.path(), &case, what);
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    timm_case(&py, d, &["--reg-tokens", "1"]);
    let err = crate::commands::export::run(export_args(
        &d.join("vit.safetensors"),
        What::Encoder,
        &d.join("x.onnx"),
        3,
        17,
    ))
    .unwrap_err();
    assert!(format!("{err:#}").contains("reg_token"), "{err:#}");
}

/// Checkpoints without a config: standard timm widths get their standard head count (the same
/// graph as with the count given), other widths still need --num-heads.
#[test]
fn head_count_defaults_for_standard_widths() {
    use crate::commands::export::{self, ArchHints, What};
    let w = synthetic_weights(192, 16, 32, 1, Some((512, 1)));
    let given = ArchHints {
        num_heads: Some(3),
        decoder_num_heads: Some(16),
        ..Default::default()
    };
    for what in [What::Encoder, What::Droppos] {
        let a = export::build(&w, &ArchHints::default(), what, 32, Opset::V17).unwrap();
        let b = export::build(&w, &given, what, 32, Opset::V17).unwrap();
        assert_eq!(a, b, "{what:?}");
    }
    let odd = synthetic_weights(48, 8, 16, 1, None);
    let err = export::build(&odd, &ArchHints::default(), What::Encoder, 16, Opset::V17)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--num-heads") && err.contains("48"), "{err}");
}

/// A timm model without a class-token row in `pos_embed` (`class_token=False` or
/// `no_embed_class=True`) is refused with an error that says so.
#[test]
fn pos_embed_without_class_row_is_refused_by_name() {
    use crate::commands::export;
    let mut w = synthetic_weights(48, 8, 32, 1, None);
    let pe = w.get("pos_embed").unwrap();
    let d = pe.dims[2] as usize;
    let rows = pe.data[d..].to_vec();
    w.insert(
        "pos_embed",
        onnx::HostTensor::new(vec![1, 16, d as i64], rows).unwrap(),
    );
    let err = export::trained_img_size(&w).unwrap_err().to_string();
    assert!(
        err.contains("class-token row") && err.contains("no_embed_class"),
        "{err}"
    );
}

/// Blocks that disagree (an optional qkv bias or LayerScale in some blocks only, a missing
/// block) are refused: each block is built from its own weights, so an incomplete state dict
/// would export with some blocks silently different (max |Δ| 0.09 against the full model).
#[test]
fn incomplete_blocks_are_refused() {
    let full = synthetic_weights(48, 8, 32, 3, Some((32, 2)));
    let without = |drop: &dyn Fn(&str) -> bool| {
        let mut w = Weights::new();
        for n in full.names().filter(|n| !drop(n)) {
            w.insert(n, full.get(n).unwrap().clone());
        }
        w
    };
    onnx::check_supported(&full).unwrap();
    let w = without(&|n| n == "blocks.1.attn.qkv.bias");
    let err = onnx::check_supported(&w).unwrap_err().to_string();
    assert!(
        err.contains("attn.qkv.bias") && err.contains("2 of the 3 blocks") && err.contains("1"),
        "{err}"
    );
    let mut w = full.clone();
    w.insert(
        "blocks.0.ls2.gamma",
        onnx::HostTensor::new(vec![48], vec![0.5; 48]).unwrap(),
    );
    let err = onnx::check_supported(&w).unwrap_err().to_string();
    assert!(
        err.contains("ls2.gamma") && err.contains("1 of the 3"),
        "{err}"
    );
    let w = without(&|n| n.starts_with("blocks.1."));
    let err = onnx::check_supported(&w).unwrap_err().to_string();
    assert!(
        err.contains("blocks.2.") && err.contains("a block is missing"),
        "{err}"
    );
    let w = without(&|n| n == "decoder_blocks.1.attn.qkv.bias");
    let err = onnx::DecoderSpec::infer(&w, 4).unwrap_err().to_string();
    assert!(err.contains("decoder_blocks 1"), "{err}");
}
