//! `droppos-pipeline finetune`: end-to-end fine-tuning of a pre-trained encoder as an image
//! classifier, following the paper's (MAE's) protocol where it is implemented here: mean pooling
//! with `fc_norm` (no final norm), head N(0, 2e-5), AdamW (betas 0.9 / 0.999) with layer-wise lr
//! decay, weight decay except on 1-D parameters, drop path, per-iteration warm-up and
//! half-cosine to `min_lr`, Mixup / CutMix with label smoothing, random erasing, RandAugment
//! (in the loader), RandomResizedCrop and flip; evaluation with resize and centre crop. Not
//! implemented (said in the README): multi-process training. On CUDA the forward runs under
//! bf16 autocast with TF32, as `train` does. Epoch-end checkpoints make `--resume` exact.
//!
//! The result is `OUT/model.safetensors` (timm names, config metadata) that `export --what
//! classifier` reads without flags, `OUT/metrics.jsonl` (the trainer's per-step format, so
//! `plot` draws it; acc1 is the training top-1 against the unmixed labels) and `OUT/eval.jsonl`
//! (validation top-1 / top-5 per epoch).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::eval::classify::{ClassifyResult, TopKCounter};
use crate::eval::{for_each_batch_in, FeedConfig, Need};
use crate::train::metrics::{MetricsWriter, StepMetrics};
use anyhow::{bail, Context, Result};
use droppos_model::data::DeviceBatch;
use droppos_model::finetune::{self, MixConfig, MixRng};
use droppos_model::optim::{AdamW, AdamWConfig};
use droppos_model::schedule::{lr_from_blr, CosineSchedule};
use droppos_model::trainer::{Checkpoint, CheckpointStore, TrainState};
use droppos_model::{ClassifierConfig, VitClassifier, VitConfig};
use droppos_shards::loader::{
    Augment, Loader, LoaderConfig, PixelFormat, RandAugment, RrcParams, ShardSet,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tch::{Kind, Tensor};

/// eval.jsonl: one JSON object per line, flushed as written.
struct Jsonl(std::io::BufWriter<std::fs::File>);

impl Jsonl {
    /// Opens `path` for appending, first keeping only the existing lines `keep` accepts.
    fn open_keeping(path: &Path, keep: impl Fn(&serde_json::Value) -> bool) -> Result<Self> {
        let old = std::fs::read_to_string(path).unwrap_or_default();
        let kept: String = old
            .lines()
            .filter(|l| serde_json::from_str(l).is_ok_and(|v| keep(&v)))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(path, kept).with_context(|| format!("writing {}", path.display()))?;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self(std::io::BufWriter::new(f)))
    }

    fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        use std::io::Write;
        writeln!(self.0, "{v}")?;
        self.0.flush()?;
        Ok(())
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Labelled training shards (ImageNet-style).
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Labelled validation shards, scored (top-1 / top-5) after every epoch.
    #[arg(long, num_args = 1..)]
    pub val: Vec<PathBuf>,
    /// Output folder (model.safetensors, metrics.jsonl, eval.jsonl); must not hold a model yet.
    #[arg(long)]
    pub output: PathBuf,
    /// Pre-trained weights: a `train` run or checkpoint folder, or a safetensors file with timm /
    /// DropPos names. Encoder parameters are loaded by name; decoders and `norm` are dropped.
    /// Without it the classifier starts from the random initialisation.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Encoder preset (`vit_base_patch16_224`, ...) when --init carries no config.
    #[arg(long)]
    pub model: Option<String>,
    /// Classes (default: the training shards' class list).
    #[arg(long)]
    pub num_classes: Option<i64>,
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    /// Images per optimizer step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Base learning rate: lr = blr × batch / 256.
    #[arg(long, default_value_t = 1e-3)]
    pub blr: f64,
    #[arg(long, default_value_t = 1e-6)]
    pub min_lr: f64,
    #[arg(long, default_value_t = 5.0)]
    pub warmup_epochs: f64,
    #[arg(long, default_value_t = 0.75)]
    pub layer_decay: f64,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.1)]
    pub drop_path: f64,
    #[arg(long, default_value_t = 0.8)]
    pub mixup: f64,
    #[arg(long, default_value_t = 1.0)]
    pub cutmix: f64,
    #[arg(long, default_value_t = 0.1)]
    pub smoothing: f64,
    /// Random-erasing probability per image (timm's `--reprob`, pixel mode, one box).
    #[arg(long, default_value_t = 0.25)]
    pub reprob: f64,
    /// RandAugment operations per image (timm `rand-m9-mstd0.5-inc1` has 2; 0 turns it off).
    #[arg(long, default_value_t = 2)]
    pub randaug_ops: usize,
    /// RandAugment magnitude (0-10; drawn per op with std 0.5).
    #[arg(long, default_value_t = 9.0)]
    pub randaug_magnitude: f64,
    /// Lower bound of RandomResizedCrop's area fraction (timm's fine-tuning default 0.08).
    #[arg(long, default_value_t = 0.08)]
    pub crop_scale_min: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// libtorch intra-op threads (0: libtorch's default).
    #[arg(long, default_value_t = 0, value_parser = crate::cli::thread_count)]
    pub threads: usize,
    /// Loader decode threads.
    #[arg(long, default_value_t = 2, value_parser = crate::cli::thread_count)]
    pub workers: usize,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// `auto` (bf16 autocast with TF32 on CUDA, fp32 on CPU), `bf16` or `fp32`.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// No progress bar (metrics.jsonl and the log are still written).
    #[arg(long)]
    pub quiet: bool,
    /// Continue from the newest epoch checkpoint in --output (same settings required).
    #[arg(long)]
    pub resume: bool,
    /// End this invocation after this many epochs (a checkpoint is written at every epoch end);
    /// continue later with --resume, e.g. to fit a cluster's job time limit.
    #[arg(long)]
    pub stop_after_epochs: Option<usize>,
}

