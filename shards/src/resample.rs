//! PIL-exact resampling (Pillow's `ImagingResample`, `Resample.c`), used by the loader's
//! transforms and by the shard writer's `--resize-short-side`.
//!
//! Reproduced to the bit for integer boxes: the filter (Keys' cubic with a = -0.5 and support 2,
//! or Pillow's triangle "bilinear" with support 1) is widened by the downscale factor
//! (antialiasing); per-output-pixel coefficients are normalised
//! to sum 1 in double precision, then quantised to fixed point with 22 fractional bits (rounded
//! half away from zero); the horizontal pass runs first over only the rows the vertical pass needs,
//! and its output is rounded and clipped to u8 before the vertical pass, exactly like Pillow's
//! 8-bit path. Each accumulator starts at 1 << 21 (round half up) and is clipped to [0, 255].
//! Written here rather than taken from a SIMD crate so the output is the same bytes on every CPU:
//! shards must be reproducible.

/// Pillow's `PRECISION_BITS` for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Resampling kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Triangle (Pillow BILINEAR), support 1.
    Bilinear,
    /// Keys cubic with a = -0.5 (Pillow BICUBIC), support 2.
    Bicubic,
}

impl Filter {
    pub fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    pub fn eval(self, x: f64) -> f64 {
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

/// Fixed-point filter coefficients for one axis.
#[derive(Debug, Clone)]
pub struct Coeffs {
    /// Per output pixel: first input index and number of taps.
    pub bounds: Vec<(usize, usize)>,
    /// `ksize` coefficients per output pixel.
    pub ksize: usize,
    pub k: Vec<i32>,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for input length `in_size`, source
    /// box [in0, in1) (C floats in Pillow), output length `out_size` and `filter`.
    pub fn new(in_size: usize, in0: f32, in1: f32, out_size: usize, filter: Filter) -> Coeffs {
        let scale = (in1 - in0) as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * ksize];
        let mut pre = vec![0f64; ksize];
        let ss = 1.0 / filterscale;
        for xx in 0..out_size {
            let center = in0 as f64 + (xx as f64 + 0.5) * scale;
            // C casts truncate toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin as i64).max(0) as usize;
            let mut ww = 0.0;
            for (x, p) in pre.iter_mut().enumerate().take(n) {
                let w = filter.eval((x as f64 + xmin as f64 - center + 0.5) * ss);
                *p = w;
                ww += w;
            }
            let row = &mut k[xx * ksize..(xx + 1) * ksize];
            for x in 0..n {
                let v = if ww != 0.0 { pre[x] / ww } else { pre[x] };
                let f = v * (1u32 << PRECISION_BITS) as f64;
                row[x] = if v < 0.0 {
                    (-0.5 + f) as i32
                } else {
                    (0.5 + f) as i32
                };
            }
            bounds.push((xmin, n));
        }
        Coeffs { bounds, ksize, k }
    }
}

#[inline(always)]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// A borrowed interleaved u8 image region: `width × height` pixels of `channels` bytes, rows
/// `stride` bytes apart.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [u8],
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub stride: usize,
}

impl<'a> View<'a> {
    pub fn new(data: &'a [u8], width: usize, height: usize, channels: usize) -> View<'a> {
        View {
            data,
            width,
            height,
            channels,
            stride: width * channels,
        }
    }

    /// The sub-rectangle at (x, y) of size w × h (must lie inside).
    pub fn crop(&self, x: usize, y: usize, w: usize, h: usize) -> View<'a> {
        assert!(
            x + w <= self.width && y + h <= self.height,
            "crop outside view"
        );
        let off = y * self.stride + x * self.channels;
        let end = if h == 0 {
            off
        } else {
            off + (h - 1) * self.stride + w * self.channels
        };
        View {
            data: &self.data[off..end],
            width: w,
            height: h,
            channels: self.channels,
            stride: self.stride,
        }
    }

    #[inline(always)]
    fn row(&self, y: usize) -> &'a [u8] {
        let off = y * self.stride;
        &self.data[off..off + self.width * self.channels]
    }
}

/// Scratch buffers reused across images (one per worker thread).
#[derive(Debug, Default)]
pub struct Scratch {
    temp: Vec<u8>,
    acc: Vec<i32>,
}

/// Resizes the whole view to `out_w × out_h` with Pillow's bicubic filter, writing interleaved
/// pixels (same channel count) into `out` (`out_w * out_h * channels` bytes). Equivalent to
/// `img.crop(view).resize((out_w, out_h), Image.BICUBIC)`.
pub fn resize_bicubic(src: View<'_>, out_w: usize, out_h: usize, out: &mut [u8], s: &mut Scratch) {
    resize_bicubic_box(
        src,
        [0.0, 0.0, src.width as f32, src.height as f32],
        out_w,
        out_h,
        out,
        s,
    )
}

