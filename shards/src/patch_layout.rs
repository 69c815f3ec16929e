//! Precomputed patch layouts: dense label maps reduced to the ViT patch grid, and COCO masks
//! (polygons, uncompressed and compressed RLE) painted into a dense map.
//!
//! Rule (the shard contract): a grid of ceil(h/p) × ceil(w/p) cells of p×p pixels of the stored
//! image, row-major; a cell's label is the most frequent value of the dense map over its pixels
//! (edge cells cover the remaining pixels only), ties going to the smaller value. COCO maps hold
//! category index + 1 (0 = background), painted from larger to smaller instances (by the
//! annotation's `area`, json order among equals) so smaller ones stay visible.
//!
//! Polygon rasterisation follows pycocotools (`rleFrPoly`) exactly, so masks match
//! `COCO.annToMask`.

use crate::datasets::{CocoAnnotation, Segmentation};
use crate::format::grid_cells;

/// Most-frequent-value reduction of a `w`×`h` row-major map to the `p`×`p` patch grid.
pub fn patch_labels(map: &[u8], w: u32, h: u32, p: u32) -> Vec<i32> {
    assert_eq!(map.len(), w as usize * h as usize);
    assert!(p > 0);
    let (gw, gh) = (grid_cells(w, p) as usize, grid_cells(h, p) as usize);
    let (w, p) = (w as usize, p as usize);
    let mut out = Vec::with_capacity(gw * gh);
    let mut hist = vec![0u32; gw * 256];
    for gy in 0..gh {
        hist.fill(0);
        let y0 = gy * p;
        let y1 = (y0 + p).min(h as usize);
        for y in y0..y1 {
            let row = &map[y * w..(y + 1) * w];
            for (x, &v) in row.iter().enumerate() {
                hist[(x / p) * 256 + v as usize] += 1;
            }
        }
        for gx in 0..gw {
            let hcell = &hist[gx * 256..(gx + 1) * 256];
            let mut best = 0usize;
            for (v, &count) in hcell.iter().enumerate().skip(1) {
                if count > hcell[best] {
                    best = v;
                }
            }
            out.push(best as i32);
        }
    }
    out
}

/// [`patch_labels`] for maps with more than 255 labels (COCO-format datasets with many
/// categories, e.g. LVIS or Objects365); the same rule. Maps whose values all fit a byte take
/// the histogram path, so their output is that of [`patch_labels`].
pub fn patch_labels_wide(map: &[u16], w: u32, h: u32, p: u32) -> Vec<i32> {
    assert_eq!(map.len(), w as usize * h as usize);
    assert!(p > 0);
    if map.iter().all(|&v| v < 256) {
        let narrow: Vec<u8> = map.iter().map(|&v| v as u8).collect();
        return patch_labels(&narrow, w, h, p);
    }
    let (gw, gh) = (grid_cells(w, p) as usize, grid_cells(h, p) as usize);
    let (w, h, p) = (w as usize, h as usize, p as usize);
    let mut out = Vec::with_capacity(gw * gh);
    let mut cell = Vec::with_capacity(p * p);
    for gy in 0..gh {
        for gx in 0..gw {
            cell.clear();
            for y in gy * p..((gy + 1) * p).min(h) {
                cell.extend_from_slice(&map[y * w + gx * p..y * w + ((gx + 1) * p).min(w)]);
            }
            cell.sort_unstable();
            // Longest run of the sorted values; the first (smallest) wins ties.
            let (mut best, mut best_len) = (cell[0], 0usize);
            for run in cell.chunk_by(|a, b| a == b) {
                if run.len() > best_len {
                    (best, best_len) = (run[0], run.len());
                }
            }
            out.push(i32::from(best));
        }
    }
    out
}

/// Run-length decoding of pycocotools' compressed RLE string.
pub fn rle_from_string(s: &str) -> Result<Vec<u32>, String> {
    let bytes = s.as_bytes();
    let mut counts: Vec<u32> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let mut x: i64 = 0;
        let mut k = 0;
        loop {
            if p >= bytes.len() {
                return Err("compressed RLE ends inside a number".into());
            }
            let c = bytes[p] as i64 - 48;
            if !(0..64).contains(&c) || k > 12 {
                return Err(format!(
                    "invalid compressed RLE byte {:?}",
                    bytes[p] as char
                ));
            }
            x |= (c & 0x1f) << (5 * k);
            let more = c & 0x20 != 0;
            p += 1;
            k += 1;
            if !more {
                if c & 0x10 != 0 {
                    x |= -1i64 << (5 * k);
                }
                break;
            }
        }
        if counts.len() > 2 {
            x += counts[counts.len() - 2] as i64;
        }
        if x < 0 || x > u32::MAX as i64 {
            return Err(format!("compressed RLE count {x} out of range"));
        }
        counts.push(x as u32);
    }
    Ok(counts)
}

