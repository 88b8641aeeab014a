//! Sinks: where restored bytes go. A stream goes to a command's stdin, a file or stdout; a
//! file tree is recreated under a target directory; a database dump is loaded by its own
//! tools (`postgres`, `mysql`, `sqlite`, `mongodb`).

pub(crate) mod database;
pub(crate) mod direct;
pub(crate) mod durable;
pub(crate) mod files;
pub(crate) mod mongodb;
pub(crate) mod mysql;
pub(crate) mod postgres;
pub(crate) mod restricted;
pub(crate) mod sqlite;
