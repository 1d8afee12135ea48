//! DHash maintenance on a node: replicas pushed to where they are missing, copies handed
//! off only under the rules in `maintain`, and the scrub that re-verifies stored blocks.
//! Both walk the store in bounded chunks, never a list of every key.

use crate::metrics::Metrics;
use crate::state::Node;
use crate::store::StoreKey;
use cfs_core::block::{verify, BlockKind};
use cfs_core::ring::{replica_set, run_in_range, same_host};
use cfs_core::wire::{leased_enough, Request, Response, WireBlock};
use cfs_core::{Id, NodeRef};
use cfs_net::net::Batcher;
use cfs_net::transport::Transport;
use std::collections::BTreeMap;

/// A held block as maintenance walks it: kind, key, version, lease end.
type Entry = (BlockKind, Id, u64, u64);

/// Keys read from the store at a time by maintenance and the scrub.
const CHUNK: usize = 4096;

impl<T: Transport> Node<T> {
    /// Re-verify stored blocks (with collision detection), resuming where the last round
    /// stopped, `scrub_bytes` a round. A block that no longer matches its key (bit rot, a
    /// tampered file) is dropped; maintenance then restores it from the other replicas.
    pub async fn scrub(&self) {
        let mut cursor = *self.inner.scrub_cursor.lock().unwrap();
        let total = self.inner.store.usage().0;
        let (mut checked, mut visited) = (0u64, 0u64);
        while checked < self.inner.cfg.scrub_bytes && visited < total {
            let Ok(chunk) = self.inner.store.list_after(cursor, 256) else {
                return;
            };
            if chunk.is_empty() {
                if cursor.is_none() {
                    break;
                }
                cursor = None; // wrap around
                continue;
            }
            for (kind, key, held) in chunk {
                let ver = held.version;
                if checked >= self.inner.cfg.scrub_bytes {
                    break;
                }
                cursor = Some((kind, key));
                visited += 1;
                let store = self.inner.store.clone();
                let bad = self
                    .blocking(move || match store.get(kind, key) {
                        Ok(Some((b, _))) => {
                            let n = b.len() as u64;
                            (n, verify(kind, key, b, true).is_err())
                        }
                        _ => (0, false),
                    })
                    .await;
                let Ok((n, bad)) = bad else { continue };
                checked += n.max(1);
                Metrics::inc(&self.inner.metrics.scrubbed);
                if bad {
                    tracing::warn!(?kind, %key, "scrub found a corrupt block; dropping it for repair");
                    Metrics::inc(&self.inner.metrics.scrub_corrupt);
                    let _ = self.inner.store.remove_if(kind, key, ver);
                }
            }
        }
        *self.inner.scrub_cursor.lock().unwrap() = cursor;
    }

    /// DHash maintenance: every holder pushes each block to the replicas of its key that
    /// lack it (asked in batches, so nothing they hold is resent). A holder outside the
    /// replica set drops its copy only when (a) its own view of the ring puts it outside
    /// (`outside_by_own_view`), (b) every replica is a distinct host that said it holds
    /// the block and, when the grace period starts and again when it ends, served us
    /// verified bytes, and (c) that held for `handoff_rounds` rounds in a row. Never on a
    /// peer's word alone.
    pub async fn maintain(&self) {
        // Expired blocks go first, so nothing below pushes or counts them.
        self.sweep().await;
        self.inner.handoffs.lock().unwrap().begin_round();
        let mut cursor: Option<StoreKey> = None;
        let mut below_r = 0;
        loop {
            let Ok(chunk) = self.inner.store.list_after(cursor, CHUNK) else {
                return;
            };
            let Some(last) = chunk.last() else { break };
            cursor = Some((last.0, last.1));
            let now = self.now_unix();
            let live: Vec<Entry> = chunk
                .into_iter()
                .filter(|(_, _, h)| h.expires > now)
                .map(|(kind, key, h)| (kind, key, h.version, h.expires))
                .collect();
            if !live.is_empty() {
                below_r += self.maintain_chunk(&live).await;
            }
        }
        self.inner
            .below_r
            .store(below_r, std::sync::atomic::Ordering::Relaxed);
        self.inner.handoffs.lock().unwrap().end_round();
        Metrics::inc(&self.inner.metrics.maintain_rounds);
    }

