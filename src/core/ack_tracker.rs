//! Per-update, per-secondary *sent* and *received* indicators (claims 7-9).
//!
//! The tracker covers a bounded window of update slots; slot `seq %
//! capacity` holds the update with that seq while it is in flight. Each slot
//! records the set of secondaries the update is sent to, and for every
//! secondary one *sent* and one *received* bit, kept in `AtomicU64` words so
//! that the tasks handling acks mark and test them without taking a lock.
//!
//! The caller (the primary's core) guarantees that at most `capacity` seqs
//! are live at once, which is what makes `seq % capacity` unambiguous.

use std::sync::atomic::{AtomicU64, Ordering};

/// Most secondaries one volume can have: a slot's set is one `u64` mask.
pub const MEMBERS_MAX: usize = 64;

const WORD_BITS: usize = 64;

/// Lock-free sent/received bitmaps over a window of update slots.
pub struct AckTracker {
    capacity: usize,
    member_count: usize,
    /// Per slot: bit `m` set when secondary `m` is in the update's set.
    set_masks: Box<[AtomicU64]>,
    /// `member_count` bitmaps of `capacity` bits, member-major.
    sent: Box<[AtomicU64]>,
    /// Same shape as `sent`.
    received: Box<[AtomicU64]>,
}

impl AckTracker {
    /// A tracker for `capacity` in-flight slots and `member_count`
    /// secondaries. `capacity` must be a power of two of at least 64: a
    /// slot is then found with a mask, where a division would cost more
    /// than the rest of an indicator's update.
    pub fn new(capacity: usize, member_count: usize) -> AckTracker {
        assert!(
            capacity >= WORD_BITS && capacity.is_power_of_two(),
            "capacity {capacity}"
        );
        assert!(member_count <= MEMBERS_MAX, "{member_count} members");
        let words = capacity / WORD_BITS * member_count;
        let zeroed = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>();
        AckTracker {
            capacity,
            member_count,
            set_masks: zeroed(capacity),
            sent: zeroed(words),
            received: zeroed(words),
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn slot(&self, seq: u64) -> usize {
        (seq & (self.capacity as u64 - 1)) as usize
    }

    fn bit(&self, member: usize, seq: u64) -> (usize, u64) {
        debug_assert!(member < self.member_count);
        let slot = self.slot(seq);
        let word = member * (self.capacity / WORD_BITS) + slot / WORD_BITS;
        (word, 1u64 << (slot % WORD_BITS))
    }

    /// Starts tracking `seq`, to be sent to the secondaries in `set_mask`.
    /// Every indicator of the slot starts cleared.
    pub fn begin(&self, seq: u64, set_mask: u64) {
        debug_assert!(self.member_count == MEMBERS_MAX || set_mask >> self.member_count == 0);
        for member in 0..self.member_count {
            let (word, bit) = self.bit(member, seq);
            self.sent[word].fetch_and(!bit, Ordering::Relaxed);
            self.received[word].fetch_and(!bit, Ordering::Relaxed);
        }
        // Release: a reader that sees the mask also sees the cleared bits.
        self.set_masks[self.slot(seq)].store(set_mask, Ordering::Release);
    }

    /// The set of secondaries `seq` is sent to.
    #[inline]
    pub fn set_mask(&self, seq: u64) -> u64 {
        self.set_masks[self.slot(seq)].load(Ordering::Acquire)
    }

    /// Claim 7: `member` has been handed `seq`.
    pub fn mark_sent(&self, member: usize, seq: u64) {
        let (word, bit) = self.bit(member, seq);
        self.sent[word].fetch_or(bit, Ordering::Release);
    }

    /// Claim 8: `member` acknowledged `seq`. Returns true when this ack made
    /// the update fully acknowledged (claim 9), so exactly one caller sees
    /// the transition.
    pub fn mark_received(&self, member: usize, seq: u64) -> bool {
        let (word, bit) = self.bit(member, seq);
        debug_assert!(
            self.sent[word].load(Ordering::Acquire) & bit != 0,
            "member {member} acked seq {seq} that was never sent to it"
        );
        let before = self.received[word].fetch_or(bit, Ordering::AcqRel);
        before & bit == 0 && self.is_fully_acked(seq)
    }

    /// True when `member`'s indicators for `seq` are both set.
    #[inline]
    pub fn is_acked_by(&self, member: usize, seq: u64) -> bool {
        let (word, bit) = self.bit(member, seq);
        self.sent[word].load(Ordering::Acquire) & bit != 0
            && self.received[word].load(Ordering::Acquire) & bit != 0
    }

    /// Claim 9: every secondary of the update's set has both its sent and
    /// its received indicator set. An update with an empty set is trivially
    /// acknowledged.
    #[inline]
    pub fn is_fully_acked(&self, seq: u64) -> bool {
        let mut mask = self.set_mask(seq);
        while mask != 0 {
            let member = mask.trailing_zeros() as usize;
            if !self.is_acked_by(member, seq) {
                return false;
            }
            mask &= mask - 1;
        }
        true
    }

    /// Forgets `member`'s indicators for `seq`, so that the update is sent
    /// again (after a reconnect) and counted only when acked again.
    pub fn reset_member(&self, member: usize, seq: u64) {
        let (word, bit) = self.bit(member, seq);
        self.sent[word].fetch_and(!bit, Ordering::Release);
        self.received[word].fetch_and(!bit, Ordering::Release);
    }

    /// Takes `member` out of `seq`'s set (it left the volume), which may make
    /// the update fully acknowledged.
    pub fn remove_from_set(&self, member: usize, seq: u64) {
        self.set_masks[self.slot(seq)].fetch_and(!(1u64 << member), Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_set_is_acked_at_once() {
        let tracker = AckTracker::new(64, 2);
        tracker.begin(7, 0);
        assert!(tracker.is_fully_acked(7));
    }

    #[test]
    fn sent_without_received_is_not_acked() {
        let tracker = AckTracker::new(64, 1);
        tracker.begin(1, 0b1);
        tracker.mark_sent(0, 1);
        assert!(!tracker.is_fully_acked(1));
        assert!(tracker.mark_received(0, 1));
        assert!(tracker.is_fully_acked(1));
    }

    #[test]
    fn reusing_a_slot_starts_clean() {
        let tracker = AckTracker::new(64, 1);
        tracker.begin(3, 0b1);
        tracker.mark_sent(0, 3);
        tracker.mark_received(0, 3);
        tracker.begin(3 + 64, 0b1);
        assert!(!tracker.is_fully_acked(3 + 64));
    }

    #[test]
    fn removing_the_last_missing_member_completes_the_set() {
        let tracker = AckTracker::new(64, 2);
        tracker.begin(5, 0b11);
        tracker.mark_sent(0, 5);
        tracker.mark_received(0, 5);
        assert!(!tracker.is_fully_acked(5));
        tracker.remove_from_set(1, 5);
        assert!(tracker.is_fully_acked(5));
    }

    #[derive(Debug, Clone)]
    struct Case {
        member_count: usize,
        /// Per update: its set mask.
        sets: Vec<u64>,
        /// Events: (update index, member), each ack preceded by its send.
        order: Vec<(usize, usize)>,
    }

    fn case() -> impl Strategy<Value = Case> {
        (1usize..=5, 1usize..=40).prop_flat_map(|(member_count, updates)| {
            let full = (1u64 << member_count) - 1;
            proptest::collection::vec(0..=full, updates).prop_flat_map(move |sets| {
                let mut pairs = Vec::new();
                for (index, mask) in sets.iter().enumerate() {
                    for member in 0..member_count {
                        if mask & (1 << member) != 0 {
                            pairs.push((index, member));
                        }
                    }
                }
                let sets = sets.clone();
                Just(pairs).prop_shuffle().prop_map(move |order| Case {
                    member_count,
                    sets: sets.clone(),
                    order,
                })
            })
        })
    }

    proptest! {
        /// An update is reported fully acknowledged exactly when every
        /// secondary of its set has acked it, never earlier, whatever the
        /// order the acks arrive in; the transition is reported exactly once.
        #[test]
        fn fully_acked_exactly_when_every_member_of_the_set_acked(case in case()) {
            let tracker = AckTracker::new(64, case.member_count);
            let first_seq = 1000u64;
            for (index, mask) in case.sets.iter().enumerate() {
                tracker.begin(first_seq + index as u64, *mask);
            }
            let mut acked = vec![0u64; case.sets.len()];
            let mut transitions = vec![0u32; case.sets.len()];
            for &(index, member) in &case.order {
                let seq = first_seq + index as u64;
                tracker.mark_sent(member, seq);
                prop_assert_eq!(tracker.is_fully_acked(seq), acked[index] == case.sets[index]);
                if tracker.mark_received(member, seq) {
                    transitions[index] += 1;
                }
                acked[index] |= 1 << member;
                for (other, mask) in case.sets.iter().enumerate() {
                    let expected = acked[other] == *mask;
                    prop_assert_eq!(tracker.is_fully_acked(first_seq + other as u64), expected);
                }
            }
            for (index, mask) in case.sets.iter().enumerate() {
                let expected_transitions = u32::from(*mask != 0);
                prop_assert_eq!(transitions[index], expected_transitions, "update {}", index);
            }
        }
    }
}
