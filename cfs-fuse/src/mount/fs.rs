//! The filesystem itself, without FUSE: every operation of the mount on numbers and
//! handles, returning typed errors. `fuse.rs` only translates; tests call this directly
//! over an in-memory ring.

use super::errno::ToErrno;
use super::file_cache::{read_range, FileCache, Fill};
use super::handles::{FileRefs, Handles, Listing, Open, OpenFile};
use super::inodes::{InodeTable, ROOT_INO};
use super::MountOpts;
use cfs_core::block::Totals;
use cfs_core::fs::{EntryKind, Inode, InodeBody};
use cfs_core::Id;
use cfs_tree::reader::{FsError, MemoryHold, Piece, Reader};
use cfs_tree::service::BlockService;
use fuser::{BackingId, FileAttr, FileType, INodeNo};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};
use tokio::runtime::Handle;

/// Why an operation of the mount failed; each maps to one errno.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("inode {0} is not held (forgotten, or its path is gone in this version)")]
    Stale(u64),
    #[error("no entry {name:?} in directory {parent}")]
    NoEntry { parent: u64, name: String },
    #[error("inode {0} is not a directory")]
    NotDir(u64),
    #[error("inode {0} is a directory")]
    IsDir(u64),
    #[error("inode {0} is a symbolic link")]
    IsSymlink(u64),
    #[error("inode {0} is not a symbolic link")]
    NotSymlink(u64),
    #[error("file handle {0} is not open")]
    BadHandle(u64),
    #[error("the filesystem is read-only")]
    ReadOnly,
    #[error("no attribute {0}")]
    NoAttribute(String),
    #[error("new versions kept arriving during the operation; try again")]
    Busy,
    #[error("reading the tree")]
    Read(#[source] FsError),
}

impl From<FsError> for OpError {
    fn from(e: FsError) -> OpError {
        OpError::Read(e)
    }
}

impl OpError {
    pub fn errno(&self) -> i32 {
        match self {
            OpError::Stale(_) | OpError::NoEntry { .. } => libc::ENOENT,
            OpError::NotDir(_) => libc::ENOTDIR,
            OpError::IsDir(_) => libc::EISDIR,
            OpError::IsSymlink(_) => libc::ELOOP,
            OpError::NotSymlink(_) => libc::EINVAL,
            OpError::BadHandle(_) => libc::EBADF,
            OpError::ReadOnly => libc::EROFS,
            OpError::NoAttribute(_) => libc::ENODATA,
            OpError::Busy => libc::EAGAIN,
            OpError::Read(e) => e.errno(),
        }
    }
}

/// How an open was granted.
pub enum Opened {
    /// Reads come to us.
    Normal(u64),
    /// The kernel reads this verified cache file itself.
    Passthrough(u64, Arc<BackingId>),
}

/// Bytes of one read, and the cache fill they go to once the reply is sent; they count
/// against the reader's memory budget until then (or until written to the fill).
pub struct ReadOut<R> {
    pub data: Piece,
    fill: Option<Arc<Fill>>,
    /// The file read, while its bytes are to be written into `fill`.
    inode: Option<Arc<Inode>>,
    _hold: MemoryHold<R>,
}

pub struct Fs<R> {
    pub(super) reader: Reader<R>,
    pub(super) rt: Handle,
    pub(super) fsid: Id,
    pub(super) opts: MountOpts,
    pub(super) pinned: bool,
    uid: u32,
    gid: u32,
    pub(super) table: RwLock<InodeTable>,
    handles: Handles,
    pub(super) files: Option<FileCache>,
    /// The kernel granted passthrough and backing files can be registered.
    pub(super) passthrough: AtomicBool,
}

pub fn kind_of(k: EntryKind) -> FileType {
    match k {
        EntryKind::File => FileType::RegularFile,
        EntryKind::Dir => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
    }
}

impl<R: BlockService> Fs<R> {
    pub(super) fn new(
        reader: Reader<R>,
        rt: Handle,
        fsid: Id,
        root: cfs_core::block::RootBlock,
        opts: MountOpts,
        files: Option<FileCache>,
    ) -> Fs<R> {
        Fs {
            reader,
            rt,
            fsid,
            pinned: opts.version.is_some(),
            opts,
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            table: RwLock::new(InodeTable::new(root)),
            handles: Handles::default(),
            files,
            passthrough: AtomicBool::new(false),
        }
    }

    /// The runtime the blocking operations run their fetches on.
    pub fn rt(&self) -> &Handle {
        &self.rt
    }

    /// Bytes of the reader's memory budget in use (cached blocks, fetches, replies).
    pub fn memory_in_use(&self) -> usize {
        self.reader.memory_in_use()
    }

