//! Leases on a node: what a put or renewal is granted, renewals by key, what `Has`
//! reports, the capacity check, and the sweep that removes expired blocks. A lease only
//! grows (the store keeps the later end), is capped by the node's maximum whoever asks,
//! and an expired block is gone: not served, not reported, not pushed to replicas.

use crate::metrics::Metrics;
use crate::quota::{Charge, Quota, QuotaError};
use crate::state::{remote, Node};
use cfs_core::block::BlockKind;
use cfs_core::ring::source_bucket;
use cfs_core::wire::{ErrorKind, Holding, RemoteError};
use cfs_core::Id;
use cfs_net::transport::Transport;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Expired blocks the sweep removes per commit, and commits per round at most: the
/// sweep's work per round is bounded, whatever expired at once.
const SWEEP_BATCH: usize = 1024;
const SWEEP_BATCHES_PER_ROUND: usize = 16;

/// Bytes a batch of puts reserved under the node's capacity; given back when dropped
/// (the puts are stored, or failed, by then), so parallel batches cannot all pass one
/// check.
pub(crate) struct Room<'a> {
    incoming: &'a AtomicU64,
    taken: u64,
}

impl<'a> Room<'a> {
    pub(crate) fn new(incoming: &'a AtomicU64) -> Room<'a> {
        Room { incoming, taken: 0 }
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        self.incoming.fetch_sub(self.taken, Ordering::AcqRel);
    }
}

impl<T: Transport> Node<T> {
    /// The lease end a put or renewal asking `secs` seconds at `now` gets: between the
    /// node's shortest and longest lease.
    pub(crate) fn lease_until(&self, now: u64, secs: u64) -> u64 {
        let c = &self.inner.cfg;
        let secs = secs.clamp(c.min_lease.as_secs(), c.max_lease.as_secs().max(1));
        now.saturating_add(secs)
    }

    /// Charge `bucket` for storing `len` bytes from `now` until `until`, or the refusal
    /// to answer with (counted).
    pub(crate) fn charge(
        &self,
        bucket: &[u8],
        len: u64,
        now: u64,
        until: u64,
    ) -> Result<Charge, RemoteError> {
        self.inner
            .quota
            .reserve(bucket, Quota::cost(len as usize), now, until)
            .map_err(|e: QuotaError| {
                Metrics::inc(&self.inner.metrics.refused_quota);
                remote(ErrorKind::Quota, e.to_string())
            })
    }

    /// Take room for a put of `len` bytes under the store's capacity and its disk's
    /// reserve, or refuse it when either is reached and the block is new (`held()`
    /// false): a held block is only renewed by a put and takes no room.
    /// `space` is the store's `space()`, read once per batch.
    pub(crate) fn check_room(
        &self,
        room: &mut Room<'_>,
        len: u64,
        space: Option<(u64, u64)>,
        held: impl FnOnce() -> bool,
    ) -> Result<(), RemoteError> {
        let cap = self.inner.cfg.capacity_bytes;
        if cap == 0 && space.is_none() {
            return Ok(());
        }
        let used = self.inner.store.usage().1;
        let before = room.incoming.fetch_add(len, Ordering::AcqRel);
        let pending = before.saturating_add(len);
        let over_cap = cap > 0 && used.saturating_add(pending) > cap;
        let disk_full = space.is_some_and(|(free, total)| {
            let reserve = self.inner.cfg.disk_reserve_bytes.min(total / 10);
            free < reserve.saturating_add(pending)
        });
        if !over_cap && !disk_full {
            room.taken += len;
            return Ok(());
        }
        room.incoming.fetch_sub(len, Ordering::AcqRel);
        if held() {
            return Ok(());
        }
        Metrics::inc(&self.inner.metrics.refused_full);
        let why = if over_cap {
            format!("this node's store is full ({used} of {cap} bytes)")
        } else {
            "this node's disk is full (its free-space reserve is reached)".to_string()
        };
        Err(remote(
            ErrorKind::Full,
            format!(
                "{why}; it keeps serving what it holds: store elsewhere or wait for leases to end"
            ),
        ))
    }

    /// `Has`: each item's version and remaining lease, None if absent or expired.
    pub(crate) async fn holdings(
        &self,
        items: Vec<(BlockKind, Id)>,
    ) -> Result<Vec<Option<Holding>>, RemoteError> {
        let store = self.inner.store.clone();
        let now = self.now_unix();
        self.blocking(move || {
            items
                .iter()
                .map(|(k, id)| {
                    let h = store.held(*k, *id).ok().flatten()?;
                    // A root's bytes are hashed so the asker can tell a fork (roots are
                    // few and small).
                    let digest = match k {
                        BlockKind::Root => Some(Id::hash(&store.get(*k, *id).ok().flatten()?.0)),
                        _ => None,
                    };
                    (h.expires > now).then_some(Holding {
                        version: h.version,
                        lease: h.expires - now,
                        digest,
                    })
                })
                .collect()
        })
        .await
    }

