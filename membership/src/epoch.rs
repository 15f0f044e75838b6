//! Membership epochs and the commands that change them.
//!
//! A [`Membership`] is the agreed view of the system at one epoch: its members (node id ->
//! certificate, replica-plane and client-plane addresses, role), the current CRL, and the
//! derived fault threshold `f = (n - 1) / 3` over the `n` replicas and quorum `2f + 1`.
//!
//! Changes are [`MembershipCommand`]s carried by the ordering layer as ordinary requests. Every
//! replica runs [`Membership::apply`] on each command at the same log position; `apply` depends
//! only on the current membership, the command and the `now` time recorded in the log entry (not
//! on a local clock), so all correct replicas reach the same epoch and the same members.
//! A refused command changes nothing and does not advance the epoch.
//!
//! Validation: an `AddNode` certificate must chain to the CA, not be revoked by the current CRL,
//! name role replica, and not belong to a member already; `RemoveNode` must name a member and may
//! never leave fewer than [`MIN_REPLICAS`] replicas; `UpdateCrl` must carry a CRL signed by the CA
//! with a CRL number above the current one, whatever its dates (the CA's CRLs are cumulative
//! and numbered, so a higher number only ever adds revocations; an expired ordered CRL is
//! replaced by the next one, and a clock that is off refuses none), and removes every member
//! it lists (by issuer and serial, whatever the time), even
//! below [`MIN_REPLICAS`] (a revoked replica never keeps its vote, and a refused CRL would
//! block every later revocation); only a CRL that revokes every replica is refused. A group
//! left with fewer than [`MIN_REPLICAS`] is [`Membership::is_degraded`].
//!
//! Encoding (version 1): `version u8 | tag u8 | fields`, integers big-endian, byte strings with a
//! u32 length; limits [`MAX_CERT_BYTES`], [`MAX_KEY_PACKAGE_BYTES`], [`MAX_CRL_BYTES`]; the
//! decoder must consume the whole input.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv6Addr, SocketAddr};

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use securesmart_transport::{CertInfo, NodeId, Role, TrustConfig, TrustState};

use securesmart_base::wire::{Reader, WireError, Writer};

/// The fewest replicas a membership may have (n = 3f + 1 with f >= 1).
pub const MIN_REPLICAS: usize = 4;
/// Largest certificate in a command.
pub const MAX_CERT_BYTES: usize = 16 * 1024;
/// Largest MLS key package in a command.
pub const MAX_KEY_PACKAGE_BYTES: usize = 64 * 1024;
/// Largest CRL in a command.
pub const MAX_CRL_BYTES: usize = 1024 * 1024;
/// Encoding version of a membership (2: the revoked certificates).
const VERSION: u8 = 2;
/// Encoding version of a command (the `RevokeCertificates` tag is new; the others read as before).
const COMMAND_VERSION: u8 = 1;

/// One member of the system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its certificate (DER).
    pub certificate: CertificateDer<'static>,
    /// Replica-plane address.
    pub replica_addr: SocketAddr,
    /// Client-plane address.
    pub client_addr: SocketAddr,
    /// Its role (from the certificate).
    pub role: Role,
    /// Its MLS key package as submitted (used by the group-key layer).
    pub key_package: Vec<u8>,
}

securesmart_base::wire_tags! {
    /// The kind of a [`MembershipCommand`]: its tag on the wire, the one table that encoding
    /// and decoding share.
    pub enum CommandKind: "command" {
        /// [`MembershipCommand::AddNode`].
        AddNode = 1,
        /// [`MembershipCommand::RemoveNode`].
        RemoveNode = 2,
        /// [`MembershipCommand::UpdateCrl`].
        UpdateCrl = 3,
        /// [`MembershipCommand::RevokeCertificates`].
        RevokeCertificates = 4,
        /// [`MembershipCommand::AddAdmin`].
        AddAdmin = 5,
        /// [`MembershipCommand::RemoveAdmin`].
        RemoveAdmin = 6,
        /// [`MembershipCommand::RenewNode`].
        RenewNode = 7,
    }
}

/// A change of membership, as ordered by the ordering layer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MembershipCommand {
    /// Admit a replica.
    AddNode {
        /// Its certificate (DER).
        certificate: Vec<u8>,
        /// Its MLS key package.
        key_package: Vec<u8>,
        /// Replica-plane address.
        replica_addr: SocketAddr,
        /// Client-plane address.
        client_addr: SocketAddr,
    },
    /// Remove a member.
    RemoveNode {
        /// Its node id.
        id: NodeId,
    },
    /// Replace the CRL.
    UpdateCrl {
        /// The CRL (DER).
        crl: Vec<u8>,
    },
    /// Record who the current CRL revokes: certificates our CA issued whose serials it lists
    /// (clients' among them, whose ids the membership does not otherwise know). Anyone may
    /// order it; each certificate proves itself.
    RevokeCertificates {
        /// The revoked certificates (DER).
        certificates: Vec<Vec<u8>>,
    },
    /// Make a client an administrator (ordered by an administrator; the node's replicated
    /// state keeps the administrators, [`Membership::admissible_admin`] checks the
    /// certificate).
    AddAdmin {
        /// Its certificate (DER): a client certificate of our CA that no CRL revokes.
        certificate: Vec<u8>,
    },
    /// Withdraw an administrator (ordered by an administrator; never the last one).
    RemoveAdmin {
        /// Its node id.
        id: NodeId,
    },
    /// Replace a replica's certificate with its renewal (same key, so the same node id):
    /// ordered by the replica itself or an administrator, before the old one expires.
    RenewNode {
        /// The new certificate (DER): our CA's, role replica, valid at the ordered time, not
        /// revoked, for a current replica's key.
        certificate: Vec<u8>,
    },
}

/// Why a command was refused (identically at every correct replica).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandRefusal {
    /// The certificate does not parse or names no role.
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    /// The certificate does not verify against the CA and current CRL.
    #[error("certificate refused: {0}")]
    CertificateRefused(String),
    /// Only replicas join the membership.
    #[error("the certificate's role is not replica")]
    NotReplica,
    /// The node is a member already.
    #[error("already a member")]
    AlreadyMember,
    /// No such member.
    #[error("not a member")]
    NotMember,
    /// The change would leave fewer than the minimum replicas.
    #[error("would leave {0} replicas, fewer than the minimum of {MIN_REPLICAS}")]
    TooFewReplicas(usize),
    /// The CRL revokes every replica: nothing could order anything after it.
    #[error("the CRL revokes every replica")]
    NoReplicaLeft,
    /// The CRL does not parse or is not signed by the CA.
    #[error("bad CRL: {0}")]
    BadCrl(String),
    /// Administrators are the node's replicated state, not the membership's.
    #[error("an administrator command, applied by the node's replicated state")]
    NotMembership,
    /// A revoked certificate that our CA did not issue, or that the current CRL does not list.
    #[error("not a certificate of our CA that the current CRL revokes: {0}")]
    NotRevoked(String),
    /// Every certificate is recorded as revoked already.
    #[error("nothing new to revoke")]
    NothingToRevoke,
    /// The record of revoked certificates is full.
    #[error("more than {MAX_REVOKED} revoked certificates recorded")]
    TooManyRevoked,
    /// The CRL is not newer than the current one.
    #[error("CRL number {new} is not above the current {current}")]
    StaleCrl {
        /// The command's CRL number.
        new: u64,
        /// The current CRL number.
        current: u64,
    },
}

