//! The ViT image classifier (timm `VisionTransformer` with a head; MAE / DropPos fine-tuning).
//!
//! Parameter names are timm's: the encoder's, then `fc_norm` (when pooled features are
//! normalised) and `head`. The forward is timm's `forward_head(forward_features(x))` without
//! dropout: blocks → `norm` (when the model has a final norm) → pool (class token, or the mean of
//! the patch tokens) → `fc_norm` (when present) → `head`. The fine-tuning protocol of the paper
//! (MAE's) uses mean pooling + `fc_norm` and no final `norm`; timm's default ViT uses the class
//! token after `norm`.

use serde::{Deserialize, Serialize};
use tch::nn::{Init, Path};
use tch::Tensor;

use crate::config::VitConfig;
use crate::error::{ModelError, Result};
use crate::layers::{LayerNorm, Linear, NamedTensors};
use crate::vit::{run_blocks, VisionTransformer};

/// How the token sequence becomes one feature vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GlobalPool {
    /// The class token (timm `global_pool="token"`).
    #[default]
    Token,
    /// The mean of the patch tokens, class token excluded (timm `"avg"`, MAE `global_pool=True`).
    Avg,
}

impl GlobalPool {
    /// timm's name (`token` / `avg`).
    pub fn as_str(self) -> &'static str {
        match self {
            GlobalPool::Token => "token",
            GlobalPool::Avg => "avg",
        }
    }

    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "token" => Ok(GlobalPool::Token),
            "avg" => Ok(GlobalPool::Avg),
            other => Err(ModelError::Config(format!(
                "global_pool `{other}`: use `token` or `avg`"
            ))),
        }
    }
}

/// A classifier's shape beyond the encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    pub encoder: VitConfig,
    pub num_classes: i64,
    #[serde(default)]
    pub global_pool: GlobalPool,
    /// LayerNorm `norm` after the blocks (before pooling).
    pub final_norm: bool,
    /// LayerNorm `fc_norm` on the pooled feature.
    pub fc_norm: bool,
}

impl ClassifierConfig {
    /// The fine-tuning model of the paper's protocol (MAE): mean pooling + `fc_norm`, no `norm`.
    pub fn finetune(encoder: VitConfig, num_classes: i64) -> Self {
        ClassifierConfig {
            encoder,
            num_classes,
            global_pool: GlobalPool::Avg,
            final_norm: false,
            fc_norm: true,
        }
    }

    /// timm's default ViT classifier: the class token after `norm`.
    pub fn token(encoder: VitConfig, num_classes: i64) -> Self {
        ClassifierConfig {
            encoder,
            num_classes,
            global_pool: GlobalPool::Token,
            final_norm: true,
            fc_norm: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.encoder.validate()?;
        // Bounded so that the head's allocation cannot fail inside libtorch (a panic there).
        if self.num_classes <= 0 || self.num_classes > 1 << 21 {
            return Err(ModelError::Config(format!(
                "num_classes must be in 1..=2097152, got {}",
                self.num_classes
            )));
        }
        Ok(())
    }
}

/// ViT + pooling + linear head.
#[derive(Debug)]
pub struct VitClassifier {
    cfg: ClassifierConfig,
    pub vit: VisionTransformer,
    pub fc_norm: Option<LayerNorm>,
    /// [num_classes, D]; weight ~ N(0, 2e-5) (the protocol's trunc_normal(2e-5)), bias 0.
    pub head: Linear,
}

impl VitClassifier {
    pub fn new(p: &Path, cfg: &ClassifierConfig) -> Result<Self> {
        cfg.validate()?;
        let vit = VisionTransformer::new(p, &cfg.encoder)?;
        let d = cfg.encoder.embed_dim;
        let fc_norm = cfg
            .fc_norm
            .then(|| LayerNorm::new(&(p / "fc_norm"), d, cfg.encoder.layer_norm_eps));
        let hp = p / "head";
        let head = Linear {
            weight: hp.var(
                "weight",
                &[cfg.num_classes, d],
                Init::Randn {
                    mean: 0.0,
                    stdev: 2e-5,
                },
            ),
            bias: hp.var("bias", &[cfg.num_classes], Init::Const(0.0)),
        };
        Ok(VitClassifier {
            cfg: cfg.clone(),
            vit,
            fc_norm,
            head,
        })
    }

