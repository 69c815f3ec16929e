//! The shard writer: streams a [`Listing`] into zstd Parquet shards and writes the manifest.
//!
//! Determinism: rows are ordered by key, optionally shuffled with a seeded generator, and cut
//! into shards of `shard_rows` consecutive rows; shard `i` always holds the same rows in the
//! same order, whatever the thread count or worker split. Rows are prepared in parallel (rayon)
//! but written in order, and row groups have a fixed row count, so the bytes are identical.
//!
//! Memory: at most `threads` shards are open at once, each holding one row group of prepared
//! rows; nothing else of the dataset is in memory besides its listing.
//!
//! Crash safety: each shard is written to a hidden temp file, fsynced and renamed; then a small
//! journal record (`.progress/shard-NNNNNN.json`) stores its hash. A re-run with the same inputs
//! and options reuses every shard whose file still matches its record and rewrites the rest;
//! the manifest is written last, atomically.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::{
    ArrayRef, BinaryArray, BinaryBuilder, Float64Array, Int32Array, Int64Array, ListArray,
    RecordBatch, StringArray, StructArray,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, FieldRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::{self, ImagePolicy};
use crate::datasets::{CocoAnnotation, InputItem, Listing, Segmentation, Target};
use crate::error::{ImageRejection, Result, ShardError};
use crate::format::{self, columns, Dataset, FORMAT_VERSION, MANIFEST_FILE};
use crate::hash_pairs::{HashPairs, Stream};
use crate::manifest::{
    self, ConversionEntry, InputsInfo, Manifest, PartInfo, ShardEntry, SkippedEntry,
};
use crate::patch_layout;

pub use crate::error::OnError;

/// Receives progress (rows done) from the writer; the CLI draws a bar with it.
pub trait Progress: Sync {
    /// Called once with the rows this run will process (reused shards excluded).
    fn start(&self, _total_rows: u64) {}
    /// Called after each row group.
    fn advance(&self, _rows: u64) {}
}

/// No progress reporting.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Settings of [`write_dataset`].
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub out: PathBuf,
    pub shard_rows: usize,
    pub row_group_rows: usize,
    pub zstd_level: i32,
    /// Also zstd-compress the `image` and `mask` bytes. Off by default: they are JPEG/PNG
    /// already, where zstd gains nothing (1.000× on ImageNet JPEGs) at ~330 MB/s per core, about
    /// half of the writer's CPU time in original-bytes mode. Every other column is zstd.
    pub compress_media: bool,
    pub seed: u64,
    pub shuffle: bool,
    pub patch_size: u32,
    pub image: ImagePolicy,
    pub on_error: OnError,
    /// Worker threads (0 = all cores). Never changes the output bytes.
    pub threads: usize,
    pub num_workers: u32,
    pub worker_index: u32,
    /// Tool version written to the manifest.
    pub tool_version: String,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            out: PathBuf::new(),
            shard_rows: 1024,
            row_group_rows: 128,
            zstd_level: 3,
            compress_media: false,
            seed: 0,
            shuffle: true,
            patch_size: 16,
            image: ImagePolicy::default(),
            on_error: OnError::Skip,
            threads: 0,
            num_workers: 1,
            worker_index: 0,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

impl WriteOptions {
    /// The settings that shape the output bytes (recorded in the manifest).
    fn output_options(&self, listing: &Listing) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            m.insert(k.to_string(), v);
        };
        put("seed", self.seed.into());
        put("shuffle", self.shuffle.into());
        put("shard_rows", self.shard_rows.into());
        put("row_group_rows", self.row_group_rows.into());
        put("compression", "zstd".into());
        put("zstd_level", self.zstd_level.into());
        put(
            "media_compression",
            if self.compress_media { "zstd" } else { "none" }.into(),
        );
        put("patch_size", self.patch_size.into());
        put(
            "resize_short_side",
            self.image
                .resize_short_side
                .map(serde_json::Value::from)
                .unwrap_or(serde_json::Value::Null),
        );
        // The re-encoding settings shape the bytes only when images are resized; otherwise they
        // are null, so that changing them does not make a resumed run rewrite its shards.
        let resizing = self.image.resize_short_side.is_some();
        let when_resizing =
            |v: serde_json::Value| if resizing { v } else { serde_json::Value::Null };
        put("quality", when_resizing(self.image.quality.into()));
        put(
            "resize_filter",
            when_resizing(
                match self.image.filter {
                    crate::resample::Filter::Bilinear => "bilinear",
                    crate::resample::Filter::Bicubic => "bicubic",
                }
                .into(),
            ),
        );
        put(
            "resize_arithmetic",
            when_resizing(crate::codec::RESIZE_PRECISION.name().into()),
        );
        put(
            "resize_pipeline",
            when_resizing(crate::codec::RESIZE_PIPELINE.into()),
        );
        put(
            "validation",
            serde_json::to_value(self.image.validation).unwrap_or_default(),
        );
        put("max_pixels", self.image.max_pixels.into());
        put("jpeg_restarts", self.image.jpeg_restarts.into());
        put("exif_orientation", "kept as stored (not applied)".into());
        for (k, v) in &listing.options {
            m.insert(k.clone(), v.clone());
        }
        m
    }
}

/// Result of a run.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    /// Shards written by this run.
    pub written_shards: usize,
    /// Shards reused from an interrupted earlier run.
    pub reused_shards: usize,
    /// Rows whose bytes were re-encoded or converted.
    pub converted: usize,
    /// Inputs this run read and prepared (rows of the shards it wrote, skipped ones included;
    /// not those of reused shards or skipped while listing).
    pub inputs_processed: usize,
}

/// Journal record of one finished shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardRecord {
    fingerprint: String,
    entry: ShardEntry,
    skipped: Vec<SkippedEntry>,
    conversions: Vec<ConversionEntry>,
}

const PROGRESS_DIR: &str = ".progress";

/// Seeded permutation (SplitMix64 + Fisher-Yates): the same for a seed on every platform.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = ((next() as u128 * (i as u128 + 1)) >> 64) as usize;
        p.swap(i, j);
    }
    p
}

