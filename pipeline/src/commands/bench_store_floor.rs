//! `droppos-pipeline bench store-floor`: the CPU time that storing a folder's files as they are
//! cannot go below on this machine: reading every file, writing its bytes to one file on the
//! output's file system, and the SHA-256 the manifest needs of what was written (two streams
//! hashed together, as the shard writer does). No Parquet, no image checks, no listing: what
//! `shard` in original-bytes mode spends beyond this sum is its own overhead, and a throughput
//! goal is only reachable if it lies above the floor.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use droppos_shards::sha256::{update_pair, Sha256};
use serde::Serialize;

use super::bench_rounds::median;

/// What the command does (its one-line help in both binaries).
pub const ABOUT: &str = "CPU-time floor of storing a folder's files as they are: read, write, \
    SHA-256 of the output (single thread each, page cache warm)";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Folder whose files (recursively, sorted) are read.
    #[arg(long)]
    root: PathBuf,
    /// Folder on the file system the shards would go to; a scratch file is written there and
    /// removed.
    #[arg(long)]
    out: PathBuf,
    /// Read at most this many MiB of files (the first files in path order).
    #[arg(long, default_value_t = 1024)]
    max_mib: u64,
    /// Threads the floor is divided over for `floor_wall_s` (the machine's cores by default).
    #[arg(long)]
    threads: Option<usize>,
    /// Rounds, each step once per round (medians reported) after one untimed round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Serialize)]
struct Report {
    files: usize,
    bytes: u64,
    /// Open and read every file into memory (a buffer touched before).
    read_s: f64,
    /// Write the bytes to one file (space reserved ahead, as the shard writer does), no fsync.
    write_s: f64,
    /// fsync of that file afterwards (waiting on the device, not CPU; not in the floor).
    fsync_s: f64,
    /// SHA-256 of the bytes as two streams hashed together.
    sha256_two_streams_s: f64,
    sha256_one_stream_s: f64,
    /// read + write + paired SHA-256: CPU seconds no tool storing and hashing these bytes saves.
    floor_cpu_s: f64,
    threads: usize,
    /// The floor spread perfectly over `threads` cores.
    floor_wall_s: f64,
    floor_files_per_s: f64,
    rounds: usize,
}

fn files_under(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> Result<()> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort();
    for p in entries {
        let md = std::fs::metadata(&p).with_context(|| format!("stat {}", p.display()))?;
        if md.is_dir() {
            files_under(&p, out)?;
        } else if md.is_file() {
            out.push((p, md.len()));
        }
    }
    Ok(())
}

/// Reads every file into its slot of `buf`.
fn read_all(files: &[(PathBuf, u64)], buf: &mut [u8]) -> Result<()> {
    let mut at = 0;
    for (p, n) in files {
        let n = *n as usize;
        File::open(p)
            .and_then(|mut f| f.read_exact(&mut buf[at..at + n]))
            .with_context(|| format!("reading {} (changed while measured?)", p.display()))?;
        at += n;
    }
    Ok(())
}

/// Writes `buf` to `path` in 1 MiB pieces after reserving its size; returns (write s, fsync s).
fn write_all(path: &Path, buf: &[u8]) -> Result<(f64, f64)> {
    let t = Instant::now();
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an fd we own; failure only means no reservation.
        unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                0,
                buf.len() as libc::off_t,
            );
        }
    }
    for piece in buf.chunks(1 << 20) {
        f.write_all(piece)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let write_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok((write_s, t.elapsed().as_secs_f64()))
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.rounds > 0, "--rounds must be positive");
    let mut all = Vec::new();
    files_under(&args.root, &mut all)?;
    let cap = args.max_mib << 20;
    let mut total = 0u64;
    let files: Vec<_> = all
        .into_iter()
        .take_while(|(_, n)| {
            total += n;
            total <= cap
        })
        .collect();
    let bytes: u64 = files.iter().map(|(_, n)| n).sum();
    anyhow::ensure!(
        bytes > 0,
        "no file bytes under {} (within --max-mib {})",
        args.root.display(),
        args.max_mib
    );
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let scratch = args
        .out
        .join(format!(".store-floor-{}.tmp", std::process::id()));
    // Touched up front: the floor is the copies, not this buffer's first-touch page faults.
    let mut buf = vec![1u8; bytes as usize];
    let half = buf.len() / 2;
    let (mut read_r, mut write_r, mut sync_r, mut two_r, mut one_r) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let piece = 1 << 20;
    // Round 0 is untimed: it brings the files into the page cache.
    for round in 0..=args.rounds {
        let t = Instant::now();
        read_all(&files, &mut buf)?;
        let read_s = t.elapsed().as_secs_f64();
        // The last round's file goes untimed: freeing its pages is not part of writing.
        let _ = std::fs::remove_file(&scratch);
        let (write_s, sync_s) = write_all(&scratch, &buf)?;

        let t = Instant::now();
        let (a, b) = buf.split_at(half);
        let (mut ha, mut hb) = (Sha256::new(), Sha256::new());
        let mut ca = a.chunks(piece);
        let mut cb = b.chunks(piece);
        loop {
            match (ca.next(), cb.next()) {
                (Some(x), Some(y)) => update_pair(&mut ha, x, &mut hb, y),
                (Some(x), None) => ha.update(x),
                (None, Some(y)) => hb.update(y),
                (None, None) => break,
            }
        }
        std::hint::black_box((ha.finalize(), hb.finalize()));
        let two_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let mut h = Sha256::new();
        buf.chunks(piece).for_each(|c| h.update(c));
        std::hint::black_box(h.finalize());
        let one_s = t.elapsed().as_secs_f64();

        if round > 0 {
            read_r.push(read_s);
            write_r.push(write_s);
            sync_r.push(sync_s);
            two_r.push(two_s);
            one_r.push(one_s);
        }
    }
    let _ = std::fs::remove_file(&scratch);
    let (read_s, write_s, two) = (median(read_r), median(write_r), median(two_r));
    let floor = read_s + write_s + two;
    let wall = floor / threads as f64;
    let report = Report {
        files: files.len(),
        bytes,
        read_s,
        write_s,
        fsync_s: median(sync_r),
        sha256_two_streams_s: two,
        sha256_one_stream_s: median(one_r),
        floor_cpu_s: floor,
        threads,
        floor_wall_s: wall,
        floor_files_per_s: files.len() as f64 / wall,
        rounds: args.rounds,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
