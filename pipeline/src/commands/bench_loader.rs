//! `droppos-pipeline bench loader`: images/s of the streaming loader for one or more passes with
//! the pre-training augmentation (or the evaluation transform), plus peak resident memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use droppos_shards::loader::resample::Precision;
use droppos_shards::loader::{
    Batch, Geometry, Images, Loader, LoaderConfig, PixelFormat, ShardSet, IMAGENET_MEAN,
    IMAGENET_STD,
};
use serde::Serialize;

use crate::cli::OnErrorArg;

/// What the command does (its one-line help in both binaries).
pub const ABOUT: &str =
    "Images/s of the streaming loader over a shard folder (full pre-training augmentation)";

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// u8 RGB (normalisation happens on the device).
    U8,
    /// f32 normalised with ImageNet mean/std (what a torchvision pipeline produces).
    F32,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Shard folder(s) (each with a manifest.json).
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Decode threads (default: all cores).
    #[arg(long, value_parser = crate::cli::thread_count)]
    threads: Option<usize>,
    /// Output side S.
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Passes over the data (epochs 0..N, each reshuffled).
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    #[arg(long, value_enum, default_value_t = Format::F32)]
    format: Format,
    /// Evaluation transform (resize + centre crop) instead of the pre-training augmentation.
    #[arg(long)]
    eval: bool,
    /// Turn off DCT-domain downscaling of large crops.
    #[arg(long)]
    no_dct: bool,
    /// Pillow's own resampling arithmetic (its exact bytes) instead of the 16-bit fast one
    /// (evaluation crops of panoramas beyond ~12:1 are resized from their box: within a grey
    /// level, not byte-exact).
    #[arg(long)]
    pillow_exact: bool,
    /// Skip the sha256 check of the shards (it reads each shard once more).
    #[arg(long)]
    no_verify: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of ranks the epoch order is split among (DistributedSampler semantics).
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// This rank (0-based, below --world-size).
    #[arg(long, default_value_t = 0)]
    rank: usize,
    /// First epoch to run (epochs start-epoch..start-epoch+epochs).
    #[arg(long, default_value_t = 0)]
    start_epoch: u64,
    /// Resume the first epoch after this many of the rank's samples (a batch's `consumed`).
    #[arg(long, default_value_t = 0)]
    resume_samples: u64,
    /// Write one JSON line per batch (epoch, rank, batch, consumed, keys, labels): the order the
    /// loader produced, for checking determinism, rank partitioning and resumption.
    #[arg(long)]
    keys_out: Option<PathBuf>,
    /// Write the first --dump-limit samples as PNG files (RGB, S×S; ADE20K masks beside them
    /// as `*_mask.png`) with `samples.jsonl` giving each one's key, label and geometry (crop
    /// box, resize, centre crop, flip): what the loader produced, to inspect it or to reproduce it
    /// with PIL / torchvision (`scripts/check_loader_vs_pil.py`). Excluded from the timing.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Samples written by --dump.
    #[arg(long, default_value_t = 64)]
    dump_limit: usize,
    /// Undecodable samples: skip (counted in `skipped`) or fail.
    #[arg(long, value_enum, default_value_t = OnErrorArg::Skip)]
    on_error: OnErrorArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// One line of `--keys-out`.
#[derive(Serialize)]
struct BatchKeys<'a> {
    epoch: u64,
    rank: usize,
    batch: u64,
    consumed: u64,
    keys: &'a [String],
    labels: &'a [i64],
}

/// One line of `samples.jsonl` (`--dump`).
#[derive(Serialize)]
struct DumpedSample<'a> {
    file: String,
    mask_file: Option<String>,
    epoch: u64,
    rank: usize,
    epoch_position: u64,
    key: &'a str,
    label: i64,
    size: usize,
    geometry: DumpedGeometry,
}

/// torchvision's parameters of the transform: `resized_crop(img, i, j, h, w, [S, S])` for
/// pre-training, `center_crop(resize(img, [rh, rw]), S)` for evaluation, then `hflip` if `flip`.
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum DumpedGeometry {
    Pretrain {
        source_width: usize,
        source_height: usize,
        i: usize,
        j: usize,
        h: usize,
        w: usize,
        flip: bool,
    },
    Eval {
        source_width: usize,
        source_height: usize,
        resize_w: usize,
        resize_h: usize,
        i: usize,
        j: usize,
        h: usize,
        w: usize,
        flip: bool,
    },
}

