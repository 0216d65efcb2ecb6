//! Frame layout, encoding and decoding.
//!
//! A frame is a 16-byte header followed by a kind-specific body; the layout
//! is specified byte by byte in docs/PROTOCOL.md and mirrored by the offset
//! constants below (`*_AT` = byte offset from the start of the header or of
//! the body). Each offset is built from the previous one so a field can only
//! move by changing the field before it, and compile-time assertions tie the
//! last field to the documented size.

use super::error::ProtoError;
use std::fmt;

/// Bytes 0..4 of every frame: "RBLK" when read as bytes.
pub const FRAME_MAGIC: u32 = 0x4B4C_4252;

/// The only protocol version this build speaks; carried in every header and
/// in Hello.
pub const PROTOCOL_VERSION: u16 = 1;

/// Size of the header preceding every body.
pub const FRAME_HEADER_SIZE_BYTES: usize = 16;

/// Size of the fixed part of an Update body, before the data.
pub const UPDATE_FIXED_SIZE_BYTES: usize = 40;

/// Largest data payload of one Update; bounds what a receiver must buffer.
pub const UPDATE_DATA_MAX_BYTES: usize = 1 << 20;

/// Largest body of any frame (an Update carrying the largest payload). A
/// header announcing more is refused before its body is read.
pub const FRAME_BODY_MAX_BYTES: usize = UPDATE_FIXED_SIZE_BYTES + UPDATE_DATA_MAX_BYTES;

/// Longest message of an Error frame; longer messages are cut when encoding.
pub const ERROR_MESSAGE_MAX_BYTES: usize = 1024;

/// Update flag: the write must be durable on the secondary before it is
/// acknowledged (the initiator asked for Force Unit Access).
pub const UPDATE_FLAG_FUA: u32 = 1;

/// Every Update flag this version understands; any other bit is refused so a
/// newer peer's semantics are never silently dropped.
pub const UPDATE_FLAGS_KNOWN: u32 = UPDATE_FLAG_FUA;

/// Body size of Hello.
pub const HELLO_BODY_SIZE_BYTES: usize = 32;
/// Body size of Ack.
pub const ACK_BODY_SIZE_BYTES: usize = 24;
/// Body size of AllAcked.
pub const ALL_ACKED_BODY_SIZE_BYTES: usize = 8;
/// Body size of Flush.
pub const FLUSH_BODY_SIZE_BYTES: usize = 8;
/// Body size of LogStateQuery.
pub const LOG_STATE_QUERY_BODY_SIZE_BYTES: usize = 0;
/// Body size of LogState.
pub const LOG_STATE_BODY_SIZE_BYTES: usize = 40;
/// Body size of LogRead.
pub const LOG_READ_BODY_SIZE_BYTES: usize = 16;
/// Body size of LogReadEnd.
pub const LOG_READ_END_BODY_SIZE_BYTES: usize = 8;
/// Size of the fixed part of a VolumeState body, before its members.
pub const VOLUME_STATE_FIXED_SIZE_BYTES: usize = 32;
/// Size of each member entry of a VolumeState body.
pub const VOLUME_STATE_MEMBER_SIZE_BYTES: usize = 24;
/// Most members a VolumeState may list: as many secondaries as a volume
/// may have (`core::ack_tracker::MEMBERS_MAX`).
pub const VOLUME_STATE_MEMBERS_MAX: usize = 64;
/// Largest VolumeState body.
pub const VOLUME_STATE_BODY_MAX_BYTES: usize =
    VOLUME_STATE_FIXED_SIZE_BYTES + VOLUME_STATE_MEMBERS_MAX * VOLUME_STATE_MEMBER_SIZE_BYTES;
/// VolumeState member flag: its connection is up.
pub const VOLUME_MEMBER_FLAG_CONNECTED: u32 = 1;
/// Every VolumeState member flag this version understands.
pub const VOLUME_MEMBER_FLAGS_KNOWN: u32 = VOLUME_MEMBER_FLAG_CONNECTED;
/// Size of the fixed part of an Error body, before the message.
pub const ERROR_FIXED_SIZE_BYTES: usize = 8;
/// Largest Error body.
pub const ERROR_BODY_MAX_BYTES: usize = ERROR_FIXED_SIZE_BYTES + ERROR_MESSAGE_MAX_BYTES;

const U8_SIZE_BYTES: usize = 1;
const U16_SIZE_BYTES: usize = 2;
const U32_SIZE_BYTES: usize = 4;
const U64_SIZE_BYTES: usize = 8;
const UUID_SIZE_BYTES: usize = 16;

// Header.
const HEADER_MAGIC_AT: usize = 0;
const HEADER_VERSION_AT: usize = HEADER_MAGIC_AT + U32_SIZE_BYTES;
const HEADER_KIND_AT: usize = HEADER_VERSION_AT + U16_SIZE_BYTES;
const HEADER_RESERVED_AT: usize = HEADER_KIND_AT + U8_SIZE_BYTES;
const HEADER_BODY_LEN_AT: usize = HEADER_RESERVED_AT + U8_SIZE_BYTES;
const HEADER_CRC_AT: usize = HEADER_BODY_LEN_AT + U32_SIZE_BYTES;
const _: () = assert!(HEADER_CRC_AT + U32_SIZE_BYTES == FRAME_HEADER_SIZE_BYTES);
/// The crc covers the header up to, not including, itself.
const HEADER_CRC_COVERED_BYTES: usize = HEADER_CRC_AT;

// Hello.
const HELLO_VOLUME_UUID_AT: usize = 0;
const HELLO_NODE_ID_AT: usize = HELLO_VOLUME_UUID_AT + UUID_SIZE_BYTES;
const HELLO_PROTOCOL_VERSION_AT: usize = HELLO_NODE_ID_AT + U32_SIZE_BYTES;
const HELLO_ROLE_AT: usize = HELLO_PROTOCOL_VERSION_AT + U16_SIZE_BYTES;
const HELLO_RESERVED_AT: usize = HELLO_ROLE_AT + U8_SIZE_BYTES;
const HELLO_EPOCH_AT: usize = HELLO_RESERVED_AT + U8_SIZE_BYTES;
const _: () = assert!(HELLO_EPOCH_AT + U64_SIZE_BYTES == HELLO_BODY_SIZE_BYTES);

// Update (fixed part; the data follows it).
const UPDATE_SEQ_AT: usize = 0;
const UPDATE_EPOCH_AT: usize = UPDATE_SEQ_AT + U64_SIZE_BYTES;
const UPDATE_OFFSET_AT: usize = UPDATE_EPOCH_AT + U64_SIZE_BYTES;
const UPDATE_LENGTH_AT: usize = UPDATE_OFFSET_AT + U64_SIZE_BYTES;
const UPDATE_FLAGS_AT: usize = UPDATE_LENGTH_AT + U32_SIZE_BYTES;
const UPDATE_ALL_ACKED_SEQ_AT: usize = UPDATE_FLAGS_AT + U32_SIZE_BYTES;
const _: () = assert!(UPDATE_ALL_ACKED_SEQ_AT + U64_SIZE_BYTES == UPDATE_FIXED_SIZE_BYTES);

// Ack.
const ACK_LOGGED_SEQ_AT: usize = 0;
const ACK_DURABLE_SEQ_AT: usize = ACK_LOGGED_SEQ_AT + U64_SIZE_BYTES;
const ACK_CLEARED_SEQ_AT: usize = ACK_DURABLE_SEQ_AT + U64_SIZE_BYTES;
const _: () = assert!(ACK_CLEARED_SEQ_AT + U64_SIZE_BYTES == ACK_BODY_SIZE_BYTES);

// AllAcked and Flush.
const ALL_ACKED_SEQ_AT: usize = 0;
const _: () = assert!(ALL_ACKED_SEQ_AT + U64_SIZE_BYTES == ALL_ACKED_BODY_SIZE_BYTES);
const FLUSH_SEQ_AT: usize = 0;
const _: () = assert!(FLUSH_SEQ_AT + U64_SIZE_BYTES == FLUSH_BODY_SIZE_BYTES);

// LogState.
const LOG_STATE_EPOCH_AT: usize = 0;
const LOG_STATE_START_SEQ_AT: usize = LOG_STATE_EPOCH_AT + U64_SIZE_BYTES;
const LOG_STATE_NEXT_SEQ_AT: usize = LOG_STATE_START_SEQ_AT + U64_SIZE_BYTES;
const LOG_STATE_APPLIED_SEQ_AT: usize = LOG_STATE_NEXT_SEQ_AT + U64_SIZE_BYTES;
const LOG_STATE_USED_BYTES_AT: usize = LOG_STATE_APPLIED_SEQ_AT + U64_SIZE_BYTES;
const _: () = assert!(LOG_STATE_USED_BYTES_AT + U64_SIZE_BYTES == LOG_STATE_BODY_SIZE_BYTES);

// LogRead and LogReadEnd.
const LOG_READ_FROM_SEQ_AT: usize = 0;
const LOG_READ_TO_SEQ_AT: usize = LOG_READ_FROM_SEQ_AT + U64_SIZE_BYTES;
const _: () = assert!(LOG_READ_TO_SEQ_AT + U64_SIZE_BYTES == LOG_READ_BODY_SIZE_BYTES);
const LOG_READ_END_NEXT_SEQ_AT: usize = 0;
const _: () = assert!(LOG_READ_END_NEXT_SEQ_AT + U64_SIZE_BYTES == LOG_READ_END_BODY_SIZE_BYTES);

// VolumeState (fixed part; `member_count` member entries follow it).
const VOLUME_STATE_EPOCH_AT: usize = 0;
const VOLUME_STATE_NEXT_SEQ_AT: usize = VOLUME_STATE_EPOCH_AT + U64_SIZE_BYTES;
const VOLUME_STATE_ALL_ACKED_SEQ_AT: usize = VOLUME_STATE_NEXT_SEQ_AT + U64_SIZE_BYTES;
const VOLUME_STATE_IN_FLIGHT_AT: usize = VOLUME_STATE_ALL_ACKED_SEQ_AT + U64_SIZE_BYTES;
const VOLUME_STATE_MEMBER_COUNT_AT: usize = VOLUME_STATE_IN_FLIGHT_AT + U32_SIZE_BYTES;
const _: () =
    assert!(VOLUME_STATE_MEMBER_COUNT_AT + U32_SIZE_BYTES == VOLUME_STATE_FIXED_SIZE_BYTES);
