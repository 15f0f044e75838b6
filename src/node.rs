//! A replica: PBFT over the transport's replica plane, clients on the client plane, a
//! [`StateMachine`] executing what is ordered, and a journal in the data directory.
//!
//! [`Node::start`] wires the layers:
//! - two QUIC planes with mutual TLS: the replica plane (only the configured replicas are
//!   admitted) and the client plane (any client certificate of the CA that is not revoked);
//! - the PBFT driver ([`securesmart_consensus::driver::Pbft`]) over
//!   [`crate::replica_network::ReplicaNetwork`], durable through a
//!   [`securesmart_consensus::journal::FileJournal`] in `data_dir/consensus` (write-ahead:
//!   a vote leaves the node, and a batch executes, only after its record is fsynced);
//! - the application behind [`securesmart_consensus::service::Executor`] (reply cache,
//!   at-most-once execution), fed by [`securesmart_consensus::service::serve`];
//! - client intake: each [`ClientRequest`] is wrapped in the [`Ordered`] envelope and
//!   submitted; the client is the authenticated peer of the connection. A retransmission of the
//!   client's last executed request gets the cached reply again; every replica that executes a
//!   request replies, and the client accepts f+1 matching replies.
//!
//! A restarted node recovers from its journal ([`Replica::recover`]): the last stable
//! checkpoint, the committed batches after it (executed again, so the application state is
//! back), its accepted and prepared slots and its view; then it catches up with the others by
//! the normal protocol or by state transfer. A damaged journal (a snapshot that does not match
//! its certificate) stops the start rather than let the node vote with a forgotten past.
//!
//! Metrics (if `metrics_listen` is set, a Prometheus endpoint serves them): the transport's
//! and consensus's counters, and `securesmart_node_client_requests_total{outcome}`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use securesmart_consensus::driver::Pbft;
use securesmart_consensus::driver::{PbftError, Submitter};
use securesmart_consensus::journal::FileJournal;
use securesmart_consensus::message::{KeyRing, Limits, Request, Signer};
use securesmart_consensus::replica::{Config, Replica};
use securesmart_consensus::service::{Executor, Reply, RestoreError, StateMachine, serve};
use securesmart_transport::{Class, Inbox, NodeId, Plane, PlaneConfig};
use tokio::task::JoinHandle;

use crate::config::{ConfigError, NodeConfig, load_identity, load_peers, load_trust};
use crate::protocol::{ClientReply, ClientRequest, Ordered, Outcome};
use crate::replica_network::ReplicaNetwork;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The configuration or a file it names.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A plane could not start.
    #[error("transport: {0}")]
    Transport(#[from] securesmart_transport::TransportError),
    /// The journal could not be opened or recovered.
    #[error("journal: {0}")]
    Journal(String),
    /// The metrics endpoint could not start.
    #[error("metrics endpoint: {0}")]
    Metrics(String),
}

/// Replies cached per client: the last request number and its result.
type ReplyCache = Arc<Mutex<HashMap<NodeId, (u64, Bytes)>>>;

/// A running replica.
#[derive(Debug)]
pub struct Node {
    id: NodeId,
    replica_plane: Plane,
    client_plane: Plane,
    tasks: Vec<JoinHandle<()>>,
    serving: JoinHandle<Result<(), String>>,
}

/// The application behind the node's envelope: decodes [`Ordered`] and runs the application
/// request; a payload that does not decode (only a faulty primary proposes one) gets an empty
/// reply at every replica alike.
#[derive(Debug)]
pub struct Enveloped<S>(pub S);

impl<S: StateMachine> StateMachine for Enveloped<S> {
    fn execute(&mut self, request: &Request) -> Bytes {
        match Ordered::decode(&request.payload) {
            Ok(Ordered::App(payload)) => self.0.execute(&Request {
                client: request.client,
                number: request.number,
                payload,
            }),
            Err(e) => {
                metrics::counter!("securesmart_node_undecodable_ordered_total").increment(1);
                tracing::warn!(error = %e, client = ?request.client, "ordered request does not decode");
                Bytes::new()
            }
        }
    }

    fn snapshot(&self) -> Bytes {
        self.0.snapshot()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        self.0.restore(snapshot)
    }
}

