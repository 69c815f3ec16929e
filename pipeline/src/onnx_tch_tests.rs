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

/// Adds N(0, 0.05²) noise to every parameter but the fixed pos_embed table.
fn perturb(params: Vec<(String, Tensor)>) {
    tch::no_grad(|| {
        for (name, mut t) in params {
            if name != "pos_embed" {
                let noise = Tensor::randn_like(&t) * 0.05;
                let _ = t.f_add_(&noise).unwrap();
            }
        }
    });
}

/// A seeded tiny model whose parameters are all perturbed (so LayerNorm 1/0 and zero biases do
/// not hide wiring mistakes); pos_embed stays the fixed sin-cos table.
fn tiny_model(seed: i64) -> (tch::nn::VarStore, DropPos, DropPosConfig) {
    tiny_model_from(seed, tiny_config())
}

fn tiny_model_from(seed: i64, cfg: DropPosConfig) -> (tch::nn::VarStore, DropPos, DropPosConfig) {
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = DropPos::new(&vs.root(), &cfg).unwrap();
    perturb(model.named_parameters());
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

/// The `cls` output of the encoder export at `path` for `images` (NCHW).
fn ort_cls(path: &std::path::Path, images: &Tensor) -> Vec<f32> {
    let mut ort = OrtModel::load(path, 1).unwrap();
    let mut got = ort
        .run(
            &[Input::f32("images", &images.size(), &to_vec(images))],
            &[encoder_io::CLS],
        )
        .unwrap();
    got.remove(0).data
}

#[test]
fn encoder_export_matches_tch_forward() {
    let _rng = crate::torch_rng_lock();
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
    let _rng = crate::torch_rng_lock();
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

/// A multi_task run's weights (the MAE decoder's `aux_decoder_*` and `mask_token` beside the
/// encoder and position decoder) export both kinds; the MAE branch is left out of both.
#[test]
fn multi_task_weights_export() {
    let _rng = crate::torch_rng_lock();
    let mut cfg = tiny_config();
    cfg.multi_task = true;
    let (_vs, model, cfg) = tiny_model_from(3, cfg);
    let w = weights(&model);
    assert!(w.contains("aux_decoder_embed.weight") && w.contains("mask_token"));
    let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
    let (cls, _) = tch::no_grad(|| model.encoder.forward_features(&images)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for what in [What::Encoder, What::Droppos] {
        let m = export::build(&w, &hints(&cfg), what, 32, Opset::V17).unwrap();
        let g = m.graph.as_ref().unwrap();
        assert!(g.initializer.iter().all(|t| !t
            .name
            .as_deref()
            .unwrap_or("")
            .starts_with("aux_decoder")));
        if what == What::Encoder {
            let path = dir.path().join("enc.onnx");
            droppos_model::onnx::write_model(m, &path, ExternalData::Never).unwrap();
            let d = max_abs_diff(&ort_cls(&path, &images), &to_vec(&cls));
            assert!(d <= TOL, "cls: {d}");
        }
    }
}

/// A dynamic batch: the same export runs batches of 1 and 5; the DropPos head refuses other
/// image sizes (the encoder's pos_embed is resampled instead, tested below).
#[test]
fn batch_axis_is_dynamic_and_the_trained_size_is_enforced() {
    let _rng = crate::torch_rng_lock();
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
    assert!(export::build(&w, &hints(&cfg), What::Droppos, 48, Opset::V17).is_err());
    assert!(export::build(&w, &hints(&cfg), What::Encoder, 48, Opset::V17).is_ok());
}

/// `--random-init`: names, shapes and hints of the trainer's model. (Same seed -> same bytes is
/// checked across processes in tests/eval_cli.rs: libtorch's global generator is shared by the
/// tests running in parallel threads here, so exact values are not compared in-process.)
#[test]
fn random_init_is_complete() {
    let _rng = crate::torch_rng_lock();
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
    let _rng = crate::torch_rng_lock();
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
        global_pool: None,
        num_classes: None,
        opset: 17,
        external_data: export::ExternalArg::Never,
    };
    export::run(args(ckpt.clone())).unwrap();
    let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
    let got = ort_cls(&out, &images);
    assert_eq!(got.len(), 2 * 48);
    // Not the checkpoint's weights.
    let (trained_cls, _) = tch::no_grad(|| trained.encoder.forward_features(&images)).unwrap();
    assert!(max_abs_diff(&got, &to_vec(&trained_cls)) > 1e-3);
    // A weights file without the config metadata is refused, naming the fix.
    let bare = dir.path().join("bare.safetensors");
    droppos_model::checkpoint::save(&bare, &trained.named_parameters(), None).unwrap();
    let err = export::run(args(bare)).unwrap_err();
    assert!(format!("{err:#}").contains("--config"), "{err:#}");
}

/// A seeded tiny classifier with every parameter perturbed (the head's 2e-5 init would make
/// all logits nearly equal).
fn tiny_classifier(
    seed: i64,
    cfg: &droppos_model::ClassifierConfig,
) -> (tch::nn::VarStore, droppos_model::VitClassifier) {
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = droppos_model::VitClassifier::new(&vs.root(), cfg).unwrap();
    perturb(model.named_parameters());
    (vs, model)
}

/// Exports a classifier of `w` to `path` and runs it in ort: (logits, their shape).
fn run_classifier(
    w: &droppos_model::onnx::Weights,
    h: &ArchHints,
    opset: Opset,
    path: &std::path::Path,
    shape: &[i64],
    img: &[f32],
) -> (Vec<f32>, Vec<i64>) {
    use droppos_model::onnx::classifier_io;
    let m = export::build(w, h, What::Classifier, shape[2], opset).unwrap();
    droppos_model::onnx::write_model(m, path, ExternalData::Auto).unwrap();
    let mut ort = OrtModel::load(path, 1).unwrap();
    let mut outs = ort
        .run(
            &[Input::f32(classifier_io::IMAGES, shape, img)],
            &[classifier_io::LOGITS],
        )
        .unwrap();
    let o = outs.remove(0);
    (o.data, o.shape)
}

#[test]
fn classifier_export_matches_tch_forward_for_both_pools() {
    let _rng = crate::torch_rng_lock();
    use droppos_model::onnx::classifier_io;
    use droppos_model::{ClassifierConfig, GlobalPool};
    let enc = tiny_config().encoder;
    let dir = tempfile::tempdir().unwrap();
    for (i, cfg) in [
        ClassifierConfig::finetune(enc.clone(), 7),
        ClassifierConfig::token(enc.clone(), 7),
    ]
    .into_iter()
    .enumerate()
    {
        let (_vs, model) = tiny_classifier(10 + i as i64, &cfg);
        let named = model.named_parameters();
        let w = droppos_model::onnx::Weights::from_named_tensors(
            named.iter().map(|(n, t)| (n.clone(), t)),
        )
        .unwrap();
        let images = Tensor::randn([3, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
        let want = to_vec(&tch::no_grad(|| model.forward(&images)).unwrap());
        let img = to_vec(&images);
        let shape = [3i64, 3, 32, 32];
        let h = ArchHints {
            num_heads: Some(enc.num_heads),
            ..Default::default()
        };
        for opset in [Opset::V17, Opset::V20] {
            // Pooling comes from the weights (fc_norm => avg), as timm decides.
            let path = dir.path().join(format!("cls{i}_{}.onnx", opset.version()));
            let (got, got_shape) = run_classifier(&w, &h, opset, &path, &shape, &img);
            assert_eq!(got_shape, vec![3, 7]);
            let d = max_abs_diff(&got, &want);
            eprintln!(
                "tch parity classifier {:?} opset {}: max |Δ| {d:e}",
                cfg.global_pool,
                opset.version()
            );
            assert!(d <= TOL, "{d}");
            let mut case = Case::default();
            case.input_f32(dir.path(), "images", &shape, &img);
            case.expect(dir.path(), classifier_io::LOGITS, &[3, 7], &want);
            python_check(&path, &case.write(dir.path()));
        }
        // Forcing the other pooling changes the logits (the option is honoured).
        let other = match cfg.global_pool {
            GlobalPool::Avg => GlobalPool::Token,
            GlobalPool::Token => GlobalPool::Avg,
        };
        let h2 = ArchHints {
            global_pool: Some(other),
            ..h.clone()
        };
        let path = dir.path().join(format!("cls{i}_other.onnx"));
        let (got, _) = run_classifier(&w, &h2, Opset::V17, &path, &shape, &img);
        assert!(max_abs_diff(&got, &want) > 1e-3);
    }
}

#[test]
fn classifier_needs_a_head_and_droppos_keeps_its_grid() {
    let _rng = crate::torch_rng_lock();
    let (_vs, model, cfg) = tiny_model(5);
    let w = weights(&model);
    let err = export::build(&w, &hints(&cfg), What::Classifier, 32, Opset::V17)
        .unwrap_err()
        .to_string();
    assert!(err.contains("head.weight"), "{err}");
    let err = export::build(&w, &hints(&cfg), What::Droppos, 48, Opset::V17)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--img-size 32"), "{err}");
}

/// Parameters a graph would leave out are refused by name, never dropped: a decoder position
/// embedding or q/k norm for `droppos`, half of a LayerNorm for `classifier`.
#[test]
fn parameters_a_graph_would_ignore_are_refused() {
    use droppos_model::onnx::{HostTensor, Weights};
    let _rng = crate::torch_rng_lock();
    let (_vs, model, cfg) = tiny_model(5);
    let w = weights(&model);
    let t = |dims: Vec<i64>| {
        let n = dims.iter().product::<i64>() as usize;
        HostTensor::new(dims, vec![0.5; n]).unwrap()
    };
    for (name, dims) in [
        ("decoder_pos_embed", vec![1, 17, 32]),
        ("decoder_blocks.0.attn.q_norm.weight", vec![8]),
    ] {
        let mut odd = w.clone();
        odd.insert(name, t(dims));
        let err = export::build(&odd, &hints(&cfg), What::Droppos, 32, Opset::V17)
            .unwrap_err()
            .to_string();
        assert!(err.contains(name), "{err}");
    }
    let mut with_head = w.clone();
    with_head.insert("head.weight", t(vec![10, 48]));
    with_head.insert("head.bias", t(vec![10]));
    assert!(export::build(&with_head, &hints(&cfg), What::Classifier, 32, Opset::V17).is_ok());
    for missing in ["norm.weight", "norm.bias"] {
        let mut half = Weights::new();
        for n in with_head.names().filter(|n| *n != missing) {
            half.insert(n, with_head.get(n).unwrap().clone());
        }
        let err = export::build(&half, &hints(&cfg), What::Classifier, 32, Opset::V17)
            .unwrap_err()
            .to_string();
        assert!(err.contains(missing), "{err}");
    }
}

/// `--img-size` other than the trained size: pos_embed resampled like MAE's
/// `interpolate_pos_embed`, checked against a tch model built at the new size with that table.
#[test]
fn encoder_export_at_another_size_resamples_pos_embed() {
    let _rng = crate::torch_rng_lock();
    let (_vs, model, cfg) = tiny_model(6);
    let w = weights(&model);
    let m = export::build(&w, &hints(&cfg), What::Encoder, 48, Opset::V17).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("enc48.onnx");
    droppos_model::onnx::write_model(m, &path, ExternalData::Auto).unwrap();

    let mut enc = cfg.encoder.clone();
    enc.img_size = 48;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let big = droppos_model::VisionTransformer::new(&vs.root(), &enc).unwrap();
    let src: Vec<(String, Tensor)> = model
        .encoder
        .named_parameters()
        .into_iter()
        .filter(|(n, _)| n != "pos_embed")
        .collect();
    let dst: Vec<(String, Tensor)> = big
        .named_parameters()
        .into_iter()
        .filter(|(n, _)| n != "pos_embed")
        .collect();
    droppos_model::checkpoint::load_into(&dst, &src, true, std::path::Path::new("mem")).unwrap();
    // The reference resampling, written with tch ops: [1, 16, D] -> [1, D, 4, 4] -> 6x6.
    let pe = model.encoder.pos_embed.shallow_clone();
    let d = cfg.encoder.embed_dim;
    let rows = pe
        .narrow(1, 1, 16)
        .reshape([1, 4, 4, d])
        .permute([0, 3, 1, 2])
        .upsample_bicubic2d([6, 6], false, None, None)
        .permute([0, 2, 3, 1])
        .reshape([1, 36, d]);
    tch::no_grad(|| {
        big.pos_embed
            .shallow_clone()
            .copy_(&Tensor::cat(&[pe.narrow(1, 0, 1), rows], 1))
    });
    let images = Tensor::randn([2, 3, 48, 48], (Kind::Float, tch::Device::Cpu));
    let (cls, _) = tch::no_grad(|| big.forward_features(&images)).unwrap();
    let diff = max_abs_diff(&ort_cls(&path, &images), &to_vec(&cls));
    eprintln!("resampled pos_embed encoder at 48px: max |Δ| {diff:e}");
    assert!(diff <= TOL, "{diff}");
}
