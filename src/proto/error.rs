//! Why a frame was refused.
//!
//! Every variant names the frame kind (once it is known), the field and the
//! offending value next to the limit it broke, so a log line alone is enough
//! to tell a corrupt stream from a peer speaking a different protocol.

use super::frame::{ErrorCode, FrameHeader, FrameKind, FRAME_MAGIC};

/// A frame that could not be decoded, or a buffer that does not yet hold a
/// whole frame ([`ProtoError::Truncated`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum ProtoError {
    /// The first four bytes are not [`FRAME_MAGIC`]: the stream is not ours
    /// or has lost its framing.
    #[error(
        "bad frame magic 0x{found:08x}, expected 0x{:08x} (\"RBLK\")",
        FRAME_MAGIC
    )]
    BadMagic {
        /// The magic as read, little-endian.
        found: u32,
    },

    /// The header carries a protocol version this build does not speak.
    #[error("unsupported protocol version {found}, this node speaks version {supported}")]
    UnsupportedVersion {
        /// The version in the header.
        found: u16,
        /// The only version this build accepts.
        supported: u16,
    },

    /// The kind byte names no known frame kind.
    #[error("unknown frame kind {kind}")]
    UnknownKind {
        /// The kind byte as read.
        kind: u8,
    },

    /// The header announces a body larger than the kind allows; refused from
    /// the header alone so the reader never buffers it.
    #[error("{kind} frame: body_len {body_len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Kind from the header.
        kind: FrameKind,
        /// Body length announced by the header.
        body_len: u32,
        /// Largest body this kind may have.
        max: usize,
    },

    /// The header announces a body shorter than the kind's fixed part.
    #[error("{kind} frame: body_len {body_len} bytes is below the minimum of {min} bytes")]
    Undersized {
        /// Kind from the header.
        kind: FrameKind,
        /// Body length announced by the header.
        body_len: u32,
        /// Smallest body this kind may have.
        min: usize,
    },

    /// The body length disagrees with the size the kind (or, for Update and
    /// Error, the length field inside the body) implies.
    #[error("{kind} frame: body_len {body_len} bytes, expected exactly {expected}")]
    WrongBodyLength {
        /// Kind from the header.
        kind: FrameKind,
        /// Body length announced by the header.
        body_len: u32,
        /// The size the body must have.
        expected: usize,
    },

    /// The buffer ends before the frame does. Not a protocol violation: a
    /// streaming reader reads more and retries.
    #[error("truncated frame: need {needed} bytes from the frame start, have {have}")]
    Truncated {
        /// Bytes needed from the start of the frame to make progress.
        needed: usize,
        /// Bytes available.
        have: usize,
    },

    /// The body slice handed to the decoder is not as long as its header
    /// says: a bug in the caller, not in the peer.
    #[error("{kind} frame: header announces {body_len} body bytes but {given} were supplied")]
    BodyBufferLength {
        /// Kind from the header.
        kind: FrameKind,
        /// Body length announced by the header.
        body_len: u32,
        /// Length of the slice supplied.
        given: usize,
    },

    /// The parsed header handed to the decoder does not match the raw
    /// header bytes it came with: a bug in the caller, not in the peer.
    #[error(
        "parsed header {given:?} does not match the header bytes, which decode to {decoded:?}"
    )]
    HeaderMismatch {
        /// The header the caller passed.
        given: FrameHeader,
        /// What the raw header bytes decode to.
        decoded: FrameHeader,
    },

    /// The checksum does not match: the frame was damaged on the way.
    #[error(
        "{kind} frame: crc32 mismatch (header says 0x{expected:08x}, computed 0x{computed:08x})"
    )]
    BadCrc {
        /// Kind from the header (which the crc also covers, so it may be the
        /// damaged part).
        kind: FrameKind,
        /// The crc carried in the header.
        expected: u32,
        /// The crc of the bytes received.
        computed: u32,
    },

    /// A field holds a value the protocol forbids.
    #[error("{kind} frame: field {field}: {reason}")]
    BadField {
        /// Kind of the frame holding the field.
        kind: FrameKind,
        /// Field name as in docs/PROTOCOL.md.
        field: &'static str,
        /// The value found and the rule it breaks.
        reason: String,
    },
}

impl ProtoError {
    /// True when the buffer merely ends too early, so the caller should read
    /// more bytes instead of dropping the connection.
    pub fn is_truncated(&self) -> bool {
        matches!(self, ProtoError::Truncated { .. })
    }

    /// The code to put in the Error frame sent back before closing the
    /// connection, so the peer can tell a version skew from corruption.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ProtoError::UnsupportedVersion { .. } => ErrorCode::ProtocolVersion,
            _ => ErrorCode::BadFrame,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_kind_field_value_and_limit() {
        let e = ProtoError::BadCrc {
            kind: FrameKind::Update,
            expected: 0xdead_beef,
            computed: 0x0000_0001,
        };
        assert_eq!(
            e.to_string(),
            "Update frame: crc32 mismatch (header says 0xdeadbeef, computed 0x00000001)"
        );
        let e = ProtoError::Oversized {
            kind: FrameKind::Update,
            body_len: 2_000_000,
            max: 1_048_616,
        };
        assert_eq!(
            e.to_string(),
            "Update frame: body_len 2000000 bytes exceeds the limit of 1048616 bytes"
        );
        let e = ProtoError::BadMagic { found: 0 };
        assert_eq!(
            e.to_string(),
            "bad frame magic 0x00000000, expected 0x4b4c4252 (\"RBLK\")"
        );
        let e = ProtoError::BadField {
            kind: FrameKind::Hello,
            field: "role",
            reason: "unknown role 9".into(),
        };
        assert_eq!(e.to_string(), "Hello frame: field role: unknown role 9");
    }

    #[test]
    fn truncated_is_distinguishable() {
        assert!(ProtoError::Truncated {
            needed: 16,
            have: 3
        }
        .is_truncated());
        assert!(!ProtoError::UnknownKind { kind: 0 }.is_truncated());
    }

    #[test]
    fn version_skew_maps_to_its_own_code() {
        let e = ProtoError::UnsupportedVersion {
            found: 2,
            supported: 1,
        };
        assert_eq!(e.error_code(), ErrorCode::ProtocolVersion);
        assert_eq!(
            ProtoError::UnknownKind { kind: 77 }.error_code(),
            ErrorCode::BadFrame
        );
    }
}
