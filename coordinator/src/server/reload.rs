//! SIGHUP re-reads `coordinator.toml` while the daemon runs (SIGINT and SIGTERM stop it:
//! `fleetvault_common::cli::shutdown_signal`).

use std::sync::Arc;

use tracing::info;

use crate::config::{CoordinatorConfig, DataDir};
use crate::State;

/// Re-reads `coordinator.toml` on SIGHUP. A valid file takes effect at once, all of it but the
/// keys `started` was bound with (named in the log line); an invalid one is reported in one
/// line (file, line, key) and the previous configuration stays in force, all of it.
pub(super) async fn reload_on_sighup(
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
