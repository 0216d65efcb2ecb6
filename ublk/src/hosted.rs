//! A queue served on a thread the target already runs, on that thread's
//! own `replblk_ring` loop and ring.
//!
//! A queue served on a thread of its own hands every request to the
//! target's thread (replblk's engine) and gets the completion back: two
//! wake-ups of another thread per request, which in replblk's test VM
//! cost more than a whole write of libublk's loop example. A hosted queue is
//! served on the target's thread instead, and its ublk commands go into
//! the host's own io_uring ([`crate::host_ring`]), next to the host's file
//! writes and sockets. libublk still sets the queue up (the mapping of the
//! request descriptors) but its ring for the queue stays unused. The
//! queue's tags are futures inside one task of the host; the target's
//! futures complete on the same thread, and the thread waits on one ring.
//! Nothing crosses a thread between the kernel and the target.
//!
//! The one rule of a queue (only the thread that fetched its first request
//! sends its commands) holds because the whole queue lives inside
//! [`HostedQueue::serve`], which the host runs to its end on one thread,
//! and only that thread enters its ring.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use futures_util::stream::{FuturesUnordered, StreamExt};
use libublk::ctrl::UblkCtrl;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, UblkError};

use crate::host_ring::{self, DeviceFile, HostedThread};
use crate::queue::{serve_tag_until_down, suppress_partition_scan, TagCommands};
use crate::target::Target;

/// A queue of a device being started, handed to a host to serve (see the
/// module doc). The device's start waits until the host serves it or drops
/// it; dropping it unserved makes the start fail rather than wait forever.
pub struct HostedQueue {
    queue_id: u16,
    dev: Arc<UblkDev>,
    /// Where the serving thread's id goes, for libublk's record of the
    /// queue; taken when sent, since `run` counts the reports.
    thread_ids: Option<mpsc::Sender<(u16, libc::pid_t)>>,
    /// Dropped when the queue is done: the device's `run` waits for it.
    _finished: mpsc::Sender<()>,
    /// Set once the host took the queue up, so `run` can tell an unserved
    /// queue from a failed one.
    served: Arc<AtomicBool>,
    /// Whether the device's start was told this queue is ready (or failed).
    reported: bool,
}

/// What `run` keeps of a hosted queue.
pub(crate) struct HostedQueueWatch {
    pub(crate) finished: mpsc::Receiver<()>,
    pub(crate) served: Arc<AtomicBool>,
}

impl HostedQueue {
    pub(crate) fn new(
        queue_id: u16,
        dev: Arc<UblkDev>,
        thread_ids: mpsc::Sender<(u16, libc::pid_t)>,
    ) -> (HostedQueue, HostedQueueWatch) {
        let (finished_sender, finished) = mpsc::channel();
        let served = Arc::new(AtomicBool::new(false));
        let queue = HostedQueue {
            queue_id,
            dev,
            thread_ids: Some(thread_ids),
            _finished: finished_sender,
            served: served.clone(),
            reported: false,
        };
        (queue, HostedQueueWatch { finished, served })
    }

