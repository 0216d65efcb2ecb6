//! `replblk-bench`: what replication costs, measured against a local
//! O_DIRECT file on the same filesystem in the same run.
//!
//! ```text
//! cargo build --release && target/release/replblk-bench
//! target/release/replblk-bench --seconds 5 --markdown   # also a Markdown table
//! target/release/replblk-bench --dir /mnt/ssd/bench     # files under a chosen directory
//! target/release/replblk-bench --secondary-dir /dev/shm # secondaries' files elsewhere
//! ```
//!
//! Three workloads (4 KiB random writes at queue depth 1 and 32, 1 MiB
//! sequential writes at queue depth 4; `--workloads` picks some) run
//! against four targets:
//!
//! - `local`: a 1 GiB file opened with O_DIRECT, written through io_uring
//!   (no fdatasync, as a volume write completes without one too);
//! - `replblk-0`, `replblk-1`, `replblk-2`: a 1 GiB volume with 0, 1 and 2
//!   `replblkd` secondaries on 127.0.0.1, the primary in this process
//!   through the volume API, with the default replication config. The
//!   workload runs on the engine's thread (`Volume::host`) and hands each
//!   write over by a call, told its result by a call too
//!   (`LocalVolume::write_to`), as the block device's first queue does;
//!   with `--caller thread` it runs on the
//!   benchmark's own thread and reaches the engine through the volume's
//!   channel, as a caller on another thread does.
//!
//! Each workload runs `--seconds` after a one-second warm-up that is not
//! measured. Every file lives in a fresh directory under `--dir` (default
//! `target/bench` under the current directory: not /tmp, which may be tmpfs)
//! that is removed at the end, also on error or on a first Ctrl-C. With
//! `--secondary-dir` the secondaries' copies and logs go to a fresh
//! directory under that one instead (removed the same way), standing in for
//! the secondaries' own disks; the primary's copy and the baseline stay
//! under `--dir`. The files are sparse unless `--prefill` writes them in
//! full first (`--prefill secondaries`: only the secondaries' copies);
//! `--rounds N` repeats the whole run and says how often each target was
//! met; `--log-mib` sizes the secondaries' logs, and the report counts the
//! waits for room in them. The report also gives the CPU each write cost
//! the workload's thread, the process's other threads and the secondaries.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::future::Future;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;

use replblk::buf::{AlignedBuf, SharedBuf};
use replblk::config::ReplicationConfig;
use replblk::node::local_cluster::{LocalCluster, PRIMARY_NODE_ID};
use replblk::node::volume::{LocalVolume, ReplySink, Volume, VolumeError};
use replblk_tools::cpu_time::{CpuProbe, CpuTimes};

/// Size of the volume, and of the local baseline file.
const VOLUME_BYTES: u64 = 1 << 30;
/// Default size of each secondary's log, in MiB.
const DEFAULT_LOG_MIB: u64 = 256;
/// Unmeasured run before each workload's measured seconds.
const WARMUP: Duration = Duration::from_secs(1);
/// How long the writes still in flight at the end of a workload may take
/// to complete before the run is declared hung.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the secondaries may take to apply and clear their logs after a
/// workload (unmeasured, so that one workload's backlog does not slow the
/// next).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Highest latency the histograms hold, in µs; longer ones are clamped.
const LATENCY_MAX_US: u64 = 60_000_000;
/// Secondaries of the replicated targets.
const SECONDARIES: [u8; 3] = [0, 1, 2];
/// The default parent of the run directory, relative to the current one.
const DEFAULT_PARENT: &str = "target/bench";

#[derive(Parser)]
#[command(
    version,
    about = "Measures replblk's write IOPS, throughput and latency against a local O_DIRECT file"
)]
struct Cli {
    /// Directory to put the files under (a fresh subdirectory is made and
    /// removed at the end). Default: target/bench under the current
    /// directory. Use the disk being measured, not tmpfs: the baseline and
    /// the primary's copy are written there.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Directory for the secondaries' copies and logs (a fresh subdirectory
    /// is made and removed at the end), e.g. /dev/shm to keep them off the
    /// disk the primary and the baseline use. Default: under --dir, with
    /// everything else. It must accept O_DIRECT.
    #[arg(long)]
    secondary_dir: Option<PathBuf>,
    /// Measured seconds per workload and target (after 1 s of warm-up).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// The replblkd binary. Default: the one next to this executable.
    #[arg(long)]
    replblkd: Option<PathBuf>,
    /// Also print the results as Markdown (for docs/BENCHMARKS.md).
    #[arg(long)]
    markdown: bool,
    /// Volumes to measure, by number of secondaries (comma-separated, each
    /// 0-2). The local baseline is always measured; the targets need 2.
    #[arg(long, value_delimiter = ',', default_values_t = SECONDARIES,
          value_parser = clap::value_parser!(u8).range(0..=2))]
    secondaries: Vec<u8>,
    /// Where the volume's workload runs: on the engine's thread, as the
    /// block device's first queue does, or on the benchmark's own thread,
    /// through the volume's channel.
    #[arg(long, value_enum, default_value_t = Caller::Engine)]
    caller: Caller,
    /// Size of each secondary's log, in MiB. The default is larger than
    /// anything a workload leaves uncleared; a small log (8, say) measures
    /// writing while logs fill and clear.
    #[arg(long, default_value_t = DEFAULT_LOG_MIB,
          value_parser = clap::value_parser!(u64).range(4..=16384))]
    log_mib: u64,
    /// Rounds: the whole run (the local baseline, then each volume) this
    /// many times, each with its own table, then how often each target was
    /// met. On a shared, noisy machine one round says little.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// Write files in full (zeros) before measuring, as a block device or a
    /// preallocated file would be: `all` (what `--prefill` alone means) the
    /// local file and every node's copy; `secondaries` only the
    /// secondaries' copies, standing in for their own disks. By default
    /// every copy is sparse, as `replblk-ctl init` makes them, and the
    /// filesystem allocates blocks during the workloads.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "all")]
    prefill: Option<Fill>,
    /// Workloads to run (comma-separated): `qd1` (4 KiB random, queue depth
    /// 1), `qd32` (4 KiB random, queue depth 32), `seq` (1 MiB sequential).
    /// Targets of workloads not run are not reported.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [WorkloadKey::Qd1, WorkloadKey::Qd32, WorkloadKey::Seq])]
    workloads: Vec<WorkloadKey>,
}