    pub fn version(&self) -> u64 {
        self.table.read().unwrap().root.version
    }

    /// Entries of the inode table (what the kernel holds, plus the root).
    pub fn held(&self) -> usize {
        self.table.read().unwrap().held()
    }

    pub fn attr(&self, ino: u64, i: &Inode) -> FileAttr {
        let mtime = if i.mtime_sec >= 0 {
            UNIX_EPOCH + Duration::new(i.mtime_sec as u64, i.mtime_nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(i.mtime_sec.unsigned_abs())
        };
        let blksize = match &i.body {
            InodeBody::File {
                data: cfs_core::fs::FileData::Tree { block_size, .. },
                ..
            } => *block_size,
            InodeBody::File {
                data: cfs_core::fs::FileData::Chunked { .. },
                ..
            } => cfs_core::fs::chunked::CHUNK_MAX,
            _ => 4096,
        };
        FileAttr {
            ino: INodeNo(ino),
            size: i.size(),
            blocks: i.stored_bytes().div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: kind_of(i.kind()),
            perm: (i.mode & 0o7777) as u16,
            nlink: i.nlink.max(1),
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize,
            flags: 0,
        }
    }

    /// How long the kernel may cache an answer: names and directory attributes change
    /// with versions (which invalidate them explicitly), a file's attributes never do.
    pub fn ttl(&self, is_dir: bool) -> Duration {
        if is_dir && !self.pinned {
            self.opts.ttl_mutable
        } else {
            self.opts.ttl_immutable
        }
    }

    /// The inode behind a number in the current version.
    fn inode_of(&self, ino: u64) -> Result<(Id, bool, Arc<Inode>), OpError> {
        let (key, is_dir) = self
            .table
            .read()
            .unwrap()
            .key_of(ino)
            .ok_or(OpError::Stale(ino))?;
        let i = self.rt.block_on(self.reader.inode(key))?;
        Ok((key, is_dir, i))
    }

    /// Look `name` up in `parent`; the kernel counts the returned number once.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<(u64, Arc<Inode>, bool), OpError> {
        // Retry if a new version is swapped in while we fetch, so that we never record
        // a key from an older tree.
        for _ in 0..4 {
            let (pkey, version) = {
                let t = self.table.read().unwrap();
                let (k, is_dir) = t.key_of(parent).ok_or(OpError::Stale(parent))?;
                if !is_dir {
                    return Err(OpError::NotDir(parent));
                }
                (k, t.root.version)
            };
            let found = self.rt.block_on(async {
                let dir = self.reader.inode(pkey).await?;
                let Some(e) = self.reader.lookup(&dir, name).await? else {
                    return Ok(None);
                };
                let child = self.reader.inode(e.key).await?;
                Ok::<_, FsError>(Some((e, child)))
            })?;
            let (e, child) = found.ok_or_else(|| OpError::NoEntry {
                parent,
                name: String::from_utf8_lossy(name).into_owned(),
            })?;
            let mut t = self.table.write().unwrap();
            if t.root.version != version {
                continue;
            }
            let ino = t.remember(parent, &e);
            return Ok((ino, child, e.kind == EntryKind::Dir));
        }
        Err(OpError::Busy)
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.table.write().unwrap().forget(ino, n);
    }

    /// Attributes of `ino`; an open file answers from the inode it opened.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<(FileAttr, Duration), OpError> {
        if let Some(f) = fh.and_then(|fh| self.handles.file(fh)) {
            return Ok((self.attr(ino, &f.inode), self.ttl(false)));
        }
        let (_, is_dir, i) = self.inode_of(ino)?;
        Ok((self.attr(ino, &i), self.ttl(is_dir)))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, OpError> {
        let (_, _, i) = self.inode_of(ino)?;
        match &i.body {
            InodeBody::Symlink { target } => Ok(target.to_vec()),
            _ => Err(OpError::NotSymlink(ino)),
        }
    }

    /// Open a directory: its listing is fetched now and pinned in the handle. Listed
    /// numbers are not counted lookups, so nothing is added to the table.
    pub fn opendir(&self, ino: u64) -> Result<u64, OpError> {
        for _ in 0..4 {
            let (key, version, parent) = {
                let t = self.table.read().unwrap();
                let (k, is_dir) = t.key_of(ino).ok_or(OpError::Stale(ino))?;
                if !is_dir {
                    return Err(OpError::NotDir(ino));
                }
                (k, t.root.version, t.parent_of(ino))
            };
            let entries = self.rt.block_on(async {
                let dir = self.reader.inode(key).await?;
                self.reader.list(&dir).await
            })?;
            let t = self.table.read().unwrap();
            if t.root.version != version {
                continue;
            }
            // What is listed is usually looked up next, one name at a time.
            let _guard = self.rt.enter();
            self.reader
                .prefetch_entries(entries.iter().map(|e| e.key).collect());
            let mut out = Vec::with_capacity(entries.len() + 2);
            out.push((ino, FileType::Directory, b".".to_vec()));
            out.push((parent, FileType::Directory, b"..".to_vec()));
            for e in &entries {
                out.push((t.peek(ino, e), kind_of(e.kind), e.name.to_vec()));
            }
            drop(t);
            return Ok(self.handles.add(Open::Dir(Arc::new(out))));
        }
        Err(OpError::Busy)
    }

