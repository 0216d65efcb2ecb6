//! The secondary daemon: recovers its log into its copy, listens for the
//! primary, and runs [`crate::core::secondary::Secondary`] over compio
//! (`node::runtime`).
//!
//! One primary session is served at a time; a newer primary connection
//! replaces the old one. Tools (`replblk-ctl`, `replblk-resync`) connect
//! with role Tool and may only query the log's state.

use std::cell::{Cell, RefCell};
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use compio::buf::{IntoInner, IoBuf};
use compio::io::AsyncWriteAtExt;
use compio::net::TcpStream;
use compio::BufResult;
use tokio::sync::Notify;

use super::error::NodeError;
use crate::buf::{BufPool, PooledBuf, RecordRef, POOL_IDLE_BYTES_MAX};
use crate::config::{Config, NodeConfig};
use crate::core::secondary::{
    Action, IncomingUpdate, LogPosition, Offer, RecoveredRecord, Secondary, SecondaryLimits,
};
use crate::net::{DirectUpdates, FrameReader, Outbox};
use crate::proto::{
    ErrorCode, ErrorFrame, Frame, Hello, LogState, Role, UpdateHeader, PROTOCOL_VERSION,
    UPDATE_DATA_MAX_BYTES, UPDATE_FLAG_FUA,
};
use crate::wal::{self, LogFile, RecordHeader, RECORD_PAYLOAD_OFFSET_BYTES};

/// Most records merged into one vectored log write.
pub const RECORD_WRITE_BATCH_MAX: usize = 64;
/// How long a clean stop waits for in-flight log and copy I/O.
pub const STOP_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// How long a new primary connection's handshake waits for records of the
/// connection it replaced to be written before it is refused with Busy.
pub const HANDSHAKE_WRITE_WAIT_MS_MAX: u64 = 10_000;
/// How often that wait looks again.
const HANDSHAKE_WRITE_POLL_MS: u64 = 2;

struct Node {
    volume_uuid: [u8; 16],
    node_id: u32,
    core: RefCell<Secondary<RecordRef>>,
    log: RefCell<LogFile>,
    log_direct: Rc<compio::fs::File>,
    /// Whether records are written on this thread rather than through the
    /// ring: when the log is on tmpfs (see `LogFile::is_in_memory`).
    log_in_memory: bool,
    /// The copy, for its fdatasyncs on the ring.
    copy: Rc<compio::fs::File>,
    /// The same copy, for the applies this thread writes itself (see
    /// `Action::Apply` in `pump`).
    copy_writer: std::fs::File,
    /// Record buffers, reused.
    records: Rc<BufPool>,
    /// The primary session being served: its number and its outbox.
    session: RefCell<Option<(u64, Rc<Outbox>)>>,
    sessions_started: Cell<u64>,
    /// Signalled whenever ring space is freed.
    space: Notify,
    /// First fatal I/O error; the daemon stops on it.
    fatal: RefCell<Option<String>>,
    fatal_notify: Notify,
    clock: Instant,
}

/// Runs a secondary until `stop` is notified (the daemon does on SIGTERM
/// or SIGINT) or a fatal I/O error.
pub fn run(config: &Config, node_id: u32, stop: Arc<Notify>) -> Result<(), NodeError> {
    let (node, data) = super::open_node_data(config, node_id)?;
    let volume_uuid = *config.volume.uuid.as_bytes();
    let mut log = LogFile::open(&node.log_path, volume_uuid, node_id)?;
    if log.header().log_size_bytes != node.log_size_bytes {
        return Err(NodeError::Mismatch {
            path: node.log_path.clone(),
            field: "log_size_bytes".into(),
            reason: format!(
                "the log file holds {} bytes but the config says {}",
                log.header().log_size_bytes,
                node.log_size_bytes
            ),
        });
    }
    let copy = data
        .buffered_file()
        .map_err(|source| NodeError::io(&node.data_path, "opening the copy", source))?;
    let (position, recovered) = recover(&mut log, &copy, config, &node)?;
    let limits = SecondaryLimits {
        ring_len_bytes: log.ring_len_bytes(),
        sync_every_ack: config.replication.sync_every_ack,
        clear_interval_ms: config.replication.clear_interval_ms,
        volume_size_bytes: config.volume.size_bytes,
        block_size_bytes: config.volume.block_size_bytes,
        write_max_bytes: UPDATE_DATA_MAX_BYTES as u32,
    };
    let log_direct = log
        .direct_file()
        .map_err(|source| NodeError::io(&node.log_path, "opening the log", source))?;
    let log_in_memory = log.is_in_memory()?;
    if log_in_memory {
        tracing::info!(
            log = %node.log_path.display(),
            "the log is on tmpfs: its records are written on this thread (io_uring would hand each to a worker thread)"
        );
    }
    let copy_writer = copy
        .try_clone()
        .map_err(|source| NodeError::io(&node.data_path, "opening the copy", source))?;
    let runtime = super::runtime::build().map_err(|error| NodeError::Fatal {
        reason: format!("setting up the io_uring runtime: {error}"),
    })?;
    let (log_direct, copy) = (
        super::runtime::ring_file(log_direct),
        super::runtime::ring_file(copy),
    );
    super::runtime::block_on(&runtime, async move {
        let node_state = Rc::new(Node {
            volume_uuid,
            node_id,
            core: RefCell::new(Secondary::new(limits, position, &recovered, 0)),
            log: RefCell::new(log),
            log_direct: Rc::new(log_direct),
            log_in_memory,
            copy: Rc::new(copy),
            copy_writer,
            records: BufPool::new(POOL_IDLE_BYTES_MAX),
            session: RefCell::new(None),
            sessions_started: Cell::new(0),
            space: Notify::new(),
            fatal: RefCell::new(None),
            fatal_notify: Notify::new(),
            clock: Instant::now(),
        });
        serve(node_state, node, stop).await
    })
}

