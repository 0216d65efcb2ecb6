//! The wire protocol between primary, secondaries and tools.
//!
//! Frames are a fixed 16-byte header (magic, version, kind, body length,
//! crc32) followed by a kind-specific body, all integers little-endian; the
//! byte layout and the conversation are specified in docs/PROTOCOL.md. This
//! module only encodes and decodes: it does no I/O and keeps no state, so the
//! same code serves the daemons, the tools and the tests.

pub mod error;
pub mod frame;

pub use error::*;
pub use frame::*;
