//! The primary's engine: [`crate::core::primary::Primary`] driven on the
//! engine thread's own loop (`replblk-ring`), with the O_DIRECT copy and one connection per secondary.
//!
//! Everything runs on one thread: the command task takes requests from the
//! [`super::volume::Volume`] channel, a task per secondary keeps its
//! connection (reconnecting as needed) and feeds its acks to the core, a
//! timer drives the core's deadlines, and every event is followed by a `pump`
//! that executes the core's actions before the next event.
//!
//! At start-up, before the volume takes requests, the engine catches up
//! after an unclean stop: it reads back from the secondaries' logs every
//! record still in one (see [`crate::core::catch_up`]), writes them again in
//! seq order to its own copy and to every secondary whose log lacks them,
//! and flushes. New writes then continue the stream where the longest log
//! ended.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use slab::Slab;
use tokio::sync::{mpsc, oneshot, Notify};

use super::error::NodeError;
use super::replies::Replies;
use super::volume::{Command, MemberStatus, Payload, ReplySink, VolumeError, VolumeStatus};
use crate::buf::{AlignedBuf, SharedBuf};
use crate::config::{Config, NodeConfig};
use crate::core::catch_up::{plan_catch_up, CatchUpPlan};
use crate::core::primary::{
    Action, Geometry, MemberAck, MemberLog, MemberStats, Primary, PrimaryLimits, RequestId,
};
use crate::net::{self, FrameReader, Outbox};
use crate::proto::{
    encode_update_header, Ack, ErrorCode, ErrorFrame, Frame, Hello, LogState, Role, UpdateHeader,
    VolumeMember, VolumeState, PROTOCOL_VERSION, UPDATE_DATA_MAX_BYTES, UPDATE_FLAG_FUA,
};
use crate::ring::io::{File, TcpStream};
use crate::wal::LOG_HEADER_SIZE_BYTES;

/// How long a clean stop waits for in-flight requests and the final
/// all-acked notification.
pub const STOP_DRAIN_TIMEOUT_MS: u64 = 30_000;
/// Timeout of one connection attempt to a secondary.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// How often the engine logs the waits for log room of the interval past,
/// for each secondary that had any.
pub const LOG_FULL_REPORT_INTERVAL_MS: u64 = 10_000;

struct Member {
    node_id: u32,
    address: SocketAddr,
    outbox: RefCell<Option<Rc<Outbox>>>,
    /// The connection's socket, to shut down when the core gives up on an
    /// unresponsive member (its writer may be stuck in a send).
    stream: RefCell<Option<Rc<TcpStream>>>,
}

/// The engine's state, shared by its tasks on its one thread.
pub(crate) struct Engine {
    volume_uuid: [u8; 16],
    node_id: u32,
    epoch: u64,
    core: RefCell<Primary<Payload>>,
    data: Rc<File>,
    members: Vec<Member>,
    /// Each request's waiter, by request id.
    replies: RefCell<Replies>,
    /// The copy's writes in the ring, by the token the ring tells.
    local_writes: RefCell<Slab<LocalWrite>>,
    stopping: Cell<bool>,
    /// False once the volume's channel closed: the engine is stopping and
    /// takes no more requests, from the channel or from a hosted frontend.
    accepting: Cell<bool>,
    reconnect_interval: Duration,
    /// Longest wait for a secondary's answer to the handshake.
    handshake_timeout: Duration,
    /// When the engine's ring started: the core's milliseconds
    /// (`ring::now_ms`) count from it.
    clock: Instant,
    /// The crc32 last computed for an update that came without one, by seq.
    last_crc32: Cell<Option<(u64, u32)>>,
    /// Wakes the timer task when the core's next deadline comes earlier
    /// than the one it sleeps until.
    timer_rearm: Notify,
    /// The deadline (engine ms) the timer task sleeps until; `Some(0)`
    /// while it runs, `None` while no deadline exists.
    timer_armed_ms: Cell<Option<u64>>,
    /// Log-full waits already handed to the reporter task.
    log_full_waits_seen: Cell<u64>,
    /// Wakes the reporter task when a log-full wait begins.
    log_full_began: Notify,
}

