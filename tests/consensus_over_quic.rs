//! PBFT over the real transport: four replicas on 127.0.0.1, each a replica plane (QUIC, mutual
//! TLS) wrapped as the consensus network, a `Pbft` driver, and an application served through
//! the `Ordering` trait. Requests are ordered and answered alike; when the primary's plane shuts
//! down, the others change view over the network and go on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use securesmart::consensus::driver::Pbft;
use securesmart::consensus::message::{KeyRing, Limits, Request, Signer};
use securesmart::consensus::replica::{Config, Replica};
use securesmart::consensus::service::{Executor, Reply, serve};
use securesmart::consensus::sim::Chain;
use securesmart::replica_network::ReplicaNetwork;
use securesmart::transport::pki::DevCa;
use securesmart::transport::{NodeId, Plane, PlaneConfig, Role, TrustConfig};
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_order_over_quic_and_survive_losing_the_primary() {
    let ca = DevCa::new("quic consensus CA").unwrap();
    let ids: Vec<_> = (0..4)
        .map(|i| ca.issue_role(&format!("r{i}"), Role::Replica).unwrap())
        .collect();
    let mut planes = Vec::new();
    for id in &ids {
        let cfg = PlaneConfig::new(
            id.clone(),
            "127.0.0.1:0".parse().unwrap(),
            TrustConfig::new(ca.certificate()),
        );
        planes.push(Plane::replica(cfg).await.unwrap());
    }
    let mut trust = TrustConfig::new(ca.certificate());
    for (id, (plane, _)) in ids.iter().zip(&planes) {
        trust.peers.insert(id.id(), plane.local_addr().unwrap());
    }
    for (plane, _) in &planes {
        plane.update_trust(trust.clone()).unwrap();
    }
    for (plane, _) in &planes {
        assert!(plane.wait_connected(3, Duration::from_secs(10)).await);
    }
    let ring = KeyRing::new(ids.iter().map(|i| (i.id(), i.ed25519_public().unwrap())));
    let mut config = Config::new(ids.iter().map(|i| i.id()).collect());
    config.view_change_timeout = Duration::from_millis(400);
    config.checkpoint_interval = 8;
    config.window = 16;
    let (reply_tx, mut replies) = mpsc::unbounded_channel::<(usize, Reply)>();
    let mut submitters = Vec::new();
    let mut handles = Vec::new();
    for (i, (id, (plane, inbox))) in ids.iter().zip(planes).enumerate() {
        handles.push(plane.clone());
        let replica = Replica::new(
            config.clone(),
            Signer::from_seed(&id.ed25519_seed().unwrap()),
        );
        let network = ReplicaNetwork::new(plane, inbox);
        let (mut pbft, _task) = Pbft::spawn(replica, ring.clone(), network, Limits::default());
        submitters.push(pbft.submitter());
        let reply_tx = reply_tx.clone();
        tokio::spawn(async move {
            let mut executor = Executor::new(Chain::default());
            let _ = serve(&mut pbft, &mut executor, |r| {
                let _ = reply_tx.send((i, r));
            })
            .await;
        });
    }
    let client = NodeId::from_bytes([8; 32]);
    let mut votes: BTreeMap<u64, BTreeMap<usize, Bytes>> = BTreeMap::new();
    for number in 1..=40u64 {
        if number == 21 {
            // The primary of view 0 goes away: its connections close.
            handles[0].shutdown().await;
        }
        let request = Request {
            client,
            number,
            payload: Bytes::from(format!("op {number}")),
        };
        for s in &submitters {
            let _ = s.submit(request.clone());
        }
        let ok = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let (from, r) = replies.recv().await.unwrap();
                let by = votes.entry(r.number).or_default();
                by.insert(from, r.result.clone());
                if r.number == number && by.values().filter(|v| **v == r.result).count() >= 2 {
                    return;
                }
            }
        })
        .await;
        assert!(ok.is_ok(), "request {number} got no f+1 matching replies");
    }
    // The three remaining replicas answered the last request alike (the same state).
    tokio::time::timeout(Duration::from_secs(10), async {
        while votes.get(&40).map_or(0, BTreeMap::len) < 3 {
            let (from, r) = replies.recv().await.unwrap();
            votes.entry(r.number).or_default().insert(from, r.result);
        }
    })
    .await
    .unwrap();
    let last = &votes[&40];
    assert!(last.values().all(|v| *v == last[&1]), "{last:?}");
    // Every reply to every request agrees, whoever sent it.
    for (n, by) in &votes {
        let first = by.values().next().unwrap();
        assert!(by.values().all(|v| v == first), "request {n}: {by:?}");
    }
}
