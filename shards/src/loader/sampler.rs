//! Epoch order and rank partitioning.
//!
//! The dataset is a list of *blocks* (one Parquet row group each, in manifest order). The order
//! of an epoch is a pure function of (seed, epoch) and the block sizes:
//!
//! 1. the blocks are permuted (Fisher-Yates driven by `Rng(order, seed, epoch, 0)`);
//! 2. consecutive permuted blocks are grouped into *windows* of `window_blocks` blocks;
//! 3. the samples of each window are permuted (`Rng(order, seed, epoch, 1 + window)`).
//!
//! Concatenating the windows gives a permutation of all N samples. Only one window's rows are
//! held in memory at a time, which is what bounds the loader's memory independently of the
//! dataset size (the price: a sample can only meet samples of the same window in a batch;
//! larger windows mix more).
//!
//! Ranks (DistributedSampler semantics): with W ranks each gets `ceil(N / W)` samples
//! (`Pad::Wrap`: the permuted order is extended by repeating it from its start) or
//! `floor(N / W)` (`Pad::Drop`: the tail of the permuted order is dropped). Two ways to cut it
//! ([`Partition`]):
//! - `Strided` (default): rank r takes positions r, r+W, r+2W, ... as torch's
//!   DistributedSampler does. The i-th batch of B on every rank together are then exactly the
//!   i-th batch of W·B of a single process, so W ranks train like one process with W× the
//!   batch. Each rank reads every row group of the epoch (and decodes only its own samples).
//! - `Contiguous`: rank r takes positions [r·n, (r+1)·n): each rank reads only about 1/W of the
//!   row groups per epoch (less I/O for many ranks on shared storage), but a step's samples then
//!   depend on W.

use super::rng::{Rng, DOMAIN_ORDER};

/// How to make rank slices equal in length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pad {
    /// Repeat samples from the start of the epoch order (torch's default, `drop_last=False`).
    #[default]
    Wrap,
    /// Drop the tail of the epoch order (torch's `drop_last=True`).
    Drop,
}

/// Which slice of the order a rank reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankSlice {
    /// First position in the (padded) epoch order.
    pub start: u64,
    /// Number of positions.
    pub len: u64,
    /// Distance between consecutive positions (1: contiguous, W: strided).
    pub stride: u64,
}

/// How the epoch order is cut into rank slices (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Partition {
    /// Every W-th position (torch's DistributedSampler).
    #[default]
    Strided,
    /// One contiguous block per rank.
    Contiguous,
}

impl RankSlice {
    /// The strided slice of `rank` out of `world` ranks over `n` samples.
    pub fn new(n: u64, world: u64, rank: u64, pad: Pad) -> RankSlice {
        Self::with_partition(n, world, rank, pad, Partition::Strided)
    }

    /// The slice of `rank` out of `world` ranks over `n` samples.
    pub fn with_partition(
        n: u64,
        world: u64,
        rank: u64,
        pad: Pad,
        partition: Partition,
    ) -> RankSlice {
        assert!(
            world > 0 && rank < world,
            "rank {rank} out of world {world}"
        );
        let len = match pad {
            Pad::Wrap => n.div_ceil(world),
            Pad::Drop => n / world,
        };
        match partition {
            Partition::Strided => RankSlice {
                start: rank,
                len,
                stride: world,
            },
            Partition::Contiguous => RankSlice {
                start: rank * len,
                len,
                stride: 1,
            },
        }
    }

    /// The epoch-order position of this slice's `i`-th sample.
    pub fn position(&self, i: u64) -> u64 {
        self.start + i * self.stride
    }
}

/// Ordering parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderConfig {
    pub seed: u64,
    /// Off: samples in manifest order (evaluation).
    pub shuffle: bool,
    /// Blocks (row groups) per shuffle window; at least 1.
    pub window_blocks: usize,
}

/// One window: a run of permuted blocks whose samples are shuffled together.
#[derive(Debug, Clone)]
struct Window {
    /// Range into `EpochPlan::block_order`.
    first_block: usize,
    end_block: usize,
    /// First position of the window in the epoch order.
    start: u64,
    len: u64,
}

/// The order of one epoch over blocks of the given sizes.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    config: OrderConfig,
    epoch: u64,
    /// First global sample index of each block (manifest order), plus the total at the end.
    block_starts: Vec<u64>,
    /// Blocks in epoch order.
    block_order: Vec<usize>,
    windows: Vec<Window>,
}

/// A sample's location: block index (manifest order) and row within the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleRef {
    pub block: usize,
    pub row: u64,
}

