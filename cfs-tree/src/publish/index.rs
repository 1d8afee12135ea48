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
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Format of the index file; another number is ignored (a full rehash).
const FORMAT: u32 = 1;
/// A file whose mtime or ctime is this close to the publish's start is not recorded.
pub const RACY: Duration = Duration::from_secs(1);
/// Larger index files are not read (a full rehash instead).
const MAX_INDEX_BYTES: u64 = 1 << 30;

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

#[derive(Serialize, Deserialize)]
struct Stored {
    format: u32,
    fsid: Id,
    tree: Vec<u8>,
    block_size: u32,
    /// SHA-1 of the root block this index was written with.
    root: Id,
    files: Vec<(Vec<u8>, FileRecord)>,
    dirs: Vec<(Vec<u8>, DirRecord)>,
}

/// An index: records by path relative to the tree's top (bytes; "" is the top).
#[derive(Default)]
pub struct StatIndex {
    pub files: HashMap<Vec<u8>, FileRecord>,
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
        let bytes = match std::fs::File::open(path) {
            Ok(f) => {
                let len = f.metadata().map_err(IndexUnused::Io)?.len();
                if len > MAX_INDEX_BYTES {
                    return Err(IndexUnused::Corrupt);
                }
                std::fs::read(path).map_err(IndexUnused::Io)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(IndexUnused::Missing),
            Err(e) => return Err(IndexUnused::Io(e)),
        };
        if bytes.len() < 20 {
            return Err(IndexUnused::Corrupt);
        }
        let (body, sum) = bytes.split_at(bytes.len() - 20);
        if Id::hash(body).0[..] != sum[..] {
            return Err(IndexUnused::Corrupt);
        }
        let s: Stored = postcard::from_bytes(body).map_err(|_| IndexUnused::Corrupt)?;
        if s.format != FORMAT {
            return Err(IndexUnused::Corrupt);
        }
        if s.fsid != fsid || s.tree != tree_bytes(tree) || s.block_size != block_size {
            return Err(IndexUnused::Other);
        }
        if Some(s.root) != ring_root {
            return Err(IndexUnused::Stale);
        }
        Ok(StatIndex {
            files: s.files.into_iter().collect(),
            dirs: s.dirs.into_iter().collect(),
        })
    }

    /// The recorded inode of the file at `rel`, if its stat and link count match.
    pub fn file(&self, rel: &[u8], stat: &FileStat, nlink: u32) -> Option<&FileRecord> {
        self.files
            .get(rel)
            .filter(|r| r.stat == *stat && r.nlink == nlink)
    }
}

/// The records of the publish under way, written once its root has won.
pub struct IndexWriter {
    start: SystemTime,
    settle: Duration,
    files: Vec<(Vec<u8>, FileRecord)>,
    dirs: Vec<(Vec<u8>, DirRecord)>,
}

impl IndexWriter {
    pub fn new(start: SystemTime, settle: Duration) -> IndexWriter {
        IndexWriter {
            start,
            settle,
            files: Vec::new(),
            dirs: Vec::new(),
        }
    }

    /// Record a file, unless it changed too recently to be trusted next time.
    pub fn file(&mut self, rel: &[u8], r: FileRecord) {
        if r.stat.settled(self.start, self.settle) {
            self.files.push((rel.to_vec(), r));
        }
    }

    pub fn dir(&mut self, rel: &[u8], r: DirRecord) {
        self.dirs.push((rel.to_vec(), r));
    }

    /// Write the index (atomically: a crash leaves the old one or the new one).
    pub fn save(
        self,
        path: &Path,
        fsid: Id,
        tree: &Path,
        block_size: u32,
        root: Id,
    ) -> std::io::Result<()> {
        let s = Stored {
            format: FORMAT,
            fsid,
            tree: tree_bytes(tree),
            block_size,
            root,
            files: self.files,
            dirs: self.dirs,
        };
        let mut bytes = postcard::to_allocvec(&s)
            .map_err(|e| std::io::Error::other(format!("encoding the index: {e}")))?;
        let sum = Id::hash(&bytes);
        bytes.extend_from_slice(&sum.0);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let tmp = path.with_extension("idx.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

fn tree_bytes(tree: &Path) -> Vec<u8> {
    std::fs::canonicalize(tree)
        .unwrap_or_else(|_| tree.to_path_buf())
        .as_os_str()
        .as_bytes()
        .to_vec()
}
