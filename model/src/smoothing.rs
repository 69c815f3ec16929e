//! The label-smoothing map of the position targets.
//!
//! `W[i, j] = exp(−‖c_i − c_j‖² / σ²)` over the coordinates of a w×w grid (w = int(√P)),
//! evaluated in float64 and stored in float32, then divided by `W.sum(-1)` BROADCAST OVER THE
//! LAST AXIS, i.e. entry (i, j) is divided by the sum of row j. This is the reference's quirk:
//! columns sum to 1, the rows used as targets do not. σ = 0 gives the identity.

use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};

/// The [P, P] float32 smoothing map for `sigma`.
pub fn smoothing_map(num_positions: i64, sigma: f64, device: Device) -> Result<Tensor> {
    if num_positions <= 0 || !sigma.is_finite() || sigma < 0.0 {
        return Err(ModelError::Config(format!(
            "smoothing map needs P > 0 and sigma >= 0 (got {num_positions}, {sigma})"
        )));
    }
    if sigma == 0.0 {
        return Ok(Tensor::eye(num_positions, (Kind::Float, device)));
    }
    let p = num_positions as usize;
    let w = (num_positions as f64).sqrt() as usize;
    let s2 = sigma.powi(2);
    let mut values = vec![0f32; p * p];
    for i in 0..p {
        let (xi, yi) = ((i / w) as i64, (i % w) as i64);
        for j in 0..p {
            let (xj, yj) = ((j / w) as i64, (j % w) as i64);
            let dist = (xi - xj).pow(2) + (yi - yj).pow(2);
            values[i * p + j] = (-(dist as f64) / s2).exp() as f32;
        }
    }
    let weight = Tensor::from_slice(&values).reshape([num_positions, num_positions]);
    let sums = weight.sum_dim_intlist(-1, false, None::<Kind>);
    Ok((weight / sums).to_device(device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_sum_to_one_rows_do_not() {
        let s = smoothing_map(16, 1.0, Device::Cpu).unwrap();
        let cols = s.sum_dim_intlist(0, false, None::<Kind>);
        let rows = s.sum_dim_intlist(1, false, None::<Kind>);
        let cmax = (cols - 1.0).abs().max().double_value(&[]);
        assert!(cmax < 1e-6, "{cmax}");
        let corner = rows.double_value(&[0]);
        let interior = rows.double_value(&[5]);
        assert!((corner - interior).abs() > 1e-3, "{corner} {interior}");
    }

    #[test]
    fn sigma_zero_is_identity() {
        let s = smoothing_map(9, 0.0, Device::Cpu).unwrap();
        assert!(s.equal(&Tensor::eye(9, (Kind::Float, Device::Cpu))));
    }
}