impl EpochPlan {
    pub fn new(block_sizes: &[u64], config: OrderConfig, epoch: u64) -> EpochPlan {
        let mut block_starts = Vec::with_capacity(block_sizes.len() + 1);
        let mut acc = 0u64;
        for &s in block_sizes {
            block_starts.push(acc);
            acc += s;
        }
        block_starts.push(acc);
        let mut block_order: Vec<usize> = (0..block_sizes.len()).collect();
        if config.shuffle {
            let mut rng = Rng::for_sample(DOMAIN_ORDER, config.seed, epoch, 0);
            shuffle(&mut block_order, &mut rng);
        }
        let wb = config.window_blocks.max(1);
        let mut windows = Vec::new();
        let mut start = 0u64;
        let mut i = 0;
        while i < block_order.len() {
            let end = (i + wb).min(block_order.len());
            let len: u64 = block_order[i..end].iter().map(|&b| block_sizes[b]).sum();
            windows.push(Window {
                first_block: i,
                end_block: end,
                start,
                len,
            });
            start += len;
            i = end;
        }
        EpochPlan {
            config,
            epoch,
            block_starts,
            block_order,
            windows,
        }
    }

    /// Total number of samples N.
    pub fn len(&self) -> u64 {
        *self.block_starts.last().unwrap_or(&0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn num_windows(&self) -> usize {
        self.windows.len()
    }

    /// Which window holds (unpadded) position `pos`, and the offset inside it.
    pub fn locate(&self, pos: u64) -> (usize, u64) {
        let w = self.windows.partition_point(|w| w.start + w.len <= pos);
        (w, pos - self.windows[w].start)
    }

    /// Blocks (manifest indices) of a window, in epoch order.
    pub fn window_blocks(&self, window: usize) -> &[usize] {
        let w = &self.windows[window];
        &self.block_order[w.first_block..w.end_block]
    }

    /// The samples of a window in epoch order.
    pub fn window_samples(&self, window: usize) -> Vec<SampleRef> {
        let mut refs = Vec::with_capacity(self.windows[window].len as usize);
        for &b in self.window_blocks(window) {
            let rows = self.block_starts[b + 1] - self.block_starts[b];
            refs.extend((0..rows).map(|row| SampleRef { block: b, row }));
        }
        if self.config.shuffle {
            let mut rng = Rng::for_sample(
                DOMAIN_ORDER,
                self.config.seed,
                self.epoch,
                1 + window as u64,
            );
            shuffle(&mut refs, &mut rng);
        }
        refs
    }

    /// Global sample index (manifest order) of a sample reference.
    pub fn global_index(&self, r: SampleRef) -> u64 {
        self.block_starts[r.block] + r.row
    }

    /// The padded position `p` (any value below the padded length) as an unpadded position.
    pub fn unpad(&self, p: u64) -> u64 {
        p % self.len().max(1)
    }

    /// The whole epoch order as global indices (for tests and small datasets; O(N) memory).
    pub fn full_order(&self) -> Vec<u64> {
        (0..self.windows.len())
            .flat_map(|w| self.window_samples(w))
            .map(|r| self.global_index(r))
            .collect()
    }
}

/// Cursor over the positions of one rank's slice, materialising one window at a time.
#[derive(Debug)]
pub struct OrderCursor {
    plan: EpochPlan,
    slice: RankSlice,
    /// Positions of the slice already handed out.
    consumed: u64,
    cached_window: Option<(usize, Vec<SampleRef>)>,
}

/// One position of a rank's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Position inside the rank's slice (0-based; what `samples consumed` counts).
    pub rank_position: u64,
    /// Position in the padded epoch order (unique per epoch; keys the augmentation stream).
    pub epoch_position: u64,
    /// Window of the unpadded position.
    pub window: usize,
    pub sample: SampleRef,
    pub global_index: u64,
}

impl OrderCursor {
    pub fn new(plan: EpochPlan, slice: RankSlice, consumed: u64) -> OrderCursor {
        OrderCursor {
            plan,
            slice,
            consumed: consumed.min(slice.len),
            cached_window: None,
        }
    }

    pub fn plan(&self) -> &EpochPlan {
        &self.plan
    }

    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    pub fn remaining(&self) -> u64 {
        self.slice.len - self.consumed
    }

    /// The next position without consuming it.
    pub fn peek(&mut self) -> Option<Slot> {
        if self.consumed >= self.slice.len || self.plan.is_empty() {
            return None;
        }
        let epoch_position = self.slice.position(self.consumed);
        let pos = self.plan.unpad(epoch_position);
        let (window, offset) = self.plan.locate(pos);
        if self.cached_window.as_ref().map(|(w, _)| *w) != Some(window) {
            self.cached_window = Some((window, self.plan.window_samples(window)));
        }
        let sample = self.cached_window.as_ref().expect("window cached above").1[offset as usize];
        Some(Slot {
            rank_position: self.consumed,
            epoch_position,
            window,
            sample,
            global_index: self.plan.global_index(sample),
        })
    }
}

impl Iterator for OrderCursor {
    type Item = Slot;
    fn next(&mut self) -> Option<Slot> {
        let s = self.peek()?;
        self.consumed += 1;
        Some(s)
    }
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn cfg(seed: u64) -> OrderConfig {
        OrderConfig {
            seed,
            shuffle: true,
            window_blocks: 2,
        }
    }

