//! The client library: requests over the replicas' client plane (QUIC, TLS 1.3 with the
//! client's certificate), accepted once a quorum of its current roster answered and f+1 of them
//! agree.
//!
//! A [`Client`] keeps one request outstanding at a time (open several clients, each with its
//! own certificate, for concurrency). It knows a [`Roster`] (the replicas and their number,
//! first from its configuration) and follows the roster's certified changes
//! (`securesmart::roster`). [`Client::invoke`] sends the request to every replica of its roster
//! and collects replies for its request number; each names the newest certified roster its
//! replica knows. It returns a result once a quorum of the roster's replicas answered at that
//! roster or an older one (a replica whose state is lost answers without a result) and f+1 of
//! them (one correct) with the same bytes ([`Tally`]). A reply that
//! names a newer roster makes the client ask for the certified changes, check them against
//! the roster it trusts, and move to the new one (new replicas, new f) before it accepts
//! anything; so the replicas removed since, or the f+1 faulty ones a grown cluster allows,
//! cannot agree on a forged result for it. Replies from anything but a replica of its roster,
//! for another number, or that do not decode are ignored. Without a result it sends the
//! request again every `retry` (replicas answer a retransmission of an executed request from
//! their reply cache) and gives up after `timeout` with [`ClientError::Timeout`]; a later
//! request never reuses the number.
//!
//! With [`Client::set_confidential`], application requests are confidential, ciphertext in the
//! log, the journals and state transfer (see `securesmart::state`), and no replica can put
//! another ciphertext in their place:
//! - By default the client seals the operation itself with its sealing key
//!   ([`ClientSealingKey`], derived by the replicas from the group epoch's key for this client)
//!   and signs the ciphertext ([`RequestKind::ClientSealed`]). It asks every replica for the key
//!   ([`RequestKind::SealingKey`], over its TLS links) and takes the one f + 1 of them hand out
//!   alike, so f faulty replicas cannot give it a wrong one; of the newest epoch they could
//!   still agree on, so a faulty replica's genuine old key does not outvote the current one.
//!   It counts answers only at its own roster: one naming a newer roster makes it follow the
//!   changes and ask again, and following a roster, or [`ROSTER_TRUST`] without a quorum's
//!   answer, drops the key, so that an idle client does not seal for an epoch a replica
//!   removed since still holds. The replicas execute a client-sealed request only in the
//!   epoch they seal in then; a refused one (the epoch moved on) makes the client fetch the
//!   key again and try once more under a new number.
//! - Without an agreed key (the group forming, a rotation in flight: it asks again after
//!   `retry`), after a second refusal (for `retry`), or with [`Client::set_replica_sealing`],
//!   the client first confirms its roster if a quorum has not answered within
//!   [`ROSTER_TRUST`] (the sealer sees the operation in the clear), and then has
//!   one replica seal the operation (with a random nonce in front) with the group key
//!   ([`RequestKind::Seal`]), and then sends every replica the ciphertext with its signature on
//!   it and on the operation's commitment. A confidential request the replicas refuse (the
//!   replica that sealed it sealed something else, or an epoch they no longer accept) was not
//!   executed; the client tries again under a new number with the next replica as sealer, up
//!   to f + 1 of them.
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

use crate::config::{ClientConfig, ConfigError, load_identity, load_trust};
use crate::kv::{KvOp, KvReply};
use crate::protocol::{
    Auth, ClientReply, ClientRequest, Outcome, RequestKind, RequestSigner, SealerSignature,
};
use crate::roster::{Roster, RosterChange, RosterError};
use securesmart_membership::{ClientSealingKey, MembershipCommand};

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
    /// No accepted result within the timeout.
    #[error("request {number} timed out without an accepted result")]
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
    /// The client plane closed.
    #[error("the client plane closed")]
    Closed,
    /// The replicas no longer keep the roster changes after this client's roster: it needs a
    /// configuration with a newer roster.
    #[error("roster too old: {0}")]
    StaleRoster(RosterError),
}

/// How long a client waits after a replica answered "busy" to a sealing request before it asks
/// the next one.
const BUSY_PAUSE: Duration = Duration::from_millis(50);

/// Timing of a client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Give up on a request after this long.
    pub timeout: Duration,
    /// Send again after this long without an accepted result.
    pub retry: Duration,
    /// Transport limits.
    pub limits: Limits,
    /// The local address to send from (any, by default). Many clients on one host can be
    /// spread over loopback addresses so that the replicas' per-address caps hold.
    pub bind: Option<std::net::IpAddr>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            retry: Duration::from_secs(1),
            limits: Limits::production(),
            bind: None,
        }
    }
}

/// A client of the replicated service (see the module doc).
#[derive(Debug)]
pub struct Client {
    plane: Plane,
    inbox: Inbox,
    roster: Roster,
    number: u64,
    options: ClientOptions,
    confidential: bool,
    signer: RequestSigner,
    /// The sealing key f + 1 replicas handed out alike, and how fresh the roster is.
    held: HeldKey,
    /// When f + 1 replicas last could not agree on a key, or refused two requests sealed with
    /// the ones they handed out (client sealing is tried again only after `retry`).
    key_unavailable: Option<Instant>,
    /// Have a replica seal every confidential request (the path before client sealing).
    replica_sealing: bool,
}

/// The application's result in the replicas' reply to a confidential request, `None` if they
/// refused it (see `securesmart::protocol::CONFIDENTIAL_EXECUTED`).
fn confidential_result(reply: &Bytes) -> Option<Bytes> {
    (reply.first() == Some(&crate::protocol::CONFIDENTIAL_EXECUTED)).then(|| reply.slice(1..))
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
}

