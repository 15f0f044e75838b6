//! Network enrollment: `ca serve` accepts enrollment requests over QUIC, `enroll` is the node
//! side. This is the dynamic key distribution of the design: a node that was never configured by
//! hand gets its identity from the trust center.
//!
//! TLS is server-authenticated only (the node has no certificate yet): the node checks the
//! endpoint's certificate against the CA certificate it was given and the address it dialled,
//! and that it is the trust center's service certificate (it names
//! [`securesmart_transport::SERVICE_URI_ENROLLMENT`] and no role: a replica of the same CA
//! cannot pose as the endpoint); the CA certificate returned must be the pinned one;
//! the enrollment token authorizes the request. The endpoint's certificate is ephemeral, issued
//! by the CA at start for the names it serves.
//!
//! On the wire (ALPN [`ALPN_ENROLL`]), one bidirectional stream per connection:
//! request `version=1 u8 | token (u32 len, <= 256) | CSR DER (u32 len, <= 8 KiB)`;
//! response `version=1 u8 | tag u8 | ...`: tag 0 `certificate | CA certificate` (u32 len each,
//! <= 16 KiB), tag 1 `reason (u32 len, <= 1 KiB UTF-8)`.
//!
//! Anti-DoS, cheapest first: stateless address validation (a QUIC Retry for every new source),
//! a request rate per source subnet (/24 for IPv4, /56 for IPv6; governor, keyed), caps on the
//! connections in progress from one subnet and from all, a size limit on the request and a
//! short time limit on the handshake and the request ([`EnrollLimits::request_deadline`]); then
//! the token is checked without the trust center's lock ([`TrustCenter::precheck_token`]), and
//! only requests with a live token wait for the CA (at most
//! [`EnrollLimits::max_signing`] at once). So a few addresses cannot hold the endpoint, and
//! made-up tokens cost neither the lock nor a parse of the CA's state.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, ServerName};
use securesmart_transport::{Identity, NodeId};
use zeroize::Zeroizing;

use crate::trust_center::{TrustCenter, TrustCenterError, key_and_csr};
use securesmart_base::wire::{Reader, WireError, Writer};

/// ALPN of the enrollment endpoint.
pub const ALPN_ENROLL: &[u8] = b"securesmart-enroll/1";
/// Protocol version.
const VERSION: u8 = 1;
/// Largest token accepted.
pub const MAX_TOKEN_BYTES: usize = 256;
/// Largest CSR accepted.
pub const MAX_CSR_BYTES: usize = 8 * 1024;
/// Largest certificate in a response.
pub const MAX_CERT_BYTES: usize = 16 * 1024;
/// Largest refusal reason.
pub const MAX_REASON_BYTES: usize = 1024;
/// Largest request on the wire.
const MAX_REQUEST_BYTES: usize = 1 + 4 + MAX_TOKEN_BYTES + 4 + MAX_CSR_BYTES;
/// Largest response on the wire.
const MAX_RESPONSE_BYTES: usize = 2 + 8 + 2 * MAX_CERT_BYTES;
/// How long one enrollment connection may take.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// How long the endpoint waits for a node to take its answer.
const RESPONSE_DEADLINE: Duration = Duration::from_secs(2);
/// Validity of the endpoint's ephemeral certificate.
const SERVICE_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// Errors of enrollment.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The trust center failed or refused.
    #[error(transparent)]
    TrustCenter(#[from] TrustCenterError),
    /// A message did not decode.
    #[error("bad message: {0}")]
    Wire(#[from] WireError),
    /// The CA refused the request (its reason).
    #[error("refused by the trust center: {0}")]
    Refused(String),
    /// TLS or QUIC setup failed.
    #[error("connection setup: {0}")]
    Setup(String),
    /// The connection failed or timed out.
    #[error("connection: {0}")]
    Connection(String),
    /// The certificate returned is not for our key or does not parse.
    #[error("the certificate returned does not match the request: {0}")]
    Mismatch(String),
}

/// An enrollment request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollRequest {
    /// The enrollment token.
    pub token: String,
    /// The CSR (DER).
    pub csr: Vec<u8>,
}

impl EnrollRequest {
    /// Encodes the request.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(VERSION).bytes(self.token.as_bytes()).bytes(&self.csr);
        w.buf
    }

    /// Decodes a request; the whole buffer must be one request within the limits.
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        r.version(VERSION)?;
        let token = r.string("token", MAX_TOKEN_BYTES)?;
        let csr = r.bytes("csr", MAX_CSR_BYTES)?.to_vec();
        r.finish()?;
        Ok(Self { token, csr })
    }
}