/// The agreed membership at one epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    epoch: u64,
    ca: CertificateDer<'static>,
    members: BTreeMap<NodeId, Member>,
    crl: Option<(u64, CertificateRevocationListDer<'static>)>,
    /// Nodes whose certificates the ordered CRL revokes, as ordered `RevokeCertificates` proved.
    revoked: BTreeSet<NodeId>,
}

/// Revoked certificates a membership records at most.
pub const MAX_REVOKED: usize = 65_536;
/// Certificates in one `RevokeCertificates` command at most.
pub const MAX_CERTS_PER_COMMAND: usize = 256;

/// What an applied command changed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Applied {
    /// A replica joined.
    Added(NodeId),
    /// A member left.
    Removed(NodeId),
    /// The CRL changed; these members were revoked and removed.
    CrlUpdated {
        /// Members removed because the CRL revokes them.
        removed: Vec<NodeId>,
    },
    /// These nodes' certificates are revoked by the current CRL: from now on they authorize
    /// nothing (see [`Membership::is_revoked`]).
    CertificatesRevoked(Vec<NodeId>),
    /// A replica's certificate was replaced by its renewal (the replica set is unchanged).
    Renewed(NodeId),
}

impl Membership {
    /// The genesis membership: epoch 0 with `members`, checked like `AddNode` each, with at
    /// least [`MIN_REPLICAS`] replicas.
    ///
    /// # Errors
    /// The first [`CommandRefusal`] that applies.
    pub fn genesis(
        ca: CertificateDer<'static>,
        members: Vec<Member>,
        now: UnixTime,
    ) -> Result<Self, CommandRefusal> {
        Self::genesis_checked_at(ca, members, |_| Ok(now))
    }

    /// The genesis membership read as history: each certificate is checked against the CA
    /// (chain, role, and no ordered CRL yet) at the start of its own validity, not at the
    /// current time. A node that restarts from its journal, or joins, years after genesis
    /// starts from this and then from the ordered membership (journal or state transfer),
    /// which is what decides who is a member now; the planes check current validity on every
    /// connection.
    ///
    /// # Errors
    /// As [`Membership::genesis`].
    pub fn genesis_history(
        ca: CertificateDer<'static>,
        members: Vec<Member>,
    ) -> Result<Self, CommandRefusal> {
        Self::genesis_checked_at(ca, members, |m| not_before(&m.certificate))
    }

    /// A genesis membership whose certificates are each checked at the time `at` gives.
    fn genesis_checked_at(
        ca: CertificateDer<'static>,
        members: Vec<Member>,
        at: impl Fn(&Member) -> Result<UnixTime, CommandRefusal>,
    ) -> Result<Self, CommandRefusal> {
        let mut m = Self {
            epoch: 0,
            ca,
            members: BTreeMap::new(),
            crl: None,
            revoked: BTreeSet::new(),
        };
        for member in members {
            let id = m.admit(&member.certificate, at(&member)?)?;
            m.members.insert(id, member);
        }
        if m.replicas() < MIN_REPLICAS {
            return Err(CommandRefusal::TooFewReplicas(m.replicas()));
        }
        Ok(m)
    }

    /// The epoch number (advances by one per applied command).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The members.
    pub fn members(&self) -> &BTreeMap<NodeId, Member> {
        &self.members
    }