/// Everything that shapes the run's result: a resume must use the same.
fn settings(args: &Args, enc: &VitConfig, classes: i64) -> serde_json::Value {
    json!({
        "encoder": enc, "num_classes": classes, "epochs": args.epochs,
        "batch_size": args.batch_size, "blr": args.blr, "min_lr": args.min_lr,
        "warmup_epochs": args.warmup_epochs, "layer_decay": args.layer_decay,
        "weight_decay": args.weight_decay, "drop_path": args.drop_path, "mixup": args.mixup,
        "cutmix": args.cutmix, "smoothing": args.smoothing, "reprob": args.reprob,
        "randaug_ops": args.randaug_ops, "randaug_magnitude": args.randaug_magnitude,
        "crop_scale_min": args.crop_scale_min, "seed": args.seed,
    })
}

/// Encoder config + the weights to start from (encoder names only).
fn encoder_source(args: &Args) -> Result<(VitConfig, Vec<(String, Tensor)>)> {
    let Some(init) = &args.init else {
        let name = args
            .model
            .as_deref()
            .context("name the architecture with --model (or start from --init)")?;
        return Ok((VitConfig::from_name(name)?, Vec::new()));
    };
    let path = crate::commands::export::resolve_checkpoint(init)?;
    let (tensors, meta) = droppos_model::checkpoint::load(&path)
        .with_context(|| format!("loading {}", path.display()))?;
    let cfg = match (meta.get("droppos_config"), &args.model) {
        (_, Some(name)) => VitConfig::from_name(name)?,
        (Some(text), None) => {
            let dp: droppos_model::DropPosConfig =
                serde_json::from_str(text).context("checkpoint metadata `droppos_config`")?;
            dp.encoder
        }
        (None, None) => bail!(
            "{} carries no droppos_config metadata; name the architecture with --model",
            path.display()
        ),
    };
    // Only the encoder: a DDP `module.` prefix dropped, decoder / mask tokens / norm left out.
    let tensors = tensors
        .into_iter()
        .map(|(n, t)| (n.strip_prefix("module.").unwrap_or(&n).to_string(), t))
        .filter(|(n, _)| {
            n == "cls_token"
                || n == "pos_embed"
                || n.starts_with("patch_embed.")
                || n.starts_with("blocks.")
        })
        .collect::<Vec<_>>();
    // Weights under other names (a prefix, an optimizer file) must not mean random weights.
    if tensors.is_empty() {
        bail!(
            "{} holds no encoder parameters under the reference names (cls_token, pos_embed, \
             patch_embed.*, blocks.*); is it a model file, with names without a prefix?",
            path.display()
        );
    }
    Ok((cfg, tensors))
}

fn open_set(dirs: &[PathBuf]) -> Result<Arc<ShardSet>> {
    let set = ShardSet::open(dirs, true)
        .with_context(|| format!("opening shards {}", crate::eval::display_dirs(dirs)))?;
    if !set.columns().label {
        bail!(
            "the shards in {} do not all have class labels; fine-tuning needs labelled \
             (ImageNet-style) shards",
            crate::eval::display_dirs(dirs)
        );
    }
    Ok(Arc::new(set))
}

