//! `cfsd`: one cfs node process.

use anyhow::{bail, Context, Result};
use cfs_net::transport::TcpTransport;
use cfsd::node::{Config, Node};
use cfsd::store::RedbStore;
use clap::Parser;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A cfs storage node: a Chord ring member holding DHash blocks.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A TOML file of settings: keys are these flags' names (`max_lease = "30d"`); a flag
    /// given here overrides the file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port and writes it to DIR/addr.
    #[arg(long)]
    listen: String,
    /// Directory for the block store; it persists across restarts.
    #[arg(long)]
    data: PathBuf,
    /// Any ring member to join through; without it, a new ring starts.
    #[arg(long)]
    join: Option<String>,
    /// Replicas per block (r).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Ring positions (virtual nodes) this process takes.
    #[arg(long, default_value_t = 1)]
    vnodes: u16,
    /// Path cache size in MiB.
    #[arg(long, default_value_t = 64)]
    cache_mb: usize,
    /// Address peers should use, when it differs from --listen (0.0.0.0, port forwarding).
    #[arg(long)]
    advertise: Option<String>,
    /// Serve Prometheus metrics over HTTP at this address.
    #[arg(long)]
    metrics: Option<String>,
    /// Also serve published trees over HTTP at this address, in this process (the
    /// gateway of `cfs gateway`, entered at this node), stopped with it. Its URL is
    /// written to DIR/gateway.
    #[arg(long)]
    gateway: Option<String>,
    /// Storage a source address may use, in MiB, for the longest lease (--max-lease):
    /// charged by space-time, so twice as much may be stored for half as long.
    #[arg(long, default_value_t = 65536)]
    quota_mb: u64,
    /// The longest lease a block gets (30d, 12h, 90s); longer asks are capped.
    #[arg(long, default_value = "90d", value_parser = cfs_core::units::duration_arg)]
    max_lease: u64,
    /// The shortest lease a block gets; shorter asks get (and pay for) this much.
    #[arg(long, default_value = "1h", value_parser = cfs_core::units::duration_arg)]
    min_lease: u64,
    /// Bytes of blocks this node stores at most, in MiB (0: no limit). When full it
    /// refuses new blocks with a clear error and keeps serving and renewing what it has.
    #[arg(long, default_value_t = 0)]
    capacity_mb: u64,
    /// MiB of free space kept on the data directory's filesystem (at most a tenth of it):
    /// new blocks are refused before the disk fills.
    #[arg(long, default_value_t = 64)]
    reserve_mb: u64,
    /// Keep the newest N versions of a tree alive (FSID:N; repeatable): this node renews
    /// their blocks' leases on all replicas, like a pinning service.
    #[arg(long = "keep", value_parser = keep_spec)]
    keep: Vec<(cfs_core::Id, u64)>,
    /// The lease --keep renews to.
    #[arg(long, default_value = "30d", value_parser = cfs_core::units::duration_arg)]
    keep_lease: u64,
    /// How often --keep renews (default: a quarter of --keep-lease).
    #[arg(long, value_parser = cfs_core::units::duration_arg)]
    keep_every: Option<u64>,
    /// Successor list length.
    #[arg(long, default_value_t = 16)]
    successors: usize,
    /// Stabilization interval in milliseconds.
    #[arg(long, default_value_t = 500)]
    stabilize_ms: u64,
    /// Replica maintenance interval in milliseconds.
    #[arg(long, default_value_t = 5000)]
    maintain_ms: u64,
    /// How long after joining a node checks a root it holds against the other holders
    /// before serving it, in milliseconds (0: never).
    #[arg(long, default_value_t = 30000)]
    root_settle_ms: u64,
    /// Interval of the scrub that re-verifies stored blocks, in milliseconds (0: off).
    #[arg(long, default_value_t = 60000)]
    scrub_ms: u64,
    /// Maintenance rounds in a row that must find a hand-off safe before a copy is dropped.
    #[arg(long, default_value_t = 3)]
    handoff_rounds: u32,
    /// Connections at once, in all (lowered to fit the open-file limit).
    #[arg(long, default_value_t = 2048)]
    max_conns: usize,
    /// Connections at once from one source prefix (/24, /48; one address on loopback).
    #[arg(long, default_value_t = 256)]
    max_conns_per_prefix: usize,
    /// MiB of request frames being received or handled at once, in all.
    #[arg(long, default_value_t = 64)]
    max_inflight_mb: usize,
    /// Requests handled at once for one source prefix; more wait their turn.
    #[arg(long, default_value_t = 8)]
    max_requests_per_prefix: usize,
}

fn keep_spec(s: &str) -> Result<(cfs_core::Id, u64), String> {
    cfs_tree::keep::parse_keep_spec(s)
}

fn resolve(s: &str) -> Result<SocketAddr> {
    s.to_socket_addrs()
        .with_context(|| format!("cannot resolve {s}: use HOST:PORT"))?
        .next()
        .with_context(|| format!("{s} resolves to no address"))
}