    /// Repair, sync and hand off one chunk of held blocks; returns how many of them this
    /// node counts as below r (found on fewer than r replicas before the repair, this
    /// node a replica and their first holder in replica order).
    async fn maintain_chunk(&self, list: &[Entry]) -> u64 {
        let r = self.inner.cfg.replicas;
        let me = self.inner.cfg.addr;
        let mut below_r = 0;
        let mut i = 0;
        while i < list.len() {
            let key = list[i].1;
            let Ok(l) = self.lookup_from(0, key, None).await else {
                i += 1;
                continue;
            };
            // All held keys in (from, succs[0]] share this replica set.
            let run = run_in_range(list[i..].iter().map(|x| x.1), l.from, l.succs[0].id);
            if run == 0 {
                // The answer did not cover the key (the ring is moving): skip it this round.
                i += 1;
                continue;
            }
            let group = &list[i..i + run];
            i += run;
            let set = self.inner.net.replicas(&l.succs, r).await;
            // Every holder pushes, not only the first replica: the first may be the one
            // that lost the block (a scrub dropped it, a disk was replaced).
            let inside = set.iter().any(|n| n.addr == me);
            let items: Vec<(BlockKind, Id)> = group.iter().map(|e| (e.0, e.1)).collect();
            // Our roots' digests: a replica holding the other side of a fork of the same
            // version is behind when ours wins (`Holding::covers`).
            let digests: Vec<Option<Id>> = group
                .iter()
                .map(|&(kind, key, _, _)| {
                    (kind == BlockKind::Root)
                        .then(|| self.inner.store.get(kind, key).ok().flatten())
                        .flatten()
                        .map(|(bytes, _)| Id::hash(&bytes))
                })
                .collect();
            let mut confirmed = vec![0usize; group.len()];
            // Per block: replicas holding it before any push, and the first of them.
            let my_index = set.iter().position(|n| n.addr == me);
            let mut holders = vec![usize::from(inside); group.len()];
            let mut first = vec![my_index; group.len()];
            for (t, target) in set.iter().enumerate().filter(|(_, n)| n.addr != me) {
                let Ok(have) = self.inner.net.has(target.addr, &items).await else {
                    continue;
                };
                for (j, &(_, _, ver, _)) in group.iter().enumerate() {
                    if have
                        .get(j)
                        .copied()
                        .flatten()
                        .is_some_and(|h| h.covers(ver, digests[j]))
                    {
                        holders[j] += 1;
                        first[j] = Some(first[j].map_or(t, |f| f.min(t)));
                    }
                }
                let now = self.now_unix();
                let mut missing = Vec::new();
                let mut short = Vec::new();
                for (j, &(_, _, ver, expires)) in group.iter().enumerate() {
                    let ours = expires.saturating_sub(now);
                    match have.get(j).copied().flatten() {
                        Some(h) if h.covers(ver, digests[j]) => {
                            // A replica whose lease is short of ours (it missed a renewal)
                            // is extended to ours: the lease travels with the block, and a
                            // hand-off shortens it by at most `leased_enough`'s 1/64.
                            if leased_enough(h.lease, ours, u64::MAX) {
                                confirmed[j] += 1;
                            } else {
                                short.push(j);
                            }
                        }
                        _ => missing.push(j),
                    }
                }
                self.sync_leases(*target, group, &short, &mut confirmed)
                    .await;
                // Push what the replica lacks, batched: one request and commit per frame's
                // worth, read from the store batch by batch (never the whole group at once).
                let mut batch = Batcher::default();
                for j in missing {
                    let (kind, key, _, _) = group[j];
                    let Ok(Some((bytes, expires))) = self.inner.store.get(kind, key) else {
                        continue;
                    };
                    let lease = expires.saturating_sub(self.now_unix());
                    if lease == 0 {
                        continue;
                    }
                    let size = bytes.len();
                    // Charged there to whoever paid for our copy, if we remember.
                    let b = WireBlock {
                        kind,
                        key,
                        bytes,
                        lease,
                        source: self.inner.quota.payer(kind, key),
                    };
                    if let Some(full) = batch.push((j, b), size) {
                        self.push_batch(*target, full, &mut confirmed).await;
                    }
                }
                if let Some(last) = batch.finish() {
                    self.push_batch(*target, last, &mut confirmed).await;
                }
            }
            // Only a replica counts, and only the first holder among the replicas, so
            // each block is counted once. A block that only nodes outside its replica
            // set hold is pushed to the set this round and counted by it after.
            if my_index.is_some() {
                below_r += (0..group.len())
                    .filter(|&j| holders[j] < r && first[j] == my_index)
                    .count() as u64;
            }
            if inside || set.len() < r {
                continue;
            }
            self.hand_off(group, &set, &confirmed).await;
        }
        below_r
    }

    /// Push one batch of blocks (with their index in the group) to `target` as a ring
    /// transfer; count each one it stored in `confirmed`.
    async fn push_batch(
        &self,
        target: NodeRef,
        batch: Vec<(usize, WireBlock)>,
        confirmed: &mut [usize],
    ) {
        let (sent, blocks): (Vec<usize>, Vec<WireBlock>) = batch.into_iter().unzip();
        let req = Request::PutMany {
            blocks,
            transfer: true,
        };
        if let Ok(Response::StoredMany(answers)) = self.inner.net.call(target.addr, req).await {
            for (j, a) in sent.iter().zip(answers) {
                if a.is_ok() {
                    Metrics::inc(&self.inner.metrics.repairs_sent);
                    confirmed[*j] += 1;
                }
            }
        }
    }

