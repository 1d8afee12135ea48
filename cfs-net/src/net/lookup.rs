//! Iterative lookups with server selection: the next hop by progress and round trip,
//! suspects and silent peers last, hops given up past their budget or silence, and
//! answers checked before they are believed (`cfs_core::ring::check_done`).

use super::{Lookup, LookupError, Net, CLOSER_COUNT, MAX_HOPS};
use crate::hedge::HOP_FLOOR;
use crate::transport::Transport;
use cfs_core::block::{verify, BlockKind};
use cfs_core::id::MAX_VNODES;
use cfs_core::wire::{Request, Response, Step, MAX_REFS};
use cfs_core::{Id, NodeRef};
use std::collections::BTreeSet;
use std::net::SocketAddr;

impl<T: Transport> Net<T> {
    /// Iterative lookup of `key`, starting from `start` (closest first). The caller asks
    /// each hop; on a failed hop it falls back to the next candidate.
    pub async fn lookup(
        &self,
        start: Vec<NodeRef>,
        key: Id,
        want: Option<BlockKind>,
    ) -> Result<Lookup, LookupError> {
        self.lookup_avoiding(start, key, want, &BTreeSet::new())
            .await
    }

    /// A lookup that never asks the processes in `avoid`: after an answer led nowhere
    /// (every node it named failed to serve the block), the next lookup routes around
    /// its source, all of that process's vnodes alike.
    pub async fn lookup_avoiding(
        &self,
        start: Vec<NodeRef>,
        key: Id,
        want: Option<BlockKind>,
        avoid: &BTreeSet<SocketAddr>,
    ) -> Result<Lookup, LookupError> {
        tokio::time::timeout(self.timeouts.op, self.lookup_inner(start, key, want, avoid))
            .await
            .unwrap_or(Err(LookupError::Deadline(key, self.timeouts.op)))
    }

