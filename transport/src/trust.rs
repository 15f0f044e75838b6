//! Trust state and certificate verification.
//!
//! A plane's [`TrustConfig`] (CA certificates, CRLs, peer set, blocklists) is validated into a
//! [`TrustState`] and kept behind one swappable handle. Both the server-side (client certificate)
//! and client-side (server certificate) verifiers read the current state on every handshake, so an
//! update applies to the very next handshake; the plane also re-checks its live connections
//! against the new state and closes those that no longer qualify.
//!
//! Order of checks (cheapest first): parse, node-id blocklist, role, peer set (and expected
//! node id when dialling), then the chain signature, validity period, extended key usage and
//! revocation through rustls-webpki.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

use crate::error::{Refusal, TransportError};
use crate::identity::{CertInfo, Role};
use crate::stats::PlaneStats;
use securesmart_base::NodeId;

/// What a plane trusts. Build one, hand it to the plane, replace it at runtime with
/// `Plane::update_trust`.
#[derive(Clone, Debug, Default)]
pub struct TrustConfig {
    /// CA certificates (DER) that peer chains must lead to.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// Current CRLs (DER). With at least one CRL, a certificate whose revocation status no CRL
    /// covers is refused; with none, revocation is not checked.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// Peer set with replica-plane (or, for clients, client-plane) addresses. On the replica
    /// plane only these peers are accepted; a client dials exactly these replicas. The client
    /// plane of a replica accepts any client the CA vouches for and ignores this set.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Node ids refused whatever their certificate says.
    pub blocked_ids: HashSet<NodeId>,
    /// Source IPs ignored before any handshake state is kept.
    pub blocked_ips: HashSet<IpAddr>,
    /// Refuse certificates when a CRL's next-update time has passed (fail closed). Default on
    /// through [`TrustConfig::new`].
    pub enforce_crl_expiry: bool,
}

impl TrustConfig {
    /// Trust in `ca_cert` with no CRL, no peers and empty blocklists; CRL expiry enforced.
    pub fn new(ca_cert: CertificateDer<'static>) -> Self {
        Self {
            ca_certs: vec![ca_cert],
            enforce_crl_expiry: true,
            ..Self::default()
        }
    }

    /// Adds a peer (builder style).
    #[must_use]
    pub fn with_peer(mut self, id: NodeId, addr: SocketAddr) -> Self {
        self.peers.insert(id, addr);
        self
    }
}

/// A validated [`TrustConfig`] with parsed trust anchors and CRLs.
#[derive(Debug)]
pub struct TrustState {
    config: TrustConfig,
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    crls: Vec<CertRevocationList<'static>>,
}

