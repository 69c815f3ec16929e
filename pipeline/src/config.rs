//! Training recipes: TOML files under `configs/` plus `--set key=value` overrides.
//!
//! A recipe names every knob explicitly (no hidden presets), so the file alone says what ran;
//! the resolved recipe is written into each run directory and checkpoint. Overrides use dotted
//! paths (`--set optim.blr=1e-4`); a path must name an existing key and the value must fit its
//! type, so a typo fails loudly instead of being ignored.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// One complete training recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Free-form description, e.g. "DropPos ViT-B/16, 200 epochs (paper)".
    #[serde(default)]
    pub description: String,
    pub model: ModelConfig,
    pub droppos: DropPosConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

/// The ViT encoder and the DropPos decoder (SPEC §1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub img_size: i64,
    pub patch_size: i64,
    pub embed_dim: i64,
    pub depth: i64,
    pub num_heads: i64,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    pub decoder_embed_dim: i64,
    pub decoder_depth: i64,
    pub decoder_num_heads: i64,
    /// What stands in for a dropped position: `param`, `zeros` or `wrong_pos`.
    #[serde(default = "default_mask_token_type")]
    pub mask_token_type: String,
    /// Adds the MAE auxiliary decoder; loss = pos_weight·L_pos + L_mae.
    #[serde(default)]
    pub multi_task: bool,
    #[serde(default = "one")]
    pub pos_weight: f64,
    #[serde(default = "default_aux_dim")]
    pub aux_decoder_embed_dim: i64,
    #[serde(default = "default_aux_depth")]
    pub aux_decoder_depth: i64,
    #[serde(default = "default_aux_heads")]
    pub aux_decoder_num_heads: i64,
    /// `fused` (scaled_dot_product_attention) or `explicit` (the reference's softmax(QKᵀ)V).
    #[serde(default = "default_attention")]
    pub attention: String,
}

/// The pre-text task: masking, position dropping, smoothing, attention guide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropPosConfig {
    pub mask_ratio: f64,
    pub pos_mask_ratio: f64,
    /// σ0 of the position smoothing map; 0 disables smoothing.
    pub sigma: f64,
    /// σ_e = (1 − e/epochs)·σ0.
    pub sigma_decay: bool,
    pub attn_guide: bool,
    /// `model` (the model's own grid, correct) or `reference` (the reference engine's map).
    #[serde(default = "default_smooth_grid")]
    pub smooth_grid: String,
    /// `fp32` (reference numerics) or `bf16` (the attention guide's no-grad pass under CPU bf16
    /// autocast: several times faster on CPUs with AMX / AVX512-BF16).
    #[serde(default = "default_guide_precision")]
    pub guide_precision: String,
}

/// AdamW with the reference's parameter groups and per-parameter clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Base learning rate; the applied peak lr is blr × global batch / 256.
    pub blr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Per-parameter gradient L2 clip; 0 disables clipping.
    pub clip_grad: f64,
    pub warmup_epochs: f64,
}

/// Epochs and batch geometry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: u64,
    /// Micro-batch per process (per GPU).
    pub batch_size: u64,
    /// Micro-batches accumulated per optimizer step. 0 derives it from `global_batch`.
    #[serde(default)]
    pub accum_iter: u64,
    /// Images per optimizer step over all processes. 0 means batch_size × world × accum_iter.
    #[serde(default)]
    pub global_batch: u64,
    /// Stop after this many optimizer steps (0 = run all epochs); for smoke tests and demos.
    #[serde(default)]
    pub max_steps: u64,
    /// Seed for masking noise, initialisation and the loader.
    #[serde(default)]
    pub seed: u64,
}

/// Loader settings; the data directory itself comes from `--data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// RandomResizedCrop area range.
    pub crop_scale_min: f64,
    pub crop_scale_max: f64,
    pub hflip: bool,
    /// Decode/augment threads (0 = let the loader decide).
    pub workers: u64,
    /// Batches prepared ahead of the trainer.
    pub prefetch: u64,
    /// How ranks share an epoch: `strided` (torch's DistributedSampler: W ranks × batch B train
    /// exactly like one process × W·B) or `contiguous` (each rank reads ~1/W of the row groups:
    /// less I/O on shared storage, but a step's samples depend on W).
    pub rank_partition: String,
    /// A sample whose image cannot be decoded: `skip` (logged with shard and key, replaced by
    /// the next sample of the order) or `fail` (stop the run with an error naming it).
    pub on_error: String,
}

