//! `droppos-pipeline`: the command users run. The data commands (`shard`, `verify`, `stats`,
//! `bench loader`, `bench jpeg-decode`, `bench sha256`,
//! `bench store-floor`) run in this binary, which does not link
//! libtorch: libtorch's static initialisation alone takes ~0.6 s, more than sharding a few
//! thousand images. Every other command (and the top-level help) runs in
//! `droppos-pipeline-torch`, installed next to this binary, which this one `exec`s with the same
//! arguments (same process, environment and signals, so `torchrun` / Slurm launches are
//! unchanged).

#[path = "commands/bench_jpeg.rs"]
mod bench_jpeg;
#[path = "commands/bench_loader.rs"]
mod bench_loader;
#[path = "commands/bench_rounds.rs"]
mod bench_rounds;
#[path = "commands/bench_sha256.rs"]
mod bench_sha256;
#[path = "commands/bench_store_floor.rs"]
mod bench_store_floor;
mod cli;
mod logging;
mod malloc;
mod progress;
#[path = "commands/shard.rs"]
mod shard;
#[path = "commands/stats.rs"]
mod stats;
#[path = "commands/verify.rs"]
mod verify;

use std::ffi::OsString;

use anyhow::{Context, Result};
use clap::Subcommand;

/// The binary with the libtorch commands, next to this one.
const TORCH_BIN: &str = "droppos-pipeline-torch";

#[derive(Subcommand, Debug)]
enum Command {
    #[command(about = shard::ABOUT)]
    Shard(shard::Args),
    #[command(about = verify::ABOUT)]
    Verify(verify::Args),
    #[command(about = stats::ABOUT)]
    Stats(stats::Args),
    /// Performance measurements (here: the loader and JPEG decoding; the others run in the
    /// torch binary).
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Subcommand, Debug)]
enum Bench {
    #[command(about = bench_loader::ABOUT)]
    Loader(bench_loader::Args),
    #[command(about = bench_jpeg::ABOUT)]
    JpegDecode(bench_jpeg::Args),
    #[command(about = bench_sha256::ABOUT)]
    Sha256(bench_sha256::Args),
    #[command(about = bench_store_floor::ABOUT)]
    StoreFloor(bench_store_floor::Args),
}

/// Whether `args` name a command this binary runs: the first two positional arguments after
/// the global `--log` option.
fn runs_here(args: &[OsString]) -> bool {
    let mut positional = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--log" {
            it.next();
        } else if s.starts_with('-') {
            // `--log=X` is fine; any other option before the command (`--help`, `--version`)
            // goes to the full binary.
            if !s.starts_with("--log=") && positional.is_empty() {
                return false;
            }
        } else {
            positional.push(s.into_owned());
            if positional.len() == 2 {
                break;
            }
        }
    }
    match positional.first().map(String::as_str) {
        Some("shard" | "verify" | "stats") => true,
        Some("bench") => matches!(
            positional.get(1).map(String::as_str),
            Some("loader" | "jpeg-decode" | "sha256" | "store-floor")
        ),
        _ => false,
    }
}

fn main() -> Result<(), cli::Report> {
    malloc::tune();
    let args: Vec<OsString> = std::env::args_os().collect();
    if !runs_here(&args) {
        return Ok(exec_torch(&args)?);
    }
    Ok(match cli::Cli::<Command>::command_from(&args) {
        Command::Shard(a) => shard::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Stats(a) => stats::run(a),
        Command::Bench(Bench::Loader(a)) => bench_loader::run(a),
        Command::Bench(Bench::JpegDecode(a)) => bench_jpeg::run(a),
        Command::Bench(Bench::Sha256(a)) => bench_sha256::run(a),
        Command::Bench(Bench::StoreFloor(a)) => bench_store_floor::run(a),
    }?)
}

fn exec_torch(args: &[OsString]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let me = std::env::current_exe().context("locating this executable")?;
    let torch = me.with_file_name(TORCH_BIN);
    if !torch.is_file() {
        anyhow::bail!(
            "{} not found next to {}: the training, fine-tuning, export, evaluation and \
             doctor commands live there (`cargo build --release` builds both binaries; install \
             them side by side)",
            TORCH_BIN,
            me.display()
        );
    }
    let err = std::process::Command::new(&torch).args(&args[1..]).exec();
    Err(err).with_context(|| format!("starting {}", torch.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn here(s: &str) -> bool {
        let v: Vec<OsString> = std::iter::once("droppos-pipeline")
            .chain(s.split_whitespace())
            .map(OsString::from)
            .collect();
        runs_here(&v)
    }

    #[test]
    fn data_commands_run_here_and_the_rest_in_the_torch_binary() {
        for s in [
            "shard imagenet --root a --out b",
            "--log warn shard coco --images x",
            "--log=debug verify out",
            "stats out --json",
            "bench loader --data d",
            "--log warn bench loader --data d",
            "bench jpeg-decode --images d",
            "shard --help",
        ] {
            assert!(here(s), "{s}");
        }
        for s in [
            "",
            "--help",
            "--version",
            "train --config c",
            "bench train-step",
            "bench onnx",
            "bench",
            "--log warn export --what encoder",
            "eval knn",
            "doctor",
            "plot run",
            "finetune --init x",
        ] {
            assert!(!here(s), "{s}");
        }
    }
}
