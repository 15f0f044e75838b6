//! Fuzz bodies shared by the `fuzz/` targets and the corpus-replay test. Not a stable API.

// Panicking is this module's job: a failed oracle is the fuzzer's finding.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::sync::OnceLock;

use rustls::pki_types::{CertificateSigningRequestDer, UnixTime};
use securesmart_transport::Role;
use securesmart_transport::pki::DevCa;

use crate::enrollment::{EnrollRequest, EnrollResponse};
use crate::epoch::{MIN_REPLICAS, Member, Membership, MembershipCommand};

/// A genesis membership of four replicas from a development CA, made once per process.
fn genesis() -> &'static Membership {
    static GENESIS: OnceLock<Membership> = OnceLock::new();
    GENESIS.get_or_init(|| {
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
/// it to a genesis membership keeps the invariants (at least four replicas; the epoch advances
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
