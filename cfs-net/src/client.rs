//! The client side of the ring for `cfs`: lookups start at the node it was given (and
//! the ring members it learns), blocks go straight to and from replicas.

use crate::net::{DhashError, Lookup, LookupError, Net, PutReceipt, Timeouts};
use crate::ranges::Ranges;
use crate::transport::{CallError, TcpTransport, Transport};
use cfs_core::block::{BlockKind, Verified};
use cfs_core::id::MAX_VNODES;
use cfs_core::ring::{clean_succ_list, estimate_size, same_host, MIN_ENTRIES_FOR_ESTIMATE};
use cfs_core::wire::{
    leased_enough, Request, Response, StatusInfo, WireBlock, MAX_BATCH, MAX_REFS,
};
use cfs_core::{Id, NodeRef};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// The least a GetMany exchange is given before the next holder is asked.
const GET_MANY_FLOOR: std::time::Duration = std::time::Duration::from_millis(250);
/// `GetMany` exchanges in flight at once for one `get_many`.
const PARALLEL_BATCHES: usize = 16;
/// Lookups in flight at once while `get_many` places its keys, and rounds of them.
const PARALLEL_LOOKUPS: usize = 16;
/// Successor ranges a batch puts to, or asks about, at once.
const RANGES_IN_FLIGHT: usize = 16;
/// A replica whose put window has had no room this long is slow: the copy goes to a
/// stand-in (`Client::put_chunk`). A 4 MiB window drains in 0.7 s at 50 Mbit/s.
const STANDIN_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Known vnodes looked at past a range's successor list for stand-ins.
const STANDIN_LOOKAHEAD: usize = 8;

/// Least time a replica gets to answer a `Has` of a batch (`Client::lease_group`).
const HAS_FLOOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Keys of one successor range: its replica set, the successor list it came from, and
/// the keys' indexes.
struct RangeGroup {
    set: Vec<NodeRef>,
    succs: Vec<NodeRef>,
    keys: Vec<usize>,
}

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
const MAX_LOOKUP_WAVES: usize = 8;
/// An honest replica stops short only past 1 MiB of blocks: a few asks cover a batch of
/// small blocks, and a replica answering one block per ask cannot keep a batch waiting.
const MAX_ASKS_PER_REPLICA: usize = 4;

#[derive(Clone)]
pub struct Client<T: Transport = TcpTransport> {
    pub net: Net<T>,
    /// Ring members known to answer: the given node first, others learned from lookups.
    known: Arc<Mutex<Vec<NodeRef>>>,
    pub replicas: usize,
    /// Seconds every put and renewal asks to lease blocks for.
    pub lease: u64,
    /// Successor ranges learned from recent lookups, so reads of keys in a known range go
    /// straight to its replicas (one RPC instead of a lookup and a get). Only reads use
    /// it: a stale entry costs a failed attempt and a fresh lookup, never a wrong answer,
    /// since every block is verified.
    ranges: Arc<Ranges>,
    /// A lookup to learn a range is under way (one at a time, off the read path).
    learning: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes of puts in flight to each replica.
    windows: Arc<crate::put_window::PutWindows>,
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

impl Client<TcpTransport> {
    pub fn tcp(node: SocketAddr) -> Client<TcpTransport> {
        Client::new(TcpTransport::new(None), node, Timeouts::default())
    }
}

const MAX_KNOWN: usize = 32;

impl<T: Transport> Client<T> {
    pub fn new(transport: T, node: SocketAddr, timeouts: Timeouts) -> Client<T> {
        Client {
            net: Net::new(transport, timeouts, None),
            known: Arc::new(Mutex::new(vec![NodeRef::new(node, 0)])),
            replicas: 3,
            lease: cfs_core::wire::DEFAULT_LEASE_SECS,
            ranges: Arc::default(),
            learning: Arc::default(),
            windows: Arc::default(),
        }
    }

    /// Ask the node for its replication factor; call once after connecting.
    pub async fn connect(&mut self) -> Result<StatusInfo, CallError> {
        let first = self.known.lock().unwrap()[0].addr;
        let s = self.status(first).await?;
        self.connected(&s);
        Ok(s)
    }

