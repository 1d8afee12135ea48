//! The on-disk file cache served by FUSE passthrough.
//!
//! Blocks are immutable and verified, so a file whose bytes all came through the verified
//! read path can be written once to a local file named by its inode key and handed to the
//! kernel (`BackingId`), which then reads it directly at its own speed. The bytes of each
//! normal read are written behind the reply into a sparse temporary file; when every byte
//! is covered the file is synced and renamed to its final name, so a crash never leaves a
//! partial file under that name. A file found on disk at start is not trusted until it
//! has been re-hashed block by block against the inode (`Reader::verify_copy`).

use cfs_core::Id;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::ffi::OsStrExt;
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
        }
    }
}

/// Bytes written behind replies at most; beyond it a range is skipped (that fill then
/// completes only if the range is read again), so a slow disk never holds read memory.
const WRITE_BEHIND_BYTES: usize = 64 << 20;

/// How long an open waits for a fill that has all its bytes to reach its final name.
const FINISH_WAIT: Duration = Duration::from_secs(5);

struct CacheEntry {
    size: u64,
    /// Checked against the inode in this process (written here, or re-hashed).
    verified: bool,
}

struct CacheIndex {
    files: lru::LruCache<Id, CacheEntry>,
    /// Bytes of `files` plus the sizes reserved by fills in progress.
    bytes: u64,
    fills: HashMap<Id, Arc<Fill>>,
    next_tmp: u64,
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
        std::fs::create_dir_all(&opts.dir)?;
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
            found.push((md.modified().unwrap_or(UNIX_EPOCH), key, md.len()));
        }
        found.sort();
        let mut ix = CacheIndex {
            files: lru::LruCache::unbounded(),
            bytes: 0,
            fills: HashMap::new(),
            next_tmp: 0,
        };
        for (_, key, size) in found {
            ix.files.put(
                key,
                CacheEntry {
                    size,
                    verified: false,
                },
            );
            ix.bytes += size;
        }
        let fc = FileCache {
            opts,
            index: Mutex::new(ix),
            finished: std::sync::Condvar::new(),
            write_budget: Arc::new(tokio::sync::Semaphore::new(WRITE_BEHIND_BYTES)),
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

    /// Evict least recently used files until `extra` more bytes fit; false if they
    /// cannot (the rest is reserved by fills in progress).
    fn evict_for(&self, ix: &mut CacheIndex, extra: u64) -> bool {
        while ix.bytes + extra > self.opts.budget_bytes {
            match ix.files.pop_lru() {
                Some((k, e)) => {
                    ix.bytes -= e.size;
                    // An open backing file stays readable after the unlink.
                    let _ = std::fs::remove_file(self.path(k));
                    tracing::debug!(key = %k, "evicted from the file cache");
                }
                None => return false,
            }
        }
        true
    }

    /// The cache file of `key` if it is indexed and has the inode's size, with whether
    /// it was verified in this process.
    pub(super) fn lookup(&self, key: Id, size: u64) -> Option<(std::fs::File, bool)> {
        let verified = self.index.lock().unwrap().files.get(&key)?.verified;
        let f = match std::fs::File::open(self.path(key)) {
            Ok(f) => f,
            Err(_) => {
                // Removed behind our back (another mount's eviction): forget it.
                self.forget(key, false);
                return None;
            }
        };
        if f.metadata().map(|m| m.len()).ok() != Some(size) {
            tracing::warn!(key = %key, "cache file has the wrong size; discarded");
            self.forget(key, true);
            return None;
        }
        Some((f, verified))
    }

    pub(super) fn mark_verified(&self, key: Id) {
        if let Some(e) = self.index.lock().unwrap().files.get_mut(&key) {
            e.verified = true;
        }
        // Persist the recency for the next process's LRU order.
        if let Ok(f) = std::fs::File::options().write(true).open(self.path(key)) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    pub(super) fn forget(&self, key: Id, delete: bool) {
        let mut ix = self.index.lock().unwrap();
        if let Some(e) = ix.files.pop(&key) {
            ix.bytes -= e.size;
        }
        if delete {
            let _ = std::fs::remove_file(self.path(key));
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
        if let Some(f) = ix.fills.get(&key) {
            let mut st = f.st.lock().unwrap();
            if st.phase != FillPhase::Filling {
                return None;
            }
            st.opens += 1;
            return Some(f.clone());
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
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
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
            }),
        });
        ix.bytes += size;
        ix.fills.insert(key, fill.clone());
        Some(fill)
    }

    /// An open handle feeding `fill` was released.
    pub(super) fn release_fill(&self, fill: &Arc<Fill>) {
        let abandon = {
            let mut st = fill.st.lock().unwrap();
            st.opens = st.opens.saturating_sub(1);
            st.opens == 0 && st.pending == 0 && st.phase == FillPhase::Filling
        };
        if abandon {
            // Not read in full while open: partial files are not kept.
            self.abandon(fill);
        }
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
                        } else if st.opens == 0 && st.pending == 0 {
                            AfterWrite::Abandon
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
        let mut ix = self.index.lock().unwrap();
        fill.st.lock().unwrap().phase = FillPhase::Done;
        if ix
            .fills
            .get(&fill.key)
            .is_some_and(|f| Arc::ptr_eq(f, fill))
        {
            ix.fills.remove(&fill.key);
        }
        // Bytes were reserved when the fill started.
        ix.files.put(
            fill.key,
            CacheEntry {
                size: fill.size,
                verified: true,
            },
        );
        drop(ix);
        self.finished.notify_all();
        tracing::debug!(key = %fill.key, bytes = fill.size, "file cached for passthrough");
    }

    fn abandon(&self, fill: &Arc<Fill>) {
        let mut ix = self.index.lock().unwrap();
        fill.st.lock().unwrap().phase = FillPhase::Abandoned;
        if ix
            .fills
            .get(&fill.key)
            .is_some_and(|f| Arc::ptr_eq(f, fill))
        {
            ix.fills.remove(&fill.key);
            ix.bytes -= fill.size;
        }
        drop(ix);
        let _ = std::fs::remove_file(&fill.tmp);
        self.finished.notify_all();
    }
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
