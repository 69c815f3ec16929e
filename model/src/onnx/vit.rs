//! ONNX graphs for the ViT encoder and the DropPos position head, written from reference (timm)
//! parameter names.
//!
//! Linear layers become MatMul with the weight stored transposed (`{name}.weight.T`, [in, out])
//! plus Add; attention is one branch per head with its own q/k/v weights (`Ctx::attention`);
//! LayerNorm is `LayerNormalization` (opset 17+); GELU is the exact erf form, either as the
//! Div-Erf-Add-Mul-Mul pattern ONNX Runtime fuses (opset 17) or the `Gelu` op (opset 20).

use super::builder::{Attr, Dim, ElemType, GraphBuilder};
use super::weights::{HostTensor, Weights};
use super::OnnxError;
use crate::classifier::GlobalPool;

/// ONNX opsets the exporters write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opset {
    /// GELU spelled with Erf (ONNX Runtime fuses it).
    V17,
    /// GELU as the `Gelu` operator.
    V20,
}

impl Opset {
    pub fn version(self) -> i64 {
        match self {
            Opset::V17 => 17,
            Opset::V20 => 20,
        }
    }

    pub fn from_version(v: i64) -> Result<Self, OnnxError> {
        match v {
            17 => Ok(Opset::V17),
            20 => Ok(Opset::V20),
            _ => Err(OnnxError::Invalid(format!(
                "opset {v} is not supported; use 17 or 20"
            ))),
        }
    }
}

/// The encoder's architecture; everything but the head count is read from weight shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderSpec {
    pub img_size: i64,
    pub patch_size: i64,
    pub in_chans: i64,
    pub embed_dim: i64,
    pub depth: usize,
    pub num_heads: i64,
    pub mlp_hidden: i64,
    pub eps: f32,
}

impl EncoderSpec {
    /// Reads the shapes from `w`; `num_heads` cannot be derived from shapes.
    pub fn infer(w: &Weights, img_size: i64, num_heads: i64) -> Result<Self, OnnxError> {
        let pw = w.get("patch_embed.proj.weight")?;
        let [embed_dim, in_chans, p, p2] = pw.dims[..] else {
            return Err(OnnxError::Invalid(format!(
                "patch_embed.proj.weight should be [D, C, p, p], got {:?}",
                pw.dims
            )));
        };
        if p != p2 || p <= 0 {
            return Err(OnnxError::Invalid(format!(
                "non-square patch {p}x{p2} is not supported"
            )));
        }
        if img_size <= 0 || img_size % p != 0 {
            return Err(OnnxError::Invalid(format!(
                "image size {img_size} is not a positive multiple of the patch size {p}"
            )));
        }
        if num_heads <= 0 || embed_dim % num_heads != 0 {
            return Err(OnnxError::Invalid(format!(
                "{num_heads} heads do not divide the width {embed_dim}"
            )));
        }
        let depth = w.count_indexed("blocks");
        if depth == 0 {
            return Err(OnnxError::MissingWeight("blocks.0.*".into()));
        }
        let mlp_hidden = w.get("blocks.0.mlp.fc1.weight")?.dims[0];
        check_supported(w)?;
        Ok(Self {
            img_size,
            patch_size: p,
            in_chans,
            embed_dim,
            depth,
            num_heads,
            mlp_hidden,
            eps: 1e-6,
        })
    }

    pub fn grid(&self) -> i64 {
        self.img_size / self.patch_size
    }

    pub fn num_patches(&self) -> i64 {
        self.grid() * self.grid()
    }
}

/// Parameters of a block the graphs know (timm `Block`: optional qkv bias and LayerScale).
const BLOCK_PARAMS: [&str; 14] = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "ls1.gamma",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "ls2.gamma",
];

/// Whether `name` is outside the part made of `blocks` (e.g. `blocks.`) and the single
/// parameters `known`.
fn is_unknown(name: &str, blocks: &str, known: &[&str]) -> bool {
    match name.strip_prefix(blocks) {
        Some(rest) => !BLOCK_PARAMS.contains(&rest.split_once('.').map_or("", |(_, p)| p)),
        None => !known.contains(&name),
    }
}

