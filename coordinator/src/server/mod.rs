//! The coordinator daemon (`serve`): opens the data dir, accepts QUIC connections and runs
//! one [`session`] per peer, runs the schedulers, reloads on SIGHUP ([`reload`]), and stops in
//! a fixed order.
//!
//! Tasks live in two stages ([`Tasks`]): the sessions, and the background work (the job and
//! replication schedulers, the SIGHUP listener, and the jobs, collections, verifications and
//! syncs they start). On SIGINT or SIGTERM the daemon
//!
//! 1. stops accepting connections;
//! 2. drains the sessions: peers are told the coordinator is shutting down, each session ends
//!    its unfinished backups `failed`, and its task is awaited (20 s);
//! 3. stops the jobs and replication (10 s);
//! 4. waits until the endpoint has told every peer (5 s);
//! 5. flushes the catalog.
//!
//! A task still running at its stage's deadline is named in the log and left behind.

mod reload;
mod replica;
mod restore;
mod session;
mod upload;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use fleetvault_common::protocol::close;
use fleetvault_common::Credentials;
use tracing::info;

use crate::catalog::Catalog;
use crate::config::{CoordinatorConfig, DataDir};
use crate::store::ChunkStore;
use crate::tasks::Tasks;
use crate::State;

/// Exit code of `serve` when `coordinator.toml` is invalid (usage or config error).
const CONFIG_ERROR: u8 = 2;

/// How long each stage of the shutdown may take.
const DRAIN_SESSIONS: Duration = Duration::from_secs(20);
const STOP_BACKGROUND: Duration = Duration::from_secs(10);
const ENDPOINT_IDLE: Duration = Duration::from_secs(5);

/// `serve`: runs the coordinator in the foreground until SIGINT or SIGTERM.
pub(crate) fn serve(root: &Path) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(root);
    let cfg = match dir.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(CONFIG_ERROR));
        }
    };
    let (creds, state) = open(&dir, &cfg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(dir, cfg, creds, state))?;
    Ok(ExitCode::SUCCESS)
}

/// The credentials, the store and the catalog (rebuilt from the store if it is missing, then
/// reconciled with it).
fn open(dir: &DataDir, cfg: &CoordinatorConfig) -> anyhow::Result<(Credentials, Arc<State>)> {
    let creds = Credentials::load(
        &dir.tls("ca.pem"),
        &dir.tls("coordinator.pem"),
        &dir.tls("coordinator.key"),
    )?;
    let store = ChunkStore::open(&dir.store())
        .with_context(|| format!("opening the chunk store {}", dir.store().display()))?;
    let mut rebuild_error = None;
    let catalog = Catalog::open(
        &dir.catalog(),
        || match crate::reconcile::records_with_chunks(&store) {
            Ok(r) => r,
            Err(e) => {
                rebuild_error = Some(e);
                Vec::new()
            }
        },
    )
    .with_context(|| {
        format!(
            "opening the catalog {} (is another coordinator running on this data dir?)",
            dir.catalog().display()
        )
    })?;
    if let Some(e) = rebuild_error {
        bail!("rebuilding the catalog from the store: {e}");
    }
    // Before anything is served or collected: a crash between a store record and its catalog
    // entry must not leave the two disagreeing.
    crate::reconcile::reconcile(&store, &catalog)
        .map_err(|e| anyhow::anyhow!("reconciling the catalog with the store: {e}"))?;
    let state = Arc::new(State::new(dir.root(), store, catalog, cfg));
    Ok((creds, state))
}

/// Serves until a shutdown signal, then stops in the order of the module doc.
async fn run(
    dir: DataDir,
    cfg: CoordinatorConfig,
    creds: Credentials,
    state: Arc<State>,
) -> anyhow::Result<()> {
    let endpoint = fleetvault_common::server_endpoint(cfg.listen_addr()?, &creds)?;
    let local = endpoint.local_addr().context("reading the bound address")?;
    info!(%local, data_dir = %dir.root().display(), jobs = cfg.jobs.len(), "coordinator listening");
    eprintln!("fleetvault-coordinator listening on {local}");

    let background = Tasks::new();
    let reload = Arc::new(tokio::sync::Notify::new());
    background.spawn(
        "job scheduler",
        crate::jobs::scheduler::run(state.clone(), reload.clone(), background.clone()),
    );
    background.spawn(
        "replica scheduler",
        crate::replicate::scheduler(state.clone(), background.clone()),
    );
    let token = background.token().clone();
    background.spawn(
        "SIGHUP listener",
        reload::reload_on_sighup(dir, cfg, state.clone(), reload, token),
    );

    let sessions = Tasks::new();
    let shutdown = fleetvault_common::cli::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let name = format!("session from {}", incoming.remote_address());
                let token = sessions.token().clone();
                sessions.spawn(name, session::run(incoming, state.clone(), token));
            }
        }
    }
    info!("shutting down");
    endpoint.close(close::SHUTTING_DOWN.into(), b"coordinator shutting down");
    sessions.stop("sessions", DRAIN_SESSIONS).await;
    background
        .stop("jobs and replication", STOP_BACKGROUND)
        .await;
    let _ = tokio::time::timeout(ENDPOINT_IDLE, endpoint.wait_idle()).await;
    state.catalog.flush()?;
    info!("stopped");
    Ok(())
}