/// A workload as named on the command line.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WorkloadKey {
    Qd1,
    Qd32,
    Seq,
}

/// Which files are written in full before measuring (`--prefill`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Fill {
    /// The local file and every node's copy.
    All,
    /// Only the secondaries' copies.
    Secondaries,
}

/// How each volume is run (from the command line).
#[derive(Clone, Copy)]
struct VolumeOptions {
    seconds: u64,
    workloads: Workloads,
    caller: Caller,
    log_bytes: u64,
    prefill: Option<Fill>,
}

/// Size of each write of [`prefill`].
const PREFILL_CHUNK_BYTES: usize = 8 << 20;

/// Writes zeros over the first `VOLUME_BYTES` of `path` and syncs it, so
/// that the workloads write into allocated blocks.
fn prefill(path: &Path) -> anyhow::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {} to fill it", path.display()))?;
    let zeros = vec![0u8; PREFILL_CHUNK_BYTES];
    let mut offset_bytes = 0;
    while offset_bytes < VOLUME_BYTES {
        file.write_all_at(&zeros, offset_bytes)
            .with_context(|| format!("filling {}", path.display()))?;
        offset_bytes += PREFILL_CHUNK_BYTES as u64;
    }
    file.sync_data()
        .with_context(|| format!("fdatasync of {}", path.display()))
}

/// Where a volume's workload runs (see `Args::caller`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Caller {
    /// On the engine's thread, calling it directly
    /// (`LocalVolume::write_to`, as the hosted ublk queue does).
    Engine,
    /// On the benchmark's thread, through the volume's channel.
    Thread,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    /// Block-aligned offsets, uniform over the volume.
    Random,
    /// One block after the other, wrapping at the end of the volume.
    Sequential,
}

struct Workload {
    key: WorkloadKey,
    name: &'static str,
    block_bytes: u64,
    queue_depth: usize,
    pattern: Pattern,
    seed: u64,
}

static WORKLOADS: [Workload; 3] = [
    Workload {
        key: WorkloadKey::Qd1,
        name: "4 KiB random write, QD1",
        block_bytes: 4096,
        queue_depth: 1,
        pattern: Pattern::Random,
        seed: 0x5EED_0001,
    },
    Workload {
        key: WorkloadKey::Qd32,
        name: "4 KiB random write, QD32",
        block_bytes: 4096,
        queue_depth: 32,
        pattern: Pattern::Random,
        seed: 0x5EED_0032,
    },
    Workload {
        key: WorkloadKey::Seq,
        name: "1 MiB sequential write, QD4",
        block_bytes: 1 << 20,
        queue_depth: 4,
        pattern: Pattern::Sequential,
        seed: 0x5EED_1004,
    },
];
const QD1: usize = 0;
const QD32: usize = 1;
const SEQ: usize = 2;

/// The workloads chosen on the command line.
#[derive(Clone, Copy)]
struct Workloads {
    qd1: bool,
    qd32: bool,
    seq: bool,
}

impl Workloads {
    fn chosen(keys: &[WorkloadKey]) -> Workloads {
        Workloads {
            qd1: keys.contains(&WorkloadKey::Qd1),
            qd32: keys.contains(&WorkloadKey::Qd32),
            seq: keys.contains(&WorkloadKey::Seq),
        }
    }

    fn includes(self, workload: &Workload) -> bool {
        match workload.key {
            WorkloadKey::Qd1 => self.qd1,
            WorkloadKey::Qd32 => self.qd32,
            WorkloadKey::Seq => self.seq,
        }
    }
}

/// What one workload measured on one target.
#[derive(Clone, Copy)]
struct Measured {
    iops: f64,
    mib_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    /// CPU used over (about) the measured window, per write counted in it.
    cpu_per_write: CpuPerWrite,
}

/// CPU per write, in µs, as [`CpuTimes`] splits it.
#[derive(Clone, Copy)]
struct CpuPerWrite {
    thread_user_us: f64,
    thread_system_us: f64,
    /// The process's threads other than the workload's.
    other_threads_us: f64,
    /// The secondaries' processes.
    secondaries_us: f64,
}

impl CpuPerWrite {
    fn new(used: &CpuTimes, writes: u64) -> CpuPerWrite {
        let per_write = |us: u64| us as f64 / writes as f64;
        let thread_us = used.thread_user_us + used.thread_system_us;
        CpuPerWrite {
            thread_user_us: per_write(used.thread_user_us),
            thread_system_us: per_write(used.thread_system_us),
            other_threads_us: per_write(used.process_us.saturating_sub(thread_us)),
            secondaries_us: per_write(used.watched_us),
        }
    }

    fn total_us(&self) -> f64 {
        self.thread_user_us + self.thread_system_us + self.other_threads_us + self.secondaries_us
    }
}

/// One target's figures, one per workload.
struct TargetResult {
    name: String,
    /// Per workload of [`WORKLOADS`]; `None` for one not run.
    measured: Vec<Option<Measured>>,
    /// For a volume with secondaries, per workload: how often and how long
    /// (ms) a secondary's log held the stream back, summed over the
    /// secondaries, warm-up and the flush after included. Empty otherwise.
    log_full: Vec<Option<(u64, u64)>>,
}

/// Something the workloads write to.
trait Target {
    async fn write(&self, offset_bytes: u64, data: SharedBuf) -> anyhow::Result<()>;
}

/// The baseline: a local O_DIRECT file through the engine's loop
/// (`replblk::ring`), so that baseline and volume wait alike.
struct LocalFile(replblk::ring::io::File);

impl Target for LocalFile {
    async fn write(&self, offset_bytes: u64, data: SharedBuf) -> anyhow::Result<()> {
        let (result, _) = self.0.write_all_at(data, offset_bytes).await;
        result.with_context(|| format!("writing the local file at {offset_bytes}"))
    }
}

