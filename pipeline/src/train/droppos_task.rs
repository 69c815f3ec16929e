//! The DropPos model + AdamW (from the model crate) as the loop's [`PretrainTask`].

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use droppos_model::checkpoint::load_into;
use droppos_model::optim::{AdamW, AdamWConfig};
use droppos_model::trainer::SampleNoise;
use droppos_model::{
    AttentionImpl, DecoderConfig, DropPos, DropPosConfig, GuidePrecision, MaskTokenType,
    SmoothGrid, VitConfig,
};
use tch::{nn::VarStore, Device, Tensor};

use super::task::{Forward, PretrainTask};
use crate::config::Recipe;

/// The recipe's model and pre-text sections as the model crate's configuration.
pub fn model_config(r: &Recipe) -> Result<DropPosConfig> {
    let m = &r.model;
    let d = &r.droppos;
    let attention = match m.attention.as_str() {
        "explicit" => AttentionImpl::Explicit,
        _ => AttentionImpl::Fused,
    };
    let encoder = VitConfig {
        img_size: m.img_size,
        patch_size: m.patch_size,
        in_chans: 3,
        embed_dim: m.embed_dim,
        depth: m.depth,
        num_heads: m.num_heads,
        mlp_ratio: m.mlp_ratio,
        layer_norm_eps: 1e-6,
        attention,
    };
    let decoder = DecoderConfig {
        embed_dim: m.decoder_embed_dim,
        depth: m.decoder_depth,
        num_heads: m.decoder_num_heads,
    };
    let mut cfg = DropPosConfig::new(encoder, decoder);
    cfg.mask_ratio = d.mask_ratio;
    cfg.pos_mask_ratio = d.pos_mask_ratio;
    cfg.sigma = d.sigma;
    cfg.sigma_decay = d.sigma_decay;
    cfg.attn_guide = d.attn_guide;
    cfg.multi_task = m.multi_task;
    cfg.pos_weight = m.pos_weight;
    cfg.mask_token_type = match m.mask_token_type.as_str() {
        "zeros" => MaskTokenType::Zeros,
        "wrong_pos" => MaskTokenType::WrongPos,
        _ => MaskTokenType::Param,
    };
    cfg.guide_precision = if d.guide_precision == "bf16" {
        GuidePrecision::Bf16
    } else {
        GuidePrecision::Fp32
    };
    cfg.smooth_grid = if d.smooth_grid == "reference" {
        SmoothGrid::Reference
    } else {
        SmoothGrid::Model
    };
    cfg.validate().context("model configuration")?;
    Ok(cfg)
}

/// DropPos with its optimizer, on one device.
pub struct DropPosTask {
    _vs: VarStore,
    model: DropPos,
    opt: AdamW,
    clip: f64,
    device: Device,
    /// Smoothing map cached per σ (it changes once per epoch).
    smooth: Option<(f64, Tensor)>,
    keep: (i64, i64),
    num_patches: i64,
    config: DropPosConfig,
}

impl DropPosTask {
    /// Builds the model with the reference initialisation seeded by `train.seed`.
    pub fn new(recipe: &Recipe, device: Device) -> Result<Self> {
        let cfg = model_config(recipe)?;
        tch::manual_seed(recipe.train.seed as i64);
        let vs = VarStore::new(device);
        let model = DropPos::new(&vs.root(), &cfg).context("building the DropPos model")?;
        let o = &recipe.optim;
        let opt = AdamW::new(
            model.trainable_parameters(),
            AdamWConfig {
                lr: 0.0,
                beta1: o.beta1,
                beta2: o.beta2,
                eps: o.eps,
                weight_decay: o.weight_decay,
            },
        );
        let keep = cfg.keep_counts();
        Ok(Self {
            _vs: vs,
            model,
            opt,
            clip: o.clip_grad,
            device,
            smooth: None,
            keep,
            num_patches: cfg.encoder.num_patches(),
            config: cfg,
        })
    }

    /// Loads weights saved by the reference (a PyTorch `state_dict` as safetensors) or by us.
    pub fn load_weights(&mut self, path: &Path) -> Result<()> {
        let (tensors, _) = droppos_model::checkpoint::load(path)?;
        load_into(&self.model.named_parameters(), &tensors, true, path)?;
        Ok(())
    }
}

