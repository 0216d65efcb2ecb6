//! Multi-process replication: `replblkd` secondaries on 127.0.0.1 and a
//! primary in this process, driven through the volume API with random,
//! overlapping writes at queue depth 32, with flushes. What a user cares
//! about is checked: every secondary's copy ends byte-identical to the
//! primary's, the bytes are the ones written, and every log is cleared.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use replblk::buf::{AlignedBuf, SharedBuf};
use replblk::config::ReplicationConfig;
use replblk::net::{query_node, NodeReport};
use replblk::node::local_cluster::{first_difference, LocalCluster, PRIMARY_NODE_ID};
use replblk::node::primary::LOG_FULL_REPORT_INTERVAL_MS;
use replblk::node::volume::{Replicate, Volume, VolumeStatus};

const BLOCK_BYTES: u64 = 4096;
const VOLUME_BYTES: u64 = 64 << 20;
const LOG_BYTES: u64 = 32 << 20;
const QUEUE_DEPTH: usize = 32;
/// Longest a workload may take while a secondary is stuck: far above the
/// ack and member timeouts the test sets (1 s together).
const STUCK_WORKLOAD_TIMEOUT: Duration = Duration::from_secs(120);
const WRITES: u64 = 10_000;
const FLUSH_EVERY_WRITES: u64 = 500;
/// Bound on one workload: a run takes seconds, a stall must fail the test
/// rather than hang it.
const WORKLOAD_TIMEOUT: Duration = Duration::from_secs(300);
const WRITE_BLOCKS_MAX: u64 = 256;
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A deterministic generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// One write: where, how long (4 KiB to 1 MiB, log-uniform so that small
/// writes dominate as they do on a real disk), and a tag its bytes carry.
#[derive(Clone, Copy)]
struct Write {
    offset_bytes: u64,
    blocks: u64,
    tag: u64,
}

fn plan(seed: u64, count: u64) -> Vec<Write> {
    let mut rng = Rng(seed | 1);
    (0..count)
        .map(|tag| {
            let exponent = rng.below(9) as u32; // 2^0 .. 2^8 blocks
            let blocks = (1u64 << exponent).min(WRITE_BLOCKS_MAX);
            let blocks = blocks - rng.below(blocks.div_ceil(2)).min(blocks - 1);
            let start = rng.below(VOLUME_BYTES / BLOCK_BYTES - blocks + 1);
            Write {
                offset_bytes: start * BLOCK_BYTES,
                blocks,
                tag,
            }
        })
        .collect()
}

/// The bytes of block `index` of write `tag`: every 8 bytes say which write
/// and which block, so a misplaced or lost block is recognised.
fn fill(tag: u64, blocks: u64) -> SharedBuf {
    let mut buf = AlignedBuf::zeroed((blocks * BLOCK_BYTES) as usize);
    for (block, chunk) in buf
        .as_mut_slice()
        .chunks_mut(BLOCK_BYTES as usize)
        .enumerate()
    {
        let word = (tag << 20 | block as u64).to_le_bytes();
        for slot in chunk.chunks_mut(8) {
            slot.copy_from_slice(&word);
        }
    }
    SharedBuf::new(buf)
}

fn replication() -> ReplicationConfig {
    ReplicationConfig {
        // Small enough that the window, not only the queue depth, is exercised.
        window_updates_max: 256,
        member_timeout_ms: 60_000,
        reconnect_interval_ms: 50,
        startup_timeout_ms: 15_000,
        ..ReplicationConfig::default()
    }
}

fn cluster(dir: &Path, secondaries: usize) -> LocalCluster {
    cluster_with(dir, None, secondaries, LOG_BYTES, &replication())
}

/// A cluster with its secondaries started; their files under
/// `secondary_dir` if given, else under `dir` with the primary's.
fn cluster_with(
    dir: &Path,
    secondary_dir: Option<&Path>,
    secondaries: usize,
    log_bytes: u64,
    replication: &ReplicationConfig,
) -> LocalCluster {
    let mut cluster = LocalCluster::create_split(
        dir,
        secondary_dir,
        Path::new(env!("CARGO_BIN_EXE_replblkd")),
        secondaries,
        VOLUME_BYTES,
        log_bytes,
        replication,
    )
    .expect("cluster created");
    cluster.start_secondaries().expect("secondaries started");
    cluster
}

