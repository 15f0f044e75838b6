//! `securesmart bench`: a throughput and latency harness in the manner of BFT-SMaRt's
//! ThroughputLatency microbenchmark, runnable on a fresh checkout with no set-up files.
//!
//! For each replica count it makes a [`LocalCluster`] (n `securesmart node run` processes on
//! loopback, enrolled by a trust center, as the demo runs them) and runs closed-loop clients
//! in this process: each client has its own certificate and one request outstanding. Clients
//! send from loopback addresses 127.0.0.2 and up, 32 to an address, so the replicas'
//! per-address connection caps stay as they are. Every cell (replicas, mode, sizes, clients)
//! warms up, then measures a window and reports:
//! - ordered operations per second, and latency p50/p90/p99/max from a histogram
//!   (hdrhistogram, microseconds);
//! - CPU seconds per 1,000 operations, of the replica processes and of this process (the
//!   clients), apart (from `/proc/<pid>/stat`; not measured elsewhere);
//! - bytes the replicas' transport sent per operation (frame payloads, without QUIC and UDP
//!   headers), and the mean batch size the replicas executed.
//!
//! Modes:
//! - `full`: as the demo runs: mutual TLS, signed requests and consensus messages,
//!   confidential requests sealed by their clients with the keys the replicas derive for them
//!   from the group key (`--replica-sealing`: sealed by a replica instead, one more round trip
//!   per operation), fsynced journals;
//! - `signed`: the same without sealing;
//! - `baseline`: the same engine, processes, QUIC with mutual TLS and fsynced journals, with
//!   request signatures, consensus signatures and sealing switched off (the replicas run with
//!   `[consensus] insecure_baseline`, on a cluster of their own): the ratios `full/base` and
//!   `signed/base` price the security, not replication;
//! - `unreplicated`: one [`KvStore`](crate::kv::KvStore) in this process behind raw quinn (server-authenticated
//!   TLS only, no replication, no signatures, no journal), the reference for what a plain
//!   networked key-value server costs here. The table gives each cell's ratio to it.
//!
//! Sizes are `request/reply` in bytes of the application payload: `R/0` is a write that
//! replies with nothing ([`KvOp::Set`]), `R/R` a write that replies with the value it
//! replaced ([`KvOp::Put`]), `0/S` a read of an `S`-byte value ([`KvOp::Get`]); `0/0` reads
//! a missing key. Results go to `DIR/results.csv` (`--out`, default `bench-results`), to PNG
//! plots `DIR/throughput.png` and `DIR/latency.png`, and to a table on the terminal; a
//! progress line shows each cell's running rate.
//!
//! ```no_run
//! # async fn demo() -> Result<(), securesmart::bench::BenchError> {
//! use clap::Parser;
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     bench: securesmart::bench::BenchArgs,
//! }
//! let cli = Cli::parse_from(["bench", "--quick"]);
//! let cells = securesmart::bench::run(cli.bench).await?;
//! assert!(cells.iter().all(|c| c.ops_per_sec > 0.0));
//! # Ok(()) }
//! ```

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::Mutex;

use crate::client::Client;
use crate::cluster::{LocalCluster, LocalClusterOptions, metric_sum, scrape};
use crate::config::{ClientConfig, ConsensusSection};
use crate::kv::{KvOp, KvReply};

pub mod plot;

/// A security mode of a cell (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Mode {
    /// Mutual TLS, signatures, sealing, fsynced journals.
    Full,
    /// As `full`, without sealing.
    Signed,
    /// The same engine with request and consensus signatures and sealing off.
    Baseline,
    /// One store in this process behind raw quinn: no replication, no signatures.
    Unreplicated,
}

impl Mode {
    /// Its name in tables and files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Signed => "signed",
            Mode::Baseline => "baseline",
            Mode::Unreplicated => "unreplicated",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Request and reply payload sizes in bytes (`R/S`; see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    /// Request payload (the value written).
    pub request: usize,
    /// Reply payload (the value read back).
    pub reply: usize,
}

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (r, q) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: sizes are request/reply, e.g. 1024/1024"))?;
        let parse = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|e| format!("{s:?}: {e}"))
                .and_then(|n| {
                    (n <= MAX_PAYLOAD)
                        .then_some(n)
                        .ok_or_else(|| format!("{s:?}: at most {MAX_PAYLOAD} bytes"))
                })
        };
        let size = Size {
            request: parse(r)?,
            reply: parse(q)?,
        };
        if size.request > 0 && size.reply > 0 && size.request != size.reply {
            return Err(format!(
                "{s:?}: the store answers a write with nothing (R/0) or with the value it \
                 replaced (R/R), and a read with the value (0/S)"
            ));
        }
        Ok(size)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.request, self.reply)
    }
}

