//! A cfs node: V Chord vnodes over one DHash block store. Generic over [`Transport`];
//! reads time only through `tokio::time` and randomness only from a seeded RNG, so the
//! simulator runs this same code.

use crate::cache::Refusal;
pub use crate::config::Config;
use crate::lease::Room;
use crate::metrics::Metrics;
use crate::quota::{Charge, Quota};
use crate::state::remote;
pub use crate::state::Node;
use crate::store::{PutOutcome, StoreError};
use crate::vnode::Vnode;
use cfs_core::block::BlockKind;
use cfs_core::block::{verify, Verified};
use cfs_core::ring::{group, in_replica_reach, same_host, source_bucket, source_network, Level};
use cfs_core::wire::{
    ErrorKind, RemoteError, Request, Response, StatusInfo, Step, VnodeStatus, WireBlock, MAX_BATCH,
    MAX_REFS,
};
use cfs_core::{Id, NodeRef};
use cfs_net::net::LookupError;
use cfs_net::transport::{Handler, Transport};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

/// How often changed storage charges are written to the store.
const CHARGES_SAVE_EVERY: Duration = Duration::from_secs(2);
/// How long a pushed copy waits for another holder to confirm it.
const HELD_ELSEWHERE_WAIT: Duration = Duration::from_millis(500);

