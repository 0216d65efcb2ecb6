//! The engine thread's own io_uring loop: one ring, one thread, a slot per
//! operation found again by the completion's `user_data`, and tasks run
//! until none is ready before the thread waits in the ring.
//!
//! Why not compio, which the engine ran on before: its driver boxes every
//! operation and files it in a hash set, and its executor allocates a task
//! per local write; in the test VM that came to 17 µs of user-space CPU
//! per write at depth 32 where libublk's loop example spends 3 µs
//! (BENCHMARKS.md, runs 12 and "what a lean loop would give"). Here an
//! operation is a slab entry and a waker, and nothing is allocated per
//! operation unless its future is dropped before its completion.
//!
//! Only the ring's own thread touches it: [`Ring::block_on`] makes it the
//! thread's current ring, and every operation, timer and task of the
//! thread uses that one. Tasks may be woken from any thread (a channel
//! from another thread, say); such a wake writes an eventfd that a read on
//! the ring is waiting for, when the thread is asleep in the ring.

#![warn(missing_docs)]

mod fixed;
pub mod io;
mod op;
mod timer;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

use fixed::FixedTable;
pub use fixed::{register_file, FixedFile, FIXED_FILES_MAX};
pub use op::{submit, submit_to, Completions, Op};
use op::{Completed, Deferred, Slot};
use timer::Timers;
pub use timer::{sleep, sleep_until, timeout, Elapsed, Sleep};

/// Submission queue entries of a ring (completions: twice that).
pub const RING_ENTRIES: u32 = 1024;
/// Tasks run back to back before the ring is looked at without waiting:
/// tasks that keep waking each other cannot hold completions back longer.
const RUNS_BEFORE_RING_MAX: usize = 256;
/// How long the end of [`Ring::block_on`] waits for operations still in
/// the kernel after cancelling them; what remains then is leaked rather
/// than freed under the kernel.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// `user_data` of the read of the wake-up eventfd.
const WAKE_USER_DATA: u64 = u64::MAX;
/// `user_data` of cancellations, whose completions say nothing.
const CANCEL_USER_DATA: u64 = u64::MAX - 1;
/// `IORING_ENTER_GETEVENTS`: also wait for (and, with DEFER_TASKRUN, run
/// the task work of) completions.
const ENTER_GETEVENTS: u32 = 1;
/// `IORING_ENTER_EXT_ARG`: the argument is an `io_uring_getevents_arg`.
const ENTER_EXT_ARG: u32 = 1 << 3;

thread_local! {
    static CURRENT: RefCell<Option<Rc<Ring>>> = const { RefCell::new(None) };
}

/// One thread's ring, its operations, timers and tasks.
pub struct Ring {
    /// Tells this ring from others the thread had before: a slot or timer
    /// key means something only in the ring that issued it.
    id: u64,
    uring: RefCell<IoUring>,
    slots: RefCell<Slab<Slot>>,
    timers: RefCell<Timers>,
    ready: Arc<Ready>,
    /// Tasks woken on the ring's own thread, to run.
    local: RefCell<VecDeque<async_task::Runnable>>,
    /// Where the eventfd's counter is read to (the kernel writes it).
    wake_buffer: RefCell<Box<u64>>,
    /// The eventfd's read is in the ring.
    wake_armed: std::cell::Cell<bool>,
    /// Callbacks and completions of the turn ([`submit`], [`submit_to`]),
    /// run once the
    /// completions are all handed out; kept to reuse its memory.
    callbacks: RefCell<Vec<(Deferred, i32)>>,
    /// The time of this turn, read at the first [`now`] after the ring
    /// last waited; `None` until then.
    turn_time: std::cell::Cell<Option<TurnTime>>,
    /// When the ring was made: what [`now_ms`] counts from.
    started: Instant,
    /// The table of registered files, if the kernel has one.
    fixed: RefCell<Option<FixedTable>>,
}

/// The run queue for wakes from other threads, shared with the wakers of
/// the thread's tasks. (Wakes on the ring's own thread go to the ring's
/// local queue, which takes no lock.)
struct Ready {
    queue: Mutex<VecDeque<async_task::Runnable>>,
    /// Tasks in `queue`: read without the lock, to skip it when empty.
    queued: std::sync::atomic::AtomicUsize,
    /// The ring's thread waits (or is about to) in the ring.
    asleep: AtomicBool,
    /// The eventfd was written and not yet read back.
    notified: AtomicBool,
    eventfd: OwnedFd,
}

