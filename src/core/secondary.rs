//! The secondary's log state machine (claims 1-4).
//!
//! Updates arrive in seq order. Each is placed at the log's tail (the ring
//! wraps; a record may straddle the end), written, acknowledged, and applied
//! to the node's copy strictly in seq order. When the primary says every
//! update up to N is all-acked, the records up to N are cleared by moving the
//! start-of-log pointer past them (claim 3) to the location of the next
//! update to clear (claim 4).
//!
//! Ordering rules held here:
//! - Acks are cumulative over the contiguous prefix of written records, so
//!   an acked record never lies after a torn one that a recovery scan would
//!   stop at.
//! - With `sync_every_ack`, or for a FUA update or a flush, the ack waits
//!   for an fdatasync of the log; concurrent records share one sync.
//! - Applies run concurrently (up to [`APPLY_IN_FLIGHT_MAX`]), issued in seq
//!   order; an update that overlaps one still being applied waits for it,
//!   so overlapping updates reach the copy in seq order. `applied_seq` is
//!   the contiguous prefix of finished applies.
//! - The start-of-log pointer moves past a record only when the record is
//!   all-acked, applied, and the copy has been fdatasync'd since; and ring
//!   space is reused only after that pointer is persisted.

use std::collections::VecDeque;

use thiserror::Error;

/// Alignment and granularity of records in the ring (the log format's,
/// FORMAT.md).
pub const RECORD_ALIGN_BYTES: u64 = crate::wal::format::LOG_ALIGN_BYTES;
/// Most applies to the copy in flight at once. Applied one at a time, a
/// secondary took about 20k 4 KiB updates a second at best, fewer than a
/// primary sends at queue depth 32: its log filled and stalled the primary.
pub const APPLY_IN_FLIGHT_MAX: u64 = 32;

/// Size of the record holding a payload of `length_bytes`: the log
/// format's own measure, which the primary's flow control and this state
/// machine's ring accounting must share with the bytes actually written.
pub use crate::wal::format::record_size_bytes;

/// Configuration of one secondary's log and copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecondaryLimits {
    /// Bytes of the ring (the log file less its header page).
    pub ring_len_bytes: u64,
    /// fdatasync the log before every ack.
    pub sync_every_ack: bool,
    /// Clear at least this often while there is something to clear.
    pub clear_interval_ms: u64,
    /// Size of the volume, for checking offsets.
    pub volume_size_bytes: u64,
    /// Offsets and lengths are multiples of this.
    pub block_size_bytes: u32,
    /// Largest payload.
    pub write_max_bytes: u32,
}

/// Where the log stood after the recovery scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPosition {
    /// Epoch of the log.
    pub epoch: u64,
    /// Persisted start-of-log pointer (ring offset).
    pub start_offset: u64,
    /// Seq of the record at `start_offset`.
    pub start_seq: u64,
    /// Ring offset just past the last valid record.
    pub tail_offset: u64,
    /// Seq the next record will have.
    pub next_seq: u64,
}

/// The fields of an incoming update that the state machine checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncomingUpdate {
    /// Seq; must be the log's next.
    pub seq: u64,
    /// Epoch; must be the log's.
    pub epoch: u64,
    /// Byte offset in the volume.
    pub offset_bytes: u64,
    /// Payload length.
    pub length_bytes: u32,
    /// Acked only once durable.
    pub fua: bool,
    /// The primary's all-acked point, piggybacked.
    pub all_acked_seq: u64,
}

/// A record the recovery scan found in the log (already applied and synced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveredRecord {
    /// Its seq.
    pub seq: u64,
    /// Where it starts in the ring.
    pub ring_offset: u64,
    /// Its size in the ring.
    pub size_bytes: u64,
}

/// An update that cannot be taken: the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UpdateError {
    /// Seqs must arrive without gaps.
    #[error("update seq {got} arrived when seq {expected} was expected")]
    OutOfOrder {
        /// Expected seq.
        expected: u64,
        /// Received seq.
        got: u64,
    },
    /// From an older primary.
    #[error("update of epoch {got} is stale: this log is at epoch {current}")]
    StaleEpoch {
        /// The log's epoch.
        current: u64,
        /// The update's epoch.
        got: u64,
    },
    /// Past the end of the volume, misaligned or too large.
    #[error("update at offset {offset_bytes} of {length_bytes} bytes does not fit the volume ({volume_size_bytes} bytes, {block_size_bytes}-byte blocks, at most {write_max_bytes} bytes)")]
    OutOfRange {
        /// Offset.
        offset_bytes: u64,
        /// Length.
        length_bytes: u32,
        /// Volume size.
        volume_size_bytes: u64,
        /// Block size.
        block_size_bytes: u32,
        /// Largest update.
        write_max_bytes: u32,
    },
    /// The all-acked point can never pass what was appended.
    #[error("all-acked seq {all_acked_seq} is beyond the last appended seq {last_seq}")]
    AllAckedBeyondLog {
        /// Received all-acked point.
        all_acked_seq: u64,
        /// Last appended seq.
        last_seq: u64,
    },
}

