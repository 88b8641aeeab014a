//! `serve`: the coordinator in the foreground, its schedulers, and `coordinator.toml` reloaded
//! on SIGHUP.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use fleetvault_common::Credentials;
use tracing::info;

use crate::catalog::Catalog;
use crate::config::{CoordinatorConfig, DataDir};
use crate::store::ChunkStore;
use crate::State;

/// Exit code of `serve` when `coordinator.toml` is invalid (usage or config error).
const CONFIG_ERROR: u8 = 2;

pub(crate) fn serve(root: &Path) -> anyhow::Result<ExitCode> {
    let dir = DataDir::new(root);
    let cfg = match dir.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(CONFIG_ERROR));
        }
    };
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
    let state = Arc::new(State::new(root, store, catalog, &cfg));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let endpoint = fleetvault_common::server_endpoint(cfg.listen_addr()?, &creds)?;
        let local = endpoint.local_addr().context("reading the bound address")?;
        info!(%local, data_dir = %dir.root().display(), jobs = cfg.jobs.len(), "coordinator listening");
        eprintln!("fleetvault-coordinator listening on {local}");
        let token = tokio_util::sync::CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let reload = Arc::new(tokio::sync::Notify::new());
        tracker.spawn(crate::jobs::scheduler::run(
            state.clone(),
            token.clone(),
            reload.clone(),
            tracker.clone(),
        ));
        tracker.spawn(crate::replicate::scheduler(
            state.clone(),
            token.clone(),
            tracker.clone(),
        ));
        tracker.spawn(reload_on_sighup(
            dir.clone(),
            cfg,
            state.clone(),
            reload,
            token.clone(),
        ));
        let result = crate::server::run(endpoint, state, shutdown_signal()).await;
        token.cancel();
        tracker.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tracker.wait()).await;
        result
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Re-reads `coordinator.toml` on SIGHUP. A valid file takes effect at once, all of it but the
/// keys `started` was bound with (named in the log line); an invalid one is reported in one
/// line (file, line, key) and the previous configuration stays in force, all of it.
async fn reload_on_sighup(
    dir: DataDir,
    started: CoordinatorConfig,
    state: Arc<State>,
    reload: Arc<tokio::sync::Notify>,
    token: tokio_util::sync::CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; config reload disabled");
        return;
    };
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        match dir.load_config() {
            Ok(cfg) => {
                state.configure(&cfg);
                reload.notify_one();
                let mut message = "configuration reloaded".to_owned();
                for key in needs_restart(&started, &cfg) {
                    message.push_str(&format!("; {key} changed: takes effect after a restart"));
                }
                info!(
                    jobs = cfg.jobs.len(),
                    replicas = cfg.replicas.len(),
                    peers = cfg.peers.len(),
                    gc_schedule = cfg.gc_schedule.as_deref().unwrap_or("-"),
                    verify_schedule = cfg.verify_schedule.as_deref().unwrap_or("-"),
                    max_concurrent_backups = cfg
                        .max_concurrent_backups
                        .unwrap_or(crate::state::DEFAULT_MAX_CONCURRENT_BACKUPS),
                    "{message}"
                );
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "configuration not reloaded; keeping the previous one")
            }
        }
    }
}

/// The keys of `now` that differ from what `serve` was started with and only a restart
/// applies: the bound address and the certificate's name.
fn needs_restart(started: &CoordinatorConfig, now: &CoordinatorConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if started.listen != now.listen {
        keys.push("listen");
    }
    if started.server_name != now.server_name {
        keys.push("server_name");
    }
    keys
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
