//! Counters of one plane. Every event is counted twice: in an atomic readable through
//! `Plane::stats` (what tests and embedders assert on) and in the `metrics` facade (what
//! Prometheus scrapes).
//!
//! Metric names (all with label `plane`):
//! - `securesmart_transport_handshakes_total{outcome="accepted"}`
//! - `securesmart_transport_handshakes_refused_total{reason}`
//! - `securesmart_transport_retries_total`
//! - `securesmart_transport_frames_total{class, direction}` and `..._bytes_total{class, direction}`
//! - `securesmart_transport_drops_total{reason}`
//! - `securesmart_transport_peer_errors_total{kind}`
//! - `securesmart_transport_connections` (gauge), `securesmart_transport_rtt_seconds` (histogram)
//!
//! Handles are registered when the plane is built: install the metrics recorder first.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use metrics::{Counter, Gauge, Histogram};

use crate::error::{DropReason, PeerError, Refusal};
use crate::frame::Class;

struct ClassCounters {
    frames_in: Counter,
    bytes_in: Counter,
    frames_out: Counter,
    bytes_out: Counter,
}

/// Live counters of a plane.
pub(crate) struct PlaneStats {
    accepted: AtomicU64,
    retries: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    drops: [AtomicU64; DropReason::ALL.len()],
    peer_errors: AtomicU64,
    frames_in: [AtomicU64; 2],
    bytes_in: [AtomicU64; 2],
    frames_out: [AtomicU64; 2],
    bytes_out: [AtomicU64; 2],
    m_accepted: Counter,
    m_retries: Counter,
    m_refused: Vec<Counter>,
    m_drops: Vec<Counter>,
    m_class: Vec<ClassCounters>,
    plane: &'static str,
    pub(crate) connections: Gauge,
    pub(crate) rtt: Histogram,
}

impl std::fmt::Debug for PlaneStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaneStats")
            .field("plane", &self.plane)
            .finish_non_exhaustive()
    }
}

fn bump(slot: Option<&AtomicU64>, n: u64) {
    if let Some(a) = slot {
        a.fetch_add(n, Relaxed);
    }
}

fn read(slot: Option<&AtomicU64>) -> u64 {
    slot.map_or(0, |a| a.load(Relaxed))
}

const fn class_index(class: Class) -> usize {
    match class {
        Class::Consensus => 0,
        Class::Bulk => 1,
    }
}

impl PlaneStats {
    pub(crate) fn new(plane: &'static str) -> Self {
        let p = ("plane", plane);
        Self {
            accepted: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            refused: Default::default(),
            drops: Default::default(),
            peer_errors: AtomicU64::new(0),
            frames_in: Default::default(),
            bytes_in: Default::default(),
            frames_out: Default::default(),
            bytes_out: Default::default(),
            m_accepted: metrics::counter!("securesmart_transport_handshakes_total", p.0 => p.1, "outcome" => "accepted"),
            m_retries: metrics::counter!("securesmart_transport_retries_total", p.0 => p.1),
            m_refused: Refusal::ALL
                .iter()
                .map(|r| metrics::counter!("securesmart_transport_handshakes_refused_total", p.0 => p.1, "reason" => r.as_str()))
                .collect(),
            m_drops: DropReason::ALL
                .iter()
                .map(|r| metrics::counter!("securesmart_transport_drops_total", p.0 => p.1, "reason" => r.as_str()))
                .collect(),
            m_class: Class::ALL
                .iter()
                .map(|c| {
                    let c = c.as_str();
                    ClassCounters {
                        frames_in: metrics::counter!("securesmart_transport_frames_total", p.0 => p.1, "class" => c, "direction" => "in"),
                        bytes_in: metrics::counter!("securesmart_transport_bytes_total", p.0 => p.1, "class" => c, "direction" => "in"),
                        frames_out: metrics::counter!("securesmart_transport_frames_total", p.0 => p.1, "class" => c, "direction" => "out"),
                        bytes_out: metrics::counter!("securesmart_transport_bytes_total", p.0 => p.1, "class" => c, "direction" => "out"),
                    }
                })
                .collect(),
            plane,
            connections: metrics::gauge!("securesmart_transport_connections", p.0 => p.1),
            rtt: metrics::histogram!("securesmart_transport_rtt_seconds", p.0 => p.1),
        }
    }

