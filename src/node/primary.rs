//! The primary's engine: [`crate::core::primary::Primary`] driven over
//! tokio-uring, with the O_DIRECT copy and one connection per secondary.
//!
//! Everything runs on one thread: the command task takes requests from the
//! [`super::volume::Volume`] channel, a task per secondary keeps its
//! connection (reconnecting as needed) and feeds its acks to the core, a
//! ticker drives the core's timers, and every event is followed by a `pump`
//! that executes the core's actions before the next event.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_uring::net::TcpStream;

use super::error::NodeError;
use super::volume::{Command, Payload, VolumeError, VolumeStatus};
use crate::buf::AlignedBuf;
use crate::config::{Config, NodeConfig};
use crate::core::primary::{
    Action, Geometry, MemberAck, MemberLog, Primary, PrimaryLimits, RequestId,
};
use crate::net::{self, FrameReader, Outbox};
use crate::proto::{
    encode_update_header, Ack, ErrorCode, ErrorFrame, Frame, Hello, LogState, Role, UpdateHeader,
    PROTOCOL_VERSION, UPDATE_DATA_MAX_BYTES, UPDATE_FLAG_FUA,
};
use crate::wal::LOG_HEADER_SIZE_BYTES;

/// How long a clean stop waits for in-flight requests and the final
/// all-acked notification.
pub const STOP_DRAIN_TIMEOUT_MS: u64 = 30_000;
/// Timeout of one connection attempt to a secondary.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;

struct Member {
    node_id: u32,
    address: SocketAddr,
    outbox: RefCell<Option<Rc<Outbox>>>,
}

struct Engine {
    volume_uuid: [u8; 16],
    node_id: u32,
    epoch: u64,
    core: RefCell<Primary<Payload>>,
    data: Rc<tokio_uring::fs::File>,
    members: Vec<Member>,
    replies: RefCell<HashMap<RequestId, oneshot::Sender<Result<(), VolumeError>>>>,
    next_request_id: Cell<RequestId>,
    stopping: Cell<bool>,
    reconnect_interval: Duration,
    clock: Instant,
}

/// A secondary's connection after the handshake.
struct Connection {
    stream: Rc<TcpStream>,
    reader: FrameReader,
    log: LogState,
}

pub(crate) fn run(
    config: Config,
    node_id: u32,
    commands: mpsc::Receiver<Command>,
    ready: std::sync::mpsc::Sender<()>,
) -> Result<(), NodeError> {
    let (node, data) = super::open_node_data(&config, node_id)?;
    let volume_uuid = *config.volume.uuid.as_bytes();
    let epoch = data.superblock().epoch;
    let direct = data.direct_file().map_err(|source| {
        NodeError::io(&node.data_path, "opening the copy with O_DIRECT", source)
    })?;
    let secondaries: Vec<NodeConfig> = config
        .secondaries_of(node_id)
        .into_iter()
        .cloned()
        .collect();
    tokio_uring::start(async move {
        let connections = connect_all(&config, &node, &secondaries, volume_uuid, epoch).await;
        let first_seq = starting_seq(&secondaries, &connections, epoch)?;
        let replication = config.replication;
        let limits = PrimaryLimits {
            window_updates_max: replication.window_updates_max,
            window_bytes_max: replication.window_bytes_max,
            all_acked_delay_ms: replication.all_acked_delay_ms,
            member_timeout_ms: replication.member_timeout_ms,
        };
        let geometry = Geometry {
            volume_size_bytes: config.volume.size_bytes,
            block_size_bytes: config.volume.block_size_bytes,
            write_max_bytes: UPDATE_DATA_MAX_BYTES as u32,
        };
        let engine = Rc::new(Engine {
            volume_uuid,
            node_id,
            epoch,
            core: RefCell::new(Primary::new(
                limits,
                geometry,
                &secondaries
                    .iter()
                    .map(|secondary| secondary.log_size_bytes - LOG_HEADER_SIZE_BYTES)
                    .collect::<Vec<u64>>(),
                first_seq,
                0,
            )),
            data: Rc::new(tokio_uring::fs::File::from_std(direct)),
            members: secondaries
                .iter()
                .map(|secondary| Member {
                    node_id: secondary.id,
                    address: secondary.address,
                    outbox: RefCell::new(None),
                })
                .collect(),
            replies: RefCell::new(HashMap::new()),
            next_request_id: Cell::new(1),
            stopping: Cell::new(false),
            reconnect_interval: Duration::from_millis(replication.reconnect_interval_ms),
            clock: Instant::now(),
        });
        tracing::info!(
            node = node_id,
            epoch,
            first_seq,
            secondaries = secondaries.len(),
            "primary started"
        );
        for (member, connection) in connections.into_iter().enumerate() {
            let engine = engine.clone();
            tokio_uring::spawn(async move { engine.member_loop(member, connection).await });
        }
        let ticker = engine.clone();
        let tick = Duration::from_millis((replication.all_acked_delay_ms / 2).max(1));
        tokio_uring::spawn(async move {
            while !ticker.stopping.get() {
                tokio::time::sleep(tick).await;
                let now = ticker.now_ms();
                ticker.core.borrow_mut().handle_timeout(now);
                ticker.pump();
            }
        });
        let _ = ready.send(());
        engine.command_loop(commands).await;
        engine.stop().await
    })
}

