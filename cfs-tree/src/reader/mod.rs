//! Reading a published tree: roots and their version chain, path resolution, directory
//! lookup and listing, file ranges with read-ahead, all through one byte-bounded block
//! cache. Shared by `cfs get` and the FUSE mount.

mod file;
mod shape;
pub mod window;

pub use file::{get, FileStream, Piece};

use crate::reader::window::WindowOpts;
use crate::service::{BlockService, RingError};
use cfs_core::block::RootBlock;
use cfs_core::fs::{
    self, decode_meta, find_entry, page_for, DirContent, DirEntry, EntryKind, Inode, InodeBody,
    Meta,
};
use cfs_core::{BlockKind, Id, Verified};
use lru::LruCache;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// Errors of the read path (the mount maps each to an errno: `cfs_fuse::mount::errno`).
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("block {key} could not be read within {secs} s")]
    Timeout { key: Id, secs: u64 },
    #[error("block {key} is not valid filesystem metadata: {msg}")]
    Corrupt { key: Id, msg: String },
    #[error("filesystem {0} was not found on the ring (no replica holds its root); check the FSID and the --node address")]
    NoSuchFs(Id),
    #[error("version {want} of filesystem {fsid} is not available (current version is {current})")]
    NoVersion { fsid: Id, want: u64, current: u64 },
    #[error("no such file or directory: {0}")]
    NotFound(String),
    #[error("not a directory: {0}")]
    NotDir(String),
    #[error("is a directory: {0}")]
    IsDir(String),
    #[error("too many levels of symbolic links: {0}")]
    Loop(String),
    #[error("symbolic link {0} points outside the filesystem")]
    Outside(String),
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

/// A fetch result shared between everyone waiting for the same block.
#[derive(Clone, Debug)]
enum FetchErr {
    Unavailable(BlockKind, Id),
    Timeout(Id, u64),
    Corrupt(Id, String),
}

impl From<FetchErr> for FsError {
    fn from(e: FetchErr) -> FsError {
        match e {
            FetchErr::Unavailable(kind, key) => FsError::Ring(RingError::Unavailable { kind, key }),
            FetchErr::Timeout(key, secs) => FsError::Timeout { key, secs },
            FetchErr::Corrupt(key, msg) => FsError::Corrupt { key, msg },
        }
    }
}

/// Inodes are kept decoded apart from other metadata so that every lookup and
/// getattr shares one `Arc` instead of copying the inode.
#[derive(Clone)]
enum Cached {
    Data(Arc<Vec<u8>>),
    Inode(Arc<Inode>),
    Meta(Arc<Meta>),
}

type Slot = watch::Receiver<Option<Result<Cached, FetchErr>>>;
type SlotSender = watch::Sender<Option<Result<Cached, FetchErr>>>;

/// What `Reader::claim` found for a fetch about to start.
enum Claim {
    /// The block is already on its way: wait on its slot.
    Joined(Slot),
    /// A new fetch, registered: finish it through the sender.
    Mine(SlotSender, Slot),
    /// Read-ahead refused for lack of budget.
    Refused,
}

/// Tuning of the read path.
#[derive(Clone, Debug)]
pub struct ReaderOpts {
    /// One memory budget for cached blocks and fetches in flight, however many files
    /// are read at once: read-ahead is refused (and windows shrink) beyond it.
    pub cache_bytes: usize,
    /// Read-ahead window of a sequential stream, in blocks.
    pub window: WindowOpts,
    /// Prefetches in flight at most (beyond demand fetches).
    pub prefetch_parallel: usize,
    /// A block not obtained within this time fails the read (EIO), never a hang.
    pub deadline: Duration,
    /// A data block of a multi-block file that a sequential stream has read through
    /// leaves the cache, its buffer reused by the next fetch instead of fresh memory (a
    /// page fault per 4 KiB: a seventh of the mount's CPU on a cold read when the cache
    /// kept every block). For readers whose reads are kept elsewhere: the mount (the
    /// kernel's page cache; `open_fs` sets it unless direct I/O) and `cfs get` (one pass).
    pub forget_streamed: bool,
    /// The same for a file larger than a quarter of the budget, while no other stream
    /// reads that file (the gateway): one long download neither pushes everything else
    /// out of the cache nor grows it into fresh pages, and a popular file read by several
    /// clients at once still shares its blocks.
    pub forget_large_scans: bool,
}

