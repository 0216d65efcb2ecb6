//! The running primary's answer to tools: on its own configured address it
//! takes a tool's Hello (`replblk-ctl status`) and answers with its Hello
//! and a [`VolumeState`]: the volume's progress and, per secondary, whether
//! it is connected and how often its log held writes back.
//!
//! Only tools may connect, and each connection gets one answer; nothing a
//! tool sends reaches the engine's core.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use crate::ring::io::{TcpListener, TcpStream};

use crate::buf::AlignedBuf;
use crate::net::FrameReader;
use crate::proto::{ErrorCode, ErrorFrame, Frame, Hello, Role, VolumeState};

/// Bytes read at a time while waiting for a tool to close.
const TOOL_TAIL_READ_BYTES: usize = 512;

/// What the server needs of the engine.
pub(crate) trait VolumeReport {
    /// The primary's Hello.
    fn hello(&self) -> Hello;
    /// How the volume stands now.
    fn volume_state(&self) -> VolumeState;
    /// False once the engine is stopping.
    fn serving(&self) -> bool;
}

/// Binds `address` for tools. A primary that cannot (the port is taken)
/// still serves its volume; only the status of it is missing, and that is
/// logged.
pub(crate) async fn listen(address: SocketAddr) -> Option<TcpListener> {
    let bound = crate::net::bind_listener(address, crate::ring::sleep).await;
    match bound.and_then(TcpListener::from_std) {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::warn!(%address, %error, "cannot listen for tools; replblk-ctl status will not reach this primary");
            None
        }
    }
}

/// Answers every tool that connects, until the engine stops. Each exchange
/// is bounded by `timeout`.
pub(crate) async fn serve(
    listener: TcpListener,
    report: Rc<impl VolumeReport + 'static>,
    timeout: Duration,
) {
    while report.serving() {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting a tool's connection failed");
                crate::ring::sleep(timeout.min(Duration::from_millis(100))).await;
                continue;
            }
        };
        let report = report.clone();
        crate::ring::spawn(async move {
            let exchange = answer(Rc::new(stream), peer, &*report);
            match crate::ring::timeout(timeout, exchange).await {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => tracing::warn!(%peer, %reason, "tool connection refused"),
                Err(_) => {
                    tracing::warn!(%peer, timeout_ms = timeout.as_millis() as u64, "tool connection timed out")
                }
            }
        })
        .detach();
    }
}

/// Reads the tool's Hello, answers, and waits for the tool to close: a
/// socket closed with bytes unread would reset the connection under the
/// answer.
async fn answer(
    stream: Rc<TcpStream>,
    peer: SocketAddr,
    report: &impl VolumeReport,
) -> Result<(), String> {
    let mut reader = FrameReader::new(stream.clone(), peer.to_string());
    reader.fill().await.map_err(|error| error.to_string())?;
    let refusal = {
        let (frame, length) = reader.frame().map_err(|error| error.to_string())?;
        let refusal = match frame {
            Frame::Hello(hello) => refusal_of(&hello, &report.hello()),
            other => Some(ErrorFrame::new(
                ErrorCode::BadFrame,
                format!("expected Hello, got {:?}", other.kind()),
            )),
        };
        reader.consume(length);
        refusal
    };
    let mut bytes = Vec::new();
    match &refusal {
        Some(error) => Frame::Error(error.clone()).encode(&mut bytes),
        None => {
            Frame::Hello(report.hello()).encode(&mut bytes);
            Frame::VolumeState(report.volume_state()).encode(&mut bytes);
        }
    }
    stream
        .write_all_bytes(bytes)
        .await
        .map_err(|error| format!("answering: {error}"))?;
    if let Some(error) = refusal {
        return Err(error.message);
    }
    // Until the tool closes; anything it sends meanwhile is not for us.
    let mut buffer = AlignedBuf::zeroed(TOOL_TAIL_READ_BYTES);
    loop {
        let (result, returned) = stream.read_into(buffer, 0..TOOL_TAIL_READ_BYTES).await;
        buffer = returned;
        match result {
            Ok(0) | Err(_) => return Ok(()),
            Ok(_) => {}
        }
    }
}

/// Why a connection with `hello` is refused by the primary saying `ours`,
/// if it is.
fn refusal_of(hello: &Hello, ours: &Hello) -> Option<ErrorFrame> {
    if let Some(error) = hello.refusal(ours.volume_uuid) {
        return Some(error);
    }
    if hello.role != Role::Tool {
        return Some(ErrorFrame::new(
            ErrorCode::BadFrame,
            format!(
                "node {} is the running primary and takes connections from tools only, not from a {:?}",
                ours.node_id, hello.role
            ),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::PROTOCOL_VERSION;

    fn hello(role: Role) -> Hello {
        Hello {
            volume_uuid: [7; 16],
            node_id: 1,
            protocol_version: PROTOCOL_VERSION,
            role,
            epoch: 3,
        }
    }

    #[test]
    fn only_a_tool_of_the_same_volume_and_version_is_answered() {
        let ours = hello(Role::Primary);
        assert_eq!(refusal_of(&hello(Role::Tool), &ours), None);
        let code = |peer: Hello| refusal_of(&peer, &ours).map(|error| error.code);
        assert_eq!(code(hello(Role::Secondary)), Some(ErrorCode::BadFrame));
        assert_eq!(code(hello(Role::Primary)), Some(ErrorCode::BadFrame));
        let mut other_volume = hello(Role::Tool);
        other_volume.volume_uuid = [8; 16];
        assert_eq!(code(other_volume), Some(ErrorCode::WrongVolume));
        let mut other_version = hello(Role::Tool);
        other_version.protocol_version = PROTOCOL_VERSION + 1;
        assert_eq!(code(other_version), Some(ErrorCode::ProtocolVersion));
    }
}
