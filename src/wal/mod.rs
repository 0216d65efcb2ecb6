//! The secondary's write-ahead log: a ring of update records in one file.
//!
//! A secondary appends every update it receives to the ring, fdatasyncs,
//! and acknowledges the highest seq now durable. Once the primary reports an
//! update acknowledged by its whole set, the secondary applies it to its
//! data copy, fdatasyncs the copy, and only then advances the start-of-log
//! pointer in the header past it, freeing the space. After a crash,
//! [`scan`] walks the ring from that pointer and hands back the records
//! still to apply.
//!
//! [`mod@format`] is the byte layout (pure), [`recovery`] the scan, [`mod@file`] the
//! IO. docs/FORMAT.md describes the format and the crash cases.

pub mod error;
pub mod file;
pub mod format;
pub mod recovery;

pub use error::WalError;
pub use file::{LogFile, RingReader, StagedHeader};
pub use format::{
    complete_record_around_payload, decode_header_page, header_slot_range, record_size_bytes,
    split_at_wrap, CurrentHeader, LogHeader, RecordHeader, LOG_ALIGN_BYTES, LOG_FORMAT_VERSION,
    LOG_HEADER_SIZE_BYTES, LOG_HEADER_SLOT_COUNT, LOG_HEADER_SLOT_OFFSETS_BYTES,
    LOG_HEADER_USED_BYTES, LOG_MAGIC, LOG_SIZE_MIN_BYTES, RECORD_FLAG_FUA,
    RECORD_HEADER_SIZE_BYTES, RECORD_KIND_UPDATE, RECORD_MAGIC, RECORD_PAYLOAD_MAX_BYTES,
    RECORD_PAYLOAD_OFFSET_BYTES, RECORD_SEQ_FIRST, RECORD_SIZE_MAX_BYTES,
};
pub use recovery::{
    read_records, scan, ReadRecordsError, RingRead, ScanError, ScanOutcome, StopReason,
};
