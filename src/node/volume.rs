//! The volume API: the one door into the primary.
//!
//! [`Volume::start`] runs the primary's engine on a thread of its own (on
//! `replblk-ring`); requests are sent to it over a bounded channel and
//! complete through a oneshot each, so any async runtime (a test's, the
//! benchmark's, a ublk queue's) can drive it. A write completes only when the
//! primary's copy and every secondary of its set hold it; a flush, or a FUA
//! write, only when that is durable everywhere.
//!
//! A frontend that would rather run on the engine's thread (a hosted ublk
//! queue) asks [`Volume::host`] to run it there, with a [`LocalVolume`]:
//! the same requests, handed to the engine by a call instead of a channel,
//! so they cross no thread.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use super::error::NodeError;
use super::primary;
use super::replies::LocalReply;
use crate::buf::{AlignedBuf, SharedBuf};
use crate::config::Config;
use crate::core::primary::{MemberStats, RequestError};

/// Most requests queued between callers and the engine; callers wait
/// beyond it (the engine's window is the real bound on work in flight).
pub const SUBMIT_QUEUE_MAX: usize = 4096;

/// Why a request failed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum VolumeError {
    /// The request was refused or failed in the core.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Reading the primary's copy failed.
    #[error("read at offset {offset_bytes} failed: {reason}")]
    Read {
        /// Offset read.
        offset_bytes: u64,
        /// Why.
        reason: String,
    },
    /// A read not aligned to the block size, or past the end.
    #[error("read at offset {offset_bytes} of {length_bytes} bytes is misaligned or past the end of the volume")]
    BadRead {
        /// Offset asked for.
        offset_bytes: u64,
        /// Length asked for.
        length_bytes: u32,
    },
    /// The engine has stopped.
    #[error("the volume is stopped")]
    Stopped,
}

/// A payload handed to the engine: the data once, and its crc32, computed
/// once and reused for every secondary's frame.
#[derive(Clone, Debug)]
pub struct Payload {
    /// The data, page-aligned for O_DIRECT.
    pub buf: SharedBuf,
    /// crc32 of the data, if known yet. A write that crosses the channel
    /// has it computed on the caller's thread, off the engine's. A write
    /// made on the engine's own thread ([`LocalVolume`]) leaves it to the
    /// engine, which computes it when it first frames the update: a volume
    /// with no secondary connected never needs it.
    pub crc32: Option<u32>,
}

/// What the engine reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    /// The seq the next write gets.
    pub next_seq: u64,
    /// Every update up to here is acked by every member of its set.
    pub all_acked_seq: u64,
    /// Updates in the window.
    pub in_flight: usize,
    /// Per secondary, in config order.
    pub members: Vec<MemberStatus>,
}

/// One secondary as the primary sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its node id.
    pub node_id: u32,
    /// Whether its connection is up.
    pub connected: bool,
    /// How often its log held the stream back since the primary started.
    pub stats: MemberStats,
}

pub(crate) enum Command {
    Write {
        offset_bytes: u64,
        payload: Payload,
        fua: bool,
        reply: oneshot::Sender<Result<(), VolumeError>>,
    },
    Flush {
        reply: oneshot::Sender<Result<(), VolumeError>>,
    },
    Read {
        offset_bytes: u64,
        length_bytes: u32,
        reply: oneshot::Sender<Result<AlignedBuf, VolumeError>>,
    },
    Status {
        reply: oneshot::Sender<VolumeStatus>,
    },
    Host(HostedJob),
}

/// Work run on the engine's thread by [`Volume::host`]: given the volume's
/// [`LocalVolume`], it returns the task to run there.
pub type HostedJob = Box<dyn FnOnce(LocalVolume) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A write as the engine takes it, and what its result comes back through;
/// `crc32` as in [`Payload`].
fn write_command(
    offset_bytes: u64,
    data: SharedBuf,
    fua: bool,
    crc32: Option<u32>,
) -> (Command, oneshot::Receiver<Result<(), VolumeError>>) {
    let (reply, done) = oneshot::channel();
    let payload = Payload { buf: data, crc32 };
    let command = Command::Write {
        offset_bytes,
        payload,
        fua,
        reply,
    };
    (command, done)
}

