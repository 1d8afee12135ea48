//! Running a node over TCP: shared by `cfsd` and `cfs demo` (which runs several nodes in
//! one process).

use crate::node::{Config, Node};
use crate::store::BlockStore;
use crate::transport::{serve, ServerLimits, TcpTransport};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Serve `listener`, join the ring through `join` (retrying until it works), and start
/// the maintenance tasks. Returns once the node has joined.
pub async fn start_node(
    cfg: Config,
    listener: TcpListener,
    store: Arc<dyn BlockStore>,
    join: Option<SocketAddr>,
) -> Node<TcpTransport> {
    let addr = cfg.addr;
    let node = Node::new(cfg, TcpTransport::new(Some(addr)), store);
    tokio::spawn(serve(
        listener,
        Arc::new(node.clone()),
        ServerLimits::default(),
    ));
    let mut delay = Duration::from_millis(200);
    loop {
        match node.join(join).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "joining the ring failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    node.start();
    node
}

/// Logs to stderr, quiet (warnings) unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Until SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        biased;
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
