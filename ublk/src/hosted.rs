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
//! request descriptors) but its ring for the queue stays unused. The queue
//! keeps a table of its tags, and each of its operations on the ring
//! carries its tag as the token the ring hands the completion back with
//! (`replblk_ring::Completions`). A request is served from there: a read
//! from the target's file on the same ring, a write or a flush by a call to
//! the [`HostedTarget`], which answers through the queue's
//! [`QueueHandle`] when done. No task, future or waker per request; the
//! thread waits on one ring, and nothing crosses a thread between the
//! kernel and the target.
//!
//! The one rule of a queue (only the thread that fetched its first request
//! sends its commands) holds because the whole queue lives inside
//! [`HostedQueue::serve`], which the host runs to its end on one thread,
//! and only that thread enters its ring.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, types};
use libublk::ctrl::UblkCtrl;
use libublk::io::{UblkDev, UblkQueue};
use libublk::sys;

use crate::host_ring::{self, DeviceFile};
use crate::queue::{checked, decode, suppress_partition_scan, Request, TagMemory};
use crate::target::{Answer, Errno, HostedTarget, QueueHandle, RequestBuffer};

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

    /// Serves the queue until the device stops, with the target
    /// `make_target` returns, given the handle it answers through. Must be
    /// awaited to its end on one thread, inside `replblk_ring::Ring::block_on`;
    /// the thread becomes the queue's server for the kernel and drops
    /// `CAP_SYS_ADMIN` for good (see `queue::suppress_partition_scan`).
    ///
    /// Dropped before the device stopped (a panic on the host's thread, say),
    /// it aborts the process: see `AbortIfAbandoned` for why living on would
    /// hang.
    pub async fn serve<T: HostedTarget>(mut self, make_target: impl FnOnce(QueueHandle) -> T) {
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
        // Lives until every tag ended: the request descriptors are mapped
        // as long as it does.
        let queue = match UblkQueue::new(queue_id, &dev) {
            Ok(queue) => queue,
            Err(error) => {
                tracing::error!(queue_id, %error, "ublk: setting up the hosted queue failed");
                return;
            }
        };
        let depth = dev.dev_info.queue_depth;
        let core = Rc::new(QueueCore {
            queue_id,
            device: DeviceFile::register(dev.tgt.fds[0]),
            ioctl_encoded: dev.dev_info.flags & u64::from(sys::UBLK_F_CMD_IOCTL_ENCODE) != 0,
            capacity_bytes: dev.dev_info.max_io_buf_bytes as usize,
            size_bytes: dev.tgt.dev_size,
            descriptors: (0..depth)
                .map(|tag| std::ptr::from_ref(queue.get_iod(tag)))
                .collect(),
            tags: RefCell::new((0..depth).map(|_| TagState::default()).collect()),
            target: OnceCell::new(),
            answered: RefCell::new(VecDeque::new()),
            calling_target: Cell::new(false),
            tags_live: Cell::new(0),
            all_ended: Cell::new(None),
        });
        let handle: Weak<dyn Answer> = Rc::downgrade(&core) as Weak<dyn Answer>;
        let target = make_target(QueueHandle(handle));
        let served_tags: Vec<u16> = queue.tags().collect();
        {
            let mut tags = core.tags.borrow_mut();
            for &tag in &served_tags {
                let buffer = target.new_buffer(core.capacity_bytes);
                assert!(
                    buffer.capacity_bytes() >= core.capacity_bytes,
                    "target's buffer too small"
                );
                tags[usize::from(tag)].memory.buffer = Some(buffer);
            }
        }
        let _ = core.target.set(target);
        core.tags_live.set(served_tags.len());
        for &tag in &served_tags {
            core.command(tag, sys::UBLK_U_IO_FETCH_REQ, -1);
        }
        // Buffers belong to the target, as on queue threads (see
        // `queue::serve`): the queue is ready once its tags have them. Their
        // first commands leave when the host's ring next submits.
        dev.notify_buffer_registration_complete(false);
        self.reported = true;
        let abandon_guard = AbortIfAbandoned { queue_id };
        AllEnded(&core).await;
        std::mem::forget(abandon_guard);
        drop(core);
        drop(queue);
    }
}

/// Tokens of the queue's operations on the ring: the tag, and whether the
/// operation is a read of the target's file (else a ublk command).
const READ_TOKEN: u64 = 1 << 16;

/// A read the queue serves from the target's file, in progress.
#[derive(Clone, Copy)]
struct ReadProgress {
    offset_bytes: u64,
    length_bytes: u32,
    done_bytes: u32,
}

