//! `cfs testnet`: a ring of real hosts on one machine. Each host is a network namespace
//! with its own address from 198.18.0.0/15 (the block reserved for network benchmark
//! tests), linked through a bridge that lives in a namespace of its own: nothing is added
//! to the root namespace, and no address leaves these namespaces. Each host runs one
//! `cfsd`. Faults (kill, pause, restart, replace, partition, link caps) act on hosts by
//! index. Everything made is recorded in a state file, so `down` removes it after a
//! crash too. Needs root, `ip` and `tc` (iproute2) and `nsenter` (util-linux).

use crate::wan::{self, RttModel, WanConfig, WanHost};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum TestnetError {
    #[error("`cfs testnet` needs root (network namespaces); run it with sudo")]
    NotRoot,
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("cannot run `{cmd}` (are iproute2, util-linux and nftables installed?)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("testnet state {path} does not decode: {msg}")]
    State { path: PathBuf, msg: String },
    #[error("no host {0} in this testnet")]
    NoHost(usize),
    #[error("host {host}'s cfsd did not write its address within {secs} s; see {log}")]
    NodeStart {
        host: String,
        secs: u64,
        log: PathBuf,
    },
    #[error("invalid testnet parameter: {0}")]
    Param(String),
}

type Result<T> = std::result::Result<T, TestnetError>;

/// What `up` builds.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Prefix of every namespace (`NAME-br`, `NAME-h1`, ...): several testnets can run
    /// at once under different names.
    pub name: String,
    pub hosts: usize,
    /// The third octet: hosts get 198.18.SUBNET.1 and up.
    pub subnet: u8,
    pub port: u16,
    /// Where data directories, logs and the state file go.
    pub dir: PathBuf,
    pub cfsd: PathBuf,
    /// Extra `cfsd` flags for every host.
    pub cfsd_args: Vec<String>,
    /// A TBF rate for every host's link (e.g. `200mbit`), both directions.
    pub rate: Option<String>,
    /// Give every host a disk of its own: a tmpfs of this many MiB for its data, which
    /// the `fill` fault fills up.
    pub disk_mb: Option<u64>,
    /// Wide-area links (delay, jitter, loss) through the user-space emulator instead of
    /// the bridge (`wan.rs`).
    pub wan: Option<WanSpec>,
}

/// The wide-area model of a testnet.
#[derive(Clone, Debug)]
pub struct WanSpec {
    pub rtt: RttModel,
    /// Up to this much more one-way delay per packet, at random.
    pub jitter: Duration,
    /// Probability that a packet is lost.
    pub loss: f64,
    /// Places the hosts of a `Range` model.
    pub seed: u64,
    /// The `cfs` binary, which runs the emulator (`cfs testnet emulate DIR`).
    pub emulator: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The port its cfsd listens on now (a restart may move it).
    pub port: u16,
    pub pid: Option<u32>,
    pub data: PathBuf,
    /// Set while the process is stopped by SIGSTOP.
    #[serde(default)]
    pub paused: bool,
    /// This host's rate cap, if any.
    #[serde(default)]
    pub rate: Option<String>,
    /// The tmpfs mounted for this host's disk (its data is inside), if any.
    #[serde(default)]
    pub disk: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Testnet {
    pub name: String,
    pub dir: PathBuf,
    pub bridge_ns: String,
    pub cfsd: PathBuf,
    pub cfsd_args: Vec<String>,
    pub hosts: Vec<Host>,
    /// The groups of the current partition (host indexes), empty when whole.
    #[serde(default)]
    pub partition: Vec<Vec<usize>>,
    /// The link emulator's process, when the hosts are linked through it.
    #[serde(default)]
    pub wan_pid: Option<u32>,
}

const STATE: &str = "testnet.json";

fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestnetError::Spawn {
            cmd: shown.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TestnetError::Command {
            cmd: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

fn tc(ns: &str, args: &[&str]) -> Result<String> {
    run(Command::new("tc").arg("-n").arg(ns).args(args))
}

/// Why a testnet cannot run here (not root, or a tool missing), if it cannot: tests skip
/// with this message.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("a testnet needs root".into());
    }
    let missing: Vec<&str> = [
        ("ip", "-V"),
        ("tc", "-V"),
        ("nsenter", "--version"),
        ("nft", "--version"),
    ]
    .into_iter()
    .filter(|(tool, arg)| {
        Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
    })
    .map(|(tool, _)| tool)
    .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "a testnet needs {} (iproute2, util-linux, nftables)",
            missing.join(", ")
        )
    })
}

