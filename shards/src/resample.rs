//! Pillow-compatible resampling (Pillow's `ImagingResample`, `Resample.c`), used by the loader's
//! transforms and by the shard writer's `--resize-short-side`.
//!
//! [`Precision::Exact`] reproduces Pillow to the bit for integer boxes: the filter (Keys' cubic
//! with a = -0.5 and support 2, or Pillow's triangle "bilinear" with support 1) is widened by the
//! downscale factor (antialiasing); per-output-pixel coefficients are normalised to sum 1 in
//! double precision, then quantised to fixed point with 22 fractional bits (rounded half away
//! from zero); the horizontal pass runs first over only the rows the vertical pass needs, and its
//! output is rounded and clipped to u8 before the vertical pass, exactly like Pillow's 8-bit path.
//! Each accumulator starts at 1 << 21 (round half up) and is clipped to [0, 255].
//! [`Precision::Fast`] is the same algorithm with Pillow-SIMD's 16-bit coefficients, which lets
//! AVX2 multiply-add two taps per 32-bit lane; it differs from Pillow by rounding only (at most a
//! few grey levels at a pixel, hundredths on average). The loader and the shard writer's
//! re-encoding use it; the exact one is there on request. Both are integer arithmetic written
//! here rather than taken from a SIMD crate, so each gives the same bytes on every CPU
//! (vectorised or not): shards and batches must be reproducible.

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

/// Normalised filter weights for one axis (the part of Pillow's `precompute_coeffs` before
/// quantisation).
struct Weights {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    w: Vec<f64>,
}

/// One axis of a resize: input length, source interval [in0, in1) (C floats in Pillow), output
/// length, filter, and with `fine` the full grid whose pairs the outputs average (see
/// [`ResizeOpts::pairs_of`]).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Axis {
    in_size: usize,
    in0: f32,
    in1: f32,
    out_size: usize,
    filter: Filter,
    fine: Option<usize>,
}

impl Axis {
    fn plain(in_size: usize, in0: f32, in1: f32, out_size: usize, filter: Filter) -> Axis {
        Axis {
            in_size,
            in0,
            in1,
            out_size,
            filter,
            fine: None,
        }
    }
}

impl Weights {
    fn new(a: Axis) -> Weights {
        if let Some(fine) = a.fine {
            let full = Weights::plain(a.in_size, a.in0, a.in1, fine, a.filter);
            return Weights::paired(full, a.out_size);
        }
        Weights::plain(a.in_size, a.in0, a.in1, a.out_size, a.filter)
    }

    fn plain(in_size: usize, in0: f32, in1: f32, out_size: usize, filter: Filter) -> Weights {
        let scale = (in1 - in0) as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut w = vec![0f64; out_size * ksize];
        let ss = 1.0 / filterscale;
        for xx in 0..out_size {
            let center = in0 as f64 + (xx as f64 + 0.5) * scale;
            // C casts truncate toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin as i64).max(0) as usize;
            let row = &mut w[xx * ksize..xx * ksize + n];
            let mut ww = 0.0;
            for (x, p) in row.iter_mut().enumerate() {
                *p = filter.eval((x as f64 + xmin as f64 - center + 0.5) * ss);
                ww += *p;
            }
            if ww != 0.0 {
                for p in row.iter_mut() {
                    *p /= ww;
                }
            }
            bounds.push((xmin, n));
        }
        Weights { bounds, ksize, w }
    }

    /// Output `j` averages outputs `2j` and `2j + 1` of `fine` (the last one twice when their
    /// number is odd): libjpeg's 2x2 chroma downsampling, whose edge replication this is,
    /// folded into the resize.
    fn paired(fine: Weights, out_size: usize) -> Weights {
        let n_fine = fine.bounds.len();
        assert_eq!(out_size, n_fine.div_ceil(2), "paired output size");
        let span = |j: usize| {
            let (a, b) = (2 * j, (2 * j + 1).min(n_fine - 1));
            let (ba, bb) = (fine.bounds[a], fine.bounds[b]);
            let lo = ba.0.min(bb.0);
            let hi = (ba.0 + ba.1).max(bb.0 + bb.1);
            (a, b, lo, hi.saturating_sub(lo))
        };
        let ksize = (0..out_size).map(|j| span(j).3).max().unwrap_or(0).max(1);
        let mut bounds = Vec::with_capacity(out_size);
        let mut w = vec![0f64; out_size * ksize];
        for j in 0..out_size {
            let (a, b, lo, n) = span(j);
            let row = &mut w[j * ksize..j * ksize + n];
            for src in [a, b] {
                let (x0, m) = fine.bounds[src];
                let taps = &fine.w[src * fine.ksize..src * fine.ksize + m];
                for (i, &t) in taps.iter().enumerate() {
                    row[x0 - lo + i] += 0.5 * t;
                }
            }
            bounds.push((lo, n));
        }
        Weights { bounds, ksize, w }
    }
}

/// Pillow's fixed-point rounding of a weight: half away from zero.
fn quantise(v: f64, bits: u32) -> i64 {
    let f = v * (1u64 << bits) as f64;
    if v < 0.0 {
        (-0.5 + f) as i64
    } else {
        (0.5 + f) as i64
    }
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for input length `in_size`, source
    /// box [in0, in1) (C floats in Pillow), output length `out_size` and `filter`.
    pub fn new(in_size: usize, in0: f32, in1: f32, out_size: usize, filter: Filter) -> Coeffs {
        Coeffs::from_weights(Weights::new(Axis::plain(
            in_size, in0, in1, out_size, filter,
        )))
    }

    fn from_weights(Weights { bounds, ksize, w }: Weights) -> Coeffs {
        let k = w
            .iter()
            .map(|&v| quantise(v, PRECISION_BITS) as i32)
            .collect();
        Coeffs { bounds, ksize, k }
    }
}

/// 16-bit coefficients for [`Precision::Fast`] (Pillow-SIMD's scheme): as many fractional bits
/// as keep the largest weight below 2^15, so that two taps multiply-add in one 16-bit pair
/// (`vpmaddwd`). Rows are padded with zeros to a multiple of 4 taps.
#[derive(Debug, Clone)]
pub struct Coeffs16 {
    pub bounds: Vec<(usize, usize)>,
    /// Coefficients per output pixel (a multiple of 4).
    pub ksize: usize,
    pub k: Vec<i16>,
    /// Fractional bits.
    pub bits: u32,
}

impl Coeffs16 {
    pub fn new(in_size: usize, in0: f32, in1: f32, out_size: usize, filter: Filter) -> Coeffs16 {
        Coeffs16::from_weights(Weights::new(Axis::plain(
            in_size, in0, in1, out_size, filter,
        )))
    }

