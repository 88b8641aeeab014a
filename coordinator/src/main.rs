//! `fleetvault-coordinator`: the fleet's backup server and the operator's command line.

mod bundle;
mod catalog;
mod cli;
mod clock;
mod config;
mod download;
mod fault;
mod issued;
mod jobs;
mod limits;
mod push;
mod reconcile;
mod replicate;
mod server;
mod state;
mod store;
mod tasks;
#[cfg(test)]
mod testing;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub(crate) use state::State;

/// Software name and version, sent in the hello.
pub(crate) const SOFTWARE: &str = concat!("fleetvault-coordinator/", env!("CARGO_PKG_VERSION"));

/// The fleetvault coordinator: stores chunks, keeps the snapshot catalog, pushes work to agents.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Print one JSON document on stdout (also on failure: `status`, `error`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// The data dir every command and the systemd unit use unless told otherwise.
const DEFAULT_DATA_DIR: &str = "/var/lib/fleetvault/coordinator";
/// The default before 2026-12, still found when it holds a coordinator and the new one does not.
const OLD_DEFAULT_DATA_DIR: &str = "/var/lib/fleetvault";

#[derive(clap::Args, Clone)]
struct DataDirArg {
    /// Coordinator data directory [default: /var/lib/fleetvault/coordinator].
    #[arg(long = "data-dir", env = "FLEETVAULT_DATA_DIR")]
    given: Option<PathBuf>,
}

