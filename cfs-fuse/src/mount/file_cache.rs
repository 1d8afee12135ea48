//! The on-disk file cache served by FUSE passthrough.
//!
//! Blocks are immutable and verified, so a file whose bytes all came through the verified
//! read path can be written once to a local file named by its inode key and handed to the
//! kernel (`BackingId`), which then reads it directly at its own speed. The bytes of each
//! normal read are written behind the reply into a sparse temporary file; when every byte
//! is covered the file is synced and renamed to its final name, so a crash never leaves a
//! partial file under that name.
//!
//! Trust across processes: when cfs has verified a cache file (written it from verified
//! blocks, or re-hashed it), it records the file's identity beside it (`KEY.ok`: device,
//! inode number, size, mtime and ctime in ns, as git's index does). A later mount trusts
//! the file without reading it only while that identity still matches the open file;
//! any write changes the ctime, which no one but the kernel can set back, so an altered
//! file is re-hashed (`Reader::verify_copy`) before use, and not served if it differs.

use cfs_core::Id;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug)]
pub struct FileCacheOpts {
    /// One file per inode key; may be shared by several mounts (names are content keys).
    pub dir: PathBuf,
    /// Bytes of cached files kept; least recently used whole files are evicted first.
    pub budget_bytes: u64,
    /// Smaller files are not cached: the kernel's page cache and the block cache serve
    /// them well, and a cache file per tiny file would cost more than it saves.
    pub min_file_bytes: u64,
    /// Bytes of read data waiting for the disk at most; past it a range is written
    /// later, read again from the block cache or the ring once the disk has room.
    pub write_behind_bytes: usize,
}

