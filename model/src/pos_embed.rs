//! The fixed 2-D sin-cos position tables of MAE (`get_2d_sincos_pos_embed`, with a class row).
//!
//! Row 0 (class token) is zero. Patch l (row r = l / G, column c = l % G) gets `[E(c), E(r)]`:
//! the column comes first, as in MAE's `np.meshgrid(grid_w, grid_h)`. `E(x)` of width D/2 is
//! `[sin(x·w_k), cos(x·w_k)]`, k < D/4, `w_k = 1 / 10000^(k / (D/4))`, evaluated in float64 and
//! rounded to float32 (the golden fixtures check this bit for bit).

use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};

/// The table as row-major float32 values, shape [1 + grid², dim].
pub fn sincos_2d_values(dim: i64, grid: i64) -> Result<Vec<f32>> {
    if dim <= 0 || dim % 4 != 0 || grid <= 0 {
        return Err(ModelError::Config(format!(
            "sin-cos table needs a width divisible by 4 and a positive grid (got {dim}, {grid})"
        )));
    }
    let quarter = (dim / 4) as usize;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let d = dim as usize;
    let g = grid as usize;
    let mut out = vec![0f32; (1 + g * g) * d];
    for l in 0..g * g {
        let (row, col) = ((l / g) as f64, (l % g) as f64);
        let dst = &mut out[(1 + l) * d..(2 + l) * d];
        for (half, pos) in [(0usize, col), (1, row)] {
            let base = half * 2 * quarter;
            for (k, w) in omega.iter().enumerate() {
                let x = pos * w;
                dst[base + k] = x.sin() as f32;
                dst[base + quarter + k] = x.cos() as f32;
            }
        }
    }
    Ok(out)
}

/// The table as a [1, 1 + grid², dim] float32 tensor on `device`.
pub fn sincos_2d(dim: i64, grid: i64, device: Device) -> Result<Tensor> {
    let values = sincos_2d_values(dim, grid)?;
    Ok(Tensor::from_slice(&values)
        .reshape([1, 1 + grid * grid, dim])
        .to_kind(Kind::Float)
        .to_device(device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_column_first() {
        // D = 8, G = 2: quarter = 2, w = [1, 0.01].
        let t = sincos_2d_values(8, 2).unwrap();
        assert!(t[..8].iter().all(|&v| v == 0.0), "class row is zero");
        // patch 1: row 0, column 1 -> E(1) then E(0).
        let p1 = &t[16..24];
        let e1 = [1f64.sin(), 0.01f64.sin(), 1f64.cos(), 0.01f64.cos()];
        for k in 0..4 {
            assert_eq!(p1[k], e1[k] as f32);
        }
        assert_eq!(&p1[4..], &[0.0, 0.0, 1.0, 1.0]);
        // patch 2: row 1, column 0 -> E(0) then E(1).
        let p2 = &t[24..32];
        assert_eq!(&p2[..4], &[0.0, 0.0, 1.0, 1.0]);
        assert_eq!(p2[4], 1f64.sin() as f32);
    }

    #[test]
    fn rejects_bad_width() {
        assert!(sincos_2d_values(6, 2).is_err());
    }
}