/// A replicated volume through the volume's channel, from the benchmark's
/// own thread (`--caller thread`).
struct ReplicatedVolume(Arc<Volume>);

impl Target for ReplicatedVolume {
    async fn write(&self, offset_bytes: u64, data: SharedBuf) -> anyhow::Result<()> {
        self.0
            .write(offset_bytes, data, false)
            .await
            .with_context(|| format!("writing the volume at {offset_bytes}"))
    }
}

/// xorshift64*: a fixed seed gives every target the same offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in 0..bound (multiply-high, no modulo bias to speak of).
    fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(bound)) >> 64) as u64
    }
}

/// Where the next write goes, shared by one workload's workers.
struct Offsets {
    pattern: Pattern,
    block_bytes: u64,
    blocks: u64,
    rng: Rng,
    next_block: u64,
}

impl Offsets {
    fn new(workload: &Workload) -> Offsets {
        Offsets {
            pattern: workload.pattern,
            block_bytes: workload.block_bytes,
            blocks: VOLUME_BYTES / workload.block_bytes,
            rng: Rng(workload.seed | 1),
            next_block: 0,
        }
    }

    fn next(&mut self) -> u64 {
        let block = match self.pattern {
            Pattern::Random => self.rng.below(self.blocks),
            Pattern::Sequential => {
                let block = self.next_block;
                self.next_block = (block + 1) % self.blocks;
                block
            }
        };
        block * self.block_bytes
    }
}

/// One workload's clock and offsets, shared by its workers (one thread).
struct Run {
    measure_from: Instant,
    end: Instant,
    offsets: RefCell<Offsets>,
    interrupted: &'static AtomicBool,
    cpu_probe: Rc<CpuProbe>,
    /// CPU used up to the first write counted, and up to the first worker
    /// that saw the window's end: the window's CPU, give or take a write.
    cpu_at_start: Cell<Option<CpuTimes>>,
    cpu_at_end: Cell<Option<CpuTimes>>,
}

impl Run {
    /// A run of `workload` starting now: a warm-up, then `measured`.
    fn start(
        workload: &Workload,
        measured: Duration,
        interrupted: &'static AtomicBool,
        cpu_probe: Rc<CpuProbe>,
    ) -> Run {
        let start = Instant::now();
        Run {
            measure_from: start + WARMUP,
            end: start + WARMUP + measured,
            offsets: RefCell::new(Offsets::new(workload)),
            interrupted,
            cpu_probe,
            cpu_at_start: Cell::new(None),
            cpu_at_end: Cell::new(None),
        }
    }
}

impl Run {
    /// Whether a write about to be issued `now` is past the run's end, which
    /// the first to see it marks with the CPU used so far. Fails if the
    /// run was interrupted.
    fn is_over(&self, now: Instant) -> anyhow::Result<bool> {
        if self.interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        if now < self.end {
            return Ok(false);
        }
        if self.cpu_at_end.get().is_none() {
            self.cpu_at_end.set(Some(self.cpu_probe.read()?));
        }
        Ok(true)
    }

    /// Counts a write issued at `issued` that completed now, if it completed
    /// inside the measured window.
    fn count(&self, issued: Instant, tally: &mut WorkerTally) -> anyhow::Result<()> {
        let done = Instant::now();
        if done >= self.measure_from && done < self.end {
            if self.cpu_at_start.get().is_none() {
                self.cpu_at_start.set(Some(self.cpu_probe.read()?));
            }
            tally.completed += 1;
            let micros = u64::try_from((done - issued).as_micros()).unwrap_or(u64::MAX);
            tally.latency_us.saturating_record(micros.max(1));
        }
        Ok(())
    }
}

/// What one worker saw in the measured window.
struct WorkerTally {
    completed: u64,
    latency_us: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds")
}

/// Keeps one write in flight until the run ends. A write counts if it
/// completes inside the measured window; its latency is recorded then.
async fn worker<T: Target + 'static>(
    target: Rc<T>,
    run: Rc<Run>,
    data: SharedBuf,
) -> anyhow::Result<WorkerTally> {
    let mut tally = WorkerTally {
        completed: 0,
        latency_us: histogram(),
    };
    loop {
        let issued = Instant::now();
        if run.is_over(issued)? {
            return Ok(tally);
        }
        let offset = run.offsets.borrow_mut().next();
        target.write(offset, data.clone()).await?;
        run.count(issued, &mut tally)?;
    }
}

/// A payload of `length` bytes that is not all zeroes.
fn payload(length: u64) -> SharedBuf {
    let mut buf = AlignedBuf::zeroed(length as usize);
    for (index, byte) in buf.as_mut_slice().iter_mut().enumerate() {
        *byte = (index as u8).wrapping_mul(31).wrapping_add(7);
    }
    SharedBuf::new(buf)
}

/// Runs `workload` on `target`: `queue_depth` workers, each keeping one
/// write of the one shared payload in flight. Spawns nothing, so it runs on
/// whichever runtime polls it; `sleep` is that runtime's timer, which bounds
/// the wait for the last writes. `cpu_probe` is read on this thread.
async fn run_workload<T: Target + 'static, S: Future<Output = ()>>(
    target: Rc<T>,
    workload: &Workload,
    seconds: u64,
    interrupted: &'static AtomicBool,
    cpu_probe: Rc<CpuProbe>,
    sleep: impl FnOnce(Duration) -> S,
) -> anyhow::Result<Measured> {
    let data = payload(workload.block_bytes);
    let measured = Duration::from_secs(seconds);
    let run = Rc::new(Run::start(workload, measured, interrupted, cpu_probe));
    let mut workers: FuturesUnordered<_> = (0..workload.queue_depth)
        .map(|_| worker(target.clone(), run.clone(), data.clone()))
        .collect();
    let collect = async {
        let mut completed = 0u64;
        let mut latency_us = histogram();
        while let Some(tally) = workers.next().await {
            let tally = tally?;
            completed += tally.completed;
            latency_us
                .add(&tally.latency_us)
                .context("merging latency histograms")?;
        }
        anyhow::Ok((completed, latency_us))
    };
    let limit = WARMUP + measured + DRAIN_TIMEOUT;
    let (completed, latency_us) = tokio::select! {
        collected = collect => collected?,
        () = sleep(limit) => return Err(still_in_flight(workload)),
    };
    measured_result(workload, measured, &run, completed, &latency_us)
}

