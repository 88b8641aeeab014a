//! Issuing leaf certificates: one fresh P-256 key per certificate, the identity in a URI SAN,
//! an explicit extended key usage per role, a random serial.
//!
//! The extended key usage is what keeps roles apart at the TLS layer: only the coordinator and
//! peers get `serverAuth`, so an agent's or operator's certificate cannot pose as the
//! coordinator. Inside the fleet the application still checks the role on every request.

use std::net::IpAddr;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::ca::{random_serial, BACKDATE};
use crate::{to_hex, validate_name, Ca, CertError, Identity, Role};

/// How long a leaf certificate is valid (at most until the CA expires).
const LEAF_VALIDITY: Duration = Duration::days(5 * 365 + 1);

/// A freshly issued certificate and its key, in PEM form.
#[derive(Clone)]
pub struct IssuedCert {
    /// The leaf certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8); write it with mode 0600.
    pub key_pem: String,
    /// The serial number as lowercase hex, to record next to the identity for revocation.
    pub serial_hex: String,
}

impl std::fmt::Debug for IssuedCert {
    // Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial_hex", &self.serial_hex)
            .finish_non_exhaustive()
    }
}

/// The extended key usages a role's certificate carries.
fn extended_key_usages(role: Role) -> Vec<ExtendedKeyUsagePurpose> {
    match role {
        Role::Coordinator | Role::Peer => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Agent | Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
    }
}

impl Ca {
    /// Issues a leaf certificate with a fresh P-256 key.
    ///
    /// The certificate carries the URI SAN `fleetvault://<role>/<name>`, the common name
    /// `<name>`, a random 16-byte serial, `not_before` five minutes in the past and a validity of
    /// five years (cut to the CA's own expiry). Coordinator and peer certificates get the
    /// `serverAuth` and `clientAuth` extended key usages, agent and operator certificates
    /// `clientAuth` only. `dns_or_ip` are extra SANs: IP SANs for strings that parse as an IP
    /// address, DNS SANs otherwise; they are the server names a coordinator is dialled by.
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        dns_or_ip: &[String],
    ) -> Result<IssuedCert, CertError> {
        validate_name(name)?;
        let identity = Identity {
            role,
            name: name.to_owned(),
        };
        let uri = identity.uri();
        let mut sans = vec![SanType::URI(
            uri.as_str()
                .try_into()
                .map_err(|_| CertError::InvalidSan(uri.clone()))?,
        )];
        for extra in dns_or_ip {
            let san = match extra.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if is_dns_name(extra) => SanType::DnsName(
                    extra
                        .as_str()
                        .try_into()
                        .map_err(|_| CertError::InvalidSan(extra.clone()))?,
                ),
                Err(_) => return Err(CertError::InvalidSan(extra.clone())),
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }

        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = extended_key_usages(role);
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = (now + LEAF_VALIDITY).min(self.not_after);
        let serial = random_serial()?;
        let serial_hex = to_hex(serial.as_ref());
        params.serial_number = Some(serial);

        let key = KeyPair::generate().map_err(|source| CertError::Generate {
            what: format!("generating the key for {identity}"),
            source,
        })?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CertError::Generate {
                what: format!("signing the certificate for {identity}"),
                source,
            })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial_hex,
        })
    }
}

/// A DNS name as a certificate may carry it: dot-separated labels of letters, digits and `-`,
/// optionally a leading `*.` wildcard; no empty label, 253 characters at most.
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_prefix("*.").unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests panic on failure by design
mod tests {
    use super::*;
    use crate::identity_from_der;
    use rustls::pki_types::{ServerName, UnixTime};
    use std::sync::Arc;
    use x509_parser::extensions::GeneralName;

    fn der_of(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        pem.contents
    }

    #[test]
    fn create_load_issue_round_trip() {
        let created = Ca::create("fleet").unwrap();
        let ca = Ca::load(&created.cert_pem(), &created.key_pem()).unwrap();
        let issued = ca.issue(Role::Agent, "db-01", &[]).unwrap();
        let der = der_of(&issued.cert_pem);
        let id = identity_from_der(&der).unwrap();
        assert_eq!(id.to_string(), "agent/db-01");
        assert_eq!(issued.serial_hex.len(), 32);
        assert_eq!(crate::serial_hex_from_der(&der).unwrap(), issued.serial_hex);
        KeyPair::from_pem(&issued.key_pem).unwrap();

        // Chains to the CA as a client certificate, even though the CA was reloaded from PEM.
        assert!(verifies_as_client(&created, &issued));
        assert!(!verifies_as_client(&Ca::create("fleet").unwrap(), &issued));
    }