/// Like [`resize_bicubic`] with a source box [x0, y0, x1, y1] in view coordinates (Pillow's
/// `resize(size, BICUBIC, box)`); pixels outside the view are never read.
pub fn resize_bicubic_box(
    src: View<'_>,
    bx: [f32; 4],
    out_w: usize,
    out_h: usize,
    out: &mut [u8],
    s: &mut Scratch,
) {
    resize_box(src, bx, out_w, out_h, Filter::Bicubic, out, s)
}

/// Resizes `src` (`w`×`h`, `channels` interleaved bytes per pixel) to `ow`×`oh` with `filter`
/// (Pillow's `img.resize((ow, oh), filter)`), into a new buffer.
pub fn resize(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    ow: usize,
    oh: usize,
    filter: Filter,
) -> Vec<u8> {
    let mut out = vec![0u8; ow * oh * channels];
    resize_box(
        View::new(src, w, h, channels),
        [0.0, 0.0, w as f32, h as f32],
        ow,
        oh,
        filter,
        &mut out,
        &mut Scratch::default(),
    );
    out
}

/// The general form: source box [x0, y0, x1, y1] in view coordinates, any filter.
pub fn resize_box(
    src: View<'_>,
    bx: [f32; 4],
    out_w: usize,
    out_h: usize,
    filter: Filter,
    out: &mut [u8],
    s: &mut Scratch,
) {
    // The portable x86-64 baseline (SSE2) has no 32-bit lane multiply, so the integer
    // multiply-accumulate loops stay scalar; the same code compiled for AVX2 vectorises. Integer
    // arithmetic: the output bytes are identical on both paths.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { resize_box_avx2(src, bx, out_w, out_h, filter, out, s) };
        return;
    }
    resize_box_impl::<false>(src, bx, out_w, out_h, filter, out, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn resize_box_avx2(
    src: View<'_>,
    bx: [f32; 4],
    out_w: usize,
    out_h: usize,
    filter: Filter,
    out: &mut [u8],
    s: &mut Scratch,
) {
    resize_box_impl::<true>(src, bx, out_w, out_h, filter, out, s)
}

/// `AVX2`: the caller runs with AVX2 enabled, so the RGB horizontal pass may use intrinsics.
#[inline(always)]
fn resize_box_impl<const AVX2: bool>(
    src: View<'_>,
    bx: [f32; 4],
    out_w: usize,
    out_h: usize,
    filter: Filter,
    out: &mut [u8],
    s: &mut Scratch,
) {
    let c = src.channels;
    assert_eq!(out.len(), out_w * out_h * c, "output buffer size");
    let full_box = bx == [0.0, 0.0, src.width as f32, src.height as f32];
    let need_h = out_w != src.width || !full_box;
    let need_v = out_h != src.height || !full_box;
    if !need_h && !need_v {
        for y in 0..out_h {
            out[y * out_w * c..(y + 1) * out_w * c].copy_from_slice(src.row(y));
        }
        return;
    }
    let cv = Coeffs::new(src.height, bx[1], bx[3], out_h, filter);
    // Rows the vertical pass reads.
    let ybox_first = cv.bounds.first().map(|b| b.0).unwrap_or(0);
    let ybox_last = cv.bounds.last().map(|b| b.0 + b.1).unwrap_or(0);
    let mut temp = std::mem::take(&mut s.temp);
    let (tview, shift) = if need_h {
        let ch = Coeffs::new(src.width, bx[0], bx[2], out_w, filter);
        let rows = ybox_last - ybox_first;
        temp.clear();
        temp.resize(out_w * rows * c, 0);
        for (ty, y) in (ybox_first..ybox_last).enumerate() {
            let dst = &mut temp[ty * out_w * c..(ty + 1) * out_w * c];
            #[cfg(target_arch = "x86_64")]
            if AVX2 && c == 3 {
                // SAFETY: AVX2 is available (the AVX2 entry point is the only caller with
                // AVX2 = true).
                unsafe { horizontal_row_rgb_avx2(src.row(y), &ch, dst) };
                continue;
            }
            horizontal_row(src.row(y), c, &ch, dst);
        }
        (View::new(&temp, out_w, rows, c), ybox_first)
    } else {
        (src, 0)
    };
    if need_v {
        vertical(tview, &cv, shift, out, &mut s.acc);
    } else {
        for y in 0..out_h {
            out[y * out_w * c..(y + 1) * out_w * c].copy_from_slice(tview.row(y));
        }
    }
    s.temp = temp;
}

/// One RGB output pixel `xx` of the horizontal pass.
#[inline(always)]
fn rgb_pixel(src: &[u8], co: &Coeffs, xx: usize, px: &mut [u8]) {
    const HALF: i32 = 1 << (PRECISION_BITS - 1);
    let (xmin, n) = co.bounds[xx];
    let k = &co.k[xx * co.ksize..xx * co.ksize + n];
    let s = &src[xmin * 3..(xmin + n) * 3];
    let (mut a0, mut a1, mut a2) = (HALF, HALF, HALF);
    for (kv, p) in k.iter().zip(s.chunks_exact(3)) {
        a0 += p[0] as i32 * kv;
        a1 += p[1] as i32 * kv;
        a2 += p[2] as i32 * kv;
    }
    px[0] = clip8(a0);
    px[1] = clip8(a1);
    px[2] = clip8(a2);
}

#[inline(always)]
fn horizontal_row(src: &[u8], c: usize, co: &Coeffs, dst: &mut [u8]) {
    const HALF: i32 = 1 << (PRECISION_BITS - 1);
    match c {
        3 => {
            for (xx, px) in dst.chunks_exact_mut(3).enumerate() {
                rgb_pixel(src, co, xx, px);
            }
        }
        _ => {
            for xx in 0..dst.len() / c {
                let (xmin, n) = co.bounds[xx];
                let k = &co.k[xx * co.ksize..xx * co.ksize + n];
                for ch in 0..c {
                    let mut a = HALF;
                    for (i, kv) in k.iter().enumerate() {
                        a += src[(xmin + i) * c + ch] as i32 * kv;
                    }
                    dst[xx * c + ch] = clip8(a);
                }
            }
        }
    }
}

/// The RGB horizontal pass with explicit AVX2: two taps per step, each pixel's three channels
/// (plus a zero lane) in one 128-bit half; the same integer arithmetic as [`horizontal_row`],
/// so the same bytes. Pixels whose 8-byte loads would pass the row's end take the scalar path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_row_rgb_avx2(src: &[u8], co: &Coeffs, dst: &mut [u8]) {
    use std::arch::x86_64::*;
    const HALF: i32 = 1 << (PRECISION_BITS - 1);
    // Bytes 0-2 (pixel i) to 32-bit lanes 0-2, bytes 3-5 (pixel i+1) to lanes 4-6, zeros else.
    let spread = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    let dup = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    let out_w = dst.len() / 3;
    for xx in 0..out_w {
        let (xmin, n) = co.bounds[xx];
        let k = &co.k[xx * co.ksize..xx * co.ksize + n];
        let base = xmin * 3;
        // Pairs read 8 bytes from base + 3i; a single tail tap reads 4 bytes.
        let pairs = n / 2;
        let need = if n % 2 == 1 {
            base + 3 * (n - 1) + 4
        } else if pairs > 0 {
            base + 3 * (n - 2) + 8
        } else {
            base
        };
        if need > src.len() {
            rgb_pixel(src, co, xx, &mut dst[xx * 3..xx * 3 + 3]);
            continue;
        }
        let p = src.as_ptr().add(base);
        let mut acc = _mm256_setzero_si256();
        for i in 0..pairs {
            let px = _mm_loadl_epi64(p.add(6 * i) as *const __m128i);
            let px = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(px, spread));
            let kk = _mm_loadl_epi64(k.as_ptr().add(2 * i) as *const __m128i);
            let kk = _mm256_permutevar8x32_epi32(_mm256_castsi128_si256(kk), dup);
            acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(px, kk));
        }
        let mut sum = _mm_add_epi32(
            _mm_add_epi32(
                _mm256_castsi256_si128(acc),
                _mm256_extracti128_si256(acc, 1),
            ),
            _mm_set1_epi32(HALF),
        );
        if n % 2 == 1 {
            let px = (p.add(3 * (n - 1)) as *const i32).read_unaligned();
            let px = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(px));
            sum = _mm_add_epi32(sum, _mm_mullo_epi32(px, _mm_set1_epi32(k[n - 1])));
        }
        // clip8: arithmetic shift, then saturate to 0..=255 (same as the scalar comparisons).
        let v = _mm_srai_epi32(sum, PRECISION_BITS as i32);
        let v = _mm_packus_epi16(_mm_packs_epi32(v, v), _mm_setzero_si128());
        let bytes = (_mm_cvtsi128_si32(v) as u32).to_le_bytes();
        dst[xx * 3..xx * 3 + 3].copy_from_slice(&bytes[..3]);
    }
}

