//! Operations on the ring: one slot per submission, found again by the
//! completion's `user_data`, and the future that waits for it.
//!
//! What an operation's entry points at (a buffer, an iovec array, a socket
//! address) is owned by the operation ([`Op::resources`]) and stays alive
//! until the kernel completes it, also when the future waiting for it is
//! dropped first: the slot then keeps it until the completion arrives.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::squeue;

use super::Ring;

/// What [`submit`] calls with the kernel's result.
pub(super) type Callback = Box<dyn FnOnce(i32)>;

/// Told of the completions of the operations submitted with
/// [`submit_to`], each by the token it was submitted with. For a caller
/// with many operations of one kind in flight (a ublk queue's commands):
/// where [`submit`] allocates a closure per operation, this costs a
/// reference count.
pub trait Completions {
    /// Operation `token` completed with `result` (bytes done, or -errno).
    /// Called from the ring's loop once the turn's completions are handed
    /// out, never from inside a submission; with the reference the
    /// operation's slot held, for the next submission to take.
    fn completed(self: Rc<Self>, token: u64, result: i32);
}

/// What is called once a turn's completions are handed out.
pub(super) enum Deferred {
    Call(Callback),
    Tell(Rc<dyn Completions>, u64),
}

impl Deferred {
    pub(super) fn run(self, result: i32) {
        match self {
            Deferred::Call(callback) => callback(result),
            Deferred::Tell(completions, token) => completions.completed(token, result),
        }
    }
}

/// Where an operation stands.
pub(super) enum Slot {
    /// Submitted; the waker of the future waiting for it, once polled.
    Waiting(Option<Waker>),
    /// Completed with this result (bytes, or -errno), not yet taken.
    Done(i32),
    /// Its future was dropped before the completion: what the entry points
    /// at is kept here until the kernel is done with it.
    Abandoned(#[allow(dead_code)] Option<Box<dyn Any>>),
    /// Submitted by [`submit`] or [`submit_to`]: run with the result once
    /// the ring has handed out the turn's completions. A callback owns what
    /// the entry points at.
    Deferred(Deferred),
}

impl Slot {
    /// Records the completion: a waiting future is woken and the slot
    /// keeps the result for it. Otherwise the slot can go, and what it
    /// held is returned: an abandoned operation's resources (dropped with
    /// it) or a callback to call.
    pub(super) fn complete(&mut self, result: i32) -> Completed {
        match std::mem::replace(self, Slot::Done(result)) {
            Slot::Waiting(waker) => {
                if let Some(waker) = waker {
                    waker.wake();
                }
                Completed::Kept
            }
            abandoned @ Slot::Abandoned(_) => Completed::Free(abandoned),
            Slot::Deferred(deferred) => Completed::Run(deferred),
            Slot::Done(_) => unreachable!("an operation completed twice"),
        }
    }

    /// Whether the kernel may still use what the slot's entry points at.
    pub(super) fn in_kernel(&self) -> bool {
        !matches!(self, Slot::Done(_))
    }
}

/// What [`Slot::complete`] leaves to do.
pub(super) enum Completed {
    /// The slot holds the result for its future.
    Kept,
    /// The slot can go; what it held is to be dropped.
    Free(Slot),
    /// The slot can go; its callback or completions are to be run with
    /// the result.
    Run(Deferred),
}

/// Submits `entry` and calls `then` with the kernel's result and
/// `resources` once it completes, from the ring's loop, after the turn's
/// completions are handed out. Lighter than an [`Op`] awaited in a
/// spawned task: no task, no waker, no poll. If the ring's
/// [`Ring::block_on`] ends before the completion, `then` is never called
/// (the drain waits for the kernel, then drops it with `resources`).
///
/// Panics outside [`Ring::block_on`].
///
/// # Safety
///
/// As [`Op::new`]: every pointer in `entry` points into heap memory
/// `resources` own, or into memory that stays valid until the completion.
pub unsafe fn submit<T: 'static>(
    entry: squeue::Entry,
    resources: T,
    then: impl FnOnce(i32, T) + 'static,
) {
    let callback: Callback = Box::new(move |result| then(result, resources));
    Ring::with(|ring| {
        // SAFETY: the caller's promise; the slot owns the resources (in the
        // callback) until the completion.
        unsafe { ring.push_slot(entry, Slot::Deferred(Deferred::Call(callback))) };
    });
}

