//! Batches: one contiguous image buffer plus per-sample metadata.

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

/// Writes an interleaved `S×S×c` (c = 1 or 3) u8 image into one NCHW slot.
pub fn write_u8(src: &[u8], c: usize, size: usize, dst: &mut [u8]) {
    let plane = size * size;
    for ch in 0..3 {
        let sc = if c == 1 { 0 } else { ch };
        let d = &mut dst[ch * plane..(ch + 1) * plane];
        for (o, px) in d.iter_mut().zip(src.chunks_exact(c)) {
            *o = px[sc];
        }
    }
}

/// Like [`write_u8`] with normalisation to f32.
pub fn write_f32(src: &[u8], c: usize, size: usize, dst: &mut [f32]) {
    let plane = size * size;
    for ch in 0..3 {
        let sc = if c == 1 { 0 } else { ch };
        // A table keeps the exact f32 operation order of ToTensor + Normalize.
        let mut lut = [0f32; 256];
        for (v, l) in lut.iter_mut().enumerate() {
            *l = (v as f32 / 255.0 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch];
        }
        let d = &mut dst[ch * plane..(ch + 1) * plane];
        for (o, px) in d.iter_mut().zip(src.chunks_exact(c)) {
            *o = lut[px[sc] as usize];
        }
    }
}
