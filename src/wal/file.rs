//! The log file on disk: creating, opening, writing the header and records.
//!
//! Two descriptors on one file. The ring goes through an O_DIRECT fd, so a
//! record write completes when the device has the bytes and nothing of the
//! log crowds the page cache. The header page is mapped (memmap2) through an
//! ordinary fd, which also holds an exclusive flock so two daemons never
//! append to one log.
//!
//! A store into a shared mapping can be written back by the kernel while it
//! is half done, so one header written in place could reach the disk torn
//! and leave the log unopenable. The page therefore holds two header slots
//! (see [`super::format::decode_header_page`]) and an update writes only the
//! slot that does not hold the current header, then msyncs: whatever the
//! crash, one slot still holds a valid header, the new one or the previous.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{MmapMut, MmapOptions};
use nix::fcntl::{Flock, FlockArg};

use crate::buf::{round_up, AlignedBuf, PAGE_SIZE_BYTES};

use super::error::WalError;
use super::format::{
    check_log_size, decode_header_page, header_slot_range, other_slot, split_at_wrap, LogHeader,
    LOG_ALIGN_BYTES, LOG_HEADER_SIZE_BYTES, LOG_HEADER_USED_BYTES, RECORD_SEQ_FIRST,
};
use super::recovery::RingRead;

/// Largest single read the ring reader's bounce buffer serves; only used
/// for callers whose buffer is not page aligned.
const RING_READ_BOUNCE_BYTES: u64 = 256 * 1024;

/// Bytes per write when a new log's ring is zeroed.
const LOG_ZERO_FILL_CHUNK_BYTES: usize = 1 << 20;

/// The slot a new log's header goes to; the other slot starts zeroed.
const CREATE_SLOT: usize = 0;
/// Generation of a new log's header.
const CREATE_GENERATION: u64 = 1;

/// An open write-ahead log: the header state in memory and the descriptors
/// to change it and to write the ring.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    header: LogHeader,
    /// The slot of the header page holding `header`; the next header write
    /// goes to the other one.
    header_slot: usize,
    /// Shared mapping of the header page. Declared before `_header_fd` so
    /// it is unmapped before the flock is released.
    header_map: MmapMut,
    /// Ordinary fd the header page is mapped through, kept for its flock,
    /// which marks the log as ours until the LogFile is dropped.
    _header_fd: Flock<File>,
    /// O_DIRECT fd for the ring.
    direct: File,
    /// Set after a failed write, msync or fsync; see [`WalError::Poisoned`].
    failed: AtomicBool,
    /// A header was staged (see [`LogFile::stage_header`]) and is not yet
    /// durable.
    staged: bool,
}

/// A header written into the log's mapped header page by
/// [`LogFile::stage_header`], waiting for the sync that makes it durable.
#[derive(Debug)]
#[must_use = "a staged header becomes current only through LogFile::header_durable"]
pub struct StagedHeader {
    header: LogHeader,
    slot: usize,
}

