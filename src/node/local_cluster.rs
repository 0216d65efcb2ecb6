//! A volume on one machine: node 1 as the primary (run in-process through
//! [`super::volume::Volume`]) and `replblkd` secondaries as child processes
//! on 127.0.0.1 ports. Used by the multi-process tests, the benchmark and
//! the demo. Every child is killed when the cluster is dropped.

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{Config, ReplicationConfig};
use crate::net::query_log_state;
use crate::proto::LogState;
use crate::store::{DataFile, DataSuperblock};
use crate::wal::LogFile;

/// The primary's node id in a local cluster.
pub const PRIMARY_NODE_ID: u32 = 1;
/// How long a secondary may take to start answering.
pub const SECONDARY_START_TIMEOUT_MS: u64 = 15_000;
/// How long a secondary may take to stop after SIGTERM before SIGKILL.
pub const SECONDARY_STOP_TIMEOUT_MS: u64 = 15_000;

/// A local volume and its secondaries' processes.
pub struct LocalCluster {
    dir: PathBuf,
    config_path: PathBuf,
    config: Config,
    replblkd: PathBuf,
    children: Vec<Option<Child>>,
}

impl LocalCluster {
    /// Writes a config for a primary and `secondaries` secondaries under
    /// `dir` (which the caller owns and removes) and creates every node's
    /// data and log files there.
    pub fn create(
        dir: &Path,
        replblkd: &Path,
        secondaries: usize,
        volume_size_bytes: u64,
        log_size_bytes: u64,
        replication: &ReplicationConfig,
    ) -> Result<LocalCluster, String> {
        LocalCluster::create_split(
            dir,
            None,
            replblkd,
            secondaries,
            volume_size_bytes,
            log_size_bytes,
            replication,
        )
    }

    /// Like [`LocalCluster::create`], but the secondaries' data and log
    /// files go under `secondary_dir` if given (another filesystem, say, to
    /// stand in for the secondaries' own disks); the primary's files, the
    /// config and every daemon's output stay under `dir`. The caller owns
    /// and removes both directories.
    pub fn create_split(
        dir: &Path,
        secondary_dir: Option<&Path>,
        replblkd: &Path,
        secondaries: usize,
        volume_size_bytes: u64,
        log_size_bytes: u64,
        replication: &ReplicationConfig,
    ) -> Result<LocalCluster, String> {
        let uuid = uuid::Uuid::new_v4();
        let mut text = format!(
            "[volume]\nuuid = \"{uuid}\"\nsize_bytes = {volume_size_bytes}\nblock_size_bytes = 4096\n\n\
             [replication]\nwindow_updates_max = {}\nwindow_bytes_max = {}\nall_acked_delay_ms = {}\n\
             member_timeout_ms = {}\nack_timeout_ms = {}\nsync_every_ack = {}\n\
             clear_interval_ms = {}\nreconnect_interval_ms = {}\nstartup_timeout_ms = {}\n",
            replication.window_updates_max,
            replication.window_bytes_max,
            replication.all_acked_delay_ms,
            replication.member_timeout_ms,
            replication.ack_timeout_ms,
            replication.sync_every_ack,
            replication.clear_interval_ms,
            replication.reconnect_interval_ms,
            replication.startup_timeout_ms,
        );
        // Each node's port is one the kernel found free; the listeners are
        // held until every node has one, or the next search could hand
        // out the port just released (it did, and the config was refused
        // for two nodes on one address). The tiny race until each daemon
        // binds its port is acceptable for local tests.
        let mut reserved = Vec::new();
        for id in 1..=(secondaries as u32 + 1) {
            let listener = TcpListener::bind("127.0.0.1:0")
                .map_err(|e| format!("finding a free port: {e}"))?;
            let port = listener
                .local_addr()
                .map_err(|e| format!("finding a free port: {e}"))?
                .port();
            reserved.push(listener);
            let files_dir = match secondary_dir {
                Some(secondary_dir) if id != PRIMARY_NODE_ID => secondary_dir,
                _ => dir,
            };
            text.push_str(&format!(
                "\n[[node]]\nid = {id}\naddress = \"127.0.0.1:{port}\"\ndata_path = \"{}\"\nlog_path = \"{}\"\nlog_size_bytes = {log_size_bytes}\n",
                files_dir.join(format!("node{id}.data")).display(),
                files_dir.join(format!("node{id}.log")).display(),
            ));
        }
        drop(reserved);
        let config_path = dir.join("volume.toml");
        std::fs::write(&config_path, &text)
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let config = Config::load(&config_path).map_err(|e| e.to_string())?;
        for node in &config.nodes {
            let superblock = DataSuperblock {
                volume_uuid: *uuid.as_bytes(),
                node_id: node.id,
                block_size_bytes: config.volume.block_size_bytes,
                volume_size_bytes,
                epoch: 1,
            };
            DataFile::create(&node.data_path, &superblock).map_err(|e| e.to_string())?;
            LogFile::create(
                &node.log_path,
                *uuid.as_bytes(),
                node.id,
                node.log_size_bytes,
                1,
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(LocalCluster {
            dir: dir.to_owned(),
            config_path,
            config,
            replblkd: replblkd.to_owned(),
            children: (0..=secondaries).map(|_| None).collect(),
        })
    }

    /// The volume's config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Node ids of the secondaries.
    pub fn secondary_ids(&self) -> Vec<u32> {
        self.config
            .secondaries_of(PRIMARY_NODE_ID)
            .iter()
            .map(|node| node.id)
            .collect()
    }

    /// Process ids of the secondaries running now.
    pub fn secondary_pids(&self) -> Vec<u32> {
        self.children.iter().flatten().map(Child::id).collect()
    }

    /// Where node `id`'s daemon writes its log output.
    pub fn output_path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("node{id}.out"))
    }