    /// Number of replicas n.
    pub fn replicas(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.role == Role::Replica)
            .count()
    }

    /// Whether fewer than [`MIN_REPLICAS`] replicas remain (a CRL revoked replicas of a
    /// group of four): the group keeps f = 1, so every replica is needed to make progress
    /// (it stays safe against one faulty replica), and an operator should add replicas.
    pub fn is_degraded(&self) -> bool {
        self.replicas() < MIN_REPLICAS
    }

    /// Faults tolerated ([`securesmart_base::quorum::faults`]: (n - 1) / 3, and at
    /// least 1 for n >= 2, so that a group a CRL shrank stays safe against one fault).
    pub fn f(&self) -> usize {
        securesmart_base::quorum::faults(self.replicas())
    }

    /// Quorum size: ceil((n + f + 1) / 2), the smallest size whose any two sets share f + 1
    /// replicas (2f + 1 when n = 3f + 1; the ordering layer uses the same rule).
    pub fn quorum(&self) -> usize {
        securesmart_base::quorum::quorum(self.replicas())
    }

    /// Replies a client needs: f + 1.
    pub fn reply_quorum(&self) -> usize {
        self.f() + 1
    }

    /// The current CRL (number and DER), if any.
    pub fn crl(&self) -> Option<&(u64, CertificateRevocationListDer<'static>)> {
        self.crl.as_ref()
    }

    /// Whether the current CRL (already checked to be our CA's when it was ordered) lists
    /// `certificate` (DER) as revoked: same issuer, same serial. Time plays no part (an
    /// expired CRL still revokes), so every replica decides alike at the same log position. A
    /// certificate that does not parse counts as revoked.
    pub fn revokes(&self, certificate: &[u8]) -> bool {
        use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};
        let Some((_, crl)) = &self.crl else {
            return false;
        };
        let Ok((_, cert)) = X509Certificate::from_der(certificate) else {
            return true;
        };
        let Ok((_, crl)) = CertificateRevocationList::from_der(crl.as_ref()) else {
            return false;
        };
        crl.issuer() == cert.issuer()
            && crl
                .iter_revoked_certificates()
                .any(|r| r.raw_serial() == cert.raw_serial())
    }

    /// Whether `id`'s certificate is revoked (an ordered `RevokeCertificates` proved it): it
    /// authorizes nothing, however its requests reach the order.
    pub fn is_revoked(&self, id: &NodeId) -> bool {
        self.revoked.contains(id)
    }

    /// How many revoked certificates it records.
    pub fn revoked_count(&self) -> usize {
        self.revoked.len()
    }

    /// The transport trust configuration this membership implies for the replica plane: the
    /// CA, the CRL, and the replicas with their replica-plane addresses.
    pub fn replica_trust(&self) -> TrustConfig {
        let mut t = TrustConfig::new(self.ca.clone());
        t.crls = self.crl.iter().map(|(_, c)| c.clone()).collect();
        for (id, m) in &self.members {
            if m.role == Role::Replica {
                t.peers.insert(*id, m.replica_addr);
            }
        }
        t
    }

    /// A trust state of the CA and the current CRL, with `peers` as the peer set.
    fn trust_with(
        &self,
        peers: impl IntoIterator<Item = NodeId>,
    ) -> Result<TrustState, CommandRefusal> {
        let mut trust = TrustConfig::new(self.ca.clone());
        trust.crls = self.crl.iter().map(|(_, c)| c.clone()).collect();
        let nowhere = SocketAddr::from((Ipv6Addr::LOCALHOST, 0));
        trust.peers = peers.into_iter().map(|id| (id, nowhere)).collect();
        TrustState::new(trust).map_err(|e| CommandRefusal::BadCrl(e.to_string()))
    }

    /// A trust state of the CA, the current CRL and all members.
    fn member_trust(&self) -> Result<TrustState, CommandRefusal> {
        self.trust_with(self.members.keys().copied())
    }

    /// Checks a certificate against the CA and the current CRL, as a replica's.
    fn admit(&self, cert: &[u8], now: UnixTime) -> Result<NodeId, CommandRefusal> {
        let der = CertificateDer::from(cert.to_vec());
        let info =
            CertInfo::parse(&der).map_err(|e| CommandRefusal::BadCertificate(e.to_string()))?;
        if info.role != Role::Replica {
            return Err(CommandRefusal::NotReplica);
        }
        if self.members.contains_key(&info.id) {
            return Err(CommandRefusal::AlreadyMember);
        }
        let state = self
            .trust_with([info.id])
            .map_err(|e| CommandRefusal::CertificateRefused(e.to_string()))?;
        state
            .verify_replica(&[der], now)
            .map_err(|r| CommandRefusal::CertificateRefused(r.to_string()))?;
        Ok(info.id)
    }

    /// Applies an ordered command: the same result at every correct replica for the same
    /// membership, command and log time `now`. On success the epoch advances by one.
    ///
    /// # Errors
    /// [`CommandRefusal`]; the membership is then unchanged.
    pub fn apply(
        &mut self,
        command: &MembershipCommand,
        now: UnixTime,
    ) -> Result<Applied, CommandRefusal> {
        let applied = match command {
            MembershipCommand::AddNode {
                certificate,
                key_package,
                replica_addr,
                client_addr,
            } => {
                let id = self.admit(certificate, now)?;
                self.members.insert(
                    id,
                    Member {
                        certificate: CertificateDer::from(certificate.clone()),
                        replica_addr: *replica_addr,
                        client_addr: *client_addr,
                        role: Role::Replica,
                        key_package: key_package.clone(),
                    },
                );
                Applied::Added(id)
            }
            MembershipCommand::RemoveNode { id } => {
                let member = self.members.get(id).ok_or(CommandRefusal::NotMember)?;
                if member.role == Role::Replica && self.replicas() <= MIN_REPLICAS {
                    return Err(CommandRefusal::TooFewReplicas(self.replicas() - 1));
                }
                self.members.remove(id);
                Applied::Removed(*id)
            }
            MembershipCommand::UpdateCrl { crl } => {
                let der = CertificateRevocationListDer::from(crl.clone());
                let number = crl_number(&der)?;
                // Signed by our CA, checked on its own: comparing members' verdicts at `now`
                // alone let a CRL with any signature through at a time when no certificate
                // was valid yet.
                self.check_crl_signature(&der)?;
                let current = self.crl.as_ref().map_or(0, |(n, _)| *n);
                if number <= current {
                    return Err(CommandRefusal::StaleCrl {
                        new: number,
                        current,
                    });
                }
                let mut next = self.clone();
                next.crl = Some((number, der));
                next.member_trust()?;
                // Members the new CRL lists leave, whatever `now` is: a verdict at `now` would
                // say "expired" or "not valid yet" before "revoked", and keep a revoked
                // replica whose certificate expired (or that a primary's early time made not
                // yet valid) voting.
                let revoked: Vec<NodeId> = self
                    .members
                    .iter()
                    .filter(|(_, m)| m.role == Role::Replica && next.revokes(&m.certificate))
                    .map(|(id, _)| *id)
                    .collect();
                // Revocation always works: a revoked replica never keeps its vote, and refusing
                // the CRL would also keep every later revocation (all CRLs are cumulative) from
                // taking effect. Below MIN_REPLICAS the group keeps f = 1 (every replica is
                // needed to make progress) until an operator adds replicas; see `is_degraded`.
                if self.replicas() == revoked.len() {
                    return Err(CommandRefusal::NoReplicaLeft);
                }
                for id in &revoked {
                    next.members.remove(id);
                }
                *self = next;
                Applied::CrlUpdated { removed: revoked }
            }
            MembershipCommand::AddAdmin { .. } | MembershipCommand::RemoveAdmin { .. } => {
                return Err(CommandRefusal::NotMembership);
            }
            MembershipCommand::RenewNode { certificate } => {
                let der = CertificateDer::from(certificate.clone());
                let info = CertInfo::parse(&der)
                    .map_err(|e| CommandRefusal::BadCertificate(e.to_string()))?;
                let current = match self.members.get(&info.id) {
                    Some(m) if m.role == Role::Replica => m.certificate.clone(),
                    _ => return Err(CommandRefusal::NotMember),
                };
                // Only forward: a renewal issued after the current certificate. Swapping back
                // to an older certificate of the same key would dodge a CRL that names the
                // newer one's serial (and churn rosters).
                if !starts_later(certificate, current.as_ref())? {
                    return Err(CommandRefusal::CertificateRefused(
                        "not issued after the current certificate".into(),
                    ));
                }
                if info.role != Role::Replica {
                    return Err(CommandRefusal::NotReplica);
                }
                if self.revokes(certificate) || self.is_revoked(&info.id) {
                    return Err(CommandRefusal::CertificateRefused("revoked".into()));
                }
                self.trust_with([info.id])?
                    .verify_replica(std::slice::from_ref(&der), now)
                    .map_err(|r| CommandRefusal::CertificateRefused(r.to_string()))?;
                if let Some(m) = self.members.get_mut(&info.id) {
                    m.certificate = der;
                }
                Applied::Renewed(info.id)
            }
            MembershipCommand::RevokeCertificates { certificates } => {
                // Cheap first: certificates of ids already recorded (or twice in the command)
                // cost a parse, not a chain check.
                let mut fresh = Vec::new();
                for cert in certificates {
                    let der = CertificateDer::from(cert.clone());
                    let Ok(info) = CertInfo::parse(&der) else {
                        continue;
                    };
                    if !self.revoked.contains(&info.id)
                        && !fresh.iter().any(|(id, _)| *id == info.id)
                    {
                        fresh.push((info.id, der));
                    }
                }
                if fresh.is_empty() {
                    return Err(CommandRefusal::NothingToRevoke);
                }
                // Each one proves itself (our CA's, listed by the current CRL); one that does
                // not is skipped, and does not keep the others out.
                let ca = self.trust_with([])?;
                let mut ids = Vec::new();
                let mut last_refusal = String::new();
                for (id, der) in fresh {
                    match ca.issued(&der) {
                        Ok(_) if self.revokes(der.as_ref()) => ids.push(id),
                        Ok(_) => last_refusal = format!("the current CRL does not list {id}"),
                        Err(r) => last_refusal = r.to_string(),
                    }
                }
                if ids.is_empty() {
                    return Err(CommandRefusal::NotRevoked(last_refusal));
                }
                if self.revoked.len() + ids.len() > MAX_REVOKED {
                    return Err(CommandRefusal::TooManyRevoked);
                }
                self.revoked.extend(ids.iter().copied());
                Applied::CertificatesRevoked(ids)
            }
        };
        self.epoch += 1;
        Ok(applied)
    }
}

