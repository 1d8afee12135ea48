//! The wire protocol: postcard messages in length-prefixed frames. Every frame carries the
//! protocol version; every field that grows is bounded by the frame limit.

use crate::block::{BlockKind, MAX_BLOCK_BYTES};
use crate::id::{Id, NodeRef};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

/// 2: `Step::Done` names its range's start as an address-bound node, not a bare id, and
/// `Step::Closer` carries no RTT hints. 3: leases: puts ask for one, blocks carry theirs,
/// `Has` answers how long each block is leased, and `Renew` extends leases by key.
/// 4: `GetMany` fetches many small blocks in one exchange. 5: a block in a batch names
/// the source whose storage a ring transfer of it is charged to (`WireBlock::source`).
/// 6: a connection carries many requests at once: a client may send requests before the
/// replies to earlier ones arrive, and a node answers each as it is ready, so replies
/// come in any order and are matched by `id` (frames are unchanged).
pub const PROTOCOL_VERSION: u16 = 6;
/// Hard limit on one frame: a largest block plus room for the envelope.
pub const MAX_FRAME_BYTES: usize = MAX_BLOCK_BYTES + 64 * 1024;
/// Most items in one batched request (Has), so that replies stay under the frame limit.
pub const MAX_BATCH: usize = 4096;
/// The lease a client asks for when not told otherwise (Tahoe-LAFS's default, 31 days,
/// rounded down): a publisher renews with `cfs keep` or by publishing again.
pub const DEFAULT_LEASE_SECS: u64 = 30 * 86_400;
/// Most node references in one reply.
pub const MAX_REFS: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestFrame {
    pub protocol: u16,
    /// Caller's id for this request; echoed in the response so a connection can carry
    /// several requests at once.
    pub id: u64,
    /// The caller's own listen address if it is a ring member, so the callee can learn it.
    pub from: Option<SocketAddr>,
    pub req: Request,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub id: u64,
    pub resp: Result<Response, RemoteError>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Request {
    /// Liveness and the number of vnodes at this address.
    Ping,
    /// One step of an iterative lookup at `vnode`: either the successors of `key` or
    /// nodes closer to it. With `want`, a node holding that block (stored or cached)
    /// returns it instead, which is how path caching pays off.
    FindStep {
        vnode: u16,
        key: Id,
        want: Option<BlockKind>,
    },
    /// Predecessor and successor list of `vnode` (stabilize, join).
    Neighbors {
        vnode: u16,
    },
    /// "I might be your predecessor" (Zave's rectify, replacing notify).
    Rectify {
        vnode: u16,
        candidate: NodeRef,
    },
    /// Store a block in the permanent store, leased for at least `lease` seconds from now
    /// (capped by the node's maximum; never shortening a longer lease held). `transfer`
    /// marks ring-internal replication, whose `lease` is the sender's remaining one.
    Put {
        kind: BlockKind,
        key: Id,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        transfer: bool,
        lease: u64,
    },
    /// Store several blocks in one request and one commit (small files at publish).
    /// Each block gets its own answer.
    PutMany {
        blocks: Vec<WireBlock>,
        transfer: bool,
    },
    /// Fetch a block from the permanent store or the cache.
    Get {
        kind: BlockKind,
        key: Id,
    },
    /// Which of these does the permanent store hold, at what version, leased how long.
    Has {
        items: Vec<(BlockKind, Id)>,
    },
    /// Extend the leases of held blocks to at least `lease` seconds from now (capped by
    /// the node's maximum): no bytes sent. `transfer` as for puts.
    Renew {
        items: Vec<(BlockKind, Id)>,
        lease: u64,
        transfer: bool,
    },
    /// A block offered for the path cache after a lookup this node routed.
    Cache {
        kind: BlockKind,
        key: Id,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    Status,
    /// Fetch several blocks (a listing's inodes, small files) in one exchange: one round
    /// trip and one frame instead of one per block. At most [`MAX_BATCH`] items.
    GetMany {
        items: Vec<(BlockKind, Id)>,
    },
}

impl Request {
    /// The request's kind, for logs and counters.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Ping => "Ping",
            Request::FindStep { .. } => "FindStep",
            Request::Neighbors { .. } => "Neighbors",
            Request::Rectify { .. } => "Rectify",
            Request::Put { .. } => "Put",
            Request::PutMany { .. } => "PutMany",
            Request::Get { .. } => "Get",
            Request::Has { .. } => "Has",
            Request::Renew { .. } => "Renew",
            Request::Cache { .. } => "Cache",
            Request::Status => "Status",
            Request::GetMany { .. } => "GetMany",
        }
    }
}

