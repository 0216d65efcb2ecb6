//! The recovery scan: find the records a crash left in the ring.
//!
//! The header only says where the log starts; where it ends is whatever the
//! ring holds. The scan walks records from the start, keeps every one whose
//! checksum, seq and epoch prove it belongs to this log's current run, and
//! stops at the first that does not. The daemon acknowledges records
//! cumulatively and only after fdatasync, so everything it ever acked lies
//! before that stop; what lies after it was never acked and may be lost.

use std::fmt;
use std::io;
use std::path::Path;

use crate::buf::AlignedBuf;

use super::error::WalError;
use super::format::{
    record_magic_present, split_at_wrap, LogHeader, RecordHeader, LOG_ALIGN_BYTES,
    RECORD_HEADER_SIZE_BYTES, RECORD_PAYLOAD_OFFSET_BYTES, RECORD_SIZE_MAX_BYTES,
};

/// Source of ring bytes for the scan.
pub trait RingRead {
    /// Fills `out` with the ring bytes starting at `ring_offset`. The scanner
    /// handles the wrap: the span never passes the end of the ring, and
    /// `ring_offset` and `out.len()` are multiples of 4096.
    fn read_ring(&mut self, ring_offset: u64, out: &mut [u8]) -> io::Result<()>;

    /// The file behind the ring, for error messages.
    fn source_path(&self) -> Option<&Path> {
        None
    }
}

/// Why the scan stopped.
#[derive(Debug)]
pub enum StopReason {
    /// No record magic at the tail: the slot was never written (or holds
    /// the middle of an older record). The normal end of a log.
    EndOfLog {
        /// Ring offset the scan looked at.
        ring_offset: u64,
    },
    /// A well-formed record header with a seq below the expected one: a
    /// record from an earlier lap of the ring. Also a normal end.
    Stale {
        /// Ring offset the scan looked at.
        ring_offset: u64,
        /// The seq found there.
        found_seq: u64,
    },
    /// The scanned records fill the whole ring; the next slot is the start.
    RingFull,
    /// A record is there but fails a check: a write cut short by a crash,
    /// or damage. Nothing from here on is used.
    Torn {
        /// Ring offset of the failing record.
        ring_offset: u64,
        /// The failed check.
        reason: WalError,
    },
}

impl StopReason {
    /// True for the stops a cleanly written log produces; false for a torn
    /// or damaged record, which deserves a warning in the daemon's log.
    pub fn is_clean(&self) -> bool {
        !matches!(self, StopReason::Torn { .. })
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::EndOfLog { ring_offset } => {
                write!(f, "end of log at ring offset {ring_offset}")
            }
            StopReason::Stale {
                ring_offset,
                found_seq,
            } => write!(
                f,
                "end of log at ring offset {ring_offset} (older record seq {found_seq})"
            ),
            StopReason::RingFull => write!(f, "ring full"),
            StopReason::Torn {
                ring_offset,
                reason,
            } => write!(f, "torn record at ring offset {ring_offset}: {reason}"),
        }
    }
}

/// What the scan found.
#[derive(Debug)]
pub struct ScanOutcome {
    /// Seq the next appended record must carry.
    pub next_seq: u64,
    /// Ring offset just past the last valid record: where the next append
    /// goes.
    pub tail_offset: u64,
    /// Valid records visited.
    pub records: u64,
    /// Ring bytes those records occupy (padding included).
    pub bytes: u64,
    /// Why the scan stopped.
    pub stop: StopReason,
}

/// A scan that could not finish: the ring could not be read, or the
/// visitor refused a record.
#[derive(Debug)]
pub enum ScanError<E> {
    /// Reading the ring failed; the log's contents are unknown.
    Read {
        /// Where the read started.
        ring_offset: u64,
        /// The IO error.
        source: WalError,
    },
    /// The visitor returned an error for a valid record.
    Visit {
        /// The record's seq.
        seq: u64,
        /// The visitor's error.
        source: E,
    },
}

