//! SHA-256 with a second entry point that hashes two independent streams in one loop.
//!
//! The manifest's per-shard SHA-256 is a third of the CPU time of sharding original bytes. On
//! x86-64 the SHA extensions compute one stream at about half the rate the core could: each
//! `sha256rnds2` waits for the one before it. Two streams interleaved keep the unit busy and
//! hash about twice the bytes per second (BENCHMARKS.md), so the writer hashes the shards it
//! writes at once in pairs ([`crate::hash_pairs`]). Single streams and CPUs without the
//! extensions use the `sha2` crate's block function; results are the same bytes either way.

use sha2::digest::consts::U64;
use sha2::digest::generic_array::GenericArray;

const BLOCK: usize = 64;

const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// An incremental SHA-256 (FIPS 180-4).
#[derive(Clone, Debug)]
pub struct Sha256 {
    state: [u32; 8],
    tail: [u8; BLOCK],
    tail_len: usize,
    len: u64,
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    pub fn new() -> Self {
        Self {
            state: H0,
            tail: [0; BLOCK],
            tail_len: 0,
            len: 0,
        }
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn update(&mut self, data: &[u8]) {
        let data = self.fill_tail(data);
        let whole = data.len() / BLOCK * BLOCK;
        compress(&mut self.state, &data[..whole]);
        self.keep_tail(&data[whole..]);
    }

    pub fn finalize(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        let mut pad = [0u8; 2 * BLOCK];
        pad[0] = 0x80;
        // 0x80, zeros, then the 64-bit length, ending on a block boundary.
        let n = if self.tail_len < BLOCK - 8 {
            BLOCK - self.tail_len
        } else {
            2 * BLOCK - self.tail_len
        };
        pad[n - 8..n].copy_from_slice(&bits.to_be_bytes());
        self.update(&pad[..n]);
        debug_assert_eq!(self.tail_len, 0);
        let mut out = [0u8; 32];
        for (o, s) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&s.to_be_bytes());
        }
        out
    }

    /// Completes a partly filled block from the front of `data`; returns what is left.
    fn fill_tail<'d>(&mut self, data: &'d [u8]) -> &'d [u8] {
        self.len += data.len() as u64;
        if self.tail_len == 0 {
            return data;
        }
        let take = (BLOCK - self.tail_len).min(data.len());
        self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
        self.tail_len += take;
        if self.tail_len == BLOCK {
            let tail = self.tail;
            compress(&mut self.state, &tail);
            self.tail_len = 0;
        }
        &data[take..]
    }

    fn keep_tail(&mut self, rest: &[u8]) {
        debug_assert!(rest.len() < BLOCK && (self.tail_len == 0 || rest.is_empty()));
        self.tail[self.tail_len..self.tail_len + rest.len()].copy_from_slice(rest);
        self.tail_len += rest.len();
    }
}

/// `a.update(da); b.update(db)`, with the blocks the two have in common hashed together.
pub fn update_pair(a: &mut Sha256, da: &[u8], b: &mut Sha256, db: &[u8]) {
    let da = a.fill_tail(da);
    let db = b.fill_tail(db);
    let common = da.len().min(db.len()) / BLOCK * BLOCK;
    compress_pair(&mut a.state, &da[..common], &mut b.state, &db[..common]);
    for (h, d) in [(a, &da[common..]), (b, &db[common..])] {
        let whole = d.len() / BLOCK * BLOCK;
        compress(&mut h.state, &d[..whole]);
        h.keep_tail(&d[whole..]);
    }
}

/// Whether [`update_pair`] runs the two streams interleaved (else one after the other).
pub fn pairs_interleaved() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("sha")
            && std::arch::is_x86_feature_detected!("sse4.1")
            && std::arch::is_x86_feature_detected!("ssse3")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Hashes whole blocks (`data.len()` a multiple of 64).