impl Client {
    /// Connects to the replicas of `roster` as `identity`, trusting `trust` (the CA and CRLs;
    /// its peer set is replaced).
    ///
    /// # Errors
    /// [`ClientError::Transport`], or [`ClientError::Unreachable`] when fewer than f+1 of
    /// the replicas answer within the timeout.
    pub async fn connect(
        identity: Identity,
        mut trust: TrustConfig,
        roster: Roster,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let signer = RequestSigner::new(&identity).ok_or(ClientError::UnsupportedKey)?;
        let replicas: BTreeMap<NodeId, SocketAddr> = roster.client_addrs();
        // Enough to reach one correct replica: it hands out the roster changes, and the
        // client connects to the new replicas when it follows them.
        let needed = roster.group().f() + 1;
        trust.peers = replicas.clone();
        let local = match options.bind {
            Some(ip) => SocketAddr::new(ip, 0),
            None if replicas.values().any(SocketAddr::is_ipv6) => SocketAddr::from(([0u16; 8], 0)),
            None => SocketAddr::from(([0u8; 4], 0)),
        };
        let (plane, inbox) = Plane::client(
            PlaneConfig::new(identity, local, trust).with_limits(options.limits.clone()),
        )
        .await?;
        // Wait for every replica a while, but go on with fewer.
        let all = replicas.len();
        if !plane
            .wait_connected(all, options.timeout.min(Duration::from_secs(3)))
            .await
            && !plane.wait_connected(needed, options.timeout).await
        {
            let reached = plane.connected_peers().len();
            plane.shutdown().await;
            return Err(ClientError::Unreachable { reached, needed });
        }
        Ok(Self {
            plane,
            inbox,
            roster,
            number: now_micros(),
            options,
            confidential: false,
            signer,
            held: HeldKey::default(),
            key_unavailable: None,
            replica_sealing: false,
        })
    }

    /// Connects as a client configuration says.
    ///
    /// # Errors
    /// As [`Client::connect`], and [`ClientError::Config`].
    pub async fn from_config(config: &ClientConfig) -> Result<Self, ClientError> {
        Self::from_config_with(config, None).await
    }

    /// As [`Client::from_config`], sending from `bind` (see [`ClientOptions::bind`]).
    ///
    /// # Errors
    /// As [`Client::from_config`].
    pub async fn from_config_with(
        config: &ClientConfig,
        bind: Option<std::net::IpAddr>,
    ) -> Result<Self, ClientError> {
        let c = &config.client;
        let identity = load_identity(&c.certificate, &c.key)?;
        let trust = load_trust(&c.ca, c.crl.as_deref())?;
        let roster = config.roster()?;
        let options = ClientOptions {
            timeout: config.timeout(),
            retry: config.retry(),
            limits: c.limits.limits(),
            bind,
        };
        Self::connect(identity, trust, roster, options).await
    }

    /// Faults tolerated by its current roster (a client needs a quorum of answers, f+1 of them matching).
    pub fn f(&self) -> usize {
        self.roster.group().f()
    }

    /// The roster this client trusts now.
    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    /// Presents `identity`, a renewed certificate of this client's key (`securesmart ca
    /// renew`), from now on: each connection to a replica is replaced by one made with it
    /// before the old one closes. Requests are signed with the same key, so nothing else
    /// changes. A client process that is restarted reads the renewed file instead.
    ///
    /// # Errors
    /// [`ClientError::Transport`] when `identity` has another key or role.
    pub fn renew_identity(
        &self,
        identity: securesmart_transport::Identity,
    ) -> Result<(), ClientError> {
        self.plane.renew_identity(identity)?;
        Ok(())
    }

    /// This client's node id.
    pub fn id(&self) -> NodeId {
        self.plane.id()
    }

    /// INSECURE, for the bench's `baseline` mode only: requests that follow carry no signature
    /// (see [`RequestSigner::set_insecure_unsigned`]).
    pub fn set_insecure_unsigned(&mut self, unsigned: bool) {
        self.signer.set_insecure_unsigned(unsigned);
    }

    /// Marks the application requests that follow as confidential (or not): see the module doc.
    pub fn set_confidential(&mut self, confidential: bool) {
        self.confidential = confidential;
    }

    /// Has a replica seal every confidential request (`true`) instead of sealing it with the
    /// client's own key (the default; see the module doc).
    pub fn set_replica_sealing(&mut self, replica_sealing: bool) {
        self.replica_sealing = replica_sealing;
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
        // Each attempt is sealed by a replica not tried yet (a refusal may be a faulty sealer's
        // doing, or an epoch that moved on meanwhile): among f + 1 of them one is correct.
        let framing = crate::protocol::NONCE_LEN
            + securesmart_membership::SEALED_OVERHEAD
            + crate::protocol::COMMITMENT_LEN
            + Auth::LEN;
        if payload.len().saturating_add(framing) > crate::protocol::MAX_PAYLOAD_BYTES {
            return Err(ClientError::Refused(format!(
                "a confidential operation takes at most {} bytes",
                crate::protocol::MAX_PAYLOAD_BYTES - framing
            )));
        }
        // Sealed with the client's own key: with the key it holds, and once more with a fresh
        // one if the replicas refused it (the epoch they seal in moved on, or the key was
        // wrong); then through a replica, and through replicas for `retry` after two refusals.
        let mut refused = 0;
        while refused < 2 && !self.replica_sealing {
            let Some(key) = self.sealing_key().await else {
                break;
            };
            self.number += 1;
            let number = self.number;
            let request = ClientRequest::client_sealed(&self.signer, number, &key, &payload)
                .map_err(|e| ClientError::Refused(format!("cannot seal: {e}")))?;
            let result = self.order(number, Bytes::from(request.encode())).await?;
            if let Some(result) = confidential_result(&result) {
                return Ok(result);
            }
            metrics::counter!("securesmart_client_sealed_refused_total").increment(1);
            self.held.refused();
            refused += 1;
            if refused == 2 {
                self.key_unavailable = Some(Instant::now());
            }
        }
        let mut tried = std::collections::BTreeSet::new();
        for _ in 0..self.roster.replicas().len().max(1) {
            self.number += 1;
            let number = self.number;
            let ask =
                ClientRequest::signed(&self.signer, number, RequestKind::Seal, payload.clone());
            let (sealer_id, sealer, sealed) = self.seal(number, &tried, &ask).await?;
            tried.insert(sealer_id);
            let request =
                ClientRequest::confidential(&self.signer, number, &ask.payload, &sealer, &sealed);
            let result = self.order(number, Bytes::from(request.encode())).await?;
            // An empty reply is the replicas' refusal of a sealed request: not executed (the
            // replica that sealed it sealed something else, or an epoch no longer accepted).
            if let Some(result) = confidential_result(&result) {
                return Ok(result);
            }
            metrics::counter!("securesmart_client_sealed_refused_total").increment(1);
        }
        Err(ClientError::Refused(
            "the replicas could not open the sealed request".into(),
        ))
    }

