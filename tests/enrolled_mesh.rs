//! Nodes enrolled at the trust center (two by token + CSR file, one over the network) form a
//! transport mesh; after a revocation of the network-enrolled node and a CRL update its
//! connections are closed and refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use securesmart::membership::trust_center::DEFAULT_CRL_VALIDITY;
use securesmart::membership::{
    EnrollmentServer, Reason, RevokeTarget, RoleName, TrustCenter, enroll, key_and_csr,
};
use securesmart::transport::{Identity, Limits, Plane, PlaneConfig, Refusal, TrustConfig};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_nodes_mesh_and_a_revoked_one_is_cut_off() {
    let dir = std::env::temp_dir().join(format!("ss-enrolled-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut ca = TrustCenter::init(&dir, "cluster CA").unwrap();
    let mut identities = Vec::new();
    for i in 0..2 {
        let name = format!("replica{i}");
        let token = ca
            .create_token(
                RoleName::Replica,
                std::slice::from_ref(&name),
                Duration::from_secs(600),
            )
            .unwrap();
        let (key, csr) = key_and_csr(&[name]).unwrap();
        let csr = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .unwrap();
        let issued = ca.sign_csr(&csr, &token).unwrap();
        identities.push(Identity::from_pem(&issued.pem(), &key).unwrap());
    }
    // The third node was never configured by hand: it enrolls over the network.
    let token = ca
        .create_token(
            RoleName::Replica,
            &["replica2".into()],
            Duration::from_secs(600),
        )
        .unwrap();
    let ca_cert = ca.ca_certificate();
    let server = EnrollmentServer::start(
        TrustCenter::open(&dir).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        &[],
        Default::default(),
    )
    .await
    .unwrap();
    let enrolled = enroll(server.local_addr().unwrap(), &ca_cert, &token, &[])
        .await
        .unwrap();
    server.shutdown().await;
    identities.push(enrolled.identity);
    let local = "127.0.0.1:0".parse().unwrap();
    let mut planes = Vec::new();
    for id in &identities {
        let cfg = PlaneConfig::new(id.clone(), local, TrustConfig::new(ca.ca_certificate()))
            .with_limits(Limits::test());
        planes.push(Plane::replica(cfg).await.unwrap().0);
    }
    let mut trust = TrustConfig::new(ca.ca_certificate());
    for (id, p) in identities.iter().zip(&planes) {
        trust.peers.insert(id.id(), p.local_addr().unwrap());
    }
    for p in &planes {
        p.update_trust(trust.clone()).unwrap();
    }
    for p in &planes {
        assert!(
            p.wait_connected(2, WAIT).await,
            "the enrolled nodes form a mesh"
        );
    }
    ca.revoke(
        &RevokeTarget::NodeId(identities[2].id()),
        Reason::KeyCompromise,
    )
    .unwrap();
    trust.crls = vec![ca.crl(DEFAULT_CRL_VALIDITY).unwrap()];
    for p in &planes[..2] {
        p.update_trust(trust.clone()).unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let refused: u64 = planes[..2]
            .iter()
            .map(|p| p.stats().refused(Refusal::Revoked))
            .sum();
        let cut = planes[..2]
            .iter()
            .all(|p| !p.connected_peers().contains(&identities[2].id()));
        if cut && refused >= 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "revoked node not cut off (refused {refused})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(planes[0].connected_peers(), vec![identities[1].id()]);
    std::fs::remove_dir_all(&dir).unwrap();
}
