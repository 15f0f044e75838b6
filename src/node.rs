//! A replica: PBFT over the transport's replica plane, clients on the client plane, the
//! replicated [`NodeState`] (membership and application) executing what is ordered, and a
//! journal in the data directory.
//!
//! [`Node::start`] wires the layers:
//! - two QUIC planes with mutual TLS: the replica plane (only current members are admitted)
//!   and the client plane (any client certificate of the CA that is not revoked);
//! - the PBFT driver ([`securesmart_consensus::driver::Pbft`]) over
//!   [`crate::replica_network::ReplicaNetwork`], durable through a
//!   [`securesmart_consensus::journal::FileJournal`] in `data_dir/consensus` (write-ahead:
//!   a vote leaves the node, and a batch executes, only after its record is written, and a
//!   commit only after the prepared certificate is fsynced);
//! - the [`NodeState`] behind [`securesmart_consensus::service::Executor`] (reply cache,
//!   at-most-once execution);
//! - client intake: each [`ClientRequest`] is wrapped in the [`Ordered`] envelope and
//!   submitted; the client is the authenticated peer of the connection. A retransmission of the
//!   client's last executed request gets the cached reply again; every replica that executes a
//!   request replies, naming the roster it is at ([`crate::roster`]: after every batch that
//!   changes the replica set, each replica of the previous roster orders its signature on the
//!   new one), and answers clients' roster queries from the replicated state.
//!
//! # Membership
//! Membership commands are ordered requests (see [`crate::state`]). When one executes at
//! sequence number `s`, every replica hands the new replica set to the engine
//! ([`Ordering::reconfigure`]: PBFT switches groups above `s + window`, rounded up to a
//! checkpoint) and replaces the trust of its planes: a new replica is admitted at once (it
//! catches up by state transfer and takes part from the switch on); a removed one stays admitted
//! and keeps voting until the switch (the old group still counts on it), then is cut off and
//! refused, and stops itself; a revoked one is refused at once (its certificate no longer
//! verifies), which costs the old group one vote until the switch, and stops itself once no
//! current replica keeps a link with it and a CRL of our CA that it holds (ordered, or its CRL
//! file's) revokes the certificate it presents, whether or not it executed its own revocation
//! (it may have been down, or behind, when that was ordered). A replica whose renewal (in its
//! certificate file, valid under our CA) is not yet ordered in its own state presents that
//! renewal instead of stopping. A replica that missed its own removal learns of it from the
//! others' client planes, and believes it only from a roster that a quorum of that roster
//! confirms, so f faulty replicas cannot stop a correct one. A node whose certificate is
//! not among the configured `[[replicas]]` starts as a joiner: it first asks those replicas,
//! as a client, for the certified roster changes after the configured roster (`roster` in its
//! `[node]` section) and takes the current roster's replicas as the ones it trusts (a joiner
//! configured with removed replicas is not at their mercy); then it waits to be admitted (an
//! administrator orders its `AddNode`) and fetches the state. A client plane answers a replica
//! only its roster queries. The CRL file, if configured,
//! is watched: when it changes the node submits it as an ordered `UpdateCrl`, so that every
//! replica switches CRLs at the same log position; until the first ordered CRL, and whenever the
//! file holds a newer CRL of our CA than the ordered one (one that expired, say), the planes use
//! the file's. With a journal, the genesis membership is read as history (its certificates
//! checked as of their issue), so a node restarts from its journal whatever their age; with an
//! empty one, the configured replicas must be valid now and not revoked by the CRL file.
//! The certificate file is watched too: a renewal of the node's key written there is ordered
//! as its `RenewNode`, and once the membership holds it both planes present it and replace
//! their links with connections made with it (`Plane::renew_identity`), without a restart.
//!
//! # Recovery
//! A restarted node recovers from its journal ([`Replica::recover`]): the last stable
//! checkpoint, the committed batches after it (executed again, so the state is back), its
//! accepted and prepared slots and its view; then it catches up by the normal protocol or by
//! state transfer. Only view records and prepared certificates are synced before the node
//! goes on (see `securesmart_consensus::journal`), so a replica whose machine restarted sends
//! no new pre-prepare or prepare in the view it was in: it commits, executes and answers
//! there, and votes again in the next view it enters. After a stop of the process alone (the
//! journal's boot id is this boot's) it votes on at once. A damaged journal (a snapshot that does not match its certificate) stops the
//! start rather than let the node vote with a forgotten past.
//!
//! Metrics (if `metrics_listen` is set, a Prometheus endpoint serves them): the transport's
//! and consensus's counters (`securesmart_consensus_executed_seq`, `..._stable_seq`, `..._view`,
//! `..._dropped_total{reason}`, ...), `securesmart_node_client_requests_total{outcome}`,
//! `securesmart_node_membership_changes_total`, `securesmart_node_members`, the group key's
//! (`securesmart_node_group_epoch`, `..._rekeys_total`), `securesmart_node_sealed_opened_total`,
//! `securesmart_node_sealed_refused_total{why}`, `securesmart_node_checkpoints_sealed_total`,
//! `securesmart_node_state_lost_total` and `securesmart_node_unsigned_requests_total` (requests
//! the engine refused before ordering: not signed by their client).
//!
//! Intake takes a client's requests from its mutual-TLS connection, which proves they are the
//! client's, without checking their signatures; the engine checks them where no channel
//! vouches for them ([`crate::protocol::request_check`], see
//! `Replica::handle_authenticated_request`). The node signs its own requests with its key.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::CertificateRevocationListDer;
use securesmart_consensus::driver::{Pbft, PbftError, Submitter};
use securesmart_consensus::journal::FileJournal;
use securesmart_consensus::message::{KeyRing, Limits, Request, Seq, Signer};
use securesmart_consensus::replica::{Config, Replica};
use securesmart_consensus::service::{Event, Executor, Member, Ordering, StateMachine};
use securesmart_membership::{
    GroupConfig, GroupMember, Membership, MembershipCommand, PayloadKeys, RotationPolicy,
};
use securesmart_transport::{
    Class, Inbox, NodeId, Plane, PlaneConfig, Role, TrustConfig, ed25519_public_key,
};
use tokio::task::JoinHandle;

use crate::config::{
    ConfigError, NodeConfig, load_certificate, load_identity, load_peers, load_trust,
};
use crate::group_key::GroupKey;
use crate::protocol::{
    ClientReply, ClientRequest, Ordered, Outcome, RequestKind, RequestSigner, SealerSignature,
    confidential_context,
};
use crate::replica_network::ReplicaNetwork;
use crate::roster::{RosterChange, RosterLog};
use crate::state::NodeState;
use securesmart_membership::ClientSealingKey;

/// The environment variable that must be `1` besides `[consensus] insecure_baseline` (two
/// switches, one in the file and one in the process, for the bench's `baseline` mode).
pub const INSECURE_BASELINE_ENV: &str = "SECURESMART_INSECURE_BASELINE";
/// The replica plane's ALPN in the `baseline` mode (signing replicas refuse it).
const INSECURE_BASELINE_ALPN: &[u8] = b"securesmart-replica-INSECURE-baseline/1";

/// The `baseline` mode runs only with both switches on: the configuration's and the
/// environment's ([`INSECURE_BASELINE_ENV`] = `1`).
fn baseline_allowed(baseline: bool, env: Option<&str>) -> Result<(), NodeError> {
    if baseline && env != Some("1") {
        return Err(NodeError::Config(ConfigError::Invalid(format!(
            "[consensus] insecure_baseline switches off every signature check; it runs only \
             with {INSECURE_BASELINE_ENV}=1 in the environment as well (securesmart bench)"
        ))));
    }
    Ok(())
}

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
    /// The genesis group is not a valid membership.
    #[error("genesis membership: {0}")]
    Genesis(String),
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

fn client_counter(outcome: &'static str) {
    metrics::counter!("securesmart_node_client_requests_total", "outcome" => outcome).increment(1);
}

/// Requests the node submits itself (CRL updates), numbered like a client's.
#[derive(Clone, Debug)]
struct SelfRequests {
    signer: Arc<RequestSigner>,
    number: Arc<AtomicU64>,
    submitter: Submitter,
}

