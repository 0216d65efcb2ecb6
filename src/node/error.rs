//! Why a node could not start or had to stop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// A node's failure, naming the file, field or peer concerned.
#[derive(Debug, Error)]
pub enum NodeError {
    /// The config has no such node.
    #[error("node {node_id} is not in the config")]
    UnknownNode {
        /// The id asked for.
        node_id: u32,
    },
    /// The config is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The log file is unusable.
    #[error(transparent)]
    Wal(#[from] crate::wal::WalError),
    /// The data file is unusable.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A file and the config disagree.
    #[error("{path}: {field}: {reason}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// How they disagree.
        reason: String,
    },
    /// An I/O error on a file.
    #[error("{path}: {context}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The recovery scan could not finish.
    #[error("recovering log {path}: {reason}")]
    Recovery {
        /// The log.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The listening socket could not be bound.
    #[error("listening on {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The secondaries cannot form a volume with this primary.
    #[error("cannot start the primary: {reason}")]
    Startup {
        /// Why.
        reason: String,
    },
    /// The ublk frontend failed.
    #[error(transparent)]
    Device(#[from] replblk_ublk::UblkDeviceError),
    /// The device this volume would use is in a state we cannot take over.
    #[error("/dev/ublkb{device_id} is {state}, not left quiesced by a dead primary: another process serves it, or it must be removed first")]
    DeviceBusy {
        /// The device.
        device_id: u32,
        /// Its state, as the driver reports it.
        state: String,
    },
    /// The device was left by a primary that died while recovering it.
    #[error(
        "/dev/ublkb{device_id} was left by a primary that died while recovering it: this kernel's ublk \
         driver cannot be trusted to recover it again (Linux 6.12 crashes on it), so it is not tried; \
         remove the device (programs still waiting on it get I/O errors) and start the primary again"
    )]
    RecoveryCutShort {
        /// The device.
        device_id: u32,
    },
    /// The device was last served by another process than this volume's
    /// recorded primary.
    #[error(
        "/dev/ublkb{device_id} was last served by process {server_pid}, not by this volume's primary \
         (process {recorded_pid}, recorded in /run/replblk): another program's device, reusing the id; \
         left alone (delete the volume's record in /run/replblk to add a new device)"
    )]
    NotOurDevice {
        /// The device.
        device_id: u32,
        /// Its last server, as the driver reports it.
        server_pid: i32,
        /// The primary the volume's record names.
        recorded_pid: u32,
    },
    /// The device is served: only its server may remove it.
    #[error(
        "/dev/ublkb{device_id} is served by a running primary: stop that primary (SIGTERM) instead"
    )]
    DeviceServed {
        /// The device.
        device_id: u32,
    },
    /// An I/O error after which the node stopped rather than guess.
    #[error("stopped after a fatal error: {reason}")]
    Fatal {
        /// What failed.
        reason: String,
    },
}

impl NodeError {
    /// An I/O error on `path` while doing `context`.
    pub fn io(path: &Path, context: &'static str, source: std::io::Error) -> NodeError {
        NodeError::Io {
            path: path.to_owned(),
            context,
            source,
        }
    }
}
