//! Framed TCP over io_uring: a reader that yields whole frames out of a
//! reusable buffer, and an outbox whose writer task sends every queued frame
//! in one `writev`, update payloads straight from their shared buffers. Both
//! run over [`Socket`], which the primary engine's sockets (`replblk-ring`)
//! and the secondary's (compio) implement.

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

use compio::net::TcpListener;

/// How long [`listen`] keeps trying an address that is in use. A daemon
/// killed a moment ago was seen to still hold its listening socket, most
/// likely because the kernel tears a dead process's io_uring down after the
/// process is gone and the accept the ring had in flight keeps the socket
/// open until then.
pub const LISTEN_IN_USE_WAIT_MS: u64 = 5_000;
/// How often [`listen`] tries again meanwhile.
const LISTEN_RETRY_MS: u64 = 20;

/// Binds a listener to `address`, waiting up to [`LISTEN_IN_USE_WAIT_MS`]
/// (with `sleep`, the caller's runtime's) while it is in use; after that
/// (another process does listen there) the error is returned.
pub async fn bind_listener<S, F>(
    address: SocketAddr,
    sleep: S,
) -> std::io::Result<std::net::TcpListener>
where
    S: Fn(Duration) -> F,
    F: std::future::Future<Output = ()>,
{
    let deadline = Instant::now() + Duration::from_millis(LISTEN_IN_USE_WAIT_MS);
    loop {
        match std::net::TcpListener::bind(address) {
            Ok(listener) => return Ok(listener),
            Err(error)
                if error.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
            {
                sleep(Duration::from_millis(LISTEN_RETRY_MS)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Listens on `address` from the secondary's runtime (compio), as
/// [`bind_listener`] binds.
pub async fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::from_std(bind_listener(address, compio::time::sleep).await?)
}

/// Connects to `address` from the primary's ring, giving up after
/// `timeout`. Acks and small frames do not wait for Nagle's timer
/// (TCP_NODELAY).
pub async fn connect(
    address: SocketAddr,
    timeout: Duration,
) -> std::io::Result<crate::ring::io::TcpStream> {
    crate::ring::timeout(timeout, crate::ring::io::TcpStream::connect(address))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {address} timed out"),
            )
        })?
}
