//! `cfs keep` and `cfsd --keep`: walk the chosen versions of a tree (the root chain,
//! directories, inodes, indirect and data blocks) and renew every reachable block's lease
//! on all its replicas, by key, in batches per successor range. Data blocks are never
//! fetched: their keys and lengths come from the inodes and indirect blocks. The dry run
//! walks every version still in the ring and says what only old versions hold.

use cfs_core::block::{BlockKind, RootBlock};
use cfs_core::fs::decode_meta;
use cfs_core::walk::{children, previous_root, ChainError, MetaRole, Reach};
use cfs_core::Id;
use cfs_net::client::{Client, LeaseState};
use cfs_net::net::DhashError;
use cfs_net::transport::Transport;
use std::collections::HashSet;

/// Which versions to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versions {
    /// The newest N.
    Last(u64),
    /// Every version published at or after this unix second (and always the newest).
    Since(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum KeepError {
    #[error("no tree {0} in the ring (its root has no replica, or its lease ended)")]
    NoSuchTree(Id),
    #[error("the ring did not answer for block {key}")]
    Ring {
        key: Id,
        #[source]
        source: DhashError,
    },
    #[error("block {key} of the tree does not decode")]
    Layout {
        key: Id,
        #[source]
        source: cfs_core::fs::LayoutError,
    },
    #[error("root chain broken at {key}")]
    Chain {
        key: Id,
        #[source]
        source: ChainError,
    },
    #[error("the root of {0} does not decode")]
    BadRoot(Id),
}

/// What a keep (or its dry run) found and did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeepReceipt {
    /// Versions walked and kept, newest first.
    pub versions: Vec<u64>,
    /// Distinct blocks reachable from them (root and chain links included), and bytes.
    pub blocks: u64,
    pub bytes: u64,
    /// Block copies renewed now, and copies already leased long enough.
    pub renewed: u64,
    pub already: u64,
    /// Blocks with fewer than r replicas holding them (maintenance repairs these), and
    /// blocks some replica would not lease that long (quota, its maximum lease).
    pub under_replicated: u64,
    pub short: u64,
    /// A replica's refusal, if any.
    pub refused: Option<String>,
    /// Dry run only: older versions still in the ring, and the blocks and bytes that
    /// only they reach (what expires if they are not kept).
    pub old_versions: Vec<u64>,
    pub old_only_blocks: u64,
    pub old_only_bytes: u64,
    pub secs: f64,
}

/// Items renewed per batch (then grouped by successor range).
const BATCH: usize = 4096;
/// Metadata blocks fetched at once.
const PARALLEL: usize = 16;

/// The walk: its client, its target lease, what it saw.
struct Walk<'a, T: Transport> {
    client: &'a Client<T>,
    lease: u64,
    dry_run: bool,
    seen: HashSet<(BlockKind, Id)>,
    pending: Vec<(BlockKind, Id, u64)>,
    receipt: KeepReceipt,
    progress: &'a (dyn Fn(&KeepReceipt) + Sync),
    /// Every block reached, with its version and length (for `blocks_of`).
    found: Option<Vec<(BlockKind, Id, u64, u64)>>,
}

