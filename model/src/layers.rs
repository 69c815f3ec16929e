//! Basic layers with the reference's parameter names and initialisation.
//!
//! `Linear` calls `at::linear` (what `torch.nn.functional.linear` calls) rather than tch's
//! `matmul + bias`, so results match PyTorch bit for bit.

use tch::nn::{Init, Path};
use tch::Tensor;

/// Collects `(name, tensor)` pairs in definition order (the reference's `named_parameters`).
pub type NamedTensors = Vec<(String, Tensor)>;

pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Uniform bound of `xavier_uniform_` (gain 1) for a [fan_out, fan_in] matrix.
pub fn xavier_bound(fan_in: i64, fan_out: i64) -> f64 {
    (6.0 / (fan_in + fan_out) as f64).sqrt()
}

/// y = x Wᵀ + b, W [out, in] initialised xavier-uniform, b zero.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn new(p: &Path, in_dim: i64, out_dim: i64) -> Self {
        let b = xavier_bound(in_dim, out_dim);
        let weight = p.var(
            "weight",
            &[out_dim, in_dim],
            Init::Uniform { lo: -b, up: b },
        );
        let bias = p.var("bias", &[out_dim], Init::Const(0.0));
        Linear { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }

    pub fn push_params(&self, prefix: &str, out: &mut NamedTensors) {
        out.push((join(prefix, "weight"), self.weight.shallow_clone()));
        out.push((join(prefix, "bias"), self.bias.shallow_clone()));
    }
}

/// LayerNorm over the last dimension (weight 1, bias 0).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: &Path, dim: i64, eps: f64) -> Self {
        let weight = p.var("weight", &[dim], Init::Const(1.0));
        let bias = p.var("bias", &[dim], Init::Const(0.0));
        LayerNorm {
            weight,
            bias,
            dim,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }

    pub fn push_params(&self, prefix: &str, out: &mut NamedTensors) {
        out.push((join(prefix, "weight"), self.weight.shallow_clone()));
        out.push((join(prefix, "bias"), self.bias.shallow_clone()));
    }
}
