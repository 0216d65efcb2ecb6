//! Errors of the write-ahead log.
//!
//! Pure decoding (see [`super::format`]) does not know which file its bytes
//! came from, so it leaves `path` empty; the IO layer stamps the path with
//! [`WalError::at`] before the error leaves the module, and the scanner does
//! the same with [`super::RingRead::source_path`].

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong reading, writing or validating a log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A system call on the log failed.
    #[error("log {}: {op}: {source}", shown(.path))]
    Io {
        /// The log file.
        path: PathBuf,
        /// What we were doing, e.g. "fdatasync".
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },

    /// A header or record field holds a value this format does not allow.
    #[error("log {}: {field} is {found} (expected {expected})", shown(.path))]
    BadField {
        /// The log file (empty when decoding bytes of unknown origin).
        path: PathBuf,
        /// Which field, named as in docs/FORMAT.md.
        field: &'static str,
        /// The value found on disk.
        found: String,
        /// The value or range the format requires.
        expected: String,
    },

    /// The stored checksum does not match the bytes it covers.
    #[error(
        "log {}: {what} crc32 is {found:#010x} but the bytes hash to {computed:#010x}",
        shown(.path)
    )]
    BadCrc {
        /// The log file (empty when decoding bytes of unknown origin).
        path: PathBuf,
        /// "header" or "record seq N".
        what: String,
        /// The checksum stored on disk.
        found: u32,
        /// The checksum of the bytes as they are.
        computed: u32,
    },

    /// Neither slot of the header page holds a valid header, so the log
    /// cannot be opened. Each slot's own problem is kept.
    #[error(
        "log {}: no valid header in either slot of the header page: \
         slot 0: {}; slot 1: {}",
        shown(.path),
        detail(.slot0),
        detail(.slot1)
    )]
    NoValidHeader {
        /// The log file.
        path: PathBuf,
        /// Why slot 0 (header page bytes 0..128) was refused.
        slot0: Box<WalError>,
        /// Why slot 1 (header page bytes 512..640) was refused.
        slot1: Box<WalError>,
    },

    /// The log was created for a different volume.
    #[error(
        "log {}: volume uuid {} belongs to another volume (expected {})",
        shown(.path),
        uuid::Uuid::from_bytes(*.found),
        uuid::Uuid::from_bytes(*.expected)
    )]
    WrongVolume {
        /// The log file.
        path: PathBuf,
        /// The uuid in the header.
        found: [u8; 16],
        /// The uuid the caller asked for.
        expected: [u8; 16],
    },

    /// The log was created for a different node.
    #[error("log {}: node id {found} belongs to another node (expected {expected})", shown(.path))]
    WrongNode {
        /// The log file.
        path: PathBuf,
        /// The node id in the header.
        found: u32,
        /// The node id the caller asked for.
        expected: u32,
    },

    /// The file's length disagrees with the header's log_size_bytes, so the
    /// ring would end in the wrong place.
    #[error(
        "log {}: file is {found} bytes but the header's log_size_bytes is {expected}",
        shown(.path)
    )]
    SizeMismatch {
        /// The log file.
        path: PathBuf,
        /// The file's length.
        found: u64,
        /// log_size_bytes from the header.
        expected: u64,
    },

    /// Another open LogFile (in this or another process) holds the log.
    #[error("log {}: in use by another process (flock: {source})", shown(.path))]
    Locked {
        /// The log file.
        path: PathBuf,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },

    /// An earlier fsync or write on this LogFile failed. The kernel may have
    /// dropped the dirty pages and cleared the error, so a later fsync could
    /// report success for data that never reached the disk: only reopening
    /// (and thereby rescanning) the log is safe.
    #[error("log {}: an earlier write or fsync failed; reopen the log", shown(.path))]
    Poisoned {
        /// The log file.
        path: PathBuf,
    },
}

impl WalError {
    /// Names the file the error is about, unless it already names one.
    pub fn at(mut self, file: &Path) -> WalError {
        let slot = match &mut self {
            WalError::Io { path, .. }
            | WalError::BadField { path, .. }
            | WalError::BadCrc { path, .. }
            | WalError::NoValidHeader { path, .. }
            | WalError::WrongVolume { path, .. }
            | WalError::WrongNode { path, .. }
            | WalError::SizeMismatch { path, .. }
            | WalError::Locked { path, .. }
            | WalError::Poisoned { path } => path,
        };
        if slot.as_os_str().is_empty() {
            *slot = file.to_path_buf();
        }
        self
    }

    /// The file the error names (empty if decoding was not tied to a file).
    pub fn path(&self) -> &Path {
        match self {
            WalError::Io { path, .. }
            | WalError::BadField { path, .. }
            | WalError::BadCrc { path, .. }
            | WalError::NoValidHeader { path, .. }
            | WalError::WrongVolume { path, .. }
            | WalError::WrongNode { path, .. }
            | WalError::SizeMismatch { path, .. }
            | WalError::Locked { path, .. }
            | WalError::Poisoned { path } => path,
        }
    }

    pub(crate) fn field(
        field: &'static str,
        found: impl ToString,
        expected: impl ToString,
    ) -> WalError {
        WalError::BadField {
            path: PathBuf::new(),
            field,
            found: found.to_string(),
            expected: expected.to_string(),
        }
    }

    pub(crate) fn io(path: &Path, op: &'static str, source: io::Error) -> WalError {
        WalError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

/// An error's message without its leading "log PATH: ", for nesting it in
/// another error's message.
fn detail(error: &WalError) -> String {
    let full = error.to_string();
    let prefix = format!("log {}: ", shown(error.path()));
    match full.strip_prefix(&prefix) {
        Some(rest) => rest.to_string(),
        None => full,
    }
}

fn shown(path: &Path) -> std::path::Display<'_> {
    if path.as_os_str().is_empty() {
        Path::new("(in memory)").display()
    } else {
        path.display()
    }
}
