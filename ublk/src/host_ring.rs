//! A hosted queue's commands for its host's own io_uring.
//!
//! A hosted queue ([`crate::HostedQueue`]) runs on a thread whose loop is
//! `replblk_ring`'s. Its ublk commands and its reads go into that
//! ring, the same ring as the host's file writes and sockets, so the thread
//! has one ring to submit to and one to wait on: a request, its write to
//! the copy and its commit are all completions of that ring, and no second
//! ring must be polled, entered and reaped beside it.
//!
//! The kernel takes a queue's commands only from the task that fetched its
//! first request, i.e. the thread that enters the ring; the ring is
//! entered by its own thread alone, the host's thread.

use std::os::fd::RawFd;
use std::rc::Rc;

use io_uring::{opcode, squeue, types};

/// A queue's char device as the host's ring names it: by its entry in the
/// ring's table of files when it got one (as libublk's own queues do: the
/// kernel then takes no reference to the file per command), by its
/// descriptor otherwise.
pub(crate) struct DeviceFile {
    fd: RawFd,
    /// Held by each command too, so that the entry is not handed to another
    /// file while a command may still name it.
    fixed: Option<Rc<replblk_ring::FixedFile>>,
}

impl DeviceFile {
    /// `fd`, registered with the calling thread's ring if it can be.
    pub(crate) fn register(fd: RawFd) -> DeviceFile {
        DeviceFile {
            fd,
            fixed: replblk_ring::register_file(fd).map(Rc::new),
        }
    }
}

/// The 16 bytes of a `ublksrv_io_cmd`, laid out as the kernel reads them.
fn io_command_bytes(queue_id: u16, tag: u16, result: i32, buffer_address: u64) -> [u8; 16] {
    let mut bytes = [0_u8; 16];
    bytes[0..2].copy_from_slice(&queue_id.to_ne_bytes());
    bytes[2..4].copy_from_slice(&tag.to_ne_bytes());
    bytes[4..8].copy_from_slice(&result.to_ne_bytes());
    bytes[8..16].copy_from_slice(&buffer_address.to_ne_bytes());
    bytes
}

/// The entry of one ublk io command (`UBLK_U_IO_FETCH_REQ` or
/// `UBLK_U_IO_COMMIT_AND_FETCH_REQ`) for `tag` of queue `queue_id` on the
/// device's char device `device`. Its result is `UBLK_IO_RES_OK` once a
/// request is waiting in the tag, `UBLK_IO_RES_ABORT` once the queue is
/// going away. The kernel copies requests into and out of `buffer_address`
/// until the next command's result: the caller keeps that memory valid
/// until then, and `device` alive until the result.
pub(crate) fn io_command_entry(
    device: &DeviceFile,
    ioctl_encoded: bool,
    queue_id: u16,
    tag: u16,
    command: u32,
    result: i32,
    buffer_address: u64,
) -> squeue::Entry {
    // Drivers without UBLK_F_CMD_IOCTL_ENCODE know the commands by their
    // number alone, as libublk sends them.
    let command = if ioctl_encoded {
        command
    } else {
        command & 0xff
    };
    let bytes = io_command_bytes(queue_id, tag, result, buffer_address);
    match &device.fixed {
        Some(fixed) => opcode::UringCmd16::new(types::Fixed(fixed.index()), command)
            .cmd(bytes)
            .build(),
        None => opcode::UringCmd16::new(types::Fd(device.fd), command)
            .cmd(bytes)
            .build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libublk::sys;

    #[test]
    fn io_command_bytes_follow_the_kernels_struct() {
        let bytes = io_command_bytes(3, 17, -5, 0x1122_3344_5566_7788);
        let at = |offset: usize, length: usize| &bytes[offset..offset + length];
        assert_eq!(std::mem::size_of::<sys::ublksrv_io_cmd>(), 16);
        assert_eq!(
            at(std::mem::offset_of!(sys::ublksrv_io_cmd, q_id), 2),
            &3_u16.to_ne_bytes()
        );
        assert_eq!(
            at(std::mem::offset_of!(sys::ublksrv_io_cmd, tag), 2),
            &17_u16.to_ne_bytes()
        );
        assert_eq!(
            at(std::mem::offset_of!(sys::ublksrv_io_cmd, result), 4),
            &(-5_i32).to_ne_bytes()
        );
        assert_eq!(
            at(std::mem::offset_of!(sys::ublksrv_io_cmd, addr), 8),
            &0x1122_3344_5566_7788_u64.to_ne_bytes()
        );
    }
}
