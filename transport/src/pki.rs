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
    PKCS_ED25519, SanType,
};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use time::OffsetDateTime;

use crate::identity::{Identity, Role};

pub use rcgen::{RevocationReason, RevokedCertParams, SerialNumber};

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
        let (key, _) = generate_ed25519()?;
        let now = OffsetDateTime::now_utc();
        let params = ca_params(
            name,
            now - time::Duration::HOUR,
            now + time::Duration::days(3650),
        )?;
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
        let (key, key_der) = generate_ed25519()?;
        self.certify(request, &key, &key_der)
    }

    /// Issues a certificate for `request` to the key of `identity` (a renewal: the same node
    /// id, a new serial).
    ///
    /// # Errors
    /// [`PkiError`] if the key does not load or signing fails.
    pub fn renew(&self, identity: &Identity, request: &CertRequest) -> Result<Identity, PkiError> {
        let key_der = identity.private_key();
        let key = KeyPair::try_from(&key_der)?;
        self.certify(request, &key, key_der.secret_der())
    }

    fn certify(
        &self,
        request: &CertRequest,
        key: &KeyPair,
        key_der: &[u8],
    ) -> Result<Identity, PkiError> {
        let now = OffsetDateTime::now_utc();
        let mut sans: Vec<SanName> = vec![SanName::Dns(request.name.clone())];
        sans.extend(request.ips.iter().map(|ip| SanName::Ip(*ip)));
        let params = node_params(&NodeProfile {
            common_name: request.name.clone(),
            sans,
            role: request.role,
            not_before: now + request.not_before_offset,
            not_after: now + request.not_after_offset,
            serial: random_serial(),
        })?;
        let cert = params.signed_by(key, &self.issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.to_vec()));
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
        let mut entries = Vec::with_capacity(revoked.len());
        for cert in revoked {
            let info = crate::identity::CertInfo::parse(cert)?;
            entries.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&info.serial),
                revocation_time: now - time::Duration::MINUTE,
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        self.crl_number += 1;
        let params = crl_params(self.crl_number, now, time::Duration::WEEK, entries);
        Ok(params.signed_by(&self.issuer)?.der().clone())
    }
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

/// A subject alternative name of a node certificate.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SanName {
    /// A DNS name.
    Dns(String),
    /// An IP address.
    Ip(IpAddr),
}

impl std::fmt::Display for SanName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SanName::Dns(d) => f.write_str(d),
            SanName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// What goes into a node certificate. The one profile of the project: the dev CA here and the
/// trust center in `securesmart-membership` both build certificates with [`node_params`].
#[derive(Clone, Debug)]
pub struct NodeProfile {
    /// Subject common name.
    pub common_name: String,
    /// DNS and IP SANs.
    pub sans: Vec<SanName>,
    /// Role URI SAN. `None` makes a service certificate (serverAuth only, no role, the
    /// enrollment-service URI instead), which no plane accepts as a peer: the trust center's
    /// enrollment endpoint uses one.
    pub role: Option<Role>,
    /// Validity start.
    pub not_before: OffsetDateTime,
    /// Validity end.
    pub not_after: OffsetDateTime,
    /// Serial number.
    pub serial: SerialNumber,
}

/// Certificate parameters of a node: Ed25519 end entity (basic constraints CA:false), key usage
/// digitalSignature, EKU clientAuth (and serverAuth for replicas, which also accept
/// connections; serverAuth alone for a service certificate without role), the SANs and the role
/// URI SAN, an authority key identifier.
///
/// # Errors
/// [`PkiError::Rcgen`] when a name is not a valid SAN.
pub fn node_params(profile: &NodeProfile) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, profile.common_name.as_str());
    params.distinguished_name = dn;
    for san in &profile.sans {
        params.subject_alt_names.push(match san {
            SanName::Dns(d) => SanType::DnsName(d.as_str().try_into()?),
            SanName::Ip(ip) => SanType::IpAddress(*ip),
        });
    }
    params.extended_key_usages = match profile.role {
        Some(Role::Client) => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Some(_) => vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ],
        None => vec![ExtendedKeyUsagePurpose::ServerAuth],
    };
    let uri = profile
        .role
        .map_or(crate::identity::SERVICE_URI_ENROLLMENT, Role::uri);
    params.subject_alt_names.push(SanType::URI(uri.try_into()?));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.is_ca = IsCa::ExplicitNoCa;
    params.serial_number = Some(profile.serial.clone());
    params.use_authority_key_identifier_extension = true;
    params.not_before = profile.not_before;
    params.not_after = profile.not_after;
    Ok(params)
}

/// Certificate parameters of a CA: self-signed, path length 0 (it signs end entities only), key
/// usages keyCertSign and cRLSign, random serial.
///
/// # Errors
/// [`PkiError::Rcgen`] if rcgen refuses the parameters.
pub fn ca_params(
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    params.not_before = not_before;
    params.not_after = not_after;
    params.use_authority_key_identifier_extension = false;
    Ok(params)
}

/// CRL parameters: number `number`, valid from a minute before `now` for `validity`.
pub fn crl_params(
    number: u64,
    now: OffsetDateTime,
    validity: time::Duration,
    revoked: Vec<RevokedCertParams>,
) -> CertificateRevocationListParams {
    CertificateRevocationListParams {
        this_update: now - time::Duration::MINUTE,
        next_update: now + validity,
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    }
}

/// RFC 8410 PKCS#8 (version 1) encoding of an Ed25519 private key, up to the 32-byte seed:
/// `SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32) } }`.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A new Ed25519 key pair from the operating system's RNG, with its PKCS#8 DER in the RFC 8410
/// version-1 form. (ring writes version 2, with the public key inside, which OpenSSL 3.0 cannot
/// read; rcgen and rustls read both.) The DER is zeroized when dropped.
///
/// # Errors
/// [`PkiError::Rcgen`] if the RNG fails or the key is refused.
pub fn generate_ed25519() -> Result<(KeyPair, zeroize::Zeroizing<Vec<u8>>), PkiError> {
    use rand::TryRngCore;
    let mut der = zeroize::Zeroizing::new(Vec::with_capacity(48));
    der.extend_from_slice(&ED25519_PKCS8_V1_PREFIX);
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng
        .try_fill_bytes(seed.as_mut())
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    der.extend_from_slice(seed.as_ref());
    let key = KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(der.as_slice()),
        &PKCS_ED25519,
    )?;
    Ok((key, der))
}

/// A random positive 127-bit serial number.
pub fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, as RFC 5280 asks.
    if let Some(first) = bytes.first_mut() {
        *first = (*first & 0x7f) | 0x40;
    }
    SerialNumber::from_slice(&bytes)
}

/// Writes a secret (a private key) to `path`: created with mode 0600 (no window in which it is
/// readable by others), truncated if it exists, synced.
///
/// # Errors
/// The I/O error of the failing step.
pub fn write_secret_file(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    #[cfg(unix)]
    {
        // An existing file keeps its old mode on open: tighten it.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents)?;
    file.sync_all()
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
