//! Page-aligned buffers for O_DIRECT I/O.
//!
//! O_DIRECT requires the user buffer, the file offset and the length to be
//! aligned to the device's logical block size. We align every buffer to
//! [`PAGE_SIZE_BYTES`], which satisfies both 512- and 4096-byte devices, so a
//! buffer can go to the log, to a data copy or to a socket without a copy.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

mod pool;

pub use pool::{BufPool, PooledBuf, POOL_IDLE_BYTES_MAX};

/// Alignment and granularity of every O_DIRECT buffer.
pub const PAGE_SIZE_BYTES: usize = 4096;

/// A heap buffer, every byte initialised, whose start address is aligned to
/// [`PAGE_SIZE_BYTES`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>; moving
// it to another thread moves that ownership.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only permit reads of the owned allocation.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes, aligned to [`PAGE_SIZE_BYTES`]. `len`
    /// may be any size; O_DIRECT callers round it up themselves.
    pub fn zeroed(len: usize) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf {
                ptr: NonNull::dangling(),
                len: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size (len > 0) and a valid alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        AlignedBuf { ptr, len }
    }

    /// Allocates a buffer holding a copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> AlignedBuf {
        AlignedBuf::zeroed_around(bytes.len(), 0, bytes)
    }

    /// Allocates `len` bytes holding a copy of `bytes` at `offset` and
    /// zeroes elsewhere, writing each byte once: zeroing the whole buffer
    /// first would write a 1 MiB log record twice.
    pub fn zeroed_around(len: usize, offset: usize, bytes: &[u8]) -> AlignedBuf {
        let end = offset
            .checked_add(bytes.len())
            .filter(|&end| end <= len)
            .expect("the bytes fit in the buffer");
        if len == 0 {
            return AlignedBuf::zeroed(0);
        }
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size (len > 0) and a valid alignment.
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        // SAFETY: the allocation is `len` bytes long and ours alone; the
        // three ranges 0..offset, offset..end and end..len lie within it and
        // together initialise every byte before any reference to them is
        // made; `bytes` cannot overlap an allocation this fresh.
        unsafe {
            std::ptr::write_bytes(raw, 0, offset);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), raw.add(offset), bytes.len());
            std::ptr::write_bytes(raw.add(end), 0, len - end);
        }
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, PAGE_SIZE_BYTES).expect("buffer size overflows a Layout")
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, read-only.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to len initialised (zeroed at allocation) bytes
        // owned by self, or is dangling with len 0, which from_raw_parts allows.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: ptr was returned by alloc_zeroed with this same layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

impl compio::buf::IoBuf for AlignedBuf {
    fn as_init(&self) -> &[u8] {
        self.as_slice()
    }
}

impl compio::buf::IoBufMut for AlignedBuf {
    fn as_uninit(&mut self) -> &mut [std::mem::MaybeUninit<u8>] {
        as_uninit(self.as_mut_slice())
    }
}

impl compio::buf::SetLen for AlignedBuf {
    // Always fully initialised: a read has no length to record.
    unsafe fn set_len(&mut self, _len: usize) {}
}

/// `bytes` as memory an operation may fill.
pub(crate) fn as_uninit(bytes: &mut [u8]) -> &mut [std::mem::MaybeUninit<u8>] {
    // SAFETY: MaybeUninit<u8> has the layout of u8, and the slice stays
    // initialised: what is written through the result are bytes (the
    // kernel's, for a read), never uninitialised values.
    unsafe {
        std::slice::from_raw_parts_mut(
            bytes.as_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(),
            bytes.len(),
        )
    }
}

/// An immutable, reference-counted aligned payload: the one buffer an update's
/// data lives in on the primary, shared by the local write and every
/// secondary's send so that the payload is never copied per destination.
#[derive(Clone, Debug)]
pub struct SharedBuf {
    buf: Arc<AlignedBuf>,
    /// The payload is `buf[..length_bytes]`: a request buffer (ublk's) is
    /// sized for the largest request and shared as it is, not copied to fit.
    length_bytes: usize,
}