/// A write to the primary's copy, in the ring.
struct LocalWrite {
    seq: u64,
    offset_bytes: u64,
    /// Written so far: a short write is continued.
    done_bytes: usize,
    payload: SharedBuf,
}

/// A secondary's connection after the handshake.
struct Connection {
    stream: Rc<TcpStream>,
    reader: FrameReader<TcpStream>,
    log: LogState,
    /// The last Ack read while the log was being read back, for the core
    /// once the secondary is a member.
    early_ack: Option<Ack>,
}

/// A record read back from a secondary's log at start-up.
struct CaughtUp {
    seq: u64,
    offset_bytes: u64,
    fua: bool,
    payload: Payload,
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
    let ring = crate::ring::Ring::new().map_err(|error| NodeError::Fatal {
        reason: format!("setting up the engine's io_uring: {error}"),
    })?;
    ring.block_on(async move {
        // Inside the ring, to be registered with it (`File::from_std`).
        let direct = File::from_std(direct);
        let mut connections = connect_all(&config, &node, &secondaries, volume_uuid, epoch).await;
        let plan = plan_start(&secondaries, &connections, epoch)?;
        let startup_timeout = Duration::from_millis(config.replication.startup_timeout_ms);
        let records = crate::ring::timeout(
            startup_timeout,
            read_back(&secondaries, &mut connections, &plan, epoch),
        )
        .await
        .map_err(|_| NodeError::Startup {
            reason: format!(
                "reading records back from the secondaries' logs took longer than startup_timeout_ms ({} ms)",
                startup_timeout.as_millis()
            ),
        })??;
        let replication = config.replication;
        let limits = PrimaryLimits {
            window_updates_max: replication.window_updates_max,
            window_bytes_max: replication.window_bytes_max,
            all_acked_delay_ms: replication.all_acked_delay_ms,
            member_timeout_ms: replication.member_timeout_ms,
            ack_timeout_ms: replication.ack_timeout_ms,
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
                plan.first_seq,
                plan.end_seq,
                0,
            )),
            data: Rc::new(direct),
            members: secondaries
                .iter()
                .map(|secondary| Member {
                    node_id: secondary.id,
                    address: secondary.address,
                    outbox: RefCell::new(None),
                    stream: RefCell::new(None),
                })
                .collect(),
            replies: RefCell::new(Replies::default()),
            local_writes: RefCell::new(Slab::new()),
            stopping: Cell::new(false),
            accepting: Cell::new(true),
            reconnect_interval: Duration::from_millis(replication.reconnect_interval_ms),
            handshake_timeout: Duration::from_millis(replication.ack_timeout_ms),
            clock: crate::ring::started(),
            last_crc32: Cell::new(None),
            timer_rearm: Notify::new(),
            timer_armed_ms: Cell::new(Some(0)),
            log_full_waits_seen: Cell::new(0),
            log_full_began: Notify::new(),
        });
        let timer = engine.clone();
        crate::ring::spawn(async move { timer.run_timer().await }).detach();
        let reporter = engine.clone();
        crate::ring::spawn(async move { reporter.report_log_full_waits().await }).detach();
        if let Some(listener) = super::tool_server::listen(node.address).await {
            let timeout = engine.handshake_timeout;
            crate::ring::spawn(super::tool_server::serve(listener, engine.clone(), timeout))
                .detach();
        }
        let caught_up = engine.submit_catch_up(records)?;
        for (member, connection) in connections.into_iter().enumerate() {
            if let Some(connection) = &connection {
                let lacking = plan.end_seq - connection.log.next_seq;
                if lacking > 0 {
                    tracing::info!(
                        secondary = secondaries[member].id,
                        records = lacking,
                        from_seq = connection.log.next_seq,
                        to_seq = plan.end_seq,
                        "catching up a secondary whose log lacks records"
                    );
                }
            }
            let engine = engine.clone();
            crate::ring::spawn(async move { engine.member_loop(member, connection).await })
                .detach();
        }
        engine.finish_catch_up(&plan, caught_up).await?;
        tracing::info!(
            node = node_id,
            epoch,
            next_seq = plan.end_seq,
            secondaries = secondaries.len(),
            "primary started"
        );
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
            crate::ring::spawn(async move {
                loop {
                    match handshake(address, expected, volume_uuid, node_id, epoch).await {
                        Ok(connection) => return Some(connection),
                        Err(reason) if Instant::now() + retry >= deadline => {
                            tracing::warn!(secondary = expected, %address, %reason, "secondary did not answer at start-up");
                            return None;
                        }
                        Err(reason) => {
                            tracing::debug!(secondary = expected, %address, %reason, "retrying");
                            crate::ring::sleep(retry).await;
                        }
                    }
                }
            })
        })
        .collect::<Vec<_>>();
    let mut connections = Vec::new();
    for task in tasks {
        connections.push(task.await);
    }
    connections
}