/// Replays the log's valid records into the copy and syncs it.
fn recover(
    log: &mut LogFile,
    copy: &std::fs::File,
    config: &Config,
    node: &NodeConfig,
) -> Result<(LogPosition, Vec<RecoveredRecord>), NodeError> {
    let header = log.header();
    let ring_len = header.ring_len_bytes();
    let mut recovered = Vec::new();
    let mut ring_offset = header.start_offset;
    let volume_size_bytes = config.volume.size_bytes;
    let outcome = wal::scan(
        &header,
        &mut log.ring_reader(),
        |record: &RecordHeader, payload: &[u8]| {
            let end = record
                .offset_bytes
                .checked_add(u64::from(record.length_bytes));
            if end.is_none_or(|end| end > volume_size_bytes) {
                return Err(std::io::Error::other(format!(
                    "record seq {} writes past the volume's end ({} bytes)",
                    record.seq, volume_size_bytes
                )));
            }
            copy.write_all_at(payload, record.offset_bytes)?;
            let size = wal::record_size_bytes(record.length_bytes);
            recovered.push(RecoveredRecord {
                seq: record.seq,
                ring_offset,
                size_bytes: size,
            });
            ring_offset = (ring_offset + size) % ring_len;
            Ok(())
        },
    )
    .map_err(|error| NodeError::Recovery {
        path: node.log_path.clone(),
        reason: error.to_string(),
    })?;
    copy.sync_data()
        .map_err(|source| NodeError::io(&node.data_path, "fdatasync after replay", source))?;
    if outcome.stop.is_clean() {
        tracing::info!(log = %node.log_path.display(), records = outcome.records, next_seq = outcome.next_seq, "log recovered: {}", outcome.stop);
    } else {
        tracing::warn!(log = %node.log_path.display(), records = outcome.records, next_seq = outcome.next_seq,
            "log recovered up to a bad record, which is not applied: {}", outcome.stop);
    }
    let position = LogPosition {
        epoch: header.epoch,
        start_offset: header.start_offset,
        start_seq: header.start_seq,
        tail_offset: outcome.tail_offset,
        next_seq: outcome.next_seq,
    };
    Ok((position, recovered))
}

async fn serve(node: Rc<Node>, config: NodeConfig, stop: Arc<Notify>) -> Result<(), NodeError> {
    let listener =
        crate::net::listen(config.address)
            .await
            .map_err(|source| NodeError::Listen {
                address: config.address,
                source,
            })?;
    tracing::info!(node = node.node_id, address = %config.address, next_seq = node.core.borrow().next_seq(), "secondary listening");
    let ticker = node.clone();
    compio::runtime::spawn(async move {
        loop {
            let timeout = ticker.core.borrow().poll_timeout();
            let wait_ms = timeout.map_or(1000, |at| at.saturating_sub(ticker.now_ms()).max(1));
            compio::time::sleep(Duration::from_millis(wait_ms.min(1000))).await;
            let now = ticker.now_ms();
            ticker.core.borrow_mut().handle_timeout(now);
            ticker.pump();
        }
    })
    .detach();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let session_node = node.clone();
                        compio::runtime::spawn(async move {
                            session_node.session(stream, peer.to_string()).await;
                        })
                        .detach();
                    }
                    Err(error) => tracing::warn!(%error, "accept failed"),
                }
            }
            _ = node.fatal_notify.notified() => {}
            () = stop.notified() => break,
        }
        if let Some(reason) = node.fatal.borrow().clone() {
            return Err(NodeError::Fatal { reason });
        }
    }
    tracing::info!("stopping: finishing in-flight log and copy I/O");
    if let Some((_, outbox)) = node.session.borrow_mut().take() {
        outbox.close();
    }
    let deadline = Instant::now() + Duration::from_millis(STOP_DRAIN_TIMEOUT_MS);
    while !node.core.borrow().is_idle() && Instant::now() < deadline {
        compio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(reason) = node.fatal.borrow().clone() {
        return Err(NodeError::Fatal { reason });
    }
    let core = node.core.borrow();
    tracing::info!(
        start_seq = core.start_seq(),
        next_seq = core.next_seq(),
        "secondary stopped"
    );
    Ok(())
}

impl Node {
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn log_state(&self) -> LogState {
        let core = self.core.borrow();
        LogState {
            epoch: core.epoch(),
            start_seq: core.start_seq(),
            next_seq: core.next_seq(),
            applied_seq: core.applied_seq(),
            used_bytes: core.used_bytes(),
        }
    }

    fn hello(&self) -> Hello {
        Hello {
            volume_uuid: self.volume_uuid,
            node_id: self.node_id,
            protocol_version: PROTOCOL_VERSION,
            role: Role::Secondary,
            epoch: self.core.borrow().epoch(),
        }
    }

