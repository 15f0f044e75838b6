//! A deterministic simulator: replicas, clients and a network in simulated time, every choice
//! drawn from one seeded generator, so that a seed replays the same run exactly.
//!
//! The network delays (uniformly within a range), reorders, loses and duplicates messages and
//! can be partitioned; replicas crash and restart (with empty memory: they catch up by state
//! transfer; or from their journals, which a crashed machine cuts back to the last sync, see
//! [`Scenario::power_loss`]); faulty replicas misbehave as [`Fault`] says, Twins included.
//! Every message goes through the real codec and [`KeyRing`] verification. Clients send each
//! request to every replica, retransmit until `f + 1` replicas return matching replies, then
//! send the next one.
//!
//! [`Sim::run`] returns a [`Report`]; [`Report::check`] applies the oracles, which are
//! independent of the core: no two correct replicas execute different batches at one sequence
//! number; every accepted reply equals the reply of a reference execution of the agreed log;
//! and (liveness) every request of every client is accepted by `heal_at + liveness_bound`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use securesmart_base::NodeId;

use crate::message::{
    Digest, KeyRing, Limits, Message, Request, Seq, Signed, Signer, batch_digest,
};
use crate::replica::{Config, Output, Replica};
use crate::service::{Executor, RestoreError, StateMachine};

/// How a faulty replica misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// As primary, sends a different batch to half of the replicas.
    Equivocate,
    /// Sends nothing at all.
    Silent,
    /// Delays everything it sends by this much.
    Delay(Duration),
    /// Signs prepares, commits and pre-prepares with digests that match nothing.
    WrongDigest,
    /// Corrupts the signature of everything it sends.
    BadSignature,
    /// Sends prepares and commits for another digest to half of the replicas.
    ConflictingVotes,
    /// Runs as two instances with one identity and key, each talking to half of the others.
    Twin,
    /// As primary, leaves every request of this client (by index) out of its pre-prepares and
    /// orders everybody else's: a censoring primary that keeps the log moving.
    Censor(usize),
    /// Besides what it should send, floods every replica with messages they can only hold:
    /// prepares for ever later views, and full pre-prepares for a far view it is primary of.
    Flood,
    /// Besides what it should send, asks every replica for the state with every message,
    /// alternating between the whole state and the batches above a checkpoint, and for a
    /// part of its own stable snapshot.
    FetchFlood,
    /// Serves state transfers with parts whose bytes are wrong (a faulty state source).
    WrongParts,
    /// As primary, orders every request with another payload than its client sent (a
    /// ciphertext swapper): caught only where requests carry their client's signature
    /// ([`Scenario::signed_requests`]).
    SwapPayloads,
}

/// How a faulty client misbehaves ([`Scenario::client_faults`]; with
/// [`Scenario::signed_requests`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientFault {
    /// Every request carries a tag that fails the check, sent to every replica.
    BadSignatures,
    /// Each request goes to half of the replicas with one payload and to the other half with
    /// another, both correctly tagged.
    Equivocate,
    /// Each request goes correctly tagged to half of the replicas and with the same payload
    /// but a bad tag to the other half (which half alternates with the request number).
    EquivocateBadly,
    /// Each request goes with a bad tag to replica 0 (the first primary) and correctly
    /// tagged to the others, so that the backups must forward it to a primary that holds a
    /// bad copy.
    BadToPrimary,
}

/// A network partition: between `from` and `until`, messages between different sides are
/// lost. Replicas not named are on a side of their own.
#[derive(Clone, Debug)]
pub struct Partition {
    /// Start.
    pub from: Duration,
    /// End (heals).
    pub until: Duration,
    /// The sides, as replica indices.
    pub sides: Vec<Vec<usize>>,
}

/// A crash, and optionally a restart: with empty memory, or from the replica's journal when
/// `core.durable` is set (the replica then counts as correct).
#[derive(Clone, Copy, Debug)]
pub struct Crash {
    /// Replica index.
    pub replica: usize,
    /// When it stops.
    pub at: Duration,
    /// When it starts again.
    pub restart: Option<Duration>,
}

/// A simulation scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The seed.
    pub seed: u64,
    /// Replicas in the initial group.
    pub replicas: usize,
    /// Further replicas that run from the start but join only through a group change.
    pub spares: usize,
    /// Group changes, ordered as ordinary requests: when client 0 sends request number `n`,
    /// its payload asks for the group `members` (replica indices). Every replica that
    /// executes it calls [`Replica::reconfigure`].
    pub group_changes: Vec<(u64, Vec<usize>)>,
    /// Clients (closed loop: one outstanding request each).
    pub clients: usize,
    /// Requests per client.
    pub requests: u64,
    /// Payload bytes per request.
    pub payload: usize,
    /// Network delay range.
    pub delay: (Duration, Duration),
    /// Loss probability before `heal_at`.
    pub loss: f64,
    /// Duplication probability.
    pub duplicate: f64,
    /// Partitions.
    pub partitions: Vec<Partition>,
    /// Crashes.
    pub crashes: Vec<Crash>,
    /// Crashes are of the machine, not only of the process: a replica loses the journal
    /// records written after its last sync (see [`crate::journal`]).
    pub power_loss: bool,
    /// Faulty replicas.
    pub faults: Vec<(usize, Fault)>,
    /// When loss and partitions stop.
    pub heal_at: Duration,
    /// Every request is accepted by `heal_at + liveness_bound`.
    pub liveness_bound: Duration,
    /// If set, every request sent after `heal_at` is accepted within this long of its first
    /// sending (a bound on how long any one request can be held back).
    pub max_latency: Option<Duration>,
    /// Client retransmission interval.
    pub client_retry: Duration,
    /// Real Ed25519 signatures (`false` needs the `insecure-unsigned` feature).
    pub signatures: bool,
    /// Clients authenticate their payloads and the replicas check it before ordering
    /// ([`Config::request_check`], as a node checks client signatures): a keyed BLAKE3 tag
    /// stands in for the signature, with a key only the client and the check know.
    pub signed_requests: bool,
    /// Replicas take client requests as from their client's authenticated channel
    /// ([`Replica::handle_authenticated_request`], as a node does), not checked on arrival.
    pub authenticated_channels: bool,
    /// Faulty clients (by index). Their requests need not be accepted; with no faulty
    /// replicas, none of them that fails the check may execute.
    pub client_faults: Vec<(usize, ClientFault)>,
    /// Core parameters (the replica list is filled in).
    pub core: Config,
}

