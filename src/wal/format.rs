//! Byte layout of the log: the header page and the records in the ring.
//!
//! Pure encode/decode, no IO, so the same code serves the daemon, the
//! recovery scan, the tools and the tests. docs/FORMAT.md is the prose
//! version of this file; keep them in step.

use crate::buf::{round_up, PAGE_SIZE_BYTES};

use super::error::WalError;

const U16_SIZE_BYTES: usize = std::mem::size_of::<u16>();
const U32_SIZE_BYTES: usize = std::mem::size_of::<u32>();
const U64_SIZE_BYTES: usize = std::mem::size_of::<u64>();
const UUID_SIZE_BYTES: usize = 16;

/// Granularity of everything in the log file: the header page, record
/// starts and record sizes. O_DIRECT needs it and it keeps record headers
/// from straddling the end of the ring.
pub const LOG_ALIGN_BYTES: u64 = PAGE_SIZE_BYTES as u64;

/// First bytes of a log file.
pub const LOG_MAGIC: [u8; 8] = *b"RBLKLOG\0";
/// The only log format version this code reads and writes.
pub const LOG_FORMAT_VERSION: u32 = 1;
/// The header page at offset 0; the ring starts right after it.
pub const LOG_HEADER_SIZE_BYTES: u64 = LOG_ALIGN_BYTES;
/// Size of one header slot: the bytes [`LogHeader::encode`] writes and
/// [`LogHeader::decode`] reads (only the first 84 carry fields, the rest are
/// zero).
pub const LOG_HEADER_USED_BYTES: usize = 128;
/// Number of header slots in the header page. Updates alternate between
/// them, so the slot holding the current header is never written while a
/// newer one is being made durable.
pub const LOG_HEADER_SLOT_COUNT: usize = 2;
/// Where each header slot starts in the header page. They lie in different
/// 512-byte sectors; every byte of the page outside the slots is zero.
pub const LOG_HEADER_SLOT_OFFSETS_BYTES: [usize; LOG_HEADER_SLOT_COUNT] = [0, 512];
/// Sector size the slots are spread over.
const SECTOR_SIZE_BYTES: usize = 512;
const _: () = {
    let [first, second] = LOG_HEADER_SLOT_OFFSETS_BYTES;
    assert!(first.is_multiple_of(SECTOR_SIZE_BYTES) && second.is_multiple_of(SECTOR_SIZE_BYTES));
    assert!(first + LOG_HEADER_USED_BYTES <= second);
    assert!(LOG_HEADER_USED_BYTES <= SECTOR_SIZE_BYTES);
    assert!(second + LOG_HEADER_USED_BYTES <= LOG_HEADER_SIZE_BYTES as usize);
};

const HDR_MAGIC_OFFSET: usize = 0;
const HDR_VERSION_OFFSET: usize = HDR_MAGIC_OFFSET + LOG_MAGIC.len();
const HDR_HEADER_SIZE_OFFSET: usize = HDR_VERSION_OFFSET + U32_SIZE_BYTES;
const HDR_UUID_OFFSET: usize = HDR_HEADER_SIZE_OFFSET + U32_SIZE_BYTES;
const HDR_NODE_ID_OFFSET: usize = HDR_UUID_OFFSET + UUID_SIZE_BYTES;
const HDR_RESERVED_OFFSET: usize = HDR_NODE_ID_OFFSET + U32_SIZE_BYTES;
const HDR_LOG_SIZE_OFFSET: usize = HDR_RESERVED_OFFSET + U32_SIZE_BYTES;
const HDR_EPOCH_OFFSET: usize = HDR_LOG_SIZE_OFFSET + U64_SIZE_BYTES;
const HDR_START_OFFSET_OFFSET: usize = HDR_EPOCH_OFFSET + U64_SIZE_BYTES;
const HDR_START_SEQ_OFFSET: usize = HDR_START_OFFSET_OFFSET + U64_SIZE_BYTES;
const HDR_GENERATION_OFFSET: usize = HDR_START_SEQ_OFFSET + U64_SIZE_BYTES;
const HDR_CRC_OFFSET: usize = HDR_GENERATION_OFFSET + U64_SIZE_BYTES;
const HDR_END_OFFSET: usize = HDR_CRC_OFFSET + U32_SIZE_BYTES;
const _: () = assert!(HDR_CRC_OFFSET == 80 && HDR_END_OFFSET <= LOG_HEADER_USED_BYTES);