impl FileCacheOpts {
    /// `$CFS_STATE_DIR/files`, else `$XDG_CACHE_HOME/cfs/files`, else `~/.cache/cfs/files`.
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("CFS_STATE_DIR") {
            return Some(PathBuf::from(d).join("files"));
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return Some(PathBuf::from(d).join("cfs/files"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/cfs/files"))
    }

    pub fn new(dir: PathBuf, budget_bytes: u64) -> FileCacheOpts {
        FileCacheOpts {
            dir,
            budget_bytes,
            min_file_bytes: cfs_core::fs::BLOCK_SIZE as u64,
            write_behind_bytes: WRITE_BEHIND_BYTES,
        }
    }
}

/// Bytes written behind replies at most; beyond it a range is not kept in memory but
/// filled later (`Fs::fill_later`), so a slow disk never holds read memory and a file
/// read whole still ends up complete in the cache.
const WRITE_BEHIND_BYTES: usize = 64 << 20;

/// How long an open waits for a fill that has all its bytes to reach its final name.
const FINISH_WAIT: Duration = Duration::from_secs(5);

/// What a cache file was when cfs last verified it; if any field differs, the file may
/// have changed since.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    key: Id,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    fn of(key: Id, md: &std::fs::Metadata) -> Identity {
        Identity {
            key,
            dev: md.dev(),
            ino: md.ino(),
            size: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

/// A record is a few dozen bytes; anything longer is not one of ours.
const MAX_RECORD: u64 = 256;

struct CacheEntry {
    size: u64,
    /// The identity the file had when it was verified, if it was.
    verified: Option<Identity>,
}

struct CacheIndex {
    files: lru::LruCache<Id, CacheEntry>,
    /// Bytes of `files` plus the sizes reserved by fills in progress.
    bytes: u64,
    fills: HashMap<Id, Arc<Fill>>,
    next_tmp: u64,
}

impl CacheIndex {
    /// Take `fill` out of the fills in progress, if it is still the one there.
    fn detach(&mut self, fill: &Arc<Fill>) -> bool {
        let ours = self
            .fills
            .get(&fill.key)
            .is_some_and(|f| Arc::ptr_eq(f, fill));
        if ours {
            self.fills.remove(&fill.key);
        }
        ours
    }

    /// Mark `fill` abandoned and give back the bytes it reserved; the caller removes its
    /// temporary file once the lock is released.
    fn abandon(&mut self, fill: &Arc<Fill>) {
        fill.st.lock().unwrap().phase = FillPhase::Abandoned;
        if self.detach(fill) {
            self.bytes -= fill.size;
        }
    }
}

pub(super) struct FileCache {
    opts: FileCacheOpts,
    index: Mutex<CacheIndex>,
    finished: std::sync::Condvar,
    pub(super) write_budget: Arc<tokio::sync::Semaphore>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FillPhase {
    Filling,
    Finishing,
    Done,
    Abandoned,
}

struct FillState {
    /// Disjoint covered ranges, start -> end.
    covered: BTreeMap<u64, u64>,
    covered_bytes: u64,
    /// Writes announced (before their reply) and not yet done.
    pending: usize,
    /// Open handles feeding this fill.
    opens: usize,
    phase: FillPhase,
    /// When a handle last joined it (a tick of the index), for eviction order.
    used: u64,
}

impl FillState {
    fn cover(&mut self, mut s: u64, mut e: u64) {
        if let Some((&ps, &pe)) = self.covered.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
                self.covered.remove(&ps);
                self.covered_bytes -= pe - ps;
            }
        }
        while let Some((&ns, &ne)) = self.covered.range(s..).next() {
            if ns > e {
                break;
            }
            e = e.max(ne);
            self.covered.remove(&ns);
            self.covered_bytes -= ne - ns;
        }
        self.covered.insert(s, e);
        self.covered_bytes += e - s;
    }
}

impl Fill {
    /// Bytes [start, end) if this fill holds them all (written from verified reads).
    pub(super) fn read_covered(&self, start: u64, end: u64) -> Option<Vec<u8>> {
        let end = end.min(self.size);
        if start >= end {
            return None;
        }
        {
            let st = self.st.lock().unwrap();
            if st.phase != FillPhase::Filling {
                return None;
            }
            let (_, &e) = st.covered.range(..=start).next_back()?;
            if e < end {
                return None;
            }
        }
        read_range(&self.file, start, end).ok()
    }
}

/// Bytes [start, end) of a local file (one pread).
pub(super) fn read_range(f: &std::fs::File, start: u64, end: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; end.saturating_sub(start) as usize];
    f.read_exact_at(&mut buf, start)?;
    Ok(buf)
}

/// A cache file being written from verified reads.
pub(super) struct Fill {
    key: Id,
    size: u64,
    tmp: PathBuf,
    file: std::fs::File,
    st: Mutex<FillState>,
}

impl Drop for Fill {
    fn drop(&mut self) {
        if self
            .st
            .get_mut()
            .map(|s| s.phase != FillPhase::Done)
            .unwrap_or(true)
        {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

enum AfterWrite {
    Nothing,
    Finish,
    Abandon,
}

fn pid_alive(pid: i32) -> bool {
    // Signal 0 checks existence only; EPERM still means the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl FileCache {
    /// Open (creating) the cache directory and index what it holds, oldest first.
    /// Temporary files of dead processes are removed.
    pub(super) fn open(opts: FileCacheOpts) -> std::io::Result<FileCache> {
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&opts.dir)?;
        }
        // Cache files are trusted by their recorded identity: only their owner may be able
        // to write here.
        let md = std::fs::metadata(&opts.dir)?;
        if md.mode() & 0o022 != 0 || md.uid() != unsafe { libc::geteuid() } {
            return Err(std::io::Error::other(format!(
                "{} is writable by others or not ours: give the file cache a private directory",
                opts.dir.display()
            )));
        }
        let mut found = Vec::new();
        for e in std::fs::read_dir(&opts.dir)? {
            let e = e?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(rest) = name.strip_prefix(".tmp.") {
                let pid = rest.split('.').next().and_then(|p| p.parse::<i32>().ok());
                if pid.is_some_and(|p| !pid_alive(p)) {
                    let _ = std::fs::remove_file(e.path());
                }
                continue;
            }
            if let Some(hex) = name.strip_suffix(".ok") {
                if !opts.dir.join(hex).exists() {
                    let _ = std::fs::remove_file(e.path());
                }
                continue;
            }
            let Ok(key) = name.parse::<Id>() else {
                continue;
            };
            if name.len() != 40 {
                continue;
            }
            let Ok(md) = e.metadata() else { continue };
            if !md.is_file() {
                continue;
            }
            let verified = read_record(&opts.dir, key).filter(|r| *r == Identity::of(key, &md));
            found.push((md.modified().unwrap_or(UNIX_EPOCH), key, md.len(), verified));
        }
        found.sort_by_key(|f| (f.0, f.1));
        let mut ix = CacheIndex {
            files: lru::LruCache::unbounded(),
            bytes: 0,
            fills: HashMap::new(),
            next_tmp: 0,
        };
        for (_, key, size, verified) in found {
            ix.files.put(key, CacheEntry { size, verified });
            ix.bytes += size;
        }
        let write_budget = Arc::new(tokio::sync::Semaphore::new(opts.write_behind_bytes.max(1)));
        let fc = FileCache {
            opts,
            index: Mutex::new(ix),
            finished: std::sync::Condvar::new(),
            write_budget,
        };
        {
            let mut ix = fc.index.lock().unwrap();
            fc.evict_for(&mut ix, 0);
        }
        Ok(fc)
    }

    fn path(&self, key: Id) -> PathBuf {
        self.opts.dir.join(key.to_hex())
    }

    /// Record what the cache file of `key` (open as `file`) is now, after cfs verified
    /// exactly that file; returns it.
    fn record(&self, key: Id, file: &std::fs::File) -> Option<Identity> {
        let id = Identity::of(key, &file.metadata().ok()?);
        let bytes = postcard::to_allocvec(&id).ok()?;
        let tmp = self
            .opts
            .dir
            .join(format!(".tmp.{}.{}.ok", std::process::id(), key.to_hex()));
        let done = std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, record_path(&self.opts.dir, key)));
        if let Err(e) = done {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(key = %key, "file cache: recording a verified file: {e}");
        }
        Some(id)
    }

