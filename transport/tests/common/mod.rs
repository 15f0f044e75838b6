//! Helpers for the loopback integration tests: a dev CA and a mesh of replica planes.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::time::Duration;

use securesmart_transport::pki::DevCa;
use securesmart_transport::{
    Identity, Inbox, Limits, Message, Plane, PlaneConfig, Role, TrustConfig,
};

pub const LOCAL: &str = "127.0.0.1:0";
pub const WAIT: Duration = Duration::from_secs(10);

pub fn local() -> SocketAddr {
    LOCAL.parse().unwrap()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub struct Member {
    pub identity: Identity,
    pub plane: Plane,
    pub inbox: Inbox,
    pub addr: SocketAddr,
}

/// Starts `n` replica planes on 127.0.0.1 trusting `ca`, each knowing all the others.
pub async fn mesh(ca: &DevCa, n: usize, limits: Limits) -> Vec<Member> {
    init_tracing();
    let mut members = Vec::new();
    for i in 0..n {
        let identity = ca
            .issue_role(&format!("replica{i}"), Role::Replica)
            .unwrap();
        let cfg = PlaneConfig::new(
            identity.clone(),
            local(),
            TrustConfig::new(ca.certificate()),
        )
        .with_limits(limits.clone());
        let (plane, inbox) = Plane::replica(cfg).await.unwrap();
        let addr = plane.local_addr().unwrap();
        members.push(Member {
            identity,
            plane,
            inbox,
            addr,
        });
    }
    let trust = peer_trust(ca, &members);
    for m in &members {
        m.plane.update_trust(trust.clone()).unwrap();
    }
    members
}

pub fn peer_trust(ca: &DevCa, members: &[Member]) -> TrustConfig {
    let mut trust = TrustConfig::new(ca.certificate());
    for m in members {
        trust.peers.insert(m.identity.id(), m.addr);
    }
    trust
}

/// Receives `n` messages or fails after `WAIT`.
pub async fn recv_n(inbox: &mut Inbox, n: usize) -> Vec<Message> {
    let mut out = Vec::with_capacity(n);
    tokio::time::timeout(WAIT, async {
        while out.len() < n {
            match inbox.recv().await {
                Some(m) => out.push(m),
                None => break,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out with {} of {n} messages", out.len()));
    out
}

/// Polls `cond` every 10 ms until it holds or `WAIT` passes.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A raw quinn dialer that presents `identity` with `alpn` and accepts any server: the attacker's
/// side of refusal tests (it can speak the wrong ALPN or role and send malformed frames).
pub async fn raw_dial(
    identity: &Identity,
    addr: SocketAddr,
    alpn: &[u8],
) -> Result<quinn::Connection, String> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_client_auth_cert(identity.chain().to_vec(), raw_key(identity))
        .unwrap();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(3).try_into().unwrap()));
    client.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(local()).unwrap();
    endpoint.set_default_client_config(client);
    let conn = endpoint
        .connect(addr, "securesmart")
        .map_err(|e| e.to_string())?;
    conn.await.map_err(|e| e.to_string())
}

/// Whether a raw connection is still usable after the handshake: in TLS 1.3 a refused client
/// certificate shows only on the first stream operation.
pub async fn raw_link_survives(conn: &quinn::Connection) -> bool {
    let attempt = async {
        let mut s = conn.open_uni().await.map_err(|_| ())?;
        s.write_all(&[0]).await.map_err(|_| ())?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        if conn.close_reason().is_some() {
            Err(())
        } else {
            Ok(())
        }
    };
    matches!(tokio::time::timeout(WAIT, attempt).await, Ok(Ok(())))
}

fn raw_key(identity: &Identity) -> rustls::pki_types::PrivateKeyDer<'static> {
    identity.private_key()
}

#[derive(Debug)]
struct AcceptAnyServer;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
