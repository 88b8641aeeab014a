//! Sources that are not databases (those are in `db`): file trees ([`files`]), walked into a
//! tree of streams. A `command` source runs through `process::ShellCommand`.
//!
//! May import `config` and `pipe`.

pub(crate) mod files;
