//! Data-parallel gradient synchronisation: PyTorch's c10d::Reducer (what
//! DistributedDataParallel uses: gradients bucketed and all-reduced while backward is still
//! running), or a flat-bucket all-reduce after backward as a fallback.

use std::ffi::c_int;
use std::ptr;
use std::str::FromStr;
use std::sync::Arc;

use tch::{Kind, Tensor};

use super::error::{DistError, Result};
use super::ffi;
use super::group::{GroupInner, ProcessGroup};

/// How gradients are averaged over ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradSyncMode {
    /// c10d::Reducer: bucketed, overlapped with backward (DDP).
    Reducer,
    /// After backward, gradients are packed into flat buckets and all-reduced.
    Flat,
}

impl FromStr for GradSyncMode {
    type Err = DistError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "reducer" => Ok(GradSyncMode::Reducer),
            "flat" => Ok(GradSyncMode::Flat),
            o => Err(DistError::Unsupported(format!(
                "unknown gradient sync {o:?} (expected reducer or flat)"
            ))),
        }
    }
}

/// Tuning of [`GradSync`]; defaults are DDP's.
#[derive(Debug, Clone)]
pub struct GradSyncOptions {
    pub mode: GradSyncMode,
    /// Bucket size (DDP's bucket_cap_mb = 25).
    pub bucket_bytes: i64,
    /// The first (last-produced) bucket is kept small so its all-reduce starts early (1 MiB).
    pub first_bucket_bytes: i64,
    /// Some parameters may get no gradient in a step (DDP's find_unused_parameters); costs a
    /// graph traversal per step.
    pub find_unused_parameters: bool,
}

impl Default for GradSyncOptions {
    fn default() -> Self {
        GradSyncOptions {
            mode: GradSyncMode::Reducer,
            bucket_bytes: 25 * 1024 * 1024,
            first_bucket_bytes: 1024 * 1024,
            find_unused_parameters: false,
        }
    }
}

enum Engine {
    Reducer(*mut ffi::DdReducer),
    Flat,
}

/// Averages the gradients of a fixed list of parameters over all ranks of a group.
///
/// Use [`GradSync::backward`] in place of `loss.backward()`. With `sync = false` (gradient
/// accumulation micro-steps) gradients accumulate locally and nothing is communicated, like
/// DDP's `no_sync()`; the next `sync = true` backward all-reduces the accumulated sums.
/// Gradients are averaged (sum / world size), so ranks with equal local batches see the
/// gradient of the combined batch.
pub struct GradSync {
    group: Arc<GroupInner>,
    params: Vec<Tensor>,
    engine: Engine,
    bucket_bytes: i64,
}

// SAFETY: the Reducer is only used through &mut self; c10d objects are thread-safe.
unsafe impl Send for GradSync {}

impl GradSync {
    /// `params`: the trainable leaf tensors, in the same order on every rank (e.g.
    /// `VarStore::trainable_variables()`, which keeps creation order). Checks that every rank
    /// has the same shapes (a collective).
    pub fn new(group: &ProcessGroup, params: &[Tensor], options: &GradSyncOptions) -> Result<Self> {
        let params: Vec<Tensor> = params
            .iter()
            .filter(|p| p.requires_grad())
            .map(|p| p.shallow_clone())
            .collect();
        if params.is_empty() {
            return Err(DistError::Unsupported(
                "no trainable parameters to synchronise".into(),
            ));
        }
        let engine = match options.mode {
            GradSyncMode::Flat => Engine::Flat,
            GradSyncMode::Reducer => {
                let refs: Vec<&Tensor> = params.iter().collect();
                let mut h = ffi::handles(&refs);
                let mut raw = ptr::null_mut();
                // SAFETY: handles valid during the call; the Reducer keeps its own references.
                let err = unsafe {
                    ffi::dd_reducer_new(
                        group.inner.raw(),
                        h.as_mut_ptr(),
                        h.len() as c_int,
                        options.bucket_bytes,
                        options.first_bucket_bytes,
                        options.find_unused_parameters as c_int,
                        &mut raw,
                    )
                };
                group.inner.check("gradient reducer setup", err)?;
                Engine::Reducer(raw)
            }
        };
        Ok(GradSync {
            group: group.inner.clone(),
            params,
            engine,
            bucket_bytes: options.bucket_bytes.max(1),
        })
    }

