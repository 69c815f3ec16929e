//! `droppos-pipeline bench ...`: performance measurements (one subcommand per component).

use anyhow::Result;
use clap::Subcommand;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Median wall time of one DropPos pre-training step (forward, backward, clip, AdamW).
    TrainStep(super::bench_train_step::Args),
    #[command(about = super::bench_loader::ABOUT)]
    Loader(super::bench_loader::Args),
    /// Encoder inference: ONNX Runtime on our export vs our tch forward of the same weights.
    Onnx(super::bench_onnx::Args),
    #[command(about = super::bench_jpeg::ABOUT)]
    JpegDecode(super::bench_jpeg::Args),
    #[command(about = super::bench_sha256::ABOUT)]
    Sha256(super::bench_sha256::Args),
    #[command(about = super::bench_store_floor::ABOUT)]
    StoreFloor(super::bench_store_floor::Args),
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        BenchCommand::TrainStep(a) => super::bench_train_step::run(a),
        BenchCommand::Loader(a) => super::bench_loader::run(a),
        BenchCommand::Onnx(a) => super::bench_onnx::run(a),
        BenchCommand::JpegDecode(a) => super::bench_jpeg::run(a),
        BenchCommand::Sha256(a) => super::bench_sha256::run(a),
        BenchCommand::StoreFloor(a) => super::bench_store_floor::run(a),
    }
}
