//! Restart markers: random access into a baseline JPEG's entropy-coded data.
//!
//! A baseline JPEG is one Huffman-coded stream, so a decoder must entropy-decode every MCU before
//! the ones it wants (libjpeg-turbo's cropping only skips the inverse DCT of the rows above and
//! the columns beside a crop). With restart markers every R MCUs, R dividing the MCUs per row,
//! the stream falls into independent segments (the DC prediction restarts at each), and the
//! segments covering a rectangle of MCUs make a valid, smaller JPEG by themselves. The shard
//! writer can add such markers losslessly ([`add_restarts`], `shard --jpeg-restarts`); the
//! loader cuts the window a crop needs ([`Layout::window`]) and decodes only that, which gives
//! the same pixels as a full decode away from the window's cut edges.

use turbojpeg::raw;

/// Largest restart interval (MCUs) [`add_restarts`] chooses: 8 MCUs are 64-128 pixels, fine
/// enough to skip much of what lies beside a crop, while most MCUs stay on libjpeg-turbo's fast
/// Huffman path (it leaves it for the MCUs just before each marker).
pub const MAX_INTERVAL: usize = 8;

/// Where the MCUs of a single-scan, sequential-Huffman JPEG with suitable restart markers lie.
#[derive(Debug, Clone)]
pub struct Layout {
    pub width: usize,
    pub height: usize,
    pub mcu_w: usize,
    pub mcu_h: usize,
    /// MCUs per row and per column.
    pub mcux: usize,
    pub mcuy: usize,
    /// MCUs per restart interval (divides `mcux`).
    pub interval: usize,
    /// Offset of the frame header's height field (the width follows).
    sof_dims: usize,
    /// Offset of the first entropy-coded byte.
    scan_start: usize,
    /// Entropy-coded segments `[start, end)` between the restart markers, in order.
    segments: Vec<(usize, usize)>,
}

/// The frame header's facts [`Layout::parse`] needs.
struct Frame {
    /// Offset of the height field (the width follows).
    dims_at: usize,
    height: usize,
    width: usize,
    /// (H, V) sampling factors per component.
    sampling: Vec<(usize, usize)>,
}

/// The big-endian 16-bit value at `b[i..i + 2]`.
pub(crate) fn be16(b: &[u8], i: usize) -> Option<usize> {
    Some(((*b.get(i)? as usize) << 8) | *b.get(i + 1)? as usize)
}

/// The marker of the segment that must start at `b[i]` (an 0xFF, fill 0xFF bytes allowed) and
/// the position after it; `None` if no marker starts there.
pub(crate) fn marker_at(b: &[u8], mut i: usize) -> Option<(u8, usize)> {
    if *b.get(i)? != 0xFF {
        return None;
    }
    while *b.get(i)? == 0xFF {
        i += 1;
    }
    Some((b[i], i + 1))
}