    pub fn mode(&self) -> GradSyncMode {
        match self.engine {
            Engine::Reducer(_) => GradSyncMode::Reducer,
            Engine::Flat => GradSyncMode::Flat,
        }
    }

    /// `loss.backward()`, averaging gradients over ranks when `sync`.
    pub fn backward(&mut self, loss: &Tensor, sync: bool) -> Result<()> {
        match self.engine {
            Engine::Reducer(r) => {
                // SAFETY: r is alive; loss is a live tensor.
                let err = unsafe { ffi::dd_reducer_prepare(r, sync as c_int, loss.as_ptr() as _) };
                self.group.check("gradient reducer", err)?;
                let err = unsafe { ffi::dd_backward(loss.as_ptr() as _) };
                self.group.check("backward with gradient all-reduce", err)
            }
            Engine::Flat => {
                let err = unsafe { ffi::dd_backward(loss.as_ptr() as _) };
                // A backward failure here is local (no collective ran): keep the group usable.
                if let Some(message) = ffi::take_error(err) {
                    return Err(DistError::Collective {
                        op: "backward",
                        rank: self.group.rank,
                        world_size: self.group.world_size,
                        message: super::error::clean_message(&message),
                    });
                }
                if sync {
                    self.all_reduce_flat()?;
                }
                Ok(())
            }
        }
    }

    /// Packs gradients into flat buckets (per dtype and device, at most `bucket_bytes`),
    /// all-reduces them and writes the means back. A missing gradient counts as zeros (every
    /// rank must send the same buckets) and stays missing.
    fn all_reduce_flat(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let world = self.group.world_size as f64;
        let mut order: Vec<usize> = (0..self.params.len()).collect();
        order.sort_by_key(|&i| {
            let p = &self.params[i];
            (format!("{:?}", p.kind()), format!("{:?}", p.device()))
        });
        let mut start = 0;
        while start < order.len() {
            let first = &self.params[order[start]];
            let (kind, device) = (first.kind(), first.device());
            let mut end = start;
            let mut bytes = 0i64;
            while end < order.len() {
                let p = &self.params[order[end]];
                let b = p.numel() as i64 * elem_size(p.kind());
                if p.kind() != kind
                    || p.device() != device
                    || (end > start && bytes + b > self.bucket_bytes)
                {
                    break;
                }
                bytes += b;
                end += 1;
            }
            let members = &order[start..end];
            let pieces: Vec<Tensor> = members
                .iter()
                .map(|&i| {
                    let p = &self.params[i];
                    let g = p.grad();
                    if g.defined() {
                        g.reshape([-1])
                    } else {
                        Tensor::zeros([p.numel() as i64], (kind, device))
                    }
                })
                .collect();
            let mut flat = Tensor::cat(&pieces, 0);
            self.group_all_reduce(&flat)?;
            let _ = flat.g_div_scalar_(world);
            let mut offset = 0i64;
            for &i in members {
                let p = &self.params[i];
                let n = p.numel() as i64;
                let mut g = p.grad();
                if g.defined() {
                    g.copy_(&flat.narrow(0, offset, n).view_as(&g));
                }
                offset += n;
            }
            start = end;
        }
        Ok(())
    }

    fn group_all_reduce(&self, t: &Tensor) -> Result<()> {
        let mut h = ffi::handles(&[t]);
        // SAFETY: the tensor is alive during the call.
        let err = unsafe { ffi::dd_all_reduce(self.group.raw(), h.as_mut_ptr(), 1, ffi::OP_SUM) };
        self.group.check("gradient all-reduce", err)
    }
}

fn elem_size(kind: Kind) -> i64 {
    match kind {
        Kind::Double | Kind::Int64 | Kind::ComplexFloat => 8,
        Kind::Half | Kind::BFloat16 | Kind::Int16 => 2,
        Kind::Int8 | Kind::Uint8 | Kind::Bool => 1,
        Kind::ComplexDouble => 16,
        _ => 4,
    }
}

impl Drop for GradSync {
    fn drop(&mut self) {
        if let Engine::Reducer(r) = self.engine {
            // SAFETY: created by dd_reducer_new, released once. After a failed all-reduce the
            // Reducer may hold pending work against a dead peer: leak it with the group.
            unsafe {
                if !self.group.failed() {
                    ffi::dd_reducer_free(r);
                }
            }
        }
    }
}
