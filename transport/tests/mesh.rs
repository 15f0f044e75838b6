//! A full mesh of replica planes over real QUIC on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::*;
use securesmart_transport::pki::DevCa;
use securesmart_transport::{Class, Limits, NodeId, Refusal, Role};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_exchange_messages_in_order_per_peer_and_class() {
    let ca = DevCa::new("mesh ca").unwrap();
    let mut nodes = mesh(&ca, 4, Limits::test()).await;
    for n in &nodes {
        assert!(
            n.plane.wait_connected(3, WAIT).await,
            "{} not fully connected",
            n.identity.id()
        );
    }
    const PER_CLASS: u32 = 200;
    for n in &nodes {
        for seq in 0..PER_CLASS {
            for class in [Class::Consensus, Class::Bulk] {
                let body = if class == Class::Bulk {
                    vec![7u8; 3000]
                } else {
                    vec![]
                };
                let mut msg = seq.to_be_bytes().to_vec();
                msg.extend(body);
                for peer in &nodes {
                    if peer.identity.id() != n.identity.id() {
                        n.plane
                            .send(peer.identity.id(), class, Bytes::from(msg.clone()))
                            .await
                            .unwrap();
                    }
                }
            }
        }
    }
    for n in &mut nodes {
        let got = recv_n(&mut n.inbox, 3 * 2 * PER_CLASS as usize).await;
        let mut next: BTreeMap<(NodeId, Class), u32> = BTreeMap::new();
        for m in got {
            assert_ne!(m.from, n.identity.id());
            let seq = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
            let expected = next.entry((m.from, m.class)).or_insert(0);
            assert_eq!(
                seq, *expected,
                "out of order from {} in {:?}",
                m.from, m.class
            );
            *expected += 1;
        }
        assert_eq!(next.len(), 6, "every peer and class heard");
        assert!(next.values().all(|v| *v == PER_CLASS));
        assert_eq!(
            n.plane
                .stats()
                .dropped(securesmart_transport::DropReason::QueueFull),
            0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_per_pair_dialled_by_the_smaller_id() {
    let ca = DevCa::new("pair ca").unwrap();
    let nodes = mesh(&ca, 3, Limits::test()).await;
    for n in &nodes {
        assert!(n.plane.wait_connected(2, WAIT).await);
    }
    // Each endpoint ends up holding exactly one connection per peer, and no node ever saw a
    // connection dialled by the larger id of its pair.
    for n in &nodes {
        eventually("one connection per pair", || {
            n.plane.open_connections() == 2
        })
        .await;
        let stats = n.plane.stats();
        assert!(stats.handshakes_accepted >= 2);
        assert_eq!(
            stats.refused(securesmart_transport::Refusal::WrongDialer),
            0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_reconnected_and_traffic_resumes() {
    let ca = DevCa::new("restart ca").unwrap();
    let mut nodes = mesh(&ca, 2, Limits::test()).await;
    assert!(nodes[0].plane.wait_connected(1, WAIT).await);
    // Restart whichever node accepts (the larger id) on the same port.
    let (small, large) = if nodes[0].identity.id() < nodes[1].identity.id() {
        (0, 1)
    } else {
        (1, 0)
    };
    let large_id = nodes[large].identity.id();
    let addr = nodes[large].addr;
    let old = nodes.remove(large);
    let trust = old.plane.trust();
    old.plane.shutdown().await;
    drop(old.plane);
    let cfg = securesmart_transport::PlaneConfig::new(old.identity.clone(), addr, trust)
        .with_limits(Limits::test());
    // The old endpoint's tasks release the port asynchronously after shutdown.
    let mut attempt = 0;
    let (plane, inbox) = loop {
        match securesmart_transport::Plane::replica(cfg.clone()).await {
            Ok(p) => break p,
            Err(e) if attempt < 100 => {
                attempt += 1;
                tracing::debug!(%e, "port not free yet");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("could not rebind: {e}"),
        }
    };
    nodes.insert(
        large,
        Member {
            identity: old.identity,
            plane,
            inbox,
            addr,
        },
    );
    assert!(
        nodes[large].plane.wait_connected(1, WAIT).await,
        "dialler reconnected"
    );
    nodes[small]
        .plane
        .send(large_id, Class::Consensus, Bytes::from_static(b"again"))
        .await
        .unwrap();
    let got = recv_n(&mut nodes[large].inbox, 1).await;
    assert_eq!(&got[0].payload[..], b"again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_serves_consensus_first_and_ends_after_shutdown() {
    let ca = DevCa::new("inbox ca").unwrap();
    let mut nodes = mesh(&ca, 2, Limits::test()).await;
    assert!(nodes[0].plane.wait_connected(1, WAIT).await);
    let to = nodes[1].identity.id();
    for i in 0..5u8 {
        nodes[0]
            .plane
            .send(to, Class::Bulk, Bytes::from(vec![i]))
            .await
            .unwrap();
    }
    eventually("bulk queued", || {
        nodes[1].plane.stats().frames_in(Class::Bulk) == 5
    })
    .await;
    for i in 0..5u8 {
        nodes[0]
            .plane
            .send(to, Class::Consensus, Bytes::from(vec![i]))
            .await
            .unwrap();
    }
    eventually("consensus queued", || {
        nodes[1].plane.stats().frames_in(Class::Consensus) == 5
    })
    .await;
    let mut buf = Vec::new();
    assert_eq!(nodes[1].inbox.recv_many(&mut buf, 100).await, 5);
    assert!(
        buf.iter().all(|m| m.class == Class::Consensus),
        "consensus is served first"
    );
    buf.clear();
    assert_eq!(nodes[1].inbox.recv_many(&mut buf, 100).await, 5);
    assert!(buf.iter().all(|m| m.class == Class::Bulk));
    // After shutdown the inbox ends even though the plane handle is still held.
    nodes[1].plane.shutdown().await;
    let end = tokio::time::timeout(WAIT, nodes[1].inbox.recv())
        .await
        .unwrap();
    assert!(end.is_none());
    assert!(
        nodes[1]
            .plane
            .try_send(nodes[0].identity.id(), Class::Consensus, Bytes::new())
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_replaces_every_link_before_the_old_one_is_revoked() {
    let mut ca = DevCa::new("renew ca").unwrap();
    let mut nodes = mesh(&ca, 3, Limits::test()).await;
    for n in &nodes {
        assert!(n.plane.wait_connected(2, WAIT).await);
    }
    // The largest id renews: the other two dial it, so its replacements go against the usual
    // direction, which the peers take only for a renewal.
    nodes.sort_by_key(|n| n.identity.id());
    let old = nodes[2].identity.clone();
    let mut later = securesmart_transport::pki::CertRequest::new("replica-renewed", Role::Replica);
    later.not_before_offset = -time::Duration::MINUTE;
    let renewed = ca.renew(&old, &later).unwrap();
    assert_eq!(renewed.id(), old.id(), "a renewal keeps the node id");
    let before = nodes[2].plane.stats().handshakes_accepted;
    assert_eq!(nodes[2].plane.renew_identity(renewed.clone()).unwrap(), 2);
    eventually("both links replaced", || {
        nodes[2].plane.stats().handshakes_accepted >= before + 2
            && nodes.iter().all(|n| n.plane.open_connections() == 2)
    })
    .await;

    // The old certificate is revoked: no link carries it any more, so nothing closes and the
    // renewed node keeps talking to both peers.
    let mut trust = peer_trust(&ca, &nodes);
    trust.crls = vec![ca.crl(&[&old.chain()[0]]).unwrap()];
    for n in &nodes {
        assert_eq!(
            n.plane.update_trust(trust.clone()).unwrap(),
            0,
            "no live link carries the revoked certificate"
        );
    }
    for i in 0..2 {
        let to = nodes[i].identity.id();
        nodes[2]
            .plane
            .send(to, Class::Consensus, Bytes::from_static(b"renewed"))
            .await
            .unwrap();
        let got = recv_n(&mut nodes[i].inbox, 1).await;
        assert_eq!(&got[0].payload[..], b"renewed");
    }
    for n in &nodes {
        assert_eq!(n.plane.connected_peers().len(), 2);
    }

    // A peer cannot make the others churn by "renewing" back to an older certificate: its
    // connections against the usual direction are refused while the newer one is live.
    let mut older = securesmart_transport::pki::CertRequest::new("replica-older", Role::Replica);
    older.not_before_offset = -time::Duration::HOUR * 2;
    let older = ca.renew(&old, &older).unwrap();
    nodes[2].plane.renew_identity(older).unwrap();
    eventually("the step back refused", || {
        nodes[..2]
            .iter()
            .map(|n| n.plane.stats().refused(Refusal::WrongDialer))
            .sum::<u64>()
            == 2
    })
    .await;
    for n in &nodes {
        assert_eq!(n.plane.connected_peers().len(), 2, "the renewed links stay");
    }

    // Another key is no renewal.
    let stranger = ca.issue_role("stranger", Role::Replica).unwrap();
    assert!(nodes[2].plane.renew_identity(stranger).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planes_with_different_alpns_refuse_each_other() {
    // A plane started with another application protocol (the bench's insecure baseline
    // does this) and a default one trust each other's certificates, yet never connect; two
    // with the same custom ALPN do.
    use securesmart_transport::{Plane, PlaneConfig, TrustConfig};
    let ca = DevCa::new("alpn ca").unwrap();
    let start = |name: &str, alpn: Option<&'static [u8]>| {
        let identity = ca.issue_role(name, Role::Replica).unwrap();
        let mut cfg = PlaneConfig::new(
            identity.clone(),
            "127.0.0.1:0".parse().unwrap(),
            TrustConfig::new(ca.certificate()),
        )
        .with_limits(Limits::test());
        if let Some(alpn) = alpn {
            cfg = cfg.with_alpn(alpn);
        }
        async move {
            let (plane, inbox) = Plane::replica(cfg).await.unwrap();
            let addr = plane.local_addr().unwrap();
            Member {
                identity,
                plane,
                inbox,
                addr,
            }
        }
    };
    let other: &'static [u8] = b"securesmart-replica-other/1";
    let pairs = [
        (start("a", None).await, start("b", Some(other)).await, false),
        (
            start("c", Some(other)).await,
            start("d", Some(other)).await,
            true,
        ),
    ];
    for (x, y, connects) in &pairs {
        let mut trust = peer_trust(&ca, &[]);
        for m in [x, y] {
            trust.peers.insert(m.identity.id(), m.addr);
        }
        x.plane.update_trust(trust.clone()).unwrap();
        y.plane.update_trust(trust).unwrap();
        let wait = std::time::Duration::from_secs(if *connects { 10 } else { 3 });
        assert_eq!(x.plane.wait_connected(1, wait).await, *connects);
        assert_eq!(y.plane.wait_connected(1, wait).await, *connects);
    }
}
