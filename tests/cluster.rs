//! Multi-process tests on loopback: a trust center enrolls four replicas and some clients over
//! the network, each replica runs as its own `securesmart node run` process with a journal on
//! disk, and clients use the client library over the client plane.
//!
//! What a user relies on: concurrent clients see linearizable results; the service goes on
//! with one replica crashed (f = 1) and the crashed one catches up when it restarts; a whole
//! cluster killed and restarted keeps every acknowledged write; a client whose certificate is
//! revoked is refused; a confidential request is ciphertext in every replica's log on disk.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use securesmart::client::{Client, ClientError};
use securesmart::cluster::{LocalCluster, LocalClusterOptions, metric_sum, scrape};
use securesmart::config::{ClientConfig, ConsensusSection, NodeConfig, load_certificate};
use securesmart::membership::MembershipCommand;
use securesmart::transport::{Plane, PlaneConfig};
use tokio::sync::Mutex;

const EXE: &str = env!("CARGO_BIN_EXE_securesmart");

/// One cluster at a time: four node processes each are plenty for two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("securesmart-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A cluster of four replica processes, all started.
async fn cluster(name: &str, clients: usize) -> LocalCluster {
    cluster_with(name, clients, |_| {}).await
}

/// A cluster of four replica processes with tuned options, all started.
async fn cluster_with(
    name: &str,
    clients: usize,
    tune: impl FnOnce(&mut LocalClusterOptions),
) -> LocalCluster {
    let mut c = created(name, clients, tune).await;
    for i in 0..4 {
        c.start(i, &log_filter()).unwrap();
    }
    c
}

/// The files of a cluster of four replicas with tuned options, none started yet.
async fn created(
    name: &str,
    clients: usize,
    tune: impl FnOnce(&mut LocalClusterOptions),
) -> LocalCluster {
    let mut options = LocalClusterOptions {
        replicas: 4,
        clients,
        consensus: ConsensusSection {
            checkpoint_interval: 16,
            window: 32,
            // Generous for two shared cores running five node processes and the test.
            view_change_timeout_ms: 1000,
            ..ConsensusSection::default()
        },
        client_timeout_ms: 20_000,
        log: "info".into(),
        rekey_seconds: 2,
    };
    tune(&mut options);
    let mut c = LocalCluster::create(&scratch(name), Path::new(EXE), &options)
        .await
        .unwrap();
    c.remove_on_drop = std::env::var_os("SECURESMART_TEST_KEEP").is_none();
    c
}

/// The node processes' log filter (`SECURESMART_TEST_LOG`, default `info`).
fn log_filter() -> String {
    std::env::var("SECURESMART_TEST_LOG").unwrap_or_else(|_| "info".into())
}

async fn client(c: &LocalCluster, j: usize) -> Client {
    let config = ClientConfig::load(&c.clients[j]).unwrap();
    Client::from_config(&config).await.unwrap()
}

/// Shows the replicas' logs when a test fails.
/// Panics with `result`'s error after printing the replicas' last log lines.
fn or_dump(c: &LocalCluster, result: Result<(), String>) {
    if let Err(e) = result {
        dump_logs(c);
        panic!("{e}");
    }
}

