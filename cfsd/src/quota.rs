//! Storage charged per source bucket (/24, /48; one address on loopback) by space-time:
//! a block costs its bytes plus a per-block overhead, times the seconds it is leased, on
//! every node that stores it. A bucket may hold at most `quota bytes x max lease` of
//! outstanding byte-seconds, so a long lease cannot store more than the quota allows and a
//! short one frees its room sooner. Space-time alone would let short leases buy floods
//! (a 1 MiB quota stored 78 MiB for an hour), so a bucket may also hold at most
//! `HOLD_FACTOR` x its quota at once. Charges run out as leases do; they are saved in
//! the store, so a restart does not reset them.
//!
//! The node also remembers, for recently stored blocks, whose bucket paid for its copy
//! (`note_payer`), so the copies its maintenance pushes to other replicas are charged
//! there to the same source, not to this node.

use crate::store::BlockStore;
use cfs_core::block::BlockKind;
use cfs_core::Id;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// What one stored block costs beyond its bytes: its index entry, redb's per-entry pages
/// and tree overhead (measured: 163,840 blocks of 16 bytes took ~195 bytes each of redb
/// per copy), rounded up so that tiny blocks are not cheaper than they cost.
pub const BLOCK_OVERHEAD: u64 = 512;
/// Buckets tracked at most. Past it, new storers share one overflow bucket (with the same
/// limit) rather than old charges being forgotten (that would let a party reset its own
/// charge) or new storers being refused for good.
pub const MAX_BUCKETS: usize = 1 << 16;
/// Buckets of one network (a /16 or /32) tracked at most; past it the network's new
/// storers share one overflow bucket of its own. A /16 has exactly this many /24s; a /32
/// has 65,536 /48s, which would otherwise fill the table alone.
pub const MAX_BUCKETS_PER_NETWORK: usize = 256;
/// The bucket new storers share once `MAX_BUCKETS` are tracked (no address has this form;
/// a network's own overflow bucket is this followed by the network's bytes).
pub const OVERFLOW_BUCKET: &[u8] = b"overflow";
/// Time bins per maximum lease: a charge's end is rounded up to its bin's end, so a
/// bucket's ledger has at most this many entries (+1) and charges are at most 1/BINS of
/// the maximum lease too long.
const BINS: u64 = 128;
/// Bins a saved ledger may have; a longer one (a damaged store) is read as empty.
const MAX_SAVED_BINS: usize = 4 * BINS as usize;
/// What a bucket may hold at once, in multiples of its quota (bytes plus
/// `BLOCK_OVERHEAD` per block, whatever the leases). Space-time lets short leases store
/// more for less long; this bounds by how much. 2, not 1: a publisher at its full quota
/// must be able to put a new version of everything while the old version's leases run
/// out, and a renewal ahead of a lease's end holds the block twice for a while.
pub const HOLD_FACTOR: u64 = 2;
/// The prefix of a network's bucket for confirmed replica copies (`Quota::free_bucket`).
pub const FREE_TRANSFERS_BUCKET: &[u8] = b"free-transfers/";
/// Blocks whose payer a node remembers (the most recently stored; about 100 bytes
/// each): enough for maintenance to push a put's copies to the other replicas within a
/// few rounds, at any sane put rate.
pub const MAX_PAYERS: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("storage quota of {limit_bytes} bytes for {lease_secs} s (or the same byte-seconds) for your address is used up; wait for leases to run out or ask for shorter ones")]
    Exceeded { limit_bytes: u64, lease_secs: u64 },
    #[error("your address holds {held_bytes} bytes on this node (blocks plus {BLOCK_OVERHEAD} bytes each), the most it may hold at once ({HOLD_FACTOR} x its quota of {limit_bytes} bytes), whatever the leases; wait for leases to run out")]
    HeldTooMuch { held_bytes: u64, limit_bytes: u64 },
}

