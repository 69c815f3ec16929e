//! Loop tests with a small stand-in task (a linear layer with momentum SGD whose target depends on
//! the masking noise) and a synthetic, epoch-deterministic source: they pin the checkpoint /
//! resume / stop / non-finite behaviour independently of the DropPos model.

use std::path::Path;

use anyhow::Result;
use droppos_model::trainer::{CheckpointStore, SampleNoise};
use tch::{Device, Kind, Tensor};

use super::collective::Collective;
use super::device::Placement;
use super::metrics::{metrics_path, read_metrics};
use super::run::{load_resume, lr_at, sigma_at, train, Outcome, TrainContext};
use super::signals::StopFlag;
use super::source::{BatchSource, SourceBatch};
use super::task::{Forward, PretrainTask};
use crate::config::Recipe;

struct ToyTask {
    w: Tensor,
    momentum: Tensor,
    /// Forward number at which the loss becomes NaN (to test the non-finite stop).
    nan_at: Option<u64>,
    /// Forward number whose loss stays finite but whose gradient is NaN.
    nan_grad_at: Option<u64>,
    forwards: u64,
}

impl ToyTask {
    fn new() -> Self {
        tch::manual_seed(0);
        let w = (Tensor::randn([12, 4], (Kind::Float, Device::Cpu)) * 0.1).set_requires_grad(true);
        Self {
            momentum: w.zeros_like(),
            w,
            nan_at: None,
            nan_grad_at: None,
            forwards: 0,
        }
    }
}

impl PretrainTask for ToyTask {
    fn forward(&mut self, images: &Tensor, noise: &SampleNoise, sigma: f64) -> Result<Forward> {
        self.forwards += 1;
        let b = images.size()[0];
        let x = images.reshape([b, -1]);
        let target = noise.uniform(0, 4, Device::Cpu) * sigma;
        let pred = x.matmul(&self.w);
        let mut loss = (pred - &target).square().mean(Kind::Float);
        if self.nan_at == Some(self.forwards) {
            loss *= f64::NAN;
        }
        if self.nan_grad_at == Some(self.forwards) {
            // sqrt(|0 · Σw|) adds 0 to the loss, and 0 · ∞ = NaN to every weight's gradient.
            loss += (self.w.sum(Kind::Float) * 0.0).abs().sqrt();
        }
        Ok(Forward {
            acc1: 1.0 / (1.0 + loss.double_value(&[])),
            loss,
        })
    }

    fn optimizer_step(&mut self, lr: f64) -> Result<bool> {
        if !bool::try_from(self.w.grad().isfinite().all())? {
            self.zero_grad();
            return Ok(false);
        }
        tch::no_grad(|| {
            let g = self.w.grad();
            let m = &self.momentum * 0.9 + &g;
            self.momentum.copy_(&m);
            let _ = self.w.f_sub_(&(m * lr)).unwrap();
        });
        self.zero_grad();
        Ok(true)
    }

    fn zero_grad(&mut self) {
        let mut g = self.w.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }

    fn trainable_parameters(&self) -> Vec<Tensor> {
        vec![self.w.shallow_clone()]
    }

    fn model_tensors(&self) -> Vec<(String, Tensor)> {
        vec![("head.weight".into(), self.w.shallow_clone())]
    }

    fn optimizer_tensors(&self) -> Vec<(String, Tensor)> {
        vec![("head.weight.momentum".into(), self.momentum.shallow_clone())]
    }

    fn load(&mut self, model: &[(String, Tensor)], optimizer: &[(String, Tensor)]) -> Result<()> {
        tch::no_grad(|| {
            self.w.copy_(&model[0].1);
            self.momentum.copy_(&optimizer[0].1);
        });
        Ok(())
    }
}

/// 20 samples of [3,side,side] images; epoch e's content derives from (e, index) only.
pub(crate) struct ToySource {
    pub epoch: u64,
    pub next: u64,
    pub batch: i64,
    pub side: i64,
    /// Positions the source treats as undecodable (skipped, as the loader does).
    pub skip: Vec<u64>,
}

impl BatchSource for ToySource {
    fn samples_per_epoch(&self) -> u64 {
        20
    }

    fn data_fingerprint(&self) -> Option<String> {
        // Samples it cannot decode make it other data, as other shards would.
        Some(format!("toy, undecodable at {:?}", self.skip))
    }

    fn start_epoch(&mut self, epoch: u64, samples_consumed: u64) -> Result<()> {
        self.epoch = epoch;
        self.next = samples_consumed;
        Ok(())
    }

