//! `droppos-pipeline bench onnx`: encoder inference speed on the CPU, ONNX Runtime running our
//! export vs our tch forward of the very same weights and batch (a seeded random init: speed
//! does not depend on the values). Also reports export time, file size and max |Δ| of `cls`.

use std::time::Instant;

use anyhow::{Context, Result};
use droppos_model::onnx::{self, encoder_io, ExternalData, Opset, Weights};
use droppos_model::{AttentionImpl, VisionTransformer, VitConfig};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::bench_train_step::Attention;
use crate::ort_runtime::{self, Input, OrtModel};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Encoder preset: vit_{tiny,small,base,large,huge}_patch{14,16,32}[_{img}].
    #[arg(long, default_value = "vit_small_patch16_224")]
    pub model: String,
    #[arg(long, default_value_t = 32)]
    pub batch: i64,
    /// Threads for both engines (ONNX Runtime intra-op, libtorch intra-op).
    #[arg(long, default_value_t = 2, value_parser = crate::cli::thread_count)]
    pub threads: usize,
    /// Timed batches per engine (the median is reported), after one warm-up batch.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value_t = 17)]
    pub opset: i64,
    /// tch attention implementation.
    #[arg(long, value_enum, default_value = "fused")]
    pub attention: Attention,
    /// Keep the exported model here (default: a temporary folder).
    #[arg(long)]
    pub onnx_out: Option<std::path::PathBuf>,
    /// Also save the benchmarked weights (timm names, safetensors) here, for
    /// `scripts/bench_onnx_encoder.py` (ort vs PyTorch eager timm on the same weights).
    #[arg(long)]
    pub weights_out: Option<std::path::PathBuf>,
    /// Skip the tch side.
    #[arg(long)]
    pub no_tch: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn run(a: Args) -> Result<()> {
    let mut cfg = VitConfig::from_name(&a.model)?;
    cfg.attention = match a.attention {
        Attention::Fused => AttentionImpl::Fused,
        Attention::Explicit => AttentionImpl::Explicit,
    };
    tch::set_num_threads(a.threads as i32);
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let vit = VisionTransformer::new(&vs.root(), &cfg)?;
    let named = vit.named_parameters();
    let weights = Weights::from_named_tensors(named.iter().map(|(n, t)| (n.clone(), t)))?;
    if let Some(out) = &a.weights_out {
        Tensor::write_safetensors(&named, out)
            .with_context(|| format!("writing {}", out.display()))?;
    }

    let tmp = std::env::temp_dir().join(format!("droppos-bench-onnx-{}.onnx", std::process::id()));
    let path = a.onnx_out.clone().unwrap_or_else(|| tmp.clone());
    let t0 = Instant::now();
    let spec = onnx::EncoderSpec::infer(&weights, cfg.img_size, cfg.num_heads)?;
    let model = onnx::encoder_model(&weights, &spec, Opset::from_version(a.opset)?)?;
    let written = onnx::write_model(model, &path, ExternalData::Auto)?;
    let export_s = t0.elapsed().as_secs_f64();

    let (n, img) = (a.batch, cfg.img_size);
    let images = Tensor::randn([n, 3, img, img], (Kind::Float, Device::Cpu));
    let data = Vec::<f32>::try_from(images.contiguous().view(-1))?;
    let shape = [n, 3, img, img];

    ort_runtime::init()?;
    let t0 = Instant::now();
    let mut ort = OrtModel::load(&path, a.threads)?;
    let load_s = t0.elapsed().as_secs_f64();
    let input = [Input::f32(encoder_io::IMAGES, &shape, &data)];
    // The first run of each engine is its warm-up (and gives the outputs compared below).
    let ort_cls = ort.run(&input, &[encoder_io::CLS])?.remove(0);
    let fwd = || tch::no_grad(|| vit.forward_features(&images));
    let diff = if a.no_tch {
        None
    } else {
        let tch_cls = Vec::<f32>::try_from(fwd()?.0.contiguous().view(-1))?;
        let d = ort_cls
            .data
            .iter()
            .zip(&tch_cls)
            .map(|(x, y)| (x - y).abs());
        Some(d.fold(0f32, f32::max))
    };
    // With tch, the engines alternate batch by batch, so that the VM's drift hits both alike; a
    // pause before each batch lets the other engine's spinning worker threads park.
    let pause = || {
        if !a.no_tch {
            std::thread::sleep(std::time::Duration::from_millis(50))
        }
    };
    let (mut ort_t, mut tch_t) = (vec![], vec![]);
    for _ in 0..a.iters.max(1) {
        pause();
        let t = Instant::now();
        ort.run(&input, &[encoder_io::CLS])?;
        ort_t.push(t.elapsed().as_secs_f64());
        if !a.no_tch {
            pause();
            let t = Instant::now();
            let _ = fwd().context("tch forward")?;
            tch_t.push(t.elapsed().as_secs_f64());
        }
    }
    let ort_s = median(ort_t.clone());
    let mut report = json!({
        "bench": "onnx", "model": a.model, "img_size": img, "batch": n, "threads": a.threads,
        "iters": a.iters, "opset": a.opset, "export_seconds": export_s,
        "onnx_bytes": written.model_bytes + written.data.as_ref().map_or(0, |d| d.1),
        "ort_load_seconds": load_s, "ort_batch_seconds": ort_s,
        "ort_images_per_s": n as f64 / ort_s,
    });
    if let Some(diff) = diff {
        let ratios = tch_t.iter().zip(&ort_t).map(|(c, o)| c / o).collect();
        let tch_s = median(tch_t);
        report["paired_speedup_median"] = json!(median(ratios));
        report["tch_attention"] = json!(cfg.attention);
        report["tch_batch_seconds"] = json!(tch_s);
        report["tch_images_per_s"] = json!(n as f64 / tch_s);
        report["ort_speedup_vs_tch"] = json!(tch_s / ort_s);
        report["cls_max_abs_diff"] = json!(diff);
    }
    if a.onnx_out.is_none() {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(tmp.with_extension("onnx.data"));
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
