//! `droppos-pipeline eval`: accuracy of exported ONNX models, run with ONNX Runtime over shard
//! directories. Each subcommand prints a short summary, or one JSON object with `--json`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::eval::{self, dense::Confusion, knn, linear, position, FeedConfig, ModelKind, Need};
use crate::ort_runtime::{self, OrtModel};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub what: EvalCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum EvalCommand {
    /// Weighted k-NN on L2-normalised cls features of an `encoder` export: top-1 / top-5.
    Knn(KnnArgs),
    /// A linear probe on frozen cls features of an `encoder` export, trained here: top-1 / top-5.
    Linear(LinearArgs),
    /// Position accuracy of a `droppos` export at the given mask ratios.
    Position(PositionArgs),
    /// A linear probe of an `encoder` export's patch tokens on the shards' patch_labels (COCO,
    /// ADE20K): patch accuracy and mIoU.
    Dense(DenseArgs),
    /// Top-1 / top-5 of a `classifier` export on labelled shards (resize + centre crop).
    Classify(ClassifyArgs),
}

/// Options shared by every evaluation.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// The ONNX model (`droppos-pipeline export`).
    #[arg(long)]
    pub model: PathBuf,
    /// Images per ONNX Runtime call. Small batches are faster on CPU: a batch's activations stay
    /// in cache between ops (ViT-S/B, 2 threads: 8 images per call 8-15 % faster than 32).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// ONNX Runtime intra-op threads (0: ONNX Runtime's choice).
    #[arg(long, default_value_t = 0, value_parser = crate::cli::thread_count)]
    pub threads: usize,
    /// Loader decode threads.
    #[arg(long, default_value_t = 2, value_parser = crate::cli::thread_count)]
    pub loader_threads: usize,
    /// Use at most this many images of each shard set (manifest order).
    #[arg(long)]
    pub limit: Option<u64>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON object to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Undecodable samples the loader skipped, over every pass of the command.
    #[arg(skip)]
    pub skipped: Arc<AtomicU64>,
}

impl Common {
    fn feed(&self) -> FeedConfig {
        FeedConfig {
            batch_size: self.batch_size,
            loader_threads: self.loader_threads.max(1),
            limit: self.limit,
            progress: !self.no_progress,
            skipped: self.skipped.clone(),
        }
    }

    /// Loads the model and checks that it is the export kind the evaluation needs.
    fn load(&self, kind: ModelKind) -> Result<OrtModel> {
        if self.limit == Some(0) {
            bail!(
                "--limit 0 leaves no images to evaluate; give at least 1 (or leave it out for all)"
            );
        }
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        // The result is written after all the work: a folder that cannot be made fails now.
        if let Some(dir) = self.out.as_deref().and_then(Path::parent) {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {} for --out", dir.display()))?;
            }
        }
        ort_runtime::init()?;
        let model = OrtModel::load(&self.model, self.threads)?;
        eval::check_model_kind(&model, &self.model, kind)?;
        Ok(model)
    }
}

#[derive(clap::Args, Debug)]
pub struct KnnArgs {
    #[command(flatten)]
    pub common: Common,
    /// Shard directories of the memory bank (training set).
    #[arg(long, required = true, num_args = 1..)]
    pub train: Vec<PathBuf>,
    /// Shard directories of the queries (validation set). Without it, every training image is
    /// a query against the others (leave-one-out).
    #[arg(long, num_args = 1..)]
    pub val: Vec<PathBuf>,
    #[arg(long, default_value_t = 20)]
    pub k: usize,
    #[arg(long, default_value_t = 0.07)]
    pub temperature: f32,
}

#[derive(clap::Args, Debug)]
pub struct LinearArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub sets: ProbeSets,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

/// The shard sets a probe is trained and scored on.
#[derive(clap::Args, Debug, Clone)]
pub struct ProbeSets {
    /// Shard directories the probe is trained on.
    #[arg(long, required = true, num_args = 1..)]
    pub train: Vec<PathBuf>,
    /// Shard directories the probe is scored on.
    #[arg(long, required = true, num_args = 1..)]
    pub val: Vec<PathBuf>,
}

