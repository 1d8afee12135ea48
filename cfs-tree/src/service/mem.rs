//! An in-memory [`BlockService`] for tests: one "replica", verification like a node
//! (content by hash, roots by signature and growing version), counters of puts.

use crate::service::{BlockService, PutReceipt, RingError};
use cfs_core::block::verify;
use cfs_core::{BlockKind, Id, Verified};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct MemRing {
    blocks: Mutex<HashMap<(BlockKind, Id), Verified>>,
    /// Puts received (all kinds).
    pub puts: AtomicU64,
    /// Gets received (all kinds), one per block asked, alone or in a batch.
    pub gets: AtomicU64,
    /// Batches received (`get_many` calls).
    pub batches: AtomicU64,
    /// While set, every get fails as if no replica answered (to test EIO paths).
    pub offline: AtomicBool,
    /// While set, every get hangs (to test deadlines).
    pub stall: AtomicBool,
    /// While set, every batch (`get_many`) hangs; single gets answer.
    pub stall_batches: AtomicBool,
    /// Every get takes this long (ms), as over a network.
    pub delay_ms: AtomicU64,
    /// While above zero, counts puts down; a put arriving at 1 fails, and every put
    /// after it (to simulate a publish interrupted midway).
    pub fail_puts_after: AtomicU64,
}

impl MemRing {
    pub fn new() -> MemRing {
        MemRing::default()
    }

    pub fn len(&self) -> usize {
        self.blocks.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, kind: BlockKind, key: Id) -> bool {
        self.blocks.lock().unwrap().contains_key(&(kind, key))
    }

    /// Remove a block (to simulate loss).
    pub fn remove(&self, kind: BlockKind, key: Id) -> bool {
        self.blocks.lock().unwrap().remove(&(kind, key)).is_some()
    }

    pub fn puts(&self) -> u64 {
        self.puts.load(Ordering::SeqCst)
    }
}

impl BlockService for MemRing {
    async fn get(&self, kind: BlockKind, key: Id) -> Result<Verified, RingError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        if self.stall.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        if self.offline.load(Ordering::SeqCst) {
            return Err(RingError::Unavailable { kind, key });
        }
        self.blocks
            .lock()
            .unwrap()
            .get(&(kind, key))
            .cloned()
            .ok_or(RingError::Unavailable { kind, key })
    }

    /// One exchange for the batch: one delay, one stall; absent blocks are None.
    async fn get_many(&self, items: Vec<(BlockKind, Id)>) -> Vec<Option<Verified>> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.gets.fetch_add(items.len() as u64, Ordering::SeqCst);
        if self.stall.load(Ordering::SeqCst) || self.stall_batches.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let offline = self.offline.load(Ordering::SeqCst);
        let m = self.blocks.lock().unwrap();
        items
            .iter()
            .map(|k| m.get(k).filter(|_| !offline).cloned())
            .collect()
    }

    async fn put(&self, block: Verified) -> Result<PutReceipt, RingError> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        let key = block.key();
        let budget = self.fail_puts_after.load(Ordering::SeqCst);
        if budget == 1 {
            return Err(RingError::Store {
                key,
                msg: "simulated failure".into(),
            });
        }
        if budget > 1 {
            self.fail_puts_after.fetch_sub(1, Ordering::SeqCst);
        }
        // Re-verify as a node would: the caller's Verified is not trusted blindly.
        let block =
            verify(block.kind(), key, block.into_bytes(), true).map_err(|e| RingError::Store {
                key,
                msg: e.to_string(),
            })?;
        let mut m = self.blocks.lock().unwrap();
        if block.kind() == BlockKind::Root {
            if let Some(old) = m.get(&(BlockKind::Root, key)) {
                if old.version() > block.version()
                    || (old.version() == block.version() && old.bytes() != block.bytes())
                {
                    return Err(RingError::Store {
                        key,
                        msg: format!(
                            "root version {} is not above {}",
                            block.version(),
                            old.version()
                        ),
                    });
                }
            }
        }
        m.insert((block.kind(), key), block);
        Ok(PutReceipt {
            stored_on: 1,
            wanted: 1,
        })
    }

    async fn has_everywhere(&self, items: Vec<(BlockKind, Id)>) -> Result<Vec<bool>, RingError> {
        let m = self.blocks.lock().unwrap();
        Ok(items.iter().map(|k| m.contains_key(k)).collect())
    }

    async fn get_root(&self, fsid: Id) -> Result<Option<Verified>, RingError> {
        if self.offline.load(Ordering::SeqCst) {
            return Err(RingError::Unreachable("offline".into()));
        }
        Ok(self
            .blocks
            .lock()
            .unwrap()
            .get(&(BlockKind::Root, fsid))
            .cloned())
    }
}
