//! The command line's subcommands: `setup` makes and changes a data directory (init,
//! issuing certificates, rebuilding the catalog); `operator` holds the commands that ask the
//! running coordinator (listings, backups and restores, retention, gc, verify, download,
//! replication). Shared here: logging, the JSON and exit-code helpers, the runtime.

mod operator;
mod output;
mod setup;

pub(crate) use operator::{
    agents, delete, download, forget, gc, promote, protect, push_backup, push_restore, replicas,
    replicate, run_job, show, snapshots, verify,
};
pub(crate) use setup::{init, issue_agent, issue_peer, rebuild_catalog};

use std::process::ExitCode;

use anyhow::Context;
use fleetvault_common::exit;

/// Logs to stderr; `FLEETVAULT_LOG` (or `RUST_LOG`) overrides the level.
pub(crate) fn init_logging() {
    let filter = std::env::var("FLEETVAULT_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

pub(super) fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Ends a command whose result is already printed (its JSON document, or its table) but
/// that did not fully succeed: one line on stderr and `code`.
pub(super) fn ended_with(code: u8, message: impl std::fmt::Display) -> ExitCode {
    let word = if code == exit::WARNINGS {
        "warning"
    } else {
        "error"
    };
    eprintln!("{word}: {message}");
    ExitCode::from(code)
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
