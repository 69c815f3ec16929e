//! How the loop talks to the other ranks of a data-parallel run (PyTorch's c10d through
//! `droppos_model::distributed`); a single process talks to nobody.

use anyhow::{Context, Result};
use droppos_model::distributed::{GradSync, ProcessGroup, ReduceOp};
use tch::{Device, Kind, Tensor};

use super::run::World;

/// Either one process, or a process group with its gradient synchroniser.
pub enum Collective {
    Local,
    Group {
        group: ProcessGroup,
        grads: GradSync,
        /// Where small control tensors live (CPU for Gloo, the rank's GPU for NCCL).
        device: Device,
    },
}

impl Collective {
    pub fn world(&self) -> World {
        match self {
            Collective::Local => World::default(),
            Collective::Group { group, .. } => World {
                size: group.world_size() as u64,
                rank: group.rank() as u64,
            },
        }
    }

    /// `loss.backward()`, averaging gradients over ranks when `sync` (the last micro-batch of
    /// an accumulation window; earlier ones accumulate locally, like DDP's `no_sync`).
    pub fn backward(&mut self, loss: &Tensor, sync: bool) -> Result<()> {
        match self {
            Collective::Local => {
                loss.backward();
                Ok(())
            }
            Collective::Group { grads, .. } => grads
                .backward(loss, sync)
                .context("backward with gradient all-reduce"),
        }
    }

    /// The mean over ranks of (loss, acc1), so that every rank logs and checks the same values
    /// (a non-finite loss anywhere stops every rank at the same step), and the sum over ranks of
    /// `skipped` (undecodable samples), in the same all-reduce.
    pub fn reduce_metrics(&self, loss: f64, acc1: f64, skipped: u64) -> Result<(f64, f64, u64)> {
        match self {
            Collective::Local => Ok((loss, acc1, skipped)),
            Collective::Group { group, device, .. } => {
                let t = Tensor::from_slice(&[loss, acc1, skipped as f64]).to_device(*device);
                group
                    .all_reduce(&[&t], ReduceOp::Sum)
                    .context("averaging the loss over ranks")?;
                let v: Vec<f64> = Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double))?;
                let w = group.world_size() as f64;
                Ok((v[0] / w, v[1] / w, v[2].round() as u64))
            }
        }
    }

    /// Whether any rank wants to stop (a signal may reach the ranks at different steps; all of
    /// them must stop at the same one).
    pub fn any(&self, flag: bool) -> Result<bool> {
        match self {
            Collective::Local => Ok(flag),
            Collective::Group { group, device, .. } => {
                let t = Tensor::from_slice(&[flag as i32 as f32]).to_device(*device);
                group
                    .all_reduce(&[&t], ReduceOp::Max)
                    .context("agreeing on a stop")?;
                Ok(t.double_value(&[0]) > 0.0)
            }
        }
    }

    /// Makes every rank hold rank 0's weights (as DDP does when it wraps a model).
    pub fn broadcast_weights(&self, tensors: &[Tensor]) -> Result<()> {
        match self {
            Collective::Local => Ok(()),
            Collective::Group { group, .. } => group
                .broadcast_from_main(tensors)
                .context("broadcasting rank 0's weights"),
        }
    }

    /// Checks that every rank holds the same weights (a desynchronised run is a bug worth an
    /// error, not a silent divergence). Returns the checksum: the sum and sum of squares of
    /// all values, in f64.
    pub fn check_in_sync(&self, tensors: &[Tensor]) -> Result<(f64, f64)> {
        let (mut sum, mut sq) = (0.0, 0.0);
        tch::no_grad(|| {
            for t in tensors {
                let t = t.to_kind(Kind::Double);
                sum += t.sum(Kind::Double).double_value(&[]);
                sq += t.square().sum(Kind::Double).double_value(&[]);
            }
        });
        if let Collective::Group { group, device, .. } = self {
            let hi = Tensor::from_slice(&[sum, sq]).to_device(*device);
            let lo = hi.copy();
            group
                .all_reduce(&[&hi], ReduceOp::Max)
                .context("comparing weights over ranks")?;
            group
                .all_reduce(&[&lo], ReduceOp::Min)
                .context("comparing weights over ranks")?;
            let hi: Vec<f64> = Vec::try_from(hi.to_device(Device::Cpu))?;
            let lo: Vec<f64> = Vec::try_from(lo.to_device(Device::Cpu))?;
            anyhow::ensure!(
                hi == lo,
                "the ranks' weights differ (checksums {lo:?} .. {hi:?}): gradient averaging is \
                 out of sync"
            );
        }
        Ok((sum, sq))
    }
}
