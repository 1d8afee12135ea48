//! Calls to peers with RTT measurement, iterative lookups with server selection, and the
//! DHash operations (get, put, has, root) built on them. Used alike by nodes (joins,
//! fingers, maintenance) and clients (`cfs`), so the routing logic exists once.

use crate::hedge::ReadCounts;
use crate::peers::BULK_BYTES;
use crate::transport::{CallError, Transport};
use cfs_core::block::{BlockKind, Verified};
use cfs_core::id::MAX_VNODES;
use cfs_core::wire::{
    Holding, RemoteError, Request, Response, MAX_BATCH, MAX_FRAME_BYTES, MAX_REFS,
};
use cfs_core::{Id, NodeRef};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

mod lookup;

/// A lookup gives up after this many hops: a sane ring needs O(log N).
pub const MAX_HOPS: u32 = 64;
/// Candidates a lookup step returns.
pub const CLOSER_COUNT: usize = 8;

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// One RPC.
    pub rpc: Duration,
    /// A whole get, across every replica and re-lookups: longer than failure detection.
    pub op: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            rpc: Duration::from_secs(3),
            op: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("lookup of {key} failed: no live node answered ({last})")]
    NoRoute { key: Id, last: String },
    #[error("lookup of {0} exceeded {MAX_HOPS} hops")]
    TooManyHops(Id),
    #[error("lookup of {0} did not finish within {1:?}")]
    Deadline(Id, Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum DhashError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("block {kind:?} {key} not readable from any replica within {deadline:?}; last error: {last}")]
    Unavailable {
        kind: BlockKind,
        key: Id,
        deadline: Duration,
        last: String,
    },
    #[error("storing {key} refused: {why}")]
    Refused { key: Id, why: String },
    #[error("storing {key} reached no replica: {last}")]
    NotStored { key: Id, last: String },
}

/// The result of a lookup.
#[derive(Clone, Debug)]
pub struct Lookup {
    /// Every key in (from, succs[0]] has the same successors.
    pub from: Id,
    pub succs: Vec<NodeRef>,
    /// Nodes asked, in order (each is one hop unless it is the caller itself).
    pub path: Vec<NodeRef>,
    pub hops: u32,
    /// The wanted block, verified, if a node on the path had it.
    pub found: Option<(NodeRef, Verified)>,
}

pub use cfs_core::ring::{append_others, replica_set, same_host};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutReceipt {
    pub stored_on: usize,
    pub wanted: usize,
    /// Replicas that did not hold it before.
    pub fresh: usize,
}

/// Peer calls with RTT bookkeeping. Cheap to clone.
#[derive(Clone)]
pub struct Net<T: Transport> {
    pub transport: T,
    pub timeouts: Timeouts,
    /// Pick the next hop by id progress and RTT (true) or by id progress alone.
    pub server_selection: bool,
    /// Our own address, if we are a ring member: calls to it are not hops.
    pub me: Option<SocketAddr>,
    pub(crate) peers: crate::peers::Peers,
    /// Ring-size estimate: the node's own (from its successor list) when it has one,
    /// else the latest hint a lookup step reported (clients). The first hop of a lookup
    /// needs it to weigh progress against RTT; `Done` answers are checked against it.
    n_est: Arc<std::sync::atomic::AtomicU32>,
    /// Whether `n_est` is this process's own measurement: then peers' hints are ignored.
    own_n_est: Arc<std::sync::atomic::AtomicBool>,
    /// Calls made, block reads asked of a replica, and exchanges hedged.
    pub reads: Arc<ReadCounts>,
    /// When each silent peer was last pinged (`Net::silent`).
    pub(crate) probed: Arc<std::sync::Mutex<std::collections::HashMap<SocketAddr, Instant>>>,
}

impl<T: Transport> Net<T> {
    pub fn new(transport: T, timeouts: Timeouts, me: Option<SocketAddr>) -> Net<T> {
        Net {
            transport,
            timeouts,
            server_selection: true,
            me,
            peers: Default::default(),
            n_est: Arc::new(std::sync::atomic::AtomicU32::new(1)),
            own_n_est: Arc::default(),
            reads: Arc::default(),
            probed: Arc::default(),
        }
    }