/// An enrollment response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnrollResponse {
    /// The certificate and the CA certificate (DER).
    Issued {
        /// The node's certificate.
        certificate: Vec<u8>,
        /// The CA certificate.
        ca_certificate: Vec<u8>,
    },
    /// Refused, with the reason.
    Refused(String),
}

impl EnrollResponse {
    /// Encodes the response.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(VERSION);
        match self {
            EnrollResponse::Issued {
                certificate,
                ca_certificate,
            } => {
                w.u8(0).bytes(certificate).bytes(ca_certificate);
            }
            EnrollResponse::Refused(reason) => {
                let cut = reason
                    .get(..MAX_REASON_BYTES.min(reason.len()))
                    .unwrap_or("refused");
                w.u8(1).bytes(cut.as_bytes());
            }
        }
        w.buf
    }

    /// Decodes a response; the whole buffer must be one response within the limits.
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        r.version(VERSION)?;
        let out = match r.u8()? {
            0 => EnrollResponse::Issued {
                certificate: r.bytes("certificate", MAX_CERT_BYTES)?.to_vec(),
                ca_certificate: r.bytes("CA certificate", MAX_CERT_BYTES)?.to_vec(),
            },
            1 => EnrollResponse::Refused(r.string("reason", MAX_REASON_BYTES)?),
            tag => {
                return Err(WireError::Unknown {
                    what: "response tag",
                    value: tag.into(),
                });
            }
        };
        r.finish()?;
        Ok(out)
    }
}

/// Limits of the enrollment endpoint.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EnrollLimits {
    /// Requests per second per source subnet (/24, or /56 for IPv6), sustained.
    pub requests_per_ip_per_sec: u32,
    /// Request burst per source subnet.
    pub request_burst_per_ip: u32,
    /// Connections in progress at once, all sources together.
    pub max_in_flight: usize,
    /// Connections in progress at once from one source subnet.
    pub max_in_flight_per_subnet: usize,
    /// Connections in progress at once from one wider network (/16, or /48 for IPv6: one
    /// site's worth of subnets).
    pub max_in_flight_per_network: usize,
    /// Requests with a live token at the CA at once (signing writes and fsyncs files).
    pub max_signing: usize,
    /// How long a connection may take to complete its handshake and send its request.
    pub request_deadline: Duration,
}

impl Default for EnrollLimits {
    fn default() -> Self {
        Self {
            requests_per_ip_per_sec: 2,
            request_burst_per_ip: 10,
            max_in_flight: 256,
            max_in_flight_per_subnet: 4,
            max_in_flight_per_network: 32,
            max_signing: 4,
            request_deadline: Duration::from_secs(3),
        }
    }
}

/// The subnet a source address counts against: its /24 (IPv4) or /56 (IPv6).
fn subnet(ip: IpAddr) -> IpAddr {
    prefix(ip, 3, 7)
}

/// The wider network a source counts against too: its /16 (IPv4) or /48 (IPv6).
fn network(ip: IpAddr) -> IpAddr {
    prefix(ip, 2, 6)
}

/// `ip` with all but its first `v4` (IPv4) or `v6` (IPv6) bytes zeroed.
fn prefix(ip: IpAddr, v4: usize, v6: usize) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let mut o = a.octets();
            o.iter_mut().skip(v4).for_each(|b| *b = 0);
            IpAddr::from(o)
        }
        IpAddr::V6(a) => {
            let mut o = a.octets();
            o.iter_mut().skip(v6).for_each(|b| *b = 0);
            IpAddr::from(o)
        }
    }
}

/// The endpoint's QUIC configuration with a fresh service certificate of `ca` for `names`.
fn server_config(ca: &TrustCenter, names: &[String]) -> Result<quinn::ServerConfig, EnrollError> {
    let (cert, key) = ca.service_certificate(names, SERVICE_CERT_VALIDITY)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup_err)?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert],
            PrivateKeyDer::try_from(key.to_vec()).map_err(setup_err)?,
        )
        .map_err(setup_err)?;
    tls.alpn_protocols = vec![ALPN_ENROLL.to_vec()];
    let quic = QuicServerConfig::try_from(Arc::new(tls)).map_err(setup_err)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .max_idle_timeout(Some(CONNECTION_DEADLINE.try_into().map_err(setup_err)?));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// Aborts a task when dropped (the accept loop's helpers end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn setup_err(e: impl std::fmt::Display) -> EnrollError {
    EnrollError::Setup(e.to_string())
}

