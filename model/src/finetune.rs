//! Fine-tuning pieces of the paper's protocol (MAE's, ../SPEC §2): layer-wise learning-rate
//! decay, Mixup / CutMix with label smoothing (timm's `Mixup` in batch mode), random erasing and
//! the soft-target cross-entropy. The classifier itself is [`crate::classifier::VitClassifier`].

use droppos_shards::loader::rng::Rng;
use tch::{Kind, Tensor};

/// MAE's layer id: `cls_token`, `pos_embed`, `patch_embed.*` → 0; `blocks.i.*` → i + 1;
/// everything else (fc_norm, head) → depth + 1.
pub fn layer_id(name: &str, depth: usize) -> usize {
    if matches!(name, "cls_token" | "pos_embed" | "mask_token") || name.starts_with("patch_embed") {
        return 0;
    }
    if let Some(rest) = name.strip_prefix("blocks.") {
        if let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
            return i + 1;
        }
    }
    depth + 1
}

/// Parameters the fine-tuning protocol keeps out of weight decay besides 1-D tensors and biases:
/// timm's `VisionTransformer.no_weight_decay()`, which MAE's `param_groups_lrd` is given.
pub const NO_WEIGHT_DECAY: [&str; 3] = ["pos_embed", "cls_token", "dist_token"];

/// The learning-rate multiplier `decay^(depth + 1 - layer_id)`.
pub fn layer_decay_scale(name: &str, depth: usize, decay: f64) -> f64 {
    decay.powi((depth + 1 - layer_id(name, depth).min(depth + 1)) as i32)
}

/// Mixup / CutMix settings (timm names). Each batch draws one mode: CutMix with probability
/// `switch_prob` when both alphas are positive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixConfig {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    pub switch_prob: f64,
    pub label_smoothing: f64,
}

impl Default for MixConfig {
    fn default() -> Self {
        Self {
            mixup_alpha: 0.8,
            cutmix_alpha: 1.0,
            switch_prob: 0.5,
            label_smoothing: 0.1,
        }
    }
}

/// The seeded generator of the per-batch mixing and erasing draws: the loader's generator
/// plus the Beta draws Mixup / CutMix need.
#[derive(Debug, Clone)]
pub struct MixRng(Rng);

impl MixRng {
    pub fn new(seed: u64) -> Self {
        Self(Rng::from_key(seed))
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.next_f64()
    }

    /// Gamma(shape, 1) (Marsaglia-Tsang; boosted for shape < 1).
    fn gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = 1.0 - self.uniform();
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.0.normal();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = 1.0 - self.uniform();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// Beta(a, a).
    pub fn beta(&mut self, a: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(a);
        x / (x + y)
    }

    fn below(&mut self, n: i64) -> i64 {
        self.0.below(n as u64) as i64
    }
}

/// Smoothed one-hot targets [N, classes]: `1 - s + s/C` on the label, `s/C` elsewhere.
pub fn smooth_one_hot(labels: &Tensor, classes: i64, smoothing: f64) -> Tensor {
    let off = smoothing / classes as f64;
    let on = 1.0 - smoothing + off;
    labels.one_hot(classes).to_kind(Kind::Float) * (on - off) + off
}