struct TagState<B> {
    memory: TagMemory<B>,
    /// What the kernel gets when the target answers `Ok`: the request's
    /// length.
    ok_result: i32,
    /// The target holds the tag's request and owes an answer.
    with_target: bool,
    read: Option<ReadProgress>,
}

impl<B> Default for TagState<B> {
    fn default() -> TagState<B> {
        TagState {
            memory: TagMemory {
                buffer: None,
                lent_to_kernel: false,
            },
            ok_result: 0,
            with_target: false,
            read: None,
        }
    }
}

/// A hosted queue's state, shared by the ring's slots of its operations
/// and by its handle.
struct QueueCore<T: HostedTarget> {
    queue_id: u16,
    /// The device's char device, which libublk opened and keeps open.
    device: DeviceFile,
    ioctl_encoded: bool,
    capacity_bytes: usize,
    size_bytes: u64,
    /// Each tag's request descriptor, in the array libublk mapped.
    descriptors: Vec<*const sys::ublksrv_io_desc>,
    tags: RefCell<Vec<TagState<T::Buffer>>>,
    target: OnceCell<T>,
    /// Answers given while the queue was calling the target, committed
    /// once the call returned.
    answered: RefCell<VecDeque<(u16, Result<(), Errno>)>>,
    calling_target: Cell<bool>,
    /// Tags whose commands the kernel has not ended.
    tags_live: Cell<usize>,
    /// Woken once no tag is live.
    all_ended: Cell<Option<Waker>>,
}

impl<T: HostedTarget> QueueCore<T> {
    fn target(&self) -> &T {
        self.target
            .get()
            .expect("the target is set before any request")
    }

    /// Sends `command` for `tag`, completing its request with `result`
    /// where the command commits one.
    fn command(self: &Rc<Self>, tag: u16, command: u32, result: i32) {
        let buffer_address = {
            let mut tags = self.tags.borrow_mut();
            let memory = &mut tags[usize::from(tag)].memory;
            memory.lent_to_kernel = true;
            memory.buffer().as_mut_ptr() as u64
        };
        let entry = host_ring::io_command_entry(
            &self.device,
            self.ioctl_encoded,
            self.queue_id,
            tag,
            command,
            result,
            buffer_address,
        );
        // SAFETY: the entry carries its 16 bytes of command itself; the
        // buffer it names is the tag's, kept by this queue (leaked rather
        // than freed while lent to the kernel, see `TagMemory`), and the
        // char device's table entry is held by `self.device`, which the
        // operation's slot keeps alive through its reference to the queue.
        unsafe { replblk_ring::submit_to(entry, self.clone(), u64::from(tag)) };
    }

    /// The kernel handed `tag` a request: serves it or hands it to the
    /// target.
    fn serve_request(self: &Rc<Self>, tag: u16) {
        // SAFETY: the descriptor array stays mapped while `serve` holds the
        // queue, which it does until every tag ended, and a tag's commands
        // complete only before that; the kernel wrote this tag's descriptor
        // before completing its command, and leaves it until the next.
        let descriptor = unsafe { std::ptr::read(self.descriptors[usize::from(tag)]) };
        let request = match checked(decode(&descriptor), self.capacity_bytes, self.size_bytes) {
            Ok(request) => request,
            Err(result) => return self.command(tag, sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, result),
        };
        match request {
            Request::Read {
                offset_bytes,
                length_bytes,
            } => {
                self.tags.borrow_mut()[usize::from(tag)].read = Some(ReadProgress {
                    offset_bytes,
                    length_bytes,
                    done_bytes: 0,
                });
                self.read_more(tag);
            }
            Request::Write {
                offset_bytes,
                length_bytes,
                fua,
            } => {
                let mut tags = self.tags.borrow_mut();
                let state = &mut tags[usize::from(tag)];
                state.ok_result = length_bytes as i32;
                state.with_target = true;
                // The target may answer at once (a refusal): the answer
                // waits in `answered` until the call returns.
                self.calling_target.set(true);
                self.target()
                    .write(offset_bytes, length_bytes, state.memory.buffer(), fua, tag);
                self.calling_target.set(false);
                drop(tags);
                self.commit_answered();
            }
            Request::Flush => {
                {
                    let mut tags = self.tags.borrow_mut();
                    let state = &mut tags[usize::from(tag)];
                    state.ok_result = 0;
                    state.with_target = true;
                }
                self.calling_target.set(true);
                self.target().flush(tag);
                self.calling_target.set(false);
                self.commit_answered();
            }
            Request::Unsupported { .. } => unreachable!("refused by the check"),
        }
    }