    fn from_weights(wts: Weights) -> Coeffs16 {
        let maxk = wts.w.iter().fold(0f64, |m, v| m.max(v.abs()));
        // Pillow-SIMD's rule: the largest precision whose next step would reach 2^15.
        let mut bits = 0;
        while bits < PRECISION_BITS && quantise(maxk, bits + 1) < (1 << 15) {
            bits += 1;
        }
        let bits = bits.max(1);
        let ksize = wts.ksize.next_multiple_of(4);
        let mut k = vec![0i16; wts.bounds.len() * ksize];
        let mut bounds = wts.bounds;
        for (xx, (xmin, n)) in bounds.iter_mut().enumerate() {
            let row = &mut k[xx * ksize..xx * ksize + *n];
            for (q, &w) in row.iter_mut().zip(&wts.w[xx * wts.ksize..]) {
                *q = quantise(w, bits) as i16;
            }
            // Taps that quantise to 0 add nothing: dropping them at the ends (often the fifth
            // tap of an upscale) saves a whole 4-tap step without changing a sum.
            let lead = row.iter().take_while(|&&v| v == 0).count();
            let trail = row[lead..].iter().rev().take_while(|&&v| v == 0).count();
            let kept = *n - lead - trail;
            row.copy_within(lead..lead + kept, 0);
            row[kept..].fill(0);
            *xmin += lead;
            *n = kept;
        }
        Coeffs16 {
            bounds,
            ksize,
            k,
            bits,
        }
    }
}

type Coeffs16Key = (usize, u32, u32, usize, Filter, Option<usize>);

thread_local! {
    /// The last few coefficient tables built on this thread, newest first.
    static COEFFS16: std::cell::RefCell<Vec<(Coeffs16Key, std::rc::Rc<Coeffs16>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Coeffs16 {
    /// [`Coeffs16::new`] through a small per-thread cache: re-encoding a dataset resizes many
    /// images of the same size (and the two chroma planes of each alike), where building the
    /// tables (f64 kernel evaluations) was ~3 % of the work. 64 entries (a few hundred KiB)
    /// hold the common ImageNet sizes: with 8, table building still took 1.9 % of a resize run
    /// on the 2,000-image benchmark input, with 64 1.0 %.
    fn cached(a: Axis) -> std::rc::Rc<Coeffs16> {
        const KEEP: usize = 64;
        let key = (
            a.in_size,
            a.in0.to_bits(),
            a.in1.to_bits(),
            a.out_size,
            a.filter,
            a.fine,
        );
        COEFFS16.with_borrow_mut(|cache| {
            if let Some(i) = cache.iter().position(|(k, _)| *k == key) {
                let hit = cache.remove(i);
                let co = hit.1.clone();
                cache.insert(0, hit);
                return co;
            }
            let co = std::rc::Rc::new(Coeffs16::from_weights(Weights::new(a)));
            cache.truncate(KEEP - 1);
            cache.insert(0, (key, co.clone()));
            co
        })
    }
}

/// How the resampler rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Pillow's own arithmetic (22-bit coefficients): the same bytes as Pillow.
    Exact,
    /// Pillow-SIMD's arithmetic (16-bit coefficients, 14-17 fractional bits): within a grey
    /// level of Pillow (a mean difference of a few thousandths on real images) and about twice
    /// as fast. Still integer arithmetic, so the same bytes on every CPU.
    Fast,
}

impl Precision {
    /// The name recorded in shard manifests.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Exact => "exact",
            Precision::Fast => "fast16",
        }
    }
}

/// Options of [`resize_box`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeOpts {
    pub filter: Filter,
    pub precision: Precision,
    /// Mirror the output horizontally (a horizontal flip after the resize, for free).
    pub mirror: bool,
    /// `Some((fw, fh))`: the output is the 2x2 average of a resize to `fw`x`fh` (the last
    /// column / row repeated when odd), i.e. JPEG 4:2:0 chroma downsampling of a full-size
    /// resize, in one pass; the output is then `ceil(fw/2)`x`ceil(fh/2)` and the box spans the
    /// `fw`x`fh` grid.
    pub pairs_of: Option<(usize, usize)>,
}

impl ResizeOpts {
    /// Pillow's `resize` with `filter`: its arithmetic, no mirror.
    pub fn exact(filter: Filter) -> ResizeOpts {
        ResizeOpts {
            filter,
            precision: Precision::Exact,
            mirror: false,
            pairs_of: None,
        }
    }
}

