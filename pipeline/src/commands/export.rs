//! `droppos-pipeline export`: a checkpoint to ONNX, written in Rust (no Python).
//!
//! Shapes come from the weights; what shapes cannot tell (head counts, the mask token type) comes
//! from the checkpoint's config metadata or from `--num-heads` / `--decoder-num-heads`.
//! `--random-init` exports a freshly initialised model of the same architecture instead (the
//! baseline the evaluations compare a trained model against).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use droppos_model::onnx::{self, ExternalData, HostTensor, Opset, Weights};
use droppos_model::{DropPosConfig, GlobalPool};
use serde::Serialize;
use serde_json::Value;

use crate::config::Recipe;

/// What to export.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum What {
    /// images [N,3,S,S] -> cls [N,D] (after the final norm), patch_tokens [N,L,D],
    /// feature_map [N,D,S/p,S/p].
    Encoder,
    /// images, ids_keep [N,K] (int64), mask_pos [N,K] (1 = position dropped) ->
    /// position_logits [N,K,L].
    Droppos,
    /// images [N,3,S,S] -> logits [N,classes]; needs weights with a classification head
    /// (`head.weight`, as timm and MAE / DropPos fine-tuning save them).
    Classifier,
}

/// Pooling of a classifier export (default: `avg` when the weights have `fc_norm`, else `token`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolArg {
    Token,
    Avg,
}

/// Where large initializers go.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExternalArg {
    /// `FILE.onnx.data` beside the model only past 1.5 GiB of weights (protobuf stops at 2 GiB).
    Auto,
    Always,
    Never,
}

#[derive(clap::Args, Debug)]
// One of the two is needed; the group makes clap's message name both.
#[command(group(clap::ArgGroup::new("source").required(true).args(["checkpoint", "config"])))]
pub struct Args {
    /// safetensors checkpoint with reference (timm / DropPos) parameter names, or a training
    /// checkpoint folder (`RUN/checkpoints/step-N`, its `model.safetensors` is read), or a run
    /// folder (its newest checkpoint). With --random-init only its config metadata is used.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Export a freshly initialised model (the trainer's initialisation, seeded by --seed)
    /// instead of trained weights; the architecture comes from --checkpoint's config metadata or
    /// from --config.
    #[arg(long)]
    pub random_init: bool,
    /// A training recipe (TOML) giving the architecture for --random-init.
    #[arg(long, requires = "random_init", conflicts_with = "checkpoint")]
    pub config: Option<PathBuf>,
    /// Seed of --random-init.
    #[arg(long, default_value_t = 0, requires = "random_init")]
    pub seed: i64,
    #[arg(long, value_enum)]
    pub what: What,
    /// The ONNX file to write (missing folders are made; see --external-data for large
    /// models).
    #[arg(long)]
    pub out: PathBuf,
    /// Encoder attention heads (default: the checkpoint's config metadata, else the standard
    /// count of timm's widths: 192 → 3, 384 → 6, 768 → 12, 1024 / 1280 → 16).
    #[arg(long)]
    pub num_heads: Option<i64>,
    /// Position-decoder attention heads (default: the checkpoint's config metadata, else 16 for
    /// the standard 512-d decoder).
    #[arg(long)]
    pub decoder_num_heads: Option<i64>,
    /// Input image size (default: what the checkpoint's pos_embed was made for). Another size
    /// resamples pos_embed bicubically (MAE's `interpolate_pos_embed`; encoder and classifier
    /// only: the DropPos head predicts the trained grid's positions).
    #[arg(long)]
    pub img_size: Option<i64>,
    /// Classifier pooling: class token or mean of the patch tokens (default: the checkpoint's
    /// config, else `avg` when it has `fc_norm`, else `token`, as timm decides).
    #[arg(long, value_enum)]
    pub global_pool: Option<PoolArg>,
    /// Classes of a `--random-init` classifier (the fine-tuning protocol's model: mean pooling,
    /// `fc_norm`, head ~ N(0, 2e-5)): a chance-level baseline for `eval classify`.
    #[arg(long, requires = "random_init")]
    pub num_classes: Option<i64>,
    /// ONNX opset: 17 or 20.
    #[arg(long, default_value_t = 17, value_parser = parse_opset)]
    pub opset: i64,
    #[arg(long, value_enum, default_value_t = ExternalArg::Auto)]
    pub external_data: ExternalArg,
}

