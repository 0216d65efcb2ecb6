//! Creating, recovering, serving and removing a ublk device.

use std::path::Path;
use std::sync::Arc;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};

use crate::error::UblkDeviceError;
use crate::hosted::HostedQueue;
use crate::queue;
use crate::target::Target;
use crate::SECTOR_SIZE_BYTES;

/// The kernel's control node; absent without the ublk driver.
const CONTROL_PATH: &str = "/dev/ublk-control";
/// The driver's limits (include/uapi/linux/ublk_cmd.h).
const QUEUE_DEPTH_MAX: u16 = 4096;
const QUEUES_MAX: u16 = 4096;
/// Largest request we accept: keeps per-tag buffers bounded
/// (queues x depth x this is the frontend's memory).
pub const IO_MAX_BYTES_LIMIT: u32 = 1 << 20;

/// How the device looks to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// `/dev/ublkbN`'s N; `None` lets the driver choose (new devices only).
    pub device_id: Option<u32>,
    /// Name shown by the driver.
    pub name: String,
    /// Capacity.
    pub size_bytes: u64,
    /// 512 or 4096.
    pub logical_block_size_bytes: u32,
    /// Hardware queues, each served by a thread.
    pub queues: u16,
    /// Requests in flight per queue.
    pub queue_depth: u16,
    /// Largest single request.
    pub io_max_bytes: u32,
    /// Take over device `device_id`, left quiesced by a server that died,
    /// instead of adding a new one.
    pub recover: bool,
}

impl DeviceConfig {
    fn validate(&self) -> Result<(), UblkDeviceError> {
        let refuse = |field, reason: String| Err(UblkDeviceError::Config { field, reason });
        let block = self.logical_block_size_bytes;
        if block != 512 && block != 4096 {
            return refuse("logical block size", format!("{block} bytes; 512 or 4096"));
        }
        if self.size_bytes == 0 || !self.size_bytes.is_multiple_of(u64::from(block)) {
            return refuse(
                "size",
                format!(
                    "{} bytes is not a positive multiple of the {block}-byte block",
                    self.size_bytes
                ),
            );
        }
        if self.queues == 0 || self.queues > QUEUES_MAX {
            return refuse("queues", format!("{}; 1 to {QUEUES_MAX}", self.queues));
        }
        if self.queue_depth == 0 || self.queue_depth > QUEUE_DEPTH_MAX {
            return refuse(
                "queue depth",
                format!("{}; 1 to {QUEUE_DEPTH_MAX}", self.queue_depth),
            );
        }
        if self.io_max_bytes < 4096
            || self.io_max_bytes > IO_MAX_BYTES_LIMIT
            || !self.io_max_bytes.is_multiple_of(4096)
        {
            return refuse(
                "largest request",
                format!(
                    "{} bytes; a multiple of 4096 from 4096 to {IO_MAX_BYTES_LIMIT}",
                    self.io_max_bytes
                ),
            );
        }
        if self.recover && self.device_id.is_none() {
            return refuse(
                "device id",
                "recovery needs the id of the device to recover".into(),
            );
        }
        Ok(())
    }
}

/// A device's state as the driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Added, not started (or stopped).
    Dead,
    /// Served.
    Live,
    /// Its server died; requests wait for a new server to recover it.
    Quiesced,
    /// Its server died; requests fail.
    FailIo,
    /// A state this frontend does not know.
    Other(u16),
}

/// Whether the driver is loaded.
pub fn driver_present() -> bool {
    Path::new(CONTROL_PATH).exists()
}

/// What the driver says about a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its state.
    pub state: DeviceState,
    /// The process id of the server that started or last recovered it
    /// (gone, if the device is quiesced); not positive if none did.
    pub server_pid: i32,
}

/// The state of device `device_id`, or `None` if there is no such device.
pub fn device_state(device_id: u32) -> Result<Option<DeviceState>, UblkDeviceError> {
    Ok(device_info(device_id)?.map(|info| info.state))
}

/// The driver's information on device `device_id`, or `None` if there is
/// no such device.
pub fn device_info(device_id: u32) -> Result<Option<DeviceInfo>, UblkDeviceError> {
    if !driver_present() {
        return Err(UblkDeviceError::NoDriver);
    }
    if !Path::new(&format!("/dev/ublkc{device_id}")).exists() {
        return Ok(None);
    }
    let info = control(device_id)?.dev_info();
    let state = match u32::from(info.state) {
        sys::UBLK_S_DEV_DEAD => DeviceState::Dead,
        sys::UBLK_S_DEV_LIVE => DeviceState::Live,
        sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
        sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
        _ => DeviceState::Other(info.state),
    };
    Ok(Some(DeviceInfo {
        state,
        server_pid: info.ublksrv_pid,
    }))
}

/// The control handle of an existing device.
fn control(device_id: u32) -> Result<UblkCtrl, UblkDeviceError> {
    UblkCtrl::new_simple(device_id as i32)
        .map_err(|error| UblkDeviceError::driver(format!("opening device {device_id}"), error))
}

