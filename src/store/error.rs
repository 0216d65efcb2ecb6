//! Errors of the data copies.
//!
//! As in the log, pure decoding leaves `path` empty and [`StoreError::at`]
//! names the file once it is known.

use std::io;
use std::path::{Path, PathBuf};

/// Advice appended to every error that means "this is not (yet) a copy".
const INIT_HINT: &str = "run `replblk-ctl init` to initialise this copy";

/// Everything that can go wrong opening, creating or updating a data copy.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A system call on the copy failed.
    #[error("data copy {}: {op}: {source}", shown(.path))]
    Io {
        /// The copy's file or device.
        path: PathBuf,
        /// What we were doing, e.g. "fdatasync of the superblock".
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },

    /// No superblock where the geometry puts it: the copy was never
    /// initialised, or the file is something else.
    #[error(
        "data copy {}: no replblk superblock at offset {offset} (magic is {found}, expected \
         \"RBLKDATA\"); {INIT_HINT}",
        shown(.path)
    )]
    NoSuperblock {
        /// The copy's file or device.
        path: PathBuf,
        /// Where the superblock should be (= volume_size_bytes).
        offset: u64,
        /// The bytes found instead of the magic.
        found: String,
    },

    /// The superblock is there but a field or its checksum is wrong.
    #[error(
        "data copy {}: superblock {field} is {found} (expected {expected}); {INIT_HINT}",
        shown(.path)
    )]
    Garbled {
        /// The copy's file or device (empty when decoding bare bytes).
        path: PathBuf,
        /// The superblock field, named as in docs/FORMAT.md.
        field: &'static str,
        /// The value found.
        found: String,
        /// The value or range the format requires.
        expected: String,
    },

    /// The copy belongs to another volume.
    #[error(
        "data copy {}: volume uuid {} belongs to another volume (expected {})",
        shown(.path),
        uuid::Uuid::from_bytes(*.found),
        uuid::Uuid::from_bytes(*.expected)
    )]
    WrongVolume {
        /// The copy's file or device.
        path: PathBuf,
        /// The uuid in the superblock.
        found: [u8; 16],
        /// The uuid the caller asked for.
        expected: [u8; 16],
    },

    /// The copy is of this volume but its node or geometry differs from
    /// what the caller expects.
    #[error("data copy {}: {field} is {found} but {expected} was expected", shown(.path))]
    Mismatch {
        /// The copy's file or device.
        path: PathBuf,
        /// "node id", "block_size_bytes", "volume_size_bytes" or "file length".
        field: &'static str,
        /// The value in the superblock (or the file's length).
        found: u64,
        /// The value the caller asked for.
        expected: u64,
    },

    /// A value passed to [`super::DataFile::create`] cannot be a volume.
    #[error("data copy {}: {field} {found} is invalid: {expected}", shown(.path))]
    Invalid {
        /// The copy's file or device.
        path: PathBuf,
        /// The offending argument.
        field: &'static str,
        /// Its value.
        found: u64,
        /// What would be valid.
        expected: String,
    },

    /// An earlier superblock write or fsync on this DataFile failed; the
    /// kernel may have dropped the page, so only reopening is safe.
    #[error("data copy {}: an earlier superblock write or fsync failed; reopen the copy", shown(.path))]
    Poisoned {
        /// The copy's file or device.
        path: PathBuf,
    },
}

impl StoreError {
    /// Names the file the error is about, unless it already names one.
    pub fn at(mut self, file: &Path) -> StoreError {
        let slot = match &mut self {
            StoreError::Io { path, .. }
            | StoreError::NoSuperblock { path, .. }
            | StoreError::Garbled { path, .. }
            | StoreError::WrongVolume { path, .. }
            | StoreError::Mismatch { path, .. }
            | StoreError::Invalid { path, .. }
            | StoreError::Poisoned { path } => path,
        };
        if slot.as_os_str().is_empty() {
            *slot = file.to_path_buf();
        }
        self
    }

    pub(crate) fn garbled(
        field: &'static str,
        found: impl ToString,
        expected: impl ToString,
    ) -> StoreError {
        StoreError::Garbled {
            path: PathBuf::new(),
            field,
            found: found.to_string(),
            expected: expected.to_string(),
        }
    }

    pub(crate) fn io(path: &Path, op: &'static str, source: io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

fn shown(path: &Path) -> std::path::Display<'_> {
    if path.as_os_str().is_empty() {
        Path::new("(in memory)").display()
    } else {
        path.display()
    }
}
