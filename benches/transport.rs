//! Transport throughput between two nodes on 127.0.0.1: our replica plane against raw quinn with
//! the same TLS 1.3 settings (mutual auth, Ed25519 certificates, ring, same flow-control windows
//! and socket buffers, same framing) and against tokio-rustls over TCP, measured in the same run.
//!
//! `cargo bench --bench transport [-- --seconds N] [--size BYTES]`. One-way traffic, one sender, one receiver;
//! each cell is measured for N seconds (default 3) after a warm-up of half a second.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rustls::RootCertStore;
use securesmart_transport::pki::{CertRequest, DevCa};
use securesmart_transport::{Class, FrameDecoder, Limits, Plane, PlaneConfig, Role, TrustConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZES: [usize; 3] = [64, 1024, 64 * 1024];
const WARMUP: Duration = Duration::from_millis(500);
const BATCH_BYTES: usize = 256 * 1024;
const ALPN: &[u8] = b"bench";

/// Counts delivered messages; the sender runs until `stop`.
#[derive(Clone, Default)]
struct Meter {
    messages: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Meter {
    /// Messages per second over `secs` after the warm-up.
    async fn measure(&self, secs: f64) -> f64 {
        tokio::time::sleep(WARMUP).await;
        let (n0, t0) = (self.messages.load(Relaxed), Instant::now());
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let rate = (self.messages.load(Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();
        self.stop.store(true, Relaxed);
        rate
    }
}

/// Production limits with the per-peer budgets raised so they are checked but never bind: the
/// bench measures what the layer costs, not the budget.
fn bench_limits() -> Limits {
    let mut l = Limits::production();
    l.peer_messages_per_sec = u32::MAX / 2;
    l.peer_message_burst = u32::MAX / 2;
    l.peer_bytes_per_sec = u32::MAX;
    l.peer_byte_burst = u32::MAX;
    l
}

/// The baselines frame each message into a write buffer of up to `BATCH_BYTES`, as a careful
/// user of raw quinn or TLS would.
fn frame_batch(buf: &mut BytesMut, payload: &Bytes) -> Bytes {
    while buf.len() < BATCH_BYTES {
        let msg = payload.clone();
        buf.put_u32(msg.len() as u32);
        buf.put_slice(&msg);
    }
    buf.split().freeze()
}

async fn ours(ca: &DevCa, size: usize, secs: f64) -> f64 {
    let a = ca.issue_role("a", Role::Replica).unwrap();
    let b = ca.issue_role("b", Role::Replica).unwrap();
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let trust = TrustConfig::new(ca.certificate());
    let (pa, _ia) = Plane::replica(
        PlaneConfig::new(a.clone(), local, trust.clone()).with_limits(bench_limits()),
    )
    .await
    .unwrap();
    let (pb, mut ib) = Plane::replica(
        PlaneConfig::new(b.clone(), local, trust.clone()).with_limits(bench_limits()),
    )
    .await
    .unwrap();
    let with_both = trust
        .with_peer(a.id(), pa.local_addr().unwrap())
        .with_peer(b.id(), pb.local_addr().unwrap());
    pa.update_trust(with_both.clone()).unwrap();
    pb.update_trust(with_both).unwrap();
    assert!(pa.wait_connected(1, Duration::from_secs(10)).await);
    let meter = Meter::default();
    let m = meter.clone();
    let rx = tokio::spawn(async move {
        let mut buf = Vec::with_capacity(1024);
        loop {
            let n = ib.recv_many(&mut buf, 1024).await;
            if n == 0 {
                break;
            }
            m.messages.fetch_add(n as u64, Relaxed);
            buf.clear();
        }
    });
    let class = if size >= 16 * 1024 {
        Class::Bulk
    } else {
        Class::Consensus
    };
    let (m, msg, to) = (meter.clone(), Bytes::from(vec![7u8; size]), b.id());
    let plane = pa.clone();
    let tx = tokio::spawn(async move {
        while !m.stop.load(Relaxed) {
            if plane.send(to, class, msg.clone()).await.is_err() {
                break;
            }
        }
    });
    let rate = meter.measure(secs).await;
    tx.abort();
    pa.shutdown().await;
    pb.shutdown().await;
    rx.abort();
    rate
}

fn bound_socket(limits: &Limits) -> std::net::UdpSocket {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .unwrap();
    let _ = s.set_recv_buffer_size(limits.socket_buffer_bytes);
    let _ = s.set_send_buffer_size(limits.socket_buffer_bytes);
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.into()
}

/// Standard rustls mutual-TLS configurations (webpki verifiers, TLS 1.3, ring) for a fresh
/// server identity named "server" and a client identity.
fn tls_configs(ca: &DevCa) -> (rustls::ServerConfig, rustls::ClientConfig) {
    let server = ca
        .issue(&CertRequest::new("server", Role::Replica))
        .unwrap();
    let client = ca
        .issue(&CertRequest::new("client", Role::Replica))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca.certificate()).unwrap();
    let roots = Arc::new(roots);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::clone(&roots),
        Arc::clone(&provider),
    )
    .build()
    .unwrap();
    let mut sc = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(server.chain().to_vec(), server.private_key())
        .unwrap();
    sc.alpn_protocols = vec![ALPN.to_vec()];
    let mut cc = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(client.chain().to_vec(), client.private_key())
        .unwrap();
    cc.alpn_protocols = vec![ALPN.to_vec()];
    (sc, cc)
}

async fn raw_quinn(ca: &DevCa, size: usize, secs: f64, per_message: bool) -> f64 {
    let limits = Limits::production();
    let (sc, cc) = tls_configs(ca);
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u32(limits.stream_window_bytes))
        .receive_window(quinn::VarInt::from_u32(limits.connection_window_bytes))
        .send_window(u64::from(limits.connection_window_bytes));
    let transport = Arc::new(transport);
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(sc)).unwrap(),
    ));
    server_config.transport_config(Arc::clone(&transport));
    let runtime = Arc::new(quinn::TokioRuntime);
    let server = quinn::Endpoint::new(
        Default::default(),
        Some(server_config),
        bound_socket(&limits),
        runtime.clone(),
    )
    .unwrap();
    let mut client_config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(cc)).unwrap(),
    ));
    client_config.transport_config(transport);
    let client =
        quinn::Endpoint::new(Default::default(), None, bound_socket(&limits), runtime).unwrap();
    let addr = server.local_addr().unwrap();
    let meter = Meter::default();
    let m = meter.clone();
    let rx = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let mut recv = conn.accept_uni().await.unwrap();
        let mut decoder = FrameDecoder::new(limits.max_frame_bytes);
        while let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await {
            decoder.push(&chunk.bytes);
            let mut n = 0;
            while let Ok(Some(_)) = decoder.next_frame() {
                n += 1;
            }
            m.messages.fetch_add(n, Relaxed);
        }
    });
    let conn = client
        .connect_with(client_config, addr, "server")
        .unwrap()
        .await
        .unwrap();
    let m = meter.clone();
    let tx = tokio::spawn(async move {
        let mut send = conn.open_uni().await.unwrap();
        let payload = Bytes::from(vec![7u8; size]);
        let mut buf = BytesMut::new();
        while !m.stop.load(Relaxed) {
            let chunk = if per_message {
                // One frame per write, as a direct quinn user sending messages would.
                buf.put_u32(payload.len() as u32);
                buf.put_slice(&payload);
                buf.split().freeze()
            } else {
                frame_batch(&mut buf, &payload)
            };
            if send.write_chunk(chunk).await.is_err() {
                break;
            }
        }
        conn.close(0u32.into(), b"");
    });
    let rate = meter.measure(secs).await;
    let _ = tx.await;
    rx.abort();
    rate
}

