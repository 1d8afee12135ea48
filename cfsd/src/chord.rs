//! Chord on a node: each vnode's predecessor, successor list and fingers, kept by Zave's
//! stabilize and rectify, and lookups that start from the node's own tables. Nothing a
//! peer claims enters these tables unchecked: see `stabilize` and `rectify`.

use crate::metrics::Metrics;
use crate::state::Node;
use cfs_core::block::BlockKind;
use cfs_core::ring::clean_succ_list;
use cfs_core::wire::{Request, Response, Step};
use cfs_core::{Id, NodeRef};
use cfs_net::net::{Lookup, LookupError};
use cfs_net::transport::Transport;
use rand::Rng;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

/// Remembered peers per host (an address on loopback, an IP elsewhere).
const MAX_SEEN_PER_HOST: usize = 2;

impl<T: Transport> Node<T> {
    /// Peers this node has heard of, successors first: what a restart can rejoin through.
    pub fn known_peers(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for v in &self.inner.vnodes {
            let v = v.lock().unwrap();
            out.extend(v.succs.iter().chain(v.pred.iter()).map(|n| n.addr));
        }
        out.extend(self.inner.seen.lock().unwrap().iter().copied());
        let me = self.inner.cfg.addr;
        let mut seen = BTreeSet::new();
        out.retain(|a| *a != me && seen.insert(*a));
        out
    }

    pub(crate) fn note_seen(&self, addrs: impl IntoIterator<Item = SocketAddr>) {
        let mut s = self.inner.seen.lock().unwrap();
        for a in addrs {
            // A few addresses per host: one machine on many ports cannot fill the set
            // and make itself the peer every merge probe asks.
            let same = s
                .iter()
                .filter(|x| cfs_core::ring::same_host(**x, a))
                .count();
            if a != self.inner.cfg.addr && same < MAX_SEEN_PER_HOST {
                s.insert(a);
            }
        }
        while s.len() > 256 {
            let i = self.inner.rng.lock().unwrap().random_range(0..s.len());
            let k = *s.iter().nth(i).unwrap();
            s.remove(&k);
        }
    }

    /// The next of this process's own vnodes clockwise from `me`, if it has others.
    fn next_sibling(&self, me: NodeRef) -> Option<NodeRef> {
        self.ids().into_iter().filter(|n| *n != me).min_by(|a, b| {
            me.id
                .distance_frac(a.id)
                .total_cmp(&me.id.distance_frac(b.id))
        })
    }

    pub(crate) fn jitter(&self, max: Duration) -> Duration {
        let ms = max.as_millis().max(1) as u64;
        Duration::from_millis(self.inner.rng.lock().unwrap().random_range(0..ms))
    }

    pub(crate) async fn alive(&self, n: NodeRef) -> bool {
        if n.addr == self.inner.cfg.addr {
            return n.vnode < self.inner.cfg.vnodes;
        }
        matches!(
            self.inner.net.call(n.addr, Request::Ping).await,
            Ok(Response::Pong { vnodes }) if n.vnode < vnodes
        )
    }

    async fn neighbors(&self, n: NodeRef) -> Option<(Option<NodeRef>, Vec<NodeRef>)> {
        if n.addr == self.inner.cfg.addr {
            let vn = self.inner.vnodes.get(n.vnode as usize)?.lock().unwrap();
            return Some((vn.pred, vn.succs.clone()));
        }
        match self
            .inner
            .net
            .call(n.addr, Request::Neighbors { vnode: n.vnode })
            .await
        {
            Ok(Response::Neighbors { pred, succs }) => Some((pred, succs)),
            _ => None,
        }
    }

