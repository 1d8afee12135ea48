//! The simulated network: an in-process [`Transport`] with a latency model, message loss
//! and failed nodes. Every message goes through the real wire codec and is hashed into a
//! trace, so two runs of one seed can be compared byte for byte.

use cfs_core::wire::{self, Request, RequestFrame, Response, ResponseFrame, PROTOCOL_VERSION};
use cfs_net::transport::{CallError, Handler, Transport};
use cfsd::node::Node;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sha1::{Digest, Sha1};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

pub type SimNode = Node<SimTransport>;

type BoxFut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A node as the network sees it, type-erased: a node's handler calls back into the
/// transport, so the transport may only know it through a boxed future.
pub trait DynHandler: Send + Sync {
    fn handle_boxed(
        &self,
        from: SocketAddr,
        req: Request,
    ) -> BoxFut<'_, Result<Response, wire::RemoteError>>;
}

impl DynHandler for SimNode {
    fn handle_boxed(
        &self,
        from: SocketAddr,
        req: Request,
    ) -> BoxFut<'_, Result<Response, wire::RemoteError>> {
        Box::pin(self.handle(from, Some(from), req))
    }
}

/// Latency model: nodes sit at random points of a unit square; the round trip between two
/// is `min_rtt` plus a share of `max_rtt - min_rtt` proportional to their distance.
#[derive(Clone, Copy, Debug)]
pub struct NetParams {
    pub seed: u64,
    pub min_rtt: Duration,
    pub max_rtt: Duration,
    /// Probability that one message (request or response) is dropped.
    pub loss: f64,
}

impl Default for NetParams {
    fn default() -> Self {
        NetParams {
            seed: 1,
            min_rtt: Duration::from_millis(10),
            max_rtt: Duration::from_millis(200),
            loss: 0.0,
        }
    }
}

/// Synthetic address of node `i`: 127.a.b.c:1 with a.b.c = i + 1. Loopback, so the port is
/// part of the id as on a local ring; no socket is ever opened.
pub fn sim_addr(i: usize) -> SocketAddr {
    let n = (i + 1) as u32;
    SocketAddr::from((
        Ipv4Addr::new(127, (n >> 16) as u8, (n >> 8) as u8, n as u8),
        1,
    ))
}

/// Inverse of [`sim_addr`].
pub fn sim_index(a: SocketAddr) -> Option<usize> {
    match a {
        SocketAddr::V4(v4) if v4.ip().octets()[0] == 127 && v4.port() == 1 => {
            let o = v4.ip().octets();
            let n = (o[1] as usize) << 16 | (o[2] as usize) << 8 | o[3] as usize;
            n.checked_sub(1)
        }
        _ => None,
    }
}

struct Slot {
    node: Option<Arc<dyn DynHandler>>,
    pos: (f64, f64),
    dead: bool,
}

struct Trace {
    hash: Sha1,
    messages: u64,
    bytes: u64,
}

/// The shared network state.
pub struct SimNet {
    params: NetParams,
    start: Instant,
    slots: RwLock<Vec<Slot>>,
    rng: Mutex<SmallRng>,
    trace: Mutex<Trace>,
    /// Requests about the watched key, per destination (Get and FindStep).
    watched: Mutex<(Option<cfs_core::Id>, BTreeMap<usize, u64>)>,
    next_id: Mutex<u64>,
    /// Slots whose node is hostile: the network answers for it (see `hostile_answer`).
    hostile: RwLock<std::collections::BTreeSet<usize>>,
}

impl SimNet {
    /// Must be called inside the simulation's runtime (it reads the virtual clock).
    pub fn new(params: NetParams) -> Arc<SimNet> {
        Arc::new(SimNet {
            params,
            start: Instant::now(),
            slots: RwLock::new(Vec::new()),
            rng: Mutex::new(SmallRng::seed_from_u64(params.seed ^ 0x0005_eed0_f0e7)),
            trace: Mutex::new(Trace {
                hash: Sha1::new(),
                messages: 0,
                bytes: 0,
            }),
            watched: Mutex::new((None, BTreeMap::new())),
            next_id: Mutex::new(1),
            hostile: RwLock::default(),
        })
    }

