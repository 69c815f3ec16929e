//! `droppos-pipeline`: shard datasets, pre-train DropPos, export ONNX, evaluate with ONNX Runtime.

mod cli;
mod commands;
mod config;
mod eval;
mod logging;
mod malloc;
mod ort_runtime;
mod progress;
mod train;

#[cfg(test)]
mod onnx_tch_tests;
#[cfg(test)]
mod onnx_tests;

/// libtorch has one global random generator per process, and the unit tests of this binary run
/// on parallel threads: a test that seeds it and checks a reproducible result (a resumed run
/// equal to an uninterrupted one) would see other tests' draws interleaved. Every test that
/// draws from it (model initialisation included) holds this lock; the others run freely.
#[cfg(test)]
pub(crate) fn torch_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
enum Command {
    /// Report libtorch, CUDA, cuDNN, NCCL and ONNX Runtime availability.
    Doctor(commands::doctor::Args),
    /// Performance measurements.
    Bench(commands::bench::Args),
    /// Export a checkpoint to ONNX (encoder, DropPos position model or classifier), written
    /// without Python.
    Export(commands::export::Args),
    /// Evaluate an ONNX export with ONNX Runtime on shards: k-NN, linear probe, position
    /// accuracy, dense patch probe, classification.
    Eval(commands::eval::Args),
    #[command(about = commands::shard::ABOUT)]
    Shard(commands::shard::Args),
    #[command(about = commands::verify::ABOUT)]
    Verify(commands::verify::Args),
    #[command(about = commands::stats::ABOUT)]
    Stats(commands::stats::Args),
    /// Pre-train DropPos from a recipe on shards (CPU or CUDA); checkpoints, metrics, resume.
    Train(commands::train::Args),
    /// Fine-tune a pre-trained encoder as a classifier on labelled shards (MAE protocol: layer
    /// decay, Mixup / CutMix, drop path); writes a model `export --what classifier` reads.
    Finetune(commands::finetune::Args),
    /// Render a training run's loss / acc1 / lr curves to a PNG.
    Plot(commands::plot::Args),
}

fn main() -> Result<(), cli::Report> {
    malloc::tune();
    Ok(
        match cli::Cli::<Command>::command_from(std::env::args_os()) {
            Command::Doctor(args) => commands::doctor::run(args),
            Command::Bench(args) => commands::bench::run(args),
            Command::Export(args) => commands::export::run(args),
            Command::Eval(args) => commands::eval::run(args),
            Command::Shard(args) => commands::shard::run(args),
            Command::Verify(args) => commands::verify::run(args),
            Command::Stats(args) => commands::stats::run(args),
            Command::Plot(args) => commands::plot::run(args),
            Command::Train(args) => commands::train::run(args),
            Command::Finetune(args) => commands::finetune::run(args),
        }?,
    )
}
