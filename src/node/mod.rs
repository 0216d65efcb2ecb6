//! The daemons' wiring: the IO drivers around the [`crate::core`] state
//! machines, and the [`volume`] API through which writes enter the primary.

pub mod error;
pub mod local_cluster;
pub mod primary;
pub mod secondary;
pub mod volume;

pub use error::NodeError;
