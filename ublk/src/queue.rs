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

/// Serves queue `queue_id` of `dev` until the device stops. Runs on the
/// queue's thread (started by libublk's `run_target`).
pub(crate) fn serve<T: Target>(queue_id: u16, dev: &UblkDev, target: Arc<T>) {
    let queue = match UblkQueue::new(queue_id, dev) {
        Ok(queue) => Rc::new(queue),
        Err(error) => {
            tracing::error!(queue_id, %error, "ublk: setting up the queue failed");
            return;
        }
    };
    let notifier = match Notifier::new() {
        Ok(notifier) => notifier,
        Err(error) => {
            tracing::error!(queue_id, %error, "ublk: creating the queue's eventfd failed");
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
            match serve_tag(&queue, tag, &*target, capacity_bytes, size_bytes).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(error) => tracing::error!(queue_id, tag, %error, "ublk: tag stopped"),
            }
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

/// What a request asks for, decoded from its descriptor.
enum Request {
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

fn decode(iod: &sys::ublksrv_io_desc) -> Request {
    let op = iod.op_flags & 0xff;
    let offset_bytes = iod.start_sector * SECTOR_SIZE_BYTES;
    let length_bytes = iod.nr_sectors << 9;
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

async fn serve_tag<T: Target>(
    queue: &UblkQueue<'_>,
    tag: u16,
    target: &T,
    capacity_bytes: usize,
    size_bytes: u64,
) -> Result<(), UblkError> {
    let mut buffer = target.new_buffer(capacity_bytes);
    assert!(
        buffer.capacity_bytes() >= capacity_bytes,
        "target's buffer too small"
    );
    queue
        .submit_io_prep_cmd(tag, BufDesc::RawAddress(buffer.as_mut_ptr()), -1, None)
        .await?;
    loop {
        let request = decode(queue.get_iod(tag));
        let result = handle(request, target, &mut buffer, capacity_bytes, size_bytes).await;
        // The pointer is fetched afresh: a write may have swapped the memory.
        queue
            .submit_io_commit_cmd(tag, BufDesc::RawAddress(buffer.as_mut_ptr()), result)
            .await?;
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
    let in_bounds = |offset_bytes: u64, length_bytes: u32| {
        length_bytes as usize <= capacity_bytes
            && offset_bytes
                .checked_add(u64::from(length_bytes))
                .is_some_and(|end| end <= size_bytes)
    };
    let outcome = match request {
        Request::Read {
            offset_bytes,
            length_bytes,
        } => {
            if !in_bounds(offset_bytes, length_bytes) {
                return -libc::EINVAL;
            }
            target
                .read(offset_bytes, length_bytes, buffer)
                .await
                .map(|()| length_bytes as i32)
        }
        Request::Write {
            offset_bytes,
            length_bytes,
            fua,
        } => {
            if !in_bounds(offset_bytes, length_bytes) {
                return -libc::EINVAL;
            }
            target
                .write(offset_bytes, length_bytes, buffer, fua)
                .await
                .map(|()| length_bytes as i32)
        }
        Request::Flush => target.flush().await.map(|()| 0),
        Request::Unsupported { op } => {
            tracing::warn!(op, "ublk: unsupported operation refused");
            return -libc::EOPNOTSUPP;
        }
    };
    outcome.unwrap_or_else(|errno| -errno)
}
