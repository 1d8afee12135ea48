//! `cfs-sim`: experiments on the cfsd code over a simulated network. Each command prints
//! a table (or one JSON object with --json) and writes an SVG plot.

use anyhow::{Context, Result};
use cfs_sim::experiments::{self, Common, FailureArgs};
use cfs_sim::report;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "cfs-sim",
    about = "Run the cfs Chord/DHash code on a simulated network"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Opts {
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Probability that a message is lost.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Print one JSON object instead of a table (no plot unless --svg is given).
    #[arg(long)]
    json: bool,
    /// Where to write the plot.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Stabilization intervals between join waves (each wave at most doubles the ring).
    #[arg(long, default_value_t = 6)]
    wave_rounds: u32,
    /// Stabilization intervals after the last wave, for fingers to converge.
    #[arg(long, default_value_t = 25)]
    settle_rounds: u32,
    /// Pick next hops by id progress alone.
    #[arg(long)]
    no_server_selection: bool,
    /// The latency model's shortest and longest round trip (nodes placed from --seed as
    /// `cfs testnet up --rtt MIN-MAX --seed` places hosts).
    #[arg(long, default_value_t = 10)]
    min_rtt_ms: u64,
    #[arg(long, default_value_t = 200)]
    max_rtt_ms: u64,
    /// Ring positions per node.
    #[arg(long, default_value_t = 1)]
    vnodes: u16,
}

impl Opts {
    fn common(&self) -> Common {
        let mut c = Common::new(self.seed);
        c.loss = self.loss;
        c.plan.rounds_between_waves = self.wave_rounds;
        c.plan.rounds_after = self.settle_rounds;
        c.node.server_selection = !self.no_server_selection;
        c.min_rtt = std::time::Duration::from_millis(self.min_rtt_ms);
        c.max_rtt = std::time::Duration::from_millis(self.max_rtt_ms.max(self.min_rtt_ms));
        c.node.vnodes = self.vnodes.max(1);
        c
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Lookup path length on one ring.
    Lookup {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 1000)]
        lookups: usize,
        #[command(flatten)]
        o: Opts,
    },
    /// Lookup path length for N = 2^from .. 2^to.
    LookupSweep {
        #[arg(long, default_value_t = 4)]
        from: u32,
        #[arg(long, default_value_t = 14)]
        to: u32,
        #[arg(long, default_value_t = 2000)]
        lookups: usize,
        #[command(flatten)]
        o: Opts,
    },
    /// Fail a fraction of nodes at once; failed gets before and after stabilization, lost blocks.
    Failure {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 0.5)]
        fail: f64,
        #[arg(long, default_value_t = 6)]
        replicas: usize,
        /// Blocks to insert (default 10 per node).
        #[arg(long)]
        blocks: Option<usize>,
        /// Stabilization intervals between the failure and the second measurement.
        #[arg(long, default_value_t = 100)]
        rounds: u32,
        #[command(flatten)]
        o: Opts,
    },
    /// A fraction of nodes turns hostile (lies in lookups, withholds blocks, drops puts):
    /// lookups from honest nodes that still end at the true successor, blocks readable.
    Hostile {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 0.1)]
        hostile: f64,
        #[arg(long, default_value_t = 2000)]
        lookups: usize,
        #[arg(long, default_value_t = 2000)]
        blocks: usize,
        #[command(flatten)]
        o: Opts,
    },
    /// The failure experiment for several fractions.
    FailureSweep {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, value_delimiter = ',', default_value = "0.1,0.2,0.3,0.4,0.5")]
        fails: Vec<f64>,
        #[arg(long, default_value_t = 6)]
        replicas: usize,
        #[arg(long, default_value_t = 100)]
        rounds: u32,
        #[command(flatten)]
        o: Opts,
    },
    /// Blocks per node with 1 and with log2 N virtual servers.
    Load {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// Blocks (default 10 per node).
        #[arg(long)]
        blocks: Option<usize>,
        #[command(flatten)]
        o: Opts,
    },
    /// Hops and home-node load for a popular block, with and without path caching.
    Cache {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 500)]
        fetches: usize,
        #[command(flatten)]
        o: Opts,
    },
    /// An attacker holding a whole prefix grinds ids into the replica positions of keys:
    /// how many keys it captures under the old and the current replica rule.
    Grind {
        #[arg(long, default_value_t = 10_000)]
        honest: usize,
        /// The attacker's prefix length: 16 or 24.
        #[arg(long, default_value_t = 16)]
        attacker_bits: u8,
        #[arg(long, default_value_t = 16)]
        vnodes: u16,
        #[arg(long, default_value_t = 10_000)]
        targets: usize,
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        #[arg(long, default_value_t = 16)]
        successors: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Lookup latency with and without server selection.
    Selection {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 2000)]
        lookups: usize,
        #[command(flatten)]
        o: Opts,
    },
    /// Failed lookups vs join/leave rate per stabilization interval.
    Churn {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, value_delimiter = ',', default_value = "0,0.005,0.01,0.02,0.04")]
        rates: Vec<f64>,
        #[arg(long, default_value_t = 30)]
        intervals: u32,
        #[command(flatten)]
        o: Opts,
    },
    /// Garbage collection by leases: publishers republish daily trees with some churn
    /// and keep the newest versions; storage per node over the days.
    Gc {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 100)]
        publishers: usize,
        /// Blocks per tree.
        #[arg(long, default_value_t = 100)]
        blocks: usize,
        #[arg(long, default_value_t = 1024)]
        block_bytes: usize,
        /// Fraction of each tree's blocks replaced daily.
        #[arg(long, default_value_t = 0.05)]
        churn: f64,
        /// Versions each publisher keeps.
        #[arg(long, default_value_t = 7)]
        keep: usize,
        #[arg(long, default_value_t = 60)]
        days: u64,
        /// Lease asked, in days.
        #[arg(long, default_value_t = 3)]
        lease_days: u64,
        /// Maintenance rounds per day on every node.
        #[arg(long, default_value_t = 2)]
        rounds_per_day: u32,
        #[command(flatten)]
        o: Opts,
    },
    /// Every experiment; writes docs/results.md and the plots beside it.
    All {
        #[arg(long, default_value = "docs")]
        out: PathBuf,
        /// Smaller rings (CI-sized), for a fast check of the whole pipeline.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn emit<T: Serialize>(
    o: &Opts,
    value: &T,
    table: String,
    svg: String,
    default_svg: &str,
) -> Result<()> {
    if o.json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        print!("{table}");
    }
    let path = match (&o.svg, o.json) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => Some(PathBuf::from(default_svg)),
        (None, true) => None,
    };
    if let Some(p) = path {
        std::fs::write(&p, svg)
            .with_context(|| format!("cannot write the plot to {}", p.display()))?;
        if !o.json {
            println!("plot: {}", p.display());
        }
    }
    Ok(())
}

