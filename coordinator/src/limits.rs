//! What one certificate may take of the coordinator: connections, buffered bytes, time, and
//! the size of what it sends. Every limit is far above what an honest agent of a large fleet
//! uses; a peer that reaches one is refused with a one-line reason and a warning naming its
//! identity, and everyone else is served meanwhile.
//!
//! Request streams per connection and the QUIC flow-control windows are set on the endpoint
//! (`fleetvault_common::transport`, `SERVER_*`); the rest is enforced here and by the session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections one identity (agent, operator or peer certificate) may hold at once. An agent
/// holds one `run` link and, now and then, a command-line backup or restore; an operator's
/// scripts a handful of commands at a time.
pub(crate) const MAX_CONNECTIONS_PER_IDENTITY: usize = 16;

/// Connections the coordinator serves at once, every identity together (a fleet of several
/// thousand hosts, each with its `run` link, stays well under it).
pub(crate) const MAX_CONNECTIONS: usize = 8192;

/// Time from an accepted connection to a complete hello.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest hello frame (a protocol version and a software name).
pub(crate) const MAX_HELLO_LEN: usize = 4 << 10;

/// Time from a request stream's first byte to its complete first frame (the request). A
/// client writes its request as soon as it opens the stream.
pub(crate) const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(20);

/// Largest first frame of a request stream. The largest honest requests are a `Missing` of
/// 8192 ids (about 270 KiB) and a `Commit` whose manifest root lists the manifest's chunks
/// (a 512 MiB manifest cut into 4 KiB chunks lists about 4.6 MiB).
pub(crate) const MAX_REQUEST_LEN: usize = 8 << 20;

/// Bytes of frames one identity may have the coordinator hold at once, all its connections
/// together: requests being read, chunk frames read and not yet written to the store. A
/// backup uploads four batches of at most 8 MiB at a time (a chunk may be 16 MiB), so several
/// backups of one agent run at full speed within it; past it, that identity's readers wait
/// (QUIC flow control then slows its sender), nobody else's.
pub(crate) const MAX_BUFFERED_PER_IDENTITY: usize = 256 << 20;

/// Bytes of frames every identity together may have the coordinator hold at once.
pub(crate) const MAX_BUFFERED: usize = 2 << 30;

// The largest encoded manifest or bundle index a commit may reference is
// `store::read::MAX_MANIFEST_LEN`, beside the read path that enforces it.

/// Default for `job_timeout_secs`: how long a job pushed to a live agent (a backup holding one
/// of the `max_concurrent_backups` slots, or a restore) may run before the coordinator
/// abandons it, frees the slot and reports the job failed.
pub(crate) const DEFAULT_JOB_TIMEOUT_SECS: u64 = 24 * 3600;

/// Longest `job_timeout_secs` accepted in `coordinator.toml` (30 days).
pub(crate) const MAX_JOB_TIMEOUT_SECS: u64 = 30 * 24 * 3600;

/// Longest source or job name, and longest snapshot kind, in bytes.
pub(crate) const MAX_NAME_LEN: usize = 128;

/// Most tags on one snapshot, and longest tag in bytes.
pub(crate) const MAX_TAGS: usize = 32;
/// See [`MAX_TAGS`].
pub(crate) const MAX_TAG_LEN: usize = 256;

/// Backups one connection may have in progress at once (begun, neither committed nor
/// aborted); an agent's `run` link runs at most one per backup slot.
pub(crate) const MAX_RUNNING_PER_CONNECTION: usize = 64;

/// Most sources one agent may register.
pub(crate) const MAX_SOURCES: usize = 1024;

/// Warnings kept on one snapshot record, and characters kept of each; the rest is summed up
/// in one last warning (a commit is never refused for its warnings).
pub(crate) const MAX_WARNINGS: usize = 100;
/// See [`MAX_WARNINGS`].
pub(crate) const MAX_WARNING_CHARS: usize = 1024;

/// Characters kept of a software version string (hello) and of an abort reason.
pub(crate) const MAX_SOFTWARE_CHARS: usize = 128;

/// Failed records retention keeps per agent and source, newest first (they say why backups
/// failed; older ones only fill the catalog).
pub(crate) const KEEP_FAILED_PER_SOURCE: usize = 10;

/// Failed records retention keeps per agent, all its sources together.
pub(crate) const KEEP_FAILED_PER_AGENT: usize = 100;

/// Buffered bytes are counted in KiB, so a semaphore's `u32` permits cover any frame.
const UNIT: usize = 1024;

