//! Storing and leasing from the client: puts in batches per successor range, a window
//! of puts in flight per replica and stand-ins for slow ones, and the `Has`/`Renew`
//! rounds that say (and extend) what the replicas hold.

use super::*;

/// Successor ranges a batch puts to, or asks about, at once.
const RANGES_IN_FLIGHT: usize = 16;
/// A replica whose put window has had no room this long is slow: the copy goes to a
/// stand-in (`Client::put_chunk`). A 4 MiB window drains in 0.7 s at 50 Mbit/s.
const STANDIN_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Known vnodes looked at past a range's successor list for stand-ins.
const STANDIN_LOOKAHEAD: usize = 8;

/// Least time a replica gets to answer a `Has` of a batch (`Client::lease_group`).
const HAS_FLOOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Who may stand in for a slow replica of `set`: the rest of the successor list, on
/// hosts none of the set is on, in list order, at most two.
fn standins(set: &[NodeRef], succs: &[NodeRef]) -> Vec<NodeRef> {
    let mut out: Vec<NodeRef> = Vec::new();
    for n in succs {
        let taken = set.iter().chain(&out).any(|m| same_host(m.addr, n.addr));
        if !taken {
            out.push(*n);
        }
        if out.len() == 2 {
            break;
        }
    }
    out
}

/// Rounds of a put before a block no replica took is an error, and the pause before the
/// next (times the round's number).
const PUT_ATTEMPTS: u32 = 3;
const PUT_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(300);

/// Where one block's lease stands on its replicas after `lease_everywhere`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseState {
    /// Replicas asked (the replica set's size).
    pub replicas: usize,
    /// Replicas that hold it leased for the target (after renewal).
    pub leased: usize,
    /// Of those, replicas that renewed it now.
    pub renewed: usize,
    /// Replicas that do not hold it (or did not answer): maintenance repairs these.
    pub missing: usize,
    /// Replicas that hold it but would not lease it that long (quota, their maximum).
    pub short: usize,
    /// A replica's refusal, if any.
    pub refused: Option<String>,
}

impl LeaseState {
    fn add(&mut self, o: &LeaseState) {
        self.leased += o.leased;
        self.renewed += o.renewed;
        self.missing += o.missing;
        self.short += o.short;
        if self.refused.is_none() {
            self.refused.clone_from(&o.refused);
        }
    }
}

impl<T: Transport> Client<T> {
    /// For each item: do all r replicas hold it now (roots: at least that version),
    /// leased for about `self.lease`? Replicas holding it with a shorter lease are asked
    /// to renew it (no bytes sent), so a publish leases what it reuses.
    pub async fn has_everywhere(
        &self,
        items: &[(BlockKind, Id, u64)],
    ) -> Result<Vec<bool>, DhashError> {
        Ok(self
            .lease_everywhere(items, self.lease)
            .await?
            .iter()
            .map(|s| s.leased >= self.replicas)
            .collect())
    }

    /// How many replicas hold each item now (roots: at least that version), one `Has`
    /// per replica and successor range.
    pub async fn held_counts(
        &self,
        items: &[(BlockKind, Id, u64)],
    ) -> Result<Vec<usize>, DhashError> {
        // A lease of no time is held by every holder, so nothing is renewed.
        Ok(self
            .lease_everywhere(items, 0)
            .await?
            .into_iter()
            .map(|s| s.leased)
            .collect())
    }