    /// The sealing key to use: the one held while the roster is current (a quorum of it
    /// answered within [`ROSTER_TRUST`]), or the one a round of key queries settles on
    /// ([`KeyTally`]): f + 1 replicas of the roster, answering at it, hand it out alike. A
    /// reply that names a newer roster makes the client follow it first and ask again, so
    /// that no removed replica's answer counts and no key goes on being used past the roster
    /// change. `None` when they did not agree within `retry`; then it asks again only `retry`
    /// later.
    async fn sealing_key(&mut self) -> Option<ClientSealingKey> {
        if let Some(key) = self.held.usable(Instant::now()) {
            return Some(key.clone());
        }
        if self
            .key_unavailable
            .is_some_and(|at| at.elapsed() < self.options.retry)
        {
            return None;
        }
        let me = self.id();
        let until = Instant::now() + self.options.retry;
        'query: loop {
            self.number += 1;
            let number = self.number;
            let ask =
                ClientRequest::signed(&self.signer, number, RequestKind::SealingKey, Bytes::new());
            self.plane
                .broadcast(Class::Consensus, &Bytes::from(ask.encode()));
            let sent = Instant::now();
            let mut tally = KeyTally::default();
            let mut asked_rosters = false;
            let mut answered_rosters = std::collections::BTreeSet::new();
            while let Ok(Some(m)) = tokio::time::timeout_at(until.into(), self.inbox.recv()).await {
                if !self.roster.contains(&m.from) {
                    continue;
                }
                let reply = match ClientReply::decode(&m.payload) {
                    Ok(reply) if reply.number == number => reply,
                    _ => continue,
                };
                match reply.outcome {
                    Outcome::SealingKey(key) if key.client() == me => {
                        tally.answer(m.from, reply.roster, Some(key));
                    }
                    // One answer to the roster query per replica: moved, ask again at the new
                    // roster (the answers so far were given at the old one).
                    Outcome::Rosters(changes) if answered_rosters.insert(m.from) => {
                        if matches!(self.follow(&changes), Ok(Followed::Moved)) {
                            continue 'query;
                        }
                        continue;
                    }
                    // "Busy" (no key there), or a key for someone else.
                    _ => tally.answer(m.from, reply.roster, None),
                }
                match tally.verdict(&self.roster, false) {
                    KeyVerdict::Take(key) => return Some(self.hold(key, sent)),
                    KeyVerdict::Behind if !asked_rosters => {
                        asked_rosters = true;
                        self.ask_rosters(number);
                    }
                    KeyVerdict::Unavailable => break,
                    KeyVerdict::Behind | KeyVerdict::Wait => {}
                }
            }
            if let KeyVerdict::Take(key) = tally.verdict(&self.roster, true) {
                return Some(self.hold(key, sent));
            }
            break;
        }
        metrics::counter!("securesmart_client_sealing_key_unavailable_total").increment(1);
        self.key_unavailable = Some(Instant::now());
        None
    }

    /// Holds `key`, which a quorum of the roster answered at it, to a query sent at `asked`.
    fn hold(&mut self, key: ClientSealingKey, asked: Instant) -> ClientSealingKey {
        self.key_unavailable = None;
        self.held.take(key.clone(), asked);
        key
    }

    /// Has one replica seal `ask` (a [`RequestKind::Seal`] request numbered `number`): the
    /// replicas of the roster in turn, from one that depends on the number, those in `tried`
    /// last, each given `retry` to answer. Returns the sealer, its signature and the sealed
    /// operation.
    ///
    /// # Errors
    /// [`ClientError::Timeout`] when none answered within the timeout.
    async fn seal(
        &mut self,
        number: u64,
        tried: &std::collections::BTreeSet<NodeId>,
        ask: &ClientRequest,
    ) -> Result<(NodeId, Auth, Bytes), ClientError> {
        let expected_len = ask.payload.len() + securesmart_membership::SEALED_OVERHEAD;
        let ask = Bytes::from(ask.encode());
        let me = self.id();
        let deadline = Instant::now() + self.options.timeout;
        let order = |roster: &Roster| {
            let mut replicas: Vec<NodeId> = roster.replicas().keys().copied().collect();
            let first =
                usize::try_from(number % (replicas.len().max(1) as u64)).unwrap_or_default();
            replicas.rotate_left(first);
            replicas.sort_by_key(|r| tried.contains(r));
            replicas
        };
        let mut replicas = order(&self.roster);
        for k in 0.. {
            if Instant::now() >= deadline {
                break;
            }
            // The sealer sees the operation in the clear: ask only replicas of a roster a
            // quorum confirmed within ROSTER_TRUST (a replica removed since must not be asked).
            if !self.held.roster_current(Instant::now()) {
                self.confirm_roster(deadline).await?;
                replicas = order(&self.roster);
            }
            let Some(sealer_id) = replicas.get(k % replicas.len().max(1)) else {
                break;
            };
            let sealer_id = *sealer_id;
            // Never wait on one replica's queue: a replica that is down has a full one (the
            // client's broadcasts pile up there), and waiting would stall the client for good.
            if self
                .plane
                .try_send(sealer_id, Class::Consensus, ask.clone())
                .is_err()
            {
                if (k + 1) % replicas.len().max(1) == 0 {
                    // None of them could take it: wait a little before the next round.
                    tokio::time::sleep(BUSY_PAUSE.min(self.options.retry)).await;
                }
                continue;
            }
            let until = (Instant::now() + self.options.retry).min(deadline);
            while let Ok(Some(m)) = tokio::time::timeout_at(until.into(), self.inbox.recv()).await {
                if m.from != sealer_id {
                    continue;
                }
                match ClientReply::decode(&m.payload) {
                    // Only what this replica sealed for this request and signed, of the size
                    // the operation makes (anything else: ask the next one).
                    Ok(ClientReply {
                        number: n,
                        outcome: Outcome::Sealed { sealer, sealed },
                        ..
                    }) if n == number => {
                        if sealed.len() == expected_len
                            && SealerSignature::verify(&sealer, &me, number, &sealed)
                                == Ok(sealer_id)
                        {
                            return Ok((sealer_id, sealer, sealed));
                        }
                        metrics::counter!("securesmart_client_bad_seals_total").increment(1);
                        break;
                    }
                    // No group key there (yet): ask the next replica, a little later.
                    Ok(ClientReply {
                        number: n,
                        outcome: Outcome::Busy,
                        ..
                    }) if n == number => {
                        tokio::time::sleep(BUSY_PAUSE.min(self.options.retry)).await;
                        break;
                    }
                    _ => {}
                }
            }
        }
        metrics::counter!("securesmart_client_timeouts_total").increment(1);
        Err(ClientError::Timeout { number })
    }

    /// Orders a membership command (administrators only; see `securesmart::state`) and
    /// returns the replicas' verdict (`ok epoch N`, `ok administrators N` for an
    /// administrator command, or `refused: ...`).
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
        self.order(number, request).await
    }

    /// Sends `request` (numbered `number`) to every replica of its roster until a quorum
    /// answers one result (see the module doc).
    async fn order(&mut self, number: u64, request: Bytes) -> Result<Bytes, ClientError> {
        let start = Instant::now();
        let deadline = start + self.options.timeout;
        let mut tally = Tally::default();
        // When this client last asked for roster changes (at most once per `retry`), who
        // answered since, and who said the changes it needs are gone.
        let mut asked: Option<Instant> = None;
        let mut answered: std::collections::HashSet<NodeId> = Default::default();
        let mut too_old: BTreeMap<NodeId, RosterError> = BTreeMap::new();
        loop {
            self.plane.broadcast(Class::Consensus, &request);
            let resend = (Instant::now() + self.options.retry).min(deadline);
            while let Ok(Some(m)) = tokio::time::timeout_at(resend.into(), self.inbox.recv()).await
            {
                if !self.roster.contains(&m.from) {
                    continue;
                }
                let Ok(reply) = ClientReply::decode(&m.payload) else {
                    metrics::counter!("securesmart_client_bad_replies_total").increment(1);
                    continue;
                };
                match reply.outcome {
                    Outcome::Executed(result) if reply.number == number => {
                        tally.vote(m.from, reply.roster, result);
                    }
                    Outcome::Lost if reply.number == number => tally.lost(m.from, reply.roster),
                    // Only answers to this client's query, one per replica and query.
                    Outcome::Rosters(changes)
                        if reply.number == number && answered.insert(m.from) =>
                    {
                        match self.follow(&changes) {
                            Ok(Followed::Moved) => {
                                // The new replicas have not seen the request yet.
                                self.plane.broadcast(Class::Consensus, &request);
                                answered.clear();
                                too_old.clear();
                            }
                            Ok(Followed::Current | Followed::Ignored) => {}
                            Err(e) => {
                                too_old.insert(m.from, e);
                            }
                        }
                    }
                    _ => continue,
                }
                match tally.verdict(&self.roster) {
                    Verdict::Accept(result) => {
                        // (As of when it asked: no answer is older.)
                        self.held.confirm(start);
                        metrics::histogram!("securesmart_client_latency_seconds")
                            .record(start.elapsed().as_secs_f64());
                        return Ok(result);
                    }
                    Verdict::Behind(_) => {
                        if asked.is_none_or(|at| at.elapsed() >= self.options.retry) {
                            asked = Some(Instant::now());
                            answered.clear();
                            self.ask_rosters(number);
                        }
                    }
                    Verdict::Wait => {}
                }
            }
            if Instant::now() >= deadline {
                metrics::counter!("securesmart_client_timeouts_total").increment(1);
                // Told by f+1 replicas (one of them correct) that it is too far behind.
                if too_old.len() > self.roster.group().f()
                    && let Some(e) = too_old.into_values().next()
                {
                    return Err(ClientError::StaleRoster(e));
                }
                return Err(ClientError::Timeout { number });
            }
            metrics::counter!("securesmart_client_retransmissions_total").increment(1);
        }
    }

    /// Follows the certified roster changes the replicas hand out until one round of
    /// answers (all of the roster's replicas, or those within `retry`) brings nothing newer,
    /// and returns the roster it trusts then.
    ///
    /// # Errors
    /// [`ClientError::StaleRoster`] (from f + 1 replicas), [`ClientError::Unreachable`]
    /// when fewer than f + 1 replicas of its roster answered the last round, or
    /// [`ClientError::Closed`].
    pub async fn refresh_roster(&mut self) -> Result<&Roster, ClientError> {
        loop {
            let before = self.roster.number();
            // A number of its own: answers to an earlier query still queued do not count.
            self.number += 1;
            let number = self.number;
            self.ask_rosters(number);
            let asked = Instant::now();
            let until = asked + self.options.retry;
            let mut round = RosterRound::default();
            let all = self.roster.replicas().len();
            while round.answered() < all {
                let m = match tokio::time::timeout_at(until.into(), self.inbox.recv()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err(ClientError::Closed),
                    Err(_) => break,
                };
                if !round.wants(&self.roster, &m.from) {
                    continue;
                }
                // One answer per replica and round, to this query only.
                if let Ok(ClientReply {
                    number: n,
                    roster,
                    outcome: Outcome::Rosters(changes),
                }) = ClientReply::decode(&m.payload)
                    && n == number
                {
                    let followed = self.follow(&changes);
                    round.count(m.from, roster <= before, followed);
                }
            }
            if self.roster.number() == before {
                match round.standing(&self.roster) {
                    RosterStanding::Stale(e) => return Err(ClientError::StaleRoster(e)),
                    RosterStanding::Unreachable { reached, needed } => {
                        return Err(ClientError::Unreachable { reached, needed });
                    }
                    RosterStanding::Confirmed => self.held.confirm(asked),
                    RosterStanding::Believed => {}
                }
                return Ok(&self.roster);
            }
        }
    }

    /// Refreshes the roster until a quorum of it answered at it (see [`ROSTER_TRUST`]), by
    /// `deadline`.
    ///
    /// # Errors
    /// [`ClientError::StaleRoster`] and [`ClientError::Closed`] as [`Client::refresh_roster`], or
    /// [`ClientError::Unreachable`] when no quorum answered by `deadline`.
    pub(crate) async fn confirm_roster(&mut self, deadline: Instant) -> Result<(), ClientError> {
        loop {
            match self.refresh_roster().await.map(|_| ()) {
                Ok(()) | Err(ClientError::Unreachable { .. }) => {}
                Err(e) => return Err(e),
            }
            if self.held.roster_current(Instant::now()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Unreachable {
                    reached: self.plane.connected_peers().len(),
                    needed: self.roster.group().quorum(),
                });
            }
        }
    }

    /// Asks the replicas of its roster for the certified changes after it, as query `number`
    /// (the answers carry it).
    fn ask_rosters(&self, number: u64) {
        let since = Bytes::copy_from_slice(&self.roster.number().to_be_bytes());
        let query = ClientRequest::signed(&self.signer, number, RequestKind::Rosters, since);
        self.plane
            .broadcast(Class::Consensus, &Bytes::from(query.encode()));
    }

    /// Moves to the newest roster that `changes` (a replica's answer) certify from the current
    /// one. An answer that certifies nothing is ignored (a faulty replica may send anything).
    ///
    /// # Errors
    /// [`RosterError::TooOld`] when the answer says the changes it needs are gone: a hint
    /// only (unauthenticated), which the caller believes from f+1 replicas.
    fn follow(&mut self, changes: &[u8]) -> Result<Followed, RosterError> {
        let Ok(changes) = RosterChange::decode_list(changes) else {
            metrics::counter!("securesmart_client_bad_replies_total").increment(1);
            return Ok(Followed::Ignored);
        };
        let next = match crate::roster::follow(&self.roster, &changes) {
            Ok(next) => next,
            Err(e @ RosterError::TooOld { .. }) => return Err(e),
            Err(e) => {
                metrics::counter!("securesmart_client_bad_rosters_total").increment(1);
                tracing::debug!(error = %e, "roster changes refused");
                return Ok(Followed::Ignored);
            }
        };
        if next.number() <= self.roster.number() {
            return Ok(Followed::Current);
        }
        let mut trust = self.plane.trust();
        trust.peers = next.client_addrs();
        if let Err(e) = self.plane.update_trust(trust) {
            tracing::warn!(error = %e, "cannot follow the new roster");
            return Ok(Followed::Ignored);
        }
        metrics::counter!("securesmart_client_roster_changes_total").increment(1);
        tracing::info!(
            from = self.roster.number(),
            to = next.number(),
            replicas = next.replicas().len(),
            "following the replicas' new roster"
        );
        self.roster = next;
        self.held.roster_moved();
        Ok(Followed::Moved)
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

/// What a replica's answer to a roster query did to the client's roster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Followed {
    /// It certified a newer roster, which the client follows now.
    Moved,
    /// It certified nothing newer.
    Current,
    /// It did not decode or certify, or the client could not follow it.
    Ignored,
}