impl From<Geometry> for DumpedGeometry {
    fn from(g: Geometry) -> Self {
        match g {
            Geometry::Pretrain { source, crop, flip } => DumpedGeometry::Pretrain {
                source_width: source.0,
                source_height: source.1,
                i: crop.i,
                j: crop.j,
                h: crop.h,
                w: crop.w,
                flip,
            },
            Geometry::Eval {
                source,
                resized,
                center,
                flip,
            } => DumpedGeometry::Eval {
                source_width: source.0,
                source_height: source.1,
                resize_w: resized.0,
                resize_h: resized.1,
                i: center.i,
                j: center.j,
                h: center.h,
                w: center.w,
                flip,
            },
        }
    }
}

/// Writes samples of batches as PNG files plus `samples.jsonl`.
struct Dumper {
    dir: PathBuf,
    lines: std::io::BufWriter<std::fs::File>,
    left: usize,
    written: usize,
    seconds: f64,
}

impl Dumper {
    fn create(dir: &Path, limit: usize) -> Result<Dumper> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let p = dir.join("samples.jsonl");
        let f = std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Dumper {
            dir: dir.to_path_buf(),
            lines: std::io::BufWriter::new(f),
            left: limit,
            written: 0,
            seconds: 0.0,
        })
    }

    fn batch(&mut self, b: &Batch, rank: usize) -> Result<()> {
        let t = Instant::now();
        let s = b.size;
        let plane = s * s;
        let n = b.len().min(self.left);
        let mut hwc = vec![0u8; 3 * plane];
        for k in 0..n {
            for c in 0..3 {
                for p in 0..plane {
                    let at = (k * 3 + c) * plane + p;
                    hwc[p * 3 + c] = match &b.images {
                        Images::U8(v) => v[at],
                        // Undo Normalize and ToTensor: the u8 value the normalisation started from.
                        Images::F32(v) => ((v[at] * IMAGENET_STD[c] + IMAGENET_MEAN[c]) * 255.0)
                            .round()
                            .clamp(0.0, 255.0) as u8,
                    };
                }
            }
            let file = format!("{:06}.png", self.written);
            let path = self.dir.join(&file);
            image::save_buffer(&path, &hwc, s as u32, s as u32, image::ColorType::Rgb8)
                .with_context(|| format!("writing {}", path.display()))?;
            let mask_file = match &b.masks {
                Some(m) => {
                    let f = format!("{:06}_mask.png", self.written);
                    let path = self.dir.join(&f);
                    let m = &m[k * plane..(k + 1) * plane];
                    image::save_buffer(&path, m, s as u32, s as u32, image::ColorType::L8)
                        .with_context(|| format!("writing {}", path.display()))?;
                    Some(f)
                }
                None => None,
            };
            let line = DumpedSample {
                file,
                mask_file,
                epoch: b.epoch,
                rank,
                epoch_position: b.epoch_positions[k],
                key: &b.keys[k],
                label: b.labels[k],
                size: s,
                geometry: b.geometry[k].into(),
            };
            serde_json::to_writer(&mut self.lines, &line)?;
            std::io::Write::write_all(&mut self.lines, b"\n")?;
            self.written += 1;
        }
        self.left -= n;
        self.seconds += t.elapsed().as_secs_f64();
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        std::io::Write::flush(&mut self.lines).context("writing samples.jsonl")?;
        tracing::info!(samples = self.written, dir = %self.dir.display(), "dumped samples");
        Ok(())
    }
}

#[derive(Serialize, Debug)]
struct Report {
    images: u64,
    batches: u64,
    skipped: u64,
    seconds: f64,
    images_per_s: f64,
    /// After the first batch of the first epoch (excludes start-up and the first row groups).
    /// Images/s after the first batch (null when there was only one batch).
    steady_images_per_s: Option<f64>,
    first_batch_s: f64,
    threads: usize,
    batch_size: usize,
    size: usize,
    format: &'static str,
    peak_rss_mib: Option<f64>,
}

