//! Model configurations: the ViT encoder, the DropPos decoder and the pre-text task.
//!
//! Named presets follow the reference (`DropPos_mae_vit_base_patch16_dec512d2b`, ...) and timm
//! (`vit_base_patch16_224`). Everything is serde-serialisable: the trainer embeds the config in
//! TOML recipes and checkpoints.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// How attention scores are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AttentionImpl {
    /// `softmax((q @ kᵀ) · scale) @ v`, op for op as the reference (timm 0.3.2): bit-exact parity.
    Explicit,
    /// libtorch's `scaled_dot_product_attention` (flash / memory-efficient kernels): faster,
    /// differs from the explicit path by rounding (~1e-6).
    #[default]
    Fused,
}

/// Encoder (Vision Transformer) hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    pub img_size: i64,
    pub patch_size: i64,
    #[serde(default = "default_in_chans")]
    pub in_chans: i64,
    pub embed_dim: i64,
    pub depth: i64,
    pub num_heads: i64,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub attention: AttentionImpl,
}

fn default_in_chans() -> i64 {
    3
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_ln_eps() -> f64 {
    1e-6
}

/// The ViT sizes of the reference / timm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VitSize {
    Tiny,
    Small,
    Base,
    Large,
    Huge,
}

impl VitSize {
    /// (embed_dim, depth, num_heads).
    pub fn dims(self) -> (i64, i64, i64) {
        match self {
            VitSize::Tiny => (192, 12, 3),
            VitSize::Small => (384, 12, 6),
            VitSize::Base => (768, 12, 12),
            VitSize::Large => (1024, 24, 16),
            VitSize::Huge => (1280, 32, 16),
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "tiny" | "ti" => VitSize::Tiny,
            "small" | "s" => VitSize::Small,
            "base" | "b" => VitSize::Base,
            "large" | "l" => VitSize::Large,
            "huge" | "h" => VitSize::Huge,
            _ => return None,
        })
    }
}

impl VitConfig {
    /// A preset size with the given patch and image size (mlp ratio 4, LayerNorm eps 1e-6).
    pub fn preset(size: VitSize, patch_size: i64, img_size: i64) -> Self {
        let (embed_dim, depth, num_heads) = size.dims();
        VitConfig {
            img_size,
            patch_size,
            in_chans: 3,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            layer_norm_eps: 1e-6,
            attention: AttentionImpl::default(),
        }
    }
    pub fn vit_tiny(patch_size: i64, img_size: i64) -> Self {
        Self::preset(VitSize::Tiny, patch_size, img_size)
    }
    pub fn vit_small(patch_size: i64, img_size: i64) -> Self {
        Self::preset(VitSize::Small, patch_size, img_size)
    }
    pub fn vit_base(patch_size: i64, img_size: i64) -> Self {
        Self::preset(VitSize::Base, patch_size, img_size)
    }
    pub fn vit_large(patch_size: i64, img_size: i64) -> Self {
        Self::preset(VitSize::Large, patch_size, img_size)
    }
    pub fn vit_huge(patch_size: i64, img_size: i64) -> Self {
        Self::preset(VitSize::Huge, patch_size, img_size)
    }

