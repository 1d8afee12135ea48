//! The cfs node as a library: Chord and DHash over a [`transport::Transport`], so the
//! daemon (TCP) and the simulator (in-process network) run the same code.

pub mod cache;
mod chord;
pub mod config;
pub mod config_file;
pub mod daemon;
mod handoffs;
mod lease;
mod maintain;
pub mod metrics;
pub mod node;
pub mod quota;
mod serve;
pub mod server;
mod state;
pub mod store;
mod vnode;