impl LogFile {
    /// Creates (or truncates) a log of `log_size_bytes` at `path`: a valid
    /// header (generation 1, start_offset 0, start_seq 1) in slot 0, a
    /// zeroed slot 1, a zeroed ring (the scan finds an empty log, and record
    /// writes overwrite allocated blocks), all made durable.
    pub fn create(
        path: impl AsRef<Path>,
        volume_uuid: [u8; 16],
        node_id: u32,
        log_size_bytes: u64,
        epoch: u64,
    ) -> Result<LogFile, WalError> {
        let path = path.as_ref();
        check_log_size(log_size_bytes).map_err(|e| e.at(path))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| WalError::io(path, "creating the log file", e))?;
        // Lock before truncating: a log another daemon is using must not be
        // wiped under it.
        let header_fd = lock(path, file)?;
        header_fd
            .set_len(0)
            .and_then(|()| header_fd.set_len(log_size_bytes))
            .map_err(|e| WalError::io(path, "sizing the log file", e))?;
        let mut header_map = map_header_page(path, &header_fd)?;
        let direct = open_direct(path)?;
        let header = LogHeader {
            volume_uuid,
            node_id,
            log_size_bytes,
            epoch,
            start_offset: 0,
            start_seq: RECORD_SEQ_FIRST,
            header_generation: CREATE_GENERATION,
        };
        // Zero the whole ring, not just its first page (which makes the scan
        // find an empty log): every later record write is then an overwrite
        // of allocated blocks, which O_DIRECT completes without allocating
        // (and io_uring without handing it to a worker thread).
        let zeroes = AlignedBuf::zeroed(LOG_ZERO_FILL_CHUNK_BYTES);
        let ring_len = header.ring_len_bytes();
        let mut ring_offset = 0;
        while ring_offset < ring_len {
            let length = (ring_len - ring_offset).min(LOG_ZERO_FILL_CHUNK_BYTES as u64) as usize;
            direct
                .write_all_at(
                    &zeroes.as_slice()[..length],
                    LogFile::ring_file_offset(ring_offset),
                )
                .map_err(|e| WalError::io(path, "zeroing the ring", e))?;
            ring_offset += length as u64;
        }
        // The whole page: slot 1 and the bytes around the slots are zero.
        header_map.fill(0);
        header.encode(&mut header_map[header_slot_range(CREATE_SLOT)]);
        header_map
            .flush_range(0, LOG_HEADER_SIZE_BYTES as usize)
            .map_err(|e| WalError::io(path, "msync of the new log header", e))?;
        // sync_all, not sync_data: the new length is metadata.
        header_fd
            .sync_all()
            .map_err(|e| WalError::io(path, "fsync of the new log", e))?;
        sync_parent_dir(path)?;
        Ok(LogFile {
            path: path.to_path_buf(),
            header,
            header_slot: CREATE_SLOT,
            header_map,
            _header_fd: header_fd,
            direct,
            failed: AtomicBool::new(false),
            staged: false,
        })
    }

    /// Opens an existing log, refusing one without a valid header slot, one
    /// that belongs to another volume or node, or one whose length
    /// disagrees with its header.
    pub fn open(
        path: impl AsRef<Path>,
        expected_volume_uuid: [u8; 16],
        expected_node_id: u32,
    ) -> Result<LogFile, WalError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| WalError::io(path, "opening the log file", e))?;
        let mut header_fd = lock(path, file)?;
        // Seeking to the end measures block devices too, where the
        // metadata length is 0.
        let file_len = header_fd
            .seek(SeekFrom::End(0))
            .map_err(|e| WalError::io(path, "measuring the log file", e))?;
        // Checked before mapping: touching a mapped page past the end of the
        // file raises SIGBUS.
        if file_len < LOG_HEADER_SIZE_BYTES {
            return Err(WalError::field(
                "file length",
                file_len,
                format!(">= {LOG_HEADER_SIZE_BYTES} bytes (one header page)"),
            )
            .at(path));
        }
        // Read with pread rather than through the map: a page the device
        // cannot read is an error here but would be SIGBUS through the map.
        // Both go through the same page-cache page.
        let mut page = vec![0u8; LOG_HEADER_SIZE_BYTES as usize];
        header_fd
            .read_exact_at(&mut page, 0)
            .map_err(|e| WalError::io(path, "reading the log header", e))?;
        let current = decode_header_page(&page).map_err(|e| e.at(path))?;
        if let Some(problem) = current.other_slot_problem {
            tracing::debug!(
                log = %path.display(),
                slot = current.slot,
                header_generation = current.header.header_generation,
                other_slot = other_slot(current.slot),
                problem = %problem.at(path),
                "using the only valid header slot"
            );
        }
        let header = current.header;
        if header.volume_uuid != expected_volume_uuid {
            return Err(WalError::WrongVolume {
                path: path.to_path_buf(),
                found: header.volume_uuid,
                expected: expected_volume_uuid,
            });
        }
        if header.node_id != expected_node_id {
            return Err(WalError::WrongNode {
                path: path.to_path_buf(),
                found: header.node_id,
                expected: expected_node_id,
            });
        }
        if header.log_size_bytes != file_len {
            return Err(WalError::SizeMismatch {
                path: path.to_path_buf(),
                found: file_len,
                expected: header.log_size_bytes,
            });
        }
        let header_map = map_header_page(path, &header_fd)?;
        let direct = open_direct(path)?;
        Ok(LogFile {
            path: path.to_path_buf(),
            header,
            header_slot: current.slot,
            header_map,
            _header_fd: header_fd,
            direct,
            failed: AtomicBool::new(false),
            staged: false,
        })
    }

    /// The header as last persisted.
    pub fn header(&self) -> LogHeader {
        self.header
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Length of the ring area.
    pub fn ring_len_bytes(&self) -> u64 {
        self.header.ring_len_bytes()
    }

    /// File offset of a ring offset.
    pub fn ring_file_offset(ring_offset: u64) -> u64 {
        LOG_HEADER_SIZE_BYTES + ring_offset
    }

    /// A reader of the ring for the recovery scan (blocking preads on the
    /// O_DIRECT fd).
    pub fn ring_reader(&self) -> RingReader<'_> {
        RingReader {
            file: &self.direct,
            path: &self.path,
            ring_len: self.header.ring_len_bytes(),
            bounce: None,
        }
    }

    /// Changes the header with `update`, bumps header_generation and makes
    /// the new header durable before returning.
    ///
    /// The new header goes into the slot not holding the current one, then
    /// the page is msynced; the current slot is not written, so a crash at
    /// any point leaves it valid. Blocks for the msync: for the daemon's
    /// rare changes (a new epoch), while its clearing path, which persists
    /// the start-of-log pointer several times a second, uses
    /// [`LogFile::stage_header`] and syncs without blocking. The in-memory
    /// header changes only once the new one is durable.
    pub fn persist_header(&mut self, update: impl FnOnce(&mut LogHeader)) -> Result<(), WalError> {
        let staged = self.stage_header(update)?;
        self.header_map
            .flush_range(0, LOG_HEADER_SIZE_BYTES as usize)
            .map_err(|e| {
                self.failed.store(true, Ordering::Relaxed);
                WalError::io(&self.path, "msync of the log header", e)
            })?;
        self.header_durable(staged);
        Ok(())
    }

    /// The first half of [`LogFile::persist_header`], for a caller that
    /// makes the file durable itself: writes the changed header into the
    /// mapped page's other slot and returns it, still not current. Once an
    /// fdatasync of the log file that started after this call has succeeded
    /// (it writes the page back like an msync would), hand it to
    /// [`LogFile::header_durable`]. At most one staged header at a time:
    /// staging again, or persisting, before then would write the same slot.
    pub fn stage_header(
        &mut self,
        update: impl FnOnce(&mut LogHeader),
    ) -> Result<StagedHeader, WalError> {
        self.check_not_failed()?;
        assert!(!self.staged, "a staged header is waiting for its sync");
        let mut next = self.header;
        update(&mut next);
        // Identity and geometry are fixed at create; changing them here would
        // make the next open refuse the log or misplace the ring's end.
        assert_eq!(next.volume_uuid, self.header.volume_uuid);
        assert_eq!(next.node_id, self.header.node_id);
        assert_eq!(next.log_size_bytes, self.header.log_size_bytes);
        next.header_generation = self.header.header_generation + 1;
        // Encoded aside first: encode asserts the header is valid, and a
        // failed assertion must not leave a half-written slot behind.
        let mut slot_bytes = [0u8; LOG_HEADER_USED_BYTES];
        next.encode(&mut slot_bytes);
        let slot = other_slot(self.header_slot);
        self.header_map[header_slot_range(slot)].copy_from_slice(&slot_bytes);
        self.staged = true;
        Ok(StagedHeader { header: next, slot })
    }

    /// The staged header is durable: it becomes the current one.
    pub fn header_durable(&mut self, staged: StagedHeader) {
        assert!(self.staged, "no header was staged");
        debug_assert_eq!(
            staged.header.header_generation,
            self.header.header_generation + 1
        );
        self.staged = false;
        self.header = staged.header;
        self.header_slot = staged.slot;
    }

    /// Whether a staged header waits for its sync.
    pub fn has_staged_header(&self) -> bool {
        self.staged
    }

    /// A second descriptor of the O_DIRECT fd, for the async driver (the
    /// secondary hands it to compio).
    pub fn direct_file(&self) -> io::Result<File> {
        self.direct.try_clone()
    }

    /// Writes one record (built by [`super::build_record`]) at `ring_offset`,
    /// splitting it where it wraps past the end of the ring. Not durable
    /// until [`LogFile::sync_blocking`].
    pub fn write_record_blocking(
        &self,
        ring_offset: u64,
        record: &AlignedBuf,
    ) -> Result<(), WalError> {
        self.write_records_blocking(ring_offset, &[record.as_slice()])
    }

    /// Writes records adjacent in the ring, from `ring_offset` on, with
    /// vectored writes on the calling thread. Only a lone record may wrap
    /// past the end of the ring (it is split there); each record is page
    /// padded and page aligned in memory, as O_DIRECT asks. Not durable
    /// until [`LogFile::sync_blocking`].
    pub fn write_records_blocking(
        &self,
        ring_offset: u64,
        records: &[&[u8]],
    ) -> Result<(), WalError> {
        self.check_not_failed()?;
        let ring_len = self.header.ring_len_bytes();
        let size: u64 = records.iter().map(|record| record.len() as u64).sum();
        assert!(
            records
                .iter()
                .all(|record| (record.len() as u64).is_multiple_of(LOG_ALIGN_BYTES)),
            "a record that is not page padded"
        );
        assert!(ring_offset.is_multiple_of(LOG_ALIGN_BYTES) && ring_offset < ring_len);
        let (first, second) = split_at_wrap(ring_offset, size, ring_len);
        assert!(
            second == 0 || records.len() == 1,
            "only a lone record may wrap"
        );
        let result = if second == 0 {
            write_all_vectored_at(
                &self.direct,
                records,
                LogFile::ring_file_offset(ring_offset),
            )
        } else {
            let (head, tail) = records[0].split_at(first as usize);
            self.direct
                .write_all_at(head, LogFile::ring_file_offset(ring_offset))
                .and_then(|()| self.direct.write_all_at(tail, LogFile::ring_file_offset(0)))
        };
        result.map_err(|e| {
            self.failed.store(true, Ordering::Relaxed);
            WalError::io(&self.path, "writing records", e)
        })
    }

    /// Whether the log lives on tmpfs, a filesystem held in memory. A
    /// write there is a copy into memory that waits on no device (unless
    /// the machine has to swap to find the memory), and one io_uring has
    /// no non-blocking path for: it hands each to a worker thread, two
    /// thread wake-ups per record that cost more than the copy
    /// (BENCHMARKS.md, "Log records written on the secondary's thread").
    pub fn is_in_memory(&self) -> Result<bool, WalError> {
        let stat = nix::sys::statfs::fstatfs(&self.direct).map_err(|errno| {
            WalError::io(
                &self.path,
                "asking which filesystem holds the log",
                errno.into(),
            )
        })?;
        Ok(stat.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
    }

    /// fdatasync of the ring: afterwards every completed record write is
    /// durable and may be acknowledged.
    pub fn sync_blocking(&self) -> Result<(), WalError> {
        self.check_not_failed()?;
        self.direct.sync_data().map_err(|e| {
            self.failed.store(true, Ordering::Relaxed);
            WalError::io(&self.path, "fdatasync of the ring", e)
        })
    }

    fn check_not_failed(&self) -> Result<(), WalError> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(WalError::Poisoned {
                path: self.path.clone(),
            });
        }
        Ok(())
    }
}

