//! What a block target provides to the frontend.

use std::future::Future;

/// A positive errno value (`libc::EIO`, ...), completed to the kernel negated.
pub type Errno = i32;

/// A request buffer: the memory the kernel copies a write's data into before
/// handing the request over, and a read's data out of when it completes.
///
/// # Safety
/// [`RequestBuffer::as_mut_ptr`] must return memory of at least
/// [`RequestBuffer::capacity_bytes`] bytes that stays allocated, and is
/// neither read nor written by anyone else, until the next call of any
/// method on this buffer: between two calls the kernel may write into it
/// (the next request's data) or read from it (a read's result).
pub unsafe trait RequestBuffer: 'static {
    /// Start of the buffer, for the kernel.
    fn as_mut_ptr(&mut self) -> *mut u8;
    /// Usable size.
    fn capacity_bytes(&self) -> usize;
}

/// A block device's behaviour. Offsets and lengths are bytes, multiples of
/// the logical block size, within the device; the frontend checks that
/// before calling.
///
/// The futures run on a queue's single-threaded executor (they need not be
/// `Send`) and may be completed from any thread. A target served on
/// queue threads is shared by them (`Send + Sync`); one that serves only a
/// hosted queue ([`crate::HostedQueue`]) stays on its host's thread and
/// need not be.
pub trait Target: 'static {
    /// The per-request buffer type.
    type Buffer: RequestBuffer;

    /// A buffer for one tag, of `capacity_bytes` (the device's largest
    /// request). Called on the queue's thread, once per tag.
    fn new_buffer(&self, capacity_bytes: usize) -> Self::Buffer;

    /// Fills `buffer[..length_bytes]` from `offset_bytes`.
    fn read(
        &self,
        offset_bytes: u64,
        length_bytes: u32,
        buffer: &mut Self::Buffer,
    ) -> impl Future<Output = Result<(), Errno>>;

    /// Writes `buffer[..length_bytes]` at `offset_bytes`; with `fua`,
    /// completes only once it is durable. The target may swap the buffer's
    /// memory (e.g. to keep the data while replicas still need it); the
    /// frontend asks for the pointer afresh before the next request.
    fn write(
        &self,
        offset_bytes: u64,
        length_bytes: u32,
        buffer: &mut Self::Buffer,
        fua: bool,
    ) -> impl Future<Output = Result<(), Errno>>;

    /// Completes once every write completed before it is durable.
    fn flush(&self) -> impl Future<Output = Result<(), Errno>>;
}

/// A block device's behaviour on a hosted queue ([`crate::HostedQueue`]),
/// which runs on its host's thread and answers requests without futures:
/// the target is called with the request's tag, and answers later (or at
/// once) through the [`QueueHandle`] it was made with. Reads are served by
/// the queue itself, from the target's file, through the host's ring.
///
/// A request costs no task, waker or poll this way, and its answer no
/// wake-up: in replblk's test VM, counting instructions, that (with the
/// engine's copy writes told the same way) took its IOPS at queue depth 32
/// from 0.96x to 1.00x of libublk's loop example (medians of five boots;
/// docs/BENCHMARKS.md, "Session 18").
pub trait HostedTarget: 'static {
    /// The per-request buffer type.
    type Buffer: RequestBuffer;

    /// A buffer for one tag, as [`Target::new_buffer`].
    fn new_buffer(&self, capacity_bytes: usize) -> Self::Buffer;

    /// The file reads are served from, at the same offsets as the device.
    fn read_file(&self) -> std::os::fd::RawFd;

    /// Starts writing `buffer[..length_bytes]` at `offset_bytes` (with
    /// `fua`, durably) and answers for `tag` once done. The target may keep
    /// the buffer's memory, as [`Target::write`] says.
    fn write(
        &self,
        offset_bytes: u64,
        length_bytes: u32,
        buffer: &mut Self::Buffer,
        fua: bool,
        tag: u16,
    );

    /// Answers for `tag` once every write completed before it is durable.
    fn flush(&self, tag: u16);
}

/// How a [`HostedTarget`] answers its queue's requests. Cheap to clone;
/// used on the queue's thread only.
#[derive(Clone)]
pub struct QueueHandle(pub(crate) std::rc::Weak<dyn Answer>);

impl QueueHandle {
    /// Completes the request in `tag` (a write or a flush the target was
    /// handed): `Ok` with the request's full length, or the error. An
    /// answer for a tag that holds no request of the target's (answered
    /// already), or after the queue ended, is ignored.
    pub fn answer(&self, tag: u16, result: Result<(), Errno>) {
        if let Some(queue) = self.0.upgrade() {
            queue.answer(tag, result);
        }
    }
}

/// The queue side of a [`QueueHandle`].
pub(crate) trait Answer {
    fn answer(self: std::rc::Rc<Self>, tag: u16, result: Result<(), Errno>);
}