    /// [`Client::connect`], looking `key` (the root a mount or a get reads first) up from
    /// the trusted node at the same time: over the wide area its range then costs no
    /// round trips of its own.
    pub async fn connect_toward(&mut self, key: Id) -> Result<StatusInfo, CallError> {
        let first = self.known.lock().unwrap()[0].addr;
        let net = self.net.clone();
        let lookup =
            tokio::spawn(async move { net.lookup(vec![NodeRef::new(first, 0)], key, None).await });
        let s = match self.status(first).await {
            Ok(s) => s,
            Err(e) => {
                lookup.abort();
                return Err(e);
            }
        };
        self.connected(&s);
        // The trusted node's own tables may cover the key already.
        if self.ranges.known(key).is_some() {
            lookup.abort();
            return Ok(s);
        }
        // A failed lookup only means the first read looks again. It ran before the ring
        // size was known, so its range is checked for width now, as answers are.
        if let Ok(Ok(l)) = lookup.await {
            if let Some(first) = l.succs.first() {
                if self.net.plausible_range(l.from, first.id) {
                    self.learn(l.succs.iter().copied());
                    self.ranges.remember(l.from, &l.succs, self.replicas);
                }
            }
        }
        Ok(s)
    }

    /// Learn from the trusted node's status, and measure the round trip to every member
    /// it named in the background: the first reads then pick near holders over warm
    /// connections instead of paying a handshake each.
    fn connected(&mut self, s: &StatusInfo) {
        self.replicas = s.replicas.max(1) as usize;
        // The client's own ring-size estimate, from the node it was told to trust: with it,
        // lookup answers claiming implausibly wide ranges are refused.
        if let Some(v) = s.vnodes.first() {
            let last = v.succs.last().copied();
            if let Some(last) = last.filter(|_| v.succs.len() >= MIN_ENTRIES_FOR_ESTIMATE) {
                self.net
                    .note_ring_size(estimate_size(v.succs.len(), v.me.id.distance_frac(last.id)));
            }
        }
        self.learn(s.vnodes.iter().flat_map(|v| v.succs.iter().copied()));
        self.ranges.note_positions(
            s.vnodes
                .iter()
                .flat_map(|v| std::iter::once(v.me).chain(v.fingers.iter().copied())),
        );
        // The ranges its tables imply, as a lookup's answer would: the first reads of
        // keys in them (a root's directories, say) go straight to replicas, without a
        // lookup each. Hints only: every block is verified, and a miss looks the key up.
        for v in &s.vnodes {
            if !v.succs.is_empty() {
                self.ranges.remember(v.me.id, &v.succs, self.replicas);
            }
            if let Some(p) = v.pred {
                let mut list = vec![v.me];
                list.extend(v.succs.iter().copied());
                self.ranges.remember(p.id, &list, self.replicas);
            }
        }
        let me = self.known.lock().unwrap()[0].addr;
        for n in self.start().into_iter().filter(|n| n.addr != me) {
            let net = self.net.clone();
            tokio::spawn(async move {
                let _ = net.call(n.addr, Request::Ping).await;
            });
        }
    }

    fn learn(&self, nodes: impl IntoIterator<Item = NodeRef>) {
        let mut k = self.known.lock().unwrap();
        for n in nodes {
            if k.iter().any(|x| x.addr == n.addr) {
                continue;
            }
            if k.len() < MAX_KNOWN {
                k.push(NodeRef::new(n.addr, 0));
                continue;
            }
            // Full: a member that failed (its RTT carries the failure penalty) makes room,
            // so a long-lived mount keeps finding the ring as nodes come and go.
            let worst = (0..k.len()).max_by(|&a, &b| {
                let ra = self.net.rtt_us(k[a].addr).unwrap_or(0.0);
                let rb = self.net.rtt_us(k[b].addr).unwrap_or(0.0);
                ra.total_cmp(&rb)
            });
            if let Some(w) = worst {
                let failed = self.net.rtt_us(k[w].addr).unwrap_or(0.0)
                    >= self.net.timeouts.rpc.as_secs_f64() * 1e6;
                if failed {
                    k[w] = NodeRef::new(n.addr, 0);
                }
            }
        }
    }

