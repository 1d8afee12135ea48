//! 160-bit identifiers, ring intervals and node ids bound to addresses.

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// Virtual nodes per process are capped so that one address cannot claim many positions.
pub const MAX_VNODES: u16 = 16;

/// A point on the 160-bit Chord ring, big-endian.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Id(pub [u8; 20]);

impl Id {
    pub const ZERO: Id = Id([0; 20]);

    /// SHA-1 of `bytes`: the key of a content-hash block. Fast path for readers; the store
    /// uses [`crate::block::checked_sha1`] which also detects collision attacks.
    pub fn hash(bytes: &[u8]) -> Id {
        Id(Sha1::digest(bytes).into())
    }

    /// SHA-1 over several parts, each prefixed by its length so that parts cannot shift.
    pub fn hash_parts(parts: &[&[u8]]) -> Id {
        let mut h = Sha1::new();
        for p in parts {
            h.update((p.len() as u32).to_be_bytes());
            h.update(p);
        }
        Id(h.finalize().into())
    }

    /// x in the open interval (a, b) going clockwise; (a, a) is the whole ring but a.
    pub fn in_open(self, a: Id, b: Id) -> bool {
        match a.cmp(&b) {
            std::cmp::Ordering::Less => a < self && self < b,
            std::cmp::Ordering::Greater => self > a || self < b,
            std::cmp::Ordering::Equal => self != a,
        }
    }

    /// x in (a, b]; (a, a] is the whole ring.
    pub fn in_half_open(self, a: Id, b: Id) -> bool {
        self == b || self.in_open(a, b)
    }

    /// self + 2^i mod 2^160.
    pub fn add_pow2(self, i: u32) -> Id {
        debug_assert!(i < 160);
        let mut out = self.0;
        let byte = 19 - (i / 8) as usize;
        let mut carry = 1u16 << (i % 8);
        for j in (0..=byte).rev() {
            let s = out[j] as u16 + carry;
            out[j] = s as u8;
            carry = s >> 8;
            if carry == 0 {
                break;
            }
        }
        Id(out)
    }

    /// Clockwise distance from self to other, as a float fraction of the ring (0..1).
    /// Precise enough for hop estimates and load statistics.
    pub fn distance_frac(self, other: Id) -> f64 {
        let d = sub(other.0, self.0);
        let mut v = 0f64;
        for b in d.iter().take(8) {
            v = v * 256.0 + *b as f64;
        }
        v / 2f64.powi(64)
    }

    pub fn to_hex(self) -> String {
        let mut s = String::with_capacity(40);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The first 8 bytes as an integer: for seeding and short display.
    pub fn prefix_u64(self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().unwrap())
    }
}

fn sub(a: [u8; 20], b: [u8; 20]) -> [u8; 20] {
    let mut out = [0u8; 20];
    let mut borrow = 0i16;
    for i in (0..20).rev() {
        let mut v = a[i] as i16 - b[i] as i16 - borrow;
        borrow = 0;
        if v < 0 {
            v += 256;
            borrow = 1;
        }
        out[i] = v as u8;
    }
    out
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..10])
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a key: expected 40 hexadecimal digits")]
pub struct ParseIdError;

impl FromStr for Id {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Id, ParseIdError> {
        let s = s.trim();
        if s.len() != 40 || !s.is_ascii() {
            return Err(ParseIdError);
        }
        let mut out = [0u8; 20];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| ParseIdError)?;
        }
        Ok(Id(out))
    }
}

/// Node id = SHA-1(tag, ip, [port on loopback], vnode). Bound to the address so that a
/// machine cannot choose where it sits; the port counts only on loopback, where a local
/// ring of many processes shares one IP.
pub fn node_id(addr: SocketAddr, vnode: u16) -> Id {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => v6.octets().to_vec(),
        },
    };
    let port = if addr.ip().is_loopback() {
        addr.port().to_be_bytes().to_vec()
    } else {
        Vec::new()
    };
    Id::hash_parts(&[b"cfs-node-id-v1", &ip, &port, &vnode.to_be_bytes()])
}

/// A ring member as it travels on the wire: address and vnode index only. The id is
/// always recomputed from them, so a peer can never claim an id it does not own.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "WireRef", into = "WireRef")]
pub struct NodeRef {
    pub addr: SocketAddr,
    pub vnode: u16,
    pub id: Id,
}

#[derive(Serialize, Deserialize)]
struct WireRef {
    addr: SocketAddr,
    vnode: u16,
}

impl From<WireRef> for NodeRef {
    fn from(w: WireRef) -> NodeRef {
        NodeRef::new(w.addr, w.vnode)
    }
}
impl From<NodeRef> for WireRef {
    fn from(n: NodeRef) -> WireRef {
        WireRef {
            addr: n.addr,
            vnode: n.vnode,
        }
    }
}

impl NodeRef {
    pub fn new(addr: SocketAddr, vnode: u16) -> NodeRef {
        NodeRef {
            addr,
            vnode,
            id: node_id(addr, vnode),
        }
    }
    /// A reference is acceptable only with a vnode index under the cap.
    pub fn valid(&self, max_vnodes: u16) -> bool {
        self.vnode < max_vnodes && !self.addr.ip().is_unspecified() && self.addr.port() != 0
    }
}

impl fmt::Debug for NodeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}@{}#{}", self.id, self.addr, self.vnode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> Id {
        let mut a = [0u8; 20];
        a[0] = b;
        Id(a)
    }

    #[test]
    fn intervals_wrap() {
        assert!(id(5).in_open(id(1), id(10)));
        assert!(!id(10).in_open(id(1), id(10)));
        assert!(id(10).in_half_open(id(1), id(10)));
        assert!(id(250).in_open(id(200), id(10)));
        assert!(id(3).in_open(id(200), id(10)));
        assert!(!id(100).in_open(id(200), id(10)));
        // (a, a) is everything but a; (a, a] everything.
        assert!(id(7).in_open(id(3), id(3)));
        assert!(!id(3).in_open(id(3), id(3)));
        assert!(id(3).in_half_open(id(3), id(3)));
    }

    #[test]
    fn pow2_and_hex() {
        assert_eq!(Id::ZERO.add_pow2(0).0[19], 1);
        assert_eq!(Id::ZERO.add_pow2(159).0[0], 0x80);
        let max = Id([0xff; 20]);
        assert_eq!(max.add_pow2(0), Id::ZERO);
        let x = Id::hash(b"abc");
        assert_eq!(x.to_hex(), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(x.to_hex().parse::<Id>().unwrap(), x);
        assert!("xyz".parse::<Id>().is_err());
    }

    #[test]
    fn node_ids_bind_port_only_on_loopback() {
        let a = node_id("127.0.0.1:1000".parse().unwrap(), 0);
        let b = node_id("127.0.0.1:1001".parse().unwrap(), 0);
        assert_ne!(a, b);
        let c = node_id("10.0.0.1:1000".parse().unwrap(), 0);
        let d = node_id("10.0.0.1:1001".parse().unwrap(), 0);
        assert_eq!(c, d);
        assert_ne!(c, node_id("10.0.0.1:1000".parse().unwrap(), 1));
    }

    #[test]
    fn distance_fraction() {
        assert!((Id::ZERO.distance_frac(id(128)) - 0.5).abs() < 1e-9);
        assert!((id(128).distance_frac(Id::ZERO) - 0.5).abs() < 1e-9);
    }
}
