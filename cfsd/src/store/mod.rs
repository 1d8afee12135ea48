//! The permanent block store: a trait with a redb implementation (`disk.rs`: durable,
//! group commit, format migrations) and a memory implementation (`mem.rs`: tests,
//! simulator). Only verified blocks go in, and every block carries a lease: the unix
//! second its expiry falls on. A lease only grows.

mod disk;
mod mem;

pub use disk::{fs_space, RedbStore, MIGRATED_LEASE, REDB_CACHE_BYTES, STORE_FORMAT};
pub use mem::MemStore;

use cfs_core::{BlockKind, Id, Verified};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a root block of version {held} is held; version {offered} is not newer")]
    Stale { held: u64, offered: u64 },
    #[error("a different root block with the same version {0} is held: publish again at the next version")]
    Conflict(u64),
    #[error("block store I/O failed: {0}; check the disk under --data")]
    Io(String),
    #[error("the block store is format {found}, newer than this cfsd understands ({known}); upgrade cfsd or use another --data directory")]
    TooNew { found: u32, known: u32 },
}

/// What a put did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Newly stored (or a root replaced by a newer version).
    Stored,
    /// Already held identically.
    Present,
}

/// A put's answer: what it did, the lease held before (if the key was held) and after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutDone {
    pub outcome: PutOutcome,
    pub before: Option<u64>,
    pub expires: u64,
}

/// A held block as the index knows it (no block bytes read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// 0 for content blocks.
    pub version: u64,
    pub len: u64,
    /// Unix second the lease ends.
    pub expires: u64,
}

/// Store key: kind byte then the 20-byte key, so kinds never alias.
pub type StoreKey = (BlockKind, Id);

/// A renewal's answer for a held block: its lease before and after, and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewed {
    pub before: u64,
    pub expires: u64,
    pub len: u64,
}

pub trait BlockStore: Send + Sync + 'static {
    /// Durably store a verified block leased until `expires` (a held lease is never
    /// shortened). Roots only replace an older version.
    fn put(&self, block: &Verified, expires: u64) -> Result<PutDone, StoreError>;
    /// Store several blocks, durably, with one answer each (one commit where possible).
    fn put_many(&self, blocks: Vec<(Verified, u64)>) -> Vec<Result<PutDone, StoreError>> {
        blocks.iter().map(|(b, e)| self.put(b, *e)).collect()
    }
    /// The block's bytes and lease end, if held (expired or not: callers decide).
    fn get(&self, kind: BlockKind, key: Id) -> Result<Option<(Vec<u8>, u64)>, StoreError>;
    fn held(&self, kind: BlockKind, key: Id) -> Result<Option<Held>, StoreError>;
    /// Extend the leases of held blocks to at least `expires`, in one commit. None for a
    /// block not held.
    fn renew(&self, items: &[StoreKey], expires: u64) -> Result<Vec<Option<Renewed>>, StoreError>;
    fn remove(&self, kind: BlockKind, key: Id) -> Result<(), StoreError>;
    /// Remove only if the held version is still `version`: a newer root stored meanwhile
    /// (an acknowledged put) is kept.
    fn remove_if(&self, kind: BlockKind, key: Id, version: u64) -> Result<(), StoreError>;
    /// Remove at most `limit` blocks whose lease ended at or before `now`, soonest first,
    /// checked and removed in one commit (a renewal in between keeps its block). Returns
    /// what went: (kind, key, length).
    fn remove_expired(
        &self,
        now: u64,
        limit: usize,
    ) -> Result<Vec<(BlockKind, Id, u64)>, StoreError>;
    /// Every held block, in key order. For tests and the simulator's accounting: the
    /// node's own rounds walk the store with `list_after`.
    fn list(&self) -> Result<Vec<(BlockKind, Id, Held)>, StoreError>;
    /// At most `limit` held blocks after `after` (None: from the start), in store order
    /// (kind, then key): a bounded chunk, so rounds over the store never hold every key.
    fn list_after(
        &self,
        after: Option<StoreKey>,
        limit: usize,
    ) -> Result<Vec<(BlockKind, Id, Held)>, StoreError>;
    /// Storage charged per source bucket, as last saved (opaque to the store).
    fn load_charges(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError>;
    /// Replace the saved charges (durably) with `snapshot()`, taken in commit order: after
    /// every commit of blocks that came before, before any that comes after.
    fn save_charges(
        &self,
        snapshot: &dyn Fn() -> Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), StoreError>;
    /// Record `bucket`'s charge with the next commit of blocks, so a put and its charge
    /// are durable together.
    fn stage_charge(&self, bucket: &[u8], charge: Vec<u8>);
    /// (blocks, bytes) held.
    fn usage(&self) -> (u64, u64);
    /// (free, total) bytes of the filesystem the store lives on, if it has one.
    fn space(&self) -> Option<(u64, u64)> {
        None
    }
}

/// The lease a block gets from a put or renewal: the later of what is held and what is
/// asked, never shorter.
pub(super) fn merged(before: Option<u64>, asked: u64) -> u64 {
    before.map_or(asked, |b| b.max(asked))
}

