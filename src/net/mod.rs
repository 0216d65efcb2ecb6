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
use std::time::{Duration, Instant};

use compio::net::{TcpListener, TcpStream};

/// How long [`listen`] keeps trying an address that is in use. A daemon
/// killed a moment ago was seen to still hold its listening socket, most
/// likely because the kernel tears a dead process's io_uring down after the
/// process is gone and the accept the ring had in flight keeps the socket
/// open until then.
pub const LISTEN_IN_USE_WAIT_MS: u64 = 5_000;
/// How often [`listen`] tries again meanwhile.
const LISTEN_RETRY_MS: u64 = 20;

/// Listens on `address` from the daemons' runtime, waiting up to
/// [`LISTEN_IN_USE_WAIT_MS`] while it is in use; after that (another
/// process does listen there) the error is returned.
pub async fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_millis(LISTEN_IN_USE_WAIT_MS);
    loop {
        match std::net::TcpListener::bind(address) {
            Ok(listener) => return TcpListener::from_std(listener),
            Err(error)
                if error.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
            {
                compio::time::sleep(Duration::from_millis(LISTEN_RETRY_MS)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

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
