//! What the framing ([`super::FrameReader`], [`super::Outbox`]) needs of a
//! connected TCP socket, and its implementations for the primary engine's
//! loop (`replblk-ring`) and for compio, the secondary's runtime
//! (`node::runtime`). The framing knows no more of the runtime than this
//! trait says.

use std::future::Future;
use std::io;
use std::ops::Range;

use compio::buf::{BufResult, IntoInner, IoBuf};
use compio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::OutBuf;
use crate::buf::{AlignedBuf, PooledBuf};

/// A buffer a socket reads into. Such buffers are always wholly
/// initialised, so a read has no length to record in them.
pub trait ReadBuf:
    compio::buf::IoBufMut + compio::buf::SetLen + crate::ring::io::StableBuf
{
}

impl ReadBuf for AlignedBuf {}
impl ReadBuf for PooledBuf {}

/// What the framing needs of a connected socket. Buffers are owned by the
/// operation while it runs (the runtime hands them to the kernel) and come
/// back with its result.
pub trait Socket: 'static {
    /// Reads into `buf[range]`, returning the count (0: closed by the peer).
    fn read_into<B: ReadBuf>(
        &self,
        buf: B,
        range: Range<usize>,
    ) -> impl Future<Output = (io::Result<usize>, B)>;

    /// Writes from `pieces` in order, as much as one `writev` takes.
    fn write_pieces(
        &self,
        pieces: Vec<OutBuf>,
    ) -> impl Future<Output = (io::Result<usize>, Vec<OutBuf>)>;

    /// Writes all of `bytes`.
    fn write_all_bytes(&self, bytes: Vec<u8>) -> impl Future<Output = io::Result<()>>;

    /// Shuts both directions down at once, waking a read or write blocked
    /// on the socket.
    fn shutdown_both(&self);
}

impl Socket for compio::net::TcpStream {
    async fn read_into<B: ReadBuf>(&self, buf: B, range: Range<usize>) -> (io::Result<usize>, B) {
        let mut stream = self;
        let BufResult(result, slice) = stream.read(IoBuf::slice(buf, range)).await;
        (result, slice.into_inner())
    }

    async fn write_pieces(&self, pieces: Vec<OutBuf>) -> (io::Result<usize>, Vec<OutBuf>) {
        let mut stream = self;
        let BufResult(result, pieces) = stream.write_vectored(pieces).await;
        (result, pieces)
    }

    async fn write_all_bytes(&self, bytes: Vec<u8>) -> io::Result<()> {
        let mut stream = self;
        stream.write_all(bytes).await.0
    }

    fn shutdown_both(&self) {
        let _ = socket2::SockRef::from(self).shutdown(std::net::Shutdown::Both);
    }
}

impl Socket for crate::ring::io::TcpStream {
    async fn read_into<B: ReadBuf>(&self, buf: B, range: Range<usize>) -> (io::Result<usize>, B) {
        crate::ring::io::TcpStream::read_into(self, buf, range).await
    }

    async fn write_pieces(&self, pieces: Vec<OutBuf>) -> (io::Result<usize>, Vec<OutBuf>) {
        crate::ring::io::TcpStream::write_pieces(self, pieces).await
    }

    async fn write_all_bytes(&self, bytes: Vec<u8>) -> io::Result<()> {
        crate::ring::io::TcpStream::write_all_bytes(self, bytes).await
    }

    fn shutdown_both(&self) {
        crate::ring::io::TcpStream::shutdown_both(self);
    }
}
