//! A queue served on a thread the target already runs, by that thread's
//! own async runtime.
//!
//! A queue served on a thread of its own hands every request to the
//! target's thread (replblk's engine) and gets the completion back: two
//! wake-ups of another thread per request, which in replblk's test VM
//! cost more than a whole write of libublk's loop example. A hosted queue is
//! served on the target's thread instead. Its ring is still libublk's (one
//! per thread, thread-local), but nobody sleeps in it: the host's tokio
//! runtime polls the ring's file descriptor like any other, the queue's
//! tasks run on a small executor inside one task of the host, and the
//! target's futures complete on the same thread. Nothing crosses a thread
//! between the kernel and the target.
//!
//! The one rule of the ring (only its thread touches it) holds because the
//! whole queue, tags and reaper alike, lives inside [`HostedQueue::serve`],
//! which the host runs to its end on one thread.

use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll};

use libublk::ctrl::UblkCtrl;
use libublk::io::{with_task_io_ring_mut, UblkDev, UblkQueue};
use libublk::uring_async::{ublk_reap_io_events_with_update_queue, ublk_wake_task};
use libublk::UblkError;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use crate::queue::{serve_tag_until_down, suppress_partition_scan};
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
    /// on one thread, inside a tokio runtime with I/O enabled and a
    /// `LocalSet` (tokio-uring's runtime is one); the thread becomes the
    /// queue's server for the kernel and drops `CAP_SYS_ADMIN` for good
    /// (see `queue::suppress_partition_scan`).
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
        let ring_fd = with_task_io_ring_mut(|ring| ring.as_raw_fd());
        // SAFETY: the descriptor is the ring of this thread's thread-local
        // libublk queue ring, created by `UblkQueue::new` above and never
        // closed or replaced while the thread lives; the AsyncFd is a local
        // of this future, which runs to its end on this thread.
        let registered =
            unsafe { AsyncFd::register_with_interest(RingFd(ring_fd), Interest::READABLE) };
        let readable = match registered {
            Ok(readable) => readable,
            Err(error) => {
                let error = error.into_parts().1;
                tracing::error!(queue_id, %error, "ublk: polling the hosted queue's ring failed");
                return;
            }
        };
        let capacity_bytes = dev.dev_info.max_io_buf_bytes as usize;
        let size_bytes = dev.tgt.dev_size;
        let submit = Rc::new(Notify::new());
        let executor = smol::LocalExecutor::new();
        let queue = &queue;
        let tasks: Vec<_> = queue
            .tags()
            .map(|tag| {
                let target = target.clone();
                let task = async move {
                    serve_tag_until_down(queue, tag, &*target, capacity_bytes, size_bytes).await
                };
                executor.spawn(Submits {
                    future: Box::pin(task),
                    submit: submit.clone(),
                })
            })
            .collect();
        // Buffers belong to the target, as on queue threads (see
        // `queue::serve`): the queue is ready once its tasks exist.
        dev.notify_buffer_registration_complete(false);
        self.reported = true;
        let done = || tasks.iter().all(|task| task.is_finished());
        let result = executor.run(reap(queue, &readable, &submit, done)).await;
        if let Err(error) = result {
            tracing::error!(queue_id, %error, "ublk: hosted queue stopped with an error");
        }
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

/// The queue's ring, polled by the host's runtime; libublk owns and closes
/// it.
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Submits what the tags queued and hands completions to them, until every
/// tag task has ended (the device stopped).
async fn reap(
    queue: &UblkQueue<'_>,
    readable: &AsyncFd<RingFd>,
    submit: &Notify,
    done: impl Fn() -> bool,
) -> Result<(), UblkError> {
    loop {
        // Let the tags woken by the last completions run first, so that
        // their commands leave in one submission.
        smol::future::yield_now().await;
        let submitted = with_task_io_ring_mut(|ring| {
            if ring.submission().is_empty() {
                Ok(0)
            } else {
                ring.submit()
            }
        });
        let deferred = match submitted {
            Ok(_) => false,
            // Interrupted, or completions to reap first: what is left in
            // the submission queue goes on the next round.
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) =>
            {
                tracing::debug!(%error, "ublk: hosted queue's submission deferred");
                true
            }
            Err(error) => return Err(UblkError::IOError(error)),
        };
        if done() {
            return Ok(());
        }
        let completion = async {
            let mut guard = readable.readable().await?;
            // Cleared before reaping: a completion that lands after the
            // reap below raises the descriptor's readiness again.
            guard.clear_ready();
            Ok::<(), std::io::Error>(())
        };
        let submission = async {
            submit.notified().await;
            Ok(())
        };
        // After a deferred submission, no wait: reap, then try again.
        if !deferred {
            smol::future::or(completion, submission)
                .await
                .map_err(UblkError::IOError)?;
        }
        let mut reaped = 0_u32;
        let aborted = ublk_reap_io_events_with_update_queue(queue, false, None, |cqe| {
            reaped += 1;
            ublk_wake_task(cqe.user_data(), cqe)
        })?;
        tracing::trace!(reaped, aborted, "ublk: hosted queue reaped");
    }
}

/// A tag's task that wakes the reaper whenever a poll left commands queued
/// in the ring, and when the task ends. A tag woken by the target (not by
/// a completion) would otherwise queue its commit while the reaper sleeps;
/// and the last tags to end (the device stopped) may run after the reaper
/// last looked, which would then wait for a completion that never comes.
struct Submits<F> {
    future: Pin<Box<F>>,
    submit: Rc<Notify>,
}

impl<F: Future<Output = ()>> Future for Submits<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let poll = self.future.as_mut().poll(cx);
        if poll.is_ready() || !with_task_io_ring_mut(|ring| ring.submission().is_empty()) {
            self.submit.notify_one();
        }
        poll
    }
}
