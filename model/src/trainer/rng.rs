//! The seeded generator behind masking noise.
//!
//! Masking draws uniform noise and argsorts it (SPEC §1), so the noise must come from a generator
//! whose whole state fits in a checkpoint: resuming then reproduces the uninterrupted run exactly.
//! libtorch's global generator cannot be saved through tch, so this is xoshiro256** seeded with
//! splitmix64, drawn on the CPU (a few thousand numbers per step) and copied to the device.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// xoshiro256** with an explicit, serialisable state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoiseRng {
    s: [u64; 4],
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl NoiseRng {
    /// A generator for `seed`; distinct `stream`s (e.g. ranks) give independent sequences.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut x = seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let s = [
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
        ];
        Self { s }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 24 random bits (exactly representable in f32).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// A float32 tensor of uniform [0, 1) noise, like `torch.rand(shape)`.
    pub fn uniform(&mut self, shape: &[i64], device: Device) -> Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n.max(0)).map(|_| self.next_f32()).collect();
        Tensor::from_slice(&v)
            .reshape(shape)
            .to_kind(Kind::Float)
            .to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_state_round_trip() {
        let mut a = NoiseRng::new(7, 0);
        let mut b = NoiseRng::new(7, 0);
        for _ in 0..10 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let saved = serde_json::to_string(&a).unwrap();
        let first: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let mut c: NoiseRng = serde_json::from_str(&saved).unwrap();
        let again: Vec<u64> = (0..5).map(|_| c.next_u64()).collect();
        assert_eq!(first, again);
        assert_ne!(
            NoiseRng::new(7, 1).next_u64(),
            NoiseRng::new(7, 0).next_u64()
        );
        assert_ne!(
            NoiseRng::new(8, 0).next_u64(),
            NoiseRng::new(7, 0).next_u64()
        );
    }

    #[test]
    fn uniform_noise_is_in_range_and_roughly_uniform() {
        let mut r = NoiseRng::new(0, 0);
        let t = r.uniform(&[64, 196], Device::Cpu);
        assert_eq!(t.size(), vec![64, 196]);
        let (min, max, mean) = (
            t.min().double_value(&[]),
            t.max().double_value(&[]),
            t.mean(Kind::Float).double_value(&[]),
        );
        assert!(min >= 0.0 && max < 1.0, "{min} {max}");
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }
}
