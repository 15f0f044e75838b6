//! Three replicas and a client on loopback: traffic, a foreign-CA refusal and a revocation.
//!
//! `cargo run --release -p securesmart-transport --example refusals`

use std::time::Duration;

use bytes::Bytes;
use securesmart_transport::pki::DevCa;
use securesmart_transport::{Class, Limits, Plane, PlaneConfig, Refusal, Role, TrustConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let local = "127.0.0.1:0".parse()?;
    let mut ca = DevCa::new("example CA")?;

    // 1. Three replicas: each gets an identity from the CA and a replica-plane endpoint.
    let mut nodes = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let id = ca.issue_role(name, Role::Replica)?;
        let cfg = PlaneConfig::new(id.clone(), local, TrustConfig::new(ca.certificate()))
            .with_limits(Limits::local());
        let (plane, inbox) = Plane::replica(cfg).await?;
        println!("{name}: node {} on {}", id.id(), plane.local_addr()?);
        nodes.push((name, id, plane, inbox));
    }
    // 2. Tell everyone the peer set; the smaller id of each pair dials.
    let mut trust = TrustConfig::new(ca.certificate());
    for (_, id, plane, _) in &nodes {
        trust.peers.insert(id.id(), plane.local_addr()?);
    }
    for (_, _, plane, _) in &nodes {
        plane.update_trust(trust.clone())?;
        plane.wait_connected(2, Duration::from_secs(5)).await;
    }
    // 3. Broadcast and receive.
    for (name, _, plane, _) in &nodes {
        plane.broadcast(Class::Consensus, &Bytes::from(format!("hello from {name}")));
    }
    for (name, _, _, inbox) in &mut nodes {
        for _ in 0..2 {
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await {
                println!(
                    "{name} <- {}: {}",
                    m.from,
                    String::from_utf8_lossy(&m.payload)
                );
            }
        }
    }
    // 4. An intruder with a certificate from another CA is refused.
    // It knows the (public) CA certificate, but its own comes from a rogue CA.
    let rogue = DevCa::new("rogue CA")?.issue_role("mallory", Role::Replica)?;
    let mut rogue_trust = TrustConfig::new(ca.certificate());
    for (_, id, plane, _) in &nodes {
        rogue_trust.peers.insert(id.id(), plane.local_addr()?);
    }
    let (mallory, _) = Plane::replica(PlaneConfig::new(rogue.clone(), local, rogue_trust)).await?;
    for (_, _, plane, _) in &nodes {
        // As if mallory had been proposed as a peer: whoever dials, its certificate is checked.
        let mut t = plane.trust();
        t.peers.insert(rogue.id(), mallory.local_addr()?);
        plane.update_trust(t)?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 5. Revoke gamma: a new CRL closes its connections and refuses its reconnects.
    let gamma = nodes
        .last()
        .map(|(_, id, _, _)| id.clone())
        .ok_or("no nodes")?;
    let gamma_cert = gamma.chain().first().ok_or("empty chain")?.clone();
    trust.crls = vec![ca.crl(&[&gamma_cert])?];
    for (_, id, plane, _) in &nodes {
        if id.id() != gamma.id() {
            let closed = plane.update_trust(trust.clone())?;
            println!("CRL update closed {closed} connection(s)");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, _, plane, _) in &nodes {
        let s = plane.stats();
        println!(
            "{name}: connected to {} peer(s); refused unknown_ca={} revoked={}",
            plane.connected_peers().len(),
            s.refused(Refusal::UnknownCa),
            s.refused(Refusal::Revoked)
        );
    }
    mallory.shutdown().await;
    for (_, _, plane, _) in &nodes {
        plane.shutdown().await;
    }
    Ok(())
}
