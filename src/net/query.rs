//! A blocking client for tools: asks a node where its log stands.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::proto::{decode_frame, Frame, Hello, LogState, Role, PROTOCOL_VERSION};

/// Connects to the node at `address` as a tool, and returns its Hello and
/// LogState. Every step is bounded by `timeout`.
pub fn query_log_state(
    address: SocketAddr,
    volume_uuid: [u8; 16],
    timeout: Duration,
) -> Result<(Hello, LogState), String> {
    let mut stream =
        TcpStream::connect_timeout(&address, timeout).map_err(|e| format!("{address}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    Frame::Hello(Hello {
        volume_uuid,
        node_id: 0,
        protocol_version: PROTOCOL_VERSION,
        role: Role::Tool,
        epoch: 0,
    })
    .encode(&mut bytes);
    Frame::LogStateQuery.encode(&mut bytes);
    stream
        .write_all(&bytes)
        .map_err(|e| format!("{address}: sending: {e}"))?;
    let mut buffer = Vec::new();
    let mut hello = None;
    loop {
        match decode_frame(&buffer) {
            Ok((frame, length)) => {
                match frame {
                    Frame::Hello(their) => hello = Some(their),
                    // The handshake's LogState, then the query's answer.
                    Frame::LogState(state) => {
                        if let Some(hello) = hello {
                            return Ok((hello, state));
                        }
                        return Err(format!("{address}: LogState before Hello"));
                    }
                    Frame::Error(error) => {
                        return Err(format!(
                            "{address}: refused: {:?}: {}",
                            error.code, error.message
                        ))
                    }
                    other => return Err(format!("{address}: unexpected {:?}", other.kind())),
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