/// Most pieces one `pwritev` takes: Linux's `UIO_MAXIOV`.
const VECTORED_WRITE_PIECES_MAX: usize = 1024;

/// `pwritev` of every byte of `pieces` at `offset`, however the kernel
/// splits it.
fn write_all_vectored_at(file: &File, pieces: &[&[u8]], mut offset: u64) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> =
        pieces.iter().map(|piece| io::IoSlice::new(piece)).collect();
    let mut left: &mut [io::IoSlice<'_>] = &mut slices;
    while !left.is_empty() {
        let offset_signed =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let count = left.len().min(VECTORED_WRITE_PIECES_MAX);
        match nix::sys::uio::pwritev(file, &left[..count], offset_signed) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(written) => {
                offset += written as u64;
                io::IoSlice::advance_slices(&mut left, written);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(())
}

/// Maps the header page (the first [`LOG_HEADER_SIZE_BYTES`] of the file)
/// shared and writable, through the locked ordinary fd.
fn map_header_page(path: &Path, file: &Flock<File>) -> Result<MmapMut, WalError> {
    let file: &File = file;
    // SAFETY: a shared mapping stays valid only while nobody truncates the
    // file under it (touching a page past the end raises SIGBUS) and its
    // bytes change only through our own stores. Both hold while the
    // LogFile lives: the file is exclusively flock'ed by us (through this
    // very fd), every program that opens a log (the daemons and
    // replblk-ctl, through LogFile) takes that lock first and fails without
    // it, so no other process maps, writes or truncates the file while we
    // run; the file is at least one page long (sized by create, checked by
    // open before mapping) and we never shrink it; and in this process the
    // ring is written only through the separate O_DIRECT fd, at file
    // offsets >= LOG_HEADER_SIZE_BYTES, which never overlap the mapped
    // header page.
    unsafe {
        MmapOptions::new()
            .len(LOG_HEADER_SIZE_BYTES as usize)
            .map_mut(file)
    }
    .map_err(|e| WalError::io(path, "mapping the log header page", e))
}

fn lock(path: &Path, file: File) -> Result<Flock<File>, WalError> {
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| WalError::Locked {
        path: path.to_path_buf(),
        source: io::Error::from(errno),
    })
}

fn open_direct(path: &Path) -> Result<File, WalError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| {
            // EINVAL here means the filesystem (e.g. tmpfs) has no O_DIRECT.
            WalError::io(path, "opening the log with O_DIRECT", e)
        })
}

