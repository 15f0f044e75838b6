//! Node identities: [`node_id`] of a certificate, [`Role`] and the [`Identity`] (certificate chain and private key) a
//! node presents in its TLS handshakes.
//!
//! The role travels in the certificate as a URI subject alternative name, exactly one of
//! [`ROLE_URI_REPLICA`] or [`ROLE_URI_CLIENT`], next to the usual TLS extended key usages
//! (a replica certificate carries serverAuth and clientAuth, a client certificate clientAuth).
//! URI SANs are shown by `openssl x509 -text` and need no private object identifier.

use std::fmt;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use securesmart_base::NodeId;

use crate::error::IdentityError;

/// URI SAN naming a certificate of role [`Role::Replica`].
pub const ROLE_URI_REPLICA: &str = "urn:securesmart:role:replica";
/// URI SAN naming a certificate of role [`Role::Client`].
pub const ROLE_URI_CLIENT: &str = "urn:securesmart:role:client";
/// URI SAN naming the trust center's enrollment endpoint (a service certificate: no role, so
/// no plane accepts it, and the only certificate `enroll` accepts from the endpoint).
pub const SERVICE_URI_ENROLLMENT: &str = "urn:securesmart:service:enrollment";

/// Whether `cert` is an enrollment-endpoint certificate: it names
/// [`SERVICE_URI_ENROLLMENT`] and no role (a replica's or client's certificate, whatever its
/// names, is not one). The chain is not checked here.
pub fn is_enrollment_service(cert: &CertificateDer<'_>) -> bool {
    let Ok((_, x509)) = X509Certificate::from_der(cert.as_ref()) else {
        return false;
    };
    let Ok(Some(san)) = x509.subject_alternative_name() else {
        return false;
    };
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    uris.contains(&SERVICE_URI_ENROLLMENT) && !uris.iter().any(|u| Role::from_uri(u).is_some())
}

/// The [`NodeId`] of the key in a DER certificate (BLAKE3 of its SubjectPublicKeyInfo).
///
/// # Errors
/// [`IdentityError::Certificate`] when the certificate does not parse.
pub fn node_id(cert: &CertificateDer<'_>) -> Result<NodeId, IdentityError> {
    Ok(CertInfo::parse(cert)?.id)
}

/// What a node may do, as its certificate says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// Takes part in agreement; may connect on the replica plane.
    Replica,
    /// Sends requests; may connect only to the client plane.
    Client,
}

impl Role {
    /// The URI SAN that names this role.
    pub const fn uri(self) -> &'static str {
        match self {
            Role::Replica => ROLE_URI_REPLICA,
            Role::Client => ROLE_URI_CLIENT,
        }
    }

    fn from_uri(uri: &str) -> Option<Self> {
        match uri {
            ROLE_URI_REPLICA => Some(Role::Replica),
            ROLE_URI_CLIENT => Some(Role::Client),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Replica => "replica",
            Role::Client => "client",
        })
    }
}

/// The facts the transport reads from a certificate (parsed, not yet chain-verified).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// BLAKE3 of the SubjectPublicKeyInfo.
    pub id: NodeId,
    /// The role named in the SAN.
    pub role: Role,
    /// The serial number, big-endian, without leading zeros.
    pub serial: Vec<u8>,
    /// The start of its validity (`notBefore`), in seconds since the Unix epoch: a renewal
    /// starts later than the certificate it replaces.
    pub not_before: i64,
}

impl CertInfo {
    /// Parses a DER certificate: the whole buffer must be one certificate carrying exactly one
    /// role URI.
    ///
    /// # Errors
    /// [`IdentityError::Certificate`] on bad DER or trailing bytes, [`IdentityError::NoRole`] or
    /// [`IdentityError::AmbiguousRole`] when the role SAN is missing or repeated.
    pub fn parse(cert: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        let (rest, x509) = X509Certificate::from_der(cert.as_ref())
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        if !rest.is_empty() {
            return Err(IdentityError::Certificate("trailing bytes".into()));
        }
        let id = NodeId::from_spki(x509.tbs_certificate.subject_pki.raw);
        let mut role = None;
        let san = x509
            .subject_alternative_name()
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        if let Some(san) = san {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name
                    && let Some(r) = Role::from_uri(uri)
                {
                    if role.is_some() {
                        return Err(IdentityError::AmbiguousRole);
                    }
                    role = Some(r);
                }
            }
        }
        let role = role.ok_or(IdentityError::NoRole)?;
        Ok(Self {
            id,
            role,
            serial: x509.tbs_certificate.raw_serial().to_vec(),
            not_before: x509.validity().not_before.timestamp(),
        })
    }
}

/// A node's certificate chain (leaf first) and private key, as presented in TLS handshakes.
///
/// The private key (PKCS#8 DER) is zeroized when the identity is dropped and never printed:
/// `Debug` shows only the node id and role. (rustls keeps its own parsed copy inside a TLS
/// configuration; ring zeroizes that one.)
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: Zeroizing<Vec<u8>>,
    info: CertInfo,
}