/// The outcome of offering an update.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum Offer<P> {
    /// Taken; actions follow.
    Accepted,
    /// The ring has no room until the start-of-log pointer moves: stop
    /// reading from the primary and offer the update again after
    /// [`Action::StartPersisted`]-driven progress (the payload comes back).
    LogFull(P),
}

/// What the driver must do; poll after every event until `None`.
#[derive(Debug)]
pub enum Action<P> {
    /// Write the record to the ring, then report [`Secondary::record_written`].
    WriteRecord {
        /// Seq.
        seq: u64,
        /// Ring offset (the record may wrap past the ring's end).
        ring_offset: u64,
        /// Record size in bytes.
        size_bytes: u64,
        /// The record's buffer.
        payload: P,
    },
    /// fdatasync the log, then report [`Secondary::log_synced`].
    SyncLog {
        /// Every record up to here was written when asked.
        through_seq: u64,
    },
    /// Send a cumulative ack to the primary.
    SendAck {
        /// Every update up to here is in the log.
        logged_seq: u64,
        /// Every update up to here is durable in the log.
        durable_seq: u64,
        /// Every update up to here is cleared: its ring space is free, and the
        /// primary may send that much more.
        cleared_seq: u64,
    },
    /// Apply the update to the copy, then report [`Secondary::applied`].
    Apply {
        /// Seq.
        seq: u64,
        /// Byte offset in the volume.
        offset_bytes: u64,
        /// The record's buffer.
        payload: P,
    },
    /// fdatasync the copy, then report [`Secondary::copy_synced`].
    SyncCopy {
        /// Every update up to here was applied when asked.
        through_seq: u64,
    },
    /// Persist the start-of-log pointer (claim 3), then report
    /// [`Secondary::start_persisted`].
    PersistStart {
        /// Ring offset of the next record to clear (claim 4).
        start_offset: u64,
        /// Its seq (the next seq to append if the log becomes empty).
        start_seq: u64,
    },
}

#[derive(Debug)]
struct Record<P> {
    seq: u64,
    ring_offset: u64,
    size_bytes: u64,
    offset_bytes: u64,
    length_bytes: u32,
    /// Held until written and applied.
    payload: Option<P>,
    written: bool,
    applied: bool,
}

/// The secondary's state machine.
pub struct Secondary<P> {
    limits: SecondaryLimits,
    epoch: u64,
    /// Records between the persisted start and the tail, in seq order.
    records: VecDeque<Record<P>>,
    start_offset: u64,
    start_seq: u64,
    tail_offset: u64,
    next_seq: u64,
    used_bytes: u64,
    logged_seq: u64,
    durable_seq: u64,
    sync_in_flight: Option<u64>,
    /// Highest seq a flush or FUA asked to be durable.
    durable_wanted_seq: u64,
    applied_seq: u64,
    /// Highest seq whose apply was issued; those after `applied_seq` up to
    /// here not yet marked applied are in flight.
    apply_issued_seq: u64,
    copy_synced_seq: u64,
    all_acked_seq: u64,
    clear_in_flight: Option<ClearStep>,
    last_clear_ms: u64,
    waiting_for_space: bool,
    acked: (u64, u64, u64),
    now_ms: u64,
    actions: VecDeque<Action<P>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClearStep {
    SyncingCopy,
    Persisting { start_seq: u64 },
}

impl<P: Clone> Secondary<P> {
    /// A secondary whose log, after recovery, stands at `position`, every
    /// record in it already applied and synced to the copy.
    pub fn new(
        limits: SecondaryLimits,
        position: LogPosition,
        recovered: &[RecoveredRecord],
        now_ms: u64,
    ) -> Secondary<P> {
        assert!(
            limits.ring_len_bytes.is_multiple_of(RECORD_ALIGN_BYTES) && limits.ring_len_bytes > 0
        );
        assert!(position.start_seq >= 1 && position.next_seq >= position.start_seq);
        assert!(
            position.start_offset < limits.ring_len_bytes
                && position.tail_offset < limits.ring_len_bytes
        );
        let records: VecDeque<Record<P>> = recovered
            .iter()
            .map(|recovered| Record {
                seq: recovered.seq,
                ring_offset: recovered.ring_offset,
                size_bytes: recovered.size_bytes,
                offset_bytes: 0,
                length_bytes: 0,
                payload: None,
                written: true,
                applied: true,
            })
            .collect();
        assert_eq!(
            records.len() as u64,
            position.next_seq - position.start_seq,
            "recovered records cover start..next"
        );
        let used_bytes = records.iter().map(|record| record.size_bytes).sum();
        assert!(used_bytes <= limits.ring_len_bytes);
        let last = position.next_seq - 1;
        Secondary {
            limits,
            epoch: position.epoch,
            records,
            start_offset: position.start_offset,
            start_seq: position.start_seq,
            tail_offset: position.tail_offset,
            next_seq: position.next_seq,
            used_bytes,
            logged_seq: last,
            durable_seq: last,
            sync_in_flight: None,
            durable_wanted_seq: 0,
            applied_seq: last,
            apply_issued_seq: last,
            copy_synced_seq: last,
            all_acked_seq: position.start_seq - 1,
            clear_in_flight: None,
            last_clear_ms: now_ms,
            waiting_for_space: false,
            acked: (0, 0, 0),
            now_ms,
            actions: VecDeque::new(),
        }
    }

