//! DropPos: a ViT encoder that sees a random subset of patches, some of them without their
//! position embedding, and a decoder (without position embeddings) that predicts every visible
//! patch's position among all L, plus the optional MAE branch (multi_task).
//!
//! The computation follows the reference op for op (see the golden fixtures' README): given the
//! same parameters and noise, the explicit-attention path reproduces its forward outputs bit for
//! bit and its gradients to rounding.

use tch::nn::{Init, Path};
use tch::{Device, Kind, Tensor};

use crate::config::{AttentionImpl, DropPosConfig, GuidePrecision, MaskTokenType};
use crate::error::{ModelError, Result};
use crate::layers::{LayerNorm, Linear, NamedTensors};
use crate::masking::{random_masking, Masking};
use crate::pos_embed;
use crate::smoothing::smoothing_map;
use crate::vit::{build_blocks, run_blocks, set_attention, Block, BlockSpec, VisionTransformer};

/// Temperature of the attention guide's softmax over cls/patch cosine similarities.
pub const ATTN_GUIDE_TEMPERATURE: f64 = 0.1;

/// The MAE decoder of the multi_task variant (`aux_decoder_*`, `mask_token`).
#[derive(Debug)]
pub struct MaeDecoder {
    pub embed: Linear,
    /// [1, 1, Dd]; trainable only with mask token type `param`.
    pub mask_token: Tensor,
    /// [1, 1 + L, Dd] fixed sin-cos, not trainable.
    pub pos_embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub pred: Linear,
}

/// Everything one training forward produces. Tensors carry autograd history where it makes sense
/// (`loss`, `pos_logits`, `latent`, `mae_pred`); the rest is detached.
#[derive(Debug)]
pub struct StepOutput {
    /// The loss to back-propagate: `pos_weight·loss_drop_pos + loss_mae` or `loss_drop_pos`.
    pub loss: Tensor,
    pub loss_drop_pos: Tensor,
    /// multi_task only.
    pub loss_mae: Option<Tensor>,
    /// Weighted position accuracy (0-dim float32, no gradient).
    pub acc1: Tensor,
    /// [N, K, L] position logits of the visible patches.
    pub pos_logits: Tensor,
    /// [N, 1 + K, D] encoder output after the final norm.
    pub latent: Tensor,
    /// multi_task only: [N, L, p·p·C] pixel predictions.
    pub mae_pred: Option<Tensor>,
    /// attn_guide only: [N, L] softmax similarity over all patches.
    pub attn_full: Option<Tensor>,
    /// attn_guide only: [N, K] per-visible-patch weights (sum 1 per sample).
    pub attn_weights: Option<Tensor>,
    /// [N, K] weight of each visible slot in the loss (mask_pos × attn_weights).
    pub loss_weights: Tensor,
    /// Patch masking over [N, L].
    pub patch_mask: Masking,
    /// Position masking over the K visible slots.
    pub pos_mask: Masking,
}

/// The DropPos pre-training model.
#[derive(Debug)]
pub struct DropPos {
    cfg: DropPosConfig,
    pub encoder: VisionTransformer,
    /// [1, 1, D]; trainable only with mask token type `param`.
    pub mask_pos_token: Tensor,
    pub decoder_embed: Linear,
    pub decoder_blocks: Vec<Block>,
    pub decoder_norm: LayerNorm,
    pub decoder_pred: Linear,
    pub aux: Option<MaeDecoder>,
}

fn token(p: &Path, name: &str, dim: i64, trainable: bool) -> Tensor {
    let init = Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    };
    if trainable {
        p.var(name, &[1, 1, dim], init)
    } else {
        let mut t = p.zeros_no_train(name, &[1, 1, dim]);
        let v = Tensor::randn([1, 1, dim], (Kind::Float, t.device())) * 0.02;
        tch::no_grad(|| t.copy_(&v));
        t
    }
}

