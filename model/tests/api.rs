//! Behaviour of the public API beyond the golden fixtures: presets, serde, both attention paths,
//! mask token types, the reference smoothing grid, checkpoints, a few optimisation steps.

use droppos_model::checkpoint;
use droppos_model::config::{
    AttentionImpl, DecoderConfig, DropPosConfig, GuidePrecision, MaskTokenType, SmoothGrid,
    VitConfig,
};
use droppos_model::optim::{AdamW, AdamWConfig};
use droppos_model::DropPos;
use tch::{nn::VarStore, Device, Kind, Tensor};

fn small_cfg() -> DropPosConfig {
    let mut enc = VitConfig::vit_tiny(8, 32);
    enc.embed_dim = 48;
    enc.depth = 2;
    let mut cfg = DropPosConfig::new(
        enc,
        DecoderConfig {
            embed_dim: 32,
            depth: 1,
            num_heads: 4,
        },
    );
    cfg.sigma = 1.0;
    cfg
}

fn model(cfg: &DropPosConfig, seed: i64) -> (VarStore, DropPos) {
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let m = DropPos::new(&vs.root(), cfg).unwrap();
    (vs, m)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn presets_and_serde() {
    let cfg = DropPosConfig::from_name("DropPos_mae_vit_base_patch16_dec512d2b").unwrap();
    assert_eq!(
        (
            cfg.encoder.embed_dim,
            cfg.encoder.depth,
            cfg.encoder.num_heads
        ),
        (768, 12, 12)
    );
    assert_eq!(cfg.encoder.num_patches(), 196);
    assert_eq!(cfg.decoder, DecoderConfig::dec512d2b());
    assert_eq!(cfg.keep_counts(), (49, 12));
    let l = DropPosConfig::from_name("droppos_vit_large_patch16_dec512d8b").unwrap();
    assert_eq!((l.encoder.embed_dim, l.decoder.depth), (1024, 8));
    let h = VitConfig::from_name("vit_huge_patch14_448").unwrap();
    assert_eq!((h.embed_dim, h.grid_size()), (1280, 32));
    assert!(VitConfig::from_name("vit_base_patch15").is_err());
    assert!(DropPosConfig::from_name("droppos_vit_base_patch16_dec256d1b").is_err());

    let mut cfg = small_cfg();
    cfg.mask_token_type = MaskTokenType::WrongPos;
    cfg.smooth_grid = SmoothGrid::Reference;
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(
        json.contains("\"wrong_pos\"") && json.contains("\"reference\""),
        "{json}"
    );
    let back: DropPosConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
    assert!(
        serde_json::from_str::<DropPosConfig>(&json.replace("\"sigma\"", "\"sigmaa\"")).is_err()
    );
}

#[test]
fn reference_smoothing_grid() {
    let mut cfg = DropPosConfig::from_name("droppos_vit_base_patch16_dec512d2b").unwrap();
    assert_eq!(cfg.smooth_side(), 14);
    cfg.smooth_grid = SmoothGrid::Reference;
    // (224 // 14)² = 256 positions on a 16-wide grid, like the reference engine.
    assert_eq!(cfg.smooth_side(), 16);
    // A grid side smaller than the model's is refused.
    let mut bad = small_cfg();
    bad.encoder.patch_size = 4; // G = 8, reference side 32 // 8 = 4
    bad.smooth_grid = SmoothGrid::Reference;
    assert!(bad.validate().is_err());
}

#[test]
fn fused_attention_matches_explicit() {
    tch::set_num_threads(1);
    let cfg = small_cfg();
    let (_vs, mut m) = model(&cfg, 3);
    let images = Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu));
    let (np, nq) = m.sample_noise(3);
    let smooth = m.smoothing_map(1.0).unwrap();
    let mut results = Vec::new();
    for attn in [AttentionImpl::Explicit, AttentionImpl::Fused] {
        m.set_attention(attn);
        let params = m.trainable_parameters();
        for (_, p) in &params {
            p.shallow_clone().zero_grad();
        }
        let out = m.forward_train(&images, &np, &nq, &smooth).unwrap();
        out.loss.backward();
        let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad().copy()).collect();
        results.push((out, grads));
    }
    let (e, ge) = &results[0];
    let (f, gf) = &results[1];
    assert!(max_diff(&e.loss, &f.loss) < 1e-5);
    assert!(max_diff(&e.pos_logits, &f.pos_logits) < 1e-5);
    assert!(max_diff(&e.latent, &f.latent) < 1e-5);
    assert!(
        max_diff(
            e.attn_weights.as_ref().unwrap(),
            f.attn_weights.as_ref().unwrap()
        ) < 1e-5
    );
    for (a, b) in ge.iter().zip(gf) {
        let scale = a.abs().max().double_value(&[]).max(1e-12);
        assert!(
            max_diff(a, b) <= 1e-4 * scale,
            "grad differs: {} (scale {scale})",
            max_diff(a, b)
        );
    }
}