    /// The next action for the driver, if any.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action<P>> {
        self.actions.pop_front()
    }

    /// The log's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Seq of the oldest record not yet cleared (the start-of-log pointer's).
    pub fn start_seq(&self) -> u64 {
        self.start_seq
    }

    /// Ring offset of the persisted start-of-log pointer.
    pub fn start_offset(&self) -> u64 {
        self.start_offset
    }

    /// Seq the next update must have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Every record up to this seq is written to the log (not necessarily
    /// synced).
    pub fn logged_seq(&self) -> u64 {
        self.logged_seq
    }

    /// Highest seq applied to the copy.
    pub fn applied_seq(&self) -> u64 {
        self.applied_seq
    }

    /// Highest all-acked seq heard from the primary.
    pub fn all_acked_seq(&self) -> u64 {
        self.all_acked_seq
    }

    /// Bytes of the ring held by records not yet cleared.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// True when nothing is in flight: every record written, applied and
    /// acked, and no sync, apply or clear running.
    pub fn is_idle(&self) -> bool {
        self.sync_in_flight.is_none()
            && self.apply_issued_seq == self.applied_seq
            && self.clear_in_flight.is_none()
            && self.applied_seq + 1 == self.next_seq
            && self.logged_seq + 1 == self.next_seq
    }

    /// Adopts a newer primary's epoch (from its Hello). The caller persists it.
    pub fn set_epoch(&mut self, epoch: u64) {
        assert!(epoch >= self.epoch, "epochs never go back");
        self.epoch = epoch;
    }

    /// A new primary connection: the next ack goes out even if unchanged, so
    /// that the new primary learns where this log stands.
    pub fn connection_started(&mut self) {
        self.acked = (0, 0, 0);
    }

