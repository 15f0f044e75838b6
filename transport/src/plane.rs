//! A [`Plane`]: one QUIC endpoint with its connections, queues, limits and trust state.
//!
//! Three kinds share this code: the replica plane ([`Plane::replica`]), a replica's client plane
//! ([`Plane::client_listener`]) and a client ([`Plane::client`]). See the crate doc for the
//! connection rules and the drop and back-pressure policy.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Incoming, VarInt};
use rustls::pki_types::{CertificateDer, UnixTime};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::close_code;
use crate::config::{Limits, RetryPolicy};
use crate::error::{DropReason, PeerError, Refusal, SendError, TransportError};
use crate::frame::{Class, FrameDecoder, frame_header};
use crate::identity::{CertInfo, Identity};
use crate::stats::{PlaneStats, StatsSnapshot};
use crate::trust::{PeerVerifier, PlaneKind, TrustConfig, TrustHandle, TrustState};
use securesmart_base::NodeId;

/// TLS server name sent when dialling; peers are identified by node id, not by this name.
const SERVER_NAME: &str = "securesmart";
/// Largest chunk read from a stream at once.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// A writer takes up to this many queued consensus messages per write.
const WRITE_BATCH_CONSENSUS: usize = 1024;
/// Below this many messages per write, a writer yields once before draining its queue again.
const SMALL_BATCH: u64 = 32;
/// A writer takes up to this many queued bulk messages per write.
const WRITE_BATCH_BULK: usize = 16;
/// Messages up to this size are copied into one coalesced buffer; larger ones are sent as is.
const COPY_THRESHOLD_BYTES: usize = 4 * 1024;
/// How often idle rate-limiter state is pruned.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(30);
/// How often a connection's RTT is sampled into the histogram.
const RTT_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// How long [`Plane::shutdown`] waits for connections to close cleanly.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What a plane needs: who it is, where it listens, whom it trusts, and its limits.
#[derive(Clone, Debug)]
pub struct PlaneConfig {
    /// This node's certificate chain and key.
    pub identity: Identity,
    /// Local UDP address (port 0 picks one).
    pub listen: SocketAddr,
    /// CA, CRLs, peer set and blocklists.
    pub trust: TrustConfig,
    /// Caps and budgets.
    pub limits: Limits,
    /// The application protocol (ALPN) in place of the plane's default ([`crate::ALPN_REPLICA`],
    /// [`crate::ALPN_CLIENT`]): planes with different ones refuse each other's handshakes.
    pub alpn: Option<Vec<u8>>,
}

impl PlaneConfig {
    /// A configuration with [`Limits::production`] and the plane's default ALPN.
    pub fn new(identity: Identity, listen: SocketAddr, trust: TrustConfig) -> Self {
        Self {
            identity,
            listen,
            trust,
            limits: Limits::production(),
            alpn: None,
        }
    }

    /// Replaces the ALPN (builder style; see [`PlaneConfig::alpn`]).
    #[must_use]
    pub fn with_alpn(mut self, alpn: &[u8]) -> Self {
        self.alpn = Some(alpn.to_vec());
        self
    }

    /// Replaces the limits (builder style).
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// A received message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The authenticated sender.
    pub from: NodeId,
    /// The sender's role, from its certificate (on a client plane: a client, or a replica
    /// acting as one).
    pub role: crate::identity::Role,
    /// The class (stream) it arrived on.
    pub class: Class,
    /// The payload, as received (no copy after the frame decoder).
    pub payload: Bytes,
}

/// The inbound side of a plane: messages from all peers, consensus first (bulk waits while
/// consensus messages are queued).
#[derive(Debug)]
pub struct Inbox {
    consensus: mpsc::Receiver<Message>,
    bulk: mpsc::Receiver<Message>,
    consensus_done: bool,
    bulk_done: bool,
}

impl Inbox {
    /// The next message; consensus messages are preferred over bulk ones when both wait.
    /// `None` once the plane has shut down (or every clone was dropped) and both queues are
    /// drained.
    pub async fn recv(&mut self) -> Option<Message> {
        tokio::select! {
            biased;
            Some(m) = self.consensus.recv() => Some(m),
            Some(m) = self.bulk.recv() => Some(m),
            else => None,
        }
    }

    /// Waits for messages and appends up to `limit` of them to `buf`, all of one class,
    /// consensus first; returns how many (0 once the plane has shut down and the queues are
    /// drained, or when `limit` is 0). The fast way to drain a busy inbox.
    pub async fn recv_many(&mut self, buf: &mut Vec<Message>, limit: usize) -> usize {
        if limit == 0 {
            return 0;
        }
        std::future::poll_fn(|cx| {
            use std::task::Poll;
            for (rx, done) in [
                (&mut self.consensus, &mut self.consensus_done),
                (&mut self.bulk, &mut self.bulk_done),
            ] {
                if *done {
                    continue;
                }
                match rx.poll_recv_many(cx, buf, limit) {
                    Poll::Ready(0) => *done = true,
                    Poll::Ready(k) => return Poll::Ready(k),
                    Poll::Pending => {}
                }
            }
            if self.consensus_done && self.bulk_done {
                Poll::Ready(0)
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// A message if one is waiting, consensus first.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.consensus
            .try_recv()
            .ok()
            .or_else(|| self.bulk.try_recv().ok())
    }
}

/// One QUIC endpoint with its connections (see the module doc). Cheap to clone; the plane
/// shuts down when [`Plane::shutdown`] is called or the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Plane {
    handle: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.stop();
    }
}

struct PeerLink {
    id: NodeId,
    consensus: mpsc::Sender<Bytes>,
    bulk: mpsc::Sender<Bytes>,
    /// Bytes queued per class (consensus, bulk), including the batch its writer holds.
    queued: [Arc<AtomicUsize>; 2],
    conn: watch::Sender<Option<Connection>>,
}

impl PeerLink {
    fn queue(&self, class: Class) -> &mpsc::Sender<Bytes> {
        match class {
            Class::Consensus => &self.consensus,
            Class::Bulk => &self.bulk,
        }
    }

    fn queued(class: Class) -> usize {
        match class {
            Class::Consensus => 0,
            Class::Bulk => 1,
        }
    }

