//! The permanent block store: a trait with a redb implementation (durable, group commit)
//! and a memory implementation (tests, simulator). Only verified blocks go in.

use cfs_core::{BlockKind, Id, Verified};
use redb::ReadableDatabase;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a root block of version {held} is held; version {offered} is not newer")]
    Stale { held: u64, offered: u64 },
    #[error("a different root block with the same version {0} is held")]
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

/// Store key: kind byte then the 20-byte key, so kinds never alias.
pub type StoreKey = (BlockKind, Id);

pub trait BlockStore: Send + Sync + 'static {
    /// Durably store a verified block. Roots only replace an older version.
    fn put(&self, block: &Verified) -> Result<PutOutcome, StoreError>;
    /// Store several blocks, durably, with one answer each (one commit where possible).
    fn put_many(&self, blocks: Vec<Verified>) -> Vec<Result<PutOutcome, StoreError>> {
        blocks.iter().map(|b| self.put(b)).collect()
    }
    fn get(&self, kind: BlockKind, key: Id) -> Result<Option<Vec<u8>>, StoreError>;
    /// Held version (0 for content blocks), if held.
    fn version(&self, kind: BlockKind, key: Id) -> Result<Option<u64>, StoreError>;
    fn remove(&self, kind: BlockKind, key: Id) -> Result<(), StoreError>;
    /// Remove only if the held version is still `version`: a newer root stored meanwhile
    /// (an acknowledged put) is kept.
    fn remove_if(&self, kind: BlockKind, key: Id, version: u64) -> Result<(), StoreError> {
        match self.version(kind, key)? {
            Some(v) if v == version => self.remove(kind, key),
            _ => Ok(()),
        }
    }
    /// Every held block as (kind, key, version), in key order. For tests and the
    /// simulator's accounting: the node's own rounds walk the store with `list_after`.
    fn list(&self) -> Result<Vec<(BlockKind, Id, u64)>, StoreError>;
    /// At most `limit` held blocks after `after` (None: from the start), in store order
    /// (kind, then key): a bounded chunk, so rounds over the store never hold every key.
    fn list_after(
        &self,
        after: Option<StoreKey>,
        limit: usize,
    ) -> Result<Vec<(BlockKind, Id, u64)>, StoreError>;
    /// Storage charged per source bucket, as last saved.
    fn load_charges(&self) -> Result<Vec<(Vec<u8>, u64)>, StoreError>;
    /// Replace the saved charges (durably) with `snapshot()`, taken in commit order: after
    /// every commit of blocks that came before, before any that comes after.
    fn save_charges(&self, snapshot: &dyn Fn() -> Vec<(Vec<u8>, u64)>) -> Result<(), StoreError>;
    /// Record `bucket`'s charge with the next commit of blocks, so a put and its charge
    /// are durable together.
    fn stage_charge(&self, bucket: &[u8], used: u64);
    /// (blocks, bytes) held.
    fn usage(&self) -> (u64, u64);
}

fn check_root_replace(
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

/// In-memory store for tests and the simulator.
#[derive(Default)]
pub struct MemStore {
    map: Mutex<BTreeMap<StoreKey, (u64, Vec<u8>)>>,
    charges: Mutex<Vec<(Vec<u8>, u64)>>,
}

impl BlockStore for MemStore {
    fn put(&self, block: &Verified) -> Result<PutOutcome, StoreError> {
        let mut m = self.map.lock().unwrap();
        let k = (block.kind(), block.key());
        let held = m.get(&k).map(|(v, b)| (*v, b.as_slice()));
        if let Some(o) = check_root_replace(held, block)? {
            return Ok(o);
        }
        m.insert(k, (block.version(), block.bytes().to_vec()));
        Ok(PutOutcome::Stored)
    }
    fn get(&self, kind: BlockKind, key: Id) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .map
            .lock()
            .unwrap()
            .get(&(kind, key))
            .map(|(_, b)| b.clone()))
    }
    fn version(&self, kind: BlockKind, key: Id) -> Result<Option<u64>, StoreError> {
        Ok(self.map.lock().unwrap().get(&(kind, key)).map(|(v, _)| *v))
    }
    fn remove(&self, kind: BlockKind, key: Id) -> Result<(), StoreError> {
        self.map.lock().unwrap().remove(&(kind, key));
        Ok(())
    }
    fn list(&self) -> Result<Vec<(BlockKind, Id, u64)>, StoreError> {
        let m = self.map.lock().unwrap();
        let mut v: Vec<_> = m
            .iter()
            .map(|((k, id), (ver, _))| (*k, *id, *ver))
            .collect();
        v.sort_by_key(|(k, id, _)| (*id, *k));
        Ok(v)
    }
    fn list_after(
        &self,
        after: Option<StoreKey>,
        limit: usize,
    ) -> Result<Vec<(BlockKind, Id, u64)>, StoreError> {
        use std::ops::Bound;
        let m = self.map.lock().unwrap();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(m.range((lower, Bound::Unbounded))
            .take(limit)
            .map(|((k, id), (ver, _))| (*k, *id, *ver))
            .collect())
    }
    fn load_charges(&self) -> Result<Vec<(Vec<u8>, u64)>, StoreError> {
        Ok(self.charges.lock().unwrap().clone())
    }
    fn save_charges(&self, snapshot: &dyn Fn() -> Vec<(Vec<u8>, u64)>) -> Result<(), StoreError> {
        *self.charges.lock().unwrap() = snapshot();
        Ok(())
    }
    fn stage_charge(&self, bucket: &[u8], used: u64) {
        let mut c = self.charges.lock().unwrap();
        c.retain(|(b, _)| b != bucket);
        c.push((bucket.to_vec(), used));
    }
    fn usage(&self) -> (u64, u64) {
        let m = self.map.lock().unwrap();
        (
            m.len() as u64,
            m.values().map(|(_, b)| b.len() as u64).sum(),
        )
    }
}