impl Scenario {
    /// How client `client` misbehaves, if it does ([`Scenario::client_faults`]).
    pub fn client_fault(&self, client: usize) -> Option<ClientFault> {
        self.client_faults
            .iter()
            .find(|(c, _)| *c == client)
            .map(|(_, f)| *f)
    }
    /// A fault-free scenario with small delays, quick timers and small windows (so that
    /// checkpoints, garbage collection and view changes happen within short runs).
    pub fn new(seed: u64, replicas: usize) -> Self {
        let mut core = Config::new(Vec::new());
        core.max_batch = 8;
        core.batch_delay = Duration::from_millis(2);
        core.window = 8;
        core.checkpoint_interval = 4;
        core.view_change_timeout = Duration::from_millis(150);
        core.max_pending = 1000;
        core.state_transfer_delay = Duration::from_millis(60);
        // Small parts, so that every state transfer fetches its snapshot in parts.
        core.state_part_bytes = 64;
        Self {
            seed,
            replicas,
            spares: 0,
            group_changes: Vec::new(),
            clients: 3,
            requests: 8,
            payload: 8,
            delay: (Duration::from_micros(200), Duration::from_millis(5)),
            loss: 0.0,
            duplicate: 0.0,
            partitions: Vec::new(),
            crashes: Vec::new(),
            power_loss: false,
            faults: Vec::new(),
            heal_at: Duration::ZERO,
            liveness_bound: Duration::from_secs(20),
            max_latency: None,
            client_retry: Duration::from_millis(100),
            signatures: true,
            signed_requests: false,
            authenticated_channels: false,
            client_faults: Vec::new(),
            core,
        }
    }
}

/// The test application: an append-only log whose every reply depends on the whole order
/// before it (the running hash and count), so any disagreement shows in the replies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    count: u64,
    hash: [u8; 32],
}

impl StateMachine for Chain {
    fn execute(&mut self, request: &Request) -> Bytes {
        let mut h = blake3::Hasher::new();
        h.update(&self.hash);
        h.update(&request.digest().0);
        self.hash = *h.finalize().as_bytes();
        self.count += 1;
        let mut out = self.count.to_be_bytes().to_vec();
        out.extend_from_slice(&self.hash);
        Bytes::from(out)
    }

