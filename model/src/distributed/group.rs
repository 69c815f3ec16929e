//! A c10d process group (TCPStore rendezvous + Gloo or NCCL) with safe collectives.

use std::ffi::{c_int, CString};
use std::fmt;
use std::ptr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tch::{Device, Tensor};

use super::error::{clean_message, DistError, Result};
use super::ffi;
use super::rendezvous::Rendezvous;

/// DDP's bucket size for the initial parameter broadcast (250 MiB).
pub const BROADCAST_BUCKET_BYTES: i64 = 250 * 1024 * 1024;

/// The communication library under the process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors; what the CI tests run.
    Gloo,
    /// CUDA tensors, one GPU per process.
    Nccl,
}

impl Backend {
    /// What PyTorch picks: NCCL for CUDA devices, Gloo otherwise.
    pub fn for_device(device: Device) -> Self {
        match device {
            Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Gloo,
        }
    }

    /// Whether this build compiled the backend in.
    pub fn is_built(self) -> bool {
        // SAFETY: pure queries of compile-time flags.
        unsafe {
            match self {
                Backend::Gloo => ffi::dd_has_gloo() != 0,
                Backend::Nccl => ffi::dd_has_nccl() != 0,
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = DistError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => Ok(Backend::Nccl),
            other => Err(DistError::Unsupported(format!(
                "unknown distributed backend {other:?} (expected gloo or nccl)"
            ))),
        }
    }
}

/// Reduction of [`ProcessGroup::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// How to build the process group.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// `None`: by device ([`Backend::for_device`]).
    pub backend: Option<Backend>,
    /// Bounds the rendezvous (a peer that never joins) and every collective (a peer that died
    /// or hangs): past it every waiting rank gets an error instead of blocking.
    pub timeout: Duration,
    /// The device this rank trains on (CUDA index for NCCL).
    pub device: Device,
    /// Interfaces for Gloo (comma-separated); default: GLOO_SOCKET_IFNAME. NCCL reads
    /// NCCL_SOCKET_IFNAME itself.
    pub gloo_ifnames: Option<String>,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            backend: None,
            timeout: Duration::from_secs(600),
            device: Device::Cpu,
            gloo_ifnames: std::env::var("GLOO_SOCKET_IFNAME")
                .ok()
                .filter(|s| !s.trim().is_empty()),
        }
    }
}

/// Shared by the group and the gradient synchroniser so that the C++ group outlives both.
pub(crate) struct GroupInner {
    raw: *mut ffi::DdGroup,
    /// Set after a failed collective: the C++ group may then block in its destructor
    /// (threads waiting on a dead peer), so it is abandoned instead of freed.
    failed: AtomicBool,
    pub(crate) rank: usize,
    pub(crate) world_size: usize,
}

// SAFETY: c10d process groups are thread-safe (PyTorch calls them from any thread).
unsafe impl Send for GroupInner {}
unsafe impl Sync for GroupInner {}

impl GroupInner {
    pub(crate) fn raw(&self) -> *mut ffi::DdGroup {
        self.raw
    }

    /// Turns a shim status into a Result, remembering failures.
    pub(crate) fn check(&self, op: &'static str, err: *mut std::ffi::c_char) -> Result<()> {
        match ffi::take_error(err) {
            None => Ok(()),
            Some(message) => {
                self.failed.store(true, Ordering::SeqCst);
                Err(DistError::Collective {
                    op,
                    rank: self.rank,
                    world_size: self.world_size,
                    message: clean_message(&message),
                })
            }
        }
    }

    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }
}

impl Drop for GroupInner {
    fn drop(&mut self) {
        // SAFETY: `raw` came from dd_group_new and is released exactly once.
        unsafe {
            if self.failed.load(Ordering::SeqCst) {
                ffi::dd_group_abandon(self.raw);
            } else {
                ffi::dd_group_free(self.raw);
            }
        }
    }
}

/// A process group over all ranks of the job.
pub struct ProcessGroup {
    pub(crate) inner: Arc<GroupInner>,
    backend: Backend,
    rendezvous: Rendezvous,
}

