//! The wire protocol: postcard messages in length-prefixed frames. Every frame carries the
//! protocol version; every field that grows is bounded by the frame limit.

use crate::block::{BlockKind, MAX_BLOCK_BYTES};
use crate::id::{Id, NodeRef};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::net::SocketAddr;

/// 2: `Step::Done` names its range's start as an address-bound node, not a bare id, and
/// `Step::Closer` carries no RTT hints.
pub const PROTOCOL_VERSION: u16 = 2;
/// Hard limit on one frame: a largest block plus room for the envelope.
pub const MAX_FRAME_BYTES: usize = MAX_BLOCK_BYTES + 64 * 1024;
/// Most items in one batched request (Has), so that replies stay under the frame limit.
pub const MAX_BATCH: usize = 4096;
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
    /// Store a block in the permanent store. `transfer` marks ring-internal replication.
    Put {
        kind: BlockKind,
        key: Id,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        transfer: bool,
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
    /// Which of these does the permanent store hold, and at what version.
    Has {
        items: Vec<(BlockKind, Id)>,
    },
    /// A block offered for the path cache after a lookup this node routed.
    Cache {
        kind: BlockKind,
        key: Id,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    Status,
}

/// A block as carried in a batch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireBlock {
    pub kind: BlockKind,
    pub key: Id,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
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
    /// One entry per item asked: None if absent, else the held version (0 for content).
    Have(Vec<Option<u64>>),
    Status(Box<StatusInfo>),
}

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
