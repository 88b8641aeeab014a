//! `fleetvault-agent`: backs up this host's sources to the coordinator and restores them.

mod backup;
mod bundle;
mod config;
mod link;
mod restore;
mod sink;
mod source;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::bail;
use clap::{Parser, Subcommand};
use fleetvault_common::protocol::{Request, Response, RestoreOptions};
use fleetvault_common::{report, Client, Credentials, SnapshotId};

use config::AgentConfig;

/// Software name and version, sent in the hello.
const SOFTWARE: &str = concat!("fleetvault-agent/", env!("CARGO_PKG_VERSION"));

/// The fleetvault agent: backs up this host's databases and files, restores them.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Back up one source (or bundle) now.
    Backup {
        /// Agent config file.
        #[arg(long)]
        config: PathBuf,
        /// Source or bundle name.
        #[arg(long)]
        source: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List this agent's snapshots.
    Snapshots {
        /// Agent config file.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot: a files snapshot under --target DIR; a stream into the source's
    /// restore_command, or to stdout with --target -.
    Restore {
        /// Agent config file.
        #[arg(long)]
        config: PathBuf,
        /// Snapshot id (16 hex digits).
        snapshot_id: String,
        /// Target directory (files), file or `-` for stdout (streams); for a bundle, the new
        /// root of the application's files (as --root).
        #[arg(long)]
        target: Option<String>,
        /// Bundles: restore the application's files under this root (a move, or with
        /// --database a clone beside the original, its configuration rewritten).
        #[arg(long, conflicts_with = "target")]
        root: Option<String>,
        /// The source to restore into (default: the snapshot's own source).
        #[arg(long)]
        source: Option<String>,
        /// Restore into this database (created if absent) instead of the source's own.
        #[arg(long)]
        database: Option<String>,
        /// Replace the existing database (a safety snapshot of it is taken first).
        #[arg(long)]
        replace: bool,
        /// With --replace: do not take the safety snapshot.
        #[arg(long, requires = "replace")]
        no_safety_snapshot: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what each bundle is (parts, paths, database, hooks) without running anything.
    Bundles {
        /// Agent config file.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stay connected to the coordinator and run the backups and restores it pushes.
    Run {
        /// Agent config file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn init_logging(default: &str) {
    let filter = std::env::var("FLEETVAULT_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Connects to the coordinator named in `config`. The error is the [`ClientError`]
/// (downcastable for the exit code), one line naming the configured address.
///
/// [`ClientError`]: fleetvault_common::ClientError
pub(crate) async fn connect(config: &AgentConfig, creds: &Credentials) -> anyhow::Result<Client> {
    let c = &config.coordinator;
    Ok(Client::dial(creds, &c.address, &c.server_name, SOFTWARE).await?)
}

fn main() -> ExitCode {
    fleetvault_common::alloc::keep_freed_buffers();
    let cli = Cli::parse();
    let run = matches!(cli.command, Command::Run { .. });
    init_logging(if run { "info" } else { "warn" });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Backup {
            config,
            source,
            json,
        } => {
            let config = AgentConfig::load(&config)?;
            if let Some(bundle) = config.bundle(&source).cloned() {
                return backup_bundle(&config, &bundle, json).await;
            }
            let source = config.source(&source)?.clone();
            let client = Arc::new(connect(&config, &config.credentials()?).await?);
            let bar = report::progress_bar(None);
            let b = bar.clone();
            let result = backup::run(client.clone(), &source, None, move |p| {
                b.set_position(p.bytes)
            })
            .await;
            bar.finish_and_clear();
            let report = result?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report::job_json(&report))?
                );
            } else {
                println!("{}", report::job_summary(&report, false));
            }
            close(client).await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bundles { config, json } => {
            let config = AgentConfig::load(&config)?;
            let list: Vec<_> = config
                .bundles
                .iter()
                .map(|b| bundle::describe(&config, b))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for b in &list {
                    print!("{}", bundle::describe_text(b));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshots { config, json } => {
            let config = AgentConfig::load(&config)?;
            let client = connect(&config, &config.credentials()?).await?;
            let list = match client
                .call(&Request::ListSnapshots(Default::default()))
                .await?
            {
                Response::Snapshots(l) => l,
                other => bail!("unexpected reply {other:?}"),
            };
            client.close().await;
            if json {
                let v: Vec<_> = list.iter().map(report::snapshot_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", report::snapshots_table(&list));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            config,
            snapshot_id,
            target,
            root,
            source,
            database,
            replace,
            no_safety_snapshot,
            json,
        } => {
            let snapshot: SnapshotId = snapshot_id.parse()?;
            let config = AgentConfig::load(&config)?;
            let client = Arc::new(connect(&config, &config.credentials()?).await?);
            let options = RestoreOptions {
                source,
                database,
                replace,
                no_safety_snapshot,
                target: target.or(root),
            };
            let bar = report::progress_bar(None);
            let b = bar.clone();
            let result = restore::run_into(client.clone(), &config, snapshot, &options, move |p| {
                if let (Some(t), None) = (p.total, b.length()) {
                    b.set_length(t);
                }
                b.set_position(p.bytes)
            })
            .await;
            bar.finish_and_clear();
            let report = result?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report::job_json(&report))?
                );
            } else {
                eprintln!("{}", report::job_summary(&report, true));
            }
            close(client).await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config } => {
            let config = AgentConfig::load(&config)?;
            let token = tokio_util::sync::CancellationToken::new();
            let t = token.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("shutting down");
                t.cancel();
            });
            link::run(config, token).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `backup --source BUNDLE`: prints the bundle's index (parts, hooks) and exits non-zero
/// unless the bundle completed and its after hooks succeeded.
async fn backup_bundle(
    config: &AgentConfig,
    bundle: &bundle::BundleConfig,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let client = Arc::new(connect(config, &config.credentials()?).await?);
    let bar = report::progress_bar(None);
    let b = bar.clone();
    let outcome = bundle::backup(
        client.clone(),
        config,
        bundle,
        None,
        Arc::new(move |p| b.set_position(p.bytes)),
    )
    .await;
    bar.finish_and_clear();
    close(client).await;
    let id = outcome.committed.as_ref().map(|r| r.snapshot_id.as_str());
    let status = match (&outcome.committed, &outcome.error) {
        (Some(_), None) => "completed",
        (Some(_), Some(_)) => "completed-with-errors",
        (None, _) => "failed",
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcome.index.json(
                id,
                status,
                outcome.error.as_deref()
            ))?
        );
    } else {
        for p in &outcome.index.parts {
            println!(
                "part {}: {} {} ({} read, {} new chunks)",
                p.name,
                p.status,
                p.snapshot_id.as_deref().unwrap_or("-"),
                report::human_bytes(p.bytes_read),
                p.new_chunks
            );
        }
        if let Some(id) = id {
            println!("bundle {} completed: snapshot {id}", bundle.name);
        }
    }
    match outcome.error {
        None => Ok(ExitCode::SUCCESS),
        Some(e) => bail!("bundle {}: {e}", bundle.name),
    }
}

async fn close(client: Arc<Client>) {
    if let Ok(c) = Arc::try_unwrap(client) {
        c.close().await;
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
