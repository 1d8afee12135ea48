//! Published cfs trees over any [`service::BlockService`]: the [`reader::Reader`] shared by
//! the FUSE mount, the HTTP gateway, `cfs get` and the chaos readers (one block cache,
//! one memory budget, read-ahead, listing prefetch); [`publish`]; and [`keep`], the walk
//! that renews a tree's leases. Names neither FUSE nor HTTP: the front-ends live in
//! `cfs-fuse` and `cfs-gateway`.

pub mod keep;
pub mod publish;
pub mod reader;
pub mod service;

pub use publish::{
    fsid_of, keygen, load_key, publish, KeyError, PublishError, PublishOpts, Receipt,
};
pub use reader::{get, FsError, Reader, ReaderOpts};
