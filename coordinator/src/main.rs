//! `fleetvault-coordinator`: the fleet's backup server and the operator's command line.

mod bundle;
mod catalog;
mod clock;
mod commands;
mod config;
mod download;
mod fault;
mod issued;
mod jobs;
mod limits;
mod push;
mod reconcile;
mod replicate;
mod serve;
mod server;
mod state;
mod store;
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
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct DataDirArg {
    /// Coordinator data directory.
    #[arg(
        long,
        env = "FLEETVAULT_DATA_DIR",
        default_value = "/var/lib/fleetvault"
    )]
    data_dir: PathBuf,
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
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show each replica: last sync, lag (snapshots and bytes not yet sent), last error.
    Replicas {
        #[command(flatten)]
        dir: DataDirArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
        /// Only with this status (pending, running, completed, failed).
        #[arg(long)]
        status: Option<String>,
        /// Only made by this job.
        #[arg(long)]
        job: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List agents: connected or last seen, version, sources.
    Agents {
        #[command(flatten)]
        dir: DataDirArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a job of coordinator.toml now on its agents, and wait for every backup.
    Run {
        /// Job name.
        job: String,
        #[command(flatten)]
        dir: DataDirArg,
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Protect a snapshot: retention never removes it.
    Protect {
        /// Snapshot id.
        snapshot_id: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Lift a snapshot's protection.
    Unprotect {
        /// Snapshot id.
        snapshot_id: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Delete a snapshot record (its chunks are freed by the next gc).
    Delete {
        /// Snapshot id.
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
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete chunks that no completed snapshot references (safe while backups run).
    Gc {
        #[command(flatten)]
        dir: DataDirArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read and re-hash every chunk of every completed snapshot (or one); damaged chunks are
    /// quarantined and their snapshots tagged `damaged`. Exits non-zero when any is damaged.
    Verify {
        #[command(flatten)]
        dir: DataDirArg,
        /// Only this snapshot.
        #[arg(long)]
        snapshot: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot to a file without an agent: a stream as its original bytes, a files
    /// snapshot as a tar archive.
    Download {
        /// Snapshot id.
        snapshot_id: String,
        #[command(flatten)]
        dir: DataDirArg,
        /// The new file to write.
        #[arg(long)]
        out: PathBuf,
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
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Have a running agent restore a snapshot (its own or another agent's), and wait.
    Restore {
        #[command(flatten)]
        dir: DataDirArg,
        /// Snapshot id (16 hex digits).
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
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    fleetvault_common::alloc::keep_freed_buffers();
    let cli = Cli::parse();
    commands::init_logging();
    let result = match cli.command {
        Command::Init {
            dir,
            listen,
            server_name,
        } => commands::init(&dir.data_dir, &listen, &server_name),
        Command::Serve { dir } => commands::serve(&dir.data_dir),
        Command::IssueAgent {
            name,
            dir,
            out,
            force,
        } => commands::issue_agent(&dir.data_dir, &name, &out, force),
        Command::IssuePeer {
            name,
            dir,
            out,
            replica_name,
            force,
        } => commands::issue_peer(&dir.data_dir, &name, &out, replica_name, force),
        Command::Replicate { dir, replica, json } => {
            commands::replicate(&dir.data_dir, replica, json)
        }
        Command::Replicas { dir, json } => commands::replicas(&dir.data_dir, json),
        Command::Promote { dir } => commands::promote(&dir.data_dir),
        Command::Snapshots {
            dir,
            agent,
            source,
            status,
            job,
            json,
        } => commands::snapshots(&dir.data_dir, agent, source, status, job, json),
        Command::Run { job, dir, json } => commands::run_job(&dir.data_dir, &job, json),
        Command::Protect { snapshot_id, dir } => {
            commands::protect(&dir.data_dir, &snapshot_id, true)
        }
        Command::Unprotect { snapshot_id, dir } => {
            commands::protect(&dir.data_dir, &snapshot_id, false)
        }
        Command::Delete { snapshot_id, dir } => commands::delete(&dir.data_dir, &snapshot_id),
        Command::Forget {
            job,
            dry_run,
            dir,
            json,
        } => commands::forget(&dir.data_dir, &job, dry_run, json),
        Command::Gc { dir, json } => commands::gc(&dir.data_dir, json),
        Command::RebuildCatalog { dir } => commands::rebuild_catalog(&dir.data_dir),
        Command::Download {
            snapshot_id,
            dir,
            out,
        } => commands::download(&dir.data_dir, &snapshot_id, &out),
        Command::Verify {
            dir,
            snapshot,
            json,
        } => commands::verify(&dir.data_dir, snapshot.as_deref(), json),
        Command::Agents { dir, json } => commands::agents(&dir.data_dir, json),
        Command::Backup {
            dir,
            agent,
            source,
            json,
        } => commands::push_backup(&dir.data_dir, &agent, &source, json),
        Command::Restore {
            dir,
            snapshot_id,
            agent,
            target,
            source,
            database,
            replace,
            no_safety_snapshot,
            json,
        } => commands::push_restore(
            &dir.data_dir,
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
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
