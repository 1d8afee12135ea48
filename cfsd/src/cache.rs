//! The path cache: a byte-bounded LRU of verified content blocks, apart from the store,
//! and the rules for what may enter it. A block is admitted only when (a) this node routed
//! a lookup for its key for the same requester shortly before, (b) that requester's
//! bucket is under its offer rate, and (c) when the cache is full, the block is requested
//! more often than the one it would evict (TinyLFU: Einziger et al., 2017), so a flood of
//! one-off blocks cannot push out a popular one.

use cfs_core::ring::{source_bucket, source_network};
use cfs_core::{BlockKind, Id};
use lru::LruCache;
use std::net::IpAddr;
use std::time::Duration;
use tokio::time::Instant;

pub struct ByteLru {
    map: LruCache<(BlockKind, Id), Vec<u8>>,
    bytes: usize,
    cap: usize,
}

impl ByteLru {
    pub fn new(cap_bytes: usize) -> ByteLru {
        ByteLru {
            map: LruCache::unbounded(),
            bytes: 0,
            cap: cap_bytes,
        }
    }
    pub fn get(&mut self, kind: BlockKind, key: Id) -> Option<Vec<u8>> {
        self.map.get(&(kind, key)).cloned()
    }
    pub fn insert(&mut self, kind: BlockKind, key: Id, bytes: Vec<u8>) {
        if bytes.len() > self.cap {
            return;
        }
        self.bytes += bytes.len();
        if let Some(old) = self.map.put((kind, key), bytes) {
            self.bytes -= old.len();
        }
        while self.bytes > self.cap {
            match self.map.pop_lru() {
                Some((_, b)) => self.bytes -= b.len(),
                None => break,
            }
        }
    }
    /// The blocks an insert of `len` bytes would evict, least recently used first.
    fn victims(&self, len: usize) -> Vec<Id> {
        let mut need = (self.bytes + len).saturating_sub(self.cap);
        let mut out = Vec::new();
        for ((_, k), b) in self.map.iter().rev() {
            if need == 0 {
                break;
            }
            out.push(*k);
            need = need.saturating_sub(b.len());
        }
        out
    }
    pub fn usage(&self) -> (u64, u64) {
        (self.map.len() as u64, self.bytes as u64)
    }
}

/// Approximate request counts per key in a few KiB: a count-min sketch of 4-bit-ish
/// saturating counters, halved every `window` samples so old popularity fades.
pub struct FreqSketch {
    rows: [Vec<u8>; 4],
    seed: u64,
    samples: u32,
    window: u32,
    /// (key, source) pairs already counted in this window: one source counts a key once,
    /// so a party cannot pump a key's popularity by asking for it again and again.
    doorkeeper: std::collections::HashSet<u64>,
}

impl FreqSketch {
    pub fn new(width: usize, seed: u64) -> FreqSketch {
        let width = width.next_power_of_two().max(64);
        FreqSketch {
            rows: std::array::from_fn(|_| vec![0; width]),
            seed,
            samples: 0,
            window: (width * 8) as u32,
            doorkeeper: Default::default(),
        }
    }
    fn slot(&self, key: Id, row: usize) -> usize {
        // Keyed by a per-node seed (secret in the daemon), so nobody can grind keys onto a
        // popular key's slots.
        let x = u64::from_be_bytes(key.0[row * 4..row * 4 + 8].try_into().unwrap());
        let h = (x ^ self.seed.rotate_left(row as u32 * 16)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> 32) as usize & (self.rows[row].len() - 1)
    }
    /// Count a request for `key` from `source` (a source bucket), once per window.
    pub fn record(&mut self, key: Id, source: &[u8]) {
        let mut h = self.seed ^ key.prefix_u64();
        for b in source {
            h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        if !self.doorkeeper.insert(h) {
            return;
        }
        for r in 0..4 {
            let i = self.slot(key, r);
            self.rows[r][i] = self.rows[r][i].saturating_add(1).min(15);
        }
        self.samples += 1;
        if self.samples >= self.window {
            self.samples = 0;
            self.doorkeeper.clear();
            for row in &mut self.rows {
                row.iter_mut().for_each(|c| *c /= 2);
            }
        }
    }
    pub fn estimate(&self, key: Id) -> u8 {
        (0..4)
            .map(|r| self.rows[r][self.slot(key, r)])
            .min()
            .unwrap()
    }
}

#[derive(Clone, Copy, Debug)]
pub struct CacheLimits {
    /// How long after routing a lookup for a requester its offer is accepted.
    pub offer_window: Duration,
    /// Offers per second a source bucket may make (and the burst it may save up).
    pub offers_per_sec: f64,
    pub offer_burst: f64,
    /// Recently routed keys remembered, and source buckets rate-limited, at most.
    pub routed_keys: usize,
    pub buckets: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            offer_window: Duration::from_secs(10),
            offers_per_sec: 50.0,
            offer_burst: 200.0,
            routed_keys: 4096,
            buckets: 4096,
        }
    }
}

