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

use replblk::config::Config;
use replblk::node::{secondary, volume::Volume};

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
            secondary::run(&config, args.node)
                .with_context(|| format!("secondary node {}", args.node))
        }
        RoleCommand::Primary(args) => {
            let config = Config::load(&args.config)?;
            // Block the stop signals before the engine thread starts, so it
            // inherits the mask and this thread alone receives them.
            let mut signals = SigSet::empty();
            signals.add(Signal::SIGTERM);
            signals.add(Signal::SIGINT);
            signals
                .thread_block()
                .context("blocking SIGTERM and SIGINT")?;
            let volume = Volume::start(&config, args.node)
                .with_context(|| format!("primary node {}", args.node))?;
            let signal = signals.wait().context("waiting for a stop signal")?;
            tracing::info!(?signal, "stopping");
            volume.stop().context("stopping the primary")
        }
    }
}
