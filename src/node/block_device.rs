//! The primary's block device: the [`Volume`] served as `/dev/ublkbN`
//! through the `replblk-ublk` frontend.
//!
//! Writes go through the volume API, so they complete to the kernel only
//! when every replica holds them; a flush only when everything before it is
//! durable everywhere. Reads are served from the primary's own copy on the
//! queue's own ring, without the engine: a read overlapping a write still
//! in flight may see either version, as on any disk, and a completed write
//! is already in the copy.
//!
//! Queue 0 is hosted on the engine's thread ([`Volume::host`]), so its
//! requests reach the engine by a call ([`LocalVolume::write_to`]) and
//! their results come back to the queue by a call too, without a future or
//! a wake-up; further queues, if configured, have threads of their own and
//! reach the engine through the volume's channel.
//!
//! A write's payload is the request buffer the kernel copied the data into;
//! the engine keeps a reference while replicas may still need it, so a tag
//! whose buffer is still referenced when its write completes takes another
//! from the queue's pool, and the kernel never writes over a payload in use.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use replblk_ublk::{Errno, HostedTarget, QueueHandle, RequestBuffer, Target};

use super::error::NodeError;
use super::volume::{HostedJob, LocalVolume, ReplySink, Volume, VolumeError};
use crate::buf::{AlignedBuf, SharedBuf};
use crate::config::Config;

/// The volume as a ublk target, for the queues on threads of their own.
pub struct VolumeTarget {
    volume: Arc<Volume>,
    /// The primary's copy, opened for O_DIRECT reads.
    data: Arc<File>,
}

impl VolumeTarget {
    fn data_fd(&self) -> RawFd {
        self.data.as_raw_fd()
    }
}

/// The volume as the target of the queue hosted on the engine's thread.
struct HostedVolumeTarget {
    volume: LocalVolume,
    /// The primary's copy, opened for O_DIRECT reads.
    data: Arc<File>,
    /// Where the engine's results go: the queue, by tag.
    replies: Rc<dyn ReplySink>,
}

/// Hands the engine's results to the hosted queue, by tag.
struct QueueReplies(QueueHandle);

impl ReplySink for QueueReplies {
    fn reply(&self, token: u64, result: Result<(), VolumeError>) {
        let tag = u16::try_from(token).expect("tokens are the queue's tags");
        let result = result.map_err(|error| {
            tracing::error!(tag, %error, "write or flush failed");
            errno(&error)
        });
        self.0.answer(tag, result);
    }
}

impl HostedTarget for HostedVolumeTarget {
    type Buffer = TagBuffer;

    fn new_buffer(&self, capacity_bytes: usize) -> TagBuffer {
        TagBuffer::new(capacity_bytes, POOL.with(Rc::clone))
    }

    fn read_file(&self) -> RawFd {
        self.data.as_raw_fd()
    }

    fn write(
        &self,
        offset_bytes: u64,
        length_bytes: u32,
        buffer: &mut TagBuffer,
        fua: bool,
        tag: u16,
    ) {
        let payload = SharedBuf::prefix(buffer.buf.clone(), length_bytes as usize);
        self.volume
            .write_to(offset_bytes, payload, fua, &self.replies, u64::from(tag));
    }

    fn flush(&self, tag: u16) {
        self.volume.flush_to(&self.replies, u64::from(tag));
    }
}

/// Opens node `node_id`'s copy for the targets' reads.
fn open_for_reads(config: &Config, node_id: u32) -> Result<Arc<File>, NodeError> {
    let node = config
        .node(node_id)
        .ok_or(NodeError::UnknownNode { node_id })?;
    let data = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&node.data_path)
        .map_err(|source| NodeError::io(&node.data_path, "opening the copy for reads", source))?;
    Ok(Arc::new(data))
}

/// The request buffers of one queue's thread that its tags moved away
/// from while the engine still held them as payloads; taken back once the
/// engine lets go.
#[derive(Default)]
struct BufferPool {
    buffers: Vec<Arc<AlignedBuf>>,
    /// Most buffers kept that the engine has let go of: one per tag living
    /// on this thread. The engine lets payloads go in seq order, so at
    /// depth 32 they come back in bursts; a smaller cap freed part of each
    /// burst and allocated afresh moments later, and the kernel's first
    /// copy into a fresh buffer faults its pages in (BENCHMARKS.md,
    /// "Session 12 (2026-12-06): a profile per job, and the tags' buffers
    /// kept"). A burst of writes the engine held on to (a slow secondary)
    /// thus pins at most a queue depth of `io_max_bytes` buffers, as many
    /// as the tags themselves.
    idle_max: usize,
}

