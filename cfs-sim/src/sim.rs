//! The driver: creates cfsd nodes on the simulated network, grows rings by real joins,
//! fails nodes, and reads ground truth (for measurement only, never for routing).

use crate::transport::{NetParams, SimNet, SimNode, SimTransport};
use cfs_core::block::{verify, BlockKind, Verified};
use cfs_core::{Id, NodeRef};
use cfs_net::net::Timeouts;
use cfsd::node::{Config, Node};
use cfsd::store::MemStore;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot build the simulation runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("node {0} could not join the ring: {1}")]
    Join(usize, String),
    #[error("bad parameter: {0}")]
    Param(String),
}

/// The unix time simulated nodes' clocks start at (2024-01-01).
pub const SIM_EPOCH: u64 = 1_704_067_200;

/// What every simulated node is configured with (besides its address).
#[derive(Clone, Debug)]
pub struct NodeParams {
    pub replicas: usize,
    pub vnodes: u16,
    pub succ_list_len: usize,
    pub server_selection: bool,
    pub path_caching: bool,
    pub stabilize_every: Duration,
    pub maintain_every: Duration,
    pub rejoin_every: Duration,
    pub timeouts: Timeouts,
}

impl Default for NodeParams {
    fn default() -> Self {
        NodeParams {
            replicas: 3,
            vnodes: 1,
            succ_list_len: 16,
            server_selection: true,
            path_caching: true,
            // Virtual time is free; what costs is messages per round, so the interval only
            // matters relative to churn and RTTs (10..200 ms).
            stabilize_every: Duration::from_secs(1),
            maintain_every: Duration::from_secs(10),
            rejoin_every: Duration::from_secs(60),
            // A timeout of 5x the largest RTT: failure detection without false alarms.
            timeouts: Timeouts {
                rpc: Duration::from_secs(1),
                op: Duration::from_secs(20),
            },
        }
    }
}

/// How a ring is grown: waves that double it, each followed by some stabilization rounds,
/// then rounds for fingers to converge (one finger is refreshed per round).
#[derive(Clone, Copy, Debug)]
pub struct GrowPlan {
    pub rounds_between_waves: u32,
    pub rounds_after: u32,
}

impl Default for GrowPlan {
    fn default() -> Self {
        GrowPlan {
            // A gap that got k joiners in one wave needs about k rounds (its predecessor
            // walks back one node per round); a pointer still lagging when the next wave
            // comes makes joiners land behind the wrong node.
            rounds_between_waves: 6,
            rounds_after: 25,
        }
    }
}

struct Member {
    node: SimNode,
    tasks: Vec<JoinHandle<()>>,
    alive: bool,
    joined: bool,
}

pub struct Sim {
    pub net: Arc<SimNet>,
    pub params: NodeParams,
    members: Vec<Member>,
    pub rng: SmallRng,
}

/// Run `f` to completion on a fresh single-threaded runtime whose clock is paused: the
/// clock jumps to the next timer whenever every task waits, a discrete-event simulation.
pub fn run<F: std::future::Future>(f: F) -> Result<F::Output, SimError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?;
    Ok(rt.block_on(f))
}

impl Sim {
    /// Call inside [`run`].
    pub fn new(net: NetParams, params: NodeParams) -> Sim {
        Sim {
            rng: SmallRng::seed_from_u64(net.seed),
            net: SimNet::new(net),
            params,
            members: Vec::new(),
        }
    }

    fn config(&self, addr: std::net::SocketAddr) -> Config {
        let p = &self.params;
        let mut c = Config::new(addr);
        c.replicas = p.replicas;
        c.vnodes = p.vnodes;
        c.succ_list_len = p.succ_list_len;
        c.server_selection = p.server_selection;
        c.path_caching = p.path_caching;
        c.stabilize_every = p.stabilize_every;
        c.fix_fingers_every = p.stabilize_every;
        c.maintain_every = p.maintain_every;
        c.rejoin_every = p.rejoin_every;
        c.timeouts = p.timeouts;
        // Paused time may advance while a blocking-pool task runs: keep work inline.
        c.inline_blocking = true;
        // Leases run on the virtual clock, from a fixed start: runs repeat exactly.
        c.clock_base = Some(SIM_EPOCH);
        c
    }

    /// Create a node (not yet joined) and return its index.
    pub fn spawn_node(&mut self) -> usize {
        let i = self.members.len();
        let addr = self.net.place(i);
        let node = Node::new(
            self.config(addr),
            SimTransport::new(self.net.clone(), addr),
            Arc::new(MemStore::default()),
        );
        self.net.register(i, node.clone());
        self.members.push(Member {
            node,
            tasks: Vec::new(),
            alive: true,
            joined: false,
        });
        i
    }

    pub fn node(&self, i: usize) -> &SimNode {
        &self.members[i].node
    }