/// Writes the dataset (or this worker's part of it) and its manifest.
pub fn write_dataset(
    listing: &Listing,
    opts: &WriteOptions,
    progress: &dyn Progress,
) -> Result<WriteSummary> {
    if opts.shard_rows == 0 || opts.row_group_rows == 0 || opts.patch_size == 0 {
        return Err(ShardError::InvalidOptions(
            "shard rows, row-group rows and patch size must be positive".into(),
        ));
    }
    if opts.image.resize_short_side == Some(0) {
        return Err(ShardError::InvalidOptions(
            "the resize target (shorter side) must be positive".into(),
        ));
    }
    if !(1..=100).contains(&opts.image.quality) {
        return Err(ShardError::InvalidOptions(format!(
            "JPEG quality must be in 1..=100, got {}",
            opts.image.quality
        )));
    }
    if opts.num_workers == 0 || opts.worker_index >= opts.num_workers {
        return Err(ShardError::InvalidOptions(format!(
            "worker index {} is not below the number of workers {}",
            opts.worker_index, opts.num_workers
        )));
    }
    ZstdLevel::try_new(opts.zstd_level)
        .map_err(|e| ShardError::InvalidOptions(format!("zstd level: {e}")))?;
    // Inputs refused while listing follow the same policy as images refused while writing.
    if opts.on_error == OnError::Fail {
        if let Some(first) = listing.skipped.first() {
            return Err(ShardError::BadListing {
                path: first.path.clone(),
                reason: first.reason.clone(),
            });
        }
    }
    let out = &opts.out;
    std::fs::create_dir_all(out.join(PROGRESS_DIR)).map_err(|e| ShardError::io(out, e))?;
    let _lock = lock_output(out, opts.worker_index, opts.num_workers)?;

    let n = listing.items.len();
    let order = if opts.shuffle {
        permutation(n, opts.seed)
    } else {
        (0..n).collect()
    };
    let total_shards = n.div_ceil(opts.shard_rows) as u32;
    let options = opts.output_options(listing);
    let inputs = listing.fingerprint();
    let fingerprint = fingerprint_of(
        &opts.tool_version,
        listing.dataset,
        &listing.split,
        &listing.classes,
        &options,
        &inputs,
        total_shards,
    );
    let mine: Vec<u32> = (0..total_shards)
        .filter(|i| i % opts.num_workers == opts.worker_index)
        .collect();

    // A finished earlier run of the same command: its manifest seeds the journal, then goes,
    // so the folder never shows a manifest that disagrees with its shard files.
    let manifest_name = if opts.num_workers > 1 {
        part_manifest_name(opts.worker_index, opts.num_workers)
    } else {
        MANIFEST_FILE.to_string()
    };
    let old_manifest = out.join(&manifest_name);
    if old_manifest.exists() {
        if let Ok(old) = Manifest::load(&old_manifest) {
            seed_journal_from(&old, out, &fingerprint);
        }
        std::fs::remove_file(&old_manifest).map_err(|e| ShardError::io(&old_manifest, e))?;
        manifest::sync_dir(out);
    }
    // Shards of an earlier run with more shards would confuse `*.parquet` readers.
    if opts.worker_index == 0 {
        remove_shards_from(out, total_shards);
    }

    // Resume: keep shards whose journal record matches and whose file still verifies.
    let mut records: BTreeMap<u32, ShardRecord> = BTreeMap::new();
    for &i in &mine {
        let name = format::shard_file_name(i);
        remove_stale_temps(out, &name);
        if let Some(rec) = load_record(out, i) {
            if rec.fingerprint == fingerprint
                && manifest::verify_shard_file(&out.join(&name), &rec.entry).is_ok()
            {
                records.insert(i, rec);
            }
        }
    }
    let reused = records.len();
    let todo: Vec<u32> = mine
        .iter()
        .copied()
        .filter(|i| !records.contains_key(i))
        .collect();
    let rows_todo: usize = todo
        .iter()
        .map(|&i| shard_range(i, opts.shard_rows, n).len())
        .sum();
    progress.start(rows_todo as u64);
    tracing::info!(
        shards = total_shards,
        mine = mine.len(),
        reused,
        rows = rows_todo,
        "writing shards"
    );

    let threads = if opts.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        opts.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("shard-{i}"))
        .build()
        .map_err(|e| ShardError::InvalidOptions(format!("thread pool: {e}")))?;
    let schema = format::schema(listing.dataset);
    let hashes = HashPairs::new();
    let ctx = ShardCtx {
        listing,
        opts,
        order: &order,
        schema,
        fingerprint: &fingerprint,
        progress,
        hashes: &hashes,
    };
    // One shard at a time per pool thread, each thread taking the next shard as soon as its
    // last one is done: at most `threads` shards in flight (memory stays bounded by a few row
    // groups per thread), and no thread waits for a slower shard to finish before it starts
    // another. Shards are taken in order, so when one fails every lower one has already
    // started; they finish, no new one starts, and the lowest failure is the one reported, as
    // with one thread.
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let done: Mutex<Vec<(u32, Result<ShardRecord>)>> = Mutex::new(Vec::new());
    let lanes = threads.min(todo.len());
    pool.broadcast(|lane| {
        if lane.index() >= lanes {
            return;
        }
        while !failed.load(Ordering::SeqCst) {
            let Some(&i) = todo.get(next.fetch_add(1, Ordering::SeqCst)) else {
                break;
            };
            let rec = ctx.write_shard(i);
            if rec.is_err() {
                failed.store(true, Ordering::SeqCst);
            }
            done.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((i, rec));
        }
        // Out of shards: hash the ones still being written, and run their pending reads.
        hashes.help_until_done(|| rayon::yield_now() == Some(rayon::Yield::Executed));
    });
    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_by_key(|(i, _)| *i);
    for (i, rec) in done {
        records.insert(i, rec?);
    }

    let (paired, alone) = hashes.counts();
    tracing::debug!(
        paired,
        alone,
        "shard bytes hashed two streams at a time, and alone"
    );

    // Assemble the manifest.
    let mut shards = Vec::new();
    let mut skipped: Vec<SkippedEntry> = listing.skipped.clone();
    let mut conversions = Vec::new();
    for rec in records.values() {
        shards.push(rec.entry.clone());
        skipped.extend(rec.skipped.iter().cloned());
        conversions.extend(rec.conversions.iter().cloned());
    }
    let carry_path = out.join(PROGRESS_DIR).join(CARRY_FILE);
    if let Some(carry) = std::fs::read(&carry_path)
        .ok()
        .and_then(|t| serde_json::from_slice::<CarryOver>(&t).ok())
        .filter(|c| c.fingerprint == fingerprint)
    {
        skipped.extend(carry.skipped);
        conversions.extend(carry.conversions);
    }
    skipped.sort_by(|a, b| (&a.path, &a.reason).cmp(&(&b.path, &b.reason)));
    skipped.dedup();
    conversions.sort_by(|a, b| (&a.key, &a.from).cmp(&(&b.key, &b.from)));
    conversions.dedup();
    let converted = conversions.len();
    let part = (opts.num_workers > 1).then_some(PartInfo {
        worker_index: opts.worker_index,
        num_workers: opts.num_workers,
        total_shards,
    });
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        tool: "droppos-pipeline".into(),
        tool_version: opts.tool_version.clone(),
        dataset: listing.dataset,
        split: listing.split.clone(),
        num_rows: shards.iter().map(|s| s.rows).sum(),
        classes: listing.classes.clone(),
        patch_size: opts.patch_size,
        shards,
        skipped,
        conversions,
        options,
        inputs,
        part: part.clone(),
        dir: out.clone(),
    };
    let manifest_path = manifest.save_as(out, &manifest_name)?;
    // The manifest now holds everything the journal did.
    for &i in &mine {
        let _ = std::fs::remove_file(record_path(out, i));
    }
    let _ = std::fs::remove_file(&carry_path);
    // Unlinked while still held: the run is complete, and the empty journal folder goes.
    let _ = std::fs::remove_file(lock_path(out, opts.worker_index, opts.num_workers));
    let _ = std::fs::remove_dir(out.join(PROGRESS_DIR));
    Ok(WriteSummary {
        manifest,
        manifest_path,
        written_shards: todo.len(),
        reused_shards: reused,
        converted,
        inputs_processed: rows_todo,
    })
}

