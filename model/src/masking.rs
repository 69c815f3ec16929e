//! Random masking driven by a noise tensor, with the reference's argsort semantics.
//!
//! Given the same noise the reference keeps exactly the same elements: the `keep` smallest noise
//! values, in ascending-noise order. Keep counts truncate `M·(1 − r)` computed in float64
//! (`int(9 · 0.4) = 3`).

use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};

/// `int(m · (1 − ratio))` in float64, as Python computes it.
pub fn keep_count(m: i64, ratio: f64) -> i64 {
    (m as f64 * (1.0 - ratio)) as i64
}

/// The result of one shuffle.
#[derive(Debug)]
pub struct Masking {
    /// [N, keep] kept indices, ascending noise.
    pub ids_keep: Tensor,
    /// [N, M − keep] removed indices, ascending noise.
    pub ids_remove: Tensor,
    /// [N, M] inverse permutation of the shuffle.
    pub ids_restore: Tensor,
    /// [N, M] bool, true where removed.
    pub mask: Tensor,
}

impl Masking {
    /// Number of kept elements per row.
    pub fn keep(&self) -> i64 {
        self.ids_keep.size()[1]
    }
}

/// Shuffles each row of `noise` ([N, M], float) by ascending value and keeps the first
/// `keep_count(M, ratio)`.
pub fn random_masking(noise: &Tensor, ratio: f64) -> Result<Masking> {
    let size = noise.size();
    if size.len() != 2 || !noise.is_floating_point() {
        return Err(ModelError::Input(format!(
            "masking noise must be a float [N, M] tensor, got {:?} {:?}",
            noise.kind(),
            size
        )));
    }
    let m = size[1];
    let keep = keep_count(m, ratio);
    let ids_shuffle = noise.argsort(1, false);
    let ids_restore = ids_shuffle.argsort(1, false);
    let ids_keep = ids_shuffle.narrow(1, 0, keep);
    let ids_remove = ids_shuffle.narrow(1, keep, m - keep);
    // Rank >= keep <=> removed; equals the reference's gather of [0]*keep + [1]*(M-keep).
    let mask = ids_restore.ge(keep);
    debug_assert_eq!(ids_keep.kind(), Kind::Int64);
    Ok(Masking {
        ids_keep,
        ids_remove,
        ids_restore,
        mask,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_matches_python() {
        assert_eq!(keep_count(36, 0.75), 9);
        assert_eq!(keep_count(9, 0.6), 3);
        assert_eq!(keep_count(196, 0.75), 49);
        assert_eq!(keep_count(49, 0.75), 12);
    }

    #[test]
    fn keeps_smallest_noise_in_order() {
        let noise = Tensor::from_slice(&[0.5f32, 0.1, 0.9, 0.3]).reshape([1, 4]);
        let m = random_masking(&noise, 0.5).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(m.ids_keep.reshape([-1])).unwrap(),
            vec![1, 3]
        );
        assert_eq!(
            Vec::<i64>::try_from(m.ids_remove.reshape([-1])).unwrap(),
            vec![0, 2]
        );
        assert_eq!(
            Vec::<bool>::try_from(m.mask.reshape([-1])).unwrap(),
            vec![true, false, true, false]
        );
        assert_eq!(
            Vec::<i64>::try_from(m.ids_restore.reshape([-1])).unwrap(),
            vec![2, 0, 3, 1]
        );
    }
}