/// One bucket's charges: byte weights by the end of their time bin. At time t the
/// bucket holds sum(w x (end - t)) byte-seconds over bins ending after t. A charge for
/// [s, e] is +w at bin(e), and -w at bin(s) when it starts later than now: exact at
/// every t up to the rounding of bins.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    bins: BTreeMap<u64, i64>,
}

impl Ledger {
    /// A format-2 charge of `bytes`, as held until `until`.
    pub fn migrated(bytes: u64, now: u64, until: u64) -> Ledger {
        let mut l = Ledger::default();
        l.add(1, now, now, until, bytes as i64);
        l
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(&self.bins.iter().collect::<Vec<_>>()).expect("encoding to memory")
    }

    fn decode(b: &[u8]) -> Option<Ledger> {
        let v: Vec<(u64, i64)> = postcard::from_bytes(b).ok()?;
        (v.len() <= MAX_SAVED_BINS).then(|| Ledger {
            bins: v.into_iter().collect(),
        })
    }

    fn bin_end(bin: u64, t: u64) -> u64 {
        t.div_ceil(bin).saturating_mul(bin)
    }

    /// Charge `w` bytes over [start, end] (start >= now).
    fn add(&mut self, bin: u64, now: u64, start: u64, end: u64, w: i64) {
        if end <= start.max(now) || w == 0 {
            return;
        }
        *self.bins.entry(Self::bin_end(bin, end)).or_default() += w;
        if start > now {
            *self.bins.entry(Self::bin_end(bin, start)).or_default() -= w;
        }
        self.bins.retain(|_, w| *w != 0);
    }

    /// The most bytes held at once between `now` and `until`: at a time t, a bucket
    /// holds the weights of the bins ending after t (a charge counts from its start to
    /// its end, up to the rounding of bins), so held bytes change only as bins end. An
    /// extension settled to start later (a renewal of what another bucket holds until
    /// then) counts only from then.
    fn held_peak(&mut self, now: u64, until: u64) -> u64 {
        self.bins.retain(|end, _| *end > now);
        let mut held: i128 = self.bins.values().map(|w| *w as i128).sum();
        let mut peak = held;
        for (end, w) in &self.bins {
            if *end >= until {
                break;
            }
            held -= *w as i128;
            peak = peak.max(held);
        }
        peak.clamp(0, u64::MAX as i128) as u64
    }

    /// Byte-seconds held at `now` (bins that ended are dropped).
    fn outstanding(&mut self, now: u64) -> u128 {
        self.bins.retain(|end, _| *end > now);
        let s: i128 = self
            .bins
            .iter()
            .map(|(end, w)| *w as i128 * (end - now) as i128)
            .sum();
        s.max(0) as u128
    }
}

/// A charge taken by `reserve`, to be settled once the store says what was extended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charge {
    cost: u64,
    now: u64,
    until: u64,
}

pub struct Quota {
    limit_bytes: u64,
    max_lease: u64,
    bin: u64,
    used: Mutex<BTreeMap<Vec<u8>, Ledger>>,
    dirty: AtomicBool,
    /// Whose bucket paid for recently stored blocks (not saved: after a restart, pushes
    /// of older blocks are charged to the pushing node, as before).
    payers: Mutex<lru::LruCache<(BlockKind, Id), IpAddr>>,
}