/// `RREC` read as a little-endian u32: the first bytes of every record.
pub const RECORD_MAGIC: u32 = 0x4345_5252;
/// Record kind of a replicated write.
pub const RECORD_KIND_UPDATE: u16 = 1;
/// Record flag: the primary asked for this write with FUA.
pub const RECORD_FLAG_FUA: u32 = 1 << 0;
/// Flags this version knows; a record with any other bit set is refused so
/// that a newer writer's meaning is never silently dropped.
pub const RECORD_FLAGS_KNOWN: u32 = RECORD_FLAG_FUA;
/// Fixed-size header in front of every record's payload.
pub const RECORD_HEADER_SIZE_BYTES: usize = 64;
/// Where the payload starts inside a record buffer, so the network path can
/// receive a payload straight into place and fill the header afterwards.
pub const RECORD_PAYLOAD_OFFSET_BYTES: usize = RECORD_HEADER_SIZE_BYTES;
/// Largest payload one record carries.
pub const RECORD_PAYLOAD_MAX_BYTES: u32 = 1 << 20;
/// Largest record in the ring, header and padding included.
pub const RECORD_SIZE_MAX_BYTES: u64 = round_up(
    RECORD_HEADER_SIZE_BYTES as u64 + RECORD_PAYLOAD_MAX_BYTES as u64,
    LOG_ALIGN_BYTES,
);
/// Smallest log file: the header page and room for four largest records, so
/// that the writer can keep appending while the oldest are being cleared.
pub const LOG_SIZE_MIN_BYTES: u64 = LOG_HEADER_SIZE_BYTES + 4 * RECORD_SIZE_MAX_BYTES;
/// Sequence number of the first record of a new log; 0 is never a seq.
pub const RECORD_SEQ_FIRST: u64 = 1;

const REC_MAGIC_OFFSET: usize = 0;
const REC_KIND_OFFSET: usize = REC_MAGIC_OFFSET + U32_SIZE_BYTES;
const REC_RESERVED1_OFFSET: usize = REC_KIND_OFFSET + U16_SIZE_BYTES;
const REC_SEQ_OFFSET: usize = REC_RESERVED1_OFFSET + U16_SIZE_BYTES;
const REC_EPOCH_OFFSET: usize = REC_SEQ_OFFSET + U64_SIZE_BYTES;
const REC_VOLUME_OFFSET_OFFSET: usize = REC_EPOCH_OFFSET + U64_SIZE_BYTES;
const REC_LENGTH_OFFSET: usize = REC_VOLUME_OFFSET_OFFSET + U64_SIZE_BYTES;
const REC_FLAGS_OFFSET: usize = REC_LENGTH_OFFSET + U32_SIZE_BYTES;
const REC_RESERVED2_OFFSET: usize = REC_FLAGS_OFFSET + U32_SIZE_BYTES;
const REC_RESERVED2_SIZE_BYTES: usize = 20;
const REC_CRC_OFFSET: usize = REC_RESERVED2_OFFSET + REC_RESERVED2_SIZE_BYTES;
const _: () = assert!(REC_CRC_OFFSET == 60);
const _: () = assert!(REC_CRC_OFFSET + U32_SIZE_BYTES == RECORD_HEADER_SIZE_BYTES);

fn get_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + U16_SIZE_BYTES].try_into().unwrap())
}

fn get_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + U32_SIZE_BYTES].try_into().unwrap())
}

fn get_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + U64_SIZE_BYTES].try_into().unwrap())
}

fn put_u16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + U16_SIZE_BYTES].copy_from_slice(&value.to_le_bytes());
}

fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + U32_SIZE_BYTES].copy_from_slice(&value.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + U64_SIZE_BYTES].copy_from_slice(&value.to_le_bytes());
}

/// Checks a whole log size: page multiple (O_DIRECT, record alignment) and
/// large enough for [`LOG_SIZE_MIN_BYTES`].
pub fn check_log_size(log_size_bytes: u64) -> Result<(), WalError> {
    if !log_size_bytes.is_multiple_of(LOG_ALIGN_BYTES) || log_size_bytes < LOG_SIZE_MIN_BYTES {
        return Err(WalError::field(
            "log_size_bytes",
            log_size_bytes,
            format!("a multiple of {LOG_ALIGN_BYTES} and >= {LOG_SIZE_MIN_BYTES}"),
        ));
    }
    Ok(())
}

/// The log's header page: identity, geometry and the start-of-log pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogHeader {
    /// The replicated volume this log belongs to.
    pub volume_uuid: [u8; 16],
    /// The node (secondary) whose log this is.
    pub node_id: u32,
    /// Size of the whole file, header page included.
    pub log_size_bytes: u64,
    /// Highest epoch this node has accepted; records of later epochs are
    /// refused by the scan.
    pub epoch: u64,
    /// Ring offset of the oldest record not yet cleared (page aligned).
    pub start_offset: u64,
    /// Seq of the record at `start_offset`, or the next seq to append when
    /// the log is empty.
    pub start_seq: u64,
    /// Incremented at every header write. Of the two header slots, the
    /// valid one with the higher generation is the current header.
    pub header_generation: u64,
}

impl LogHeader {
    /// Length of the ring area, the part of the file after the header page.
    pub fn ring_len_bytes(&self) -> u64 {
        self.log_size_bytes - LOG_HEADER_SIZE_BYTES
    }