/// Connects to every secondary at once, retrying until each answers or
/// `startup_timeout_ms` passes.
async fn connect_all(
    config: &Config,
    node: &NodeConfig,
    secondaries: &[NodeConfig],
    volume_uuid: [u8; 16],
    epoch: u64,
) -> Vec<Option<Connection>> {
    let deadline = Instant::now() + Duration::from_millis(config.replication.startup_timeout_ms);
    let retry = Duration::from_millis(config.replication.reconnect_interval_ms);
    let tasks: Vec<_> = secondaries
        .iter()
        .map(|secondary| {
            let (address, expected) = (secondary.address, secondary.id);
            let node_id = node.id;
            tokio_uring::spawn(async move {
                loop {
                    match handshake(address, expected, volume_uuid, node_id, epoch).await {
                        Ok(connection) => return Some(connection),
                        Err(reason) if Instant::now() + retry >= deadline => {
                            tracing::warn!(secondary = expected, %address, %reason, "secondary did not answer at start-up");
                            return None;
                        }
                        Err(reason) => {
                            tracing::debug!(secondary = expected, %address, %reason, "retrying");
                            tokio::time::sleep(retry).await;
                        }
                    }
                }
            })
        })
        .collect();
    let mut connections = Vec::new();
    for task in tasks {
        connections.push(task.await.unwrap_or(None));
    }
    connections
}

/// Where the stream starts: where the secondaries' logs end. They must
/// agree, and none may be of a newer epoch than this primary.
fn starting_seq(
    secondaries: &[NodeConfig],
    connections: &[Option<Connection>],
    epoch: u64,
) -> Result<u64, NodeError> {
    if secondaries.is_empty() {
        return Ok(1);
    }
    let answered: Vec<(u32, LogState)> = secondaries
        .iter()
        .zip(connections)
        .filter_map(|(secondary, connection)| connection.as_ref().map(|c| (secondary.id, c.log)))
        .collect();
    if answered.is_empty() {
        return Err(NodeError::Startup {
            reason:
                "no secondary answered within startup_timeout_ms, so where the logs end is unknown"
                    .into(),
        });
    }
    if let Some((id, log)) = answered.iter().find(|(_, log)| log.epoch > epoch) {
        return Err(NodeError::Startup {
            reason: format!(
                "secondary {id}'s log is at epoch {} but this primary's copy is at epoch {epoch}: this node is not the current primary",
                log.epoch
            ),
        });
    }
    let first = answered[0].1.next_seq;
    if answered.iter().any(|(_, log)| log.next_seq != first) {
        let positions: Vec<String> = answered
            .iter()
            .map(|(id, log)| format!("node {id} next seq {}", log.next_seq))
            .collect();
        return Err(NodeError::Startup {
            reason: format!(
                "the secondaries' logs differ ({}); run replblk-resync first",
                positions.join(", ")
            ),
        });
    }
    Ok(first)
}

fn member_log(log: &LogState) -> MemberLog {
    MemberLog {
        start_seq: log.start_seq,
        next_seq: log.next_seq,
        used_bytes: log.used_bytes,
    }
}