    /// Where lookups start: every known member, so a dead first node is skipped.
    fn start(&self) -> Vec<NodeRef> {
        self.known.lock().unwrap().clone()
    }

    /// Where a lookup of `key` starts: the known members and the known vnodes nearest
    /// before it, which the lookup's choice by progress and round trip then prefers.
    fn start_for(&self, key: Id) -> Vec<NodeRef> {
        let mut s = self.start();
        s.extend(self.ranges.before(key, 2));
        s
    }

    pub async fn lookup(&self, key: Id) -> Result<Lookup, LookupError> {
        let l = self.net.lookup(self.start_for(key), key, None).await?;
        self.learn(l.succs.iter().copied());
        if !l.succs.is_empty() {
            self.ranges.remember(l.from, &l.succs, self.replicas);
        }
        Ok(l)
    }

    pub async fn get(&self, kind: BlockKind, key: Id) -> Result<Verified, DhashError> {
        if let Some(succs) = self.ranges.known(key) {
            let mut order = crate::net::replica_set(&succs, self.replicas);
            self.net.nearest_first(&mut order);
            let deadline = tokio::time::Instant::now() + self.net.timeouts.op;
            if let Ok(v) = self.net.get_hedged(&order, kind, key, deadline).await {
                return Ok(v);
            }
            self.ranges.forget(key);
        }
        self.learn_range(key);
        let (v, l) = self
            .net
            .get(&self.start_for(key), kind, key, self.replicas, true)
            .await?;
        self.learn(l.succs.iter().copied());
        if l.found.is_none() && !l.succs.is_empty() {
            self.ranges.remember(l.from, &l.succs, self.replicas);
        }
        Ok(v)
    }

    /// Many small blocks (a listing's inodes, small files) with one `GetMany` per
    /// successor range and replica instead of one `Get` per block; each verified as `get`
    /// does. None for a block no replica of its range returned: the caller fetches it
    /// alone with `get`, which tries harder (other replicas, lookups, until the deadline).
    pub async fn get_many(&self, items: &[(BlockKind, Id)]) -> Vec<Option<Verified>> {
        let mut out: Vec<Option<Verified>> = items.iter().map(|_| None).collect();
        let groups = self.ranges_of(items).await;
        let calls: Vec<_> = groups
            .into_iter()
            .flat_map(|(set, group)| {
                let chunks: Vec<Vec<usize>> =
                    group.chunks(MAX_BATCH).map(<[usize]>::to_vec).collect();
                chunks.into_iter().map(move |c| (set.clone(), c))
            })
            .collect();
        for wave in calls.chunks(PARALLEL_BATCHES) {
            let gets = wave
                .iter()
                .map(|(set, chunk)| self.get_from_set(set.clone(), items, chunk.clone()));
            for got in crate::net::join_all(gets).await {
                for (i, v) in got {
                    out[i] = Some(v);
                }
            }
        }
        out
    }

    /// The replica set of each item's successor range, with the items in it. Ranges
    /// already known (`known_range`) cost nothing; the rest are looked up in waves of
    /// parallel lookups, each for a key spread across those still unplaced, and
    /// remembered. Items whose lookup fails are left out (their caller fetches them
    /// alone).
    async fn ranges_of(&self, items: &[(BlockKind, Id)]) -> Vec<(Vec<NodeRef>, Vec<usize>)> {
        let mut placed: Vec<(Vec<NodeRef>, Vec<usize>)> = Vec::new();
        let mut left: Vec<usize> = (0..items.len()).collect();
        left.sort_by_key(|&i| items[i].1);
        for _ in 0..MAX_LOOKUP_WAVES {
            left.retain(|&i| match self.ranges.known(items[i].1) {
                Some(succs) => {
                    let set = crate::net::replica_set(&succs, self.replicas);
                    match placed.iter_mut().find(|(s, _)| *s == set) {
                        Some((_, g)) => g.push(i),
                        None => placed.push((set, vec![i])),
                    }
                    false
                }
                None => true,
            });
            if left.is_empty() {
                break;
            }
            let n = left.len().min(PARALLEL_LOOKUPS);
            // `lookup` remembers each answer's ranges.
            let probes = (0..n).map(|j| self.lookup(items[left[j * left.len() / n]].1));
            let any = crate::net::join_all(probes)
                .await
                .into_iter()
                .flatten()
                .any(|l| !l.succs.is_empty());
            if !any {
                break;
            }
        }
        placed
    }

