//! [`BlockService`] over the network client, with the reader's rollback protection:
//! the highest root seen for each FSID is kept on disk, so no replica can roll it back.

use crate::service::{BlockService, PutReceipt, RingError};
use cfs_core::block::{verify, BlockKind, Verified};
use cfs_core::Id;
use cfs_net::client::Client;
use cfs_net::net::DhashError;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Holders of a root remembered per FSID: a replica set and as many more.
const MAX_SEEN_HOLDERS: usize = 8;

pub struct NetRing {
    pub client: Client,
    /// Where the highest root seen per FSID is remembered (None: not remembered).
    state_dir: Option<PathBuf>,
}

/// `$CFS_STATE_DIR`, else `$XDG_STATE_HOME/cfs`, else `~/.local/state/cfs`.
pub fn default_state_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("CFS_STATE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return Some(PathBuf::from(d).join("cfs"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/cfs"))
}

fn ring_err(kind: BlockKind, key: Id, e: DhashError) -> RingError {
    match e {
        DhashError::Unavailable { .. } => RingError::Unavailable { kind, key },
        DhashError::Lookup(e) => RingError::Unreachable(e.to_string()),
        DhashError::Refused { why, .. } => RingError::Store { key, msg: why },
        DhashError::NotStored { last, .. } => RingError::Store { key, msg: last },
    }
}

impl NetRing {
    pub fn new(client: Client, state_dir: Option<PathBuf>) -> NetRing {
        NetRing { client, state_dir }
    }

    fn root_path(&self, fsid: Id) -> Option<PathBuf> {
        self.state_dir
            .as_ref()
            .map(|d| d.join("roots").join(fsid.to_hex()))
    }

    /// The remembered root, verified again (the disk is not trusted either).
    fn remembered(&self, fsid: Id) -> Option<Verified> {
        let bytes = std::fs::read(self.root_path(fsid)?).ok()?;
        verify(BlockKind::Root, fsid, bytes, false).ok()
    }

    /// The holders that gave the best root last time (at most `MAX_SEEN_HOLDERS`).
    fn seen_holders(&self, fsid: Id) -> Vec<SocketAddr> {
        let Some(p) = self.root_path(fsid) else {
            return Vec::new();
        };
        let text = std::fs::read_to_string(p.with_extension("holders")).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.trim().parse().ok())
            .take(MAX_SEEN_HOLDERS)
            .collect()
    }

    fn remember_holders(&self, fsid: Id, holders: &[SocketAddr]) {
        let Some(p) = self.root_path(fsid) else {
            return;
        };
        if holders.is_empty() || self.seen_holders(fsid) == holders {
            return;
        }
        let text: String = holders
            .iter()
            .take(MAX_SEEN_HOLDERS)
            .map(|a| format!("{a}\n"))
            .collect();
        let (p, tmp) = (p.with_extension("holders"), p.with_extension("holders.tmp"));
        let ok = std::fs::create_dir_all(p.parent().unwrap())
            .and_then(|_| std::fs::write(&tmp, text))
            .and_then(|_| std::fs::rename(&tmp, &p));
        if let Err(e) = ok {
            tracing::debug!(error = %e, path = %p.display(), "cannot remember the root's holders");
        }
    }

    fn remember(&self, v: &Verified) {
        let Some(p) = self.root_path(v.key()) else {
            return;
        };
        let tmp = p.with_extension("tmp");
        let ok = std::fs::create_dir_all(p.parent().unwrap())
            .and_then(|_| std::fs::write(&tmp, v.bytes()))
            .and_then(|_| std::fs::rename(&tmp, &p));
        if let Err(e) = ok {
            tracing::warn!(error = %e, path = %p.display(), "cannot remember the root version");
        }
    }
}

impl BlockService for NetRing {
    async fn get(&self, kind: BlockKind, key: Id) -> Result<Verified, RingError> {
        self.client.get(kind, key).await.map_err(|e| {
            tracing::warn!(?kind, %key, error = %e, "block unreadable");
            ring_err(kind, key, e)
        })
    }

    async fn get_many(&self, items: Vec<(BlockKind, Id)>) -> Vec<Option<Verified>> {
        self.client.get_many(&items).await
    }

    async fn put(&self, block: Verified) -> Result<PutReceipt, RingError> {
        let (kind, key) = (block.kind(), block.key());
        let r = self
            .client
            .put(&block)
            .await
            .map_err(|e| ring_err(kind, key, e))?;
        if kind == BlockKind::Root {
            self.remember(&block);
        }
        Ok(PutReceipt {
            stored_on: r.stored_on,
            wanted: r.wanted,
        })
    }

    async fn put_many(&self, blocks: Vec<Verified>) -> Result<Vec<PutReceipt>, RingError> {
        let Some(first) = blocks.first() else {
            return Ok(Vec::new());
        };
        let (kind, key) = (first.kind(), first.key());
        let rs = self
            .client
            .put_many(&blocks)
            .await
            .map_err(|e| ring_err(kind, key, e))?;
        Ok(rs
            .into_iter()
            .map(|r| PutReceipt {
                stored_on: r.stored_on,
                wanted: r.wanted,
            })
            .collect())
    }

    async fn has_everywhere(&self, items: Vec<(BlockKind, Id)>) -> Result<Vec<bool>, RingError> {
        let with_versions: Vec<(BlockKind, Id, u64)> =
            items.iter().map(|(k, id)| (*k, *id, 0)).collect();
        self.client
            .has_everywhere(&with_versions)
            .await
            .map_err(|e| RingError::Unreachable(e.to_string()))
    }

    async fn get_roots(&self, fsid: Id) -> Result<Vec<Verified>, RingError> {
        self.client
            .get_roots(fsid)
            .await
            .map_err(|e| ring_err(BlockKind::Root, fsid, e))
    }

    async fn get_root(&self, fsid: Id) -> Result<Option<Verified>, RingError> {
        // Nodes that joined since the last sighting do not alone decide the newest root:
        // the holders seen then are asked too.
        let from_ring = self
            .client
            .get_roots_also(fsid, &self.seen_holders(fsid))
            .await
            .map(|(roots, by)| {
                self.remember_holders(fsid, &by);
                roots.into_iter().max_by_key(Verified::rank)
            });
        let seen = self.remembered(fsid);
        let best = match (from_ring, seen) {
            // The other side of a fork of a version seen before: an error naming both.
            (Ok(Some(r)), Some(s)) if s.version() == r.version() && s.bytes() != r.bytes() => {
                return Err(RingError::Fork {
                    fsid,
                    version: r.version(),
                    seen: Id::hash(s.bytes()),
                    offered: Id::hash(r.bytes()),
                });
            }
            (Ok(Some(r)), Some(s)) if s.version() > r.version() => {
                tracing::warn!(%fsid, ring = r.version(), seen = s.version(), "the ring offers an older root than seen before; keeping the newer");
                Some(s)
            }
            (Ok(r), s) => r.or(s),
            (Err(e), Some(s)) => {
                tracing::warn!(%fsid, error = %e, "root unreachable; using the last one seen");
                Some(s)
            }
            (Err(e), None) => return Err(ring_err(BlockKind::Root, fsid, e)),
        };
        if let Some(b) = &best {
            if self
                .remembered(fsid)
                .is_none_or(|s| s.version() < b.version())
            {
                self.remember(b);
            }
        }
        Ok(best)
    }
}