    pub(crate) fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
        self.m_accepted.increment(1);
    }

    pub(crate) fn retry_sent(&self) {
        self.retries.fetch_add(1, Relaxed);
        self.m_retries.increment(1);
    }

    pub(crate) fn refused(&self, reason: Refusal) {
        bump(self.refused.get(reason.index()), 1);
        if let Some(c) = self.m_refused.get(reason.index()) {
            c.increment(1);
        }
    }

    pub(crate) fn dropped(&self, reason: DropReason, n: u64) {
        bump(self.drops.get(reason.index()), n);
        if let Some(c) = self.m_drops.get(reason.index()) {
            c.increment(n);
        }
    }

    pub(crate) fn peer_error(&self, e: &PeerError) {
        self.peer_errors.fetch_add(1, Relaxed);
        metrics::counter!("securesmart_transport_peer_errors_total", "plane" => self.plane, "kind" => e.as_str())
            .increment(1);
    }

    pub(crate) fn frames_in(&self, class: Class, frames: u64, bytes: u64) {
        let i = class_index(class);
        bump(self.frames_in.get(i), frames);
        bump(self.bytes_in.get(i), bytes);
        if let Some(c) = self.m_class.get(i) {
            c.frames_in.increment(frames);
            c.bytes_in.increment(bytes);
        }
    }

    pub(crate) fn frames_out(&self, class: Class, frames: u64, bytes: u64) {
        let i = class_index(class);
        bump(self.frames_out.get(i), frames);
        bump(self.bytes_out.get(i), bytes);
        if let Some(c) = self.m_class.get(i) {
            c.frames_out.increment(frames);
            c.bytes_out.increment(bytes);
        }
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            handshakes_accepted: self.accepted.load(Relaxed),
            retries_sent: self.retries.load(Relaxed),
            refused: Refusal::ALL.map(|r| read(self.refused.get(r.index()))),
            drops: DropReason::ALL.map(|r| read(self.drops.get(r.index()))),
            peer_errors: self.peer_errors.load(Relaxed),
            frames_in: Class::ALL.map(|c| read(self.frames_in.get(class_index(c)))),
            bytes_in: Class::ALL.map(|c| read(self.bytes_in.get(class_index(c)))),
            frames_out: Class::ALL.map(|c| read(self.frames_out.get(class_index(c)))),
            bytes_out: Class::ALL.map(|c| read(self.bytes_out.get(class_index(c)))),
        }
    }
}

/// A copy of a plane's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Handshakes that completed and were admitted.
    pub handshakes_accepted: u64,
    /// Retry packets sent (address validation).
    pub retries_sent: u64,
    refused: [u64; Refusal::ALL.len()],
    drops: [u64; DropReason::ALL.len()],
    /// Protocol violations by connected peers (each closed that connection).
    pub peer_errors: u64,
    frames_in: [u64; 2],
    bytes_in: [u64; 2],
    frames_out: [u64; 2],
    bytes_out: [u64; 2],
}

impl StatsSnapshot {
    /// Refusals for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused.get(reason.index()).copied().unwrap_or(0)
    }

    /// All refusals.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().sum()
    }

    /// Dropped messages for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.index()).copied().unwrap_or(0)
    }

    /// Frames received in `class` (delivered or dropped by a rate limit).
    pub fn frames_in(&self, class: Class) -> u64 {
        self.frames_in.get(class_index(class)).copied().unwrap_or(0)
    }

    /// Payload bytes received in `class`.
    pub fn bytes_in(&self, class: Class) -> u64 {
        self.bytes_in.get(class_index(class)).copied().unwrap_or(0)
    }

    /// Frames written in `class`.
    pub fn frames_out(&self, class: Class) -> u64 {
        self.frames_out
            .get(class_index(class))
            .copied()
            .unwrap_or(0)
    }

    /// Payload bytes written in `class`.
    pub fn bytes_out(&self, class: Class) -> u64 {
        self.bytes_out.get(class_index(class)).copied().unwrap_or(0)
    }
}
