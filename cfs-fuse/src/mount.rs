//! The read-only FUSE mount of a published tree.
//!
//! Inode numbers: a directory keeps its number across versions (one per path, as
//! (parent number, name)); a file or symlink has one number per inode key, so a new
//! content key means a new number and the kernel's page cache never mixes versions, and
//! hard links (one inode) share a number. A poller thread watches the root; on a new
//! version it re-resolves every directory the kernel knows, swaps the keys, and then
//! tells the kernel which names changed (`inval_entry`) and which directories
//! (`inval_inode`), outside any request. Open files hold their inode, so they keep
//! reading the version they opened.
//!
//! Lookups and attributes block a fuser worker thread on the tokio runtime; reads are
//! answered from a spawned task so many run in parallel. Every block fetch has a
//! deadline, after which the request fails with EIO.

use crate::fsread::{FsError, Reader, ReaderOpts};
use crate::ring::BlockService;
use cfs_core::block::RootBlock;
use cfs_core::fs::{DirEntry, EntryKind, Inode, InodeBody};
use cfs_core::Id;
use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, MountOption, Notifier, OpenFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;

/// Options of a mount.
#[derive(Clone, Debug)]
pub struct MountOpts {
    /// Mount this old version (followed through the chain of previous roots) instead of
    /// the current one; a pinned mount does not poll.
    pub version: Option<u64>,
    /// How often to ask for a new root.
    pub poll_interval: Duration,
    pub reader: ReaderOpts,
    /// fuser worker threads.
    pub threads: usize,
    /// Let other users read the mount (needs `user_allow_other` in /etc/fuse.conf).
    pub allow_other: bool,
    /// Kernel cache time for things that never change (a file's attributes).
    pub ttl_immutable: Duration,
    /// Kernel cache time for names and directory attributes, which a new version
    /// invalidates explicitly; the TTL only bounds staleness if a notification is lost.
    pub ttl_mutable: Duration,
}