impl Ready {
    fn push(&self, runnable: async_task::Runnable) {
        self.queue.lock().expect("run queue").push_back(runnable);
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.kick();
    }

    fn pop(&self) -> Option<async_task::Runnable> {
        if self.queued.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let runnable = self.queue.lock().expect("run queue").pop_front();
        if runnable.is_some() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        runnable
    }

    fn is_empty(&self) -> bool {
        self.queued.load(Ordering::SeqCst) == 0
    }

    /// Ends the ring thread's wait, if it waits.
    fn kick(&self) {
        if self.asleep.load(Ordering::SeqCst) && !self.notified.swap(true, Ordering::SeqCst) {
            let one = 1_u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live array to an eventfd this
            // struct owns.
            let written = unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), 8) };
            debug_assert_eq!(written, 8, "an eventfd takes 8 bytes");
        }
    }
}

/// The waker of the future [`Ring::block_on`] runs: it is polled again
/// only when woken.
struct MainWake {
    woken: AtomicBool,
    ready: Arc<Ready>,
}

impl Wake for MainWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.ready.kick();
    }
}

/// A task spawned on the ring's thread; dropping it cancels the task,
/// [`Task::detach`] lets it run on.
pub type Task<T> = async_task::Task<T>;

impl Ring {
    /// A ring for the calling thread, set up with DEFER_TASKRUN and
    /// SINGLE_ISSUER where the kernel has them (6.1), COOP_TASKRUN (5.19),
    /// or neither.
    pub fn new() -> std::io::Result<Rc<Ring>> {
        let uring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(RING_ENTRIES)
            .or_else(|_| IoUring::builder().setup_coop_taskrun().build(RING_ENTRIES))
            .or_else(|_| IoUring::builder().build(RING_ENTRIES))?;
        let fixed = FixedTable::register(&uring);
        // SAFETY: plain system call; the result is checked before use.
        let eventfd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if eventfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let ring = Rc::new(Ring {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            uring: RefCell::new(uring),
            slots: RefCell::new(Slab::with_capacity(RING_ENTRIES as usize)),
            timers: RefCell::new(Timers::default()),
            local: RefCell::new(VecDeque::new()),
            ready: Arc::new(Ready {
                queue: Mutex::new(VecDeque::new()),
                queued: std::sync::atomic::AtomicUsize::new(0),
                asleep: AtomicBool::new(false),
                notified: AtomicBool::new(false),
                // SAFETY: a descriptor just opened and owned by nothing else.
                eventfd: unsafe { OwnedFd::from_raw_fd(eventfd) },
            }),
            wake_buffer: RefCell::new(Box::new(0)),
            wake_armed: std::cell::Cell::new(false),
            callbacks: RefCell::new(Vec::new()),
            turn_time: std::cell::Cell::new(None),
            started: Instant::now(),
            fixed: RefCell::new(fixed),
        });
        Ok(ring)
    }

    /// Runs `f` on the calling thread's current ring.
    ///
    /// Panics outside [`Ring::block_on`].
    pub(crate) fn with<R>(f: impl FnOnce(&Ring) -> R) -> R {
        Ring::try_with(f).expect("no ring: not inside Ring::block_on")
    }

    fn try_with<R>(f: impl FnOnce(&Ring) -> R) -> Option<R> {
        CURRENT.with(|current| current.borrow().as_deref().map(f))
    }

    /// As [`Ring::try_with`], but only if the current ring is ring `id`.
    fn try_with_id<R>(id: u64, f: impl FnOnce(&Ring) -> R) -> Option<R> {
        CURRENT.with(|current| {
            current
                .borrow()
                .as_deref()
                .filter(|ring| ring.id == id)
                .map(f)
        })
    }

