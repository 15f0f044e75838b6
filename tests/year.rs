//! A cluster through a simulated year, on a clock the test drives. Deterministic: no processes
//! and no wall clock. The trust center issues, renews and revokes on that clock. The
//! replicated state (four copies, which must agree after every request) orders on it. The
//! checks the planes run in a handshake (`TrustState`, with the CRL a node would use) judge at
//! it. Over the year:
//! - CRLs of a week are issued every five days and ordered. One outage of the trust center
//!   lets the ordered CRL expire: every link is refused then, and the next CRL replaces the
//!   expired one.
//! - Every certificate is renewed before it expires: replicas (`RenewNode`), administrators
//!   (`AddAdmin` of the renewal) and clients.
//! - A replica's key is rotated: a new key joins (`AddNode`) and the old one leaves.
//! - An administrator is added and the first one removed.
//! - A replica is revoked at n = 4 and replaced, and a client revoked after it is refused.
//! - On the last day the whole cluster restarts from its snapshots and genesis as history,
//!   and goes on ordering.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, CertificateSigningRequestDer, UnixTime,
};
use securesmart::consensus::message::Request;
use securesmart::consensus::service::StateMachine;
use securesmart::kv::{KvOp, KvReply, KvStore};
use securesmart::membership::trust_center::{Clock, csr_for_key};
use securesmart::membership::{
    Issued, Member, Membership, MembershipCommand, Reason, RoleName, TrustCenter, TrustCenterError,
    key_and_csr,
};
use securesmart::protocol::Ordered;
use securesmart::state::NodeState;
use securesmart::transport::{NodeId, Refusal, Role, TrustConfig, TrustState};

const DAY: i64 = 86_400;
const CRL_VALIDITY: Duration = Duration::from_secs(7 * 86_400);
/// Certificates are renewed when less than this is left of them.
const RENEW_BEFORE: i64 = 30 * DAY;
/// The trust center is down (issues no CRL) on these days: the ordered CRL expires.
const OUTAGE: std::ops::Range<i64> = 121..130;

/// A key and its current certificate.
struct Holder {
    key_pem: String,
    cert: CertificateDer<'static>,
    /// Its certificate's end (unix seconds).
    not_after: i64,
    renewals: usize,
}

impl Holder {
    fn id(&self) -> NodeId {
        securesmart_transport::node_id(&self.cert).unwrap()
    }
}

struct Year {
    dir: PathBuf,
    clock: Arc<AtomicI64>,
    ca: TrustCenter,
    /// The current replicas, by id.
    replicas: BTreeMap<NodeId, Holder>,
    admins: BTreeMap<NodeId, Holder>,
    clients: Vec<Holder>,
    /// The replicated state at four replicas.
    states: Vec<NodeState<KvStore>>,
    numbers: BTreeMap<NodeId, u64>,
    seq: u64,
    /// The CRL file (the last the trust center issued).
    crl: Option<CertificateRevocationListDer<'static>>,
    genesis: Vec<Member>,
    genesis_admins: Vec<CertificateDer<'static>>,
    next_port: u16,
    /// Day 0 (unix seconds).
    start: i64,
}

impl Year {
    fn now(&self) -> i64 {
        self.clock.load(Ordering::Relaxed)
    }