/// A block as carried in a batch, with the lease asked for it in seconds (a transfer's
/// is the sender's remaining lease).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireBlock {
    pub kind: BlockKind,
    pub key: Id,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    pub lease: u64,
    /// In a transfer (replica maintenance): the source address whose storage paid for
    /// the sender's copy, so the copy it creates here is charged to the same source, not
    /// to the sender. A receiver takes it only from a checked neighbour, for a key it
    /// replicates; otherwise it charges the sender. None in a client's put.
    pub source: Option<IpAddr>,
}

/// A held block as `Has` reports it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holding {
    /// The held version (0 for content blocks).
    pub version: u64,
    /// Seconds until its lease ends.
    pub lease: u64,
    /// For a root, the hash of its bytes: two roots of one version (a fork) differ here,
    /// and `block::root_rank` says which one replicas converge on.
    pub digest: Option<Id>,
}

impl Holding {
    /// Whether this held copy is at least as good as a root of `version` whose bytes hash
    /// to `digest` (None for content blocks, where the version is all there is).
    pub fn covers(&self, version: u64, digest: Option<Id>) -> bool {
        match (self.digest, digest) {
            (Some(theirs), Some(ours)) => {
                crate::block::root_rank(self.version, theirs)
                    >= crate::block::root_rank(version, ours)
            }
            _ => self.version >= version,
        }
    }
}

