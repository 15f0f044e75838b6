//! Every refusal reason over real QUIC on 127.0.0.1, each next to the accepted case.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use securesmart_transport::pki::{CertRequest, DevCa};
use securesmart_transport::{
    ALPN_REPLICA, Class, DropReason, Identity, Limits, NodeId, Plane, PlaneConfig, Refusal,
    RetryPolicy, Role, TrustConfig, close_code,
};

/// A replica identity whose id is smaller than `than`, so that it is the dialler of the pair.
fn smaller_replica(ca: &DevCa, name: &str, than: NodeId) -> Identity {
    loop {
        let id = ca.issue(&CertRequest::new(name, Role::Replica)).unwrap();
        if id.id() < than {
            return id;
        }
    }
}

/// A victim replica plane trusting `ca`, with `peers` in its peer set.
async fn victim(ca: &DevCa, limits: Limits) -> (Plane, securesmart_transport::Inbox, Identity) {
    init_tracing();
    let identity = ca.issue_role("victim", Role::Replica).unwrap();
    let cfg = PlaneConfig::new(
        identity.clone(),
        local(),
        TrustConfig::new(ca.certificate()),
    )
    .with_limits(limits);
    let (plane, inbox) = Plane::replica(cfg).await.unwrap();
    (plane, inbox, identity)
}

fn admit(plane: &Plane, ids: &[&Identity], addr: std::net::SocketAddr) {
    let mut trust = plane.trust();
    for id in ids {
        trust.peers.insert(id.id(), addr);
    }
    plane.update_trust(trust).unwrap();
}