impl SelfRequests {
    /// Request `number` of this replica executed (replayed from the journal, restored with a
    /// snapshot, or ordered now): later requests are numbered above it. The first number
    /// comes from the wall clock, so without this a clock stepped back across a restart would
    /// number new requests below executed ones, and they would be dropped as duplicates.
    fn passed(&self, number: u64) {
        self.number.fetch_max(
            number.saturating_add(1),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Submits a membership command in this replica's name, stamped with the time now.
    fn submit_command(&self, command: &MembershipCommand) -> Result<(), PbftError> {
        self.submit(Ordered::Command {
            time: unix_now(),
            command: Bytes::from(command.encode()),
        })
    }

    /// Signs `payload` as this replica's next request and submits it.
    fn submit(&self, payload: Ordered) -> Result<(), PbftError> {
        let number = self
            .number
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.submitter.submit_and_forward(Request {
            client: self.signer.id(),
            number,
            payload: self.signer.submission(number, payload).encode(),
        })
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How many more times a joiner asks for the roster before it falls back to its configuration.
const JOINER_ROSTER_TRIES: usize = 10;

/// The current roster, followed from the one `node`'s configuration lists (`configured`,
/// roster `node.roster`), asking as a client over the replicas' client planes.
async fn current_roster(
    identity: &securesmart_transport::Identity,
    trust: &TrustConfig,
    node: &crate::config::NodeSection,
    configured: &BTreeMap<NodeId, crate::config::Peer>,
) -> Result<crate::roster::Roster, crate::client::ClientError> {
    let roster = crate::config::peers_roster(node.roster, configured);
    let options = crate::client::ClientOptions {
        timeout: Duration::from_secs(5),
        retry: Duration::from_millis(500),
        limits: node.limits.limits(),
        bind: None,
    };
    let mut client =
        crate::client::Client::connect(identity.clone(), trust.clone(), roster, options).await?;
    // Until f + 1 replicas of the roster it reached answered (one of them correct): a joiner
    // that heard nobody must not take its configuration for the current roster unawares.
    let mut current = client.refresh_roster().await.cloned();
    for _ in 0..JOINER_ROSTER_TRIES {
        if current.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        current = client.refresh_roster().await.cloned();
    }
    client.close().await;
    current
}

/// The peers a roster names (ids, keys and addresses from its certificates).
fn peers_of(roster: &crate::roster::Roster) -> BTreeMap<NodeId, crate::config::Peer> {
    roster
        .replicas()
        .iter()
        .filter_map(|(id, e)| {
            Some((
                *id,
                crate::config::Peer {
                    id: *id,
                    key: ed25519_public_key(&e.certificate)?,
                    certificate: e.certificate.clone(),
                    replica: Some(e.replica_addr),
                    client: e.client_addr,
                },
            ))
        })
        .collect()
}

/// The replicas of a membership as the engine needs them (id and Ed25519 key).
fn engine_members(m: &Membership) -> Vec<Member> {
    m.members()
        .iter()
        .filter(|(_, mem)| mem.role == Role::Replica)
        .filter_map(|(id, mem)| {
            ed25519_public_key(&mem.certificate).map(|key| Member { id: *id, key })
        })
        .collect()
}

/// What the state-machine task needs besides the engine and the state.
struct Host {
    id: NodeId,
    cache: ReplyCache,
    replica_plane: Plane,
    client_plane: Plane,
    /// The CRL from the configured file, used until the membership carries one.
    local_crl: Arc<Mutex<Option<CertificateRevocationListDer<'static>>>>,
    /// The epoch client intake seals confidential requests in ([`NO_EPOCH`]: none yet).
    sealable: Arc<AtomicU64>,
    /// The rosters as intake answers clients with them.
    rosters: Rosters,
    /// Woken when an ordered CRL executes: the CRL watcher then orders the revoked
    /// certificates (which the state takes only once the CRL that lists them is ordered).
    crl_ordered: Arc<tokio::sync::Notify>,
    /// Set by the CRL watcher when the file changed: the planes' trust is refreshed at the
    /// next tick (a CRL file newer than an expired ordered CRL must reach the planes before
    /// it can be ordered).
    crl_file_changed: Arc<AtomicBool>,
    /// The renewed identity from the certificate file, until the membership orders its
    /// certificate (`RenewNode`): then both planes present it ([`Host::install_renewal`]).
    renewed: Arc<Mutex<Option<securesmart_transport::Identity>>>,
    /// The identity both planes present.
    presented: Arc<Mutex<securesmart_transport::Identity>>,
    /// The planes' limits (for the client that asks other replicas for the roster).
    limits: securesmart_transport::Limits,
}

/// The replicated state's roster log as client intake sees it: published by the state task
/// after every batch that changed it.
#[derive(Clone)]
struct Rosters {
    log: Arc<Mutex<RosterLog>>,
    current: Arc<AtomicU64>,
}

impl Rosters {
    fn new(log: RosterLog) -> Self {
        Self {
            current: Arc::new(AtomicU64::new(log.certified().number())),
            log: Arc::new(Mutex::new(log)),
        }
    }

    /// The newest certified roster's number (what replies name: a client can follow it).
    fn current(&self) -> u64 {
        self.current.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes `log` if it differs from the published one.
    fn publish(&self, log: &RosterLog) {
        if let Ok(mut published) = self.log.lock()
            && published.version() != log.version()
        {
            *published = log.clone();
            self.current.store(
                log.certified().number(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    /// The certified changes after roster `number`, encoded for a client.
    fn since(&self, number: u64) -> Bytes {
        let changes = self.log.lock().map(|l| l.since(number)).unwrap_or_default();
        Bytes::from(RosterChange::encode_list(&changes))
    }
}

/// [`Host::sealable`] when no epoch is sealable.
const NO_EPOCH: u64 = u64::MAX;

impl Host {
    /// Publishes the epoch the replicated state lets intake seal in.
    fn publish_sealable<S: StateMachine>(&self, state: &NodeState<S>) {
        self.sealable.store(
            state.sealable_epoch().unwrap_or(NO_EPOCH),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Gives both planes the trust the membership implies (members, CRL), keeping blocklists;
    /// `leaving` replicas stay admitted until the group without them takes over. The planes use
    /// the ordered CRL, or the CRL file when our CA signed it with a higher number: an ordered
    /// CRL that expired would otherwise refuse every reconnect, and with them the ordering of
    /// the fresh one.
    fn update_trust(&self, m: &Membership, leaving: &[Leaving]) {
        let local = self.local_crl.lock().ok().and_then(|c| c.clone());
        let crls = match (m.crl(), local) {
            (Some((number, _)), Some(file))
                if m.our_crl_number(&file).is_some_and(|n| n > *number) =>
            {
                vec![file]
            }
            (Some((_, crl)), _) => vec![crl.clone()],
            (None, Some(crl)) => vec![crl],
            (None, None) => Vec::new(),
        };
        let keep = |mut next: TrustConfig, current: TrustConfig| {
            next.blocked_ids = current.blocked_ids;
            next.blocked_ips = current.blocked_ips;
            next
        };
        let mut replica = m.replica_trust();
        replica.crls = crls.clone();
        for l in leaving {
            replica.peers.insert(l.id, l.addr);
        }
        let mut client = self.client_plane.trust();
        client.crls = crls;
        let results = [
            self.replica_plane
                .update_trust(keep(replica, self.replica_plane.trust())),
            self.client_plane.update_trust(client),
        ];
        for r in results {
            match r {
                Ok(closed) if closed > 0 => {
                    tracing::info!(closed, "connections closed by a membership change");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "trust update refused"),
            }
        }
        metrics::gauge!("securesmart_node_members").set(m.replicas() as f64);
        metrics::gauge!("securesmart_node_leaving").set(leaving.len() as f64);
        metrics::gauge!("securesmart_node_revoked_certificates").set(m.revoked_count() as f64);
        metrics::gauge!("securesmart_node_membership_epoch").set(m.epoch() as f64);
    }

    /// Brings the certificate the planes present in line with the one the membership holds
    /// for this node. The certificate file's identity waits in [`Host::renewed`] (from the
    /// start: a renewal written while the node was down is ordered too) until the membership
    /// holds it; then both planes present it, unless they already do, and replace their links
    /// with connections made with it. A node that is not a member (a joiner) has nothing to
    /// renew: it is added with the certificate it presents.
    fn install_renewal(&self, m: &Membership) {
        let Some(identity) = self.renewed.lock().ok().and_then(|p| p.clone()) else {
            return;
        };
        let Some(file) = identity.chain().first() else {
            return;
        };
        let shown = self.shown(file);
        match m.members().get(&self.id).map(|mem| &mem.certificate) {
            None if shown => {}
            Some(c) if c == file => {
                if !shown {
                    self.present(&identity);
                }
            }
            _ => return,
        }
        // Done with it (presented, or refused by a plane: then logged and counted once).
        if let Ok(mut pending) = self.renewed.lock()
            && pending.as_ref().and_then(|i| i.chain().first()) == Some(file)
        {
            *pending = None;
        }
    }

    /// Whether the replica plane presents `cert`.
    fn shown(&self, cert: &rustls::pki_types::CertificateDer<'_>) -> bool {
        self.presented
            .lock()
            .is_ok_and(|p| p.chain().first() == Some(cert))
    }

    /// Has both planes present `identity` and replace their links with connections made with
    /// it; returns whether the replica plane does. [`Host::presented`] follows the replica
    /// plane (what the others and the revocation check look at), even if the client plane then
    /// refuses it.
    fn present(&self, identity: &securesmart_transport::Identity) -> bool {
        for plane in [&self.replica_plane, &self.client_plane] {
            match plane.renew_identity(identity.clone()) {
                Ok(replacing) => tracing::info!(replacing, "presenting the renewed certificate"),
                Err(e) => {
                    metrics::counter!("securesmart_node_certificate_reload_errors_total")
                        .increment(1);
                    tracing::error!(error = %e, "cannot present the renewed certificate");
                    // The replica plane's certificate is the one that counts (for the others
                    // and for the revocation check): presented if that plane took it.
                    return !std::ptr::eq(plane, &self.replica_plane);
                }
            }
            if std::ptr::eq(plane, &self.replica_plane)
                && let Ok(mut presented) = self.presented.lock()
            {
                *presented = identity.clone();
            }
        }
        metrics::counter!("securesmart_node_certificate_renewals_total").increment(1);
        true
    }

    /// Drops the leaving replicas once a checkpoint after their switch is stable (`stable`):
    /// the group without them executed past the switch, laggards can fetch the state, and the
    /// leaving replica, admitted until then, has received the checkpoints of the new group that
    /// tell it so (cutting it off at the switch itself could leave it without the last
    /// checkpoint message it needs, running forever). Returns whether this replica is one of
    /// them (it should stop).
    fn settle_leaving(&self, leaving: &mut Vec<Leaving>, stable: u64, m: &Membership) -> bool {
        let gone = leaving.iter().any(|l| l.until < stable);
        if !gone {
            return false;
        }
        leaving.retain(|l| l.until >= stable);
        self.update_trust(m, leaving);
        if m.members().contains_key(&self.id) {
            return false;
        }
        tracing::warn!(stable, "the group without this replica took over; stopping");
        true
    }

    /// Whether this replica holds no link to any other current replica.
    fn isolated(&self, m: &Membership) -> bool {
        let current = m.replica_ids();
        !self
            .replica_plane
            .connected_peers()
            .iter()
            .any(|p| current.contains(p))
    }

    /// Whether this replica, isolated, is out, and why: no longer a member (the others cut it
    /// off once the group without it took over; it may have missed the checkpoint messages
    /// that would tell it so itself), or revoked by a CRL it holds (the others refuse it; it
    /// may not have executed that CRL, having lagged behind or been down when it was ordered,
    /// and now never will). A CRL is signed by our CA, so no peer can make a correct replica
    /// believe itself revoked. A revoked certificate with a renewal pending is not out: the
    /// others may have ordered the renewal, and the CRL that superseded the old certificate,
    /// while this replica was behind; it presents the renewal instead
    /// ([`Host::present_pending_renewal`]), and is out only when that is revoked too.
    fn out(&self, m: &Membership) -> Option<&'static str> {
        if !m.members().contains_key(&self.id) {
            return Some("removed");
        }
        if self.revoked() && !self.present_pending_renewal() {
            return Some("revoked");
        }
        None
    }

    /// Presents the certificate file's renewal ahead of its ordering, when our CA issued it, no
    /// CRL it holds revokes it, and it starts later than the certificate presented (a renewal
    /// goes only forward, as `RenewNode` requires: an older certificate of the same key must
    /// not dodge the CRL that names the newer one); returns whether it does. Its validity
    /// dates are left to the others, which admit it or not: a clock far off here must not
    /// stop a replica they admit. For a replica whose presented certificate is revoked: only
    /// the others' membership can hold the renewal then.
    fn present_pending_renewal(&self) -> bool {
        let Some(renewal) = self.renewed.lock().ok().and_then(|p| p.clone()) else {
            return false;
        };
        let presented = self.presented.lock().ok().map(|p| p.clone());
        let checked = securesmart_transport::TrustState::new(self.replica_plane.trust())
            .map_err(|e| e.to_string())
            .and_then(|t| {
                let (Some(new), Some(old)) = (
                    renewal.chain().first(),
                    presented.as_ref().and_then(|p| p.chain().first()),
                ) else {
                    return Err("no certificate".to_owned());
                };
                t.issued(new).map_err(|r| r.to_string())?;
                if t.revokes(new) {
                    return Err("revoked too".to_owned());
                }
                match securesmart_membership::epoch::starts_later(new, old) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err("it does not start later than the one presented".to_owned()),
                    Err(e) => Err(e.to_string()),
                }
            });
        if let Err(refusal) = checked {
            tracing::warn!(%refusal, "the certificate presented is revoked and the renewal is refused");
            return false;
        }
        tracing::warn!(
            "the certificate presented is revoked: presenting the renewal from the certificate file before it is ordered here"
        );
        self.present(&renewal)
    }

    /// Asks the client planes of `roster`'s replicas (this replica's certified roster) for
    /// the certified changes after it until a quorum of the newest one answered at it with
    /// nothing newer ([`crate::client::removes`]), and answers whether that roster removes this
    /// replica. A member that missed its own removal (down or behind when it executed, and
    /// refused by the others since) learns it so. Each change carries the signatures of a
    /// quorum of the roster before it, so this holds while fewer than a quorum of this
    /// replica's certified roster are faulty, or were removed since with their keys in an
    /// attacker's hands (the gap clients have too, see `SECURITY.md`). The query goes to this
    /// replica's own client plane too (it is in the roster): its answer names only the roster
    /// this replica already holds, so it can only count toward "not removed".
    fn removal_check(&self, roster: crate::roster::Roster) -> RemovalCheck {
        let identity = self.presented.lock().ok().map(|i| i.clone());
        let trust = self.client_plane.trust();
        let options = crate::client::ClientOptions {
            timeout: Duration::from_secs(5),
            retry: Duration::from_millis(500),
            limits: self.limits.clone(),
            bind: None,
        };
        let id = self.id;
        RemovalCheck(tokio::spawn(async move {
            let Some(identity) = identity else {
                return Removal::Unknown;
            };
            let before = roster.number();
            let mut client =
                match crate::client::Client::connect(identity, trust, roster, options).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::info!(error = %e, "removal check: no replica reached");
                        return Removal::Unknown;
                    }
                };
            let deadline = std::time::Instant::now() + REMOVAL_CHECK_TIME;
            let removal = match client.confirm_roster(deadline).await {
                Ok(()) if crate::client::removes(&id, before, client.roster()) => Removal::Removed,
                Ok(()) => Removal::Member,
                Err(e) => {
                    tracing::info!(error = %e, "removal check: no roster a quorum confirms");
                    Removal::Unknown
                }
            };
            client.close().await;
            removal
        }))
    }

    /// Whether a CRL this node's planes use (the ordered one, or its file's when newer) revokes
    /// the certificate it presents.
    fn revoked(&self) -> bool {
        let Ok(presented) = self.presented.lock() else {
            return false;
        };
        let Some(cert) = presented.chain().first() else {
            return false;
        };
        securesmart_transport::TrustState::new(self.replica_plane.trust())
            .is_ok_and(|t| t.revokes(cert))
    }

    /// Takes a restored reply cache into the one intake answers retransmissions from.
    fn cache_replies<'a>(&self, replies: impl Iterator<Item = (&'a NodeId, &'a (u64, Bytes))>) {
        if let Ok(mut c) = self.cache.lock() {
            for (client, (number, result)) in replies {
                if *client != self.id {
                    c.insert(*client, (*number, result.clone()));
                }
            }
        }
    }

    fn reply(&self, reply: securesmart_consensus::service::Reply, roster: u64) {
        if reply.client == self.id {
            tracing::info!(result = %String::from_utf8_lossy(&reply.result), "own request executed");
            return;
        }
        if let Ok(mut c) = self.cache.lock() {
            c.insert(reply.client, (reply.number, reply.result.clone()));
        }
        send_reply(
            &self.client_plane,
            reply.client,
            reply.number,
            roster,
            Outcome::Executed(reply.result),
        );
    }
}

/// A replica removed from the membership that still belongs to the engine's group until the
/// group without it takes over (above `until`): it stays admitted and takes part until the
/// checkpoint at `until` is stable.
#[derive(Clone, Copy, Debug)]
struct Leaving {
    id: NodeId,
    addr: SocketAddr,
    until: u64,
}

/// The group key's side of the node loop.
struct GroupSide {
    key: GroupKey,
    own: SelfRequests,
    creator: bool,
    /// The replica reached its peers (or the start-up wait passed): until then its own group
    /// messages wait, since a request only this replica holds could send it alone into a view
    /// change.
    ready: Arc<std::sync::atomic::AtomicBool>,
    /// Test builds: the faults this replica plays (see `crate::fault`).
    #[cfg(feature = "fault-injection")]
    faults: crate::fault::Faults,
    #[cfg(feature = "fault-injection")]
    forged: u64,
    /// The roster this replica last submitted its signature on, and when.
    roster_signed: Option<(u64, std::time::Instant)>,
}

/// What a removal check found ([`Host::removal_check`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Removal {
    /// A roster a quorum confirms removes this replica.
    Removed,
    /// A roster a quorum confirms holds it.
    Member,
    /// No roster was confirmed in time (unreachable, too far behind, or still changing).
    Unknown,
}

impl Removal {
    fn as_str(self) -> &'static str {
        match self {
            Self::Removed => "removed",
            Self::Member => "member",
            Self::Unknown => "unknown",
        }
    }
}

/// A removal check under way: aborted when dropped, so that no return path of the node loop
/// leaves it running.
struct RemovalCheck(tokio::task::JoinHandle<Removal>);

impl Drop for RemovalCheck {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Ticks a member stays without a link to any current replica before it counts as isolated
/// (logged, the `securesmart_node_isolated` gauge) and looks whether it is out.
const ISOLATED_TICKS: u32 = 4;

/// How long a removal check may take to find a roster a quorum confirms.
const REMOVAL_CHECK_TIME: Duration = Duration::from_secs(10);

/// Ticks (half a second each) a member stays without a link to any current replica before it
/// asks the others' client planes whether the certified roster removed it.
const REMOVAL_CHECK_TICKS: u32 = 10;

/// How often an isolated member asks again.
const REMOVAL_CHECK_EVERY: Duration = Duration::from_secs(20);

/// How long a replica waits for its roster acknowledgement to be ordered before it submits it
/// again.
const ROSTER_ACK_RETRY: Duration = Duration::from_secs(2);

impl GroupSide {
    /// Orders this replica's signature on the next roster it should sign, if any (again after
    /// [`ROSTER_ACK_RETRY`] if it was not ordered).
    fn acknowledge_roster(&mut self, rosters: &RosterLog) {
        let Some((roster, digest)) = rosters.to_acknowledge(&self.own.signer.id()) else {
            return;
        };
        if self
            .roster_signed
            .is_some_and(|(r, at)| r == roster && at.elapsed() < ROSTER_ACK_RETRY)
        {
            return;
        }
        match self.own.submit(Ordered::RosterAck { roster, digest }) {
            Ok(()) => self.roster_signed = Some((roster, std::time::Instant::now())),
            Err(e) => tracing::debug!(error = %e, "roster acknowledgement not submitted"),
        }
    }

    fn tick(&mut self, view: &crate::state::GroupView<'_>, still_voting: &[NodeId], rotate: bool) {
        if !self.ready.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Some(request) = self.key.tick(view, self.creator, still_voting, rotate)
            && let Err(e) = self.own.submit(request)
        {
            tracing::debug!(error = %e, "group message not submitted");
        }
        #[cfg(feature = "fault-injection")]
        if self.faults.forge_commits {
            self.forged += 1;
            if let Some(forged) = self.key.forge_commit(view.membership, self.forged) {
                tracing::warn!(
                    turn = self.forged,
                    "fault injection: ordering a forged group commit"
                );
                let _ = self.own.submit(forged);
            }
        }
        self.acknowledge();
    }

    /// Orders the acknowledgement of a newly held key and the refusal of a commit this
    /// member could not apply, if any (retried on the next tick).
    fn acknowledge(&mut self) {
        if !self.ready.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Some(refusal) = self.key.pending_refusal() {
            match self.own.submit(refusal) {
                Ok(()) => self.key.refused(),
                Err(e) => tracing::debug!(error = %e, "commit refusal not submitted"),
            }
        }
        if let Some(ack) = self.key.pending_ack() {
            match self.own.submit(ack) {
                Ok(()) => self.key.acknowledged(),
                Err(e) => tracing::debug!(error = %e, "key acknowledgement not submitted"),
            }
        }
    }
}

/// Keeps the group keys that a replay of the journal from the stable checkpoint `stable` needs
/// (sealed checkpoints and sealed requests above it), and lets older ones go.
fn pin_journal_keys(group: &mut GroupSide, epochs: &mut BTreeMap<Seq, u64>, stable: Seq) {
    // Once per stable checkpoint (this runs after every batch).
    if let Some(epoch) = epochs.remove(&stable) {
        group
            .key
            .pin_keys(epoch.saturating_sub(crate::state::SEALED_EPOCHS_ACCEPTED));
    }
    epochs.retain(|seq, _| *seq > stable);
}

/// Runs the replicated state on the engine's events until the engine stops or this replica
/// is removed.
async fn run_state<S: StateMachine>(
    mut pbft: Pbft,
    mut executor: Executor<NodeState<S>>,
    host: Host,
    mut group: GroupSide,
) -> Result<(), String> {
    let mut leaving: Vec<Leaving> = Vec::new();
    // The group epoch at each checkpoint this replica took: once one is stable, a replay of
    // the journal from it needs the keys of that epoch and the few before it.
    let mut checkpoint_epochs: BTreeMap<Seq, u64> = BTreeMap::new();
    group.key.pin_keys(0);
    host.update_trust(executor.app().membership(), &leaving);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // Ticks in a row without a link to any current replica, and the removal check asking
    // the others' client planes (see `Host::removal_check`).
    let mut isolated_ticks = 0u32;
    let mut removal_check: Option<RemovalCheck> = None;
    let mut removal_checked: Option<std::time::Instant> = None;
    let mut trust_checked = std::time::Instant::now();
    // A joiner starts from the genesis membership, which does not name it: only a replica
    // that has been a member can find itself removed.
    let mut was_member = false;
    loop {
        let event = tokio::select! {
            e = pbft.next_event() => e,
            _ = tick.tick() => {
                let still_voting: Vec<NodeId> = leaving.iter().map(|l| l.id).collect();
                let state = executor.app();
                let rotate = state.acked_by_quorum(state.group_epoch());
                group.tick(&state.group_view(), &still_voting, rotate);
                group.acknowledge_roster(state.rosters());
                // A removed replica may hear of no batch after the switch: look here as well.
                let (stable, m) = (pbft.low_watermark(), executor.app().membership());
                // Live links are checked again now and then, not only when trust changes: a
                // certificate that expires on a long-lived link (or a CRL that does) must not
                // stay admitted.
                if host.crl_file_changed.swap(false, std::sync::atomic::Ordering::Relaxed)
                    || trust_checked.elapsed() >= TRUST_RECHECK
                {
                    trust_checked = std::time::Instant::now();
                    host.update_trust(m, &leaving);
                }
                if host.settle_leaving(&mut leaving, stable, m) {
                    return Ok(());
                }
                pin_journal_keys(&mut group, &mut checkpoint_epochs, stable);
                host.install_renewal(m);
                was_member |= m.members().contains_key(&host.id);
                isolated_ticks = if was_member && host.isolated(m) {
                    isolated_ticks + 1
                } else {
                    0
                };
                if isolated_ticks == ISOLATED_TICKS {
                    tracing::info!(stable, "no link to any current replica");
                }
                metrics::gauge!("securesmart_node_isolated")
                    .set(f64::from(u8::from(isolated_ticks >= ISOLATED_TICKS)));
                // The revocation check parses the CRLs: only for a replica that is isolated.
                if isolated_ticks >= ISOLATED_TICKS
                    && let Some(reason) = host.out(m)
                {
                    tracing::warn!(stable, reason, "out of the membership in its own state, and cut off by every current replica; stopping");
                    return Ok(());
                }
                // Isolated for longer while a member in its own state: it may have missed its
                // own removal. Its certified roster asks the others' client planes.
                if isolated_ticks < REMOVAL_CHECK_TICKS {
                    // Linked again: what a check under way finds no longer decides anything.
                    removal_check = None;
                } else if removal_check.is_none()
                    && removal_checked.is_none_or(|t| t.elapsed() >= REMOVAL_CHECK_EVERY)
                {
                    removal_checked = Some(std::time::Instant::now());
                    removal_check =
                        Some(host.removal_check(executor.app().rosters().certified().clone()));
                }
                if let Some(mut check) = removal_check.take_if(|c| c.0.is_finished()) {
                    let found = (&mut check.0).await.unwrap_or(Removal::Unknown);
                    metrics::counter!("securesmart_node_removal_checks_total", "outcome" => found.as_str())
                        .increment(1);
                    if found == Removal::Removed {
                        tracing::warn!(stable, "removed (as a roster a quorum confirms says), and cut off by every current replica; stopping");
                        return Ok(());
                    }
                }
                continue;
            }
        };
        let Some(event) = event else { break };
        match event {
            Event::Ordered { seq, batch } => {
                let before: Vec<(NodeId, SocketAddr)> = executor
                    .app()
                    .membership()
                    .members()
                    .iter()
                    .map(|(id, m)| (*id, m.replica_addr))
                    .collect();
                for r in batch.iter().filter(|r| r.client == group.own.signer.id()) {
                    group.own.passed(r.number);
                }
                // A group commit past its deadline is voided here, at every replica alike.
                executor.app_mut().begin_batch(seq);
                for e in executor.app_mut().take_group_events() {
                    group.key.on_event(e, &executor.app().group_view());
                }
                // One request at a time, so that a group commit is merged before the next
                // request (a sealed one may need the new epoch's key) executes.
                let mut replies = Vec::with_capacity(batch.len());
                for request in &batch {
                    replies.extend(executor.execute(std::slice::from_ref(request)));
                    for e in executor.app_mut().take_group_events() {
                        group.key.on_event(e, &executor.app().group_view());
                    }
                }
                group.acknowledge();
                host.publish_sealable(executor.app());
                if !executor.app().state_known() {
                    // Replies computed on a lost state are not the agreed ones: the clients
                    // hear only that this replica executed at its roster (they need a quorum
                    // of answers), never a result.
                    let roster = executor.app().rosters().certified().number();
                    for r in replies.drain(..) {
                        if r.client != host.id {
                            send_reply(
                                &host.client_plane,
                                r.client,
                                r.number,
                                roster,
                                Outcome::Lost,
                            );
                        }
                    }
                }
                let changes = executor.app_mut().take_changes();
                if changes
                    .iter()
                    .any(|c| matches!(c, securesmart_membership::Applied::CrlUpdated { .. }))
                {
                    host.crl_ordered.notify_one();
                }
                // A renewal changes a certificate, not the replica set: new trust, no group
                // change for the engine.
                let trust_changed = !changes.is_empty();
                if changes
                    .iter()
                    .any(|c| !matches!(c, securesmart_membership::Applied::Renewed(_)))
                {
                    let m = executor.app().membership();
                    let until = match pbft.reconfigure(engine_members(m), seq).await {
                        Ok(from) => {
                            tracing::info!(
                                executed_at = seq,
                                takes_effect_above = from,
                                replicas = m.replicas(),
                                "group change ordered"
                            );
                            from
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "the engine refused a group change");
                            seq
                        }
                    };
                    for (id, addr) in before {
                        if !m.members().contains_key(&id) {
                            leaving.push(Leaving { id, addr, until });
                        }
                    }
                    metrics::gauge!("securesmart_node_degraded")
                        .set(f64::from(u8::from(m.is_degraded())));
                    if m.is_degraded() {
                        tracing::warn!(
                            replicas = m.replicas(),
                            f = m.f(),
                            "fewer than four replicas (a CRL revoked some): every replica is \
                             needed to order until an operator adds replicas"
                        );
                    }
                }
                // Every replica names the roster after the batch: the same for the same request.
                let state = executor.app();
                host.rosters.publish(state.rosters());
                let roster = state.rosters().certified().number();
                replies.into_iter().for_each(|r| host.reply(r, roster));
                group.acknowledge_roster(state.rosters());
                if trust_changed {
                    host.update_trust(executor.app().membership(), &leaving);
                    host.install_renewal(executor.app().membership());
                }
                if host.settle_leaving(
                    &mut leaving,
                    pbft.low_watermark(),
                    executor.app().membership(),
                ) {
                    return Ok(());
                }
                pin_journal_keys(&mut group, &mut checkpoint_epochs, pbft.low_watermark());
            }
            Event::SnapshotDue { seq } => {
                checkpoint_epochs.insert(seq, executor.app().group_epoch());
                match executor.due_snapshot(seq) {
                    Some(snapshot) => pbft.snapshot_taken(seq, snapshot),
                    None => pbft.state_lost(seq),
                }
                .map_err(|e| e.to_string())?;
            }
            Event::Restore { seq, snapshot } => {
                executor
                    .restore_checkpoint(seq, &snapshot)
                    .map_err(|e| e.to_string())?;
                if let Some((_, (number, _))) = executor
                    .cached_replies()
                    .find(|(client, _)| **client == host.id)
                {
                    group.own.passed(*number);
                }
                // The snapshot's recent group commits: the member catches up on those it
                // missed (a joiner's Welcome may be among them) ...
                for e in executor.app_mut().take_group_events() {
                    group.key.on_event(e, &executor.app().group_view());
                }
                if !executor.app().state_known() {
                    // ... and with the keys they gave, a sealed checkpoint may open now.
                    executor
                        .restore_checkpoint(seq, &snapshot)
                        .map_err(|e| e.to_string())?;
                    executor.app_mut().take_group_events();
                    if executor.app().state_known() {
                        tracing::info!(
                            seq,
                            "sealed checkpoint opened with the keys of the commits it carries"
                        );
                    }
                }
                group.acknowledge();
                let m = executor.app().membership();
                tracing::info!(
                    seq,
                    epoch = m.epoch(),
                    replicas = m.replicas(),
                    "state restored"
                );
                pbft.add_keys(engine_members(m))
                    .map_err(|e| e.to_string())?;
                host.update_trust(m, &leaving);
                host.publish_sealable(executor.app());
                host.rosters.publish(executor.app().rosters());
                if executor.app().state_known() {
                    // Retransmissions of requests executed before the snapshot are answered
                    // from its reply cache, as the other replicas answer them.
                    host.cache_replies(executor.cached_replies());
                }
                checkpoint_epochs.insert(seq, executor.app().group_epoch());
                pin_journal_keys(&mut group, &mut checkpoint_epochs, seq);
            }
            _ => {}
        }
    }
    Ok(())
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
        if identity.chain().is_empty() {
            return Err(ConfigError::Invalid("an empty certificate file".into()).into());
        }
        let presented = identity.clone();
        let group_identity = identity.clone();
        let id = identity.id();
        let not_ed25519 =
            || NodeError::Config(ConfigError::Invalid("the node key is not Ed25519".into()));
        let baseline = config.consensus.insecure_baseline;
        baseline_allowed(
            baseline,
            std::env::var(INSECURE_BASELINE_ENV).ok().as_deref(),
        )?;
        let signer = if baseline {
            tracing::warn!(
                "INSECURE: [consensus] insecure_baseline is on: this replica signs and checks \
                 no consensus or request signatures (for `securesmart bench` only)"
            );
            metrics::gauge!("securesmart_node_insecure_baseline").set(1.0);
            Signer::unsigned(id)
        } else {
            identity
                .ed25519_seed()
                .map(|seed| Signer::from_seed(&seed))
                .ok_or_else(not_ed25519)?
        };
        let request_signer = RequestSigner::new(&identity).ok_or_else(not_ed25519)?;
        let trust = load_trust(&n.ca, n.crl.as_deref())?;
        let local_crl = Arc::new(Mutex::new(trust.crls.first().cloned()));
        let configured = load_peers(&config.replicas)?;
        let joining = !configured.contains_key(&id);
        let peers = if joining {
            // The replicas it will trust for the state are the current ones, as the roster's
            // certified changes say, not whoever its file lists (removed ones among them could
            // feed it a false state).
            match current_roster(&identity, &trust, n, &configured).await {
                Ok(roster) => {
                    tracing::info!(
                        configured = n.roster,
                        current = roster.number(),
                        replicas = roster.replicas().len(),
                        "joiner: following the current roster"
                    );
                    // Without itself, even if its AddNode executed already: it starts as a
                    // joiner that the others' group certifies the state to, and becomes a
                    // member by the ordered change, as the others do (counting itself in its
                    // first group would have it vote, time out and change views alone).
                    let mut peers = peers_of(&roster);
                    peers.remove(&id);
                    if peers.len() < securesmart_membership::MIN_REPLICAS {
                        // Replicas left since it was added: without it the roster is too small
                        // to start from; its configuration (written when it was added) is not.
                        tracing::warn!(
                            current = roster.number(),
                            "joiner: the current roster without this replica is too small to start from; trusting the configured replicas"
                        );
                        configured
                    } else {
                        peers
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "joiner: cannot learn the current roster; trusting the configured replicas");
                    configured
                }
            }
        } else {
            configured
        };
        let ca = trust
            .ca_certs
            .first()
            .cloned()
            .ok_or_else(|| ConfigError::Invalid("no CA certificate".into()))?;
        let wire_limits = Limits::default();
        let (journal, records) = FileJournal::open(&n.data_dir.join("consensus"), &wire_limits)
            .map_err(|e| NodeError::Journal(e.to_string()))?;
        let members: Vec<securesmart_membership::Member> = peers
            .values()
            .map(|p| securesmart_membership::Member {
                certificate: p.certificate.clone(),
                replica_addr: p.replica.unwrap_or(p.client),
                client_addr: p.client,
                role: Role::Replica,
                key_package: Vec::new(),
            })
            .collect();
        // With a journal, genesis is history: its certificates are checked as of their
        // issue, so that a replica restarts from its journal whatever the time now (its
        // ordered membership then decides who is a member). With none, the configured
        // replicas are the ones it trusts for its state: they must be valid now and not
        // revoked by the CRL file (a replica that lost its journal long after genesis is
        // configured with the current roster, as a joiner is).
        let genesis = if records.is_empty() {
            let now = rustls::pki_types::UnixTime::now();
            let check = securesmart_transport::TrustState::new(TrustConfig {
                peers: peers.keys().map(|id| (*id, n.replica_listen)).collect(),
                ..trust.clone()
            })
            .map_err(|e| NodeError::Genesis(e.to_string()))?;
            for (peer_id, peer) in &peers {
                if let Err(why) = check.verify_replica(std::slice::from_ref(&peer.certificate), now)
                {
                    return Err(NodeError::Genesis(format!(
                        "configured replica {peer_id} is refused now ({why}); with an empty \
                         journal, configure the current roster"
                    )));
                }
            }
            Membership::genesis(ca, members, now)
        } else {
            Membership::genesis_history(ca, members)
        }
        .map_err(|e| NodeError::Genesis(e.to_string()))?;
        let mut admins = Vec::new();
        for path in &n.admins {
            let cert = load_certificate(path)?;
            securesmart_transport::node_id(&cert).map_err(|e| ConfigError::Pki {
                path: path.clone(),
                message: e.to_string(),
            })?;
            admins.push(cert);
        }
        let mut replica_trust = genesis.replica_trust();
        replica_trust.crls = trust.crls.clone();
        let limits = n.limits.limits();
        let mut replica_config =
            PlaneConfig::new(identity.clone(), n.replica_listen, replica_trust)
                .with_limits(limits.clone());
        if baseline {
            // Fail closed on a mix: a baseline replica and a signing one refuse each other's
            // handshakes, so a replica configured so by mistake joins no secure cluster.
            replica_config = replica_config.with_alpn(INSECURE_BASELINE_ALPN);
        }
        let (replica_plane, replica_inbox) = Plane::replica(replica_config).await?;
        let (client_plane, client_inbox) = Plane::client_listener(
            PlaneConfig::new(identity, n.client_listen, trust).with_limits(limits.clone()),
        )
        .await?;

        let k = &config.consensus;
        let mut core = Config::new(genesis.replica_ids());
        core.max_batch = k.max_batch;
        core.batch_delay = Duration::from_millis(k.batch_delay_ms);
        core.checkpoint_interval = k.checkpoint_interval;
        core.window = k.window;
        core.view_change_timeout = Duration::from_millis(k.view_change_timeout_ms);
        core.durable = true;
        core.request_check = (!baseline).then(crate::protocol::request_check);
        let recovered = records.len();
        // A journal that existed may have lost votes with a crashed machine: recover from it
        // even when it holds no records (`Replica::recover` abstains where it may have voted),
        // unless only the process stopped.
        let replica = if !journal.resumed() {
            Replica::new(core, signer)
        } else if journal.intact() {
            Replica::recover_intact(core, signer, records)
                .map_err(|e| NodeError::Journal(e.to_string()))?
        } else {
            tracing::warn!(
                "the machine restarted since this replica last entered a view: it sends no new \
                 votes in that view (its journal may have lost the last ones)"
            );
            Replica::recover(core, signer, records)
                .map_err(|e| NodeError::Journal(e.to_string()))?
        };
        tracing::info!(
            node = %id,
            joining,
            records = recovered,
            executed = replica.executed(),
            view = replica.view(),
            "replica starting"
        );
        let members = engine_members(&genesis);
        let ring = if baseline {
            KeyRing::unsigned(members.into_iter().map(|m| m.id))
        } else {
            KeyRing::new(members.into_iter().map(|m| (m.id, m.key)))
        };
        let network = ReplicaNetwork::new(replica_plane.clone(), replica_inbox);
        let (pbft, driver) =
            Pbft::spawn_durable(replica, ring, network, wire_limits, Some(Box::new(journal)));
        let own = SelfRequests {
            signer: Arc::new(request_signer),
            number: Arc::new(AtomicU64::new(unix_now().saturating_mul(1_000_000).max(1))),
            submitter: pbft.submitter(),
        };
        let cache: ReplyCache = Arc::default();
        let host = Host {
            id,
            cache: Arc::clone(&cache),
            replica_plane: replica_plane.clone(),
            client_plane: client_plane.clone(),
            local_crl: Arc::clone(&local_crl),
            sealable: Arc::new(AtomicU64::new(NO_EPOCH)),
            rosters: Rosters::new(crate::roster::RosterLog::new(crate::roster::Roster::of(
                0, &genesis,
            ))),
            crl_ordered: Arc::new(tokio::sync::Notify::new()),
            crl_file_changed: Arc::new(AtomicBool::new(false)),
            renewed: Arc::default(),
            presented: Arc::new(Mutex::new(presented)),
            limits,
        };
        let renewed = Arc::clone(&host.renewed);
        let identity_files = (n.certificate.clone(), n.key.clone());
        let rosters = host.rosters.clone();
        let crl_ordered = Arc::clone(&host.crl_ordered);
        let crl_changed = Arc::clone(&host.crl_file_changed);
        let sealable = Arc::clone(&host.sealable);
        let member = GroupMember::new(
            &group_identity,
            GroupConfig {
                keep_epochs: 3,
                rotation: RotationPolicy {
                    max_age: Duration::from_secs(n.rekey_seconds.max(1)),
                    max_sealed: 1_000_000,
                },
                state_file: Some(n.data_dir.join("mls.state")),
            },
        )
        .map_err(|e| NodeError::Journal(format!("group key state: {e}")))?;
        let keys = member.payload_keys();
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        #[cfg(feature = "fault-injection")]
        let faults = crate::fault::Faults::from_env();
        #[cfg(feature = "fault-injection")]
        let mut tasks_faulty = Vec::new();
        #[cfg(feature = "fault-injection")]
        if faults.flood
            && let Some(flood_signer) = group_identity.ed25519_seed().map(|s| Signer::from_seed(&s))
        {
            tasks_faulty.push(tokio::spawn(crate::fault::flood(
                replica_plane.clone(),
                flood_signer,
                genesis.replica_ids(),
            )));
        }
        let group = GroupSide {
            key: GroupKey::new(id, member),
            own: own.clone(),
            ready: Arc::clone(&ready),
            creator: !joining && genesis.replica_ids().first() == Some(&id),
            #[cfg(feature = "fault-injection")]
            faults,
            #[cfg(feature = "fault-injection")]
            forged: 0,
            roster_signed: None,
        };
        let state = NodeState::new(genesis, admins, app).with_payload_keys(keys.clone());
        let serving = tokio::spawn(run_state(pbft, Executor::new(state), host, group));
        // Requests wait until this replica reaches its peers (or a few seconds pass): a
        // pre-prepare sent before the mesh is up is lost to the replicas not yet connected,
        // which then stay behind until the next checkpoint.
        let others = peers.len().saturating_sub(usize::from(!joining));
        let startup = {
            let (plane, clients, crl, revoked) = (
                replica_plane.clone(),
                client_plane.clone(),
                n.crl.clone(),
                n.revoked_certificates.clone(),
            );
            let recover_admin = n.recover_admin.clone();
            tokio::spawn(async move {
                plane.wait_connected(others, STARTUP_WAIT).await;
                ready.store(true, std::sync::atomic::Ordering::Relaxed);
                if let Some(path) = recover_admin {
                    vote_for_admin(&path, &own);
                }
                // Both run inside this task, so stopping the node stops them.
                let sealer = Sealer {
                    keys,
                    sealable,
                    signer: Arc::clone(&own.signer),
                    #[cfg(feature = "fault-injection")]
                    swap: faults.swap_sealed,
                    #[cfg(feature = "fault-injection")]
                    wrong_key: faults.wrong_sealing_key,
                };
                let intake = intake(
                    client_inbox,
                    clients,
                    own.submitter.clone(),
                    cache,
                    sealer,
                    rosters,
                );
                let certificate = watch_certificate(identity_files, own.clone(), renewed);
                match crl {
                    Some(path) => {
                        tokio::join!(
                            intake,
                            certificate,
                            watch_crl(path, revoked, own, local_crl, crl_ordered, crl_changed)
                        );
                    }
                    None => {
                        tokio::join!(intake, certificate);
                    }
                }
            })
        };
        #[allow(unused_mut)]
        let mut tasks = vec![driver, startup];
        #[cfg(feature = "fault-injection")]
        tasks.extend(tasks_faulty);
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

    /// Runs until the engine stops (a journal failure), this replica is removed from the
    /// group, or `shutdown` resolves; then shuts down.
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

/// How long a starting replica waits for its peers before it takes requests.
pub const STARTUP_WAIT: Duration = Duration::from_secs(3);

/// How often the node checks its live links against the current trust (certificate and CRL
/// expiry) even when nothing changed.
pub const TRUST_RECHECK: Duration = Duration::from_secs(60);

/// Looks at the CRL file after which a CRL not yet seen ordered is submitted again.
const CRL_RESUBMIT_LOOKS: u32 = 30;

/// Resubmissions of a renewed certificate after which the node gives it up.
const RENEWAL_RESUBMITS: u32 = 10;

/// How often the node looks at its CRL file.
pub const CRL_POLL: Duration = Duration::from_secs(1);

/// How many looks at the CRL file in a row order the revoked certificates after a change.
const REVOKE_RETRIES: u32 = 3;

/// Orders `RevokeCertificates` with the certificates in the PEM file `path` (in commands of at
/// most `MAX_CERTS_PER_COMMAND`). A file that is missing or unreadable orders nothing.
/// Orders this replica's vote to make the client certificate at `path` an administrator
/// (`recover_admin`; a quorum of the replicas' votes adds it).
fn vote_for_admin(path: &std::path::Path, own: &SelfRequests) {
    let certificate = match crate::config::load_certificate(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "recover_admin: cannot read the certificate");
            return;
        }
    };
    let command = MembershipCommand::AddAdmin {
        certificate: certificate.to_vec(),
    };
    let submitted = own.submit_command(&command);
    tracing::warn!(
        submitted = submitted.is_ok(),
        "voting to make the recover_admin certificate an administrator"
    );
}

fn order_revoked_certificates(path: &std::path::Path, own: &SelfRequests) {
    use rustls::pki_types::pem::PemObject;
    let Ok(bytes) = crate::config::read_limited(path) else {
        return;
    };
    let certificates: Vec<Vec<u8>> = rustls::pki_types::CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect();
    for chunk in certificates.chunks(securesmart_membership::epoch::MAX_CERTS_PER_COMMAND) {
        let command = MembershipCommand::RevokeCertificates {
            certificates: chunk.to_vec(),
        };
        let submitted = own.submit_command(&command);
        tracing::debug!(
            certificates = chunk.len(),
            submitted = submitted.is_ok(),
            "ordering the revoked certificates"
        );
    }
}

/// When the file at `p` was last modified (`None` if it cannot be read): the watchers
/// reload a file when this changes.
fn modified(p: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Watches the node's certificate file: a renewal written there (a certificate of the same
/// key, e.g. from `securesmart ca renew`) is ordered as this replica's `RenewNode`, submitted
/// again every [`CRL_RESUBMIT_LOOKS`] looks until the membership holds it; the planes then
/// present it ([`Host::install_renewal`]). A file that does not load, or names another key,
/// is logged and counted and changes nothing (rotating the key is a new enrollment).
async fn watch_certificate(
    (certificate, key): (std::path::PathBuf, std::path::PathBuf),
    own: SelfRequests,
    renewed: Arc<Mutex<Option<securesmart_transport::Identity>>>,
) {
    // The first look takes the file as changed: the membership may hold an older certificate
    // (a renewal written while the node was down). `Host::install_renewal` clears the pending
    // identity at once when the membership already holds it.
    let mut seen = None;
    let mut current = None;
    let (mut looks, mut resubmits) = (0u32, 0u32);
    let order = |cert: &rustls::pki_types::CertificateDer<'static>| {
        own.submit_command(&MembershipCommand::RenewNode {
            certificate: cert.to_vec(),
        })
    };
    let mut tick = tokio::time::interval(CRL_POLL);
    loop {
        tick.tick().await;
        let pending = renewed
            .lock()
            .ok()
            .and_then(|r| r.as_ref().and_then(|i| i.chain().first().cloned()));
        if let Some(cert) = &pending
            && resubmits <= RENEWAL_RESUBMITS
        {
            looks += 1;
            if looks >= CRL_RESUBMIT_LOOKS {
                looks = 0;
                resubmits += 1;
                if resubmits > RENEWAL_RESUBMITS {
                    // It stays pending: if a submission is ordered after all, it is presented.
                    metrics::counter!("securesmart_node_certificate_reload_errors_total")
                        .increment(1);
                    tracing::error!(
                        "the renewed certificate was not ordered (the membership refuses it: \
                         another CA, or not later than the current one); no more submissions"
                    );
                    continue;
                }
                let submitted = order(cert);
                tracing::info!(
                    submitted = submitted.is_ok(),
                    "renewed certificate not ordered yet; submitting it"
                );
            }
        }
        let now = modified(&certificate);
        if now == seen {
            continue;
        }
        seen = now;
        let identity = match crate::config::load_identity(&certificate, &key) {
            Ok(i) if i.id() == own.signer.id() && matching_key(&i) => i,
            Ok(_) => {
                metrics::counter!("securesmart_node_certificate_reload_errors_total").increment(1);
                tracing::error!(
                    "the certificate and key files now name another key, or two keys; keeping \
                     the current certificate (a new key is a new enrollment)"
                );
                continue;
            }
            Err(e) => {
                metrics::counter!("securesmart_node_certificate_reload_errors_total").increment(1);
                tracing::warn!(error = %e, "certificate file unreadable; keeping the current one");
                continue;
            }
        };
        let Some(cert) = identity.chain().first().cloned() else {
            continue;
        };
        let first_look = current.is_none();
        if current.as_ref() == Some(&cert) {
            continue;
        }
        current = Some(cert.clone());
        if let Ok(mut r) = renewed.lock() {
            *r = Some(identity);
        }
        (looks, resubmits) = (0, 0);
        if first_look {
            // Submitted after CRL_RESUBMIT_LOOKS only if still pending then.
            continue;
        }
        let submitted = order(&cert);
        metrics::counter!("securesmart_node_certificate_reloads_total").increment(1);
        tracing::info!(
            submitted = submitted.is_ok(),
            "certificate file renewed; ordering the renewal"
        );
    }
}

/// Whether `identity`'s private key is the key its certificate names (Ed25519).
fn matching_key(identity: &securesmart_transport::Identity) -> bool {
    match (identity.ed25519_seed(), identity.ed25519_public()) {
        (Some(seed), Some(public)) => {
            ed25519_dalek::SigningKey::from_bytes(&seed)
                .verifying_key()
                .to_bytes()
                == public
        }
        _ => false,
    }
}

/// Watches the CRL file: when it changes (and on the first look, since it may have changed
/// while the node started), the node submits it as an ordered `UpdateCrl`, and uses it for
/// its planes until the membership carries a CRL. A file that cannot be read keeps the
/// current CRL and is logged and counted. With a file of revoked certificates (PEM), the node
/// also orders `RevokeCertificates` with them whenever either file changes and whenever an
/// ordered CRL executes (the replicated state takes only certificates the ordered CRL lists).
async fn watch_crl(
    path: std::path::PathBuf,
    revoked: Option<std::path::PathBuf>,
    own: SelfRequests,
    local: Arc<Mutex<Option<CertificateRevocationListDer<'static>>>>,
    crl_ordered: Arc<tokio::sync::Notify>,
    changed: Arc<AtomicBool>,
) {
    let mut seen = None;
    let mut seen_revoked = None;
    // Looks left at which the revoked certificates are ordered again.
    let mut revoke_again = 0u32;
    // The file's CRL until an ordered CRL executes, and looks since it was last submitted: a
    // submission can be lost (a view change, a full queue), so it is submitted again.
    let mut unordered: Option<(MembershipCommand, u32)> = None;
    let mut tick = tokio::time::interval(CRL_POLL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // An ordered CRL executed: the certificates it lists can be recorded now.
            () = crl_ordered.notified() => {
                revoke_again = REVOKE_RETRIES;
                unordered = None;
            }
        }
        if let Some((command, looks)) = &mut unordered {
            *looks += 1;
            if *looks >= CRL_RESUBMIT_LOOKS {
                *looks = 0;
                let submitted = own.submit_command(command);
                metrics::counter!("securesmart_node_crl_resubmits_total").increment(1);
                tracing::info!(
                    submitted = submitted.is_ok(),
                    "CRL file not ordered yet; submitting it again"
                );
            }
        }
        if let Some(revoked) = &revoked {
            let now = modified(revoked);
            if now != seen_revoked {
                seen_revoked = now;
                revoke_again = REVOKE_RETRIES;
            }
            if revoke_again > 0 {
                revoke_again -= 1;
                order_revoked_certificates(revoked, &own);
            }
        }
        let now = modified(&path);
        if now == seen {
            continue;
        }
        seen = now;
        revoke_again = REVOKE_RETRIES;
        let crl = match crate::config::load_crl(&path) {
            Ok(crl) => crl,
            Err(e) => {
                metrics::counter!("securesmart_node_crl_reload_errors_total").increment(1);
                tracing::warn!(error = %e, "CRL file unreadable; keeping the current CRL");
                continue;
            }
        };
        if let Ok(mut l) = local.lock() {
            *l = Some(crl.clone());
        }
        changed.store(true, std::sync::atomic::Ordering::Relaxed);
        let command = MembershipCommand::UpdateCrl { crl: crl.to_vec() };
        let submitted = own.submit_command(&command);
        unordered = Some((command, 0));
        metrics::counter!("securesmart_node_crl_reloads_total").increment(1);
        tracing::info!(
            submitted = submitted.is_ok(),
            "CRL file changed; ordering it"
        );
    }
}

/// Sends a reply to a client over the client plane, best effort (a client that is not
/// connected to this replica gets its f+1 replies from the others, or retransmits).
fn send_reply(clients: &Plane, to: NodeId, number: u64, roster: u64, outcome: Outcome) {
    let reply = ClientReply {
        number,
        roster,
        outcome,
    };
    let _ = clients.try_send(to, Class::Consensus, Bytes::from(reply.encode()));
}

/// Seals confidential operations for clients at intake, in the epoch the replicated state
/// accepts.
struct Sealer {
    keys: PayloadKeys,
    sealable: Arc<AtomicU64>,
    /// This replica's key, to sign what it seals.
    signer: Arc<RequestSigner>,
    /// Test builds: seal another operation than the client's (see `crate::fault`).
    #[cfg(feature = "fault-injection")]
    swap: bool,
    /// Test builds: hand clients made-up sealing keys (see `crate::fault`).
    #[cfg(feature = "fault-injection")]
    wrong_key: bool,
}

impl Sealer {
    /// The epoch the replicated state says to seal in, if any.
    fn epoch(&self) -> Result<u64, securesmart_membership::GroupError> {
        let epoch = self.sealable.load(std::sync::atomic::Ordering::Relaxed);
        if epoch == NO_EPOCH {
            return Err(securesmart_membership::GroupError::NotMember);
        }
        Ok(epoch)
    }

    fn seal(
        &self,
        client: &NodeId,
        number: u64,
        payload: &[u8],
    ) -> Result<Vec<u8>, securesmart_membership::GroupError> {
        let epoch = self.epoch()?;
        #[cfg(feature = "fault-injection")]
        if self.swap {
            tracing::warn!("fault injection: sealing another operation than the client's");
            // As long as the client's, so that the client cannot tell before it is ordered.
            let other: Vec<u8> = payload.iter().map(|b| b ^ 0x5a).collect();
            return self
                .keys
                .seal_in(epoch, &confidential_context(client, number), &other);
        }
        self.keys
            .seal_in(epoch, &confidential_context(client, number), payload)
    }

    /// `client`'s sealing key of the epoch this replica seals in.
    fn client_key(
        &self,
        client: &NodeId,
    ) -> Result<ClientSealingKey, securesmart_membership::GroupError> {
        let epoch = self.epoch()?;
        #[cfg(feature = "fault-injection")]
        if self.wrong_key {
            tracing::warn!("fault injection: handing a client a made-up sealing key");
            return Ok(ClientSealingKey::from_bytes(epoch, *client, rand::random()));
        }
        self.keys.client_key(epoch, client)
    }
}

/// Per-client budgets of the work intake does without ordering, and one for all clients
/// together of each: sealing (a closed-loop client seals one operation per request), roster
/// queries (a client asks when it falls behind) and sealing keys (a client asks once per
/// group epoch, after a refusal, and after an idle spell).
struct Answered {
    seals: Budget,
    rosters: Budget,
    keys: Budget,
    checked: u64,
}

/// One kind of work's budget: each client's, and all clients' together (so that many
/// clients cannot keep intake busy with it either).
struct Budget {
    each: governor::DefaultKeyedRateLimiter<NodeId>,
    all: governor::DefaultDirectRateLimiter,
}

impl Budget {
    /// Rates per second and bursts, per client and for all clients.
    fn new(each: (u32, u32), all: (u32, u32)) -> Self {
        let quota = |(rate, burst): (u32, u32)| {
            governor::Quota::per_second(
                std::num::NonZeroU32::new(rate).unwrap_or(std::num::NonZeroU32::MIN),
            )
            .allow_burst(std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN))
        };
        Self {
            each: governor::RateLimiter::keyed(quota(each)),
            all: governor::RateLimiter::direct(quota(all)),
        }
    }

    /// Whether `client` may have one answered now; `own_only`: spending its own budget alone.
    fn spend(&self, client: &NodeId, own_only: bool) -> bool {
        self.each.check_key(client).is_ok() && (own_only || self.all.check().is_ok())
    }
}

/// Seals per client and second, and the burst.
const SEALS_PER_SEC: (u32, u32) = (2_000, 4_000);
/// Seals per second of all clients together, and the burst.
const ALL_SEALS_PER_SEC: (u32, u32) = (20_000, 40_000);
/// Roster queries per client and second, and the burst.
const ROSTER_QUERIES_PER_SEC: (u32, u32) = (20, 40);
/// Roster queries per second of all clients together, and the burst (an answer may carry
/// many certified changes).
const ALL_ROSTER_QUERIES_PER_SEC: (u32, u32) = (1_000, 2_000);
/// Sealing-key queries per client and second, and the burst.
const KEY_QUERIES_PER_SEC: (u32, u32) = (20, 40);
/// Sealing-key queries per second of all clients together, and the burst (an idle client
/// asks again after `securesmart::client::ROSTER_TRUST`).
const ALL_KEY_QUERIES_PER_SEC: (u32, u32) = (5_000, 10_000);

impl Answered {
    fn new() -> Self {
        Self {
            seals: Budget::new(SEALS_PER_SEC, ALL_SEALS_PER_SEC),
            rosters: Budget::new(ROSTER_QUERIES_PER_SEC, ALL_ROSTER_QUERIES_PER_SEC),
            keys: Budget::new(KEY_QUERIES_PER_SEC, ALL_KEY_QUERIES_PER_SEC),
            checked: 0,
        }
    }