fn main() -> Result<()> {
    cfsd::daemon::init_logging();
    cfsd::daemon::tune_allocator();
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let r = rt.block_on(run(args));
    // Tasks still holding the node (and so the store) end here; the store's writer then
    // finishes its last commit and the file is closed cleanly.
    rt.shutdown_timeout(Duration::from_secs(5));
    r
}

/// The command line, after the `--config` file's settings (the command line wins).
fn parse_args() -> Result<Args> {
    use clap::CommandFactory;
    let cmd = Args::command();
    let mut flags = std::collections::HashSet::new();
    let mut switches = std::collections::HashSet::new();
    for a in cmd.get_arguments() {
        if let Some(long) = a.get_long() {
            flags.insert(long.to_string());
            if !a.get_action().takes_values() {
                switches.insert(long.to_string());
            }
        }
    }
    let argv =
        cfsd::config_file::merge_config_file(std::env::args_os().collect(), &flags, &switches)?;
    Ok(Args::parse_from(argv))
}

async fn run(args: Args) -> Result<()> {
    if args.replicas == 0 || args.replicas > 16 {
        bail!("--replicas must be between 1 and 16");
    }
    if args.vnodes == 0 || args.vnodes > cfs_core::id::MAX_VNODES {
        bail!(
            "--vnodes must be between 1 and {}",
            cfs_core::id::MAX_VNODES
        );
    }
    if args.successors < 2 * args.replicas {
        bail!("--successors must be at least twice --replicas");
    }
    // From here a SIGTERM is a clean stop: also while the store opens and the node joins.
    let mut stop = Box::pin(cfsd::daemon::wait_for_signal());
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating data directory {}", args.data.display()))?;
    // A node restarted right after a kill may find the old process still exiting, its
    // store lock and port not yet released: both are retried for a few seconds.
    let store = retry_while_busy(|| RedbStore::open(&args.data.join("blocks.redb"))).with_context(
        || {
            format!(
                "opening the block store in {} (is another cfsd using it?)",
                args.data.display()
            )
        },
    )?;
    let repaired = store.was_repaired();
    if repaired {
        tracing::warn!("the block store had not been closed cleanly and was repaired");
    }
    let listen = resolve(&args.listen)?;
    let listener = retry_while_busy(|| cfsd::server::listen(listen))
        .with_context(|| format!("binding {listen}: is the port in use?"))?;
    let bound = listener.local_addr()?;
    let addr = match &args.advertise {
        Some(a) => resolve(a)?,
        None if bound.ip().is_unspecified() => {
            bail!("listening on {bound}: give --advertise HOST:PORT so peers can reach this node")
        }
        None => bound,
    };
    let mut cfg = Config::new(addr);
    cfg.replicas = args.replicas;
    cfg.vnodes = args.vnodes;
    cfg.cache_bytes = args.cache_mb << 20;
    cfg.quota_bytes = args.quota_mb << 20;
    cfg.succ_list_len = args.successors;
    cfg.stabilize_every = Duration::from_millis(args.stabilize_ms.max(10));
    cfg.fix_fingers_every = cfg.stabilize_every;
    cfg.maintain_every = Duration::from_millis(args.maintain_ms.max(100));
    cfg.scrub_every = (args.scrub_ms > 0).then(|| Duration::from_millis(args.scrub_ms.max(100)));
    cfg.handoff_rounds = args.handoff_rounds.max(1);
    cfg.root_settle = Duration::from_millis(args.root_settle_ms);
    if args.max_lease == 0 {
        bail!("--max-lease must be at least 1s");
    }
    cfg.max_lease = Duration::from_secs(args.max_lease);
    if args.min_lease == 0 || args.min_lease > args.max_lease {
        bail!("--min-lease must be at least 1s and at most --max-lease");
    }
    cfg.min_lease = Duration::from_secs(args.min_lease);
    cfg.capacity_bytes = args.capacity_mb << 20;
    cfg.disk_reserve_bytes = args.reserve_mb << 20;
    // A secret per process: std's hasher keys are random.
    cfg.cache_seed = Some(std::hash::BuildHasher::hash_one(
        &std::collections::hash_map::RandomState::new(),
        addr,
    ));
    let limits = cfsd::server::ServerLimits {
        max_conns: args.max_conns.max(16),
        max_conns_per_bucket: args.max_conns_per_prefix.max(4),
        max_inflight_bytes: args.max_inflight_mb.max(2) << 20,
        max_requests_per_bucket: args.max_requests_per_prefix.max(1),
        ..Default::default()
    };
    // The address file is written before joining so scripts can find the node at once;
    // it serves requests while it joins.
    let join = args.join.as_deref().map(resolve).transpose()?;
    let tmp = args.data.join("addr.tmp");
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, args.data.join("addr"))?;
    // Everything that can fail is done before the node joins the ring.
    let metrics = bind_optional(args.metrics.as_deref(), "metrics").await?;
    let gateway = bind_optional(args.gateway.as_deref(), "gateway").await?;
    let start = cfsd::daemon::start_node(
        cfg,
        listener,
        Arc::new(store),
        join,
        Some(args.data.join("peers")),
        limits,
    );
    // A node that cannot join yet (its ring unreachable) still stops when told to.
    let running = tokio::select! {
        r = start => r,
        _ = &mut stop => {
            tracing::info!("stopped before joining the ring");
            return Ok(());
        }
    };
    let node = running.node.clone();
    if repaired {
        cfsd::metrics::Metrics::inc(&node.metrics().store_repaired);
    }
    if let Some(l) = metrics {
        tokio::spawn(serve_metrics(l, node.clone()));
    }
    // The gateway enters the ring at this node, over loopback when it listens on all
    // addresses (the advertised one may be a port forward that does not loop back).
    let entry = match bound {
        b if b.ip().is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), b.port()),
        b => b,
    };
    let (gateway_stop, gateway_stopped) = tokio::sync::watch::channel(false);
    let gateway = match gateway {
        Some(l) => match start_gateway(l, entry, &args.data, gateway_stopped).await {
            Ok(g) => Some(g),
            Err(e) => {
                drop(node);
                running.stop().await;
                return Err(e);
            }
        },
        None => None,
    };
    if !args.keep.is_empty() {
        let mut client = cfs_net::client::Client::tcp(addr);
        client.lease = args.keep_lease;
        let every = Duration::from_secs(args.keep_every.unwrap_or(args.keep_lease / 4).max(1));
        let specs = args.keep.clone();
        tokio::spawn(async move {
            // Wait for the ring to answer before the first round.
            while client.connect().await.is_err() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let lease = client.lease;
            cfs_tree::keep::keep_loop(client, specs, lease, every).await
        });
    }
    tracing::info!(%addr, ids = ?node.ids(), "cfsd running");
    cfsd::daemon::notify_systemd("READY=1");
    stop.await;
    cfsd::daemon::notify_systemd("STOPPING=1");
    tracing::info!("stopping: answering the requests in flight, then closing the store");
    // A second signal does not wait for the clean stop.
    tokio::spawn(async {
        cfsd::daemon::wait_for_signal().await;
        tracing::warn!("second signal: exiting without a clean stop");
        std::process::exit(1);
    });
    let _ = gateway_stop.send(true);
    if let Some(g) = gateway {
        // The gateway drains its own connections for at most its DRAIN.
        let _ = tokio::time::timeout(cfs_gateway::DRAIN * 2, g).await;
    }
    drop(node);
    running.stop().await;
    Ok(())
}