/// Live connections and buffered bytes, per identity and in total.
pub(crate) struct Limits {
    connections: Mutex<HashMap<String, usize>>,
    total: Mutex<usize>,
    budgets: Mutex<HashMap<String, Arc<Semaphore>>>,
    global: Arc<Semaphore>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: Mutex::default(),
            total: Mutex::default(),
            budgets: Mutex::default(),
            global: Arc::new(Semaphore::new(MAX_BUFFERED / UNIT)),
        }
    }
}

/// One counted connection; uncounted when dropped.
pub(crate) struct ConnectionSlot {
    limits: Arc<Limits>,
    identity: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut conns = self.limits.connections.lock().expect("connections lock");
        if let Some(n) = conns.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                conns.remove(&self.identity);
                // Its budget is free again when no connection of it is left.
                self.limits
                    .budgets
                    .lock()
                    .expect("budgets lock")
                    .remove(&self.identity);
            }
        }
        *self.limits.total.lock().expect("total lock") -= 1;
    }
}

/// Buffered bytes held by one frame until it is dropped.
pub(crate) struct Buffered {
    _identity: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

impl Limits {
    /// Counts a new connection of `identity`, or says which limit refuses it.
    pub(crate) fn connect(self: &Arc<Self>, identity: &str) -> Result<ConnectionSlot, LimitError> {
        let mut total = self.total.lock().expect("total lock");
        if *total >= MAX_CONNECTIONS {
            return Err(LimitError::Connections);
        }
        let mut conns = self.connections.lock().expect("connections lock");
        let n = conns.entry(identity.to_owned()).or_default();
        if *n >= MAX_CONNECTIONS_PER_IDENTITY {
            return Err(LimitError::ConnectionsOf {
                identity: identity.to_owned(),
                open: *n,
            });
        }
        *n += 1;
        *total += 1;
        Ok(ConnectionSlot {
            limits: self.clone(),
            identity: identity.to_owned(),
        })
    }

    /// Waits until `identity` may buffer `bytes` more (within its own budget and the global
    /// one), and holds them until the returned value is dropped.
    pub(crate) async fn buffer(&self, identity: &str, bytes: usize) -> Buffered {
        let units = bytes.div_ceil(UNIT).max(1) as u32;
        let own = self
            .budgets
            .lock()
            .expect("budgets lock")
            .entry(identity.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_BUFFERED_PER_IDENTITY / UNIT)))
            .clone();
        // Its own budget first: an identity at its limit waits without holding global bytes.
        let own = own
            .acquire_many_owned(units)
            .await
            .expect("budgets are never closed");
        let global = self
            .global
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("the global budget is never closed");
        Buffered {
            _identity: own,
            _global: global,
        }
    }

    /// Whether `identity` could buffer `bytes` more right now without waiting.
    pub(crate) fn try_buffer(&self, identity: &str, bytes: usize) -> Option<Buffered> {
        let units = bytes.div_ceil(UNIT).max(1) as u32;
        let own = self
            .budgets
            .lock()
            .expect("budgets lock")
            .entry(identity.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_BUFFERED_PER_IDENTITY / UNIT)))
            .clone();
        let own = own.try_acquire_many_owned(units).ok()?;
        let global = self.global.clone().try_acquire_many_owned(units).ok()?;
        Some(Buffered {
            _identity: own,
            _global: global,
        })
    }
}

/// The `max_concurrent_backups` slots: one semaphore, resized on reload without touching the
/// permits running backups hold. Raising adds permits at once; lowering forgets the free ones
/// and takes the rest as running backups give theirs back, queued ahead of any backup that asks
/// after the reload (the semaphore is fair).
pub(crate) struct BackupSlots {
    sem: Arc<Semaphore>,
    sizing: Arc<Mutex<Sizing>>,
}

struct Sizing {
    /// Permits in existence: free, held by backups, or being taken back.
    size: usize,
    /// Bumped by every resize; a shrink task of an older one gives back what it took.
    generation: u64,
    shrinking: Option<tokio::task::JoinHandle<()>>,
}

impl BackupSlots {
    pub(crate) fn new(size: usize) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(size)),
            sizing: Arc::new(Mutex::new(Sizing {
                size,
                generation: 0,
                shrinking: None,
            })),
        }
    }

    /// The semaphore backups take a slot of.
    pub(crate) fn semaphore(&self) -> &Arc<Semaphore> {
        &self.sem
    }

    /// Makes the limit `limit`. Lowering it needs a tokio runtime to take back the permits
    /// still held; without one only the free permits are taken back.
    pub(crate) fn resize(&self, limit: usize) {
        let mut s = self.sizing.lock().expect("slot sizing lock");
        s.generation += 1;
        if let Some(task) = s.shrinking.take() {
            // Permits it acquired part of go back to the semaphore when it is dropped.
            task.abort();
        }
        if limit >= s.size {
            self.sem.add_permits(limit - s.size);
            s.size = limit;
            return;
        }
        let forgotten = self.sem.forget_permits(s.size - limit);
        s.size -= forgotten;
        let owed = s.size - limit;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if owed == 0 {
            return;
        }
        let (sem, sizing, generation) = (self.sem.clone(), self.sizing.clone(), s.generation);
        let owed32 = u32::try_from(owed).unwrap_or(u32::MAX);
        s.shrinking = Some(runtime.spawn(async move {
            let Ok(permits) = sem.acquire_many_owned(owed32).await else {
                return;
            };
            let mut s = sizing.lock().expect("slot sizing lock");
            if s.generation == generation {
                permits.forget();
                s.size -= owed32 as usize;
                s.shrinking = None;
            }
        }));
    }

    /// The limit in force once running backups above it have ended.
    #[cfg(test)]
    fn size(&self) -> usize {
        self.sizing.lock().expect("slot sizing lock").size
    }
}

