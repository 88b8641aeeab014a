//! The long-lived link (`fleetvault-agent run`): one connection to the coordinator,
//! re-established with backoff after a restart or a network cut; reports the agent's sources
//! and runs the backups and restores the coordinator pushes, one task each, reporting
//! progress and the result on the push's stream.

use std::sync::Arc;
use std::time::Duration;

use fleetvault_common::protocol::frame::{read_frame, write_frame};
use fleetvault_common::protocol::{Push, PushReply, RestoreOptions};
use fleetvault_common::{Client, JobReport, SnapshotId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::config::AgentConfig;

/// Runs until `shutdown` is cancelled.
pub(crate) async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let creds = config.credentials()?;
    let mut backoff = Duration::from_millis(500);
    let tracker = TaskTracker::new();
    while !shutdown.is_cancelled() {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = crate::connect(&config, &creds) => c,
        };
        let client = match connected {
            Ok(c) => Arc::new(c),
            Err(e) => {
                warn!(error = %format!("{e:#}"), retry_in = ?backoff, "cannot reach the coordinator");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        match client.register(config.source_infos()).await {
            Ok(()) => {}
            Err(e @ fleetvault_common::ClientError::Unexpected { .. }) => {
                warn!(error = %e, "registering with the coordinator")
            }
            Err(e) => {
                warn!(error = %e, "registering with the coordinator failed");
                continue;
            }
        }
        backoff = Duration::from_millis(500);
        info!(address = %config.coordinator.address, identity = client.identity(), "connected to coordinator");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => {
                    // Tell the coordinator now, not after its idle timeout.
                    tracker.close();
                    let _ = tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await;
                    client.shutdown().await;
                    break;
                }
                a = client.connection().accept_bi() => a,
            };
            match accepted {
                Ok((send, recv)) => {
                    let (client, config) = (client.clone(), config.clone());
                    tracker.spawn(
                        async move { serve_push(client, config, send, recv).await }
                            .in_current_span(),
                    );
                }
                Err(e) => {
                    warn!(reason = %fleetvault_common::describe_connection_error(&e), "link to coordinator lost; reconnecting");
                    break;
                }
            }
        }
    }
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(30), tracker.wait())
        .await
        .is_err()
    {
        warn!(
            jobs = tracker.len(),
            "jobs still running at shutdown; dropping them"
        );
    }
    Ok(())
}

async fn serve_push(
    client: Arc<Client>,
    config: AgentConfig,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let push: Push = match read_frame(&mut recv).await {
        Ok(Some(p)) => p,
        Ok(None) => return,
        Err(e) => {
            warn!(error = %e, "malformed push from coordinator");
            return;
        }
    };
    let (ptx, mut prx) = mpsc::channel(4);
    let progress = move |p| {
        let _ = ptx.try_send(p);
    };
    let work = async {
        match &push {
            Push::Backup { source, job } => {
                if let Some(bundle) = config.bundle(source) {
                    let outcome = crate::bundle::backup(
                        client.clone(),
                        &config,
                        bundle,
                        job.clone(),
                        std::sync::Arc::new(progress),
                    )
                    .await;
                    return match (outcome.committed, outcome.error) {
                        (Some(r), None) => Ok(r),
                        (_, Some(e)) => Err(anyhow::Error::msg(e)),
                        (None, None) => Err(anyhow::anyhow!("bundle {source} was not recorded")),
                    };
                }
                let source = config.source(source)?;
                crate::backup::run(client.clone(), source, job.clone(), progress).await
            }
            Push::Restore { snapshot, options } => {
                pushed_restore(&client, &config, *snapshot, options, progress).await
            }
        }
    };
    tokio::pin!(work);
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            Some(p) = prx.recv() => {
                let _ = write_frame(&mut send, &PushReply::Progress(p)).await;
            }
        }
    };
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "pushed job failed");
            JobReport {
                status: "failed".into(),
                error: Some(format!("{e:#}")),
                snapshot_id: match &push {
                    Push::Restore { snapshot, .. } => snapshot.to_string(),
                    Push::Backup { .. } => {
                        fleetvault_common::exit::find::<fleetvault_common::exit::FailedRecord>(&e)
                            .map(|f| f.snapshot_id.clone())
                            .unwrap_or_default()
                    }
                },
                source: match &push {
                    Push::Backup { source, .. } => source.clone(),
                    Push::Restore { options, .. } => options.source.clone().unwrap_or_default(),
                },
                agent: client
                    .agent_name()
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
                ..JobReport::default()
            }
        }
    };
    let _ = write_frame(&mut send, &PushReply::Done(report)).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
}

/// A pushed restore: into this agent's source of the snapshot's name (or `options.source`),
/// or to a path on this host; never to the agent's stdout.
async fn pushed_restore(
    client: &Arc<Client>,
    config: &AgentConfig,
    snapshot: SnapshotId,
    options: &RestoreOptions,
    progress: impl Fn(fleetvault_common::protocol::Progress) + Send + Sync + 'static,
) -> anyhow::Result<JobReport> {
    anyhow::ensure!(
        options.target.as_deref() != Some("-"),
        "a pushed restore cannot write to the agent's stdout"
    );
    crate::restore::run_into(client.clone(), config, snapshot, options, progress).await
}
