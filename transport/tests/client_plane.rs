//! The client plane: clients reach replicas on their own endpoint (port and ALPN) with client
//! certificates; replicas reply over the same connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use bytes::Bytes;
use common::*;
use securesmart_transport::pki::DevCa;
use securesmart_transport::{Class, Inbox, Limits, Plane, PlaneConfig, Refusal, Role, TrustConfig};

struct Listener {
    replica: securesmart_transport::Identity,
    plane: Plane,
    inbox: Inbox,
}

async fn listener(ca: &DevCa) -> Listener {
    init_tracing();
    let replica = ca.issue_role("replica", Role::Replica).unwrap();
    let cfg = PlaneConfig::new(replica.clone(), local(), TrustConfig::new(ca.certificate()))
        .with_limits(Limits::test());
    let (plane, inbox) = Plane::client_listener(cfg).await.unwrap();
    Listener {
        replica,
        plane,
        inbox,
    }
}

async fn client(
    ca: &DevCa,
    name: &str,
    to: &Listener,
) -> (securesmart_transport::Identity, Plane, Inbox) {
    client_as(ca, name, Role::Client, to).await
}

/// A client plane of an identity of `role` named `name`, connected to `to`.
async fn client_as(
    ca: &DevCa,
    name: &str,
    role: Role,
    to: &Listener,
) -> (securesmart_transport::Identity, Plane, Inbox) {
    let id = ca.issue_role(name, role).unwrap();
    let trust = TrustConfig::new(ca.certificate())
        .with_peer(to.replica.id(), to.plane.local_addr().unwrap());
    let (plane, inbox) =
        Plane::client(PlaneConfig::new(id.clone(), local(), trust).with_limits(Limits::test()))
            .await
            .unwrap();
    (id, plane, inbox)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_request_is_answered_over_its_connection() {
    let ca = DevCa::new("ca").unwrap();
    let mut l = listener(&ca).await;
    let (cid, c, mut cinbox) = client(&ca, "client", &l).await;
    assert!(c.wait_connected(1, WAIT).await);
    c.send(
        l.replica.id(),
        Class::Consensus,
        Bytes::from_static(b"put k v"),
    )
    .await
    .unwrap();
    let req = recv_n(&mut l.inbox, 1).await.remove(0);
    assert_eq!(
        req.from,
        cid.id(),
        "the request is attributed to the authenticated client"
    );
    l.plane
        .send(req.from, Class::Consensus, Bytes::from_static(b"ok"))
        .await
        .unwrap();
    let reply = recv_n(&mut cinbox, 1).await.remove(0);
    assert_eq!(
        (reply.from, &reply.payload[..]),
        (l.replica.id(), &b"ok"[..])
    );
    // A client identity cannot run a client plane's listener (a replica may run a client: a
    // joiner asks the replicas for the roster).
    let wrong = PlaneConfig::new(cid.clone(), local(), TrustConfig::new(ca.certificate()));
    assert!(Plane::client_listener(wrong).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_acting_as_a_client_is_admitted_and_named_as_a_replica() {
    let ca = DevCa::new("ca").unwrap();
    let mut l = listener(&ca).await;
    let (_, c, _ci) = client(&ca, "client", &l).await;
    let (_, r, _ri) = client_as(&ca, "joining replica", Role::Replica, &l).await;
    assert!(c.wait_connected(1, WAIT).await && r.wait_connected(1, WAIT).await);
    for plane in [&c, &r] {
        plane
            .send(
                l.replica.id(),
                Class::Consensus,
                Bytes::from_static(b"hello"),
            )
            .await
            .unwrap();
    }
    // The listener hears both, each with the role its certificate names: the node answers a
    // replica only its roster queries.
    let mut roles: Vec<Role> = recv_n(&mut l.inbox, 2)
        .await
        .iter()
        .map(|m| m.role)
        .collect();
    roles.sort_by_key(|r| *r == Role::Replica);
    assert_eq!(roles, vec![Role::Client, Role::Replica]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_cut_off_and_refused() {
    let mut ca = DevCa::new("ca").unwrap();
    let l = listener(&ca).await;
    let (bad_id, bad, _bi) = client(&ca, "bad", &l).await;
    let (good_id, good, _gi) = client(&ca, "good", &l).await;
    assert!(bad.wait_connected(1, WAIT).await && good.wait_connected(1, WAIT).await);
    eventually("both clients admitted", || {
        l.plane.connected_peers().len() == 2
    })
    .await;
    let mut trust = l.plane.trust();
    trust.crls = vec![ca.crl(&[&bad_id.chain()[0]]).unwrap()];
    assert_eq!(
        l.plane.update_trust(trust).unwrap(),
        1,
        "only the revoked client is closed"
    );
    eventually("reconnect refused", || {
        l.plane.stats().refused(Refusal::Revoked) >= 3
    })
    .await;
    // The revoked client keeps retrying (in TLS 1.3 it learns of each refusal only after its own
    // handshake completes); the listener holds only the good client.
    assert_eq!(l.plane.connected_peers(), vec![good_id.id()]);
    assert_eq!(good.connected_peers(), vec![l.replica.id()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flood_does_not_starve_the_replica_plane() {
    let ca = DevCa::new("ca").unwrap();
    let mut members = mesh(&ca, 2, Limits::test()).await;
    assert!(members[0].plane.wait_connected(1, WAIT).await);
    // Replica 1 also runs a client plane, which a client floods.
    let cfg = PlaneConfig::new(
        members[1].identity.clone(),
        local(),
        TrustConfig::new(ca.certificate()),
    )
    .with_limits(Limits::test());
    let (clients, _client_inbox) = Plane::client_listener(cfg).await.unwrap();
    let l = Listener {
        replica: members[1].identity.clone(),
        plane: clients,
        inbox: _client_inbox,
    };
    let (_fid, flooder, _fi) = client(&ca, "flooder", &l).await;
    assert!(flooder.wait_connected(1, WAIT).await);
    let target = l.replica.id();
    let flood = tokio::spawn(async move {
        for _ in 0..50_000 {
            let _ = flooder.try_send(target, Class::Bulk, Bytes::from(vec![0; 1024]));
            tokio::task::yield_now().await;
        }
        flooder
    });
    // Nobody drains the client inbox: the flood backs up on the client plane only.
    let to = members[1].identity.id();
    for i in 0..200u32 {
        members[0]
            .plane
            .send(to, Class::Consensus, Bytes::from(i.to_be_bytes().to_vec()))
            .await
            .unwrap();
    }
    let got = recv_n(&mut members[1].inbox, 200).await;
    let seqs: Vec<u32> = got
        .iter()
        .map(|m| u32::from_be_bytes(m.payload[..4].try_into().unwrap()))
        .collect();
    assert_eq!(seqs, (0..200).collect::<Vec<_>>());
    let _ = flood.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_renews_its_certificate_keeps_its_connection_through_the_revocation() {
    let mut ca = DevCa::new("ca").unwrap();
    let l = listener(&ca).await;
    let (old, c, _ci) = client(&ca, "client", &l).await;
    assert!(c.wait_connected(1, WAIT).await);
    let mut later = securesmart_transport::pki::CertRequest::new("client", Role::Client);
    later.not_before_offset = -time::Duration::MINUTE;
    let renewed = ca.renew(&old, &later).unwrap();
    let before = l.plane.stats().handshakes_accepted;
    assert_eq!(c.renew_identity(renewed).unwrap(), 1);
    eventually("the connection replaced", || {
        l.plane.stats().handshakes_accepted > before && l.plane.open_connections() == 1
    })
    .await;
    let mut trust = l.plane.trust();
    trust.crls = vec![ca.crl(&[&old.chain()[0]]).unwrap()];
    assert_eq!(
        l.plane.update_trust(trust).unwrap(),
        0,
        "the old certificate is on no live connection"
    );
    assert_eq!(l.plane.connected_peers(), vec![old.id()]);
}