    /// Adopt `first` then `list` as vnode `v`'s successor list (Zave: the successor, then
    /// its list, cut where it reaches us), entry by entry: each valid (id bound to its
    /// address, vnode under the cap), strictly clockwise after the one before, and, unless
    /// it is already in our list, answering a ping now. Entries of our current list that
    /// the new one omits are kept if they still answer a ping: a successor that leaves
    /// nodes out cannot cut us off from them. `first` has just answered us.
    pub(crate) async fn adopt_checked(&self, v: u16, first: NodeRef, list: &[NodeRef]) {
        let s = self.inner.cfg.succ_list_len;
        let (me, current) = {
            let vn = self.inner.vnodes[v as usize].lock().unwrap();
            (vn.me, vn.succs.clone())
        };
        if first == me {
            self.inner.vnodes[v as usize].lock().unwrap().succs = vec![me];
            return;
        }
        let mut claimed = Vec::with_capacity(list.len() + 1);
        claimed.push(first);
        claimed.extend(list.iter().copied());
        let walk = clean_succ_list(me, &claimed, s, self.inner.cfg.max_vnodes);
        let cut_short =
            walk.len() < claimed.len().min(s) && claimed.get(walk.len()).is_some_and(|n| *n != me);
        if cut_short {
            Metrics::inc(&self.inner.metrics.claims_refused);
        }
        // Candidates: the checked walk and our current entries, from `first` on, in
        // clockwise order from us.
        let dist = |n: &NodeRef| me.id.distance_frac(n.id);
        let mut cands: Vec<NodeRef> = walk.clone();
        cands.extend(
            current
                .iter()
                .filter(|n| **n != me && dist(n) >= dist(&first)),
        );
        cands.sort_by(|a, b| dist(a).total_cmp(&dist(b)));
        cands.dedup();
        cands.truncate(s + 4);
        // Ping what is new to us, and what our successor left out.
        let to_ping: Vec<NodeRef> = cands
            .iter()
            .filter(|n| **n != first && (!current.contains(n) || !walk.contains(n)))
            .copied()
            .collect();
        let answers = cfs_net::net::join_all(to_ping.iter().map(|n| self.alive(*n))).await;
        // New entries that do not answer are refused; omitted ones that do not answer
        // are dead and leave, as Zave's adoption would drop them.
        let dead: Vec<NodeRef> = to_ping
            .iter()
            .zip(answers)
            .filter(|(_, ok)| !ok)
            .map(|(n, _)| *n)
            .collect();
        Metrics::add(&self.inner.metrics.claims_refused, dead.len() as u64);
        let mut out: Vec<NodeRef> = cands.into_iter().filter(|n| !dead.contains(n)).collect();
        out.truncate(s);
        self.note_seen(out.iter().map(|n| n.addr));
        let mut vn = self.inner.vnodes[v as usize].lock().unwrap();
        // Changed while we pinged (a rejoin, a dead successor dropped): that change
        // stands, and the next round adopts again from it.
        if vn.succs == current {
            vn.succs = if out.is_empty() { vec![me] } else { out };
        }
    }

    /// Zave's stabilize: drop a dead first successor, else adopt its list, and its
    /// predecessor if that one lies between and is alive; then rectify the successor.
    pub async fn stabilize(&self, v: u16) {
        Metrics::inc(&self.inner.metrics.stabilize_rounds);
        let max_vnodes = self.inner.cfg.max_vnodes;
        let (me, succ, pred) = {
            let vn = self.inner.vnodes[v as usize].lock().unwrap();
            (vn.me, vn.succs[0], vn.pred)
        };
        if succ == me {
            // Ring of one: a predecessor that rectified us is our way out.
            if let Some(p) = pred {
                if p != me && self.alive(p).await {
                    if let Some((_, list)) = self.neighbors(p).await {
                        self.adopt_checked(v, p, &list).await;
                    }
                }
            }
            // Else, or if that failed: this process's next vnode clockwise is alive and
            // in the ring by definition (a vnode whose successors all fell away in a
            // partition would otherwise wait for a remembered peer across it).
            let alone = self.inner.vnodes[v as usize].lock().unwrap().succs[0] == me;
            if let (true, Some(s)) = (alone, self.next_sibling(me)) {
                if let Some((_, list)) = self.neighbors(s).await {
                    self.adopt_checked(v, s, &list).await;
                }
            }
        } else {
            match self.neighbors(succ).await {
                None => {
                    // The successor is gone; the others may be too (a partition takes
                    // many at once), so ask them all at once rather than one per round.
                    let rest: Vec<NodeRef> = self.successors(v).into_iter().skip(1).collect();
                    let answers = cfs_net::net::join_all(rest.iter().map(|n| self.alive(*n))).await;
                    // If none answers, the fault is more likely our own link: drop only
                    // the successor, as one round always did, and look for the ring.
                    let isolated = !rest.is_empty() && answers.iter().all(|ok| !ok);
                    let dead: Vec<NodeRef> = std::iter::once(succ)
                        .chain(
                            rest.iter()
                                .zip(answers)
                                .filter(|(_, ok)| !ok && !isolated)
                                .map(|(n, _)| *n),
                        )
                        .collect();
                    let mut vn = self.inner.vnodes[v as usize].lock().unwrap();
                    vn.succs.retain(|n| !dead.contains(n));
                    if vn.succs.is_empty() {
                        vn.succs.push(me);
                    }
                    for f in vn.fingers.iter_mut() {
                        if f.is_some_and(|f| dead.contains(&f)) {
                            *f = None;
                        }
                    }
                    return;
                }
                Some((p, list)) => {
                    let mut adopted = false;
                    if let Some(p) = p {
                        if p != me
                            && p.valid(max_vnodes)
                            && p.id.in_open(me.id, succ.id)
                            && self.alive(p).await
                        {
                            if let Some((_, plist)) = self.neighbors(p).await {
                                self.adopt_checked(v, p, &plist).await;
                                adopted = true;
                            }
                        }
                    }
                    if !adopted {
                        self.adopt_checked(v, succ, &list).await;
                    }
                }
            }
        }
        let (succ, n_est) = {
            let vn = self.inner.vnodes[v as usize].lock().unwrap();
            (vn.succs[0], vn.n_est())
        };
        if let (0, Some(n)) = (v, n_est) {
            self.inner.net.note_ring_size(n);
        }
        if succ != me {
            if succ.addr == self.inner.cfg.addr {
                self.offer_predecessor(succ.vnode, me);
            } else {
                let req = Request::Rectify {
                    vnode: succ.vnode,
                    candidate: me,
                };
                let _ = self.inner.net.call(succ.addr, req).await;
            }
        }
    }

