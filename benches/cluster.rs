//! The whole secure service against an unsecured, unreplicated baseline, in the same run.
//!
//! `cargo bench --bench cluster [-- --seconds N] [--clients C]`
//!
//! Every cell runs the same closed-loop load (C clients, default 16, each with one request
//! outstanding; three puts of a 64-byte value to one get, over 64 keys per client) for N
//! seconds (default 5) and reports operations per second and latency p50/p99:
//! - `baseline`: the same [`KvStore`] in one process behind raw quinn: server-authenticated
//!   TLS only (QUIC has no plaintext mode), no client certificates, no replication, no
//!   signatures, no journal. What a plain networked key-value server costs on this machine.
//! - `secure`: four `securesmart node run` processes (release build) on loopback, as the demo
//!   runs them: mutual TLS, signed PBFT messages, fsynced journals, the MLS group key, clients
//!   accepting f+1 matching replies.
//! - `secure+confidential`: the same, with every request sealed with the group key.
//!
//! The ratio column is each cell against the baseline. On a 2-core machine the four node
//! processes and the clients share the cores, so the secure cells measure CPU cost more than
//! the protocol's latency.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use securesmart::client::Client;
use securesmart::cluster::{LocalCluster, LocalClusterOptions};
use securesmart::config::{ClientConfig, ConsensusSection};
use securesmart::consensus::message::Request;
use securesmart::consensus::service::StateMachine;
use securesmart::kv::{KvOp, KvStore};
use securesmart::transport::pki::{CertRequest, DevCa};
use securesmart::transport::{NodeId, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

const EXE: &str = env!("CARGO_BIN_EXE_securesmart");
const WARMUP: Duration = Duration::from_secs(1);
const ALPN: &[u8] = b"bench-kv";

/// What one cell measured.
struct Cell {
    name: &'static str,
    ops_per_sec: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

/// The operation number `i` of client `j`: three puts to one get.
fn op(j: usize, i: u64) -> KvOp {
    let key = Bytes::from(format!("client{j}/key{}", i % 64));
    if i.is_multiple_of(4) {
        KvOp::Get { key }
    } else {
        KvOp::Put {
            key,
            value: Bytes::from(vec![b'v'; 64]),
        }
    }
}

/// Latencies recorded after the warm-up, and errors.
#[derive(Default)]
struct Samples {
    latencies: Vec<Duration>,
    errors: u64,
}

/// Runs `clients` closed loops of `one` (client index, op number -> success) for the
/// warm-up plus `secs`, printing progress every second.
async fn measure<F, Fut>(name: &'static str, clients: usize, secs: u64, one: F) -> Cell
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(Mutex::new(Samples::default()));
    let mut tasks = Vec::new();
    for j in 0..clients {
        let (stop, counting, done, samples, one) = (
            Arc::clone(&stop),
            Arc::clone(&counting),
            Arc::clone(&done),
            Arc::clone(&samples),
            one.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut mine = Samples::default();
            let mut i = 0;
            while !stop.load(Relaxed) {
                i += 1;
                let t = Instant::now();
                let ok = one(j, i).await;
                if counting.load(Relaxed) {
                    if ok {
                        mine.latencies.push(t.elapsed());
                        done.fetch_add(1, Relaxed);
                    } else {
                        mine.errors += 1;
                    }
                }
            }
            let mut s = samples.lock().await;
            s.latencies.extend(mine.latencies);
            s.errors += mine.errors;
        }));
    }
    tokio::time::sleep(WARMUP).await;
    counting.store(true, Relaxed);
    let start = Instant::now();
    for second in 1..=secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        eprint!(
            "\r  {name}: {second}/{secs} s, {:.0} ops/s   ",
            done.load(Relaxed) as f64 / start.elapsed().as_secs_f64()
        );
    }
    counting.store(false, Relaxed);
    let elapsed = start.elapsed();
    stop.store(true, Relaxed);
    eprintln!();
    for t in tasks {
        let _ = t.await;
    }
    let mut s = std::mem::take(&mut *samples.lock().await);
    s.latencies.sort_unstable();
    let at = |q: f64| {
        let n = s.latencies.len();
        if n == 0 {
            return Duration::ZERO;
        }
        s.latencies[((n as f64 * q) as usize).min(n - 1)]
    };
    Cell {
        name,
        ops_per_sec: s.latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        errors: s.errors,
    }
}

