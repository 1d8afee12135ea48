//! `cfs chaos`: a failure-injection experiment as a user runs it. A ring (loopback
//! processes, or a testnet's hosts) gets a published tree; while faults run on a
//! schedule, readers verify every byte they read against the source, a publisher
//! republishes, and a census counts the newest version's replicas every second. The
//! report says per fault how many reads failed, the longest stall and how long until
//! every block was back on r replicas, and whether anything was lost, read wrong or went
//! back to an older version.

pub mod hosts;
pub mod readers;
pub mod report;
pub mod scenario;

use cfs_core::block::BlockKind;
use cfs_core::Id;
use cfs_net::client::Client;
use cfs_net::net::Timeouts;
use cfs_net::transport::TcpTransport;
use cfs_tree::publish::{keygen, load_key, publish, PublishOpts};
use cfs_tree::service::net::NetRing;
use hosts::Hosts;
use rand::{Rng, SeedableRng};
use report::{Census, FaultRun, Observed, Read, Report};
use scenario::{Fault, FaultKind};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error(transparent)]
    Hosts(#[from] hosts::HostsError),
    #[error("preparing the run in {dir}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the ring did not form within 60 s ({seen} of {want} nodes seen)")]
    NoRing { seen: usize, want: usize },
    #[error("the first publish failed: {0}")]
    Publish(String),
    #[error("mounting the tree for the readers: {0}")]
    Mount(String),
    #[error("the workload thread failed: {0}")]
    Workload(String),
}

/// A run's knobs.
#[derive(Clone, Debug)]
pub struct ChaosOpts {
    pub duration: f64,
    pub replicas: usize,
    pub faults: Vec<Fault>,
    pub readers: usize,
    pub republish_every: f64,
    pub files: usize,
    pub file_bytes: usize,
    /// Seconds after the end to wait for every block to be back on r replicas.
    pub settle: f64,
    /// Report, tree, key and (loopback) node data go here.
    pub out: PathBuf,
    pub seed: u64,
    pub progress: bool,
    pub read_via: readers::ReadVia,
    /// Fail the verdict when a fault stalls reads longer than this (seconds).
    pub max_stall: Option<f64>,
}

/// What the workload shares with the fault schedule.
#[derive(Default)]
struct Log {
    reads: Vec<Read>,
    census: Vec<Census>,
    versions: u64,
    regressions: u64,
    /// The readers' (requests, hedged), once they stopped.
    hedges: Option<(u64, u64)>,
}

struct Shared {
    log: Mutex<Log>,
    stop: AtomicBool,
    t0: Mutex<Option<Instant>>,
    fsid: Mutex<Option<Id>>,
    ok_reads: AtomicU64,
    failed_reads: AtomicU64,
}

impl Shared {
    fn now(&self) -> f64 {
        self.t0
            .lock()
            .unwrap()
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
    }
}

/// Deterministic file contents: never all zero, different per file.
fn file_bytes(seed: u64, i: usize, n: usize) -> Vec<u8> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
    (0..n).map(|_| rng.random::<u8>() | 1).collect()
}

/// Run `opts` against `hosts`; `mode` names them in the report.
pub fn run(hosts: &mut dyn Hosts, opts: &ChaosOpts, mode: &str) -> Result<Report, ChaosError> {
    let io = |source| ChaosError::Io {
        dir: opts.out.clone(),
        source,
    };
    std::fs::create_dir_all(&opts.out).map_err(io)?;
    let tree = opts.out.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree).map_err(io)?;
    let mut expected: HashMap<String, Vec<u8>> = HashMap::new();
    for i in 0..opts.files {
        let name = format!("f{i:03}.bin");
        let b = file_bytes(opts.seed, i, opts.file_bytes);
        std::fs::write(tree.join(&name), &b).map_err(io)?;
        expected.insert(name, b);
    }
    std::fs::write(tree.join("version.txt"), "1").map_err(io)?;
    let key = opts.out.join("chaos.key");
    let _ = std::fs::remove_file(&key);
    keygen(&key).map_err(|e| ChaosError::Publish(e.to_string()))?;

    let shared = Arc::new(Shared {
        log: Mutex::default(),
        stop: AtomicBool::new(false),
        t0: Mutex::new(None),
        fsid: Mutex::new(None),
        ok_reads: AtomicU64::new(0),
        failed_reads: AtomicU64::new(0),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), ChaosError>>();
    let work = Workload {
        addrs: (0..hosts.len()).map(|i| hosts.addr(i)).collect(),
        opts: opts.clone(),
        tree: tree.clone(),
        key,
        expected: Arc::new(expected),
        shared: shared.clone(),
    };
    let handle = hosts.spawn_client(Box::new(move || work.run(ready_tx)));
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = handle.join();
            return Err(e);
        }
        Err(_) => {
            return Err(ChaosError::Workload(
                "the workload ended before starting".into(),
            ))
        }
    }

    // The schedule: each fault, and its undo when it has one.
    let faults = run_schedule(hosts, opts, &shared);
    shared.stop.store(true, Ordering::SeqCst);
    handle
        .join()
        .map_err(|_| ChaosError::Workload("panicked".into()))?
        .map_err(|e| ChaosError::Workload(e.to_string()))?;
    let log = std::mem::take(&mut *shared.log.lock().unwrap());
    let fsid = shared
        .fsid
        .lock()
        .unwrap()
        .map(|f| f.to_hex())
        .unwrap_or_default();
    let mut report = report::build(
        mode,
        hosts.len(),
        opts.replicas,
        opts.duration,
        fsid,
        opts.max_stall,
        Observed {
            reads: log.reads,
            census: log.census,
            faults,
            versions_published: log.versions,
            version_regressions: log.regressions,
        },
    );
    report.readers = opts.read_via.name().into();
    (report.requests, report.hedged) = log.hedges.unzip();
    Ok(report)
}

