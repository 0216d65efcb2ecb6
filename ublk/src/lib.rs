//! The ublk frontend: exposes a block target as `/dev/ublkbN` through the
//! kernel's ublk driver, on top of `libublk`.
//!
//! A [`Target`] says how to read, write and flush; [`run`] creates the
//! device (or recovers one whose previous server died), serves it until it
//! is stopped, and returns. Each hardware queue has a thread of its own,
//! with its own io_uring (owned by libublk) and one task per tag, so a queue
//! takes its next request while earlier ones wait for their replicas.
//!
//! The target's futures complete on other threads (replblk's engine); the
//! wake-up reaches the queue thread through an eventfd polled in the queue's
//! own ring (see [`wake`]), the one bridge that respects the rule that only
//! the queue thread touches its ring. Queue 0 may instead be hosted on the
//! target's own thread and `replblk_ring` loop ([`HostedQueue`]), its
//! commands in the target's own ring, so that its requests cross no thread
//! at all.

#![warn(missing_docs)]

mod device;
mod error;
mod host_ring;
mod hosted;
mod queue;
pub mod ring;
mod target;
pub mod wake;

pub use device::{
    device_info, device_state, driver_present, remove_device, run, stop_device, DeviceConfig,
    DeviceInfo, DeviceState,
};
pub use error::UblkDeviceError;
pub use hosted::HostedQueue;
pub use target::{Errno, HostedTarget, QueueHandle, RequestBuffer, Target};

/// Sector size the ublk protocol counts offsets and lengths in.
pub const SECTOR_SIZE_BYTES: u64 = 512;
