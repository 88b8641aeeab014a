//! Sources: where backup bytes come from. Each yields one byte stream (`command`, most
//! databases) or a tree of streams (`files`, PostgreSQL's `tables` format).

pub(crate) mod command;
pub(crate) mod database;
pub(crate) mod files;
pub(crate) mod mongodb;
pub(crate) mod mysql;
pub(crate) mod postgres;
pub(crate) mod sqlite;
