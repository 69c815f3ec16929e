//! `droppos-pipeline bench sha256`: single-thread SHA-256 throughput, one stream at a time
//! (the `sha2` crate and ours) against two streams hashed together (what the shard writer
//! does for the shards it writes at once), on the same in-memory bytes.

use std::time::Instant;

use anyhow::Result;
use droppos_shards::sha256::{pairs_interleaved, update_pair, Sha256};
use serde::Serialize;

use super::bench_rounds::median;
use sha2::Digest;

/// What the command does (its one-line help in both binaries).
pub const ABOUT: &str = "Single-thread SHA-256 throughput: one stream vs two streams hashed \
    together (the shard writer's manifest hashes)";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// MiB per stream.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Rounds, each variant once per round, alternating (medians reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Serialize)]
struct Report {
    mib_per_stream: usize,
    /// Whether the CPU runs two streams interleaved (x86-64 SHA extensions).
    interleaved: bool,
    sha2_crate_gb_per_s: f64,
    one_stream_gb_per_s: f64,
    two_streams_gb_per_s: f64,
    speedup: f64,
    rounds: usize,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(
        args.rounds > 0 && args.mib > 0,
        "--rounds and --mib must be positive"
    );
    let n = args.mib << 20;
    // Any bytes do (SHA-256 takes the same time for every input); two different streams.
    let data = |seed: u64| -> Vec<u8> {
        (0..n as u64)
            .map(|i| ((i ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect()
    };
    let (a, b) = (data(1), data(2));
    // 1 MiB updates, as the writer gets row groups' bytes piece by piece.
    let piece = 1 << 20;
    let gbs = |bytes: usize, t: Instant| bytes as f64 / t.elapsed().as_secs_f64() / 1e9;
    let (mut crate_r, mut one_r, mut two_r) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        let t = Instant::now();
        let mut h = sha2::Sha256::new();
        a.chunks(piece)
            .chain(b.chunks(piece))
            .for_each(|c| h.update(c));
        std::hint::black_box(h.finalize());
        crate_r.push(gbs(2 * n, t));

        let t = Instant::now();
        let mut h = Sha256::new();
        a.chunks(piece)
            .chain(b.chunks(piece))
            .for_each(|c| h.update(c));
        std::hint::black_box(h.finalize());
        one_r.push(gbs(2 * n, t));

        let t = Instant::now();
        let (mut ha, mut hb) = (Sha256::new(), Sha256::new());
        for (ca, cb) in a.chunks(piece).zip(b.chunks(piece)) {
            update_pair(&mut ha, ca, &mut hb, cb);
        }
        std::hint::black_box((ha.finalize(), hb.finalize()));
        two_r.push(gbs(2 * n, t));
    }
    let (c, one, two) = (median(crate_r), median(one_r), median(two_r));
    let report = Report {
        mib_per_stream: args.mib,
        interleaved: pairs_interleaved(),
        sha2_crate_gb_per_s: c,
        one_stream_gb_per_s: one,
        two_streams_gb_per_s: two,
        speedup: two / one,
        rounds: args.rounds,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
