//! The certificate issued last for each agent name. `issue-agent` records it in
//! `DIR/tls/agents/NAME.toml`, and the coordinator accepts an agent certificate only while it is
//! the recorded one: re-issuing a name revokes every earlier certificate of that name.
//!
//! The record is read on every agent handshake and again every few seconds for each connected
//! agent (`server/session.rs`), so an `issue-agent` run as a separate process takes effect on a
//! running coordinator within seconds, and it holds across restarts. A name without a record
//! was issued before records existed: its certificates are accepted until the name is
//! re-issued. A record that cannot be read refuses the name (fail closed) until re-issued.
//!
//! ```toml
//! name = "db-01"
//! serial = "5f0c…"          # the certificate's serial, lowercase hex (for people and logs)
//! sha256 = "9a41…"          # SHA-256 of the certificate's DER: what a connection must match
//! issued_ms = 1718000000000
//! ```
//!
//! Readers ignore keys they do not know, so later fields (revocation without re-issue,
//! enrolment) can be added without breaking older records.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What `issue-agent` recorded about the certificate it issued last for an agent name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AgentRecord {
    /// The agent name (the file's stem; checked against it when read).
    pub(crate) name: String,
    /// The certificate's serial number, lowercase hex.
    pub(crate) serial: String,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub(crate) sha256: String,
    /// When it was issued (Unix ms).
    pub(crate) issued_ms: u64,
}

/// Why an agent certificate is not accepted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// The name was re-issued since this certificate.
    #[error(
        "certificate serial {presented} of agent {name} was replaced by serial {current} \
         (issued {issued}); only the newest certificate issued for a name is accepted"
    )]
    Replaced {
        name: String,
        presented: String,
        current: String,
        issued: String,
    },
    /// The record exists but cannot be read: refused until the name is re-issued.
    #[error("the certificate record of agent {name} ({path}) is unreadable: {reason}; re-issue the agent")]
    Unreadable {
        name: String,
        path: String,
        reason: String,
    },
}

/// Whether an agent's certificate is accepted, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// It is the certificate issued last for its name.
    Current,
    /// Its name has no record (issued before records existed): accepted until re-issued.
    Unrecorded,
}

/// `DIR/tls/agents/`.
pub(crate) fn records_dir(root: &Path) -> PathBuf {
    root.join("tls").join("agents")
}

/// `DIR/tls/agents/NAME.toml`.
pub(crate) fn record_path(root: &Path, name: &str) -> PathBuf {
    records_dir(root).join(format!("{name}.toml"))
}

/// SHA-256 of a certificate's DER, lowercase hex (as `openssl x509 -fingerprint -sha256`
/// prints it, without the colons).
pub(crate) fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

impl AgentRecord {
    /// The record of a certificate just issued for `name`.
    pub(crate) fn new(name: &str, der: &[u8], serial: &str, issued_ms: u64) -> Self {
        Self {
            name: name.to_owned(),
            serial: serial.to_owned(),
            sha256: fingerprint(der),
            issued_ms,
        }
    }

    /// The file's text.
    pub(crate) fn to_toml(&self) -> Result<String, toml::ser::Error> {
        Ok(format!(
            "# The certificate `fleetvault-coordinator issue-agent` issued last for agent {:?}:\n\
             # the coordinator accepts only this one for the name (re-issuing replaces it).\n{}",
            self.name,
            toml::to_string(self)?
        ))
    }

    /// The record of `name` under the data dir `root`; `Ok(None)` if there is none.
    pub(crate) fn read(root: &Path, name: &str) -> Result<Option<Self>, Refusal> {
        let path = record_path(root, name);
        let unreadable = |reason: String| Refusal::Unreadable {
            name: name.to_owned(),
            path: path.display().to_string(),
            reason,
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unreadable(e.to_string())),
        };
        let rec: Self = toml::from_str(&text).map_err(|e| unreadable(e.message().to_owned()))?;
        if rec.name != name {
            return Err(unreadable(format!("it names agent {:?}", rec.name)));
        }
        Ok(Some(rec))
    }
}

/// Whether the certificate `der` may connect as agent `name`, by the record in `root`.
pub(crate) fn check(root: &Path, name: &str, der: &[u8]) -> Result<Admission, Refusal> {
    let Some(rec) = AgentRecord::read(root, name)? else {
        return Ok(Admission::Unrecorded);
    };
    if fingerprint(der) == rec.sha256 {
        return Ok(Admission::Current);
    }
    Err(Refusal::Replaced {
        name: name.to_owned(),
        presented: fleetvault_certs::serial_hex_from_der(der)
            .unwrap_or_else(|_| "(unreadable)".into()),
        current: rec.serial,
        issued: format!(
            "{} UTC",
            fleetvault_common::report::format_time(rec.issued_ms)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_in(root: &Path, rec: &AgentRecord) {
        std::fs::create_dir_all(records_dir(root)).unwrap();
        std::fs::write(record_path(root, &rec.name), rec.to_toml().unwrap()).unwrap();
    }

    #[test]
    fn only_the_recorded_certificate_is_current() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (b"old certificate".as_slice(), b"new certificate".as_slice());
        assert_eq!(
            check(dir.path(), "db-01", old).unwrap(),
            Admission::Unrecorded
        );
        let rec = AgentRecord::new("db-01", new, "0a0b", 1_700_000_000_000);
        record_in(dir.path(), &rec);
        assert_eq!(AgentRecord::read(dir.path(), "db-01").unwrap(), Some(rec));
        assert_eq!(check(dir.path(), "db-01", new).unwrap(), Admission::Current);
        let refused = check(dir.path(), "db-01", old).unwrap_err().to_string();
        assert!(
            refused.contains("agent db-01") && refused.contains("serial 0a0b"),
            "{refused}"
        );
        // Another name is not affected.
        assert_eq!(
            check(dir.path(), "db-02", old).unwrap(),
            Admission::Unrecorded
        );
    }

    #[test]
    fn a_broken_or_misplaced_record_refuses_the_name() {
        let dir = tempfile::tempdir().unwrap();
        // db-02's record under db-01's name.
        let rec = AgentRecord::new("db-02", b"cert", "01", 0);
        std::fs::create_dir_all(records_dir(dir.path())).unwrap();
        std::fs::write(record_path(dir.path(), "db-01"), rec.to_toml().unwrap()).unwrap();
        let e = check(dir.path(), "db-01", b"cert").unwrap_err().to_string();
        assert!(e.contains("unreadable") && e.contains("db-02"), "{e}");
        std::fs::write(record_path(dir.path(), "db-01"), "name = [").unwrap();
        assert!(matches!(
            check(dir.path(), "db-01", b"cert"),
            Err(Refusal::Unreadable { .. })
        ));
    }

    #[test]
    fn unknown_keys_are_ignored_for_later_fields() {
        let dir = tempfile::tempdir().unwrap();
        let rec = AgentRecord::new("db-01", b"cert", "01", 5);
        std::fs::create_dir_all(records_dir(dir.path())).unwrap();
        let text = format!("{}enrolled_by = \"admin\"\n", rec.to_toml().unwrap());
        std::fs::write(record_path(dir.path(), "db-01"), text).unwrap();
        assert_eq!(AgentRecord::read(dir.path(), "db-01").unwrap(), Some(rec));
    }
}