/// The capacity device `device_id` was created with.
fn device_size_bytes(ctrl: &UblkCtrl) -> Result<u64, UblkDeviceError> {
    let mut params = sys::ublk_params {
        len: std::mem::size_of::<sys::ublk_params>() as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC,
        ..Default::default()
    };
    ctrl.get_params(&mut params)
        .map_err(|error| UblkDeviceError::driver("reading the device's parameters", error))?;
    Ok(params.basic.dev_sectors * SECTOR_SIZE_BYTES)
}

/// Stops device `device_id` from another thread: its queues wind down and
/// [`run`] returns. Requests in flight complete first.
pub fn stop_device(device_id: u32) -> Result<(), UblkDeviceError> {
    control(device_id)?
        .kill_dev()
        .map_err(|error| UblkDeviceError::driver(format!("stopping device {device_id}"), error))?;
    Ok(())
}

/// Removes device `device_id` (stopped, or left by a dead server).
pub fn remove_device(device_id: u32) -> Result<(), UblkDeviceError> {
    control(device_id)?
        .del_dev()
        .map_err(|error| UblkDeviceError::driver(format!("removing device {device_id}"), error))?;
    Ok(())
}

/// Creates the device (or recovers it, see [`DeviceConfig::recover`]) and
/// serves it with `target` until it is stopped ([`stop_device`]); then
/// removes it. `added` is called with the device id as soon as the driver
/// has the device (before it is started: a caller that records the id
/// there finds the device again should it die while starting it; for a
/// recovery, once the driver has accepted it and before any queue is
/// ready), and `started` once `/dev/ublkbN` takes requests.
///
/// Each queue is served by a thread of its own with `target`, except queue
/// 0 when `host` is given: it gets that queue as a [`HostedQueue`] and
/// serves it on a thread it already runs.
///
/// The device is created with `UBLK_F_USER_RECOVERY_REISSUE`: should this
/// process die, the device stays, requests wait, and the ones this process
/// had taken are issued again to the server that recovers it.
pub fn run<T: Target + Send + Sync>(
    config: &DeviceConfig,
    target: Arc<T>,
    host: Option<Box<dyn FnOnce(HostedQueue) + Send>>,
    added: impl FnOnce(u32),
    started: impl FnOnce(u32),
) -> Result<(), UblkDeviceError> {
    config.validate()?;
    if !driver_present() {
        return Err(UblkDeviceError::NoDriver);
    }
    let dev_flags = if config.recover {
        let device_id = config.device_id.expect("validated");
        let ctrl = control(device_id)?;
        let size_bytes = device_size_bytes(&ctrl)?;
        if size_bytes != config.size_bytes {
            return Err(UblkDeviceError::Config {
                field: "size",
                reason: format!(
                    "device {device_id} has {size_bytes} bytes, the volume {}: not this volume's device",
                    config.size_bytes
                ),
            });
        }
        let action = || format!("starting the recovery of device {device_id}");
        match ctrl.start_user_recover() {
            Ok(code) if code >= 0 => {}
            // libublk retries while the dead server's files close, for up
            // to 30 s, and then hands the EBUSY back.
            Ok(code) => {
                return Err(UblkDeviceError::driver(
                    action(),
                    libublk::UblkError::OtherError(code),
                ))
            }
            // 6.12 refuses when no queue of the device is ready, which is
            // how a recovery cut short by the server's death leaves it.
            Err(libublk::UblkError::UringIOError(code)) if code == -libc::EINVAL => {
                return Err(UblkDeviceError::Unrecoverable { device_id })
            }
            Err(error) => return Err(UblkDeviceError::driver(action(), error)),
        }
        UblkFlags::UBLK_DEV_F_RECOVER_DEV
    } else {
        UblkFlags::UBLK_DEV_F_ADD_DEV
    };
    let ctrl = UblkCtrlBuilder::default()
        .name(&config.name)
        .id(config.device_id.map_or(-1, |id| id as i32))
        .nr_queues(config.queues)
        .depth(config.queue_depth)
        .io_buf_bytes(config.io_max_bytes)
        .ctrl_flags(u64::from(
            sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE,
        ))
        .dev_flags(dev_flags)
        .build()
        .map_err(|error| UblkDeviceError::driver(adding(config), error))?;
    let device_id = ctrl.dev_info().dev_id;
    added(device_id);

    let size_bytes = config.size_bytes;
    let block_shift = config.logical_block_size_bytes.trailing_zeros() as u8;
    let depth = u32::from(config.queue_depth);
    let init = move |dev: &mut UblkDev| {
        dev.tgt.dev_size = size_bytes;
        // A queue's ring holds a fetch per idle tag, a target read per busy
        // tag and the wake-up poll: twice the depth leaves room for bursts.
        dev.tgt.sq_depth = (2 * depth).min(u32::from(u16::MAX)) as u16;
        dev.tgt.cq_depth = dev.tgt.sq_depth;
        dev.tgt.params = sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC,
            basic: sys::ublk_param_basic {
                // A volatile cache makes the kernel send FLUSH (and FUA),
                // which is how a filesystem asks for durability.
                attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
                logical_bs_shift: block_shift,
                physical_bs_shift: block_shift.max(12),
                io_opt_shift: 12,
                io_min_shift: block_shift,
                max_sectors: dev.dev_info.max_io_buf_bytes / SECTOR_SIZE_BYTES as u32,
                dev_sectors: size_bytes / SECTOR_SIZE_BYTES,
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(())
    };
    let dev = UblkDev::new(ctrl.get_name(), init, &ctrl).map_err(|error| {
        UblkDeviceError::driver(format!("setting up device {device_id}"), error)
    })?;
    let result = serve(&ctrl, Arc::new(dev), config.queues, target, host, started);
    // A device taken over by recovery is not removed by libublk on drop;
    // removing it here makes a clean stop the same in both cases. After a
    // failed start it also ends the queues, whose commands it aborts.
    let removed = ctrl.del_dev();
    result?;
    match removed {
        Ok(_) => Ok(()),
        Err(libublk::UblkError::OtherError(code)) if code == -libc::ENOENT => Ok(()),
        Err(error) => Err(UblkDeviceError::driver(
            format!("removing device {device_id}"),
            error,
        )),
    }
}

/// Starts the queues (threads, and the hosted one), starts the device and
/// waits until every queue has ended; what libublk's `run_target` does, but
/// with queue 0 possibly hosted.
fn serve<T: Target + Send + Sync>(
    ctrl: &UblkCtrl,
    dev: Arc<UblkDev>,
    queues: u16,
    target: Arc<T>,
    mut host: Option<Box<dyn FnOnce(HostedQueue) + Send>>,
    started: impl FnOnce(u32),
) -> Result<(), UblkDeviceError> {
    let device_id = dev.dev_info.dev_id;
    let (thread_ids, ids) = std::sync::mpsc::channel();
    let mut threads = Vec::new();
    let mut hosted = None;
    for queue_id in 0..queues {
        if let Some(host) = host.take() {
            let (queue, watch) = HostedQueue::new(queue_id, dev.clone(), thread_ids.clone());
            hosted = Some(watch);
            host(queue);
            continue;
        }
        let (dev, target, thread_ids) = (dev.clone(), target.clone(), thread_ids.clone());
        let thread = std::thread::Builder::new()
            .name(format!("replblk-queue-{queue_id}"))
            .spawn(move || {
                let tid = UblkCtrl::init_queue_thread();
                if thread_ids.send((queue_id, tid)).is_ok() {
                    drop(thread_ids);
                    queue::serve(queue_id, &dev, target);
                }
            })
            .map_err(|error| {
                UblkDeviceError::driver(
                    format!("starting queue {queue_id}'s thread"),
                    libublk::UblkError::IOError(error),
                )
            })?;
        threads.push(thread);
    }
    drop(thread_ids);
    // libublk records each queue's thread; only queue threads are pinned
    // to the queue's CPUs, a host's thread is the host's business.
    // Every queue reports once; a queue that fails first drops its sender
    // unsent, and the loop ends when all are gone.
    for (queue_id, tid) in ids.iter().take(usize::from(queues)) {
        if hosted.is_none() || queue_id != 0 {
            ctrl.set_thread_affinity(queue_id, tid);
        }
        ctrl.configure_queue(&dev, queue_id, tid).map_err(|error| {
            UblkDeviceError::driver(format!("recording queue {queue_id}"), error)
        })?;
    }
    if let Err(error) = ctrl.start_dev(&dev) {
        if let Some(watch) = &hosted {
            if !watch.served.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(UblkDeviceError::Driver {
                    action: format!("starting device {device_id}"),
                    reason: "the host of queue 0 let it go without serving it".into(),
                    errno: None,
                });
            }
        }
        return Err(UblkDeviceError::driver(
            format!("starting device {device_id}"),
            error,
        ));
    }
    started(device_id);
    if let Some(watch) = hosted {
        // Returns when the hosted queue ends: the device stopped, or its
        // host did. In the second case the other queues must end too.
        let _ = watch.finished.recv();
        let _ = ctrl.kill_dev();
    }
    for thread in threads {
        if thread.join().is_err() {
            tracing::error!(device_id, "ublk: a queue thread panicked");
        }
    }
    // The device may have been removed from elsewhere: ENOENT is normal.
    let _ = ctrl.stop_dev();
    Ok(())
}

fn adding(config: &DeviceConfig) -> String {
    match (config.recover, config.device_id) {
        (true, Some(id)) => format!("taking over device {id}"),
        (_, Some(id)) => format!("adding device {id}"),
        (_, None) => "adding a device".into(),
    }
}
