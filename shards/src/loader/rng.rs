//! Small, portable random number generation for sampling orders and augmentations.
//!
//! Every stream is derived from integers (seed, epoch, sample position) by hashing, so results
//! do not depend on thread count, platform or any global state. The generator is xoshiro256**,
//! seeded through SplitMix64 as its authors recommend.

/// SplitMix64 step: a good 64-bit mixer, used to expand seeds.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixes a list of words into one 64-bit key (order-sensitive).
pub fn mix(words: &[u64]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64;
    for &w in words {
        let mut s = h ^ w;
        h = splitmix64(&mut s);
    }
    h
}

/// xoshiro256** generator.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

/// Domain tags keep the order, augmentation and masking streams independent.
pub const DOMAIN_ORDER: u64 = 0x006F_7264_6572; // "order"
pub const DOMAIN_AUGMENT: u64 = 0x6175_676D; // "augm"
/// The trainer's masking noise (droppos-model) is keyed in this domain.
pub const DOMAIN_MASK: u64 = 0x6D61_736B; // "mask"

impl Rng {
    pub fn from_key(key: u64) -> Self {
        let mut st = key;
        let s = [
            splitmix64(&mut st),
            splitmix64(&mut st),
            splitmix64(&mut st),
            splitmix64(&mut st),
        ];
        Rng { s }
    }

    /// The generator for one (domain, seed, epoch, index) tuple.
    pub fn for_sample(domain: u64, seed: u64, epoch: u64, index: u64) -> Self {
        Self::from_key(mix(&[domain, seed, epoch, index]))
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

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [low, high).
    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.next_f64()
    }

    /// Uniform integer in [0, n) without modulo bias (Lemire's method). `n` must be > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let mut m = (self.next_u64() as u128) * (n as u128);
        let mut low = m as u64;
        if low < n {
            let threshold = n.wrapping_neg() % n;
            while low < threshold {
                m = (self.next_u64() as u128) * (n as u128);
                low = m as u64;
            }
        }
        (m >> 64) as u64
    }

    /// A fair coin.
    pub fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }

    /// Standard normal (Box-Muller from two uniforms).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = Rng::from_key(7);
        let mut counts = [0u32; 5];
        for _ in 0..50_000 {
            counts[r.below(5) as usize] += 1;
        }
        for c in counts {
            assert!((9_400..10_600).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn streams_differ_by_index_and_repeat_by_key() {
        let a = Rng::for_sample(DOMAIN_AUGMENT, 1, 2, 3).next_u64();
        let b = Rng::for_sample(DOMAIN_AUGMENT, 1, 2, 4).next_u64();
        let c = Rng::for_sample(DOMAIN_AUGMENT, 1, 2, 3).next_u64();
        assert_ne!(a, b);
        assert_eq!(a, c);
    }
}