    /// Writes the header's [`LOG_HEADER_USED_BYTES`] into `page` (one
    /// header slot), checksum included. Bytes of `page` past those are left
    /// as they are.
    pub fn encode(&self, page: &mut [u8]) {
        assert!(
            page.len() >= LOG_HEADER_USED_BYTES,
            "log header buffer of {} bytes is too small",
            page.len()
        );
        // A header that fails our own decode must never reach the disk: the
        // next open would refuse the log.
        assert!(check_log_size(self.log_size_bytes).is_ok());
        assert!(self.start_offset.is_multiple_of(LOG_ALIGN_BYTES));
        assert!(self.start_offset < self.ring_len_bytes());
        assert!(self.start_seq >= RECORD_SEQ_FIRST);

        let page = &mut page[..LOG_HEADER_USED_BYTES];
        page.fill(0);
        page[HDR_MAGIC_OFFSET..HDR_VERSION_OFFSET].copy_from_slice(&LOG_MAGIC);
        put_u32(page, HDR_VERSION_OFFSET, LOG_FORMAT_VERSION);
        put_u32(page, HDR_HEADER_SIZE_OFFSET, LOG_HEADER_SIZE_BYTES as u32);
        page[HDR_UUID_OFFSET..HDR_NODE_ID_OFFSET].copy_from_slice(&self.volume_uuid);
        put_u32(page, HDR_NODE_ID_OFFSET, self.node_id);
        put_u64(page, HDR_LOG_SIZE_OFFSET, self.log_size_bytes);
        put_u64(page, HDR_EPOCH_OFFSET, self.epoch);
        put_u64(page, HDR_START_OFFSET_OFFSET, self.start_offset);
        put_u64(page, HDR_START_SEQ_OFFSET, self.start_seq);
        put_u64(page, HDR_GENERATION_OFFSET, self.header_generation);
        let crc = crc32fast::hash(&page[..HDR_CRC_OFFSET]);
        put_u32(page, HDR_CRC_OFFSET, crc);
    }

    /// Parses and validates one header slot (at least
    /// [`LOG_HEADER_USED_BYTES`] long). [`decode_header_page`] chooses
    /// between the two slots of a header page.
    pub fn decode(page: &[u8]) -> Result<LogHeader, WalError> {
        if page.len() < LOG_HEADER_USED_BYTES {
            return Err(WalError::field(
                "header length",
                page.len(),
                format!(">= {LOG_HEADER_USED_BYTES} bytes"),
            ));
        }
        let magic = &page[HDR_MAGIC_OFFSET..HDR_VERSION_OFFSET];
        if magic != LOG_MAGIC {
            return Err(WalError::field(
                "magic",
                format!("{magic:02x?}"),
                format!("{LOG_MAGIC:02x?} (\"RBLKLOG\\0\"); not a replblk log"),
            ));
        }
        let version = get_u32(page, HDR_VERSION_OFFSET);
        if version != LOG_FORMAT_VERSION {
            return Err(WalError::field(
                "format version",
                version,
                LOG_FORMAT_VERSION,
            ));
        }
        let found = get_u32(page, HDR_CRC_OFFSET);
        let computed = crc32fast::hash(&page[..HDR_CRC_OFFSET]);
        if found != computed {
            return Err(WalError::BadCrc {
                path: Default::default(),
                what: "header".to_string(),
                found,
                computed,
            });
        }
        let header_size = get_u32(page, HDR_HEADER_SIZE_OFFSET);
        if u64::from(header_size) != LOG_HEADER_SIZE_BYTES {
            return Err(WalError::field(
                "header_size",
                header_size,
                LOG_HEADER_SIZE_BYTES,
            ));
        }
        let reserved = get_u32(page, HDR_RESERVED_OFFSET);
        if reserved != 0 {
            return Err(WalError::field("header reserved bytes 36..40", reserved, 0));
        }
        let header = LogHeader {
            volume_uuid: page[HDR_UUID_OFFSET..HDR_NODE_ID_OFFSET]
                .try_into()
                .unwrap(),
            node_id: get_u32(page, HDR_NODE_ID_OFFSET),
            log_size_bytes: get_u64(page, HDR_LOG_SIZE_OFFSET),
            epoch: get_u64(page, HDR_EPOCH_OFFSET),
            start_offset: get_u64(page, HDR_START_OFFSET_OFFSET),
            start_seq: get_u64(page, HDR_START_SEQ_OFFSET),
            header_generation: get_u64(page, HDR_GENERATION_OFFSET),
        };
        check_log_size(header.log_size_bytes)?;
        if !header.start_offset.is_multiple_of(LOG_ALIGN_BYTES)
            || header.start_offset >= header.ring_len_bytes()
        {
            return Err(WalError::field(
                "start_offset",
                header.start_offset,
                format!(
                    "a multiple of {LOG_ALIGN_BYTES} below the ring length {}",
                    header.ring_len_bytes()
                ),
            ));
        }
        if header.start_seq < RECORD_SEQ_FIRST {
            return Err(WalError::field(
                "start_seq",
                header.start_seq,
                format!(">= {RECORD_SEQ_FIRST}"),
            ));
        }
        Ok(header)
    }
}

/// The bytes of the header page that slot `slot` (0 or 1) occupies.
pub fn header_slot_range(slot: usize) -> std::ops::Range<usize> {
    let start = LOG_HEADER_SLOT_OFFSETS_BYTES[slot];
    start..start + LOG_HEADER_USED_BYTES
}