    fn verifies_as_client(ca: &Ca, leaf: &IssuedCert) -> bool {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(ca)),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&der_of(&leaf.cert_pem).into(), &[], UnixTime::now())
            .is_ok()
    }

    fn verifies_as_server(ca: &Ca, leaf: &IssuedCert, server_name: &str) -> bool {
        use rustls::client::danger::ServerCertVerifier;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots(ca)),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        verifier
            .verify_server_cert(
                &der_of(&leaf.cert_pem).into(),
                &[],
                &name,
                &[],
                UnixTime::now(),
            )
            .is_ok()
    }

    fn roots(ca: &Ca) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der_of(&ca.cert_pem()).into()).unwrap();
        roots
    }

    #[test]
    fn only_server_roles_verify_as_servers() {
        let ca = Ca::create("fleet").unwrap();
        let sans = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let coordinator = ca.issue(Role::Coordinator, "coord", &sans).unwrap();
        assert!(verifies_as_server(&ca, &coordinator, "localhost"));
        assert!(verifies_as_server(&ca, &coordinator, "127.0.0.1"));
        assert!(!verifies_as_server(&ca, &coordinator, "elsewhere.example"));
        assert!(verifies_as_client(&ca, &coordinator));
        for role in [Role::Agent, Role::Operator] {
            let leaf = ca.issue(role, "x", &sans).unwrap();
            assert!(!verifies_as_server(&ca, &leaf, "localhost"), "{role}");
            assert!(verifies_as_client(&ca, &leaf), "{role}");
        }
    }

    #[test]
    fn identity_round_trips_for_each_role() {
        let ca = Ca::create("fleet").unwrap();
        for role in [Role::Coordinator, Role::Agent, Role::Operator, Role::Peer] {
            let issued = ca.issue(role, "node_1.example", &[]).unwrap();
            let id = identity_from_der(&der_of(&issued.cert_pem)).unwrap();
            assert_eq!(
                id,
                Identity {
                    role,
                    name: "node_1.example".into()
                }
            );
        }
    }

    #[test]
    fn leaf_fields_follow_the_role() {
        let ca = Ca::create("fleet").unwrap();
        let sans = [
            "coord.example.com".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        let issued = ca.issue(Role::Coordinator, "coord", &sans).unwrap();
        let der = der_of(&issued.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "coord"
        );
        let names = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert!(names.contains(&GeneralName::DNSName("coord.example.com")));
        assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        assert!(names.contains(&GeneralName::URI("fleetvault://coordinator/coord")));
        assert_eq!(names.len(), 4);
        let v = cert.validity();
        let now = OffsetDateTime::now_utc();
        assert!(v.not_before.to_datetime() < now - Duration::minutes(4));
        assert!(v.not_after.to_datetime() > now + Duration::days(5 * 365 - 1));
        assert!(cert
            .extensions()
            .iter()
            .any(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER));

        for role in [Role::Agent, Role::Operator] {
            let issued = ca.issue(role, "x", &[]).unwrap();
            let der = der_of(&issued.cert_pem);
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth && !eku.server_auth, "{role}");
        }
    }

    #[test]
    fn another_ca_still_parses() {
        // Identity parsing is not verification: the TLS layer decides whom to trust.
        let other = Ca::create("someone else").unwrap();
        let issued = other.issue(Role::Operator, "mallory", &[]).unwrap();
        let id = identity_from_der(&der_of(&issued.cert_pem)).unwrap();
        assert_eq!(id.to_string(), "operator/mallory");
    }

    #[test]
    fn bad_names_are_refused() {
        let ca = Ca::create("fleet").unwrap();
        let long = "a".repeat(65);
        for bad in ["../x", "", "a/b", long.as_str(), "-x", ".x"] {
            assert!(
                matches!(
                    ca.issue(Role::Agent, bad, &[]),
                    Err(CertError::InvalidName { .. })
                ),
                "{bad:?} accepted"
            );
        }
        ca.issue(Role::Agent, &"a".repeat(64), &[]).unwrap();
        for bad in ["", "a b", "exa mple.com", "-bad.example", "a..b"] {
            assert!(
                matches!(
                    ca.issue(Role::Coordinator, "c", &[bad.to_owned()]),
                    Err(CertError::InvalidSan(_))
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn reissuing_gives_a_new_serial_and_key() {
        let ca = Ca::create("fleet").unwrap();
        let a = ca.issue(Role::Agent, "db-01", &[]).unwrap();
        let b = ca.issue(Role::Agent, "db-01", &[]).unwrap();
        assert_ne!(a.serial_hex, b.serial_hex);
        assert_ne!(a.key_pem, b.key_pem);
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }

    #[test]
    fn leaf_does_not_outlive_the_ca() {
        let mut ca = Ca::create("fleet").unwrap();
        let end = OffsetDateTime::now_utc() + Duration::days(30);
        ca.not_after = end;
        let issued = ca.issue(Role::Agent, "x", &[]).unwrap();
        let der = der_of(&issued.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let not_after = cert.validity().not_after.to_datetime();
        assert!((not_after - end).abs() < Duration::seconds(2));
    }
}
