//! `droppos-pipeline train`: DropPos pre-training from a recipe on sharded data.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use droppos_model::trainer::CheckpointStore;

use crate::config::Recipe;
use crate::train::device::Placement;
use crate::train::droppos_task::DropPosTask;
use crate::train::loader_source::LoaderSource;
use crate::train::metrics::{metrics_path, read_metrics};
use crate::train::run::{load_resume, train, Outcome, TrainContext, World};
use crate::train::signals::StopFlag;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Recipe file (TOML), e.g. configs/vit_base_16_200ep.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Override a recipe key: --set optim.blr=1e-4 --set train.epochs=10 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Folder of shards written by `droppos-pipeline shard` (holds the manifest); repeat the
    /// flag to train on several shard folders as one dataset (e.g. ImageNet + COCO images).
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Run folder: config.toml, metrics.jsonl, checkpoints/.
    #[arg(long)]
    pub output: PathBuf,
    /// Continue from the newest checkpoint in --output (starts fresh if there is none).
    #[arg(long)]
    pub resume: bool,
    /// Initial weights (safetensors with reference names, e.g. a converted PyTorch state_dict).
    #[arg(long, conflicts_with = "resume")]
    pub init: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let recipe = Recipe::load(&args.config, &args.set)?;
    let world = World::default();
    let run_dir = &args.output;
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let has_checkpoints = !CheckpointStore::new(run_dir).list()?.is_empty();
    if has_checkpoints && !args.resume {
        bail!(
            "{} already holds checkpoints; pass --resume to continue that run or choose another --output",
            run_dir.display()
        );
    }
    if world.rank == 0 {
        let path = run_dir.join("config.toml");
        let tmp = run_dir.join(".config.toml.tmp");
        std::fs::write(&tmp, recipe.to_toml())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    }

    let placement = Placement::resolve(&recipe.runtime, world.rank as usize)?;
    let stop = StopFlag::install()?;
    let mut task = DropPosTask::new(&recipe, placement.device)?;
    if let Some(init) = &args.init {
        task.load_weights(init)
            .with_context(|| format!("loading --init {}", init.display()))?;
        tracing::info!(weights = %init.display(), "initial weights loaded");
    }
    let resume = if args.resume {
        let state = load_resume(run_dir, &recipe, &mut task)?;
        if state.is_none() {
            tracing::info!("no checkpoint in {} yet; starting fresh", run_dir.display());
        }
        state
    } else {
        None
    };
    let mut source = LoaderSource::open(&args.data, &recipe, placement.device, world)?;
    let ctx = TrainContext {
        recipe: &recipe,
        run_dir,
        placement,
        world,
        stop,
        resume,
    };
    match train(ctx, &mut task, &mut source)? {
        Outcome::Finished { step } => {
            println!("finished at step {step}; run folder {}", run_dir.display());
            if world.rank == 0 {
                let positions = (recipe.model.img_size / recipe.model.patch_size).pow(2);
                print_accuracy_summary(run_dir, positions)?;
            }
        }
        Outcome::Interrupted { step, checkpoint } => {
            println!(
                "interrupted at step {step}; saved {}; continue with the same command plus --resume",
                checkpoint.map(|p| p.display().to_string()).unwrap_or_else(|| "nothing (not rank 0)".into())
            );
        }
    }
    Ok(())
}

/// Position accuracy at the start and the end of the run against chance (1/L): the quickest
/// sign that pre-training learns.
fn print_accuracy_summary(run_dir: &std::path::Path, positions: i64) -> Result<()> {
    let metrics = read_metrics(&metrics_path(run_dir))?;
    if metrics.is_empty() {
        return Ok(());
    }
    let window = (metrics.len() / 4).clamp(1, 50);
    let mean = |m: &[crate::train::metrics::StepMetrics]| {
        m.iter().map(|x| x.acc1).sum::<f64>() / m.len() as f64
    };
    let first = mean(&metrics[..window]);
    let last = mean(&metrics[metrics.len() - window..]);
    println!(
        "position accuracy (acc1): {first:.3} over the first {window} steps -> {last:.3} over the \
         last {window}; chance 1/{positions} = {:.4}",
        1.0 / positions as f64
    );
    Ok(())
}
