//! Where the result of each request in the primary's core goes once the
//! core completes it, by request id.
//!
//! A request from another thread (the volume's channel) waits on a oneshot.
//! A request made on the engine's own thread ([`super::volume::LocalVolume`],
//! the hosted ublk queue's) waits in the table itself: its future polls its
//! entry, so its reply costs no allocation, where a oneshot allocates its
//! shared state and makes an atomic operation at each send, poll and drop;
//! and the request id is the entry's index, so a completion finds its
//! waiter without hashing. A request whose caller gave a
//! [`ReplySink`] (a hosted ublk queue's) has its result told to the sink,
//! with the caller's token: no future at all.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use slab::Slab;
use tokio::sync::oneshot;

use super::primary::Engine;
use super::volume::{ReplySink, VolumeError};
use crate::core::primary::RequestId;

/// What a write or a flush completes with.
pub(crate) type Reply = Result<(), VolumeError>;

enum Waiter {
    /// A caller on another thread.
    Channel(oneshot::Sender<Reply>),
    /// A caller on the engine's thread, polling [`LocalReply`]; `result` is
    /// set by the completion and taken by the poll that ends the wait.
    Local {
        waker: Option<Waker>,
        result: Option<Reply>,
        /// Its future was dropped before the completion: nobody takes the
        /// result, so the completion frees the entry.
        abandoned: bool,
    },
    /// A caller on the engine's thread that is told the result.
    Sink { sink: Rc<dyn ReplySink>, token: u64 },
}

/// A result for a [`ReplySink`], to tell once the table is no longer
/// borrowed: the sink may make requests of the engine again.
#[must_use = "the sink waits to be told"]
pub(crate) struct Told {
    sink: Rc<dyn ReplySink>,
    token: u64,
    result: Reply,
}

impl Told {
    pub(crate) fn tell(self) {
        self.sink.reply(self.token, self.result);
    }
}

/// The waiters of the requests in the core, indexed by request id. An id
/// is reused only once its entry is freed, after its completion, so no two
/// requests in the core ever share one.
#[derive(Default)]
pub(crate) struct Replies {
    waiters: Slab<Waiter>,
}

fn key(id: RequestId) -> usize {
    usize::try_from(id).expect("request ids are table indexes")
}

impl Replies {
    /// A request from another thread: its result goes to `reply`.
    pub(crate) fn insert_channel(&mut self, reply: oneshot::Sender<Reply>) -> RequestId {
        self.waiters.insert(Waiter::Channel(reply)) as RequestId
    }

    /// A request made on the engine's thread; [`LocalReply`] waits for it.
    pub(crate) fn insert_local(&mut self) -> RequestId {
        self.waiters.insert(Waiter::Local {
            waker: None,
            result: None,
            abandoned: false,
        }) as RequestId
    }

    /// A request made on the engine's thread whose result `sink` is told,
    /// with `token`.
    pub(crate) fn insert_sink(&mut self, sink: Rc<dyn ReplySink>, token: u64) -> RequestId {
        self.waiters.insert(Waiter::Sink { sink, token }) as RequestId
    }

    /// Hands `result` to request `id`'s waiter; a sink's is returned, to be
    /// told by the caller. The core completes each request once; an id with
    /// no waiter is ignored.
    pub(crate) fn complete(&mut self, id: RequestId, result: Reply) -> Option<Told> {
        let key = key(id);
        let waiter = self.waiters.get_mut(key)?;
        match waiter {
            Waiter::Channel(_) => {
                if let Waiter::Channel(reply) = self.waiters.remove(key) {
                    let _ = reply.send(result);
                }
            }
            Waiter::Sink { .. } => {
                if let Waiter::Sink { sink, token } = self.waiters.remove(key) {
                    return Some(Told {
                        sink,
                        token,
                        result,
                    });
                }
            }
            Waiter::Local {
                abandoned: true, ..
            } => {
                self.waiters.remove(key);
            }
            // Answered already: by `stop_all`, which the core's own
            // completion may follow while the engine winds down.
            Waiter::Local {
                result: Some(_), ..
            } => {}
            Waiter::Local {
                waker,
                result: slot,
                ..
            } => {
                *slot = Some(result);
                if let Some(waker) = waker.take() {
                    waker.wake();
                }
            }
        }
        None
    }

    /// Completes every request still waiting with `VolumeError::Stopped`:
    /// the engine is going away and will not complete them. Returns what
    /// the sinks are to be told.
    pub(crate) fn stop_all(&mut self) -> Vec<Told> {
        let ids: Vec<usize> = self.waiters.iter().map(|(key, _)| key).collect();
        let mut told = Vec::new();
        for key in ids {
            let waiting = match &self.waiters[key] {
                Waiter::Channel(_) | Waiter::Sink { .. } => true,
                Waiter::Local { result, .. } => result.is_none(),
            };
            if waiting {
                told.extend(self.complete(key as RequestId, Err(VolumeError::Stopped)));
            }
        }
        told
    }