impl Quota {
    /// The charges saved in `store` (none if it has none or cannot read them).
    pub fn load(limit_bytes: u64, max_lease_secs: u64, store: &dyn BlockStore) -> Quota {
        let saved = store.load_charges().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read saved storage charges; starting from zero");
            Vec::new()
        });
        let used = saved
            .into_iter()
            .filter_map(|(k, v)| match Ledger::decode(&v) {
                Some(l) => Some((k, l)),
                None => {
                    tracing::warn!("a saved storage charge does not decode; dropping it");
                    None
                }
            })
            .collect();
        let max_lease = max_lease_secs.max(1);
        Quota {
            limit_bytes,
            max_lease,
            bin: (max_lease / BINS).max(1),
            used: Mutex::new(used),
            dirty: AtomicBool::new(false),
            payers: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(MAX_PAYERS).expect("nonzero"),
            )),
        }
    }

    /// The bucket that confirmed replica copies pushed by a ring neighbour in `network`
    /// are charged to instead of the neighbour itself: re-creating replicas a failure
    /// lost, or handing a joiner its range, costs its own quota nothing, yet what one
    /// network's neighbours store here that way is bounded like any source's, by one
    /// quota. No address bucket has this form.
    pub fn free_bucket(network: &[u8]) -> Vec<u8> {
        [FREE_TRANSFERS_BUCKET, network].concat()
    }

    /// Remember that `source`'s bucket paid for this node's copy of a block.
    pub fn note_payer(&self, kind: BlockKind, key: Id, source: IpAddr) {
        self.payers.lock().unwrap().put((kind, key), source);
    }

    /// The source whose bucket paid for this node's copy, if still remembered.
    pub fn payer(&self, kind: BlockKind, key: Id) -> Option<IpAddr> {
        self.payers.lock().unwrap().peek(&(kind, key)).copied()
    }

    /// Bytes one stored block of `len` bytes is charged for (per second of lease).
    pub fn cost(len: usize) -> u64 {
        len as u64 + BLOCK_OVERHEAD
    }

    /// The byte-seconds a bucket may hold.
    fn limit(&self) -> u128 {
        self.limit_bytes as u128 * self.max_lease as u128
    }

    /// The bucket a source's charges go to: its own; its network's overflow bucket when
    /// the network (/16, /32) already has `MAX_BUCKETS_PER_NETWORK` (so one party with
    /// many prefixes holds a bounded part of the table, and shares one quota past it);
    /// the shared overflow bucket when the table is full and the source has none yet.
    pub fn bucket_for(&self, source: &[u8]) -> Vec<u8> {
        let m = self.used.lock().unwrap();
        if m.contains_key(source) {
            return source.to_vec();
        }
        // A /24 bucket's network is its first 2 bytes, a /48's its first 4; loopback
        // buckets (whole addresses) are not grouped.
        let net = match source.len() {
            3 => Some(&source[..2]),
            6 => Some(&source[..4]),
            _ => None,
        };
        if let Some(net) = net {
            let same_net = m
                .range(net.to_vec()..)
                .take_while(|(k, _)| k.starts_with(net))
                .filter(|(k, _)| k.len() == source.len())
                .take(MAX_BUCKETS_PER_NETWORK)
                .count();
            if same_net >= MAX_BUCKETS_PER_NETWORK {
                return [OVERFLOW_BUCKET, net].concat();
            }
        }
        if m.len() < MAX_BUCKETS {
            source.to_vec()
        } else {
            OVERFLOW_BUCKET.to_vec()
        }
    }

    /// Reserve `cost` bytes from `now` until `until` for `bucket` (from `bucket_for`)
    /// before the work, so parallel puts cannot all pass one check. `settle` then gives
    /// back what the store did not extend.
    pub fn reserve(
        &self,
        bucket: &[u8],
        cost: u64,
        now: u64,
        until: u64,
    ) -> Result<Charge, QuotaError> {
        let mut m = self.used.lock().unwrap();
        let l = m.entry(bucket.to_vec()).or_default();
        let want = cost as u128 * until.saturating_sub(now) as u128;
        let refusal = if l.outstanding(now).saturating_add(want) > self.limit() {
            Some(QuotaError::Exceeded {
                limit_bytes: self.limit_bytes,
                lease_secs: self.max_lease,
            })
        } else {
            let held = l.held_peak(now, Ledger::bin_end(self.bin, until));
            (held.saturating_add(cost) > self.limit_bytes.saturating_mul(HOLD_FACTOR)).then_some(
                QuotaError::HeldTooMuch {
                    held_bytes: held,
                    limit_bytes: self.limit_bytes,
                },
            )
        };
        if let Some(e) = refusal {
            if l.bins.is_empty() {
                m.remove(bucket);
            }
            return Err(e);
        }
        l.add(self.bin, now, now, until, cost as i64);
        self.dirty.store(true, Ordering::Relaxed);
        Ok(Charge { cost, now, until })
    }

    /// Keep only the part of `charge` that extended a lease: the store held the block
    /// until `before` (None: not held) and holds it until `after` now. A block already
    /// leased past the charge costs nothing.
    pub fn settle(&self, bucket: &[u8], charge: Charge, before: Option<u64>, stored_new: bool) {
        let Some(b) = before.filter(|_| !stored_new) else {
            return;
        };
        // Charged [now, until]; extended only [max(b, now), until]: give back [now, b].
        let back_until = b.min(charge.until);
        if back_until <= charge.now {
            return;
        }
        let mut m = self.used.lock().unwrap();
        if let Some(l) = m.get_mut(bucket) {
            l.add(
                self.bin,
                charge.now,
                charge.now,
                back_until,
                -(charge.cost as i64),
            );
            if l.bins.is_empty() {
                m.remove(bucket);
            }
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Give a whole charge back (nothing was stored or extended).
    pub fn refund(&self, bucket: &[u8], charge: Charge) {
        self.settle(bucket, charge, Some(charge.until), false);
    }

    /// Byte-seconds `bucket` holds at `now`.
    pub fn used(&self, bucket: &[u8], now: u64) -> u128 {
        let mut m = self.used.lock().unwrap();
        m.get_mut(bucket).map_or(0, |l| l.outstanding(now))
    }

    /// The most bytes `bucket` holds at once from `now` on.
    pub fn held(&self, bucket: &[u8], now: u64) -> u64 {
        let mut m = self.used.lock().unwrap();
        m.get_mut(bucket).map_or(0, |l| l.held_peak(now, u64::MAX))
    }

    /// `bucket`'s ledger, encoded for the store.
    pub fn encoded(&self, bucket: &[u8]) -> Vec<u8> {
        let m = self.used.lock().unwrap();
        m.get(bucket).cloned().unwrap_or_default().encode()
    }

    /// Save the charges if they changed since the last save. The snapshot is taken under
    /// the store's commit order (`save_charges`), so it can never overwrite a newer charge
    /// committed with blocks.
    pub fn save(&self, store: &dyn BlockStore, now: u64) {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        // Charges that ran out are forgotten, so buckets free up for new sources.
        self.used.lock().unwrap().retain(|_, l| {
            l.outstanding(now);
            !l.bins.is_empty()
        });
        let snapshot = || -> Vec<(Vec<u8>, Vec<u8>)> {
            self.used
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.encode()))
                .collect()
        };
        if let Err(e) = store.save_charges(&snapshot) {
            self.dirty.store(true, Ordering::Relaxed);
            tracing::warn!(error = %e, "cannot save storage charges");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    use cfs_core::ring::source_bucket;

    const DAY: u64 = 86_400;

    #[test]
    fn charges_bytes_times_lease_and_persist() {
        let store = MemStore::default();
        // 10,000 bytes for 10 days.
        let q = Quota::load(10_000, 10 * DAY, &store);
        let b = q.bucket_for(&[198, 18, 0]);
        let now = 1_000 * DAY;
        let each = Quota::cost(16);
        let mut n = 0;
        while q.reserve(&b, each, now, now + 10 * DAY).is_ok() {
            n += 1;
        }
        assert_eq!(n, 10_000 / each);
        // The same byte-seconds as twice the blocks for half as long.
        let q2 = Quota::load(10_000, 10 * DAY, &store);
        let mut n2 = 0;
        while q2.reserve(&b, each, now, now + 5 * DAY).is_ok() {
            n2 += 1;
        }
        assert!(n2 >= 2 * n && n2 <= 2 * n + 2, "{n2} vs {n}");
        // A refund makes room again; charges persist.
        let c = q.reserve(&b, each, now, now + 10 * DAY).unwrap_err();
        assert_eq!(
            c,
            QuotaError::Exceeded {
                limit_bytes: 10_000,
                lease_secs: 10 * DAY
            }
        );
        q.save(&store, now);
        let again = Quota::load(10_000, 10 * DAY, &store);
        assert_eq!(again.used(&b, now), q.used(&b, now));
        assert!(again.reserve(&b, each, now, now + 10 * DAY).is_err());
        // Charges run out with the leases: half-way, half the room is back.
        let later = now + 5 * DAY + DAY / 2;
        assert!(again.used(&b, later) <= q.limit() / 2);
        assert!(again.reserve(&b, each, later, later + 4 * DAY).is_ok());
    }

    #[test]
    fn short_leases_cannot_hold_more_than_a_few_quotas_at_once() {
        let store = MemStore::default();
        let q = Quota::load(1 << 20, 90 * DAY, &store);
        let b = q.bucket_for(&[198, 18, 1]);
        let now = 1_000 * DAY;
        let each = Quota::cost(16);
        // An hour's lease: space-time alone would allow 2,160 MiB; the hold bound stops
        // it at 2 MiB of blocks plus overhead.
        let mut n = 0;
        let err = loop {
            match q.reserve(&b, each, now, now + 3600) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(n, (HOLD_FACTOR << 20) / each);
        assert!(matches!(err, QuotaError::HeldTooMuch { .. }), "{err:?}");
        assert_eq!(q.held(&b, now), n * each);
        // Saved and loaded, the ledger still tells what is held (no format change).
        q.save(&store, now);
        let again = Quota::load(1 << 20, 90 * DAY, &store);
        assert_eq!(again.held(&b, now), n * each);
        assert!(again.reserve(&b, each, now, now + 3600).is_err());
        // Once the leases end (and their time bin), the room is back.
        let later = now + 3600 + 90 * DAY / BINS + 1;
        assert_eq!(again.held(&b, later), 0);
        assert!(again.reserve(&b, each, later, later + 3600).is_ok());
        // Another bucket was never affected.
        assert!(q.reserve(&[198, 18, 2], each, now, now + 3600).is_ok());
    }

    #[test]
    fn an_extension_held_by_another_counts_from_when_it_starts() {
        let store = MemStore::default();
        // A long maximum lease, so that only the hold bound refuses here.
        let q = Quota::load(1 << 20, 900 * DAY, &store);
        let now = 1_000 * DAY;
        // Bucket y extends, for [now + 30 d, now + 60 d], 1 MiB someone else holds until
        // then: y holds nothing now, but will hold it later, and that counts.
        let c = q.reserve(b"y", 1 << 20, now, now + 60 * DAY).unwrap();
        q.settle(b"y", c, Some(now + 30 * DAY), false);
        assert_eq!(q.held(b"y", now), 1 << 20);
        assert!(q.reserve(b"y", 1 << 20, now, now + 40 * DAY).is_ok());
        // 2 MiB held during [30 d, 40 d]: nothing more over then, but before it there is
        // room.
        let e = q.reserve(b"y", 1 << 20, now, now + 45 * DAY).unwrap_err();
        assert!(matches!(e, QuotaError::HeldTooMuch { .. }), "{e:?}");
        assert!(q.reserve(b"y", 1 << 20, now, now + DAY).is_ok());
        assert!(q.reserve(b"y", 1, now, now + DAY).is_err());
    }

    #[test]
    fn one_network_holds_a_bounded_part_of_the_table() {
        let store = MemStore::default();
        let q = Quota::load(1 << 20, DAY, &store);
        let now = 1_000;
        // 300 /48s of one /32: 256 get buckets of their own, the rest share one.
        let mut overflowed = 0;
        for i in 0..300u16 {
            let ip: IpAddr = format!("2001:db8:{i:x}::1").parse().unwrap();
            let b = q.bucket_for(&source_bucket(ip));
            overflowed += usize::from(b.starts_with(OVERFLOW_BUCKET));
            q.reserve(&b, 100, now, now + DAY).unwrap();
        }
        assert_eq!(overflowed, 300 - MAX_BUCKETS_PER_NETWORK);
        let shared = q.bucket_for(&source_bucket("2001:db8:ffff::1".parse().unwrap()));
        assert_eq!(
            shared,
            [OVERFLOW_BUCKET, &[0x20, 0x01, 0x0d, 0xb8]].concat()
        );
        // Another network, and one of the first 256, keep their own.
        let other = source_bucket("2001:db9::1".parse().unwrap());
        assert_eq!(q.bucket_for(&other), other);
        let first = source_bucket("2001:db8:0::9".parse().unwrap());
        assert_eq!(q.bucket_for(&first), first);
        // IPv4: a /24 elsewhere is never grouped with a /48 whose bytes start alike.
        let v4 = source_bucket("32.1.13.5".parse().unwrap());
        assert_eq!(q.bucket_for(&v4), v4);
    }

    #[test]
    fn free_transfers_are_charged_to_their_networks_allowance() {
        let store = MemStore::default();
        let q = Quota::load(1 << 20, DAY, &store);
        let now = 1_000;
        let a = Quota::free_bucket(&[198, 18]);
        let b = Quota::free_bucket(&[203, 0]);
        assert_ne!(a, b);
        assert_eq!(q.bucket_for(&a), a, "never grouped with address buckets");
        let cost = Quota::cost(64 << 10);
        let n = (1u64 << 20) * HOLD_FACTOR / cost;
        for _ in 0..n {
            q.reserve(&a, cost, now, now + 3600).unwrap();
        }
        assert!(
            q.reserve(&a, cost, now, now + 3600).is_err(),
            "one network's share"
        );
        assert!(
            q.reserve(&b, cost, now, now + 3600).is_ok(),
            "another's is its own"
        );
    }

    #[test]
    fn payers_are_remembered_for_recent_blocks_only() {
        let q = Quota::load(1 << 20, DAY, &MemStore::default());
        let ip: IpAddr = "198.18.0.7".parse().unwrap();
        let key = |i: u64| Id::hash(&i.to_be_bytes());
        q.note_payer(BlockKind::Data, key(0), ip);
        assert_eq!(q.payer(BlockKind::Data, key(0)), Some(ip));
        assert_eq!(q.payer(BlockKind::Meta, key(0)), None);
        for i in 1..=MAX_PAYERS as u64 {
            q.note_payer(BlockKind::Data, key(i), ip);
        }
        assert_eq!(
            q.payer(BlockKind::Data, key(0)),
            None,
            "the oldest is forgotten"
        );
        assert_eq!(q.payer(BlockKind::Data, key(1)), Some(ip));
    }

    #[test]
    fn an_extension_is_charged_only_for_the_time_added() {
        let store = MemStore::default();
        let q = Quota::load(1 << 30, 100 * DAY, &store);
        let b = b"x".to_vec();
        let now = 50 * DAY;
        let c = q.reserve(&b, 1000, now, now + 30 * DAY).unwrap();
        // Held until now + 20 days already: only 10 days are new.
        q.settle(&b, c, Some(now + 20 * DAY), false);
        let used = q.used(&b, now);
        let want = 1000u128 * 10 * DAY as u128;
        let slack = 1000u128 * (100 * DAY / BINS) as u128 * 2;
        assert!(used.abs_diff(want) <= slack, "{used} vs {want}");
        // Already leased beyond: free.
        let c = q.reserve(&b, 1000, now, now + 5 * DAY).unwrap();
        let before = q.used(&b, now);
        q.settle(&b, c, Some(now + 20 * DAY), false);
        assert!(q.used(&b, now) < before);
        assert!(q.used(&b, now).abs_diff(want) <= slack);
        // Nothing more is charged until the old lease ends, then it runs out.
        assert!(q.used(&b, now + 19 * DAY).abs_diff(want) <= slack);
        assert_eq!(q.used(&b, now + 31 * DAY), 0);
    }
}
