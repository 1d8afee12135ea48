//! The permanent block store: a trait with a redb implementation (durable, group commit)
//! and a memory implementation (tests, simulator). Only verified blocks go in, and every
//! block carries a lease: the unix second its expiry falls on. A lease only grows.

use cfs_core::{BlockKind, Id, Verified};
use redb::{ReadableDatabase, ReadableTable};
use std::collections::{BTreeMap, BTreeSet};
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
fn merged(before: Option<u64>, asked: u64) -> u64 {
    before.map_or(asked, |b| b.max(asked))
}

/// What a put does to what is held, for both stores: Ok(None) writes the block,
/// Ok(Some(Present)) keeps the held bytes (only the lease may grow), Err refuses.
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

/// Bytes of redb's page cache.
pub const REDB_CACHE_BYTES: usize = 32 << 20;

/// Block bytes by store key (kind byte, then the 20-byte key).
const BLOCKS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("blocks");
/// Per block: version, length and lease end (3 x 8 bytes, big-endian), so listing, `Has`
/// and usage never read block bytes.
const INDEX: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("index");
/// Lease end (8 bytes, big-endian) then store key, for the sweep: soonest first.
const EXPIRY: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("expiry");
/// Format 2's storage charges: bytes per source bucket.
const CHARGES_V2: redb::TableDefinition<&[u8], u64> = redb::TableDefinition::new("charges");
/// Storage charged per source bucket (quota's space-time ledger, encoded by `quota`), so
/// a restart does not forget it.
const CHARGES: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("charges3");
/// Store-wide facts: "format" is the layout version.
const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
/// 1: blocks + index. 2: adds charges and meta (a format-1 store is migrated on open by
/// creating them: no existing table changes). 3: leases: index entries gain a lease end,
/// the expiry table, and charges become space-time ledgers (a format-1 or 2 store is
/// migrated on open: every block gets `MIGRATED_LEASE` from then, every byte charged
/// becomes a charge for that long).
pub const STORE_FORMAT: u32 = 3;
/// The lease a block from a store without leases gets when the store is migrated.
pub const MIGRATED_LEASE: u64 = 30 * 86_400;
/// Index entries rewritten per step of a migration.
const MIGRATE_CHUNK: usize = 8192;
/// Puts waiting for the writer at most; a caller beyond it waits (backpressure), so
/// the queue's memory is bounded whatever the request rate.
const WRITER_QUEUE: usize = 4096;

fn db_key(kind: BlockKind, key: Id) -> [u8; 21] {
    let mut k = [0u8; 21];
    k[0] = kind as u8;
    k[1..].copy_from_slice(&key.0);
    k
}

fn expiry_key(expires: u64, k: &[u8; 21]) -> [u8; 29] {
    let mut e = [0u8; 29];
    e[..8].copy_from_slice(&expires.to_be_bytes());
    e[8..].copy_from_slice(k);
    e
}

fn index_value(h: Held) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&h.version.to_be_bytes());
    v[8..16].copy_from_slice(&h.len.to_be_bytes());
    v[16..].copy_from_slice(&h.expires.to_be_bytes());
    v
}