    /// Runs `future` to its end on this ring, with the tasks it spawns,
    /// and returns its output. Operations still in the kernel then are
    /// cancelled and waited for (at most `DRAIN_TIMEOUT`); tasks not
    /// finished stay suspended.
    pub fn block_on<F: Future>(self: &Rc<Self>, future: F) -> F::Output {
        let previous = CURRENT.with(|current| current.replace(Some(self.clone())));
        assert!(previous.is_none(), "Ring::block_on inside another");
        self.arm_wake_read();
        let main = Arc::new(MainWake {
            woken: AtomicBool::new(true),
            ready: self.ready.clone(),
        });
        let waker = Waker::from(main.clone());
        let mut context = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        let output = loop {
            if main.woken.swap(false, Ordering::SeqCst) {
                if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
                    break output;
                }
            }
            for _ in 0..RUNS_BEFORE_RING_MAX {
                let local = self.local.borrow_mut().pop_front();
                let Some(runnable) = local.or_else(|| self.ready.pop()) else {
                    break;
                };
                runnable.run();
            }
            self.turn(&main);
        };
        self.drain();
        CURRENT.with(|current| current.replace(None));
        output
    }

    /// Submits what was queued, waits in the ring unless something is
    /// ready already (or a timer is due), and hands out the completions.
    fn turn(&self, main: &MainWake) {
        let ready_now = || {
            main.woken.load(Ordering::SeqCst)
                || !self.local.borrow().is_empty()
                || !self.ready.is_empty()
        };
        let mut wait = !ready_now();
        let mut timeout = None;
        if wait {
            self.ready.asleep.store(true, Ordering::SeqCst);
            // A wake from another thread after this check sees `asleep`
            // and writes the eventfd, which ends the wait below.
            if ready_now() {
                wait = false;
            } else if let Some(deadline) = self.timers.borrow().next_deadline() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    wait = false;
                } else {
                    timeout = Some(left);
                }
            }
        }
        self.enter(wait, timeout);
        self.turn_time.set(None);
        self.ready.asleep.store(false, Ordering::SeqCst);
        if self.dispatch() {
            self.ready.notified.store(false, Ordering::SeqCst);
            self.arm_wake_read();
        }
        self.call_back();
        if self.timers.borrow().next_deadline().is_some() {
            self.timers.borrow_mut().fire(self.now());
        }
    }

    /// Calls the callbacks of the completions just handed out, with no
    /// borrow of the ring held: they may submit and spawn.
    fn call_back(&self) {
        let mut callbacks = std::mem::take(&mut *self.callbacks.borrow_mut());
        for (deferred, result) in callbacks.drain(..) {
            deferred.run(result);
        }
        // The emptied vector's memory is kept for the next turn: nothing
        // queued more meanwhile, as only a dispatch queues callbacks.
        let mut queued = self.callbacks.borrow_mut();
        debug_assert!(queued.is_empty(), "callbacks queued outside dispatch");
        *queued = callbacks;
    }

    /// The time of this turn: read at the first call after the ring last
    /// waited, then the same until it waits again.
    fn now(&self) -> Instant {
        self.turn_time().instant
    }

    fn turn_time(&self) -> TurnTime {
        match self.turn_time.get() {
            Some(time) => time,
            None => {
                let instant = Instant::now();
                let time = TurnTime {
                    instant,
                    since_started_ms: instant.saturating_duration_since(self.started).as_millis()
                        as u64,
                };
                self.turn_time.set(Some(time));
                time
            }
        }
    }

    /// One `io_uring_enter`: submits the queue and, with `wait`, waits for
    /// a completion (at most `timeout`). Always asks for completions, so
    /// that DEFER_TASKRUN's task work runs.
    fn enter(&self, wait: bool, timeout: Option<Duration>) {
        let mut uring = self.uring.borrow_mut();
        let to_submit = {
            let mut queue = uring.submission();
            queue.sync();
            queue.len() as u32
        };
        let min_complete = u32::from(wait);
        let result = match timeout.filter(|_| wait) {
            Some(timeout) => {
                let timespec = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&timespec);
                // SAFETY: `args` and what it points at live through the
                // call; the queue holds `to_submit` valid entries.
                unsafe {
                    uring.submitter().enter(
                        to_submit,
                        min_complete,
                        ENTER_GETEVENTS | ENTER_EXT_ARG,
                        Some(&args),
                    )
                }
            }
            // SAFETY: no argument; the queue holds `to_submit` valid entries.
            None => unsafe {
                uring.submitter().enter::<libc::sigset_t>(
                    to_submit,
                    min_complete,
                    ENTER_GETEVENTS,
                    None,
                )
            },
        };
        if let Err(error) = result {
            match error.raw_os_error() {
                // Timed out, interrupted, or completions to reap first.
                Some(libc::ETIME | libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
                _ => panic!("io_uring_enter failed: {error}"),
            }
        }
    }

    /// Hands every completion to its slot; true if the eventfd's read was
    /// among them (it is then no longer in the ring).
    fn dispatch(&self) -> bool {
        // What freed slots held (an abandoned operation's resources) is
        // dropped after the borrows below end: a file's drop unregisters
        // it from the ring (see `fixed`).
        let mut freed = Vec::new();
        let mut uring = self.uring.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        let mut callbacks = self.callbacks.borrow_mut();
        let mut wake_read_done = false;
        for entry in uring.completion() {
            match entry.user_data() {
                WAKE_USER_DATA => {
                    self.wake_armed.set(false);
                    wake_read_done = true;
                }
                CANCEL_USER_DATA => {}
                key => match complete(&mut slots, key, entry.result()) {
                    Some(Completed::Run(deferred)) => callbacks.push((deferred, entry.result())),
                    Some(Completed::Free(slot)) => freed.push(slot),
                    Some(Completed::Kept) | None => {}
                },
            }
        }
        wake_read_done
    }

    /// Queues the read that completes when another thread writes the
    /// eventfd.
    fn arm_wake_read(&self) {
        if self.wake_armed.replace(true) {
            return;
        }
        let buffer: *mut u64 = &mut **self.wake_buffer.borrow_mut();
        let entry = opcode::Read::new(types::Fd(self.ready.eventfd.as_raw_fd()), buffer.cast(), 8)
            .build()
            .user_data(WAKE_USER_DATA);
        // SAFETY: the buffer is the ring's own box, freed only after the
        // read completed or was leaked by `drain`.
        unsafe { self.push_entry(entry) };
    }

    /// Queues `entry` for the next `io_uring_enter`, submitting first if
    /// the queue is full.
    ///
    /// # Safety
    ///
    /// Whatever `entry` points at stays valid until its completion.
    unsafe fn push_entry(&self, entry: squeue::Entry) {
        let mut uring = self.uring.borrow_mut();
        loop {
            let mut queue = uring.submission();
            // SAFETY: the caller's promise.
            if unsafe { queue.push(&entry) }.is_ok() {
                queue.sync();
                return;
            }
            drop(queue);
            if let Err(error) = uring.submit() {
                panic!("io_uring_enter (queue full) failed: {error}");
            }
        }
    }

    /// Files a new operation awaited by the future of `waker` and queues
    /// its entry.
    fn push(&self, entry: squeue::Entry, waker: Waker) -> usize {
        // SAFETY: `Op::new`'s contract: the entry's memory lives in the
        // operation's resources, which its slot keeps until completion.
        unsafe { self.push_slot(entry, Slot::Waiting(Some(waker))) }
    }

    /// Files `slot` for a new operation and queues its entry.
    ///
    /// # Safety
    ///
    /// Whatever `entry` points at stays valid until its completion.
    unsafe fn push_slot(&self, entry: squeue::Entry, slot: Slot) -> usize {
        let key = self.slots.borrow_mut().insert(slot);
        assert!(
            (key as u64) < CANCEL_USER_DATA,
            "operation keys stay below the reserved ones"
        );
        // SAFETY: the caller's promise.
        unsafe { self.push_entry(entry.user_data(key as u64)) };
        key
    }

    /// Cancels every operation still in the kernel and waits for them all
    /// (at most `DRAIN_TIMEOUT`); what remains after that is leaked, as
    /// the kernel may still write into it.
    fn drain(&self) {
        let keys: Vec<u64> = self
            .slots
            .borrow()
            .iter()
            .filter(|(_, slot)| slot.in_kernel())
            .map(|(key, _)| key as u64)
            .collect();
        let wake_armed = self.wake_armed.get().then_some(WAKE_USER_DATA);
        for key in keys.iter().copied().chain(wake_armed) {
            let cancel = opcode::AsyncCancel::new(key)
                .build()
                .user_data(CANCEL_USER_DATA);
            // SAFETY: a cancellation points at nothing.
            unsafe { self.push_entry(cancel) };
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let in_kernel = self.slots.borrow().iter().any(|(_, slot)| slot.in_kernel());
            if !in_kernel && !self.wake_armed.get() {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    "operations still in the kernel after the ring's end: their memory is leaked"
                );
                std::mem::forget(std::mem::take(&mut *self.slots.borrow_mut()));
                std::mem::forget(std::mem::replace(
                    &mut *self.wake_buffer.borrow_mut(),
                    Box::new(0),
                ));
                return;
            }
            self.enter(true, Some(deadline - now));
            self.dispatch();
            // The ring has ended: callbacks are not called, only dropped
            // with what they own, now that the kernel is done with it.
            drop(std::mem::take(&mut *self.callbacks.borrow_mut()));
        }
    }
}