    pub fn readdir(&self, fh: u64) -> Result<Listing, OpError> {
        self.handles.dir(fh).ok_or(OpError::BadHandle(fh))
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.remove(fh);
    }

    /// A verified cache file of `key`, if one exists. A file whose recorded identity does
    /// not match is re-hashed against the inode first.
    fn cache_file(&self, key: Id, inode: &Inode) -> Option<std::fs::File> {
        let fc = self.files.as_ref()?;
        fc.wait_finishing(key);
        let (f, verified) = fc.lookup(key, inode.size())?;
        if !verified {
            match self.rt.block_on(self.reader.verify_copy(inode, &f)) {
                Ok(true) => fc.mark_verified(key, &f),
                Ok(false) => {
                    tracing::warn!(key = %key, "cache file does not match its blocks; discarded");
                    fc.forget(key, true);
                    return None;
                }
                Err(e) => {
                    // Cannot check it now (e.g. the ring is down): do not serve it.
                    tracing::debug!(key = %key, "cache file not checked: {e}");
                    return None;
                }
            }
        }
        Some(f)
    }

    /// Open a file read-only: by passthrough from the file cache when possible (the
    /// kernel registers the backing file through `register`), else through cfs,
    /// feeding the file cache.
    pub fn open(
        &self,
        ino: u64,
        write: bool,
        register: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Result<Opened, OpError> {
        if write {
            return Err(OpError::ReadOnly);
        }
        let (key, _, inode) = self.inode_of(ino)?;
        match inode.kind() {
            EntryKind::File => {}
            EntryKind::Dir => return Err(OpError::IsDir(ino)),
            EntryKind::Symlink => return Err(OpError::IsSymlink(ino)),
        }
        let file = self.cache_file(key, &inode);
        let mut modes = self.handles.modes.lock().unwrap();
        let m = modes.entry(ino).or_default();
        // The kernel reads the cache file itself when it can, and no handle on this
        // number reads through us (it refuses to mix the two).
        if self.passthrough.load(Ordering::Relaxed) && m.normal == 0 {
            let backing = match (&m.backing, &file) {
                // One backing file per inode while any passthrough open lives.
                (Some(b), _) => Some(b.clone()),
                (None, Some(f)) => match register(f) {
                    Ok(b) => Some(Arc::new(b)),
                    Err(e) => {
                        if self.passthrough.swap(false, Ordering::SeqCst) {
                            tracing::warn!(
                                "FUSE passthrough unavailable ({e}); reading through cfs"
                            );
                        }
                        None
                    }
                },
                (None, None) => None,
            };
            if let Some(b) = backing {
                m.passthrough += 1;
                m.backing = Some(b.clone());
                drop(modes);
                let fh = self.handles.add(Open::File(OpenFile {
                    stream: Arc::new(self.reader.stream_for(&inode)),
                    inode,
                    ino,
                    fill: None,
                    backing: Some(b.clone()),
                    local: None,
                }));
                return Ok(Opened::Passthrough(fh, b));
            }
        }
        m.normal += 1;
        drop(modes);
        // Without passthrough, a complete cache file is read by us; else the reads feed
        // the cache.
        let (local, fill) = match file {
            Some(f) => (Some(Arc::new(f)), None),
            None => (
                None,
                self.files
                    .as_ref()
                    .and_then(|fc| fc.fill(key, inode.size())),
            ),
        };
        Ok(Opened::Normal(self.handles.add(Open::File(OpenFile {
            stream: Arc::new(self.reader.stream_for(&inode)),
            inode,
            ino,
            fill,
            backing: None,
            local,
        }))))
    }

    /// Bytes [offset, offset + size) of an open file. Call [`Fs::after_reply`] once they
    /// are handed to the kernel.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<ReadOut<R>, OpError> {
        let FileRefs {
            inode,
            stream,
            fill,
            local,
        } = self.handles.file(fh).ok_or(OpError::BadHandle(fh))?;
        let hold = self.reader.hold(size as usize);
        if let Some(f) = local {
            let end = offset.saturating_add(size as u64).min(inode.size());
            let data = read_range(&f, offset, end).map_err(|e| OpError::Read(FsError::Io(e)))?;
            return Ok(ReadOut {
                data: Piece::Owned(data),
                fill: None,
                inode: None,
                _hold: hold,
            });
        }
        // Ranges an earlier open of this file already wrote are read from local disk.
        if let Some(f) = &fill {
            let end = offset.saturating_add(size as u64);
            if let Some(data) = f.read_covered(offset, end) {
                return Ok(ReadOut {
                    data: Piece::Owned(data),
                    fill: None,
                    inode: None,
                    _hold: hold,
                });
            }
        }
        let data = self
            .reader
            .read_streamed(&inode, offset, size as u64, Some(stream.as_ref()))
            .await?;
        // Announced before the reply, so a release right after it keeps the fill.
        let fill = fill.filter(|f| FileCache::begin_write(f));
        Ok(ReadOut {
            data,
            inode: fill.is_some().then_some(inode),
            fill,
            _hold: hold,
        })
    }

