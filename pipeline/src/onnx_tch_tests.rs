//! Parity of every export kind with our tch forward on the same weights and inputs (max |Δ| ≤
//! 1e-4, fp32), in ort from Rust and in onnxruntime's Python API after onnx.checker; and the
//! `--random-init` baseline's weights.

use droppos_model::config::{AttentionImpl, DecoderConfig, DropPosConfig, VitConfig};
use droppos_model::onnx::{droppos_io, encoder_io, ExternalData, Opset};
use std::path::PathBuf;

use droppos_model::DropPos;
use tch::{Kind, Tensor};

use crate::commands::export::{self, ArchHints, What};
use crate::onnx_tests::{max_abs_diff, python_check, Case, TOL};
use crate::ort_runtime::{Input, OrtModel};

fn tiny_config() -> DropPosConfig {
    let encoder = VitConfig {
        img_size: 32,
        patch_size: 8,
        in_chans: 3,
        embed_dim: 48,
        depth: 2,
        num_heads: 3,
        mlp_ratio: 4.0,
        layer_norm_eps: 1e-6,
        attention: AttentionImpl::Explicit,
    };
    let decoder = DecoderConfig {
        embed_dim: 32,
        depth: 2,
        num_heads: 4,
    };
    let mut cfg = DropPosConfig::new(encoder, decoder);
    cfg.attn_guide = false;
    cfg
}

/// A seeded tiny model whose parameters are all perturbed (so LayerNorm 1/0 and zero biases do
/// not hide wiring mistakes); pos_embed stays the fixed sin-cos table.
fn tiny_model(seed: i64) -> (tch::nn::VarStore, DropPos, DropPosConfig) {
    let cfg = tiny_config();
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = DropPos::new(&vs.root(), &cfg).unwrap();
    tch::no_grad(|| {
        for (name, t) in model.named_parameters() {
            if name != "pos_embed" {
                let mut t = t;
                let noise = Tensor::randn_like(&t) * 0.05;
                let _ = t.f_add_(&noise).unwrap();
            }
        }
    });
    (vs, model, cfg)
}

fn hints(cfg: &DropPosConfig) -> ArchHints {
    export::hints_from_config(&serde_json::to_value(cfg).unwrap())
}

fn weights(model: &DropPos) -> droppos_model::onnx::Weights {
    let named = model.named_parameters();
    droppos_model::onnx::Weights::from_named_tensors(named.iter().map(|(n, t)| (n.clone(), t)))
        .unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.contiguous().view(-1)).unwrap()
}