/// Connects to a secondary and exchanges Hello and LogState.
async fn handshake(
    address: SocketAddr,
    expected_node_id: u32,
    volume_uuid: [u8; 16],
    node_id: u32,
    epoch: u64,
) -> Result<Connection, String> {
    let stream = net::connect(address, Duration::from_millis(CONNECT_TIMEOUT_MS))
        .await
        .map_err(|error| format!("connecting: {error}"))?;
    let stream = Rc::new(stream);
    let hello = Hello {
        volume_uuid,
        node_id,
        protocol_version: PROTOCOL_VERSION,
        role: Role::Primary,
        epoch,
    };
    let mut bytes = Vec::new();
    Frame::Hello(hello).encode(&mut bytes);
    let (result, _) = stream.write_all(bytes).await;
    result.map_err(|error| format!("sending Hello: {error}"))?;
    let mut reader = FrameReader::new(stream.clone(), address.to_string());
    let mut next = async || -> Result<Frame<'static>, String> {
        reader.fill().await.map_err(|error| error.to_string())?;
        let (frame, length) = reader.frame().map_err(|error| error.to_string())?;
        let owned = match frame {
            Frame::Hello(hello) => Frame::Hello(hello),
            Frame::LogState(log) => Frame::LogState(log),
            Frame::Error(error) => Frame::Error(error),
            other => {
                return Err(format!(
                    "unexpected {:?} during the handshake",
                    other.kind()
                ))
            }
        };
        reader.consume(length);
        Ok(owned)
    };
    let their_hello = match next().await? {
        Frame::Hello(hello) => hello,
        Frame::Error(error) => return Err(format!("refused: {:?}: {}", error.code, error.message)),
        _ => return Err("expected Hello".into()),
    };
    let log = match next().await? {
        Frame::LogState(log) => log,
        Frame::Error(error) => return Err(format!("refused: {:?}: {}", error.code, error.message)),
        _ => return Err("expected LogState".into()),
    };
    if their_hello.volume_uuid != volume_uuid || their_hello.node_id != expected_node_id {
        return Err(format!(
            "answered as node {} of volume {}, expected node {expected_node_id} of volume {}",
            their_hello.node_id,
            uuid::Uuid::from_bytes(their_hello.volume_uuid),
            uuid::Uuid::from_bytes(volume_uuid)
        ));
    }
    Ok(Connection {
        stream,
        reader,
        log,
    })
}

impl Engine {
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    async fn command_loop(self: &Rc<Self>, mut commands: mpsc::Receiver<Command>) {
        while let Some(command) = commands.recv().await {
            self.handle(command);
            // Take whatever else is queued before pumping, so updates that
            // arrive together leave together.
            while let Ok(command) = commands.try_recv() {
                self.handle(command);
            }
            self.pump();
        }
    }

