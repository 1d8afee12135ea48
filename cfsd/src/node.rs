//! A cfs node: V Chord vnodes over one DHash block store. Generic over [`Transport`];
//! reads time only through `tokio::time` and randomness only from a seeded RNG, so the
//! simulator runs this same code.

use crate::cache::ByteLru;
use crate::metrics::Metrics;
use crate::net::{Lookup, LookupError, Net, Timeouts, CLOSER_COUNT};
use crate::store::{BlockStore, PutOutcome, StoreError};
use crate::transport::{Handler, Transport};
use cfs_core::block::{verify, BlockKind, Verified};
use cfs_core::wire::{
    ErrorKind, RemoteError, Request, Response, StatusInfo, Step, VnodeStatus, WireBlock, MAX_BATCH,
    MAX_REFS,
};
use cfs_core::{Id, NodeRef};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    /// The address peers reach this process at; node ids derive from it.
    pub addr: SocketAddr,
    pub replicas: usize,
    pub vnodes: u16,
    pub max_vnodes: u16,
    pub succ_list_len: usize,
    pub cache_bytes: usize,
    pub stabilize_every: Duration,
    pub fix_fingers_every: Duration,
    pub maintain_every: Duration,
    /// How often to look our own id up through a remembered peer, to merge split rings.
    pub rejoin_every: Duration,
    /// How often to re-verify stored blocks (None: never), and how many bytes a round
    /// checks, so a scrub never hogs the disk.
    pub scrub_every: Option<Duration>,
    pub scrub_bytes: u64,
    pub timeouts: Timeouts,
    /// Bytes a source prefix (/24, /48; one address on loopback) may store.
    pub quota_bytes: u64,
    pub server_selection: bool,
    pub path_caching: bool,
    /// Run hashing and store calls on the async task instead of tokio's blocking pool:
    /// the simulator needs this, since paused time may advance while a blocking task runs.
    pub inline_blocking: bool,
}

impl Config {
    pub fn new(addr: SocketAddr) -> Config {
        Config {
            addr,
            replicas: 3,
            vnodes: 1,
            max_vnodes: cfs_core::id::MAX_VNODES,
            succ_list_len: 16,
            cache_bytes: 64 << 20,
            stabilize_every: Duration::from_millis(500),
            fix_fingers_every: Duration::from_millis(500),
            maintain_every: Duration::from_secs(5),
            rejoin_every: Duration::from_secs(20),
            scrub_every: Some(Duration::from_secs(60)),
            scrub_bytes: 64 << 20,
            timeouts: Timeouts::default(),
            quota_bytes: 64 << 30,
            server_selection: true,
            path_caching: true,
            inline_blocking: false,
        }
    }
}

/// One ring position.
struct Vnode {
    me: NodeRef,
    pred: Option<NodeRef>,
    /// Never empty: a ring of one has itself as successor.
    succs: Vec<NodeRef>,
    fingers: Vec<Option<NodeRef>>,
    next_finger: u32,
}

impl Vnode {
    fn new(me: NodeRef) -> Vnode {
        Vnode {
            me,
            pred: None,
            succs: vec![me],
            fingers: vec![None; 160],
            next_finger: 0,
        }
    }

    /// The nodes we know that precede `key`, closest to it first.
    fn closer(&self, key: Id) -> Vec<NodeRef> {
        // Distances computed once per entry, not per comparison: this runs on every
        // lookup step and the finger table repeats its entries (same order as before).
        let mut v: Vec<(f64, NodeRef)> = self
            .fingers
            .iter()
            .flatten()
            .chain(self.succs.iter())
            .chain(self.pred.iter())
            .filter(|n| n.id.in_open(self.me.id, key))
            .map(|n| (n.id.distance_frac(key), *n))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v.dedup_by_key(|(_, n)| (n.addr, n.vnode));
        v.truncate(CLOSER_COUNT);
        v.into_iter().map(|(_, n)| n).collect()
    }

    /// Ring size estimate from the successor list's density.
    fn n_est(&self) -> u32 {
        let last = *self.succs.last().unwrap();
        let frac = self.me.id.distance_frac(last.id);
        if last == self.me || frac <= 0.0 {
            return 1;
        }
        ((self.succs.len() as f64 / frac) as u64).clamp(1, u32::MAX as u64) as u32
    }