// One member entry, from its own start.
const VOLUME_MEMBER_NODE_ID_AT: usize = 0;
const VOLUME_MEMBER_FLAGS_AT: usize = VOLUME_MEMBER_NODE_ID_AT + U32_SIZE_BYTES;
const VOLUME_MEMBER_LOG_FULL_WAITS_AT: usize = VOLUME_MEMBER_FLAGS_AT + U32_SIZE_BYTES;
const VOLUME_MEMBER_LOG_FULL_WAIT_MS_AT: usize = VOLUME_MEMBER_LOG_FULL_WAITS_AT + U64_SIZE_BYTES;
const _: () =
    assert!(VOLUME_MEMBER_LOG_FULL_WAIT_MS_AT + U64_SIZE_BYTES == VOLUME_STATE_MEMBER_SIZE_BYTES);

// Error (fixed part; the message follows it).
const ERROR_CODE_AT: usize = 0;
const ERROR_MESSAGE_LEN_AT: usize = ERROR_CODE_AT + U32_SIZE_BYTES;
const ERROR_RESERVED_AT: usize = ERROR_MESSAGE_LEN_AT + U16_SIZE_BYTES;
const _: () = assert!(ERROR_RESERVED_AT + U16_SIZE_BYTES == ERROR_FIXED_SIZE_BYTES);

// The message length is a u16 on the wire.
const _: () = assert!(ERROR_MESSAGE_MAX_BYTES <= u16::MAX as usize);
// body_len is a u32 on the wire.
const _: () = assert!(FRAME_BODY_MAX_BYTES <= u32::MAX as usize);
// FrameHeader::decode relies on every kind's bound being within the global one.
const _: () = assert!(ERROR_BODY_MAX_BYTES <= FRAME_BODY_MAX_BYTES);
const _: () = assert!(VOLUME_STATE_BODY_MAX_BYTES <= FRAME_BODY_MAX_BYTES);

/// What a frame carries; the byte at header offset 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Identifies the sender at connection start.
    Hello = 1,
    /// One write to replicate, with its data.
    Update,
    /// Cumulative acknowledgement from a secondary.
    Ack,
    /// Every secondary has acknowledged up to a seq.
    AllAcked,
    /// Request to make updates durable.
    Flush,
    /// A tool asks for the log's state.
    LogStateQuery,
    /// The state of a node's log.
    LogState,
    /// The sender refuses something and will close the connection.
    Error,
    /// A restarted primary asks a secondary for records of its log.
    LogRead,
    /// The last record asked for by a LogRead has been sent.
    LogReadEnd,
    /// A primary tells a tool how its volume stands.
    VolumeState,
}

impl FrameKind {
    /// Name used in error messages and logs.
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Hello => "Hello",
            FrameKind::Update => "Update",
            FrameKind::Ack => "Ack",
            FrameKind::AllAcked => "AllAcked",
            FrameKind::Flush => "Flush",
            FrameKind::LogStateQuery => "LogStateQuery",
            FrameKind::LogState => "LogState",
            FrameKind::Error => "Error",
            FrameKind::LogRead => "LogRead",
            FrameKind::LogReadEnd => "LogReadEnd",
            FrameKind::VolumeState => "VolumeState",
        }
    }

    /// The smallest and largest body this kind may have; equal for the
    /// fixed-size kinds.
    pub fn body_len_bounds(self) -> (usize, usize) {
        let fixed = |n| (n, n);
        match self {
            FrameKind::Hello => fixed(HELLO_BODY_SIZE_BYTES),
            FrameKind::Update => (UPDATE_FIXED_SIZE_BYTES + 1, FRAME_BODY_MAX_BYTES),
            FrameKind::Ack => fixed(ACK_BODY_SIZE_BYTES),
            FrameKind::AllAcked => fixed(ALL_ACKED_BODY_SIZE_BYTES),
            FrameKind::Flush => fixed(FLUSH_BODY_SIZE_BYTES),
            FrameKind::LogStateQuery => fixed(LOG_STATE_QUERY_BODY_SIZE_BYTES),
            FrameKind::LogState => fixed(LOG_STATE_BODY_SIZE_BYTES),
            FrameKind::Error => (ERROR_FIXED_SIZE_BYTES, ERROR_BODY_MAX_BYTES),
            FrameKind::LogRead => fixed(LOG_READ_BODY_SIZE_BYTES),
            FrameKind::LogReadEnd => fixed(LOG_READ_END_BODY_SIZE_BYTES),
            FrameKind::VolumeState => (VOLUME_STATE_FIXED_SIZE_BYTES, VOLUME_STATE_BODY_MAX_BYTES),
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<u8> for FrameKind {
    type Error = ProtoError;

    fn try_from(kind: u8) -> Result<Self, ProtoError> {
        Ok(match kind {
            1 => FrameKind::Hello,
            2 => FrameKind::Update,
            3 => FrameKind::Ack,
            4 => FrameKind::AllAcked,
            5 => FrameKind::Flush,
            6 => FrameKind::LogStateQuery,
            7 => FrameKind::LogState,
            8 => FrameKind::Error,
            9 => FrameKind::LogRead,
            10 => FrameKind::LogReadEnd,
            11 => FrameKind::VolumeState,
            _ => return Err(ProtoError::UnknownKind { kind }),
        })
    }
}

/// What the sender of a Hello is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// The node that takes writes and fans them out.
    Primary = 1,
    /// A node that logs and applies the primary's updates.
    Secondary = 2,
    /// An administrative client (ctl, resync) rather than a replica.
    Tool = 3,
}

impl TryFrom<u8> for Role {
    type Error = ProtoError;

    fn try_from(role: u8) -> Result<Self, ProtoError> {
        match role {
            1 => Ok(Role::Primary),
            2 => Ok(Role::Secondary),
            3 => Ok(Role::Tool),
            _ => Err(ProtoError::BadField {
                kind: FrameKind::Hello,
                field: "role",
                reason: format!("unknown role {role} (known: 1 primary, 2 secondary, 3 tool)"),
            }),
        }
    }
}

/// Why a peer refused something; the code of an Error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// A frame could not be decoded.
    BadFrame,
    /// The Hello named a different volume.
    WrongVolume,
    /// The peer's epoch is older than ours.
    StaleEpoch,
    /// An update lies outside the volume.
    OutOfRange,
    /// The peer's log does not continue ours; a resync is needed.
    OutOfSync,
    /// The Hello's protocol version is not spoken here.
    ProtocolVersion,
    /// The peer cannot serve the request now.
    Busy,
    /// The peer failed for a reason of its own.
    Internal,
    /// A LogRead asked for records the log does not hold.
    NotInLog,
    /// A code this build does not know; kept rather than refused so that a
    /// newer peer's Error is still reported with its message.
    Unknown(u32),
}

impl From<u32> for ErrorCode {
    fn from(code: u32) -> Self {
        match code {
            1 => ErrorCode::BadFrame,
            2 => ErrorCode::WrongVolume,
            3 => ErrorCode::StaleEpoch,
            4 => ErrorCode::OutOfRange,
            5 => ErrorCode::OutOfSync,
            6 => ErrorCode::ProtocolVersion,
            7 => ErrorCode::Busy,
            8 => ErrorCode::Internal,
            9 => ErrorCode::NotInLog,
            other => ErrorCode::Unknown(other),
        }
    }
}

impl From<ErrorCode> for u32 {
    fn from(code: ErrorCode) -> u32 {
        match code {
            ErrorCode::BadFrame => 1,
            ErrorCode::WrongVolume => 2,
            ErrorCode::StaleEpoch => 3,
            ErrorCode::OutOfRange => 4,
            ErrorCode::OutOfSync => 5,
            ErrorCode::ProtocolVersion => 6,
            ErrorCode::Busy => 7,
            ErrorCode::Internal => 8,
            ErrorCode::NotInLog => 9,
            ErrorCode::Unknown(other) => other,
        }
    }
}

/// The decoded 16-byte header. Magic, version and reserved byte are checked
/// by [`FrameHeader::decode`] and not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the body holds.
    pub kind: FrameKind,
    /// Number of body bytes following the header.
    pub body_len: u32,
    /// crc32 of header bytes 0..12 followed by the body.
    pub crc32: u32,
}

impl FrameHeader {
    /// Decodes and validates a header, including the body length for its
    /// kind, so a reader can refuse an oversized or misshapen frame before
    /// reading (or allocating for) its body.
    pub fn decode(bytes: &[u8; FRAME_HEADER_SIZE_BYTES]) -> Result<FrameHeader, ProtoError> {
        let magic = le_u32(bytes, HEADER_MAGIC_AT);
        if magic != FRAME_MAGIC {
            return Err(ProtoError::BadMagic { found: magic });
        }
        let version = le_u16(bytes, HEADER_VERSION_AT);
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::UnsupportedVersion {
                found: version,
                supported: PROTOCOL_VERSION,
            });
        }
        let kind = FrameKind::try_from(bytes[HEADER_KIND_AT])?;
        let reserved = bytes[HEADER_RESERVED_AT];
        if reserved != 0 {
            return Err(ProtoError::BadField {
                kind,
                field: "header.reserved",
                reason: format!("must be 0, found {reserved}"),
            });
        }
        let body_len = le_u32(bytes, HEADER_BODY_LEN_AT);
        // Compare in u64 so no platform's usize can truncate the announced length.
        let announced = u64::from(body_len);
        let (min, max) = kind.body_len_bounds();
        // Every kind's bound is at most FRAME_BODY_MAX_BYTES, so these checks
        // also refuse anything beyond it, from the header alone.
        if min == max {
            if announced != min as u64 {
                return Err(ProtoError::WrongBodyLength {
                    kind,
                    body_len,
                    expected: min,
                });
            }
        } else if announced > max as u64 {
            return Err(ProtoError::Oversized {
                kind,
                body_len,
                max,
            });
        } else if announced < min as u64 {
            return Err(ProtoError::Undersized {
                kind,
                body_len,
                min,
            });
        }
        Ok(FrameHeader {
            kind,
            body_len,
            crc32: le_u32(bytes, HEADER_CRC_AT),
        })
    }

    /// Header plus body size, i.e. how many bytes the whole frame occupies.
    pub fn frame_len(&self) -> usize {
        // body_len was bounded by FRAME_BODY_MAX_BYTES in decode, so it fits.
        FRAME_HEADER_SIZE_BYTES + self.body_len as usize
    }
}

/// Hello body: who the sender is and which volume and epoch it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The replicated volume; a mismatch means the peer is misconfigured.
    pub volume_uuid: [u8; 16],
    /// Sender's node id.
    pub node_id: u32,
    /// Version the sender speaks; checked by the conversation, not the decoder,
    /// so the refusal can be answered with Error ProtocolVersion.
    pub protocol_version: u16,
    /// Primary, secondary or tool.
    pub role: Role,
    /// Sender's epoch.
    pub epoch: u64,
}