    fn set_now(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// Offers the next update. `payload` is the record buffer the driver
    /// fills (header and data) and writes.
    pub fn offer_update(
        &mut self,
        update: IncomingUpdate,
        payload: P,
        now_ms: u64,
    ) -> Result<Offer<P>, UpdateError> {
        let IncomingUpdate {
            seq,
            epoch,
            offset_bytes,
            length_bytes,
            fua,
            all_acked_seq,
        } = update;
        self.set_now(now_ms);
        if epoch != self.epoch {
            return Err(UpdateError::StaleEpoch {
                current: self.epoch,
                got: epoch,
            });
        }
        if seq != self.next_seq {
            return Err(UpdateError::OutOfOrder {
                expected: self.next_seq,
                got: seq,
            });
        }
        let limits = self.limits;
        let block = u64::from(limits.block_size_bytes);
        let end = offset_bytes.checked_add(u64::from(length_bytes));
        if length_bytes == 0
            || length_bytes > limits.write_max_bytes
            || !offset_bytes.is_multiple_of(block)
            || !u64::from(length_bytes).is_multiple_of(block)
            || end.is_none_or(|end| end > limits.volume_size_bytes)
        {
            return Err(UpdateError::OutOfRange {
                offset_bytes,
                length_bytes,
                volume_size_bytes: limits.volume_size_bytes,
                block_size_bytes: limits.block_size_bytes,
                write_max_bytes: limits.write_max_bytes,
            });
        }
        // The piggybacked all-acked point may only cover what came before.
        self.note_all_acked(all_acked_seq, seq - 1)?;
        let size_bytes = record_size_bytes(length_bytes);
        if self.used_bytes + size_bytes > limits.ring_len_bytes {
            self.waiting_for_space = true;
            self.progress();
            return Ok(Offer::LogFull(payload));
        }
        self.waiting_for_space = false;
        let ring_offset = self.tail_offset;
        self.tail_offset = (self.tail_offset + size_bytes) % limits.ring_len_bytes;
        self.used_bytes += size_bytes;
        self.next_seq += 1;
        self.records.push_back(Record {
            seq,
            ring_offset,
            size_bytes,
            offset_bytes,
            length_bytes,
            payload: Some(payload.clone()),
            written: false,
            applied: false,
        });
        if fua {
            self.durable_wanted_seq = self.durable_wanted_seq.max(seq);
        }
        self.actions.push_back(Action::WriteRecord {
            seq,
            ring_offset,
            size_bytes,
            payload,
        });
        self.progress();
        Ok(Offer::Accepted)
    }

    fn note_all_acked(&mut self, all_acked_seq: u64, last_seq: u64) -> Result<(), UpdateError> {
        if all_acked_seq > last_seq {
            return Err(UpdateError::AllAckedBeyondLog {
                all_acked_seq,
                last_seq,
            });
        }
        self.all_acked_seq = self.all_acked_seq.max(all_acked_seq);
        Ok(())
    }

    /// Claim 2: the primary's notification that every update up to `seq` is
    /// acknowledged by all; those records may now be cleared.
    pub fn all_acked(&mut self, seq: u64, now_ms: u64) -> Result<(), UpdateError> {
        self.set_now(now_ms);
        self.note_all_acked(seq, self.next_seq - 1)?;
        self.progress();
        Ok(())
    }

    /// The primary asks for every update up to `seq` to be durable.
    pub fn flush_requested(&mut self, seq: u64, now_ms: u64) {
        self.set_now(now_ms);
        // The stream is ordered, so every update the flush covers has
        // arrived already; the sync waits until they are all written.
        self.durable_wanted_seq = self.durable_wanted_seq.max(seq);
        if self.durable_seq >= seq {
            // Durable already: answer at once, even with an Ack sent before,
            // since the primary may not have taken that one in (a restarted
            // primary reads a log back before it reads acks).
            self.acked = (0, 0, 0);
        }
        self.progress();
    }

    fn record_mut(&mut self, seq: u64) -> &mut Record<P> {
        let index = seq
            .checked_sub(self.start_seq)
            .expect("seq of a live record") as usize;
        let record = &mut self.records[index];
        debug_assert_eq!(record.seq, seq);
        record
    }

    /// The record write finished. An error is fatal to the node: the log's
    /// content is unknown and must not be guessed.
    pub fn record_written(&mut self, seq: u64, now_ms: u64) {
        self.set_now(now_ms);
        let record = self.record_mut(seq);
        assert!(!record.written, "record {seq} written twice");
        record.written = true;
        if record.applied {
            record.payload = None;
        }
        self.logged_seq = self.contiguous_through(self.logged_seq, |record| record.written);
        self.progress();
    }

    /// The last seq of the run of records after `seq` that are `done`
    /// (`seq` itself if the next one is not): how far a cumulative point
    /// advances once an out-of-order completion fills a gap.
    fn contiguous_through(&self, seq: u64, done: impl Fn(&Record<P>) -> bool) -> u64 {
        let first = (seq + 1 - self.start_seq) as usize;
        seq + self
            .records
            .range(first..)
            .take_while(|record| done(record))
            .count() as u64
    }

    /// The log's fdatasync finished.
    pub fn log_synced(&mut self, through_seq: u64, now_ms: u64) {
        self.set_now(now_ms);
        assert_eq!(self.sync_in_flight, Some(through_seq));
        self.sync_in_flight = None;
        self.durable_seq = self.durable_seq.max(through_seq);
        self.progress();
    }

    /// The update was applied to the copy.
    pub fn applied(&mut self, seq: u64, now_ms: u64) {
        self.set_now(now_ms);
        assert!(
            self.applied_seq < seq && seq <= self.apply_issued_seq,
            "apply of seq {seq} reported, in flight are {}..={}",
            self.applied_seq + 1,
            self.apply_issued_seq
        );
        let record = self.record_mut(seq);
        assert!(!record.applied, "record {seq} applied twice");
        record.applied = true;
        if record.written {
            record.payload = None;
        }
        self.applied_seq = self.contiguous_through(self.applied_seq, |record| record.applied);
        self.progress();
    }

    /// The copy's fdatasync finished.
    pub fn copy_synced(&mut self, through_seq: u64, now_ms: u64) {
        self.set_now(now_ms);
        assert_eq!(self.clear_in_flight, Some(ClearStep::SyncingCopy));
        self.clear_in_flight = None;
        self.copy_synced_seq = self.copy_synced_seq.max(through_seq);
        self.progress();
    }

    /// The start-of-log pointer asked for is persisted: the ring space
    /// before it may be reused.
    pub fn start_persisted(&mut self, now_ms: u64) {
        self.set_now(now_ms);
        let Some(ClearStep::Persisting { start_seq }) = self.clear_in_flight else {
            panic!("start persisted while none was asked for");
        };
        self.clear_in_flight = None;
        while self
            .records
            .front()
            .is_some_and(|record| record.seq < start_seq)
        {
            let record = self.records.pop_front().expect("front exists");
            self.used_bytes -= record.size_bytes;
        }
        self.start_seq = start_seq;
        self.start_offset = self
            .records
            .front()
            .map_or(self.tail_offset, |record| record.ring_offset);
        self.last_clear_ms = self.now_ms;
        self.progress();
    }

    /// When [`Secondary::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Option<u64> {
        (self.clearable_seq() >= self.start_seq && self.clear_in_flight.is_none())
            .then_some(self.last_clear_ms + self.limits.clear_interval_ms)
    }

