//! The publisher's stat index: what the last publish of one tree with one key made of
//! each file and directory, so a re-publish skips reading a file whose stat matches
//! (restic's and borg's rule: device, inode, size, mtime and ctime) and reuses a
//! directory none of whose entries changed.
//!
//! Trust: the index is a hint about our own last publish, never about the ring. It is
//! used only when it names the root the ring holds now (so everything it points at is
//! part of the live version, confirmed when it was published), was written for the same
//! tree, key and block size, and its checksum holds; anything else means a full rehash,
//! never a wrong tree. A file is recorded only when its stat is older than the publish
//! (`RACY`): one written again within the same clock tick as our read would otherwise
//! keep its size and times and be skipped.

use cfs_core::Id;
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Format of the index file; another number is ignored (a full rehash).
const FORMAT: u32 = 2;
const MAGIC: &[u8; 4] = b"cfsI";
/// A file is recorded only when its stat is at least this old (default of
/// `PublishOpts::settle`).
pub const RACY: Duration = Duration::from_secs(1);
/// Larger index files are not read (a full rehash instead).
const MAX_INDEX_BYTES: u64 = 1 << 34;
/// Largest encoded header, record or trailer part read back.
const MAX_PART: u32 = 1 << 30;

/// What a file's stat says about its contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub mode: u32,
}

impl FileStat {
    pub fn of(m: &std::fs::Metadata) -> FileStat {
        FileStat {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            mode: m.mode(),
        }
    }

    /// Changed no later than `settle` before `start`: safe to record.
    fn settled(&self, start: SystemTime, settle: Duration) -> bool {
        let Ok(s) = start.duration_since(SystemTime::UNIX_EPOCH) else {
            return false;
        };
        let limit = s.saturating_sub(settle);
        let at = |(sec, nsec): (i64, i64)| {
            (sec >= 0 && (0..1_000_000_000).contains(&nsec))
                .then(|| Duration::new(sec as u64, nsec as u32))
        };
        at(self.mtime).is_some_and(|t| t < limit) && at(self.ctime).is_some_and(|t| t < limit)
    }
}

/// A file as the last publish made it: its inode block, and how many blocks (data and
/// indirect, the inode not counted) hang under it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileRecord {
    pub stat: FileStat,
    /// Links within the tree: part of the inode, so it must match too.
    pub nlink: u32,
    pub inode: Id,
    pub blocks: u64,
}

/// A directory as the last publish made it: its inode and its pages.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DirRecord {
    pub inode: Id,
    pub pages: u64,
}

// The file: MAGIC, then length-prefixed (u32 LE) parts: the header, one part per file in
// walk order, an empty part, the trailer; then the trailer's length (u32 LE) and the
// SHA-1 of everything before it. Files stream in and out in walk order (the walk visits
// names sorted, so a file's place is the component-wise order of its path), so neither
// publish holds every file's record; the trailer, read first, holds the root and the
// directories (few beside the files).

#[derive(Serialize, Deserialize)]
struct Header {
    format: u32,
    fsid: Id,
    tree: Vec<u8>,
    block_size: u32,
}

#[derive(Serialize, Deserialize)]
struct Trailer {
    /// SHA-1 of the root block this index was written with.
    root: Id,
    /// When every block the index names last had its lease renewed (unix seconds): the
    /// start of the last publish that read every file, carried over by those that
    /// reused records.
    renewed_at: u64,
    dirs: Vec<(Vec<u8>, DirRecord)>,
}

/// How long after a full renewal an index is trusted: a re-publish that reuses blocks
/// does not renew their leases, so before the shortest lease a node grants by default
/// (an hour) could run out, a publish reads everything again and renews them all.
pub const TRUST_FOR: Duration = Duration::from_secs(30 * 60);

#[derive(Serialize, Deserialize)]
struct Entry {
    path: Vec<u8>,
    rec: FileRecord,
}

/// The last publish's index, read as the walk goes: file records in walk order, the
/// directories in memory.
#[derive(Default)]
pub struct StatIndex {
    /// When what it names was last renewed (None: no index).
    pub renewed_at: Option<u64>,
    files: Option<std::io::BufReader<std::fs::File>>,
    /// The next file record, read ahead.
    next: Option<Entry>,
    pub dirs: HashMap<Vec<u8>, DirRecord>,
}

/// Where the index of `tree` published with `fsid` lives under `state_dir`.
pub fn index_path(state_dir: &Path, fsid: Id, tree: &Path) -> PathBuf {
    let tree = std::fs::canonicalize(tree).unwrap_or_else(|_| tree.to_path_buf());
    let h = Id::hash(tree.as_os_str().as_bytes());
    state_dir
        .join("publish")
        .join(format!("{}-{}.idx", fsid, &h.to_string()[..16]))
}

/// Why an index was not used.
#[derive(Debug, thiserror::Error)]
pub enum IndexUnused {
    #[error("no index yet")]
    Missing,
    #[error("reading it failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("it is damaged (checksum or format)")]
    Corrupt,
    #[error("it was written for another tree, key or block size")]
    Other,
    #[error("it describes a version the ring no longer has as its newest")]
    Stale,
    #[error("the leases of what it reuses were last renewed too long ago")]
    Old,
}