impl Hello {
    /// Why a node serving `volume_uuid` refuses this Hello, if it does:
    /// another volume, or a protocol version not spoken here. The role
    /// and the epoch are for the conversation to judge.
    pub fn refusal(&self, volume_uuid: [u8; 16]) -> Option<ErrorFrame> {
        if self.volume_uuid != volume_uuid {
            return Some(ErrorFrame::new(
                ErrorCode::WrongVolume,
                format!(
                    "peer node {} serves volume {}, this node serves {}",
                    self.node_id,
                    uuid::Uuid::from_bytes(self.volume_uuid),
                    uuid::Uuid::from_bytes(volume_uuid)
                ),
            ));
        }
        if self.protocol_version != PROTOCOL_VERSION {
            return Some(ErrorFrame::new(
                ErrorCode::ProtocolVersion,
                format!(
                    "protocol version {} unsupported (this node speaks {PROTOCOL_VERSION})",
                    self.protocol_version
                ),
            ));
        }
        None
    }
}

/// Fixed part of an Update body; the data follows it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateHeader {
    /// Position in the primary's update stream.
    pub seq: u64,
    /// Epoch of the primary that issued the update.
    pub epoch: u64,
    /// Byte offset of the write in the volume.
    pub offset_bytes: u64,
    /// Length of the data.
    pub length_bytes: u32,
    /// `UPDATE_FLAG_*` bits.
    pub flags: u32,
    /// Piggybacked all-acked point (0 = none), saving a separate AllAcked.
    pub all_acked_seq: u64,
}

impl UpdateHeader {
    /// Whether the update must be durable before it is acknowledged.
    pub fn fua(&self) -> bool {
        self.flags & UPDATE_FLAG_FUA != 0
    }
}

/// Ack body. Both points are cumulative: every update with seq at or below
/// them is covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Every update with seq <= this is in the sender's log.
    pub logged_seq: u64,
    /// Every update with seq <= this is fdatasynced.
    pub durable_seq: u64,
    /// Every update with seq <= this is cleared from the log: its ring space
    /// is free again. The primary never sends more than the log can hold.
    pub cleared_seq: u64,
}

/// LogState body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogState {
    /// Epoch recorded in the node's log.
    pub epoch: u64,
    /// Seq of the oldest update not yet cleared; equals `next_seq` when the
    /// log is empty.
    pub start_seq: u64,
    /// Seq the next appended update will have.
    pub next_seq: u64,
    /// Highest seq applied to the node's copy.
    pub applied_seq: u64,
    /// Ring bytes held by records not yet cleared.
    pub used_bytes: u64,
}

/// VolumeState body: how a primary's volume stands, for tools. A primary
/// sends it after its Hello to a tool's Hello, in place of the LogState a
/// secondary sends (a primary keeps no log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeState {
    /// The primary's epoch.
    pub epoch: u64,
    /// The seq the next write gets.
    pub next_seq: u64,
    /// Every update up to here is acknowledged by every secondary of its set.
    pub all_acked_seq: u64,
    /// Updates in the primary's window (sent, or waiting to be).
    pub in_flight: u32,
    /// Each secondary, in config order; at most
    /// [`VOLUME_STATE_MEMBERS_MAX`].
    pub members: Vec<VolumeMember>,
}

/// One secondary in a [`VolumeState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeMember {
    /// Its node id.
    pub node_id: u32,
    /// Whether the primary's connection to it is up.
    pub connected: bool,
    /// Times its log held the stream back for room, since the primary
    /// started.
    pub log_full_waits: u64,
    /// Milliseconds of those waits.
    pub log_full_wait_ms: u64,
}

/// Error body: a code for programs and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// Why the sender refused.
    pub code: ErrorCode,
    /// Human-readable detail; cut to [`ERROR_MESSAGE_MAX_BYTES`] on encoding.
    pub message: String,
}

impl ErrorFrame {
    /// Builds an Error body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorFrame {
        ErrorFrame {
            code,
            message: message.into(),
        }
    }
}

/// One decoded frame. Update data borrows from the buffer the frame was
/// decoded from, so a payload is never copied on the receive path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// A write to replicate.
    Update {
        /// The fixed part.
        header: UpdateHeader,
        /// `header.length_bytes` bytes of data.
        data: &'a [u8],
    },
    /// See [`Ack`].
    Ack(Ack),
    /// Every update up to `seq` is acknowledged by every secondary it was
    /// sent to.
    AllAcked {
        /// The all-acked point.
        seq: u64,
    },
    /// Make every update up to `seq` durable, then Ack with durable_seq >= seq.
    Flush {
        /// The point to make durable.
        seq: u64,
    },
    /// Ask for a [`LogState`].
    LogStateQuery,
    /// See [`LogState`].
    LogState(LogState),
    /// See [`ErrorFrame`].
    Error(ErrorFrame),
    /// A restarted primary asks for the records with seqs in
    /// `from_seq..to_seq`; answered with one Update per record, carrying
    /// the record's own seq, epoch, offset, flags and data (all_acked_seq
    /// 0), then [`Frame::LogReadEnd`], or with an Error.
    LogRead {
        /// First seq wanted.
        from_seq: u64,
        /// One past the last seq wanted.
        to_seq: u64,
    },
    /// Every record a LogRead asked for has been sent.
    LogReadEnd {
        /// The seq after the last record sent: the LogRead's `to_seq`.
        next_seq: u64,
    },
    /// See [`VolumeState`].
    VolumeState(VolumeState),
}

impl Frame<'_> {
    /// The kind this frame is sent as.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::Update { .. } => FrameKind::Update,
            Frame::Ack(_) => FrameKind::Ack,
            Frame::AllAcked { .. } => FrameKind::AllAcked,
            Frame::Flush { .. } => FrameKind::Flush,
            Frame::LogStateQuery => FrameKind::LogStateQuery,
            Frame::LogState(_) => FrameKind::LogState,
            Frame::Error(_) => FrameKind::Error,
            Frame::LogRead { .. } => FrameKind::LogRead,
            Frame::LogReadEnd { .. } => FrameKind::LogReadEnd,
            Frame::VolumeState(_) => FrameKind::VolumeState,
        }
    }

    /// Appends the whole frame, header and body, to `out`.
    ///
    /// An Error message longer than [`ERROR_MESSAGE_MAX_BYTES`] is cut at a
    /// character boundary: the message is diagnostic and must not stop the
    /// Error from being sent. For an Update the caller keeps
    /// `header.length_bytes == data.len()` and the data within
    /// [`UPDATE_DATA_MAX_BYTES`]; debug builds assert it, release builds send
    /// what they are given and the receiver refuses it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        push_header_without_crc(out, self.kind());
        match self {
            Frame::Hello(h) => {
                out.extend_from_slice(&h.volume_uuid);
                out.extend_from_slice(&h.node_id.to_le_bytes());
                out.extend_from_slice(&h.protocol_version.to_le_bytes());
                out.push(h.role as u8);
                out.push(0);
                out.extend_from_slice(&h.epoch.to_le_bytes());
            }
            Frame::Update { header, data } => {
                debug_assert_eq!(header.length_bytes as usize, data.len());
                debug_assert!(data.len() <= UPDATE_DATA_MAX_BYTES);
                push_update_fixed(out, header);
                out.extend_from_slice(data);
            }
            Frame::Ack(a) => {
                out.extend_from_slice(&a.logged_seq.to_le_bytes());
                out.extend_from_slice(&a.durable_seq.to_le_bytes());
                out.extend_from_slice(&a.cleared_seq.to_le_bytes());
            }
            Frame::AllAcked { seq } | Frame::Flush { seq } => {
                out.extend_from_slice(&seq.to_le_bytes());
            }
            Frame::LogRead { from_seq, to_seq } => {
                out.extend_from_slice(&from_seq.to_le_bytes());
                out.extend_from_slice(&to_seq.to_le_bytes());
            }
            Frame::LogReadEnd { next_seq } => {
                out.extend_from_slice(&next_seq.to_le_bytes());
            }
            Frame::LogStateQuery => {}
            Frame::LogState(s) => {
                out.extend_from_slice(&s.epoch.to_le_bytes());
                out.extend_from_slice(&s.start_seq.to_le_bytes());
                out.extend_from_slice(&s.next_seq.to_le_bytes());
                out.extend_from_slice(&s.applied_seq.to_le_bytes());
                out.extend_from_slice(&s.used_bytes.to_le_bytes());
            }
            Frame::VolumeState(v) => {
                debug_assert!(v.members.len() <= VOLUME_STATE_MEMBERS_MAX);
                out.extend_from_slice(&v.epoch.to_le_bytes());
                out.extend_from_slice(&v.next_seq.to_le_bytes());
                out.extend_from_slice(&v.all_acked_seq.to_le_bytes());
                out.extend_from_slice(&v.in_flight.to_le_bytes());
                // Fits: at most VOLUME_STATE_MEMBERS_MAX members.
                out.extend_from_slice(&(v.members.len() as u32).to_le_bytes());
                for member in &v.members {
                    let flags = if member.connected {
                        VOLUME_MEMBER_FLAG_CONNECTED
                    } else {
                        0
                    };
                    out.extend_from_slice(&member.node_id.to_le_bytes());
                    out.extend_from_slice(&flags.to_le_bytes());
                    out.extend_from_slice(&member.log_full_waits.to_le_bytes());
                    out.extend_from_slice(&member.log_full_wait_ms.to_le_bytes());
                }
            }
            Frame::Error(e) => {
                let message = cut_at_char_boundary(&e.message, ERROR_MESSAGE_MAX_BYTES);
                // Fits: cut to ERROR_MESSAGE_MAX_BYTES, asserted <= u16::MAX above.
                let message_len = message.len() as u16;
                out.extend_from_slice(&u32::from(e.code).to_le_bytes());
                out.extend_from_slice(&message_len.to_le_bytes());
                out.extend_from_slice(&0u16.to_le_bytes());
                out.extend_from_slice(message.as_bytes());
            }
        }
        let body_len = (out.len() - start - FRAME_HEADER_SIZE_BYTES) as u32;
        set_body_len(out, start, body_len);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&out[start..start + HEADER_CRC_COVERED_BYTES]);
        hasher.update(&out[start + FRAME_HEADER_SIZE_BYTES..]);
        set_crc(out, start, hasher.finalize());
    }
}

