//! Rosters: the replica set clients talk to, numbered, with a proof of every change.
//!
//! A client computes f and the replicas it trusts from a [`Roster`]. Its configuration gives the
//! first one (the replicas and the roster's number); afterwards it follows the changes the
//! replicated state records. Every time an ordered membership command changes the set of
//! replicas (a join, a removal, a revocation that removes), the state opens roster `n + 1`, and
//! each replica of roster `n` orders a [`RosterAck`]: its signature, as an ordinary signed
//! request of its own, on the new roster's number and [`Roster::digest`]. Once a quorum of roster
//! `n` signed, the change is *certified* ([`RosterChange`]): anyone who trusts roster `n` can
//! check roster `n + 1` with [`follow`] and nothing else, one step at a time. The state keeps
//! the last [`KEPT_CHANGES`] changes ([`RosterLog`], part of every snapshot) and any replica
//! hands them out ([`RosterLog::since`]).
//!
//! Replies name the newest certified roster the replica knows, and a client accepts a result
//! only when a quorum of the replicas of its roster answered *at that roster* (or an older one)
//! and f + 1 of them agree on it (`securesmart::client`). A client on an old roster therefore cannot be
//! served a result by the replicas that were removed since, or by the f + 1 that a grown
//! cluster's larger f allows to be faulty: the current replicas of its roster name a newer
//! roster, and the client first follows the certified changes to it. What it assumes: fewer than
//! a quorum of the replicas of the roster it knows are faulty or removed and compromised, and it
//! is at most [`KEPT_CHANGES`] changes behind (older clients get [`RosterError::TooOld`] and
//! need a new configuration). Revoking removed replicas takes even that away, since a client's
//! TLS then refuses them.
//!
//! ```
//! use securesmart::roster::{Roster, RosterError, follow};
//! # fn main() -> Result<(), RosterError> {
//! # let membership = securesmart::membership::fuzzing::four_replicas();
//! let genesis = Roster::of(0, &membership);
//! assert_eq!(genesis.group().quorum(), 3);
//! // Nothing to follow: a client stays where it is.
//! assert_eq!(follow(&genesis, &[])?, genesis);
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;

use rustls::pki_types::CertificateDer;
use securesmart_base::wire::{Reader, WireError, Writer};
use securesmart_consensus::view_change::Group;
use securesmart_membership::Membership;
use securesmart_transport::{NodeId, Role};

use crate::protocol::{Auth, AuthError, Ordered, Submission};

/// BLAKE3 `derive_key` context of [`Roster::digest`].
pub const ROSTER_TAG: &str = securesmart_base::tags::service::ROSTER;
/// Changes the replicated state keeps (a client further behind needs a new configuration).
pub const KEPT_CHANGES: usize = 32;
/// Changes in one answer to a client's query (it asks again from where it got).
pub const CHANGES_PER_ANSWER: usize = 8;
/// Bytes of roster changes in one answer, about (a client asks again for the rest).
pub const ANSWER_BYTES: usize = 128 * 1024;
/// Replicas in a roster at most.
pub const MAX_ROSTER_REPLICAS: usize = 1024;
/// Largest certificate in a roster.
const MAX_CERT_BYTES: usize = securesmart_membership::epoch::MAX_CERT_BYTES;
/// Encoding version of rosters, changes and logs.
const VERSION: u8 = 1;

/// One replica of a roster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RosterEntry {
    /// Its certificate (DER).
    pub certificate: CertificateDer<'static>,
    /// Its replica-plane address.
    pub replica_addr: SocketAddr,
    /// Its client-plane address.
    pub client_addr: SocketAddr,
}

/// A numbered replica set (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roster {
    number: u64,
    replicas: BTreeMap<NodeId, RosterEntry>,
}

impl Roster {
    /// Roster `number` of these replicas.
    pub fn new(number: u64, replicas: BTreeMap<NodeId, RosterEntry>) -> Self {
        Self { number, replicas }
    }

