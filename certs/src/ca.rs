//! The fleet CA: a self-signed certificate and its key, created once by
//! `fleetvault-coordinator init` and reloaded from PEM each time a certificate is issued.
//!
//! The CA may sign leaves only (`pathLenConstraint = 0`) and also signs CRLs (`cRLSign`), so a
//! revocation list can be added later without re-creating it. On reload the issuer's subject,
//! key identifier method and key usages are taken from the stored certificate rather than rebuilt,
//! because a different subject would break chain building; the key is checked against the
//! certificate so a mismatched pair is refused at load instead of producing leaves that never
//! verify.

use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::CertError;

/// How long the CA certificate is valid.
const CA_VALIDITY: Duration = Duration::days(3653);

/// How far `not_before` is set in the past, to tolerate clock skew between machines.
pub(crate) const BACKDATE: Duration = Duration::minutes(5);

/// The fleet CA: its certificate and signing key.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    /// Leaves must not outlive the CA; `issue` clamps their `not_after` to this.
    pub(crate) not_after: OffsetDateTime,
    pub(crate) issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    // Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a self-signed CA valid for 10 years with a fresh P-256 key and a random serial.
    pub fn create(common_name: &str) -> Result<Ca, CertError> {
        if common_name.trim().is_empty() {
            return Err(CertError::EmptyCommonName);
        }
        let key = KeyPair::generate().map_err(|source| CertError::Generate {
            what: "generating the ca key".into(),
            source,
        })?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial()?);
        let key_pem = key.serialize_pem();
        let certified =
            CertifiedIssuer::self_signed(params, key).map_err(|source| CertError::Generate {
                what: "signing the ca certificate".into(),
                source,
            })?;
        let cert_pem = certified.pem();
        // Re-read the issuer from the certificate, exactly as `load` will, so that a CA behaves
        // the same whether it was just created or reloaded.
        Self::load(&cert_pem, &key_pem)
    }

    /// Loads a CA from its certificate and key in PEM form.
    ///
    /// Refuses a certificate that is not a CA and a key that does not belong to it.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(CertError::CaKey)?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| CertError::CaCert(e.to_string()))?;
        if pem.label != "CERTIFICATE" {
            return Err(CertError::CaCert(format!(
                "expected a CERTIFICATE pem block, found {}",
                pem.label
            )));
        }
        let cert = pem
            .parse_x509()
            .map_err(|e| CertError::CaCert(e.to_string()))?;
        let is_ca = cert
            .basic_constraints()
            .map_err(|e| CertError::CaCert(e.to_string()))?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(CertError::NotACa);
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertError::CaKeyMismatch);
        }
        let not_after = cert.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&pem.contents.clone().into(), key)
            .map_err(|e| CertError::CaCert(e.to_string()))?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            not_after,
            issuer,
        })
    }

    /// The CA certificate in PEM form (distributed to every party as its trust anchor).
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA key in PEM form (kept by the coordinator only, mode 0600).
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }
}

/// A random positive 16-byte serial number.
///
/// The top bit is cleared so the DER integer stays positive without a padding byte, and a
/// leading zero byte is redrawn so the encoded serial is always exactly 16 bytes, which keeps
/// the recorded hex equal to what parsers read back from the certificate.
pub(crate) fn random_serial() -> Result<SerialNumber, CertError> {
    let mut bytes = [0u8; 16];
    loop {
        getrandom::fill(&mut bytes).map_err(|e| CertError::Random(e.to_string()))?;
        bytes[0] &= 0x7f;
        if bytes[0] != 0 {
            return Ok(SerialNumber::from_slice(&bytes));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests panic on failure by design
mod tests {
    use super::*;

    #[test]
    fn created_ca_reloads_from_pem() {
        let ca = Ca::create("test fleet CA").unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(ca.key_pem().contains("PRIVATE KEY"));
        let again = Ca::load(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        assert_eq!(again.not_after, ca.not_after);
        assert!(!format!("{again:?}").contains("PRIVATE"));
    }

    #[test]
    fn ca_certificate_has_the_expected_constraints() {
        let ca = Ca::create("test fleet CA").unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());
        assert_eq!(cert.raw_serial().len(), 16);
        let years = (cert.validity().not_after.to_datetime()
            - cert.validity().not_before.to_datetime())
        .whole_days()
            / 365;
        assert_eq!(years, 10);
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "test fleet CA"
        );
    }

    #[test]
    fn mismatched_key_is_refused() {
        let a = Ca::create("a").unwrap();
        let b = Ca::create("b").unwrap();
        assert!(matches!(
            Ca::load(&a.cert_pem(), &b.key_pem()),
            Err(CertError::CaKeyMismatch)
        ));
    }

    #[test]
    fn leaf_is_not_a_ca() {
        let ca = Ca::create("a").unwrap();
        let leaf = ca.issue(crate::Role::Agent, "x", &[]).unwrap();
        assert!(matches!(
            Ca::load(&leaf.cert_pem, &leaf.key_pem),
            Err(CertError::NotACa)
        ));
    }

    #[test]
    fn garbage_is_refused() {
        let ca = Ca::create("a").unwrap();
        assert!(matches!(
            Ca::load("nonsense", &ca.key_pem()),
            Err(CertError::CaCert(_))
        ));
        assert!(matches!(
            Ca::load(&ca.cert_pem(), "nonsense"),
            Err(CertError::CaKey(_))
        ));
        assert!(Ca::create(" ").is_err());
    }

    #[test]
    fn serials_are_sixteen_positive_bytes() {
        for _ in 0..200 {
            let s = random_serial().unwrap().to_bytes();
            assert_eq!(s.len(), 16);
            assert!(s[0] != 0 && s[0] < 0x80);
        }
    }
}