    /// `Renew`: extend held blocks' leases to at least `secs` from now, charged to the
    /// caller's bucket for the time added only, whoever asks (a free renewal would let a
    /// neighbour keep any block forever). Answers per item: None if not held (or
    /// expired), else the seconds now leased.
    pub(crate) async fn renew(
        &self,
        peer: SocketAddr,
        items: Vec<(BlockKind, Id)>,
        secs: u64,
    ) -> Vec<Result<Option<u64>, RemoteError>> {
        let now = self.now_unix();
        let until = self.lease_until(now, secs);
        let bucket = self.inner.quota.bucket_for(&source_bucket(peer.ip()));
        let store = self.inner.store.clone();
        let keys = items.clone();
        let held = match self
            .blocking(move || {
                keys.iter()
                    .map(|(k, id)| store.held(*k, *id).ok().flatten())
                    .collect::<Vec<_>>()
            })
            .await
        {
            Ok(h) => h,
            Err(e) => return vec![Err(e); items.len()],
        };
        let mut answers: Vec<Option<Result<Option<u64>, RemoteError>>> = vec![None; items.len()];
        let mut todo = Vec::new();
        for (i, (item, h)) in items.iter().zip(held).enumerate() {
            let Some(h) = h.filter(|h| h.expires > now) else {
                answers[i] = Some(Ok(None));
                continue;
            };
            if h.expires >= until {
                // Already leased that long: nothing to write or charge.
                answers[i] = Some(Ok(Some(h.expires - now)));
                continue;
            }
            match self.charge(&bucket, h.len, now, until) {
                Ok(c) => todo.push((i, *item, c)),
                Err(e) => answers[i] = Some(Err(e)),
            }
        }
        if !todo.is_empty() {
            // Committed with the renewal itself (`BlockStore::renew` writes staged
            // charges), so a crash cannot keep a lease without its charge.
            self.inner
                .store
                .stage_charge(&bucket, self.inner.quota.encoded(&bucket));
        }
        let store = self.inner.store.clone();
        let keys: Vec<(BlockKind, Id)> = todo.iter().map(|t| t.1).collect();
        let renewed = self.blocking(move || store.renew(&keys, until)).await;
        let renewed = match renewed {
            Ok(Ok(rs)) => rs.into_iter().map(Ok).collect::<Vec<_>>(),
            Ok(Err(e)) => vec![Err(remote(ErrorKind::Storage, e.to_string())); todo.len()],
            Err(e) => vec![Err(e); todo.len()],
        };
        for ((i, _, charge), r) in todo.iter().zip(renewed) {
            answers[*i] = Some(match r {
                Ok(Some(r)) => {
                    self.inner
                        .quota
                        .settle(&bucket, *charge, Some(r.before), false);
                    Metrics::inc(&self.inner.metrics.leases_renewed);
                    Ok(Some(r.expires.saturating_sub(now)))
                }
                Ok(None) => {
                    self.inner.quota.refund(&bucket, *charge);
                    Ok(None)
                }
                Err(e) => {
                    self.inner.quota.refund(&bucket, *charge);
                    Err(e)
                }
            });
        }
        if !todo.is_empty() {
            self.inner
                .store
                .stage_charge(&bucket, self.inner.quota.encoded(&bucket));
        }
        answers.into_iter().map(|a| a.unwrap_or(Ok(None))).collect()
    }

    /// Remove blocks whose lease has ended, soonest first, a bounded amount per round.
    /// Returns the blocks removed.
    pub async fn sweep(&self) -> u64 {
        let m = &self.inner.metrics;
        let now = self.now_unix();
        let mut total = 0;
        for _ in 0..SWEEP_BATCHES_PER_ROUND {
            let store = self.inner.store.clone();
            let Ok(Ok(gone)) = self
                .blocking(move || store.remove_expired(now, SWEEP_BATCH))
                .await
            else {
                break;
            };
            Metrics::add(&m.expired_blocks, gone.len() as u64);
            Metrics::add(&m.expired_bytes, gone.iter().map(|g| g.2).sum());
            total += gone.len() as u64;
            if gone.len() < SWEEP_BATCH {
                break;
            }
        }
        if total > 0 {
            tracing::debug!(blocks = total, "sweep removed expired blocks");
        }
        total
    }
}