type Pool = Rc<RefCell<BufferPool>>;

thread_local! {
    static POOL: Pool = Rc::default();
}

/// One tag's request buffer.
pub struct TagBuffer {
    buf: Arc<AlignedBuf>,
    pool: Pool,
}

impl TagBuffer {
    /// A tag's buffer of `capacity_bytes`, whose pool keeps one more idle
    /// buffer while it lives.
    fn new(capacity_bytes: usize, pool: Pool) -> TagBuffer {
        pool.borrow_mut().idle_max += 1;
        TagBuffer {
            buf: Arc::new(AlignedBuf::zeroed(capacity_bytes)),
            pool,
        }
    }

    /// Gives the current memory to a write's payload if it is still shared
    /// afterwards, takes a free one from the pool (or a new one).
    fn release_if_shared(&mut self) {
        if Arc::strong_count(&self.buf) == 1 {
            return;
        }
        let capacity = self.buf.len();
        let mut pool = self.pool.borrow_mut();
        let BufferPool { buffers, idle_max } = &mut *pool;
        let free = buffers
            .iter()
            .position(|buf| Arc::strong_count(buf) == 1 && buf.len() == capacity);
        let fresh = match free {
            Some(index) => buffers.swap_remove(index),
            None => Arc::new(AlignedBuf::zeroed(capacity)),
        };
        buffers.push(std::mem::replace(&mut self.buf, fresh));
        let mut idle = 0;
        buffers.retain(|buf| {
            let unshared = Arc::strong_count(buf) == 1;
            idle += usize::from(unshared);
            !unshared || idle <= *idle_max
        });
    }
}

impl Drop for TagBuffer {
    fn drop(&mut self) {
        self.pool.borrow_mut().idle_max -= 1;
    }
}

// SAFETY: the memory is an AlignedBuf of `capacity_bytes` kept alive by the
// Arc this buffer holds. `as_mut_ptr` first swaps the memory out if a
// write's payload (SharedBuf) still shares it, then goes through
// `Arc::get_mut`, which proves nobody else does; so between two calls
// nobody but the kernel reads or writes it.
unsafe impl RequestBuffer for TagBuffer {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.release_if_shared();
        Arc::get_mut(&mut self.buf)
            .expect("a request buffer is shared with a payload still in use")
            .as_mut_slice()
            .as_mut_ptr()
    }

    fn capacity_bytes(&self) -> usize {
        self.buf.len()
    }
}

fn errno(error: &VolumeError) -> Errno {
    match error {
        VolumeError::BadRead { .. } => libc::EINVAL,
        VolumeError::Request(_) | VolumeError::Read { .. } | VolumeError::Stopped => libc::EIO,
    }
}

impl Target for VolumeTarget {
    type Buffer = TagBuffer;

    fn new_buffer(&self, capacity_bytes: usize) -> TagBuffer {
        TagBuffer::new(capacity_bytes, POOL.with(Rc::clone))
    }

    async fn read(
        &self,
        offset_bytes: u64,
        length_bytes: u32,
        buffer: &mut TagBuffer,
    ) -> Result<(), Errno> {
        let memory = Arc::get_mut(&mut buffer.buf).expect("request buffer unshared between writes");
        let slice = &mut memory.as_mut_slice()[..length_bytes as usize];
        match replblk_ublk::ring::read_at(self.data_fd(), offset_bytes, slice).await {
            Ok(done) if done == length_bytes as usize => Ok(()),
            Ok(done) => {
                tracing::error!(offset_bytes, length_bytes, done, "short read from the copy");
                Err(libc::EIO)
            }
            Err(error) => {
                tracing::error!(offset_bytes, length_bytes, %error, "read from the copy failed");
                Err(error.raw_os_error().unwrap_or(libc::EIO))
            }
        }
    }

