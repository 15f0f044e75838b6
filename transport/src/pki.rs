//! A small in-process certificate authority for tests, examples, benchmarks and local clusters.
//!
//! It issues certificates in the profile the transport expects (Ed25519, role URI SAN, serverAuth
//! and clientAuth EKUs, random serial) and CRLs. Production identities come from the trust
//! center in `securesmart-membership`, which issues the same profile with durable state and an
//! admission policy; this type keeps everything in memory.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ED25519, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use time::OffsetDateTime;

use crate::identity::{Identity, Role};

/// Errors of the development CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// rcgen refused the parameters or failed to sign.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The issued certificate could not be turned into an identity.
    #[error(transparent)]
    Identity(#[from] crate::error::IdentityError),
}

/// Validity of certificates the dev CA issues unless told otherwise.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// An in-memory Ed25519 CA (see the module doc).
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    crl_number: u64,
}

/// What to put in a certificate the dev CA issues.
#[derive(Clone, Debug)]
pub struct CertRequest {
    /// Common name and DNS SAN.
    pub name: String,
    /// Role URI SAN; `None` issues a certificate without a role (refused by the transport).
    pub role: Option<Role>,
    /// Extra IP SANs.
    pub ips: Vec<IpAddr>,
    /// Validity start, relative to now (negative = in the past).
    pub not_before_offset: time::Duration,
    /// Validity end, relative to now.
    pub not_after_offset: time::Duration,
}

impl CertRequest {
    /// A certificate for `name` with `role`, valid from an hour ago for [`DEFAULT_VALIDITY`].
    pub fn new(name: &str, role: Role) -> Self {
        Self {
            name: name.to_owned(),
            role: Some(role),
            ips: vec![IpAddr::from([127, 0, 0, 1])],
            not_before_offset: -time::Duration::HOUR,
            not_after_offset: time::Duration::try_from(DEFAULT_VALIDITY)
                .unwrap_or(time::Duration::DAY),
        }
    }

    /// The same request, but already expired.
    pub fn expired(mut self) -> Self {
        self.not_before_offset = -time::Duration::DAY * 2;
        self.not_after_offset = -time::Duration::DAY;
        self
    }
}

impl DevCa {
    /// A new self-signed CA named `name` (path length 0: it signs end entities only).
    ///
    /// # Errors
    /// [`PkiError::Rcgen`] if key generation or signing fails.
    pub fn new(name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::HOUR;
        params.not_after = now + time::Duration::days(3650);
        params.use_authority_key_identifier_extension = false;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
            crl_number: 0,
        })
    }

    /// The CA certificate (DER).
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// The CA certificate (PEM).
    pub fn certificate_pem(&self) -> String {
        pem_encode("CERTIFICATE", self.cert.as_ref())
    }

    /// Issues a fresh key pair and certificate for `request`.
    ///
    /// # Errors
    /// [`PkiError`] if generation or signing fails.
    pub fn issue(&self, request: &CertRequest) -> Result<Identity, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut params = CertificateParams::new(vec![request.name.clone()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, request.name.as_str());
        params.distinguished_name = dn;
        for ip in &request.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if let Some(role) = request.role {
            params
                .subject_alt_names
                .push(SanType::URI(role.uri().try_into()?));
            if role == Role::Replica {
                params
                    .extended_key_usages
                    .push(ExtendedKeyUsagePurpose::ServerAuth);
            }
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now + request.not_before_offset;
        params.not_after = now + request.not_after_offset;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(Identity::new(vec![cert.der().clone()], key_der)?)
    }

    /// Shorthand: a valid certificate of `role` named `name`.
    ///
    /// # Errors
    /// As [`DevCa::issue`].
    pub fn issue_role(&self, name: &str, role: Role) -> Result<Identity, PkiError> {
        self.issue(&CertRequest::new(name, role))
    }

    /// A CRL listing `revoked` (each a certificate this CA issued), valid for a week.
    ///
    /// # Errors
    /// [`PkiError`] if a certificate does not parse or signing fails.
    pub fn crl(
        &mut self,
        revoked: &[&CertificateDer<'_>],
    ) -> Result<CertificateRevocationListDer<'static>, PkiError> {
        let now = OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for cert in revoked {
            let info = crate::identity::CertInfo::parse(cert)?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&info.serial),
                revocation_time: now - time::Duration::MINUTE,
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        self.crl_number += 1;
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::MINUTE,
            next_update: now + time::Duration::WEEK,
            crl_number: SerialNumber::from(self.crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.der().clone())
    }
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, as RFC 5280 asks.
    if let Some(first) = bytes.first_mut() {
        *first = (*first & 0x7f) | 0x40;
    }
    SerialNumber::from_slice(&bytes)
}

/// PEM-encodes DER bytes under `label` (for writing certificates and CRLs to files).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der), config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_role_and_distinct_ids() {
        let ca = DevCa::new("test ca").unwrap();
        let a = ca.issue_role("a", Role::Replica).unwrap();
        let b = ca.issue_role("b", Role::Client).unwrap();
        assert_eq!(a.role(), Role::Replica);
        assert_eq!(b.role(), Role::Client);
        assert_ne!(a.id(), b.id());
        let mut no_role = CertRequest::new("c", Role::Replica);
        no_role.role = None;
        let err = ca.issue(&no_role).unwrap_err();
        assert!(matches!(
            err,
            PkiError::Identity(crate::error::IdentityError::NoRole)
        ));
    }
}