/// The header a log is opened with, chosen by [`decode_header_page`].
#[derive(Debug)]
pub struct CurrentHeader {
    /// The valid header with the highest generation.
    pub header: LogHeader,
    /// The slot it was read from; the next header write goes to the other.
    pub slot: usize,
    /// Why the other slot holds no valid header, if it does not. Normal
    /// for a log never updated since create (its slot 1 is zero), and after
    /// a crash in the middle of a header update.
    pub other_slot_problem: Option<WalError>,
}

impl CurrentHeader {
    /// The slot the next header write must go to: the one not holding the
    /// current header.
    pub fn next_slot(&self) -> usize {
        other_slot(self.slot)
    }
}

/// The slot that is not `slot`.
pub fn other_slot(slot: usize) -> usize {
    assert!(
        slot < LOG_HEADER_SLOT_COUNT,
        "header slot {slot} does not exist"
    );
    1 - slot
}

/// Decodes both slots of a header page and picks the current header: the
/// valid one with the higher generation, or the only valid one. Refuses a
/// page with no valid slot (naming both slots' problems) and one whose two
/// valid slots carry the same generation, which no sequence of header
/// writes produces.
pub fn decode_header_page(page: &[u8]) -> Result<CurrentHeader, WalError> {
    if page.len() < LOG_HEADER_SIZE_BYTES as usize {
        return Err(WalError::field(
            "header page length",
            page.len(),
            format!(">= {LOG_HEADER_SIZE_BYTES} bytes"),
        ));
    }
    let decoded: [Result<LogHeader, WalError>; LOG_HEADER_SLOT_COUNT] =
        [0, 1].map(|slot| LogHeader::decode(&page[header_slot_range(slot)]));
    match decoded {
        [Ok(first), Ok(second)] => {
            if first.header_generation == second.header_generation {
                return Err(WalError::field(
                    "header_generation",
                    format!("{} in both slots", first.header_generation),
                    "a different value in each header slot; the header page is corrupt",
                ));
            }
            let (header, slot) = if first.header_generation > second.header_generation {
                (first, 0)
            } else {
                (second, 1)
            };
            Ok(CurrentHeader {
                header,
                slot,
                other_slot_problem: None,
            })
        }
        [Ok(header), Err(problem)] => Ok(CurrentHeader {
            header,
            slot: 0,
            other_slot_problem: Some(problem),
        }),
        [Err(problem), Ok(header)] => Ok(CurrentHeader {
            header,
            slot: 1,
            other_slot_problem: Some(problem),
        }),
        [Err(slot0), Err(slot1)] => Err(WalError::NoValidHeader {
            path: Default::default(),
            slot0: Box::new(slot0),
            slot1: Box::new(slot1),
        }),
    }
}

/// The fixed header in front of a record's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Position of the update in the primary's stream; consecutive in the log.
    pub seq: u64,
    /// Epoch of the primary that sent the update.
    pub epoch: u64,
    /// Where in the volume the payload goes.
    pub offset_bytes: u64,
    /// Payload length; at most [`RECORD_PAYLOAD_MAX_BYTES`].
    pub length_bytes: u32,
    /// [`RECORD_FLAG_FUA`] or 0.
    pub flags: u32,
}

/// Size a record with a payload of `length_bytes` occupies in the ring:
/// header and payload, padded to [`LOG_ALIGN_BYTES`].
pub fn record_size_bytes(length_bytes: u32) -> u64 {
    round_up(
        RECORD_HEADER_SIZE_BYTES as u64 + u64::from(length_bytes),
        LOG_ALIGN_BYTES,
    )
}

/// True if `bytes` starts with the record magic. The scan uses it to tell
/// a slot that was never written (the clean end of the log) from a record
/// that is damaged.
pub fn record_magic_present(bytes: &[u8]) -> bool {
    bytes.len() >= U32_SIZE_BYTES && get_u32(bytes, REC_MAGIC_OFFSET) == RECORD_MAGIC
}

impl RecordHeader {
    /// Size of this record in the ring, see [`record_size_bytes`].
    pub fn size_bytes(&self) -> u64 {
        record_size_bytes(self.length_bytes)
    }

    /// Writes the 64 header bytes into `out[..64]`, the checksum covering
    /// them and `payload`.
    pub fn encode(&self, payload: &[u8], out: &mut [u8]) {
        assert_eq!(
            payload.len(),
            self.length_bytes as usize,
            "record payload length differs from length_bytes"
        );
        let head = self.encode_fields(out);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(head);
        hasher.update(payload);
        put_u32(out, REC_CRC_OFFSET, hasher.finalize());
    }

    /// As [`RecordHeader::encode`], but with the payload's crc32 already
    /// known (e.g. computed while it arrived off the network), so the payload
    /// is not read a second time.
    pub fn encode_with_payload_crc(&self, payload_crc: u32, payload_len: u32, out: &mut [u8]) {
        assert_eq!(
            payload_len, self.length_bytes,
            "record payload length differs from length_bytes"
        );
        let head = self.encode_fields(out);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(head);
        hasher.combine(&crc32fast::Hasher::new_with_initial_len(
            payload_crc,
            u64::from(payload_len),
        ));
        put_u32(out, REC_CRC_OFFSET, hasher.finalize());
    }