/// Where the stream resumes and what to catch up first: every record still
/// in a secondary's log (see [`crate::core::catch_up`]). None of them may
/// be of a newer epoch than this primary, and every seq from the lowest
/// start of a log to the highest end must be in some log.
fn plan_start(
    secondaries: &[NodeConfig],
    connections: &[Option<Connection>],
    epoch: u64,
) -> Result<CatchUpPlan, NodeError> {
    if secondaries.is_empty() {
        return Ok(CatchUpPlan {
            first_seq: 1,
            end_seq: 1,
            reads: Vec::new(),
        });
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
    let logs: Vec<Option<MemberLog>> = connections
        .iter()
        .map(|connection| connection.as_ref().map(|c| member_log(&c.log)))
        .collect();
    plan_catch_up(&logs).map_err(|error| {
        let positions: Vec<String> = secondaries
            .iter()
            .zip(connections)
            .map(|(secondary, connection)| match connection {
                Some(c) => format!(
                    "node {} holds seqs {}..{}",
                    secondary.id, c.log.start_seq, c.log.next_seq
                ),
                None => format!("node {} did not answer", secondary.id),
            })
            .collect();
        NodeError::Startup {
            reason: format!("{error} ({})", positions.join(", ")),
        }
    })
}

/// Reads back every record the plan names, in seq order, each from the
/// secondary the plan picked.
async fn read_back(
    secondaries: &[NodeConfig],
    connections: &mut [Option<Connection>],
    plan: &CatchUpPlan,
    epoch: u64,
) -> Result<Vec<CaughtUp>, NodeError> {
    let mut records = Vec::with_capacity(plan.records() as usize);
    for read in &plan.reads {
        let node_id = secondaries[read.member].id;
        let connection = connections[read.member]
            .as_mut()
            .expect("the plan reads only from secondaries that answered");
        let from = records.len();
        read_log(connection, read.from_seq, read.to_seq, epoch, &mut records)
            .await
            .map_err(|reason| NodeError::Startup {
                reason: format!(
                    "reading seqs {}..{} back from secondary {node_id}'s log: {reason}",
                    read.from_seq, read.to_seq
                ),
            })?;
        let bytes: usize = records[from..]
            .iter()
            .map(|record| record.payload.buf.len())
            .sum();
        tracing::info!(
            secondary = node_id,
            from_seq = read.from_seq,
            to_seq = read.to_seq,
            records = records.len() - from,
            bytes,
            "read records back from a secondary's log"
        );
    }
    Ok(records)
}

/// Sends LogRead for `from_seq..to_seq` and takes the records it answers
/// with, checking that they come in order, complete, and of no newer epoch.
async fn read_log(
    connection: &mut Connection,
    from_seq: u64,
    to_seq: u64,
    epoch: u64,
    records: &mut Vec<CaughtUp>,
) -> Result<(), String> {
    let mut bytes = Vec::new();
    Frame::LogRead { from_seq, to_seq }.encode(&mut bytes);
    connection
        .stream
        .write_all_bytes(bytes)
        .await
        .map_err(|error| format!("sending LogRead: {error}"))?;
    let mut expected_seq = from_seq;
    loop {
        let reader = &mut connection.reader;
        reader.fill().await.map_err(|error| error.to_string())?;
        let (frame, length, data_crc32) = reader
            .frame_with_data_crc()
            .map_err(|error| error.to_string())?;
        match frame {
            Frame::Update { header, data } => {
                let data_crc32 = data_crc32.expect("an Update's data crc");
                if header.seq != expected_seq || header.seq >= to_seq {
                    return Err(format!(
                        "record seq {} arrived when seq {expected_seq} was expected",
                        header.seq
                    ));
                }
                if header.epoch > epoch {
                    return Err(format!(
                        "record seq {} is of epoch {}, newer than this primary's epoch {epoch}",
                        header.seq, header.epoch
                    ));
                }
                records.push(CaughtUp {
                    seq: header.seq,
                    offset_bytes: header.offset_bytes,
                    fua: header.fua(),
                    payload: Payload {
                        buf: SharedBuf::new(AlignedBuf::copy_from(data)),
                        crc32: Some(data_crc32),
                    },
                });
                expected_seq += 1;
            }
            Frame::LogReadEnd { next_seq } => {
                if next_seq != to_seq || expected_seq != to_seq {
                    return Err(format!(
                        "LogReadEnd at seq {next_seq} after records up to seq {} of {from_seq}..{to_seq}",
                        expected_seq - 1
                    ));
                }
                reader.consume(length);
                return Ok(());
            }
            // The first Ack of a new connection may come before the
            // records; the core takes it once the secondary is a member.
            Frame::Ack(ack) => connection.early_ack = Some(ack),
            Frame::Error(error) => {
                return Err(format!("refused: {:?}: {}", error.code, error.message))
            }
            other => {
                return Err(format!(
                    "unexpected {:?} while reading the log back",
                    other.kind()
                ))
            }
        }
        reader.consume(length);
    }
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
    stream
        .write_all_bytes(bytes)
        .await
        .map_err(|error| format!("sending Hello: {error}"))?;
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
        early_ack: None,
    })
}