    /// Time has passed.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.set_now(now_ms);
        self.progress();
    }

    fn progress(&mut self) {
        self.request_sync();
        self.send_ack();
        self.apply_next();
        self.clear();
    }

    fn request_sync(&mut self) {
        if self.sync_in_flight.is_some() || self.logged_seq <= self.durable_seq {
            return;
        }
        let wanted = self.limits.sync_every_ack || self.durable_wanted_seq > self.durable_seq;
        // A flush for seqs not yet logged waits for them: one sync then
        // covers them all (group commit).
        let covered = self.limits.sync_every_ack
            || self.logged_seq >= self.durable_wanted_seq.min(self.next_seq - 1);
        if wanted && covered {
            self.sync_in_flight = Some(self.logged_seq);
            self.actions.push_back(Action::SyncLog {
                through_seq: self.logged_seq,
            });
        }
    }

    fn send_ack(&mut self) {
        let logged = if self.limits.sync_every_ack {
            self.durable_seq
        } else {
            self.logged_seq
        };
        let ack = (logged, self.durable_seq, self.start_seq - 1);
        if ack != self.acked {
            self.acked = ack;
            self.actions.push_back(Action::SendAck {
                logged_seq: ack.0,
                durable_seq: ack.1,
                cleared_seq: ack.2,
            });
        }
    }

    fn apply_next(&mut self) {
        while self.apply_issued_seq + 1 < self.next_seq
            && self.apply_issued_seq - self.applied_seq < APPLY_IN_FLIGHT_MAX
        {
            let seq = self.apply_issued_seq + 1;
            let first = (self.applied_seq + 1 - self.start_seq) as usize;
            let index = (seq - self.start_seq) as usize;
            let record = &self.records[index];
            let (start, end) = record_range(record);
            let overlaps_one_in_flight = self.records.range(first..index).any(|earlier| {
                let (earlier_start, earlier_end) = record_range(earlier);
                !earlier.applied && earlier_start < end && start < earlier_end
            });
            if overlaps_one_in_flight {
                // Issued only once the earlier one finished, so the copy
                // ends with the later update's bytes.
                return;
            }
            let offset_bytes = record.offset_bytes;
            let payload = record
                .payload
                .clone()
                .expect("an unapplied record holds its payload");
            self.apply_issued_seq = seq;
            self.actions.push_back(Action::Apply {
                seq,
                offset_bytes,
                payload,
            });
        }
    }

    /// Records up to this seq may be cleared: all-acked, applied, logged.
    fn clearable_seq(&self) -> u64 {
        self.all_acked_seq
            .min(self.applied_seq)
            .min(self.logged_seq)
    }

    fn clear(&mut self) {
        if self.clear_in_flight.is_some() {
            return;
        }
        let clearable = self.clearable_seq();
        if clearable < self.start_seq {
            return;
        }
        let urgent = self.waiting_for_space || self.used_bytes * 2 > self.limits.ring_len_bytes;
        if !urgent && self.now_ms < self.last_clear_ms + self.limits.clear_interval_ms {
            return;
        }
        if self.copy_synced_seq < clearable {
            // Claim 3's pointer must never pass a record whose data is not
            // durably in the copy: sync the copy first.
            self.clear_in_flight = Some(ClearStep::SyncingCopy);
            self.actions.push_back(Action::SyncCopy {
                through_seq: self.applied_seq,
            });
            return;
        }
        let start_seq = clearable + 1;
        let index = (start_seq - self.start_seq) as usize;
        let start_offset = self
            .records
            .get(index)
            .map_or(self.tail_offset, |record| record.ring_offset);
        self.clear_in_flight = Some(ClearStep::Persisting { start_seq });
        self.actions.push_back(Action::PersistStart {
            start_offset,
            start_seq,
        });
    }
}