/// Top-1 / top-5 of the classifier on the validation shards: the evaluation transform and the
/// top-k counting of `eval classify`, run with tch; also how many images the loader skipped as
/// undecodable (the scores leave them out).
fn evaluate(
    model: &VitClassifier,
    placement: &crate::train::device::Placement,
    set: &Arc<ShardSet>,
    dirs: &[PathBuf],
    img: usize,
    batch: usize,
    workers: usize,
) -> Result<(ClassifyResult, u64)> {
    let feed = FeedConfig {
        batch_size: batch,
        loader_threads: workers.max(1),
        limit: None,
        progress: false,
        skipped: Default::default(),
    };
    let mut counter = TopKCounter::new(model.config().num_classes as usize);
    let s = img as i64;
    for_each_batch_in(
        set,
        dirs,
        img,
        &feed,
        Need::ClassLabels,
        "validation",
        |x, b| {
            let n = b.labels.len() as i64;
            let x = Tensor::from_slice(x)
                .view([n, 3, s, s])
                .to_device(placement.device);
            let logits = tch::no_grad(|| placement.autocast(|| model.forward(&x)))?
                .to_kind(Kind::Float)
                .to_device(tch::Device::Cpu);
            counter.add(&Vec::<f32>::try_from(logits.view(-1))?, b.labels)
        },
    )?;
    Ok((
        counter.result(),
        feed.skipped.load(std::sync::atomic::Ordering::Relaxed),
    ))
}

/// The classifier (fine-tuning form) with the pre-trained encoder loaded, and its AdamW with
/// layer-wise lr decay. The VarStore owns the variables.
fn build_model(
    args: &Args,
    enc: &VitConfig,
    init: &[(String, Tensor)],
    classes: i64,
    device: tch::Device,
) -> Result<(tch::nn::VarStore, VitClassifier, AdamW)> {
    let ccfg = ClassifierConfig::finetune(enc.clone(), classes);
    tch::manual_seed(args.seed as i64);
    let vs = tch::nn::VarStore::new(device);
    let model = VitClassifier::new(&vs.root(), &ccfg)?;
    if !init.is_empty() {
        let encoder_params: Vec<(String, Tensor)> = model
            .named_parameters()
            .into_iter()
            .filter(|(n, _)| !n.starts_with("fc_norm.") && !n.starts_with("head."))
            .collect();
        droppos_model::checkpoint::load_into(&encoder_params, init, true, Path::new("--init"))
            .context("loading the pre-trained encoder into the classifier")?;
    }
    let trainable: Vec<(String, Tensor)> = model
        .named_parameters()
        .into_iter()
        .filter(|(n, _)| n != "pos_embed")
        .collect();
    let opt = finetune_optimizer(
        trainable,
        enc.depth as usize,
        args.weight_decay,
        args.layer_decay,
    );
    Ok((vs, model, opt))
}

/// AdamW as MAE's fine-tuning builds it: betas (0.9, 0.999), layer-wise lr decay, and no weight
/// decay for 1-D tensors, biases and timm's `no_weight_decay()` names.
fn finetune_optimizer(
    trainable: Vec<(String, Tensor)>,
    depth: usize,
    weight_decay: f64,
    layer_decay: f64,
) -> AdamW {
    let mut opt = AdamW::new(
        trainable,
        AdamWConfig {
            lr: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        },
    );
    opt.set_lr_scales(|n| finetune::layer_decay_scale(n, depth, layer_decay));
    // MAE's fine-tuning (which DropPos's runs) builds its groups with `no_weight_decay_list =
    // model.no_weight_decay()`, timm's {pos_embed, cls_token}: the cls token is not decayed
    // there, unlike in pre-training.
    opt.exclude_from_decay(&finetune::NO_WEIGHT_DECAY);
    opt
}

/// The training loader: RandomResizedCrop + flip (+ RandAugment), u8 batches.
fn train_loader(args: &Args, set: Arc<ShardSet>, img: usize) -> Result<Loader> {
    let mut lcfg = LoaderConfig::pretrain(img, args.batch_size);
    lcfg.augment = Augment::Pretrain {
        rrc: RrcParams {
            scale: (args.crop_scale_min, 1.0),
            ..RrcParams::default()
        },
        flip: true,
    };
    lcfg.pixel_format = PixelFormat::U8;
    lcfg.randaug = (args.randaug_ops > 0).then_some(RandAugment {
        num_ops: args.randaug_ops,
        magnitude: args.randaug_magnitude,
        ..RandAugment::default()
    });
    lcfg.seed = args.seed;
    lcfg.threads = args.workers.max(1);
    Loader::new(set, lcfg).context("configuring the loader")
}