#[test]
fn encoder_export_matches_tch_forward() {
    let (_vs, model, cfg) = tiny_model(1);
    let w = weights(&model);
    let images = Tensor::randn([3, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
    let (cls, patches) = tch::no_grad(|| model.encoder.forward_features(&images)).unwrap();
    let fmap = patches.transpose(1, 2).reshape([3, 48, 4, 4]);
    let dir = tempfile::tempdir().unwrap();
    let img = to_vec(&images);
    let shape = [3i64, 3, 32, 32];
    for opset in [Opset::V17, Opset::V20] {
        let m = export::build(&w, &hints(&cfg), What::Encoder, 32, opset).unwrap();
        let path = dir.path().join(format!("enc{}.onnx", opset.version()));
        droppos_model::onnx::write_model(m, &path, ExternalData::Auto).unwrap();
        let mut ort = OrtModel::load(&path, 1).unwrap();
        let names = [
            encoder_io::CLS,
            encoder_io::PATCH_TOKENS,
            encoder_io::FEATURE_MAP,
        ];
        let outs = ort
            .run(&[Input::f32("images", &shape, &img)], &names)
            .unwrap();
        let mut case = Case::default();
        case.input_f32(dir.path(), "images", &shape, &img);
        for ((name, o), t) in names.iter().zip(&outs).zip([&cls, &patches, &fmap]) {
            assert_eq!(o.shape, t.size(), "{name}");
            let want = to_vec(t);
            let d = max_abs_diff(&o.data, &want);
            eprintln!(
                "tch parity encoder opset {} {name}: max |Δ| {d:e}",
                opset.version()
            );
            assert!(d <= TOL, "{name}: {d}");
            case.expect(dir.path(), name, &o.shape, &want);
        }
        python_check(&path, &case.write(dir.path()));
    }
}

#[test]
fn droppos_export_matches_tch_forward() {
    let (_vs, model, cfg) = tiny_model(2);
    let w = weights(&model);
    let n = 4;
    let l = cfg.encoder.num_patches();
    let images = Tensor::randn([n, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
    let (np, npos) = model.sample_noise(n);
    let smooth = model.smoothing_map(1.0).unwrap();
    let out = tch::no_grad(|| model.forward_train(&images, &np, &npos, &smooth)).unwrap();
    let k = out.patch_mask.keep();
    let ids: Vec<i64> = Vec::try_from(out.patch_mask.ids_keep.contiguous().view(-1)).unwrap();
    let mask: Vec<f32> = to_vec(&out.pos_mask.mask.to_kind(Kind::Float));
    assert!(mask.iter().any(|&m| m > 0.5) && mask.iter().any(|&m| m < 0.5));
    let want = to_vec(&out.pos_logits);
    let dir = tempfile::tempdir().unwrap();
    let img = to_vec(&images);
    let ishape = [n, 3, 32, 32];
    for (opset, ext) in [
        (Opset::V17, ExternalData::Never),
        (Opset::V20, ExternalData::Always),
    ] {
        let m = export::build(&w, &hints(&cfg), What::Droppos, 32, opset).unwrap();
        let path = dir.path().join(format!("dp{}.onnx", opset.version()));
        droppos_model::onnx::write_model(m, &path, ext).unwrap();
        let mut ort = OrtModel::load(&path, 1).unwrap();
        let outs = ort
            .run(
                &[
                    Input::f32(droppos_io::IMAGES, &ishape, &img),
                    Input::i64(droppos_io::IDS_KEEP, &[n, k], &ids),
                    Input::f32(droppos_io::MASK_POS, &[n, k], &mask),
                ],
                &[droppos_io::LOGITS],
            )
            .unwrap();
        assert_eq!(outs[0].shape, vec![n, k, l]);
        let d = max_abs_diff(&outs[0].data, &want);
        eprintln!(
            "tch parity droppos opset {}: max |Δ| {d:e}",
            opset.version()
        );
        assert!(d <= TOL, "position logits: {d}");
        let mut case = Case::default();
        case.input_f32(dir.path(), droppos_io::IMAGES, &ishape, &img);
        case.input_i64(dir.path(), droppos_io::IDS_KEEP, &[n, k], &ids);
        case.input_f32(dir.path(), droppos_io::MASK_POS, &[n, k], &mask);
        case.expect(dir.path(), droppos_io::LOGITS, &[n, k, l], &want);
        python_check(&path, &case.write(dir.path()));
    }
}

/// A dynamic batch: the same export runs batches of 1 and 5; other image sizes are refused.
#[test]
fn batch_axis_is_dynamic_and_the_trained_size_is_enforced() {
    let (_vs, model, cfg) = tiny_model(3);
    let w = weights(&model);
    let dir = tempfile::tempdir().unwrap();
    let m = export::build(&w, &hints(&cfg), What::Encoder, 32, Opset::V17).unwrap();
    let path = dir.path().join("enc.onnx");
    droppos_model::onnx::write_model(m, &path, ExternalData::Auto).unwrap();
    let mut ort = OrtModel::load(&path, 1).unwrap();
    for n in [1i64, 5] {
        let images = Tensor::randn([n, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
        let outs = ort
            .run(
                &[Input::f32("images", &[n, 3, 32, 32], &to_vec(&images))],
                &[encoder_io::FEATURE_MAP],
            )
            .unwrap();
        assert_eq!(outs[0].shape, vec![n, 48, 4, 4]);
    }
    for what in [What::Encoder, What::Droppos] {
        assert!(export::build(&w, &hints(&cfg), what, 48, Opset::V17).is_err());
    }
}

/// `--random-init`: names, shapes and hints of the trainer's model. (Same seed -> same bytes is
/// checked across processes in tests/eval_cli.rs: libtorch's global generator is shared by the
/// tests running in parallel threads here, so exact values are not compared in-process.)
#[test]
fn random_init_is_complete() {
    let cfg = tiny_config();
    let (a, ha) = export::random_init(&cfg, 5).unwrap();
    assert_eq!(ha, hints(&cfg));
    assert_eq!((ha.num_heads, ha.decoder_num_heads), (Some(3), Some(4)));
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let m = DropPos::new(&vs.root(), &cfg).unwrap();
    let reference = weights(&m);
    assert_eq!(
        a.names().collect::<Vec<_>>(),
        reference.names().collect::<Vec<_>>()
    );
    for n in reference.names() {
        assert_eq!(
            a.get(n).unwrap().dims,
            reference.get(n).unwrap().dims,
            "{n}"
        );
    }
    // The fixed sin-cos table does not depend on the seed.
    assert_eq!(
        a.get("pos_embed").unwrap(),
        reference.get("pos_embed").unwrap()
    );
    for what in [What::Encoder, What::Droppos] {
        export::build(&a, &ha, what, 32, Opset::V17).unwrap();
    }
}

/// `export --random-init --checkpoint DIR`: the architecture from the checkpoint's
/// `droppos_config` metadata, fresh weights (not the checkpoint's).
#[test]
fn random_init_export_from_checkpoint_metadata() {
    let cfg = tiny_config();
    let dir = tempfile::tempdir().unwrap();
    let (_vs, trained, _) = tiny_model(9);
    let meta = std::collections::HashMap::from([(
        "droppos_config".to_string(),
        serde_json::to_string(&cfg).unwrap(),
    )]);
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    droppos_model::checkpoint::save(
        ckpt.join("model.safetensors"),
        &trained.named_parameters(),
        Some(meta),
    )
    .unwrap();
    let out = dir.path().join("random.onnx");
    let args = |checkpoint: PathBuf| export::Args {
        checkpoint: Some(checkpoint),
        random_init: true,
        config: None,
        seed: 4,
        what: What::Encoder,
        out: out.clone(),
        num_heads: None,
        decoder_num_heads: None,
        img_size: None,
        opset: 17,
        external_data: export::ExternalArg::Never,
    };
    export::run(args(ckpt.clone())).unwrap();
    let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
    let mut ort = OrtModel::load(&out, 1).unwrap();
    let got = ort
        .run(
            &[Input::f32("images", &[2, 3, 32, 32], &to_vec(&images))],
            &[encoder_io::CLS],
        )
        .unwrap();
    assert_eq!(got[0].shape, vec![2, 48]);
    // Not the checkpoint's weights.
    let (trained_cls, _) = tch::no_grad(|| trained.encoder.forward_features(&images)).unwrap();
    assert!(max_abs_diff(&got[0].data, &to_vec(&trained_cls)) > 1e-3);
    // A weights file without the config metadata is refused, naming the fix.
    let bare = dir.path().join("bare.safetensors");
    droppos_model::checkpoint::save(&bare, &trained.named_parameters(), None).unwrap();
    let err = export::run(args(bare)).unwrap_err();
    assert!(format!("{err:#}").contains("--config"), "{err:#}");
}