/// Bytes of redb's page cache.
pub const REDB_CACHE_BYTES: usize = 32 << 20;

/// Block bytes by store key (kind byte, then the 20-byte key).
const BLOCKS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("blocks");
/// Per block: version and length (8 + 8 bytes, big-endian), so listing, `Has` and usage
/// never read block bytes.
const INDEX: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("index");
/// Storage charged per source bucket (quota), so a restart does not forget it.
const CHARGES: redb::TableDefinition<&[u8], u64> = redb::TableDefinition::new("charges");
/// Store-wide facts: "format" is the layout version.
const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
/// 1: blocks + index. 2: adds charges and meta (a format-1 store is migrated on open by
/// creating them: no existing table changes).
pub const STORE_FORMAT: u32 = 2;
/// Puts waiting for the writer at most; a caller beyond it waits (backpressure), so
/// the queue's memory is bounded whatever the request rate.
const WRITER_QUEUE: usize = 4096;

fn db_key(kind: BlockKind, key: Id) -> [u8; 21] {
    let mut k = [0u8; 21];
    k[0] = kind as u8;
    k[1..].copy_from_slice(&key.0);
    k
}

fn index_value(version: u64, len: usize) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&version.to_be_bytes());
    v[8..].copy_from_slice(&(len as u64).to_be_bytes());
    v
}

/// (version, length) from an index value; None if the entry is malformed.
fn parse_index(v: &[u8]) -> Option<(u64, u64)> {
    if v.len() != 16 {
        return None;
    }
    Some((
        u64::from_be_bytes(v[..8].try_into().ok()?),
        u64::from_be_bytes(v[8..].try_into().ok()?),
    ))
}

