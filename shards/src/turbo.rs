//! The TurboJPEG 3 decompressor, used by the shard writer's conversions and resizes and by the
//! loader, with one warning policy for both: Pillow's.
//!
//! libjpeg reports damage it can decode past as warnings ("Corrupt JPEG data: N extraneous bytes
//! before marker 0xd9", "premature end of data segment", a bad Huffman code) and still produces
//! the whole image. Pillow, which the reference and torchvision read images with, returns those
//! images; some real ImageNet files are like that. Only running out of data ("Premature end of
//! JPEG file": a truncated file) makes Pillow refuse an image. TurboJPEG reports any warning as a
//! failed call, so every call goes through [`Decompressor::check`].

use std::ffi::CStr;

use turbojpeg::raw;

pub(crate) type CInt = std::os::raw::c_int;

/// libjpeg's warning for a file that ends before its image does (`JWRN_JPEG_EOF`).
const TRUNCATED_WARNING: &str = "Premature end of JPEG file";

/// What [`Decompressor::read_header`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JpegHeader {
    pub width: usize,
    pub height: usize,
    /// A `TJSAMP_*` code.
    pub subsamp: i32,
    /// A `TJCS_*` code.
    pub colorspace: i32,
}

/// An owned TurboJPEG decompression handle.
pub(crate) struct Decompressor {
    handle: raw::tjhandle,
    /// Output geometry of the next decode, tracked so buffer sizes can be checked: the header
    /// last read, the scale denominator, and the cropping region (scaled pixels) if any.
    header: Option<JpegHeader>,
    denom: usize,
    crop: Option<(usize, usize, usize, usize)>,
}

// The handle is only used through &self / &mut self, never shared.
unsafe impl Send for Decompressor {}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { raw::tj3Destroy(self.handle) }
    }
}

