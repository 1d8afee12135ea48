//! Typed, self-certifying blocks. Bytes from the network or disk become usable only
//! through [`verify`], which returns a [`Verified`] block; nothing else constructs one.

use crate::id::Id;
pub use ed25519_dalek::SigningKey;
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Largest block accepted anywhere (data, metadata or root).
pub const MAX_BLOCK_BYTES: usize = 1 << 20;

/// Blocks are keyed by (kind, key) everywhere, so a content block can never stand in
/// for a root block or the other way round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum BlockKind {
    /// A chunk of a file; key = SHA-1(bytes).
    Data = 0,
    /// An inode, directory or indirect block (see [`crate::fs`]); key = SHA-1(bytes).
    Meta = 1,
    /// The mutable, signed root of a filesystem; key = SHA-1(tag, public key).
    Root = 2,
}

impl BlockKind {
    pub fn is_content(self) -> bool {
        self != BlockKind::Root
    }
    pub fn from_u8(b: u8) -> Option<BlockKind> {
        match b {
            0 => Some(BlockKind::Data),
            1 => Some(BlockKind::Meta),
            2 => Some(BlockKind::Root),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("block is {0} bytes, over the {MAX_BLOCK_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("block bytes do not hash to key {0}")]
    HashMismatch(Id),
    #[error("block bytes are one half of a SHA-1 collision attack; refused")]
    Collision,
    #[error("root block does not decode: {0}")]
    RootDecode(String),
    #[error("root block's public key does not match key {0}")]
    RootKeyMismatch(Id),
    #[error("root block signature does not verify")]
    BadSignature,
}

/// A block whose bytes have been checked against its key (hash or signature).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    kind: BlockKind,
    key: Id,
    bytes: Vec<u8>,
    /// For roots, the version; for content blocks 0. Lets stores compare without decoding.
    version: u64,
}

impl Verified {
    pub fn kind(&self) -> BlockKind {
        self.kind
    }
    pub fn key(&self) -> Id {
        self.key
    }
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
    pub fn version(&self) -> u64 {
        self.version
    }
    /// Where this root stands among the roots of its FSID (`root_rank`).
    pub fn rank(&self) -> RootRank {
        root_rank(self.version, Id::hash(&self.bytes))
    }
    /// The decoded root of a verified root block.
    pub fn root(&self) -> Option<RootBlock> {
        (self.kind == BlockKind::Root)
            .then(|| postcard::from_bytes(&self.bytes).ok())
            .flatten()
    }
}

/// The order in which roots of one FSID supersede each other, applied alike by every
/// node, client and reader: the higher version first; at the same version (a fork: the
/// key signed two roots, by a leak, a bug, or two machines publishing at once) the one
/// whose bytes hash lower. Replicas that got both sides of a fork so converge on one,
/// and readers that see both pick the same one. Higher ranks win.
pub type RootRank = (u64, std::cmp::Reverse<Id>);

/// The rank of a root of `version` whose bytes hash to `digest`.
pub fn root_rank(version: u64, digest: Id) -> RootRank {
    (version, std::cmp::Reverse(digest))
}

/// SHA-1 with collision detection (the SHAttered / Shambles attacks): the store uses it
/// so that it never holds one half of a known-colliding pair under the shared key.
pub fn checked_sha1(bytes: &[u8]) -> Result<Id, VerifyError> {
    use sha1_checked::{CollisionResult, Digest};
    let mut h = sha1_checked::Sha1::new();
    h.update(bytes);
    match h.try_finalize() {
        CollisionResult::Ok(d) => Ok(Id(d.into())),
        _ => Err(VerifyError::Collision),
    }
}

/// Check `bytes` against (kind, key). `detect_collisions` costs about 2x the hashing
/// time; storing nodes use it, readers (who already trust the key) need not.
pub fn verify(
    kind: BlockKind,
    key: Id,
    bytes: Vec<u8>,
    detect_collisions: bool,
) -> Result<Verified, VerifyError> {
    if bytes.len() > MAX_BLOCK_BYTES {
        return Err(VerifyError::TooLarge(bytes.len()));
    }
    let version = match kind {
        BlockKind::Data | BlockKind::Meta => {
            let h = if detect_collisions {
                checked_sha1(&bytes)?
            } else {
                Id::hash(&bytes)
            };
            if h != key {
                return Err(VerifyError::HashMismatch(key));
            }
            0
        }
        BlockKind::Root => {
            let root: RootBlock = decode_root(&bytes)?;
            if root_key(&root.public_key) != key {
                return Err(VerifyError::RootKeyMismatch(key));
            }
            root.check_signature()?;
            root.version
        }
    };
    Ok(Verified {
        kind,
        key,
        bytes,
        version,
    })
}

/// Roots decode canonically: bytes after the encoding are refused, so one signed root
/// has exactly one byte string and a peer cannot forge a "different" copy of a version.
fn decode_root(bytes: &[u8]) -> Result<RootBlock, VerifyError> {
    let (root, rest) = postcard::take_from_bytes::<RootBlock>(bytes)
        .map_err(|e| VerifyError::RootDecode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(VerifyError::RootDecode(format!(
            "{} bytes after the root",
            rest.len()
        )));
    }
    Ok(root)
}

const ROOT_KEY_TAG: &[u8] = b"cfs-root-key-v1";
const ROOT_SIG_TAG: &[u8] = b"cfs-root-signature-v1";

/// The ring key of a publisher's root block: its FSID.
pub fn root_key(public_key: &[u8; 32]) -> Id {
    Id::hash_parts(&[ROOT_KEY_TAG, public_key])
}

/// Totals that `statfs` reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub files: u64,
    pub bytes: u64,
    pub blocks: u64,
}

/// The only mutable block: signed by the publisher, version only grows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootBlock {
    pub public_key: [u8; 32],
    pub version: u64,
    /// Key of the top directory's inode (a Meta block).
    pub top: Id,
    pub totals: Totals,
    /// Content key of the previous version's root bytes, stored as a Meta block.
    pub prev: Option<Id>,
    /// Publisher's clock at signing, seconds since the epoch (informational).
    pub published_at: u64,
    #[serde(with = "sig_serde")]
    pub signature: [u8; 64],
}

