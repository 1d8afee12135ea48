//! The read-only FUSE mount of a published tree, in layers:
//!
//! - `fuse.rs`: the fuser adapter only (requests in, errnos out; EROFS from one place);
//! - `fs.rs`: the filesystem's operations on numbers and handles, with typed errors,
//!   tested without FUSE;
//! - `inodes.rs`: the inode table, bounded by the kernel's lookup counts (`forget`);
//! - `handles.rs`: open handles and each number's open mode;
//! - `version.rs`: the poller and the diff that applies a new version;
//! - `file_cache.rs`: verified whole files on local disk, served by passthrough;
//! - `errno.rs`: the errno of each read-path error;
//! - this file: options, mounting and unmounting.
//!
//! Every block fetch has a deadline, after which the request fails (EIO, or ETIMEDOUT).

pub mod errno;
mod file_cache;
pub mod fs;
mod fuse;
mod handles;
mod inodes;
mod version;

pub use errno::ToErrno;
pub use file_cache::FileCacheOpts;
pub use fs::{Fs, OpError, Opened};
pub use inodes::ROOT_INO;
pub use version::Invalidations;

use cfs_core::Id;
use cfs_tree::reader::{FsError, Reader, ReaderOpts};
use cfs_tree::service::BlockService;
use file_cache::{stack_depth_for, FileCache};
use fuser::{Config, MountOption, SessionACL};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;

/// Options of a mount.
#[derive(Clone, Debug)]
pub struct MountOpts {
    /// Mount this old version (followed through the chain of previous roots) instead of
    /// the current one; a pinned mount does not poll.
    pub version: Option<u64>,
    /// How often to ask for a new root.
    pub poll_interval: Duration,
    /// The reader's tuning; `forget_streamed` follows `direct_io` (the kernel keeps what
    /// was read unless direct I/O).
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
    /// Keep fully read files on local disk and serve them by FUSE passthrough; None
    /// (the default) keeps every read on the normal path.
    pub file_cache: Option<FileCacheOpts>,
    /// Direct I/O: the kernel keeps no page cache of files, so every read reaches the
    /// mount (and, with no memory budget, the ring): for tests and failure injection.
    pub direct_io: bool,
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
            file_cache: None,
            direct_io: false,
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

/// A live mount; dropping it without [`MountHandle::unmount`] also unmounts.
pub struct MountHandle {
    session: Option<fuser::BackgroundSession>,
    stop: Arc<AtomicBool>,
    poller: Option<std::thread::JoinHandle<()>>,
    mountpoint: PathBuf,
    version: Arc<dyn Fn() -> u64 + Send + Sync>,
    held: Arc<dyn Fn() -> usize + Send + Sync>,
    report: Arc<dyn Fn() + Send + Sync>,
}

impl MountHandle {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The version currently mounted.
    pub fn version(&self) -> u64 {
        (self.version)()
    }

    /// Entries of the inode table: what the kernel holds (plus the root).
    pub fn held_inodes(&self) -> usize {
        (self.held)()
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
        (self.report)();
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

/// Kernel read-ahead for the mount, in KiB. The default (128) keeps one or two FUSE reads
/// in flight; a deeper window lets the kernel ask for the next blocks while the reader
/// fetches from the ring (cold 256 MiB read: 0.70 s at 128 KiB, 0.61 s at 4 MiB).
const READ_AHEAD_KB: u32 = 4096;

/// Best effort: needs root (or the sysfs file's owner); the mount works without it.
fn raise_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = md.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, READ_AHEAD_KB.to_string()) {
        tracing::debug!(error = %e, path, "could not raise the mount's read-ahead");
    }
}

/// A mount left by a killed process answers requests with ENOTCONN: clear it. A stat
/// alone can be answered from the kernel's attribute cache, so open the directory too.
pub fn clear_dead_mount(mp: &Path) -> bool {
    let dead = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
        )
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

/// The filesystem of `fsid` without FUSE: what a mount serves, for tests and tools.
/// Must be called inside a tokio runtime.
pub async fn open_fs<R: BlockService>(
    ring: Arc<R>,
    fsid: Id,
    opts: MountOpts,
) -> Result<Arc<Fs<R>>, MountError> {
    let rt = Handle::current();
    // Without direct I/O the kernel keeps what a stream read in its page cache.
    let reader = Reader::new(
        ring,
        ReaderOpts {
            forget_streamed: !opts.direct_io,
            ..opts.reader.clone()
        },
    );
    let root = reader.root(fsid, opts.version).await?;
    // Fetch the top inode now: a missing tree fails here, not in the first `ls`.
    reader.inode(root.top).await?;
    let files = match &opts.file_cache {
        None => None,
        Some(o) => {
            let o = o.clone();
            match tokio::task::spawn_blocking(move || {
                FileCache::open(o.clone()).map_err(|e| (o, e))
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
            {
                Ok(c) => Some(c),
                Err((o, e)) => {
                    // A mount without the cache still works: say so and go on.
                    tracing::warn!(
                        "file cache {} unusable, reading without it: {e}",
                        o.dir.display()
                    );
                    None
                }
            }
        }
    };
    Ok(Arc::new(Fs::new(reader, rt, fsid, root, opts, files)))
}

/// Mount `fsid` at `mountpoint` and return at once; the mount lives until the handle
/// is unmounted or dropped. Must be called inside a tokio runtime.
pub async fn spawn_mount<R: BlockService>(
    ring: Arc<R>,
    fsid: Id,
    mountpoint: &Path,
    opts: MountOpts,
) -> Result<MountHandle, MountError> {
    let shared = open_fs(ring, fsid, opts.clone()).await?;
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
    let fs = fuse::FuseFs {
        fs: shared.clone(),
        direct_io: opts.direct_io,
        stack_depth: opts
            .file_cache
            .as_ref()
            .map_or(1, |o| stack_depth_for(&o.dir)),
    };
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
    raise_readahead(mountpoint);

    let stop = Arc::new(AtomicBool::new(false));
    let poller = if opts.version.is_none() {
        let (s, st) = (shared.clone(), stop.clone());
        Some(
            std::thread::Builder::new()
                .name("cfs-poll".into())
                .spawn(move || version::poll_loop(s, notifier, st))?,
        )
    } else {
        None
    };
    tracing::info!(
        version = shared.version(),
        "mounted {fsid} at {}",
        mountpoint.display()
    );
    let (sv, sh, sp) = (shared.clone(), shared.clone(), shared.clone());
    Ok(MountHandle {
        session: Some(session),
        stop,
        poller,
        mountpoint: mountpoint.to_path_buf(),
        version: Arc::new(move || sv.version()),
        held: Arc::new(move || sh.held()),
        report: Arc::new(move || {
            tracing::info!(
                peak_mib = sp.reader.memory_peak() >> 20,
                budget_mib = sp.reader.opts().cache_bytes >> 20,
                "memory of cached blocks, fetches in flight and replies"
            )
        }),
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