    #[test]
    fn order_is_a_permutation_and_deterministic() {
        let sizes = [5u64, 7, 3, 9, 1];
        let a = EpochPlan::new(&sizes, cfg(1), 0).full_order();
        let b = EpochPlan::new(&sizes, cfg(1), 0).full_order();
        let c = EpochPlan::new(&sizes, cfg(1), 1).full_order();
        let d = EpochPlan::new(&sizes, cfg(2), 0).full_order();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..25).collect::<Vec<_>>());
    }

    #[test]
    fn unshuffled_is_manifest_order() {
        let sizes = [3u64, 4];
        let c = OrderConfig {
            seed: 0,
            shuffle: false,
            window_blocks: 1,
        };
        assert_eq!(
            EpochPlan::new(&sizes, c, 5).full_order(),
            (0..7).collect::<Vec<_>>()
        );
    }

    #[test]
    fn ranks_are_disjoint_equal_and_cover() {
        let sizes = [5u64, 7, 3, 9, 1, 4];
        let n: u64 = sizes.iter().sum();
        for (world, partition) in
            (1..=7u64).flat_map(|w| [(w, Partition::Strided), (w, Partition::Contiguous)])
        {
            for pad in [Pad::Wrap, Pad::Drop] {
                let plan = EpochPlan::new(&sizes, cfg(3), 2);
                let mut seen_pos = HashSet::new();
                let mut seen_samples = HashSet::new();
                let mut lens = vec![];
                for rank in 0..world {
                    let slice = RankSlice::with_partition(n, world, rank, pad, partition);
                    let slots: Vec<Slot> = OrderCursor::new(plan.clone(), slice, 0).collect();
                    lens.push(slots.len() as u64);
                    for s in &slots {
                        assert!(seen_pos.insert(s.epoch_position), "position reused");
                        seen_samples.insert(s.global_index);
                    }
                }
                assert!(lens.iter().all(|&l| l == lens[0]));
                match pad {
                    Pad::Wrap => {
                        assert_eq!(seen_samples.len() as u64, n, "wrap covers all");
                        assert_eq!(lens[0], n.div_ceil(world));
                    }
                    Pad::Drop => assert_eq!(lens[0] * world, (n / world) * world),
                }
            }
        }
    }

    #[test]
    fn disjoint_samples_without_padding_need() {
        // When W divides N, ranks see disjoint samples.
        let sizes = [6u64, 6];
        let plan = EpochPlan::new(&sizes, cfg(9), 0);
        let mut all = vec![];
        for rank in 0..3 {
            let slice = RankSlice::new(12, 3, rank, Pad::Wrap);
            all.extend(OrderCursor::new(plan.clone(), slice, 0).map(|s| s.global_index));
        }
        all.sort();
        assert_eq!(all, (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn resume_skips_exactly() {
        let sizes = [5u64, 7, 3, 9];
        let plan = EpochPlan::new(&sizes, cfg(4), 1);
        let slice = RankSlice::new(24, 2, 1, Pad::Wrap);
        let full: Vec<Slot> = OrderCursor::new(plan.clone(), slice, 0).collect();
        let resumed: Vec<Slot> = OrderCursor::new(plan, slice, 5).collect();
        assert_eq!(&full[5..], &resumed[..]);
    }

    #[test]
    fn strided_ranks_together_form_the_single_process_batches() {
        let sizes = [5u64, 7, 3, 9, 1, 4];
        let n: u64 = sizes.iter().sum();
        let plan = EpochPlan::new(&sizes, cfg(11), 4);
        let single: Vec<u64> =
            OrderCursor::new(plan.clone(), RankSlice::new(n, 1, 0, Pad::Drop), 0)
                .map(|s| s.global_index)
                .collect();
        let (world, b) = (3u64, 2usize);
        let ranks: Vec<Vec<u64>> = (0..world)
            .map(|r| {
                OrderCursor::new(plan.clone(), RankSlice::new(n, world, r, Pad::Drop), 0)
                    .map(|s| s.global_index)
                    .collect()
            })
            .collect();
        for step in 0..ranks[0].len() / b {
            let mut together: Vec<u64> = ranks
                .iter()
                .flat_map(|r| r[step * b..(step + 1) * b].iter().copied())
                .collect();
            let mut one =
                single[step * b * world as usize..(step + 1) * b * world as usize].to_vec();
            together.sort();
            one.sort();
            assert_eq!(together, one, "step {step}");
        }
    }
}