/// (kind, key, version) of an index entry; None if it is malformed.
fn index_entry(k: &[u8], v: &[u8]) -> Option<(BlockKind, Id, u64)> {
    if k.len() != 21 {
        return None;
    }
    let kind = BlockKind::from_u8(k[0])?;
    let (version, _) = parse_index(v)?;
    Some((kind, Id(k[1..].try_into().ok()?), version))
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

type Pending = (Verified, mpsc::SyncSender<Result<PutOutcome, StoreError>>);

/// Durable store in one redb file. Writes go through one writer thread that commits every
/// put waiting at that moment in one transaction: one fsync per batch, not per block.
pub struct RedbStore {
    db: std::sync::Arc<redb::Database>,
    /// Charges to write with the next commit.
    staged: std::sync::Arc<Mutex<BTreeMap<Vec<u8>, u64>>>,
    writer: Mutex<Option<mpsc::SyncSender<Pending>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    usage: std::sync::Arc<Mutex<(u64, u64)>>,
}

impl Drop for RedbStore {
    /// Stop the writer and wait for it, so the file is closed when the store is dropped.
    fn drop(&mut self) {
        self.writer.lock().unwrap().take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl RedbStore {
    /// Remove a block if `keep_going(held version)` says so, in one write transaction.
    fn remove_where(
        &self,
        kind: BlockKind,
        key: Id,
        keep_going: impl Fn(u64) -> bool,
    ) -> Result<(), StoreError> {
        use redb::ReadableTable;
        let tx = self.db.begin_write().map_err(io)?;
        let removed = {
            let k = db_key(kind, key);
            let mut blocks = tx.open_table(BLOCKS).map_err(io)?;
            let mut index = tx.open_table(INDEX).map_err(io)?;
            let held = index
                .get(k.as_slice())
                .map_err(io)?
                .and_then(|g| parse_index(g.value()));
            match held {
                Some((v, len)) if keep_going(v) => {
                    blocks.remove(k.as_slice()).map_err(io)?;
                    index.remove(k.as_slice()).map_err(io)?;
                    Some(len)
                }
                _ => None,
            }
        };
        tx.commit().map_err(io)?;
        if let Some(n) = removed {
            let mut u = self.usage.lock().unwrap();
            u.0 = u.0.saturating_sub(1);
            u.1 = u.1.saturating_sub(n);
        }
        Ok(())
    }

    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        // redb's own page cache is bounded so node memory does not grow with the store.
        let db = redb::Builder::new()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(path)
            .map_err(io)?;
        {
            use redb::ReadableTable;
            let tx = db.begin_write().map_err(io)?;
            {
                let mut meta = tx.open_table(META).map_err(io)?;
                let found = meta.get("format").map_err(io)?.map(|g| g.value());
                match found {
                    Some(f) if f > STORE_FORMAT as u64 => {
                        return Err(StoreError::TooNew {
                            found: f as u32,
                            known: STORE_FORMAT,
                        })
                    }
                    Some(f) if f == STORE_FORMAT as u64 => {}
                    // New, or format 1 (no meta table): migrate by creating what is new.
                    _ => {
                        meta.insert("format", STORE_FORMAT as u64).map_err(io)?;
                    }
                }
            }
            tx.open_table(BLOCKS).map_err(io)?;
            tx.open_table(INDEX).map_err(io)?;
            tx.open_table(CHARGES).map_err(io)?;
            tx.commit().map_err(io)?;
        }
        let db = std::sync::Arc::new(db);
        let mut usage = (0u64, 0u64);
        {
            use redb::ReadableTable;
            let tx = db.begin_read().map_err(io)?;
            let t = tx.open_table(INDEX).map_err(io)?;
            for item in t.iter().map_err(io)? {
                let (_, v) = item.map_err(io)?;
                if let Some((_, len)) = parse_index(v.value()) {
                    usage.0 += 1;
                    usage.1 += len;
                }
            }
        }
        let usage = std::sync::Arc::new(Mutex::new(usage));
        let (tx, rx) = mpsc::sync_channel::<Pending>(WRITER_QUEUE);
        let staged: std::sync::Arc<Mutex<BTreeMap<Vec<u8>, u64>>> = Default::default();
        let (db2, usage2, staged2) = (db.clone(), usage.clone(), staged.clone());
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(&db2, rx, &usage2, &staged2))
            .map_err(io)?;
        Ok(RedbStore {
            db,
            staged,
            writer: Mutex::new(Some(tx)),
            thread: Some(thread),
            usage,
        })
    }
}

fn writer_loop(
    db: &redb::Database,
    rx: mpsc::Receiver<Pending>,
    usage: &Mutex<(u64, u64)>,
    staged: &Mutex<BTreeMap<Vec<u8>, u64>>,
) {
    use redb::ReadableTable;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 1024 {
                break;
            }
        }
        let mut results: Vec<Result<PutOutcome, StoreError>> = Vec::with_capacity(batch.len());
        let mut added = (0u64, 0i64);
        let commit = (|| -> Result<(), StoreError> {
            let tx = db.begin_write().map_err(io)?;
            {
                let charges = std::mem::take(&mut *staged.lock().unwrap());
                let mut t = tx.open_table(CHARGES).map_err(io)?;
                for (k, v) in charges {
                    t.insert(k.as_slice(), v).map_err(io)?;
                }
            }
            {
                let mut blocks = tx.open_table(BLOCKS).map_err(io)?;
                let mut index = tx.open_table(INDEX).map_err(io)?;
                for (block, _) in &batch {
                    let k = db_key(block.kind(), block.key());
                    let held = index
                        .get(k.as_slice())
                        .map_err(io)?
                        .and_then(|g| parse_index(g.value()));
                    // Only a root of the same version needs its bytes compared.
                    let held_bytes = match held {
                        Some((v, _)) if block.kind() == BlockKind::Root && v == block.version() => {
                            blocks
                                .get(k.as_slice())
                                .map_err(io)?
                                .map(|g| g.value().to_vec())
                                .unwrap_or_default()
                        }
                        _ => Vec::new(),
                    };
                    let held_ref = held.map(|(v, _)| (v, held_bytes.as_slice()));
                    match check_root_replace(held_ref, block) {
                        Ok(Some(o)) => results.push(Ok(o)),
                        Err(e) => results.push(Err(e)),
                        Ok(None) => {
                            blocks.insert(k.as_slice(), block.bytes()).map_err(io)?;
                            index
                                .insert(
                                    k.as_slice(),
                                    index_value(block.version(), block.bytes().len()).as_slice(),
                                )
                                .map_err(io)?;
                            match held {
                                Some((_, len)) => {
                                    added.1 += block.bytes().len() as i64 - len as i64
                                }
                                None => {
                                    added.0 += 1;
                                    added.1 += block.bytes().len() as i64;
                                }
                            }
                            results.push(Ok(PutOutcome::Stored));
                        }
                    }
                }
            }
            tx.commit().map_err(io)?;
            Ok(())
        })();
        if let Err(e) = commit {
            for (_, reply) in batch {
                let _ = reply.send(Err(StoreError::Io(e.to_string())));
            }
            continue;
        }
        {
            let mut u = usage.lock().unwrap();
            u.0 += added.0;
            u.1 = (u.1 as i64 + added.1).max(0) as u64;
        }
        for ((_, reply), r) in batch.into_iter().zip(results) {
            let _ = reply.send(r);
        }
    }
}