/// When and how many checkpoints to keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every N optimizer steps (0 = only at epoch end and on interruption).
    pub every_steps: u64,
    /// Save at the end of every epoch.
    pub every_epoch: bool,
    /// Keep the newest K checkpoints (at least 1).
    pub keep_last: u64,
}

/// Device and logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `auto` (bf16 autocast on CUDA, fp32 on CPU), `fp32` or `bf16`.
    pub precision: String,
    /// Intra-op CPU threads for libtorch (0 = libtorch's default).
    pub threads: u64,
    /// Write a metrics line every N optimizer steps.
    pub log_every: u64,
    /// Show a progress bar (also off when stderr is not a terminal).
    pub progress: bool,
}

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_mask_token_type() -> String {
    "param".into()
}
fn one() -> f64 {
    1.0
}
fn default_aux_dim() -> i64 {
    512
}
fn default_aux_depth() -> i64 {
    8
}
fn default_aux_heads() -> i64 {
    16
}
fn default_attention() -> String {
    "fused".into()
}
fn default_smooth_grid() -> String {
    "model".into()
}
fn default_guide_precision() -> String {
    "fp32".into()
}
fn default_eps() -> f64 {
    1e-8
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            crop_scale_min: 0.2,
            crop_scale_max: 1.0,
            hflip: true,
            workers: 0,
            prefetch: 2,
            rank_partition: "strided".into(),
            on_error: "skip".into(),
        }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every_steps: 1000,
            every_epoch: true,
            keep_last: 3,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            device: "auto".into(),
            precision: "auto".into(),
            threads: 0,
            log_every: 1,
            progress: true,
        }
    }
}