impl PretrainTask for DropPosTask {
    fn forward(&mut self, images: &Tensor, noise: &SampleNoise, sigma: f64) -> Result<Forward> {
        let n = images.size()[0];
        if self.smooth.as_ref().map(|(s, _)| *s) != Some(sigma) {
            self.smooth = Some((sigma, self.model.smoothing_map(sigma)?));
        }
        anyhow::ensure!(
            noise.len() as i64 == n,
            "noise for {} samples, batch of {n}",
            noise.len()
        );
        // Any use of libtorch's global generator inside the model (e.g. `wrong_pos` shuffles) is
        // seeded from the batch's samples, so it replays exactly on resume too.
        tch::manual_seed(noise.batch_seed());
        let noise_patch = noise.uniform(0, self.num_patches, self.device);
        let noise_pos = noise.uniform(1, self.keep.0, self.device);
        let smooth = &self.smooth.as_ref().expect("set above").1;
        let out = self
            .model
            .forward_train(images, &noise_patch, &noise_pos, smooth)?;
        Ok(Forward {
            acc1: out.acc1.double_value(&[]),
            loss: out.loss,
        })
    }

    fn optimizer_step(&mut self, lr: f64) -> Result<bool> {
        // The clipping's per-parameter norms say whether every gradient is finite (one check
        // of a few hundred numbers); without clipping they are computed for the check alone.
        let norms = if self.clip > 0.0 {
            self.opt.clip_grad_per_param(self.clip).norms
        } else {
            self.opt.grad_norms()
        };
        if norms.numel() > 0 && !bool::try_from(norms.isfinite().all())? {
            self.opt.zero_grad();
            return Ok(false);
        }
        self.opt.set_lr(lr);
        self.opt.step();
        self.opt.zero_grad();
        Ok(true)
    }

    fn zero_grad(&mut self) {
        self.opt.zero_grad();
    }

    fn trainable_parameters(&self) -> Vec<Tensor> {
        self.model
            .trainable_parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }

    fn model_tensors(&self) -> Vec<(String, Tensor)> {
        self.model.named_parameters()
    }

    fn model_metadata(&self) -> HashMap<String, String> {
        let config = serde_json::to_string(&self.config).expect("model config encodes as JSON");
        // One key only: safetensors serialises metadata from a HashMap, so several keys would
        // make the header's byte order (and the file's hash) vary from run to run.
        HashMap::from([("droppos_config".to_string(), config)])
    }

    fn optimizer_tensors(&self) -> Vec<(String, Tensor)> {
        self.opt.state_tensors()
    }