/// What a network (/16, /32) may do in tables keyed by source, in multiples of one
/// source bucket's (/24, /48) limit.
pub const NETWORK_SHARE: usize = 8;

/// Why an offer was not cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotRouted,
    RateLimited,
    NotPopular,
}

pub struct PathCache {
    pub lru: ByteLru,
    freq: FreqSketch,
    /// Key -> (requester, when routed).
    routed: LruCache<Id, (IpAddr, Instant)>,
    /// Source bucket -> (tokens, last refill).
    tokens: LruCache<Vec<u8>, (f64, Instant)>,
    limits: CacheLimits,
}

impl PathCache {
    pub fn new(cap_bytes: usize, seed: u64, limits: CacheLimits) -> PathCache {
        PathCache {
            lru: ByteLru::new(cap_bytes),
            // About one counter per 4 KiB of cache, at least a few thousand.
            freq: FreqSketch::new((cap_bytes / 4096).clamp(4096, 1 << 20), seed),
            // Unbounded tables with manual caps: a bounded LruCache allocates its whole
            // table up front, which adds up over thousands of simulated nodes.
            routed: LruCache::unbounded(),
            tokens: LruCache::unbounded(),
            limits,
        }
    }

    /// A request for `key` from source bucket `source` was seen (a get or a lookup step
    /// that wanted the block).
    pub fn record_request(&mut self, key: Id, source: &[u8]) {
        self.freq.record(key, source);
    }

    /// This node routed a lookup step for `key` on behalf of `requester`.
    pub fn note_routed(&mut self, key: Id, requester: IpAddr, now: Instant) {
        self.routed.put(key, (requester, now));
        while self.routed.len() > self.limits.routed_keys {
            self.routed.pop_lru();
        }
    }

    /// Whether an offer of `key` from `from` may be verified and cached (checked before
    /// the cost of verifying it). Offers are rate-limited per source bucket and, at
    /// `NETWORK_SHARE` times that, per network: a party with many prefixes gains a few
    /// buckets' worth, and cannot cycle the table by its prefixes alone.
    pub fn may_offer(&mut self, key: Id, from: IpAddr, now: Instant) -> Result<(), Refusal> {
        match self.routed.peek(&key) {
            Some((who, at))
                if *who == from && now.duration_since(*at) <= self.limits.offer_window => {}
            _ => return Err(Refusal::NotRouted),
        }
        let l = self.limits;
        let share = NETWORK_SHARE as f64;
        let levels = [
            ([b"b".as_slice(), &source_bucket(from)].concat(), 1.0),
            ([b"n".as_slice(), &source_network(from)].concat(), share),
        ];
        let mut left = Vec::with_capacity(2);
        for (k, scale) in &levels {
            let (tokens, last) = self
                .tokens
                .get(k)
                .copied()
                .unwrap_or((l.offer_burst * scale, now));
            let refill = now.duration_since(last).as_secs_f64() * l.offers_per_sec * scale;
            left.push((tokens + refill).min(l.offer_burst * scale));
        }
        let ok = left.iter().all(|t| *t >= 1.0);
        for ((k, _), t) in levels.into_iter().zip(left) {
            self.tokens.put(k, (if ok { t - 1.0 } else { t }, now));
        }
        while self.tokens.len() > l.buckets {
            self.tokens.pop_lru();
        }
        if ok {
            Ok(())
        } else {
            Err(Refusal::RateLimited)
        }
    }

