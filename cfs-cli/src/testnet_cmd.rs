//! `cfs testnet ...`: the command line over `cfs_lab::testnet`.

use anyhow::{bail, Context, Result};
use cfs_lab::testnet::{self, Spec, Testnet, WanSpec};
use cfs_lab::wan::RttModel;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TestnetArgs {
    /// Prefix of the namespaces (NAME-br, NAME-h1, ...).
    #[arg(long, default_value = "cfs", global = true)]
    name: String,
    /// Where data, logs and the state file go (default /var/tmp/cfs-testnet-NAME).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: TestnetCmd,
}

#[derive(clap::Subcommand, Debug)]
enum TestnetCmd {
    /// Create hosts NAME-h1.. (one network namespace and address each, a bridge in a
    /// namespace of its own) and start a cfsd on each.
    Up {
        #[arg(long, default_value_t = 5)]
        hosts: usize,
        /// Hosts get 198.18.SUBNET.1 and up.
        #[arg(long, default_value_t = 0)]
        subnet: u8,
        #[arg(long, default_value_t = 4000)]
        port: u16,
        /// Cap every host's link (tc rate, e.g. 200mbit), both directions.
        #[arg(long)]
        rate: Option<String>,
        /// Give every host a disk of its own (a tmpfs of this many MiB), for `fill`.
        #[arg(long)]
        disk_mb: Option<u64>,
        /// Wide-area round trips between hosts, emulated in user space: `60ms`, a range
        /// `20ms-200ms` (hosts placed as cfs-sim places nodes, from --seed) or a CSV file
        /// of round trips in milliseconds (a row per host).
        #[arg(long)]
        rtt: Option<String>,
        /// With --rtt: up to this much more one-way delay per packet (e.g. 5ms).
        #[arg(long, default_value = "0ms")]
        jitter: String,
        /// With --rtt: the share of packets lost, in percent.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// With --rtt: places the hosts of a range model.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The cfsd to run (default: the one next to this cfs, else PATH).
        #[arg(long)]
        cfsd: Option<PathBuf>,
        /// Extra cfsd flags, after `--`.
        #[arg(last = true)]
        cfsd_args: Vec<String>,
    },
    /// Stop every node and remove every namespace and file `up` made.
    Down,
    /// The hosts, their addresses and process state.
    Status,
    /// kill -9 a host's node.
    Kill { host: usize },
    /// SIGSTOP a host's node (hung, sockets still open).
    Pause { host: usize },
    /// SIGCONT a paused node.
    Resume { host: usize },
    /// Restart a host's node on its old data.
    Restart { host: usize },
    /// Replace a host's node with a fresh one on an empty disk.
    Replace { host: usize },
    /// Split into groups of hosts: `1,2,3 4,5` (hosts count from 1).
    Partition { groups: Vec<String> },
    /// Undo a partition.
    Heal,
    /// Cap a host's link to a rate (tc syntax, e.g. 50mbit).
    Cap { host: usize, rate: String },
    /// Remove a host's cap.
    Uncap { host: usize },
    /// Fill a host's disk (needs `up --disk-mb`): its node must refuse new blocks.
    Fill { host: usize },
    /// Empty a filled disk again.
    Unfill { host: usize },
    /// The wide-area link emulator of the testnet in --dir (started by `up --rtt`).
    #[command(hide = true)]
    Emulate,
    /// Run a command inside a host's network namespace (a client, a mount).
    Exec {
        host: usize,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|p| p.with_file_name(name))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Host numbers on the command line count from 1.
fn index(net: &Testnet, host: usize) -> Result<usize> {
    if host == 0 || host > net.hosts.len() {
        bail!(
            "no host {host}: this testnet has hosts 1 to {}",
            net.hosts.len()
        );
    }
    Ok(host - 1)
}

/// Apply a fault to host number `host` (from 1).
fn on_host(
    mut net: Testnet,
    host: usize,
    fault: impl FnOnce(&mut Testnet, usize) -> Result<(), testnet::TestnetError>,
) -> Result<()> {
    let i = index(&net, host)?;
    Ok(fault(&mut net, i)?)
}

pub fn run(args: TestnetArgs) -> Result<()> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/tmp/cfs-testnet-{}", args.name)));
    let load = || {
        Testnet::load(&dir).with_context(|| {
            format!(
                "no testnet {} in {} (run `cfs testnet up` first)",
                args.name,
                dir.display()
            )
        })
    };
    match args.cmd {
        TestnetCmd::Up {
            hosts,
            subnet,
            port,
            rate,
            disk_mb,
            rtt,
            jitter,
            loss,
            seed,
            cfsd,
            cfsd_args,
        } => {
            if Testnet::state_path(&dir).exists() {
                bail!(
                    "a testnet {} is already up in {} (`cfs testnet down` first)",
                    args.name,
                    dir.display()
                );
            }
            let spec = Spec {
                name: args.name.clone(),
                hosts,
                subnet,
                port,
                dir: dir.clone(),
                cfsd: cfsd.unwrap_or_else(|| sibling("cfsd")),
                cfsd_args,
                rate,
                disk_mb,
                wan: match rtt {
                    None => None,
                    Some(m) => {
                        if !(0.0..100.0).contains(&loss) {
                            bail!("--loss is a percentage from 0 to 100");
                        }
                        Some(WanSpec {
                            rtt: RttModel::parse(&m)?,
                            jitter: cfs_lab::wan::parse_duration(&jitter)?,
                            loss: loss / 100.0,
                            seed,
                            emulator: std::env::current_exe()
                                .context("finding this cfs binary for the link emulator")?,
                        })
                    }
                },
            };
            let net = match Testnet::up(&spec) {
                Ok(n) => n,
                Err(e) => {
                    let _ = testnet::down(&args.name, &dir);
                    return Err(e).context("bringing the testnet up (everything made was removed)");
                }
            };
            print_status(&net);
            let cfs = sibling("cfs");
            println!(
                "\nA client on host 1:  {} testnet exec 1 -- {} ring --node {}",
                cfs.display(),
                cfs.display(),
                net.addr(0)
            );
            println!("Remove everything:   {} testnet down", cfs.display());
        }
        TestnetCmd::Down => {
            testnet::down(&args.name, &dir)?;
            println!("testnet {} removed", args.name);
        }
        TestnetCmd::Status => print_status(&load()?),
        TestnetCmd::Emulate => cfs_lab::wan::run(&dir)?,
        TestnetCmd::Kill { host } => on_host(load()?, host, Testnet::kill)?,
        TestnetCmd::Pause { host } => on_host(load()?, host, Testnet::pause)?,
        TestnetCmd::Resume { host } => on_host(load()?, host, Testnet::resume)?,
        TestnetCmd::Restart { host } => on_host(load()?, host, Testnet::restart)?,
        TestnetCmd::Replace { host } => on_host(load()?, host, Testnet::replace)?,
        TestnetCmd::Partition { groups } => {
            let mut n = load()?;
            let mut gs = Vec::new();
            for g in &groups {
                let mut v = Vec::new();
                for h in g.split(',') {
                    let h: usize = h
                        .trim()
                        .parse()
                        .with_context(|| format!("{h:?} is not a host number"))?;
                    v.push(index(&n, h)?);
                }
                gs.push(v);
            }
            n.partition(&gs)?
        }
        TestnetCmd::Heal => load()?.heal()?,
        TestnetCmd::Cap { host, rate } => on_host(load()?, host, |n, i| n.cap(i, &rate))?,
        TestnetCmd::Uncap { host } => on_host(load()?, host, Testnet::uncap)?,
        TestnetCmd::Fill { host } => on_host(load()?, host, Testnet::fill)?,
        TestnetCmd::Unfill { host } => on_host(load()?, host, Testnet::unfill)?,
        TestnetCmd::Exec { host, command } => {
            let n = load()?;
            let i = index(&n, host)?;
            let status = n
                .command(i, &command[0])
                .args(&command[1..])
                .status()
                .context("running nsenter")?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
    Ok(())
}

fn print_status(net: &Testnet) {
    println!(
        "testnet {} ({} hosts), state in {}",
        net.name,
        net.hosts.len(),
        net.dir.display()
    );
    for (i, h) in net.hosts.iter().enumerate() {
        let state = match (h.pid, h.paused) {
            (None, _) => "down".to_string(),
            (Some(p), true) => format!("paused (pid {p})"),
            (Some(p), false) => format!("up (pid {p})"),
        };
        let cap = h
            .rate
            .as_deref()
            .map(|r| format!(", link {r}"))
            .unwrap_or_default();
        println!(
            "  host {:<3} {:<16} ns {:<12} {}{}",
            i + 1,
            net.addr(i),
            h.ns,
            state,
            cap
        );
    }
    if !net.partition.is_empty() {
        let groups: Vec<String> = net
            .partition
            .iter()
            .map(|g| {
                g.iter()
                    .map(|i| (i + 1).to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        println!("  partitioned: {}", groups.join(" | "));
    }
}