    /// Roster `number` of the replicas of `membership`.
    pub fn of(number: u64, membership: &Membership) -> Self {
        let replicas = membership
            .members()
            .iter()
            .filter(|(_, m)| m.role == Role::Replica)
            .map(|(id, m)| {
                (
                    *id,
                    RosterEntry {
                        certificate: m.certificate.clone(),
                        replica_addr: m.replica_addr,
                        client_addr: m.client_addr,
                    },
                )
            })
            .collect();
        Self { number, replicas }
    }

    /// Its number: 0 at genesis, one more with every change of the replica set.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The replicas.
    pub fn replicas(&self) -> &BTreeMap<NodeId, RosterEntry> {
        &self.replicas
    }

    /// Whether `id` is one of its replicas.
    pub fn contains(&self, id: &NodeId) -> bool {
        self.replicas.contains_key(id)
    }

    /// The replicas as a group (f, quorum).
    pub fn group(&self) -> Group {
        Group {
            members: self.replicas.keys().copied().collect(),
        }
    }

    /// The replicas' client-plane addresses.
    pub fn client_addrs(&self) -> BTreeMap<NodeId, SocketAddr> {
        self.replicas
            .iter()
            .map(|(id, e)| (*id, e.client_addr))
            .collect()
    }

    /// What a replica signs for it: BLAKE3 (domain [`ROSTER_TAG`]) of its encoding.
    pub fn digest(&self) -> [u8; 32] {
        let mut w = Writer::default();
        self.write(&mut w);
        blake3::derive_key(ROSTER_TAG, &w.buf)
    }

    fn write(&self, w: &mut Writer) {
        w.u8(VERSION).u64(self.number).count(self.replicas.len());
        for e in self.replicas.values() {
            w.bytes(e.certificate.as_ref())
                .addr(&e.replica_addr)
                .addr(&e.client_addr);
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        r.version(VERSION)?;
        let number = r.u64()?;
        let n = r.count("roster replicas", MAX_ROSTER_REPLICAS)?;
        let mut replicas = BTreeMap::new();
        for _ in 0..n {
            let certificate =
                CertificateDer::from(r.bytes("certificate", MAX_CERT_BYTES)?.to_vec());
            let id = securesmart_transport::node_id(&certificate)
                .map_err(|_| WireError::Invalid("roster certificate"))?;
            let entry = RosterEntry {
                certificate,
                replica_addr: r.addr()?,
                client_addr: r.addr()?,
            };
            if replicas.insert(id, entry).is_some() {
                return Err(WireError::Invalid("roster lists a replica twice"));
            }
        }
        Ok(Self { number, replicas })
    }
}

/// A replica's signature on a roster: its ordered [`Ordered::RosterAck`] request, kept with
/// the request number it was signed under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RosterAck {
    /// The replica.
    pub replica: NodeId,
    /// Its request number.
    pub number: u64,
    /// Its signature on the request.
    pub auth: Auth,
}

impl RosterAck {
    /// Checks that it is `replica`'s signature on `roster`.
    ///
    /// # Errors
    /// [`AuthError`] saying what is wrong.
    pub fn verify(&self, roster: &Roster) -> Result<(), AuthError> {
        self.verify_digest(roster.number, &roster.digest())
    }

    /// [`RosterAck::verify`] for the roster numbered `roster` with `digest`.
    fn verify_digest(&self, roster: u64, digest: &[u8; 32]) -> Result<(), AuthError> {
        Submission {
            auth: Some(self.auth),
            ordered: Ordered::RosterAck {
                roster,
                digest: *digest,
            },
        }
        .verify(&self.replica, self.number)
    }

    fn write(&self, w: &mut Writer) {
        w.raw(self.replica.as_bytes())
            .u64(self.number)
            .raw(&self.auth.public_key)
            .raw(&self.auth.signature);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Self {
            replica: NodeId::from_bytes(r.array()?),
            number: r.u64()?,
            auth: Auth {
                public_key: r.array()?,
                signature: r.array()?,
            },
        })
    }
}

/// A new roster and the signatures of the replicas of the one before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RosterChange {
    /// The new roster.
    pub roster: Roster,
    /// Signatures of replicas of the previous roster (certified with a quorum of them).
    pub acks: Vec<RosterAck>,
}

