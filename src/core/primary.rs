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
//!   lacks while it is still a member. Only a payload nobody can need any
//!   more goes earlier: one written to the local copy whose set holds no
//!   secondary (a volume without secondaries, or whose secondaries were all
//!   dropped), so that its buffer goes back to the caller at completion.
//! - The all-acked point passes an update only once the primary's own copy
//!   has it too, so every update a secondary may clear from its log is in
//!   every copy: a primary killed and restarted finds in the logs every
//!   update its copy may lack (see [`plan_catch_up`]).
//!
//! A restarted primary resumes the stream where the longest log ends: it
//! reads back every record still in some log, submits them in seq order with
//! [`Primary::submit_catch_up`] so they get their own seqs again, and each
//! member is sent only the records its log lacks.

use std::collections::VecDeque;

use thiserror::Error;

use super::ack_tracker::{AckTracker, MEMBERS_MAX};
use super::local_writes::{Extent, LocalWrites};

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
    /// How long a connected secondary may owe an answer (an ack of an
    /// update sent, durability asked for, or clearing that would make room
    /// for held-back updates) without any progress before it is treated as
    /// gone: its connection is closed and `member_timeout_ms` starts. A
    /// stuck peer thus delays writes by at most the sum of the two.
    pub ack_timeout_ms: u64,
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
    /// It was away when this primary started, and its log goes past the
    /// seq the stream resumed at: those records were never read back, and
    /// this primary may have issued other updates under their seqs.
    #[error("secondary was not reachable when this primary started and its log reaches seq {log_next_seq}, past seq {resume_seq} where the stream resumed; its records from seq {resume_seq} may differ from the primary's, so it needs a resync")]
    UnseenHistory {
        /// The seq its log would append next.
        log_next_seq: u64,
        /// The seq of the first update issued by this primary run.
        resume_seq: u64,
    },
}

/// A record read back from a log that cannot be caught up.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CatchUpError {
    /// Records must come in seq order, without gaps, within the range
    /// reserved at [`Primary::new`].
    #[error("caught-up record seq {got} arrived when seq {expected} was expected (catch-up ends before seq {end_seq})")]
    OutOfOrder {
        /// The seq expected next.
        expected: u64,
        /// The seq received.
        got: u64,
        /// One past the last seq to catch up.
        end_seq: u64,
    },
    /// The record does not fit the volume.
    #[error("caught-up record seq {seq}: {source}")]
    Refused {
        /// The record's seq.
        seq: u64,
        /// Why.
        source: RequestError,
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
    /// The member owed an answer for `ack_timeout_ms` and made no progress:
    /// the core counts it as disconnected from now on, and the driver must
    /// close its connection (a later reconnect is welcome).
    MemberUnresponsive {
        /// Member index.
        member: usize,
        /// What it owed.
        owed: Owed,
    },
}

/// What a connected member owes the primary, for [`Action::MemberUnresponsive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owed {
    /// An ack of updates sent, up to this seq.
    Logged {
        /// Last seq sent.
        sent_seq: u64,
        /// Last seq it acked as logged.
        logged_seq: u64,
    },
    /// Durability (a flush or a FUA update) up to this seq.
    Durable {
        /// Seq asked to be durable.
        asked_seq: u64,
        /// Last seq it acked as durable.
        durable_seq: u64,
    },
    /// Clearing its log, which is too full for the next update, after it
    /// was told it may clear up to `all_acked_seq`.
    Cleared {
        /// Last seq it reported cleared.
        cleared_seq: u64,
        /// The all-acked point it was told.
        all_acked_seq: u64,
    },
}