impl<'a, T: Transport> Walk<'a, T> {
    fn new(
        client: &'a Client<T>,
        lease: u64,
        dry_run: bool,
        progress: &'a (dyn Fn(&KeepReceipt) + Sync),
    ) -> Walk<'a, T> {
        Walk {
            client,
            lease,
            dry_run,
            seen: HashSet::new(),
            pending: Vec::new(),
            receipt: KeepReceipt::default(),
            progress,
            found: None,
        }
    }

    /// Count a reachable block once; queue it for renewal.
    async fn reach(
        &mut self,
        kind: BlockKind,
        key: Id,
        version: u64,
        len: u64,
    ) -> Result<bool, KeepError> {
        if !self.seen.insert((kind, key)) {
            return Ok(false);
        }
        self.receipt.blocks += 1;
        self.receipt.bytes += len;
        if let Some(f) = &mut self.found {
            f.push((kind, key, version, len));
        }
        self.pending.push((kind, key, version));
        if self.pending.len() >= BATCH {
            self.flush().await?;
        }
        Ok(true)
    }

    async fn flush(&mut self) -> Result<(), KeepError> {
        let items = std::mem::take(&mut self.pending);
        if items.is_empty() || self.dry_run {
            (self.progress)(&self.receipt);
            return Ok(());
        }
        let states = self
            .client
            .lease_everywhere(&items, self.lease)
            .await
            .map_err(|source| KeepError::Ring {
                key: items[0].1,
                source,
            })?;
        for s in states {
            self.count(&s);
        }
        (self.progress)(&self.receipt);
        Ok(())
    }

    fn count(&mut self, s: &LeaseState) {
        let r = &mut self.receipt;
        r.renewed += s.renewed as u64;
        r.already += (s.leased - s.renewed) as u64;
        if s.leased + s.short < self.client.replicas {
            r.under_replicated += 1;
        }
        if s.short > 0 {
            r.short += 1;
        }
        if r.refused.is_none() {
            r.refused.clone_from(&s.refused);
        }
    }

    /// Every block under `top` (an inode), fetched PARALLEL metadata blocks at a time.
    async fn tree(&mut self, top: Id) -> Result<(), KeepError> {
        let mut todo: Vec<(Id, MetaRole)> = Vec::new();
        if self.reach(BlockKind::Meta, top, 0, 0).await? {
            todo.push((top, MetaRole::Inode));
        }
        while !todo.is_empty() {
            let take = todo.len().min(PARALLEL);
            let wave: Vec<(Id, MetaRole)> = todo.split_off(todo.len() - take);
            let fetched = cfs_net::net::join_all(wave.iter().map(|(key, _)| {
                let c = self.client.clone();
                let key = *key;
                async move { c.get(BlockKind::Meta, key).await }
            }))
            .await;
            for ((key, role), got) in wave.into_iter().zip(fetched) {
                let b = got.map_err(|source| KeepError::Ring { key, source })?;
                self.receipt.bytes += b.bytes().len() as u64;
                let meta =
                    decode_meta(b.bytes()).map_err(|source| KeepError::Layout { key, source })?;
                for child in children(&meta, role) {
                    match child {
                        Reach::Data { key, len } => {
                            self.reach(BlockKind::Data, key, 0, len).await?;
                        }
                        Reach::Meta { key, role } => {
                            if self.reach(BlockKind::Meta, key, 0, 0).await? {
                                todo.push((key, role));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The roots of `fsid`, newest first, as far back as the chain is in the ring (or
/// `limit` versions), each with the key of the block that links it to the next newer.
async fn root_chain<T: Transport>(
    client: &Client<T>,
    fsid: Id,
    limit: u64,
) -> Result<Vec<(RootBlock, Option<Id>)>, KeepError> {
    let got = client
        .get_root(fsid)
        .await
        .map_err(|source| KeepError::Ring { key: fsid, source })?
        .ok_or(KeepError::NoSuchTree(fsid))?;
    let mut r = got.root().ok_or(KeepError::BadRoot(fsid))?;
    let mut chain = vec![(r.clone(), None)];
    while (chain.len() as u64) < limit {
        let Some(prev) = r.prev else { break };
        // An old version whose link block is gone ends the chain: nothing older is kept.
        let Ok(b) = client.get(BlockKind::Meta, prev).await else {
            break;
        };
        let p = previous_root(&r, b.bytes())
            .map_err(|source| KeepError::Chain { key: prev, source })?;
        chain.push((p.clone(), Some(prev)));
        r = p;
    }
    Ok(chain)
}

/// Renew (or with `dry_run`, only count) every block reachable from the chosen versions
/// of `fsid` for `lease` seconds. `progress` is called after each batch.
pub async fn keep<T: Transport>(
    client: &Client<T>,
    fsid: Id,
    versions: Versions,
    lease: u64,
    dry_run: bool,
    progress: &(dyn Fn(&KeepReceipt) + Sync),
) -> Result<KeepReceipt, KeepError> {
    let started = std::time::Instant::now();
    let limit = match versions {
        Versions::Last(n) if !dry_run => n.max(1),
        _ => u64::MAX,
    };
    let chain = root_chain(client, fsid, limit).await?;
    let kept = chain
        .iter()
        .enumerate()
        .take_while(|(i, (r, _))| match versions {
            Versions::Last(n) => (*i as u64) < n.max(1),
            Versions::Since(t) => *i == 0 || r.published_at >= t,
        })
        .count();
    let mut w = Walk::new(client, lease, dry_run, progress);
    for (i, (root, link)) in chain[..kept].iter().enumerate() {
        w.receipt.versions.push(root.version);
        if i == 0 {
            let len = root.encode().len() as u64;
            w.reach(BlockKind::Root, fsid, root.version, len).await?;
        }
        // The link that holds this old root, so the chain stays walkable to it.
        if let Some(link) = link {
            let len = root.encode().len() as u64;
            w.reach(BlockKind::Meta, *link, 0, len).await?;
        }
        w.tree(root.top).await?;
    }
    w.flush().await?;
    if dry_run {
        // What only older versions reach: walk them into a set of their own.
        let kept_seen = std::mem::take(&mut w.seen);
        let (blocks, bytes) = (w.receipt.blocks, w.receipt.bytes);
        for (root, link) in &chain[kept..] {
            w.receipt.old_versions.push(root.version);
            if let Some(link) = link {
                if !kept_seen.contains(&(BlockKind::Meta, *link)) {
                    w.reach(BlockKind::Meta, *link, 0, root.encode().len() as u64)
                        .await?;
                }
            }
            w.seen.extend(kept_seen.iter().copied());
            w.tree(root.top).await?;
        }
        w.receipt.old_only_blocks = w.receipt.blocks - blocks;
        w.receipt.old_only_bytes = w.receipt.bytes - bytes;
        w.receipt.blocks = blocks;
        w.receipt.bytes = bytes;
    }
    w.receipt.secs = started.elapsed().as_secs_f64();
    Ok(w.receipt)
}

/// Every block the newest version of `fsid` reaches (root, tree; not the chain), with
/// its version (roots) and length (data blocks; metadata as fetched): what a chaos run
/// counts replicas of.
pub async fn blocks_of<T: Transport>(
    client: &Client<T>,
    fsid: Id,
) -> Result<Vec<(BlockKind, Id, u64, u64)>, KeepError> {
    let (root, _) = root_chain(client, fsid, 1)
        .await?
        .pop()
        .expect("a chain has its newest root");
    let mut w = Walk::new(client, 0, true, &|_| {});
    w.found = Some(Vec::new());
    w.reach(
        BlockKind::Root,
        fsid,
        root.version,
        root.encode().len() as u64,
    )
    .await?;
    w.tree(root.top).await?;
    Ok(w.found.unwrap_or_default())
}

/// Parse `FSID:N` (keep the newest N versions of FSID) as `cfsd --keep` takes it.
pub fn parse_keep_spec(s: &str) -> Result<(Id, u64), String> {
    let (fsid, n) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: use FSID:VERSIONS, e.g. {}:3", "a".repeat(40)))?;
    let fsid = fsid
        .parse::<Id>()
        .map_err(|e| format!("{fsid:?} is not an FSID: {e}"))?;
    let n: u64 = n
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{n:?} is not a number of versions (1 or more)"))?;
    Ok((fsid, n))
}

/// Keep each of `specs` alive from a node: every `every`, renew their newest versions'
/// blocks for `lease` seconds. Failures are logged and retried next round.
pub async fn keep_loop<T: Transport>(
    client: Client<T>,
    specs: Vec<(Id, u64)>,
    lease: u64,
    every: std::time::Duration,
) {
    loop {
        for (fsid, n) in &specs {
            match keep(&client, *fsid, Versions::Last(*n), lease, false, &|_| {}).await {
                Ok(r) => {
                    tracing::info!(%fsid, versions = ?r.versions, blocks = r.blocks, renewed = r.renewed, under_replicated = r.under_replicated, "kept");
                }
                Err(e) => {
                    tracing::warn!(%fsid, error = %e, "keeping a tree failed; retrying next round")
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}