/// Fails when the blocks under `blocks` (e.g. `blocks`) disagree: an optional parameter (qkv
/// bias, LayerScale) present in some blocks only, or a block index past a missing one. The
/// graphs build each block from what its weights hold, so an incomplete state dict would
/// otherwise export with some blocks silently different.
fn check_blocks_consistent(w: &Weights, blocks: &str) -> Result<(), OnnxError> {
    let depth = w.count_indexed(blocks);
    let prefix = format!("{blocks}.");
    if let Some(stray) = w.names().find(|n| {
        n.strip_prefix(&prefix)
            .and_then(|r| r.split_once('.'))
            .and_then(|(i, _)| i.parse::<usize>().ok())
            .is_some_and(|i| i >= depth)
    }) {
        return Err(OnnxError::Invalid(format!(
            "the weights hold {stray} but no {blocks}.{depth}.*: a block is missing"
        )));
    }
    for opt in ["attn.qkv.bias", "ls1.gamma", "ls2.gamma"] {
        let missing: Vec<String> = (0..depth)
            .filter(|i| !w.contains(&format!("{blocks}.{i}.{opt}")))
            .map(|i| i.to_string())
            .collect();
        if !missing.is_empty() && missing.len() < depth {
            return Err(OnnxError::Invalid(format!(
                "`{opt}` is in {} of the {depth} blocks but missing from {blocks} {}: the \
                 weights are incomplete",
                depth - missing.len(),
                missing.join(", ")
            )));
        }
    }
    Ok(())
}

/// The error listing (the first 8 of) `unknown`, or Ok when there are none.
fn refuse_unknown(mut unknown: Vec<&str>, part: &str, supported: &str) -> Result<(), OnnxError> {
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort_unstable();
    unknown.truncate(8);
    Err(OnnxError::Invalid(format!(
        "the weights hold {part} parameters this exporter does not implement: {} (supported: \
         {supported})",
        unknown.join(", ")
    )))
}

/// Fails on encoder parameters the graphs would otherwise ignore (register tokens, q/k norms, a
/// pre-norm, attention pooling...): exporting such a model would silently compute something
/// else than timm does.
pub fn check_supported(w: &Weights) -> Result<(), OnnxError> {
    let other_parts = [
        "decoder_",
        // The multi_task variant's MAE decoder (not part of any export).
        "aux_decoder_",
        "mask_pos_token",
        "mask_token",
        "head.",
        "fc_norm.",
        "norm.",
    ];
    let known = [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    ];
    let unknown = w
        .names()
        .filter(|n| !other_parts.iter().any(|p| n.starts_with(p)))
        .filter(|n| is_unknown(n, "blocks.", &known))
        .collect();
    check_blocks_consistent(w, "blocks")?;
    refuse_unknown(
        unknown,
        "encoder",
        "timm's plain ViT blocks with optional qkv bias and LayerScale, class token, absolute \
         pos_embed",
    )
}

/// Fails on position-decoder parameters the graph would otherwise ignore (a decoder position
/// embedding, q/k norms...), as [`check_supported`] does for the encoder.
fn check_decoder_supported(w: &Weights) -> Result<(), OnnxError> {
    let known = [
        "decoder_embed.weight",
        "decoder_embed.bias",
        "decoder_norm.weight",
        "decoder_norm.bias",
        "decoder_pred.weight",
        "decoder_pred.bias",
    ];
    let unknown = w
        .names()
        .filter(|n| n.starts_with("decoder_"))
        .filter(|n| is_unknown(n, "decoder_blocks.", &known))
        .collect();
    check_blocks_consistent(w, "decoder_blocks")?;
    refuse_unknown(
        unknown,
        "position-decoder",
        "DropPos's decoder: decoder_embed, plain ViT blocks, decoder_norm, decoder_pred; no \
         position embedding",
    )
}

/// The DropPos position decoder (no positional embedding; predicts one of L positions).
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderSpec {
    pub embed_dim: i64,
    pub depth: usize,
    pub num_heads: i64,
    pub mlp_hidden: i64,
}

impl DecoderSpec {
    pub fn infer(w: &Weights, num_heads: i64) -> Result<Self, OnnxError> {
        let embed_dim = w.get("decoder_embed.weight")?.dims[0];
        if num_heads <= 0 || embed_dim % num_heads != 0 {
            return Err(OnnxError::Invalid(format!(
                "{num_heads} decoder heads do not divide the decoder width {embed_dim}"
            )));
        }
        let depth = w.count_indexed("decoder_blocks");
        if depth == 0 {
            return Err(OnnxError::MissingWeight("decoder_blocks.0.*".into()));
        }
        check_decoder_supported(w)?;
        let mlp_hidden = w.get("decoder_blocks.0.mlp.fc1.weight")?.dims[0];
        Ok(Self {
            embed_dim,
            depth,
            num_heads,
            mlp_hidden,
        })
    }
}