/// Holds an exclusive lock on `out` for this worker ([`crate::lock::try_lock`]): a second run
/// of the same command into the same folder would delete the first one's temp files and
/// journal under it. Workers of one `--num-workers` run lock separately, since they write
/// disjoint shards into one folder on purpose.
fn lock_output(out: &Path, worker: u32, workers: u32) -> Result<Option<File>> {
    let path = lock_path(out, worker, workers);
    crate::lock::try_lock(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            ShardError::Busy {
                out: out.to_path_buf(),
                lock: path.clone(),
            }
        } else {
            ShardError::io(&path, e)
        }
    })
}

fn lock_path(out: &Path, worker: u32, workers: u32) -> PathBuf {
    out.join(PROGRESS_DIR)
        .join(format!("lock-{worker}-of-{workers}"))
}

/// Identity of a run's output: everything that shapes the shard bytes.
fn fingerprint_of(
    tool_version: &str,
    dataset: Dataset,
    split: &str,
    classes: &[crate::manifest::ClassEntry],
    options: &serde_json::Map<String, serde_json::Value>,
    inputs: &InputsInfo,
    total_shards: u32,
) -> String {
    let mut h = Sha256::new();
    h.update(FORMAT_VERSION.to_le_bytes());
    h.update(tool_version.as_bytes());
    h.update([0]);
    h.update(dataset.name());
    h.update([0]);
    h.update(split.as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(classes).unwrap_or_default());
    h.update(serde_json::to_vec(options).unwrap_or_default());
    h.update(inputs.sha256.as_bytes());
    h.update([0]);
    h.update(inputs.stamp.as_bytes());
    h.update(total_shards.to_le_bytes());
    hex::encode(h.finalize())
}

/// Turns the shards of a finished manifest into journal records when it describes the same
/// output (per-shard skipped/conversion lists are not kept in manifests, so they are split
/// back by key order; only used when the fingerprint matches).
fn seed_journal_from(old: &Manifest, out: &Path, fingerprint: &str) {
    let total = old
        .part
        .as_ref()
        .map_or(old.shards.len() as u32, |p| p.total_shards);
    let fp = fingerprint_of(
        &old.tool_version,
        old.dataset,
        &old.split,
        &old.classes,
        &old.options,
        &old.inputs,
        total,
    );
    if fp != fingerprint || old.format_version != FORMAT_VERSION {
        return;
    }
    for s in &old.shards {
        let Some(i) = format::parse_shard_index(&s.file) else {
            continue;
        };
        let rec = ShardRecord {
            fingerprint: fp.clone(),
            entry: s.clone(),
            skipped: Vec::new(),
            conversions: Vec::new(),
        };
        // Skipped/conversion entries of reused shards are carried over below.
        if let Ok(text) = serde_json::to_vec(&rec) {
            let _ = manifest::write_atomic(&record_path(out, i), &text);
        }
    }
    // Keep the old lists whole in a side record so the new manifest is identical.
    let carry = CarryOver {
        fingerprint: fp,
        skipped: old.skipped.clone(),
        conversions: old.conversions.clone(),
    };
    if let Ok(text) = serde_json::to_vec(&carry) {
        let _ = manifest::write_atomic(&out.join(PROGRESS_DIR).join(CARRY_FILE), &text);
    }
}

/// Skipped and conversion lists of a finished manifest whose shards are being reused.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CarryOver {
    fingerprint: String,
    skipped: Vec<SkippedEntry>,
    conversions: Vec<ConversionEntry>,
}

const CARRY_FILE: &str = "carry-over.json";

