//! The threads of one epoch: a reader streams samples in order, a decode stage fills batches
//! on a rayon pool, and a bounded channel holds at most `prefetch` finished batches.
//!
//! ```text
//! reader thread ──(≤ 2·B samples)──▶ batch thread (+ N decode threads) ──(≤ prefetch batches)──▶ consumer
//! ```
//!
//! Batch composition depends only on the order and on which samples fail to decode, never on
//! timing or thread count: each batch takes the next B samples of the rank's order that decode.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rayon::prelude::*;

use super::batch::{Batch, Images, PixelFormat, SkippedSample};
use super::reader::{LoadedBlock, ShardSet};
use super::rng::{Rng, DOMAIN_AUGMENT};
use super::sampler::{EpochPlan, OrderConfig, OrderCursor, RankSlice, Slot};
use super::transform::{Geometry, ImageSlot, SampleIn, SampleOut, TransformConfig, Worker};
use super::{LoaderConfig, LoaderError, OnError};

/// One sample on its way to the decode stage.
struct RawSample {
    slot: Slot,
    block: Arc<LoadedBlock>,
    row: usize,
}

thread_local! {
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// What a loader's epochs share: the decode pool (its threads keep their decoders and scratch
/// buffers) and the image buffers handed back by the consumer, reused instead of fresh
/// allocations (a fresh f32 batch of 64×224² is 38 MB of page faults).
pub(super) struct Shared {
    pool: rayon::ThreadPool,
    spare: Mutex<Vec<Images>>,
    /// At most this many spare buffers are kept.
    keep: usize,
}

// Not derived: the spare buffers would print every pixel.
impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("threads", &self.pool.current_num_threads())
            .field("keep", &self.keep)
            .finish()
    }
}

impl Shared {
    pub(super) fn new(cfg: &LoaderConfig) -> Result<Shared, LoaderError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.max(1))
            .thread_name(|i| format!("droppos-decode-{i}"))
            .build()
            .map_err(|e| LoaderError::Config(format!("thread pool: {e}")))?;
        Ok(Shared {
            pool,
            spare: Mutex::new(Vec::new()),
            keep: cfg.prefetch.max(1) + 2,
        })
    }

    fn take_spare(&self) -> Option<Images> {
        self.spare.lock().ok()?.pop()
    }

    fn give_spare(&self, images: Images) {
        if let Ok(mut spare) = self.spare.lock() {
            if spare.len() < self.keep {
                spare.push(images);
            }
        }
    }
}

/// Iterator over the batches of one epoch for one rank.
pub struct EpochLoader {
    rx: Option<Receiver<Result<Batch, LoaderError>>>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    failed: bool,
    /// Samples skipped after the last batch (a final batch left empty, or short and dropped).
    trailing: Arc<Mutex<Vec<SkippedSample>>>,
}

impl EpochLoader {
    pub(super) fn start(
        set: Arc<ShardSet>,
        cfg: LoaderConfig,
        shared: Arc<Shared>,
        epoch: u64,
        consumed: u64,
    ) -> Result<EpochLoader, LoaderError> {
        cfg.validate(&set)?;
        let plan = EpochPlan::new(
            &set.block_sizes(),
            OrderConfig {
                seed: cfg.seed,
                shuffle: cfg.shuffle,
                window_blocks: cfg.window_blocks,
            },
            epoch,
        );
        let slice = RankSlice::with_partition(
            set.num_samples(),
            cfg.world as u64,
            cfg.rank as u64,
            cfg.pad,
            cfg.partition,
        );
        let cursor = OrderCursor::new(plan, slice, consumed);
        let (raw_tx, raw_rx) = sync_channel::<Result<RawSample, LoaderError>>(2 * cfg.batch_size);
        let (out_tx, out_rx) = sync_channel::<Result<Batch, LoaderError>>(cfg.prefetch.max(1));
        let set2 = set.clone();
        let shared2 = shared.clone();
        let trailing = Arc::new(Mutex::new(Vec::new()));
        let trailing2 = trailing.clone();
        let reader = std::thread::Builder::new()
            .name("droppos-reader".into())
            .spawn(move || read_samples(&set2, cursor, raw_tx))
            .map_err(|e| LoaderError::Config(format!("spawn: {e}")))?;
        let batcher = std::thread::Builder::new()
            .name("droppos-batcher".into())
            .spawn(move || make_batches(&set, &cfg, epoch, &shared2, raw_rx, out_tx, &trailing2))
            .map_err(|e| LoaderError::Config(format!("spawn: {e}")))?;
        Ok(EpochLoader {
            rx: Some(out_rx),
            shared,
            threads: vec![reader, batcher],
            failed: false,
            trailing,
        })
    }
}

impl EpochLoader {
    /// Hands a consumed batch's image buffer back for reuse (optional; saves page faults).
    pub fn recycle(&self, batch: Batch) {
        self.shared.give_spare(batch.images);
    }

