//! `cfs chaos`: the command line over `cfs_lab::chaos`.

use anyhow::{bail, Context, Result};
use cfs_lab::chaos::hosts::{Hosts, LocalRing};
use cfs_lab::chaos::readers::ReadVia;
use cfs_lab::chaos::scenario::{kill_every, ScenarioFile};
use cfs_lab::chaos::{self, ChaosOpts};
use cfs_lab::testnet::Testnet;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ChaosArgs {
    /// Nodes of the loopback ring (ignored with --testnet).
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Kill a random node this often (5s) ...
    #[arg(long, value_parser = cfs_core::units::duration_arg)]
    kill_every: Option<u64>,
    /// ... and restart it after this long (default: half of --kill-every).
    #[arg(long, value_parser = cfs_core::units::duration_arg)]
    down_for: Option<u64>,
    #[arg(long, default_value = "60s", value_parser = cfs_core::units::duration_arg)]
    duration: u64,
    /// A TOML scenario: duration, nodes, replicas and [[fault]] entries (at, kind =
    /// kill|pause|restart|replace|partition|cap, node, for, groups, rate).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Run on the hosts of this testnet (root; `cfs testnet up` first): partitions and
    /// link caps become possible, and the workload runs in host 1's namespace.
    #[arg(long)]
    testnet: Option<String>,
    /// The testnet's directory (default /var/tmp/cfs-testnet-NAME).
    #[arg(long)]
    testnet_dir: Option<PathBuf>,
    /// Readers verifying bytes at once.
    #[arg(long, default_value_t = 2)]
    readers: usize,
    /// Republish the tree this often (0: never).
    #[arg(long, default_value = "10s", value_parser = cfs_core::units::duration_arg)]
    republish_every: u64,
    /// Files in the published tree, and their size in KiB.
    #[arg(long, default_value_t = 16)]
    files: usize,
    #[arg(long, default_value_t = 256)]
    file_kb: usize,
    /// After the run, wait this long at most for every block to be on r replicas.
    #[arg(long, default_value = "60s", value_parser = cfs_core::units::duration_arg)]
    settle: u64,
    /// Where report.json, report.svg, the tree and node data go.
    #[arg(long, default_value = "cfs-chaos")]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The cfsd to run (loopback; default: next to this cfs).
    #[arg(long)]
    cfsd: Option<PathBuf>,
    /// How readers read: through a FUSE `mount` (the default where /dev/fuse and
    /// fusermount3 exist) or the reader `library` (what `cfs get` uses).
    #[arg(long, value_parser = ["mount", "library"])]
    read_via: Option<String>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Fail the verdict when a fault stalls reads longer than this (500ms, 2s).
    #[arg(long)]
    max_stall: Option<String>,
}

pub fn run(a: ChaosArgs) -> Result<i32> {
    let file = match &a.scenario {
        Some(p) => ScenarioFile::parse(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("in {}", p.display()))?,
        None => ScenarioFile::default(),
    };
    let duration = match &file.duration {
        Some(d) => cfs_core::units::parse_duration(d)? as f64,
        None => a.duration as f64,
    };
    let replicas = file.replicas.unwrap_or(a.replicas);
    let mut hosts: Box<dyn Hosts> = match &a.testnet {
        Some(name) => {
            let dir = a
                .testnet_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("/var/tmp/cfs-testnet-{name}")));
            Box::new(Testnet::load(&dir).with_context(|| {
                format!(
                    "no testnet {name} in {} (`cfs testnet up --name {name}` first)",
                    dir.display()
                )
            })?)
        }
        None => {
            let nodes = file.nodes.unwrap_or(a.nodes);
            if nodes < replicas {
                bail!("--nodes must be at least --replicas");
            }
            let cfsd = a.cfsd.clone().unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .map(|p| p.with_file_name("cfsd"))
                    .filter(|p| p.exists())
                    .unwrap_or_else(|| PathBuf::from("cfsd"))
            });
            let dir = a.out.join("ring");
            let _ = std::fs::remove_dir_all(&dir);
            let args: Vec<String> = [
                "--replicas",
                &replicas.to_string(),
                "--stabilize-ms",
                "200",
                "--maintain-ms",
                "1000",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            Box::new(
                LocalRing::start(&cfsd, &dir, nodes, &args)
                    .context("starting the loopback ring")?,
            )
        }
    };
    let mut faults = file.faults(hosts.len())?;
    if let Some(every) = a.kill_every {
        let down = a.down_for.unwrap_or(every / 2).max(1) as f64;
        faults.extend(kill_every(every as f64, down, duration));
        faults.sort_by(|x, y| x.at.total_cmp(&y.at));
    }
    let opts = ChaosOpts {
        duration,
        replicas,
        faults,
        readers: a.readers,
        republish_every: a.republish_every as f64,
        files: a.files,
        file_bytes: a.file_kb << 10,
        settle: a.settle as f64,
        out: a.out.clone(),
        seed: a.seed,
        progress: !a.quiet,
        max_stall: a
            .max_stall
            .as_deref()
            .map(cfs_lab::chaos::scenario::parse_secs)
            .transpose()?,
        read_via: match a.read_via.as_deref() {
            Some("library") => ReadVia::Library,
            Some(_) => ReadVia::Mount { cfs: cfs_exe()? },
            None => ReadVia::best(cfs_exe()?),
        },
    };
    let mode = if a.testnet.is_some() {
        "testnet"
    } else {
        "loopback"
    };
    let result = chaos::run(hosts.as_mut(), &opts, mode);
    hosts.shutdown();
    let report = result?;
    print!("{}", report.text());
    let json = a.out.join("report.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let svg = a.out.join("report.svg");
    std::fs::write(&svg, report.svg()).with_context(|| format!("writing {}", svg.display()))?;
    println!("report: {} and {}", json.display(), svg.display());
    Ok(if report.ok() { 0 } else { 1 })
}

/// This `cfs`, which the readers' mount runs as.
fn cfs_exe() -> Result<PathBuf> {
    std::env::current_exe().context("finding the cfs binary for the readers' mount")
}