impl Default for ReaderOpts {
    fn default() -> Self {
        ReaderOpts {
            cache_bytes: 256 << 20,
            window: WindowOpts::default(),
            // Over the wide area a read needs the bandwidth-delay product of all the
            // holders' uplinks in flight: 12 x 50 Mbit/s at ~150 ms round trips with a
            // block's transfer is ~60 blocks of 252 KiB (measured: 32 -> 64 took a
            // 64 MiB `cfs get` over 12 such hosts from 5.9-6.8 s to 4.8-4.9 s).
            prefetch_parallel: 64,
            deadline: Duration::from_secs(30),
            forget_streamed: false,
            forget_large_scans: false,
        }
    }
}

struct Lru {
    map: LruCache<(BlockKind, Id), (Cached, usize)>,
    bytes: usize,
    /// Bytes reserved by data fetches in flight and held replies.
    reserved: usize,
    /// Highest `bytes + reserved` seen.
    peak: usize,
}

struct Inner<R> {
    /// Streams open per file (keyed by its tree's root block).
    streams: Arc<Mutex<HashMap<Id, usize>>>,
    ring: Arc<R>,
    opts: ReaderOpts,
    cache: Mutex<Lru>,
    inflight: Mutex<HashMap<(BlockKind, Id), Slot>>,
    prefetch: Arc<Semaphore>,
}

/// Bytes counted against the reader's memory budget while alive.
pub struct MemoryHold<R> {
    inner: Arc<Inner<R>>,
    bytes: usize,
}

impl<R> Drop for MemoryHold<R> {
    fn drop(&mut self) {
        self.inner.cache.lock().unwrap().reserved -= self.bytes;
    }
}

/// The read side of cfs over any [`BlockService`]. Cheap to clone.
pub struct Reader<R> {
    inner: Arc<Inner<R>>,
}

impl<R> Clone for Reader<R> {
    fn clone(&self) -> Self {
        Reader {
            inner: self.inner.clone(),
        }
    }
}

impl<R: BlockService> Reader<R> {
    pub fn new(ring: Arc<R>, opts: ReaderOpts) -> Reader<R> {
        let prefetch = Arc::new(Semaphore::new(opts.prefetch_parallel.max(1)));
        Reader {
            inner: Arc::new(Inner {
                streams: Arc::default(),
                ring,
                opts,
                cache: Mutex::new(Lru {
                    map: LruCache::unbounded(),
                    bytes: 0,
                    reserved: 0,
                    peak: 0,
                }),
                inflight: Mutex::new(HashMap::new()),
                prefetch,
            }),
        }
    }

    pub fn ring(&self) -> &Arc<R> {
        &self.inner.ring
    }

    pub fn opts(&self) -> &ReaderOpts {
        &self.inner.opts
    }

    fn cache_get(&self, kind: BlockKind, key: Id) -> Option<Cached> {
        let mut c = self.inner.cache.lock().unwrap();
        c.map.get(&(kind, key)).map(|(v, _)| v.clone())
    }

    /// Drop one block from the cache (whoever holds it keeps it until done).
    fn cache_forget(&self, kind: BlockKind, key: Id) {
        let mut c = self.inner.cache.lock().unwrap();
        if let Some((_, size)) = c.map.pop(&(kind, key)) {
            c.bytes -= size;
        }
    }

