//! `droppos-pipeline train`: DropPos pre-training from a recipe on sharded data.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use droppos_model::distributed::{
    self, Backend, GradSync, GradSyncOptions, GroupOptions, LaunchSpec, ProcessGroup, Rendezvous,
};
use droppos_model::trainer::CheckpointStore;

use crate::config::Recipe;
use crate::train::collective::Collective;
use crate::train::device::Placement;
use crate::train::droppos_task::DropPosTask;
use crate::train::loader_source::LoaderSource;
use crate::train::metrics::{metrics_path, read_metrics};
use crate::train::run::{load_resume, train, Outcome, TrainContext};
use crate::train::signals::StopFlag;
use crate::train::task::PretrainTask;

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
    /// Start N ranks on this machine (one per GPU, or CPU processes with Gloo), like
    /// `torchrun --nproc-per-node N`. Under torchrun or Slurm (`srun`), leave it out: the ranks
    /// are read from RANK/WORLD_SIZE/... or SLURM_PROCID/SLURM_NTASKS/...
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Communication backend: gloo or nccl (default: nccl on CUDA, gloo on CPU).
    #[arg(long, value_enum)]
    pub dist_backend: Option<DistBackend>,
    /// Seconds a rank waits for its peers (joining, and every collective) before failing with
    /// an error instead of hanging.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub dist_timeout: u64,
    /// Gradient averaging: reducer (DDP's bucketed all-reduce overlapped with backward) or flat
    /// (all-reduce of flat buckets after backward).
    #[arg(long, default_value = "reducer")]
    pub grad_sync: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DistBackend {
    Gloo,
    Nccl,
}

pub fn run(args: Args) -> Result<()> {
    let recipe = Recipe::load(&args.config, &args.set)?;
    let run_dir = &args.output;
    let has_checkpoints = !CheckpointStore::new(run_dir).list()?.is_empty();
    if has_checkpoints && !args.resume {
        bail!(
            "{} already holds checkpoints; pass --resume to continue that run or choose another --output",
            run_dir.display()
        );
    }
    if let Some(n) = args.nproc_per_node {
        if !distributed::is_launched_child() {
            return launch(n, args.dist_timeout);
        }
    }

    // Under a launcher (ours, torchrun, Slurm): this rank's place in the job.
    let rendezvous = Rendezvous::from_env().context("reading the launcher's environment")?;
    let local_rank = rendezvous.as_ref().map_or(0, |r| r.local_rank);
    let placement = Placement::resolve(&recipe.runtime, local_rank)?;
    let stop = StopFlag::install()?;
    let mut task = DropPosTask::new(&recipe, placement.device)?;
    if let Some(init) = &args.init {
        task.load_weights(init)
            .with_context(|| format!("loading --init {}", init.display()))?;
        tracing::info!(weights = %init.display(), "initial weights loaded");
    }
    let mut collective = match rendezvous {
        None => Collective::Local,
        Some(r) => {
            let options = GroupOptions {
                backend: args.dist_backend.map(|b| match b {
                    DistBackend::Gloo => Backend::Gloo,
                    DistBackend::Nccl => Backend::Nccl,
                }),
                timeout: Duration::from_secs(args.dist_timeout),
                device: placement.device,
                ..GroupOptions::default()
            };
            let (rank, size) = (r.rank, r.world_size);
            let group = ProcessGroup::new(r, &options)
                .with_context(|| format!("joining the process group as rank {rank}/{size}"))?;
            let grads = GradSync::new(
                &group,
                &task.trainable_parameters(),
                &GradSyncOptions {
                    mode: args.grad_sync.parse()?,
                    ..GradSyncOptions::default()
                },
            )
            .context("setting up gradient averaging")?;
            Collective::Group {
                group,
                grads,
                device: placement.device,
            }
        }
    };
    let world = collective.world();
    // The data first: a wrong --data fails before anything is written into the run folder.
    let mut source = LoaderSource::open(&args.data, &recipe, placement.device, world)?;
    // Rank 0 writes the folder: it alone holds the lock, for the whole run.
    let _lock = if world.rank == 0 {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        crate::train::run_lock::lock_run_dir(run_dir)?
    } else {
        None
    };
    if world.rank == 0 {
        let path = run_dir.join("config.toml");
        let tmp = run_dir.join(".config.toml.tmp");
        std::fs::write(&tmp, recipe.to_toml())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
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
    // Handles to the parameters themselves (the optimizer updates them in place): every rank
    // starts from rank 0's values, as under DDP, and they are compared again at the end.
    let weights: Vec<_> = task.model_tensors().into_iter().map(|(_, t)| t).collect();
    collective.broadcast_weights(&weights)?;
    let ctx = TrainContext {
        recipe: &recipe,
        run_dir,
        placement,
        collective: &mut collective,
        stop,
        resume,
    };
    match train(ctx, &mut task, &mut source)? {
        Outcome::Finished { step } => {
            let (sum, _) = collective.check_in_sync(&weights)?;
            if world.rank == 0 {
                println!("finished at step {step}; run folder {}", run_dir.display());
                if world.size > 1 {
                    println!(
                        "weights identical on all {} ranks (checksum {sum:.9e})",
                        world.size
                    );
                }
                print_accuracy_summary(run_dir, recipe.num_patches())?;
            }
        }
        Outcome::Interrupted { step, checkpoint } => {
            if world.rank == 0 {
                println!(
                    "interrupted at step {step}; saved {}; continue with the same command plus --resume",
                    checkpoint.map(|p| p.display().to_string()).unwrap_or_else(|| "nothing".into())
                );
            }
        }
    }
    Ok(())
}

/// `--nproc-per-node N`: this executable N times as ranks 0..N of a one-node job.
fn launch(nproc: usize, timeout_s: u64) -> Result<()> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut spec = LaunchSpec::new(
        nproc,
        distributed::strip_flag(&args, "--nproc-per-node"),
        Duration::from_secs(timeout_s),
    );
    // SIGINT / SIGTERM sent to this process go on to every rank, which checkpoint and exit.
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_usize(sig, received.clone(), sig as usize)
            .context("installing the launcher's signal handlers")?;
    }
    spec.signals = Some(received);
    tracing::info!(nproc, "starting {nproc} ranks on this node");
    distributed::launch_local(&spec).context("running the ranks")?;
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
    let steps = if window == 1 { "step" } else { "steps" };
    println!(
        "position accuracy (acc1): {first:.3} over the first {window} {steps} -> {last:.3} over \
         the last {window}; chance 1/{positions} = {:.4}",
        1.0 / positions as f64
    );
    Ok(())
}
