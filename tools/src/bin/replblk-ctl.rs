//! `replblk-ctl`: manages a replblk volume's nodes.
//!
//! ```text
//! replblk-ctl init   --config volume.toml --node 2   # create node 2's data and log files
//! replblk-ctl status --config volume.toml            # where every secondary's log stands
//! replblk-ctl check  --config volume.toml            # validate the config
//! replblk-ctl write  --config volume.toml --node 1 --input FILE
//!                                  # act as primary node 1 for one write of FILE
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use replblk::buf::{AlignedBuf, SharedBuf};
use replblk::config::Config;
use replblk::net::{query_node, NodeReport};
use replblk::node::volume::Volume;
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
    /// Ask every node (or one) how it stands: a secondary, where its log
    /// stands; the running primary, where the volume stands and which
    /// secondaries it reaches. Without --node, also say where the volume's
    /// ublk device stands.
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
    /// Run node NODE as the primary just long enough to write FILE into the
    /// volume at OFFSET (1 MiB writes at queue depth 8, then a flush), and
    /// stop cleanly. Every secondary must be running.
    Write {
        /// The volume's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// The node to run as primary.
        #[arg(long)]
        node: u32,
        /// The file whose bytes to write.
        #[arg(long)]
        input: PathBuf,
        /// Where in the volume; a multiple of the block size.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Remove the volume's ublk device left behind by a primary that died
    /// (its recorded or configured device), when no primary serves it.
    /// Programs still waiting on the device get I/O errors.
    RemoveDevice {
        /// The volume's TOML config.
        #[arg(long)]
        config: PathBuf,
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        Command::Write {
            config,
            node,
            input,
            offset,
        } => write(&Config::load(&config)?, node, &input, offset),
        Command::RemoveDevice { config } => {
            match replblk::node::block_device::remove(&Config::load(&config)?)? {
                Some(device_id) => println!("removed /dev/ublkb{device_id}"),
                None => println!("no device left behind"),
            }
            Ok(())
        }
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
        match query_node(node.address, uuid, timeout) {
            Ok(NodeReport::Secondary { log, .. }) => println!(
                "node {} {} epoch {} start_seq {} next_seq {} applied_seq {} log_records {}",
                node.id,
                node.address,
                log.epoch,
                log.start_seq,
                log.next_seq,
                log.applied_seq,
                log.next_seq - log.start_seq
            ),
            Ok(NodeReport::Primary { volume, .. }) => {
                println!(
                    "node {} {} primary epoch {} next_seq {} all_acked_seq {} in_flight {}",
                    node.id,
                    node.address,
                    volume.epoch,
                    volume.next_seq,
                    volume.all_acked_seq,
                    volume.in_flight
                );
                for member in &volume.members {
                    println!(
                        "  secondary {} {} log_full_waits {} log_full_wait_ms {}",
                        member.node_id,
                        if member.connected {
                            "connected"
                        } else {
                            "disconnected"
                        },
                        member.log_full_waits,
                        member.log_full_wait_ms
                    );
                }
            }
            Err(reason) => {
                unreachable += 1;
                println!("node {} {} unreachable: {reason}", node.id, node.address);
            }
        }
    }
    if only.is_some() && unreachable > 0 {
        bail!("node unreachable");
    }
    if only.is_none() {
        if let Some(line) = replblk::node::block_device::device_status(config)? {
            println!("{line}");
        }
    }
    Ok(())
}

/// Bytes per write of `replblk-ctl write`.
const WRITE_CHUNK_BYTES: usize = 1 << 20;
/// Writes in flight during `replblk-ctl write`.
const WRITE_QUEUE_DEPTH: usize = 8;

fn write(config: &Config, node: u32, input: &std::path::Path, offset: u64) -> anyhow::Result<()> {
    let data = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let block = u64::from(config.volume.block_size_bytes);
    if !offset.is_multiple_of(block) || !(data.len() as u64).is_multiple_of(block) {
        bail!(
            "offset {offset} and the input's length {} must be multiples of the block size {block}",
            data.len()
        );
    }
    if offset + data.len() as u64 > config.volume.size_bytes {
        bail!(
            "{} bytes at offset {offset} do not fit the {}-byte volume",
            data.len(),
            config.volume.size_bytes
        );
    }
    let volume = std::sync::Arc::new(Volume::start(config, node)?);
    let started = std::time::Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result: anyhow::Result<()> = runtime.block_on(async {
        let mut in_flight = tokio::task::JoinSet::new();
        for (index, chunk) in data.chunks(WRITE_CHUNK_BYTES).enumerate() {
            while in_flight.len() >= WRITE_QUEUE_DEPTH {
                in_flight.join_next().await.expect("non-empty")??;
            }
            let buf = SharedBuf::new(AlignedBuf::copy_from(chunk));
            let at = offset + (index * WRITE_CHUNK_BYTES) as u64;
            let volume = volume.clone();
            in_flight.spawn(async move { volume.write(at, buf, false).await });
        }
        while let Some(done) = in_flight.join_next().await {
            done??;
        }
        volume.flush().await?;
        Ok(())
    });
    result?;
    let status = runtime.block_on(volume.status())?;
    let elapsed = started.elapsed();
    std::sync::Arc::into_inner(volume)
        .expect("sole handle")
        .stop()?;
    println!(
        "wrote {} bytes at offset {offset} in {:.2} s through primary node {node}; flushed; all-acked seq {}",
        data.len(),
        elapsed.as_secs_f64(),
        status.all_acked_seq
    );
    Ok(())
}