/// A workload's writes did not all end within [`DRAIN_TIMEOUT`] of its
/// end.
fn still_in_flight(workload: &Workload) -> anyhow::Error {
    anyhow!(
        "{}: writes still in flight {} s after the run's end",
        workload.name,
        DRAIN_TIMEOUT.as_secs()
    )
}

/// What a workload's run measured, from its count and latencies.
fn measured_result(
    workload: &Workload,
    measured: Duration,
    run: &Run,
    completed: u64,
    latency_us: &Histogram<u64>,
) -> anyhow::Result<Measured> {
    if completed == 0 {
        bail!(
            "{}: no write completed in the measured window",
            workload.name
        );
    }
    let (Some(cpu_at_start), Some(cpu_at_end)) = (run.cpu_at_start.get(), run.cpu_at_end.get())
    else {
        unreachable!("a write was counted and every worker saw the end");
    };
    let iops = completed as f64 / measured.as_secs_f64();
    Ok(Measured {
        iops,
        mib_per_s: iops * workload.block_bytes as f64 / f64::from(1u32 << 20),
        p50_us: latency_us.value_at_quantile(0.50),
        p99_us: latency_us.value_at_quantile(0.99),
        cpu_per_write: CpuPerWrite::new(&cpu_at_end.since(&cpu_at_start), completed),
    })
}

/// Runs `workload` on the engine's thread the way the hosted ublk queue
/// drives the engine: `queue_depth` slots, each handing its write over
/// with [`LocalVolume::write_to`] and told the result by a call on this
/// sink, which hands over the slot's next write. No future per write.
struct SinkWorkload {
    volume: LocalVolume,
    run: Rc<Run>,
    data: SharedBuf,
    /// This sink as the engine takes it; a cycle, broken once every slot
    /// ended (`end_slot`) or the wait for them timed out.
    this: RefCell<Option<Rc<dyn ReplySink>>>,
    /// When each slot's write in flight was handed over.
    issued: RefCell<Vec<Instant>>,
    tally: RefCell<WorkerTally>,
    /// Slots whose writes have not ended.
    live: Cell<usize>,
    failure: RefCell<Option<anyhow::Error>>,
    ended: Cell<Option<Waker>>,
}

impl SinkWorkload {
    /// Hands over slot `token`'s next write, or ends the slot once the run
    /// is over.
    fn submit(&self, token: u64) {
        if let Err(error) = self.next(token) {
            self.failure.borrow_mut().get_or_insert(error);
            self.end_slot();
        }
    }

    fn next(&self, token: u64) -> anyhow::Result<()> {
        let issued = Instant::now();
        if self.run.is_over(issued)? {
            self.end_slot();
            return Ok(());
        }
        let offset_bytes = self.run.offsets.borrow_mut().next();
        self.issued.borrow_mut()[token as usize] = issued;
        let sink = self
            .this
            .borrow()
            .clone()
            .expect("the sink lives while slots do");
        self.volume
            .write_to(offset_bytes, self.data.clone(), false, &sink, token);
        Ok(())
    }

    fn end_slot(&self) {
        let live = self.live.get() - 1;
        self.live.set(live);
        if live == 0 {
            self.this.borrow_mut().take();
            if let Some(waker) = self.ended.take() {
                waker.wake();
            }
        }
    }
}

impl ReplySink for SinkWorkload {
    fn reply(&self, token: u64, result: Result<(), VolumeError>) {
        let recorded = result
            .with_context(|| "writing the volume".to_string())
            .and_then(|()| {
                let issued = self.issued.borrow()[token as usize];
                self.run.count(issued, &mut self.tally.borrow_mut())
            });
        match recorded {
            Ok(()) => self.submit(token),
            Err(error) => {
                self.failure.borrow_mut().get_or_insert(error);
                self.end_slot();
            }
        }
    }
}

/// Ready once every slot of the workload ended.
struct SlotsEnded<'a>(&'a SinkWorkload);

impl Future for SlotsEnded<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        if self.0.live.get() == 0 {
            return Poll::Ready(());
        }
        self.0.ended.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

/// As [`run_workload`], through [`SinkWorkload`] on the engine's thread.
async fn run_sink_workload(
    volume: LocalVolume,
    workload: &Workload,
    seconds: u64,
    interrupted: &'static AtomicBool,
    cpu_probe: Rc<CpuProbe>,
) -> anyhow::Result<Measured> {
    let measured = Duration::from_secs(seconds);
    let run = Rc::new(Run::start(workload, measured, interrupted, cpu_probe));
    let depth = workload.queue_depth;
    let sink = Rc::new(SinkWorkload {
        volume,
        issued: RefCell::new(vec![run.measure_from; depth]),
        run,
        data: payload(workload.block_bytes),
        this: RefCell::new(None),
        tally: RefCell::new(WorkerTally {
            completed: 0,
            latency_us: histogram(),
        }),
        live: Cell::new(depth),
        failure: RefCell::new(None),
        ended: Cell::new(None),
    });
    *sink.this.borrow_mut() = Some(sink.clone());
    for token in 0..depth as u64 {
        sink.submit(token);
    }
    let limit = WARMUP + measured + DRAIN_TIMEOUT;
    let ended = replblk::ring::timeout(limit, SlotsEnded(&sink)).await;
    // Whatever happened, the cycle goes (writes still in flight keep the
    // sink alive until the engine tells them).
    sink.this.borrow_mut().take();
    if ended.is_err() {
        return Err(still_in_flight(workload));
    }
    if let Some(error) = sink.failure.borrow_mut().take() {
        return Err(error);
    }
    let tally = sink.tally.borrow();
    measured_result(
        workload,
        measured,
        &sink.run,
        tally.completed,
        &tally.latency_us,
    )
}