/// Graph-building helpers over a weight map.
struct Ctx<'a> {
    g: GraphBuilder,
    w: &'a Weights,
    opset: Opset,
}

impl Ctx<'_> {
    /// The `[batch, C, S, S]` fp32 image input.
    fn images_input(&mut self, name: &str, s: &EncoderSpec, batch: &Dim) -> String {
        self.g.input(
            name,
            ElemType::F32,
            &[
                batch.clone(),
                Dim::Fixed(s.in_chans),
                Dim::Fixed(s.img_size),
                Dim::Fixed(s.img_size),
            ],
        )
    }

    fn param(&mut self, name: &str, dims: &[i64]) -> Result<String, OnnxError> {
        let t = self.w.get_shaped(name, dims)?;
        Ok(self.g.weight(name, &t.dims, &t.data))
    }

    /// `x @ weight^T + bias` over a token tensor [N, T, d_in] (see [`Self::linear_with`]).
    fn linear(
        &mut self,
        x: &str,
        prefix: &str,
        d_in: i64,
        d_out: i64,
    ) -> Result<String, OnnxError> {
        self.linear_with(x, prefix, d_in, d_out, 3)
    }

    /// `x @ weight^T + bias` for an input of rank `rank`, the bias stored with that rank
    /// ([1, 1, d_out] for tokens): with a 1-D bias ONNX Runtime fuses the Add into a following
    /// GELU (`BiasGelu`, measured slower than Add then GELU) or, for static shapes, MatMul + Add
    /// into Gemm (whose bias pass made these layers ~17 % slower). BENCHMARKS.md, "ONNX inference".
    fn linear_with(
        &mut self,
        x: &str,
        prefix: &str,
        d_in: i64,
        d_out: i64,
        rank: usize,
    ) -> Result<String, OnnxError> {
        let mm = self.matmul_weight(x, prefix, d_in, d_out)?;
        let t = self.w.get_shaped(&format!("{prefix}.bias"), &[d_out])?;
        let mut dims = vec![1; rank.max(1) - 1];
        dims.push(d_out);
        let b = self.g.weight(&format!("{prefix}.bias"), &dims, &t.data);
        Ok(self.g.op("Add", &[&mm, &b], vec![]))
    }

    /// `x @ weight^T` with `{prefix}.weight` [d_out, d_in] stored transposed as `{prefix}.weight.T`.
    fn matmul_weight(
        &mut self,
        x: &str,
        prefix: &str,
        d_in: i64,
        d_out: i64,
    ) -> Result<String, OnnxError> {
        let wname = format!("{prefix}.weight");
        let wt = self.w.get_shaped(&wname, &[d_out, d_in])?.transposed_2d()?;
        let wt = self.g.weight(&format!("{wname}.T"), &wt.dims, &wt.data);
        Ok(self.g.op("MatMul", &[x, &wt], vec![]))
    }

    fn layer_norm(&mut self, x: &str, prefix: &str, d: i64, eps: f32) -> Result<String, OnnxError> {
        let s = self.param(&format!("{prefix}.weight"), &[d])?;
        let b = self.param(&format!("{prefix}.bias"), &[d])?;
        Ok(self.g.op(
            "LayerNormalization",
            &[x, &s, &b],
            vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))],
        ))
    }

    fn gelu(&mut self, x: &str) -> String {
        match self.opset {
            Opset::V20 => self.g.op(
                "Gelu",
                &[x],
                vec![("approximate", Attr::Str("none".into()))],
            ),
            Opset::V17 => {
                let sqrt2 = self.g.scalar_f32(std::f32::consts::SQRT_2);
                let one = self.g.scalar_f32(1.0);
                let half = self.g.scalar_f32(0.5);
                let d = self.g.op("Div", &[x, &sqrt2], vec![]);
                let e = self.g.op("Erf", &[&d], vec![]);
                let a = self.g.op("Add", &[&e, &one], vec![]);
                let m = self.g.op("Mul", &[x, &a], vec![]);
                self.g.op("Mul", &[&m, &half], vec![])
            }
        }
    }

    /// Multi-head self-attention over x [N, T, D]: timm's `Attention` (qkv bias optional),
    /// written for ONNX Runtime's CPU kernels as the same function:
    /// - one branch per head: q, k and v from 2-D weights [D, dh] (which ort pre-packs), scores
    ///   [N, T, T] (a head's fit in cache where all heads' [N, H, T, T] at batch 32 do not), the
    ///   heads' outputs concatenated on the feature axis, so nothing is transposed but k;
    /// - the 1/sqrt(dh) scale is folded into q's weights and bias;
    /// - k's bias is left out: it adds q·b_k to every score in a query's row, which softmax
    ///   ignores;
    /// - v's bias moves into proj's bias: each row of attention weights sums to 1, so it adds
    ///   b_v to every output token, i.e. W_proj·b_v after the projection.
    ///
    /// ViT-S/16 in ONNX Runtime: ~8-10 % faster than the qkv / transpose / split form
    /// (BENCHMARKS.md, "ONNX inference"); outputs within ~2e-6 of it.
    fn attention(
        &mut self,
        x: &str,
        prefix: &str,
        d: i64,
        heads: i64,
    ) -> Result<String, OnnxError> {
        let dh = d / heads;
        let wname = format!("{prefix}.qkv.weight");
        let w = &self.w.get_shaped(&wname, &[3 * d, d])?.data;
        // timm's `qkv_bias=False` saves no bias.
        let bname = format!("{prefix}.qkv.bias");
        let b = if self.w.contains(&bname) {
            Some(&self.w.get_shaped(&bname, &[3 * d])?.data)
        } else {
            None
        };
        let (du, dhu) = (d as usize, dh as usize);
        let scale = (dh as f32).powf(-0.5);
        // Rows [p*D + h*dh, p*D + (h+1)*dh) of the qkv weight [3D, D] (p: 0 q, 1 k, 2 v),
        // transposed to a MatMul operand [D, dh], times `scale`.
        let head_weight = |p: usize, h: usize, scale: f32| {
            let mut out = vec![0f32; du * dhu];
            for j in 0..dhu {
                let row = &w[(p * du + h * dhu + j) * du..][..du];
                for (i, &v) in row.iter().enumerate() {
                    out[i * dhu + j] = v * scale;
                }
            }
            out
        };
        let mut outs = Vec::with_capacity(heads as usize);
        for h in 0..heads as usize {
            let matmul = |cx: &mut Self, part: &str, p: usize, scale: f32| {
                let wh = head_weight(p, h, scale);
                let wh = cx.g.weight(&format!("{wname}.{part}{h}"), &[d, dh], &wh);
                cx.g.op("MatMul", &[x, &wh], vec![])
            };
            let mut q = matmul(self, "q", 0, scale);
            let k = matmul(self, "k", 1, 1.0);
            let v = matmul(self, "v", 2, 1.0);
            if let Some(b) = b {
                let bq: Vec<f32> = b[h * dhu..][..dhu].iter().map(|v| v * scale).collect();
                let bq = self.g.weight(&format!("{bname}.q{h}"), &[1, 1, dh], &bq);
                q = self.g.op("Add", &[&q, &bq], vec![]);
            }
            let kt = self.g.op(
                "Transpose",
                &[&k],
                vec![("perm", Attr::Ints(vec![0, 2, 1]))],
            );
            let s = self.g.op("MatMul", &[&q, &kt], vec![]);
            let a = self.g.op("Softmax", &[&s], vec![("axis", Attr::Int(-1))]);
            outs.push(self.g.op("MatMul", &[&a, &v], vec![]));
        }
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        let o = self.g.op("Concat", &refs, vec![("axis", Attr::Int(-1))]);
        let proj = format!("{prefix}.proj");
        let mm = self.matmul_weight(&o, &proj, d, d)?;
        let pb = self.proj_bias_with(&proj, d, b.map(|b| &b[2 * du..]))?;
        let pb = self
            .g
            .weight(&format!("{proj}.bias.with_v_bias"), &[1, 1, d], &pb);
        Ok(self.g.op("Add", &[&mm, &pb], vec![]))
    }

    /// `{proj}.bias` plus `{proj}.weight` · `v_bias` (accumulated in f64): the attention's value
    /// bias moved past the projection.
    fn proj_bias_with(
        &self,
        proj: &str,
        d: i64,
        v_bias: Option<&[f32]>,
    ) -> Result<Vec<f32>, OnnxError> {
        let bias = &self.w.get_shaped(&format!("{proj}.bias"), &[d])?.data;
        let Some(bv) = v_bias else {
            return Ok(bias.clone());
        };
        let pw = &self.w.get_shaped(&format!("{proj}.weight"), &[d, d])?.data;
        Ok(bias
            .iter()
            .zip(pw.chunks_exact(d as usize))
            .map(|(&b0, row)| {
                let dot: f64 = row.iter().zip(bv).map(|(&a, &b)| a as f64 * b as f64).sum();
                (b0 as f64 + dot) as f32
            })
            .collect())
    }

    /// A pre-norm transformer block (timm `Block`).
    fn block(
        &mut self,
        x: &str,
        prefix: &str,
        d: i64,
        heads: i64,
        hidden: i64,
        eps: f32,
    ) -> Result<String, OnnxError> {
        let h = self.layer_norm(x, &format!("{prefix}.norm1"), d, eps)?;
        let h = self.attention(&h, &format!("{prefix}.attn"), d, heads)?;
        let h = self.layer_scale(h, &format!("{prefix}.ls1"), d)?;
        let x = self.g.op("Add", &[x, &h], vec![]);
        let h = self.layer_norm(&x, &format!("{prefix}.norm2"), d, eps)?;
        let h = self.linear(&h, &format!("{prefix}.mlp.fc1"), d, hidden)?;
        let h = self.gelu(&h);
        let h = self.linear(&h, &format!("{prefix}.mlp.fc2"), hidden, d)?;
        let h = self.layer_scale(h, &format!("{prefix}.ls2"), d)?;
        Ok(self.g.op("Add", &[&x, &h], vec![]))
    }

    /// timm's LayerScale (`{prefix}.gamma` times the branch) when the weights have one.
    fn layer_scale(&mut self, h: String, prefix: &str, d: i64) -> Result<String, OnnxError> {
        let name = format!("{prefix}.gamma");
        if !self.w.contains(&name) {
            return Ok(h);
        }
        let g = self.param(&name, &[d])?;
        Ok(self.g.op("Mul", &[&h, &g], vec![]))
    }

    /// images [N, C, S, S] -> patch embeddings [N, L, D] (no position yet).
    fn patch_embed(&mut self, images: &str, s: &EncoderSpec) -> Result<String, OnnxError> {
        let (d, p) = (s.embed_dim, s.patch_size);
        let w = self.param("patch_embed.proj.weight", &[d, s.in_chans, p, p])?;
        let b = self.param("patch_embed.proj.bias", &[d])?;
        let c = self.g.op(
            "Conv",
            &[images, &w, &b],
            vec![
                ("kernel_shape", Attr::Ints(vec![p, p])),
                ("strides", Attr::Ints(vec![p, p])),
            ],
        );
        let shape = self.g.const_i64(&[0, d, -1]);
        let r = self.g.op("Reshape", &[&c, &shape], vec![]);
        Ok(self.g.op(
            "Transpose",
            &[&r],
            vec![("perm", Attr::Ints(vec![0, 2, 1]))],
        ))
    }

    /// `token` [1, 1, D] repeated along the batch of `like` (any tensor whose axis 0 is N).
    fn expand_batch(&mut self, token: &str, like: &str, d: i64) -> String {
        let shape = self.g.op("Shape", &[like], vec![]);
        let starts = self.g.const_i64(&[0]);
        let ends = self.g.const_i64(&[1]);
        let n = self.g.op("Slice", &[&shape, &starts, &ends], vec![]);
        let rest = self.g.const_i64(&[1, d]);
        let target = self
            .g
            .op("Concat", &[&n, &rest], vec![("axis", Attr::Int(0))]);
        self.g.op("Expand", &[token, &target], vec![])
    }

    /// The blocks, then the final `norm` when the weights have one (timm replaces it by an
    /// identity for mean pooling with `fc_norm`, as MAE fine-tuning does).
    fn encoder_blocks(&mut self, x: String, s: &EncoderSpec) -> Result<String, OnnxError> {
        let x = self.blocks_only(x, s)?;
        if !self.w.contains("norm.weight") && self.w.contains("fc_norm.weight") {
            return Ok(x);
        }
        self.layer_norm(&x, "norm", s.embed_dim, s.eps)
    }

    /// The blocks without the final norm.
    fn blocks_only(&mut self, mut x: String, s: &EncoderSpec) -> Result<String, OnnxError> {
        for i in 0..s.depth {
            x = self.block(
                &x,
                &format!("blocks.{i}"),
                s.embed_dim,
                s.num_heads,
                s.mlp_hidden,
                s.eps,
            )?;
        }
        Ok(x)
    }

    /// images -> the full token sequence [N, 1+L, D]: cls token first, positions added.
    fn embed_full(&mut self, images: &str, s: &EncoderSpec) -> Result<String, OnnxError> {
        let d = s.embed_dim;
        let tokens = self.patch_embed(images, s)?;
        let cls = self.param("cls_token", &[1, 1, d])?;
        let cls = self.expand_batch(&cls, images, d);
        let x = self
            .g
            .op("Concat", &[&cls, &tokens], vec![("axis", Attr::Int(1))]);
        let pe = check_pos_embed(self.w, s)?;
        let pe = self.g.weight("pos_embed", &pe.dims, &pe.data);
        Ok(self.g.op("Add", &[&x, &pe], vec![]))
    }

    /// Drops the cls token: [N, 1+T, D] -> [N, T, D].
    fn drop_first_token(&mut self, x: &str) -> String {
        let starts = self.g.const_i64(&[1]);
        let ends = self.g.const_i64(&[i64::MAX]);
        let axes = self.g.const_i64(&[1]);
        self.g.op("Slice", &[x, &starts, &ends, &axes], vec![])
    }
}

