//! The cfs node as a library: Chord and DHash over a [`transport::Transport`], so the
//! daemon (TCP) and the simulator (in-process network) run the same code.

pub mod cache;
mod chord;
pub mod daemon;
mod lease;
mod maintain;
pub mod metrics;
pub mod node;
pub mod quota;
mod serve;
pub mod server;
pub mod store;