    pub async fn call(&self, to: SocketAddr, req: Request) -> Result<Response, CallError> {
        let t0 = Instant::now();
        self.reads.called();
        let _in_flight = self.peers.begin(to);
        let kind = req.name();
        let block = match &req {
            Request::Get { kind, .. }
            | Request::FindStep {
                want: Some(kind), ..
            } => Some(*kind),
            Request::GetMany { items } => items.first().map(|i| i.0),
            _ => None,
        };
        // A call dropped unanswered (a hedge won, a budget ran out) is traced as it goes.
        let mut dropped = Dropped(Some((to, kind, block, t0)));
        let r = self.transport.call(to, req, self.timeouts.rpc).await;
        dropped.0 = None;
        // Where a client's round trips go (`RUST_LOG=cfs::calls=trace`): the wide-area
        // benchmark's first-byte breakdown reads these.
        tracing::trace!(target: "cfs::calls", %to, kind, ?block, ms = t0.elapsed().as_secs_f64() * 1e3, ok = r.is_ok(), "call");
        let failed = matches!(r, Err(ref e) if e.is_failure());
        let bulk = match &r {
            Ok(Response::Block(Some(b))) => b.len() >= BULK_BYTES,
            Ok(Response::Blocks(bs)) => {
                bs.iter().flatten().map(|b| b.len()).sum::<usize>() >= BULK_BYTES
            }
            _ => false,
        };
        if bulk {
            self.peers.record_bulk(to, t0.elapsed());
        } else {
            self.peers
                .record(to, t0.elapsed(), failed, self.timeouts.rpc);
        }
        r
    }
}

