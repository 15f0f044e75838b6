//! The client library: requests over the replicas' client plane (QUIC, TLS 1.3 with the
//! client's certificate), accepted on f+1 matching replies.
//!
//! A [`Client`] keeps one request outstanding at a time (open several clients, each with its
//! own certificate, for concurrency). [`Client::invoke`] sends the request to every replica,
//! collects replies for its request number, and returns the result once f+1 distinct replicas
//! (at least one of them correct) returned the same bytes; replies from anything but a
//! configured replica, for another number, or that do not decode are ignored. Without f+1
//! matching replies it sends the request again every `retry` (replicas answer a
//! retransmission of an executed request from their reply cache) and gives up after `timeout`
//! with [`ClientError::Timeout`]; a later request never reuses the number.
//!
//! With [`Client::set_confidential`], application requests are marked confidential: the
//! replica that receives one seals it with the replicas' group key before it is ordered, so it
//! is ciphertext in the log, the journals and state transfer (see `securesmart::state`). The
//! client's own link is TLS either way. A confidential request the replicas refuse to open
//! (it was sealed in an epoch they no longer accept) was not executed; the client sends it
//! once more under a new number.
//!
//! Every request is signed with the client's key (Ed25519, see `securesmart::protocol`): the
//! replicas order a request only in the name of the client whose signature it carries, so a
//! faulty replica cannot forward requests, membership commands included, in anyone else's name.
//!
//! Request numbers start at the current time in microseconds and grow by one per request, so
//! a client that restarts keeps growing numbers without storing anything (a replica treats a
//! number at or below the client's last executed one as a retransmission).
//!
//! ```no_run
//! use securesmart::client::Client;
//! use securesmart::config::ClientConfig;
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ClientConfig::load(std::path::Path::new("client.toml"))?;
//! let mut client = Client::from_config(&config).await?;
//! client.put("greeting", "hello").await?;
//! assert_eq!(client.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use securesmart_transport::{
    Class, Identity, Inbox, Limits, NodeId, Plane, PlaneConfig, TrustConfig,
};

use crate::config::{ClientConfig, ConfigError, load_identity, load_peers, load_trust};
use crate::kv::{KvOp, KvReply};
use crate::protocol::{ClientReply, ClientRequest, Outcome, RequestKind, RequestSigner};
use securesmart_membership::MembershipCommand;

/// A client failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The configuration or a file it names.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The client plane could not start.
    #[error("transport: {0}")]
    Transport(#[from] securesmart_transport::TransportError),
    /// Not enough replicas could be reached.
    #[error("reached {reached} of {needed} replicas needed")]
    Unreachable {
        /// Replicas connected.
        reached: usize,
        /// Replicas needed.
        needed: usize,
    },
    /// No f+1 matching replies within the timeout.
    #[error("request {number} timed out without f+1 matching replies")]
    Timeout {
        /// The request number.
        number: u64,
    },
    /// The application refused the operation.
    #[error("refused: {0}")]
    Refused(String),
    /// f+1 replicas agreed on a reply that is not a key-value reply.
    #[error("reply does not decode: {0}")]
    BadReply(String),
    /// The client's key cannot sign requests (requests are signed with Ed25519).
    #[error("the client's key is not an Ed25519 key")]
    UnsupportedKey,
}

/// Timing of a client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Give up on a request after this long.
    pub timeout: Duration,
    /// Send again after this long without f+1 matching replies.
    pub retry: Duration,
    /// Transport limits.
    pub limits: Limits,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            retry: Duration::from_secs(1),
            limits: Limits::production(),
        }
    }
}

/// A client of the replicated service (see the module doc).
#[derive(Debug)]
pub struct Client {
    plane: Plane,
    inbox: Inbox,
    replicas: Vec<NodeId>,
    f: usize,
    number: u64,
    options: ClientOptions,
    confidential: bool,
    signer: RequestSigner,
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
}

impl Client {
    /// Connects to `replicas` (node id and client-plane address) as `identity`, trusting
    /// `trust` (the CA and CRLs; its peer set is replaced).
    ///
    /// # Errors
    /// [`ClientError::Transport`], or [`ClientError::Unreachable`] when fewer than f+1
    /// replicas answer within the timeout.
    pub async fn connect(
        identity: Identity,
        mut trust: TrustConfig,
        replicas: BTreeMap<NodeId, SocketAddr>,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let f = replicas.len().saturating_sub(1) / 3;
        let signer = RequestSigner::new(&identity).ok_or(ClientError::UnsupportedKey)?;
        trust.peers = replicas.clone();
        let local = if replicas.values().any(SocketAddr::is_ipv6) {
            SocketAddr::from(([0u16; 8], 0))
        } else {
            SocketAddr::from(([0u8; 4], 0))
        };
        let (plane, inbox) = Plane::client(
            PlaneConfig::new(identity, local, trust).with_limits(options.limits.clone()),
        )
        .await?;
        // Wait for every replica a while, but go on with f+1 (enough to get an answer).
        let all = replicas.len();
        if !plane
            .wait_connected(all, options.timeout.min(Duration::from_secs(3)))
            .await
            && !plane.wait_connected(f + 1, options.timeout).await
        {
            let reached = plane.connected_peers().len();
            plane.shutdown().await;
            return Err(ClientError::Unreachable {
                reached,
                needed: f + 1,
            });
        }
        Ok(Self {
            plane,
            inbox,
            replicas: replicas.into_keys().collect(),
            f,
            number: now_micros(),
            options,
            confidential: false,
            signer,
        })
    }