fn client_counter(outcome: &'static str) {
    metrics::counter!("securesmart_node_client_requests_total", "outcome" => outcome).increment(1);
}

impl Node {
    /// Starts a replica from its configuration, running `app`.
    ///
    /// # Errors
    /// [`NodeError`] when a file, the journal, a socket or the metrics endpoint fails.
    pub async fn start<S: StateMachine + 'static>(
        config: &NodeConfig,
        app: S,
    ) -> Result<Self, NodeError> {
        let n = &config.node;
        if let Some(addr) = n.metrics_listen {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .map_err(|e| NodeError::Metrics(e.to_string()))?;
        }
        let identity = load_identity(&n.certificate, &n.key)?;
        let id = identity.id();
        let signer = Signer::new(&identity).ok_or_else(|| {
            NodeError::Config(ConfigError::Invalid("the node key is not Ed25519".into()))
        })?;
        let trust = load_trust(&n.ca, n.crl.as_deref())?;
        let peers = load_peers(&config.replicas)?;
        if !peers.contains_key(&id) {
            return Err(NodeError::Config(ConfigError::Invalid(format!(
                "this node ({id}) is not among the [[replicas]]"
            ))));
        }
        let mut replica_trust = trust.clone();
        for p in peers.values() {
            if let Some(addr) = p.replica {
                replica_trust.peers.insert(p.id, addr);
            }
        }
        let limits = n.limits.limits();
        let (replica_plane, replica_inbox) = Plane::replica(
            PlaneConfig::new(identity.clone(), n.replica_listen, replica_trust)
                .with_limits(limits.clone()),
        )
        .await?;
        let (client_plane, client_inbox) = Plane::client_listener(
            PlaneConfig::new(identity, n.client_listen, trust).with_limits(limits),
        )
        .await?;

        let k = &config.consensus;
        let mut core = Config::new(peers.keys().copied().collect());
        core.max_batch = k.max_batch;
        core.batch_delay = Duration::from_millis(k.batch_delay_ms);
        core.checkpoint_interval = k.checkpoint_interval;
        core.window = k.window;
        core.view_change_timeout = Duration::from_millis(k.view_change_timeout_ms);
        core.durable = true;
        let wire_limits = Limits::default();
        let (journal, records) = FileJournal::open(&n.data_dir.join("consensus"), &wire_limits)
            .map_err(|e| NodeError::Journal(e.to_string()))?;
        let recovered = records.len();
        let replica = Replica::recover(core, signer, records)
            .map_err(|e| NodeError::Journal(e.to_string()))?;
        tracing::info!(
            node = %id,
            records = recovered,
            executed = replica.executed(),
            view = replica.view(),
            "replica starting"
        );
        let ring = KeyRing::new(peers.values().map(|p| (p.id, p.key)));
        let network = ReplicaNetwork::new(replica_plane.clone(), replica_inbox);
        let (mut pbft, driver) =
            Pbft::spawn_durable(replica, ring, network, wire_limits, Some(Box::new(journal)));

        let submitter = pbft.submitter();
        let cache: ReplyCache = Arc::default();
        let serving = {
            let (cache, clients) = (Arc::clone(&cache), client_plane.clone());
            tokio::spawn(async move {
                let mut executor = Executor::new(Enveloped(app));
                serve(&mut pbft, &mut executor, |reply: Reply| {
                    let message = ClientReply {
                        number: reply.number,
                        outcome: Outcome::Executed(reply.result.clone()),
                    };
                    if let Ok(mut c) = cache.lock() {
                        c.insert(reply.client, (reply.number, reply.result));
                    }
                    let _ = clients.try_send(
                        reply.client,
                        Class::Consensus,
                        Bytes::from(message.encode()),
                    );
                })
                .await
                .map_err(|e| e.to_string())
            })
        };
        let intake = tokio::spawn(intake(client_inbox, client_plane.clone(), submitter, cache));
        let mut tasks = vec![driver, intake];
        if let Some(path) = n.crl.clone() {
            tasks.push(tokio::spawn(watch_crl(
                path,
                [replica_plane.clone(), client_plane.clone()],
            )));
        }
        Ok(Self {
            id,
            replica_plane,
            client_plane,
            tasks,
            serving,
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The replica plane's local address.
    ///
    /// # Errors
    /// When the socket is gone.
    pub fn replica_addr(&self) -> std::io::Result<SocketAddr> {
        self.replica_plane.local_addr()
    }

    /// The client plane's local address.
    ///
    /// # Errors
    /// When the socket is gone.
    pub fn client_addr(&self) -> std::io::Result<SocketAddr> {
        self.client_plane.local_addr()
    }

    /// The replica plane (stats, trust updates).
    pub fn replica_plane(&self) -> &Plane {
        &self.replica_plane
    }

    /// The client plane (stats, trust updates).
    pub fn client_plane(&self) -> &Plane {
        &self.client_plane
    }

    /// Runs until the engine stops (a journal failure) or `shutdown` resolves, then shuts
    /// down.
    ///
    /// # Errors
    /// Why the engine stopped, if it did on its own.
    pub async fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), String> {
        let outcome = tokio::select! {
            r = &mut self.serving => Some(r.map_err(|e| e.to_string()).and_then(|r| r)),
            () = shutdown => None,
        };
        self.stop().await;
        match outcome {
            Some(Ok(())) | None => Ok(()),
            Some(Err(e)) => Err(e),
        }
    }

    /// Stops the node: closes both planes and ends its tasks.
    pub async fn stop(&self) {
        self.client_plane.shutdown().await;
        self.replica_plane.shutdown().await;
        for t in &self.tasks {
            t.abort();
        }
        self.serving.abort();
    }
}

/// How often the node looks at its CRL file.
pub const CRL_POLL: Duration = Duration::from_secs(1);

/// Re-reads the CRL file when it changes and hands it to both planes (which close the live
/// connections it revokes). A file that cannot be read or parsed keeps the current CRL and is
/// logged and counted.
async fn watch_crl(path: std::path::PathBuf, planes: [Plane; 2]) {
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // The first look always reloads: the file may have changed since the node read it.
    let mut seen = None;
    let mut tick = tokio::time::interval(CRL_POLL);
    loop {
        tick.tick().await;
        let now = modified(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let crl = match crate::config::load_crl(&path) {
            Ok(crl) => crl,
            Err(e) => {
                metrics::counter!("securesmart_node_crl_reload_errors_total").increment(1);
                tracing::warn!(error = %e, "CRL file unreadable; keeping the current CRL");
                continue;
            }
        };
        for plane in &planes {
            let mut trust = plane.trust();
            trust.crls = vec![crl.clone()];
            match plane.update_trust(trust) {
                Ok(closed) => {
                    metrics::counter!("securesmart_node_crl_reloads_total").increment(1);
                    tracing::info!(closed, "CRL reloaded");
                }
                Err(e) => {
                    metrics::counter!("securesmart_node_crl_reload_errors_total").increment(1);
                    tracing::warn!(error = %e, "CRL refused; keeping the current CRL");
                }
            }
        }
    }
}

/// Client intake: decodes requests, answers retransmissions from the cache, submits the rest.
async fn intake(mut inbox: Inbox, clients: Plane, submitter: Submitter, cache: ReplyCache) {
    while let Some(m) = inbox.recv().await {
        let request = match ClientRequest::decode(&m.payload) {
            Ok(r) => r,
            Err(e) => {
                client_counter("undecodable");
                tracing::debug!(client = ?m.from, error = %e, "undecodable client request");
                continue;
            }
        };
        let cached = cache.lock().ok().and_then(|c| c.get(&m.from).cloned());
        if let Some((number, result)) = cached {
            if request.number == number {
                client_counter("cached");
                let reply = ClientReply {
                    number,
                    outcome: Outcome::Executed(result),
                };
                let _ = clients.try_send(m.from, Class::Consensus, Bytes::from(reply.encode()));
                continue;
            }
            if request.number < number {
                client_counter("stale");
                continue;
            }
        }
        let ordered = Request {
            client: m.from,
            number: request.number,
            payload: Ordered::App(request.payload).encode(),
        };
        match submitter.submit(ordered) {
            Ok(()) => client_counter("submitted"),
            Err(PbftError::Busy) => {
                client_counter("busy");
                let reply = ClientReply {
                    number: request.number,
                    outcome: Outcome::Busy,
                };
                let _ = clients.try_send(m.from, Class::Consensus, Bytes::from(reply.encode()));
            }
            Err(_) => break,
        }
    }
}