impl Recipe {
    /// Reads a recipe file and applies `key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading recipe {}", path.display()))?;
        Self::parse(&text, overrides).with_context(|| format!("in recipe {}", path.display()))
    }

    /// Parses recipe text and applies `key=value` overrides.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self> {
        let recipe: Recipe = toml::from_str(text).context("parsing the recipe")?;
        if overrides.is_empty() {
            recipe.validate()?;
            return Ok(recipe);
        }
        // Round-trip through the full table so that keys left at their defaults can be set too.
        let mut table = toml::Table::try_from(&recipe).context("re-encoding the recipe")?;
        for item in overrides {
            apply_override(&mut table, item)?;
        }
        let recipe: Recipe = toml::Value::Table(table)
            .try_into()
            .context("applying --set overrides")?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// The recipe as TOML (what a run directory and each checkpoint store).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a recipe always encodes as TOML")
    }

    /// Semantic checks serde cannot express.
    pub fn validate(&self) -> Result<()> {
        // NaN passes every `<` / `>` check below (each comparison is false), and an infinite
        // rate trains on NaN: every real-valued setting must be a finite number first.
        for (name, v) in [
            ("model.mlp_ratio", self.model.mlp_ratio),
            ("model.pos_weight", self.model.pos_weight),
            ("droppos.mask_ratio", self.droppos.mask_ratio),
            ("droppos.pos_mask_ratio", self.droppos.pos_mask_ratio),
            ("droppos.sigma", self.droppos.sigma),
            ("optim.blr", self.optim.blr),
            ("optim.min_lr", self.optim.min_lr),
            ("optim.weight_decay", self.optim.weight_decay),
            ("optim.beta1", self.optim.beta1),
            ("optim.beta2", self.optim.beta2),
            ("optim.eps", self.optim.eps),
            ("optim.clip_grad", self.optim.clip_grad),
            ("optim.warmup_epochs", self.optim.warmup_epochs),
            ("data.crop_scale_min", self.data.crop_scale_min),
            ("data.crop_scale_max", self.data.crop_scale_max),
        ] {
            if !v.is_finite() {
                bail!("{name} must be a finite number, got {v}");
            }
        }
        // A mistyped count would start that many threads (100,000 hung the machine).
        for (name, v) in [
            ("runtime.threads", self.runtime.threads),
            ("data.workers", self.data.workers),
        ] {
            if v > crate::cli::MAX_THREADS as u64 {
                bail!("{name} {v} is beyond {}", crate::cli::MAX_THREADS);
            }
        }
        let m = &self.model;
        for (name, v) in [
            ("model.img_size", m.img_size),
            ("model.patch_size", m.patch_size),
            ("model.embed_dim", m.embed_dim),
            ("model.depth", m.depth),
            ("model.num_heads", m.num_heads),
            ("model.decoder_embed_dim", m.decoder_embed_dim),
            ("model.decoder_depth", m.decoder_depth),
            ("model.decoder_num_heads", m.decoder_num_heads),
        ] {
            if v <= 0 {
                bail!("{name} must be positive, got {v}");
            }
        }
        if m.img_size % m.patch_size != 0 {
            bail!(
                "model.img_size {} is not a multiple of model.patch_size {}",
                m.img_size,
                m.patch_size
            );
        }
        if m.embed_dim % m.num_heads != 0 {
            bail!(
                "model.embed_dim {} is not divisible by model.num_heads {}",
                m.embed_dim,
                m.num_heads
            );
        }
        if m.decoder_embed_dim % m.decoder_num_heads != 0 {
            bail!(
                "model.decoder_embed_dim {} is not divisible by model.decoder_num_heads {}",
                m.decoder_embed_dim,
                m.decoder_num_heads
            );
        }
        one_of(
            "model.mask_token_type",
            &m.mask_token_type,
            &["param", "zeros", "wrong_pos"],
        )?;
        one_of("model.attention", &m.attention, &["fused", "explicit"])?;
        one_of(
            "droppos.smooth_grid",
            &self.droppos.smooth_grid,
            &["model", "reference"],
        )?;
        one_of(
            "data.rank_partition",
            &self.data.rank_partition,
            &["strided", "contiguous"],
        )?;
        one_of("data.on_error", &self.data.on_error, &["skip", "fail"])?;
        one_of(
            "droppos.guide_precision",
            &self.droppos.guide_precision,
            &["fp32", "bf16"],
        )?;
        let d = &self.droppos;
        for (name, r) in [
            ("droppos.mask_ratio", d.mask_ratio),
            ("droppos.pos_mask_ratio", d.pos_mask_ratio),
        ] {
            if !(0.0..1.0).contains(&r) {
                bail!("{name} must be in [0, 1), got {r}");
            }
        }
        if d.sigma < 0.0 {
            bail!("droppos.sigma must be >= 0, got {}", d.sigma);
        }
        // exp(-d²/σ²) of a tiny σ is 0/0 on the map's diagonal: NaN targets, whose NaN loss
        // would then be blamed on the learning rate.
        if d.sigma > 0.0 && d.sigma < 1e-3 {
            bail!(
                "droppos.sigma {} is too small to smooth anything; use 0 for no smoothing",
                d.sigma
            );
        }
        let o = &self.optim;
        if o.blr <= 0.0 || o.min_lr < 0.0 || o.weight_decay < 0.0 || o.clip_grad < 0.0 {
            bail!("optim: blr must be > 0 and min_lr, weight_decay, clip_grad >= 0");
        }
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            bail!("optim.beta1 and optim.beta2 must be in [0, 1)");
        }
        if o.warmup_epochs < 0.0 {
            bail!("optim.warmup_epochs must be >= 0");
        }
        if o.eps <= 0.0 {
            bail!(
                "optim.eps must be > 0, got {} (AdamW divides by sqrt(v) + eps)",
                o.eps
            );
        }
        let t = &self.train;
        if t.epochs == 0 || t.batch_size == 0 {
            bail!("train.epochs and train.batch_size must be positive");
        }
        if t.accum_iter == 0 && t.global_batch == 0 {
            bail!("set train.accum_iter (> 0) or train.global_batch (> 0)");
        }
        if self.checkpoint.keep_last == 0 {
            bail!("checkpoint.keep_last must be at least 1");
        }
        if self.runtime.log_every == 0 {
            bail!("runtime.log_every must be at least 1");
        }
        one_of(
            "runtime.precision",
            &self.runtime.precision,
            &["auto", "fp32", "bf16"],
        )?;
        let dev = self.runtime.device.as_str();
        let cuda_index = dev
            .strip_prefix("cuda:")
            .map(|i| i.parse::<usize>().is_ok());
        if !matches!(dev, "auto" | "cpu" | "cuda") && cuda_index != Some(true) {
            bail!("runtime.device must be auto, cpu, cuda or cuda:N, got `{dev}`");
        }
        if self.data.crop_scale_min <= 0.0 || self.data.crop_scale_min > self.data.crop_scale_max {
            bail!("data.crop_scale_min must be in (0, data.crop_scale_max]");
        }
        Ok(())
    }

    /// Number of patches L per image.
    pub fn num_patches(&self) -> i64 {
        let g = self.model.img_size / self.model.patch_size;
        g * g
    }

    /// Batch geometry for a world of `world_size` processes.
    pub fn batch_plan(&self, world_size: u64) -> Result<BatchPlan> {
        let t = &self.train;
        let per_step = t.batch_size * world_size;
        let accum = if t.accum_iter > 0 {
            t.accum_iter
        } else {
            if !t.global_batch.is_multiple_of(per_step) {
                bail!(
                    "train.global_batch {} is not a multiple of batch_size {} × world size {}; \
                     set train.accum_iter or change train.batch_size",
                    t.global_batch,
                    t.batch_size,
                    world_size
                );
            }
            t.global_batch / per_step
        };
        let global = per_step * accum;
        if t.global_batch > 0 && t.global_batch != global {
            bail!(
                "train.global_batch {} ≠ batch_size {} × world size {} × accum_iter {} = {global}; \
                 set train.accum_iter=0 to derive it",
                t.global_batch,
                t.batch_size,
                world_size,
                accum
            );
        }
        Ok(BatchPlan {
            micro_batch: t.batch_size,
            world_size,
            accum_iter: accum,
            global_batch: global,
            lr: self.optim.blr * global as f64 / 256.0,
        })
    }
}

