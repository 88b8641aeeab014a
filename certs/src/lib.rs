//! The fleet's certificates: one CA, leaf certificates that name a role and a name, and the
//! reader that turns a verified peer certificate back into an [`Identity`].
//!
//! The flow: `fleetvault-coordinator init` creates the fleet CA ([`Ca::create`]) and issues the
//! coordinator's and the first operator's certificates; `issue-agent` reloads the CA
//! ([`Ca::load`]) and issues one certificate per agent ([`Ca::issue`]). At connection time the
//! TLS layer verifies the chain against the CA and `transport` calls [`identity_from_der`] on the
//! peer's leaf to learn who it is talking to.
//!
//! Invariants kept here:
//! - every leaf carries exactly one `fleetvault://ROLE/NAME` URI SAN and an explicit extended key
//!   usage (webpki accepts a leaf *without* EKU for any purpose, so an EKU is always set);
//! - serial numbers are random (never derived from the key), so re-issuing never repeats one;
//! - names are checked by [`validate_name`] both when issuing and when reading.
//!
//! Errors: every fallible function returns [`CertError`]; nothing here panics.

mod ca;
mod identity;
mod issue;

pub use ca::Ca;
pub use identity::{identity_from_der, serial_hex_from_der, validate_name, Identity, Role};
pub use issue::IssuedCert;

/// Why creating, loading, issuing or reading a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A name does not satisfy [`validate_name`].
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The refused name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A role string is not one of the four roles.
    #[error("unknown role {0:?} (expected coordinator, agent, operator or peer)")]
    UnknownRole(String),
    /// An extra subject alternative name cannot be encoded.
    #[error("invalid subject alternative name {0:?}")]
    InvalidSan(String),
    /// The CA's common name is empty.
    #[error("the ca common name is empty")]
    EmptyCommonName,
    /// The operating system's random generator failed.
    #[error("generating random bytes: {0}")]
    Random(String),
    /// rcgen failed to generate a key or sign a certificate.
    #[error("{what}")]
    Generate {
        /// What was being generated.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// The CA certificate PEM could not be read.
    #[error("reading the ca certificate: {0}")]
    CaCert(String),
    /// The CA key PEM could not be read.
    #[error("reading the ca key")]
    CaKey(#[source] rcgen::Error),
    /// The CA certificate is not a CA (no `CA:TRUE` basic constraint).
    #[error("the ca certificate is not a certificate authority (no CA:TRUE basic constraint)")]
    NotACa,
    /// The CA key does not belong to the CA certificate.
    #[error("the ca key does not match the ca certificate")]
    CaKeyMismatch,
    /// A DER certificate could not be parsed.
    #[error("parsing the certificate: {0}")]
    Parse(String),
    /// The certificate carries no URI SAN.
    #[error("the certificate carries no fleetvault:// identity (no uri subject alternative name)")]
    NoIdentity,
    /// The certificate carries more than one URI SAN.
    #[error("the certificate carries {0} uri subject alternative names, expected exactly one")]
    SeveralIdentities(usize),
    /// The URI SAN is not `fleetvault://ROLE/NAME` with a known role.
    #[error("the certificate identity {0:?} is not of the form fleetvault://ROLE/NAME")]
    BadIdentityUri(String),
}

/// Lowercase hex without separators.
fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}