/// Hands a completion to operation `key`'s slot; returns what is left to
/// do, the slot removed unless it keeps the result for its future. A key
/// without a slot belonged to an operation a drain gave up on (and
/// leaked): ignored.
fn complete(slots: &mut Slab<Slot>, key: u64, result: i32) -> Option<Completed> {
    let key = key as usize;
    let completed = slots.get_mut(key)?.complete(result);
    if !matches!(completed, Completed::Kept) {
        slots.remove(key);
    }
    Some(completed)
}

/// The time as of the ring's current turn: read from the clock at the
/// first call after the ring last waited, and the same for every call
/// until it waits again. For code that reads the time at every event (a
/// state machine's deadlines in milliseconds) and would otherwise read
/// the clock several times per request.
///
/// Panics outside [`Ring::block_on`].
pub fn now() -> Instant {
    Ring::with(Ring::now)
}

/// [`now`] in milliseconds since [`started`], converted once per turn:
/// for a state machine whose clock is in milliseconds and which reads it
/// at every event.
///
/// Panics outside [`Ring::block_on`].
pub fn now_ms() -> u64 {
    Ring::with(|ring| ring.turn_time().since_started_ms)
}

/// When the calling thread's ring was made: what [`now_ms`] counts from.
///
/// Panics outside [`Ring::block_on`].
pub fn started() -> Instant {
    Ring::with(|ring| ring.started)
}

