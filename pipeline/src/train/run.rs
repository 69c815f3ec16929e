//! The training loop: epochs of optimizer steps made of accumulated micro-batches, with
//! checkpoints, exact resume, metrics, a progress bar, and clean stops.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use droppos_model::schedule::{self, CosineSchedule};
use droppos_model::trainer::{Checkpoint, CheckpointStore, SampleNoise, TrainState};
use indicatif::{ProgressBar, ProgressStyle};

use super::collective::Collective;
use super::device::{memory_mib, Placement};
use super::metrics::{MetricsWriter, StepMetrics};
use super::signals::StopFlag;
use super::source::BatchSource;
use super::task::PretrainTask;
use crate::config::{BatchPlan, Recipe};

/// Process layout; single-process training is world 1, rank 0. Only rank 0 writes files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub size: u64,
    pub rank: u64,
}

impl Default for World {
    fn default() -> Self {
        Self { size: 1, rank: 0 }
    }
}

/// How a call to [`train`] ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All epochs (or `train.max_steps`) done.
    Finished { step: u64 },
    /// SIGINT/SIGTERM: state saved at `checkpoint`.
    Interrupted {
        step: u64,
        checkpoint: Option<PathBuf>,
    },
}

/// Learning rate at a fractional epoch: linear warmup, then half-cycle cosine to `min_lr` (the
/// model crate's schedule, i.e. the reference's `lr_sched.adjust_learning_rate`).
pub fn lr_at(epoch: f64, peak: f64, recipe: &Recipe) -> f64 {
    CosineSchedule {
        lr: peak,
        min_lr: recipe.optim.min_lr,
        warmup_epochs: recipe.optim.warmup_epochs,
        epochs: recipe.train.epochs as f64,
    }
    .lr_at(epoch)
}

/// σ for an epoch: σ0, decayed linearly per epoch when `sigma_decay` is on.
pub fn sigma_at(epoch: u64, recipe: &Recipe) -> f64 {
    let d = &recipe.droppos;
    schedule::sigma_at(
        d.sigma,
        d.sigma_decay,
        epoch as usize,
        recipe.train.epochs as usize,
    )
}

/// Everything the loop needs besides the task and the data.
pub struct TrainContext<'a> {
    pub recipe: &'a Recipe,
    pub run_dir: &'a Path,
    pub placement: Placement,
    /// The other ranks (or none); gives the world.
    pub collective: &'a mut Collective,
    pub stop: StopFlag,
    /// Resume from this state (from the newest checkpoint), or start fresh.
    pub resume: Option<TrainState>,
}

/// Geometry of an epoch in micro-batches and optimizer steps.
#[derive(Debug, Clone, Copy)]
struct EpochPlan {
    /// Micro-batches per epoch that belong to complete accumulation windows.
    micro_batches: u64,
    steps: u64,
}

fn epoch_plan(samples: u64, plan: &BatchPlan) -> Result<EpochPlan> {
    let micro = samples / plan.micro_batch;
    let steps = micro / plan.accum_iter;
    if steps == 0 {
        bail!(
            "the data has {samples} samples per rank, fewer than one optimizer step needs \
             ({} × {} accumulation); lower train.batch_size or train.accum_iter",
            plan.micro_batch,
            plan.accum_iter
        );
    }
    Ok(EpochPlan {
        micro_batches: steps * plan.accum_iter,
        steps,
    })
}

