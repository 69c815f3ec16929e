//! DropPos Vision Transformers in tch (libtorch).
//!
//! - [`config`]: ViT / decoder presets and the pre-text task settings (serde).
//! - [`vit`]: the encoder ([`vit::VisionTransformer::forward_features`] for export and probes).
//! - [`classifier`]: the ViT with a classification head (timm / MAE fine-tuning names).
//! - [`droppos`]: the pre-training model ([`droppos::DropPos::forward_train`]).
//! - [`masking`], [`smoothing`], [`pos_embed`]: the reference's building blocks.
//! - [`finetune`]: layer-wise lr decay, Mixup / CutMix, soft-target cross-entropy.
//! - [`optim`]: per-parameter clipping and AdamW; [`schedule`]: lr / σ schedules.
//! - [`checkpoint`]: safetensors under the reference's names, atomic writes.
//!
//! ```no_run
//! use droppos_model::{config::DropPosConfig, droppos::DropPos, optim::{AdamW, AdamWConfig}};
//! let cfg = DropPosConfig::from_name("droppos_vit_tiny_patch16_dec512d2b")?;
//! let vs = tch::nn::VarStore::new(tch::Device::Cpu);
//! let model = DropPos::new(&vs.root(), &cfg)?;
//! let mut opt = AdamW::new(model.trainable_parameters(), AdamWConfig::default());
//! let smooth = model.smoothing_map(cfg.sigma)?;
//! let images = tch::Tensor::randn([2, 3, 224, 224], (tch::Kind::Float, tch::Device::Cpu));
//! let (noise_patch, noise_pos) = model.sample_noise(2);
//! let out = model.forward_train(&images, &noise_patch, &noise_pos, &smooth)?;
//! opt.zero_grad();
//! out.loss.backward();
//! opt.clip_grad_per_param(5.0);
//! opt.step();
//! # Ok::<(), droppos_model::error::ModelError>(())
//! ```

pub mod checkpoint;
pub mod classifier;
pub mod config;
pub mod data;
pub mod distributed;
pub mod droppos;
pub mod error;
pub mod finetune;
pub mod flops;
pub mod layers;
pub mod masking;
pub mod onnx;
pub mod optim;
pub mod pos_embed;
pub mod schedule;
pub mod smoothing;
pub mod trainer;
pub mod vit;

pub use classifier::{ClassifierConfig, GlobalPool, VitClassifier};
pub use config::{
    AttentionImpl, DecoderConfig, DropPosConfig, GuidePrecision, MaskTokenType, SmoothGrid,
    VitConfig,
};
pub use droppos::{DropPos, StepOutput};
pub use error::{ModelError, Result};
pub use vit::VisionTransformer;
