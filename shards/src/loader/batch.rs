//! Batches: one contiguous image buffer plus per-sample metadata.

use super::transform::Geometry;

/// ImageNet channel means and standard deviations (torchvision's `Normalize`).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Pixel type of the image buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PixelFormat {
    /// Raw u8 RGB, normalised later on the device (4× less to copy than f32).
    #[default]
    U8,
    /// f32, `(v / 255 - mean) / std` per channel, computed in f32 like ToTensor + Normalize.
    F32Normalized,
}

/// The image buffer of a batch, `[B, 3, S, S]` row-major (NCHW).
#[derive(Debug, Clone, PartialEq)]
pub enum Images {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

impl Images {
    pub fn len(&self) -> usize {
        match self {
            Images::U8(v) => v.len(),
            Images::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One sample that was skipped under [`super::OnError::Skip`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedSample {
    pub shard: String,
    pub key: String,
    pub reason: String,
}

/// A batch of `len` samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[len, 3, size, size]`.
    pub images: Images,
    pub size: usize,
    /// Class index per sample (`-1` for datasets without one).
    pub labels: Vec<i64>,
    /// Sample keys (paths relative to the dataset root).
    pub keys: Vec<String>,
    /// Label masks `[len, size, size]` after the same geometric transform (dense datasets).
    pub masks: Option<Vec<u8>>,
    /// Patch labels `[len, (size/p)²]` after the same geometric transform (dense datasets):
    /// each output patch takes the label of the source patch under its centre.
    pub patch_labels: Option<Vec<i32>>,
    /// Epoch this batch belongs to.
    pub epoch: u64,
    /// Samples of this rank's slice consumed after this batch (skipped ones included): pass it
    /// back as the resume point to continue right after this batch.
    pub consumed: u64,
    /// Position in the rank's order of each sample (for auditing determinism).
    pub positions: Vec<u64>,
    /// Position of each sample in the whole (padded) epoch order, the same for any number of
    /// ranks: per-sample randomness downstream (the trainer's masking noise) is keyed by it.
    pub epoch_positions: Vec<u64>,
    /// The crop / resize / flip each sample went through (to reproduce it with PIL).
    pub geometry: Vec<Geometry>,
    /// Samples skipped while filling this batch.
    pub skipped: Vec<SkippedSample>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Shape of the image buffer.
    pub fn image_shape(&self) -> [usize; 4] {
        [self.len(), 3, self.size, self.size]
    }
}

/// Pixels per step of the RGB deinterleave.
const GROUP: usize = 16;

/// Splits 16 interleaved RGB pixels (48 bytes) into their three channels.
#[inline(always)]
fn deinterleave16(src: &[u8], out: &mut [[u8; GROUP]; 3]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("ssse3") {
        // SAFETY: SSSE3 is available (checked just above); `src` holds 48 bytes.
        unsafe { deinterleave16_ssse3(src, out) };
        return;
    }
    for (i, px) in src[..3 * GROUP].chunks_exact(3).enumerate() {
        out[0][i] = px[0];
        out[1][i] = px[1];
        out[2][i] = px[2];
    }
}

/// Three 16-byte loads, three byte shuffles per channel (each picks that channel's bytes of
/// one load into their places, zero elsewhere), OR-ed together.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn deinterleave16_ssse3(src: &[u8], out: &mut [[u8; GROUP]; 3]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= 3 * GROUP);
    const Z: i8 = -1;
    #[rustfmt::skip]
    const MASKS: [[[i8; 16]; 3]; 3] = [
        [
            [0, 3, 6, 9, 12, 15, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z],
            [Z, Z, Z, Z, Z, Z, 2, 5, 8, 11, 14, Z, Z, Z, Z, Z],
            [Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, 1, 4, 7, 10, 13],
        ],
        [
            [1, 4, 7, 10, 13, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z],
            [Z, Z, Z, Z, Z, 0, 3, 6, 9, 12, 15, Z, Z, Z, Z, Z],
            [Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, 2, 5, 8, 11, 14],
        ],
        [
            [2, 5, 8, 11, 14, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z],
            [Z, Z, Z, Z, Z, 1, 4, 7, 10, 13, Z, Z, Z, Z, Z, Z],
            [Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, 0, 3, 6, 9, 12, 15],
        ],
    ];
    let p = src.as_ptr() as *const __m128i;
    let v = [
        _mm_loadu_si128(p),
        _mm_loadu_si128(p.add(1)),
        _mm_loadu_si128(p.add(2)),
    ];
    for (ch, masks) in MASKS.iter().enumerate() {
        let mut acc = _mm_setzero_si128();
        for (x, m) in v.iter().zip(masks) {
            let m = _mm_loadu_si128(m.as_ptr() as *const __m128i);
            acc = _mm_or_si128(acc, _mm_shuffle_epi8(*x, m));
        }
        _mm_storeu_si128(out[ch].as_mut_ptr() as *mut __m128i, acc);
    }
}

/// Writes an interleaved `S×S×c` (c = 1 or 3) u8 image into one NCHW slot (gray is repeated).
pub fn write_u8(src: &[u8], c: usize, size: usize, dst: &mut [u8]) {
    let plane = size * size;
    let (p0, rest) = dst[..3 * plane].split_at_mut(plane);
    let (p1, p2) = rest.split_at_mut(plane);
    if c == 1 {
        for p in [p0, p1, p2] {
            p.copy_from_slice(&src[..plane]);
        }
        return;
    }
    // 16 pixels at a time through the byte shuffles, the rest one by one.
    let whole = plane / GROUP * GROUP;
    let mut ch = [[0u8; GROUP]; 3];
    let groups = src[..3 * whole].chunks_exact(3 * GROUP);
    let outs = p0.chunks_exact_mut(GROUP).zip(p1.chunks_exact_mut(GROUP));
    for ((px, (o0, o1)), o2) in groups.zip(outs).zip(p2.chunks_exact_mut(GROUP)) {
        deinterleave16(px, &mut ch);
        o0.copy_from_slice(&ch[0]);
        o1.copy_from_slice(&ch[1]);
        o2.copy_from_slice(&ch[2]);
    }
    for (i, px) in src[3 * whole..3 * plane].chunks_exact(3).enumerate() {
        p0[whole + i] = px[0];
        p1[whole + i] = px[1];
        p2[whole + i] = px[2];
    }
}

/// Like [`write_u8`] with normalisation to f32.
pub fn write_f32(src: &[u8], c: usize, size: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available (checked just above).
        unsafe { write_f32_avx2(src, c, size, dst) };
        return;
    }
    write_f32_scalar(src, c, size, dst, 0);
}

/// The portable form from pixel `from` on.
fn write_f32_scalar(src: &[u8], c: usize, size: usize, dst: &mut [f32], from: usize) {
    let plane = size * size;
    for ch in 0..3 {
        let sc = if c == 1 { 0 } else { ch };
        // A table keeps the exact f32 operation order of ToTensor + Normalize.
        let mut lut = [0f32; 256];
        for (v, l) in lut.iter_mut().enumerate() {
            *l = (v as f32 / 255.0 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch];
        }
        let d = &mut dst[ch * plane + from..(ch + 1) * plane];
        for (o, px) in d.iter_mut().zip(src[from * c..].chunks_exact(c)) {
            *o = lut[px[sc] as usize];
        }
    }
}

/// 16 pixels at a time: the byte deinterleave, then per channel `(v / 255 - mean) / std` as
/// the same three IEEE f32 operations in 8-wide vectors (bit-identical to the scalar form; no
/// multiply by a reciprocal), in one pass over the pixels instead of three table passes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn write_f32_avx2(src: &[u8], c: usize, size: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let plane = size * size;
    assert!(src.len() >= plane * c && dst.len() >= 3 * plane);
    let whole = plane / GROUP * GROUP;
    let k255 = _mm256_set1_ps(255.0);
    let mean = IMAGENET_MEAN.map(|m| _mm256_set1_ps(m));
    let std = IMAGENET_STD.map(|s| _mm256_set1_ps(s));
    let out = dst.as_mut_ptr();
    let mut ch = [[0u8; GROUP]; 3];
    for g in (0..whole).step_by(GROUP) {
        if c == 1 {
            ch[0].copy_from_slice(&src[g..g + GROUP]);
            ch[1] = ch[0];
            ch[2] = ch[0];
        } else {
            deinterleave16(&src[3 * g..3 * (g + GROUP)], &mut ch);
        }
        for (k, bytes) in ch.iter().enumerate() {
            let b = _mm_loadu_si128(bytes.as_ptr() as *const __m128i);
            let halves = [
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))),
            ];
            for (h, v) in halves.into_iter().enumerate() {
                let n = _mm256_div_ps(_mm256_sub_ps(_mm256_div_ps(v, k255), mean[k]), std[k]);
                // In bounds: g + 16 <= plane, so plane k's 8 floats at g + 8h are inside dst.
                _mm256_storeu_ps(out.add(k * plane + g + 8 * h), n);
            }
        }
    }
    write_f32_scalar(src, c, size, dst, whole);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planar_writes_match_the_plain_loops() {
        let mut x = 99u32;
        for size in [1usize, 3, 4, 13, 32] {
            for c in [1usize, 3] {
                let src: Vec<u8> = (0..size * size * c)
                    .map(|_| {
                        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                        (x >> 16) as u8
                    })
                    .collect();
                let plane = size * size;
                let mut want_u8 = vec![0u8; 3 * plane];
                let mut want_f32 = vec![0f32; 3 * plane];
                for ch in 0..3 {
                    for p in 0..plane {
                        let v = src[p * c + if c == 1 { 0 } else { ch }];
                        want_u8[ch * plane + p] = v;
                        want_f32[ch * plane + p] =
                            (v as f32 / 255.0 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch];
                    }
                }
                let mut got_u8 = vec![0u8; 3 * plane];
                let mut got_f32 = vec![0f32; 3 * plane];
                write_u8(&src, c, size, &mut got_u8);
                write_f32(&src, c, size, &mut got_f32);
                assert_eq!(got_u8, want_u8, "u8 size {size} c {c}");
                assert!(
                    got_f32
                        .iter()
                        .zip(&want_f32)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "f32 size {size} c {c}"
                );
            }
        }
        // Every byte value in every channel (3 and 256 are coprime), through the vector path.
        let src: Vec<u8> = (0..16 * 16 * 3).map(|i| (i % 256) as u8).collect();
        let mut got = vec![0f32; 3 * 256];
        write_f32(&src, 3, 16, &mut got);
        for (i, g) in got.iter().enumerate() {
            let (ch, p) = (i / 256, i % 256);
            let want = (src[3 * p + ch] as f32 / 255.0 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch];
            assert_eq!(g.to_bits(), want.to_bits(), "channel {ch} pixel {p}");
        }
        let src: Vec<u8> = (0..48).map(|v| v as u8).collect();
        let mut a = [[0u8; GROUP]; 3];
        deinterleave16(&src, &mut a);
        for (k, ch) in a.iter().enumerate() {
            assert!(ch.iter().enumerate().all(|(i, &v)| v as usize == 3 * i + k));
        }
    }
}