    /// Starts secondary `id` and waits until it answers.
    pub fn start_secondary(&mut self, id: u32) -> Result<(), String> {
        assert_ne!(id, PRIMARY_NODE_ID);
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.output_path(id))
            .map_err(|e| e.to_string())?;
        let child = Command::new(&self.replblkd)
            .args(["secondary", "--config"])
            .arg(&self.config_path)
            .args(["--node", &id.to_string()])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(output.try_clone().map_err(|e| e.to_string())?)
            .stderr(output)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.replblkd.display()))?;
        self.children[id as usize - 1] = Some(child);
        let deadline = Instant::now() + Duration::from_millis(SECONDARY_START_TIMEOUT_MS);
        loop {
            if self.log_state(id).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.children[id as usize - 1].as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "secondary {id} exited at start ({status}): {}",
                        self.output(id)
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "secondary {id} did not answer within {SECONDARY_START_TIMEOUT_MS} ms: {}",
                    self.output(id)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts every secondary.
    pub fn start_secondaries(&mut self) -> Result<(), String> {
        for id in self.secondary_ids() {
            self.start_secondary(id)?;
        }
        Ok(())
    }

    /// kill -9 of secondary `id`.
    pub fn kill_secondary(&mut self, id: u32) {
        if let Some(mut child) = self.children[id as usize - 1].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP to secondary `id`: it stops reading, logging and
    /// acknowledging (its sockets stay open, so the primary's updates pile
    /// up unread) until [`LocalCluster::resume_secondary`] or a kill.
    pub fn pause_secondary(&self, id: u32) {
        self.signal_secondary(id, nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT to secondary `id`, paused by [`LocalCluster::pause_secondary`].
    pub fn resume_secondary(&self, id: u32) {
        self.signal_secondary(id, nix::sys::signal::Signal::SIGCONT);
    }

    fn signal_secondary(&self, id: u32, signal: nix::sys::signal::Signal) {
        if let Some(child) = self.children[id as usize - 1].as_ref() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    /// SIGTERM to secondary `id`, waiting for a clean exit; returns its exit
    /// status, or an error if it had to be killed.
    pub fn stop_secondary(&mut self, id: u32) -> Result<std::process::ExitStatus, String> {
        let Some(mut child) = self.children[id as usize - 1].take() else {
            return Err(format!("secondary {id} is not running"));
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_millis(SECONDARY_STOP_TIMEOUT_MS);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "secondary {id} ignored SIGTERM for {SECONDARY_STOP_TIMEOUT_MS} ms"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Where secondary `id`'s log stands, asked over the network.
    pub fn log_state(&self, id: u32) -> Result<LogState, String> {
        let node = self.config.node(id).expect("node in config");
        query_log_state(
            node.address,
            *self.config.volume.uuid.as_bytes(),
            Duration::from_millis(1000),
        )
        .map(|(_, state)| state)
    }

    /// Waits until every secondary has logged and cleared everything before
    /// `next_seq`: start-of-log pointer at the end of the log.
    pub fn wait_logs_cleared(&self, next_seq: u64, timeout: Duration) -> Result<(), String> {
        self.wait_logs_cleared_on(&self.secondary_ids(), next_seq, timeout)
    }

    /// [`LocalCluster::wait_logs_cleared`] for secondaries `ids` only.
    pub fn wait_logs_cleared_on(
        &self,
        ids: &[u32],
        next_seq: u64,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let states: Vec<(u32, Result<LogState, String>)> =
                ids.iter().map(|&id| (id, self.log_state(id))).collect();
            let cleared = states.iter().all(|(_, state)| {
                state.as_ref().is_ok_and(|s| {
                    s.start_seq == next_seq
                        && s.next_seq == next_seq
                        && s.applied_seq + 1 == next_seq
                })
            });
            if cleared {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "logs not cleared up to seq {next_seq} within {timeout:?}: {states:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Compares the volume bytes of every secondary's copy with the
    /// primary's; returns the first difference.
    pub fn compare_copies(&self) -> Result<(), String> {
        let size = self.config.volume.size_bytes;
        let primary = &self
            .config
            .node(PRIMARY_NODE_ID)
            .expect("primary")
            .data_path;
        for id in self.secondary_ids() {
            let secondary = &self.config.node(id).expect("secondary").data_path;
            if let Some(offset) =
                first_difference(primary, secondary, size).map_err(|e| e.to_string())?
            {
                return Err(format!(
                    "secondary {id}'s copy differs from the primary's at byte {offset} ({} vs {})",
                    secondary.display(),
                    primary.display()
                ));
            }
        }
        Ok(())
    }

    /// The output of node `id`'s daemon so far (its last 4 KiB).
    pub fn output(&self, id: u32) -> String {
        let text = std::fs::read_to_string(self.output_path(id)).unwrap_or_default();
        let start = text.len().saturating_sub(4096);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().filter_map(Option::take) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The first byte offset below `size` where the two files differ.
pub fn first_difference(a: &Path, b: &Path, size: u64) -> std::io::Result<Option<u64>> {
    const CHUNK_BYTES: usize = 1 << 20;
    let (mut a, mut b) = (File::open(a)?, File::open(b)?);
    let (mut left, mut right) = (vec![0u8; CHUNK_BYTES], vec![0u8; CHUNK_BYTES]);
    let mut offset = 0u64;
    while offset < size {
        let length = CHUNK_BYTES.min((size - offset) as usize);
        a.read_exact(&mut left[..length])?;
        b.read_exact(&mut right[..length])?;
        if let Some(index) = left[..length]
            .iter()
            .zip(&right[..length])
            .position(|(x, y)| x != y)
        {
            return Ok(Some(offset + index as u64));
        }
        offset += length as u64;
    }
    Ok(None)
}
