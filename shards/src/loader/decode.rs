//! Image decoding: libjpeg-turbo (TurboJPEG 3 API) for JPEG, with partial decoding of the crop
//! region and optional DCT-domain downscaling; the `image` crate for anything else (PNG files
//! named .JPEG exist in ImageNet). The format is detected from the magic bytes.
//!
//! Output follows Pillow's `Image.open(f).convert("RGB")` (what torchvision's ImageFolder
//! loader does): grayscale stays one channel here (replicated to RGB after resampling, which
//! gives identical pixels since the resampler treats channels independently), CMYK JPEGs are
//! read with Adobe's inverted convention and converted with Pillow's `cmyk2rgb`, alpha is dropped,
//! and EXIF orientation is ignored, as Pillow does without `exif_transpose`.
//!
//! Partial decoding (`tj3SetCroppingRegion`) decodes only the MCU rows and columns that cover
//! the crop; libjpeg-turbo produces the same pixels as a full decode for them (checked by tests).

use turbojpeg::raw;

use crate::turbo::{cmyk_pixels_to_rgb, Decompressor};

/// Why a sample could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty image bytes")]
    Empty,
    #[error("JPEG: {0}")]
    Jpeg(String),
    #[error("image: {0}")]
    Image(String),
    #[error("image has zero size")]
    ZeroSize,
    #[error("image of {0}x{1} pixels exceeds the decoding limit")]
    TooLarge(usize, usize),
}

/// Largest accepted image (pixels); guards memory against hostile headers.
pub const MAX_PIXELS: usize = 16384 * 16384;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Jpeg { colorspace: i32, subsamp: i32 },
    Other,
}

/// Image dimensions and how to decode it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub width: usize,
    pub height: usize,
    kind: Kind,
}

impl Header {
    /// JPEG that supports DCT scaling and cropped decoding.
    pub fn is_jpeg(&self) -> bool {
        matches!(self.kind, Kind::Jpeg { .. })
    }
}

/// Decoded pixels of a region, in the (possibly DCT-scaled) pixel grid: the region starts at
/// scaled pixel (`x0`, `y0`); one scaled pixel covers `denom` source pixels per axis.
#[derive(Debug, Default)]
pub struct Decoded {
    pub pixels: Vec<u8>,
    pub width: usize,
    pub height: usize,
    /// 1 (gray) or 3 (RGB).
    pub channels: usize,
    pub x0: usize,
    pub y0: usize,
    pub denom: usize,
}

/// A TurboJPEG decompressor; one per thread.
pub struct Decoder {
    tj: Decompressor,
    cmyk: Vec<u8>,
    /// The cut-out JPEG of a restart-marked image (see [`crate::jpeg_restart`]).
    window: Vec<u8>,
}

fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.len() >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF
}

impl Decoder {
    pub fn new() -> Result<Decoder, DecodeError> {
        Ok(Decoder {
            tj: Decompressor::new().map_err(DecodeError::Jpeg)?,
            cmyk: Vec::new(),
            window: Vec::new(),
        })
    }

    /// After an error TurboJPEG may keep state from the failed stream, which would make the
    /// next (valid) image fail too.
    fn reset(&mut self) {
        self.tj.reset();
    }

    /// Reads the dimensions (JPEG header, or the other format's header).
    pub fn header(&mut self, bytes: &[u8]) -> Result<Header, DecodeError> {
        let r = self.header_inner(bytes);
        if r.is_err() {
            self.reset();
        }
        r
    }