    /// Counts `len` more bytes queued for `class`, unless that would pass `max`.
    fn reserve(&self, class: Class, len: usize, max: usize) -> bool {
        let Some(queued) = self.queued.get(Self::queued(class)) else {
            return false;
        };
        queued
            .fetch_update(Relaxed, Relaxed, |q| {
                q.checked_add(len).filter(|n| *n <= max)
            })
            .is_ok()
    }

    /// Takes back bytes counted by [`PeerLink::reserve`].
    fn release(&self, class: Class, len: usize) {
        if let Some(queued) = self.queued.get(Self::queued(class)) {
            let _ = queued.fetch_update(Relaxed, Relaxed, |q| Some(q.saturating_sub(len)));
        }
    }

    fn live(&self) -> Option<Connection> {
        self.conn
            .borrow()
            .as_ref()
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }
}

/// Bytes counted against a link's queue until the message is queued (see [`Plane::send`]).
struct Reservation<'a> {
    link: &'a PeerLink,
    class: Class,
    len: usize,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.link.release(self.class, self.len);
    }
}

struct Shared {
    kind: PlaneKind,
    /// The application protocol of its handshakes.
    alpn: Vec<u8>,
    id: NodeId,
    role: crate::identity::Role,
    /// The certificate and key presented in handshakes, both ways (see [`Plane::renew_identity`]).
    cert: Arc<CurrentCert>,
    endpoint: quinn::Endpoint,
    trust: TrustHandle,
    limits: Limits,
    stats: Arc<PlaneStats>,
    transport: Arc<quinn::TransportConfig>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    links: RwLock<HashMap<NodeId, Arc<PeerLink>>>,
    /// Inbound queues (consensus, bulk); taken on shutdown so the [`Inbox`] ends once drained.
    inbound: Mutex<Option<(mpsc::Sender<Message>, mpsc::Sender<Message>)>>,
    handshake_limiter: DefaultKeyedRateLimiter<IpAddr>,
    message_limiter: DefaultKeyedRateLimiter<NodeId>,
    byte_limiter: DefaultKeyedRateLimiter<NodeId>,
    inbound_slots: Mutex<HashMap<IpAddr, usize>>,
    inbound_total: AtomicUsize,
    pending_handshakes: AtomicUsize,
    shutdown: watch::Sender<bool>,
    /// Set with `shutdown`; read on every send (cheaper than the watch).
    stopping: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plane")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The certificate a plane presents, replaced in place when the node's certificate is
/// renewed: new handshakes (dialled or accepted) present the new one.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<rustls::sign::CertifiedKey>>);

impl CurrentCert {
    fn of(
        identity: &Identity,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<rustls::sign::CertifiedKey, TransportError> {
        Ok(rustls::sign::CertifiedKey::from_der(
            identity.chain().to_vec(),
            identity.private_key(),
            provider,
        )?)
    }

    fn get(&self) -> Arc<rustls::sign::CertifiedKey> {
        match self.0.read() {
            Ok(c) => Arc::clone(&c),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    fn set(&self, key: rustls::sign::CertifiedKey) {
        match self.0.write() {
            Ok(mut c) => *c = Arc::new(key),
            Err(p) => *p.into_inner() = Arc::new(key),
        }
    }
}

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.get())
    }
}

impl rustls::client::ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn nonzero(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN)
}

fn quota(per_sec: u32, burst: u32) -> Quota {
    Quota::per_second(nonzero(per_sec)).allow_burst(nonzero(burst))
}

fn transport_config(limits: &Limits) -> Result<quinn::TransportConfig, TransportError> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(VarInt::from_u32(limits.max_incoming_streams))
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(limits.idle_timeout)
                .map_err(|_| TransportError::Config("idle_timeout too large".into()))?,
        ))
        .keep_alive_interval(Some(limits.keep_alive))
        .stream_receive_window(VarInt::from_u32(limits.stream_window_bytes))
        .receive_window(VarInt::from_u32(limits.connection_window_bytes))
        .send_window(u64::from(limits.connection_window_bytes))
        .datagram_receive_buffer_size(None);
    Ok(t)
}