/// What a put does to what is held, for both stores: Ok(None) writes the block,
/// Ok(Some(Present)) keeps the held bytes (only the lease may grow), Err refuses. A root
/// replaces an older version; of one version the first one held stays (the node settles
/// forks, `node::replace_losing_fork`).
pub(super) fn check_root_replace(
    held: Option<(u64, &[u8])>,
    block: &Verified,
) -> Result<Option<PutOutcome>, StoreError> {
    match held {
        None => Ok(None),
        Some((v, bytes)) if block.kind() == BlockKind::Root => {
            if v == block.version() {
                if bytes == block.bytes() {
                    Ok(Some(PutOutcome::Present))
                } else {
                    Err(StoreError::Conflict(v))
                }
            } else if v > block.version() {
                Err(StoreError::Stale {
                    held: v,
                    offered: block.version(),
                })
            } else {
                Ok(None)
            }
        }
        Some(_) => Ok(Some(PutOutcome::Present)),
    }
}

#[cfg(test)]
mod tests {
    use super::disk::{db_key, unix_now, BLOCKS, CHARGES_V2, INDEX, META, MIGRATE_CHUNK};
    use super::*;
    use cfs_core::block::{verify, RootBlock, Totals};

    fn content(b: &[u8]) -> Verified {
        verify(BlockKind::Data, Id::hash(b), b.to_vec(), true).unwrap()
    }

    fn root(v: u64, top: &[u8]) -> Verified {
        let sk = ed25519_dalek_key();
        let r = RootBlock::sign(&sk, v, Id::hash(top), Totals::default(), None, 0);
        verify(BlockKind::Root, r.key(), r.encode(), true).unwrap()
    }

    fn ed25519_dalek_key() -> cfs_core::block::SigningKey {
        cfs_core::block::SigningKey::from_bytes(&[3; 32])
    }

    const T: u64 = 1_000_000;

    fn out(s: &dyn BlockStore, b: &Verified, e: u64) -> PutOutcome {
        s.put(b, e).unwrap().outcome
    }

