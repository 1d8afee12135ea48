//! The fuser adapter: translates requests to [`Fs`] calls and typed errors to errnos, and
//! nothing else, so the filesystem is tested without FUSE in the loop.
//!
//! Lookups and attributes block a fuser worker thread on the tokio runtime; reads are
//! answered from a spawned task so many run in parallel.

use super::fs::{Fs, OpError, Opened};
use cfs_tree::service::BlockService;
use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::SystemTime;

pub(super) struct FuseFs<R> {
    pub(super) fs: Arc<Fs<R>>,
    pub(super) stack_depth: u32,
    pub(super) direct_io: bool,
}

fn errno(op: &str, e: &OpError) -> Errno {
    // Expected answers (a missing name) stay quiet; failures of the ring are logged.
    match e {
        OpError::Read(_) | OpError::Busy => tracing::warn!("{op}: {e}: {:?}", e),
        _ => tracing::debug!("{op}: {e}"),
    }
    Errno::from_i32(e.errno())
}

/// Every operation that would change the tree answers EROFS, from here only.
macro_rules! read_only {
    ($(fn $name:ident($($ty:ty),*) -> $reply:ty;)*) => {
        $(fn $name(&self, $(_: $ty),*, reply: $reply) {
            reply.error(Errno::EROFS)
        })*
    };
}

impl<R: BlockService> Filesystem for FuseFs<R> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large kernel read-ahead feeds our own prefetch window.
        let _ = config.set_max_readahead(1 << 20);
        if self.fs.files.is_some() {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(self.stack_depth).is_ok();
            self.fs.passthrough.store(ok, Ordering::SeqCst);
            if !ok {
                tracing::info!(
                    "the kernel does not offer FUSE passthrough; cached files are read through cfs"
                );
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Ok((ino, inode, is_dir)) => {
                let attr = self.fs.attr(ino, &inode);
                reply.entry_with_ttls(
                    &self.fs.ttl(is_dir),
                    &self.fs.ttl(true),
                    &attr,
                    Generation(0),
                )
            }
            Err(e) => reply.error(errno("lookup", &e)),
        }
    }

    // fuser's default `batch_forget` calls this for each entry.
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0, fh.map(|f| f.0)) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(errno("getattr", &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno("readlink", &e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        match self.fs.open(ino.0, write, |f| reply.open_backing(f)) {
            Ok(Opened::Normal(fh)) if self.direct_io => {
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
            }
            // The number changes with the content, so cached pages stay valid.
            Ok(Opened::Normal(fh)) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            // The kernel refuses cache flags on a passthrough open (it reads the backing
            // file's own page cache).
            Ok(Opened::Passthrough(fh, b)) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b)
            }
            Err(e) => reply.error(errno("open", &e)),
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
        // Cached bytes are answered on this thread: one poll, no hop to the runtime.
        {
            let _rt = self.fs.rt.enter();
            let mut read = std::pin::pin!(self.fs.read(fh.0, offset, size));
            let mut cx = Context::from_waker(Waker::noop());
            if let Poll::Ready(r) = read.as_mut().poll(&mut cx) {
                return match r {
                    Ok(out) => {
                        reply.data(out.data.as_slice());
                        self.fs.after_reply(out, offset);
                    }
                    Err(e) => reply.error(errno("read", &e)),
                };
            }
        }
        let fs = self.fs.clone();
        // Otherwise reply from a task: reads of many files and offsets go in parallel.
        self.fs.rt.spawn(async move {
            match fs.read(fh.0, offset, size).await {
                Ok(out) => {
                    reply.data(out.data.as_slice());
                    fs.after_reply(out, offset);
                }
                Err(e) => reply.error(errno("read", &e)),
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
        self.fs.release(fh.0);
        reply.ok();
    }

    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _: &Request, _: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno("opendir", &e)),
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
        let list = match self.fs.readdir(fh.0) {
            Ok(l) => l,
            Err(e) => return reply.error(errno("readdir", &e)),
        };
        for (i, (ino, kind, name)) in list.iter().enumerate().skip(offset as usize) {
            // The offset of an entry is the index of the next one.
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _: &Request, _: INodeNo, fh: FileHandle, _: OpenFlags, r: ReplyEmpty) {
        self.fs.releasedir(fh.0);
        r.ok();
    }

    fn fsyncdir(&self, _: &Request, _: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let t = self.fs.totals();
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
        let value = match self.fs.getxattr(ino.0, name.as_bytes()) {
            Ok(v) => v,
            Err(OpError::NoAttribute(_)) => return reply.error(Errno::NO_XATTR),
            Err(e) => return reply.error(errno("getxattr", &e)),
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

    read_only! {
        fn setattr(&Request, INodeNo, Option<u32>, Option<u32>, Option<u32>, Option<u64>,
            Option<TimeOrNow>, Option<TimeOrNow>, Option<SystemTime>, Option<FileHandle>,
            Option<SystemTime>, Option<SystemTime>, Option<SystemTime>,
            Option<fuser::BsdFileFlags>) -> ReplyAttr;
        fn mknod(&Request, INodeNo, &OsStr, u32, u32, u32) -> ReplyEntry;
        fn mkdir(&Request, INodeNo, &OsStr, u32, u32) -> ReplyEntry;
        fn unlink(&Request, INodeNo, &OsStr) -> ReplyEmpty;
        fn rmdir(&Request, INodeNo, &OsStr) -> ReplyEmpty;
        fn symlink(&Request, INodeNo, &OsStr, &Path) -> ReplyEntry;
        fn rename(&Request, INodeNo, &OsStr, INodeNo, &OsStr, fuser::RenameFlags) -> ReplyEmpty;
        fn link(&Request, INodeNo, INodeNo, &OsStr) -> ReplyEntry;
        fn write(&Request, INodeNo, FileHandle, u64, &[u8], WriteFlags, OpenFlags,
            Option<LockOwner>) -> ReplyWrite;
        fn create(&Request, INodeNo, &OsStr, u32, u32, i32) -> ReplyCreate;
        fn setxattr(&Request, INodeNo, &OsStr, &[u8], i32, u32) -> ReplyEmpty;
        fn removexattr(&Request, INodeNo, &OsStr) -> ReplyEmpty;
        fn fallocate(&Request, INodeNo, FileHandle, u64, u64, i32) -> ReplyEmpty;
    }
}