impl Default for MountOpts {
    fn default() -> Self {
        MountOpts {
            version: None,
            poll_interval: Duration::from_secs(2),
            reader: ReaderOpts {
                deadline: Duration::from_secs(20),
                ..ReaderOpts::default()
            },
            threads: 4,
            allow_other: false,
            ttl_immutable: Duration::from_secs(3600),
            ttl_mutable: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("mounting at {path}: {source}{hint}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

const ROOT_INO: u64 = 1;

enum Node {
    /// A directory, numbered by path; `key` is its inode key in the current version,
    /// None if the path no longer is a directory.
    Dir {
        parent: u64,
        name: Vec<u8>,
        key: Option<Id>,
    },
    /// A file or symlink: immutable.
    Leaf { key: Id },
}

struct State {
    root: RootBlock,
    nodes: HashMap<u64, Node>,
    dir_inos: HashMap<(u64, Vec<u8>), u64>,
    leaf_inos: HashMap<Id, u64>,
    next_ino: u64,
}

impl State {
    /// The number for `entry` in directory `parent`, allocated on first sight. For a
    /// directory also records its key in the current version.
    fn ino_for(&mut self, parent: u64, e: &DirEntry) -> u64 {
        match e.kind {
            EntryKind::Dir => {
                let k = (parent, e.name.to_vec());
                let ino = match self.dir_inos.get(&k) {
                    Some(i) => *i,
                    None => {
                        let i = self.next_ino;
                        self.next_ino += 1;
                        self.dir_inos.insert(k, i);
                        i
                    }
                };
                self.nodes.insert(
                    ino,
                    Node::Dir {
                        parent,
                        name: e.name.to_vec(),
                        key: Some(e.key),
                    },
                );
                ino
            }
            _ => {
                if let Some(i) = self.leaf_inos.get(&e.key) {
                    return *i;
                }
                let i = self.next_ino;
                self.next_ino += 1;
                self.leaf_inos.insert(e.key, i);
                self.nodes.insert(i, Node::Leaf { key: e.key });
                i
            }
        }
    }

    fn key_of(&self, ino: u64) -> Option<(Id, bool)> {
        match self.nodes.get(&ino)? {
            Node::Dir { key, .. } => key.map(|k| (k, true)),
            Node::Leaf { key } => Some((*key, false)),
        }
    }
}

enum Open {
    File(Arc<Inode>),
    Dir(Arc<Vec<(u64, FileType, Vec<u8>)>>),
}

struct Shared<R> {
    reader: Reader<R>,
    rt: Handle,
    fsid: Id,
    opts: MountOpts,
    pinned: bool,
    uid: u32,
    gid: u32,
    state: RwLock<State>,
    open: Mutex<HashMap<u64, Open>>,
    next_fh: AtomicU64,
}

struct CfsFs<R> {
    s: Arc<Shared<R>>,
}

fn kind_of(k: EntryKind) -> FileType {
    match k {
        EntryKind::File => FileType::RegularFile,
        EntryKind::Dir => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

impl<R: BlockService> Shared<R> {
    fn attr(&self, ino: u64, i: &Inode) -> FileAttr {
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

    fn ttl(&self, is_dir: bool) -> Duration {
        if is_dir && !self.pinned {
            self.opts.ttl_mutable
        } else {
            self.opts.ttl_immutable
        }
    }

    /// The inode behind a number in the current version.
    fn inode_of(&self, ino: u64) -> Result<(Id, bool, Arc<Inode>), Errno> {
        let (key, is_dir) = self
            .state
            .read()
            .unwrap()
            .key_of(ino)
            .ok_or(Errno::ENOENT)?;
        let i = self
            .rt
            .block_on(self.reader.inode(key))
            .map_err(|e| errno(&e))?;
        Ok((key, is_dir, i))
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<(u64, Arc<Inode>, bool), Errno> {
        // Retry if a new version is swapped in while we fetch, so that we never record
        // a key from an older tree.
        for _ in 0..4 {
            let (pkey, version) = {
                let st = self.state.read().unwrap();
                let (k, is_dir) = st.key_of(parent).ok_or(Errno::ENOENT)?;
                if !is_dir {
                    return Err(Errno::ENOTDIR);
                }
                (k, st.root.version)
            };
            let (e, child) = self
                .rt
                .block_on(async {
                    let dir = self.reader.inode(pkey).await?;
                    let Some(e) = self.reader.lookup(&dir, name).await? else {
                        return Ok(None);
                    };
                    let child = self.reader.inode(e.key).await?;
                    Ok::<_, FsError>(Some((e, child)))
                })
                .map_err(|e| errno(&e))?
                .ok_or(Errno::ENOENT)?;
            let mut st = self.state.write().unwrap();
            if st.root.version != version {
                continue;
            }
            let ino = st.ino_for(parent, &e);
            return Ok((ino, child, e.kind == EntryKind::Dir));
        }
        Err(Errno::EIO)
    }

    fn listing(&self, ino: u64) -> Result<Vec<(u64, FileType, Vec<u8>)>, Errno> {
        for _ in 0..4 {
            let (key, version, parent) = {
                let st = self.state.read().unwrap();
                let (k, is_dir) = st.key_of(ino).ok_or(Errno::ENOENT)?;
                if !is_dir {
                    return Err(Errno::ENOTDIR);
                }
                let parent = match st.nodes.get(&ino) {
                    Some(Node::Dir { parent, .. }) => *parent,
                    _ => ROOT_INO,
                };
                (k, st.root.version, parent)
            };
            let entries = self
                .rt
                .block_on(async {
                    let dir = self.reader.inode(key).await?;
                    self.reader.list(&dir).await
                })
                .map_err(|e| errno(&e))?;
            let mut st = self.state.write().unwrap();
            if st.root.version != version {
                continue;
            }
            let mut out = Vec::with_capacity(entries.len() + 2);
            out.push((ino, FileType::Directory, b".".to_vec()));
            out.push((parent, FileType::Directory, b"..".to_vec()));
            for e in &entries {
                out.push((st.ino_for(ino, e), kind_of(e.kind), e.name.to_vec()));
            }
            return Ok(out);
        }
        Err(Errno::EIO)
    }

    fn add_open(&self, o: Open) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.open.lock().unwrap().insert(fh, o);
        FileHandle(fh)
    }
}

impl<R: BlockService> Filesystem for CfsFs<R> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large kernel read-ahead feeds our own prefetch window.
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.s.lookup(parent.0, name.as_bytes()) {
            Ok((ino, inode, is_dir)) => {
                // Names can change with a version; a file's attributes never do.
                let attr = self.s.attr(ino, &inode);
                reply.entry_with_ttls(&self.s.ttl(is_dir), &self.s.ttl(true), &attr, Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // An open file answers from the inode it opened.
        if let Some(fh) = fh {
            if let Some(Open::File(i)) = self.s.open.lock().unwrap().get(&fh.0) {
                let i = i.clone();
                return reply.attr(&self.s.ttl(false), &self.s.attr(ino.0, &i));
            }
        }
        match self.s.inode_of(ino.0) {
            Ok((_, is_dir, i)) => reply.attr(&self.s.ttl(is_dir), &self.s.attr(ino.0, &i)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.s.inode_of(ino.0) {
            Ok((_, _, i)) => match &i.body {
                InodeBody::Symlink { target } => reply.data(target),
                _ => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        match self.s.inode_of(ino.0) {
            Ok((_, _, i)) => match i.kind() {
                EntryKind::File => {
                    let fh = self.s.add_open(Open::File(i));
                    // The number changes with the content, so cached pages stay valid.
                    reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE)
                }
                EntryKind::Dir => reply.error(Errno::EISDIR),
                EntryKind::Symlink => reply.error(Errno::ELOOP),
            },
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let inode = match self.s.open.lock().unwrap().get(&fh.0) {
            Some(Open::File(i)) => i.clone(),
            _ => return reply.error(Errno::EBADF),
        };
        let reader = self.s.reader.clone();
        // Reply from a task: reads of many files and offsets proceed in parallel.
        self.s.rt.spawn(async move {
            match reader.read(&inode, offset, size as u64).await {
                Ok(b) => reply.data(&b),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.s.open.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The listing is pinned in the handle: offsets stay valid across new versions.
        match self.s.listing(ino.0) {
            Ok(l) => {
                let fh = self.s.add_open(Open::Dir(Arc::new(l)));
                reply.opened(fh, FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let list = match self.s.open.lock().unwrap().get(&fh.0) {
            Some(Open::Dir(l)) => l.clone(),
            _ => return reply.error(Errno::EBADF),
        };
        for (i, (ino, kind, name)) in list.iter().enumerate().skip(offset as usize) {
            // The offset of an entry is the index of the next one.
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.s.open.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ds: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let t = self.s.state.read().unwrap().root.totals;
        let bsize = 4096u64;
        reply.statfs(
            t.bytes.div_ceil(bsize),
            0,
            0,
            t.files,
            0,
            bsize as u32,
            255,
            bsize as u32,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // Readable by name, never listed: `cp -a` and `rsync -X` must not copy them.
        let value = match name.as_bytes() {
            b"user.cfs.key" => match self.s.state.read().unwrap().key_of(ino.0) {
                Some((k, _)) => k.to_hex().into_bytes(),
                None => return reply.error(Errno::ENOENT),
            },
            b"user.cfs.version" => self
                .s
                .state
                .read()
                .unwrap()
                .root
                .version
                .to_string()
                .into_bytes(),
            b"user.cfs.fsid" => self.s.fsid.to_hex().into_bytes(),
            _ => return reply.error(Errno::NO_XATTR),
        };
        if size == 0 {
            reply.size(value.len() as u32)
        } else if value.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&value)
        }
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS)
        } else {
            reply.ok()
        }
    }

    // Every write operation: read-only filesystem.
    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS)
    }
    fn mknod(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _d: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS)
    }
    fn mkdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS)
    }
    fn unlink(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }
    fn rmdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }
    fn symlink(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _t: &Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS)
    }
    fn rename(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS)
    }
    fn link(&self, _r: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS)
    }
    fn write(
        &self,
        _r: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _o: u64,
        _d: &[u8],
        _wf: WriteFlags,
        _f: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS)
    }
    fn create(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS)
    }
    fn setxattr(
        &self,
        _r: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS)
    }
    fn removexattr(&self, _r: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }
    fn fallocate(
        &self,
        _r: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _o: u64,
        _l: u64,
        _m: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS)
    }
}

/// What a new version changes for the kernel.
struct Invalidations {
    entries: Vec<(u64, Vec<u8>)>,
    inodes: Vec<u64>,
}

/// Compute the new keys of every known directory under `new`, and the names whose
/// entries differ. Nothing is changed; an error leaves the swap for the next poll.
async fn diff_versions<R: BlockService>(
    reader: &Reader<R>,
    dirs: &[(u64, u64, Vec<u8>, Option<Id>)],
    new_top: Id,
) -> Result<(BTreeMap<u64, Option<Id>>, Invalidations), FsError> {
    let mut keys: BTreeMap<u64, Option<Id>> = BTreeMap::new();
    let mut inv = Invalidations {
        entries: Vec::new(),
        inodes: Vec::new(),
    };
    // Parents are numbered before their children, so ascending order is top-down.
    for (ino, parent, name, old) in dirs {
        let new = if *ino == ROOT_INO {
            Some(new_top)
        } else {
            match keys.get(parent).copied().flatten() {
                None => None,
                Some(pk) => {
                    let p = reader.inode(pk).await?;
                    match reader.lookup(&p, name).await? {
                        Some(e) if e.kind == EntryKind::Dir => Some(e.key),
                        _ => None,
                    }
                }
            }
        };
        keys.insert(*ino, new);
        if new == *old {
            continue;
        }
        inv.inodes.push(*ino);
        let list = |k: Option<Id>| async move {
            match k {
                None => Ok::<_, FsError>(Vec::new()),
                Some(k) => {
                    let i = reader.inode(k).await?;
                    reader.list(&i).await
                }
            }
        };
        let old_list = match list(*old).await {
            Ok(l) => l,
            Err(e) => {
                // Without the old listing, removed names fall back to their TTL.
                tracing::warn!("old listing of directory {ino} unavailable: {e}");
                Vec::new()
            }
        };
        let new_list = list(new).await?;
        let old_map: HashMap<&[u8], (Id, EntryKind)> = old_list
            .iter()
            .map(|e| (e.name.as_slice(), (e.key, e.kind)))
            .collect();
        let new_map: HashMap<&[u8], (Id, EntryKind)> = new_list
            .iter()
            .map(|e| (e.name.as_slice(), (e.key, e.kind)))
            .collect();
        for (n, v) in &old_map {
            if new_map.get(n) != Some(v) {
                inv.entries.push((*ino, n.to_vec()));
            }
        }
        for n in new_map.keys() {
            if !old_map.contains_key(n) {
                inv.entries.push((*ino, n.to_vec()));
            }
        }
    }
    Ok((keys, inv))
}

impl<R: BlockService> Shared<R> {
    /// Swap in `root` if it is newer; returns what to invalidate.
    fn update(&self, root: RootBlock) -> Result<Option<Invalidations>, FsError> {
        for attempt in 0..3 {
            let dirs: Vec<(u64, u64, Vec<u8>, Option<Id>)> = {
                let st = self.state.read().unwrap();
                if root.version <= st.root.version {
                    return Ok(None);
                }
                dir_snapshot(&st)
            };
            let (keys, inv) = self
                .rt
                .block_on(diff_versions(&self.reader, &dirs, root.top))?;
            let mut st = self.state.write().unwrap();
            if root.version <= st.root.version {
                return Ok(None);
            }
            let now = dir_snapshot(&st);
            if now.len() != dirs.len() && attempt < 2 {
                // A lookup found new directories (in the old tree) meanwhile: diff again.
                continue;
            }
            for (ino, _, _, _) in now {
                let k = keys.get(&ino).copied().flatten();
                if let Some(Node::Dir { key: kk, .. }) = st.nodes.get_mut(&ino) {
                    // Unknown to the diff: forget the old key; a lookup re-resolves it.
                    *kk = if keys.contains_key(&ino) { k } else { None };
                }
            }
            tracing::info!(version = root.version, "switched to a new version");
            st.root = root;
            return Ok(Some(inv));
        }
        unreachable!("the last attempt always swaps")
    }
}

fn dir_snapshot(st: &State) -> Vec<(u64, u64, Vec<u8>, Option<Id>)> {
    let mut d: Vec<_> = st
        .nodes
        .iter()
        .filter_map(|(ino, n)| match n {
            Node::Dir { parent, name, key } => Some((*ino, *parent, name.clone(), *key)),
            Node::Leaf { .. } => None,
        })
        .collect();
    d.sort_by_key(|x| x.0);
    d
}

fn poll_loop<R: BlockService>(s: Arc<Shared<R>>, notifier: Notifier, stop: Arc<AtomicBool>) {
    loop {
        let until = std::time::Instant::now() + s.opts.poll_interval;
        while std::time::Instant::now() < until {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50).min(s.opts.poll_interval));
        }
        let root = match s.rt.block_on(s.reader.root(s.fsid, None)) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("polling the root of {}: {e}", s.fsid);
                continue;
            }
        };
        match s.update(root) {
            Ok(Some(inv)) => {
                // Outside any request and without our locks: the kernel may call us back.
                for (dir, name) in &inv.entries {
                    let _ = notifier.inval_entry(INodeNo(*dir), OsStr::from_bytes(name));
                }
                for ino in &inv.inodes {
                    let _ = notifier.inval_inode(INodeNo(*ino), 0, 0);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("new version not applied yet: {e}"),
        }
    }
}

/// A live mount; dropping it without [`MountHandle::unmount`] also unmounts.
pub struct MountHandle {
    session: Option<fuser::BackgroundSession>,
    stop: Arc<AtomicBool>,
    poller: Option<std::thread::JoinHandle<()>>,
    mountpoint: PathBuf,
    version: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl MountHandle {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The version currently mounted.
    pub fn version(&self) -> u64 {
        (self.version)()
    }

    /// True once the kernel side is gone (e.g. `fusermount3 -u` from outside).
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    fn stop_poller(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(p) = self.poller.take() {
            let _ = p.join();
        }
    }

    /// Unmount and wait for the session to end. If the mount is busy, detach it lazily
    /// (it goes away when the last user leaves).
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.stop_poller();
        if let Some(s) = self.session.take() {
            if s.guard.is_finished() {
                return s.join();
            }
            if let Err(e) = s.umount_and_join() {
                tracing::warn!("unmount failed ({e}); detaching lazily");
                lazy_unmount(&self.mountpoint);
            }
        }
        Ok(())
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        self.stop_poller();
        if let Some(s) = self.session.take() {
            if !s.guard.is_finished() && s.umount_and_join().is_err() {
                lazy_unmount(&self.mountpoint);
            }
        }
    }
}

fn lazy_unmount(mp: &Path) -> bool {
    let ok = |c: &mut std::process::Command| c.status().map(|s| s.success()).unwrap_or(false);
    ok(std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mp))
        || ok(std::process::Command::new("fusermount")
            .arg("-u")
            .arg("-z")
            .arg(mp))
        || ok(std::process::Command::new("umount").arg("-l").arg(mp))
}