/// crc32 of an Update's data alone, as [`encode_update_header`] wants it.
/// Computed once per update and shared by every destination.
pub fn data_crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// Appends the frame header and the Update fixed part (56 bytes) for the
/// zero-copy send path: the data is sent from its own buffer right after, and
/// the result is byte-identical to [`Frame::encode`] of the same Update.
///
/// The frame crc must cover the data, but reading a 1 MiB payload once per
/// destination would cost more than sending it; `data_crc32` (from
/// [`data_crc32`]) is combined in instead, using `header.length_bytes` as the
/// data length.
pub fn encode_update_header(header: &UpdateHeader, data_crc32: u32, out: &mut Vec<u8>) {
    debug_assert!(header.length_bytes as usize <= UPDATE_DATA_MAX_BYTES);
    let start = out.len();
    push_header_without_crc(out, FrameKind::Update);
    push_update_fixed(out, header);
    // Fits: length_bytes is a u32 and UPDATE_FIXED_SIZE_BYTES is 40, so the
    // sum only wraps for lengths far beyond UPDATE_DATA_MAX_BYTES.
    let body_len = (UPDATE_FIXED_SIZE_BYTES as u32).wrapping_add(header.length_bytes);
    set_body_len(out, start, body_len);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&out[start..start + HEADER_CRC_COVERED_BYTES]);
    hasher.update(&out[start + FRAME_HEADER_SIZE_BYTES..]);
    hasher.combine(&crc32fast::Hasher::new_with_initial_len(
        data_crc32,
        u64::from(header.length_bytes),
    ));
    set_crc(out, start, hasher.finalize());
}

/// Decodes a body whose header was already decoded with
/// [`FrameHeader::decode`]: checks the length and the crc, then every field.
/// `body` must be exactly the `header.body_len` bytes after the header.
pub fn decode_body<'a>(
    header: &FrameHeader,
    header_bytes: &[u8; FRAME_HEADER_SIZE_BYTES],
    body: &'a [u8],
) -> Result<Frame<'a>, ProtoError> {
    decode_checked_body(header, header_bytes, body).map(|(frame, _)| frame)
}

/// As [`decode_body`], also returning, for an Update, the crc32 of its data
/// alone: the crc check computes it anyway, and a log record that covers
/// the same data combines it instead of reading the data again.
fn decode_checked_body<'a>(
    header: &FrameHeader,
    header_bytes: &[u8; FRAME_HEADER_SIZE_BYTES],
    body: &'a [u8],
) -> Result<(Frame<'a>, Option<u32>), ProtoError> {
    // The crc covers the raw bytes, so they, not the caller's struct, say
    // what the body is; refuse if the two disagree.
    let decoded = FrameHeader::decode(header_bytes)?;
    if decoded != *header {
        return Err(ProtoError::HeaderMismatch {
            given: *header,
            decoded,
        });
    }
    let kind = header.kind;
    if u64::from(header.body_len) != body.len() as u64 {
        return Err(ProtoError::BodyBufferLength {
            kind,
            body_len: header.body_len,
            given: body.len(),
        });
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header_bytes[..HEADER_CRC_COVERED_BYTES]);
    let data_crc32 = match (kind, body.split_at_checked(UPDATE_FIXED_SIZE_BYTES)) {
        (FrameKind::Update, Some((fixed, data))) => {
            let data_crc32 = data_crc32(data);
            hasher.update(fixed);
            hasher.combine(&crc32fast::Hasher::new_with_initial_len(
                data_crc32,
                data.len() as u64,
            ));
            Some(data_crc32)
        }
        _ => {
            hasher.update(body);
            None
        }
    };
    let computed = hasher.finalize();
    if computed != header.crc32 {
        return Err(ProtoError::BadCrc {
            kind,
            expected: header.crc32,
            computed,
        });
    }
    let frame = match kind {
        FrameKind::Hello => decode_hello(exact(kind, header.body_len, body)?),
        FrameKind::Update => decode_update(header.body_len, body),
        FrameKind::Ack => {
            let b: &[u8; ACK_BODY_SIZE_BYTES] = exact(kind, header.body_len, body)?;
            Ok(Frame::Ack(Ack {
                logged_seq: le_u64(b, ACK_LOGGED_SEQ_AT),
                durable_seq: le_u64(b, ACK_DURABLE_SEQ_AT),
                cleared_seq: le_u64(b, ACK_CLEARED_SEQ_AT),
            }))
        }
        FrameKind::AllAcked => {
            let b: &[u8; ALL_ACKED_BODY_SIZE_BYTES] = exact(kind, header.body_len, body)?;
            Ok(Frame::AllAcked {
                seq: le_u64(b, ALL_ACKED_SEQ_AT),
            })
        }
        FrameKind::Flush => {
            let b: &[u8; FLUSH_BODY_SIZE_BYTES] = exact(kind, header.body_len, body)?;
            Ok(Frame::Flush {
                seq: le_u64(b, FLUSH_SEQ_AT),
            })
        }
        FrameKind::LogStateQuery => {
            let _: &[u8; LOG_STATE_QUERY_BODY_SIZE_BYTES] = exact(kind, header.body_len, body)?;
            Ok(Frame::LogStateQuery)
        }
        FrameKind::LogState => {
            let b: &[u8; LOG_STATE_BODY_SIZE_BYTES] = exact(kind, header.body_len, body)?;
            Ok(Frame::LogState(LogState {
                epoch: le_u64(b, LOG_STATE_EPOCH_AT),
                start_seq: le_u64(b, LOG_STATE_START_SEQ_AT),
                next_seq: le_u64(b, LOG_STATE_NEXT_SEQ_AT),
                applied_seq: le_u64(b, LOG_STATE_APPLIED_SEQ_AT),
                used_bytes: le_u64(b, LOG_STATE_USED_BYTES_AT),
            }))
        }
        FrameKind::Error => decode_error(header.body_len, body),
        FrameKind::VolumeState => decode_volume_state(header.body_len, body),
        FrameKind::LogRead => {
            let b: &[u8; LOG_READ_BODY_SIZE_BYTES] = exact(kind, header.body_len, body)?;
            Ok(Frame::LogRead {
                from_seq: le_u64(b, LOG_READ_FROM_SEQ_AT),
                to_seq: le_u64(b, LOG_READ_TO_SEQ_AT),
            })
        }
        FrameKind::LogReadEnd => {
            let b: &[u8; LOG_READ_END_BODY_SIZE_BYTES] = exact(kind, header.body_len, body)?;
            Ok(Frame::LogReadEnd {
                next_seq: le_u64(b, LOG_READ_END_NEXT_SEQ_AT),
            })
        }
    }?;
    Ok((frame, data_crc32))
}

/// Decodes the first frame of `bytes` and returns it with the number of
/// bytes it occupied. A buffer that ends early gives
/// [`ProtoError::Truncated`] with the total bytes needed, so a streaming
/// reader reads more and calls again; a header that can never be valid
/// (oversized, wrong length for its kind, ...) is refused as soon as its 16
/// bytes are present, and a wrong magic as soon as its 4 bytes are.
pub fn decode_frame(bytes: &[u8]) -> Result<(Frame<'_>, usize), ProtoError> {
    decode_frame_with_data_crc(bytes).map(|(frame, length, _)| (frame, length))
}

/// As [`decode_frame`], with the crc32 of an Update's data alone (see
/// [`data_crc32`]); `None` for every other kind.
pub fn decode_frame_with_data_crc(
    bytes: &[u8],
) -> Result<(Frame<'_>, usize, Option<u32>), ProtoError> {
    let (header, header_bytes, body) = split_frame(bytes)?;
    let (frame, data_crc32) = decode_checked_body(&header, header_bytes, body)?;
    Ok((frame, header.frame_len(), data_crc32))
}

/// The length of the first frame of `bytes` once all of it is there, with
/// the errors of [`decode_frame`] for its header (a wrong magic, an
/// oversized or ill-formed header, [`ProtoError::Truncated`]) but without
/// reading its body: a streaming reader waits on this, then decodes the
/// frame, and so checks each frame's crc once.
pub fn frame_length(bytes: &[u8]) -> Result<usize, ProtoError> {
    split_frame(bytes).map(|(header, _, _)| header.frame_len())
}

/// The first frame's header, decoded, its bytes and its body.
fn split_frame(
    bytes: &[u8],
) -> Result<(FrameHeader, &[u8; FRAME_HEADER_SIZE_BYTES], &[u8]), ProtoError> {
    let Some((header_bytes, rest)) = bytes.split_first_chunk::<FRAME_HEADER_SIZE_BYTES>() else {
        // Garbage need not wait for a whole header to be refused.
        if let Some(magic) = bytes.first_chunk::<U32_SIZE_BYTES>() {
            let found = u32::from_le_bytes(*magic);
            if found != FRAME_MAGIC {
                return Err(ProtoError::BadMagic { found });
            }
        }
        return Err(ProtoError::Truncated {
            needed: FRAME_HEADER_SIZE_BYTES,
            have: bytes.len(),
        });
    };
    let header = FrameHeader::decode(header_bytes)?;
    let frame_len = header.frame_len();
    let Some(body) = rest.get(..frame_len - FRAME_HEADER_SIZE_BYTES) else {
        return Err(ProtoError::Truncated {
            needed: frame_len,
            have: bytes.len(),
        });
    };
    Ok((header, header_bytes, body))
}

fn decode_hello(b: &[u8; HELLO_BODY_SIZE_BYTES]) -> Result<Frame<'static>, ProtoError> {
    let mut volume_uuid = [0u8; UUID_SIZE_BYTES];
    volume_uuid.copy_from_slice(&b[HELLO_VOLUME_UUID_AT..HELLO_VOLUME_UUID_AT + UUID_SIZE_BYTES]);
    let role = Role::try_from(b[HELLO_ROLE_AT])?;
    let reserved = b[HELLO_RESERVED_AT];
    if reserved != 0 {
        return Err(ProtoError::BadField {
            kind: FrameKind::Hello,
            field: "reserved",
            reason: format!("must be 0, found {reserved}"),
        });
    }
    Ok(Frame::Hello(Hello {
        volume_uuid,
        node_id: le_u32(b, HELLO_NODE_ID_AT),
        protocol_version: le_u16(b, HELLO_PROTOCOL_VERSION_AT),
        role,
        epoch: le_u64(b, HELLO_EPOCH_AT),
    }))
}