/// Linear-probe training settings.
#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    /// Probe training epochs.
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    /// Probe mini-batch size.
    #[arg(long, default_value_t = 256)]
    pub probe_batch_size: i64,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Seed of the probe's initialisation and mini-batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
}

impl ProbeArgs {
    /// Refuses settings the probe cannot train with (a NaN rate ends in a libtorch error, an
    /// infinite one in a score of nothing).
    fn check(&self) -> Result<()> {
        if self.probe_batch_size < 1 {
            bail!(
                "--probe-batch-size must be at least 1, got {}",
                self.probe_batch_size
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "--weight-decay must be a number >= 0, got {}",
                self.weight_decay
            );
        }
        Ok(())
    }

    fn config(&self) -> linear::ProbeConfig {
        linear::ProbeConfig {
            epochs: self.epochs,
            batch_size: self.probe_batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            seed: self.seed,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct PositionArgs {
    #[command(flatten)]
    pub common: Common,
    /// Shard directories to draw images from (labels are not used).
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Patch mask ratios (fraction of patches removed before the encoder), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![0.75])]
    pub mask_ratio: Vec<f64>,
    /// Fraction of the visible patches whose position is dropped.
    #[arg(long, default_value_t = 0.75)]
    pub pos_mask_ratio: f64,
    /// Seed of the random masks.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Mask draws per image (more predictions from few images: a steadier estimate).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeats: u32,
}

#[derive(clap::Args, Debug)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub common: Common,
    /// Labelled shard directories (e.g. ImageNet val), in the classifier's class order.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct DenseArgs {
    #[command(flatten)]
    pub common: Common,
    // COCO or ADE20K shards.
    #[command(flatten)]
    pub sets: ProbeSets,
    /// Patch label left out of training and scoring (e.g. ADE20K's 0 = "other"); repeatable.
    #[arg(long, allow_negative_numbers = true)]
    pub ignore_label: Vec<i32>,
    /// Train on at most this many patches (a seeded random subset).
    #[arg(long, default_value_t = 200_000)]
    pub max_train_patches: usize,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

/// Prints the result (summary or JSON) and writes it to `--out`.
fn emit(common: &Common, value: &Value, summary: &str) -> Result<()> {
    let text = serde_json::to_string(value)?;
    if common.json {
        println!("{text}");
    } else {
        println!("{summary}");
    }
    if let Some(out) = &common.out {
        std::fs::write(out, format!("{text}\n"))
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
    }
    Ok(())
}

/// The fields every result starts with, then `body`'s fields.
fn result(kind: &str, common: &Common, body: impl Serialize, start: Instant) -> Result<Value> {
    let mut v = json!({"eval": kind, "model": common.model, "threads": common.threads,
                       "batch_size": common.batch_size});
    if let (Some(a), Value::Object(b)) = (v.as_object_mut(), serde_json::to_value(body)?) {
        a.extend(b);
    }
    // Images that could not be decoded are not in the figures: say how many.
    let skipped = common.skipped.load(Ordering::Relaxed);
    if skipped > 0 {
        tracing::warn!("{skipped} undecodable images were skipped and are not in the results");
    }
    v["skipped_images"] = json!(skipped);
    v["seconds"] = json!(start.elapsed().as_secs_f64());
    Ok(v)
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        EvalCommand::Knn(a) => run_knn(a),
        EvalCommand::Linear(a) => run_linear(a),
        EvalCommand::Position(a) => run_position(a),
        EvalCommand::Dense(a) => run_dense(a),
        EvalCommand::Classify(a) => run_classify(a),
    }
}

fn run_classify(a: ClassifyArgs) -> Result<()> {
    let start = Instant::now();
    let listed = eval::check_label_meanings(&[&a.data])?;
    let mut model = a.common.load(ModelKind::Classifier)?;
    let r = eval::classify::classify(&mut model, &a.data, listed, &a.common.feed())?;
    let summary = format!(
        "classify: top-1 {:.4}  top-5 {:.4}  ({} images, {} of the model's {} classes present, \
         mean per-class top-1 {:.4})",
        r.top1, r.top5, r.images, r.classes_present, r.num_classes, r.mean_class_top1
    );
    emit(
        &a.common,
        &result("classify", &a.common, r, start)?,
        &summary,
    )
}

