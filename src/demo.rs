//! `securesmart demo`: a local secure cluster on loopback under load.
//!
//! Until the ordering layer lands, the demo exercises the secure transport the cluster runs on:
//! a development CA issues identities, `replicas` replica planes form a mutually authenticated
//! QUIC mesh and exchange consensus-class traffic, a client sends requests over the client plane
//! and accepts a result when f+1 replicas return matching replies, an intruder with a foreign
//! certificate is refused, and one replica is revoked by a CRL update mid-run. It ends with a
//! summary and fails (non-zero exit) if any check does not hold.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use securesmart_transport::pki::DevCa;
use securesmart_transport::{
    Class, Identity, Inbox, Limits, Plane, PlaneConfig, Refusal, Role, TrustConfig,
};

/// Options of the demo.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Replicas in the mesh (n = 3f + 1; at least 4).
    #[arg(long, default_value_t = 4)]
    pub replicas: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 6)]
    pub seconds: u64,
    /// Payload size of replica messages and client requests, in bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
}

/// What went wrong in a demo run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// Setting up a plane or certificate failed.
    #[error("setup: {0}")]
    Setup(String),
    /// A check of the run did not hold.
    #[error("check failed: {0}")]
    Check(String),
}

fn setup<E: std::fmt::Display>(e: E) -> DemoError {
    DemoError::Setup(e.to_string())
}

struct Replica {
    identity: Identity,
    plane: Plane,
    clients: Plane,
}

