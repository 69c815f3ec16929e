//! Per-parameter gradient clipping and AdamW with the reference's parameter groups.
//!
//! Both replay PyTorch's single-tensor code paths op for op (`utils.clip_gradients` of the
//! reference, `torch.optim.AdamW` with `foreach=False`), so that one step from the same gradients
//! reproduces the reference's parameters bit for bit. On CUDA, where that loop of small kernels
//! costs more than the update, [`AdamW`] switches to ATen's fused multi-tensor kernels
//! ([`fused`]), equal up to rounding.

pub mod fused;

use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::layers::NamedTensors;

/// timm's `add_weight_decay` rule: 1-D tensors and biases get no weight decay; everything else,
/// including `cls_token`, `mask_pos_token`, `mask_token` and the patch conv, does.
pub fn is_no_decay(name: &str, tensor: &Tensor) -> bool {
    tensor.dim() == 1 || name.ends_with(".bias")
}

/// Gradient norms and clip factors of one clipping pass.
#[derive(Debug)]
pub struct ClipStats {
    /// [#params] L2 norm of each raw gradient (float32).
    pub norms: Tensor,
    /// [#params] factor each gradient was multiplied by (1 where not clipped).
    pub coefs: Tensor,
}

/// Clips each gradient by its OWN L2 norm: `coef = clip / (‖g‖ + 1e-6)`, `g *= coef` if coef < 1.
///
/// Parameters without a gradient are skipped (norm and coef are reported as 0 and 1). The
/// comparison is done on the device (`g *= min(coef, 1)`, multiplying by exactly 1 is exact), so
/// clipping never synchronises with a GPU.
pub fn clip_grad_per_param(params: &[Tensor], clip: f64) -> ClipStats {
    let mut norms = Vec::with_capacity(params.len());
    let mut coefs = Vec::with_capacity(params.len());
    tch::no_grad(|| {
        for p in params {
            let mut g = p.grad();
            if !g.defined() {
                let z = Tensor::zeros([], (Kind::Float, p.device()));
                norms.push(z.shallow_clone());
                coefs.push(z.ones_like());
                continue;
            }
            let n = g.norm();
            // PyTorch evaluates `clip / t` as `t.reciprocal() * clip`.
            let coef = ((&n + 1e-6).reciprocal() * clip).clamp_max(1.0);
            let _ = g.g_mul_(&coef);
            norms.push(n);
            coefs.push(coef);
        }
    });
    if params.is_empty() {
        return ClipStats {
            norms: Tensor::zeros([0], (Kind::Float, tch::Device::Cpu)),
            coefs: Tensor::zeros([0], (Kind::Float, tch::Device::Cpu)),
        };
    }
    ClipStats {
        norms: Tensor::stack(&norms, 0),
        coefs: Tensor::stack(&coefs, 0),
    }
}

/// AdamW hyper-parameters (the reference's pre-training values by default).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1.5e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    decay: bool,
    /// Multiplies the learning rate (layer-wise decay in fine-tuning; 1 otherwise).
    lr_scale: f64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: i64,
    /// `step` as a float32 scalar on the parameter's device, for the fused kernel (made on first
    /// use; dropped whenever the host count is authoritative again).
    dev_step: Option<Tensor>,
}

/// AdamW over named trainable parameters with two groups (decay / no decay).
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Fused multi-tensor kernels instead of the op-for-op path (default: on for CUDA).
    fused: bool,
}