/// The largest request or reply payload a cell may ask for.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Keys each client writes in turn (bounds what the store holds: clients x keys x size).
const KEYS_PER_CLIENT: u64 = 16;
/// Clients per loopback source address.
const CLIENTS_PER_ADDRESS: usize = 32;

/// What `securesmart bench` runs.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// A few short cells (4 replicas, 1 and 16 clients, 0/0 and 1024/1024, the modes asked for), in
    /// under a minute: what CI runs.
    #[arg(long)]
    pub quick: bool,
    /// Replica counts (at least 4 each).
    #[arg(long, value_delimiter = ',', default_values_t = [4, 7])]
    pub replicas: Vec<usize>,
    /// Closed-loop client counts.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64, 200])]
    pub clients: Vec<usize>,
    /// Request/reply payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values = ["0/0", "1024/1024", "4096/0"])]
    pub sizes: Vec<Size>,
    /// Modes, side by side in the same run.
    #[arg(long, value_delimiter = ',', default_values = ["full", "signed", "baseline", "unreplicated"])]
    pub modes: Vec<Mode>,
    /// Seconds of warm-up per cell.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Seconds measured per cell.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Measured windows per cell, back to back: each cell reports the window of median
    /// throughput.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Results directory (`results.csv`).
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Log filter of the node processes (their logs are in the cluster directory's `logs/`).
    #[arg(long, default_value = "warn")]
    pub node_log: String,
    /// The `securesmart` executable the replicas run (this one by default).
    #[arg(long)]
    pub exe: Option<PathBuf>,
    /// `full` mode with every confidential request sealed by a replica, instead of by its
    /// client (`Client::set_replica_sealing`): the path before client sealing.
    #[arg(long)]
    pub replica_sealing: bool,
}

impl BenchArgs {
    /// The arguments with `--quick` applied.
    fn effective(mut self) -> Self {
        if self.quick {
            self.replicas = vec![4];
            self.clients = vec![1, 16];
            self.sizes = vec![
                Size {
                    request: 0,
                    reply: 0,
                },
                Size {
                    request: 1024,
                    reply: 1024,
                },
            ];
            self.warmup = 1;
            self.seconds = 2;
            self.runs = 1;
        }
        self.runs = self.runs.max(1);
        self.clients.retain(|c| *c > 0);
        self.clients.sort_unstable();
        self.clients.dedup();
        self.modes.sort_unstable();
        self.modes.dedup();
        self
    }
}

/// What one cell measured.
#[derive(Clone, Debug)]
pub struct CellResult {
    /// Replicas (0 for `unreplicated`).
    pub replicas: usize,
    /// Mode.
    pub mode: Mode,
    /// Payload sizes.
    pub size: Size,
    /// Closed-loop clients.
    pub clients: usize,
    /// Operations completed per second in the measured window.
    pub ops_per_sec: f64,
    /// Latency percentiles and maximum.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Maximum.
    pub max: Duration,
    /// CPU seconds of the replica processes per 1,000 operations (NaN where unknown).
    pub replica_cpu_per_kop: f64,
    /// CPU seconds of this process (the clients) per 1,000 operations (NaN where unknown).
    pub client_cpu_per_kop: f64,
    /// Bytes the replicas' transport sent per operation (NaN for `unreplicated`).
    pub wire_bytes_per_op: f64,
    /// Client operations per batch the first replica executed (NaN for `unreplicated`).
    pub mean_batch: f64,
    /// Operations that failed (timed out or refused) in the window.
    pub errors: u64,
    /// Windows measured; the cell is the one of median throughput.
    pub runs: usize,
    /// The largest resident set of any replica process, sampled every second of the window
    /// (MiB; NaN for `unreplicated`).
    pub replica_peak_rss_mib: f64,
}

/// A failure of the harness itself (not of a cell's operations, which are counted).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The arguments ask for something the harness cannot run.
    #[error("arguments: {0}")]
    Arguments(String),
    /// Making or starting a cluster, or connecting its clients, failed.
    #[error("setup: {0}")]
    Setup(String),
    /// Drawing a plot failed.
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
    /// Writing the results failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn setup(e: impl fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