impl DataDirArg {
    fn path(&self) -> PathBuf {
        if let Some(p) = &self.given {
            return p.clone();
        }
        let new = PathBuf::from(DEFAULT_DATA_DIR);
        let old = PathBuf::from(OLD_DEFAULT_DATA_DIR);
        if !new.join("coordinator.toml").exists() && old.join("coordinator.toml").exists() {
            return old;
        }
        new
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create a data directory: fleet CA, coordinator and operator certificates, config.
    Init {
        #[command(flatten)]
        dir: DataDirArg,
        /// Address to listen on, HOST:PORT.
        #[arg(long)]
        listen: String,
        /// DNS name agents use to reach the coordinator (goes into its certificate).
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// Address agents and operator commands dial, HOST:PORT (stored as `advertise`;
        /// default: SERVER_NAME and the listen port when --listen is a wildcard address).
        #[arg(long)]
        advertise: Option<String>,
    },
    /// Run the coordinator in the foreground until SIGINT or SIGTERM.
    Serve {
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Issue an agent certificate and write a ready-to-use agent.toml into OUTDIR. The
    /// coordinator accepts only the certificate issued last for a name: issuing it again
    /// revokes the earlier ones (a running coordinator closes their connections within seconds).
    IssueAgent {
        /// Agent (host) name, e.g. db-01.
        name: String,
        #[command(flatten)]
        dir: DataDirArg,
        /// Where to write agent.toml, ca.pem, agent.pem and agent.key.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing agent.toml in OUTDIR, and replace (revoke) the certificate
        /// issued earlier for NAME.
        #[arg(long)]
        force: bool,
    },
    /// On an offsite coordinator: issue a peer certificate for a primary that will replicate
    /// here; OUTDIR gets ca.pem, peer.pem, peer.key and the primary's [[replicas]] table.
    IssuePeer {
        /// The primary's name, e.g. main-dc.
        name: String,
        #[command(flatten)]
        dir: DataDirArg,
        /// Where to write the peer credentials.
        #[arg(long)]
        out: PathBuf,
        /// What the primary will call this replica in its [[replicas]] table (default: this
        /// coordinator's server name).
        #[arg(long)]
        replica_name: Option<String>,
        /// Replace the certificate already issued to this peer.
        #[arg(long)]
        force: bool,
    },
    /// Send the snapshots each replica lacks now (or only to one), and report what was sent.
    Replicate {
        #[command(flatten)]
        dir: DataDirArg,
        /// Only this replica of coordinator.toml.
        #[arg(long)]
        replica: Option<String>,
    },
    /// Show each replica: last sync, lag (snapshots and bytes not yet sent), last error.
    Replicas {
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Make this replica the primary: retire the peer certificates issued here, and list
    /// the agents whose configs to re-issue.
    Promote {
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// List the fleet's snapshots (asks the running coordinator).
    Snapshots {
        #[command(flatten)]
        dir: DataDirArg,
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
        /// Only this source's.
        #[arg(long)]
        source: Option<String>,
        /// Only with this status.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(fleetvault_common::SnapshotStatus::NAMES))]
        status: Option<String>,
        /// Only made by this job.
        #[arg(long)]
        job: Option<String>,
    },
    /// One snapshot in detail.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// List agents: connected or last seen, version, sources.
    Agents {
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Run a job of coordinator.toml now on its agents, and wait for every backup.
    Run {
        /// Job name.
        job: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Protect a snapshot: retention never removes it.
    Protect {
        /// Snapshot id or unique prefix (4+ hex digits).
        snapshot_id: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Lift a snapshot's protection.
    Unprotect {
        /// Snapshot id or unique prefix (4+ hex digits).
        snapshot_id: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Delete a snapshot record (its chunks are freed by the next gc).
    Delete {
        /// Snapshot id or unique prefix (4+ hex digits).
        snapshot_id: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Apply a job's retention policy to its snapshots.
    Forget {
        /// The job whose policy applies.
        #[arg(long)]
        job: String,
        /// Only show what would be forgotten and why each kept snapshot stays.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Delete chunks that no completed snapshot references (safe while backups run).
    Gc {
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Re-read and re-hash every chunk of every completed snapshot (or one); damaged chunks are
    /// quarantined and their snapshots tagged `damaged`. Exits non-zero when any is damaged.
    Verify {
        #[command(flatten)]
        dir: DataDirArg,
        /// Only this snapshot (id or unique prefix).
        #[arg(long)]
        snapshot: Option<String>,
    },
    /// Write a snapshot to a file without an agent: a stream as its original bytes, a files
    /// snapshot as a tar archive.
    Download {
        /// Snapshot id or unique prefix (4+ hex digits).
        snapshot_id: String,
        #[command(flatten)]
        dir: DataDirArg,
        /// The new file to write (created 0600), or `-` for stdout.
        #[arg(long)]
        out: PathBuf,
        /// Replace OUT when it exists.
        #[arg(long)]
        force: bool,
    },
    /// Recreate the catalog from the immutable snapshot records in the store (with the
    /// coordinator stopped). The old catalog is kept beside it as `catalog.old-<time>`.
    RebuildCatalog {
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Have a running agent back up one of its sources now, and wait for the result.
    Backup {
        #[command(flatten)]
        dir: DataDirArg,
        /// Agent name.
        #[arg(long)]
        agent: String,
        /// Source name.
        #[arg(long)]
        source: String,
    },
    /// Have a running agent restore a snapshot (its own or another agent's), and wait.
    Restore {
        #[command(flatten)]
        dir: DataDirArg,
        /// Snapshot: its id, a unique prefix (4+ hex digits), or `latest` (of --agent's
        /// --source).
        snapshot_id: String,
        /// Agent that restores.
        #[arg(long)]
        agent: String,
        /// Target directory on that agent (files snapshots).
        #[arg(long)]
        target: Option<String>,
        /// The agent's source to restore into (database snapshots; default: the same name).
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
    /// Print a shell completion script (e.g. `... completions bash > /etc/bash_completion.d/fleetvault-coordinator`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (one per subcommand) into DIR.
    Man {
        /// Directory to write `fleetvault-coordinator*.1` into.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Everything recorded about one snapshot (a bundle: its parts and hooks too).
    Show {
        /// Snapshot id, unique prefix (4+ hex digits), or `latest` (needs --source).
        snapshot_id: String,
        #[command(flatten)]
        dir: DataDirArg,
        /// Narrow the search to this agent's snapshots.
        #[arg(long)]
        agent: Option<String>,
        /// Narrow the search to this source's snapshots.
        #[arg(long)]
        source: Option<String>,
    },
}

fn main() -> ExitCode {
    fleetvault_common::alloc::keep_freed_buffers();
    let cli: Cli = fleetvault_common::cli::parse();
    cli::init_logging();
    let json = cli.json;
    match dispatch(cli.command, json) {
        Ok(code) => code,
        Err(e) => fleetvault_common::exit::report_error(&e, json),
    }
}

fn dispatch(command: Command, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        Command::Init {
            dir,
            listen,
            server_name,
            advertise,
        } => cli::init(&dir.path(), &listen, &server_name, advertise, json),
        Command::Serve { dir } => server::serve(&dir.path()),
        Command::IssueAgent {
            name,
            dir,
            out,
            force,
        } => cli::issue_agent(&dir.path(), &name, &out, force, json),
        Command::IssuePeer {
            name,
            dir,
            out,
            replica_name,
            force,
        } => cli::issue_peer(&dir.path(), &name, &out, replica_name, force, json),
        Command::Replicate { dir, replica } => cli::replicate(&dir.path(), replica, json),
        Command::Replicas { dir } => cli::replicas(&dir.path(), json),
        Command::Promote { dir } => cli::promote(&dir.path(), json),
        Command::Snapshots {
            dir,
            agent,
            source,
            status,
            job,
        } => cli::snapshots(&dir.path(), agent, source, status, job, json),
        Command::Snapshot {
            command:
                SnapshotCommand::Show {
                    snapshot_id,
                    dir,
                    agent,
                    source,
                },
        } => cli::show(&dir.path(), &snapshot_id, agent, source, json),
        Command::Run { job, dir } => cli::run_job(&dir.path(), &job, json),
        Command::Protect { snapshot_id, dir } => {
            cli::protect(&dir.path(), &snapshot_id, true, json)
        }
        Command::Unprotect { snapshot_id, dir } => {
            cli::protect(&dir.path(), &snapshot_id, false, json)
        }
        Command::Delete { snapshot_id, dir } => cli::delete(&dir.path(), &snapshot_id, json),
        Command::Forget { job, dry_run, dir } => cli::forget(&dir.path(), &job, dry_run, json),
        Command::Gc { dir } => cli::gc(&dir.path(), json),
        Command::RebuildCatalog { dir } => cli::rebuild_catalog(&dir.path(), json),
        Command::Download {
            snapshot_id,
            dir,
            out,
            force,
        } => cli::download(&dir.path(), &snapshot_id, &out, force, json),
        Command::Verify { dir, snapshot } => cli::verify(&dir.path(), snapshot.as_deref(), json),
        Command::Agents { dir } => cli::agents(&dir.path(), json),
        Command::Backup { dir, agent, source } => {
            cli::push_backup(&dir.path(), &agent, &source, json)
        }
        Command::Restore {
            dir,
            snapshot_id,
            agent,
            target,
            source,
            database,
            replace,
            no_safety_snapshot,
        } => cli::push_restore(
            &dir.path(),
            &snapshot_id,
            &agent,
            fleetvault_common::protocol::RestoreOptions {
                source,
                database,
                replace,
                no_safety_snapshot,
                target,
            },
            json,
        ),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "fleetvault-coordinator",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out } => fleetvault_common::cli::write_man_pages(
            <Cli as clap::CommandFactory>::command(),
            &out,
            json,
        ),
    }
}
