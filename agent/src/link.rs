//! The long-lived link (`fleetvault-agent run`): one connection to the coordinator,
//! re-established with backoff after a restart or a network cut; reports the agent's sources
//! and runs the backups and restores the coordinator pushes, one task each, reporting
//! progress and the result on the push's stream.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleetvault_common::protocol::frame::{read_frame, write_frame};
use fleetvault_common::protocol::{Push, PushReply, Request, Response};
use fleetvault_common::{Client, JobReport, SnapshotId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::config::{AgentConfig, SourceKind};
use crate::restore::Target;

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
        match client
            .call(&Request::Register {
                sources: config.source_infos(),
            })
            .await
        {
            Ok(Response::Ok) => {}
            Ok(other) => warn!(reply = ?other, "unexpected reply to Register"),
            Err(e) => {
                warn!(error = %e, "registering with the coordinator failed");
                continue;
            }
        }
        backoff = Duration::from_millis(500);
        info!(address = %config.coordinator.address, identity = client.identity(), "connected to coordinator");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
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
                let source = config.source(source)?;
                crate::backup::run(client.clone(), source, job.clone(), progress).await
            }
            Push::Restore { snapshot, target } => {
                let target = pushed_target(&client, &config, *snapshot, target.clone()).await?;
                crate::restore::run(client.clone(), *snapshot, target, progress).await
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
                    Push::Backup { .. } => String::new(),
                },
                source: match &push {
                    Push::Backup { source, .. } => source.clone(),
                    Push::Restore { .. } => String::new(),
                },
                agent: client.identity().trim_start_matches("agent/").to_owned(),
                ..JobReport::default()
            }
        }
    };
    let _ = write_frame(&mut send, &PushReply::Done(report)).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
}

/// Where a pushed restore goes: a directory for a files snapshot; for a stream snapshot the
/// restore command of this agent's source of the same name, or a new file at `target`.
async fn pushed_target(
    client: &Client,
    config: &AgentConfig,
    snapshot: SnapshotId,
    target: Option<String>,
) -> anyhow::Result<Target> {
    if let Some(t) = target {
        anyhow::ensure!(
            t != "-",
            "a pushed restore cannot write to the agent's stdout"
        );
        return Ok(Target::Path(t.into()));
    }
    let list = match client
        .call(&Request::ListSnapshots(Default::default()))
        .await?
    {
        Response::Snapshots(l) => l,
        other => anyhow::bail!("unexpected reply {other:?}"),
    };
    let source_name = list
        .iter()
        .find(|r| r.id == snapshot)
        .map(|r| r.source.clone())
        .context("no --target given, and the snapshot is not one of this agent's")?;
    match &config.source(&source_name)?.kind {
        SourceKind::Command {
            restore_command: Some(cmd),
            ..
        } => Ok(Target::Command(cmd.clone())),
        _ => anyhow::bail!("no --target given and source {source_name} has no restore_command"),
    }
}