    /// Write a read's verified bytes into its fill, off the reply path. When too many
    /// bytes already wait for the disk, the bytes are not kept: the range is filled later
    /// (`fill_later`), so a file read whole ends up complete in the cache whatever the
    /// disk is doing.
    pub fn after_reply(self: &Arc<Self>, out: ReadOut<R>, offset: u64) {
        let (Some(fc), Some(fill)) = (self.files.as_ref(), out.fill) else {
            return;
        };
        // Part of a block waits as its own bytes: the whole block would stay alive
        // beyond what the hold counts.
        let data = match out.data {
            Piece::Block(b, r) if r.len() < b.len() => Piece::Owned(b[r].to_vec()),
            d => d,
        };
        let hold = out._hold;
        let len = data.as_slice().len();
        let permit = u32::try_from(len.max(1))
            .ok()
            .and_then(|n| fc.write_budget.clone().try_acquire_many_owned(n).ok());
        match (permit, out.inode) {
            (Some(permit), _) => {
                let s = self.clone();
                self.rt.spawn_blocking(move || {
                    if let Some(fc) = &s.files {
                        fc.write(&fill, offset, Some(data.as_slice()));
                    }
                    drop((permit, hold));
                });
            }
            (None, Some(inode)) => {
                drop((data, hold));
                let s = self.clone();
                self.rt.spawn(s.fill_later(fill, inode, offset, len));
            }
            (None, None) => fc.write(&fill, offset, None),
        }
    }

    /// Write `len` bytes at `offset` of `inode` into its fill once the disk has room:
    /// read again then (from the block cache, else the ring), so a waiting range holds
    /// no memory, and at most the write-behind budget is read ahead of the disk.
    async fn fill_later(
        self: Arc<Self>,
        fill: Arc<Fill>,
        inode: Arc<Inode>,
        offset: u64,
        len: usize,
    ) {
        let Some(fc) = self.files.as_ref() else {
            return;
        };
        let want = len.clamp(1, fc.write_behind_bytes()) as u32;
        let Ok(permit) = fc.write_budget.clone().acquire_many_owned(want).await else {
            return fc.write(&fill, offset, None);
        };
        match self.reader.read(&inode, offset, len as u64).await {
            Ok(data) => {
                let s = self.clone();
                self.rt.spawn_blocking(move || {
                    if let Some(fc) = &s.files {
                        fc.write(&fill, offset, Some(&data));
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::debug!("file cache: refilling at {offset}: {e}");
                fc.write(&fill, offset, None);
            }
        }
    }

    pub fn release(&self, fh: u64) {
        if let Some(Open::File(f)) = self.handles.remove(fh) {
            self.handles.release_mode(&f);
            if let (Some(fc), Some(fill)) = (&self.files, &f.fill) {
                fc.release_fill(fill);
            }
        }
    }

    pub fn totals(&self) -> Totals {
        self.table.read().unwrap().root.totals
    }

    /// Readable by name, never listed: `cp -a` and `rsync -X` must not copy them.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, OpError> {
        match name {
            b"user.cfs.key" => match self.table.read().unwrap().key_of(ino) {
                Some((k, _)) => Ok(k.to_hex().into_bytes()),
                None => Err(OpError::Stale(ino)),
            },
            b"user.cfs.version" => Ok(self.version().to_string().into_bytes()),
            b"user.cfs.fsid" => Ok(self.fsid.to_hex().into_bytes()),
            _ => Err(OpError::NoAttribute(
                String::from_utf8_lossy(name).into_owned(),
            )),
        }
    }
}

/// The top directory's number, for callers outside the mount module.
pub const TOP: u64 = ROOT_INO;