fn progress(target: &str, workload: &Workload, measured: &Measured) {
    eprintln!(
        "  {target:<10} {:<28} {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>6} µs  p99 {:>6} µs",
        workload.name, measured.iops, measured.mib_per_s, measured.p50_us, measured.p99_us
    );
}

/// The baseline: the same workloads on a local O_DIRECT file, fdatasync'd
/// between workloads (unmeasured).
fn bench_local(
    dir: &Path,
    seconds: u64,
    workloads: Workloads,
    fill: bool,
    interrupted: &'static AtomicBool,
) -> anyhow::Result<TargetResult> {
    let path = dir.join("local.data");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .with_context(|| format!("opening {} with O_DIRECT", path.display()))?;
    // Sparse, like the volume's copies (unless both are filled).
    file.set_len(VOLUME_BYTES)
        .with_context(|| format!("sizing {}", path.display()))?;
    if fill {
        prefill(&path)?;
    }
    let ring = replblk::ring::Ring::new().context("setting up the io_uring")?;
    let cpu_probe = Rc::new(CpuProbe::new(&[])?);
    let measured = ring.block_on(async {
        let file = Rc::new(LocalFile(replblk::ring::io::File::from_std(file)));
        let mut measured = Vec::new();
        for workload in &WORKLOADS {
            if !workloads.includes(workload) {
                measured.push(None);
                continue;
            }
            let result = run_workload(
                file.clone(),
                workload,
                seconds,
                interrupted,
                cpu_probe.clone(),
                replblk::ring::sleep,
            )
            .await?;
            progress("local", workload, &result);
            measured.push(Some(result));
            file.0
                .sync_data()
                .await
                .with_context(|| format!("fdatasync of {}", path.display()))?;
        }
        anyhow::Ok(measured)
    })?;
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(TargetResult {
        name: "local".into(),
        measured,
        log_full: Vec::new(),
    })
}

/// The workloads on a volume with `secondaries` secondaries. Between
/// workloads (unmeasured) the volume is flushed and every secondary's log
/// applied and cleared.
fn bench_volume(
    dir: &Path,
    secondary_dir: Option<&Path>,
    replblkd: &Path,
    secondaries: usize,
    options: VolumeOptions,
    interrupted: &'static AtomicBool,
) -> anyhow::Result<TargetResult> {
    let VolumeOptions {
        seconds,
        workloads,
        caller,
        log_bytes,
        prefill: fill,
    } = options;
    let name = format!("replblk-{secondaries}");
    let cluster_dir = dir.join(&name);
    std::fs::create_dir(&cluster_dir)
        .with_context(|| format!("creating {}", cluster_dir.display()))?;
    let secondary_cluster_dir = secondary_dir.map(|parent| parent.join(&name));
    if let Some(path) = &secondary_cluster_dir {
        std::fs::create_dir(path).with_context(|| format!("creating {}", path.display()))?;
    }
    let mut cluster = LocalCluster::create_split(
        &cluster_dir,
        secondary_cluster_dir.as_deref(),
        replblkd,
        secondaries,
        VOLUME_BYTES,
        log_bytes,
        &ReplicationConfig::default(),
    )
    .map_err(|e| anyhow!("{name}: creating the cluster: {e}"))?;
    if let Some(fill) = fill {
        for node in &cluster.config().nodes {
            if fill == Fill::All || node.id != PRIMARY_NODE_ID {
                prefill(&node.data_path).with_context(|| format!("{name}: node {}", node.id))?;
            }
        }
    }
    cluster
        .start_secondaries()
        .map_err(|e| anyhow!("{name}: starting the secondaries: {e}"))?;
    let volume = Arc::new(
        Volume::start(cluster.config(), PRIMARY_NODE_ID)
            .with_context(|| format!("{name}: starting the primary"))?,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let target = Rc::new(ReplicatedVolume(volume.clone()));
    let secondary_pids = cluster.secondary_pids();
    let mut measured = Vec::new();
    let mut log_full = Vec::new();
    let mut log_full_before = (0, 0);
    for workload in &WORKLOADS {
        if !workloads.includes(workload) {
            measured.push(None);
            if secondaries > 0 {
                log_full.push(None);
            }
            continue;
        }
        let result = match caller {
            Caller::Thread => runtime.block_on(run_workload(
                target.clone(),
                workload,
                seconds,
                interrupted,
                Rc::new(CpuProbe::new(&secondary_pids)?),
                tokio::time::sleep,
            ))?,
            Caller::Engine => {
                let (sender, receiver) = std::sync::mpsc::channel();
                let cpu_probe = CpuProbe::new(&secondary_pids)?;
                volume
                    .host(Box::new(move |local| {
                        Box::pin(async move {
                            let result = run_sink_workload(
                                local,
                                workload,
                                seconds,
                                interrupted,
                                Rc::new(cpu_probe),
                            );
                            let _ = sender.send(result.await);
                        })
                    }))
                    .with_context(|| format!("{name}: handing the workload to the engine"))?;
                receiver
                    .recv()
                    .map_err(|_| anyhow!("{name}: the engine dropped the workload unfinished"))??
            }
        };
        progress(&name, workload, &result);
        measured.push(Some(result));
        let status = runtime
            .block_on(async {
                volume.flush().await?;
                volume.status().await
            })
            .with_context(|| format!("{name}: flushing after {}", workload.name))?;
        cluster
            .wait_logs_cleared(status.next_seq, SETTLE_TIMEOUT)
            .map_err(|e| anyhow!("{name}: after {}: {e}", workload.name))?;
        if secondaries > 0 {
            let total = status.members.iter().fold((0, 0), |(waits, ms), member| {
                (
                    waits + member.stats.log_full_waits,
                    ms + member.stats.log_full_wait_ms,
                )
            });
            log_full.push(Some((
                total.0 - log_full_before.0,
                total.1 - log_full_before.1,
            )));
            log_full_before = total;
        }
    }
    drop(target);
    Arc::into_inner(volume)
        .expect("the benchmark holds the only handle to the volume")
        .stop()
        .with_context(|| format!("{name}: stopping the primary"))?;
    // Kills the secondaries before their files go.
    drop(cluster);
    std::fs::remove_dir_all(&cluster_dir)
        .with_context(|| format!("removing {}", cluster_dir.display()))?;
    if let Some(path) = &secondary_cluster_dir {
        std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(TargetResult {
        name,
        measured,
        log_full,
    })
}

/// The run directory; removed (with everything in it) when dropped, so on
/// success, on error and on a panic alike.
struct RunDir {
    path: PathBuf,
    /// The default parent, removed too if this run left it empty.
    default_parent: Option<PathBuf>,
}

impl RunDir {
    fn create(parent: Option<&Path>) -> anyhow::Result<RunDir> {
        let (parent, default_parent) = match parent {
            Some(parent) => (parent.to_owned(), None),
            None => {
                let parent = std::env::current_dir()
                    .context("finding the current directory")?
                    .join(DEFAULT_PARENT);
                (parent.clone(), Some(parent))
            }
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0);
        let path = parent.join(format!("run-{}-{stamp}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(RunDir {
            path,
            default_parent,
        })
    }

    fn remove(&self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            if error.kind() != std::io::ErrorKind::NotFound {
                eprintln!("replblk-bench: removing {}: {error}", self.path.display());
            }
        }
        if let Some(parent) = &self.default_parent {
            // Fails, harmlessly, if another run's files are there.
            let _ = std::fs::remove_dir(parent);
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A first Ctrl-C stops the run cleanly (the workers notice, the run
/// directories are removed); a second one removes them and exits.
fn watch_ctrl_c(interrupted: &'static AtomicBool, dirs: Vec<PathBuf>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the signal runtime")?;
    std::thread::Builder::new()
        .name("replblk-bench-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                if tokio::signal::ctrl_c().await.is_err() {
                    return;
                }
                eprintln!("replblk-bench: interrupted, stopping (Ctrl-C again to quit at once)");
                interrupted.store(true, Ordering::Relaxed);
                if tokio::signal::ctrl_c().await.is_ok() {
                    for dir in &dirs {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                    std::process::exit(130);
                }
            })
        })
        .context("spawning the signal thread")?;
    Ok(())
}

/// The first line of a command's output, if it ran.
fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The filesystem type of `path`, from `df -T`, else /proc/mounts.
fn filesystem_of(path: &Path) -> String {
    let from_df = command_output("df", &["-T", &path.to_string_lossy()]).and_then(|text| {
        let line = text.lines().nth(1)?.to_owned();
        let mut fields = line.split_whitespace();
        let device = fields.next()?.to_owned();
        let kind = fields.next()?.to_owned();
        let mount = fields.last().unwrap_or("?").to_owned();
        Some(format!("{kind} ({device} on {mount})"))
    });
    if let Some(found) = from_df {
        return found;
    }
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (device, mount, kind) = (fields.first()?, fields.get(1)?, fields.get(2)?);
            canonical
                .starts_with(mount)
                .then(|| (mount.len(), format!("{kind} ({device} on {mount})")))
        })
        .max_by_key(|(length, _)| *length)
        .map(|(_, found)| found)
        .unwrap_or_else(|| "unknown".into())
}

