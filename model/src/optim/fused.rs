//! Multi-tensor AdamW and per-parameter clipping through ATen's fused kernels
//! (csrc/droppos_optim.h, which this file mirrors). tch binds neither (they return nothing).
//!
//! One kernel launch per parameter group instead of about ten per parameter: on CUDA the
//! per-parameter loop costs more than the update itself. The results equal the exact path up to
//! rounding (a different summation order in the norms, fused arithmetic in the update), so the
//! CPU default stays the reference's op-for-op path that the golden fixtures pin.

use std::ffi::{c_char, c_int};

use tch::Tensor;

use crate::distributed::ffi::{handles, take_error, Tensor as Handle};
use crate::error::{ModelError, Result};

extern "C" {
    fn do_fused_adamw(
        params: *mut Handle,
        grads: *mut Handle,
        exp_avgs: *mut Handle,
        exp_avg_sqs: *mut Handle,
        steps: *mut Handle,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    fn do_clip_per_param(
        grads: *mut Handle,
        n: c_int,
        clip: f64,
        norms_out: *mut Handle,
        coefs_out: *mut Handle,
    ) -> *mut c_char;
}

/// The shim's error string (freed by [`take_error`]) as a model error.
fn check(err: *mut c_char, what: &str) -> Result<()> {
    match take_error(err) {
        None => Ok(()),
        Some(msg) => Err(ModelError::Config(format!("{what}: {msg}"))),
    }
}

/// The tensors of one fused AdamW call (one learning rate and weight decay).
pub struct AdamWGroup<'a> {
    pub params: Vec<&'a Tensor>,
    pub grads: Vec<&'a Tensor>,
    pub exp_avgs: Vec<&'a Tensor>,
    pub exp_avg_sqs: Vec<&'a Tensor>,
    /// float32 scalars on the parameters' device, incremented by the call.
    pub steps: Vec<&'a Tensor>,
}

/// One AdamW step over a group, as `torch.optim.AdamW(fused=True)`.
pub fn adamw_step(
    g: &AdamWGroup<'_>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
    eps: f64,
) -> Result<()> {
    let n = g.params.len();
    if [&g.grads, &g.exp_avgs, &g.exp_avg_sqs, &g.steps]
        .iter()
        .any(|v| v.len() != n)
    {
        return Err(ModelError::Input(
            "fused AdamW: lists of different lengths".into(),
        ));
    }
    let (mut p, mut gr, mut m, mut v, mut s) = (
        handles(&g.params),
        handles(&g.grads),
        handles(&g.exp_avgs),
        handles(&g.exp_avg_sqs),
        handles(&g.steps),
    );
    // SAFETY: every handle is a live tch tensor borrowed for the call; the C side only reads
    // the handles and updates the tensors in place.
    let err = unsafe {
        do_fused_adamw(
            p.as_mut_ptr(),
            gr.as_mut_ptr(),
            m.as_mut_ptr(),
            v.as_mut_ptr(),
            s.as_mut_ptr(),
            n as c_int,
            lr,
            beta1,
            beta2,
            weight_decay,
            eps,
        )
    };
    check(err, "fused AdamW")
}

/// Per-parameter clipping of `grads` in place; returns the [n] norms and coefficients.
pub fn clip_per_param(grads: &[&Tensor], clip: f64) -> Result<(Tensor, Tensor)> {
    let mut g = handles(grads);
    let (mut norms, mut coefs): (Handle, Handle) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: live borrowed handles in; on success two new tensors out, owned from here on.
    let err = unsafe {
        do_clip_per_param(
            g.as_mut_ptr(),
            g.len() as c_int,
            clip,
            &mut norms,
            &mut coefs,
        )
    };
    check(err, "fused gradient clipping")?;
    // SAFETY: the C side allocated both with `new at::Tensor`, which tch frees on drop.
    Ok(unsafe { (Tensor::from_ptr(norms), Tensor::from_ptr(coefs)) })
}