/// A UDP socket with the configured buffer sizes. `SO_REUSEADDR` is deliberately left off: UDP
/// has no TIME_WAIT to wait out, and on Linux the option would let another process bind the same
/// port and receive this node's datagrams.
fn bind_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual stack where the OS allows it; not fatal where it does not.
        let _ = socket.set_only_v6(false);
    }
    // The kernel may cap these (net.core.rmem_max); smaller buffers still work.
    if let Err(e) = socket.set_recv_buffer_size(buffer) {
        tracing::debug!(%e, "receive buffer size not applied");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer) {
        tracing::debug!(%e, "send buffer size not applied");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

impl Plane {
    /// Starts a replica-plane endpoint: accepts replicas of the peer set and dials those with a
    /// larger node id.
    ///
    /// # Errors
    /// [`TransportError`] for an invalid configuration, an identity whose role is not replica,
    /// or a socket that cannot be bound.
    pub async fn replica(config: PlaneConfig) -> Result<(Plane, Inbox), TransportError> {
        Self::build(PlaneKind::Replica, config)
    }

    /// Starts a replica's client-plane endpoint (own port and ALPN): accepts any client whose
    /// certificate the CA vouches for (role client, not revoked, not blocked); never dials.
    ///
    /// # Errors
    /// As [`Plane::replica`].
    pub async fn client_listener(config: PlaneConfig) -> Result<(Plane, Inbox), TransportError> {
        Self::build(PlaneKind::ClientListener, config)
    }

    /// Starts a client: dials the client planes of the replicas in the peer set; never accepts.
    ///
    /// # Errors
    /// As [`Plane::replica`], with an identity of role client.
    pub async fn client(config: PlaneConfig) -> Result<(Plane, Inbox), TransportError> {
        Self::build(PlaneKind::Client, config)
    }

    fn build(kind: PlaneKind, config: PlaneConfig) -> Result<(Plane, Inbox), TransportError> {
        let PlaneConfig {
            identity,
            listen,
            trust,
            limits,
            alpn,
        } = config;
        let alpn = alpn.unwrap_or_else(|| kind.alpn().to_vec());
        limits.validate()?;
        if !kind.runs_as(identity.role()) {
            return Err(TransportError::Config(format!(
                "an identity of role {} cannot run a {} plane",
                identity.role(),
                kind.as_str()
            )));
        }
        let trust = TrustHandle::new(TrustState::new(trust)?);
        let stats = Arc::new(PlaneStats::new(kind.as_str()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = Arc::new(CurrentCert(RwLock::new(Arc::new(CurrentCert::of(
            &identity, &provider,
        )?))));
        let transport = Arc::new(transport_config(&limits)?);
        let server_config = if kind.we_accept() {
            let verifier = Arc::new(PeerVerifier::new(
                trust.clone(),
                kind,
                None,
                Arc::clone(&stats),
            ));
            let mut tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(
                    Arc::clone(&cert) as Arc<dyn rustls::server::ResolvesServerCert>
                );
            tls.alpn_protocols = vec![alpn.clone()];
            let quic = QuicServerConfig::try_from(Arc::new(tls))
                .map_err(|e| TransportError::Config(e.to_string()))?;
            let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
            server
                .transport_config(Arc::clone(&transport))
                .migration(false)
                .max_incoming(limits.max_connections.saturating_mul(2));
            Some(server)
        } else {
            None
        };
        let socket = bind_socket(listen, limits.socket_buffer_bytes)?;
        let endpoint_config = match identity.ed25519_seed() {
            Some(seed) => {
                let reset = ResetKey::derive(kind, &seed);
                // Connection ids carry a check value under a key derived the same way, so that
                // the restarted node recognizes its predecessor's ids and answers them with a
                // stateless reset (quinn drops packets whose id fails the check).
                let cid_key = reset.cid_key();
                let mut c = quinn::EndpointConfig::new(Arc::new(reset));
                c.cid_generator(move || {
                    Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
                });
                c
            }
            None => quinn::EndpointConfig::default(),
        };
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            server_config,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let (inbound_consensus, consensus) = mpsc::channel(limits.inbound_queue);
        let (inbound_bulk, bulk) = mpsc::channel(limits.inbound_queue);
        let shared = Arc::new(Shared {
            kind,
            alpn,
            id: identity.id(),
            role: identity.role(),
            cert,
            endpoint,
            trust,
            handshake_limiter: RateLimiter::keyed(quota(
                limits.handshakes_per_ip_per_sec,
                limits.handshake_burst_per_ip,
            )),
            message_limiter: RateLimiter::keyed(quota(
                limits.peer_messages_per_sec,
                limits.peer_message_burst,
            )),
            byte_limiter: RateLimiter::keyed(quota(
                limits.peer_bytes_per_sec,
                limits.peer_byte_burst,
            )),
            limits,
            stats,
            transport,
            provider,
            links: RwLock::new(HashMap::new()),
            inbound: Mutex::new(Some((inbound_consensus, inbound_bulk))),
            inbound_slots: Mutex::new(HashMap::new()),
            inbound_total: AtomicUsize::new(0),
            pending_handshakes: AtomicUsize::new(0),
            shutdown: watch::Sender::new(false),
            stopping: AtomicBool::new(false),
        });
        shared.reconcile();
        if kind.we_accept() {
            tokio::spawn(Arc::clone(&shared).accept_loop());
        }
        tokio::spawn(Arc::clone(&shared).housekeeping());
        tracing::info!(
            plane = kind.as_str(),
            id = %shared.id,
            addr = ?shared.endpoint.local_addr().ok(),
            "plane started"
        );
        let plane = Plane {
            handle: Arc::new(Handle { shared }),
        };
        Ok((
            plane,
            Inbox {
                consensus,
                bulk,
                consensus_done: false,
                bulk_done: false,
            },
        ))
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.shared().id
    }

    /// The bound UDP address.
    ///
    /// # Errors
    /// The socket's error if the address cannot be read.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shared().endpoint.local_addr()
    }

    /// Queues `msg` for `to` without waiting. When the queue for that peer and class is full the
    /// message is dropped and counted ([`DropReason::QueueFull`]): a slow or silent peer never
    /// blocks the caller nor grows memory.
    ///
    /// # Errors
    /// [`SendError`] saying why the message was not queued.
    pub fn try_send(&self, to: NodeId, class: Class, msg: Bytes) -> Result<(), SendError> {
        let shared = self.shared();
        let len = msg.len();
        let link = shared.reserve_for_send(to, class, len)?;
        link.queue(class).try_send(msg).map_err(|e| {
            link.release(class, len);
            match e {
                mpsc::error::TrySendError::Full(_) => {
                    shared.stats.dropped(DropReason::QueueFull, 1);
                    SendError::QueueFull
                }
                mpsc::error::TrySendError::Closed(_) => SendError::Closed,
            }
        })
    }

    /// Queues `msg` for `to`, waiting while the queue is full in messages (back-pressure for
    /// bulk senders). Past [`Limits::queue_bytes`] it does not wait: it fails as
    /// [`Plane::try_send`] does, so a peer that stops reading cannot pin more memory.
    ///
    /// # Errors
    /// [`SendError`] saying why the message was not queued.
    pub async fn send(&self, to: NodeId, class: Class, msg: Bytes) -> Result<(), SendError> {
        let len = msg.len();
        let link = self.shared().reserve_for_send(to, class, len)?;
        // Released unless queued, also when this future is dropped while it waits.
        let reservation = Reservation {
            link: &link,
            class,
            len,
        };
        let sent = link.queue(class).send(msg).await;
        match sent {
            Ok(()) => {
                std::mem::forget(reservation);
                Ok(())
            }
            Err(_) => Err(SendError::Closed),
        }
    }

    /// Queues `msg` for every known peer with [`Plane::try_send`] semantics; returns how many
    /// queues took it.
    pub fn broadcast(&self, class: Class, msg: &Bytes) -> usize {
        let peers: Vec<NodeId> = self
            .shared()
            .links_snapshot()
            .iter()
            .map(|l| l.id)
            .collect();
        peers
            .into_iter()
            .filter(|p| self.try_send(*p, class, msg.clone()).is_ok())
            .count()
    }

    /// Peers with a live connection now.
    pub fn connected_peers(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .shared()
            .links_snapshot()
            .iter()
            .filter(|l| l.live().is_some())
            .map(|l| l.id)
            .collect();
        v.sort();
        v
    }

    /// Connections the endpoint holds, including handshakes in progress and closing ones.
    pub fn open_connections(&self) -> usize {
        self.shared().endpoint.open_connections()
    }

    /// Waits until at least `n` peers are connected or `timeout` passes; returns whether they are.
    pub async fn wait_connected(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.connected_peers().len() >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The current trust configuration.
    pub fn trust(&self) -> TrustConfig {
        self.shared().trust.current().config().clone()
    }

    /// Replaces the trust state (CAs, CRLs, peer set, blocklists) atomically. The next handshake
    /// sees the new state; live connections that no longer qualify are closed (returned count);
    /// new peers get a queue and, where this side dials, a dialler.
    ///
    /// # Errors
    /// [`TransportError::Trust`] when the new configuration is invalid; the old one stays.
    pub fn update_trust(&self, trust: TrustConfig) -> Result<usize, TransportError> {
        let shared = self.shared();
        shared.trust.replace(TrustState::new(trust)?);
        Ok(shared.reconcile())
    }

    /// Presents a renewed certificate of this node's key from now on, and replaces every
    /// live connection by one made with it (returns how many it is replacing).
    ///
    /// The new connection is made before the old one closes ("newest connection wins"), so a
    /// link has no gap: on the replica plane this side dials the peer even where the peer is
    /// the usual dialler, and the peer takes such a connection only while it holds a live one
    /// with a certificate of ours that started earlier (so a faulty peer with several
    /// certificates can churn only its own links). On a client listener the clients' connections stay
    /// until they reconnect (they carry a certificate that was valid when they were made;
    /// the clients' checks of live links cut them when it expires or is revoked).
    ///
    /// # Errors
    /// [`TransportError::Config`] when `identity` has another key (node id) or role than
    /// this plane's, or its key does not match its certificate; the old identity stays.
    pub fn renew_identity(&self, identity: Identity) -> Result<usize, TransportError> {
        let shared = self.shared();
        if identity.id() != shared.id || identity.role() != shared.role {
            return Err(TransportError::Config(
                "a renewed identity keeps the key (node id) and the role".into(),
            ));
        }
        shared
            .cert
            .set(CurrentCert::of(&identity, &shared.provider)?);
        tracing::info!(
            plane = shared.kind.as_str(),
            "presenting a renewed certificate"
        );
        if shared.kind == PlaneKind::ClientListener {
            return Ok(0);
        }
        let mut replacing = 0;
        for link in shared.links_snapshot() {
            if link.live().is_some() {
                replacing += 1;
                let span =
                    tracing::info_span!("peer", plane = shared.kind.as_str(), peer = %link.id);
                tokio::spawn(
                    Arc::clone(shared)
                        .replace_connection(link.id)
                        .instrument(span),
                );
            }
        }
        Ok(replacing)
    }

    /// A copy of the counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared().stats.snapshot()
    }

    /// Closes every connection (code [`close_code::SHUTDOWN`]) and stops all tasks, waiting a
    /// short grace period for the close to reach the peers.
    pub async fn shutdown(&self) {
        let shared = self.shared();
        shared.stop();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, shared.endpoint.wait_idle()).await;
    }
}

/// BLAKE3 `derive_key` context of the QUIC stateless-reset key.
pub(crate) const RESET_KEY_CONTEXT: &str = securesmart_base::tags::transport::STATELESS_RESET_KEY;

/// The key behind QUIC stateless-reset tokens, derived from the node's private key (per plane
/// kind). Because a restarted node derives the same key, it can reset the connections of its
/// previous incarnation: a peer whose packets reach the new process gets a valid stateless
/// reset at once and redials, instead of waiting for the idle timeout. The key is secret (a
/// stateless reset ends a connection) and erased when dropped.
struct ResetKey(zeroize::Zeroizing<[u8; 32]>);

impl ResetKey {
    fn derive(kind: PlaneKind, seed: &[u8; 32]) -> Self {
        let mut h = blake3::Hasher::new_derive_key(RESET_KEY_CONTEXT);
        h.update(kind.as_str().as_bytes()).update(&[0]).update(seed);
        Self(zeroize::Zeroizing::new(*h.finalize().as_bytes()))
    }

    /// The key of the connection-id check value (not secret: it only lets an endpoint tell
    /// its own ids from random ones), derived from the reset key.
    fn cid_key(&self) -> u64 {
        let mac = blake3::keyed_hash(&self.0, b"connection id check key");
        let mut k = [0u8; 8];
        k.copy_from_slice(mac.as_bytes().get(..8).unwrap_or(&[0; 8]));
        u64::from_be_bytes(k)
    }
}

impl quinn_proto::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = blake3::keyed_hash(&self.0, data);
        for (out, b) in signature_out.iter_mut().zip(mac.as_bytes()) {
            *out = *b;
        }
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(
        &self,
        data: &[u8],
        signature: &[u8],
    ) -> Result<(), quinn_proto::crypto::CryptoError> {
        let given: [u8; 32] = signature
            .try_into()
            .map_err(|_| quinn_proto::crypto::CryptoError)?;
        // blake3::Hash compares in constant time.
        if blake3::keyed_hash(&self.0, data) == blake3::Hash::from(given) {
            Ok(())
        } else {
            Err(quinn_proto::crypto::CryptoError)
        }
    }
}