    /// Lease every item on all its replicas for at least `lease` seconds: ask each
    /// replica set (one request per range and replica) what it holds, then renew only
    /// what is leased shorter. Items are grouped by successor range.
    pub async fn lease_everywhere(
        &self,
        items: &[(BlockKind, Id, u64)],
        lease: u64,
    ) -> Result<Vec<LeaseState>, DhashError> {
        let keys: Vec<Id> = items.iter().map(|x| x.1).collect();
        let mut out = vec![LeaseState::default(); items.len()];
        use futures_util::stream::{self, StreamExt};
        let groups = self.by_range(&keys, false).await?;
        // Ranges at once, as puts go (`RANGES_IN_FLIGHT`).
        let mut done = stream::iter(groups)
            .map(|g| async move {
                let states = self.lease_group(items, lease, &g.set, &g.keys).await;
                (g.set.len(), g.keys, states)
            })
            .buffer_unordered(RANGES_IN_FLIGHT);
        while let Some((replicas, group, per_replica)) = done.next().await {
            for states in per_replica {
                for (j, s) in states.into_iter().enumerate() {
                    out[group[j]].add(&s);
                }
            }
            for &g in &group {
                out[g].replicas = replicas;
            }
        }
        Ok(out)
    }

    /// What each replica in `set` holds of the items at `group`, renewing what is leased
    /// shorter than `lease`: one state list per replica.
    async fn lease_group(
        &self,
        items: &[(BlockKind, Id, u64)],
        lease: u64,
        set: &[NodeRef],
        group: &[usize],
    ) -> Vec<Vec<LeaseState>> {
        let asks: Vec<(BlockKind, Id)> = group.iter().map(|&g| (items[g].0, items[g].1)).collect();
        let calls = set.iter().map(|n| {
            let asks = asks.clone();
            let a = n.addr;
            async move {
                let mut states = vec![LeaseState::default(); group.len()];
                // A replica slow to answer (its link full, it hung) counts as not
                // holding: a publish puts those blocks again (routed around it if it
                // stays slow), a check reports them short. The RPC timeout would hold up
                // every batch behind it.
                let budget = self.net.budget(a, 4, HAS_FLOOR, false);
                let have = match tokio::time::timeout(budget, self.net.has(a, &asks)).await {
                    Ok(Ok(have)) => have,
                    Ok(Err(_)) => return states,
                    Err(_) => {
                        self.net.given_up(a, budget);
                        return states;
                    }
                };
                let mut short = Vec::new();
                for (j, h) in have.iter().enumerate() {
                    match h {
                        Some(h) if h.version >= items[group[j]].2 => {
                            if leased_enough(h.lease, lease, u64::MAX) {
                                states[j].leased += 1;
                            } else {
                                short.push(j);
                            }
                        }
                        _ => states[j].missing += 1,
                    }
                }
                let renew: Vec<(BlockKind, Id)> = short.iter().map(|&j| asks[j]).collect();
                if renew.is_empty() {
                    return states;
                }
                match self.net.renew(a, &renew, lease, false).await {
                    // A node's maximum is all it gives: capped counts as leased.
                    Ok((max, answers)) => {
                        for (&j, ans) in short.iter().zip(answers) {
                            match ans {
                                Ok(Some(l)) if leased_enough(l, lease, max) => {
                                    states[j].leased += 1;
                                    states[j].renewed += 1;
                                }
                                Ok(None) => states[j].missing += 1,
                                Ok(Some(_)) => states[j].short += 1,
                                Err(e) => {
                                    states[j].short += 1;
                                    states[j].refused = Some(e.to_string());
                                }
                            }
                        }
                    }
                    Err(_) => {
                        for &j in &short {
                            states[j].short += 1;
                        }
                    }
                }
                states
            }
        });
        crate::net::join_all(calls).await
    }

