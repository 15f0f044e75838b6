//! Network enrollment over QUIC on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use securesmart_membership::enrollment::{ALPN_ENROLL, EnrollLimits};
use securesmart_membership::{EnrollError, EnrollmentServer, RoleName, TrustCenter, enroll};
use securesmart_transport::Role;

fn temp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ss-enroll-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_enrolls_over_the_network_once_per_token() {
    let dir = temp("ok");
    let mut ca = TrustCenter::init(&dir, "net CA").unwrap();
    let ca_cert = ca.ca_certificate();
    let token = ca
        .create_token(
            RoleName::Replica,
            &["replica7".into()],
            Duration::from_secs(60),
        )
        .unwrap();
    let server = EnrollmentServer::start(
        ca,
        "127.0.0.1:0".parse().unwrap(),
        &[],
        EnrollLimits::default(),
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();

    // Garbage first: the server answers with a refusal or drops it, and goes on.
    garbage(addr, &ca_cert).await;

    let enrolled = enroll(addr, &ca_cert, &token, &[]).await.unwrap();
    assert_eq!(enrolled.identity.role(), Role::Replica);
    assert_eq!(enrolled.ca_certificate, ca_cert);
    let again = enroll(addr, &ca_cert, &token, &[]).await;
    assert!(
        matches!(&again, Err(EnrollError::Refused(r)) if r.contains("already used")),
        "{again:?}"
    );
    // A node given another CA certificate refuses the endpoint.
    let other = TrustCenter::init(&temp("other"), "other")
        .unwrap()
        .ca_certificate();
    assert!(matches!(
        enroll(addr, &other, &token, &[]).await,
        Err(EnrollError::Connection(_))
    ));
    // The index on disk has the one certificate.
    let reopened = TrustCenter::open(&dir).unwrap();
    assert_eq!(reopened.certificates().len(), 1);
    assert_eq!(
        reopened.certificates()[0].names,
        vec!["replica7".to_string()]
    );
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(temp("other"));
}

/// Sends a malformed request on a real connection.
async fn garbage(addr: std::net::SocketAddr, ca_cert: &rustls::pki_types::CertificateDer<'static>) {
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_ENROLL.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = ep.connect(addr, "127.0.0.1").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[1, 0xff, 0xff, 0xff, 0xff, 0])
        .await
        .unwrap();
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 16)).await;
    conn.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_rate_limits_each_source_ip() {
    let dir = temp("rate");
    let mut ca = TrustCenter::init(&dir, "rate CA").unwrap();
    let ca_cert = ca.ca_certificate();
    let tokens: Vec<_> = (0..3)
        .map(|i| {
            ca.create_token(
                RoleName::Client,
                &[format!("c{i}")],
                Duration::from_secs(60),
            )
            .unwrap()
        })
        .collect();
    let mut limits = EnrollLimits::default();
    limits.requests_per_ip_per_sec = 1;
    limits.request_burst_per_ip = 1;
    let server = EnrollmentServer::start(ca, "127.0.0.1:0".parse().unwrap(), &[], limits)
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    assert!(
        enroll(addr, &ca_cert, &tokens[0], &[]).await.is_ok(),
        "within the budget"
    );
    let second = enroll(addr, &ca_cert, &tokens[1], &[]).await;
    assert!(
        matches!(second, Err(EnrollError::Connection(_))),
        "over the budget: {second:?}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        enroll(addr, &ca_cert, &tokens[2], &[]).await.is_ok(),
        "the budget refills"
    );
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