/// Releases an inbound connection slot when dropped.
struct SlotGuard {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.shared.inbound_total.fetch_sub(1, Relaxed);
        if let Ok(mut slots) = self.shared.inbound_slots.lock()
            && let Some(n) = slots.get_mut(&self.ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                slots.remove(&self.ip);
            }
        }
    }
}

/// Decrements the pending-handshake count when dropped.
struct PendingGuard(Arc<Shared>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending_handshakes.fetch_sub(1, Relaxed);
    }
}

impl Shared {
    fn stop(&self) {
        self.stopping.store(true, Relaxed);
        self.shutdown.send_replace(true);
        match self.inbound.lock() {
            Ok(mut g) => *g = None,
            Err(p) => *p.into_inner() = None,
        }
        self.endpoint
            .close(VarInt::from_u32(close_code::SHUTDOWN), b"shutdown");
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Relaxed)
    }

    fn links_snapshot(&self) -> Vec<Arc<PeerLink>> {
        match self.links.read() {
            Ok(l) => l.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        }
    }

    fn link(&self, id: &NodeId) -> Option<Arc<PeerLink>> {
        match self.links.read() {
            Ok(l) => l.get(id).cloned(),
            Err(p) => p.into_inner().get(id).cloned(),
        }
    }

    /// The link for a message of `len` bytes to `to`, with the bytes counted against its
    /// class's [`Limits::queue_bytes`].
    fn reserve_for_send(
        &self,
        to: NodeId,
        class: Class,
        len: usize,
    ) -> Result<Arc<PeerLink>, SendError> {
        let link = self.link_for_send(to, len)?;
        if !link.reserve(class, len, self.limits.queue_bytes) {
            self.stats.dropped(DropReason::QueueFull, 1);
            return Err(SendError::QueueFull);
        }
        Ok(link)
    }

    fn link_for_send(&self, to: NodeId, len: usize) -> Result<Arc<PeerLink>, SendError> {
        if self.is_stopping() {
            return Err(SendError::Closed);
        }
        let max = self.limits.max_frame_bytes;
        if len > max {
            self.stats.dropped(DropReason::TooLarge, 1);
            return Err(SendError::TooLarge { len, max });
        }
        self.link(&to).ok_or_else(|| {
            self.stats.dropped(DropReason::UnknownPeer, 1);
            SendError::UnknownPeer
        })
    }

    /// The link for `id`, created (with its two writer tasks) if absent.
    fn ensure_link(self: &Arc<Self>, id: NodeId) -> Arc<PeerLink> {
        let mut links = match self.links.write() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        if let Some(l) = links.get(&id) {
            return Arc::clone(l);
        }
        let (consensus, consensus_rx) = mpsc::channel(self.limits.consensus_queue);
        let (bulk, bulk_rx) = mpsc::channel(self.limits.bulk_queue);
        let (conn, conn_rx) = watch::channel(None);
        let link = Arc::new(PeerLink {
            id,
            consensus,
            bulk,
            queued: [Arc::default(), Arc::default()],
            conn,
        });
        links.insert(id, Arc::clone(&link));
        drop(links);
        let span = tracing::info_span!("peer", plane = self.kind.as_str(), peer = %id);
        for (class, rx) in [(Class::Consensus, consensus_rx), (Class::Bulk, bulk_rx)] {
            tokio::spawn(
                Arc::clone(self)
                    .write_loop(class, rx, conn_rx.clone(), Arc::downgrade(&link))
                    .instrument(span.clone()),
            );
        }
        if self.dials(id) {
            tokio::spawn(Arc::clone(self).dial_loop(id).instrument(span));
        }
        link
    }

    fn remove_link(&self, id: &NodeId) -> Option<Arc<PeerLink>> {
        match self.links.write() {
            Ok(mut l) => l.remove(id),
            Err(p) => p.into_inner().remove(id),
        }
    }

    /// Whether this side dials `peer`: clients dial every replica; on the replica plane the
    /// smaller node id dials, so both sides agree on one connection per pair.
    fn dials(&self, peer: NodeId) -> bool {
        match self.kind {
            PlaneKind::Replica => self.id < peer,
            PlaneKind::Client => true,
            PlaneKind::ClientListener => false,
        }
    }

    /// Brings links and live connections in line with the current trust state; returns how many
    /// connections were closed.
    fn reconcile(self: &Arc<Self>) -> usize {
        let trust = self.trust.current();
        let cfg = trust.config();
        if self.kind.needs_peer_set() {
            for id in cfg.peers.keys() {
                if *id != self.id {
                    self.ensure_link(*id);
                }
            }
        }
        let mut closed = 0;
        for link in self.links_snapshot() {
            let in_set = !self.kind.needs_peer_set() || cfg.peers.contains_key(&link.id);
            if let Some(conn) = link.live()
                && let Err(reason) = self.verdict(&trust, &conn)
            {
                self.refuse_live(&conn, link.id, reason);
                closed += 1;
            }
            if !in_set {
                self.remove_link(&link.id);
            }
        }
        closed
    }

    /// Whether `conn` may stay open under `trust`: source IP, then the peer's certificate chain.
    fn verdict(&self, trust: &TrustState, conn: &Connection) -> Result<CertInfo, Refusal> {
        let ip = conn.remote_address().ip().to_canonical();
        if trust.config().blocked_ips.contains(&ip) {
            return Err(Refusal::BlockedIp);
        }
        let chain = peer_chain(conn).ok_or(Refusal::BadCertificate)?;
        trust.check_peer(
            self.kind,
            &self.provider.signature_verification_algorithms,
            &chain,
            UnixTime::now(),
        )
    }

    /// Counts, logs and closes a connection that is no longer admitted.
    fn refuse_live(&self, conn: &Connection, peer: NodeId, reason: Refusal) {
        self.stats.refused(reason);
        tracing::warn!(plane = self.kind.as_str(), %peer, %reason, "closing a connection that is no longer admitted");
        conn.close(
            VarInt::from_u32(close_code::NOT_ADMITTED),
            reason.as_str().as_bytes(),
        );
    }

    async fn housekeeping(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    self.handshake_limiter.retain_recent();
                    self.message_limiter.retain_recent();
                    self.byte_limiter.retain_recent();
                }
            }
        }
    }

    async fn accept_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let incoming = tokio::select! {
                _ = shutdown.changed() => return,
                i = self.endpoint.accept() => match i {
                    Some(i) => i,
                    None => return,
                },
            };
            self.admit(incoming);
        }
    }

    fn needs_retry(&self) -> bool {
        match self.limits.retry {
            RetryPolicy::Never => false,
            RetryPolicy::Always => true,
            RetryPolicy::WhenPendingExceeds(n) => self.pending_handshakes.load(Relaxed) >= n,
        }
    }

    /// Admission of a new connection attempt, cheapest checks first: IP blocklist, address
    /// validation (so the rate limit counts only validated sources), handshake rate per IP,
    /// connection caps; the certificate checks run in the handshake itself.
    fn admit(self: &Arc<Self>, incoming: Incoming) {
        let ip = incoming.remote_address().ip().to_canonical();
        let refuse = |reason: Refusal, incoming: Incoming| {
            self.stats.refused(reason);
            tracing::debug!(plane = self.kind.as_str(), %ip, %reason, "connection attempt refused");
            match reason {
                // Say nothing to a blocked source.
                Refusal::BlockedIp => incoming.ignore(),
                _ => incoming.refuse(),
            }
        };
        if self.trust.current().config().blocked_ips.contains(&ip) {
            return refuse(Refusal::BlockedIp, incoming);
        }
        if self.needs_retry() && !incoming.remote_address_validated() && incoming.may_retry() {
            match incoming.retry() {
                Ok(()) => self.stats.retry_sent(),
                Err(e) => e.into_incoming().ignore(),
            }
            return;
        }
        if self.handshake_limiter.check_key(&ip).is_err() {
            return refuse(Refusal::HandshakeRate, incoming);
        }
        let slot = match self.reserve_slot(ip) {
            Ok(s) => s,
            Err(reason) => return refuse(reason, incoming),
        };
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                self.stats.refused(Refusal::HandshakeFailed);
                tracing::debug!(%ip, %e, "accept failed");
                return;
            }
        };
        self.pending_handshakes.fetch_add(1, Relaxed);
        let pending = PendingGuard(Arc::clone(self));
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let result = connecting.await;
            drop(pending);
            match result {
                Ok(conn) => shared.run_connection(conn, false, Some(slot)).await,
                Err(e) => shared.handshake_failed(&e, ip),
            }
        });
    }

    fn handshake_failed(&self, e: &quinn::ConnectionError, ip: IpAddr) {
        // A refusal by our own verifier was counted with its reason there; count the rest.
        if !matches!(e, quinn::ConnectionError::TransportError(_)) {
            self.stats.refused(Refusal::HandshakeFailed);
        }
        tracing::debug!(plane = self.kind.as_str(), %ip, %e, "handshake failed");
    }

    fn reserve_slot(self: &Arc<Self>, ip: IpAddr) -> Result<SlotGuard, Refusal> {
        let mut slots = match self.inbound_slots.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if self.inbound_total.load(Relaxed) >= self.limits.max_connections {
            return Err(Refusal::TooManyConnections);
        }
        let n = slots.entry(ip).or_insert(0);
        if *n >= self.limits.max_connections_per_ip {
            return Err(Refusal::TooManyConnectionsFromIp);
        }
        *n += 1;
        self.inbound_total.fetch_add(1, Relaxed);
        Ok(SlotGuard {
            shared: Arc::clone(self),
            ip,
        })
    }

    fn client_config(&self, expected: NodeId) -> Result<quinn::ClientConfig, TransportError> {
        let verifier = Arc::new(PeerVerifier::new(
            self.trust.clone(),
            self.kind,
            Some(expected),
            Arc::clone(&self.stats),
        ));
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(
                Arc::clone(&self.cert) as Arc<dyn rustls::client::ResolvesClientCert>
            );
        tls.alpn_protocols = vec![self.alpn.clone()];
        let quic = QuicClientConfig::try_from(Arc::new(tls))
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::clone(&self.transport));
        Ok(config)
    }

    /// Dials `peer` once with the current certificate and serves the connection, which
    /// replaces the live one (see [`Plane::renew_identity`]).
    async fn replace_connection(self: Arc<Self>, peer: NodeId) {
        let Some(addr) = self.trust.current().config().peers.get(&peer).copied() else {
            return;
        };
        match self.dial(peer, addr).await {
            Ok(conn) => self.run_connection(conn, true, None).await,
            Err(e) => tracing::warn!(%addr, %e, "replacing a connection failed; the old one stays"),
        }
    }

    /// Whether a connection from `info` (a replica that is not the dialler of our pair)
    /// replaces a live connection whose certificate of the same peer started earlier: the
    /// peer renewed its certificate (see [`Plane::renew_identity`]).
    fn renews_live_connection(&self, info: &CertInfo) -> bool {
        let held = self
            .link(&info.id)
            .and_then(|l| l.live())
            .and_then(|c| peer_chain(&c))
            .and_then(|chain| chain.first().and_then(|c| CertInfo::parse(c).ok()));
        held.is_some_and(|old| old.id == info.id && info.not_before > old.not_before)
    }

    /// Waits until `link` has no live connection (another one, e.g. a renewal's, may have
    /// replaced the one this side dialled); false when the plane stops or the link goes.
    async fn until_down(&self, link: &PeerLink, shutdown: &mut watch::Receiver<bool>) -> bool {
        let mut conn = link.conn.subscribe();
        while let Some(live) = link.live() {
            tokio::select! {
                _ = shutdown.changed() => return false,
                changed = conn.changed() => if changed.is_err() { return false },
                _ = live.closed() => {}
            }
        }
        true
    }

    /// Dials `peer` until it is removed or the plane stops, with exponential back-off and jitter.
    async fn dial_loop(self: Arc<Self>, peer: NodeId) {
        let mut delay = self.limits.reconnect_min;
        let mut shutdown = self.shutdown.subscribe();
        loop {
            if self.is_stopping() {
                return;
            }
            let Some(link) = self.link(&peer) else {
                return;
            };
            if !self.until_down(&link, &mut shutdown).await {
                return;
            }
            drop(link);
            let Some(addr) = self.trust.current().config().peers.get(&peer).copied() else {
                return;
            };
            match self.dial(peer, addr).await {
                Ok(conn) => {
                    delay = self.limits.reconnect_min;
                    self.run_connection(conn, true, None).await;
                }
                Err(e) => tracing::debug!(%addr, %e, "dial failed"),
            }
            let jitter = delay.mul_f64(rand::random::<f64>() * 0.5);
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(delay + jitter) => {}
            }
            delay = (delay * 2).min(self.limits.reconnect_max);
        }
    }

    async fn dial(&self, peer: NodeId, addr: SocketAddr) -> Result<Connection, String> {
        let config = self.client_config(peer).map_err(|e| e.to_string())?;
        let connecting = self
            .endpoint
            .connect_with(config, addr, SERVER_NAME)
            .map_err(|e| e.to_string())?;
        connecting.await.map_err(|e| e.to_string())
    }

    /// Admits an established connection and serves it until it closes.
    async fn run_connection(
        self: &Arc<Self>,
        conn: Connection,
        dialled: bool,
        slot: Option<SlotGuard>,
    ) {
        let remote = conn.remote_address();
        let admitted = self.verdict(&self.trust.current(), &conn).and_then(|info| {
            if self.kind == PlaneKind::Replica
                && !dialled
                && info.id > self.id
                && !self.renews_live_connection(&info)
            {
                Err(Refusal::WrongDialer)
            } else {
                Ok(info)
            }
        });
        let info = match admitted {
            Ok(info) => info,
            Err(reason) => {
                self.stats.refused(reason);
                tracing::warn!(plane = self.kind.as_str(), %remote, %reason, "connection refused after handshake");
                let code = match reason {
                    Refusal::WrongDialer => close_code::WRONG_DIALER,
                    _ => close_code::NOT_ADMITTED,
                };
                conn.close(VarInt::from_u32(code), reason.as_str().as_bytes());
                return;
            }
        };
        let link = match self.kind {
            PlaneKind::ClientListener => self.ensure_link(info.id),
            _ => match self.link(&info.id) {
                Some(l) => l,
                None => {
                    self.stats.refused(Refusal::NotInPeerSet);
                    conn.close(
                        VarInt::from_u32(close_code::NOT_ADMITTED),
                        b"not_in_peer_set",
                    );
                    return;
                }
            },
        };
        // TLS 1.3 lets the dialler finish its handshake before the acceptor has checked the
        // dialler's certificate. The acceptor therefore confirms admission on a one-byte stream,
        // opened before any data stream, and the dialler goes live only after reading it: nothing
        // is written into a connection the other side refuses.
        let confirmed = if dialled {
            tokio::time::timeout(self.limits.idle_timeout, await_admission(&conn))
                .await
                .unwrap_or(Err(AdmissionError::Timeout))
        } else {
            announce_admission(&conn).await
        };
        if let Err(e) = confirmed {
            tracing::debug!(plane = self.kind.as_str(), %remote, ?e, "admission not confirmed");
            if dialled && !matches!(e, AdmissionError::Closed) {
                self.stats.refused(Refusal::HandshakeFailed);
            }
            conn.close(VarInt::from_u32(close_code::PROTOCOL), b"admission");
            return;
        }
        self.stats.accepted();
        let span = tracing::info_span!("conn", plane = self.kind.as_str(), peer = %info.id, %remote, dialled);
        self.serve(conn, link, info).instrument(span).await;
        drop(slot);
    }

    async fn serve(self: &Arc<Self>, conn: Connection, link: Arc<PeerLink>, info: CertInfo) {
        // Newest connection wins: it comes from the same dialler (the peer reconnected), so the
        // older one is stale.
        if let Some(old) = link.conn.send_replace(Some(conn.clone()))
            && old.stable_id() != conn.stable_id()
        {
            old.close(VarInt::from_u32(close_code::REPLACED), b"replaced");
        }
        // A trust update may have run between the admission check and the install above. The
        // update swaps the state and then scans installed connections; we install and then read
        // the state: whichever runs second sees the other, so a revoked peer cannot slip through.
        if let Err(reason) = self.verdict(&self.trust.current(), &conn) {
            self.refuse_live(&conn, info.id, reason);
        }
        self.stats.connections.increment(1.0);
        tracing::info!("connected");
        let mut shutdown = self.shutdown.subscribe();
        let mut rtt = tokio::time::interval(RTT_SAMPLE_INTERVAL);
        let mut readers = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                reason = conn.closed() => {
                    tracing::info!(%reason, "disconnected");
                    break;
                }
                stream = conn.accept_uni() => match stream {
                    Ok(recv) => {
                        let shared = Arc::clone(self);
                        let conn = conn.clone();
                        readers.spawn(async move {
                            if let Err(e) = shared.read_stream(info.id, info.role, recv).await {
                                shared.peer_misbehaved(&conn, info.id, &e);
                            }
                        }.in_current_span());
                    }
                    Err(_) => break,
                },
                _ = rtt.tick() => self.stats.rtt.record(conn.rtt().as_secs_f64()),
                Some(_) = readers.join_next(), if !readers.is_empty() => {}
            }
        }
        readers.abort_all();
        self.stats.connections.decrement(1.0);
        link.conn.send_if_modified(|current| {
            if current.as_ref().map(Connection::stable_id) == Some(conn.stable_id()) {
                *current = None;
                true
            } else {
                false
            }
        });
        if self.kind == PlaneKind::ClientListener && link.live().is_none() {
            // Clients come and go: drop the departed client's queues.
            self.remove_link(&info.id);
        }
    }

    fn peer_misbehaved(&self, conn: &Connection, peer: NodeId, e: &PeerError) {
        self.stats.peer_error(e);
        tracing::warn!(plane = self.kind.as_str(), %peer, error = %e, "peer violated the protocol; closing its connection");
        conn.close(VarInt::from_u32(e.code()), e.as_str().as_bytes());
    }

    /// The inbound queue of `class`, until shutdown.
    fn inbound(&self, class: Class) -> Option<mpsc::Sender<Message>> {
        let guard = match self.inbound.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        guard.as_ref().map(|(consensus, bulk)| match class {
            Class::Consensus => consensus.clone(),
            Class::Bulk => bulk.clone(),
        })
    }

    /// Reads one stream: a class tag, then frames, delivered in order.
    async fn read_stream(
        &self,
        peer: NodeId,
        role: crate::identity::Role,
        mut recv: quinn::RecvStream,
    ) -> Result<(), PeerError> {
        let mut tag = [0u8; 1];
        if recv.read_exact(&mut tag).await.is_err() {
            return Ok(());
        }
        let [tag] = tag;
        let class = Class::from_tag(tag)?;
        let mut decoder = FrameDecoder::new(self.limits.max_frame_bytes);
        let mut frames = Vec::new();
        loop {
            match recv.read_chunk(READ_CHUNK_BYTES, true).await {
                Ok(Some(chunk)) => {
                    decoder.push(&chunk.bytes);
                    while let Some(frame) = decoder.next_frame()? {
                        frames.push(frame);
                    }
                    if !frames.is_empty() && !self.deliver(peer, role, class, &mut frames).await {
                        return Ok(());
                    }
                }
                Ok(None) => return decoder.finish().map_err(PeerError::from),
                // The stream or connection went away; the connection task notices.
                Err(_) => return Ok(()),
            }
        }
    }

    /// Applies the peer's budgets and queues the frames; `false` once the inbox is gone.
    async fn deliver(
        &self,
        peer: NodeId,
        role: crate::identity::Role,
        class: Class,
        frames: &mut Vec<Bytes>,
    ) -> bool {
        let count = frames.len();
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        self.stats.frames_in(class, count as u64, bytes as u64);
        let fits = |limiter: &DefaultKeyedRateLimiter<NodeId>, n: usize| {
            n == 0
                || NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX))
                    .is_some_and(|n| matches!(limiter.check_key_n(&peer, n), Ok(Ok(()))))
        };
        // Fast path: the whole chunk fits both budgets.
        let all_fit = fits(&self.message_limiter, count) && fits(&self.byte_limiter, bytes);
        if !all_fit {
            frames.retain(|payload| {
                if !fits(&self.message_limiter, 1) {
                    self.stats.dropped(DropReason::RateLimitMessages, 1);
                    false
                } else if !fits(&self.byte_limiter, payload.len()) {
                    self.stats.dropped(DropReason::RateLimitBytes, 1);
                    false
                } else {
                    true
                }
            });
        }
        // One reservation per batch instead of one per message (fewer wake-ups). Waiting for
        // room is the back-pressure: QUIC flow control then slows the sender.
        let Some(tx) = self.inbound(class) else {
            return false;
        };
        let mut remaining = frames.len();
        let mut payloads = frames.drain(..);
        while remaining > 0 {
            let n = remaining.min(tx.max_capacity());
            let Ok(permits) = tx.reserve_many(n).await else {
                return false;
            };
            for (permit, payload) in permits.zip(payloads.by_ref()) {
                permit.send(Message {
                    from: peer,
                    role,
                    class,
                    payload,
                });
            }
            remaining -= n;
        }
        true
    }

    /// Drains one class's queue for one peer onto that class's stream of the current connection.
    async fn write_loop(
        self: Arc<Self>,
        class: Class,
        mut rx: mpsc::Receiver<Bytes>,
        mut conn_rx: watch::Receiver<Option<Connection>>,
        link: std::sync::Weak<PeerLink>,
    ) {
        let mut shutdown = self.shutdown.subscribe();
        let mut batch: Vec<Bytes> = Vec::new();
        let mut stream: Option<(usize, quinn::SendStream)> = None;
        let mut failed: Option<usize> = None;
        loop {
            if batch.is_empty() {
                let limit = match class {
                    Class::Consensus => WRITE_BATCH_CONSENSUS,
                    Class::Bulk => WRITE_BATCH_BULK,
                };
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => return,
                    // One wake-up and one permit release for everything queued.
                    n = rx.recv_many(&mut batch, limit) => if n == 0 { return },
                }
            }
            let conn = loop {
                let current = conn_rx.borrow_and_update().clone();
                if let Some(c) = current
                    && Some(c.stable_id()) != failed
                {
                    break c;
                }
                tokio::select! {
                    _ = shutdown.changed() => return,
                    r = conn_rx.changed() => if r.is_err() { return },
                }
            };
            if stream.as_ref().map(|(id, _)| *id) != Some(conn.stable_id()) {
                match open_stream(&conn, class).await {
                    Ok(s) => stream = Some((conn.stable_id(), s)),
                    Err(_) => {
                        failed = Some(conn.stable_id());
                        stream = None;
                        continue;
                    }
                }
            }
            let Some((_, send)) = stream.as_mut() else {
                continue;
            };
            let frames = batch.len() as u64;
            let bytes: u64 = batch.iter().map(|b| b.len() as u64).sum();
            let mut chunks = encode_batch(&batch, self.limits.max_frame_bytes);
            batch.clear();
            let written = send.write_all_chunks(&mut chunks).await;
            // Written, or lost with the connection: no longer queued either way.
            if let Some(link) = link.upgrade() {
                link.release(class, usize::try_from(bytes).unwrap_or(usize::MAX));
            }
            if written.is_ok() {
                self.stats.frames_out(class, frames, bytes);
                if frames < SMALL_BATCH {
                    // Let the producers run before draining again: the next batch is larger
                    // and the writer is not parked and woken once per message.
                    tokio::task::yield_now().await;
                }
            } else {
                self.stats.dropped(DropReason::ConnectionLost, frames);
                failed = Some(conn.stable_id());
                stream = None;
            }
        }
    }
}

