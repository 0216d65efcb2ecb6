//! Timers of the ring's thread: deadlines in an ordered map, the earliest
//! of which bounds the ring's wait.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::Ring;

/// The pending timers, by deadline (ties broken by insertion order).
#[derive(Default)]
pub(super) struct Timers {
    pending: BTreeMap<(Instant, u64), Waker>,
    next_id: u64,
}

impl Timers {
    fn insert(&mut self, deadline: Instant, waker: Waker) -> (Instant, u64) {
        let key = (deadline, self.next_id);
        self.next_id += 1;
        self.pending.insert(key, waker);
        key
    }

    /// The earliest deadline, if any.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .first_key_value()
            .map(|(&(deadline, _), _)| deadline)
    }

    /// Wakes every timer due at `now`.
    pub(super) fn fire(&mut self, now: Instant) {
        while let Some(entry) = self.pending.first_entry() {
            if entry.key().0 > now {
                return;
            }
            entry.remove().wake();
        }
    }
}

/// Waits until `deadline`.
pub struct Sleep {
    deadline: Instant,
    /// The ring it waits on and its key there.
    key: Option<(u64, (Instant, u64))>,
}

/// Waits until `deadline` on the ring's thread.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        key: None,
    }
}

/// Waits for `duration` on the ring's thread.
pub fn sleep(duration: Duration) -> Sleep {
    sleep_until(Instant::now() + duration)
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Ring::with(|ring| {
            let mut timers = ring.timers.borrow_mut();
            match self.key {
                None => {
                    // The turn's time, not a fresh reading: a sleep is over
                    // only once `now()` says so, or a task that sleeps
                    // until a deadline and then checks `now()` against it
                    // would find it not yet due, sleep again, and spin
                    // inside one poll without the turn's time ever moving.
                    if ring.now() >= self.deadline {
                        return Poll::Ready(());
                    }
                    self.key = Some((ring.id, timers.insert(self.deadline, cx.waker().clone())));
                    Poll::Pending
                }
                Some((ring_id, key)) => {
                    match timers.pending.get_mut(&key).filter(|_| ring_id == ring.id) {
                        // Fired: the map no longer holds it.
                        None => {
                            self.key = None;
                            Poll::Ready(())
                        }
                        Some(waker) => {
                            if !waker.will_wake(cx.waker()) {
                                *waker = cx.waker().clone();
                            }
                            Poll::Pending
                        }
                    }
                }
            }
        })
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some((ring_id, key)) = self.key {
            let _ = Ring::try_with_id(ring_id, |ring| {
                ring.timers.borrow_mut().pending.remove(&key)
            });
        }
    }
}

/// `future`'s output, or `Err(Elapsed)` if `duration` passes first.
pub async fn timeout<F: Future>(duration: Duration, future: F) -> Result<F::Output, Elapsed> {
    let sleep = sleep(duration);
    tokio::select! {
        biased;
        output = future => Ok(output),
        () = sleep => Err(Elapsed),
    }
}

/// A [`timeout`] that ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;
