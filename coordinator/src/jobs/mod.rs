//! Fleet jobs: what runs on a schedule (`[[jobs]]` in `coordinator.toml`) and the policies
//! applied after each run.
//!
//! ```toml
//! [[jobs]]
//! name = "nightly"
//! agents = ["chat-*"]      # names or globs
//! sources = ["*"]          # names or globs
//! schedule = "0 2 * * *"   # cron: 5 fields, or 6 with seconds first (UTC)
//! [jobs.retention]
//! keep_daily = 7
//! ```
//!
//! `scheduler` starts them (and gc, verify); `run` runs one; `snapshots` forgets, deletes and
//! protects recorded snapshots; `retention` decides what a policy keeps; `gc`, `verify` and
//! `prune` work on the store.

pub(crate) mod gc;
pub(crate) mod prune;
pub(crate) mod retention;
pub(crate) mod run;
pub(crate) mod scheduler;
pub(crate) mod snapshots;
pub(crate) mod verify;

pub(crate) use crate::config::{next_due, parse_schedule};