impl fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .field("backend", &self.backend)
            .finish()
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.starts_with("127.") || host == "::1"
}

impl ProcessGroup {
    /// Joins the process group described by the environment (torchrun or Slurm variables).
    /// `Ok(None)` when the process was not started by a launcher.
    pub fn from_env(options: &GroupOptions) -> Result<Option<Self>> {
        match Rendezvous::from_env()? {
            None => Ok(None),
            Some(r) => Self::new(r, options).map(Some),
        }
    }

    /// Rendezvous through the TCPStore, then builds the backend. Blocks until every rank has
    /// joined or `options.timeout` passes.
    pub fn new(rendezvous: Rendezvous, options: &GroupOptions) -> Result<Self> {
        let backend = options
            .backend
            .unwrap_or_else(|| Backend::for_device(options.device));
        if !backend.is_built() {
            let hint = match backend {
                Backend::Gloo => "install libgloo-dev (scripts/env.sh does) and rebuild",
                Backend::Nccl => {
                    "rebuild with nccl.h and the CUDA headers available (see README, \
                     Distributed training), or use the gloo backend"
                }
            };
            return Err(DistError::Unsupported(format!(
                "this build has no {backend} backend: {hint}"
            )));
        }
        let cuda_device = match (backend, options.device) {
            (Backend::Nccl, Device::Cuda(i)) => i as c_int,
            (Backend::Nccl, d) => {
                return Err(DistError::Unsupported(format!(
                    "the nccl backend needs a CUDA device, not {d:?}"
                )))
            }
            _ => -1,
        };
        let cstr = |s: &str| {
            CString::new(s).map_err(|_| DistError::Env(format!("{s:?} contains a NUL byte")))
        };
        let addr = cstr(&rendezvous.master_addr)?;
        let prefix = cstr(&rendezvous.store_prefix())?;
        let ifnames = cstr(options.gloo_ifnames.as_deref().unwrap_or(""))?;
        // Without an interface, a loopback master means a single-node job: bind Gloo to
        // loopback too instead of trusting the hostname to resolve (it often doesn't in
        // containers). Otherwise Gloo resolves this machine's hostname, as PyTorch does.
        let hostname = if options.gloo_ifnames.is_none() && is_loopback(&rendezvous.master_addr) {
            "127.0.0.1"
        } else {
            ""
        };
        let hostname = cstr(hostname)?;
        let timeout_ms = options.timeout.as_millis().clamp(1, i64::MAX as u128) as i64;
        let mut raw = ptr::null_mut();
        // SAFETY: all strings live through the call; `raw` is written on success only.
        let err = unsafe {
            ffi::dd_group_new(
                match backend {
                    Backend::Gloo => ffi::BACKEND_GLOO,
                    Backend::Nccl => ffi::BACKEND_NCCL,
                },
                addr.as_ptr(),
                rendezvous.master_port as c_int,
                rendezvous.hosts_store() as c_int,
                prefix.as_ptr(),
                rendezvous.rank as c_int,
                rendezvous.world_size as c_int,
                timeout_ms,
                ifnames.as_ptr(),
                hostname.as_ptr(),
                cuda_device,
                &mut raw,
            )
        };
        if let Some(message) = ffi::take_error(err) {
            return Err(DistError::Collective {
                op: "rendezvous",
                rank: rendezvous.rank,
                world_size: rendezvous.world_size,
                message: format!(
                    "{} (store {}:{}, timeout {:?})",
                    clean_message(&message),
                    rendezvous.master_addr,
                    rendezvous.master_port,
                    options.timeout
                ),
            });
        }
        tracing::info!(
            rank = rendezvous.rank,
            world_size = rendezvous.world_size,
            local_rank = rendezvous.local_rank,
            %backend,
            master = %format!("{}:{}", rendezvous.master_addr, rendezvous.master_port),
            "joined the process group"
        );
        Ok(ProcessGroup {
            inner: Arc::new(GroupInner {
                raw,
                failed: AtomicBool::new(false),
                rank: rendezvous.rank,
                world_size: rendezvous.world_size,
            }),
            backend,
            rendezvous,
        })
    }