    /// Indices of live members that have joined.
    pub fn live(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].alive && self.members[i].joined)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn pick_live(&mut self) -> Option<usize> {
        let live = self.live();
        if live.is_empty() {
            return None;
        }
        Some(live[self.rng.random_range(0..live.len())])
    }

    /// Let the ring run for `rounds` stabilization intervals of virtual time.
    pub async fn rounds(&self, rounds: u32) {
        tokio::time::sleep(self.params.stabilize_every * rounds).await;
    }

    /// Join the nodes `idx` concurrently, each through a random live member (or start a
    /// ring if there is none), and start their periodic tasks.
    pub async fn join_all(&mut self, idx: &[usize]) -> Result<(), SimError> {
        let mut handles = Vec::new();
        for &i in idx {
            let boot = self.pick_live().map(|b| self.members[b].node.addr());
            let alt: Vec<_> = (0..3)
                .filter_map(|_| self.pick_live().map(|b| self.members[b].node.addr()))
                .collect();
            let node = self.members[i].node.clone();
            handles.push(tokio::spawn(async move {
                let mut last = String::new();
                for b in std::iter::once(boot).chain(alt.into_iter().map(Some)) {
                    match node.join(b).await {
                        Ok(()) => return Ok(node.start()),
                        Err(e) => last = e.to_string(),
                    }
                    if b.is_none() {
                        break;
                    }
                }
                Err(last)
            }));
        }
        for (&i, h) in idx.iter().zip(handles) {
            match h.await {
                Ok(Ok(tasks)) => {
                    let m = &mut self.members[i];
                    m.tasks = tasks;
                    m.joined = true;
                }
                Ok(Err(e)) => return Err(SimError::Join(i, e)),
                Err(e) => return Err(SimError::Join(i, e.to_string())),
            }
        }
        Ok(())
    }

    /// Grow the ring to `n` live members by real joins, in waves that at most double it.
    pub async fn grow(&mut self, n: usize, plan: GrowPlan) -> Result<(), SimError> {
        let mut have = self.live().len();
        while have < n {
            let wave = have.max(1).min(n - have);
            let idx: Vec<usize> = (0..wave).map(|_| self.spawn_node()).collect();
            self.join_all(&idx).await?;
            have += wave;
            let r = if have < n {
                plan.rounds_between_waves
            } else {
                plan.rounds_after
            };
            self.rounds(r).await;
        }
        Ok(())
    }

    /// Fail node `i` at once: it stops answering and its tasks stop.
    pub fn kill(&mut self, i: usize) {
        self.net.kill(i);
        let m = &mut self.members[i];
        m.alive = false;
        for t in m.tasks.drain(..) {
            t.abort();
        }
    }

    /// Stop every live node's periodic tasks (the ring freezes as it is).
    pub fn freeze(&mut self) {
        for m in &mut self.members {
            for t in m.tasks.drain(..) {
                t.abort();
            }
        }
    }

    /// Restart the periodic tasks of every live member.
    pub fn thaw(&mut self) {
        for m in &mut self.members {
            if m.alive && m.joined && m.tasks.is_empty() {
                m.tasks = m.node.start();
            }
        }
    }

    /// Every live vnode in id order: the ring as it truly is.
    pub fn truth(&self) -> Truth {
        let mut ring: Vec<NodeRef> = self
            .live()
            .iter()
            .flat_map(|&i| self.members[i].node.ids())
            .collect();
        ring.sort_by_key(|n| n.id);
        Truth { ring }
    }

    /// (vnodes whose first successor is wrong, vnodes whose predecessor is wrong).
    pub fn ring_errors(&self) -> (usize, usize) {
        let t = self.truth();
        let n = t.ring.len();
        let (mut bad_succ, mut bad_pred) = (0, 0);
        for (j, me) in t.ring.iter().enumerate() {
            let Some(i) = crate::transport::sim_index(me.addr) else {
                continue;
            };
            let node = &self.members[i].node;
            if node.successors(me.vnode).first() != Some(&t.ring[(j + 1) % n]) {
                bad_succ += 1;
            }
            if node.predecessor(me.vnode) != Some(t.ring[(j + n - 1) % n]) {
                bad_pred += 1;
            }
        }
        (bad_succ, bad_pred)
    }

    /// Which live members hold each block in their permanent store.
    pub fn holders(&self) -> BTreeMap<Id, Vec<usize>> {
        let mut out: BTreeMap<Id, Vec<usize>> = BTreeMap::new();
        for i in self.live() {
            let node = &self.members[i].node;
            let now = node.now_unix();
            if let Ok(list) = node.store().list() {
                // An expired block not yet swept is not held: no peer is ever given it.
                for (_, key, _) in list.into_iter().filter(|e| e.2.expires > now) {
                    out.entry(key).or_default().push(i);
                }
            }
        }
        out
    }

    pub fn blocks_per_node(&self) -> Vec<u64> {
        self.live()
            .iter()
            .map(|&i| self.members[i].node.store().usage().0)
            .collect()
    }

    /// Drop every node and task so the next run starts clean (nodes and the network
    /// refer to each other).
    pub fn shutdown(mut self) {
        self.freeze();
        self.net.clear();
    }
}

/// Ground truth for checking lookups.
pub struct Truth {
    pub ring: Vec<NodeRef>,
}

impl Truth {
    pub fn successor(&self, key: Id) -> Option<NodeRef> {
        let i = self.ring.partition_point(|n| n.id < key);
        self.ring.get(i).or(self.ring.first()).copied()
    }
}

/// A random 160-bit key.
pub fn random_id(rng: &mut SmallRng) -> Id {
    let mut b = [0u8; 20];
    rng.fill(&mut b);
    Id(b)
}

/// Block `i` of a run: distinct small content (as verified data).
pub fn make_block(seed: u64, i: usize, size: usize) -> Verified {
    let mut bytes = format!("cfs-sim seed {seed} block {i} ").into_bytes();
    bytes.resize(size.max(bytes.len()), b'.');
    let key = Id::hash(&bytes);
    // The bytes hash to the key by construction, so this cannot fail.
    verify(BlockKind::Data, key, bytes, false).expect("a block verifies against its own hash")
}

/// Sorted-sample statistics.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Round for stable, short JSON.
pub fn r4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}
