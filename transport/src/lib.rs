//! Authenticated QUIC channels between the nodes of a BFT system.
//!
//! This crate moves opaque messages between nodes that prove who they are. It knows nothing of
//! consensus or membership policy: another BFT engine can import it alone. It never panics on
//! anything a peer sends; bad input gets a typed error, a counter and a log line, and costs the
//! offender at most its own connection.
//!
//! # What it does
//! - **Identity.** Each node has an Ed25519 key and an X.509 certificate; its [`NodeId`] is the
//!   BLAKE3 hash of the certificate's SubjectPublicKeyInfo. The [`Role`] (replica or client) is a
//!   URI SAN `urn:securesmart:role:{replica,client}`.
//! - **Planes.** A [`Plane`] is one QUIC endpoint (quinn on a socket2 UDP socket), TLS 1.3 only,
//!   mutual authentication on every connection. A replica runs two: the replica plane
//!   ([`Plane::replica`], ALPN [`ALPN_REPLICA`]) and the client plane ([`Plane::client_listener`],
//!   own port, ALPN [`ALPN_CLIENT`]), so a client flood has its own socket, queues and limits and
//!   cannot starve agreement. Clients use [`Plane::client`].
//! - **Admission.** A peer is accepted only if its chain verifies to the configured CA, it is
//!   not on the current CRL (with a CRL loaded, unknown status is refused and an expired CRL fails
//!   closed), its role fits the plane (the replica plane takes replicas; a client plane takes
//!   clients, and replicas acting as clients, each [`Message`] naming the sender's role), its
//!   node id is in the peer set (replica plane) and not
//!   blocked, and its IP is not blocked. The [`TrustConfig`] can be replaced at runtime with
//!   [`Plane::update_trust`]: verifiers read it through one swappable handle, and live
//!   connections that no longer qualify are closed.
//! - **One connection per pair.** On the replica plane the node with the smaller node id dials
//!   and the other accepts (a connection dialled by the larger id is refused as
//!   [`Refusal::WrongDialer`]), so simultaneous dials cannot happen and both sides agree. A new
//!   connection from the same dialler replaces the old one (the peer restarted). The dialler
//!   reconnects with exponential back-off and jitter. Because TLS 1.3 completes the dialler's
//!   handshake before the acceptor has checked the dialler's certificate, the acceptor confirms
//!   admission on a one-byte stream and the dialler treats the connection as live only then, so
//!   nothing is sent into a connection the other side refuses.
//! - **Renewal in place.** [`Plane::renew_identity`] presents a renewed certificate of the
//!   same key from the next handshake on, and replaces each live connection by one made with
//!   it before the old one closes (make before break: no gap on the link, its queues stay).
//!   The renewing side dials even where it is the larger id; the peer takes such a connection
//!   only while it holds a live one whose certificate of that peer started earlier, so a
//!   faulty peer with several certificates can churn only its own links (as it could by
//!   going silent), not those between correct nodes. When both ends of a link renew at once,
//!   each may keep another connection; both close and the dialler reconnects (a short gap).
//! - **Messages.** [`Plane::try_send`], [`Plane::send`], [`Plane::broadcast`], and an [`Inbox`]
//!   of [`Message`]s. Each [`Class`] has its own unidirectional QUIC stream per connection,
//!   consensus at a higher stream priority than bulk, so bulk transfers never delay consensus;
//!   order holds per peer and class. Frames are a 4-byte length and the payload, at most
//!   [`Limits::max_frame_bytes`].
//! - **Anti-DoS**, cheapest check first: IP blocklist (ignored silently), stateless address
//!   validation with QUIC Retry ([`RetryPolicy`]), handshake rate per source IP (governor, keyed),
//!   caps on total and per-IP connections, then the certificate checks; after the handshake,
//!   caps on streams (QUIC flow control), frame size, and per-peer message and byte budgets.
//!
//! # Queues, drops and back-pressure
//! Every queue is bounded. Outbound, each peer has one queue per class
//! ([`Limits::consensus_queue`], [`Limits::bulk_queue`] messages, and [`Limits::queue_bytes`]
//! bytes, the batch its writer holds included): [`Plane::try_send`] and [`Plane::broadcast`] drop
//! the message when it is full ([`DropReason::QueueFull`]), so a slow or silent peer costs at most
//! its queue's bytes, not its length times the frame size; [`Plane::send`] waits while the queue
//! is full in messages, and fails past its bytes. Messages being written
//! when a connection fails are dropped ([`DropReason::ConnectionLost`]); BFT protocols retransmit.
//! Inbound, each class has one queue ([`Limits::inbound_queue`]); when it is full the readers wait
//! and QUIC flow control slows the senders (no drop). Messages over a peer's rate budget are
//! dropped ([`DropReason::RateLimitMessages`], [`DropReason::RateLimitBytes`]). Every drop is
//! counted in [`StatsSnapshot`] and in `securesmart_transport_drops_total`.
//!
//! # Example
//! ```no_run
//! use bytes::Bytes;
//! use securesmart_transport::{pki::DevCa, Class, Limits, Plane, PlaneConfig, Role, TrustConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = DevCa::new("example CA")?;
//! let (a, b) = (ca.issue_role("a", Role::Replica)?, ca.issue_role("b", Role::Replica)?);
//! let trust = TrustConfig::new(ca.certificate());
//! let (plane_a, _inbox_a) = Plane::replica(PlaneConfig::new(a.clone(), "127.0.0.1:0".parse()?, trust.clone())).await?;
//! let (plane_b, mut inbox_b) = Plane::replica(PlaneConfig::new(b.clone(), "127.0.0.1:0".parse()?, trust.clone())).await?;
//! // Each side learns the other's address through its peer set.
//! plane_a.update_trust(trust.clone().with_peer(b.id(), plane_b.local_addr()?))?;
//! plane_b.update_trust(trust.with_peer(a.id(), plane_a.local_addr()?))?;
//! plane_a.send(b.id(), Class::Consensus, Bytes::from_static(b"hello")).await?;
//! let msg = inbox_b.recv().await.ok_or("closed")?;
//! assert_eq!((msg.from, &msg.payload[..]), (a.id(), &b"hello"[..]));
//! # Ok(()) }
//! ```
//!
//! Install the `metrics` recorder before building planes: counter handles are registered then.