/// Removes `shard-N.parquet` files with N >= `from`.
fn remove_shards_from(out: &Path, from: u32) {
    if let Ok(rd) = std::fs::read_dir(out) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if format::parse_shard_index(&name).is_some_and(|i| i >= from) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// File name of worker `i`'s part manifest.
pub fn part_manifest_name(worker_index: u32, num_workers: u32) -> String {
    format!("manifest.part-{worker_index:04}-of-{num_workers:04}.json")
}

fn shard_range(i: u32, shard_rows: usize, n: usize) -> std::ops::Range<usize> {
    let start = i as usize * shard_rows;
    start..(start + shard_rows).min(n)
}

fn record_path(out: &Path, i: u32) -> PathBuf {
    out.join(PROGRESS_DIR)
        .join(format::shard_file_name(i).replace(".parquet", ".json"))
}

fn load_record(out: &Path, i: u32) -> Option<ShardRecord> {
    let text = std::fs::read(record_path(out, i)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Removes temp files left by killed runs for shard `name` (`.name.tmp-<pid>`).
fn remove_stale_temps(out: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    if let Ok(rd) = std::fs::read_dir(out) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

struct ShardCtx<'a> {
    listing: &'a Listing,
    opts: &'a WriteOptions,
    order: &'a [usize],
    schema: arrow::datatypes::SchemaRef,
    fingerprint: &'a str,
    progress: &'a dyn Progress,
    hashes: &'a HashPairs<Written>,
}

/// Where a row's stored image bytes are.
enum Image {
    /// Unchanged input bytes at this range of the row group's read buffer (see
    /// [`ShardCtx::prepare_in_place`]).
    InBuffer(std::ops::Range<usize>),
    Owned(Vec<u8>),
}

/// A row ready to be appended.
struct Row<'a> {
    item: &'a InputItem,
    image: Image,
    width: u32,
    height: u32,
    orig_width: u32,
    orig_height: u32,
    mask: Option<Vec<u8>>,
    patch_labels: Option<Vec<i32>>,
    conversions: Vec<ConversionEntry>,
}

/// Asks the kernel to start writing the file's dirty pages to disk now, without waiting.
/// The `sync_all` that seals a shard then has only the last row group left to flush, instead
/// of the whole shard (~70 ms of idle wait per 100 MB shard here) after all the work is done.
fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an fd we own; offset 0, length 0 = the whole file. Failure
        // only means no head start: the later fsync still makes the shard durable.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// The Parquet writer's sink. Bytes go to the file as they come (small writes batched), and
/// every [`HASH_CHUNK`] or so of the file is handed to the shard's hash as a read-only mapping
/// of the pages just written: no copy, and [`HashPairs`] can hash it together with another
/// shard's chunk, two streams at a time. (Copying the bytes instead cost more than the paired
/// hash saves: BENCHMARKS.md.)
struct ShardSink<'p> {
    file: File,
    small: Vec<u8>,
    /// Bytes in the file, and of those, handed to the hash.
    written: u64,
    handed: u64,
    hash: Stream<'p, Written>,
    /// Space reserved ahead ([`Self::preallocate`]): what is left of it goes at the end.
    preallocated: bool,
}

/// A chunk of a shard file as written, for its hash.
enum Written {
    Mapped(memmap2::Mmap),
    /// Read back where the file system refuses a mapping.
    Read(Vec<u8>),
}

impl AsRef<[u8]> for Written {
    fn as_ref(&self) -> &[u8] {
        match self {
            Written::Mapped(m) => m,
            Written::Read(v) => v,
        }
    }
}

/// Writes smaller than this are batched.
const SMALL_WRITE: usize = 64 << 10;
/// Bytes of the file handed to the hash at a time.
const HASH_CHUNK: u64 = 4 << 20;

impl<'p> ShardSink<'p> {
    /// Creates (or truncates) the file at `path`, readable too: the hash reads back what was
    /// written.
    fn create(path: &Path, hash: Stream<'p, Written>) -> std::io::Result<Self> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(ShardSink {
            file,
            small: Vec::with_capacity(SMALL_WRITE),
            written: 0,
            handed: 0,
            hash,
            preallocated: false,
        })
    }

    /// Reserves `bytes` of disk for the file (Linux `fallocate`, the size unchanged) when the
    /// shard's size is known ahead, as it is for images stored as they are: the file system
    /// then allocates the blocks once instead of for every write and again at writeback
    /// (`perf stat`: 4 % less CPU time in original-bytes mode on ext4). Best effort: a file
    /// system that cannot reserve space just allocates as it goes. What is not used is
    /// released by [`Self::finish`].
    fn preallocate(&mut self, bytes: u64) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let Ok(len) = libc::off_t::try_from(bytes) else {
                return;
            };
            if len == 0 {
                return;
            }
            // SAFETY: plain syscall on an fd we own. Its result is not needed: a failure (no
            // support, or no space) may still have reserved part of the range, which
            // `finish` releases all the same.
            unsafe {
                libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len);
            }
            self.preallocated = true;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = bytes;
    }

    fn write_small(&mut self) -> std::io::Result<()> {
        self.file.write_all(&self.small)?;
        self.written += self.small.len() as u64;
        self.small.clear();
        Ok(())
    }

    fn hand_over(&mut self) -> std::io::Result<()> {
        let len = usize::try_from(self.written - self.handed).map_err(std::io::Error::other)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the mapping covers bytes already written to our own temp file (its name
        // carries our pid), which nothing truncates or rewrites while the shard is written:
        // the file only grows at the end.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(self.handed)
                .len(len)
                .populate()
                .map(&self.file)
        };
        let chunk = match map {
            Ok(m) => Written::Mapped(m),
            Err(e) => Written::Read(self.read_back(len, e)?),
        };
        self.hash.submit(chunk);
        self.handed = self.written;
        Ok(())
    }

    #[cfg(unix)]
    fn read_back(&self, len: usize, _: std::io::Error) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut v = vec![0; len];
        self.file.read_exact_at(&mut v, self.handed)?;
        Ok(v)
    }

    #[cfg(not(unix))]
    fn read_back(&self, _: usize, e: std::io::Error) -> std::io::Result<Vec<u8>> {
        Err(e)
    }

    /// Writes what is left; returns the file, its length and its SHA-256.
    fn finish(mut self) -> std::io::Result<(File, u64, [u8; 32])> {
        self.write_small()?;
        self.hand_over()?;
        if self.preallocated {
            // Setting the length the file already has releases the reserved blocks past it.
            self.file.set_len(self.written)?;
        }
        Ok((self.file, self.written, self.hash.finish()))
    }
}