fn sweep(o: &Opts, from: u32, to: u32, lookups: usize) -> Result<Vec<experiments::LookupReport>> {
    let c = o.common();
    (from..=to)
        .map(|e| {
            eprintln!("lookup: N = {}", 1usize << e);
            Ok(experiments::lookup(&c, 1 << e, lookups)?)
        })
        .collect()
}

fn failure_sweep(
    o: &Opts,
    nodes: usize,
    fails: &[f64],
    replicas: usize,
    rounds: u32,
) -> Result<Vec<experiments::FailureReport>> {
    let mut c = o.common();
    c.node.replicas = replicas;
    fails
        .iter()
        .map(|&f| {
            eprintln!("failure: F = {f}");
            Ok(experiments::failure(
                &c,
                &FailureArgs {
                    nodes,
                    fail: f,
                    blocks: 10 * nodes,
                    rounds,
                },
            )?)
        })
        .collect()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let t0 = std::time::Instant::now();
    match cli.cmd {
        Cmd::Lookup { nodes, lookups, o } => {
            let r = experiments::lookup(&o.common(), nodes, lookups)?;
            emit(
                &o,
                &r,
                report::lookup_table(std::slice::from_ref(&r)),
                report::lookup_hist_svg(&r),
                "lookup.svg",
            )?;
        }
        Cmd::LookupSweep {
            from,
            to,
            lookups,
            ref o,
        } => {
            let rs = sweep(o, from, to, lookups)?;
            emit(
                o,
                &rs,
                report::lookup_table(&rs),
                report::lookup_sweep_svg(&rs),
                "lookup-sweep.svg",
            )?;
        }
        Cmd::Failure {
            nodes,
            fail,
            replicas,
            blocks,
            rounds,
            o,
        } => {
            let mut c = o.common();
            c.node.replicas = replicas;
            let a = FailureArgs {
                nodes,
                fail,
                blocks: blocks.unwrap_or(10 * nodes),
                rounds,
            };
            let r = experiments::failure(&c, &a)?;
            let rs = std::slice::from_ref(&r);
            emit(
                &o,
                &r,
                report::failure_table(rs),
                report::failure_svg(rs),
                "failure.svg",
            )?;
        }
        Cmd::FailureSweep {
            nodes,
            fails,
            replicas,
            rounds,
            ref o,
        } => {
            let rs = failure_sweep(o, nodes, &fails, replicas, rounds)?;
            emit(
                o,
                &rs,
                report::failure_table(&rs),
                report::failure_svg(&rs),
                "failure-sweep.svg",
            )?;
        }
        Cmd::Load { nodes, blocks, o } => {
            let r = experiments::load(&o.common(), nodes, blocks.unwrap_or(10 * nodes))?;
            emit(
                &o,
                &r,
                report::load_table(&r),
                report::load_svg(&r),
                "load.svg",
            )?;
        }
        Cmd::Grind {
            honest,
            attacker_bits,
            vnodes,
            targets,
            replicas,
            successors,
            seed,
            json,
        } => {
            anyhow::ensure!(
                (8..=24).contains(&attacker_bits),
                "--attacker-bits must be 8 to 24"
            );
            let g = cfs_sim::grind::grind(cfs_sim::grind::GrindArgs {
                honest,
                attacker_bits,
                vnodes,
                targets,
                r: replicas,
                succ_list: successors,
                seed,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&g)?);
            } else {
                print!("{}", cfs_sim::grind::table(&g));
            }
        }
        Cmd::Cache { nodes, fetches, o } => {
            let r = experiments::cache(&o.common(), nodes, fetches)?;
            emit(
                &o,
                &r,
                report::cache_table(&r),
                report::cache_svg(&r),
                "cache.svg",
            )?;
        }
        Cmd::Selection { nodes, lookups, o } => {
            let r = experiments::selection(&o.common(), nodes, lookups)?;
            emit(
                &o,
                &r,
                report::selection_table(&r),
                report::selection_svg(&r),
                "selection.svg",
            )?;
        }
        Cmd::Churn {
            nodes,
            rates,
            intervals,
            o,
        } => {
            let r = experiments::churn(&o.common(), nodes, &rates, intervals)?;
            emit(
                &o,
                &r,
                report::churn_table(&r),
                report::churn_svg(&r),
                "churn.svg",
            )?;
        }
        Cmd::Hostile {
            nodes,
            hostile,
            lookups,
            blocks,
            o,
        } => {
            let r = experiments::hostile(&o.common(), nodes, hostile, lookups, blocks)?;
            if o.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "nodes {} hostile {} (r = {}): lookups ending at the true successor {:.4}, \
                     failed {:.4}, mean hops {:.2}; blocks readable {:.4} of {} ({} with every \
                     replica hostile)",
                    r.nodes,
                    r.hostile,
                    r.replicas,
                    r.lookups_true_successor,
                    r.lookups_failed,
                    r.mean_hops,
                    r.blocks_readable,
                    r.blocks,
                    r.blocks_all_replicas_hostile
                );
            }
        }
        Cmd::Gc {
            nodes,
            publishers,
            blocks,
            block_bytes,
            churn,
            keep,
            days,
            lease_days,
            rounds_per_day,
            o,
        } => {
            let a = cfs_sim::gc::GcArgs {
                nodes,
                publishers,
                blocks,
                block_bytes,
                churn,
                keep,
                days,
                lease_days,
                rounds_per_day,
            };
            let r = cfs_sim::gc::gc(&o.common(), &a)?;
            emit(
                &o,
                &r,
                cfs_sim::gc::gc_table(&r),
                cfs_sim::gc::gc_svg(&r),
                "gc.svg",
            )?;
        }
        Cmd::All { out, quick, seed } => all(&out, quick, seed)?,
    }
    eprintln!("wall time {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn gc_section(g: &cfs_sim::gc::GcReport) -> String {
    format!(
        "## 8. Garbage collection by leases (N = {}, {} publishers, {} blocks per tree, {:.0}% replaced daily, newest {} versions kept, lease {} days)\n\n\
Every simulated day each publisher stores its new blocks with a lease and renews every block of the versions it \
keeps on all replicas (what `cfs keep --versions {}` does; trees are modelled as their block sets), then every node \
runs its own maintenance (sweep of expired blocks, repairs that carry leases, lease sync between replicas) twice. \
Storage per node levels off once old versions' blocks run out of lease, where keeping everything would grow \
linearly (dashed). Kept blocks missing from every node, summed over all days: {}. Mean copies per node on the last \
day over a week before: {:.3}.\n\n{}\n![garbage collection](gc.svg)\n\n",
        g.nodes,
        g.publishers,
        g.blocks_per_tree,
        g.churn * 100.0,
        g.keep,
        g.lease_days,
        g.keep,
        g.ever_missing,
        g.last_week_growth,
        cfs_sim::gc::gc_table(g)
    )
}

