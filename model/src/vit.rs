//! The Vision Transformer encoder with timm / reference parameter names.
//!
//! `patch_embed.proj`, `cls_token`, `pos_embed` (fixed sin-cos, not trained), `blocks.{i}.{norm1,
//! attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`. Pre-norm blocks, exact (erf) GELU, no
//! dropout / drop-path / layer-scale: the pre-training model of DropPos and MAE.

use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

use crate::config::{mlp_hidden, AttentionImpl, VitConfig};
use crate::error::{ModelError, Result};
use crate::layers::{join, xavier_bound, LayerNorm, Linear, NamedTensors};
use crate::pos_embed;

/// Conv p×p stride p, flattened row-major over the grid: [N, C, H, W] → [N, L, D].
#[derive(Debug)]
pub struct PatchEmbed {
    pub weight: Tensor,
    pub bias: Tensor,
    patch_size: i64,
}

impl PatchEmbed {
    /// Weight: xavier-uniform of the conv viewed as [D, C·p·p] (the reference re-initialises it
    /// "like nn.Linear"); bias: PyTorch's Conv2d default U(±1/√fan_in), which the reference keeps.
    pub fn new(p: &Path, in_chans: i64, embed_dim: i64, patch_size: i64) -> Self {
        let fan_in = in_chans * patch_size * patch_size;
        let b = xavier_bound(fan_in, embed_dim);
        let weight = p.var(
            "weight",
            &[embed_dim, in_chans, patch_size, patch_size],
            Init::Uniform { lo: -b, up: b },
        );
        let bb = 1.0 / (fan_in as f64).sqrt();
        let bias = p.var("bias", &[embed_dim], Init::Uniform { lo: -bb, up: bb });
        PatchEmbed {
            weight,
            bias,
            patch_size,
        }
    }

    pub fn forward(&self, images: &Tensor) -> Tensor {
        let p = self.patch_size;
        images
            .conv2d(&self.weight, Some(&self.bias), [p, p], [0, 0], [1, 1], 1)
            .flatten(2, -1)
            .transpose(1, 2)
    }

    pub fn push_params(&self, prefix: &str, out: &mut NamedTensors) {
        out.push((join(prefix, "proj.weight"), self.weight.shallow_clone()));
        out.push((join(prefix, "proj.bias"), self.bias.shallow_clone()));
    }
}

/// Multi-head self-attention with a fused qkv projection (bias) and an output projection.
#[derive(Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    num_heads: i64,
    scale: f64,
    pub attention: AttentionImpl,
}

impl Attention {
    pub fn new(p: &Path, dim: i64, num_heads: i64, attention: AttentionImpl) -> Self {
        let head_dim = dim / num_heads;
        Attention {
            qkv: Linear::new(&(p / "qkv"), dim, 3 * dim),
            proj: Linear::new(&(p / "proj"), dim, dim),
            num_heads,
            scale: (head_dim as f64).powf(-0.5),
            attention,
        }
    }

    /// Splits qkv channels as `s·C + i·(C/h) + d` (component s, head i, dim d), like timm.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, t, c) = x.size3().expect("attention input is [B, T, C]");
        let h = self.num_heads;
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b, t, 3, h, c / h])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let y = match self.attention {
            AttentionImpl::Explicit => {
                // Scale after the matmul, softmax in the input's dtype: timm 0.3.2 op for op.
                let a = q.matmul(&k.transpose(-2, -1)) * self.scale;
                let a = a.softmax(-1, None::<Kind>);
                a.matmul(&v)
            }
            AttentionImpl::Fused => Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                false,
                Some(self.scale),
                false,
            ),
        };
        self.proj.forward(&y.transpose(1, 2).reshape([b, t, c]))
    }

    pub fn push_params(&self, prefix: &str, out: &mut NamedTensors) {
        self.qkv.push_params(&join(prefix, "qkv"), out);
        self.proj.push_params(&join(prefix, "proj"), out);
    }
}