    /// Serves the queue until the device stops. Must be awaited to its end
    /// on one thread, inside `replblk_ring::Ring::block_on`; the thread becomes the
    /// queue's server for the kernel and drops `CAP_SYS_ADMIN` for good
    /// (see `queue::suppress_partition_scan`).
    ///
    /// Dropped before the device stopped (a panic on the host's thread, say),
    /// it aborts the process: see `AbortIfAbandoned` for why living on would
    /// hang.
    pub async fn serve<T: Target>(mut self, target: Rc<T>) {
        self.served.store(true, Ordering::SeqCst);
        let queue_id = self.queue_id;
        let tid = UblkCtrl::init_queue_thread();
        let sent = self
            .thread_ids
            .take()
            .is_some_and(|thread_ids| thread_ids.send((queue_id, tid)).is_ok());
        if !sent {
            return;
        }
        suppress_partition_scan(queue_id);
        let dev = self.dev.clone();
        let queue = match UblkQueue::new(queue_id, &dev) {
            Ok(queue) => queue,
            Err(error) => {
                tracing::error!(queue_id, %error, "ublk: setting up the hosted queue failed");
                return;
            }
        };
        let _hosted = HostedThread::enter();
        let commands = HostRingCommands {
            device: DeviceFile::register(dev.tgt.fds[0]),
            ioctl_encoded: dev.dev_info.flags & u64::from(sys::UBLK_F_CMD_IOCTL_ENCODE) != 0,
            queue_id,
        };
        let capacity_bytes = dev.dev_info.max_io_buf_bytes as usize;
        let size_bytes = dev.tgt.dev_size;
        let (queue, commands, target) = (&queue, &commands, &*target);
        let mut tags: FuturesUnordered<_> = queue
            .tags()
            .map(|tag| {
                serve_tag_until_down(queue, commands, tag, target, capacity_bytes, size_bytes)
            })
            .collect();
        // Buffers belong to the target, as on queue threads (see
        // `queue::serve`): the queue is ready once its tags exist. Their
        // first commands leave when the host's runtime next submits.
        dev.notify_buffer_registration_complete(false);
        self.reported = true;
        let abandon_guard = AbortIfAbandoned { queue_id };
        while tags.next().await.is_some() {}
        std::mem::forget(abandon_guard);
    }
}

/// Aborts the process if a hosted queue's future is dropped before its
/// tags ended (a panic on the host's thread, or its runtime ending while
/// the device lives). Living on would hang it: stopping the device may
/// wait for the requests the dropped tags had taken, which only this
/// thread could complete, and the tags' memory would be lent to the kernel
/// with nobody left to take it back. A dead
/// server is what the kernel knows how to handle: the device is quiesced,
/// and a restart of the primary recovers it and gets those requests again.
struct AbortIfAbandoned {
    queue_id: u16,
}

impl Drop for AbortIfAbandoned {
    fn drop(&mut self) {
        tracing::error!(
            queue_id = self.queue_id,
            "ublk: the hosted queue was dropped while the device lives; aborting so the kernel can recover the device"
        );
        std::process::abort();
    }
}

impl Drop for HostedQueue {
    fn drop(&mut self) {
        if !self.reported {
            // Fails the device's start (libublk reports it as EPERM; `run`
            // says what happened), which would otherwise wait for this
            // queue forever.
            self.dev.notify_buffer_registration_complete(true);
        }
    }
}

/// A hosted queue's commands, sent through the host's ring.
struct HostRingCommands {
    /// The device's char device, which libublk opened and keeps open.
    device: DeviceFile,
    ioctl_encoded: bool,
    queue_id: u16,
}

impl HostRingCommands {
    async fn send(
        &self,
        tag: u16,
        command: u32,
        buffer: *mut u8,
        result: i32,
    ) -> Result<(), UblkError> {
        let outcome = host_ring::io_command(
            &self.device,
            self.ioctl_encoded,
            self.queue_id,
            tag,
            command,
            result,
            buffer as u64,
        )
        .await;
        // UBLK_IO_RES_OK (0): a request waits in the tag.
        match outcome {
            0 => Ok(()),
            sys::UBLK_IO_RES_ABORT => Err(UblkError::QueueIsDown),
            other => Err(UblkError::UringIOError(other)),
        }
    }
}

impl TagCommands for HostRingCommands {
    async fn fetch(&self, tag: u16, buffer: *mut u8) -> Result<(), UblkError> {
        self.send(tag, sys::UBLK_U_IO_FETCH_REQ, buffer, -1).await
    }

    async fn commit_and_fetch(
        &self,
        tag: u16,
        buffer: *mut u8,
        result: i32,
    ) -> Result<(), UblkError> {
        self.send(tag, sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, buffer, result)
            .await
    }
}