#[test]
fn mask_token_types_and_multitask() {
    for (tt, multi) in [
        (MaskTokenType::Param, true),
        (MaskTokenType::Zeros, false),
        (MaskTokenType::WrongPos, true),
    ] {
        let mut cfg = small_cfg();
        cfg.mask_token_type = tt;
        cfg.multi_task = multi;
        cfg.pos_weight = 0.05;
        let (_vs, m) = model(&cfg, 1);
        let names: Vec<String> = m
            .trainable_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names.contains(&"mask_pos_token".to_string()),
            tt == MaskTokenType::Param
        );
        let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let (np, nq) = m.sample_noise(2);
        let out = m
            .forward_train(&images, &np, &nq, &m.smoothing_map(0.0).unwrap())
            .unwrap();
        assert_eq!(out.pos_logits.size(), [2, 4, 16]);
        assert_eq!(out.loss_mae.is_some(), multi);
        assert!(out.loss.double_value(&[]).is_finite());
        out.loss.backward();
    }
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = small_cfg();
    let (_vs, m) = model(&cfg, 0);
    let smooth = m.smoothing_map(1.0).unwrap();
    let good = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let (np, nq) = m.sample_noise(2);
    let wrong_img = Tensor::randn([2, 3, 16, 32], (Kind::Float, Device::Cpu));
    assert!(m.forward_train(&wrong_img, &np, &nq, &smooth).is_err());
    assert!(m.forward_train(&good, &nq, &np, &smooth).is_err());
    assert!(m
        .forward_train(&good, &np, &nq, &Tensor::eye(4, (Kind::Float, Device::Cpu)))
        .is_err());
    let mut bad = small_cfg();
    bad.encoder.num_heads = 5;
    let vs = VarStore::new(Device::Cpu);
    assert!(DropPos::new(&vs.root(), &bad).is_err());
}

#[test]
fn checkpoint_round_trip_and_prefix() {
    let cfg = small_cfg();
    let (_vs1, a) = model(&cfg, 1);
    let (_vs2, b) = model(&cfg, 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let meta = [("config".to_string(), serde_json::to_string(&cfg).unwrap())]
        .into_iter()
        .collect();
    checkpoint::save(&path, &a.named_parameters(), Some(meta)).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "temporary file left behind");
    let (report, meta) = checkpoint::load_params(&path, &b.named_parameters(), true).unwrap();
    assert_eq!(report, checkpoint::LoadReport::default());
    let back: DropPosConfig = serde_json::from_str(&meta["config"]).unwrap();
    assert_eq!(back, cfg);
    for ((n, x), (_, y)) in a.named_parameters().iter().zip(b.named_parameters().iter()) {
        assert!(x.equal(y), "{n} differs after load");
    }
    // A DDP state_dict (`module.` prefix) with an extra entry loads non-strictly.
    let mut ddp: Vec<(String, Tensor)> = a
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (format!("module.{n}"), t))
        .collect();
    ddp.push((
        "module.head.weight".into(),
        Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
    ));
    let path2 = dir.path().join("ddp.safetensors");
    checkpoint::save(&path2, &ddp, None).unwrap();
    assert!(checkpoint::load_params(&path2, &b.named_parameters(), true).is_err());
    let (report, _) = checkpoint::load_params(&path2, &b.named_parameters(), false).unwrap();
    assert_eq!(report.unexpected, vec!["head.weight".to_string()]);
    assert!(report.missing.is_empty());
}

#[test]
fn a_few_steps_reduce_the_loss() {
    tch::set_num_threads(1);
    let mut cfg = small_cfg();
    cfg.attn_guide = false;
    let (_vs, m) = model(&cfg, 5);
    let mut opt = AdamW::new(
        m.trainable_parameters(),
        AdamWConfig {
            lr: 1e-3,
            ..Default::default()
        },
    );
    let images = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let (np, nq) = m.sample_noise(4);
    let smooth = m.smoothing_map(0.0).unwrap();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let out = m.forward_train(&images, &np, &nq, &smooth).unwrap();
        opt.zero_grad();
        out.loss.backward();
        opt.clip_grad_per_param(5.0);
        opt.step();
        losses.push(out.loss.double_value(&[]));
    }
    assert!(losses[29] < 0.5 * losses[0], "{losses:?}");
    // Optimizer state round trip.
    let state = opt.state_tensors();
    let mut opt2 = AdamW::new(m.trainable_parameters(), AdamWConfig::default());
    opt2.load_state_tensors(&state).unwrap();
    assert_eq!(opt2.state_tensors().len(), state.len());
}