/// A running primary.
pub struct Volume {
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<Result<(), NodeError>>>,
    size_bytes: u64,
    block_size_bytes: u32,
}

impl Volume {
    /// Starts node `node_id` of `config` as the primary: opens its copy,
    /// connects to every other node as a secondary (waiting up to
    /// `startup_timeout_ms` for them) and returns once it takes requests.
    pub fn start(config: &Config, node_id: u32) -> Result<Volume, NodeError> {
        let (commands, receiver) = mpsc::channel(SUBMIT_QUEUE_MAX);
        let (ready, started) = std::sync::mpsc::channel();
        let engine_config = config.clone();
        let thread = std::thread::Builder::new()
            .name(format!("replblk-primary-{node_id}"))
            .spawn(move || primary::run(engine_config, node_id, receiver, ready))
            .map_err(|source| {
                NodeError::io(
                    std::path::Path::new("."),
                    "spawning the engine thread",
                    source,
                )
            })?;
        match started.recv() {
            Ok(()) => Ok(Volume {
                commands: Some(commands),
                thread: Some(thread),
                size_bytes: config.volume.size_bytes,
                block_size_bytes: config.volume.block_size_bytes,
            }),
            // The engine dropped `ready` without a word: it failed to start.
            Err(_) => Err(thread
                .join()
                .unwrap_or_else(|_| {
                    Err(NodeError::Fatal {
                        reason: "the engine thread panicked".into(),
                    })
                })
                .err()
                .unwrap_or(NodeError::Fatal {
                    reason: "the engine stopped during start-up".into(),
                })),
        }
    }

    /// Size of the volume in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Logical block size.
    pub fn block_size_bytes(&self) -> u32 {
        self.block_size_bytes
    }

    async fn send(&self, command: Command) -> Result<(), VolumeError> {
        let commands = self.commands.as_ref().ok_or(VolumeError::Stopped)?;
        commands
            .send(command)
            .await
            .map_err(|_| VolumeError::Stopped)
    }

    /// Writes `data` at `offset_bytes`; with `fua`, completes only once
    /// durable everywhere.
    pub async fn write(
        &self,
        offset_bytes: u64,
        data: SharedBuf,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let crc32 = crate::proto::data_crc32(data.as_slice());
        let (command, done) = write_command(offset_bytes, data, fua, Some(crc32));
        self.send(command).await?;
        done.await.map_err(|_| VolumeError::Stopped)?
    }