impl RosterChange {
    fn write(&self, w: &mut Writer) {
        self.roster.write(w);
        w.count(self.acks.len());
        for a in &self.acks {
            a.write(w);
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let roster = Roster::read(r)?;
        let n = r.count("roster acknowledgements", MAX_ROSTER_REPLICAS)?;
        let acks = (0..n)
            .map(|_| RosterAck::read(r))
            .collect::<Result<_, _>>()?;
        Ok(Self { roster, acks })
    }

    /// Encodes a list of changes (an answer to a client's query).
    pub fn encode_list(changes: &[RosterChange]) -> Vec<u8> {
        let mut w = Writer::default();
        w.count(changes.len());
        for c in changes {
            c.write(&mut w);
        }
        w.buf
    }

    /// Decodes a list made by [`RosterChange::encode_list`].
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn decode_list(buf: &[u8]) -> Result<Vec<RosterChange>, WireError> {
        let mut r = Reader::new(buf);
        let n = r.count("roster changes", KEPT_CHANGES)?;
        let changes = (0..n)
            .map(|_| RosterChange::read(&mut r))
            .collect::<Result<_, _>>()?;
        r.finish()?;
        Ok(changes)
    }
}

/// Why a chain of roster changes does not lead anywhere from the roster a client trusts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RosterError {
    /// The next change is not the one after the trusted roster.
    #[error("roster {got} does not follow roster {trusted}")]
    Gap {
        /// The trusted roster's number.
        trusted: u64,
        /// The change's roster number.
        got: u64,
    },
    /// The replicas no longer keep the changes after the trusted roster.
    #[error("the replicas keep roster changes from {oldest} on; this client is at {trusted}")]
    TooOld {
        /// The trusted roster's number.
        trusted: u64,
        /// The oldest change the replicas answered with.
        oldest: u64,
    },
    /// A signature is not a replica's of the trusted roster, or not on this roster.
    #[error("roster {roster}: acknowledgement of {replica:?}: {why}")]
    BadAck {
        /// The change's roster number.
        roster: u64,
        /// The signer named.
        replica: NodeId,
        /// What is wrong.
        why: String,
    },
    /// More acknowledgements than the trusted roster has replicas.
    #[error("roster {roster}: {acks} acknowledgements, more than the replicas that may sign")]
    TooManyAcks {
        /// The change's roster number.
        roster: u64,
        /// Acknowledgements in the change.
        acks: usize,
    },
    /// Too few distinct replicas of the trusted roster signed.
    #[error("roster {roster}: {have} acknowledgements of the {need} needed")]
    TooFewAcks {
        /// The change's roster number.
        roster: u64,
        /// Valid acknowledgements.
        have: usize,
        /// A quorum of the trusted roster.
        need: usize,
    },
}

/// Whether `change` is certified by the replicas of `previous`.
///
/// # Errors
/// As [`follow`].
pub fn check_change(previous: &Roster, change: &RosterChange) -> Result<(), RosterError> {
    let number = change.roster.number;
    if number != previous.number.saturating_add(1) {
        return Err(RosterError::Gap {
            trusted: previous.number,
            got: number,
        });
    }
    if change.acks.len() > previous.replicas.len() {
        return Err(RosterError::TooManyAcks {
            roster: number,
            acks: change.acks.len(),
        });
    }
    // Cheap checks for every acknowledgement first, then one digest, then the signatures.
    let mut signed = BTreeSet::new();
    for ack in &change.acks {
        let bad = |why: &str| RosterError::BadAck {
            roster: number,
            replica: ack.replica,
            why: why.to_owned(),
        };
        if !previous.contains(&ack.replica) {
            return Err(bad("not a replica of the previous roster"));
        }
        if !signed.insert(ack.replica) {
            return Err(bad("signed twice"));
        }
    }
    let digest = change.roster.digest();
    for ack in &change.acks {
        ack.verify_digest(number, &digest)
            .map_err(|e| RosterError::BadAck {
                roster: number,
                replica: ack.replica,
                why: e.to_string(),
            })?;
    }
    let need = previous.group().quorum();
    if signed.len() < need {
        return Err(RosterError::TooFewAcks {
            roster: number,
            have: signed.len(),
            need,
        });
    }
    Ok(())
}

