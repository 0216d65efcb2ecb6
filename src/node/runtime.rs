//! The secondary's runtime: compio on one thread with one io_uring, waited
//! on in `io_uring_enter` itself (tokio-uring's runtime waits in tokio's
//! `epoll_wait` beside its ring instead, which costs a wake-up more, and an
//! `EINTR`, whenever the kernel completes something as task work). The
//! primary's engine runs on `replblk-ring` instead (ARCHITECTURE.md says
//! why).

use std::future::Future;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::task::{Context, Poll};
use std::time::Duration;

use compio::driver::ProactorBuilder;
use compio::runtime::{Runtime, RuntimeBuilder};

/// Entries of the ring's submission queue: room for a hosted ublk queue's
/// commands (one per tag), a write per request in flight and the sockets'
/// operations; compio submits early when it fills.
const RING_ENTRIES: u32 = 1024;

/// Most executor ticks run back to back before the ring is looked at
/// without waiting: tasks that keep waking each other cannot hold the
/// ring's completions back longer than that.
const TICKS_BEFORE_RING_MAX: usize = 64;

/// The ways the ring may be set up, best first.
#[derive(Debug, Clone, Copy)]
enum RingSetup {
    DeferTaskrun,
    CoopTaskrun,
    Plain,
}

/// A runtime for the calling thread. Its ring is set up with
/// `IORING_SETUP_DEFER_TASKRUN` (and the `SINGLE_ISSUER` it needs) where
/// the kernel has them (6.1 and later): completions the kernel delivers as
/// task work (every request of a hosted ublk queue, every write it handed
/// to an io-wq worker) then run when the thread asks for completions, not
/// wherever it happens to run. Older kernels get `COOP_TASKRUN` (5.19),
/// then neither.
pub fn build() -> std::io::Result<Runtime> {
    let mut last_error = None;
    for setup in [
        RingSetup::DeferTaskrun,
        RingSetup::CoopTaskrun,
        RingSetup::Plain,
    ] {
        let mut proactor = ProactorBuilder::new();
        proactor.capacity(RING_ENTRIES);
        match setup {
            RingSetup::DeferTaskrun => {
                proactor.single_issuer(true).defer_taskrun(true);
            }
            RingSetup::CoopTaskrun => {
                proactor.coop_taskrun(true);
            }
            RingSetup::Plain => {}
        }
        match RuntimeBuilder::new().with_proactor(proactor).build() {
            Ok(runtime) => return Ok(runtime),
            Err(error) => {
                tracing::debug!(?setup, %error, "the kernel refused this io_uring setup");
                last_error = Some(error);
            }
        }
    }
    Err(last_error.expect("at least one setup was tried"))
}

/// `file`, opened already (with the flags and checks of `store` and `wal`),
/// as a file of the runtime's ring.
pub(crate) fn ring_file(file: std::fs::File) -> compio::fs::File {
    // SAFETY: the descriptor is the open file `file` owned, released here
    // to the compio file, which owns and closes it from now on.
    unsafe { compio::fs::File::from_raw_fd(file.into_raw_fd()) }
}

/// Runs `future` to its end on `runtime`, as `Runtime::block_on` does, but
/// waits in the ring only once no task is ready. compio's own loop looks
/// at the ring with a zero timeout whenever a tick leaves a task ready (one
/// spawned or woken during it, as each of the primary's local writes is),
/// and a wait with a zero timeout still puts the thread to sleep until its
/// timer fires: one more context switch per write at queue depth 1 in the
/// test VM (BENCHMARKS.md, run 10).
pub fn block_on<F: Future>(runtime: &Runtime, future: F) -> F::Output {
    runtime.enter(|| {
        let waker = runtime.waker();
        let mut context = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
                runtime.run();
                return output;
            }
            let mut ready = true;
            for _ in 0..TICKS_BEFORE_RING_MAX {
                ready = runtime.run();
                if !ready {
                    break;
                }
            }
            if ready {
                runtime.poll_with(Some(Duration::ZERO));
            } else {
                runtime.poll();
            }
        }
    })
}