    /// Zave's rectify, through a bounded queue: take `cand` as predecessor if it lies
    /// between the current one and us (or we have none), or if the current one is dead;
    /// either way only once `cand` answers at its address. Of many candidates only the
    /// closest before us waits, and one task per vnode dials: a flood of rectifies costs
    /// at most one ping at a time, never one per request.
    pub(crate) fn offer_predecessor(&self, v: u16, cand: NodeRef) {
        let mut vn = self.inner.vnodes[v as usize].lock().unwrap();
        let me = vn.me;
        let ignored = vn.rectify_failed.ignored(cand, tokio::time::Instant::now());
        if cand == me
            || Some(cand) == vn.pred
            || !cfs_core::ring::usable_ref(&cand, me.addr, self.inner.cfg.max_vnodes)
            || ignored
        {
            Metrics::inc(&self.inner.metrics.rectify_dropped);
            return;
        }
        match vn.rectify_next {
            Some(c) if c == cand || !cand.id.in_open(c.id, me.id) => {
                Metrics::inc(&self.inner.metrics.rectify_dropped);
                return;
            }
            Some(_) => Metrics::inc(&self.inner.metrics.rectify_dropped),
            None => {}
        }
        vn.rectify_next = Some(cand);
        if vn.rectifying {
            return;
        }
        vn.rectifying = true;
        drop(vn);
        let n = self.clone();
        tokio::spawn(async move {
            loop {
                let (cand, pred, me) = {
                    let mut vn = n.inner.vnodes[v as usize].lock().unwrap();
                    match vn.rectify_next.take() {
                        Some(c) => (c, vn.pred, vn.me),
                        None => {
                            vn.rectifying = false;
                            return;
                        }
                    }
                };
                let take = match pred {
                    None => true,
                    Some(p) if cand.id.in_open(p.id, me.id) => true,
                    Some(p) => !n.alive(p).await,
                };
                if !take {
                    Metrics::inc(&n.inner.metrics.rectify_dropped);
                } else if n.alive(cand).await {
                    let mut vn = n.inner.vnodes[v as usize].lock().unwrap();
                    if vn.pred == pred {
                        vn.pred = Some(cand);
                        drop(vn);
                        n.note_seen([cand.addr]);
                    }
                } else {
                    Metrics::inc(&n.inner.metrics.rectify_dropped);
                    let mut vn = n.inner.vnodes[v as usize].lock().unwrap();
                    vn.rectify_failed.failed(cand, tokio::time::Instant::now());
                }
            }
        });
    }

    pub(crate) async fn check_predecessor(&self, v: u16) {
        let pred = self.inner.vnodes[v as usize].lock().unwrap().pred;
        if let Some(p) = pred {
            if !self.alive(p).await {
                let mut vn = self.inner.vnodes[v as usize].lock().unwrap();
                if vn.pred == Some(p) {
                    vn.pred = None;
                }
            }
        }
    }

    /// Refresh one finger per round; the fingers it also covers are set at once, so a
    /// full table takes about log N lookups.
    pub(crate) async fn fix_finger(&self, v: u16) {
        let (me, i) = {
            let vn = self.inner.vnodes[v as usize].lock().unwrap();
            (vn.me, vn.next_finger)
        };
        let start = me.id.add_pow2(i);
        let Ok(l) = self.lookup_from(v, start, None).await else {
            return;
        };
        let f = l.succs[0];
        // A lookup that began before `f` was found dead can still name it (the answer
        // is another node's word): a node whose last call failed is made a finger only
        // if it answers a ping now; else this finger waits for the next round.
        if f != me
            && self.inner.net.failed_last(f.addr)
            && self.inner.net.call(f.addr, Request::Ping).await.is_err()
        {
            let mut vn = self.inner.vnodes[v as usize].lock().unwrap();
            vn.next_finger = (i + 1) % 160;
            return;
        }
        let mut vn = self.inner.vnodes[v as usize].lock().unwrap();
        let mut j = i;
        while j < 160 && (me.id.add_pow2(j) == f.id || me.id.add_pow2(j).in_open(me.id, f.id)) {
            vn.fingers[j as usize] = (f != me).then_some(f);
            j += 1;
        }
        if j == i {
            vn.fingers[i as usize] = (f != me).then_some(f);
            j += 1;
        }
        vn.next_finger = if j >= 160 { 0 } else { j };
    }