    fn at(&self) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(self.now()).unwrap()))
    }

    fn enroll(&mut self, role: RoleName, name: &str) -> Holder {
        let names = [format!("{name}.local")];
        let token = self
            .ca
            .create_token(role, &names, Duration::from_secs(3600))
            .unwrap();
        let (key_pem, csr_pem) = key_and_csr(&names).unwrap();
        let csr = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap();
        let issued = self.ca.sign_csr(&csr, &token).unwrap();
        Holder {
            key_pem: key_pem.to_string(),
            not_after: issued.record.not_after,
            cert: issued.certificate,
            renewals: 0,
        }
    }

    /// A renewal of `holder`'s certificate for its own key.
    fn renew(ca: &mut TrustCenter, holder: &Holder) -> Result<Issued, TrustCenterError> {
        let csr = csr_for_key(&holder.key_pem, &[]).unwrap();
        let csr = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
        ca.renew(holder.cert.as_ref(), &csr)
    }

    fn renewal(ca: &mut TrustCenter, holder: &Holder) -> Issued {
        Self::renew(ca, holder).unwrap()
    }

    fn renewed(holder: &mut Holder, issued: Issued) {
        holder.cert = issued.certificate;
        holder.not_after = issued.record.not_after;
        holder.renewals += 1;
    }

    fn member(&mut self, holder: &Holder) -> Member {
        self.next_port += 2;
        Member {
            certificate: holder.cert.clone(),
            replica_addr: SocketAddr::from(([127, 0, 0, 1], self.next_port)),
            client_addr: SocketAddr::from(([127, 0, 0, 1], self.next_port + 1)),
            role: Role::Replica,
            key_package: Vec::new(),
        }
    }

    /// Orders one request from `client` at every replica; they must agree on the reply.
    fn order(&mut self, client: NodeId, ordered: Ordered) -> Bytes {
        let number = self.numbers.entry(client).or_insert(0);
        *number += 1;
        let request = Request {
            client,
            number: *number,
            payload: ordered.encode(),
        };
        self.seq += 1;
        let mut replies = Vec::new();
        for s in &mut self.states {
            s.begin_batch(self.seq);
            replies.push(s.execute(&request));
            s.take_changes();
        }
        assert!(
            replies.windows(2).all(|w| w[0] == w[1]),
            "the replicas disagree on {replies:?}"
        );
        replies.swap_remove(0)
    }

    fn command(&mut self, by: NodeId, command: &MembershipCommand) -> String {
        let time = u64::try_from(self.now()).unwrap();
        let reply = self.order(
            by,
            Ordered::Command {
                time,
                command: Bytes::from(command.encode()),
            },
        );
        String::from_utf8(reply.to_vec()).unwrap()
    }

    fn ok(&mut self, by: NodeId, command: &MembershipCommand, what: &str) {
        let reply = self.command(by, command);
        assert!(
            reply.starts_with("ok"),
            "day {}: {what}: {reply}",
            self.day()
        );
    }

    /// Enrolls a replica named `name` and has administrator `by` order its `AddNode`.
    fn add_replica(&mut self, by: NodeId, name: &str, what: &str) -> Holder {
        let fresh = self.enroll(RoleName::Replica, name);
        let m = self.member(&fresh);
        self.ok(
            by,
            &MembershipCommand::AddNode {
                certificate: fresh.cert.to_vec(),
                key_package: Vec::new(),
                replica_addr: m.replica_addr,
                client_addr: m.client_addr,
            },
            what,
        );
        fresh
    }

    fn put(&mut self, client: NodeId, key: &str) -> Bytes {
        let op = KvOp::Put {
            key: Bytes::from(key.to_owned()),
            value: Bytes::from_static(b"v"),
        };
        self.order(client, Ordered::App(Bytes::from(op.encode())))
    }

    fn get(&mut self, client: NodeId, key: &str) -> KvReply {
        let op = KvOp::Get {
            key: Bytes::from(key.to_owned()),
        };
        KvReply::decode(&self.order(client, Ordered::App(Bytes::from(op.encode())))).unwrap()
    }

    fn day(&self) -> i64 {
        (self.now() - self.start) / DAY
    }

    fn membership(&self) -> &Membership {
        self.states[0].membership()
    }

    /// The CRL the planes use: the ordered one, or the file's if our CA numbered it higher.
    fn plane_crls(&self) -> Vec<CertificateRevocationListDer<'static>> {
        let m = self.membership();
        match (m.crl(), &self.crl) {
            (Some((n, _)), Some(file)) if m.our_crl_number(file).is_some_and(|f| f > *n) => {
                vec![file.clone()]
            }
            (Some((_, crl)), _) => vec![crl.clone()],
            (None, Some(file)) => vec![file.clone()],
            (None, None) => Vec::new(),
        }
    }

    /// What each current replica's replica plane says of each other's certificate now.
    fn replica_links(&self) -> Vec<Result<(), Refusal>> {
        let mut trust = self.membership().replica_trust();
        trust.crls = self.plane_crls();
        let check = TrustState::new(trust).unwrap();
        self.membership()
            .members()
            .values()
            .map(|m| {
                check
                    .verify_replica(std::slice::from_ref(&m.certificate), self.at())
                    .map(|_| ())
            })
            .collect()
    }

    /// What a replica's client plane says of `cert` now.
    fn client_link(&self, cert: &CertificateDer<'static>) -> Result<(), Refusal> {
        let mut trust = TrustConfig::new(self.ca.ca_certificate());
        trust.crls = self.plane_crls();
        TrustState::new(trust)
            .unwrap()
            .verify_client(std::slice::from_ref(cert), self.at())
            .map(|_| ())
    }

    fn issue_crl(&mut self) {
        let crl = self.ca.crl(CRL_VALIDITY).unwrap();
        self.crl = Some(crl.clone());
        let by = *self.replicas.keys().next().unwrap();
        self.ok(
            by,
            &MembershipCommand::UpdateCrl { crl: crl.to_vec() },
            "a fresh CRL",
        );
    }

    /// Renews every certificate with less than [`RENEW_BEFORE`] left.
    fn renew_due(&mut self) {
        let now = self.now();
        let due = |h: &Holder| h.not_after - now < RENEW_BEFORE;
        // A replica orders its own `RenewNode` (its certificate file changed); an
        // administrator its `AddAdmin` of the renewal.
        for admins in [false, true] {
            let held = if admins { &self.admins } else { &self.replicas };
            let ids: Vec<NodeId> = held.keys().filter(|id| due(&held[*id])).copied().collect();
            for id in ids {
                let holder = if admins {
                    &self.admins[&id]
                } else {
                    &self.replicas[&id]
                };
                let issued = Self::renewal(&mut self.ca, holder);
                let certificate = issued.certificate.to_vec();
                let command = if admins {
                    MembershipCommand::AddAdmin { certificate }
                } else {
                    MembershipCommand::RenewNode { certificate }
                };
                self.ok(id, &command, "a renewal");
                let held = if admins {
                    &mut self.admins
                } else {
                    &mut self.replicas
                };
                Self::renewed(held.get_mut(&id).unwrap(), issued);
            }
        }
        for i in 0..self.clients.len() {
            if due(&self.clients[i]) {
                let issued = Self::renewal(&mut self.ca, &self.clients[i]);
                Self::renewed(&mut self.clients[i], issued);
            }
        }
    }
}