impl DropPos {
    /// Creates all variables under `p` with the reference names and initialisation
    /// (use `vs.root()`; seed with `tch::manual_seed` for a reproducible init).
    pub fn new(p: &Path, cfg: &DropPosConfig) -> Result<Self> {
        cfg.validate()?;
        let enc_cfg = &cfg.encoder;
        let encoder = VisionTransformer::new(p, enc_cfg)?;
        let d = enc_cfg.embed_dim;
        let dd = cfg.decoder.embed_dim;
        let l = enc_cfg.num_patches();
        let trainable_tokens = cfg.mask_token_type == MaskTokenType::Param;
        let mask_pos_token = token(p, "mask_pos_token", d, trainable_tokens);
        let spec = BlockSpec {
            dim: dd,
            num_heads: cfg.decoder.num_heads,
            mlp_ratio: enc_cfg.mlp_ratio,
            eps: enc_cfg.layer_norm_eps,
            attention: enc_cfg.attention,
        };
        let decoder_embed = Linear::new(&(p / "decoder_embed"), d, dd);
        let decoder_blocks = build_blocks(&(p / "decoder_blocks"), cfg.decoder.depth, spec);
        let decoder_norm = LayerNorm::new(&(p / "decoder_norm"), dd, enc_cfg.layer_norm_eps);
        let decoder_pred = Linear::new(&(p / "decoder_pred"), dd, l);
        let aux = if cfg.multi_task {
            let mut pe = p.zeros_no_train("aux_decoder_pos_embed", &[1, 1 + l, dd]);
            let table = pos_embed::sincos_2d(dd, enc_cfg.grid_size(), pe.device())?;
            tch::no_grad(|| pe.copy_(&table));
            let pix = enc_cfg.patch_size * enc_cfg.patch_size * enc_cfg.in_chans;
            Some(MaeDecoder {
                embed: Linear::new(&(p / "aux_decoder_embed"), d, dd),
                mask_token: token(p, "mask_token", dd, trainable_tokens),
                pos_embed: pe,
                blocks: build_blocks(&(p / "aux_decoder_blocks"), cfg.decoder.depth, spec),
                norm: LayerNorm::new(&(p / "aux_decoder_norm"), dd, enc_cfg.layer_norm_eps),
                pred: Linear::new(&(p / "aux_decoder_pred"), dd, pix),
            })
        } else {
            None
        };
        Ok(DropPos {
            cfg: cfg.clone(),
            encoder,
            mask_pos_token,
            decoder_embed,
            decoder_blocks,
            decoder_norm,
            decoder_pred,
            aux,
        })
    }

    pub fn config(&self) -> &DropPosConfig {
        &self.cfg
    }

    pub fn device(&self) -> Device {
        self.encoder.cls_token.device()
    }

    /// Switches every attention layer (encoder and decoders).
    pub fn set_attention(&mut self, attention: AttentionImpl) {
        self.cfg.encoder.attention = attention;
        self.encoder.set_attention(attention);
        set_attention(&mut self.decoder_blocks, attention);
        if let Some(aux) = &mut self.aux {
            set_attention(&mut aux.blocks, attention);
        }
    }

    /// All parameters, frozen ones included, in the reference's `named_parameters()` order (the
    /// root's own tensors first, then the submodules).
    pub fn named_parameters(&self) -> NamedTensors {
        let mut out: NamedTensors = vec![
            ("cls_token".into(), self.encoder.cls_token.shallow_clone()),
            ("pos_embed".into(), self.encoder.pos_embed.shallow_clone()),
            ("mask_pos_token".into(), self.mask_pos_token.shallow_clone()),
        ];
        if let Some(aux) = &self.aux {
            out.push((
                "aux_decoder_pos_embed".into(),
                aux.pos_embed.shallow_clone(),
            ));
            out.push(("mask_token".into(), aux.mask_token.shallow_clone()));
        }
        self.encoder.push_body_params("", &mut out);
        self.decoder_embed.push_params("decoder_embed", &mut out);
        for (i, b) in self.decoder_blocks.iter().enumerate() {
            b.push_params(&format!("decoder_blocks.{i}"), &mut out);
        }
        self.decoder_norm.push_params("decoder_norm", &mut out);
        self.decoder_pred.push_params("decoder_pred", &mut out);
        if let Some(aux) = &self.aux {
            aux.embed.push_params("aux_decoder_embed", &mut out);
            for (i, b) in aux.blocks.iter().enumerate() {
                b.push_params(&format!("aux_decoder_blocks.{i}"), &mut out);
            }
            aux.norm.push_params("aux_decoder_norm", &mut out);
            aux.pred.push_params("aux_decoder_pred", &mut out);
        }
        out
    }