impl SharedBuf {
    /// Wraps a filled buffer; the payload is all of it.
    pub fn new(buf: AlignedBuf) -> SharedBuf {
        let length_bytes = buf.len();
        SharedBuf {
            buf: Arc::new(buf),
            length_bytes,
        }
    }

    /// Shares the first `length_bytes` of `buf`. The caller must not write
    /// to `buf` while this (or a clone) lives: [`Arc::get_mut`] refuses
    /// exactly then.
    pub fn prefix(buf: Arc<AlignedBuf>, length_bytes: usize) -> SharedBuf {
        assert!(
            length_bytes <= buf.len(),
            "payload of {length_bytes} bytes in a buffer of {}",
            buf.len()
        );
        SharedBuf { buf, length_bytes }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf.as_slice()[..self.length_bytes]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.length_bytes
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.length_bytes == 0
    }
}

impl compio::buf::IoBuf for SharedBuf {
    fn as_init(&self) -> &[u8] {
        self.as_slice()
    }
}

/// A log record's buffer on a secondary: one allocation holding the record
/// header and the payload, shared (on one thread) by the log write and the
/// apply to the copy, so the payload is not copied again once received. The
/// buffer goes back to its pool when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct RecordRef {
    /// The whole record, padded to a page multiple.
    pub buf: std::rc::Rc<PooledBuf>,
    /// Length of the payload inside it.
    pub length_bytes: u32,
}

impl RecordRef {
    /// The whole record's bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.buf.buf().as_slice()
    }

    /// The whole record's length in bytes.
    pub fn len(&self) -> usize {
        self.buf.buf().len()
    }

    /// True for a zero-length record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl compio::buf::IoBuf for RecordRef {
    fn as_init(&self) -> &[u8] {
        self.as_slice()
    }
}

// SAFETY: an aligned heap allocation of its own.
unsafe impl crate::ring::io::StableBuf for AlignedBuf {}
// SAFETY: an Arc of an aligned heap allocation.
unsafe impl crate::ring::io::StableBuf for SharedBuf {}
// SAFETY: an Rc of a pooled heap allocation.
unsafe impl crate::ring::io::StableBuf for RecordRef {}

/// Rounds `value` up to the next multiple of `align`, a power of two.
pub const fn round_up(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (value + align - 1) & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_and_zeroed() {
        for len in [1, 512, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.as_slice().as_ptr() as usize % PAGE_SIZE_BYTES, 0);
            assert!(buf.as_slice().iter().all(|&b| b == 0));
            assert_eq!(buf.len(), len);
        }
    }

    #[test]
    fn copy_from_keeps_the_bytes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        assert_eq!(AlignedBuf::copy_from(&data).as_slice(), &data[..]);
    }

    #[test]
    fn zeroed_around_puts_the_bytes_at_their_offset_and_zeroes_the_rest() {
        let data: Vec<u8> = (1..=100u8).collect();
        for (len, offset, bytes) in [
            (8192, 64, &data[..]),
            (100, 0, &data[..]),
            (164, 64, &data[..]),
            (4096, 4096, &data[..0]),
            (0, 0, &data[..0]),
        ] {
            let buf = AlignedBuf::zeroed_around(len, offset, bytes);
            let slice = buf.as_slice();
            assert_eq!(slice.len(), len);
            assert!(len == 0 || (slice.as_ptr() as usize).is_multiple_of(PAGE_SIZE_BYTES));
            assert!(slice[..offset].iter().all(|&b| b == 0));
            assert_eq!(&slice[offset..offset + bytes.len()], bytes);
            assert!(slice[offset + bytes.len()..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    #[should_panic(expected = "the bytes fit in the buffer")]
    fn zeroed_around_refuses_bytes_past_the_end() {
        AlignedBuf::zeroed_around(100, 64, &[1; 37]);
    }

    #[test]
    fn round_up_to_pages() {
        assert_eq!(round_up(0, 4096), 0);
        assert_eq!(round_up(1, 4096), 4096);
        assert_eq!(round_up(4096, 4096), 4096);
        assert_eq!(round_up(4160, 4096), 8192);
    }
}