    fn fail(&self, reason: String) {
        tracing::error!(%reason, "fatal I/O error: stopping");
        self.fatal.borrow_mut().get_or_insert(reason);
        self.fatal_notify.notify_one();
    }

    /// Serves one connection: a primary's stream or a tool's queries.
    async fn session(self: &Rc<Self>, stream: TcpStream, peer: String) {
        let stream = Rc::new(stream);
        let (outbox, writer) = Outbox::new(stream.clone(), peer.clone());
        compio::runtime::spawn(writer).detach();
        // Large updates arrive straight in their log record's buffer.
        let mut reader = FrameReader::with_direct_updates(
            stream,
            peer.clone(),
            DirectUpdates {
                pool: self.records.clone(),
                data_offset_bytes: RECORD_PAYLOAD_OFFSET_BYTES,
                buffer_len_bytes: record_buffer_len_bytes,
            },
        );
        let result = self.handshake(&mut reader, &outbox).await;
        let (role, window) = match result {
            Ok(accepted) => accepted,
            Err(refusal) => {
                tracing::warn!(%peer, %refusal, "connection refused");
                if let Some(frame) = refusal.frame {
                    outbox.send_frame(&Frame::Error(frame));
                    outbox.drained().await;
                }
                outbox.close();
                return;
            }
        };
        let result = match role {
            Role::Primary => self.primary_session(&mut reader, &outbox, window).await,
            _ => self.tool_session(&mut reader, &outbox).await,
        };
        if let Err(reason) = result {
            tracing::warn!(%peer, %reason, "connection closed");
            if let Some(frame) = reason.frame {
                outbox.send_frame(&Frame::Error(frame));
                outbox.drained().await;
            }
        }
        outbox.close();
    }

    /// Checks the peer's Hello and answers with Hello and LogState. Returns
    /// the peer's role and the records the LogState described.
    async fn handshake(
        self: &Rc<Self>,
        reader: &mut FrameReader<TcpStream>,
        outbox: &Rc<Outbox>,
    ) -> Result<(Role, LogWindow), Refusal> {
        reader.fill().await.map_err(Refusal::from_net)?;
        let (frame, length) = reader.frame().map_err(Refusal::from_net)?;
        let Frame::Hello(hello) = frame else {
            return Err(Refusal::new(
                ErrorCode::BadFrame,
                format!("expected Hello, got {:?}", frame.kind()),
            ));
        };
        reader.consume(length);
        if let Some(error) = hello.refusal(self.volume_uuid) {
            return Err(Refusal::new(error.code, error.message));
        }
        if hello.role == Role::Primary {
            // A new epoch is a header change, and only one may be under
            // way: wait out a clear's header still waiting for its sync.
            // Before the epoch is compared, so that nothing (another
            // primary's handshake) can move it between the check and the
            // write below.
            let deadline = Instant::now() + Duration::from_millis(HANDSHAKE_WRITE_WAIT_MS_MAX);
            while hello.epoch > self.core.borrow().epoch() && self.log.borrow().has_staged_header()
            {
                if Instant::now() > deadline {
                    return Err(Refusal::new(
                        ErrorCode::Busy,
                        format!("the log header's sync is still not done after {HANDSHAKE_WRITE_WAIT_MS_MAX} ms"),
                    ));
                }
                compio::time::sleep(Duration::from_millis(HANDSHAKE_WRITE_POLL_MS)).await;
            }
            let epoch = self.core.borrow().epoch();
            if hello.epoch < epoch {
                return Err(Refusal::new(
                    ErrorCode::StaleEpoch,
                    format!(
                        "primary node {} has epoch {} but this log is at epoch {epoch}",
                        hello.node_id, hello.epoch
                    ),
                ));
            }
            if hello.epoch > epoch {
                self.log
                    .borrow_mut()
                    .persist_header(|header| header.epoch = hello.epoch)
                    .map_err(|error| Refusal::new(ErrorCode::Internal, error.to_string()))?;
                self.core.borrow_mut().set_epoch(hello.epoch);
                tracing::info!(epoch = hello.epoch, "adopted the primary's epoch");
            }
            // A newer primary connection replaces the old one, which stops
            // at its next frame once it is no longer the session.
            let generation = self.sessions_started.get() + 1;
            self.sessions_started.set(generation);
            if let Some((_, old)) = self.session.borrow_mut().take() {
                tracing::info!("a new primary connection replaces the previous one");
                old.close();
            }
            // The LogState must count only records in the ring: the primary
            // takes every seq below next_seq as logged, and a LogRead reads
            // them from the ring. Records of the replaced connection may
            // still be on their way. No session is set meanwhile, so no Ack
            // goes out ahead of the Hello.
            let deadline = Instant::now() + Duration::from_millis(HANDSHAKE_WRITE_WAIT_MS_MAX);
            loop {
                if self.sessions_started.get() != generation {
                    return Err(Refusal::quiet("replaced by a newer primary connection"));
                }
                let (logged, next) = {
                    let core = self.core.borrow();
                    (core.logged_seq(), core.next_seq())
                };
                if logged + 1 == next {
                    break;
                }
                if let Some(reason) = self.fatal.borrow().clone() {
                    return Err(Refusal::new(ErrorCode::Internal, reason));
                }
                if Instant::now() > deadline {
                    return Err(Refusal::new(
                        ErrorCode::Busy,
                        format!("records up to seq {} are still not written after {HANDSHAKE_WRITE_WAIT_MS_MAX} ms", next - 1),
                    ));
                }
                compio::time::sleep(Duration::from_millis(HANDSHAKE_WRITE_POLL_MS)).await;
            }
            *self.session.borrow_mut() = Some((generation, outbox.clone()));
            self.core.borrow_mut().connection_started();
            tracing::info!(
                primary = hello.node_id,
                epoch = hello.epoch,
                next_seq = self.core.borrow().next_seq(),
                "primary connected"
            );
        }
        outbox.send_frame(&Frame::Hello(self.hello()));
        let window = {
            let core = self.core.borrow();
            LogWindow {
                start_offset: core.start_offset(),
                start_seq: core.start_seq(),
                next_seq: core.next_seq(),
            }
        };
        outbox.send_frame(&Frame::LogState(self.log_state()));
        Ok((hello.role, window))
    }

