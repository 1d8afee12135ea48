//! Open connections and what each source may hold of the node. A connection belongs to a
//! source bucket (/24, /48; one address on loopback) and to that bucket's network (/16,
//! /32); connections, request slots and the allowance for unread replies are bounded in
//! both scopes, a network at `NETWORK_SHARE` times a bucket. So a party with many
//! prefixes gains a few buckets' worth of the node, not one share per prefix.

use super::{charged_kib, ServerLimits, REPLY_RESERVE};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// What a network may hold, in multiples of one bucket's share.
pub(super) const NETWORK_SHARE: usize = 8;

/// The two scopes of a source, as keys of one table (tagged so they never collide).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Source {
    bucket: Vec<u8>,
    network: Vec<u8>,
}

impl Source {
    pub(super) fn of(ip: IpAddr) -> Source {
        Source {
            bucket: [b"b".as_slice(), &cfs_core::ring::source_bucket(ip)].concat(),
            network: [b"n".as_slice(), &cfs_core::ring::source_network(ip)].concat(),
        }
    }
}

/// A semaphore per scope of one source: permits are taken from both or from neither.
#[derive(Clone)]
pub(super) struct Pair {
    bucket: Arc<Semaphore>,
    network: Arc<Semaphore>,
}

/// Permits held in both scopes, always the same number in each.
pub(super) struct Permits {
    bucket: OwnedSemaphorePermit,
    network: OwnedSemaphorePermit,
}

impl Pair {
    /// Wait for `n` permits of the bucket, then of the network.
    pub(super) async fn acquire(&self, n: u32) -> Option<Permits> {
        let bucket = self.bucket.clone().acquire_many_owned(n).await.ok()?;
        let network = self.network.clone().acquire_many_owned(n).await.ok()?;
        Some(Permits { bucket, network })
    }

    pub(super) fn try_acquire(&self, n: u32) -> Option<Permits> {
        let bucket = self.bucket.clone().try_acquire_many_owned(n).ok()?;
        let network = self.network.clone().try_acquire_many_owned(n).ok()?;
        Some(Permits { bucket, network })
    }
}

impl Permits {
    pub(super) fn num_permits(&self) -> usize {
        self.bucket.num_permits()
    }

    /// Split off `n` permits (of each scope) into their own `Permits`.
    pub(super) fn split(&mut self, n: usize) -> Option<Permits> {
        let bucket = self.bucket.split(n)?;
        let network = self.network.split(n)?;
        Some(Permits { bucket, network })
    }

    pub(super) fn merge(&mut self, other: Permits) {
        self.bucket.merge(other.bucket);
        self.network.merge(other.network);
    }
}

struct Conn {
    source: Source,
    last_active: Instant,
    close: Arc<Notify>,
}

/// Open connections by id, and how many each scope holds.
#[derive(Default)]
pub(super) struct Registry {
    next: u64,
    conns: HashMap<u64, Conn>,
    /// Connections per scope key (bucket or network).
    open: HashMap<Vec<u8>, usize>,
    /// Request slots per scope, while it has connections.
    slots: HashMap<Vec<u8>, Arc<Semaphore>>,
    /// KiB of replies per scope written but not yet taken by their peer.
    unread: HashMap<Vec<u8>, Arc<Semaphore>>,
}

