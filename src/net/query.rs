//! A blocking client for tools: asks a node how it stands.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::proto::{decode_frame, Frame, Hello, LogState, Role, VolumeState, PROTOCOL_VERSION};

/// What a node answers a tool's Hello with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeReport {
    /// A secondary: its Hello and where its log stands.
    Secondary {
        /// The node's Hello.
        hello: Hello,
        /// Its log.
        log: LogState,
    },
    /// A running primary: its Hello and how its volume stands.
    Primary {
        /// The node's Hello.
        hello: Hello,
        /// Its volume.
        volume: VolumeState,
    },
}

/// Connects to the node at `address` as a tool and returns what it says
/// of itself: a secondary answers the Hello with its Hello and LogState, a
/// primary with its Hello and VolumeState. Every step is bounded by
/// `timeout`.
pub fn query_node(
    address: SocketAddr,
    volume_uuid: [u8; 16],
    timeout: Duration,
) -> Result<NodeReport, String> {
    let mut stream =
        TcpStream::connect_timeout(&address, timeout).map_err(|e| format!("{address}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    // The Hello alone: both answers come without a query, and a peer that
    // closes with bytes unread would reset the connection under its answer.
    Frame::Hello(Hello {
        volume_uuid,
        node_id: 0,
        protocol_version: PROTOCOL_VERSION,
        role: Role::Tool,
        epoch: 0,
    })
    .encode(&mut bytes);
    stream
        .write_all(&bytes)
        .map_err(|e| format!("{address}: sending: {e}"))?;
    let mut buffer = Vec::new();
    let mut hello = None;
    loop {
        match decode_frame(&buffer) {
            Ok((frame, length)) => {
                match (frame, hello) {
                    (Frame::Hello(their), None) => hello = Some(their),
                    (Frame::LogState(log), Some(hello)) if hello.role == Role::Secondary => {
                        return Ok(NodeReport::Secondary { hello, log });
                    }
                    (Frame::VolumeState(volume), Some(hello)) if hello.role == Role::Primary => {
                        return Ok(NodeReport::Primary { hello, volume });
                    }
                    (Frame::Error(error), _) => {
                        return Err(format!(
                            "{address}: refused: {:?}: {}",
                            error.code, error.message
                        ))
                    }
                    (other, hello) => {
                        return Err(format!(
                            "{address}: unexpected {:?} after {}",
                            other.kind(),
                            hello.map_or("nothing".to_owned(), |hello| format!(
                                "a Hello of role {:?}",
                                hello.role
                            ))
                        ))
                    }
                }
                buffer.drain(..length);
            }
            Err(error) if error.is_truncated() => {
                let mut chunk = [0u8; 4096];
                let read = stream
                    .read(&mut chunk)
                    .map_err(|e| format!("{address}: reading: {e}"))?;
                if read == 0 {
                    return Err(format!("{address}: closed by peer"));
                }
                buffer.extend_from_slice(&chunk[..read]);
            }
            Err(error) => return Err(format!("{address}: {error}")),
        }
    }
}

/// [`query_node`] for a node that must be a secondary: its Hello and
/// LogState.
pub fn query_log_state(
    address: SocketAddr,
    volume_uuid: [u8; 16],
    timeout: Duration,
) -> Result<(Hello, LogState), String> {
    match query_node(address, volume_uuid, timeout)? {
        NodeReport::Secondary { hello, log } => Ok((hello, log)),
        NodeReport::Primary { hello, .. } => Err(format!(
            "{address}: node {} is the running primary, which keeps no log",
            hello.node_id
        )),
    }
}