    fn next_batch(&mut self) -> Result<Option<SourceBatch>> {
        let mut epoch_positions = Vec::new();
        let mut at = self.next;
        while epoch_positions.len() < self.batch as usize && at < self.samples_per_epoch() {
            if !self.skip.contains(&at) {
                epoch_positions.push(at);
            }
            at += 1;
        }
        if epoch_positions.len() < self.batch as usize {
            return Ok(None);
        }
        // Images: noise keyed by (epoch, position) in another seed, so they are deterministic.
        let pixels = 3 * self.side * self.side;
        let images = SampleNoise::new(99, self.epoch, epoch_positions.clone())
            .uniform(0, pixels, Device::Cpu)
            .reshape([self.batch, 3, self.side, self.side]);
        let skipped = at - self.next - epoch_positions.len() as u64;
        self.next = at;
        Ok(Some(SourceBatch {
            images,
            epoch_positions,
            consumed: self.next,
            skipped,
        }))
    }
}

fn recipe(overrides: &[&str]) -> Recipe {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-cpu.toml"),
    )
    .unwrap();
    let mut o: Vec<String> = [
        "train.epochs=3",
        "train.batch_size=4",
        "train.accum_iter=2",
        "optim.warmup_epochs=1",
        "optim.blr=0.5",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=2",
        "runtime.progress=false",
        "runtime.device=cpu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    o.extend(overrides.iter().map(|s| s.to_string()));
    Recipe::parse(&text, &o).unwrap()
}

fn run(
    dir: &Path,
    recipe: &Recipe,
    resume: bool,
    stop: StopFlag,
    task: &mut ToyTask,
) -> Result<Outcome> {
    run_skipping(dir, recipe, resume, stop, task, &[])
}

/// [`run`] over a source whose `skip` positions are undecodable.
fn run_skipping(
    dir: &Path,
    recipe: &Recipe,
    resume: bool,
    stop: StopFlag,
    task: &mut ToyTask,
    skip: &[u64],
) -> Result<Outcome> {
    let state = if resume {
        load_resume(dir, recipe, task)?
    } else {
        None
    };
    let mut source = ToySource {
        epoch: 0,
        next: 0,
        batch: recipe.train.batch_size as i64,
        side: 2,
        skip: skip.to_vec(),
    };
    let ctx = TrainContext {
        recipe,
        run_dir: dir,
        placement: Placement {
            device: Device::Cpu,
            bf16_autocast: false,
        },
        collective: &mut Collective::Local,
        stop,
        resume: state,
    };
    train(ctx, task, &mut source)
}

/// A run with a fresh toy task and no signal, which must succeed.
fn fresh_run(dir: &Path, recipe: &Recipe, resume: bool) -> Outcome {
    run(
        dir,
        recipe,
        resume,
        StopFlag::default(),
        &mut ToyTask::new(),
    )
    .unwrap()
}