    /// Parses `vit_{tiny,small,base,large,huge}_patch{14,16,32}[_{img}]` (image size 224 when
    /// omitted).
    pub fn from_name(name: &str) -> Result<Self> {
        let bad = || {
            ModelError::Config(format!(
                "unknown ViT preset {name:?} (expected e.g. vit_base_patch16 or vit_tiny_patch16_224)"
            ))
        };
        let lower = name.to_ascii_lowercase();
        let mut parts = lower.split('_');
        if parts.next() != Some("vit") {
            return Err(bad());
        }
        let size = parts.next().and_then(VitSize::parse).ok_or_else(bad)?;
        let patch: i64 = parts
            .next()
            .and_then(|p| p.strip_prefix("patch"))
            .and_then(|p| p.parse().ok())
            .ok_or_else(bad)?;
        if ![14, 16, 32].contains(&patch) {
            return Err(bad());
        }
        let img = match parts.next() {
            None => 224,
            Some(s) => s.parse().map_err(|_| bad())?,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        let cfg = Self::preset(size, patch, img);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Patches per side.
    pub fn grid_size(&self) -> i64 {
        self.img_size / self.patch_size
    }
    /// Number of patches L.
    pub fn num_patches(&self) -> i64 {
        self.grid_size() * self.grid_size()
    }
    /// MLP hidden width, `int(D * mlp_ratio)` like timm.
    pub fn mlp_hidden(&self) -> i64 {
        mlp_hidden(self.embed_dim, self.mlp_ratio)
    }

    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(ModelError::Config(m));
        if self.img_size <= 0 || self.patch_size <= 0 || self.img_size % self.patch_size != 0 {
            return err(format!(
                "img_size {} must be a positive multiple of patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        if self.in_chans <= 0 || self.depth < 0 {
            return err(format!("in_chans {} / depth {}", self.in_chans, self.depth));
        }
        // Far beyond any ViT (huge is 1280-d x 32 blocks at 224 px), and small enough that
        // building the model cannot ask libtorch for an allocation it refuses (tch panics).
        for (what, v, max) in [
            ("img_size", self.img_size, 1 << 14),
            ("in_chans", self.in_chans, 64),
            ("depth", self.depth, 1024),
            ("embed_dim", self.embed_dim, 1 << 14),
            (
                "mlp hidden width (embed_dim x mlp_ratio)",
                self.mlp_hidden(),
                1 << 16,
            ),
        ] {
            if v > max {
                return err(format!("{what} {v} is beyond {max}"));
            }
        }
        check_heads("encoder", self.embed_dim, self.num_heads)?;
        if self.embed_dim % 4 != 0 {
            return err(format!(
                "embed_dim {} must be a multiple of 4 for the 2-D sin-cos table",
                self.embed_dim
            ));
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 || self.mlp_hidden() <= 0 {
            return err(format!("mlp_ratio {} must be positive", self.mlp_ratio));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return err(format!(
                "layer_norm_eps {} must be positive",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }
}

pub(crate) fn mlp_hidden(dim: i64, ratio: f64) -> i64 {
    (dim as f64 * ratio) as i64
}

fn check_heads(what: &str, dim: i64, heads: i64) -> Result<()> {
    if dim <= 0 || heads <= 0 || dim % heads != 0 {
        return Err(ModelError::Config(format!(
            "{what}: width {dim} must be a positive multiple of num_heads {heads}"
        )));
    }
    Ok(())
}

/// The DropPos position decoder (and, with multi_task, the MAE decoder of the same shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderConfig {
    pub embed_dim: i64,
    pub depth: i64,
    pub num_heads: i64,
}

impl DecoderConfig {
    /// 512-d × 2 blocks × 16 heads (the paper's default for ViT-B/16 and ViT-L/16).
    pub fn dec512d2b() -> Self {
        DecoderConfig {
            embed_dim: 512,
            depth: 2,
            num_heads: 16,
        }
    }
    /// 512-d × 8 blocks × 16 heads (the reference's "recommended" arch).
    pub fn dec512d8b() -> Self {
        DecoderConfig {
            embed_dim: 512,
            depth: 8,
            num_heads: 16,
        }
    }
}

/// What replaces the position embedding of a dropped position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MaskTokenType {
    /// The learnable `mask_pos_token` (and `mask_token` for the MAE branch).
    #[default]
    Param,
    /// Zero vectors (the tokens exist but are frozen).
    Zeros,
    /// The true embeddings of the other dropped positions, shuffled among them.
    WrongPos,
}

/// Which grid the label-smoothing map is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SmoothGrid {
    /// The model's own G×G grid (L positions): spatially correct targets.
    #[default]
    Model,
    /// The reference engine's `(input_size // token_size)²` map with token_size = G, i.e. a
    /// (img // G)-wide grid whose first L columns are used. Reproduces the paper's runs.
    Reference,
}

/// The whole DropPos model and pre-text task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropPosConfig {
    pub encoder: VitConfig,
    pub decoder: DecoderConfig,
    /// Fraction of patches removed before the encoder.
    #[serde(default = "default_ratio")]
    pub mask_ratio: f64,
    /// Fraction of the visible patches whose position embedding is dropped.
    #[serde(default = "default_ratio")]
    pub pos_mask_ratio: f64,
    /// Label-smoothing σ0 (0 = one-hot targets).
    #[serde(default = "default_sigma")]
    pub sigma: f64,
    /// σ_e = (1 − e/epochs)·σ0.
    #[serde(default = "default_true")]
    pub sigma_decay: bool,
    /// Attentive reconstruction: weight the loss by cls/patch similarity of a full no-grad pass.
    #[serde(default = "default_true")]
    pub attn_guide: bool,
    /// Add the MAE pixel-reconstruction branch; loss = pos_weight·L_pos + L_mae.
    #[serde(default)]
    pub multi_task: bool,
    #[serde(default = "default_pos_weight")]
    pub pos_weight: f64,
    #[serde(default)]
    pub mask_token_type: MaskTokenType,
    #[serde(default = "default_true")]
    pub norm_pix_loss: bool,
    #[serde(default)]
    pub smooth_grid: SmoothGrid,
    /// Numerics of the attention guide's no-grad pass (it only weights the loss).
    #[serde(default)]
    pub guide_precision: GuidePrecision,
}

/// Precision of the attention guide's no-grad full pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GuidePrecision {
    /// fp32, as the reference (and bit-parity with it).
    #[default]
    Fp32,
    /// bf16 autocast on the CPU (AMX / AVX512-BF16 make it several times faster; on CUDA the
    /// training forward already runs under bf16 autocast). The guide's weights then differ
    /// from fp32 by bf16 rounding.
    Bf16,
}

fn default_ratio() -> f64 {
    0.75
}
fn default_sigma() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}
fn default_pos_weight() -> f64 {
    1.0
}

impl DropPosConfig {
    /// The paper's pre-text settings around an encoder and decoder.
    pub fn new(encoder: VitConfig, decoder: DecoderConfig) -> Self {
        DropPosConfig {
            encoder,
            decoder,
            mask_ratio: 0.75,
            pos_mask_ratio: 0.75,
            sigma: 1.0,
            sigma_decay: true,
            attn_guide: true,
            multi_task: false,
            pos_weight: 1.0,
            mask_token_type: MaskTokenType::Param,
            norm_pix_loss: true,
            smooth_grid: SmoothGrid::Model,
            guide_precision: GuidePrecision::Fp32,
        }
    }

