//! One hardware queue: a thread with libublk's ring, one task per tag.

use std::rc::Rc;
use std::sync::Arc;

use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError};

use crate::target::{RequestBuffer, Target};
use crate::wake::{Notified, Notifier};
use crate::SECTOR_SIZE_BYTES;

/// Seconds without a request before libublk lets the queue go idle.
const IDLE_SECS: u64 = 20;

/// Keeps the kernel from scanning the new device for partitions.
///
/// The kernel scans a device for partitions while it starts it, holding the
/// device's lock and waiting for the reads. If this process dies at that
/// moment, the reads wait for a recovery that the held lock forbids: the
/// start never returns, the dying process never exits, and the device can
/// be neither recovered nor removed (seen on 6.12 when the primary is
/// killed while it starts its device). The kernel skips the scan when a
/// queue's server lacks `CAP_SYS_ADMIN` as it becomes ready, so the queue
/// thread drops it from its own effective set (capabilities are per
/// thread); nothing the queue thread does needs it. A replicated volume
/// is not partitioned by the kernel anyway, as with DRBD's devices.
pub(crate) fn suppress_partition_scan(queue_id: u16) {
    use caps::{CapSet, Capability};
    if let Err(error) = caps::drop(None, CapSet::Effective, Capability::CAP_SYS_ADMIN) {
        tracing::warn!(queue_id, %error, "ublk: could not drop CAP_SYS_ADMIN; the kernel will scan the device for partitions");
    }
}

/// Serves queue `queue_id` of `dev` until the device stops. Runs on the
/// queue's thread (started by [`crate::run`]).
pub(crate) fn serve<T: Target>(queue_id: u16, dev: &UblkDev, target: Arc<T>) {
    suppress_partition_scan(queue_id);
    let queue = match UblkQueue::new(queue_id, dev) {
        Ok(queue) => Rc::new(queue),
        Err(error) => {
            tracing::error!(queue_id, %error, "ublk: setting up the queue failed");
            // Fails the device's start, which would otherwise wait for this
            // queue forever (libublk reports it as EPERM).
            dev.notify_buffer_registration_complete(true);
            return;
        }
    };
    let notifier = match Notifier::new() {
        Ok(notifier) => notifier,
        Err(error) => {
            tracing::error!(queue_id, %error, "ublk: creating the queue's eventfd failed");
            dev.notify_buffer_registration_complete(true);
            return;
        }
    };
    let capacity_bytes = dev.dev_info.max_io_buf_bytes as usize;
    let size_bytes = dev.tgt.dev_size;
    let executor = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for tag in queue.tags() {
        let queue = queue.clone();
        let target = target.clone();
        let task = async move {
            serve_tag_until_down(&queue, tag, &*target, capacity_bytes, size_bytes).await
        };
        tasks.push(executor.spawn(Notified::new(task, notifier.clone())));
    }
    // The request buffers belong to the target, not to libublk, so libublk
    // has nothing to register; tell it this queue is ready so that the
    // device's start, which waits for every queue, goes ahead.
    dev.notify_buffer_registration_complete(false);
    let waker_queue = queue.clone();
    let wake_task = executor.spawn(notifier.clone().serve(move || waker_queue.is_stopping()));

    let run_queue = queue.clone();
    let run_executor = executor.clone();
    let result = smol::block_on(executor.run(async move {
        let run_ops = || while run_executor.try_tick() {};
        let done = || tasks.iter().all(|task| task.is_finished());
        libublk::wait_and_handle_io_events(&run_queue, Some(IDLE_SECS), run_ops, done).await
    }));
    drop(wake_task);
    if let Err(error) = result {
        tracing::error!(queue_id, %error, "ublk: queue stopped with an error");
    }
}

/// The operation's bits of `ublksrv_io_desc.op_flags` (the rest are flags
/// such as FUA).
const OP_MASK: u32 = 0xff;

