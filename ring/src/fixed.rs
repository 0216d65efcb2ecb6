//! Files registered with the ring (`IORING_REGISTER_FILES`): an operation
//! names such a file by its index in the ring's table, so the kernel
//! neither looks its descriptor up nor takes and drops a reference to it per
//! operation. Worth it for the files every request touches (the primary's
//! copy, a ublk queue's char device), as libublk does for its queues.

use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::rc::Rc;

use super::Ring;

/// Entries in a ring's table of registered files.
pub const FIXED_FILES_MAX: u32 = 16;

/// Which entries of a ring's table are in use.
pub(super) struct FixedTable {
    used: Vec<bool>,
}

impl FixedTable {
    /// A sparse table of [`FIXED_FILES_MAX`] entries for `uring`, or `None`
    /// if the kernel has none (before 5.19): files are then named by their
    /// descriptors.
    pub(super) fn register(uring: &io_uring::IoUring) -> Option<FixedTable> {
        uring
            .submitter()
            .register_files_sparse(FIXED_FILES_MAX)
            .ok()
            .map(|()| FixedTable {
                used: vec![false; FIXED_FILES_MAX as usize],
            })
    }
}

/// A descriptor registered with the calling thread's ring, by index. The
/// ring holds a reference of its own to the file, so the index stays valid
/// whatever happens to the descriptor, until this is dropped; operations
/// in flight then keep the file until they complete. Lives on the ring's
/// thread only.
pub struct FixedFile {
    index: u32,
    ring_id: u64,
    _on_the_rings_thread: PhantomData<Rc<()>>,
}

impl FixedFile {
    /// Its index in the ring's table, for `io_uring::types::Fixed`.
    pub fn index(&self) -> u32 {
        self.index
    }
}

/// Registers `fd` with the calling thread's ring. `None` outside
/// [`Ring::block_on`], if the kernel has no table, if the table is full, or
/// if the kernel refuses `fd`: the caller then names the file by its
/// descriptor, which works the same, only slower.
pub fn register_file(fd: RawFd) -> Option<FixedFile> {
    Ring::try_with(|ring| {
        let mut table = ring.fixed.borrow_mut();
        let table = table.as_mut()?;
        let index = table.used.iter().position(|used| !used)?;
        let uring = ring.uring.borrow();
        match uring.submitter().register_files_update(index as u32, &[fd]) {
            Ok(_) => {
                table.used[index] = true;
                Some(FixedFile {
                    index: index as u32,
                    ring_id: ring.id,
                    _on_the_rings_thread: PhantomData,
                })
            }
            Err(error) => {
                tracing::debug!(fd, %error, "registering a file with the ring failed");
                None
            }
        }
    })
    .flatten()
}

impl Drop for FixedFile {
    fn drop(&mut self) {
        // A ring no longer running took its table with it.
        Ring::try_with_id(self.ring_id, |ring| {
            let uring = ring.uring.borrow();
            // -1 empties the entry; requests in flight keep their file.
            if let Err(error) = uring.submitter().register_files_update(self.index, &[-1]) {
                // The entry stays taken rather than be handed out while
                // it may still name this file.
                tracing::warn!(index = self.index, %error, "unregistering a file from the ring failed");
                return;
            }
            if let Some(table) = ring.fixed.borrow_mut().as_mut() {
                table.used[self.index as usize] = false;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::File;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_full_table_says_so_and_a_dropped_entry_is_reused() {
        let file = tempfile::tempfile().unwrap();
        let ring = Ring::new().unwrap();
        ring.block_on(async {
            let entries: Vec<FixedFile> = (0..FIXED_FILES_MAX)
                .map(|_| register_file(file.as_raw_fd()).expect("room in the table"))
                .collect();
            assert!(
                register_file(file.as_raw_fd()).is_none(),
                "the table is full"
            );
            drop(entries);
            let again = register_file(file.as_raw_fd()).expect("entries were freed");
            assert_eq!(again.index(), 0);
        });
        assert!(
            register_file(file.as_raw_fd()).is_none(),
            "no ring outside block_on"
        );
    }

    #[test]
    fn a_files_entry_outlives_the_file_until_its_operations_complete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        let std_file = std::fs::File::create_new(&path).unwrap();
        let other = tempfile::tempfile().unwrap();
        let ring = Ring::new().unwrap();
        let data: Vec<u8> = (0..8192_u32).map(|i| (i % 233) as u8).collect();
        let expected = data.clone();
        ring.block_on(async move {
            let file = File::from_std(std_file);
            let (sender, receiver) = tokio::sync::oneshot::channel();
            file.write_all_at_then(data, 0, move |result, _: Vec<u8>| {
                let _ = sender.send(result.map_err(|error| error.kind()));
            });
            drop(file);
            let meanwhile = register_file(other.as_raw_fd()).unwrap();
            assert_ne!(
                meanwhile.index(),
                0,
                "the written file's entry is not handed out while its write may name it"
            );
            assert_eq!(receiver.await.unwrap(), Ok(()));
            drop(meanwhile);
            let after = register_file(other.as_raw_fd()).unwrap();
            assert_eq!(after.index(), 0, "freed once the write completed");
        });
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn an_abandoned_operation_holding_the_last_reference_unregisters_the_file_on_completion() {
        let mut fds = [0; 2];
        // SAFETY: plain system call into a live array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: descriptors just opened, owned by nothing else.
        let (reader, writer) = unsafe {
            use std::os::fd::FromRawFd;
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        let ring = Ring::new().unwrap();
        ring.block_on(async move {
            let file = File::from_std(reader);
            // The read waits for bytes nobody has written yet; its future
            // and the file go, and the operation keeps the last reference.
            let read = crate::timeout(
                std::time::Duration::from_millis(20),
                file.read_exact_at(vec![0_u8; 4], 0),
            )
            .await;
            assert!(read.is_err(), "nothing to read yet");
            drop(file);
            let held = register_file(writer.as_raw_fd()).unwrap();
            assert_ne!(held.index(), 0, "the reader's entry is still taken");
            drop(held);
            std::io::Write::write_all(&mut &writer, b"four").unwrap();
            // The completion frees the slot, and with it the reader's entry.
            for _ in 0..100 {
                crate::sleep(std::time::Duration::from_millis(1)).await;
                if let Some(entry) = register_file(writer.as_raw_fd()) {
                    if entry.index() == 0 {
                        return;
                    }
                }
            }
            panic!("the reader's entry was not freed after its read completed");
        });
    }
}