impl Registry {
    /// Admit a connection from `source`, closing another if a limit is reached: the least
    /// recently active one of its own bucket when that is at its share, else of its own
    /// network when that is, else of the busiest bucket when the node is full. Returns
    /// its id, its close signal, and whether one was evicted.
    pub(super) fn admit(
        &mut self,
        source: Source,
        limits: &ServerLimits,
    ) -> (u64, Arc<Notify>, bool) {
        let count = |k: &Vec<u8>| self.open.get(k).copied().unwrap_or(0);
        let per_bucket = limits.max_conns_per_bucket;
        let victim_scope: Option<Vec<u8>> = if count(&source.bucket) >= per_bucket {
            Some(source.bucket.clone())
        } else if count(&source.network) >= per_bucket.saturating_mul(NETWORK_SHARE) {
            Some(source.network.clone())
        } else if self.conns.len() >= limits.max_conns {
            self.open
                .iter()
                .filter(|(k, _)| k.first() == Some(&b'b'))
                .max_by_key(|(_, n)| **n)
                .map(|(k, _)| k.clone())
        } else {
            None
        };
        let mut evicted = false;
        if let Some(scope) = victim_scope {
            let victim = self
                .conns
                .iter()
                .filter(|(_, c)| c.source.bucket == scope || c.source.network == scope)
                .min_by_key(|(_, c)| c.last_active)
                .map(|(id, _)| *id);
            if let Some(c) = victim.and_then(|v| self.remove(v)) {
                c.notify_one();
                evicted = true;
            }
        }
        self.next += 1;
        let close = Arc::new(Notify::new());
        let n = limits.max_requests_per_bucket.max(1);
        // As many largest replies as the scope has request slots.
        let kib = charged_kib(REPLY_RESERVE);
        for (key, share) in [(&source.bucket, 1), (&source.network, NETWORK_SHARE)] {
            *self.open.entry(key.clone()).or_default() += 1;
            self.slots
                .entry(key.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(n * share)));
            self.unread
                .entry(key.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(n * share * kib)));
        }
        self.conns.insert(
            self.next,
            Conn {
                source,
                last_active: Instant::now(),
                close: close.clone(),
            },
        );
        (self.next, close, evicted)
    }

    /// Forget connection `id`; returns its close signal.
    pub(super) fn remove(&mut self, id: u64) -> Option<Arc<Notify>> {
        let c = self.conns.remove(&id)?;
        for key in [&c.source.bucket, &c.source.network] {
            if let Some(n) = self.open.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    self.open.remove(key);
                    self.slots.remove(key);
                    self.unread.remove(key);
                }
            }
        }
        Some(c.close)
    }

    fn pair(map: &HashMap<Vec<u8>, Arc<Semaphore>>, source: &Source) -> Option<Pair> {
        Some(Pair {
            bucket: map.get(&source.bucket)?.clone(),
            network: map.get(&source.network)?.clone(),
        })
    }

    pub(super) fn slots(&self, source: &Source) -> Option<Pair> {
        Self::pair(&self.slots, source)
    }

    pub(super) fn unread(&self, source: &Source) -> Option<Pair> {
        Self::pair(&self.unread, source)
    }

    pub(super) fn touch(&mut self, id: u64) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.last_active = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_full_bucket_evicts_its_least_recent_connection_not_others() {
        let limits = ServerLimits {
            max_conns: 6,
            max_conns_per_bucket: 3,
            ..ServerLimits::default()
        };
        let mut r = Registry::default();
        let a = || Source::of(ip("198.18.1.1"));
        let b = || Source::of(ip("198.51.100.1"));
        let (first_a, _, _) = r.admit(a(), &limits);
        for _ in 0..2 {
            r.admit(a(), &limits);
        }
        let (honest, _, _) = r.admit(b(), &limits);
        // A's bucket is at its share: its own oldest goes.
        let (_, _, evicted) = r.admit(a(), &limits);
        assert!(evicted);
        assert!(!r.conns.contains_key(&first_a));
        assert_eq!(r.open[&a().bucket], 3);
        // The node is full (6): a new bucket evicts from the busiest, not from B.
        r.admit(b(), &limits);
        r.admit(Source::of(ip("203.0.113.1")), &limits);
        assert!(r.conns.len() <= 6);
        assert!(r.conns.contains_key(&honest));
        assert_eq!(r.open[&b().bucket], 2);
    }

    #[tokio::test]
    async fn a_network_of_many_prefixes_gets_a_few_buckets_worth() {
        let limits = ServerLimits {
            max_conns: 10_000,
            max_conns_per_bucket: 4,
            max_requests_per_bucket: 2,
            ..ServerLimits::default()
        };
        let mut r = Registry::default();
        // 64 /24s of one /16, 4 connections each: the network keeps 8 buckets' worth.
        for p in 0..64u8 {
            for _ in 0..4 {
                r.admit(Source::of(ip(&format!("203.0.{p}.1"))), &limits);
            }
        }
        let net = Source::of(ip("203.0.0.1")).network;
        assert_eq!(r.open[&net], 4 * NETWORK_SHARE);
        // Request slots: each bucket has 2, the network 16 in all.
        let mut held = Vec::new();
        for p in 0..64u8 {
            let s = r.slots(&Source::of(ip(&format!("203.0.{p}.1"))));
            while let Some(p) = s.as_ref().and_then(|s| s.try_acquire(1)) {
                held.push(p);
            }
        }
        assert_eq!(held.len(), 2 * NETWORK_SHARE);
        // Another network is not touched.
        let other = Source::of(ip("198.51.100.7"));
        r.admit(other.clone(), &limits);
        assert!(r.slots(&other).unwrap().try_acquire(2).is_some());
    }
}