pub fn run(a: Args) -> Result<()> {
    let set = Arc::new(
        ShardSet::open(&a.data, !a.no_verify).with_context(|| format!("opening {:?}", a.data))?,
    );
    let mut cfg = if a.eval {
        LoaderConfig::eval(a.size, a.batch_size)
    } else {
        LoaderConfig::pretrain(a.size, a.batch_size)
    };
    cfg.drop_last = false;
    cfg.seed = a.seed;
    anyhow::ensure!(
        a.world_size >= 1 && a.rank < a.world_size,
        "--rank {} must be below --world-size {}",
        a.rank,
        a.world_size
    );
    cfg.world = a.world_size;
    cfg.rank = a.rank;
    cfg.dct_scaling = !a.no_dct;
    cfg.on_error = a.on_error.into();
    if a.pillow_exact {
        cfg.resample = Precision::Exact;
    }
    cfg.pixel_format = match a.format {
        Format::U8 => PixelFormat::U8,
        Format::F32 => PixelFormat::F32Normalized,
    };
    if let Some(t) = a.threads {
        cfg.threads = t;
    }
    if !a.no_verify {
        // Hash before the clock starts: verification is a one-off, not loader throughput.
        set.verify_all().context("verifying shards")?;
    }
    let loader = Loader::new(set.clone(), cfg)?;
    tracing::info!(
        samples = set.num_samples(),
        threads = cfg.threads,
        "benchmarking the loader"
    );
    let mut dumper = match &a.dump {
        Some(d) => Some(Dumper::create(d, a.dump_limit)?),
        None => None,
    };
    let start = Instant::now();
    let mut first_batch = None;
    let mut images = 0u64;
    let mut after_first = 0u64;
    let mut batches = 0u64;
    let mut skipped = 0u64;
    let mut keys_out = match &a.keys_out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    for epoch in a.start_epoch..a.start_epoch + a.epochs {
        let resume = if epoch == a.start_epoch {
            a.resume_samples
        } else {
            0
        };
        let mut it = loader.epoch(epoch, resume)?;
        let mut index = 0u64;
        while let Some(b) = it.next() {
            let b = b?;
            if let Some(w) = keys_out.as_mut() {
                let line = BatchKeys {
                    epoch,
                    rank: a.rank,
                    batch: index,
                    consumed: b.consumed,
                    keys: &b.keys,
                    labels: &b.labels,
                };
                serde_json::to_writer(&mut *w, &line)?;
                std::io::Write::write_all(w, b"\n")?;
            }
            if let Some(d) = dumper.as_mut().filter(|d| d.left > 0) {
                d.batch(&b, a.rank)?;
            }
            index += 1;
            images += b.len() as u64;
            skipped += b.skipped.len() as u64;
            batches += 1;
            if first_batch.is_none() {
                let dumping = dumper.as_ref().map_or(0.0, |d| d.seconds);
                first_batch = Some(start.elapsed().as_secs_f64() - dumping);
            } else {
                after_first += b.len() as u64;
            }
            it.recycle(b);
        }
        // Skips after the last batch (each already logged by the loader) count too.
        skipped += it.skipped_after_last_batch().len() as u64;
    }
    let dump_seconds = dumper.as_ref().map_or(0.0, |d| d.seconds);
    let seconds = start.elapsed().as_secs_f64() - dump_seconds;
    if let Some(d) = dumper {
        d.finish()?;
    }
    if let Some(mut w) = keys_out {
        std::io::Write::flush(&mut w).context("writing --keys-out")?;
    }
    anyhow::ensure!(
        images > 0 || skipped == 0,
        "no sample could be decoded: all {skipped} read were skipped (see the warnings above)"
    );
    let fb = first_batch.unwrap_or(seconds);
    let report = Report {
        images,
        batches,
        skipped,
        seconds,
        images_per_s: images as f64 / seconds,
        steady_images_per_s: (batches > 1).then(|| after_first as f64 / (seconds - fb).max(1e-9)),
        first_batch_s: fb,
        threads: cfg.threads,
        batch_size: a.batch_size,
        size: a.size,
        format: match a.format {
            Format::U8 => "u8",
            Format::F32 => "f32",
        },
        peak_rss_mib: peak_rss_mib(),
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} images in {:.2} s: {:.1} images/s ({}), {} threads, peak RSS {}",
            report.images,
            report.seconds,
            report.images_per_s,
            report.steady_images_per_s.map_or_else(
                || "one batch only".into(),
                |r| format!("{r:.1} after the first batch")
            ),
            report.threads,
            report
                .peak_rss_mib
                .map(|m| format!("{m:.0} MiB"))
                .unwrap_or_else(|| "n/a".into())
        );
    }
    Ok(())
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub(crate) fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