/// How a recipe's batch maps onto processes, micro-batches and the learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BatchPlan {
    pub micro_batch: u64,
    pub world_size: u64,
    pub accum_iter: u64,
    pub global_batch: u64,
    /// Peak learning rate: blr × global_batch / 256.
    pub lr: f64,
}

fn one_of(name: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if !allowed.contains(&value) {
        bail!(
            "{name} must be one of {}, got `{value}`",
            allowed.join(", ")
        );
    }
    Ok(())
}

/// Applies one `dotted.key=value` to the full recipe table.
fn apply_override(table: &mut toml::Table, item: &str) -> Result<()> {
    let Some((key, raw)) = item.split_once('=') else {
        bail!("--set expects key=value, got `{item}`");
    };
    let key = key.trim();
    let raw = raw.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set: malformed key `{key}`");
    }
    let mut node = table;
    for (i, part) in parts.iter().enumerate() {
        let here = parts[..i].join(".");
        let valid = || {
            let mut keys: Vec<&str> = node.keys().map(String::as_str).collect();
            keys.sort_unstable();
            keys.join(", ")
        };
        if !node.contains_key(*part) {
            let scope = if here.is_empty() {
                "the recipe".to_string()
            } else {
                format!("[{here}]")
            };
            bail!("--set: unknown key `{key}` ({scope} has: {})", valid());
        }
        if i + 1 == parts.len() {
            let old = &node[*part];
            if old.is_table() {
                bail!(
                    "--set: `{key}` is a section; set one of its keys, e.g. `{key}.{}`",
                    {
                        let t = old.as_table().expect("checked");
                        t.keys().next().cloned().unwrap_or_default()
                    }
                );
            }
            let new =
                parse_value(raw, old).with_context(|| format!("--set {key}: bad value `{raw}`"))?;
            node.insert((*part).to_string(), new);
            return Ok(());
        }
        node = match node.get_mut(*part) {
            Some(toml::Value::Table(t)) => t,
            _ => bail!("--set: `{}` is not a section", parts[..=i].join(".")),
        };
    }
    unreachable!("the loop returns at the last key part")
}

