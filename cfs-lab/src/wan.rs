//! Wide-area links for the testnet, emulated in user space: this kernel has no netem, fq
//! or etf qdisc, so packets wait in a process instead. Each host gets a TUN device
//! (`wan0`) instead of a veth on the bridge; every packet a host sends arrives here, waits
//! for its link (serialisation at the sender's and the receiver's rate, one-way delay
//! from the round-trip model, jitter, loss) and is written to the receiving host's TUN.
//!
//! What keeps this cheap on two cores is what user-space VPNs do: the TUN devices are
//! opened with `IFF_VNET_HDR` and offloads (checksum, TSO), so TCP hands over
//! super-segments of up to 64 KiB (one read and one write each) while the hosts' MTU and
//! MSS stay 1,500: windows and slow start behave as on the internet, with ~40x fewer
//! items to move. A directed link never reorders: a packet leaves after the one before it.
//!
//! The emulator is a process of its own (`cfs testnet emulate DIR`), started by
//! `testnet up`; it reads `DIR/wan.json`, writes `DIR/wan.ready` once every TUN is open,
//! rereads the file when it changes (link caps), and its devices vanish with it.

use crate::testnet::TestnetError;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The emulator's file in the testnet directory, and the one it writes when ready.
pub const CONFIG: &str = "wan.json";
pub const READY: &str = "wan.ready";
/// The TUN device in each host.
pub const DEVICE: &str = "wan0";

/// How host pairs' round trips are chosen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RttModel {
    /// The same round trip between every pair.
    Fixed(Duration),
    /// Hosts placed in a square as cfs-sim places nodes (from the seed): a pair's round
    /// trip grows with its distance, from `min` to `max`.
    Range { min: Duration, max: Duration },
    /// Round trips in milliseconds, host by host (row i, column j: from host i+1 to j+1).
    Matrix(Vec<Vec<f64>>),
}

impl RttModel {
    /// `60ms`, `20ms-200ms`, or the path of a CSV file of round trips in milliseconds.
    pub fn parse(s: &str) -> Result<RttModel, TestnetError> {
        let bad = |why: String| TestnetError::Param(format!("--rtt {s}: {why}"));
        if let Some((a, b)) = s.split_once('-') {
            let (min, max) = (parse_ms(a).map_err(bad)?, parse_ms(b).map_err(bad)?);
            if min > max {
                return Err(bad("the first round trip must not exceed the second".into()));
            }
            return Ok(RttModel::Range { min, max });
        }
        if let Ok(d) = parse_ms(s) {
            return Ok(RttModel::Fixed(d));
        }
        let text = std::fs::read_to_string(s).map_err(|e| {
            bad(format!(
                "neither a duration (60ms, 20ms-200ms) nor a CSV file: {e}"
            ))
        })?;
        let rows: Result<Vec<Vec<f64>>, String> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .map(|l| {
                l.split(',')
                    .map(|c| {
                        c.trim()
                            .parse::<f64>()
                            .map_err(|e| format!("{c:?}: {e}"))
                            .and_then(|v| {
                                (v.is_finite() && v >= 0.0)
                                    .then_some(v)
                                    .ok_or_else(|| format!("{v} is not a round trip"))
                            })
                    })
                    .collect()
            })
            .collect();
        let rows = rows.map_err(bad)?;
        if rows.iter().any(|r| r.len() != rows.len()) {
            return Err(bad(
                "the matrix must be square, a row and a column per host".into(),
            ));
        }
        Ok(RttModel::Matrix(rows))
    }

    /// Round trips between `hosts` hosts, in milliseconds.
    pub fn matrix(&self, hosts: usize, seed: u64) -> Result<Vec<Vec<f64>>, TestnetError> {
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        Ok(match self {
            RttModel::Fixed(d) => (0..hosts)
                .map(|i| {
                    (0..hosts)
                        .map(|j| if i == j { 0.0 } else { ms(d) })
                        .collect()
                })
                .collect(),
            RttModel::Range { min, max } => {
                let pos: Vec<(f64, f64)> = (0..hosts)
                    .map(|i| cfs_core::geo::position(seed, i as u64))
                    .collect();
                (0..hosts)
                    .map(|i| {
                        (0..hosts)
                            .map(|j| {
                                if i == j {
                                    0.0
                                } else {
                                    2.0 * ms(&cfs_core::geo::one_way(*min, *max, pos[i], pos[j]))
                                }
                            })
                            .collect()
                    })
                    .collect()
            }
            RttModel::Matrix(m) => {
                if m.len() != hosts {
                    return Err(TestnetError::Param(format!(
                        "the round-trip matrix has {} rows for {hosts} hosts",
                        m.len()
                    )));
                }
                m.clone()
            }
        })
    }
}