#[test]
fn bf16_guide_is_close_to_fp32_and_leaves_autocast_off() {
    let cfg = small_cfg();
    let (_vs, fp32) = model(&cfg, 3);
    let mut bcfg = cfg.clone();
    bcfg.guide_precision = GuidePrecision::Bf16;
    let (_vs2, bf16) = model(&bcfg, 3);
    // Same weights whatever other tests drew from libtorch's global generator meanwhile.
    tch::no_grad(|| {
        for ((na, a), (nb, b)) in fp32.named_parameters().iter().zip(bf16.named_parameters()) {
            assert_eq!(na, &nb);
            let mut b = b;
            b.copy_(a);
        }
    });
    tch::manual_seed(5);
    let images = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let a = fp32.attention_guide(&images).unwrap();
    let b = bf16.attention_guide(&images).unwrap();
    assert_eq!(b.kind(), Kind::Float);
    assert_eq!(a.size(), b.size());
    // Rows are softmax distributions over L = 16 patches: bf16 rounding moves them a little,
    // not a lot.
    let d = max_diff(&a, &b);
    assert!(
        d > 0.0,
        "bf16 pass computed exactly like fp32: autocast was not applied"
    );
    assert!(d < 0.05, "bf16 guide differs by {d}");
    let sums = b.sum_dim_intlist(-1, false, Kind::Float);
    assert!(max_diff(&sums, &sums.ones_like()) < 1e-5);
    // The autocast scope ended: a later fp32 guide is bit-identical to the first.
    assert!(fp32.attention_guide(&images).unwrap().equal(&a));
}

/// The fused multi-tensor AdamW and clipping (CUDA's default) follow the op-for-op path that
/// reproduces the reference: same parameters and moments up to rounding over several steps,
/// with both weight-decay groups, layer-wise lr scales, a parameter without a gradient and a
/// checkpoint round trip in between.
#[test]
fn fused_optimizer_matches_the_op_for_op_path() {
    let cfg = small_cfg();
    let (_va, a) = model(&cfg, 7);
    let (_vb, b) = model(&cfg, 7);
    let adamw = AdamWConfig {
        lr: 1e-2,
        ..AdamWConfig::default()
    };
    // Each side also holds a parameter that never gets a gradient.
    let with_unused = |m: &DropPos| {
        let mut p = m.trainable_parameters();
        p.push((
            "unused.weight".to_string(),
            Tensor::ones([3, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true),
        ));
        p
    };
    let scale = |n: &str| if n.starts_with("blocks.0.") { 0.5 } else { 1.0 };
    let make = |m: &DropPos, fused: bool| {
        let mut o = AdamW::new(with_unused(m), adamw);
        if fused {
            o.set_fused(true);
        }
        o.set_lr_scales(scale);
        o
    };
    let mut oa = make(&a, false);
    let mut ob = make(&b, true);
    assert!(!oa.is_fused(), "CPU default: the reference's path");
    let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let smooth = a.smoothing_map(1.0).unwrap();
    for step in 0..4 {
        if step == 2 {
            // Resume the fused optimizer from a checkpoint of its state.
            let state = ob.state_tensors();
            let params: Vec<(String, Tensor)> = ob
                .params()
                .into_iter()
                .zip(
                    state
                        .iter()
                        .step_by(2)
                        .map(|(n, _)| n["exp_avg.".len()..].to_string()),
                )
                .map(|(t, n)| (n, t))
                .collect();
            ob = AdamW::new(params, adamw);
            ob.set_fused(true);
            ob.set_lr_scales(scale);
            ob.load_state_tensors(&state).unwrap();
        }
        for (m, o) in [(&a, &mut oa), (&b, &mut ob)] {
            tch::manual_seed(100 + step);
            let (np, npos) = m.sample_noise(2);
            o.zero_grad();
            let out = m.forward_train(&images, &np, &npos, &smooth).unwrap();
            // Scaled up so that clipping at 0.5 bites.
            (out.loss * 50.0).backward();
        }
        // The very same gradients on both sides: only the optimizers differ (gradients that
        // are rounding noise, as the qkv key bias's, would otherwise differ in sign).
        tch::no_grad(|| {
            for (pa, pb) in oa.params().iter().zip(ob.params()) {
                if pa.grad().defined() {
                    pb.grad().copy_(&pa.grad());
                }
            }
        });
        let ca = oa.clip_grad_per_param(0.5);
        let cb = ob.clip_grad_per_param(0.5);
        let top = ca.norms.max().double_value(&[]);
        assert!(
            ca.coefs.min().double_value(&[]) < 1.0,
            "some gradient is clipped"
        );
        assert!(max_diff(&ca.norms, &cb.norms) <= 1e-5 * top);
        assert!(max_diff(&ca.coefs, &cb.coefs) < 1e-5);
        oa.step();
        ob.step();
        assert!(ob.is_fused(), "the fused path ran");
    }
    for ((name, pa), pb) in with_unused(&a)
        .iter()
        .zip(ob.params())
        .take(oa.params().len() - 1)
    {
        let d = max_diff(pa, &pb);
        // Measured: a few ulps (3e-8).
        assert!(d < 1e-6, "{name}: {d}");
    }
    let (sa, sb) = (oa.state_tensors(), ob.state_tensors());
    assert_eq!(sa.len(), sb.len());
    for ((name, ta), (nb, tb)) in sa.iter().zip(&sb) {
        assert_eq!(name, nb);
        let (ta, tb) = (ta.to_kind(Kind::Double), tb.to_kind(Kind::Double));
        if name == "step" {
            assert_eq!(max_diff(&ta, &tb), 0.0, "step counts");
            continue;
        }
        let scale = ta.abs().max().double_value(&[]).max(1e-12);
        let d = max_diff(&ta, &tb) / scale;
        assert!(d < 1e-6, "{name}: relative {d}");
    }
}