fn machine_line() -> String {
    let cores = command_output("nproc", &[]).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into())
    });
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = command_output("uname", &["-r"]).unwrap_or_else(|| "unknown".into());
    format!("machine: nproc {cores}, CPU {cpu}, kernel {kernel}")
}

/// Which storage each side of the run used.
fn storage_line(dir: &Path, secondary_dir: Option<&Path>) -> String {
    let main = format!("{} under {}", filesystem_of(dir), dir.display());
    let secondaries = match secondary_dir {
        Some(other) => format!("{} under {}", filesystem_of(other), other.display()),
        None => "the same".to_owned(),
    };
    format!(
        "storage: local baseline and primary copy: {main}; secondaries' copies and logs: {secondaries}"
    )
}

/// The 1, 5 and 15 minute load averages: how busy the (shared) machine
/// was when the run started.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "unknown".into())
}

/// replblk / local for throughput (higher is better).
fn ratio(value: f64, base: f64) -> f64 {
    if base > 0.0 {
        value / base
    } else {
        f64::NAN
    }
}

struct Goal {
    text: &'static str,
    workload: usize,
    achieved: fn(&Measured, &Measured) -> (f64, bool),
}

/// The issue's targets, for the volume with 2 secondaries.
const GOALS: [Goal; 3] = [
    Goal {
        text: "4 KiB random QD32 IOPS >= 0.5x local",
        workload: QD32,
        achieved: |replicated, local| {
            let r = ratio(replicated.iops, local.iops);
            (r, r >= 0.5)
        },
    },
    Goal {
        text: "4 KiB random QD1 p50 <= 2x local",
        workload: QD1,
        achieved: |replicated, local| {
            let r = ratio(replicated.p50_us as f64, local.p50_us as f64);
            (r, r <= 2.0)
        },
    },
    Goal {
        text: "1 MiB sequential MiB/s >= 0.6x local",
        workload: SEQ,
        achieved: |replicated, local| {
            let r = ratio(replicated.mib_per_s, local.mib_per_s);
            (r, r >= 0.6)
        },
    },
];

/// One table row's cells: workload, target, IOPS, MiB/s, throughput ratio,
/// p50, p50 ratio, p99, p99 ratio.
fn rows(results: &[TargetResult]) -> Vec<[String; 9]> {
    let local = &results[0];
    let mut rows = Vec::new();
    for (index, workload) in WORKLOADS.iter().enumerate() {
        let Some(base) = &local.measured[index] else {
            continue;
        };
        for result in results {
            let Some(m) = &result.measured[index] else {
                continue;
            };
            rows.push([
                workload.name.to_owned(),
                result.name.clone(),
                format!("{:.0}", m.iops),
                format!("{:.1}", m.mib_per_s),
                format!("{:.2}x", ratio(m.iops, base.iops)),
                m.p50_us.to_string(),
                format!("{:.2}x", ratio(m.p50_us as f64, base.p50_us as f64)),
                m.p99_us.to_string(),
                format!("{:.2}x", ratio(m.p99_us as f64, base.p99_us as f64)),
            ]);
        }
    }
    rows
}