impl<T: Transport> Node<T> {
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
            // A joiner copies the successor list of the member it joins behind, checked
            // entry by entry like any list a peer hands us.
            let succs: Vec<NodeRef> = l.succs.iter().filter(|n| **n != me).copied().collect();
            if let Some(s0) = succs.first().copied() {
                if !self.alive(s0).await {
                    return Err(LookupError::NoRoute {
                        key: me.id,
                        last: format!("the successor named for us, {}, does not answer", s0.addr),
                    });
                }
                self.adopt_checked(v, s0, &succs[1..]).await;
            }
        }
        if let Some(b) = bootstrap {
            self.note_seen([b]);
            *self.inner.joined_at.lock().unwrap() = Some(tokio::time::Instant::now());
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

    /// Run `work` forever on its own task: first after `first`, then each time after
    /// `pause` (asked anew, so it can carry fresh jitter).
    fn periodic<F, Fut>(
        &self,
        first: Duration,
        pause: impl Fn(&Self) -> Duration + Send + 'static,
        work: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Self) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let n = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(first).await;
            loop {
                work(n.clone()).await;
                tokio::time::sleep(pause(&n)).await;
            }
        })
    }

    /// Spawn the periodic maintenance tasks on the current tokio runtime.
    pub fn start(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let cfg = &self.inner.cfg;
        let mut tasks = Vec::new();
        for v in 0..cfg.vnodes {
            let every = cfg.stabilize_every;
            tasks.push(self.periodic(
                self.jitter(every),
                move |_| every,
                move |n| async move {
                    n.stabilize(v).await;
                    n.check_predecessor(v).await;
                },
            ));
            // Fingers on a loop of their own: a finger lookup through peers that
            // vanished (a partition drops packets) can take the whole lookup deadline,
            // and the successor list must not wait for it.
            let every = cfg.fix_fingers_every;
            tasks.push(self.periodic(
                self.jitter(every),
                move |_| every,
                move |n| async move { n.fix_finger(v).await },
            ));
        }
        // The slower rounds: a period plus up to a quarter of it at random each time.
        let spread = |every: Duration| move |n: &Self| every + n.jitter(every / 4);
        let every = cfg.maintain_every;
        tasks.push(
            self.periodic(spread(every)(self), spread(every), |n| async move {
                n.maintain().await
            }),
        );
        let every = cfg.rejoin_every;
        tasks.push(
            self.periodic(spread(every)(self), spread(every), |n| async move {
                n.rejoin().await
            }),
        );
        if let Some(every) = cfg.scrub_every {
            tasks.push(
                self.periodic(spread(every)(self), spread(every), |n| async move {
                    n.scrub().await
                }),
            );
        }
        tasks.push(self.periodic(
            CHARGES_SAVE_EVERY,
            |_| CHARGES_SAVE_EVERY,
            |n| async move { n.save_charges().await },
        ));
        tasks
    }

    /// Write the storage charges that changed since the last save.
    pub async fn save_charges(&self) {
        let store = self.inner.store.clone();
        let m = self.clone();
        let now = self.now_unix();
        let _ = self
            .blocking(move || m.inner.quota.save(&*store, now))
            .await;
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
        let (cache_blocks, cache_bytes) = self.inner.cache.lock().unwrap().lru.usage();
        StatusInfo {
            addr: self.inner.cfg.addr,
            replicas: self.inner.cfg.replicas as u8,
            vnodes,
            blocks,
            bytes,
            cache_blocks,
            cache_bytes,
            counters: {
                let mut c = self.inner.metrics.snapshot();
                c.push(("started_unix".into(), self.inner.started));
                c.push(("blocks_below_r".into(), self.blocks_below_r()));
                c
            },
        }
    }

    /// Blocks this node counted below r in its last finished maintenance round.
    pub fn blocks_below_r(&self) -> u64 {
        self.inner
            .below_r
            .load(std::sync::atomic::Ordering::Relaxed)
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

    /// A batched request of `n` items is refused past [`MAX_BATCH`].
    fn check_batch(&self, n: usize, what: &str) -> Result<(), RemoteError> {
        if n > MAX_BATCH {
            return Err(self.refuse(remote(
                ErrorKind::BadRequest,
                format!("at most {MAX_BATCH} items per {what}"),
            )));
        }
        Ok(())
    }

    /// May `peer` push `key` naming no source, to be taken past its own room when
    /// another holder confirms it? Only a checked neighbour (`ring_pusher`) off loopback,
    /// where an address names a host.
    pub(crate) fn free_transfer(&self, peer: IpAddr, key: Id) -> bool {
        !peer.is_loopback() && self.ring_pusher(peer, key)
    }

    /// May `peer` push `key` to this node as ring maintenance, naming the source it is
    /// charged to? Only a checked neighbour (a successor or the predecessor, which
    /// answered our pings), by its IP address (on loopback every local process shares
    /// one, so there any local process at a member's address passes), and only for a key
    /// this node plausibly replicates by its own view of the ring.
    pub(crate) fn ring_pusher(&self, peer: IpAddr, key: Id) -> bool {
        let peer = SocketAddr::new(peer, 0);
        let r = self.inner.cfg.replicas;
        self.inner.vnodes.iter().any(|v| {
            let v = v.lock().unwrap();
            let neighbour = v
                .succs
                .iter()
                .chain(v.pred.iter())
                .any(|n| same_host(SocketAddr::new(n.addr.ip(), 0), peer));
            // A ring too small to estimate is all within reach of every member.
            neighbour
                && v.n_est()
                    .is_none_or(|n| in_replica_reach(key, v.me.id, r, n))
        })
    }

    /// Which of `items` another holder has: asked of up to two of this node's ring
    /// neighbours (predecessors and first successors) other than the pusher, outside its
    /// prefix where there are such, so a party cannot vouch for the junk it pushes from
    /// another of its addresses.
    async fn held_elsewhere(
        &self,
        pusher: SocketAddr,
        items: &[(BlockKind, Id)],
    ) -> BTreeSet<(BlockKind, Id)> {
        let mut out = BTreeSet::new();
        if items.is_empty() {
            return out;
        }
        let me = self.inner.cfg.addr;
        let mut asked: Vec<SocketAddr> = Vec::new();
        for v in &self.inner.vnodes {
            let v = v.lock().unwrap();
            for n in v.pred.iter().chain(v.succs.iter().take(2)) {
                if !same_host(n.addr, me)
                    && !same_host(n.addr, pusher)
                    && !asked.iter().any(|a| same_host(*a, n.addr))
                {
                    asked.push(n.addr);
                }
            }
        }
        // Outside the pusher's prefix where the neighbourhood has such nodes; a small
        // ring in one prefix (a lab) asks other hosts, as its replicas are spread.
        let theirs = group(pusher, Level::Prefix);
        if asked.iter().any(|a| group(*a, Level::Prefix) != theirs) {
            asked.retain(|a| group(*a, Level::Prefix) != theirs);
        }
        // Asked at once, each for a moment only: the push waits on this, holding one
        // of its source's request slots, and a neighbour across a partition or hung
        // must not hold up ring maintenance (unconfirmed only means charged).
        let calls = asked.into_iter().take(2).map(|addr| {
            let net = self.inner.net.clone();
            let items = items.to_vec();
            async move {
                tokio::time::timeout(HELD_ELSEWHERE_WAIT, net.has(addr, &items))
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        });
        for have in cfs_net::net::join_all(calls).await.into_iter().flatten() {
            for (item, h) in items.iter().zip(have) {
                if h.is_some() {
                    out.insert(*item);
                }
            }
        }
        out
    }

    /// Store a batch of blocks from `peer`: capacity, quota, verification with collision
    /// detection, one store commit. One answer per block (true: new to this node).
    async fn put_many(
        &self,
        peer: SocketAddr,
        blocks: Vec<WireBlock>,
        transfer: bool,
    ) -> Vec<Result<bool, RemoteError>> {
        let m = &self.inner.metrics;
        let now = self.now_unix();
        // Charged per source bucket by space-time (bytes plus a per-block overhead, times
        // the lease) and by what it holds at once, reserved before the work so parallel
        // requests cannot all pass one check, settled for what was not new. A checked
        // neighbour's transfer is charged to the source it names (who paid for its copy),
        // else to the sender; past their room, see `short` below.
        let mut buckets: BTreeMap<IpAddr, Vec<u8>> = BTreeMap::new();
        let mut bucket_of = |ip: IpAddr| {
            buckets
                .entry(ip)
                .or_insert_with(|| self.inner.quota.bucket_for(&source_bucket(ip)))
                .clone()
        };
        let mut answers: Vec<Option<Result<bool, RemoteError>>> = vec![None; blocks.len()];
        let ids: Vec<(BlockKind, Id)> = blocks.iter().map(|b| (b.kind, b.key)).collect();
        let free_bucket = Quota::free_bucket(&source_network(peer.ip()));
        let mut todo = Vec::with_capacity(blocks.len());
        // Blocks past their payer's room, settled once other holders were asked.
        let mut short = Vec::new();
        let mut room = Room::new(&self.inner.incoming);
        let space = self.inner.store.space();
        for (i, b) in blocks.into_iter().enumerate() {
            let until = self.lease_until(now, b.lease);
            let held = || matches!(self.inner.store.held(b.kind, b.key), Ok(Some(_)));
            if let Err(e) = self.check_room(&mut room, b.bytes.len() as u64, space, held) {
                answers[i] = Some(Err(e));
                continue;
            }
            // Who pays: the named source of a neighbour's transfer, else the sender.
            let named = match b.source {
                Some(s) if transfer && self.ring_pusher(peer.ip(), b.key) => Some(s),
                _ => None,
            };
            let payer = named.unwrap_or(peer.ip());
            let bucket = bucket_of(payer);
            match self.charge(&bucket, b.bytes.len() as u64, now, until) {
                Ok(charge) => todo.push((
                    i,
                    Paid {
                        charge,
                        bucket,
                        source: Some(payer),
                    },
                    until,
                    b,
                )),
                Err(e) => {
                    // A copy a checked neighbour's maintenance pushes, new to this node,
                    // may still be taken (a block must not stay below r): see below.
                    let copy = transfer
                        && !held()
                        && (named.is_some()
                            || (b.source.is_none() && self.free_transfer(peer.ip(), b.key)));
                    if copy {
                        short.push((i, until, b, named.is_some(), e));
                    } else {
                        answers[i] = Some(Err(e));
                    }
                }
            }
        }
        // Past its payer's room, a neighbour's copy that another holder confirms is
        // charged to the pushing network's allowance (one quota, like a source's): junk
        // ground into our range exists on the pusher alone. Otherwise a named source's
        // copy is charged to the neighbour that pushed it, and anything else refused.
        // Other holders are asked only here, off the common path, so a push never waits
        // on a third node while its payer has room.
        if !short.is_empty() {
            let items: Vec<(BlockKind, Id)> = short.iter().map(|t| (t.2.kind, t.2.key)).collect();
            let elsewhere = self.held_elsewhere(peer, &items).await;
            let pusher_bucket = bucket_of(peer.ip());
            for (i, until, b, named, e) in short {
                let cost = Quota::cost(b.bytes.len());
                let allowance = elsewhere
                    .contains(&(b.kind, b.key))
                    .then(|| {
                        self.inner
                            .quota
                            .reserve(&free_bucket, cost, now, until)
                            .ok()
                    })
                    .flatten();
                let paid = match allowance {
                    Some(charge) => {
                        Metrics::inc(&m.transfers_free);
                        Paid {
                            charge,
                            bucket: free_bucket.clone(),
                            source: None,
                        }
                    }
                    None => {
                        Metrics::inc(&m.transfers_unconfirmed);
                        match named
                            .then(|| self.charge(&pusher_bucket, b.bytes.len() as u64, now, until))
                        {
                            Some(Ok(charge)) => Paid {
                                charge,
                                bucket: pusher_bucket.clone(),
                                source: Some(peer.ip()),
                            },
                            _ => {
                                answers[i] = Some(Err(e));
                                continue;
                            }
                        }
                    }
                };
                todo.push((i, paid, until, b));
            }
        }
        for bucket in todo.iter().map(|t| &t.1.bucket).collect::<BTreeSet<_>>() {
            // Durable in the same commit as the blocks: a crash cannot keep one without
            // the other (a refund below is saved with a later commit).
            self.inner
                .store
                .stage_charge(bucket, self.inner.quota.encoded(bucket));
        }
        // The other side of a fork of a held root is taken only from ring maintenance,
        // and only when it outranks the held one (`Verified::rank`): replicas converge on
        // one side, while a client's put never replaces a root of the same version (the
        // first one there stays), so a publisher that found its root on every replica
        // keeps it.
        let settle_forks: BTreeSet<usize> = todo
            .iter()
            .filter(|t| {
                transfer && t.3.kind == BlockKind::Root && self.ring_pusher(peer.ip(), t.3.key)
            })
            .map(|t| t.0)
            .collect();
        // Verify and store off the async workers: hashing and fsync take a while.
        let store = self.inner.store.clone();
        let done = self
            .blocking(move || {
                let mut ok = Vec::new();
                let mut out = Vec::new();
                for (i, charge, until, b) in todo {
                    match verify(b.kind, b.key, b.bytes, true) {
                        Ok(v) => {
                            if settle_forks.contains(&i) {
                                replace_losing_fork(&*store, &v);
                            }
                            ok.push((i, charge, (v, until)))
                        }
                        Err(e) => out.push((i, charge, Err(e.to_string()))),
                    }
                }
                // The verified blocks move into the store: no copy of their bytes.
                type Slot = (usize, Paid);
                let (slots, vs): (Vec<Slot>, Vec<(Verified, u64)>) =
                    ok.into_iter().map(|(i, c, v)| ((i, c), v)).unzip();
                for ((i, charge), r) in slots.into_iter().zip(store.put_many(vs)) {
                    out.push((i, charge, Ok(r)));
                }
                out
            })
            .await;
        drop(room);
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                return answers
                    .into_iter()
                    .map(|a| a.unwrap_or_else(|| Err(e.clone())))
                    .collect()
            }
        };
        let mut settled = BTreeSet::new();
        for (i, paid, r) in done {
            let Paid {
                charge,
                bucket,
                source,
            } = paid;
            match &r {
                Ok(Ok(d)) => {
                    let stored = d.outcome == PutOutcome::Stored;
                    self.inner.quota.settle(&bucket, charge, d.before, stored);
                    if let Some(payer) = source.filter(|_| stored) {
                        // Copies our maintenance pushes are charged to the same source.
                        let (kind, key) = ids[i];
                        self.inner.quota.note_payer(kind, key, payer);
                        if payer != peer.ip() {
                            Metrics::inc(&m.transfers_charged_to_source);
                        }
                    }
                }
                _ => self.inner.quota.refund(&bucket, charge),
            }
            settled.insert(bucket);
            answers[i] = Some(match r {
                Err(why) => {
                    Metrics::inc(&m.refused_invalid);
                    tracing::debug!(%peer, error = %why, "refused block");
                    Err(remote(ErrorKind::Invalid, why))
                }
                Ok(Ok(d)) if d.outcome == PutOutcome::Stored => {
                    Metrics::inc(&m.puts_stored);
                    Ok(true)
                }
                Ok(Ok(_)) => {
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
        for bucket in settled {
            self.inner
                .store
                .stage_charge(&bucket, self.inner.quota.encoded(&bucket));
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(remote(ErrorKind::Storage, "block not processed"))))
            .collect()
    }
}

/// Drop the held root of `v`'s version if `v` is the other side of a fork and wins, so
/// the put that follows stores `v`.
fn replace_losing_fork(store: &dyn crate::store::BlockStore, v: &Verified) {
    let Ok(Some((bytes, _))) = store.get(BlockKind::Root, v.key()) else {
        return;
    };
    let Ok(held) = verify(BlockKind::Root, v.key(), bytes, false) else {
        return;
    };
    if held.version() == v.version() && held.bytes() != v.bytes() && v.rank() > held.rank() {
        tracing::info!(fsid = %v.key(), version = v.version(), "a fork of a root: taking the winning side");
        let _ = store.remove_if(BlockKind::Root, v.key(), held.version());
    }
}

/// Who a stored block's charge went to: the bucket, and the source address to name when
/// maintenance pushes the block on (None for a neighbour's free-transfer allowance).
struct Paid {
    charge: Charge,
    bucket: Vec<u8>,
    source: Option<IpAddr>,
}

impl<T: Transport> Handler for Node<T> {
    async fn handle(
        &self,
        peer: SocketAddr,
        from: Option<SocketAddr>,
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
                    if let Some(b) = self.lookup_block(kind, key, peer.ip()) {
                        return Ok(Response::Step(Step::Found(b)));
                    }
                }
                let step = self.vnode(vnode)?.lock().unwrap().step(key);
                // Only a lookup that wanted the block may lead to an offer for the cache,
                // and only from the requester it was routed for.
                if want.is_some_and(|k| k.is_content()) {
                    self.inner.cache.lock().unwrap().note_routed(
                        key,
                        peer.ip(),
                        tokio::time::Instant::now(),
                    );
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
                // Zave's rectify names the sender itself: a candidate at another host is
                // someone else's word about a third party.
                let own = same_host(candidate.addr, peer)
                    || (candidate.addr.ip().is_loopback() && peer.ip().is_loopback());
                if !candidate.valid(self.inner.cfg.max_vnodes) || !own {
                    return Err(self.refuse(remote(
                        ErrorKind::BadRequest,
                        "a rectify must name the sender's own address and a vnode under the cap",
                    )));
                }
                // Decided in the background through one bounded queue per vnode: the
                // caller does not wait for our ping, and a flood cannot multiply dials.
                self.offer_predecessor(vnode, candidate);
                Ok(Response::Ok)
            }
            Request::Put {
                kind,
                key,
                bytes,
                transfer,
                lease,
            } => {
                let b = WireBlock {
                    kind,
                    key,
                    bytes,
                    lease,
                    source: None,
                };
                let mut r = self.put_many(peer, vec![b], transfer).await;
                r.pop()
                    .expect("one answer per block")
                    .map(|fresh| Response::Stored { fresh })
            }
            Request::PutMany { blocks, transfer } => {
                self.check_batch(blocks.len(), "PutMany")?;
                Ok(Response::StoredMany(
                    self.put_many(peer, blocks, transfer).await,
                ))
            }
            Request::Get { kind, key } => {
                Metrics::inc(&m.gets_served);
                // A ring member asking is checking roots itself: answering it with a
                // check of our own could loop between two settling nodes.
                let b = if kind == BlockKind::Root && from.is_none() {
                    self.root_to_serve(key, peer.ip()).await
                } else {
                    self.lookup_block(kind, key, peer.ip())
                };
                if b.is_none() {
                    Metrics::inc(&m.gets_missed);
                }
                Ok(Response::Block(b))
            }
            Request::Has { items } => {
                self.check_batch(items.len(), "Has")?;
                Ok(Response::Have(self.holdings(items).await?))
            }
            Request::Renew { items, lease, .. } => {
                self.check_batch(items.len(), "Renew")?;
                Ok(Response::Renewed {
                    max_lease: self.inner.cfg.max_lease.as_secs(),
                    answers: self.renew(peer, items, lease).await,
                })
            }
            Request::Cache { kind, key, bytes } => {
                // Only content blocks for lookups this node just routed for this
                // requester, within its rate, verified first, and popular enough.
                let admitted = kind.is_content()
                    && self
                        .inner
                        .cache
                        .lock()
                        .unwrap()
                        .may_offer(key, peer.ip(), tokio::time::Instant::now())
                        .is_ok();
                if !admitted {
                    Metrics::inc(&m.cache_refused);
                    return Ok(Response::Ok);
                }
                match verify(kind, key, bytes, false) {
                    Ok(v) => {
                        let r = self
                            .inner
                            .cache
                            .lock()
                            .unwrap()
                            .admit(kind, key, v.into_bytes());
                        Metrics::inc(match r {
                            Ok(()) => &m.cache_inserts,
                            Err(
                                Refusal::NotPopular | Refusal::NotRouted | Refusal::RateLimited,
                            ) => &m.cache_refused,
                        });
                        Ok(Response::Ok)
                    }
                    Err(e) => {
                        Metrics::inc(&m.refused_invalid);
                        Err(remote(ErrorKind::Invalid, e.to_string()))
                    }
                }
            }
            Request::Status => Ok(Response::Status(Box::new(self.status()))),
            Request::GetMany { items } => {
                self.check_batch(items.len(), "GetMany")?;
                // Up to MAX_BATCH store reads: off the async workers, as `Has` does.
                let (me, ip) = (self.clone(), peer.ip());
                Ok(Response::Blocks(
                    self.blocking(move || me.blocks_within(items, ip)).await?,
                ))
            }
        }
    }

    fn refused_input(&self, peer: SocketAddr, why: &str) {
        Metrics::inc(&self.inner.metrics.refused_input);
        tracing::debug!(%peer, why, "closed connection");
    }

    fn evicted_connection(&self) {
        Metrics::inc(&self.inner.metrics.conns_evicted);
    }

    fn slow_peer(&self, peer: SocketAddr, why: &str) {
        Metrics::inc(&self.inner.metrics.slow_frames);
        tracing::debug!(%peer, why, "closed connection");
    }

    fn dropped_reply(&self, peer: SocketAddr, why: &str) {
        Metrics::inc(&self.inner.metrics.replies_busy);
        tracing::debug!(%peer, why, "answered busy");
    }
}
