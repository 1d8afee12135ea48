//! What `cfs chaos` injects faults into: a ring of `cfsd` processes on loopback (no root:
//! kill, pause, restart, replace) or a testnet (root: also partitions and link caps).

use crate::testnet::{spawn_in_host, Testnet, TestnetError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("{0} needs a testnet (`cfs chaos --testnet NAME`, as root): a loopback ring has no links to cut")]
    NeedsTestnet(&'static str),
    #[error("no node {0}")]
    NoNode(usize),
    #[error("starting cfsd {cfsd}")]
    Spawn {
        cfsd: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cfsd in {dir} did not write its address within 20 s (see its log there)")]
    NoAddr { dir: PathBuf },
    #[error(transparent)]
    Testnet(#[from] TestnetError),
}

type Result<T> = std::result::Result<T, HostsError>;

/// The fault-injection surface.
pub trait Hosts: Send {
    fn len(&self) -> usize;
    fn addr(&self, i: usize) -> SocketAddr;
    fn is_up(&self, i: usize) -> bool;
    fn kill(&mut self, i: usize) -> Result<()>;
    fn pause(&mut self, i: usize) -> Result<()>;
    fn resume(&mut self, i: usize) -> Result<()>;
    fn restart(&mut self, i: usize) -> Result<()>;
    fn replace(&mut self, i: usize) -> Result<()>;
    fn partition(&mut self, groups: &[Vec<usize>]) -> Result<()>;
    fn heal(&mut self) -> Result<()>;
    fn cap(&mut self, i: usize, rate: &str) -> Result<()>;
    fn uncap(&mut self, i: usize) -> Result<()>;
    fn fill(&mut self, i: usize) -> Result<()>;
    fn unfill(&mut self, i: usize) -> Result<()>;
    /// Make node `i` answer, but late (`unslow` undoes it).
    fn slow(&mut self, i: usize) -> Result<()>;
    fn unslow(&mut self, i: usize) -> Result<()>;
    /// Start the workload (`f`) on a thread where a client of this ring lives: on
    /// loopback anywhere, on a testnet inside host 1's namespace.
    fn spawn_client(
        &self,
        f: Box<dyn FnOnce() + Send + 'static>,
    ) -> std::thread::JoinHandle<std::io::Result<()>>;
    /// Stop everything this set of hosts started.
    fn shutdown(&mut self);
}

struct LocalNode {
    child: Option<Child>,
    data: PathBuf,
    addr: SocketAddr,
    paused: bool,
    /// While slowed: the thread that stops and resumes it, and its stop flag.
    slowed: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

/// `n` cfsd processes on 127.0.0.1 with data under `dir`.
pub struct LocalRing {
    cfsd: PathBuf,
    args: Vec<String>,
    nodes: Vec<LocalNode>,
}

fn read_addr(data: &Path) -> Result<SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(a) = std::fs::read_to_string(data.join("addr"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return Ok(a);
        }
        if Instant::now() > deadline {
            return Err(HostsError::NoAddr {
                dir: data.to_path_buf(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl LocalRing {
    pub fn start(cfsd: &Path, dir: &Path, n: usize, args: &[String]) -> Result<LocalRing> {
        let mut ring = LocalRing {
            cfsd: cfsd.to_path_buf(),
            args: args.to_vec(),
            nodes: Vec::new(),
        };
        for i in 0..n {
            let data = dir.join(format!("n{i}"));
            ring.nodes.push(LocalNode {
                slowed: None,
                child: None,
                data,
                addr: "127.0.0.1:0".parse().expect("address"),
                paused: false,
            });
            ring.spawn(i)?;
        }
        Ok(ring)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let join = (0..self.nodes.len())
            .find(|&j| j != i && self.nodes[j].child.is_some())
            .map(|j| self.nodes[j].addr);
        let n = &self.nodes[i];
        std::fs::create_dir_all(&n.data).map_err(|source| HostsError::Spawn {
            cfsd: self.cfsd.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(n.data.join("addr"));
        let log = std::fs::File::create(n.data.with_extension("log")).ok();
        let mut cmd = Command::new(&self.cfsd);
        // The same port on restart: on loopback it is part of the node's id.
        cmd.arg("--listen")
            .arg(n.addr.to_string())
            .arg("--data")
            .arg(&n.data);
        if let Some(j) = join {
            cmd.arg("--join").arg(j.to_string());
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.map_or_else(Stdio::null, Stdio::from));
        let child = cmd.spawn().map_err(|source| HostsError::Spawn {
            cfsd: self.cfsd.clone(),
            source,
        })?;
        let data = n.data.clone();
        self.nodes[i].child = Some(child);
        self.nodes[i].paused = false;
        self.nodes[i].addr = read_addr(&data)?;
        Ok(())
    }

    fn node(&mut self, i: usize) -> Result<&mut LocalNode> {
        self.nodes.get_mut(i).ok_or(HostsError::NoNode(i))
    }

    fn signal(&mut self, i: usize, sig: i32) -> Result<()> {
        if let Some(c) = &self.node(i)?.child {
            // SAFETY: a signal to our own child.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
        Ok(())
    }
}

impl Hosts for LocalRing {
    fn len(&self) -> usize {
        self.nodes.len()
    }
    fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].addr
    }
    fn is_up(&self, i: usize) -> bool {
        self.nodes[i].child.is_some() && !self.nodes[i].paused
    }
    fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.node(i)?.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.nodes[i].paused = false;
        Ok(())
    }
    fn pause(&mut self, i: usize) -> Result<()> {
        self.signal(i, libc::SIGSTOP)?;
        self.nodes[i].paused = true;
        Ok(())
    }
    fn resume(&mut self, i: usize) -> Result<()> {
        self.signal(i, libc::SIGCONT)?;
        self.nodes[i].paused = false;
        Ok(())
    }
    fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i)?;
        self.spawn(i)
    }
    fn replace(&mut self, i: usize) -> Result<()> {
        self.kill(i)?;
        let _ = std::fs::remove_dir_all(&self.nodes[i].data);
        self.spawn(i)
    }
    fn partition(&mut self, _: &[Vec<usize>]) -> Result<()> {
        Err(HostsError::NeedsTestnet("a partition"))
    }
    fn heal(&mut self) -> Result<()> {
        Ok(())
    }
    fn cap(&mut self, _: usize, _: &str) -> Result<()> {
        Err(HostsError::NeedsTestnet("a link cap"))
    }
    fn uncap(&mut self, _: usize) -> Result<()> {
        Ok(())
    }
    fn fill(&mut self, _: usize) -> Result<()> {
        Err(HostsError::NeedsTestnet("a full disk"))
    }
    fn unfill(&mut self, _: usize) -> Result<()> {
        Ok(())
    }
    /// Stopped for 200 ms, running for 20 ms, over and over: its answers come, late.
    fn slow(&mut self, i: usize) -> Result<()> {
        self.unslow(i)?;
        let Some(pid) = self.node(i)?.child.as_ref().map(|c| c.id() as i32) else {
            return Ok(());
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let t = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: signals to our own child.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                std::thread::sleep(Duration::from_millis(200));
                unsafe { libc::kill(pid, libc::SIGCONT) };
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        self.nodes[i].slowed = Some((stop, t));
        Ok(())
    }
    fn unslow(&mut self, i: usize) -> Result<()> {
        if let Some((stop, t)) = self.node(i)?.slowed.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = t.join();
            self.signal(i, libc::SIGCONT)?;
        }
        Ok(())
    }
    fn spawn_client(
        &self,
        f: Box<dyn FnOnce() + Send + 'static>,
    ) -> std::thread::JoinHandle<std::io::Result<()>> {
        std::thread::spawn(move || {
            f();
            Ok(())
        })
    }
    fn shutdown(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.unslow(i);
            let _ = self.resume(i);
            let _ = self.kill(i);
        }
    }
}

impl Drop for LocalRing {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Hosts for Testnet {
    fn len(&self) -> usize {
        self.hosts.len()
    }
    fn addr(&self, i: usize) -> SocketAddr {
        Testnet::addr(self, i)
    }
    fn is_up(&self, i: usize) -> bool {
        self.hosts[i].pid.is_some() && !self.hosts[i].paused
    }
    fn kill(&mut self, i: usize) -> Result<()> {
        Ok(Testnet::kill(self, i)?)
    }
    fn pause(&mut self, i: usize) -> Result<()> {
        Ok(Testnet::pause(self, i)?)
    }
    fn resume(&mut self, i: usize) -> Result<()> {
        Ok(Testnet::resume(self, i)?)
    }
    fn restart(&mut self, i: usize) -> Result<()> {
        Ok(Testnet::restart(self, i)?)
    }
    fn replace(&mut self, i: usize) -> Result<()> {
        Ok(Testnet::replace(self, i)?)
    }
    fn partition(&mut self, groups: &[Vec<usize>]) -> Result<()> {
        Ok(Testnet::partition(self, groups)?)
    }
    fn heal(&mut self) -> Result<()> {
        Ok(Testnet::heal(self)?)
    }
    fn cap(&mut self, i: usize, rate: &str) -> Result<()> {
        Ok(Testnet::cap(self, i, rate)?)
    }
    fn uncap(&mut self, i: usize) -> Result<()> {
        Ok(Testnet::uncap(self, i)?)
    }
    fn fill(&mut self, i: usize) -> Result<()> {
        Ok(Testnet::fill(self, i)?)
    }
    fn unfill(&mut self, i: usize) -> Result<()> {
        Ok(Testnet::unfill(self, i)?)
    }
    /// A link of a few kbit/s: its answers trickle.
    fn slow(&mut self, i: usize) -> Result<()> {
        Ok(Testnet::cap(self, i, "32kbit")?)
    }
    fn unslow(&mut self, i: usize) -> Result<()> {
        Ok(Testnet::uncap(self, i)?)
    }
    fn spawn_client(
        &self,
        f: Box<dyn FnOnce() + Send + 'static>,
    ) -> std::thread::JoinHandle<std::io::Result<()>> {
        spawn_in_host(self, 0, f)
    }
    fn shutdown(&mut self) {
        // The testnet's owner takes it down (`cfs testnet down`).
        let _ = Testnet::heal(self);
        for i in 0..self.hosts.len() {
            if self.hosts[i].paused {
                let _ = Testnet::resume(self, i);
            }
            if self.hosts[i].pid.is_none() {
                let _ = Testnet::start(self, i);
            }
            if self.hosts[i].rate.is_some() {
                let _ = Testnet::uncap(self, i);
            }
            let _ = Testnet::unfill(self, i);
        }
    }
}