    /// One suite, run against every implementation.
    fn suite(s: &dyn BlockStore) {
        let a = content(b"alpha");
        assert_eq!(out(s, &a, T + 100), PutOutcome::Stored);
        assert_eq!(out(s, &a, T + 50), PutOutcome::Present);
        assert_eq!(
            s.get(BlockKind::Data, a.key()).unwrap().unwrap(),
            (b"alpha".to_vec(), T + 100),
            "a shorter lease asked never shortens the held one"
        );
        let d = s.put(&a, T + 200).unwrap();
        assert_eq!((d.before, d.expires), (Some(T + 100), T + 200));
        // Kinds do not alias.
        assert_eq!(s.get(BlockKind::Meta, a.key()).unwrap(), None);
        let r2 = root(2, b"x");
        assert_eq!(out(s, &r2, T + 10), PutOutcome::Stored);
        assert!(matches!(
            s.put(&root(1, b"x"), T + 10),
            Err(StoreError::Stale { .. })
        ));
        // A fork (another root of the same version): the first one held stays.
        let other = root(2, b"y");
        assert!(matches!(
            s.put(&other, T + 10),
            Err(StoreError::Conflict(2))
        ));
        let win = r2.clone();
        assert_eq!(out(s, &win, T + 10), PutOutcome::Present);
        assert_eq!(out(s, &root(3, b"z"), T + 5), PutOutcome::Stored);
        let h = s.held(BlockKind::Root, r2.key()).unwrap().unwrap();
        assert_eq!(
            (h.version, h.expires),
            (3, T + 10),
            "a new version keeps the longer lease"
        );
        assert_eq!(s.usage().0, 2);
        assert_eq!(s.list().unwrap().len(), 2);
        // Chunks walk the store in (kind, key) order without repeats.
        let first = s.list_after(None, 1).unwrap();
        assert_eq!(first.len(), 1);
        let rest = s.list_after(Some((first[0].0, first[0].1)), 10).unwrap();
        assert_eq!(rest.len(), 1);
        assert_ne!(rest[0].1, first[0].1);
        s.save_charges(&|| vec![(vec![127, 0, 0, 1], vec![9, 9])])
            .unwrap();
        assert_eq!(
            s.load_charges().unwrap(),
            vec![(vec![127, 0, 0, 1], vec![9, 9])]
        );
        // Renewals only extend, and say what they found.
        let missing = content(b"never stored");
        let r = s
            .renew(
                &[
                    (BlockKind::Root, r2.key()),
                    (BlockKind::Data, missing.key()),
                ],
                T + 30,
            )
            .unwrap();
        assert_eq!(r[0].map(|x| (x.before, x.expires)), Some((T + 10, T + 30)));
        assert_eq!(r[1], None);
        let r = s.renew(&[(BlockKind::Root, r2.key())], T + 1).unwrap();
        assert_eq!(r[0].map(|x| x.expires), Some(T + 30));
        // The sweep takes what expired, soonest first, bounded, and nothing else.
        assert!(s.remove_expired(T + 29, 10).unwrap().is_empty());
        let gone = s.remove_expired(T + 30, 10).unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].0, gone[0].1), (BlockKind::Root, r2.key()));
        assert_eq!(s.held(BlockKind::Root, r2.key()).unwrap(), None);
        assert_eq!(s.usage().0, 1);
        s.remove(BlockKind::Data, a.key()).unwrap();
        assert_eq!(s.get(BlockKind::Data, a.key()).unwrap(), None);
        assert_eq!(s.usage().0, 0);
        for i in 0..5u8 {
            s.put(&content(&[i; 3]), T + i as u64).unwrap();
        }
        assert_eq!(s.remove_expired(T + 10, 3).unwrap().len(), 3);
        assert_eq!(s.remove_expired(T + 10, 3).unwrap().len(), 2);
        assert_eq!(s.usage(), (0, 0));
        s.put(&a, T + 100).unwrap();
        s.put(&r2, T + 100).unwrap();
    }

    #[test]
    fn mem_store() {
        suite(&MemStore::default());
    }

    #[test]
    fn redb_store_and_reopen() {
        let dir = std::env::temp_dir().join(format!("cfs-store-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blocks.redb");
        let _ = std::fs::remove_file(&path);
        {
            let s = RedbStore::open(&path).unwrap();
            suite(&s);
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.usage().0, 2);
        assert_eq!(s.load_charges().unwrap().len(), 1, "charges persist");
        let h = s
            .held(BlockKind::Root, root(1, b"").key())
            .unwrap()
            .unwrap();
        assert_eq!((h.version, h.expires), (2, T + 100), "leases persist");
        drop(s);
        // A store written by a newer format is refused, not misread.
        {
            let db = redb::Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("format", 99u64)
                .unwrap();
            tx.commit().unwrap();
        }
        assert!(matches!(
            RedbStore::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A block as formats 1 and 2 stored it: bytes, and a 16-byte index entry.
    fn legacy_put(tx: &redb::WriteTransaction, a: &Verified) {
        let k = db_key(a.kind(), a.key());
        tx.open_table(BLOCKS)
            .unwrap()
            .insert(k.as_slice(), a.bytes())
            .unwrap();
        let mut v = [0u8; 16];
        v[8..].copy_from_slice(&(a.bytes().len() as u64).to_be_bytes());
        tx.open_table(INDEX)
            .unwrap()
            .insert(k.as_slice(), v.as_slice())
            .unwrap();
    }

    #[test]
    fn a_format_2_store_is_migrated_with_leases_and_charges() {
        let dir = std::env::temp_dir().join(format!("cfs-store-v2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blocks.redb");
        let a = content(b"old");
        {
            // Format 2: blocks, 16-byte index entries, byte charges, meta.
            let db = redb::Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            legacy_put(&tx, &a);
            tx.open_table(CHARGES_V2)
                .unwrap()
                .insert([127u8, 0, 0, 1].as_slice(), 4096u64)
                .unwrap();
            tx.open_table(META).unwrap().insert("format", 2u64).unwrap();
            tx.commit().unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        let (bytes, expires) = s.get(BlockKind::Data, a.key()).unwrap().unwrap();
        assert_eq!(bytes, b"old");
        let now = unix_now();
        assert!(expires >= now + MIGRATED_LEASE - 60 && expires <= now + MIGRATED_LEASE + 60);
        assert_eq!(s.usage(), (1, 3));
        let charges = s.load_charges().unwrap();
        assert_eq!(charges.len(), 1);
        let q = crate::quota::Quota::load(1 << 30, MIGRATED_LEASE, &s);
        let used = q.used(&[127, 0, 0, 1], now);
        let want = 4096u128 * MIGRATED_LEASE as u128;
        assert!(used.abs_diff(want) < want / 100, "{used} vs {want}");
        // The sweep finds migrated blocks by their new lease.
        assert!(s.remove_expired(now, 10).unwrap().is_empty());
        assert_eq!(s.remove_expired(expires, 10).unwrap().len(), 1);
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_format_1_store_is_migrated() {
        let dir = std::env::temp_dir().join(format!("cfs-store-v1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blocks.redb");
        let blocks: Vec<Verified> = (0..(MIGRATE_CHUNK as u32 + 5))
            .map(|i| content(&i.to_be_bytes()))
            .collect();
        {
            // Format 1: blocks and index only, no meta; more entries than one chunk.
            let db = redb::Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            for a in &blocks {
                legacy_put(&tx, a);
            }
            tx.commit().unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.usage(), (blocks.len() as u64, 4 * blocks.len() as u64));
        for a in [&blocks[0], blocks.last().unwrap()] {
            let (b, e) = s.get(BlockKind::Data, a.key()).unwrap().unwrap();
            assert_eq!(b, a.bytes());
            assert!(e > unix_now());
        }
        assert_eq!(s.list().unwrap().len(), blocks.len(), "every entry parses");
        assert!(s.load_charges().unwrap().is_empty());
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