    /// Evict least recently used blocks until `extra` more bytes fit the budget.
    fn make_room(c: &mut Lru, budget: usize, extra: usize) {
        while c.bytes + c.reserved + extra > budget {
            match c.map.pop_lru() {
                Some((_, (_, s))) => c.bytes -= s,
                None => break,
            }
        }
    }

    fn cache_put(inner: &Inner<R>, kind: BlockKind, key: Id, v: Cached, size: usize) {
        let mut c = inner.cache.lock().unwrap();
        if let Some((_, old)) = c.map.put((kind, key), (v, size)) {
            c.bytes -= old;
        }
        c.bytes += size;
        Self::make_room(&mut c, inner.opts.cache_bytes, 0);
        c.peak = c.peak.max(c.bytes + c.reserved);
    }

    /// Reserve `bytes` of the budget for a fetch, evicting cached blocks if needed. A
    /// demand fetch (`force`) always gets it; read-ahead is refused when fetches in
    /// flight already hold the budget.
    fn reserve(&self, bytes: usize, force: bool) -> bool {
        let budget = self.inner.opts.cache_bytes;
        let mut c = self.inner.cache.lock().unwrap();
        Self::make_room(&mut c, budget, bytes);
        if !force && c.reserved + bytes > budget {
            return false;
        }
        c.reserved += bytes;
        c.peak = c.peak.max(c.bytes + c.reserved);
        true
    }

    /// Count `bytes` held outside the cache (a reply on its way to the kernel, bytes
    /// waiting for the disk) against the budget until the guard is dropped; cached
    /// blocks are evicted to make room.
    pub fn hold(&self, bytes: usize) -> MemoryHold<R> {
        self.reserve(bytes, true);
        MemoryHold {
            inner: self.inner.clone(),
            bytes,
        }
    }

    /// Whether fetches in flight hold more than half the budget: read-ahead windows
    /// shrink, or blocks fetched ahead would evict each other before they are read.
    pub fn short_of_memory(&self) -> bool {
        let c = self.inner.cache.lock().unwrap();
        c.reserved > self.inner.opts.cache_bytes / 2
    }

    /// Bytes of the budget in use: cached blocks, fetches in flight, held replies.
    pub fn memory_in_use(&self) -> usize {
        let c = self.inner.cache.lock().unwrap();
        c.bytes + c.reserved
    }

    /// The most `memory_in_use` has been.
    pub fn memory_peak(&self) -> usize {
        self.inner.cache.lock().unwrap().peak
    }