    /// Insert a verified block if it is more popular than what it would evict.
    pub fn admit(&mut self, kind: BlockKind, key: Id, bytes: Vec<u8>) -> Result<(), Refusal> {
        self.routed.pop(&key);
        let f = self.freq.estimate(key);
        if self
            .lru
            .victims(bytes.len())
            .iter()
            .any(|v| self.freq.estimate(*v) >= f)
        {
            return Err(Refusal::NotPopular);
        }
        self.lru.insert(kind, key, bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> Id {
        Id::hash(&i.to_be_bytes())
    }

    #[test]
    fn bounded_by_bytes() {
        let mut c = ByteLru::new(100);
        for i in 0..10u8 {
            c.insert(BlockKind::Data, Id([i; 20]), vec![0; 30]);
        }
        assert_eq!(c.usage(), (3, 90));
        assert!(c.get(BlockKind::Data, Id([9; 20])).is_some());
        assert!(c.get(BlockKind::Data, Id([0; 20])).is_none());
    }

    #[tokio::test]
    async fn a_flood_of_one_off_blocks_does_not_evict_a_popular_one() {
        let now = Instant::now();
        let me: IpAddr = "127.0.0.1".parse().unwrap();
        let mut c = PathCache::new(10 * 1000, 1, CacheLimits::default());
        let popular = key(0);
        for src in 0..20u8 {
            c.record_request(popular, &[src]);
        }
        c.note_routed(popular, me, now);
        c.may_offer(popular, me, now).unwrap();
        c.admit(BlockKind::Data, popular, vec![0; 1000]).unwrap();
        let mut admitted = 0;
        for i in 1..5000 {
            let k = key(i);
            // The flood asks for each block many times, from one source: counted once.
            for _ in 0..50 {
                c.record_request(k, &[99]);
            }
            c.note_routed(k, me, now);
            // Unlimited rate here: only admission is under test.
            c.tokens.clear();
            if c.may_offer(k, me, now).is_ok() && c.admit(BlockKind::Data, k, vec![0; 1000]).is_ok()
            {
                admitted += 1;
            }
        }
        assert!(c.lru.get(BlockKind::Data, popular).is_some());
        assert!(admitted >= 9, "one-off blocks still use the free space");
    }

    #[tokio::test]
    async fn offers_need_a_routed_lookup_from_the_same_requester_and_a_rate() {
        let now = Instant::now();
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let mut c = PathCache::new(1 << 20, 1, CacheLimits::default());
        assert_eq!(c.may_offer(key(1), a, now), Err(Refusal::NotRouted));
        c.note_routed(key(1), a, now);
        assert_eq!(c.may_offer(key(1), b, now), Err(Refusal::NotRouted));
        let late = now + Duration::from_secs(60);
        assert_eq!(c.may_offer(key(1), a, late), Err(Refusal::NotRouted));
        let mut ok = 0;
        for i in 0..1000 {
            c.note_routed(key(i), a, now);
            if c.may_offer(key(i), a, now).is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 200, "the burst, then the rate");
        // 40 prefixes of one network offer together: the network's share, not 40 bursts.
        let mut ok = 0;
        for p in 0..40u8 {
            let ip: IpAddr = format!("203.0.{p}.1").parse().unwrap();
            for i in 0..400 {
                let k = key(10_000 + p as u32 * 1000 + i);
                c.note_routed(k, ip, now);
                ok += usize::from(c.may_offer(k, ip, now).is_ok());
            }
        }
        assert_eq!(ok, 200 * NETWORK_SHARE, "one network's share");
    }
}