/// The operation number `i` of client `j` for `size` (see the module doc).
fn op(j: usize, i: u64, size: Size) -> KvOp {
    if size.request == 0 {
        return KvOp::Get {
            key: Bytes::from(if size.reply == 0 {
                format!("c{j}/none")
            } else {
                format!("c{j}/read{}", size.reply)
            }),
        };
    }
    let key = Bytes::from(format!("c{j}/k{}", i % KEYS_PER_CLIENT));
    let value = Bytes::from(vec![b'v'; size.request]);
    if size.reply == 0 {
        KvOp::Set { key, value }
    } else {
        KvOp::Put { key, value }
    }
}

/// The writes that make `size`'s operations reply with `size.reply` bytes from the start.
fn preload(j: usize, size: Size) -> Vec<KvOp> {
    if size.request == 0 && size.reply > 0 {
        return vec![KvOp::Set {
            key: Bytes::from(format!("c{j}/read{}", size.reply)),
            value: Bytes::from(vec![b'r'; size.reply]),
        }];
    }
    if size.reply > 0 {
        return (0..KEYS_PER_CLIENT)
            .map(|i| KvOp::Set {
                key: Bytes::from(format!("c{j}/k{i}")),
                value: Bytes::from(vec![b'v'; size.reply]),
            })
            .collect();
    }
    Vec::new()
}

/// Whether `reply` is a store reply that carries no refusal.
fn accepted(reply: &[u8]) -> bool {
    matches!(KvReply::decode(reply), Ok(KvReply::Value(_)))
}

/// CPU seconds (user and system) of process `pid` so far, from `/proc`.
fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces; fields after its closing parenthesis.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = fields
        .get(11..13)?
        .iter()
        .map(|f| f.parse::<f64>().ok())
        .sum::<Option<f64>>()?;
    // USER_HZ, 100 on every Linux.
    Some(ticks / 100.0)
}

/// The largest resident set of the replica processes now, in MiB (`VmRSS`; NaN where unknown).
fn replica_rss_mib(cluster: Option<&LocalCluster>) -> f64 {
    let Some(cluster) = cluster else {
        return f64::NAN;
    };
    (0..cluster.replicas.len())
        .filter_map(|i| {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", cluster.pid(i)?)).ok()?;
            let kib = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()?;
            Some(kib / 1024.0)
        })
        .fold(f64::NAN, f64::max)
}

/// The counters read before and after a window.
#[derive(Clone, Copy, Default)]
struct Counters {
    replica_cpu: Option<f64>,
    client_cpu: Option<f64>,
    wire_bytes: f64,
    batches: f64,
}

fn counters(cluster: Option<&LocalCluster>) -> Counters {
    let mut c = Counters {
        client_cpu: cpu_seconds(None),
        ..Counters::default()
    };
    let Some(cluster) = cluster else {
        return c;
    };
    c.replica_cpu = (0..cluster.replicas.len())
        .map(|i| cpu_seconds(Some(cluster.pid(i)?)))
        .sum();
    for (i, r) in cluster.replicas.iter().enumerate() {
        let Ok(body) = scrape(r.metrics_addr) else {
            continue;
        };
        c.wire_bytes += metric_sum(
            &body,
            "securesmart_transport_bytes_total",
            &["direction=\"out\""],
        );
        if i == 0 {
            c.batches = metric_sum(&body, "securesmart_consensus_executed_batches_total", &[]);
        }
    }
    c
}