impl<E: fmt::Display> fmt::Display for ScanError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanError::Read {
                ring_offset,
                source,
            } => write!(f, "reading ring offset {ring_offset}: {source}"),
            ScanError::Visit { seq, source } => {
                write!(f, "replaying record seq {seq}: {source}")
            }
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for ScanError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ScanError::Read { source, .. } => Some(source),
            ScanError::Visit { source, .. } => Some(source),
        }
    }
}

/// Walks the log from `header.start_offset`, calling `visit` with every
/// valid record in seq order, and reports where the log ends.
///
/// A record is valid when its header decodes, its seq is the expected one
/// (start_seq, then +1 each), its epoch is at most the header's and at least
/// the previous record's, it fits in the ring without reaching the start
/// again, and its checksum matches. Memory: one largest record.
pub fn scan<R, E, F>(
    header: &LogHeader,
    reader: &mut R,
    mut visit: F,
) -> Result<ScanOutcome, ScanError<E>>
where
    R: RingRead + ?Sized,
    F: FnMut(&RecordHeader, &[u8]) -> Result<(), E>,
{
    let ring_len = header.ring_len_bytes();
    assert!(header.start_offset.is_multiple_of(LOG_ALIGN_BYTES) && header.start_offset < ring_len);
    let mut buf = AlignedBuf::zeroed(RECORD_SIZE_MAX_BYTES as usize);
    let mut offset = header.start_offset;
    let mut expected_seq = header.start_seq;
    let mut previous_epoch = 0;
    let mut records = 0;
    let mut bytes = 0;
    let path = reader.source_path().map(Path::to_path_buf);

    let stop = loop {
        if bytes == ring_len {
            break StopReason::RingFull;
        }
        let torn = |reason: WalError| StopReason::Torn {
            ring_offset: offset,
            reason: match &path {
                Some(path) => reason.at(path),
                None => reason,
            },
        };
        let first_page = &mut buf.as_mut_slice()[..LOG_ALIGN_BYTES as usize];
        read(reader, offset, first_page)?;
        if !record_magic_present(first_page) {
            break StopReason::EndOfLog {
                ring_offset: offset,
            };
        }
        let record = match RecordHeader::decode(first_page) {
            Ok(record) => record,
            Err(reason) => break torn(reason),
        };
        if record.seq < expected_seq {
            break StopReason::Stale {
                ring_offset: offset,
                found_seq: record.seq,
            };
        }
        if record.seq > expected_seq {
            break torn(WalError::field("record seq", record.seq, expected_seq));
        }
        if record.epoch > header.epoch {
            break torn(WalError::field(
                "record epoch",
                record.epoch,
                format!("<= header epoch {}", header.epoch),
            ));
        }
        if record.epoch < previous_epoch {
            break torn(WalError::field(
                "record epoch",
                record.epoch,
                format!(">= previous record's epoch {previous_epoch}"),
            ));
        }
        let size = record.size_bytes();
        if bytes + size > ring_len {
            break torn(WalError::field(
                "record size",
                size,
                format!(
                    "<= {} bytes left before the start of the log",
                    ring_len - bytes
                ),
            ));
        }

        let rest_offset = (offset + LOG_ALIGN_BYTES) % ring_len;
        let (rest_first, rest_second) =
            split_at_wrap(rest_offset, size - LOG_ALIGN_BYTES, ring_len);
        let page = LOG_ALIGN_BYTES as usize;
        let first_end = page + rest_first as usize;
        if rest_first > 0 {
            read(
                reader,
                rest_offset,
                &mut buf.as_mut_slice()[page..first_end],
            )?;
        }
        if rest_second > 0 {
            let second_end = first_end + rest_second as usize;
            read(reader, 0, &mut buf.as_mut_slice()[first_end..second_end])?;
        }
        let whole = buf.as_slice();
        let payload = &whole[RECORD_PAYLOAD_OFFSET_BYTES..][..record.length_bytes as usize];
        if let Err(reason) = record.verify(&whole[..RECORD_HEADER_SIZE_BYTES], payload) {
            break torn(reason);
        }
        visit(&record, payload).map_err(|source| ScanError::Visit {
            seq: record.seq,
            source,
        })?;

        records += 1;
        bytes += size;
        expected_seq += 1;
        previous_epoch = record.epoch;
        offset = (offset + size) % ring_len;
    };

    Ok(ScanOutcome {
        next_seq: expected_seq,
        tail_offset: offset,
        records,
        bytes,
        stop,
    })
}

