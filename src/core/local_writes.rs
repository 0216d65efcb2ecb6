//! The primary's local writes not yet finished, and which of them a new
//! write overlaps.
//!
//! Writes to the primary's own copy run concurrently, so two that overlap
//! must not: the later one waits until the earlier has finished, or the
//! copy could end with the older bytes. The core asks, for every write it
//! starts, whether any unfinished one overlaps it. A scan of them is as
//! long as the queue is deep (32 and more on a busy device), for an answer
//! that is almost always no. So each unfinished write also counts itself in
//! the buckets of the device it touches (64 KiB each, folded onto a fixed
//! number of counters): a write whose buckets all count zero overlaps none,
//! and only one that shares a bucket with an unfinished write scans them.

/// Bytes of the device per bucket.
const BUCKET_BYTES_SHIFT: u32 = 16;
/// Counters the buckets fold onto; a power of two. With 32 writes in flight
/// a 4 KiB write shares a counter with one of them about once in 128.
const BUCKETS: usize = 4096;

/// Where a local write not yet finished lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) seq: u64,
    pub(crate) offset_bytes: u64,
    /// One past its last byte; above `offset_bytes`.
    pub(crate) end_bytes: u64,
}

impl Extent {
    fn overlaps(&self, other: &Extent) -> bool {
        self.offset_bytes < other.end_bytes && other.offset_bytes < self.end_bytes
    }

    /// The counters of the buckets the extent touches: every counter once
    /// when it spans them all.
    fn counters(&self) -> impl Iterator<Item = usize> {
        let first = self.offset_bytes >> BUCKET_BYTES_SHIFT;
        let last = (self.end_bytes - 1) >> BUCKET_BYTES_SHIFT;
        let spanned = (last - first).min(BUCKETS as u64 - 1);
        (first..=first + spanned).map(|bucket| (bucket as usize) & (BUCKETS - 1))
    }
}

/// The unfinished local writes (started or waiting to start), in no order.
pub(crate) struct LocalWrites {
    extents: Vec<Extent>,
    /// Per counter, the extents in `extents` touching a bucket folded onto
    /// it.
    counts: Box<[u32]>,
}

impl LocalWrites {
    pub(crate) fn new() -> LocalWrites {
        LocalWrites {
            extents: Vec::new(),
            counts: vec![0; BUCKETS].into_boxed_slice(),
        }
    }

    /// Adds `extent`, a write newer than every one held; returns whether
    /// it overlaps one of them (and so must wait for it).
    pub(crate) fn insert(&mut self, extent: Extent) -> bool {
        debug_assert!(extent.offset_bytes < extent.end_bytes);
        debug_assert!(self.extents.iter().all(|held| held.seq < extent.seq));
        let mut shared = false;
        for counter in extent.counters() {
            shared |= self.counts[counter] != 0;
            self.counts[counter] += 1;
        }
        let overlaps = shared && self.extents.iter().any(|held| held.overlaps(&extent));
        self.extents.push(extent);
        overlaps
    }

    /// Removes the write of `seq`, which finished; returns where it landed.
    pub(crate) fn remove(&mut self, seq: u64) -> Extent {
        let index = self
            .extents
            .iter()
            .position(|extent| extent.seq == seq)
            .expect("a finished write was unfinished");
        let extent = self.extents.swap_remove(index);
        for counter in extent.counters() {
            self.counts[counter] -= 1;
        }
        extent
    }

    /// Whether a write older than `extent` overlaps it.
    pub(crate) fn overlapped_by_older(&self, extent: &Extent) -> bool {
        self.extents
            .iter()
            .any(|held| held.seq < extent.seq && held.overlaps(extent))
    }

    /// The unfinished writes newer than `written` that overlap it: those it
    /// may have been holding back.
    pub(crate) fn newer_overlapping(&self, written: &Extent) -> Vec<Extent> {
        self.extents
            .iter()
            .filter(|held| held.seq > written.seq && held.overlaps(written))
            .copied()
            .collect()
    }

    /// The oldest unfinished write's seq.
    pub(crate) fn oldest_seq(&self) -> Option<u64> {
        self.extents.iter().map(|extent| extent.seq).min()
    }

    /// Every unfinished write's seq, in no order.
    pub(crate) fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.extents.iter().map(|extent| extent.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn extent(seq: u64, offset_bytes: u64, length_bytes: u64) -> Extent {
        Extent {
            seq,
            offset_bytes,
            end_bytes: offset_bytes + length_bytes,
        }
    }

    #[test]
    fn writes_sharing_a_bucket_overlap_only_where_their_bytes_do() {
        let mut writes = LocalWrites::new();
        assert!(!writes.insert(extent(1, 0, 4096)));
        assert!(
            !writes.insert(extent(2, 4096, 4096)),
            "adjacent, same bucket"
        );
        assert!(writes.insert(extent(3, 4095, 2)), "one byte of each");
        writes.remove(1);
        assert!(
            !writes.insert(extent(4, 0, 2048)),
            "its only overlap finished"
        );
    }

    #[test]
    fn writes_a_whole_fold_apart_share_counters_but_not_bytes() {
        let fold_bytes = (BUCKETS as u64) << BUCKET_BYTES_SHIFT;
        let mut writes = LocalWrites::new();
        assert!(!writes.insert(extent(1, 0, 4096)));
        assert!(!writes.insert(extent(2, fold_bytes, 4096)));
        assert!(writes.insert(extent(3, fold_bytes + 4095, 1)));
    }

    #[test]
    fn a_write_spanning_more_than_every_bucket_counts_each_once() {
        let fold_bytes = (BUCKETS as u64) << BUCKET_BYTES_SHIFT;
        let mut writes = LocalWrites::new();
        assert!(!writes.insert(extent(1, 4096, 3 * fold_bytes)));
        assert!(writes.counts.iter().all(|&count| count == 1));
        assert!(writes.insert(extent(2, 2 * fold_bytes, 4096)));
        writes.remove(1);
        writes.remove(2);
        assert!(writes.counts.iter().all(|&count| count == 0));
    }

    proptest! {
        /// The counters never hide an overlap: every answer is the one a
        /// scan of all the unfinished writes gives, and once every write
        /// finished the counters are back at zero.
        #[test]
        fn answers_match_a_scan_of_every_unfinished_write(
            operations in prop::collection::vec(
                (0u64..4 << 20, 1u64..=256, any::<bool>(), any::<prop::sample::Index>()),
                1..200,
            ),
        ) {
            let fold_bytes = (BUCKETS as u64) << BUCKET_BYTES_SHIFT;
            let mut writes = LocalWrites::new();
            let mut held: Vec<Extent> = Vec::new();
            for (seq, (offset_sectors, length_sectors, finish, which)) in
                (1u64..).zip(operations)
            {
                if finish && !held.is_empty() {
                    let gone = held.swap_remove(which.index(held.len()));
                    prop_assert_eq!(writes.remove(gone.seq), gone);
                    continue;
                }
                // Offsets past one fold of the counters, so that folded
                // buckets meet.
                let offset_bytes = (offset_sectors * 512) % (2 * fold_bytes);
                let new = extent(seq, offset_bytes, length_sectors * 512);
                let expected = held.iter().any(|earlier| earlier.overlaps(&new));
                prop_assert_eq!(writes.insert(new), expected);
                held.push(new);
                let oldest = held.iter().map(|extent| extent.seq).min();
                prop_assert_eq!(writes.oldest_seq(), oldest);
            }
            for extent in held {
                writes.remove(extent.seq);
            }
            prop_assert!(writes.counts.iter().all(|&count| count == 0));
        }
    }
}