impl Layout {
    /// `None` unless `bytes` is a baseline or extended sequential Huffman JPEG with one scan of
    /// all its (1 or 3) components, a restart interval that divides the MCUs per row, and
    /// exactly the segments that implies, numbered in order.
    pub fn parse(bytes: &[u8]) -> Option<Layout> {
        if bytes.get(..2)? != [0xFF, 0xD8] {
            return None;
        }
        let mut i = 2;
        let mut sof: Option<Frame> = None;
        let mut interval = 0;
        loop {
            let m;
            (m, i) = marker_at(bytes, i)?;
            if matches!(m, 0x01 | 0xD0..=0xD9) {
                return None;
            }
            let len = be16(bytes, i)?;
            let seg = bytes.get(i + 2..i + len.max(2))?;
            match m {
                0xC0 | 0xC1 => {
                    if sof.is_some() || *seg.first()? != 8 {
                        return None;
                    }
                    let (h, w, nf) = (be16(seg, 1)?, be16(seg, 3)?, *seg.get(5)? as usize);
                    let mut samp = Vec::with_capacity(nf);
                    for c in 0..nf {
                        let hv = *seg.get(7 + 3 * c)? as usize;
                        samp.push((hv >> 4, hv & 15));
                    }
                    sof = Some(Frame {
                        dims_at: i + 3,
                        height: h,
                        width: w,
                        sampling: samp,
                    });
                }
                // Progressive, lossless, hierarchical or arithmetic-coded: not handled.
                0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
                0xDD => interval = be16(seg, 0)?,
                0xDA => {
                    let Frame {
                        dims_at,
                        height,
                        width,
                        sampling: samp,
                    } = sof?;
                    let ns = *seg.first()? as usize;
                    if height == 0 || width == 0 || interval == 0 || ns != samp.len() {
                        return None;
                    }
                    let (mcu_w, mcu_h) = match samp.len() {
                        1 => (8, 8),
                        3 => {
                            let hm = samp.iter().map(|s| s.0).max()?;
                            let vm = samp.iter().map(|s| s.1).max()?;
                            (8 * hm, 8 * vm)
                        }
                        _ => return None,
                    };
                    if mcu_w == 0 || mcu_h == 0 {
                        return None;
                    }
                    let (mcux, mcuy) = (width.div_ceil(mcu_w), height.div_ceil(mcu_h));
                    if mcux % interval != 0 {
                        return None;
                    }
                    let scan_start = i + len;
                    let segments = scan_segments(bytes, scan_start)?;
                    if segments.len() != mcux / interval * mcuy {
                        return None;
                    }
                    return Some(Layout {
                        width,
                        height,
                        mcu_w,
                        mcu_h,
                        mcux,
                        mcuy,
                        interval,
                        sof_dims: dims_at,
                        scan_start,
                        segments,
                    });
                }
                _ => {}
            }
            i += len;
        }
    }

    /// The MCU window (`cols`, `rows`, half-open, in MCUs) covering the pixel rectangle
    /// (x, y, w, h) grown by `margin` pixels on every side, columns widened to whole restart
    /// intervals; `None` when it would cover (almost) the whole image.
    pub fn window_for(
        &self,
        rect: (usize, usize, usize, usize),
        margin: usize,
    ) -> Option<((usize, usize), (usize, usize))> {
        let (x, y, w, h) = rect;
        let r = self.interval;
        let c0 = x.saturating_sub(margin) / self.mcu_w / r * r;
        let c1 = ((x + w + margin).div_ceil(self.mcu_w).div_ceil(r) * r).min(self.mcux);
        let r0 = y.saturating_sub(margin) / self.mcu_h;
        let r1 = (y + h + margin).div_ceil(self.mcu_h).min(self.mcuy);
        if c0 >= c1 || r0 >= r1 {
            return None;
        }
        // Cutting costs a copy of the kept segments; only worth it when it skips a real share.
        let kept = (c1 - c0) * (r1 - r0);
        (kept * 10 < self.mcux * self.mcuy * 9).then_some(((c0, c1), (r0, r1)))
    }

    /// A JPEG of the MCU columns `cols` and rows `rows` (columns on restart-interval
    /// boundaries, as [`Layout::window_for`] gives them) into `out`; returns the source pixel
    /// offset (x, y) of its top-left corner and its width and height. Its pixels equal the
    /// source's at least one MCU away from the cut edges (chroma upsampling looks one sample
    /// across).
    pub fn window(
        &self,
        bytes: &[u8],
        cols: (usize, usize),
        rows: (usize, usize),
        out: &mut Vec<u8>,
    ) -> (usize, usize, usize, usize) {
        let (c0, c1) = cols;
        let (r0, r1) = rows;
        debug_assert!(c0 % self.interval == 0 && (c1 % self.interval == 0 || c1 == self.mcux));
        let w = (c1 * self.mcu_w).min(self.width) - c0 * self.mcu_w;
        let h = (r1 * self.mcu_h).min(self.height) - r0 * self.mcu_h;
        out.clear();
        out.extend_from_slice(&bytes[..self.scan_start]);
        out[self.sof_dims..self.sof_dims + 2].copy_from_slice(&(h as u16).to_be_bytes());
        out[self.sof_dims + 2..self.sof_dims + 4].copy_from_slice(&(w as u16).to_be_bytes());
        let per_row = self.mcux / self.interval;
        let mut k = 0usize;
        for r in r0..r1 {
            for s in r * per_row + c0 / self.interval..r * per_row + c1.div_ceil(self.interval) {
                if k > 0 {
                    // Restart markers must count RST0..RST7 in order from the scan's start.
                    out.extend_from_slice(&[0xFF, 0xD0 + ((k - 1) % 8) as u8]);
                }
                let (a, b) = self.segments[s];
                out.extend_from_slice(&bytes[a..b]);
                k += 1;
            }
        }
        out.extend_from_slice(&[0xFF, 0xD9]);
        (c0 * self.mcu_w, r0 * self.mcu_h, w, h)
    }
}