fn run_knn(a: KnnArgs) -> Result<()> {
    let start = Instant::now();
    if a.k == 0 {
        bail!("--k must be at least 1 (the neighbours that vote)");
    }
    if !(a.temperature.is_finite() && a.temperature > 0.0) {
        bail!(
            "--temperature must be a positive number, got {}",
            a.temperature
        );
    }
    let listed = eval::check_label_meanings(&[&a.train, &a.val])?;
    let mut model = a.common.load(ModelKind::Encoder)?;
    let feed = a.common.feed();
    let mut train = eval::extract_features(&mut model, &a.train, &feed, Need::ClassLabels)?;
    knn::l2_normalize(&mut train.cls, train.dim);
    let queries = if a.val.is_empty() {
        None
    } else {
        let mut q = eval::extract_features(&mut model, &a.val, &feed, Need::ClassLabels)?;
        knn::l2_normalize(&mut q.cls, q.dim);
        Some(q)
    };
    if queries.is_none() && train.labels.len() < 2 {
        bail!(
            "leave-one-out k-NN needs at least 2 images in {} (each is classified by the others); \
             got {}",
            eval::display_dirs(&a.train),
            train.labels.len()
        );
    }
    let ytr = eval::class_indices(&train.labels);
    let cfg = knn::KnnConfig {
        k: a.k,
        temperature: a.temperature,
    };
    let bank = knn::Labelled {
        x: &train.cls,
        labels: &ytr,
    };
    let yq = queries.as_ref().map(|q| eval::class_indices(&q.labels));
    let q = queries
        .as_ref()
        .zip(yq.as_deref())
        .map(|(q, y)| knn::Labelled {
            x: &q.cls,
            labels: y,
        });
    // The label space is the manifests' class list.
    let classes = eval::label_space(
        listed,
        eval::num_classes(&ytr, yq.as_deref().unwrap_or(&[])),
        "the labels",
    )?;
    let r = knn::knn_classify(bank, q, train.dim, classes, &cfg);
    let summary = format!(
        "knn (k={}, T={}{}): top-1 {:.4}  top-5 {:.4}  ({} queries, {} in the memory bank)",
        r.k,
        r.temperature,
        if r.leave_one_out {
            ", leave-one-out"
        } else {
            ""
        },
        r.top1,
        r.top5,
        r.num_queries,
        r.num_train
    );
    emit(&a.common, &result("knn", &a.common, r, start)?, &summary)
}

fn run_linear(a: LinearArgs) -> Result<()> {
    let start = Instant::now();
    a.probe.check()?;
    let listed = eval::check_label_meanings(&[&a.sets.train, &a.sets.val])?;
    let mut model = a.common.load(ModelKind::Encoder)?;
    let feed = a.common.feed();
    let train = eval::extract_features(&mut model, &a.sets.train, &feed, Need::ClassLabels)?;
    let val = eval::extract_features(&mut model, &a.sets.val, &feed, Need::ClassLabels)?;
    // A head over the manifests' whole class list (as the MAE protocol's 1000-way probe).
    let classes = eval::label_space(
        listed,
        eval::num_classes(
            &eval::class_indices(&train.labels),
            &eval::class_indices(&val.labels),
        ),
        "the labels",
    )?;
    let r = linear::linear_probe(
        &train.cls,
        &train.labels,
        &val.cls,
        &val.labels,
        train.dim,
        classes,
        &a.probe.config(),
    )?;
    let summary = format!(
        "linear probe ({} epochs): top-1 {:.4}  top-5 {:.4}  (train top-1 {:.4}, {} train / {} val images)",
        r.config.epochs, r.top1, r.top5, r.train_top1, r.num_train, r.num_val
    );
    emit(&a.common, &result("linear", &a.common, r, start)?, &summary)
}