    async fn write(
        &self,
        offset_bytes: u64,
        length_bytes: u32,
        buffer: &mut TagBuffer,
        fua: bool,
    ) -> Result<(), Errno> {
        let payload = SharedBuf::prefix(buffer.buf.clone(), length_bytes as usize);
        // The memory is swapped out before the kernel's next copy into it if
        // the engine still holds the payload (`as_mut_ptr`).
        let result = self.volume.write(offset_bytes, payload, fua).await;
        result.map_err(|error| {
            tracing::error!(offset_bytes, length_bytes, %error, "write failed");
            errno(&error)
        })
    }

    async fn flush(&self) -> Result<(), Errno> {
        self.volume.flush().await.map_err(|error| {
            tracing::error!(%error, "flush failed");
            errno(&error)
        })
    }
}

/// Where the primary records the id of the device it serves, so that a
/// restart after a crash finds the device to recover: `/run` lives exactly
/// as long as a ublk device can (until reboot).
pub fn device_id_path(config: &Config) -> PathBuf {
    Path::new("/run/replblk").join(format!("{}.device", config.volume.uuid))
}

/// What to do about the device at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePlan {
    /// The id to use; `None` lets the driver pick.
    pub device_id: Option<u32>,
    /// Take over a device left quiesced by a primary that died.
    pub recover: bool,
}

/// Decides, before the engine starts, whether to add a device or recover
/// the one a previous primary of this volume left behind (removing it
/// first if it was left added but never served); refuses a device another
/// process serves.
pub fn plan(config: &Config) -> Result<DevicePlan, NodeError> {
    // Refused before anything starts, rather than after the engine has
    // connected to every secondary.
    if !replblk_ublk::driver_present() {
        return Err(replblk_ublk::UblkDeviceError::NoDriver.into());
    }
    let (device_id, recorded) = volume_device(config)?;
    let info = match device_id {
        Some(device_id) => replblk_ublk::device_info(device_id)?,
        None => None,
    };
    let (plan, left_dead) = decide(config.device.device_id, recorded, info)?;
    if let Some(device_id) = left_dead {
        tracing::warn!(
            device_id,
            "removing /dev/ublkb{device_id}, left added but not served by a primary that died starting or stopping it"
        );
        replblk_ublk::remove_device(device_id)?;
    }
    if plan.recover {
        tracing::info!(
            device_id = plan.device_id,
            "recovering the device left by the previous primary"
        );
    }
    Ok(plan)
}

/// What `/run/replblk/<uuid>.device` says: the id of the device the last
/// primary of this volume added or recovered, whether that recovery was
/// under way, and that primary's process id, which the driver reports as
/// the device's server once the device is started or recovered. Written as
/// `<id> serving <pid>` or `<id> recovering <pid>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeviceRecord {
    device_id: u32,
    /// Written once the driver accepts a recovery, cleared once the device
    /// is served again: still set, it says the primary died mid-recovery.
    recovering: bool,
    /// The process that wrote the record.
    pid: u32,
}

impl DeviceRecord {
    fn parse(text: &str) -> Option<DeviceRecord> {
        let mut words = text.split_whitespace();
        let device_id = words.next()?.parse().ok()?;
        let recovering = match words.next() {
            Some("serving") => false,
            Some("recovering") => true,
            _ => return None,
        };
        let pid = words.next()?.parse().ok()?;
        words.next().is_none().then_some(DeviceRecord {
            device_id,
            recovering,
            pid,
        })
    }

    fn text(self) -> String {
        let phase = if self.recovering {
            "recovering"
        } else {
            "serving"
        };
        format!("{} {phase} {}\n", self.device_id, self.pid)
    }
}

/// The volume's device: the configured id, else the recorded one; with the
/// record.
fn volume_device(config: &Config) -> Result<(Option<u32>, Option<DeviceRecord>), NodeError> {
    let recorded = read_device_record(&device_id_path(config))?;
    let device_id = config
        .device
        .device_id
        .or(recorded.map(|record| record.device_id));
    Ok((device_id, recorded))
}

fn read_device_record(record: &Path) -> Result<Option<DeviceRecord>, NodeError> {
    match std::fs::read_to_string(record) {
        Ok(text) => DeviceRecord::parse(&text)
            .map(Some)
            .ok_or_else(|| NodeError::Mismatch {
                path: record.to_path_buf(),
                field: "device record".into(),
                reason: format!(
                    "{:?} is not \"<device id> serving|recovering <pid>\"",
                    text.trim()
                ),
            }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NodeError::io(record, "reading the device record", source)),
    }
}