    fn load(&mut self, model: &[(String, Tensor)], optimizer: &[(String, Tensor)]) -> Result<()> {
        load_into(
            &self.model.named_parameters(),
            model,
            true,
            Path::new("checkpoint"),
        )?;
        self.opt.load_state_tensors(
            &optimizer
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Checkpoints move both ways between this crate and PyTorch: ours load by name into timm's
    //! ViT and into a module laid out like the official DropPos model, and a state_dict saved by
    //! PyTorch as safetensors loads here. Needs the venv's python (torch, timm, safetensors);
    //! skipped only when no python is found at all.

    use std::process::Command;

    use super::*;
    use crate::train::run::load_resume;
    use droppos_model::trainer::{Checkpoint, CheckpointStore, TrainState};

    const PY_MODEL: &str = r#"
import sys, json, functools, torch
from torch import nn
from timm.models.vision_transformer import PatchEmbed, Block, VisionTransformer
a = json.loads(sys.argv[2])
D, Dd, L = a["D"], a["Dd"], (a["img"] // a["p"]) ** 2
norm = functools.partial(nn.LayerNorm, eps=1e-6)
class DropPosRef(nn.Module):
    # The official models_DropPos_mae.DropPos's module layout (names and shapes).
    def __init__(s):
        super().__init__()
        s.patch_embed = PatchEmbed(a["img"], a["p"], 3, D)
        s.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        s.pos_embed = nn.Parameter(torch.zeros(1, L + 1, D), requires_grad=False)
        s.mask_pos_token = nn.Parameter(torch.zeros(1, 1, D))
        s.blocks = nn.ModuleList([Block(D, a["H"], 4.0, qkv_bias=True, norm_layer=norm) for _ in range(a["depth"])])
        s.norm = norm(D)
        s.decoder_embed = nn.Linear(D, Dd)
        s.decoder_blocks = nn.ModuleList([Block(Dd, a["dH"], 4.0, qkv_bias=True, norm_layer=norm) for _ in range(a["ddepth"])])
        s.decoder_norm = norm(Dd)
        s.decoder_pred = nn.Linear(Dd, L)
"#;

    fn python() -> Option<String> {
        let py = std::env::var("DROPPOS_PYTHON").unwrap_or_else(|_| "python3".into());
        Command::new(&py)
            .arg("-c")
            .arg("import sys")
            .status()
            .ok()
            .filter(|s| s.success())
            .map(|_| py)
    }

    fn run_py(py: &str, body: &str, arg1: &str, recipe: &Recipe) {
        let m = &recipe.model;
        let dims = serde_json::json!({
            "img": m.img_size, "p": m.patch_size, "D": m.embed_dim, "depth": m.depth, "H": m.num_heads,
            "Dd": m.decoder_embed_dim, "ddepth": m.decoder_depth, "dH": m.decoder_num_heads,
        });
        let out = Command::new(py)
            .arg("-c")
            .arg(format!("{PY_MODEL}\n{body}"))
            .arg(arg1)
            .arg(dims.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "python failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn tiny() -> Recipe {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-cpu.toml");
        Recipe::load(&path, &[]).unwrap()
    }

    #[test]
    fn our_checkpoint_loads_into_timm_and_the_reference_layout() {
        let _rng = crate::torch_rng_lock();
        let Some(py) = python() else {
            eprintln!("skipped: no python found");
            return;
        };
        let recipe = tiny();
        let task = DropPosTask::new(&recipe, Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        let saved = store
            .save(
                &Checkpoint {
                    model: task.model_tensors(),
                    optimizer: task.optimizer_tensors(),
                    state: TrainState {
                        step: 0,
                        epoch: 0,
                        samples_in_epoch: 0,
                        loader_position: None,
                        world_size: 1,
                        rank: 0,
                        reason: "test".into(),
                        last_loss: None,
                        data: None,
                    },
                    config_toml: recipe.to_toml(),
                    model_metadata: task.model_metadata(),
                },
                1,
            )
            .unwrap();
        let body = r#"
from safetensors.torch import load_file
sd = load_file(sys.argv[1] + "/model.safetensors")
ref = DropPosRef()
ref.load_state_dict(sd, strict=True)          # every name and shape matches the reference layout
for k, v in ref.state_dict().items():
    assert torch.equal(v, sd[k]), k
vit = VisionTransformer(img_size=a["img"], patch_size=a["p"], embed_dim=D, depth=a["depth"], num_heads=a["H"], num_classes=0)
missing, unexpected = vit.load_state_dict(sd, strict=False)
assert not missing, missing                    # timm's encoder is fully covered
assert all(k.startswith(("decoder_", "mask_pos_token")) for k in unexpected), unexpected
"#;
        run_py(&py, body, saved.to_str().unwrap(), &recipe);
    }

    #[test]
    fn a_pytorch_state_dict_loads_here() {
        let _rng = crate::torch_rng_lock();
        let Some(py) = python() else {
            eprintln!("skipped: no python found");
            return;
        };
        let recipe = tiny();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ref.safetensors");
        let body = r#"
from safetensors.torch import save_file
torch.manual_seed(1)
ref = DropPosRef()
with torch.no_grad():
    for p in ref.parameters():
        p.normal_()
# A DDP-style "module." prefix is accepted too.
save_file({"module." + k: v.contiguous() for k, v in ref.state_dict().items()}, sys.argv[1])
"#;
        run_py(&py, body, file.to_str().unwrap(), &recipe);
        let mut task = DropPosTask::new(&recipe, Device::Cpu).unwrap();
        task.load_weights(&file).unwrap();
        let (want, _) = droppos_model::checkpoint::load(&file).unwrap();
        let ours = task.model_tensors();
        assert_eq!(ours.len(), want.len());
        for (name, t) in &want {
            let name = name.strip_prefix("module.").unwrap();
            let mine = &ours
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{name} missing"))
                .1;
            assert!(mine.equal(t), "{name}");
        }
        // And a run can resume from a checkpoint whose weights came from PyTorch.
        let run = tempfile::tempdir().unwrap();
        let state = TrainState {
            step: 3,
            epoch: 0,
            samples_in_epoch: 0,
            loader_position: None,
            world_size: 1,
            rank: 0,
            reason: "test".into(),
            last_loss: Some(1.0),
            data: None,
        };
        CheckpointStore::new(run.path())
            .save(
                &Checkpoint {
                    model: ours,
                    optimizer: task.optimizer_tensors(),
                    state,
                    config_toml: recipe.to_toml(),
                    model_metadata: task.model_metadata(),
                },
                1,
            )
            .unwrap();
        let mut fresh = DropPosTask::new(&recipe, Device::Cpu).unwrap();
        let st = load_resume(run.path(), &recipe, &mut fresh)
            .unwrap()
            .unwrap();
        assert_eq!(st.step, 3);
        let cls = fresh
            .model_tensors()
            .into_iter()
            .find(|(n, _)| n == "cls_token")
            .unwrap()
            .1;
        let want_cls = &want
            .iter()
            .find(|(n, _)| n == "module.cls_token")
            .unwrap()
            .1;
        assert!(cls.equal(want_cls));
    }

    #[test]
    fn droppos_resume_equals_uninterrupted_run() {
        let _rng = crate::torch_rng_lock();
        use crate::train::collective::Collective;
        use crate::train::device::Placement;
        use crate::train::metrics::{metrics_path, read_metrics};
        use crate::train::run::{train, TrainContext};
        use crate::train::signals::StopFlag;
        use crate::train::tests::ToySource;

        let base = [
            "train.epochs=2",
            "train.batch_size=4",
            "train.accum_iter=2",
            "checkpoint.every_steps=0",
            "runtime.progress=false",
            "runtime.device=cpu",
            "optim.warmup_epochs=1",
            "model.depth=2",
        ];
        let recipe_with = |extra: &[&str]| {
            let text = std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-cpu.toml"),
            )
            .unwrap();
            let o: Vec<String> = base.iter().chain(extra).map(|s| s.to_string()).collect();
            Recipe::parse(&text, &o).unwrap()
        };
        let go = |dir: &Path, r: &Recipe, resume: bool| {
            let mut task = DropPosTask::new(r, Device::Cpu).unwrap();
            let state = if resume {
                load_resume(dir, r, &mut task).unwrap()
            } else {
                None
            };
            let mut src = ToySource {
                epoch: 0,
                next: 0,
                batch: 4,
                side: r.model.img_size,
                skip: Vec::new(),
            };
            let ctx = TrainContext {
                recipe: r,
                run_dir: dir,
                placement: Placement {
                    device: Device::Cpu,
                    bf16_autocast: false,
                },
                collective: &mut Collective::Local,
                stop: StopFlag::default(),
                resume: state,
            };
            train(ctx, &mut task, &mut src).unwrap();
        };
        let full_r = recipe_with(&[]);
        let full = tempfile::tempdir().unwrap();
        go(full.path(), &full_r, false);
        let split = tempfile::tempdir().unwrap();
        // 2 steps per epoch: stop after step 3 (mid-epoch 1), then resume.
        go(split.path(), &recipe_with(&["train.max_steps=3"]), false);
        go(split.path(), &full_r, true);
        let bits = |d: &Path| -> Vec<(u64, u64, u64)> {
            read_metrics(&metrics_path(d))
                .unwrap()
                .iter()
                .map(|m| (m.step, m.loss.to_bits(), m.acc1.to_bits()))
                .collect()
        };
        let a = bits(full.path());
        assert_eq!(a.len(), 4);
        assert_eq!(bits(split.path()), a);
    }
}