    fn remove_files(&self, key: Id) {
        let _ = std::fs::remove_file(record_path(&self.opts.dir, key));
        // An open backing file stays readable after the unlink.
        let _ = std::fs::remove_file(self.path(key));
    }

    /// Evict least recently used files, then partial fills no handle feeds (least
    /// recently used first), until `extra` more bytes fit; false if they cannot (the
    /// rest is reserved by fills in use).
    fn evict_for(&self, ix: &mut CacheIndex, extra: u64) -> bool {
        while ix.bytes + extra > self.opts.budget_bytes {
            if let Some((k, e)) = ix.files.pop_lru() {
                ix.bytes -= e.size;
                self.remove_files(k);
                tracing::debug!(key = %k, "evicted from the file cache");
                continue;
            }
            let idle = ix
                .fills
                .values()
                .filter_map(|f| {
                    let st = f.st.lock().unwrap();
                    (st.opens == 0 && st.pending == 0 && st.phase == FillPhase::Filling)
                        .then_some((st.used, f.clone()))
                })
                .min_by_key(|(used, _)| *used);
            let Some((_, f)) = idle else {
                return false;
            };
            ix.abandon(&f);
            let _ = std::fs::remove_file(&f.tmp);
            tracing::debug!(key = %f.key, "partial file evicted from the file cache");
        }
        true
    }

    /// The cache file of `key` if it is indexed and has the inode's size, with whether
    /// it is the very file cfs verified (its identity unchanged since).
    pub(super) fn lookup(&self, key: Id, size: u64) -> Option<(std::fs::File, bool)> {
        let verified = self.index.lock().unwrap().files.get(&key)?.verified.clone();
        let f = match std::fs::File::open(self.path(key)) {
            Ok(f) => f,
            Err(_) => {
                // Removed behind our back (another mount's eviction): forget it.
                self.forget(key, false);
                return None;
            }
        };
        let Ok(md) = f.metadata() else {
            return None;
        };
        if md.len() != size {
            tracing::warn!(key = %key, "cache file has the wrong size; discarded");
            self.forget(key, true);
            return None;
        }
        let trusted = verified.is_some_and(|v| v == Identity::of(key, &md));
        Some((f, trusted))
    }

