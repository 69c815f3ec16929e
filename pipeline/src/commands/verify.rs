//! `droppos-pipeline verify OUT [--decode]`: checks shards against their manifest.

use std::path::PathBuf;

use anyhow::{Context, Result};
use droppos_shards::verify::verify_dataset;

/// What the command does (its one-line help in both binaries).
pub const ABOUT: &str =
    "Check shards against their manifest (sha256, row counts; --decode decodes everything)";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dataset folder (holding manifest.json).
    dir: PathBuf,
    /// Also decode every image and mask and check sizes and patch layouts.
    #[arg(long)]
    decode: bool,
}

pub fn run(args: Args) -> Result<()> {
    let r = verify_dataset(&args.dir, args.decode)
        .with_context(|| format!("verify {} failed", args.dir.display()))?;
    println!(
        "ok: {} shards, {} rows, {:.1} MB; sha256 and row counts match the manifest{}",
        r.shards,
        r.rows,
        r.bytes as f64 / 1e6,
        if args.decode {
            format!(
                "; decoded {} images and {} masks",
                r.decoded_images, r.decoded_masks
            )
        } else {
            String::new()
        }
    );
    Ok(())
}
