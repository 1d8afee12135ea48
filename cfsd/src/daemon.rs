//! Running a node over TCP: shared by `cfsd` and `cfs demo` (which runs several nodes in
//! one process).

use crate::node::{Config, Node};
use crate::server::{serve, ServerLimits};
use crate::store::BlockStore;
use cfs_net::transport::TcpTransport;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A node serving over TCP, with what it takes to stop it cleanly.
pub struct RunningNode {
    pub node: Node<TcpTransport>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    /// Stop cleanly: stop the periodic tasks, accept no more connections, answer the
    /// requests being handled (within `server::DRAIN`), and write the storage charges.
    /// The store is closed (its writer finishes every commit) when the last handle to
    /// the node is dropped.
    pub async fn stop(self) {
        // Maintenance first: a node going down must not rectify or push to peers while
        // it no longer accepts their pings (they would shut it out of its place for a
        // while after it comes back).
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.stop.send(true);
        let _ = self.server.await;
        self.node.save_charges().await;
    }
}

/// Serve `listener`, join the ring through `join` (retrying until it works), and start
/// the maintenance tasks. Returns once the node has joined. With `peers_file`, the peers
/// the node knows are saved there now and then, and a restart without `join` rejoins
/// through them instead of starting a ring of its own.
pub async fn start_node(
    cfg: Config,
    listener: TcpListener,
    store: Arc<dyn BlockStore>,
    join: Option<SocketAddr>,
    peers_file: Option<PathBuf>,
    limits: ServerLimits,
) -> RunningNode {
    let addr = cfg.addr;
    let node = Node::new(cfg, TcpTransport::new(Some(addr)), store);
    let limits = limits.fit_fds(crate::server::raise_fd_limit());
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(serve(listener, Arc::new(node.clone()), limits, stopped));
    let join = match join {
        Some(j) => Some(j),
        None => rejoin_target(&node, peers_file.as_deref()).await,
    };
    let mut tasks = Vec::new();
    if let Some(p) = peers_file.clone() {
        let n = node.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(PEERS_SAVE_EVERY).await;
                save_peers(&p, &n.known_peers());
            }
        }));
    }
    let mut delay = Duration::from_millis(200);
    let (mut target, mut attempt) = (join, 0);
    loop {
        match node.join(target).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, through = ?target, "joining the ring failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                // Next time through another peer this node knows, where one answers: the
                // one it was given (or remembered) may be busy, cut off from us, or gone.
                if target.is_some() {
                    attempt += 1;
                    let cands = join_candidates(&node, join, peers_file.as_deref());
                    target = first_answering(&node, &cands, attempt).await.or(target);
                }
            }
        }
    }
    tasks.extend(node.start());
    RunningNode {
        node,
        stop,
        server,
        tasks,
    }
}

/// Logs to stderr, quiet (warnings) unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs sent to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled, so a signal that arrives in between is not lost (and
/// does not kill the process with the default action).
pub fn wait_for_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    async move {
        tokio::select! {
            biased;
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}

/// Keep block-sized buffers (up to 1 MiB) on the heap instead of fresh mmaps: glibc maps
/// allocations over 128 KiB by default, and every 256 KiB block buffer then costs page
/// faults and zeroing of new pages (measured at ~10% of a cold read's CPU). Free memory
/// above 4 MiB at the top of the heap goes back to the system, so a mount's RSS follows
/// its memory budget (8 files read at once with a 64 MiB budget: peak RSS over the
/// baseline 108 MiB with a 64 MiB trim threshold, 85 MiB with 4 MiB). One arena: a block
/// is allocated on a runtime worker and freed on a FUSE thread, and with an arena per
/// thread the freed memory waits in one arena while another grows (78 MiB over the
/// baseline with per-thread arenas, 66 MiB with one; a cold 256 MiB read 510 MiB/s
/// against 571 MiB/s, within this machine's noise).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// How often a node writes the peers it knows to its data directory.
const PEERS_SAVE_EVERY: Duration = Duration::from_secs(3);
/// Most peers remembered across a restart.
const MAX_SAVED_PEERS: usize = 64;

fn save_peers(path: &Path, peers: &[SocketAddr]) {
    let text: String = peers
        .iter()
        .take(MAX_SAVED_PEERS)
        .map(|a| format!("{a}\n"))
        .collect();
    let tmp = path.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)) {
        tracing::warn!(error = %e, path = %path.display(), "cannot save known peers");
    }
}

/// The first remembered peer that answers, if any.
async fn rejoin_target(node: &Node<TcpTransport>, path: Option<&Path>) -> Option<SocketAddr> {
    let a = first_answering(node, &remembered_peers(node, path), 0).await?;
    tracing::info!(peer = %a, "rejoining through a remembered peer");
    Some(a)
}

/// The peers saved in `path` by an earlier run, other than this node.
fn remembered_peers(node: &Node<TcpTransport>, path: Option<&Path>) -> Vec<SocketAddr> {
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return Vec::new();
    };
    text.lines()
        .take(MAX_SAVED_PEERS)
        .filter_map(|l| l.trim().parse().ok())
        .filter(|a| *a != node.addr())
        .collect()
}

/// Peers to join through: the one given, those remembered, those seen since we started.
fn join_candidates(
    node: &Node<TcpTransport>,
    join: Option<SocketAddr>,
    path: Option<&Path>,
) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = join.into_iter().collect();
    out.extend(remembered_peers(node, path));
    out.extend(node.known_peers());
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|a| *a != node.addr() && seen.insert(*a));
    out
}

/// The first of `cands` that answers a ping, starting at index `from` (round the list),
/// asking at most 8.
async fn first_answering(
    node: &Node<TcpTransport>,
    cands: &[SocketAddr],
    from: usize,
) -> Option<SocketAddr> {
    for i in 0..cands.len().min(8) {
        let a = cands[(from + i) % cands.len()];
        if node
            .net()
            .call(a, cfs_core::wire::Request::Ping)
            .await
            .is_ok()
        {
            return Some(a);
        }
    }
    None
}

/// Tell systemd (where it started us with `Type=notify`) how we are: `READY=1` once the
/// ring is joined, `STOPPING=1` when a stop begins. Does nothing without NOTIFY_SOCKET.
pub fn notify_systemd(state: &str) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), Path::new(&path))?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "telling systemd {state} failed");
    }
}
