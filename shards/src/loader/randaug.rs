//! RandAugment as timm's `rand-m9-mstd0.5-inc1` draws it (the fine-tuning protocol's policy),
//! on the loader's S×S interleaved u8 output before normalisation.
//!
//! Per image: `num_ops` operations drawn with replacement from timm's 15 "increasing" ops, each
//! applied with probability `prob`, at a magnitude drawn from N(m, std) clipped to [0, 10]. The
//! colour ops follow Pillow's `ImageOps` / `ImageEnhance` arithmetic (look-up tables, `blend`
//! truncation, the ITU-R 601 luma of `convert("L")`); the geometric ones (rotate, shear,
//! translate) sample bilinearly at pixel centres with timm's fill colour (124, 116, 104), where
//! Pillow would use bicubic, so they are close to, not bit-identical with, timm's.

use super::rng::Rng;

/// timm's `_LEVEL_DENOM`: magnitudes live in [0, 10].
const LEVEL_DENOM: f64 = 10.0;
/// timm's fill for geometric ops: the ImageNet mean in u8.
const FILL: [u8; 3] = [124, 116, 104];

/// The policy's settings (timm names: `n`, `m`, `mstd`, `p`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandAugment {
    pub num_ops: usize,
    pub magnitude: f64,
    pub magnitude_std: f64,
    pub prob: f64,
}

impl Default for RandAugment {
    /// `rand-m9-mstd0.5-inc1`: 2 ops, magnitude 9 ± 0.5, each with probability 0.5.
    fn default() -> Self {
        Self {
            num_ops: 2,
            magnitude: 9.0,
            magnitude_std: 0.5,
            prob: 0.5,
        }
    }
}

/// timm's `_RAND_INCREASING_TRANSFORMS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    SolarizeAdd,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
}

const OPS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::Posterize,
    Op::Solarize,
    Op::SolarizeAdd,
    Op::Color,
    Op::Contrast,
    Op::Brightness,
    Op::Sharpness,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
];

/// One drawn operation: the op, its magnitude in [0, 10] and the random sign.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub op: Op,
    pub magnitude: f64,
    pub negate: bool,
}

impl RandAugment {
    /// The operations one image gets (skipped ones left out).
    pub fn draw(&self, rng: &mut Rng) -> Vec<Step> {
        let mut steps = Vec::with_capacity(self.num_ops);
        for _ in 0..self.num_ops {
            let op = OPS[rng.below(OPS.len() as u64) as usize];
            if self.prob < 1.0 && rng.next_f64() > self.prob {
                continue;
            }
            let mut m = self.magnitude;
            if self.magnitude_std > 0.0 {
                m += self.magnitude_std * rng.normal();
            }
            steps.push(Step {
                op,
                magnitude: m.clamp(0.0, LEVEL_DENOM),
                negate: rng.coin(),
            });
        }
        steps
    }
}

/// Applies `steps` in order to an `s × s` image of `c` interleaved channels.
pub fn apply(steps: &[Step], img: &mut [u8], s: usize, c: usize, scratch: &mut Vec<u8>) {
    for st in steps {
        apply_one(st, img, s, c, scratch);
    }
}

fn signed(v: f64, negate: bool) -> f64 {
    if negate {
        -v
    } else {
        v
    }
}

