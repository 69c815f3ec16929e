//! Weighted k-NN classification on L2-normalised features (the DINO / DropPos protocol): the k
//! most cosine-similar training samples vote for their label with weight exp(sim / T).

use rayon::prelude::*;
use serde::Serialize;

/// k-NN settings.
#[derive(Debug, Clone, Copy)]
pub struct KnnConfig {
    pub k: usize,
    pub temperature: f32,
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self {
            k: 20,
            temperature: 0.07,
        }
    }
}

/// k-NN accuracy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KnnResult {
    pub top1: f64,
    pub top5: f64,
    pub k: usize,
    pub temperature: f32,
    /// Size of the memory bank.
    pub num_train: usize,
    pub num_queries: usize,
    pub num_classes: usize,
    /// Queries were the memory bank itself, each one left out of its own vote.
    pub leave_one_out: bool,
}

/// L2-normalised feature rows ([n, dim] row-major) with their class indices.
#[derive(Debug, Clone, Copy)]
pub struct Labelled<'a> {
    pub x: &'a [f32],
    pub labels: &'a [usize],
}

/// Row-wise L2 normalisation of `x` ([n, dim] row-major), in place; zero rows stay zero.
pub fn l2_normalize(x: &mut [f32], dim: usize) {
    x.par_chunks_mut(dim.max(1)).for_each(|row| {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 0.0 {
            row.iter_mut().for_each(|v| *v /= n);
        }
    });
}

/// Votes per class for one query: each of the k most similar bank rows (row `exclude` left
/// out) adds exp(sim / T) to its class.
pub fn votes(
    sims: &[f32],
    bank_labels: &[usize],
    cfg: &KnnConfig,
    classes: usize,
    exclude: Option<usize>,
) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..sims.len()).filter(|&i| Some(i) != exclude).collect();
    let k = cfg.k.min(idx.len());
    if k < idx.len() {
        idx.select_nth_unstable_by(k, |&a, &b| sims[b].total_cmp(&sims[a]));
        idx.truncate(k);
    }
    let mut votes = vec![0f64; classes];
    for &i in &idx {
        votes[bank_labels[i]] += (f64::from(sims[i]) / f64::from(cfg.temperature)).exp();
    }
    votes
}

/// Classes ranked by vote (descending; ties by lower class index).
pub fn ranked(votes: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..votes.len()).collect();
    order.sort_by(|&a, &b| votes[b].total_cmp(&votes[a]).then(a.cmp(&b)));
    order
}