#[inline(always)]
fn vertical(src: View<'_>, co: &Coeffs, shift: usize, out: &mut [u8], acc: &mut Vec<i32>) {
    const HALF: i32 = 1 << (PRECISION_BITS - 1);
    let row_len = src.width * src.channels;
    acc.clear();
    acc.resize(row_len, 0);
    for (yy, orow) in out.chunks_exact_mut(row_len).enumerate() {
        let (ymin, n) = co.bounds[yy];
        let k = &co.k[yy * co.ksize..yy * co.ksize + n];
        acc.fill(HALF);
        for (i, &kv) in k.iter().enumerate() {
            let r = src.row(ymin - shift + i);
            for (a, &p) in acc.iter_mut().zip(r) {
                *a += p as i32 * kv;
            }
        }
        for (o, &a) in orow.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
}

/// Nearest-neighbour resize of a one-channel view (for label masks): output pixel (x, y) takes
/// the source pixel under its centre, `floor(x0 + (x + 0.5) · scale)`.
pub fn resize_nearest(src: View<'_>, out_w: usize, out_h: usize, out: &mut [u8]) {
    assert_eq!(out.len(), out_w * out_h * src.channels);
    let c = src.channels;
    let sx = src.width as f64 / out_w as f64;
    let sy = src.height as f64 / out_h as f64;
    let xs: Vec<usize> = (0..out_w)
        .map(|x| (((x as f64 + 0.5) * sx) as usize).min(src.width - 1))
        .collect();
    for y in 0..out_h {
        let srow = src.row((((y as f64 + 0.5) * sy) as usize).min(src.height - 1));
        for (x, &ix) in xs.iter().enumerate() {
            let o = (y * out_w + x) * c;
            out[o..o + c].copy_from_slice(&srow[ix * c..ix * c + c]);
        }
    }
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
    fn coefficients_sum_to_one_in_fixed_point() {
        for (inn, out) in [(500, 224), (100, 224), (224, 224), (1000, 37)] {
            let c = Coeffs::new(inn, 0.0, inn as f32, out, Filter::Bicubic);
            for xx in 0..out {
                let (_, n) = c.bounds[xx];
                let s: i64 = c.k[xx * c.ksize..xx * c.ksize + n]
                    .iter()
                    .map(|&v| v as i64)
                    .sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= n as i64, "{s}");
            }
        }
    }

    #[test]
    fn identity_size_is_a_copy() {
        let src: Vec<u8> = (0..(8 * 6)).map(|v| v as u8).collect();
        let mut out = vec![0u8; 48];
        let v = View::new(&src, 8, 6, 1);
        resize_bicubic(v, 8, 6, &mut out, &mut Scratch::default());
        assert_eq!(out, src);
    }

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

    #[test]
    fn vectorised_and_portable_paths_agree_to_the_byte() {
        let (w, h) = (157, 93);
        let mut x = 12345u32;
        let src: Vec<u8> = (0..w * h * 3)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        let full = [0.0, 0.0, w as f32, h as f32];
        let part = [3.5, 2.0, 150.25, 90.0];
        for (ow, oh, f, bx) in [
            (64, 40, Filter::Bicubic, part),
            (200, 120, Filter::Bilinear, part),
            (224, 224, Filter::Bicubic, full),
            (41, 17, Filter::Bicubic, full),
            (1, 1, Filter::Bicubic, full),
            (156, 93, Filter::Bicubic, full),
            (23, 90, Filter::Bilinear, full),
            (500, 7, Filter::Bicubic, part),
        ] {
            for channels in [3, 1] {
                let mut a = vec![0u8; ow * oh * channels];
                let mut b = vec![0u8; ow * oh * channels];
                let v = View::new(&src[..w * h * channels], w, h, channels);
                resize_box(v, bx, ow, oh, f, &mut a, &mut Scratch::default());
                resize_box_impl::<false>(v, bx, ow, oh, f, &mut b, &mut Scratch::default());
                assert!(a == b, "{f:?} {ow}x{oh} c{channels}");
            }
        }
        // A view narrower than its rows (a crop): loads may not read past the row's end.
        let v = View::new(&src, w, h, 3).crop(5, 3, 60, 50);
        let (mut a, mut b) = (vec![0u8; 37 * 29 * 3], vec![0u8; 37 * 29 * 3]);
        resize_bicubic(v, 37, 29, &mut a, &mut Scratch::default());
        resize_box_impl::<false>(
            v,
            [0.0, 0.0, 60.0, 50.0],
            37,
            29,
            Filter::Bicubic,
            &mut b,
            &mut Scratch::default(),
        );
        assert!(a == b);
    }
}
