//! File I/O on libublk's ring of the calling queue thread, for targets
//! that serve a request from a local file without leaving the queue's
//! thread. replblk reads from the primary's copy this way. (A hosted queue
//! reads its target's file itself, see [`crate::HostedTarget`].)

use std::os::fd::RawFd;

/// Reads `buffer.len()` bytes at `offset_bytes` of `fd`, through the ring
/// of the calling queue thread. Must be awaited on the queue's thread,
/// inside one of the queue's tag tasks, and awaited to the end: the kernel
/// writes into `buffer` until the completion arrives.
pub async fn read_at(fd: RawFd, offset_bytes: u64, buffer: &mut [u8]) -> std::io::Result<usize> {
    let length = u32::try_from(buffer.len()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "read larger than 4 GiB")
    })?;
    let mut done = 0_u32;
    // A short read (never seen on O_DIRECT files, allowed by the ABI) is
    // continued rather than returned short.
    while done < length {
        let offset = offset_bytes + u64::from(done);
        let rest = &mut buffer[done as usize..];
        let sqe =
            io_uring::opcode::Read::new(io_uring::types::Fd(fd), rest.as_mut_ptr(), length - done)
                .offset(offset)
                .build();
        let result =
            libublk::uring_async::ublk_submit_sqe_async(sqe, libublk::UblkUringData::Target as u64)
                .await
                .map_err(|error| std::io::Error::other(error.to_string()))?;
        if result < 0 {
            return Err(std::io::Error::from_raw_os_error(-result));
        }
        if result == 0 {
            break;
        }
        done += result as u32;
    }
    Ok(done as usize)
}