impl Membership {
    /// Whether our CA issued and signed `crl` (issuer name and signature, whatever the time).
    /// Checks a certificate for [`MembershipCommand::AddAdmin`]: a client certificate our CA
    /// issued, valid at `now`, that neither the ordered CRL nor an ordered
    /// `RevokeCertificates` revokes.
    ///
    /// # Errors
    /// [`CommandRefusal::BadCertificate`] or [`CommandRefusal::CertificateRefused`].
    pub fn admissible_admin(&self, cert: &[u8], now: UnixTime) -> Result<NodeId, CommandRefusal> {
        if !valid_at(cert, now) {
            return Err(CommandRefusal::CertificateRefused(
                "not valid at the ordered time".into(),
            ));
        }
        let der = CertificateDer::from(cert.to_vec());
        let info =
            CertInfo::parse(&der).map_err(|e| CommandRefusal::BadCertificate(e.to_string()))?;
        if info.role != Role::Client {
            return Err(CommandRefusal::CertificateRefused(
                "an administrator has a client certificate".into(),
            ));
        }
        self.trust_with([])?
            .issued(&der)
            .map_err(|r| CommandRefusal::CertificateRefused(r.to_string()))?;
        if self.revokes(cert) || self.is_revoked(&info.id) {
            return Err(CommandRefusal::CertificateRefused("revoked".into()));
        }
        Ok(info.id)
    }

    /// The CRL number of `crl` if our CA issued and signed it (so a node can tell a CRL file
    /// newer than the ordered one from a stale or foreign one).
    pub fn our_crl_number(&self, crl: &CertificateRevocationListDer<'_>) -> Option<u64> {
        self.check_crl_signature(crl).ok()?;
        crl_number(crl).ok()
    }

    fn check_crl_signature(
        &self,
        crl: &CertificateRevocationListDer<'_>,
    ) -> Result<(), CommandRefusal> {
        use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};
        let bad = |why: &str| CommandRefusal::BadCrl(why.to_owned());
        let (_, ca) =
            X509Certificate::from_der(self.ca.as_ref()).map_err(|_| bad("CA certificate"))?;
        let (_, crl) =
            CertificateRevocationList::from_der(crl.as_ref()).map_err(|e| bad(&e.to_string()))?;
        if crl.issuer() != ca.subject() {
            return Err(bad("not issued by our CA"));
        }
        crl.verify_signature(ca.public_key())
            .map_err(|_| bad("not signed by our CA"))
    }
}

/// Whether `cert` is within its validity at `now` (a certificate that does not parse is not).
pub fn valid_at(cert: &[u8], now: UnixTime) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, x509)) = X509Certificate::from_der(cert) else {
        return false;
    };
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let v = x509.validity();
    v.not_before.timestamp() <= now && now <= v.not_after.timestamp()
}

/// Whether certificate `new` starts to be valid later than `held` (a renewal goes only
/// forward: swapping back to an older certificate of the same key would dodge a CRL naming
/// the newer one's serial).
///
/// # Errors
/// [`CommandRefusal::BadCertificate`] if either does not parse.
pub fn starts_later(new: &[u8], held: &[u8]) -> Result<bool, CommandRefusal> {
    Ok(not_before(new)? > not_before(held)?)
}

/// A second into a certificate's validity (its notBefore, plus one).
fn not_before(cert: &[u8]) -> Result<UnixTime, CommandRefusal> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, x509) = X509Certificate::from_der(cert)
        .map_err(|e| CommandRefusal::BadCertificate(e.to_string()))?;
    let secs = x509.validity().not_before.timestamp().saturating_add(1);
    let secs =
        u64::try_from(secs).map_err(|_| CommandRefusal::BadCertificate("notBefore".into()))?;
    Ok(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        secs,
    )))
}

/// The CRL number of a CRL (strict parse; the signature is checked on its own).
fn crl_number(der: &CertificateRevocationListDer<'_>) -> Result<u64, CommandRefusal> {
    use x509_parser::prelude::FromDer;
    let (rest, crl) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(der.as_ref())
            .map_err(|e| CommandRefusal::BadCrl(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CommandRefusal::BadCrl("trailing bytes".into()));
    }
    let n = crl
        .crl_number()
        .ok_or_else(|| CommandRefusal::BadCrl("no CRL number".into()))?;
    u64::try_from(n.clone()).map_err(|_| CommandRefusal::BadCrl("CRL number too large".into()))
}

/// Members in an encoded membership at most.
pub const MAX_MEMBERS: usize = 1024;

impl Membership {
    /// Encodes the whole membership (version 2): epoch, CA certificate, members, CRL, revoked ids. Part of
    /// the replicated state (snapshots, state transfer).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(VERSION)
            .raw(&self.epoch.to_be_bytes())
            .bytes(self.ca.as_ref())
            .u32(u32::try_from(self.members.len()).unwrap_or(u32::MAX));
        for m in self.members.values() {
            w.bytes(m.certificate.as_ref())
                .u8(if m.role == Role::Replica { 1 } else { 2 })
                .bytes(&m.key_package);
            w.addr(&m.replica_addr);
            w.addr(&m.client_addr);
        }
        match &self.crl {
            Some((number, der)) => {
                w.u8(1).raw(&number.to_be_bytes()).bytes(der.as_ref());
            }
            None => {
                w.u8(0);
            }
        }
        w.count(self.revoked.len());
        for id in &self.revoked {
            w.raw(id.as_bytes());
        }
        w.buf
    }

    /// Decodes a membership made by [`Membership::encode`]. Member ids are recomputed from the
    /// certificates (a certificate that does not parse is an error); certificates are not
    /// re-verified (the bytes come from a certified snapshot).
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        r.version(VERSION)?;
        let epoch = u64::from_be_bytes(r.array()?);
        let ca = CertificateDer::from(r.bytes("CA certificate", MAX_CERT_BYTES)?.to_vec());
        let n = r.u32()? as usize;
        if n > MAX_MEMBERS {
            return Err(WireError::TooLong {
                what: "members",
                len: n,
                max: MAX_MEMBERS,
            });
        }
        let mut members = BTreeMap::new();
        for _ in 0..n {
            let certificate =
                CertificateDer::from(r.bytes("certificate", MAX_CERT_BYTES)?.to_vec());
            let role = match r.u8()? {
                1 => Role::Replica,
                2 => Role::Client,
                other => {
                    return Err(WireError::Unknown {
                        what: "role",
                        value: other.into(),
                    });
                }
            };
            let key_package = r.bytes("key package", MAX_KEY_PACKAGE_BYTES)?.to_vec();
            let replica_addr = r.addr()?;
            let client_addr = r.addr()?;
            let id =
                securesmart_transport::node_id(&certificate).map_err(|_| WireError::Unknown {
                    what: "member certificate",
                    value: 0,
                })?;
            members.insert(
                id,
                Member {
                    certificate,
                    replica_addr,
                    client_addr,
                    role,
                    key_package,
                },
            );
        }
        let crl = match r.u8()? {
            0 => None,
            1 => {
                let number = u64::from_be_bytes(r.array()?);
                let der = r.bytes("CRL", MAX_CRL_BYTES)?.to_vec();
                Some((number, CertificateRevocationListDer::from(der)))
            }
            other => {
                return Err(WireError::Unknown {
                    what: "CRL presence",
                    value: other.into(),
                });
            }
        };
        let n = r.count("revoked certificates", MAX_REVOKED)?;
        let mut revoked = BTreeSet::new();
        for _ in 0..n {
            revoked.insert(NodeId::from_bytes(r.array()?));
        }
        r.finish()?;
        Ok(Self {
            epoch,
            ca,
            members,
            crl,
            revoked,
        })
    }

    /// The replicas' node ids, in order.
    pub fn replica_ids(&self) -> Vec<NodeId> {
        self.members
            .iter()
            .filter(|(_, m)| m.role == Role::Replica)
            .map(|(id, _)| *id)
            .collect()
    }
}