/// Where the run starts: (0, 0) for a fresh run, or the newest checkpoint's (epoch, step) after
/// loading its weights and optimizer state (`--resume`, same settings only).
fn resume_point(
    args: &Args,
    store: &CheckpointStore,
    recipe: &serde_json::Value,
    model: &VitClassifier,
    opt: &mut AdamW,
) -> Result<(usize, u64)> {
    match (args.resume, store.latest()?) {
        (true, None) => bail!(
            "--resume: {} holds no fine-tuning checkpoint",
            args.output.display()
        ),
        (false, Some(_)) => bail!(
            "{} holds fine-tuning checkpoints: pass --resume to continue, or choose another \
             --output",
            args.output.display()
        ),
        (false, None) => Ok((0, 0)),
        (true, Some(dir)) => {
            let ck = CheckpointStore::load(&dir)?;
            let saved: serde_json::Value = serde_json::from_str(&ck.config_toml)
                .with_context(|| format!("settings in {}", dir.display()))?;
            if &saved != recipe {
                bail!(
                    "--resume with other settings than the run's ({}): {saved}",
                    dir.display()
                );
            }
            droppos_model::checkpoint::load_into(&model.named_parameters(), &ck.model, true, &dir)?;
            opt.load_state_tensors(&ck.optimizer)?;
            tracing::info!(
                "resuming after epoch {} (step {})",
                ck.state.epoch,
                ck.state.step
            );
            Ok((ck.state.epoch as usize, ck.state.step))
        }
    }
}

/// One optimizer step on a loader batch: random erasing, Mixup / CutMix, forward with drop
/// path, soft cross-entropy, AdamW at `lr`. Returns (loss, top-1 against the unmixed labels).
#[allow(clippy::too_many_arguments)]
fn step_on(
    args: &Args,
    model: &VitClassifier,
    opt: &mut AdamW,
    placement: &crate::train::device::Placement,
    mix: &MixConfig,
    batch: droppos_shards::loader::Batch,
    lr: f64,
    step: u64,
    rng: &mut MixRng,
) -> Result<(f64, f64)> {
    let classes = model.config().num_classes;
    if let Some(l) = batch.labels.iter().find(|&&l| l < 0 || l >= classes) {
        bail!("training label {l} is outside the classifier's 0..{classes}");
    }
    let device = placement.device;
    let labels = Tensor::from_slice(&batch.labels).to_device(device);
    let mut x = DeviceBatch::new(batch, device).input();
    // Erasing noise and drop-path masks come from libtorch's generator: seed it per step.
    tch::manual_seed((args.seed as i64).wrapping_mul(7919) + step as i64);
    if args.reprob > 0.0 {
        x = x.copy();
        finetune::random_erase(&mut x, args.reprob, rng);
    }
    let (x, y, _) = finetune::mix_batch(&x, &labels, classes, mix, rng);
    let logits = placement.autocast(|| model.forward_train(&x, args.drop_path))?;
    let loss = finetune::soft_cross_entropy(&logits, &y);
    let lv = loss.double_value(&[]);
    if !lv.is_finite() {
        bail!("non-finite loss {lv} at step {}; lower --blr", step + 1);
    }
    opt.zero_grad();
    loss.backward();
    opt.set_lr(lr);
    opt.step();
    // A rough training signal under Mixup / CutMix.
    let acc1 = logits
        .argmax(-1, false)
        .eq_tensor(&labels)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    Ok((lv, acc1))
}