impl Write for ShardSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.small.len() + buf.len() <= SMALL_WRITE {
            self.small.extend_from_slice(buf);
        } else {
            self.write_small()?;
            if buf.len() < SMALL_WRITE {
                self.small.extend_from_slice(buf);
            } else {
                self.file.write_all(buf)?;
                self.written += buf.len() as u64;
            }
        }
        if self.written - self.handed >= HASH_CHUNK {
            self.hand_over()?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ShardCtx<'_> {
    fn props(&self) -> WriterProperties {
        let zstd = ZstdLevel::try_new(self.opts.zstd_level).unwrap_or_default();
        let mut b = WriterProperties::builder()
            .set_compression(Compression::ZSTD(zstd))
            // Encoded images are unique: dictionaries and min/max statistics only cost time.
            .set_dictionary_enabled(false)
            .set_max_row_group_row_count(Some(self.opts.row_group_rows))
            .set_created_by(format!("droppos-pipeline {}", self.opts.tool_version));
        for col in [columns::IMAGE, columns::MASK] {
            b = b.set_column_statistics_enabled(ColumnPath::from(col), EnabledStatistics::None);
            if !self.opts.compress_media {
                b = b.set_column_compression(ColumnPath::from(col), Compression::UNCOMPRESSED);
            }
        }
        b.build()
    }

    fn write_shard(&self, index: u32) -> Result<ShardRecord> {
        let out = &self.opts.out;
        let name = format::shard_file_name(index);
        let final_path = out.join(&name);
        let tmp = manifest::temp_path(&final_path);
        let range = shard_range(index, self.opts.shard_rows, self.order.len());
        let rows_idx = &self.order[range];

        let mut sink =
            ShardSink::create(&tmp, self.hashes.stream()).map_err(|e| ShardError::io(&tmp, e))?;
        if self.reads_in_place() {
            // The images go in as they are: the shard is about their total size.
            sink.preallocate(rows_idx.iter().map(|&k| self.listing.items[k].size).sum());
        }
        let mut writer = ArrowWriter::try_new(sink, self.schema.clone(), Some(self.props()))
            .map_err(|e| ShardError::parquet(&tmp, e))?;
        let mut skipped = Vec::new();
        let mut conversions = Vec::new();
        let mut rows_written = 0u64;
        for chunk in rows_idx.chunks(self.opts.row_group_rows) {
            let (group_buf, prepared) = if self.reads_in_place() {
                self.prepare_in_place(chunk)
            } else {
                let rows = chunk
                    .par_iter()
                    .map(|&k| self.prepare(&self.listing.items[k]))
                    .collect();
                (Vec::new(), rows)
            };
            let mut rows = Vec::with_capacity(prepared.len());
            for (r, &k) in prepared.into_iter().zip(chunk) {
                match r {
                    Ok(row) => rows.push(row),
                    Err(reason) => {
                        let item = &self.listing.items[k];
                        if self.opts.on_error == OnError::Fail {
                            drop(writer);
                            let _ = std::fs::remove_file(&tmp);
                            return Err(ShardError::BadInput {
                                path: item.path.clone(),
                                reason,
                            });
                        }
                        tracing::warn!(path = %item.path.display(), %reason, "skipped");
                        skipped.push(SkippedEntry {
                            path: item.key.clone(),
                            reason: reason.to_string(),
                        });
                    }
                }
            }
            if !rows.is_empty() {
                let batch = self
                    .batch(&rows, group_buf)
                    .map_err(|e| ShardError::parquet(&tmp, e))?;
                writer
                    .write(&batch)
                    .and_then(|_| writer.flush())
                    .map_err(|e| ShardError::parquet(&tmp, e))?;
                start_writeback(&writer.inner().file);
                rows_written += rows.len() as u64;
            }
            for r in rows {
                conversions.extend(r.conversions);
            }
            self.progress.advance(chunk.len() as u64);
        }
        let (file, bytes, sha256) = writer
            .into_inner()
            .map_err(|e| ShardError::parquet(&tmp, e))?
            .finish()
            .map_err(|e| ShardError::io(&tmp, e))?;
        file.sync_all().map_err(|e| ShardError::io(&tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, &final_path).map_err(|e| ShardError::io(&final_path, e))?;
        manifest::sync_dir(out);
        let rec = ShardRecord {
            fingerprint: self.fingerprint.to_string(),
            entry: ShardEntry {
                file: name,
                rows: rows_written,
                bytes,
                sha256: hex::encode(sha256),
            },
            skipped,
            conversions,
        };
        let text =
            serde_json::to_vec(&rec).map_err(|e| ShardError::InvalidOptions(e.to_string()))?;
        manifest::write_atomic(&record_path(out, index), &text)?;
        Ok(rec)
    }

    /// Reads, checks and converts one input (runs on the rayon pool).
    fn prepare<'b>(&self, item: &'b InputItem) -> std::result::Result<Row<'b>, ImageRejection> {
        let bytes = std::fs::read(&item.path)
            .map_err(|e| ImageRejection::Unreadable(crate::datasets::read_error(&item.path, &e)))?;
        self.prepared_row(item, codec::prepare_image(bytes, &self.opts.image)?)
    }

    fn prepared_row<'b>(
        &self,
        item: &'b InputItem,
        img: codec::PreparedImage,
    ) -> std::result::Result<Row<'b>, ImageRejection> {
        let size = Stored {
            width: img.width,
            height: img.height,
            orig_width: img.orig_width,
            orig_height: img.orig_height,
        };
        self.row(item, Image::Owned(img.bytes), size, img.conversion)
    }

    /// Whether row groups are read into one buffer that becomes the image column
    /// ([`Self::prepare_in_place`]): when images are stored as they are (no resize, no restart
    /// markers), on Unix.
    fn reads_in_place(&self) -> bool {
        cfg!(unix) && self.opts.image.resize_short_side.is_none() && !self.opts.image.jpeg_restarts
    }

    /// [`Self::prepare`] for a row group whose images are stored as they are: each file is read
    /// (in parallel) straight into its place in one buffer sized from the listing, which then
    /// becomes the image column's values without a copy (see [`Self::batch`]): no per-file
    /// allocation, no copy of the bytes into the column. A file whose size changed since listing,
    /// an unreadable one and any input that needs converting go through [`Self::prepare`].
    fn prepare_in_place<'b>(
        &'b self,
        chunk: &[usize],
    ) -> (Vec<u8>, Vec<std::result::Result<Row<'b>, ImageRejection>>) {
        let items = &self.listing.items;
        let sizes: Vec<usize> = chunk
            .iter()
            .map(|&k| usize::try_from(items[k].size).unwrap_or(usize::MAX))
            .collect();
        let Some(total) = sizes.iter().try_fold(0usize, |a, &n| a.checked_add(n)) else {
            let rows = chunk.par_iter().map(|&k| self.prepare(&items[k])).collect();
            return (Vec::new(), rows);
        };
        let mut buf: Vec<u8> = Vec::with_capacity(total);
        let mut slots = Vec::with_capacity(chunk.len());
        let mut rest = &mut buf.spare_capacity_mut()[..total];
        let mut start = 0;
        for &n in &sizes {
            let (slot, tail) = rest.split_at_mut(n);
            slots.push((start, slot));
            rest = tail;
            start += n;
        }
        let rows = chunk
            .par_iter()
            .zip(slots.into_par_iter())
            .map(|(&k, (start, slot))| {
                let item = &items[k];
                if !matches!(read_whole_file(&item.path, slot), Ok(true)) {
                    slot.fill(std::mem::MaybeUninit::new(0));
                    return self.prepare(item);
                }
                // SAFETY: `read_whole_file` returned true: every byte of the slot was written.
                let bytes =
                    unsafe { &*(slot as *const [std::mem::MaybeUninit<u8>] as *const [u8]) };
                match codec::stored_as_is(bytes, &self.opts.image)? {
                    Some(a) => {
                        let size = Stored {
                            width: a.width,
                            height: a.height,
                            orig_width: a.width,
                            orig_height: a.height,
                        };
                        self.row(
                            item,
                            Image::InBuffer(start..start + bytes.len()),
                            size,
                            None,
                        )
                    }
                    None => self.prepared_row(
                        item,
                        codec::prepare_image(bytes.to_vec(), &self.opts.image)?,
                    ),
                }
            })
            .collect();
        // SAFETY: every slot of `buf[..total]` was filled by a read or with zeros above.
        unsafe { buf.set_len(total) };
        (buf, rows)
    }

    /// The rest of a row once its image is settled: masks and patch labels.
    fn row<'b>(
        &self,
        item: &'b InputItem,
        image: Image,
        size: Stored,
        conversion: Option<(String, String)>,
    ) -> std::result::Result<Row<'b>, ImageRejection> {
        let mut conversions = Vec::new();
        if let Some((from, to)) = conversion {
            conversions.push(ConversionEntry {
                key: item.key.clone(),
                from,
                to,
            });
        }
        let (w, h) = (size.width, size.height);
        let resized = (w, h) != (size.orig_width, size.orig_height);
        let p = self.opts.patch_size;
        let (mask, patch_labels) = match &item.target {
            Target::Label(_) => (None, None),
            Target::Coco { annotations, .. } => {
                let map =
                    patch_layout::coco_dense_map(annotations, size.orig_height, size.orig_width)
                        .map_err(ImageRejection::BadAnnotation)?;
                let map = if resized {
                    patch_layout::resize_nearest(&map, size.orig_width, size.orig_height, w, h)
                } else {
                    map
                };
                (None, Some(patch_layout::patch_labels_wide(&map, w, h, p)))
            }
            Target::Mask(mask_path) => {
                let mbytes = std::fs::read(mask_path).map_err(|e| {
                    ImageRejection::BadMask(format!(
                        "{}: {}",
                        mask_path.display(),
                        crate::datasets::read_error(mask_path, &e)
                    ))
                })?;
                let m = codec::decode_mask(&mbytes, self.opts.image.max_pixels)?;
                if (m.width, m.height) != (size.orig_width, size.orig_height) {
                    return Err(ImageRejection::BadMask(format!(
                        "mask is {}x{} but the image is {}x{}",
                        m.width, m.height, size.orig_width, size.orig_height
                    )));
                }
                if resized {
                    let data = patch_layout::resize_nearest(&m.data, m.width, m.height, w, h);
                    let labels = patch_layout::patch_labels(&data, w, h, p);
                    let png = codec::encode_png(&codec::Pixels {
                        width: w,
                        height: h,
                        channels: 1,
                        data,
                    })?;
                    (Some(png), Some(labels))
                } else {
                    let labels = patch_layout::patch_labels(&m.data, w, h, p);
                    (Some(mbytes), Some(labels))
                }
            }
        };
        Ok(Row {
            item,
            image,
            width: w,
            height: h,
            orig_width: size.orig_width,
            orig_height: size.orig_height,
            mask,
            patch_labels,
            conversions,
        })
    }

    /// The row group's record batch; `read_buf` is the buffer [`Self::prepare_in_place`] read
    /// the images into (empty otherwise).
    fn batch(
        &self,
        rows: &[Row],
        read_buf: Vec<u8>,
    ) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
        let keys = StringArray::from_iter_values(rows.iter().map(|r| r.item.key.as_str()));
        let images = image_column(rows, read_buf)?;
        let i32col = |f: &dyn Fn(&Row) -> u32| -> ArrayRef {
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| f(r) as i32),
            ))
        };
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(keys),
            Arc::new(images),
            i32col(&|r| r.width),
            i32col(&|r| r.height),
            i32col(&|r| r.orig_width),
            i32col(&|r| r.orig_height),
        ];
        match self.listing.dataset {
            Dataset::Imagenet => {
                cols.push(Arc::new(Int32Array::from_iter_values(rows.iter().map(
                    |r| match r.item.target {
                        Target::Label(l) => l,
                        _ => -1,
                    },
                ))));
            }
            Dataset::Coco => {
                let empty: &[CocoAnnotation] = &[];
                let per_row: Vec<(i64, &[CocoAnnotation])> = rows
                    .iter()
                    .map(|r| match &r.item.target {
                        Target::Coco {
                            image_id,
                            annotations,
                        } => (*image_id, annotations.as_slice()),
                        _ => (-1, empty),
                    })
                    .collect();
                cols.push(Arc::new(Int64Array::from_iter_values(
                    per_row.iter().map(|p| p.0),
                )));
                cols.push(annotations_array(&per_row, &self.schema)?);
            }
            Dataset::Ade20k => {
                cols.push(Arc::new(binary_column(
                    rows.iter().map(|r| r.mask.as_deref().unwrap_or_default()),
                )));
            }
        }
        if self.listing.dataset.has_patch_labels() {
            let field = item_field(
                self.schema
                    .field_with_name(columns::PATCH_LABELS)?
                    .data_type(),
            );
            let lens: Vec<usize> = rows
                .iter()
                .map(|r| r.patch_labels.as_ref().map_or(0, |v| v.len()))
                .collect();
            let values: Vec<i32> = rows
                .iter()
                .flat_map(|r| r.patch_labels.iter().flatten().copied())
                .collect();
            cols.push(Arc::new(ListArray::try_new(
                field,
                OffsetBuffer::from_lengths(lens),
                Arc::new(Int32Array::from(values)),
                None,
            )?));
        }
        RecordBatch::try_new(self.schema.clone(), cols)
    }
}

