//! Position accuracy of the `droppos` export: for each image, keep a random (1 − mask ratio)
//! share of the patches, drop the positions of a random pos-mask-ratio share of those, and count
//! how often the arg-max of the predicted position is the patch's true position. Masks use the
//! reference's rule (argsort of uniform noise, `int(M·(1−r))` kept) from a seeded generator, so
//! a run is reproducible.

use anyhow::{bail, Result};
use droppos_model::masking::random_masking;
use droppos_model::onnx::droppos_io;
use droppos_shards::loader::rng::{mix, DOMAIN_MASK};
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::ort_runtime::{Input, OrtModel};

/// Accuracy at one (mask ratio, position mask ratio).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PositionScore {
    pub mask_ratio: f64,
    pub pos_mask_ratio: f64,
    /// Visible patches per image (K).
    pub visible: i64,
    /// Accuracy over visible patches whose position was dropped (the DropPos acc1 with unit
    /// weights); null when no position is dropped.
    pub acc_dropped: Option<f64>,
    /// Accuracy over all visible patches (kept positions included).
    pub acc_visible: f64,
    pub predictions_dropped: u64,
    pub predictions_visible: u64,
    /// 1 / L: what a uniform guess scores.
    pub chance: f64,
}

/// The mask seed of one image: sample `sample` (its place in the evaluation order), draw `draw`
/// of `--repeats`, ratio number `ratio`, in a run seeded with `seed`. Per image, not per batch,
/// so the masks (and the scores) do not depend on `--batch-size`.
pub fn sample_seed(seed: i64, sample: i64, draw: u32, ratio: usize) -> i64 {
    // The loader's key mixer: nearby coordinates get unrelated streams.
    let key = mix(&[
        DOMAIN_MASK,
        seed as u64,
        sample as u64,
        u64::from(draw),
        ratio as u64,
    ]);
    (key >> 1) as i64
}

/// Running counts for one ratio pair.
#[derive(Debug, Clone)]
pub struct PositionCounter {
    pub mask_ratio: f64,
    pub pos_mask_ratio: f64,
    visible: i64,
    hits_dropped: u64,
    n_dropped: u64,
    hits_visible: u64,
    n_visible: u64,
    num_patches: i64,
}

impl PositionCounter {
    pub fn new(mask_ratio: f64, pos_mask_ratio: f64) -> Result<Self> {
        for (flag, r) in [
            ("--mask-ratio", mask_ratio),
            ("--pos-mask-ratio", pos_mask_ratio),
        ] {
            if !(0.0..1.0).contains(&r) {
                bail!("{flag} must be in [0, 1), got {r}");
            }
        }
        Ok(Self {
            mask_ratio,
            pos_mask_ratio,
            visible: 0,
            hits_dropped: 0,
            n_dropped: 0,
            hits_visible: 0,
            n_visible: 0,
            num_patches: 0,
        })
    }

    /// Scores one batch: `images` [n, 3, S, S]; image j's masks come from
    /// `seeds(j)` alone (see [`sample_seed`]).
    pub fn add_batch(
        &mut self,
        model: &mut OrtModel,
        images: &[f32],
        n: usize,
        img: usize,
        num_patches: i64,
        seeds: impl Fn(usize) -> i64,
    ) -> Result<()> {
        // K from the reference's rule, before drawing any noise.
        let k = random_masking(
            &Tensor::zeros([1, num_patches], (Kind::Float, tch::Device::Cpu)),
            self.mask_ratio,
        )?
        .keep();
        if k == 0 {
            bail!(
                "mask ratio {} leaves no visible patch of {num_patches}",
                self.mask_ratio
            );
        }
        let opts = (Kind::Float, tch::Device::Cpu);
        let (mut patch_noise, mut pos_noise) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for j in 0..n {
            tch::manual_seed(seeds(j));
            patch_noise.push(Tensor::rand([1, num_patches], opts));
            pos_noise.push(Tensor::rand([1, k], opts));
        }
        let patch = random_masking(&Tensor::cat(&patch_noise, 0), self.mask_ratio)?;
        let pos = random_masking(&Tensor::cat(&pos_noise, 0), self.pos_mask_ratio)?;
        let n = n as i64;
        let ids: Vec<i64> = Vec::try_from(patch.ids_keep.reshape([-1]))?;
        let mask: Vec<f32> = Vec::try_from(pos.mask.to_kind(Kind::Float).reshape([-1]))?;
        let ishape = [n, 3, img as i64, img as i64];
        let outs = model.run(
            &[
                Input::f32(droppos_io::IMAGES, &ishape, images),
                Input::i64(droppos_io::IDS_KEEP, &[n, k], &ids),
                Input::f32(droppos_io::MASK_POS, &[n, k], &mask),
            ],
            &[droppos_io::LOGITS],
        )?;
        let logits = &outs[0];
        let l = *logits.shape.last().unwrap_or(&0);
        if logits.shape != [n, k, l] || l != num_patches {
            bail!(
                "position logits have shape {:?}, expected [{n}, {k}, {num_patches}]",
                logits.shape
            );
        }
        for (row, (&truth, &dropped)) in logits.data.chunks(l as usize).zip(ids.iter().zip(&mask)) {
            let pred = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                .map_or(-1, |(i, _)| i as i64);
            let hit = u64::from(pred == truth);
            self.hits_visible += hit;
            self.n_visible += 1;
            if dropped > 0.5 {
                self.hits_dropped += hit;
                self.n_dropped += 1;
            }
        }
        self.visible = k;
        self.num_patches = num_patches;
        Ok(())
    }

    pub fn score(&self) -> PositionScore {
        PositionScore {
            mask_ratio: self.mask_ratio,
            pos_mask_ratio: self.pos_mask_ratio,
            visible: self.visible,
            acc_dropped: (self.n_dropped > 0)
                .then(|| self.hits_dropped as f64 / self.n_dropped as f64),
            acc_visible: self.hits_visible as f64 / self.n_visible.max(1) as f64,
            predictions_dropped: self.n_dropped,
            predictions_visible: self.n_visible,
            chance: 1.0 / self.num_patches.max(1) as f64,
        }
    }
}