fn read_part<T: serde::de::DeserializeOwned>(r: &mut impl Read) -> Option<Option<T>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).ok()?;
    let len = u32::from_le_bytes(len);
    if len == 0 {
        return Some(None);
    }
    if len > MAX_PART {
        return None;
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).ok()?;
    postcard::from_bytes(&buf).ok().map(Some)
}

/// Component-wise order of relative paths: the order the walk visits them in.
fn walk_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.split(|c| *c == b'/').cmp(b.split(|c| *c == b'/'))
}

impl StatIndex {
    /// The index at `path`, if it is whole, is about this `fsid`, `tree` and
    /// `block_size`, and was written with the root the ring holds now (`ring_root`: the
    /// SHA-1 of its bytes).
    pub fn load(
        path: &Path,
        fsid: Id,
        tree: &Path,
        block_size: u32,
        ring_root: Option<Id>,
    ) -> Result<StatIndex, IndexUnused> {
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(IndexUnused::Missing),
            Err(e) => return Err(IndexUnused::Io(e)),
        };
        // One open file for the check and the reads: an index renamed over it meanwhile
        // is not mixed in.
        let len = f.metadata().map_err(IndexUnused::Io)?.len();
        if !(4 + 4 + 4 + 20..=MAX_INDEX_BYTES).contains(&len) {
            return Err(IndexUnused::Corrupt);
        }
        let mut h = Sha1::new();
        let mut body = std::io::BufReader::new((&mut f).take(len - 20));
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = body.read(&mut buf).map_err(IndexUnused::Io)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let mut sum = [0u8; 20];
        f.read_exact(&mut sum).map_err(IndexUnused::Io)?;
        if h.finalize()[..] != sum[..] {
            return Err(IndexUnused::Corrupt);
        }
        let mut tlen = [0u8; 4];
        f.seek(SeekFrom::Start(len - 24)).map_err(IndexUnused::Io)?;
        f.read_exact(&mut tlen).map_err(IndexUnused::Io)?;
        let tlen = u32::from_le_bytes(tlen) as u64;
        if tlen + 24 + 12 > len {
            return Err(IndexUnused::Corrupt);
        }
        f.seek(SeekFrom::Start(len - 24 - tlen - 4))
            .map_err(IndexUnused::Io)?;
        let trailer: Trailer = read_part(&mut f).flatten().ok_or(IndexUnused::Corrupt)?;
        f.seek(SeekFrom::Start(0)).map_err(IndexUnused::Io)?;
        let mut r = std::io::BufReader::new(f);
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic).map_err(IndexUnused::Io)?;
        let header: Header = read_part(&mut r).flatten().ok_or(IndexUnused::Corrupt)?;
        if magic != *MAGIC || header.format != FORMAT {
            return Err(IndexUnused::Corrupt);
        }
        if header.fsid != fsid || header.tree != tree_bytes(tree) || header.block_size != block_size
        {
            return Err(IndexUnused::Other);
        }
        if Some(trailer.root) != ring_root {
            return Err(IndexUnused::Stale);
        }
        let age = unix_now().saturating_sub(trailer.renewed_at);
        if age > TRUST_FOR.as_secs() {
            return Err(IndexUnused::Old);
        }
        let mut i = StatIndex {
            renewed_at: Some(trailer.renewed_at),
            files: Some(r),
            next: None,
            dirs: trailer.dirs.into_iter().collect(),
        };
        i.advance();
        Ok(i)
    }

    fn advance(&mut self) {
        self.next = self.files.as_mut().and_then(|r| read_part(r).flatten());
        if self.next.is_none() {
            self.files = None;
        }
    }

    /// The recorded inode of the file at `rel`, if its stat and link count match.
    /// Asked in walk order: records of paths before `rel` are passed over for good.
    pub fn file(&mut self, rel: &[u8], stat: &FileStat, nlink: u32) -> Option<FileRecord> {
        loop {
            let e = self.next.as_ref()?;
            match walk_order(&e.path, rel) {
                std::cmp::Ordering::Less => self.advance(),
                std::cmp::Ordering::Greater => return None,
                std::cmp::Ordering::Equal => {
                    let hit = (e.rec.stat == *stat && e.rec.nlink == nlink).then(|| e.rec.clone());
                    self.advance();
                    return hit;
                }
            }
        }
    }
}

/// The records of the publish under way, written as the walk goes to a file of its own,
/// and put in the index's place once its root has won.
pub struct IndexWriter {
    start: SystemTime,
    settle: Duration,
    /// The file being written and its SHA-1 so far; None without an index (or after an
    /// error writing it: that publish then leaves no index).
    out: Option<(std::io::BufWriter<std::fs::File>, Sha1)>,
    tmp: PathBuf,
    /// The temporary file exists and was not renamed into place.
    created: bool,
    dirs: Vec<(Vec<u8>, DirRecord)>,
}