    fn is_current(&self, outbox: &Rc<Outbox>) -> bool {
        self.session
            .borrow()
            .as_ref()
            .is_some_and(|(_, current)| Rc::ptr_eq(current, outbox))
    }

    async fn tool_session(
        self: &Rc<Self>,
        reader: &mut FrameReader<TcpStream>,
        outbox: &Rc<Outbox>,
    ) -> Result<(), Refusal> {
        loop {
            match reader.fill().await {
                Ok(()) => {}
                // How a tool's visit ends: nothing to warn about.
                Err(crate::net::NetError::Closed { .. }) => return Ok(()),
                Err(error) => return Err(Refusal::from_net(error)),
            }
            let (frame, length) = reader.frame().map_err(Refusal::from_net)?;
            match frame {
                Frame::LogStateQuery => outbox.send_frame(&Frame::LogState(self.log_state())),
                other => {
                    return Err(Refusal::new(
                        ErrorCode::BadFrame,
                        format!("a tool may not send {:?}", other.kind()),
                    ));
                }
            }
            reader.consume(length);
        }
    }

    async fn primary_session(
        self: &Rc<Self>,
        reader: &mut FrameReader<TcpStream>,
        outbox: &Rc<Outbox>,
        window: LogWindow,
    ) -> Result<(), Refusal> {
        let result = self.primary_frames(reader, outbox, window).await;
        if self.is_current(outbox) {
            self.session.borrow_mut().take();
        }
        result
    }

    async fn primary_frames(
        self: &Rc<Self>,
        reader: &mut FrameReader<TcpStream>,
        outbox: &Rc<Outbox>,
        window: LogWindow,
    ) -> Result<(), Refusal> {
        // LogRead is served only until the first update: from then on
        // appends may overwrite the ring space of records cleared since
        // the handshake, which `window` still counts.
        let mut updates_started = false;
        loop {
            reader.fill().await.map_err(Refusal::from_net)?;
            // Take every frame already buffered before acting, so records
            // that arrived together are written and synced together.
            while reader.has_frame() {
                if !self.is_current(outbox) {
                    return Err(Refusal::quiet("replaced by a newer primary connection"));
                }
                let (frame, length, data_crc32) =
                    reader.frame_with_data_crc().map_err(Refusal::from_net)?;
                let now = self.now_ms();
                match frame {
                    Frame::Update { header, data } => {
                        updates_started = true;
                        let data_crc32 = data_crc32.expect("an Update's data crc");
                        let record = if reader.is_direct() {
                            let buf = reader.take_direct_buffer().expect("a direct frame");
                            complete_record(&header, buf, data_crc32)
                        } else {
                            let record = build_record(&self.records, &header, data, data_crc32);
                            reader.consume(length);
                            record
                        };
                        self.offer(header, record, outbox).await?;
                    }
                    Frame::AllAcked { seq } => {
                        reader.consume(length);
                        self.core
                            .borrow_mut()
                            .all_acked(seq, now)
                            .map_err(Refusal::from_update)?;
                    }
                    Frame::Flush { seq } => {
                        reader.consume(length);
                        self.core.borrow_mut().flush_requested(seq, now);
                    }
                    Frame::LogStateQuery => {
                        reader.consume(length);
                        outbox.send_frame(&Frame::LogState(self.log_state()));
                    }
                    Frame::LogRead { from_seq, to_seq } => {
                        reader.consume(length);
                        if updates_started {
                            return Err(Refusal::new(
                                ErrorCode::BadFrame,
                                format!("LogRead of seqs {from_seq}..{to_seq} after updates started; a primary reads logs only before it streams"),
                            ));
                        }
                        self.serve_log_read(window, from_seq, to_seq, outbox)
                            .await?;
                    }
                    Frame::Error(error) => {
                        return Err(Refusal::quiet(format!(
                            "primary sent error {:?}: {}",
                            error.code, error.message
                        )));
                    }
                    other => {
                        return Err(Refusal::new(
                            ErrorCode::BadFrame,
                            format!("a primary may not send {:?}", other.kind()),
                        ));
                    }
                }
            }
            self.pump();
        }
    }