    /// The blocks `want` (indexes into `items`) from the replicas `set`, least loaded
    /// first: each replica is asked for what the previous ones did not return, and again
    /// (a few times) while its answers stop short of the list (the frame limit) but bring
    /// something. A replica that leaves anything missing counts as a miss.
    async fn get_from_set(
        &self,
        mut set: Vec<NodeRef>,
        items: &[(BlockKind, Id)],
        mut want: Vec<usize>,
    ) -> Vec<(usize, Verified)> {
        let mut got = Vec::new();
        self.net.nearest_first(&mut set);
        for n in set {
            let mut missing = Vec::new();
            for _ in 0..MAX_ASKS_PER_REPLICA {
                if want.is_empty() {
                    break;
                }
                let req = Request::GetMany {
                    items: want.iter().map(|&i| items[i]).collect(),
                };
                // A batch (up to a frame) gets a few hedging delays: a holder that is
                // hung, cut off or trickling is left for the next one, not waited on.
                let budget = self.net.budget(n.addr, 4, GET_MANY_FLOOR);
                let answer = tokio::time::timeout(budget, self.net.call(n.addr, req)).await;
                let Ok(Ok(Response::Blocks(answers))) = answer else {
                    if answer.is_err() {
                        self.net.given_up(n.addr, budget);
                    }
                    break;
                };
                if answers.is_empty() || answers.len() > want.len() {
                    break;
                }
                let rest = want.split_off(answers.len());
                for (i, b) in want.into_iter().zip(answers) {
                    let (kind, key) = items[i];
                    match b
                        .and_then(|b| cfs_core::block::verify(kind, key, b.into_vec(), false).ok())
                    {
                        Some(v) => got.push((i, v)),
                        None => missing.push(i),
                    }
                }
                want = rest;
            }
            missing.append(&mut want);
            want = missing;
            if want.is_empty() {
                break;
            }
            self.net.missed(n.addr);
        }
        got
    }

    /// Look `key` up for its range (not for the block, which any node on the path may
    /// answer with, teaching nothing) in the background, one such lookup at a time: its
    /// successor list then serves the later reads in its ranges without lookups. Off the
    /// read path, since a lookup that must reach a cut-off node would stall the read.
    fn learn_range(&self, key: Id) {
        use std::sync::atomic::Ordering::AcqRel;
        if self.learning.swap(true, AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let _ = me.lookup(key).await;
            me.learning
                .store(false, std::sync::atomic::Ordering::Release);
        });
    }

    pub async fn put(&self, block: &Verified) -> Result<PutReceipt, DhashError> {
        self.net
            .put(&self.start(), block, self.replicas, self.lease)
            .await
    }

    pub async fn get_root(&self, fsid: Id) -> Result<Option<Verified>, DhashError> {
        Ok(self
            .get_roots(fsid)
            .await?
            .into_iter()
            .max_by_key(Verified::rank))
    }

    /// Every distinct root the replicas of `fsid` hold (more than one: a fork, or a
    /// replica behind).
    pub async fn get_roots(&self, fsid: Id) -> Result<Vec<Verified>, DhashError> {
        Ok(self.get_roots_also(fsid, &[]).await?.0)
    }

    /// [`Client::get_roots`], also asking `seen` (the holders that gave the best root
    /// last time) when the replicas are all new: returns the roots and who gave the best.
    pub async fn get_roots_also(
        &self,
        fsid: Id,
        seen: &[SocketAddr],
    ) -> Result<(Vec<Verified>, Vec<SocketAddr>), DhashError> {
        // A range learned lately (at connect, or by a lookup) spares the lookup: the
        // replicas and as many more successors are asked all the same.
        if let Some(succs) = self.ranges.known(fsid) {
            let got = self.net.roots_in(&succs, fsid, self.replicas, seen).await;
            // None found there: the range may be stale, so a lookup decides.
            if got.as_ref().is_ok_and(|(roots, _)| !roots.is_empty()) {
                return got;
            }
            self.ranges.forget(fsid);
        }
        let l = self.lookup(fsid).await?;
        self.net.roots_in(&l.succs, fsid, self.replicas, seen).await
    }

