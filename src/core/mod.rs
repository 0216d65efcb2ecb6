//! The sans-IO state machines: events in, actions out.
//!
//! Nothing here touches a socket, a file or a clock; time is passed in as
//! milliseconds. The drivers in [`crate::node`] execute the actions and feed
//! back their completions, and tests drive the same machines directly.

pub mod ack_tracker;
pub mod catch_up;
mod local_writes;
pub mod primary;
pub mod secondary;