fn write_device_record(record: &Path, device: DeviceRecord) -> Result<(), NodeError> {
    if let Some(directory) = record.parent() {
        std::fs::create_dir_all(directory)
            .map_err(|source| NodeError::io(directory, "creating the run directory", source))?;
    }
    // Renamed into place: a primary killed mid-write leaves the old record
    // or the new one, never half of one.
    let partial = record.with_extension("device.partial");
    std::fs::write(&partial, device.text())
        .map_err(|source| NodeError::io(&partial, "writing the device record", source))?;
    std::fs::rename(&partial, record)
        .map_err(|source| NodeError::io(record, "writing the device record", source))
}

/// Removes the device this volume's primary left behind (the configured
/// or the recorded one), unless a primary serves it; forgets the record.
/// Programs still waiting on the device get I/O errors. Returns the id of
/// the device removed, `None` if there was none.
pub fn remove(config: &Config) -> Result<Option<u32>, NodeError> {
    use replblk_ublk::DeviceState;
    if !replblk_ublk::driver_present() {
        return Err(replblk_ublk::UblkDeviceError::NoDriver.into());
    }
    let (Some(device_id), recorded) = volume_device(config)? else {
        return Ok(None);
    };
    let info = replblk_ublk::device_info(device_id)?;
    if let Some(error) = not_ours(device_id, recorded, info) {
        return Err(error);
    }
    let removed = match info.map(|info| info.state) {
        None => None,
        Some(DeviceState::Live) => return Err(NodeError::DeviceServed { device_id }),
        Some(_) => {
            replblk_ublk::remove_device(device_id)?;
            Some(device_id)
        }
    };
    forget_device_id(&device_id_path(config))?;
    Ok(removed)
}

/// One line on the volume's device for `replblk-ctl status`: its id, what
/// the driver says of it and what the volume's record says; `None` when no
/// device is configured or recorded, or the kernel has no ublk.
pub fn device_status(config: &Config) -> Result<Option<String>, NodeError> {
    if !replblk_ublk::driver_present() {
        return Ok(None);
    }
    let (Some(device_id), recorded) = volume_device(config)? else {
        return Ok(None);
    };
    let driver = match replblk_ublk::device_info(device_id)? {
        None => "not present".to_string(),
        Some(info) if info.server_pid > 0 => {
            format!("{:?}, last server pid {}", info.state, info.server_pid)
        }
        Some(info) => format!("{:?}, no server", info.state),
    };
    let record = match recorded.filter(|record| record.device_id == device_id) {
        None => "no record".to_string(),
        Some(record) if record.recovering => format!("recorded recovering by pid {}", record.pid),
        Some(record) => format!("recorded serving by pid {}", record.pid),
    };
    Ok(Some(format!(
        "device /dev/ublkb{device_id} {driver}; {record}"
    )))
}

/// The refusal to touch device `device_id` when the driver names as its
/// last server another process than the primary this volume recorded as
/// serving it: the id was given to another program after this volume's
/// device was removed (the size check alone might not tell). A device never
/// started has no server to compare, nor does a recovery cut short (the
/// driver still names the server before it), nor a device no record names.
fn not_ours(
    device_id: u32,
    recorded: Option<DeviceRecord>,
    info: Option<replblk_ublk::DeviceInfo>,
) -> Option<NodeError> {
    let record = recorded.filter(|record| record.device_id == device_id && !record.recovering)?;
    let info = info.filter(|info| info.server_pid > 0)?;
    (i64::from(info.server_pid) != i64::from(record.pid)).then_some(NodeError::NotOurDevice {
        device_id,
        server_pid: info.server_pid,
        recorded_pid: record.pid,
    })
}