    /// Reserve slot `i` (placing it in the square) and return its address.
    pub fn place(&self, i: usize) -> SocketAddr {
        let mut slots = self.slots.write().unwrap();
        while slots.len() <= i {
            let j = slots.len() as u64;
            slots.push(Slot {
                node: None,
                pos: cfs_core::geo::position(self.params.seed, j),
                dead: false,
            });
        }
        sim_addr(i)
    }

    pub fn register(&self, i: usize, node: SimNode) {
        self.place(i);
        let mut slots = self.slots.write().unwrap();
        slots[i].node = Some(Arc::new(node));
        slots[i].dead = false;
    }

    /// The node stops answering; calls to it time out.
    pub fn kill(&self, i: usize) {
        if let Some(s) = self.slots.write().unwrap().get_mut(i) {
            s.dead = true;
        }
    }

    pub fn is_dead(&self, i: usize) -> bool {
        self.slots.read().unwrap().get(i).is_none_or(|s| s.dead)
    }

    /// One-way delay between two slots.
    pub fn one_way(&self, a: usize, b: usize) -> Duration {
        if a == b {
            return Duration::ZERO;
        }
        let slots = self.slots.read().unwrap();
        let (Some(pa), Some(pb)) = (slots.get(a), slots.get(b)) else {
            return self.params.max_rtt / 2;
        };
        // Whole microseconds keep the clock free of float drift.
        cfs_core::geo::one_way(self.params.min_rtt, self.params.max_rtt, pa.pos, pb.pos)
    }

    fn lost(&self) -> bool {
        self.params.loss > 0.0 && self.rng.lock().unwrap().random::<f64>() < self.params.loss
    }

    fn handler(&self, i: usize) -> Option<Arc<dyn DynHandler>> {
        let slots = self.slots.read().unwrap();
        let s = slots.get(i)?;
        if s.dead {
            return None;
        }
        s.node.clone()
    }

    fn record(&self, from: usize, to: usize, frame: &[u8]) {
        let t = self.start.elapsed().as_micros() as u64;
        let mut tr = self.trace.lock().unwrap();
        tr.hash.update(t.to_be_bytes());
        tr.hash.update((from as u64).to_be_bytes());
        tr.hash.update((to as u64).to_be_bytes());
        tr.hash.update(frame);
        tr.messages += 1;
        tr.bytes += frame.len() as u64;
    }

