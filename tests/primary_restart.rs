//! A primary killed with kill -9 while writes are in flight, restarted with
//! the same config, loses no acknowledged write and brings every copy up to
//! date.
//!
//! The primary runs in a process of its own: this test binary started again
//! as a writer (`restart_writer_process`), which runs the volume API and
//! journals each write it submits and each one that completes. Before each
//! kill one secondary is paused (SIGSTOP), so the primary keeps sending the
//! other secondary updates the paused one does not log; in two of the three
//! rounds the paused secondary is then killed too, losing what sat unread
//! in its socket, so the secondaries' logs end at different seqs. A new
//! writer (the next round), or at the end a primary process that only
//! starts and idles, then starts with the same config and must catch up.
//! Before each restart the test also undoes, on the primary's copy, every
//! write the logs still hold, standing for local writes the kill cut short:
//! the primary's own O_DIRECT writes are usually done before the
//! secondaries log, so a kill alone rarely leaves its copy behind the logs.
//! (`replblkd primary` would be the natural last one, but it now attaches
//! a ublk device, which this machine may not have.)
//!
//! What a user relies on is then checked on the files: the two secondaries'
//! copies are byte-identical; every block holds the newest write to it that
//! completed, or a write submitted after it that had not completed when its
//! primary was killed (one the kernel would re-issue); and the primary's
//! copy equals the secondaries' except on blocks of writes in flight at a
//! kill.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replblk::buf::{AlignedBuf, SharedBuf};
use replblk::config::{Config, ReplicationConfig};
use replblk::node::local_cluster::{LocalCluster, PRIMARY_NODE_ID};
use replblk::node::volume::Volume;
use replblk::proto::LogState;

const BLOCK_BYTES: u64 = 4096;
const VOLUME_BYTES: u64 = 16 << 20;
const VOLUME_BLOCKS: u64 = VOLUME_BYTES / BLOCK_BYTES;
const LOG_BYTES: u64 = 8 << 20;
const WRITE_BLOCKS_MAX: u64 = 32;
const QUEUE_DEPTH: usize = 32;
/// Completed writes a round waits for before the kill.
const ROUND_COMPLETED_MIN: usize = 300;
/// Writer rounds, each ended by kill -9.
const ROUNDS: u32 = 3;
/// Most rounds, if the logs end at the same seq in the first ones.
const ROUNDS_MAX: u32 = 6;
/// How long the paused secondary stays paused before the primary is killed:
/// time for the primary to send the other secondary what this one misses.
const PAUSE_BEFORE_KILL_MS: u64 = 200;
const WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// A writer left running (the test died without killing it) exits by
/// itself after this long.
const WRITER_LIFETIME_MAX: Duration = Duration::from_secs(90);
/// The environment variable that turns this binary into a writer.
const WRITER_ENV: &str = "REPLBLK_RESTART_WRITER";
/// The writer's "round" that makes it start the primary and idle.
const IDLE_MODE: &str = "idle";

/// Journal entry kinds: written before the write is submitted, and after
/// it completed.
const JOURNAL_SUBMITTED: u64 = 1;
const JOURNAL_COMPLETED: u64 = 2;
const JOURNAL_ENTRY_BYTES: usize = 32;
/// What a block of the primary's copy is set to where a logged write is
/// undone before a restart.
const UNDONE_BYTE: u8 = 0xA5;

/// One write as the journal records it. Every 16 bytes of its block `k`
/// are `id` and `k`, little-endian, so each block names its write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JournaledWrite {
    id: u64,
    start_block: u64,
    blocks: u64,
}

fn journal_entry(kind: u64, write: JournaledWrite) -> [u8; JOURNAL_ENTRY_BYTES] {
    let mut entry = [0u8; JOURNAL_ENTRY_BYTES];
    for (index, value) in [kind, write.id, write.start_block, write.blocks]
        .into_iter()
        .enumerate()
    {
        entry[index * 8..index * 8 + 8].copy_from_slice(&value.to_le_bytes());
    }
    entry
}