fn compress(state: &mut [u32; 8], data: &[u8]) {
    debug_assert!(data.len().is_multiple_of(BLOCK));
    // SAFETY: `data` holds `len / 64` whole blocks, and GenericArray<u8, U64> is laid out as
    // [u8; 64] (alignment 1), so the slice of blocks covers exactly `data`.
    let blocks = unsafe {
        std::slice::from_raw_parts(
            data.as_ptr().cast::<GenericArray<u8, U64>>(),
            data.len() / BLOCK,
        )
    };
    sha2::compress256(state, blocks);
}

fn compress_pair(sa: &mut [u32; 8], a: &[u8], sb: &mut [u32; 8], b: &[u8]) {
    debug_assert!(a.len() == b.len() && a.len().is_multiple_of(BLOCK));
    #[cfg(target_arch = "x86_64")]
    if pairs_interleaved() {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        unsafe { x86::compress_pair(sa, a, sb, b) };
        return;
    }
    compress(sa, a);
    compress(sb, b);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The round constants, four per SHA-NI round step.
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    /// One stream's working registers in SHA-NI's order: (a, b, e, f) and (c, d, g, h).
    #[derive(Clone, Copy)]
    struct Regs {
        abef: __m128i,
        cdgh: __m128i,
    }

    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn load(s: &[u32; 8]) -> Regs {
        let dcba = _mm_loadu_si128(s.as_ptr().cast());
        let hgfe = _mm_loadu_si128(s.as_ptr().add(4).cast());
        let cdab = _mm_shuffle_epi32(dcba, 0xB1);
        let efgh = _mm_shuffle_epi32(hgfe, 0x1B);
        Regs {
            abef: _mm_alignr_epi8(cdab, efgh, 8),
            cdgh: _mm_blend_epi16(efgh, cdab, 0xF0),
        }
    }

    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn store(r: Regs, s: &mut [u32; 8]) {
        let feba = _mm_shuffle_epi32(r.abef, 0x1B);
        let dchg = _mm_shuffle_epi32(r.cdgh, 0xB1);
        _mm_storeu_si128(s.as_mut_ptr().cast(), _mm_blend_epi16(feba, dchg, 0xF0));
        _mm_storeu_si128(s.as_mut_ptr().add(4).cast(), _mm_alignr_epi8(dchg, feba, 8));
    }

    /// Message words 4i..4i+4 of a block, big-endian.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn words(block: *const u8, i: usize) -> __m128i {
        let swap = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
        _mm_shuffle_epi8(_mm_loadu_si128(block.add(16 * i).cast()), swap)
    }

    /// The next four schedule words from the previous sixteen.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn next(w0: __m128i, w1: __m128i, w2: __m128i, w3: __m128i) -> __m128i {
        let t = _mm_add_epi32(_mm_sha256msg1_epu32(w0, w1), _mm_alignr_epi8(w3, w2, 4));
        _mm_sha256msg2_epu32(t, w3)
    }

    /// Four rounds with message words `w` and constants K[4i..4i+4].
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn rounds(r: &mut Regs, w: __m128i, i: usize) {
        let wk = _mm_add_epi32(w, _mm_loadu_si128(K.as_ptr().add(4 * i).cast()));
        r.cdgh = _mm_sha256rnds2_epu32(r.cdgh, r.abef, wk);
        r.abef = _mm_sha256rnds2_epu32(r.abef, r.cdgh, _mm_shuffle_epi32(wk, 0x0E));
    }

    /// Two streams of equal length, block by block, their instructions interleaved: the
    /// dependency chain of one stream's rounds leaves the SHA unit idle half the time.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn compress_pair(sa: &mut [u32; 8], a: &[u8], sb: &mut [u32; 8], b: &[u8]) {
        let mut ra = load(sa);
        let mut rb = load(sb);
        for (ba, bb) in a.chunks_exact(64).zip(b.chunks_exact(64)) {
            let (pa, pb) = (ba.as_ptr(), bb.as_ptr());
            let (sva, svb) = (ra, rb);
            let (mut a0, mut a1, mut a2, mut a3) =
                (words(pa, 0), words(pa, 1), words(pa, 2), words(pa, 3));
            let (mut b0, mut b1, mut b2, mut b3) =
                (words(pb, 0), words(pb, 1), words(pb, 2), words(pb, 3));
            rounds(&mut ra, a0, 0);
            rounds(&mut rb, b0, 0);
            rounds(&mut ra, a1, 1);
            rounds(&mut rb, b1, 1);
            rounds(&mut ra, a2, 2);
            rounds(&mut rb, b2, 2);
            rounds(&mut ra, a3, 3);
            rounds(&mut rb, b3, 3);
            // Rounds 16..64, written out: the schedule is a ring of four registers, each
            // replaced by the next four words as it is used up.
            macro_rules! step {
                ($i:expr, $w0:ident, $w1:ident, $w2:ident, $w3:ident, $v0:ident, $v1:ident, $v2:ident, $v3:ident) => {
                    $w0 = next($w0, $w1, $w2, $w3);
                    $v0 = next($v0, $v1, $v2, $v3);
                    rounds(&mut ra, $w0, $i);
                    rounds(&mut rb, $v0, $i);
                };
            }
            // Sixteen rounds per ring turn (constant round indices: all written out).
            macro_rules! turn {
                ($i:expr) => {
                    step!($i, a0, a1, a2, a3, b0, b1, b2, b3);
                    step!($i + 1, a1, a2, a3, a0, b1, b2, b3, b0);
                    step!($i + 2, a2, a3, a0, a1, b2, b3, b0, b1);
                    step!($i + 3, a3, a0, a1, a2, b3, b0, b1, b2);
                };
            }
            turn!(4);
            turn!(8);
            turn!(12);
            ra.abef = _mm_add_epi32(ra.abef, sva.abef);
            ra.cdgh = _mm_add_epi32(ra.cdgh, sva.cdgh);
            rb.abef = _mm_add_epi32(rb.abef, svb.abef);
            rb.cdgh = _mm_add_epi32(rb.cdgh, svb.cdgh);
        }
        store(ra, sa);
        store(rb, sb);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sha2::Digest;

    /// Seeded pseudo-random bytes.
    pub(crate) fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn reference(parts: &[&[u8]]) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        for p in parts {
            h.update(p);
        }
        h.finalize().into()
    }

    #[test]
    fn single_stream_matches_sha2_at_every_split() {
        for n in [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1000, 5000] {
            let d = bytes(n, n as u64);
            for cut in [0, 1.min(n), n / 3, n / 2, n.saturating_sub(1), n] {
                let mut h = Sha256::new();
                h.update(&d[..cut]);
                h.update(&d[cut..]);
                assert_eq!(h.len(), n as u64);
                assert_eq!(h.finalize(), reference(&[&d]), "n {n} cut {cut}");
            }
        }
    }

    #[test]
    fn paired_streams_match_sha2() {
        // Uneven lengths and partial blocks on either side, several updates per stream.
        let sizes = [0, 3, 64, 100, 4096, 4159, 70_001, 262_144];
        for (i, &na) in sizes.iter().enumerate() {
            for &nb in &sizes[i..] {
                let (a1, a2) = (bytes(na, 1), bytes(na / 2 + 7, 2));
                let (b1, b2) = (bytes(nb, 3), bytes(nb / 3 + 1, 4));
                let (mut ha, mut hb) = (Sha256::new(), Sha256::new());
                update_pair(&mut ha, &a1, &mut hb, &b1);
                update_pair(&mut hb, &b2, &mut ha, &a2);
                assert_eq!(ha.finalize(), reference(&[&a1, &a2]), "a {na}");
                assert_eq!(hb.finalize(), reference(&[&b1, &b2]), "b {nb}");
            }
        }
    }
}
