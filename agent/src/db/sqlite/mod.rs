//! SQLite: its dump ([`dump`]) and its restore ([`restore`]) of a database file.
//!
//! May import `config`, `pipe`, `process` and `db`.

pub(crate) mod dump;
pub(crate) mod restore;

const PACKAGE: &str = "the SQLite shell (Debian: sqlite3)";