/// The journal of one writer: every write submitted, in submission order,
/// and the ids of those that completed. A trailing partial entry (none is
/// expected: each is one small append) is ignored.
struct Journal {
    submitted: Vec<JournaledWrite>,
    completed: HashSet<u64>,
}

fn read_journal(path: &Path) -> Journal {
    let bytes = std::fs::read(path).unwrap_or_default();
    let mut journal = Journal {
        submitted: Vec::new(),
        completed: HashSet::new(),
    };
    for entry in bytes.chunks_exact(JOURNAL_ENTRY_BYTES) {
        let word =
            |index: usize| u64::from_le_bytes(entry[index * 8..index * 8 + 8].try_into().unwrap());
        let write = JournaledWrite {
            id: word(1),
            start_block: word(2),
            blocks: word(3),
        };
        match word(0) {
            JOURNAL_SUBMITTED => journal.submitted.push(write),
            JOURNAL_COMPLETED => {
                assert!(
                    journal.submitted.contains(&write),
                    "write {} completed without being submitted",
                    write.id
                );
                journal.completed.insert(write.id);
            }
            other => panic!("{}: bad journal entry kind {other}", path.display()),
        }
    }
    journal
}

fn stamped(write: JournaledWrite) -> SharedBuf {
    let mut buf = AlignedBuf::zeroed((write.blocks * BLOCK_BYTES) as usize);
    for (block, chunk) in buf
        .as_mut_slice()
        .chunks_mut(BLOCK_BYTES as usize)
        .enumerate()
    {
        for pair in chunk.chunks_mut(16) {
            pair[..8].copy_from_slice(&write.id.to_le_bytes());
            pair[8..].copy_from_slice(&(block as u64).to_le_bytes());
        }
    }
    SharedBuf::new(buf)
}

/// What a block of a copy holds: zeros, block `k` of write `id`, or the
/// pattern of a write undone by the test and never written again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    Zero,
    Block { id: u64, index: u64 },
    Undone,
}

fn stamp_of(block: &[u8]) -> Result<Stamp, String> {
    if block.iter().all(|&b| b == 0) {
        return Ok(Stamp::Zero);
    }
    if block.iter().all(|&b| b == UNDONE_BYTE) {
        return Ok(Stamp::Undone);
    }
    let first = &block[..16];
    if !block.chunks(16).all(|pair| pair == first) {
        return Err("torn: it mixes the bytes of two writes".into());
    }
    Ok(Stamp::Block {
        id: u64::from_le_bytes(first[..8].try_into().unwrap()),
        index: u64::from_le_bytes(first[8..].try_into().unwrap()),
    })
}

/// A deterministic generator, so a round's writes can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % bound
    }
}

