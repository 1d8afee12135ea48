//! The in-memory block store, for tests and the simulator.

use super::{
    check_root_replace, merged, BlockStore, Held, PutDone, PutOutcome, Renewed, StoreError,
    StoreKey,
};
use cfs_core::{BlockKind, Id, Verified};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// In-memory store for tests and the simulator.
#[derive(Default)]
pub struct MemStore {
    map: Mutex<MemMap>,
    charges: Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
}

#[derive(Default)]
struct MemMap {
    blocks: BTreeMap<StoreKey, (Held, Vec<u8>)>,
    /// (expires, kind, key): the sweep's order.
    expiry: BTreeSet<(u64, BlockKind, Id)>,
}

impl MemMap {
    fn set_expiry(&mut self, k: StoreKey, old: Option<u64>, new: u64) {
        if let Some(o) = old {
            self.expiry.remove(&(o, k.0, k.1));
        }
        self.expiry.insert((new, k.0, k.1));
    }
    fn remove(&mut self, k: StoreKey) -> Option<Held> {
        let (h, _) = self.blocks.remove(&k)?;
        self.expiry.remove(&(h.expires, k.0, k.1));
        Some(h)
    }
}

impl BlockStore for MemStore {
    fn put(&self, block: &Verified, expires: u64) -> Result<PutDone, StoreError> {
        let mut m = self.map.lock().unwrap();
        let k = (block.kind(), block.key());
        let old = m.blocks.get(&k).map(|(h, b)| (*h, b.as_slice()));
        let before = old.map(|(h, _)| h.expires);
        let after = merged(before, expires);
        let outcome = match check_root_replace(old.map(|(h, b)| (h.version, b)), block)? {
            Some(o) => {
                let e = m.blocks.get_mut(&k).expect("held");
                e.0.expires = after;
                o
            }
            None => {
                let held = Held {
                    version: block.version(),
                    len: block.bytes().len() as u64,
                    expires: after,
                };
                m.blocks.insert(k, (held, block.bytes().to_vec()));
                PutOutcome::Stored
            }
        };
        m.set_expiry(k, before, after);
        Ok(PutDone {
            outcome,
            before,
            expires: after,
        })
    }
    fn get(&self, kind: BlockKind, key: Id) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let m = self.map.lock().unwrap();
        Ok(m.blocks
            .get(&(kind, key))
            .map(|(h, b)| (b.clone(), h.expires)))
    }
    fn held(&self, kind: BlockKind, key: Id) -> Result<Option<Held>, StoreError> {
        Ok(self
            .map
            .lock()
            .unwrap()
            .blocks
            .get(&(kind, key))
            .map(|(h, _)| *h))
    }
    fn renew(&self, items: &[StoreKey], expires: u64) -> Result<Vec<Option<Renewed>>, StoreError> {
        let mut m = self.map.lock().unwrap();
        Ok(items
            .iter()
            .map(|&k| {
                let h = m.blocks.get(&k).map(|(h, _)| *h)?;
                let after = merged(Some(h.expires), expires);
                if after > h.expires {
                    m.blocks.get_mut(&k).expect("held").0.expires = after;
                    m.set_expiry(k, Some(h.expires), after);
                }
                Some(Renewed {
                    before: h.expires,
                    expires: after,
                    len: h.len,
                })
            })
            .collect())
    }
    fn remove(&self, kind: BlockKind, key: Id) -> Result<(), StoreError> {
        self.map.lock().unwrap().remove((kind, key));
        Ok(())
    }
    fn remove_if(&self, kind: BlockKind, key: Id, version: u64) -> Result<(), StoreError> {
        let mut m = self.map.lock().unwrap();
        if m.blocks
            .get(&(kind, key))
            .is_some_and(|(h, _)| h.version == version)
        {
            m.remove((kind, key));
        }
        Ok(())
    }
    fn remove_expired(
        &self,
        now: u64,
        limit: usize,
    ) -> Result<Vec<(BlockKind, Id, u64)>, StoreError> {
        let mut m = self.map.lock().unwrap();
        let due: Vec<(u64, BlockKind, Id)> = m
            .expiry
            .iter()
            .take_while(|(e, _, _)| *e <= now)
            .take(limit)
            .copied()
            .collect();
        Ok(due
            .into_iter()
            .filter_map(|(_, kind, key)| m.remove((kind, key)).map(|h| (kind, key, h.len)))
            .collect())
    }
    fn list(&self) -> Result<Vec<(BlockKind, Id, Held)>, StoreError> {
        let m = self.map.lock().unwrap();
        let mut v: Vec<_> = m
            .blocks
            .iter()
            .map(|((k, id), (h, _))| (*k, *id, *h))
            .collect();
        v.sort_by_key(|(k, id, _)| (*id, *k));
        Ok(v)
    }
    fn list_after(
        &self,
        after: Option<StoreKey>,
        limit: usize,
    ) -> Result<Vec<(BlockKind, Id, Held)>, StoreError> {
        use std::ops::Bound;
        let m = self.map.lock().unwrap();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(m.blocks
            .range((lower, Bound::Unbounded))
            .take(limit)
            .map(|((k, id), (h, _))| (*k, *id, *h))
            .collect())
    }
    fn load_charges(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        Ok(self.charges.lock().unwrap().clone())
    }
    fn save_charges(
        &self,
        snapshot: &dyn Fn() -> Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        *self.charges.lock().unwrap() = snapshot();
        Ok(())
    }
    fn stage_charge(&self, bucket: &[u8], charge: Vec<u8>) {
        let mut c = self.charges.lock().unwrap();
        c.retain(|(b, _)| b != bucket);
        c.push((bucket.to_vec(), charge));
    }
    fn usage(&self) -> (u64, u64) {
        let m = self.map.lock().unwrap();
        (
            m.blocks.len() as u64,
            m.blocks.values().map(|(h, _)| h.len).sum(),
        )
    }
}