/// The bytes of the volume a record's update covers.
fn record_range<P>(record: &Record<P>) -> (u64, u64) {
    (
        record.offset_bytes,
        record.offset_bytes + u64::from(record.length_bytes),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const RING: u64 = 64 * 4096;

    fn limits(sync_every_ack: bool) -> SecondaryLimits {
        SecondaryLimits {
            ring_len_bytes: RING,
            sync_every_ack,
            clear_interval_ms: 50,
            volume_size_bytes: 1 << 30,
            block_size_bytes: 4096,
            write_max_bytes: 1 << 20,
        }
    }

    fn empty(sync_every_ack: bool) -> Secondary<u64> {
        let position = LogPosition {
            epoch: 1,
            start_offset: 0,
            start_seq: 1,
            tail_offset: 0,
            next_seq: 1,
        };
        Secondary::new(limits(sync_every_ack), position, &[], 0)
    }

    fn upd(
        seq: u64,
        epoch: u64,
        offset_bytes: u64,
        length_bytes: u32,
        fua: bool,
        all_acked_seq: u64,
    ) -> IncomingUpdate {
        IncomingUpdate {
            seq,
            epoch,
            offset_bytes,
            length_bytes,
            fua,
            all_acked_seq,
        }
    }

    fn drain(node: &mut Secondary<u64>) -> Vec<Action<u64>> {
        std::iter::from_fn(|| node.poll_action()).collect()
    }

    fn offer(
        node: &mut Secondary<u64>,
        seq: u64,
        length: u32,
        fua: bool,
        all_acked: u64,
    ) -> Offer<u64> {
        node.offer_update(upd(seq, 1, 0, length, fua, all_acked), seq, 0)
            .expect("valid update")
    }

    #[test]
    fn acks_are_cumulative_over_written_records() {
        let mut node = empty(false);
        for seq in 1..=3 {
            assert_eq!(offer(&mut node, seq, 4096, false, 0), Offer::Accepted);
        }
        drain(&mut node);
        node.record_written(2, 0);
        node.record_written(3, 0);
        assert!(
            !drain(&mut node)
                .iter()
                .any(|action| matches!(action, Action::SendAck { .. })),
            "records 2 and 3 must not be acked while record 1 is unwritten"
        );
        node.record_written(1, 0);
        let actions = drain(&mut node);
        assert!(actions.iter().any(|action| matches!(
            action,
            Action::SendAck {
                logged_seq: 3,
                durable_seq: 0,
                ..
            }
        )));
    }

    #[test]
    fn fua_is_acked_durable_only_after_one_sync() {
        let mut node = empty(false);
        let _ = offer(&mut node, 1, 4096, false, 0);
        let _ = offer(&mut node, 2, 4096, true, 0);
        drain(&mut node);
        node.record_written(1, 0);
        node.record_written(2, 0);
        let actions = drain(&mut node);
        assert!(actions
            .iter()
            .any(|action| matches!(action, Action::SyncLog { through_seq: 2 })));
        node.log_synced(2, 0);
        let actions = drain(&mut node);
        assert!(actions.iter().any(|action| matches!(
            action,
            Action::SendAck {
                logged_seq: 2,
                durable_seq: 2,
                ..
            }
        )));
    }

    #[test]
    fn sync_every_ack_acks_only_durable_records() {
        let mut node = empty(true);
        let _ = offer(&mut node, 1, 4096, false, 0);
        drain(&mut node);
        node.record_written(1, 0);
        let actions = drain(&mut node);
        assert!(!actions
            .iter()
            .any(|action| matches!(action, Action::SendAck { logged_seq: 1, .. })));
        node.log_synced(1, 0);
        let actions = drain(&mut node);
        assert!(actions.iter().any(|action| matches!(
            action,
            Action::SendAck {
                logged_seq: 1,
                durable_seq: 1,
                ..
            }
        )));
    }

    #[test]
    fn a_flush_of_what_is_durable_already_is_answered_anyway() {
        let mut node = empty(false);
        let _ = offer(&mut node, 1, 4096, true, 0);
        drain(&mut node);
        node.record_written(1, 0);
        drain(&mut node);
        node.log_synced(1, 0);
        assert!(drain(&mut node)
            .iter()
            .any(|action| matches!(action, Action::SendAck { durable_seq: 1, .. })));
        // The primary did not take that Ack in (it was reading the log
        // back); its Flush must still get an answer.
        node.flush_requested(1, 0);
        let actions = drain(&mut node);
        assert!(
            actions
                .iter()
                .any(|action| matches!(action, Action::SendAck { durable_seq: 1, .. })),
            "{actions:?}"
        );
    }

    /// Runs every action at once, as a perfect driver would.
    fn run(node: &mut Secondary<u64>, now_ms: u64) -> Vec<u64> {
        let mut persisted = Vec::new();
        while let Some(action) = node.poll_action() {
            match action {
                Action::WriteRecord { seq, .. } => node.record_written(seq, now_ms),
                Action::SyncLog { through_seq } => node.log_synced(through_seq, now_ms),
                Action::Apply { seq, .. } => node.applied(seq, now_ms),
                Action::SyncCopy { through_seq } => node.copy_synced(through_seq, now_ms),
                Action::PersistStart { start_offset, .. } => {
                    persisted.push(start_offset);
                    node.start_persisted(now_ms);
                }
                Action::SendAck { .. } => {}
            }
        }
        persisted
    }

    #[test]
    fn clearing_waits_for_all_acked_and_moves_start_to_the_next_record() {
        let mut node = empty(false);
        for seq in 1..=4 {
            let _ = offer(&mut node, seq, 4096, false, 0);
        }
        run(&mut node, 0);
        assert_eq!(
            node.start_seq(),
            1,
            "nothing is cleared before the notification"
        );
        node.all_acked(2, 100).unwrap();
        let persisted = run(&mut node, 100);
        assert_eq!(node.start_seq(), 3);
        // Records are 8 KiB (64-byte header + 4 KiB payload, rounded up).
        assert_eq!(persisted, vec![2 * 8192]);
        node.all_acked(4, 200).unwrap();
        run(&mut node, 200);
        assert_eq!(node.start_seq(), 5);
        assert_eq!(node.used_bytes(), 0);
        assert_eq!(node.start_offset(), 4 * 8192);
    }

    #[test]
    fn clearing_is_reported_in_an_ack() {
        let mut node = empty(false);
        for seq in 1..=2 {
            let _ = offer(&mut node, seq, 4096, false, 0);
        }
        run(&mut node, 0);
        node.all_acked(2, 100).unwrap();
        let mut acks = Vec::new();
        while let Some(action) = node.poll_action() {
            match action {
                Action::SyncCopy { through_seq } => node.copy_synced(through_seq, 100),
                Action::PersistStart { .. } => node.start_persisted(100),
                Action::SendAck { cleared_seq, .. } => acks.push(cleared_seq),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            acks,
            vec![2],
            "the primary learns that seqs 1-2 are cleared"
        );
    }

    #[test]
    fn a_full_log_refuses_until_cleared_and_never_overwrites() {
        let mut node = empty(false);
        let record = record_size_bytes(4096);
        let fits = RING / record;
        for seq in 1..=fits {
            assert_eq!(offer(&mut node, seq, 4096, false, 0), Offer::Accepted);
        }
        run(&mut node, 0);
        assert_eq!(
            offer(&mut node, fits + 1, 4096, false, 0),
            Offer::LogFull(fits + 1)
        );
        node.all_acked(1, 0).unwrap();
        run(&mut node, 0);
        assert_eq!(
            node.start_seq(),
            2,
            "a waiting writer forces clearing at once"
        );
        let seq = fits + 1;
        match node
            .offer_update(upd(seq, 1, 0, 4096, false, 0), seq, 0)
            .unwrap()
        {
            Offer::Accepted => {}
            other => panic!("expected room after clearing, got {other:?}"),
        }
        let writes: Vec<_> = drain(&mut node)
            .into_iter()
            .filter_map(|action| match action {
                Action::WriteRecord { ring_offset, .. } => Some(ring_offset),
                _ => None,
            })
            .collect();
        assert_eq!(
            writes,
            vec![0],
            "the new record reuses exactly the cleared space"
        );
    }

    #[test]
    fn refuses_gaps_stale_epochs_and_out_of_range() {
        let mut node = empty(false);
        assert!(matches!(
            node.offer_update(upd(2, 1, 0, 4096, false, 0), 0, 0),
            Err(UpdateError::OutOfOrder {
                expected: 1,
                got: 2
            })
        ));
        assert!(matches!(
            node.offer_update(upd(1, 0, 0, 4096, false, 0), 0, 0),
            Err(UpdateError::StaleEpoch { .. })
        ));
        assert!(matches!(
            node.offer_update(upd(1, 1, (1 << 30) - 4096, 8192, false, 0), 0, 0),
            Err(UpdateError::OutOfRange { .. })
        ));
        assert!(matches!(
            node.all_acked(5, 0),
            Err(UpdateError::AllAckedBeyondLog { .. })
        ));
        assert_eq!(node.next_seq(), 1, "refused updates change nothing");
    }

    fn update_at(seq: u64, offset_bytes: u64, length_bytes: u32, all_acked: u64) -> IncomingUpdate {
        upd(seq, 1, offset_bytes, length_bytes, false, all_acked)
    }

    fn applies(actions: &[Action<u64>]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::Apply { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn disjoint_updates_are_applied_concurrently_and_an_overlap_waits() {
        let mut node = empty(false);
        // Seqs 1-3 touch blocks 0, 1, 2; seq 4 overlaps seq 2 (block 1);
        // seq 5 (block 3) is disjoint but comes after 4, so waits too.
        for (seq, block, blocks) in [(1, 0, 1), (2, 1, 1), (3, 2, 1), (4, 1, 2), (5, 3, 1)] {
            let update = update_at(seq, block * 4096, blocks * 4096, 0);
            assert_eq!(node.offer_update(update, seq, 0).unwrap(), Offer::Accepted);
        }
        assert_eq!(applies(&drain(&mut node)), vec![1, 2, 3]);
        node.applied(3, 0);
        assert_eq!(
            node.applied_seq(),
            0,
            "applied_seq is the contiguous prefix"
        );
        assert!(applies(&drain(&mut node)).is_empty(), "4 still overlaps 2");
        node.applied(2, 0);
        assert_eq!(applies(&drain(&mut node)), vec![4, 5]);
        node.applied(1, 0);
        assert_eq!(node.applied_seq(), 3);
        node.applied(5, 0);
        node.applied(4, 0);
        assert_eq!(node.applied_seq(), 5);
    }

    #[test]
    fn at_most_apply_in_flight_max_applies_run_at_once() {
        let mut node = Secondary::new(
            SecondaryLimits {
                ring_len_bytes: 4 * APPLY_IN_FLIGHT_MAX * 8192,
                ..limits(false)
            },
            LogPosition {
                epoch: 1,
                start_offset: 0,
                start_seq: 1,
                tail_offset: 0,
                next_seq: 1,
            },
            &[],
            0,
        );
        let count = 2 * APPLY_IN_FLIGHT_MAX;
        for seq in 1..=count {
            let update = update_at(seq, seq * 4096, 4096, 0);
            assert_eq!(node.offer_update(update, seq, 0).unwrap(), Offer::Accepted);
        }
        let issued = applies(&drain(&mut node));
        assert_eq!(issued, (1..=APPLY_IN_FLIGHT_MAX).collect::<Vec<_>>());
        node.applied(APPLY_IN_FLIGHT_MAX, 0);
        assert!(
            applies(&drain(&mut node)).is_empty(),
            "the oldest still runs"
        );
        node.applied(1, 0);
        assert_eq!(applies(&drain(&mut node)), vec![APPLY_IN_FLIGHT_MAX + 1]);
    }

    /// splitmix64: the simulation's only source of choices.
    fn next_random(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    const SIM_BLOCKS: u64 = 16;

    /// Offers `count` updates of 1-3 blocks over a 16-block volume (so they
    /// overlap often) through a 64-page ring (so it fills), completing the
    /// driver's actions in an order the seed picks. An apply's bytes land in
    /// the model copy when it completes, so two overlapping applies in
    /// flight at once would land in either order. The copy must end holding,
    /// block by block, the seq of the last update to it.
    fn simulate_applies(seed: u64, count: u64) {
        let mut random = seed;
        let mut node = empty(false);
        let mut ranges = HashMap::new();
        let mut expected = [0u64; SIM_BLOCKS as usize];
        for seq in 1..=count {
            let block = next_random(&mut random) % SIM_BLOCKS;
            let blocks = (1 + next_random(&mut random) % 3).min(SIM_BLOCKS - block);
            ranges.insert(seq, (block, blocks));
            for b in block..block + blocks {
                expected[b as usize] = seq;
            }
        }
        let mut copy = [0u64; SIM_BLOCKS as usize];
        let mut applied = std::collections::HashSet::new();
        let mut pending: Vec<Action<u64>> = Vec::new();
        let mut next_offer = 1;
        let mut now_ms = 0;
        for _step in 0..200_000 {
            pending.extend(std::iter::from_fn(|| node.poll_action()));
            if next_offer > count && pending.is_empty() && node.is_idle() {
                break;
            }
            match next_random(&mut random) % 8 {
                0 | 1 if next_offer <= count => {
                    let (block, blocks) = ranges[&next_offer];
                    let update = update_at(
                        next_offer,
                        block * 4096,
                        (blocks * 4096) as u32,
                        node.all_acked_seq(),
                    );
                    if node.offer_update(update, next_offer, now_ms).unwrap() == Offer::Accepted {
                        next_offer += 1;
                    }
                }
                2 => {
                    // The one primary's all-acked point: what this log holds.
                    let logged = node.logged_seq();
                    node.all_acked(logged, now_ms).unwrap();
                }
                3 => {
                    now_ms += 20;
                    node.handle_timeout(now_ms);
                }
                _ if !pending.is_empty() => {
                    let index = (next_random(&mut random) % pending.len() as u64) as usize;
                    match pending.swap_remove(index) {
                        Action::WriteRecord { seq, .. } => node.record_written(seq, now_ms),
                        Action::SyncLog { through_seq } => node.log_synced(through_seq, now_ms),
                        Action::Apply { seq, .. } => {
                            let (block, blocks) = ranges[&seq];
                            for b in block..block + blocks {
                                copy[b as usize] = seq;
                            }
                            applied.insert(seq);
                            node.applied(seq, now_ms);
                        }
                        Action::SyncCopy { through_seq } => {
                            assert!((1..=through_seq).all(|seq| applied.contains(&seq)));
                            node.copy_synced(through_seq, now_ms);
                        }
                        Action::PersistStart { start_seq, .. } => {
                            assert!(
                                (1..start_seq).all(|seq| applied.contains(&seq)),
                                "cleared past an unapplied record"
                            );
                            node.start_persisted(now_ms);
                        }
                        Action::SendAck { .. } => {}
                    }
                }
                _ => {}
            }
        }
        assert!(
            next_offer > count && node.is_idle(),
            "the simulation ran out of steps"
        );
        assert_eq!(node.applied_seq(), count);
        assert_eq!(
            copy, expected,
            "seed {seed}: overlapping updates applied out of order"
        );
    }

    #[test]
    fn fixed_seeds_apply_overlapping_updates_in_order() {
        for seed in 0..200 {
            simulate_applies(seed, 300);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
        /// Whatever order the driver finishes writes, applies, syncs and
        /// clears in, the copy ends with every block's last update.
        #[test]
        fn concurrent_applies_leave_the_copy_as_seq_order_would(seed in proptest::prelude::any::<u64>()) {
            simulate_applies(seed, 300);
        }
    }
}