/// Parses `raw` as a TOML value of the same type as `old`.
fn parse_value(raw: &str, old: &toml::Value) -> Result<toml::Value> {
    use toml::Value as V;
    let parsed: Option<V> = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    let got = match (old, parsed) {
        (V::String(_), Some(V::String(s))) => V::String(s),
        // Bare words are strings: `--set runtime.device=cuda`.
        (V::String(_), _) => V::String(raw.to_string()),
        (V::Float(_), Some(V::Float(f))) => V::Float(f),
        (V::Float(_), Some(V::Integer(i))) => V::Float(i as f64),
        (V::Integer(_), Some(V::Integer(i))) => V::Integer(i),
        (V::Boolean(_), Some(V::Boolean(b))) => V::Boolean(b),
        (V::Array(_), Some(V::Array(a))) => V::Array(a),
        (old, _) => bail!("expected {}", old.type_str()),
    };
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipes_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
    }

    fn tiny() -> String {
        std::fs::read_to_string(recipes_dir().join("tiny-cpu.toml")).unwrap()
    }

    #[test]
    fn every_bundled_recipe_parses_and_validates() {
        let mut n = 0;
        for entry in std::fs::read_dir(recipes_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) == Some("toml") {
                Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                n += 1;
            }
        }
        assert!(
            n >= 4,
            "expected the three paper recipes and tiny-cpu, found {n}"
        );
    }

    #[test]
    fn paper_recipes_match_spec() {
        // (file, embed_dim, depth, heads, epochs, warmup, global batch) from SPEC §1.
        let rows = [
            ("vit_base_16_200ep.toml", 768, 12, 12, 200, 10.0, 2048),
            ("vit_base_16_800ep.toml", 768, 12, 12, 800, 10.0, 2048),
            ("vit_large_16_800ep.toml", 1024, 24, 16, 800, 40.0, 1024),
        ];
        for (file, dim, depth, heads, epochs, warmup, global) in rows {
            let r = Recipe::load(&recipes_dir().join(file), &[]).unwrap();
            let m = &r.model;
            assert_eq!((m.img_size, m.patch_size), (224, 16), "{file}");
            assert_eq!(
                (m.embed_dim, m.depth, m.num_heads),
                (dim, depth, heads),
                "{file}"
            );
            assert_eq!(
                (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads),
                (512, 2, 16)
            );
            assert_eq!(m.mask_token_type, "param");
            assert!(!m.multi_task);
            let d = &r.droppos;
            assert_eq!(
                (d.mask_ratio, d.pos_mask_ratio, d.sigma),
                (0.75, 0.75, 1.0),
                "{file}"
            );
            assert!(d.sigma_decay && d.attn_guide, "{file}");
            assert_eq!(d.smooth_grid, "model");
            let o = &r.optim;
            assert_eq!(
                (o.blr, o.weight_decay, o.beta1, o.beta2),
                (1.5e-4, 0.05, 0.9, 0.95)
            );
            assert_eq!((o.clip_grad, o.warmup_epochs), (5.0, warmup), "{file}");
            assert_eq!(r.train.epochs, epochs, "{file}");
            assert_eq!((r.data.crop_scale_min, r.data.crop_scale_max), (0.2, 1.0));
            for world in [1, 8] {
                let plan = r.batch_plan(world).unwrap();
                assert_eq!(plan.global_batch, global, "{file} on {world}");
                assert!((plan.lr - 1.5e-4 * global as f64 / 256.0).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn overrides_set_nested_keys_with_types() {
        let r = Recipe::parse(
            &tiny(),
            &[
                "train.epochs=7".into(),
                "optim.blr=2".into(), // integer into a float field
                "runtime.device=cpu".into(),
                "droppos.attn_guide=false".into(),
                "model.attention=\"explicit\"".into(),
                "checkpoint.keep_last = 5".into(),
            ],
        )
        .unwrap();
        assert_eq!(r.train.epochs, 7);
        assert_eq!(r.optim.blr, 2.0);
        assert_eq!(r.runtime.device, "cpu");
        assert!(!r.droppos.attn_guide);
        assert_eq!(r.model.attention, "explicit");
        assert_eq!(r.checkpoint.keep_last, 5);
    }

    #[test]
    fn overrides_reach_keys_left_at_defaults() {
        let base = Recipe::parse(&tiny(), &[]).unwrap();
        let r = Recipe::parse(&tiny(), &["optim.eps=1e-6".into()]).unwrap();
        assert_eq!(r.optim.eps, 1e-6);
        assert_eq!(
            Recipe {
                optim: base.optim.clone(),
                ..r.clone()
            },
            base
        );
    }

    fn err(overrides: &[&str]) -> String {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        format!("{:#}", Recipe::parse(&tiny(), &o).unwrap_err())
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        let e = err(&["train.epoch=3"]);
        assert!(
            e.contains("unknown key `train.epoch`") && e.contains("epochs"),
            "{e}"
        );
        let e = err(&["trian.epochs=3"]);
        assert!(
            e.contains("unknown key `trian.epochs`") && e.contains("train"),
            "{e}"
        );
        let e = err(&["train.epochs=many"]);
        assert!(
            e.contains("train.epochs") && e.contains("expected integer"),
            "{e}"
        );
        let e = err(&["droppos.attn_guide=1"]);
        assert!(e.contains("expected boolean"), "{e}");
        let e = err(&["train"]);
        assert!(e.contains("key=value"), "{e}");
        let e = err(&["train=3"]);
        assert!(e.contains("is a section"), "{e}");
        let e = err(&["droppos.mask_ratio=1.5"]);
        assert!(e.contains("droppos.mask_ratio must be in [0, 1)"), "{e}");
        let e = err(&["model.attention=flash"]);
        assert!(
            e.contains("model.attention must be one of fused, explicit"),
            "{e}"
        );
        let e = err(&["train.epochs=-1"]);
        assert!(e.contains("overrides"), "{e}");
        let e = err(&["runtime.device=gpu"]);
        assert!(e.contains("runtime.device"), "{e}");
        // Non-finite numbers pass every range comparison: refused by name.
        for (set, name) in [
            ("optim.blr=nan", "optim.blr"),
            ("optim.blr=inf", "optim.blr"),
            ("optim.weight_decay=nan", "optim.weight_decay"),
            ("optim.warmup_epochs=nan", "optim.warmup_epochs"),
            ("data.crop_scale_min=nan", "data.crop_scale_min"),
        ] {
            let e = err(&[set]);
            assert!(
                e.contains(&format!("{name} must be a finite number")),
                "{set}: {e}"
            );
        }
        let e = err(&["droppos.sigma=1e-300"]);
        assert!(e.contains("use 0 for no smoothing"), "{e}");
        for eps in ["optim.eps=0", "optim.eps=-1"] {
            let e = err(&[eps]);
            assert!(e.contains("optim.eps must be > 0"), "{eps}: {e}");
        }
    }

    #[test]
    fn unknown_keys_in_the_file_are_rejected() {
        let text = tiny().replace("[train]", "[train]\nepoch = 3");
        let e = format!("{:#}", Recipe::parse(&text, &[]).unwrap_err());
        assert!(e.contains("unknown field `epoch`"), "{e}");
    }

    #[test]
    fn batch_plan_derives_accumulation_and_lr() {
        let r = Recipe::parse(
            &tiny(),
            &[
                "train.batch_size=64".into(),
                "train.accum_iter=0".into(),
                "train.global_batch=2048".into(),
            ],
        )
        .unwrap();
        let p = r.batch_plan(8).unwrap();
        assert_eq!((p.accum_iter, p.global_batch), (4, 2048));
        assert!((p.lr - r.optim.blr * 8.0).abs() < 1e-15);
        let e = format!("{:#}", r.batch_plan(3).unwrap_err());
        assert!(e.contains("not a multiple"), "{e}");
        let r = Recipe::parse(
            &tiny(),
            &[
                "train.batch_size=8".into(),
                "train.accum_iter=2".into(),
                "train.global_batch=0".into(),
            ],
        )
        .unwrap();
        let p = r.batch_plan(2).unwrap();
        assert_eq!((p.accum_iter, p.global_batch), (2, 32));
        let r = Recipe::parse(
            &tiny(),
            &[
                "train.batch_size=8".into(),
                "train.accum_iter=2".into(),
                "train.global_batch=64".into(),
            ],
        )
        .unwrap();
        assert!(format!("{:#}", r.batch_plan(1).unwrap_err()).contains("≠"));
    }

    #[test]
    fn to_toml_round_trips() {
        let r = Recipe::parse(&tiny(), &["train.epochs=9".into()]).unwrap();
        assert_eq!(Recipe::parse(&r.to_toml(), &[]).unwrap(), r);
    }
}