fn item_field(dt: &DataType) -> FieldRef {
    match dt {
        DataType::List(f) => f.clone(),
        other => panic!("schema bug: {other} is not a list"),
    }
}

fn list(
    dt: &DataType,
    lens: Vec<usize>,
    values: ArrayRef,
    valid: Option<Vec<bool>>,
) -> std::result::Result<ArrayRef, arrow::error::ArrowError> {
    Ok(Arc::new(ListArray::try_new(
        item_field(dt),
        OffsetBuffer::from_lengths(lens),
        values,
        valid.map(NullBuffer::from),
    )?))
}

/// Builds the `annotations` column: list<struct> with the fields of
/// [`format::annotation_fields`].
fn annotations_array(
    per_row: &[(i64, &[CocoAnnotation])],
    schema: &arrow::datatypes::SchemaRef,
) -> std::result::Result<ArrayRef, arrow::error::ArrowError> {
    let outer = schema
        .field_with_name(columns::ANNOTATIONS)?
        .data_type()
        .clone();
    let fields = format::annotation_fields();
    let dt = |name: &str| {
        fields
            .find(name)
            .map(|(_, f)| f.data_type().clone())
            .unwrap()
    };
    let anns: Vec<&CocoAnnotation> = per_row.iter().flat_map(|p| p.1.iter()).collect();
    use format::annotation as A;

    let id = Arc::new(Int64Array::from_iter_values(anns.iter().map(|a| a.id))) as ArrayRef;
    let cat_id = Arc::new(Int32Array::from_iter_values(
        anns.iter().map(|a| a.category_id),
    ));
    let cat_idx = Arc::new(Int32Array::from_iter_values(
        anns.iter().map(|a| a.category_index),
    ));
    let bbox = list(
        &dt(A::BBOX),
        anns.iter().map(|a| a.bbox.len()).collect(),
        Arc::new(Float64Array::from_iter_values(
            anns.iter().flat_map(|a| a.bbox.iter().copied()),
        )),
        None,
    )?;
    let area = Arc::new(Float64Array::from_iter_values(anns.iter().map(|a| a.area)));
    let iscrowd = Arc::new(Int32Array::from_iter_values(anns.iter().map(|a| a.iscrowd)));

    // polygons: list<list<f64>>, null for RLE annotations.
    fn polys<'a>(a: &&'a CocoAnnotation) -> Option<&'a Vec<Vec<f64>>> {
        match &a.segmentation {
            Segmentation::Polygons(p) => Some(p),
            _ => None,
        }
    }
    let inner_dt = match dt(A::POLYGONS) {
        DataType::List(f) => f.data_type().clone(),
        _ => unreachable!(),
    };
    let inner_lens: Vec<usize> = anns
        .iter()
        .filter_map(polys)
        .flat_map(|p| p.iter().map(|q| q.len()))
        .collect();
    let inner_vals = Float64Array::from_iter_values(
        anns.iter()
            .filter_map(polys)
            .flat_map(|p| p.iter().flat_map(|q| q.iter().copied())),
    );
    let inner = list(&inner_dt, inner_lens, Arc::new(inner_vals), None)?;
    let polygons = list(
        &dt(A::POLYGONS),
        anns.iter()
            .map(|a| polys(a).map_or(0, |p| p.len()))
            .collect(),
        inner,
        Some(anns.iter().map(|a| polys(a).is_some()).collect()),
    )?;

    let rle_size_of = |a: &&CocoAnnotation| match &a.segmentation {
        Segmentation::Rle { size, .. } | Segmentation::RleString { size, .. } => Some(*size),
        _ => None,
    };
    let rle_size = list(
        &dt(A::RLE_SIZE),
        anns.iter()
            .map(|a| rle_size_of(a).map_or(0, |_| 2))
            .collect(),
        Arc::new(Int32Array::from_iter_values(
            anns.iter()
                .filter_map(rle_size_of)
                .flat_map(|s| s.map(|v| v as i32)),
        )),
        Some(anns.iter().map(|a| rle_size_of(a).is_some()).collect()),
    )?;
    fn counts_of<'a>(a: &&'a CocoAnnotation) -> Option<&'a Vec<i64>> {
        match &a.segmentation {
            Segmentation::Rle { counts, .. } => Some(counts),
            _ => None,
        }
    }
    let rle_counts = list(
        &dt(A::RLE_COUNTS),
        anns.iter()
            .map(|a| counts_of(a).map_or(0, |c| c.len()))
            .collect(),
        Arc::new(Int64Array::from_iter_values(
            anns.iter().filter_map(counts_of).flatten().copied(),
        )),
        Some(anns.iter().map(|a| counts_of(a).is_some()).collect()),
    )?;
    let rle_string = Arc::new(StringArray::from_iter(anns.iter().map(
        |a| match &a.segmentation {
            Segmentation::RleString { counts, .. } => Some(counts.as_str()),
            _ => None,
        },
    )));
    let extra = Arc::new(StringArray::from_iter(
        anns.iter().map(|a| a.extra.as_deref()),
    ));

    let structs = StructArray::try_new(
        fields,
        vec![
            id, cat_id, cat_idx, bbox, area, iscrowd, polygons, rle_size, rle_counts, rle_string,
            extra,
        ],
        None,
    )?;
    list(
        &outer,
        per_row.iter().map(|p| p.1.len()).collect(),
        Arc::new(structs),
        None,
    )
}