impl std::fmt::Display for Owed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Owed::Logged { sent_seq, logged_seq } => write!(
                f,
                "an ack of updates up to seq {sent_seq} (acked up to {logged_seq})"
            ),
            Owed::Durable { asked_seq, durable_seq } => write!(
                f,
                "durability up to seq {asked_seq} (durable up to {durable_seq})"
            ),
            Owed::Cleared { cleared_seq, all_acked_seq } => write!(
                f,
                "clearing its full log up to seq {all_acked_seq} (cleared up to {cleared_seq}) so held-back updates fit"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalState {
    /// Waits for an earlier overlapping write to finish locally.
    Blocked,
    Writing,
    Written,
}

/// Which writes an event may have made complete.
#[derive(Debug, Clone, Copy)]
enum WritesToCheck {
    /// Any in the window.
    All,
    /// Only this seq's.
    One(u64),
    /// Only seqs `first..=last` (none if `last < first`).
    Seqs { first: u64, last: u64 },
}

#[derive(Debug)]
struct Slot<P> {
    id: RequestId,
    offset_bytes: u64,
    length_bytes: u32,
    fua: bool,
    /// `None` once no one can need it (see the module doc).
    payload: Option<P>,
    local: LocalState,
    completed: bool,
}

impl<P: Clone> Slot<P> {
    /// The payload, for a local write or a send, both of which the core
    /// emits only while it is held.
    fn payload(&self) -> P {
        self.payload
            .clone()
            .expect("a payload dropped while a write or a send still needed it")
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
    /// Connected at least once since this primary started; until then its
    /// log may hold records of the previous run past the resume point.
    joined: bool,
    /// Highest FUA update sent on this connection: it owes durability up
    /// to there.
    fua_sent_seq: u64,
    /// While connected: since when it has owed an answer without progress
    /// (see [`PrimaryLimits::ack_timeout_ms`]).
    owed_since_ms: Option<u64>,
    /// Since when the next update has waited for room in its log.
    log_full_since_ms: Option<u64>,
    /// Waits for room ended so far (see [`MemberStats`]).
    stats: MemberStats,
}

impl Member {
    /// Ends a wait for log room, if one is going on, adding it to the
    /// stats.
    fn end_log_full_wait(&mut self, now_ms: u64) {
        if let Some(since_ms) = self.log_full_since_ms.take() {
            self.stats.log_full_wait_ms += now_ms - since_ms;
        }
    }
}

/// How often a member's log held the stream back: what tells a user the
/// log is too small for the write load (every wait is time in which no
/// update reached that member).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberStats {
    /// Times the next update did not fit beside the member's records not
    /// yet cleared, so that sending to it stopped until it cleared some.
    pub log_full_waits: u64,
    /// Milliseconds spent in those waits, the one still going included.
    pub log_full_wait_ms: u64,
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
    /// FUA writes in the window. With none, and no flush waiting, no local
    /// sync is wanted: the window is not scanned for one at every event.
    fua_slots: usize,
    /// The slots whose local write is not finished (blocked or writing):
    /// the overlap checks ask these rather than scan the window, which
    /// also holds every written slot waiting for an older one to retire.
    local_unwritten: LocalWrites,
    /// Slots whose local write is blocked: with none, a finished write has
    /// nothing to unblock.
    local_blocked: usize,
    next_seq: u64,
    all_acked_seq: u64,
    pending: VecDeque<Pending<P>>,
    /// Seqs below this are reserved for records read back from the logs
    /// at start-up (see [`Primary::submit_catch_up`]).
    catch_up_end_seq: u64,
    /// The seq the next caught-up record must have.
    catch_up_next_seq: u64,
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
    ///
    /// Seqs `first_seq..catch_up_end_seq` are reserved for records read back
    /// from the secondaries' logs after a restart: the driver submits them
    /// with [`Primary::submit_catch_up`], in seq order, before any
    /// [`Primary::submit_write`]. `catch_up_end_seq == first_seq` when there
    /// is nothing to catch up.
    pub fn new(
        limits: PrimaryLimits,
        geometry: Geometry,
        member_ring_bytes: &[u64],
        first_seq: u64,
        catch_up_end_seq: u64,
        now_ms: u64,
    ) -> Primary<P> {
        let member_count = member_ring_bytes.len();
        assert!(first_seq >= 1, "seq 0 means none");
        assert!(catch_up_end_seq >= first_seq);
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
                joined: false,
                fua_sent_seq: 0,
                owed_since_ms: None,
                log_full_since_ms: None,
                stats: MemberStats::default(),
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
            fua_slots: 0,
            local_unwritten: LocalWrites::new(),
            local_blocked: 0,
            next_seq: first_seq,
            all_acked_seq: first_seq - 1,
            pending: VecDeque::new(),
            catch_up_end_seq,
            catch_up_next_seq: first_seq,
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

    /// The limits it runs with.
    pub fn limits(&self) -> &PrimaryLimits {
        &self.limits
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

    /// How often the member's log held the stream back, up to now.
    pub fn member_stats(&self, member: usize) -> MemberStats {
        let record = &self.members[member];
        let mut stats = record.stats;
        if let Some(since_ms) = record.log_full_since_ms {
            stats.log_full_wait_ms += self.now_ms - since_ms;
        }
        stats
    }

    /// Log-full waits begun so far, summed over the members: a cheap
    /// "did a wait begin" for the driver, which reports them.
    pub fn log_full_waits_total(&self) -> u64 {
        self.members
            .iter()
            .map(|record| record.stats.log_full_waits)
            .sum()
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

    /// One past the last seq reserved for caught-up records.
    pub fn catch_up_end_seq(&self) -> u64 {
        self.catch_up_end_seq
    }

    /// Submits a write. Refused at once (and never given a seq) if it is
    /// misaligned, too large or out of range; otherwise it completes later
    /// through [`Action::Complete`].
    ///
    /// Panics if caught-up records are still to be submitted: their seqs
    /// come first.
    pub fn submit_write(
        &mut self,
        id: RequestId,
        offset_bytes: u64,
        length_bytes: u32,
        fua: bool,
        payload: P,
        now_ms: u64,
    ) -> Result<(), RequestError> {
        assert_eq!(
            self.catch_up_next_seq, self.catch_up_end_seq,
            "a write submitted before every caught-up record"
        );
        self.set_now(now_ms);
        self.check_write(offset_bytes, length_bytes)?;
        // Nothing queued before it and room for it: admitted at once,
        // without the round trip through the queue.
        if self.pending.is_empty() && self.window_has_room(length_bytes) {
            self.start_write(id, offset_bytes, length_bytes, fua, payload);
            return Ok(());
        }
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

    /// Submits record `seq` read back from a secondary's log at start-up,
    /// to be written again under its own seq: to the primary's copy (in seq
    /// order for overlaps, like any write; writing it again leaves the same
    /// bytes) and to every member whose log lacks it. Records must come in
    /// seq order from `first_seq` to `catch_up_end_seq`; each completes
    /// through [`Action::Complete`] like a write.
    // The arguments are a write's, as for submit_write, plus its seq.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_catch_up(
        &mut self,
        id: RequestId,
        seq: u64,
        offset_bytes: u64,
        length_bytes: u32,
        fua: bool,
        payload: P,
        now_ms: u64,
    ) -> Result<(), CatchUpError> {
        self.set_now(now_ms);
        if seq != self.catch_up_next_seq || seq >= self.catch_up_end_seq {
            return Err(CatchUpError::OutOfOrder {
                expected: self.catch_up_next_seq,
                got: seq,
                end_seq: self.catch_up_end_seq,
            });
        }
        self.check_write(offset_bytes, length_bytes)
            .map_err(|source| CatchUpError::Refused { seq, source })?;
        // Every earlier caught-up record is queued or admitted, and no other
        // write was submitted, so admission in order gives this one `seq`.
        let queued = self
            .pending
            .iter()
            .filter(|pending| matches!(pending, Pending::Write { .. }))
            .count() as u64;
        debug_assert_eq!(self.next_seq + queued, seq);
        self.catch_up_next_seq += 1;
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
        // A caught-up record is in some members' logs already: those count
        // as sent and received, and are not sent it again. (A member away
        // now is marked when it connects, from its log's end.)
        for member in 0..self.members.len() {
            let record = &self.members[member];
            if record.state == MemberState::Connected && record.logged_seq >= seq {
                debug_assert!(record.next_to_send > seq);
                self.tracker.mark_sent(member, seq);
                self.tracker.mark_received(member, seq);
            }
        }
        let extent = Extent {
            seq,
            offset_bytes,
            end_bytes: offset_bytes + u64::from(length_bytes),
        };
        let blocked = self.local_unwritten.insert(extent);
        self.local_blocked += usize::from(blocked);
        // The slot keeps the caller's handle and a local write starting now
        // gets the one clone: in the daemon each clone and drop of a
        // handle is an atomic operation.
        let local_write = (!blocked).then(|| payload.clone());
        self.slots.push_back(Slot {
            id,
            offset_bytes,
            length_bytes,
            fua,
            payload: Some(payload),
            local: if blocked {
                LocalState::Blocked
            } else {
                LocalState::Writing
            },
            completed: false,
        });
        self.window_bytes += u64::from(length_bytes);
        self.fua_slots += usize::from(fua);
        debug_assert_eq!(
            self.window_start_seq + self.slots.len() as u64,
            self.next_seq
        );
        if let Some(payload) = local_write {
            self.actions.push_back(Action::LocalWrite {
                seq,
                offset_bytes,
                payload,
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
                let now_ms = self.now_ms;
                let record = &mut self.members[member];
                if record.in_log_bytes + size > record.ring_bytes {
                    // Held back until the member reports records cleared.
                    if record.log_full_since_ms.is_none() {
                        record.log_full_since_ms = Some(now_ms);
                        record.stats.log_full_waits += 1;
                    }
                    return;
                }
                record.end_log_full_wait(now_ms);
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
            payload: slot.payload(),
        };
        if slot.fua {
            self.members[member].fua_sent_seq = seq;
        }
        self.tracker.mark_sent(member, seq);
        self.actions.push_back(action);
        self.note_all_acked_sent(member);
    }

    fn note_all_acked_sent(&mut self, member: usize) {
        let member = &mut self.members[member];
        member.all_acked_sent_seq = self.all_acked_seq;
        member.all_acked_pending_since_ms = None;
    }

    /// The last seq issued or reserved: members' logs and acks may reach it.
    fn last_known_seq(&self) -> u64 {
        self.next_seq.max(self.catch_up_end_seq) - 1
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
        let no_secondary = self.tracker.set_mask(seq) == 0;
        let slot = self.slot_mut(seq).expect("local write of a live slot");
        assert_eq!(slot.local, LocalState::Writing, "seq {seq} written twice");
        slot.local = LocalState::Written;
        if no_secondary {
            slot.payload = None;
        }
        let extent = self.local_unwritten.remove(seq);
        if self.local_blocked > 0 {
            self.unblock_after(&extent);
        }
        // Only this write's own state changed: no other write can have
        // become complete, so the window is not scanned for one.
        self.progress_checking(WritesToCheck::One(seq));
    }

    /// Starts the local writes that were waiting only for `written`, which
    /// just finished.
    fn unblock_after(&mut self, written: &Extent) {
        for extent in self.local_unwritten.newer_overlapping(written) {
            let slot = self.slot(extent.seq).expect("an unwritten slot is live");
            if slot.local != LocalState::Blocked {
                continue;
            }
            if !self.local_unwritten.overlapped_by_older(&extent) {
                self.local_blocked -= 1;
                let slot = self.slot_mut(extent.seq).expect("checked above");
                slot.local = LocalState::Writing;
                let (offset_bytes, payload) = (slot.offset_bytes, slot.payload());
                self.actions.push_back(Action::LocalWrite {
                    seq: extent.seq,
                    offset_bytes,
                    payload,
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
        // A member away at start-up may hold records of the previous run
        // past the resume point: this run issues other updates under those
        // seqs, so they would never be sent to it. Checked first, as it says
        // more than Ahead.
        if !self.members[member].joined && log_next_seq > self.catch_up_end_seq {
            return Err(MemberRefusal::UnseenHistory {
                log_next_seq,
                resume_seq: self.catch_up_end_seq,
            });
        }
        if log_next_seq > self.last_known_seq() + 1 {
            return Err(MemberRefusal::Ahead {
                log_next_seq,
                primary_next_seq: self.last_known_seq() + 1,
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
        record.joined = true;
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
        record.fua_sent_seq = 0;
        record.owed_since_ms = None;
        // What the last connection was told may have died with it (a
        // secondary killed before it cleared): this one has been told only
        // what its log shows it cleared, so the all-acked point goes out
        // again below. Without it a member back with a full log is sent
        // neither the point nor, for want of room, the next update.
        record.all_acked_sent_seq = log.start_seq - 1;
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
            self.members[member].owed_since_ms = None;
            self.members[member].end_log_full_wait(self.now_ms);
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
        if logged_seq > self.last_known_seq() {
            return Err(AckViolation::Beyond {
                acked: logged_seq,
                last_issued: self.last_known_seq(),
            });
        }
        if durable_seq > logged_seq {
            return Err(AckViolation::DurableBeyondLogged {
                durable: durable_seq,
                logged: logged_seq,
            });
        }
        // Below the seq this run resumed at, a secondary may still be
        // clearing on the previous run's all-acked notifications.
        let clearable_seq = self
            .all_acked_seq
            .max(record.cleared_seq)
            .max(self.catch_up_end_seq - 1);
        if cleared_seq > clearable_seq || cleared_seq < record.cleared_seq {
            return Err(AckViolation::Cleared {
                cleared: cleared_seq,
                previous: record.cleared_seq,
                all_acked: self.all_acked_seq,
            });
        }
        let bit = 1u64 << member;
        let first = (record.logged_seq + 1).max(self.window_start_seq);
        let last = logged_seq.min(self.next_seq - 1);
        // Seqs not issued yet (reserved for caught-up records) are marked
        // when they are, from `logged_seq`.
        for seq in first..=last {
            if self.tracker.set_mask(seq) & bit != 0 {
                self.tracker.mark_received(member, seq);
            }
        }
        let record = &mut self.members[member];
        // Only the writes this ack newly covers can have become complete,
        // unless a FUA write became durable here: checking just those
        // keeps an ack's cost independent of the window's size, which a
        // lagging secondary fills (a scan of 1,024 slots per ack took 4 µs).
        let writes = if durable_seq > record.durable_seq && self.fua_slots > 0 {
            WritesToCheck::All
        } else {
            WritesToCheck::Seqs { first, last }
        };
        let progressed = logged_seq > record.logged_seq
            || durable_seq > record.durable_seq
            || cleared_seq > record.cleared_seq;
        if progressed {
            // The clock restarts; `progress` stops it if nothing is owed.
            record.owed_since_ms = None;
        }
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
        self.progress_checking(writes);
        Ok(())
    }

    /// When [`Primary::handle_timeout`] wants to be called next, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.members
            .iter()
            .filter_map(|member| match member.state {
                MemberState::Connected => {
                    let all_acked_due = member
                        .all_acked_pending_since_ms
                        .map(|since| since + self.limits.all_acked_delay_ms);
                    let owed_due = member
                        .owed_since_ms
                        .map(|since| since + self.limits.ack_timeout_ms);
                    all_acked_due.into_iter().chain(owed_due).min()
                }
                MemberState::Disconnected { since_ms } => {
                    Some(since_ms + self.limits.member_timeout_ms)
                }
                MemberState::Dropped => None,
            })
            .min()
    }

    /// Time has passed: sends due all-acked notifications, disconnects
    /// members that owed an answer too long and drops members gone too long.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.set_now(now_ms);
        for member in 0..self.members.len() {
            match self.members[member].state {
                MemberState::Connected => {
                    let unresponsive = self.members[member]
                        .owed_since_ms
                        .is_some_and(|since| since + self.limits.ack_timeout_ms <= self.now_ms);
                    if unresponsive {
                        let owed = self.owed(member).expect("a clock runs only while owed");
                        let record = &mut self.members[member];
                        record.state = MemberState::Disconnected {
                            since_ms: self.now_ms,
                        };
                        record.owed_since_ms = None;
                        self.actions
                            .push_back(Action::MemberUnresponsive { member, owed });
                        continue;
                    }
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
        self.members[member].end_log_full_wait(self.now_ms);
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
        self.progress_checking(WritesToCheck::All);
    }

    /// As [`Primary::progress`], looking for completed writes only among
    /// `writes`.
    fn progress_checking(&mut self, writes: WritesToCheck) {
        if self.failed.is_some() {
            return;
        }
        self.advance_all_acked();
        self.request_local_sync();
        self.complete_writes(writes);
        // A scan per event: checked in debug builds and in this module's
        // tests, whose simulations run every interleaving (also in release).
        if cfg!(any(test, debug_assertions)) {
            assert!(
                (0..self.slots.len()).all(|index| !self.is_completable(index)),
                "a completable write was left out of the check"
            );
            self.check_local_unwritten();
        }
        self.complete_flushes();
        self.retire();
        self.admit_pending();
        self.tell_held_back_members();
        self.run_owed_clocks();
    }

    /// A member held back for log space gets a newer all-acked point at
    /// once rather than after `all_acked_delay_ms`: no update will carry it
    /// there, and only the records it clears on it make room for the next
    /// update. Waiting out the delay stalled the stream each time a log
    /// filled up.
    fn tell_held_back_members(&mut self) {
        for member in 0..self.members.len() {
            let record = &self.members[member];
            let held_back =
                record.state == MemberState::Connected && record.next_to_send < self.next_seq;
            if held_back && record.all_acked_sent_seq < self.all_acked_seq {
                self.actions.push_back(Action::SendAllAcked {
                    member,
                    seq: self.all_acked_seq,
                });
                self.note_all_acked_sent(member);
            }
        }
    }

    /// What a connected member owes, if anything: the first of an ack of
    /// what it was sent, durability it was asked for, or clearing that held
    /// back updates wait for.
    fn owed(&self, member: usize) -> Option<Owed> {
        let record = &self.members[member];
        if record.state != MemberState::Connected {
            return None;
        }
        let sent_seq = record.next_to_send - 1;
        if record.logged_seq < sent_seq {
            return Some(Owed::Logged {
                sent_seq,
                logged_seq: record.logged_seq,
            });
        }
        let bit = 1u64 << member;
        let asked_seq = self
            .flushes
            .iter()
            .filter(|flush| flush.wait_mask & bit != 0)
            .map(|flush| flush.through_seq)
            .max()
            .unwrap_or(0)
            .max(record.fua_sent_seq)
            .min(sent_seq);
        if record.durable_seq < asked_seq {
            return Some(Owed::Durable {
                asked_seq,
                durable_seq: record.durable_seq,
            });
        }
        let held_back = record.next_to_send < self.next_seq;
        if held_back && record.cleared_seq < record.all_acked_sent_seq.min(record.logged_seq) {
            return Some(Owed::Cleared {
                cleared_seq: record.cleared_seq,
                all_acked_seq: record.all_acked_sent_seq,
            });
        }
        None
    }

    /// Starts the clock of every member that now owes an answer, and stops
    /// that of every member that owes nothing.
    fn run_owed_clocks(&mut self) {
        for member in 0..self.members.len() {
            let owes = self.owed(member).is_some();
            let now_ms = self.now_ms;
            let record = &mut self.members[member];
            match (owes, record.owed_since_ms) {
                (true, None) => record.owed_since_ms = Some(now_ms),
                (false, Some(_)) => record.owed_since_ms = None,
                _ => {}
            }
        }
    }

    /// Claim 9: the all-acked point is the end of the contiguous prefix of
    /// updates whose every set member has both indicators set, and which the
    /// primary's own copy holds: what the secondaries clear on this
    /// notification must be in every copy, or a primary killed before its
    /// local write finished would restart without the update anywhere.
    fn advance_all_acked(&mut self) {
        let before = self.all_acked_seq;
        while self.all_acked_seq + 1 < self.next_seq
            && self.tracker.is_fully_acked(self.all_acked_seq + 1)
            && self
                .slot(self.all_acked_seq + 1)
                .is_some_and(|slot| slot.local == LocalState::Written)
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

    /// The overlap checks' record of unfinished local writes agrees with
    /// the slots (checked where the window is scanned anyway).
    fn check_local_unwritten(&self) {
        let mut recorded: Vec<u64> = self.local_unwritten.seqs().collect();
        recorded.sort_unstable();
        let unwritten: Vec<u64> = (self.window_start_seq..self.next_seq)
            .zip(&self.slots)
            .filter(|(_, slot)| slot.local != LocalState::Written)
            .map(|(seq, _)| seq)
            .collect();
        assert_eq!(recorded, unwritten, "unfinished local writes");
        let blocked = self
            .slots
            .iter()
            .filter(|slot| slot.local == LocalState::Blocked);
        assert_eq!(blocked.count(), self.local_blocked, "blocked local writes");
    }

    /// Every seq up to the returned one is written to the local copy.
    fn local_written_through(&self) -> u64 {
        self.local_unwritten.oldest_seq().unwrap_or(self.next_seq) - 1
    }

    fn request_local_sync(&mut self) {
        if self.local_sync_in_flight.is_some() || (self.flushes.is_empty() && self.fua_slots == 0) {
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

    /// Whether the write in `slots[index]` can complete now: written
    /// locally, fully acknowledged and, with FUA, durable everywhere.
    fn is_completable(&self, index: usize) -> bool {
        let seq = self.window_start_seq + index as u64;
        let slot = &self.slots[index];
        !slot.completed
            && slot.local == LocalState::Written
            && self.tracker.is_fully_acked(seq)
            && (!slot.fua || self.durable_everywhere(seq, self.tracker.set_mask(seq)))
    }

    fn complete_writes(&mut self, writes: WritesToCheck) {
        let indexes = match writes {
            WritesToCheck::All => 0..self.slots.len(),
            WritesToCheck::One(seq) => {
                let index = (seq - self.window_start_seq) as usize;
                index..index + 1
            }
            WritesToCheck::Seqs { first, last } if first <= last => {
                debug_assert!(first >= self.window_start_seq && last < self.next_seq);
                (first - self.window_start_seq) as usize
                    ..(last - self.window_start_seq) as usize + 1
            }
            WritesToCheck::Seqs { .. } => 0..0,
        };
        for index in indexes {
            if self.is_completable(index) {
                let id = self.slots[index].id;
                self.slots[index].completed = true;
                self.complete(id, Ok(()));
            }
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
            self.fua_slots -= usize::from(slot.fua);
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
        /// Each member's ring.
        ring_bytes: u64,
        /// How often the core gave up on an unresponsive member.
        unresponsive: u64,
    }

    fn sim_limits() -> PrimaryLimits {
        PrimaryLimits {
            window_updates_max: 64,
            window_bytes_max: 64 * BLOCK * 8,
            all_acked_delay_ms: 10,
            member_timeout_ms: 1_000_000,
            ack_timeout_ms: 1_000_000,
        }
    }

    fn sim_geometry() -> Geometry {
        Geometry {
            volume_size_bytes: BLOCKS * BLOCK,
            block_size_bytes: BLOCK as u32,
            write_max_bytes: 8 * BLOCK as u32,
        }
    }

    /// Request ids of the records a restarted primary finds in the logs:
    /// this plus their seq, clear of the ids the workload uses.
    const HISTORY_ID_BASE: u64 = 1 << 40;

    /// Blocks of `length` bytes at `offset` set to `id` in a copy.
    fn apply(copy: &mut HashMap<u64, u64>, offset: u64, length: u64, id: u64) {
        for block in 0..length / BLOCK {
            copy.insert(offset / BLOCK + block, id);
        }
    }

    impl Sim {
        fn new(member_count: usize) -> Sim {
            Sim::with_limits(member_count, sim_limits())
        }

        fn with_limits(member_count: usize, limits: PrimaryLimits) -> Sim {
            let mut primary = Primary::new(
                limits,
                sim_geometry(),
                &vec![RING_BYTES; member_count],
                1,
                1,
                0,
            );
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
                ring_bytes: RING_BYTES,
                unresponsive: 0,
            }
        }

        /// A primary restarted after a kill -9 in the middle of a run:
        /// every member's log ends at its own seq and starts at its own
        /// seq; the primary's copy holds every record up to the old
        /// all-acked point and a random few after it (some never logged
        /// anywhere). Members connect before or after the records are
        /// submitted, as the driver's tasks may. Returns the sim, with the
        /// caught-up records and a flush submitted, and the requests
        /// submitted.
        fn restarted(member_count: usize, rng: &mut Rng) -> (Sim, u64) {
            assert!(member_count >= 1);
            // Rings of 64 pages: a few largest records.
            let ring_bytes = 64 * BLOCK;
            let size = |length: u64| crate::core::secondary::record_size_bytes(length as u32);
            // The previous run issued `issued` records: (offset, length) of
            // seq s at history[s].
            let issued = 5 + rng.below(60);
            let history: Vec<(u64, u64)> = (0..=issued)
                .map(|_| {
                    let blocks = 1 + rng.below(8);
                    (rng.below(BLOCKS - blocks + 1) * BLOCK, blocks * BLOCK)
                })
                .collect();
            // The lowest start a log ending before `next` can have: the
            // primary never let a log hold more than its ring.
            let fit_start = |next: u64| {
                let mut start = next;
                let mut used = 0;
                while start > 1 && used + size(history[start as usize - 1].1) <= ring_bytes {
                    start -= 1;
                    used += size(history[start as usize].1);
                }
                start
            };
            // The longest log ends at `high`; every log reaches the old
            // all-acked point and starts at or before the seq after it.
            let high = 2 + rng.below(issued);
            let all_acked = fit_start(high) - 1 + rng.below(high - fit_start(high) + 1);
            let all_acked = all_acked.min(high - 1);
            let logs: Vec<MemberLog> = (0..member_count)
                .map(|member| {
                    let next_seq = if member == 0 {
                        high
                    } else {
                        all_acked + 1 + rng.below(high - all_acked)
                    };
                    let lowest = fit_start(next_seq);
                    let start_seq = lowest + rng.below(all_acked + 2 - lowest);
                    MemberLog {
                        start_seq,
                        next_seq,
                        used_bytes: (start_seq..next_seq)
                            .map(|seq| size(history[seq as usize].1))
                            .sum(),
                    }
                })
                .collect();
            let plan = crate::core::catch_up::plan_catch_up(
                &logs.iter().copied().map(Some).collect::<Vec<_>>(),
            )
            .expect("logs of a real run leave no gap");
            assert_eq!(plan.end_seq, high);
            let mut sim = Sim::new(0);
            sim.ring_bytes = ring_bytes;
            sim.primary = Primary::new(
                sim_limits(),
                sim_geometry(),
                &vec![ring_bytes; member_count],
                plan.first_seq,
                plan.end_seq,
                0,
            );
            for seq in 1..=issued {
                let (offset, length) = history[seq as usize];
                sim.lengths.insert(HISTORY_ID_BASE + seq, length);
                // The primary's copy: everything all-acked, and then some.
                if seq <= all_acked || rng.below(2) == 0 {
                    apply(&mut sim.local_copy, offset, length, HISTORY_ID_BASE + seq);
                }
            }
            sim.local_written = (1..plan.first_seq).collect();
            for log in &logs {
                let mut member = SimMember {
                    all_acked_known: all_acked,
                    cleared_seq: log.start_seq - 1,
                    durable_seq: log.next_seq - 1,
                    ..SimMember::default()
                };
                for seq in 1..log.next_seq {
                    let (offset, length) = history[seq as usize];
                    member.log.push((seq, offset, HISTORY_ID_BASE + seq));
                    apply(&mut member.copy, offset, length, HISTORY_ID_BASE + seq);
                }
                sim.members.push(member);
            }
            let early: Vec<bool> = (0..member_count).map(|_| rng.below(2) == 0).collect();
            let connect = |sim: &mut Sim, member: usize| {
                sim.members[member].connected = true;
                sim.primary
                    .member_connected(member, logs[member], sim.now_ms)
                    .unwrap();
            };
            for member in (0..member_count).filter(|&member| early[member]) {
                connect(&mut sim, member);
            }
            for seq in plan.first_seq..plan.end_seq {
                let id = HISTORY_ID_BASE + seq;
                let (offset, length) = history[seq as usize];
                sim.seq_of_request.insert(id, seq);
                sim.primary
                    .submit_catch_up(id, seq, offset, length as u32, false, id, 0)
                    .unwrap();
            }
            let flush_id = HISTORY_ID_BASE;
            sim.flush_through.insert(flush_id, plan.end_seq - 1);
            sim.primary.submit_flush(flush_id, 0);
            for member in (0..member_count).filter(|&member| !early[member]) {
                connect(&mut sim, member);
            }
            sim.pump();
            // What was issued but never logged: the kernel re-issues it.
            let mut requests = plan.records() + 1;
            for seq in high..=issued {
                let (offset, length) = history[seq as usize];
                let id = HISTORY_ID_BASE + issued + seq;
                sim.submit_write_at(id, offset, length, false);
                requests += 1;
            }
            sim.pump();
            (sim, requests)
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
                        assert!(
                            (1..=seq).all(|seq| self.local_written.contains(&seq)),
                            "all-acked {seq} passed the primary's own copy"
                        );
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
                    Action::MemberUnresponsive { member, .. } => {
                        // The driver closes the connection: what was in
                        // flight on it is lost.
                        let sim = &mut self.members[member];
                        assert!(sim.connected, "member {member} given up twice");
                        sim.inbox.clear();
                        sim.connected = false;
                        self.unresponsive += 1;
                    }
                    Action::MemberDropped { .. } => panic!("no member is dropped here"),
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
            let fua = rng.below(10) == 0;
            self.submit_write_at(id, start * BLOCK, blocks * BLOCK, fua);
        }

        fn submit_write_at(&mut self, id: u64, offset: u64, length: u64, fua: bool) {
            self.lengths.insert(id, length);
            self.seq_of_request
                .insert(id, self.primary.next_seq() + self.queued_writes());
            self.primary
                .submit_write(id, offset, length as u32, fua, id, self.now_ms)
                .unwrap();
        }

        /// Ring bytes of the member's records not yet cleared.
        fn used_bytes(sim: &SimMember, lengths: &HashMap<u64, u64>) -> u64 {
            sim.log[sim.cleared_seq as usize..]
                .iter()
                .map(|(_, _, id)| crate::core::secondary::record_size_bytes(lengths[id] as u32))
                .sum()
        }

        /// The member's link comes up, its log as it stands.
        fn reconnect(&mut self, member: usize) {
            let sim = &mut self.members[member];
            sim.connected = true;
            // As a restarted secondary: what it was told of the all-acked
            // point survives only as far as it cleared.
            sim.all_acked_known = sim.cleared_seq;
            let log = MemberLog {
                start_seq: sim.cleared_seq + 1,
                next_seq: sim.log.len() as u64 + 1,
                used_bytes: Self::used_bytes(sim, &self.lengths),
            };
            self.primary
                .member_connected(member, log, self.now_ms)
                .unwrap();
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
                        used <= self.ring_bytes,
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
                    self.reconnect(member);
                }
                7 => {
                    // A member the core gave up on connects again.
                    let member = rng.below(self.members.len().max(1) as u64) as usize;
                    let Some(sim) = self.members.get_mut(member) else {
                        return false;
                    };
                    if sim.connected {
                        return false;
                    }
                    self.reconnect(member);
                }
                _ => return false,
            }
            true
        }
    }

    fn simulate(seed: u64, member_count: usize, writes: u64) {
        let mut rng = Rng(seed | 1);
        let sim = Sim::new(member_count);
        run_workload(sim, &mut rng, seed, writes, 0);
    }

    /// A primary killed mid-run and restarted: it catches up, the kernel
    /// re-issues what was never logged, and the workload goes on.
    fn simulate_restart(seed: u64, member_count: usize, writes: u64) {
        let mut rng = Rng(seed | 1);
        let (sim, requests) = Sim::restarted(member_count, &mut rng);
        run_workload(sim, &mut rng, seed, writes, requests);
    }

    /// Submits `writes` random requests among random events, lets it all
    /// settle and checks that every request (`earlier` of them submitted
    /// before) completed and every copy ends identical.
    fn run_workload(mut sim: Sim, rng: &mut Rng, seed: u64, writes: u64, earlier: u64) -> Sim {
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
                    sim.submit_write(next_id, rng);
                }
                next_id += 1;
                sim.pump();
            }
            sim.step(rng);
            sim.pump();
        }
        let requests = earlier + next_id - 1;
        // Let everything settle, still in random order.
        for _ in 0..200_000 {
            if sim.completed.len() as u64 == requests && sim.primary.is_quiescent() {
                break;
            }
            sim.step(rng);
            sim.pump();
        }
        assert_eq!(
            sim.completed.len() as u64,
            requests,
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
        sim
    }

    /// Members that fall silent for longer than a short `ack_timeout_ms`
    /// are given up on (their connection closed, what was on it lost) and
    /// connect again later; returns how often that happened.
    fn simulate_unresponsive(seed: u64, member_count: usize, writes: u64) -> u64 {
        let mut rng = Rng(seed | 1);
        let limits = PrimaryLimits {
            ack_timeout_ms: 40,
            ..sim_limits()
        };
        let sim = Sim::with_limits(member_count, limits);
        run_workload(sim, &mut rng, seed, writes, 0).unresponsive
    }

    #[test]
    fn members_given_up_on_for_silence_come_back_and_every_copy_ends_identical() {
        let given_up: u64 = (1..40u64)
            .map(|seed| simulate_unresponsive(seed * 0x9E37_79B9, 1 + (seed % 3) as usize, 150))
            .sum();
        // The runs above must exercise the path, or they prove nothing.
        assert!(given_up > 20, "only {given_up} members were given up on");
    }

    /// The seqs of the local writes the primary asks for now.
    fn local_writes_asked(primary: &mut Primary<u64>) -> Vec<u64> {
        let mut seqs = Vec::new();
        while let Some(action) = primary.poll_action() {
            if let Action::LocalWrite { seq, .. } = action {
                seqs.push(seq);
            }
        }
        seqs
    }

    #[test]
    fn only_a_write_that_overlaps_an_unwritten_one_waits_for_it() {
        let geometry = Geometry {
            volume_size_bytes: 1 << 34,
            block_size_bytes: BLOCK as u32,
            write_max_bytes: 8 * BLOCK as u32,
        };
        let mut primary: Primary<u64> = Primary::new(sim_limits(), geometry, &[], 1, 1, 0);
        primary.submit_write(1, 0, 8192, false, 1, 0).unwrap();
        primary.submit_write(2, 1 << 30, 4096, false, 2, 0).unwrap();
        primary.submit_write(3, 8192, 4096, false, 3, 0).unwrap();
        primary.submit_write(4, 4096, 4096, false, 4, 0).unwrap();
        assert_eq!(
            local_writes_asked(&mut primary),
            vec![1, 2, 3],
            "seq 4 overlaps seq 1; seq 3 only borders it"
        );
        primary.local_write_done(2, Ok(()), 0);
        assert!(local_writes_asked(&mut primary).is_empty());
        primary.local_write_done(1, Ok(()), 0);
        assert_eq!(local_writes_asked(&mut primary), vec![4]);
        primary.local_write_done(3, Ok(()), 0);
        primary.local_write_done(4, Ok(()), 0);
        primary.submit_write(5, 0, 4096, false, 5, 0).unwrap();
        assert_eq!(
            local_writes_asked(&mut primary),
            vec![5],
            "nothing unwritten is left"
        );
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

    /// One member; one write, done locally and acked at time 0, so that
    /// seq 1 is all-acked and the AllAcked is due at the delay.
    fn one_write_all_acked(seed: u64) -> Sim {
        let mut sim = Sim::new(1);
        let mut rng = Rng(seed);
        sim.submit_write(1, &mut rng);
        sim.pump();
        sim.primary.local_write_done(1, Ok(()), 0);
        sim.primary.ack_received(0, ack(1, 0, 0), 0).unwrap();
        sim
    }

    /// Drains the primary's actions; whether one sends member 0 AllAcked
    /// up to seq 1.
    fn sends_all_acked_1(sim: &mut Sim) -> bool {
        let actions: Vec<_> = std::iter::from_fn(|| sim.primary.poll_action()).collect();
        actions
            .iter()
            .any(|a| matches!(a, Action::SendAllAcked { member: 0, seq: 1 }))
    }

    #[test]
    fn all_acked_is_sent_within_the_delay_when_idle() {
        let mut sim = one_write_all_acked(9);
        assert_eq!(sim.primary.all_acked_seq(), 1);
        assert_eq!(sim.primary.poll_timeout(), Some(10));
        sim.primary.handle_timeout(9);
        assert!(!sends_all_acked_1(&mut sim), "not before the delay");
        sim.primary.handle_timeout(10);
        assert!(sends_all_acked_1(&mut sim));
    }

    #[test]
    fn a_member_held_back_for_log_space_is_told_the_all_acked_point_at_once() {
        // A ring with room for two 4 KiB records (8 KiB each): the third
        // write is held back until the member clears.
        let limits = PrimaryLimits {
            window_updates_max: 64,
            window_bytes_max: 1 << 20,
            all_acked_delay_ms: 10,
            member_timeout_ms: 1_000_000,
            ack_timeout_ms: 1_000_000,
        };
        let geometry = Geometry {
            volume_size_bytes: 1 << 20,
            block_size_bytes: 4096,
            write_max_bytes: 4096,
        };
        let ring_bytes = 2 * super::super::secondary::record_size_bytes(4096);
        let mut primary: Primary<()> = Primary::new(limits, geometry, &[ring_bytes], 1, 1, 0);
        primary.member_connected(0, empty_log(), 0).unwrap();
        for id in 1..=3 {
            primary
                .submit_write(id, id * 4096, 4096, false, (), 0)
                .unwrap();
        }
        let sent = |actions: &[Action<()>]| {
            actions
                .iter()
                .filter(|a| matches!(a, Action::SendUpdate { .. }))
                .count()
        };
        let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
        assert_eq!(sent(&actions), 2, "the third write waits for room");
        let waiting = MemberStats {
            log_full_waits: 1,
            log_full_wait_ms: 0,
        };
        assert_eq!(primary.member_stats(0), waiting);
        for seq in 1..=3 {
            primary.local_write_done(seq, Ok(()), 0);
        }
        primary.ack_received(0, ack(2, 0, 0), 1).unwrap();
        let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::SendAllAcked { member: 0, seq: 2 })),
            "told at once, not after the delay: {actions:?}"
        );
        primary.ack_received(0, ack(2, 0, 2), 2).unwrap();
        let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
        assert_eq!(sent(&actions), 1, "the cleared room takes the third write");
        let waited = MemberStats {
            log_full_waits: 1,
            log_full_wait_ms: 2,
        };
        assert_eq!(primary.member_stats(0), waited, "one wait, from 0 to 2 ms");
        primary.handle_timeout(50);
        assert_eq!(primary.member_stats(0), waited, "the wait ended at 2 ms");
    }

    #[test]
    fn a_reconnecting_member_is_told_the_all_acked_point_again() {
        // Found in the multi-process test: a secondary killed after the
        // AllAcked reached its socket but before it cleared came back with a
        // full log; the primary, believing it told, sent no AllAcked and so
        // no room for the next update, and the stream stalled for good.
        let mut sim = one_write_all_acked(11);
        sim.primary.handle_timeout(10);
        assert!(sends_all_acked_1(&mut sim));
        sim.primary.member_disconnected(0, 20);
        let full = MemberLog {
            start_seq: 1,
            next_seq: 2,
            used_bytes: RING_BYTES,
        };
        sim.primary.member_connected(0, full, 30).unwrap();
        sim.primary.handle_timeout(40);
        assert!(
            sends_all_acked_1(&mut sim),
            "the new connection is told again"
        );
    }

    #[test]
    fn a_member_away_too_long_is_dropped_and_writes_complete_without_it() {
        let limits = PrimaryLimits {
            window_updates_max: 64,
            window_bytes_max: 1 << 20,
            all_acked_delay_ms: 10,
            member_timeout_ms: 100,
            ack_timeout_ms: 1_000_000,
        };
        let geometry = Geometry {
            volume_size_bytes: 1 << 20,
            block_size_bytes: 4096,
            write_max_bytes: 1 << 16,
        };
        let mut primary: Primary<()> = Primary::new(limits, geometry, &[1 << 20, 1 << 20], 1, 1, 0);
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
        assert_dropped_and_completed(&actions, 1, 1);
        assert_eq!(
            primary.member_connected(1, empty_log(), 200),
            Err(MemberRefusal::Dropped)
        );
    }

    /// `member` was dropped and request `id` completed without it.
    fn assert_dropped_and_completed(actions: &[Action<()>], member: usize, id: RequestId) {
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::MemberDropped { member: m } if *m == member)),
            "member {member} dropped: {actions:?}"
        );
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Complete { id: i, result: Ok(()) } if *i == id)),
            "request {id} completed: {actions:?}"
        );
    }

    fn stuck_peer_limits() -> (PrimaryLimits, Geometry) {
        let limits = PrimaryLimits {
            window_updates_max: 64,
            window_bytes_max: 1 << 20,
            all_acked_delay_ms: 10,
            member_timeout_ms: 500,
            ack_timeout_ms: 100,
        };
        let geometry = Geometry {
            volume_size_bytes: 1 << 20,
            block_size_bytes: 4096,
            write_max_bytes: 1 << 16,
        };
        (limits, geometry)
    }

    fn unresponsive(actions: &[Action<()>]) -> Vec<(usize, Owed)> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::MemberUnresponsive { member, owed } => Some((*member, *owed)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn stuck_peer_a_secondary_that_never_acks_is_disconnected_then_dropped_and_the_write_completes()
    {
        let (limits, geometry) = stuck_peer_limits();
        let mut primary: Primary<()> = Primary::new(limits, geometry, &[1 << 20, 1 << 20], 1, 1, 0);
        primary.member_connected(0, empty_log(), 0).unwrap();
        primary.member_connected(1, empty_log(), 0).unwrap();
        primary.submit_write(1, 0, 4096, false, (), 0).unwrap();
        primary.local_write_done(1, Ok(()), 0);
        primary.ack_received(0, ack(1, 0, 0), 5).unwrap();
        let _ = std::iter::from_fn(|| primary.poll_action()).count();
        // Member 1 owes the ack since the update went out at 0.
        assert_eq!(primary.poll_timeout(), Some(100));
        primary.handle_timeout(99);
        let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
        assert!(unresponsive(&actions).is_empty(), "not yet: {actions:?}");
        primary.handle_timeout(100);
        let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
        assert_eq!(
            unresponsive(&actions),
            vec![(
                1,
                Owed::Logged {
                    sent_seq: 1,
                    logged_seq: 0
                }
            )]
        );
        assert!(!primary.is_connected(1));
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Complete { .. })),
            "the write still waits for member 1 while it may come back"
        );
        // It does not come back: dropped after member_timeout_ms more, and
        // the write completes without it.
        assert_eq!(primary.poll_timeout(), Some(600));
        primary.handle_timeout(600);
        let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
        assert_dropped_and_completed(&actions, 1, 1);
    }

    #[test]
    fn a_payload_no_secondary_needs_goes_back_once_written_locally() {
        use std::rc::Rc;
        for secondaries in [0usize, 1] {
            let rings = vec![1u64 << 20; secondaries];
            let mut primary: Primary<Rc<u64>> =
                Primary::new(sim_limits(), sim_geometry(), &rings, 1, 1, 0);
            let payloads: Vec<Rc<u64>> = (1..=2).map(Rc::new).collect();
            for (id, payload) in (1u64..).zip(&payloads) {
                let offset_bytes = id * BLOCK;
                primary
                    .submit_write(id, offset_bytes, BLOCK as u32, false, payload.clone(), 0)
                    .unwrap();
            }
            // Each local write holds its payload while it runs.
            let writes: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
            assert_eq!(writes.len(), 2, "{writes:?}");
            drop(writes);
            // The later write finishes first: seq 1 keeps the window from
            // retiring it.
            primary.local_write_done(2, Ok(()), 0);
            let held = Rc::strong_count(&payloads[1]) - 1;
            if secondaries == 0 {
                assert_eq!(held, 0, "nobody can need it: dropped at once");
                let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
                assert!(
                    matches!(
                        actions[..],
                        [Action::Complete {
                            id: 2,
                            result: Ok(())
                        }]
                    ),
                    "{actions:?}"
                );
            } else {
                assert_eq!(held, 1, "kept for the secondary, which has not had it");
            }
            assert_eq!(
                Rc::strong_count(&payloads[0]) - 1,
                1,
                "seq 1 still in flight"
            );
        }
    }

    #[test]
    fn stuck_peer_a_slow_secondary_that_keeps_making_progress_is_never_disconnected() {
        let (limits, geometry) = stuck_peer_limits();
        let mut primary: Primary<()> = Primary::new(limits, geometry, &[1 << 20], 1, 1, 0);
        primary.member_connected(0, empty_log(), 0).unwrap();
        // A new write every 60 ms, each acked 90 ms after it was sent: the
        // member always owes something, but never for 100 ms without
        // progress.
        for seq in 1..=20u64 {
            let now_ms = seq * 60;
            primary
                .submit_write(seq, 0, 4096, false, (), now_ms)
                .unwrap();
            primary.local_write_done(seq, Ok(()), now_ms);
            if seq > 1 {
                primary
                    .ack_received(0, ack(seq - 1, 0, 0), now_ms + 30)
                    .unwrap();
            }
            primary.handle_timeout(now_ms + 59);
            let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
            assert!(
                unresponsive(&actions).is_empty(),
                "at {now_ms} ms: {actions:?}"
            );
        }
        assert!(primary.is_connected(0));
    }

    #[test]
    fn stuck_peer_a_flush_never_made_durable_disconnects_the_secondary() {
        let (limits, geometry) = stuck_peer_limits();
        let mut primary: Primary<()> = Primary::new(limits, geometry, &[1 << 20], 1, 1, 0);
        primary.member_connected(0, empty_log(), 0).unwrap();
        primary.submit_write(1, 0, 4096, false, (), 0).unwrap();
        primary.local_write_done(1, Ok(()), 0);
        primary.ack_received(0, ack(1, 0, 0), 10).unwrap();
        primary.submit_flush(2, 20);
        let _ = std::iter::from_fn(|| primary.poll_action()).count();
        primary.handle_timeout(119);
        assert!(
            primary.is_connected(0),
            "the clock started with the flush at 20 ms"
        );
        primary.handle_timeout(120);
        let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
        assert_eq!(
            unresponsive(&actions),
            vec![(
                0,
                Owed::Durable {
                    asked_seq: 1,
                    durable_seq: 0
                }
            )]
        );
    }

    #[test]
    fn stuck_peer_only_the_stuck_secondary_is_blamed_when_a_healthy_ones_log_fills_behind_it() {
        let (limits, mut geometry) = stuck_peer_limits();
        geometry.write_max_bytes = 4096;
        // Member 0's log holds two records of 4 KiB; member 1's is large.
        let small_ring = 2 * super::super::secondary::record_size_bytes(4096);
        let mut primary: Primary<()> =
            Primary::new(limits, geometry, &[small_ring, 1 << 20], 1, 1, 0);
        primary.member_connected(0, empty_log(), 0).unwrap();
        primary.member_connected(1, empty_log(), 0).unwrap();
        for seq in 1..=3u64 {
            primary.submit_write(seq, 0, 4096, false, (), 0).unwrap();
            primary.local_write_done(seq, Ok(()), 0);
        }
        // Member 0 logs what it got (seq 3 is held back: its log is full);
        // member 1 acks nothing, so nothing is all-acked and member 0 may
        // not clear.
        primary.ack_received(0, ack(2, 0, 0), 10).unwrap();
        let _ = std::iter::from_fn(|| primary.poll_action()).count();
        primary.handle_timeout(100);
        let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
        assert_eq!(
            unresponsive(&actions),
            vec![(
                1,
                Owed::Logged {
                    sent_seq: 3,
                    logged_seq: 0
                }
            )]
        );
        assert!(primary.is_connected(0));
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

    fn drain(primary: &mut Primary<u64>) -> Vec<Action<u64>> {
        std::iter::from_fn(|| primary.poll_action()).collect()
    }

    fn log_of(start_seq: u64, next_seq: u64) -> MemberLog {
        MemberLog {
            start_seq,
            next_seq,
            used_bytes: 0,
        }
    }

    #[test]
    fn a_restarted_primary_sends_each_member_only_what_its_log_lacks() {
        // Killed mid-run: A logged up to 7 and cleared up to 2, B logged
        // up to 5. The primary replays 1..8 and resumes at 8.
        let mut primary: Primary<u64> =
            Primary::new(sim_limits(), sim_geometry(), &[1 << 20, 1 << 20], 1, 8, 0);
        primary.member_connected(0, log_of(3, 8), 0).unwrap();
        for seq in 1..8 {
            primary
                .submit_catch_up(seq, seq, seq * BLOCK, BLOCK as u32, false, seq, 0)
                .unwrap();
        }
        primary.submit_flush(100, 0);
        primary.member_connected(1, log_of(1, 6), 0).unwrap();
        let actions = drain(&mut primary);
        let sent: Vec<(usize, u64)> = actions
            .iter()
            .filter_map(|action| match action {
                Action::SendUpdate { member, seq, .. } => Some((*member, *seq)),
                _ => None,
            })
            .collect();
        assert_eq!(sent, vec![(1, 6), (1, 7)], "only B, only what it lacks");
        let written: Vec<u64> = actions
            .iter()
            .filter_map(|action| match action {
                Action::LocalWrite { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(
            written,
            (1..8).collect::<Vec<_>>(),
            "the primary's copy gets all"
        );
        assert_eq!(primary.next_seq(), 8);
        for seq in 1..8 {
            primary.local_write_done(seq, Ok(()), 0);
        }
        let completed = |actions: &[Action<u64>]| -> Vec<u64> {
            actions
                .iter()
                .filter_map(|action| match action {
                    Action::Complete { id, result } => {
                        result.as_ref().unwrap();
                        Some(*id)
                    }
                    _ => None,
                })
                .collect()
        };
        assert_eq!(
            completed(&drain(&mut primary)),
            vec![1, 2, 3, 4, 5],
            "B's acks of 6 and 7 are missing"
        );
        primary.ack_received(1, ack(7, 7, 0), 0).unwrap();
        assert_eq!(completed(&drain(&mut primary)), vec![6, 7]);
        assert_eq!(primary.all_acked_seq(), 7);
        // The flush waits for the local sync and A's durable point.
        primary.local_sync_done(7, Ok(()), 0);
        primary.ack_received(0, ack(7, 7, 2), 0).unwrap();
        assert_eq!(completed(&drain(&mut primary)), vec![100]);
        // New writes continue the stream.
        primary
            .submit_write(101, 0, BLOCK as u32, false, 101, 0)
            .unwrap();
        assert!(drain(&mut primary).iter().any(|action| matches!(
            action,
            Action::SendUpdate {
                member: 0,
                seq: 8,
                ..
            }
        )));
    }

    #[test]
    fn a_member_away_at_the_restart_with_a_longer_log_is_refused() {
        let mut primary: Primary<u64> =
            Primary::new(sim_limits(), sim_geometry(), &[1 << 20, 1 << 20], 5, 9, 0);
        primary.member_connected(0, log_of(5, 9), 0).unwrap();
        // Member 1 did not answer at start-up; its log reaches past 9, so
        // it holds records nobody read back, which new writes' seqs reuse.
        assert_eq!(
            primary.member_connected(1, log_of(6, 11), 0),
            Err(MemberRefusal::UnseenHistory {
                log_next_seq: 11,
                resume_seq: 9
            })
        );
        // Ending at or before the resume point, it is sent what it lacks.
        primary.member_connected(1, log_of(5, 7), 0).unwrap();
        for seq in 5..9 {
            primary
                .submit_catch_up(seq, seq, 0, BLOCK as u32, false, seq, 0)
                .unwrap();
        }
        let sent: Vec<(usize, u64)> = drain(&mut primary)
            .iter()
            .filter_map(|action| match action {
                Action::SendUpdate { member, seq, .. } => Some((*member, *seq)),
                _ => None,
            })
            .collect();
        assert_eq!(sent, vec![(1, 7), (1, 8)]);
    }

    #[test]
    fn caught_up_records_come_in_order_before_any_write() {
        let mut primary: Primary<u64> =
            Primary::new(sim_limits(), sim_geometry(), &[1 << 20], 5, 7, 0);
        assert_eq!(
            primary.submit_catch_up(1, 6, 0, BLOCK as u32, false, 1, 0),
            Err(CatchUpError::OutOfOrder {
                expected: 5,
                got: 6,
                end_seq: 7
            })
        );
        assert!(matches!(
            primary.submit_catch_up(1, 5, 1, BLOCK as u32, false, 1, 0),
            Err(CatchUpError::Refused {
                seq: 5,
                source: RequestError::Misaligned { .. }
            })
        ));
        primary
            .submit_catch_up(1, 5, 0, BLOCK as u32, false, 1, 0)
            .unwrap();
        primary
            .submit_catch_up(2, 6, 0, BLOCK as u32, false, 2, 0)
            .unwrap();
        assert!(matches!(
            primary.submit_catch_up(3, 7, 0, BLOCK as u32, false, 3, 0),
            Err(CatchUpError::OutOfOrder { .. })
        ));
        // Members may ack up to the end of the reserved range, no further.
        primary.member_connected(0, log_of(5, 7), 0).unwrap();
        assert!(matches!(
            primary.ack_received(0, ack(7, 7, 0), 0),
            Err(AckViolation::Beyond {
                acked: 7,
                last_issued: 6
            })
        ));
    }

    #[test]
    #[should_panic(expected = "before every caught-up record")]
    fn a_write_before_the_caught_up_records_is_a_driver_bug() {
        let mut primary: Primary<u64> =
            Primary::new(sim_limits(), sim_geometry(), &[1 << 20], 5, 7, 0);
        let _ = primary.submit_write(1, 0, BLOCK as u32, false, 1, 0);
    }

    #[test]
    fn all_acked_waits_for_the_primarys_own_copy() {
        let mut primary: Primary<u64> =
            Primary::new(sim_limits(), sim_geometry(), &[1 << 20], 1, 1, 0);
        primary.member_connected(0, log_of(1, 1), 0).unwrap();
        primary
            .submit_write(1, 0, BLOCK as u32, false, 1, 0)
            .unwrap();
        primary.ack_received(0, ack(1, 0, 0), 0).unwrap();
        assert_eq!(
            primary.all_acked_seq(),
            0,
            "a secondary may clear only what the primary's copy holds too"
        );
        primary.local_write_done(1, Ok(()), 0);
        assert_eq!(primary.all_acked_seq(), 1);
    }

    #[test]
    fn simulations_with_fixed_seeds() {
        for seed in 1..40 {
            simulate(seed * 0x9E37_79B9, 1 + (seed % 3) as usize, 300);
        }
        simulate(12345, 0, 200);
    }

    #[test]
    fn restarts_with_logs_ending_at_different_seqs_end_identical() {
        for seed in 1..60 {
            simulate_restart(seed * 0x9E37_79B9, 1 + (seed % 3) as usize, 100);
        }
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

        /// The same with members given up on when silent past a short
        /// `ack_timeout_ms`, and reconnecting.
        #[test]
        fn silent_members_given_up_on_keep_copies_identical(seed in any::<u64>(), members in 1usize..=3) {
            simulate_unresponsive(seed, members, 150);
        }

        /// A restart whatever the logs' ends, the primary copy's state, the
        /// order members connect in and the interleaving after: every
        /// member is sent exactly what its log lacks (the simulated link
        /// asserts each arrives at its log's end), and every copy, the
        /// primary's included, ends identical.
        #[test]
        fn restarts_catch_every_copy_up(seed in any::<u64>(), members in 1usize..=3) {
            simulate_restart(seed, members, 60);
        }
    }
}
