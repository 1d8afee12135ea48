//! What the filesystem layer needs from the ring: [`BlockService`], implemented over the
//! network client ([`net::NetRing`]) and in memory for tests ([`mem::MemRing`]). Every
//! block handed out is verified.

pub mod mem;
pub mod net;

use cfs_core::{BlockKind, Id, Verified};
use std::future::Future;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// No replica returned a valid copy before the per-operation deadline.
    #[error("block {kind:?} {key} could not be read from any replica before the deadline")]
    Unavailable { kind: BlockKind, key: Id },
    /// A put was refused or could not reach enough replicas.
    #[error("storing block {key} failed: {msg}")]
    Store { key: Id, msg: String },
    #[error("ring unreachable: {0}")]
    Unreachable(String),
    /// The publisher's key signed two different roots of one version, and this reader
    /// has seen both: it does not switch silently from the one it saw.
    #[error("filesystem {fsid} has two different roots of version {version} (root bytes {seen} seen before, {offered} now): its key signed both; ask the publisher to publish a new version")]
    Fork {
        fsid: Id,
        version: u64,
        seen: Id,
        offered: Id,
    },
}

/// How many replicas acknowledged a put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutReceipt {
    pub stored_on: usize,
    pub wanted: usize,
}

pub trait BlockService: Send + Sync + 'static {
    /// A verified block, trying every replica until the deadline.
    fn get(
        &self,
        kind: BlockKind,
        key: Id,
    ) -> impl Future<Output = Result<Verified, RingError>> + Send;

    /// Many small blocks in few exchanges where the ring can batch them; None for each
    /// one it did not bring (the caller then uses `get`, which tries every replica).
    fn get_many(
        &self,
        items: Vec<(BlockKind, Id)>,
    ) -> impl Future<Output = Vec<Option<Verified>>> + Send {
        async move { items.iter().map(|_| None).collect() }
    }

    /// Store on all r replicas (or as many live nodes as exist, said in the receipt).
    fn put(&self, block: Verified) -> impl Future<Output = Result<PutReceipt, RingError>> + Send;

    /// Store many (small) blocks, batched per replica where the ring allows; one receipt
    /// per block, in order.
    fn put_many(
        &self,
        blocks: Vec<Verified>,
    ) -> impl Future<Output = Result<Vec<PutReceipt>, RingError>> + Send {
        async move {
            let mut out = Vec::with_capacity(blocks.len());
            for b in blocks {
                out.push(self.put(b).await?);
            }
            Ok(out)
        }
    }

    /// For each item: is it held by all r replicas right now (asked, not assumed).
    fn has_everywhere(
        &self,
        items: Vec<(BlockKind, Id)>,
    ) -> impl Future<Output = Result<Vec<bool>, RingError>> + Send;

    /// The winning valid root among its replicas (`Verified::rank`), if any has one.
    fn get_root(
        &self,
        fsid: Id,
    ) -> impl Future<Output = Result<Option<Verified>, RingError>> + Send;

    /// Every distinct root the replicas hold, as they hold it (no memory of earlier
    /// answers): a publisher checks with it that the version it put is the one that won.
    fn get_roots(&self, fsid: Id) -> impl Future<Output = Result<Vec<Verified>, RingError>> + Send {
        async move { Ok(self.get_root(fsid).await?.into_iter().collect()) }
    }
}