/// Whether roster `now`, which a client on roster `before` followed and which a quorum of it
/// confirmed ([`RosterStanding::Confirmed`], as [`Client::confirm_roster`] waits for), removes
/// replica `id`. Only a confirmed roster may be asked: one that f + 1 answers only believe may
/// be one that a faulty replica and a lagging correct one still name while the others
/// certified a newer one that adds `id` again. A quorum holds f + 1 correct replicas; a faulty
/// primary can keep at most f correct ones behind the order, so at least one of them has
/// certified the newer change and names it (unless more than f correct ones lag on their own,
/// or the newer change executed but its certificate is not ordered yet: then the verdict may
/// come early; see `SECURITY.md`).
pub(crate) fn removes(id: &NodeId, before: u64, now: &Roster) -> bool {
    now.number() > before && !now.contains(id)
}

/// The answers to one round of roster queries, counted at the roster the round asked at.
#[derive(Default)]
struct RosterRound {
    answered: std::collections::HashSet<NodeId>,
    /// Those that answered at the roster with nothing newer.
    current: usize,
    /// Those that said the changes the client needs are gone.
    too_old: Vec<RosterError>,
}

/// What a round of roster queries that certified nothing newer says of the client's roster.
#[derive(Debug, PartialEq)]
enum RosterStanding {
    /// A quorum answered at it with nothing newer (and at most f said the changes it needs are
    /// gone: a faulty replica can say so for free, and a correct one far ahead would leave
    /// more than f correct ones lagging): current (for confidential requests, and for a
    /// replica to find itself removed).
    Confirmed,
    /// At least f + 1 answered (one of them correct) and none certified anything newer: the
    /// client goes on with it, but a faulty replica and a lagging correct one may be among
    /// them.
    Believed,
    /// Fewer than f + 1 answered.
    Unreachable { reached: usize, needed: usize },
    /// More than f said the changes the client needs are gone.
    Stale(RosterError),
}