/// A listener on `addr`, if one is given (`what` names it in the error).
async fn bind_optional(addr: Option<&str>, what: &str) -> Result<Option<tokio::net::TcpListener>> {
    let Some(a) = addr else {
        return Ok(None);
    };
    let at = resolve(a)?;
    let l = tokio::net::TcpListener::bind(at)
        .await
        .with_context(|| format!("binding the {what} address {at}"))?;
    Ok(Some(l))
}

/// The HTTP gateway in this process on `l`, over a client entering the ring at `node`
/// (its newest roots kept in DIR/gateway-roots); its URL goes to DIR/gateway. It stops,
/// draining its connections, when `stop` turns true.
async fn start_gateway(
    l: tokio::net::TcpListener,
    node: SocketAddr,
    data: &std::path::Path,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let url = format!("http://{}/", l.local_addr()?);
    let mut client = cfs_net::client::Client::tcp(node);
    client
        .connect()
        .await
        .context("the gateway's client could not reach this node")?;
    let file = data.join("gateway");
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{url}\n"))?;
    std::fs::rename(&tmp, &file)?;
    let state = Some(data.join("gateway-roots"));
    let opts = cfs_gateway::GatewayOpts::default().with_deadline(Duration::from_secs(30));
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    Ok(tokio::spawn(async move {
        if let Err(e) = cfs_gateway::serve_ring(client, node, state, l, opts, stopped).await {
            tracing::error!(error = %e, "the gateway stopped");
        }
    }))
}

/// Prometheus text at every path of `l`.
async fn serve_metrics(l: tokio::net::TcpListener, node: Node<TcpTransport>) {
    let app = axum::Router::new().fallback(move || {
        let node = node.clone();
        async move {
            let st = node.status();
            let body = node.metrics().prometheus(&[
                ("blocks", st.blocks),
                ("bytes", st.bytes),
                ("cache_blocks", st.cache_blocks),
                ("cache_bytes", st.cache_bytes),
                ("blocks_below_r", node.blocks_below_r()),
            ]);
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4",
                )],
                body,
            )
        }
    });
    if let Err(e) = axum::serve(l, app).await {
        tracing::warn!(error = %e, "the metrics endpoint stopped");
    }
}

/// Retry `f` for up to 5 s while it fails (the previous process on this data directory
/// and port may still be exiting); the last error if it never succeeds.
fn retry_while_busy<T, E>(mut f: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