/// Keeps `QUEUE_DEPTH` of `writes` in flight through `writer`, with a flush
/// every `FLUSH_EVERY_WRITES` and one at the end. `midway` runs once, after
/// a third of the writes were submitted (to kill a secondary, say). Spawns
/// nothing, so any runtime may poll it: a tokio one beside the volume, or
/// the engine's own (a hosted workload).
async fn drive<W: Replicate + Clone>(writer: W, writes: Vec<Write>, midway: impl FnOnce()) {
    let mut in_flight = FuturesUnordered::new();
    let mut midway = Some(midway);
    let count = writes.len();
    for (index, write) in writes.into_iter().enumerate() {
        while in_flight.len() >= QUEUE_DEPTH {
            in_flight.next().await;
        }
        if index == count / 3 {
            (midway.take().unwrap())();
        }
        let volume = writer.clone();
        let request: Pin<Box<dyn Future<Output = ()>>> = Box::pin(async move {
            let data = fill(write.tag, write.blocks);
            let fua = write.tag % 97 == 0;
            volume
                .write(write.offset_bytes, data, fua)
                .await
                .expect("write completes");
        });
        in_flight.push(request);
        if (index as u64 + 1).is_multiple_of(FLUSH_EVERY_WRITES) {
            let flusher = writer.clone();
            in_flight.push(Box::pin(async move {
                flusher.flush().await.expect("flush completes")
            }));
        }
    }
    while in_flight.next().await.is_some() {}
    writer.flush().await.expect("final flush completes");
}

/// Runs the workload at queue depth 32 from this thread, through the
/// volume's channel.
fn run_workload(volume: Arc<Volume>, writes: &[Write], midway: impl FnOnce()) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let workload = drive(volume, writes.to_vec(), midway);
    runtime.block_on(async {
        tokio::time::timeout(WORKLOAD_TIMEOUT, workload)
            .await
            .unwrap_or_else(|_| panic!("the workload did not finish within {WORKLOAD_TIMEOUT:?}"))
    });
}

/// The same workload, run on the engine's own thread through `LocalVolume`
/// (as the block device's first queue runs): the channel is bypassed, the
/// guarantees must not be.
fn run_hosted_workload(volume: &Volume, writes: &[Write]) {
    let writes = writes.to_vec();
    let (done, finished) = std::sync::mpsc::channel();
    volume
        .host(Box::new(move |local| {
            Box::pin(async move {
                drive(local, writes, || {}).await;
                let _ = done.send(());
            })
        }))
        .expect("the engine takes the job");
    finished
        .recv_timeout(WORKLOAD_TIMEOUT)
        .unwrap_or_else(|error| panic!("the hosted workload did not finish: {error}"));
}

/// Reads through the volume API must return what the copy holds.
fn check_reads(volume: &Volume, cluster: &LocalCluster, writes: &[Write]) {
    let primary = &cluster.config().node(PRIMARY_NODE_ID).unwrap().data_path;
    let bytes = std::fs::read(primary).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for write in writes.iter().step_by(97) {
        let length = write.blocks * BLOCK_BYTES;
        let read = runtime
            .block_on(volume.read(write.offset_bytes, length as u32))
            .expect("read succeeds");
        let start = write.offset_bytes as usize;
        assert!(
            read.as_slice() == &bytes[start..start + length as usize],
            "read at {start} differs from the copy"
        );
    }
}

/// Blocks written by exactly one write must hold that write's bytes; blocks
/// written by several hold one of theirs (the copies' agreement is checked
/// separately).
fn check_contents(cluster: &LocalCluster, writes: &[Write]) {
    let mut writers: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
    for write in writes {
        for block in 0..write.blocks {
            writers
                .entry(write.offset_bytes / BLOCK_BYTES + block)
                .or_default()
                .push((write.tag, block));
        }
    }
    let primary = &cluster.config().node(PRIMARY_NODE_ID).unwrap().data_path;
    let bytes = std::fs::read(primary).unwrap();
    for (block, candidates) in writers {
        let start = (block * BLOCK_BYTES) as usize;
        let word = u64::from_le_bytes(bytes[start..start + 8].try_into().unwrap());
        let found = (word >> 20, word & 0xF_FFFF);
        assert!(
            candidates.contains(&found),
            "block {block} holds tag {} block {} but was written only by {candidates:?}",
            found.0,
            found.1
        );
        let whole = bytes[start..start + BLOCK_BYTES as usize]
            .chunks(8)
            .all(|w| w == word.to_le_bytes());
        assert!(whole, "block {block} is torn: it mixes two writes");
    }
}