#[inline(always)]
fn clip_bits(v: i32, bits: u32) -> u8 {
    (v >> bits).clamp(0, 255) as u8
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

    /// The pixels with rows packed (`stride` = `width × channels`).
    pub fn to_vec(&self) -> Vec<u8> {
        (0..self.height)
            .flat_map(|y| self.row(y))
            .copied()
            .collect()
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

/// Resizes `src` (`w`×`h`, `channels` interleaved bytes per pixel) to `ow`×`oh` with `filter`
/// (Pillow's `img.resize((ow, oh), filter)`) in `precision`'s arithmetic, into a new buffer.
#[allow(clippy::too_many_arguments)]
pub fn resize(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    ow: usize,
    oh: usize,
    filter: Filter,
    precision: Precision,
) -> Vec<u8> {
    let mut out = vec![0u8; ow * oh * channels];
    let opts = ResizeOpts {
        filter,
        precision,
        mirror: false,
        pairs_of: None,
    };
    resize_box(
        View::new(src, w, h, channels),
        [0.0, 0.0, w as f32, h as f32],
        ow,
        oh,
        opts,
        &mut out,
        &mut Scratch::default(),
    );
    out
}

/// The general form: source box [x0, y0, x1, y1] in view coordinates (Pillow's
/// `resize(size, filter, box)`; pixels outside the view are never read), with a choice of
/// arithmetic and an optional horizontal mirror of the output.
pub fn resize_box(
    src: View<'_>,
    bx: [f32; 4],
    out_w: usize,
    out_h: usize,
    opts: ResizeOpts,
    out: &mut [u8],
    s: &mut Scratch,
) {
    // The portable x86-64 baseline (SSE2) has no 32-bit lane multiply and no 256-bit
    // multiply-add, so the portable loops stay scalar; the AVX2 entry point runs explicit
    // intrinsics with the same integer arithmetic: the output bytes are identical on both paths.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { resize_box_avx2(src, bx, out_w, out_h, opts, out, s) };
        return;
    }
    resize_box_impl::<false>(src, bx, out_w, out_h, opts, out, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn resize_box_avx2(
    src: View<'_>,
    bx: [f32; 4],
    out_w: usize,
    out_h: usize,
    opts: ResizeOpts,
    out: &mut [u8],
    s: &mut Scratch,
) {
    resize_box_impl::<true>(src, bx, out_w, out_h, opts, out, s)
}

/// `AVX2`: the caller runs with AVX2 enabled, so the passes may use intrinsics.
#[inline(always)]
fn resize_box_impl<const AVX2: bool>(
    src: View<'_>,
    bx: [f32; 4],
    out_w: usize,
    out_h: usize,
    opts: ResizeOpts,
    out: &mut [u8],
    s: &mut Scratch,
) {
    let c = src.channels;
    assert_eq!(out.len(), out_w * out_h * c, "output buffer size");
    let full_box = bx == [0.0, 0.0, src.width as f32, src.height as f32];
    let (fine_w, fine_h) = opts.pairs_of.unzip();
    let need_h = out_w != src.width || !full_box || fine_w.is_some();
    let need_v = out_h != src.height || !full_box || fine_h.is_some();
    if !need_h && !need_v {
        for y in 0..out_h {
            out[y * out_w * c..(y + 1) * out_w * c].copy_from_slice(src.row(y));
        }
        if opts.mirror {
            mirror_rows(out, out_w, c);
        }
        return;
    }
    let axis = |in_size, in0, in1, out_size, fine| Axis {
        fine,
        ..Axis::plain(in_size, in0, in1, out_size, opts.filter)
    };
    let (ax, ay) = (
        axis(src.width, bx[0], bx[2], out_w, fine_w),
        axis(src.height, bx[1], bx[3], out_h, fine_h),
    );
    let cv = match opts.precision {
        Precision::Exact => Vertical::Exact(Coeffs::from_weights(Weights::new(ay))),
        Precision::Fast => Vertical::Fast(Coeffs16::cached(ay)),
    };
    let vbounds = match &cv {
        Vertical::Exact(c) => &c.bounds,
        Vertical::Fast(c) => &c.bounds,
    };
    // Rows the vertical pass reads (taps that are empty read none).
    let used = || vbounds.iter().filter(|b| b.1 > 0);
    let ybox_first = used().map(|b| b.0).min().unwrap_or(0);
    let ybox_last = used().map(|b| b.0 + b.1).max().unwrap_or(ybox_first);
    let mut temp = std::mem::take(&mut s.temp);
    let (tview, shift) = if need_h {
        let rows = ybox_last - ybox_first;
        // Every byte is written below: keep old contents rather than zero-fill each image (the
        // buffer only grows; `t` is this image's part).
        let need = out_w * rows * c;
        if temp.len() < need {
            temp.resize(need, 0);
        }
        let t = &mut temp[..need];
        if opts.precision == Precision::Fast {
            let ch = Coeffs16::cached(ax);
            #[allow(unused_mut)]
            let mut first = ybox_first;
            #[cfg(target_arch = "x86_64")]
            if AVX2 {
                // SAFETY: AVX2 is available (the AVX2 entry point is the only caller with
                // AVX2 = true).
                first = unsafe {
                    horizontal_fast_avx2(src, &ch, ybox_first..ybox_last, opts.mirror, t)
                };
            }
            let rows_out = t[(first - ybox_first) * out_w * c..].chunks_exact_mut(out_w * c);
            for (y, dst) in (first..ybox_last).zip(rows_out) {
                horizontal_row_fast(src.row(y), c, &ch, opts.mirror, dst);
            }
        } else {
            let ch = Coeffs::from_weights(Weights::new(ax));
            let rows_out = t.chunks_exact_mut(out_w * c);
            for (y, dst) in (ybox_first..ybox_last).zip(rows_out) {
                #[cfg(target_arch = "x86_64")]
                if AVX2 && c == 3 {
                    // SAFETY: as above.
                    unsafe { horizontal_row_rgb_avx2(src.row(y), &ch, opts.mirror, dst) };
                    continue;
                }
                horizontal_row(src.row(y), c, &ch, opts.mirror, dst);
            }
        }
        (View::new(&temp[..need], out_w, rows, c), ybox_first)
    } else {
        (src, 0)
    };
    if need_v {
        match &cv {
            Vertical::Exact(cv) => vertical(tview, cv, shift, out, &mut s.acc),
            Vertical::Fast(cv) => vertical_fast_any::<AVX2>(tview, cv, shift, out, &mut s.acc),
        }
    } else {
        for y in 0..out_h {
            out[y * out_w * c..(y + 1) * out_w * c].copy_from_slice(tview.row(y));
        }
    }
    if !need_h && opts.mirror {
        mirror_rows(out, out_w, c);
    }
    s.temp = temp;
}

/// Mirrors each row of `w` pixels of `c` bytes in place.
pub fn mirror_rows(img: &mut [u8], w: usize, c: usize) {
    for row in img.chunks_exact_mut(w * c) {
        for x in 0..w / 2 {
            let (a, b) = (x * c, (w - 1 - x) * c);
            for k in 0..c {
                row.swap(a + k, b + k);
            }
        }
    }
}

/// One RGB output pixel `xx` of the horizontal pass, written to `px`.
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

/// Output position of pixel `xx` of `w`.
#[inline(always)]
fn out_x(xx: usize, w: usize, mirror: bool) -> usize {
    if mirror {
        w - 1 - xx
    } else {
        xx
    }
}

#[inline(always)]
fn horizontal_row(src: &[u8], c: usize, co: &Coeffs, mirror: bool, dst: &mut [u8]) {
    const HALF: i32 = 1 << (PRECISION_BITS - 1);
    let out_w = dst.len() / c;
    match c {
        3 => {
            for xx in 0..out_w {
                let xo = out_x(xx, out_w, mirror);
                rgb_pixel(src, co, xx, &mut dst[xo * 3..xo * 3 + 3]);
            }
        }
        _ => {
            for xx in 0..out_w {
                let (xmin, n) = co.bounds[xx];
                let k = &co.k[xx * co.ksize..xx * co.ksize + n];
                let xo = out_x(xx, out_w, mirror);
                for ch in 0..c {
                    let mut a = HALF;
                    for (i, kv) in k.iter().enumerate() {
                        a += src[(xmin + i) * c + ch] as i32 * kv;
                    }
                    dst[xo * c + ch] = clip8(a);
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
unsafe fn horizontal_row_rgb_avx2(src: &[u8], co: &Coeffs, mirror: bool, dst: &mut [u8]) {
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
        let xo = out_x(xx, out_w, mirror);
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
            rgb_pixel(src, co, xx, &mut dst[xo * 3..xo * 3 + 3]);
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
        dst[xo * 3..xo * 3 + 3].copy_from_slice(&bytes[..3]);
    }
}

/// One output pixel `xx` of the 16-bit horizontal pass (any channel count) into `px`.
#[inline(always)]
fn fast_pixel(src: &[u8], c: usize, co: &Coeffs16, xx: usize, px: &mut [u8]) {
    let half = 1i32 << (co.bits - 1);
    let (xmin, n) = co.bounds[xx];
    let k = &co.k[xx * co.ksize..xx * co.ksize + n];
    for (ch, o) in px.iter_mut().enumerate() {
        let mut a = half;
        for (i, &kv) in k.iter().enumerate() {
            a += src[(xmin + i) * c + ch] as i32 * kv as i32;
        }
        *o = clip_bits(a, co.bits);
    }
}

#[inline(always)]
fn horizontal_row_fast(src: &[u8], c: usize, co: &Coeffs16, mirror: bool, dst: &mut [u8]) {
    let out_w = dst.len() / c;
    for xx in 0..out_w {
        let xo = out_x(xx, out_w, mirror);
        fast_pixel(src, c, co, xx, &mut dst[xo * c..xo * c + c]);
    }
}

/// The 16-bit RGB horizontal pass with AVX2 over four rows at once (`dst`: the four output rows,
/// one after the other), four taps per step. Four source pixels (12 bytes) are shuffled into
/// channel-wise pairs (taps 0,1 in the low half, 2,3 in the high half) and multiplied-added with
/// the coefficient pairs (`vpmaddwd`); each pixel's coefficients are loaded once for the four
/// rows, whose sums are reduced, shifted and packed together. The same integer arithmetic as
/// [`horizontal_row_fast`]; pixels whose 16-byte loads would pass the row's end take the scalar
/// path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_rows4_rgb_fast_avx2(
    src: [&[u8]; 4],
    co: &Coeffs16,
    mirror: bool,
    dst: &mut [u8],
) {
    // The direction as a constant, so that the pixel loop carries no branch on it.
    if mirror {
        horizontal_rows4_rgb_fast_avx2_in::<true>(src, co, dst)
    } else {
        horizontal_rows4_rgb_fast_avx2_in::<false>(src, co, dst)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_rows4_rgb_fast_avx2_in<const MIRROR: bool>(
    src: [&[u8]; 4],
    co: &Coeffs16,
    dst: &mut [u8],
) {
    use std::arch::x86_64::*;
    let mirror = MIRROR;
    let pairs = _mm_setr_epi8(0, 3, 1, 4, 2, 5, -1, -1, 6, 9, 7, 10, 8, 11, -1, -1);
    let dup = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    let half = _mm256_set1_epi32(1 << (co.bits - 1));
    let shift = _mm_cvtsi32_si128(co.bits as i32);
    let row = dst.len() / 4;
    let out_w = row / 3;
    let len = src[0].len();
    debug_assert!(src.iter().all(|r| r.len() == len));
    for xx in 0..out_w {
        let (xmin, n) = co.bounds[xx];
        let groups = n.div_ceil(4);
        let base = xmin * 3;
        let xo = out_x(xx, out_w, mirror) * 3;
        if groups == 0 || base + 12 * (groups - 1) + 16 > len {
            for (r, s) in src.iter().enumerate() {
                fast_pixel(s, 3, co, xx, &mut dst[r * row + xo..r * row + xo + 3]);
            }
            continue;
        }
        let kp = co.k.as_ptr().add(xx * co.ksize);
        let mut acc = [_mm256_setzero_si256(); 4];
        for g in 0..groups {
            // Taps 4g..4g+3 as two 32-bit pairs, broadcast to the halves; the padding taps past
            // n are zero, so the extra pixels loaded do not count.
            let kk = _mm_loadl_epi64(kp.add(4 * g) as *const __m128i);
            let kk = _mm256_permutevar8x32_epi32(_mm256_castsi128_si256(kk), dup);
            for (a, s) in acc.iter_mut().zip(src.iter()) {
                let px = _mm_loadu_si128(s.as_ptr().add(base + 12 * g) as *const __m128i);
                let px = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(px, pairs));
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(px, kk));
            }
        }
        // Row r's sum is the sum of acc[r]'s halves: pair rows 0|1 and 2|3 into one register.
        let s01 = _mm256_add_epi32(
            _mm256_add_epi32(
                _mm256_permute2x128_si256(acc[0], acc[1], 0x20),
                _mm256_permute2x128_si256(acc[0], acc[1], 0x31),
            ),
            half,
        );
        let s23 = _mm256_add_epi32(
            _mm256_add_epi32(
                _mm256_permute2x128_si256(acc[2], acc[3], 0x20),
                _mm256_permute2x128_si256(acc[2], acc[3], 0x31),
            ),
            half,
        );
        let p = _mm256_packs_epi32(_mm256_sra_epi32(s01, shift), _mm256_sra_epi32(s23, shift));
        // Low lane: rows 0 and 2; high lane: rows 1 and 3 (4 bytes each, the 4th is 0).
        let b = _mm256_packus_epi16(p, p);
        let lo = _mm256_castsi256_si128(b);
        let hi = _mm256_extracti128_si256(b, 1);
        let vals = [
            _mm_cvtsi128_si32(lo),
            _mm_cvtsi128_si32(hi),
            _mm_extract_epi32(lo, 1),
            _mm_extract_epi32(hi, 1),
        ];
        // One 4-byte store per row where it can spill onto a neighbour still to be written (the
        // next pixel in output order: the right one, or the left one when mirroring), instead of
        // a 3-byte copy; the row's last pixel in output order takes the 3-byte copy.
        if !mirror && xo + 3 < row {
            for (r, v) in vals.into_iter().enumerate() {
                let at = r * row + xo;
                debug_assert!(at + 4 <= dst.len());
                // SAFETY: xo + 4 <= row, so the 4 bytes lie inside dst's row r.
                std::ptr::write_unaligned(dst.as_mut_ptr().add(at) as *mut u32, v as u32);
            }
        } else if mirror && xo > 0 {
            for (r, v) in vals.into_iter().enumerate() {
                let at = r * row + xo - 1;
                debug_assert!(at + 4 <= dst.len());
                // SAFETY: xo >= 1 (in bytes, xo >= 3) and xo + 3 <= row, so the 4 bytes lie
                // inside dst's row r.
                std::ptr::write_unaligned(dst.as_mut_ptr().add(at) as *mut u32, (v as u32) << 8);
            }
        } else {
            for (r, v) in vals.into_iter().enumerate() {
                dst[r * row + xo..r * row + xo + 3].copy_from_slice(&(v as u32).to_le_bytes()[..3]);
            }
        }
    }
}

/// The AVX2 kernels of the 16-bit horizontal pass over source rows `rows` into `temp` (one
/// output row per source row): one-channel images row by row with a [`GrayPlan`] where it
/// applies, else four rows at a time (RGB and one-channel). Returns the first row left for the
/// scalar pass (the last rows, fewer than four, or all of them for other channel counts).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_fast_avx2(
    src: View<'_>,
    ch: &Coeffs16,
    rows: std::ops::Range<usize>,
    mirror: bool,
    temp: &mut [u8],
) -> usize {
    let c = src.channels;
    let out_w = ch.bounds.len();
    if c == 1 {
        if let Some(plan) = GrayPlan::new(ch, src.width) {
            for (y, dst) in rows.clone().zip(temp.chunks_exact_mut(out_w)) {
                horizontal_row_gray_planned_avx2(src.row(y), ch, &plan, mirror, dst);
            }
            return rows.end;
        }
    } else if c != 3 {
        return rows.start;
    }
    let wide = if c == 1 {
        WideTaps::new(ch, src.width)
    } else {
        WideTaps::default()
    };
    // Four rows at a time share each pixel's coefficients and epilogue.
    let mut first = rows.start;
    let quads = temp.chunks_exact_mut(4 * out_w * c);
    for (y, dst) in rows.step_by(4).zip(quads) {
        let four = [src.row(y), src.row(y + 1), src.row(y + 2), src.row(y + 3)];
        if c == 3 {
            horizontal_rows4_rgb_fast_avx2(four, ch, mirror, dst);
        } else {
            horizontal_rows4_gray_fast_avx2(four, ch, &wide, mirror, dst);
        }
        first = y + 4;
    }
    first
}

/// Per-image layout for [`horizontal_row_gray_planned_avx2`]. Output pixels go in blocks of
/// eight, four per 128-bit lane, each lane's four taking all their taps (at most 8 a pixel)
/// from one 16-byte window of the row. For each tap pair `t` (taps 2t and 2t + 1) a byte shuffle
/// of the two windows puts every pixel's two taps in that pixel's 32-bit lane as 16-bit values,
/// and one `vpmaddwd` with the matching coefficients gives the pair's share of all eight sums:
/// the pairs' shares add up lane by lane, with no horizontal adds or reordering.
struct GrayPlan {
    /// Tap pairs per pixel (1..=4): the most taps any pixel has, halved, rounded up.
    pairs: usize,
    /// Per block: the two windows' starts; `usize::MAX` when a lane's taps do not fit one
    /// window (those eight pixels take the scalar path).
    base: Vec<[usize; 2]>,
    /// Per block, `pairs` 32-byte shuffles (index -1 gives a zero byte).
    shuf: Vec<[i8; 32]>,
    /// Per block, `pairs` × 16 coefficients matching the shuffles (zero past a pixel's taps).
    k: Vec<[i16; 16]>,
}

impl GrayPlan {
    /// `None` when too few blocks fit (strong downscales: more than 8 taps a pixel), where the
    /// four-row kernel is faster. A block with a pixel of more taps takes the scalar path.
    fn new(co: &Coeffs16, in_w: usize) -> Option<GrayPlan> {
        let out_w = co.bounds.len();
        if in_w < 16 || out_w < 8 {
            return None;
        }
        let most = co.bounds.iter().map(|b| b.1).max().unwrap_or(0).min(8);
        let pairs = most.div_ceil(2).max(1);
        // The last block ends at the row's end, overlapping the one before where `out_w` is
        // not a multiple of 8 (it recomputes those pixels to the same values).
        let blocks = out_w.div_ceil(8);
        let mut plan = GrayPlan {
            pairs,
            base: Vec::with_capacity(blocks),
            shuf: vec![[-1; 32]; blocks * pairs],
            k: vec![[0; 16]; blocks * pairs],
        };
        let mut misses = 0;
        for b in 0..blocks {
            let mut bases = [0; 2];
            let mut fits = true;
            let x0 = block_start(b, out_w);
            for (lane, base) in bases.iter_mut().enumerate() {
                let px = &co.bounds[x0 + 4 * lane..x0 + 4 * lane + 4];
                let first = px
                    .iter()
                    .filter(|p| p.1 > 0)
                    .map(|p| p.0)
                    .min()
                    .unwrap_or(0);
                // Windows near the row's end start earlier so that all 16 bytes are in the row.
                *base = first.min(in_w - 16);
                fits &= px.iter().all(|&(xmin, n)| {
                    n == 0 || (n <= 2 * pairs && xmin >= *base && xmin - *base + n <= 16)
                });
            }
            if !fits {
                misses += 1;
                plan.base.push([usize::MAX; 2]);
                continue;
            }
            plan.base.push(bases);
            for j in 0..8 {
                let xx = x0 + j;
                let (xmin, n) = co.bounds[xx];
                let (lane, at) = (j / 4, j % 4);
                let kx = &co.k[xx * co.ksize..xx * co.ksize + n];
                for (tap, &kv) in kx.iter().enumerate() {
                    let (t, second) = (tap / 2, tap % 2);
                    plan.shuf[b * pairs + t][16 * lane + 4 * at + 2 * second] =
                        (xmin - bases[lane] + tap) as i8;
                    plan.k[b * pairs + t][8 * lane + 2 * at + second] = kv;
                }
            }
        }
        (misses * 4 <= blocks).then_some(plan)
    }
}

/// First output pixel of [`GrayPlan`] block `b`.
#[inline(always)]
fn block_start(b: usize, out_w: usize) -> usize {
    (8 * b).min(out_w - 8)
}

/// The 16-bit one-channel horizontal pass for one row, eight output pixels per block (see
/// [`GrayPlan`]): two 16-byte window loads, then per tap pair one byte shuffle and one
/// `vpmaddwd` added to the running sums; rounding and packing, and one 8-byte store. The same
/// integer arithmetic as [`horizontal_row_fast`]; blocks that do not fit take the scalar path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_row_gray_planned_avx2(
    src: &[u8],
    co: &Coeffs16,
    plan: &GrayPlan,
    mirror: bool,
    dst: &mut [u8],
) {
    // The direction and the pair count as constants: no branch on the one, and the pair loop
    // unrolled for the other.
    macro_rules! run {
        ($($p:literal)*) => {
            match (plan.pairs, mirror) {
                $(
                    ($p, false) => gray_planned_avx2_in::<false, $p>(src, co, plan, dst),
                    ($p, true) => gray_planned_avx2_in::<true, $p>(src, co, plan, dst),
                )*
                _ => unreachable!("GrayPlan keeps 1 to 4 tap pairs"),
            }
        };
    }
    run!(1 2 3 4)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gray_planned_avx2_in<const MIRROR: bool, const PAIRS: usize>(
    src: &[u8],
    co: &Coeffs16,
    plan: &GrayPlan,
    dst: &mut [u8],
) {
    use std::arch::x86_64::*;
    let half = _mm256_set1_epi32(1 << (co.bits - 1));
    let shift = _mm_cvtsi32_si128(co.bits as i32);
    // Each lane's four bytes (its dword 0 after packing) side by side in the low 64 bits.
    let gather = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
    let out_w = dst.len();
    let scalar = |xs: std::ops::Range<usize>, dst: &mut [u8]| {
        for xx in xs {
            let xo = out_x(xx, out_w, MIRROR);
            fast_pixel(src, 1, co, xx, &mut dst[xo..xo + 1]);
        }
    };
    for (b, &[b0, b1]) in plan.base.iter().enumerate() {
        let x0 = block_start(b, out_w);
        if b0 == usize::MAX {
            scalar(x0..x0 + 8, dst);
            continue;
        }
        // In bounds: the plan only keeps windows with base + 16 <= the row's length.
        let win = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(src.as_ptr().add(b0) as *const __m128i)),
            _mm_loadu_si128(src.as_ptr().add(b1) as *const __m128i),
            1,
        );
        let sh = plan.shuf.as_ptr().add(b * PAIRS) as *const __m256i;
        let kp = plan.k.as_ptr().add(b * PAIRS) as *const __m256i;
        let mut acc = half;
        for t in 0..PAIRS {
            let taps = _mm256_shuffle_epi8(win, _mm256_loadu_si256(sh.add(t)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(taps, _mm256_loadu_si256(kp.add(t))));
        }
        let v = _mm256_sra_epi32(acc, shift);
        let p = _mm256_packs_epi32(v, v);
        let p = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p, p), gather);
        let eight = _mm_cvtsi128_si64(_mm256_castsi256_si128(p)) as u64;
        if MIRROR {
            let at = out_w - x0 - 8;
            dst[at..at + 8].copy_from_slice(&eight.swap_bytes().to_le_bytes());
        } else {
            dst[x0..x0 + 8].copy_from_slice(&eight.to_le_bytes());
        }
    }
}

/// Per output pixel of up to 16 taps (strong downscales, where [`GrayPlan`] steps aside): the
/// start of a 16-byte window of the row holding all its taps, and its coefficients placed at
/// their offsets in that window (zeros elsewhere). `base[x] == usize::MAX`: the four-tap path.
#[derive(Default)]
struct WideTaps {
    base: Vec<usize>,
    k: Vec<[i16; 16]>,
}

impl WideTaps {
    fn new(co: &Coeffs16, in_w: usize) -> WideTaps {
        let mut t = WideTaps {
            base: Vec::with_capacity(co.bounds.len()),
            k: Vec::with_capacity(co.bounds.len()),
        };
        for (xx, &(xmin, n)) in co.bounds.iter().enumerate() {
            let base = xmin.min(in_w.saturating_sub(16));
            let mut k = [0i16; 16];
            if in_w >= 16 && n > 0 && n <= 16 && xmin - base + n <= 16 {
                k[xmin - base..xmin - base + n]
                    .copy_from_slice(&co.k[xx * co.ksize..xx * co.ksize + n]);
                t.base.push(base);
            } else {
                t.base.push(usize::MAX);
            }
            t.k.push(k);
        }
        t
    }
}

/// The 16-bit one-channel horizontal pass (gray images, YUV planes) with AVX2 over four rows
/// at once. A pixel with a [`WideTaps`] window takes one 16-byte load per row, widened to 16
/// bits and multiplied-added with its 16 placed coefficients (`vpmaddwd`), three horizontal adds
/// folding the four rows' partial sums; otherwise four taps per step, the four rows' four bytes
/// in one register. The same integer arithmetic as [`horizontal_row_fast`]; pixels whose loads
/// would pass the row's end take the scalar path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_rows4_gray_fast_avx2(
    src: [&[u8]; 4],
    co: &Coeffs16,
    wide: &WideTaps,
    mirror: bool,
    dst: &mut [u8],
) {
    use std::arch::x86_64::*;
    let half = _mm_set1_epi32(1 << (co.bits - 1));
    let shift = _mm_cvtsi32_si128(co.bits as i32);
    let out_w = dst.len() / 4;
    let len = src[0].len();
    debug_assert!(src.iter().all(|r| r.len() == len));
    // In bounds: callers check `xmin + 4 * groups <= len` (or the wide window) first.
    let load4 = |s: &[u8], at: usize| std::ptr::read_unaligned(s.as_ptr().add(at) as *const i32);
    for xx in 0..out_w {
        let (xmin, n) = co.bounds[xx];
        let xo = out_x(xx, out_w, mirror);
        let sums = match wide.base.get(xx) {
            Some(&base) if base != usize::MAX => {
                // The window lies in the row: WideTaps keeps only base + 16 <= the row's length.
                let kk = _mm256_loadu_si256(wide.k[xx].as_ptr() as *const __m256i);
                let mut m = [_mm256_setzero_si256(); 4];
                for (mr, s) in m.iter_mut().zip(src.iter()) {
                    let px = _mm_loadu_si128(s.as_ptr().add(base) as *const __m128i);
                    *mr = _mm256_madd_epi16(_mm256_cvtepu8_epi16(px), kk);
                }
                // [r0 r0 r1 r1 | r0 r0 r1 r1] and the same for rows 2, 3; then one sum per row
                // in each lane; then the lanes added.
                let h01 = _mm256_hadd_epi32(m[0], m[1]);
                let h23 = _mm256_hadd_epi32(m[2], m[3]);
                let h = _mm256_hadd_epi32(h01, h23);
                _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))
            }
            _ => {
                let groups = n.div_ceil(4);
                if groups == 0 || xmin + 4 * groups > len {
                    for (r, s) in src.iter().enumerate() {
                        fast_pixel(s, 1, co, xx, &mut dst[r * out_w + xo..r * out_w + xo + 1]);
                    }
                    continue;
                }
                let kp = co.k.as_ptr().add(xx * co.ksize);
                let mut acc = _mm256_setzero_si256();
                for g in 0..groups {
                    let at = xmin + 4 * g;
                    // Taps 4g..4g+3 repeated for each row; padding taps past n are zero.
                    let kk =
                        _mm256_set1_epi64x(std::ptr::read_unaligned(kp.add(4 * g) as *const i64));
                    let px = _mm_setr_epi32(
                        load4(src[0], at),
                        load4(src[1], at),
                        load4(src[2], at),
                        load4(src[3], at),
                    );
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepu8_epi16(px), kk));
                }
                // acc: [r0 r0 r1 r1 | r2 r2 r3 r3] partial sums; fold the pairs, then the lanes.
                let h = _mm256_hadd_epi32(acc, acc);
                _mm_unpacklo_epi64(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))
            }
        };
        let v = _mm_sra_epi32(_mm_add_epi32(sums, half), shift);
        let b = _mm_packus_epi16(_mm_packs_epi32(v, v), _mm_setzero_si128());
        let bytes = (_mm_cvtsi128_si32(b) as u32).to_le_bytes();
        for (r, &byte) in bytes.iter().enumerate() {
            dst[r * out_w + xo] = byte;
        }
    }
}

