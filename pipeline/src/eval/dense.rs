//! Dense probe: training-patch selection and metrics (patch accuracy, mean IoU over the patch
//! grid).

use serde::Serialize;

use super::Features;

/// Indices of the patches whose label passes `keep`; past `max` of them, a seeded random subset
/// of `max` (ascending).
pub fn sample_indices(
    labels: &[i32],
    keep: impl Fn(i32) -> bool,
    max: usize,
    seed: i64,
) -> Vec<usize> {
    let idx: Vec<usize> = (0..labels.len()).filter(|&i| keep(labels[i])).collect();
    if idx.len() <= max {
        return idx;
    }
    tch::manual_seed(seed);
    let perm = tch::Tensor::randperm(idx.len() as i64, (tch::Kind::Int64, tch::Device::Cpu));
    let perm = Vec::<i64>::try_from(perm.narrow(0, 0, max as i64)).unwrap_or_default();
    let mut sub: Vec<usize> = perm.into_iter().map(|p| idx[p as usize]).collect();
    sub.sort_unstable();
    sub
}

/// Patch-token rows and labels of the patches `idx` (flat indices over [n, L]).
pub fn gather(f: &Features, idx: &[usize]) -> (Vec<f32>, Vec<i64>) {
    let dim = f.dim;
    let mut x = Vec::with_capacity(idx.len() * dim);
    let mut y = Vec::with_capacity(idx.len());
    for &i in idx {
        x.extend_from_slice(&f.patches[i * dim..(i + 1) * dim]);
        y.push(i64::from(f.patch_labels[i]));
    }
    (x, y)
}

/// A confusion matrix over `classes` labels (rows = truth, columns = prediction).
#[derive(Debug, Clone)]
pub struct Confusion {
    classes: usize,
    counts: Vec<u64>,
}

/// Dense-probe scores.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DenseScores {
    pub patch_accuracy: f64,
    pub miou: f64,
    /// Classes that occur in the truth or the prediction (the mIoU's denominator).
    pub classes_scored: usize,
    pub patches: u64,
}

impl Confusion {
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    pub fn add(&mut self, truth: usize, pred: usize) {
        self.counts[truth * self.classes + pred] += 1;
    }

    /// Accuracy over all counted patches; IoU = TP / (TP + FP + FN) averaged over classes
    /// with a non-empty union.
    pub fn scores(&self) -> DenseScores {
        let c = self.classes;
        let total: u64 = self.counts.iter().sum();
        let diag: u64 = (0..c).map(|i| self.counts[i * c + i]).sum();
        let mut ious = Vec::new();
        for k in 0..c {
            let tp = self.counts[k * c + k];
            let row: u64 = self.counts[k * c..(k + 1) * c].iter().sum();
            let col: u64 = (0..c).map(|i| self.counts[i * c + k]).sum();
            let union = row + col - tp;
            if union > 0 {
                ious.push(tp as f64 / union as f64);
            }
        }
        DenseScores {
            patch_accuracy: if total == 0 {
                0.0
            } else {
                diag as f64 / total as f64
            },
            miou: if ious.is_empty() {
                0.0
            } else {
                ious.iter().sum::<f64>() / ious.len() as f64
            },
            classes_scored: ious.len(),
            patches: total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_miou() {
        let mut m = Confusion::new(3);
        // truth 0: 3 right, 1 as class 1; truth 1: 2 right; class 2 never appears.
        for _ in 0..3 {
            m.add(0, 0);
        }
        m.add(0, 1);
        m.add(1, 1);
        m.add(1, 1);
        let s = m.scores();
        assert_eq!(s.patches, 6);
        assert!((s.patch_accuracy - 5.0 / 6.0).abs() < 1e-12);
        // IoU0 = 3 / 4, IoU1 = 2 / 3; class 2 not scored.
        assert!((s.miou - (0.75 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert_eq!(s.classes_scored, 2);
    }

    #[test]
    fn miou_hand_computed_with_false_positives() {
        // 2 classes. truth 0 -> pred 0 x2, pred 1 x1; truth 1 -> pred 0 x3, pred 1 x4.
        // IoU0 = 2 / (3 + 5 - 2) = 1/3; IoU1 = 4 / (7 + 5 - 4) = 1/2; mIoU = 5/12.
        let mut m = Confusion::new(2);
        for (t, p, n) in [(0, 0, 2), (0, 1, 1), (1, 0, 3), (1, 1, 4)] {
            for _ in 0..n {
                m.add(t, p);
            }
        }
        let s = m.scores();
        assert!((s.miou - 5.0 / 12.0).abs() < 1e-12, "{s:?}");
        assert!((s.patch_accuracy - 0.6).abs() < 1e-12);
        // A class only ever predicted (never true) still counts: IoU 0 joins the mean.
        let mut m = Confusion::new(3);
        m.add(0, 0);
        m.add(1, 2);
        let s = m.scores();
        assert_eq!(s.classes_scored, 3);
        assert!((s.miou - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(Confusion::new(4).scores().patches, 0);
    }

    #[test]
    fn sampling_keeps_labels_and_caps() {
        let _rng = crate::torch_rng_lock();
        let labels = [0, -1, 2, 0, 5, 0];
        let keep = |l: i32| l >= 0 && l != 5;
        assert_eq!(sample_indices(&labels, keep, 10, 0), vec![0, 2, 3, 5]);
        let sub = sample_indices(&labels, keep, 2, 7);
        assert_eq!(sub.len(), 2);
        assert!(sub.windows(2).all(|w| w[0] < w[1]));
        assert!(sub.iter().all(|&i| keep(labels[i])));
        assert_eq!(sub, sample_indices(&labels, keep, 2, 7));
    }
}