impl BlockStore for RedbStore {
    fn put(&self, block: &Verified) -> Result<PutOutcome, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let stopped = || StoreError::Io("store writer stopped".into());
        self.writer
            .lock()
            .unwrap()
            .as_ref()
            .ok_or_else(stopped)?
            .send((block.clone(), tx))
            .map_err(|_| stopped())?;
        rx.recv().map_err(|_| stopped())?
    }

    /// All blocks go to the writer before waiting, so they share one commit.
    fn put_many(&self, blocks: Vec<Verified>) -> Vec<Result<PutOutcome, StoreError>> {
        let stopped = || StoreError::Io("store writer stopped".into());
        let mut waits = Vec::with_capacity(blocks.len());
        {
            let w = self.writer.lock().unwrap();
            for b in blocks {
                let (tx, rx) = mpsc::sync_channel(1);
                let sent = w.as_ref().is_some_and(|w| w.send((b, tx)).is_ok());
                waits.push(sent.then_some(rx));
            }
        }
        waits
            .into_iter()
            .map(|rx| match rx {
                Some(rx) => rx.recv().map_err(|_| stopped())?,
                None => Err(stopped()),
            })
            .collect()
    }

    fn get(&self, kind: BlockKind, key: Id) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let t = tx.open_table(BLOCKS).map_err(io)?;
        let v = t.get(db_key(kind, key).as_slice()).map_err(io)?;
        Ok(v.map(|g| g.value().to_vec()))
    }

    fn version(&self, kind: BlockKind, key: Id) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let t = tx.open_table(INDEX).map_err(io)?;
        let v = t.get(db_key(kind, key).as_slice()).map_err(io)?;
        Ok(v.and_then(|g| parse_index(g.value())).map(|(v, _)| v))
    }

    fn remove(&self, kind: BlockKind, key: Id) -> Result<(), StoreError> {
        self.remove_where(kind, key, |_| true)
    }

    /// Checked and removed in one write transaction, so it cannot interleave with a put.
    fn remove_if(&self, kind: BlockKind, key: Id, version: u64) -> Result<(), StoreError> {
        self.remove_where(kind, key, |v| v == version)
    }

    fn list(&self) -> Result<Vec<(BlockKind, Id, u64)>, StoreError> {
        use redb::ReadableTable;
        let tx = self.db.begin_read().map_err(io)?;
        let t = tx.open_table(INDEX).map_err(io)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(io)? {
            let (k, v) = item.map_err(io)?;
            // Entries that do not parse are skipped, not trusted.
            out.extend(index_entry(k.value(), v.value()));
        }
        out.sort_by_key(|(k, id, _)| (*id, *k));
        Ok(out)
    }

    fn list_after(
        &self,
        after: Option<StoreKey>,
        limit: usize,
    ) -> Result<Vec<(BlockKind, Id, u64)>, StoreError> {
        use std::ops::Bound;
        let tx = self.db.begin_read().map_err(io)?;
        let t = tx.open_table(INDEX).map_err(io)?;
        let start = after.map(|(k, id)| db_key(k, id));
        let lower = match &start {
            Some(k) => Bound::Excluded(k.as_slice()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in t.range::<&[u8]>((lower, Bound::Unbounded)).map_err(io)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(io)?;
            out.extend(index_entry(k.value(), v.value()));
        }
        Ok(out)
    }

    fn stage_charge(&self, bucket: &[u8], used: u64) {
        self.staged.lock().unwrap().insert(bucket.to_vec(), used);
    }

    fn load_charges(&self) -> Result<Vec<(Vec<u8>, u64)>, StoreError> {
        use redb::ReadableTable;
        let tx = self.db.begin_read().map_err(io)?;
        let t = tx.open_table(CHARGES).map_err(io)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(io)? {
            let (k, v) = item.map_err(io)?;
            out.push((k.value().to_vec(), v.value()));
        }
        Ok(out)
    }

    fn save_charges(&self, snapshot: &dyn Fn() -> Vec<(Vec<u8>, u64)>) -> Result<(), StoreError> {
        // redb has one writer at a time: the snapshot is taken inside this write
        // transaction, so it is ordered with the writer thread's commits of blocks and
        // their staged charges.
        let tx = self.db.begin_write().map_err(io)?;
        {
            // Staged values are older than (or equal to) the snapshot taken next; a charge
            // staged after this clear stays staged for the writer's next commit.
            self.staged.lock().unwrap().clear();
            let charges = snapshot();
            let mut t = tx.open_table(CHARGES).map_err(io)?;
            t.retain(|_, _| false).map_err(io)?;
            for (k, v) in charges {
                t.insert(k.as_slice(), v).map_err(io)?;
            }
        }
        tx.commit().map_err(io)?;
        Ok(())
    }

    fn usage(&self) -> (u64, u64) {
        *self.usage.lock().unwrap()
    }
}

