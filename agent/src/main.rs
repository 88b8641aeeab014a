//! `fleetvault-agent`: backs up this host's sources to the coordinator and restores them.

mod backup;
mod bundle;
mod config;
mod db;
mod link;
mod pipe;
mod process;
mod restore;
mod sink;
mod source;
mod systemd;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetvault_common::exit::{self, FailedRecord, UsageError};
use fleetvault_common::protocol::RestoreOptions;
use fleetvault_common::{report, Client, Credentials};

use config::AgentConfig;

/// Software name and version, sent in the hello.
const SOFTWARE: &str = concat!("fleetvault-agent/", env!("CARGO_PKG_VERSION"));

/// The fleetvault agent: backs up this host's databases and files, restores them.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Print one JSON document on stdout (also on failure: `status`, `error`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Agent config file.
    #[arg(
        long,
        env = "FLEETVAULT_CONFIG",
        default_value = "/etc/fleetvault/agent.toml"
    )]
    config: PathBuf,
}

impl ConfigArg {
    /// The config, or a usage error (exit code 2) naming the file, line and key.
    fn load(&self) -> anyhow::Result<AgentConfig> {
        AgentConfig::load(&self.config).map_err(|e| UsageError(format!("{e:#}")).into())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Back up one source (or bundle) now.
    Backup {
        #[command(flatten)]
        config: ConfigArg,
        /// Source or bundle name.
        #[arg(long)]
        source: String,
    },
    /// List this agent's snapshots.
    Snapshots {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Restore a snapshot: a files snapshot under --target DIR; a stream into the source's
    /// restore_command, or to stdout with --target -.
    Restore {
        #[command(flatten)]
        config: ConfigArg,
        /// Snapshot id, a unique prefix (4+ hex digits), or `latest` (of --source).
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
    },
    /// Show what each bundle is (parts, paths, database, hooks) without running anything.
    Bundles {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Stay connected to the coordinator and run the backups and restores it pushes.
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the systemd drop-in (ReadWritePaths=) that lets restores write where this host's
    /// sources live under the shipped unit's read-only sandbox.
    SystemdDropin {
        #[command(flatten)]
        config: ConfigArg,
        /// Write it to this file instead of printing it (no value:
        /// /etc/systemd/system/fleetvault-agent.service.d/restore-paths.conf).
        #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = systemd::DROPIN_PATH)]
        write: Option<PathBuf>,
    },
    /// One snapshot in detail.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Print a shell completion script (e.g. `... completions bash > /etc/bash_completion.d/fleetvault-agent`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (one per subcommand) into DIR.
    Man {
        /// Directory to write `fleetvault-agent*.1` into.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Everything recorded about one of this agent's snapshots (a bundle: its parts and hooks).
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// Snapshot id, unique prefix (4+ hex digits), or `latest` (needs --source).
        snapshot_id: String,
        /// Narrow the search to this source's snapshots.
        #[arg(long)]
        source: Option<String>,
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
    let cli: Cli = fleetvault_common::cli::parse();
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
    let json = cli.json;
    match rt.block_on(dispatch(cli.command, json)) {
        Ok(code) => code,
        Err(e) => exit::report_error(&e, json),
    }
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Ends a command whose result is already printed but that did not fully succeed.
fn ended_with(code: u8, message: impl std::fmt::Display) -> ExitCode {
    let word = if code == exit::WARNINGS {
        "warning"
    } else {
        "error"
    };
    eprintln!("{word}: {message}");
    ExitCode::from(code)
}

/// Exit code 3 and a warning line when a completed job has warnings.
fn warnings_code(report: &fleetvault_common::JobReport) -> ExitCode {
    if report.warnings.is_empty() {
        return ExitCode::SUCCESS;
    }
    ended_with(
        exit::WARNINGS,
        format!(
            "completed with {}",
            report::plural(report.warnings.len() as u64, "warning", "warnings")
        ),
    )
}

async fn dispatch(command: Command, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        Command::Backup { config, source } => {
            let config = config.load()?;
            if let Some(bundle) = config.bundle(&source).cloned() {
                return backup_bundle(&config, &bundle, json).await;
            }
            let source = config
                .source(&source)
                .map_err(|e| UsageError(format!("{e:#}")))?
                .clone();
            let client = Arc::new(connect(&config, &config.credentials()?).await?);
            let bar = report::progress_bar(None);
            let b = bar.clone();
            let result = backup::run(client.clone(), &source, None, move |p| {
                b.set_position(p.bytes)
            })
            .await;
            bar.finish_and_clear();
            close(client).await;
            let report = result?;
            if json {
                print_json(&report::job_json(&report))?;
            } else {
                println!("{}", report::job_summary(&report, false));
            }
            Ok(warnings_code(&report))
        }
        Command::SystemdDropin { config, write } => {
            systemd::run(&config.config, write.as_deref()).map(|()| ExitCode::SUCCESS)
        }
        Command::Bundles { config } => {
            let config = config.load()?;
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
        Command::Snapshots { config } => {
            let config = config.load()?;
            let client = connect(&config, &config.credentials()?).await?;
            let list = client.list_snapshots(Default::default()).await?;
            client.close().await;
            report::print_snapshots(&list, json)?;
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
        } => {
            let config = config.load()?;
            let client = Arc::new(connect(&config, &config.credentials()?).await?);
            let snapshot =
                fleetvault_common::select::resolve(&client, &snapshot_id, None, source.as_deref())
                    .await?;
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
            close(client).await;
            let report = result.map_err(|e| {
                let message = format!("{e:#}");
                e.context(FailedRecord {
                    snapshot_id: snapshot.to_string(),
                    message: format!("restore of snapshot {snapshot} failed: {message}"),
                })
            })?;
            if json {
                print_json(&report::job_json(&report))?;
            } else {
                eprintln!("{}", report::job_summary(&report, true));
            }
            // A restore's warnings are notes (what each bundle part went into).
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot {
            command:
                SnapshotCommand::Show {
                    config,
                    snapshot_id,
                    source,
                },
        } => {
            let config = config.load()?;
            let client = Arc::new(connect(&config, &config.credentials()?).await?);
            let id =
                fleetvault_common::select::resolve(&client, &snapshot_id, None, source.as_deref())
                    .await?;
            let list = client.list_snapshots(Default::default()).await?;
            let rec = list
                .into_iter()
                .find(|r| r.id == id)
                .with_context(|| format!("no snapshot {id} of this agent"))?;
            let bundle = if rec.kind == fleetvault_common::SnapshotKind::Bundle
                && rec.status == fleetvault_common::SnapshotStatus::Completed
            {
                let index = restore::read_index(client.clone(), id).await?;
                Some(serde_json::to_value(&index)?)
            } else {
                None
            };
            close(client).await;
            if json {
                let mut v = report::snapshot_json(&rec);
                v["bundle"] = bundle.clone().unwrap_or(serde_json::Value::Null);
                print_json(&v)?;
            } else {
                print!("{}", report::snapshot_detail(&rec, bundle.as_ref()));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "fleetvault-agent",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out } => fleetvault_common::cli::write_man_pages(
            <Cli as clap::CommandFactory>::command(),
            &out,
            json,
        ),
        Command::Run { config } => {
            let config = config.load()?;
            let token = tokio_util::sync::CancellationToken::new();
            let t = token.clone();
            tokio::spawn(async move {
                fleetvault_common::cli::shutdown_signal().await;
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
        print_json(&outcome.index.json(id, status, outcome.error.as_deref()))?;
    } else {
        for p in &outcome.index.parts {
            println!(
                "part {}: {} {} ({} read, {})",
                p.name,
                p.status,
                p.snapshot_id.as_deref().unwrap_or("-"),
                report::human_bytes(p.bytes_read),
                report::plural(p.new_chunks, "new chunk", "new chunks")
            );
        }
        if let Some(id) = id {
            println!("bundle {} completed: snapshot {id}", bundle.name);
        }
    }
    match (outcome.error, id) {
        (None, _) => Ok(ExitCode::SUCCESS),
        // Committed, but an `after` hook (or a later step) failed: completed with warnings.
        (Some(e), Some(_)) => Ok(ended_with(
            exit::WARNINGS,
            format!("bundle {}: {e}", bundle.name),
        )),
        (Some(e), None) => Ok(ended_with(
            exit::FAILURE,
            format!("bundle {}: {e}", bundle.name),
        )),
    }
}

async fn close(client: Arc<Client>) {
    if let Ok(c) = Arc::try_unwrap(client) {
        c.close().await;
    }
}