fn apply_one(st: &Step, img: &mut [u8], s: usize, c: usize, scratch: &mut Vec<u8>) {
    let level = st.magnitude / LEVEL_DENOM;
    // timm's `_enhance_increasing_level_to_arg`.
    let enhance = (1.0 + signed(level * 0.9, st.negate)).max(0.1);
    match st.op {
        Op::AutoContrast => per_channel_lut(img, c, autocontrast_lut),
        Op::Equalize => per_channel_lut(img, c, equalize_lut),
        Op::Invert => img.iter_mut().for_each(|v| *v = 255 - *v),
        Op::Posterize => {
            let bits = 4 - (level * 4.0) as i32;
            if bits < 8 {
                let mask = !((1u32 << (8 - bits.max(0))) - 1) as u8;
                img.iter_mut().for_each(|v| *v &= mask);
            }
        }
        Op::Solarize => {
            let thresh = 256 - (level * 256.0) as i32;
            img.iter_mut().for_each(|v| {
                if i32::from(*v) >= thresh {
                    *v = 255 - *v;
                }
            });
        }
        Op::SolarizeAdd => {
            let add = (level * 110.0) as i32;
            img.iter_mut().for_each(|v| {
                if *v < 128 {
                    *v = (i32::from(*v) + add).min(255) as u8;
                }
            });
        }
        Op::Color => {
            if c >= 3 {
                for px in img.chunks_exact_mut(c) {
                    let l = luma(px);
                    for v in &mut px[..3] {
                        *v = blend(l, *v, enhance);
                    }
                }
            }
        }
        Op::Contrast => {
            let mean = if c >= 3 {
                img.chunks_exact(c).map(|p| u64::from(luma(p))).sum::<u64>() as f64 / (s * s) as f64
            } else {
                img.iter().map(|&v| u64::from(v)).sum::<u64>() as f64 / (s * s) as f64
            };
            let m = (mean + 0.5) as u8;
            img.iter_mut().for_each(|v| *v = blend(m, *v, enhance));
        }
        Op::Brightness => img.iter_mut().for_each(|v| *v = blend(0, *v, enhance)),
        Op::Sharpness => sharpness(img, s, c, enhance, scratch),
        Op::Rotate => {
            let deg = signed(level * 30.0, st.negate);
            // Pillow rotates counter-clockwise about the centre; map output to input.
            let a = -deg.to_radians();
            let (cos, sin) = (a.cos(), a.sin());
            let ctr = s as f64 / 2.0;
            // input = M · (output - centre) + centre, M = [[cos, sin], [-sin, cos]].
            let m = [
                cos,
                sin,
                ctr - cos * ctr - sin * ctr,
                -sin,
                cos,
                ctr + sin * ctr - cos * ctr,
            ];
            affine(img, s, c, m, scratch);
        }
        Op::ShearX => affine(
            img,
            s,
            c,
            [1.0, signed(level * 0.3, st.negate), 0.0, 0.0, 1.0, 0.0],
            scratch,
        ),
        Op::ShearY => affine(
            img,
            s,
            c,
            [1.0, 0.0, 0.0, signed(level * 0.3, st.negate), 1.0, 0.0],
            scratch,
        ),
        Op::TranslateX => {
            let px = signed(level * 0.45, st.negate) * s as f64;
            affine(img, s, c, [1.0, 0.0, px, 0.0, 1.0, 0.0], scratch)
        }
        Op::TranslateY => {
            let px = signed(level * 0.45, st.negate) * s as f64;
            affine(img, s, c, [1.0, 0.0, 0.0, 0.0, 1.0, px], scratch)
        }
    }
}

/// Pillow's `convert("L")`: (R·19595 + G·38470 + B·7471 + 2¹⁵) >> 16.
fn luma(p: &[u8]) -> u8 {
    ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16)
        as u8
}

/// Pillow's `Image.blend(a, b, alpha)` per value: a + alpha·(b − a) in float, clipped, truncated.
fn blend(a: u8, b: u8, alpha: f64) -> u8 {
    let v = f32::from(a) + alpha as f32 * (f32::from(b) - f32::from(a));
    v.clamp(0.0, 255.0) as u8
}

fn per_channel_lut(img: &mut [u8], c: usize, make: fn(&[u64; 256]) -> [u8; 256]) {
    for ch in 0..c {
        let mut h = [0u64; 256];
        for px in img.chunks_exact(c) {
            h[px[ch] as usize] += 1;
        }
        let lut = make(&h);
        for px in img.chunks_exact_mut(c) {
            px[ch] = lut[px[ch] as usize];
        }
    }
}

fn identity_lut() -> [u8; 256] {
    std::array::from_fn(|i| i as u8)
}

/// `ImageOps.autocontrast` (cutoff 0): stretch [lo, hi] to [0, 255].
fn autocontrast_lut(h: &[u64; 256]) -> [u8; 256] {
    let lo = h.iter().position(|&n| n > 0);
    let hi = h.iter().rposition(|&n| n > 0);
    match (lo, hi) {
        (Some(lo), Some(hi)) if hi > lo => {
            let scale = 255.0 / (hi - lo) as f64;
            let offset = -(lo as f64) * scale;
            std::array::from_fn(|i| (i as f64 * scale + offset).clamp(0.0, 255.0) as u8)
        }
        _ => identity_lut(),
    }
}