/// The running enrollment endpoint.
#[derive(Debug)]
pub struct EnrollmentServer {
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
}

struct ServerState {
    ca: Mutex<TrustCenter>,
    /// A second handle on the CA directory for the token precheck, so that made-up tokens
    /// never wait for a signing that holds `ca`.
    tokens: Mutex<TrustCenter>,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    in_flight: AtomicUsize,
    /// Connections in progress per source subnet (`false`) and per wider network (`true`).
    per_subnet: Mutex<std::collections::HashMap<(bool, IpAddr), usize>>,
    signing: tokio::sync::Semaphore,
    limits: EnrollLimits,
}

impl EnrollmentServer {
    /// Starts serving enrollment for `ca` on `listen`. The endpoint's certificate names
    /// `names` (DNS names or IPs the nodes dial; the listen IP and loopback are always added).
    ///
    /// # Errors
    /// Setup errors (certificate, TLS, socket).
    pub async fn start(
        ca: TrustCenter,
        listen: SocketAddr,
        names: &[String],
        limits: EnrollLimits,
    ) -> Result<Self, EnrollError> {
        let mut all: Vec<String> = names.to_vec();
        let mut defaults: Vec<String> =
            ["127.0.0.1", "::1", "localhost"].map(String::from).to_vec();
        if !listen.ip().is_unspecified() {
            defaults.push(listen.ip().to_string());
        }
        for n in defaults {
            if !all.contains(&n) {
                all.push(n);
            }
        }
        let endpoint =
            quinn::Endpoint::server(server_config(&ca, &all)?, listen).map_err(setup_err)?;
        let quota = Quota::per_second(
            NonZeroU32::new(limits.requests_per_ip_per_sec).unwrap_or(NonZeroU32::MIN),
        )
        .allow_burst(NonZeroU32::new(limits.request_burst_per_ip).unwrap_or(NonZeroU32::MIN));
        let tokens = ca.reopen()?;
        let state = Arc::new(ServerState {
            ca: Mutex::new(ca),
            tokens: Mutex::new(tokens),
            limiter: RateLimiter::keyed(quota),
            in_flight: AtomicUsize::new(0),
            per_subnet: Mutex::new(std::collections::HashMap::new()),
            signing: tokio::sync::Semaphore::new(limits.max_signing.max(1)),
            limits,
        });
        // The service certificate is ephemeral: a fresh one every half of its validity, for
        // the connections that follow (a `ca serve` runs for weeks).
        let (ep, st) = (endpoint.clone(), Arc::clone(&state));
        let refresh = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SERVICE_CERT_VALIDITY / 2);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (st, names) = (Arc::clone(&st), all.clone());
                let config = tokio::task::spawn_blocking(move || {
                    let ca = match st.ca.lock() {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                    server_config(&ca, &names)
                })
                .await;
                match config {
                    Ok(Ok(config)) => {
                        ep.set_server_config(Some(config));
                        tracing::info!("enrollment endpoint certificate renewed");
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot renew the endpoint certificate")
                    }
                    Err(e) => tracing::error!(error = %e, "cannot renew the endpoint certificate"),
                }
            }
        });
        let ep = endpoint.clone();
        let task = tokio::spawn(async move {
            let _refresh = AbortOnDrop(refresh);
            let mut accepted = 0u64;
            while let Some(incoming) = ep.accept().await {
                admit(&state, incoming);
                accepted += 1;
                if accepted.is_multiple_of(4096) {
                    // Sources gone quiet need no rate state.
                    state.limiter.retain_recent();
                }
            }
        });
        tracing::info!(addr = ?endpoint.local_addr().ok(), "enrollment endpoint started");
        Ok(Self { endpoint, task })
    }

    /// The bound address.
    ///
    /// # Errors
    /// The socket's error.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Stops accepting and closes connections.
    pub async fn shutdown(self) {
        self.endpoint.close(0u32.into(), b"shutdown");
        self.task.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

fn count(outcome: &'static str) {
    metrics::counter!("securesmart_enroll_requests_total", "outcome" => outcome).increment(1);
}

/// A connection in progress from the source `ip`, released when dropped.
struct Slot(Arc<ServerState>, IpAddr);

impl Slot {
    /// Takes a slot, if none of the global, the subnet's and the wider network's caps is
    /// reached.
    fn take(state: &Arc<ServerState>, ip: IpAddr) -> Option<Self> {
        let mut per = match state.per_subnet.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let keys = [(false, subnet(ip)), (true, network(ip))];
        let caps = [
            state.limits.max_in_flight_per_subnet,
            state.limits.max_in_flight_per_network,
        ];
        let full = keys
            .iter()
            .zip(caps)
            .any(|(k, cap)| per.get(k).copied().unwrap_or(0) >= cap);
        if full || state.in_flight.load(Relaxed) >= state.limits.max_in_flight {
            return None;
        }
        for k in keys {
            *per.entry(k).or_insert(0) += 1;
        }
        state.in_flight.fetch_add(1, Relaxed);
        Some(Self(Arc::clone(state), ip))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
        let mut per = match self.0.per_subnet.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for k in [(false, subnet(self.1)), (true, network(self.1))] {
            if let Some(n) = per.get_mut(&k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per.remove(&k);
                }
            }
        }
    }
}