impl RosterRound {
    /// How many replicas answered.
    fn answered(&self) -> usize {
        self.answered.len()
    }

    /// Whether an answer from `from` counts: a replica of `roster` that has not answered yet.
    fn wants(&self, roster: &Roster, from: &NodeId) -> bool {
        roster.contains(from) && !self.answered.contains(from)
    }

    /// Counts `from`'s answer: whether it named the round's roster or an older one (`at`), and
    /// what following its changes gave.
    fn count(&mut self, from: NodeId, at: bool, followed: Result<Followed, RosterError>) {
        if !self.answered.insert(from) {
            return;
        }
        match followed {
            Ok(Followed::Current) if at => self.current += 1,
            Ok(_) => {}
            Err(e) => self.too_old.push(e),
        }
    }

    /// The roster's standing after the round (called when nothing newer was followed).
    fn standing(mut self, roster: &Roster) -> RosterStanding {
        let group = roster.group();
        if self.too_old.len() > group.f()
            && let Some(e) = self.too_old.pop()
        {
            return RosterStanding::Stale(e);
        }
        if self.answered.len() <= group.f() {
            return RosterStanding::Unreachable {
                reached: self.answered.len(),
                needed: group.f() + 1,
            };
        }
        if self.current >= group.quorum() {
            RosterStanding::Confirmed
        } else {
            RosterStanding::Believed
        }
    }
}

/// How long a client takes its roster for current after it sent the query or request that a
/// quorum of it last answered at it.
/// A confidential request after a longer silence first asks again (a key query, or a roster
/// query before a replica seals), so that an idle client does not send what a removed
/// replica could read: such a replica still holds the epoch key it was removed in.
pub const ROSTER_TRUST: Duration = Duration::from_secs(2);

/// A client's sealing key and when a quorum of its roster last answered at that roster.
#[derive(Debug, Default)]
struct HeldKey {
    key: Option<ClientSealingKey>,
    confirmed: Option<Instant>,
}

impl HeldKey {
    /// The key, while the roster is current at `now`.
    fn usable(&self, now: Instant) -> Option<&ClientSealingKey> {
        self.key.as_ref().filter(|_| self.roster_current(now))
    }

    /// Whether a quorum of the roster answered at it within [`ROSTER_TRUST`] before `now`.
    fn roster_current(&self, now: Instant) -> bool {
        self.confirmed
            .is_some_and(|at| now.saturating_duration_since(at) < ROSTER_TRUST)
    }

    /// A quorum of the roster answered at it at `now`.
    fn confirm(&mut self, now: Instant) {
        self.confirmed = Some(now);
    }

    /// Holds `key`, handed out by a quorum of the roster at `now`.
    fn take(&mut self, key: ClientSealingKey, now: Instant) {
        self.key = Some(key);
        self.confirm(now);
    }

    /// The replicas refused a request sealed with the key: fetch another.
    fn refused(&mut self) {
        self.key = None;
    }

