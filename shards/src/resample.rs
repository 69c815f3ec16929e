//! Separable image resampling on 8-bit interleaved pixels (Pillow's convolution algorithm:
//! antialiased when downscaling, fixed-point weights, horizontal pass then vertical pass).
//!
//! Written here rather than taken from a SIMD crate so the output is the same bytes on every
//! CPU: shards must be reproducible.

/// Resampling kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Triangle (Pillow BILINEAR), support 1.
    Bilinear,
    /// Keys cubic with a = -0.5 (Pillow BICUBIC), support 2.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output index: first input index and fixed-point weights.
struct Coeffs {
    starts: Vec<usize>,
    len: usize,
    weights: Vec<i32>,
}

fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let len = support.ceil() as usize * 2 + 1;
    let mut starts = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * len];
    let mut k = vec![0f64; len];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5).floor().max(0.0)) as usize;
        let xmax = ((center + support + 0.5).floor() as usize).min(in_size);
        let n = xmax.saturating_sub(xmin).min(len);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.eval((x as f64 + xmin as f64 - center + 0.5) / filterscale);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * len..(xx + 1) * len];
        for (r, &kx) in row.iter_mut().zip(&k).take(n) {
            let w = if ww != 0.0 { kx / ww } else { 0.0 };
            *r = (w * (1i64 << PRECISION_BITS) as f64).round() as i32;
        }
        starts.push(xmin);
    }
    Coeffs {
        starts,
        len,
        weights,
    }
}

#[inline(always)]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes `src` (`w`×`h`, `channels` interleaved bytes per pixel) to `ow`×`oh`.
pub fn resize(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    ow: usize,
    oh: usize,
    filter: Filter,
) -> Vec<u8> {
    assert_eq!(src.len(), w * h * channels);
    let horiz = if ow != w {
        horizontal(src, w, h, channels, ow, filter)
    } else {
        src.to_vec()
    };
    if oh != h {
        vertical(&horiz, ow, h, channels, oh, filter)
    } else {
        horiz
    }
}

fn horizontal(src: &[u8], w: usize, h: usize, c: usize, ow: usize, filter: Filter) -> Vec<u8> {
    let co = coeffs(w, ow, filter);
    let mut out = vec![0u8; ow * h * c];
    let half = 1i32 << (PRECISION_BITS - 1);
    for (srow, orow) in src.chunks_exact(w * c).zip(out.chunks_exact_mut(ow * c)) {
        for (xx, opx) in orow.chunks_exact_mut(c).enumerate() {
            let start = co.starts[xx];
            let ws = &co.weights[xx * co.len..(xx + 1) * co.len];
            let n = (w - start).min(co.len);
            let px = &srow[start * c..(start + n) * c];
            match c {
                3 => {
                    let (mut r, mut g, mut b) = (half, half, half);
                    for (p, &wt) in px.chunks_exact(3).zip(ws) {
                        r += p[0] as i32 * wt;
                        g += p[1] as i32 * wt;
                        b += p[2] as i32 * wt;
                    }
                    opx[0] = clip8(r);
                    opx[1] = clip8(g);
                    opx[2] = clip8(b);
                }
                _ => {
                    for (ch, o) in opx.iter_mut().enumerate() {
                        let mut s = half;
                        for (i, &wt) in ws.iter().enumerate().take(n) {
                            s += px[i * c + ch] as i32 * wt;
                        }
                        *o = clip8(s);
                    }
                }
            }
        }
    }
    out
}

fn vertical(src: &[u8], w: usize, h: usize, c: usize, oh: usize, filter: Filter) -> Vec<u8> {
    let co = coeffs(h, oh, filter);
    let stride = w * c;
    let mut out = vec![0u8; stride * oh];
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut acc = vec![0i32; stride];
    for (yy, orow) in out.chunks_exact_mut(stride).enumerate() {
        let start = co.starts[yy];
        let ws = &co.weights[yy * co.len..(yy + 1) * co.len];
        let n = (h - start).min(co.len);
        acc.fill(half);
        // Row-wise accumulation: the inner loop runs over a whole row, which vectorises.
        for (i, &wt) in ws.iter().enumerate().take(n) {
            if wt == 0 {
                continue;
            }
            let srow = &src[(start + i) * stride..(start + i + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(srow) {
                *a += p as i32 * wt;
            }
        }
        for (o, &a) in orow.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Output size for "shorter side at most `short`": the shorter side becomes `short` and the
/// longer one `floor(long * short / shorter)` (torchvision's `Resize(int)` rule). Images whose
/// shorter side is already `<= short` keep their size.
pub fn short_side_size(w: u32, h: u32, short: u32) -> (u32, u32) {
    let s = w.min(h);
    if s <= short {
        return (w, h);
    }
    if w <= h {
        let nh = ((h as u64 * short as u64) / w as u64).max(1) as u32;
        (short, nh)
    } else {
        let nw = ((w as u64 * short as u64) / h as u64).max(1) as u32;
        (nw, short)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 50 * 30 * 3];
        for f in [Filter::Bilinear, Filter::Bicubic] {
            let out = resize(&src, 50, 30, 3, 17, 11, f);
            assert_eq!(out.len(), 17 * 11 * 3);
            assert!(out.iter().all(|&v| v == 77), "{f:?}");
        }
    }

    #[test]
    fn gradient_is_monotone_and_sizes() {
        let w = 64;
        let src: Vec<u8> = (0..w * 8).map(|i| ((i % w) * 4) as u8).collect();
        let out = resize(&src, w, 8, 1, 16, 4, Filter::Bicubic);
        let row = &out[..16];
        assert!(row.windows(2).all(|p| p[0] <= p[1]), "{row:?}");
        assert_eq!(short_side_size(500, 375, 256), (341, 256));
        assert_eq!(short_side_size(375, 500, 256), (256, 341));
        assert_eq!(short_side_size(200, 100, 256), (200, 100));
    }
}
