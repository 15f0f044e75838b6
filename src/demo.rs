//! `securesmart demo`: a local secure cluster on loopback under load, with no set-up files.
//!
//! What it runs, in a fresh temporary directory: a trust center (CA) that enrolls four
//! replicas and the clients over the network with one-time tokens; four `securesmart node run`
//! processes (this executable), each with its journal on disk and a Prometheus endpoint;
//! closed-loop clients putting and getting keys through the client plane, each result accepted
//! once a quorum of the replicas agree. During the load it crashes the primary (SIGKILL) and restarts it
//! from its journal, lets a client with a certificate from a foreign CA try to connect, and
//! revokes one client's certificate (the replicas reload the CRL and cut it off). It ends with a
//! summary (ops/s, latency p50/p99, crashes, refusals read from the replicas' metrics) and reads
//! back every acknowledged write; any check that fails makes the exit code non-zero.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use securesmart_membership::MembershipCommand;
use securesmart_transport::pki::DevCa;
use securesmart_transport::{Limits, Role};
use tokio::sync::Mutex;

use crate::client::{Client, ClientError, ClientOptions};
use crate::cluster::{LocalCluster, LocalClusterOptions, metric_sum, scrape};
use crate::config::{ClientConfig, ConsensusSection, load_trust};

/// Options of the demo.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Concurrent clients (each with its own certificate).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Value size of the writes, in bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Keep the cluster directory (certificates, configurations, journals, logs) afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Log filter of the node processes (their logs are in the cluster directory's `logs/`),
    /// e.g. `warn,securesmart_consensus=debug`.
    #[arg(long, default_value = "warn")]
    pub node_log: String,
}

/// What went wrong in a demo run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// Setting up the cluster failed.
    #[error("setup: {0}")]
    Setup(String),
    /// A check of the run did not hold.
    #[error("check failed: {0}")]
    Check(String),
}

fn setup<E: std::fmt::Display>(e: E) -> DemoError {
    DemoError::Setup(e.to_string())
}

/// What the load produced.
#[derive(Default)]
struct Load {
    latencies: Vec<Duration>,
    /// The last acknowledged value of each key (keys are per client, so this is the truth).
    acked: BTreeMap<String, Bytes>,
    /// Keys whose last write has an unknown outcome (it timed out).
    uncertain: Vec<String>,
    errors: u64,
}

