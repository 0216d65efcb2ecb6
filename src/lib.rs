//! replblk: block-device replication in userspace.
//!
//! A primary fans every write out to its secondaries; each secondary appends
//! the update to a write-ahead log and acknowledges it; once every secondary
//! of an update's set has acknowledged it, the primary notifies them all and
//! they clear it from their logs by advancing the start-of-log pointer.
//!
//! Layout: [`proto`] wire frames, [`core`] the sans-IO state machines,
//! [`wal`] the secondary's log file, [`store`] the data copies, [`net`] framed
//! TCP, [`node`] the daemons' wiring and the [`node::volume`] API.

#![warn(missing_docs)]

pub mod buf;
pub mod config;
pub mod core;
pub mod net;
pub mod node;
pub mod proto;
pub use replblk_ring as ring;
pub mod store;
pub mod wal;
