//! `droppos-pipeline bench train-step`: median time of one full DropPos pre-training step on
//! synthetic images: forward (with the attention guide's no-grad full pass), backward,
//! per-parameter gradient clipping and AdamW. `scripts/bench_train_step.py` measures the PyTorch
//! eager baseline of the same model and step and can run this command for a side-by-side ratio.

use std::time::Instant;

use anyhow::{bail, Result};
use droppos_model::config::{AttentionImpl, DecoderConfig, DropPosConfig, VitConfig};
use droppos_model::optim::{AdamW, AdamWConfig};
use droppos_model::DropPos;
use serde::Serialize;
use tch::{nn::VarStore, Device, Kind, Tensor};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Attention {
    /// scaled_dot_product_attention kernels.
    Fused,
    /// softmax((q kᵀ)·s) v, op for op like the reference.
    Explicit,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Auto,
    Fp32,
    Bf16,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKernels {
    Fused,
    Exact,
}

/// Dense bf16 peak of an H100 SXM (and H200), TFLOP/s.
const H100_BF16_PEAK_TFLOPS: f64 = 989.4;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Encoder preset: vit_{tiny,small,base,large,huge}_patch{14,16,32}[_{img}].
    #[arg(long, default_value = "vit_tiny_patch16_224")]
    model: String,
    /// Decoder preset: dec512d2b or dec512d8b.
    #[arg(long, default_value = "dec512d2b")]
    decoder: String,
    /// Images per step.
    #[arg(long, default_value_t = 16)]
    batch: i64,
    /// libtorch intra-op threads (CPU).
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Label-smoothing sigma.
    #[arg(long, default_value_t = 1.0)]
    sigma: f64,
    /// Attention implementation.
    #[arg(long, value_enum, default_value = "fused")]
    attention: Attention,
    /// Switch the attention guide off (it is on in the paper's recipes).
    #[arg(long)]
    no_attn_guide: bool,
    /// Run the attention guide's no-grad pass under CPU bf16 autocast (`droppos.guide_precision
    /// = "bf16"`); the default is fp32, the reference's numerics.
    #[arg(long)]
    guide_bf16: bool,
    /// Per-parameter gradient clipping threshold.
    #[arg(long, default_value_t = 5.0)]
    clip_grad: f64,
    /// `cpu`, `cuda`, `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Step numerics, as `runtime.precision` of `train`: `auto` (CUDA: bf16 autocast around the
    /// forward; CPU: fp32), `fp32`, `bf16` (CUDA only); on CUDA matmuls use TF32 either way.
    #[arg(long, value_enum, default_value = "auto")]
    precision: Precision,
    /// Peak FLOP/s of the device in TFLOP/s, for the MFU figure (default on CUDA: 989.4, the
    /// H100 SXM's dense bf16 peak, which the H200 shares; none on CPU).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Optimizer kernels: `fused` (ATen's multi-tensor AdamW and clipping, CUDA's default) or
    /// `exact` (op for op as the reference, CPU's default).
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerKernels>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Debug)]
struct Report {
    model: String,
    decoder: String,
    device: String,
    threads: i32,
    batch: i64,
    attention: &'static str,
    attn_guide: bool,
    /// `fp32` or `bf16` (the guide pass's autocast).
    guide_precision: &'static str,
    steps: usize,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    images_per_s: f64,
    /// Medians of the phases, measured on separate extra steps (each phase synchronised).
    phase_median_ms: Phases,
    /// `fp32`, or on CUDA `fp32 + TF32` / `bf16 autocast + TF32`.
    precision: &'static str,
    /// `fused` or `exact` optimizer kernels.
    optimizer: &'static str,
    /// Analytic matmul FLOPs of one step (`droppos_model::flops`), in TFLOP.
    step_tflop: f64,
    /// step_tflop / median step time.
    achieved_tflops: f64,
    peak_tflops: Option<f64>,
    /// Model FLOPs utilisation: achieved / peak.
    mfu: Option<f64>,
    /// CUDA: device memory in use after the timed steps (all of the caching allocator's
    /// reservations, i.e. its peak, plus the CUDA context); CPU: peak resident set. MiB.
    memory_mib: f64,
}