/// Runs the demo.
///
/// # Errors
/// [`DemoError`] when set-up fails or a check does not hold.
pub async fn run(args: DemoArgs) -> Result<(), DemoError> {
    if args.replicas < 4 {
        return Err(DemoError::Setup(
            "need at least 4 replicas (n = 3f + 1)".into(),
        ));
    }
    let f = (args.replicas - 1) / 3;
    let local = "127.0.0.1:0".parse().map_err(setup)?;
    let mut ca = DevCa::new("securesmart demo CA").map_err(setup)?;
    println!(
        "SecureSMART-rs demo: {} replicas (f = {f}) on 127.0.0.1, TLS 1.3 mutual auth over QUIC",
        args.replicas
    );

    // Replicas: a replica plane and a client plane each.
    let mut replicas = Vec::new();
    let mut inboxes = Vec::new();
    for i in 0..args.replicas {
        let identity = ca
            .issue_role(&format!("replica{i}"), Role::Replica)
            .map_err(setup)?;
        let trust = TrustConfig::new(ca.certificate());
        let cfg = PlaneConfig::new(identity.clone(), local, trust).with_limits(Limits::local());
        let (plane, inbox) = Plane::replica(cfg.clone()).await.map_err(setup)?;
        let (clients, client_inbox) = Plane::client_listener(cfg).await.map_err(setup)?;
        replicas.push(Replica {
            identity,
            plane,
            clients,
        });
        inboxes.push((inbox, client_inbox));
    }
    let mut trust = TrustConfig::new(ca.certificate());
    let mut client_addrs = TrustConfig::new(ca.certificate());
    for r in &replicas {
        trust
            .peers
            .insert(r.identity.id(), r.plane.local_addr().map_err(setup)?);
        client_addrs
            .peers
            .insert(r.identity.id(), r.clients.local_addr().map_err(setup)?);
    }
    for r in &replicas {
        r.plane.update_trust(trust.clone()).map_err(setup)?;
    }
    let started = Instant::now();
    for r in &replicas {
        if !r
            .plane
            .wait_connected(args.replicas - 1, Duration::from_secs(10))
            .await
        {
            return Err(DemoError::Check("the replica mesh did not form".into()));
        }
    }
    println!(
        "mesh formed: {} authenticated connections in {:?}",
        args.replicas * (args.replicas - 1) / 2,
        started.elapsed()
    );

    // Each replica echoes client requests and counts replica traffic.
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (r, (inbox, client_inbox)) in replicas.iter().zip(inboxes) {
        tasks.push(tokio::spawn(count_inbox(inbox, Arc::clone(&received))));
        tasks.push(tokio::spawn(echo(r.clients.clone(), client_inbox)));
    }

    // A client on the client plane.
    let client_id = ca.issue_role("client0", Role::Client).map_err(setup)?;
    let (client, client_inbox) = Plane::client(
        PlaneConfig::new(client_id, local, client_addrs).with_limits(Limits::local()),
    )
    .await
    .map_err(setup)?;
    if !client
        .wait_connected(args.replicas, Duration::from_secs(10))
        .await
    {
        return Err(DemoError::Check(
            "the client could not reach every replica".into(),
        ));
    }

    // Load: every replica streams consensus-class messages to every other.
    let payload = Bytes::from(vec![0x5a; args.payload]);
    for r in &replicas {
        let plane = r.plane.clone();
        let (stop, payload) = (Arc::clone(&stop), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut peers = plane.connected_peers();
            let mut round: u64 = 0;
            while !stop.load(Relaxed) {
                round += 1;
                if round.is_multiple_of(256) {
                    // Follow the live peer set (a revoked peer drops out).
                    peers = plane.connected_peers();
                }
                if peers.is_empty() {
                    // Cut off (or not yet connected): wait instead of spinning.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    peers = plane.connected_peers();
                }
                for p in &peers {
                    let send = plane.send(*p, Class::Consensus, payload.clone());
                    let _ = tokio::time::timeout(Duration::from_millis(100), send).await;
                }
            }
        }));
    }
    let latencies = tokio::spawn(client_load(
        client.clone(),
        client_inbox,
        f + 1,
        args.payload,
        Arc::clone(&stop),
    ));

    // Mid-run security events: an intruder from another CA, then a revocation.
    let duration = Duration::from_secs(args.seconds.max(2));
    let load_start = Instant::now();
    let revoke_at = duration / 2;
    let mut revoked = None;
    let mut intruder = None;
    let progress = Progress::new(args.seconds.max(2));
    let mut last = 0;
    while load_start.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let elapsed = load_start.elapsed();
        if intruder.is_none() && elapsed >= duration / 4 {
            intruder = Some(start_intruder(&replicas, ca.certificate(), local).await?);
        }
        if revoked.is_none() && elapsed >= revoke_at {
            let victim = replicas
                .last()
                .ok_or_else(|| DemoError::Check("no replicas".into()))?;
            let leaf = victim
                .identity
                .chain()
                .first()
                .cloned()
                .ok_or_else(|| setup("empty chain"))?;
            let mut t = trust.clone();
            t.crls = vec![ca.crl(&[&leaf]).map_err(setup)?];
            let mut closed = 0;
            for r in &replicas {
                closed += r.plane.update_trust(t.clone()).map_err(setup)?;
            }
            progress.note(&format!(
                "revoked {} by CRL update: {closed} live connections closed",
                victim.identity.id()
            ));
            revoked = Some(victim.identity.id());
        }
        let total = received.load(Relaxed);
        progress.tick(elapsed, total - last);
        last = total;
    }
    stop.store(true, Relaxed);
    progress.finish();
    let load_secs = load_start.elapsed().as_secs_f64();
    let mut lat = latencies.await.map_err(setup)?;

    // Checks and summary.
    let revoked = revoked.ok_or_else(|| DemoError::Check("revocation did not run".into()))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut refusals: HashMap<Refusal, u64> = HashMap::new();
    let mut drops = 0;
    for r in &replicas {
        let s = r.plane.stats();
        for reason in Refusal::ALL {
            *refusals.entry(reason).or_default() += s.refused(reason);
        }
        drops += securesmart_transport::DropReason::ALL
            .iter()
            .map(|d| s.dropped(*d))
            .sum::<u64>();
    }
    for r in replicas.iter().filter(|r| r.identity.id() != revoked) {
        if r.plane.connected_peers().contains(&revoked) {
            return Err(DemoError::Check(
                "a replica still talks to the revoked one".into(),
            ));
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| -> Duration {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let total = received.load(Relaxed);
    println!("\n== summary ==");
    println!(
        "replica traffic : {total} messages of {} B, {:.0} msg/s, {:.1} MB/s",
        args.payload,
        total as f64 / load_secs,
        (total as usize * args.payload) as f64 / load_secs / 1e6
    );
    println!(
        "client requests : {} accepted with f+1 = {} matching replies, {:.0} ops/s",
        lat.len(),
        f + 1,
        lat.len() as f64 / load_secs
    );
    println!("client latency  : p50 {:?}, p99 {:?}", pct(0.5), pct(0.99));
    let mut shown: Vec<(Refusal, u64)> = refusals.into_iter().filter(|(_, n)| *n > 0).collect();
    shown.sort_by_key(|(r, _)| r.as_str());
    println!(
        "refusals        : {}",
        shown
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("drops           : {drops}");
    let unknown_ca = shown.iter().any(|(r, _)| *r == Refusal::UnknownCa);
    let revoked_refused = shown.iter().any(|(r, _)| *r == Refusal::Revoked);
    if lat.is_empty() || total == 0 {
        return Err(DemoError::Check("no traffic went through".into()));
    }
    if !unknown_ca || !revoked_refused {
        return Err(DemoError::Check(
            "the intruder or the revoked replica was not refused".into(),
        ));
    }
    drop(intruder);
    client.shutdown().await;
    for r in &replicas {
        r.clients.shutdown().await;
        r.plane.shutdown().await;
    }
    for t in tasks {
        t.abort();
    }
    println!(
        "ok: intruder refused, revoked replica cut off, honest replicas kept agreeing traffic"
    );
    Ok(())
}

async fn count_inbox(mut inbox: Inbox, received: Arc<AtomicU64>) {
    while inbox.recv().await.is_some() {
        received.fetch_add(1, Relaxed);
    }
}

async fn echo(plane: Plane, mut inbox: Inbox) {
    while let Some(m) = inbox.recv().await {
        let _ = plane.try_send(m.from, Class::Consensus, m.payload);
    }
}

/// Closed-loop client: one request at a time to all replicas, accepted on f+1 matching replies.
async fn client_load(
    client: Plane,
    mut inbox: Inbox,
    quorum: usize,
    size: usize,
    stop: Arc<AtomicBool>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut seq: u64 = 0;
    while !stop.load(Relaxed) {
        seq += 1;
        let mut req = seq.to_be_bytes().to_vec();
        req.resize(size.max(8), 0);
        let req = Bytes::from(req);
        let t0 = Instant::now();
        client.broadcast(Class::Consensus, &req);
        let mut matching = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while matching < quorum {
            match tokio::time::timeout_at(deadline, inbox.recv()).await {
                Ok(Some(m)) if m.payload == req => matching += 1,
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        if matching >= quorum {
            latencies.push(t0.elapsed());
        }
    }
    latencies
}

/// A replica with a certificate from another CA that tries to join every replica.
async fn start_intruder(
    replicas: &[Replica],
    ca_cert: rustls::pki_types::CertificateDer<'static>,
    local: std::net::SocketAddr,
) -> Result<Plane, DemoError> {
    let rogue_ca = DevCa::new("rogue CA").map_err(setup)?;
    let rogue = rogue_ca
        .issue_role("intruder", Role::Replica)
        .map_err(setup)?;
    // It knows the cluster's CA certificate (public), but its own was issued by a rogue CA.
    let mut trust = TrustConfig::new(ca_cert);
    for r in replicas {
        trust
            .peers
            .insert(r.identity.id(), r.plane.local_addr().map_err(setup)?);
    }
    let rogue_id = rogue.id();
    let (plane, _inbox) =
        Plane::replica(PlaneConfig::new(rogue, local, trust).with_limits(Limits::local()))
            .await
            .map_err(setup)?;
    // The replicas are told the intruder's address (as if it had been proposed as a peer), so
    // whichever side dials, a replica checks the intruder's certificate and refuses it.
    let addr = plane.local_addr().map_err(setup)?;
    for r in replicas {
        let mut t = r.plane.trust();
        t.peers.insert(rogue_id, addr);
        r.plane.update_trust(t).map_err(setup)?;
    }
    Ok(plane)
}

struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(seconds: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(seconds * 1000);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {elapsed} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Self { bar }
    }

    fn tick(&self, elapsed: Duration, delta: u64) {
        let rate = delta as f64 * 4.0;
        match &self.bar {
            Some(bar) => {
                bar.set_position(elapsed.as_millis() as u64);
                bar.set_message(format!("{rate:.0} msg/s"));
            }
            None => {
                if elapsed.as_millis() % 1000 < 250 {
                    println!("  {:>4.1}s  {rate:>9.0} msg/s", elapsed.as_secs_f64());
                }
            }
        }
    }

    fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("  {line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
