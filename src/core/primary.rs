//! The primary's replication state machine (claims 1, 7-9).
//!
//! Every write gets the next seq and a slot in a bounded window. The core
//! records the set of secondaries the update goes to, asks the driver to send
//! it to each (setting the *sent* indicator as it is handed over) and to write
//! it to the primary's own copy, and sets the *received* indicator when a
//! secondary's cumulative ack covers it. A write completes when its own copy
//! has it and every secondary of its set has both indicators set; the
//! contiguous prefix of such updates is the all-acked point, which the core
//! sends to every secondary (piggybacked on updates, or on its own within
//! `all_acked_delay_ms`) so they can clear their logs.
//!
//! Ordering rules the core enforces rather than leaving to the driver:
//! - A write to the local copy starts only once every earlier overlapping
//!   write has finished there, so the primary applies overlapping writes in
//!   seq order, the order every secondary applies them in.
//! - A write completes only when durable-enough everywhere (see above); a FUA
//!   write and a flush complete only when fdatasync'd everywhere.
//! - A slot is freed (and its payload dropped) only after it completed and
//!   is all-acked, so a reconnecting secondary can always be re-sent what it
//!   lacks while it is still a member.

use std::collections::VecDeque;

use thiserror::Error;

use super::ack_tracker::{AckTracker, MEMBERS_MAX};

/// Caller's handle for a request; returned in its completion.
pub type RequestId = u64;

/// Limits of the primary's window and timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryLimits {
    /// Most updates in flight; a power of two and a multiple of 64.
    pub window_updates_max: usize,
    /// Most payload bytes held by in-flight updates.
    pub window_bytes_max: u64,
    /// Longest an advanced all-acked point waits before it is sent.
    pub all_acked_delay_ms: u64,
    /// How long a disconnected secondary stays in new updates' sets (and
    /// stalls completion) before it is dropped from the volume.
    pub member_timeout_ms: u64,
}

/// Shape of the volume, for checking requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Size of the volume in bytes.
    pub volume_size_bytes: u64,
    /// Logical block size; offsets and lengths are multiples of it.
    pub block_size_bytes: u32,
    /// Largest single write.
    pub write_max_bytes: u32,
}

/// Why a request was refused before it got a seq.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    /// Offset or length not a multiple of the block size, or empty.
    #[error("write at offset {offset_bytes} of {length_bytes} bytes is not aligned to the {block_size_bytes}-byte block size")]
    Misaligned {
        /// Requested offset.
        offset_bytes: u64,
        /// Requested length.
        length_bytes: u32,
        /// The volume's block size.
        block_size_bytes: u32,
    },
    /// The write ends past the end of the volume.
    #[error("write at offset {offset_bytes} of {length_bytes} bytes ends past the volume's {volume_size_bytes} bytes")]
    OutOfRange {
        /// Requested offset.
        offset_bytes: u64,
        /// Requested length.
        length_bytes: u32,
        /// The volume's size.
        volume_size_bytes: u64,
    },
    /// The write is larger than one update may be.
    #[error("write of {length_bytes} bytes exceeds the {write_max_bytes}-byte limit")]
    TooLarge {
        /// Requested length.
        length_bytes: u32,
        /// The limit.
        write_max_bytes: u32,
    },
    /// The primary stopped after a local I/O error.
    #[error("primary has failed: {reason}")]
    Failed {
        /// What failed.
        reason: String,
    },
}

/// Why a connecting secondary cannot join the stream where it is.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MemberRefusal {
    /// It was dropped earlier and missed updates the primary no longer holds.
    #[error("secondary was dropped from the volume and has missed updates; it needs a resync")]
    Dropped,
    /// Its log ends before the oldest update the primary still holds.
    #[error("secondary's log ends at seq {log_next_seq} but the primary holds updates only from seq {window_start_seq}; it needs a resync")]
    TooFarBehind {
        /// The seq its log would append next.
        log_next_seq: u64,
        /// The oldest seq the primary still holds.
        window_start_seq: u64,
    },
    /// Its log holds updates this primary never issued.
    #[error("secondary's log reaches seq {log_next_seq} but this primary has issued only up to seq {primary_next_seq}; histories differ, run replblk-resync")]
    Ahead {
        /// The seq its log would append next.
        log_next_seq: u64,
        /// The seq the primary would issue next.
        primary_next_seq: u64,
    },
}

/// A secondary's ack that contradicts what it was sent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AckViolation {
    /// Cumulative acks never go back.
    #[error("ack went back from logged seq {previous} to {acked}")]
    WentBack {
        /// What it had acked.
        previous: u64,
        /// What it acked now.
        acked: u64,
    },
    /// Acked a seq never issued.
    #[error("ack of logged seq {acked} beyond the last issued seq {last_issued}")]
    Beyond {
        /// What it acked.
        acked: u64,
        /// The last issued seq.
        last_issued: u64,
    },
    /// Claimed durable more than it logged.
    #[error("ack claims durable seq {durable} beyond logged seq {logged}")]
    DurableBeyondLogged {
        /// Durable seq claimed.
        durable: u64,
        /// Logged seq claimed.
        logged: u64,
    },
    /// Cleared what was never all-acked, or went back.
    #[error("ack claims cleared seq {cleared}, but it had cleared {previous} and the all-acked point is {all_acked}")]
    Cleared {
        /// Cleared seq claimed.
        cleared: u64,
        /// What it had reported before.
        previous: u64,
        /// The all-acked point.
        all_acked: u64,
    },
    /// Acked while not connected.
    #[error("ack from a secondary that is not connected")]
    NotConnected,
}

/// A secondary's cumulative ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberAck {
    /// Every update up to here is in its log.
    pub logged_seq: u64,
    /// Every update up to here is durable in its log.
    pub durable_seq: u64,
    /// Every update up to here is cleared from its log.
    pub cleared_seq: u64,
}

/// Result delivered with a completed request.
pub type Completion = Result<(), RequestError>;

