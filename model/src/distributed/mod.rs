//! Data-parallel training on PyTorch's own c10d engine (what DistributedDataParallel uses):
//! a C++ shim (csrc/) over TCPStore, ProcessGroupGloo (CPU), ProcessGroupNCCL (CUDA) and
//! c10d::Reducer, behind a safe API.
//!
//! - [`Rendezvous`]: rank / world size / store address from torchrun or Slurm variables.
//! - [`ProcessGroup`]: joins the group; all-reduce, broadcast, barrier; initial weights from
//!   rank 0 ([`ProcessGroup::broadcast_from_main`]).
//! - [`GradSync`]: gradient averaging during backward (Reducer) or after it (flat buckets),
//!   skipped on accumulation micro-steps.
//! - [`launch_local`]: the one-node launcher behind `train --nproc-per-node`.
//!
//! Every blocking call is bounded by [`GroupOptions::timeout`]: a peer that never joins, dies
//! or hangs gives an error on the other ranks, never a hang.

mod error;
/// Also the home of the shim's error and handle helpers that `optim::fused` shares.
pub(crate) mod ffi;
mod grad_sync;
mod group;
pub mod launch;
mod rendezvous;

pub use error::{DistError, Result};
pub use grad_sync::{GradSync, GradSyncMode, GradSyncOptions};
pub use group::{Backend, GroupOptions, ProcessGroup, ReduceOp, BROADCAST_BUCKET_BYTES};
pub use launch::{is_launched_child, launch_local, strip_flag, LaunchSpec, LAUNCHED_ENV};
pub use rendezvous::{first_host, Launcher, Rendezvous, SLURM_PORT_BASE};