    /// The parameters the optimiser updates (frozen tables and non-`param` tokens excluded).
    pub fn trainable_parameters(&self) -> NamedTensors {
        self.named_parameters()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }

    /// Number of positions P of the smoothing map (L, or the reference engine's grid).
    pub fn smooth_positions(&self) -> i64 {
        let s = self.cfg.smooth_side();
        s * s
    }

    /// The label-smoothing map for `sigma` on the model's device (compute once per epoch).
    pub fn smoothing_map(&self, sigma: f64) -> Result<Tensor> {
        smoothing_map(self.smooth_positions(), sigma, self.device())
    }

    /// Uniform [0, 1) noise for one batch from libtorch's global generator (seed it with
    /// `tch::manual_seed`): ([N, L] patch noise, [N, K] position noise).
    pub fn sample_noise(&self, batch: i64) -> (Tensor, Tensor) {
        let (k, _) = self.cfg.keep_counts();
        let opts = (Kind::Float, self.device());
        let l = self.cfg.encoder.num_patches();
        (
            Tensor::rand([batch, l], opts),
            Tensor::rand([batch, k], opts),
        )
    }

    /// Attention guide: softmax over patches of cos(cls, patch)/0.1 from a no-grad pass of the
    /// full image with true positions. [N, L].
    pub fn attention_guide(&self, images: &Tensor) -> Result<Tensor> {
        let n = self.encoder.check_images(images)?;
        tch::no_grad(|| self.guide_from_patches(&self.encoder.patch_embed.forward(images), n))
    }

    /// The guide from already computed patch embeddings [N, L, D] (shared with the masked pass:
    /// the same convolution, so the values equal those of a separate pass).
    fn guide_from_patches(&self, patches: &Tensor, n: i64) -> Result<Tensor> {
        let l = self.cfg.encoder.num_patches();
        let pass = || {
            tch::no_grad(|| {
                let enc = &self.encoder;
                let x = patches.detach() + enc.pos_embed.narrow(1, 1, l);
                let z = enc.forward_tokens(Tensor::cat(&[enc.cls_with_pos(n), x], 1));
                // Similarities and softmax in fp32 whatever the pass computed in.
                let z = z.to_kind(Kind::Float);
                let sim =
                    Tensor::cosine_similarity(&z.narrow(1, 0, 1), &z.narrow(1, 1, l), -1, 1e-8);
                (sim / ATTN_GUIDE_TEMPERATURE).softmax(-1, None::<Kind>)
            })
        };
        match self.cfg.guide_precision {
            GuidePrecision::Fp32 => Ok(pass()),
            GuidePrecision::Bf16 if patches.device() == tch::Device::Cpu => {
                crate::trainer::precision::with_cpu_autocast_bf16(pass).map_err(ModelError::Config)
            }
            // On CUDA the caller's bf16 autocast (if any) already covers the pass.
            GuidePrecision::Bf16 => Ok(pass()),
        }
    }