/// The newest roster that `changes` lead to from `trusted`, each change checked against the
/// roster before it ([`check_change`]). Changes at or below `trusted` are skipped.
///
/// # Errors
/// [`RosterError`] for the first change that is not certified (none is taken then), or
/// [`RosterError::TooOld`] when the first change is past the one after `trusted`.
pub fn follow(trusted: &Roster, changes: &[RosterChange]) -> Result<Roster, RosterError> {
    let mut current = trusted.clone();
    for change in changes {
        if change.roster.number <= current.number {
            continue;
        }
        if current.number == trusted.number && change.roster.number > trusted.number + 1 {
            return Err(RosterError::TooOld {
                trusted: trusted.number,
                oldest: change.roster.number,
            });
        }
        check_change(&current, change)?;
        current = change.roster.clone();
    }
    Ok(current)
}

/// The rosters of the replicated state: the oldest kept one and the changes after it (see the
/// module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RosterLog {
    base: Roster,
    changes: VecDeque<RosterChange>,
}

/// Why the replicated state refused a replica's roster acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckRefusal {
    /// No such roster is kept, or it has a different digest.
    #[error("not a roster change we keep")]
    Unknown,
    /// The sender is not a replica of the roster before it.
    #[error("not a replica of the previous roster")]
    NotSigner,
    /// The change is certified already, or this replica signed it.
    #[error("already certified or acknowledged")]
    Done,
}

impl RosterLog {
    /// A log that starts at `genesis`.
    pub fn new(genesis: Roster) -> Self {
        Self {
            base: genesis,
            changes: VecDeque::new(),
        }
    }

    /// The current roster (certified or not).
    pub fn current(&self) -> &Roster {
        self.changes.back().map_or(&self.base, |c| &c.roster)
    }

    /// Opens the next roster if `membership`'s replicas differ from the current roster's;
    /// whether it did.
    pub fn observe(&mut self, membership: &Membership) -> bool {
        let current = self.current();
        let next = Roster::of(current.number.saturating_add(1), membership);
        if next.replicas == current.replicas {
            return false;
        }
        self.changes.push_back(RosterChange {
            roster: next,
            acks: Vec::new(),
        });
        while self.changes.len() > KEPT_CHANGES {
            if let Some(oldest) = self.changes.pop_front() {
                self.base = oldest.roster;
            }
        }
        true
    }

    /// The roster before change `i` of `changes`.
    fn previous(&self, i: usize) -> &Roster {
        match i.checked_sub(1) {
            Some(j) => self.changes.get(j).map_or(&self.base, |c| &c.roster),
            None => &self.base,
        }
    }

    /// Records `replica`'s ordered acknowledgement (request `number`, signature `auth`, already
    /// checked before ordering) of roster `roster` with `digest`.
    ///
    /// # Errors
    /// [`AckRefusal`], the same at every replica.
    pub fn ack(
        &mut self,
        replica: NodeId,
        number: u64,
        auth: Auth,
        roster: u64,
        digest: &[u8; 32],
    ) -> Result<(), AckRefusal> {
        let i = self
            .changes
            .iter()
            .position(|c| c.roster.number == roster)
            .ok_or(AckRefusal::Unknown)?;
        let previous = self.previous(i);
        if !previous.contains(&replica) {
            return Err(AckRefusal::NotSigner);
        }
        let need = previous.group().quorum();
        let change = self.changes.get_mut(i).ok_or(AckRefusal::Unknown)?;
        if change.roster.digest() != *digest {
            return Err(AckRefusal::Unknown);
        }
        if change.acks.len() >= need || change.acks.iter().any(|a| a.replica == replica) {
            return Err(AckRefusal::Done);
        }
        change.acks.push(RosterAck {
            replica,
            number,
            auth,
        });
        Ok(())
    }