/// Apply the faults at their times (undoing those with a hold), until the duration.
fn run_schedule(hosts: &mut dyn Hosts, opts: &ChaosOpts, shared: &Shared) -> Vec<FaultRun> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(opts.seed);
    // (time, index into `runs` to undo) or (time, fault to start).
    enum Ev {
        Start(Fault),
        Undo(usize),
    }
    let mut events: Vec<(f64, Ev)> = opts
        .faults
        .iter()
        .map(|f| (f.at, Ev::Start(f.clone())))
        .collect();
    let mut runs: Vec<(FaultRun, Fault)> = Vec::new();
    let pb = progress_bar(opts);
    loop {
        events.sort_by(|a, b| a.0.total_cmp(&b.0));
        let next = events
            .first()
            .map_or(opts.duration, |e| e.0)
            .min(opts.duration);
        while shared.now() < next {
            pb.set_position(shared.now() as u64);
            pb.set_message(format!(
                "{} reads ok, {} failed, {} faults",
                shared.ok_reads.load(Ordering::Relaxed),
                shared.failed_reads.load(Ordering::Relaxed),
                runs.len()
            ));
            std::thread::sleep(
                Duration::from_millis(20)
                    .min(Duration::from_secs_f64((next - shared.now()).max(0.0))),
            );
        }
        if events.is_empty() || next >= opts.duration {
            break;
        }
        let (_, ev) = events.remove(0);
        let t = shared.now();
        match ev {
            Ev::Start(f) => {
                let up: Vec<usize> = (0..hosts.len()).filter(|&i| hosts.is_up(i)).collect();
                let node = f
                    .node
                    .or_else(|| (!up.is_empty()).then(|| up[rng.random_range(0..up.len())]));
                let (nodes, r) = match (f.kind, node) {
                    (FaultKind::Partition, _) => (Vec::new(), hosts.partition(&f.groups)),
                    (_, None) => (Vec::new(), Ok(())),
                    (FaultKind::Kill, Some(n)) => (vec![n], hosts.kill(n)),
                    (FaultKind::Pause, Some(n)) => (vec![n], hosts.pause(n)),
                    (FaultKind::Restart, Some(n)) => (vec![n], hosts.restart(n)),
                    (FaultKind::Replace, Some(n)) => (vec![n], hosts.replace(n)),
                    (FaultKind::Cap, Some(n)) => {
                        (vec![n], hosts.cap(n, f.rate.as_deref().unwrap_or("10mbit")))
                    }
                    (FaultKind::Fill, Some(n)) => (vec![n], hosts.fill(n)),
                    (FaultKind::Slow, Some(n)) => (vec![n], hosts.slow(n)),
                };
                let kind = format!("{:?}", f.kind).to_lowercase();
                // Hosts from 1, as the scenario and the report count them.
                let groups: Vec<Vec<usize>> = if f.kind == FaultKind::Partition {
                    f.groups
                        .iter()
                        .map(|g| g.iter().map(|n| n + 1).collect())
                        .collect()
                } else {
                    Vec::new()
                };
                let nodes = if groups.is_empty() {
                    nodes.iter().map(|n| n + 1).collect()
                } else {
                    groups.concat()
                };
                let mut fault = f.clone();
                fault.node = node;
                if let (Some(h), true) = (f.hold, r.is_ok()) {
                    events.push((t + h, Ev::Undo(runs.len())));
                }
                runs.push((
                    FaultRun {
                        t,
                        kind,
                        nodes,
                        groups,
                        until: None,
                        error: r.err().map(|e| e.to_string()),
                    },
                    fault,
                ));
            }
            Ev::Undo(i) => {
                let f = &runs[i].1;
                let r = undo(hosts, f);
                runs[i].0.until = Some(t);
                if let Err(e) = r {
                    runs[i].0.error = Some(format!("undoing: {e}"));
                }
            }
        }
    }
    // Faults still in force at the end are undone, so the settle can count repairs.
    for (run, f) in &mut runs {
        if run.until.is_none() && f.hold.is_some() {
            let _ = undo(hosts, f);
            run.until = Some(shared.now());
        }
    }
    pb.finish_and_clear();
    runs.into_iter().map(|(r, _)| r).collect()
}

