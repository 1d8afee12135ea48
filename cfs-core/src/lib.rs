//! Pure core of cfs. Nothing in this crate does I/O or reads a clock: ids and ring
//! intervals, typed blocks and their verification, the wire codec, the filesystem layout.

pub mod block;
pub mod fs;
pub mod geo;
pub mod id;
pub mod ring;
pub mod units;
pub mod walk;
pub mod wire;

pub use block::{BlockKind, RootBlock, Verified, VerifyError};
pub use id::{Id, NodeRef};