    /// The client follows a new roster: the key's epoch may be one a removed replica holds.
    fn roster_moved(&mut self) {
        self.key = None;
        self.confirmed = None;
    }
}

/// The answers to one sealing-key query, and which key they allow a client to take.
#[derive(Debug, Default)]
struct KeyTally {
    /// Per replica: the roster it answered at, and the key it handed out (`None`: none).
    answers: HashMap<NodeId, (u64, Option<ClientSealingKey>)>,
}

/// What a [`KeyTally`] allows.
#[derive(Clone, Debug, PartialEq, Eq)]
enum KeyVerdict {
    /// A quorum of the roster answered at it, f + 1 of them (one correct) with this key, of
    /// the newest epoch the others could still outvote.
    Take(ClientSealingKey),
    /// A replica of the roster answered at a newer roster: follow the changes first.
    Behind,
    /// Not enough answers yet.
    Wait,
    /// No key can reach f + 1 matching answers.
    Unavailable,
}

impl KeyTally {
    /// Records `replica`'s answer at roster `roster` (its first answer counts).
    fn answer(&mut self, replica: NodeId, roster: u64, key: Option<ClientSealingKey>) {
        self.answers.entry(replica).or_insert((roster, key));
    }

    /// What the answers allow a client that trusts `roster`; `done`: no more will come.
    ///
    /// Of the keys f + 1 replicas hand out alike it takes the newest epoch, and while a newer
    /// epoch's key could still reach f + 1 with the replicas yet to answer, it waits for
    /// them: a faulty replica with a genuine old key and one correct replica a batch behind
    /// must not make it pick an epoch the others moved past (the replicas would refuse every
    /// request sealed with it).
    fn verdict(&self, roster: &Roster, done: bool) -> KeyVerdict {
        let group = roster.group();
        let seen = AtRoster::of(&self.answers, roster);
        if seen.current.len() < group.quorum() {
            return match seen.newest {
                Some(newest) if newest > roster.number() => KeyVerdict::Behind,
                _ if done => KeyVerdict::Unavailable,
                _ => KeyVerdict::Wait,
            };
        }
        let best = seen
            .values()
            .filter(|k| seen.votes(k) > group.f())
            .max_by_key(|k| k.epoch());
        let pending = roster.replicas().len().saturating_sub(seen.answered);
        // A key not seen yet, or a newer one seen, could still reach f + 1.
        let newer_possible = pending > group.f()
            || seen.values().any(|k| {
                best.is_none_or(|b| k.epoch() > b.epoch()) && seen.votes(k) + pending > group.f()
            });
        match best {
            _ if newer_possible && !done => KeyVerdict::Wait,
            Some(key) => KeyVerdict::Take((*key).clone()),
            None => KeyVerdict::Unavailable,
        }
    }
}

/// What the replicas of a roster answered, each at the roster it was at: a value, or none
/// (what [`Tally`] and [`KeyTally`] count). Answers from outside the roster are left out.
struct AtRoster<'a, T> {
    /// The answers given at the roster or an older one (a quorum of them shows it current).
    current: Vec<Option<&'a T>>,
    /// How many of the roster's replicas answered, at any roster.
    answered: usize,
    /// The newest roster one of them answered at.
    newest: Option<u64>,
}

impl<'a, T: PartialEq> AtRoster<'a, T> {
    fn of(answers: &'a HashMap<NodeId, (u64, Option<T>)>, roster: &Roster) -> Self {
        let ours: Vec<_> = answers
            .iter()
            .filter(|(id, _)| roster.contains(id))
            .map(|(_, answer)| answer)
            .collect();
        Self {
            current: ours
                .iter()
                .filter(|(r, _)| *r <= roster.number())
                .map(|(_, value)| value.as_ref())
                .collect(),
            answered: ours.len(),
            newest: ours.iter().map(|(r, _)| *r).max(),
        }
    }

    /// The values among the current answers.
    fn values(&self) -> impl Iterator<Item = &'a T> + '_ {
        self.current.iter().flatten().copied()
    }

    /// How many current answers are `value`.
    fn votes(&self, value: &T) -> usize {
        self.values().filter(|v| *v == value).count()
    }
}

/// The replies to one request, and what they allow a client to conclude (see the module doc).
#[derive(Debug, Default)]
pub struct Tally {
    /// Per replica: the roster it answered at, and its result (`None`: its state is lost, it
    /// could not compute one).
    votes: HashMap<NodeId, (u64, Option<Bytes>)>,
}

/// What a [`Tally`] allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A quorum of the roster's replicas answered at it (or an older roster), f + 1 of them
    /// with this result.
    Accept(Bytes),
    /// A replica of the roster answered at a newer roster: follow the changes first.
    Behind(u64),
    /// Not enough replies yet.
    Wait,
}

impl Tally {
    /// Records `replica`'s reply `result`, given at roster `roster` (a later reply of the same
    /// replica replaces it).
    pub fn vote(&mut self, replica: NodeId, roster: u64, result: Bytes) {
        self.votes.insert(replica, (roster, Some(result)));
    }

    /// Records that `replica`, at roster `roster`, could not compute a result (its state is
    /// lost until state transfer): it counts towards the quorum that shows the roster is
    /// current, never towards a result.
    pub fn lost(&mut self, replica: NodeId, roster: u64) {
        self.votes.insert(replica, (roster, None));
    }

    /// What the replies allow a client that trusts `roster` to conclude.
    pub fn verdict(&self, roster: &Roster) -> Verdict {
        let group = roster.group();
        let seen = AtRoster::of(&self.votes, roster);
        // A quorum answered at this roster (so it is current: the correct replicas of a
        // roster that changed name the newer one), and f + 1 of them (one correct) agree.
        if seen.current.len() >= group.quorum()
            && let Some(result) = seen.values().find(|r| seen.votes(r) > group.f())
        {
            return Verdict::Accept(result.clone());
        }
        match seen.newest {
            Some(newest) if newest > roster.number() => Verdict::Behind(newest),
            _ => Verdict::Wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roster::RosterEntry;
    use securesmart_transport::Role;
    use securesmart_transport::pki::DevCa;

    fn rosters() -> (Vec<NodeId>, impl Fn(u64, &[usize]) -> Roster) {
        let ca = DevCa::new("tally ca").unwrap();
        let ids: Vec<_> = (0..8)
            .map(|i| ca.issue_role(&format!("r{i}"), Role::Replica).unwrap())
            .collect();
        let node_ids = ids.iter().map(Identity::id).collect();
        let roster = move |number: u64, which: &[usize]| {
            Roster::new(
                number,
                which
                    .iter()
                    .map(|i| {
                        let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + *i as u16));
                        (
                            ids[*i].id(),
                            RosterEntry {
                                certificate: ids[*i].chain()[0].clone(),
                                replica_addr: addr,
                                client_addr: addr,
                            },
                        )
                    })
                    .collect(),
            )
        };
        (node_ids, roster)
    }

