//! The SHA-256 of the shards being written at the same time, hashed two streams at a time.
//!
//! Each shard writer hands over its file's bytes a chunk at a time ([`Stream::submit`]; the
//! writer's chunks are read-only mappings of what it has just written, so nothing is copied).
//! A writer that finds another shard's chunk waiting hashes the two together
//! ([`crate::sha256::update_pair`], about 1.7× the bytes per second of one stream here);
//! otherwise it leaves its own chunk waiting for a partner, at most [`WAITING`] of them, and
//! hashes the oldest alone beyond that, so a lone shard is never held up. A stream's chunks are
//! always hashed in the order they were submitted: one thread at a time holds a stream's
//! hasher, and only the front of its queue is taken.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::sha256::{update_pair, Sha256};

/// Chunks a stream keeps waiting for a partner before it hashes them alone.
const WAITING: usize = 8;

/// The hashes of the shards in flight; `C` is a chunk of bytes.
pub struct HashPairs<C> {
    inner: Mutex<Inner<C>>,
    /// Signalled whenever a hasher is handed back.
    returned: Condvar,
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
            returned: Condvar::new(),
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
                g = self.returned.wait(g).unwrap_or_else(|e| e.into_inner());
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
            self.returned.notify_all();
            // Release the chunks (for a mapping, an munmap) without holding the lock.
            drop(g);
            drop((ca, spent_b));
            g = self.lock();
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