/// Runs (or resumes) training until all epochs are done, `max_steps` is reached, or a signal
/// arrives. A non-finite loss or gradient saves the last good state and returns an error.
pub fn train(
    ctx: TrainContext<'_>,
    task: &mut dyn PretrainTask,
    source: &mut dyn BatchSource,
) -> Result<Outcome> {
    let recipe = ctx.recipe;
    let world = ctx.collective.world();
    let plan = recipe.batch_plan(world.size)?;
    let ep = epoch_plan(source.samples_per_epoch(), &plan)?;
    let writer = world.rank == 0;
    let store = CheckpointStore::new(ctx.run_dir);
    let config_toml = recipe.to_toml();
    let keep = recipe.checkpoint.keep_last as usize;
    let total_steps = {
        let all = ep.steps * recipe.train.epochs;
        if recipe.train.max_steps > 0 {
            all.min(recipe.train.max_steps)
        } else {
            all
        }
    };

    let mut state = ctx.resume.clone().unwrap_or_else(|| TrainState {
        step: 0,
        epoch: 0,
        samples_in_epoch: 0,
        loader_position: None,
        world_size: world.size,
        rank: world.rank,
        reason: String::new(),
        last_loss: None,
        data: None,
    });
    let data = source.data_fingerprint();
    if let (Some(saved), Some(now)) = (&state.data, &data) {
        if saved != now {
            bail!(
                "the checkpoint was trained on other data (its shard folders' manifests list other \
                 shards or rows): --resume continues the same data exactly; to train these \
                 shards from its weights, start a new run with --init"
            );
        }
    }
    // Older checkpoints have no record of their data: from now on they do.
    state.data = state.data.take().or(data);
    if state.world_size != world.size {
        bail!(
            "the checkpoint was written by a world of {} processes, this run has {}; exact resume \
             needs the same world size",
            state.world_size,
            world.size
        );
    }
    // Rank 0 wrote the checkpoint; the position is the same on every rank.
    state.rank = world.rank;
    let samples_per_step = plan.micro_batch * plan.accum_iter;
    if !state.samples_in_epoch.is_multiple_of(samples_per_step) {
        bail!(
            "checkpoint position ({} samples into epoch {}) is not on an optimizer-step boundary of \
             {samples_per_step} samples; was train.batch_size or accum_iter changed?",
            state.samples_in_epoch,
            state.epoch
        );
    }
    // The position must be one this data and batch plan produce: an edited or corrupted
    // state.json (a step of u64::MAX wrapped to 0 and lost the run's newest checkpoints).
    let expected_step = state
        .epoch
        .checked_mul(ep.steps)
        .and_then(|s| s.checked_add(state.samples_in_epoch / samples_per_step));
    if ctx.resume.is_some()
        && (state.samples_in_epoch / samples_per_step > ep.steps
            || expected_step != Some(state.step))
    {
        bail!(
            "the checkpoint's position is inconsistent: step {} at epoch {} + {} samples, while \
             this data gives {} steps of {samples_per_step} samples per epoch; was its state.json \
             edited?",
            state.step,
            state.epoch,
            state.samples_in_epoch,
            ep.steps
        );
    }
    // Undecodable samples skipped since the last metrics line (all ranks).
    let mut skipped_since_line = 0u64;
    let mut metrics = if writer {
        Some(MetricsWriter::open(ctx.run_dir, state.step)?)
    } else {
        None
    };

    let save =
        |state: &TrainState, task: &dyn PretrainTask, reason: &str| -> Result<Option<PathBuf>> {
            if !writer {
                return Ok(None);
            }
            let mut s = state.clone();
            s.reason = reason.to_string();
            let ckpt = Checkpoint {
                model: task.model_tensors(),
                optimizer: task.optimizer_tensors(),
                state: s,
                config_toml: config_toml.clone(),
                model_metadata: task.model_metadata(),
            };
            let path = store.save(&ckpt, keep).context("writing a checkpoint")?;
            tracing::debug!(path = %path.display(), reason, "checkpoint written");
            Ok(Some(path))
        };

    let bar = progress_bar(recipe.runtime.progress && writer, total_steps, state.step);
    tracing::info!(
        device = %ctx.placement.describe(),
        global_batch = plan.global_batch,
        micro_batch = plan.micro_batch,
        accum_iter = plan.accum_iter,
        world_size = plan.world_size,
        lr = plan.lr,
        steps_per_epoch = ep.steps,
        total_steps,
        start_step = state.step,
        "training"
    );

    let images_per_step = (plan.global_batch) as f64;
    while state.epoch < recipe.train.epochs {
        let sigma = sigma_at(state.epoch, recipe);
        let resume_at = state.loader_position.unwrap_or(state.samples_in_epoch);
        source
            .start_epoch(state.epoch, resume_at)
            .with_context(|| format!("starting epoch {}", state.epoch))?;
        let mut ended_early = false;
        let mut micro_index = state.samples_in_epoch / plan.micro_batch;
        while micro_index < ep.micro_batches {
            if recipe.train.max_steps > 0 && state.step >= recipe.train.max_steps {
                bar.finish_and_clear();
                save(&state, task, "final")?;
                return Ok(Outcome::Finished { step: state.step });
            }
            if ctx.collective.any(ctx.stop.is_raised())? {
                bar.finish_and_clear();
                let path = save(&state, task, "interrupted")?;
                tracing::warn!(
                    step = state.step,
                    checkpoint = %path.as_deref().map_or("none".into(), |p| p.display().to_string()),
                    "stopped by signal; continue with --resume"
                );
                return Ok(Outcome::Interrupted {
                    step: state.step,
                    checkpoint: path,
                });
            }
            // The reference sets the lr at each window's first micro-batch from the fractional epoch.
            let lr = lr_at(
                state.epoch as f64 + micro_index as f64 / ep.micro_batches as f64,
                plan.lr,
                recipe,
            );
            let good = state.clone();
            let started = Instant::now();
            let (mut loss_sum, mut acc_sum) = (0.0, 0.0);
            let mut position = state.loader_position;
            for micro in 0..plan.accum_iter {
                // Undecodable samples skipped by the loader shorten a rank's slice: when any rank
                // runs out, every rank ends the epoch here (a partial window is not stepped), so
                // that all of them take the same steps.
                let next = source.next_batch()?;
                if ctx.collective.any(next.is_none())? {
                    task.zero_grad();
                    ended_early = true;
                    break;
                }
                let batch = next.expect("checked by the agreement above");
                position = Some(batch.consumed);
                let noise = SampleNoise::new(recipe.train.seed, state.epoch, batch.epoch_positions);
                let fwd = ctx
                    .placement
                    .autocast(|| task.forward(&batch.images, &noise, sigma))?;
                // Every rank sees the mean over ranks, so all of them stop on a non-finite loss.
                let (loss, acc1, micro_skipped) = ctx.collective.reduce_metrics(
                    fwd.loss.double_value(&[]),
                    fwd.acc1,
                    batch.skipped,
                )?;
                skipped_since_line += micro_skipped;
                if !loss.is_finite() {
                    bar.abandon();
                    task.zero_grad();
                    let path = save(&good, task, "non_finite")?;
                    bail!(
                        "loss is {loss} at step {} (epoch {}); stopped. {}",
                        state.step + 1,
                        state.epoch,
                        last_good_advice(path.as_deref())
                    );
                }
                let last = micro + 1 == plan.accum_iter;
                ctx.collective
                    .backward(&(fwd.loss / plan.accum_iter as f64), last)?;
                loss_sum += loss;
                acc_sum += acc1;
                micro_index += 1;
            }
            if ended_early {
                tracing::warn!(
                    epoch = state.epoch,
                    step = state.step,
                    planned_steps = ep.steps,
                    "the loader's epoch ended early (samples skipped as undecodable); next epoch"
                );
                break;
            }
            if !task.optimizer_step(lr)? {
                // Gradients reach every rank averaged, so all ranks stop here together.
                bar.abandon();
                let path = save(&good, task, "non_finite")?;
                bail!(
                    "the gradients are not finite at step {} (epoch {}, loss {:.6}); stopped \
                     without applying them. {}",
                    state.step + 1,
                    state.epoch,
                    loss_sum / plan.accum_iter as f64,
                    last_good_advice(path.as_deref())
                );
            }
            let dt = started.elapsed().as_secs_f64();
            state.step += 1;
            state.samples_in_epoch += samples_per_step;
            state.loader_position = position;
            let step_loss = loss_sum / plan.accum_iter as f64;
            state.last_loss = Some(step_loss);
            let acc1 = acc_sum / plan.accum_iter as f64;
            if let Some(m) = metrics.as_mut() {
                if state.step.is_multiple_of(recipe.runtime.log_every) || state.step == 1 {
                    m.write(&StepMetrics {
                        step: state.step,
                        epoch: state.epoch as f64 + micro_index as f64 / ep.micro_batches as f64,
                        loss: step_loss,
                        acc1,
                        lr,
                        sigma: Some(sigma),
                        images_per_s: images_per_step / dt,
                        step_time_s: dt,
                        device_mem_mib: memory_mib(ctx.placement.device),
                        skipped_samples: std::mem::take(&mut skipped_since_line),
                    })?;
                }
            }
            bar.set_position(state.step);
            bar.set_message(format!(
                "epoch {} loss {:.4} acc1 {:.3} lr {:.2e} {:.0} img/s",
                state.epoch,
                step_loss,
                acc1,
                lr,
                images_per_step / dt
            ));
            let every = recipe.checkpoint.every_steps;
            if every > 0 && state.step.is_multiple_of(every) {
                save(&state, task, "interval")?;
            }
        }
        // Micro-batches beyond the last full window are not used (drop_last semantics).
        state.epoch += 1;
        state.samples_in_epoch = 0;
        state.loader_position = None;
        // Tiny epochs (the demo's are 2 steps) would flood the log; the bar shows progress.
        if ep.steps >= 10 {
            tracing::info!(
                epoch = state.epoch,
                step = state.step,
                loss = state.last_loss,
                "epoch done"
            );
        } else {
            tracing::debug!(
                epoch = state.epoch,
                step = state.step,
                loss = state.last_loss,
                "epoch done"
            );
        }
        let last = state.epoch == recipe.train.epochs;
        if recipe.checkpoint.every_epoch || last {
            save(&state, task, if last { "final" } else { "epoch_end" })?;
        }
    }
    bar.finish_and_clear();
    Ok(Outcome::Finished { step: state.step })
}

