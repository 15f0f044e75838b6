//! The `metrics` counters a plane emits (own test binary: the recorder is process-global).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use bytes::Bytes;
use common::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use securesmart_transport::pki::DevCa;
use securesmart_transport::{Class, Limits};

/// A counter's name, labels and value.
type Row = (String, Vec<(String, String)>, u64);

fn counter(snapshot: &[Row], name: &str, labels: &[(&str, &str)]) -> u64 {
    snapshot
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| *v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_frames_and_refusals_are_exported() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let mut ca = DevCa::new("metrics ca").unwrap();
    let mut nodes = mesh(&ca, 3, Limits::test()).await;
    for n in &nodes {
        assert!(n.plane.wait_connected(2, WAIT).await);
    }
    let to = nodes[1].identity.id();
    for _ in 0..10 {
        nodes[0]
            .plane
            .send(to, Class::Consensus, Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
    }
    recv_n(&mut nodes[1].inbox, 10).await;
    let mut trust = peer_trust(&ca, &nodes);
    trust.crls = vec![ca.crl(&[&nodes[2].identity.chain()[0]]).unwrap()];
    nodes[0].plane.update_trust(trust).unwrap();

    let read = || -> Vec<Row> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| match value {
                DebugValue::Counter(v) => Some((
                    key.key().name().to_owned(),
                    key.key()
                        .labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect(),
                    v,
                )),
                _ => None,
            })
            .collect()
    };
    eventually("revocation counted", || {
        nodes[0]
            .plane
            .stats()
            .refused(securesmart_transport::Refusal::Revoked)
            >= 1
    })
    .await;
    // One snapshot: the debugging recorder drains counters when read.
    let snap = read();
    eprintln!("{snap:?}");
    assert!(
        counter(
            &snap,
            "securesmart_transport_handshakes_total",
            &[("plane", "replica"), ("outcome", "accepted")]
        ) >= 6
    );
    assert_eq!(
        counter(
            &snap,
            "securesmart_transport_frames_total",
            &[("class", "consensus"), ("direction", "in")]
        ),
        10
    );
    assert_eq!(
        counter(
            &snap,
            "securesmart_transport_bytes_total",
            &[("class", "consensus"), ("direction", "in")]
        ),
        100
    );
    assert_eq!(
        counter(
            &snap,
            "securesmart_transport_handshakes_refused_total",
            &[("reason", "unknown_ca")]
        ),
        0
    );
}