/// Starts a replica plane for `identity` that knows `victim` at `addr` (it dials if smaller).
async fn dialler(
    identity: &Identity,
    ca_cert: rustls::pki_types::CertificateDer<'static>,
    victim: NodeId,
    addr: std::net::SocketAddr,
) -> (Plane, securesmart_transport::Inbox) {
    let trust = TrustConfig::new(ca_cert).with_peer(victim, addr);
    Plane::replica(PlaneConfig::new(identity.clone(), local(), trust).with_limits(Limits::test()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_expired_and_outsider_certificates_are_refused() {
    let ca = DevCa::new("ca").unwrap();
    let foreign_ca = DevCa::new("foreign").unwrap();
    let (v, _inbox, vid) = victim(&ca, Limits::test()).await;
    let vaddr = v.local_addr().unwrap();

    let good = smaller_replica(&ca, "good", vid.id());
    let foreign = loop {
        let id = foreign_ca.issue_role("foreign", Role::Replica).unwrap();
        if id.id() < vid.id() {
            break id;
        }
    };
    let expired = loop {
        let id = ca
            .issue(&CertRequest::new("old", Role::Replica).expired())
            .unwrap();
        if id.id() < vid.id() {
            break id;
        }
    };
    let outsider = smaller_replica(&ca, "outsider", vid.id());
    // All but the outsider are in the victim's peer set: only their certificates are at fault.
    admit(&v, &[&good, &foreign, &expired], vaddr);

    let (g, _gi) = dialler(&good, ca.certificate(), vid.id(), vaddr).await;
    assert!(g.wait_connected(1, WAIT).await, "the good peer is accepted");

    let mut planes = Vec::new();
    for who in [&foreign, &expired, &outsider] {
        planes.push(dialler(who, ca.certificate(), vid.id(), vaddr).await);
    }
    eventually("three refusals", || {
        let s = v.stats();
        s.refused(Refusal::UnknownCa) >= 1
            && s.refused(Refusal::Expired) >= 1
            && s.refused(Refusal::NotInPeerSet) >= 1
    })
    .await;
    // (A refused dialer may believe for a moment that it is connected: in TLS 1.3 the client
    // learns of the refusal after its own handshake completes. The victim's view is what counts.)
    drop(planes);
    assert_eq!(v.connected_peers(), vec![good.id()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_refused_on_the_replica_plane() {
    let ca = DevCa::new("ca").unwrap();
    let (v, _inbox, vid) = victim(&ca, Limits::test()).await;
    let vaddr = v.local_addr().unwrap();
    let client = ca.issue_role("client", Role::Client).unwrap();
    let replica = smaller_replica(&ca, "replica", vid.id());
    admit(&v, &[&client, &replica], vaddr);

    let ok = raw_dial(&replica, vaddr, ALPN_REPLICA).await.unwrap();
    assert!(
        raw_link_survives(&ok).await,
        "a replica certificate is accepted"
    );

    // TLS 1.3: the client sees its handshake complete; the refusal shows on first use.
    if let Ok(conn) = raw_dial(&client, vaddr, ALPN_REPLICA).await {
        assert!(!raw_link_survives(&conn).await);
    }
    eventually("wrong role refusal", || {
        v.stats().refused(Refusal::WrongRole) == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_ip_is_ignored_until_unblocked() {
    let ca = DevCa::new("ca").unwrap();
    let (v, _inbox, vid) = victim(&ca, Limits::test()).await;
    let vaddr = v.local_addr().unwrap();
    let peer = smaller_replica(&ca, "peer", vid.id());
    let mut trust = v.trust();
    trust.peers.insert(peer.id(), vaddr);
    trust.blocked_ips.insert("127.0.0.1".parse().unwrap());
    v.update_trust(trust.clone()).unwrap();

    let (p, _pi) = dialler(&peer, ca.certificate(), vid.id(), vaddr).await;
    eventually("blocked attempts", || {
        v.stats().refused(Refusal::BlockedIp) >= 2
    })
    .await;
    assert!(p.connected_peers().is_empty());
    assert_eq!(v.stats().handshakes_accepted, 0);

    trust.blocked_ips.clear();
    v.update_trust(trust).unwrap();
    assert!(p.wait_connected(1, WAIT).await, "accepted once unblocked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_update_closes_the_revoked_peer_and_refuses_its_reconnect() {
    let mut ca = DevCa::new("ca").unwrap();
    let mut nodes = mesh(&ca, 3, Limits::test()).await;
    for n in &nodes {
        assert!(n.plane.wait_connected(2, WAIT).await);
    }
    let revoked = nodes[2].identity.id();
    let crl = ca.crl(&[&nodes[2].identity.chain()[0]]).unwrap();
    let mut trust = peer_trust(&ca, &nodes);
    trust.crls = vec![crl];
    let closed: usize = nodes[..2]
        .iter()
        .map(|n| n.plane.update_trust(trust.clone()).unwrap())
        .sum();
    assert_eq!(
        closed, 2,
        "each honest node closed its connection to the revoked one"
    );
    eventually("revoked peer disconnected", || {
        nodes[2].plane.connected_peers().is_empty()
    })
    .await;
    // The revoked node keeps dialling (or being dialled); every attempt is refused.
    eventually("reconnect refused", || {
        nodes[..2]
            .iter()
            .map(|n| n.plane.stats().refused(Refusal::Revoked))
            .sum::<u64>()
            >= 4
    })
    .await;
    for n in &nodes[..2] {
        assert!(!n.plane.connected_peers().contains(&revoked));
    }
    // The honest pair still talks.
    let to = nodes[1].identity.id();
    nodes[0]
        .plane
        .send(to, Class::Consensus, Bytes::from_static(b"still here"))
        .await
        .unwrap();
    let got = recv_n(&mut nodes[1].inbox, 1).await;
    assert_eq!(&got[0].payload[..], b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_frame_or_unknown_class_closes_only_that_connection() {
    let ca = DevCa::new("ca").unwrap();
    let (v, mut inbox, vid) = victim(&ca, Limits::test()).await;
    let vaddr = v.local_addr().unwrap();
    let honest = smaller_replica(&ca, "honest", vid.id());
    let bad = smaller_replica(&ca, "bad", vid.id());
    let worse = smaller_replica(&ca, "worse", vid.id());
    admit(&v, &[&honest, &bad, &worse], vaddr);
    let (h, _hi) = dialler(&honest, ca.certificate(), vid.id(), vaddr).await;
    assert!(h.wait_connected(1, WAIT).await);

    let max = Limits::test().max_frame_bytes;
    let bad_conn = raw_dial(&bad, vaddr, ALPN_REPLICA).await.unwrap();
    let mut s = bad_conn.open_uni().await.unwrap();
    s.write_all(&[Class::Consensus.tag()]).await.unwrap();
    s.write_all(&u32::try_from(max + 1).unwrap().to_be_bytes())
        .await
        .unwrap();
    let reason = tokio::time::timeout(WAIT, bad_conn.closed()).await.unwrap();
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(close_code::FRAME_TOO_LARGE)),
        "{reason:?}"
    );

    let worse_conn = raw_dial(&worse, vaddr, ALPN_REPLICA).await.unwrap();
    let mut s = worse_conn.open_uni().await.unwrap();
    s.write_all(&[9]).await.unwrap();
    let reason = tokio::time::timeout(WAIT, worse_conn.closed())
        .await
        .unwrap();
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(close_code::UNKNOWN_CLASS)),
        "{reason:?}"
    );
    assert_eq!(v.stats().peer_errors, 2);

    // Garbage datagrams at the port change nothing.
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        junk.send_to(&[i as u8; 1200][..(i as usize % 1200) + 1], vaddr)
            .unwrap();
    }
    // The honest peer's connection is untouched and its traffic arrives.
    for i in 0..50u8 {
        h.send(vid.id(), Class::Consensus, Bytes::from(vec![i]))
            .await
            .unwrap();
    }
    let got = recv_n(&mut inbox, 50).await;
    assert!(got.iter().all(|m| m.from == honest.id()));
    assert_eq!(
        got.iter().map(|m| m.payload[0]).collect::<Vec<_>>(),
        (0..50).collect::<Vec<_>>()
    );
    assert_eq!(v.connected_peers(), vec![honest.id()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_its_budget_loses_the_excess_and_others_are_unaffected() {
    let ca = DevCa::new("ca").unwrap();
    let mut limits = Limits::test();
    limits.peer_messages_per_sec = 50;
    limits.peer_message_burst = 100;
    let (v, mut inbox, vid) = victim(&ca, limits).await;
    let vaddr = v.local_addr().unwrap();
    let flooder = smaller_replica(&ca, "flooder", vid.id());
    let honest = smaller_replica(&ca, "honest", vid.id());
    admit(&v, &[&flooder, &honest], vaddr);
    let (f, _fi) = dialler(&flooder, ca.certificate(), vid.id(), vaddr).await;
    let (h, _hi) = dialler(&honest, ca.certificate(), vid.id(), vaddr).await;
    assert!(f.wait_connected(1, WAIT).await && h.wait_connected(1, WAIT).await);

    const FLOOD: usize = 1000;
    const HONEST: usize = 60;
    for i in 0..FLOOD {
        f.send(vid.id(), Class::Consensus, Bytes::from(vec![1; 8 + i % 8]))
            .await
            .unwrap();
    }
    for _ in 0..HONEST {
        h.send(vid.id(), Class::Consensus, Bytes::from_static(b"honest"))
            .await
            .unwrap();
    }
    let started = std::time::Instant::now();
    eventually("all frames seen", || {
        v.stats().frames_in(Class::Consensus) >= (FLOOD + HONEST) as u64
    })
    .await;
    let mut from_flooder = 0;
    let mut from_honest = 0;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), inbox.recv()).await {
        if m.from == honest.id() {
            from_honest += 1
        } else {
            from_flooder += 1
        }
    }
    let dropped = v.stats().dropped(DropReason::RateLimitMessages);
    assert_eq!(
        from_honest, HONEST,
        "the honest peer's traffic arrives complete"
    );
    let allowed = 100 + 50 * (started.elapsed().as_secs_f64().ceil() as usize + 1);
    assert!(
        from_flooder <= allowed,
        "flooder got {from_flooder} through (allowed {allowed})"
    );
    assert_eq!(
        dropped as usize,
        FLOOD - from_flooder,
        "every excess message is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_accepted_through_the_retry_path() {
    let ca = DevCa::new("ca").unwrap();
    let mut limits = Limits::test();
    limits.retry = RetryPolicy::Always;
    let (v, mut inbox, vid) = victim(&ca, limits).await;
    let vaddr = v.local_addr().unwrap();
    let peer = smaller_replica(&ca, "peer", vid.id());
    admit(&v, &[&peer], vaddr);
    let (p, _pi) = dialler(&peer, ca.certificate(), vid.id(), vaddr).await;
    assert!(p.wait_connected(1, WAIT).await);
    eventually("the victim admitted the peer", || {
        v.connected_peers() == vec![peer.id()]
    })
    .await;
    let s = v.stats();
    assert!(s.retries_sent >= 1, "a Retry was sent");
    assert!(s.handshakes_accepted >= 1);
    p.send(vid.id(), Class::Bulk, Bytes::from_static(b"validated"))
        .await
        .unwrap();
    assert_eq!(&recv_n(&mut inbox, 1).await[0].payload[..], b"validated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_rate_and_per_ip_caps_refuse_the_excess() {
    let ca = DevCa::new("ca").unwrap();
    let mut limits = Limits::test();
    limits.handshakes_per_ip_per_sec = 1;
    limits.handshake_burst_per_ip = 3;
    let (v, _inbox, vid) = victim(&ca, limits).await;
    let vaddr = v.local_addr().unwrap();
    let peer = smaller_replica(&ca, "peer", vid.id());
    admit(&v, &[&peer], vaddr);
    let mut ok = 0;
    let mut conns = Vec::new();
    for _ in 0..6 {
        if let Ok(c) = raw_dial(&peer, vaddr, ALPN_REPLICA).await {
            ok += 1;
            conns.push(c);
        }
    }
    assert!(
        (1..=4).contains(&ok),
        "{ok} handshakes got through a burst of 3"
    );
    assert!(v.stats().refused(Refusal::HandshakeRate) >= 2);

    let mut limits = Limits::test();
    limits.max_connections_per_ip = 2;
    let (v2, _i2, vid2) = victim(&ca, limits).await;
    let v2addr = v2.local_addr().unwrap();
    // Four distinct peers from one IP (the same peer redialling would replace its own link).
    let peers: Vec<Identity> = (0..4)
        .map(|i| smaller_replica(&ca, &format!("p{i}"), vid2.id()))
        .collect();
    admit(&v2, &peers.iter().collect::<Vec<_>>(), v2addr);
    let mut held = Vec::new();
    for p in &peers {
        if let Ok(c) = raw_dial(p, v2addr, ALPN_REPLICA).await {
            held.push(c);
        }
    }
    assert_eq!(held.len(), 2, "the cap of two connections per IP holds");
    assert_eq!(v2.stats().refused(Refusal::TooManyConnectionsFromIp), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_read_pins_at_most_the_queue_bytes() {
    let ca = DevCa::new("queue CA").unwrap();
    let limits = Limits::test();
    let (plane, _inbox, me) = victim(&ca, limits.clone()).await;
    // A peer in the set that never answers: a UDP socket nobody reads. Our writers for it
    // wait for a connection, holding what was queued.
    let silent = std::net::UdpSocket::bind(LOCAL).unwrap();
    let peer = smaller_replica(&ca, "silent", NodeId::from_bytes([0xff; 32]));
    assert_ne!(peer.id(), me.id());
    admit(&plane, &[&peer], silent.local_addr().unwrap());
    let message = Bytes::from(vec![0u8; 60 * 1024]);
    for class in [Class::Bulk, Class::Consensus] {
        let mut queued = 0;
        let mut refused = 0;
        for _ in 0..200 {
            match plane.try_send(peer.id(), class, message.clone()) {
                Ok(()) => queued += 1,
                Err(securesmart_transport::SendError::QueueFull) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        // The message queues hold 64 (bulk) and 1024 (consensus) messages: the byte bound
        // is what stops the sender, at 1 MiB.
        assert!(queued >= 1, "{class:?}: the first messages are queued");
        assert!(
            queued * message.len() <= limits.queue_bytes,
            "{class:?}: {queued} messages of 60 KiB queued"
        );
        assert_eq!(queued + refused, 200);
    }
    // Bytes that were never queued are not counted: a small message still fits.
    assert!(
        plane
            .try_send(peer.id(), Class::Bulk, Bytes::from_static(b"small"))
            .is_ok()
    );
}