    /// Store many blocks: one PutMany per replica and range (split to fit a frame), all
    /// replicas in parallel. One receipt per block, in order; a refusal of any block is an
    /// error for the whole call. Blocks no replica took (every call failed: the ring is
    /// moving, a replica is stopping) are looked up afresh and sent again, a few times.
    pub async fn put_many(&self, blocks: &[Verified]) -> Result<Vec<PutReceipt>, DhashError> {
        let mut out = vec![
            PutReceipt {
                stored_on: 0,
                wanted: self.replicas,
                fresh: 0
            };
            blocks.len()
        ];
        let mut todo: Vec<usize> = (0..blocks.len()).collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let round = self.put_round(blocks, &todo, &mut out).await;
            todo.retain(|&g| out[g].stored_on == 0);
            match round {
                Ok(()) if todo.is_empty() => return Ok(out),
                // A lookup that found no live node (the one in front of a key just
                // stopped, and the ring has not yet stabilized past it) is as passing.
                Ok(()) | Err(DhashError::Lookup(_)) if attempt < PUT_ATTEMPTS => {
                    tracing::debug!(
                        blocks = todo.len(),
                        attempt,
                        "no replica took some blocks; again"
                    );
                    tokio::time::sleep(PUT_RETRY_PAUSE * attempt).await;
                }
                Ok(()) => {
                    return Err(DhashError::NotStored {
                        key: blocks[todo[0]].key(),
                        last: format!("no replica answered in {PUT_ATTEMPTS} attempts"),
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One round of [`Client::put_many`] for the blocks at `todo`, counted into `out`.
    /// Ranges go out at once (up to `RANGES_IN_FLIGHT`): over the wide area one after
    /// another would cost a round trip to the slowest replica of each.
    async fn put_round(
        &self,
        blocks: &[Verified],
        todo: &[usize],
        out: &mut [PutReceipt],
    ) -> Result<(), DhashError> {
        use futures_util::stream::{self, StreamExt};
        let keys: Vec<Id> = todo.iter().map(|&g| blocks[g].key()).collect();
        let mut jobs = Vec::new();
        for g in self.by_range(&keys, true).await? {
            let group: Vec<usize> = g.keys.into_iter().map(|i| todo[i]).collect();
            // The range's successor list, and past its end the vnodes this client knows:
            // a range learned from the tail of a list may hold no host beyond its set.
            let last = g.succs.last().map_or(keys[0], |n| n.id);
            let mut around = g.succs.clone();
            around.extend(self.ranges.after(last, 2 * STANDIN_LOOKAHEAD));
            let standins = standins(&g.set, &around);
            for chunk in crate::net::chunk_by_bytes(&group, |g| blocks[g].bytes().len()) {
                jobs.push((g.set.clone(), standins.clone(), chunk));
            }
        }
        let mut done = stream::iter(jobs)
            .map(|(set, standins, chunk)| self.put_chunk(blocks, set, standins, chunk))
            .buffer_unordered(RANGES_IN_FLIGHT);
        while let Some(stored) = done.next().await {
            for (g, fresh) in stored? {
                out[g].stored_on += 1;
                out[g].fresh += fresh;
            }
        }
        Ok(())
    }

    /// One `PutMany` of the blocks at `chunk` to every replica in `set`, in parallel:
    /// (block, whether the copy is new) for each copy stored. A replica that is slow
    /// (its window still full after `STANDIN_AFTER`) or does not answer is routed
    /// around: the copy goes to a stand-in with room, the next host of the successor
    /// list, whose maintenance hands it on to the replica later and then drops it
    /// (Dynamo's hinted handoff, with DHash's own repair doing the handing).
    async fn put_chunk(
        &self,
        blocks: &[Verified],
        set: Vec<NodeRef>,
        standins: Vec<NodeRef>,
        chunk: Vec<usize>,
    ) -> Result<Vec<(usize, usize)>, DhashError> {
        let wire: Vec<WireBlock> = chunk
            .iter()
            .map(|&g| WireBlock {
                kind: blocks[g].kind(),
                key: blocks[g].key(),
                bytes: blocks[g].bytes().to_vec(),
                lease: self.lease,
                source: None,
            })
            .collect();
        let bytes: usize = wire.iter().map(|b| b.bytes.len()).sum();
        let taken = Mutex::new(Vec::<SocketAddr>::new());
        // Built for each attempt (a copy of the blocks each), not once more per replica.
        let req = || Request::PutMany {
            blocks: wire.clone(),
            transfer: false,
        };
        let calls = set.iter().map(|n| {
            let (a, standins, taken) = (n.addr, &standins, &taken);
            async move {
                // The replica's window first, for up to STANDIN_AFTER.
                let mut last = Err(CallError::Timeout(STANDIN_AFTER));
                let mut cands: Vec<SocketAddr> = standins.iter().map(|s| s.addr).collect();
                // Its last call failed: routed around at once, and not waited for.
                let failed_last = self.net.failed_last(a);
                // Slow lately (its window shrank): not waited for either, but it may
                // still take the copy if it has room before a stand-in does.
                let tried = if failed_last || self.windows.slow(a) {
                    None
                } else {
                    tokio::time::timeout(STANDIN_AFTER, self.windows.room(a, bytes))
                        .await
                        .ok()
                };
                match tried {
                    Some(room) => match self.net.call(a, req()).await {
                        Err(e) if e.is_failure() => {
                            room.failed();
                            last = Err(e);
                        }
                        answered => {
                            room.answered();
                            return answered;
                        }
                    },
                    // Slow: it may still take the copy if it has room first (and a
                    // failed one too, when no stand-in is known).
                    None if !failed_last || cands.is_empty() => cands.push(a),
                    None => {}
                }
                // Routed around: the first of the stand-ins (one per replica of this
                // chunk) and the slow replica to have room takes the copy.
                while !cands.is_empty() {
                    let waits = cands
                        .iter()
                        .map(|&c| Box::pin(async move { (c, self.windows.room(c, bytes).await) }));
                    let ((to, room), _, _) = futures_util::future::select_all(waits).await;
                    cands.retain(|&c| c != to);
                    if to != a {
                        let mut t = taken.lock().unwrap();
                        if t.contains(&to) {
                            continue;
                        }
                        t.push(to);
                    }
                    tracing::debug!(replica = %a, to = %to, "put routed around a slow replica");
                    let r = self.net.call(to, req()).await;
                    match &r {
                        Err(e) if e.is_failure() => room.failed(),
                        Ok(Response::StoredMany(answers))
                            if to == a || answers.iter().all(|x| x.is_ok()) =>
                        {
                            room.answered();
                            return r;
                        }
                        // A refusal from the replica is its answer; from a stand-in, the
                        // next one is tried, and it is not the put's answer (a stand-in
                        // out of room must not fail a publish).
                        _ if to == a => {
                            room.answered();
                            return r;
                        }
                        _ => {
                            room.answered();
                            continue;
                        }
                    }
                    last = r;
                }
                last
            }
        });
        let mut stored = Vec::new();
        for res in crate::net::join_all(calls).await {
            match res {
                Ok(Response::StoredMany(answers)) if answers.len() == chunk.len() => {
                    for (&g, a) in chunk.iter().zip(answers) {
                        match a {
                            Ok(fresh) => stored.push((g, fresh as usize)),
                            Err(e) => {
                                return Err(DhashError::Refused {
                                    key: blocks[g].key(),
                                    why: e.to_string(),
                                })
                            }
                        }
                    }
                }
                Err(CallError::Remote(e)) => {
                    return Err(DhashError::Refused {
                        key: blocks[chunk[0]].key(),
                        why: e.to_string(),
                    })
                }
                // A replica that did not answer leaves its blocks short of r: the
                // receipt says so.
                _ => {}
            }
        }
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(ip: &str, vnode: u16) -> NodeRef {
        NodeRef::new(format!("{ip}:4000").parse().unwrap(), vnode)
    }

    #[test]
    fn stand_ins_are_the_next_hosts_the_replica_set_is_not_on() {
        let set = vec![n("198.18.0.2", 0), n("198.18.0.3", 0), n("198.18.0.4", 0)];
        let succs = vec![
            n("198.18.0.2", 0),
            n("198.18.0.3", 1),
            n("198.18.0.3", 0),
            n("198.18.0.4", 0),
            n("198.18.0.5", 2),
            n("198.18.0.5", 0),
            n("198.18.0.6", 0),
            n("198.18.0.7", 0),
        ];
        // Other vnodes of the set's hosts are passed over, and one host stands in once.
        assert_eq!(
            standins(&set, &succs),
            vec![n("198.18.0.5", 2), n("198.18.0.6", 0)]
        );
        assert!(standins(&set, &set).is_empty());
    }
}