/// A mount left by a killed process answers requests with ENOTCONN: clear it. A stat
/// alone can be answered from the kernel's attribute cache, so open the directory too.
pub fn clear_dead_mount(mp: &Path) -> bool {
    let dead = |e: &std::io::Error| {
        matches!(e.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::ECONNABORTED))
    };
    let is_dead = match std::fs::metadata(mp) {
        Err(e) => dead(&e),
        Ok(_) => std::fs::read_dir(mp).err().is_some_and(|e| dead(&e)),
    };
    if is_dead {
        tracing::warn!("clearing a dead mount at {}", mp.display());
        return lazy_unmount(mp);
    }
    false
}

/// Mount `fsid` at `mountpoint` and return at once; the mount lives until the handle
/// is unmounted or dropped. Must be called inside a tokio runtime.
pub async fn spawn_mount<R: BlockService>(
    ring: Arc<R>,
    fsid: Id,
    mountpoint: &Path,
    opts: MountOpts,
) -> Result<MountHandle, MountError> {
    let rt = Handle::current();
    let reader = Reader::new(ring, opts.reader.clone());
    let root = reader.root(fsid, opts.version).await?;
    // Fetch the top inode now: a missing tree fails here, not in the first `ls`.
    reader.inode(root.top).await?;
    let mut nodes = HashMap::new();
    nodes.insert(
        ROOT_INO,
        Node::Dir {
            parent: ROOT_INO,
            name: Vec::new(),
            key: Some(root.top),
        },
    );
    let shared = Arc::new(Shared {
        reader,
        rt,
        fsid,
        pinned: opts.version.is_some(),
        opts: opts.clone(),
        uid: unsafe { libc::getuid() },
        gid: unsafe { libc::getgid() },
        state: RwLock::new(State {
            root,
            nodes,
            dir_inos: HashMap::new(),
            leaf_inos: HashMap::new(),
            next_ino: ROOT_INO + 1,
        }),
        open: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
    });

    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::DefaultPermissions,
        MountOption::FSName(format!("cfs:{fsid}")),
        MountOption::Subtype("cfs".into()),
    ];
    cfg.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    cfg.n_threads = Some(opts.threads.max(1));
    let mp = mountpoint.to_path_buf();
    let fs = CfsFs { s: shared.clone() };
    let allow_other = opts.allow_other;
    let (session, notifier) = tokio::task::spawn_blocking(move || {
        clear_dead_mount(&mp);
        let session = fuser::Session::new(fs, &mp, &cfg).map_err(|source| {
            let hint = if allow_other && source.to_string().contains("allow_other") {
                "; allow_other needs `user_allow_other` in /etc/fuse.conf"
            } else if !Path::new("/dev/fuse").exists() {
                "; /dev/fuse is missing: install fuse3 and load the fuse module"
            } else {
                ""
            };
            MountError::Mount {
                path: mp.clone(),
                source,
                hint,
            }
        })?;
        let notifier = session.notifier();
        let bg = session.spawn()?;
        Ok::<_, MountError>((bg, notifier))
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))??;

    let stop = Arc::new(AtomicBool::new(false));
    let poller = if opts.version.is_none() {
        let (s, st) = (shared.clone(), stop.clone());
        Some(
            std::thread::Builder::new()
                .name("cfs-poll".into())
                .spawn(move || poll_loop(s, notifier, st))?,
        )
    } else {
        None
    };
    tracing::info!(
        version = shared.state.read().unwrap().root.version,
        "mounted {fsid} at {}",
        mountpoint.display()
    );
    let sv = shared.clone();
    Ok(MountHandle {
        session: Some(session),
        stop,
        poller,
        mountpoint: mountpoint.to_path_buf(),
        version: Arc::new(move || sv.state.read().unwrap().root.version),
    })
}

/// `cfs mount`: mount and stay in the foreground until SIGINT or SIGTERM (or an
/// unmount from outside), then unmount cleanly.
pub async fn mount<R: BlockService>(
    ring: Arc<R>,
    fsid: Id,
    mountpoint: &Path,
    opts: MountOpts,
) -> Result<(), MountError> {
    use tokio::signal::unix::{signal, SignalKind};
    let h = spawn_mount(ring, fsid, mountpoint, opts).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => if h.is_finished() { break },
        }
    }
    tracing::info!("unmounting {}", mountpoint.display());
    tokio::task::spawn_blocking(move || h.unmount())
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    Ok(())
}