    fn header_inner(&mut self, bytes: &[u8]) -> Result<Header, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        let (width, height, kind) = if is_jpeg(bytes) {
            let h = self.tj.read_header(bytes).map_err(DecodeError::Jpeg)?;
            // TurboJPEG takes a stream that ends before any frame header for a tables-only one:
            // it reports success and keeps the previous image's size, so junk after the first
            // markers would decode as noise of that size. Our own header walk must find the
            // frame, and the same size.
            let own = crate::codec::read_header(bytes, u64::MAX)
                .map_err(|e| DecodeError::Jpeg(e.to_string()))?;
            if (own.width as usize, own.height as usize) != (h.width, h.height) {
                return Err(DecodeError::Jpeg(format!(
                    "frame header says {}x{}, TurboJPEG read {}x{}",
                    own.width, own.height, h.width, h.height
                )));
            }
            let kind = Kind::Jpeg {
                colorspace: h.colorspace,
                subsamp: h.subsamp,
            };
            (h.width, h.height, kind)
        } else {
            let r = image::ImageReader::new(std::io::Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| DecodeError::Image(e.to_string()))?;
            let (w, h) = r
                .into_dimensions()
                .map_err(|e| DecodeError::Image(e.to_string()))?;
            (w as usize, h as usize, Kind::Other)
        };
        if width == 0 || height == 0 {
            return Err(DecodeError::ZeroSize);
        }
        if width.saturating_mul(height) > MAX_PIXELS {
            return Err(DecodeError::TooLarge(width, height));
        }
        Ok(Header {
            width,
            height,
            kind,
        })
    }

    /// Decodes at least the source rectangle (x, y, w, h) at scale 1/`denom` (1, 2, 4 or 8; only
    /// honoured for JPEG, others decode at 1) into `out`, reusing its buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_region(
        &mut self,
        bytes: &[u8],
        hdr: &Header,
        rect: (usize, usize, usize, usize),
        denom: usize,
        out: &mut Decoded,
    ) -> Result<(), DecodeError> {
        match hdr.kind {
            Kind::Jpeg {
                colorspace,
                subsamp,
            } => {
                let r = self.decode_jpeg(bytes, hdr, colorspace, subsamp, rect, denom, out);
                if r.is_err() {
                    self.reset();
                }
                r
            }
            Kind::Other => decode_other(bytes, out),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn decode_jpeg(
        &mut self,
        bytes: &[u8],
        hdr: &Header,
        colorspace: i32,
        subsamp: i32,
        rect: (usize, usize, usize, usize),
        denom: usize,
        out: &mut Decoded,
    ) -> Result<(), DecodeError> {
        let denom = if matches!(denom, 1 | 2 | 4 | 8) {
            denom
        } else {
            1
        };
        let sw = hdr.width.div_ceil(denom);
        let sh = hdr.height.div_ceil(denom);
        let (x, y, w, h) = rect;
        let mcu_w = mcu_width(subsamp);
        let smcu = (mcu_w / denom).max(1);
        // One iMCU of margin on every side: chroma upsampling at the edge of a cropped decode
        // lacks its neighbours, so those pixels may differ from a full decode; the margin keeps
        // every pixel the resampler reads identical to Pillow's full decode.
        let margin = (mcu_w.max(16) / denom).max(1);
        let x0 = ((x / denom).saturating_sub(margin)) / smcu * smcu;
        let y0 = (y / denom).saturating_sub(margin);
        let x1 = ((x + w).div_ceil(denom) + margin).min(sw);
        let y1 = ((y + h).div_ceil(denom) + margin).min(sh);
        let region = (x0, y0, x1 - x0, y1 - y0);
        if region != (0, 0, sw, sh) {
            // With restart markers, entropy-decode only the MCUs around the region: a JPEG cut
            // to them, one MCU wider than the region on every side (its cut edges lack the
            // chroma neighbours, like a cropped decode's), decodes to the same region pixels.
            let lay = crate::jpeg_restart::Layout::parse(bytes);
            // The cut relies on the frame size TurboJPEG read being the one parsed here.
            if let Some(lay) = lay.filter(|l| (l.width, l.height) == (hdr.width, hdr.height)) {
                // At full resolution the resampler reads only the crop itself, so the window
                // need only hold it one MCU away from the cut edges, and it is decoded whole.
                // Scaled decodes are read around the box too: there the window holds the region
                // a cropped decode would give, at the same place.
                let src = if denom == 1 {
                    rect
                } else {
                    (x0 * denom, y0 * denom, (x1 - x0) * denom, (y1 - y0) * denom)
                };
                if let Some((cols, rows)) = lay.window_for(src, lay.mcu_w.max(lay.mcu_h)) {
                    let mut cut = std::mem::take(&mut self.window);
                    let (xo, yo, ww, wh) = lay.window(bytes, cols, rows, &mut cut);
                    // Window and region come from the same frame size, so the region lies
                    // inside the window (the shared margin logic above keeps it so).
                    let inner = if denom == 1 {
                        (0, 0, ww, wh)
                    } else {
                        (x0 - xo / denom, y0 - yo / denom, region.2, region.3)
                    };
                    debug_assert!(inner.0 + inner.2 <= ww.div_ceil(denom));
                    debug_assert!(inner.1 + inner.3 <= wh.div_ceil(denom));
                    let r = self.decode_jpeg_at(&cut, colorspace, inner, denom, out);
                    self.window = cut;
                    r?;
                    out.x0 += xo / denom;
                    out.y0 += yo / denom;
                    return Ok(());
                }
            }
        }
        self.decode_jpeg_at(bytes, colorspace, region, denom, out)
    }

    /// Decodes the scaled region (x0, y0, w, h) of `bytes` at 1/`denom` (the whole image when
    /// the region is all of it, or when libjpeg-turbo refuses the cropping region).
    fn decode_jpeg_at(
        &mut self,
        bytes: &[u8],
        colorspace: i32,
        region: (usize, usize, usize, usize),
        denom: usize,
        out: &mut Decoded,
    ) -> Result<(), DecodeError> {
        self.tj.read_header(bytes).map_err(DecodeError::Jpeg)?;
        let (sw, sh) = self.tj.set_scale(denom).map_err(DecodeError::Jpeg)?;
        let whole = (0, 0, sw, sh);
        let crop = (region != whole).then_some(region);
        // Some layouts refuse a cropping region; decode the whole (scaled) image instead.
        let (x0, y0, rw, rh) = match self.tj.set_crop(crop) {
            Ok(()) => crop.unwrap_or(whole),
            Err(_) => {
                self.tj.set_crop(None).map_err(DecodeError::Jpeg)?;
                whole
            }
        };
        let (pf, ch_in) = if colorspace == raw::TJCS_TJCS_GRAY as i32 {
            (raw::TJPF_TJPF_GRAY, 1)
        } else if colorspace == raw::TJCS_TJCS_CMYK as i32
            || colorspace == raw::TJCS_TJCS_YCCK as i32
        {
            (raw::TJPF_TJPF_CMYK, 4)
        } else {
            (raw::TJPF_TJPF_RGB, 3)
        };
        let buf = if ch_in == 4 {
            &mut self.cmyk
        } else {
            &mut out.pixels
        };
        self.tj
            .decompress8_to_vec(bytes, buf, pf)
            .map_err(DecodeError::Jpeg)?;
        debug_assert_eq!(buf.len(), rw * rh * ch_in);
        if ch_in == 4 {
            cmyk_pixels_to_rgb(&self.cmyk, &mut out.pixels);
        }
        out.width = rw;
        out.height = rh;
        out.channels = if ch_in == 1 { 1 } else { 3 };
        out.x0 = x0;
        out.y0 = y0;
        out.denom = denom;
        Ok(())
    }
}

/// MCU width in pixels of a TurboJPEG subsampling code.
pub(crate) fn mcu_width(subsamp: i32) -> usize {
    // tjMCUWidth: 444 8, 422 16, 420 16, gray 8, 440 8, 411 32, 441 8.
    match subsamp {
        1 | 2 => 16,
        5 => 32,
        _ => 8,
    }
}

fn decode_other(bytes: &[u8], out: &mut Decoded) -> Result<(), DecodeError> {
    let img = image::load_from_memory(bytes).map_err(|e| DecodeError::Image(e.to_string()))?;
    // The shard writer's conversion: Pillow's pixels (16-bit PNGs included).
    let px = crate::codec::from_dynamic(img);
    out.pixels = px.data;
    out.channels = px.channels as usize;
    out.width = px.width as usize;
    out.height = px.height as usize;
    out.x0 = 0;
    out.y0 = 0;
    out.denom = 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode_jpeg, Pixels};

    fn decode_all(d: &mut Decoder, bytes: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let hdr = d.header(bytes)?;
        let mut out = Decoded::default();
        d.decode_region(bytes, &hdr, (0, 0, hdr.width, hdr.height), 1, &mut out)?;
        Ok(out.pixels)
    }

    #[test]
    fn libjpeg_warnings_pass_as_in_pillow() {
        let (w, h) = (120, 72);
        let data: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        let px = Pixels {
            width: w as u32,
            height: h as u32,
            channels: 3,
            data,
        };
        let clean = encode_jpeg(&px, 90).unwrap();
        // Junk before the end-of-image marker: "Corrupt JPEG data: N extraneous bytes before
        // marker 0xd9", a warning; Pillow returns the image.
        let mut junk = clean[..clean.len() - 2].to_vec();
        junk.extend_from_slice(&[0x12; 50]);
        junk.extend_from_slice(&[0xFF, 0xD9]);
        let mut d = Decoder::new().unwrap();
        let want = decode_all(&mut d, &clean).unwrap();
        assert_eq!(decode_all(&mut d, &junk).unwrap(), want);
        // Running out of data is a truncated file: an error, and the decoder recovers.
        assert!(decode_all(&mut d, &clean[..clean.len() / 2]).is_err());
        assert_eq!(decode_all(&mut d, &clean).unwrap(), want);
        // Streams that end before any frame header (TurboJPEG takes them for tables-only
        // streams and keeps the previous image's size) are errors, not the last image's noise.
        let mut app0 = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
        app0.extend_from_slice(b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
        let junk_after_app0: Vec<u8> = app0
            .iter()
            .copied()
            .chain((0..512u32).map(|i| (i * 37 % 251) as u8))
            .collect();
        let mut garbage = b"\xFF\xD8\xFF\xE0garbage".to_vec();
        garbage.extend_from_slice(&[0; 100]);
        for bad in [&junk_after_app0, &garbage, &app0] {
            assert_eq!(decode_all(&mut d, &clean).unwrap(), want);
            assert!(decode_all(&mut d, bad).is_err(), "{:?}", &bad[..12]);
        }
        assert_eq!(decode_all(&mut d, &clean).unwrap(), want);
    }
}