    fn snapshot(&self) -> Bytes {
        let mut out = self.count.to_be_bytes().to_vec();
        out.extend_from_slice(&self.hash);
        Bytes::from(out)
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        let mut r = securesmart_base::wire::Reader::new(snapshot);
        let count = u64::from_be_bytes(r.array()?);
        let hash = r.array()?;
        r.finish()?;
        *self = Self { count, hash };
        Ok(())
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct Report {
    /// The scenario.
    pub scenario: Scenario,
    /// Per replica index: the batches executed (sequence number, digest, requests).
    pub logs: Vec<Vec<(Seq, Digest, Vec<Request>)>>,
    /// Replica indices that were faulty (Byzantine or crashed).
    pub faulty: BTreeSet<usize>,
    /// Accepted replies: (client, number) -> (result, when).
    pub accepted: BTreeMap<(usize, u64), (Bytes, Duration)>,
    /// When each request was first sent: (client, number) -> when.
    pub sent: BTreeMap<(usize, u64), Duration>,
    /// Simulated time at the end.
    pub end: Duration,
    /// Messages delivered.
    pub delivered: u64,
    /// Messages dropped by the receiver, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Views the replicas ended in.
    pub views: Vec<u64>,
    /// State transfers completed.
    pub restores: u64,
    /// Journal records lost with crashed machines ([`Scenario::power_loss`]): pre-prepares
    /// and committed certificates written after the last sync.
    pub records_lost: usize,
    /// The most messages any instance held for a later view or window at once.
    pub max_held: usize,
    /// State replies sent to faulty replicas: (replies, with a snapshot).
    pub state_to_faulty: (u64, u64),
    /// Snapshot parts sent to faulty replicas.
    pub parts_to_faulty: u64,
    /// Each instance's protocol state at the end ([`Replica::summary`]).
    pub summaries: Vec<String>,
    /// Batches replicas executed before a restart and execute again after it (replica,
    /// sequence number, digest): they must agree with what is executed there afterwards.
    pub earlier: Vec<(usize, Seq, Digest)>,
    /// What each client sent as each request: (client, number) -> payload.
    pub payloads: BTreeMap<(usize, u64), Bytes>,
}

impl Report {
    /// The safety and liveness oracles.
    ///
    /// # Errors
    /// What went wrong, with the seed to replay it.
    pub fn check(&self) -> Result<(), String> {
        let seed = self.scenario.seed;
        let fail = |what: String| Err(format!("seed {seed}: {what}"));
        // Safety: correct replicas agree on every sequence number they executed.
        let mut agreed: BTreeMap<Seq, (Digest, &Vec<Request>)> = BTreeMap::new();
        for (i, log) in self.logs.iter().enumerate() {
            if self.faulty.contains(&i) {
                continue;
            }
            let mut last = 0;
            for (seq, digest, batch) in log {
                if *seq <= last {
                    return fail(format!("replica {i} executed {seq} after {last}"));
                }
                last = *seq;
                if let Some((d, _)) = agreed.get(seq) {
                    if d != digest {
                        return fail(format!("two batches executed at sequence number {seq}"));
                    }
                } else {
                    agreed.insert(*seq, (*digest, batch));
                }
            }
        }
        for (i, seq, digest) in &self.earlier {
            if !self.faulty.contains(i)
                && let Some((d, _)) = agreed.get(seq)
                && d != digest
            {
                return fail(format!(
                    "replica {i} executed another batch at {seq} before its restart"
                ));
            }
        }
        // Integrity: what executed is what the clients sent.
        let clients = client_ids(self.scenario.clients);
        let faulty_client = |c: usize| self.scenario.client_fault(c).is_some();
        for (seq, (_, batch)) in &agreed {
            for r in batch.iter() {
                let Some(c) = clients.iter().position(|id| *id == r.client) else {
                    continue;
                };
                if faulty_client(c) {
                    // It sent several versions: any may execute, but with only correct
                    // replicas none that fails the check.
                    if self.faulty.is_empty() && self.scenario.signed_requests && !tagged(r) {
                        return fail(format!(
                            "faulty client {c}'s request {} executed at {seq} with a bad tag",
                            r.number
                        ));
                    }
                    continue;
                }
                if self.payloads.get(&(c, r.number)) != Some(&r.payload) {
                    return fail(format!(
                        "client {c} request {} executed at {seq} with a payload it did not send",
                        r.number
                    ));
                }
            }
        }
        // Replies: each accepted one equals the reference execution of the agreed log (up to
        // the first gap in what correct replicas executed).
        let mut reference = Executor::new(Chain::default());
        let mut expected: BTreeMap<(NodeId, u64), Bytes> = BTreeMap::new();
        for (next, (seq, (_, batch))) in (1..).zip(&agreed) {
            if *seq != next {
                break;
            }
            for r in reference.execute(batch) {
                expected.insert((r.client, r.number), r.result);
            }
        }
        for ((c, n), (result, _)) in &self.accepted {
            let Some(id) = clients.get(*c) else { continue };
            if let Some(want) = expected.get(&(*id, *n))
                && want != result
            {
                return fail(format!("client {c} accepted a wrong reply to request {n}"));
            }
        }
        // Liveness.
        if let Some(max) = self.scenario.max_latency {
            for (key, sent) in &self.sent {
                let Some((_, at)) = self.accepted.get(key) else {
                    continue;
                };
                if *sent >= self.scenario.heal_at && at.saturating_sub(*sent) > max {
                    return fail(format!(
                        "client {} request {} took {:?} (bound {max:?})",
                        key.0,
                        key.1,
                        at.saturating_sub(*sent)
                    ));
                }
            }
        }
        let bound = self.scenario.heal_at + self.scenario.liveness_bound;
        for c in (0..self.scenario.clients).filter(|c| !faulty_client(*c)) {
            for n in 1..=self.scenario.requests {
                match self.accepted.get(&(c, n)) {
                    Some((_, at)) if *at <= bound => {}
                    Some((_, at)) => {
                        return fail(format!("client {c} request {n} accepted late, at {at:?}"));
                    }
                    None => {
                        return fail(format!(
                            "client {c} request {n} never accepted (views {:?}, executed {:?})",
                            self.views,
                            self.logs
                                .iter()
                                .map(|l| l.last().map(|e| e.0))
                                .collect::<Vec<_>>()
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// A pre-prepare of `batch` (its digest computed) for `view` and `seq`.
fn pre_prepare(view: crate::message::View, seq: Seq, batch: Vec<Request>) -> Message {
    Message::PrePrepare {
        view,
        seq,
        digest: batch_digest(&batch),
        batch,
    }
}

/// `m` (a pre-prepare, prepare or commit) with its digest replaced.
fn with_digest(m: &Message, bogus: Digest) -> Option<Message> {
    let mut m = m.clone();
    match &mut m {
        Message::PrePrepare { digest, .. }
        | Message::Prepare { digest, .. }
        | Message::Commit { digest, .. } => *digest = bogus,
        _ => return None,
    }
    Some(m)
}

/// Bytes of the tag that stands in for a client's signature ([`Scenario::signed_requests`]).
const TAG_LEN: usize = 16;

/// The tag of `client`'s request `number` with `body`: keyed BLAKE3 under a key derived from
/// the client id, which the sim's clients and the replicas' check use, and a faulty replica
/// does not.
fn client_tag(client: &NodeId, number: u64, body: &[u8]) -> [u8; TAG_LEN] {
    let key = blake3::derive_key(
        securesmart_base::tags::consensus::SIM_CLIENT_KEY,
        client.as_bytes(),
    );
    let mut h = blake3::Hasher::new_keyed(&key);
    h.update(&number.to_be_bytes());
    h.update(body);
    let mut tag = [0u8; TAG_LEN];
    h.finalize_xof().fill(&mut tag);
    tag
}

/// Whether `request` carries its client's tag ([`Scenario::signed_requests`]).
fn tagged(request: &Request) -> bool {
    let Some(split) = request.payload.len().checked_sub(TAG_LEN) else {
        return false;
    };
    let (body, tag) = request.payload.split_at(split);
    client_tag(&request.client, request.number, body) == tag
}

/// `body` followed by `client`'s tag for request `number` ([`Scenario::signed_requests`]).
fn tagged_payload(client: &NodeId, number: u64, body: &[u8]) -> Bytes {
    let mut out = body.to_vec();
    out.extend_from_slice(&client_tag(client, number, body));
    Bytes::from(out)
}

/// What a client with `fault` sends replica `to` instead of its (tagged) `request`.
fn faulty_version(fault: Option<ClientFault>, request: &Request, to: usize) -> Request {
    let spoil = |r: &Request| {
        let mut p = r.payload.to_vec();
        if let Some(last) = p.last_mut() {
            *last ^= 1;
        }
        Request {
            payload: Bytes::from(p),
            ..r.clone()
        }
    };
    let half = (to as u64 + request.number).is_multiple_of(2);
    match fault {
        None => request.clone(),
        Some(ClientFault::BadSignatures) => spoil(request),
        Some(ClientFault::EquivocateBadly) if half => spoil(request),
        Some(ClientFault::BadToPrimary) if to == 0 => spoil(request),
        Some(ClientFault::Equivocate) if half => {
            let split = request.payload.len().saturating_sub(TAG_LEN);
            let mut body = request.payload.get(..split).unwrap_or_default().to_vec();
            if let Some(first) = body.first_mut() {
                *first ^= 0x80;
            }
            Request {
                payload: tagged_payload(&request.client, request.number, &body),
                ..request.clone()
            }
        }
        Some(_) => request.clone(),
    }
}

fn client_ids(n: usize) -> Vec<NodeId> {
    (0..n)
        .map(|c| NodeId::from_bytes(*blake3::hash(&(c as u64).to_be_bytes()).as_bytes()))
        .collect()
}

#[derive(Debug)]
enum Event {
    /// A replica message to instance `to`.
    Deliver {
        to: usize,
        bytes: Vec<u8>,
    },
    /// A client request to instance `to`.
    Request {
        to: usize,
        request: Request,
    },
    /// A reply from replica index `from` to client `client`.
    Reply {
        client: usize,
        from: usize,
        number: u64,
        result: Bytes,
    },
    /// A client's retransmission timer.
    Retry {
        client: usize,
        number: u64,
    },
    Crash(usize),
    Restart(usize),
    Tick,
}

struct Instance {
    replica: usize,
    core: Option<Replica>,
    executor: Executor<Chain>,
    fault: Option<Fault>,
    /// What the replica journaled (with `core.durable`): its "disk", kept across a crash.
    journal: Vec<crate::journal::Record>,
    /// How many of `journal`'s records are durable (the rest are lost with the machine).
    synced: usize,
    /// A record that needs a sync was written after the last one (as the driver's flag).
    unsynced: bool,
}

struct Client {
    id: NodeId,
    number: u64,
    replies: BTreeMap<u64, BTreeMap<usize, Bytes>>,
}

/// A simulation in progress.
pub struct Sim {
    scenario: Scenario,
    rng: StdRng,
    now: Duration,
    queue: BinaryHeap<Reverse<(Duration, u64, usize)>>,
    events: BTreeMap<usize, Event>,
    next_event: usize,
    order: u64,
    instances: Vec<Instance>,
    signers: Vec<Signer>,
    ids: Vec<NodeId>,
    ring: KeyRing,
    config: Config,
    clients: Vec<Client>,
    report: Report,
}

/// The simulator could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// Unsigned runs need the `insecure-unsigned` feature.
    #[error("unsigned runs need the insecure-unsigned feature")]
    UnsignedUnavailable,
}

/// The payload prefix of a group change request (then one byte per member index).
const GROUP_CHANGE: &[u8] = b"group change:";

/// Tick interval of simulated time.
const TICK: Duration = Duration::from_millis(1);

impl Sim {
    /// Sets up a run of `scenario` (identities from a fresh development CA).
    ///
    /// # Errors
    /// [`SimError`] if identities cannot be made.
    pub fn new(scenario: Scenario) -> Result<Self, SimError> {
        let total = scenario.replicas + scenario.spares;
        let (signers, ring, ids) = identities(total, scenario.signatures)?;
        let mut config = scenario.core.clone();
        config.replicas = ids.iter().take(scenario.replicas).copied().collect();
        if scenario.signed_requests {
            config.request_check = Some(crate::replica::RequestCheck::new(tagged));
        }
        let mut instances = Vec::new();
        for (i, signer) in signers.iter().enumerate() {
            let fault = scenario
                .faults
                .iter()
                .find(|(r, _)| *r == i)
                .map(|(_, f)| *f);
            let copies = if fault == Some(Fault::Twin) { 2 } else { 1 };
            for _ in 0..copies {
                instances.push(Instance {
                    replica: i,
                    core: Some(Replica::new(config.clone(), Signer::new_from(signer))),
                    executor: Executor::new(Chain::default()),
                    fault,
                    journal: Vec::new(),
                    synced: 0,
                    unsynced: false,
                });
            }
        }
        let mut faulty: BTreeSet<usize> = scenario.faults.iter().map(|(r, _)| *r).collect();
        // A replica that restarts from its journal is correct again (it forgets nothing).
        faulty.extend(
            scenario
                .crashes
                .iter()
                .filter(|c| !(scenario.core.durable && c.restart.is_some()))
                .map(|c| c.replica),
        );
        let clients = client_ids(scenario.clients)
            .into_iter()
            .map(|id| Client {
                id,
                number: 0,
                replies: BTreeMap::new(),
            })
            .collect();
        let report = Report {
            scenario: scenario.clone(),
            logs: vec![Vec::new(); total],
            faulty,
            accepted: BTreeMap::new(),
            sent: BTreeMap::new(),
            end: Duration::ZERO,
            delivered: 0,
            dropped: BTreeMap::new(),
            views: Vec::new(),
            restores: 0,
            records_lost: 0,
            max_held: 0,
            state_to_faulty: (0, 0),
            parts_to_faulty: 0,
            summaries: Vec::new(),
            earlier: Vec::new(),
            payloads: BTreeMap::new(),
        };
        Ok(Self {
            rng: StdRng::seed_from_u64(scenario.seed),
            scenario,
            now: Duration::ZERO,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            order: 0,
            instances,
            signers,
            ids,
            ring,
            config,
            clients,
            report,
        })
    }

    fn schedule(&mut self, at: Duration, event: Event) {
        let key = self.next_event;
        self.next_event += 1;
        self.order += 1;
        self.events.insert(key, event);
        self.queue.push(Reverse((at, self.order, key)));
    }

    fn healed(&self) -> bool {
        self.now >= self.scenario.heal_at
    }

    fn cut(&self, a: usize, b: usize) -> bool {
        self.scenario.partitions.iter().any(|p| {
            self.now >= p.from && self.now < p.until && {
                let side = |r| p.sides.iter().position(|s| s.contains(&r));
                side(a) != side(b) || side(a).is_none()
            }
        })
    }

    /// The network between replica `from` and replica `to`: `None` if lost, or the delay.
    fn link(&mut self, from: usize, to: usize) -> Option<Duration> {
        if self.cut(from, to) {
            return None;
        }
        if !self.healed() && self.scenario.loss > 0.0 && self.rng.random_bool(self.scenario.loss) {
            return None;
        }
        let (lo, hi) = self.scenario.delay;
        let mut d = if hi > lo {
            lo + Duration::from_nanos(self.rng.random_range(0..(hi - lo).as_nanos() as u64))
        } else {
            lo
        };
        if let Some(Fault::Delay(extra)) = self.fault_of(from) {
            d += extra;
        }
        Some(d)
    }

    fn fault_of(&self, replica: usize) -> Option<Fault> {
        self.scenario
            .faults
            .iter()
            .find(|(r, _)| *r == replica)
            .map(|(_, f)| *f)
    }

    /// The instances that receive what is sent to replica `to` by sender `from` (a Twin's
    /// peers are split between its two instances).
    fn route(&self, to: usize, from_key: usize) -> Option<usize> {
        let copies: Vec<usize> = self
            .instances
            .iter()
            .enumerate()
            .filter(|(_, i)| i.replica == to)
            .map(|(k, _)| k)
            .collect();
        copies.get(from_key % copies.len().max(1)).copied()
    }

    fn send_message(&mut self, from: usize, to: usize, signed: &Signed) {
        match self.fault_of(from) {
            Some(Fault::Flood) => self.flood(from, to),
            Some(Fault::FetchFlood) => self.fetch_flood(from, to),
            _ => {}
        }
        let Some(signed) = self.misbehave(from, to, signed) else {
            return;
        };
        let bytes = signed.encode();
        let copies = if self.rng.random_bool(self.scenario.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            if let Some(delay) = self.link(from, to)
                && let Some(inst) = self.route(to, from)
            {
                self.schedule(
                    self.now + delay,
                    Event::Deliver {
                        to: inst,
                        bytes: bytes.clone(),
                    },
                );
            }
        }
    }

    /// The low watermark of replica `replica`'s (first) instance, 0 if it is down.
    fn low_of(&self, replica: usize) -> Seq {
        self.instances
            .iter()
            .find(|i| i.replica == replica)
            .and_then(|i| i.core.as_ref())
            .map_or(0, Replica::low_watermark)
    }

    /// Sends `m` from `from` to `to` over the network as it is (no fault applied, no
    /// duplicate): a faulty replica's extra messages.
    fn post(&mut self, from: usize, to: usize, m: &Signed) {
        if let Some(delay) = self.link(from, to)
            && let Some(inst) = self.route(to, from)
        {
            let bytes = m.encode();
            self.schedule(self.now + delay, Event::Deliver { to: inst, bytes });
        }
    }

    /// A flooder's extra messages to `to` (see [`Fault::Flood`]).
    fn flood(&mut self, from: usize, to: usize) {
        let Some(signer) = self.signers.get(from) else {
            return;
        };
        let n = self.scenario.replicas as u64;
        let span = self.scenario.core.window.saturating_mul(2).max(1);
        // Above its own stable checkpoint, so that the others can only hold them.
        let low = self.low_of(from);
        let mut messages = Vec::new();
        for _ in 0..4 {
            self.order += 1;
            let seq = low + 1 + self.rng.random_range(0..span);
            let batch: Vec<Request> = (0..self.scenario.core.max_batch as u8)
                .map(|k| Request {
                    client: NodeId::from_bytes([k; 32]),
                    number: seq,
                    payload: Bytes::from(vec![k; 1024]),
                })
                .collect();
            messages.push(signer.sign(pre_prepare(n * 1_000_000 + from as u64, seq, batch)));
        }
        messages.push(signer.sign(Message::Prepare {
            view: 1_000_000 + self.order,
            seq: low + 1,
            digest: Digest([0xf1; 32]),
        }));
        for m in messages {
            self.post(from, to, &m);
        }
    }

    /// A state-fetch amplifier's extra request to `to` (see [`Fault::FetchFlood`]).
    fn fetch_flood(&mut self, from: usize, to: usize) {
        let Some(signer) = self.signers.get(from) else {
            return;
        };
        self.order += 1;
        // The whole state, or the batches above its own stable checkpoint, in turn.
        let low = self.low_of(from);
        let seq = if self.order.is_multiple_of(2) {
            0
        } else {
            low + 1
        };
        let ask = signer.sign(Message::FetchState { seq });
        let stable = self
            .instances
            .iter()
            .find(|i| i.replica == from)
            .and_then(|i| i.core.as_ref())
            .and_then(|c| c.stable_certificate().first())
            .map(|v| v.message().clone());
        let part = match stable {
            Some(Message::Checkpoint { seq, state }) => {
                let index = (self.order % 4) as u32;
                Some(signer.sign(Message::FetchPart { seq, state, index }))
            }
            _ => None,
        };
        self.post(from, to, &ask);
        if let Some(part) = part {
            self.post(from, to, &part);
        }
    }

    /// What a faulty replica `from` sends to `to` instead of `signed` (`None`: nothing).
    fn misbehave(&mut self, from: usize, to: usize, signed: &Signed) -> Option<Signed> {
        let Some(fault) = self.fault_of(from) else {
            return Some(signed.clone());
        };
        let signer = self.signers.get(from)?;
        let bogus = Digest(*blake3::hash(&to.to_be_bytes()).as_bytes());
        Some(match (fault, &signed.message) {
            (Fault::Silent, _) => return None,
            (
                Fault::WrongParts,
                Message::Part {
                    seq,
                    state,
                    index,
                    bytes,
                },
            ) => {
                let mut wrong = bytes.to_vec();
                match wrong.first_mut() {
                    Some(b) => *b ^= 0x5a,
                    None => wrong.push(0),
                }
                signer.sign(Message::Part {
                    seq: *seq,
                    state: *state,
                    index: *index,
                    bytes: Bytes::from(wrong),
                })
            }
            (Fault::BadSignature, _) => {
                let mut s = signed.clone();
                s.signature[0] ^= 0x40;
                s
            }
            (Fault::Equivocate, Message::PrePrepare { view, seq, .. }) if to.is_multiple_of(2) => {
                let batch = vec![Request {
                    client: NodeId::from_bytes([0xee; 32]),
                    number: *seq,
                    payload: Bytes::from_static(b"equivocation"),
                }];
                signer.sign(pre_prepare(*view, *seq, batch))
            }
            (Fault::WrongDigest, m) => {
                with_digest(m, bogus).map_or_else(|| signed.clone(), |m| signer.sign(m))
            }
            (Fault::ConflictingVotes, m @ (Message::Prepare { .. } | Message::Commit { .. }))
                if to.is_multiple_of(2) =>
            {
                with_digest(m, bogus).map_or_else(|| signed.clone(), |m| signer.sign(m))
            }
            (
                Fault::SwapPayloads,
                Message::PrePrepare {
                    view, seq, batch, ..
                },
            ) => {
                let batch: Vec<Request> = batch
                    .iter()
                    .map(|r| {
                        let mut payload = r.payload.to_vec();
                        if let Some(first) = payload.first_mut() {
                            *first ^= 0xa5;
                        }
                        Request {
                            payload: Bytes::from(payload),
                            ..r.clone()
                        }
                    })
                    .collect();
                signer.sign(pre_prepare(*view, *seq, batch))
            }
            (
                Fault::Censor(victim),
                Message::PrePrepare {
                    view, seq, batch, ..
                },
            ) => {
                let victim = self.clients.get(victim).map(|c| c.id);
                let batch: Vec<Request> = batch
                    .iter()
                    .filter(|r| Some(r.client) != victim)
                    .cloned()
                    .collect();
                signer.sign(pre_prepare(*view, *seq, batch))
            }
            _ => signed.clone(),
        })
    }

    fn send_request(&mut self, client: usize) {
        let Some(c) = self.clients.get(client) else {
            return;
        };
        let mut payload = vec![client as u8; self.scenario.payload];
        if let Some(first) = payload.first_mut() {
            *first = c.number as u8;
        }
        if client == 0
            && let Some((_, members)) = self
                .scenario
                .group_changes
                .iter()
                .find(|(n, _)| *n == c.number)
        {
            payload = GROUP_CHANGE.to_vec();
            payload.extend(members.iter().map(|m| *m as u8));
        }
        let mut request = Request {
            client: c.id,
            number: c.number,
            payload: Bytes::from(payload),
        };
        if self.scenario.signed_requests {
            request.payload = tagged_payload(&request.client, request.number, &request.payload);
        }
        self.report
            .payloads
            .entry((client, request.number))
            .or_insert_with(|| request.payload.clone());
        let fault = self.scenario.client_fault(client);
        for to in 0..self.ids.len() {
            // Clients are not partitioned, but lose messages like everyone before healing.
            if !self.healed()
                && self.scenario.loss > 0.0
                && self.rng.random_bool(self.scenario.loss)
            {
                continue;
            }
            let (lo, hi) = self.scenario.delay;
            let d = lo + (hi - lo) / 2;
            if let Some(inst) = self.route(to, client) {
                let request = faulty_version(fault, &request, to);
                self.schedule(self.now + d, Event::Request { to: inst, request });
            }
        }
        let retry = self.now + self.scenario.client_retry;
        let number = request.number;
        self.schedule(retry, Event::Retry { client, number });
    }

    fn next_request(&mut self, client: usize) {
        let Some(c) = self.clients.get_mut(client) else {
            return;
        };
        if c.number >= self.scenario.requests {
            return;
        }
        c.number += 1;
        self.report.sent.insert((client, c.number), self.now);
        self.send_request(client);
    }

    /// Carries out instance `k`'s outputs.
    fn drain(&mut self, k: usize) {
        loop {
            let Some(inst) = self.instances.get_mut(k) else {
                return;
            };
            let from = inst.replica;
            let Some(out) = inst.core.as_mut().and_then(Replica::poll_output) else {
                return;
            };
            // As the driver: what needs a sync is durable before anything after it happens.
            if inst.unsynced && !matches!(out, Output::Persist(_)) {
                inst.synced = inst.journal.len();
                inst.unsynced = false;
            }
            match out {
                Output::Broadcast(s) => {
                    for to in 0..self.ids.len() {
                        if to != from {
                            self.send_message(from, to, &s);
                        }
                    }
                }
                Output::Send { to, message } => {
                    if let Some(to) = self.ids.iter().position(|id| *id == to) {
                        if self.report.faulty.contains(&to) {
                            match &message.message {
                                Message::State { snapshot, .. } => {
                                    self.report.state_to_faulty.0 += 1;
                                    self.report.state_to_faulty.1 +=
                                        u64::from(!snapshot.is_empty());
                                }
                                Message::Part { .. } => self.report.parts_to_faulty += 1,
                                _ => {}
                            }
                        }
                        self.send_message(from, to, &message);
                    }
                }
                Output::Execute { seq, digest, batch } => {
                    let replies = inst.executor.execute(&batch);
                    for r in &batch {
                        let tag = if self.scenario.signed_requests {
                            TAG_LEN
                        } else {
                            0
                        };
                        if let Some(members) = r
                            .payload
                            .get(..r.payload.len().saturating_sub(tag))
                            .and_then(|p| p.strip_prefix(GROUP_CHANGE))
                        {
                            let members = members
                                .iter()
                                .filter_map(|m| self.ids.get(usize::from(*m)).copied())
                                .collect();
                            if let Some(core) = inst.core.as_mut()
                                && core.reconfigure(members, seq).is_err()
                            {
                                *self.report.dropped.entry("reconfigure".into()).or_default() += 1;
                            }
                        }
                    }
                    if inst.fault != Some(Fault::Twin)
                        && let Some(log) = self.report.logs.get_mut(from)
                    {
                        log.push((seq, digest, batch));
                    }
                    for r in replies {
                        self.reply(from, r);
                    }
                }
                Output::CheckpointDue { seq } => {
                    let snapshot = inst.executor.snapshot();
                    if let Some(core) = inst.core.as_mut() {
                        core.handle_checkpoint_state(seq, snapshot);
                    }
                }
                Output::Persist(record) => {
                    inst.unsynced |= record.needs_sync();
                    inst.journal.push(record);
                }
                Output::Restore { snapshot, .. } => {
                    self.report.restores += 1;
                    if inst.executor.restore(&snapshot).is_err() {
                        *self
                            .report
                            .dropped
                            .entry("restore_failed".into())
                            .or_default() += 1;
                    }
                }
                _ => {}
            }
        }
    }

    fn reply(&mut self, from: usize, r: crate::service::Reply) {
        let Some(client) = self.clients.iter().position(|c| c.id == r.client) else {
            return;
        };
        let result = if self.fault_of(from).is_some() {
            Bytes::from_static(b"a faulty replica's reply")
        } else {
            r.result
        };
        let (lo, hi) = self.scenario.delay;
        let d = lo + (hi - lo) / 2;
        self.schedule(
            self.now + d,
            Event::Reply {
                client,
                from,
                number: r.number,
                result,
            },
        );
    }

    /// Delivers messages that reached instance `k` at the same instant: decoded, verified as
    /// one batch (as the driver verifies whatever is waiting), then handled in order.
    fn deliver(&mut self, k: usize, messages: Vec<Vec<u8>>) {
        self.report.delivered += messages.len() as u64;
        let mut decoded = Vec::with_capacity(messages.len());
        for bytes in messages {
            match Signed::decode(&bytes, &Limits::default()) {
                // As the driver does: structure and sender before any signature.
                Ok(s) => match self
                    .instances
                    .get(k)
                    .and_then(|i| i.core.as_ref())
                    .map(|core| core.admissible(&s))
                {
                    Some(Err(e)) => *self.report.dropped.entry(e.to_string()).or_default() += 1,
                    _ => decoded.push(s),
                },
                Err(e) => {
                    *self
                        .report
                        .dropped
                        .entry(format!("decode: {e}"))
                        .or_default() += 1
                }
            }
        }
        // As the driver does: timers these messages start count from now.
        let now = self.now;
        if let Some(core) = self.instances.get_mut(k).and_then(|i| i.core.as_mut()) {
            core.advance_clock(now);
        }
        for verified in self.ring.verify_batch(decoded) {
            let outcome = match verified {
                Ok(v) => match self.instances.get_mut(k).and_then(|i| i.core.as_mut()) {
                    Some(core) => core.handle_message(v).map_err(|e| e.to_string()),
                    None => Ok(()),
                },
                Err(e) => Err(format!("verify: {e}")),
            };
            if let Err(e) = outcome {
                *self.report.dropped.entry(e).or_default() += 1;
            }
            self.drain(k);
        }
    }

    fn all_accepted(&self) -> bool {
        let mut correct =
            (0..self.scenario.clients).filter(|c| self.scenario.client_fault(*c).is_none());
        correct.all(|c| {
            (1..=self.scenario.requests).all(|n| self.report.accepted.contains_key(&(c, n)))
        })
    }

    /// Runs until every request is accepted and the replicas have settled, or until the
    /// liveness bound has passed.
    pub fn run(mut self) -> Report {
        for c in 0..self.clients.len() {
            self.next_request(c);
        }
        for crash in self.scenario.crashes.clone() {
            self.schedule(crash.at, Event::Crash(crash.replica));
            if let Some(at) = crash.restart {
                self.schedule(at, Event::Restart(crash.replica));
            }
        }
        self.schedule(TICK, Event::Tick);
        let limit = self.scenario.heal_at + self.scenario.liveness_bound + Duration::from_secs(1);
        let mut settle: Option<Duration> = None;
        while let Some(Reverse((at, _, key))) = self.queue.pop() {
            self.now = at;
            if self.now > limit || settle.is_some_and(|s| self.now > s) {
                break;
            }
            // Everything due at this instant: other events in order, then the messages for each
            // instance together.
            let mut due = vec![key];
            while let Some(Reverse((t, _, k))) = self.queue.peek()
                && *t == at
            {
                due.push(*k);
                self.queue.pop();
            }
            let mut messages: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
            for key in due {
                match self.events.remove(&key) {
                    Some(Event::Deliver { to, bytes }) => {
                        messages.entry(to).or_default().push(bytes)
                    }
                    Some(event) => self.step(event),
                    None => {}
                }
            }
            for (to, batch) in messages {
                self.deliver(to, batch);
            }
            if settle.is_none() && self.all_accepted() {
                settle = Some(self.now + Duration::from_millis(300));
            }
        }
        self.report.end = self.now;
        self.report.summaries = self
            .instances
            .iter()
            .map(|i| i.core.as_ref().map_or("crashed".into(), Replica::summary))
            .collect();
        self.report.views = self
            .instances
            .iter()
            .map(|i| i.core.as_ref().map_or(0, Replica::view))
            .collect();
        self.report
    }

    fn step(&mut self, event: Event) {
        match event {
            Event::Deliver { to, bytes } => self.deliver(to, vec![bytes]),
            Event::Request { to, request } => {
                if let Some(inst) = self.instances.get_mut(to) {
                    let from = inst.replica;
                    if let Some(reply) = inst.executor.cached(&request.client, request.number) {
                        self.reply(from, reply);
                    } else if let Some(core) = inst.core.as_mut() {
                        let _ = if self.scenario.authenticated_channels {
                            core.handle_authenticated_request(request, self.now)
                        } else {
                            core.handle_request(request, self.now)
                        };
                    }
                    self.drain(to);
                }
            }
            Event::Reply {
                client,
                from,
                number,
                result,
            } => self.on_reply(client, from, number, result),
            Event::Retry { client, number } => {
                if self.clients.get(client).is_some_and(|c| c.number == number)
                    && !self.report.accepted.contains_key(&(client, number))
                {
                    self.send_request(client);
                }
            }
            Event::Crash(r) => {
                let power_loss = self.scenario.power_loss;
                for inst in self.instances.iter_mut().filter(|i| i.replica == r) {
                    inst.core = None;
                    if power_loss {
                        self.report.records_lost += inst.journal.len() - inst.synced;
                        inst.journal.truncate(inst.synced);
                    }
                    inst.unsynced = false;
                }
            }
            Event::Restart(r) => {
                let Some(signer) = self.signers.get(r) else {
                    return;
                };
                let Some(inst) = self.instances.iter_mut().find(|i| i.replica == r) else {
                    return;
                };
                let signer = Signer::new_from(signer);
                let core = if self.config.durable {
                    let records = inst.journal.clone();
                    let recovered = if self.scenario.power_loss {
                        Replica::recover(self.config.clone(), signer, records)
                    } else {
                        // Only the process stopped: the journal is whole.
                        Replica::recover_intact(self.config.clone(), signer, records)
                    };
                    match recovered {
                        Ok(core) => core,
                        Err(e) => {
                            *self
                                .report
                                .dropped
                                .entry(format!("recover: {e}"))
                                .or_default() += 1;
                            return;
                        }
                    }
                } else {
                    inst.journal.clear();
                    inst.synced = 0;
                    Replica::new(self.config.clone(), signer)
                };
                // The log keeps what the replica remembers; it executes the rest again.
                let kept = core.low_watermark();
                inst.core = Some(core);
                inst.executor = Executor::new(Chain::default());
                if let Some(log) = self.report.logs.get_mut(r) {
                    let again = log.split_off(log.partition_point(|(seq, ..)| *seq <= kept));
                    self.report
                        .earlier
                        .extend(again.into_iter().map(|(seq, d, _)| (r, seq, d)));
                }
            }
            Event::Tick => {
                for k in 0..self.instances.len() {
                    if let Some(core) = self.instances.get_mut(k).and_then(|i| i.core.as_mut()) {
                        core.handle_tick(self.now);
                        self.report.max_held =
                            self.report.max_held.max(core.held_for_next_window());
                    }
                    self.drain(k);
                }
                self.schedule(self.now + TICK, Event::Tick);
            }
        }
    }

    fn on_reply(&mut self, client: usize, from: usize, number: u64, result: Bytes) {
        let f = self.config.f();
        let Some(c) = self.clients.get_mut(client) else {
            return;
        };
        if c.number != number || self.report.accepted.contains_key(&(client, number)) {
            return;
        }
        let by = c.replies.entry(number).or_default();
        by.insert(from, result.clone());
        let matching = by.values().filter(|r| **r == result).count();
        if matching > f {
            c.replies.remove(&number);
            self.report
                .accepted
                .insert((client, number), (result, self.now));
            self.next_request(client);
        }
    }
}

fn identities(n: usize, signatures: bool) -> Result<(Vec<Signer>, KeyRing, Vec<NodeId>), SimError> {
    if !signatures {
        #[cfg(feature = "insecure-unsigned")]
        {
            let ids: Vec<NodeId> = (0..n)
                .map(|i| NodeId::from_bytes(*blake3::hash(format!("r{i}").as_bytes()).as_bytes()))
                .collect();
            let signers = ids.iter().map(|id| Signer::unsigned(*id)).collect();
            return Ok((signers, KeyRing::unsigned(ids.clone()), ids));
        }
        #[cfg(not(feature = "insecure-unsigned"))]
        return Err(SimError::UnsignedUnavailable);
    }
    // Keys derived from the replica's index: the same ids in every run and process, so that a
    // seed gives the same trace anywhere.
    let signers: Vec<Signer> = (0..n)
        .map(|i| Signer::named(&format!("sim r{i}")))
        .collect();
    let keys = signers
        .iter()
        .filter_map(|s| Some((s.id(), s.public_key()?)))
        .collect::<Vec<_>>();
    let ids = signers.iter().map(Signer::id).collect();
    Ok((signers, KeyRing::new(keys), ids))
}
