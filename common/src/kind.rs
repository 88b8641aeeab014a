//! The kind of a snapshot, encoded as the string every version stores and sends.

use serde::{Deserialize, Serialize};

/// What a snapshot holds: its source's kind, or a bundle of other snapshots. Serialized as
/// its name (`files`, `command`, `postgres`, …) in JSON, on the wire and on disk, as the
/// plain string it was before; a name this version does not know is kept as `Other`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum SnapshotKind {
    /// A file tree.
    Files,
    /// A command's output stream.
    Command,
    /// A PostgreSQL dump.
    Postgres,
    /// A MySQL or MariaDB dump.
    Mysql,
    /// An SQLite database.
    Sqlite,
    /// A MongoDB dump.
    Mongodb,
    /// A bundle: an index naming one snapshot per part.
    Bundle,
    /// A kind this version does not know, kept as sent.
    Other(String),
}

impl SnapshotKind {
    /// The name, as stored and sent.
    pub fn as_str(&self) -> &str {
        match self {
            SnapshotKind::Files => "files",
            SnapshotKind::Command => "command",
            SnapshotKind::Postgres => "postgres",
            SnapshotKind::Mysql => "mysql",
            SnapshotKind::Sqlite => "sqlite",
            SnapshotKind::Mongodb => "mongodb",
            SnapshotKind::Bundle => "bundle",
            SnapshotKind::Other(s) => s,
        }
    }
}

impl From<&str> for SnapshotKind {
    fn from(s: &str) -> Self {
        match s {
            "files" => SnapshotKind::Files,
            "command" => SnapshotKind::Command,
            "postgres" => SnapshotKind::Postgres,
            "mysql" => SnapshotKind::Mysql,
            "sqlite" => SnapshotKind::Sqlite,
            "mongodb" => SnapshotKind::Mongodb,
            "bundle" => SnapshotKind::Bundle,
            other => SnapshotKind::Other(other.to_owned()),
        }
    }
}

impl From<String> for SnapshotKind {
    fn from(s: String) -> Self {
        match SnapshotKind::from(s.as_str()) {
            SnapshotKind::Other(_) => SnapshotKind::Other(s),
            known => known,
        }
    }
}

impl From<SnapshotKind> for String {
    fn from(k: SnapshotKind) -> Self {
        match k {
            SnapshotKind::Other(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_as_the_plain_string_it_was() {
        for name in [
            "files", "command", "postgres", "mysql", "sqlite", "mongodb", "bundle", "redis",
        ] {
            let kind = SnapshotKind::from(name);
            assert_eq!(kind.as_str(), name);
            assert_eq!(
                postcard::to_stdvec(&kind).unwrap(),
                postcard::to_stdvec(name).unwrap()
            );
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("{name:?}"));
            let back: SnapshotKind =
                postcard::from_bytes(&postcard::to_stdvec(name).unwrap()).unwrap();
            assert_eq!(back, kind);
        }
        assert_eq!(
            SnapshotKind::from("redis"),
            SnapshotKind::Other("redis".into())
        );
    }
}
