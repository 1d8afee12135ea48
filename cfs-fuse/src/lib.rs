//! The cfs client library: publishing a tree, reading it (`cfs get`), and the FUSE mount.

pub mod chaos;
pub mod fsread;
pub mod gateway;
pub mod mount;
pub mod netring;
pub mod prefetch;
pub mod publish;
pub mod ring;
pub mod testing;
pub mod testnet;

pub use fsread::{get, parse_get_spec, FsError, Reader, ReaderOpts};

pub use mount::{mount, open_fs, spawn_mount, MountHandle, MountOpts};
pub use publish::{
    fsid_of, keygen, load_key, publish, KeyError, PublishError, PublishOpts, Receipt,
};