impl AdamW {
    /// `params`: trainable `(name, tensor)` pairs (e.g. `DropPos::trainable_parameters()`).
    pub fn new(params: NamedTensors, cfg: AdamWConfig) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let decay = !is_no_decay(&name, &param);
                let exp_avg = param.zeros_like().detach();
                let exp_avg_sq = param.zeros_like().detach();
                Slot {
                    name,
                    param,
                    decay,
                    lr_scale: 1.0,
                    exp_avg,
                    exp_avg_sq,
                    step: 0,
                    dev_step: None,
                }
            })
            .collect::<Vec<Slot>>();
        let fused = slots.first().is_some_and(|s| s.param.device().is_cuda());
        AdamW { cfg, slots, fused }
    }

    /// Chooses the fused multi-tensor kernels (CUDA's default) or the op-for-op path that
    /// reproduces the reference bit for bit (CPU's default).
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    pub fn is_fused(&self) -> bool {
        self.fused
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// Sets the learning rate of both groups (the schedule is applied per iteration).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Per-parameter learning-rate multipliers by name (MAE's layer-wise lr decay); the
    /// pre-training recipes leave every multiplier at 1.
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) {
        for s in &mut self.slots {
            s.lr_scale = scale(&s.name);
        }
    }

    /// Takes the named parameters out of weight decay, on top of the 1-D / bias rule (the
    /// fine-tuning protocol's `no_weight_decay()` list: `cls_token`, `pos_embed`).
    pub fn exclude_from_decay(&mut self, names: &[&str]) {
        for s in &mut self.slots {
            if names.contains(&s.name.as_str()) {
                s.decay = false;
            }
        }
    }

    /// The parameters, in order.
    pub fn params(&self) -> Vec<Tensor> {
        self.slots.iter().map(|s| s.param.shallow_clone()).collect()
    }

    /// Names of the parameters that get weight decay / none.
    pub fn group_names(&self) -> (Vec<String>, Vec<String>) {
        let mut decay = Vec::new();
        let mut no_decay = Vec::new();
        for s in &self.slots {
            if s.decay {
                decay.push(s.name.clone());
            } else {
                no_decay.push(s.name.clone());
            }
        }
        (decay, no_decay)
    }

    /// Clears the gradients.
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.param.zero_grad();
        }
    }

    /// Each parameter's gradient L2 norm (0 for a parameter without one), as one tensor.
    pub fn grad_norms(&self) -> Tensor {
        let norms: Vec<Tensor> = tch::no_grad(|| {
            self.slots
                .iter()
                .map(|s| {
                    let g = s.param.grad();
                    if g.defined() {
                        g.norm()
                    } else {
                        Tensor::zeros([], (Kind::Float, s.param.device()))
                    }
                })
                .collect()
        });
        if norms.is_empty() {
            return Tensor::zeros([0], (Kind::Float, tch::Device::Cpu));
        }
        Tensor::stack(&norms, 0)
    }

    /// Per-parameter clipping of the current gradients (see [`clip_grad_per_param`]).
    pub fn clip_grad_per_param(&self, clip: f64) -> ClipStats {
        if self.fused {
            if let Ok(stats) = self.clip_fused(clip) {
                return stats;
            }
        }
        clip_grad_per_param(&self.params(), clip)
    }

    /// [`AdamW::clip_grad_per_param`] with one multi-tensor pass.
    fn clip_fused(&self, clip: f64) -> Result<ClipStats> {
        let grads: Vec<Tensor> = self.slots.iter().map(|s| s.param.grad()).collect();
        let with: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].defined()).collect();
        if with.is_empty() {
            return Err(ModelError::Input("no gradients".into()));
        }
        let live: Vec<&Tensor> = with.iter().map(|&i| &grads[i]).collect();
        let (norms, coefs) = fused::clip_per_param(&live, clip)?;
        if with.len() == grads.len() {
            return Ok(ClipStats { norms, coefs });
        }
        // Parameters without a gradient: norm 0, coef 1, as the op-for-op path reports.
        let index = Tensor::from_slice(&with.iter().map(|&i| i as i64).collect::<Vec<_>>())
            .to_device(norms.device());
        let n = grads.len() as i64;
        let opts = (Kind::Float, norms.device());
        Ok(ClipStats {
            norms: Tensor::zeros([n], opts).index_copy(0, &index, &norms),
            coefs: Tensor::ones([n], opts).index_copy(0, &index, &coefs),
        })
    }

    /// One AdamW step with the current gradients; parameters without a gradient are skipped.
    pub fn step(&mut self) {
        let mut done = Vec::new();
        if self.fused {
            match self.step_fused(&mut done) {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "fused AdamW failed; using the op-for-op path");
                    self.fused = false;
                }
            }
        }
        let c = self.cfg;
        tch::no_grad(|| {
            for (i, s) in self.slots.iter_mut().enumerate() {
                s.dev_step = None;
                // Groups the fused kernel updated before it failed are not updated twice.
                if done.contains(&i) {
                    continue;
                }
                let g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                s.step += 1;
                let lr = c.lr * s.lr_scale;
                let wd = if s.decay { c.weight_decay } else { 0.0 };
                if wd != 0.0 {
                    let _ = s.param.g_mul_scalar_(1.0 - lr * wd);
                }
                let _ = s.exp_avg.lerp_(&g, 1.0 - c.beta1);
                // `addcmul_(g, g, value=1-b2)` computes (value·g)·g; `(g·value)·g` rounds the same.
                let _ = s.exp_avg_sq.g_mul_scalar_(c.beta2);
                let _ = s.exp_avg_sq.addcmul_(&(&g * (1.0 - c.beta2)), &g);
                let step = s.step as f64;
                let bias_correction1 = 1.0 - c.beta1.powf(step);
                let bias_correction2 = 1.0 - c.beta2.powf(step);
                let step_size = lr / bias_correction1;
                let bc2_sqrt = bias_correction2.powf(0.5);
                let mut denom = s.exp_avg_sq.sqrt() / bc2_sqrt;
                let _ = denom.g_add_scalar_(c.eps);
                // `addcdiv_(m, d, value=-s)` computes (value·m)/d.
                let _ = s.param.addcdiv_(&(&s.exp_avg * -step_size), &denom);
            }
        });
    }

    /// [`AdamW::step`] with one fused kernel per (learning-rate scale, weight decay) group;
    /// `done` collects the slots updated.
    fn step_fused(&mut self, done: &mut Vec<usize>) -> Result<()> {
        let c = self.cfg;
        let grads: Vec<Tensor> = self.slots.iter().map(|s| s.param.grad()).collect();
        for s in &mut self.slots {
            if s.dev_step.is_none() {
                let t = Tensor::from(s.step as f32).to_device(s.param.device());
                s.dev_step = Some(t);
            }
        }
        let mut groups: Vec<(f64, bool, Vec<usize>)> = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            if !grads[i].defined() {
                continue;
            }
            match groups
                .iter_mut()
                .find(|(scale, decay, _)| *scale == s.lr_scale && *decay == s.decay)
            {
                Some(g) => g.2.push(i),
                None => groups.push((s.lr_scale, s.decay, vec![i])),
            }
        }
        for (scale, decay, idx) in &groups {
            let pick = |f: &dyn Fn(&Slot) -> &Tensor| -> Vec<&Tensor> {
                idx.iter().map(|&i| f(&self.slots[i])).collect()
            };
            let group = fused::AdamWGroup {
                params: pick(&|s| &s.param),
                grads: idx.iter().map(|&i| &grads[i]).collect(),
                exp_avgs: pick(&|s| &s.exp_avg),
                exp_avg_sqs: pick(&|s| &s.exp_avg_sq),
                steps: pick(&|s| s.dev_step.as_ref().expect("made above")),
            };
            let wd = if *decay { c.weight_decay } else { 0.0 };
            fused::adamw_step(&group, c.lr * scale, c.beta1, c.beta2, wd, c.eps)?;
            for &i in idx {
                self.slots[i].step += 1;
            }
            done.extend(idx);
        }
        Ok(())
    }

    /// Optimizer state for checkpoints: `exp_avg.<name>`, `exp_avg_sq.<name>` and a [#params]
    /// int64 `step` tensor (parameter order).
    pub fn state_tensors(&self) -> NamedTensors {
        let mut out = Vec::with_capacity(2 * self.slots.len() + 1);
        for s in &self.slots {
            out.push((format!("exp_avg.{}", s.name), s.exp_avg.shallow_clone()));
            out.push((
                format!("exp_avg_sq.{}", s.name),
                s.exp_avg_sq.shallow_clone(),
            ));
        }
        let steps: Vec<i64> = self.slots.iter().map(|s| s.step).collect();
        out.push(("step".into(), Tensor::from_slice(&steps)));
        out
    }

    /// Restores what [`AdamW::state_tensors`] produced.
    pub fn load_state_tensors(&mut self, tensors: &NamedTensors) -> Result<()> {
        let find = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let steps =
            find("step").ok_or_else(|| ModelError::Input("optimizer state lacks `step`".into()))?;
        let steps = Vec::<i64>::try_from(steps.to_device(tch::Device::Cpu).to_kind(Kind::Int64))?;
        if steps.len() != self.slots.len() {
            return Err(ModelError::Input(format!(
                "optimizer state has {} parameters, the model {}",
                steps.len(),
                self.slots.len()
            )));
        }
        tch::no_grad(|| -> Result<()> {
            for (s, step) in self.slots.iter_mut().zip(steps) {
                for (key, dst) in [
                    ("exp_avg", &mut s.exp_avg),
                    ("exp_avg_sq", &mut s.exp_avg_sq),
                ] {
                    let name = format!("{key}.{}", s.name);
                    let src = find(&name).ok_or_else(|| {
                        ModelError::Input(format!("optimizer state lacks `{name}`"))
                    })?;
                    if src.size() != dst.size() {
                        return Err(ModelError::Input(format!(
                            "optimizer state `{name}` has shape {:?}, expected {:?}",
                            src.size(),
                            dst.size()
                        )));
                    }
                    dst.copy_(src);
                }
                s.step = step;
                s.dev_step = None;
            }
            Ok(())
        })
    }
}