    /// Samples skipped after the last batch was handed out: at the end of the epoch, when the
    /// final batch came out empty or short (and `drop_last`), its skips belong to no batch.
    /// Complete once the iterator has returned `None`.
    pub fn skipped_after_last_batch(&self) -> Vec<SkippedSample> {
        self.trailing.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Iterator for EpochLoader {
    type Item = Result<Batch, LoaderError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = self.rx.as_ref()?.recv().ok()?;
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }
}

impl Drop for EpochLoader {
    fn drop(&mut self) {
        // Closing the channel makes both threads stop at their next send.
        self.rx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Streams the rank's samples in order, holding only the current window's row groups.
fn read_samples(
    set: &ShardSet,
    cursor: OrderCursor,
    tx: SyncSender<Result<RawSample, LoaderError>>,
) {
    let mut window = usize::MAX;
    let mut loaded: HashMap<usize, Arc<LoadedBlock>> = HashMap::new();
    for slot in cursor {
        if slot.window != window {
            loaded.clear();
            window = slot.window;
        }
        let block = match loaded.get(&slot.sample.block) {
            Some(b) => b.clone(),
            None => match set.read_block(slot.sample.block) {
                Ok(b) => {
                    let b = Arc::new(b);
                    loaded.insert(slot.sample.block, b.clone());
                    b
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            },
        };
        let row = slot.sample.row as usize;
        if tx.send(Ok(RawSample { slot, block, row })).is_err() {
            return;
        }
    }
}

fn make_batches(
    set: &ShardSet,
    cfg: &LoaderConfig,
    epoch: u64,
    shared: &Shared,
    rx: Receiver<Result<RawSample, LoaderError>>,
    tx: SyncSender<Result<Batch, LoaderError>>,
    trailing: &Mutex<Vec<SkippedSample>>,
) {
    let pool = &shared.pool;
    let s = cfg.size;
    let per_image = 3 * s * s;
    let tcfg = TransformConfig {
        augment: cfg.augment,
        size: s,
        dct_scaling: cfg.dct_scaling,
        patch_size: set.patch_size(),
        randaug: cfg.randaug,
        resample: cfg.resample,
    };
    let cols = set.columns();
    let grid = (s / set.patch_size().max(1)).pow(2);
    let mut done = false;
    while !done {
        let b = cfg.batch_size;
        // Every slot is overwritten before it is handed out, so reused buffers need no zeroing.
        let mut images = match (cfg.pixel_format, shared.take_spare()) {
            (PixelFormat::U8, Some(Images::U8(mut v))) => {
                v.resize(b * per_image, 0);
                Images::U8(v)
            }
            (PixelFormat::F32Normalized, Some(Images::F32(mut v))) => {
                v.resize(b * per_image, 0.0);
                Images::F32(v)
            }
            (PixelFormat::U8, _) => Images::U8(vec![0; b * per_image]),
            (PixelFormat::F32Normalized, _) => Images::F32(vec![0.0; b * per_image]),
        };
        let mut masks = cols.mask.then(|| vec![0u8; b * s * s]);
        let mut patch = cols.patch_labels.then(|| vec![0i32; b * grid]);
        let mut accepted: Vec<RawSample> = Vec::with_capacity(b);
        let mut geometry: Vec<Geometry> = Vec::with_capacity(b);
        let mut skipped = Vec::new();
        let mut consumed = None;
        while accepted.len() < b {
            // Take the next samples for the free slots.
            let mut take = Vec::with_capacity(b - accepted.len());
            while take.len() < b - accepted.len() {
                match rx.recv() {
                    Ok(Ok(r)) => take.push(r),
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    Err(_) => {
                        done = true;
                        break;
                    }
                }
            }
            if take.is_empty() {
                break;
            }
            consumed = take.last().map(|r| r.slot.rank_position + 1);
            let first = accepted.len();
            let results = pool.install(|| {
                process_all(
                    &tcfg,
                    cfg.seed,
                    epoch,
                    &take,
                    first,
                    &mut images,
                    masks.as_deref_mut(),
                    patch.as_deref_mut(),
                    grid,
                )
            });
            // Compact: successful samples keep their order; failures are skipped or fatal.
            let mut dst = first;
            for (k, (raw, res)) in take.into_iter().zip(results).enumerate() {
                let src = first + k;
                match res {
                    Ok(g) => {
                        if dst != src {
                            move_slot(&mut images, per_image, src, dst);
                            if let Some(m) = masks.as_mut() {
                                m.copy_within(src * s * s..(src + 1) * s * s, dst * s * s);
                            }
                            if let Some(p) = patch.as_mut() {
                                p.copy_within(src * grid..(src + 1) * grid, dst * grid);
                            }
                        }
                        accepted.push(raw);
                        geometry.push(g);
                        dst += 1;
                    }
                    Err(e) => {
                        let shard = set.shard_name(raw.block.shard);
                        let key = raw.block.key(raw.row).to_string();
                        // Patch labels that do not fit the manifest's grid are not a bad sample
                        // but a manifest that does not describe its shards: stop, whatever the
                        // policy (skipping would silently drop nearly everything).
                        if let super::transform::SampleError::PatchLabels(why) = &e {
                            let _ = tx.send(Err(LoaderError::Config(format!(
                                "{shard}: row {key}: {why} of {p}x{p}-pixel patches (the manifest's \
                                 patch_size): manifest and shards disagree",
                                p = set.patch_size()
                            ))));
                            return;
                        }
                        match cfg.on_error {
                            OnError::Fail => {
                                let _ = tx.send(Err(LoaderError::Sample {
                                    shard,
                                    key,
                                    reason: e.to_string(),
                                }));
                                return;
                            }
                            OnError::Skip => {
                                tracing::warn!(%shard, %key, error = %e, "skipping undecodable sample");
                                skipped.push(SkippedSample {
                                    shard,
                                    key,
                                    reason: e.to_string(),
                                });
                            }
                        }
                    }
                }
            }
        }
        let n = accepted.len();
        if n == 0 || (n < b && cfg.drop_last) {
            if let Ok(mut t) = trailing.lock() {
                t.extend(skipped);
            }
            break;
        }
        match &mut images {
            Images::U8(v) => v.truncate(n * per_image),
            Images::F32(v) => v.truncate(n * per_image),
        }
        if let Some(m) = masks.as_mut() {
            m.truncate(n * s * s);
        }
        if let Some(p) = patch.as_mut() {
            p.truncate(n * grid);
        }
        let batch = Batch {
            images,
            size: s,
            labels: accepted.iter().map(|r| r.block.label(r.row)).collect(),
            keys: accepted
                .iter()
                .map(|r| r.block.key(r.row).to_string())
                .collect(),
            masks,
            patch_labels: patch,
            epoch,
            consumed: consumed.unwrap_or(0),
            positions: accepted.iter().map(|r| r.slot.rank_position).collect(),
            epoch_positions: accepted.iter().map(|r| r.slot.epoch_position).collect(),
            geometry,
            skipped,
        };
        if tx.send(Ok(batch)).is_err() {
            return;
        }
    }
}

fn move_slot(images: &mut Images, per: usize, src: usize, dst: usize) {
    match images {
        Images::U8(v) => v.copy_within(src * per..(src + 1) * per, dst * per),
        Images::F32(v) => v.copy_within(src * per..(src + 1) * per, dst * per),
    }
}

/// Decodes `take[k]` into slot `first + k` of the buffers, in parallel.
#[allow(clippy::too_many_arguments)]
fn process_all(
    tcfg: &TransformConfig,
    seed: u64,
    epoch: u64,
    take: &[RawSample],
    first: usize,
    images: &mut Images,
    masks: Option<&mut [u8]>,
    patch: Option<&mut [i32]>,
    grid: usize,
) -> Vec<Result<Geometry, super::transform::SampleError>> {
    let s = tcfg.size;
    let per = 3 * s * s;
    let n = take.len();
    let img_slots: Vec<ImageSlot<'_>> = match images {
        Images::U8(v) => v[first * per..(first + n) * per]
            .chunks_exact_mut(per)
            .map(ImageSlot::U8)
            .collect(),
        Images::F32(v) => v[first * per..(first + n) * per]
            .chunks_exact_mut(per)
            .map(ImageSlot::F32)
            .collect(),
    };
    let mut mask_slots: Vec<Option<&mut [u8]>> = match masks {
        Some(m) => m[first * s * s..(first + n) * s * s]
            .chunks_exact_mut(s * s)
            .map(Some)
            .collect(),
        None => (0..n).map(|_| None).collect(),
    };
    let mut patch_slots: Vec<Option<&mut [i32]>> = match patch {
        Some(p) if grid > 0 => p[first * grid..(first + n) * grid]
            .chunks_exact_mut(grid)
            .map(Some)
            .collect(),
        _ => (0..n).map(|_| None).collect(),
    };
    let outs: Vec<SampleOut<'_>> = img_slots
        .into_iter()
        .zip(mask_slots.drain(..))
        .zip(patch_slots.drain(..))
        .map(|((image, mask), patch_labels)| SampleOut {
            image,
            mask,
            patch_labels,
        })
        .collect();
    outs.into_par_iter()
        .zip(take.par_iter())
        .map(|(out, raw)| {
            let input = SampleIn {
                image: raw.block.image(raw.row),
                mask: raw.block.mask(raw.row),
                patch_labels: raw.block.patch_labels(raw.row),
            };
            let mut rng = Rng::for_sample(DOMAIN_AUGMENT, seed, epoch, raw.slot.epoch_position);
            WORKER.with(|w| {
                let mut w = w.borrow_mut();
                if w.is_none() {
                    *w = Some(Worker::new()?);
                }
                w.as_mut()
                    .expect("worker initialised above")
                    .process(tcfg, input, &mut rng, out)
            })
        })
        .collect()
}