fn be(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// An index value; None if the entry is malformed.
fn parse_index(v: &[u8]) -> Option<Held> {
    if v.len() != 24 {
        return None;
    }
    Some(Held {
        version: be(&v[..8])?,
        len: be(&v[8..16])?,
        expires: be(&v[16..])?,
    })
}

/// (kind, key, held) of an index entry; None if it is malformed.
fn index_entry(k: &[u8], v: &[u8]) -> Option<(BlockKind, Id, Held)> {
    if k.len() != 21 {
        return None;
    }
    let kind = BlockKind::from_u8(k[0])?;
    Some((kind, Id(k[1..].try_into().ok()?), parse_index(v)?))
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

type Pending = (
    (Verified, u64),
    mpsc::SyncSender<Result<PutDone, StoreError>>,
);

/// Durable store in one redb file. Writes go through one writer thread that commits every
/// put waiting at that moment in one transaction: one fsync per batch, not per block.
pub struct RedbStore {
    db: std::sync::Arc<redb::Database>,
    /// The directory holding the file, for free-space checks.
    dir: std::path::PathBuf,
    /// Charges to write with the next commit.
    staged: std::sync::Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>,
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

/// Set a block's index entry and its expiry entry (removing the old one) in `tx`.
fn write_index(
    index: &mut redb::Table<&[u8], &[u8]>,
    expiry: &mut redb::Table<&[u8], &[u8]>,
    k: &[u8; 21],
    old: Option<Held>,
    new: Held,
) -> Result<(), StoreError> {
    if let Some(o) = old {
        expiry
            .remove(expiry_key(o.expires, k).as_slice())
            .map_err(io)?;
    }
    index
        .insert(k.as_slice(), index_value(new).as_slice())
        .map_err(io)?;
    expiry
        .insert(expiry_key(new.expires, k).as_slice(), [].as_slice())
        .map_err(io)?;
    Ok(())
}

impl RedbStore {
    /// Remove a block if `go(held)` says so, in one write transaction.
    fn remove_where(
        &self,
        kind: BlockKind,
        key: Id,
        go: impl Fn(Held) -> bool,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        let k = db_key(kind, key);
        let removed = {
            let mut blocks = tx.open_table(BLOCKS).map_err(io)?;
            let mut index = tx.open_table(INDEX).map_err(io)?;
            let mut expiry = tx.open_table(EXPIRY).map_err(io)?;
            let held = index
                .get(k.as_slice())
                .map_err(io)?
                .and_then(|g| parse_index(g.value()));
            match held {
                Some(h) if go(h) => {
                    blocks.remove(k.as_slice()).map_err(io)?;
                    index.remove(k.as_slice()).map_err(io)?;
                    expiry
                        .remove(expiry_key(h.expires, &k).as_slice())
                        .map_err(io)?;
                    Some(h.len)
                }
                _ => None,
            }
        };
        tx.commit().map_err(io)?;
        if let Some(n) = removed {
            self.forget_usage(1, n);
        }
        Ok(())
    }

    fn forget_usage(&self, blocks: u64, bytes: u64) {
        let mut u = self.usage.lock().unwrap();
        u.0 = u.0.saturating_sub(blocks);
        u.1 = u.1.saturating_sub(bytes);
    }

    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        // redb's own page cache is bounded so node memory does not grow with the store.
        let db = redb::Builder::new()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(path)
            .map_err(io)?;
        migrate(&db)?;
        let db = std::sync::Arc::new(db);
        let mut usage = (0u64, 0u64);
        {
            let tx = db.begin_read().map_err(io)?;
            let t = tx.open_table(INDEX).map_err(io)?;
            for item in t.iter().map_err(io)? {
                let (_, v) = item.map_err(io)?;
                if let Some(h) = parse_index(v.value()) {
                    usage.0 += 1;
                    usage.1 += h.len;
                }
            }
        }
        let usage = std::sync::Arc::new(Mutex::new(usage));
        let (tx, rx) = mpsc::sync_channel::<Pending>(WRITER_QUEUE);
        let staged: std::sync::Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>> = Default::default();
        let (db2, usage2, staged2) = (db.clone(), usage.clone(), staged.clone());
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(&db2, rx, &usage2, &staged2))
            .map_err(io)?;
        Ok(RedbStore {
            db,
            dir: path
                .parent()
                .map_or_else(|| std::path::PathBuf::from("."), Path::to_path_buf),
            staged,
            writer: Mutex::new(Some(tx)),
            thread: Some(thread),
            usage,
        })
    }
}

/// Bring a store of an older format to `STORE_FORMAT` in one transaction (so a crash
/// leaves the old format whole), or refuse a newer one.
fn migrate(db: &redb::Database) -> Result<(), StoreError> {
    use redb::TableHandle;
    let tx = db.begin_write().map_err(io)?;
    let found = tx
        .open_table(META)
        .map_err(io)?
        .get("format")
        .map_err(io)?
        .map(|g| g.value());
    match found {
        Some(f) if f > STORE_FORMAT as u64 => {
            return Err(StoreError::TooNew {
                found: f as u32,
                known: STORE_FORMAT,
            })
        }
        Some(f) if f == STORE_FORMAT as u64 => return Ok(()),
        _ => {}
    }
    let now = unix_now();
    let expires = now + MIGRATED_LEASE;
    let mut migrated = 0u64;
    {
        let mut index = tx.open_table(INDEX).map_err(io)?;
        let mut expiry = tx.open_table(EXPIRY).map_err(io)?;
        // Formats 1 and 2: (version, length), 16 bytes. Rewritten a chunk at a time, so
        // memory stays bounded whatever the store's size.
        let mut after: Option<Vec<u8>> = None;
        loop {
            let chunk: Vec<(Vec<u8>, Vec<u8>)> = {
                let range = match &after {
                    Some(a) => index.range::<&[u8]>((
                        std::ops::Bound::Excluded(a.as_slice()),
                        std::ops::Bound::Unbounded,
                    )),
                    None => index.range::<&[u8]>(..),
                }
                .map_err(io)?;
                range
                    .take(MIGRATE_CHUNK)
                    .filter_map(|e| e.ok())
                    .map(|(k, v)| (k.value().to_vec(), v.value().to_vec()))
                    .collect()
            };
            let Some(last) = chunk.last() else { break };
            after = Some(last.0.clone());
            for (k, v) in chunk.iter().filter(|(_, v)| v.len() == 16) {
                let (Some(version), Some(len), Ok(k21)) =
                    (be(&v[..8]), be(&v[8..]), <[u8; 21]>::try_from(k.as_slice()))
                else {
                    continue;
                };
                let h = Held {
                    version,
                    len,
                    expires,
                };
                write_index(&mut index, &mut expiry, &k21, None, h)?;
                migrated += 1;
            }
        }
    }
    tx.open_table(BLOCKS).map_err(io)?;
    {
        let mut charges = tx.open_table(CHARGES).map_err(io)?;
        let has_v2 = tx
            .list_tables()
            .map_err(io)?
            .any(|t| t.name() == CHARGES_V2.name());
        if has_v2 {
            let old: Vec<(Vec<u8>, u64)> = {
                let t = tx.open_table(CHARGES_V2).map_err(io)?;
                t.iter()
                    .map_err(io)?
                    .filter_map(|e| e.ok())
                    .map(|(k, v)| (k.value().to_vec(), v.value()))
                    .collect()
            };
            for (bucket, bytes) in old {
                let ledger = crate::quota::Ledger::migrated(bytes, now, expires);
                charges
                    .insert(bucket.as_slice(), ledger.encode().as_slice())
                    .map_err(io)?;
            }
            tx.delete_table(CHARGES_V2).map_err(io)?;
        }
    }
    tx.open_table(META)
        .map_err(io)?
        .insert("format", STORE_FORMAT as u64)
        .map_err(io)?;
    tx.commit().map_err(io)?;
    if found.is_some() || migrated > 0 {
        tracing::info!(
            from = found.unwrap_or(1),
            to = STORE_FORMAT,
            blocks = migrated,
            lease_days = MIGRATED_LEASE / 86_400,
            "block store migrated; its blocks are leased for the days given from now"
        );
    }
    Ok(())
}

fn writer_loop(
    db: &redb::Database,
    rx: mpsc::Receiver<Pending>,
    usage: &Mutex<(u64, u64)>,
    staged: &Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 1024 {
                break;
            }
        }
        let mut results: Vec<Result<PutDone, StoreError>> = Vec::with_capacity(batch.len());
        let mut added = (0u64, 0i64);
        let commit = (|| -> Result<(), StoreError> {
            let tx = db.begin_write().map_err(io)?;
            {
                let charges = std::mem::take(&mut *staged.lock().unwrap());
                let mut t = tx.open_table(CHARGES).map_err(io)?;
                for (k, v) in charges {
                    t.insert(k.as_slice(), v.as_slice()).map_err(io)?;
                }
            }
            {
                let mut blocks = tx.open_table(BLOCKS).map_err(io)?;
                let mut index = tx.open_table(INDEX).map_err(io)?;
                let mut expiry = tx.open_table(EXPIRY).map_err(io)?;
                for ((block, expires), _) in &batch {
                    let k = db_key(block.kind(), block.key());
                    let held = index
                        .get(k.as_slice())
                        .map_err(io)?
                        .and_then(|g| parse_index(g.value()));
                    // Only a root of the same version needs its bytes compared.
                    let held_bytes = match held {
                        Some(h)
                            if block.kind() == BlockKind::Root && h.version == block.version() =>
                        {
                            blocks
                                .get(k.as_slice())
                                .map_err(io)?
                                .map(|g| g.value().to_vec())
                                .unwrap_or_default()
                        }
                        _ => Vec::new(),
                    };
                    let held_ref = held.map(|h| (h.version, held_bytes.as_slice()));
                    let before = held.map(|h| h.expires);
                    let after = merged(before, *expires);
                    match check_root_replace(held_ref, block) {
                        Err(e) => results.push(Err(e)),
                        Ok(Some(outcome)) => {
                            let h = held.expect("present means held");
                            if after > h.expires {
                                let new = Held {
                                    expires: after,
                                    ..h
                                };
                                write_index(&mut index, &mut expiry, &k, held, new)?;
                            }
                            results.push(Ok(PutDone {
                                outcome,
                                before,
                                expires: after,
                            }));
                        }
                        Ok(None) => {
                            blocks.insert(k.as_slice(), block.bytes()).map_err(io)?;
                            let new = Held {
                                version: block.version(),
                                len: block.bytes().len() as u64,
                                expires: after,
                            };
                            write_index(&mut index, &mut expiry, &k, held, new)?;
                            match held {
                                Some(h) => added.1 += new.len as i64 - h.len as i64,
                                None => {
                                    added.0 += 1;
                                    added.1 += new.len as i64;
                                }
                            }
                            results.push(Ok(PutDone {
                                outcome: PutOutcome::Stored,
                                before,
                                expires: after,
                            }));
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
    fn put(&self, block: &Verified, expires: u64) -> Result<PutDone, StoreError> {
        self.put_many(vec![(block.clone(), expires)])
            .pop()
            .expect("one answer per block")
    }

    /// All blocks go to the writer before waiting, so they share one commit.
    fn put_many(&self, blocks: Vec<(Verified, u64)>) -> Vec<Result<PutDone, StoreError>> {
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

    fn get(&self, kind: BlockKind, key: Id) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let k = db_key(kind, key);
        let Some(h) = tx
            .open_table(INDEX)
            .map_err(io)?
            .get(k.as_slice())
            .map_err(io)?
            .and_then(|g| parse_index(g.value()))
        else {
            return Ok(None);
        };
        let t = tx.open_table(BLOCKS).map_err(io)?;
        let v = t.get(k.as_slice()).map_err(io)?;
        Ok(v.map(|g| (g.value().to_vec(), h.expires)))
    }

    fn held(&self, kind: BlockKind, key: Id) -> Result<Option<Held>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let t = tx.open_table(INDEX).map_err(io)?;
        let v = t.get(db_key(kind, key).as_slice()).map_err(io)?;
        Ok(v.and_then(|g| parse_index(g.value())))
    }

    /// Charges staged meanwhile are committed with the renewal.
    fn renew(&self, items: &[StoreKey], expires: u64) -> Result<Vec<Option<Renewed>>, StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        let mut out = Vec::with_capacity(items.len());
        let charges = std::mem::take(&mut *self.staged.lock().unwrap());
        let mut wrote = !charges.is_empty();
        {
            let mut t = tx.open_table(CHARGES).map_err(io)?;
            for (k, v) in &charges {
                t.insert(k.as_slice(), v.as_slice()).map_err(io)?;
            }
        }
        {
            let mut index = tx.open_table(INDEX).map_err(io)?;
            let mut expiry = tx.open_table(EXPIRY).map_err(io)?;
            for &(kind, key) in items {
                let k = db_key(kind, key);
                let held = index
                    .get(k.as_slice())
                    .map_err(io)?
                    .and_then(|g| parse_index(g.value()));
                out.push(held.map(|h| Renewed {
                    before: h.expires,
                    expires: h.expires.max(expires),
                    len: h.len,
                }));
                if let Some(h) = held.filter(|h| h.expires < expires) {
                    write_index(&mut index, &mut expiry, &k, Some(h), Held { expires, ..h })?;
                    wrote = true;
                }
            }
        }
        if wrote {
            tx.commit().map_err(io)?;
        } else {
            tx.abort().map_err(io)?;
        }
        Ok(out)
    }

    fn remove(&self, kind: BlockKind, key: Id) -> Result<(), StoreError> {
        self.remove_where(kind, key, |_| true)
    }

    /// Checked and removed in one write transaction, so it cannot interleave with a put.
    fn remove_if(&self, kind: BlockKind, key: Id, version: u64) -> Result<(), StoreError> {
        self.remove_where(kind, key, |h| h.version == version)
    }

    fn remove_expired(
        &self,
        now: u64,
        limit: usize,
    ) -> Result<Vec<(BlockKind, Id, u64)>, StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        let mut gone = Vec::new();
        {
            let mut blocks = tx.open_table(BLOCKS).map_err(io)?;
            let mut index = tx.open_table(INDEX).map_err(io)?;
            let mut expiry = tx.open_table(EXPIRY).map_err(io)?;
            let end = (now.saturating_add(1)).to_be_bytes();
            let due: Vec<Vec<u8>> = expiry
                .range::<&[u8]>(..end.as_slice())
                .map_err(io)?
                .take(limit)
                .filter_map(|e| e.ok().map(|(k, _)| k.value().to_vec()))
                .collect();
            for ek in due {
                expiry.remove(ek.as_slice()).map_err(io)?;
                let Ok(k) = <[u8; 21]>::try_from(&ek[8..]) else {
                    continue;
                };
                let held = index
                    .get(k.as_slice())
                    .map_err(io)?
                    .and_then(|g| parse_index(g.value()));
                // Only if the index agrees: a stray expiry entry removes nothing.
                if let Some(h) =
                    held.filter(|h| h.expires <= now && be(&ek[..8]) == Some(h.expires))
                {
                    blocks.remove(k.as_slice()).map_err(io)?;
                    index.remove(k.as_slice()).map_err(io)?;
                    if let Some(kind) = BlockKind::from_u8(k[0]) {
                        gone.push((kind, Id(k[1..].try_into().expect("20 bytes")), h.len));
                    }
                }
            }
        }
        tx.commit().map_err(io)?;
        self.forget_usage(gone.len() as u64, gone.iter().map(|g| g.2).sum());
        Ok(gone)
    }

    fn list(&self) -> Result<Vec<(BlockKind, Id, Held)>, StoreError> {
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
    ) -> Result<Vec<(BlockKind, Id, Held)>, StoreError> {
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

    fn stage_charge(&self, bucket: &[u8], charge: Vec<u8>) {
        self.staged.lock().unwrap().insert(bucket.to_vec(), charge);
    }

    fn load_charges(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let t = tx.open_table(CHARGES).map_err(io)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(io)? {
            let (k, v) = item.map_err(io)?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn save_charges(
        &self,
        snapshot: &dyn Fn() -> Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), StoreError> {
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
                t.insert(k.as_slice(), v.as_slice()).map_err(io)?;
            }
        }
        tx.commit().map_err(io)?;
        Ok(())
    }

    fn usage(&self) -> (u64, u64) {
        *self.usage.lock().unwrap()
    }

    fn space(&self) -> Option<(u64, u64)> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).ok()?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a zeroed struct for the kernel to fill.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        let frag = st.f_frsize as u64;
        Some((st.f_bavail as u64 * frag, st.f_blocks as u64 * frag))
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
        assert!(matches!(
            s.put(&root(2, b"y"), T + 10),
            Err(StoreError::Conflict(2))
        ));
        assert_eq!(out(s, &r2, T + 10), PutOutcome::Present);
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