    /// Extend `target`'s leases of `group[short]` to ours, grouped by the lease to ask
    /// (rounded down by 1/128, within `leased_enough`'s slack, so a round sends few
    /// requests); count each one renewed in `confirmed`.
    async fn sync_leases(
        &self,
        target: NodeRef,
        group: &[Entry],
        short: &[usize],
        confirmed: &mut [usize],
    ) {
        let now = self.now_unix();
        let mut by_lease: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for &j in short {
            let ours = group[j].3.saturating_sub(now);
            let ask = ours - ours % (ours / 128).max(1);
            by_lease.entry(ask).or_default().push(j);
        }
        for (ask, js) in by_lease {
            let items: Vec<(BlockKind, Id)> =
                js.iter().map(|&j| (group[j].0, group[j].1)).collect();
            let Ok((max, answers)) = self.inner.net.renew(target.addr, &items, ask, true).await
            else {
                continue;
            };
            for (&j, a) in js.iter().zip(answers) {
                let ours = group[j].3.saturating_sub(now);
                if matches!(a, Ok(Some(l)) if leased_enough(l, ours, max)) {
                    Metrics::inc(&self.inner.metrics.leases_synced);
                    confirmed[j] += 1;
                }
            }
        }
    }

    /// Drop the copies of `group` that the rules of `maintain` allow.
    async fn hand_off(&self, group: &[Entry], set: &[NodeRef], confirmed: &[usize]) {
        let m = &self.inner.metrics;
        let r = self.inner.cfg.replicas;
        if !self.outside_by_own_view(group[0].1, set) {
            tracing::debug!(key = %group[0].1, ?set, "hand-off deferred: our own view disagrees");
            Metrics::add(&m.drops_deferred, group.len() as u64);
            return;
        }
        let rounds = self.inner.handoffs.lock().unwrap().touch(set);
        let wanted = self.inner.cfg.handoff_rounds.max(1);
        let (first, last) = (rounds == 1, rounds >= wanted);
        if !(first || last) {
            Metrics::add(&m.drops_deferred, group.len() as u64);
            return;
        }
        for (j, &(kind, key, ver, _)) in group.iter().enumerate() {
            let ok = confirmed[j] >= r && self.held_by_all(set, kind, key, ver).await;
            if !ok {
                tracing::debug!(%key, ?set, "hand-off deferred: a holder did not serve verified bytes");
                // One holder that does not serve what it claims restarts the clock for
                // the whole set.
                self.inner.handoffs.lock().unwrap().reset(set);
                Metrics::add(&m.drops_deferred, (group.len() - j) as u64);
                return;
            }
            if last {
                let store = self.inner.store.clone();
                let _ = self.blocking(move || store.remove_if(kind, key, ver)).await;
                Metrics::inc(&m.handoffs_dropped);
            } else {
                Metrics::inc(&m.drops_deferred);
            }
        }
    }

    /// Does this node's own view of the ring put it outside the replicas of `key`? Every
    /// member of `set` must be a host other than this one; those between the key and the
    /// vnode of ours that follows it must not lie beyond that vnode's own predecessor (a
    /// set that claims nodes between our checked predecessor and us contradicts what we
    /// know, so nothing is dropped on it); those beyond us are there only if the spread
    /// over networks and prefixes passes us over.
    fn outside_by_own_view(&self, key: Id, set: &[NodeRef]) -> bool {
        let me = self.inner.cfg.addr;
        let Some((mine, pred)) = self
            .inner
            .vnodes
            .iter()
            .map(|v| {
                let v = v.lock().unwrap();
                (v.me, v.pred)
            })
            .min_by(|a, b| {
                key.distance_frac(a.0.id)
                    .total_cmp(&key.distance_frac(b.0.id))
            })
        else {
            return false;
        };
        let Some(pred) = pred else { return false };
        let to_me = key.distance_frac(mine.id);
        let to_pred = key.distance_frac(pred.id);
        if to_pred >= to_me || set.iter().any(|n| same_host(n.addr, me)) {
            return false;
        }
        // Members before us must lie before our checked predecessor. One beyond us is
        // possible only because the set spreads over networks and prefixes: then the set
        // with us in our place must still leave us out.
        let (before, after): (Vec<NodeRef>, Vec<NodeRef>) =
            set.iter().partition(|n| key.distance_frac(n.id) < to_me);
        if before.iter().any(|n| key.distance_frac(n.id) > to_pred) {
            return false;
        }
        after.is_empty() || {
            let mut with_me = before;
            with_me.push(mine);
            with_me.extend(after);
            !replica_set(&with_me, self.inner.cfg.replicas).contains(&mine)
        }
    }

    /// Before a holder outside the replica set drops its copy, every replica must hand the
    /// block over and it must verify (at least the version we hold, for roots): never on a
    /// peer's word alone that it has it.
    async fn held_by_all(&self, set: &[NodeRef], kind: BlockKind, key: Id, version: u64) -> bool {
        for n in set {
            let ok = match self
                .inner
                .net
                .call(n.addr, Request::Get { kind, key })
                .await
            {
                Ok(Response::Block(Some(bytes))) => {
                    verify(kind, key, bytes, false).is_ok_and(|v| v.version() >= version)
                }
                _ => false,
            };
            if !ok {
                return false;
            }
        }
        true
    }
}