/// The engine's view: seqs, what is in flight, which members are connected.
fn status_of(volume: &Volume) -> VolumeStatus {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(volume.status())
        .unwrap()
}

/// Stops the primary and every secondary, then checks what a user relies
/// on: identical copies, the written bytes, and logs cleared to their end
/// (read back from the log files themselves).
fn finish(mut cluster: LocalCluster, volume: Arc<Volume>, writes: &[Write]) {
    check_reads(&volume, &cluster, writes);
    let status = status_of(&volume);
    assert!(
        status.in_flight == 0,
        "nothing in flight after the final flush: {status:?}"
    );
    cluster
        .wait_logs_cleared(status.next_seq, SETTLE_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    Arc::into_inner(volume)
        .expect("no other handle")
        .stop()
        .expect("primary stops cleanly");
    for id in cluster.secondary_ids() {
        let exit = cluster
            .stop_secondary(id)
            .expect("secondary stops on SIGTERM");
        assert!(
            exit.success(),
            "secondary {id} exited with {exit}: {}",
            cluster.output(id)
        );
        let config = cluster.config();
        let node = config.node(id).unwrap();
        let log = replblk::wal::LogFile::open(&node.log_path, *config.volume.uuid.as_bytes(), id)
            .unwrap();
        let header = log.header();
        assert_eq!(
            header.start_seq, status.next_seq,
            "secondary {id}'s persisted start-of-log pointer reached the end"
        );
    }
    cluster
        .compare_copies()
        .unwrap_or_else(|error| panic!("{error}"));
    check_contents(&cluster, writes);
}

fn replicate(secondaries: usize, seed: u64) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cluster = cluster(dir.path(), secondaries);
    replicate_on(cluster, seed, WRITES);
}

fn replicate_on(cluster: LocalCluster, seed: u64, count: u64) {
    let volume =
        Arc::new(Volume::start(cluster.config(), PRIMARY_NODE_ID).expect("primary starts"));
    let writes = plan(seed, count);
    run_workload(volume.clone(), &writes, || {});
    finish(cluster, volume, &writes);
}

#[test]
fn writes_on_the_engine_thread_end_identical_with_logs_cleared() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cluster = cluster(dir.path(), 2);
    let volume =
        Arc::new(Volume::start(cluster.config(), PRIMARY_NODE_ID).expect("primary starts"));
    let writes = plan(0x5EED_0010, WRITES);
    run_hosted_workload(&volume, &writes);
    finish(cluster, volume, &writes);
}

#[test]
fn one_secondary_ends_identical_with_its_log_cleared() {
    replicate(1, 0x5EED_0001);
}

#[test]
fn two_secondaries_end_identical_with_their_logs_cleared() {
    replicate(2, 0x5EED_0002);
}

#[test]
fn three_secondaries_end_identical_with_their_logs_cleared() {
    replicate(3, 0x5EED_0003);
}

#[test]
fn a_secondary_killed_mid_run_and_restarted_ends_identical() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cluster = Mutex::new(cluster(dir.path(), 2));
    let volume = Arc::new(
        Volume::start(cluster.lock().unwrap().config(), PRIMARY_NODE_ID).expect("primary starts"),
    );
    let writes = plan(0x5EED_0004, WRITES);
    let victim = cluster.lock().unwrap().secondary_ids()[1];
    run_workload_killing(&volume, &writes, &cluster, victim);
    finish(cluster.into_inner().unwrap(), volume, &writes);
}

/// Runs `writes` through `volume` with secondary `victim` killed (kill -9)
/// a third of the way in, with writes in flight, and restarted after a
/// pause; writes stall meanwhile (the victim stays in their sets) and
/// resume once it is back. Checks that the restarted secondary ran its
/// recovery scan.
fn run_workload_killing(
    volume: &Arc<Volume>,
    writes: &[Write],
    cluster: &Mutex<LocalCluster>,
    victim: u32,
) {
    std::thread::scope(|scope| {
        let mut restarter = None;
        run_workload(volume.clone(), writes, || {
            cluster.lock().unwrap().kill_secondary(victim);
            restarter = Some(scope.spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                cluster.lock().unwrap().start_secondary(victim)
            }));
        });
        restarter
            .expect("the kill ran")
            .join()
            .unwrap()
            .expect("the killed secondary restarts");
    });
    let output = cluster.lock().unwrap().output(victim);
    assert!(
        output.contains("log recovered"),
        "the restarted secondary ran its recovery scan: {output}"
    );
}