    /// Parses reference model names such as `DropPos_mae_vit_base_patch16_dec512d2b` (also
    /// without `mae_`, case-insensitive, with an optional image size: `..._patch16_224_dec512d8b`).
    pub fn from_name(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        let bad = || {
            ModelError::Config(format!(
                "unknown DropPos preset {name:?} (expected e.g. droppos_vit_base_patch16_dec512d2b)"
            ))
        };
        let rest = lower.strip_prefix("droppos_").ok_or_else(bad)?;
        let rest = rest.strip_prefix("mae_").unwrap_or(rest);
        let (vit, dec) = rest.rsplit_once('_').ok_or_else(bad)?;
        let decoder = match dec {
            "dec512d2b" => DecoderConfig::dec512d2b(),
            "dec512d8b" => DecoderConfig::dec512d8b(),
            _ => return Err(bad()),
        };
        let encoder = VitConfig::from_name(vit).map_err(|_| bad())?;
        Ok(Self::new(encoder, decoder))
    }

    /// Keep counts (K, Kp) with the reference's float64 truncation.
    pub fn keep_counts(&self) -> (i64, i64) {
        let k = crate::masking::keep_count(self.encoder.num_patches(), self.mask_ratio);
        (k, crate::masking::keep_count(k, self.pos_mask_ratio))
    }