fn decode_update(body_len: u32, body: &[u8]) -> Result<Frame<'_>, ProtoError> {
    let kind = FrameKind::Update;
    let Some((b, data)) = body.split_first_chunk::<UPDATE_FIXED_SIZE_BYTES>() else {
        return Err(ProtoError::Undersized {
            kind,
            body_len,
            min: UPDATE_FIXED_SIZE_BYTES + 1,
        });
    };
    let header = UpdateHeader {
        seq: le_u64(b, UPDATE_SEQ_AT),
        epoch: le_u64(b, UPDATE_EPOCH_AT),
        offset_bytes: le_u64(b, UPDATE_OFFSET_AT),
        length_bytes: le_u32(b, UPDATE_LENGTH_AT),
        flags: le_u32(b, UPDATE_FLAGS_AT),
        all_acked_seq: le_u64(b, UPDATE_ALL_ACKED_SEQ_AT),
    };
    let unknown = header.flags & !UPDATE_FLAGS_KNOWN;
    if unknown != 0 {
        return Err(ProtoError::BadField {
            kind,
            field: "flags",
            reason: format!(
                "unknown bits 0x{unknown:08x} set in 0x{:08x} (known: 0x{UPDATE_FLAGS_KNOWN:08x})",
                header.flags
            ),
        });
    }
    if header.length_bytes == 0 {
        return Err(ProtoError::BadField {
            kind,
            field: "length_bytes",
            reason: "must be > 0, found 0".into(),
        });
    }
    if u64::from(header.length_bytes) > UPDATE_DATA_MAX_BYTES as u64 {
        return Err(ProtoError::BadField {
            kind,
            field: "length_bytes",
            reason: format!(
                "{} exceeds the limit of {UPDATE_DATA_MAX_BYTES} bytes",
                header.length_bytes
            ),
        });
    }
    // In range: length_bytes was just bounded by UPDATE_DATA_MAX_BYTES.
    let expected = UPDATE_FIXED_SIZE_BYTES + header.length_bytes as usize;
    if data.len() != header.length_bytes as usize {
        return Err(ProtoError::WrongBodyLength {
            kind,
            body_len,
            expected,
        });
    }
    // A write whose end does not fit in a u64 cannot lie inside any volume,
    // and refusing it here spares every consumer the overflow check.
    if header
        .offset_bytes
        .checked_add(u64::from(header.length_bytes))
        .is_none()
    {
        return Err(ProtoError::BadField {
            kind,
            field: "offset_bytes",
            reason: format!(
                "offset {} + length {} overflows u64",
                header.offset_bytes, header.length_bytes
            ),
        });
    }
    Ok(Frame::Update { header, data })
}

fn decode_volume_state(body_len: u32, body: &[u8]) -> Result<Frame<'static>, ProtoError> {
    let kind = FrameKind::VolumeState;
    let Some((b, entries)) = body.split_first_chunk::<VOLUME_STATE_FIXED_SIZE_BYTES>() else {
        return Err(ProtoError::Undersized {
            kind,
            body_len,
            min: VOLUME_STATE_FIXED_SIZE_BYTES,
        });
    };
    let member_count = le_u32(b, VOLUME_STATE_MEMBER_COUNT_AT) as usize;
    if member_count > VOLUME_STATE_MEMBERS_MAX {
        return Err(ProtoError::BadField {
            kind,
            field: "member_count",
            reason: format!("{member_count} exceeds the limit of {VOLUME_STATE_MEMBERS_MAX}"),
        });
    }
    if entries.len() != member_count * VOLUME_STATE_MEMBER_SIZE_BYTES {
        return Err(ProtoError::WrongBodyLength {
            kind,
            body_len,
            expected: VOLUME_STATE_FIXED_SIZE_BYTES + member_count * VOLUME_STATE_MEMBER_SIZE_BYTES,
        });
    }
    let mut members = Vec::with_capacity(member_count);
    for entry in entries.chunks_exact(VOLUME_STATE_MEMBER_SIZE_BYTES) {
        let entry: &[u8; VOLUME_STATE_MEMBER_SIZE_BYTES] =
            entry.try_into().expect("chunks_exact yields whole entries");
        let flags = le_u32(entry, VOLUME_MEMBER_FLAGS_AT);
        if flags & !VOLUME_MEMBER_FLAGS_KNOWN != 0 {
            return Err(ProtoError::BadField {
                kind,
                field: "flags",
                reason: format!(
                    "member {} has unknown flags {flags:#x} (known: {VOLUME_MEMBER_FLAGS_KNOWN:#x})",
                    members.len()
                ),
            });
        }
        members.push(VolumeMember {
            node_id: le_u32(entry, VOLUME_MEMBER_NODE_ID_AT),
            connected: flags & VOLUME_MEMBER_FLAG_CONNECTED != 0,
            log_full_waits: le_u64(entry, VOLUME_MEMBER_LOG_FULL_WAITS_AT),
            log_full_wait_ms: le_u64(entry, VOLUME_MEMBER_LOG_FULL_WAIT_MS_AT),
        });
    }
    Ok(Frame::VolumeState(VolumeState {
        epoch: le_u64(b, VOLUME_STATE_EPOCH_AT),
        next_seq: le_u64(b, VOLUME_STATE_NEXT_SEQ_AT),
        all_acked_seq: le_u64(b, VOLUME_STATE_ALL_ACKED_SEQ_AT),
        in_flight: le_u32(b, VOLUME_STATE_IN_FLIGHT_AT),
        members,
    }))
}

fn decode_error(body_len: u32, body: &[u8]) -> Result<Frame<'static>, ProtoError> {
    let kind = FrameKind::Error;
    let Some((b, message)) = body.split_first_chunk::<ERROR_FIXED_SIZE_BYTES>() else {
        return Err(ProtoError::Undersized {
            kind,
            body_len,
            min: ERROR_FIXED_SIZE_BYTES,
        });
    };
    let code = ErrorCode::from(le_u32(b, ERROR_CODE_AT));
    let message_len = le_u16(b, ERROR_MESSAGE_LEN_AT);
    if usize::from(message_len) > ERROR_MESSAGE_MAX_BYTES {
        return Err(ProtoError::BadField {
            kind,
            field: "message_len",
            reason: format!("{message_len} exceeds the limit of {ERROR_MESSAGE_MAX_BYTES} bytes"),
        });
    }
    let reserved = le_u16(b, ERROR_RESERVED_AT);
    if reserved != 0 {
        return Err(ProtoError::BadField {
            kind,
            field: "reserved",
            reason: format!("must be 0, found {reserved}"),
        });
    }
    if message.len() != usize::from(message_len) {
        return Err(ProtoError::WrongBodyLength {
            kind,
            body_len,
            expected: ERROR_FIXED_SIZE_BYTES + usize::from(message_len),
        });
    }
    let message = std::str::from_utf8(message).map_err(|e| ProtoError::BadField {
        kind,
        field: "message",
        reason: format!("invalid UTF-8 after {} valid bytes", e.valid_up_to()),
    })?;
    Ok(Frame::Error(ErrorFrame {
        code,
        message: message.to_owned(),
    }))
}

/// Views a fixed-size body as an array so field reads need no bounds checks
/// that could fail on input.
fn exact<const N: usize>(
    kind: FrameKind,
    body_len: u32,
    body: &[u8],
) -> Result<&[u8; N], ProtoError> {
    body.try_into().map_err(|_| ProtoError::WrongBodyLength {
        kind,
        body_len,
        expected: N,
    })
}

// Field readers. Offsets are the layout constants above and the arrays have
// the layout's fixed sizes, so the slicing cannot depend on input.
fn le_u16<const N: usize>(b: &[u8; N], at: usize) -> u16 {
    let mut x = [0u8; U16_SIZE_BYTES];
    x.copy_from_slice(&b[at..at + U16_SIZE_BYTES]);
    u16::from_le_bytes(x)
}

fn le_u32<const N: usize>(b: &[u8; N], at: usize) -> u32 {
    let mut x = [0u8; U32_SIZE_BYTES];
    x.copy_from_slice(&b[at..at + U32_SIZE_BYTES]);
    u32::from_le_bytes(x)
}

fn le_u64<const N: usize>(b: &[u8; N], at: usize) -> u64 {
    let mut x = [0u8; U64_SIZE_BYTES];
    x.copy_from_slice(&b[at..at + U64_SIZE_BYTES]);
    u64::from_le_bytes(x)
}

/// Pushes a header with body_len and crc zeroed; both are filled in once the
/// body has been written.
fn push_header_without_crc(out: &mut Vec<u8>, kind: FrameKind) {
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
}

fn push_update_fixed(out: &mut Vec<u8>, h: &UpdateHeader) {
    out.extend_from_slice(&h.seq.to_le_bytes());
    out.extend_from_slice(&h.epoch.to_le_bytes());
    out.extend_from_slice(&h.offset_bytes.to_le_bytes());
    out.extend_from_slice(&h.length_bytes.to_le_bytes());
    out.extend_from_slice(&h.flags.to_le_bytes());
    out.extend_from_slice(&h.all_acked_seq.to_le_bytes());
}

fn set_body_len(out: &mut [u8], start: usize, body_len: u32) {
    let at = start + HEADER_BODY_LEN_AT;
    out[at..at + U32_SIZE_BYTES].copy_from_slice(&body_len.to_le_bytes());
}

fn set_crc(out: &mut [u8], start: usize, crc: u32) {
    let at = start + HEADER_CRC_AT;
    out[at..at + U32_SIZE_BYTES].copy_from_slice(&crc.to_le_bytes());
}

