//! A decoder for the common case of the shard writer's resize mode: a baseline (sequential,
//! Huffman, 8-bit), single-scan, three-component JPEG with standard sampling, decoded to
//! Y/Cb/Cr planes exactly as TurboJPEG's `tj3DecompressToYUV8` (align 1) lays them out,
//! byte for byte.
//!
//! Why: libjpeg-turbo's entropy decoding was half of the resize run's CPU time. This decoder
//! strips the byte stuffing first (so the bit reader needs no per-byte marker checks), reads
//! codes through one 10-bit table whose entries carry the bits to consume, the value mask and
//! the run (no data-dependent branch per coefficient), and writes the blocks into padded planes
//! with libjpeg-turbo's own AVX2 integer IDCT (`jsimd_idct_islow_avx2`, the function TurboJPEG
//! calls for the same blocks), so the output equals TurboJPEG's exactly.
//!
//! Anything else (progressive or arithmetic coding, several scans, other sampling, DNL,
//! restart markers out of order, a code that is no code, a run past the block, data that ends
//! early, anything but EOI after the scan) makes [`with_planes`] return `None` and the
//! caller decodes with TurboJPEG, which then applies the usual warning policy: this decoder
//! only ever succeeds where TurboJPEG would produce the same planes without an error.

use crate::resample::View;