fn losses(dir: &Path) -> Vec<(u64, u64)> {
    // Bit patterns: the comparison is exact, not within a tolerance.
    read_metrics(&metrics_path(dir))
        .unwrap()
        .iter()
        .map(|m| (m.step, m.loss.to_bits()))
        .collect()
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let _rng = crate::torch_rng_lock();
    let full = tempfile::tempdir().unwrap();
    let r = recipe(&[]);
    // 20 samples / (4 × 2) = 2 steps per epoch (4 samples dropped), 3 epochs.
    assert_eq!(
        run(
            full.path(),
            &r,
            false,
            StopFlag::default(),
            &mut ToyTask::new()
        )
        .unwrap(),
        Outcome::Finished { step: 6 }
    );
    let reference = losses(full.path());
    assert_eq!(reference.len(), 6);

    // Stop mid-epoch (step 3 is inside epoch 1), resume in a new task with fresh weights.
    let split = tempfile::tempdir().unwrap();
    let first = recipe(&["train.max_steps=3"]);
    assert_eq!(
        run(
            split.path(),
            &first,
            false,
            StopFlag::default(),
            &mut ToyTask::new()
        )
        .unwrap(),
        Outcome::Finished { step: 3 }
    );
    let mut fresh = ToyTask::new();
    assert_eq!(
        run(split.path(), &r, true, StopFlag::default(), &mut fresh).unwrap(),
        Outcome::Finished { step: 6 }
    );
    assert_eq!(losses(split.path()), reference);

    // Final weights agree bit for bit too.
    let a = CheckpointStore::load(&CheckpointStore::new(full.path()).latest().unwrap().unwrap())
        .unwrap();
    let b = CheckpointStore::load(
        &CheckpointStore::new(split.path())
            .latest()
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(a.state.step, 6);
    assert_eq!(a.state, b.state);
    assert!(a.model[0].1.equal(&b.model[0].1));
    assert!(a.optimizer[0].1.equal(&b.optimizer[0].1));
    // keep_last = 2.
    assert_eq!(CheckpointStore::new(full.path()).list().unwrap().len(), 2);
}

#[test]
fn skipped_samples_keep_resume_exact_and_a_short_epoch_ends_cleanly() {
    let _rng = crate::torch_rng_lock();
    let skip_run = |dir: &Path, r: &Recipe, resume: bool, skip: &[u64]| {
        run_skipping(
            dir,
            r,
            resume,
            StopFlag::default(),
            &mut ToyTask::new(),
            skip,
        )
        .unwrap()
    };
    let r = recipe(&[]);
    // Positions 1 and 6 undecodable: each epoch's first step consumes 9 positions, not 8, so
    // the resume point is the loader's position, not steps × batch.
    let skip = [1, 6];
    let full = tempfile::tempdir().unwrap();
    assert_eq!(
        skip_run(full.path(), &r, false, &skip),
        Outcome::Finished { step: 6 }
    );
    let split = tempfile::tempdir().unwrap();
    let first = recipe(&["train.max_steps=3"]);
    assert_eq!(
        skip_run(split.path(), &first, false, &skip),
        Outcome::Finished { step: 3 }
    );
    let latest = CheckpointStore::new(split.path())
        .latest()
        .unwrap()
        .unwrap();
    let state = CheckpointStore::load(&latest).unwrap().state;
    assert_eq!(
        (state.samples_in_epoch, state.loader_position),
        (8, Some(10))
    );
    assert_eq!(
        skip_run(split.path(), &r, true, &skip),
        Outcome::Finished { step: 6 }
    );
    assert_eq!(losses(split.path()), losses(full.path()));
    // Each epoch's first step skipped both positions, and the metrics say so.
    let skipped: Vec<u64> = read_metrics(&metrics_path(full.path()))
        .unwrap()
        .iter()
        .map(|m| m.skipped_samples)
        .collect();
    assert_eq!(skipped, [2, 0, 2, 0, 2, 0]);

    // Five undecodable positions leave 15 samples: one full step of 8, then the loader runs
    // out inside the second window; the epoch ends there instead of failing the run.
    let short = tempfile::tempdir().unwrap();
    assert_eq!(
        skip_run(short.path(), &r, false, &[1, 5, 9, 13, 17]),
        Outcome::Finished { step: 3 }
    );
    assert_eq!(losses(short.path()).len(), 3);
}

#[test]
fn a_signal_saves_and_resume_continues_exactly() {
    let _rng = crate::torch_rng_lock();
    let full = tempfile::tempdir().unwrap();
    let r = recipe(&["checkpoint.every_steps=0", "checkpoint.every_epoch=false"]);
    fresh_run(full.path(), &r, false);

    let split = tempfile::tempdir().unwrap();
    let stop = StopFlag::default();
    stop.raise();
    // Raised before the first step: the checkpoint holds the initial state.
    let out = run(split.path(), &r, false, stop, &mut ToyTask::new()).unwrap();
    let Outcome::Interrupted {
        step: 0,
        checkpoint: Some(path),
    } = out.clone()
    else {
        panic!("{out:?}")
    };
    assert_eq!(
        CheckpointStore::load(&path).unwrap().state.reason,
        "interrupted"
    );
    fresh_run(split.path(), &r, true);
    assert_eq!(losses(split.path()), losses(full.path()));
}

/// Runs the toy task with `poison` set up to spoil step 3 (forward 6 is its second
/// micro-batch); returns the error and the run folder, after checking that the saved state is
/// step 2's (`non_finite`) and that resuming from it replays step 3 exactly as an uninterrupted
/// run would.
fn stops_at_step_3(poison: impl FnOnce(&mut ToyTask)) -> (String, ToyTask) {
    let _rng = crate::torch_rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(&["checkpoint.every_steps=0"]);
    let mut task = ToyTask::new();
    poison(&mut task);
    let err = format!(
        "{:#}",
        run(dir.path(), &r, false, StopFlag::default(), &mut task).unwrap_err()
    );
    let store = CheckpointStore::new(dir.path());
    let ckpt = CheckpointStore::load(&store.latest().unwrap().unwrap()).unwrap();
    assert_eq!(
        (
            ckpt.state.step,
            ckpt.state.epoch,
            ckpt.state.samples_in_epoch
        ),
        (2, 1, 0)
    );
    assert_eq!(ckpt.state.reason, "non_finite");
    fresh_run(dir.path(), &r, true);
    let full = tempfile::tempdir().unwrap();
    fresh_run(full.path(), &r, false);
    assert_eq!(losses(dir.path()), losses(full.path()));
    (err, task)
}

/// A finite loss whose gradients are not finite (an overflow in the backward pass) stops before
/// the update: the saved state is the last good one, with finite weights.
#[test]
fn non_finite_gradients_stop_before_the_update() {
    let (err, task) = stops_at_step_3(|t| t.nan_grad_at = Some(6));
    assert!(
        err.contains("gradients are not finite at step 3") && err.contains("--init"),
        "{err}"
    );
    assert!(bool::try_from(task.w.isfinite().all()).unwrap());
}

#[test]
fn a_non_finite_loss_stops_with_the_last_good_state() {
    let (err, _) = stops_at_step_3(|t| t.nan_at = Some(6));
    assert!(
        err.contains("loss is NaN at step 3") && err.contains("last good state"),
        "{err}"
    );
}

#[test]
fn resume_refuses_other_data() {
    let _rng = crate::torch_rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(&["train.max_steps=2"]);
    fresh_run(dir.path(), &r, false);
    let err = format!(
        "{:#}",
        run_skipping(
            dir.path(),
            &recipe(&[]),
            true,
            StopFlag::default(),
            &mut ToyTask::new(),
            &[3]
        )
        .unwrap_err()
    );
    assert!(
        err.contains("other data") && err.contains("--init"),
        "{err}"
    );
    // The same data resumes.
    fresh_run(dir.path(), &recipe(&[]), true);
}

#[test]
fn resume_refuses_a_different_recipe() {
    let _rng = crate::torch_rng_lock();
    let dir = tempfile::tempdir().unwrap();
    fresh_run(dir.path(), &recipe(&["train.max_steps=1"]), false);
    let err = format!(
        "{:#}",
        run(
            dir.path(),
            &recipe(&["optim.blr=0.1"]),
            true,
            StopFlag::default(),
            &mut ToyTask::new()
        )
        .unwrap_err()
    );
    assert!(err.contains("differs") && err.contains("optim"), "{err}");
}

#[test]
fn metrics_lines_carry_every_field() {
    let _rng = crate::torch_rng_lock();
    let dir = tempfile::tempdir().unwrap();
    fresh_run(dir.path(), &recipe(&[]), false);
    let m = read_metrics(&metrics_path(dir.path())).unwrap();
    assert_eq!(m.len(), 6);
    let r = recipe(&[]);
    let peak = r.batch_plan(1).unwrap().lr;
    for (i, line) in m.iter().enumerate() {
        assert_eq!(line.step, i as u64 + 1);
        assert!(line.loss.is_finite() && (0.0..=1.0).contains(&line.acc1));
        assert!(line.images_per_s > 0.0 && line.step_time_s > 0.0 && line.device_mem_mib > 0.0);
        // Step i starts at epoch (i / 2) + (i % 2) / 2.
        let epoch = (i / 2) as f64 + (i % 2) as f64 * 0.5;
        assert_eq!(line.lr, lr_at(epoch, peak, &r));
        assert_eq!(line.sigma, Some(sigma_at((i / 2) as u64, &r)));
    }
    assert_eq!(m[0].lr, 0.0); // warmup starts at 0 as in the reference
    assert_eq!(m.last().unwrap().epoch, 3.0);
}

#[test]
fn schedules_follow_the_reference() {
    let r = recipe(&[
        "train.epochs=10",
        "optim.warmup_epochs=2",
        "optim.min_lr=0.001",
    ]);
    assert_eq!(lr_at(0.0, 1.0, &r), 0.0);
    assert_eq!(lr_at(1.0, 1.0, &r), 0.5);
    assert_eq!(lr_at(2.0, 1.0, &r), 1.0);
    assert!((lr_at(6.0, 1.0, &r) - (0.001 + 0.999 * 0.5)).abs() < 1e-12);
    assert!((lr_at(10.0, 1.0, &r) - 0.001).abs() < 1e-12);
    assert_eq!(sigma_at(0, &r), 1.0);
    assert!((sigma_at(5, &r) - 0.5).abs() < 1e-12);
    let r = recipe(&["droppos.sigma_decay=false"]);
    assert_eq!(sigma_at(2, &r), 1.0);
}
