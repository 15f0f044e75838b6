//! Fuzz bodies shared by the `fuzz/` targets and the corpus-replay test. Not a stable API.

// invariant: these bodies run only under the fuzzer (`fuzz/`) and the corpus-replay test,
// never in a node, so no network or file input reaches their unwrap/expect calls; those
// either build fixtures from constants (a development CA) or are the oracle itself.
// Panicking is this module's job: a failed oracle is the fuzzer's finding.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::sync::OnceLock;

use rustls::pki_types::{CertificateSigningRequestDer, UnixTime};
use securesmart_transport::Role;
use securesmart_transport::pki::DevCa;

use crate::enrollment::{EnrollRequest, EnrollResponse};
use crate::epoch::{MIN_REPLICAS, Member, Membership, MembershipCommand};

/// A genesis membership of four replicas from a development CA (made once per process): the
/// fixture of the fuzz bodies here and in the node's.
pub fn four_replicas() -> Membership {
    genesis().clone()
}

fn genesis() -> &'static Membership {
    static GENESIS: OnceLock<Membership> = OnceLock::new();
    GENESIS.get_or_init(|| {
        // invariant: a fixture built from constants (a fresh development CA, fixed names and
        // addresses); no fuzz input reaches these expect calls.
        let ca = DevCa::new("fuzz CA").expect("CA");
        let members = (0..4u16)
            .map(|i| Member {
                certificate: ca
                    .issue_role(&format!("r{i}"), Role::Replica)
                    .expect("cert")
                    .chain()[0]
                    .clone(),
                replica_addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
                client_addr: SocketAddr::from(([127, 0, 0, 1], 9100 + i)),
                role: Role::Replica,
                key_package: vec![],
            })
            .collect();
        Membership::genesis(ca.certificate(), members, UnixTime::now()).expect("genesis")
    })
}

/// Decodes a membership command: a decoded command re-encodes to the same bytes, and applying
/// it to a genesis membership keeps the invariants (at least four replicas, since only a CRL our
/// CA signed may shrink the group below that and the fuzzer cannot sign one; the epoch advances
/// by one exactly when the command is applied; a refusal changes nothing).
pub fn membership_command(data: &[u8]) {
    let Ok(cmd) = MembershipCommand::decode(data) else {
        return;
    };
    assert_eq!(cmd.encode(), data, "encoding is canonical");
    let before = genesis();
    let mut m = before.clone();
    match m.apply(&cmd, UnixTime::now()) {
        Ok(_) => assert_eq!(m.epoch(), before.epoch() + 1),
        Err(_) => assert_eq!(&m, before),
    }
    assert!(m.replicas() >= MIN_REPLICAS);
    assert_eq!(m.quorum(), 2 * m.f() + 1);
}

/// Decodes enrollment requests and responses: decoded messages re-encode to the same bytes.
pub fn enroll_request(data: &[u8]) {
    if let Ok(req) = EnrollRequest::decode(data) {
        assert_eq!(req.encode(), data);
    }
    if let Ok(resp) = EnrollResponse::decode(data) {
        assert_eq!(resp.encode(), data);
    }
}

/// The RA's CSR policy on arbitrary bytes: whatever it accepts names only allowed names.
pub fn csr(data: &[u8]) {
    let allowed = ["node1".to_string(), "127.0.0.1".to_string()];
    if let Ok((_, names)) =
        crate::check_csr(&CertificateSigningRequestDer::from(data.to_vec()), &allowed)
    {
        assert!(!names.is_empty());
        for n in names {
            assert!(allowed.contains(&n.to_string()), "{n} not allowed");
        }
    }
}

thread_local! {
    /// A node identity made once per thread (key generation is the slow part).
    // invariant: a fixture from constants; no fuzz input reaches these expect calls.
    static IDENTITY: securesmart_transport::Identity = DevCa::new("fuzz MLS CA")
        .expect("CA")
        .issue_role("fuzz", Role::Replica)
        .expect("identity");
}

fn fresh_member() -> crate::GroupMember {
    // invariant: a member of a fixed identity creating its own group; no fuzz input involved.
    IDENTITY.with(|id| {
        let mut m = crate::GroupMember::new(id, crate::GroupConfig::default()).expect("member");
        m.create(std::time::Duration::ZERO).expect("group");
        m
    })
}

/// Feeds arbitrary bytes to a group member as an ordered commit, as a Welcome and as a key
/// package: never a panic, and a refused commit leaves the epoch as it was.
pub fn mls_message(data: &[u8]) {
    let mut m = fresh_member();
    let before = m.epoch();
    if m.apply_commit(data, std::time::Duration::ZERO).is_err() {
        assert_eq!(m.epoch(), before, "a refused commit changes nothing");
    }
    // invariant: a fresh member of the fixture identity, before any fuzz input is applied.
    let mut joiner = IDENTITY
        .with(|id| crate::GroupMember::new(id, crate::GroupConfig::default()).expect("member"));
    let _ = joiner.join(data, std::time::Duration::ZERO);
    IDENTITY.with(|id| {
        let _ = m.check_key_package(data, &id.chain()[0]);
    });
}

thread_local! {
    static SEALER: std::cell::RefCell<crate::GroupMember> = std::cell::RefCell::new(fresh_member());
}

/// Opens arbitrary bytes as a sealed payload (never a panic; anything opened names an epoch
/// whose key is held), and seals them as plaintext to check the round trip.
pub fn sealed_open(data: &[u8]) {
    SEALER.with(|cell| {
        let mut m = cell.borrow_mut();
        if let Ok(opened) = m.open(data, b"fuzz") {
            assert!(m.key_epochs().contains(&opened.epoch));
        }
        // invariant: the member created its group, so it holds the current key and sealing
        // cannot fail; the open is the round-trip oracle (a failure is the finding).
        let sealed = m.seal(b"ctx", data).expect("seal");
        assert_eq!(m.open(&sealed, b"ctx").expect("open").plaintext, data);
        assert!(m.open(&sealed, b"other").is_err());
    });
}