fn cut_at_char_boundary(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(frame: &Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        frame.encode(&mut out);
        out
    }

    fn update_header(data: &[u8]) -> UpdateHeader {
        UpdateHeader {
            seq: 42,
            epoch: 7,
            offset_bytes: 4096 * 3,
            length_bytes: data.len() as u32,
            flags: UPDATE_FLAG_FUA,
            all_acked_seq: 40,
        }
    }

    /// One frame of every kind, with field values that differ byte by byte so
    /// a misplaced field shows up.
    fn samples(data: &[u8]) -> Vec<Frame<'_>> {
        vec![
            Frame::Hello(Hello {
                volume_uuid: *b"0123456789abcdef",
                node_id: 0x0a0b_0c0d,
                protocol_version: PROTOCOL_VERSION,
                role: Role::Primary,
                epoch: 0x1122_3344_5566_7788,
            }),
            Frame::Update {
                header: update_header(data),
                data,
            },
            Frame::Ack(Ack {
                logged_seq: 100,
                durable_seq: 98,
                cleared_seq: 90,
            }),
            Frame::AllAcked { seq: 97 },
            Frame::Flush { seq: 101 },
            Frame::LogStateQuery,
            Frame::LogState(LogState {
                epoch: 3,
                start_seq: 10,
                next_seq: 20,
                applied_seq: 19,
                used_bytes: 81920,
            }),
            Frame::Error(ErrorFrame::new(ErrorCode::StaleEpoch, "epoch 3 < 5 ✓")),
            Frame::LogRead {
                from_seq: 0x0102_0304_0506_0708,
                to_seq: 0x1112_1314_1516_1718,
            },
            Frame::LogReadEnd {
                next_seq: 0x2122_2324_2526_2728,
            },
            Frame::VolumeState(VolumeState {
                epoch: 0x3132_3334_3536_3738,
                next_seq: 0x4142_4344_4546_4748,
                all_acked_seq: 0x5152_5354_5556_5758,
                in_flight: 0x6162_6364,
                members: vec![
                    VolumeMember {
                        node_id: 2,
                        connected: true,
                        log_full_waits: 0x7172_7374_7576_7778,
                        log_full_wait_ms: 0x8182_8384_8586_8788,
                    },
                    VolumeMember {
                        node_id: 3,
                        connected: false,
                        log_full_waits: 0,
                        log_full_wait_ms: 0,
                    },
                ],
            }),
        ]
    }

    /// Recomputes the crc of a whole encoded frame after a test edits it, so
    /// the edit reaches the field checks instead of stopping at the crc.
    fn reseal(frame: &mut [u8]) {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&frame[..HEADER_CRC_COVERED_BYTES]);
        hasher.update(&frame[FRAME_HEADER_SIZE_BYTES..]);
        let crc = hasher.finalize();
        set_crc(frame, 0, crc);
    }

    fn header_only(kind: u8, body_len: u32) -> [u8; FRAME_HEADER_SIZE_BYTES] {
        let mut h = [0u8; FRAME_HEADER_SIZE_BYTES];
        h[..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        h[6] = kind;
        h[8..12].copy_from_slice(&body_len.to_le_bytes());
        h
    }

    #[test]
    fn crc_is_iso_hdlc() {
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn golden_flush_bytes() {
        // Independently computed (Python zlib.crc32) to pin layout and crc rule.
        let bytes = encode(&Frame::Flush {
            seq: 0x0102_0304_0506_0708,
        });
        let golden = [
            0x52, 0x42, 0x4c, 0x4b, // "RBLK"
            0x01, 0x00, // version 1
            0x05, 0x00, // Flush, reserved
            0x08, 0x00, 0x00, 0x00, // body_len 8
            0x21, 0xcf, 0x08, 0x8b, // crc32 0x8b08cf21
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01,
        ];
        assert_eq!(bytes, golden);
    }

    #[test]
    fn golden_log_read_bytes() {
        // Independently computed (Python zlib.crc32), as in docs/PROTOCOL.md.
        let bytes = encode(&Frame::LogRead {
            from_seq: 1000,
            to_seq: 1100,
        });
        let golden = [
            0x52, 0x42, 0x4c, 0x4b, // "RBLK"
            0x01, 0x00, // version 1
            0x09, 0x00, // LogRead, reserved
            0x10, 0x00, 0x00, 0x00, // body_len 16
            0xbe, 0x0e, 0x0b, 0xd1, // crc32 0xd10b0ebe
            0xe8, 0x03, 0, 0, 0, 0, 0, 0, // from_seq 1000
            0x4c, 0x04, 0, 0, 0, 0, 0, 0, // to_seq 1100
        ];
        assert_eq!(bytes, golden);
        let bytes = encode(&Frame::LogReadEnd { next_seq: 1100 });
        let golden = [
            0x52, 0x42, 0x4c, 0x4b, 0x01, 0x00, 0x0a, 0x00, 0x08, 0x00, 0x00, 0x00, 0x2a, 0xba,
            0x0f, 0x97, 0x4c, 0x04, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(bytes, golden);
    }

    #[test]
    fn every_kind_round_trips() {
        let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        for frame in samples(&data) {
            let mut bytes = encode(&frame);
            let len = bytes.len();
            bytes.extend_from_slice(b"next frame");
            let (decoded, used) = decode_frame(&bytes).unwrap();
            assert_eq!(decoded, frame);
            assert_eq!(used, len);
            assert_eq!(decoded.kind(), frame.kind());
        }
    }

    #[test]
    fn the_data_crc_comes_with_updates_only_and_is_the_datas_own() {
        let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        for frame in samples(&data) {
            let bytes = encode(&frame);
            let (decoded, _, data_crc) = decode_frame_with_data_crc(&bytes).unwrap();
            match decoded {
                Frame::Update { data, .. } => assert_eq!(data_crc, Some(crc32fast::hash(data))),
                other => assert_eq!(data_crc, None, "{other:?}"),
            }
        }
        // Data and crc that disagree are refused as before, the check now
        // combining the data's crc into the frame's.
        let mut bytes = encode(&Frame::Update {
            header: update_header(&data),
            data: &data,
        });
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            decode_frame_with_data_crc(&bytes),
            Err(ProtoError::BadCrc { .. })
        ));
    }

    #[test]
    fn update_data_is_borrowed_not_copied() {
        let data = vec![9u8; 300];
        let bytes = encode(&Frame::Update {
            header: update_header(&data),
            data: &data,
        });
        let (frame, _) = decode_frame(&bytes).unwrap();
        let Frame::Update { data: got, .. } = frame else {
            panic!("not an update: {frame:?}");
        };
        let body_start =
            bytes.as_ptr() as usize + FRAME_HEADER_SIZE_BYTES + UPDATE_FIXED_SIZE_BYTES;
        assert_eq!(got.as_ptr() as usize, body_start);
    }

    #[test]
    fn frame_length_waits_for_the_whole_frame_and_leaves_the_crc_to_decode_frame() {
        let mut bytes = Vec::new();
        Frame::Flush { seq: 5 }.encode(&mut bytes);
        assert_eq!(frame_length(&bytes).unwrap(), bytes.len());
        assert!(frame_length(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .is_truncated());
        // A flipped body bit: the frame is whole, its crc is wrong, and the
        // reader learns so from decode_frame.
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(frame_length(&bytes).unwrap(), bytes.len());
        assert!(matches!(
            decode_frame(&bytes),
            Err(ProtoError::BadCrc { .. })
        ));
        assert!(matches!(
            frame_length(b"XXXX"),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn header_then_body_decoding_matches_decode_frame() {
        let data = [1u8, 2, 3];
        for frame in samples(&data) {
            let bytes = encode(&frame);
            let header_bytes: [u8; 16] = bytes[..16].try_into().unwrap();
            let header = FrameHeader::decode(&header_bytes).unwrap();
            assert_eq!(header.kind, frame.kind());
            assert_eq!(header.frame_len(), bytes.len());
            let decoded = decode_body(&header, &header_bytes, &bytes[16..]).unwrap();
            assert_eq!(decoded, frame);
        }
    }

    #[test]
    fn zero_copy_update_header_matches_full_encoding() {
        for len in [
            1usize,
            2,
            3,
            15,
            16,
            17,
            511,
            4096,
            65_537,
            UPDATE_DATA_MAX_BYTES,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            for flags in [0, UPDATE_FLAG_FUA] {
                let header = UpdateHeader {
                    flags,
                    ..update_header(&data)
                };
                let full = encode(&Frame::Update {
                    header,
                    data: &data,
                });
                let mut split = vec![0xEE]; // appending must leave earlier bytes alone
                encode_update_header(&header, data_crc32(&data), &mut split);
                assert_eq!(
                    split.len(),
                    1 + FRAME_HEADER_SIZE_BYTES + UPDATE_FIXED_SIZE_BYTES
                );
                split.extend_from_slice(&data);
                assert_eq!(split[0], 0xEE);
                assert_eq!(&split[1..], &full[..], "length {len}");
            }
        }
    }

    #[test]
    fn encode_appends_after_existing_bytes() {
        let mut out = b"prefix".to_vec();
        Frame::Flush { seq: 5 }.encode(&mut out);
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(decode_frame(&out[6..]).unwrap().0, Frame::Flush { seq: 5 });
    }

    #[test]
    fn every_bit_and_byte_flip_is_refused() {
        let data = [0x5Au8; 24];
        for frame in samples(&data) {
            let bytes = encode(&frame);
            for i in 0..bytes.len() {
                let mut masks: Vec<u8> = (0..8).map(|b| 1u8 << b).collect();
                masks.push(0xFF);
                for mask in masks {
                    let mut damaged = bytes.clone();
                    damaged[i] ^= mask;
                    let result = decode_frame(&damaged);
                    assert!(
                        result.is_err(),
                        "{} frame: flipping byte {i} with {mask:#04x} was accepted: {result:?}",
                        frame.kind()
                    );
                }
            }
        }
    }

    #[test]
    fn every_truncation_is_reported_as_truncated() {
        let data = [3u8; 10];
        for frame in samples(&data) {
            let bytes = encode(&frame);
            for n in 0..bytes.len() {
                let err = decode_frame(&bytes[..n]).unwrap_err();
                assert!(err.is_truncated(), "{} cut at {n}: {err}", frame.kind());
                let needed = if n < FRAME_HEADER_SIZE_BYTES {
                    FRAME_HEADER_SIZE_BYTES
                } else {
                    bytes.len()
                };
                assert_eq!(err, ProtoError::Truncated { needed, have: n });
            }
        }
    }

    #[test]
    fn oversized_is_refused_from_the_header_alone() {
        let over = (FRAME_BODY_MAX_BYTES + 1) as u32;
        let h = header_only(FrameKind::Update as u8, over);
        let expected = ProtoError::Oversized {
            kind: FrameKind::Update,
            body_len: over,
            max: FRAME_BODY_MAX_BYTES,
        };
        assert_eq!(FrameHeader::decode(&h).unwrap_err(), expected);
        assert_eq!(decode_frame(&h).unwrap_err(), expected);
        let h = header_only(FrameKind::Update as u8, u32::MAX);
        assert!(matches!(
            decode_frame(&h),
            Err(ProtoError::Oversized { .. })
        ));
        // The largest legal Update still only asks for more bytes.
        let h = header_only(FrameKind::Update as u8, FRAME_BODY_MAX_BYTES as u32);
        assert!(decode_frame(&h).unwrap_err().is_truncated());
        // Error frames have their own, smaller bound.
        let h = header_only(FrameKind::Error as u8, (ERROR_BODY_MAX_BYTES + 1) as u32);
        assert_eq!(
            decode_frame(&h).unwrap_err(),
            ProtoError::Oversized {
                kind: FrameKind::Error,
                body_len: (ERROR_BODY_MAX_BYTES + 1) as u32,
                max: ERROR_BODY_MAX_BYTES,
            }
        );
    }

    #[test]
    fn undersized_variable_kinds_are_refused_from_the_header() {
        let h = header_only(FrameKind::Update as u8, UPDATE_FIXED_SIZE_BYTES as u32);
        assert_eq!(
            decode_frame(&h).unwrap_err(),
            ProtoError::Undersized {
                kind: FrameKind::Update,
                body_len: 40,
                min: 41,
            }
        );
        let h = header_only(FrameKind::Error as u8, 7);
        assert!(matches!(
            decode_frame(&h),
            Err(ProtoError::Undersized { min: 8, .. })
        ));
    }

    #[test]
    fn golden_volume_state_bytes() {
        let frame = Frame::VolumeState(VolumeState {
            epoch: 5,
            next_seq: 9,
            all_acked_seq: 8,
            in_flight: 1,
            members: vec![VolumeMember {
                node_id: 2,
                connected: true,
                log_full_waits: 3,
                log_full_wait_ms: 4,
            }],
        });
        let bytes = encode(&frame);
        assert_eq!(bytes.len(), FRAME_HEADER_SIZE_BYTES + 32 + 24);
        assert_eq!(bytes[HEADER_KIND_AT], 11);
        let body = &bytes[FRAME_HEADER_SIZE_BYTES..];
        let mut expected = Vec::new();
        for field in [5u64, 9, 8] {
            expected.extend_from_slice(&field.to_le_bytes());
        }
        for field in [1u32, 1, 2, 1] {
            expected.extend_from_slice(&field.to_le_bytes());
        }
        for field in [3u64, 4] {
            expected.extend_from_slice(&field.to_le_bytes());
        }
        assert_eq!(body, expected.as_slice());
    }

    #[test]
    fn volume_state_member_count_and_flags_are_checked() {
        let frame = samples(&[]).pop().expect("the VolumeState sample");
        assert_eq!(frame.kind(), FrameKind::VolumeState);
        let good = encode(&frame);
        // One member fewer than the count says.
        let mut short = good[..good.len() - VOLUME_STATE_MEMBER_SIZE_BYTES].to_vec();
        let body_len = (short.len() - FRAME_HEADER_SIZE_BYTES) as u32;
        set_body_len(&mut short, 0, body_len);
        reseal(&mut short);
        assert_eq!(
            decode_frame(&short).unwrap_err(),
            ProtoError::WrongBodyLength {
                kind: FrameKind::VolumeState,
                body_len: (VOLUME_STATE_FIXED_SIZE_BYTES + VOLUME_STATE_MEMBER_SIZE_BYTES) as u32,
                expected: VOLUME_STATE_FIXED_SIZE_BYTES + 2 * VOLUME_STATE_MEMBER_SIZE_BYTES,
            }
        );
        // A count past the limit, whatever the length.
        let mut many = good.clone();
        let count_at = FRAME_HEADER_SIZE_BYTES + VOLUME_STATE_MEMBER_COUNT_AT;
        many[count_at..count_at + 4].copy_from_slice(&65u32.to_le_bytes());
        reseal(&mut many);
        assert!(matches!(
            decode_frame(&many),
            Err(ProtoError::BadField {
                field: "member_count",
                ..
            })
        ));
        // A flag this version does not know, on the second member.
        let mut flagged = good;
        let flags_at = FRAME_HEADER_SIZE_BYTES
            + VOLUME_STATE_FIXED_SIZE_BYTES
            + VOLUME_STATE_MEMBER_SIZE_BYTES
            + VOLUME_MEMBER_FLAGS_AT;
        flagged[flags_at] = 2;
        reseal(&mut flagged);
        let error = decode_frame(&flagged).unwrap_err();
        assert!(
            matches!(&error, ProtoError::BadField { field: "flags", reason, .. } if reason.contains("member 1")),
            "{error:?}"
        );
    }

    #[test]
    fn fixed_kinds_with_wrong_length_are_refused() {
        for (kind, size) in [
            (FrameKind::Hello, HELLO_BODY_SIZE_BYTES),
            (FrameKind::Ack, ACK_BODY_SIZE_BYTES),
            (FrameKind::AllAcked, ALL_ACKED_BODY_SIZE_BYTES),
            (FrameKind::Flush, FLUSH_BODY_SIZE_BYTES),
            (FrameKind::LogStateQuery, LOG_STATE_QUERY_BODY_SIZE_BYTES),
            (FrameKind::LogState, LOG_STATE_BODY_SIZE_BYTES),
        ] {
            for body_len in [size + 1, size.wrapping_sub(1), 1 << 30] {
                if body_len == size || body_len > u32::MAX as usize {
                    continue;
                }
                let h = header_only(kind as u8, body_len as u32);
                assert_eq!(
                    decode_frame(&h).unwrap_err(),
                    ProtoError::WrongBodyLength {
                        kind,
                        body_len: body_len as u32,
                        expected: size,
                    }
                );
            }
        }
    }

    #[test]
    fn unknown_kind_bad_magic_wrong_version_reserved_header_byte() {
        let good = encode(&Frame::Flush { seq: 1 });
        for kind in [0u8, 12, 200, 255] {
            let mut b = good.clone();
            b[HEADER_KIND_AT] = kind;
            assert_eq!(
                decode_frame(&b).unwrap_err(),
                ProtoError::UnknownKind { kind }
            );
        }
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(
            decode_frame(&b),
            Err(ProtoError::BadMagic { found }) if found == 0x4B4C_4258
        ));
        // A wrong magic needs only its own four bytes to be refused.
        assert!(matches!(
            decode_frame(&b[..4]),
            Err(ProtoError::BadMagic { .. })
        ));
        let mut b = good.clone();
        b[HEADER_VERSION_AT] = 2;
        assert_eq!(
            decode_frame(&b).unwrap_err(),
            ProtoError::UnsupportedVersion {
                found: 2,
                supported: PROTOCOL_VERSION,
            }
        );
        let mut b = good;
        b[HEADER_RESERVED_AT] = 1;
        assert!(matches!(
            decode_frame(&b),
            Err(ProtoError::BadField {
                field: "header.reserved",
                ..
            })
        ));
    }

    #[test]
    fn bad_crc_names_both_values() {
        let mut b = encode(&Frame::Ack(Ack {
            logged_seq: 1,
            durable_seq: 1,
            cleared_seq: 0,
        }));
        let last = b.len() - 1;
        b[last] ^= 1;
        let err = decode_frame(&b).unwrap_err();
        let ProtoError::BadCrc {
            kind,
            expected,
            computed,
        } = err
        else {
            panic!("wrong error {err:?}");
        };
        assert_eq!(kind, FrameKind::Ack);
        assert_eq!(
            expected,
            u32::from_le_bytes(
                b[HEADER_CRC_AT..FRAME_HEADER_SIZE_BYTES]
                    .try_into()
                    .unwrap()
            )
        );
        assert_ne!(expected, computed);
    }

    #[test]
    fn unknown_update_flag_bits_are_refused() {
        let data = [1u8; 8];
        for bit in 1..32 {
            let header = UpdateHeader {
                flags: UPDATE_FLAG_FUA | (1 << bit),
                ..update_header(&data)
            };
            let b = encode(&Frame::Update {
                header,
                data: &data,
            });
            let err = decode_frame(&b).unwrap_err();
            assert!(
                matches!(
                    err,
                    ProtoError::BadField {
                        kind: FrameKind::Update,
                        field: "flags",
                        ..
                    }
                ),
                "bit {bit}: {err:?}"
            );
        }
    }

    #[test]
    fn update_length_field_is_checked() {
        let data = [1u8; 8];
        let base = encode(&Frame::Update {
            header: update_header(&data),
            data: &data,
        });
        let at = FRAME_HEADER_SIZE_BYTES + UPDATE_LENGTH_AT;
        let with_length = |length: u32| {
            let mut b = base.clone();
            b[at..at + 4].copy_from_slice(&length.to_le_bytes());
            reseal(&mut b);
            decode_frame(&b).unwrap_err()
        };
        assert!(matches!(
            with_length(0),
            ProtoError::BadField {
                field: "length_bytes",
                ..
            }
        ));
        assert!(matches!(
            with_length(UPDATE_DATA_MAX_BYTES as u32 + 1),
            ProtoError::BadField {
                field: "length_bytes",
                ..
            }
        ));
        assert_eq!(
            with_length(9),
            ProtoError::WrongBodyLength {
                kind: FrameKind::Update,
                body_len: 48,
                expected: 49,
            }
        );
        assert_eq!(
            with_length(7),
            ProtoError::WrongBodyLength {
                kind: FrameKind::Update,
                body_len: 48,
                expected: 47,
            }
        );
    }

    #[test]
    fn update_past_end_of_u64_is_refused() {
        let data = [1u8; 8];
        let header = UpdateHeader {
            offset_bytes: u64::MAX - 7,
            ..update_header(&data)
        };
        let b = encode(&Frame::Update {
            header,
            data: &data,
        });
        assert!(matches!(
            decode_frame(&b),
            Err(ProtoError::BadField {
                field: "offset_bytes",
                ..
            })
        ));
        let header = UpdateHeader {
            offset_bytes: u64::MAX - 8,
            ..header
        };
        let b = encode(&Frame::Update {
            header,
            data: &data,
        });
        assert!(decode_frame(&b).is_ok());
    }

    #[test]
    fn reserved_body_fields_must_be_zero() {
        let hello = samples(&[]).remove(0);
        let mut b = encode(&hello);
        b[FRAME_HEADER_SIZE_BYTES + HELLO_RESERVED_AT] = 0x80;
        reseal(&mut b);
        assert!(matches!(
            decode_frame(&b),
            Err(ProtoError::BadField {
                kind: FrameKind::Hello,
                field: "reserved",
                ..
            })
        ));

        let mut b = encode(&Frame::Error(ErrorFrame::new(ErrorCode::Busy, "later")));
        b[FRAME_HEADER_SIZE_BYTES + ERROR_RESERVED_AT + 1] = 1;
        reseal(&mut b);
        assert!(matches!(
            decode_frame(&b),
            Err(ProtoError::BadField {
                kind: FrameKind::Error,
                field: "reserved",
                ..
            })
        ));
    }

    #[test]
    fn unknown_role_is_refused() {
        let hello = samples(&[]).remove(0);
        for role in [0u8, 4, 255] {
            let mut b = encode(&hello);
            b[FRAME_HEADER_SIZE_BYTES + HELLO_ROLE_AT] = role;
            reseal(&mut b);
            assert!(matches!(
                decode_frame(&b),
                Err(ProtoError::BadField { field: "role", .. })
            ));
        }
        for role in [Role::Primary, Role::Secondary, Role::Tool] {
            assert_eq!(Role::try_from(role as u8).unwrap(), role);
        }
    }

    #[test]
    fn error_message_over_the_max_is_refused_and_cut_when_encoding() {
        // A hand-built frame announcing a message one byte over the limit.
        let message_len = ERROR_MESSAGE_MAX_BYTES + 1;
        let mut b = header_only(
            FrameKind::Error as u8,
            (ERROR_FIXED_SIZE_BYTES + message_len) as u32,
        )
        .to_vec();
        assert!(matches!(
            decode_frame(&b),
            Err(ProtoError::Oversized {
                kind: FrameKind::Error,
                ..
            })
        ));
        // And one whose body fits but whose message_len field lies.
        let mut ok = encode(&Frame::Error(ErrorFrame::new(ErrorCode::Internal, "x")));
        let at = FRAME_HEADER_SIZE_BYTES + ERROR_MESSAGE_LEN_AT;
        ok[at..at + 2].copy_from_slice(&(message_len as u16).to_le_bytes());
        reseal(&mut ok);
        assert!(matches!(
            decode_frame(&ok),
            Err(ProtoError::BadField {
                field: "message_len",
                ..
            })
        ));
        ok[at..at + 2].copy_from_slice(&2u16.to_le_bytes());
        reseal(&mut ok);
        assert_eq!(
            decode_frame(&ok).unwrap_err(),
            ProtoError::WrongBodyLength {
                kind: FrameKind::Error,
                body_len: 9,
                expected: 10,
            }
        );

        // Encoding cuts a long message at a character boundary.
        let long = "é".repeat(ERROR_MESSAGE_MAX_BYTES); // 2 bytes per char
        b.clear();
        Frame::Error(ErrorFrame::new(ErrorCode::Internal, long.clone())).encode(&mut b);
        let (frame, _) = decode_frame(&b).unwrap();
        let Frame::Error(e) = frame else { panic!() };
        assert_eq!(e.message.len(), ERROR_MESSAGE_MAX_BYTES);
        assert!(long.starts_with(&e.message));
        let odd = format!("a{long}");
        b.clear();
        Frame::Error(ErrorFrame::new(ErrorCode::Internal, odd)).encode(&mut b);
        let Frame::Error(e) = decode_frame(&b).unwrap().0 else {
            panic!()
        };
        assert_eq!(e.message.len(), ERROR_MESSAGE_MAX_BYTES - 1);
    }

    #[test]
    fn invalid_utf8_message_is_refused() {
        let mut b = encode(&Frame::Error(ErrorFrame::new(ErrorCode::BadFrame, "abcd")));
        b[FRAME_HEADER_SIZE_BYTES + ERROR_FIXED_SIZE_BYTES + 2] = 0xFF;
        reseal(&mut b);
        let err = decode_frame(&b).unwrap_err();
        assert_eq!(
            err,
            ProtoError::BadField {
                kind: FrameKind::Error,
                field: "message",
                reason: "invalid UTF-8 after 2 valid bytes".into(),
            }
        );
    }

    #[test]
    fn error_codes_round_trip_and_unknown_codes_are_kept() {
        for code in 1..=9u32 {
            let c = ErrorCode::from(code);
            assert!(!matches!(c, ErrorCode::Unknown(_)));
            assert_eq!(u32::from(c), code);
        }
        assert_eq!(ErrorCode::from(0), ErrorCode::Unknown(0));
        let b = encode(&Frame::Error(ErrorFrame::new(
            ErrorCode::Unknown(999),
            "new",
        )));
        assert_eq!(
            decode_frame(&b).unwrap().0,
            Frame::Error(ErrorFrame::new(ErrorCode::Unknown(999), "new"))
        );
    }

    #[test]
    fn decode_body_refuses_inconsistent_arguments() {
        let b = encode(&Frame::Ack(Ack {
            logged_seq: 3,
            durable_seq: 2,
            cleared_seq: 1,
        }));
        let hb: [u8; 16] = b[..16].try_into().unwrap();
        let header = FrameHeader::decode(&hb).unwrap();
        assert!(matches!(
            decode_body(&header, &hb, &b[16..b.len() - 1]),
            Err(ProtoError::BodyBufferLength { given: 23, .. })
        ));
        let lying = FrameHeader {
            kind: FrameKind::Flush,
            ..header
        };
        assert!(matches!(
            decode_body(&lying, &hb, &b[16..]),
            Err(ProtoError::HeaderMismatch { .. })
        ));
    }

    #[test]
    fn fua_reflects_the_flag() {
        let mut h = update_header(&[0]);
        assert!(h.fua());
        h.flags = 0;
        assert!(!h.fua());
    }

    /// Owned stand-in for [`Frame`], whose Update borrows its data.
    #[derive(Debug, Clone)]
    enum Owned {
        Update(UpdateHeader, Vec<u8>),
        Other(Frame<'static>),
    }

    impl Owned {
        fn frame(&self) -> Frame<'_> {
            match self {
                Owned::Update(header, data) => Frame::Update {
                    header: *header,
                    data,
                },
                Owned::Other(f) => f.clone(),
            }
        }
    }

    fn arb_role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Primary), Just(Role::Secondary), Just(Role::Tool)]
    }

    fn arb_code() -> impl Strategy<Value = ErrorCode> {
        any::<u32>().prop_map(ErrorCode::from)
    }

    fn arb_frame() -> impl Strategy<Value = Owned> {
        let hello = (
            any::<[u8; 16]>(),
            any::<u32>(),
            any::<u16>(),
            arb_role(),
            any::<u64>(),
        )
            .prop_map(|(volume_uuid, node_id, protocol_version, role, epoch)| {
                Owned::Other(Frame::Hello(Hello {
                    volume_uuid,
                    node_id,
                    protocol_version,
                    role,
                    epoch,
                }))
            });
        let update = (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 1..2048),
        )
            .prop_map(|(seq, epoch, offset, fua, all_acked_seq, data)| {
                let length_bytes = data.len() as u32;
                let header = UpdateHeader {
                    seq,
                    epoch,
                    offset_bytes: offset.min(u64::MAX - u64::from(length_bytes)),
                    length_bytes,
                    flags: if fua { UPDATE_FLAG_FUA } else { 0 },
                    all_acked_seq,
                };
                Owned::Update(header, data)
            });
        let ack = any::<[u64; 3]>().prop_map(|[logged_seq, durable_seq, cleared_seq]| {
            Owned::Other(Frame::Ack(Ack {
                logged_seq,
                durable_seq,
                cleared_seq,
            }))
        });
        let all_acked = any::<u64>().prop_map(|seq| Owned::Other(Frame::AllAcked { seq }));
        let flush = any::<u64>().prop_map(|seq| Owned::Other(Frame::Flush { seq }));
        let log_state =
            any::<[u64; 5]>().prop_map(|[epoch, start_seq, next_seq, applied_seq, used_bytes]| {
                Owned::Other(Frame::LogState(LogState {
                    epoch,
                    start_seq,
                    next_seq,
                    applied_seq,
                    used_bytes,
                }))
            });
        let error = (arb_code(), "\\PC{0,300}").prop_filter_map("fits", |(code, message)| {
            (message.len() <= ERROR_MESSAGE_MAX_BYTES)
                .then_some(Owned::Other(Frame::Error(ErrorFrame { code, message })))
        });
        let log_read = any::<[u64; 2]>()
            .prop_map(|[from_seq, to_seq]| Owned::Other(Frame::LogRead { from_seq, to_seq }));
        let log_read_end =
            any::<u64>().prop_map(|next_seq| Owned::Other(Frame::LogReadEnd { next_seq }));
        let member = any::<(u32, bool, u64, u64)>().prop_map(
            |(node_id, connected, log_full_waits, log_full_wait_ms)| VolumeMember {
                node_id,
                connected,
                log_full_waits,
                log_full_wait_ms,
            },
        );
        let volume_state = (
            any::<[u64; 3]>(),
            any::<u32>(),
            prop::collection::vec(member, 0..=VOLUME_STATE_MEMBERS_MAX),
        )
            .prop_map(|([epoch, next_seq, all_acked_seq], in_flight, members)| {
                Owned::Other(Frame::VolumeState(VolumeState {
                    epoch,
                    next_seq,
                    all_acked_seq,
                    in_flight,
                    members,
                }))
            });
        prop_oneof![
            hello,
            update,
            ack,
            all_acked,
            flush,
            Just(Owned::Other(Frame::LogStateQuery)),
            log_state,
            error,
            log_read,
            log_read_end,
            volume_state,
        ]
    }

    /// Bytes with a valid-looking envelope (magic, version, correct crc, a
    /// kind near the known range) around an arbitrary body, so the body
    /// checks get exercised rather than everything stopping at the magic.
    fn arb_sealed_bytes() -> impl Strategy<Value = Vec<u8>> {
        (
            0u8..12,
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 0..128),
            any::<bool>(),
        )
            .prop_map(|(kind, reserved, body, reserved_zero)| {
                let mut b = header_only(kind, body.len() as u32).to_vec();
                if !reserved_zero {
                    b[HEADER_RESERVED_AT] = reserved;
                }
                b.extend_from_slice(&body);
                reseal(&mut b);
                b
            })
    }

    proptest! {
        #[test]
        fn arbitrary_frames_round_trip(owned in arb_frame(), junk in prop::collection::vec(any::<u8>(), 0..16)) {
            let frame = owned.frame();
            let mut bytes = encode(&frame);
            let len = bytes.len();
            bytes.extend_from_slice(&junk);
            let (decoded, used) = decode_frame(&bytes).unwrap();
            prop_assert_eq!(used, len);
            prop_assert_eq!(decoded, frame);
        }

        #[test]
        fn arbitrary_updates_split_encoding_matches(owned in arb_frame()) {
            if let Frame::Update { header, data } = owned.frame() {
                let mut split = Vec::new();
                encode_update_header(&header, data_crc32(data), &mut split);
                split.extend_from_slice(data);
                prop_assert_eq!(split, encode(&owned.frame()));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes);
        }

        #[test]
        fn accepted_bytes_are_canonical(bytes in arb_sealed_bytes()) {
            // Whatever decodes must re-encode to the same bytes: no two
            // encodings of one frame, so nothing is silently normalised.
            if let Ok((frame, used)) = decode_frame(&bytes) {
                prop_assert_eq!(encode(&frame), &bytes[..used]);
            }
        }

        #[test]
        fn damaged_frames_never_panic_and_never_decode_differently(
            owned in arb_frame(),
            at in any::<prop::sample::Index>(),
            mask in 1u8..=255,
            reseal_after in any::<bool>(),
        ) {
            let mut bytes = encode(&owned.frame());
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
            if reseal_after {
                reseal(&mut bytes);
            }
            // Only a resealed edit may pass, and then it must be what the
            // bytes say, not a silent repair.
            if let Ok((frame, used)) = decode_frame(&bytes) {
                prop_assert!(reseal_after);
                prop_assert_eq!(encode(&frame), &bytes[..used]);
            }
        }
    }
}