fn parse_opset(s: &str) -> std::result::Result<i64, String> {
    match s {
        "17" => Ok(17),
        "20" => Ok(20),
        _ => Err("opset must be 17 (GELU via Erf) or 20 (Gelu op)".into()),
    }
}

/// The export report (printed as one JSON line).
#[derive(Debug, Serialize)]
pub struct Report {
    pub what: What,
    pub out: PathBuf,
    pub bytes: u64,
    pub external_data: Option<PathBuf>,
    pub external_data_bytes: u64,
    pub opset: i64,
    pub ir_version: i64,
    pub img_size: i64,
    pub num_heads: i64,
    /// A classifier's pooling (`token` / `avg`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_pool: Option<&'static str>,
    /// The seed of a `--random-init` export (absent for trained weights).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random_init_seed: Option<i64>,
    pub seconds: f64,
}

/// What the shapes cannot tell.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArchHints {
    pub num_heads: Option<i64>,
    pub decoder_num_heads: Option<i64>,
    pub img_size: Option<i64>,
    /// `param` (default), `zeros` or `wrong_pos`.
    pub mask_token_type: Option<String>,
    /// A classifier's pooling (`token` / `avg`).
    pub global_pool: Option<GlobalPool>,
}

/// Metadata keys a checkpoint may carry its config under (JSON: a DropPos config with
/// `encoder` / `decoder` tables, or a bare ViT config).
pub const CONFIG_KEYS: [&str; 3] = ["droppos_config", "config", "model_config"];

/// Reads head counts etc. from a config JSON (DropPos config or bare ViT config).
pub fn hints_from_config(v: &Value) -> ArchHints {
    let enc = v.get("encoder").unwrap_or(v);
    let int = |v: &Value, k: &str| v.get(k).and_then(Value::as_i64);
    ArchHints {
        num_heads: int(enc, "num_heads"),
        // Ours nests it (`decoder.num_heads`); the reference's flat config says
        // `decoder_num_heads`.
        decoder_num_heads: v
            .get("decoder")
            .and_then(|d| int(d, "num_heads"))
            .or_else(|| int(v, "decoder_num_heads")),
        img_size: int(enc, "img_size"),
        mask_token_type: v
            .get("mask_token_type")
            .and_then(Value::as_str)
            .map(str::to_string),
        global_pool: v.get("global_pool").and_then(|p| match p {
            Value::String(s) => GlobalPool::from_name(s).ok(),
            // MAE's models_vit: `global_pool=True` means mean pooling.
            Value::Bool(true) => Some(GlobalPool::Avg),
            Value::Bool(false) => Some(GlobalPool::Token),
            _ => None,
        }),
    }
}

fn hints_from_metadata(meta: &HashMap<String, String>) -> Result<ArchHints> {
    for k in CONFIG_KEYS {
        if let Some(text) = meta.get(k) {
            let v: Value = serde_json::from_str(text)
                .with_context(|| format!("checkpoint metadata `{k}` is not JSON"))?;
            return Ok(hints_from_config(&v));
        }
    }
    Ok(ArchHints::default())
}

/// A weights file from what the user named: the file itself, a checkpoint folder's
/// `model.safetensors`, or a run folder's newest checkpoint.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let direct = path.join("model.safetensors");
    if direct.is_file() {
        return Ok(direct);
    }
    let store = droppos_model::trainer::CheckpointStore::new(path);
    match store
        .latest()
        .with_context(|| format!("looking for checkpoints in {}", path.display()))?
    {
        Some(dir) => Ok(dir.join("model.safetensors")),
        None => bail!(
            "{} is a folder without model.safetensors or checkpoints/; name a safetensors file, a \
             checkpoint folder or a run folder",
            path.display()
        ),
    }
}