/// Secondaries whose files are on tmpfs write their log records on their
/// own thread, not through io_uring (`LogFile::is_in_memory`): the same
/// guarantees through that path, with a log small enough to wrap again and
/// again and a secondary killed mid-run, whose recovery scan then reads
/// records written that way.
#[test]
fn secondaries_with_their_logs_on_tmpfs_write_them_themselves_and_lose_nothing() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").expect("a directory on /dev/shm, a tmpfs");
    let cluster = Mutex::new(cluster_with(
        dir.path(),
        Some(shm.path()),
        2,
        replblk::wal::LOG_SIZE_MIN_BYTES,
        &replication(),
    ));
    let volume = Arc::new(
        Volume::start(cluster.lock().unwrap().config(), PRIMARY_NODE_ID).expect("primary starts"),
    );
    let writes = plan(0x5EED_0007, WRITES / 5);
    let victim = cluster.lock().unwrap().secondary_ids()[0];
    run_workload_killing(&volume, &writes, &cluster, victim);
    let cluster = cluster.into_inner().unwrap();
    for id in cluster.secondary_ids() {
        // The whole output: the line comes at start-up, and `output` keeps
        // only the tail.
        let output = std::fs::read_to_string(cluster.output_path(id)).unwrap_or_default();
        assert!(
            output.contains("the log is on tmpfs"),
            "secondary {id} writes its log records itself: {}",
            cluster.output(id)
        );
    }
    finish(cluster, volume, &writes);
}

#[test]
fn a_stuck_secondary_delays_writes_by_at_most_the_two_timeouts_then_is_dropped() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let replication = ReplicationConfig {
        ack_timeout_ms: 300,
        member_timeout_ms: 700,
        ..replication()
    };
    let cluster = cluster_with(dir.path(), None, 2, LOG_BYTES, &replication);
    let volume =
        Arc::new(Volume::start(cluster.config(), PRIMARY_NODE_ID).expect("primary starts"));
    let writes = plan(0x5EED_0007, WRITES / 5);
    let [healthy, victim] = cluster.secondary_ids()[..] else {
        panic!("two secondaries")
    };
    // SIGSTOP: its socket stays open and accepts what fits, but nothing is
    // logged or acked; to the primary it looks like a wedged machine.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let cluster = &cluster;
        let (volume, writes) = (volume.clone(), &writes);
        scope.spawn(move || {
            run_workload(volume, writes, || cluster.pause_secondary(victim));
            let _ = done.send(());
        });
        // Bounded: were writes to wait for the stuck peer for ever, this
        // fails instead of hanging (kill the paused peer so the scope ends).
        if finished.recv_timeout(STUCK_WORKLOAD_TIMEOUT).is_err() {
            cluster.resume_secondary(victim);
            panic!("writes still waited for the stuck secondary after {STUCK_WORKLOAD_TIMEOUT:?}");
        }
    });
    let status = status_of(&volume);
    assert!(
        status
            .members
            .iter()
            .any(|member| member.node_id == victim && !member.connected)
            && status
                .members
                .iter()
                .any(|member| member.node_id == healthy && member.connected),
        "the stuck secondary is out, the healthy one in: {status:?}"
    );
    check_reads(&volume, &cluster, &writes);
    let config = cluster.config();
    let size = config.volume.size_bytes;
    let primary_copy = &config.node(PRIMARY_NODE_ID).unwrap().data_path;
    let healthy_copy = &config.node(healthy).unwrap().data_path;
    cluster
        .wait_logs_cleared_on(&[healthy], status.next_seq, SETTLE_TIMEOUT)
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(
        first_difference(primary_copy, healthy_copy, size).unwrap(),
        None,
        "the healthy secondary's copy equals the primary's"
    );
    check_contents(&cluster, &writes);
    Arc::into_inner(volume)
        .expect("no other handle")
        .stop()
        .expect("primary stops cleanly");
    let mut cluster = cluster;
    cluster.resume_secondary(victim);
    cluster.kill_secondary(victim);
    let exit = cluster.stop_secondary(healthy).expect("secondary stops");
    assert!(exit.success(), "{}", cluster.output(healthy));
}

