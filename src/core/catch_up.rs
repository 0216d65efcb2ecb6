//! Where a restarted primary resumes, and which log to read each record
//! from (claims 5-6: logs whose next update lies at different places are
//! brought together by applying to each copy the updates it lacks).
//!
//! A primary killed with writes in flight leaves its secondaries' logs
//! ending at different seqs, and its own copy possibly without updates that
//! are in those logs. Given where each reachable secondary's log starts and
//! ends, [`plan_catch_up`] finds the range of seqs `first_seq..end_seq` to
//! replay and, for each part of it, a secondary whose log holds it.
//!
//! Why every seq of that range is in some log. Let `x` be a seq with
//! `low <= x < high`, `low` the lowest start of a log and `high` the highest
//! end; take a secondary `i` whose log starts at or before `x` (the one that
//! starts at `low` does). If `i`'s log goes past `x`, `i` holds `x`.
//! Otherwise `i` never logged `x`, so `x` was never all-acked: the previous
//! run put `i` in the set of every update (every secondary not dropped is in
//! every set), and the all-acked point passes an update only once every
//! member of its set has logged it. A secondary clears records only up to an
//! all-acked point it was told, so nobody cleared `x`, and the secondary whose
//! log ends at `high` logged `x` and still holds it. The argument fails only
//! if `i` had been dropped from the volume in the previous run (the primary
//! does not persist that): then `x` may be cleared everywhere, the plan finds
//! a seq nobody holds, and it is refused; `i` needs a resync.
//!
//! Why the primary's copy needs nothing below `low`: every log has cleared
//! those seqs, so they were all-acked, and the all-acked point passes an
//! update only once the primary's own copy has it
//! (see [`super::primary`]).

use thiserror::Error;

use super::primary::MemberLog;

/// Where a restarted primary resumes and what it replays first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUpPlan {
    /// The seq of the first record to replay: the lowest start of a log.
    pub first_seq: u64,
    /// One past the last record to replay: the highest end of a log. New
    /// writes get seqs from here.
    pub end_seq: u64,
    /// The LogReads to make, in seq order, covering `first_seq..end_seq`
    /// without overlap.
    pub reads: Vec<LogReadPlan>,
}

impl CatchUpPlan {
    /// Records to replay.
    pub fn records(&self) -> u64 {
        self.end_seq - self.first_seq
    }
}

/// Records `from_seq..to_seq` are read from member `member`'s log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogReadPlan {
    /// Index of the member whose log holds them.
    pub member: usize,
    /// First seq.
    pub from_seq: u64,
    /// One past the last seq.
    pub to_seq: u64,
}

/// Why the logs cannot be brought together.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    /// No log is known.
    #[error("no secondary's log is known")]
    NoLogs,
    /// Some seqs in the range are in no log: a secondary missed updates the
    /// others have cleared.
    #[error("seqs {from_seq}..{to_seq} are in no secondary's log, though logs start at seq {first_seq} and reach seq {end_seq}; a secondary missed updates the others have cleared and needs replblk-resync")]
    Gap {
        /// First seq nobody holds.
        from_seq: u64,
        /// The next seq somebody holds.
        to_seq: u64,
        /// The lowest start of a log.
        first_seq: u64,
        /// The highest end of a log.
        end_seq: u64,
    },
}

