//! Who a certificate speaks for: a [`Role`] and a name, carried in one URI SAN.
//!
//! Every certificate the fleet CA issues holds exactly one URI subject alternative name of the
//! form `fleetvault://ROLE/NAME` (see [`crate::Ca::issue`]). The coordinator reads it here after
//! the TLS layer has verified the chain: this module parses, it does not verify. The common name
//! is for humans only and is never read. Names are restricted to a small character set
//! ([`validate_name`]) so that they are safe as file names, log fields and catalog keys.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;

use crate::CertError;

/// Scheme and separator that start every identity URI.
pub(crate) const URI_PREFIX: &str = "fleetvault://";

/// Longest accepted name, in bytes (all allowed characters are ASCII).
const MAX_NAME_LEN: usize = 64;

/// What a certificate holder may do in the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The coordinator: accepts connections, stores chunks, keeps the catalog.
    Coordinator,
    /// A machine being backed up.
    Agent,
    /// A human or script administering the coordinator.
    Operator,
    /// Another coordinator (replication); may both dial and accept.
    Peer,
}

impl Role {
    /// The lowercase name used in URIs and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Peer => "peer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "coordinator" => Ok(Role::Coordinator),
            "agent" => Ok(Role::Agent),
            "operator" => Ok(Role::Operator),
            "peer" => Ok(Role::Peer),
            other => Err(CertError::UnknownRole(other.to_owned())),
        }
    }
}

/// A role and a validated name, displayed as `agent/db-01`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// What the holder may do.
    pub role: Role,
    /// The holder's name, valid per [`validate_name`].
    pub name: String,
}

impl Identity {
    /// The URI SAN that carries this identity: `fleetvault://agent/db-01`.
    pub(crate) fn uri(&self) -> String {
        format!("{URI_PREFIX}{}/{}", self.role, self.name)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// Checks a name: 1 to 64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
///
/// This keeps names usable as path components (no `/`, no `..`), as command-line arguments
/// (no leading `-`) and inside the identity URI without escaping.
pub fn validate_name(name: &str) -> Result<(), CertError> {
    let invalid = |reason: &'static str| CertError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("it is longer than 64 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            "only letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(invalid("it must not start with '.' or '-'"));
    }
    Ok(())
}

/// Parses `fleetvault://ROLE/NAME`.
fn identity_from_uri(uri: &str) -> Result<Identity, CertError> {
    let bad = || CertError::BadIdentityUri(uri.to_owned());
    let rest = uri.strip_prefix(URI_PREFIX).ok_or_else(bad)?;
    let (role, name) = rest.split_once('/').ok_or_else(bad)?;
    let role = role.parse::<Role>().map_err(|_| bad())?;
    validate_name(name)?;
    Ok(Identity {
        role,
        name: name.to_owned(),
    })
}

/// Reads role and name from a DER certificate that the TLS layer has already verified.
///
/// The certificate must carry exactly one URI SAN, of the form `fleetvault://ROLE/NAME` with a
/// name accepted by [`validate_name`]; anything else (no SAN extension, no URI, several URIs,
/// another scheme, an unknown role) is an error. This does not check signatures, dates or the
/// issuer: call it only on a certificate chain the TLS layer accepted.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse(e.to_string()))?;
    // `subject_alternative_name` errs when the extension appears more than once.
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Parse(e.to_string()))?
        .ok_or(CertError::NoIdentity)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(CertError::NoIdentity),
        [uri] => identity_from_uri(uri),
        several => Err(CertError::SeveralIdentities(several.len())),
    }
}

/// The serial number of a DER certificate as lowercase hex (the form [`crate::IssuedCert`]
/// records), for looking a presented certificate up in a revocation list.
pub fn serial_hex_from_der(der: &[u8]) -> Result<String, CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse(e.to_string()))?;
    Ok(crate::to_hex(cert.raw_serial()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests panic on failure by design
mod tests {
    use super::*;

    #[test]
    fn role_round_trips_through_its_name() {
        for role in [Role::Coordinator, Role::Agent, Role::Operator, Role::Peer] {
            assert_eq!(role.to_string().parse::<Role>().unwrap(), role);
        }
        assert!("Agent".parse::<Role>().is_err());
        assert!("".parse::<Role>().is_err());
    }

    #[test]
    fn identity_displays_as_role_slash_name() {
        let id = Identity {
            role: Role::Agent,
            name: "db-01".into(),
        };
        assert_eq!(id.to_string(), "agent/db-01");
        assert_eq!(id.uri(), "fleetvault://agent/db-01");
    }

    #[test]
    fn names_are_restricted() {
        for ok in ["a", "db-01", "web_2.example.com", "A9", &"x".repeat(64)] {
            validate_name(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            "",
            "../x",
            "..",
            ".hidden",
            "-rf",
            "a/b",
            "a b",
            "a\\b",
            "é",
            "a\0",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn uris_are_parsed_strictly() {
        let id = identity_from_uri("fleetvault://operator/admin").unwrap();
        assert_eq!(id.role, Role::Operator);
        assert_eq!(id.name, "admin");
        for bad in [
            "fleetvault://agent/",
            "fleetvault://agent",
            "fleetvault://agent/a/b",
            "fleetvault://agent/../x",
            "fleetvault://root/x",
            "FLEETVAULT://agent/x",
            "https://agent/x",
            "fleetvault:agent/x",
        ] {
            assert!(identity_from_uri(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            identity_from_der(b"not a certificate"),
            Err(CertError::Parse(_))
        ));
    }
}