/// The most edge points (at 1/5 pixel) one polygon may make, which pycocotools allocates all
/// of: 2^24 (a perimeter of 3.3 million pixels, 256 MB of points). Real annotations stay in
/// the thousands; beyond this a coordinate lies absurdly far outside its image, and a run's
/// memory would follow it (a 1e9 coordinate asked for tens of GB).
const MAX_POLYGON_POINTS: i64 = 1 << 24;

/// pycocotools `rleFrPoly`: RLE counts (column-major) of one polygon in an `h`×`w` image; an
/// error for coordinates that are not finite or whose edges would exceed
/// [`MAX_POLYGON_POINTS`].
pub fn rle_from_polygon(xy: &[f64], h: u32, w: u32) -> Result<Vec<u32>, String> {
    let k = xy.len() / 2;
    let (h, w) = (h as i64, w as i64);
    if k == 0 {
        return Ok(vec![(h * w) as u32]);
    }
    if let Some(c) = xy.iter().find(|c| !c.is_finite() || c.abs() > 1e9) {
        return Err(format!("polygon coordinate {c} is out of range"));
    }
    let scale = 5.0f64;
    let mut x: Vec<i64> = (0..k).map(|j| (scale * xy[2 * j] + 0.5) as i64).collect();
    let mut y: Vec<i64> = (0..k)
        .map(|j| (scale * xy[2 * j + 1] + 0.5) as i64)
        .collect();
    x.push(x[0]);
    y.push(y[0]);
    // pycocotools' point count, before anything is allocated for the points.
    let m: i64 = (0..k)
        .map(|j| (x[j + 1] - x[j]).abs().max((y[j + 1] - y[j]).abs()) + 1)
        .sum();
    if m > MAX_POLYGON_POINTS {
        return Err(format!(
            "polygon perimeter of {} px is far beyond its {w}x{h} image (coordinates out of range?)",
            m / 5
        ));
    }
    let mut u = Vec::with_capacity(m as usize);
    let mut v = Vec::with_capacity(m as usize);
    for j in 0..k {
        let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
        let dx = (xe - xs).abs();
        let dy = (ys - ye).abs();
        let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
        if flip {
            std::mem::swap(&mut xs, &mut xe);
            std::mem::swap(&mut ys, &mut ye);
        }
        let s = if dx >= dy {
            if dx == 0 {
                0.0
            } else {
                (ye - ys) as f64 / dx as f64
            }
        } else {
            (xe - xs) as f64 / dy as f64
        };
        if dx >= dy {
            for d in 0..=dx {
                let t = if flip { dx - d } else { d };
                u.push(t + xs);
                v.push((ys as f64 + s * t as f64 + 0.5) as i64);
            }
        } else {
            for d in 0..=dy {
                let t = if flip { dy - d } else { d };
                v.push(t + ys);
                u.push((xs as f64 + s * t as f64 + 0.5) as i64);
            }
        }
    }
    // Points along the y-boundary, downsampled.
    let mut bx = Vec::new();
    let mut by = Vec::new();
    for j in 1..u.len() {
        if u[j] != u[j - 1] {
            let mut xd = (if u[j] < u[j - 1] { u[j] } else { u[j] - 1 }) as f64;
            xd = (xd + 0.5) / scale - 0.5;
            if xd.floor() != xd || xd < 0.0 || xd > (w - 1) as f64 {
                continue;
            }
            let mut yd = (if v[j] < v[j - 1] { v[j] } else { v[j - 1] }) as f64;
            yd = (yd + 0.5) / scale - 0.5;
            yd = if yd < 0.0 {
                0.0
            } else if yd > h as f64 {
                h as f64
            } else {
                yd
            };
            yd = yd.ceil();
            bx.push(xd as i64);
            by.push(yd as i64);
        }
    }
    let mut a: Vec<u32> = bx
        .iter()
        .zip(&by)
        .map(|(&x, &y)| (x * h + y) as u32)
        .collect();
    a.push((h * w) as u32);
    a.sort_unstable();
    let mut prev = 0u32;
    for e in a.iter_mut() {
        let t = *e;
        *e -= prev;
        prev = t;
    }
    let mut b = Vec::with_capacity(a.len());
    let mut j = 0;
    b.push(a[j]);
    j += 1;
    while j < a.len() {
        if a[j] > 0 {
            b.push(a[j]);
            j += 1;
        } else {
            j += 1;
            if j < a.len() {
                *b.last_mut().unwrap() += a[j];
                j += 1;
            }
        }
    }
    Ok(b)
}

