//! Talking to a cfs ring, for nodes and clients alike. Everything that crosses the network
//! goes through [`transport::Transport`] (TCP for the daemon and the client, an in-process
//! network for the simulator); [`net::Net`] adds RTT measurement, iterative lookups with
//! server selection and the DHash operations; [`client::Client`] is the client every `cfs`
//! command and the gateway use. Decodes no tree and runs no node.

pub mod client;
mod conn;
pub mod hedge;
pub mod net;
mod peers;
mod put_window;
mod ranges;
mod roots;
pub mod transport;