/// Refuses hyper-parameters no run can use, by name, before anything is loaded: NaN passes
/// every range comparison, and a rate outside its range either crashes deep in libtorch or
/// trains on NaN with a message that blames --blr.
fn check_args(a: &Args) -> Result<()> {
    let ranges: [(&str, f64, std::ops::RangeInclusive<f64>); 12] = [
        ("--blr", a.blr, 0.0..=f64::MAX),
        ("--min-lr", a.min_lr, 0.0..=f64::MAX),
        ("--warmup-epochs", a.warmup_epochs, 0.0..=f64::MAX),
        ("--layer-decay", a.layer_decay, 0.0..=1.0),
        ("--weight-decay", a.weight_decay, 0.0..=f64::MAX),
        ("--drop-path", a.drop_path, 0.0..=0.999_999),
        ("--mixup", a.mixup, 0.0..=f64::MAX),
        ("--cutmix", a.cutmix, 0.0..=f64::MAX),
        ("--smoothing", a.smoothing, 0.0..=0.999_999),
        ("--reprob", a.reprob, 0.0..=1.0),
        ("--randaug-magnitude", a.randaug_magnitude, 0.0..=10.0),
        ("--crop-scale-min", a.crop_scale_min, 1e-6..=1.0),
    ];
    for (flag, v, range) in ranges {
        if !v.is_finite() || !range.contains(&v) {
            let (lo, hi) = (range.start(), range.end());
            if *hi == f64::MAX {
                bail!("{flag} must be a finite number >= {lo}, got {v}");
            }
            bail!("{flag} must be in [{lo}, {hi}], got {v}");
        }
    }
    if a.blr == 0.0 {
        bail!("--blr must be positive");
    }
    if a.num_classes.is_some_and(|c| c <= 0) {
        bail!("--num-classes must be positive");
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    check_args(&args)?;
    if args.output.join("model.safetensors").exists() {
        bail!(
            "{} already holds a fine-tuned model; choose another --output",
            args.output.display()
        );
    }
    let rt = crate::config::RuntimeConfig {
        device: args.device.clone(),
        precision: args.precision.clone(),
        threads: args.threads as u64,
        ..crate::config::RuntimeConfig::default()
    };
    let placement = crate::train::device::Placement::resolve(&rt, 0)?;
    let device = placement.device;
    let (enc, init) = encoder_source(&args)?;
    crate::eval::check_label_meanings(&[&args.data, &args.val])?;
    let train_set = open_set(&args.data)?;
    let val_set = if args.val.is_empty() {
        None
    } else {
        Some(open_set(&args.val)?)
    };
    let classes = match args.num_classes {
        Some(c) => c,
        None => train_set
            .manifests()
            .iter()
            .map(|m| m.classes.len())
            .max()
            .unwrap_or(0) as i64,
    };
    if classes <= 0 {
        bail!("the training shards list no classes; pass --num-classes");
    }
    let (_vs, model, mut opt) = build_model(&args, &enc, &init, classes, device)?;
    let depth = enc.depth as usize;

    let img = enc.img_size as usize;
    let loader = train_loader(&args, train_set.clone(), img)?;
    // The last partial batch is dropped: a batch larger than the data would train nothing.
    if (loader.samples_per_epoch() as usize) < args.batch_size {
        bail!(
            "--batch-size {} is larger than the {} training images: no step would run",
            args.batch_size,
            loader.samples_per_epoch()
        );
    }
    let iters = loader.samples_per_epoch() as usize / args.batch_size;
    let sched = CosineSchedule {
        lr: lr_from_blr(args.blr, args.batch_size),
        min_lr: args.min_lr,
        warmup_epochs: args.warmup_epochs,
        epochs: args.epochs as f64,
    };
    let mix = MixConfig {
        mixup_alpha: args.mixup,
        cutmix_alpha: args.cutmix,
        switch_prob: 0.5,
        label_smoothing: args.smoothing,
    };
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let _lock = crate::train::run_lock::lock_run_dir(&args.output)?;
    let recipe = settings(&args, &enc, classes);
    let store = CheckpointStore::new(&args.output);
    let (start_epoch, mut step) = resume_point(&args, &store, &recipe, &model, &mut opt)?;
    // Metrics and scores of a resumed run continue from its checkpoint; a fresh run starts
    // new files.
    let metrics_file = crate::train::metrics::metrics_path(&args.output);
    if start_epoch == 0 && metrics_file.exists() {
        std::fs::remove_file(&metrics_file)
            .with_context(|| format!("removing {}", metrics_file.display()))?;
    }
    let mut metrics = MetricsWriter::open(&args.output, step)?;
    let mut evals = Jsonl::open_keeping(&args.output.join("eval.jsonl"), |v| {
        v["epoch"]
            .as_u64()
            .is_some_and(|e| (e as usize) < start_epoch)
    })?;
    let pb = if args.quiet {
        ProgressBar::hidden()
    } else {
        let pb = crate::progress::bar(Some(
            (iters * args.epochs.saturating_sub(start_epoch)) as u64,
        ));
        pb.set_style(
            ProgressStyle::with_template(
                "finetune [{bar:30}] {pos}/{len} steps {per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb
    };
    tracing::info!(
        "fine-tuning {} classes, {} blocks x {} wide, {} images/epoch, batch {}, lr {:.3e} on {}",
        classes,
        depth,
        enc.embed_dim,
        loader.samples_per_epoch(),
        args.batch_size,
        sched.lr,
        placement.describe()
    );
    let mut last = serde_json::Value::Null;
    let meta = HashMap::from([("config".to_string(), serde_json::to_string(model.config())?)]);
    let stop_at = args
        .stop_after_epochs
        .map_or(args.epochs, |n| (start_epoch + n).min(args.epochs));
    for epoch in start_epoch..stop_at {
        let mut rng = MixRng::new(args.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
        for (i, b) in loader.epoch(epoch as u64, 0)?.enumerate() {
            let t = Instant::now();
            let b = b.context("loading a batch")?;
            let n = b.len();
            let skipped = b.skipped.len() as u64;
            let lr = sched.lr_at_iter(epoch, i, iters);
            let (lv, acc1) = step_on(
                &args, &model, &mut opt, &placement, &mix, b, lr, step, &mut rng,
            )?;
            step += 1;
            let secs = t.elapsed().as_secs_f64();
            metrics.write(&StepMetrics {
                step,
                epoch: epoch as f64 + (i + 1) as f64 / iters as f64,
                loss: lv,
                acc1,
                lr,
                sigma: None,
                images_per_s: n as f64 / secs,
                step_time_s: secs,
                device_mem_mib: crate::train::device::memory_mib(device),
                skipped_samples: skipped,
            })?;
            pb.set_message(format!("loss {lv:.4}"));
            pb.inc(1);
        }
        if let Some(val_set) = &val_set {
            let (r, skipped) = evaluate(
                &model,
                &placement,
                val_set,
                &args.val,
                img,
                args.batch_size,
                args.workers,
            )?;
            last = json!({"epoch": epoch, "val_top1": r.top1, "val_top5": r.top5,
                          "val_images": r.images, "val_skipped_images": skipped});
            evals.write(&last)?;
            if skipped > 0 {
                tracing::warn!(
                    "epoch {epoch}: {skipped} validation image(s) could not be decoded and are \
                     not scored"
                );
            }
            tracing::info!(
                "epoch {epoch}: val top-1 {:.4} top-5 {:.4} ({} images)",
                r.top1,
                r.top5,
                r.images
            );
        }
        let ckpt = Checkpoint {
            model: model.named_parameters(),
            optimizer: opt.state_tensors(),
            state: TrainState {
                step,
                epoch: epoch as u64 + 1,
                samples_in_epoch: 0,
                loader_position: None,
                world_size: 1,
                rank: 0,
                reason: "epoch_end".into(),
                last_loss: None,
                data: None,
            },
            config_toml: recipe.to_string(),
            model_metadata: meta.clone(),
        };
        store.save(&ckpt, 2)?;
    }
    pb.finish_and_clear();
    if stop_at < args.epochs {
        let summary = json!({"stopped_after_epoch": stop_at, "steps": step,
                             "resume_with": "--resume", "last_eval": last});
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    let out = args.output.join("model.safetensors");
    droppos_model::checkpoint::save(&out, &model.named_parameters(), Some(meta))?;
    let summary = json!({"model": out, "steps": step, "epochs": args.epochs,
                         "num_classes": classes, "seconds": start.elapsed().as_secs_f64(),
                         "last_eval": last});
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The groups of MAE's `param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75)`.
    #[test]
    fn cls_token_biases_and_norms_are_not_decayed_in_fine_tuning() {
        let enc = VitConfig::from_name("vit_tiny_patch16_32").unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let model =
            VitClassifier::new(&vs.root(), &ClassifierConfig::finetune(enc.clone(), 5)).unwrap();
        let trainable: Vec<(String, Tensor)> = model
            .named_parameters()
            .into_iter()
            .filter(|(n, _)| n != "pos_embed")
            .collect();
        let opt = finetune_optimizer(trainable, enc.depth as usize, 0.05, 0.75);
        let (decay, no_decay) = opt.group_names();
        for n in [
            "cls_token",
            "blocks.0.norm1.weight",
            "head.bias",
            "fc_norm.weight",
        ] {
            assert!(no_decay.iter().any(|d| d == n), "{n} should not be decayed");
        }
        for n in [
            "patch_embed.proj.weight",
            "blocks.0.attn.qkv.weight",
            "head.weight",
        ] {
            assert!(decay.iter().any(|d| d == n), "{n} should be decayed");
        }
    }
}