    /// Start fetching a block unless it is already cached or on its way; returns the
    /// slot to wait on. The fetch runs as its own task, so a waiter that gives up does
    /// not cancel it and everyone waiting shares one result. `reserve` bytes of the
    /// budget are held while it is in flight; None if read-ahead (`force` false) is
    /// refused for lack of budget.
    fn start(&self, kind: BlockKind, key: Id, reserve: usize, force: bool) -> Option<Slot> {
        let mut inf = self.inner.inflight.lock().unwrap();
        match self.claim(&mut inf, kind, key, reserve, force) {
            Claim::Joined(rx) => Some(rx),
            Claim::Refused => None,
            Claim::Mine(tx, rx) => {
                drop(inf);
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    let r = fetch(&inner, kind, key).await;
                    Self::finish(&inner, kind, key, reserve, tx, r);
                });
                Some(rx)
            }
        }
    }

    /// Join the fetch of a block already on its way, or reserve `reserve` bytes and
    /// register a new one (whose sender must be given to `finish`).
    fn claim(
        &self,
        inflight: &mut HashMap<(BlockKind, Id), Slot>,
        kind: BlockKind,
        key: Id,
        reserve: usize,
        force: bool,
    ) -> Claim {
        if let Some(rx) = inflight.get(&(kind, key)) {
            return Claim::Joined(rx.clone());
        }
        if !self.reserve(reserve, force) {
            return Claim::Refused;
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert((kind, key), rx.clone());
        Claim::Mine(tx, rx)
    }

    /// A fetch started by `start` or `start_many` is over: its reservation goes, the
    /// block is cached, and its waiters get the result.
    fn finish(
        inner: &Inner<R>,
        kind: BlockKind,
        key: Id,
        reserve: usize,
        tx: SlotSender,
        r: Result<(Cached, usize), FetchErr>,
    ) {
        inner.cache.lock().unwrap().reserved -= reserve;
        if let Ok((v, size)) = &r {
            Self::cache_put(inner, kind, key, v.clone(), *size);
        }
        inner.inflight.lock().unwrap().remove(&(kind, key));
        let _ = tx.send(Some(r.map(|(v, _)| v)));
    }

    /// Start fetching many small blocks as one batch (`BlockService::get_many`: one
    /// exchange per replica range instead of one per block), each with `reserve` bytes
    /// of read-ahead budget (stops where the budget refuses). Every block gets its slot
    /// as with `start`, so a demand read of one waits for the batch; a block the batch
    /// did not bring is fetched alone. Returns the slots of blocks not yet cached.
    fn start_many(&self, kind: BlockKind, keys: &[(Id, usize)]) -> Vec<Slot> {
        let mut slots = Vec::new();
        let mut mine = Vec::new();
        {
            let mut inf = self.inner.inflight.lock().unwrap();
            for &(key, reserve) in keys {
                if self.cache_get(kind, key).is_some() {
                    continue;
                }
                match self.claim(&mut inf, kind, key, reserve, false) {
                    Claim::Joined(rx) => slots.push(rx),
                    Claim::Refused => break,
                    Claim::Mine(tx, rx) => {
                        slots.push(rx);
                        mine.push((key, reserve, tx));
                    }
                }
            }
        }
        if mine.is_empty() {
            return slots;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            // One deadline for the batch and the fetches alone after it: a third of it
            // for the batch, the rest for what the batch did not bring.
            let deadline = inner.opts.deadline;
            let end = tokio::time::Instant::now() + deadline;
            let items = mine.iter().map(|(k, _, _)| (kind, *k)).collect();
            let got = tokio::time::timeout(deadline / 3, inner.ring.get_many(items))
                .await
                .unwrap_or_default();
            let mut got = got.into_iter();
            let mut alone = Vec::new();
            for (key, reserve, tx) in mine {
                match got.next().flatten() {
                    Some(v) => Self::finish(&inner, kind, key, reserve, tx, decode(kind, key, v)),
                    None => alone.push((key, reserve, tx)),
                }
            }
            // At most as many at once as read-ahead fetches, as before batches.
            let mut alone = alone.into_iter().peekable();
            while alone.peek().is_some() {
                let wave: Vec<_> = alone
                    .by_ref()
                    .take(inner.opts.prefetch_parallel.max(1))
                    .collect();
                let fetches = wave.into_iter().map(|(key, reserve, tx)| {
                    let inner = &inner;
                    async move {
                        let left = end.saturating_duration_since(tokio::time::Instant::now());
                        let r = fetch_within(inner, kind, key, left).await;
                        Self::finish(inner, kind, key, reserve, tx, r);
                    }
                });
                futures_util::future::join_all(fetches).await;
            }
        });
        slots
    }

    async fn get(&self, kind: BlockKind, key: Id) -> Result<Cached, FsError> {
        if let Some(v) = self.cache_get(kind, key) {
            return Ok(v);
        }
        let reserve = if kind == BlockKind::Data {
            fs::BLOCK_SIZE
        } else {
            0
        };
        let mut rx = self.start(kind, key, reserve, true).expect("forced");
        let r = match rx.wait_for(|v| v.is_some()).await {
            Ok(v) => v.clone().expect("waited for Some"),
            Err(_) => Err(FetchErr::Unavailable(kind, key)),
        };
        if let Err(e) = &r {
            tracing::warn!(block = %key, ?kind, "block read failed: {e:?}");
        }
        Ok(r?)
    }

    /// A decoded, validated metadata block other than an inode (indirect, page).
    async fn meta(&self, key: Id) -> Result<Arc<Meta>, FsError> {
        match self.get(BlockKind::Meta, key).await? {
            Cached::Meta(m) => Ok(m),
            _ => Err(FsError::Corrupt {
                key,
                msg: "an inode where an indirect block or directory page belongs".into(),
            }),
        }
    }

    /// A data block's bytes.
    pub async fn data(&self, key: Id) -> Result<Arc<Vec<u8>>, FsError> {
        match self.get(BlockKind::Data, key).await? {
            Cached::Data(d) => Ok(d),
            _ => unreachable!("data slot holds data"),
        }
    }

    /// The inode block `key`; any other Meta block is an error.
    pub async fn inode(&self, key: Id) -> Result<Arc<Inode>, FsError> {
        match self.get(BlockKind::Meta, key).await? {
            Cached::Inode(i) => Ok(i),
            _ => Err(FsError::Corrupt {
                key,
                msg: "expected an inode block".into(),
            }),
        }
    }

    async fn page(&self, key: Id) -> Result<Arc<Meta>, FsError> {
        let m = self.meta(key).await?;
        match &*m {
            Meta::DirPage(_) => Ok(m),
            _ => Err(FsError::Corrupt {
                key,
                msg: "expected a directory page".into(),
            }),
        }
    }

    /// Look `name` up in a directory inode: at most one page fetch.
    pub async fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<DirEntry>, FsError> {
        let InodeBody::Dir { content, .. } = &dir.body else {
            return Err(FsError::NotDir(String::from_utf8_lossy(name).into_owned()));
        };
        match content {
            DirContent::Inline(e) => Ok(find_entry(e, name).cloned()),
            DirContent::Paged(pages) => {
                let Some(p) = page_for(pages, name) else {
                    return Ok(None);
                };
                let m = self.page(p.key).await?;
                let Meta::DirPage(e) = &*m else {
                    unreachable!()
                };
                Ok(find_entry(e, name).cloned())
            }
        }
    }

    /// Every entry of a directory, sorted by name; pages are fetched in parallel.
    pub async fn list(&self, dir: &Inode) -> Result<Vec<DirEntry>, FsError> {
        let InodeBody::Dir { content, .. } = &dir.body else {
            return Err(FsError::NotDir(String::new()));
        };
        match content {
            DirContent::Inline(e) => Ok(e.clone()),
            DirContent::Paged(pages) => {
                for p in pages {
                    if self.cache_get(BlockKind::Meta, p.key).is_none() {
                        drop(self.start(BlockKind::Meta, p.key, 0, true));
                    }
                }
                let mut out = Vec::new();
                for p in pages {
                    let m = self.page(p.key).await?;
                    let Meta::DirPage(e) = &*m else {
                        unreachable!()
                    };
                    out.extend(e.iter().cloned());
                }
                Ok(out)
            }
        }
    }

    /// The current root of `fsid`, or version `version` by following the chain of
    /// previous roots (each checked: same publisher, valid signature, lower version).
    pub async fn root(&self, fsid: Id, version: Option<u64>) -> Result<RootBlock, FsError> {
        let deadline = self.inner.opts.deadline;
        let got = tokio::time::timeout(deadline, self.inner.ring.get_root(fsid))
            .await
            .map_err(|_| FsError::Timeout {
                key: fsid,
                secs: deadline.as_secs(),
            })??;
        let v = got.ok_or(FsError::NoSuchFs(fsid))?;
        let mut r = v.root().ok_or_else(|| FsError::Corrupt {
            key: fsid,
            msg: "root does not decode".into(),
        })?;
        let Some(want) = version else { return Ok(r) };
        let current = r.version;
        let none = || FsError::NoVersion {
            fsid,
            want,
            current,
        };
        if want > current {
            return Err(none());
        }
        while r.version > want {
            let Some(prev) = r.prev else {
                return Err(none());
            };
            let b = tokio::time::timeout(deadline, self.inner.ring.get(BlockKind::Meta, prev))
                .await
                .map_err(|_| FsError::Timeout {
                    key: prev,
                    secs: deadline.as_secs(),
                })??;
            let p = cfs_core::walk::previous_root(&r, b.bytes()).map_err(|e| FsError::Corrupt {
                key: prev,
                msg: e.to_string(),
            })?;
            r = p;
        }
        if r.version != want {
            return Err(none());
        }
        Ok(r)
    }

    /// Resolve a path (components separated by '/') from the top inode, following
    /// relative symlinks on the way and at the end. Returns the inode key and inode.
    pub async fn resolve(&self, top: Id, path: &[u8]) -> Result<(Id, Arc<Inode>), FsError> {
        let mut todo: Vec<Vec<u8>> = split(path).into_iter().rev().collect();
        // Stack of (key, inode) from the top: ".." pops.
        let mut stack: Vec<(Id, Arc<Inode>)> = vec![(top, self.inode(top).await?)];
        let mut links = 0;
        let shown = String::from_utf8_lossy(path).into_owned();
        while let Some(c) = todo.pop() {
            if c == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let (_, dir) = stack.last().unwrap();
            if dir.kind() != EntryKind::Dir {
                return Err(FsError::NotDir(shown));
            }
            let e = self
                .lookup(dir, &c)
                .await?
                .ok_or_else(|| FsError::NotFound(shown.clone()))?;
            let inode = self.inode(e.key).await?;
            if let InodeBody::Symlink { target } = &inode.body {
                links += 1;
                if links > 40 {
                    return Err(FsError::Loop(shown));
                }
                if target.starts_with(b"/") {
                    return Err(FsError::Outside(shown));
                }
                todo.extend(split(target).into_iter().rev());
                continue;
            }
            stack.push((e.key, inode));
        }
        Ok(stack.pop().unwrap())
    }
}