    /// Writes every header field but the checksum; returns the bytes the
    /// checksum covers.
    fn encode_fields<'a>(&self, out: &'a mut [u8]) -> &'a [u8] {
        assert!(self.length_bytes <= RECORD_PAYLOAD_MAX_BYTES);
        assert!(self.flags & !RECORD_FLAGS_KNOWN == 0);
        assert!(self.seq >= RECORD_SEQ_FIRST);
        let out = &mut out[..RECORD_HEADER_SIZE_BYTES];
        out.fill(0);
        put_u32(out, REC_MAGIC_OFFSET, RECORD_MAGIC);
        put_u16(out, REC_KIND_OFFSET, RECORD_KIND_UPDATE);
        put_u64(out, REC_SEQ_OFFSET, self.seq);
        put_u64(out, REC_EPOCH_OFFSET, self.epoch);
        put_u64(out, REC_VOLUME_OFFSET_OFFSET, self.offset_bytes);
        put_u32(out, REC_LENGTH_OFFSET, self.length_bytes);
        put_u32(out, REC_FLAGS_OFFSET, self.flags);
        &out[..REC_CRC_OFFSET]
    }

    /// Parses the 64 header bytes at the start of `bytes`. The checksum is
    /// not checked here (it needs the payload): call
    /// [`RecordHeader::verify`] once the payload is read.
    pub fn decode(bytes: &[u8]) -> Result<RecordHeader, WalError> {
        if bytes.len() < RECORD_HEADER_SIZE_BYTES {
            return Err(WalError::field(
                "record header length",
                bytes.len(),
                format!(">= {RECORD_HEADER_SIZE_BYTES} bytes"),
            ));
        }
        let magic = get_u32(bytes, REC_MAGIC_OFFSET);
        if magic != RECORD_MAGIC {
            return Err(WalError::field(
                "record magic",
                format!("{magic:#010x}"),
                format!("{RECORD_MAGIC:#010x} (\"RREC\")"),
            ));
        }
        let kind = get_u16(bytes, REC_KIND_OFFSET);
        if kind != RECORD_KIND_UPDATE {
            return Err(WalError::field("record kind", kind, RECORD_KIND_UPDATE));
        }
        let reserved1 = get_u16(bytes, REC_RESERVED1_OFFSET);
        if reserved1 != 0 {
            return Err(WalError::field("record reserved bytes 6..8", reserved1, 0));
        }
        let reserved2 = &bytes[REC_RESERVED2_OFFSET..REC_CRC_OFFSET];
        if reserved2.iter().any(|&b| b != 0) {
            return Err(WalError::field(
                "record reserved bytes 40..60",
                format!("{reserved2:02x?}"),
                "all zero",
            ));
        }
        let header = RecordHeader {
            seq: get_u64(bytes, REC_SEQ_OFFSET),
            epoch: get_u64(bytes, REC_EPOCH_OFFSET),
            offset_bytes: get_u64(bytes, REC_VOLUME_OFFSET_OFFSET),
            length_bytes: get_u32(bytes, REC_LENGTH_OFFSET),
            flags: get_u32(bytes, REC_FLAGS_OFFSET),
        };
        if header.length_bytes > RECORD_PAYLOAD_MAX_BYTES {
            return Err(WalError::field(
                "record length_bytes",
                header.length_bytes,
                format!("<= {RECORD_PAYLOAD_MAX_BYTES}"),
            ));
        }
        if header.flags & !RECORD_FLAGS_KNOWN != 0 {
            return Err(WalError::field(
                "record flags",
                format!("{:#x}", header.flags),
                format!("only bits {RECORD_FLAGS_KNOWN:#x}"),
            ));
        }
        if header.seq < RECORD_SEQ_FIRST {
            return Err(WalError::field(
                "record seq",
                header.seq,
                format!(">= {RECORD_SEQ_FIRST}"),
            ));
        }
        Ok(header)
    }

    /// Checks the stored checksum against `header_bytes` (the 64 bytes this
    /// header was decoded from) and `payload` (exactly `length_bytes`).
    pub fn verify(&self, header_bytes: &[u8], payload: &[u8]) -> Result<(), WalError> {
        if payload.len() != self.length_bytes as usize {
            return Err(WalError::field(
                "record payload length",
                payload.len(),
                self.length_bytes,
            ));
        }
        let found = get_u32(header_bytes, REC_CRC_OFFSET);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header_bytes[..REC_CRC_OFFSET]);
        hasher.update(payload);
        let computed = hasher.finalize();
        if found != computed {
            return Err(WalError::BadCrc {
                path: Default::default(),
                what: format!("record seq {}", self.seq),
                found,
                computed,
            });
        }
        Ok(())
    }
}

