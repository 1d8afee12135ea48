//! Every knob of a node, with the defaults a daemon starts from. Read by every facet
//! through `Node::config`; `cfsd --config FILE` and the flags fill it.

use crate::cache::CacheLimits;
use cfs_net::net::Timeouts;
use std::net::SocketAddr;
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
    pub cache_limits: CacheLimits,
    /// Seed of the path cache's frequency sketch; the daemon sets a secret one (the
    /// default derives from the address, for the simulator's repeatability).
    pub cache_seed: Option<u64>,
    /// Maintenance rounds in a row that must find a copy's hand-off safe before the copy
    /// is dropped (the grace period).
    pub handoff_rounds: u32,
    /// The longest lease a put or renewal gets (longer asks are capped).
    pub max_lease: Duration,
    /// The shortest: shorter asks (0 included) get and pay for this much, so a flood of
    /// blocks that expire at once cannot store for free.
    pub min_lease: Duration,
    /// Bytes of blocks the store may hold (0: no limit); past it new blocks are refused,
    /// never unexpired ones removed.
    pub capacity_bytes: u64,
    /// Free bytes kept on the store's filesystem (at most a tenth of it): new blocks are
    /// refused before the disk fills, since a store that hits ENOSPC cannot even write
    /// the renewals and sweeps that would free room.
    pub disk_reserve_bytes: u64,
    /// The unix time the node's clock starts at (None: the system clock at start). The
    /// node then counts time with `tokio::time`, so the simulator's leases run on its
    /// virtual clock.
    pub clock_base: Option<u64>,
    /// How long after joining an existing ring a node checks a root it holds against the
    /// holders before serving it (a store that was down, or a peer's hand-off, may hold
    /// an old version); maintenance has replaced such copies by then.
    pub root_settle: Duration,
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
            cache_limits: CacheLimits::default(),
            cache_seed: None,
            handoff_rounds: 3,
            max_lease: Duration::from_secs(90 * 86_400),
            min_lease: Duration::from_secs(3600),
            capacity_bytes: 0,
            disk_reserve_bytes: 64 << 20,
            clock_base: None,
            root_settle: Duration::from_secs(30),
        }
    }
}