/// Where a lookup step went.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Step {
    /// Every key in (from.id, succs[0].id] has these successors (replicas first). `from`
    /// is the node before the range (the answerer's predecessor, or the answerer itself):
    /// a node, not a bare id, so the range's start is bound to an address that can be
    /// checked, never an arbitrary point such as `key - 1`.
    Done { from: NodeRef, succs: Vec<NodeRef> },
    /// Closer nodes, closest to the key first, and this node's estimate of the ring's
    /// size: a hint that a caller with an estimate of its own ignores.
    Closer { nodes: Vec<NodeRef>, n_est: u32 },
    /// The wanted block (unverified: the caller checks it).
    Found(#[serde(with = "serde_bytes")] Vec<u8>),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Response {
    Pong {
        vnodes: u16,
    },
    Step(Step),
    Neighbors {
        pred: Option<NodeRef>,
        succs: Vec<NodeRef>,
    },
    Ok,
    Stored {
        fresh: bool,
    },
    /// One answer per block of a PutMany: whether it was new to this node.
    StoredMany(Vec<Result<bool, RemoteError>>),
    Block(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// One entry per item asked: None if absent (or expired).
    Have(Vec<Option<Holding>>),
    Status(Box<StatusInfo>),
    /// One answer per item of a Renew: None if not held, else the lease's seconds left
    /// after the renewal; and the node's longest lease, so a caller asking for more
    /// knows a capped answer is all it gets. (New variants go last:
    /// `block_response_header` knows `Block`'s index.)
    Renewed {
        max_lease: u64,
        answers: Vec<Result<Option<u64>, RemoteError>>,
    },
    /// The answer to a GetMany, in the order asked: None for an absent (or expired)
    /// block. It may stop before the last item so that it fits [`GET_MANY_BYTES`]; the
    /// caller asks again for the rest. Each block is unverified: the caller checks it.
    Blocks(Vec<Option<serde_bytes::ByteBuf>>),
}

/// Most block bytes in one `Blocks` answer: with the envelope (at most a few bytes per
/// item) it stays under [`MAX_FRAME_BYTES`].
pub const GET_MANY_BYTES: usize = MAX_BLOCK_BYTES;

/// Is a lease of `have` seconds as good as the `want` asked of a node whose longest
/// lease is `max`? Within 1/64 of the target (for a 30-day lease, 11 hours) or 2 s counts,
/// so renewals a little apart do not rewrite every block, and replicas whose clocks tick
/// a second apart do not extend each other's leases round after round.
pub fn leased_enough(have: u64, want: u64, max: u64) -> bool {
    let want = want.min(max);
    have.saturating_add((want / 64).max(LEASE_SLACK_SECS)) >= want
}

/// The least lease difference that counts (see [`leased_enough`]).
pub const LEASE_SLACK_SECS: u64 = 2;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VnodeStatus {
    pub me: NodeRef,
    pub pred: Option<NodeRef>,
    pub succs: Vec<NodeRef>,
    pub fingers: Vec<NodeRef>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusInfo {
    pub addr: SocketAddr,
    pub replicas: u8,
    pub vnodes: Vec<VnodeStatus>,
    pub blocks: u64,
    pub bytes: u64,
    pub cache_blocks: u64,
    pub cache_bytes: u64,
    /// Counters by name (lookups served, hops, cache hits, refused inputs, ...).
    pub counters: Vec<(String, u64)>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request does not make sense (bad vnode, oversized batch, wrong version).
    BadRequest,
    /// The block failed verification: hash, signature, or collision detection.
    Invalid,
    /// A root block older than (or conflicting with) the one held.
    Stale,
    /// The caller's storage quota is used up.
    Quota,
    /// Storage failed on the node.
    Storage,
    /// Too many requests in flight from this caller.
    Busy,
    /// The node's store is full: it refuses new blocks (and keeps serving what it holds).
    Full,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {msg}")]
pub struct RemoteError {
    pub kind: ErrorKind,
    pub msg: String,
}

impl RemoteError {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> RemoteError {
        RemoteError {
            kind,
            msg: msg.into(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    FrameTooLarge(usize),
    #[error("message does not decode: {0}")]
    Decode(String),
    #[error("peer speaks protocol {0}, this build speaks {PROTOCOL_VERSION}")]
    Protocol(u16),
}

/// The frame for `msg`: 4-byte big-endian length, then postcard bytes.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let mut out =
        postcard::to_extend(msg, vec![0u8; 4]).map_err(|e| WireError::Decode(e.to_string()))?;
    let len = out.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(WireError::FrameTooLarge(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decode a frame body (without its length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    if body.len() > MAX_FRAME_BYTES {
        return Err(WireError::FrameTooLarge(body.len()));
    }
    postcard::from_bytes(body).map_err(|e| WireError::Decode(e.to_string()))
}

/// Bytes of a response body that always hold [`block_response_header`]'s header.
pub const BLOCK_HEADER_MAX: usize = 24;

fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// If `head` (the start of a response body) is the header of `Ok(Response::Block(Some(
/// bytes)))`, returns the request id, the header's length and the block's length: the
/// block's bytes are then the rest of the body, and a reader can receive them straight
/// into their own buffer instead of decoding (and copying) the whole body.
pub fn block_response_header(head: &[u8]) -> Option<(u64, usize, usize)> {
    // postcard: id (varint), Result::Ok (0), Response::Block (its variant index, checked
    // against the encoder in a test), Some (1), length (varint).
    const BLOCK_VARIANT: u64 = 6;
    let mut at = 0;
    let id = varint(head, &mut at)?;
    if varint(head, &mut at)? != 0 || varint(head, &mut at)? != BLOCK_VARIANT {
        return None;
    }
    if *head.get(at)? != 1 {
        return None;
    }
    at += 1;
    let len = usize::try_from(varint(head, &mut at)?).ok()?;
    (len <= MAX_FRAME_BYTES).then_some((id, at, len))
}

/// The frame prefix and body header of `Ok(Response::Block(Some(b)))` for request `id`
/// and a block of `len` bytes: written before the block's own bytes, it makes the same
/// frame as [`encode_frame`] without copying the block into it.
pub fn block_response_prefix(id: u64, len: usize) -> Result<Vec<u8>, WireError> {
    // Encode an empty block, then patch the length: postcard's varint of `len` replaces
    // the varint of 0 (one byte) at the end.
    let empty = ResponseFrame {
        id,
        resp: Ok(Response::Block(Some(Vec::new()))),
    };
    let mut out =
        postcard::to_extend(&empty, vec![0u8; 4]).map_err(|e| WireError::Decode(e.to_string()))?;
    out.pop();
    let mut n = len;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    let total = out.len() - 4 + len;
    if total > MAX_FRAME_BYTES {
        return Err(WireError::FrameTooLarge(total));
    }
    out[..4].copy_from_slice(&(total as u32).to_be_bytes());
    Ok(out)
}

/// Read the length prefix; refuse before allocating if it is over the limit.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        Err(WireError::FrameTooLarge(len))
    } else {
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let f = RequestFrame {
            protocol: PROTOCOL_VERSION,
            id: 9,
            from: None,
            req: Request::Put {
                kind: BlockKind::Data,
                key: Id::hash(b"x"),
                bytes: b"x".to_vec(),
                transfer: false,
                lease: 60,
            },
        };
        let bytes = encode_frame(&f).unwrap();
        let len = frame_len(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, bytes.len() - 4);
        let back: RequestFrame = decode(&bytes[4..]).unwrap();
        assert_eq!(back.req, f.req);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for seed in 0..2000u32 {
            let mut x = seed.wrapping_mul(2654435761);
            let body: Vec<u8> = (0..(seed % 64))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = decode::<RequestFrame>(&body);
            let _ = decode::<ResponseFrame>(&body);
        }
        assert!(frame_len([0xff, 0xff, 0xff, 0xff]).is_err());
    }
}

#[cfg(test)]
mod block_header_tests {
    use super::*;

    fn body(id: u64, resp: Result<Response, RemoteError>) -> Vec<u8> {
        let f = encode_frame(&ResponseFrame { id, resp }).unwrap();
        f[4..].to_vec()
    }

    #[test]
    fn a_block_response_header_is_found_exactly_as_postcard_writes_it() {
        for (id, n) in [
            (0u64, 0usize),
            (1, 1),
            (300, 127),
            (u64::MAX, 128),
            (77, 262_144),
        ] {
            let bytes: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let b = body(id, Ok(Response::Block(Some(bytes.clone()))));
            let head = &b[..b.len().min(BLOCK_HEADER_MAX)];
            let (got_id, hdr, len) = block_response_header(head).expect("a block response");
            assert_eq!((got_id, len), (id, n));
            assert_eq!(hdr + len, b.len());
            assert_eq!(&b[hdr..], &bytes[..]);
        }
        for other in [
            Ok(Response::Block(None)),
            Ok(Response::Ok),
            Ok(Response::Have(vec![Some(Holding {
                version: 1,
                lease: 9,
                digest: None,
            })])),
            Ok(Response::Renewed {
                max_lease: 9,
                answers: vec![Ok(Some(5)), Ok(None)],
            }),
            Err(RemoteError::new(ErrorKind::Busy, "x")),
        ] {
            let b = body(5, other);
            assert_eq!(
                block_response_header(&b[..b.len().min(BLOCK_HEADER_MAX)]),
                None
            );
        }
        assert_eq!(
            block_response_header(&[0x80; 30]),
            None,
            "an endless varint"
        );
    }

    #[test]
    fn a_block_response_written_in_two_parts_is_the_same_frame() {
        for (id, n) in [(0u64, 0usize), (9, 127), (1 << 40, 128), (3, 262_144)] {
            let bytes: Vec<u8> = (0..n).map(|i| (i % 7) as u8).collect();
            let whole = encode_frame(&ResponseFrame {
                id,
                resp: Ok(Response::Block(Some(bytes.clone()))),
            })
            .unwrap();
            let mut parts = block_response_prefix(id, n).unwrap();
            parts.extend_from_slice(&bytes);
            assert_eq!(parts, whole);
        }
        assert!(block_response_prefix(1, MAX_FRAME_BYTES).is_err());
    }
}
