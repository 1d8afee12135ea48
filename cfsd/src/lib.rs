//! The cfs node as a library: Chord and DHash over a [`transport::Transport`], so the
//! daemon (TCP) and the simulator (in-process network) run the same code.

pub mod cache;
mod chord;
pub mod client;
pub mod daemon;
pub mod keep;
mod lease;
mod maintain;
pub mod metrics;
pub mod net;
pub mod node;
mod peers;
pub mod quota;
mod serve;
pub mod server;
pub mod store;
pub mod transport;
