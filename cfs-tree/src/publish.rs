//! Publishing a directory tree: walk, chunk, insert the blocks the ring lacks with
//! bounded parallelism, then sign and put the root last, so an interrupted publish
//! leaves the previous version intact. Also the publisher's key file.

mod index;
mod read;
mod walk;
mod watch;

pub use index::{index_path, IndexUnused, StatIndex};
pub use watch::{watch, Round, WatchOpts};

use crate::service::{BlockService, PutReceipt, RingError};
use cfs_core::block::{root_key, verify, RootBlock, Totals, Verified};
use cfs_core::fs::{LayoutError, NewBlock, BLOCK_SIZE};
use cfs_core::{BlockKind, Id};
use ed25519_dalek::SigningKey;
use index::{FileStat, IndexWriter};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use walk::{Scan, Walk};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Layout {
        path: PathBuf,
        #[source]
        source: LayoutError,
    },
    #[error("{0} is not a directory; publish takes a directory")]
    NotDir(PathBuf),
    #[error("watching {0} for changes failed: {1} (on Linux, raising fs.inotify.max_user_watches may help)")]
    Watch(PathBuf, #[source] notify::Error),
    /// The file kept changing while it was read.
    #[error(
        "{0} changed while it was read, {READ_ATTEMPTS} times; publish again when it is written"
    )]
    Changed(PathBuf),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("the ring holds version {have} of this filesystem, which does not decode: {msg}")]
    BadRoot { have: u64, msg: String },
    /// Another publisher with the same key won every version this one tried.
    #[error("another publisher with this key published at the same time and won {attempts} versions in a row (the last {version}); publish again when it is done")]
    Raced { version: u64, attempts: u32 },
}

/// Reads of a file that changes while it is read, before the publish gives up on it.
const READ_ATTEMPTS: u32 = 3;

/// Versions a publish tries before it gives up to another publisher of the same key.
const MAX_RACES: u32 = 4;
/// How long a publisher waits for every replica to hold its version (or a rival's)
/// before it judges the race on what it sees.
const RACE_SETTLE: Duration = Duration::from_secs(2);

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Options of [`publish`].
#[derive(Clone, Debug)]
pub struct PublishOpts {
    /// Puts in flight at most.
    pub parallelism: usize,
    /// Blocks asked about in one `has_everywhere` round.
    pub batch: usize,
    /// Show a progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
    /// Cut file data at content-defined boundaries (layout 2: an insertion or a deletion
    /// changes only the chunks it touches), or, when false, in blocks of `block_size`.
    pub content_defined: bool,
    /// Data block size of fixed-size blocks (when not `content_defined`).
    pub block_size: usize,
    /// The stat index of this tree and key (see [`index_path`]): files it shows
    /// unchanged are not read again, and it is rewritten after the publish. None: every
    /// file is read and no index is kept.
    pub index: Option<PathBuf>,
    /// Read every file even where the index shows it unchanged (the index is still
    /// rewritten).
    pub rehash: bool,
    /// A file whose mtime or ctime is this close to the publish's start is read next
    /// time whatever its stat says (a write in the same clock tick as our read keeps
    /// size and times). Default [`index::RACY`]; tests use less.
    pub settle: Duration,
}

impl Default for PublishOpts {
    fn default() -> Self {
        PublishOpts {
            parallelism: 32,
            batch: 256,
            progress: true,
            content_defined: true,
            block_size: BLOCK_SIZE,
            index: None,
            rehash: false,
            settle: index::RACY,
        }
    }
}

/// What a publish did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub fsid: Id,
    pub version: u64,
    /// Distinct blocks of this version (data, metadata; not the root).
    pub blocks_total: u64,
    /// Blocks the ring did not have, which this publish sent.
    pub blocks_new: u64,
    /// Blocks confirmed (asked after the puts) to be on all r replicas.
    pub blocks_on_all: u64,
    /// Replicas per block the ring wanted (r), as the puts reported.
    pub replicas: usize,
    pub files: u64,
    pub bytes: u64,
    /// Files the stat index showed unchanged, so not read, and the blocks under them
    /// and under unchanged directories (counted in `blocks_total`, not asked about).
    pub files_reused: u64,
    pub blocks_reused: u64,
    /// Entries skipped (sockets, devices, fifos), with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "published version {} of {}: {} files, {} bytes",
            self.version, self.fsid, self.files, self.bytes
        )?;
        writeln!(
            f,
            "blocks: {} total, {} new, {} confirmed on {r} of {r} replicas",
            self.blocks_total,
            self.blocks_new,
            self.blocks_on_all,
            r = self.replicas
        )?;
        if self.files_reused > 0 || self.blocks_reused > 0 {
            writeln!(
                f,
                "unchanged since the last publish: {} files not read, {} blocks reused (--rehash reads everything)",
                self.files_reused, self.blocks_reused
            )?;
        }
        if !self.skipped.is_empty() {
            writeln!(
                f,
                "skipped {} entries (not files, directories or symlinks)",
                self.skipped.len()
            )?;
        }
        write!(f, "FSID {}\nversion {}", self.fsid, self.version)
    }
}

