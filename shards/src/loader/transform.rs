//! Geometric parameters of the two augmentations, as torchvision computes them.
//!
//! * Pre-training: `RandomResizedCrop(S, scale=(0.2, 1.0), ratio=(3/4, 4/3), BICUBIC)` followed
//!   by `RandomHorizontalFlip()`. The crop box follows `RandomResizedCrop.get_params` step by
//!   step: up to 10 attempts drawing the area fraction uniformly in `scale` and the aspect ratio
//!   log-uniformly in `ratio`, `w = round(sqrt(area · r))`, `h = round(sqrt(area / r))` with
//!   Python's round-half-to-even, accepted when `0 < w ≤ W` and `0 < h ≤ H`, then a uniform
//!   top-left corner; otherwise the central fallback clamped to the ratio range.
//! * Evaluation: `Resize(int(S / 0.875), BICUBIC)` (shorter side; the longer side is
//!   `int(short_new · long / short)`) followed by `CenterCrop(S)` (offsets
//!   `int(round((dim - S) / 2))`, half to even).
//!
//! Random numbers come from [`Rng`] streams, not torch's generator, so individual boxes differ
//! from a torch run with the same seed; the algorithm and hence the distribution are the same.

use super::rng::Rng;

/// A source of uniform random numbers, so that the algorithm can be driven by a fixed script in
/// tests.
pub trait Uniform {
    /// Uniform in [low, high).
    fn uniform(&mut self, low: f64, high: f64) -> f64;
    /// Uniform integer in [0, n), n > 0.
    fn below(&mut self, n: u64) -> u64;
}

impl Uniform for Rng {
    fn uniform(&mut self, low: f64, high: f64) -> f64 {
        Rng::uniform(self, low, high)
    }
    fn below(&mut self, n: u64) -> u64 {
        Rng::below(self, n)
    }
}

/// A crop box in source pixels: top row `i`, left column `j`, height `h`, width `w`
/// (torchvision's (i, j, h, w)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub i: usize,
    pub j: usize,
    pub h: usize,
    pub w: usize,
}

/// The geometric transform one sample went through, in torchvision's terms, so that its output
/// can be reproduced with PIL / torchvision (`bench loader --dump`). `source` is the stored
/// image's (width, height).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Geometry {
    /// RandomResizedCrop: `crop` (source pixels) resized to S×S, then mirrored if `flip`.
    Pretrain {
        source: (usize, usize),
        crop: CropBox,
        flip: bool,
    },
    /// Resize to `resized` (width, height), then the centre crop `center` of it, then mirrored
    /// if `flip`.
    Eval {
        source: (usize, usize),
        resized: (usize, usize),
        center: CropBox,
        flip: bool,
    },
}

/// Parameters of RandomResizedCrop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RrcParams {
    pub scale: (f64, f64),
    pub ratio: (f64, f64),
}