fn write(dir: &Path, name: &str, svg: String) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, svg).with_context(|| format!("cannot write {}", p.display()))
}

fn all(out: &Path, quick: bool, seed: u64) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let o = Opts {
        seed,
        loss: 0.0,
        json: true,
        svg: None,
        wave_rounds: 6,
        settle_rounds: 25,
        no_server_selection: false,
        min_rtt_ms: 10,
        max_rtt_ms: 200,
        vnodes: 1,
    };
    let (top, n, lookups) = if quick {
        (8, 256, 500)
    } else {
        (14, 1000, 2000)
    };
    let started = std::time::Instant::now();
    let mut md = String::from(
        "# cfs-sim results\n\nGenerated by `cargo run --release -p cfs-sim -- all` (see `cfs-sim --help`). \
Every figure comes from the cfsd node code (crate `cfsd`: Chord lookups, Zave stabilization, DHash puts, gets, \
maintenance, path caching) running over a simulated network in virtual time: nodes at random points of a unit \
square, round trips of 10 to 200 ms by distance, 1 s RPC timeout, stabilization every 1 s of virtual time. \
Rings are grown by real joins in waves that at most double them. Runs are seeded and repeatable: the same seed \
gives the same message trace (its SHA-1 is in each JSON report as `trace_hash`).\n\n",
    );
    md.push_str(&format!("Seed {seed}.\n\n"));

    eprintln!("1. lookup sweep");
    let rs = sweep(&o, 4, top, lookups)?;
    write(out, "lookup-sweep.svg", report::lookup_sweep_svg(&rs))?;
    md.push_str("## 1. Lookup path length vs N\n\nChord (SIGCOMM 2001) reports a mean of about 1/2 log2 N. \
Hops count RPCs to nodes other than the one starting the lookup.\n\n");
    md.push_str(&report::lookup_table(&rs));
    md.push_str("\n![lookup path length](lookup-sweep.svg)\n\n");
    let ten = if quick {
        None
    } else {
        Some(experiments::lookup(&o.common(), 10_000, 10_000)?)
    };
    if let Some(r) = &ten {
        write(out, "lookup-10000.svg", report::lookup_hist_svg(r))?;
        md.push_str(&format!(
            "N = 10,000 with 10,000 lookups: mean {:.3} hops (target <= {:.2}), p99 {}, trace {}.\n\n![hops at 10,000](lookup-10000.svg)\n\n",
            r.mean_hops, r.half_log2_n, r.p99_hops, r.run.trace_hash
        ));
    }

    eprintln!("2. failures");
    let fs = failure_sweep(&o, n, &[0.1, 0.2, 0.3, 0.4, 0.5], 6, 100)?;
    write(out, "failure.svg", report::failure_svg(&fs))?;
    md.push_str(&format!("## 2. Nodes failing at once (N = {n}, r = 6, 10 blocks per node)\n\n\
\"Right after\": gets with stabilization stopped, the ring as the failure left it. \"Stabilized\": after 100 \
stabilization intervals with maintenance running. Failed gets count only blocks that still had a live replica. \
Lost blocks are those whose every holder failed, beside F^r; sigma is taken over replica sets, since the blocks \
of one set are lost together.\n\n"));
    md.push_str(&report::failure_table(&fs));
    md.push_str("\n![failures](failure.svg)\n\n");

    eprintln!("3. load balance");
    let l = experiments::load(&o.common(), n, 10 * n)?;
    write(out, "load.svg", report::load_svg(&l))?;
    md.push_str(&format!("## 3. Load balance (N = {n}, {} blocks, r = 1)\n\nChord: the 99th percentile falls from about 4.8x to 1.6x the mean with 20 virtual servers.\n\n", l.blocks));
    md.push_str(&report::load_table(&l));
    md.push_str("\n![load balance](load.svg)\n\n");

    eprintln!("4. caching");
    let c = experiments::cache(&o.common(), n, if quick { 100 } else { 500 })?;
    write(out, "cache.svg", report::cache_svg(&c))?;
    md.push_str(&format!(
        "## 4. Path caching (N = {n}, one popular block fetched {} times from random nodes)\n\n\
Home-node load counts lookup steps and gets for the block that reached its r replicas.\n\n",
        c.fetches
    ));
    md.push_str(&report::cache_table(&c));
    md.push_str("\n![caching](cache.svg)\n\n");

    eprintln!("5. server selection");
    let s = experiments::selection(&o.common(), n, lookups)?;
    write(out, "selection.svg", report::selection_svg(&s))?;
    md.push_str(&format!(
        "## 5. Server selection (N = {n}, {lookups} lookups)\n\n"
    ));
    md.push_str(&report::selection_table(&s));
    md.push_str("\n![server selection](selection.svg)\n\n");

    eprintln!("6. churn");
    let ch = experiments::churn(&o.common(), n, &[0.0, 0.005, 0.01, 0.02, 0.04], 30)?;
    write(out, "churn.svg", report::churn_svg(&ch))?;
    md.push_str(&format!("## 6. Churn (N = {n}, {} stabilization intervals)\n\n\
Each interval, rate x N nodes fail and as many join, at random times; lookups from random live nodes every 50 ms \
are checked against the true ring when they finish.\n\n", ch.intervals));
    md.push_str(&report::churn_table(&ch));
    md.push_str("\n![churn](churn.svg)\n\n");

    eprintln!("7. hostile nodes");
    md.push_str(&format!("## 7. Hostile nodes (N = {n}, r = 3, {lookups} lookups and {lookups} blocks)\n\n\
After the blocks are stored, a fraction of the nodes turns hostile: in its lookup answers half of them claim to \
be the successor of every key (the whole ring) and half name no closer node (stonewalling); all withhold every \
block and drop puts and cache offers, while they keep stabilizing so they stay in the ring. Lookups and reads start at honest nodes. A lookup is right when it ends at \
the key's true successor (which may itself be hostile); a block can only be unreadable if all its replicas are \
hostile, counted in the last column.\n\n\
| hostile | lookups at the true successor | lookups failed | wrong answers accepted | mean hops | blocks readable | blocks with every replica hostile |\n\
| --- | --- | --- | --- | --- | --- | --- |\n"));
    for f in [0.1, 0.2, 0.3] {
        let h = experiments::hostile(&o.common(), n, f, lookups, lookups)?;
        md.push_str(&format!(
            "| {:.0}% | {:.4} | {:.4} | {:.4} | {:.2} | {:.4} | {} |\n",
            f * 100.0,
            h.lookups_true_successor,
            h.lookups_failed,
            (1.0 - h.lookups_true_successor - h.lookups_failed).max(0.0),
            h.mean_hops,
            h.blocks_readable,
            h.blocks_all_replicas_hostile
        ));
    }
    md.push('\n');

    eprintln!("8. garbage collection");
    let a = cfs_sim::gc::GcArgs {
        nodes: n,
        publishers: if quick { 20 } else { 100 },
        blocks: 100,
        block_bytes: 1024,
        churn: 0.05,
        keep: 7,
        days: if quick { 20 } else { 60 },
        lease_days: 3,
        rounds_per_day: 2,
    };
    let g = cfs_sim::gc::gc(&o.common(), &a)?;
    write(out, "gc.svg", cfs_sim::gc::gc_svg(&g))?;
    md.push_str(&gc_section(&g));

    md.push_str(&format!(
        "Generated in {:.0} s of wall time{}.\n",
        started.elapsed().as_secs_f64(),
        if quick { " (--quick)" } else { "" }
    ));
    let p = out.join("results.md");
    std::fs::write(&p, md).with_context(|| format!("cannot write {}", p.display()))?;
    println!("wrote {}", p.display());
    Ok(())
}