/// Plans the catch-up from the logs of the members that answered (`None`
/// for the others). Each seq is read from the member holding it whose log
/// reaches furthest, so that the reads are as few as can be.
pub fn plan_catch_up(logs: &[Option<MemberLog>]) -> Result<CatchUpPlan, PlanError> {
    let known: Vec<(usize, MemberLog)> = logs
        .iter()
        .enumerate()
        .filter_map(|(member, log)| log.map(|log| (member, log)))
        .collect();
    for (_, log) in &known {
        assert!(
            log.start_seq >= 1 && log.start_seq <= log.next_seq,
            "a log runs from start_seq to next_seq: {log:?}"
        );
    }
    let first_seq = known
        .iter()
        .map(|(_, log)| log.start_seq)
        .min()
        .ok_or(PlanError::NoLogs)?;
    let end_seq = known
        .iter()
        .map(|(_, log)| log.next_seq)
        .max()
        .expect("not empty");
    let mut reads = Vec::new();
    let mut seq = first_seq;
    while seq < end_seq {
        let holder = known
            .iter()
            .filter(|(_, log)| log.start_seq <= seq && seq < log.next_seq)
            // Furthest end first, then the lowest index.
            .max_by_key(|(member, log)| (log.next_seq, std::cmp::Reverse(*member)));
        let Some(&(member, log)) = holder else {
            let to_seq = known
                .iter()
                .map(|(_, log)| log.start_seq)
                .filter(|&start| start > seq)
                .min()
                .unwrap_or(end_seq);
            return Err(PlanError::Gap {
                from_seq: seq,
                to_seq,
                first_seq,
                end_seq,
            });
        };
        reads.push(LogReadPlan {
            member,
            from_seq: seq,
            to_seq: log.next_seq,
        });
        seq = log.next_seq;
    }
    Ok(CatchUpPlan {
        first_seq,
        end_seq,
        reads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn log(start_seq: u64, next_seq: u64) -> Option<MemberLog> {
        Some(MemberLog {
            start_seq,
            next_seq,
            used_bytes: 0,
        })
    }

    #[test]
    fn equal_empty_logs_need_nothing() {
        let plan = plan_catch_up(&[log(7, 7), log(7, 7)]).unwrap();
        assert_eq!(
            plan,
            CatchUpPlan {
                first_seq: 7,
                end_seq: 7,
                reads: vec![]
            }
        );
    }

    #[test]
    fn a_primary_killed_mid_stream_replays_from_the_lowest_start_to_the_highest_end() {
        // Node A logged up to 105, B stopped at 103 and has cleared less.
        let plan = plan_catch_up(&[log(100, 106), log(98, 104)]).unwrap();
        assert_eq!(plan.first_seq, 98);
        assert_eq!(plan.end_seq, 106);
        assert_eq!(
            plan.reads,
            vec![
                LogReadPlan {
                    member: 1,
                    from_seq: 98,
                    to_seq: 104
                },
                LogReadPlan {
                    member: 0,
                    from_seq: 104,
                    to_seq: 106
                },
            ]
        );
    }

    #[test]
    fn the_furthest_log_serves_what_it_holds() {
        let plan = plan_catch_up(&[log(90, 104), log(95, 110), None]).unwrap();
        assert_eq!(
            plan.reads,
            vec![
                LogReadPlan {
                    member: 0,
                    from_seq: 90,
                    to_seq: 104
                },
                LogReadPlan {
                    member: 1,
                    from_seq: 104,
                    to_seq: 110
                },
            ]
        );
    }

    #[test]
    fn a_seq_in_no_log_is_refused_naming_the_gap() {
        // B missed 100..103 (it was dropped) and A has cleared them.
        let error = plan_catch_up(&[log(103, 110), log(80, 100)]).unwrap_err();
        assert_eq!(
            error,
            PlanError::Gap {
                from_seq: 100,
                to_seq: 103,
                first_seq: 80,
                end_seq: 110
            }
        );
        assert!(error.to_string().contains("seqs 100..103"), "{error}");
        assert_eq!(
            plan_catch_up(&[log(100, 100), log(103, 103)]).unwrap_err(),
            PlanError::Gap {
                from_seq: 100,
                to_seq: 103,
                first_seq: 100,
                end_seq: 103
            }
        );
    }

    #[test]
    fn no_log_is_refused() {
        assert_eq!(plan_catch_up(&[None, None]), Err(PlanError::NoLogs));
    }

    proptest! {
        /// The reads tile first_seq..end_seq in order, each from a log that
        /// holds it, exactly when every seq of the range is in some log.
        #[test]
        fn reads_tile_the_range_from_logs_that_hold_it(
            spans in prop::collection::vec(prop::option::of((1u64..50, 0u64..20)), 1..5),
        ) {
            let logs: Vec<Option<MemberLog>> = spans
                .iter()
                .map(|span| span.and_then(|(start, length)| log(start, start + length)))
                .collect();
            let held = |seq: u64| {
                logs.iter().flatten().any(|log| log.start_seq <= seq && seq < log.next_seq)
            };
            match plan_catch_up(&logs) {
                Ok(plan) => {
                    let mut seq = plan.first_seq;
                    for read in &plan.reads {
                        prop_assert_eq!(read.from_seq, seq);
                        prop_assert!(read.to_seq > read.from_seq);
                        let source = logs[read.member].unwrap();
                        prop_assert!(source.start_seq <= read.from_seq && read.to_seq <= source.next_seq);
                        seq = read.to_seq;
                    }
                    prop_assert_eq!(seq, plan.end_seq);
                }
                Err(PlanError::NoLogs) => prop_assert!(logs.iter().all(Option::is_none)),
                Err(PlanError::Gap { from_seq, to_seq, first_seq, end_seq }) => {
                    prop_assert!(first_seq <= from_seq && from_seq < to_seq && to_seq <= end_seq);
                    prop_assert!((from_seq..to_seq).all(|seq| !held(seq)));
                }
            }
        }
    }
}