/// Runs the demo.
///
/// # Errors
/// [`DemoError`] when set-up fails or a check does not hold.
pub async fn run(args: DemoArgs) -> Result<(), DemoError> {
    let exe = std::env::current_exe().map_err(setup)?;
    let dir = std::env::temp_dir().join(format!("securesmart-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let clients = args.clients.max(2);
    let options = LocalClusterOptions {
        replicas: 4,
        clients: clients + 2,
        consensus: ConsensusSection {
            batch_delay_ms: 0,
            ..ConsensusSection::default()
        },
        client_timeout_ms: 3_000,
        log: args.node_log.clone(),
        rekey_seconds: (args.seconds / 4).max(1),
    };
    println!("SecureSMART-rs demo: 4 replicas (f = 1) on 127.0.0.1, {clients} clients");
    let t0 = Instant::now();
    let mut cluster = LocalCluster::create(&dir, &exe, &options)
        .await
        .map_err(setup)?;
    println!(
        "trust center: CA created, {} nodes enrolled over QUIC with one-time tokens ({:?})",
        4 + clients + 2,
        t0.elapsed()
    );
    for i in 0..4 {
        cluster.start(i, &options.log).map_err(setup)?;
    }
    let cluster = Arc::new(Mutex::new(cluster));
    let result = drive(&cluster, &args, clients).await;
    drop(cluster);
    if args.keep {
        println!("cluster directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn drive(
    cluster: &Arc<Mutex<LocalCluster>>,
    args: &DemoArgs,
    clients: usize,
) -> Result<(), DemoError> {
    let (client_files, dir, replicas) = {
        let c = cluster.lock().await;
        let replicas: Vec<_> = c.replicas.iter().map(|r| (r.id, r.metrics_addr)).collect();
        (c.clients.clone(), c.dir.clone(), replicas)
    };
    // client0 is the administrator (it orders joins and removals); the load clients follow;
    // the last one is revoked during the run.
    let admin_file = client_files.first().ok_or_else(|| setup("no client"))?;
    let admin = Client::from_config(&ClientConfig::load(admin_file).map_err(setup)?)
        .await
        .map_err(setup)?;
    // Every other load client marks its requests confidential: sealed by the client with the
    // key the replicas derive for it from the group key, opened only at execution.
    let mut handles = Vec::new();
    for (j, file) in client_files.iter().skip(1).take(clients).enumerate() {
        let config = ClientConfig::load(file).map_err(setup)?;
        let mut client = Client::from_config(&config).await.map_err(setup)?;
        client.set_confidential(j % 2 == 1);
        handles.push(client);
    }
    // The replicas form the group key (MLS) at start: confidential requests wait for it.
    let formed = Instant::now();
    loop {
        let (_, _, epochs, _, _) = read_metrics(&replicas, usize::MAX)?;
        // Every replica: one that starts without the key would lose its application state
        // over the first confidential request and count as a fault until it caught up.
        let newest = epochs.iter().map(|(_, e)| *e).max().unwrap_or(0);
        if newest > 0 && epochs.iter().all(|(_, e)| *e == newest) {
            println!(
                "group key: the replicas share MLS epoch {newest} ({:.1?})",
                formed.elapsed()
            );
            break;
        }
        if formed.elapsed() > Duration::from_secs(30) {
            return Err(DemoError::Check(format!(
                "the group key did not form: {epochs:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "4 replica processes up (journals in {}); clients connected over mutual TLS",
        dir.join("data").display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load = Arc::new(Mutex::new(Load::default()));
    let value = Bytes::from(vec![b'v'; args.payload.max(1)]);
    let mut tasks = Vec::new();
    for (j, client) in handles.into_iter().enumerate() {
        tasks.push(tokio::spawn(client_loop(
            j,
            client,
            value.clone(),
            Arc::clone(&stop),
            Arc::clone(&done),
            Arc::clone(&load),
        )));
    }

    // The scripted events, at fractions of the run, in their own task (the progress display
    // and the load do not wait for them).
    let duration = Duration::from_secs(args.seconds.max(3));
    let primary = (0..replicas.len())
        .min_by_key(|i| replicas.get(*i).map(|r| r.0))
        .unwrap_or(0);
    let progress = Arc::new(Progress::new(duration));
    let start = Instant::now();
    let events = tokio::spawn(script(
        Arc::clone(cluster),
        admin,
        Arc::clone(&progress),
        (start, duration),
        (primary, clients + 1),
        args.node_log.clone(),
    ));
    // The rate shown is over the last second (four samples), not the last 250 ms.
    let mut window: std::collections::VecDeque<(u64, Instant)> =
        std::collections::VecDeque::from([(0, Instant::now())]);
    while start.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let total = done.load(Relaxed);
        let (then, at) = window.front().copied().unwrap_or((0, start));
        let rate = (total - then) as f64 / at.elapsed().as_secs_f64().max(1e-3);
        progress.tick(start.elapsed(), rate);
        window.push_back((total, Instant::now()));
        if window.len() > 4 {
            window.pop_front();
        }
    }
    stop.store(true, Relaxed);
    let load_secs = start.elapsed().as_secs_f64();
    let (outcome, mut admin) = events.await.map_err(setup)??;
    progress.finish();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let mut load = std::mem::take(&mut *load.lock().await);

    // Read back every acknowledged write, through the order.
    let mut missing = Vec::new();
    for (key, want) in &load.acked {
        if load.uncertain.contains(key) {
            continue;
        }
        match admin.get(key.clone()).await {
            Ok(Some(v)) if v == *want => {}
            other => missing.push(format!("{key}: {other:?}")),
        }
    }
    admin.close().await;
    // The removed replica stops once the group without it has taken over.
    let mut removed_stopped = false;
    for _ in 0..100 {
        let mut c = cluster.lock().await;
        if !c.is_running(outcome.removed) {
            removed_stopped = true;
            break;
        }
        drop(c);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replicas: Vec<_> = {
        let c = cluster.lock().await;
        c.replicas.iter().map(|r| (r.id, r.metrics_addr)).collect()
    };

    // What the replicas' metrics say. A replica that missed group commits (it caught up by
    // state transfer) asks to be re-added and converges within a few seconds: wait for that.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (refusals, executed, group_epochs, rekeys, sealed) = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = read_metrics(&replicas, outcome.removed)?;
        if group_quorum(&seen.2) || Instant::now() > deadline {
            break seen;
        }
    };
    let rekeys = rekeys + outcome.removed_rekeys;

    load.latencies.sort_unstable();
    let pct = |p: f64| -> Duration {
        let lat = &load.latencies;
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let ops = load.latencies.len();
    println!("\n== summary ==");
    println!(
        "operations  : {ops} acknowledged (each on f+1 matching among a quorum of the current roster), {:.0} ops/s, {} failed or timed out",
        ops as f64 / load_secs,
        load.errors
    );
    println!("latency     : p50 {:?}, p99 {:?}", pct(0.5), pct(0.99));
    println!("crashes     : 1 (replica {primary}, the primary), restarted from its journal");
    println!(
        "membership  : 1 join (replica {} enrolled, added by the administrator, caught up by state \
         transfer), 1 removal (replica {}, {}); executed per replica {executed:?}",
        outcome.joined,
        outcome.removed,
        if removed_stopped {
            "stopped once the group without it took over"
        } else {
            "STILL RUNNING"
        }
    );
    println!(
        "refusals    : {}",
        refusals
            .iter()
            .filter(|(_, n)| **n > 0.0)
            .map(|(r, n)| format!("{r}={n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "read-back   : {} acknowledged writes read through the order, {} missing",
        load.acked.len() - load.uncertain.len(),
        missing.len()
    );
    println!(
        "group key   : MLS epochs per replica {group_epochs:?}, {rekeys} rotations (Update commits)"
    );
    println!(
        "confidential: every other client's requests sealed by the client (a key derived from \
         the group key) in the log and journals, {} opened at execution; {} checkpoints sealed (state and reply cache); \
         across the replicas",
        sealed[0], sealed[1]
    );

    let top = executed.iter().map(|(_, e)| *e).max().unwrap_or(0);
    let seq_of = |i: usize| {
        executed
            .iter()
            .find(|(r, _)| *r == i)
            .map_or(0, |(_, e)| *e)
    };
    let behind = top.saturating_sub(seq_of(primary).min(seq_of(outcome.joined)));
    let checks = [
        (ops > 0, "no operation was acknowledged".to_string()),
        (
            missing.is_empty(),
            format!("acknowledged writes missing: {missing:?}"),
        ),
        (
            outcome.intruder,
            "the foreign-CA client was admitted".into(),
        ),
        (
            outcome.revoked,
            "the revoked client was still admitted".into(),
        ),
        (removed_stopped, "the removed replica did not stop".into()),
        (
            group_quorum(&group_epochs) && rekeys >= 1.0,
            format!(
                "the replicas do not share one rotated group key: {group_epochs:?}, {rekeys} rotations"
            ),
        ),
        (
            behind <= 2 * ConsensusSection::default().window,
            format!("the restarted or the new replica did not catch up: executed {executed:?}"),
        ),
        (
            sealed[0] > 0.0,
            "no confidential request was executed".into(),
        ),
        (sealed[1] > 0.0, "no checkpoint was sealed".into()),
    ];
    for (ok, why) in checks {
        if !ok {
            return Err(DemoError::Check(why));
        }
    }
    println!("ok: every check held");
    Ok(())
}

/// Refusals by reason, executed sequence number and group epoch per replica, rotations, and
/// sealed requests opened, from the replicas' metrics (`skip` is the removed replica).
type Seen = (
    BTreeMap<String, f64>,
    Vec<(usize, u64)>,
    Vec<(usize, u64)>,
    f64,
    [f64; 2],
);

fn read_metrics(
    replicas: &[(securesmart_transport::NodeId, std::net::SocketAddr)],
    skip: usize,
) -> Result<Seen, DemoError> {
    let mut refusals: BTreeMap<String, f64> = BTreeMap::new();
    let mut executed = Vec::new();
    let mut group_epochs = Vec::new();
    let mut rekeys = 0.0;
    // Sealed requests opened at execution, checkpoints sealed.
    let mut sealed = [0.0; 2];
    for (i, (_, metrics_addr)) in replicas.iter().enumerate() {
        if i == skip {
            continue;
        }
        let body = scrape(*metrics_addr).map_err(setup)?;
        for reason in ["unknown_ca", "revoked", "bad_certificate", "not_admitted"] {
            let n = metric_sum(
                &body,
                "securesmart_transport_handshakes_refused_total",
                &[&format!("reason=\"{reason}\"")],
            );
            *refusals.entry(reason.into()).or_default() += n;
        }
        executed.push((
            i,
            metric_sum(&body, "securesmart_consensus_executed_seq", &[]) as u64,
        ));
        group_epochs.push((
            i,
            metric_sum(&body, "securesmart_node_group_epoch", &[]) as u64,
        ));
        rekeys += metric_sum(&body, "securesmart_node_rekeys_total", &[]);
        sealed[0] += metric_sum(&body, "securesmart_node_sealed_opened_total", &[]);
        sealed[1] += metric_sum(&body, "securesmart_node_checkpoints_sealed_total", &[]);
    }
    Ok((refusals, executed, group_epochs, rekeys, sealed))
}

/// Whether a quorum (all but one of four) of the replicas share the newest group epoch; a
/// replica that fell behind asks to be re-added and catches up later.
fn group_quorum(epochs: &[(usize, u64)]) -> bool {
    let newest = epochs.iter().map(|(_, e)| *e).max().unwrap_or(0);
    epochs.iter().filter(|(_, e)| *e == newest).count() + 1 >= epochs.len().max(1)
}

/// What the scripted events did.
struct Outcome {
    intruder: bool,
    revoked: bool,
    joined: usize,
    removed: usize,
    /// Rotations the removed replica committed before its removal (it may have been the
    /// committer).
    removed_rekeys: f64,
}

/// Crashes and restarts the primary, sends an intruder, adds a fifth replica and removes
/// another, revokes a client. Returns what happened, and the administrator's client.
async fn script(
    cluster: Arc<Mutex<LocalCluster>>,
    mut admin: Client,
    progress: Arc<Progress>,
    (start, duration): (Instant, Duration),
    (primary, victim): (usize, usize),
    log: String,
) -> Result<(Outcome, Client), DemoError> {
    let at = |fraction: f64| start + duration.mul_f64(fraction);
    let note = |what: &str| {
        progress.note(&format!("{:>5.1}s  {what}", start.elapsed().as_secs_f64()));
    };
    tokio::time::sleep_until(at(0.2).into()).await;
    cluster.lock().await.kill(primary);
    note(&format!(
        "crashed replica {primary} (the primary) with SIGKILL"
    ));
    tokio::time::sleep_until(at(0.3).into()).await;
    let (ca, replicas, victim) = {
        let c = cluster.lock().await;
        let replicas = ClientConfig::load(&c.dir.join("client0.toml"))
            .and_then(|config| config.roster())
            .map_err(setup)?;
        let victim = c
            .clients
            .get(victim)
            .cloned()
            .ok_or_else(|| setup("no spare client"))?;
        (c.dir.join("ca.pem"), replicas, victim)
    };
    let intruder = {
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            let refused = try_intruder(&ca, replicas).await?;
            progress.note(&format!(
                "{:>5.1}s  a client with a foreign CA's certificate tried every replica: {}",
                start.elapsed().as_secs_f64(),
                if refused { "refused" } else { "ADMITTED" }
            ));
            Ok::<_, DemoError>(refused)
        })
    };
    tokio::time::sleep_until(at(0.4).into()).await;
    cluster.lock().await.start(primary, &log).map_err(setup)?;
    note(&format!("restarted replica {primary} from its journal"));

    // A fifth replica enrolls at the trust center, the administrator orders its AddNode, and
    // it starts, catching up by state transfer.
    tokio::time::sleep_until(at(0.5).into()).await;
    let (joined, add) = {
        let mut c = cluster.lock().await;
        let joined = c.add_replica().await.map_err(setup)?;
        let r = c
            .replicas
            .get(joined)
            .ok_or_else(|| setup("no new replica"))?;
        let certificate = crate::config::load_certificate(&r.certificate).map_err(setup)?;
        let add = MembershipCommand::AddNode {
            certificate: certificate.to_vec(),
            key_package: Vec::new(),
            replica_addr: r.replica_addr,
            client_addr: r.client_addr,
        };
        (joined, add)
    };
    let verdict = admin.command(&add).await.map_err(setup)?;
    cluster.lock().await.start(joined, &log).map_err(setup)?;
    note(&format!(
        "replica {joined} enrolled and added ({verdict}); it catches up by state transfer"
    ));

    // The administrator removes one of the original replicas.
    tokio::time::sleep_until(at(0.65).into()).await;
    let removed = (primary + 1) % 4;
    let (id, metrics_addr) = cluster
        .lock()
        .await
        .replicas
        .get(removed)
        .map(|r| (r.id, r.metrics_addr))
        .ok_or_else(|| setup("no replica to remove"))?;
    let removed_rekeys = scrape(metrics_addr)
        .map(|b| metric_sum(&b, "securesmart_node_rekeys_total", &[]))
        .unwrap_or(0.0);
    let verdict = admin
        .command(&MembershipCommand::RemoveNode { id })
        .await
        .map_err(setup)?;
    note(&format!(
        "replica {removed} removed ({verdict}); it stops once the group without it takes over"
    ));

    tokio::time::sleep_until(at(0.75).into()).await;
    let mut config = ClientConfig::load(&victim).map_err(setup)?;
    cluster
        .lock()
        .await
        .revoke(&config.client.certificate)
        .map_err(setup)?;
    note("revoked a client's certificate at the trust center; the replicas order the new CRL");
    config.client.timeout_ms = 800;
    let deadline = Instant::now() + Duration::from_secs(8);
    let revoked = loop {
        tokio::time::sleep(crate::node::CRL_POLL).await;
        match Client::from_config(&config).await {
            Err(ClientError::Unreachable { reached: 0, .. }) => break true,
            Ok(c) => c.close().await,
            Err(_) => {}
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    note(&format!(
        "the revoked client tried every replica: {}",
        if revoked { "refused" } else { "ADMITTED" }
    ));
    let intruder = intruder.await.map_err(setup)??;
    let outcome = Outcome {
        intruder,
        revoked,
        joined,
        removed,
        removed_rekeys,
    };
    Ok((outcome, admin))
}

/// One closed-loop client: puts to its own keys (so the last acknowledged value is known), a
/// get every fourth operation.
async fn client_loop(
    j: usize,
    mut client: Client,
    value: Bytes,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    load: Arc<Mutex<Load>>,
) {
    let mut i: u64 = 0;
    while !stop.load(Relaxed) {
        i += 1;
        let key = format!("client{j}/key{}", i % 64);
        let t = Instant::now();
        let write = !i.is_multiple_of(4);
        let mut v = value.to_vec();
        v.extend_from_slice(format!("-{i}").as_bytes());
        let v = Bytes::from(v);
        let result = if write {
            client.put(key.clone(), v.clone()).await
        } else {
            client.get(key.clone()).await
        };
        let elapsed = t.elapsed();
        let mut l = load.lock().await;
        match result {
            Ok(_) => {
                l.latencies.push(elapsed);
                if write {
                    l.acked.insert(key.clone(), v);
                    l.uncertain.retain(|k| *k != key);
                }
                done.fetch_add(1, Relaxed);
            }
            Err(ClientError::Timeout { .. }) if write => {
                l.errors += 1;
                l.uncertain.push(key);
            }
            Err(_) => l.errors += 1,
        }
    }
    client.close().await;
}

/// A client whose certificate comes from another CA tries every replica; `true` if refused.
async fn try_intruder(
    ca: &std::path::Path,
    replicas: crate::roster::Roster,
) -> Result<bool, DemoError> {
    let rogue = DevCa::new("rogue CA")
        .and_then(|ca| ca.issue_role("intruder", Role::Client))
        .map_err(setup)?;
    // It knows the cluster's CA certificate (public), but its own comes from a rogue CA.
    let trust = load_trust(ca, None).map_err(setup)?;
    let options = ClientOptions {
        timeout: Duration::from_millis(800),
        retry: Duration::from_millis(200),
        limits: Limits::local(),
        bind: None,
    };
    Ok(matches!(
        Client::connect(rogue, trust, replicas, options).await,
        Err(ClientError::Unreachable { reached: 0, .. })
    ))
}

struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(duration: Duration) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(duration.as_millis() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {elapsed} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Self { bar }
    }

    fn tick(&self, elapsed: Duration, rate: f64) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(elapsed.as_millis() as u64);
                bar.set_message(format!("{rate:.0} ops/s"));
            }
            None => {
                if elapsed.as_millis() % 1000 < 250 {
                    println!("  {:>5.1}s  {rate:>9.0} ops/s", elapsed.as_secs_f64());
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