/// Decodes `bytes` and calls `f` with its Y, Cb and Cr planes, which must have the sizes
/// `dims` (TurboJPEG's planes for this image: luma padded to the sampling factors, chroma the
/// luma's divided by them); the views hold exactly TurboJPEG's samples. `None`: not handled
/// here (see the module docs), `f` not called.
pub(crate) fn with_planes<R>(
    bytes: &[u8],
    dims: [(usize, usize); 3],
    f: impl FnOnce([View<'_>; 3]) -> R,
) -> Option<R> {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::available() {
            return x86::SCRATCH.with_borrow_mut(|s| x86::with_planes(bytes, dims, f, s));
        }
    }
    let _ = (bytes, dims, f);
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::cell::RefCell;
    use std::os::raw::c_void;
    use std::sync::OnceLock;

    use super::View;
    use crate::jpeg_restart::{be16, marker_at};

    unsafe extern "C" {
        /// libjpeg-turbo's AVX2 islow IDCT (simd/x86_64/jidctint-avx2.asm), exported by the
        /// statically linked TurboJPEG library: dequantises `coef_block` (natural order) with
        /// `dct_table` (the quantisation table as 16-bit multipliers, natural order) and writes
        /// 8 rows of 8 samples at `output_buf[i] + output_col`.
        fn jsimd_idct_islow_avx2(
            dct_table: *const c_void,
            coef_block: *const i16,
            output_buf: *const *mut u8,
            output_col: u32,
        );
    }

    pub(super) fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("bmi2")
        })
    }

    thread_local! {
        pub(super) static SCRATCH: RefCell<Scratch> = RefCell::default();
    }

    /// Per-thread buffers, reused across images (planes above this size are not kept).
    #[derive(Default)]
    pub(super) struct Scratch {
        clean: Vec<u8>,
        segments: Vec<(usize, usize)>,
        planes: [Vec<u8>; 3],
    }

    const KEEP_BYTES: usize = 16 << 20;

    /// Zigzag position -> natural index; positions past 63 (a corrupt run) map to index 64,
    /// a slot outside the block's 64 coefficients.
    const ZIGZAG: [u8; 128] = {
        let natural: [u8; 64] = [
            0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34,
            27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37,
            44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
        ];
        let mut z = [64u8; 128];
        let mut i = 0;
        while i < 64 {
            z[i] = natural[i];
            i += 1;
        }
        z
    };

    /// Lookahead of the code table: codes up to this many bits take one lookup.
    const LOOK: u32 = 10;
    /// See [`entry`]: past any index a corrupt run can reach (63 + 15 + 1), and a multiple of
    /// 128 so that `k & 127` still names the (untouched) slot the EOB's zero is written to.
    const EOB_SKIP: u32 = 128;
    /// The most bytes one block can consume: 64 symbols of 16 + 16 bits.
    const BLOCK_BYTES: usize = 64 * 32 / 8;
    /// Zero bytes after the entropy-coded data. The reader's `pos` runs up to 8 bytes ahead of
    /// the bits consumed and a refill reads 8 bytes there, so a block starting at
    /// `pos <= len - BLOCK_BYTES - 16` (checked per block) never reads past the padding.
    const PAD: usize = BLOCK_BYTES + 24;

    /// Coefficients of one block; 256 entries so that any `u8` index is in bounds.
    #[repr(C, align(32))]
    struct Block([i16; 256]);

    #[repr(C, align(32))]
    #[derive(Clone, Copy)]
    struct Quant([i16; 64]);

    struct Huffman {
        /// Indexed by the next LOOK bits; 0 for a code longer than LOOK (see [`long_code`]).
        look: Box<[u32; 1 << LOOK]>,
        maxcode: [i32; 18],
        valoff: [i32; 17],
        vals: Vec<u8>,
    }

    /// A table entry (nonzero): bits 0-4, code length + value bits (t); 5-11, 64 - t; 12-22,
    /// the value-bits mask 2^s - 1 (s up to 11); 23-30, how far the coefficient index moves
    /// before the value is written: the run, or for EOB (symbol 0) `EOB_SKIP`, which ends the
    /// block loop with the same `k >= 64` test as a full block. 4 KiB per table keeps the four
    /// a scan uses in L1.
    fn entry(l: u32, sym: u32) -> u32 {
        let (r, s) = (sym >> 4, sym & 15);
        let skip = if sym == 0 { EOB_SKIP } else { r };
        let t = l + s;
        t | ((64 - t) << 5) | (((1 << s) - 1) << 12) | (skip << 23)
    }

    impl Huffman {
        /// The canonical code of a DHT table. `None` for what libjpeg calls a bogus table
        /// (more codes than the code space) and for value sizes past baseline 8-bit JPEG's
        /// (DC 11 bits, AC 10), so that two AC symbols always fit in one refill.
        fn build(counts: &[u8; 16], vals: &[u8], dc: bool) -> Option<Huffman> {
            let mut look = Box::new([0u32; 1 << LOOK]);
            let mut maxcode = [-1i32; 18];
            let mut valoff = [0i32; 17];
            let mut code: u32 = 0;
            let mut k = 0usize;
            for l in 1..=16u32 {
                let n = counts[l as usize - 1] as usize;
                valoff[l as usize] = k as i32 - code as i32;
                for _ in 0..n {
                    let sym = *vals.get(k)? as u32;
                    if (dc && sym > 11) || (!dc && (sym & 15) > 10) {
                        return None;
                    }
                    if l <= LOOK {
                        let shift = LOOK - l;
                        let base = (code << shift) as usize;
                        look[base..base + (1 << shift)].fill(entry(l, sym));
                    }
                    code += 1;
                    k += 1;
                }
                if n > 0 {
                    maxcode[l as usize] = code as i32 - 1;
                }
                if code > (1 << l) {
                    return None;
                }
                code <<= 1;
            }
            maxcode[17] = i32::MAX;
            Some(Huffman {
                look,
                maxcode,
                valoff,
                vals: vals[..k].to_vec(),
            })
        }
    }

    /// A code longer than LOOK bits at the top of `buf`, decoded canonically: its entry, or
    /// `None` if the bits are no code.
    #[cold]
    #[inline(never)]
    fn long_code(h: &Huffman, buf: u64) -> Option<u32> {
        for l in LOOK + 1..=16u32 {
            let code = (buf >> (64 - l)) as i32;
            if code <= h.maxcode[l as usize] {
                let v = *h
                    .vals
                    .get(usize::try_from(h.valoff[l as usize] + code).ok()?)?;
                return Some(entry(l, v as u32));
            }
        }
        None
    }

    /// Bit reader state: unconsumed bits top-aligned in `buf` (`cnt` of them valid), `pos`
    /// the next byte of the cleaned data to load.
    struct Bits {
        pos: usize,
        buf: u64,
        cnt: u32,
    }

    /// Decodes one block (the DC difference added to `pred`, then the AC coefficients) into
    /// `blk`. `false`: no valid code, a DC out of range, a run past the block, or (cannot
    /// happen while the caller keeps `PAD` bytes after `bits.pos`) a read past `data`.
    ///
    /// # Safety
    /// The CPU supports BMI2.
    #[target_feature(enable = "bmi2")]
    unsafe fn decode_block(
        bits: &mut Bits,
        data: &[u8],
        dc: &Huffman,
        ac: &Huffman,
        blk: &mut Block,
        pred: &mut i32,
    ) -> bool {
        let (mut pos, mut buf, mut cnt) = (bits.pos, bits.buf, bits.cnt);
        // Tops `buf` up to 56-63 valid bits (bytes already in `buf` are ORed in again
        // unchanged).
        macro_rules! refill {
            () => {{
                let Some(b8) = data.get(pos..pos + 8) else {
                    return false;
                };
                let v = u64::from_be_bytes(b8.try_into().unwrap_or([0; 8]));
                buf |= v >> cnt;
                let adv = (63 - cnt) >> 3;
                pos += adv as usize;
                cnt += adv * 8;
            }};
        }
        // One symbol and its value bits: (index skip, value).
        macro_rules! symbol {
            ($h:expr) => {{
                let mut e = $h.look[(buf >> (64 - LOOK)) as usize];
                if e == 0 {
                    match long_code($h, buf) {
                        Some(x) => e = x,
                        None => return false,
                    }
                }
                let t = e & 31;
                // The value's s bits end the t bits; a first bit 0 (raw below half the
                // range) means negative: raw - (2^s - 1), computed without a branch.
                let mask = (e >> 12) & 2047;
                let raw = ((buf >> ((e >> 5) & 127)) as u32 & mask) as i32;
                let negative = (raw - ((mask >> 1) + 1) as i32) >> 31;
                let v = raw - (mask as i32 & negative);
                buf <<= t;
                cnt -= t;
                ((e >> 23) as usize, v)
            }};
        }
        blk.0[..64].fill(0);
        refill!();
        let (_, diff) = symbol!(dc);
        *pred += diff;
        if *pred < i16::MIN as i32 || *pred > i16::MAX as i32 {
            return false;
        }
        blk.0[0] = *pred as i16;
        let mut k = 1usize;
        // Two AC symbols per refill (at most 2 x 26 bits, see `Huffman::build`). ZRL (run 15,
        // no value bits) writes a zero 15 further; EOB jumps past the block (see `entry`).
        macro_rules! ac_symbol_ends_block {
            () => {{
                let (r, v) = symbol!(ac);
                k += r;
                blk.0[ZIGZAG[k & 127] as usize] = v as i16;
                k += 1;
                k >= 64
            }};
        }
        loop {
            refill!();
            if ac_symbol_ends_block!() || ac_symbol_ends_block!() {
                break;
            }
        }
        (bits.pos, bits.buf, bits.cnt) = (pos, buf, cnt);
        // 65..=79: a run past the last coefficient.
        k == 64 || k > EOB_SKIP as usize
    }

    struct Component {
        id: u8,
        h: usize,
        v: usize,
        quant: usize,
        dc: usize,
        ac: usize,
    }

    /// The frame, tables and scan of a JPEG this decoder handles.
    struct Header {
        width: usize,
        height: usize,
        comps: Vec<Component>,
        quant: [Option<Quant>; 4],
        dc: [Option<Huffman>; 4],
        ac: [Option<Huffman>; 4],
        restart_interval: usize,
        /// Offset of the entropy-coded data.
        scan: usize,
    }

    /// Reads the markers up to the first scan; `None` for anything not handled here.
    fn parse(b: &[u8]) -> Option<Header> {
        if b.get(..2)? != [0xFF, 0xD8] {
            return None;
        }
        let mut quant: [Option<Quant>; 4] = [None; 4];
        let mut dc: [Option<Huffman>; 4] = Default::default();
        let mut ac: [Option<Huffman>; 4] = Default::default();
        let mut restart_interval = 0;
        let mut frame: Option<(usize, usize, Vec<Component>)> = None;
        let mut i = 2;
        loop {
            let m;
            (m, i) = marker_at(b, i)?;
            let len = be16(b, i)?;
            if len < 2 || i + len > b.len() {
                return None;
            }
            let seg = &b[i + 2..i + len];
            match m {
                0xE0..=0xEF | 0xFE => {}
                0xDB => {
                    let mut p = 0;
                    while p < seg.len() {
                        let (precision, t) = (seg[p] >> 4, (seg[p] & 15) as usize);
                        p += 1;
                        if t > 3 || precision > 1 {
                            return None;
                        }
                        let mut q = Quant([0; 64]);
                        for (k, &natural) in ZIGZAG[..64].iter().enumerate() {
                            // 16-bit entries wrap into libjpeg-turbo's 16-bit multipliers
                            // the same way.
                            let v = if precision == 0 {
                                *seg.get(p + k)? as usize
                            } else {
                                be16(seg, p + 2 * k)?
                            };
                            q.0[natural as usize] = v as u16 as i16;
                        }
                        p += 64 * (precision as usize + 1);
                        quant[t] = Some(q);
                    }
                }
                0xC4 => {
                    let mut p = 0;
                    while p < seg.len() {
                        let (class, t) = (seg[p] >> 4, (seg[p] & 15) as usize);
                        if class > 1 || t > 3 {
                            return None;
                        }
                        let counts: [u8; 16] = seg.get(p + 1..p + 17)?.try_into().ok()?;
                        let n: usize = counts.iter().map(|&c| c as usize).sum();
                        if n > 256 {
                            return None;
                        }
                        let vals = seg.get(p + 17..p + 17 + n)?;
                        let h = Huffman::build(&counts, vals, class == 0)?;
                        if class == 0 {
                            dc[t] = Some(h);
                        } else {
                            ac[t] = Some(h);
                        }
                        p += 17 + n;
                    }
                }
                0xDD => {
                    if len != 4 {
                        return None;
                    }
                    restart_interval = be16(seg, 0)?;
                }
                0xC0 | 0xC1 => {
                    if frame.is_some() || seg.len() < 6 || seg[0] != 8 {
                        return None;
                    }
                    let (height, width, n) = (be16(seg, 1)?, be16(seg, 3)?, seg[5] as usize);
                    if height == 0 || width == 0 || n != 3 || seg.len() != 6 + 3 * n {
                        return None;
                    }
                    let comps = seg[6..]
                        .chunks_exact(3)
                        .map(|c| Component {
                            id: c[0],
                            h: (c[1] >> 4) as usize,
                            v: (c[1] & 15) as usize,
                            quant: c[2] as usize,
                            dc: 0,
                            ac: 0,
                        })
                        .collect();
                    frame = Some((width, height, comps));
                }
                0xDA => {
                    let (width, height, mut comps) = frame?;
                    let n = *seg.first()? as usize;
                    if n != comps.len() || seg.len() != 4 + 2 * n || seg[1 + 2 * n..] != [0, 63, 0]
                    {
                        return None;
                    }
                    // Components in frame order (the MCU order).
                    for (c, comp) in comps.iter_mut().enumerate() {
                        let (id, t) = (seg[1 + 2 * c], seg[2 + 2 * c]);
                        if id != comp.id {
                            return None;
                        }
                        (comp.dc, comp.ac) = ((t >> 4) as usize, (t & 15) as usize);
                    }
                    return Some(Header {
                        width,
                        height,
                        comps,
                        quant,
                        dc,
                        ac,
                        restart_interval,
                        scan: i + len,
                    });
                }
                _ => return None,
            }
            i += len;
        }
    }

    /// Copies the entropy-coded data from `b[start..]` into `s.clean` without byte stuffing,
    /// split at restart markers into `s.segments` (which must come in order RST0..RST7), then
    /// PAD zero bytes. `None` unless the data ends with EOI (fill bytes allowed before it).
    fn unstuff(b: &[u8], start: usize, restarts: bool, s: &mut Scratch) -> Option<()> {
        s.clean.clear();
        s.segments.clear();
        let (mut p, mut seg_start) = (start, 0);
        loop {
            let off = memchr::memchr(0xFF, b.get(p..)?)?;
            s.clean.extend_from_slice(&b[p..p + off]);
            p += off + 1;
            let mut m = *b.get(p)?;
            if m == 0 {
                s.clean.push(0xFF);
                p += 1;
                continue;
            }
            while m == 0xFF {
                p += 1;
                m = *b.get(p)?;
            }
            p += 1;
            if (0xD0..=0xD7).contains(&m) {
                if !restarts || (m - 0xD0) as usize != s.segments.len() % 8 {
                    return None;
                }
                s.segments.push((seg_start, s.clean.len()));
                seg_start = s.clean.len();
                continue;
            }
            if m != 0xD9 {
                return None;
            }
            s.segments.push((seg_start, s.clean.len()));
            s.clean.resize(s.clean.len() + PAD, 0);
            return Some(());
        }
    }

    pub(super) fn with_planes<R>(
        b: &[u8],
        dims: [(usize, usize); 3],
        f: impl FnOnce([View<'_>; 3]) -> R,
        s: &mut Scratch,
    ) -> Option<R> {
        let hd = parse(b)?;
        let comps = &hd.comps;
        // Standard sampling only: luma 1x1, 2x1, 1x2 or 2x2, chroma 1x1 (TurboJPEG's 4:4:4,
        // 4:2:2, 4:4:0 and 4:2:0).
        let (hmax, vmax) = (comps[0].h, comps[0].v);
        if !(1..=2).contains(&hmax)
            || !(1..=2).contains(&vmax)
            || comps[1..].iter().any(|c| c.h != 1 || c.v != 1)
        {
            return None;
        }
        let mut tables = Vec::with_capacity(3);
        for c in comps {
            let q = hd.quant.get(c.quant)?.as_ref()?;
            let dc = hd.dc.get(c.dc)?.as_ref()?;
            let ac = hd.ac.get(c.ac)?.as_ref()?;
            tables.push((q, dc, ac));
        }
        // TurboJPEG's plane sizes: luma padded to the sampling factors, chroma the luma's
        // divided by them.
        let (pw, ph) = (
            hd.width.next_multiple_of(hmax),
            hd.height.next_multiple_of(vmax),
        );
        if dims != [(pw, ph), (pw / hmax, ph / vmax), (pw / hmax, ph / vmax)] {
            return None;
        }
        let (mcus_x, mcus_y) = (hd.width.div_ceil(8 * hmax), hd.height.div_ceil(8 * vmax));
        let n_mcus = mcus_x * mcus_y;
        unstuff(b, hd.scan, hd.restart_interval > 0, s)?;
        let per_segment = if hd.restart_interval == 0 {
            n_mcus
        } else {
            hd.restart_interval
        };
        if s.segments.len() != n_mcus.div_ceil(per_segment) {
            return None;
        }

        // Planes covering the whole MCU grid, and the rows the IDCT writes to.
        let mut strides = [0usize; 3];
        let mut rows: Vec<*mut u8> = Vec::new();
        let mut row_start = [0usize; 3];
        for (c, comp) in comps.iter().enumerate() {
            strides[c] = mcus_x * comp.h * 8;
            let height = mcus_y * comp.v * 8;
            // Every sample of the grid is written by the IDCT below, so what a reused plane
            // held before does not matter.
            let plane = &mut s.planes[c];
            plane.resize(strides[c] * height, 0);
            row_start[c] = rows.len();
            let base = plane.as_mut_ptr();
            // SAFETY: every row starts inside the plane, which is not resized while `rows`
            // is used.
            rows.extend((0..height).map(|r| unsafe { base.add(r * strides[c]) }));
        }

        let mut blk = Block([0; 256]);
        let limit = s.clean.len() - BLOCK_BYTES - 16;
        let mut m = 0usize;
        for &(start, end) in &s.segments {
            let mut bits = Bits {
                pos: start,
                buf: 0,
                cnt: 0,
            };
            let mut pred = [0i32; 3];
            let last = (m + per_segment).min(n_mcus);
            while m < last {
                let (mx, my) = (m % mcus_x, m / mcus_x);
                for (c, comp) in comps.iter().enumerate() {
                    let (quant, dc, ac) = tables[c];
                    for by in my * comp.v..(my + 1) * comp.v {
                        for bx in mx * comp.h..(mx + 1) * comp.h {
                            if bits.pos > limit {
                                return None;
                            }
                            // SAFETY: `available()` checked BMI2.
                            let ok = unsafe {
                                decode_block(&mut bits, &s.clean, dc, ac, &mut blk, &mut pred[c])
                            };
                            if !ok {
                                return None;
                            }
                            // SAFETY: AVX2 checked by `available()`; the 8 row pointers from
                            // `row_start[c] + by * 8` and the 8 columns from `bx * 8` lie in
                            // plane `c` (it covers the MCU grid); `blk` and `quant` hold 64
                            // coefficients / multipliers each.
                            unsafe {
                                jsimd_idct_islow_avx2(
                                    quant.0.as_ptr() as *const c_void,
                                    blk.0.as_ptr(),
                                    rows.as_ptr().add(row_start[c] + by * 8),
                                    (bx * 8) as u32,
                                );
                            }
                        }
                    }
                }
                m += 1;
            }
            // Every bit used must have been in this segment (libjpeg would have read zeros
            // past it and warned).
            if (bits.pos - start) * 8 - (bits.cnt as usize) > (end - start) * 8 {
                return None;
            }
        }

        // The planes cover the MCU grid; the views show TurboJPEG's part of them.
        let view = |c: usize| View {
            data: &s.planes[c],
            width: dims[c].0,
            height: dims[c].1,
            channels: 1,
            stride: strides[c],
        };
        let r = f([view(0), view(1), view(2)]);
        for plane in &mut s.planes {
            if plane.capacity() > KEEP_BYTES {
                *plane = Vec::new();
            }
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::with_planes;
    use turbojpeg::{Compressor, Image, PixelFormat, Subsamp, YuvImage};

    /// TurboJPEG's `TJSAMP_*` code as the crate's enum.
    fn subsamp(code: i32) -> Option<Subsamp> {
        Some(match code {
            0 => Subsamp::None,
            1 => Subsamp::Sub2x1,
            2 => Subsamp::Sub2x2,
            3 => Subsamp::Gray,
            4 => Subsamp::Sub1x2,
            5 => Subsamp::Sub4x1,
            _ => return None,
        })
    }

    /// TurboJPEG's planes for `b` (align 1), `None` where it fails under the shard writer's
    /// warning policy.
    fn turbo_planes(b: &[u8]) -> Option<Vec<u8>> {
        let mut d = crate::turbo::Decompressor::new().ok()?;
        let h = d.read_header(b).ok()?;
        let sub = subsamp(h.subsamp)?;
        let geometry = YuvImage {
            pixels: (),
            width: h.width,
            align: 1,
            height: h.height,
            subsamp: sub,
        };
        let ((yw, yh), (cw, ch)) = (geometry.y_size(), geometry.uv_size());
        let mut planes = vec![0u8; yw * yh + 2 * cw * ch];
        d.decompress_to_yuv8(b, &mut planes).ok()?;
        Some(planes)
    }

    /// TurboJPEG's plane sizes for `b` (what the shard writer passes), `None` if it cannot
    /// read the header.
    fn plane_dims(b: &[u8]) -> Option<[(usize, usize); 3]> {
        let mut d = crate::turbo::Decompressor::new().ok()?;
        let h = d.read_header(b).ok()?;
        let geometry = YuvImage {
            pixels: (),
            width: h.width,
            align: 1,
            height: h.height,
            subsamp: subsamp(h.subsamp)?,
        };
        let (y, uv) = (geometry.y_size(), geometry.uv_size());
        Some([y, uv, uv])
    }

    /// The fast path's planes for `b`, concatenated as TurboJPEG writes them.
    fn fast_planes(b: &[u8]) -> Option<Vec<u8>> {
        let dims = plane_dims(b).unwrap_or([(1, 1); 3]);
        with_planes(b, dims, |views| {
            views.iter().flat_map(|v| v.to_vec()).collect()
        })
    }

    /// Smooth gradients plus seeded noise, so that blocks carry large and small coefficients.
    fn pixels(w: usize, h: usize, seed: u64) -> Vec<u8> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut out = Vec::with_capacity(w * h * 3);
        for r in 0..h {
            for c in 0..w {
                for ch in 0..3 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let noise = (x >> 58) as usize;
                    let v = (r * 255 / h.max(1) + c * (ch + 1) * 97 / w.max(1) + noise * 3) % 256;
                    out.push(v as u8);
                }
            }
        }
        out
    }

    fn encode(w: usize, h: usize, sub: Subsamp, quality: i32, progressive: bool) -> Vec<u8> {
        let px = pixels(w, h, (w * 31 + h) as u64);
        let mut c = Compressor::new().unwrap();
        c.set_quality(quality).unwrap();
        c.set_subsamp(sub).unwrap();
        c.set_progressive(progressive).unwrap();
        c.compress_to_vec(Image {
            pixels: &px[..],
            width: w,
            pitch: w * 3,
            height: h,
            format: PixelFormat::RGB,
        })
        .unwrap()
    }

    const SUBSAMPLINGS: [Subsamp; 4] = [
        Subsamp::None,
        Subsamp::Sub2x1,
        Subsamp::Sub1x2,
        Subsamp::Sub2x2,
    ];

    fn decodes_like_turbojpeg(b: &[u8], what: &str) {
        let want = turbo_planes(b).unwrap_or_else(|| panic!("{what}: TurboJPEG failed"));
        let got = fast_planes(b).unwrap_or_else(|| panic!("{what}: not decoded"));
        assert!(got == want, "{what}: planes differ from TurboJPEG's");
    }

    fn fast_path_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        return super::x86::available();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    #[test]
    fn planes_equal_turbojpegs_for_baseline_jpegs() {
        if !fast_path_available() {
            // Without AVX2 + BMI2 every JPEG goes to TurboJPEG.
            let b = encode(33, 17, Subsamp::Sub2x2, 90, false);
            assert!(fast_planes(&b).is_none());
            return;
        }
        let sizes = [
            (1, 1),
            (7, 9),
            (8, 8),
            (16, 16),
            (17, 15),
            (33, 47),
            (64, 48),
            (101, 75),
            (257, 130),
        ];
        for (w, h) in sizes {
            for sub in SUBSAMPLINGS {
                for quality in [40, 90, 100] {
                    let b = encode(w, h, sub, quality, false);
                    let what = format!("{w}x{h} {sub:?} q{quality}");
                    decodes_like_turbojpeg(&b, &what);
                    // The same coefficients with optimised tables and restart markers.
                    if let Ok(r) = crate::jpeg_restart::add_restarts(&b) {
                        decodes_like_turbojpeg(&r, &format!("{what} with restarts"));
                    }
                }
            }
        }
        // Black and white 8x8 blocks at quality 100: DC differences of 11 bits, the largest
        // baseline allows.
        let (w, h) = (64, 40);
        let px: Vec<u8> = (0..w * h * 3)
            .map(|i| {
                let (x, y) = ((i / 3) % w, (i / 3) / w);
                if (x / 8 + y / 8) % 2 == 0 {
                    0
                } else {
                    255
                }
            })
            .collect();
        for sub in SUBSAMPLINGS {
            let mut c = Compressor::new().unwrap();
            c.set_quality(100).unwrap();
            c.set_subsamp(sub).unwrap();
            let b = c
                .compress_to_vec(Image {
                    pixels: &px[..],
                    width: w,
                    pitch: w * 3,
                    height: h,
                    format: PixelFormat::RGB,
                })
                .unwrap();
            decodes_like_turbojpeg(&b, &format!("8x8 checkerboard {sub:?} q100"));
        }
    }

    #[test]
    fn real_photos_decode_like_turbojpeg() {
        if !fast_path_available() {
            return;
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/data/imagenet/train");
        let mut decoded = 0;
        for class in std::fs::read_dir(&root).unwrap().flatten() {
            for f in std::fs::read_dir(class.path()).unwrap().flatten() {
                let b = std::fs::read(f.path()).unwrap();
                let Some(want) = turbo_planes(&b) else {
                    continue;
                };
                if let Some(got) = fast_planes(&b) {
                    assert!(got == want, "{}: planes differ", f.path().display());
                    decoded += 1;
                }
            }
        }
        // The samples' colour JPEGs are baseline 4:4:4 / 4:2:0 (the rest gray or PNG).
        assert!(
            decoded >= 20,
            "only {decoded} sample photos took the fast path"
        );
    }

    #[test]
    fn other_jpegs_are_left_to_turbojpeg() {
        let b = encode(64, 48, Subsamp::Sub2x2, 90, false);
        // Plane sizes other than the image's.
        let mut dims = plane_dims(&b).unwrap();
        dims[0].0 += 2;
        assert!(with_planes(&b, dims, |_| ()).is_none());
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("progressive", encode(64, 48, Subsamp::Sub2x2, 90, true)),
            ("4:1:1", encode(64, 48, Subsamp::Sub4x1, 90, false)),
            ("truncated", b[..b.len() * 2 / 3].to_vec()),
            ("no EOI", b[..b.len() - 2].to_vec()),
            ("not a JPEG", b"\x89PNG\r\n\x1a\n".to_vec()),
            ("empty", Vec::new()),
        ];
        let mut gray = Compressor::new().unwrap();
        gray.set_subsamp(Subsamp::Gray).unwrap();
        let px = pixels(40, 30, 7);
        cases.push((
            "gray",
            gray.compress_to_vec(Image {
                pixels: &px[..],
                width: 40,
                pitch: 120,
                height: 30,
                format: PixelFormat::RGB,
            })
            .unwrap(),
        ));
        let mut arith = Compressor::new().unwrap();
        if arith.set_arithmetic(true).is_ok() {
            let a = arith
                .compress_to_vec(Image {
                    pixels: &px[..],
                    width: 40,
                    pitch: 120,
                    height: 30,
                    format: PixelFormat::RGB,
                })
                .unwrap();
            cases.push(("arithmetic", a));
        }
        // Restart markers out of order.
        let r =
            crate::jpeg_restart::add_restarts(&encode(256, 64, Subsamp::None, 90, false)).unwrap();
        let rst: Vec<usize> = (0..r.len() - 1)
            .filter(|&i| r[i] == 0xFF && (0xD0..=0xD7).contains(&r[i + 1]))
            .collect();
        assert!(rst.len() >= 2, "no restart markers to swap");
        let mut swapped = r.clone();
        swapped.swap(rst[0] + 1, rst[1] + 1);
        cases.push(("restarts out of order", swapped));
        for (what, b) in cases {
            assert!(fast_planes(&b).is_none(), "{what}: taken by the fast path");
        }
    }

    /// Damage in the entropy-coded data: whenever the fast path decodes, TurboJPEG decodes the
    /// same planes (under the shard writer's warning policy); it never panics.
    #[test]
    fn damaged_jpegs_decode_like_turbojpeg_or_fall_back() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let (mut taken, mut left) = (0, 0);
        for (w, h, sub) in [
            (64, 48, Subsamp::Sub2x2),
            (50, 37, Subsamp::None),
            (80, 16, Subsamp::Sub2x1),
        ] {
            let plain = encode(w, h, sub, 90, false);
            let restarted = crate::jpeg_restart::add_restarts(&plain).unwrap();
            for b in [plain, restarted] {
                // The scan starts after the SOS segment.
                let sos = (0..b.len() - 1)
                    .find(|&i| b[i] == 0xFF && b[i + 1] == 0xDA)
                    .unwrap();
                let scan = sos + 2 + ((b[sos + 2] as usize) << 8 | b[sos + 3] as usize);
                for _ in 0..150 {
                    let mut d = b.clone();
                    for _ in 0..1 + next(3) {
                        let i = scan + next(d.len() - scan);
                        d[i] = match next(3) {
                            0 => d[i] ^ (1 << next(8)),
                            1 => next(256) as u8,
                            _ => 0xFF,
                        };
                    }
                    if next(4) == 0 {
                        d.truncate(scan + next(d.len() - scan));
                    }
                    let want = turbo_planes(&d);
                    if let Some(got) = fast_planes(&d) {
                        let want = want.expect("decoded what TurboJPEG refuses");
                        assert!(got == want, "damaged JPEG decoded differently");
                        taken += 1;
                    } else {
                        left += 1;
                    }
                }
            }
        }
        if fast_path_available() {
            assert!(taken > 0 && left > 0, "taken {taken}, left {left}");
        }
    }
}