/// A turn's time, as read once.
#[derive(Clone, Copy)]
struct TurnTime {
    instant: Instant,
    since_started_ms: u64,
}

/// Spawns `future` as a task of the calling thread's ring.
pub fn spawn<F: Future + 'static>(future: F) -> Task<F::Output>
where
    F::Output: 'static,
{
    let (ring_id, ready) = Ring::with(|ring| (ring.id, ring.ready.clone()));
    let schedule = move |runnable: async_task::Runnable| {
        // On the ring's own thread, while it runs: its local queue, which
        // takes no lock. Anywhere else: the shared queue and a kick.
        let mut runnable = Some(runnable);
        let _ = CURRENT.try_with(|current| {
            if let Ok(current) = current.try_borrow() {
                if let Some(ring) = current.as_deref().filter(|ring| ring.id == ring_id) {
                    ring.local
                        .borrow_mut()
                        .push_back(runnable.take().expect("scheduled once"));
                }
            }
        });
        if let Some(runnable) = runnable {
            ready.push(runnable);
        }
    };
    let (runnable, task) = async_task::spawn_local(future, schedule);
    runnable.schedule();
    task
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn nop() -> Op<()> {
        // SAFETY: a no-op points at nothing.
        unsafe { Op::new(opcode::Nop::new().build(), ()) }
    }

    #[test]
    fn an_operation_completes_with_the_kernels_result() {
        let ring = Ring::new().unwrap();
        let (result, ()) = ring.block_on(nop());
        assert_eq!(result, 0);
        assert!(
            ring.slots.borrow().is_empty(),
            "the slot is freed once taken"
        );
    }

    #[test]
    fn a_file_written_through_the_ring_reads_back_identical() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create_new(dir.path().join("data")).unwrap();
        let fd = file.as_raw_fd();
        let ring = Ring::new().unwrap();
        let data: Vec<u8> = (0..8192_u32).map(|i| (i * 7 % 251) as u8).collect();
        let read_back = ring.block_on(async move {
            let entry = opcode::Write::new(types::Fd(fd), data.as_ptr(), data.len() as u32)
                .offset(4096)
                .build();
            // SAFETY: the entry points into `data`'s heap buffer, which the
            // operation owns.
            let (written, data) = unsafe { Op::new(entry, data) }.await;
            assert_eq!(written, 8192);
            let mut buffer = vec![0_u8; 8192];
            let entry = opcode::Read::new(types::Fd(fd), buffer.as_mut_ptr(), 8192)
                .offset(4096)
                .build();
            // SAFETY: as above, into `buffer`.
            let (read, buffer) = unsafe { Op::new(entry, buffer) }.await;
            assert_eq!(read, 8192);
            (data, buffer)
        });
        assert_eq!(read_back.0, read_back.1);
        drop(file);
    }

    #[test]
    fn timers_fire_in_deadline_order_and_not_before() {
        let ring = Ring::new().unwrap();
        let started = Instant::now();
        let order = ring.block_on(async {
            let order = Rc::new(RefCell::new(Vec::new()));
            let late = {
                let order = order.clone();
                spawn(async move {
                    sleep(Duration::from_millis(40)).await;
                    order.borrow_mut().push(40);
                })
            };
            let early = {
                let order = order.clone();
                spawn(async move {
                    sleep(Duration::from_millis(10)).await;
                    order.borrow_mut().push(10);
                })
            };
            late.await;
            early.await;
            Rc::try_unwrap(order).unwrap().into_inner()
        });
        assert_eq!(order, [10, 40]);
        assert!(started.elapsed() >= Duration::from_millis(40));
    }

    #[test]
    fn a_timeout_ends_a_future_that_never_completes() {
        let ring = Ring::new().unwrap();
        let result = ring.block_on(timeout(
            Duration::from_millis(20),
            std::future::pending::<()>(),
        ));
        assert_eq!(result, Err(Elapsed));
        assert!(
            ring.timers.borrow().next_deadline().is_none(),
            "no timer left behind"
        );
    }

    #[test]
    fn a_wake_from_another_thread_ends_the_rings_wait() {
        let ring = Ring::new().unwrap();
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<u32>(1);
        let sending = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            sender.blocking_send(7).unwrap();
        });
        let started = Instant::now();
        // The timeout only bounds the test: the wake must come first.
        let received = ring.block_on(timeout(Duration::from_secs(10), receiver.recv()));
        sending.join().unwrap();
        assert_eq!(received, Ok(Some(7)));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn an_operation_outliving_its_ring_leaves_another_ring_alone() {
        let (reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = reader.as_raw_fd();
        let first = Ring::new().unwrap();
        let kept = RefCell::new(None);
        first.block_on(async {
            let mut buffer = vec![0_u8; 64];
            let entry = opcode::Recv::new(types::Fd(fd), buffer.as_mut_ptr(), 64).build();
            // SAFETY: the entry points into `buffer`, which the operation owns.
            let mut receive = unsafe { Op::new(entry, buffer) };
            // Submitted, then kept past the end of `block_on`.
            let waker = Waker::noop();
            assert!(std::pin::Pin::new(&mut receive)
                .poll(&mut Context::from_waker(waker))
                .is_pending());
            *kept.borrow_mut() = Some(receive);
        });
        let second = Ring::new().unwrap();
        second.block_on(async {
            let (result, ()) = nop().await;
            assert_eq!(result, 0);
            // Slot keys of the first ring mean nothing here.
            drop(kept.borrow_mut().take());
            assert!(Ring::with(|ring| ring.slots.borrow().is_empty()));
        });
        drop(writer);
    }

    #[test]
    fn a_task_woken_from_another_thread_runs() {
        let ring = Ring::new().unwrap();
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<u32>(1);
        let received = ring.block_on(async move {
            // The task, not the future `block_on` runs, waits for the
            // other thread: its wake goes through the shared queue.
            let task = spawn(async move { receiver.recv().await });
            let sending = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                sender.blocking_send(9).unwrap();
            });
            let received = timeout(Duration::from_secs(10), task).await;
            sending.join().unwrap();
            received
        });
        assert_eq!(received, Ok(Some(9)));
    }

    #[test]
    fn an_abandoned_operation_keeps_its_buffer_until_cancelled_at_the_end() {
        let (reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = reader.as_raw_fd();
        let ring = Ring::new().unwrap();
        let outcome = ring.block_on(async {
            let mut buffer = vec![0_u8; 64];
            let entry = opcode::Recv::new(types::Fd(fd), buffer.as_mut_ptr(), 64).build();
            // SAFETY: the entry points into `buffer`, which the operation owns.
            let receive = unsafe { Op::new(entry, buffer) };
            timeout(Duration::from_millis(20), receive).await
        });
        assert!(outcome.is_err(), "nothing was sent");
        // `block_on` cancelled the receive and waited for it.
        assert!(ring.slots.borrow().is_empty());
        // The ring is usable again.
        let (result, ()) = ring.block_on(nop());
        assert_eq!(result, 0);
        drop(writer);
    }

    /// Records what it is told.
    #[derive(Default)]
    struct Told(RefCell<Vec<(u64, i32)>>);

    impl Completions for Told {
        fn completed(self: Rc<Self>, token: u64, result: i32) {
            self.0.borrow_mut().push((token, result));
        }
    }

    #[test]
    fn completions_are_told_each_result_under_its_token_from_the_loop_once() {
        let ring = Ring::new().unwrap();
        let told = Rc::new(Told::default());
        let completions: Rc<dyn Completions> = told.clone();
        let (during, after) = ring.block_on(async {
            for token in [7, 3, 9] {
                // SAFETY: a no-op points at nothing.
                unsafe { submit_to(opcode::Nop::new().build(), completions.clone(), token) };
            }
            let during = told.0.borrow().len();
            // Two turns: the no-ops complete, then the sleep's timer fires.
            sleep(Duration::from_millis(1)).await;
            (during, told.0.borrow().clone())
        });
        assert_eq!(during, 0, "never told from inside a submission");
        let mut after = after;
        after.sort_unstable();
        assert_eq!(after, vec![(3, 0), (7, 0), (9, 0)]);
        assert!(ring.slots.borrow().is_empty());
        drop(completions);
        assert_eq!(Rc::strong_count(&told), 1, "the slots let go of it");
    }

    #[test]
    fn a_callback_left_at_the_rings_end_is_dropped_uncalled_after_the_kernel_is_done() {
        // A read of a pipe nobody writes to stays in the kernel until the
        // drain cancels it.
        let mut fds = [0; 2];
        // SAFETY: plain system call into a live array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: descriptors just opened, owned by nothing else.
        let (reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let called = Rc::new(std::cell::Cell::new(false));
        let buffer = Rc::new(vec![0_u8; 64]);
        let ring = Ring::new().unwrap();
        let (flag, kept) = (called.clone(), buffer.clone());
        ring.block_on(async move {
            let entry =
                opcode::Read::new(types::Fd(reader.as_raw_fd()), kept.as_ptr().cast_mut(), 64)
                    .build();
            // SAFETY: the entry points into the heap bytes of `kept`, which
            // the operation owns (nothing writes them through the `Rc`).
            unsafe { submit(entry, (reader, kept), move |_, _| flag.set(true)) };
        });
        assert!(
            !called.get(),
            "a callback is not called after its ring ended"
        );
        assert_eq!(
            Rc::strong_count(&buffer),
            1,
            "the drain dropped what the operation owned"
        );
        assert!(ring.slots.borrow().is_empty());
        drop(writer);
    }

    #[test]
    fn the_turns_time_holds_until_the_ring_waits_again() {
        let ring = Ring::new().unwrap();
        let (first, second, after_wait) = ring.block_on(async {
            let first = (now(), now_ms());
            std::thread::sleep(Duration::from_millis(5));
            let second = (now(), now_ms());
            sleep(Duration::from_millis(5)).await;
            (first, second, (now(), now_ms()))
        });
        assert_eq!(first, second, "one reading per turn");
        assert!(after_wait.0 >= first.0 + Duration::from_millis(5));
        for (instant, ms) in [first, after_wait] {
            let since_started = instant.duration_since(ring.started).as_millis() as u64;
            assert_eq!(ms, since_started, "the turn's time in ms");
        }
    }

    #[test]
    fn a_sleep_is_over_only_when_the_turns_time_says_so() {
        let ring = Ring::new().unwrap();
        let (deadline, woke) = ring.block_on(async {
            let deadline = now() + Duration::from_millis(2);
            // The deadline passes while the turn's time stands still.
            std::thread::sleep(Duration::from_millis(5));
            sleep_until(deadline).await;
            (deadline, now())
        });
        assert!(
            woke >= deadline,
            "a task that slept until a deadline sees it reached"
        );
    }
}