    /// Position embeddings of the K visible slots: the true one where kept, the mask token type's
    /// replacement where dropped.
    fn visible_positions(&self, pe_vis: &Tensor, pos: &Masking) -> Tensor {
        let s = pe_vis.size();
        let (n, k, d) = (s[0], s[1], s[2]);
        let kp = pos.keep();
        let idx = |ids: &Tensor, len: i64| ids.unsqueeze(-1).expand([n, len, d], false);
        let kept = pe_vis.gather(1, &idx(&pos.ids_keep, kp), false);
        let dropped = match self.cfg.mask_token_type {
            MaskTokenType::Param => self.mask_pos_token.expand([n, k - kp, d], false),
            MaskTokenType::Zeros => Tensor::zeros([n, k - kp, d], (pe_vis.kind(), pe_vis.device())),
            MaskTokenType::WrongPos => {
                // The reference shuffles the removed slots' true embeddings along the slot axis,
                // one permutation for the whole batch.
                let removed = pe_vis.gather(1, &idx(&pos.ids_remove, k - kp), false);
                let perm = Tensor::randperm(k - kp, (Kind::Int64, pe_vis.device()));
                removed.index_select(1, &perm)
            }
        };
        Tensor::cat(&[kept, dropped], 1).gather(1, &idx(&pos.ids_restore, k), false)
    }

    /// One training forward. `images` [N, C, H, W] (normalised), `noise_patch` [N, L] and
    /// `noise_pos` [N, K] uniform noise (see [`DropPos::sample_noise`]), `smooth` the [P, P] map of
    /// [`DropPos::smoothing_map`].
    pub fn forward_train(
        &self,
        images: &Tensor,
        noise_patch: &Tensor,
        noise_pos: &Tensor,
        smooth: &Tensor,
    ) -> Result<StepOutput> {
        let enc = &self.encoder;
        let ecfg = enc.config();
        let n = enc.check_images(images)?;
        let (l, d) = (ecfg.num_patches(), ecfg.embed_dim);
        if noise_patch.size() != [n, l] {
            return Err(ModelError::Input(format!(
                "noise_patch must be [{n}, {l}], got {:?}",
                noise_patch.size()
            )));
        }
        let patch_mask = random_masking(noise_patch, self.cfg.mask_ratio)?;
        let k = patch_mask.keep();
        if noise_pos.size() != [n, k] {
            return Err(ModelError::Input(format!(
                "noise_pos must be [{n}, {k}], got {:?}",
                noise_pos.size()
            )));
        }
        let pos_mask = random_masking(noise_pos, self.cfg.pos_mask_ratio)?;
        let ps = smooth.size();
        if ps.len() != 2 || ps[0] != ps[1] || ps[0] < l {
            return Err(ModelError::Input(format!(
                "smoothing map must be [P, P] with P >= {l}, got {ps:?}"
            )));
        }

        // Encoder on the visible patches.
        let patches = enc.patch_embed.forward(images);
        let idx_keep = patch_mask.ids_keep.unsqueeze(-1).expand([n, k, d], false);
        let x_vis = patches.gather(1, &idx_keep, false);
        let pe_all = enc
            .pos_embed
            .narrow(1, 1, l)
            .detach()
            .expand([n, l, d], false);
        let pe_vis = pe_all.gather(1, &idx_keep, false);
        let pe = self.visible_positions(&pe_vis, &pos_mask);
        let x = Tensor::cat(&[enc.cls_with_pos(n), x_vis + pe], 1);

        let (attn_full, attn_weights) = if self.cfg.attn_guide {
            let full = self.guide_from_patches(&patches, n)?;
            let a = full.gather(1, &patch_mask.ids_keep, false);
            let w = &a / a.sum_dim_intlist(-1, true, None::<Kind>);
            (Some(full), Some(w))
        } else {
            (None, None)
        };

        let latent = enc.forward_tokens(x);

        // Position decoder (no position embeddings).
        let y = self.decoder_embed.forward(&latent);
        let y = self
            .decoder_norm
            .forward(&run_blocks(&self.decoder_blocks, y));
        let pos_logits = self.decoder_pred.forward(&y).narrow(1, 1, k);

        // Position loss: smoothed targets = rows ids_keep of the map, first L columns.
        let p = ps[0];
        let idx_rows = patch_mask.ids_keep.unsqueeze(-1).expand([n, k, l], false);
        let targets = smooth
            .to_device(pos_logits.device())
            .unsqueeze(0)
            .expand([n, p, p], false)
            .gather(1, &idx_rows, false);
        let logp = pos_logits.log_softmax(-1, None::<Kind>);
        let ce = (-targets * logp).sum_dim_intlist(-1, false, None::<Kind>);
        let mask_pos_f = pos_mask.mask.to_kind(ce.kind());
        let w = match &attn_weights {
            Some(a) => &mask_pos_f * a,
            None => mask_pos_f,
        };
        let w_sum = w.sum(None::<Kind>);
        let loss_drop_pos = (ce * &w).sum(None::<Kind>) / &w_sum;
        let acc1 = tch::no_grad(|| {
            let hit = pos_logits
                .detach()
                .argmax(-1, false)
                .eq_tensor(&patch_mask.ids_keep);
            (hit.to_kind(w.kind()) * &w).sum(None::<Kind>) / &w_sum
        });

        let (loss, loss_mae, mae_pred) = match &self.aux {
            None => (loss_drop_pos.shallow_clone(), None, None),
            Some(aux) => {
                let pred = self.mae_forward(aux, &latent, &patch_mask, l)?;
                let lm = self.mae_loss(images, &pred, &patch_mask.mask);
                let loss = &loss_drop_pos * self.cfg.pos_weight + &lm;
                (loss, Some(lm), Some(pred))
            }
        };

        Ok(StepOutput {
            loss,
            loss_drop_pos,
            loss_mae,
            acc1,
            pos_logits,
            latent,
            mae_pred,
            attn_full,
            attn_weights,
            loss_weights: w.detach(),
            patch_mask,
            pos_mask,
        })
    }

