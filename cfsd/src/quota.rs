//! Storage charged per source bucket (/24, /48; one address on loopback): each block costs
//! its bytes plus a per-block overhead, on every node that stores it, so r replicas are r
//! charges and a flood of tiny blocks pays for its index entries. Charges are saved in
//! the store, so a restart does not reset them.

use crate::store::BlockStore;
use std::collections::BTreeMap;
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
/// The bucket new storers share once `MAX_BUCKETS` are tracked (no address has this form).
pub const OVERFLOW_BUCKET: &[u8] = b"overflow";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("storage quota of {limit} bytes for your address is used up")]
    Exceeded { limit: u64 },
}

pub struct Quota {
    limit: u64,
    used: Mutex<BTreeMap<Vec<u8>, u64>>,
    dirty: AtomicBool,
}

impl Quota {
    /// The charges saved in `store` (none if it has none or cannot read them).
    pub fn load(limit: u64, store: &dyn BlockStore) -> Quota {
        let saved = store.load_charges().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read saved storage charges; starting from zero");
            Vec::new()
        });
        Quota {
            limit,
            used: Mutex::new(saved.into_iter().collect()),
            dirty: AtomicBool::new(false),
        }
    }

    /// The charge for storing one block of `len` bytes.
    pub fn cost(len: usize) -> u64 {
        len as u64 + BLOCK_OVERHEAD
    }

    /// The bucket a source's charges go to: its own, or the shared overflow bucket when
    /// the table is full and the source has none yet.
    pub fn bucket_for(&self, source: &[u8]) -> Vec<u8> {
        let m = self.used.lock().unwrap();
        if m.contains_key(source) || m.len() < MAX_BUCKETS {
            source.to_vec()
        } else {
            OVERFLOW_BUCKET.to_vec()
        }
    }

    /// Reserve `cost` for `bucket` (from `bucket_for`) before the work, so parallel puts
    /// cannot all pass one check.
    pub fn reserve(&self, bucket: &[u8], cost: u64) -> Result<(), QuotaError> {
        let mut m = self.used.lock().unwrap();
        let used = m.entry(bucket.to_vec()).or_default();
        if used.saturating_add(cost) > self.limit {
            return Err(QuotaError::Exceeded { limit: self.limit });
        }
        *used += cost;
        self.dirty.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Give back a reservation for work that stored nothing new.
    pub fn refund(&self, bucket: &[u8], cost: u64) {
        let mut m = self.used.lock().unwrap();
        if let Some(u) = m.get_mut(bucket) {
            *u = u.saturating_sub(cost);
            if *u == 0 {
                m.remove(bucket);
            }
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    pub fn used(&self, bucket: &[u8]) -> u64 {
        self.used.lock().unwrap().get(bucket).copied().unwrap_or(0)
    }

    /// Save the charges if they changed since the last save. The snapshot is taken under
    /// the store's commit order (`save_charges`), so it can never overwrite a newer charge
    /// committed with blocks.
    pub fn save(&self, store: &dyn BlockStore) {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let snapshot = || -> Vec<(Vec<u8>, u64)> {
            self.used
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), *v))
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

    #[test]
    fn charges_bytes_plus_overhead_and_persist() {
        let store = MemStore::default();
        let q = Quota::load(10_000, &store);
        let b = q.bucket_for(&[198, 18, 0]);
        let mut n = 0;
        while q.reserve(&b, Quota::cost(16)).is_ok() {
            n += 1;
        }
        assert_eq!(n, 10_000 / (16 + BLOCK_OVERHEAD));
        assert_eq!(
            q.reserve(&b, Quota::cost(16)),
            Err(QuotaError::Exceeded { limit: 10_000 })
        );
        q.refund(&b, Quota::cost(16));
        assert!(q.reserve(&b, Quota::cost(16)).is_ok());
        q.save(&store);
        let again = Quota::load(10_000, &store);
        assert_eq!(again.used(&b), q.used(&b));
        assert!(again.reserve(&b, Quota::cost(16)).is_err());
    }
}