/// What this process logs through `tracing` (every test's engine thread
/// included), from the first call on.
fn captured_log() -> Arc<Mutex<Vec<u8>>> {
    static CAPTURED: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    CAPTURED
        .get_or_init(|| {
            let captured = Arc::new(Mutex::new(Vec::new()));
            let sink = captured.clone();
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .with_writer(move || LogSink(sink.clone()))
                .init();
            captured
        })
        .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        // A test that panicked holding the lock must not silence the rest.
        let mut captured = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        captured.extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_log_smaller_than_the_writes_in_flight_holds_them_back_and_loses_nothing() {
    let log = captured_log();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // The smallest log the format allows: four largest records. At queue
    // depth 32 with writes up to 1 MiB it fills constantly, so secondaries
    // stop reading until their start-of-log pointer moves.
    let cluster = cluster_with(
        dir.path(),
        None,
        2,
        replblk::wal::LOG_SIZE_MIN_BYTES,
        &replication(),
    );
    let volume =
        Arc::new(Volume::start(cluster.config(), PRIMARY_NODE_ID).expect("primary starts"));
    let writes = plan(0x5EED_0005, WRITES / 5);
    run_workload(volume.clone(), &writes, || {});
    // The waits are counted, and a tool asking the primary over the
    // network (`replblk-ctl status`) is told them.
    let status = status_of(&volume);
    assert!(
        status
            .members
            .iter()
            .all(|member| member.connected && member.stats.log_full_waits > 0),
        "every secondary connected and held back at times: {status:?}"
    );
    let config = cluster.config();
    let primary = config.node(PRIMARY_NODE_ID).expect("primary in config");
    let report = query_node(
        primary.address,
        *config.volume.uuid.as_bytes(),
        Duration::from_secs(5),
    );
    let Ok(NodeReport::Primary {
        hello,
        volume: told,
    }) = report
    else {
        panic!("the primary answers a tool as the primary: {report:?}");
    };
    assert_eq!(hello.node_id, PRIMARY_NODE_ID);
    assert_eq!(told.next_seq, status.next_seq, "nothing was written since");
    let told_members: Vec<(u32, bool)> = told
        .members
        .iter()
        .map(|member| (member.node_id, member.connected))
        .collect();
    let members: Vec<(u32, bool)> = status
        .members
        .iter()
        .map(|member| (member.node_id, member.connected))
        .collect();
    assert_eq!(told_members, members);
    for (told, member) in told.members.iter().zip(&status.members) {
        assert!(
            told.log_full_waits >= member.stats.log_full_waits && told.log_full_waits > 0,
            "{told:?} against {member:?}"
        );
    }
    let secondary = config
        .node(cluster.secondary_ids()[0])
        .expect("secondary in config");
    let report = query_node(
        secondary.address,
        *config.volume.uuid.as_bytes(),
        Duration::from_secs(5),
    );
    assert!(
        matches!(report, Ok(NodeReport::Secondary { .. })),
        "a secondary answers as a secondary: {report:?}"
    );
    // The operator is told, once per interval after a wait began, which
    // secondary's log held writes back.
    let deadline =
        Instant::now() + Duration::from_millis(LOG_FULL_REPORT_INTERVAL_MS) + SETTLE_TIMEOUT;
    let text = || {
        let captured = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        String::from_utf8_lossy(&captured).into_owned()
    };
    let reported = |text: &str, node_id: u32| {
        text.lines().any(|line| {
            line.contains("writes waited for room in the secondary's log")
                && line.contains(&format!("secondary={node_id} "))
        })
    };
    loop {
        let text = text();
        if cluster
            .secondary_ids()
            .iter()
            .all(|&id| reported(&text, id))
        {
            break;
        }
        let start = (text.len().saturating_sub(4000)..text.len())
            .find(|&index| text.is_char_boundary(index))
            .unwrap_or(text.len());
        let tail = &text[start..];
        assert!(
            Instant::now() < deadline,
            "no log-full report for every secondary within the interval; the log ends with:\n{tail}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    finish(cluster, volume, &writes);
}

#[test]
fn sync_every_ack_replicates_identically() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let replication = ReplicationConfig {
        sync_every_ack: true,
        ..replication()
    };
    let cluster = cluster_with(dir.path(), None, 2, LOG_BYTES, &replication);
    replicate_on(cluster, 0x5EED_0006, WRITES / 5);
}