/// Joins the part manifests of a `--num-workers` run into `out/manifest.json`. Parts are part
/// manifest files or folders holding them; shard files outside `out` are copied in (and
/// checked). The result is the manifest a single-worker run would have written.
pub fn merge_parts(out: &Path, parts: &[PathBuf]) -> Result<Manifest> {
    let mut manifests = Vec::new();
    // Each manifest's file, for messages.
    let mut files = Vec::new();
    for p in parts {
        if p.is_dir() {
            let mut found = Vec::new();
            for e in std::fs::read_dir(p)
                .map_err(|e| ShardError::io(p, e))?
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("manifest.part-") && name.ends_with(".json") {
                    found.push(e.path());
                }
            }
            found.sort();
            if found.is_empty() {
                return Err(ShardError::manifest(
                    p,
                    "no manifest.part-*.json in this folder",
                ));
            }
            for f in found {
                manifests.push(Manifest::load(&f)?);
                files.push(f);
            }
        } else {
            manifests.push(Manifest::load(p)?);
            files.push(p.clone());
        }
    }
    tracing::info!(parts = manifests.len(), "merging part manifests");
    let first = manifests
        .first()
        .ok_or_else(|| ShardError::InvalidOptions("shard merge needs at least one part".into()))?
        .clone();
    let info = first
        .part
        .clone()
        .ok_or_else(|| ShardError::manifest(&files[0], "not a part manifest (no `part`)"))?;
    let mut seen = vec![false; info.num_workers as usize];
    for (m, file) in manifests.iter().zip(&files) {
        // Named by its manifest file: several parts can share a folder.
        let bad = |msg: &str| ShardError::manifest(file, msg.to_string());
        let p = m.part.as_ref().ok_or_else(|| bad("not a part manifest"))?;
        if p.num_workers != info.num_workers {
            return Err(bad(&format!(
                "parts come from runs with different worker counts ({} and {} in {})",
                p.num_workers,
                info.num_workers,
                files[0].display()
            )));
        }
        if p.total_shards != info.total_shards {
            return Err(bad(&format!(
                "parts come from runs with different shard counts ({} and {} in {}): other \
                 inputs or --shard-rows",
                p.total_shards,
                info.total_shards,
                files[0].display()
            )));
        }
        let mut differ: Vec<String> = Vec::new();
        if m.dataset != first.dataset {
            differ.push("dataset".into());
        }
        if m.split != first.split {
            differ.push("split".into());
        }
        if m.options != first.options {
            // Name the settings, so a user merging many parts sees which command line differed.
            let keys = m.options.keys().chain(first.options.keys());
            let mut names: Vec<&String> = keys
                .filter(|k| m.options.get(*k) != first.options.get(*k))
                .collect();
            names.sort();
            names.dedup();
            differ.extend(names.iter().map(|k| format!("option `{k}`")));
        }
        // Not the stamp: each node's copy of a dataset has its own modification times.
        if (m.inputs.count, &m.inputs.sha256) != (first.inputs.count, &first.inputs.sha256) {
            differ.push("inputs (the listed files, sizes or labels)".into());
        }
        if m.classes != first.classes {
            differ.push("classes".into());
        }
        if m.patch_size != first.patch_size {
            differ.push("patch_size".into());
        }
        if m.tool_version != first.tool_version {
            differ.push("tool version".into());
        }
        if !differ.is_empty() {
            return Err(bad(&format!(
                "parts come from different inputs or options; differing from {}: {}",
                files[0].display(),
                differ.join(", ")
            )));
        }
        if std::mem::replace(&mut seen[p.worker_index as usize], true) {
            return Err(bad(&format!("worker {} given twice", p.worker_index)));
        }
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(ShardError::InvalidOptions(format!(
            "part of worker {missing} of {} is missing",
            info.num_workers
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| ShardError::io(out, e))?;
    let mut shards: Vec<(u32, ShardEntry)> = Vec::new();
    let mut skipped = Vec::new();
    let mut conversions = Vec::new();
    for m in &manifests {
        for (i, s) in m.shards.iter().enumerate() {
            let idx = format::parse_shard_index(&s.file).ok_or_else(|| {
                ShardError::manifest(&m.dir, format!("odd shard name {}", s.file))
            })?;
            let src = m.shard_path(i);
            let dst = out.join(&s.file);
            let same = match (src.canonicalize(), dst.canonicalize()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
            // Checked in place too (parts written into one shared folder): a truncated or
            // changed shard must not make it into the merged manifest.
            manifest::verify_shard_file(&src, s)?;
            if !same {
                let tmp = manifest::temp_path(&dst);
                if std::fs::hard_link(&src, &tmp).is_err() {
                    std::fs::copy(&src, &tmp).map_err(|e| ShardError::io(&src, e))?;
                }
                std::fs::rename(&tmp, &dst).map_err(|e| ShardError::io(&dst, e))?;
            }
            shards.push((idx, s.clone()));
        }
        skipped.extend(m.skipped.iter().cloned());
        conversions.extend(m.conversions.iter().cloned());
    }
    shards.sort_by_key(|s| s.0);
    if shards.len() != info.total_shards as usize
        || shards.iter().enumerate().any(|(k, s)| s.0 != k as u32)
    {
        return Err(ShardError::InvalidOptions(format!(
            "parts hold {} of {} shards",
            shards.len(),
            info.total_shards
        )));
    }
    skipped.sort_by(|a: &SkippedEntry, b| (&a.path, &a.reason).cmp(&(&b.path, &b.reason)));
    skipped.dedup();
    conversions.sort_by(|a: &ConversionEntry, b| a.key.cmp(&b.key));
    conversions.dedup();
    let shards: Vec<ShardEntry> = shards.into_iter().map(|s| s.1).collect();
    let merged = Manifest {
        num_rows: shards.iter().map(|s| s.rows).sum(),
        shards,
        skipped,
        conversions,
        part: None,
        dir: out.to_path_buf(),
        ..first
    };
    merged.save(out)?;
    Ok(merged)
}

/// The stored size of a row's image and the source's.
struct Stored {
    width: u32,
    height: u32,
    orig_width: u32,
    orig_height: u32,
}

/// The image column: the read buffer itself when the rows' images are all in it, back to back
/// and covering it (every row of the group kept and stored as read), else a copy.
fn image_column(
    rows: &[Row],
    read_buf: Vec<u8>,
) -> std::result::Result<BinaryArray, arrow::error::ArrowError> {
    let mut offsets = Vec::with_capacity(rows.len() + 1);
    offsets.push(0i32);
    let mut end = 0usize;
    let contiguous = rows.iter().all(|r| match &r.image {
        Image::InBuffer(range) if range.start == end => {
            end = range.end;
            i32::try_from(end).is_ok_and(|e| {
                offsets.push(e);
                true
            })
        }
        _ => false,
    });
    if contiguous && end == read_buf.len() {
        return BinaryArray::try_new(
            OffsetBuffer::new(offsets.into()),
            arrow::buffer::Buffer::from_vec(read_buf),
            None,
        );
    }
    Ok(binary_column(rows.iter().map(|r| match &r.image {
        Image::InBuffer(range) => &read_buf[range.clone()],
        Image::Owned(v) => v.as_slice(),
    })))
}

/// Reads the whole file at `path` into `slot` if it holds exactly `slot.len()` bytes: `Ok(true)`
/// with every byte of `slot` written, `Ok(false)` when the size differs (changed since listing).
#[cfg(unix)]
fn read_whole_file(path: &Path, slot: &mut [std::mem::MaybeUninit<u8>]) -> std::io::Result<bool> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut f = File::open(path)?;
    let mut done = 0;
    while done < slot.len() {
        let rest = &mut slot[done..];
        // SAFETY: read(2) writes at most `rest.len()` bytes at `rest`'s start, memory this
        // function holds exclusively; nothing reads it as initialised until it returns true.
        let n = unsafe { libc::read(f.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(false);
        }
        done += n as usize;
    }
    let mut probe = [0u8; 1];
    loop {
        match f.read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return Ok(r? == 0),
        }
    }
}

#[cfg(not(unix))]
fn read_whole_file(_: &Path, _: &mut [std::mem::MaybeUninit<u8>]) -> std::io::Result<bool> {
    Ok(false)
}

/// A binary column sized up front: `from_iter_values` grows its value buffer by doubling, which
/// copies the image bytes again on every growth.
fn binary_column<'a>(values: impl Iterator<Item = &'a [u8]> + Clone) -> BinaryArray {
    let bytes = values.clone().map(<[u8]>::len).sum();
    let mut b = BinaryBuilder::with_capacity(values.size_hint().0, bytes);
    for v in values {
        b.append_value(v);
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sha256::tests::bytes;
    use sha2::{Digest, Sha256};

    #[test]
    fn shard_sink_writes_and_hashes_every_byte_in_order() {
        // Writes of every size class (batched, straight through, across chunk boundaries)
        // from two sinks at once, so their chunks get paired.
        let dir = tempfile::tempdir().unwrap();
        let pairs = HashPairs::new();
        let data: Vec<Vec<u8>> = (0..2).map(|s| bytes(9 << 20, s)).collect();
        let sizes = [1, 100, SMALL_WRITE - 1, SMALL_WRITE, 3 << 20, 7, 1 << 20];
        let sink =
            |i: usize| ShardSink::create(&dir.path().join(format!("{i}")), pairs.stream()).unwrap();
        let mut sinks = [sink(0), sink(1)];
        let mut at = [0usize; 2];
        for k in 0.. {
            let mut done = true;
            for (i, s) in sinks.iter_mut().enumerate() {
                let n = sizes[(k + i) % sizes.len()].min(data[i].len() - at[i]);
                if n > 0 {
                    assert_eq!(s.write(&data[i][at[i]..at[i] + n]).unwrap(), n);
                    at[i] += n;
                    done = false;
                }
            }
            if done {
                break;
            }
        }
        // The fallback for file systems without mmap reads the same bytes back.
        let s = &sinks[0];
        let (from, to) = (s.handed as usize, s.written as usize);
        assert!(to > from);
        let back = s
            .read_back(to - from, std::io::Error::other("test"))
            .unwrap();
        assert_eq!(back, data[0][from..to]);
        for (i, s) in sinks.into_iter().enumerate() {
            let (_, len, sha) = s.finish().unwrap();
            let file = std::fs::read(dir.path().join(format!("{i}"))).unwrap();
            assert_eq!(file, data[i]);
            assert_eq!(len, file.len() as u64);
            assert_eq!(sha, <[u8; 32]>::from(Sha256::digest(&file)));
        }
        let (paired, _) = pairs.counts();
        assert!(paired > 0);
    }

    #[test]
    fn space_reserved_ahead_and_not_used_is_released() {
        // More reserved than written (say, inputs skipped): the file ends where the bytes do,
        // holds no more disk than they need, and hashes as before.
        let dir = tempfile::tempdir().unwrap();
        let pairs = HashPairs::new();
        let path = dir.path().join("s");
        let mut sink = ShardSink::create(&path, pairs.stream()).unwrap();
        sink.preallocate(64 << 20);
        let data = bytes(300_000, 9);
        sink.write_all(&data).unwrap();
        let (file, len, sha) = sink.finish().unwrap();
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(len, data.len() as u64);
        assert_eq!(sha, <[u8; 32]>::from(Sha256::digest(&data)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let on_disk = std::fs::metadata(&path).unwrap().blocks() * 512;
            assert!(on_disk < 4 << 20, "{on_disk} bytes on disk for {len}");
        }
    }
}