    /// Answers a LogRead: every record with a seq in `from_seq..to_seq` as
    /// an Update frame (its own seq, epoch, offset, flags and data), then
    /// LogReadEnd. Only records the handshake's LogState reported (`window`)
    /// may be asked for. Nothing in the log or the copy changes.
    ///
    /// The records are read with blocking preads on this thread and queued
    /// in the outbox whole: a restarting primary waits for them and nothing
    /// else is streaming, and the memory is bounded by the log's size.
    async fn serve_log_read(
        self: &Rc<Self>,
        window: LogWindow,
        from_seq: u64,
        to_seq: u64,
        outbox: &Rc<Outbox>,
    ) -> Result<(), Refusal> {
        if from_seq > to_seq || from_seq < window.start_seq || to_seq > window.next_seq {
            return Err(Refusal::new(
                ErrorCode::NotInLog,
                format!(
                    "LogRead of seqs {from_seq}..{to_seq}: this log held seqs {}..{} when the primary connected",
                    window.start_seq, window.next_seq
                ),
            ));
        }
        // The handshake waited until every record it reported was written,
        // and none was appended since.
        debug_assert!(self.core.borrow().logged_seq() + 1 >= to_seq);
        if !self.is_current(outbox) {
            return Err(Refusal::quiet("replaced by a newer primary connection"));
        }
        let log = self.log.borrow();
        // Walk from where the log started at the handshake: records cleared
        // since are still intact, as nothing was appended after them.
        let mut header = log.header();
        header.start_offset = window.start_offset;
        header.start_seq = window.start_seq;
        let mut records = 0u64;
        let read = wal::read_records(
            &header,
            &mut log.ring_reader(),
            from_seq,
            to_seq,
            |record: &RecordHeader, payload: &[u8]| {
                let update = UpdateHeader {
                    seq: record.seq,
                    epoch: record.epoch,
                    offset_bytes: record.offset_bytes,
                    length_bytes: record.length_bytes,
                    flags: if record.flags & wal::RECORD_FLAG_FUA != 0 {
                        UPDATE_FLAG_FUA
                    } else {
                        0
                    },
                    all_acked_seq: 0,
                };
                outbox.send_frame(&Frame::Update {
                    header: update,
                    data: payload,
                });
                records += 1;
                Ok::<(), std::convert::Infallible>(())
            },
        );
        if let Err(error) = read {
            return Err(Refusal::new(
                ErrorCode::Internal,
                format!("LogRead of seqs {from_seq}..{to_seq}: {error}"),
            ));
        }
        outbox.send_frame(&Frame::LogReadEnd { next_seq: to_seq });
        tracing::info!(
            from_seq,
            to_seq,
            records,
            "sent log records to the restarting primary"
        );
        Ok(())
    }

    /// Offers an update to the core, waiting (without reading further
    /// frames) while the log is full: backpressure on the primary.
    async fn offer(
        self: &Rc<Self>,
        header: UpdateHeader,
        record: RecordRef,
        outbox: &Rc<Outbox>,
    ) -> Result<(), Refusal> {
        let incoming = IncomingUpdate {
            seq: header.seq,
            epoch: header.epoch,
            offset_bytes: header.offset_bytes,
            length_bytes: header.length_bytes,
            fua: header.fua(),
            all_acked_seq: header.all_acked_seq,
        };
        let mut record = record;
        loop {
            let space = self.space.notified();
            let offer = self
                .core
                .borrow_mut()
                .offer_update(incoming, record, self.now_ms());
            match offer.map_err(Refusal::from_update)? {
                Offer::Accepted => return Ok(()),
                Offer::LogFull(returned) => {
                    record = returned;
                    self.pump();
                    tracing::debug!(
                        seq = header.seq,
                        "log full: waiting for the start-of-log pointer to move"
                    );
                    space.await;
                    if !self.is_current(outbox) {
                        return Err(Refusal::quiet("replaced by a newer primary connection"));
                    }
                }
            }
        }
    }

    /// Executes the core's actions until it has none.
    fn pump(self: &Rc<Self>) {
        loop {
            let writes = self.run_actions();
            if writes.is_empty() {
                return;
            }
            if !self.log_in_memory {
                self.write_records(writes);
                return;
            }
            // A log on tmpfs is written here and now: what the writes
            // bring about (the ack, first of all) is acted on in this same
            // pump, with no task in between.
            if !self.write_records_now(writes) {
                return;
            }
        }
    }

