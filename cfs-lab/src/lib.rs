//! Building and breaking cfs rings: [`testnet`] makes hosts of network namespaces with a
//! `cfsd` each (partitions, link caps, fills), and [`chaos`] runs a fault schedule against
//! a ring while readers verify every byte and a census counts replicas. Drives `cfsd`
//! processes from outside, never node internals.

pub mod chaos;
pub mod testnet;
pub mod wan;