fn read<R: RingRead + ?Sized, E>(
    reader: &mut R,
    ring_offset: u64,
    out: &mut [u8],
) -> Result<(), ScanError<E>> {
    reader
        .read_ring(ring_offset, out)
        .map_err(|source| ScanError::Read {
            ring_offset,
            source: WalError::io(
                reader.source_path().unwrap_or(Path::new("")),
                "reading the ring",
                source,
            ),
        })
}

/// A ring held in memory; used by the tests and by tools that inspect a log
/// image.
impl RingRead for [u8] {
    fn read_ring(&mut self, ring_offset: u64, out: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(ring_offset).map_err(io::Error::other)?;
        let span = self.get(start..start + out.len()).ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "read past the in-memory ring")
        })?;
        out.copy_from_slice(span);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::format::{build_record, LOG_SIZE_MIN_BYTES, RECORD_PAYLOAD_MAX_BYTES};
    use proptest::prelude::*;
    use std::collections::VecDeque;

    /// In-memory model of the ring plus the writer's bookkeeping.
    struct Ring {
        header: LogHeader,
        bytes: Vec<u8>,
        /// Records not yet cleared: (ring offset, seq, payload length).
        live: VecDeque<(u64, u64, u32)>,
        tail: u64,
        next_seq: u64,
    }

    fn payload_for(seq: u64, len: u32) -> Vec<u8> {
        // Bytes that increase by one never contain "RR", so an old payload
        // can never look like a record header.
        (0..len)
            .map(|i| (i as u8).wrapping_add(seq as u8))
            .collect()
    }

    impl Ring {
        fn new(log_size_bytes: u64) -> Ring {
            let header = LogHeader {
                volume_uuid: [1; 16],
                node_id: 2,
                log_size_bytes,
                epoch: 5,
                start_offset: 0,
                start_seq: 1,
                header_generation: 0,
            };
            Ring {
                bytes: vec![0; header.ring_len_bytes() as usize],
                header,
                live: VecDeque::new(),
                tail: 0,
                next_seq: 1,
            }
        }

        fn used(&self) -> u64 {
            self.live
                .iter()
                .map(|&(_, _, len)| record_size_bytes(len))
                .sum()
        }

        fn fits(&self, len: u32) -> bool {
            self.used() + record_size_bytes(len) <= self.header.ring_len_bytes()
        }

        fn append(&mut self, len: u32) {
            // Epochs rise now and then but never past the header's.
            let epoch = (3 + self.next_seq / 4).min(self.header.epoch);
            self.append_raw(len, epoch);
        }

        fn append_raw(&mut self, len: u32, epoch: u64) {
            assert!(self.fits(len));
            let record = RecordHeader {
                seq: self.next_seq,
                epoch,
                offset_bytes: self.next_seq * 4096,
                length_bytes: len,
                flags: 0,
            };
            let buf = build_record(&record, &payload_for(record.seq, len));
            self.put(self.tail, buf.as_slice());
            self.live.push_back((self.tail, self.next_seq, len));
            self.tail = (self.tail + buf.len() as u64) % self.header.ring_len_bytes();
            self.next_seq += 1;
        }

        fn put(&mut self, at: u64, data: &[u8]) {
            let ring_len = self.header.ring_len_bytes();
            let (first, _) = split_at_wrap(at, data.len() as u64, ring_len);
            let (a, b) = data.split_at(first as usize);
            self.bytes[at as usize..at as usize + a.len()].copy_from_slice(a);
            self.bytes[..b.len()].copy_from_slice(b);
        }

        fn clear(&mut self, count: usize) {
            for _ in 0..count {
                self.live.pop_front();
            }
            let (offset, seq) = match self.live.front() {
                Some(&(offset, seq, _)) => (offset, seq),
                None => (self.tail, self.next_seq),
            };
            self.header.start_offset = offset;
            self.header.start_seq = seq;
        }

        fn scan(&mut self) -> (ScanOutcome, Vec<(u64, u32)>) {
            let mut seen = Vec::new();
            let outcome = scan(&self.header, self.bytes.as_mut_slice(), |r, p| {
                // The crc vouches for the bytes in between; the ends show
                // the payload was cut from the right place.
                if let (Some(&first), Some(&last)) = (p.first(), p.last()) {
                    let want = payload_for(r.seq, 1)[0];
                    assert_eq!(first, want);
                    assert_eq!(last, want.wrapping_add((p.len() - 1) as u8));
                }
                assert_eq!(r.offset_bytes, r.seq * 4096);
                seen.push((r.seq, r.length_bytes));
                Ok::<(), std::convert::Infallible>(())
            })
            .unwrap();
            (outcome, seen)
        }

        fn check(&mut self) -> ScanOutcome {
            let (outcome, seen) = self.scan();
            let want: Vec<(u64, u32)> = self.live.iter().map(|&(_, s, l)| (s, l)).collect();
            assert_eq!(seen, want);
            assert_eq!(outcome.next_seq, self.next_seq);
            assert_eq!(outcome.tail_offset, self.tail);
            assert_eq!(outcome.records, want.len() as u64);
            assert_eq!(outcome.bytes, self.used());
            assert!(outcome.stop.is_clean(), "{}", outcome.stop);
            outcome
        }
    }

    use crate::wal::format::record_size_bytes;

    #[test]
    fn empty_log_ends_at_start() {
        let mut ring = Ring::new(LOG_SIZE_MIN_BYTES);
        let outcome = ring.check();
        assert!(matches!(
            outcome.stop,
            StopReason::EndOfLog { ring_offset: 0 }
        ));
    }

    #[test]
    fn wrapped_payload_is_read_across_the_end() {
        let mut ring = Ring::new(LOG_SIZE_MIN_BYTES);
        let ring_len = ring.header.ring_len_bytes();
        for _ in 0..3 {
            ring.append(RECORD_PAYLOAD_MAX_BYTES);
        }
        // Leave two pages before the end: the next record's header and the
        // first 4032 payload bytes go there, the rest wraps to offset 0.
        let left = ring_len - ring.tail;
        ring.append((left - 2 * 4096) as u32 - RECORD_HEADER_SIZE_BYTES as u32);
        assert_eq!(ring.tail, ring_len - 2 * 4096);
        ring.clear(2);
        ring.append(100_000);
        ring.append(500);
        assert!(ring.tail < ring.header.start_offset);
        let outcome = ring.check();
        assert!(matches!(outcome.stop, StopReason::EndOfLog { .. }));
    }

    #[test]
    fn full_ring_stops_before_the_start() {
        let mut ring = Ring::new(LOG_SIZE_MIN_BYTES);
        let ring_len = ring.header.ring_len_bytes();
        let pages = ring_len / 4096;
        for _ in 0..pages {
            ring.append(10);
        }
        assert_eq!(ring.tail, 0);
        let outcome = ring.check();
        assert!(matches!(outcome.stop, StopReason::RingFull));
    }

    #[test]
    fn older_lap_ends_the_log() {
        let mut ring = Ring::new(LOG_SIZE_MIN_BYTES);
        for _ in 0..5 {
            ring.append(8000);
        }
        // Rewind as if the log had been emptied and restarted from offset 0
        // with the same seqs: the old records behind the tail are stale.
        ring.clear(5);
        ring.header.start_offset = 0;
        ring.tail = 0;
        ring.append(8000);
        let outcome = ring.check();
        // The next slot holds the old seq 2 while seq 7 is expected.
        assert!(matches!(
            outcome.stop,
            StopReason::Stale { found_seq: 2, .. }
        ));
    }

    #[test]
    fn torn_payload_stops_the_scan() {
        let mut ring = Ring::new(LOG_SIZE_MIN_BYTES);
        for _ in 0..3 {
            ring.append(10_000);
        }
        let (last_offset, _, _) = *ring.live.back().unwrap();
        // The last record's second page never reached the disk.
        ring.bytes[last_offset as usize + 4096..last_offset as usize + 8192].fill(0);
        let (outcome, seen) = ring.scan();
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(outcome.next_seq, 3);
        assert_eq!(outcome.tail_offset, last_offset);
        match outcome.stop {
            StopReason::Torn {
                ring_offset,
                reason: WalError::BadCrc { .. },
            } => assert_eq!(ring_offset, last_offset),
            other => panic!("expected a torn record, got {other:?}"),
        }
    }

    #[test]
    fn epoch_rules() {
        let mut ring = Ring::new(LOG_SIZE_MIN_BYTES);
        ring.append_raw(10, 4);
        ring.append_raw(10, 3);
        let (outcome, seen) = ring.scan();
        assert_eq!(seen.len(), 1);
        assert!(matches!(
            outcome.stop,
            StopReason::Torn {
                reason: WalError::BadField {
                    field: "record epoch",
                    ..
                },
                ..
            }
        ));

        let mut ring = Ring::new(LOG_SIZE_MIN_BYTES);
        ring.append_raw(10, ring.header.epoch + 1);
        let (outcome, seen) = ring.scan();
        assert!(seen.is_empty());
        assert!(!outcome.stop.is_clean());
    }

    #[test]
    fn seq_gap_is_torn() {
        let mut ring = Ring::new(LOG_SIZE_MIN_BYTES);
        ring.append(10);
        ring.next_seq += 1;
        ring.append(10);
        let (outcome, seen) = ring.scan();
        assert_eq!(seen.len(), 1);
        assert!(matches!(
            outcome.stop,
            StopReason::Torn {
                reason: WalError::BadField {
                    field: "record seq",
                    ..
                },
                ..
            }
        ));
    }

    #[test]
    fn visitor_error_aborts() {
        let mut ring = Ring::new(LOG_SIZE_MIN_BYTES);
        ring.append(10);
        ring.append(10);
        let result = scan(&ring.header, ring.bytes.as_mut_slice(), |r, _| {
            if r.seq == 2 {
                Err("no space")
            } else {
                Ok(())
            }
        });
        match result {
            Err(ScanError::Visit { seq: 2, source }) => assert_eq!(source, "no space"),
            other => panic!("{other:?}"),
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Append(u32),
        Clear(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u32..20_000).prop_map(Op::Append),
            1 => (0u32..=RECORD_PAYLOAD_MAX_BYTES).prop_map(Op::Append),
            2 => (0usize..6).prop_map(Op::Clear),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn scan_returns_exactly_the_live_records(ops in prop::collection::vec(op(), 1..100)) {
            let mut ring = Ring::new(LOG_SIZE_MIN_BYTES);
            for op in ops {
                // Scanning after every op would mostly repeat itself (and
                // costs a crc of the whole ring each time): scan after each
                // clear, each append that wrapped, and at the end.
                let scan_now = match op {
                    Op::Append(len) => {
                        // The writer waits for clears when the ring is full.
                        while !ring.fits(len) {
                            ring.clear(1);
                        }
                        let before = ring.tail;
                        ring.append(len);
                        ring.tail <= before
                    }
                    Op::Clear(count) => {
                        let count = count.min(ring.live.len());
                        ring.clear(count);
                        true
                    }
                };
                if scan_now {
                    ring.check();
                }
            }
            ring.check();
        }
    }
}