/// The baseline server: one `KvStore` behind raw quinn; each client connection is one
/// bidirectional stream of length-prefixed operations and replies.
async fn baseline(clients: usize, secs: u64) -> Cell {
    let ca = DevCa::new("bench ca").unwrap();
    let server = ca
        .issue(&CertRequest::new("server", Role::Replica))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(server.chain().to_vec(), server.private_key())
        .unwrap();
    sc.alpn_protocols = vec![ALPN.to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.certificate()).unwrap();
    let mut cc = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cc.alpn_protocols = vec![ALPN.to_vec()];
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(sc)).unwrap(),
    ));
    let endpoint = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let store = Arc::new(std::sync::Mutex::new(KvStore::default()));
    let accept = tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let mut number = 0;
                loop {
                    let Ok(len) = recv.read_u32().await else {
                        return;
                    };
                    let mut buf = vec![0; len as usize];
                    if recv.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    number += 1;
                    let reply = store.lock().unwrap().execute(&Request {
                        client: NodeId::from_bytes([0; 32]),
                        number,
                        payload: Bytes::from(buf),
                    });
                    if send.write_u32(reply.len() as u32).await.is_err()
                        || send.write_all(&reply).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let mut streams = Vec::new();
    for _ in 0..clients {
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(cc.clone())).unwrap(),
        )));
        let conn = client.connect(addr, "server").unwrap().await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        streams.push(Arc::new(Mutex::new((client, conn, send, recv))));
    }
    let cell = measure("baseline", clients, secs, move |j, i| {
        let stream = Arc::clone(&streams[j]);
        async move {
            let mut s = stream.lock().await;
            let (_, _, send, recv) = &mut *s;
            let request = op(j, i).encode();
            if send.write_u32(request.len() as u32).await.is_err()
                || send.write_all(&request).await.is_err()
            {
                return false;
            }
            let Ok(len) = recv.read_u32().await else {
                return false;
            };
            let mut buf = vec![0; len as usize];
            recv.read_exact(&mut buf).await.is_ok()
        }
    })
    .await;
    accept.abort();
    cell
}

/// Four replica processes and `clients` clients, with or without confidential requests.
async fn secure(
    name: &'static str,
    cluster: &LocalCluster,
    clients: usize,
    secs: u64,
    confidential: bool,
) -> Cell {
    let mut connected = Vec::new();
    for j in 0..clients {
        let config = ClientConfig::load(&cluster.clients[j]).unwrap();
        let mut c = Client::from_config(&config).await.unwrap();
        c.set_confidential(confidential);
        connected.push(Arc::new(Mutex::new(c)));
    }
    measure(name, clients, secs, move |j, i| {
        let client = Arc::clone(&connected[j]);
        async move {
            let op = op(j, i);
            client
                .lock()
                .await
                .invoke(Bytes::from(op.encode()))
                .await
                .is_ok()
        }
    })
    .await
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = arg(&args, "--seconds", 5).max(1);
    let clients = arg(&args, "--clients", 16).max(1) as usize;
    eprintln!("cluster benchmark: {clients} closed-loop clients, {secs} s per cell");

    let base = baseline(clients, secs).await;

    let dir = std::env::temp_dir().join(format!("securesmart-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = LocalClusterOptions {
        replicas: 4,
        clients,
        consensus: ConsensusSection::default(),
        client_timeout_ms: 20_000,
        log: "warn".into(),
        rekey_seconds: 600,
    };
    eprintln!("  starting four replica processes in {}", dir.display());
    let mut cluster = LocalCluster::create(&dir, Path::new(EXE), &options)
        .await
        .unwrap();
    for i in 0..4 {
        cluster.start(i, "warn").unwrap();
    }
    // Every replica holds the group key before the confidential cell.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let epochs: Vec<u64> = (0..4)
            .map(|i| cluster.metric(i, "securesmart_node_group_epoch") as u64)
            .collect();
        if epochs[0] > 0 && epochs.iter().all(|e| *e == epochs[0]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group key did not form: {epochs:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let plain = secure("secure", &cluster, clients, secs, false).await;
    let sealed = secure("secure+confidential", &cluster, clients, secs, true).await;
    drop(cluster);

    println!();
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>8} {:>7}",
        "cell", "ops/s", "p50", "p99", "ratio", "errors"
    );
    for c in [&base, &plain, &sealed] {
        println!(
            "{:<22} {:>10.0} {:>8.2}ms {:>8.2}ms {:>8.3} {:>7}",
            c.name,
            c.ops_per_sec,
            c.p50.as_secs_f64() * 1e3,
            c.p99.as_secs_f64() * 1e3,
            c.ops_per_sec / base.ops_per_sec.max(f64::MIN_POSITIVE),
            c.errors
        );
    }
}