/// What a request asks for, decoded from its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    Read {
        offset_bytes: u64,
        length_bytes: u32,
    },
    Write {
        offset_bytes: u64,
        length_bytes: u32,
        fua: bool,
    },
    Flush,
    /// An operation not advertised to the kernel; completed with an error.
    Unsupported {
        op: u32,
    },
}

pub(crate) fn decode(iod: &sys::ublksrv_io_desc) -> Request {
    let op = iod.op_flags & OP_MASK;
    // The kernel keeps requests within the device; should a position
    // overflow anyway, the saturated value fails the bounds check and the
    // request is refused.
    let offset_bytes = iod.start_sector.saturating_mul(SECTOR_SIZE_BYTES);
    let length_bytes = iod.nr_sectors.saturating_mul(SECTOR_SIZE_BYTES as u32);
    match op {
        sys::UBLK_IO_OP_READ => Request::Read {
            offset_bytes,
            length_bytes,
        },
        sys::UBLK_IO_OP_WRITE => Request::Write {
            offset_bytes,
            length_bytes,
            fua: iod.op_flags & sys::UBLK_IO_F_FUA != 0,
        },
        sys::UBLK_IO_OP_FLUSH => Request::Flush,
        op => Request::Unsupported { op },
    }
}

/// A tag's buffer, which the kernel writes requests into and reads results
/// from while a command is outstanding. Should the tag's future be dropped
/// with a command outstanding (its executor torn down while the device
/// still lives), the buffer is leaked rather than freed under the kernel.
pub(crate) struct TagMemory<B> {
    pub(crate) buffer: Option<B>,
    pub(crate) lent_to_kernel: bool,
}

impl<B> TagMemory<B> {
    pub(crate) fn buffer(&mut self) -> &mut B {
        self.buffer
            .as_mut()
            .expect("a tag's buffer lives as long as the tag")
    }
}

impl<B> Drop for TagMemory<B> {
    fn drop(&mut self) {
        if self.lent_to_kernel {
            std::mem::forget(self.buffer.take());
        }
    }
}

/// Serves tag `tag` until the queue goes down; any other end is logged.
async fn serve_tag_until_down<T: Target>(
    queue: &UblkQueue<'_>,
    tag: u16,
    target: &T,
    capacity_bytes: usize,
    size_bytes: u64,
) {
    match serve_tag(queue, tag, target, capacity_bytes, size_bytes).await {
        Ok(()) | Err(UblkError::QueueIsDown) => {}
        Err(error) => {
            tracing::error!(queue_id = queue.get_qid(), tag, %error, "ublk: tag stopped")
        }
    }
}

async fn serve_tag<T: Target>(
    queue: &UblkQueue<'_>,
    tag: u16,
    target: &T,
    capacity_bytes: usize,
    size_bytes: u64,
) -> Result<(), UblkError> {
    let mut memory = TagMemory {
        buffer: Some(target.new_buffer(capacity_bytes)),
        lent_to_kernel: false,
    };
    assert!(
        memory.buffer().capacity_bytes() >= capacity_bytes,
        "target's buffer too small"
    );
    memory.lent_to_kernel = true;
    let fetched = queue
        .submit_io_prep_cmd(
            tag,
            BufDesc::RawAddress(memory.buffer().as_mut_ptr()),
            -1,
            None,
        )
        .await;
    memory.lent_to_kernel = false;
    fetched?;
    loop {
        let request = decode(queue.get_iod(tag));
        let result = handle(request, target, memory.buffer(), capacity_bytes, size_bytes).await;
        // The pointer is fetched afresh: a write may have swapped the memory.
        memory.lent_to_kernel = true;
        let fetched = queue
            .submit_io_commit_cmd(
                tag,
                BufDesc::RawAddress(memory.buffer().as_mut_ptr()),
                result,
            )
            .await;
        memory.lent_to_kernel = false;
        fetched?;
    }
}