mod sig_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        v.as_slice().serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let v: Vec<u8> = Vec::deserialize(d)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("signature must be 64 bytes"))
    }
}

impl RootBlock {
    fn signed_message(&self) -> Vec<u8> {
        let body = (
            &self.public_key,
            self.version,
            &self.top,
            &self.totals,
            &self.prev,
            self.published_at,
        );
        let mut msg = ROOT_SIG_TAG.to_vec();
        msg.extend(postcard::to_stdvec(&body).expect("encoding to memory"));
        msg
    }

    /// Build and sign a root block.
    pub fn sign(
        key: &SigningKey,
        version: u64,
        top: Id,
        totals: Totals,
        prev: Option<Id>,
        published_at: u64,
    ) -> RootBlock {
        let mut r = RootBlock {
            public_key: key.verifying_key().to_bytes(),
            version,
            top,
            totals,
            prev,
            published_at,
            signature: [0; 64],
        };
        r.signature = key.sign(&r.signed_message()).to_bytes();
        r
    }

    pub fn check_signature(&self) -> Result<(), VerifyError> {
        let vk =
            VerifyingKey::from_bytes(&self.public_key).map_err(|_| VerifyError::BadSignature)?;
        vk.verify_strict(
            &self.signed_message(),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| VerifyError::BadSignature)
    }

    pub fn key(&self) -> Id {
        root_key(&self.public_key)
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to memory")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    #[test]
    fn content_blocks_verify_by_hash() {
        let b = b"hello".to_vec();
        let k = Id::hash(&b);
        assert!(verify(BlockKind::Data, k, b.clone(), true).is_ok());
        assert_eq!(
            verify(BlockKind::Data, Id::hash(b"x"), b, true),
            Err(VerifyError::HashMismatch(Id::hash(b"x")))
        );
    }

    #[test]
    fn roots_verify_by_signature() {
        let r = RootBlock::sign(&signer(), 3, Id::hash(b"top"), Totals::default(), None, 0);
        let v = verify(BlockKind::Root, r.key(), r.encode(), true).unwrap();
        assert_eq!(v.version(), 3);
        assert_eq!(v.root().unwrap(), r);
        let mut bad = r.clone();
        bad.version = 4;
        assert_eq!(
            verify(BlockKind::Root, r.key(), bad.encode(), true),
            Err(VerifyError::BadSignature)
        );
        // Appended bytes are refused: a signed root has one encoding.
        let mut longer = r.encode();
        longer.push(0);
        assert!(matches!(
            verify(BlockKind::Root, r.key(), longer, true),
            Err(VerifyError::RootDecode(_))
        ));
        // A content key cannot name a root and a root key cannot name content.
        assert!(verify(BlockKind::Root, Id::hash(&r.encode()), r.encode(), true).is_err());
        assert!(verify(BlockKind::Data, r.key(), r.encode(), true).is_err());
    }

    #[test]
    fn oversized_refused() {
        let b = vec![0u8; MAX_BLOCK_BYTES + 1];
        assert!(matches!(
            verify(BlockKind::Data, Id::hash(&b), b, false),
            Err(VerifyError::TooLarge(_))
        ));
    }
}