    pub fn rank(&self) -> usize {
        self.inner.rank
    }
    pub fn world_size(&self) -> usize {
        self.inner.world_size
    }
    pub fn local_rank(&self) -> usize {
        self.rendezvous.local_rank
    }
    /// Rank 0: the one that writes checkpoints, metrics and progress.
    pub fn is_main(&self) -> bool {
        self.inner.rank == 0
    }
    pub fn backend(&self) -> Backend {
        self.backend
    }
    pub fn rendezvous(&self) -> &Rendezvous {
        &self.rendezvous
    }

    /// In-place all-reduce of each tensor (all ranks pass the same shapes, in the same order).
    pub fn all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()> {
        let mut h = ffi::handles(tensors);
        let op = match op {
            ReduceOp::Sum => ffi::OP_SUM,
            ReduceOp::Max => ffi::OP_MAX,
            ReduceOp::Min => ffi::OP_MIN,
        };
        // SAFETY: the handles point at live tensors for the duration of the call.
        let err =
            unsafe { ffi::dd_all_reduce(self.inner.raw(), h.as_mut_ptr(), h.len() as c_int, op) };
        self.inner.check("all_reduce", err)
    }

    /// In-place all-reduce to the mean over ranks.
    pub fn all_reduce_mean(&self, tensors: &[&Tensor]) -> Result<()> {
        self.all_reduce(tensors, ReduceOp::Sum)?;
        let _guard = tch::no_grad_guard();
        let n = self.world_size() as f64;
        for t in tensors {
            let mut t = t.shallow_clone();
            let _ = t.g_div_scalar_(n);
        }
        Ok(())
    }

    /// Overwrites each tensor with the one of `root`.
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
        let mut h = ffi::handles(tensors);
        // SAFETY: as in all_reduce.
        let err = unsafe {
            ffi::dd_broadcast(
                self.inner.raw(),
                h.as_mut_ptr(),
                h.len() as c_int,
                root as c_int,
            )
        };
        self.inner.check("broadcast", err)
    }

    /// Broadcasts many tensors in flattened buckets (what DDP does with module states).
    pub fn broadcast_coalesced(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        let mut h = ffi::handles(tensors);
        // SAFETY: as in all_reduce.
        let err = unsafe {
            ffi::dd_broadcast_coalesced(
                self.inner.raw(),
                h.as_mut_ptr(),
                h.len() as c_int,
                root as c_int,
                BROADCAST_BUCKET_BYTES,
            )
        };
        self.inner.check("broadcast", err)
    }

    /// Makes every rank hold rank 0's values of these tensors: call once after building (or
    /// resuming) the model, before the first step. Order must be the same on every rank.
    pub fn broadcast_from_main(&self, tensors: &[Tensor]) -> Result<()> {
        let refs: Vec<&Tensor> = tensors.iter().collect();
        self.broadcast_coalesced(&refs, 0)
    }

    /// Rank 0's values for every variable of a VarStore (trainable or frozen), matched by name.
    pub fn broadcast_var_store(&self, vs: &tch::nn::VarStore) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let tensors: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
        self.broadcast_from_main(&tensors)
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: the group is alive.
        let err = unsafe { ffi::dd_barrier(self.inner.raw()) };
        self.inner.check("barrier", err)
    }

    /// Whether a collective of this group has failed (the group is then unusable).
    pub fn has_failed(&self) -> bool {
        self.inner.failed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_by_device_and_name() {
        assert_eq!(Backend::for_device(Device::Cpu), Backend::Gloo);
        assert_eq!(Backend::for_device(Device::Cuda(1)), Backend::Nccl);
        assert_eq!("NCCL".parse::<Backend>().unwrap(), Backend::Nccl);
        assert!("mpi".parse::<Backend>().is_err());
    }

    #[test]
    fn gloo_is_built_here() {
        // scripts/env.sh installs libgloo-dev; CI without it would silently lose CPU training.
        assert!(Backend::Gloo.is_built());
    }
}
