//! The volume's configuration: one TOML file shared by every node.
//!
//! ```toml
//! [volume]
//! uuid = "6f1c2a4e-0d7b-4e55-9a38-2c1f5b7d9e01"
//! size_bytes = 268435456
//! block_size_bytes = 4096
//!
//! [replication]          # optional; defaults shown by `replblk-ctl config`
//! sync_every_ack = false
//!
//! [[node]]
//! id = 1
//! address = "127.0.0.1:7101"
//! data_path = "/var/lib/replblk/node1.data"
//! log_path = "/var/lib/replblk/node1.log"
//! log_size_bytes = 67108864
//! ```
//!
//! Unknown fields are refused (a misspelt option must not silently fall back
//! to a default), and every cross-field rule is checked, naming the file and
//! the field.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::core::ack_tracker::MEMBERS_MAX;
use crate::proto::UPDATE_DATA_MAX_BYTES;
use crate::wal::LOG_SIZE_MIN_BYTES;

/// Logical block sizes a volume may have.
pub const BLOCK_SIZES_BYTES: [u32; 2] = [512, 4096];
/// Most nodes in a volume: one primary and `MEMBERS_MAX` secondaries.
pub const NODES_MAX: usize = MEMBERS_MAX + 1;

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, or a field unknown, missing or of the wrong type.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A field's value breaks a rule.
    #[error("config {path}: {field}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field, as a TOML path (`node[2].log_size_bytes`).
        field: String,
        /// The rule broken.
        reason: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The volume every node replicates.
    pub volume: VolumeConfig,
    /// Tuning shared by all nodes.
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// The block device the primary exposes.
    #[serde(default)]
    pub device: DeviceConfig,
    /// The nodes; which one is primary is chosen when `replblkd` starts.
    #[serde(rename = "node")]
    pub nodes: Vec<NodeConfig>,
}

/// `[volume]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Identity of the volume; every data and log file carries it.
    pub uuid: uuid::Uuid,
    /// Size of the volume in bytes; a multiple of the block size.
    pub size_bytes: u64,
    /// Logical block size: 512 or 4096.
    pub block_size_bytes: u32,
}

/// `[replication]`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Most updates in flight on the primary; a power of two, >= 64.
    pub window_updates_max: usize,
    /// Most payload bytes in flight on the primary.
    pub window_bytes_max: u64,
    /// Longest wait before an advanced all-acked point is sent.
    pub all_acked_delay_ms: u64,
    /// How long writes wait for a disconnected secondary before it is
    /// dropped from the volume.
    pub member_timeout_ms: u64,
    /// How long a connected secondary may owe an ack (of an update, of
    /// durability, or of clearing its full log) without progress before
    /// the primary closes its connection, as for one that went away.
    pub ack_timeout_ms: u64,
    /// Secondaries fdatasync their log before every ack.
    pub sync_every_ack: bool,
    /// Secondaries clear acknowledged records at least this often.
    pub clear_interval_ms: u64,
    /// Delay between connection attempts to a secondary.
    pub reconnect_interval_ms: u64,
    /// How long the primary waits at start for every secondary to answer.
    pub startup_timeout_ms: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            window_updates_max: 1024,
            window_bytes_max: 128 << 20,
            all_acked_delay_ms: 10,
            member_timeout_ms: 30_000,
            ack_timeout_ms: 10_000,
            sync_every_ack: false,
            clear_interval_ms: 100,
            reconnect_interval_ms: 200,
            startup_timeout_ms: 30_000,
        }
    }
}

/// `[device]`: the primary's ublk device, `/dev/ublkbN`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// N of `/dev/ublkbN`; absent, the driver picks one and the primary
    /// records it under `/run/replblk` so a restart finds it again.
    pub device_id: Option<u32>,
    /// Hardware queues: the first is served on the engine's thread, each
    /// further one by a thread of its own.
    pub queues: u16,
    /// Requests in flight per queue.
    pub queue_depth: u16,
    /// Largest request the kernel sends; a multiple of 4096, at most the
    /// largest update.
    pub io_max_bytes: u32,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            device_id: None,
            queues: 1,
            queue_depth: 128,
            io_max_bytes: 512 << 10,
        }
    }
}

