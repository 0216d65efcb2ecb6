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
        /// The driver's errno, when it gave one.
        errno: Option<i32>,
    },
    /// The driver refused to recover the device: on 6.12, what a server
    /// that died while recovering it leaves, or a device made without
    /// user recovery.
    #[error(
        "ublk: device {device_id} cannot be recovered: the driver refused (EINVAL), as it does once a \
         server died while recovering the device or for a device made without user recovery; remove \
         the device (programs still waiting on it get I/O errors) and start again"
    )]
    Unrecoverable {
        /// The stuck device.
        device_id: u32,
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
    pub(crate) fn driver(action: impl Into<String>, error: libublk::UblkError) -> Self {
        let errno = match error {
            libublk::UblkError::UringIOError(code) | libublk::UblkError::OtherError(code)
                if code < 0 =>
            {
                Some(-code)
            }
            _ => None,
        };
        let reason = match errno {
            Some(errno) => format!("{error}: {}", nix::errno::Errno::from_raw(errno)),
            None => error.to_string(),
        };
        UblkDeviceError::Driver {
            action: action.into(),
            reason,
            errno,
        }
    }

    /// The driver's errno, if the driver refused a command.
    pub fn errno(&self) -> Option<i32> {
        match self {
            UblkDeviceError::Driver { errno, .. } => *errno,
            _ => None,
        }
    }
}