impl MembershipCommand {
    /// The command's kind (its tag on the wire).
    pub fn kind(&self) -> CommandKind {
        match self {
            MembershipCommand::AddNode { .. } => CommandKind::AddNode,
            MembershipCommand::RemoveNode { .. } => CommandKind::RemoveNode,
            MembershipCommand::UpdateCrl { .. } => CommandKind::UpdateCrl,
            MembershipCommand::RevokeCertificates { .. } => CommandKind::RevokeCertificates,
            MembershipCommand::AddAdmin { .. } => CommandKind::AddAdmin,
            MembershipCommand::RemoveAdmin { .. } => CommandKind::RemoveAdmin,
            MembershipCommand::RenewNode { .. } => CommandKind::RenewNode,
        }
    }

    /// Encodes the command (version 1).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(COMMAND_VERSION).u8(self.kind().tag());
        match self {
            MembershipCommand::AddNode {
                certificate,
                key_package,
                replica_addr,
                client_addr,
            } => {
                w.bytes(certificate).bytes(key_package);
                w.addr(replica_addr);
                w.addr(client_addr);
            }
            MembershipCommand::RemoveNode { id } => {
                w.raw(id.as_bytes());
            }
            MembershipCommand::UpdateCrl { crl } => {
                w.bytes(crl);
            }
            MembershipCommand::RevokeCertificates { certificates } => {
                w.count(certificates.len());
                for c in certificates {
                    w.bytes(c);
                }
            }
            MembershipCommand::AddAdmin { certificate } => {
                w.bytes(certificate);
            }
            MembershipCommand::RemoveAdmin { id } => {
                w.raw(id.as_bytes());
            }
            MembershipCommand::RenewNode { certificate } => {
                w.bytes(certificate);
            }
        }
        w.buf
    }

    /// Decodes a command; the whole input must be one command within the limits.
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        r.version(COMMAND_VERSION)?;
        let cmd = match CommandKind::from_tag(r.u8()?)? {
            CommandKind::AddNode => MembershipCommand::AddNode {
                certificate: r.bytes("certificate", MAX_CERT_BYTES)?.to_vec(),
                key_package: r.bytes("key package", MAX_KEY_PACKAGE_BYTES)?.to_vec(),
                replica_addr: r.addr()?,
                client_addr: r.addr()?,
            },
            CommandKind::RemoveNode => MembershipCommand::RemoveNode {
                id: NodeId::from_bytes(r.array()?),
            },
            CommandKind::UpdateCrl => MembershipCommand::UpdateCrl {
                crl: r.bytes("crl", MAX_CRL_BYTES)?.to_vec(),
            },
            CommandKind::RevokeCertificates => {
                let n = r.count("revoked certificates", MAX_CERTS_PER_COMMAND)?;
                let certificates = (0..n)
                    .map(|_| r.bytes("certificate", MAX_CERT_BYTES).map(<[u8]>::to_vec))
                    .collect::<Result<_, _>>()?;
                MembershipCommand::RevokeCertificates { certificates }
            }
            CommandKind::AddAdmin => MembershipCommand::AddAdmin {
                certificate: r.bytes("certificate", MAX_CERT_BYTES)?.to_vec(),
            },
            CommandKind::RemoveAdmin => MembershipCommand::RemoveAdmin {
                id: NodeId::from_bytes(r.array()?),
            },
            CommandKind::RenewNode => MembershipCommand::RenewNode {
                certificate: r.bytes("certificate", MAX_CERT_BYTES)?.to_vec(),
            },
        };
        r.finish()?;
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust_center::{Reason, RevokeTarget, RoleName, TrustCenter, key_and_csr};
    use rustls::pki_types::pem::PemObject;
    use std::time::Duration;

    struct Fixture {
        ca: TrustCenter,
        dir: std::path::PathBuf,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture() -> Fixture {
        let dir = std::env::temp_dir().join(format!("ss-epoch-{:016x}", rand::random::<u64>()));
        Fixture {
            ca: TrustCenter::init(&dir, "epoch CA").unwrap(),
            dir,
        }
    }

    fn issue(ca: &mut TrustCenter, name: &str, role: RoleName) -> Vec<u8> {
        let token = ca
            .create_token(role, &[name.into()], Duration::from_secs(600))
            .unwrap();
        let (_k, csr) = key_and_csr(&[name.into()]).unwrap();
        let csr = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .unwrap();
        ca.sign_csr(&csr, &token).unwrap().certificate.to_vec()
    }

    fn member(cert: Vec<u8>, port: u16) -> Member {
        Member {
            certificate: CertificateDer::from(cert),
            replica_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            client_addr: SocketAddr::from(([127, 0, 0, 1], port + 1000)),
            role: Role::Replica,
            key_package: vec![port as u8],
        }
    }

    fn add(cert: Vec<u8>, port: u16) -> MembershipCommand {
        MembershipCommand::AddNode {
            certificate: cert,
            key_package: vec![1, 2, 3],
            replica_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            client_addr: SocketAddr::from(([127, 0, 0, 1], port + 1000)),
        }
    }

    fn genesis(fx: &mut Fixture, n: u16) -> Membership {
        let members = (0..n)
            .map(|i| {
                member(
                    issue(&mut fx.ca, &format!("r{i}"), RoleName::Replica),
                    7000 + i,
                )
            })
            .collect();
        Membership::genesis(fx.ca.ca_certificate(), members, UnixTime::now()).unwrap()
    }

    #[test]
    fn quorum_arithmetic_follows_n() {
        let mut fx = fixture();
        let mut m = genesis(&mut fx, 4);
        assert_eq!(
            (m.replicas(), m.f(), m.quorum(), m.reply_quorum()),
            (4, 1, 3, 2)
        );
        for i in 0..3 {
            let cert = issue(&mut fx.ca, &format!("x{i}"), RoleName::Replica);
            m.apply(&add(cert, 7100 + i), UnixTime::now()).unwrap();
        }
        assert_eq!((m.replicas(), m.f(), m.quorum(), m.epoch()), (7, 2, 5, 3));
        let three: Vec<Member> = (0..3)
            .map(|i| {
                member(
                    issue(&mut fx.ca, &format!("s{i}"), RoleName::Replica),
                    7200 + i,
                )
            })
            .collect();
        assert_eq!(
            Membership::genesis(fx.ca.ca_certificate(), three, UnixTime::now()),
            Err(CommandRefusal::TooFewReplicas(3))
        );
    }

    #[test]
    fn add_and_remove_are_validated_and_refusals_change_nothing() {
        let mut fx = fixture();
        let mut m = genesis(&mut fx, 4);
        let now = UnixTime::now();
        let newcomer = issue(&mut fx.ca, "new", RoleName::Replica);
        let client = issue(&mut fx.ca, "client", RoleName::Client);
        let mut other = fixture();
        let foreign = issue(&mut other.ca, "foreign", RoleName::Replica);
        let before = m.clone();
        for (cmd, expected) in [
            (add(vec![1, 2, 3], 1), "bad certificate"),
            (add(client, 1), "not replica"),
            (add(foreign, 1), "certificate refused"),
            (
                add(
                    before
                        .members()
                        .values()
                        .next()
                        .unwrap()
                        .certificate
                        .to_vec(),
                    1,
                ),
                "already a member",
            ),
            (
                MembershipCommand::RemoveNode {
                    id: NodeId::from_bytes([7; 32]),
                },
                "not a member",
            ),
            (
                MembershipCommand::RemoveNode {
                    id: *before.members().keys().next().unwrap(),
                },
                "fewer than the minimum",
            ),
        ] {
            let err = m.apply(&cmd, now).unwrap_err().to_string();
            assert!(err.to_lowercase().contains(expected), "{err} vs {expected}");
            assert_eq!(m, before, "a refused command changes nothing");
        }
        let Applied::Added(id) = m.apply(&add(newcomer, 7300), now).unwrap() else {
            panic!()
        };
        assert_eq!((m.epoch(), m.replicas()), (1, 5));
        assert_eq!(
            m.replica_trust().peers.get(&id),
            Some(&SocketAddr::from(([127, 0, 0, 1], 7300)))
        );
        assert_eq!(
            m.apply(&MembershipCommand::RemoveNode { id }, now),
            Ok(Applied::Removed(id))
        );
        assert_eq!((m.epoch(), m.replicas()), (2, 4));
    }

    #[test]
    fn a_revoked_client_certificate_names_its_node_once_the_crl_lists_it() {
        let mut fx = fixture();
        let mut m = genesis(&mut fx, 4);
        let now = UnixTime::now();
        let client = issue(&mut fx.ca, "client.example", RoleName::Client);
        let client_id =
            securesmart_transport::node_id(&CertificateDer::from(client.clone())).unwrap();
        let revoke = |certs: Vec<Vec<u8>>| MembershipCommand::RevokeCertificates {
            certificates: certs,
        };
        // Not listed by the current CRL (there is none yet): refused.
        assert!(matches!(
            m.apply(&revoke(vec![client.clone()]), now),
            Err(CommandRefusal::NotRevoked(_))
        ));
        fx.ca
            .revoke(&RevokeTarget::NodeId(client_id), Reason::KeyCompromise)
            .unwrap();
        let crl = fx.ca.crl(Duration::from_secs(3600)).unwrap().to_vec();
        m.apply(&MembershipCommand::UpdateCrl { crl }, now).unwrap();
        assert!(!m.is_revoked(&client_id), "the CRL lists serials, not ids");
        // A certificate of another CA with the same issuer name and a revoked serial proves
        // nothing (a forger would otherwise revoke anyone's key).
        let mut other = fixture();
        let foreign = issue(&mut other.ca, "client.example", RoleName::Client);
        assert!(matches!(
            m.apply(&revoke(vec![foreign]), now),
            Err(CommandRefusal::NotRevoked(_))
        ));
        // The revoked certificate itself names its node, once; the record survives encoding.
        assert_eq!(
            m.apply(&revoke(vec![client.clone(), client.clone()]), now),
            Ok(Applied::CertificatesRevoked(vec![client_id]))
        );
        assert!(m.is_revoked(&client_id));
        assert_eq!(
            m.apply(&revoke(vec![client.clone()]), now),
            Err(CommandRefusal::NothingToRevoke)
        );
        assert_eq!(Membership::decode(&m.encode()).unwrap(), m);
        let command = revoke(vec![client]);
        assert_eq!(MembershipCommand::decode(&command.encode()), Ok(command));
    }

    /// A replica's renewed certificate (same key) replaces the old one in the membership, so
    /// that a later CRL listing the new serial removes it; a certificate for a key that is no
    /// member, of another role, or revoked is refused.
    #[test]
    fn a_renewed_certificate_replaces_the_old_one() {
        let mut fx = fixture();
        let names = ["r1".to_owned()];
        let token = fx
            .ca
            .create_token(RoleName::Replica, &names, Duration::from_secs(600))
            .unwrap();
        let (key, csr) = key_and_csr(&names).unwrap();
        let csr_der = |pem: &str| {
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap()
        };
        let old = fx.ca.sign_csr(&csr_der(&csr), &token).unwrap();
        let mut members: Vec<Member> = (0..3)
            .map(|i| {
                member(
                    issue(&mut fx.ca, &format!("x{i}"), RoleName::Replica),
                    7000 + i,
                )
            })
            .collect();
        members.push(member(old.certificate.to_vec(), 7010));
        let mut m = Membership::genesis(fx.ca.ca_certificate(), members, UnixTime::now()).unwrap();
        let id = securesmart_transport::node_id(&old.certificate).unwrap();
        let pair = rcgen::KeyPair::from_pem(&key).unwrap();
        let again = rcgen::CertificateParams::new(names.to_vec())
            .unwrap()
            .serialize_request(&pair)
            .unwrap()
            .pem()
            .unwrap();
        let renewed = fx
            .ca
            .renew(old.certificate.as_ref(), &csr_der(&again))
            .unwrap();
        let renew = |c: &[u8]| MembershipCommand::RenewNode {
            certificate: c.to_vec(),
        };
        assert_eq!(
            m.apply(&renew(renewed.certificate.as_ref()), UnixTime::now()),
            Ok(Applied::Renewed(id))
        );
        assert_eq!(m.members()[&id].certificate, renewed.certificate);
        assert_eq!(m.replicas(), 4);
        // Never back to an older certificate of the key (it would dodge a CRL naming the new
        // serial), nor the same one again.
        for back in [old.certificate.as_ref(), renewed.certificate.as_ref()] {
            assert!(matches!(
                m.apply(&renew(back), UnixTime::now()),
                Err(CommandRefusal::CertificateRefused(_))
            ));
        }
        let stranger = issue(&mut fx.ca, "stranger", RoleName::Replica);
        assert_eq!(
            m.apply(&renew(&stranger), UnixTime::now()),
            Err(CommandRefusal::NotMember)
        );
        // Revoking the renewed certificate's serial now removes the replica.
        fx.ca
            .revoke(
                &RevokeTarget::Serial(renewed.record.serial.clone()),
                Reason::KeyCompromise,
            )
            .unwrap();
        let crl = fx.ca.crl(Duration::from_secs(3600)).unwrap().to_vec();
        let mut more = m.clone();
        assert!(matches!(
            more.apply(&MembershipCommand::UpdateCrl { crl: crl.clone() }, UnixTime::now()),
            Ok(Applied::CrlUpdated { removed }) if removed == vec![id]
        ));
        m.apply(&MembershipCommand::UpdateCrl { crl }, UnixTime::now())
            .unwrap();
        assert!(!m.members().contains_key(&id));
        assert!(
            m.apply(&renew(renewed.certificate.as_ref()), UnixTime::now())
                .is_err()
        );
    }

    /// A CRL removes the replicas it lists whatever the ordered time: one whose certificate
    /// expired (or, at a time a faulty primary chose, is not valid yet) leaves all the same.
    #[test]
    fn a_crl_removes_the_replicas_it_lists_whatever_the_time() {
        let mut fx = fixture();
        let mut m = genesis(&mut fx, 5);
        let victim = *m.members().keys().nth(1).unwrap();
        fx.ca
            .revoke(&RevokeTarget::NodeId(victim), Reason::KeyCompromise)
            .unwrap();
        let crl = fx.ca.crl(Duration::from_secs(3600)).unwrap().to_vec();
        let years = UnixTime::since_unix_epoch(Duration::from_secs(
            UnixTime::now().as_secs() + 2 * 365 * 24 * 3600,
        ));
        assert_eq!(
            m.clone()
                .apply(&MembershipCommand::UpdateCrl { crl: crl.clone() }, years),
            Ok(Applied::CrlUpdated {
                removed: vec![victim]
            }),
            "its certificate expired long ago"
        );
        let before = UnixTime::since_unix_epoch(Duration::from_secs(1));
        assert_eq!(
            m.apply(&MembershipCommand::UpdateCrl { crl }, before),
            Ok(Applied::CrlUpdated {
                removed: vec![victim]
            }),
            "not valid yet at the ordered time"
        );
    }

    /// Genesis read as history: long after its certificates expired, the genesis membership
    /// still forms (a node restarts from its journal on it), and a certificate of another CA
    /// is refused in it as before.
    #[test]
    fn genesis_is_history_and_does_not_expire() {
        let mut fx = fixture();
        let members: Vec<Member> = (0..4)
            .map(|i| {
                member(
                    issue(&mut fx.ca, &format!("r{i}"), RoleName::Replica),
                    7000 + i,
                )
            })
            .collect();
        let years = UnixTime::since_unix_epoch(
            Duration::from_secs(UnixTime::now().as_secs())
                + Duration::from_secs(3 * 365 * 24 * 3600),
        );
        assert!(Membership::genesis(fx.ca.ca_certificate(), members.clone(), years).is_err());
        let m = Membership::genesis_history(fx.ca.ca_certificate(), members.clone()).unwrap();
        assert_eq!(m.replicas(), 4);
        let mut other = fixture();
        let mut mixed = members;
        mixed[0] = member(issue(&mut other.ca, "stranger", RoleName::Replica), 7100);
        assert!(matches!(
            Membership::genesis_history(fx.ca.ca_certificate(), mixed),
            Err(CommandRefusal::CertificateRefused(_))
        ));
    }

    /// A week after the ordered CRL expired, a fresh CRL of our CA replaces it (members'
    /// verdicts go from "revocation unknown" to "ok"), and adding a replica works again. The
    /// dates refuse nothing: a newer CRL that expired already, or one from a CA whose clock is
    /// ahead, is taken too (a higher number only adds revocations).
    #[test]
    fn an_expired_ordered_crl_is_replaced_by_a_fresh_one() {
        use std::time::{SystemTime, UNIX_EPOCH};
        let mut fx = fixture();
        let mut m = genesis(&mut fx, 4);
        let hour = Duration::from_secs(3600);
        let t0 = SystemTime::now();
        let at = |t: SystemTime| UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap());
        let first = fx.ca.crl_at(hour, t0).unwrap().to_vec();
        m.apply(&MembershipCommand::UpdateCrl { crl: first }, at(t0))
            .unwrap();
        // A week later the ordered CRL has expired: nobody can be added.
        let later = t0 + Duration::from_secs(7 * 24 * 3600);
        let joiner = member(issue(&mut fx.ca, "r9", RoleName::Replica), 7009);
        let add = MembershipCommand::AddNode {
            certificate: joiner.certificate.to_vec(),
            key_package: Vec::new(),
            replica_addr: joiner.replica_addr,
            client_addr: joiner.client_addr,
        };
        assert!(matches!(
            m.clone().apply(&add, at(later)),
            Err(CommandRefusal::CertificateRefused(_))
        ));
        let stale = fx.ca.crl_at(hour, later - 2 * hour).unwrap().to_vec();
        assert!(
            m.apply(&MembershipCommand::UpdateCrl { crl: stale }, at(later))
                .is_ok()
        );
        assert!(m.clone().apply(&add, at(later)).is_err(), "still expired");
        let early = fx.ca.crl_at(hour, later + 2 * hour).unwrap().to_vec();
        assert!(
            m.apply(&MembershipCommand::UpdateCrl { crl: early }, at(later))
                .is_ok()
        );
        let fresh = fx.ca.crl_at(hour, later).unwrap().to_vec();
        assert_eq!(
            m.apply(&MembershipCommand::UpdateCrl { crl: fresh }, at(later)),
            Ok(Applied::CrlUpdated { removed: vec![] })
        );
        assert!(m.apply(&add, at(later)).is_ok(), "AddNode works again");
    }

    #[test]
    fn crl_updates_remove_revoked_members_and_refuse_stale_or_foreign_crls() {
        let mut fx = fixture();
        let mut m = genesis(&mut fx, 5);
        let now = UnixTime::now();
        let victim = *m.members().keys().nth(2).unwrap();
        fx.ca
            .revoke(&RevokeTarget::NodeId(victim), Reason::KeyCompromise)
            .unwrap();
        let crl = fx.ca.crl(Duration::from_secs(3600)).unwrap().to_vec();
        let mut other = fixture();
        let foreign = other.ca.crl(Duration::from_secs(3600)).unwrap().to_vec();
        let before = m.clone();
        let err = m
            .apply(
                &MembershipCommand::UpdateCrl {
                    crl: foreign.clone(),
                },
                now,
            )
            .unwrap_err();
        assert!(matches!(err, CommandRefusal::BadCrl(_)), "{err}");
        assert_eq!(m, before);
        // Also when ordered with a time at which no member's certificate is valid yet (their
        // verdicts then agree under both CRLs): the signature is checked on its own.
        let epoch_start = UnixTime::since_unix_epoch(Duration::ZERO);
        let err = m
            .apply(
                &MembershipCommand::UpdateCrl {
                    crl: foreign.clone(),
                },
                epoch_start,
            )
            .unwrap_err();
        assert!(matches!(err, CommandRefusal::BadCrl(_)), "{err}");
        let mut tampered = crl.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            m.apply(&MembershipCommand::UpdateCrl { crl: tampered }, epoch_start),
            Err(CommandRefusal::BadCrl(_))
        ));
        assert_eq!(m, before);
        assert_eq!(
            m.apply(&MembershipCommand::UpdateCrl { crl: crl.clone() }, now),
            Ok(Applied::CrlUpdated {
                removed: vec![victim]
            })
        );
        assert_eq!((m.epoch(), m.replicas()), (1, 4));
        assert!(matches!(
            m.apply(&MembershipCommand::UpdateCrl { crl }, now),
            Err(CommandRefusal::StaleCrl { .. })
        ));
        // A revoked certificate cannot rejoin.
        let victim_cert = before.members()[&victim].certificate.to_vec();
        assert!(matches!(
            m.apply(&add(victim_cert, 1), now),
            Err(CommandRefusal::CertificateRefused(_))
        ));
        // Revocation always works: at n = 4 the revoked replica leaves all the same and the
        // group shrinks to three (degraded, until an operator adds a replica) ...
        let second = *m.members().keys().next().unwrap();
        fx.ca
            .revoke(&RevokeTarget::NodeId(second), Reason::KeyCompromise)
            .unwrap();
        let crl2 = fx.ca.crl(Duration::from_secs(3600)).unwrap().to_vec();
        assert_eq!(
            m.apply(&MembershipCommand::UpdateCrl { crl: crl2 }, now),
            Ok(Applied::CrlUpdated {
                removed: vec![second]
            })
        );
        assert_eq!(m.replicas(), 3);
        assert!(m.is_degraded());
        // Still safe against one faulty replica: every replica is needed now.
        assert_eq!((m.f(), m.quorum(), m.reply_quorum()), (1, 3, 2));
        assert!(!m.members().contains_key(&second));
        // ... later CRLs still apply (a client revoked after it is refused) ...
        let crl3 = fx.ca.crl(Duration::from_secs(3600)).unwrap().to_vec();
        assert!(
            m.apply(&MembershipCommand::UpdateCrl { crl: crl3 }, now)
                .is_ok()
        );
        // ... and only a CRL that revokes every replica is refused.
        let rest: Vec<NodeId> = m.members().keys().copied().collect();
        for id in rest {
            fx.ca
                .revoke(&RevokeTarget::NodeId(id), Reason::KeyCompromise)
                .unwrap();
        }
        let all = fx.ca.crl(Duration::from_secs(3600)).unwrap().to_vec();
        assert_eq!(
            m.apply(&MembershipCommand::UpdateCrl { crl: all }, now),
            Err(CommandRefusal::NoReplicaLeft)
        );
    }

    #[test]
    fn replicas_applying_the_same_log_agree() {
        let mut fx = fixture();
        let genesis = genesis(&mut fx, 4);
        let mut log = Vec::new();
        for i in 0..3 {
            log.push(add(
                issue(&mut fx.ca, &format!("j{i}"), RoleName::Replica),
                7400 + i,
            ));
        }
        log.push(add(vec![0; 10], 1)); // refused everywhere alike
        log.push(MembershipCommand::RemoveNode {
            id: *genesis.members().keys().next().unwrap(),
        });
        let now = UnixTime::now();
        let run = |log: &[MembershipCommand]| {
            let mut m = genesis.clone();
            let outcomes: Vec<bool> = log
                .iter()
                .map(|c| {
                    m.apply(&MembershipCommand::decode(&c.encode()).unwrap(), now)
                        .is_ok()
                })
                .collect();
            (m, outcomes)
        };
        let (a, oa) = run(&log);
        let (b, ob) = run(&log);
        assert_eq!(a, b);
        assert_eq!(oa, ob);
        assert_eq!(oa, vec![true, true, true, false, true]);
        assert_eq!(a.epoch(), 4);
    }

    #[test]
    fn a_membership_round_trips_through_its_encoding() {
        let mut fx = fixture();
        let mut m = genesis(&mut fx, 4);
        let leaf = m.members().values().next().unwrap().certificate.to_vec();
        fx.ca
            .revoke_certificate(&leaf, Reason::KeyCompromise)
            .unwrap();
        let crl = fx.ca.crl(Duration::from_secs(3600)).unwrap();
        let extra = issue(&mut fx.ca, "x", RoleName::Replica);
        m.apply(&add(extra, 7200), UnixTime::now()).unwrap();
        m.apply(
            &MembershipCommand::UpdateCrl { crl: crl.to_vec() },
            UnixTime::now(),
        )
        .unwrap();
        let bytes = m.encode();
        assert_eq!(Membership::decode(&bytes), Ok(m.clone()));
        assert_eq!(m.replica_ids().len(), 4);
        for cut in [0, 1, 9, bytes.len() / 2, bytes.len() - 1] {
            assert!(Membership::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn command_encoding_round_trips_and_rejects_malformed_input() {
        let cmds = [
            add(vec![1; 40], 9),
            MembershipCommand::AddNode {
                certificate: vec![],
                key_package: vec![5; 3],
                replica_addr: "[::1]:5".parse().unwrap(),
                client_addr: "[2001:db8::1]:6".parse().unwrap(),
            },
            MembershipCommand::RemoveNode {
                id: NodeId::from_bytes([3; 32]),
            },
            MembershipCommand::UpdateCrl { crl: vec![9; 100] },
            MembershipCommand::RevokeCertificates {
                certificates: vec![vec![1; 10], vec![2; 20]],
            },
            MembershipCommand::AddAdmin {
                certificate: vec![4; 30],
            },
            MembershipCommand::RemoveAdmin {
                id: NodeId::from_bytes([5; 32]),
            },
            MembershipCommand::RenewNode {
                certificate: vec![6; 30],
            },
        ];
        // The commands' wire numbers, in logs and journals already written: pinned.
        let tags: Vec<u8> = CommandKind::ALL.iter().map(|k| k.tag()).collect();
        assert_eq!(tags, (1..=7).collect::<Vec<u8>>());
        for c in &cmds {
            let bytes = c.encode();
            assert_eq!(
                bytes.get(1),
                Some(&c.kind().tag()),
                "the kind follows the version"
            );
            assert_eq!(MembershipCommand::decode(&bytes).as_ref(), Ok(c));
            for cut in 0..bytes.len() {
                assert!(
                    MembershipCommand::decode(&bytes[..cut]).is_err(),
                    "truncated at {cut}"
                );
            }
            let mut long = bytes.clone();
            long.push(0);
            assert_eq!(
                MembershipCommand::decode(&long),
                Err(WireError::Trailing(1))
            );
        }
        assert!(
            MembershipCommand::decode(&[2, 1]).is_err(),
            "unknown version"
        );
        assert!(
            MembershipCommand::decode(&[1, 9]).is_err(),
            "unknown command"
        );
        let mut huge = vec![1, 3];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            MembershipCommand::decode(&huge),
            Err(WireError::TooLong { .. })
        ));
    }
}