/// Submits `entry` and tells `completions` its result under `token` once
/// it completes, as [`submit`] calls its callback. The slot holds
/// `completions` (a reference) until then; if the ring's
/// [`Ring::block_on`] ends first, it is dropped untold.
///
/// Panics outside [`Ring::block_on`].
///
/// # Safety
///
/// Every pointer in `entry` points into memory that stays valid until the
/// completion (`completions` may own it: it lives that long).
pub unsafe fn submit_to(entry: squeue::Entry, completions: Rc<dyn Completions>, token: u64) {
    let deferred = Deferred::Tell(completions, token);
    Ring::with(|ring| {
        // SAFETY: the caller's promise.
        unsafe { ring.push_slot(entry, Slot::Deferred(deferred)) };
    });
}

/// An operation: submitted on first poll, ready with the kernel's result
/// and the resources back.
pub struct Op<T: 'static> {
    entry: Option<squeue::Entry>,
    /// The ring it was submitted to and its slot there.
    key: Option<(u64, usize)>,
    resources: Option<T>,
}

impl<T: 'static> Op<T> {
    /// An operation for `entry`, which may point only into `resources`
    /// (into memory they own on the heap, which does not move with them)
    /// or into memory that stays valid until the completion anyway.
    ///
    /// # Safety
    ///
    /// `entry` must be valid for the kernel for as long as `resources`
    /// live: every pointer in it points into heap memory `resources` own,
    /// or into memory the caller keeps valid until the operation completes
    /// even if this `Op` is dropped first.
    pub unsafe fn new(entry: squeue::Entry, resources: T) -> Op<T> {
        Op {
            entry: Some(entry),
            key: None,
            resources: Some(resources),
        }
    }
}

impl<T: 'static> Unpin for Op<T> {}

impl<T: 'static> Future for Op<T> {
    /// The kernel's result (bytes done, or -errno) and the resources.
    type Output = (i32, T);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, T)> {
        Ring::with(|ring| {
            if let Some(entry) = self.entry.take() {
                self.key = Some((ring.id, ring.push(entry, cx.waker().clone())));
                return Poll::Pending;
            }
            let (ring_id, key) = self.key.expect("an operation is submitted once polled");
            assert_eq!(
                ring_id, ring.id,
                "an operation polled on another ring than its own"
            );
            let mut slots = ring.slots.borrow_mut();
            match &mut slots[key] {
                Slot::Done(result) => {
                    let result = *result;
                    slots.remove(key);
                    self.key = None;
                    let resources = self.resources.take().expect("resources until done");
                    Poll::Ready((result, resources))
                }
                Slot::Waiting(waker) => {
                    if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *waker = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
                Slot::Abandoned(_) | Slot::Deferred(_) => {
                    unreachable!("a live operation's slot is its own")
                }
            }
        })
    }
}

impl<T: 'static> Drop for Op<T> {
    fn drop(&mut self) {
        let Some((ring_id, key)) = self.key else {
            return;
        };
        let mut resources = self.resources.take();
        let ring_running = Ring::try_with_id(ring_id, |ring| {
            let mut slots = ring.slots.borrow_mut();
            match &slots[key] {
                // Completed: the resources are free to go.
                Slot::Done(_) => {
                    slots.remove(key);
                }
                Slot::Waiting(_) => {
                    let kept = resources.take().map(|r| Box::new(r) as Box<dyn Any>);
                    slots[key] = Slot::Abandoned(kept);
                }
                Slot::Abandoned(_) | Slot::Deferred(_) => {
                    unreachable!("an operation is abandoned once")
                }
            }
        })
        .is_some();
        if !ring_running {
            // Its ring is not running (its `block_on` ended, or the thread
            // is ending): the kernel may in the worst case still use the
            // memory (a drain that timed out), so it is leaked, never freed.
            std::mem::forget(resources);
        }
    }
}
