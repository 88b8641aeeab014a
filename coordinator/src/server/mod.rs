//! The coordinator's QUIC server: accepts connections, runs one [`session`] per peer, and
//! shuts down in reverse start order.
//!
//! Shutdown: stop accepting; cancel sessions (each ends its unfinished backups `failed`);
//! wait for their tasks under a deadline; close the endpoint and wait until peers were told;
//! flush the catalog.

mod replica;
mod restore;
mod session;
mod upload;

pub(crate) use session::Failure;
pub(crate) use upload::check_fields;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fleetvault_common::protocol::close;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::State;

/// Serves `endpoint` until `shutdown` resolves.
pub(crate) async fn run(
    endpoint: quinn::Endpoint,
    state: Arc<State>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                tracker.spawn(session::run(incoming, state.clone(), token.child_token()));
            }
        }
    }
    info!("shutting down");
    token.cancel();
    endpoint.close(close::SHUTTING_DOWN.into(), b"coordinator shutting down");
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(20), tracker.wait())
        .await
        .is_err()
    {
        warn!(
            tasks = tracker.len(),
            "sessions still running after the shutdown deadline; dropping them"
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    state.catalog.flush()?;
    info!("stopped");
    Ok(())
}