/// A connection or request over one of the limits; the message says which and by how much.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LimitError {
    /// The coordinator serves [`MAX_CONNECTIONS`] connections.
    #[error("the coordinator serves {MAX_CONNECTIONS} connections already (limit)")]
    Connections,
    /// `identity` has [`MAX_CONNECTIONS_PER_IDENTITY`] connections open.
    #[error(
        "too many connections for {identity}: {open} open, the limit is {MAX_CONNECTIONS_PER_IDENTITY}"
    )]
    ConnectionsOf { identity: String, open: usize },
    /// `job_timeout_secs` out of range.
    #[error("key `job_timeout_secs`: {0} is not between 1 and {MAX_JOB_TIMEOUT_SECS} seconds")]
    JobTimeout(u64),
    /// A required name is empty.
    #[error("{what} is empty")]
    EmptyName { what: &'static str },
    /// A name over [`MAX_NAME_LEN`] bytes.
    #[error("{what} of {len} bytes is too long (limit {MAX_NAME_LEN})")]
    LongName { what: &'static str, len: usize },
    /// A name holding a control character.
    #[error("{what} {value:?} holds a control character")]
    ControlInName { what: &'static str, value: String },
    /// More than [`MAX_TAGS`] tags.
    #[error("{0} tags on one snapshot, the limit is {MAX_TAGS}")]
    Tags(usize),
    /// A tag over [`MAX_TAG_LEN`] bytes.
    #[error("a tag of {0} bytes is too long (limit {MAX_TAG_LEN})")]
    LongTag(usize),
    /// More than [`MAX_SOURCES`] sources.
    #[error("{0} sources registered, the limit is {MAX_SOURCES}")]
    Sources(usize),
    /// [`MAX_RUNNING_PER_CONNECTION`] backups in progress on one connection.
    #[error(
        "{0} backups in progress on this connection, the limit is {MAX_RUNNING_PER_CONNECTION}"
    )]
    Running(usize),
}

/// Checks `job_timeout_secs` from `coordinator.toml`.
pub(crate) fn validate_job_timeout(secs: u64) -> Result<(), LimitError> {
    if secs == 0 || secs > MAX_JOB_TIMEOUT_SECS {
        return Err(LimitError::JobTimeout(secs));
    }
    Ok(())
}