    /// Completes once every write completed before it is durable on every
    /// replica.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        let (reply, done) = oneshot::channel();
        self.send(Command::Flush { reply }).await?;
        done.await.map_err(|_| VolumeError::Stopped)?
    }

    /// Reads from the primary's copy.
    pub async fn read(
        &self,
        offset_bytes: u64,
        length_bytes: u32,
    ) -> Result<AlignedBuf, VolumeError> {
        let block = u64::from(self.block_size_bytes);
        let end = offset_bytes.checked_add(u64::from(length_bytes));
        if length_bytes == 0
            || !offset_bytes.is_multiple_of(block)
            || !u64::from(length_bytes).is_multiple_of(block)
            || end.is_none_or(|end| end > self.size_bytes)
        {
            return Err(VolumeError::BadRead {
                offset_bytes,
                length_bytes,
            });
        }
        let (reply, done) = oneshot::channel();
        self.send(Command::Read {
            offset_bytes,
            length_bytes,
            reply,
        })
        .await?;
        done.await.map_err(|_| VolumeError::Stopped)?
    }

    /// The engine's state.
    pub async fn status(&self) -> Result<VolumeStatus, VolumeError> {
        let (reply, done) = oneshot::channel();
        self.send(Command::Status { reply }).await?;
        done.await.map_err(|_| VolumeError::Stopped)
    }

    /// Runs `job` on the engine's thread, as a task of its loop
    /// (`replblk::ring`: the job may spawn there with `ring::spawn`, not on
    /// tokio or compio), with the volume at hand as a [`LocalVolume`]. Waits while the engine's queue
    /// is full, so it must not be called from inside an async runtime. If
    /// the engine has stopped, the job is dropped unrun and this fails.
    pub fn host(&self, job: HostedJob) -> Result<(), VolumeError> {
        let commands = self.commands.as_ref().ok_or(VolumeError::Stopped)?;
        commands
            .blocking_send(Command::Host(job))
            .map_err(|_| VolumeError::Stopped)
    }

    /// Stops the primary cleanly: requests already submitted complete, the
    /// final all-acked point reaches every connected secondary, the copy is
    /// synced. Blocks until done.
    pub fn stop(mut self) -> Result<(), NodeError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), NodeError> {
        // Closing the channel is the stop signal.
        self.commands.take();
        match self.thread.take() {
            Some(thread) => thread.join().unwrap_or_else(|_| {
                Err(NodeError::Fatal {
                    reason: "the engine thread panicked".into(),
                })
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::error!(%error, "primary stopped with an error");
        }
    }
}

/// The volume on its engine's own thread (see [`Volume::host`]): writes
/// and flushes go to the engine by a call, and complete on this thread.
/// Not `Send`: it lives and is used only there.
#[derive(Clone)]
pub struct LocalVolume {
    pub(crate) engine: Rc<primary::Engine>,
}

impl LocalVolume {
    /// As [`Volume::write`].
    pub async fn write(
        &self,
        offset_bytes: u64,
        data: SharedBuf,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let payload = Payload {
            buf: data,
            crc32: None,
        };
        let id = self.engine.submit_local_write(offset_bytes, payload, fua)?;
        LocalReply::new(self.engine.clone(), id).await
    }

    /// As [`Volume::flush`].
    pub async fn flush(&self) -> Result<(), VolumeError> {
        let id = self.engine.submit_local_flush()?;
        LocalReply::new(self.engine.clone(), id).await
    }

    /// As [`LocalVolume::write`], without a future: `sink` is told the
    /// result with `token`, from the engine's loop, or at once (within
    /// this call) if the write is refused or the engine has stopped.
    pub fn write_to(
        &self,
        offset_bytes: u64,
        data: SharedBuf,
        fua: bool,
        sink: &Rc<dyn ReplySink>,
        token: u64,
    ) {
        let payload = Payload {
            buf: data,
            crc32: None,
        };
        self.engine
            .submit_sink_write(offset_bytes, payload, fua, sink, token);
    }

    /// As [`LocalVolume::flush`], telling `sink` as
    /// [`LocalVolume::write_to`] does.
    pub fn flush_to(&self, sink: &Rc<dyn ReplySink>, token: u64) {
        self.engine.submit_sink_flush(sink, token);
    }
}

/// Told the results of the requests made with [`LocalVolume::write_to`] and
/// [`LocalVolume::flush_to`], each with the token it was made with. Every
/// request is told exactly once: with its result, or with
/// `VolumeError::Stopped` when the engine stops first.
pub trait ReplySink {
    /// Request `token` completed with `result`.
    fn reply(&self, token: u64, result: Result<(), VolumeError>);
}

/// Writes and flushes through the volume API from either side of it: over
/// the channel from any thread ([`Volume`], shared as an `Arc`), or by a
/// call on the engine's own thread ([`LocalVolume`]). For code that serves
/// or drives the volume from both, such as the block device's queues.
pub trait Replicate: 'static {
    /// As [`Volume::write`].
    fn write(
        &self,
        offset_bytes: u64,
        data: SharedBuf,
        fua: bool,
    ) -> impl Future<Output = Result<(), VolumeError>>;
    /// As [`Volume::flush`].
    fn flush(&self) -> impl Future<Output = Result<(), VolumeError>>;
}

impl Replicate for Arc<Volume> {
    fn write(
        &self,
        offset_bytes: u64,
        data: SharedBuf,
        fua: bool,
    ) -> impl Future<Output = Result<(), VolumeError>> {
        Volume::write(self, offset_bytes, data, fua)
    }
    fn flush(&self) -> impl Future<Output = Result<(), VolumeError>> {
        Volume::flush(self)
    }
}

impl Replicate for LocalVolume {
    fn write(
        &self,
        offset_bytes: u64,
        data: SharedBuf,
        fua: bool,
    ) -> impl Future<Output = Result<(), VolumeError>> {
        LocalVolume::write(self, offset_bytes, data, fua)
    }
    fn flush(&self) -> impl Future<Output = Result<(), VolumeError>> {
        LocalVolume::flush(self)
    }
}
