//! Sinks that are not databases (those are in `db`): a file tree recreated under a target
//! directory ([`files`]), written directly ([`direct`]) and synced in the background
//! ([`durable`], which also names a stream restored into a file only when it is whole).
//!
//! May import `config` and `pipe`.

pub(crate) mod direct;
pub(crate) mod durable;
pub(crate) mod files;