fn split(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(|c| c.to_vec())
        .collect()
}

async fn fetch<R: BlockService>(
    inner: &Inner<R>,
    kind: BlockKind,
    key: Id,
) -> Result<(Cached, usize), FetchErr> {
    fetch_within(inner, kind, key, inner.opts.deadline).await
}

async fn fetch_within<R: BlockService>(
    inner: &Inner<R>,
    kind: BlockKind,
    key: Id,
    deadline: Duration,
) -> Result<(Cached, usize), FetchErr> {
    let v = match tokio::time::timeout(deadline, inner.ring.get(kind, key)).await {
        Err(_) => return Err(FetchErr::Timeout(key, deadline.as_secs())),
        Ok(Err(_)) => return Err(FetchErr::Unavailable(kind, key)),
        Ok(Ok(v)) => v,
    };
    decode(kind, key, v)
}

/// A fetched block as the cache keeps it, and its size.
fn decode(kind: BlockKind, key: Id, v: Verified) -> Result<(Cached, usize), FetchErr> {
    // The ring verifies, but a bad BlockService must not make us serve wrong bytes.
    if v.kind() != kind || v.key() != key {
        return Err(FetchErr::Corrupt(key, "ring returned another block".into()));
    }
    let size = v.bytes().len();
    match kind {
        BlockKind::Meta => match decode_meta(v.bytes()) {
            Ok(Meta::Inode(i)) => Ok((Cached::Inode(Arc::new(i)), size)),
            Ok(m) => Ok((Cached::Meta(Arc::new(m)), size)),
            Err(e) => Err(FetchErr::Corrupt(key, e.to_string())),
        },
        // Arc<Vec> takes the buffer as it is (Arc<[u8]> would copy it).
        _ => Ok((Cached::Data(Arc::new(v.into_bytes())), size)),
    }
}
