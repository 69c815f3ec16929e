//! Analytic FLOPs of one DropPos training step, for throughput and MFU figures.
//!
//! The usual convention for model FLOPs utilisation (PaLM, Megatron): only matrix
//! multiplications count, at 2 FLOPs per multiply-add; softmax, LayerNorm, GELU, the loss and the
//! optimizer are left out. A backward pass costs twice its forward (gradients of inputs and of
//! weights), except the patch embedding's, whose input (the image) needs no gradient. The
//! attention guide's full pass runs forward only.

use crate::config::{mlp_hidden, DropPosConfig};

/// FLOPs of one step for a batch, split by part.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepFlops {
    /// The attention guide's no-grad pass over all L patches (0 when the guide is off).
    pub guide: f64,
    /// The training forward: patch embedding, encoder on the visible patches, decoder(s).
    pub forward: f64,
    pub backward: f64,
}

impl StepFlops {
    pub fn total(&self) -> f64 {
        self.guide + self.forward + self.backward
    }
}

/// Forward FLOPs of one transformer block over `t` tokens of width `d` (MLP hidden `h`), per
/// image: qkv, projection, fc1, fc2, and attention's QKᵀ and AV.
fn block(t: f64, d: f64, h: f64) -> f64 {
    2.0 * t * d * (3.0 * d + d + 2.0 * h) + 2.0 * 2.0 * t * t * d
}

impl DropPosConfig {
    /// Matmul FLOPs of one training step on `batch` images (see the module docs).
    pub fn step_flops(&self, batch: i64) -> StepFlops {
        let e = &self.encoder;
        let (d, dd) = (e.embed_dim as f64, self.decoder.embed_dim as f64);
        // The decoders' blocks take the encoder's mlp ratio.
        let (h, hd) = (
            e.mlp_hidden() as f64,
            mlp_hidden(self.decoder.embed_dim, e.mlp_ratio) as f64,
        );
        let l = e.num_patches() as f64;
        let pix = (e.patch_size * e.patch_size * e.in_chans) as f64;
        let k = self.keep_counts().0 as f64;
        let depth = e.depth as f64;
        let ddepth = self.decoder.depth as f64;

        // The patch embedding runs once over all L patches (the guide shares it).
        let patch_embed = 2.0 * l * pix * d;
        let encoder = depth * block(k + 1.0, d, h);
        let decoder =
            2.0 * (k + 1.0) * d * dd + ddepth * block(k + 1.0, dd, hd) + 2.0 * (k + 1.0) * dd * l;
        // The MAE branch: embed the visible tokens, decode all L + 1, predict pixels.
        let mae = if self.multi_task {
            2.0 * (k + 1.0) * d * dd + ddepth * block(l + 1.0, dd, hd) + 2.0 * (l + 1.0) * dd * pix
        } else {
            0.0
        };
        let guide = if self.attn_guide {
            depth * block(l + 1.0, d, h)
        } else {
            0.0
        };
        let n = batch as f64;
        let trained = encoder + decoder + mae;
        StepFlops {
            guide: n * guide,
            forward: n * (patch_embed + trained),
            backward: n * (patch_embed + 2.0 * trained),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{DecoderConfig, DropPosConfig, VitConfig};

    #[test]
    fn vit_base_step_flops_by_hand() {
        let cfg = DropPosConfig::new(VitConfig::vit_base(16, 224), DecoderConfig::dec512d2b());
        let f = cfg.step_flops(1);
        // ViT-B/16 encoder blocks over all 197 tokens: 17.4 G multiply-adds (fvcore's "17.6
        // GFLOPs" with the patch embedding, counting one per multiply-add), 34.9 GFLOPs here.
        let full = 12.0
            * (2.0 * 197.0 * 768.0 * (4.0 * 768.0 + 2.0 * 3072.0) + 4.0 * 197.0 * 197.0 * 768.0);
        assert!((f.guide - full).abs() < 1.0);
        assert!((f.guide / 1e9 - 34.9).abs() < 0.1, "{}", f.guide / 1e9);
        // 49 kept patches + cls through the encoder; the decoder on the same 50 tokens.
        let enc =
            12.0 * (2.0 * 50.0 * 768.0 * (4.0 * 768.0 + 2.0 * 3072.0) + 4.0 * 50.0 * 50.0 * 768.0);
        let dec = 2.0 * 50.0 * 768.0 * 512.0
            + 2.0 * (2.0 * 50.0 * 512.0 * (4.0 * 512.0 + 2.0 * 2048.0) + 4.0 * 50.0 * 50.0 * 512.0)
            + 2.0 * 50.0 * 512.0 * 196.0;
        let pe = 2.0 * 196.0 * 768.0 * 768.0;
        assert!((f.forward - (pe + enc + dec)).abs() < 1.0);
        assert!((f.backward - (pe + 2.0 * (enc + dec))).abs() < 1.0);
        assert!((cfg.step_flops(8).total() - 8.0 * f.total()).abs() < 1e3);
        let mut off = cfg.clone();
        off.attn_guide = false;
        assert_eq!(off.step_flops(1).guide, 0.0);
        let mut mt = cfg;
        mt.multi_task = true;
        assert!(mt.step_flops(1).forward > f.forward);
    }
}
