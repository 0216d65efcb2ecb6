//! Why the ublk frontend failed.

use thiserror::Error;

/// A failure of the ublk frontend, naming what it was doing.
#[derive(Debug, Error)]
pub enum UblkDeviceError {
    /// The ublk driver refused or failed a control command.
    #[error("ublk: {action} failed: {reason}")]
    Driver {
        /// What was attempted, e.g. "adding device 3".
        action: String,
        /// The driver's or libublk's answer.
        reason: String,
    },
    /// The device parameters are unusable.
    #[error("ublk: invalid {field}: {reason}")]
    Config {
        /// The offending parameter.
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// No ublk driver on this kernel.
    #[error("ublk: /dev/ublk-control is missing: load the ublk_drv module (modprobe ublk_drv)")]
    NoDriver,
}

impl UblkDeviceError {
    pub(crate) fn driver(action: impl Into<String>, error: impl std::fmt::Display) -> Self {
        UblkDeviceError::Driver {
            action: action.into(),
            reason: error.to_string(),
        }
    }
}