/// The decision of [`plan`], without I/O: from the configured and the
/// recorded device id and the state of the device they name, what to do,
/// and which device (left dead) to remove first.
fn decide(
    configured: Option<u32>,
    recorded: Option<DeviceRecord>,
    info: Option<replblk_ublk::DeviceInfo>,
) -> Result<(DevicePlan, Option<u32>), NodeError> {
    use replblk_ublk::DeviceState;
    let Some(device_id) = configured.or(recorded.map(|record| record.device_id)) else {
        return Ok((
            DevicePlan {
                device_id: None,
                recover: false,
            },
            None,
        ));
    };
    // The record speaks for the device it names only.
    let recorded = recorded.filter(|record| record.device_id == device_id);
    match info.map(|info| info.state) {
        // Recorded but gone (removed by hand): start afresh.
        None => Ok((
            DevicePlan {
                device_id: configured,
                recover: false,
            },
            None,
        )),
        // Linux 6.12's driver, asked to recover a device whose previous
        // recovery died after some of its queues were ready, releases a
        // queue server it never took and crashes (seen in the test VM);
        // one whose recovery died before any queue was ready it refuses.
        Some(DeviceState::Quiesced) if recorded.is_some_and(|record| record.recovering) => {
            Err(NodeError::RecoveryCutShort { device_id })
        }
        Some(DeviceState::Quiesced) => match not_ours(device_id, recorded, info) {
            Some(refusal) => Err(refusal),
            None => Ok((
                DevicePlan {
                    device_id: Some(device_id),
                    recover: true,
                },
                None,
            )),
        },
        // Added but not served: nothing waits on it and no disk is
        // visible, so it is removed and added again under the same id.
        Some(DeviceState::Dead) => Ok((
            DevicePlan {
                device_id: Some(device_id),
                recover: false,
            },
            Some(device_id),
        )),
        Some(state) => Err(NodeError::DeviceBusy {
            device_id,
            state: format!("{state:?}"),
        }),
    }
}

/// How often the device thread checks for a stop request.
const STOP_POLL_INTERVAL_MS: u64 = 200;

/// Serves the volume as a ublk device until `stop_requested` (called
/// with a timeout, returns true once a stop is asked for) or until the
/// device goes away; then removes the device. Prints `ublk device:
/// /dev/ublkbN` on stderr once it takes requests.
pub fn serve(
    config: &Config,
    node_id: u32,
    plan: DevicePlan,
    volume: Arc<Volume>,
    mut stop_requested: impl FnMut(std::time::Duration) -> bool,
) -> Result<(), NodeError> {
    let data = open_for_reads(config, node_id)?;
    let host_volume = volume.clone();
    let host_data = data.clone();
    let host: Box<dyn FnOnce(replblk_ublk::HostedQueue) + Send> = Box::new(move |queue| {
        let job: HostedJob = Box::new(move |volume| {
            Box::pin(queue.serve(move |handle| HostedVolumeTarget {
                volume,
                data: host_data,
                replies: Rc::new(QueueReplies(handle)),
            }))
        });
        // Refused only when the engine has stopped; the queue, dropped with
        // the job, then fails the device's start.
        if host_volume.host(job).is_err() {
            tracing::error!("the engine stopped before it could serve the device's first queue");
        }
    });
    let target = Arc::new(VolumeTarget { volume, data });
    let device = replblk_ublk::DeviceConfig {
        device_id: plan.device_id,
        name: "replblk".into(),
        size_bytes: config.volume.size_bytes,
        logical_block_size_bytes: config.volume.block_size_bytes,
        queues: config.device.queues,
        queue_depth: config.device.queue_depth,
        io_max_bytes: config.device.io_max_bytes,
        recover: plan.recover,
    };
    let record = device_id_path(config);
    // The record changes as the driver's state does: the device added
    // (serving: a restart recovers it), a recovery accepted but its queues
    // not all ready (recovering: a restart must not try again, see
    // `decide`), the recovered device served (serving).
    let note = move |record: &Path, device_id, recovering| {
        if let Err(error) = write_device_record(
            record,
            DeviceRecord {
                device_id,
                recovering,
                pid: std::process::id(),
            },
        ) {
            tracing::error!(
                %error,
                "the device is not recorded: should this primary die, a restart will not find /dev/ublkb{device_id} to recover unless device.device_id names it"
            );
        }
    };
    let added_record = record.clone();
    let added = move |device_id| note(&added_record, device_id, plan.recover);
    let started_record = record.clone();
    let (started_sender, started) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("replblk-ublk".into())
        .spawn(move || {
            replblk_ublk::run(&device, target, Some(host), added, move |device_id| {
                if plan.recover {
                    note(&started_record, device_id, false);
                }
                let _ = started_sender.send(device_id);
            })
        })
        .map_err(|source| NodeError::io(Path::new("."), "spawning the device thread", source))?;
    let interval = std::time::Duration::from_millis(STOP_POLL_INTERVAL_MS);
    let mut device_id = None;
    let mut stop_pending = false;
    loop {
        if device_id.is_none() {
            if let Ok(id) = started.try_recv() {
                eprintln!("ublk device: /dev/ublkb{id}");
                tracing::info!(device_id = id, "serving /dev/ublkb{id}");
                device_id = Some(id);
            }
        }
        if thread.is_finished() {
            break;
        }
        if !stop_pending {
            stop_pending = stop_requested(interval);
        } else {
            // Asked to stop while the device was still starting: it can be
            // stopped only once it has an id.
            std::thread::sleep(interval);
        }
        if let (true, Some(id)) = (stop_pending, device_id) {
            replblk_ublk::stop_device(id)?;
            break;
        }
    }
    let result = thread.join().map_err(|_| NodeError::Fatal {
        reason: "the device thread panicked".into(),
    })?;
    result?;
    forget_device_id(&record)?;
    tracing::info!("device removed");
    Ok(())
}