#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod config;
mod error;
mod frame;
mod identity;
pub mod pki;
mod plane;
mod stats;
mod trust;

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;

pub use config::{Limits, RetryPolicy};
pub use error::{
    DropReason, FrameError, IdentityError, PeerError, Refusal, SendError, TransportError,
};
pub use frame::{
    Class, FRAME_HEADER_BYTES, FrameDecoder, MAX_FRAME_BYTES_LIMIT, encode_frame, frame_header,
};
pub use identity::{
    CertInfo, Identity, ROLE_URI_CLIENT, ROLE_URI_REPLICA, Role, SERVICE_URI_ENROLLMENT,
    ed25519_public_key, is_enrollment_service, node_id,
};
pub use plane::{Inbox, Message, Plane, PlaneConfig};
/// Node ids live in the foundation crate (an ordering engine names nodes without this
/// crate); re-exported here because every plane speaks of them.
pub use securesmart_base::NodeId;
pub use stats::StatsSnapshot;
pub use trust::{TrustConfig, TrustState};

/// ALPN of the replica plane.
pub const ALPN_REPLICA: &[u8] = b"securesmart-replica/1";
/// ALPN of the client plane.
pub const ALPN_CLIENT: &[u8] = b"securesmart-client/1";

/// QUIC application close codes this crate sends.
pub mod close_code {
    /// The plane shut down.
    pub const SHUTDOWN: u32 = 0;
    /// A newer connection to the same peer replaced this one.
    pub const REPLACED: u32 = 1;
    /// The peer is (no longer) admitted: revoked, blocked, outside the peer set, wrong role.
    pub const NOT_ADMITTED: u32 = 2;
    /// The peer sent a frame over the size limit.
    pub const FRAME_TOO_LARGE: u32 = 3;
    /// The peer opened a stream with an unknown class tag.
    pub const UNKNOWN_CLASS: u32 = 4;
    /// Another protocol violation (truncated frame, unexpected stream).
    pub const PROTOCOL: u32 = 5;
    /// The peer dialled although the other side of the pair is the dialler.
    pub const WRONG_DIALER: u32 = 6;
}