/// Refuses a name (source, job, kind) that is empty when `required`, too long, or holds a
/// control character; `what` names it in the error.
pub(crate) fn check_name(
    what: &'static str,
    value: &str,
    required: bool,
) -> Result<(), LimitError> {
    if required && value.is_empty() {
        return Err(LimitError::EmptyName { what });
    }
    if value.len() > MAX_NAME_LEN {
        return Err(LimitError::LongName {
            what,
            len: value.len(),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(LimitError::ControlInName {
            what,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// Refuses more than [`MAX_TAGS`] tags or a tag over [`MAX_TAG_LEN`] bytes.
pub(crate) fn check_tags(tags: &[String]) -> Result<(), LimitError> {
    if tags.len() > MAX_TAGS {
        return Err(LimitError::Tags(tags.len()));
    }
    if let Some(t) = tags.iter().find(|t| t.len() > MAX_TAG_LEN) {
        return Err(LimitError::LongTag(t.len()));
    }
    Ok(())
}

/// Refuses more than [`MAX_SOURCES`] sources, or a source whose name or kind is empty, too
/// long or holds a control character.
pub(crate) fn check_sources(
    sources: &[fleetvault_common::protocol::SourceInfo],
) -> Result<(), LimitError> {
    if sources.len() > MAX_SOURCES {
        return Err(LimitError::Sources(sources.len()));
    }
    for s in sources {
        check_name("source name", &s.name, true)?;
        check_name("source kind", &s.kind, true)?;
    }
    Ok(())
}

/// Keeps at most [`MAX_WARNINGS`] warnings of at most [`MAX_WARNING_CHARS`] characters each,
/// and says in a last one how many were dropped.
pub(crate) fn clip_warnings(mut warnings: Vec<String>) -> Vec<String> {
    let dropped = warnings.len().saturating_sub(MAX_WARNINGS);
    warnings.truncate(MAX_WARNINGS);
    for w in &mut warnings {
        if w.chars().count() > MAX_WARNING_CHARS {
            *w = w.chars().take(MAX_WARNING_CHARS).collect::<String>() + "…";
        }
    }
    if dropped > 0 {
        warnings.push(format!("… and {dropped} more warnings (not kept)"));
    }
    warnings
}

/// The first `n` characters of `s`.
pub(crate) fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_slots_resize_without_losing_held_permits() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let slots = BackupSlots::new(4);
            let sem = slots.semaphore().clone();
            let a = sem.clone().acquire_owned().await.unwrap();
            let b = sem.clone().acquire_owned().await.unwrap();
            let c = sem.clone().acquire_owned().await.unwrap();
            // Down to 1 while 3 run: the free one goes at once, two more as backups end.
            slots.resize(1);
            assert_eq!(sem.available_permits(), 0);
            tokio::task::yield_now().await;
            // A backup asking after the reload waits behind what is owed.
            let mut late = Box::pin(sem.clone().acquire_owned());
            assert!(poll_once(&mut late).is_none());
            drop(a);
            drop(b);
            tokio::task::yield_now().await;
            assert!(poll_once(&mut late).is_none(), "over the new limit");
            assert_eq!(slots.size(), 1);
            drop(c);
            let d = late.await.unwrap();
            assert_eq!(sem.available_permits(), 0);

            // Raised again while a shrink has taken part of what it is owed: that part
            // comes back.
            slots.resize(4);
            let e = sem.clone().acquire_owned().await.unwrap();
            let f = sem.clone().acquire_owned().await.unwrap();
            slots.resize(1);
            tokio::task::yield_now().await;
            drop(d);
            tokio::task::yield_now().await;
            slots.resize(3);
            tokio::task::yield_now().await;
            drop((e, f));
            tokio::task::yield_now().await;
            assert_eq!(slots.size(), 3);
            assert_eq!(sem.available_permits(), 3);
        });
    }

    /// Polls `f` once.
    fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[test]
    fn connections_are_limited_per_identity_and_freed_on_drop() {
        let limits = Arc::new(Limits::default());
        let held: Vec<_> = (0..MAX_CONNECTIONS_PER_IDENTITY)
            .map(|_| limits.connect("agent/a").unwrap())
            .collect();
        let err = limits.connect("agent/a").err().unwrap().to_string();
        assert!(err.contains("too many connections for agent/a"), "{err}");
        // Another identity is not affected.
        let other = limits.connect("agent/b").unwrap();
        drop(held);
        assert!(limits.connect("agent/a").is_ok());
        drop(other);
        assert_eq!(*limits.total.lock().unwrap(), 0);
    }

    #[test]
    fn an_identity_at_its_budget_waits_and_others_do_not() {
        let limits = Limits::default();
        let full = limits
            .try_buffer("agent/a", MAX_BUFFERED_PER_IDENTITY)
            .unwrap();
        assert!(limits.try_buffer("agent/a", 1).is_none());
        assert!(limits.try_buffer("agent/b", 16 << 20).is_some());
        drop(full);
        assert!(limits.try_buffer("agent/a", 1).is_some());
    }

    #[test]
    fn names_tags_and_warnings_are_bounded() {
        assert!(check_name("source", "db", true).is_ok());
        assert!(check_name("source", "", true).is_err());
        assert!(check_name("job", "", false).is_ok());
        assert!(check_name("kind", &"k".repeat(MAX_NAME_LEN + 1), true).is_err());
        assert!(check_name("kind", "a\nb", true).is_err());
        assert!(check_tags(&vec!["t".into(); MAX_TAGS]).is_ok());
        assert!(check_tags(&vec!["t".into(); MAX_TAGS + 1]).is_err());
        assert!(check_tags(&["x".repeat(MAX_TAG_LEN + 1)]).is_err());
        let w = clip_warnings(vec!["w".repeat(5000); MAX_WARNINGS + 7]);
        assert_eq!(w.len(), MAX_WARNINGS + 1);
        assert!(w[0].chars().count() <= MAX_WARNING_CHARS + 1);
        assert!(
            w[MAX_WARNINGS].contains("7 more warnings"),
            "{:?}",
            w.last()
        );
        assert!(validate_job_timeout(0).is_err());
        assert!(validate_job_timeout(60).is_ok());
        assert!(validate_job_timeout(MAX_JOB_TIMEOUT_SECS + 1).is_err());
    }
}
