//! `droppos-pipeline plot RUN_DIR`: loss / acc1 / lr curves of a run as a PNG.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::config::Recipe;
use crate::train::{metrics, plot};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A run directory written by `train` (holds metrics.jsonl).
    pub run_dir: PathBuf,
    /// Where to write the PNG (default: RUN_DIR/curves.png).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let path = metrics::metrics_path(&args.run_dir);
    let ms = metrics::read_metrics(&path).with_context(|| format!("reading {}", path.display()))?;
    // Chance level of position prediction is 1/L for the run's model.
    let chance = std::fs::read_to_string(args.run_dir.join("config.toml"))
        .ok()
        .and_then(|t| Recipe::parse(&t, &[]).ok())
        .map(|r| 1.0 / r.num_patches() as f64);
    let out = args
        .output
        .unwrap_or_else(|| args.run_dir.join("curves.png"));
    plot::render(&ms, chance, &out)?;
    let last = ms.last().expect("render checked for metrics");
    println!(
        "wrote {} ({} steps; last: loss {:.4}, acc1 {:.3}{})",
        out.display(),
        last.step,
        last.loss,
        last.acc1,
        chance
            .map(|c| format!(", chance {c:.3}"))
            .unwrap_or_default()
    );
    Ok(())
}