    /// Answer one lookup step.
    fn step(&self, key: Id) -> Step {
        if let Some(p) = self.pred {
            if key.in_half_open(p.id, self.me.id) {
                let mut succs = vec![self.me];
                succs.extend(self.succs.iter().filter(|n| **n != self.me));
                succs.truncate(MAX_REFS);
                return Step::Done { from: p.id, succs };
            }
        }
        let succ = self.succs[0];
        if succ == self.me || key.in_half_open(self.me.id, succ.id) {
            return Step::Done {
                from: self.me.id,
                succs: self.succs.iter().take(MAX_REFS).copied().collect(),
            };
        }
        Step::Closer {
            nodes: self.closer(key).into_iter().map(|n| (n, 0)).collect(),
            n_est: self.n_est(),
        }
    }

    /// Zave's successor list: the successor, then its list, cut where it reaches us.
    fn adopt_succs(&mut self, first: NodeRef, list: &[NodeRef], s: usize) {
        let mut out = vec![first];
        for n in list {
            if *n == self.me || out.len() >= s {
                break;
            }
            if !out.contains(n) {
                out.push(*n);
            }
        }
        if first == self.me {
            out = vec![self.me];
        }
        self.succs = out;
    }
}

struct Inner<T: Transport> {
    cfg: Config,
    net: Net<T>,
    store: Arc<dyn BlockStore>,
    cache: Mutex<ByteLru>,
    vnodes: Vec<Mutex<Vnode>>,
    metrics: Metrics,
    /// Peers we have heard of, for re-looking ourselves up after a partition heals.
    seen: Mutex<BTreeSet<SocketAddr>>,
    /// Keys this node recently routed lookups for: only those may enter the path cache.
    routed: Mutex<lru::LruCache<Id, ()>>,
    quota: Mutex<BTreeMap<Vec<u8>, u64>>,
    scrub_cursor: Mutex<Id>,
    /// Until it has joined, a node answers no ring requests: its lone successor list
    /// would claim the whole ring.
    joined: std::sync::atomic::AtomicBool,
    rng: Mutex<rand::rngs::SmallRng>,
}

/// A node; clones share state.
pub struct Node<T: Transport> {
    inner: Arc<Inner<T>>,
}

impl<T: Transport> Clone for Node<T> {
    fn clone(&self) -> Self {
        Node {
            inner: self.inner.clone(),
        }
    }
}

/// How many recently routed keys a node remembers for the path cache.
const ROUTED_KEYS: usize = 4096;

fn remote(kind: ErrorKind, msg: impl Into<String>) -> RemoteError {
    RemoteError::new(kind, msg)
}

/// The quota bucket of a source address.
fn quota_prefix(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => v4.octets().to_vec(),
        IpAddr::V4(v4) => v4.octets()[..3].to_vec(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => quota_prefix(IpAddr::V4(v4)),
            None if v6.is_loopback() => v6.octets().to_vec(),
            None => v6.octets()[..6].to_vec(),
        },
    }
}