    /// The file was re-hashed and matches: record it, so no process hashes it again
    /// while it stays unchanged.
    pub(super) fn mark_verified(&self, key: Id, file: &std::fs::File) {
        // Persist the recency for the next process's LRU order (before the record: it
        // changes the times).
        let _ = file.set_modified(SystemTime::now());
        let id = self.record(key, file);
        if let Some(e) = self.index.lock().unwrap().files.get_mut(&key) {
            e.verified = id;
        }
    }

    pub(super) fn forget(&self, key: Id, delete: bool) {
        let mut ix = self.index.lock().unwrap();
        if let Some(e) = ix.files.pop(&key) {
            ix.bytes -= e.size;
        }
        if delete {
            self.remove_files(key);
        }
    }

    /// If a fill of `key` has all its bytes and is being synced and renamed, wait
    /// (bounded) for it, so an open right after a full read finds the file.
    pub(super) fn wait_finishing(&self, key: Id) {
        let until = std::time::Instant::now() + FINISH_WAIT;
        let mut ix = self.index.lock().unwrap();
        loop {
            let finishing = ix
                .fills
                .get(&key)
                .is_some_and(|f| f.st.lock().unwrap().phase == FillPhase::Finishing);
            let left = until.saturating_duration_since(std::time::Instant::now());
            if !finishing || left.is_zero() {
                return;
            }
            ix = self.finished.wait_timeout(ix, left).unwrap().0;
        }
    }

    /// The fill a normal open of `key` feeds: joins one in progress or starts one
    /// (reserving `size` bytes of the budget). None if the file is not to be cached.
    pub(super) fn fill(&self, key: Id, size: u64) -> Option<Arc<Fill>> {
        if size < self.opts.min_file_bytes.max(1) || size > self.opts.budget_bytes {
            return None;
        }
        let mut ix = self.index.lock().unwrap();
        if ix.files.contains(&key) {
            return None;
        }
        if let Some(f) = ix.fills.get(&key).cloned() {
            let mut st = f.st.lock().unwrap();
            if st.phase != FillPhase::Filling {
                return None;
            }
            st.opens += 1;
            st.used = ix.next_tmp;
            drop(st);
            ix.next_tmp += 1;
            return Some(f);
        }
        if !self.evict_for(&mut ix, size) {
            return None;
        }
        ix.next_tmp += 1;
        let tmp = self.opts.dir.join(format!(
            ".tmp.{}.{}.{}",
            std::process::id(),
            ix.next_tmp,
            key.to_hex()
        ));
        // create_new: never through a link or into a file someone else made.
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|f| f.set_len(size).map(|_| f));
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("file cache: creating {}: {e}", tmp.display());
                let _ = std::fs::remove_file(&tmp);
                return None;
            }
        };
        let fill = Arc::new(Fill {
            key,
            size,
            tmp,
            file,
            st: Mutex::new(FillState {
                covered: BTreeMap::new(),
                covered_bytes: 0,
                pending: 0,
                opens: 1,
                phase: FillPhase::Filling,
                used: ix.next_tmp,
            }),
        });
        ix.bytes += size;
        ix.fills.insert(key, fill.clone());
        Some(fill)
    }

    /// The write-behind budget in bytes (a range larger than it waits for all of it).
    pub(super) fn write_behind_bytes(&self) -> usize {
        self.opts.write_behind_bytes.max(1)
    }

    /// An open handle feeding `fill` was released.
    /// A partial fill stays (the next open of the file joins it, and reads of ranges it
    /// covers are served from it) until it is complete or evicted for room.
    pub(super) fn release_fill(&self, fill: &Arc<Fill>) {
        let mut st = fill.st.lock().unwrap();
        st.opens = st.opens.saturating_sub(1);
    }

    /// Announce a write before its read is answered, so a release that follows the
    /// reply does not abandon a fill whose last bytes are still on their way.
    pub(super) fn begin_write(fill: &Fill) -> bool {
        let mut st = fill.st.lock().unwrap();
        if st.phase != FillPhase::Filling {
            return false;
        }
        st.pending += 1;
        true
    }

    /// Write verified bytes at `offset` (blocking), or record that they were skipped.
    pub(super) fn write(&self, fill: &Arc<Fill>, offset: u64, data: Option<&[u8]>) {
        use std::os::unix::fs::FileExt;
        let res = match data {
            // The file was created sparse: zeros need no write.
            Some(d) if d.iter().any(|&b| b != 0) => fill.file.write_all_at(d, offset).map(|_| true),
            Some(_) => Ok(true),
            None => Ok(false),
        };
        let next = {
            let mut st = fill.st.lock().unwrap();
            st.pending = st.pending.saturating_sub(1);
            if st.phase != FillPhase::Filling {
                AfterWrite::Nothing
            } else {
                match res {
                    Err(e) => {
                        tracing::warn!("file cache: writing {}: {e}", fill.tmp.display());
                        AfterWrite::Abandon
                    }
                    Ok(wrote) => {
                        if let (true, Some(d)) = (wrote, data) {
                            let end = (offset + d.len() as u64).min(fill.size);
                            if offset < end {
                                st.cover(offset, end);
                            }
                        }
                        if st.covered_bytes == fill.size {
                            st.phase = FillPhase::Finishing;
                            AfterWrite::Finish
                        } else {
                            AfterWrite::Nothing
                        }
                    }
                }
            }
        };
        match next {
            AfterWrite::Nothing => {}
            AfterWrite::Abandon => self.abandon(fill),
            AfterWrite::Finish => self.finish(fill),
        }
    }

    /// Every byte is written: sync, then rename to the final name.
    fn finish(&self, fill: &Arc<Fill>) {
        let done = fill
            .file
            .sync_data()
            .and_then(|_| std::fs::rename(&fill.tmp, self.path(fill.key)));
        if let Err(e) = done {
            tracing::warn!("file cache: finishing {}: {e}", fill.tmp.display());
            return self.abandon(fill);
        }
        let verified = self.record(fill.key, &fill.file);
        let mut ix = self.index.lock().unwrap();
        fill.st.lock().unwrap().phase = FillPhase::Done;
        ix.detach(fill);
        // Bytes were reserved when the fill started.
        ix.files.put(
            fill.key,
            CacheEntry {
                size: fill.size,
                verified,
            },
        );
        drop(ix);
        self.finished.notify_all();
        tracing::debug!(key = %fill.key, bytes = fill.size, "file cached for passthrough");
    }

    fn abandon(&self, fill: &Arc<Fill>) {
        self.index.lock().unwrap().abandon(fill);
        let _ = std::fs::remove_file(&fill.tmp);
        self.finished.notify_all();
    }
}

