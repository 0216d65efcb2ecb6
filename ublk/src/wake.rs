//! Waking a queue thread from other threads.
//!
//! A queue thread sleeps in `io_uring_enter` on its own ring, and only that
//! thread may touch the ring. A target's future that completes on another
//! thread (a oneshot sent by replblk's engine) wakes its task, which puts
//! the task on the queue's executor but does not end the sleep. So the
//! future is wrapped in [`Notified`], whose waker also writes the queue's
//! eventfd; the queue keeps a poll on that eventfd in its ring, and the
//! poll's completion ends the sleep so the executor runs the woken tasks.
//!
//! Writes are coalesced: only the first wake after the queue last drained
//! the eventfd writes to it, so a burst of completions costs one syscall.

use std::future::Future;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::ThreadId;

use nix::sys::eventfd::{EfdFlags, EventFd};

/// One queue thread's wake-up channel.
pub struct Notifier {
    eventfd: EventFd,
    /// Set by the first wake since the queue thread last drained the eventfd.
    pending: AtomicBool,
    queue_thread: ThreadId,
}

impl Notifier {
    /// A notifier for the calling thread, which must be the queue thread.
    pub fn new() -> std::io::Result<Arc<Notifier>> {
        let eventfd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(Arc::new(Notifier {
            eventfd,
            pending: AtomicBool::new(false),
            queue_thread: std::thread::current().id(),
        }))
    }

    /// Raw descriptor, for the queue's poll.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.eventfd.as_fd().as_raw_fd()
    }

    fn notify(&self) {
        // A wake on the queue thread itself needs no eventfd: the thread is
        // running and ticks its executor before it sleeps again.
        if std::thread::current().id() == self.queue_thread {
            return;
        }
        if !self.pending.swap(true, Ordering::SeqCst) {
            // EAGAIN means the counter is saturated, i.e. already readable.
            let written = self.eventfd.write(1);
            tracing::trace!(?written, "ublk: queue notified");
        }
    }

    /// Called by the queue thread when the poll fired, before it runs the
    /// woken tasks: a wake after this writes the eventfd again.
    pub fn drain(&self) {
        // Read first, clear the flag after. The other order loses wake-ups:
        // a wake between the clear and the read sets the flag and writes,
        // the read swallows that write, and every later wake sees the flag
        // set and writes nothing, so the queue sleeps until its idle
        // timeout (seen in the VM as writes stuck for 20 s). In this order a
        // wake that finds the flag still set has already queued its task,
        // which the executor runs before the queue thread sleeps again.
        // Nothing to read (EAGAIN) is fine.
        let _ = self.eventfd.read();
        self.pending.store(false, Ordering::SeqCst);
    }

    /// Keeps the eventfd polled in the queue's ring until the queue stops.
    /// Runs as a task on the queue's executor.
    pub async fn serve(self: Arc<Self>, stopping: impl Fn() -> bool) {
        while !stopping() {
            let poll = io_uring::opcode::PollAdd::new(
                io_uring::types::Fd(self.raw_fd()),
                libc::POLLIN as u32,
            )
            .build();
            let result = libublk::uring_async::ublk_submit_sqe_async(
                poll,
                libublk::UblkUringData::Target as u64,
            )
            .await;
            tracing::trace!(?result, "ublk: wake-up poll fired");
            if let Err(error) = result {
                // Without the poll, completions from other threads reach
                // this queue only when something else wakes it (its idle
                // timeout at worst): say so rather than stall quietly.
                if !stopping() {
                    tracing::error!(%error, "ublk: the queue's wake-up poll failed; completions will be late");
                }
                break;
            }
            self.drain();
        }
    }
}

struct NotifyWaker {
    task: Waker,
    notifier: Arc<Notifier>,
}

impl Wake for NotifyWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.task.wake_by_ref();
        self.notifier.notify();
    }
}

/// A future whose wake-ups also reach the queue thread (see the module doc).
/// Wrap a whole long-lived task in it, so the wrapping waker is built once
/// per task rather than once per request.
pub struct Notified<F> {
    future: Pin<Box<F>>,
    notifier: Arc<Notifier>,
    /// The executor's waker for this task and our wrapper around it.
    wakers: Option<(Waker, Waker)>,
}

impl<F: Future> Notified<F> {
    /// Wraps `future`.
    pub fn new(future: F, notifier: Arc<Notifier>) -> Notified<F> {
        Notified {
            future: Box::pin(future),
            notifier,
            wakers: None,
        }
    }
}

impl<F: Future> Future for Notified<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let current = match &this.wakers {
            Some((task, _)) => task.will_wake(cx.waker()),
            None => false,
        };
        if !current {
            let wrapper = Waker::from(Arc::new(NotifyWaker {
                task: cx.waker().clone(),
                notifier: this.notifier.clone(),
            }));
            this.wakers = Some((cx.waker().clone(), wrapper));
        }
        let (_, wrapper) = this.wakers.as_ref().expect("set above");
        let mut inner = Context::from_waker(wrapper);
        this.future.as_mut().poll(&mut inner)
    }
}