/// Classifies every query row against the memory bank, or with `queries` = None every bank row
/// against the others (leave-one-out). Labels are class indices below `num_classes`.
pub fn knn_classify(
    bank: Labelled<'_>,
    queries: Option<Labelled<'_>>,
    dim: usize,
    num_classes: usize,
    cfg: &KnnConfig,
) -> KnnResult {
    let leave_one_out = queries.is_none();
    let q = queries.unwrap_or(bank);
    debug_assert_eq!(bank.x.len(), bank.labels.len() * dim);
    debug_assert_eq!(q.x.len(), q.labels.len() * dim);
    let hits: Vec<(bool, bool)> =
        q.x.par_chunks(dim.max(1))
            .zip(q.labels.par_iter())
            .enumerate()
            .map(|(qi, (row, &label))| {
                let sims: Vec<f32> = bank
                    .x
                    .chunks(dim.max(1))
                    .map(|t| t.iter().zip(row).map(|(a, b)| a * b).sum())
                    .collect();
                let exclude = leave_one_out.then_some(qi);
                let order = ranked(&votes(&sims, bank.labels, cfg, num_classes, exclude));
                let top5 = order.iter().take(5).any(|&c| c == label);
                (order.first() == Some(&label), top5)
            })
            .collect();
    let n = hits.len().max(1) as f64;
    KnnResult {
        top1: hits.iter().filter(|h| h.0).count() as f64 / n,
        top5: hits.iter().filter(|h| h.1).count() as f64 / n,
        k: cfg.k,
        temperature: cfg.temperature,
        num_train: bank.labels.len(),
        num_queries: q.labels.len(),
        num_classes,
        leave_one_out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separable_clusters_are_found() {
        // Two classes on opposite directions, plus noise.
        let dim = 4;
        let mut train = Vec::new();
        let mut labels = Vec::new();
        for i in 0..30 {
            let c = i % 2;
            let s = if c == 0 { 1.0 } else { -1.0 };
            train.extend_from_slice(&[s, s * 0.5, 0.01 * i as f32, 0.0]);
            labels.push(c);
        }
        let mut test = vec![0.9, 0.4, 0.0, 0.1, -1.0, -0.6, 0.2, 0.0];
        let test_labels = vec![0, 1];
        l2_normalize(&mut train, dim);
        l2_normalize(&mut test, dim);
        let bank = Labelled {
            x: &train,
            labels: &labels,
        };
        let q = Labelled {
            x: &test,
            labels: &test_labels,
        };
        let r = knn_classify(bank, Some(q), dim, 2, &KnnConfig::default());
        assert_eq!((r.top1, r.top5), (1.0, 1.0));
        assert_eq!((r.num_train, r.num_queries), (30, 2));
        assert!(!r.leave_one_out);
    }

    #[test]
    fn votes_match_hand_computed_values() {
        // Binary-exact inputs, T = 1/8 so sim / T = 6, 4, 1, 2. k = 3: the three most similar
        // rows are 0 (class 0), 1 and 3 (class 1); row 2 is not among them.
        let sims = [0.75f32, 0.5, 0.125, 0.25];
        let labels = [0usize, 1, 0, 1];
        let cfg = KnnConfig {
            k: 3,
            temperature: 0.125,
        };
        let e = f64::exp;
        let close = |got: &[f64], want: &[f64]| {
            got.len() == want.len()
                && got
                    .iter()
                    .zip(want)
                    .all(|(g, w)| (g - w).abs() <= 1e-12 * w.max(1.0))
        };
        let v = votes(&sims, &labels, &cfg, 3, None);
        assert!(close(&v, &[e(6.0), e(4.0) + e(2.0), 0.0]), "{v:?}");
        // e^6 = 403.4 > e^4 + e^2 = 62.0: class 0 first, then 1, then the empty class 2.
        assert_eq!(ranked(&v), vec![0, 1, 2]);
        // Leaving row 0 out brings row 2 in: class 0 gets e^1 = 2.72 < 62.0.
        let v = votes(&sims, &labels, &cfg, 3, Some(0));
        assert!(close(&v, &[e(1.0), e(4.0) + e(2.0), 0.0]), "{v:?}");
        assert_eq!(ranked(&v)[0], 1);
        // k = 1: only the nearest row votes.
        let one = KnnConfig { k: 1, ..cfg };
        assert!(close(&votes(&sims, &labels, &one, 2, None), &[e(6.0), 0.0]));
        // A high temperature flattens the weights: the majority of the k wins.
        let flat = KnnConfig {
            k: 3,
            temperature: 100.0,
        };
        assert_eq!(ranked(&votes(&sims, &labels, &flat, 2, None))[0], 1);
    }

    #[test]
    fn top5_and_leave_one_out() {
        // Six 1-d "features" (all +1 after normalisation) in six classes: every vote ties, so
        // the ranking is by class index. Queries of classes 0..4 are in the top 5, class 5 not.
        let x = vec![1.0f32; 6];
        let labels: Vec<usize> = (0..6).collect();
        let bank = Labelled {
            x: &x,
            labels: &labels,
        };
        let cfg = KnnConfig {
            k: 20,
            temperature: 0.07,
        };
        let r = knn_classify(bank, Some(bank), 1, 6, &cfg);
        assert_eq!(r.top1, 1.0 / 6.0);
        assert_eq!(r.top5, 5.0 / 6.0);
        // Leave-one-out: a query never votes for itself, so its own class gets nothing; class 0
        // is first for every query but query 0, and the own class is never in the top 5.
        let r = knn_classify(bank, None, 1, 6, &cfg);
        assert!(r.leave_one_out);
        assert_eq!((r.top1, r.top5), (0.0, 0.0));
    }

    #[test]
    fn normalises_rows() {
        let mut x = vec![3.0, 4.0, 0.0, 0.0];
        l2_normalize(&mut x, 2);
        assert_eq!(x, vec![0.6, 0.8, 0.0, 0.0]);
    }
}