async fn tls_tcp(ca: &DevCa, size: usize, secs: f64) -> f64 {
    let (sc, cc) = tls_configs(ca);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cc));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let meter = Meter::default();
    let m = meter.clone();
    let rx = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut decoder = FrameDecoder::new(16 * 1024 * 1024);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            decoder.push(&buf[..n]);
            let mut frames = 0;
            while let Ok(Some(_)) = decoder.next_frame() {
                frames += 1;
            }
            m.messages.fetch_add(frames, Relaxed);
        }
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::try_from("server").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let m = meter.clone();
    let tx = tokio::spawn(async move {
        let payload = Bytes::from(vec![7u8; size]);
        let mut buf = BytesMut::new();
        while !m.stop.load(Relaxed) {
            if tls
                .write_all(&frame_batch(&mut buf, &payload))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = tls.shutdown().await;
    });
    let rate = meter.measure(secs).await;
    let _ = tx.await;
    rx.abort();
    rate
}

fn main() {
    let mut secs = 3.0;
    let mut sizes = SIZES.to_vec();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => secs = args.next().and_then(|s| s.parse().ok()).unwrap_or(secs),
            "--size" => {
                sizes = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .into_iter()
                    .collect()
            }
            _ => {}
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ca = DevCa::new("bench CA").unwrap();
        println!("transport bench: 2 nodes on 127.0.0.1, one-way, {secs} s per cell (+{WARMUP:?} warm-up)");
        println!("baselines: raw quinn writing pre-framed {} KiB batches (a byte-pipe ceiling), raw quinn", BATCH_BYTES / 1024);
        println!("writing one frame per message, tokio-rustls on TCP with batches; same TLS 1.3 mTLS settings");
        println!(
            "{:>6} | {:>21} | {:>21} | {:>21} | {:>21} | {:>9} | {:>9}",
            "size", "ours msg/s (MB/s)", "raw batched", "raw per-message", "TLS/TCP batched", "ours/raw", "ours/raw1"
        );
        // SECURESMART_BENCH_ONLY=ours runs only our layer (for profiling).
        let only_ours = std::env::var("SECURESMART_BENCH_ONLY").is_ok_and(|v| v == "ours");
        for size in sizes.iter().copied() {
            let ours = ours(&ca, size, secs).await;
            if only_ours {
                println!("{size:>8} | {ours:>10.0} msg/s");
                continue;
            }
            let raw = raw_quinn(&ca, size, secs, false).await;
            let raw_each = raw_quinn(&ca, size, secs, true).await;
            let tcp = tls_tcp(&ca, size, secs).await;
            let cell = |r: f64| format!("{:>10.0} ({:>7.1})", r, r * size as f64 / 1e6);
            println!(
                "{:>6} | {} | {} | {} | {} | {:>9.2} | {:>9.2}",
                size,
                cell(ours),
                cell(raw),
                cell(raw_each),
                cell(tcp),
                ours / raw,
                ours / raw_each
            );
        }
    });
}