impl Decompressor {
    pub fn new() -> Result<Decompressor, String> {
        // SAFETY: plain constructor; null on failure.
        let handle = unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as CInt) };
        if handle.is_null() {
            return Err("tj3Init failed".into());
        }
        Ok(Decompressor {
            handle,
            header: None,
            denom: 1,
            crop: None,
        })
    }

    /// The last error or warning message.
    pub fn error(&self) -> String {
        // SAFETY: returns a static or handle-owned C string.
        unsafe { CStr::from_ptr(raw::tj3GetErrorStr(self.handle)) }
            .to_string_lossy()
            .into_owned()
    }

    pub fn get(&self, p: raw::TJPARAM) -> i32 {
        // SAFETY: valid handle.
        unsafe { raw::tj3Get(self.handle, p as CInt) }
    }

    /// The outcome of a TurboJPEG call that returned `rc`, under Pillow's policy: warnings pass
    /// (the output is complete), except running out of data; errors fail with their message.
    pub fn check(&self, rc: CInt) -> Result<(), String> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: valid handle.
        let code = unsafe { raw::tj3GetErrorCode(self.handle) };
        let msg = self.error();
        if code == raw::TJERR_TJERR_WARNING as CInt && !msg.contains(TRUNCATED_WARNING) {
            Ok(())
        } else {
            Err(msg)
        }
    }

    /// Replaces the handle: after an error TurboJPEG may keep state from the failed stream,
    /// which would make the next (valid) image fail too.
    pub fn reset(&mut self) {
        // SAFETY: the old handle is destroyed once; a null new handle is reported on next use.
        unsafe {
            let fresh = raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as CInt);
            if !fresh.is_null() {
                raw::tj3Destroy(self.handle);
                self.handle = fresh;
            }
        }
        (self.header, self.denom, self.crop) = (None, 1, None);
    }

    /// Reads the frame header of `bytes` (and makes it the stream the next call decodes).
    pub fn read_header(&mut self, bytes: &[u8]) -> Result<JpegHeader, String> {
        // SAFETY: valid handle and buffer.
        let rc = unsafe {
            raw::tj3DecompressHeader(self.handle, bytes.as_ptr(), bytes.len() as raw::size_t)
        };
        self.header = None;
        self.check(rc)?;
        let h = JpegHeader {
            width: self.get(raw::TJPARAM_TJPARAM_JPEGWIDTH).max(0) as usize,
            height: self.get(raw::TJPARAM_TJPARAM_JPEGHEIGHT).max(0) as usize,
            subsamp: self.get(raw::TJPARAM_TJPARAM_SUBSAMP),
            colorspace: self.get(raw::TJPARAM_TJPARAM_COLORSPACE),
        };
        self.header = Some(h);
        Ok(h)
    }

    /// The size the next decode produces at the current scale, before cropping.
    pub fn scaled_size(&self) -> Option<(usize, usize)> {
        self.header
            .map(|h| (h.width.div_ceil(self.denom), h.height.div_ceil(self.denom)))
    }

    /// Decodes only the scaled region (x, y, w, h) from now on, `None` for the whole image.
    /// TurboJPEG refuses regions whose left edge is not on an iMCU boundary (an error here).
    pub fn set_crop(&mut self, crop: Option<(usize, usize, usize, usize)>) -> Result<(), String> {
        let r = crop.map_or(
            raw::tjregion {
                x: 0,
                y: 0,
                w: 0,
                h: 0,
            },
            |(x, y, w, h)| raw::tjregion {
                x: x as CInt,
                y: y as CInt,
                w: w as CInt,
                h: h as CInt,
            },
        );
        // SAFETY: valid handle.
        if unsafe { raw::tj3SetCroppingRegion(self.handle, r) } != 0 {
            return Err(self.error());
        }
        self.crop = crop;
        Ok(())
    }

    /// Decodes at 1/`denom` (1, 2, 4 or 8) from now on; returns the size the header last read
    /// decodes to at that scale (before cropping).
    pub fn set_scale(&mut self, denom: usize) -> Result<(usize, usize), String> {
        let sf = raw::tjscalingfactor {
            num: 1,
            denom: denom as CInt,
        };
        // SAFETY: valid handle.
        if unsafe { raw::tj3SetScalingFactor(self.handle, sf) } != 0 {
            return Err(self.error());
        }
        self.denom = denom;
        self.scaled_size()
            .ok_or_else(|| "set_scale before a header was read".into())
    }

    /// The scale denominator set with [`Self::set_scale`] (1 until then).
    pub fn scale_denom(&self) -> usize {
        self.denom
    }

    /// Width, height and bytes per pixel of the next decode in format `pf`.
    fn output_geometry(&self, pf: raw::TJPF) -> Result<(usize, usize, usize), String> {
        let (w, h) = match (self.crop, self.scaled_size()) {
            (Some((_, _, w, h)), _) => (w, h),
            (None, Some(s)) => s,
            (None, None) => return Err("decompress8_to_vec before a header was read".into()),
        };
        let ps = match pf {
            raw::TJPF_TJPF_GRAY => 1,
            raw::TJPF_TJPF_RGB | raw::TJPF_TJPF_BGR => 3,
            raw::TJPF_TJPF_CMYK => 4,
            _ => return Err(format!("pixel format {pf} is not used here")),
        };
        Ok((w, h, ps))
    }

    /// Decodes `bytes` to 8-bit pixels of format `pf` (a `TJPF_*` code), unpadded rows, at the
    /// scale and crop set since the header of the same bytes was read last with
    /// [`Self::read_header`], into `out` (cleared first, its allocation reused): on success it
    /// holds exactly the image, on failure nothing. Unlike sizing a buffer with `resize`, nothing
    /// is zero-filled before TurboJPEG overwrites it.
    pub fn decompress8_to_vec(
        &mut self,
        bytes: &[u8],
        out: &mut Vec<u8>,
        pf: raw::TJPF,
    ) -> Result<(), String> {
        let (w, h, ps) = self.output_geometry(pf)?;
        let n = w * h * ps;
        out.clear();
        out.reserve(n);
        // SAFETY: valid handle; `out` has capacity for the `h` rows of `w * ps` bytes (the
        // pitch) that TurboJPEG writes.
        let rc = unsafe {
            raw::tj3Decompress8(
                self.handle,
                bytes.as_ptr(),
                bytes.len() as raw::size_t,
                out.as_mut_ptr(),
                (w * ps) as CInt,
                pf as CInt,
            )
        };
        self.check(rc)?;
        // SAFETY: the call succeeded (or ended with a warning `check` lets pass, which libjpeg
        // only gives after producing every row, filling what it could not decode), so all `n`
        // bytes are written.
        unsafe { out.set_len(n) };
        Ok(())
    }

    /// Decodes `bytes` (at the current scale) to unpadded Y, Cb, Cr planes, one after the other
    /// in `out`, which must hold them (sized from the header of the same bytes, read last with
    /// [`Self::read_header`]; a smaller one is an error).
    pub fn decompress_to_yuv8(&mut self, bytes: &[u8], out: &mut [u8]) -> Result<(), String> {
        let (Some((w, h)), Some(hdr)) = (self.scaled_size(), self.header) else {
            return Err("decompress_to_yuv8 before a header was read".into());
        };
        // SAFETY: a pure size computation.
        let need = unsafe { raw::tj3YUVBufSize(w as CInt, 1, h as CInt, hdr.subsamp) };
        if need == 0 || out.len() < need as usize {
            return Err(format!("planes buffer too small for {w}x{h}"));
        }
        // SAFETY: valid handle; `out` holds the planes (checked above).
        let rc = unsafe {
            raw::tj3DecompressToYUV8(
                self.handle,
                bytes.as_ptr(),
                bytes.len() as raw::size_t,
                out.as_mut_ptr(),
                1,
            )
        };
        self.check(rc)
    }
}

/// Replaces `out` with the RGB pixels of `cmyk` (TurboJPEG's CMYK output, 4 bytes a pixel)
/// as Pillow converts a CMYK JPEG (see [`cmyk_to_rgb`]).
pub(crate) fn cmyk_pixels_to_rgb(cmyk: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(cmyk.len() / 4 * 3);
    for p in cmyk.chunks_exact(4) {
        out.extend_from_slice(&cmyk_to_rgb(p));
    }
}

/// Pillow: JPEG CMYK is read as "CMYK;I" (inverted), then `cmyk2rgb`:
/// `out = clip(nk - nk·c/255)` with `nk = 255 - k`, using Pillow's MULDIV255 rounding.
fn cmyk_to_rgb(raw: &[u8]) -> [u8; 3] {
    let nk = raw[3] as i32; // 255 - (255 - raw_k)
    let f = |v: u8| {
        let c = 255 - v as i32;
        let tmp = c * nk + 128;
        let m = ((tmp >> 8) + tmp) >> 8;
        (nk - m).clamp(0, 255) as u8
    };
    [f(raw[0]), f(raw[1]), f(raw[2])]
}