fn dump_logs(c: &LocalCluster) {
    for i in 0..c.replicas.len() {
        let log = c.dir.join("logs").join(format!("replica{i}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        eprintln!("--- replica{i} (last lines)");
        for l in tail.into_iter().rev() {
            eprintln!("{l}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_writes_and_reads_through_four_replica_processes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let c = cluster("basic", 1).await;
    let mut cl = client(&c, 0).await;
    let result = async {
        assert_eq!(cl.put("k", "v1").await?, None);
        assert_eq!(cl.put("k", "v2").await?, Some(Bytes::from("v1")));
        assert_eq!(cl.get("k").await?, Some(Bytes::from("v2")));
        assert_eq!(cl.delete("k").await?, Some(Bytes::from("v2")));
        assert_eq!(cl.get("k").await?, None);
        Ok::<_, ClientError>(())
    }
    .await;
    if result.is_err() {
        dump_logs(&c);
    }
    result.unwrap();
    // The CLI does the same from a configuration file.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(EXE)
            .args(["client", "--config"])
            .arg(&c.clients[0])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    cli(&["put", "cli", "works"]);
    assert_eq!(cli(&["get", "cli"]), "works");
    cl.close().await;
    // Each replica serves Prometheus metrics: the handshakes it accepted, and how far it
    // executed (a quorum did; one replica may trail until the next checkpoint).
    let mut executed_something = 0;
    for r in &c.replicas {
        let body = scrape(r.metrics_addr).unwrap();
        if metric_sum(&body, "securesmart_consensus_executed_seq", &[]) >= 1.0 {
            executed_something += 1;
        }
        assert!(
            metric_sum(
                &body,
                "securesmart_transport_handshakes_total",
                &["outcome=\"accepted\""]
            ) >= 1.0,
            "{body}"
        );
    }
    assert!(
        executed_something >= 3,
        "{executed_something} replicas executed"
    );
}

/// One operation of a history: a put of a unique value (which returns the previous value) or
/// a get, with its real-time interval.
#[derive(Clone, Debug)]
struct Op {
    key: String,
    write: Option<String>,
    result: Option<String>,
    start: Instant,
    end: Instant,
}

/// Checks a history of puts (unique values, each returning the previous value) and gets on
/// registers for linearizability. The previous values order each key's writes into one chain;
/// every operation then has a position in it (a write its own, a read the write it saw), and
/// an operation that ended before another began must not come after it.
fn check_linearizable(history: &[Op]) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op);
    }
    for (key, ops) in by_key {
        let writes: Vec<&&Op> = ops.iter().filter(|o| o.write.is_some()).collect();
        let mut next: BTreeMap<Option<&str>, &str> = BTreeMap::new();
        for w in &writes {
            let value = w.write.as_deref().unwrap();
            if next.insert(w.result.as_deref(), value).is_some() {
                return Err(format!("{key}: two writes overwrote {:?}", w.result));
            }
        }
        let mut position: BTreeMap<Option<&str>, usize> = BTreeMap::from([(None, 0)]);
        let mut at = None;
        while let Some(v) = next.get(&at) {
            position.insert(Some(*v), position.len());
            at = Some(*v);
        }
        if position.len() != writes.len() + 1 {
            return Err(format!("{key}: the writes do not form one chain: {next:?}"));
        }
        let pos = |o: &Op| -> Result<usize, String> {
            let seen = if o.write.is_some() {
                o.write.as_deref()
            } else {
                o.result.as_deref()
            };
            position
                .get(&seen)
                .copied()
                .ok_or_else(|| format!("{key}: a read saw {seen:?}, which nobody wrote"))
        };
        for a in &ops {
            for b in &ops {
                if a.end >= b.start {
                    continue;
                }
                let (pa, pb) = (pos(a)?, pos(b)?);
                let ok = match (a.write.is_some(), b.write.is_some()) {
                    (_, true) => pa < pb,
                    (_, false) => pa <= pb,
                };
                if !ok {
                    return Err(format!(
                        "{key}: {a:?} ended before {b:?} began but is ordered after it"
                    ));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn the_checker_catches_a_stale_read() {
    let t = Instant::now();
    let ms = |n| t + Duration::from_millis(n);
    let op = |write: Option<&str>, result: Option<&str>, s, e| Op {
        key: "k".into(),
        write: write.map(String::from),
        result: result.map(String::from),
        start: ms(s),
        end: ms(e),
    };
    let good = [op(Some("a"), None, 0, 10), op(None, Some("a"), 20, 30)];
    assert!(check_linearizable(&good).is_ok());
    let stale = [op(Some("a"), None, 0, 10), op(None, None, 20, 30)];
    assert!(check_linearizable(&stale).is_err());
    let lost = [op(Some("a"), None, 0, 10), op(Some("b"), None, 20, 30)];
    assert!(check_linearizable(&lost).is_err());
    let concurrent = [op(Some("a"), None, 0, 30), op(None, None, 10, 20)];
    assert!(check_linearizable(&concurrent).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_see_linearizable_results() {
    let _one = ONE_AT_A_TIME.lock().await;
    let c = cluster("linearizable", 3).await;
    let history = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for j in 0..3 {
        let mut cl = client(&c, j).await;
        let history = Arc::clone(&history);
        tasks.push(tokio::spawn(async move {
            for i in 0..40u32 {
                let key = format!("key{}", (i + j as u32) % 2);
                let start = Instant::now();
                let (write, result) = if (i + j as u32).is_multiple_of(3) {
                    (None, cl.get(key.clone()).await)
                } else {
                    let value = format!("c{j}-{i}");
                    (Some(value.clone()), cl.put(key.clone(), value).await)
                };
                let result = result.map_err(|e| format!("client {j} op {i}: {e}"))?;
                history.lock().await.push(Op {
                    key,
                    write,
                    result: result.map(|v| String::from_utf8_lossy(&v).into_owned()),
                    start,
                    end: Instant::now(),
                });
            }
            cl.close().await;
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        or_dump(&c, t.await.unwrap());
    }
    let history = history.lock().await;
    assert_eq!(history.len(), 120);
    check_linearizable(&history).unwrap();
}

/// Index of the primary of view 0 (the replica with the smallest node id).
/// Waits (up to `within`) until replica `restarted` executed up to `top`, then stops another
/// replica so that every quorum needs it, and writes and reads `keys` keys through `cl`.
async fn needed_in_the_quorum(
    c: &mut LocalCluster,
    cl: &mut Client,
    restarted: usize,
    top: u64,
    within: Duration,
    keys: usize,
) -> Result<(), String> {
    wait_for("the restarted replica to catch up", within, || {
        executed(c, restarted) >= top
    })
    .await?;
    c.kill((restarted + 2) % 4);
    write_keys(cl, "after", keys).await?;
    read_keys(cl, "after", keys).await
}

/// Retries connecting as the client of `config` (1 s timeouts) until no replica admits it
/// (until the replicas ordered the CRL that revokes it, it still gets in), for `within`.
async fn until_refused(config: &ClientConfig, within: Duration) -> Result<(), String> {
    let mut short = config.clone();
    short.client.timeout_ms = 1000;
    let deadline = Instant::now() + within;
    loop {
        match Client::from_config(&short).await {
            Err(ClientError::Unreachable { reached: 0, .. }) => return Ok(()),
            other if Instant::now() > deadline => {
                return Err(format!("a revoked client connected: {other:?}"));
            }
            Ok(cl) => cl.close().await,
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn first_primary(c: &LocalCluster) -> usize {
    (0..c.replicas.len())
        .min_by_key(|i| c.replicas[*i].id)
        .unwrap()
}

async fn write_keys(cl: &mut Client, prefix: &str, n: usize) -> Result<(), String> {
    for i in 0..n {
        cl.put(format!("{prefix}{i}"), format!("{prefix}-value-{i}"))
            .await
            .map_err(|e| format!("{prefix}{i}: {e}"))?;
    }
    Ok(())
}

async fn read_keys(cl: &mut Client, prefix: &str, n: usize) -> Result<(), String> {
    for i in 0..n {
        let got = cl
            .get(format!("{prefix}{i}"))
            .await
            .map_err(|e| e.to_string())?;
        let want = Bytes::from(format!("{prefix}-value-{i}"));
        if got.as_ref() != Some(&want) {
            return Err(format!("{prefix}{i}: {got:?}, want {want:?}"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_survives_a_crashed_primary_and_the_restarted_one_catches_up() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = cluster("crash", 1).await;
    let mut cl = client(&c, 0).await;
    let primary = first_primary(&c);
    let other = (primary + 1) % 4;
    let result = async {
        write_keys(&mut cl, "before", 20).await?;
        // f = 1: the primary crashes, the other three change view and go on.
        c.kill(primary);
        write_keys(&mut cl, "during", 40).await?;
        // It restarts from its journal and catches up ...
        c.start(primary, &log_filter()).map_err(|e| e.to_string())?;
        write_keys(&mut cl, "after", 40).await?;
        // ... so that the service still has a quorum when another replica crashes.
        c.kill(other);
        write_keys(&mut cl, "last", 20).await?;
        for prefix in ["before", "during", "after", "last"] {
            let n = if prefix == "during" || prefix == "after" {
                40
            } else {
                20
            };
            read_keys(&mut cl, prefix, n).await?;
        }
        Ok::<_, String>(())
    }
    .await;
    or_dump(&c, result);
    assert!(c.is_running(primary), "the restarted replica is still up");
    cl.close().await;
}

/// A replica that was down while the state grew past a replica-plane frame (16 MiB) catches
/// up: it fetches the snapshot in parts, and the cluster then orders with it in the quorum.
/// (Before parts, the state reply could not be sent at all and the replica never recovered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_fetches_a_state_larger_than_a_frame_in_parts() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = cluster("bigstate", 1).await;
    let mut cl = client(&c, 0).await;
    let lagging = (first_primary(&c) + 1) % 4;
    let value = Bytes::from(vec![0x5a; 256 * 1024]);
    let result = async {
        write_keys(&mut cl, "before", 4).await?;
        c.kill(lagging);
        // 20 MiB of values while it is down: the others' checkpoints move far past it.
        for i in 0..80 {
            cl.put(format!("big{i}"), value.clone())
                .await
                .map_err(|e| format!("put big{i}: {e}"))?;
        }
        let top = executed(&c, (lagging + 1) % 4);
        c.start(lagging, &log_filter()).map_err(|e| e.to_string())?;
        needed_in_the_quorum(&mut c, &mut cl, lagging, top, Duration::from_secs(120), 60).await?;
        let got = cl.get("big79").await.map_err(|e| e.to_string())?;
        if got.as_ref() != Some(&value) {
            return Err("big79 lost".into());
        }
        Ok::<_, String>(())
    }
    .await;
    or_dump(&c, result);
    cl.close().await;
}

/// The ordered CRL expires (here after a few seconds, as after 7 days without `ca serve
/// --crl`): a replica that restarts then is refused by every peer until a fresh CRL replaces
/// the expired one. The fresh file reaches the planes at once and is ordered; the restarted
/// replica reconnects and is needed in the quorum afterwards. (Before, a fresh CRL changed the
/// members' verdicts from "revocation unknown" to "ok" and was refused as "not a current CRL".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_ordered_crl_is_replaced_and_a_restarted_replica_reconnects() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = cluster("crlexpiry", 1).await;
    let mut cl = client(&c, 0).await;
    let restarted = (first_primary(&c) + 1) % 4;
    let result = async {
        write_keys(&mut cl, "before", 4).await?;
        let short = c
            .refresh_crl(Duration::from_secs(4))
            .map_err(|e| e.to_string())?;
        // Ordered within a second or two (the nodes poll the file every second).
        tokio::time::sleep(Duration::from_secs(3)).await;
        write_keys(&mut cl, "short", 4).await?;
        c.kill(restarted);
        tokio::time::sleep(Duration::from_secs(3)).await;
        c.refresh_crl(Duration::from_secs(3600))
            .map_err(|e| e.to_string())?;
        assert!(short.exists());
        c.start(restarted, &log_filter())
            .map_err(|e| e.to_string())?;
        write_keys(&mut cl, "fresh", 4).await?;
        let top = executed(&c, (restarted + 1) % 4);
        needed_in_the_quorum(&mut c, &mut cl, restarted, top, Duration::from_secs(60), 40).await?;
        Ok::<_, String>(())
    }
    .await;
    or_dump(&c, result);
    cl.close().await;
}

/// Revocation always works: revoking a replica of a group of four removes its vote (it stops,
/// and the three others go on, degraded), and a client revoked after it is refused. (Before, a
/// CRL that left fewer than four replicas was refused whole, and with it every later CRL: the
/// revoked replica kept voting and revoked clients stayed admitted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_revoked_at_n_4_leaves_and_a_client_revoked_after_it_is_refused() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = cluster("revoke4", 2).await;
    let mut bystander = client(&c, 1).await;
    let victim = 3;
    let result = async {
        write_keys(&mut bystander, "before", 4).await?;
        c.revoke(&c.replicas[victim].certificate)
            .map_err(|e| e.to_string())?;
        wait_for(
            "the revoked replica to stop",
            Duration::from_secs(60),
            || !c.is_running(victim),
        )
        .await?;
        wait_for(
            "the others to see three replicas",
            Duration::from_secs(20),
            || {
                (0..3).all(|i| {
                    let metrics = scrape(c.replicas[i].metrics_addr).unwrap_or_default();
                    metric_sum(&metrics, "securesmart_node_degraded", &[]) == 1.0
                })
            },
        )
        .await?;
        write_keys(&mut bystander, "three", 20).await?;
        read_keys(&mut bystander, "before", 4).await?;
        // A client revoked now is refused.
        let config = ClientConfig::load(&c.clients[0]).map_err(|e| e.to_string())?;
        c.revoke(&config.client.certificate)
            .map_err(|e| e.to_string())?;
        until_refused(&config, Duration::from_secs(20)).await?;
        write_keys(&mut bystander, "after", 4).await?;
        Ok::<_, String>(())
    }
    .await;
    or_dump(&c, result);
    bystander.close().await;
}

/// A replica revoked while it is down stops when it is back. The others executed the CRL and
/// refuse it; its journal still names it a member, so it never executes its own removal; but
/// the CRL file it reads (signed by our CA) revokes the certificate it presents, and no current
/// replica keeps a link with it. (Before, it ran on for good, cut off and resubmitting the CRL;
/// a replica that lagged behind the CRL's execution, in a view change say, was in the same
/// place.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_revoked_while_it_is_down_stops_when_it_is_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = cluster("revokedown", 1).await;
    let mut cl = client(&c, 0).await;
    let victim = 3;
    let result = async {
        write_keys(&mut cl, "before", 4).await?;
        c.kill(victim);
        c.revoke(&c.replicas[victim].certificate)
            .map_err(|e| e.to_string())?;
        wait_for(
            "the others to execute the CRL",
            Duration::from_secs(30),
            || {
                (0..3).all(|i| {
                    let metrics = scrape(c.replicas[i].metrics_addr).unwrap_or_default();
                    metric_sum(&metrics, "securesmart_node_degraded", &[]) == 1.0
                })
            },
        )
        .await?;
        write_keys(&mut cl, "revoked", 4).await?;
        c.start(victim, &log_filter()).map_err(|e| e.to_string())?;
        wait_for(
            "the revoked replica to stop",
            Duration::from_secs(30),
            || !c.is_running(victim),
        )
        .await?;
        write_keys(&mut cl, "after", 4).await?;
        read_keys(&mut cl, "before", 4).await?;
        Ok::<_, String>(())
    }
    .await;
    or_dump(&c, result);
    cl.close().await;
}

/// A replica removed while it is down stops when it is back. The others executed the removal,
/// the group without it took over and they refuse it; its journal still names it a member, so
/// it never executes its own removal. Cut off, it asks the others' client planes for the
/// certified roster changes after its own, and those remove it. (Before, it ran on for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_removed_while_it_is_down_stops_when_it_is_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = created("removedown", 1, |o| o.replicas = 5).await;
    for i in 0..5 {
        c.start(i, &log_filter()).unwrap();
    }
    let removed = 4;
    let mut admin = client(&c, 0).await;
    let result = async {
        write_keys(&mut admin, "before", 4).await?;
        c.kill(removed);
        let remove = MembershipCommand::RemoveNode {
            id: c.replicas[removed].id,
        };
        let verdict = admin.command(&remove).await.map_err(|e| e.to_string())?;
        assert!(verdict.starts_with("ok"), "{verdict}");
        // Until the group without it took over at every other replica (requests move the
        // checkpoints past the switch).
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut round = 0;
        while !(0..4).all(|i| {
            let metrics = scrape(c.replicas[i].metrics_addr).unwrap_or_default();
            metric_sum(&metrics, "securesmart_node_members", &[]) == 4.0
                && metric_sum(&metrics, "securesmart_node_leaving", &[]) == 0.0
        }) {
            if Instant::now() > deadline {
                return Err("the group without the removed replica did not take over".into());
            }
            round += 1;
            write_keys(&mut admin, &format!("moving{round}"), 8).await?;
        }
        c.start(removed, &log_filter()).map_err(|e| e.to_string())?;
        wait_for(
            "the removed replica to stop",
            Duration::from_secs(60),
            || !c.is_running(removed),
        )
        .await?;
        write_keys(&mut admin, "after", 4).await?;
        read_keys(&mut admin, "before", 4).await?;
        Ok::<_, String>(())
    }
    .await;
    or_dump(&c, result);
    admin.close().await;
}

/// Renewal in place: a renewed certificate written over a running replica's file is ordered
/// (`RenewNode`) and presented on new links that replace the old ones, so revoking the old
/// certificate (superseded) afterwards cuts nothing: the replica is needed in the quorum and
/// never restarted. (Before, the replica took a renewal only at a restart: its links carried
/// the old certificate, the CRL cut them, and its reconnects presented the revoked one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_replica_replaces_its_links_and_its_old_certificate_can_be_revoked() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = cluster("renew", 1).await;
    let mut cl = client(&c, 0).await;
    let renewing = (first_primary(&c) + 1) % 4;
    let result = async {
        write_keys(&mut cl, "before", 4).await?;
        let old = c.renew(renewing).map_err(|e| e.to_string())?;
        wait_for(
            "the renewal to be ordered and presented",
            Duration::from_secs(30),
            || c.metric(renewing, "securesmart_node_certificate_renewals_total") >= 1.0,
        )
        .await?;
        // Links are replaced with the renewal's connections a moment after it is presented.
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.supersede(&old).map_err(|e| e.to_string())?;
        // The nodes order the CRL file within a second or two; then the old serial is revoked
        // on every plane.
        tokio::time::sleep(Duration::from_secs(4)).await;
        write_keys(&mut cl, "renewed", 4).await?;
        // A renewal written while a replica is down is ordered when it is back (its first
        // look at the file), so superseding its old certificate leaves it a member.
        let down = (renewing + 1) % 4;
        c.kill(down);
        let old_down = c.renew(down).map_err(|e| e.to_string())?;
        c.start(down, &log_filter()).map_err(|e| e.to_string())?;
        write_keys(&mut cl, "restarted", 4).await?;
        // Submitted after 30 looks at the file (one a second).
        tokio::time::sleep(Duration::from_secs(36)).await;
        c.supersede(&old_down).map_err(|e| e.to_string())?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        write_keys(&mut cl, "superseded", 4).await?;
        let top = executed(&c, (renewing + 2) % 4);
        needed_in_the_quorum(&mut c, &mut cl, renewing, top, Duration::from_secs(30), 20).await?;
        assert!(c.is_running(renewing), "renewed without a restart");
        assert!(c.is_running(down), "renewed while down, still a member");
        Ok::<_, String>(())
    }
    .await;
    or_dump(&c, result);
    cl.close().await;
}

/// Sends signal `name` (`STOP`, `CONT`) to replica `i`'s process.
fn signal(c: &LocalCluster, i: usize, name: &str) -> Result<(), String> {
    let pid = c.pid(i).ok_or(format!("replica {i} is not running"))?;
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .map_err(|e| e.to_string())?;
    status
        .success()
        .then_some(())
        .ok_or(format!("kill -{name} {pid}: {status}"))
}

/// A replica that was behind while its renewal was ordered (by an administrator) and its old
/// certificate then revoked as superseded is refused by the others with the old one, and its
/// own state still holds that one: it presents the renewal from its certificate file instead
/// of stopping, catches up and is needed in the quorum. (Before, it found the certificate it
/// presented revoked, cut off, and stopped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_its_own_renewal_presents_it_when_the_old_certificate_is_revoked() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = cluster("renewbehind", 1).await;
    let mut admin = client(&c, 0).await;
    let behind = (first_primary(&c) + 1) % 4;
    let result = async {
        write_keys(&mut admin, "before", 4).await?;
        signal(&c, behind, "STOP")?;
        // Until the others' links to it time out (10 s idle): on resume it holds no link, and
        // nothing buffered in its socket brings it the renewal's batch.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let old = c.renew(behind).map_err(|e| e.to_string())?;
        let renewed =
            load_certificate(&c.replicas[behind].certificate).map_err(|e| e.to_string())?;
        let renew = MembershipCommand::RenewNode {
            certificate: renewed.to_vec(),
        };
        let verdict = admin.command(&renew).await.map_err(|e| e.to_string())?;
        assert!(verdict.starts_with("ok"), "{verdict}");
        let others: Vec<usize> = (0..4).filter(|i| *i != behind).collect();
        let epoch = |c: &LocalCluster, i: usize| c.metric(i, "securesmart_node_membership_epoch");
        let renewed_in = others.iter().map(|i| epoch(&c, *i)).fold(0.0, f64::max);
        c.supersede(&old).map_err(|e| e.to_string())?;
        wait_for(
            "the others to execute the CRL",
            Duration::from_secs(30),
            || others.iter().all(|i| epoch(&c, *i) > renewed_in),
        )
        .await?;
        write_keys(&mut admin, "behind", 4).await?;
        signal(&c, behind, "CONT")?;
        // Cut off for a few ticks, then it presents the renewal and catches up.
        tokio::time::sleep(Duration::from_secs(8)).await;
        if !c.is_running(behind) {
            return Err("the renewed replica stopped".into());
        }
        let top = executed(&c, others[0]);
        needed_in_the_quorum(&mut c, &mut admin, behind, top, Duration::from_secs(60), 8).await?;
        read_keys(&mut admin, "behind", 4).await?;
        Ok::<_, String>(())
    }
    .await;
    or_dump(&c, result);
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cluster_restart_keeps_every_acknowledged_write() {
    let _one = ONE_AT_A_TIME.lock().await;
    // Confidential writes, and a key rotation every second: the journals hold sealed
    // requests and sealed checkpoints of epochs the members have since left.
    let mut c = cluster_with("restart", 1, |o| o.rekey_seconds = 1).await;
    wait_for_group_key(&c).await;
    let mut cl = client(&c, 0).await;
    cl.set_confidential(true);
    or_dump(&c, write_keys(&mut cl, "acked", 100).await);
    cl.close().await;
    // Several rotations after the last write, before the crash.
    let written_in = group_epoch(&c, 0);
    wait_for("three key rotations", Duration::from_secs(60), || {
        (0..4).all(|i| group_epoch(&c, i) >= written_in + 3)
    })
    .await
    .unwrap();
    // Every replica is killed at once (no clean shutdown), then started again.
    for i in 0..4 {
        c.kill(i);
    }
    for i in 0..4 {
        c.start(i, &log_filter()).unwrap();
    }
    let mut cl = client(&c, 0).await;
    cl.set_confidential(true);
    let result = async {
        read_keys(&mut cl, "acked", 100).await?;
        write_keys(&mut cl, "later", 10).await?;
        read_keys(&mut cl, "later", 10).await
    }
    .await;
    or_dump(&c, result);
    cl.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_certificate_is_revoked_is_refused() {
    let _one = ONE_AT_A_TIME.lock().await;
    let c = cluster("revoked", 2).await;
    let mut victim_config = ClientConfig::load(&c.clients[0]).unwrap();
    victim_config.client.timeout_ms = 3000;
    let mut victim = Client::from_config(&victim_config).await.unwrap();
    let mut bystander = client(&c, 1).await;
    victim.put("k", "from the victim").await.unwrap();
    let config = ClientConfig::load(&c.clients[0]).unwrap();
    c.revoke(&config.client.certificate).unwrap();
    // The replicas pick up the new CRL file, order it, and close the victim's connections.
    until_refused(&config, Duration::from_secs(15))
        .await
        .unwrap();
    assert!(
        victim.get("k").await.is_err(),
        "its old connections are closed"
    );
    assert_eq!(
        bystander.get("k").await.unwrap(),
        Some(Bytes::from("from the victim"))
    );
    bystander.close().await;
    // Beyond TLS: the replicas ordered the revoked certificate itself, so the replicated state
    // refuses the victim's signed requests even if a faulty replica relays them.
    wait_for(
        "every replica to know whom the CRL revokes",
        Duration::from_secs(20),
        || {
            (0..4).all(|i| {
                let metrics = scrape(c.replicas[i].metrics_addr).unwrap_or_default();
                metric_sum(&metrics, "securesmart_node_revoked_certificates", &[]) >= 1.0
            })
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_signed_with_another_key_is_not_ordered() {
    use securesmart::protocol::{ClientReply, ClientRequest, Outcome, RequestKind, RequestSigner};
    use securesmart::transport::Class;
    let _one = ONE_AT_A_TIME.lock().await;
    let c = cluster("forged", 2).await;
    // Client 1's own connection (TLS proves who it is), but requests signed with client 0's
    // key: as a faulty replica would forward a request in another client's name.
    let load = |j: usize| ClientConfig::load(&c.clients[j]).unwrap();
    let (c0, c1) = (load(0), load(1));
    let identity =
        securesmart::config::load_identity(&c1.client.certificate, &c1.client.key).unwrap();
    let other = securesmart::config::load_identity(&c0.client.certificate, &c0.client.key).unwrap();
    let (own_key, other_key) = (
        RequestSigner::new(&identity).unwrap(),
        RequestSigner::new(&other).unwrap(),
    );
    let mut trust = securesmart::config::load_trust(&c1.client.ca, None).unwrap();
    trust.peers = c.replicas.iter().map(|r| (r.id, r.client_addr)).collect();
    let (plane, mut inbox) = Plane::client(PlaneConfig::new(
        identity,
        "127.0.0.1:0".parse().unwrap(),
        trust,
    ))
    .await
    .unwrap();
    assert!(plane.wait_connected(4, Duration::from_secs(10)).await);
    let op = Bytes::from(
        securesmart::kv::KvOp::Put {
            key: "k".into(),
            value: "from-client-1".into(),
        }
        .encode(),
    );
    // Replies to request `number` within `wait`, from distinct replicas.
    let mut ask = async |request: ClientRequest, wait: Duration| {
        plane.broadcast(Class::Consensus, &Bytes::from(request.encode()));
        let mut from = std::collections::BTreeSet::new();
        let deadline = Instant::now() + wait;
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline.into(), inbox.recv()).await {
            if let Ok(ClientReply {
                number,
                outcome: Outcome::Executed(_),
                ..
            }) = ClientReply::decode(&m.payload)
                && number == request.number
            {
                from.insert(m.from);
            }
        }
        from.len()
    };
    let forged = ClientRequest::signed(&other_key, 1_000, RequestKind::App, op.clone());
    assert_eq!(
        ask(forged, Duration::from_secs(3)).await,
        0,
        "a forged request executed"
    );
    for r in &c.replicas {
        // Intake holds it unchecked (the channel is client 1's); the primary checks it before
        // it would propose it, each backup when it times out there: every replica refuses it,
        // and nobody changes views over it.
        let body = scrape(r.metrics_addr).unwrap();
        assert!(
            metric_sum(&body, "securesmart_node_unsigned_requests_total", &[]) >= 1.0,
            "replica {} did not refuse it",
            r.id
        );
        assert_eq!(
            metric_sum(&body, "securesmart_consensus_view", &[]),
            0.0,
            "replica {} changed views",
            r.id
        );
    }
    // The control: the same request signed with its own key executes.
    let honest = ClientRequest::signed(&own_key, 1_001, RequestKind::App, op);
    assert!(ask(honest, Duration::from_secs(10)).await >= 2);
    plane.shutdown().await;
    let mut reader = client(&c, 0).await;
    assert_eq!(
        reader.get("k").await.unwrap(),
        Some(Bytes::from("from-client-1"))
    );
    reader.close().await;
}

/// Waits until the four replicas share the group key (they are in one epoch).
async fn wait_for_group_key(c: &LocalCluster) {
    wait_for(
        "the group key at every replica",
        Duration::from_secs(60),
        || {
            let e: Vec<u64> = (0..4).map(|i| group_epoch(c, i)).collect();
            e[0] > 0 && e.iter().all(|x| *x == e[0])
        },
    )
    .await
    .unwrap();
}

/// Seven replicas (f = 2) form the group key and order confidential requests. (Before, each
/// commit added one replica: with the creator that made two holders, short of the f + 1 = 3
/// acknowledgements that keep a commit, and no other commit is taken while one is unsettled,
/// so the group of seven never formed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seven_replicas_form_the_group_key_and_seal() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = created("seven", 1, |o| {
        o.replicas = 7;
        o.rekey_seconds = 600;
    })
    .await;
    for i in 0..7 {
        c.start(i, &log_filter()).unwrap();
    }
    let formed = wait_for(
        "the group key at all seven replicas",
        Duration::from_secs(90),
        || {
            let e: Vec<u64> = (0..7).map(|i| group_epoch(&c, i)).collect();
            e[0] > 0 && e.iter().all(|x| *x == e[0])
        },
    )
    .await;
    or_dump(&c, formed);
    let mut cl = client(&c, 0).await;
    cl.set_confidential(true);
    assert_eq!(cl.put("seven", "sealed").await.unwrap(), None);
    assert_eq!(
        cl.get("seven").await.unwrap(),
        Some(Bytes::from_static(b"sealed"))
    );
    cl.close().await;
}

/// The group epoch replica `i` is in, from its metrics (0 if unreachable or not a member).
fn group_epoch(c: &LocalCluster, i: usize) -> u64 {
    c.metric(i, "securesmart_node_group_epoch") as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confidential_request_is_ciphertext_in_every_replica_log() {
    use securesmart::consensus::journal::{FileJournal, Record};
    use securesmart::protocol::{Ordered, Submission};
    let _one = ONE_AT_A_TIME.lock().await;
    // Few ordered requests besides the test's (no rotation) and checkpoints far apart, so that
    // the journal still holds the test's batches when it is read.
    let c = cluster_with("confidential", 1, |o| {
        o.rekey_seconds = 600;
        o.consensus.checkpoint_interval = 256;
        o.consensus.window = 512;
    })
    .await;
    // The four replicas share the group key once they are in one epoch.
    wait_for_group_key(&c).await;
    let secret = format!("confidential-{}", std::process::id());
    let mut cl = client(&c, 0).await;
    cl.set_confidential(true);
    assert_eq!(cl.put("card", secret.clone()).await.unwrap(), None);
    assert_eq!(
        cl.get("card").await.unwrap(),
        Some(Bytes::from(secret.clone()))
    );
    // The same, sealed by a replica instead of the client.
    cl.set_replica_sealing(true);
    assert_eq!(
        cl.put("card", secret.clone()).await.unwrap(),
        Some(Bytes::from(secret.clone()))
    );
    cl.set_replica_sealing(false);
    // Not confidential: in the clear in the log (the check below can see plaintext).
    cl.set_confidential(false);
    cl.put("public", "in-the-clear-value").await.unwrap();
    cl.close().await;
    let contains = |b: &[u8], needle: &[u8]| b.windows(needle.len()).any(|w| w == needle);
    let journal = |i: usize, copy: &str| {
        let config = NodeConfig::load(&c.replicas[i].config).unwrap();
        // A copy: opening a journal may cut a torn tail, and the node is still writing.
        let copy = c.dir.join(format!("{copy}{i}"));
        std::fs::create_dir_all(&copy).unwrap();
        for f in std::fs::read_dir(config.node.data_dir.join("consensus")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
        }
        FileJournal::open(&copy, &Default::default()).unwrap().1
    };
    for i in 0..4 {
        let records = journal(i, "journal-copy");
        let (mut sealed, mut client_sealed, mut clear) = (0, 0, 0);
        for r in &records {
            let proposals = match r {
                Record::PrePrepare(s) => vec![&s.message],
                Record::Prepared(cert) | Record::Committed(cert) => vec![&cert.proposal.message],
                _ => Vec::new(),
            };
            for m in proposals {
                let securesmart::consensus::message::Message::PrePrepare { batch, .. } = m else {
                    continue;
                };
                for request in batch {
                    assert!(
                        !contains(&request.payload, secret.as_bytes()),
                        "replica {i} logged a confidential request in the clear"
                    );
                    match Submission::decode(&request.payload).map(|s| s.ordered) {
                        Ok(Ordered::Sealed { .. }) => sealed += 1,
                        Ok(Ordered::ClientSealed(_)) => client_sealed += 1,
                        Ok(Ordered::App(p)) if contains(&p, b"in-the-clear-value") => clear += 1,
                        _ => {}
                    }
                }
            }
        }
        assert!(sealed > 0, "replica {i} logged no request a replica sealed");
        assert!(
            client_sealed > 0,
            "replica {i} logged no request its client sealed"
        );
        assert!(
            clear > 0,
            "replica {i} logged no plain request (the check sees nothing)"
        );
    }

    // The next checkpoint (at 256) holds the store with both values: once a confidential
    // request executed, every replica writes it sealed, plain values included.
    let mut cl = client(&c, 0).await;
    for n in 0..2_000 {
        if (0..4).all(|i| c.metric(i, "securesmart_consensus_stable_seq") >= 256.0) {
            break;
        }
        cl.put(format!("filler-{}", n % 16), "x").await.unwrap();
    }
    cl.close().await;
    for i in 0..4 {
        let stable: Vec<Bytes> = journal(i, "journal-stable")
            .into_iter()
            .filter_map(|r| match r {
                Record::Stable { snapshot, .. } => Some(snapshot),
                _ => None,
            })
            .collect();
        assert!(!stable.is_empty(), "replica {i} journaled no checkpoint");
        for snapshot in stable {
            assert!(!contains(&snapshot, secret.as_bytes()), "replica {i}");
            assert!(
                !contains(&snapshot, b"in-the-clear-value"),
                "replica {i} journaled its checkpoint in the clear"
            );
        }
    }
}

/// The highest sequence number replica `i` executed, from its metrics (0 if unreachable).
fn executed(c: &LocalCluster, i: usize) -> u64 {
    c.metric(i, "securesmart_consensus_executed_seq") as u64
}

async fn wait_for(
    what: &str,
    timeout: Duration,
    mut ok: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting: {what}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_joins_and_another_is_removed_under_load_without_losing_an_operation() {
    join_and_remove(false).await;
}

/// With an original replica crashed after the join, the five-replica group (quorum four) needs
/// the joiner: it must be in the others' view and hold the group key, not only follow by state
/// transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_joiner_carries_the_group_when_an_original_replica_crashes() {
    join_and_remove(true).await;
}

/// A fifth replica joins under load (and, with `crash`, an original one crashes so that the
/// group needs the joiner), then another is removed; no operation is lost or repeated, and the
/// removed replica is refused and cannot open the group's new payloads.
async fn join_and_remove(crash: bool) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = cluster("membership", 3).await;
    // Load: a chain of puts on one key; each put returns the value before it, so a lost or a
    // repeated execution breaks the chain.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut loader = client(&c, 1).await;
    // Confidential: a joiner executes them only once it holds the group key, and fetches the
    // state it could not compute.
    loader.set_confidential(true);
    let load = {
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        tokio::spawn(async move {
            let mut prev: Option<Bytes> = None;
            while !stop.load(Relaxed) {
                let n = done.load(Relaxed) + 1;
                let value = Bytes::from(format!("link{n}"));
                let got = loader
                    .put("chain", value.clone())
                    .await
                    .map_err(|e| format!("put {n}: {e}"))?;
                if got != prev {
                    return Err(format!("put {n} returned {got:?}, expected {prev:?}"));
                }
                prev = Some(value);
                done.store(n, Relaxed);
            }
            Ok::<_, String>((prev, loader.roster().clone()))
        })
    };
    let mut admin = client(&c, 0).await;
    let progress = |at_least: u64| {
        let done = Arc::clone(&done);
        async move {
            let target = done.load(Relaxed) + at_least;
            wait_for("the load to go on", Duration::from_secs(60), || {
                done.load(Relaxed) >= target
            })
            .await
        }
    };
    let result = async {
        progress(20).await?;
        // A fifth replica enrolls, an administrator orders its AddNode, and it starts.
        let joiner = c.add_replica().await.map_err(|e| e.to_string())?;
        let r = &c.replicas[joiner];
        let certificate = load_certificate(&r.certificate).map_err(|e| e.to_string())?;
        let add = MembershipCommand::AddNode {
            certificate: certificate.to_vec(),
            key_package: Vec::new(),
            replica_addr: r.replica_addr,
            client_addr: r.client_addr,
        };
        let verdict = admin.command(&add).await.map_err(|e| e.to_string())?;
        assert!(verdict.starts_with("ok"), "{verdict}");
        let added_at = executed(&c, 0);
        c.start(joiner, &log_filter()).map_err(|e| e.to_string())?;
        // It catches up past the point where the five-replica group takes over (window 32,
        // rounded up to a checkpoint of 16) and, holding the group key, executes the
        // confidential load itself.
        wait_for("the joiner to catch up", Duration::from_secs(60), || {
            let metrics = scrape(c.replicas[joiner].metrics_addr).unwrap_or_default();
            executed(&c, joiner) > added_at + 32 + 16
                && metric_sum(&metrics, "securesmart_node_sealed_opened_total", &[]) > 0.0
                && metric_sum(&metrics, "securesmart_consensus_state_lost", &[]) == 0.0
        })
        .await?;
        if crash {
            // With five replicas the quorum is four: the group needs the joiner now.
            c.kill(2);
            progress(20)
                .await
                .map_err(|e| format!("after the crash: {e}"))?;
        }
        // A non-administrator cannot remove a replica.
        let mut other = client(&c, 2).await;
        let remove = MembershipCommand::RemoveNode {
            id: c.replicas[3].id,
        };
        assert!(matches!(
            other.command(&remove).await,
            Err(ClientError::Refused(_))
        ));
        other.close().await;
        // The administrator removes replica 3: it stops, and the rest go on.
        let verdict = admin.command(&remove).await.map_err(|e| e.to_string())?;
        assert!(verdict.starts_with("ok"), "{verdict}");
        wait_for(
            "the removed replica to stop",
            Duration::from_secs(60),
            || !c.is_running(3),
        )
        .await?;
        progress(20)
            .await
            .map_err(|e| format!("after the removal: {e}"))?;
        // A replica that joins now is configured with the current roster, which the running
        // cluster certifies: the removed replica is not among those it trusts for its state.
        let late = c.add_replica().await.map_err(|e| e.to_string())?;
        let config = NodeConfig::load(&c.replicas[late].config).map_err(|e| e.to_string())?;
        let trusted: Vec<_> = securesmart::config::load_peers(&config.replicas)
            .map_err(|e| e.to_string())?
            .into_keys()
            .collect();
        let mut current: Vec<_> = [0, 1, 2, 4].iter().map(|i| c.replicas[*i].id).collect();
        current.sort();
        assert_eq!(trusted, current, "the late joiner's configured replicas");
        // Configured by hand with the genesis replicas instead (replica 3 among them, removed
        // since), a joiner follows the certified roster changes before it trusts anyone.
        let text = std::fs::read_to_string(&c.replicas[late].config).map_err(|e| e.to_string())?;
        let genesis =
            std::fs::read_to_string(c.dir.join("client0.toml")).map_err(|e| e.to_string())?;
        let (head, _) = text
            .split_once("[[replicas]]")
            .ok_or("no replicas in the config")?;
        let (_, genesis_list) = genesis.split_once("[[replicas]]").ok_or("no replicas")?;
        let stale = format!(
            "{}[[replicas]]{genesis_list}",
            head.replace("roster = 2", "roster = 0")
        );
        std::fs::write(&c.replicas[late].config, stale).map_err(|e| e.to_string())?;
        c.start(late, &log_filter()).map_err(|e| e.to_string())?;
        let log = c.dir.join(format!("logs/replica{late}.log"));
        wait_for(
            "the joiner configured with the genesis replicas to follow the roster",
            Duration::from_secs(30),
            || {
                let text = plain(&std::fs::read_to_string(&log).unwrap_or_default());
                text.contains("joiner: following the current roster")
                    && text.contains("configured=0 current=2 replicas=4")
            },
        )
        .await?;
        c.kill(late);
        Ok::<_, String>(())
    }
    .await;
    stop.store(true, Relaxed);
    let last = load.await.unwrap();
    if result.is_err() || last.is_err() {
        dump_logs(&c);
        eprintln!("the load ended with {last:?}");
    }
    result.unwrap();
    let (last, loader_roster) = last.unwrap();
    // The removed replica's identity is refused by the replicas.
    let config = NodeConfig::load(&c.replicas[3].config).unwrap();
    let identity =
        securesmart::config::load_identity(&config.node.certificate, &config.node.key).unwrap();
    let mut trust = securesmart::config::load_trust(&config.node.ca, None).unwrap();
    trust
        .peers
        .insert(c.replicas[0].id, c.replicas[0].replica_addr);
    trust
        .peers
        .insert(c.replicas[1].id, c.replicas[1].replica_addr);
    let (plane, _inbox) = Plane::replica(PlaneConfig::new(
        identity,
        "127.0.0.1:0".parse().unwrap(),
        trust,
    ))
    .await
    .unwrap();
    assert!(
        !plane.wait_connected(1, Duration::from_secs(3)).await,
        "a removed replica was admitted"
    );
    plane.shutdown().await;
    // Nothing was lost or executed twice: the chain ends where the loader stopped.
    assert_eq!(admin.get("chain").await.unwrap(), last);
    // The clients were configured with the genesis replicas (roster 0). They followed the
    // certified changes: the join (roster 1) and the removal (roster 2); the removed replica
    // is no longer one they count on, the joiner is.
    for roster in [&loader_roster, admin.roster()] {
        assert_eq!(roster.number(), 2, "{roster:?}");
        assert!(roster.contains(&c.replicas[4].id) && !roster.contains(&c.replicas[3].id));
    }
    admin.close().await;

    // The replicas share one group key, rotated meanwhile; the removed replica cannot open a
    // payload sealed in the current epoch. (Copies of the members' state files, read while the
    // nodes run: they are written atomically.)
    let current: Vec<usize> = if crash {
        vec![0, 1, 4]
    } else {
        vec![0, 1, 2, 4]
    };
    let member_of = |i: usize, copy: &str| {
        let config = NodeConfig::load(&c.replicas[i].config).unwrap();
        let identity =
            securesmart::config::load_identity(&config.node.certificate, &config.node.key).unwrap();
        let file = c.dir.join(copy);
        std::fs::copy(config.node.data_dir.join("mls.state"), &file).unwrap();
        securesmart::membership::GroupMember::new(
            &identity,
            securesmart::membership::GroupConfig {
                state_file: Some(file),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let removed = member_of(3, "removed.state");
    let last_known = removed.key_epochs().last().copied().unwrap_or(0);
    // Two current replicas that share an epoch after the removal (a replica that fell behind
    // is re-added in time; see the note on convergence in `securesmart::group_key`).
    let mut pair = None;
    wait_for(
        "two replicas to share a group epoch after the removal",
        Duration::from_secs(40),
        || {
            let e: Vec<(usize, u64)> = current.iter().map(|i| (*i, group_epoch(&c, *i))).collect();
            pair = e.iter().find_map(|(a, ea)| {
                e.iter()
                    .find(|(b, eb)| b != a && eb == ea && *ea > last_known)
                    .map(|(b, _)| (*a, *b))
            });
            pair.is_some()
        },
    )
    .await
    .unwrap();
    let (a, b) = pair.unwrap();
    let mut sealer = member_of(a, "sealer.state");
    let reader = member_of(b, "reader.state");
    let sealed = sealer.seal(b"test context", b"new-epoch secret").unwrap();
    assert_eq!(
        reader.open(&sealed, b"test context").unwrap().plaintext,
        b"new-epoch secret"
    );
    assert!(
        removed.open(&sealed, b"test context").is_err(),
        "the removed replica opened a payload of the new epoch"
    );
}

/// `text` without ANSI colour sequences.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// Resident memory of a process, in MiB (0 if unknown).
fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// One replica process misbehaves for real (the test build's fault mode): it orders group
/// commits the others must refuse (a valid one removing a current replica, others with a
/// flipped byte) and floods its peers with messages they can only hold (1 MiB pre-prepares of
/// a far view it is primary of, prepares of ever later views). The other three keep ordering
/// confidential requests, their group key keeps rotating, its commit is voided and it is
/// barred, and their memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_forges_commits_and_floods_cannot_stop_the_others() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = created("byzantine", 1, |_| {}).await;
    // The faulty replica: the one with the largest id (neither the group's creator nor its
    // first committer, so the honest group forms as usual).
    let faulty = (0..4).max_by_key(|i| c.replicas[*i].id).unwrap();
    let honest: Vec<usize> = (0..4).filter(|i| *i != faulty).collect();
    for i in 0..4 {
        if i == faulty {
            c.start_with(
                i,
                &log_filter(),
                &[("SECURESMART_FAULT", "forge-commits,flood")],
            )
            .unwrap();
        } else {
            c.start(i, &log_filter()).unwrap();
        }
    }
    let epochs = |c: &LocalCluster| {
        honest
            .iter()
            .map(|i| group_epoch(c, *i))
            .collect::<Vec<_>>()
    };
    let result = async {
        wait_for(
            "the honest replicas' group key",
            Duration::from_secs(60),
            || {
                let e = epochs(&c);
                e[0] > 0 && e.iter().all(|x| *x == e[0])
            },
        )
        .await?;
        let start = epochs(&c)[0];
        let mut cl = client(&c, 0).await;
        cl.set_confidential(true);
        let until = Instant::now() + Duration::from_secs(20);
        let mut n = 0u64;
        while Instant::now() < until {
            n += 1;
            cl.put(format!("k{}", n % 16), format!("v{n}"))
                .await
                .map_err(|e| format!("confidential put {n}: {e}"))?;
        }
        assert_eq!(
            cl.get(format!("k{}", n % 16))
                .await
                .map_err(|e| e.to_string())?,
            Some(Bytes::from(format!("v{n}")))
        );
        cl.close().await;
        // The key kept rotating (every 2 s) at the honest replicas, in step.
        wait_for(
            "the honest replicas in one epoch",
            Duration::from_secs(20),
            || {
                let e = epochs(&c);
                e.iter().all(|x| *x == e[0]) && e[0] >= start + 3
            },
        )
        .await?;
        let mut voided = 0.0;
        for &i in &honest {
            let body = scrape(c.replicas[i].metrics_addr).map_err(|e| e.to_string())?;
            voided += metric_sum(
                &body,
                "securesmart_node_group_commits_settled_total",
                &["outcome=\"voided\""],
            );
            // The flood arrived and was held up to the flooder's share, then refused.
            let busy = metric_sum(
                &body,
                "securesmart_consensus_dropped_total",
                &["reason=\"busy\""],
            );
            assert!(busy > 0.0, "replica {i} refused none of the flood");
            let rss = c.pid(i).map_or(0, rss_mib);
            eprintln!("replica {i}: {rss} MiB resident after the flood, {n} puts");
            // The flood offered ~20 MiB/s per peer: before the per-sender bounds each honest
            // replica held up to 3 x window x n messages of it (~200 MiB of pre-prepares).
            assert!(rss > 0, "replica {i}'s resident memory is unknown");
            assert!(rss < 160, "replica {i} holds {rss} MiB");
        }
        assert!(
            voided >= 3.0,
            "every honest replica voided the forged commit ({voided})"
        );
        assert!(n >= 20, "only {n} confidential puts in 20 s");
        Ok::<_, String>(())
    }
    .await;
    if result.is_err() {
        dump_logs(&c);
    }
    result.unwrap();
}

/// Starts the four replicas of `c`, the one with the largest id with `fault`
/// (`SECURESMART_FAULT`), and waits for the group key; the faulty one's index.
async fn start_with_one_faulty(c: &mut LocalCluster, fault: &str) -> usize {
    let faulty = (0..4).max_by_key(|i| c.replicas[*i].id).unwrap();
    for i in 0..4 {
        if i == faulty {
            c.start_with(i, &log_filter(), &[("SECURESMART_FAULT", fault)])
                .unwrap();
        } else {
            c.start(i, &log_filter()).unwrap();
        }
    }
    wait_for_group_key(c).await;
    faulty
}

/// `count` puts to one key, each of which must return the value before it (`prev`, then the
/// put's own): a swapped operation that executed, or a put that executed twice, breaks the
/// chain. `label` names the puts in errors.
async fn put_chain(
    cl: &mut Client,
    prev: &mut Option<Bytes>,
    label: &str,
    count: usize,
) -> Result<(), String> {
    for m in 0..count {
        let value = Bytes::from(format!("v{label}{m}"));
        let got = cl
            .put("chain", value.clone())
            .await
            .map_err(|e| format!("confidential put {label}{m}: {e}"))?;
        if got != *prev {
            return Err(format!(
                "put {label}{m} returned {got:?}, expected {prev:?}"
            ));
        }
        *prev = Some(value);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_handing_out_wrong_sealing_keys_cannot_block_confidential_requests() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = created("wrong-key", 1, |_| {}).await;
    // The faulty replica hands every client that asks a made-up key of the right epoch; it
    // orders and votes as usual.
    let faulty = start_with_one_faulty(&mut c, "wrong-sealing-key").await;
    let result = async {
        // Each new client fetches its key, so the faulty replica answers a dozen times; a
        // client that took its key would have a request refused for each.
        let mut prev = None;
        for n in 0..12 {
            let mut cl = client(&c, 0).await;
            cl.set_confidential(true);
            put_chain(&mut cl, &mut prev, &format!("{n}."), 2).await?;
            cl.close().await;
        }
        // Every request was sealed by its client with the key the honest replicas hand out:
        // none failed to open (a refusal for its epoch is the group moving on meanwhile, as
        // it does while it forms), and replicas sealed few if any.
        let faulty_answers = metric_sum(
            &scrape(c.replicas[faulty].metrics_addr).map_err(|e| e.to_string())?,
            "securesmart_node_client_requests_total",
            &["outcome=\"sealing_key\""],
        );
        if faulty_answers < 12.0 {
            return Err(format!(
                "the faulty replica handed out {faulty_answers} keys"
            ));
        }
        let mut sealed_by_replicas = 0.0;
        for i in 0..4 {
            let metrics = scrape(c.replicas[i].metrics_addr).map_err(|e| e.to_string())?;
            sealed_by_replicas += metric_sum(
                &metrics,
                "securesmart_node_client_requests_total",
                &["outcome=\"sealed\""],
            );
            if i == faulty {
                continue;
            }
            let unopened = metric_sum(
                &metrics,
                "securesmart_node_sealed_refused_total",
                &["why=\"does_not_open\""],
            );
            if unopened != 0.0 {
                return Err(format!(
                    "replica {i} could not open {unopened} client-sealed requests"
                ));
            }
        }
        if sealed_by_replicas > 4.0 {
            return Err(format!(
                "replicas sealed {sealed_by_replicas} of 24 requests"
            ));
        }
        Ok::<_, String>(())
    }
    .await;
    or_dump(&c, result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_seals_another_operation_cannot_change_or_block_confidential_requests() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = created("swapper", 1, |_| {}).await;
    // The faulty replica seals, for every client that asks it, another operation than the
    // client's; it orders and votes as usual.
    let faulty = start_with_one_faulty(&mut c, "swap-sealed").await;
    let result = async {
        let mut cl = client(&c, 0).await;
        cl.set_confidential(true);
        cl.set_replica_sealing(true);
        // Sealers rotate with the request number, so the faulty one is asked first for about
        // a quarter of the puts.
        put_chain(&mut cl, &mut None, "", 24).await?;
        cl.close().await;
        // The honest replicas refused what the faulty one sealed (it does not match the
        // client's commitment), and kept their state.
        for i in (0..4).filter(|i| *i != faulty) {
            let metrics = scrape(c.replicas[i].metrics_addr).map_err(|e| e.to_string())?;
            let refused = metric_sum(
                &metrics,
                "securesmart_node_sealed_refused_total",
                &["why=\"commitment\""],
            );
            if refused < 1.0 {
                return Err(format!("replica {i} refused {refused} swapped operations"));
            }
            if metric_sum(&metrics, "securesmart_consensus_state_lost", &[]) != 0.0 {
                return Err(format!("replica {i} lost its state"));
            }
        }
        Ok::<_, String>(())
    }
    .await;
    if result.is_err() {
        dump_logs(&c);
    }
    result.unwrap();
}

/// A removed replica keeps the key of the epoch it was removed in, and clients idle since
/// before the removal still list it in their roster. The removed replica's keys, at its
/// address (a process of the attacker's that took its place), must get nothing from their
/// next confidential requests: neither a request sealed with a key cached before the removal
/// (a client that seals) nor the operation to seal or its sealed request (a client that has
/// replicas seal). Each confirms its roster first (the key query or a roster query shows the
/// newer one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_send_a_removed_replica_nothing_it_could_open() {
    use securesmart::protocol::{ClientRequest, RequestKind};
    let _one = ONE_AT_A_TIME.lock().await;
    let mut c = created("idle-removed", 3, |o| o.replicas = 5).await;
    for i in 0..5 {
        c.start(i, &log_filter()).unwrap();
    }
    let removed = 4;
    let mut admin = client(&c, 0).await;
    let mut sealing = client(&c, 1).await;
    sealing.set_confidential(true);
    let mut replica_sealed = client(&c, 2).await;
    replica_sealed.set_confidential(true);
    replica_sealed.set_replica_sealing(true);
    let result = async {
        wait_for_group_key(&c).await;
        // Both put once (the first holds its key then), then wait.
        sealing
            .put("k", "before")
            .await
            .map_err(|e| format!("first put: {e}"))?;
        replica_sealed
            .put("r", "before")
            .await
            .map_err(|e| format!("first replica-sealed put: {e}"))?;
        let roster = admin.roster().number();
        let remove = MembershipCommand::RemoveNode {
            id: c.replicas[removed].id,
        };
        let verdict = admin.command(&remove).await.map_err(|e| e.to_string())?;
        assert!(verdict.starts_with("ok"), "{verdict}");
        wait_for(
            "the removed replica to stop",
            Duration::from_secs(60),
            || !c.is_running(removed),
        )
        .await?;
        // The replicas certified the roster without it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while admin
            .refresh_roster()
            .await
            .map_or(true, |r| r.number() == roster)
        {
            if Instant::now() > deadline {
                return Err("the roster without the removed replica was not certified".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The attacker's process, with the removed replica's certificate and key, at its
        // client address.
        let config = NodeConfig::load(&c.replicas[removed].config).map_err(|e| e.to_string())?;
        let identity =
            securesmart::config::load_identity(&config.node.certificate, &config.node.key)
                .map_err(|e| e.to_string())?;
        let trust =
            securesmart::config::load_trust(&config.node.ca, None).map_err(|e| e.to_string())?;
        let (spy, mut inbox) = Plane::client_listener(PlaneConfig::new(
            identity,
            c.replicas[removed].client_addr,
            trust,
        ))
        .await
        .map_err(|e| e.to_string())?;
        let idle = [sealing.id(), replica_sealed.id()];
        wait_for(
            "the idle clients to reconnect to the removed replica's address",
            Duration::from_secs(30),
            || idle.iter().all(|id| spy.connected_peers().contains(id)),
        )
        .await?;
        tokio::time::sleep(securesmart::client::ROSTER_TRUST).await;
        let got = sealing
            .put("k", "after")
            .await
            .map_err(|e| format!("put after the removal: {e}"))?;
        assert_eq!(got.as_deref(), Some(&b"before"[..]));
        let got = replica_sealed
            .put("r", "after")
            .await
            .map_err(|e| format!("replica-sealed put after the removal: {e}"))?;
        assert_eq!(got.as_deref(), Some(&b"before"[..]));
        // What each client sent the removed replica: queries only.
        let mut kinds: BTreeMap<_, Vec<RequestKind>> = BTreeMap::new();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), inbox.recv()).await
        {
            if idle.contains(&m.from) {
                let request = ClientRequest::decode(&m.payload)
                    .map_err(|e| format!("the client sent something undecodable: {e}"))?;
                kinds.entry(m.from).or_default().push(request.kind);
            }
        }
        spy.shutdown().await;
        let queries_only = |ks: &[RequestKind]| {
            ks.iter()
                .all(|k| matches!(k, RequestKind::SealingKey | RequestKind::Rosters))
        };
        for (id, expected) in idle
            .iter()
            .zip([RequestKind::SealingKey, RequestKind::Rosters])
        {
            let ks = kinds.get(id).map(Vec::as_slice).unwrap_or_default();
            assert!(queries_only(ks), "the removed replica was sent {ks:?}");
            assert!(
                ks.contains(&expected),
                "the client still reached the removed replica ({ks:?})"
            );
        }
        Ok::<_, String>(())
    }
    .await;
    or_dump(&c, result);
    sealing.close().await;
    replica_sealed.close().await;
    admin.close().await;
}