/// Sets `mask[y * w + x] = true` for the foreground runs of column-major RLE counts.
fn paint_rle(counts: &[u32], h: u32, w: u32, out: &mut [bool]) {
    let (h, w) = (h as usize, w as usize);
    let n = h * w;
    let mut pos = 0usize;
    for (i, &c) in counts.iter().enumerate() {
        let c = c as usize;
        if i % 2 == 1 {
            for idx in pos..(pos + c).min(n) {
                let (x, y) = (idx / h, idx % h);
                out[y * w + x] = true;
            }
        }
        pos += c;
        if pos >= n {
            break;
        }
    }
}

/// Binary mask (row-major, `h`×`w`) of one annotation, as `COCO.annToMask` gives it.
pub fn annotation_mask(seg: &Segmentation, h: u32, w: u32) -> Result<Vec<bool>, String> {
    let mut mask = vec![false; h as usize * w as usize];
    match seg {
        // pycocotools' `frPyObjects` refuses a list whose first polygon has 4 numbers or fewer
        // (it means 4 as a box but then fails on the list); `frPoly` draws every other list,
        // short polygons included. Such lists are drawn as polygons here too, as frPoly would.
        Segmentation::Polygons(polys) => {
            for poly in polys {
                paint_rle(&rle_from_polygon(poly, h, w)?, h, w, &mut mask);
            }
        }
        Segmentation::Rle { size, counts } => {
            check_size(size, h, w)?;
            let counts: Vec<u32> = counts
                .iter()
                .map(|&c| u32::try_from(c).map_err(|_| format!("RLE count {c} out of range")))
                .collect::<Result<_, _>>()?;
            paint_rle(&counts, h, w, &mut mask);
        }
        Segmentation::RleString { size, counts } => {
            check_size(size, h, w)?;
            paint_rle(&rle_from_string(counts)?, h, w, &mut mask);
        }
    }
    Ok(mask)
}

fn check_size(size: &[u32; 2], h: u32, w: u32) -> Result<(), String> {
    if size[0] != h || size[1] != w {
        return Err(format!(
            "RLE size {}x{} (h x w) does not match the image {}x{}",
            size[0], size[1], h, w
        ));
    }
    Ok(())
}

/// Dense COCO label map (`h`×`w`, row-major): category index + 1, 0 = background; larger
/// instances painted first.
pub fn coco_dense_map(anns: &[CocoAnnotation], h: u32, w: u32) -> Result<Vec<u16>, String> {
    let mut order: Vec<usize> = (0..anns.len()).collect();
    // Stable: equal areas keep json order.
    order.sort_by(|&a, &b| anns[b].area.total_cmp(&anns[a].area));
    let mut map = vec![0u16; h as usize * w as usize];
    for i in order {
        let a = &anns[i];
        let value = u16::try_from(a.category_index + 1).map_err(|_| {
            format!(
                "category index {} is beyond the 65,535 categories the dense map holds",
                a.category_index
            )
        })?;
        let mask = annotation_mask(&a.segmentation, h, w)
            .map_err(|e| format!("annotation {}: {e}", a.id))?;
        for (m, &on) in map.iter_mut().zip(&mask) {
            if on {
                *m = value;
            }
        }
    }
    Ok(map)
}