/// The vertical pass's coefficients, in the chosen arithmetic.
enum Vertical {
    Exact(Coeffs),
    Fast(std::rc::Rc<Coeffs16>),
}

/// [`vertical_fast_avx2`] when the caller runs with AVX2, else [`vertical_fast`].
#[inline(always)]
fn vertical_fast_any<const AVX2: bool>(
    src: View<'_>,
    co: &Coeffs16,
    shift: usize,
    out: &mut [u8],
    acc: &mut Vec<i32>,
) {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: AVX2 is available (only the AVX2 entry point instantiates AVX2 = true).
        unsafe { vertical_fast_avx2(src, co, shift, out, acc) };
        return;
    }
    vertical_fast(src, co, shift, out, acc)
}

#[inline(always)]
fn vertical(src: View<'_>, co: &Coeffs, shift: usize, out: &mut [u8], acc: &mut Vec<i32>) {
    let half = 1 << (PRECISION_BITS - 1);
    let taps = (&co.bounds[..], &co.k[..], co.ksize);
    vertical_scalar(src, taps, shift, half, clip8, out, acc)
}

/// The 16-bit vertical pass (scalar).
#[inline(always)]
fn vertical_fast(src: View<'_>, co: &Coeffs16, shift: usize, out: &mut [u8], acc: &mut Vec<i32>) {
    let taps = (&co.bounds[..], &co.k[..], co.ksize);
    let bits = co.bits;
    vertical_scalar(
        src,
        taps,
        shift,
        1 << (bits - 1),
        |a| clip_bits(a, bits),
        out,
        acc,
    )
}