fn run_position(a: PositionArgs) -> Result<()> {
    let start = Instant::now();
    let mut model = a.common.load(ModelKind::Droppos)?;
    let img = eval::model_image_size(&model)?;
    let l = eval::position_count(&model)?;
    let mut counters = a
        .mask_ratio
        .iter()
        .map(|&r| position::PositionCounter::new(r, a.pos_mask_ratio))
        .collect::<Result<Vec<_>>>()?;
    let mut first_sample = 0i64;
    let feed = a.common.feed();
    let images = eval::for_each_batch(&a.data, img, &feed, Need::Images, "position", |x, b| {
        let n = b.labels.len();
        for draw in 0..a.repeats {
            for (i, c) in counters.iter_mut().enumerate() {
                // One seed per (run seed, image, draw, ratio): the same masks on every run,
                // whatever the batch size.
                let seeds =
                    |j: usize| position::sample_seed(a.seed, first_sample + j as i64, draw, i);
                c.add_batch(&mut model, x, n, img, l, seeds)?;
            }
        }
        first_sample += n as i64;
        Ok(())
    })?;
    let scores: Vec<_> = counters.iter().map(|c| c.score()).collect();
    let mut summary = format!(
        "position accuracy ({images} images x {} mask draws, {l} positions):",
        a.repeats
    );
    for s in &scores {
        summary.push_str(&format!(
            "\n  mask {:.2} / pos-mask {:.2}: dropped {}  visible {:.4}  (chance {:.4})",
            s.mask_ratio,
            s.pos_mask_ratio,
            s.acc_dropped
                .map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}")),
            s.acc_visible,
            s.chance
        ));
    }
    let body = json!({"images": images, "repeats": a.repeats, "num_positions": l,
                      "seed": a.seed, "scores": scores});
    emit(
        &a.common,
        &result("position", &a.common, body, start)?,
        &summary,
    )
}

fn run_dense(a: DenseArgs) -> Result<()> {
    let start = Instant::now();
    a.probe.check()?;
    let listed = eval::check_label_meanings(&[&a.sets.train, &a.sets.val])?;
    let mut model = a.common.load(ModelKind::Encoder)?;
    let feed = a.common.feed();
    let train = eval::extract_features(&mut model, &a.sets.train, &feed, Need::PatchLabels)?;
    let val = eval::extract_features(&mut model, &a.sets.val, &feed, Need::PatchLabels)?;
    let keep = |l: i32| l >= 0 && !a.ignore_label.contains(&l);
    let max_kept = train
        .patch_labels
        .iter()
        .chain(&val.patch_labels)
        .copied()
        .filter(|&l| keep(l))
        .max();
    let Some(max_kept) = max_kept else {
        bail!("every patch label is ignored or missing");
    };
    // Patch labels are class index + 1 (0 = background / other): listed + 1 values.
    let classes = eval::label_space(
        if listed > 0 { listed + 1 } else { 0 },
        max_kept as usize + 1,
        "the patch labels",
    )?;
    let idx =
        eval::dense::sample_indices(&train.patch_labels, keep, a.max_train_patches, a.probe.seed);
    let (xtr, ytr) = eval::dense::gather(&train, &idx);
    if ytr.is_empty() {
        bail!("the training shards have no patch with a kept label");
    }
    let probe = linear::LinearProbe::train(&xtr, &ytr, train.dim, classes, &a.probe.config())?;
    let val_idx: Vec<usize> = (0..val.patch_labels.len())
        .filter(|&i| keep(val.patch_labels[i]))
        .collect();
    let mut conf = Confusion::new(classes);
    for chunk in val_idx.chunks(65_536) {
        let (x, y) = eval::dense::gather(&val, chunk);
        let pred = probe.predict_topk(&x, val.dim, 1)?;
        for (p, &t) in pred.iter().zip(&y) {
            conf.add(t as usize, p[0] as usize);
        }
    }
    let scores = conf.scores();
    let summary = format!(
        "dense probe: patch accuracy {:.4}  mIoU {:.4}  ({} classes scored, {} val patches, {} train patches)",
        scores.patch_accuracy,
        scores.miou,
        scores.classes_scored,
        scores.patches,
        ytr.len()
    );
    let body = json!({
        "patch_accuracy": scores.patch_accuracy, "miou": scores.miou,
        "classes_scored": scores.classes_scored, "val_patches": scores.patches,
        "num_classes": classes, "ignore_labels": a.ignore_label,
        "train_patches": ytr.len(), "train_images": train.labels.len(), "val_images": val.labels.len(),
        "final_train_loss": probe.final_loss, "probe": a.probe.config(),
    });
    emit(
        &a.common,
        &result("dense", &a.common, body, start)?,
        &summary,
    )
}
