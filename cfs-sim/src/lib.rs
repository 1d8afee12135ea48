//! cfs-sim: the cfsd Chord/DHash code on a simulated network in virtual time. Nodes are
//! real `cfsd::node::Node`s; only the transport and the clock are simulated, so every
//! figure here is a figure of the daemon's own routing, stabilization and replication.

pub mod experiments;
pub mod gc;
pub mod grind;
pub mod plot;
pub mod report;
pub mod sim;
pub mod transport;
