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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{data_crc32, encode_update_header, UpdateHeader};

    /// An Update frame of `length` bytes of data, each byte derived from
    /// `seq`, encoded whole.
    fn update(seq: u64, length: usize) -> Vec<u8> {
        let data: Vec<u8> = (0..length).map(|i| (seq as u8) ^ (i as u8)).collect();
        let header = UpdateHeader {
            seq,
            epoch: 1,
            offset_bytes: 0,
            length_bytes: length as u32,
            flags: 0,
            all_acked_seq: 0,
        };
        let mut bytes = Vec::new();
        encode_update_header(&header, data_crc32(&data), &mut bytes);
        bytes.extend_from_slice(&data);
        bytes
    }

    /// Small and large frames mixed, sent in pieces that cut frames
    /// anywhere (so the buffer fills up mid-frame and its partial frame
    /// moves to the front): every frame comes out whole, in order, with its
    /// bytes.
    #[test]
    fn mixed_small_and_large_frames_cut_anywhere_come_out_whole_and_in_order() {
        let lengths = [
            4096,
            1 << 20,
            512,
            1 << 20,
            1 << 20,
            8192,
            64 << 10,
            (64 << 10) - 512,
            1 << 20,
            4096,
        ];
        let frames: Vec<Vec<u8>> = lengths
            .iter()
            .enumerate()
            .map(|(index, &length)| update(index as u64 + 1, length))
            .collect();
        let stream: Vec<u8> = frames.concat();
        tokio_uring::start(async move {
            let listener =
                tokio_uring::net::TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let address = listener.local_addr().unwrap();
            let sender = tokio_uring::spawn(async move {
                let connection = tokio_uring::net::TcpStream::connect(address).await.unwrap();
                // Pieces of sizes that do not line up with frames.
                let mut sent = 0;
                for piece in [100, 70_000, 3, 1 << 20, 999_999, 5000].iter().cycle() {
                    if sent == stream.len() {
                        break;
                    }
                    let end = (sent + piece).min(stream.len());
                    let (result, _) = connection.write_all(stream[sent..end].to_vec()).await;
                    result.unwrap();
                    sent = end;
                }
            });
            let (connection, _) = listener.accept().await.unwrap();
            let mut reader = FrameReader::new(Rc::new(connection), "test".into());
            for (index, expected) in frames.iter().enumerate() {
                reader.fill().await.unwrap();
                let (frame, length, data_crc) = reader.frame_with_data_crc().unwrap();
                assert_eq!(length, expected.len(), "frame {index}'s length");
                match frame {
                    Frame::Update { header, data } => {
                        assert_eq!(header.seq, index as u64 + 1);
                        assert_eq!(data, &expected[expected.len() - data.len()..]);
                        assert_eq!(data_crc, Some(data_crc32(data)));
                    }
                    other => panic!("frame {index} decoded as {:?}", other.kind()),
                }
                reader.consume(length);
            }
            assert!(!reader.has_frame(), "nothing after the last frame");
            sender.await.unwrap();
        });
    }
}
