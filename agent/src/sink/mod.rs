//! Sinks: where restored bytes go. A stream goes to a command's stdin, a file or stdout; a
//! file tree is recreated under a target directory.

pub(crate) mod files;