const HEADINGS: [&str; 9] = [
    "workload", "target", "IOPS", "MiB/s", "vs local", "p50 µs", "vs local", "p99 µs", "vs local",
];

fn plain_table(rows: &[[String; 9]]) -> String {
    let mut widths = HEADINGS.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut text = String::new();
        for (column, (cell, width)) in cells.iter().zip(widths).enumerate() {
            let pad = " ".repeat(width - cell.chars().count());
            if column < 2 {
                text.push_str(cell);
                text.push_str(&pad);
            } else {
                text.push_str(&pad);
                text.push_str(cell);
            }
            text.push_str("  ");
        }
        text.trim_end().to_owned()
    };
    let mut text = line(&HEADINGS);
    text.push('\n');
    let mut previous = "";
    for row in rows {
        if !previous.is_empty() && previous != row[0] {
            text.push('\n');
        }
        previous = &row[0];
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        text.push_str(&line(&cells));
        text.push('\n');
    }
    text
}

fn markdown_table(rows: &[[String; 9]]) -> String {
    let mut text = format!("| {} |\n", HEADINGS.join(" | "));
    text.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for row in rows {
        let _ = writeln!(text, "| {} |", row.join(" | "));
    }
    text
}

/// The goals, each with its measured ratio and met/missed.
fn goal_lines(results: &[TargetResult]) -> Vec<String> {
    let local = &results[0];
    let Some(two) = results.iter().find(|r| r.name == "replblk-2") else {
        return Vec::new();
    };
    GOALS
        .iter()
        .filter_map(|goal| {
            let (measured, met) = goal_ratio(goal, two, local)?;
            Some(format!(
                "{}: measured {measured:.2}x, {}",
                goal.text,
                if met { "met" } else { "missed" }
            ))
        })
        .collect()
}

/// `goal`'s ratio and whether it was met, if its workload ran.
fn goal_ratio(goal: &Goal, two: &TargetResult, local: &TargetResult) -> Option<(f64, bool)> {
    Some((goal.achieved)(
        two.measured[goal.workload].as_ref()?,
        local.measured[goal.workload].as_ref()?,
    ))
}

/// `text` with its first letter in upper case.
fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// One line per volume with secondaries: its log-full waits per workload.
fn log_full_lines(results: &[TargetResult]) -> Vec<String> {
    results
        .iter()
        .filter(|result| !result.log_full.is_empty())
        .map(|result| {
            let workloads: Vec<String> = WORKLOADS
                .iter()
                .zip(&result.log_full)
                .filter_map(|(workload, waits)| {
                    let (waits, ms) = (*waits)?;
                    Some(format!("{}: {waits} ({ms} ms)", workload.name))
                })
                .collect();
            format!("{}: {}", result.name, workloads.join("; "))
        })
        .collect()
}

fn replblkd_path(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path,
        None => std::env::current_exe()
            .context("finding this executable")?
            .with_file_name("replblkd"),
    };
    if !path.is_file() {
        bail!(
            "replblkd not found at {}: build it with cargo build --release (or pass --replblkd PATH)",
            path.display()
        );
    }
    Ok(path)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let replblkd = replblkd_path(cli.replblkd)?;
    let run_dir = RunDir::create(cli.dir.as_deref())?;
    let secondary_run_dir = match cli.secondary_dir.as_deref() {
        Some(parent) => Some(RunDir::create(Some(parent))?),
        None => None,
    };
    let interrupted: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    watch_ctrl_c(
        interrupted,
        std::iter::once(&run_dir)
            .chain(&secondary_run_dir)
            .map(|dir| dir.path.clone())
            .collect(),
    )?;

    let parent = |dir: &RunDir| {
        dir.path
            .parent()
            .expect("a run directory has a parent")
            .to_owned()
    };
    let machine = machine_line();
    let storage = storage_line(
        &parent(&run_dir),
        secondary_run_dir.as_ref().map(parent).as_deref(),
    );
    let setup = format!(
        "setup: volume and local file {} GiB ({}), log {} MiB per secondary, {} s per workload after {} s of warm-up, default ReplicationConfig, secondaries on 127.0.0.1, volume workload {}",
        VOLUME_BYTES >> 30,
        match cli.prefill {
            Some(Fill::All) => "every file written in full before measuring",
            Some(Fill::Secondaries) =>
                "the local file and the primary's copy sparse, the secondaries' copies written in full before measuring",
            None => "sparse",
        },
        cli.log_mib,
        cli.seconds,
        WARMUP.as_secs(),
        match cli.caller {
            Caller::Engine => "on the engine's thread",
            Caller::Thread => "on the benchmark's thread (through the channel)",
        },
    );
    eprintln!("{machine}");
    eprintln!("{storage}");
    eprintln!("files under {}", run_dir.path.display());
    if let Some(dir) = &secondary_run_dir {
        eprintln!("secondaries' files under {}", dir.path.display());
    }

    let workloads = Workloads::chosen(&cli.workloads);
    let started = Instant::now();
    let mut rounds = Vec::new();
    for round in 1..=cli.rounds {
        if cli.rounds > 1 {
            eprintln!("round {round} of {}", cli.rounds);
        }
        let load = load_average();
        let mut results = vec![bench_local(
            &run_dir.path,
            cli.seconds,
            workloads,
            cli.prefill == Some(Fill::All),
            interrupted,
        )?];
        for &secondaries in &cli.secondaries {
            if interrupted.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            results.push(bench_volume(
                &run_dir.path,
                secondary_run_dir.as_ref().map(|dir| dir.path.as_path()),
                &replblkd,
                usize::from(secondaries),
                VolumeOptions {
                    seconds: cli.seconds,
                    workloads,
                    caller: cli.caller,
                    log_bytes: cli.log_mib << 20,
                    prefill: cli.prefill,
                },
                interrupted,
            )?);
        }
        rounds.push((load, results));
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    run_dir.remove();
    if let Some(dir) = &secondary_run_dir {
        dir.remove();
    }

    let header = [machine.as_str(), storage.as_str(), setup.as_str()];
    let summary = summary_lines(&rounds);
    print_report(header, &rounds, &summary, Style::Plain);
    if cli.markdown {
        println!();
        print_report(header, &rounds, &summary, Style::Markdown);
    }
    Ok(())
}