/// Lays out one record (header, payload, zero padding) in a fresh aligned
/// buffer ready for an O_DIRECT write, for tests. The secondary builds its
/// records in pooled buffers, around a payload often received in place
/// ([`complete_record_around_payload`]).
#[cfg(test)]
pub(crate) fn build_record(header: &RecordHeader, payload: &[u8]) -> crate::buf::AlignedBuf {
    let size = usize::try_from(header.size_bytes()).expect("record size fits in memory");
    let mut buf = crate::buf::AlignedBuf::zeroed_around(size, RECORD_PAYLOAD_OFFSET_BYTES, payload);
    header.encode(
        payload,
        &mut buf.as_mut_slice()[..RECORD_PAYLOAD_OFFSET_BYTES],
    );
    buf
}

/// Completes a record whose payload already sits at
/// [`RECORD_PAYLOAD_OFFSET_BYTES`] in `record`, a buffer of exactly the
/// record's size (received there, or copied by the caller): writes the header
/// in front of it and zeroes the padding behind it. The bytes in front and
/// behind may hold anything before. `payload_crc` is the payload's crc32.
pub fn complete_record_around_payload(header: &RecordHeader, payload_crc: u32, record: &mut [u8]) {
    assert_eq!(
        record.len() as u64,
        header.size_bytes(),
        "a record buffer of the record's size"
    );
    let payload_end = RECORD_PAYLOAD_OFFSET_BYTES + header.length_bytes as usize;
    debug_assert_eq!(
        payload_crc,
        crc32fast::hash(&record[RECORD_PAYLOAD_OFFSET_BYTES..payload_end])
    );
    record[payload_end..].fill(0);
    header.encode_with_payload_crc(
        payload_crc,
        header.length_bytes,
        &mut record[..RECORD_PAYLOAD_OFFSET_BYTES],
    );
}