/// Most blocks and bytes in one batch (`put_many`): one request and one store commit
/// per replica for each, well inside a frame. Data chunks travel 4 or 5 at a time, so
/// smaller chunks do not cost more commits.
const BATCH_BLOCKS: usize = 256;
const BATCH_BYTES: usize = 960 * 1024;
/// Pending batches (each up to `PublishOpts::batch` blocks or 16 MiB) asked about at
/// once, and MiB of blocks read but not yet put, while the walk reads on.
const CHECKS_IN_FLIGHT: usize = 3;
const BUFFERED_MIB: usize = 64;

/// Sends blocks: dedups within the publish, asks the ring in batches which it lacks,
/// and keeps at most `parallelism` puts in flight.
struct Uploader<R: BlockService> {
    ring: Arc<R>,
    opts: PublishOpts,
    sem: Arc<Semaphore>,
    pending: Vec<NewBlock>,
    pending_bytes: usize,
    seen: HashSet<(BlockKind, Id)>,
    all: Vec<(BlockKind, Id)>,
    tasks: JoinSet<Result<(u64, Vec<PutReceipt>), RingError>>,
    /// Batches being asked about at once, and MiB of blocks not yet put (`flush`).
    checks: Arc<Semaphore>,
    buffered: Arc<Semaphore>,
    new: u64,
    replicas: usize,
    pb: ProgressBar,
}

impl<R: BlockService> Uploader<R> {
    async fn add(&mut self, b: NewBlock) -> Result<(), PublishError> {
        if !self.seen.insert((b.kind, b.key)) {
            return Ok(());
        }
        self.all.push((b.kind, b.key));
        self.pending_bytes += b.bytes.len();
        self.pending.push(b);
        if self.pending.len() >= self.opts.batch || self.pending_bytes >= 16 << 20 {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hand the pending blocks to a task that asks the ring which it lacks and puts
    /// those, while the walk reads on (up to `BUFFERED_MIB` of blocks not yet put): over
    /// the wide area the question costs round trips of its own, which earlier batches'
    /// puts now fill.
    async fn flush(&mut self) -> Result<(), PublishError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.pending);
        let mib = (self.pending_bytes >> 20).clamp(1, BUFFERED_MIB) as u32;
        self.pending_bytes = 0;
        let buffered = self
            .buffered
            .clone()
            .acquire_many_owned(mib)
            .await
            .expect("semaphore open");
        let (ring, sem, checks) = (self.ring.clone(), self.sem.clone(), self.checks.clone());
        self.tasks.spawn(async move {
            let r = put_missing(ring, sem, checks, batch).await;
            drop(buffered);
            r
        });
        while let Some(r) = self.tasks.try_join_next() {
            self.reap(r)?;
        }
        Ok(())
    }

    fn reap(
        &mut self,
        r: Result<Result<(u64, Vec<PutReceipt>), RingError>, tokio::task::JoinError>,
    ) -> Result<(), PublishError> {
        let (new, rcs) =
            r.map_err(|e| RingError::Unreachable(format!("put task failed: {e}")))??;
        self.new += new;
        for rc in rcs {
            self.replicas = self.replicas.max(rc.wanted);
        }
        self.pb
            .set_message(format!("{} blocks, {} new", self.all.len(), self.new));
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), PublishError> {
        self.flush().await?;
        while let Some(r) = self.tasks.join_next().await {
            self.reap(r)?;
        }
        Ok(())
    }

    /// Ask again, after the puts, which blocks are on all r replicas.
    async fn confirm(&self) -> Result<u64, PublishError> {
        let mut n = 0;
        for chunk in self.all.chunks(1024) {
            n += self
                .ring
                .has_everywhere(chunk.to_vec())
                .await?
                .iter()
                .filter(|&&b| b)
                .count() as u64;
        }
        Ok(n)
    }
}

