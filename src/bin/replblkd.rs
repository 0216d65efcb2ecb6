//! `replblkd`: runs one node of a replicated volume.
//!
//! ```text
//! replblkd secondary --config volume.toml --node 2
//! replblkd primary   --config volume.toml --node 1
//! ```
//! Logs go to stderr through tracing; RUST_LOG sets the level (default info).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};

use std::sync::Arc;

use replblk::config::Config;
use replblk::node::{block_device, secondary, volume::Volume, NodeError};
use replblk_ublk::UblkDeviceError;
use tokio::sync::Notify;

#[derive(Parser)]
#[command(version, about = "Runs one node of a replblk volume")]
struct Cli {
    #[command(subcommand)]
    role: RoleCommand,
}

#[derive(Subcommand)]
enum RoleCommand {
    /// Serve as a secondary: log, acknowledge and apply the primary's updates.
    Secondary(NodeArgs),
    /// Serve as the primary: connect to every other node and replicate
    /// writes made through the volume (the ublk frontend attaches here).
    Primary(NodeArgs),
}

#[derive(clap::Args)]
struct NodeArgs {
    /// The volume's TOML config.
    #[arg(long)]
    config: PathBuf,
    /// This node's id in the config.
    #[arg(long)]
    node: u32,
    /// Primary only: run the engine without creating the ublk device
    /// (for kernels without ublk; nothing can write to the volume then but
    /// this process).
    #[arg(long)]
    no_device: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(error) = run(Cli::parse()) {
        eprintln!("replblkd: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.role {
        RoleCommand::Secondary(args) => {
            let config = Config::load(&args.config)?;
            // As for the primary: the stop signals are blocked in every
            // thread and taken by one that waits for them, which tells the
            // secondary to stop cleanly.
            let signals = stop_signals()?;
            let stop = Arc::new(Notify::new());
            let stopper = stop.clone();
            std::thread::Builder::new()
                .name("replblk-signals".into())
                .spawn(move || {
                    if let Ok(signal) = signals.wait() {
                        tracing::info!(?signal, "stopping");
                        stopper.notify_one();
                    }
                })
                .context("starting the signal thread")?;
            secondary::run(&config, args.node, stop)
                .with_context(|| format!("secondary node {}", args.node))
        }
        RoleCommand::Primary(args) => {
            let config = Config::load(&args.config)?;
            let signals = stop_signals()?;
            // Decide about the device before the engine starts, so a device
            // served by another process is refused without touching anything.
            let plan = if args.no_device {
                None
            } else {
                Some(block_device::plan(&config).map_err(|error| match error {
                    NodeError::RecoveryCutShort { .. } => stuck_device(error, &args.config),
                    error => anyhow::Error::new(error).context(
                        "the primary serves its volume as /dev/ublkbN; --no-device runs the engine alone",
                    ),
                })?)
            };
            let volume = Arc::new(
                Volume::start(&config, args.node)
                    .with_context(|| format!("primary node {}", args.node))?,
            );
            match plan {
                None => {
                    let signal = signals.wait().context("waiting for a stop signal")?;
                    tracing::info!(?signal, "stopping");
                }
                Some(plan) => {
                    block_device::serve(&config, args.node, plan, volume.clone(), |timeout| {
                        stop_signal(&signals, timeout)
                    })
                    .map_err(|error| match error {
                        NodeError::Device(UblkDeviceError::Unrecoverable { .. }) => {
                            stuck_device(error, &args.config)
                        }
                        error => error.into(),
                    })?
                }
            }
            let volume = Arc::into_inner(volume)
                .context("the volume is still in use after the device stopped")?;
            volume.stop().context("stopping the primary")
        }
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread, before any other
/// starts, so that every thread inherits the mask and only one that waits
/// for them (`SigSet::wait`, `sigtimedwait`) receives them.
fn stop_signals() -> anyhow::Result<SigSet> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .context("blocking SIGTERM and SIGINT")?;
    Ok(signals)
}

/// A device that only removing frees, with the command that removes it.
fn stuck_device(error: NodeError, config: &std::path::Path) -> anyhow::Error {
    anyhow::Error::new(error).context(format!(
        "the volume's device is stuck (`replblk-ctl remove-device --config {}` removes it)",
        config.display()
    ))
}

/// Waits up to `timeout` for SIGTERM or SIGINT (blocked in every thread).
fn stop_signal(signals: &SigSet, timeout: std::time::Duration) -> bool {
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `signals` is a valid sigset_t, the info pointer may be null,
    // and `timeout` outlives the call.
    let signal = unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), &timeout) };
    if signal > 0 {
        tracing::info!(signal, "stopping");
        true
    } else {
        false
    }
}
