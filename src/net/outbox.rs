//! The sending half of a connection.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;

use tokio::sync::Notify;

use super::Socket;
use crate::buf::SharedBuf;
use crate::proto::Frame;

/// Most buffers in one `writev`; well under the kernel's IOV_MAX (1024).
pub const WRITEV_BUFFERS_MAX: usize = 128;

/// One piece of outgoing bytes: an encoded frame or frame header, or an
/// update's payload shared with the local write and the other secondaries.
pub enum OutBuf {
    /// Bytes owned by this piece.
    Owned(Vec<u8>, usize),
    /// An update's payload; never copied.
    Shared(SharedBuf, usize),
}

impl OutBuf {
    fn bytes(&self) -> &[u8] {
        match self {
            OutBuf::Owned(bytes, start) => &bytes[*start..],
            OutBuf::Shared(buf, start) => &buf.as_slice()[*start..],
        }
    }

    fn advance(&mut self, count: usize) {
        match self {
            OutBuf::Owned(_, start) | OutBuf::Shared(_, start) => *start += count,
        }
    }
}

impl compio::buf::IoBuf for OutBuf {
    fn as_init(&self) -> &[u8] {
        self.bytes()
    }
}

// SAFETY: a Vec or a SharedBuf, both on the heap.
unsafe impl crate::ring::io::StableBuf for OutBuf {}

/// A queue of outgoing bytes and the task that writes them. Frames are
/// written in the order queued; a write error closes the outbox.
pub struct Outbox {
    queue: RefCell<VecDeque<OutBuf>>,
    ready: Notify,
    closed: Cell<bool>,
    /// Whether the writer has a batch in a `writev`.
    writing: Cell<bool>,
    /// Told when the writer has sent everything queued, or stopped.
    emptied: Notify,
}

impl Outbox {
    /// An outbox for `stream`, and its writer: the task that sends what is
    /// queued, for the caller to spawn on the thread's runtime. The writer
    /// ends when the outbox is closed or a send fails, and then shuts the
    /// socket down.
    pub fn new<S: Socket>(
        stream: Rc<S>,
        peer: String,
    ) -> (Rc<Outbox>, impl Future<Output = ()> + 'static) {
        let outbox = Rc::new(Outbox {
            queue: RefCell::new(VecDeque::new()),
            ready: Notify::new(),
            closed: Cell::new(false),
            writing: Cell::new(false),
            emptied: Notify::new(),
        });
        let writer = outbox.clone();
        let run = async move {
            if let Err(error) = writer.run(&*stream).await {
                tracing::debug!(%peer, %error, "send failed; closing connection");
            }
            writer.close();
            // Wake a reader blocked on this socket.
            stream.shutdown_both();
        };
        (outbox, run)
    }

    /// Queues a frame.
    pub fn send_frame(&self, frame: &Frame<'_>) {
        let mut bytes = Vec::with_capacity(64);
        frame.encode(&mut bytes);
        self.send_bytes(bytes);
    }

    /// Queues encoded bytes.
    pub fn send_bytes(&self, bytes: Vec<u8>) {
        self.push(OutBuf::Owned(bytes, 0));
    }

    /// Queues an update: its encoded header, then its shared payload.
    pub fn send_update(&self, header: Vec<u8>, payload: SharedBuf) {
        self.push(OutBuf::Owned(header, 0));
        self.push(OutBuf::Shared(payload, 0));
    }

    fn push(&self, piece: OutBuf) {
        if self.closed.get() {
            return;
        }
        self.queue.borrow_mut().push_back(piece);
        self.ready.notify_one();
    }

    /// Closes the outbox: the writer stops and the socket is shut down.
    pub fn close(&self) {
        if !self.closed.replace(true) {
            self.queue.borrow_mut().clear();
            self.ready.notify_one();
            self.emptied.notify_waiters();
        }
    }

    /// Waits until everything queued so far has been written (or the
    /// connection closed).
    pub async fn drained(&self) {
        while !self.closed.get() && (self.writing.get() || !self.queue.borrow().is_empty()) {
            self.emptied.notified().await;
        }
    }

    async fn run(&self, stream: &impl Socket) -> std::io::Result<()> {
        loop {
            if self.closed.get() {
                return Ok(());
            }
            let batch: Vec<OutBuf> = {
                let mut queue = self.queue.borrow_mut();
                let count = queue.len().min(WRITEV_BUFFERS_MAX);
                queue.drain(..count).collect()
            };
            if batch.is_empty() {
                self.writing.set(false);
                self.emptied.notify_waiters();
                self.ready.notified().await;
                continue;
            }
            self.writing.set(true);
            write_all_vectored(stream, batch).await?;
        }
    }
}

/// Writes every buffer in full, resuming after short writes.
async fn write_all_vectored(stream: &impl Socket, mut batch: Vec<OutBuf>) -> std::io::Result<()> {
    while !batch.is_empty() {
        let (result, returned) = stream.write_pieces(batch).await;
        batch = returned;
        let mut written = result?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut done = 0;
        for piece in batch.iter_mut() {
            let length = piece.bytes().len();
            if written >= length {
                written -= length;
                done += 1;
            } else {
                piece.advance(written);
                break;
            }
        }
        batch.drain(..done);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::AlignedBuf;
    use compio::io::AsyncReadExt;
    use compio::net::{TcpListener, TcpStream};

    /// A payload large enough that no socket buffer takes it at once.
    const LARGE_BYTES: usize = 16 << 20;

    fn payload(length: usize, seed: u8) -> SharedBuf {
        let mut buf = AlignedBuf::zeroed(length);
        for (index, byte) in buf.as_mut_slice().iter_mut().enumerate() {
            *byte = (index as u8).wrapping_mul(7) ^ seed;
        }
        SharedBuf::new(buf)
    }

    #[test]
    fn frames_and_a_payload_larger_than_the_socket_buffer_arrive_whole_and_in_order() {
        compio::runtime::Runtime::new().unwrap().block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let connecting =
                compio::runtime::spawn(async move { TcpStream::connect(address).await });
            let (mut accepted, _) = listener.accept().await.unwrap();
            let stream = Rc::new(connecting.await.unwrap().unwrap());
            let (outbox, writer) = Outbox::new(stream, "test".into());
            compio::runtime::spawn(writer).detach();

            let large = payload(LARGE_BYTES, 0x5a);
            let mut expected = Vec::new();
            // The payload takes the writer several short writes; the
            // frames on either side must stay on their side of it.
            outbox.send_bytes(b"first".to_vec());
            expected.extend_from_slice(b"first");
            outbox.send_update(b"header".to_vec(), large.clone());
            expected.extend_from_slice(b"header");
            expected.extend_from_slice(large.as_slice());
            outbox.send_bytes(b"last".to_vec());
            expected.extend_from_slice(b"last");

            let reading = compio::runtime::spawn(async move {
                let compio::BufResult(result, received) =
                    accepted.read_exact(vec![0u8; expected.len()]).await;
                result.unwrap();
                (received, expected)
            });
            outbox.drained().await;
            let (received, expected) = reading.await.unwrap();
            assert!(
                received == expected,
                "the bytes arrived changed or out of order"
            );
            outbox.close();
        });
    }
}
