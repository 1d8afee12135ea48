//! Leases on a node: what a put or renewal is granted, renewals by key, what `Has`
//! reports, the capacity check, and the sweep that removes expired blocks. A lease only
//! grows (the store keeps the later end), is capped by the node's maximum whoever asks,
//! and an expired block is gone: not served, not reported, not pushed to replicas.

use crate::metrics::Metrics;
use crate::node::{remote, Node};
use crate::quota::{Charge, Quota, QuotaError};
use crate::transport::Transport;
use cfs_core::block::BlockKind;
use cfs_core::ring::source_bucket;
use cfs_core::wire::{ErrorKind, Holding, RemoteError};
use cfs_core::Id;
use std::net::SocketAddr;

/// Expired blocks the sweep removes per commit, and commits per round at most: the
/// sweep's work per round is bounded, whatever expired at once.
const SWEEP_BATCH: usize = 1024;
const SWEEP_BATCHES_PER_ROUND: usize = 16;

impl<T: Transport> Node<T> {
    /// The lease end a put or renewal asking `secs` seconds at `now` gets.
    pub(crate) fn lease_until(&self, now: u64, secs: u64) -> u64 {
        now.saturating_add(secs.min(self.inner.cfg.max_lease.as_secs()))
    }

    /// Refuse a block that is new to this node when the store is at its capacity
    /// (`incoming` counts this batch's bytes so far). A block already held may always be
    /// renewed by a put: it takes no room.
    pub(crate) fn check_room(
        &self,
        kind: BlockKind,
        key: Id,
        len: u64,
        incoming: &mut u64,
    ) -> Result<(), RemoteError> {
        let cap = self.inner.cfg.capacity_bytes;
        if cap == 0 {
            return Ok(());
        }
        let used = self.inner.store.usage().1;
        if used.saturating_add(*incoming).saturating_add(len) <= cap {
            *incoming += len;
            return Ok(());
        }
        if matches!(self.inner.store.held(kind, key), Ok(Some(_))) {
            return Ok(());
        }
        Metrics::inc(&self.inner.metrics.refused_full);
        Err(remote(
            ErrorKind::Full,
            format!(
                "this node's store is full ({used} of {cap} bytes); it keeps serving what it holds, store elsewhere or wait for leases to end"
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
                    (h.expires > now).then_some(Holding {
                        version: h.version,
                        lease: h.expires - now,
                    })
                })
                .collect()
        })
        .await
    }

    /// `Renew`: extend held blocks' leases to at least `secs` from now, charged to the
    /// caller's bucket for the time added only (free for a checked neighbour's transfer).
    /// Answers per item: None if not held (or expired), else the seconds now leased.
    pub(crate) async fn renew(
        &self,
        peer: SocketAddr,
        items: Vec<(BlockKind, Id)>,
        secs: u64,
        transfer: bool,
    ) -> Vec<Result<Option<u64>, RemoteError>> {
        let m = &self.inner.metrics;
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
            let charge = if transfer && self.free_transfer(peer.ip(), item.1) {
                Charge::FREE
            } else {
                match self
                    .inner
                    .quota
                    .reserve(&bucket, Quota::cost(h.len as usize), now, until)
                {
                    Ok(c) => c,
                    Err(e @ QuotaError::Exceeded { .. }) => {
                        Metrics::inc(&m.refused_quota);
                        answers[i] = Some(Err(remote(ErrorKind::Quota, e.to_string())));
                        continue;
                    }
                }
            };
            todo.push((i, *item, charge));
        }
        let store = self.inner.store.clone();
        let keys: Vec<(BlockKind, Id)> = todo.iter().map(|t| t.1).collect();
        let renewed = self.blocking(move || store.renew(&keys, until)).await;
        let mut charged = false;
        match renewed {
            Ok(Ok(rs)) => {
                for ((i, _, charge), r) in todo.into_iter().zip(rs) {
                    charged |= !charge.is_free();
                    match r {
                        Some(r) => {
                            self.inner
                                .quota
                                .settle(&bucket, charge, Some(r.before), false);
                            Metrics::inc(&m.leases_renewed);
                            answers[i] = Some(Ok(Some(r.expires.saturating_sub(now))));
                        }
                        None => {
                            self.inner.quota.refund(&bucket, charge);
                            answers[i] = Some(Ok(None));
                        }
                    }
                }
            }
            Ok(Err(e)) => {
                for (i, _, charge) in todo {
                    self.inner.quota.refund(&bucket, charge);
                    answers[i] = Some(Err(remote(ErrorKind::Storage, e.to_string())));
                }
            }
            Err(e) => {
                for (i, _, charge) in todo {
                    self.inner.quota.refund(&bucket, charge);
                    answers[i] = Some(Err(e.clone()));
                }
            }
        }
        if charged {
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
