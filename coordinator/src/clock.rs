//! The one place that reads wall time: snapshot stamps and ids come from here, never from
//! what an agent sends.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
#[allow(clippy::disallowed_methods)] // this module is where wall time is allowed
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Now, as a `SystemTime` (file modification times are compared against it).
#[allow(clippy::disallowed_methods)] // this module is where wall time is allowed
pub(crate) fn now_system() -> SystemTime {
    SystemTime::now()
}

/// Now, for schedules (UTC).
pub(crate) fn now_utc() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(now_ms() as i64).unwrap_or_default()
}