fn sync_parent_dir(path: &Path) -> Result<(), WalError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| WalError::io(path, "fsync of the log's directory", e))
}

/// Reads ring spans with blocking preads on the log's O_DIRECT fd.
#[derive(Debug)]
pub struct RingReader<'a> {
    file: &'a File,
    path: &'a Path,
    ring_len: u64,
    /// Allocated on first use by an unaligned caller.
    bounce: Option<AlignedBuf>,
}

impl RingRead for RingReader<'_> {
    fn read_ring(&mut self, ring_offset: u64, out: &mut [u8]) -> io::Result<()> {
        let len = out.len() as u64;
        assert!(
            ring_offset + len <= self.ring_len,
            "ring read past the end of the ring"
        );
        let align = LOG_ALIGN_BYTES;
        let aligned = ring_offset.is_multiple_of(align)
            && len.is_multiple_of(align)
            && (out.as_ptr() as usize).is_multiple_of(PAGE_SIZE_BYTES);
        if aligned {
            // The scanner's buffers take this path: straight into place.
            return self
                .file
                .read_exact_at(out, LogFile::ring_file_offset(ring_offset));
        }
        let bounce = self
            .bounce
            .get_or_insert_with(|| AlignedBuf::zeroed(RING_READ_BOUNCE_BYTES as usize));
        let span_end = round_up(ring_offset + len, align);
        let mut chunk_start = ring_offset - ring_offset % align;
        while chunk_start < span_end {
            let chunk_len = (span_end - chunk_start).min(RING_READ_BOUNCE_BYTES);
            let chunk = &mut bounce.as_mut_slice()[..chunk_len as usize];
            self.file
                .read_exact_at(chunk, LogFile::ring_file_offset(chunk_start))?;
            let from = ring_offset.max(chunk_start);
            let to = (ring_offset + len).min(chunk_start + chunk_len);
            if from < to {
                out[(from - ring_offset) as usize..(to - ring_offset) as usize].copy_from_slice(
                    &chunk[(from - chunk_start) as usize..(to - chunk_start) as usize],
                );
            }
            chunk_start += chunk_len;
        }
        Ok(())
    }

    fn source_path(&self) -> Option<&Path> {
        Some(self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::format::{
        build_record, RecordHeader, LOG_SIZE_MIN_BYTES, RECORD_FLAG_FUA, RECORD_SIZE_MAX_BYTES,
    };
    use crate::wal::recovery::{scan, ScanOutcome, StopReason};

    const UUID: [u8; 16] = [0xab; 16];
    const NODE: u32 = 7;
    const EPOCH: u64 = 4;

    fn new_log(dir: &tempfile::TempDir) -> LogFile {
        LogFile::create(
            dir.path().join("log"),
            UUID,
            NODE,
            LOG_SIZE_MIN_BYTES,
            EPOCH,
        )
        .unwrap()
    }

    fn payload(seq: u64, len: u32) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_add(seq as u8))
            .collect()
    }

    /// Appends a record at `tail`, returning the next tail.
    fn append(log: &LogFile, tail: u64, seq: u64, len: u32) -> u64 {
        let header = RecordHeader {
            seq,
            epoch: EPOCH,
            offset_bytes: seq * 512,
            length_bytes: len,
            flags: if seq.is_multiple_of(2) {
                RECORD_FLAG_FUA
            } else {
                0
            },
        };
        let record = build_record(&header, &payload(seq, len));
        log.write_record_blocking(tail, &record).unwrap();
        (tail + record.len() as u64) % log.ring_len_bytes()
    }

    fn scan_all(log: &LogFile) -> (ScanOutcome, Vec<(u64, u32)>) {
        let mut seen = Vec::new();
        let outcome = scan(&log.header(), &mut log.ring_reader(), |r, p| {
            assert_eq!(p, &payload(r.seq, r.length_bytes)[..]);
            seen.push((r.seq, r.length_bytes));
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap();
        (outcome, seen)
    }

    #[test]
    fn records_written_together_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = new_log(&dir);
        let records: Vec<AlignedBuf> = [(1u64, 4096u32), (2, 100), (3, 3 * 4096)]
            .into_iter()
            .map(|(seq, len)| {
                let header = RecordHeader {
                    seq,
                    epoch: EPOCH,
                    offset_bytes: seq * 512,
                    length_bytes: len,
                    flags: 0,
                };
                build_record(&header, &payload(seq, len))
            })
            .collect();
        let slices: Vec<&[u8]> = records.iter().map(AlignedBuf::as_slice).collect();
        log.write_records_blocking(0, &slices).unwrap();
        let (outcome, seen) = scan_all(&log);
        assert_eq!(seen, vec![(1, 4096), (2, 100), (3, 3 * 4096)]);
        let end: u64 = records.iter().map(|record| record.len() as u64).sum();
        assert_eq!(outcome.next_seq, 4);
        assert_eq!(outcome.tail_offset, end);
    }

    #[test]
    fn more_records_at_once_than_one_vectored_write_takes() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::create(dir.path().join("log"), UUID, NODE, 8 << 20, EPOCH).unwrap();
        let count = VECTORED_WRITE_PIECES_MAX as u64 + 100;
        let records: Vec<AlignedBuf> = (1..=count)
            .map(|seq| {
                let header = RecordHeader {
                    seq,
                    epoch: EPOCH,
                    offset_bytes: seq * 512,
                    length_bytes: 100,
                    flags: 0,
                };
                build_record(&header, &payload(seq, 100))
            })
            .collect();
        let slices: Vec<&[u8]> = records.iter().map(AlignedBuf::as_slice).collect();
        log.write_records_blocking(0, &slices).unwrap();
        let (outcome, seen) = scan_all(&log);
        assert_eq!(seen.len() as u64, count);
        assert_eq!(outcome.next_seq, count + 1);
    }

    #[test]
    fn create_then_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let created = new_log(&dir).header();
        let log = LogFile::open(&path, UUID, NODE).unwrap();
        assert_eq!(log.header(), created);
        assert_eq!(created.start_offset, 0);
        assert_eq!(created.start_seq, 1);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), LOG_SIZE_MIN_BYTES);
        let (outcome, seen) = scan_all(&log);
        assert!(seen.is_empty());
        assert!(matches!(
            outcome.stop,
            StopReason::EndOfLog { ring_offset: 0 }
        ));
        assert_eq!(outcome.next_seq, 1);
    }

    #[test]
    fn create_refuses_a_bad_size() {
        let dir = tempfile::tempdir().unwrap();
        let err = LogFile::create(
            dir.path().join("log"),
            UUID,
            NODE,
            LOG_SIZE_MIN_BYTES - 4096,
            1,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            WalError::BadField {
                field: "log_size_bytes",
                ..
            }
        ));
        assert!(err.to_string().contains("/log: log_size_bytes is"), "{err}");
    }

    #[test]
    fn open_refuses_another_volume_node_or_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        drop(new_log(&dir));

        let err = LogFile::open(&path, [0xcd; 16], NODE).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, WalError::WrongVolume { .. }));
        assert!(
            text.starts_with(&format!("log {}: volume uuid abababab-", path.display())),
            "{text}"
        );
        assert!(
            text.contains("belongs to another volume (expected cdcdcdcd-"),
            "{text}"
        );

        let err = LogFile::open(&path, UUID, NODE + 1).unwrap_err();
        assert!(
            matches!(err, WalError::WrongNode { found: NODE, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("node id 7"));

        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(LOG_SIZE_MIN_BYTES + 4096).unwrap();
        let err = LogFile::open(&path, UUID, NODE).unwrap_err();
        assert!(matches!(err, WalError::SizeMismatch { .. }), "{err}");

        // A fresh log's slot 1 is zero, so with slot 0 damaged no slot is
        // valid.
        file.write_all_at(&[0xff], 3).unwrap();
        let err = LogFile::open(&path, UUID, NODE).unwrap_err();
        match &err {
            WalError::NoValidHeader { slot0, slot1, .. } => {
                assert!(
                    matches!(**slot0, WalError::BadField { field: "magic", .. }),
                    "{slot0}"
                );
                assert!(
                    matches!(**slot1, WalError::BadField { field: "magic", .. }),
                    "{slot1}"
                );
            }
            other => panic!("expected NoValidHeader, got {other:?}"),
        }
        assert!(
            err.to_string().starts_with(&format!(
                "log {}: no valid header in either slot of the header page: slot 0: magic is [",
                path.display()
            )),
            "{err}"
        );

        file.set_len(100).unwrap();
        let err = LogFile::open(&path, UUID, NODE).unwrap_err();
        assert!(
            matches!(
                err,
                WalError::BadField {
                    field: "file length",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_log_has_one_owner() {
        let dir = tempfile::tempdir().unwrap();
        let log = new_log(&dir);
        let err = LogFile::open(log.path(), UUID, NODE).unwrap_err();
        assert!(matches!(err, WalError::Locked { .. }), "{err}");
        drop(log);
        LogFile::open(dir.path().join("log"), UUID, NODE).unwrap();
    }

    #[test]
    fn records_wrap_and_start_advances() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = new_log(&dir);
        let ring_len = log.ring_len_bytes();
        let big = 1_000_000;
        let mut tail = 0;
        let mut offsets = Vec::new();
        for seq in 1..=4 {
            offsets.push(tail);
            tail = append(&log, tail, seq, big);
        }
        log.sync_blocking().unwrap();
        let (outcome, seen) = scan_all(&log);
        assert_eq!(seen, vec![(1, big), (2, big), (3, big), (4, big)]);
        assert_eq!(outcome.tail_offset, tail);
        assert_eq!(outcome.next_seq, 5);

        // Clear seq 1 to 3, then append a record that runs past the end.
        log.persist_header(|h| {
            h.start_offset = offsets[3];
            h.start_seq = 4;
        })
        .unwrap();
        assert_eq!(log.header().header_generation, 2);
        let wrapping = tail;
        tail = append(&log, tail, 5, big);
        tail = append(&log, tail, 6, 70_000);
        assert!(wrapping + record_size(big) > ring_len, "seq 5 must wrap");
        assert!(tail < wrapping);
        log.sync_blocking().unwrap();

        let path = log.path().to_path_buf();
        drop(log);
        let log = LogFile::open(&path, UUID, NODE).unwrap();
        assert_eq!(log.header().start_seq, 4);
        assert_eq!(log.header().header_generation, 2);
        let (outcome, seen) = scan_all(&log);
        assert_eq!(seen, vec![(4, big), (5, big), (6, 70_000)]);
        assert_eq!(outcome.tail_offset, tail);
        assert_eq!(outcome.next_seq, 7);
        assert_eq!(outcome.records, 3);
        assert!(outcome.stop.is_clean(), "{}", outcome.stop);
    }

    /// The header page as the file holds it.
    fn raw_page(path: &Path) -> Vec<u8> {
        let mut page = vec![0u8; LOG_HEADER_SIZE_BYTES as usize];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut page, 0)
            .unwrap();
        page
    }

    /// Writes `bytes` at `offset` of the file behind LogFile's back, as a
    /// crash or a damaged disk would leave them.
    fn write_raw(path: &Path, offset: usize, bytes: &[u8]) {
        let file = OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(bytes, offset as u64).unwrap();
        file.sync_all().unwrap();
    }

    fn slot_header(page: &[u8], slot: usize) -> Result<LogHeader, WalError> {
        LogHeader::decode(&page[header_slot_range(slot)])
    }

    /// The header page is zero outside the two slots.
    fn assert_zero_outside_slots(page: &[u8]) {
        for (at, byte) in page.iter().enumerate() {
            let in_slot = (0..2).any(|slot| header_slot_range(slot).contains(&at));
            assert!(in_slot || *byte == 0, "header page byte {at} is {byte:#x}");
        }
    }

    #[test]
    fn create_writes_slot_0_and_zeroes_slot_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        // Leftovers of an older file must not survive as a second header.
        std::fs::write(&path, vec![0x5a; LOG_SIZE_MIN_BYTES as usize]).unwrap();
        let log = new_log(&dir);
        let page = raw_page(&path);
        assert_eq!(slot_header(&page, 0).unwrap(), log.header());
        assert_eq!(log.header().header_generation, 1);
        assert!(page[header_slot_range(1)].iter().all(|&b| b == 0));
        assert_zero_outside_slots(&page);
    }

    #[test]
    fn alternating_updates_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut log = new_log(&dir);
        let mut previous = log.header();
        for i in 1..=9u64 {
            log.persist_header(|h| {
                h.start_offset = i * LOG_ALIGN_BYTES;
                h.start_seq = 10 * i;
                h.epoch = EPOCH + i / 3;
            })
            .unwrap();
            let persisted = log.header();
            assert_eq!(persisted.header_generation, previous.header_generation + 1);
            assert_eq!(persisted.start_seq, 10 * i);

            // The new header went into the slot the previous one was not
            // in, and the previous one is still intact in its own slot.
            let page = raw_page(&path);
            let new_slot = if i % 2 == 1 { 1 } else { 0 };
            assert_eq!(slot_header(&page, new_slot).unwrap(), persisted);
            assert_eq!(slot_header(&page, 1 - new_slot).unwrap(), previous);
            assert_zero_outside_slots(&page);

            drop(log);
            log = LogFile::open(&path, UUID, NODE).unwrap();
            assert_eq!(log.header(), persisted);
            previous = persisted;
        }
    }

    /// How a crash can leave the slot an update was writing.
    #[derive(Clone, Copy, Debug)]
    enum Torn {
        /// All the new bytes, but a crc that does not match them.
        BadCrc,
        /// The first half of the new bytes over the old slot.
        FirstHalf,
        /// The second half of the new bytes over the old slot.
        SecondHalf,
        /// Bytes that are no header at all.
        Garbage,
    }

    #[test]
    fn torn_header_write_leaves_the_previous_header() {
        let kinds = [
            Torn::BadCrc,
            Torn::FirstHalf,
            Torn::SecondHalf,
            Torn::Garbage,
        ];
        for updates_before in 0..3u64 {
            for torn in kinds {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("log");
                let mut log = new_log(&dir);
                for i in 1..=updates_before {
                    log.persist_header(|h| {
                        h.start_offset = i * LOG_ALIGN_BYTES;
                        h.start_seq = i + 1;
                    })
                    .unwrap();
                }
                let previous = log.header();
                let current_slot = log.header_slot;
                drop(log);

                // The update that crashed: the next header, into the slot not
                // holding the current one.
                let mut next = previous;
                next.start_offset = 8 * LOG_ALIGN_BYTES;
                next.start_seq = 40;
                next.epoch = EPOCH + 1;
                next.header_generation += 1;
                let mut new_bytes = [0u8; LOG_HEADER_USED_BYTES];
                next.encode(&mut new_bytes);
                let target = other_slot(current_slot);
                let at = header_slot_range(target).start;
                let half = LOG_HEADER_USED_BYTES / 2;
                match torn {
                    Torn::BadCrc => {
                        new_bytes[80] ^= 0x01;
                        write_raw(&path, at, &new_bytes);
                    }
                    Torn::FirstHalf => write_raw(&path, at, &new_bytes[..half]),
                    Torn::SecondHalf => write_raw(&path, at + half, &new_bytes[half..]),
                    Torn::Garbage => write_raw(&path, at, &[0xa7; LOG_HEADER_USED_BYTES]),
                }
                let page = raw_page(&path);
                assert!(
                    slot_header(&page, target).is_err(),
                    "{torn:?} after {updates_before} updates left a valid slot"
                );
                assert_eq!(slot_header(&page, current_slot).unwrap(), previous);

                let mut log = LogFile::open(&path, UUID, NODE).unwrap();
                assert_eq!(log.header(), previous, "{torn:?}, {updates_before}");

                // The next update overwrites the torn slot and leaves the
                // good one alone.
                log.persist_header(|h| h.start_seq = 50).unwrap();
                let persisted = log.header();
                assert_eq!(persisted.header_generation, previous.header_generation + 1);
                let page = raw_page(&path);
                assert_eq!(slot_header(&page, target).unwrap(), persisted);
                assert_eq!(slot_header(&page, current_slot).unwrap(), previous);
                drop(log);
                let log = LogFile::open(&path, UUID, NODE).unwrap();
                assert_eq!(log.header(), persisted);
            }
        }
    }

    #[test]
    fn a_staged_header_becomes_current_once_durable_and_a_reopen_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut log = new_log(&dir);
        let before = log.header();
        let staged = log
            .stage_header(|h| {
                h.start_offset = 3 * LOG_ALIGN_BYTES;
                h.start_seq = 7;
            })
            .unwrap();
        assert!(log.has_staged_header());
        assert_eq!(log.header(), before, "not current before its sync");
        // The driver's sync: an fdatasync of the log (on the ring there).
        log.direct_file().unwrap().sync_data().unwrap();
        log.header_durable(staged);
        assert!(!log.has_staged_header());
        let after = log.header();
        assert_eq!(
            (after.start_offset, after.start_seq),
            (3 * LOG_ALIGN_BYTES, 7)
        );
        assert_eq!(after.header_generation, before.header_generation + 1);
        // The next change goes to the other slot again.
        log.persist_header(|h| h.start_seq = 8).unwrap();
        drop(log);
        let log = LogFile::open(&path, UUID, NODE).unwrap();
        assert_eq!(log.header().start_seq, 8);
        assert_eq!(log.header().header_generation, before.header_generation + 2);
    }

    #[test]
    #[should_panic(expected = "a staged header is waiting for its sync")]
    fn a_second_header_change_while_one_is_staged_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = new_log(&dir);
        let _staged = log.stage_header(|h| h.start_seq = 2).unwrap();
        let _ = log.persist_header(|h| h.epoch += 1);
    }

    #[test]
    fn both_slots_damaged_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut log = new_log(&dir);
        log.persist_header(|h| h.start_seq = 9).unwrap();
        drop(log);
        // Slot 0: a flipped bit under the crc. Slot 1: not a header.
        let page = raw_page(&path);
        write_raw(&path, 20, &[page[20] ^ 0x04]);
        write_raw(&path, header_slot_range(1).start, &[0; 8]);

        let err = LogFile::open(&path, UUID, NODE).unwrap_err();
        match &err {
            WalError::NoValidHeader {
                path: p,
                slot0,
                slot1,
            } => {
                assert_eq!(p, &path);
                assert!(matches!(**slot0, WalError::BadCrc { .. }), "{slot0}");
                assert!(
                    matches!(**slot1, WalError::BadField { field: "magic", .. }),
                    "{slot1}"
                );
            }
            other => panic!("expected NoValidHeader, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("slot 0: header crc32 is 0x"), "{text}");
        assert!(
            text.contains("; slot 1: magic is [00, 00, 00, 00, 00, 00, 00, 00]"),
            "{text}"
        );
        assert!(!text.contains("(in memory)"), "{text}");
    }

    #[test]
    fn same_generation_in_both_slots_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        drop(new_log(&dir));
        let page = raw_page(&path);
        write_raw(
            &path,
            header_slot_range(1).start,
            &page[header_slot_range(0)],
        );
        let err = LogFile::open(&path, UUID, NODE).unwrap_err();
        assert!(
            matches!(
                err,
                WalError::BadField {
                    field: "header_generation",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "log {}: header_generation is 1 in both slots (expected a different value \
                 in each header slot; the header page is corrupt)",
                path.display()
            )
        );
    }

    #[test]
    fn the_next_write_goes_to_the_other_slot_whatever_the_generation() {
        // A header page with an even generation in slot 0 and nothing in
        // slot 1 (as a single-slot writer would leave it): the update must
        // not overwrite slot 0.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut header = new_log(&dir).header();
        header.header_generation = 4;
        let mut bytes = [0u8; LOG_HEADER_USED_BYTES];
        header.encode(&mut bytes);
        write_raw(&path, 0, &bytes);

        let mut log = LogFile::open(&path, UUID, NODE).unwrap();
        assert_eq!(log.header(), header);
        log.persist_header(|h| h.start_seq = 2).unwrap();
        assert_eq!(log.header().header_generation, 5);
        let page = raw_page(&path);
        assert_eq!(slot_header(&page, 0).unwrap(), header);
        assert_eq!(slot_header(&page, 1).unwrap(), log.header());
        drop(log);
        assert_eq!(
            LogFile::open(&path, UUID, NODE).unwrap().header().start_seq,
            2
        );
    }

    fn record_size(len: u32) -> u64 {
        crate::wal::format::record_size_bytes(len)
    }

    #[test]
    fn torn_last_record_stops_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let log = new_log(&dir);
        let mut tail = 0;
        for seq in 1..=2 {
            tail = append(&log, tail, seq, 5000);
        }
        let torn_at = tail;
        append(&log, tail, 3, 20_000);
        // Only the first page of seq 3 reached the disk.
        let zero = AlignedBuf::zeroed(PAGE_SIZE_BYTES);
        log.direct_file()
            .unwrap()
            .write_all_at(zero.as_slice(), LogFile::ring_file_offset(torn_at + 4096))
            .unwrap();
        let (outcome, seen) = scan_all(&log);
        assert_eq!(seen, vec![(1, 5000), (2, 5000)]);
        assert_eq!(outcome.tail_offset, torn_at);
        assert_eq!(outcome.next_seq, 3);
        match &outcome.stop {
            StopReason::Torn {
                ring_offset,
                reason,
            } => {
                assert_eq!(*ring_offset, torn_at);
                assert!(
                    reason.to_string().contains("record seq 3 crc32"),
                    "{reason}"
                );
                assert_eq!(reason.path(), log.path());
            }
            other => panic!("expected a torn record, got {other:?}"),
        }
    }

    #[test]
    fn previous_lap_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = new_log(&dir);
        let ring_len = log.ring_len_bytes();
        let len = 200_000;
        let size = record_size(len);
        // Fill most of the ring, clear it all, and go round again until the
        // tail is back among the first lap's records.
        let mut tail = 0;
        let mut seq = 1;
        while tail + size <= ring_len {
            tail = append(&log, tail, seq, len);
            seq += 1;
        }
        let first_lap_last = seq - 1;
        log.persist_header(|h| {
            h.start_offset = tail;
            h.start_seq = seq;
        })
        .unwrap();
        let start = tail;
        for _ in 0..3 {
            tail = append(&log, tail, seq, len);
            seq += 1;
        }
        assert!(tail < start, "the second lap must wrap");
        let (outcome, seen) = scan_all(&log);
        assert_eq!(seen.len(), 3);
        assert_eq!(outcome.next_seq, seq);
        match outcome.stop {
            StopReason::Stale { found_seq, .. } => assert!(found_seq <= first_lap_last),
            StopReason::EndOfLog { .. } => {}
            other => panic!("expected a clean end, got {other:?}"),
        }
    }

    #[test]
    fn unaligned_reads_use_the_bounce_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let log = new_log(&dir);
        let data: Vec<u8> = (0..RECORD_SIZE_MAX_BYTES)
            .map(|i| (i % 251) as u8)
            .collect();
        log.write_record_blocking(0, &AlignedBuf::copy_from(&data))
            .unwrap();
        let mut reader = log.ring_reader();
        for (offset, len) in [(1u64, 10usize), (4095, 2), (1000, 300_000), (0, 4096)] {
            let mut out = vec![0u8; len + 1];
            let out = &mut out[1..];
            reader.read_ring(offset, out).unwrap();
            assert_eq!(out, &data[offset as usize..offset as usize + len]);
        }
    }
}