fn forget_device_id(record: &Path) -> Result<(), NodeError> {
    match std::fs::remove_file(record) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NodeError::io(record, "removing the device id", source)),
    }
}

#[cfg(test)]
mod tests {
    use replblk_ublk::DeviceState;

    use super::*;

    #[test]
    fn the_pool_reuses_released_buffers_and_frees_idle_ones_past_its_cap() {
        // A queue of 8 tags: its pool keeps up to 8 idle buffers.
        let idle_max = 8;
        let pool = Pool::default();
        let mut tag = TagBuffer::new(4096, pool.clone());
        let _other_tags: Vec<TagBuffer> = (1..idle_max)
            .map(|_| TagBuffer::new(4096, pool.clone()))
            .collect();
        // The engine holds on to 20 payloads in a row: each time the tag
        // moves to a buffer of its own.
        let mut held = Vec::new();
        for _ in 0..20 {
            held.push(tag.buf.clone());
            tag.release_if_shared();
            assert_eq!(Arc::strong_count(&tag.buf), 1);
        }
        assert_eq!(pool.borrow().buffers.len(), 20);
        // Nothing held: no new buffer, the tag keeps its memory.
        let before = Arc::as_ptr(&tag.buf);
        tag.release_if_shared();
        assert_eq!(Arc::as_ptr(&tag.buf), before);
        // The engine lets go of them all; the next held payload takes one
        // back from the pool, and the idle ones beyond the cap are freed.
        let released: Vec<*const AlignedBuf> = held.iter().map(Arc::as_ptr).collect();
        held.clear();
        held.push(tag.buf.clone());
        tag.release_if_shared();
        assert!(
            released.contains(&Arc::as_ptr(&tag.buf)),
            "a released buffer is reused"
        );
        let pool = pool.borrow();
        let idle = pool
            .buffers
            .iter()
            .filter(|buf| Arc::strong_count(buf) == 1)
            .count();
        assert_eq!(idle, idle_max);
        assert_eq!(pool.buffers.len(), idle_max + 1, "the held one stays");
    }

    fn plan_of(device_id: Option<u32>, recover: bool) -> DevicePlan {
        DevicePlan { device_id, recover }
    }

    /// The pid the tests' records and devices name as the server.
    const SERVER_PID: u32 = 4242;

    fn serving(device_id: u32) -> Option<DeviceRecord> {
        Some(DeviceRecord {
            device_id,
            recovering: false,
            pid: SERVER_PID,
        })
    }

    fn recovering(device_id: u32) -> Option<DeviceRecord> {
        Some(DeviceRecord {
            device_id,
            recovering: true,
            pid: SERVER_PID,
        })
    }

    fn device(state: DeviceState) -> Option<replblk_ublk::DeviceInfo> {
        Some(replblk_ublk::DeviceInfo {
            state,
            server_pid: SERVER_PID as i32,
        })
    }

    #[test]
    fn no_id_configured_or_recorded_adds_a_device_the_driver_numbers() {
        assert_eq!(
            decide(None, None, None).unwrap(),
            (plan_of(None, false), None)
        );
    }

    #[test]
    fn a_device_left_quiesced_by_a_dead_primary_is_recovered() {
        assert_eq!(
            decide(None, serving(3), device(DeviceState::Quiesced)).unwrap(),
            (plan_of(Some(3), true), None)
        );
        assert_eq!(
            decide(Some(5), None, device(DeviceState::Quiesced)).unwrap(),
            (plan_of(Some(5), true), None)
        );
    }

