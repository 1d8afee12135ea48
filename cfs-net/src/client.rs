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

mod store;
pub use store::LeaseState;

/// The least a GetMany exchange is given before the next holder is asked.
const GET_MANY_FLOOR: std::time::Duration = std::time::Duration::from_millis(250);
/// `GetMany` exchanges in flight at once for one `get_many`.
const PARALLEL_BATCHES: usize = 16;
/// Lookups in flight at once while `get_many` places its keys, and rounds of them.
const PARALLEL_LOOKUPS: usize = 16;
const MAX_LOOKUP_WAVES: usize = 8;
/// Keys of one successor range: its replica set, the successor list it came from, and
/// the keys' indexes.
struct RangeGroup {
    set: Vec<NodeRef>,
    succs: Vec<NodeRef>,
    keys: Vec<usize>,
}

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
                let budget = self.net.budget(n.addr, 4, GET_MANY_FLOOR, false);
                let answer = self
                    .net
                    .call_within(n.addr, req, budget, GET_MANY_FLOOR)
                    .await;
                let Ok(Response::Blocks(answers)) = answer else {
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