/// Nearest-neighbour resize of a label map (used when images are stored resized).
pub fn resize_nearest<T: Copy>(map: &[T], w: u32, h: u32, ow: u32, oh: u32) -> Vec<T> {
    let (w, h, ow, oh) = (w as usize, h as usize, ow as usize, oh as usize);
    let xs: Vec<usize> = (0..ow)
        .map(|x| ((x * 2 + 1) * w / (ow * 2)).min(w - 1))
        .collect();
    let mut out = Vec::with_capacity(ow * oh);
    for y in 0..oh {
        let sy = ((y * 2 + 1) * h / (oh * 2)).min(h - 1);
        let row = &map[sy * w..(sy + 1) * w];
        out.extend(xs.iter().map(|&x| row[x]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_with_ties_to_smaller_and_partial_cells() {
        // 3x2 map, p = 2 -> grid 1 x 2; second cell is 1 column wide.
        let map = [5, 3, 9, 3, 5, 9];
        assert_eq!(patch_labels(&map, 3, 2, 2), vec![3, 9]);
        let map = [7, 7, 2, 2];
        assert_eq!(patch_labels(&map, 2, 2, 2), vec![2]);
    }

    #[test]
    fn wide_maps_follow_the_same_rule() {
        // Byte-sized values: identical to the histogram path, partial edge cells included.
        let small: Vec<u8> = (0..35u32).map(|i| ((i * 7) % 5) as u8).collect();
        let wide: Vec<u16> = small.iter().map(|&v| u16::from(v)).collect();
        assert_eq!(
            patch_labels_wide(&wide, 7, 5, 3),
            patch_labels(&small, 7, 5, 3)
        );
        // Labels past 255 (e.g. LVIS's 1,203 categories): mode, ties to the smaller value.
        let map = [300u16, 300, 1204, 1204, 7, 300, 1204, 0];
        assert_eq!(patch_labels_wide(&map, 4, 2, 2), vec![300, 1204]);
        let map = [1204u16, 300, 300, 1204];
        assert_eq!(patch_labels_wide(&map, 2, 2, 2), vec![300]);
    }

    #[test]
    fn compressed_rle_decodes() {
        // pycocotools: encode of a 3x3 mask with a single foreground pixel at (y=1, x=1)
        // has counts [4, 1, 4] and string "41N" ... checked through a round trip instead:
        assert_eq!(rle_from_string("41").unwrap(), vec![4, 1]);
        assert!(rle_from_string("\u{7f}").is_err());
    }

    #[test]
    fn rectangle_polygon_covers_expected_pixels() {
        // Square from (1,1) to (3,3) in a 5x5 image: pycocotools marks pixels 1..=2.
        let rle = rle_from_polygon(&[1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0], 5, 5).unwrap();
        let mut m = vec![false; 25];
        paint_rle(&rle, 5, 5, &mut m);
        let on: Vec<(usize, usize)> = (0..25).filter(|&i| m[i]).map(|i| (i / 5, i % 5)).collect();
        assert_eq!(on, vec![(1, 1), (1, 2), (2, 1), (2, 2)]);
    }

    /// A polygon reaching absurdly far outside the image is refused before its points are
    /// allocated (a 1e9 coordinate took tens of GB); large real ones and short polygons after
    /// the first are drawn as pycocotools draws them (pixel counts from pycocotools 2.0.11).
    #[test]
    fn far_coordinates_are_refused_and_short_polygons_drawn() {
        for c in [1e9, 1e30, f64::NAN] {
            let far = Segmentation::Polygons(vec![vec![0.0, 0.0, c, 0.0, 0.0, c]]);
            let e = annotation_mask(&far, 12, 8).unwrap_err();
            assert!(e.contains("out of range"), "{e}");
        }
        let on = |seg: Segmentation, h, w| {
            annotation_mask(&seg, h, w)
                .unwrap()
                .iter()
                .filter(|&&b| b)
                .count()
        };
        let near = Segmentation::Polygons(vec![vec![-50.0, -50.0, 500.0, -50.0, 500.0, 500.0]]);
        assert_eq!(on(near, 12, 8), 28);
        let square = vec![1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0];
        for short in [vec![1.0, 1.0], vec![2.0, 2.0, 4.0, 4.0]] {
            assert_eq!(
                on(Segmentation::Polygons(vec![square.clone(), short]), 5, 5),
                4
            );
        }
    }

    #[test]
    fn nearest_resize_keeps_labels() {
        let map: Vec<u8> = (0..16).collect();
        assert_eq!(resize_nearest(&map, 4, 4, 2, 2), vec![5, 7, 13, 15]);
    }
}
