//! The errno a failed read answers with: a FUSE concern, kept out of the shared reader.

use cfs_tree::FsError;

/// What the kernel is told when a read-path operation fails.
pub trait ToErrno {
    fn errno(&self) -> i32;
}

impl ToErrno for FsError {
    fn errno(&self) -> i32 {
        match self {
            FsError::NotFound(_) | FsError::NoSuchFs(_) | FsError::NoVersion { .. } => libc::ENOENT,
            FsError::NotDir(_) => libc::ENOTDIR,
            FsError::IsDir(_) => libc::EISDIR,
            FsError::Loop(_) => libc::ELOOP,
            FsError::Timeout { .. } => libc::ETIMEDOUT,
            _ => libc::EIO,
        }
    }
}