/// One closed loop per client over `call` (client index, op number -> success): warm-up,
/// then the measured window with a progress line.
async fn closed_loops<F, Fut>(
    label: &str,
    clients: usize,
    warmup: Duration,
    window: Duration,
    runs: usize,
    cluster: Option<&LocalCluster>,
    call: F,
) -> Result<Vec<Window>, BenchError>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    // Latencies in microseconds, 1 us to 100 s, 3 significant digits.
    let empty = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3).map_err(setup)?;
    let stop = Arc::new(AtomicBool::new(false));
    // The window being measured, from 1 (0: warming up or between windows).
    let counting = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for j in 0..clients {
        let (stop, counting, done, call, mut h) = (
            Arc::clone(&stop),
            Arc::clone(&counting),
            Arc::clone(&done),
            call.clone(),
            vec![(empty.clone(), 0u64); runs],
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Relaxed) {
                i += 1;
                let t = Instant::now();
                let ok = call(j, i).await;
                let window = counting.load(Relaxed);
                if let Some((h, errors)) = window.checked_sub(1).and_then(|w| h.get_mut(w)) {
                    if ok {
                        let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                        h.saturating_record(us.max(1));
                        done.fetch_add(1, Relaxed);
                    } else {
                        *errors += 1;
                    }
                }
            }
            h
        }));
    }
    tokio::time::sleep(warmup).await;
    let secs = window.as_secs().max(1);
    let mut measured = Vec::with_capacity(runs);
    for run in 1..=runs {
        done.store(0, Relaxed);
        let before = counters(cluster);
        counting.store(run, Relaxed);
        let start = Instant::now();
        let mut peak_rss = replica_rss_mib(cluster);
        for second in 1..=secs {
            tokio::time::sleep(Duration::from_secs(1)).await;
            peak_rss = peak_rss.max(replica_rss_mib(cluster));
            eprint!(
                "\r  {label}: run {run}/{runs}, {second}/{secs} s, {:.0} ops/s      ",
                done.load(Relaxed) as f64 / start.elapsed().as_secs_f64()
            );
        }
        counting.store(0, Relaxed);
        measured.push((start.elapsed(), before, counters(cluster), peak_rss));
    }
    stop.store(true, Relaxed);
    eprintln!();
    let mut all: Vec<(Histogram<u64>, u64)> = vec![(empty, 0); runs];
    for t in tasks {
        if let Ok(h) = t.await {
            for ((all, errors), (h, e)) in all.iter_mut().zip(h) {
                // (Same bounds: adding cannot fail.)
                let _ = all.add(h);
                *errors += e;
            }
        }
    }
    Ok(all
        .into_iter()
        .zip(measured)
        .map(
            |((histogram, errors), (elapsed, before, after, peak_rss))| Window {
                histogram,
                errors,
                elapsed,
                before,
                after,
                peak_rss,
            },
        )
        .collect())
}

/// What one measured window of a cell saw.
struct Window {
    histogram: Histogram<u64>,
    errors: u64,
    elapsed: Duration,
    before: Counters,
    after: Counters,
    /// The largest replica resident set sampled (MiB).
    peak_rss: f64,
}

/// The cell of the window with the median throughput.
fn median(
    replicas: usize,
    mode: Mode,
    size: Size,
    clients: usize,
    windows: Vec<Window>,
) -> Result<CellResult, BenchError> {
    let runs = windows.len();
    let mut cells: Vec<CellResult> = windows
        .into_iter()
        .map(|w| result(replicas, mode, size, clients, w))
        .collect();
    cells.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
    let mut cell = cells
        .get(runs / 2)
        .cloned()
        .ok_or_else(|| setup("no measured window"))?;
    cell.runs = runs;
    Ok(cell)
}

fn result(
    replicas: usize,
    mode: Mode,
    size: Size,
    clients: usize,
    Window {
        histogram: h,
        errors,
        elapsed,
        before,
        after,
        peak_rss,
    }: Window,
) -> CellResult {
    let ops = h.len() as f64;
    let per_kop = |b: Option<f64>, a: Option<f64>| match (b, a) {
        (Some(b), Some(a)) if ops > 0.0 => (a - b) / ops * 1000.0,
        _ => f64::NAN,
    };
    let us = |q: f64| Duration::from_micros(h.value_at_quantile(q));
    let replicated = mode != Mode::Unreplicated;
    let batches = after.batches - before.batches;
    CellResult {
        replicas,
        mode,
        size,
        clients,
        ops_per_sec: ops / elapsed.as_secs_f64(),
        p50: us(0.50),
        p90: us(0.90),
        p99: us(0.99),
        max: Duration::from_micros(h.max()),
        replica_cpu_per_kop: per_kop(before.replica_cpu, after.replica_cpu),
        client_cpu_per_kop: per_kop(before.client_cpu, after.client_cpu),
        wire_bytes_per_op: if replicated && ops > 0.0 {
            (after.wire_bytes - before.wire_bytes) / ops
        } else {
            f64::NAN
        },
        mean_batch: if replicated && batches > 0.0 {
            ops / batches
        } else {
            f64::NAN
        },
        errors,
        runs: 1,
        replica_peak_rss_mib: peak_rss,
    }
}

/// The clients of a cluster, connected once and shared by its cells.
struct Clients(Vec<Arc<Mutex<Client>>>);

