//! What consensus costs before the network is added: the PBFT core of every replica, run in
//! one thread by the simulator (zero network delay, real codec), ordering requests from many
//! closed-loop clients; for 4 and 7 replicas, with Ed25519 signing and verification on, and
//! off (the baseline, measured in the same run).
//!
//! `cargo bench --bench consensus [-- --quick]`. Throughput is ordered requests per second of
//! wall-clock time for the whole simulated cluster on one core.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use securesmart_consensus::sim::{Scenario, Sim};

fn scenario(n: usize, signatures: bool, clients: usize, requests: u64) -> Scenario {
    let mut s = Scenario::new(1, n);
    s.signatures = signatures;
    s.clients = clients;
    s.requests = requests;
    s.payload = 64;
    s.delay = (Duration::from_micros(100), Duration::from_micros(100));
    s.client_retry = Duration::from_secs(30);
    s.liveness_bound = Duration::from_secs(600);
    s.core.max_batch = 128;
    s.core.batch_delay = Duration::from_millis(1);
    s.core.window = 256;
    s.core.checkpoint_interval = 128;
    s.core.view_change_timeout = Duration::from_secs(30);
    s.core.max_pending = 100_000;
    s
}

/// Ordered requests per second, and the batches per second.
fn measure(n: usize, signatures: bool, clients: usize, requests: u64) -> (f64, f64) {
    let sim = Sim::new(scenario(n, signatures, clients, requests)).unwrap();
    let start = Instant::now();
    let report = sim.run();
    let secs = start.elapsed().as_secs_f64();
    report.check().expect("the benchmark run is correct");
    let total = (clients as u64 * requests) as f64;
    let batches = report.logs[1].len() as f64;
    (total / secs, batches / secs)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (clients, requests) = if quick { (128, 20) } else { (256, 60) };
    println!(
        "PBFT core over the simulated network, {clients} clients x {requests} requests of 64 B, \
         batches of up to 128 (one thread runs every replica)"
    );
    println!(
        "{:>9} {:>16} {:>16} {:>14} {:>14}",
        "replicas", "signed req/s", "unsigned req/s", "signed/unsig.", "batches/s"
    );
    for n in [4, 7] {
        eprintln!("measuring {n} replicas, signed and unsigned ...");
        let (unsigned, _) = measure(n, false, clients, requests);
        let (signed, batches) = measure(n, true, clients, requests);
        println!(
            "{:>9} {:>16.0} {:>16.0} {:>14.2} {:>14.0}",
            n,
            signed,
            unsigned,
            signed / unsigned,
            batches
        );
    }
}