fn metadata(kind: &str, s: &EncoderSpec, opset: Opset) -> Vec<(&'static str, String)> {
    vec![
        ("droppos.kind", kind.to_string()),
        ("droppos.img_size", s.img_size.to_string()),
        ("droppos.patch_size", s.patch_size.to_string()),
        ("droppos.embed_dim", s.embed_dim.to_string()),
        ("droppos.depth", s.depth.to_string()),
        ("droppos.num_heads", s.num_heads.to_string()),
        ("droppos.opset", opset.version().to_string()),
    ]
}

/// Names of the encoder graph's inputs and outputs.
pub mod encoder_io {
    pub const IMAGES: &str = "images";
    pub const CLS: &str = "cls";
    pub const PATCH_TOKENS: &str = "patch_tokens";
    pub const FEATURE_MAP: &str = "feature_map";
}

/// Names of the classifier graph's input and output.
pub mod classifier_io {
    pub const IMAGES: &str = "images";
    pub const LOGITS: &str = "logits";
}

/// Names of the DropPos graph's inputs and outputs.
pub mod droppos_io {
    pub const IMAGES: &str = "images";
    pub const IDS_KEEP: &str = "ids_keep";
    pub const MASK_POS: &str = "mask_pos";
    pub const LOGITS: &str = "position_logits";
}

