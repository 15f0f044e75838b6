//! A full mesh of replica planes over real QUIC on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::*;
use securesmart_transport::pki::DevCa;
use securesmart_transport::{Class, Limits, NodeId};

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
    // Let any redundant connection be resolved, then count: each node accepted exactly the
    // connections dialled by smaller ids, and refused none as a wrong dialer.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut ids: Vec<NodeId> = nodes.iter().map(|n| n.identity.id()).collect();
    ids.sort();
    for n in &nodes {
        let me = n.identity.id();
        let stats = n.plane.stats();
        // Both ends count a handshake: one per pair, on each side.
        assert_eq!(stats.handshakes_accepted, 2, "node {me}");
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