/// fc2(GELU(fc1(x))) with the exact (erf) GELU.
#[derive(Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub fn new(p: &Path, dim: i64, hidden: i64) -> Self {
        Mlp {
            fc1: Linear::new(&(p / "fc1"), dim, hidden),
            fc2: Linear::new(&(p / "fc2"), hidden, dim),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.fc1.forward(x).gelu("none"))
    }

    pub fn push_params(&self, prefix: &str, out: &mut NamedTensors) {
        self.fc1.push_params(&join(prefix, "fc1"), out);
        self.fc2.push_params(&join(prefix, "fc2"), out);
    }
}

/// Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
#[derive(Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
}

/// Shape of one block.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec {
    pub dim: i64,
    pub num_heads: i64,
    pub mlp_ratio: f64,
    pub eps: f64,
    pub attention: AttentionImpl,
}

impl Block {
    pub fn new(p: &Path, s: BlockSpec) -> Self {
        Block {
            norm1: LayerNorm::new(&(p / "norm1"), s.dim, s.eps),
            attn: Attention::new(&(p / "attn"), s.dim, s.num_heads, s.attention),
            norm2: LayerNorm::new(&(p / "norm2"), s.dim, s.eps),
            mlp: Mlp::new(&(p / "mlp"), s.dim, mlp_hidden(s.dim, s.mlp_ratio)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_drop_path(x, 0.0)
    }

    /// The forward with stochastic depth: each residual branch is zeroed per sample with
    /// probability `rate` (kept ones scaled by 1 / (1 - rate)); rate 0 is the plain forward.
    pub fn forward_drop_path(&self, x: &Tensor, rate: f64) -> Tensor {
        let x = x + drop_path(self.attn.forward(&self.norm1.forward(x)), rate);
        &x + drop_path(self.mlp.forward(&self.norm2.forward(&x)), rate)
    }

    pub fn push_params(&self, prefix: &str, out: &mut NamedTensors) {
        self.norm1.push_params(&join(prefix, "norm1"), out);
        self.attn.push_params(&join(prefix, "attn"), out);
        self.norm2.push_params(&join(prefix, "norm2"), out);
        self.mlp.push_params(&join(prefix, "mlp"), out);
    }
}

/// Stochastic depth of one residual branch [N, ...] (libtorch's generator); identity at rate 0.
fn drop_path(h: Tensor, rate: f64) -> Tensor {
    if rate <= 0.0 {
        return h;
    }
    let keep = 1.0 - rate;
    let mut shape = vec![h.size()[0]];
    shape.resize(h.dim(), 1);
    let mask = Tensor::empty(shape.as_slice(), (h.kind(), h.device())).bernoulli_float_(keep);
    h * mask / keep
}

/// A stack of blocks (`{prefix}.{i}`).
pub fn build_blocks(p: &Path, depth: i64, spec: BlockSpec) -> Vec<Block> {
    (0..depth).map(|i| Block::new(&(p / i), spec)).collect()
}

pub(crate) fn run_blocks(blocks: &[Block], x: Tensor) -> Tensor {
    blocks.iter().fold(x, |x, b| b.forward(&x))
}

pub(crate) fn set_attention(blocks: &mut [Block], attention: AttentionImpl) {
    for b in blocks {
        b.attn.attention = attention;
    }
}

/// The ViT encoder.
#[derive(Debug)]
pub struct VisionTransformer {
    cfg: VitConfig,
    pub patch_embed: PatchEmbed,
    /// [1, 1, D], normal(0.02).
    pub cls_token: Tensor,
    /// [1, 1 + L, D], fixed sin-cos, not trainable.
    pub pos_embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
}

impl VisionTransformer {
    /// Creates the encoder's variables under `p` (names relative to `p`).
    pub fn new(p: &Path, cfg: &VitConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.embed_dim;
        let patch_embed = PatchEmbed::new(
            &(p / "patch_embed" / "proj"),
            cfg.in_chans,
            d,
            cfg.patch_size,
        );
        let cls_token = p.var(
            "cls_token",
            &[1, 1, d],
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let mut pos_embed = p.zeros_no_train("pos_embed", &[1, 1 + cfg.num_patches(), d]);
        let table = pos_embed::sincos_2d(d, cfg.grid_size(), pos_embed.device())?;
        tch::no_grad(|| pos_embed.copy_(&table));
        let spec = BlockSpec {
            dim: d,
            num_heads: cfg.num_heads,
            mlp_ratio: cfg.mlp_ratio,
            eps: cfg.layer_norm_eps,
            attention: cfg.attention,
        };
        let blocks = build_blocks(&(p / "blocks"), cfg.depth, spec);
        let norm = LayerNorm::new(&(p / "norm"), d, cfg.layer_norm_eps);
        Ok(VisionTransformer {
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// Switches every block between the explicit and the fused attention.
    pub fn set_attention(&mut self, attention: AttentionImpl) {
        self.cfg.attention = attention;
        set_attention(&mut self.blocks, attention);
    }

    /// Checks that `images` is [N, in_chans, img, img] floating point; returns N.
    pub fn check_images(&self, images: &Tensor) -> Result<i64> {
        let s = images.size();
        let c = &self.cfg;
        if s.len() != 4 || s[1] != c.in_chans || s[2] != c.img_size || s[3] != c.img_size {
            return Err(ModelError::Input(format!(
                "images must be [N, {}, {}, {}], got {:?}",
                c.in_chans, c.img_size, c.img_size, s
            )));
        }
        if !images.is_floating_point() {
            return Err(ModelError::Input(format!(
                "images must be floating point, got {:?}",
                images.kind()
            )));
        }
        Ok(s[0])
    }

    /// `cls_token + pos_embed[:, :1]` expanded to [N, 1, D].
    pub fn cls_with_pos(&self, n: i64) -> Tensor {
        (&self.cls_token + self.pos_embed.narrow(1, 0, 1)).expand([n, 1, self.cfg.embed_dim], false)
    }

    /// Full, unmasked token sequence: patches + their true positions, class token first.
    pub fn embed_full(&self, images: &Tensor) -> Result<Tensor> {
        let n = self.check_images(images)?;
        let x =
            self.patch_embed.forward(images) + self.pos_embed.narrow(1, 1, self.cfg.num_patches());
        Ok(Tensor::cat(&[self.cls_with_pos(n), x], 1))
    }

    /// Blocks then the final norm.
    pub fn forward_tokens(&self, x: Tensor) -> Tensor {
        self.norm.forward(&run_blocks(&self.blocks, x))
    }

    /// The encoder on full images: (normed class token [N, D], normed patch tokens [N, L, D]).
    /// This is what ONNX export and downstream probes use.
    pub fn forward_features(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = self.forward_tokens(self.embed_full(images)?);
        let l = self.cfg.num_patches();
        Ok((z.select(1, 0), z.narrow(1, 1, l)))
    }

    /// Parameters in timm's definition order, frozen `pos_embed` included, names under `prefix`.
    pub fn push_params(&self, prefix: &str, out: &mut NamedTensors) {
        out.push((join(prefix, "cls_token"), self.cls_token.shallow_clone()));
        out.push((join(prefix, "pos_embed"), self.pos_embed.shallow_clone()));
        self.push_body_params(prefix, out);
    }

    /// Everything except `cls_token` / `pos_embed` (the reference lists those with the root's own
    /// parameters, before the submodules).
    pub(crate) fn push_body_params(&self, prefix: &str, out: &mut NamedTensors) {
        self.patch_embed
            .push_params(&join(prefix, "patch_embed"), out);
        for (i, b) in self.blocks.iter().enumerate() {
            b.push_params(&join(prefix, &format!("blocks.{i}")), out);
        }
        self.norm.push_params(&join(prefix, "norm"), out);
    }

    pub fn named_parameters(&self) -> NamedTensors {
        let mut out = Vec::new();
        self.push_params("", &mut out);
        out
    }
}