    /// A lookup that starts from vnode `v`'s own table: the first step costs no RPC.
    pub async fn lookup_from(
        &self,
        v: u16,
        key: Id,
        want: Option<BlockKind>,
    ) -> Result<Lookup, LookupError> {
        let step = self.inner.vnodes[v as usize].lock().unwrap().step(key);
        let me = self.ids()[v as usize];
        Metrics::inc(&self.inner.metrics.lookups_done);
        let r = match step {
            Step::Done { from, succs } => Ok(Lookup {
                from: from.id,
                succs,
                path: vec![me],
                hops: 0,
                found: None,
            }),
            Step::Closer { nodes, .. } => {
                let start = nodes;
                let mut l = self.inner.net.lookup(start, key, want).await?;
                l.path.insert(0, me);
                Ok(l)
            }
            Step::Found(_) => unreachable!("local steps never carry blocks"),
        };
        if let Ok(l) = &r {
            Metrics::add(&self.inner.metrics.lookup_hops, l.hops as u64);
        }
        r
    }

    /// A remembered peer to probe for a merge: one outside our ring view (successors,
    /// predecessors, fingers) when there is one, since a peer we remember but no longer
    /// see is how a ring split by a partition finds its other half.
    fn remembered_peer(&self) -> Option<SocketAddr> {
        let mut view = BTreeSet::new();
        for vn in &self.inner.vnodes {
            let vn = vn.lock().unwrap();
            view.extend(vn.succs.iter().map(|n| n.addr));
            view.extend(vn.pred.iter().map(|n| n.addr));
            view.extend(vn.fingers.iter().flatten().map(|n| n.addr));
        }
        let seen = self.inner.seen.lock().unwrap();
        let outside: Vec<SocketAddr> = seen.iter().filter(|a| !view.contains(a)).copied().collect();
        // Half the time any remembered peer: whoever got outside our view does not
        // decide alone which peers are probed.
        let any = self.inner.rng.lock().unwrap().random_bool(0.5);
        let pool: Vec<SocketAddr> = if outside.is_empty() || any {
            seen.iter().copied().collect()
        } else {
            outside
        };
        if pool.is_empty() {
            return None;
        }
        let i = self.inner.rng.lock().unwrap().random_range(0..pool.len());
        Some(pool[i])
    }

    /// Merge rings split by a partition once it heals. Probe a remembered peer: its own
    /// vnodes (their ids follow from its address, so nothing rests on its word) and the
    /// successor a lookup of our id through it finds; any that lies between one of our
    /// vnodes and its successor, and answers, becomes that vnode's successor. A lookup
    /// alone is not enough: after a heal the two rings can interleave into one loopy
    /// ring, where a lookup stays in the half it started in.
    pub(crate) async fn rejoin(&self) {
        let Some(peer) = self.remembered_peer() else {
            return;
        };
        let Ok(Response::Pong { vnodes }) = self.inner.net.call(peer, Request::Ping).await else {
            return;
        };
        let theirs: Vec<NodeRef> = (0..vnodes.min(self.inner.cfg.max_vnodes))
            .map(|pv| NodeRef::new(peer, pv))
            .collect();
        for v in 0..self.inner.cfg.vnodes {
            let me = self.ids()[v as usize];
            let succ = self.successors(v)[0];
            let closer = |c: &NodeRef| *c != me && (succ == me || c.id.in_open(me.id, succ.id));
            let direct = theirs
                .iter()
                .filter(|c| closer(c))
                .min_by(|a, b| {
                    me.id
                        .distance_frac(a.id)
                        .total_cmp(&me.id.distance_frac(b.id))
                })
                .copied();
            let cand = match direct {
                Some(c) => Some(c),
                None => {
                    let Ok(l) = self
                        .inner
                        .net
                        .lookup(vec![NodeRef::new(peer, 0)], me.id, None)
                        .await
                    else {
                        continue;
                    };
                    l.succs
                        .iter()
                        .find(|n| **n != me)
                        .copied()
                        .filter(|c| closer(c))
                }
            };
            if let Some(c) = cand {
                if direct.is_some() || self.alive(c).await {
                    tracing::info!(vnode = v, new_succ = ?c, "found a closer successor through a remembered peer");
                    let rest = self.successors(v);
                    self.adopt_checked(v, c, &rest).await;
                }
            }
        }
    }
}
