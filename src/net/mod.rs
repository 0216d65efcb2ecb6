//! Framed TCP over io_uring: a reader that yields whole frames out of a
//! reusable buffer, and an outbox whose writer task sends every queued frame
//! in one `writev`, update payloads straight from their shared buffers. Both
//! run over [`Socket`], which compio's sockets implement.

mod outbox;
mod query;
mod reader;
mod socket;

pub use outbox::{OutBuf, Outbox};
pub use query::{query_log_state, query_node, NodeReport};
pub use reader::{
    DirectUpdates, FrameReader, NetError, DIRECT_FRAME_MIN_BYTES, SHARED_READ_BYTES_MAX,
};
pub use socket::{ReadBuf, Socket};

use std::net::SocketAddr;
use std::time::Duration;

use compio::net::TcpStream;

/// Connects to `address` from the primary's runtime, giving up after
/// `timeout`.
pub async fn connect(address: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = compio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {address} timed out"),
            )
        })??;
    // Acks and small frames must not wait for Nagle's timer.
    stream.set_nodelay(true)?;
    Ok(stream)
}
