//! `replblk-ctl`: manages a replblk volume's nodes.
//!
//! ```text
//! replblk-ctl init   --config volume.toml --node 2   # create node 2's data and log files
//! replblk-ctl status --config volume.toml            # where every secondary's log stands
//! replblk-ctl check  --config volume.toml            # validate the config
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use replblk::config::Config;
use replblk::net::query_log_state;
use replblk::store::{DataFile, DataSuperblock};
use replblk::wal::LogFile;

/// Epoch of a newly created volume.
const FIRST_EPOCH: u64 = 1;

#[derive(Parser)]
#[command(version, about = "Manages a replblk volume")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a node's data file (with its superblock) and its log.
    Init {
        /// The volume's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// The node whose files to create.
        #[arg(long)]
        node: u32,
        /// Overwrite files that already hold a replblk superblock or log.
        #[arg(long)]
        force: bool,
    },
    /// Ask every node (or one) where its log stands.
    Status {
        /// The volume's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Only this node.
        #[arg(long)]
        node: Option<u32>,
        /// Per-node timeout.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Validate the config and print it with defaults filled in.
    Check {
        /// The volume's TOML config.
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(error) = run(Cli::parse()) {
        eprintln!("replblk-ctl: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            config,
            node,
            force,
        } => init(&Config::load(&config)?, node, force),
        Command::Status {
            config,
            node,
            timeout_ms,
        } => status(
            &Config::load(&config)?,
            node,
            Duration::from_millis(timeout_ms),
        ),
        Command::Check { config } => {
            let config = Config::load(&config)?;
            println!(
                "volume {} size_bytes {} block_size_bytes {}",
                config.volume.uuid, config.volume.size_bytes, config.volume.block_size_bytes
            );
            println!("{:#?}", config.replication);
            for node in &config.nodes {
                println!(
                    "node {} address {} data_path {} log_path {} log_size_bytes {}",
                    node.id,
                    node.address,
                    node.data_path.display(),
                    node.log_path.display(),
                    node.log_size_bytes
                );
            }
            Ok(())
        }
    }
}

fn init(config: &Config, node_id: u32, force: bool) -> anyhow::Result<()> {
    let node = config
        .node(node_id)
        .with_context(|| format!("node {node_id} is not in the config"))?;
    let uuid = *config.volume.uuid.as_bytes();
    if !force {
        for path in [&node.data_path, &node.log_path] {
            let is_regular_nonempty =
                std::fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.len() > 0);
            if is_regular_nonempty {
                bail!("{} exists; pass --force to overwrite it", path.display());
            }
        }
    }
    let superblock = DataSuperblock {
        volume_uuid: uuid,
        node_id,
        block_size_bytes: config.volume.block_size_bytes,
        volume_size_bytes: config.volume.size_bytes,
        epoch: FIRST_EPOCH,
    };
    DataFile::create(&node.data_path, &superblock)?;
    LogFile::create(
        &node.log_path,
        uuid,
        node_id,
        node.log_size_bytes,
        FIRST_EPOCH,
    )?;
    println!(
        "node {node_id}: data {} ({} bytes + superblock), log {} ({} bytes)",
        node.data_path.display(),
        config.volume.size_bytes,
        node.log_path.display(),
        node.log_size_bytes
    );
    Ok(())
}

fn status(config: &Config, only: Option<u32>, timeout: Duration) -> anyhow::Result<()> {
    let uuid = *config.volume.uuid.as_bytes();
    let mut unreachable = 0;
    for node in config
        .nodes
        .iter()
        .filter(|node| only.is_none_or(|id| id == node.id))
    {
        match query_log_state(node.address, uuid, timeout) {
            Ok((_, log)) => println!(
                "node {} {} epoch {} start_seq {} next_seq {} applied_seq {} log_records {}",
                node.id,
                node.address,
                log.epoch,
                log.start_seq,
                log.next_seq,
                log.applied_seq,
                log.next_seq - log.start_seq
            ),
            Err(reason) => {
                unreachable += 1;
                println!("node {} {} unreachable: {reason}", node.id, node.address);
            }
        }
    }
    if only.is_some() && unreachable > 0 {
        bail!("node unreachable");
    }
    Ok(())
}