impl Default for RrcParams {
    fn default() -> Self {
        RrcParams {
            scale: (0.2, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }
}

/// Python's `round()` on floats: half to even.
pub fn py_round(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// `RandomResizedCrop.get_params` for an image of `width × height`.
pub fn random_resized_crop_box(
    width: usize,
    height: usize,
    p: &RrcParams,
    rng: &mut impl Uniform,
) -> CropBox {
    let area = (height * width) as f64;
    let log_ratio = (p.ratio.0.ln(), p.ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * rng.uniform(p.scale.0, p.scale.1);
        let aspect_ratio = rng.uniform(log_ratio.0, log_ratio.1).exp();
        let w = py_round((target_area * aspect_ratio).sqrt());
        let h = py_round((target_area / aspect_ratio).sqrt());
        if 0 < w && w as usize <= width && 0 < h && h as usize <= height {
            let (w, h) = (w as usize, h as usize);
            let i = rng.below((height - h + 1) as u64) as usize;
            let j = rng.below((width - w + 1) as u64) as usize;
            return CropBox { i, j, h, w };
        }
    }
    central_fallback(width, height, p)
}

/// The fallback of `get_params` after 10 rejected attempts.
pub fn central_fallback(width: usize, height: usize, p: &RrcParams) -> CropBox {
    let in_ratio = width as f64 / height as f64;
    let rmin = p.ratio.0.min(p.ratio.1);
    let rmax = p.ratio.0.max(p.ratio.1);
    let (w, h) = if in_ratio < rmin {
        (width, py_round(width as f64 / rmin) as usize)
    } else if in_ratio > rmax {
        (py_round(height as f64 * rmax) as usize, height)
    } else {
        (width, height)
    };
    CropBox {
        i: (height - h) / 2,
        j: (width - w) / 2,
        h,
        w,
    }
}

/// Above this many times the crop's area, an evaluation resize is not made whole (see
/// `process_geometry`): aspect ratios beyond ~12:1.
const DIRECT_EVAL_AREA: usize = 16;

/// Evaluation geometry: the shorter side is resized to `int(size / 0.875)` and the centre
/// `size × size` is kept. Returns the resized dimensions and the crop inside them.
pub fn eval_geometry(width: usize, height: usize, size: usize) -> ((usize, usize), CropBox) {
    let short_target = (size as f64 / 0.875) as usize;
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (short_target as f64 * long as f64 / short as f64) as usize;
    let (nw, nh) = if width <= height {
        (short_target, new_long)
    } else {
        (new_long, short_target)
    };
    let i = py_round((nh as f64 - size as f64) / 2.0).max(0) as usize;
    let j = py_round((nw as f64 - size as f64) / 2.0).max(0) as usize;
    (
        (nw, nh),
        CropBox {
            i,
            j,
            h: size.min(nh),
            w: size.min(nw),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays a fixed list of uniforms in [0, 1): `uniform` scales them, `below` floors them.
    struct Script(Vec<f64>);
    impl Uniform for Script {
        fn uniform(&mut self, low: f64, high: f64) -> f64 {
            low + (high - low) * self.0.remove(0)
        }
        fn below(&mut self, n: u64) -> u64 {
            (self.0.remove(0) * n as f64) as u64
        }
    }

    #[test]
    fn first_attempt_accepted() {
        // area fraction 0.2 + 0.8·0.5 = 0.6, ratio exp(0) = 1 on 400x300:
        // sqrt(72000) = 268.33 → w = h = 268; i = floor(0.5·33) = 16, j = floor(0.25·133) = 33.
        let p = RrcParams::default();
        let mut s = Script(vec![0.5, 0.5, 0.5, 0.25]);
        let b = random_resized_crop_box(400, 300, &p, &mut s);
        assert_eq!(
            b,
            CropBox {
                i: 16,
                j: 33,
                h: 268,
                w: 268
            }
        );
    }

    #[test]
    fn rejection_then_fallback() {
        // A very wide image: every attempt at scale 1 and ratio 4/3 needs h > H.
        let p = RrcParams::default();
        let mut s = Script(vec![0.999_999; 20]);
        let b = random_resized_crop_box(1000, 100, &p, &mut s);
        // in_ratio 10 > 4/3 → h = 100, w = round(133.33) = 133, centred.
        assert_eq!(
            b,
            CropBox {
                i: 0,
                j: 433,
                h: 100,
                w: 133
            }
        );
        assert!(s.0.is_empty(), "exactly 10 attempts, two draws each");
    }

    #[test]
    fn round_half_even_like_python() {
        assert_eq!(py_round(2.5), 2);
        assert_eq!(py_round(3.5), 4);
        assert_eq!(py_round(-0.5), 0);
    }

    #[test]
    fn eval_geometry_matches_torchvision() {
        // 500x375 → shorter side 256 → 341x256; crop offsets round((341-224)/2)=round(58.5)=58.
        let ((nw, nh), b) = eval_geometry(500, 375, 224);
        assert_eq!((nw, nh), (341, 256));
        assert_eq!(
            b,
            CropBox {
                i: 16,
                j: 58,
                h: 224,
                w: 224
            }
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Applying a transform to one sample.

use super::batch::{write_f32, write_u8};
use super::decode::{DecodeError, Decoded, Decoder, Header};
use super::resample::{
    mirror_rows, resize_box, resize_nearest, resize_nearest_window, Filter, Precision, ResizeOpts,
    Scratch, View,
};

/// Which augmentation to apply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Augment {
    /// RandomResizedCrop + (optionally) RandomHorizontalFlip(0.5).
    Pretrain { rrc: RrcParams, flip: bool },
    /// Resize shorter side to int(S / 0.875) + CenterCrop(S).
    Eval,
}

/// Smallest downscale (crop side / output side, after DCT scaling) for which DCT-domain
/// scaling is used. Below it the scaled decode visibly departs from Pillow's full decode; at or
/// above it the remaining bicubic downscale averages the difference away. Measured as mean
/// absolute difference to Pillow: ≈ 1.6 grey levels if scaled crops just above S were allowed;
/// with 2 up to 1.08 on a 700x500 photo cropped to 48 px (the sewing-machine fixture); with 3
/// up to 1.72 on a grey ImageNet photo cropped 305 px → 48 px (an acceptance probe), though at
/// most 0.51 over 27 ImageNet photos × 5 crops at 224. With 4 (and `DCT_MIN_OUTPUT`) every one of
/// the 260 sample photos stays below 1 at outputs of 16-384 px. At 224-px outputs this needs
/// crops of 1,792 px or more, so ImageNet-size images never take it.
pub const DCT_MIN_RATIO: f64 = 4.0;

/// Outputs smaller than this (px, either side) never use DCT scaling: at 16-24 px a handful of
/// the sample photos still exceeded 1 grey level at ratio 4, where each output pixel averages
/// too few scaled pixels for the difference to wash out.
pub const DCT_MIN_OUTPUT: usize = 64;

/// Largest DCT denominator d ∈ {1, 2, 4, 8} whose scaled region is still at least
/// `DCT_MIN_RATIO` times the output in both directions (1 for outputs under `DCT_MIN_OUTPUT`).
pub fn dct_denom(region_w: usize, region_h: usize, out_w: usize, out_h: usize) -> usize {
    let mut d = 1;
    if out_w.min(out_h) < DCT_MIN_OUTPUT {
        return d;
    }
    for cand in [2usize, 4, 8] {
        if region_w as f64 / cand as f64 >= DCT_MIN_RATIO * out_w as f64
            && region_h as f64 / cand as f64 >= DCT_MIN_RATIO * out_h as f64
        {
            d = cand;
        }
    }
    d
}

/// Per-sample inputs.
#[derive(Debug, Clone, Copy)]
pub struct SampleIn<'a> {
    pub image: &'a [u8],
    /// Annotation PNG (8-bit gray) of the same size as the image.
    pub mask: Option<&'a [u8]>,
    /// Row-major ceil(H/p) × ceil(W/p) patch labels of the stored image.
    pub patch_labels: Option<&'a [i32]>,
}

/// Where one sample's outputs go (slices of the batch buffers).
pub enum ImageSlot<'a> {
    U8(&'a mut [u8]),
    F32(&'a mut [f32]),
}

pub struct SampleOut<'a> {
    pub image: ImageSlot<'a>,
    pub mask: Option<&'a mut [u8]>,
    pub patch_labels: Option<&'a mut [i32]>,
}

/// Settings shared by all samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransformConfig {
    pub augment: Augment,
    pub size: usize,
    /// Allow DCT-domain downscaling (JPEG) when the crop is much larger than the output.
    pub dct_scaling: bool,
    /// Patch size of `patch_labels` (input grid and output grid).
    pub patch_size: usize,
    /// RandAugment after crop and flip (drawn from the sample's stream after the geometry).
    pub randaug: Option<super::randaug::RandAugment>,
    /// Resampling arithmetic: Pillow-SIMD's 16-bit one (fast, the default) or Pillow's own.
    pub resample: Precision,
}

/// Errors of one sample.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("mask: {0}")]
    Mask(String),
    #[error("patch labels: {0}")]
    PatchLabels(String),
    #[error("geometry: {0}")]
    Geometry(String),
    #[error("decoded {0}x{1} pixels where the header said {2}x{3}")]
    SizeMismatch(usize, usize, usize, usize),
}

/// Per-thread state: decoder handle and reusable buffers.
pub struct Worker {
    decoder: Decoder,
    decoded: Decoded,
    scratch: Scratch,
    resized: Vec<u8>,
    resized2: Vec<u8>,
    randaug_scratch: Vec<u8>,
}

impl Worker {
    pub fn new() -> Result<Worker, DecodeError> {
        Ok(Worker {
            decoder: Decoder::new()?,
            decoded: Decoded::default(),
            scratch: Scratch::default(),
            resized: Vec::new(),
            resized2: Vec::new(),
            randaug_scratch: Vec::new(),
        })
    }

    /// Geometric parameters drawn for one sample: crop box and flip.
    fn draw(&mut self, cfg: &TransformConfig, hdr: &Header, rng: &mut Rng) -> (CropBox, bool) {
        match cfg.augment {
            Augment::Pretrain { rrc, flip } => {
                let b = random_resized_crop_box(hdr.width, hdr.height, &rrc, rng);
                let f = flip && rng.coin();
                (b, f)
            }
            Augment::Eval => (
                CropBox {
                    i: 0,
                    j: 0,
                    h: hdr.height,
                    w: hdr.width,
                },
                false,
            ),
        }
    }

    /// Decodes and transforms one sample into `out`.
    pub fn process(
        &mut self,
        cfg: &TransformConfig,
        input: SampleIn<'_>,
        rng: &mut Rng,
        out: SampleOut<'_>,
    ) -> Result<Geometry, SampleError> {
        let hdr = self.decoder.header(input.image)?;
        let (cb, flip) = self.draw(cfg, &hdr, rng);
        let steps = cfg.randaug.map(|r| r.draw(rng));
        self.process_geometry(cfg, input, &hdr, cb, flip, steps.as_deref(), out)
    }

    /// Reads the image header (dimensions).
    pub fn header(&mut self, image: &[u8]) -> Result<Header, DecodeError> {
        self.decoder.header(image)
    }

    /// Applies a given geometry: for pre-training the crop box `cb` (source pixels) resized to
    /// S×S; for evaluation `cb` is ignored and the resize + centre crop is used. `flip` mirrors
    /// the output; then the RandAugment `steps`, if any, change the image (never the masks:
    /// the loader refuses RandAugment for dense datasets). Returns the geometry applied.
    #[allow(clippy::too_many_arguments)]
    pub fn process_geometry(
        &mut self,
        cfg: &TransformConfig,
        input: SampleIn<'_>,
        hdr: &Header,
        cb: CropBox,
        flip: bool,
        steps: Option<&[super::randaug::Step]>,
        out: SampleOut<'_>,
    ) -> Result<Geometry, SampleError> {
        let s = cfg.size;
        let hdr = *hdr;
        let cb = match cfg.augment {
            Augment::Pretrain { .. } => cb,
            Augment::Eval => CropBox {
                i: 0,
                j: 0,
                h: hdr.height,
                w: hdr.width,
            },
        };
        if cb.w == 0 || cb.h == 0 || cb.j + cb.w > hdr.width || cb.i + cb.h > hdr.height {
            return Err(SampleError::Geometry(format!(
                "crop {cb:?} outside a {}x{} image",
                hdr.width, hdr.height
            )));
        }
        // For evaluation the "crop" drawn above is the whole image; the centre crop is applied
        // after the resize, as torchvision does.
        let (rw, rh, eval_crop) = match cfg.augment {
            Augment::Pretrain { .. } => (s, s, None),
            Augment::Eval => {
                let ((nw, nh), c) = eval_geometry(hdr.width, hdr.height, s);
                (nw, nh, Some(c))
            }
        };
        let denom = if cfg.dct_scaling && hdr.is_jpeg() {
            dct_denom(cb.w, cb.h, rw, rh)
        } else {
            1
        };
        self.decoder.decode_region(
            input.image,
            &hdr,
            (cb.j, cb.i, cb.w, cb.h),
            denom,
            &mut self.decoded,
        )?;
        let d = &self.decoded;
        if d.denom == 1
            && (d.x0 + d.width < cb.j + cb.w
                || d.y0 + d.height < cb.i + cb.h
                || d.x0 > cb.j
                || d.y0 > cb.i)
        {
            return Err(SampleError::SizeMismatch(
                d.width, d.height, hdr.width, hdr.height,
            ));
        }
        let c = d.channels;
        let view = View::new(&d.pixels, d.width, d.height, c);
        // An evaluation resize far larger than its crop (an extreme panorama: 1x12000 px made a
        // 256x3,072,000 image) is not made whole: the centre crop is resized straight from its
        // box in the source, Pillow's box resize, whose filter centres are those of the full
        // resize up to the float rounding of the box. Ordinary images keep the exact path.
        let direct = eval_crop.filter(|_| rw * rh > DIRECT_EVAL_AREA * s * s);
        let (ow, oh) = if direct.is_some() { (s, s) } else { (rw, rh) };
        self.resized.resize(ow * oh * c, 0);
        // The flip is folded into the resize (mirrored output columns) except after an eval
        // centre crop, which need not be symmetric.
        let opts = ResizeOpts {
            filter: Filter::Bicubic,
            precision: cfg.resample,
            mirror: flip && (eval_crop.is_none() || direct.is_some()),
            pairs_of: None,
        };
        // The part of the source to resize, in source pixels.
        let src_box = match direct {
            None => [
                cb.j as f64,
                cb.i as f64,
                (cb.j + cb.w) as f64,
                (cb.i + cb.h) as f64,
            ],
            Some(ec) => {
                let (fx, fy) = (cb.w as f64 / rw as f64, cb.h as f64 / rh as f64);
                [
                    cb.j as f64 + ec.j as f64 * fx,
                    cb.i as f64 + ec.i as f64 * fy,
                    cb.j as f64 + (ec.j + s) as f64 * fx,
                    cb.i as f64 + (ec.i + s) as f64 * fy,
                ]
            }
        };
        // The box in the view's grid: Pillow semantics at full scale (crop, then resize the
        // crop); in the DCT-scaled grid the resampler reads around it within the region.
        let (src, f, x0, y0) = if d.denom == 1 {
            let sub = view.crop(cb.j - d.x0, cb.i - d.y0, cb.w, cb.h);
            (sub, 1.0, cb.j, cb.i)
        } else {
            (view, d.denom as f64, d.x0, d.y0)
        };
        let bx = [
            (src_box[0] / f - x0 as f64) as f32,
            (src_box[1] / f - y0 as f64) as f32,
            (src_box[2] / f - x0 as f64) as f32,
            (src_box[3] / f - y0 as f64) as f32,
        ];
        resize_box(src, bx, ow, oh, opts, &mut self.resized, &mut self.scratch);
        // The final S×S pixels (interleaved, c channels).
        let fin: &mut Vec<u8> = if let Some(ec) = eval_crop.filter(|_| direct.is_none()) {
            self.resized2.resize(s * s * c, 0);
            let v = View::new(&self.resized, rw, rh, c).crop(ec.j, ec.i, ec.w, ec.h);
            for y in 0..s {
                let src = &v.data[y * v.stride..y * v.stride + s * c];
                self.resized2[y * s * c..(y + 1) * s * c].copy_from_slice(src);
            }
            if flip {
                mirror_rows(&mut self.resized2, s, c);
            }
            &mut self.resized2
        } else {
            &mut self.resized
        };
        if let Some(steps) = steps {
            super::randaug::apply(steps, fin, s, c, &mut self.randaug_scratch);
        }
        match out.image {
            ImageSlot::U8(o) => write_u8(fin, c, s, o),
            ImageSlot::F32(o) => write_f32(fin, c, s, o),
        }
        // Geometry in source pixels: output (x, y) ↦ source (ox + x·sx, oy + y·sy).
        let (ox, oy, sx, sy) = match eval_crop {
            None => (
                cb.j as f64,
                cb.i as f64,
                cb.w as f64 / s as f64,
                cb.h as f64 / s as f64,
            ),
            Some(ec) => {
                let sx = hdr.width as f64 / rw as f64;
                let sy = hdr.height as f64 / rh as f64;
                (ec.j as f64 * sx, ec.i as f64 * sy, sx, sy)
            }
        };
        if let Some(mo) = out.mask {
            let png = input
                .mask
                .ok_or_else(|| SampleError::Mask("missing mask".into()))?;
            let m = image::load_from_memory(png)
                .map_err(|e| SampleError::Mask(e.to_string()))?
                .to_luma8();
            if (m.width() as usize, m.height() as usize) != (hdr.width, hdr.height) {
                return Err(SampleError::Mask(format!(
                    "mask is {}x{}, image {}x{}",
                    m.width(),
                    m.height(),
                    hdr.width,
                    hdr.height
                )));
            }
            let mv = View::new(m.as_raw(), hdr.width, hdr.height, 1);
            match eval_crop {
                None => resize_nearest(mv.crop(cb.j, cb.i, cb.w, cb.h), s, s, mo),
                // Only the crop of the full nearest resize: the same pixels, without the rest.
                Some(ec) => resize_nearest_window(mv, (rw, rh), (ec.j, ec.i, s, s), mo),
            }
            if flip {
                mirror_rows(mo, s, 1);
            }
        }
        if let Some(po) = out.patch_labels {
            let pl = input
                .patch_labels
                .ok_or_else(|| SampleError::PatchLabels("missing patch labels".into()))?;
            let p = cfg.patch_size.max(1);
            let gw = hdr.width.div_ceil(p);
            let gh = hdr.height.div_ceil(p);
            if pl.len() != gw * gh {
                return Err(SampleError::PatchLabels(format!(
                    "{} labels for a {gh}x{gw} grid",
                    pl.len()
                )));
            }
            let g = s / p;
            for py in 0..g {
                for px in 0..g {
                    let mut x = (px as f64 + 0.5) * p as f64;
                    if flip {
                        x = s as f64 - x;
                    }
                    let y = (py as f64 + 0.5) * p as f64;
                    let srcx = ((ox + x * sx) / p as f64) as usize;
                    let srcy = ((oy + y * sy) / p as f64) as usize;
                    po[py * g + px] = pl[srcy.min(gh - 1) * gw + srcx.min(gw - 1)];
                }
            }
        }
        Ok(match eval_crop {
            None => Geometry::Pretrain {
                source: (hdr.width, hdr.height),
                crop: cb,
                flip,
            },
            Some(center) => Geometry::Eval {
                source: (hdr.width, hdr.height),
                resized: (rw, rh),
                center,
                flip,
            },
        })
    }
}