impl Identity {
    /// Builds an identity from a DER chain (leaf first) and a PKCS#8 key.
    ///
    /// # Errors
    /// [`IdentityError::EmptyChain`], or a parse error of the leaf certificate.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, IdentityError> {
        let leaf = chain.first().ok_or(IdentityError::EmptyChain)?;
        let info = CertInfo::parse(leaf)?;
        let key = match key {
            PrivateKeyDer::Pkcs8(k) => Zeroizing::new(k.secret_pkcs8_der().to_vec()),
            _ => return Err(IdentityError::Pem("the private key must be PKCS#8".into())),
        };
        Ok(Self { chain, key, info })
    }

    /// Builds an identity from PEM text: one or more certificates (leaf first) and one private key.
    ///
    /// # Errors
    /// [`IdentityError::Pem`] when the PEM does not hold what it should, or a certificate error.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IdentityError::Pem(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| IdentityError::Pem(e.to_string()))?;
        Self::new(chain, key)
    }

    /// Reads an identity from PEM files.
    ///
    /// # Errors
    /// [`IdentityError::Io`] when a file cannot be read, otherwise as [`Identity::from_pem`].
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, IdentityError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| IdentityError::Io(p.display().to_string(), e))
        };
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.info.id
    }

    /// This node's role.
    pub fn role(&self) -> Role {
        self.info.role
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// A copy of the private key for a TLS configuration. Handle with care: it is a secret.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.to_vec()))
    }

    /// The 32-byte Ed25519 seed of the private key, if it is an Ed25519 PKCS#8 key (RFC 8410
    /// version 1, or version 2 as ring writes it: `30 len 02 01 ver 30 05 06 03 2b 65 70 04 22
    /// 04 20 <seed> ...`). For layers that sign with the node key outside TLS (MLS, consensus).
    pub fn ed25519_seed(&self) -> Option<Zeroizing<[u8; 32]>> {
        const MIDDLE: [u8; 11] = [
            0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
        ];
        let k = self.key.as_slice();
        if k.first() != Some(&0x30) || k.get(2..4) != Some(&[0x02, 0x01]) {
            return None;
        }
        if k.get(5..16) != Some(&MIDDLE[..]) {
            return None;
        }
        let seed: [u8; 32] = k.get(16..48)?.try_into().ok()?;
        Some(Zeroizing::new(seed))
    }

    /// The raw 32-byte Ed25519 public key of the leaf certificate, if it is one.
    pub fn ed25519_public(&self) -> Option<[u8; 32]> {
        ed25519_public_key(self.chain.first()?)
    }

    /// The certificate chain as PEM (leaf first).
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| crate::pki::pem_encode("CERTIFICATE", c.as_ref()))
            .collect()
    }

    /// Writes the chain (PEM) to `cert` and the key (PKCS#8 PEM, as `openssl pkey` reads it) to
    /// `key`, the key file with mode 0600 from its creation.
    ///
    /// # Errors
    /// The I/O error of the failing write.
    pub fn write_pem_files(&self, cert: &Path, key: &Path) -> std::io::Result<()> {
        std::fs::write(cert, self.chain_pem())?;
        let pem = Zeroizing::new(crate::pki::pem_encode("PRIVATE KEY", &self.key));
        crate::pki::write_secret_file(key, pem.as_bytes())
    }
}

/// The raw 32-byte Ed25519 public key in a certificate, if the certificate holds one.
pub fn ed25519_public_key(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let spki = &x509.tbs_certificate.subject_pki;
    if spki.algorithm.algorithm.to_id_string() != "1.3.101.112" {
        return None;
    }
    spki.subject_public_key.data.as_ref().try_into().ok()
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone(),
            info: self.info.clone(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.info.id)
            .field("role", &self.info.role)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_of_a_raw_ed25519_key_is_the_certificate_id() {
        let ca = crate::pki::DevCa::new("ca").unwrap();
        let id = ca.issue_role("n", Role::Client).unwrap();
        let key = id.ed25519_public().unwrap();
        assert_eq!(NodeId::from_ed25519(&key), id.id());
        assert_ne!(NodeId::from_ed25519(&[7; 32]), id.id());
    }

    #[test]
    fn pem_files_round_trip_with_a_private_key_file() {
        let ca = crate::pki::DevCa::new("ca").unwrap();
        let id = ca.issue_role("n", Role::Replica).unwrap();
        let dir = std::env::temp_dir().join(format!("ss-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = (dir.join("node.pem"), dir.join("node.key"));
        id.write_pem_files(&c, &k).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let back = Identity::from_pem_files(&c, &k).unwrap();
        assert_eq!(back.id(), id.id());
        assert!(back.ed25519_seed().is_some());
        assert_eq!(back.ed25519_public(), id.ed25519_public());
        assert_eq!(
            back.private_key().secret_der(),
            id.private_key().secret_der()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_certificate_is_an_error() {
        let bad = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x01]);
        assert!(CertInfo::parse(&bad).is_err());
    }
}