/// `ImageOps.equalize`.
fn equalize_lut(h: &[u64; 256]) -> [u8; 256] {
    let nonzero: Vec<u64> = h.iter().copied().filter(|&n| n > 0).collect();
    if nonzero.len() <= 1 {
        return identity_lut();
    }
    let step = (nonzero.iter().sum::<u64>() - nonzero[nonzero.len() - 1]) / 255;
    if step == 0 {
        return identity_lut();
    }
    let mut n = step / 2;
    let mut lut = [0u8; 256];
    for (i, l) in lut.iter_mut().enumerate() {
        *l = (n / step).min(255) as u8;
        n += h[i];
    }
    lut
}

/// `ImageEnhance.Sharpness`: blend with Pillow's SMOOTH filter (3×3, centre 5, total 13;
/// border pixels keep their values).
fn sharpness(img: &mut [u8], s: usize, c: usize, factor: f64, scratch: &mut Vec<u8>) {
    if s < 3 {
        return;
    }
    scratch.clear();
    scratch.extend_from_slice(img);
    let src = &scratch[..];
    for y in 1..s - 1 {
        for x in 1..s - 1 {
            for ch in 0..c {
                let at = |yy: usize, xx: usize| u32::from(src[(yy * s + xx) * c + ch]);
                let mut sum = 0u32;
                for yy in y - 1..=y + 1 {
                    for xx in x - 1..=x + 1 {
                        sum += at(yy, xx);
                    }
                }
                sum += 4 * at(y, x);
                // Pillow rounds the filter result: (sum + 6) / 13 in its 8-bit path.
                let smooth = ((sum + 6) / 13).min(255) as u8;
                let i = (y * s + x) * c + ch;
                img[i] = blend(smooth, src[i], factor);
            }
        }
    }
}

