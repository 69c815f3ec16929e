//! Learning-rate and σ schedules of the reference (MAE's `lr_sched.adjust_learning_rate`).

use serde::{Deserialize, Serialize};

/// Absolute learning rate from the base one: `blr · global_batch / 256`, where the global batch
/// is per-device batch × accumulation steps × number of processes.
pub fn lr_from_blr(blr: f64, global_batch: usize) -> f64 {
    blr * global_batch as f64 / 256.0
}

/// Linear warm-up from 0, then a half-cycle cosine down to `min_lr`, evaluated at fractional
/// epochs (`epoch + iter / iters_per_epoch`), i.e. set every iteration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CosineSchedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub epochs: f64,
}

impl CosineSchedule {
    /// Learning rate at fractional epoch `t`.
    pub fn lr_at(&self, t: f64) -> f64 {
        if t < self.warmup_epochs {
            self.lr * t / self.warmup_epochs
        } else {
            let span = self.epochs - self.warmup_epochs;
            let progress = if span > 0.0 {
                (t - self.warmup_epochs) / span
            } else {
                1.0
            };
            self.min_lr
                + (self.lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }

    /// Learning rate of iteration `iter` (0-based) of epoch `epoch`, as the reference computes it:
    /// `lr_at(iter / iters_per_epoch + epoch)`.
    pub fn lr_at_iter(&self, epoch: usize, iter: usize, iters_per_epoch: usize) -> f64 {
        self.lr_at(iter as f64 / iters_per_epoch.max(1) as f64 + epoch as f64)
    }
}

/// σ of epoch `epoch`: `(1 − epoch / epochs) · σ0` with decay, σ0 otherwise.
pub fn sigma_at(sigma0: f64, decay: bool, epoch: usize, epochs: usize) -> f64 {
    if decay && epochs > 0 {
        (1.0 - epoch as f64 / epochs as f64) * sigma0
    } else {
        sigma0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = CosineSchedule {
            lr: 1.0,
            min_lr: 0.1,
            warmup_epochs: 2.0,
            epochs: 10.0,
        };
        assert_eq!(s.lr_at(0.0), 0.0);
        assert_eq!(s.lr_at(1.0), 0.5);
        assert_eq!(s.lr_at(2.0), 1.0);
        assert!((s.lr_at(6.0) - 0.55).abs() < 1e-12);
        assert!((s.lr_at(10.0) - 0.1).abs() < 1e-12);
        assert_eq!(s.lr_at_iter(1, 50, 100), s.lr_at(1.5));
    }

    #[test]
    fn blr_and_sigma() {
        assert_eq!(lr_from_blr(1.5e-4, 2048), 1.2e-3);
        assert_eq!(sigma_at(1.0, true, 0, 200), 1.0);
        assert_eq!(sigma_at(1.0, true, 100, 200), 0.5);
        assert_eq!(sigma_at(1.0, false, 100, 200), 1.0);
    }
}
