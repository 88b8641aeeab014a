//! Identifiers: chunk ids (BLAKE3 of the plaintext), snapshot ids and agent names.
//!
//! Each is its own type so that a snapshot id cannot be passed where a chunk id goes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The BLAKE3 hash of a chunk's plaintext: the chunk's name everywhere (store, wire, manifest).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Hashes `plaintext` into its chunk id.
    pub fn of(plaintext: &[u8]) -> Self {
        Self(*blake3::hash(plaintext).as_bytes())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

/// A text form that is not a valid id.
#[derive(Debug, thiserror::Error)]
#[error("invalid {what} {text:?}: expected {expected}")]
pub struct ParseIdError {
    what: &'static str,
    text: String,
    expected: &'static str,
}

impl FromStr for ChunkId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseIdError {
            what: "chunk id",
            text: s.to_owned(),
            expected: "64 hex digits",
        })?;
        Ok(Self(out))
    }
}

/// A snapshot's id, allocated by the coordinator; shown as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotId(pub u64);

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

impl FromStr for SnapshotId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseIdError {
            what: "snapshot id",
            text: s.to_owned(),
            expected: "16 hex digits",
        };
        if s.len() != 16 {
            return Err(err());
        }
        u64::from_str_radix(s, 16).map(Self).map_err(|_| err())
    }
}

impl Serialize for AgentName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for AgentName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A validated agent (host) name: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
/// The client parses its own once, from the identity the coordinator names in the hello
/// ([`crate::Client::agent_name`]); the coordinator reads peers' names from their
/// certificates (`fleetvault_certs::Identity`).
///
/// The same rule is applied to names in certificates (see `fleetvault-certs`), so a name read
/// from a verified certificate can be used in paths and keys without escaping.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentName(String);

impl AgentName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl FromStr for AgentName {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if fleetvault_certs::validate_name(s).is_err() {
            return Err(ParseIdError {
                what: "agent name",
                text: s.to_owned(),
                expected: "1-64 characters of A-Z a-z 0-9 . _ -, not starting with . or -",
            });
        }
        Ok(Self(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let id = ChunkId::of(b"hello");
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
        let s = SnapshotId(0x1234);
        assert_eq!(s.to_string(), "0000000000001234");
        assert_eq!(s.to_string().parse::<SnapshotId>().unwrap(), s);
        assert!("xyz".parse::<SnapshotId>().is_err());
        assert!("../etc".parse::<AgentName>().is_err());
        assert!("db-01".parse::<AgentName>().is_ok());
    }
}
