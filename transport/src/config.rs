//! Limits and anti-DoS settings, with named presets. Validated once, when a plane is built.

use std::time::Duration;

use crate::error::TransportError;
use crate::frame::MAX_FRAME_BYTES_LIMIT;

/// When to demand stateless address validation (a QUIC Retry, the modern SYN cookie) before
/// keeping any handshake state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryPolicy {
    /// Never send a Retry.
    Never,
    /// Send a Retry to every unvalidated address.
    Always,
    /// Send a Retry once more than this many handshakes are in progress.
    WhenPendingExceeds(usize),
}

/// Limits of one plane. Every field is a cap or budget; see the presets.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Limits {
    /// Largest frame payload accepted or sent.
    pub max_frame_bytes: usize,
    /// Connections at once, all sources together.
    pub max_connections: usize,
    /// Connections at once from one source IP (handshakes in progress count).
    pub max_connections_per_ip: usize,
    /// Handshakes per second per source IP (sustained).
    pub handshakes_per_ip_per_sec: u32,
    /// Handshake burst per source IP.
    pub handshake_burst_per_ip: u32,
    /// Address validation policy.
    pub retry: RetryPolicy,
    /// Messages per second each peer may send us (sustained); excess is dropped and counted.
    pub peer_messages_per_sec: u32,
    /// Message burst per peer.
    pub peer_message_burst: u32,
    /// Bytes per second each peer may send us (sustained); excess is dropped and counted.
    pub peer_bytes_per_sec: u32,
    /// Byte burst per peer; at least `max_frame_bytes`.
    pub peer_byte_burst: u32,
    /// Unidirectional streams a peer may have open at once (we use one per class).
    pub max_incoming_streams: u32,
    /// Outbound queue per peer for [`crate::Class::Consensus`], in messages.
    pub consensus_queue: usize,
    /// Outbound queue per peer for [`crate::Class::Bulk`], in messages.
    pub bulk_queue: usize,
    /// Outbound bytes queued per peer and class, the batch being written included; past it
    /// messages are dropped as for a full queue, so that a peer that stops reading pins at
    /// most this much (not the queue length times the frame size). At least `max_frame_bytes`.
    pub queue_bytes: usize,
    /// Inbound queue per class shared by all peers, in messages; when full, readers wait and
    /// QUIC flow control slows the senders (back-pressure, no drop).
    pub inbound_queue: usize,
    /// Connection idle timeout (also bounds a stalled handshake).
    pub idle_timeout: Duration,
    /// Keep-alive interval (must be below `idle_timeout`).
    pub keep_alive: Duration,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Largest reconnect delay (the delay doubles up to this, with jitter).
    pub reconnect_max: Duration,
    /// UDP socket send and receive buffer sizes.
    pub socket_buffer_bytes: usize,
    /// Per-stream receive window.
    pub stream_window_bytes: u32,
    /// Per-connection receive window.
    pub connection_window_bytes: u32,
}

impl Limits {
    /// Defaults for a production replica group: Retry once 64 handshakes are pending, 16 MiB
    /// frames, budgets sized for tens of thousands of ordered requests per second.
    pub fn production() -> Self {
        Self {
            max_frame_bytes: 16 * 1024 * 1024,
            max_connections: 4096,
            max_connections_per_ip: 64,
            handshakes_per_ip_per_sec: 20,
            handshake_burst_per_ip: 40,
            retry: RetryPolicy::WhenPendingExceeds(64),
            peer_messages_per_sec: 200_000,
            peer_message_burst: 400_000,
            peer_bytes_per_sec: 256 * 1024 * 1024,
            peer_byte_burst: 512 * 1024 * 1024,
            max_incoming_streams: 8,
            consensus_queue: 8192,
            bulk_queue: 256,
            queue_bytes: 64 * 1024 * 1024,
            inbound_queue: 8192,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            socket_buffer_bytes: 4 * 1024 * 1024,
            stream_window_bytes: 8 * 1024 * 1024,
            connection_window_bytes: 32 * 1024 * 1024,
        }
    }

    /// A cluster on one machine: production limits with faster reconnects.
    pub fn local() -> Self {
        Self {
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(1),
            ..Self::production()
        }
    }

    /// Tests: small frames and queues, quick timeouts, so limits are easy to hit.
    pub fn test() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_connections: 64,
            max_connections_per_ip: 32,
            handshakes_per_ip_per_sec: 100,
            handshake_burst_per_ip: 100,
            peer_byte_burst: 1024 * 1024,
            consensus_queue: 1024,
            bulk_queue: 64,
            queue_bytes: 1024 * 1024,
            inbound_queue: 1024,
            idle_timeout: Duration::from_secs(3),
            keep_alive: Duration::from_millis(500),
            reconnect_min: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(500),
            socket_buffer_bytes: 1024 * 1024,
            stream_window_bytes: 1024 * 1024,
            connection_window_bytes: 4 * 1024 * 1024,
            ..Self::production()
        }
    }

    /// Checks the values against each other.
    ///
    /// # Errors
    /// [`TransportError::Config`] naming the first bad field.
    pub fn validate(&self) -> Result<(), TransportError> {
        let bad = |what: &str| Err(TransportError::Config(what.to_owned()));
        if self.max_frame_bytes == 0 || self.max_frame_bytes > MAX_FRAME_BYTES_LIMIT {
            return bad("max_frame_bytes must be in 1..=256 MiB");
        }
        if (self.peer_byte_burst as usize) < self.max_frame_bytes {
            return bad("peer_byte_burst must be at least max_frame_bytes");
        }
        if self.queue_bytes < self.max_frame_bytes {
            return bad("queue_bytes must be at least max_frame_bytes");
        }
        let nonzero = [
            ("max_connections", self.max_connections),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("consensus_queue", self.consensus_queue),
            ("bulk_queue", self.bulk_queue),
            ("inbound_queue", self.inbound_queue),
            (
                "handshakes_per_ip_per_sec",
                self.handshakes_per_ip_per_sec as usize,
            ),
            (
                "handshake_burst_per_ip",
                self.handshake_burst_per_ip as usize,
            ),
            ("peer_messages_per_sec", self.peer_messages_per_sec as usize),
            ("peer_message_burst", self.peer_message_burst as usize),
            ("peer_bytes_per_sec", self.peer_bytes_per_sec as usize),
            ("max_incoming_streams", self.max_incoming_streams as usize),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return bad(&format!("{name} must be positive"));
        }
        if (self.max_incoming_streams as usize) < crate::frame::Class::ALL.len() {
            return bad("max_incoming_streams must allow one stream per class");
        }
        if self.keep_alive >= self.idle_timeout {
            return bad("keep_alive must be shorter than idle_timeout");
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return bad("need 0 < reconnect_min <= reconnect_max");
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::production()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_bad_values_are_named() {
        for l in [Limits::production(), Limits::local(), Limits::test()] {
            l.validate().unwrap();
        }
        let mut l = Limits::test();
        l.peer_byte_burst = 10;
        assert!(
            l.validate()
                .unwrap_err()
                .to_string()
                .contains("peer_byte_burst")
        );
        let mut l = Limits::test();
        l.bulk_queue = 0;
        assert!(l.validate().unwrap_err().to_string().contains("bulk_queue"));
        let mut l = Limits::test();
        l.keep_alive = l.idle_timeout;
        assert!(l.validate().is_err());
    }
}