    fn mae_forward(
        &self,
        aux: &MaeDecoder,
        latent: &Tensor,
        patch: &Masking,
        l: i64,
    ) -> Result<Tensor> {
        let m = aux.embed.forward(latent);
        let s = m.size();
        let (n, t, dd) = (s[0], s[1], s[2]);
        let k = t - 1;
        let tokens = aux.mask_token.expand([n, l - k, dd], false);
        let seq = Tensor::cat(&[m.narrow(1, 1, k), tokens], 1);
        let idx = patch.ids_restore.unsqueeze(-1).expand([n, l, dd], false);
        let seq = seq.gather(1, &idx, false);
        let m = Tensor::cat(&[m.narrow(1, 0, 1), seq], 1) + &aux.pos_embed;
        let m = aux.norm.forward(&run_blocks(&aux.blocks, m));
        Ok(aux.pred.forward(&m).narrow(1, 1, l))
    }

    /// [N, C, H, W] → [N, L, p·p·C], channel fastest (the reference's `patchify`).
    pub fn patchify(&self, images: &Tensor) -> Tensor {
        let c = &self.cfg.encoder;
        let (p, g) = (c.patch_size, c.grid_size());
        let n = images.size()[0];
        images
            .reshape([n, c.in_chans, g, p, g, p])
            .permute([0, 2, 4, 3, 5, 1])
            .reshape([n, g * g, p * p * c.in_chans])
    }

    fn mae_loss(&self, images: &Tensor, pred: &Tensor, mask: &Tensor) -> Tensor {
        let mut target = self.patchify(images);
        if self.cfg.norm_pix_loss {
            let mean = target.mean_dim(-1, true, None::<Kind>);
            let var = target.var_dim(-1, true, true); // unbiased, like torch.var's default
            target = (&target - mean) / (var + 1e-6).pow_tensor_scalar(0.5);
        }
        let per_patch = (pred - target)
            .pow_tensor_scalar(2)
            .mean_dim(-1, false, None::<Kind>);
        let mask_f = mask.to_kind(per_patch.kind());
        (per_patch * &mask_f).sum(None::<Kind>) / mask_f.sum(None::<Kind>)
    }
}