impl TrustState {
    /// Parses and checks a configuration.
    ///
    /// # Errors
    /// [`TransportError::Trust`] when there is no CA, or a CA certificate or CRL does not parse.
    pub fn new(config: TrustConfig) -> Result<Self, TransportError> {
        if config.ca_certs.is_empty() {
            return Err(TransportError::Trust("no CA certificate".into()));
        }
        let anchors = config
            .ca_certs
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| TransportError::Trust(format!("CA certificate: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let crls = config
            .crls
            .iter()
            .map(|c| {
                OwnedCertRevocationList::from_der(c.as_ref())
                    .map(CertRevocationList::from)
                    .map_err(|e| TransportError::Trust(format!("CRL: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config,
            anchors,
            crls,
        })
    }

    /// The configuration this state was built from.
    pub fn config(&self) -> &TrustConfig {
        &self.config
    }

    /// Verifies a chain (leaf first) against the CAs and CRLs for `usage` at `now`.
    fn verify_chain(
        &self,
        algs: &WebPkiSupportedAlgorithms,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<(), Refusal> {
        let cert = EndEntityCert::try_from(leaf).map_err(|_| Refusal::BadCertificate)?;
        let crl_refs: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        let revocation = if crl_refs.is_empty() {
            None
        } else {
            let builder = RevocationOptionsBuilder::new(&crl_refs)
                .map_err(|_| Refusal::RevocationUnknown)?
                .with_depth(RevocationCheckDepth::EndEntity)
                .with_status_policy(UnknownStatusPolicy::Deny);
            let builder = if self.config.enforce_crl_expiry {
                builder.with_expiration_policy(ExpirationPolicy::Enforce)
            } else {
                builder.with_expiration_policy(ExpirationPolicy::Ignore)
            };
            Some(builder.build())
        };
        cert.verify_for_usage(
            algs.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            revocation,
            None,
        )
        .map(|_| ())
        .map_err(refusal_of)
    }

    /// Checks a replica's chain (leaf first) exactly as the replica plane does in a handshake:
    /// blocklist, role, peer set, then CA, validity at `now`, key usage and the CRLs.
    ///
    /// # Errors
    /// The [`Refusal`] the replica plane would give.
    pub fn verify_replica(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<CertInfo, Refusal> {
        self.check_as(PlaneKind::Replica, chain, now)
    }

    /// Checks a client's chain (leaf first) exactly as a replica's client plane does in a
    /// handshake: blocklist, role, then CA, validity at `now`, key usage and the CRLs.
    ///
    /// # Errors
    /// The [`Refusal`] the client plane would give.
    pub fn verify_client(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<CertInfo, Refusal> {
        self.check_as(PlaneKind::ClientListener, chain, now)
    }

    /// [`TrustState::check_peer`] with the default provider's algorithms.
    fn check_as(
        &self,
        plane: PlaneKind,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<CertInfo, Refusal> {
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        self.check_peer(plane, &algs, chain, now)
    }

    /// Whether our CA issued `cert` (any role): its chain to the configured CA verifies at the
    /// time it became valid, whatever the time now and whatever the CRLs say. For deciding
    /// who a revoked certificate named (a certificate that was never ours names nobody).
    ///
    /// # Errors
    /// [`Refusal::BadCertificate`] if it does not parse, [`Refusal::UnknownCa`] if our CA did
    /// not sign it.
    pub fn issued(&self, cert: &CertificateDer<'_>) -> Result<CertInfo, Refusal> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let info = CertInfo::parse(cert).map_err(|_| Refusal::BadCertificate)?;
        let (_, x509) = X509Certificate::from_der(cert).map_err(|_| Refusal::BadCertificate)?;
        let start = u64::try_from(x509.validity().not_before.timestamp()).unwrap_or(0);
        let at =
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(start.saturating_add(1)));
        let end_entity = EndEntityCert::try_from(cert).map_err(|_| Refusal::BadCertificate)?;
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        end_entity
            .verify_for_usage(
                algs.all,
                &self.anchors,
                &[],
                at,
                KeyUsage::client_auth(),
                None,
                None,
            )
            .map(|_| info)
            .map_err(refusal_of)
    }

    /// Whether a CRL of this state revokes `cert` now: its chain to the configured CA verifies,
    /// except that a CRL of that CA lists it. For a node to find out that its own certificate
    /// is revoked (a CRL names nobody the CA did not sign, and only the CA signs CRLs).
    pub fn revokes(&self, cert: &CertificateDer<'_>) -> bool {
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        self.verify_chain(&algs, cert, &[], UnixTime::now(), KeyUsage::client_auth())
            == Err(Refusal::Revoked)
    }

    /// Whether `info` may hold a connection on `plane` under this state (without the chain check).
    pub(crate) fn admits(&self, plane: PlaneKind, info: &CertInfo) -> Result<(), Refusal> {
        if self.config.blocked_ids.contains(&info.id) {
            return Err(Refusal::BlockedNodeId);
        }
        if !plane.accepts_peer(info.role) {
            return Err(Refusal::WrongRole);
        }
        if plane.needs_peer_set() && !self.config.peers.contains_key(&info.id) {
            return Err(Refusal::NotInPeerSet);
        }
        Ok(())
    }

    /// The full check of a peer's chain for `plane`: what the verifiers run in the handshake and
    /// what a trust update re-runs on live connections.
    pub(crate) fn check_peer(
        &self,
        plane: PlaneKind,
        algs: &WebPkiSupportedAlgorithms,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<CertInfo, Refusal> {
        let (leaf, intermediates) = chain.split_first().ok_or(Refusal::BadCertificate)?;
        let info = CertInfo::parse(leaf).map_err(|_| Refusal::BadCertificate)?;
        self.admits(plane, &info)?;
        // The peer authenticates as a TLS client when it dialled us, as a server otherwise.
        let usage = if plane.we_accept() {
            KeyUsage::client_auth()
        } else {
            KeyUsage::server_auth()
        };
        self.verify_chain(algs, leaf, intermediates, now, usage)?;
        Ok(info)
    }
}

fn refusal_of(e: webpki::Error) -> Refusal {
    use webpki::Error as E;
    match e {
        E::UnknownIssuer
        | E::InvalidSignatureForPublicKey
        | E::UnsupportedSignatureAlgorithmContext(_) => Refusal::UnknownCa,
        E::CertExpired { .. } => Refusal::Expired,
        E::CertNotValidYet { .. } => Refusal::NotYetValid,
        E::CertRevoked => Refusal::Revoked,
        // No CRL we hold can vouch for the status: unknown issuer, expired, or a CRL that
        // names our CA but whose signature or form does not hold up (a forgery must not turn
        // into a generic certificate error).
        E::UnknownRevocationStatus
        | E::CrlExpired { .. }
        | E::InvalidCrlSignatureForPublicKey
        | E::IssuerNotCrlSigner
        | E::InvalidCrlNumber
        | E::UnsupportedCrlVersion
        | E::UnsupportedDeltaCrl
        | E::UnsupportedIndirectCrl
        | E::UnsupportedCrlIssuingDistributionPoint
        | E::UnsupportedRevocationReason
        | E::UnsupportedRevocationReasonsPartitioning
        | E::UnsupportedCrlSignatureAlgorithmContext(_)
        | E::UnsupportedCrlSignatureAlgorithmForPublicKeyContext(_) => Refusal::RevocationUnknown,
        E::RequiredEkuNotFoundContext(_) => Refusal::WrongRole,
        _ => Refusal::BadCertificate,
    }
}

fn rustls_error_of(r: Refusal) -> rustls::Error {
    let e = match r {
        Refusal::UnknownCa => CertificateError::UnknownIssuer,
        Refusal::Expired => CertificateError::Expired,
        Refusal::NotYetValid => CertificateError::NotValidYet,
        Refusal::Revoked => CertificateError::Revoked,
        Refusal::RevocationUnknown => CertificateError::UnknownRevocationStatus,
        Refusal::BadCertificate => CertificateError::BadEncoding,
        _ => CertificateError::ApplicationVerificationFailure,
    };
    rustls::Error::InvalidCertificate(e)
}

/// The three kinds of plane (see `Plane`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PlaneKind {
    /// Replica-to-replica: accepts and dials replicas of the peer set.
    Replica,
    /// A replica's client plane: accepts clients, never dials.
    ClientListener,
    /// A client: dials the replicas' client planes, never accepts.
    Client,
}

impl PlaneKind {
    /// Whether a peer of `role` may connect on this plane: replicas on the replica plane;
    /// clients, and replicas acting as clients (a joiner asking for the roster), on the
    /// client plane.
    pub(crate) fn accepts_peer(self, role: Role) -> bool {
        match self {
            PlaneKind::Replica | PlaneKind::Client => role == Role::Replica,
            PlaneKind::ClientListener => matches!(role, Role::Client | Role::Replica),
        }
    }

    /// Whether an identity of `role` may run this plane (a replica may run a client plane).
    pub(crate) fn runs_as(self, role: Role) -> bool {
        match self {
            PlaneKind::Replica | PlaneKind::ClientListener => role == Role::Replica,
            PlaneKind::Client => matches!(role, Role::Client | Role::Replica),
        }
    }

    pub(crate) const fn needs_peer_set(self) -> bool {
        !matches!(self, PlaneKind::ClientListener)
    }

    pub(crate) const fn we_accept(self) -> bool {
        !matches!(self, PlaneKind::Client)
    }

    pub(crate) const fn alpn(self) -> &'static [u8] {
        match self {
            PlaneKind::Replica => crate::ALPN_REPLICA,
            PlaneKind::ClientListener | PlaneKind::Client => crate::ALPN_CLIENT,
        }
    }

    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            PlaneKind::Replica => "replica",
            PlaneKind::ClientListener => "client_listener",
            PlaneKind::Client => "client",
        }
    }
}

/// The swappable handle every verifier of a plane reads.
#[derive(Clone, Debug)]
pub(crate) struct TrustHandle(Arc<RwLock<Arc<TrustState>>>);

impl TrustHandle {
    pub(crate) fn new(state: TrustState) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(state))))
    }

    pub(crate) fn current(&self) -> Arc<TrustState> {
        match self.0.read() {
            Ok(g) => Arc::clone(&g),
            // A writer cannot panic while holding the lock (it only assigns), but stay total.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub(crate) fn replace(&self, state: TrustState) {
        let state = Arc::new(state);
        match self.0.write() {
            Ok(mut g) => *g = state,
            Err(poisoned) => *poisoned.into_inner() = state,
        }
    }
}

/// Verifies the peer's certificate in both TLS roles against the current [`TrustState`].
#[derive(Debug)]
pub(crate) struct PeerVerifier {
    trust: TrustHandle,
    plane: PlaneKind,
    /// When dialling: the node id we meant to reach.
    expected: Option<NodeId>,
    algs: WebPkiSupportedAlgorithms,
    stats: Arc<PlaneStats>,
}

impl PeerVerifier {
    pub(crate) fn new(
        trust: TrustHandle,
        plane: PlaneKind,
        expected: Option<NodeId>,
        stats: Arc<PlaneStats>,
    ) -> Self {
        Self {
            trust,
            plane,
            expected,
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
            stats,
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let result = (|| {
            let leaf = CertInfo::parse(end_entity).map_err(|_| Refusal::BadCertificate)?;
            if let Some(expected) = self.expected
                && leaf.id != expected
            {
                return Err(Refusal::UnexpectedPeer);
            }
            let mut chain = Vec::with_capacity(1 + intermediates.len());
            chain.push(end_entity.clone());
            chain.extend(intermediates.iter().cloned());
            self.trust
                .current()
                .check_peer(self.plane, &self.algs, &chain, now)
        })();
        match result {
            Ok(_) => Ok(()),
            Err(reason) => {
                self.stats.refused(reason);
                let id = crate::node_id(end_entity).ok();
                tracing::warn!(plane = self.plane.as_str(), peer = ?id, %reason, "certificate refused");
                Err(rustls_error_of(reason))
            }
        }
    }
}

/// Both planes are TLS 1.3 only: a TLS 1.2 signature is never checked.
const TLS12_REFUSED: rustls::Error =
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered);

impl PeerVerifier {
    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(TLS12_REFUSED)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The server is identified by node id (checked against `expected`), not by DNS name.
        self.check(end_entity, intermediates, now)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(TLS12_REFUSED)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CertRequest, DevCa};

    #[test]
    fn issued_tells_our_ca_s_certificates_from_others_whatever_the_time() {
        let ca = DevCa::new("issuer").unwrap();
        let other = DevCa::new("issuer").unwrap();
        let state = TrustState::new(TrustConfig::new(ca.certificate())).unwrap();
        let ours = ca.issue_role("c", Role::Client).unwrap();
        assert_eq!(state.issued(&ours.chain()[0]).map(|i| i.id), Ok(ours.id()));
        let theirs = other.issue_role("c", Role::Client).unwrap();
        assert_eq!(
            state.issued(&theirs.chain()[0]).map(|i| i.id),
            Err(Refusal::UnknownCa)
        );
        assert_eq!(
            state
                .issued(&CertificateDer::from(vec![1, 2, 3]))
                .map(|i| i.id),
            Err(Refusal::BadCertificate)
        );
    }

    #[test]
    fn roles_fit_planes_and_a_replica_may_act_as_a_client_only_on_client_planes() {
        use PlaneKind::{Client, ClientListener, Replica};
        // Who may connect.
        assert!(Replica.accepts_peer(Role::Replica) && !Replica.accepts_peer(Role::Client));
        assert!(ClientListener.accepts_peer(Role::Client));
        assert!(
            ClientListener.accepts_peer(Role::Replica),
            "a joiner asks for the roster"
        );
        assert!(Client.accepts_peer(Role::Replica) && !Client.accepts_peer(Role::Client));
        // Who may run which plane.
        assert!(Replica.runs_as(Role::Replica) && !Replica.runs_as(Role::Client));
        assert!(ClientListener.runs_as(Role::Replica) && !ClientListener.runs_as(Role::Client));
        assert!(Client.runs_as(Role::Client) && Client.runs_as(Role::Replica));
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn refusals_by_reason_next_to_the_accepted_case() {
        let mut ca = DevCa::new("ca").unwrap();
        let other_ca = DevCa::new("other").unwrap();
        let good = ca.issue_role("good", Role::Replica).unwrap();
        let outsider = ca.issue_role("outsider", Role::Replica).unwrap();
        let client = ca.issue_role("client", Role::Client).unwrap();
        let foreign = other_ca.issue_role("foreign", Role::Replica).unwrap();
        let expired = ca
            .issue(&CertRequest::new("old", Role::Replica).expired())
            .unwrap();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut cfg = TrustConfig::new(ca.certificate());
        for id in [good.id(), client.id(), foreign.id(), expired.id()] {
            cfg.peers.insert(id, addr);
        }
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        let state = TrustState::new(cfg.clone()).unwrap();
        let check = |s: &TrustState, who: &crate::Identity| {
            s.check_peer(PlaneKind::Replica, &algs, who.chain(), now())
                .map(|i| i.id)
        };
        assert_eq!(check(&state, &good), Ok(good.id()));
        assert_eq!(check(&state, &outsider), Err(Refusal::NotInPeerSet));
        assert_eq!(check(&state, &client), Err(Refusal::WrongRole));
        assert_eq!(check(&state, &foreign), Err(Refusal::UnknownCa));
        assert_eq!(check(&state, &expired), Err(Refusal::Expired));

        cfg.crls = vec![ca.crl(&[&good.chain()[0]]).unwrap()];
        let revoked = TrustState::new(cfg.clone()).unwrap();
        assert_eq!(check(&revoked, &good), Err(Refusal::Revoked));
        // What a node asks of its own certificate: only a CRL of our CA that lists it counts.
        assert!(revoked.revokes(&good.chain()[0]));
        assert!(!revoked.revokes(&client.chain()[0]));
        assert!(!state.revokes(&good.chain()[0]));
        assert!(!revoked.revokes(&foreign.chain()[0]));

        cfg.crls = vec![ca.crl(&[]).unwrap()];
        cfg.blocked_ids.insert(good.id());
        let blocked = TrustState::new(cfg).unwrap();
        assert_eq!(check(&blocked, &good), Err(Refusal::BlockedNodeId));
    }

    #[test]
    fn a_crl_from_another_ca_leaves_status_unknown() {
        let ca = DevCa::new("ca").unwrap();
        let mut other = DevCa::new("other").unwrap();
        let good = ca.issue_role("good", Role::Replica).unwrap();
        let mut cfg = TrustConfig::new(ca.certificate());
        cfg.peers.insert(good.id(), "127.0.0.1:1".parse().unwrap());
        cfg.crls = vec![other.crl(&[]).unwrap()];
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        let state = TrustState::new(cfg).unwrap();
        assert_eq!(
            state
                .check_peer(PlaneKind::Replica, &algs, good.chain(), now())
                .map(|i| i.id),
            Err(Refusal::RevocationUnknown)
        );
    }

    #[test]
    fn a_forged_crl_under_our_ca_name_leaves_status_unknown() {
        // Same CA name, other key: webpki takes the CRL as authoritative by name, then its
        // signature fails. That must read as "status unknown", not as some other error.
        let ca = DevCa::new("same name").unwrap();
        let mut forger = DevCa::new("same name").unwrap();
        let good = ca.issue_role("good", Role::Replica).unwrap();
        let mut cfg = TrustConfig::new(ca.certificate());
        cfg.peers.insert(good.id(), "127.0.0.1:1".parse().unwrap());
        cfg.crls = vec![forger.crl(&[&good.chain()[0]]).unwrap()];
        let state = TrustState::new(cfg).unwrap();
        assert_eq!(
            state.verify_replica(good.chain(), now()).map(|i| i.id),
            Err(Refusal::RevocationUnknown)
        );
    }

    #[test]
    fn bad_trust_inputs_are_errors() {
        assert!(TrustState::new(TrustConfig::default()).is_err());
        let mut cfg = TrustConfig::new(CertificateDer::from(vec![1, 2, 3]));
        assert!(TrustState::new(cfg.clone()).is_err());
        let ca = DevCa::new("ca").unwrap();
        cfg.ca_certs = vec![ca.certificate()];
        cfg.crls = vec![CertificateRevocationListDer::from(vec![0x30, 0])];
        assert!(TrustState::new(cfg).is_err());
    }
}