impl Clients {
    async fn connect(cluster: &LocalCluster, n: usize) -> Result<Self, BenchError> {
        let mut clients = Vec::with_capacity(n);
        for j in 0..n {
            let path = cluster
                .clients
                .get(j)
                .ok_or_else(|| setup("fewer client configurations than clients"))?;
            let config = ClientConfig::load(path).map_err(setup)?;
            let source = u8::try_from(2 + j / CLIENTS_PER_ADDRESS)
                .map_err(|_| BenchError::Arguments("too many clients".into()))?;
            let bind = IpAddr::from([127, 0, 0, source]);
            let client = Client::from_config_with(&config, Some(bind))
                .await
                .map_err(setup)?;
            clients.push(Arc::new(Mutex::new(client)));
            if (j + 1) % 25 == 0 || j + 1 == n {
                eprint!("\r  connected {}/{n} clients", j + 1);
            }
        }
        eprintln!();
        Ok(Self(clients))
    }

    async fn cell(
        &self,
        cluster: &LocalCluster,
        mode: Mode,
        size: Size,
        clients: usize,
        args: &BenchArgs,
    ) -> Result<CellResult, BenchError> {
        let n = cluster.replicas.len();
        for (j, c) in self.0.iter().take(clients).enumerate() {
            let mut c = c.lock().await;
            c.set_confidential(mode == Mode::Full);
            c.set_replica_sealing(args.replica_sealing);
            c.set_insecure_unsigned(mode == Mode::Baseline);
            for write in preload(j, size) {
                let _ = c.invoke(Bytes::from(write.encode())).await;
            }
        }
        let connected: Vec<Arc<Mutex<Client>>> = self.0.iter().take(clients).cloned().collect();
        let label = format!("n={n} {mode} {size} x{clients}");
        let measured = closed_loops(
            &label,
            clients,
            Duration::from_secs(args.warmup),
            Duration::from_secs(args.seconds),
            args.runs,
            Some(cluster),
            move |j, i| {
                let client = connected.get(j).cloned();
                async move {
                    let Some(client) = client else { return false };
                    let request = Bytes::from(op(j, i, size).encode());
                    let reply = client.lock().await.invoke(request).await;
                    reply.is_ok_and(|r| accepted(&r))
                }
            },
        )
        .await?;
        median(n, mode, size, clients, measured)
    }
}

/// The unreplicated reference server (see the module doc): a `KvStore` behind raw quinn,
/// one bidirectional stream of length-prefixed operations and replies per client.
mod unreplicated {
    use super::{BenchError, Size, setup};
    use crate::consensus::message::Request;
    use crate::consensus::service::StateMachine;
    use crate::kv::KvStore;
    use crate::transport::pki::{CertRequest, DevCa};
    use crate::transport::{NodeId, Role};
    use bytes::Bytes;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Mutex;

    const ALPN: &[u8] = b"securesmart-bench-kv";
    /// The largest frame the reference server reads.
    const MAX_FRAME: usize = 1 << 20;

    type Stream = (
        quinn::Endpoint,
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
    );