    #[test]
    fn a_device_left_added_but_not_served_is_removed_and_added_again() {
        assert_eq!(
            decide(None, serving(3), device(DeviceState::Dead)).unwrap(),
            (plan_of(Some(3), false), Some(3))
        );
    }

    #[test]
    fn a_recorded_device_that_is_gone_is_not_reused_unless_configured() {
        assert_eq!(
            decide(None, serving(3), None).unwrap(),
            (plan_of(None, false), None)
        );
        assert_eq!(
            decide(Some(3), serving(3), None).unwrap(),
            (plan_of(Some(3), false), None)
        );
    }

    #[test]
    fn a_device_another_process_serves_is_refused() {
        for state in [
            DeviceState::Live,
            DeviceState::FailIo,
            DeviceState::Other(9),
        ] {
            assert!(matches!(
                decide(None, serving(3), device(state)),
                Err(NodeError::DeviceBusy { device_id: 3, .. })
            ));
        }
    }

    #[test]
    fn a_device_whose_recovery_was_cut_short_is_refused_not_recovered() {
        assert!(matches!(
            decide(None, recovering(3), device(DeviceState::Quiesced)),
            Err(NodeError::RecoveryCutShort { device_id: 3 })
        ));
        // The marker belongs to the recorded device only.
        assert_eq!(
            decide(Some(5), recovering(3), device(DeviceState::Quiesced)).unwrap(),
            (plan_of(Some(5), true), None)
        );
        // Gone or left dead, there is nothing to recover.
        assert_eq!(
            decide(None, recovering(3), device(DeviceState::Dead)).unwrap(),
            (plan_of(Some(3), false), Some(3))
        );
    }

    #[test]
    fn a_quiesced_device_last_served_by_another_process_is_refused() {
        let other = Some(replblk_ublk::DeviceInfo {
            state: DeviceState::Quiesced,
            server_pid: SERVER_PID as i32 + 1,
        });
        assert!(matches!(
            decide(None, serving(3), other),
            Err(NodeError::NotOurDevice {
                device_id: 3,
                recorded_pid: SERVER_PID,
                ..
            })
        ));
        // Configured without a record of it, the operator vouches for it.
        assert_eq!(
            decide(Some(3), None, other).unwrap(),
            (plan_of(Some(3), true), None)
        );
        // remove-device refuses it too; it does judge neither a recovery
        // cut short (the driver still names the server before it), nor a
        // device never started (no server), nor a device the record does
        // not name.
        assert!(not_ours(3, serving(3), other).is_some());
        assert!(not_ours(3, recovering(3), other).is_none());
        assert!(not_ours(4, serving(3), other).is_none());
        let never_started = Some(replblk_ublk::DeviceInfo {
            state: DeviceState::Dead,
            server_pid: -1,
        });
        assert!(not_ours(3, serving(3), never_started).is_none());
        assert!(not_ours(3, serving(3), device(DeviceState::Quiesced)).is_none());
    }

    #[test]
    fn the_device_record_round_trips_and_refuses_other_text() {
        for record in [serving(7), recovering(7)] {
            let record = record.unwrap();
            assert_eq!(DeviceRecord::parse(&record.text()), Some(record));
        }
        for text in [
            "",
            "7",
            "7 serving",
            "7 live 12",
            "seven serving 12",
            "7 serving twelve",
            "7 serving 12 extra",
            "-1 serving 12",
            "7 serving -12",
        ] {
            assert_eq!(DeviceRecord::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn the_device_record_is_written_whole_and_read_back() {
        let directory = tempfile::tempdir().unwrap();
        let record = directory.path().join("run").join("volume.device");
        assert_eq!(read_device_record(&record).unwrap(), None);
        write_device_record(&record, recovering(4).unwrap()).unwrap();
        assert_eq!(read_device_record(&record).unwrap(), recovering(4));
        write_device_record(&record, serving(4).unwrap()).unwrap();
        assert_eq!(read_device_record(&record).unwrap(), serving(4));
        std::fs::write(&record, "4\n").unwrap();
        assert!(matches!(
            read_device_record(&record),
            Err(NodeError::Mismatch { .. })
        ));
    }
}