fn admit(state: &Arc<ServerState>, incoming: quinn::Incoming) {
    let ip = incoming.remote_address().ip().to_canonical();
    if !incoming.remote_address_validated() && incoming.may_retry() {
        if let Err(e) = incoming.retry() {
            e.into_incoming().ignore();
        }
        return;
    }
    let net = subnet(ip);
    if state.limiter.check_key(&net).is_err() {
        count("rate_limited");
        tracing::debug!(%ip, "enrollment rate limit");
        incoming.refuse();
        return;
    }
    let Some(slot) = Slot::take(state, ip) else {
        count("busy");
        incoming.refuse();
        return;
    };
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let _slot = slot;
        match tokio::time::timeout(CONNECTION_DEADLINE, serve(&state, incoming)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                count("error");
                tracing::warn!(%ip, error = %e, "enrollment failed");
            }
            Err(_) => {
                count("timeout");
                tracing::debug!(%ip, "enrollment timed out");
            }
        }
    });
}

async fn serve(state: &Arc<ServerState>, incoming: quinn::Incoming) -> Result<(), EnrollError> {
    let receive = async {
        let conn = incoming
            .accept()
            .map_err(|e| EnrollError::Connection(e.to_string()))?
            .await
            .map_err(|e| EnrollError::Connection(e.to_string()))?;
        let (send, mut recv) = conn
            .accept_bi()
            .await
            .map_err(|e| EnrollError::Connection(e.to_string()))?;
        let request = recv
            .read_to_end(MAX_REQUEST_BYTES)
            .await
            .map_err(|e| EnrollError::Connection(e.to_string()))?;
        Ok::<_, EnrollError>((conn, send, EnrollRequest::decode(&request)?))
    };
    let (conn, send, request) = tokio::time::timeout(state.limits.request_deadline, receive)
        .await
        .map_err(|_| EnrollError::Connection("no request in time".into()))??;
    // The token before anything costly: made-up ones cost neither the lock nor a parse.
    // (Off the async workers: reading the state is file I/O.)
    let (state1, token) = (Arc::clone(state), Zeroizing::new(request.token.clone()));
    let prechecked = tokio::task::spawn_blocking(move || {
        let mut tokens = match state1.tokens.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        tokens.precheck_token(&token)
    })
    .await
    .map_err(|e| EnrollError::Connection(e.to_string()))?;
    if let Err(r) = prechecked {
        count("refused");
        tracing::info!(ip = %conn.remote_address().ip(), reason = %r, "enrollment refused");
        return respond(&conn, send, &EnrollResponse::Refused(r.to_string())).await;
    }
    let _signing = state
        .signing
        .acquire()
        .await
        .map_err(|e| EnrollError::Connection(e.to_string()))?;
    let state2 = Arc::clone(state);
    // Signing writes and fsyncs files: keep it off the async workers.
    let outcome = tokio::task::spawn_blocking(move || {
        let mut ca = match state2.ca.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let csr = CertificateSigningRequestDer::from(request.csr);
        ca.sign_csr(&csr, &request.token)
            .map(|issued| (issued.certificate.to_vec(), ca.ca_certificate().to_vec()))
    })
    .await
    .map_err(|e| EnrollError::Connection(e.to_string()))?;
    let response = match outcome {
        Ok((certificate, ca_certificate)) => {
            count("issued");
            EnrollResponse::Issued {
                certificate,
                ca_certificate,
            }
        }
        Err(TrustCenterError::Refused(r)) => {
            count("refused");
            tracing::info!(ip = %conn.remote_address().ip(), reason = %r, "enrollment refused");
            EnrollResponse::Refused(r.to_string())
        }
        Err(e) => {
            count("failed");
            tracing::error!(error = %e, "enrollment failed at the CA");
            EnrollResponse::Refused("internal error".into())
        }
    };
    respond(&conn, send, &response).await
}