/// What the driver must do. Poll with [`Primary::poll_action`] after every
/// event until it returns `None`.
#[derive(Debug)]
pub enum Action<P> {
    /// Write the payload to the primary's own copy at `offset_bytes`, then
    /// report [`Primary::local_write_done`].
    LocalWrite {
        /// Update seq.
        seq: u64,
        /// Byte offset in the volume.
        offset_bytes: u64,
        /// The data.
        payload: P,
    },
    /// fdatasync the primary's own copy, then report
    /// [`Primary::local_sync_done`] with this `through_seq`.
    LocalSync {
        /// Every write up to this seq was written when the sync was asked.
        through_seq: u64,
    },
    /// Hand this update to the member's connection. Its sent indicator is
    /// already set: the hand-over must happen before the driver's next event.
    SendUpdate {
        /// Member index.
        member: usize,
        /// Update seq.
        seq: u64,
        /// Byte offset in the volume.
        offset_bytes: u64,
        /// FUA: the secondary acks only once durable.
        fua: bool,
        /// All-acked point carried along.
        all_acked_seq: u64,
        /// The data.
        payload: P,
    },
    /// Ask the member to make everything up to `seq` durable.
    SendFlush {
        /// Member index.
        member: usize,
        /// Seq to make durable.
        seq: u64,
    },
    /// Claim 1: every update up to `seq` is acknowledged by every secondary
    /// it was sent to.
    SendAllAcked {
        /// Member index.
        member: usize,
        /// All-acked point.
        seq: u64,
    },
    /// Complete a request to its caller.
    Complete {
        /// The request.
        id: RequestId,
        /// Its result.
        result: Completion,
    },
    /// The member stayed away past `member_timeout_ms` and left every
    /// update's set; it will need a resync to come back.
    MemberDropped {
        /// Member index.
        member: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalState {
    /// Waits for an earlier overlapping write to finish locally.
    Blocked,
    Writing,
    Written,
}

#[derive(Debug)]
struct Slot<P> {
    id: RequestId,
    offset_bytes: u64,
    length_bytes: u32,
    fua: bool,
    payload: P,
    local: LocalState,
    completed: bool,
}

impl<P> Slot<P> {
    fn overlaps(&self, offset_bytes: u64, length_bytes: u32) -> bool {
        self.offset_bytes < offset_bytes + u64::from(length_bytes)
            && offset_bytes < self.offset_bytes + u64::from(self.length_bytes)
    }
}

#[derive(Debug)]
enum Pending<P> {
    Write {
        id: RequestId,
        offset_bytes: u64,
        fua: bool,
        payload: P,
        length_bytes: u32,
    },
    Flush {
        id: RequestId,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemberState {
    /// Not connected since `since_ms`; still in every new update's set.
    Disconnected {
        since_ms: u64,
    },
    Connected,
    /// Gone past the timeout; in no set.
    Dropped,
}

#[derive(Debug)]
struct Member {
    state: MemberState,
    logged_seq: u64,
    durable_seq: u64,
    all_acked_sent_seq: u64,
    /// When the all-acked point first moved past what this member was told.
    all_acked_pending_since_ms: Option<u64>,
    /// Bytes of the member's log ring.
    ring_bytes: u64,
    /// Records in the member's log not yet reported cleared: (seq, bytes).
    /// The primary sends an update only if it fits beside them, so a
    /// secondary never has to stop reading (and so never misses the
    /// notification that would let it clear).
    in_log: VecDeque<(u64, u64)>,
    in_log_bytes: u64,
    cleared_seq: u64,
    /// While connected: every seq below this was handed over or is not in
    /// the member's set.
    next_to_send: u64,
}

/// Where a member's log stands when it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberLog {
    /// Seq of the oldest record not cleared.
    pub start_seq: u64,
    /// Seq its log would append next.
    pub next_seq: u64,
    /// Ring bytes held by its records not cleared.
    pub used_bytes: u64,
}

#[derive(Debug)]
struct PendingFlush {
    id: RequestId,
    through_seq: u64,
    wait_mask: u64,
}

/// The primary's state machine. `P` is the payload handle (an `Arc`'d buffer
/// in the daemon, anything cloneable in tests); cloning it must not copy data.
pub struct Primary<P> {
    limits: PrimaryLimits,
    geometry: Geometry,
    tracker: AckTracker,
    members: Vec<Member>,
    /// Live slots; `slots[i]` holds seq `window_start_seq + i`.
    slots: VecDeque<Slot<P>>,
    window_start_seq: u64,
    window_bytes: u64,
    next_seq: u64,
    all_acked_seq: u64,
    pending: VecDeque<Pending<P>>,
    flushes: VecDeque<PendingFlush>,
    local_sync_in_flight: Option<u64>,
    local_durable_seq: u64,
    failed: Option<String>,
    now_ms: u64,
    actions: VecDeque<Action<P>>,
}

impl<P: Clone> Primary<P> {
    /// A primary whose next update gets `first_seq`, with one secondary per
    /// entry of `member_ring_bytes` (the size of its log's ring); every
    /// secondary starts disconnected at `now_ms`.
    pub fn new(
        limits: PrimaryLimits,
        geometry: Geometry,
        member_ring_bytes: &[u64],
        first_seq: u64,
        now_ms: u64,
    ) -> Primary<P> {
        let member_count = member_ring_bytes.len();
        assert!(first_seq >= 1, "seq 0 means none");
        assert!(member_count <= MEMBERS_MAX);
        assert!(limits.window_updates_max.is_power_of_two() && limits.window_updates_max >= 64);
        assert!(
            limits.window_bytes_max >= u64::from(geometry.write_max_bytes),
            "the window must hold the largest write"
        );
        assert!(geometry.block_size_bytes.is_power_of_two());
        let largest_record = super::secondary::record_size_bytes(geometry.write_max_bytes);
        assert!(
            member_ring_bytes.iter().all(|&ring| ring >= largest_record),
            "every log must hold the largest record"
        );
        let members = member_ring_bytes
            .iter()
            .map(|&ring_bytes| Member {
                state: MemberState::Disconnected { since_ms: now_ms },
                logged_seq: first_seq - 1,
                durable_seq: 0,
                all_acked_sent_seq: first_seq - 1,
                all_acked_pending_since_ms: None,
                ring_bytes,
                in_log: VecDeque::new(),
                in_log_bytes: 0,
                cleared_seq: 0,
                next_to_send: first_seq,
            })
            .collect();
        Primary {
            limits,
            geometry,
            tracker: AckTracker::new(limits.window_updates_max, member_count),
            members,
            slots: VecDeque::with_capacity(limits.window_updates_max),
            window_start_seq: first_seq,
            window_bytes: 0,
            next_seq: first_seq,
            all_acked_seq: first_seq - 1,
            pending: VecDeque::new(),
            flushes: VecDeque::new(),
            local_sync_in_flight: None,
            local_durable_seq: 0,
            failed: None,
            now_ms,
            actions: VecDeque::new(),
        }
    }

    /// The next action for the driver, if any.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action<P>> {
        self.actions.pop_front()
    }

    /// The seq the next write will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Every update up to this seq is acknowledged by every member of its set.
    pub fn all_acked_seq(&self) -> u64 {
        self.all_acked_seq
    }

    /// Updates in the window.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// True when the member is connected.
    pub fn is_connected(&self, member: usize) -> bool {
        self.members[member].state == MemberState::Connected
    }

    /// True when the member was dropped from the volume.
    pub fn is_dropped(&self, member: usize) -> bool {
        self.members[member].state == MemberState::Dropped
    }

    /// True when nothing is in flight or queued and every connected member
    /// has been told the final all-acked point.
    pub fn is_quiescent(&self) -> bool {
        self.slots.is_empty()
            && self.pending.is_empty()
            && self.flushes.is_empty()
            && self.local_sync_in_flight.is_none()
            && self.members.iter().all(|member| {
                member.state != MemberState::Connected
                    || member.all_acked_sent_seq == self.all_acked_seq
            })
    }

    fn set_now(&mut self, now_ms: u64) {
        // The driver's clock is monotonic; tolerate equal readings.
        debug_assert!(now_ms >= self.now_ms, "time went back");
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// Submits a write. Refused at once (and never given a seq) if it is
    /// misaligned, too large or out of range; otherwise it completes later
    /// through [`Action::Complete`].
    pub fn submit_write(
        &mut self,
        id: RequestId,
        offset_bytes: u64,
        length_bytes: u32,
        fua: bool,
        payload: P,
        now_ms: u64,
    ) -> Result<(), RequestError> {
        self.set_now(now_ms);
        self.check_write(offset_bytes, length_bytes)?;
        self.pending.push_back(Pending::Write {
            id,
            offset_bytes,
            fua,
            payload,
            length_bytes,
        });
        self.admit_pending();
        Ok(())
    }

    fn check_write(&self, offset_bytes: u64, length_bytes: u32) -> Result<(), RequestError> {
        if let Some(reason) = &self.failed {
            return Err(RequestError::Failed {
                reason: reason.clone(),
            });
        }
        let geometry = self.geometry;
        let block = u64::from(geometry.block_size_bytes);
        if length_bytes == 0
            || !offset_bytes.is_multiple_of(block)
            || !u64::from(length_bytes).is_multiple_of(block)
        {
            return Err(RequestError::Misaligned {
                offset_bytes,
                length_bytes,
                block_size_bytes: geometry.block_size_bytes,
            });
        }
        if length_bytes > geometry.write_max_bytes {
            return Err(RequestError::TooLarge {
                length_bytes,
                write_max_bytes: geometry.write_max_bytes,
            });
        }
        let end = offset_bytes.checked_add(u64::from(length_bytes));
        if end.is_none_or(|end| end > geometry.volume_size_bytes) {
            return Err(RequestError::OutOfRange {
                offset_bytes,
                length_bytes,
                volume_size_bytes: geometry.volume_size_bytes,
            });
        }
        Ok(())
    }

    /// Submits a flush: it completes once every write submitted before it is
    /// durable on the primary's copy and on every member's log.
    pub fn submit_flush(&mut self, id: RequestId, now_ms: u64) {
        self.set_now(now_ms);
        if let Some(reason) = &self.failed {
            let reason = reason.clone();
            self.complete(id, Err(RequestError::Failed { reason }));
            return;
        }
        self.pending.push_back(Pending::Flush { id });
        self.admit_pending();
    }

    fn window_has_room(&self, length_bytes: u32) -> bool {
        self.slots.len() < self.limits.window_updates_max
            && (self.slots.is_empty()
                || self.window_bytes + u64::from(length_bytes) <= self.limits.window_bytes_max)
    }

    /// Moves queued requests into the window, in submission order.
    fn admit_pending(&mut self) {
        while let Some(front) = self.pending.front() {
            match front {
                Pending::Write { length_bytes, .. } => {
                    if !self.window_has_room(*length_bytes) {
                        return;
                    }
                    let Some(Pending::Write {
                        id,
                        offset_bytes,
                        fua,
                        payload,
                        length_bytes,
                    }) = self.pending.pop_front()
                    else {
                        unreachable!("front was a write");
                    };
                    self.start_write(id, offset_bytes, length_bytes, fua, payload);
                }
                Pending::Flush { .. } => {
                    let Some(Pending::Flush { id }) = self.pending.pop_front() else {
                        unreachable!("front was a flush");
                    };
                    self.start_flush(id);
                }
            }
        }
    }

    /// Claim 1: identifies the secondaries the update goes to (every member
    /// not dropped), records the set with it and sends it.
    fn start_write(
        &mut self,
        id: RequestId,
        offset_bytes: u64,
        length_bytes: u32,
        fua: bool,
        payload: P,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let set_mask = self.member_mask(|state| state != MemberState::Dropped);
        self.tracker.begin(seq, set_mask);
        let blocked = self.slots.iter().any(|slot| {
            slot.local != LocalState::Written && slot.overlaps(offset_bytes, length_bytes)
        });
        self.slots.push_back(Slot {
            id,
            offset_bytes,
            length_bytes,
            fua,
            payload: payload.clone(),
            local: if blocked {
                LocalState::Blocked
            } else {
                LocalState::Writing
            },
            completed: false,
        });
        self.window_bytes += u64::from(length_bytes);
        debug_assert_eq!(
            self.window_start_seq + self.slots.len() as u64,
            self.next_seq
        );
        if !blocked {
            self.actions.push_back(Action::LocalWrite {
                seq,
                offset_bytes,
                payload: payload.clone(),
            });
        }
        for member in 0..self.members.len() {
            if self.members[member].state == MemberState::Connected {
                self.send_pending(member);
            }
        }
        // With no member in its set the update is already all-acked.
        self.advance_all_acked();
    }

    fn member_mask(&self, include: impl Fn(MemberState) -> bool) -> u64 {
        self.members
            .iter()
            .enumerate()
            .filter(|(_, member)| include(member.state))
            .fold(0, |mask, (index, _)| mask | 1 << index)
    }

    fn slot(&self, seq: u64) -> Option<&Slot<P>> {
        let index = seq.checked_sub(self.window_start_seq)?;
        self.slots.get(usize::try_from(index).ok()?)
    }

    fn slot_mut(&mut self, seq: u64) -> Option<&mut Slot<P>> {
        let index = seq.checked_sub(self.window_start_seq)?;
        self.slots.get_mut(usize::try_from(index).ok()?)
    }

    /// Hands the member every update it lacks, in seq order, while its log
    /// has room for them.
    fn send_pending(&mut self, member: usize) {
        debug_assert_eq!(self.members[member].state, MemberState::Connected);
        let bit = 1u64 << member;
        while self.members[member].next_to_send < self.next_seq {
            let seq = self.members[member].next_to_send;
            debug_assert!(
                seq >= self.window_start_seq,
                "seq {seq} retired before member {member} had it"
            );
            if self.tracker.set_mask(seq) & bit != 0 {
                let length = self.slot(seq).expect("live slot").length_bytes;
                let size = super::secondary::record_size_bytes(length);
                let record = &mut self.members[member];
                if record.in_log_bytes + size > record.ring_bytes {
                    // Held back until the member reports records cleared.
                    return;
                }
                record.in_log.push_back((seq, size));
                record.in_log_bytes += size;
                self.send_update(member, seq);
            }
            self.members[member].next_to_send = seq + 1;
        }
    }

    /// Claim 7: the sent indicator is set as the update is handed over.
    fn send_update(&mut self, member: usize, seq: u64) {
        let slot = self.slot(seq).expect("sending a live slot");
        debug_assert!(self.tracker.set_mask(seq) & (1 << member) != 0);
        let action = Action::SendUpdate {
            member,
            seq,
            offset_bytes: slot.offset_bytes,
            fua: slot.fua,
            all_acked_seq: self.all_acked_seq,
            payload: slot.payload.clone(),
        };
        self.tracker.mark_sent(member, seq);
        self.actions.push_back(action);
        self.note_all_acked_sent(member);
    }

    fn note_all_acked_sent(&mut self, member: usize) {
        let member = &mut self.members[member];
        member.all_acked_sent_seq = self.all_acked_seq;
        member.all_acked_pending_since_ms = None;
    }

    fn start_flush(&mut self, id: RequestId) {
        let through_seq = self.next_seq - 1;
        let wait_mask = self.member_mask(|state| state != MemberState::Dropped);
        for member in 0..self.members.len() {
            if wait_mask & (1 << member) != 0
                && self.members[member].state == MemberState::Connected
                && self.members[member].durable_seq < through_seq
            {
                self.actions.push_back(Action::SendFlush {
                    member,
                    seq: through_seq,
                });
            }
        }
        self.flushes.push_back(PendingFlush {
            id,
            through_seq,
            wait_mask,
        });
        self.progress();
    }

    /// The local copy finished writing `seq`.
    pub fn local_write_done(&mut self, seq: u64, result: Result<(), String>, now_ms: u64) {
        self.set_now(now_ms);
        if let Err(reason) = result {
            self.fail(format!("local write of seq {seq} failed: {reason}"));
            return;
        }
        let slot = self.slot_mut(seq).expect("local write of a live slot");
        assert_eq!(slot.local, LocalState::Writing, "seq {seq} written twice");
        slot.local = LocalState::Written;
        let (offset_bytes, length_bytes) = (slot.offset_bytes, slot.length_bytes);
        self.unblock_after(seq, offset_bytes, length_bytes);
        self.progress();
    }

    /// Starts the local writes that were waiting only for `seq`.
    fn unblock_after(&mut self, seq: u64, offset_bytes: u64, length_bytes: u32) {
        let first = (seq - self.window_start_seq) as usize + 1;
        for index in first..self.slots.len() {
            let slot = &self.slots[index];
            if slot.local != LocalState::Blocked || !slot.overlaps(offset_bytes, length_bytes) {
                continue;
            }
            let (offset, length) = (slot.offset_bytes, slot.length_bytes);
            let still_blocked = self.slots.iter().take(index).any(|earlier| {
                earlier.local != LocalState::Written && earlier.overlaps(offset, length)
            });
            if !still_blocked {
                let slot = &mut self.slots[index];
                slot.local = LocalState::Writing;
                self.actions.push_back(Action::LocalWrite {
                    seq: self.window_start_seq + index as u64,
                    offset_bytes: slot.offset_bytes,
                    payload: slot.payload.clone(),
                });
            }
        }
    }

    /// The fdatasync asked for by [`Action::LocalSync`] finished.
    pub fn local_sync_done(&mut self, through_seq: u64, result: Result<(), String>, now_ms: u64) {
        self.set_now(now_ms);
        assert_eq!(
            self.local_sync_in_flight,
            Some(through_seq),
            "unexpected sync completion"
        );
        self.local_sync_in_flight = None;
        if let Err(reason) = result {
            self.fail(format!("fdatasync of the local copy failed: {reason}"));
            return;
        }
        self.local_durable_seq = self.local_durable_seq.max(through_seq);
        self.progress();
    }

    /// A member's connection is up and its log stands at `log`. Re-sends
    /// whatever it lacks from the window.
    pub fn member_connected(
        &mut self,
        member: usize,
        log: MemberLog,
        now_ms: u64,
    ) -> Result<(), MemberRefusal> {
        let log_next_seq = log.next_seq;
        self.set_now(now_ms);
        match self.members[member].state {
            MemberState::Dropped => return Err(MemberRefusal::Dropped),
            MemberState::Connected => panic!("member {member} connected twice"),
            MemberState::Disconnected { .. } => {}
        }
        if log_next_seq > self.next_seq {
            return Err(MemberRefusal::Ahead {
                log_next_seq,
                primary_next_seq: self.next_seq,
            });
        }
        if log_next_seq < self.window_start_seq {
            return Err(MemberRefusal::TooFarBehind {
                log_next_seq,
                window_start_seq: self.window_start_seq,
            });
        }
        let record = &mut self.members[member];
        record.state = MemberState::Connected;
        record.logged_seq = log_next_seq - 1;
        record.durable_seq = record.durable_seq.min(record.logged_seq);
        // What its log holds now: the sizes of its records are unknown, so
        // they count as one lump freed when the last of them is cleared.
        record.cleared_seq = log.start_seq - 1;
        record.in_log.clear();
        record.in_log_bytes = log.used_bytes;
        if log.used_bytes > 0 {
            record.in_log.push_back((log_next_seq - 1, log.used_bytes));
        }
        record.next_to_send = log_next_seq;
        let bit = 1u64 << member;
        for seq in self.window_start_seq..self.next_seq {
            if self.tracker.set_mask(seq) & bit == 0 {
                continue;
            }
            if seq < log_next_seq {
                // In its log already: the ack may have died with the connection.
                self.tracker.mark_sent(member, seq);
                self.tracker.mark_received(member, seq);
            } else {
                self.tracker.reset_member(member, seq);
            }
        }
        self.send_pending(member);
        let flushes: Vec<u64> = self
            .flushes
            .iter()
            .filter(|flush| flush.wait_mask & bit != 0)
            .map(|flush| flush.through_seq)
            .collect();
        if let Some(&through_seq) = flushes.iter().max() {
            self.actions.push_back(Action::SendFlush {
                member,
                seq: through_seq,
            });
        }
        if self.members[member].all_acked_sent_seq != self.all_acked_seq {
            self.members[member].all_acked_pending_since_ms = Some(self.now_ms);
        }
        self.progress();
        Ok(())
    }

    /// The member's connection is gone. It stays in every set until
    /// `member_timeout_ms` passes (see [`Primary::handle_timeout`]).
    pub fn member_disconnected(&mut self, member: usize, now_ms: u64) {
        self.set_now(now_ms);
        if self.members[member].state == MemberState::Connected {
            self.members[member].state = MemberState::Disconnected {
                since_ms: self.now_ms,
            };
        }
    }

    /// Claim 8: a member's cumulative ack. Sets the received indicator of
    /// every update it newly covers.
    pub fn ack_received(
        &mut self,
        member: usize,
        ack: MemberAck,
        now_ms: u64,
    ) -> Result<(), AckViolation> {
        let MemberAck {
            logged_seq,
            durable_seq,
            cleared_seq,
        } = ack;
        self.set_now(now_ms);
        let record = &self.members[member];
        if record.state != MemberState::Connected {
            return Err(AckViolation::NotConnected);
        }
        if logged_seq < record.logged_seq {
            return Err(AckViolation::WentBack {
                previous: record.logged_seq,
                acked: logged_seq,
            });
        }
        if logged_seq >= self.next_seq {
            return Err(AckViolation::Beyond {
                acked: logged_seq,
                last_issued: self.next_seq - 1,
            });
        }
        if durable_seq > logged_seq {
            return Err(AckViolation::DurableBeyondLogged {
                durable: durable_seq,
                logged: logged_seq,
            });
        }
        if cleared_seq > self.all_acked_seq.max(record.cleared_seq)
            || cleared_seq < record.cleared_seq
        {
            return Err(AckViolation::Cleared {
                cleared: cleared_seq,
                previous: record.cleared_seq,
                all_acked: self.all_acked_seq,
            });
        }
        let bit = 1u64 << member;
        let first = (record.logged_seq + 1).max(self.window_start_seq);
        for seq in first..=logged_seq {
            if self.tracker.set_mask(seq) & bit != 0 {
                self.tracker.mark_received(member, seq);
            }
        }
        let record = &mut self.members[member];
        record.logged_seq = logged_seq;
        record.durable_seq = record.durable_seq.max(durable_seq);
        record.cleared_seq = cleared_seq;
        while record
            .in_log
            .front()
            .is_some_and(|&(seq, _)| seq <= cleared_seq)
        {
            let (_, size) = record.in_log.pop_front().expect("front exists");
            record.in_log_bytes -= size;
        }
        self.send_pending(member);
        self.progress();
        Ok(())
    }

    /// When [`Primary::handle_timeout`] wants to be called next, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.members
            .iter()
            .filter_map(|member| match member.state {
                MemberState::Connected => member
                    .all_acked_pending_since_ms
                    .map(|since| since + self.limits.all_acked_delay_ms),
                MemberState::Disconnected { since_ms } => {
                    Some(since_ms + self.limits.member_timeout_ms)
                }
                MemberState::Dropped => None,
            })
            .min()
    }

    /// Time has passed: sends due all-acked notifications and drops members
    /// gone too long.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.set_now(now_ms);
        for member in 0..self.members.len() {
            match self.members[member].state {
                MemberState::Connected => {
                    let due = self.members[member]
                        .all_acked_pending_since_ms
                        .is_some_and(|since| since + self.limits.all_acked_delay_ms <= self.now_ms);
                    if due {
                        self.actions.push_back(Action::SendAllAcked {
                            member,
                            seq: self.all_acked_seq,
                        });
                        self.note_all_acked_sent(member);
                    }
                }
                MemberState::Disconnected { since_ms } => {
                    if since_ms + self.limits.member_timeout_ms <= self.now_ms {
                        self.drop_member(member);
                    }
                }
                MemberState::Dropped => {}
            }
        }
        self.progress();
    }

    fn drop_member(&mut self, member: usize) {
        self.members[member].state = MemberState::Dropped;
        for seq in self.window_start_seq..self.next_seq {
            self.tracker.remove_from_set(member, seq);
        }
        for flush in &mut self.flushes {
            flush.wait_mask &= !(1 << member);
        }
        self.actions.push_back(Action::MemberDropped { member });
    }

    /// Runs every check that an event may have unblocked.
    fn progress(&mut self) {
        if self.failed.is_some() {
            return;
        }
        self.advance_all_acked();
        self.request_local_sync();
        self.complete_writes();
        self.complete_flushes();
        self.retire();
        self.admit_pending();
    }

    /// Claim 9: the all-acked point is the end of the contiguous prefix of
    /// updates whose every set member has both indicators set.
    fn advance_all_acked(&mut self) {
        let before = self.all_acked_seq;
        while self.all_acked_seq + 1 < self.next_seq
            && self.tracker.is_fully_acked(self.all_acked_seq + 1)
        {
            self.all_acked_seq += 1;
        }
        if self.all_acked_seq != before {
            let now_ms = self.now_ms;
            for member in &mut self.members {
                if member.state == MemberState::Connected
                    && member.all_acked_pending_since_ms.is_none()
                {
                    member.all_acked_pending_since_ms = Some(now_ms);
                }
            }
        }
    }

    /// Every seq up to the returned one is written to the local copy.
    fn local_written_through(&self) -> u64 {
        let unwritten = self
            .slots
            .iter()
            .position(|slot| slot.local != LocalState::Written);
        match unwritten {
            Some(index) => self.window_start_seq + index as u64 - 1,
            None => self.next_seq - 1,
        }
    }

    fn request_local_sync(&mut self) {
        if self.local_sync_in_flight.is_some() {
            return;
        }
        let wanted = self
            .flushes
            .iter()
            .map(|flush| flush.through_seq)
            .chain(
                self.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, slot)| slot.fua && slot.local == LocalState::Written)
                    .map(|(index, _)| self.window_start_seq + index as u64),
            )
            .filter(|&seq| seq > self.local_durable_seq)
            .min();
        let Some(wanted) = wanted else { return };
        let written = self.local_written_through();
        if written >= wanted {
            self.local_sync_in_flight = Some(written);
            self.actions.push_back(Action::LocalSync {
                through_seq: written,
            });
        }
    }

    fn durable_everywhere(&self, seq: u64, mask: u64) -> bool {
        self.local_durable_seq >= seq
            && self
                .members
                .iter()
                .enumerate()
                .all(|(index, member)| mask & (1 << index) == 0 || member.durable_seq >= seq)
    }

    fn complete_writes(&mut self) {
        for index in 0..self.slots.len() {
            let seq = self.window_start_seq + index as u64;
            let slot = &self.slots[index];
            if slot.completed
                || slot.local != LocalState::Written
                || !self.tracker.is_fully_acked(seq)
            {
                continue;
            }
            if slot.fua && !self.durable_everywhere(seq, self.tracker.set_mask(seq)) {
                continue;
            }
            let id = slot.id;
            self.slots[index].completed = true;
            self.complete(id, Ok(()));
        }
    }

    fn complete_flushes(&mut self) {
        let mut index = 0;
        while index < self.flushes.len() {
            let flush = &self.flushes[index];
            if self.durable_everywhere(flush.through_seq, flush.wait_mask) {
                let flush = self.flushes.remove(index).expect("index in range");
                self.complete(flush.id, Ok(()));
            } else {
                index += 1;
            }
        }
    }

    /// Frees slots from the front once completed and all-acked.
    fn retire(&mut self) {
        while let Some(slot) = self.slots.front() {
            if !slot.completed || self.window_start_seq > self.all_acked_seq {
                break;
            }
            self.window_bytes -= u64::from(slot.length_bytes);
            self.slots.pop_front();
            self.window_start_seq += 1;
        }
    }

    fn complete(&mut self, id: RequestId, result: Completion) {
        self.actions.push_back(Action::Complete { id, result });
    }

    /// A local I/O error: the primary stops rather than guess what its copy
    /// holds. Every request in flight or queued fails.
    fn fail(&mut self, reason: String) {
        if self.failed.is_some() {
            return;
        }
        self.failed = Some(reason.clone());
        let error = || {
            Err(RequestError::Failed {
                reason: reason.clone(),
            })
        };
        let ids: Vec<RequestId> = self
            .slots
            .iter()
            .filter(|slot| !slot.completed)
            .map(|slot| slot.id)
            .chain(self.flushes.drain(..).map(|flush| flush.id))
            .chain(self.pending.drain(..).map(|pending| match pending {
                Pending::Write { id, .. } | Pending::Flush { id } => id,
            }))
            .collect();
        for slot in &mut self.slots {
            slot.completed = true;
        }
        for id in ids {
            self.complete(id, error());
        }
    }

    /// The reason the primary failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const BLOCK: u64 = 4096;
    const BLOCKS: u64 = 32;
    /// Each secondary's ring: room for a few records only, so the primary's
    /// flow control is exercised all the time.
    const RING_BYTES: u64 = 16 * BLOCK;

    fn empty_log() -> MemberLog {
        MemberLog {
            start_seq: 1,
            next_seq: 1,
            used_bytes: 0,
        }
    }

    fn ack(logged_seq: u64, durable_seq: u64, cleared_seq: u64) -> MemberAck {
        MemberAck {
            logged_seq,
            durable_seq,
            cleared_seq,
        }
    }

    /// A small deterministic generator, so a failing seed replays exactly.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A secondary as the primary sees it through a perfect, ordered link.
    #[derive(Default)]
    struct SimMember {
        inbox: VecDeque<(u64, u64, u64, u64)>, // (seq, offset, request id, all-acked)
        log: Vec<(u64, u64, u64)>,
        all_acked_known: u64,
        cleared_seq: u64,
        durable_seq: u64,
        flush_wanted: u64,
        connected: bool,
        copy: HashMap<u64, u64>,
    }

    struct Sim {
        primary: Primary<u64>,
        members: Vec<SimMember>,
        lengths: HashMap<u64, u64>,
        local_in_flight: Vec<(u64, u64, u64)>,
        local_written: Vec<u64>,
        local_copy: HashMap<u64, u64>,
        local_sync: Option<u64>,
        local_durable_seq: u64,
        seq_of_request: HashMap<u64, u64>,
        flush_through: HashMap<u64, u64>,
        completed: Vec<u64>,
        now_ms: u64,
    }

    impl Sim {
        fn new(member_count: usize) -> Sim {
            let limits = PrimaryLimits {
                window_updates_max: 64,
                window_bytes_max: 64 * BLOCK * 8,
                all_acked_delay_ms: 10,
                member_timeout_ms: 1_000_000,
            };
            let geometry = Geometry {
                volume_size_bytes: BLOCKS * BLOCK,
                block_size_bytes: BLOCK as u32,
                write_max_bytes: 8 * BLOCK as u32,
            };
            let mut primary = Primary::new(limits, geometry, &vec![RING_BYTES; member_count], 1, 0);
            let mut members = Vec::new();
            for member in 0..member_count {
                primary.member_connected(member, empty_log(), 0).unwrap();
                members.push(SimMember {
                    connected: true,
                    ..SimMember::default()
                });
            }
            Sim {
                primary,
                members,
                lengths: HashMap::new(),
                local_in_flight: Vec::new(),
                local_written: Vec::new(),
                local_copy: HashMap::new(),
                local_sync: None,
                local_durable_seq: 0,
                seq_of_request: HashMap::new(),
                flush_through: HashMap::new(),
                completed: Vec::new(),
                now_ms: 0,
            }
        }

        /// Executes the primary's actions, checking each against the rules.
        fn pump(&mut self) {
            while let Some(action) = self.primary.poll_action() {
                match action {
                    Action::LocalWrite {
                        seq,
                        offset_bytes,
                        payload,
                    } => {
                        let length = self.lengths[&payload];
                        for &(other, other_offset, other_id) in &self.local_in_flight {
                            let other_length = self.lengths[&other_id];
                            let overlap = other_offset < offset_bytes + length
                                && offset_bytes < other_offset + other_length;
                            assert!(!overlap, "seq {seq} started locally while overlapping seq {other} is in flight");
                        }
                        self.local_in_flight.push((seq, offset_bytes, payload));
                    }
                    Action::LocalSync { through_seq } => {
                        assert!(self.local_sync.is_none());
                        assert!(
                            (1..=through_seq).all(|seq| self.local_written.contains(&seq)),
                            "sync through {through_seq} before those writes were done"
                        );
                        self.local_sync = Some(through_seq);
                    }
                    Action::SendUpdate {
                        member,
                        seq,
                        offset_bytes,
                        payload,
                        fua,
                        all_acked_seq,
                    } => {
                        let sim = &mut self.members[member];
                        assert!(sim.connected, "update {seq} sent to disconnected member {member} (primary thinks connected: {})", self.primary.is_connected(member));
                        sim.inbox
                            .push_back((seq, offset_bytes, payload, all_acked_seq));
                        if fua {
                            sim.flush_wanted = sim.flush_wanted.max(seq);
                        }
                    }
                    Action::SendFlush { member, seq } => {
                        let sim = &mut self.members[member];
                        sim.flush_wanted = sim.flush_wanted.max(seq);
                    }
                    Action::SendAllAcked { member, seq } => {
                        let target = &mut self.members[member];
                        target.all_acked_known = target.all_acked_known.max(seq);
                        for sim in &self.members {
                            assert!(
                                sim.log.len() as u64 >= seq || !sim.connected,
                                "all-acked {seq} passed a member's log"
                            );
                        }
                    }
                    Action::Complete { id, result } => {
                        result.expect("no failures in this simulation");
                        if let Some(&seq) = self.seq_of_request.get(&id) {
                            assert!(
                                self.local_written.contains(&seq),
                                "write {seq} completed before its local write"
                            );
                            for sim in &self.members {
                                assert!(
                                    sim.log.len() as u64 >= seq,
                                    "write {seq} completed before a secondary logged it"
                                );
                            }
                        } else {
                            let through = self.flush_through[&id];
                            assert!(
                                self.local_durable_seq >= through,
                                "flush completed before the local sync"
                            );
                            for sim in &self.members {
                                assert!(
                                    sim.durable_seq >= through,
                                    "flush completed before a secondary's sync"
                                );
                            }
                        }
                        self.completed.push(id);
                    }
                    Action::MemberDropped { .. } => panic!("no member times out here"),
                }
            }
        }

        /// Writes queued behind a full window: they take seqs in order.
        fn queued_writes(&self) -> u64 {
            let writes = self
                .primary
                .pending
                .iter()
                .filter(|p| matches!(p, Pending::Write { .. }));
            writes.count() as u64
        }

        fn submit_write(&mut self, id: u64, rng: &mut Rng) {
            let blocks = 1 + rng.below(8);
            let start = rng.below(BLOCKS - blocks + 1);
            self.lengths.insert(id, blocks * BLOCK);
            self.seq_of_request
                .insert(id, self.primary.next_seq() + self.queued_writes());
            let fua = rng.below(10) == 0;
            self.primary
                .submit_write(
                    id,
                    start * BLOCK,
                    (blocks * BLOCK) as u32,
                    fua,
                    id,
                    self.now_ms,
                )
                .unwrap();
        }

        /// Ring bytes of the member's records not yet cleared.
        fn used_bytes(sim: &SimMember, lengths: &HashMap<u64, u64>) -> u64 {
            sim.log[sim.cleared_seq as usize..]
                .iter()
                .map(|(_, _, id)| crate::core::secondary::record_size_bytes(lengths[id] as u32))
                .sum()
        }

        fn step(&mut self, rng: &mut Rng) -> bool {
            let choice = rng.below(8);
            match choice {
                0 if !self.local_in_flight.is_empty() => {
                    let index = rng.below(self.local_in_flight.len() as u64) as usize;
                    let (seq, offset, id) = self.local_in_flight.swap_remove(index);
                    for block in 0..self.lengths[&id] / BLOCK {
                        self.local_copy.insert(offset / BLOCK + block, id);
                    }
                    self.local_written.push(seq);
                    self.primary.local_write_done(seq, Ok(()), self.now_ms);
                }
                1 if self.local_sync.is_some() => {
                    let through = self.local_sync.take().unwrap();
                    self.local_durable_seq = self.local_durable_seq.max(through);
                    self.primary.local_sync_done(through, Ok(()), self.now_ms);
                }
                2 | 3 => {
                    let member = rng.below(self.members.len().max(1) as u64) as usize;
                    let Some(sim) = self.members.get_mut(member) else {
                        return false;
                    };
                    if !sim.connected {
                        return false;
                    }
                    let Some((seq, offset, id, all_acked)) = sim.inbox.pop_front() else {
                        return false;
                    };
                    sim.all_acked_known = sim.all_acked_known.max(all_acked);
                    assert_eq!(
                        seq,
                        sim.log.len() as u64 + 1,
                        "updates reach a member in seq order without gaps"
                    );
                    sim.log.push((seq, offset, id));
                    for block in 0..self.lengths[&id] / BLOCK {
                        sim.copy.insert(offset / BLOCK + block, id);
                    }
                    let used = Self::used_bytes(sim, &self.lengths);
                    assert!(
                        used <= RING_BYTES,
                        "member {member}'s log overfilled: {used} bytes"
                    );
                    let durable = if sim.flush_wanted > sim.durable_seq
                        && sim.log.len() as u64 >= sim.flush_wanted.min(seq)
                    {
                        sim.log.len() as u64
                    } else {
                        sim.durable_seq
                    };
                    sim.durable_seq = durable;
                    let logged = sim.log.len() as u64;
                    let cleared = sim.cleared_seq;
                    self.primary
                        .ack_received(member, ack(logged, durable, cleared), self.now_ms)
                        .unwrap();
                }
                4 => {
                    let member = rng.below(self.members.len().max(1) as u64) as usize;
                    let Some(sim) = self.members.get_mut(member) else {
                        return false;
                    };
                    // Sync if asked, clear what is all-acked, and say so.
                    let clearable = sim.all_acked_known.min(sim.log.len() as u64);
                    let changed = sim.flush_wanted > sim.durable_seq || clearable > sim.cleared_seq;
                    if sim.connected && changed {
                        if sim.flush_wanted > sim.durable_seq {
                            sim.durable_seq = sim.log.len() as u64;
                        }
                        sim.cleared_seq = clearable;
                        let answer = ack(sim.log.len() as u64, sim.durable_seq, sim.cleared_seq);
                        self.primary
                            .ack_received(member, answer, self.now_ms)
                            .unwrap();
                    } else {
                        return false;
                    }
                }
                5 => {
                    self.now_ms += 1 + rng.below(15);
                    self.primary.handle_timeout(self.now_ms);
                }
                6 if rng.below(20) == 0 => {
                    // A connection drops (frames in flight are lost) and comes back.
                    let member = rng.below(self.members.len().max(1) as u64) as usize;
                    let Some(sim) = self.members.get_mut(member) else {
                        return false;
                    };
                    sim.inbox.clear();
                    sim.connected = false;
                    self.primary.member_disconnected(member, self.now_ms);
                    self.pump();
                    let sim = &mut self.members[member];
                    sim.connected = true;
                    let log = MemberLog {
                        start_seq: sim.cleared_seq + 1,
                        next_seq: sim.log.len() as u64 + 1,
                        used_bytes: Self::used_bytes(sim, &self.lengths),
                    };
                    self.primary
                        .member_connected(member, log, self.now_ms)
                        .unwrap();
                }
                _ => return false,
            }
            true
        }
    }

    fn simulate(seed: u64, member_count: usize, writes: u64) {
        let mut rng = Rng(seed | 1);
        let mut sim = Sim::new(member_count);
        let mut next_id = 1;
        let mut flushes = Vec::new();
        for _ in 0..writes * 40 {
            if next_id <= writes && rng.below(3) == 0 {
                if rng.below(8) == 0 {
                    sim.flush_through
                        .insert(next_id, sim.primary.next_seq() - 1 + sim.queued_writes());
                    flushes.push(next_id);
                    sim.primary.submit_flush(next_id, sim.now_ms);
                } else {
                    sim.submit_write(next_id, &mut rng);
                }
                next_id += 1;
                sim.pump();
            }
            sim.step(&mut rng);
            sim.pump();
        }
        // Let everything settle, still in random order.
        for _ in 0..200_000 {
            if sim.completed.len() as u64 == next_id - 1 && sim.primary.is_quiescent() {
                break;
            }
            sim.step(&mut rng);
            sim.pump();
        }
        assert_eq!(
            sim.completed.len() as u64,
            next_id - 1,
            "seed {seed}: every request completes"
        );
        assert!(
            sim.primary.is_quiescent(),
            "seed {seed}: the primary settles"
        );
        assert_eq!(sim.primary.all_acked_seq(), sim.primary.next_seq() - 1);
        for (member, copy) in sim.members.iter().map(|m| &m.copy).enumerate() {
            assert_eq!(
                copy, &sim.local_copy,
                "seed {seed}: member {member}'s copy differs from the primary's"
            );
        }
    }

    #[test]
    fn single_write_completes_after_local_write_and_every_ack() {
        let mut sim = Sim::new(2);
        let mut rng = Rng(7);
        sim.submit_write(1, &mut rng);
        sim.pump();
        let (seq, offset, id) = sim.local_in_flight.pop().unwrap();
        sim.local_written.push(seq);
        sim.local_copy.insert(offset / BLOCK, id);
        sim.primary.local_write_done(seq, Ok(()), 0);
        sim.pump();
        assert!(sim.completed.is_empty(), "no secondary has acked yet");
        sim.members[0].log.push((1, offset, id));
        sim.primary.ack_received(0, ack(1, 0, 0), 0).unwrap();
        sim.pump();
        assert!(sim.completed.is_empty(), "one secondary of two has acked");
        sim.members[1].log.push((1, offset, id));
        sim.primary.ack_received(1, ack(1, 0, 0), 0).unwrap();
        sim.pump();
        assert_eq!(sim.completed, vec![1]);
    }

    #[test]
    fn all_acked_is_sent_within_the_delay_when_idle() {
        let mut sim = Sim::new(1);
        let mut rng = Rng(9);
        sim.submit_write(1, &mut rng);
        sim.pump();
        sim.primary.local_write_done(1, Ok(()), 0);
        sim.primary.ack_received(0, ack(1, 0, 0), 0).unwrap();
        assert_eq!(sim.primary.all_acked_seq(), 1);
        assert_eq!(sim.primary.poll_timeout(), Some(10));
        sim.primary.handle_timeout(9);
        let early: Vec<_> = std::iter::from_fn(|| sim.primary.poll_action()).collect();
        assert!(!early
            .iter()
            .any(|a| matches!(a, Action::SendAllAcked { .. })));
        sim.primary.handle_timeout(10);
        let due: Vec<_> = std::iter::from_fn(|| sim.primary.poll_action()).collect();
        assert!(due
            .iter()
            .any(|a| matches!(a, Action::SendAllAcked { member: 0, seq: 1 })));
    }

    #[test]
    fn a_member_away_too_long_is_dropped_and_writes_complete_without_it() {
        let limits = PrimaryLimits {
            window_updates_max: 64,
            window_bytes_max: 1 << 20,
            all_acked_delay_ms: 10,
            member_timeout_ms: 100,
        };
        let geometry = Geometry {
            volume_size_bytes: 1 << 20,
            block_size_bytes: 4096,
            write_max_bytes: 1 << 16,
        };
        let mut primary: Primary<()> = Primary::new(limits, geometry, &[1 << 20, 1 << 20], 1, 0);
        primary.member_connected(0, empty_log(), 0).unwrap();
        primary.submit_write(1, 0, 4096, false, (), 0).unwrap();
        primary.local_write_done(1, Ok(()), 0);
        primary.ack_received(0, ack(1, 0, 0), 0).unwrap();
        let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Complete { .. })),
            "member 1 is still in the set"
        );
        primary.handle_timeout(100);
        let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
        assert!(actions
            .iter()
            .any(|a| matches!(a, Action::MemberDropped { member: 1 })));
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::Complete {
                id: 1,
                result: Ok(())
            }
        )));
        assert_eq!(
            primary.member_connected(1, empty_log(), 200),
            Err(MemberRefusal::Dropped)
        );
    }

    #[test]
    fn refuses_bad_requests_without_taking_a_seq() {
        let mut sim = Sim::new(0);
        let primary = &mut sim.primary;
        assert!(matches!(
            primary.submit_write(1, 100, 4096, false, 1, 0),
            Err(RequestError::Misaligned { .. })
        ));
        assert!(matches!(
            primary.submit_write(1, BLOCKS * BLOCK, 4096, false, 1, 0),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            primary.submit_write(1, 0, 16 * 4096, false, 1, 0),
            Err(RequestError::TooLarge { .. })
        ));
        assert_eq!(primary.next_seq(), 1);
    }

    #[test]
    fn reconnect_refusals() {
        let mut sim = Sim::new(1);
        sim.primary.member_disconnected(0, 0);
        assert!(matches!(
            sim.primary.member_connected(
                0,
                MemberLog {
                    start_seq: 5,
                    next_seq: 5,
                    used_bytes: 0
                },
                0
            ),
            Err(MemberRefusal::Ahead { .. })
        ));
    }

    #[test]
    fn simulations_with_fixed_seeds() {
        for seed in 1..40 {
            simulate(seed * 0x9E37_79B9, 1 + (seed % 3) as usize, 300);
        }
        simulate(12345, 0, 200);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the interleaving of local writes, deliveries, acks,
        /// syncs, timeouts and reconnects: every request completes only when
        /// the rules allow, and every copy ends identical to the primary's.
        #[test]
        fn random_interleavings_keep_copies_identical(seed in any::<u64>(), members in 0usize..=3) {
            simulate(seed, members, 150);
        }
    }
}
