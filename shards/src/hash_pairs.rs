//! The SHA-256 of the shards being written at the same time, hashed two streams at a time.
//!
//! Each shard writer hands over its file's bytes a chunk at a time ([`Stream::submit`]; the
//! writer's chunks are read-only mappings of what it has just written, so nothing is copied).
//! A writer that finds another shard's chunk waiting hashes the two together
//! ([`crate::sha256::update_pair`], about 1.7× the bytes per second of one stream here);
//! otherwise it leaves its own chunk waiting for a partner, at most [`WAITING`] of them, and
//! hashes the oldest alone beyond that, so a lone shard is never held up. A stream's chunks are
//! always hashed in the order they were submitted: one thread at a time holds a stream's
//! hasher, and only the front of its queue is taken. A thread with no shard of its own left can
//! hash the others' waiting chunks ([`HashPairs::help_until_done`]), so that the last shards of
//! a run need not hash theirs alone after their last row group.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::sha256::{update_pair, Sha256};

/// Chunks a stream keeps waiting for a partner before it hashes them alone.
const WAITING: usize = 8;

/// The hashes of the shards in flight; `C` is a chunk of bytes.
pub struct HashPairs<C> {
    inner: Mutex<Inner<C>>,
    /// Signalled whenever a hasher is handed back or a chunk arrives.
    changed: Condvar,
}

struct Inner<C> {
    streams: HashMap<u64, Queue<C>>,
    next_id: u64,
    /// Bytes hashed together with another stream's, and alone.
    paired: u64,
    alone: u64,
}

struct Queue<C> {
    /// `None` while a thread is hashing this stream's bytes.
    hasher: Option<Sha256>,
    waiting: VecDeque<C>,
}

impl<C> Queue<C> {
    fn ready(&self) -> bool {
        self.hasher.is_some() && !self.waiting.is_empty()
    }
}

/// One shard's hash in progress. Dropping it unfinished discards it.
pub struct Stream<'p, C: AsRef<[u8]>> {
    pairs: &'p HashPairs<C>,
    id: u64,
}

