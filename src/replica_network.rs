//! The consensus [`Network`] over the real transport: a replica [`Plane`] and its [`Inbox`].
//!
//! This glue lives above both crates so that `transport` never depends on `consensus` (other
//! engines import `transport` alone). Consensus messages travel on the consensus class; a
//! message larger than [`BULK_ABOVE`] (a state transfer, a new view carrying many batches)
//! goes on the bulk class so that it does not hold up agreement traffic behind it. Sending is
//! best effort, as the trait asks: a full per-peer queue drops the message (the transport
//! counts it) and the protocol's retransmissions recover.

use bytes::Bytes;
use securesmart_consensus::driver::Network;
use securesmart_transport::{Class, Inbox, NodeId, Plane};

/// Messages above this size go on the bulk class.
pub const BULK_ABOVE: usize = 64 * 1024;

/// A replica plane as the consensus network.
#[derive(Debug)]
pub struct ReplicaNetwork {
    plane: Plane,
    inbox: Inbox,
}

impl ReplicaNetwork {
    /// Consensus over `plane`, receiving from `inbox`.
    pub fn new(plane: Plane, inbox: Inbox) -> Self {
        Self { plane, inbox }
    }

    /// The plane (for trust updates, stats and shutdown).
    pub fn plane(&self) -> &Plane {
        &self.plane
    }
}

fn class_of(message: &Bytes) -> Class {
    if message.len() > BULK_ABOVE {
        Class::Bulk
    } else {
        Class::Consensus
    }
}

impl Network for ReplicaNetwork {
    fn send(&self, to: NodeId, message: Bytes) {
        if let Err(e) = self.plane.try_send(to, class_of(&message), message) {
            tracing::debug!(peer = ?to, error = %e, "consensus message not sent");
        }
    }

    fn broadcast(&self, message: Bytes) {
        self.plane.broadcast(class_of(&message), &message);
    }

    async fn recv(&mut self) -> Option<(NodeId, Bytes)> {
        self.inbox.recv().await.map(|m| (m.from, m.payload))
    }

    fn try_recv(&mut self) -> Option<(NodeId, Bytes)> {
        self.inbox.try_recv().map(|m| (m.from, m.payload))
    }
}