    pub fn config(&self) -> &ClassifierConfig {
        &self.cfg
    }

    /// The pooled (and `fc_norm`-ed) feature [N, D] the head reads.
    pub fn forward_pooled(&self, images: &Tensor) -> Result<Tensor> {
        let x = run_blocks(&self.vit.blocks, self.vit.embed_full(images)?);
        Ok(self.pool(x))
    }

    /// Training forward with stochastic depth: block i drops each sample's residual branches
    /// with probability `drop_path · i / (depth - 1)` (timm's linear rule) and rescales the kept
    /// ones by 1 / keep. Uses libtorch's generator. Returns logits.
    pub fn forward_train(&self, images: &Tensor, drop_path: f64) -> Result<Tensor> {
        let depth = self.vit.blocks.len();
        let mut x = self.vit.embed_full(images)?;
        for (i, b) in self.vit.blocks.iter().enumerate() {
            let rate = if depth > 1 {
                drop_path * i as f64 / (depth - 1) as f64
            } else {
                0.0
            };
            x = b.forward_drop_path(&x, rate);
        }
        Ok(self.head.forward(&self.pool(x)))
    }

    /// norm (if any) → pooling → fc_norm (if any).
    fn pool(&self, mut x: Tensor) -> Tensor {
        if self.cfg.final_norm {
            x = self.vit.norm.forward(&x);
        }
        let pooled = match self.cfg.global_pool {
            GlobalPool::Token => x.select(1, 0),
            GlobalPool::Avg => {
                let l = self.cfg.encoder.num_patches();
                x.narrow(1, 1, l)
                    .mean_dim(Some([1i64].as_slice()), false, None)
            }
        };
        match &self.fc_norm {
            Some(ln) => ln.forward(&pooled),
            None => pooled,
        }
    }

    /// Class logits [N, num_classes].
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.head.forward(&self.forward_pooled(images)?))
    }

    /// Parameters under timm's names (no `norm.*` without a final norm).
    pub fn named_parameters(&self) -> NamedTensors {
        let mut out: NamedTensors = self
            .vit
            .named_parameters()
            .into_iter()
            .filter(|(n, _)| self.cfg.final_norm || !n.starts_with("norm."))
            .collect();
        if let Some(ln) = &self.fc_norm {
            ln.push_params("fc_norm", &mut out);
        }
        self.head.push_params("head", &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn tiny() -> VitConfig {
        let mut v = VitConfig::vit_tiny(8, 32);
        v.depth = 2;
        v
    }

    #[test]
    fn names_follow_timm_for_both_pools() {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let m = VitClassifier::new(&vs.root(), &ClassifierConfig::finetune(tiny(), 7)).unwrap();
        let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"fc_norm.weight".to_string()));
        assert!(names.contains(&"head.weight".to_string()));
        assert!(!names.iter().any(|n| n.starts_with("norm.")));
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let m = VitClassifier::new(&vs.root(), &ClassifierConfig::token(tiny(), 7)).unwrap();
        let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"norm.weight".to_string()));
        assert!(!names.iter().any(|n| n.starts_with("fc_norm")));
    }

    #[test]
    fn avg_pool_is_the_mean_of_patch_tokens() {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let cfg = ClassifierConfig::finetune(tiny(), 5);
        let m = VitClassifier::new(&vs.root(), &cfg).unwrap();
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let logits = tch::no_grad(|| m.forward(&x)).unwrap();
        assert_eq!(logits.size(), vec![2, 5]);
        let tokens = tch::no_grad(|| run_blocks(&m.vit.blocks, m.vit.embed_full(&x).unwrap()));
        let mean = tokens
            .narrow(1, 1, 16)
            .mean_dim(Some([1i64].as_slice()), false, None);
        let want = m.head.forward(&m.fc_norm.as_ref().unwrap().forward(&mean));
        let diff = f64::try_from((logits - want).abs().max()).unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn rejects_no_classes() {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let err = VitClassifier::new(&vs.root(), &ClassifierConfig::token(tiny(), 0)).unwrap_err();
        assert!(err.to_string().contains("num_classes"));
    }
}