    pub(super) struct Server {
        accept: tokio::task::JoinHandle<()>,
        pub(super) streams: Vec<Arc<Mutex<Stream>>>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.accept.abort();
        }
    }

    async fn serve(incoming: quinn::Incoming, store: Arc<std::sync::Mutex<KvStore>>) {
        let Ok(conn) = incoming.await else { return };
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        let mut number = 0;
        loop {
            let Some(buf) = read_frame(&mut recv).await else {
                return;
            };
            number += 1;
            let reply = match store.lock() {
                Ok(mut s) => s.execute(&Request {
                    client: NodeId::from_bytes([0; 32]),
                    number,
                    payload: Bytes::from(buf),
                }),
                Err(_) => return,
            };
            if !write_frame(&mut send, &reply).await {
                return;
            }
        }
    }

    /// Writes one length-prefixed frame; whether it went out.
    async fn write_frame(send: &mut quinn::SendStream, frame: &[u8]) -> bool {
        let Ok(n) = u32::try_from(frame.len()) else {
            return false;
        };
        send.write_u32(n).await.is_ok() && send.write_all(frame).await.is_ok()
    }

    /// Reads one length-prefixed frame of at most [`MAX_FRAME`] bytes.
    async fn read_frame(recv: &mut quinn::RecvStream) -> Option<Vec<u8>> {
        let len = usize::try_from(recv.read_u32().await.ok()?).ok()?;
        if len > MAX_FRAME {
            return None;
        }
        let mut buf = vec![0; len];
        recv.read_exact(&mut buf).await.ok()?;
        Some(buf)
    }

    pub(super) async fn start(clients: usize) -> Result<Server, BenchError> {
        let ca = DevCa::new("bench ca").map_err(setup)?;
        let server = ca
            .issue(&CertRequest::new("server", Role::Replica))
            .map_err(setup)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut sc = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup)?
            .with_no_client_auth()
            .with_single_cert(server.chain().to_vec(), server.private_key())
            .map_err(setup)?;
        sc.alpn_protocols = vec![ALPN.to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.certificate()).map_err(setup)?;
        let mut cc = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cc.alpn_protocols = vec![ALPN.to_vec()];
        let quic =
            quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(sc)).map_err(setup)?;
        let endpoint = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(quic)),
            ([127, 0, 0, 1], 0).into(),
        )
        .map_err(setup)?;
        let addr = endpoint.local_addr().map_err(setup)?;
        let store = Arc::new(std::sync::Mutex::new(KvStore::default()));
        let accept = tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(serve(incoming, Arc::clone(&store)));
            }
        });
        let client_crypto = Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(cc)).map_err(setup)?,
        );
        let mut streams = Vec::with_capacity(clients);
        for _ in 0..clients {
            let mut endpoint =
                quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).map_err(setup)?;
            endpoint.set_default_client_config(quinn::ClientConfig::new(client_crypto.clone()));
            let conn = endpoint
                .connect(addr, "server")
                .map_err(setup)?
                .await
                .map_err(setup)?;
            let (send, recv) = conn.open_bi().await.map_err(setup)?;
            streams.push(Arc::new(Mutex::new((endpoint, conn, send, recv))));
        }
        Ok(Server { accept, streams })
    }

    /// One operation over `stream`; whether a store reply came back.
    pub(super) async fn call(stream: &Mutex<Stream>, request: &[u8]) -> bool {
        let mut s = stream.lock().await;
        let (_, _, send, recv) = &mut *s;
        write_frame(send, request).await
            && read_frame(recv)
                .await
                .is_some_and(|reply| super::accepted(&reply))
    }

    /// Writes `size`'s preload through the first stream of each client.
    pub(super) async fn preload(server: &Server, size: Size) {
        for (j, s) in server.streams.iter().enumerate() {
            for write in super::preload(j, size) {
                let _ = call(s, &write.encode()).await;
            }
        }
    }
}

async fn unreplicated_cell(
    size: Size,
    clients: usize,
    args: &BenchArgs,
) -> Result<CellResult, BenchError> {
    let server = unreplicated::start(clients).await?;
    unreplicated::preload(&server, size).await;
    let streams = server.streams.clone();
    let label = format!("{} {size} x{clients}", Mode::Unreplicated);
    let measured = closed_loops(
        &label,
        clients,
        Duration::from_secs(args.warmup),
        Duration::from_secs(args.seconds),
        args.runs,
        None,
        move |j, i| {
            let stream = streams.get(j).cloned();
            async move {
                let Some(stream) = stream else { return false };
                unreplicated::call(&stream, &op(j, i, size).encode()).await
            }
        },
    )
    .await?;
    drop(server);
    median(0, Mode::Unreplicated, size, clients, measured)
}

