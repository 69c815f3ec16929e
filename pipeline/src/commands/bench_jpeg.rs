//! `droppos-pipeline bench jpeg-decode`: single-thread time to decode JPEG files to Y/Cb/Cr
//! planes (the first step of the shard writer's resize mode), the shard crate's baseline
//! decoder against TurboJPEG, on the same files held in memory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use droppos_shards::codec::{decode_ycbcr_planes, PlaneDecoder};
use droppos_shards::resample::View;
use serde::Serialize;

use super::bench_rounds::median;

/// What the command does (its one-line help in both binaries).
pub const ABOUT: &str = "Single-thread JPEG decoding to Y/Cb/Cr planes: the shard writer's \
    baseline decoder vs TurboJPEG, on the same files in memory";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// JPEG files, or folders searched recursively for `.jpg` / `.jpeg` files.
    #[arg(long, required = true, num_args = 1..)]
    images: Vec<PathBuf>,
    /// Rounds over the files, each decoder once per round, alternating (medians reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Use at most this many files.
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Serialize)]
struct Report {
    files: usize,
    /// YCbCr JPEGs with 4:2:0, 4:2:2, 4:4:0 or 4:4:4 sampling (the planar resize path's input).
    planar: usize,
    /// Of those, the ones the baseline decoder handles (the rest go to TurboJPEG).
    baseline_handles: usize,
    /// Of those, the ones whose planes equal TurboJPEG's byte for byte.
    identical: usize,
    turbojpeg_ms_per_image: f64,
    baseline_ms_per_image: f64,
    speedup: f64,
    rounds: usize,
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading {}", path.display()))?;
        entries.sort();
        for e in entries {
            collect(&e, out)?;
        }
    } else if path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg"))
    {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// The planes one after the other (what TurboJPEG writes), for the identity check.
fn concat(views: [View<'_>; 3]) -> Vec<u8> {
    views.iter().flat_map(View::to_vec).collect()
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let mut paths = Vec::new();
    for p in &args.images {
        anyhow::ensure!(p.exists(), "{} does not exist", p.display());
        collect(p, &mut paths)?;
    }
    paths.truncate(args.limit.unwrap_or(usize::MAX));
    anyhow::ensure!(
        !paths.is_empty(),
        "no .jpg / .jpeg files under the given paths"
    );
    let files = paths
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<Vec<_>>>()?;

    let (mut planar, mut identical) = (0, 0);
    let mut handled = Vec::new();
    for (bytes, path) in files.iter().zip(&paths) {
        let turbo = decode_ycbcr_planes(bytes, PlaneDecoder::TurboJpeg, concat);
        let Ok(Some(turbo)) = turbo else {
            continue;
        };
        planar += 1;
        if let Ok(Some(ours)) = decode_ycbcr_planes(bytes, PlaneDecoder::Baseline, concat) {
            if ours == turbo {
                identical += 1;
            } else {
                tracing::warn!(path = %path.display(), "baseline decoder's planes differ");
            }
            handled.push(bytes.as_slice());
        }
    }
    anyhow::ensure!(
        !handled.is_empty(),
        "the baseline decoder handles none of the {} files ({planar} YCbCr JPEGs with planar \
         sampling among them; it takes baseline single-scan ones, on x86-64 CPUs with AVX2 and \
         BMI2)",
        files.len()
    );
    tracing::info!(
        files = files.len(),
        planar,
        handled = handled.len(),
        "timing both decoders on the files the baseline decoder handles"
    );

    let touch = |v: [View<'_>; 3]| std::hint::black_box(v[0].data.len());
    let time = |decoder: PlaneDecoder| -> Result<f64> {
        let t = Instant::now();
        for bytes in &handled {
            decode_ycbcr_planes(bytes, decoder, touch)?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e3 / handled.len() as f64)
    };
    let (mut turbo_ms, mut baseline_ms) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        turbo_ms.push(time(PlaneDecoder::TurboJpeg)?);
        baseline_ms.push(time(PlaneDecoder::Baseline)?);
    }
    let (t, b) = (median(turbo_ms), median(baseline_ms));
    let report = Report {
        files: files.len(),
        planar,
        baseline_handles: handled.len(),
        identical,
        turbojpeg_ms_per_image: t,
        baseline_ms_per_image: b,
        speedup: t / b,
        rounds: args.rounds,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