fn check_pos_embed(w: &Weights, s: &EncoderSpec) -> Result<HostTensor, OnnxError> {
    Ok(
        w.get_shaped("pos_embed", &[1, 1 + s.num_patches(), s.embed_dim])?
            .clone(),
    )
}

/// The encoder: `images` [N, C, S, S] -> `cls` [N, D] (the cls token after the final
/// LayerNorm `norm`), `patch_tokens` [N, L, D] (the patch tokens after `norm`) and
/// `feature_map` [N, D, S/p, S/p] (the same tokens laid out on the patch grid). `pos_embed` in
/// `w` must match the image size ([1, 1+L, D], cls row first, as timm stores it).
pub fn encoder_model(
    w: &Weights,
    s: &EncoderSpec,
    opset: Opset,
) -> Result<super::proto::ModelProto, OnnxError> {
    use encoder_io::*;
    let mut cx = Ctx {
        g: GraphBuilder::new("droppos_vit_encoder"),
        w,
        opset,
    };
    let (d, grid) = (s.embed_dim, s.grid());
    let batch = Dim::param("batch");
    let images = cx.images_input(IMAGES, s, &batch);
    let x = cx.embed_full(&images, s)?;
    let y = cx.encoder_blocks(x, s)?;

    let zero = cx.g.scalar_i64(0);
    let cls_out =
        cx.g.op("Gather", &[&y, &zero], vec![("axis", Attr::Int(1))]);
    let patches = cx.drop_first_token(&y);
    let t = cx.g.op(
        "Transpose",
        &[&patches],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    let shape = cx.g.const_i64(&[0, d, grid, grid]);
    let fmap = cx.g.op("Reshape", &[&t, &shape], vec![]);

    cx.g.output(
        &cls_out,
        CLS,
        ElemType::F32,
        &[batch.clone(), Dim::Fixed(d)],
    );
    cx.g.output(
        &patches,
        PATCH_TOKENS,
        ElemType::F32,
        &[batch.clone(), Dim::Fixed(s.num_patches()), Dim::Fixed(d)],
    );
    cx.g.output(
        &fmap,
        FEATURE_MAP,
        ElemType::F32,
        &[batch, Dim::Fixed(d), Dim::Fixed(grid), Dim::Fixed(grid)],
    );
    Ok(cx.g.finish(
        opset.version(),
        "ViT encoder exported by droppos-pipeline: images -> cls (after the final norm), \
         patch_tokens, feature_map",
        &metadata("encoder", s, opset),
    ))
}

/// The DropPos pre-text model: `images` [N, C, S, S], `ids_keep` [N, K] (int64, indices of the
/// visible patches), `mask_pos` [N, K] (fp32, 1 where the position is dropped and the
/// `mask_pos_token` replaces the sin-cos embedding) -> `position_logits` [N, K, L].
pub fn droppos_model(
    w: &Weights,
    s: &EncoderSpec,
    dec: &DecoderSpec,
    opset: Opset,
) -> Result<super::proto::ModelProto, OnnxError> {
    use droppos_io::*;
    let mut cx = Ctx {
        g: GraphBuilder::new("droppos_position_model"),
        w,
        opset,
    };
    let (d, l) = (s.embed_dim, s.num_patches());
    let batch = Dim::param("batch");
    let visible = Dim::param("visible");
    let images = cx.images_input(IMAGES, s, &batch);
    let ids =
        cx.g.input(IDS_KEEP, ElemType::I64, &[batch.clone(), visible.clone()]);
    let mask =
        cx.g.input(MASK_POS, ElemType::F32, &[batch.clone(), visible.clone()]);

    let tokens = cx.patch_embed(&images, s)?;
    // Visible patch embeddings: gather rows ids_keep along the token axis.
    let axes = cx.g.const_i64(&[-1]);
    let idx = cx.g.op("Unsqueeze", &[&ids, &axes], vec![]);
    let ids_shape = cx.g.op("Shape", &[&ids], vec![]);
    let dd = cx.g.const_i64(&[d]);
    let target =
        cx.g.op("Concat", &[&ids_shape, &dd], vec![("axis", Attr::Int(0))]);
    let idx = cx.g.op("Expand", &[&idx, &target], vec![]);
    let vis = cx.g.op(
        "GatherElements",
        &[&tokens, &idx],
        vec![("axis", Attr::Int(1))],
    );
    // Their positions: the true sin-cos row, or mask_pos_token where dropped.
    let pe = check_pos_embed(w, s)?;
    let (cls_row, patch_rows) = pe.data.split_at(d as usize);
    let pos = cx.g.weight("pos_embed.patches", &[l, d], patch_rows);
    let pos =
        cx.g.op("Gather", &[&pos, &ids], vec![("axis", Attr::Int(0))]);
    let m = cx.g.op("Unsqueeze", &[&mask, &axes], vec![]);
    let m = cx.g.op(
        "Cast",
        &[&m],
        vec![(
            "to",
            Attr::Int(super::proto::tensor_proto::DataType::Bool as i64),
        )],
    );
    let mpt = cx.param("mask_pos_token", &[1, 1, d])?;
    let pos = cx.g.op("Where", &[&m, &mpt, &pos], vec![]);
    let x = cx.g.op("Add", &[&vis, &pos], vec![]);
    // cls token + its (zero) position row, as the reference adds them.
    let cls_w = w.get_shaped("cls_token", &[1, 1, d])?;
    let cls_sum: Vec<f32> = cls_w.data.iter().zip(cls_row).map(|(a, b)| a + b).collect();
    let cls = cx.g.weight("cls_token.with_pos", &[1, 1, d], &cls_sum);
    let cls = cx.expand_batch(&cls, &images, d);
    let x = cx.g.op("Concat", &[&cls, &x], vec![("axis", Attr::Int(1))]);
    let y = cx.encoder_blocks(x, s)?;

    let dd = dec.embed_dim;
    let mut z = cx.linear(&y, "decoder_embed", d, dd)?;
    for j in 0..dec.depth {
        z = cx.block(
            &z,
            &format!("decoder_blocks.{j}"),
            dd,
            dec.num_heads,
            dec.mlp_hidden,
            s.eps,
        )?;
    }
    let z = cx.layer_norm(&z, "decoder_norm", dd, s.eps)?;
    let z = cx.linear(&z, "decoder_pred", dd, l)?;
    let logits = cx.drop_first_token(&z);
    cx.g.output(
        &logits,
        LOGITS,
        ElemType::F32,
        &[batch, visible, Dim::Fixed(l)],
    );
    let mut meta = metadata("droppos", s, opset);
    meta.push(("droppos.decoder_embed_dim", dec.embed_dim.to_string()));
    meta.push(("droppos.decoder_depth", dec.depth.to_string()));
    meta.push(("droppos.decoder_num_heads", dec.num_heads.to_string()));
    Ok(cx.g.finish(
        opset.version(),
        "DropPos position model exported by droppos-pipeline: images, ids_keep, mask_pos -> \
         position_logits over all patch positions",
        &meta,
    ))
}

/// A classifier's head, read from the weights: `head.weight` [C, D] and `head.bias`; `norm.*`
/// (a final norm before pooling) and `fc_norm.*` (a norm of the pooled feature) when present.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadSpec {
    pub num_classes: i64,
    pub pool: GlobalPool,
    pub final_norm: bool,
    pub fc_norm: bool,
}