#[derive(Serialize, Debug, Default)]
struct Phases {
    forward: f64,
    backward: f64,
    clip_and_step: f64,
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(args: Args) -> Result<()> {
    if args.steps == 0 || args.batch <= 0 || args.threads <= 0 {
        bail!("--steps, --batch and --threads must be positive");
    }
    // The trainer's resolution of device and numerics (threads; on CUDA TF32 and the bf16
    // autocast dtype), so that the bench times the step `train` runs.
    let rt = crate::config::RuntimeConfig {
        device: args.device.clone(),
        precision: match args.precision {
            Precision::Auto => "auto",
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
        .into(),
        threads: args.threads as u64,
        ..crate::config::RuntimeConfig::default()
    };
    let placement = crate::train::device::Placement::resolve(&rt, 0)?;
    let (device, bf16) = (placement.device, placement.bf16_autocast);
    tch::manual_seed(0);
    let mut encoder = VitConfig::from_name(&args.model)?;
    encoder.attention = match args.attention {
        Attention::Fused => AttentionImpl::Fused,
        Attention::Explicit => AttentionImpl::Explicit,
    };
    let decoder = match args.decoder.as_str() {
        "dec512d2b" => DecoderConfig::dec512d2b(),
        "dec512d8b" => DecoderConfig::dec512d8b(),
        other => bail!("unknown decoder preset {other:?} (dec512d2b, dec512d8b)"),
    };
    let mut cfg = DropPosConfig::new(encoder, decoder);
    cfg.sigma = args.sigma;
    cfg.attn_guide = !args.no_attn_guide;
    if args.guide_bf16 {
        cfg.guide_precision = droppos_model::GuidePrecision::Bf16;
    }
    let vs = VarStore::new(device);
    let model = DropPos::new(&vs.root(), &cfg)?;
    let mut opt = AdamW::new(model.trainable_parameters(), AdamWConfig::default());
    if let Some(k) = args.optimizer {
        opt.set_fused(k == OptimizerKernels::Fused);
    }
    let smooth = model.smoothing_map(cfg.sigma)?;
    let img = cfg.encoder.img_size;
    let images = Tensor::randn([args.batch, 3, img, img], (Kind::Float, device));

    let mut step = |phases: Option<&mut Phases>| -> Result<f64> {
        let t0 = Instant::now();
        let (noise_patch, noise_pos) = model.sample_noise(args.batch);
        let out = placement
            .autocast(|| model.forward_train(&images, &noise_patch, &noise_pos, &smooth))?;
        let t1 = phases.as_ref().map(|_| {
            sync(device);
            Instant::now()
        });
        opt.zero_grad();
        out.loss.backward();
        let t2 = phases.as_ref().map(|_| {
            sync(device);
            Instant::now()
        });
        opt.clip_grad_per_param(args.clip_grad);
        opt.step();
        let loss = out.loss.double_value(&[]);
        sync(device);
        let end = Instant::now();
        if !loss.is_finite() {
            bail!("non-finite loss {loss}");
        }
        if let (Some(p), Some(t1), Some(t2)) = (phases, t1, t2) {
            p.forward = (t1 - t0).as_secs_f64() * 1e3;
            p.backward = (t2 - t1).as_secs_f64() * 1e3;
            p.clip_and_step = (end - t2).as_secs_f64() * 1e3;
        }
        Ok((end - t0).as_secs_f64() * 1e3)
    };

    for _ in 0..args.warmup {
        step(None)?;
    }
    let mut times = Vec::with_capacity(args.steps);
    for i in 0..args.steps {
        let ms = step(None)?;
        tracing::debug!(step = i, ms, "train step");
        times.push(ms);
    }
    // Phase split on a few extra steps (synchronising between phases perturbs the total).
    let (mut f, mut b, mut s) = (vec![], vec![], vec![]);
    for _ in 0..3.min(args.steps) {
        let mut p = Phases::default();
        step(Some(&mut p))?;
        f.push(p.forward);
        b.push(p.backward);
        s.push(p.clip_and_step);
    }
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = times.iter().cloned().fold(0.0, f64::max);
    let med = median(&mut times);
    let memory_mib = match device {
        Device::Cuda(_) => crate::train::device::memory_mib(device),
        _ => super::bench_loader::peak_rss_mib().unwrap_or(f64::NAN),
    };
    let step_tflop = cfg.step_flops(args.batch).total() / 1e12;
    let achieved = step_tflop / (med / 1e3);
    let peak = args.peak_tflops.or(match device {
        Device::Cuda(_) => Some(H100_BF16_PEAK_TFLOPS),
        _ => None,
    });
    let round = |x: f64, digits: i32| {
        let m = 10f64.powi(digits);
        (x * m).round() / m
    };
    let report = Report {
        model: args.model.clone(),
        decoder: args.decoder.clone(),
        device: format!("{device:?}"),
        threads: args.threads,
        batch: args.batch,
        attention: match args.attention {
            Attention::Fused => "fused",
            Attention::Explicit => "explicit",
        },
        attn_guide: cfg.attn_guide,
        guide_precision: if args.guide_bf16 { "bf16" } else { "fp32" },
        steps: args.steps,
        median_ms: (med * 100.0).round() / 100.0,
        min_ms: (min * 100.0).round() / 100.0,
        max_ms: (max * 100.0).round() / 100.0,
        images_per_s: (args.batch as f64 / (med / 1e3) * 10.0).round() / 10.0,
        phase_median_ms: Phases {
            forward: median(&mut f),
            backward: median(&mut b),
            clip_and_step: median(&mut s),
        },
        precision: match (bf16, device.is_cuda()) {
            (true, _) => "bf16 autocast + TF32",
            (false, true) => "fp32 + TF32",
            (false, false) => "fp32",
        },
        optimizer: if opt.is_fused() { "fused" } else { "exact" },
        step_tflop: round(step_tflop, 6),
        achieved_tflops: round(achieved, 3),
        peak_tflops: peak,
        mfu: peak.map(|p| round(achieved / p, 4)),
        memory_mib: round(memory_mib, 1),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} + {} on {}, batch {}, {} threads, {} attention, guide {}: median {:.1} ms/step ({:.1} images/s; min {:.1}, max {:.1}) over {} steps",
            report.model,
            report.decoder,
            report.device,
            report.batch,
            report.threads,
            report.attention,
            match (report.attn_guide, report.guide_precision) {
                (false, _) => "off",
                (true, "bf16") => "on (bf16)",
                _ => "on",
            },
            report.median_ms,
            report.images_per_s,
            report.min_ms,
            report.max_ms,
            report.steps
        );
        println!(
            "phases (median of 3 synchronised steps): forward {:.1} ms, backward {:.1} ms, clip+AdamW {:.1} ms",
            report.phase_median_ms.forward, report.phase_median_ms.backward, report.phase_median_ms.clip_and_step
        );
        println!(
            "{}: {:.4} TFLOP/step (matmuls), {:.2} TFLOP/s{}, memory {:.0} MiB",
            report.precision,
            report.step_tflop,
            report.achieved_tflops,
            report
                .mfu
                .map(|m| format!(
                    ", MFU {:.1} % of {} TFLOP/s",
                    m * 100.0,
                    peak.unwrap_or(0.0)
                ))
                .unwrap_or_default(),
            report.memory_mib
        );
    }
    Ok(())
}