    fn handle(self: &Rc<Self>, command: Command) {
        let now = self.now_ms();
        match command {
            Command::Write {
                offset_bytes,
                payload,
                fua,
                reply,
            } => {
                let id = self.next_request_id.get();
                self.next_request_id.set(id + 1);
                let length = payload.buf.len() as u32;
                let submitted = self.core.borrow_mut().submit_write(
                    id,
                    offset_bytes,
                    length,
                    fua,
                    payload,
                    now,
                );
                match submitted {
                    Ok(()) => {
                        self.replies.borrow_mut().insert(id, reply);
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error.into()));
                    }
                }
            }
            Command::Flush { reply } => {
                let id = self.next_request_id.get();
                self.next_request_id.set(id + 1);
                self.replies.borrow_mut().insert(id, reply);
                self.core.borrow_mut().submit_flush(id, now);
            }
            Command::Read {
                offset_bytes,
                length_bytes,
                reply,
            } => {
                let data = self.data.clone();
                tokio_uring::spawn(async move {
                    let buf = AlignedBuf::zeroed(length_bytes as usize);
                    let (result, buf) = data.read_exact_at(buf, offset_bytes).await;
                    let _ = reply.send(result.map(|()| buf).map_err(|error| VolumeError::Read {
                        offset_bytes,
                        reason: error.to_string(),
                    }));
                });
            }
            Command::Status { reply } => {
                let core = self.core.borrow();
                let members = self
                    .members
                    .iter()
                    .enumerate()
                    .map(|(index, member)| (member.node_id, core.is_connected(index)))
                    .collect();
                let _ = reply.send(VolumeStatus {
                    next_seq: core.next_seq(),
                    all_acked_seq: core.all_acked_seq(),
                    in_flight: core.in_flight(),
                    members,
                });
            }
        }
    }

    /// Executes the core's actions until it has none.
    fn pump(self: &Rc<Self>) {
        loop {
            let Some(action) = self.core.borrow_mut().poll_action() else {
                return;
            };
            match action {
                Action::LocalWrite {
                    seq,
                    offset_bytes,
                    payload,
                } => {
                    let engine = self.clone();
                    tokio_uring::spawn(async move {
                        let (result, _) = engine.data.write_all_at(payload.buf, offset_bytes).await;
                        let result = result.map_err(|error| error.to_string());
                        if let Err(reason) = &result {
                            tracing::error!(seq, %reason, "write to the primary's copy failed");
                        }
                        engine
                            .core
                            .borrow_mut()
                            .local_write_done(seq, result, engine.now_ms());
                        engine.pump();
                    });
                }
                Action::LocalSync { through_seq } => {
                    let engine = self.clone();
                    tokio_uring::spawn(async move {
                        let result = engine
                            .data
                            .sync_data()
                            .await
                            .map_err(|error| error.to_string());
                        if let Err(reason) = &result {
                            tracing::error!(%reason, "fdatasync of the primary's copy failed");
                        }
                        engine.core.borrow_mut().local_sync_done(
                            through_seq,
                            result,
                            engine.now_ms(),
                        );
                        engine.pump();
                    });
                }
                Action::SendUpdate {
                    member,
                    seq,
                    offset_bytes,
                    fua,
                    all_acked_seq,
                    payload,
                } => {
                    let header = UpdateHeader {
                        seq,
                        epoch: self.epoch,
                        offset_bytes,
                        length_bytes: payload.buf.len() as u32,
                        flags: if fua { UPDATE_FLAG_FUA } else { 0 },
                        all_acked_seq,
                    };
                    let mut bytes = Vec::with_capacity(64);
                    encode_update_header(&header, payload.crc32, &mut bytes);
                    if let Some(outbox) = self.members[member].outbox.borrow().as_ref() {
                        outbox.send_update(bytes, payload.buf);
                    }
                }
                Action::SendFlush { member, seq } => self.send(member, &Frame::Flush { seq }),
                Action::SendAllAcked { member, seq } => self.send(member, &Frame::AllAcked { seq }),
                Action::Complete { id, result } => {
                    if let Some(reply) = self.replies.borrow_mut().remove(&id) {
                        let _ = reply.send(result.map_err(VolumeError::from));
                    }
                }
                Action::MemberDropped { member } => {
                    tracing::error!(
                        secondary = self.members[member].node_id,
                        "secondary stayed away past member_timeout_ms: dropped from the volume; it needs a resync to rejoin"
                    );
                }
            }
        }
    }

    fn send(&self, member: usize, frame: &Frame<'_>) {
        if let Some(outbox) = self.members[member].outbox.borrow().as_ref() {
            outbox.send_frame(frame);
        }
    }

    /// Keeps a secondary connected for as long as the engine runs.
    async fn member_loop(self: Rc<Self>, member: usize, mut connection: Option<Connection>) {
        let (node_id, address) = (self.members[member].node_id, self.members[member].address);
        while !self.stopping.get() {
            let attached = match connection.take() {
                Some(connection) => Ok(connection),
                None => {
                    handshake(address, node_id, self.volume_uuid, self.node_id, self.epoch).await
                }
            };
            match attached {
                Ok(connection) => {
                    let result = self.serve_member(member, connection).await;
                    match result {
                        Err(reason) if !self.stopping.get() => {
                            tracing::warn!(secondary = node_id, %address, %reason, "secondary connection lost");
                        }
                        _ => {}
                    }
                }
                Err(reason) => {
                    tracing::debug!(secondary = node_id, %address, %reason, "cannot reach secondary")
                }
            }
            if self.core.borrow().is_dropped(member) {
                return;
            }
            tokio::time::sleep(self.reconnect_interval).await;
        }
    }

    async fn serve_member(
        self: &Rc<Self>,
        member: usize,
        connection: Connection,
    ) -> Result<(), String> {
        let Connection {
            stream,
            mut reader,
            log,
        } = connection;
        let outbox = Outbox::start(stream, reader.peer().to_owned());
        *self.members[member].outbox.borrow_mut() = Some(outbox.clone());
        let connected =
            self.core
                .borrow_mut()
                .member_connected(member, member_log(&log), self.now_ms());
        if let Err(refusal) = connected {
            outbox.send_frame(&Frame::Error(ErrorFrame::new(
                ErrorCode::OutOfSync,
                refusal.to_string(),
            )));
            outbox.drained().await;
            self.detach(member, &outbox);
            return Err(refusal.to_string());
        }
        tracing::info!(
            secondary = self.members[member].node_id,
            log_next_seq = log.next_seq,
            "secondary connected"
        );
        self.pump();
        let result = self.read_acks(member, &mut reader, &outbox).await;
        self.detach(member, &outbox);
        result
    }

    async fn read_acks(
        self: &Rc<Self>,
        member: usize,
        reader: &mut FrameReader,
        outbox: &Rc<Outbox>,
    ) -> Result<(), String> {
        loop {
            reader.fill().await.map_err(|error| error.to_string())?;
            while reader.has_frame() {
                let (frame, length) = reader.frame().map_err(|error| error.to_string())?;
                match frame {
                    Frame::Ack(Ack {
                        logged_seq,
                        durable_seq,
                        cleared_seq,
                    }) => {
                        let now = self.now_ms();
                        let ack = MemberAck {
                            logged_seq,
                            durable_seq,
                            cleared_seq,
                        };
                        let acked = self.core.borrow_mut().ack_received(member, ack, now);
                        if let Err(violation) = acked {
                            outbox.send_frame(&Frame::Error(ErrorFrame::new(
                                ErrorCode::BadFrame,
                                violation.to_string(),
                            )));
                            return Err(violation.to_string());
                        }
                    }
                    Frame::LogState(_) => {}
                    Frame::Error(error) => {
                        return Err(format!(
                            "secondary sent error {:?}: {}",
                            error.code, error.message
                        ))
                    }
                    other => {
                        let reason = format!("a secondary may not send {:?}", other.kind());
                        outbox.send_frame(&Frame::Error(ErrorFrame::new(
                            ErrorCode::BadFrame,
                            reason.clone(),
                        )));
                        return Err(reason);
                    }
                }
                reader.consume(length);
            }
            self.pump();
        }
    }

    fn detach(self: &Rc<Self>, member: usize, outbox: &Rc<Outbox>) {
        outbox.close();
        self.members[member].outbox.borrow_mut().take();
        self.core
            .borrow_mut()
            .member_disconnected(member, self.now_ms());
        self.pump();
    }

    /// Waits for everything submitted to complete and the final all-acked
    /// point to be sent, then syncs the copy and closes the connections.
    async fn stop(self: &Rc<Self>) -> Result<(), NodeError> {
        let deadline = Instant::now() + Duration::from_millis(STOP_DRAIN_TIMEOUT_MS);
        while !self.core.borrow().is_quiescent() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let quiescent = self.core.borrow().is_quiescent();
        self.stopping.set(true);
        for member in &self.members {
            let outbox = member.outbox.borrow().clone();
            if let Some(outbox) = outbox {
                outbox.drained().await;
                outbox.close();
            }
        }
        self.data
            .sync_data()
            .await
            .map_err(|error| NodeError::Fatal {
                reason: format!("final fdatasync of the primary's copy: {error}"),
            })?;
        if let Some(reason) = self.core.borrow().failure() {
            return Err(NodeError::Fatal {
                reason: reason.to_owned(),
            });
        }
        if !quiescent {
            return Err(NodeError::Fatal {
                reason: format!("requests still in flight after {STOP_DRAIN_TIMEOUT_MS} ms (a secondary unreachable?)"),
            });
        }
        tracing::info!(
            all_acked_seq = self.core.borrow().all_acked_seq(),
            "primary stopped"
        );
        Ok(())
    }
}