#[cfg(test)]
mod tests {
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

    /// One suite, run against every implementation.
    fn suite(s: &dyn BlockStore) {
        let a = content(b"alpha");
        assert_eq!(s.put(&a).unwrap(), PutOutcome::Stored);
        assert_eq!(s.put(&a).unwrap(), PutOutcome::Present);
        assert_eq!(s.get(BlockKind::Data, a.key()).unwrap().unwrap(), b"alpha");
        // Kinds do not alias.
        assert_eq!(s.get(BlockKind::Meta, a.key()).unwrap(), None);
        let r2 = root(2, b"x");
        assert_eq!(s.put(&r2).unwrap(), PutOutcome::Stored);
        assert!(matches!(
            s.put(&root(1, b"x")),
            Err(StoreError::Stale { .. })
        ));
        assert!(matches!(
            s.put(&root(2, b"y")),
            Err(StoreError::Conflict(2))
        ));
        assert_eq!(s.put(&r2).unwrap(), PutOutcome::Present);
        assert_eq!(s.put(&root(3, b"z")).unwrap(), PutOutcome::Stored);
        assert_eq!(s.version(BlockKind::Root, r2.key()).unwrap(), Some(3));
        assert_eq!(s.usage().0, 2);
        assert_eq!(s.list().unwrap().len(), 2);
        // Chunks walk the store in (kind, key) order without repeats.
        let first = s.list_after(None, 1).unwrap();
        assert_eq!(first.len(), 1);
        let rest = s.list_after(Some((first[0].0, first[0].1)), 10).unwrap();
        assert_eq!(rest.len(), 1);
        assert_ne!(rest[0].1, first[0].1);
        s.save_charges(&|| vec![(vec![127, 0, 0, 1], 99)]).unwrap();
        assert_eq!(s.load_charges().unwrap(), vec![(vec![127, 0, 0, 1], 99)]);
        s.remove(BlockKind::Data, a.key()).unwrap();
        assert_eq!(s.get(BlockKind::Data, a.key()).unwrap(), None);
        assert_eq!(s.usage().0, 1);
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
        assert_eq!(s.usage().0, 1);
        assert_eq!(s.load_charges().unwrap().len(), 1, "charges persist");
        assert_eq!(
            s.version(BlockKind::Root, root(1, b"").key()).unwrap(),
            Some(3)
        );
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

    #[test]
    fn a_format_1_store_is_migrated() {
        let dir = std::env::temp_dir().join(format!("cfs-store-v1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blocks.redb");
        let a = content(b"old");
        {
            // Format 1: blocks and index only.
            let db = redb::Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            let k = db_key(a.kind(), a.key());
            tx.open_table(BLOCKS)
                .unwrap()
                .insert(k.as_slice(), a.bytes())
                .unwrap();
            tx.open_table(INDEX)
                .unwrap()
                .insert(k.as_slice(), index_value(0, a.bytes().len()).as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.get(BlockKind::Data, a.key()).unwrap().unwrap(), b"old");
        assert!(s.load_charges().unwrap().is_empty());
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