    /// Group keys by the successor range they fall in: one lookup per range, not per
    /// key, in waves of parallel lookups (each for a key spread across those still
    /// unplaced); with `known`, a range learned lately (`known_range`) costs none (puts: a
    /// stale one only puts a copy where maintenance moves it from, and the publish
    /// confirms every block with fresh lookups). Returns (replica set, indexes into
    /// `keys`) per group.
    async fn by_range(&self, keys: &[Id], known: bool) -> Result<Vec<RangeGroup>, DhashError> {
        let mut groups: Vec<RangeGroup> = Vec::new();
        let mut left: Vec<usize> = (0..keys.len()).collect();
        left.sort_by_key(|&i| keys[i]);
        if known {
            left.retain(|&i| {
                let Some(succs) = self.ranges.known(keys[i]) else {
                    return true;
                };
                let set = crate::net::replica_set(&succs, self.replicas);
                if set.len() < self.replicas {
                    return true;
                }
                match groups.iter_mut().find(|g| g.set == set) {
                    Some(g) => g.keys.push(i),
                    None => groups.push(RangeGroup {
                        set,
                        succs,
                        keys: vec![i],
                    }),
                }
                false
            });
        }
        while !left.is_empty() {
            let n = left.len().min(PARALLEL_LOOKUPS);
            let probes: Vec<Id> = (0..n).map(|j| keys[left[j * left.len() / n]]).collect();
            let answers = crate::net::join_all(probes.iter().map(|&k| self.lookup(k))).await;
            let mut placed = false;
            let mut last = None;
            for (probe, l) in probes.iter().zip(answers) {
                let l = match l {
                    Ok(l) if !l.succs.is_empty() => l,
                    Ok(_) => continue,
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                };
                let set = self.net.replicas(&l.succs, self.replicas).await;
                let mut group = Vec::new();
                left.retain(|&i| {
                    let here = keys[i].in_half_open(l.from, l.succs[0].id) || keys[i] == *probe;
                    if here {
                        group.push(i);
                    }
                    !here
                });
                if !group.is_empty() {
                    placed = true;
                    groups.push(RangeGroup {
                        set,
                        succs: l.succs,
                        keys: group,
                    });
                }
            }
            if !placed {
                return Err(last
                    .unwrap_or_else(|| LookupError::NoRoute {
                        key: probes[0],
                        last: "no lookup placed a key".into(),
                    })
                    .into());
            }
        }
        Ok(groups)
    }

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
            let group = &group;
            async move {
                let mut states = vec![LeaseState::default(); group.len()];
                // A replica slow to answer (its link full, it hung) counts as not
                // holding: a publish puts those blocks again (routed around it if it
                // stays slow), a check reports them short. The RPC timeout would hold up
                // every batch behind it.
                let budget = self.net.budget(a, 4, HAS_FLOOR);
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
        let calls = set.iter().map(|n| {
            let req = Request::PutMany {
                blocks: wire.clone(),
                transfer: false,
            };
            let (a, standins, taken) = (n.addr, &standins, &taken);
            async move {
                // The replica's window first, for up to STANDIN_AFTER.
                let mut last = Err(CallError::Timeout(STANDIN_AFTER));
                let mut cands: Vec<SocketAddr> = standins.iter().map(|s| s.addr).collect();
                // Its last call failed: routed around at once, and not waited for.
                let failed_last = self.net.failed_last(a);
                let tried = if failed_last {
                    None
                } else {
                    tokio::time::timeout(STANDIN_AFTER, self.windows.room(a, bytes))
                        .await
                        .ok()
                };
                match tried {
                    Some(room) => match self.net.call(a, req.clone()).await {
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
                    let r = self.net.call(to, req.clone()).await;
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

    /// The replicas of `key` that hold it in their permanent store, and (for --json)
    /// other members of the successor list that hold it too.
    pub async fn locate(
        &self,
        kind: BlockKind,
        key: Id,
    ) -> Result<(Vec<NodeRef>, Vec<NodeRef>), DhashError> {
        let l = self.lookup(key).await?;
        let set = self.net.replicas(&l.succs, self.replicas).await;
        let mut others: Vec<NodeRef> = Vec::new();
        for n in &l.succs {
            if !set.iter().any(|s| s.addr == n.addr) && !others.iter().any(|s| s.addr == n.addr) {
                others.push(*n);
            }
        }
        let ask = |nodes: Vec<NodeRef>| async move {
            let calls = nodes.iter().map(|n| {
                let net = self.net.clone();
                let a = n.addr;
                async move { net.has(a, &[(kind, key)]).await }
            });
            let res = crate::net::join_all(calls).await;
            nodes
                .into_iter()
                .zip(res)
                .filter(|(_, r)| matches!(r, Ok(v) if v.first().is_some_and(|x| x.is_some())))
                .map(|(n, _)| n)
                .collect::<Vec<_>>()
        };
        Ok((ask(set).await, ask(others).await))
    }

    /// One node's status, checked as strictly as a node checks what it receives: a
    /// reply that names no vnode, too many, or invalid nodes is a protocol error.
    pub async fn status(&self, addr: SocketAddr) -> Result<StatusInfo, CallError> {
        let s = match self.net.call(addr, Request::Status).await? {
            Response::Status(s) => *s,
            other => return Err(CallError::Protocol(format!("unexpected {other:?}"))),
        };
        let bad = |why: &str| {
            Err(CallError::Protocol(format!(
                "{addr} sent a bad status: {why}"
            )))
        };
        if s.vnodes.is_empty() || s.vnodes.len() > MAX_VNODES as usize {
            return bad("no vnodes, or more than the cap");
        }
        let refs_ok = s.vnodes.iter().all(|v| {
            v.me.valid(MAX_VNODES)
                && v.succs.len() <= MAX_REFS
                && v.fingers.len() <= 160
                && v.succs
                    .iter()
                    .chain(&v.fingers)
                    .chain(&v.pred)
                    .all(|n| n.valid(MAX_VNODES))
        });
        if !refs_ok {
            return bad("invalid node references");
        }
        if s.counters.len() > 1024 {
            return bad("too many counters");
        }
        Ok(s)
    }

    /// Every vnode of the ring, walking successor lists from `addr`'s first vnode, in id
    /// order starting from the lowest id. Each answer names up to s successors, so the
    /// walk jumps to the last new one: about N/s calls, and each node is added once.
    pub async fn ring(&self, addr: SocketAddr) -> Result<Vec<NodeRef>, CallError> {
        let start = NodeRef::new(addr, 0);
        let mut seen: std::collections::HashSet<NodeRef> = [start].into();
        let mut out = vec![start];
        // Nodes the walk may continue from, furthest last: a dead one is skipped for the
        // one before it.
        let mut from = vec![start];
        let mut calls = 0;
        while let Some(cur) = from.pop() {
            calls += 1;
            if calls > MAX_RING_WALK {
                break;
            }
            let succs = match self
                .net
                .call(cur.addr, Request::Neighbors { vnode: cur.vnode })
                .await
            {
                Ok(Response::Neighbors { succs, .. }) => succs,
                Ok(other) => return Err(CallError::Protocol(format!("unexpected {other:?}"))),
                Err(e) if cur == start => return Err(e),
                Err(_) => continue,
            };
            let mut fresh = Vec::new();
            let mut closed = false;
            for n in clean_succ_list(cur, &succs, MAX_REFS, MAX_VNODES) {
                if !seen.insert(n) {
                    // Back at the start, or at a node already listed: the walk is done.
                    closed = true;
                    break;
                }
                out.push(n);
                fresh.push(n);
            }
            if closed {
                break;
            }
            from = fresh;
        }
        out.sort_by_key(|n| n.id);
        Ok(out)
    }
}

/// Most Neighbors calls one ring walk makes.
const MAX_RING_WALK: usize = 1 << 16;

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