/// Loads a checkpoint's tensors (a DDP `module.` prefix is dropped) and its config hints.
pub fn load_checkpoint(path: &Path) -> Result<(Weights, ArchHints)> {
    let resolved = resolve_checkpoint(path)?;
    let path = resolved.as_path();
    let ctx = || format!("loading checkpoint {}", path.display());
    let meta = Weights::safetensors_metadata(path).with_context(ctx)?;
    let hints = hints_from_metadata(&meta)?;
    let raw = Weights::load_safetensors(path).with_context(ctx)?;
    let mut weights = Weights::new();
    for name in raw.names() {
        let t = raw.get(name)?.clone();
        // A NaN/inf weight (a diverged run saved by another tool) would export a model whose
        // every output is NaN, and the evaluations would score it as chance.
        if let Some(v) = t.data.iter().find(|v| !v.is_finite()) {
            bail!("{}: {name} holds a non-finite value ({v})", path.display());
        }
        weights.insert(name.strip_prefix("module.").unwrap_or(name), t);
    }
    onnx::check_supported(&weights).with_context(ctx)?;
    Ok((weights, hints))
}

/// The image size the weights' pos_embed was made for ([1, 1+L, D] with L a square).
pub fn trained_img_size(w: &Weights) -> Result<i64> {
    let pe = w.get("pos_embed")?;
    let p = w
        .get("patch_embed.proj.weight")?
        .dims
        .last()
        .copied()
        .unwrap_or(0);
    let l = pe.dims.get(1).copied().unwrap_or(0) - 1;
    let g = (l as f64).sqrt().round() as i64;
    if g <= 0 || g * g != l || p <= 0 {
        return Err(not_grid_plus_cls(&pe.dims));
    }
    Ok(g * p)
}

/// The encoder's head count: the checkpoint's config or `--num-heads`, else the standard one for
/// its width (with a warning).
pub fn encoder_heads(w: &Weights, hints: &ArchHints) -> Result<i64> {
    if let Some(h) = hints.num_heads {
        return Ok(h);
    }
    let d = w.get("patch_embed.proj.weight")?.dims[0];
    let h = standard_heads(d).ok_or_else(|| {
        anyhow!(
            "the encoder's head count is unknown (no config in the checkpoint, width {d} is not \
             a standard ViT width): pass --num-heads"
        )
    })?;
    tracing::warn!(
        "no head count in the checkpoint: using {h} heads, the standard for width {d} (timm \
         ViT-Ti/S/B/L/H); pass --num-heads if this model differs"
    );
    Ok(h)
}

/// A classifier's pooling when neither the checkpoint's config nor `--global-pool` says: timm's
/// default for the weights (`avg` with `fc_norm`, else `token`), with a warning, since timm
/// also builds models that pool otherwise.
fn guess_pool(w: &Weights) -> GlobalPool {
    let pool = if w.contains("fc_norm.weight") {
        GlobalPool::Avg
    } else {
        GlobalPool::Token
    };
    tracing::warn!(
        "no pooling in the checkpoint: using `{}` (timm's default for weights {} fc_norm); pass \
         --global-pool if this model pools otherwise",
        pool.as_str(),
        if pool == GlobalPool::Avg {
            "with"
        } else {
            "without"
        }
    );
    pool
}

/// Builds the ONNX model for `what` at image size `img` (the size pos_embed was made for).
pub fn build(
    w: &Weights,
    hints: &ArchHints,
    what: What,
    img: i64,
    opset: Opset,
) -> Result<onnx::proto::ModelProto> {
    let heads = encoder_heads(w, hints)?;
    let spec = onnx::EncoderSpec::infer(w, img, heads)?;
    let trained = trained_img_size(w)?;
    let mut w = w.clone();
    if img != trained {
        if what == What::Droppos {
            bail!(
                "the checkpoint's pos_embed is made for {trained}px images and the DropPos head \
                 predicts that grid's positions; export `droppos` at --img-size {trained}"
            );
        }
        let pe = resample_pos_embed(w.get("pos_embed")?, spec.grid())?;
        w.insert("pos_embed", pe);
    }
    Ok(match what {
        What::Encoder => onnx::encoder_model(&w, &spec, opset)?,
        What::Classifier => {
            let head = onnx::HeadSpec::infer(&w, &spec, hints.global_pool)?;
            onnx::classifier_model(&w, &spec, &head, opset)?
        }
        What::Droppos => {
            match hints.mask_token_type.as_deref() {
                None | Some("param") => {}
                Some("zeros") => {
                    let d = spec.embed_dim;
                    w.insert(
                        "mask_pos_token",
                        HostTensor::new(vec![1, 1, d], vec![0.0; d as usize])?,
                    );
                }
                Some(other) => bail!(
                    "mask_token_type {other} has no deterministic ONNX form (only param and zeros)"
                ),
            }
            let dh = match hints.decoder_num_heads {
                Some(h) => h,
                // The DropPos / MAE decoders (512-d) all use 16 heads.
                None if w.get("decoder_embed.weight")?.dims[0] == 512 => {
                    tracing::warn!(
                        "no decoder head count in the checkpoint: using 16, the DropPos / MAE \
                         decoders' for width 512; pass --decoder-num-heads if this one differs"
                    );
                    16
                }
                None => {
                    bail!("the position decoder's head count is unknown: pass --decoder-num-heads")
                }
            };
            let dec = onnx::DecoderSpec::infer(&w, dh)?;
            onnx::droppos_model(&w, &spec, &dec, opset)?
        }
    })
}