/// Traces a call that is dropped before its answer (`RUST_LOG=cfs::calls=trace`).
struct Dropped(Option<(SocketAddr, &'static str, Option<BlockKind>, Instant)>);

impl Drop for Dropped {
    fn drop(&mut self) {
        if let Some((to, kind, block, t0)) = self.0.take() {
            tracing::trace!(target: "cfs::calls", %to, kind, ?block, ms = t0.elapsed().as_secs_f64() * 1e3, "call dropped");
        }
    }
}

impl<T: Transport> Net<T> {
    /// Record this process's own ring-size estimate (a node knows one from its successor
    /// list): from then on peers' hints are ignored.
    pub fn note_ring_size(&self, n: u32) {
        use std::sync::atomic::Ordering::Relaxed;
        self.n_est.store(n.max(1), Relaxed);
        self.own_n_est.store(true, Relaxed);
    }

    /// The ring-size estimate to check answers against: only one this process measured.
    fn own_ring_size(&self) -> Option<u32> {
        use std::sync::atomic::Ordering::Relaxed;
        self.own_n_est
            .load(Relaxed)
            .then(|| self.n_est.load(Relaxed))
    }

    /// Whether a successor range `(from, to]` is no wider than this process's own
    /// ring-size estimate allows (`ring::check_done`'s rule); true without an estimate.
    pub fn plausible_range(&self, from: Id, to: Id) -> bool {
        match self.own_ring_size() {
            Some(n) if n > 1 && from != to => {
                from.distance_frac(to) <= cfs_core::ring::max_plausible_width(n)
            }
            Some(n) => n <= 1,
            None => true,
        }
    }

    /// Smoothed RTT in microseconds, if measured.
    pub fn rtt_us(&self, addr: SocketAddr) -> Option<f64> {
        self.peers.rtt_us(addr)
    }

    /// The last call to `addr` failed (it timed out or was refused a connection).
    pub fn failed_last(&self, addr: SocketAddr) -> bool {
        self.peers.failed_last(addr)
    }

    /// Order replicas to ask: by expected wait (RTT and calls already in flight).
    /// Without server selection the order is left as given (successor order: blind to
    /// round trips, as the comparison in the wide-area benchmark wants).
    /// Peers asked and silent past their quiet limit (`silent`) go last either way.
    pub fn nearest_first(&self, nodes: &mut [NodeRef]) {
        if self.server_selection {
            self.peers.least_loaded_first(nodes);
        }
        nodes.sort_by_key(|n| self.silent(n.addr));
    }

    /// `addr` answered a read without the block (or with bad bytes): asked later.
    pub fn missed(&self, addr: SocketAddr) {
        self.peers.missed(addr);
    }

    fn mean_rtt_us(&self) -> f64 {
        self.peers.mean_rtt_us()
    }

    /// A verified block, from the replica with the lowest RTT, falling back to the others,
    /// the rest of the successor list, and fresh lookups until the deadline.
    pub async fn get(
        &self,
        start: &[NodeRef],
        kind: BlockKind,
        key: Id,
        r: usize,
        path_caching: bool,
    ) -> Result<(Verified, Lookup), DhashError> {
        let deadline = Instant::now() + self.timeouts.op;
        let mut last: String;
        let mut backoff = Duration::from_millis(100);
        let mut avoid = BTreeSet::new();
        loop {
            let want = (path_caching && kind.is_content()).then_some(kind);
            match self
                .lookup_avoiding(start.to_vec(), key, want, &avoid)
                .await
            {
                Ok(l) => {
                    // If nothing this answer names serves the block, its source is not
                    // asked again by this get.
                    if let Some(src) = l.path.last() {
                        if Some(src.addr) != self.me {
                            avoid.insert(src.addr);
                        }
                    }
                    if let Some((_, v)) = &l.found {
                        return Ok((v.clone(), l));
                    }
                    let mut order = self.replicas(&l.succs, r).await;
                    self.nearest_first(&mut order);
                    append_others(&mut order, &l.succs);
                    match self.get_hedged(&order, kind, key, deadline).await {
                        Ok(v) => {
                            if path_caching && kind.is_content() {
                                self.offer_to_path(&l.path, &v);
                            }
                            return Ok((v, l));
                        }
                        Err(why) => last = why,
                    }
                }
                // Avoiding sources left no route (a small ring, or every honest node was
                // a source of a not-yet-replicated answer): try them all again.
                Err(e) => {
                    last = e.to_string();
                    avoid.clear();
                }
            }
            if Instant::now() + backoff >= deadline {
                return Err(DhashError::Unavailable {
                    kind,
                    key,
                    deadline: self.timeouts.op,
                    last,
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Offer a fetched block to the nodes of the lookup path, in the background.
    fn offer_to_path(&self, path: &[NodeRef], v: &Verified) {
        let mut addrs: Vec<SocketAddr> = path.iter().map(|n| n.addr).collect();
        addrs.sort();
        addrs.dedup();
        for a in addrs {
            if Some(a) == self.me {
                continue;
            }
            let net = self.clone();
            let req = Request::Cache {
                kind: v.kind(),
                key: v.key(),
                bytes: v.bytes().to_vec(),
            };
            tokio::spawn(async move {
                let _ = net.call(a, req).await;
            });
        }
    }

    /// The replica set of a lookup's successors; when the list holds fewer than r
    /// distinct processes (a young ring, or many vnodes), extend it by asking the last
    /// one for its successors.
    pub async fn replicas(&self, succs: &[NodeRef], r: usize) -> Vec<NodeRef> {
        let mut all = succs.to_vec();
        let mut set = replica_set(&all, r);
        let mut rounds = 0;
        while set.len() < r && rounds < 4 {
            rounds += 1;
            let Some(last) = all.last().copied() else {
                break;
            };
            let Ok(Response::Neighbors { succs: more, .. }) = self
                .call(last.addr, Request::Neighbors { vnode: last.vnode })
                .await
            else {
                break;
            };
            // Only a clockwise continuation of valid nodes that has not wrapped back to
            // the start of the list is taken.
            let first = all[0];
            let before = all.len();
            for n in cfs_core::ring::clean_succ_list(last, &more, MAX_REFS, MAX_VNODES) {
                if n.id.in_open(last.id, first.id) && !all.contains(&n) {
                    all.push(n);
                }
            }
            if all.len() == before {
                break;
            }
            set = replica_set(&all, r);
        }
        set
    }

    /// Store on every replica in parallel; acknowledged only when each has it durably.
    pub async fn put(
        &self,
        start: &[NodeRef],
        block: &Verified,
        r: usize,
        lease: u64,
    ) -> Result<PutReceipt, DhashError> {
        let l = self.lookup(start.to_vec(), block.key(), None).await?;
        let set = self.replicas(&l.succs, r).await;
        self.put_to(&set, block, r, false, lease).await
    }

    /// Store on `targets` in parallel, leased for `lease` seconds.
    pub async fn put_to(
        &self,
        targets: &[NodeRef],
        block: &Verified,
        r: usize,
        transfer: bool,
        lease: u64,
    ) -> Result<PutReceipt, DhashError> {
        let calls = targets.iter().map(|n| {
            let net = self.clone();
            let a = n.addr;
            let req = Request::Put {
                kind: block.kind(),
                key: block.key(),
                bytes: block.bytes().to_vec(),
                transfer,
                lease,
            };
            async move { net.call(a, req).await }
        });
        let mut receipt = PutReceipt {
            stored_on: 0,
            wanted: r,
            fresh: 0,
        };
        let mut last = String::from("no replicas");
        for res in join_all(calls).await {
            match res {
                Ok(Response::Stored { fresh }) => {
                    receipt.stored_on += 1;
                    receipt.fresh += fresh as usize;
                }
                Err(CallError::Remote(e)) => {
                    return Err(DhashError::Refused {
                        key: block.key(),
                        why: e.to_string(),
                    })
                }
                Ok(other) => last = format!("unexpected {other:?}"),
                Err(e) => last = e.to_string(),
            }
        }
        if receipt.stored_on == 0 {
            return Err(DhashError::NotStored {
                key: block.key(),
                last,
            });
        }
        Ok(receipt)
    }

    /// Extend `node`'s leases of `items` to `lease` seconds, in batches: the node's
    /// longest lease, and per item None if it does not hold it, else the seconds now
    /// leased (or its refusal).
    pub async fn renew(
        &self,
        node: SocketAddr,
        items: &[(BlockKind, Id)],
        lease: u64,
        transfer: bool,
    ) -> Result<(u64, Vec<Result<Option<u64>, RemoteError>>), CallError> {
        let mut out = Vec::with_capacity(items.len());
        let mut max = u64::MAX;
        for chunk in items.chunks(MAX_BATCH) {
            let req = Request::Renew {
                items: chunk.to_vec(),
                lease,
                transfer,
            };
            match self.call(node, req).await? {
                Response::Renewed { max_lease, answers } if answers.len() == chunk.len() => {
                    max = max.min(max_lease);
                    out.extend(answers)
                }
                other => return Err(CallError::Protocol(format!("bad Renew reply {other:?}"))),
            }
        }
        Ok((max, out))
    }

    /// What `node` holds of each item (None = absent or expired): version and lease, in
    /// batches.
    pub async fn has(
        &self,
        node: SocketAddr,
        items: &[(BlockKind, Id)],
    ) -> Result<Vec<Option<Holding>>, CallError> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(MAX_BATCH) {
            match self
                .call(
                    node,
                    Request::Has {
                        items: chunk.to_vec(),
                    },
                )
                .await?
            {
                Response::Have(v) if v.len() == chunk.len() => out.extend(v),
                other => return Err(CallError::Protocol(format!("bad Has reply {other:?}"))),
            }
        }
        Ok(out)
    }
}

/// Run futures concurrently on the current task and collect their outputs in order.
pub async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = (0..futs.len()).map(|_| None).collect();
    let mut futs: Vec<Option<_>> = futs.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futs.iter_mut().enumerate() {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(o) => {
                        outs[i] = Some(o);
                        *f = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outs.into_iter().map(|o| o.unwrap()).collect()
}

/// Bytes of blocks one batched put carries: a frame less room for the envelope.
pub const BATCH_BYTES: usize = MAX_FRAME_BYTES - 64 * 1024;
/// What each block of a batch adds beyond its bytes (kind, key, length).
pub const BATCH_ENTRY_OVERHEAD: usize = 64;

/// Gathers items into batches that fit one frame and one batched request: the one rule
/// for batching, used where sizes are known up front (`chunk_by_bytes`) and where blocks
/// are read one at a time (maintenance pushes).
pub struct Batcher<T> {
    cur: Vec<T>,
    bytes: usize,
}

impl<T> Default for Batcher<T> {
    fn default() -> Self {
        Batcher {
            cur: Vec::new(),
            bytes: 0,
        }
    }
}

impl<T> Batcher<T> {
    /// Add `item` of `size` bytes; returns the batch it closed when it did not fit.
    pub fn push(&mut self, item: T, size: usize) -> Option<Vec<T>> {
        let n = size + BATCH_ENTRY_OVERHEAD;
        let full =
            !self.cur.is_empty() && (self.bytes + n > BATCH_BYTES || self.cur.len() >= MAX_BATCH);
        let closed = full.then(|| {
            self.bytes = 0;
            std::mem::take(&mut self.cur)
        });
        self.bytes += n;
        self.cur.push(item);
        closed
    }

    /// The last batch, if any.
    pub fn finish(self) -> Option<Vec<T>> {
        (!self.cur.is_empty()).then_some(self.cur)
    }
}

/// Split indexes into runs that fit one frame (and one batch).
pub fn chunk_by_bytes(items: &[usize], size: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    let mut b = Batcher::default();
    let mut out: Vec<Vec<usize>> = items.iter().filter_map(|&i| b.push(i, size(i))).collect();
    out.extend(b.finish());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fit_a_frame_and_a_request() {
        let sizes = [600 << 10, 600 << 10, 10, 10];
        let idx: Vec<usize> = (0..sizes.len()).collect();
        assert_eq!(
            chunk_by_bytes(&idx, |i| sizes[i]),
            vec![vec![0], vec![1, 2, 3]]
        );
        let many: Vec<usize> = (0..MAX_BATCH + 1).collect();
        assert_eq!(chunk_by_bytes(&many, |_| 1).len(), 2);
        assert!(chunk_by_bytes(&[], |_| 1).is_empty());
    }
}