/// The writer: runs node 1 as the primary through the volume API, at queue
/// depth 32, never with two overlapping writes in flight (so each block's
/// writes are ordered), journaling each write before submitting it and
/// after it completed, until it is killed. Started by the test below with
/// `WRITER_ENV` set to `config|journal|round`; without it, does nothing.
/// With `config|STOP_FILE|idle`, it only starts the primary (catching up)
/// and stops it cleanly once STOP_FILE exists.
#[test]
#[ignore = "the primary process of a_primary_killed_mid_write_restarts_and_loses_no_acknowledged_write, started by it"]
fn restart_writer_process() {
    let Ok(spec) = std::env::var(WRITER_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let [config, journal, round] = parts[..] else {
        panic!("{WRITER_ENV}={spec}: expected config|journal|round");
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let config = Config::load(Path::new(config)).expect("config loads");
    let volume = match Volume::start(&config, PRIMARY_NODE_ID) {
        Ok(volume) => Arc::new(volume),
        Err(error) => {
            eprintln!("writer: the primary did not start: {error}");
            std::process::exit(3);
        }
    };
    if round == IDLE_MODE {
        let stop_file = Path::new(journal);
        let started = Instant::now();
        while !stop_file.exists() && started.elapsed() < WRITER_LIFETIME_MAX {
            std::thread::sleep(Duration::from_millis(20));
        }
        let volume = Arc::into_inner(volume).expect("the only handle");
        match volume.stop() {
            Ok(()) => std::process::exit(0),
            Err(error) => {
                eprintln!("writer: the primary did not stop cleanly: {error}");
                std::process::exit(5);
            }
        }
    }
    let round: u64 = round.parse().expect("round number");
    let mut journal = OpenOptions::new()
        .create(true)
        .append(true)
        .open(journal)
        .expect("journal opens");
    // Each entry is one write(2) to the page cache, which outlives a
    // kill -9 of this process: no fsync needed (the machine does not crash).
    let mut record = move |kind: u64, write: JournaledWrite| {
        journal
            .write_all(&journal_entry(kind, write))
            .expect("journal append");
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    runtime.block_on(async move {
        let mut rng = Rng((round + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut busy = vec![false; VOLUME_BLOCKS as usize];
        let mut in_flight = tokio::task::JoinSet::new();
        let mut next_index = 0u64;
        while started.elapsed() < WRITER_LIFETIME_MAX {
            // Journal every completion before its blocks are free again, so
            // a later overlapping write is always submitted after it.
            let mut finished = Vec::new();
            while let Some(done) = in_flight.try_join_next() {
                finished.push(done.expect("write task"));
            }
            if finished.is_empty() && in_flight.len() >= QUEUE_DEPTH {
                finished.push(in_flight.join_next().await.unwrap().expect("write task"));
            }
            for write in finished {
                record(JOURNAL_COMPLETED, write);
                for block in write.start_block..write.start_block + write.blocks {
                    busy[block as usize] = false;
                }
            }
            if in_flight.len() >= QUEUE_DEPTH {
                continue;
            }
            let blocks = 1 + rng.below(WRITE_BLOCKS_MAX);
            let start_block = rng.below(VOLUME_BLOCKS - blocks + 1);
            let range = start_block as usize..(start_block + blocks) as usize;
            if busy[range.clone()].iter().any(|&b| b) {
                if in_flight.is_empty() {
                    unreachable!("nothing in flight, yet blocks busy");
                }
                // Wait for a completion rather than spin.
                let write = in_flight.join_next().await.unwrap().expect("write task");
                record(JOURNAL_COMPLETED, write);
                for block in write.start_block..write.start_block + write.blocks {
                    busy[block as usize] = false;
                }
                continue;
            }
            busy[range].fill(true);
            let write = JournaledWrite {
                id: round << 32 | next_index,
                start_block,
                blocks,
            };
            next_index += 1;
            record(JOURNAL_SUBMITTED, write);
            let volume = volume.clone();
            in_flight.spawn(async move {
                let fua = write.id.is_multiple_of(17);
                volume
                    .write(write.start_block * BLOCK_BYTES, stamped(write), fua)
                    .await
                    .expect("write completes");
                write
            });
        }
    });
    eprintln!("writer: ran {WRITER_LIFETIME_MAX:?} without being killed");
    std::process::exit(4);
}

/// A child process killed with SIGKILL, by pid, when dropped.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

fn output_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(6000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_owned()
}

fn spawn_logged(command: &mut Command, output: &Path) -> KillOnDrop {
    let file = std::fs::File::create(output).unwrap();
    let child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("child starts");
    KillOnDrop(Some(child))
}

/// Starts this binary as the writer of `round` (a number, or
/// [`IDLE_MODE`] with `journal` naming the stop file).
fn start_writer(cluster: &LocalCluster, journal: &Path, round: &str, output: &Path) -> KillOnDrop {
    let spec = format!(
        "{}|{}|{round}",
        cluster.config_path().display(),
        journal.display()
    );
    spawn_logged(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "restart_writer_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, spec),
        output,
    )
}

/// Where each secondary's log stands, once it stops moving (a resumed
/// secondary may still be logging what sat in its socket).
fn settled_log_states(cluster: &LocalCluster) -> Vec<(u32, LogState)> {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    let query = || -> Vec<(u32, LogState)> {
        cluster
            .secondary_ids()
            .into_iter()
            .map(|id| (id, cluster.log_state(id).expect("secondary answers")))
            .collect()
    };
    let mut last = query();
    loop {
        std::thread::sleep(Duration::from_millis(150));
        let now = query();
        if now == last {
            return now;
        }
        assert!(Instant::now() < deadline, "logs did not settle: {now:?}");
        last = now;
    }
}

#[test]
fn a_primary_killed_mid_write_restarts_and_loses_no_acknowledged_write() {
    let begun = Instant::now();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let replication = ReplicationConfig {
        member_timeout_ms: 60_000,
        reconnect_interval_ms: 50,
        startup_timeout_ms: 15_000,
        ..ReplicationConfig::default()
    };
    let mut cluster = LocalCluster::create(
        dir.path(),
        Path::new(env!("CARGO_BIN_EXE_replblkd")),
        2,
        VOLUME_BYTES,
        LOG_BYTES,
        &replication,
    )
    .expect("cluster created");
    cluster.start_secondaries().expect("secondaries started");
    let secondaries = cluster.secondary_ids();
    let journal_path = |round: u32| dir.path().join(format!("journal{round}"));
    let writer_output = |round: u32| dir.path().join(format!("writer{round}.out"));
    let mut rounds_with_divergent_logs = Vec::new();
    let mut logs_before_restart = Vec::new();
    let mut undone_blocks = 0;

    let mut rounds = 0;
    // Rounds where the logs did not diverge do not count towards the
    // minimum; a few more are run instead.
    while rounds < ROUNDS || (rounds_with_divergent_logs.is_empty() && rounds < ROUNDS_MAX) {
        rounds += 1;
        let round = rounds;
        let journal = journal_path(round);
        let mut writer = start_writer(
            &cluster,
            &journal,
            &round.to_string(),
            &writer_output(round),
        );
        // Let it restart (catching up after the previous round's kill) and
        // complete a good number of writes.
        let deadline = Instant::now() + WAIT_TIMEOUT;
        while read_journal(&journal).completed.len() < ROUND_COMPLETED_MIN {
            if let Some(status) = writer.exited() {
                panic!(
                    "round {round}: the writer exited ({status}): {}",
                    output_of(&writer_output(round))
                );
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: fewer than {ROUND_COMPLETED_MIN} writes completed within {WAIT_TIMEOUT:?}: {}",
                output_of(&writer_output(round))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Pause one secondary, so that the primary goes on sending the other
        // what this one does not log; then kill -9 the primary mid-write.
        let victim = secondaries[(round as usize + 1) % secondaries.len()];
        cluster.pause_secondary(victim);
        std::thread::sleep(Duration::from_millis(PAUSE_BEFORE_KILL_MS));
        writer.kill();
        if round == 1 {
            // It logs what sat in its socket, as a stalled node would.
            cluster.resume_secondary(victim);
        } else {
            // It dies too, and what sat in its socket with it.
            cluster.kill_secondary(victim);
            cluster.start_secondary(victim).expect("secondary restarts");
        }
        let states = settled_log_states(&cluster);
        undone_blocks += undo_logged_writes_on_primary(&cluster);
        if states
            .iter()
            .any(|(_, s)| s.next_seq != states[0].1.next_seq)
        {
            rounds_with_divergent_logs.push(round);
        }
        logs_before_restart.push(states);
    }
    assert!(undone_blocks > 0, "the logs held no record at any restart");
    assert!(
        !rounds_with_divergent_logs.is_empty(),
        "the secondaries' logs ended at the same seq in every round, so no round tested catching up: {logs_before_restart:?}"
    );

    // The primary once more, with the same config: it catches up, then
    // idles until the logs are cleared, and stops cleanly.
    let final_logs = logs_before_restart.last().unwrap();
    let high = final_logs.iter().map(|(_, s)| s.next_seq).max().unwrap();
    let primary_output = dir.path().join("primary.out");
    let stop_file = dir.path().join("stop");
    let mut primary = start_writer(&cluster, &stop_file, IDLE_MODE, &primary_output);
    if let Err(error) = cluster.wait_logs_cleared(high, WAIT_TIMEOUT) {
        panic!("{error}; primary: {}", output_of(&primary_output));
    }
    std::fs::write(&stop_file, b"").unwrap();
    let deadline = Instant::now() + WAIT_TIMEOUT;
    let status = loop {
        if let Some(status) = primary.exited() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the primary did not stop within {WAIT_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let primary_text = output_of(&primary_output);
    assert!(
        status.success(),
        "the primary exited with {status}: {primary_text}"
    );
    for id in &secondaries {
        let exit = cluster.stop_secondary(*id).expect("secondary stops");
        assert!(exit.success(), "secondary {id}: {}", cluster.output(*id));
    }

    // Catching up was logged wherever there was something to catch up.
    let catch_ups: Vec<(String, String)> = (2..=rounds)
        .map(|round| {
            (
                format!("writer of round {round}"),
                output_of(&writer_output(round)),
            )
        })
        .chain([("the last primary".to_owned(), primary_text)])
        .collect();
    for ((who, text), logs) in catch_ups.iter().zip(&logs_before_restart) {
        if logs.iter().any(|(_, s)| s.start_seq < s.next_seq) {
            assert!(
                text.contains("caught up"),
                "{who} restarted on non-empty logs {logs:?} without catching up: {text}"
            );
        }
    }

    check_copies(
        &cluster,
        &(1..=rounds).map(journal_path).collect::<Vec<_>>(),
        rounds,
    );
    eprintln!(
        "divergent logs before the restarts of rounds {rounds_with_divergent_logs:?}: {logs_before_restart:?}; took {:?}",
        begun.elapsed()
    );
}

/// Stands for local writes the kill cut short: on the primary's copy,
/// overwrites the blocks of every record the secondaries' logs hold with a
/// pattern no write has (so a block left so reads as a lost write). The
/// restarted primary must write every one of them again. Returns how many
/// blocks it overwrote.
fn undo_logged_writes_on_primary(cluster: &LocalCluster) -> usize {
    let config = cluster.config();
    let header_bytes = replblk::wal::LOG_HEADER_SIZE_BYTES as usize;
    let mut blocks = std::collections::BTreeSet::new();
    for id in cluster.secondary_ids() {
        // The secondary is idle (no primary) and holds its log open; a
        // plain read sees what it wrote.
        let mut bytes = std::fs::read(&config.node(id).unwrap().log_path).unwrap();
        let header = replblk::wal::decode_header_page(&bytes[..header_bytes])
            .unwrap()
            .header;
        replblk::wal::scan(&header, &mut bytes[header_bytes..], |record, _| {
            let first = record.offset_bytes / BLOCK_BYTES;
            blocks.extend(first..first + u64::from(record.length_bytes) / BLOCK_BYTES);
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap();
    }
    let primary = &config.node(PRIMARY_NODE_ID).unwrap().data_path;
    let file = OpenOptions::new().write(true).open(primary).unwrap();
    let pattern = vec![UNDONE_BYTE; BLOCK_BYTES as usize];
    for &block in &blocks {
        std::os::unix::fs::FileExt::write_all_at(&file, &pattern, block * BLOCK_BYTES).unwrap();
    }
    file.sync_all().unwrap();
    blocks.len()
}

/// The three checks on the copies; see the module comment.
fn check_copies(cluster: &LocalCluster, journals: &[PathBuf], rounds: u32) {
    let config = cluster.config();
    let read = |id: u32| std::fs::read(&config.node(id).unwrap().data_path).unwrap();
    let secondaries = cluster.secondary_ids();
    let primary = read(PRIMARY_NODE_ID);
    let first = read(secondaries[0]);
    let second = read(secondaries[1]);
    let volume = VOLUME_BYTES as usize;
    if let Some(at) = (0..volume).find(|&i| first[i] != second[i]) {
        panic!(
            "secondaries {} and {} differ at byte {at} (block {})",
            secondaries[0],
            secondaries[1],
            at as u64 / BLOCK_BYTES
        );
    }

    // Per block, its writes in order (overlapping writes were never in
    // flight together, and rounds follow each other), each with whether
    // it completed.
    let mut writers: HashMap<u64, Vec<(u64, u64, bool)>> = HashMap::new();
    let mut completed_total = 0;
    let mut in_flight_total = 0;
    for path in journals {
        let journal = read_journal(path);
        for write in &journal.submitted {
            let completed = journal.completed.contains(&write.id);
            if completed {
                completed_total += 1;
            } else {
                in_flight_total += 1;
            }
            for index in 0..write.blocks {
                writers
                    .entry(write.start_block + index)
                    .or_default()
                    .push((write.id, index, completed));
            }
        }
    }
    assert!(completed_total >= rounds as usize * ROUND_COMPLETED_MIN);
    let block_of = |copy: &[u8], block: u64| {
        let start = (block * BLOCK_BYTES) as usize;
        copy[start..start + BLOCK_BYTES as usize].to_vec()
    };
    let mut exempt_blocks = 0;
    for block in 0..VOLUME_BLOCKS {
        let history = writers.get(&block).cloned().unwrap_or_default();
        let newest_completed = history.iter().rposition(|&(_, _, completed)| completed);
        let mut allowed: Vec<Stamp> = Vec::new();
        match newest_completed {
            Some(at) => {
                let (id, index, _) = history[at];
                allowed.push(Stamp::Block { id, index });
            }
            None => allowed.push(Stamp::Zero),
        }
        let after = newest_completed.map_or(0, |at| at + 1);
        // Writes after it were in flight at a kill: the kernel re-issues
        // them, so either content is fine.
        allowed.extend(
            history[after..]
                .iter()
                .map(|&(id, index, _)| Stamp::Block { id, index }),
        );
        let touched_by_in_flight = history.iter().any(|&(_, _, completed)| !completed);
        for (name, copy) in [("primary", &primary), ("secondary", &first)] {
            let found = stamp_of(&block_of(copy, block))
                .unwrap_or_else(|error| panic!("{name} block {block}: {error}"));
            assert!(
                allowed.contains(&found),
                "{name}'s copy lost an acknowledged write: block {block} holds {found:?}, but the newest completed write there is {:?} (allowed: {allowed:?})",
                newest_completed.map(|at| history[at])
            );
        }
        if block_of(&primary, block) != block_of(&first, block) {
            assert!(
                touched_by_in_flight,
                "block {block} differs between the primary's copy and the secondaries', and no write in flight at a kill touched it"
            );
            // Then the primary holds a newer write, in flight at a kill and
            // never logged (the kernel re-issues it), not an older one: a
            // write the secondaries hold was in a log, and the restarted
            // primary wrote it again to its own copy.
            let position = |stamp: Stamp| match stamp {
                Stamp::Zero | Stamp::Undone => None,
                Stamp::Block { id, index } => history
                    .iter()
                    .position(|&(other, other_index, _)| (other, other_index) == (id, index)),
            };
            let ours = stamp_of(&block_of(&primary, block)).unwrap();
            let theirs = stamp_of(&block_of(&first, block)).unwrap();
            let newer_in_flight = position(ours) > position(theirs)
                && position(ours).is_some_and(|at| !history[at].2);
            assert!(
                newer_in_flight,
                "block {block}: the primary's copy holds {ours:?} but the secondaries' hold the newer {theirs:?}: a record in the logs was not written again to the primary's copy"
            );
            exempt_blocks += 1;
        }
    }
    eprintln!(
        "{completed_total} writes completed, {in_flight_total} in flight at a kill; {exempt_blocks} blocks of the primary's copy differ (all touched by writes in flight)"
    );
}