    /// Executes the core's actions until it has none, but for the log
    /// records to write, which it returns.
    fn run_actions(self: &Rc<Self>) -> Vec<(u64, u64, RecordRef)> {
        let mut writes: Vec<(u64, u64, RecordRef)> = Vec::new();
        loop {
            let Some(action) = self.core.borrow_mut().poll_action() else {
                return writes;
            };
            match action {
                Action::WriteRecord {
                    seq,
                    ring_offset,
                    payload,
                    ..
                } => writes.push((seq, ring_offset, payload)),
                Action::SyncLog { through_seq } => {
                    let log = self.log_direct.clone();
                    self.spawn_io(
                        || "fdatasync of the log failed".into(),
                        async move { log.sync_data().await },
                        move |core, (), now| core.log_synced(through_seq, now),
                    );
                }
                Action::SendAck {
                    logged_seq,
                    durable_seq,
                    cleared_seq,
                } => {
                    if let Some((_, outbox)) = self.session.borrow().as_ref() {
                        outbox.send_frame(&Frame::Ack(crate::proto::Ack {
                            logged_seq,
                            durable_seq,
                            cleared_seq,
                        }));
                    }
                }
                Action::Apply {
                    seq,
                    offset_bytes,
                    payload,
                } => {
                    // Written here, not on the ring. The copy is buffered,
                    // so an apply only copies into the page cache, and its
                    // dirty pages are bounded by the log (nothing is cleared
                    // before the copy's fdatasync, which stays on the ring).
                    // Through the ring, a filesystem without asynchronous
                    // buffered writes (tmpfs) hands every apply to a kernel
                    // worker thread; the wake-ups cost about a fifth of the
                    // 4 KiB QD32 rate with two secondaries (BENCHMARKS.md),
                    // and a thread of our own cost as much.
                    let length = payload.length_bytes as usize;
                    let data = &payload.as_slice()
                        [RECORD_PAYLOAD_OFFSET_BYTES..RECORD_PAYLOAD_OFFSET_BYTES + length];
                    if let Err(error) = self.copy_writer.write_all_at(data, offset_bytes) {
                        self.fail(format!("applying seq {seq} to the copy failed: {error}"));
                        return Vec::new();
                    }
                    let now = self.now_ms();
                    self.core.borrow_mut().applied(seq, now);
                }
                Action::SyncCopy { through_seq } => {
                    let copy = self.copy.clone();
                    self.spawn_io(
                        || "fdatasync of the copy failed".into(),
                        async move { copy.sync_data().await },
                        move |core, (), now| core.copy_synced(through_seq, now),
                    );
                }
                Action::PersistStart {
                    start_offset,
                    start_seq,
                } => {
                    // The new header goes into the mapped page now and is made
                    // durable by an fdatasync of the log on the ring, which
                    // writes the page back as an msync would: an msync here
                    // blocked this thread, and every connection it serves,
                    // for 0.1-5.7 ms per clear on this project's test disk.
                    let staged = self.log.borrow_mut().stage_header(|header| {
                        header.start_offset = start_offset;
                        header.start_seq = start_seq;
                    });
                    let staged = match staged {
                        Ok(staged) => staged,
                        Err(error) => {
                            self.fail(format!(
                                "persisting the start-of-log pointer failed: {error}"
                            ));
                            return Vec::new();
                        }
                    };
                    let log = self.log_direct.clone();
                    let node = self.clone();
                    self.spawn_io(
                        || "fdatasync of the log header failed".into(),
                        async move { log.sync_data().await },
                        move |core, (), now| {
                            node.log.borrow_mut().header_durable(staged);
                            core.start_persisted(now);
                            node.space.notify_waiters();
                        },
                    );
                }
            }
        }
    }

    /// Writes records through the ring, a task per batch.
    fn write_records(self: &Rc<Self>, writes: Vec<(u64, u64, RecordRef)>) {
        let ring_len = self.log.borrow().ring_len_bytes();
        for batch in record_batches(writes, ring_len) {
            self.spawn_batch(batch, ring_len);
        }
    }

    /// Writes records to a log on tmpfs with blocking writes on this
    /// thread and tells the core; false if a write failed (the node is
    /// then failing).
    fn write_records_now(self: &Rc<Self>, writes: Vec<(u64, u64, RecordRef)>) -> bool {
        debug_assert!(self.log_in_memory);
        let ring_len = self.log.borrow().ring_len_bytes();
        for batch in record_batches(writes, ring_len) {
            let records: Vec<&[u8]> = batch
                .iter()
                .map(|(_, _, record)| record.as_slice())
                .collect();
            let written = self
                .log
                .borrow()
                .write_records_blocking(batch[0].1, &records);
            if let Err(error) = written {
                let (first, last) = (batch[0].0, batch[batch.len() - 1].0);
                self.fail(format!(
                    "writing log records {} failed: {error}",
                    seq_range(first, last)
                ));
                return false;
            }
            let now = self.now_ms();
            let mut core = self.core.borrow_mut();
            for (seq, _, _) in &batch {
                core.record_written(*seq, now);
            }
        }
        true
    }

    fn spawn_batch(self: &Rc<Self>, batch: Vec<(u64, u64, RecordRef)>, ring_len: u64) {
        let seqs: Vec<u64> = batch.iter().map(|(seq, _, _)| *seq).collect();
        let (first, last) = (seqs[0], seqs[seqs.len() - 1]);
        let node = self.clone();
        self.spawn_io(
            move || format!("writing log records {} failed", seq_range(first, last)),
            async move { node.write_batch(batch, ring_len).await },
            move |core, (), now| {
                for seq in seqs {
                    core.record_written(seq, now);
                }
            },
        );
    }