    fn poll_local(&mut self, id: RequestId, cx: &mut Context<'_>) -> Poll<Reply> {
        let key = key(id);
        let Some(Waiter::Local { waker, result, .. }) = self.waiters.get_mut(key) else {
            unreachable!("request {id} polled without a local entry");
        };
        if let Some(result) = result.take() {
            self.waiters.remove(key);
            return Poll::Ready(result);
        }
        match waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => *waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn abandon_local(&mut self, id: RequestId) {
        let key = key(id);
        let Some(Waiter::Local {
            result, abandoned, ..
        }) = self.waiters.get_mut(key)
        else {
            return;
        };
        if result.is_some() {
            self.waiters.remove(key);
        } else {
            *abandoned = true;
        }
    }

    /// Requests still waiting for their completion.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiters.len()
    }
}

/// The result of a request made on the engine's thread.
pub(crate) struct LocalReply {
    engine: Rc<Engine>,
    id: RequestId,
    done: bool,
}

impl LocalReply {
    pub(crate) fn new(engine: Rc<Engine>, id: RequestId) -> LocalReply {
        LocalReply {
            engine,
            id,
            done: false,
        }
    }
}

impl Future for LocalReply {
    type Output = Reply;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        assert!(!self.done, "a request's reply polled after it was taken");
        let polled = self.engine.replies().borrow_mut().poll_local(self.id, cx);
        if polled.is_ready() {
            self.done = true;
        }
        polled
    }
}

impl Drop for LocalReply {
    fn drop(&mut self) {
        if !self.done {
            self.engine.replies().borrow_mut().abandon_local(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_local_waiter_is_woken_once_and_takes_its_result() {
        let mut replies = Replies::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let id = replies.insert_local();
        assert!(replies.poll_local(id, &mut cx).is_pending());
        assert!(replies.poll_local(id, &mut cx).is_pending());
        replies.complete(id, Err(VolumeError::Stopped));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            replies.poll_local(id, &mut cx),
            Poll::Ready(Err(VolumeError::Stopped))
        );
        assert_eq!(replies.len(), 0, "the entry is freed once taken");
    }

    #[test]
    fn an_abandoned_waiter_is_freed_by_its_completion_and_its_id_reused_only_then() {
        let mut replies = Replies::default();
        let id = replies.insert_local();
        replies.abandon_local(id);
        let other = replies.insert_local();
        assert_ne!(other, id, "an id in the core is not handed out again");
        replies.complete(id, Ok(()));
        assert_eq!(replies.len(), 1);
        assert_eq!(replies.insert_local(), id, "freed by the completion");
    }

    #[test]
    fn a_waiter_dropped_after_its_completion_frees_its_entry() {
        let mut replies = Replies::default();
        let id = replies.insert_local();
        replies.complete(id, Ok(()));
        replies.abandon_local(id);
        assert_eq!(replies.len(), 0);
    }

    #[test]
    fn a_completion_after_stopping_leaves_the_stopped_answer() {
        let mut replies = Replies::default();
        let id = replies.insert_local();
        assert!(replies.stop_all().is_empty(), "no sink to tell");
        assert!(replies.complete(id, Ok(())).is_none());
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(
            replies.poll_local(id, &mut cx),
            Poll::Ready(Err(VolumeError::Stopped))
        );
    }

    /// Records what it is told.
    #[derive(Default)]
    struct Recorded(std::cell::RefCell<Vec<(u64, Reply)>>);

    impl ReplySink for Recorded {
        fn reply(&self, token: u64, result: Reply) {
            self.0.borrow_mut().push((token, result));
        }
    }

    #[test]
    fn a_sink_is_told_its_result_with_its_token_once_and_by_the_caller() {
        let mut replies = Replies::default();
        let recorded = Rc::new(Recorded::default());
        let sink: Rc<dyn ReplySink> = recorded.clone();
        let done = replies.insert_sink(sink.clone(), 17);
        let stopped = replies.insert_sink(sink, 4);
        let told = replies.complete(done, Ok(())).expect("a sink's result");
        assert!(recorded.0.borrow().is_empty(), "told only by the caller");
        told.tell();
        assert!(replies.complete(done, Ok(())).is_none(), "completed once");
        for told in replies.stop_all() {
            told.tell();
        }
        assert_eq!(
            *recorded.0.borrow(),
            vec![(17, Ok(())), (4, Err(VolumeError::Stopped))]
        );
        assert_eq!(replies.len(), 0);
        let _ = stopped;
    }

    #[test]
    fn stopping_answers_every_waiter_and_no_result_already_given() {
        let mut replies = Replies::default();
        let (sender, mut receiver) = oneshot::channel();
        let channel = replies.insert_channel(sender);
        let waiting = replies.insert_local();
        let answered = replies.insert_local();
        replies.complete(answered, Ok(()));
        assert!(replies.stop_all().is_empty(), "no sink to tell");
        assert_eq!(receiver.try_recv(), Ok(Err(VolumeError::Stopped)));
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert_eq!(
            replies.poll_local(waiting, &mut cx),
            Poll::Ready(Err(VolumeError::Stopped))
        );
        assert_eq!(replies.poll_local(answered, &mut cx), Poll::Ready(Ok(())));
        assert_eq!(replies.len(), 0);
        let _ = channel;
    }
}