impl<T: Transport> Node<T> {
    pub fn new(cfg: Config, transport: T, store: Arc<dyn BlockStore>) -> Node<T> {
        let mut net = Net::new(transport, cfg.timeouts, Some(cfg.addr));
        net.server_selection = cfg.server_selection;
        let vnodes = (0..cfg.vnodes)
            .map(|v| Mutex::new(Vnode::new(NodeRef::new(cfg.addr, v))))
            .collect();
        let seed = cfs_core::id::node_id(cfg.addr, 0).prefix_u64();
        Node {
            inner: Arc::new(Inner {
                cache: Mutex::new(ByteLru::new(cfg.cache_bytes)),
                net,
                store,
                vnodes,
                metrics: Metrics::default(),
                seen: Mutex::default(),
                // Unbounded with a manual cap: a bounded LruCache allocates its whole
                // table up front, which adds up over thousands of simulated nodes.
                routed: Mutex::new(lru::LruCache::unbounded()),
                quota: Mutex::default(),
                scrub_cursor: Mutex::new(Id::ZERO),
                joined: std::sync::atomic::AtomicBool::new(false),
                rng: Mutex::new(rand::rngs::SmallRng::seed_from_u64(seed)),
                cfg,
            }),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.cfg.addr
    }
    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
    pub fn net(&self) -> &Net<T> {
        &self.inner.net
    }
    pub fn store(&self) -> &Arc<dyn BlockStore> {
        &self.inner.store
    }

    /// Ring ids of this process's vnodes.
    pub fn ids(&self) -> Vec<NodeRef> {
        self.inner
            .vnodes
            .iter()
            .map(|v| v.lock().unwrap().me)
            .collect()
    }

    pub fn successors(&self, vnode: u16) -> Vec<NodeRef> {
        self.inner.vnodes[vnode as usize]
            .lock()
            .unwrap()
            .succs
            .clone()
    }

    pub fn predecessor(&self, vnode: u16) -> Option<NodeRef> {
        self.inner.vnodes[vnode as usize].lock().unwrap().pred
    }

    /// Join the ring through `bootstrap` (any member), or start a new ring if None.
    /// Vnodes after the first join through the first.
    pub async fn join(&self, bootstrap: Option<SocketAddr>) -> Result<(), LookupError> {
        let first = match bootstrap {
            Some(b) => NodeRef::new(b, 0),
            None => self.ids()[0],
        };
        let start_at = if bootstrap.is_some() { 0 } else { 1 };
        if bootstrap.is_none() {
            // A new ring: this node is all of it, and its other vnodes join through it.
            self.mark_joined();
        }
        for v in start_at..self.inner.cfg.vnodes {
            let me = self.ids()[v as usize];
            let l = self.inner.net.lookup(vec![first], me.id, None).await?;
            let mut vn = self.inner.vnodes[v as usize].lock().unwrap();
            // A joiner copies the successor list of the member it joins behind.
            let succs: Vec<NodeRef> = l.succs.iter().filter(|n| **n != me).copied().collect();
            if let Some(s0) = succs.first().copied() {
                vn.adopt_succs(s0, &succs[1..], self.inner.cfg.succ_list_len);
            }
            self.note_seen(l.succs.iter().map(|n| n.addr));
        }
        if let Some(b) = bootstrap {
            self.note_seen([b]);
        }
        self.mark_joined();
        Ok(())
    }

    fn mark_joined(&self) {
        self.inner
            .joined
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn check_joined(&self) -> Result<(), RemoteError> {
        if self.inner.joined.load(std::sync::atomic::Ordering::Acquire) {
            Ok(())
        } else {
            Err(remote(
                ErrorKind::Busy,
                "not part of the ring yet (joining)",
            ))
        }
    }

    /// Peers this node has heard of, successors first: what a restart can rejoin through.
    pub fn known_peers(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for v in &self.inner.vnodes {
            let v = v.lock().unwrap();
            out.extend(v.succs.iter().chain(v.pred.iter()).map(|n| n.addr));
        }
        out.extend(self.inner.seen.lock().unwrap().iter().copied());
        let me = self.inner.cfg.addr;
        let mut seen = std::collections::BTreeSet::new();
        out.retain(|a| *a != me && seen.insert(*a));
        out
    }

    fn note_seen(&self, addrs: impl IntoIterator<Item = SocketAddr>) {
        let mut s = self.inner.seen.lock().unwrap();
        for a in addrs {
            if a != self.inner.cfg.addr {
                s.insert(a);
            }
        }
        while s.len() > 256 {
            let i = self.inner.rng.lock().unwrap().random_range(0..s.len());
            let k = *s.iter().nth(i).unwrap();
            s.remove(&k);
        }
    }

    /// Spawn the periodic maintenance tasks on the current tokio runtime.
    pub fn start(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for v in 0..self.inner.cfg.vnodes {
            let n = self.clone();
            tasks.push(tokio::spawn(async move {
                let jitter = n.jitter(n.inner.cfg.stabilize_every);
                tokio::time::sleep(jitter).await;
                loop {
                    n.stabilize(v).await;
                    n.check_predecessor(v).await;
                    n.fix_finger(v).await;
                    tokio::time::sleep(n.inner.cfg.stabilize_every).await;
                }
            }));
        }
        let n = self.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(
                    n.inner.cfg.maintain_every + n.jitter(n.inner.cfg.maintain_every / 4),
                )
                .await;
                n.maintain().await;
            }
        }));
        let n = self.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(
                    n.inner.cfg.rejoin_every + n.jitter(n.inner.cfg.rejoin_every / 4),
                )
                .await;
                n.rejoin().await;
            }
        }));
        if let Some(every) = self.inner.cfg.scrub_every {
            let n = self.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every + n.jitter(every / 4)).await;
                    n.scrub().await;
                }
            }));
        }
        tasks
    }

    /// Re-verify stored blocks (with collision detection), resuming where the last round
    /// stopped. A block that no longer matches its key (bit rot, a tampered file) is
    /// dropped; maintenance then restores it from the other replicas.
    pub async fn scrub(&self) {
        let Ok(list) = self.inner.store.list() else {
            return;
        };
        let start = *self.inner.scrub_cursor.lock().unwrap();
        let first = list.iter().position(|(_, k, _)| *k > start).unwrap_or(0);
        let mut checked = 0u64;
        let mut last = start;
        for (kind, key, ver) in list.iter().cycle().skip(first).take(list.len()) {
            if checked >= self.inner.cfg.scrub_bytes {
                break;
            }
            last = *key;
            let store = self.inner.store.clone();
            let (kind, key) = (*kind, *key);
            let bad = self
                .blocking(move || match store.get(kind, key) {
                    Ok(Some(b)) => {
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
                let _ = self.inner.store.remove_if(kind, key, *ver);
            }
        }
        *self.inner.scrub_cursor.lock().unwrap() = last;
    }

    fn jitter(&self, max: Duration) -> Duration {
        let ms = max.as_millis().max(1) as u64;
        Duration::from_millis(self.inner.rng.lock().unwrap().random_range(0..ms))
    }

    async fn alive(&self, n: NodeRef) -> bool {
        if n.addr == self.inner.cfg.addr {
            return true;
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

    /// Zave's stabilize: drop a dead first successor, else adopt its list, and its
    /// predecessor if that one lies between and is alive; then rectify the successor.
    pub async fn stabilize(&self, v: u16) {
        Metrics::inc(&self.inner.metrics.stabilize_rounds);
        let s = self.inner.cfg.succ_list_len;
        let (me, succ, pred) = {
            let vn = self.inner.vnodes[v as usize].lock().unwrap();
            (vn.me, vn.succs[0], vn.pred)
        };
        if succ == me {
            // Ring of one: a predecessor that rectified us is our way out.
            if let Some(p) = pred {
                if p != me && self.alive(p).await {
                    if let Some((_, list)) = self.neighbors(p).await {
                        self.inner.vnodes[v as usize]
                            .lock()
                            .unwrap()
                            .adopt_succs(p, &list, s);
                    }
                }
            }
        } else {
            match self.neighbors(succ).await {
                None => {
                    let mut vn = self.inner.vnodes[v as usize].lock().unwrap();
                    if vn.succs.first() == Some(&succ) {
                        vn.succs.remove(0);
                        if vn.succs.is_empty() {
                            vn.succs.push(me);
                        }
                    }
                    for f in vn.fingers.iter_mut() {
                        if *f == Some(succ) {
                            *f = None;
                        }
                    }
                    return;
                }
                Some((p, list)) => {
                    self.note_seen(list.iter().map(|n| n.addr));
                    let mut adopted = false;
                    if let Some(p) = p {
                        if p != me
                            && p.valid(self.inner.cfg.max_vnodes)
                            && p.id.in_open(me.id, succ.id)
                            && self.alive(p).await
                        {
                            if let Some((_, plist)) = self.neighbors(p).await {
                                self.inner.vnodes[v as usize]
                                    .lock()
                                    .unwrap()
                                    .adopt_succs(p, &plist, s);
                                adopted = true;
                            }
                        }
                    }
                    if !adopted {
                        self.inner.vnodes[v as usize]
                            .lock()
                            .unwrap()
                            .adopt_succs(succ, &list, s);
                    }
                }
            }
        }
        let succ = self.inner.vnodes[v as usize].lock().unwrap().succs[0];
        if succ != me {
            let req = Request::Rectify {
                vnode: succ.vnode,
                candidate: me,
            };
            if succ.addr == self.inner.cfg.addr {
                self.rectify(succ.vnode, me).await;
            } else {
                let _ = self.inner.net.call(succ.addr, req).await;
            }
        }
    }

    /// Take `cand` as predecessor if it lies between the current one and us, or if the
    /// current one is dead. The candidate must answer at its address first.
    async fn rectify(&self, v: u16, cand: NodeRef) {
        let (me, pred) = {
            let vn = self.inner.vnodes[v as usize].lock().unwrap();
            (vn.me, vn.pred)
        };
        if cand == me || Some(cand) == pred {
            return;
        }
        let take = match pred {
            None => true,
            Some(p) if cand.id.in_open(p.id, me.id) => true,
            Some(p) => !self.alive(p).await,
        };
        if take && self.alive(cand).await {
            self.inner.vnodes[v as usize].lock().unwrap().pred = Some(cand);
            self.note_seen([cand.addr]);
        }
    }

    async fn check_predecessor(&self, v: u16) {
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
    async fn fix_finger(&self, v: u16) {
        let (me, i) = {
            let vn = self.inner.vnodes[v as usize].lock().unwrap();
            (vn.me, vn.next_finger)
        };
        let start = me.id.add_pow2(i);
        let Ok(l) = self.lookup_from(v, start, None).await else {
            return;
        };
        let f = l.succs[0];
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
                from,
                succs,
                path: vec![me],
                hops: 0,
                found: None,
            }),
            Step::Closer { nodes, n_est } => {
                self.inner.net.note_ring_size(n_est);
                let start = nodes.into_iter().map(|(n, _)| n).collect();
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

    /// Look our own id up through a remembered peer: if it knows a closer successor,
    /// take it, so rings split by a partition merge after it heals.
    async fn rejoin(&self) {
        let peer = {
            let s = self.inner.seen.lock().unwrap();
            if s.is_empty() {
                return;
            }
            let i = self.inner.rng.lock().unwrap().random_range(0..s.len());
            *s.iter().nth(i).unwrap()
        };
        for v in 0..self.inner.cfg.vnodes {
            let me = self.ids()[v as usize];
            let Ok(l) = self
                .inner
                .net
                .lookup(vec![NodeRef::new(peer, 0)], me.id, None)
                .await
            else {
                return;
            };
            let cand = l.succs.iter().find(|n| **n != me).copied();
            if let Some(c) = cand {
                let succ = self.successors(v)[0];
                if (succ == me || c.id.in_open(me.id, succ.id)) && self.alive(c).await {
                    tracing::info!(vnode = v, new_succ = ?c, "found a closer successor through a remembered peer");
                    let mut vn = self.inner.vnodes[v as usize].lock().unwrap();
                    let rest = vn.succs.clone();
                    vn.adopt_succs(c, &rest, self.inner.cfg.succ_list_len);
                }
            }
        }
    }

    /// DHash maintenance: every holder pushes each block to the replicas of its key that
    /// lack it (asked in batches, so nothing they hold is resent), and a holder outside
    /// the set drops its copy once every replica says it holds it.
    pub async fn maintain(&self) {
        let Ok(list) = self.inner.store.list() else {
            return;
        };
        let r = self.inner.cfg.replicas;
        let me = self.inner.cfg.addr;
        let mut i = 0;
        while i < list.len() {
            let key = list[i].1;
            let Ok(l) = self.lookup_from(0, key, None).await else {
                i += 1;
                continue;
            };
            // All held keys in (from, succs[0]] share this replica set.
            let mut group = Vec::new();
            while i < list.len() && list[i].1.in_half_open(l.from, l.succs[0].id) {
                group.push(list[i]);
                i += 1;
            }
            if group.is_empty() {
                // The answer did not cover the key (the ring is moving): skip it this round.
                i += 1;
                continue;
            }
            let set = self.inner.net.replicas(&l.succs, r).await;
            // Every holder pushes, not only the first replica: the first may be the one
            // that lost the block (a scrub dropped it, a disk was replaced).
            let inside = set.iter().any(|n| n.addr == me);
            let items: Vec<(BlockKind, Id)> = group.iter().map(|(k, id, _)| (*k, *id)).collect();
            let mut confirmed = vec![0usize; group.len()];
            for target in set.iter().filter(|n| n.addr != me) {
                let Ok(have) = self.inner.net.has(target.addr, &items).await else {
                    continue;
                };
                let mut missing = Vec::new();
                for (j, (_, _, ver)) in group.iter().enumerate() {
                    if have[j].is_some_and(|v| v >= *ver) {
                        confirmed[j] += 1;
                    } else {
                        missing.push(j);
                    }
                }
                // Push what the replica lacks, batched: one request and commit per run.
                let blocks: Vec<Option<Vec<u8>>> = missing
                    .iter()
                    .map(|&j| self.inner.store.get(group[j].0, group[j].1).ok().flatten())
                    .collect();
                let sizes: Vec<usize> = blocks
                    .iter()
                    .map(|b| b.as_ref().map_or(0, |b| b.len()))
                    .collect();
                let idx: Vec<usize> = (0..missing.len()).collect();
                for run in crate::net::chunk_by_bytes(&idx, |i| sizes[i]) {
                    let wire: Vec<WireBlock> = run
                        .iter()
                        .filter_map(|&i| {
                            let (kind, key, _) = group[missing[i]];
                            blocks[i]
                                .clone()
                                .map(|bytes| WireBlock { kind, key, bytes })
                        })
                        .collect();
                    let sent: Vec<usize> = run
                        .iter()
                        .filter(|&&i| blocks[i].is_some())
                        .map(|&i| missing[i])
                        .collect();
                    let req = Request::PutMany {
                        blocks: wire,
                        transfer: true,
                    };
                    if let Ok(Response::StoredMany(answers)) =
                        self.inner.net.call(target.addr, req).await
                    {
                        for (j, a) in sent.iter().zip(answers) {
                            if a.is_ok() {
                                Metrics::inc(&self.inner.metrics.repairs_sent);
                                confirmed[*j] += 1;
                            }
                        }
                    }
                }
            }
            if !inside && set.len() >= r {
                for (j, (kind, key, ver)) in group.iter().enumerate() {
                    if confirmed[j] >= r && self.held_by_all(&set, *kind, *key, *ver).await {
                        let store = self.inner.store.clone();
                        let (kind, key, ver) = (*kind, *key, *ver);
                        let _ = self.blocking(move || store.remove_if(kind, key, ver)).await;
                        Metrics::inc(&self.inner.metrics.handoffs_dropped);
                    }
                }
            }
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

    pub fn status(&self) -> StatusInfo {
        let vnodes = self
            .inner
            .vnodes
            .iter()
            .map(|v| {
                let v = v.lock().unwrap();
                let mut fingers: Vec<NodeRef> = v.fingers.iter().flatten().copied().collect();
                fingers.dedup();
                VnodeStatus {
                    me: v.me,
                    pred: v.pred,
                    succs: v.succs.clone(),
                    fingers,
                }
            })
            .collect();
        let (blocks, bytes) = self.inner.store.usage();
        let (cache_blocks, cache_bytes) = self.inner.cache.lock().unwrap().usage();
        StatusInfo {
            addr: self.inner.cfg.addr,
            replicas: self.inner.cfg.replicas as u8,
            vnodes,
            blocks,
            bytes,
            cache_blocks,
            cache_bytes,
            counters: self.inner.metrics.snapshot(),
        }
    }

    fn vnode(&self, v: u16) -> Result<&Mutex<Vnode>, RemoteError> {
        self.inner
            .vnodes
            .get(v as usize)
            .ok_or_else(|| remote(ErrorKind::BadRequest, format!("no vnode {v} here")))
    }

    fn refuse(&self, e: RemoteError) -> RemoteError {
        Metrics::inc(&self.inner.metrics.refused_requests);
        e
    }

    /// Is `ip` a ring member we know (its transfers are not charged to a quota)?
    fn is_member(&self, ip: IpAddr) -> bool {
        self.inner.vnodes.iter().any(|v| {
            let v = v.lock().unwrap();
            v.succs
                .iter()
                .chain(v.pred.iter())
                .any(|n| n.addr.ip() == ip && !ip.is_loopback())
        })
    }

    /// Store a batch of blocks from `peer`: quota, verification with collision
    /// detection, one store commit. One answer per block (true: new to this node).
    async fn put_many(
        &self,
        peer: SocketAddr,
        blocks: Vec<WireBlock>,
        transfer: bool,
    ) -> Vec<Result<bool, RemoteError>> {
        let m = &self.inner.metrics;
        // Charged per source prefix. Transfers are exempt only from a ring member's own
        // address off loopback (on loopback every process is 127.0.0.1, so everything is
        // charged to that one bucket; its quota is sized for a local ring). The charge is
        // reserved before the work, so parallel requests cannot all pass one check.
        let member = transfer && !peer.ip().is_loopback() && self.is_member(peer.ip());
        let prefix = quota_prefix(peer.ip());
        let quota = self.inner.cfg.quota_bytes;
        let mut answers: Vec<Option<Result<bool, RemoteError>>> = vec![None; blocks.len()];
        let mut todo = Vec::with_capacity(blocks.len());
        {
            let mut q = self.inner.quota.lock().unwrap();
            let used = q.entry(prefix.clone()).or_default();
            for (i, b) in blocks.into_iter().enumerate() {
                let len = b.bytes.len() as u64;
                if !member && *used + len > quota {
                    Metrics::inc(&m.refused_quota);
                    answers[i] = Some(Err(remote(
                        ErrorKind::Quota,
                        format!("storage quota of {quota} bytes for your address is used up"),
                    )));
                    continue;
                }
                if !member {
                    *used += len;
                }
                todo.push((i, b));
            }
        }
        // Verify and store off the async workers: hashing and fsync take a while.
        let store = self.inner.store.clone();
        let done = self
            .blocking(move || {
                let mut ok = Vec::new();
                let mut out = Vec::new();
                for (i, b) in todo {
                    let len = b.bytes.len() as u64;
                    match verify(b.kind, b.key, b.bytes, true) {
                        Ok(v) => ok.push((i, len, v)),
                        Err(e) => out.push((i, len, Err(e.to_string()))),
                    }
                }
                // The verified blocks move into the store: no copy of their bytes.
                let (slots, vs): (Vec<(usize, u64)>, Vec<Verified>) =
                    ok.into_iter().map(|(i, len, v)| ((i, len), v)).unzip();
                for ((i, len), r) in slots.into_iter().zip(store.put_many(vs)) {
                    out.push((i, len, Ok(r)));
                }
                out
            })
            .await;
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                return answers
                    .into_iter()
                    .map(|a| a.unwrap_or_else(|| Err(e.clone())))
                    .collect()
            }
        };
        let mut refund = 0u64;
        for (i, len, r) in done {
            if !member && !matches!(r, Ok(Ok(PutOutcome::Stored))) {
                refund += len;
            }
            answers[i] = Some(match r {
                Err(why) => {
                    Metrics::inc(&m.refused_invalid);
                    tracing::debug!(%peer, error = %why, "refused block");
                    Err(remote(ErrorKind::Invalid, why))
                }
                Ok(Ok(PutOutcome::Stored)) => {
                    Metrics::inc(&m.puts_stored);
                    Ok(true)
                }
                Ok(Ok(PutOutcome::Present)) => {
                    Metrics::inc(&m.puts_present);
                    Ok(false)
                }
                Ok(Err(e @ (StoreError::Stale { .. } | StoreError::Conflict(_)))) => {
                    Metrics::inc(&m.refused_stale);
                    Err(remote(ErrorKind::Stale, e.to_string()))
                }
                Ok(Err(e)) => Err(remote(ErrorKind::Storage, e.to_string())),
            });
        }
        if refund > 0 {
            // Only bytes newly stored stay charged.
            let mut q = self.inner.quota.lock().unwrap();
            let used = q.entry(prefix).or_default();
            *used = used.saturating_sub(refund);
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(remote(ErrorKind::Storage, "block not processed"))))
            .collect()
    }

    /// Run CPU- or disk-bound work off the async workers (or inline, see `Config`).
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, RemoteError> {
        if self.inner.cfg.inline_blocking {
            return Ok(f());
        }
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| remote(ErrorKind::Storage, e.to_string()))
    }

    /// A block from the permanent store, else the path cache. Read inline: blocks are
    /// mostly in the page cache, and a hop through the blocking pool measured slower
    /// (cold 256 MiB read 0.54 s inline vs 0.62 s through the pool).
    async fn lookup_block(&self, kind: BlockKind, key: Id) -> Option<Vec<u8>> {
        if let Ok(Some(b)) = self.inner.store.get(kind, key) {
            return Some(b);
        }
        let hit = self.inner.cache.lock().unwrap().get(kind, key);
        let m = &self.inner.metrics;
        Metrics::inc(if hit.is_some() {
            &m.cache_hits
        } else {
            &m.cache_misses
        });
        hit
    }
}

impl<T: Transport> Handler for Node<T> {
    async fn handle(
        &self,
        peer: SocketAddr,
        _from: Option<SocketAddr>,
        req: Request,
    ) -> Result<Response, RemoteError> {
        let m = &self.inner.metrics;
        match req {
            Request::Ping => Ok(Response::Pong {
                vnodes: self.inner.cfg.vnodes,
            }),
            Request::FindStep { vnode, key, want } => {
                self.check_joined()?;
                Metrics::inc(&m.lookups_served);
                if let Some(kind) = want.filter(|k| k.is_content()) {
                    if let Some(b) = self.lookup_block(kind, key).await {
                        return Ok(Response::Step(Step::Found(b)));
                    }
                }
                let step = self.vnode(vnode)?.lock().unwrap().step(key);
                {
                    let mut routed = self.inner.routed.lock().unwrap();
                    routed.put(key, ());
                    if routed.len() > ROUTED_KEYS {
                        routed.pop_lru();
                    }
                }
                Ok(Response::Step(step))
            }
            Request::Neighbors { vnode } => {
                self.check_joined()?;
                let v = self.vnode(vnode)?.lock().unwrap();
                Ok(Response::Neighbors {
                    pred: v.pred,
                    succs: v.succs.iter().take(MAX_REFS).copied().collect(),
                })
            }
            Request::Rectify { vnode, candidate } => {
                self.check_joined()?;
                self.vnode(vnode)?;
                if !candidate.valid(self.inner.cfg.max_vnodes) {
                    return Err(self.refuse(remote(
                        ErrorKind::BadRequest,
                        "candidate has an invalid address or vnode",
                    )));
                }
                // In the background: deciding may need to ping a dead predecessor, which
                // takes a timeout the caller should not wait for.
                let n = self.clone();
                tokio::spawn(async move { n.rectify(vnode, candidate).await });
                Ok(Response::Ok)
            }
            Request::Put {
                kind,
                key,
                bytes,
                transfer,
            } => {
                let b = WireBlock { kind, key, bytes };
                let mut r = self.put_many(peer, vec![b], transfer).await;
                r.pop()
                    .expect("one answer per block")
                    .map(|fresh| Response::Stored { fresh })
            }
            Request::PutMany { blocks, transfer } => {
                if blocks.len() > MAX_BATCH {
                    return Err(self.refuse(remote(
                        ErrorKind::BadRequest,
                        format!("at most {MAX_BATCH} blocks per PutMany"),
                    )));
                }
                Ok(Response::StoredMany(
                    self.put_many(peer, blocks, transfer).await,
                ))
            }
            Request::Get { kind, key } => {
                Metrics::inc(&m.gets_served);
                let b = self.lookup_block(kind, key).await;
                if b.is_none() {
                    Metrics::inc(&m.gets_missed);
                }
                Ok(Response::Block(b))
            }
            Request::Has { items } => {
                if items.len() > MAX_BATCH {
                    return Err(self.refuse(remote(
                        ErrorKind::BadRequest,
                        format!("at most {MAX_BATCH} items per Has"),
                    )));
                }
                let store = self.inner.store.clone();
                let have = self
                    .blocking(move || {
                        items
                            .iter()
                            .map(|(k, id)| store.version(*k, *id).ok().flatten())
                            .collect()
                    })
                    .await?;
                Ok(Response::Have(have))
            }
            Request::Cache { kind, key, bytes } => {
                // Only content blocks for lookups this node just routed, verified first.
                if !kind.is_content() || !self.inner.routed.lock().unwrap().contains(&key) {
                    return Ok(Response::Ok);
                }
                match verify(kind, key, bytes, false) {
                    Ok(v) => {
                        Metrics::inc(&m.cache_inserts);
                        self.inner
                            .cache
                            .lock()
                            .unwrap()
                            .insert(kind, key, v.into_bytes());
                        Ok(Response::Ok)
                    }
                    Err(e) => {
                        Metrics::inc(&m.refused_invalid);
                        Err(remote(ErrorKind::Invalid, e.to_string()))
                    }
                }
            }
            Request::Status => Ok(Response::Status(Box::new(self.status()))),
        }
    }

    fn refused_input(&self, peer: SocketAddr, why: &str) {
        Metrics::inc(&self.inner.metrics.refused_input);
        tracing::debug!(%peer, why, "closed connection");
    }
}