    /// The roster `id` should acknowledge: the oldest kept change it may sign (a replica of
    /// the roster before it) that is neither certified nor signed by it.
    pub fn to_acknowledge(&self, id: &NodeId) -> Option<(u64, [u8; 32])> {
        self.changes.iter().enumerate().find_map(|(i, c)| {
            let previous = self.previous(i);
            let open = c.acks.len() < previous.group().quorum();
            (open && previous.contains(id) && !c.acks.iter().any(|a| a.replica == *id))
                .then(|| (c.roster.number, c.roster.digest()))
        })
    }

    /// Changes whenever a roster opens or an acknowledgement is recorded.
    pub fn version(&self) -> (u64, usize) {
        let acks = self.changes.iter().map(|c| c.acks.len()).sum();
        (self.current().number, acks)
    }

    /// The newest certified roster.
    pub fn certified(&self) -> &Roster {
        let mut newest = &self.base;
        for (i, c) in self.changes.iter().enumerate() {
            if c.acks.len() < self.previous(i).group().quorum() {
                break;
            }
            newest = &c.roster;
        }
        newest
    }

    /// Certified changes after roster `number`, at most [`CHANGES_PER_ANSWER`] and about
    /// [`ANSWER_BYTES`] (at least one; from the oldest kept one if `number` is older).
    pub fn since(&self, number: u64) -> Vec<RosterChange> {
        let certified = self.certified().number;
        let mut bytes = 0usize;
        let mut out = Vec::new();
        for c in self
            .changes
            .iter()
            .filter(|c| c.roster.number > number && c.roster.number <= certified)
            .take(CHANGES_PER_ANSWER)
        {
            let size: usize = c
                .roster
                .replicas
                .values()
                .map(|e| e.certificate.len() + 64)
                .sum::<usize>()
                + c.acks.len() * 136;
            if !out.is_empty() && bytes + size > ANSWER_BYTES {
                break;
            }
            bytes += size;
            out.push(c.clone());
        }
        out
    }

    /// Writes it (part of the replicated state's snapshot).
    pub fn write(&self, w: &mut Writer) {
        self.base.write(w);
        w.count(self.changes.len());
        for c in &self.changes {
            c.write(w);
        }
    }

