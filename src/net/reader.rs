//! Reading whole frames from a stream.

use std::rc::Rc;

use thiserror::Error;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;

use crate::proto::{
    decode_frame_with_data_crc, frame_length, Frame, ProtoError, FRAME_BODY_MAX_BYTES,
    FRAME_HEADER_SIZE_BYTES,
};

/// Why a connection stopped yielding frames.
#[derive(Debug, Error)]
pub enum NetError {
    /// The socket failed.
    #[error("connection {peer}: {source}")]
    Io {
        /// Who we talked to.
        peer: String,
        /// Why.
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("connection {peer}: closed by peer")]
    Closed {
        /// Who we talked to.
        peer: String,
    },
    /// The peer sent a malformed frame.
    #[error("connection {peer}: malformed frame: {source}")]
    Proto {
        /// Who we talked to.
        peer: String,
        /// What was wrong.
        source: ProtoError,
    },
}

/// Most bytes buffered: one frame of the largest size plus room for the next
/// frames' headers, so a large update never needs a second buffer.
pub const READ_BUFFER_BYTES: usize = FRAME_HEADER_SIZE_BYTES + FRAME_BODY_MAX_BYTES + 64 * 1024;

/// Yields frames from a stream. Frames borrow the reader's buffer, so a
/// frame must be consumed before the next read.
pub struct FrameReader {
    stream: Rc<TcpStream>,
    peer: String,
    buffer: Option<Vec<u8>>,
    start: usize,
    end: usize,
}

impl FrameReader {
    /// A reader over `stream`; `peer` names it in errors.
    pub fn new(stream: Rc<TcpStream>, peer: String) -> FrameReader {
        FrameReader {
            stream,
            peer,
            buffer: Some(vec![0; READ_BUFFER_BYTES]),
            start: 0,
            end: 0,
        }
    }

    /// Who the reader reads from.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    fn buffered(&self) -> &[u8] {
        &self.buffer.as_ref().expect("buffer is home between reads")[self.start..self.end]
    }

    /// True when a whole frame (or a malformed one) is already buffered, so
    /// [`FrameReader::next_frame`] will not wait on the socket.
    pub fn has_frame(&self) -> bool {
        match frame_length(self.buffered()) {
            Ok(_) => true,
            Err(error) => !error.is_truncated(),
        }
    }

    /// Waits until a whole frame is buffered (or a malformed header is:
    /// that is refused at once). Only [`FrameReader::frame`] reads the
    /// body and checks the crc, so each frame's bytes are hashed once.
    pub async fn fill(&mut self) -> Result<(), NetError> {
        loop {
            match frame_length(self.buffered()) {
                Ok(_) => return Ok(()),
                Err(error) if !error.is_truncated() => {
                    return Err(NetError::Proto {
                        peer: self.peer.clone(),
                        source: error,
                    })
                }
                Err(_) => self.read_more().await?,
            }
        }
    }

    async fn read_more(&mut self) -> Result<(), NetError> {
        let mut buffer = self.buffer.take().expect("buffer is home between reads");
        if self.end == buffer.len() {
            // Compact: the partial frame moves to the front.
            buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let (result, slice) = self.stream.read(buffer.slice(self.end..)).await;
        self.buffer = Some(slice.into_inner());
        let read = result.map_err(|source| NetError::Io {
            peer: self.peer.clone(),
            source,
        })?;
        if read == 0 {
            return Err(NetError::Closed {
                peer: self.peer.clone(),
            });
        }
        self.end += read;
        Ok(())
    }

    /// The buffered frame, once [`FrameReader::fill`] returned. Call
    /// [`FrameReader::consume`] with its length when done with it.
    pub fn frame(&self) -> Result<(Frame<'_>, usize), NetError> {
        self.frame_with_data_crc()
            .map(|(frame, length, _)| (frame, length))
    }

    /// As [`FrameReader::frame`], with the crc32 of an Update's data alone.
    pub fn frame_with_data_crc(&self) -> Result<(Frame<'_>, usize, Option<u32>), NetError> {
        decode_frame_with_data_crc(self.buffered()).map_err(|source| NetError::Proto {
            peer: self.peer.clone(),
            source,
        })
    }

    /// Drops `length` bytes of frame from the front of the buffer.
    pub fn consume(&mut self, length: usize) {
        debug_assert!(self.start + length <= self.end);
        self.start += length;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}