fn progress_bar(show: bool, total: u64, at: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = crate::progress::bar(Some(total));
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps (eta {eta}) {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(at);
    bar
}

/// Reads the newest checkpoint of a run for `--resume`, checking it is compatible with `recipe`.
pub fn load_resume(
    run_dir: &Path,
    recipe: &Recipe,
    task: &mut dyn PretrainTask,
) -> Result<Option<TrainState>> {
    let store = CheckpointStore::new(run_dir);
    let Some(dir) = store.latest()? else {
        return Ok(None);
    };
    let ckpt = CheckpointStore::load(&dir)?;
    let saved = Recipe::parse(&ckpt.config_toml, &[])
        .with_context(|| format!("the recipe stored in {}", dir.display()))?;
    check_resumable(&saved, recipe)?;
    task.load(&ckpt.model, &ckpt.optimizer)
        .with_context(|| format!("loading {}", dir.display()))?;
    tracing::info!(checkpoint = %dir.display(), step = ckpt.state.step, epoch = ckpt.state.epoch, "resuming");
    Ok(Some(ckpt.state))
}

/// A resumed run may change how long it runs and how it logs, not what it computes.
fn check_resumable(saved: &Recipe, now: &Recipe) -> Result<()> {
    let mut diffs = Vec::new();
    if saved.model != now.model {
        diffs.push("model");
    }
    if saved.droppos != now.droppos {
        diffs.push("droppos");
    }
    if saved.optim != now.optim {
        diffs.push("optim");
    }
    if saved.data != now.data {
        diffs.push("data");
    }
    let (a, b) = (&saved.train, &now.train);
    if (a.batch_size, a.accum_iter, a.global_batch, a.seed)
        != (b.batch_size, b.accum_iter, b.global_batch, b.seed)
    {
        diffs.push("train (batch geometry or seed)");
    }
    if !diffs.is_empty() {
        bail!(
            "the recipe differs from the checkpoint's in: {}; resume with the same settings (only \
             train.epochs, train.max_steps, checkpoint.* and runtime.* may change)",
            diffs.join(", ")
        );
    }
    if a.epochs != b.epochs {
        tracing::warn!(
            from = a.epochs,
            to = b.epochs,
            "train.epochs changed on resume: the lr and σ schedules change too"
        );
    }
    Ok(())
}

/// What a non-finite stop says about the checkpoint it saved and how to go on from it.
fn last_good_advice(saved: Option<&Path>) -> String {
    let at = saved
        .map(|p| format!(" at {}", p.display()))
        .unwrap_or_default();
    format!(
        "The last good state (before this step) is saved{at}. Lower optim.blr or raise \
         optim.warmup_epochs and start a new run from it with --init (--resume keeps the \
         recipe it was saved with), or check the data."
    )
}
