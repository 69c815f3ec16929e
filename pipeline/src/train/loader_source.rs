//! The shard loader (droppos-shards) as the loop's [`BatchSource`]: deterministic in (seed,
//! epoch), resumable from (epoch, samples consumed), rank-partitioned; batches are handed to
//! tch by the model crate's prefetcher (pinned, non-blocking copies on CUDA) and normalised on
//! the device.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use droppos_model::data::Prefetcher;
use droppos_shards::loader::{
    Augment, EpochLoader, Loader, LoaderConfig, OnError, Partition, RrcParams, ShardSet,
};
use tch::Device;

use super::run::World;
use super::source::{BatchSource, SourceBatch};
use crate::config::Recipe;

pub struct LoaderSource {
    loader: Loader,
    /// Hash of the manifests' shard lists ([`BatchSource::data_fingerprint`]).
    fingerprint: String,
    on_error: OnError,
    device: Device,
    epoch: Option<Prefetcher<EpochLoader>>,
}

impl LoaderSource {
    /// Opens the shards under the `data` folders (one dataset, in the given order) with the
    /// recipe's augmentation and batch size. Shard hashes are checked against the manifests.
    pub fn open(data: &[PathBuf], recipe: &Recipe, device: Device, world: World) -> Result<Self> {
        let set = ShardSet::open(data, true).with_context(|| {
            let dirs: Vec<String> = data.iter().map(|d| d.display().to_string()).collect();
            format!("opening shards in {}", dirs.join(", "))
        })?;
        let mut cfg = LoaderConfig::pretrain(
            recipe.model.img_size as usize,
            recipe.train.batch_size as usize,
        );
        cfg.augment = Augment::Pretrain {
            rrc: RrcParams {
                scale: (recipe.data.crop_scale_min, recipe.data.crop_scale_max),
                ..RrcParams::default()
            },
            flip: recipe.data.hflip,
        };
        cfg.seed = recipe.train.seed;
        cfg.world = world.size as usize;
        cfg.rank = world.rank as usize;
        cfg.partition = if recipe.data.rank_partition == "contiguous" {
            Partition::Contiguous
        } else {
            Partition::Strided
        };
        // Validated to be `skip` or `fail` when the recipe was read.
        let on_error = if recipe.data.on_error == "fail" {
            OnError::Fail
        } else {
            OnError::Skip
        };
        cfg.on_error = on_error;
        if recipe.data.workers > 0 {
            cfg.threads = recipe.data.workers as usize;
        }
        cfg.prefetch = recipe.data.prefetch.max(1) as usize;
        let fingerprint = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for m in set.manifests() {
                for s in &m.shards {
                    h.update(s.sha256.as_bytes());
                    h.update(s.rows.to_le_bytes());
                }
                h.update([b'\n']);
            }
            hex::encode(h.finalize())
        };
        let loader = Loader::new(Arc::new(set), cfg).context("configuring the loader")?;
        Ok(Self {
            loader,
            fingerprint,
            on_error,
            device,
            epoch: None,
        })
    }
}

impl BatchSource for LoaderSource {
    fn samples_per_epoch(&self) -> u64 {
        self.loader.samples_per_epoch()
    }

    fn data_fingerprint(&self) -> Option<String> {
        Some(self.fingerprint.clone())
    }

    fn start_epoch(&mut self, epoch: u64, samples_consumed: u64) -> Result<()> {
        // Drop the previous epoch's threads before starting the next.
        self.epoch = None;
        let it = self
            .loader
            .epoch(epoch, samples_consumed)
            .context("starting the loader")?;
        self.epoch = Some(Prefetcher::new(it, self.device));
        Ok(())
    }

    fn next_batch(&mut self) -> Result<Option<SourceBatch>> {
        let Some(it) = self.epoch.as_mut() else {
            return Ok(None);
        };
        match it.next() {
            None => Ok(None),
            Some(batch) => {
                let batch = batch.with_context(|| match self.on_error {
                    OnError::Fail => {
                        "loading a batch (data.on_error = \"fail\"; \"skip\" skips \
                                      undecodable samples, logging each)"
                    }
                    OnError::Skip => "loading a batch",
                })?;
                Ok(Some(SourceBatch {
                    images: batch.input(),
                    epoch_positions: batch.epoch_positions.clone(),
                    consumed: batch.consumed,
                    skipped: batch.skipped,
                }))
            }
        }
    }
}