/// The error for a `pos_embed` that is not [1, 1 + g², D]: most often a timm model without a
/// class-token row (`class_token=False` or `no_embed_class=True`).
fn not_grid_plus_cls(dims: &[i64]) -> anyhow::Error {
    anyhow::anyhow!(
        "pos_embed {dims:?} is not a square grid plus a class-token row: models with a \
         non-square image size, or timm models built with class_token=False or \
         no_embed_class=True, are not supported (the graphs take square images and their `cls` \
         output is the class token)"
    )
}

/// pos_embed [1, 1+g², D] resampled to a `grid`² patch grid as MAE's `interpolate_pos_embed`
/// does it (bicubic, align_corners=False, no antialiasing); the cls row is kept.
pub fn resample_pos_embed(pe: &HostTensor, grid: i64) -> Result<HostTensor> {
    let [1, t, d] = pe.dims[..] else {
        bail!("pos_embed should be [1, 1+L, D], got {:?}", pe.dims);
    };
    let g = ((t - 1) as f64).sqrt().round() as i64;
    if g * g != t - 1 || grid <= 0 {
        return Err(not_grid_plus_cls(&pe.dims));
    }
    let (cls, rows) = pe.data.split_at(d as usize);
    let x = tch::Tensor::from_slice(rows)
        .reshape([1, g, g, d])
        .permute([0, 3, 1, 2]);
    let y = x
        .f_upsample_bicubic2d([grid, grid], false, None, None)
        .context("resampling pos_embed")?
        .permute([0, 2, 3, 1])
        .contiguous()
        .reshape([-1]);
    let mut data = cls.to_vec();
    data.extend(Vec::<f32>::try_from(&y).context("resampled pos_embed")?);
    Ok(HostTensor::new(vec![1, 1 + grid * grid, d], data)?)
}

/// Head count of timm's ViT widths (Ti 192, S 384, B 768, L 1024, H 1280), used when a
/// checkpoint carries no config.
pub fn standard_heads(width: i64) -> Option<i64> {
    match width {
        192 => Some(3),
        384 => Some(6),
        768 => Some(12),
        1024 | 1280 => Some(16),
        _ => None,
    }
}

/// The DropPos config a training checkpoint carries in its metadata.
fn config_from_checkpoint(path: &Path) -> Result<DropPosConfig> {
    let resolved = resolve_checkpoint(path)?;
    let meta = Weights::safetensors_metadata(&resolved)
        .with_context(|| format!("reading {}", resolved.display()))?;
    let text = meta.get("droppos_config").ok_or_else(|| {
        anyhow!(
            "{} carries no droppos_config metadata (only checkpoints written by `train` do); \
             use --config RECIPE.toml for --random-init",
            resolved.display()
        )
    })?;
    serde_json::from_str(text).context("checkpoint metadata `droppos_config`")
}

/// A freshly initialised DropPos model (seeded, as the trainer initialises it) and its hints.
pub fn random_init(cfg: &DropPosConfig, seed: i64) -> Result<(Weights, ArchHints)> {
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = droppos_model::DropPos::new(&vs.root(), cfg)?;
    let named = model.named_parameters();
    let weights = Weights::from_named_tensors(named.iter().map(|(n, t)| (n.clone(), t)))?;
    Ok((weights, hints_from_config(&serde_json::to_value(cfg)?)))
}