/// Mixes a batch with its reverse (timm's batch mode): images [N, C, H, W] (float), labels [N]
/// (int64). Returns the mixed images, the soft targets [N, classes] and the mixing weight λ.
pub fn mix_batch(
    images: &Tensor,
    labels: &Tensor,
    classes: i64,
    cfg: &MixConfig,
    rng: &mut MixRng,
) -> (Tensor, Tensor, f64) {
    let y1 = smooth_one_hot(labels, classes, cfg.label_smoothing);
    let use_cutmix = match (cfg.mixup_alpha > 0.0, cfg.cutmix_alpha > 0.0) {
        (true, true) => rng.uniform() < cfg.switch_prob,
        (false, true) => true,
        (_, false) => false,
    };
    let mut lam = 1.0;
    let mut x = images.shallow_clone();
    if use_cutmix {
        lam = rng.beta(cfg.cutmix_alpha);
        let s = images.size();
        let (h, w) = (s[2], s[3]);
        let ratio = (1.0 - lam).sqrt();
        let (ch, cw) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
        let (cy, cx) = (rng.below(h), rng.below(w));
        let (y0, y1b) = ((cy - ch / 2).clamp(0, h), (cy + ch / 2).clamp(0, h));
        let (x0, x1b) = ((cx - cw / 2).clamp(0, w), (cx + cw / 2).clamp(0, w));
        if y1b > y0 && x1b > x0 {
            x = images.copy();
            let patch = images
                .flip([0])
                .narrow(2, y0, y1b - y0)
                .narrow(3, x0, x1b - x0);
            x.narrow(2, y0, y1b - y0)
                .narrow(3, x0, x1b - x0)
                .copy_(&patch);
        }
        // λ from the box actually pasted (it was clipped at the borders).
        lam = 1.0 - ((y1b - y0) * (x1b - x0)) as f64 / (h * w) as f64;
    } else if cfg.mixup_alpha > 0.0 {
        lam = rng.beta(cfg.mixup_alpha);
        x = images * lam + images.flip([0]) * (1.0 - lam);
    }
    let y = &y1 * lam + y1.flip([0]) * (1.0 - lam);
    (x, y, lam)
}

/// timm's `RandomErasing` (mode `pixel`, one box): with probability `prob`, each image of the
/// normalised batch [N, C, H, W] gets one box of area 2-33 % and aspect ratio 0.3-3.3
/// (log-uniform), up to 10 placement attempts, filled with N(0, 1) noise from libtorch's
/// generator. Returns the boxes drawn (top, left, h, w) per erased image.
pub fn random_erase(
    images: &mut Tensor,
    prob: f64,
    rng: &mut MixRng,
) -> Vec<(usize, i64, i64, i64, i64)> {
    let s = images.size();
    let (n, c, ih, iw) = (s[0], s[1], s[2], s[3]);
    let area = (ih * iw) as f64;
    let (la, lb) = (0.3f64.ln(), (1.0f64 / 0.3).ln());
    let mut boxes = Vec::new();
    for i in 0..n {
        if rng.uniform() > prob {
            continue;
        }
        for _ in 0..10 {
            let target = (0.02 + rng.uniform() * (1.0 / 3.0 - 0.02)) * area;
            let ratio = (la + rng.uniform() * (lb - la)).exp();
            let h = (target * ratio).sqrt().round() as i64;
            let w = (target / ratio).sqrt().round() as i64;
            if w < iw && h < ih && w > 0 && h > 0 {
                let top = rng.below(ih - h + 1);
                let left = rng.below(iw - w + 1);
                let noise = Tensor::randn([c, h, w], (images.kind(), images.device()));
                images
                    .get(i)
                    .narrow(1, top, h)
                    .narrow(2, left, w)
                    .copy_(&noise);
                boxes.push((i as usize, top, left, h, w));
                break;
            }
        }
    }
    boxes
}

