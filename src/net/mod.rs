//! Framed TCP over tokio-uring: a reader that yields whole frames out of a
//! reusable buffer, and an outbox whose writer task sends every queued frame
//! in one `writev`, update payloads straight from their shared buffers.

mod outbox;
mod query;
mod reader;

pub use outbox::{OutBuf, Outbox};
pub use query::{query_log_state, query_node, NodeReport};
pub use reader::{
    DirectUpdates, FrameReader, NetError, DIRECT_FRAME_MIN_BYTES, SHARED_READ_BYTES_MAX,
};

use std::net::SocketAddr;
use std::time::Duration;

use tokio_uring::net::TcpStream;

/// Connects to `address`, giving up after `timeout`.
pub async fn connect(address: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
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