/// Sends `response` and waits a little for the node to read it and close. A node that does
/// not read (a zero flow-control window) holds its slot for [`RESPONSE_DEADLINE`] at most.
async fn respond(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    response: &EnrollResponse,
) -> Result<(), EnrollError> {
    tokio::time::timeout(RESPONSE_DEADLINE, send.write_all(&response.encode()))
        .await
        .map_err(|_| EnrollError::Connection("the node does not read its answer".into()))?
        .map_err(|e| EnrollError::Connection(e.to_string()))?;
    let _ = send.finish();
    let _ = tokio::time::timeout(RESPONSE_DEADLINE, conn.closed()).await;
    Ok(())
}

/// Checks the enrollment endpoint: the usual chain and name checks against the pinned CA, and
/// then that its certificate is the trust center's service certificate
/// ([`securesmart_transport::is_enrollment_service`]), not a replica's or a client's of the
/// same CA whose names happen to cover the address.
#[derive(Debug)]
struct ServiceVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for ServiceVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if !securesmart_transport::is_enrollment_service(end_entity) {
            tracing::warn!(
                "enrollment endpoint presents a certificate that is not the trust center's service certificate"
            );
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A node's identity obtained by enrollment.
pub struct Enrolled {
    /// The identity (certificate and key) for the transport.
    pub identity: Identity,
    /// The certificate (PEM).
    pub certificate_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: Zeroizing<String>,
    /// The CA certificate the trust center returned.
    pub ca_certificate: CertificateDer<'static>,
}

impl std::fmt::Debug for Enrolled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolled")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Enrolls at the trust center at `ca_addr`: makes a key and a CSR (naming `names`, or none to
/// get the token's names), sends it with `token`, checks the endpoint against `ca_cert` and the
/// certificate returned against our key.
///
/// # Errors
/// [`EnrollError::Refused`] with the CA's reason; connection, decoding and mismatch errors.
pub async fn enroll(
    ca_addr: SocketAddr,
    ca_cert: &CertificateDer<'static>,
    token: &str,
    names: &[String],
) -> Result<Enrolled, EnrollError> {
    let (key_pem, csr_pem) = key_and_csr(names)?;
    let csr =
        CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(setup_err)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.clone()).map_err(setup_err)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(setup_err)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServiceVerifier { inner }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_ENROLL.to_vec()];
    let quic = QuicClientConfig::try_from(Arc::new(tls)).map_err(setup_err)?;
    let local: SocketAddr = if ca_addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .map_err(setup_err)?;
    let mut endpoint = quinn::Endpoint::client(local).map_err(setup_err)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let server_name = ServerName::IpAddress(ca_addr.ip().into())
        .to_str()
        .into_owned();
    let exchange = async {
        let conn = endpoint
            .connect(ca_addr, &server_name)
            .map_err(|e| EnrollError::Connection(e.to_string()))?
            .await
            .map_err(|e| EnrollError::Connection(e.to_string()))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| EnrollError::Connection(e.to_string()))?;
        let request = EnrollRequest {
            token: token.to_owned(),
            csr: csr.to_vec(),
        };
        send.write_all(&request.encode())
            .await
            .map_err(|e| EnrollError::Connection(e.to_string()))?;
        let _ = send.finish();
        let response = recv
            .read_to_end(MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| EnrollError::Connection(e.to_string()))?;
        conn.close(0u32.into(), b"done");
        Ok::<_, EnrollError>(EnrollResponse::decode(&response)?)
    };
    let response = tokio::time::timeout(CONNECTION_DEADLINE, exchange)
        .await
        .map_err(|_| EnrollError::Connection("timed out".into()))??;
    endpoint.wait_idle().await;
    let (certificate, ca_certificate) = match response {
        EnrollResponse::Issued {
            certificate,
            ca_certificate,
        } => (certificate, ca_certificate),
        EnrollResponse::Refused(reason) => return Err(EnrollError::Refused(reason)),
    };
    // The CA certificate returned must be the one we pinned: a server of another CA (or one
    // that lies about ours) must not get its certificate written as our `ca.pem`.
    if ca_certificate != ca_cert.as_ref() {
        return Err(EnrollError::Mismatch(
            "the endpoint returned another CA certificate than the pinned one".into(),
        ));
    }
    let certificate = CertificateDer::from(certificate);
    let certificate_pem =
        securesmart_transport::pki::pem_encode("CERTIFICATE", certificate.as_ref());
    let identity = Identity::from_pem(&certificate_pem, &key_pem)
        .map_err(|e| EnrollError::Mismatch(e.to_string()))?;
    // The certificate must certify the key we generated.
    let ours =
        rcgen::KeyPair::from_pem(&key_pem).map_err(|e| EnrollError::Mismatch(e.to_string()))?;
    let our_id = NodeId::from_spki(&rcgen::PublicKeyData::subject_public_key_info(&ours));
    if identity.id() != our_id {
        return Err(EnrollError::Mismatch("certificate for another key".into()));
    }
    Ok(Enrolled {
        identity,
        certificate_pem,
        key_pem,
        ca_certificate: CertificateDer::from(ca_certificate),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_ones_are_errors() {
        let req = EnrollRequest {
            token: "ab".repeat(32),
            csr: vec![1, 2, 3],
        };
        assert_eq!(EnrollRequest::decode(&req.encode()), Ok(req.clone()));
        let mut bad = req.encode();
        bad.push(0);
        assert_eq!(EnrollRequest::decode(&bad), Err(WireError::Trailing(1)));
        let mut wrong_version = req.encode();
        wrong_version[0] = 9;
        assert!(EnrollRequest::decode(&wrong_version).is_err());
        let too_long = EnrollRequest {
            token: "x".repeat(MAX_TOKEN_BYTES + 1),
            csr: vec![],
        };
        assert!(matches!(
            EnrollRequest::decode(&too_long.encode()),
            Err(WireError::TooLong { .. })
        ));
        for resp in [
            EnrollResponse::Issued {
                certificate: vec![9; 10],
                ca_certificate: vec![8; 4],
            },
            EnrollResponse::Refused("no".into()),
        ] {
            assert_eq!(EnrollResponse::decode(&resp.encode()), Ok(resp));
        }
        assert!(EnrollResponse::decode(&[VERSION, 7]).is_err());
    }

    fn trust_center(name: &str) -> TrustCenter {
        let dir =
            std::env::temp_dir().join(format!("ss-enroll-{name}-{:016x}", rand::random::<u64>()));
        TrustCenter::init(&dir, name).unwrap()
    }

    /// A replica certificate of `ca` for 127.0.0.1, with its key (PKCS#8 DER).
    fn replica_at_loopback(ca: &mut TrustCenter) -> (CertificateDer<'static>, Vec<u8>) {
        let names = ["127.0.0.1".to_owned()];
        let token = ca
            .create_token(
                crate::trust_center::RoleName::Replica,
                &names,
                Duration::from_secs(60),
            )
            .unwrap();
        let (key, csr) = key_and_csr(&names).unwrap();
        let csr = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
        let issued = ca.sign_csr(&csr, &token).unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        (issued.certificate, key.secret_der().to_vec())
    }

    /// A one-shot endpoint on loopback presenting `cert` that answers any request with
    /// `response`, as a faulty or foreign server would.
    async fn fake_endpoint(
        cert: CertificateDer<'static>,
        key: Vec<u8>,
        response: EnrollResponse,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], PrivateKeyDer::try_from(key).unwrap())
            .unwrap();
        tls.alpn_protocols = vec![ALPN_ENROLL.to_vec()];
        let quic = QuicServerConfig::try_from(Arc::new(tls)).unwrap();
        let server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Ok(conn) = incoming.await else { continue };
                if let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let _ = recv.read_to_end(MAX_REQUEST_BYTES).await;
                    let _ = send.write_all(&response.encode()).await;
                    let _ = send.finish();
                    let _ = conn.closed().await;
                }
            }
        });
        (addr, task)
    }

    #[test]
    fn sources_count_against_their_subnet() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(subnet(ip("10.1.2.3")), ip("10.1.2.0"));
        assert_eq!(subnet(ip("10.1.2.200")), ip("10.1.2.0"));
        assert_ne!(subnet(ip("10.1.3.3")), ip("10.1.2.0"));
        assert_eq!(subnet(ip("::ffff:10.1.2.3")), ip("10.1.2.0"));
        assert_eq!(subnet(ip("2001:db8:0:ab::1")), ip("2001:db8:0::"));
        assert_eq!(subnet(ip("2001:db8:0:ff::9")), ip("2001:db8:0::"));
        assert_eq!(network(ip("10.1.2.3")), ip("10.1.0.0"));
        assert_eq!(network(ip("2001:db8:7:ab00::1")), ip("2001:db8:7::"));
    }

    /// Two addresses of one subnet hold at most its share of the connections in progress;
    /// another subnet still gets in, and a slot comes back when its connection ends.
    #[test]
    fn one_subnet_cannot_take_every_slot() {
        let limits = EnrollLimits::default();
        let state = Arc::new(ServerState {
            ca: Mutex::new(trust_center("slots")),
            tokens: Mutex::new(trust_center("slots-tokens")),
            limiter: RateLimiter::keyed(Quota::per_second(NonZeroU32::MIN)),
            in_flight: AtomicUsize::new(0),
            per_subnet: Mutex::new(std::collections::HashMap::new()),
            signing: tokio::sync::Semaphore::new(1),
            limits: limits.clone(),
        });
        let attacker = subnet("192.0.2.7".parse().unwrap());
        let held: Vec<Slot> = (0..100)
            .filter_map(|_| Slot::take(&state, attacker))
            .collect();
        assert_eq!(held.len(), limits.max_in_flight_per_subnet);
        let other = subnet("198.51.100.1".parse().unwrap());
        assert!(
            Slot::take(&state, other).is_some(),
            "another subnet gets in"
        );
        drop(held);
        assert!(
            Slot::take(&state, attacker).is_some(),
            "released slots come back"
        );
        assert_eq!(state.in_flight.load(Relaxed), 0);
        // Many subnets of one network (a /48 of IPv6 has 256 /56s) hold its share only.
        let site: Vec<Slot> = (0..=255u16)
            .flat_map(|k| {
                let ip: IpAddr = format!("2001:db8:7:{:x}00::1", k).parse().unwrap();
                (0..4)
                    .filter_map(|_| Slot::take(&state, ip))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(site.len(), limits.max_in_flight_per_network);
        assert!(Slot::take(&state, "2001:db8:8::1".parse().unwrap()).is_some());
    }

    /// `enroll` trusts only the trust center: an endpoint presenting a replica's certificate of
    /// the same CA (whose names cover the address) is refused at the handshake, and one that
    /// returns another CA certificate than the pinned one is refused before anything is kept.
    #[tokio::test]
    async fn enroll_refuses_a_replica_posing_as_the_endpoint_and_another_ca() {
        let mut ca = trust_center("pinned");
        let pinned = ca.ca_certificate();
        // A replica of our CA, listening at the address the node dials.
        let (cert, key) = replica_at_loopback(&mut ca);
        let (stolen, _) = replica_at_loopback(&mut ca);
        let forged = EnrollResponse::Issued {
            certificate: stolen.to_vec(),
            ca_certificate: pinned.to_vec(),
        };
        let (addr, task) = fake_endpoint(cert, key, forged).await;
        let err = enroll(addr, &pinned, "token", &[]).await.unwrap_err();
        assert!(matches!(err, EnrollError::Connection(_)), "{err}");
        task.abort();
        // Our CA's genuine service certificate, but the CA certificate returned is another.
        let (service, service_key) = ca
            .service_certificate(&["127.0.0.1".into()], Duration::from_secs(60))
            .unwrap();
        let other = trust_center("other").ca_certificate();
        // A certificate for the key enroll makes cannot be forged here; the check on the CA
        // comes first, so any certificate shows it.
        let lying = EnrollResponse::Issued {
            certificate: stolen.to_vec(),
            ca_certificate: other.to_vec(),
        };
        let (addr, task) = fake_endpoint(service, service_key.to_vec(), lying).await;
        let err = enroll(addr, &pinned, "token", &[]).await.unwrap_err();
        assert!(
            matches!(&err, EnrollError::Mismatch(m) if m.contains("another CA")),
            "{err}"
        );
        task.abort();
    }
}