/// The ring's answers for the copy's writes, by their keys in
/// `Engine::local_writes`.
impl crate::ring::Completions for Engine {
    fn completed(self: Rc<Self>, token: u64, result: i32) {
        let key = usize::try_from(token).expect("tokens are table keys");
        self.local_write_done(key, result);
    }
}

impl super::tool_server::VolumeReport for Engine {
    fn hello(&self) -> Hello {
        Hello {
            volume_uuid: self.volume_uuid,
            node_id: self.node_id,
            protocol_version: PROTOCOL_VERSION,
            role: Role::Primary,
            epoch: self.epoch,
        }
    }

    fn volume_state(&self) -> VolumeState {
        let status = self.status();
        VolumeState {
            epoch: self.epoch,
            next_seq: status.next_seq,
            all_acked_seq: status.all_acked_seq,
            in_flight: u32::try_from(status.in_flight).unwrap_or(u32::MAX),
            members: status
                .members
                .iter()
                .map(|member| VolumeMember {
                    node_id: member.node_id,
                    connected: member.connected,
                    log_full_waits: member.stats.log_full_waits,
                    log_full_wait_ms: member.stats.log_full_wait_ms,
                })
                .collect(),
        }
    }

    fn serving(&self) -> bool {
        !self.stopping.get()
    }
}

impl Engine {
    /// How the volume stands now: for `Volume::status` and for tools.
    fn status(&self) -> VolumeStatus {
        let core = self.core.borrow();
        VolumeStatus {
            next_seq: core.next_seq(),
            all_acked_seq: core.all_acked_seq(),
            in_flight: core.in_flight(),
            members: self
                .members
                .iter()
                .enumerate()
                .map(|(index, member)| MemberStatus {
                    node_id: member.node_id,
                    connected: core.is_connected(index),
                    stats: core.member_stats(index),
                })
                .collect(),
        }
    }

    /// The core's clock: the ring's turn time, not a fresh reading. The
    /// core's deadlines are in milliseconds, and a write would otherwise
    /// read the clock at each of its events.
    fn now_ms(&self) -> u64 {
        crate::ring::now_ms()
    }