/// Output pixel centre (x + ½, y + ½) samples the input at (a·x + b·y + c, d·x + e·y + f)
/// bilinearly; outside the image it is the fill colour.
fn affine(img: &mut [u8], s: usize, c: usize, m: [f64; 6], scratch: &mut Vec<u8>) {
    scratch.clear();
    scratch.extend_from_slice(img);
    let src = &scratch[..];
    let sf = s as f64;
    for y in 0..s {
        for x in 0..s {
            let (xo, yo) = (x as f64 + 0.5, y as f64 + 0.5);
            let xi = m[0] * xo + m[1] * yo + m[2] - 0.5;
            let yi = m[3] * xo + m[4] * yo + m[5] - 0.5;
            let o = (y * s + x) * c;
            if xi < -0.5 || yi < -0.5 || xi > sf - 0.5 || yi > sf - 0.5 {
                for ch in 0..c {
                    img[o + ch] = FILL[ch.min(2)];
                }
                continue;
            }
            let (x0, y0) = (xi.floor().max(0.0), yi.floor().max(0.0));
            let (fx, fy) = ((xi - x0).clamp(0.0, 1.0), (yi - y0).clamp(0.0, 1.0));
            let (x0, y0) = (x0 as usize, y0 as usize);
            let (x1, y1) = ((x0 + 1).min(s - 1), (y0 + 1).min(s - 1));
            for ch in 0..c {
                let p = |yy: usize, xx: usize| f64::from(src[(yy * s + xx) * c + ch]);
                let top = p(y0, x0) * (1.0 - fx) + p(y0, x1) * fx;
                let bot = p(y1, x0) * (1.0 - fx) + p(y1, x1) * fx;
                img[o + ch] = (top * (1.0 - fy) + bot * fy).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(s: usize) -> Vec<u8> {
        (0..s * s * 3)
            .map(|i| ((i * 37) % 200 + 20) as u8)
            .collect()
    }

    fn step(op: Op, magnitude: f64, negate: bool) -> Step {
        Step {
            op,
            magnitude,
            negate,
        }
    }

    #[test]
    fn draws_follow_the_policy() {
        let ra = RandAugment::default();
        let (mut total, mut ops) = (0usize, std::collections::HashSet::new());
        for i in 0..2000 {
            let steps = ra.draw(&mut Rng::for_sample(1, 2, 3, i));
            assert!(steps.len() <= 2);
            total += steps.len();
            for s in &steps {
                assert!((0.0..=10.0).contains(&s.magnitude));
                ops.insert(format!("{:?}", s.op));
            }
        }
        // Two draws at probability 0.5 each: one op per image on average.
        let mean = total as f64 / 2000.0;
        assert!((mean - 1.0).abs() < 0.06, "{mean}");
        assert_eq!(ops.len(), 15);
        // The same key gives the same plan.
        let a = ra.draw(&mut Rng::for_sample(1, 2, 3, 7));
        let b = ra.draw(&mut Rng::for_sample(1, 2, 3, 7));
        assert_eq!(a, b);
    }

    #[test]
    fn zero_magnitude_geometry_and_unit_enhance_are_identity() {
        let s = 16;
        let orig = image(s);
        let mut scratch = Vec::new();
        for op in [
            Op::Rotate,
            Op::ShearX,
            Op::ShearY,
            Op::TranslateX,
            Op::TranslateY,
            Op::Color,
            Op::Contrast,
            Op::Brightness,
            Op::Sharpness,
            Op::SolarizeAdd,
        ] {
            let mut img = orig.clone();
            apply(&[step(op, 0.0, false)], &mut img, s, 3, &mut scratch);
            assert_eq!(img, orig, "{op:?}");
        }
    }

    #[test]
    fn colour_ops_match_pillow_semantics() {
        let mut scratch = Vec::new();
        // Invert twice is the identity.
        let mut img = image(8);
        apply(
            &[step(Op::Invert, 9.0, false), step(Op::Invert, 9.0, false)],
            &mut img,
            8,
            3,
            &mut scratch,
        );
        assert_eq!(img, image(8));
        // Solarize at magnitude 10: threshold 0, every value inverted.
        let mut img = image(8);
        apply(
            &[step(Op::Solarize, 10.0, false)],
            &mut img,
            8,
            3,
            &mut scratch,
        );
        assert!(img.iter().zip(image(8)).all(|(a, b)| *a == 255 - b));
        // Posterize at magnitude 5: 2 bits kept.
        let mut img = image(8);
        apply(
            &[step(Op::Posterize, 5.0, false)],
            &mut img,
            8,
            3,
            &mut scratch,
        );
        assert!(img.iter().all(|v| v & 0x3F == 0));
        // Autocontrast stretches each channel to 0..255 (Pillow gives (0, 254) for the middle
        // channel of this image: int() of 254.99999... as here).
        let mut img = image(8);
        apply(
            &[step(Op::AutoContrast, 0.0, false)],
            &mut img,
            8,
            3,
            &mut scratch,
        );
        let ranges: Vec<(u8, u8)> = (0..3)
            .map(|ch| {
                let v: Vec<u8> = img.chunks_exact(3).map(|p| p[ch]).collect();
                (*v.iter().min().unwrap(), *v.iter().max().unwrap())
            })
            .collect();
        assert_eq!(ranges, vec![(0, 255), (0, 254), (0, 255)]);
        // Brightness 1.9 (magnitude 10, positive) scales and clips.
        let mut img = vec![100u8, 200, 10];
        apply(
            &[step(Op::Brightness, 10.0, false)],
            &mut img,
            1,
            3,
            &mut scratch,
        );
        assert_eq!(img, vec![190, 255, 19]);
        // Equalize, checked against Pillow 13 `ImageOps.equalize` on the same histograms.
        let hist = |levels: &[(usize, u64)]| {
            let mut h = [0u64; 256];
            for &(v, n) in levels {
                h[v] = n;
            }
            h
        };
        let lut = equalize_lut(&hist(&[(10, 1000), (200, 1000)]));
        assert_eq!((lut[10], lut[200]), (0, 255));
        let lut = equalize_lut(&hist(&[(10, 500), (100, 1000), (200, 500)]));
        assert_eq!((lut[10], lut[100], lut[200]), (0, 100, 255));
        let lut = equalize_lut(&hist(&[(10, 50), (200, 50)]));
        assert_eq!((lut[10], lut[200]), (10, 200));
    }

    #[test]
    fn translation_moves_content_and_fills() {
        let s = 20;
        let mut img = image(s);
        let orig = img.clone();
        let mut scratch = Vec::new();
        // +45 % of 20 px = 9 px: output x samples input x + 9.
        apply(
            &[step(Op::TranslateX, 10.0, false)],
            &mut img,
            s,
            3,
            &mut scratch,
        );
        for y in 0..s {
            for x in 0..s {
                let o = (y * s + x) * 3;
                if x + 9 < s {
                    assert_eq!(&img[o..o + 3], &orig[o + 27..o + 30]);
                } else {
                    assert_eq!(&img[o..o + 3], &FILL);
                }
            }
        }
    }
}