/// The scalar vertical pass of either arithmetic: `taps` = (bounds, coefficients, ksize); each
/// accumulator starts at `half` and `clip` rounds it back to a byte.
#[inline(always)]
fn vertical_scalar<K: Copy + Into<i32>>(
    src: View<'_>,
    (bounds, k, ksize): (&[(usize, usize)], &[K], usize),
    shift: usize,
    half: i32,
    clip: impl Fn(i32) -> u8,
    out: &mut [u8],
    acc: &mut Vec<i32>,
) {
    let row_len = src.width * src.channels;
    acc.clear();
    acc.resize(row_len, 0);
    for (yy, orow) in out.chunks_exact_mut(row_len).enumerate() {
        let (ymin, n) = bounds[yy];
        acc.fill(half);
        for (i, &kv) in k[yy * ksize..yy * ksize + n].iter().enumerate() {
            let kv: i32 = kv.into();
            let r = src.row(ymin - shift + i);
            for (a, &p) in acc.iter_mut().zip(r) {
                *a += p as i32 * kv;
            }
        }
        for (o, &a) in orow.iter_mut().zip(acc.iter()) {
            *o = clip(a);
        }
    }
}

/// The 16-bit vertical pass with AVX2: 32 bytes of a row at a time, two source rows per step
/// interleaved into 16-bit pairs and multiplied-added with the two rows' coefficients
/// (`vpmaddwd`); rows shorter than 32 bytes go through [`vertical_fast`]. The unpacks and
/// packs work within 128-bit lanes and undo each other, so the bytes come out in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_fast_avx2(
    src: View<'_>,
    co: &Coeffs16,
    shift: usize,
    out: &mut [u8],
    acc: &mut Vec<i32>,
) {
    use std::arch::x86_64::*;
    let row_len = src.width * src.channels;
    if row_len < 32 {
        vertical_fast(src, co, shift, out, acc);
        return;
    }
    // The last block overlaps the one before when the row is not a multiple of 32 bytes: it
    // recomputes a few bytes to the same values instead of leaving a scalar tail.
    let last = row_len - 32;
    let half = _mm256_set1_epi32(1 << (co.bits - 1));
    let sh = _mm_cvtsi32_si128(co.bits as i32);
    let zero = _mm256_setzero_si256();
    for (yy, orow) in out.chunks_exact_mut(row_len).enumerate() {
        let (ymin, n) = co.bounds[yy];
        let k = &co.k[yy * co.ksize..yy * co.ksize + n];
        let mut next = 0;
        while next < row_len {
            let x = next.min(last);
            next += 32;
            let (mut s0, mut s1, mut s2, mut s3) = (half, half, half, half);
            let mut i = 0;
            while i < n {
                let a =
                    _mm256_loadu_si256(src.row(ymin - shift + i).as_ptr().add(x) as *const __m256i);
                let (b, kb) = if i + 1 < n {
                    let r = src.row(ymin - shift + i + 1);
                    (
                        _mm256_loadu_si256(r.as_ptr().add(x) as *const __m256i),
                        k[i + 1],
                    )
                } else {
                    (zero, 0)
                };
                let mmk =
                    _mm256_set1_epi32((((kb as u16 as u32) << 16) | k[i] as u16 as u32) as i32);
                let lo = _mm256_unpacklo_epi8(a, b);
                let hi = _mm256_unpackhi_epi8(a, b);
                s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_unpacklo_epi8(lo, zero), mmk));
                s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, zero), mmk));
                s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(_mm256_unpacklo_epi8(hi, zero), mmk));
                s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, zero), mmk));
                i += 2;
            }
            let p01 = _mm256_packs_epi32(_mm256_sra_epi32(s0, sh), _mm256_sra_epi32(s1, sh));
            let p23 = _mm256_packs_epi32(_mm256_sra_epi32(s2, sh), _mm256_sra_epi32(s3, sh));
            _mm256_storeu_si256(
                orow.as_mut_ptr().add(x) as *mut __m256i,
                _mm256_packus_epi16(p01, p23),
            );
        }
    }
}