/// How [`print_round`] prints.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    Plain,
    Markdown,
}

const LOG_FULL_TITLE: &str = "waits for room in a secondary's log, summed over the secondaries, warm-up and the flush after included (a wait stops sending to that secondary until it clears):";
const GOALS_TITLE: &str =
    "targets of the issue (volume with 2 secondaries; information, not a failure):";
const SUMMARY_TITLE: &str = "targets over all rounds (volume with 2 secondaries):";
const CPU_TITLE: &str = "CPU per write, µs: the workload's thread (the engine's too with --caller engine) in user mode + in the kernel; the process's other threads (io_uring's workers); the secondaries' processes:";
const CPU_SUMMARY_TITLE: &str =
    "CPU per write over all rounds, µs, median (range) of the sum of the four:";

impl Style {
    /// A heading line (and, in Markdown, the blank line after it).
    fn title(self, text: &str) -> String {
        match self {
            Style::Plain => text.to_owned(),
            Style::Markdown => format!("{}\n", capitalized(text)),
        }
    }

    /// What starts each line of a list.
    fn bullet(self) -> &'static str {
        match self {
            Style::Plain => "  ",
            Style::Markdown => "- ",
        }
    }

    /// Prints `lines` under `title`, after a blank line; nothing if empty.
    fn list(self, title: &str, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        println!();
        println!("{}", self.title(title));
        for line in lines {
            println!("{}{line}", self.bullet());
        }
    }
}

/// The whole report: header lines, every round, and the summary.
fn print_report(
    header: [&str; 3],
    rounds: &[(String, Vec<TargetResult>)],
    summary: &[String],
    style: Style,
) {
    // Markdown needs two trailing spaces to keep the header's lines apart.
    let line_end = if style == Style::Markdown { "  " } else { "" };
    println!("{}{line_end}", header[0]);
    println!("{}{line_end}", header[1]);
    println!("{}", header[2]);
    for (index, (load, results)) in rounds.iter().enumerate() {
        let heading = if rounds.len() > 1 {
            format!(
                "round {} of {}, load average at start {load}",
                index + 1,
                rounds.len()
            )
        } else {
            format!("load average at start {load}")
        };
        println!();
        println!("{}", style.title(&heading));
        print_round(results, style);
    }
    style.list(SUMMARY_TITLE, summary);
    style.list(CPU_SUMMARY_TITLE, &cpu_summary_lines(rounds));
}

/// One round's table, its targets and its log-full waits.
fn print_round(results: &[TargetResult], style: Style) {
    let rows = rows(results);
    print!(
        "{}",
        match style {
            Style::Plain => plain_table(&rows),
            Style::Markdown => markdown_table(&rows),
        }
    );
    style.list(GOALS_TITLE, &goal_lines(results));
    style.list(LOG_FULL_TITLE, &log_full_lines(results));
    style.list(CPU_TITLE, &cpu_lines(results));
}

/// One line per target and workload run: its CPU per write.
fn cpu_lines(results: &[TargetResult]) -> Vec<String> {
    let mut lines = Vec::new();
    for (index, workload) in WORKLOADS.iter().enumerate() {
        for result in results {
            let Some(measured) = &result.measured[index] else {
                continue;
            };
            let cpu = measured.cpu_per_write;
            lines.push(format!(
                "{} {}: {:.1} + {:.1}; {:.1}; {:.1} (total {:.1})",
                result.name,
                workload.name,
                cpu.thread_user_us,
                cpu.thread_system_us,
                cpu.other_threads_us,
                cpu.secondaries_us,
                cpu.total_us()
            ));
        }
    }
    lines
}

/// With more than one round: per target and workload, the median and
/// range of the total CPU per write.
fn cpu_summary_lines(rounds: &[(String, Vec<TargetResult>)]) -> Vec<String> {
    if rounds.len() < 2 {
        return Vec::new();
    }
    let mut lines = Vec::new();
    for (index, workload) in WORKLOADS.iter().enumerate() {
        for (target, result) in rounds[0].1.iter().enumerate() {
            let mut totals: Vec<f64> = rounds
                .iter()
                .filter_map(|(_, results)| {
                    Some(
                        results.get(target)?.measured[index]?
                            .cpu_per_write
                            .total_us(),
                    )
                })
                .collect();
            if totals.is_empty() {
                continue;
            }
            totals.sort_by(f64::total_cmp);
            lines.push(format!(
                "{} {}: {:.1} ({:.1}-{:.1})",
                result.name,
                workload.name,
                median(&totals),
                totals[0],
                totals[totals.len() - 1]
            ));
        }
    }
    lines
}

/// The median of `sorted`, which is not empty.
fn median(sorted: &[f64]) -> f64 {
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

/// With more than one round: per target, the range and median of its
/// ratio and how many rounds met it.
fn summary_lines(rounds: &[(String, Vec<TargetResult>)]) -> Vec<String> {
    if rounds.len() < 2 {
        return Vec::new();
    }
    GOALS
        .iter()
        .filter_map(|goal| {
            let mut ratios: Vec<(f64, bool)> = rounds
                .iter()
                .filter_map(|(_, results)| {
                    let local = &results[0];
                    let two = results.iter().find(|r| r.name == "replblk-2")?;
                    goal_ratio(goal, two, local)
                })
                .collect();
            if ratios.is_empty() {
                return None;
            }
            let met = ratios.iter().filter(|(_, met)| *met).count();
            ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
            let sorted: Vec<f64> = ratios.iter().map(|(ratio, _)| *ratio).collect();
            let median = median(&sorted);
            Some(format!(
                "{}: {:.2}x-{:.2}x, median {median:.2}x, met in {met} of {}",
                goal.text,
                ratios[0].0,
                ratios[ratios.len() - 1].0,
                ratios.len()
            ))
        })
        .collect()
}