/// Trained weights, or a fresh initialisation of the named architecture.
fn source_weights(args: &Args) -> Result<(Weights, ArchHints)> {
    if !args.random_init {
        let ckpt = args
            .checkpoint
            .as_deref()
            .ok_or_else(|| anyhow!("--checkpoint is required (or --random-init --config)"))?;
        return load_checkpoint(ckpt);
    }
    let cfg = match (&args.config, &args.checkpoint) {
        (Some(recipe), _) => crate::train::droppos_task::model_config(&Recipe::load(recipe, &[])?)?,
        (None, Some(ckpt)) => config_from_checkpoint(ckpt)?,
        (None, None) => bail!("--random-init needs --config RECIPE.toml or --checkpoint RUN"),
    };
    if args.what == What::Classifier {
        let classes = args
            .num_classes
            .ok_or_else(|| anyhow!("--random-init --what classifier needs --num-classes"))?;
        return random_init_classifier(&cfg, classes, args.seed);
    }
    random_init(&cfg, args.seed)
}

/// A freshly initialised classifier (the fine-tuning protocol's form) on `cfg`'s encoder.
pub fn random_init_classifier(
    cfg: &DropPosConfig,
    num_classes: i64,
    seed: i64,
) -> Result<(Weights, ArchHints)> {
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let ccfg = droppos_model::ClassifierConfig::finetune(cfg.encoder.clone(), num_classes);
    let model = droppos_model::VitClassifier::new(&vs.root(), &ccfg)?;
    let named = model.named_parameters();
    let weights = Weights::from_named_tensors(named.iter().map(|(n, t)| (n.clone(), t)))?;
    let hints = ArchHints {
        global_pool: Some(ccfg.global_pool),
        ..hints_from_config(&serde_json::to_value(cfg)?)
    };
    Ok((weights, hints))
}

pub fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    let (weights, mut hints) = source_weights(&args)?;
    if args.num_heads.is_some() {
        hints.num_heads = args.num_heads;
    }
    if args.decoder_num_heads.is_some() {
        hints.decoder_num_heads = args.decoder_num_heads;
    }
    if let Some(p) = args.global_pool {
        hints.global_pool = Some(match p {
            PoolArg::Token => GlobalPool::Token,
            PoolArg::Avg => GlobalPool::Avg,
        });
    }
    let img = match args.img_size {
        Some(s) => s,
        None => trained_img_size(&weights)?,
    };
    let opset = Opset::from_version(args.opset)?;
    // Resolved once, so that the report says what the graph uses.
    hints.num_heads = Some(encoder_heads(&weights, &hints)?);
    if args.what == What::Classifier && hints.global_pool.is_none() {
        hints.global_pool = Some(guess_pool(&weights));
    }
    let model = build(&weights, &hints, args.what, img, opset)?;
    let policy = match args.external_data {
        ExternalArg::Auto => ExternalData::Auto,
        ExternalArg::Always => ExternalData::Always,
        ExternalArg::Never => ExternalData::Never,
    };
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let written = onnx::write_model(model, &args.out, policy)?;
    let report = Report {
        what: args.what,
        out: written.model_path,
        bytes: written.model_bytes,
        external_data_bytes: written.data.as_ref().map_or(0, |d| d.1),
        external_data: written.data.map(|d| d.0),
        opset: opset.version(),
        ir_version: onnx::IR_VERSION,
        img_size: img,
        num_heads: hints.num_heads.unwrap_or_default(),
        global_pool: (args.what == What::Classifier)
            .then(|| hints.global_pool.map(GlobalPool::as_str))
            .flatten(),
        random_init_seed: args.random_init.then_some(args.seed),
        seconds: start.elapsed().as_secs_f64(),
    };
    tracing::info!(
        "exported the {} to {} ({:.1} MB) in {:.2} s",
        match report.what {
            What::Encoder => "encoder",
            What::Droppos => "DropPos position model",
            What::Classifier => "classifier",
        },
        report.out.display(),
        (report.bytes + report.external_data_bytes) as f64 / 1e6,
        report.seconds
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
