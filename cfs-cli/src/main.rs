//! `cfs`: the client command. Ring inspection, raw blocks, and (through the library)
//! publish, mount and get.

use anyhow::{anyhow, bail, Context, Result};
use cfs_core::block::{verify, BlockKind};
use cfs_core::{Id, NodeRef};
use cfs_fuse::MountOpts;
use cfs_net::client::Client;
use cfs_tree::service::net::{default_state_dir, NetRing};
use cfs_tree::PublishOpts;
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::io::{Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

mod chaos_cmd;
mod demo;
mod helper;
mod keep;
mod testnet_cmd;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "cfs: a cooperative, read-only, replicated file system"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct NodeArg {
    /// A ring node to talk to (HOST:PORT).
    #[arg(long, env = "CFS_NODE")]
    node: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Every node of the ring in id order: `<id> <HOST:PORT>` per line.
    Ring {
        #[command(flatten)]
        node: NodeArg,
        #[arg(long)]
        json: bool,
    },
    /// One node: id, predecessor, successors, blocks, bytes, counters.
    Status {
        #[command(flatten)]
        node: NodeArg,
        #[arg(long)]
        json: bool,
    },
    /// Raw content-hash blocks.
    Block {
        #[command(subcommand)]
        cmd: BlockCmd,
    },
    /// Write a new signing key to KEYFILE (mode 0600) and print its FSID.
    Keygen { keyfile: PathBuf },
    /// Sign DIR and insert it as the next version; prints the FSID and the version.
    Publish {
        dir: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        node: NodeArg,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
        /// How long the ring keeps what this publish stores and reuses (30d, 12h, 90s);
        /// renew with `cfs keep` or by publishing again. Nodes cap it at their maximum.
        #[arg(long, default_value = "30d", value_parser = cfs_core::units::duration_arg)]
        lease: u64,
        /// Read every file, even those whose size, times and inode number show them
        /// unchanged since the last publish of DIR with this key (that check uses an
        /// index in the state directory, $CFS_STATE_DIR/publish).
        #[arg(long)]
        rehash: bool,
        /// Cut files into fixed-size blocks (layout 1, which cfs before layout 2 reads)
        /// instead of content-defined chunks (an edit re-sends only the chunks it
        /// touches).
        #[arg(long)]
        fixed_blocks: bool,
        /// Stay running: publish again each time DIR changes (after 200 ms without a
        /// change), printing each version, until SIGINT or SIGTERM.
        #[arg(long)]
        watch: bool,
    },
    /// Renew the leases of every block of the newest versions of FSID on all replicas
    /// (root chain, directories, inodes, indirect and data blocks; no data sent), or
    /// with --dry-run, report what they reach and what only older versions hold.
    Keep(keep::KeepArgs),
    /// A ring of real hosts on this machine (root): network namespaces with their own
    /// addresses from 198.18.0.0/15, a cfsd on each, and faults to inject.
    Testnet(testnet_cmd::TestnetArgs),
    /// A failure-injection experiment: faults on a loopback ring (or a testnet) while
    /// readers verify every byte and a publisher republishes; prints a report, writes it
    /// as JSON and SVG, and exits non-zero if anything was lost, read wrong or went back.
    Chaos(chaos_cmd::ChaosArgs),
    /// Mount FSID read-only at MOUNTPOINT; stays in the foreground until SIGINT/SIGTERM.
    Mount {
        fsid: String,
        mountpoint: PathBuf,
        #[command(flatten)]
        node: NodeArg,
        /// Mount this old version instead of following the newest.
        #[arg(long)]
        version: Option<u64>,
        /// Seconds between checks for a new version.
        #[arg(long, default_value_t = 2.0)]
        poll: f64,
        /// Memory budget in MiB for cached blocks, fetches in flight (read-ahead) and
        /// replies on their way to the kernel, however many files are open.
        #[arg(long, default_value_t = 256)]
        cache_mb: usize,
        /// Let other users read the mount (needs user_allow_other in /etc/fuse.conf).
        #[arg(long)]
        allow_other: bool,
        /// Seconds a block read may take across all replicas before it fails (ETIMEDOUT).
        #[arg(long, default_value_t = 20.0)]
        timeout: f64,
        /// Directory of verified files (filled range by range as they are read), served
        /// by FUSE passthrough once complete (default: $CFS_STATE_DIR/files,
        /// $XDG_CACHE_HOME/cfs/files or ~/.cache/cfs/files).
        #[arg(long)]
        file_cache: Option<PathBuf>,
        /// Byte budget of the file cache in MiB; least recently used files are evicted.
        #[arg(long, default_value_t = 4096)]
        file_cache_mb: u64,
        /// Read every file through cfs, without the on-disk file cache.
        #[arg(long, conflicts_with = "file_cache")]
        no_file_cache: bool,
        /// Direct I/O: no kernel page cache, so every read reaches cfs (with --cache-mb 0
        /// and --no-file-cache, the ring). For tests and failure injection.
        #[arg(long)]
        direct: bool,
    },
    /// Serve published trees over HTTP: /FSID/PATH (newest version) and
    /// /FSID@VERSION/PATH (immutable). Prints its address, then serves until stopped.
    Gateway {
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[command(flatten)]
        node: NodeArg,
        /// Serve only these FSIDs (repeat the flag); default: any.
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Seconds the newest root of a tree is used before it is fetched again.
        #[arg(long, default_value_t = 2.0)]
        poll: f64,
        /// Memory budget in MiB for cached blocks and fetches in flight.
        #[arg(long, default_value_t = 256)]
        cache_mb: usize,
        /// Connections at once per client prefix (/24, /48; one address on loopback).
        #[arg(long, alias = "max-conns-per-ip", default_value_t = 64)]
        max_conns_per_prefix: usize,
        /// Requests per second per client prefix (twice as many in a burst; a client
        /// above it is slowed down, then refused with 429 and Retry-After).
        #[arg(long, alias = "rate-per-ip", default_value_t = 500.0)]
        rate_per_prefix: f64,
        /// Seconds until a response's headers (504 after); also the limit per block.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Write a file's bytes to stdout without mounting: FSID[@VERSION]:/PATH.
    Get {
        spec: String,
        #[command(flatten)]
        node: NodeArg,
    },
    /// The main job in one command: a local ring in this process, DIR published into it
    /// and mounted at MOUNTPOINT, until Ctrl-C.
    Demo {
        /// Directory to publish (default: the sample tree in the repository).
        dir: Option<PathBuf>,
        /// Where to mount (default: a new temporary directory).
        mountpoint: Option<PathBuf>,
        /// Nodes in the ring.
        #[arg(long, default_value_t = 5)]
        nodes: usize,
    },
}

#[derive(Subcommand, Debug)]
enum BlockCmd {
    /// Store FILE as a content-hash block on its r replicas; prints its key.
    Put {
        file: PathBuf,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Write the verified bytes of block KEY to stdout.
    Get {
        key: String,
        #[command(flatten)]
        node: NodeArg,
    },
    /// The replicas whose permanent store holds KEY, one HOST:PORT a line.
    Locate {
        key: String,
        #[command(flatten)]
        node: NodeArg,
        #[arg(long)]
        json: bool,
    },
}

fn resolve(s: &str) -> Result<SocketAddr> {
    s.to_socket_addrs()
        .with_context(|| format!("cannot resolve node address {s}: use HOST:PORT"))?
        .next()
        .ok_or_else(|| anyhow!("{s} resolves to no address"))
}

fn parse_key(s: &str) -> Result<Id> {
    s.parse::<Id>()
        .map_err(|_| anyhow!("{s:?} is not a key: expected 40 hexadecimal digits"))
}

async fn client(node: &NodeArg) -> Result<Client> {
    client_toward(node, None).await
}

/// A client connected to `node`; with `root`, the root's range is looked up at the same
/// time (a mount or a get reads it first).
async fn client_toward(node: &NodeArg, root: Option<Id>) -> Result<Client> {
    let addr = resolve(&node.node)?;
    let mut c = Client::tcp(addr);
    match root {
        Some(fsid) => c.connect_toward(fsid).await,
        None => c.connect().await,
    }
    .with_context(|| format!("cannot reach cfs node {addr}: is cfsd running there?"))?;
    Ok(c)
}

fn node_json(n: &NodeRef) -> serde_json::Value {
    serde_json::json!({"id": n.id.to_hex(), "addr": n.addr.to_string(), "vnode": n.vnode})
}

fn main() {
    cfsd::daemon::init_logging();
    cfsd::daemon::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    if helper::is_helper_call(&args) {
        if let Err(e) = helper::run(&args) {
            eprintln!("cfs: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the async runtime");
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("cfs: {:#}", e);
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Ring { node, json } => {
            let c = client(&node).await?;
            let ring = c
                .ring(resolve(&node.node)?)
                .await
                .context("walking the ring")?;
            if json {
                let nodes: Vec<_> = ring.iter().map(node_json).collect();
                println!("{}", serde_json::json!({ "nodes": nodes }));
            } else {
                for n in ring {
                    println!("{} {}", n.id, n.addr);
                }
            }
        }
        Cmd::Status { node, json } => {
            let c = client(&node).await?;
            let s = c.status(resolve(&node.node)?).await?;
            if json {
                let vnodes: Vec<_> = s
                    .vnodes
                    .iter()
                    .map(|v| {
                        serde_json::json!({
                            "id": v.me.id.to_hex(),
                            "vnode": v.me.vnode,
                            "predecessor": v.pred.as_ref().map(node_json),
                            "successors": v.succs.iter().map(node_json).collect::<Vec<_>>(),
                            "fingers": v.fingers.iter().map(node_json).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                let counters: serde_json::Map<String, serde_json::Value> = s
                    .counters
                    .iter()
                    .map(|(k, v)| (k.clone(), (*v).into()))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "addr": s.addr.to_string(),
                        "id": s.vnodes.first().map(|v| v.me.id.to_hex()),
                        "replicas": s.replicas,
                        "vnodes": vnodes,
                        "blocks": s.blocks,
                        "bytes": s.bytes,
                        "cache_blocks": s.cache_blocks,
                        "cache_bytes": s.cache_bytes,
                        "counters": counters,
                    })
                );
            } else {
                println!("addr        {}", s.addr);
                for v in &s.vnodes {
                    println!("id          {} (vnode {})", v.me.id, v.me.vnode);
                    match &v.pred {
                        Some(p) => println!("predecessor {} {}", p.id, p.addr),
                        None => println!("predecessor (none)"),
                    }
                    for n in &v.succs {
                        println!("successor   {} {}", n.id, n.addr);
                    }
                }
                println!("blocks      {}", s.blocks);
                println!("bytes       {}", s.bytes);
                println!(
                    "cache       {} blocks, {} bytes",
                    s.cache_blocks, s.cache_bytes
                );
                for (k, v) in &s.counters {
                    println!("{k:<20} {v}");
                }
            }
        }
        Cmd::Block { cmd } => block(cmd).await?,
        Cmd::Keygen { keyfile } => {
            let fsid = cfs_tree::keygen(&keyfile)?;
            println!("{fsid}");
        }
        Cmd::Testnet(args) => testnet_cmd::run(args)?,
        Cmd::Chaos(args) => {
            let code = chaos_cmd::run(args)?;
            if code != 0 {
                std::process::exit(code);
            }
        }
        Cmd::Keep(args) => {
            let mut c = client(&args.node).await?;
            c.lease = args.lease;
            keep::run(c, args).await?;
        }
        Cmd::Publish {
            dir,
            key,
            node,
            quiet,
            lease,
            rehash,
            fixed_blocks,
            watch,
        } => {
            let sk = cfs_tree::load_key(&key)?;
            let mut c = client(&node).await?;
            c.lease = lease;
            let state = default_state_dir();
            let index = state
                .as_deref()
                .map(|d| cfs_tree::publish::index_path(d, cfs_tree::fsid_of(&sk), &dir));
            let ring = Arc::new(NetRing::new(c, state));
            let opts = PublishOpts {
                progress: !quiet && std::io::stderr().is_terminal(),
                index,
                rehash,
                content_defined: !fixed_blocks,
                ..PublishOpts::default()
            };
            if watch {
                let each = |round: cfs_tree::publish::Round<'_>| match round {
                    cfs_tree::publish::Round::Published(r) => {
                        eprintln!("{r}");
                        println!("{} {}", r.fsid, r.version);
                    }
                    cfs_tree::publish::Round::Failed(e) => {
                        eprintln!(
                            "cfs: publishing {} failed: {e}; trying again",
                            dir.display()
                        )
                    }
                };
                let wopts = cfs_tree::publish::WatchOpts {
                    ignore: default_state_dir(),
                    ..Default::default()
                };
                let w = cfs_tree::publish::watch(ring, &dir, &sk, &opts, wopts, each);
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    r = w => r.with_context(|| format!("watching {}", dir.display()))?,
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return Ok(());
            }
            let receipt = cfs_tree::publish(ring, &dir, &sk, &opts)
                .await
                .with_context(|| format!("publishing {}", dir.display()))?;
            for (p, why) in &receipt.skipped {
                eprintln!("cfs: skipped {}: {why}", p.display());
            }
            eprintln!("{receipt}");
            println!("{} {}", receipt.fsid, receipt.version);
        }
        Cmd::Mount {
            fsid,
            mountpoint,
            node,
            version,
            poll,
            cache_mb,
            allow_other,
            timeout,
            file_cache,
            file_cache_mb,
            no_file_cache,
            direct,
        } => {
            let fsid = parse_key(&fsid)?;
            let deadline = Duration::from_secs_f64(timeout.max(0.5));
            let mut c = client_toward(&node, Some(fsid)).await?;
            c.net.timeouts.op = deadline;
            c.net.timeouts.rpc = c.net.timeouts.rpc.min(deadline / 2);
            let reads = c.net.reads.clone();
            let ring = Arc::new(NetRing::new(c, default_state_dir()));
            let mut opts = MountOpts {
                version,
                allow_other,
                poll_interval: Duration::from_secs_f64(poll.max(0.1)),
                direct_io: direct,
                ..MountOpts::default()
            };
            opts.reader.cache_bytes = cache_mb << 20;
            if !no_file_cache {
                opts.file_cache = file_cache
                    .or_else(cfs_fuse::mount::FileCacheOpts::default_dir)
                    .map(|d| cfs_fuse::mount::FileCacheOpts::new(d, file_cache_mb << 20));
            }
            // The reader's own limit sits just above the ring's, so the ring's error (which
            // names the block) is the one reported.
            opts.reader.deadline = deadline + Duration::from_secs(1);
            let mounted = cfs_fuse::mount(ring, fsid, &mountpoint, opts).await;
            // What hedging cost (RUST_LOG=cfs::reads=info; `cfs chaos` reads it).
            reads.log("cfs mount done");
            mounted.with_context(|| format!("mounting {fsid} at {}", mountpoint.display()))?;
        }
        Cmd::Gateway {
            listen,
            node,
            allow,
            poll,
            cache_mb,
            max_conns_per_prefix,
            rate_per_prefix,
            timeout,
        } => {
            let allow = if allow.is_empty() {
                None
            } else {
                Some(allow.iter().map(|f| parse_key(f)).collect::<Result<_>>()?)
            };
            let deadline = Duration::from_secs_f64(timeout.max(0.5));
            let mut opts = cfs_gateway::GatewayOpts {
                allow,
                poll: Duration::from_secs_f64(poll.max(0.1)),
                max_conns_per_prefix,
                rate_per_prefix,
                ..Default::default()
            }
            .with_deadline(deadline);
            opts.reader.cache_bytes = cache_mb << 20;
            let c = client(&node).await?;
            let l = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            println!("gateway listening on http://{}/", l.local_addr()?);
            std::io::stdout().flush()?;
            let (entry, state) = (resolve(&node.node)?, default_state_dir());
            cfs_gateway::serve_ring(c, entry, state, l, opts, cfsd::daemon::wait_for_signal())
                .await
                .context("serving HTTP")?;
        }
        Cmd::Get { spec, node } => {
            let (fsid, version, path) = parse_get_spec(&spec)
                .ok_or_else(|| anyhow!("{spec:?} is not FSID[@VERSION]:/PATH"))?;
            let c = client_toward(&node, Some(fsid)).await?;
            let reads = c.net.reads.clone();
            let ring = Arc::new(NetRing::new(c, default_state_dir()));
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            cfs_tree::get(ring, fsid, version, &path, &mut out)
                .await
                .with_context(|| format!("reading {spec}"))?;
            out.flush()?;
            // What hedging cost: RUST_LOG=cfs::reads=info shows it.
            reads.log("cfs get done");
        }
        Cmd::Demo {
            dir,
            mountpoint,
            nodes,
        } => demo::run(dir, mountpoint, nodes).await?,
    }
    Ok(())
}

async fn block(cmd: BlockCmd) -> Result<()> {
    match cmd {
        BlockCmd::Put { file, node } => {
            let mut bytes = Vec::new();
            std::fs::File::open(&file)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .with_context(|| format!("reading {}", file.display()))?;
            let key = Id::hash(&bytes);
            let v = verify(BlockKind::Data, key, bytes, true)
                .map_err(|e| anyhow!("{} cannot be a block: {e}", file.display()))?;
            let c = client(&node).await?;
            let receipt = c.put(&v).await.context("storing the block")?;
            if receipt.stored_on < receipt.wanted {
                eprintln!(
                    "cfs: warning: stored on {} of {} replicas (the ring has fewer live nodes)",
                    receipt.stored_on, receipt.wanted
                );
            }
            println!("{key}");
        }
        BlockCmd::Get { key, node } => {
            let key = parse_key(&key)?;
            let c = client(&node).await?;
            let v = c
                .get(BlockKind::Data, key)
                .await
                .with_context(|| format!("reading block {key}"))?;
            std::io::stdout().write_all(v.bytes())?;
        }
        BlockCmd::Locate { key, node, json } => {
            let key = parse_key(&key)?;
            let c = client(&node).await?;
            let (replicas, extra) = c.locate(BlockKind::Data, key).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "key": key.to_hex(),
                        "replicas": replicas.iter().map(node_json).collect::<Vec<_>>(),
                        "extra_holders": extra.iter().map(node_json).collect::<Vec<_>>(),
                    })
                );
            } else {
                if replicas.is_empty() {
                    bail!("no replica of {key} holds it now");
                }
                for n in replicas {
                    println!("{}", n.addr);
                }
            }
        }
    }
    Ok(())
}

/// Parse `FSID[@V]:/PATH` (the path may be empty for the top directory).
pub fn parse_get_spec(spec: &str) -> Option<(Id, Option<u64>, String)> {
    let (head, path) = spec.split_once(':')?;
    let (fsid, version) = match head.split_once('@') {
        Some((f, v)) => (f, Some(v.parse().ok()?)),
        None => (head, None),
    };
    Some((fsid.parse().ok()?, version, path.to_string()))
}

#[cfg(test)]
mod tests {
    use super::parse_get_spec;

    #[test]
    fn get_specs_parse() {
        let id = cfs_core::Id::hash(b"x");
        assert_eq!(
            parse_get_spec(&format!("{id}:/a/b")),
            Some((id, None, "/a/b".into()))
        );
        assert_eq!(
            parse_get_spec(&format!("{id}@7:/a")),
            Some((id, Some(7), "/a".into()))
        );
        assert_eq!(parse_get_spec("nothex:/a"), None);
        assert_eq!(parse_get_spec(&format!("{id}")), None);
    }
}
