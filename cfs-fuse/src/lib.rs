//! The read-only FUSE mount of a published cfs tree, over the `cfs-tree` reader. Only the
//! mount: the reader, publish and keep live in `cfs-tree`, the gateway in `cfs-gateway`,
//! the `cfs` command in `cfs-cli`.

pub mod mount;

pub use mount::{mount, open_fs, spawn_mount, MountHandle, MountOpts};
