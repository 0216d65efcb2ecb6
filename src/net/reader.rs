//! Reading whole frames from a stream.

use std::rc::Rc;

use thiserror::Error;

use super::Socket;
use crate::buf::{AlignedBuf, BufPool, PooledBuf};
use crate::proto::{
    decode_frame_with_data_crc, frame_length, Frame, FrameHeader, FrameKind, ProtoError,
    FRAME_BODY_MAX_BYTES, FRAME_HEADER_SIZE_BYTES, UPDATE_FIXED_SIZE_BYTES,
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

/// With [`DirectUpdates`]: Update frames at least this long are received
/// straight into a buffer of their own rather than the shared one.
pub const DIRECT_FRAME_MIN_BYTES: usize = 64 * 1024;

/// With [`DirectUpdates`]: most bytes one read into the shared buffer asks
/// for. Whatever part of a large frame such a read takes in is copied once
/// into the frame's own buffer, so the smaller the read, the less is copied;
/// small frames still arrive many to a read.
pub const SHARED_READ_BYTES_MAX: usize = 64 * 1024;

/// Bytes between an Update frame's start and its data: the frame header and
/// the Update's fixed fields.
const UPDATE_DATA_AT_BYTES: usize = FRAME_HEADER_SIZE_BYTES + UPDATE_FIXED_SIZE_BYTES;

/// Where a reader puts large Update frames: each in a buffer of its own from
/// `pool`, laid out so that the data lands at `data_offset_bytes`, the frame's
/// header and fixed fields just in front of it. A secondary asks for its log
/// record's layout, so the data is received where the record needs it; only
/// what a read into the shared buffer took in with it (at most
/// [`SHARED_READ_BYTES_MAX`]) is copied there.
pub struct DirectUpdates {
    /// Where the buffers come from.
    pub pool: Rc<BufPool>,
    /// Offset of the data in a buffer; at least the 56 bytes in front of an
    /// Update's data.
    pub data_offset_bytes: usize,
    /// Length of the buffer for an Update with this many bytes of data.
    pub buffer_len_bytes: fn(u32) -> usize,
}

/// A large Update frame being received into its own buffer.
struct DirectFrame {
    buf: PooledBuf,
    /// Where the frame starts in `buf`.
    frame_at: usize,
    /// The frame's whole length.
    frame_len: usize,
    /// How many of its bytes are in `buf` so far.
    received: usize,
}

impl DirectFrame {
    fn bytes(&self) -> &[u8] {
        &self.buf.buf().as_slice()[self.frame_at..self.frame_at + self.received]
    }

    fn is_whole(&self) -> bool {
        self.received == self.frame_len
    }
}

/// Yields frames from a stream. Frames borrow the reader's buffer, so a
/// frame must be consumed before the next read. `S` is the socket of the
/// thread's runtime: the primary engine's (`replblk-ring`) or the
/// secondary's (compio, the default).
pub struct FrameReader<S: Socket = compio::net::TcpStream> {
    stream: Rc<S>,
    peer: String,
    buffer: Option<AlignedBuf>,
    start: usize,
    end: usize,
    direct_updates: Option<DirectUpdates>,
    /// The front frame, when it is received into its own buffer. The shared
    /// buffer is empty meanwhile: every byte of it belonged to this frame.
    direct: Option<DirectFrame>,
}

impl<S: Socket> FrameReader<S> {
    /// A reader over `stream`; `peer` names it in errors.
    pub fn new(stream: Rc<S>, peer: String) -> FrameReader<S> {
        FrameReader {
            stream,
            peer,
            buffer: Some(AlignedBuf::zeroed(READ_BUFFER_BYTES)),
            start: 0,
            end: 0,
            direct_updates: None,
            direct: None,
        }
    }

    /// A reader that receives Update frames of [`DIRECT_FRAME_MIN_BYTES`] or
    /// more into buffers of their own, as `direct_updates` says (take one with
    /// [`FrameReader::take_direct_buffer`]). Its shared buffer holds only the
    /// smaller frames.
    pub fn with_direct_updates(
        stream: Rc<S>,
        peer: String,
        direct_updates: DirectUpdates,
    ) -> FrameReader<S> {
        assert!(
            direct_updates.data_offset_bytes >= UPDATE_DATA_AT_BYTES,
            "an Update's header must fit in front of its data"
        );
        FrameReader {
            stream,
            peer,
            buffer: Some(AlignedBuf::zeroed(
                DIRECT_FRAME_MIN_BYTES + SHARED_READ_BYTES_MAX,
            )),
            start: 0,
            end: 0,
            direct_updates: Some(direct_updates),
            direct: None,
        }
    }

    /// Who the reader reads from.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    fn buffered(&self) -> &[u8] {
        &self
            .buffer
            .as_ref()
            .expect("buffer is home between reads")
            .as_slice()[self.start..self.end]
    }

    /// True when a whole frame (or a malformed one) is already buffered, so
    /// [`FrameReader::fill`] will not wait on the socket.
    pub fn has_frame(&self) -> bool {
        if let Some(direct) = &self.direct {
            return direct.is_whole();
        }
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
            if let Some(direct) = &self.direct {
                if direct.is_whole() {
                    return Ok(());
                }
                self.read_direct().await?;
                continue;
            }
            match frame_length(self.buffered()) {
                Ok(_) => return Ok(()),
                Err(error) if !error.is_truncated() => {
                    return Err(NetError::Proto {
                        peer: self.peer.clone(),
                        source: error,
                    })
                }
                Err(_) => {
                    if !self.start_direct() {
                        self.read_more().await?;
                    }
                }
            }
        }
    }

    /// Moves the front frame to a buffer of its own if it is a large Update
    /// and this reader receives those directly. The header was validated by
    /// `frame_length` already.
    fn start_direct(&mut self) -> bool {
        let Some(direct_updates) = &self.direct_updates else {
            return false;
        };
        let buffered = self.buffered();
        let Some(header_bytes) = buffered.first_chunk::<FRAME_HEADER_SIZE_BYTES>() else {
            return false;
        };
        let Ok(header) = FrameHeader::decode(header_bytes) else {
            return false;
        };
        if header.kind != FrameKind::Update || header.frame_len() < DIRECT_FRAME_MIN_BYTES {
            return false;
        }
        let data_len = header.frame_len() - UPDATE_DATA_AT_BYTES;
        let data_len = u32::try_from(data_len).expect("a frame's data fits in u32");
        let buffer_len = (direct_updates.buffer_len_bytes)(data_len);
        let frame_at = direct_updates.data_offset_bytes - UPDATE_DATA_AT_BYTES;
        assert!(
            frame_at + header.frame_len() <= buffer_len,
            "a direct buffer of {buffer_len} bytes holds a frame of {} at {frame_at}",
            header.frame_len()
        );
        let mut buf = direct_updates.pool.take(buffer_len);
        let received = buffered.len();
        debug_assert!(received < header.frame_len(), "only a partial frame moves");
        buf.buf_mut().as_mut_slice()[frame_at..frame_at + received].copy_from_slice(buffered);
        self.start = 0;
        self.end = 0;
        self.direct = Some(DirectFrame {
            buf,
            frame_at,
            frame_len: header.frame_len(),
            received,
        });
        true
    }

    /// Reads more of the direct frame, never past its end, so the next
    /// frame's bytes go to the shared buffer.
    async fn read_direct(&mut self) -> Result<(), NetError> {
        let direct = self
            .direct
            .take()
            .expect("a direct frame is being received");
        let from = direct.frame_at + direct.received;
        let to = direct.frame_at + direct.frame_len;
        let (result, buf) = self.stream.read_into(direct.buf, from..to).await;
        let read = self.bytes_read(result)?;
        self.direct = Some(DirectFrame {
            buf,
            received: direct.received + read,
            ..direct
        });
        Ok(())
    }

    async fn read_more(&mut self) -> Result<(), NetError> {
        let mut buffer = self.buffer.take().expect("buffer is home between reads");
        if self.end == buffer.len() {
            // Compact: the partial frame moves to the front.
            buffer.as_mut_slice().copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let read_end = if self.direct_updates.is_some() {
            buffer.len().min(self.end + SHARED_READ_BYTES_MAX)
        } else {
            buffer.len()
        };
        let (result, buffer) = self.stream.read_into(buffer, self.end..read_end).await;
        self.buffer = Some(buffer);
        self.end += self.bytes_read(result)?;
        Ok(())
    }

    /// A read's byte count, or why the stream ended: its error, or the
    /// peer closing it (a read of 0 bytes into a non-empty buffer).
    fn bytes_read(&self, result: std::io::Result<usize>) -> Result<usize, NetError> {
        match result {
            Ok(0) => Err(NetError::Closed {
                peer: self.peer.clone(),
            }),
            Ok(read) => Ok(read),
            Err(source) => Err(NetError::Io {
                peer: self.peer.clone(),
                source,
            }),
        }
    }

    /// The buffered frame, once [`FrameReader::fill`] returned. Call
    /// [`FrameReader::consume`] with its length when done with it.
    pub fn frame(&self) -> Result<(Frame<'_>, usize), NetError> {
        self.frame_with_data_crc()
            .map(|(frame, length, _)| (frame, length))
    }

    /// As [`FrameReader::frame`], with the crc32 of an Update's data alone.
    pub fn frame_with_data_crc(&self) -> Result<(Frame<'_>, usize, Option<u32>), NetError> {
        let bytes = match &self.direct {
            Some(direct) => direct.bytes(),
            None => self.buffered(),
        };
        decode_frame_with_data_crc(bytes).map_err(|source| NetError::Proto {
            peer: self.peer.clone(),
            source,
        })
    }

    /// True when the front frame was received into a buffer of its own,
    /// which [`FrameReader::take_direct_buffer`] hands over.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Consumes the front frame, received into a buffer of its own, and
    /// hands that buffer over: the frame's data is at the `data_offset_bytes`
    /// the reader was made with. Call only after the frame was decoded
    /// (its crc checked) with [`FrameReader::frame_with_data_crc`].
    pub fn take_direct_buffer(&mut self) -> Option<PooledBuf> {
        let direct = self.direct.take()?;
        assert!(direct.is_whole(), "only a whole frame is handed over");
        Some(direct.buf)
    }

    /// Drops `length` bytes of frame from the front of the buffer.
    pub fn consume(&mut self, length: usize) {
        if let Some(direct) = self.direct.take() {
            assert_eq!(length, direct.frame_len, "consuming the direct frame whole");
            return;
        }
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
    use crate::proto::{data_crc32, encode_update_header, UpdateHeader, UPDATE_DATA_MAX_BYTES};
    use compio::io::AsyncWriteExt;
    use compio::net::{TcpListener, TcpStream};

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

    /// A connected pair of streams on 127.0.0.1: the connecting end and the
    /// accepted one.
    async fn loopback_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connecting = compio::runtime::spawn(async move { TcpStream::connect(address).await });
        let (accepted, _) = listener.accept().await.unwrap();
        (connecting.await.unwrap().unwrap(), accepted)
    }

    /// Sends `stream` in pieces that cut frames anywhere (so the buffer
    /// fills up mid-frame and its partial frame moves to the front) and
    /// checks every frame comes out whole, in order, with its bytes: through
    /// the shared buffer, or with `direct` set, the large Updates through
    /// buffers of their own with the data at the asked offset.
    fn frames_come_out_whole(direct: bool, lengths: &[usize], pieces: &[usize]) {
        let pieces = pieces.to_vec();
        let frames: Vec<Vec<u8>> = lengths
            .iter()
            .enumerate()
            .map(|(index, &length)| update(index as u64 + 1, length))
            .collect();
        let stream: Vec<u8> = frames.concat();
        let pool = BufPool::new(8 << 20);
        compio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let (mut connection, accepted) = loopback_pair().await;
                let sender = compio::runtime::spawn(async move {
                    // Pieces of sizes that do not line up with frames.
                    let mut sent = 0;
                    for piece in pieces.iter().cycle() {
                        if sent == stream.len() {
                            break;
                        }
                        let end = (sent + piece).min(stream.len());
                        let compio::BufResult(result, _) =
                            connection.write_all(stream[sent..end].to_vec()).await;
                        result.unwrap();
                        sent = end;
                    }
                });
                let connection = Rc::new(accepted);
                const DATA_AT: usize = 64;
                let mut reader = if direct {
                    FrameReader::with_direct_updates(
                        connection,
                        "test".into(),
                        DirectUpdates {
                            pool: pool.clone(),
                            data_offset_bytes: DATA_AT,
                            buffer_len_bytes: |length| {
                                (DATA_AT + length as usize).next_multiple_of(4096)
                            },
                        },
                    )
                } else {
                    FrameReader::new(connection, "test".into())
                };
                for (index, expected) in frames.iter().enumerate() {
                    reader.fill().await.unwrap();
                    assert!(reader.has_frame());
                    let (frame, length, data_crc) = reader.frame_with_data_crc().unwrap();
                    assert_eq!(length, expected.len(), "frame {index}'s length");
                    let data = match frame {
                        Frame::Update { header, data } => {
                            assert_eq!(header.seq, index as u64 + 1);
                            assert_eq!(data, &expected[expected.len() - data.len()..]);
                            assert_eq!(data_crc, Some(data_crc32(data)));
                            data.to_vec()
                        }
                        other => panic!("frame {index} decoded as {:?}", other.kind()),
                    };
                    let large = length >= DIRECT_FRAME_MIN_BYTES;
                    assert_eq!(reader.is_direct(), direct && large, "frame {index}");
                    if reader.is_direct() {
                        let buf = reader.take_direct_buffer().unwrap();
                        let bytes = buf.buf().as_slice();
                        assert_eq!(bytes.len(), (DATA_AT + data.len()).next_multiple_of(4096));
                        assert_eq!(&bytes[DATA_AT..DATA_AT + data.len()], &data[..]);
                    } else {
                        reader.consume(length);
                    }
                }
                assert!(!reader.has_frame(), "nothing after the last frame");
                sender.await.unwrap();
            });
    }

    /// A large Update with one bit of its data flipped, received directly:
    /// refused as a bad crc.
    #[test]
    fn a_large_update_received_directly_with_a_flipped_bit_is_refused() {
        let mut frame = update(1, 1 << 20);
        frame[UPDATE_DATA_AT_BYTES + 1000] ^= 0x10;
        compio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let (mut connection, accepted) = loopback_pair().await;
                let sender = compio::runtime::spawn(async move {
                    let compio::BufResult(result, _) = connection.write_all(frame).await;
                    result.unwrap();
                    connection
                });
                let mut reader = FrameReader::with_direct_updates(
                    Rc::new(accepted),
                    "test".into(),
                    DirectUpdates {
                        pool: BufPool::new(4 << 20),
                        data_offset_bytes: UPDATE_DATA_AT_BYTES,
                        buffer_len_bytes: |length| UPDATE_DATA_AT_BYTES + length as usize,
                    },
                );
                reader.fill().await.unwrap();
                assert!(reader.is_direct());
                match reader.frame_with_data_crc() {
                    Err(NetError::Proto {
                        source: ProtoError::BadCrc { .. },
                        ..
                    }) => {}
                    other => panic!("expected a bad crc, got {:?}", other.map(|f| f.1)),
                }
                drop(sender.await.unwrap());
            });
    }

    /// Lengths around every size the reader treats differently.
    const LENGTHS: [usize; 12] = [
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
        (64 << 10) - UPDATE_DATA_AT_BYTES,
        (64 << 10) - UPDATE_DATA_AT_BYTES - 1,
    ];
    const PIECES: [usize; 6] = [100, 70_000, 3, 1 << 20, 999_999, 5000];

    #[test]
    fn mixed_small_and_large_frames_cut_anywhere_come_out_whole_and_in_order() {
        frames_come_out_whole(false, &LENGTHS, &PIECES);
    }

    #[test]
    fn large_updates_received_directly_come_out_whole_and_in_order_with_the_small_ones() {
        frames_come_out_whole(true, &LENGTHS, &PIECES);
    }

    /// 200 frames of seeded random lengths (a third of them large) sent in
    /// pieces of seeded random sizes, through both kinds of reader.
    #[test]
    fn random_frames_in_random_pieces_come_out_whole_and_in_order() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound as u64) as usize
        };
        let lengths: Vec<usize> = (0..200)
            .map(|_| match next(3) {
                0 => {
                    DIRECT_FRAME_MIN_BYTES - UPDATE_DATA_AT_BYTES
                        + next(UPDATE_DATA_MAX_BYTES - (64 << 10))
                }
                _ => 1 + next(SHARED_READ_BYTES_MAX + 4096),
            })
            .collect();
        let pieces: Vec<usize> = (0..97).map(|_| 1 + next(300_000)).collect();
        frames_come_out_whole(false, &lengths, &pieces);
        frames_come_out_whole(true, &lengths, &pieces);
    }
}