impl HeadSpec {
    /// `pool` defaults as timm does: mean pooling when the weights have `fc_norm`, else the
    /// class token.
    pub fn infer(
        w: &Weights,
        s: &EncoderSpec,
        pool: Option<GlobalPool>,
    ) -> Result<Self, OnnxError> {
        let hw = w.get("head.weight").map_err(|_| {
            OnnxError::Invalid(
                "the weights have no classification head (`head.weight`): a pre-training \
                 checkpoint exports as `encoder` or `droppos`; `classifier` needs fine-tuned \
                 weights"
                    .into(),
            )
        })?;
        let [c, d] = hw.dims[..] else {
            return Err(OnnxError::Invalid(format!(
                "head.weight should be [classes, D], got {:?}",
                hw.dims
            )));
        };
        if d != s.embed_dim || c <= 0 {
            return Err(OnnxError::Shape {
                name: "head.weight".into(),
                expected: vec![c.max(1), s.embed_dim],
                got: hw.dims.clone(),
            });
        }
        // A LayerNorm is all or nothing: half of one would be dropped without a word.
        for norm in ["norm", "fc_norm"] {
            let (weight, bias) = (format!("{norm}.weight"), format!("{norm}.bias"));
            match (w.contains(&weight), w.contains(&bias)) {
                (true, false) => return Err(OnnxError::MissingWeight(bias)),
                (false, true) => return Err(OnnxError::MissingWeight(weight)),
                _ => {}
            }
        }
        let fc_norm = w.contains("fc_norm.weight");
        Ok(Self {
            num_classes: c,
            pool: pool.unwrap_or(if fc_norm {
                GlobalPool::Avg
            } else {
                GlobalPool::Token
            }),
            final_norm: w.contains("norm.weight"),
            fc_norm,
        })
    }
}