/// Tag of the one-byte stream by which an acceptor confirms admission (not a message class).
const ADMITTED_TAG: u8 = 0xad;

/// Why a dialled connection did not become live.
#[derive(Debug)]
enum AdmissionError {
    /// The acceptor closed the connection (it refused us).
    Closed,
    /// The acceptor sent something other than the admission stream.
    Protocol,
    /// No confirmation within the idle timeout.
    Timeout,
}

async fn announce_admission(conn: &Connection) -> Result<(), AdmissionError> {
    let mut s = conn.open_uni().await.map_err(|_| AdmissionError::Closed)?;
    s.write_all(&[ADMITTED_TAG])
        .await
        .map_err(|_| AdmissionError::Closed)?;
    s.finish().map_err(|_| AdmissionError::Closed)
}

async fn await_admission(conn: &Connection) -> Result<(), AdmissionError> {
    let mut s = conn
        .accept_uni()
        .await
        .map_err(|_| AdmissionError::Closed)?;
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag)
        .await
        .map_err(|_| AdmissionError::Protocol)?;
    if tag == [ADMITTED_TAG] {
        Ok(())
    } else {
        Err(AdmissionError::Protocol)
    }
}

async fn open_stream(
    conn: &Connection,
    class: Class,
) -> Result<quinn::SendStream, quinn::WriteError> {
    let mut s = conn.open_uni().await?;
    // Only fails on a stream that is already closed; the write below then fails too.
    let _ = s.set_priority(class.priority());
    s.write_all(&[class.tag()]).await?;
    Ok(s)
}

/// Frames a batch: small messages are copied into one buffer, large ones go out as they are.
/// Sizes were checked when queued, so `frame_header` cannot fail here; stay total anyway.
fn encode_batch(batch: &[Bytes], max_frame_bytes: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut small = BytesMut::new();
    for m in batch {
        let Ok(header) = frame_header(m.len(), max_frame_bytes) else {
            continue;
        };
        if m.len() <= COPY_THRESHOLD_BYTES {
            small.put_slice(&header);
            small.put_slice(m);
        } else {
            if !small.is_empty() {
                out.push(small.split().freeze());
            }
            out.push(Bytes::copy_from_slice(&header));
            out.push(m.clone());
        }
    }
    if !small.is_empty() {
        out.push(small.freeze());
    }
    out
}

/// The peer's certificate chain as rustls verified it.
fn peer_chain(conn: &Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|b| *b)
}