    #[test]
    fn a_quorum_at_the_roster_with_f_plus_one_matching_is_accepted() {
        let (ids, roster) = rosters();
        let r = roster(3, &[0, 1, 2, 3]);
        let mut t = Tally::default();
        let good = Bytes::from_static(b"good");
        t.vote(ids[0], 3, good.clone());
        t.vote(ids[1], 3, good.clone());
        assert_eq!(t.verdict(&r), Verdict::Wait, "f + 1 but no quorum yet");
        // A faulty replica's different result does not stop it; a reply given at an older
        // roster counts.
        t.vote(ids[2], 2, Bytes::from_static(b"forged"));
        assert_eq!(t.verdict(&r), Verdict::Accept(good.clone()));
        // A replica whose state is lost counts towards the quorum, not towards a result.
        let mut t = Tally::default();
        t.vote(ids[0], 3, good.clone());
        t.lost(ids[1], 3);
        t.lost(ids[2], 3);
        assert_eq!(t.verdict(&r), Verdict::Wait, "one result is not f + 1");
        t.vote(ids[3], 3, good.clone());
        assert_eq!(t.verdict(&r), Verdict::Accept(good.clone()));
        // Replicas outside the roster count for nothing.
        let mut t = Tally::default();
        for i in [4, 5, 6] {
            t.vote(ids[i], 3, good.clone());
        }
        assert_eq!(t.verdict(&r), Verdict::Wait);
    }

    #[test]
    fn removed_replicas_cannot_serve_a_forged_result_to_a_client_on_their_old_roster() {
        let (ids, roster) = rosters();
        // The client trusts roster 0 (replicas 0-3). Since then replica 3 was removed and 4
        // added (roster 1). Replica 3 (removed, its certificate not revoked) and replica 0
        // (faulty) answer at once with the same forged result at roster 0: f + 1 = 2
        // matching replies, which the client used to accept.
        let old = roster(0, &[0, 1, 2, 3]);
        let forged = Bytes::from_static(b"forged");
        let mut t = Tally::default();
        t.vote(ids[3], 0, forged.clone());
        t.vote(ids[0], 0, forged.clone());
        assert_eq!(t.verdict(&old), Verdict::Wait);
        // The correct replicas answer at roster 1: the client must follow the change first.
        t.vote(ids[1], 1, Bytes::from_static(b"good"));
        assert_eq!(t.verdict(&old), Verdict::Behind(1));
        t.vote(ids[2], 1, Bytes::from_static(b"good"));
        assert_eq!(t.verdict(&old), Verdict::Behind(1));
        // At roster 1 the removed replica is not counted: the faulty one and the two correct
        // ones are a quorum, and the correct result has f + 1 votes.
        let new = roster(1, &[0, 1, 2, 4]);
        assert_eq!(
            t.verdict(&new),
            Verdict::Accept(Bytes::from_static(b"good"))
        );
    }

    #[test]
    fn a_client_of_a_cluster_that_grew_waits_for_the_larger_quorum() {
        let (ids, roster) = rosters();
        // The cluster grew from 4 to 7 replicas (f from 1 to 2): two faulty replicas among the
        // client's four agree on a forged result. The client still needs a third reply at its
        // roster, and the correct ones name the new roster.
        let old = roster(0, &[0, 1, 2, 3]);
        let forged = Bytes::from_static(b"forged");
        let mut t = Tally::default();
        t.vote(ids[0], 0, forged.clone());
        t.vote(ids[1], 0, forged.clone());
        assert_eq!(t.verdict(&old), Verdict::Wait);
        t.vote(ids[2], 3, Bytes::from_static(b"good"));
        assert_eq!(t.verdict(&old), Verdict::Behind(3));
        // At the new roster (f = 2, quorum 5) the two faulty ones and three correct ones
        // answer: the correct result has f + 1 = 3 votes, the forged one 2.
        let grown = roster(3, &[0, 1, 2, 3, 4, 5, 6]);
        for i in [3, 4] {
            t.vote(ids[i], 3, Bytes::from_static(b"good"));
        }
        assert_eq!(
            t.verdict(&grown),
            Verdict::Accept(Bytes::from_static(b"good"))
        );
    }

    fn key(epoch: u64, byte: u8) -> ClientSealingKey {
        ClientSealingKey::from_bytes(epoch, NodeId::from_bytes([9; 32]), [byte; 32])
    }

    #[test]
    fn a_replica_finds_itself_removed_only_from_a_roster_a_quorum_confirms() {
        let (ids, roster) = rosters();
        // Replica 4 was removed at roster 1 (replicas 0 to 3) and added again at roster 2.
        // Replica 0 (faulty) names roster 1 as the newest, and so does replica 1 (correct, a
        // batch behind): f + 1 answers with nothing newer believe roster 1, no quorum confirms it.
        let one = roster(1, &[0, 1, 2, 3]);
        let mut round = RosterRound::default();
        round.count(ids[0], true, Ok(Followed::Current));
        round.count(ids[1], true, Ok(Followed::Current));
        round.count(ids[1], true, Ok(Followed::Current));
        let standing = round.standing(&one);
        assert_eq!(
            standing,
            RosterStanding::Believed,
            "a second answer does not count"
        );
        // One answer that names a newer roster does not count toward the quorum either.
        let mut round = RosterRound::default();
        round.count(ids[0], true, Ok(Followed::Current));
        round.count(ids[1], true, Ok(Followed::Current));
        round.count(ids[2], false, Ok(Followed::Current));
        assert_eq!(round.standing(&one), RosterStanding::Believed);
        // A quorum at roster 1 with nothing newer: removed.
        let mut round = RosterRound::default();
        for i in [0, 1, 2] {
            round.count(ids[i], true, Ok(Followed::Current));
        }
        assert_eq!(round.standing(&one), RosterStanding::Confirmed);
        assert!(removes(&ids[4], 0, &one));
        // A faulty replica's free "the changes you need are gone" cannot veto a quorum that
        // answered at the roster (else one replica would keep a removed one running).
        let mut round = RosterRound::default();
        for i in [0, 1, 2] {
            round.count(ids[i], true, Ok(Followed::Current));
        }
        round.count(
            ids[3],
            true,
            Err(RosterError::TooOld {
                trusted: 1,
                oldest: 9,
            }),
        );
        assert_eq!(round.standing(&one), RosterStanding::Confirmed);
        // Confirmed, but naming the replica, or no newer than its own: not removed.
        assert!(!removes(&ids[3], 0, &one));
        assert!(!removes(&ids[4], 1, &one));
        // Fewer than f + 1 answers: unreachable.
        let mut round = RosterRound::default();
        round.count(ids[0], true, Ok(Followed::Current));
        assert_eq!(
            round.standing(&one),
            RosterStanding::Unreachable {
                reached: 1,
                needed: 2
            }
        );
    }