    fn commit_answered(self: &Rc<Self>) {
        loop {
            let next = self.answered.borrow_mut().pop_front();
            let Some((tag, result)) = next else { return };
            self.finish(tag, result);
        }
    }

    /// The target's answer for `tag`: commits it and fetches the tag's next
    /// request.
    fn finish(self: &Rc<Self>, tag: u16, result: Result<(), Errno>) {
        let value = {
            let mut tags = self.tags.borrow_mut();
            let state = &mut tags[usize::from(tag)];
            if !state.with_target {
                tracing::warn!(
                    queue_id = self.queue_id,
                    tag,
                    "ublk: an answer for a tag the target holds no request of; ignored"
                );
                return;
            }
            state.with_target = false;
            match result {
                Ok(()) => state.ok_result,
                Err(errno) => -errno,
            }
        };
        self.command(tag, sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, value);
    }

    /// Reads what is left of `tag`'s read from the target's file.
    fn read_more(self: &Rc<Self>, tag: u16) {
        let fd = self.target().read_file();
        let entry = {
            let mut tags = self.tags.borrow_mut();
            let state = &mut tags[usize::from(tag)];
            let read = state.read.expect("a read in progress");
            let into = state
                .memory
                .buffer()
                .as_mut_ptr()
                .wrapping_add(read.done_bytes as usize);
            opcode::Read::new(types::Fd(fd), into, read.length_bytes - read.done_bytes)
                .offset(read.offset_bytes + u64::from(read.done_bytes))
                .build()
        };
        // SAFETY: the entry points into the tag's buffer, within the
        // request's length (checked against its capacity); nothing else
        // uses the buffer until the read completes, and the queue keeps it
        // until then (a tag with a read in flight has not ended).
        unsafe { replblk_ring::submit_to(entry, self.clone(), READ_TOKEN | u64::from(tag)) };
    }

    fn read_done(self: &Rc<Self>, tag: u16, result: i32) {
        let outcome = {
            let mut tags = self.tags.borrow_mut();
            let state = &mut tags[usize::from(tag)];
            let read = state.read.as_mut().expect("a read in progress");
            match result {
                error if error < 0 => {
                    tracing::error!(
                        offset_bytes = read.offset_bytes,
                        length_bytes = read.length_bytes,
                        errno = -error,
                        "read from the copy failed"
                    );
                    Some(error)
                }
                0 => {
                    tracing::error!(
                        offset_bytes = read.offset_bytes,
                        length_bytes = read.length_bytes,
                        done = read.done_bytes,
                        "short read from the copy"
                    );
                    Some(-libc::EIO)
                }
                done => {
                    // A short read (never seen on O_DIRECT files, allowed
                    // by the ABI) is continued rather than returned short.
                    read.done_bytes += done as u32;
                    (read.done_bytes >= read.length_bytes).then_some(read.length_bytes as i32)
                }
            }
        };
        match outcome {
            Some(value) => {
                self.tags.borrow_mut()[usize::from(tag)].read = None;
                self.command(tag, sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, value);
            }
            None => self.read_more(tag),
        }
    }

    fn tag_ended(&self) {
        let live = self.tags_live.get() - 1;
        self.tags_live.set(live);
        if live == 0 {
            if let Some(waker) = self.all_ended.take() {
                waker.wake();
            }
        }
    }
}

impl<T: HostedTarget> replblk_ring::Completions for QueueCore<T> {
    fn completed(self: Rc<Self>, token: u64, result: i32) {
        let tag = (token & 0xffff) as u16;
        if token & READ_TOKEN != 0 {
            return self.read_done(tag, result);
        }
        self.tags.borrow_mut()[usize::from(tag)]
            .memory
            .lent_to_kernel = false;
        // UBLK_IO_RES_OK (0): a request waits in the tag.
        match result {
            0 => self.serve_request(tag),
            sys::UBLK_IO_RES_ABORT => self.tag_ended(),
            error => {
                tracing::error!(queue_id = self.queue_id, tag, error, "ublk: tag stopped");
                self.tag_ended();
            }
        }
    }
}

impl<T: HostedTarget> Answer for QueueCore<T> {
    fn answer(self: Rc<Self>, tag: u16, result: Result<(), Errno>) {
        if self.calling_target.get() {
            self.answered.borrow_mut().push_back((tag, result));
        } else {
            self.finish(tag, result);
        }
    }
}

/// Ready once every tag of the queue ended.
struct AllEnded<'a, T: HostedTarget>(&'a QueueCore<T>);

impl<T: HostedTarget> Future for AllEnded<'_, T> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.tags_live.get() == 0 {
            return Poll::Ready(());
        }
        self.0.all_ended.set(Some(cx.waker().clone()));
        Poll::Pending
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