    /// Side of the smoothing map's grid (P = side²).
    pub fn smooth_side(&self) -> i64 {
        match self.smooth_grid {
            SmoothGrid::Model => self.encoder.grid_size(),
            SmoothGrid::Reference => self.encoder.img_size / self.encoder.grid_size(),
        }
    }

    /// σ for epoch `epoch` of `epochs` (linear decay to 0 when `sigma_decay`).
    pub fn sigma_at(&self, epoch: usize, epochs: usize) -> f64 {
        crate::schedule::sigma_at(self.sigma, self.sigma_decay, epoch, epochs)
    }

    pub fn validate(&self) -> Result<()> {
        self.encoder.validate()?;
        let d = &self.decoder;
        check_heads("decoder", d.embed_dim, d.num_heads)?;
        if d.embed_dim > 1 << 14
            || d.depth > 1024
            || mlp_hidden(d.embed_dim, self.encoder.mlp_ratio) > 1 << 16
        {
            return Err(ModelError::Config(format!(
                "decoder width {} / depth {} beyond 16384 / 1024 (or its MLP beyond 65536 wide)",
                d.embed_dim, d.depth
            )));
        }
        if d.depth < 0 || (self.multi_task && d.embed_dim % 4 != 0) {
            return Err(ModelError::Config(format!(
                "decoder depth {} / width {} (multi_task needs a width divisible by 4)",
                d.depth, d.embed_dim
            )));
        }
        for (what, r) in [
            ("mask_ratio", self.mask_ratio),
            ("pos_mask_ratio", self.pos_mask_ratio),
        ] {
            if !(0.0..1.0).contains(&r) {
                return Err(ModelError::Config(format!("{what} {r} must be in [0, 1)")));
            }
        }
        let (k, kp) = self.keep_counts();
        if k < 1 {
            return Err(ModelError::Config(format!(
                "mask_ratio {} keeps no patch",
                self.mask_ratio
            )));
        }
        if kp == k {
            return Err(ModelError::Config(format!(
                "pos_mask_ratio {} drops no position among {k} visible patches: the loss would be 0/0",
                self.pos_mask_ratio
            )));
        }
        if !self.sigma.is_finite() || self.sigma < 0.0 {
            return Err(ModelError::Config(format!(
                "sigma {} must be >= 0",
                self.sigma
            )));
        }
        let side = self.smooth_side();
        if side * side < self.encoder.num_patches() {
            return Err(ModelError::Config(format!(
                "smooth_grid = reference gives a {side}x{side} map, smaller than the {} patches",
                self.encoder.num_patches()
            )));
        }
        if !self.pos_weight.is_finite() {
            return Err(ModelError::Config("pos_weight must be finite".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes no ViT has, which libtorch would refuse to allocate inside tch's panicking
    /// constructors, are configuration errors.
    #[test]
    fn absurd_sizes_are_refused() {
        let base = VitConfig::from_name("vit_tiny_patch16_224").unwrap();
        base.validate().unwrap();
        let wide = VitConfig {
            embed_dim: 1_000_000_000,
            num_heads: 1,
            ..base.clone()
        };
        assert!(wide
            .validate()
            .unwrap_err()
            .to_string()
            .contains("embed_dim"));
        let mlp = VitConfig {
            mlp_ratio: 1e12,
            ..base.clone()
        };
        assert!(mlp
            .validate()
            .unwrap_err()
            .to_string()
            .contains("mlp hidden"));
        let big = VitConfig {
            img_size: 1 << 20,
            ..base
        };
        assert!(big.validate().unwrap_err().to_string().contains("img_size"));
    }
}