/// Splits the entropy-coded data from `start` at its restart markers, up to the end-of-image
/// marker; `None` on anything else (another scan, a DNL marker, markers out of order).
fn scan_segments(b: &[u8], start: usize) -> Option<Vec<(usize, usize)>> {
    let mut segs = Vec::new();
    let mut seg_start = start;
    let mut i = start;
    let mut expect = 0u8;
    loop {
        let p = i + memchr::memchr(0xFF, b.get(i..)?)?;
        let mut j = p + 1;
        while *b.get(j)? == 0xFF {
            j += 1;
        }
        match b[j] {
            // A stuffed 0xFF data byte.
            0x00 => {}
            m @ 0xD0..=0xD7 => {
                if m - 0xD0 != expect {
                    return None;
                }
                expect = (expect + 1) % 8;
                segs.push((seg_start, p));
                seg_start = j + 1;
            }
            0xD9 => {
                segs.push((seg_start, p));
                return Some(segs);
            }
            _ => return None,
        }
        i = j + 1;
    }
}

/// Errors of [`add_restarts`].
#[derive(Debug, thiserror::Error)]
#[error("adding restart markers: {0}")]
pub struct RestartError(String);

/// Rewrites a JPEG losslessly (libjpeg-turbo's transcoder: the same DCT coefficients, Huffman
/// tables optimised, markers kept) with a restart marker every R MCUs, R the largest divisor of
/// the MCUs per row up to [`MAX_INTERVAL`]. Progressive input comes out sequential.
pub fn add_restarts(bytes: &[u8]) -> Result<Vec<u8>, RestartError> {
    struct Handle(raw::tjhandle);
    impl Drop for Handle {
        fn drop(&mut self) {
            // SAFETY: created by tj3Init below and destroyed once.
            unsafe { raw::tj3Destroy(self.0) }
        }
    }
    let err = |h: &Handle| {
        // SAFETY: valid handle; the message is a NUL-terminated string owned by it.
        let msg = unsafe { std::ffi::CStr::from_ptr(raw::tj3GetErrorStr(h.0)) };
        RestartError(msg.to_string_lossy().into_owned())
    };
    // SAFETY (all calls below): a valid handle, buffers and sizes from Rust slices, the output
    // buffer allocated by TurboJPEG and freed with tj3Free.
    let h = Handle(unsafe { raw::tj3Init(raw::TJINIT_TJINIT_TRANSFORM as i32) });
    if h.0.is_null() {
        return Err(RestartError("cannot create a TurboJPEG transformer".into()));
    }
    if unsafe { raw::tj3DecompressHeader(h.0, bytes.as_ptr(), bytes.len() as raw::size_t) } != 0 {
        return Err(err(&h));
    }
    let get = |p: raw::TJPARAM| unsafe { raw::tj3Get(h.0, p as i32) };
    let width = get(raw::TJPARAM_TJPARAM_JPEGWIDTH).max(1) as usize;
    let mcu_w = crate::loader::decode::mcu_width(get(raw::TJPARAM_TJPARAM_SUBSAMP));
    let mcux = width.div_ceil(mcu_w);
    let interval = (1..=MAX_INTERVAL.min(mcux))
        .rev()
        .find(|&r| mcux.is_multiple_of(r))
        .unwrap_or(1);
    let settings = [
        (raw::TJPARAM_TJPARAM_RESTARTBLOCKS, interval as i32),
        (raw::TJPARAM_TJPARAM_OPTIMIZE, 1),
        (raw::TJPARAM_TJPARAM_PROGRESSIVE, 0),
        (raw::TJPARAM_TJPARAM_ARITHMETIC, 0),
        // Keep every marker (EXIF, ICC, comments): only the entropy coding changes.
        (raw::TJPARAM_TJPARAM_SAVEMARKERS, 2),
    ];
    for (p, v) in settings {
        if unsafe { raw::tj3Set(h.0, p as i32, v) } != 0 {
            return Err(err(&h));
        }
    }
    let t = raw::tjtransform {
        r: raw::tjregion {
            x: 0,
            y: 0,
            w: 0,
            h: 0,
        },
        op: raw::TJXOP_TJXOP_NONE as i32,
        options: 0,
        data: std::ptr::null_mut(),
        customFilter: None,
    };
    let mut dst: *mut u8 = std::ptr::null_mut();
    let mut size: raw::size_t = 0;
    let rc = unsafe {
        raw::tj3Transform(
            h.0,
            bytes.as_ptr(),
            bytes.len() as raw::size_t,
            1,
            &mut dst,
            &mut size,
            &t,
        )
    };
    let out = (!dst.is_null()).then(|| {
        // SAFETY: TurboJPEG wrote `size` bytes at `dst`.
        let v = unsafe { std::slice::from_raw_parts(dst, size as usize) }.to_vec();
        unsafe { raw::tj3Free(dst as *mut std::ffi::c_void) };
        v
    });
    match (rc, out) {
        (0, Some(v)) => Ok(v),
        _ => Err(err(&h)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, DEFAULT_MAX_PIXELS};
    use std::path::{Path, PathBuf};

    fn fixture_jpegs() -> Vec<PathBuf> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let mut v: Vec<PathBuf> = ["data/imagenet/train", "loader/images"]
            .iter()
            .flat_map(|d| walk(&root.join(d)))
            .filter(|p| std::fs::read(p).is_ok_and(|b| b.starts_with(&[0xFF, 0xD8, 0xFF])))
            .collect();
        v.sort();
        v
    }

    /// A seeded generator of integers in 0..n.
    fn draws(seed: u64) -> impl FnMut(usize) -> usize {
        let mut x = seed;
        move |n| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize % n.max(1)
        }
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn restarts_are_lossless_and_windows_decode_to_the_same_pixels() {
        let files = fixture_jpegs();
        assert!(files.len() >= 8, "{files:?}");
        let mut next = draws(7);
        let mut checked = 0;
        for f in files {
            let src = std::fs::read(&f).unwrap();
            let Ok(rst) = add_restarts(&src) else {
                // CMYK and other layouts the transcoder or the loader do not take.
                continue;
            };
            let full = decode(&src, DEFAULT_MAX_PIXELS).unwrap();
            let again = decode(&rst, DEFAULT_MAX_PIXELS).unwrap();
            assert!(full == again, "{f:?}: restart markers changed pixels");
            let Some(lay) = Layout::parse(&rst) else {
                // Four-component (CMYK) JPEGs are not cut (the writer converts them anyway).
                assert!(f.to_string_lossy().contains("cmyk"), "{f:?}: no layout");
                continue;
            };
            assert!(lay.interval <= MAX_INTERVAL && lay.mcux % lay.interval == 0);
            assert_eq!(
                (lay.width, lay.height),
                (full.width as usize, full.height as usize)
            );
            assert!(Layout::parse(&src).is_none() || src == rst, "{f:?}");
            let (w, h, c) = (lay.width, lay.height, full.channels as usize);
            let mut cut = Vec::new();
            for _ in 0..12 {
                let (cw, ch) = (1 + next(w / 2), 1 + next(h / 2));
                let rect = (next(w - cw), next(h - ch), cw, ch);
                let Some((cols, rows)) = lay.window_for(rect, lay.mcu_w.max(lay.mcu_h)) else {
                    continue;
                };
                let (xo, yo, ww, wh) = lay.window(&rst, cols, rows, &mut cut);
                let part = decode(&cut, DEFAULT_MAX_PIXELS).unwrap();
                assert_eq!((part.width as usize, part.height as usize), (ww, wh));
                // Compare away from the cut edges (one MCU), everywhere at the true edges.
                let lo_x = if xo == 0 { 0 } else { lay.mcu_w };
                let lo_y = if yo == 0 { 0 } else { lay.mcu_h };
                let hi_x = if xo + ww == w { ww } else { ww - lay.mcu_w };
                let hi_y = if yo + wh == h { wh } else { wh - lay.mcu_h };
                for y in lo_y..hi_y {
                    let a = &part.data[(y * ww + lo_x) * c..(y * ww + hi_x) * c];
                    let o = ((yo + y) * w + xo + lo_x) * c;
                    let b = &full.data[o..o + (hi_x - lo_x) * c];
                    assert!(a == b, "{f:?} window {cols:?}x{rows:?} row {y}");
                }
                // The rectangle itself lies in the compared part.
                assert!(rect.0 >= xo + lo_x || xo == 0);
                assert!(rect.0 + rect.2 <= xo + hi_x && rect.1 + rect.3 <= yo + hi_y);
                checked += 1;
            }
        }
        assert!(checked >= 40, "only {checked} windows checked");
    }

    #[test]
    fn damaged_restart_marked_jpegs_never_panic_the_loader_decoder() {
        use crate::loader::decode::{Decoded, Decoder};
        let src = std::fs::read(&fixture_jpegs()[0]).unwrap();
        let good = add_restarts(&src).unwrap();
        let mut dec = Decoder::new().unwrap();
        let mut out = Decoded::default();
        let mut next = draws(11);
        for round in 0..300 {
            let mut bad = good.clone();
            for _ in 0..1 + round % 4 {
                let i = next(bad.len());
                bad[i] = match next(3) {
                    0 => 0xFF,
                    1 => 0xD0 + next(10) as u8,
                    _ => next(256) as u8,
                };
            }
            if round % 7 == 0 {
                bad.truncate(next(bad.len()));
            }
            let _ = Layout::parse(&bad);
            let Ok(hdr) = dec.header(&bad) else { continue };
            let (w, h) = (hdr.width, hdr.height);
            if w == 0 || h == 0 || w * h > 1 << 24 {
                continue;
            }
            let (cw, ch) = (1 + next(w), 1 + next(h));
            let rect = (next(w - cw + 1), next(h - ch + 1), cw, ch);
            for denom in [1, 2, 8] {
                let _ = dec.decode_region(&bad, &hdr, rect, denom, &mut out);
            }
        }
        // The decoder still works afterwards.
        let hdr = dec.header(&good).unwrap();
        dec.decode_region(&good, &hdr, (8, 8, 40, 30), 1, &mut out)
            .unwrap();
    }

    #[test]
    fn files_without_usable_restarts_have_no_layout() {
        assert!(Layout::parse(b"not a jpeg").is_none());
        assert!(Layout::parse(&[0xFF, 0xD8, 0xFF]).is_none());
        for f in fixture_jpegs() {
            let src = std::fs::read(&f).unwrap();
            if let Ok(rst) = add_restarts(&src) {
                // Truncations never panic and never give a layout with missing segments.
                for cut in [rst.len() / 2, rst.len() - 3] {
                    assert!(Layout::parse(&rst[..cut]).is_none(), "{f:?} cut at {cut}");
                }
            }
        }
    }
}