    /// Submits the records read back, in seq order, then a flush; returns
    /// what each will complete through.
    fn submit_catch_up(
        self: &Rc<Self>,
        records: Vec<CaughtUp>,
    ) -> Result<Vec<oneshot::Receiver<Result<(), VolumeError>>>, NodeError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.now_ms();
        let mut completions = Vec::with_capacity(records.len() + 1);
        for record in records {
            let (reply, done) = oneshot::channel();
            let id = self.replies.borrow_mut().insert_channel(reply);
            let length = record.payload.buf.len() as u32;
            self.core
                .borrow_mut()
                .submit_catch_up(
                    id,
                    record.seq,
                    record.offset_bytes,
                    length,
                    record.fua,
                    record.payload,
                    now,
                )
                .map_err(|error| NodeError::Startup {
                    reason: error.to_string(),
                })?;
            completions.push(done);
        }
        // Then everything durable everywhere before the volume takes
        // requests: the flush covers every write submitted before it.
        let (reply, done) = oneshot::channel();
        let id = self.replies.borrow_mut().insert_channel(reply);
        self.core.borrow_mut().submit_flush(id, now);
        completions.push(done);
        self.pump();
        Ok(completions)
    }

    /// Waits until every caught-up record and the flush after them
    /// completed.
    async fn finish_catch_up(
        self: &Rc<Self>,
        plan: &CatchUpPlan,
        completions: Vec<oneshot::Receiver<Result<(), VolumeError>>>,
    ) -> Result<(), NodeError> {
        if completions.is_empty() {
            return Ok(());
        }
        tracing::info!(
            records = plan.records(),
            from_seq = plan.first_seq,
            to_seq = plan.end_seq,
            "catching up: writing the records again to the primary's copy and to every secondary that lacks them"
        );
        for done in completions {
            let result = done.await.unwrap_or(Err(VolumeError::Stopped));
            result.map_err(|error| NodeError::Startup {
                reason: format!("catching up after a restart: {error}"),
            })?;
        }
        tracing::info!(
            records = plan.records(),
            from_seq = plan.first_seq,
            to_seq = plan.end_seq,
            "caught up: every copy holds every record the logs held, durably"
        );
        Ok(())
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
        self.accepting.set(false);
    }

    /// The requests' waiters, for [`super::replies::LocalReply`].
    pub(crate) fn replies(&self) -> &RefCell<Replies> {
        &self.replies
    }

    /// Takes a write from a frontend on this thread (see
    /// [`super::volume::LocalVolume`]); the caller waits for it with a
    /// [`super::replies::LocalReply`].
    pub(crate) fn submit_local_write(
        self: &Rc<Self>,
        offset_bytes: u64,
        payload: Payload,
        fua: bool,
    ) -> Result<RequestId, VolumeError> {
        if !self.accepting.get() {
            return Err(VolumeError::Stopped);
        }
        let id = self.replies.borrow_mut().insert_local();
        self.submit_write(id, offset_bytes, payload, fua);
        self.pump();
        Ok(id)
    }

    /// Takes a write from a frontend on this thread whose result `sink` is
    /// told with `token` (see [`super::volume::LocalVolume::write_to`]).
    pub(crate) fn submit_sink_write(
        self: &Rc<Self>,
        offset_bytes: u64,
        payload: Payload,
        fua: bool,
        sink: &Rc<dyn ReplySink>,
        token: u64,
    ) {
        if !self.accepting.get() {
            return sink.reply(token, Err(VolumeError::Stopped));
        }
        let id = self.replies.borrow_mut().insert_sink(sink.clone(), token);
        self.submit_write(id, offset_bytes, payload, fua);
        self.pump();
    }

    /// As [`Engine::submit_sink_write`], for a flush.
    pub(crate) fn submit_sink_flush(self: &Rc<Self>, sink: &Rc<dyn ReplySink>, token: u64) {
        if !self.accepting.get() {
            return sink.reply(token, Err(VolumeError::Stopped));
        }
        let id = self.replies.borrow_mut().insert_sink(sink.clone(), token);
        self.core.borrow_mut().submit_flush(id, self.now_ms());
        self.pump();
    }

    /// As [`Engine::submit_local_write`], for a flush.
    pub(crate) fn submit_local_flush(self: &Rc<Self>) -> Result<RequestId, VolumeError> {
        if !self.accepting.get() {
            return Err(VolumeError::Stopped);
        }
        let id = self.replies.borrow_mut().insert_local();
        self.core.borrow_mut().submit_flush(id, self.now_ms());
        self.pump();
        Ok(id)
    }

    /// Hands write `id` to the core; a write it refuses completes at once
    /// with the reason.
    fn submit_write(&self, id: RequestId, offset_bytes: u64, payload: Payload, fua: bool) {
        let length = payload.buf.len() as u32;
        let submitted = self.core.borrow_mut().submit_write(
            id,
            offset_bytes,
            length,
            fua,
            payload,
            self.now_ms(),
        );
        if let Err(error) = submitted {
            let told = self.replies.borrow_mut().complete(id, Err(error.into()));
            if let Some(told) = told {
                told.tell();
            }
        }
    }

    fn handle(self: &Rc<Self>, command: Command) {
        match command {
            Command::Write {
                offset_bytes,
                payload,
                fua,
                reply,
            } => {
                let id = self.replies.borrow_mut().insert_channel(reply);
                self.submit_write(id, offset_bytes, payload, fua);
            }
            Command::Flush { reply } => {
                let id = self.replies.borrow_mut().insert_channel(reply);
                self.core.borrow_mut().submit_flush(id, self.now_ms());
            }
            Command::Read {
                offset_bytes,
                length_bytes,
                reply,
            } => {
                let data = self.data.clone();
                crate::ring::spawn(async move {
                    let buf = AlignedBuf::zeroed(length_bytes as usize);
                    let (result, buf) = data.read_exact_at(buf, offset_bytes).await;
                    let _ = reply.send(result.map(|()| buf).map_err(|error| VolumeError::Read {
                        offset_bytes,
                        reason: error.to_string(),
                    }));
                })
                .detach();
            }
            Command::Host(job) => {
                let local = super::volume::LocalVolume {
                    engine: self.clone(),
                };
                crate::ring::spawn(job(local)).detach();
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    /// Logs, `LOG_FULL_REPORT_INTERVAL_MS` after a log-full wait begins,
    /// each secondary whose log held writes back in that interval: the
    /// operator's sign that its log is too small for the load (or that it
    /// clears slowly). It sleeps on a timer only while there is something
    /// to report, so that an idle engine has no deadline to wake for.
    async fn report_log_full_waits(self: Rc<Self>) {
        let interval = Duration::from_millis(LOG_FULL_REPORT_INTERVAL_MS);
        let mut reported = vec![MemberStats::default(); self.members.len()];
        while !self.stopping.get() {
            self.log_full_began.notified().await;
            crate::ring::sleep(interval).await;
            for (index, member) in self.members.iter().enumerate() {
                let stats = self.core.borrow().member_stats(index);
                let waits = stats.log_full_waits - reported[index].log_full_waits;
                if waits > 0 {
                    tracing::info!(
                        secondary = member.node_id,
                        waits,
                        waited_ms = stats.log_full_wait_ms - reported[index].log_full_wait_ms,
                        interval_ms = LOG_FULL_REPORT_INTERVAL_MS,
                        "writes waited for room in the secondary's log (a larger log_size_bytes avoids it)"
                    );
                }
                reported[index] = stats;
            }
        }
    }

    /// Calls the core's `handle_timeout` when its deadline comes, and only
    /// then: an engine with nothing due (no secondary owes an answer or a
    /// notification) does not wake.
    async fn run_timer(self: Rc<Self>) {
        while !self.stopping.get() {
            let due_ms = self.core.borrow().poll_timeout();
            self.timer_armed_ms.set(due_ms);
            match due_ms {
                Some(due_ms) => {
                    let due = self.clock + Duration::from_millis(due_ms);
                    tokio::select! {
                        () = crate::ring::sleep_until(due) => {}
                        () = self.timer_rearm.notified() => {}
                    }
                }
                None => self.timer_rearm.notified().await,
            }
            // Running: a deadline the pump below brings is seen at the top.
            self.timer_armed_ms.set(Some(0));
            let now = self.now_ms();
            self.core.borrow_mut().handle_timeout(now);
            self.pump();
        }
    }

    /// Executes the core's actions until it has none.
    fn pump(self: &Rc<Self>) {
        loop {
            let Some(action) = self.core.borrow_mut().poll_action() else {
                self.rearm_timer();
                self.note_log_full_waits();
                return;
            };
            match action {
                Action::LocalWrite {
                    seq,
                    offset_bytes,
                    payload,
                } => self.write_locally(LocalWrite {
                    seq,
                    offset_bytes,
                    done_bytes: 0,
                    payload: payload.buf,
                }),
                Action::LocalSync { through_seq } => {
                    let engine = self.clone();
                    crate::ring::spawn(async move {
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
                    })
                    .detach();
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
                    let crc32 = self.payload_crc32(seq, &payload);
                    let mut bytes = Vec::with_capacity(64);
                    encode_update_header(&header, crc32, &mut bytes);
                    if let Some(outbox) = self.members[member].outbox.borrow().as_ref() {
                        outbox.send_update(bytes, payload.buf);
                    }
                }
                Action::SendFlush { member, seq } => self.send(member, &Frame::Flush { seq }),
                Action::SendAllAcked { member, seq } => self.send(member, &Frame::AllAcked { seq }),
                Action::Complete { id, result } => {
                    let told = self
                        .replies
                        .borrow_mut()
                        .complete(id, result.map_err(VolumeError::from));
                    if let Some(told) = told {
                        told.tell();
                    }
                }
                Action::MemberUnresponsive { member, owed } => {
                    let limit_ms = self.core.borrow().limits().ack_timeout_ms;
                    tracing::warn!(
                        secondary = self.members[member].node_id,
                        "secondary owed {owed} for ack_timeout_ms ({limit_ms} ms) without progress: closing its connection; writes wait for it up to member_timeout_ms more"
                    );
                    if let Some(stream) = self.members[member].stream.borrow_mut().take() {
                        stream.shutdown_both();
                    }
                    if let Some(outbox) = self.members[member].outbox.borrow().as_ref() {
                        outbox.close();
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

    /// Submits what is left of a local write (all of it, or the rest after
    /// a short write); the ring tells [`Engine::local_write_done`] by the
    /// write's key in `local_writes`.
    fn write_locally(self: &Rc<Self>, write: LocalWrite) {
        let mut writes = self.local_writes.borrow_mut();
        let key = writes.insert(write);
        let write = &writes[key];
        let rest = &write.payload.as_slice()[write.done_bytes..];
        let offset_bytes = write.offset_bytes + write.done_bytes as u64;
        // SAFETY: the bytes are the payload's heap memory, which the entry
        // in `local_writes` keeps, unchanged, until the completion; the
        // file is the engine's, which the ring's slot keeps alive by its
        // reference to the engine.
        unsafe {
            self.data
                .write_at_to(rest, offset_bytes, self.clone(), key as u64)
        };
    }

    /// The ring's answer for local write `key`: the core hears of it once
    /// all of it is written, or it failed.
    fn local_write_done(self: &Rc<Self>, key: usize, result: i32) {
        let mut write = self.local_writes.borrow_mut().remove(key);
        let outcome = match result {
            done if done > 0 => {
                write.done_bytes += done as usize;
                if write.done_bytes < write.payload.len() {
                    return self.write_locally(write);
                }
                Ok(())
            }
            error if error == -libc::EINTR => return self.write_locally(write),
            0 => Err("the file took none of the bytes written (no space?)".to_string()),
            error => Err(std::io::Error::from_raw_os_error(-error).to_string()),
        };
        let seq = write.seq;
        // Let go of the payload before the core hears of the write: one it
        // completes may have its request buffer reused at once, which must
        // then be unshared to be reused without a copy.
        drop(write);
        if let Err(reason) = &outcome {
            tracing::error!(seq, %reason, "write to the primary's copy failed");
        }
        let now_ms = self.now_ms();
        self.core
            .borrow_mut()
            .local_write_done(seq, outcome, now_ms);
        self.pump();
    }

    /// Wakes the timer task if the core's next deadline is earlier than the
    /// one it sleeps until.
    fn rearm_timer(&self) {
        let Some(due_ms) = self.core.borrow().poll_timeout() else {
            return;
        };
        if self
            .timer_armed_ms
            .get()
            .is_none_or(|armed_ms| due_ms < armed_ms)
        {
            self.timer_rearm.notify_one();
        }
    }

    /// Wakes the reporter task if a log-full wait began since it was last
    /// told. A wait that begins while it sleeps leaves it a permit, so
    /// that the next interval reports it.
    fn note_log_full_waits(&self) {
        let waits = self.core.borrow().log_full_waits_total();
        if waits != self.log_full_waits_seen.get() {
            self.log_full_waits_seen.set(waits);
            self.log_full_began.notify_one();
        }
    }

    /// The crc32 of update `seq`'s payload: carried by it, or computed here
    /// once for all the secondaries it goes to, which the core sends it to
    /// one after the other.
    fn payload_crc32(&self, seq: u64, payload: &Payload) -> u32 {
        if let Some(crc32) = payload.crc32 {
            return crc32;
        }
        match self.last_crc32.get() {
            Some((last_seq, crc32)) if last_seq == seq => crc32,
            _ => {
                let crc32 = crate::proto::data_crc32(payload.buf.as_slice());
                self.last_crc32.set(Some((seq, crc32)));
                crc32
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
                // A peer that accepts but never answers (stopped, wedged)
                // must not hold the loop: it is retried like one that
                // refuses.
                None => crate::ring::timeout(
                    self.handshake_timeout,
                    handshake(address, node_id, self.volume_uuid, self.node_id, self.epoch),
                )
                .await
                .unwrap_or_else(|_| Err("no answer to the handshake within ack_timeout_ms".into())),
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
            crate::ring::sleep(self.reconnect_interval).await;
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
            early_ack,
        } = connection;
        *self.members[member].stream.borrow_mut() = Some(stream.clone());
        let (outbox, writer) = Outbox::new(stream, reader.peer().to_owned());
        crate::ring::spawn(writer).detach();
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
        if let Some(ack) = early_ack {
            if let Err(reason) = self.take_ack(member, ack, &outbox) {
                self.detach(member, &outbox);
                return Err(reason);
            }
        }
        self.pump();
        let result = self.read_acks(member, &mut reader, &outbox).await;
        self.detach(member, &outbox);
        result
    }

    async fn read_acks(
        self: &Rc<Self>,
        member: usize,
        reader: &mut FrameReader<TcpStream>,
        outbox: &Rc<Outbox>,
    ) -> Result<(), String> {
        loop {
            reader.fill().await.map_err(|error| error.to_string())?;
            while reader.has_frame() {
                let (frame, length) = reader.frame().map_err(|error| error.to_string())?;
                match frame {
                    Frame::Ack(ack) => self.take_ack(member, ack, outbox)?,
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

    /// Hands a member's Ack to the core; one that contradicts what the
    /// member was sent ends the connection.
    fn take_ack(&self, member: usize, ack: Ack, outbox: &Rc<Outbox>) -> Result<(), String> {
        let ack = MemberAck {
            logged_seq: ack.logged_seq,
            durable_seq: ack.durable_seq,
            cleared_seq: ack.cleared_seq,
        };
        let acked = self
            .core
            .borrow_mut()
            .ack_received(member, ack, self.now_ms());
        acked.map_err(|violation| {
            outbox.send_frame(&Frame::Error(ErrorFrame::new(
                ErrorCode::BadFrame,
                violation.to_string(),
            )));
            violation.to_string()
        })
    }

    fn detach(self: &Rc<Self>, member: usize, outbox: &Rc<Outbox>) {
        outbox.close();
        self.members[member].stream.borrow_mut().take();
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
            crate::ring::sleep(Duration::from_millis(2)).await;
        }
        let quiescent = self.core.borrow().is_quiescent();
        self.stopping.set(true);
        // Whatever did not complete by now never will: its callers hear so.
        let told = self.replies.borrow_mut().stop_all();
        for told in told {
            told.tell();
        }
        self.timer_rearm.notify_one();
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