    /// Whether `client` (of `role`) may have this request answered now (sealing, a roster
    /// query, or a sealing key). A replica's roster queries (a joiner's) spend only its own
    /// budget, so that many clients cannot keep joiners from following the roster.
    fn allows(&mut self, client: &NodeId, role: Role, kind: RequestKind) -> bool {
        self.checked += 1;
        if self.checked.is_multiple_of(65_536) {
            // Forget clients that have been quiet (the maps stay bounded by the active ones).
            for budget in [&self.seals, &self.rosters, &self.keys] {
                budget.each.retain_recent();
            }
        }
        match kind {
            RequestKind::Seal => self.seals.spend(client, false),
            RequestKind::SealingKey => self.keys.spend(client, false),
            _ => self.rosters.spend(client, role == Role::Replica),
        }
    }
}

/// Client intake: decodes requests, answers retransmissions from the cache, submits the rest.
async fn intake(
    mut inbox: Inbox,
    clients: Plane,
    submitter: Submitter,
    cache: ReplyCache,
    sealer: Sealer,
    rosters: Rosters,
) {
    let mut answered = Answered::new();
    while let Some(m) = inbox.recv().await {
        let request = match ClientRequest::decode(&m.payload) {
            Ok(r) => r,
            Err(e) => {
                client_counter("undecodable");
                tracing::debug!(client = ?m.from, error = %e, "undecodable client request");
                continue;
            }
        };
        let roster = rosters.current();
        // A replica may connect as a client only to learn the roster (a joiner does, before
        // it trusts anyone for the state); it orders its own requests through the engine.
        if m.role == Role::Replica && request.kind != RequestKind::Rosters {
            client_counter("replica_as_client");
            continue;
        }
        if matches!(
            request.kind,
            RequestKind::Rosters | RequestKind::Seal | RequestKind::SealingKey
        ) && !answered.allows(&m.from, m.role, request.kind)
        {
            client_counter("over_budget");
            if request.kind != RequestKind::Rosters {
                send_reply(&clients, m.from, request.number, roster, Outcome::Busy);
            }
            continue;
        }
        if request.kind == RequestKind::SealingKey {
            // The client's own key, to the client's own link (mutual TLS): no signature check.
            // Without a sealable epoch here the client asks the others (it needs f + 1 alike).
            let outcome = match sealer.client_key(&m.from) {
                Ok(key) => {
                    client_counter("sealing_key");
                    Outcome::SealingKey(key)
                }
                Err(e) => {
                    client_counter("no_group_key");
                    tracing::debug!(error = %e, "cannot hand out a sealing key");
                    Outcome::Busy
                }
            };
            send_reply(&clients, m.from, request.number, roster, outcome);
            continue;
        }
        if request.kind == RequestKind::Rosters {
            // Public, certified data that the client checks itself: answered at once, with
            // no signature check (the link is the client's own).
            client_counter("roster_query");
            let since = request
                .payload
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            let answer = Outcome::Rosters(rosters.since(since));
            send_reply(&clients, m.from, request.number, roster, answer);
            continue;
        }
        let cached = cache.lock().ok().and_then(|c| c.get(&m.from).cloned());
        if let Some((number, result)) = cached {
            if request.number == number {
                client_counter("cached");
                send_reply(&clients, m.from, number, roster, Outcome::Executed(result));
                continue;
            }
            if request.number < number {
                client_counter("stale");
                continue;
            }
        }
        let number = request.number;
        // The connection's certificate proves that these bytes are the client's (mutual TLS),
        // so intake checks no signature: the engine checks a request's signature where no
        // channel vouches for it (when it proposes it, a backup when it does not hold it
        // byte for byte, when it times out here or goes at once to a leaving primary; see
        // `Replica::handle_authenticated_request`).
        if request
            .command_time()
            .is_some_and(|t| t.abs_diff(unix_now()) > crate::protocol::COMMAND_SKEW_SECS)
        {
            client_counter("skewed_time");
            tracing::debug!(client = ?m.from, "membership command signed at a time far from ours");
            continue;
        }
        if request.kind == RequestKind::Seal {
            // Sealed for this client and number only; what the client then orders carries its
            // signature on this ciphertext, so no replica can put another in its place.
            let outcome = match sealer.seal(&m.from, number, &request.payload) {
                Ok(sealed) => {
                    client_counter("sealed");
                    let auth = SealerSignature::sign(&sealer.signer, &m.from, number, &sealed);
                    Outcome::Sealed {
                        sealer: auth,
                        sealed: Bytes::from(sealed),
                    }
                }
                Err(e) => {
                    // No usable group key here yet (or the group is forming): the client asks
                    // another replica, or again later.
                    client_counter("no_group_key");
                    tracing::debug!(error = %e, "cannot seal a confidential operation");
                    Outcome::Busy
                }
            };
            send_reply(&clients, m.from, number, roster, outcome);
            continue;
        }
        let Some(submission) = request.into_submission() else {
            client_counter("undecodable");
            tracing::debug!(client = ?m.from, "client request without an order to take");
            continue;
        };
        let ordered = Request {
            client: m.from,
            number,
            payload: submission.encode(),
        };
        match submitter.submit_authenticated(ordered) {
            Ok(()) => client_counter("submitted"),
            Err(PbftError::Busy) => {
                client_counter("busy");
                send_reply(&clients, m.from, number, roster, Outcome::Busy);
            }
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_insecure_baseline_needs_both_switches() {
        assert!(baseline_allowed(false, None).is_ok());
        assert!(baseline_allowed(false, Some("0")).is_ok());
        assert!(baseline_allowed(true, None).is_err());
        assert!(baseline_allowed(true, Some("yes")).is_err());
        assert!(baseline_allowed(true, Some("1")).is_ok());
    }

    #[test]
    fn one_client_flooding_roster_queries_seals_or_key_queries_spends_only_its_own_budget() {
        let mut answered = Answered::new();
        let (flooder, other) = (NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]));
        let allowed = (0..1000)
            .filter(|_| answered.allows(&flooder, Role::Client, RequestKind::Rosters))
            .count();
        assert!(
            (ROSTER_QUERIES_PER_SEC.1 as usize..ROSTER_QUERIES_PER_SEC.1 as usize + 5)
                .contains(&allowed),
            "{allowed} roster queries answered"
        );
        assert!(answered.allows(&other, Role::Client, RequestKind::Rosters));
        // Seals have a budget of their own, much larger: a closed-loop client seals once per
        // request.
        assert!(answered.allows(&flooder, Role::Client, RequestKind::Seal));
        let seals = (0..20_000)
            .filter(|_| answered.allows(&flooder, Role::Client, RequestKind::Seal))
            .count();
        assert!(seals < SEALS_PER_SEC.1 as usize + 1_000, "{seals} seals");
        assert!(answered.allows(&other, Role::Client, RequestKind::Seal));
        // Sealing keys too (a client asks once per epoch and after a refusal).
        let keys = (0..1000)
            .filter(|_| answered.allows(&flooder, Role::Client, RequestKind::SealingKey))
            .count();
        assert!(
            (KEY_QUERIES_PER_SEC.1 as usize..KEY_QUERIES_PER_SEC.1 as usize + 5).contains(&keys),
            "{keys} key queries answered"
        );
        assert!(answered.allows(&other, Role::Client, RequestKind::SealingKey));
        // And many clients together get no more than the global budgets (the burst, and the
        // rate for as long as the loop took).
        let id = |k: u32| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&(k % 10_000).to_be_bytes());
            NodeId::from_bytes(id)
        };
        for (kind, (rate, burst)) in [
            (RequestKind::Seal, ALL_SEALS_PER_SEC),
            (RequestKind::SealingKey, ALL_KEY_QUERIES_PER_SEC),
            (RequestKind::Rosters, ALL_ROSTER_QUERIES_PER_SEC),
        ] {
            let mut answered = Answered::new();
            let start = std::time::Instant::now();
            let many = (0..200_000u32)
                .filter(|k| answered.allows(&id(*k), Role::Client, kind))
                .count();
            let bound = f64::from(burst) + f64::from(rate) * (start.elapsed().as_secs_f64() + 0.1);
            assert!(
                many >= burst as usize && (many as f64) < bound,
                "{many} answers to all clients ({kind:?}), at most {bound}"
            );
            // With the budget spent, joiners (replicas) still follow the roster: a hundred of
            // them at once, where the budget refills one a millisecond.
            if kind == RequestKind::Rosters {
                let spent = (0..10_000).find(|k| !answered.allows(&id(*k), Role::Client, kind));
                assert!(spent.is_some(), "the global budget is spent");
                let joiners = (0..100u8)
                    .filter(|k| {
                        answered.allows(&NodeId::from_bytes([*k + 100; 32]), Role::Replica, kind)
                    })
                    .count();
                assert_eq!(joiners, 100);
            }
        }
    }
}