/// Nearest-neighbour resize of a one-channel view (for label masks): output pixel (x, y) takes
/// the source pixel under its centre, `floor(x0 + (x + 0.5) · scale)`.
pub fn resize_nearest(src: View<'_>, out_w: usize, out_h: usize, out: &mut [u8]) {
    resize_nearest_window(src, (out_w, out_h), (0, 0, out_w, out_h), out);
}

/// The window `(x0, y0, w, h)` of [`resize_nearest`] to `full` = (width, height), written as a
/// `w`x`h` image without making the rest (an evaluation centre crop of an extreme panorama).
pub fn resize_nearest_window(
    src: View<'_>,
    full: (usize, usize),
    (x0, y0, w, h): (usize, usize, usize, usize),
    out: &mut [u8],
) {
    assert_eq!(out.len(), w * h * src.channels);
    let c = src.channels;
    let sx = src.width as f64 / full.0 as f64;
    let sy = src.height as f64 / full.1 as f64;
    let xs: Vec<usize> = (x0..x0 + w)
        .map(|x| (((x as f64 + 0.5) * sx) as usize).min(src.width - 1))
        .collect();
    for (oy, y) in (y0..y0 + h).enumerate() {
        let srow = src.row((((y as f64 + 0.5) * sy) as usize).min(src.height - 1));
        for (x, &ix) in xs.iter().enumerate() {
            let o = (oy * w + x) * c;
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
        let (bx, exact) = ([0.0, 0.0, 8.0, 6.0], ResizeOpts::exact(Filter::Bicubic));
        resize_box(v, bx, 8, 6, exact, &mut out, &mut Scratch::default());
        assert_eq!(out, src);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 50 * 30 * 3];
        for f in [Filter::Bilinear, Filter::Bicubic] {
            for p in [Precision::Exact, Precision::Fast] {
                let out = resize(&src, 50, 30, 3, 17, 11, f, p);
                assert_eq!(out.len(), 17 * 11 * 3);
                assert!(out.iter().all(|&v| v == 77), "{f:?} {p:?}");
            }
        }
    }

    #[test]
    fn gradient_is_monotone_and_sizes() {
        let w = 64;
        let src: Vec<u8> = (0..w * 8).map(|i| ((i % w) * 4) as u8).collect();
        for p in [Precision::Exact, Precision::Fast] {
            let out = resize(&src, w, 8, 1, 16, 4, Filter::Bicubic, p);
            let row = &out[..16];
            assert!(row.windows(2).all(|p| p[0] <= p[1]), "{row:?}");
        }
        assert_eq!(short_side_size(500, 375, 256), (341, 256));
        assert_eq!(short_side_size(375, 500, 256), (256, 341));
        assert_eq!(short_side_size(200, 100, 256), (200, 100));
    }

    #[test]
    fn pairs_average_a_full_size_resize() {
        // Against resizing to the full grid (exact arithmetic) and averaging 2x2 blocks, the
        // last column / row repeated when odd: within rounding (the full resize rounds between
        // its passes and the average rounds once more).
        let (w, h) = (157, 93);
        // Values in 64..192, so no bicubic overshoot reaches the clamp at 0 or 255 (which the
        // full resize applies between its passes and the pair average does not see).
        let src: Vec<u8> = noise(w * h, 777).iter().map(|v| 64 + v / 2).collect();
        let v = View::new(&src, w, h, 1);
        for (fw, fh, bx) in [
            (43, 33, [0.0, 0.0, 157.0, 93.0]),
            (200, 120, [0.0, 0.0, 157.0, 93.0]),
            (61, 40, [0.0, 0.0, 150.5, 90.0]),
        ] {
            let mut full = vec![0u8; fw * fh];
            let exact = ResizeOpts::exact(Filter::Bicubic);
            resize_box(v, bx, fw, fh, exact, &mut full, &mut Scratch::default());
            let (pw, ph) = (fw.div_ceil(2), fh.div_ceil(2));
            for precision in [Precision::Exact, Precision::Fast] {
                let o = ResizeOpts {
                    precision,
                    pairs_of: Some((fw, fh)),
                    ..exact
                };
                let mut p = vec![0u8; pw * ph];
                resize_box(v, bx, pw, ph, o, &mut p, &mut Scratch::default());
                for j in 0..ph {
                    for i in 0..pw {
                        let at =
                            |x: usize, y: usize| full[y.min(fh - 1) * fw + x.min(fw - 1)] as f64;
                        let (x, y) = (2 * i, 2 * j);
                        let mean =
                            (at(x, y) + at(x + 1, y) + at(x, y + 1) + at(x + 1, y + 1)) / 4.0;
                        // Clamping to 0..255 in the full resize is the one thing the pair
                        // average does not see: allow it on top of rounding.
                        let got = p[j * pw + i] as f64;
                        assert!(
                            (got - mean).abs() <= 1.5 || at(x, y) == 0.0 || at(x, y) == 255.0,
                            "{fw}x{fh} {precision:?} ({i},{j}): {got} vs {mean}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn vectorised_and_portable_paths_agree_to_the_byte() {
        let (w, h) = (157, 93);
        let src = noise(w * h * 3, 12345);
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
            // Shard-resize scales (500 -> 341 and near 2x), where the one-channel plan applies
            // to all or only some groups of four pixels.
            (107, 64, Filter::Bicubic, full),
            (90, 55, Filter::Bicubic, part),
            (78, 47, Filter::Bicubic, full),
            (83, 50, Filter::Bilinear, full),
        ] {
            for channels in [3, 1] {
                let mut a = vec![0u8; ow * oh * channels];
                let mut b = vec![0u8; ow * oh * channels];
                let v = View::new(&src[..w * h * channels], w, h, channels);
                for precision in [Precision::Exact, Precision::Fast] {
                    for mirror in [false, true] {
                        let o = ResizeOpts {
                            filter: f,
                            precision,
                            mirror,
                            pairs_of: None,
                        };
                        let mut s = Scratch::default();
                        resize_box(v, bx, ow, oh, o, &mut a, &mut s);
                        resize_box_impl::<false>(v, bx, ow, oh, o, &mut b, &mut s);
                        assert!(a == b, "{o:?} {ow}x{oh} c{channels}");
                    }
                    // 2x2 averages (the shard writer's chroma planes): (ow, oh) is the full
                    // grid.
                    let (pw, ph) = (ow.div_ceil(2), oh.div_ceil(2));
                    let o = ResizeOpts {
                        filter: f,
                        precision,
                        mirror: false,
                        pairs_of: Some((ow, oh)),
                    };
                    let (mut a, mut b) =
                        (vec![0u8; pw * ph * channels], vec![1; pw * ph * channels]);
                    let mut s = Scratch::default();
                    resize_box(v, bx, pw, ph, o, &mut a, &mut s);
                    resize_box_impl::<false>(v, bx, pw, ph, o, &mut b, &mut s);
                    assert!(a == b, "{o:?} {pw}x{ph} c{channels}");
                }
            }
        }
        // A view narrower than its rows (a crop): loads may not read past the row's end.
        for c in [3, 1] {
            let v = View::new(&src, w, h, c).crop(5, 3, 60, 50);
            let (mut a, mut b) = (vec![0u8; 37 * 29 * c], vec![0u8; 37 * 29 * c]);
            let exact = ResizeOpts::exact(Filter::Bicubic);
            let full = [0.0, 0.0, 60.0, 50.0];
            resize_box(v, full, 37, 29, exact, &mut a, &mut Scratch::default());
            resize_box_impl::<false>(v, full, 37, 29, exact, &mut b, &mut Scratch::default());
            assert!(a == b);
            let fast = ResizeOpts {
                precision: Precision::Fast,
                ..exact
            };
            resize_box(v, full, 37, 29, fast, &mut a, &mut Scratch::default());
            resize_box_impl::<false>(v, full, 37, 29, fast, &mut b, &mut Scratch::default());
            assert!(a == b, "c{c}");
        }
    }

    #[test]
    fn one_channel_kernels_take_the_shard_resize_scales() {
        let misses = |p: &GrayPlan| p.base.iter().filter(|b| b[0] == usize::MAX).count();
        // 500 -> 341 (ImageNet to shorter side 256), the 4:2:0 chroma planes and an upscale:
        // every block (windows at the row's end start earlier).
        for (i, o) in [(500, 341), (250, 171), (375, 256), (157, 224)] {
            let co = Coeffs16::new(i, 0.0, i as f32, o, Filter::Bicubic);
            let plan = GrayPlan::new(&co, i).expect("plan");
            assert_eq!(
                (plan.base.len(), misses(&plan)),
                (o.div_ceil(8), 0),
                "{i} -> {o}"
            );
        }
        // Beyond 8 taps a pixel (bicubic at 2.5x down) the plan steps aside; right at the edge
        // some groups fit and some do not, and both paths run in one row.
        let down = Coeffs16::new(157, 0.0, 157.0, 64, Filter::Bicubic);
        assert!(GrayPlan::new(&down, 157).is_none());
        let mixed = Coeffs16::new(157, 0.0, 157.0, 78, Filter::Bicubic);
        assert!(GrayPlan::new(&mixed, 157).is_some_and(|p| misses(&p) > 0));
        // Where the plan steps aside, up to 16 taps a pixel take one 16-byte window each: the
        // full-resolution chroma of a 4:4:4 source going to a 4:2:0 output of shorter side 256.
        let wide = |i: usize, o: usize| {
            let t = WideTaps::new(&Coeffs16::new(i, 0.0, i as f32, o, Filter::Bicubic), i);
            t.base.iter().filter(|&&b| b == usize::MAX).count()
        };
        let chroma = Coeffs16::new(500, 0.0, 500.0, 171, Filter::Bicubic);
        assert!(GrayPlan::new(&chroma, 500).is_none());
        assert_eq!(wide(500, 171), 0);
        // Beyond 16 taps (bicubic at ~5x down) the four-tap steps remain (but at the edges,
        // where fewer taps fall inside the image).
        assert!(wide(500, 100) >= 96);
    }

    fn noise(n: usize, seed: u32) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect()
    }

    #[test]
    fn mirror_equals_flipping_the_output() {
        let (w, h) = (97, 61);
        let src = noise(w * h * 3, 7);
        for (ow, oh, bx) in [
            (48, 30, [2.5, 1.0, 90.0, 60.0]),
            (97, 61, [0.0, 0.0, 97.0, 61.0]),
            (97, 20, [0.0, 0.0, 97.0, 61.0]),
            (224, 224, [10.0, 5.0, 80.0, 50.0]),
        ] {
            for precision in [Precision::Exact, Precision::Fast] {
                let o = ResizeOpts {
                    precision,
                    ..ResizeOpts::exact(Filter::Bicubic)
                };
                let v = View::new(&src, w, h, 3);
                let mut a = vec![0u8; ow * oh * 3];
                let mut b = vec![0u8; ow * oh * 3];
                let mut s = Scratch::default();
                resize_box(v, bx, ow, oh, o, &mut a, &mut s);
                let m = ResizeOpts { mirror: true, ..o };
                resize_box(v, bx, ow, oh, m, &mut b, &mut s);
                mirror_rows(&mut a, ow, 3);
                assert!(a == b, "{o:?} {ow}x{oh}");
            }
        }
    }

    #[test]
    fn fast_precision_stays_within_rounding_of_exact() {
        // White noise is the worst case for rounding differences (no smooth regions).
        let (w, h) = (300, 200);
        let src = noise(w * h * 3, 3);
        for (ow, oh) in [(224, 224), (100, 70), (600, 401), (37, 224)] {
            let v = View::new(&src, w, h, 3);
            let bx = [0.0, 0.0, w as f32, h as f32];
            let mut exact = vec![0u8; ow * oh * 3];
            let mut fast = vec![0u8; ow * oh * 3];
            let mut s = Scratch::default();
            let o = ResizeOpts::exact(Filter::Bicubic);
            resize_box(v, bx, ow, oh, o, &mut exact, &mut s);
            let f = ResizeOpts {
                precision: Precision::Fast,
                ..o
            };
            resize_box(v, bx, ow, oh, f, &mut fast, &mut s);
            let (mut sum, mut max) = (0u64, 0u8);
            for (a, b) in exact.iter().zip(&fast) {
                let d = a.abs_diff(*b);
                sum += d as u64;
                max = max.max(d);
            }
            let mean = sum as f64 / exact.len() as f64;
            assert!(max <= 3 && mean < 0.3, "{ow}x{oh}: mean {mean}, max {max}");
        }
        // Sixteen-bit coefficients: the largest weight fills but does not overflow i16.
        for (inn, out) in [(500, 224), (100, 224), (224, 224), (1000, 37)] {
            let c = Coeffs16::new(inn, 0.0, inn as f32, out, Filter::Bicubic);
            assert!((14..=22).contains(&c.bits), "{}", c.bits);
            let max = c.k.iter().map(|v| v.unsigned_abs()).max().unwrap();
            assert!(max >= 1 << 14, "{max}");
        }
    }
}
