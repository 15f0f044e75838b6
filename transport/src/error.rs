//! Error types. Errors a remote peer caused ([`PeerError`], [`Refusal`]) are kept apart from local
//! ones ([`TransportError`], [`SendError`]), so callers can tell misbehaviour from misconfiguration.

use std::fmt;

/// A problem with a certificate, key or node id.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The certificate does not parse.
    #[error("bad certificate: {0}")]
    Certificate(String),
    /// The certificate names no role (no `urn:securesmart:role:*` URI SAN).
    #[error("certificate names no role")]
    NoRole,
    /// The certificate names more than one role.
    #[error("certificate names more than one role")]
    AmbiguousRole,
    /// The chain is empty.
    #[error("empty certificate chain")]
    EmptyChain,
    /// A PEM input does not hold the expected items.
    #[error("bad PEM: {0}")]
    Pem(String),
    /// A file could not be read.
    #[error("cannot read {0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// A framing violation on a stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A frame is longer than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced or attempted length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes left over.
        buffered: usize,
    },
    /// A stream opened with an unknown class tag.
    #[error("unknown message class {0}")]
    UnknownClass(u8),
}

/// Why a connection attempt or a live connection was refused. Each reason has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// The source IP is on the blocklist.
    BlockedIp,
    /// The source IP exceeded its handshake rate.
    HandshakeRate,
    /// The endpoint is at its total connection cap.
    TooManyConnections,
    /// The source IP is at its connection cap.
    TooManyConnectionsFromIp,
    /// The peer's node id is on the blocklist.
    BlockedNodeId,
    /// The certificate's role is wrong for this plane.
    WrongRole,
    /// The peer is not in the current peer set.
    NotInPeerSet,
    /// The dialled peer presented another node's certificate.
    UnexpectedPeer,
    /// The chain does not lead to the configured CA.
    UnknownCa,
    /// The certificate has expired.
    Expired,
    /// The certificate is not valid yet.
    NotYetValid,
    /// The certificate is on the current CRL.
    Revoked,
    /// No authoritative CRL says whether the certificate is revoked, or the CRL has expired.
    RevocationUnknown,
    /// The certificate is malformed or otherwise invalid.
    BadCertificate,
    /// A connection came from the side that should have accepted (the larger node id).
    WrongDialer,
    /// The TLS or QUIC handshake failed for another reason.
    HandshakeFailed,
}

impl Refusal {
    /// All reasons (index = position in counters).
    pub const ALL: [Refusal; 16] = [
        Refusal::BlockedIp,
        Refusal::HandshakeRate,
        Refusal::TooManyConnections,
        Refusal::TooManyConnectionsFromIp,
        Refusal::BlockedNodeId,
        Refusal::WrongRole,
        Refusal::NotInPeerSet,
        Refusal::UnexpectedPeer,
        Refusal::UnknownCa,
        Refusal::Expired,
        Refusal::NotYetValid,
        Refusal::Revoked,
        Refusal::RevocationUnknown,
        Refusal::BadCertificate,
        Refusal::WrongDialer,
        Refusal::HandshakeFailed,
    ];

    /// Label used in metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Refusal::BlockedIp => "blocked_ip",
            Refusal::HandshakeRate => "handshake_rate",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::TooManyConnectionsFromIp => "too_many_connections_from_ip",
            Refusal::BlockedNodeId => "blocked_node_id",
            Refusal::WrongRole => "wrong_role",
            Refusal::NotInPeerSet => "not_in_peer_set",
            Refusal::UnexpectedPeer => "unexpected_peer",
            Refusal::UnknownCa => "unknown_ca",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::Revoked => "revoked",
            Refusal::RevocationUnknown => "revocation_unknown",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::WrongDialer => "wrong_dialer",
            Refusal::HandshakeFailed => "handshake_failed",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A protocol violation by a connected peer; the connection is closed with [`PeerError::code`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// A framing violation.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer opened a bidirectional stream (only unidirectional ones are used).
    #[error("unexpected bidirectional stream")]
    UnexpectedStream,
}

impl PeerError {
    /// Label used in metrics and logs.
    pub const fn as_str(&self) -> &'static str {
        match self {
            PeerError::Frame(FrameError::TooLarge { .. }) => "frame_too_large",
            PeerError::Frame(FrameError::Truncated { .. }) => "frame_truncated",
            PeerError::Frame(FrameError::UnknownClass(_)) => "unknown_class",
            PeerError::UnexpectedStream => "unexpected_stream",
        }
    }

    /// The QUIC application close code sent to the peer.
    pub const fn code(&self) -> u32 {
        match self {
            PeerError::Frame(FrameError::TooLarge { .. }) => crate::close_code::FRAME_TOO_LARGE,
            PeerError::Frame(FrameError::Truncated { .. }) => crate::close_code::PROTOCOL,
            PeerError::Frame(FrameError::UnknownClass(_)) => crate::close_code::UNKNOWN_CLASS,
            PeerError::UnexpectedStream => crate::close_code::PROTOCOL,
        }
    }
}

/// Why a message was dropped. Each reason has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// The outbound queue for that peer and class was full.
    QueueFull,
    /// The connection failed while the message was being written.
    ConnectionLost,
    /// The peer exceeded its message-rate budget.
    RateLimitMessages,
    /// The peer exceeded its byte-rate budget.
    RateLimitBytes,
    /// The destination is not a known peer.
    UnknownPeer,
    /// The message is larger than the maximum frame size.
    TooLarge,
}

impl DropReason {
    /// All reasons (index = position in counters).
    pub const ALL: [DropReason; 6] = [
        DropReason::QueueFull,
        DropReason::ConnectionLost,
        DropReason::RateLimitMessages,
        DropReason::RateLimitBytes,
        DropReason::UnknownPeer,
        DropReason::TooLarge,
    ];

    /// Label used in metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::ConnectionLost => "connection_lost",
            DropReason::RateLimitMessages => "rate_limit_messages",
            DropReason::RateLimitBytes => "rate_limit_bytes",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::TooLarge => "too_large",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// A message that could not be queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The queue for that peer and class is full (the message was dropped and counted).
    #[error("outbound queue full")]
    QueueFull,
    /// No such peer.
    #[error("unknown peer")]
    UnknownPeer,
    /// The message exceeds the maximum frame size.
    #[error("message of {len} bytes exceeds the maximum frame size {max}")]
    TooLarge {
        /// Message length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The plane has shut down.
    #[error("transport shut down")]
    Closed,
}

/// A local error: configuration, sockets, TLS setup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A certificate, key or id problem.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A trust anchor or CRL could not be used.
    #[error("invalid trust configuration: {0}")]
    Trust(String),
    /// TLS configuration failed.
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    /// Socket setup failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}
