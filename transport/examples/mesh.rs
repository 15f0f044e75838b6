//! Three replicas on loopback, each pair joined by one mutually authenticated QUIC connection,
//! each saying hello to the others. `cargo run -p securesmart-transport --example mesh`

use std::time::Duration;

use securesmart_transport::pki::DevCa;
use securesmart_transport::{Class, Plane, PlaneConfig, Role, TrustConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A development CA issues each node its identity (in production: your trust center).
    let ca = DevCa::new("example CA")?;
    let trust = TrustConfig::new(ca.certificate());
    let mut nodes = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let identity = ca.issue_role(name, Role::Replica)?;
        let config = PlaneConfig::new(identity, "127.0.0.1:0".parse()?, trust.clone());
        nodes.push((name, Plane::replica(config).await?));
    }
    // The peer set: who may connect, at which address. Each pair's smaller id dials.
    let mut peers = trust;
    for (_, (plane, _)) in &nodes {
        peers.peers.insert(plane.id(), plane.local_addr()?);
    }
    for (name, (plane, _)) in &nodes {
        plane.update_trust(peers.clone())?;
        plane.wait_connected(2, Duration::from_secs(5)).await;
        plane.broadcast(Class::Consensus, &format!("hello from {name}").into());
    }
    for (name, (plane, inbox)) in &mut nodes {
        for _ in 0..2 {
            let wait = tokio::time::timeout(Duration::from_secs(5), inbox.recv());
            let m = wait.await?.ok_or("plane closed")?;
            let text = String::from_utf8_lossy(&m.payload);
            println!("{name} <- {}: {text}", m.from);
        }
        plane.shutdown().await;
    }
    Ok(())
}