impl IndexWriter {
    /// Records for `path` (None: keep no index), for `fsid`, `tree` and `block_size`.
    pub fn new(
        path: Option<&Path>,
        start: SystemTime,
        settle: Duration,
        fsid: Id,
        tree: &Path,
        block_size: u32,
    ) -> IndexWriter {
        let tmp = path
            .map(|p| p.with_extension(format!("idx.{}.tmp", std::process::id())))
            .unwrap_or_default();
        let mut w = IndexWriter {
            start,
            settle,
            out: None,
            tmp,
            created: false,
            dirs: Vec::new(),
        };
        if path.is_some() {
            let opened = w
                .tmp
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|_| std::fs::File::create(&w.tmp));
            match opened {
                Ok(f) => {
                    w.out = Some((std::io::BufWriter::new(f), Sha1::new()));
                    w.created = true;
                }
                Err(e) => tracing::warn!(
                    "cannot write the publish index {}: {e}; the next publish reads every file",
                    w.tmp.display()
                ),
            }
            w.put(MAGIC);
            w.part(&Header {
                format: FORMAT,
                fsid,
                tree: tree_bytes(tree),
                block_size,
            });
        }
        w
    }

    fn put(&mut self, bytes: &[u8]) {
        if let Some((f, h)) = &mut self.out {
            h.update(bytes);
            if let Err(e) = f.write_all(bytes) {
                tracing::warn!("writing the publish index {}: {e}", self.tmp.display());
                self.out = None;
            }
        }
    }

    fn part<T: Serialize>(&mut self, v: &T) {
        if self.out.is_none() {
            return;
        }
        let bytes = postcard::to_allocvec(v).expect("encoding to memory");
        self.put(&(bytes.len() as u32).to_le_bytes());
        self.put(&bytes);
    }

    /// Record a file, unless it changed too recently to be trusted next time.
    pub fn file(&mut self, rel: &[u8], r: FileRecord) {
        if r.stat.settled(self.start, self.settle) {
            self.part(&Entry {
                path: rel.to_vec(),
                rec: r,
            });
        }
    }

    pub fn dir(&mut self, rel: &[u8], r: DirRecord) {
        if self.out.is_some() {
            self.dirs.push((rel.to_vec(), r));
        }
    }

    /// Finish the index for `root` and put it at `path` (atomically: a crash leaves the
    /// old one or the new one). `renewed_at`: when what it names was last renewed.
    pub fn save(&mut self, path: &Path, root: Id, renewed_at: u64) -> std::io::Result<()> {
        self.put(&0u32.to_le_bytes());
        let dirs = std::mem::take(&mut self.dirs);
        let trailer = postcard::to_allocvec(&Trailer {
            root,
            renewed_at,
            dirs,
        })
        .expect("encoding to memory");
        self.put(&(trailer.len() as u32).to_le_bytes());
        self.put(&trailer);
        self.put(&(trailer.len() as u32).to_le_bytes());
        let Some((mut f, h)) = self.out.take() else {
            return Err(std::io::Error::other("the index was not written whole"));
        };
        f.write_all(&h.finalize())?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&self.tmp, path)?;
        self.created = false;
        Ok(())
    }
}

impl Drop for IndexWriter {
    fn drop(&mut self) {
        // Not saved (the publish failed, or writing it did): no file left behind.
        if self.created {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Seconds since the epoch (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
}

fn tree_bytes(tree: &Path) -> Vec<u8> {
    std::fs::canonicalize(tree)
        .unwrap_or_else(|_| tree.to_path_buf())
        .as_os_str()
        .as_bytes()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index is trusted only within TRUST_FOR of the last full renewal of the leases
    /// of what it names (a publish that reuses blocks does not renew them), and only for
    /// the root it was written with.
    #[test]
    fn an_index_is_not_trusted_past_its_renewal_window_or_for_another_root() {
        let dir = std::env::temp_dir().join(format!("cfs-index-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.idx");
        let (fsid, root) = (Id::hash(b"fsid"), Id::hash(b"root"));
        let write = |renewed_at: u64| {
            let mut w = IndexWriter::new(Some(&path), SystemTime::now(), RACY, fsid, &dir, 0);
            w.save(&path, root, renewed_at).unwrap();
        };
        write(unix_now() - 60);
        assert!(StatIndex::load(&path, fsid, &dir, 0, Some(root)).is_ok());
        assert!(matches!(
            StatIndex::load(&path, fsid, &dir, 0, Some(Id::hash(b"other"))),
            Err(IndexUnused::Stale)
        ));
        write(unix_now() - TRUST_FOR.as_secs() - 60);
        assert!(matches!(
            StatIndex::load(&path, fsid, &dir, 0, Some(root)),
            Err(IndexUnused::Old)
        ));
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn paths_are_ordered_as_the_walk_visits_them() {
        let mut v: Vec<&[u8]> = vec![b"a/c", b"a/b/z", b"a.txt", b"a/b", b"ab", b"a/bb/c", b"a"];
        v.sort_by(|a, b| walk_order(a, b));
        let want: Vec<&[u8]> = vec![b"a", b"a/b", b"a/b/z", b"a/bb/c", b"a/c", b"a.txt", b"ab"];
        assert_eq!(v, want);
    }
}