    /// SHA-1 over every message so far (virtual time, endpoints, encoded frame), in order.
    pub fn trace_hash(&self) -> String {
        let tr = self.trace.lock().unwrap();
        let d = tr.hash.clone().finalize();
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// (messages, bytes) sent so far.
    pub fn traffic(&self) -> (u64, u64) {
        let tr = self.trace.lock().unwrap();
        (tr.messages, tr.bytes)
    }

    /// Count Get and FindStep requests for `key` per destination from now on.
    pub fn watch(&self, key: Option<cfs_core::Id>) {
        let mut w = self.watched.lock().unwrap();
        *w = (key, BTreeMap::new());
    }

    /// Requests for the watched key, per destination slot.
    pub fn watched(&self) -> BTreeMap<usize, u64> {
        self.watched.lock().unwrap().1.clone()
    }

    fn note_request(&self, to: usize, req: &Request) {
        let mut w = self.watched.lock().unwrap();
        let Some(k) = w.0 else { return };
        let hit = match req {
            Request::Get { key, .. } | Request::FindStep { key, .. } => *key == k,
            _ => false,
        };
        if hit {
            *w.1.entry(to).or_default() += 1;
        }
    }

    /// From now on these slots behave as hostile nodes (`hostile_answer`).
    pub fn set_hostile(&self, slots: impl IntoIterator<Item = usize>) {
        self.hostile.write().unwrap().extend(slots);
    }

    /// What a hostile node answers instead of its honest self, or None to answer honestly
    /// (it keeps pinging, stabilizing and storing, so it stays in the ring). It lies in
    /// every lookup step (half claim to be the successor of any key, the whole ring; half
    /// name no closer node, stonewalling), it withholds every block, and it drops
    /// path-cache offers and puts (never answers).
    fn hostile_answer(
        &self,
        to: SocketAddr,
        dst: usize,
        req: &Request,
    ) -> Option<Option<Response>> {
        if !self.hostile.read().unwrap().contains(&dst) {
            return None;
        }
        Some(match req {
            // Half claim the whole ring; the other half stonewall (no closer node).
            Request::FindStep { vnode, .. } if dst % 2 == 0 => {
                let me = cfs_core::NodeRef::new(to, *vnode);
                Some(Response::Step(wire::Step::Done {
                    from: me,
                    succs: vec![me],
                }))
            }
            Request::FindStep { .. } => Some(Response::Step(wire::Step::Closer {
                nodes: Vec::new(),
                n_est: 1,
            })),
            Request::Get { .. } => Some(Response::Block(None)),
            Request::Cache { .. } | Request::Put { .. } | Request::PutMany { .. } => None,
            _ => return None,
        })
    }

    /// Forget every node (breaks the node <-> network reference cycle).
    pub fn clear(&self) {
        for s in self.slots.write().unwrap().iter_mut() {
            s.node = None;
        }
    }

    pub fn virtual_now(&self) -> Duration {
        self.start.elapsed()
    }
}

/// One node's (or client's) end of the simulated network.
#[derive(Clone)]
pub struct SimTransport {
    net: Arc<SimNet>,
    me: SocketAddr,
}

impl SimTransport {
    pub fn new(net: Arc<SimNet>, me: SocketAddr) -> SimTransport {
        SimTransport { net, me }
    }

    async fn exchange(&self, to: SocketAddr, req: Request) -> Result<Response, CallError> {
        let net = &self.net;
        let (Some(src), Some(dst)) = (sim_index(self.me), sim_index(to)) else {
            return Err(CallError::Unreachable(format!(
                "{to} is not a simulated address"
            )));
        };
        // A failed machine sends nothing (its in-flight work dies with it).
        if net.is_dead(src) {
            return std::future::pending().await;
        }
        let id = {
            let mut n = net.next_id.lock().unwrap();
            *n += 1;
            *n
        };
        // Through the codec and back, as over TCP.
        let frame = wire::encode_frame(&RequestFrame {
            protocol: PROTOCOL_VERSION,
            id,
            from: Some(self.me),
            req,
        })
        .map_err(|e| CallError::Protocol(e.to_string()))?;
        net.record(src, dst, &frame);
        let got: RequestFrame =
            wire::decode(&frame[4..]).map_err(|e| CallError::Protocol(e.to_string()))?;
        drop(frame);
        let delay = net.one_way(src, dst);
        if net.lost() {
            return std::future::pending().await;
        }
        tokio::time::sleep(delay).await;
        // A node that is dead on arrival never answers; the caller's timeout fires.
        let Some(handler) = net.handler(dst) else {
            return std::future::pending().await;
        };
        net.note_request(dst, &got.req);
        let resp = match net.hostile_answer(to, dst, &got.req) {
            Some(Some(lie)) => Ok(lie),
            Some(None) => return std::future::pending().await,
            None => handler.handle_boxed(self.me, got.req).await,
        };
        if net.is_dead(dst) {
            return std::future::pending().await;
        }
        let out = wire::encode_frame(&ResponseFrame { id, resp })
            .map_err(|e| CallError::Protocol(e.to_string()))?;
        net.record(dst, src, &out);
        let back: ResponseFrame =
            wire::decode(&out[4..]).map_err(|e| CallError::Protocol(e.to_string()))?;
        drop(out);
        if back.id != id {
            return Err(CallError::Protocol("response for another request".into()));
        }
        if net.lost() {
            return std::future::pending().await;
        }
        tokio::time::sleep(delay).await;
        back.resp.map_err(CallError::Remote)
    }
}

impl Transport for SimTransport {
    async fn call(
        &self,
        to: SocketAddr,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        cfs_net::transport::bounded(timeout, self.exchange(to, req)).await
    }
}