/// Ask the ring which of `batch` it lacks on some replica and put those, in batches of
/// up to `BATCH_BYTES` (one request and one commit per replica each), at most `sem`'s
/// permits of them in flight across the whole publish. Returns how many were new.
async fn put_missing<R: BlockService>(
    ring: Arc<R>,
    sem: Arc<Semaphore>,
    checks: Arc<Semaphore>,
    batch: Vec<NewBlock>,
) -> Result<(u64, Vec<PutReceipt>), RingError> {
    let check = checks.acquire_owned().await.expect("semaphore open");
    let have = ring
        .has_everywhere(batch.iter().map(|b| (b.kind, b.key)).collect())
        .await?;
    drop(check);
    let mut batches: Vec<Vec<Verified>> = vec![Vec::new()];
    let mut bytes = 0;
    let mut new = 0;
    for (b, h) in batch
        .into_iter()
        .zip(have.into_iter().chain(std::iter::repeat(false)))
    {
        if h {
            continue;
        }
        new += 1;
        let v = b.into_verified();
        let last = batches.last_mut().expect("never empty");
        if !last.is_empty() && (bytes + v.bytes().len() > BATCH_BYTES || last.len() >= BATCH_BLOCKS)
        {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += v.bytes().len();
        batches.last_mut().expect("never empty").push(v);
    }
    let puts = batches.into_iter().filter(|b| !b.is_empty()).map(|blocks| {
        let (ring, sem) = (ring.clone(), sem.clone());
        async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            ring.put_many(blocks).await
        }
    });
    let mut receipts = Vec::new();
    for r in futures_util::future::join_all(puts).await {
        receipts.extend(r?);
    }
    Ok((new, receipts))
}

fn progress_bar(total: u64, show: bool) -> ProgressBar {
    if !show || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {prefix} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    pb
}