/// The nftables table a partition adds in each host's namespace.
const NFT_TABLE: &str = "cfs_partition";

/// `nft` inside namespace `ns` (nsenter: the namespace's rules, nothing else changes).
fn nft(ns: &str, args: &[&str]) -> Result<String> {
    run(Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("nft")
        .args(args))
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TestnetError + 'a {
    move |source| TestnetError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Namespaces whose names start with `name-`: what a testnet called `name` made.
fn namespaces_of(name: &str) -> Vec<String> {
    let Ok(out) = ip(&["netns", "list"]) else {
        return Vec::new();
    };
    let prefix = format!("{name}-");
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

impl Testnet {
    /// Build the hosts, link them, start a `cfsd` on each (the first starts the ring,
    /// the others join it) and write the state file.
    pub fn up(spec: &Spec) -> Result<Testnet> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(TestnetError::NotRoot);
        }
        if spec.hosts == 0 || spec.hosts > 250 {
            return Err(TestnetError::Param("--hosts must be 1 to 250".into()));
        }
        if spec.name.is_empty()
            || spec.name.len() > 24
            || !spec
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(TestnetError::Param(
                "--name: 1 to 24 letters, digits or '-'".into(),
            ));
        }
        std::fs::create_dir_all(&spec.dir).map_err(io("creating", &spec.dir))?;
        let bridge_ns = format!("{}-br", spec.name);
        let mut net = Testnet {
            name: spec.name.clone(),
            dir: spec.dir.clone(),
            bridge_ns: bridge_ns.clone(),
            cfsd: spec.cfsd.clone(),
            cfsd_args: spec.cfsd_args.clone(),
            hosts: Vec::new(),
            partition: Vec::new(),
            wan_pid: None,
        };
        // Recorded before anything is made, so a failure half-way is cleaned by `down`.
        net.save()?;
        if spec.wan.is_none() {
            ip(&["netns", "add", &bridge_ns])?;
            ip(&["-n", &bridge_ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &bridge_ns, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &bridge_ns, "link", "set", "br0", "up"])?;
        }
        for k in 1..=spec.hosts {
            let ns = format!("{}-h{k}", spec.name);
            let host_ip = Ipv4Addr::new(198, 18, spec.subnet, k as u8);
            let disk = spec.disk_mb.map(|_| spec.dir.join(format!("disk{k}")));
            let data = match &disk {
                Some(d) => d.join("data"),
                None => spec.dir.join(format!("h{k}")),
            };
            net.hosts.push(Host {
                name: format!("h{k}"),
                ns: ns.clone(),
                ip: host_ip,
                port: spec.port,
                pid: None,
                data: data.clone(),
                paused: false,
                rate: None,
                disk: None,
            });
            net.save()?;
            if let (Some(d), Some(mb)) = (&disk, spec.disk_mb) {
                std::fs::create_dir_all(d).map_err(io("creating", d))?;
                run(Command::new("mount")
                    .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
                    .arg(d))?;
                net.hosts[k - 1].disk = Some(d.clone());
                net.save()?;
            }
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            if spec.wan.is_some() {
                continue;
            }
            let side = format!("v{k}");
            // Both ends are made inside namespaces: nothing appears in the root one.
            ip(&[
                "-n", &bridge_ns, "link", "add", &side, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            ip(&[
                "-n", &bridge_ns, "link", "set", &side, "master", "br0", "up",
            ])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{host_ip}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            if let Some(rate) = &spec.rate {
                net.cap(k - 1, rate)?;
            }
        }
        if let Some(w) = &spec.wan {
            net.start_wan(w, spec.rate.as_deref())?;
        }
        for i in 0..net.hosts.len() {
            net.start(i)?;
        }
        net.save()?;
        Ok(net)
    }

    pub fn state_path(dir: &Path) -> PathBuf {
        dir.join(STATE)
    }

    pub fn load(dir: &Path) -> Result<Testnet> {
        let path = Self::state_path(dir);
        let bytes = std::fs::read(&path).map_err(io("reading", &path))?;
        serde_json::from_slice(&bytes).map_err(|e| TestnetError::State {
            path,
            msg: e.to_string(),
        })
    }

    fn save(&self) -> Result<()> {
        let path = Self::state_path(&self.dir);
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(self).expect("state encodes");
        std::fs::write(&tmp, body).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("writing", &path))
    }

    fn host(&self, i: usize) -> Result<&Host> {
        self.hosts.get(i).ok_or(TestnetError::NoHost(i))
    }

    /// Host `i`'s node address.
    pub fn addr(&self, i: usize) -> SocketAddr {
        let h = &self.hosts[i];
        SocketAddr::new(h.ip.into(), h.port)
    }

    /// The path of host `i`'s network namespace, for `nsenter --net=`.
    pub fn netns_path(&self, i: usize) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.hosts[i].ns)
    }

    /// A command that runs `program` inside host `i`'s network namespace (and the
    /// machine's mount namespace, so a FUSE mount made there is visible to all).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns_path(i).display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Start host `i`'s cfsd on its data directory (joining the first other live host).
    pub fn start(&mut self, i: usize) -> Result<()> {
        let join = (0..self.hosts.len())
            .find(|&j| j != i && self.hosts[j].pid.is_some())
            .map(|j| self.addr(j));
        let h = self.host(i)?.clone();
        std::fs::create_dir_all(&h.data).map_err(io("creating", &h.data))?;
        let _ = std::fs::remove_file(h.data.join("addr"));
        let log_path = self.dir.join(format!("{}.log", h.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("opening", &log_path))?;
        let mut cmd = self.command(i, &self.cfsd);
        // Listening on every address of the host and advertising its own, as a node
        // behind a wildcard bind (or port forwarding) runs.
        cmd.arg("--listen")
            .arg(format!("0.0.0.0:{}", h.port))
            .arg("--advertise")
            .arg(SocketAddr::new(h.ip.into(), h.port).to_string())
            .arg("--data")
            .arg(&h.data);
        if let Some(j) = join {
            cmd.arg("--join").arg(j.to_string());
        }
        cmd.args(&self.cfsd_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.try_clone().map_err(io("opening", &log_path))?);
        // Its own process group: a terminal's Ctrl-C to `cfs` does not reach the nodes.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|source| TestnetError::Spawn {
            cmd: format!("nsenter ... {}", self.cfsd.display()),
            source,
        })?;
        self.hosts[i].pid = Some(child.id());
        self.hosts[i].paused = false;
        self.save()?;
        // nsenter execs cfsd: the child is the node. It is reaped by whoever waits last
        // (`down` kills it); dropping the handle does not stop it.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !h.data.join("addr").exists() {
            if Instant::now() > deadline {
                return Err(TestnetError::NodeStart {
                    host: h.name.clone(),
                    secs: 20,
                    log: log_path,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn signal(&mut self, i: usize, sig: i32) -> Result<Option<u32>> {
        let pid = self.host(i)?.pid;
        if let Some(p) = pid {
            // SAFETY: kill with a pid we started; a stale pid fails harmlessly (ESRCH).
            unsafe {
                libc::kill(p as i32, sig);
            }
        }
        Ok(pid)
    }

    /// kill -9 host `i`'s node.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(p) = self.signal(i, libc::SIGKILL)? {
            reap(p);
        }
        self.hosts[i].pid = None;
        self.hosts[i].paused = false;
        self.save()
    }

    /// SIGSTOP: a hung node that still holds its sockets.
    pub fn pause(&mut self, i: usize) -> Result<()> {
        self.signal(i, libc::SIGSTOP)?;
        self.hosts[i].paused = true;
        self.save()
    }

    pub fn resume(&mut self, i: usize) -> Result<()> {
        self.signal(i, libc::SIGCONT)?;
        self.hosts[i].paused = false;
        self.save()
    }

    /// Kill and start again on the old data.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i)?;
        self.start(i)
    }

    /// Kill and start a fresh node with an empty disk at the same address.
    pub fn replace(&mut self, i: usize) -> Result<()> {
        self.kill(i)?;
        let data = self.hosts[i].data.clone();
        if data.exists() {
            std::fs::remove_dir_all(&data).map_err(io("removing", &data))?;
        }
        self.start(i)
    }

    /// Cut the testnet into `groups` (host indexes; hosts in no group are cut from all):
    /// each host's namespace gets an nftables table that drops every packet to and from
    /// hosts outside its group, as a real partition does: nothing is refused, packets
    /// vanish, and connections hang until their timeouts.
    pub fn partition(&mut self, groups: &[Vec<usize>]) -> Result<()> {
        self.heal()?;
        for g in groups {
            for &i in g {
                self.host(i)?;
            }
        }
        let group_of = |i: usize| groups.iter().position(|g| g.contains(&i));
        for i in 0..self.hosts.len() {
            let others: Vec<String> = (0..self.hosts.len())
                .filter(|&j| i != j && (group_of(i).is_none() || group_of(i) != group_of(j)))
                .map(|j| self.hosts[j].ip.to_string())
                .collect();
            if others.is_empty() {
                continue;
            }
            let set = format!("{{ {} }}", others.join(", "));
            let ns = &self.hosts[i].ns;
            nft(ns, &["add", "table", "inet", NFT_TABLE])?;
            for (chain, hook, dir) in [("in", "input", "saddr"), ("out", "output", "daddr")] {
                nft(
                    ns,
                    &[
                        "add",
                        "chain",
                        "inet",
                        NFT_TABLE,
                        chain,
                        &format!("{{ type filter hook {hook} priority 0; policy accept; }}"),
                    ],
                )?;
                nft(
                    ns,
                    &[
                        "add", "rule", "inet", NFT_TABLE, chain, "ip", dir, &set, "drop",
                    ],
                )?;
            }
        }
        self.partition = groups.to_vec();
        self.save()
    }

    /// Undo `partition`.
    pub fn heal(&mut self) -> Result<()> {
        for h in &self.hosts {
            match nft(&h.ns, &["delete", "table", "inet", NFT_TABLE]) {
                // Absent when this host was never cut off.
                Err(TestnetError::Command { ref stderr, .. })
                    if stderr.contains("No such file or directory") => {}
                r => {
                    r?;
                }
            }
        }
        self.partition.clear();
        self.save()
    }

    /// Link the hosts through the emulator: its config, the process (detached, so it
    /// outlives `up`), and each host's TUN device addressed once the emulator has made it.
    fn start_wan(&mut self, w: &WanSpec, rate: Option<&str>) -> Result<()> {
        let rate_bps = rate.map(wan::parse_rate).transpose()?;
        let cfg = WanConfig {
            hosts: self
                .hosts
                .iter()
                .map(|h| WanHost {
                    netns: PathBuf::from("/run/netns").join(&h.ns),
                    ip: h.ip,
                    rate_bps,
                })
                .collect(),
            rtt_ms: w.rtt.matrix(self.hosts.len(), w.seed)?,
            jitter_ms: w.jitter.as_secs_f64() * 1e3,
            loss: w.loss,
            seed: w.seed,
        };
        cfg.save(&self.dir)?;
        let _ = std::fs::remove_file(self.dir.join(wan::READY));
        let log = self.dir.join("wan.log");
        let log_file = std::fs::File::create(&log).map_err(io("creating", &log))?;
        let mut cmd = Command::new(&w.emulator);
        cmd.args(["testnet", "emulate", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|source| TestnetError::Spawn {
            cmd: format!("{} testnet emulate", w.emulator.display()),
            source,
        })?;
        self.wan_pid = Some(child.id());
        for h in &mut self.hosts {
            h.rate = rate.map(str::to_string);
        }
        self.save()?;
        let ready = self.dir.join(wan::READY);
        let end = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > end {
                return Err(TestnetError::Command {
                    cmd: "cfs testnet emulate".into(),
                    stderr: format!("the link emulator did not start; see {}", log.display()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for h in &self.hosts {
            let addr = format!("{}/24", h.ip);
            ip(&["-n", &h.ns, "addr", "add", &addr, "dev", wan::DEVICE])?;
            ip(&["-n", &h.ns, "link", "set", wan::DEVICE, "up"])?;
        }
        Ok(())
    }

    /// A new rate (None: none) for host `i` in the emulator's links; it rereads them.
    fn wan_rate(&mut self, i: usize, rate: Option<&str>) -> Result<()> {
        let mut cfg = WanConfig::load(&self.dir)?;
        cfg.hosts[i].rate_bps = rate.map(wan::parse_rate).transpose()?;
        cfg.save(&self.dir)?;
        self.hosts[i].rate = rate.map(str::to_string);
        self.save()
    }

    /// Cap host `i`'s link to `rate` (tc syntax: `200mbit`) in both directions: a TBF on
    /// its own interface and on the bridge's side of its link, or the emulator's rate.
    pub fn cap(&mut self, i: usize, rate: &str) -> Result<()> {
        if self.wan_pid.is_some() {
            self.host(i)?;
            return self.wan_rate(i, Some(rate));
        }
        let ns = self.host(i)?.ns.clone();
        let tbf = [
            "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "256kb",
            "latency", "100ms",
        ];
        tc(&ns, &tbf)?;
        let side = format!("v{}", i + 1);
        let mut bridge = tbf;
        bridge[3] = &side;
        tc(&self.bridge_ns, &bridge)?;
        self.hosts[i].rate = Some(rate.to_string());
        self.save()
    }

    pub fn uncap(&mut self, i: usize) -> Result<()> {
        if self.wan_pid.is_some() {
            self.host(i)?;
            return self.wan_rate(i, None);
        }
        let ns = self.host(i)?.ns.clone();
        let _ = tc(&ns, &["qdisc", "del", "dev", "eth0", "root"]);
        let _ = tc(
            &self.bridge_ns,
            &["qdisc", "del", "dev", &format!("v{}", i + 1), "root"],
        );
        self.hosts[i].rate = None;
        self.save()
    }

    /// Fill host `i`'s disk (a testnet made with `disk_mb`) up to its last 512 KiB: its
    /// node must refuse new blocks and keep serving what it holds.
    pub fn fill(&mut self, i: usize) -> Result<()> {
        let disk = self.host(i)?.disk.clone().ok_or_else(|| {
            TestnetError::Param("fill needs a testnet with its own disks (--disk-mb)".into())
        })?;
        let filler = disk.join("filler");
        let st = rustix::fs::statvfs(&disk)
            .map_err(|e| std::io::Error::from(e))
            .map_err(io("measuring", &disk))?;
        let free = st.f_bavail * st.f_frsize;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&filler)
            .map_err(io("creating", &filler))?;
        let grow = free.saturating_sub(512 << 10) as i64;
        let start = f.metadata().map_err(io("reading", &filler))?.len() as i64;
        // SAFETY: posix_fallocate on an fd we own.
        let r = unsafe {
            libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), start, grow.max(1))
        };
        if r != 0 {
            return Err(io("filling", &filler)(std::io::Error::from_raw_os_error(r)));
        }
        Ok(())
    }

    /// Undo `fill`.
    pub fn unfill(&mut self, i: usize) -> Result<()> {
        if let Some(d) = &self.host(i)?.disk {
            let _ = std::fs::remove_file(d.join("filler"));
        }
        Ok(())
    }

    /// Stop every node and remove every namespace and file the testnet made.
    pub fn down(self) -> Result<()> {
        down(&self.name, &self.dir)
    }
}

/// Wait (at most 5 s) until `pid`, just sent SIGKILL, is gone, so its sockets are
/// released before a new node binds the same port. Our own child is reaped; a node that
/// another `cfs` started (a testnet loaded from its state file) is not our child, and is
/// gone once it no longer exists or is a zombie (which holds no sockets).
fn reap(pid: u32) {
    for _ in 0..500 {
        let mut status = 0;
        // SAFETY: waitpid on a pid; WNOHANG never blocks, ECHILD when not our child.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        if r > 0 {
            return;
        }
        if r < 0 {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
            // The state follows the parenthesised command name.
            let dead = state
                .as_deref()
                .and_then(|s| s.rsplit_once(')'))
                .is_none_or(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']));
            if dead {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes the testnet `name` whose state is in `dir` when dropped, whatever happened
/// (a test's failure included).
pub struct DownGuard {
    pub name: String,
    pub dir: PathBuf,
}

impl Drop for DownGuard {
    fn drop(&mut self) {
        if let Err(e) = down(&self.name, &self.dir) {
            eprintln!("testnet cleanup: {e}");
        }
    }
}

/// Remove the testnet `name` whose state is in `dir`: from the state file if it is
/// there, and every namespace named `name-*` in any case (a crash may have left some
/// unrecorded).
pub fn down(name: &str, dir: &Path) -> Result<()> {
    if let Ok(net) = Testnet::load(dir) {
        for h in &net.hosts {
            if let Some(p) = h.pid {
                // SAFETY: signals to pids we started; a stale pid fails with ESRCH.
                unsafe {
                    libc::kill(p as i32, libc::SIGCONT);
                    libc::kill(p as i32, libc::SIGKILL);
                }
                reap(p);
            }
        }
        for d in net.hosts.iter().filter_map(|h| h.disk.as_ref()) {
            let _ = run(Command::new("umount").arg("-l").arg(d));
        }
        // The emulator, if that pid is still it (not a process that reused the number).
        let emulator = |p: u32| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.windows(7).any(|w| w == b"emulate"))
        };
        if let Some(p) = net.wan_pid.filter(|p| emulator(*p)) {
            // SAFETY: as above; the emulator's devices go with it.
            unsafe {
                libc::kill(p as i32, libc::SIGKILL);
            }
            reap(p);
        }
    }
    // Any process still in one of our namespaces (a node started by a crashed run).
    for ns in namespaces_of(name) {
        if let Ok(pids) = ip(&["netns", "pids", &ns]) {
            for p in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: as above.
                unsafe {
                    libc::kill(p, libc::SIGCONT);
                    libc::kill(p, libc::SIGKILL);
                }
            }
        }
        let _ = ip(&["netns", "del", &ns]);
    }
    let left = namespaces_of(name);
    if !left.is_empty() {
        return Err(TestnetError::Command {
            cmd: "ip netns del".into(),
            stderr: format!("namespaces left: {left:?}"),
        });
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io("removing", dir))?;
    }
    Ok(())
}

/// Run `f` on a thread of its own inside host `i`'s network namespace: sockets it makes
/// (a client's, a tokio runtime's) belong to that host.
pub fn in_host<T: Send + 'static>(
    net: &Testnet,
    i: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    spawn_in_host(net, i, f)
        .join()
        .map_err(|_| std::io::Error::other("the closure in the host namespace panicked"))?
}

/// `in_host` without waiting: the thread's handle.
pub fn spawn_in_host<T: Send + 'static>(
    net: &Testnet,
    i: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<std::io::Result<T>> {
    let path = net.netns_path(i);
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path)?;
        // SAFETY: setns on this thread only, with an fd we own; CLONE_NEWNET is allowed
        // for a thread of a multi-threaded process.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    })
}