/// Splits a write of `size_bytes` at ring offset `ring_offset` into the part
/// before the end of the ring and the part that wraps to ring offset 0.
/// Both parts are page multiples because every input is.
pub fn split_at_wrap(ring_offset: u64, size_bytes: u64, ring_len_bytes: u64) -> (u64, u64) {
    assert!(ring_offset < ring_len_bytes, "ring offset past the ring");
    assert!(size_bytes <= ring_len_bytes, "write larger than the ring");
    let first = size_bytes.min(ring_len_bytes - ring_offset);
    (first, size_bytes - first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> LogHeader {
        LogHeader {
            volume_uuid: [7; 16],
            node_id: 3,
            log_size_bytes: LOG_SIZE_MIN_BYTES + 8 * LOG_ALIGN_BYTES,
            epoch: 9,
            start_offset: 5 * LOG_ALIGN_BYTES,
            start_seq: 42,
            header_generation: 17,
        }
    }

    fn encoded(h: &LogHeader) -> Vec<u8> {
        let mut page = vec![0u8; LOG_HEADER_SIZE_BYTES as usize];
        h.encode(&mut page);
        page
    }

    /// Rewrites a header field and refreshes the crc, so that the decode
    /// check after the crc is the one that fires.
    fn patched(h: &LogHeader, at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut page = encoded(h);
        page[at..at + bytes.len()].copy_from_slice(bytes);
        let crc = crc32fast::hash(&page[..HDR_CRC_OFFSET]);
        put_u32(&mut page, HDR_CRC_OFFSET, crc);
        page
    }

    fn bad_field(result: Result<LogHeader, WalError>) -> &'static str {
        match result {
            Err(WalError::BadField { field, .. }) => field,
            other => panic!("expected a BadField error, got {other:?}"),
        }
    }

    #[test]
    fn header_round_trip() {
        let h = header();
        let page = encoded(&h);
        assert_eq!(&page[..8], b"RBLKLOG\0");
        assert_eq!(get_u64(&page, 56), h.start_offset);
        assert!(page[HDR_END_OFFSET..].iter().all(|&b| b == 0));
        assert_eq!(LogHeader::decode(&page).unwrap(), h);
        assert_eq!(h.ring_len_bytes(), h.log_size_bytes - 4096);
    }

    #[test]
    fn header_corruptions_refused() {
        let h = header();
        let mut page = encoded(&h);
        page[0] ^= 1;
        assert_eq!(bad_field(LogHeader::decode(&page)), "magic");

        let page = patched(&h, HDR_VERSION_OFFSET, &2u32.to_le_bytes());
        assert_eq!(bad_field(LogHeader::decode(&page)), "format version");

        for byte in [HDR_UUID_OFFSET, HDR_START_SEQ_OFFSET, HDR_CRC_OFFSET] {
            let mut page = encoded(&h);
            page[byte] ^= 0x10;
            assert!(matches!(
                LogHeader::decode(&page),
                Err(WalError::BadCrc { .. })
            ));
        }

        let page = patched(&h, HDR_HEADER_SIZE_OFFSET, &512u32.to_le_bytes());
        assert_eq!(bad_field(LogHeader::decode(&page)), "header_size");

        let page = patched(&h, HDR_RESERVED_OFFSET, &1u32.to_le_bytes());
        assert_eq!(
            bad_field(LogHeader::decode(&page)),
            "header reserved bytes 36..40"
        );

        for size in [LOG_SIZE_MIN_BYTES - LOG_ALIGN_BYTES, LOG_SIZE_MIN_BYTES + 1] {
            let page = patched(&h, HDR_LOG_SIZE_OFFSET, &size.to_le_bytes());
            assert_eq!(bad_field(LogHeader::decode(&page)), "log_size_bytes");
        }

        for start in [h.start_offset + 1, h.ring_len_bytes()] {
            let page = patched(&h, HDR_START_OFFSET_OFFSET, &start.to_le_bytes());
            assert_eq!(bad_field(LogHeader::decode(&page)), "start_offset");
        }

        let page = patched(&h, HDR_START_SEQ_OFFSET, &0u64.to_le_bytes());
        assert_eq!(bad_field(LogHeader::decode(&page)), "start_seq");

        assert_eq!(bad_field(LogHeader::decode(&page[..100])), "header length");
    }

    #[test]
    fn header_error_names_field_and_values() {
        let h = header();
        let page = patched(&h, HDR_HEADER_SIZE_OFFSET, &512u32.to_le_bytes());
        let err = LogHeader::decode(&page)
            .unwrap_err()
            .at(std::path::Path::new("/x/log"));
        assert_eq!(
            err.to_string(),
            "log /x/log: header_size is 512 (expected 4096)"
        );
    }

    /// A header page with `slots[i]` (if any) encoded into slot i.
    fn page_with(slots: [Option<LogHeader>; 2]) -> Vec<u8> {
        let mut page = vec![0u8; LOG_HEADER_SIZE_BYTES as usize];
        for (slot, h) in slots.iter().enumerate() {
            if let Some(h) = h {
                h.encode(&mut page[header_slot_range(slot)]);
            }
        }
        page
    }

    fn generation(g: u64) -> LogHeader {
        LogHeader {
            header_generation: g,
            start_seq: 100 + g,
            ..header()
        }
    }

    #[test]
    fn slot_layout() {
        assert_eq!(header_slot_range(0), 0..128);
        assert_eq!(header_slot_range(1), 512..640);
        assert_eq!(other_slot(0), 1);
        assert_eq!(other_slot(1), 0);
    }

    #[test]
    fn page_uses_the_newest_valid_slot() {
        for (slots, want_slot, want_gen) in [
            ([Some(1), Some(2)], 1, 2),
            ([Some(3), Some(2)], 0, 3),
            ([Some(7), None], 0, 7),
            ([None, Some(8)], 1, 8),
        ] {
            let page = page_with(slots.map(|g| g.map(generation)));
            let current = decode_header_page(&page).unwrap();
            assert_eq!(current.slot, want_slot, "{slots:?}");
            assert_eq!(current.next_slot(), 1 - want_slot);
            assert_eq!(current.header, generation(want_gen));
            assert_eq!(
                current.other_slot_problem.is_some(),
                slots.contains(&None),
                "{slots:?}"
            );
        }
    }

    #[test]
    fn a_damaged_slot_falls_back_to_the_other() {
        // The newer slot torn at every byte: the older one is used.
        let good = page_with([Some(generation(5)), Some(generation(6))]);
        for byte in header_slot_range(1).take(HDR_END_OFFSET) {
            let mut page = good.clone();
            page[byte] ^= 0x20;
            let current = decode_header_page(&page).unwrap();
            assert_eq!(current.slot, 0, "byte {byte}");
            assert_eq!(current.header, generation(5));
            assert!(current.other_slot_problem.is_some());
        }
    }

    #[test]
    fn page_refusals() {
        match decode_header_page(&page_with([None, None])) {
            Err(WalError::NoValidHeader { slot0, slot1, .. }) => {
                assert!(matches!(*slot0, WalError::BadField { field: "magic", .. }));
                assert!(matches!(*slot1, WalError::BadField { field: "magic", .. }));
            }
            other => panic!("expected NoValidHeader, got {other:?}"),
        }

        let mut page = page_with([Some(generation(1)), Some(generation(2))]);
        page[header_slot_range(0).start + HDR_START_SEQ_OFFSET] ^= 1;
        page[header_slot_range(1).start + HDR_VERSION_OFFSET] = 9;
        let err = decode_header_page(&page)
            .unwrap_err()
            .at(std::path::Path::new("/x/log"));
        let text = err.to_string();
        assert!(
            text.starts_with(
                "log /x/log: no valid header in either slot of the header page: \
                 slot 0: header crc32 is 0x"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("; slot 1: format version is 9 (expected 1)"),
            "{text}"
        );

        let page = page_with([Some(generation(4)), Some(generation(4))]);
        assert_eq!(
            bad_field(decode_header_page(&page).map(|c| c.header)),
            "header_generation"
        );
        // Even when the two copies differ otherwise.
        let other = LogHeader {
            start_seq: 1,
            ..generation(4)
        };
        let page = page_with([Some(generation(4)), Some(other)]);
        assert_eq!(
            bad_field(decode_header_page(&page).map(|c| c.header)),
            "header_generation"
        );

        let page = page_with([Some(generation(1)), None]);
        assert_eq!(
            bad_field(decode_header_page(&page[..1024]).map(|c| c.header)),
            "header page length"
        );
    }

    fn record(len: u32) -> (RecordHeader, Vec<u8>) {
        let header = RecordHeader {
            seq: 5,
            epoch: 2,
            offset_bytes: 1 << 30,
            length_bytes: len,
            flags: RECORD_FLAG_FUA,
        };
        let payload = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        (header, payload)
    }

    #[test]
    fn record_sizes() {
        assert_eq!(record_size_bytes(0), 4096);
        assert_eq!(record_size_bytes(4096 - 64), 4096);
        assert_eq!(record_size_bytes(4096 - 63), 8192);
        assert_eq!(RECORD_SIZE_MAX_BYTES, (1 << 20) + 4096);
        assert_eq!(
            record_size_bytes(RECORD_PAYLOAD_MAX_BYTES),
            RECORD_SIZE_MAX_BYTES
        );
        assert_eq!(LOG_SIZE_MIN_BYTES, 4096 + 4 * RECORD_SIZE_MAX_BYTES);
    }

    #[test]
    fn record_round_trip_and_verify() {
        for len in [0, 1, 4032, 4033, 100_000] {
            let (h, payload) = record(len);
            let buf = build_record(&h, &payload);
            assert_eq!(buf.len() as u64, record_size_bytes(len));
            let bytes = buf.as_slice();
            assert_eq!(&bytes[..4], b"RREC");
            assert!(record_magic_present(bytes));
            let decoded = RecordHeader::decode(bytes).unwrap();
            assert_eq!(decoded, h);
            let payload_back = &bytes[RECORD_PAYLOAD_OFFSET_BYTES..][..len as usize];
            assert_eq!(payload_back, &payload[..]);
            decoded.verify(bytes, payload_back).unwrap();
            assert!(bytes[RECORD_PAYLOAD_OFFSET_BYTES + len as usize..]
                .iter()
                .all(|&b| b == 0));
        }
    }

    #[test]
    fn precomputed_payload_crc_gives_the_same_header() {
        for len in [0, 1, 4032, 65_536] {
            let (h, payload) = record(len);
            let mut a = [0u8; RECORD_HEADER_SIZE_BYTES];
            let mut b = [0u8; RECORD_HEADER_SIZE_BYTES];
            h.encode(&payload, &mut a);
            h.encode_with_payload_crc(crc32fast::hash(&payload), len, &mut b);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn any_flipped_bit_is_refused() {
        let (h, payload) = record(300);
        let buf = build_record(&h, &payload);
        let covered = RECORD_HEADER_SIZE_BYTES + payload.len();
        for byte in 0..covered {
            for bit in 0..8 {
                let mut bytes = buf.as_slice()[..covered].to_vec();
                bytes[byte] ^= 1 << bit;
                let refused = match RecordHeader::decode(&bytes) {
                    Err(_) => true,
                    Ok(decoded) => {
                        let len = (decoded.length_bytes as usize).min(covered - 64);
                        decoded.verify(&bytes, &bytes[64..64 + len]).is_err()
                    }
                };
                assert!(refused, "flip of bit {bit} in byte {byte} went unnoticed");
            }
        }
    }

    #[test]
    fn record_decode_refusals() {
        let (h, payload) = record(10);
        let good = build_record(&h, &payload).as_slice()[..64].to_vec();
        let cases: [(usize, &[u8], &str); 5] = [
            (REC_MAGIC_OFFSET, &[0, 0, 0, 0], "record magic"),
            (REC_KIND_OFFSET, &[2, 0], "record kind"),
            (REC_RESERVED1_OFFSET, &[1, 0], "record reserved bytes 6..8"),
            (
                REC_RESERVED2_OFFSET + 3,
                &[1],
                "record reserved bytes 40..60",
            ),
            (REC_FLAGS_OFFSET, &[2, 0, 0, 0], "record flags"),
        ];
        for (at, bytes, want) in cases {
            let mut h = good.clone();
            h[at..at + bytes.len()].copy_from_slice(bytes);
            match RecordHeader::decode(&h) {
                Err(WalError::BadField { field, .. }) => assert_eq!(field, want),
                other => panic!("{want}: got {other:?}"),
            }
        }
        let mut long = good.clone();
        put_u32(&mut long, REC_LENGTH_OFFSET, RECORD_PAYLOAD_MAX_BYTES + 1);
        assert!(matches!(
            RecordHeader::decode(&long),
            Err(WalError::BadField {
                field: "record length_bytes",
                ..
            })
        ));
    }

    #[test]
    fn wrap_split() {
        assert_eq!(split_at_wrap(0, 8192, 16384), (8192, 0));
        assert_eq!(split_at_wrap(8192, 8192, 16384), (8192, 0));
        assert_eq!(split_at_wrap(12288, 8192, 16384), (4096, 4096));
    }
}