/// Publish `dir` as the next version of the filesystem signed by `key`.
pub async fn publish<R: BlockService>(
    ring: Arc<R>,
    dir: &Path,
    key: &SigningKey,
    opts: &PublishOpts,
) -> Result<Receipt, PublishError> {
    let started = SystemTime::now();
    let md = std::fs::metadata(dir).map_err(io_err(dir))?;
    if !md.is_dir() {
        return Err(PublishError::NotDir(dir.to_path_buf()));
    }
    let mut s = Scan::default();
    walk::count(dir, &md, &mut s)?;
    let fsid = root_key(&key.verifying_key().to_bytes());
    // Ask for the current root first: a ring we cannot reach must not get a version 1.
    let prev = ring.get_root(fsid).await?;
    // What the index's inodes were cut with: 0 for content-defined chunks.
    let block_size = if opts.content_defined {
        0
    } else {
        opts.block_size as u32
    };
    let index = match (&opts.index, opts.rehash) {
        (Some(p), false) => {
            let now = prev.as_ref().map(|v| Id::hash(v.bytes()));
            match StatIndex::load(p, fsid, dir, block_size, now) {
                Ok(i) => i,
                Err(IndexUnused::Missing) => StatIndex::default(),
                Err(e) => {
                    tracing::info!(
                        "not using the publish index {}: {e}; reading every file",
                        p.display()
                    );
                    StatIndex::default()
                }
            }
        }
        _ => StatIndex::default(),
    };

    let pb = progress_bar(s.bytes, opts.progress);
    let up = Uploader {
        ring: ring.clone(),
        opts: opts.clone(),
        sem: Arc::new(Semaphore::new(opts.parallelism.max(1))),
        pending: Vec::new(),
        pending_bytes: 0,
        seen: HashSet::new(),
        all: Vec::new(),
        tasks: JoinSet::new(),
        checks: Arc::new(Semaphore::new(CHECKS_IN_FLIGHT)),
        buffered: Arc::new(Semaphore::new(BUFFERED_MIB)),
        new: 0,
        replicas: 0,
        pb: pb.clone(),
    };
    let mut w = Walk {
        up,
        scan: &s,
        top: dir,
        linked: HashMap::new(),
        files: 0,
        index,
        record: IndexWriter::new(
            opts.index.as_deref(),
            started,
            opts.settle,
            fsid,
            dir,
            block_size,
        ),
        files_reused: 0,
        blocks_reused: 0,
    };
    let (top, _) = w
        .node(dir, &md)
        .await?
        .ok_or_else(|| PublishError::NotDir(dir.to_path_buf()))?;
    let blocks_total = w.up.all.len() as u64 + w.blocks_reused;

    // The previous root, kept as an immutable block so old versions stay mountable.
    let (version, prev_key) = match &prev {
        None => (1, None),
        Some(v) => {
            let r = v.root().ok_or(PublishError::BadRoot {
                have: v.version(),
                msg: "undecodable".into(),
            })?;
            let b = NewBlock {
                kind: BlockKind::Meta,
                key: Id::hash(v.bytes()),
                bytes: v.bytes().to_vec(),
            };
            let k = b.key;
            w.up.add(b).await?;
            (r.version + 1, Some(k))
        }
    };
    w.up.finish().await?;
    pb.set_message("confirming replicas");

    let totals = Totals {
        files: w.files,
        bytes: s.bytes,
        blocks: blocks_total,
    };
    let now = index::unix_now();
    // Compare-and-swap on the version: a replica keeps the first root of a version it
    // gets, so a second publisher of this key racing us for the version may hold some
    // replicas. Once every replica that answers holds this version or a newer one, the
    // root of the highest rank (`Verified::rank`) among them is the version's winner:
    // both publishers see the same roots and agree on it, and ring maintenance carries
    // it to every replica. Having lost, the tree is signed again as the next version.
    let root_put = async {
        let (mut version, mut prev_key) = (version, prev_key);
        let mut lost = 0;
        let (rc, won) = loop {
            let root = RootBlock::sign(key, version, top, totals, prev_key, now);
            let rv =
                verify(BlockKind::Root, fsid, root.encode(), false).expect("own root verifies");
            let put = ring.put(rv.clone()).await;
            let settled_by = Instant::now() + RACE_SETTLE;
            let roots = loop {
                let roots = ring.get_roots(fsid).await?;
                if roots.iter().all(|r| r.version() >= version) || Instant::now() > settled_by {
                    break roots;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let Some(winner) = roots.iter().max_by_key(|r| r.rank()) else {
                // No replica holds any root: the put's own error says why.
                put?;
                return Err(PublishError::Ring(RingError::Unreachable(
                    "no replica holds the root just stored".into(),
                )));
            };
            if winner.bytes() == rv.bytes() {
                // Ours won. Replicas that took the other side first refused our put; ring
                // maintenance brings them ours (it outranks), so their refusal is no error.
                let won = Id::hash(rv.bytes());
                match put {
                    Ok(rc) => break (rc, won),
                    Err(_) => {
                        break (
                            PutReceipt {
                                stored_on: 1,
                                wanted: 0,
                            },
                            won,
                        )
                    }
                }
            }
            lost += 1;
            tracing::warn!(%fsid, version, winner = winner.version(), "another publisher of this key won the version; publishing the next one");
            if lost >= MAX_RACES {
                return Err(PublishError::Raced {
                    version: winner.version(),
                    attempts: lost,
                });
            }
            // The winner becomes the previous version, kept as an immutable block.
            let prev = NewBlock {
                kind: BlockKind::Meta,
                key: Id::hash(winner.bytes()),
                bytes: winner.bytes().to_vec(),
            };
            ring.put(verify(prev.kind, prev.key, prev.bytes, false).expect("hashes to its key"))
                .await?;
            version = winner.version() + 1;
            prev_key = Some(Id::hash(winner.bytes()));
        };
        Ok::<_, PublishError>((rc, won, version))
    };
    // Every block's put was acknowledged by its replicas' commits, so the root need not
    // wait for the second asking, which only counts (over the wide area, a second or
    // more of lookups and `Has`): both run at once.
    let (blocks_on_all, root) = tokio::join!(w.up.confirm(), root_put);
    let (blocks_on_all, (rc, won, version)) = (blocks_on_all?, root?);
    pb.finish_and_clear();
    if let Some(p) = &opts.index {
        // A publish that cannot write its index still published: the next one reads
        // every file.
        // What was reused keeps the renewal it had; a publish that read everything
        // renewed every lease (`has_everywhere`) as of its start.
        let renewed_at = match (w.index.renewed_at, w.files_reused + w.blocks_reused) {
            (Some(t), n) if n > 0 => t,
            _ => index::unix_secs(started),
        };
        if let Err(e) = w.record.save(p, won, renewed_at) {
            tracing::warn!("could not write the publish index {}: {e}", p.display());
        }
    }
    Ok(Receipt {
        fsid,
        version,
        blocks_total,
        blocks_new: w.up.new,
        blocks_on_all: blocks_on_all.min(blocks_total),
        replicas: w.up.replicas.max(rc.wanted),
        files: w.files,
        bytes: s.bytes,
        files_reused: w.files_reused,
        blocks_reused: w.blocks_reused,
        skipped: s.skipped,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0} already exists; refusing to overwrite a signing key (choose another file)")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a cfs key file (expected 64 hex digits)")]
    Format(PathBuf),
}

/// Create a new signing key at `path` (mode 0600, never overwriting); returns the FSID.
/// The file holds the 32-byte secret as 64 hex digits and a newline.
pub fn keygen(path: &Path) -> Result<Id, KeyError> {
    let ioe = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut seed = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(ioe)?;
    let key = SigningKey::from_bytes(&seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists(path.to_path_buf()),
            _ => ioe(e),
        })?;
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    f.write_all(format!("{hex}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(ioe)?;
    Ok(root_key(&key.verifying_key().to_bytes()))
}

/// Read a key written by [`keygen`].
pub fn load_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let t = text.trim();
    if t.len() != 64 || !t.is_ascii() {
        return Err(KeyError::Format(path.to_path_buf()));
    }
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16)
            .map_err(|_| KeyError::Format(path.to_path_buf()))?;
    }
    Ok(SigningKey::from_bytes(&seed))
}

/// The FSID of a signing key.
pub fn fsid_of(key: &SigningKey) -> Id {
    root_key(&key.verifying_key().to_bytes())
}