impl<C: AsRef<[u8]>> Default for HashPairs<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: AsRef<[u8]>> HashPairs<C> {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                streams: HashMap::new(),
                next_id: 0,
                paired: 0,
                alone: 0,
            }),
            changed: Condvar::new(),
        }
    }

    pub fn stream(&self) -> Stream<'_, C> {
        let mut g = self.lock();
        let id = g.next_id;
        g.next_id += 1;
        g.streams.insert(
            id,
            Queue {
                hasher: Some(Sha256::new()),
                waiting: VecDeque::new(),
            },
        );
        Stream { pairs: self, id }
    }

    /// Bytes hashed so far together with another stream's, and alone (to within a block per
    /// pairing).
    pub fn counts(&self) -> (u64, u64) {
        let g = self.lock();
        (g.paired, g.alone)
    }

    fn lock(&self) -> MutexGuard<'_, Inner<C>> {
        // A panic while holding the lock leaves no half-done state (hashing runs unlocked).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hashes `id`'s waiting chunks, paired with another stream's where one is ready: when
    /// `finishing`, all of them (waiting for a lent hasher to come back); otherwise until at
    /// most [`WAITING`] wait for a partner.
    fn work<'g>(
        &'g self,
        mut g: MutexGuard<'g, Inner<C>>,
        id: u64,
        finishing: bool,
    ) -> MutexGuard<'g, Inner<C>> {
        let keep = if finishing { 0 } else { WAITING };
        loop {
            let Some(own) = g.streams.get(&id) else {
                return g;
            };
            let n = own.waiting.len();
            if own.hasher.is_none() {
                // Another thread is hashing this stream's front chunk: it hands the hasher
                // back within one chunk's hashing.
                if !finishing && n <= keep + 1 {
                    return g;
                }
                g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if n == 0 {
                return g;
            }
            let partner = g
                .streams
                .iter()
                .filter(|(&k, q)| k != id && q.ready())
                .map(|(&k, _)| k)
                .min();
            if partner.is_none() && n <= keep {
                return g;
            }
            g = self.step(g, id, partner);
        }
    }

    /// Hashes the front chunk of `id` (ready), together with the front chunk of `partner`
    /// (ready) if there is one; returns with the lock held again.
    fn step<'g>(
        &'g self,
        mut g: MutexGuard<'g, Inner<C>>,
        id: u64,
        partner: Option<u64>,
    ) -> MutexGuard<'g, Inner<C>> {
        let Some((mut ha, ca)) = take(&mut g, id) else {
            return g;
        };
        let mut other = partner.and_then(|p| take(&mut g, p).map(|(h, c)| (p, h, c)));
        drop(g);
        let da = ca.as_ref();
        let (paired, alone) = match other.as_mut() {
            Some((_, hb, cb)) => {
                let db = cb.as_ref();
                update_pair(&mut ha, da, hb, db);
                let common = da.len().min(db.len());
                (2 * common, da.len() + db.len() - 2 * common)
            }
            None => {
                ha.update(da);
                (0, da.len())
            }
        };
        g = self.lock();
        g.paired += paired as u64;
        g.alone += alone as u64;
        give_back(&mut g, id, ha);
        let spent_b = other.map(|(p, hb, cb)| {
            give_back(&mut g, p, hb);
            cb
        });
        self.changed.notify_all();
        // Release the chunks (for a mapping, an munmap) without holding the lock.
        drop(g);
        drop((ca, spent_b));
        self.lock()
    }

    /// For a thread whose own shards are all written while others are still being written:
    /// hashes their waiting chunks (two streams together where two are ready) as they come,
    /// until no stream is left. At the end of a run the last shards have no partner left, so
    /// their chunks would otherwise wait and be hashed one after another by their own writer,
    /// after its last row group, while this thread idles. When nothing is waiting it calls
    /// `other_work` (which returns whether it did something, e.g. a pending job of the thread
    /// pool), and otherwise sleeps until a chunk arrives (or briefly, for more `other_work`).
    pub fn help_until_done(&self, mut other_work: impl FnMut() -> bool) {
        let mut g = self.lock();
        while !g.streams.is_empty() {
            let mut ready = g.streams.iter().filter(|(_, q)| q.ready()).map(|(&k, _)| k);
            let (first, second) = (ready.next(), ready.next());
            if let Some(a) = first {
                g = self.step(g, a, second);
                continue;
            }
            drop(g);
            if other_work() {
                g = self.lock();
                continue;
            }
            g = self.lock();
            if g.streams.is_empty() {
                break;
            }
            g = self
                .changed
                .wait_timeout(g, std::time::Duration::from_millis(2))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Lends out a stream's hasher with its oldest waiting chunk.
fn take<C>(g: &mut Inner<C>, id: u64) -> Option<(Sha256, C)> {
    let q = g.streams.get_mut(&id).filter(|q| q.ready())?;
    Some((q.hasher.take()?, q.waiting.pop_front()?))
}

/// Returns a lent hasher (dropped if its stream was abandoned meanwhile).
fn give_back<C>(g: &mut Inner<C>, id: u64, hasher: Sha256) {
    if let Some(q) = g.streams.get_mut(&id) {
        q.hasher = Some(hasher);
    }
}

impl<C: AsRef<[u8]>> Stream<'_, C> {
    /// The next bytes of this stream (of the shard file, in file order).
    pub fn submit(&self, chunk: C) {
        if chunk.as_ref().is_empty() {
            return;
        }
        let mut g = self.pairs.lock();
        match g.streams.get_mut(&self.id) {
            Some(q) => q.waiting.push_back(chunk),
            None => return,
        }
        // A helper (`help_until_done`) may be waiting for it.
        self.pairs.changed.notify_all();
        drop(self.pairs.work(g, self.id, false));
    }

    /// Hashes what is left and returns the SHA-256 of everything submitted.
    pub fn finish(self) -> [u8; 32] {
        let g = self.pairs.lock();
        let mut g = self.pairs.work(g, self.id, true);
        // `work` returned with nothing waiting and the hasher home: the stream is ours alone.
        let hasher = g.streams.remove(&self.id).and_then(|q| q.hasher);
        drop(g);
        hasher.unwrap_or_default().finalize()
    }
}

impl<C: AsRef<[u8]>> Drop for Stream<'_, C> {
    fn drop(&mut self) {
        let q = self.pairs.lock().streams.remove(&self.id);
        // A hasher lent out at this moment is dropped when it comes back (`give_back`).
        drop(q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sha256::tests::bytes;
    use sha2::Digest;

    #[test]
    fn concurrent_streams_hash_as_sha2_does() {
        // Eight streams on four threads, chunks of uneven sizes (empty ones too), submitted
        // as the threads happen to run: each digest must be the plain SHA-256 of its chunks.
        let pairs = HashPairs::new();
        let inputs: Vec<Vec<Vec<u8>>> = (0..8usize)
            .map(|s| {
                (0..3 + 2 * s)
                    .map(|c| {
                        let n = if c % 4 == 3 {
                            0
                        } else {
                            (s * 7919 + c * 104_729) % 300_000
                        };
                        bytes(n, (s * 100 + c) as u64)
                    })
                    .collect()
            })
            .collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let got: Vec<[u8; 32]> = pool.install(|| {
            use rayon::prelude::*;
            inputs
                .par_iter()
                .map(|chunks| {
                    let s = pairs.stream();
                    for c in chunks {
                        s.submit(c.clone());
                    }
                    s.finish()
                })
                .collect()
        });
        for (chunks, got) in inputs.iter().zip(got) {
            let mut h = sha2::Sha256::new();
            chunks.iter().for_each(|c| h.update(c));
            assert_eq!(got, <[u8; 32]>::from(h.finalize()));
        }
        assert!(pairs.lock().streams.is_empty());
    }

    #[test]
    fn a_helper_hashes_waiting_chunks_and_returns_when_the_streams_are_done() {
        let pairs = HashPairs::new();
        let data: Vec<Vec<u8>> = (0..6)
            .map(|c| bytes(100_000 + c * 7_001, c as u64))
            .collect();
        let (a, b) = (pairs.stream(), pairs.stream());
        let (ga, gb) = std::thread::scope(|s| {
            let helper = s.spawn(|| pairs.help_until_done(|| false));
            // One chunk of `b`, then `a` alone: its chunks would wait for a partner, the
            // helper takes them.
            b.submit(data[0].clone());
            let gb = b.finish();
            for c in &data[1..] {
                a.submit(c.clone());
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !pairs.lock().streams[&a.id].waiting.is_empty() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the helper took no chunk"
                );
                std::thread::yield_now();
            }
            let ga = a.finish();
            helper.join().unwrap();
            (ga, gb)
        });
        let digest = |chunks: &[Vec<u8>]| {
            let mut h = sha2::Sha256::new();
            chunks.iter().for_each(|c| h.update(c));
            <[u8; 32]>::from(h.finalize())
        };
        assert_eq!(ga, digest(&data[1..]));
        assert_eq!(gb, digest(&data[..1]));
        let (paired, alone) = pairs.counts();
        assert_eq!(
            paired + alone,
            data.iter().map(|c| c.len() as u64).sum::<u64>()
        );
        assert!(pairs.lock().streams.is_empty());
    }

    #[test]
    fn chunks_wait_for_a_partner_and_an_abandoned_stream_leaves_the_others_intact() {
        let pairs = HashPairs::new();
        let (a, b) = (pairs.stream(), pairs.stream());
        let (da, db) = (bytes(200_000, 1), bytes(150_000, 2));
        a.submit(da.clone());
        // `a`'s chunk waits for a partner, so `b`'s is hashed with it.
        b.submit(db.clone());
        assert_eq!(pairs.counts(), (2 * 150_000, 50_000));
        b.submit(db.clone());
        drop(b);
        a.submit(da.clone());
        let mut h = sha2::Sha256::new();
        h.update(&da);
        h.update(&da);
        assert_eq!(a.finish(), <[u8; 32]>::from(h.finalize()));
        assert!(pairs.lock().streams.is_empty());
    }
}
