//! Masking noise as a pure function of (seed, epoch, sample position).
//!
//! Masking draws uniform noise and argsorts it (SPEC §1). Each sample's noise comes from its own
//! generator keyed by the run's seed, the epoch and the sample's position in the epoch order (the
//! loader's global position, the same one its augmentation is keyed by). Consequences: a resumed
//! run draws exactly the masks an uninterrupted one would (no generator state to checkpoint), and
//! a sample gets the same mask however the batch is split over ranks, so W processes with batch
//! B train like one process with batch W·B.

use droppos_shards::loader::rng::{Rng, DOMAIN_MASK};
use tch::{Device, Kind, Tensor};

/// The noise of one micro-batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleNoise {
    pub seed: u64,
    pub epoch: u64,
    /// Epoch-order position of each sample of the batch.
    pub positions: Vec<u64>,
}

impl SampleNoise {
    pub fn new(seed: u64, epoch: u64, positions: Vec<u64>) -> Self {
        Self {
            seed,
            epoch,
            positions,
        }
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Float32 noise `[B, width]` uniform in [0, 1) (24 random bits, exact in f32), like
    /// `torch.rand`. `stream` tells independent draws for the same samples apart (e.g. 0 for the
    /// patch mask, 1 for the position mask).
    pub fn uniform(&self, stream: u64, width: i64, device: Device) -> Tensor {
        let w = width.max(0) as usize;
        let mut v = Vec::with_capacity(self.positions.len() * w);
        for &p in &self.positions {
            let mut rng = Rng::for_sample(DOMAIN_MASK ^ stream, self.seed, self.epoch, p);
            v.extend((0..w).map(|_| (rng.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)));
        }
        Tensor::from_slice(&v)
            .reshape([self.positions.len() as i64, width.max(0)])
            .to_kind(Kind::Float)
            .to_device(device)
    }

    /// One 63-bit seed for the whole batch, for model code that uses libtorch's global
    /// generator (the `wrong_pos` shuffle): a function of the batch's samples only.
    pub fn batch_seed(&self) -> i64 {
        let mut words = vec![DOMAIN_MASK, self.seed, self.epoch];
        words.extend(&self.positions);
        (droppos_shards::loader::rng::mix(&words) >> 1) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_gets_the_same_noise_in_any_batch() {
        let whole = SampleNoise::new(7, 2, vec![10, 11, 12, 13]).uniform(0, 5, Device::Cpu);
        let half = SampleNoise::new(7, 2, vec![12, 13]).uniform(0, 5, Device::Cpu);
        assert!(whole.narrow(0, 2, 2).equal(&half));
        // Streams, epochs and seeds are independent draws.
        let other = SampleNoise::new(7, 2, vec![10, 11, 12, 13]).uniform(1, 5, Device::Cpu);
        assert!(!whole.equal(&other));
        let next_epoch = SampleNoise::new(7, 3, vec![10, 11, 12, 13]).uniform(0, 5, Device::Cpu);
        assert!(!whole.equal(&next_epoch));
        let max = whole.max().double_value(&[]);
        let min = whole.min().double_value(&[]);
        assert!((0.0..1.0).contains(&min) && (0.0..1.0).contains(&max));
        assert_eq!(whole.size(), vec![4, 5]);
    }

    #[test]
    fn noise_is_roughly_uniform() {
        let positions: Vec<u64> = (0..200).collect();
        let t = SampleNoise::new(1, 0, positions).uniform(0, 50, Device::Cpu);
        let mean = t.mean(Kind::Double).double_value(&[]);
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }
}
