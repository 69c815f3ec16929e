//! `droppos-pipeline shard imagenet|coco|ade20k|merge`: datasets into zstd Parquet shards.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use droppos_shards::codec::{ImagePolicy, Validation, DEFAULT_MAX_PIXELS};
use droppos_shards::datasets::{ade20k, coco, imagenet, Listing};
use droppos_shards::resample::Filter;
use droppos_shards::writer::{self, Progress, WriteOptions};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::OnErrorArg;

/// What the command does (its one-line help in both binaries).
pub const ABOUT: &str = "Turn ImageNet, COCO or ADE20K into zstd Parquet shards with a manifest";

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: ShardCommand,
}

#[derive(Subcommand, Debug)]
enum ShardCommand {
    /// ImageNet in the ImageFolder layout (ROOT/<wnid>/<file>).
    Imagenet {
        /// Folder with one subfolder per class.
        #[arg(long)]
        root: PathBuf,
        /// Class list: first token of each line is the class id, the 0-based line number its
        /// label (synset_words.txt, LOC_synset_mapping.txt). Default: sorted folder names.
        #[arg(long)]
        classes: Option<PathBuf>,
        /// Label list: `relative/path label` lines (MAE train.txt/val.txt; Caffe val.txt with
        /// bare file names works too); a label is an index or a class id of --classes (a wnid);
        /// Kaggle's LOC_val_solution.csv is read as such a list.
        #[arg(long)]
        list: Option<PathBuf>,
        /// Split name recorded in the manifest (default: the root folder's name).
        #[arg(long)]
        split: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// COCO instances: one row per image listed in the json, every annotation kept.
    Coco {
        /// Image folder (e.g. train2017/).
        #[arg(long)]
        images: PathBuf,
        /// instances_*.json.
        #[arg(long)]
        annotations: PathBuf,
        /// Split name (default: from the json name, e.g. val2017).
        #[arg(long)]
        split: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// ADE20K SceneParsing: image + annotation PNG (stored unchanged).
    Ade20k {
        /// The ADEChallengeData2016 folder.
        #[arg(long)]
        root: PathBuf,
        /// training or validation.
        #[arg(long)]
        split: String,
        #[command(flatten)]
        common: Common,
    },
    /// Join the part manifests of a --num-workers run into OUT/manifest.json.
    Merge {
        /// Output folder (shards of parts elsewhere are copied in).
        out: PathBuf,
        /// Part manifests (manifest.part-*.json) or folders holding them.
        #[arg(required = true)]
        parts: Vec<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FilterArg {
    Bicubic,
    Bilinear,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ValidateArg {
    /// Header plus a full JPEG marker walk to the end-of-image marker (PNGs are decoded).
    Structure,
    /// Decode every image.
    Decode,
}

#[derive(clap::Args, Debug)]
struct Common {
    /// Output folder (shards + manifest.json).
    #[arg(long)]
    out: PathBuf,
    /// Patch size of the precomputed patch layouts.
    #[arg(long, default_value_t = 16)]
    patch_size: u32,
    /// Rows per shard file.
    #[arg(long, default_value_t = 1024)]
    shard_rows: usize,
    /// Rows per Parquet row group.
    #[arg(long, default_value_t = 128)]
    row_group_rows: usize,
    /// zstd level of the Parquet pages.
    #[arg(long, default_value_t = 3)]
    zstd_level: i32,
    /// Also zstd-compress the encoded image and mask bytes (JPEG/PNG already: by default they
    /// are stored as they are, every other column is zstd).
    #[arg(long)]
    compress_media: bool,
    /// Seed of the row shuffle across shards.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep rows in sorted key order instead of shuffling.
    #[arg(long)]
    no_shuffle: bool,
    /// Worker threads (default: all cores). The output bytes do not depend on it.
    #[arg(long, value_parser = crate::cli::thread_count)]
    threads: Option<usize>,
    /// Split the work over N machines/processes (each writes a disjoint set of shards).
    #[arg(long, default_value_t = 1)]
    num_workers: u32,
    /// This worker's index in 0..num-workers.
    #[arg(long, default_value_t = 0)]
    worker_index: u32,
    /// What to do with an unreadable, corrupt or oversized input.
    #[arg(long, value_enum, default_value_t = OnErrorArg::Skip)]
    on_error: OnErrorArg,
    /// Re-encode as JPEG so the shorter side is at most N (default: original bytes).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    resize_short_side: Option<u32>,
    /// JPEG quality when re-encoding.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: u8,
    /// Resampling filter when resizing.
    #[arg(long, value_enum, default_value_t = FilterArg::Bicubic)]
    resize_filter: FilterArg,
    /// How thoroughly to check images stored unchanged.
    #[arg(long, value_enum, default_value_t = ValidateArg::Structure)]
    validate: ValidateArg,
    /// Rewrite stored JPEGs losslessly (same DCT coefficients, optimised Huffman tables) with a
    /// restart marker every few MCUs, so the loader entropy-decodes only what each crop needs.
    #[arg(long)]
    jpeg_restarts: bool,
    /// Refuse images whose header claims more pixels (decompression bombs).
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl Common {
    fn write_options(&self) -> WriteOptions {
        WriteOptions {
            out: self.out.clone(),
            shard_rows: self.shard_rows,
            row_group_rows: self.row_group_rows,
            zstd_level: self.zstd_level,
            compress_media: self.compress_media,
            seed: self.seed,
            shuffle: !self.no_shuffle,
            patch_size: self.patch_size,
            image: ImagePolicy {
                max_pixels: self.max_pixels,
                resize_short_side: self.resize_short_side,
                quality: self.quality,
                jpeg_restarts: self.jpeg_restarts,
                validation: match self.validate {
                    ValidateArg::Structure => Validation::Structure,
                    ValidateArg::Decode => Validation::Decode,
                },
                filter: match self.resize_filter {
                    FilterArg::Bicubic => Filter::Bicubic,
                    FilterArg::Bilinear => Filter::Bilinear,
                },
            },
            on_error: self.on_error.into(),
            threads: self.threads.unwrap_or(0),
            num_workers: self.num_workers,
            worker_index: self.worker_index,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        self.0.reset_elapsed();
    }
    fn advance(&self, rows: u64) {
        self.0.inc(rows);
    }
}

pub fn run(args: Args) -> Result<()> {
    // The reported time covers listing too, as a user (and the benchmark's baseline) sees it.
    let start = Instant::now();
    // Listing stats every file, in parallel: on as many threads as the shards are written with.
    let threads = match &args.command {
        ShardCommand::Imagenet { common, .. }
        | ShardCommand::Coco { common, .. }
        | ShardCommand::Ade20k { common, .. } => common.threads.unwrap_or(0),
        ShardCommand::Merge { .. } => 1,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("list-{i}"))
        .build()
        .context("starting the listing threads")?;
    let listed = pool.install(|| list_or_merge(args.command))?;
    drop(pool);
    match listed {
        Some((listing, common)) => write(&listing, &common, start),
        None => Ok(()),
    }
}

/// Lists the inputs of a `shard` command; `shard merge` has none: it joins its parts' manifests
/// here.
fn list_or_merge(command: ShardCommand) -> Result<Option<(Listing, Common)>> {
    Ok(Some(match command {
        ShardCommand::Merge { out, parts } => {
            let m = writer::merge_parts(&out, &parts)
                .with_context(|| format!("merging parts into {}", out.display()))?;
            println!(
                "merged: {} shards, {} rows, {} skipped -> {}",
                m.shards.len(),
                m.num_rows,
                m.skipped.len(),
                out.join(droppos_shards::MANIFEST_FILE).display()
            );
            return Ok(None);
        }
        ShardCommand::Imagenet {
            root,
            classes,
            list,
            split,
            common,
        } => (
            imagenet::list(&imagenet::ImagenetOptions {
                root: root.clone(),
                classes,
                list,
                split,
            })
            .with_context(|| format!("listing ImageNet at {}", root.display()))?,
            common,
        ),
        ShardCommand::Coco {
            images,
            annotations,
            split,
            common,
        } => (
            coco::list(&coco::CocoOptions {
                images,
                annotations: annotations.clone(),
                split,
            })
            .with_context(|| format!("listing COCO from {}", annotations.display()))?,
            common,
        ),
        ShardCommand::Ade20k {
            root,
            split,
            common,
        } => (
            ade20k::list(&ade20k::Ade20kOptions {
                root: root.clone(),
                split,
            })
            .with_context(|| format!("listing ADE20K at {}", root.display()))?,
            common,
        ),
    }))
}

fn write(listing: &Listing, common: &Common, start: Instant) -> Result<()> {
    let opts = common.write_options();
    tracing::info!(
        dataset = %listing.dataset,
        split = %listing.split,
        inputs = listing.items.len(),
        classes = listing.classes.len(),
        "listed"
    );
    let bar = if common.quiet {
        ProgressBar::hidden()
    } else {
        crate::progress::bar(Some(0))
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} images  {per_sec}  ETA {eta}",
        )
        .expect("static template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let summary = writer::write_dataset(listing, &opts, &Bar(bar.clone()))
        .with_context(|| format!("writing shards to {}", opts.out.display()))?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let m = &summary.manifest;
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    let processed = summary.inputs_processed as f64;
    println!(
        "{} {}: {} rows in {} shards ({} written, {} reused), {:.1} MB, {:.1} s, {:.0} images/s processed",
        m.dataset,
        m.split,
        m.num_rows,
        m.shards.len(),
        summary.written_shards,
        summary.reused_shards,
        bytes as f64 / 1e6,
        secs,
        processed / secs.max(1e-9)
    );
    if summary.converted > 0 {
        println!(
            "converted: {} (listed under `conversions`)",
            summary.converted
        );
    }
    if m.skipped.is_empty() {
        println!("skipped: 0");
    } else {
        let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
        for s in &m.skipped {
            *by_reason.entry(reason_kind(&s.reason)).or_default() += 1;
        }
        println!("skipped: {} (listed under `skipped`)", m.skipped.len());
        for (r, n) in by_reason {
            println!("  {n:>6}  {r}");
        }
        for s in m.skipped.iter().take(10) {
            println!("  {}: {}", s.path, s.reason);
        }
    }
    println!("manifest: {}", summary.manifest_path.display());
    // An empty dataset is rarely what was meant (a wrong image folder or root?); under
    // `--on-error skip` it is still a successful run, so say it loudly rather than fail.
    if m.num_rows == 0 && !m.skipped.is_empty() {
        eprintln!(
            "warning: no rows were written: all {} inputs were skipped (reasons above)",
            m.skipped.len()
        );
    }
    Ok(())
}

/// The reason without its per-file detail, for grouping.
fn reason_kind(reason: &str) -> String {
    reason.split(':').next().unwrap_or(reason).to_string()
}
