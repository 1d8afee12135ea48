//! The node's state in one place: every facet (`chord.rs`, `lease.rs`, `maintain.rs`,
//! `serve.rs`) and the composition in `node.rs` read it from here, and this file imports
//! none of them, so the modules of the node depend one way.

use crate::cache::PathCache;
use crate::config::Config;
use crate::handoffs::Handoffs;
use crate::metrics::Metrics;
use crate::quota::Quota;
use crate::store::{BlockStore, StoreKey};
use crate::vnode::Vnode;
use cfs_core::block::Verified;
use cfs_core::wire::{ErrorKind, RemoteError};
use cfs_core::Id;
use cfs_core::NodeRef;
use cfs_net::net::Net;
use cfs_net::transport::Transport;
use rand::SeedableRng;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub(crate) struct Inner<T: Transport> {
    pub(crate) cfg: Config,
    pub(crate) net: Net<T>,
    pub(crate) store: Arc<dyn BlockStore>,
    pub(crate) cache: Mutex<PathCache>,
    pub(crate) vnodes: Vec<Mutex<Vnode>>,
    pub(crate) metrics: Metrics,
    /// When this node started, seconds since the epoch (for status pages and leases).
    pub(crate) started: u64,
    /// `tokio::time` at `started`: the node's clock is `started` plus the time since.
    pub(crate) clock: tokio::time::Instant,
    /// Peers that answered this node (never names merely claimed in a peer's answer), for
    /// re-looking ourselves up after a partition heals and for the saved peers file.
    pub(crate) seen: Mutex<BTreeSet<SocketAddr>>,
    pub(crate) quota: Quota,
    pub(crate) scrub_cursor: Mutex<Option<StoreKey>>,
    /// Hand-offs waiting out their grace period, by replica set.
    pub(crate) handoffs: Mutex<Handoffs>,
    /// Blocks the last finished maintenance round found on fewer than r replicas, each
    /// counted by its first holder in replica order only, so a ring's nodes add up.
    pub(crate) below_r: std::sync::atomic::AtomicU64,
    /// Until it has joined, a node answers no ring requests: its lone successor list
    /// would claim the whole ring.
    pub(crate) joined: std::sync::atomic::AtomicBool,
    /// When this node joined an existing ring: for `root_settle` after it, the roots it
    /// holds are checked against the holders it joined in front of before it serves them.
    pub(crate) joined_at: Mutex<Option<tokio::time::Instant>>,
    /// The holders' best root per key asked while settling (None: they had none).
    pub(crate) settle: Mutex<HashMap<Id, Arc<tokio::sync::OnceCell<Option<Verified>>>>>,
    pub(crate) rng: Mutex<rand::rngs::SmallRng>,
    /// Bytes of puts admitted under the capacity but not yet stored.
    pub(crate) incoming: std::sync::atomic::AtomicU64,
}

/// A node; clones share state.
pub struct Node<T: Transport> {
    pub(crate) inner: Arc<Inner<T>>,
}

impl<T: Transport> Clone for Node<T> {
    fn clone(&self) -> Self {
        Node {
            inner: self.inner.clone(),
        }
    }
}

pub(crate) fn remote(kind: ErrorKind, msg: impl Into<String>) -> RemoteError {
    RemoteError::new(kind, msg)
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
                cache: Mutex::new(PathCache::new(
                    cfg.cache_bytes,
                    cfg.cache_seed.unwrap_or(seed),
                    cfg.cache_limits,
                )),
                net,
                quota: Quota::load(cfg.quota_bytes, cfg.max_lease.as_secs(), &*store),
                store,
                vnodes,
                metrics: Metrics::default(),
                started: cfg.clock_base.unwrap_or_else(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                }),
                clock: tokio::time::Instant::now(),
                seen: Mutex::default(),
                scrub_cursor: Mutex::new(None),
                handoffs: Mutex::default(),
                below_r: Default::default(),
                joined: std::sync::atomic::AtomicBool::new(false),
                joined_at: Mutex::new(None),
                settle: Mutex::new(HashMap::new()),
                rng: Mutex::new(rand::rngs::SmallRng::seed_from_u64(seed)),
                incoming: std::sync::atomic::AtomicU64::new(0),
                cfg,
            }),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.cfg.addr
    }
    /// The node's clock, unix seconds (leases are kept in it).
    pub fn now_unix(&self) -> u64 {
        self.inner.started + self.inner.clock.elapsed().as_secs()
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

    /// Run CPU- or disk-bound work off the async workers (or inline, see `Config`).
    pub(crate) async fn blocking<R: Send + 'static>(
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
}