/// `5ms`, `0.2s`, `250us`.
pub fn parse_duration(s: &str) -> Result<Duration, TestnetError> {
    parse_ms(s).map_err(TestnetError::Param)
}

fn parse_ms(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(format!("{s:?} needs a unit (ms, s)"));
    };
    let v: f64 = num.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(0.0..=60.0).contains(&(v * scale)) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// A rate such as `50mbit`, `2mbit`, `800kbit` or `1gbit`, in bits per second.
pub fn parse_rate(s: &str) -> Result<u64, TestnetError> {
    let bad = || TestnetError::Param(format!("rate {s:?}: use e.g. 50mbit, 800kbit, 1gbit"));
    let t = s.trim().to_ascii_lowercase();
    let (num, mul) = if let Some(n) = t.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = t.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = t.strip_suffix("kbit") {
        (n, 1e3)
    } else if let Some(n) = t.strip_suffix("bit") {
        (n, 1.0)
    } else {
        return Err(bad());
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bps = v * mul;
    (bps >= 1000.0 && bps <= 1e12)
        .then_some(bps as u64)
        .ok_or_else(bad)
}

/// What the emulator runs: one entry per host, and the link model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WanConfig {
    pub hosts: Vec<WanHost>,
    /// Round trips in milliseconds between hosts (row: from, column: to).
    pub rtt_ms: Vec<Vec<f64>>,
    /// Up to this much more one-way delay per packet, at random (order is kept).
    pub jitter_ms: f64,
    /// Probability that a packet (each 1,500-byte segment of a super-segment) is lost.
    pub loss: f64,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WanHost {
    /// `/run/netns/NAME`: where its TUN device is made.
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
    /// The host's link rate, both ways, in bits per second (None: not limited).
    pub rate_bps: Option<u64>,
}

impl WanConfig {
    pub fn load(dir: &Path) -> Result<WanConfig, TestnetError> {
        let path = dir.join(CONFIG);
        let text = std::fs::read(&path).map_err(|source| TestnetError::Io {
            what: "reading",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|e| TestnetError::State {
            path,
            msg: e.to_string(),
        })
    }

    pub fn save(&self, dir: &Path) -> Result<(), TestnetError> {
        let path = dir.join(CONFIG);
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec_pretty(self).expect("serializable");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| TestnetError::Io {
                what: "writing",
                path,
                source,
            })
    }
}

// From linux/if_tun.h.
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
/// struct virtio_net_hdr, before every packet on a device with IFF_VNET_HDR.
const VNET_HDR: usize = 10;
/// The largest item: a 64 KiB super-segment and its header.
const MAX_ITEM: usize = 65_536 + VNET_HDR;

/// Open a TUN device named `DEVICE` in the calling thread's namespace, with checksum
/// offload and, if `tso`, TCP super-segments.
fn open_tun(tso: bool) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // struct ifreq: a 16-byte name, then the flags (a short) in the union.
    let mut req = [0u8; 40];
    req[..DEVICE.len()].copy_from_slice(DEVICE.as_bytes());
    let flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is large enough for.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, req.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let offload = if tso {
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    } else {
        TUN_F_CSUM
    };
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETOFFLOAD as _, offload as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// Open the TUN device inside the namespace at `netns`, on a thread of its own (the
/// device stays in that namespace; its file works from any thread).
fn open_tun_in(netns: &Path, tso: bool) -> std::io::Result<File> {
    let ns = File::open(netns)?;
    std::thread::spawn(move || {
        // SAFETY: setns on a thread of our own moves only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        open_tun(tso)
    })
    .join()
    .map_err(|_| std::io::Error::other("opening a TUN device panicked"))?
}

/// A packet on its way.
struct Item {
    due: Instant,
    seq: u64,
    to: usize,
    bytes: Vec<u8>,
    /// Still to pass the receiver's capped downlink, from `due` (its arrival) on; its
    /// bits on the wire.
    downlink: Option<u64>,
}

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    /// Earliest first (BinaryHeap is a max-heap).
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// The links' state: when each host's uplink and downlink are next free, when the last
/// packet of each directed link arrives, the model, and the packets in flight.
pub struct Links {
    cfg: WanConfig,
    up_free: Vec<Instant>,
    down_free: Vec<Instant>,
    last: Vec<Vec<Instant>>,
    rng: rand::rngs::SmallRng,
    seq: u64,
    queue: BinaryHeap<Item>,
    /// Packets dropped: lost by the model, or over a full link's buffer.
    pub lost: u64,
    pub dropped: u64,
}

/// A link holds at most this much time of queued packets (a router's buffer); more
/// are dropped, so TCP sees congestion instead of an ever longer queue.
const BUFFER: Duration = Duration::from_millis(100);

impl Links {
    pub fn new(cfg: WanConfig, now: Instant) -> Links {
        let n = cfg.hosts.len();
        Links {
            rng: rand::rngs::SmallRng::seed_from_u64(cfg.seed),
            cfg,
            up_free: vec![now; n],
            down_free: vec![now; n],
            last: vec![vec![now; n]; n],
            seq: 0,
            queue: BinaryHeap::new(),
            lost: 0,
            dropped: 0,
        }
    }

    /// The host an IPv4 destination belongs to.
    fn host_of(&self, dst: Ipv4Addr) -> Option<usize> {
        self.cfg.hosts.iter().position(|h| h.ip == dst)
    }

    /// Bits a packet occupies on the wire: each 1,500-byte segment of a super-segment
    /// with its own headers.
    fn wire_bits(packet: &[u8]) -> (u64, u64) {
        let gso_size = u16::from_le_bytes([packet[4], packet[5]]) as u64;
        let ip = &packet[VNET_HDR..];
        let ip_len = ip.len() as u64;
        // The headers each segment repeats: IPv4's (IHL) and TCP's (data offset). The
        // vnet header's hdr_len is only a hint from the kernel.
        let ihl = (ip[0] & 0x0f) as u64 * 4;
        let tcp = ip.get(9) == Some(&6) && ip.len() as u64 > ihl + 12;
        let hdr_len = if tcp {
            ihl + (ip[ihl as usize + 12] >> 4) as u64 * 4
        } else {
            ihl
        };
        let segs = if packet[1] != 0 && gso_size > 0 && ip_len > hdr_len {
            (ip_len - hdr_len).div_ceil(gso_size).max(1)
        } else {
            1
        };
        // Ethernet framing and preamble per segment (38 bytes), headers repeated.
        let bytes = ip_len + (segs - 1) * hdr_len + segs * 38;
        (bytes * 8, segs)
    }

    /// Schedule a packet from host `from` (as read from its TUN, with its vnet header);
    /// false if it is lost or dropped.
    pub fn send(&mut self, from: usize, packet: Vec<u8>, now: Instant) -> bool {
        if packet.len() < VNET_HDR + 20 || packet[VNET_HDR] >> 4 != 4 {
            return false;
        }
        let ip = &packet[VNET_HDR..];
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let Some(to) = self.host_of(dst) else {
            return false;
        };
        let (bits, segs) = Self::wire_bits(&packet);
        let loss = self.cfg.loss;
        if loss > 0.0 && self.rng.random::<f64>() >= (1.0 - loss).powi(segs as i32) {
            self.lost += 1;
            return false;
        }
        let ser = |rate: Option<u64>| {
            rate.map_or(Duration::ZERO, |r| {
                Duration::from_secs_f64(bits as f64 / r as f64)
            })
        };
        // The sender's uplink: queued behind what it already sends, or dropped when its
        // buffer is full.
        let start = self.up_free[from].max(now);
        if start.duration_since(now) > BUFFER && self.cfg.hosts[from].rate_bps.is_some() {
            self.dropped += 1;
            return false;
        }
        let sent = start + ser(self.cfg.hosts[from].rate_bps);
        self.up_free[from] = sent;
        let rtt = self.cfg.rtt_ms[from][to];
        let jitter = if self.cfg.jitter_ms > 0.0 {
            self.rng.random::<f64>() * self.cfg.jitter_ms
        } else {
            0.0
        };
        let one_way = Duration::from_secs_f64((rtt / 2.0 + jitter) / 1e3);
        // A directed link keeps its order, jitter or not.
        let arrives = (sent + one_way).max(self.last[from][to]);
        self.last[from][to] = arrives;
        // A capped receiver's downlink takes packets in the order they arrive (`next`),
        // not the order they were sent: one from a far host must not hold up one from a
        // near host that arrives first.
        let downlink = self.cfg.hosts[to].rate_bps.map(|_| bits);
        self.push(arrives, to, packet, downlink);
        true
    }

    fn push(&mut self, due: Instant, to: usize, bytes: Vec<u8>, downlink: Option<u64>) {
        self.seq += 1;
        self.queue.push(Item {
            due,
            seq: self.seq,
            to,
            bytes,
            downlink,
        });
    }

    /// The next packet due at or before `now`, or how long until the next one. Packets
    /// that arrive at a capped downlink queue there (or are dropped over its buffer).
    fn next(&mut self, now: Instant) -> Result<Item, Option<Duration>> {
        loop {
            match self.queue.peek() {
                None => return Err(None),
                Some(i) if i.due > now => return Err(Some(i.due - now)),
                Some(_) => {}
            }
            let item = self.queue.pop().expect("peeked");
            let Some(bits) = item.downlink else {
                return Ok(item);
            };
            let arrived = item.due;
            let start = self.down_free[item.to].max(arrived);
            if start.duration_since(arrived) > BUFFER {
                self.dropped += 1;
                continue;
            }
            let rate = self.cfg.hosts[item.to].rate_bps;
            let ser = rate.map_or(Duration::ZERO, |r| {
                Duration::from_secs_f64(bits as f64 / r as f64)
            });
            self.down_free[item.to] = start + ser;
            self.push(start + ser, item.to, item.bytes, None);
        }
    }

    /// New rates and model from a reloaded config (hosts stay as they are).
    fn reconfigure(&mut self, cfg: WanConfig) {
        if cfg.hosts.len() == self.cfg.hosts.len() {
            self.cfg = cfg;
        }
    }
}

/// Run the emulator for the testnet in `dir` until killed.
pub fn run(dir: &Path) -> Result<(), TestnetError> {
    let cfg = WanConfig::load(dir)?;
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| TestnetError::Io { what, path, source }
    };
    // With loss, packets stay 1,500 bytes, so that each is lost alone (a lost
    // super-segment would be a burst of up to 44 segments).
    let tso = cfg.loss == 0.0;
    let mut tuns = Vec::new();
    for h in &cfg.hosts {
        tuns.push(Arc::new(
            open_tun_in(&h.netns, tso).map_err(io("opening a TUN device in", &h.netns))?,
        ));
    }
    let shared = Arc::new((Mutex::new(Links::new(cfg, Instant::now())), Condvar::new()));
    let open = Arc::new(AtomicUsize::new(tuns.len()));
    for (i, tun) in tuns.iter().enumerate() {
        let (tun, shared, open) = (tun.clone(), shared.clone(), open.clone());
        std::thread::Builder::new()
            .name(format!("wan-rx{i}"))
            .spawn(move || {
                let mut buf = vec![0u8; MAX_ITEM];
                loop {
                    let n = match (&*tun).read(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e)
                            if matches!(
                                e.raw_os_error(),
                                Some(libc::EBADFD | libc::ENODEV | libc::EIO | libc::ENXIO)
                            ) =>
                        {
                            // The device is gone with its host's namespace: the testnet
                            // is down, and the emulator ends with its last link.
                            if open.fetch_sub(1, Ordering::SeqCst) == 1 {
                                std::process::exit(0);
                            }
                            return;
                        }
                        Err(e) => {
                            eprintln!("wan: reading host {}'s link: {e}", i + 1);
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    let (links, wake) = &*shared;
                    if links
                        .lock()
                        .unwrap()
                        .send(i, buf[..n].to_vec(), Instant::now())
                    {
                        // It may be due before the packet the writer waits for.
                        wake.notify_one();
                    }
                }
            })
            .map_err(io("starting a thread for", dir))?;
    }
    // The config is read again when it changes: `testnet cap` rewrites it.
    {
        let (shared, path) = (shared.clone(), dir.join(CONFIG));
        std::thread::spawn(move || {
            let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut seen: Option<SystemTime> = mtime(&path);
            loop {
                std::thread::sleep(Duration::from_millis(100));
                let now = mtime(&path);
                if now != seen {
                    seen = now;
                    if let Ok(cfg) = WanConfig::load(path.parent().expect("in a directory")) {
                        shared.0.lock().unwrap().reconfigure(cfg);
                    }
                }
            }
        });
    }
    std::fs::write(dir.join(READY), format!("{}\n", std::process::id()))
        .map_err(io("writing", &dir.join(READY)))?;
    let (links, wake) = &*shared;
    let mut l = links.lock().unwrap();
    loop {
        match l.next(Instant::now()) {
            Ok(item) => {
                drop(l);
                // A full receiver (its socket buffers) drops the packet, as a NIC would.
                let _ = (&*tuns[item.to]).write(&item.bytes);
                l = links.lock().unwrap();
            }
            Err(None) => l = wake.wait(l).unwrap(),
            Err(Some(wait)) => l = wake.wait_timeout(l, wait).unwrap().0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rtt: f64, rate: Option<u64>) -> WanConfig {
        WanConfig {
            hosts: (1..=3)
                .map(|k| WanHost {
                    netns: PathBuf::new(),
                    ip: Ipv4Addr::new(198, 18, 0, k),
                    rate_bps: rate,
                })
                .collect(),
            rtt_ms: RttModel::Fixed(Duration::from_secs_f64(rtt / 1e3))
                .matrix(3, 1)
                .unwrap(),
            jitter_ms: 0.0,
            loss: 0.0,
            seed: 1,
        }
    }

    /// An IPv4 packet of `len` bytes to 198.18.0.`to`, behind a vnet header.
    fn packet(to: u8, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; VNET_HDR + len];
        p[VNET_HDR] = 0x45;
        p[VNET_HDR + 16..VNET_HDR + 20].copy_from_slice(&[198, 18, 0, to]);
        p
    }

    #[test]
    fn a_packet_arrives_half_a_round_trip_later_and_a_link_serialises() {
        let t0 = Instant::now();
        let mut l = Links::new(cfg(80.0, None), t0);
        assert!(l.send(0, packet(2, 1000), t0));
        assert!(
            l.send(0, packet(9, 1000), t0) == false,
            "not a host: dropped"
        );
        let Err(Some(wait)) = l.next(t0) else {
            panic!()
        };
        assert_eq!(wait, Duration::from_millis(40));
        let item = l.next(t0 + Duration::from_millis(40)).ok().unwrap();
        assert_eq!(item.to, 1);
        // At 8 Mbit/s, 1,000-byte packets (1,038 on the wire) take ~1.04 ms each to send,
        // and the last one ~1.04 ms more to arrive over the receiver's link.
        let t0 = Instant::now();
        let mut l = Links::new(cfg(0.0, Some(8_000_000)), t0);
        for _ in 0..10 {
            assert!(l.send(0, packet(2, 1000), t0));
        }
        let mut last = t0;
        while let Ok(i) = l.next(t0 + Duration::from_secs(1)) {
            last = i.due;
        }
        let took = last - t0;
        assert!(
            took > Duration::from_micros(11_300) && took < Duration::from_micros(11_500),
            "{took:?}"
        );
    }

    #[test]
    fn a_packet_from_a_near_host_is_not_held_behind_one_from_a_far_host() {
        // Host 1 is 200 ms from host 3, host 2 20 ms; 1 sends first, 2 just after.
        for rate in [None, Some(100_000_000)] {
            let mut c = cfg(0.0, rate);
            c.rtt_ms[0][2] = 200.0;
            c.rtt_ms[1][2] = 20.0;
            let t0 = Instant::now();
            let mut l = Links::new(c, t0);
            assert!(l.send(0, packet(3, 1000), t0));
            assert!(l.send(1, packet(3, 1000), t0 + Duration::from_millis(1)));
            let mut got = Vec::new();
            let mut now = t0;
            while got.len() < 2 {
                match l.next(now) {
                    Ok(i) => got.push(i.due - t0),
                    Err(Some(w)) => now += w,
                    Err(None) => panic!("lost"),
                }
            }
            assert!(got[0] < Duration::from_millis(12), "{rate:?}: {got:?}");
            assert!(got[1] >= Duration::from_millis(100), "{rate:?}: {got:?}");
        }
    }

    #[test]
    fn a_full_buffer_drops_and_loss_follows_its_setting() {
        let t0 = Instant::now();
        let mut l = Links::new(cfg(10.0, Some(1_000_000)), t0);
        // 100 ms of buffer at 1 Mbit/s is ~12 KB: 64 KB at once overflows it.
        let sent = (0..64).filter(|_| l.send(0, packet(2, 1000), t0)).count();
        assert!(sent > 10 && sent < 16, "{sent}");
        assert_eq!(l.dropped as usize, 64 - sent);
        let mut c = cfg(10.0, None);
        c.loss = 0.1;
        let mut l = Links::new(c, t0);
        let n = 20_000;
        let through = (0..n).filter(|_| l.send(0, packet(2, 100), t0)).count();
        let measured = 1.0 - through as f64 / n as f64;
        assert!((measured - 0.1).abs() < 0.01, "{measured}");
    }

    #[test]
    fn models_parse() {
        assert_eq!(
            RttModel::parse("60ms").unwrap(),
            RttModel::Fixed(Duration::from_millis(60))
        );
        let r = RttModel::parse("20ms-200ms").unwrap();
        let m = r.matrix(12, 7).unwrap();
        for (i, row) in m.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert_eq!(*v, m[j][i], "symmetric");
                assert!(i == j || (20.0..=200.0).contains(v), "{v}");
            }
        }
        assert!(RttModel::parse("200ms-20ms").is_err());
        assert!(RttModel::parse("fast").is_err());
        assert_eq!(parse_rate("50mbit").unwrap(), 50_000_000);
        assert!(parse_rate("50").is_err());
    }
}