    async fn lookup_inner(
        &self,
        start: Vec<NodeRef>,
        key: Id,
        want: Option<BlockKind>,
        avoid: &BTreeSet<SocketAddr>,
    ) -> Result<Lookup, LookupError> {
        let mut failed: BTreeSet<(SocketAddr, u16)> = BTreeSet::new();
        let mut path = Vec::new();
        let mut hops = 0u32;
        // Stack of candidate lists, newest on top; fall back to older lists on failures.
        let mut stack: Vec<Vec<NodeRef>> = vec![start];
        let mut n_est = self.n_est.load(std::sync::atomic::Ordering::Relaxed);
        let mut last = String::from("no candidates");
        let mut asked: BTreeSet<(SocketAddr, u16)> = BTreeSet::new();
        // Hops count answered RPCs to other nodes; attempts also count the ones that
        // failed, which cost a timeout each, so both are capped.
        let mut attempts = 0u32;
        loop {
            if hops > MAX_HOPS || attempts > 3 * MAX_HOPS {
                return Err(LookupError::TooManyHops(key));
            }
            let Some(top) = stack.last_mut() else {
                return Err(LookupError::NoRoute { key, last });
            };
            top.retain(|n| {
                !failed.contains(&(n.addr, n.vnode))
                    && !asked.contains(&(n.addr, n.vnode))
                    && !avoid.contains(&n.addr)
            });
            if top.is_empty() {
                stack.pop();
                continue;
            }
            // Only suspects on top, and a candidate in good standing further down: try
            // that first (the suspects stay, last).
            let shaky = |n: &NodeRef| self.peers.suspect(n.addr) || self.silent(n.addr);
            if top.iter().all(shaky) {
                let sound = stack.iter().rev().skip(1).position(|l| {
                    l.iter().any(|n| {
                        !shaky(n)
                            && !failed.contains(&(n.addr, n.vnode))
                            && !asked.contains(&(n.addr, n.vnode))
                            && !avoid.contains(&n.addr)
                    })
                });
                if sound.is_some() {
                    let t = stack.pop().expect("top");
                    stack.insert(0, t);
                    continue;
                }
            }
            let top = stack.last_mut().expect("top");
            let i = self.pick(top, key, n_est);
            let node = top.remove(i);
            asked.insert((node.addr, node.vnode));
            path.push(node);
            let req = Request::FindStep {
                vnode: node.vnode,
                key,
                want,
            };
            attempts += 1;
            // A hop that has not answered within twice its hedging delay is given up on
            // (and counted slow), and the lookup goes on with the next candidate: a hung
            // or cut-off node costs a lookup that, not the RPC timeout. With no other
            // candidate left (a node joining through its one bootstrap peer) giving up
            // gains nothing, so the hop gets the whole timeout: a busy peer slower than
            // the hop's budget would otherwise fail every attempt to join through it.
            let others = stack.iter().any(|t| !t.is_empty());
            let reply = if others {
                // A hop may answer with the block itself (a path cache, or the holder).
                let bulk = want == Some(BlockKind::Data);
                let budget = self.budget(node.addr, 2, HOP_FLOOR, bulk);
                self.call_within(node.addr, req, budget, HOP_FLOOR).await
            } else {
                self.call(node.addr, req).await
            };
            if reply.is_ok() && Some(node.addr) != self.me {
                hops += 1;
            }
            match reply {
                Ok(Response::Step(Step::Done { from, succs })) => {
                    match cfs_core::ring::check_done(
                        node,
                        key,
                        from,
                        &succs,
                        self.own_ring_size(),
                        MAX_VNODES,
                    ) {
                        Ok(()) => {
                            return Ok(Lookup {
                                from: from.id,
                                succs,
                                path,
                                hops,
                                found: None,
                            })
                        }
                        Err(e) => {
                            // A lie or a confused node: it has failed this lookup.
                            failed.insert((node.addr, node.vnode));
                            last = format!("{}: refused its answer: {e}", node.addr);
                        }
                    }
                }
                Ok(Response::Step(Step::Found(bytes))) => {
                    if let Some(kind) = want {
                        if let Ok(v) = verify(kind, key, bytes, false) {
                            return Ok(Lookup {
                                from: key,
                                succs: vec![],
                                path,
                                hops,
                                found: Some((node, v)),
                            });
                        }
                    }
                    // Bad data: that node has failed this request.
                    failed.insert((node.addr, node.vnode));
                    path.pop();
                    last = format!("{} returned a bad block", node.addr);
                }
                Ok(Response::Step(Step::Closer { nodes, n_est: n })) => {
                    // A peer's ring-size hint steers only a caller that has no estimate
                    // of its own, and is capped: it weighs progress, nothing more.
                    if self.own_ring_size().is_none() {
                        n_est = n.clamp(1, 1 << 24);
                        self.n_est
                            .store(n_est, std::sync::atomic::Ordering::Relaxed);
                    }
                    let next: Vec<NodeRef> = nodes
                        .into_iter()
                        .take(CLOSER_COUNT * 2)
                        .filter(|n| {
                            n.valid(MAX_VNODES) && (n.id.in_open(node.id, key) || n.id == key)
                        })
                        .collect();
                    // Suspects do not count: closer nodes that are all down (a partition
                    // before the key) send the lookup to this node's own list instead.
                    let fresh = next.iter().any(|n| {
                        !failed.contains(&(n.addr, n.vnode))
                            && !asked.contains(&(n.addr, n.vnode))
                            && !avoid.contains(&n.addr)
                            && !self.peers.suspect(n.addr)
                            && !self.silent(n.addr)
                    });
                    if next.is_empty() {
                        last = format!("{} offered no closer node", node.addr);
                    } else if !fresh {
                        // Every closer node it named has failed us (a liar among them).
                        // Its own successor list, which it vouches for, may pass the key:
                        // then the answer comes from that list, checked like a `Done`.
                        // Otherwise its successors are the way on.
                        if let Ok(Response::Neighbors { succs, .. }) = self
                            .call(node.addr, Request::Neighbors { vnode: node.vnode })
                            .await
                        {
                            hops += 1;
                            match cfs_core::ring::answer_from_list(
                                node,
                                key,
                                &succs,
                                self.own_ring_size(),
                                MAX_VNODES,
                            ) {
                                Some(Ok((from, succs))) => {
                                    return Ok(Lookup {
                                        from: from.id,
                                        succs,
                                        path,
                                        hops,
                                        found: None,
                                    })
                                }
                                Some(Err(e)) => {
                                    failed.insert((node.addr, node.vnode));
                                    last = format!("{}: refused its list: {e}", node.addr);
                                    continue;
                                }
                                None => {
                                    let walk = cfs_core::ring::clean_succ_list(
                                        node, &succs, MAX_REFS, MAX_VNODES,
                                    );
                                    if !walk.is_empty() {
                                        stack.push(walk);
                                        continue;
                                    }
                                }
                            }
                        }
                        last = format!("{} offered no closer node", node.addr);
                    } else {
                        stack.push(next);
                    }
                }
                Ok(other) => {
                    failed.insert((node.addr, node.vnode));
                    last = format!("{}: unexpected reply {other:?}", node.addr);
                }
                Err(e) => {
                    failed.insert((node.addr, node.vnode));
                    path.pop();
                    last = format!("{}: {e}", node.addr);
                }
            }
        }
    }

    /// Choose the next hop among candidates: by estimated total latency (our RTT to it plus
    /// the hops it still needs times the mean RTT) or, without server selection, by
    /// id progress alone.
    /// Only RTTs this process measured count: a peer's word on latency is not used.
    fn pick(&self, cands: &[NodeRef], key: Id, n_est: u32) -> usize {
        let progress = |n: &NodeRef| n.id.distance_frac(key);
        if !self.server_selection {
            return (0..cands.len())
                .min_by(|&a, &b| progress(&cands[a]).total_cmp(&progress(&cands[b])))
                .unwrap();
        }
        let mean = self.mean_rtt_us();
        // A suspect (it ran past a budget or failed lately) is asked only when no other
        // candidate is left: however close to the key, it likely costs a budget first.
        let cost = |n: &NodeRef| {
            let rtt = self.rtt_us(n.addr).unwrap_or(mean);
            let remaining = (progress(n) * n_est as f64).max(1.0).log2() / 2.0;
            let suspect = self.peers.suspect(n.addr) || self.silent(n.addr);
            (suspect, rtt + remaining * mean)
        };
        (0..cands.len())
            .map(|i| (i, cost(&cands[i])))
            .min_by(|a, b| a.1 .0.cmp(&b.1 .0).then(a.1 .1.total_cmp(&b.1 .1)))
            .unwrap()
            .0
    }
}