/// Undo a fault that has a hold: restart, resume, heal, uncap, empty the disk.
fn undo(hosts: &mut dyn Hosts, f: &Fault) -> Result<(), hosts::HostsError> {
    match (f.kind, f.node) {
        (FaultKind::Kill, Some(n)) => hosts.restart(n),
        (FaultKind::Pause, Some(n)) => hosts.resume(n),
        (FaultKind::Partition, _) => hosts.heal(),
        (FaultKind::Cap, Some(n)) => hosts.uncap(n),
        (FaultKind::Fill, Some(n)) => hosts.unfill(n),
        (FaultKind::Slow, Some(n)) => hosts.unslow(n),
        _ => Ok(()),
    }
}

fn progress_bar(opts: &ChaosOpts) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !opts.progress || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(opts.duration as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    pb
}

/// The client side of a run: publisher, readers and census, on one runtime.
struct Workload {
    addrs: Vec<std::net::SocketAddr>,
    opts: ChaosOpts,
    tree: PathBuf,
    key: PathBuf,
    expected: Arc<HashMap<String, Vec<u8>>>,
    shared: Arc<Shared>,
}

impl Workload {
    fn run(self, ready: std::sync::mpsc::Sender<Result<(), ChaosError>>) {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(ChaosError::Workload(e.to_string())));
                return;
            }
        };
        rt.block_on(self.main(ready));
    }

    fn client(&self) -> Client<TcpTransport> {
        let t = Timeouts {
            rpc: Duration::from_secs(1),
            op: Duration::from_secs(5),
        };
        let mut c = Client::new(TcpTransport::new(None), self.addrs[0], t);
        c.replicas = self.opts.replicas;
        c
    }

    async fn main(self, ready: std::sync::mpsc::Sender<Result<(), ChaosError>>) {
        let mut client = self.client();
        // The ring first: every node in it.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        loop {
            if client.connect().await.is_ok() {
                if let Ok(r) = client.ring(self.addrs[0]).await {
                    seen = r.len();
                    if seen >= self.addrs.len() {
                        break;
                    }
                }
            }
            if Instant::now() > deadline {
                let _ = ready.send(Err(ChaosError::NoRing {
                    seen,
                    want: self.addrs.len(),
                }));
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let state = self.opts.out.join("state");
        let ring = Arc::new(NetRing::new(client.clone(), Some(state)));
        let sk = match load_key(&self.key) {
            Ok(k) => k,
            Err(e) => {
                let _ = ready.send(Err(ChaosError::Publish(e.to_string())));
                return;
            }
        };
        let popts = PublishOpts {
            progress: false,
            ..PublishOpts::default()
        };
        let fsid = match publish(ring.clone(), &self.tree, &sk, &popts).await {
            Ok(r) => r.fsid,
            Err(e) => {
                let _ = ready.send(Err(ChaosError::Publish(e.to_string())));
                return;
            }
        };
        let blocks = cfs_tree::keep::blocks_of(&client, fsid)
            .await
            .unwrap_or_default();
        let census_keys = Arc::new(Mutex::new(blocks));
        *self.shared.fsid.lock().unwrap() = Some(fsid);
        self.shared.log.lock().unwrap().versions = 1;
        let (source, _mounted) = match &self.opts.read_via {
            readers::ReadVia::Mount { cfs } => {
                let (cfs, node, out) = (cfs.clone(), self.addrs[0], self.opts.out.clone());
                let m = tokio::task::spawn_blocking(move || {
                    readers::Mounted::start(&cfs, fsid, node, &out)
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
                match m {
                    Ok(m) => (readers::Source::Mount(m.dir.clone()), Some(m)),
                    Err(e) => {
                        let _ = ready.send(Err(ChaosError::Mount(e)));
                        return;
                    }
                }
            }
            readers::ReadVia::Library => (
                readers::Source::Library {
                    ring: ring.clone(),
                    fsid,
                },
                None,
            ),
        };
        let source = Arc::new(source);
        *self.shared.t0.lock().unwrap() = Some(Instant::now());
        let _ = ready.send(Ok(()));

        let mut tasks = tokio::task::JoinSet::new();
        for r in 0..self.opts.readers.max(1) {
            tasks.spawn(readers::reader(
                r as u64,
                source.clone(),
                self.expected.clone(),
                self.shared.clone(),
                self.opts.seed,
            ));
        }
        if self.opts.republish_every > 0.0 {
            tasks.spawn(publisher(
                ring.clone(),
                client.clone(),
                self.tree.clone(),
                self.key.clone(),
                census_keys.clone(),
                self.shared.clone(),
                self.opts.republish_every,
            ));
        }
        tasks.spawn(census(
            client.clone(),
            census_keys.clone(),
            self.shared.clone(),
            self.opts.replicas,
            None,
        ));
        while tasks.join_next().await.is_some() {}
        // The readers are done: what hedging cost them (a mount says so as it exits).
        let hedges = match _mounted {
            Some(m) => tokio::task::spawn_blocking(move || m.stop())
                .await
                .ok()
                .flatten(),
            // Library readers share their client with the publisher: no count of
            // their own.
            None => None,
        };
        self.shared.log.lock().unwrap().hedges = hedges;
        // After the end: keep counting until every block is on r replicas again.
        let settle = Duration::from_secs_f64(self.opts.settle.max(0.0));
        census(
            client,
            census_keys,
            self.shared.clone(),
            self.opts.replicas,
            Some(settle),
        )
        .await;
    }
}

/// Republish the tree with the next version number in version.txt, every `every` s.
async fn publisher(
    ring: Arc<NetRing>,
    client: Client<TcpTransport>,
    tree: PathBuf,
    key: PathBuf,
    census_keys: Arc<Mutex<Vec<(BlockKind, Id, u64, u64)>>>,
    shared: Arc<Shared>,
    every: f64,
) {
    let Ok(sk) = load_key(&key) else { return };
    let popts = PublishOpts {
        progress: false,
        ..PublishOpts::default()
    };
    let mut next = shared.now() + every;
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.now() < next {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        next += every;
        let v = shared.log.lock().unwrap().versions + 1;
        if std::fs::write(tree.join("version.txt"), v.to_string()).is_err() {
            continue;
        }
        if let Ok(r) = publish(ring.clone(), &tree, &sk, &popts).await {
            shared.log.lock().unwrap().versions = r.version;
            if let Ok(b) = cfs_tree::keep::blocks_of(&client, r.fsid).await {
                *census_keys.lock().unwrap() = b;
            }
        } else {
            // A failed publish leaves version.txt ahead; the next one rewrites it.
            let _ = std::fs::write(tree.join("version.txt"), (v - 1).to_string());
        }
    }
}

/// Count replicas of the newest version's blocks every second: until stopped, or with
/// `settle`, until every block is on r replicas (at most that long).
async fn census(
    client: Client<TcpTransport>,
    keys: Arc<Mutex<Vec<(BlockKind, Id, u64, u64)>>>,
    shared: Arc<Shared>,
    r: usize,
    settle: Option<Duration>,
) {
    let until = settle.map(|s| Instant::now() + s);
    loop {
        if settle.is_none() && shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let started = Instant::now();
        let blocks = keys.lock().unwrap().clone();
        let items: Vec<(BlockKind, Id, u64)> = blocks.iter().map(|b| (b.0, b.1, b.2)).collect();
        if let Ok(counts) = client.held_counts(&items).await {
            let c = Census {
                t: shared.now(),
                blocks: items.len() as u64,
                below_r: counts.iter().filter(|&&n| n < r).count() as u64,
                missing: counts.iter().filter(|&&n| n == 0).count() as u64,
                missing_bytes: counts
                    .iter()
                    .zip(&blocks)
                    .filter(|(n, _)| **n == 0)
                    .map(|(_, b)| b.3)
                    .sum(),
            };
            let done = c.below_r == 0;
            shared.log.lock().unwrap().census.push(c);
            if settle.is_some() && done {
                return;
            }
        }
        if until.is_some_and(|u| Instant::now() > u) {
            return;
        }
        let left = Duration::from_secs(1).saturating_sub(started.elapsed());
        tokio::time::sleep(left).await;
    }
}
