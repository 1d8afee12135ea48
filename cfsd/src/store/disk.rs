//! The durable block store: one redb file, one writer thread committing every put waiting
//! at that moment together, an expiry table for the sweep, and migrations from older
//! formats.

use super::{
    check_root_replace, merged, BlockStore, Held, PutDone, PutOutcome, Renewed, StoreError,
    StoreKey,
};
use cfs_core::{BlockKind, Id, Verified};
use redb::{ReadableDatabase, ReadableTable};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Mutex;

/// Bytes of redb's page cache.
pub const REDB_CACHE_BYTES: usize = 32 << 20;

/// Block bytes by store key (kind byte, then the 20-byte key).
pub(super) const BLOCKS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("blocks");
/// Per block: version, length and lease end (3 x 8 bytes, big-endian), so listing, `Has`
/// and usage never read block bytes.
pub(super) const INDEX: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("index");
/// Lease end (8 bytes, big-endian) then store key, for the sweep: soonest first.
const EXPIRY: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("expiry");
/// Format 2's storage charges: bytes per source bucket.
pub(super) const CHARGES_V2: redb::TableDefinition<&[u8], u64> =
    redb::TableDefinition::new("charges");
/// Storage charged per source bucket (quota's space-time ledger, encoded by `quota`), so
/// a restart does not forget it.
const CHARGES: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("charges3");
/// Store-wide facts: "format" is the layout version.
pub(super) const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
/// 1: blocks + index. 2: adds charges and meta (a format-1 store is migrated on open by
/// creating them: no existing table changes). 3: leases: index entries gain a lease end,
/// the expiry table, and charges become space-time ledgers (a format-1 or 2 store is
/// migrated on open: every block gets `MIGRATED_LEASE` from then, every byte charged
/// becomes a charge for that long).
pub const STORE_FORMAT: u32 = 3;
/// The lease a block from a store without leases gets when the store is migrated.
pub const MIGRATED_LEASE: u64 = 30 * 86_400;
/// Index entries rewritten per step of a migration.
pub(super) const MIGRATE_CHUNK: usize = 8192;
/// Puts waiting for the writer at most; a caller beyond it waits (backpressure), so
/// the queue's memory is bounded whatever the request rate.
const WRITER_QUEUE: usize = 4096;

pub(super) fn db_key(kind: BlockKind, key: Id) -> [u8; 21] {
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

pub(super) fn unix_now() -> u64 {
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
    repaired: bool,
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
        // redb repairs a file that was not closed cleanly (a crash, a kill -9) on open;
        // a clean stop never needs it, so it is reported.
        let repaired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = repaired.clone();
        let db = redb::Builder::new()
            .set_cache_size(REDB_CACHE_BYTES)
            .set_repair_callback(move |_| flag.store(true, std::sync::atomic::Ordering::Relaxed))
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
            repaired: repaired.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Whether the file had not been closed cleanly and was repaired when opened.
    pub fn was_repaired(&self) -> bool {
        self.repaired
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
        fs_space(&self.dir).ok()
    }
}

/// (free, total) bytes of the filesystem holding `dir`, as an unprivileged writer sees it.
pub fn fs_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a zeroed struct for the kernel to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frag = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * frag, st.f_blocks as u64 * frag))
}
