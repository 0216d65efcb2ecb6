//! Reuse of aligned buffers on one thread.
//!
//! A secondary takes a buffer for every record it receives and lets it go
//! once the record is written and applied. Left to the allocator, buffers of
//! a megabyte go back to the kernel and come back as fresh pages that the
//! kernel zeroes again at first touch: in the 1 MiB sequential benchmark
//! that page clearing and faulting took about 3% of both cores
//! (BENCHMARKS.md). The pool keeps released buffers for the next record of
//! the same size instead, up to a byte budget.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use super::AlignedBuf;

/// Default most bytes of idle buffers a pool keeps.
pub const POOL_IDLE_BYTES_MAX: usize = 64 << 20;

/// Idle aligned buffers by exact length, shared on one thread through `Rc`.
#[derive(Debug)]
pub struct BufPool {
    idle: RefCell<HashMap<usize, Vec<AlignedBuf>>>,
    idle_bytes: Cell<usize>,
    idle_bytes_max: usize,
}

impl BufPool {
    /// A pool keeping at most `idle_bytes_max` bytes of idle buffers.
    pub fn new(idle_bytes_max: usize) -> Rc<BufPool> {
        Rc::new(BufPool {
            idle: RefCell::new(HashMap::new()),
            idle_bytes: Cell::new(0),
            idle_bytes_max,
        })
    }

    /// A buffer of exactly `len` bytes, page-aligned. A reused buffer holds
    /// whatever its last user left in it: the caller writes every byte it
    /// hands on.
    pub fn take(self: &Rc<Self>, len: usize) -> PooledBuf {
        let reused = self.idle.borrow_mut().get_mut(&len).and_then(Vec::pop);
        let buf = match reused {
            Some(buf) => {
                self.idle_bytes.set(self.idle_bytes.get() - len);
                buf
            }
            None => AlignedBuf::zeroed(len),
        };
        PooledBuf {
            buf: Some(buf),
            pool: self.clone(),
        }
    }

    /// Bytes held in idle buffers now.
    pub fn idle_bytes(&self) -> usize {
        self.idle_bytes.get()
    }

    fn give_back(&self, buf: AlignedBuf) {
        let len = buf.len();
        if len == 0 || self.idle_bytes.get() + len > self.idle_bytes_max {
            return;
        }
        self.idle_bytes.set(self.idle_bytes.get() + len);
        self.idle.borrow_mut().entry(len).or_default().push(buf);
    }
}

/// A buffer taken from a [`BufPool`]; it goes back to the pool when dropped.
#[derive(Debug)]
pub struct PooledBuf {
    /// Always `Some` until dropped.
    buf: Option<AlignedBuf>,
    pool: Rc<BufPool>,
}

impl PooledBuf {
    /// The buffer.
    pub fn buf(&self) -> &AlignedBuf {
        self.buf
            .as_ref()
            .expect("a pooled buffer is present until dropped")
    }

    /// The buffer, writable.
    pub fn buf_mut(&mut self) -> &mut AlignedBuf {
        self.buf
            .as_mut()
            .expect("a pooled buffer is present until dropped")
    }
}

impl compio::buf::IoBuf for PooledBuf {
    fn as_init(&self) -> &[u8] {
        self.buf().as_slice()
    }
}

impl compio::buf::IoBufMut for PooledBuf {
    fn as_uninit(&mut self) -> &mut [std::mem::MaybeUninit<u8>] {
        super::as_uninit(self.buf_mut().as_mut_slice())
    }
}

impl compio::buf::SetLen for PooledBuf {
    // Always fully initialised: a read has no length to record.
    unsafe fn set_len(&mut self, _len: usize) {}
}

// SAFETY: an aligned heap allocation, lent by a pool.
unsafe impl crate::ring::io::StableBuf for PooledBuf {}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give_back(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_buffer_is_reused_for_the_same_length_only() {
        let pool = BufPool::new(1 << 20);
        let mut first = pool.take(8192);
        first.buf_mut().as_mut_slice().fill(7);
        let address = first.buf().as_slice().as_ptr();
        drop(first);
        assert_eq!(pool.idle_bytes(), 8192);
        let other_length = pool.take(4096);
        assert_ne!(other_length.buf().as_slice().as_ptr(), address);
        let again = pool.take(8192);
        assert_eq!(again.buf().as_slice().as_ptr(), address);
        assert_eq!(again.buf().len(), 8192);
        assert_eq!(pool.idle_bytes(), 0);
        assert_eq!(again.buf().as_slice().as_ptr() as usize % 4096, 0);
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_budget() {
        let pool = BufPool::new(3 * 4096);
        let taken: Vec<PooledBuf> = (0..5).map(|_| pool.take(4096)).collect();
        drop(taken);
        assert_eq!(pool.idle_bytes(), 3 * 4096);
    }
}