/// The classifier: `images` [N, C, S, S] -> `logits` [N, classes]. timm's forward without
/// dropout: blocks, `norm` (if the weights have one), class token or patch-token mean, `fc_norm`
/// (if present), `head`.
pub fn classifier_model(
    w: &Weights,
    s: &EncoderSpec,
    head: &HeadSpec,
    opset: Opset,
) -> Result<super::proto::ModelProto, OnnxError> {
    use classifier_io::*;
    let mut cx = Ctx {
        g: GraphBuilder::new("droppos_vit_classifier"),
        w,
        opset,
    };
    let d = s.embed_dim;
    let batch = Dim::param("batch");
    let images = cx.images_input(IMAGES, s, &batch);
    let x = cx.embed_full(&images, s)?;
    let mut y = cx.blocks_only(x, s)?;
    if head.final_norm {
        y = cx.layer_norm(&y, "norm", d, s.eps)?;
    }
    let mut pooled = match head.pool {
        GlobalPool::Token => {
            let zero = cx.g.scalar_i64(0);
            cx.g.op("Gather", &[&y, &zero], vec![("axis", Attr::Int(1))])
        }
        GlobalPool::Avg => {
            let patches = cx.drop_first_token(&y);
            // ReduceMean's axes moved from an attribute to an input in opset 18.
            match opset {
                Opset::V17 => cx.g.op(
                    "ReduceMean",
                    &[&patches],
                    vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(0))],
                ),
                Opset::V20 => {
                    let axes = cx.g.const_i64(&[1]);
                    cx.g.op(
                        "ReduceMean",
                        &[&patches, &axes],
                        vec![("keepdims", Attr::Int(0))],
                    )
                }
            }
        }
    };
    if head.fc_norm {
        pooled = cx.layer_norm(&pooled, "fc_norm", d, s.eps)?;
    }
    let logits = cx.linear_with(&pooled, "head", d, head.num_classes, 2)?;
    cx.g.output(
        &logits,
        LOGITS,
        ElemType::F32,
        &[batch, Dim::Fixed(head.num_classes)],
    );
    let mut meta = metadata("classifier", s, opset);
    meta.push(("droppos.num_classes", head.num_classes.to_string()));
    meta.push(("droppos.global_pool", head.pool.as_str().to_string()));
    Ok(cx.g.finish(
        opset.version(),
        "ViT classifier exported by droppos-pipeline: images -> logits",
        &meta,
    ))
}