    /// Connects as a client configuration says.
    ///
    /// # Errors
    /// As [`Client::connect`], and [`ClientError::Config`].
    pub async fn from_config(config: &ClientConfig) -> Result<Self, ClientError> {
        let c = &config.client;
        let identity = load_identity(&c.certificate, &c.key)?;
        let trust = load_trust(&c.ca, c.crl.as_deref())?;
        let replicas = load_peers(&config.replicas)?
            .into_values()
            .map(|p| (p.id, p.client))
            .collect();
        let options = ClientOptions {
            timeout: config.timeout(),
            retry: config.retry(),
            limits: c.limits.limits(),
        };
        Self::connect(identity, trust, replicas, options).await
    }

    /// Faults tolerated (the client needs f+1 matching replies).
    pub fn f(&self) -> usize {
        self.f
    }

    /// This client's node id.
    pub fn id(&self) -> NodeId {
        self.plane.id()
    }

    /// Marks the application requests that follow as confidential (or not): see the module doc.
    pub fn set_confidential(&mut self, confidential: bool) {
        self.confidential = confidential;
    }

    /// Orders `payload` and returns the result f+1 replicas agree on.
    ///
    /// # Errors
    /// [`ClientError::Timeout`]; for a confidential request, [`ClientError::Refused`] when the
    /// replicas refused to open it twice.
    pub async fn invoke(&mut self, payload: Bytes) -> Result<Bytes, ClientError> {
        if !self.confidential {
            return self.send(RequestKind::App, payload).await;
        }
        for _ in 0..2 {
            // An empty reply is the replicas' refusal of a sealed request: not executed.
            let result = self
                .send(RequestKind::Confidential, payload.clone())
                .await?;
            if !result.is_empty() {
                return Ok(result);
            }
        }
        Err(ClientError::Refused(
            "the replicas could not open the sealed request".into(),
        ))
    }

    /// Orders a membership command (administrators only; see `securesmart::state`) and
    /// returns the replicas' verdict (`ok epoch N` or `refused: ...`).
    ///
    /// # Errors
    /// [`ClientError::Timeout`], or [`ClientError::Refused`] with the replicas' reason.
    pub async fn command(&mut self, command: &MembershipCommand) -> Result<String, ClientError> {
        let result = self
            .send(RequestKind::Command, Bytes::from(command.encode()))
            .await?;
        let text = String::from_utf8_lossy(&result).into_owned();
        match text.strip_prefix("refused: ") {
            Some(why) => Err(ClientError::Refused(why.to_owned())),
            None => Ok(text),
        }
    }

    async fn send(&mut self, kind: RequestKind, payload: Bytes) -> Result<Bytes, ClientError> {
        self.number += 1;
        let number = self.number;
        let request =
            Bytes::from(ClientRequest::signed(&self.signer, number, kind, payload).encode());
        let start = Instant::now();
        let deadline = start + self.options.timeout;
        let mut votes: HashMap<NodeId, Bytes> = HashMap::new();
        loop {
            self.plane.broadcast(Class::Consensus, &request);
            let resend = (Instant::now() + self.options.retry).min(deadline);
            while let Ok(Some(m)) = tokio::time::timeout_at(resend.into(), self.inbox.recv()).await
            {
                if !self.replicas.contains(&m.from) {
                    continue;
                }
                let Ok(reply) = ClientReply::decode(&m.payload) else {
                    metrics::counter!("securesmart_client_bad_replies_total").increment(1);
                    continue;
                };
                let Outcome::Executed(result) = reply.outcome else {
                    continue;
                };
                if reply.number != number {
                    continue;
                }
                votes.insert(m.from, result.clone());
                if votes.values().filter(|v| **v == result).count() > self.f {
                    metrics::histogram!("securesmart_client_latency_seconds")
                        .record(start.elapsed().as_secs_f64());
                    return Ok(result);
                }
            }
            if Instant::now() >= deadline {
                metrics::counter!("securesmart_client_timeouts_total").increment(1);
                return Err(ClientError::Timeout { number });
            }
            metrics::counter!("securesmart_client_retransmissions_total").increment(1);
        }
    }

    /// Runs a key-value operation.
    ///
    /// # Errors
    /// As [`Client::invoke`], [`ClientError::Refused`] and [`ClientError::BadReply`].
    pub async fn kv(&mut self, op: &KvOp) -> Result<Option<Bytes>, ClientError> {
        let result = self.invoke(Bytes::from(op.encode())).await?;
        match KvReply::decode(&result) {
            Ok(KvReply::Value(v)) => Ok(v),
            Ok(KvReply::Refused(why)) => Err(ClientError::Refused(why)),
            Err(e) => Err(ClientError::BadReply(e.to_string())),
        }
    }

    /// Sets `key` to `value`; returns the previous value.
    ///
    /// # Errors
    /// As [`Client::kv`].
    pub async fn put(
        &mut self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<Option<Bytes>, ClientError> {
        self.kv(&KvOp::Put {
            key: key.into(),
            value: value.into(),
        })
        .await
    }

    /// Reads `key` (through the order: linearizable).
    ///
    /// # Errors
    /// As [`Client::kv`].
    pub async fn get(&mut self, key: impl Into<Bytes>) -> Result<Option<Bytes>, ClientError> {
        self.kv(&KvOp::Get { key: key.into() }).await
    }

    /// Removes `key`; returns the previous value.
    ///
    /// # Errors
    /// As [`Client::kv`].
    pub async fn delete(&mut self, key: impl Into<Bytes>) -> Result<Option<Bytes>, ClientError> {
        self.kv(&KvOp::Delete { key: key.into() }).await
    }

    /// Closes the connections.
    pub async fn close(self) {
        self.plane.shutdown().await;
    }
}