    #[test]
    fn a_faulty_replica_with_an_old_key_and_a_lagging_one_do_not_pick_the_clients_epoch() {
        let (ids, roster) = rosters();
        let r = roster(0, &[0, 1, 2, 3]);
        let (old, new) = (key(4, 1), key(5, 2));
        let mut t = KeyTally::default();
        // Replica 0 (faulty) hands out the genuine key of the epoch before, replica 1 (correct,
        // a batch behind) too; replica 2 the epoch the replicas seal in. A quorum answered and
        // the old key has f + 1 answers, but the new one can still reach f + 1: wait.
        t.answer(ids[0], 0, Some(old.clone()));
        t.answer(ids[1], 0, Some(old.clone()));
        t.answer(ids[2], 0, Some(new.clone()));
        assert_eq!(t.verdict(&r, false), KeyVerdict::Wait);
        t.answer(ids[3], 0, Some(new.clone()));
        assert_eq!(t.verdict(&r, false), KeyVerdict::Take(new.clone()));
        // Replica 3 never answers: after the round the old key (f + 1, one correct) is used.
        let mut t = KeyTally::default();
        t.answer(ids[0], 0, Some(old.clone()));
        t.answer(ids[1], 0, Some(old.clone()));
        t.answer(ids[2], 0, Some(new.clone()));
        assert_eq!(t.verdict(&r, true), KeyVerdict::Take(old.clone()));
        // A made-up key of a far epoch from the faulty one does not hold the client up once the
        // correct ones answered; a second answer from a replica does not count.
        let mut t = KeyTally::default();
        t.answer(ids[0], 0, Some(key(99, 7)));
        t.answer(ids[0], 0, Some(new.clone()));
        for i in [1, 2] {
            t.answer(ids[i], 0, Some(new.clone()));
        }
        assert_eq!(
            t.verdict(&r, false),
            KeyVerdict::Wait,
            "replica 3 may still agree"
        );
        t.answer(ids[3], 0, Some(new.clone()));
        assert_eq!(t.verdict(&r, false), KeyVerdict::Take(new.clone()));
        // Answers that cannot agree: no key.
        let mut t = KeyTally::default();
        for (i, b) in [(0, 1), (1, 2), (2, 3), (3, 4)] {
            t.answer(ids[i], 0, Some(key(5, b)));
        }
        assert_eq!(t.verdict(&r, false), KeyVerdict::Unavailable);
        let mut t = KeyTally::default();
        for i in [0, 1, 2, 3] {
            t.answer(ids[i], 0, None);
        }
        assert_eq!(t.verdict(&r, false), KeyVerdict::Unavailable);
    }

    #[test]
    fn a_removed_replica_cannot_hand_a_client_on_its_old_roster_the_key_of_its_epoch() {
        let (ids, roster) = rosters();
        // Replica 3 was removed (roster 1: replicas 0, 1, 2, 4) and holds the key of the epoch
        // it was removed in; replica 0 (faulty) answers with it at roster 0 too.
        let old = roster(0, &[0, 1, 2, 3]);
        let mut t = KeyTally::default();
        t.answer(ids[3], 0, Some(key(4, 1)));
        t.answer(ids[0], 0, Some(key(4, 1)));
        assert_eq!(t.verdict(&old, false), KeyVerdict::Wait);
        t.answer(ids[1], 1, Some(key(5, 2)));
        assert_eq!(t.verdict(&old, false), KeyVerdict::Behind);
        t.answer(ids[2], 1, Some(key(5, 2)));
        assert_eq!(t.verdict(&old, false), KeyVerdict::Behind);
        assert_eq!(
            t.verdict(&old, true),
            KeyVerdict::Behind,
            "no key, even at the end"
        );
        // Replicas outside the roster count for nothing.
        let mut t = KeyTally::default();
        for i in [4, 5, 6] {
            t.answer(ids[i], 0, Some(key(4, 1)));
        }
        assert_eq!(t.verdict(&old, true), KeyVerdict::Unavailable);
    }

    #[test]
    fn a_held_key_is_given_up_when_the_roster_moves_or_has_not_been_confirmed_for_a_while() {
        let t0 = Instant::now();
        let mut held = HeldKey::default();
        assert!(held.usable(t0).is_none());
        held.take(key(4, 1), t0);
        assert_eq!(held.usable(t0), Some(&key(4, 1)));
        // An idle client asks again before it seals.
        assert!(held.usable(t0 + ROSTER_TRUST).is_none());
        // A busy one confirms the roster with every result.
        held.confirm(t0 + ROSTER_TRUST);
        assert_eq!(held.usable(t0 + ROSTER_TRUST), Some(&key(4, 1)));
        // Following a new roster drops the key and the confirmation.
        held.roster_moved();
        assert!(held.usable(t0 + ROSTER_TRUST).is_none());
        assert!(!held.roster_current(t0 + ROSTER_TRUST));
        // A refusal drops the key, not the confirmation.
        held.take(key(5, 2), t0);
        held.refused();
        assert!(held.usable(t0).is_none());
        assert!(held.roster_current(t0));
    }

    #[test]
    fn a_confidential_reply_is_a_result_only_with_the_executed_mark() {
        let mark = crate::protocol::CONFIDENTIAL_EXECUTED;
        assert_eq!(
            confidential_result(&Bytes::from(vec![mark, b'o', b'k'])),
            Some(Bytes::from_static(b"ok"))
        );
        // An empty result is a result; an empty reply, or anything else, is a refusal.
        assert_eq!(
            confidential_result(&Bytes::from(vec![mark])),
            Some(Bytes::new())
        );
        assert_eq!(confidential_result(&Bytes::new()), None);
        assert_eq!(confidential_result(&Bytes::from_static(b"ok")), None);
    }
}