/// Makes and starts a cluster of `n` replicas with `clients` client identities, and waits
/// until every replica holds the group key (`full` seals with it).
async fn cluster(
    n: usize,
    clients: usize,
    baseline: bool,
    args: &BenchArgs,
) -> Result<LocalCluster, BenchError> {
    let exe = match &args.exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().map_err(setup)?,
    };
    let dir = std::env::temp_dir().join(format!(
        "securesmart-bench-{}-{n}{}",
        std::process::id(),
        if baseline { "-baseline" } else { "" }
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let options = LocalClusterOptions {
        replicas: n,
        clients,
        consensus: ConsensusSection {
            insecure_baseline: baseline,
            ..ConsensusSection::default()
        },
        client_timeout_ms: 20_000,
        log: args.node_log.clone(),
        rekey_seconds: 600,
    };
    eprintln!(
        "  {n} replicas and {clients} client identities in {}",
        dir.display()
    );
    let mut cluster = LocalCluster::create(&dir, &exe, &options)
        .await
        .map_err(setup)?;
    // Each replica process gets its share of the cores (`cluster::replica_threads`).
    let mut env = Vec::new();
    if baseline {
        env.push((crate::node::INSECURE_BASELINE_ENV, "1"));
    }
    for i in 0..n {
        cluster.start_with(i, &args.node_log, &env).map_err(setup)?;
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let epochs: Vec<u64> = (0..n)
            .map(|i| cluster.metric(i, "securesmart_node_group_epoch") as u64)
            .collect();
        if epochs.first().is_some_and(|e| *e > 0)
            && epochs.iter().all(|e| Some(e) == epochs.first())
        {
            return Ok(cluster);
        }
        if Instant::now() > deadline {
            return Err(setup(format!("the group key did not form: {epochs:?}")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs every cell `args` asks for, prints the table and writes `results.csv`; returns the
/// cells.
///
/// # Errors
/// [`BenchError`] when the arguments are unusable, a cluster cannot be set up or the results
/// cannot be written. Failed operations are counted in the cells, not errors.
pub async fn run(args: BenchArgs) -> Result<Vec<CellResult>, BenchError> {
    let args = args.effective();
    if args.replicas.iter().any(|n| *n < 4) {
        return Err(BenchError::Arguments("at least 4 replicas".into()));
    }
    let max_clients = args.clients.last().copied().unwrap_or(1);
    if max_clients > CLIENTS_PER_ADDRESS * 250 {
        return Err(BenchError::Arguments("too many clients".into()));
    }
    std::fs::create_dir_all(&args.out).map_err(|source| BenchError::Write {
        path: args.out.clone(),
        source,
    })?;
    let replicated: Vec<Mode> = args
        .modes
        .iter()
        .copied()
        .filter(|m| *m != Mode::Unreplicated)
        .collect();
    let cells_total = args.sizes.len()
        * args.clients.len()
        * (replicated.len() * args.replicas.len()
            + usize::from(args.modes.contains(&Mode::Unreplicated)));
    eprintln!(
        "securesmart bench: {cells_total} cells, {} s warm-up and {} s measured each",
        args.warmup, args.seconds
    );
    let path = args.out.join("results.csv");
    // Written after every cell, so that an interrupted run keeps what it measured.
    let save = |cells: &[CellResult]| {
        write_csv(&path, cells).map_err(|source| BenchError::Write {
            path: path.clone(),
            source,
        })
    };
    let mut cells = Vec::new();
    if args.modes.contains(&Mode::Unreplicated) {
        for size in &args.sizes {
            for k in &args.clients {
                cells.push(unreplicated_cell(*size, *k, &args).await?);
                save(&cells)?;
            }
        }
    }
    // The secure modes share a cluster; `baseline` runs on one of its own.
    let kinds: Vec<(bool, Vec<Mode>)> = [false, true]
        .into_iter()
        .map(|base| {
            let modes = replicated
                .iter()
                .copied()
                .filter(|m| (*m == Mode::Baseline) == base)
                .collect();
            (base, modes)
        })
        .filter(|(_, modes): &(bool, Vec<Mode>)| !modes.is_empty())
        .collect();
    for n in &args.replicas {
        for (base, modes) in &kinds {
            let cluster = cluster(*n, max_clients, *base, &args).await?;
            let clients = Clients::connect(&cluster, max_clients).await?;
            for size in &args.sizes {
                for mode in modes {
                    for k in &args.clients {
                        cells.push(clients.cell(&cluster, *mode, *size, *k, &args).await?);
                        save(&cells)?;
                    }
                }
            }
            // Closed side by side: each close waits a grace period for the replicas to hear it.
            let mut closing = tokio::task::JoinSet::new();
            for c in clients.0 {
                if let Ok(c) = Arc::try_unwrap(c) {
                    closing.spawn(c.into_inner().close());
                }
            }
            closing.join_all().await;
            drop(cluster);
        }
    }
    print_table(&cells);
    save(&cells)?;
    for path in plot::draw(&args.out, &cells)? {
        eprintln!("  plot: {}", path.display());
    }
    Ok(cells)
}

/// `cell`'s throughput over that of the `to` cell with the same sizes and clients (and
/// replicas, for `baseline`); NaN without one.
pub fn ratio(cells: &[CellResult], cell: &CellResult, to: Mode) -> f64 {
    cells
        .iter()
        .find(|c| {
            c.mode == to
                && c.size == cell.size
                && c.clients == cell.clients
                && (to == Mode::Unreplicated || c.replicas == cell.replicas)
        })
        .map_or(f64::NAN, |r| {
            cell.ops_per_sec / r.ops_per_sec.max(f64::MIN_POSITIVE)
        })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_table(cells: &[CellResult]) {
    println!();
    println!(
        "{:>3} {:<13} {:>10} {:>5} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>6} {:>7} {:>7} {:>7} {:>6}",
        "n",
        "mode",
        "size",
        "cli",
        "ops/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "rep cpu",
        "cli cpu",
        "B/op",
        "batch",
        "vs base",
        "vs unr",
        "rss MiB",
        "errors"
    );
    for c in cells {
        println!(
            "{:>3} {:<13} {:>10} {:>5} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>9.3} {:>9.3} {:>8.0} {:>6.1} {:>7.3} {:>7.3} {:>7.0} {:>6}",
            c.replicas,
            c.mode.as_str(),
            c.size.to_string(),
            c.clients,
            c.ops_per_sec,
            ms(c.p50),
            ms(c.p90),
            ms(c.p99),
            ms(c.max),
            c.replica_cpu_per_kop,
            c.client_cpu_per_kop,
            c.wire_bytes_per_op,
            c.mean_batch,
            ratio(cells, c, Mode::Baseline),
            ratio(cells, c, Mode::Unreplicated),
            c.replica_peak_rss_mib,
            c.errors
        );
    }
    println!(
        "(cpu: CPU seconds per 1,000 operations; B/op: bytes the replicas sent per operation; \
         vs base: throughput over the same cell in `baseline`, e.g. full/baseline; rss: the largest \
         replica resident set in the window)"
    );
}

fn write_csv(path: &Path, cells: &[CellResult]) -> std::io::Result<()> {
    use std::fmt::Write as _;
    let mut out = String::from(
        "replicas,mode,request_bytes,reply_bytes,clients,ops_per_sec,p50_us,p90_us,p99_us,\
         max_us,replica_cpu_s_per_kop,client_cpu_s_per_kop,wire_bytes_per_op,mean_batch,errors,runs,replica_peak_rss_mib\n",
    );
    for c in cells {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{:.1},{},{},{},{},{:.4},{:.4},{:.1},{:.2},{},{},{:.1}",
            c.replicas,
            c.mode.as_str(),
            c.size.request,
            c.size.reply,
            c.clients,
            c.ops_per_sec,
            c.p50.as_micros(),
            c.p90.as_micros(),
            c.p99.as_micros(),
            c.max.as_micros(),
            c.replica_cpu_per_kop,
            c.client_cpu_per_kop,
            c.wire_bytes_per_op,
            c.mean_batch,
            c.errors,
            c.runs,
            c.replica_peak_rss_mib
        );
    }
    std::fs::write(path, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvStore;

    #[test]
    fn sizes_parse_and_refuse_what_the_store_cannot_answer() {
        let s: Size = "1024/1024".parse().unwrap();
        assert_eq!((s.request, s.reply), (1024, 1024));
        assert!("4096/0".parse::<Size>().is_ok());
        assert!("0/512".parse::<Size>().is_ok());
        for bad in ["1024", "1024/512", "x/0", "999999/0"] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
    }

    #[test]
    fn operations_carry_the_asked_sizes() {
        let mut kv = KvStore::default();
        for (j, size) in ["0/0", "0/512", "1024/1024", "4096/0"]
            .iter()
            .map(|s| s.parse::<Size>().unwrap())
            .enumerate()
        {
            for write in preload(j, size) {
                kv.apply(write);
            }
            for i in 1..=KEYS_PER_CLIENT * 2 {
                let op = op(j, i, size);
                let encoded = op.encode();
                assert!(encoded.len() >= size.request, "{size}");
                assert!(encoded.len() <= size.request + 32, "{size}");
                let reply = kv.apply(op);
                let got = match reply {
                    KvReply::Value(v) => v.map_or(0, |v| v.len()),
                    KvReply::Refused(why) => panic!("{size}: {why}"),
                };
                assert_eq!(got, size.reply, "{size}");
            }
        }
    }

    #[test]
    fn this_process_has_a_cpu_time() {
        if cfg!(target_os = "linux") {
            assert!(cpu_seconds(None).is_some_and(|s| s >= 0.0));
        }
    }
}