    /// Runs `io`; on success hands its result to the core through `done`
    /// and pumps, on failure stops the node: after a failed log or copy
    /// write or sync their content is unknown, and guessing would risk data.
    fn spawn_io<T: 'static>(
        self: &Rc<Self>,
        context: impl FnOnce() -> String + 'static,
        io: impl std::future::Future<Output = std::io::Result<T>> + 'static,
        done: impl FnOnce(&mut Secondary<RecordRef>, T, u64) + 'static,
    ) {
        let node = self.clone();
        compio::runtime::spawn(async move {
            match io.await {
                Ok(value) => {
                    let now = node.now_ms();
                    done(&mut node.core.borrow_mut(), value, now);
                    node.pump();
                }
                Err(error) => node.fail(format!("{}: {error}", context())),
            }
        })
        .detach();
    }

    async fn write_batch(
        &self,
        batch: Vec<(u64, u64, RecordRef)>,
        ring_len: u64,
    ) -> std::io::Result<()> {
        debug_assert!(!self.log_in_memory, "a log on tmpfs is written in `pump`");
        let ring_offset = batch[0].1;
        let file_offset = LogFile::ring_file_offset(ring_offset);
        if batch.len() == 1 {
            let record = batch.into_iter().next().expect("one record").2;
            let size = record.len() as u64;
            let (first, second) = wal::split_at_wrap(ring_offset, size, ring_len);
            let mut log = &*self.log_direct;
            let BufResult(result, record) = log
                .write_all_at(record.slice(..first as usize), file_offset)
                .await;
            result?;
            if second > 0 {
                let record = record.into_inner();
                let BufResult(result, _) = log
                    .write_all_at(record.slice(first as usize..), LogFile::ring_file_offset(0))
                    .await;
                result?;
            }
            return Ok(());
        }
        let buffers: Vec<RecordRef> = batch.into_iter().map(|(_, _, record)| record).collect();
        let size: u64 = buffers.iter().map(|record| record.len() as u64).sum();
        assert!(ring_offset + size <= ring_len, "a merged write never wraps");
        let mut log = &*self.log_direct;
        let BufResult(result, _) = log.write_vectored_all_at(buffers, file_offset).await;
        result
    }
}

/// Splits records to write, in seq order, into batches each written at
/// once: a run of records adjacent in the ring (group commit), at most
/// `RECORD_WRITE_BATCH_MAX` long; a record that wraps around the ring's
/// end goes alone, as it is written in two pieces.
fn record_batches(
    writes: Vec<(u64, u64, RecordRef)>,
    ring_len: u64,
) -> Vec<Vec<(u64, u64, RecordRef)>> {
    let mut batches = Vec::new();
    let mut batch: Vec<(u64, u64, RecordRef)> = Vec::new();
    for write in writes {
        let size = write.2.len() as u64;
        let adjacent = batch
            .last()
            .is_some_and(|(_, offset, record)| offset + record.len() as u64 == write.1);
        if (!adjacent || batch.len() == RECORD_WRITE_BATCH_MAX) && !batch.is_empty() {
            batches.push(std::mem::take(&mut batch));
        }
        if write.1 + size > ring_len {
            if !batch.is_empty() {
                batches.push(std::mem::take(&mut batch));
            }
            batches.push(vec![write]);
        } else {
            batch.push(write);
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// The seqs of a batch of records (consecutive: the records lie one after
/// the other in the ring), for a message.
fn seq_range(first: u64, last: u64) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}..={last}")
    }
}

/// The header of the log record for an update.
fn record_header(header: &UpdateHeader) -> RecordHeader {
    RecordHeader {
        seq: header.seq,
        epoch: header.epoch,
        offset_bytes: header.offset_bytes,
        length_bytes: header.length_bytes,
        flags: if header.fua() {
            wal::RECORD_FLAG_FUA
        } else {
            0
        },
    }
}

/// The size of the record buffer for `length_bytes` of data (for
/// [`DirectUpdates`]).
fn record_buffer_len_bytes(length_bytes: u32) -> usize {
    usize::try_from(wal::record_size_bytes(length_bytes)).expect("record size fits in memory")
}

/// Builds the log record for an update that arrived in the shared receive
/// buffer: the payload copied once into a pooled record buffer, behind its
/// record header, whose crc reuses `data_crc32` (the frame check computed
/// it) rather than reading the payload again.
fn build_record(
    pool: &Rc<BufPool>,
    header: &UpdateHeader,
    data: &[u8],
    data_crc32: u32,
) -> RecordRef {
    let mut buf = pool.take(record_buffer_len_bytes(header.length_bytes));
    let payload_end = RECORD_PAYLOAD_OFFSET_BYTES + data.len();
    buf.buf_mut().as_mut_slice()[RECORD_PAYLOAD_OFFSET_BYTES..payload_end].copy_from_slice(data);
    complete_record(header, buf, data_crc32)
}

/// Completes the log record for an update whose data already sits at
/// [`RECORD_PAYLOAD_OFFSET_BYTES`] in `buf`, received there or copied.
fn complete_record(header: &UpdateHeader, mut buf: PooledBuf, data_crc32: u32) -> RecordRef {
    wal::complete_record_around_payload(
        &record_header(header),
        data_crc32,
        buf.buf_mut().as_mut_slice(),
    );
    RecordRef {
        buf: Rc::new(buf),
        length_bytes: header.length_bytes,
    }
}

/// The records a primary session's LogState described: those its LogRead
/// may ask for.
#[derive(Debug, Clone, Copy)]
struct LogWindow {
    /// Ring offset of the record `start_seq`.
    start_offset: u64,
    /// Oldest record not cleared at the handshake.
    start_seq: u64,
    /// Seq of the next append at the handshake.
    next_seq: u64,
}

/// Why a session ends: what to log, and the Error frame to send, if any.
struct Refusal {
    reason: String,
    frame: Option<ErrorFrame>,
}