/// Cross-entropy against soft targets: mean over the batch of −Σ y · log_softmax(logits).
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    (-(targets * logits.log_softmax(-1, Kind::Float)))
        .sum_dim_intlist(Some([-1i64].as_slice()), false, Kind::Float)
        .mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn layer_ids_follow_mae() {
        assert_eq!(layer_id("cls_token", 12), 0);
        assert_eq!(layer_id("patch_embed.proj.weight", 12), 0);
        assert_eq!(layer_id("blocks.0.attn.qkv.weight", 12), 1);
        assert_eq!(layer_id("blocks.11.mlp.fc2.bias", 12), 12);
        assert_eq!(layer_id("fc_norm.weight", 12), 13);
        assert_eq!(layer_id("head.weight", 12), 13);
        assert!((layer_decay_scale("head.bias", 12, 0.75) - 1.0).abs() < 1e-15);
        assert!((layer_decay_scale("pos_embed", 2, 0.5) - 0.125).abs() < 1e-15);
    }

    #[test]
    fn targets_sum_to_one_and_mixing_is_consistent() {
        let images = Tensor::rand([6, 3, 8, 8], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0]);
        let mut rng = MixRng::new(3);
        for cfg in [
            MixConfig::default(),
            MixConfig {
                cutmix_alpha: 0.0,
                ..MixConfig::default()
            },
            MixConfig {
                mixup_alpha: 0.0,
                ..MixConfig::default()
            },
        ] {
            for _ in 0..5 {
                let (x, y, lam) = mix_batch(&images, &labels, 5, &cfg, &mut rng);
                assert_eq!(x.size(), images.size());
                assert!((0.0..=1.0).contains(&lam), "{lam}");
                let sums = y.sum_dim_intlist(Some([1i64].as_slice()), false, Kind::Float);
                let err = f64::try_from((sums - 1.0).abs().max()).unwrap();
                assert!(err < 1e-5, "{err}");
                // The label's weight: at least λ·(1 - s + s/C) for every sample.
                let on = y.gather(1, &labels.unsqueeze(1), false).min();
                assert!(f64::try_from(on).unwrap() >= lam.min(1.0 - lam) * 0.9 - 1e-6);
            }
        }
        // No mixing: smoothed one-hot targets and the images unchanged.
        let none = MixConfig {
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            ..MixConfig::default()
        };
        let (x, y, lam) = mix_batch(&images, &labels, 5, &none, &mut rng);
        assert_eq!(lam, 1.0);
        assert!(x.equal(&images));
        let want = 1.0 - 0.1 + 0.02;
        let got = f64::try_from(y.get(1).get(1)).unwrap();
        assert!((got - want).abs() < 1e-6);
    }

    #[test]
    fn soft_ce_equals_ce_for_one_hot() {
        let logits = Tensor::randn([4, 7], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[1i64, 6, 0, 3]);
        let hard = logits.cross_entropy_for_logits(&labels);
        let soft = soft_cross_entropy(&logits, &smooth_one_hot(&labels, 7, 0.0));
        let d = f64::try_from((hard - soft).abs()).unwrap();
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn random_erasing_boxes_have_the_documented_sizes() {
        let mut rng = MixRng::new(5);
        let mut x = Tensor::zeros([400, 3, 32, 32], (Kind::Float, Device::Cpu));
        let boxes = random_erase(&mut x, 0.25, &mut rng);
        let frac = boxes.len() as f64 / 400.0;
        assert!((frac - 0.25).abs() < 0.07, "{frac}");
        for &(i, top, left, h, w) in &boxes {
            assert!(top + h <= 32 && left + w <= 32);
            let a = (h * w) as f64 / 1024.0;
            assert!((0.01..=0.36).contains(&a), "{a}");
            // Only the box changed.
            let img = x.get(i as i64);
            let nonzero = |t: &Tensor| i64::try_from(t.ne(0.0).sum(Kind::Int64)).unwrap();
            let inside = nonzero(&img.narrow(1, top, h).narrow(2, left, w));
            assert_eq!(inside, nonzero(&img));
            assert!(inside > 0);
        }
        let untouched: Vec<i64> = (0..400)
            .filter(|i| !boxes.iter().any(|b| b.0 as i64 == *i))
            .collect();
        for i in untouched.into_iter().take(20) {
            assert_eq!(f64::try_from(x.get(i).abs().sum(Kind::Float)).unwrap(), 0.0);
        }
    }

    #[test]
    fn beta_draws_have_the_right_mean() {
        let mut rng = MixRng::new(1);
        for a in [0.8, 1.0, 2.0] {
            let m: f64 = (0..20_000).map(|_| rng.beta(a)).sum::<f64>() / 20_000.0;
            assert!((m - 0.5).abs() < 0.01, "{a}: {m}");
        }
    }
}