/// `request` if the queue may hand it to the target: within the device and
/// the tag's buffer, and an operation the device advertises; otherwise
/// what the kernel gets instead (-errno), the target untouched.
pub(crate) fn checked(
    request: Request,
    capacity_bytes: usize,
    size_bytes: u64,
) -> Result<Request, i32> {
    let in_bounds = |offset_bytes: u64, length_bytes: u32| {
        length_bytes as usize <= capacity_bytes
            && offset_bytes
                .checked_add(u64::from(length_bytes))
                .is_some_and(|end| end <= size_bytes)
    };
    match request {
        Request::Read {
            offset_bytes,
            length_bytes,
        }
        | Request::Write {
            offset_bytes,
            length_bytes,
            ..
        } if !in_bounds(offset_bytes, length_bytes) => Err(-libc::EINVAL),
        Request::Unsupported { op } => {
            tracing::warn!(op, "ublk: unsupported operation refused");
            Err(-libc::EOPNOTSUPP)
        }
        request => Ok(request),
    }
}

/// Serves one request; returns what the kernel gets: bytes done or -errno.
async fn handle<T: Target>(
    request: Request,
    target: &T,
    buffer: &mut T::Buffer,
    capacity_bytes: usize,
    size_bytes: u64,
) -> i32 {
    let request = match checked(request, capacity_bytes, size_bytes) {
        Ok(request) => request,
        Err(result) => return result,
    };
    let outcome = match request {
        Request::Read {
            offset_bytes,
            length_bytes,
        } => target
            .read(offset_bytes, length_bytes, buffer)
            .await
            .map(|()| length_bytes as i32),
        Request::Write {
            offset_bytes,
            length_bytes,
            fua,
        } => target
            .write(offset_bytes, length_bytes, buffer, fua)
            .await
            .map(|()| length_bytes as i32),
        Request::Flush => target.flush().await.map(|()| 0),
        Request::Unsupported { .. } => unreachable!("refused by the check"),
    };
    outcome.unwrap_or_else(|errno| -errno)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Errno;

    const CAPACITY_BYTES: usize = 64 << 10;
    const SIZE_BYTES: u64 = 1 << 20;

    struct Buffer(Vec<u8>);

    // SAFETY: a test buffer no kernel ever touches.
    unsafe impl RequestBuffer for Buffer {
        fn as_mut_ptr(&mut self) -> *mut u8 {
            self.0.as_mut_ptr()
        }
        fn capacity_bytes(&self) -> usize {
            self.0.len()
        }
    }

    /// Records what the frontend asked of it.
    #[derive(Default)]
    struct Recorder {
        calls: std::sync::Mutex<Vec<String>>,
        fail_with: Option<Errno>,
    }

    impl Recorder {
        fn result(&self, call: String) -> Result<(), Errno> {
            self.calls.lock().unwrap().push(call);
            self.fail_with.map_or(Ok(()), Err)
        }
    }

    impl Target for Recorder {
        type Buffer = Buffer;
        fn new_buffer(&self, capacity_bytes: usize) -> Buffer {
            Buffer(vec![0; capacity_bytes])
        }
        async fn read(&self, offset: u64, length: u32, _: &mut Buffer) -> Result<(), Errno> {
            self.result(format!("read {offset} {length}"))
        }
        async fn write(
            &self,
            offset: u64,
            length: u32,
            _: &mut Buffer,
            fua: bool,
        ) -> Result<(), Errno> {
            self.result(format!("write {offset} {length} fua={fua}"))
        }
        async fn flush(&self) -> Result<(), Errno> {
            self.result("flush".into())
        }
    }

    fn iod(op_flags: u32, start_sector: u64, nr_sectors: u32) -> sys::ublksrv_io_desc {
        sys::ublksrv_io_desc {
            op_flags,
            nr_sectors,
            start_sector,
            addr: 0,
        }
    }

    /// What the kernel would get back, and what the target was asked.
    fn serve(target: &Recorder, iod: sys::ublksrv_io_desc) -> (i32, Vec<String>) {
        let mut buffer = target.new_buffer(CAPACITY_BYTES);
        let result = smol::block_on(handle(
            decode(&iod),
            target,
            &mut buffer,
            CAPACITY_BYTES,
            SIZE_BYTES,
        ));
        (result, std::mem::take(&mut target.calls.lock().unwrap()))
    }

    #[test]
    fn requests_reach_the_target_in_bytes_with_their_fua_flag() {
        let target = Recorder::default();
        assert_eq!(
            serve(&target, iod(sys::UBLK_IO_OP_READ, 8, 16)),
            (8192, vec!["read 4096 8192".to_string()])
        );
        assert_eq!(
            serve(
                &target,
                iod(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 16, 8)
            ),
            (4096, vec!["write 8192 4096 fua=true".to_string()])
        );
        assert_eq!(
            serve(&target, iod(sys::UBLK_IO_OP_WRITE, 0, 8)),
            (4096, vec!["write 0 4096 fua=false".to_string()])
        );
        assert_eq!(
            serve(&target, iod(sys::UBLK_IO_OP_FLUSH, 0, 0)),
            (0, vec!["flush".to_string()])
        );
    }

    #[test]
    fn requests_past_the_end_or_larger_than_the_buffer_are_refused_untouched() {
        let target = Recorder::default();
        let last_sector = SIZE_BYTES / SECTOR_SIZE_BYTES;
        for iod in [
            iod(sys::UBLK_IO_OP_WRITE, last_sector - 7, 16),
            iod(sys::UBLK_IO_OP_READ, last_sector, 8),
            iod(sys::UBLK_IO_OP_WRITE, 0, (CAPACITY_BYTES as u32 / 512) + 8),
            iod(sys::UBLK_IO_OP_WRITE, u64::MAX / 256, 8),
            iod(sys::UBLK_IO_OP_READ, 0, u32::MAX),
        ] {
            assert_eq!(serve(&target, iod), (-libc::EINVAL, vec![]), "{iod:?}");
        }
    }

    #[test]
    fn operations_not_advertised_get_an_error_and_never_reach_the_target() {
        let target = Recorder::default();
        for op in [
            sys::UBLK_IO_OP_DISCARD,
            sys::UBLK_IO_OP_WRITE_ZEROES,
            sys::UBLK_IO_OP_WRITE_SAME,
            0x7f,
        ] {
            assert_eq!(
                serve(&target, iod(op, 0, 8)),
                (-libc::EOPNOTSUPP, vec![]),
                "op {op}"
            );
        }
    }

    #[test]
    fn a_target_error_is_completed_as_its_negated_errno() {
        let target = Recorder {
            fail_with: Some(libc::EIO),
            ..Recorder::default()
        };
        assert_eq!(
            serve(&target, iod(sys::UBLK_IO_OP_WRITE, 0, 8)).0,
            -libc::EIO
        );
        assert_eq!(
            serve(&target, iod(sys::UBLK_IO_OP_FLUSH, 0, 0)).0,
            -libc::EIO
        );
    }

    /// Counts its drops, standing for a tag's buffer.
    struct Counted(std::rc::Rc<std::cell::Cell<u32>>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    #[test]
    fn a_tag_buffer_lent_to_the_kernel_is_leaked_not_freed() {
        let drops = std::rc::Rc::new(std::cell::Cell::new(0));
        let lent = TagMemory {
            buffer: Some(Counted(drops.clone())),
            lent_to_kernel: true,
        };
        drop(lent);
        assert_eq!(drops.get(), 0, "freed while the kernel may write into it");
        let returned = TagMemory {
            buffer: Some(Counted(drops.clone())),
            lent_to_kernel: false,
        };
        drop(returned);
        assert_eq!(drops.get(), 1, "a buffer the kernel gave back is freed");
    }
}