    /// Reads what [`RosterLog::write`] wrote.
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let base = Roster::read(r)?;
        let n = r.count("roster changes", KEPT_CHANGES)?;
        let mut changes = VecDeque::with_capacity(n);
        let mut expected = base.number;
        for _ in 0..n {
            let c = RosterChange::read(r)?;
            expected = expected.saturating_add(1);
            if c.roster.number != expected {
                return Err(WireError::Invalid("roster numbers out of sequence"));
            }
            changes.push_back(c);
        }
        Ok(Self { base, changes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::RequestSigner;
    use securesmart_transport::Identity;
    use securesmart_transport::pki::DevCa;

    struct Fixture {
        ids: Vec<Identity>,
    }

    fn fixture(n: usize) -> Fixture {
        let ca = DevCa::new("roster ca").unwrap();
        Fixture {
            ids: (0..n)
                .map(|i| ca.issue_role(&format!("r{i}"), Role::Replica).unwrap())
                .collect(),
        }
    }

    impl Fixture {
        fn roster(&self, number: u64, which: &[usize]) -> Roster {
            let replicas = which
                .iter()
                .map(|i| {
                    let id = &self.ids[*i];
                    let port = 7000 + u16::try_from(*i).unwrap();
                    (
                        id.id(),
                        RosterEntry {
                            certificate: id.chain()[0].clone(),
                            replica_addr: SocketAddr::from(([127, 0, 0, 1], port)),
                            client_addr: SocketAddr::from(([127, 0, 0, 1], port + 1000)),
                        },
                    )
                })
                .collect();
            Roster::new(number, replicas)
        }

        fn id(&self, i: usize) -> NodeId {
            self.ids[i].id()
        }

        /// Replica `i`'s ordered acknowledgement of `roster` (request number `number`).
        fn ack(&self, i: usize, number: u64, roster: &Roster) -> RosterAck {
            let signer = RequestSigner::new(&self.ids[i]).unwrap();
            let s = signer.submission(
                number,
                Ordered::RosterAck {
                    roster: roster.number(),
                    digest: roster.digest(),
                },
            );
            RosterAck {
                replica: self.id(i),
                number,
                auth: s.auth.unwrap(),
            }
        }

        fn change(&self, roster: Roster, signers: &[usize]) -> RosterChange {
            let acks = signers
                .iter()
                .map(|i| self.ack(*i, 10 + *i as u64, &roster))
                .collect();
            RosterChange { roster, acks }
        }
    }

    #[test]
    fn a_change_is_followed_only_with_a_quorum_of_the_roster_before_it() {
        let fx = fixture(8);
        let genesis = fx.roster(0, &[0, 1, 2, 3]);
        // 3 of 4 sign that replica 3 leaves and 4 joins: followed.
        let next = fx.roster(1, &[0, 1, 2, 4]);
        let good = fx.change(next.clone(), &[0, 1, 3]);
        assert_eq!(follow(&genesis, std::slice::from_ref(&good)).unwrap(), next);
        // f + 1 = 2 of them (say, the removed replica and a faulty one) are not enough.
        let forged = fx.roster(1, &[3, 5, 6, 7]);
        assert!(matches!(
            follow(&genesis, &[fx.change(forged.clone(), &[0, 3])]),
            Err(RosterError::TooFewAcks {
                have: 2,
                need: 3,
                ..
            })
        ));
        // A replica signs once (a second signature is refused before any is checked), more
        // signatures than signers are refused, and replicas not in the roster before do not
        // count.
        let mut twice = fx.change(forged.clone(), &[0, 3]);
        twice.acks.push(fx.ack(3, 99, &forged));
        assert!(matches!(
            follow(&genesis, &[twice.clone()]),
            Err(RosterError::BadAck { .. })
        ));
        for n in 0..3 {
            twice.acks.push(fx.ack(0, 100 + n, &forged));
        }
        assert!(matches!(
            follow(&genesis, &[twice]),
            Err(RosterError::TooManyAcks { acks: 6, .. })
        ));
        assert!(matches!(
            follow(&genesis, &[fx.change(forged.clone(), &[0, 3, 5])]),
            Err(RosterError::BadAck { .. })
        ));
        // Signatures on one roster do not certify another.
        let mut swapped = good.clone();
        swapped.roster = forged;
        assert!(matches!(
            follow(&genesis, &[swapped]),
            Err(RosterError::BadAck { .. })
        ));
        // The chain goes one step at a time: roster 2 is checked against roster 1.
        let third = fx.roster(2, &[0, 1, 4, 5]);
        assert_eq!(
            follow(
                &genesis,
                &[good.clone(), fx.change(third.clone(), &[1, 2, 4])]
            )
            .unwrap(),
            third
        );
        assert!(
            follow(
                &genesis,
                &[good.clone(), fx.change(third.clone(), &[0, 1, 3])]
            )
            .is_err(),
            "replica 3 left in roster 1 and cannot sign roster 2"
        );
        // A client too far behind is told so; one already past a change skips it.
        assert!(matches!(
            follow(&genesis, &[fx.change(third.clone(), &[0, 1, 4])]),
            Err(RosterError::TooOld {
                trusted: 0,
                oldest: 2
            })
        ));
        assert_eq!(follow(&next, &[good]).unwrap(), next);
    }

    #[test]
    fn a_roster_opens_when_the_replicas_change_and_only_then() {
        let ca = DevCa::new("roster membership ca").unwrap();
        let ids: Vec<Identity> = (0..5)
            .map(|i| ca.issue_role(&format!("m{i}"), Role::Replica).unwrap())
            .collect();
        let member = |i: usize| securesmart_membership::Member {
            certificate: ids[i].chain()[0].clone(),
            replica_addr: SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16)),
            client_addr: SocketAddr::from(([127, 0, 0, 1], 8000 + i as u16)),
            role: Role::Replica,
            key_package: Vec::new(),
        };
        let now = rustls::pki_types::UnixTime::now();
        let mut m =
            Membership::genesis(ca.certificate(), (0..5).map(member).collect(), now).unwrap();
        let mut log = RosterLog::new(Roster::of(0, &m));
        assert!(!log.observe(&m), "the same replicas");
        m.apply(
            &securesmart_membership::MembershipCommand::RemoveNode { id: ids[4].id() },
            now,
        )
        .unwrap();
        assert!(log.observe(&m));
        assert_eq!(log.current().number(), 1);
        assert!(!log.current().contains(&ids[4].id()));
        assert!(!log.observe(&m));
        // The oldest changes go once more than KEPT_CHANGES are kept; the log still reads.
        for _ in 0..KEPT_CHANGES + 3 {
            log.changes.push_back(RosterChange {
                roster: Roster::new(log.current().number() + 1, BTreeMap::new()),
                acks: Vec::new(),
            });
            assert!(log.observe(&m));
        }
        assert!(log.changes.len() <= KEPT_CHANGES);
        let mut w = Writer::default();
        log.write(&mut w);
        assert_eq!(RosterLog::read(&mut Reader::new(&w.buf)).unwrap(), log);
    }