fn record_path(dir: &Path, key: Id) -> PathBuf {
    dir.join(format!("{}.ok", key.to_hex()))
}

fn read_record(dir: &Path, key: Id) -> Option<Identity> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(record_path(dir, key))
        .ok()?
        .take(MAX_RECORD)
        .read_to_end(&mut buf)
        .ok()?;
    postcard::from_bytes::<Identity>(&buf)
        .ok()
        .filter(|r| r.key == key)
}

/// Stack depth to ask the kernel for: backing files on overlayfs (containers) are
/// themselves stacked and need 2; 1 still lets an overlay be stacked on this mount.
pub(super) fn stack_depth_for(dir: &Path) -> u32 {
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 1;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0
        && st.f_type as i64 == OVERLAYFS_SUPER_MAGIC
    {
        2
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cfs-fc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn cache(d: &Path, budget: u64) -> FileCache {
        FileCache::open(FileCacheOpts {
            dir: d.to_path_buf(),
            budget_bytes: budget,
            min_file_bytes: 1,
            write_behind_bytes: WRITE_BEHIND_BYTES,
        })
        .unwrap()
    }

    /// Write `data` as the verified bytes of `key` in two ranges, out of order.
    fn fill_all(fc: &FileCache, key: Id, data: &[u8]) {
        let f = fc.fill(key, data.len() as u64).unwrap();
        let half = data.len() / 2;
        assert!(FileCache::begin_write(&f));
        fc.write(&f, half as u64, Some(&data[half..]));
        assert_eq!(f.st.lock().unwrap().phase, FillPhase::Filling);
        assert!(FileCache::begin_write(&f));
        fc.write(&f, 0, Some(&data[..half]));
        assert_eq!(f.st.lock().unwrap().phase, FillPhase::Done);
        fc.release_fill(&f);
    }

    #[test]
    fn ranges_merge() {
        let mut st = FillState {
            covered: BTreeMap::new(),
            covered_bytes: 0,
            pending: 0,
            opens: 1,
            phase: FillPhase::Filling,
            used: 0,
        };
        st.cover(10, 20);
        st.cover(30, 40);
        st.cover(15, 35);
        assert_eq!(st.covered.len(), 1);
        assert_eq!(st.covered_bytes, 30);
        st.cover(0, 10);
        assert_eq!(st.covered.into_iter().collect::<Vec<_>>(), vec![(0, 40)]);
    }

    #[test]
    fn a_partial_fill_is_kept_joined_and_evicted_only_for_room() {
        let d = dir("partial");
        let fc = cache(&d, 1500);
        let key = Id::hash(b"p");
        let f = fc.fill(key, 1000).unwrap();
        assert!(FileCache::begin_write(&f));
        fc.write(&f, 0, Some(&[1u8; 500]));
        fc.release_fill(&f);
        assert_eq!(f.st.lock().unwrap().phase, FillPhase::Filling, "kept");
        assert_eq!(f.read_covered(100, 400), Some(vec![1u8; 300]));
        assert_eq!(f.read_covered(400, 600), None, "not all of it is there");
        // The next open joins it and completes it.
        let g = fc.fill(key, 1000).unwrap();
        assert!(Arc::ptr_eq(&f, &g));
        fc.release_fill(&g);
        // Another file needs the room: the idle partial fill goes, temporary and all.
        let other = fc.fill(Id::hash(b"q"), 1000).unwrap();
        assert_eq!(f.st.lock().unwrap().phase, FillPhase::Abandoned);
        assert_eq!(fc.index.lock().unwrap().bytes, 1000);
        drop((f, g));
        fc.release_fill(&other);
        let tmps = std::fs::read_dir(&d).unwrap().count();
        assert_eq!(tmps, 1, "only the new fill's temporary is left");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_verified_file_is_trusted_by_later_processes_until_it_changes() {
        let d = dir("trust");
        let key = Id::hash(b"t");
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
        {
            let fc = cache(&d, 1 << 20);
            fill_all(&fc, key, &data);
            let (_, trusted) = fc.lookup(key, data.len() as u64).unwrap();
            assert!(trusted, "written from verified bytes here");
        }
        // A new process: trusted from the record, without reading the file.
        let fc = cache(&d, 1 << 20);
        let (f, trusted) = fc.lookup(key, data.len() as u64).unwrap();
        assert!(trusted);
        drop((f, fc));
        // Same size, mtime set back: the ctime still tells.
        let p = d.join(key.to_hex());
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        let mut bad = data.clone();
        bad[7] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let fc = cache(&d, 1 << 20);
        let (f, trusted) = fc.lookup(key, data.len() as u64).unwrap();
        assert!(!trusted, "an altered file must be hashed again");
        // Re-verified (as the mount does after hashing): trusted again, recorded anew.
        fc.mark_verified(key, &f);
        drop(fc);
        let fc = cache(&d, 1 << 20);
        assert!(fc.lookup(key, data.len() as u64).unwrap().1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn eviction_removes_the_file_and_its_record() {
        let d = dir("evict");
        let fc = cache(&d, 2500);
        let (a, b) = (Id::hash(b"a"), Id::hash(b"b"));
        fill_all(&fc, a, &[1u8; 1000]);
        fill_all(&fc, b, &[2u8; 1000]);
        assert!(d.join(format!("{}.ok", a.to_hex())).exists());
        // A third file needs room: the least recently used (a) goes, record and all.
        fill_all(&fc, Id::hash(b"c"), &[3u8; 1000]);
        assert!(!d.join(a.to_hex()).exists());
        assert!(!d.join(format!("{}.ok", a.to_hex())).exists());
        assert!(fc.lookup(b, 1000).is_some());
        let _ = std::fs::remove_dir_all(&d);
    }
}
