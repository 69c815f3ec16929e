//! A linear probe on frozen features, trained in Rust (tch on the CPU): features standardised with
//! the training set's mean and standard deviation (MAE's BatchNorm without affine), then one
//! Linear layer trained with AdamW on softmax cross-entropy, mini-batches in a seeded order.

use anyhow::{bail, Result};
use serde::Serialize;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Probe training settings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProbeConfig {
    pub epochs: usize,
    pub batch_size: i64,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: i64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            batch_size: 256,
            lr: 1e-3,
            weight_decay: 1e-4,
            seed: 0,
        }
    }
}

/// A trained probe.
pub struct LinearProbe {
    _vs: nn::VarStore,
    linear: nn::Linear,
    mean: Tensor,
    std: Tensor,
    pub final_loss: f64,
}

impl std::fmt::Debug for LinearProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinearProbe")
            .field("final_loss", &self.final_loss)
            .finish()
    }
}

fn features(x: &[f32], dim: usize) -> Result<Tensor> {
    if dim == 0 || !x.len().is_multiple_of(dim) {
        bail!("{} feature values are not rows of {dim}", x.len());
    }
    Ok(Tensor::from_slice(x).reshape([(x.len() / dim) as i64, dim as i64]))
}

impl LinearProbe {
    /// Trains on `x` ([n, dim] row-major) with labels `y` in 0..num_classes.
    pub fn train(
        x: &[f32],
        y: &[i64],
        dim: usize,
        num_classes: usize,
        cfg: &ProbeConfig,
    ) -> Result<Self> {
        let x = features(x, dim)?;
        let n = x.size()[0];
        if n as usize != y.len() || n == 0 {
            bail!("{n} feature rows but {} labels", y.len());
        }
        if let Some(&bad) = y.iter().find(|&&l| l < 0 || l as usize >= num_classes) {
            bail!("label {bad} is outside 0..{num_classes}");
        }
        tch::manual_seed(cfg.seed);
        let mean = x.mean_dim(0, true, Kind::Float);
        let std = x.std_dim(0, false, true).clamp_min(1e-6);
        let xs = (&x - &mean) / &std;
        let ys = Tensor::from_slice(y);
        let vs = nn::VarStore::new(Device::Cpu);
        let linear = nn::linear(
            vs.root() / "head",
            dim as i64,
            num_classes as i64,
            Default::default(),
        );
        let mut opt = nn::AdamW {
            wd: cfg.weight_decay,
            ..Default::default()
        }
        .build(&vs, cfg.lr)?;
        let mut final_loss = f64::NAN;
        for epoch in 0..cfg.epochs {
            let perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
            let mut total = 0.0;
            let mut start = 0;
            while start < n {
                let len = cfg.batch_size.min(n - start);
                let idx = perm.narrow(0, start, len);
                let logits = linear.forward(&xs.index_select(0, &idx));
                let loss = logits.cross_entropy_for_logits(&ys.index_select(0, &idx));
                opt.backward_step(&loss);
                total += loss.double_value(&[]) * len as f64;
                start += len;
            }
            final_loss = total / n as f64;
            // Scoring a diverged probe would report chance as a result.
            if !final_loss.is_finite() {
                bail!(
                    "the probe's training loss became {final_loss} in epoch {epoch}: lower --lr \
                     (it is {})",
                    cfg.lr
                );
            }
        }
        Ok(Self {
            _vs: vs,
            linear,
            mean,
            std,
            final_loss,
        })
    }

    /// Logits [n, classes] for `x` ([n, dim] row-major).
    pub fn logits(&self, x: &[f32], dim: usize) -> Result<Tensor> {
        let x = features(x, dim)?;
        Ok(tch::no_grad(|| {
            self.linear.forward(&((x - &self.mean) / &self.std))
        }))
    }

    /// Predicted classes ranked by logit, the first `top` per row.
    pub fn predict_topk(&self, x: &[f32], dim: usize, top: i64) -> Result<Vec<Vec<i64>>> {
        let logits = self.logits(x, dim)?;
        let classes = logits.size()[1];
        let (_, idx) = logits.topk(top.min(classes), -1, true, true);
        let rows = idx.size()[0];
        let flat = Vec::<i64>::try_from(idx.reshape([-1]))?;
        let k = (flat.len() as i64 / rows.max(1)) as usize;
        Ok(flat.chunks(k.max(1)).map(<[i64]>::to_vec).collect())
    }
}

/// Top-1 / top-5 accuracy of ranked predictions.
pub fn topk_accuracy(ranked: &[Vec<i64>], labels: &[i64]) -> (f64, f64) {
    let n = labels.len().max(1) as f64;
    let top1 = ranked
        .iter()
        .zip(labels)
        .filter(|(r, l)| r.first() == Some(l))
        .count();
    let top5 = ranked
        .iter()
        .zip(labels)
        .filter(|(r, l)| r.iter().take(5).any(|p| p == *l))
        .count();
    (top1 as f64 / n, top5 as f64 / n)
}

/// Linear-probe accuracy.
#[derive(Debug, Clone, Serialize)]
pub struct LinearResult {
    pub train_top1: f64,
    pub top1: f64,
    pub top5: f64,
    pub final_train_loss: f64,
    pub num_train: usize,
    pub num_val: usize,
    pub num_classes: usize,
    pub config: ProbeConfig,
}

/// Trains on the training features and measures accuracy on the test features.
pub fn linear_probe(
    train_x: &[f32],
    train_y: &[i64],
    test_x: &[f32],
    test_y: &[i64],
    dim: usize,
    num_classes: usize,
    cfg: &ProbeConfig,
) -> Result<LinearResult> {
    let probe = LinearProbe::train(train_x, train_y, dim, num_classes, cfg)?;
    let (train_top1, _) = topk_accuracy(&probe.predict_topk(train_x, dim, 5)?, train_y);
    let (top1, top5) = topk_accuracy(&probe.predict_topk(test_x, dim, 5)?, test_y);
    Ok(LinearResult {
        train_top1,
        top1,
        top5,
        final_train_loss: probe.final_loss,
        num_train: train_y.len(),
        num_val: test_y.len(),
        num_classes,
        config: *cfg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_linearly_separable_problem() {
        let _rng = crate::torch_rng_lock();
        // Three classes along three axes with an offset the standardisation must handle.
        let dim = 3;
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..90 {
            let c = i % 3;
            let mut row = [10.0f32, 10.0, 10.0];
            row[c] += 1.0 + (i as f32 * 0.37).sin() * 0.2;
            x.extend_from_slice(&row);
            y.push(c as i64);
        }
        let cfg = ProbeConfig {
            epochs: 60,
            batch_size: 32,
            lr: 0.05,
            ..Default::default()
        };
        let r = linear_probe(&x, &y, &x, &y, dim, 3, &cfg).unwrap();
        assert_eq!(r.top1, 1.0, "{r:?}");
        assert_eq!(r.train_top1, 1.0);
        assert!(r.final_train_loss < 0.3, "{r:?}");
    }

    #[test]
    fn rejects_bad_labels() {
        assert!(LinearProbe::train(&[0.0, 1.0], &[3], 2, 2, &ProbeConfig::default()).is_err());
        assert!(LinearProbe::train(&[0.0, 1.0, 2.0], &[0], 2, 2, &ProbeConfig::default()).is_err());
    }

    #[test]
    fn topk_counts() {
        let ranked = vec![vec![1, 2, 3], vec![0, 1, 2], vec![2, 0, 1]];
        assert_eq!(topk_accuracy(&ranked, &[1, 1, 5]), (1.0 / 3.0, 2.0 / 3.0));
    }
}