/// Largest queue depth of a ublk queue (the driver's limit).
pub const DEVICE_QUEUE_DEPTH_MAX: u16 = 4096;
/// Most ublk queues we accept: one thread each after the first.
pub const DEVICE_QUEUES_MAX: u16 = 64;

/// `[[node]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique, non-zero.
    pub id: u32,
    /// Where the node listens as a secondary.
    pub address: SocketAddr,
    /// The node's copy of the volume (file or block device).
    pub data_path: PathBuf,
    /// The node's write-ahead log, used while it is a secondary.
    pub log_path: PathBuf,
    /// Size of the log file; a multiple of 4096.
    pub log_size_bytes: u64,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` is used in messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.to_string().trim_end().replace('\n', " | "),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            reason,
        };
        let volume = &self.volume;
        if !BLOCK_SIZES_BYTES.contains(&volume.block_size_bytes) {
            return Err(invalid(
                "volume.block_size_bytes",
                format!(
                    "{} is not one of {:?}",
                    volume.block_size_bytes, BLOCK_SIZES_BYTES
                ),
            ));
        }
        if volume.size_bytes == 0
            || !volume
                .size_bytes
                .is_multiple_of(u64::from(volume.block_size_bytes))
        {
            return Err(invalid(
                "volume.size_bytes",
                format!(
                    "{} must be a non-zero multiple of block_size_bytes ({})",
                    volume.size_bytes, volume.block_size_bytes
                ),
            ));
        }
        if volume.uuid.is_nil() {
            return Err(invalid(
                "volume.uuid",
                "the nil uuid is not a volume identity".into(),
            ));
        }
        let replication = &self.replication;
        if !replication.window_updates_max.is_power_of_two() || replication.window_updates_max < 64
        {
            return Err(invalid(
                "replication.window_updates_max",
                format!(
                    "{} must be a power of two >= 64",
                    replication.window_updates_max
                ),
            ));
        }
        if replication.window_bytes_max < UPDATE_DATA_MAX_BYTES as u64 {
            return Err(invalid(
                "replication.window_bytes_max",
                format!(
                    "{} is smaller than the largest update ({UPDATE_DATA_MAX_BYTES} bytes)",
                    replication.window_bytes_max
                ),
            ));
        }
        for (field, value) in [
            (
                "replication.all_acked_delay_ms",
                replication.all_acked_delay_ms,
            ),
            (
                "replication.clear_interval_ms",
                replication.clear_interval_ms,
            ),
            (
                "replication.reconnect_interval_ms",
                replication.reconnect_interval_ms,
            ),
            (
                "replication.member_timeout_ms",
                replication.member_timeout_ms,
            ),
            ("replication.ack_timeout_ms", replication.ack_timeout_ms),
            (
                "replication.startup_timeout_ms",
                replication.startup_timeout_ms,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be greater than 0".into()));
            }
        }
        let device = &self.device;
        if device.queues == 0 || device.queues > DEVICE_QUEUES_MAX {
            return Err(invalid(
                "device.queues",
                format!("{} must be 1 to {DEVICE_QUEUES_MAX}", device.queues),
            ));
        }
        if device.queue_depth == 0 || device.queue_depth > DEVICE_QUEUE_DEPTH_MAX {
            return Err(invalid(
                "device.queue_depth",
                format!(
                    "{} must be 1 to {DEVICE_QUEUE_DEPTH_MAX}",
                    device.queue_depth
                ),
            ));
        }
        if device.io_max_bytes < 4096
            || !device.io_max_bytes.is_multiple_of(4096)
            || device.io_max_bytes as usize > UPDATE_DATA_MAX_BYTES
        {
            return Err(invalid(
                "device.io_max_bytes",
                format!(
                    "{} must be a multiple of 4096 from 4096 to the largest update ({UPDATE_DATA_MAX_BYTES})",
                    device.io_max_bytes
                ),
            ));
        }
        if self.nodes.is_empty() || self.nodes.len() > NODES_MAX {
            return Err(invalid(
                "node",
                format!("{} nodes; a volume has 1 to {NODES_MAX}", self.nodes.len()),
            ));
        }
        let mut ids = HashSet::new();
        let mut addresses = HashSet::new();
        let mut paths = HashSet::new();
        for (index, node) in self.nodes.iter().enumerate() {
            let field = |name: &str| format!("node[{index}].{name}");
            if node.id == 0 || !ids.insert(node.id) {
                return Err(invalid(
                    &field("id"),
                    format!("{} is zero or used by another node", node.id),
                ));
            }
            if !addresses.insert(node.address) {
                return Err(invalid(
                    &field("address"),
                    format!("{} is used by another node", node.address),
                ));
            }
            if !node.log_size_bytes.is_multiple_of(4096) || node.log_size_bytes < LOG_SIZE_MIN_BYTES
            {
                return Err(invalid(
                    &field("log_size_bytes"),
                    format!(
                        "{} must be a multiple of 4096 and at least {LOG_SIZE_MIN_BYTES}",
                        node.log_size_bytes
                    ),
                ));
            }
            for (name, file) in [("data_path", &node.data_path), ("log_path", &node.log_path)] {
                if !paths.insert(file.clone()) {
                    return Err(invalid(
                        &field(name),
                        format!("{} is used by another node or field", file.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The node with this id.
    pub fn node(&self, id: u32) -> Option<&NodeConfig> {
        self.nodes.iter().find(|node| node.id == id)
    }

    /// The nodes other than `primary_id`, in file order: the primary's
    /// secondaries, member index = position in this list.
    pub fn secondaries_of(&self, primary_id: u32) -> Vec<&NodeConfig> {
        self.nodes
            .iter()
            .filter(|node| node.id != primary_id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[volume]
uuid = "6f1c2a4e-0d7b-4e55-9a38-2c1f5b7d9e01"
size_bytes = 1048576
block_size_bytes = 4096

[[node]]
id = 1
address = "127.0.0.1:7101"
data_path = "/tmp/a.data"
log_path = "/tmp/a.log"
log_size_bytes = 16777216

[[node]]
id = 2
address = "127.0.0.1:7102"
data_path = "/tmp/b.data"
log_path = "/tmp/b.log"
log_size_bytes = 16777216
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("volume.toml"))
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.nodes.len(), 2);
        assert_eq!(config.replication, ReplicationConfig::default());
        assert_eq!(config.secondaries_of(1)[0].id, 2);
    }

    fn refusal(text: &str) -> String {
        parse(text).expect_err("config must be refused").to_string()
    }

    #[test]
    fn an_unknown_field_is_refused_by_name() {
        let message = refusal(&GOOD.replace(
            "block_size_bytes = 4096",
            "block_size_bytes = 4096\nblock_sise = 1",
        ));
        assert!(
            message.contains("volume.toml") && message.contains("block_sise"),
            "{message}"
        );
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let cases = [
            (
                GOOD.replace("block_size_bytes = 4096", "block_size_bytes = 1024"),
                "volume.block_size_bytes",
            ),
            (
                GOOD.replace("size_bytes = 1048576", "size_bytes = 1048577"),
                "volume.size_bytes",
            ),
            (GOOD.replace("id = 2", "id = 1"), "node[1].id"),
            (GOOD.replace("7102", "7101"), "node[1].address"),
            (
                GOOD.replacen("log_size_bytes = 16777216", "log_size_bytes = 4096", 1),
                "node[0].log_size_bytes",
            ),
            (
                GOOD.replace("/tmp/b.log", "/tmp/a.data"),
                "node[1].log_path",
            ),
            (
                format!("{GOOD}\n[replication]\nwindow_updates_max = 100\n"),
                "replication.window_updates_max",
            ),
        ];
        for (text, field) in cases {
            let message = refusal(&text);
            assert!(message.contains(field), "expected {field} in: {message}");
        }
    }
}
