//! `cfs`: the client command. Ring inspection, raw blocks, and (through the library)
//! publish, mount and get.

use anyhow::{anyhow, bail, Context, Result};
use cfs_core::block::{verify, BlockKind};
use cfs_core::{Id, NodeRef};
use cfsd::client::Client;
use clap::{Parser, Subcommand};
use std::io::{Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

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
    let addr = resolve(&node.node)?;
    let mut c = Client::tcp(addr);
    c.connect()
        .await
        .with_context(|| format!("cannot reach cfs node {addr}: is cfsd running there?"))?;
    Ok(c)
}

fn node_json(n: &NodeRef) -> serde_json::Value {
    serde_json::json!({"id": n.id.to_hex(), "addr": n.addr.to_string(), "vnode": n.vnode})
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
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
                        "id": s.vnodes[0].me.id.to_hex(),
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