    #[test]
    fn the_log_certifies_with_the_previous_rosters_quorum_and_hands_out_certified_changes() {
        let fx = fixture(6);
        let genesis = fx.roster(0, &[0, 1, 2, 3]);
        let mut log = RosterLog::new(genesis.clone());
        let next = fx.roster(1, &[0, 1, 2, 4]);
        log.changes.push_back(RosterChange {
            roster: next.clone(),
            acks: Vec::new(),
        });
        assert_eq!(log.current(), &next);
        assert_eq!(log.certified(), &genesis);
        assert!(log.since(0).is_empty(), "nothing certified yet");
        let digest = next.digest();
        let ack = |i: usize| fx.ack(i, 10 + i as u64, &next);
        // The joiner (not in roster 0) cannot sign its own admission.
        assert_eq!(
            log.ack(fx.id(4), 14, ack(4).auth, 1, &digest),
            Err(AckRefusal::NotSigner)
        );
        assert_eq!(
            log.ack(fx.id(0), 10, ack(0).auth, 1, &[7; 32]),
            Err(AckRefusal::Unknown)
        );
        assert_eq!(
            log.ack(fx.id(0), 10, ack(0).auth, 2, &digest),
            Err(AckRefusal::Unknown)
        );
        assert_eq!(log.to_acknowledge(&fx.id(3)), Some((1, digest)));
        assert_eq!(log.to_acknowledge(&fx.id(4)), None);
        for i in [0, 3] {
            log.ack(fx.id(i), 10 + i as u64, ack(i).auth, 1, &digest)
                .unwrap();
        }
        assert_eq!(
            log.ack(fx.id(0), 10, ack(0).auth, 1, &digest),
            Err(AckRefusal::Done)
        );
        assert_eq!(log.certified(), &genesis, "two of four");
        log.ack(fx.id(1), 11, ack(1).auth, 1, &digest).unwrap();
        assert_eq!(log.certified(), &next);
        assert_eq!(log.to_acknowledge(&fx.id(2)), None, "certified");
        assert_eq!(
            log.ack(fx.id(2), 12, ack(2).auth, 1, &digest),
            Err(AckRefusal::Done)
        );
        // What it hands out, a client follows; and it survives a snapshot.
        assert_eq!(follow(&genesis, &log.since(0)).unwrap(), next);
        let mut w = Writer::default();
        log.write(&mut w);
        let mut r = Reader::new(&w.buf);
        assert_eq!(RosterLog::read(&mut r).unwrap(), log);
        r.finish().unwrap();
        let list = RosterChange::encode_list(&log.since(0));
        assert_eq!(RosterChange::decode_list(&list).unwrap(), log.since(0));
        for cut in 0..list.len() {
            assert!(RosterChange::decode_list(&list[..cut]).is_err());
        }
    }
}