#[test]
fn a_cluster_runs_through_a_simulated_year() {
    let dir = std::env::temp_dir().join(format!("ss-year-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let start = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    let clock = Arc::new(AtomicI64::new(start));
    let mut ca = TrustCenter::init(&dir.join("ca"), "year ca").unwrap();
    ca.set_clock(Clock::manual(Arc::clone(&clock)));
    let mut y = Year {
        dir,
        clock,
        ca,
        replicas: BTreeMap::new(),
        admins: BTreeMap::new(),
        clients: Vec::new(),
        states: Vec::new(),
        numbers: BTreeMap::new(),
        seq: 0,
        crl: None,
        genesis: Vec::new(),
        genesis_admins: Vec::new(),
        next_port: 20_000,
        start,
    };

    // Day 0: four replicas, an administrator and two clients enroll; genesis.
    for i in 0..4 {
        let h = y.enroll(RoleName::Replica, &format!("replica{i}"));
        let m = y.member(&h);
        y.genesis.push(m);
        y.replicas.insert(h.id(), h);
    }
    let first_admin = y.enroll(RoleName::Client, "admin-a");
    let first_admin_id = first_admin.id();
    y.genesis_admins.push(first_admin.cert.clone());
    y.admins.insert(first_admin_id, first_admin);
    for name in ["client1", "client2"] {
        let h = y.enroll(RoleName::Client, name);
        y.clients.push(h);
    }
    let genesis = Membership::genesis(y.ca.ca_certificate(), y.genesis.clone(), y.at()).unwrap();
    for _ in 0..4 {
        y.states.push(NodeState::new(
            genesis.clone(),
            y.genesis_admins.clone(),
            KvStore::default(),
        ));
    }
    let mut second_admin = None;
    let mut rotated = None;
    let mut revoked_replica = None;

    for day in 0..=365 {
        y.clock.store(y.start + day * DAY, Ordering::Relaxed);
        let outage = OUTAGE.contains(&day);
        // The last CRL before the outage ends seven days after it was issued.
        let expired = outage && day >= (OUTAGE.start - 1) / 5 * 5 + 7;
        if day % 5 == 0 && !outage {
            y.issue_crl();
        }
        if expired {
            // The ordered CRL expired during the outage: the planes fail closed.
            assert!(
                y.replica_links().iter().all(Result::is_err),
                "day {day}: links admitted on an expired CRL"
            );
        } else {
            assert!(
                y.replica_links().iter().all(Result::is_ok),
                "day {day}: a current replica is refused: {:?}",
                y.replica_links()
            );
        }
        // (Renewals are ordered against the ordered CRL: not while it has expired.)
        if !outage {
            y.renew_due();
        }
        match day {
            40 => {
                let b = y.enroll(RoleName::Client, "admin-b");
                let cert = b.cert.to_vec();
                y.ok(
                    first_admin_id,
                    &MembershipCommand::AddAdmin { certificate: cert },
                    "a second administrator",
                );
                second_admin = Some(b.id());
                y.admins.insert(b.id(), b);
            }
            150 => {
                // Key rotation: the new key joins, then the old one leaves.
                let admin = second_admin.unwrap();
                let old = *y.replicas.keys().nth(1).unwrap();
                let fresh = y.add_replica(admin, "replica1-rotated", "the rotated key joins");
                assert_eq!(y.membership().replicas(), 5);
                y.ok(
                    admin,
                    &MembershipCommand::RemoveNode { id: old },
                    "the old key leaves",
                );
                assert_eq!(y.membership().replicas(), 4);
                let old_cert = y.replicas.remove(&old).unwrap().cert;
                y.ca.revoke_certificate(old_cert.as_ref(), Reason::Superseded)
                    .unwrap();
                rotated = Some((old, fresh.id()));
                y.replicas.insert(fresh.id(), fresh);
            }
            200 => {
                let admin = second_admin.unwrap();
                y.ok(
                    admin,
                    &MembershipCommand::RemoveAdmin { id: first_admin_id },
                    "the first administrator withdrawn",
                );
                let reply = y.command(
                    first_admin_id,
                    &MembershipCommand::RemoveAdmin { id: admin },
                );
                assert!(reply.starts_with("refused"), "{reply}");
                y.admins.remove(&first_admin_id);
            }
            250 => {
                // A replica revoked at n = 4 loses its vote at once.
                assert_eq!(y.membership().replicas(), 4);
                // (Not the rotated one: it must still be there at the end.)
                let victim = *y
                    .replicas
                    .keys()
                    .find(|id| Some(**id) != rotated.map(|(_, new)| new))
                    .unwrap();
                let cert = y.replicas.remove(&victim).unwrap().cert;
                y.ca.revoke_certificate(cert.as_ref(), Reason::KeyCompromise)
                    .unwrap();
                y.issue_crl();
                assert_eq!(y.membership().replicas(), 3);
                assert!(!y.membership().members().contains_key(&victim));
                let mut trust = y.membership().replica_trust();
                trust.crls = y.plane_crls();
                trust.peers.insert(victim, "127.0.0.1:1".parse().unwrap());
                assert_eq!(
                    TrustState::new(trust)
                        .unwrap()
                        .verify_replica(std::slice::from_ref(&cert), y.at())
                        .err(),
                    Some(Refusal::Revoked)
                );
                revoked_replica = Some(victim);
            }
            260 => {
                let admin = second_admin.unwrap();
                let spare = y.add_replica(
                    admin,
                    "replica-spare",
                    "a spare replaces the revoked replica",
                );
                assert_eq!(y.membership().replicas(), 4);
                y.replicas.insert(spare.id(), spare);
            }
            300 => {
                // A client revoked after the replica: refused by the planes and the state.
                let cert = y.clients[1].cert.clone();
                y.ca.revoke_certificate(cert.as_ref(), Reason::KeyCompromise)
                    .unwrap();
                y.issue_crl();
                let by = *y.replicas.keys().next().unwrap();
                y.ok(
                    by,
                    &MembershipCommand::RevokeCertificates {
                        certificates: vec![cert.to_vec()],
                    },
                    "the revoked client's certificate",
                );
                assert_eq!(y.client_link(&cert), Err(Refusal::Revoked));
                let id = y.clients[1].id();
                assert!(y.put(id, "from-a-revoked-client").is_empty());
                // (Its certificate is never renewed again: the trust center refuses.)
                let revoked = y.clients.remove(1);
                assert!(Year::renew(&mut y.ca, &revoked).is_err());
            }
            _ => {}
        }
        // Every day: the first client writes, and both clients are admitted until one is
        // revoked.
        let c1 = y.clients[0].id();
        let reply = KvReply::decode(&y.put(c1, &format!("day{day}"))).unwrap();
        assert_eq!(reply, KvReply::Value(None), "day {day}");
        if !expired {
            assert_eq!(
                y.client_link(&y.clients[0].cert.clone()),
                Ok(()),
                "day {day}"
            );
            if let Some(c2) = y.clients.get(1) {
                assert_eq!(y.client_link(&c2.cert.clone()), Ok(()), "day {day}");
            }
        }
    }

    // Every certificate was renewed at least once.
    for h in y
        .replicas
        .values()
        .chain(y.admins.values())
        .chain(&y.clients)
    {
        assert!(h.renewals >= 1, "{} was never renewed", h.id());
    }
    let (old, new) = rotated.unwrap();
    assert!(!y.membership().members().contains_key(&old));
    assert!(y.membership().members().contains_key(&new));
    assert!(
        !y.membership()
            .members()
            .contains_key(&revoked_replica.unwrap())
    );

    // The last day: the whole cluster restarts. Genesis is history (its certificates expired
    // long ago); each replica restores its snapshot and goes on.
    let snapshots: Vec<Bytes> = y.states.iter().map(StateMachine::snapshot).collect();
    let history = Membership::genesis_history(y.ca.ca_certificate(), y.genesis.clone()).unwrap();
    assert!(
        Membership::genesis(y.ca.ca_certificate(), y.genesis.clone(), y.at()).is_err(),
        "the genesis certificates expired: only history can start from them"
    );
    y.states = snapshots
        .iter()
        .map(|snapshot| {
            let mut s = NodeState::new(
                history.clone(),
                y.genesis_admins.clone(),
                KvStore::default(),
            );
            s.restore(snapshot).unwrap();
            assert_eq!(&s.snapshot(), snapshot);
            s
        })
        .collect();
    assert!(y.replica_links().iter().all(Result::is_ok));
    let c1 = y.clients[0].id();
    assert_eq!(
        KvReply::decode(&y.put(c1, "after-restart")).unwrap(),
        KvReply::Value(None)
    );
    assert_eq!(
        y.get(c1, "day0"),
        KvReply::Value(Some(Bytes::from_static(b"v")))
    );
    let admin = second_admin.unwrap();
    y.add_replica(
        admin,
        "replica-after-restart",
        "an administrator works after the restart",
    );
    std::fs::remove_dir_all(&y.dir).unwrap();
}