impl Refusal {
    fn new(code: ErrorCode, reason: String) -> Refusal {
        Refusal {
            frame: Some(ErrorFrame::new(code, reason.clone())),
            reason,
        }
    }

    fn quiet(reason: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
            frame: None,
        }
    }

    fn from_net(error: crate::net::NetError) -> Refusal {
        match error {
            crate::net::NetError::Proto { source, .. } => {
                Refusal::new(source.error_code(), source.to_string())
            }
            other => Refusal::quiet(other.to_string()),
        }
    }

    fn from_update(error: crate::core::secondary::UpdateError) -> Refusal {
        use crate::core::secondary::UpdateError;
        let code = match error {
            UpdateError::StaleEpoch { .. } => ErrorCode::StaleEpoch,
            UpdateError::OutOfRange { .. } => ErrorCode::OutOfRange,
            UpdateError::OutOfOrder { .. } | UpdateError::AllAckedBeyondLog { .. } => {
                ErrorCode::OutOfSync
            }
        };
        Refusal::new(code, error.to_string())
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{data_crc32, UPDATE_FLAG_FUA};

    /// Records of `pages` 4 KiB pages each, laid one after the other in a
    /// ring of `ring_pages` pages from page `first_page`, seqs from 1.
    fn laid_out(
        pool: &Rc<BufPool>,
        first_page: u64,
        pages: &[u64],
        ring_pages: u64,
    ) -> Vec<(u64, u64, RecordRef)> {
        let mut offset = first_page * 4096;
        let ring_len = ring_pages * 4096;
        let mut writes = Vec::new();
        for (index, &count) in pages.iter().enumerate() {
            let record = RecordRef {
                buf: Rc::new(pool.take((count * 4096) as usize)),
                length_bytes: 0,
            };
            writes.push((index as u64 + 1, offset, record));
            offset = (offset + count * 4096) % ring_len;
        }
        writes
    }

    fn seqs_of(batches: &[Vec<(u64, u64, RecordRef)>]) -> Vec<Vec<u64>> {
        batches
            .iter()
            .map(|batch| batch.iter().map(|(seq, _, _)| *seq).collect())
            .collect()
    }

    #[test]
    fn records_adjacent_in_the_ring_are_written_together_and_one_that_wraps_alone() {
        let pool = BufPool::new(POOL_IDLE_BYTES_MAX);
        // Pages 2..10 of a 10-page ring: 1, 2 and 3 fit, 4 wraps (pages
        // 8..10 and 0..1), 5 follows it from page 1.
        let writes = laid_out(&pool, 2, &[1, 2, 3, 3, 1], 10);
        let batches = record_batches(writes, 10 * 4096);
        assert_eq!(seqs_of(&batches), vec![vec![1, 2, 3], vec![4], vec![5]]);
        assert_eq!(seq_range(1, 3), "1..=3");
        assert_eq!(seq_range(4, 4), "4");
    }

    #[test]
    fn a_run_of_records_longer_than_a_batch_is_split() {
        let pool = BufPool::new(POOL_IDLE_BYTES_MAX);
        let count = RECORD_WRITE_BATCH_MAX + 3;
        let writes = laid_out(&pool, 0, &vec![1; count], 1 << 20);
        let batches = record_batches(writes, (1 << 20) * 4096);
        let lengths: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(lengths, vec![RECORD_WRITE_BATCH_MAX, 3]);
        assert!(record_batches(Vec::new(), 4096).is_empty());
    }

    #[test]
    fn a_built_record_in_a_reused_buffer_passes_the_recovery_check_with_the_frames_data_crc() {
        for (length_bytes, flags) in [(4096u32, 0), (5000, UPDATE_FLAG_FUA), (1 << 20, 0)] {
            let data: Vec<u8> = (0..length_bytes).map(|i| (i % 251) as u8).collect();
            let header = UpdateHeader {
                seq: 17,
                epoch: 3,
                offset_bytes: 8192,
                length_bytes,
                flags,
                all_acked_seq: 0,
            };
            // A reused buffer full of stale bytes: the record must not show them.
            let pool = BufPool::new(POOL_IDLE_BYTES_MAX);
            let mut stale = pool.take(record_buffer_len_bytes(length_bytes));
            stale.buf_mut().as_mut_slice().fill(0xa5);
            drop(stale);
            let record = build_record(&pool, &header, &data, data_crc32(&data));
            assert_eq!(pool.idle_bytes(), 0, "the stale buffer was reused");
            let bytes = record.as_slice();
            assert_eq!(bytes.len() as u64, wal::record_size_bytes(length_bytes));
            let decoded = RecordHeader::decode(bytes).unwrap();
            let payload_end = RECORD_PAYLOAD_OFFSET_BYTES + data.len();
            decoded
                .verify(bytes, &bytes[RECORD_PAYLOAD_OFFSET_BYTES..payload_end])
                .unwrap();
            assert_eq!(&bytes[RECORD_PAYLOAD_OFFSET_BYTES..payload_end], &data[..]);
            assert!(
                bytes[payload_end..].iter().all(|&b| b == 0),
                "padding is zero"
            );
            assert_eq!(decoded.seq, 17);
            assert_eq!(decoded.flags != 0, flags != 0);
        }
    }
}
