//! The async driver: runs a [`Replica`] core on tokio over a [`Network`], with the timers the
//! core asks for, and offers it to the application as an [`Ordering`] ([`Pbft`]).
//!
//! The driver decodes what arrives (within [`Limits`]), checks that the message's sender is
//! the peer the network authenticated, verifies signatures in batches (everything waiting is
//! verified at once), and feeds the core. Everything dropped is counted in
//! `securesmart_consensus_dropped_total{reason}` and logged at debug level; nothing from the
//! network can make it panic.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use securesmart_base::NodeId;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::journal::Journal;
use crate::message::{KeyRing, Limits, Request, Seq, Signed};
use crate::replica::{Ignored, Output, ReconfigureError, Replica};
use crate::service::{Event, Member, Ordering};

/// How consensus reaches the other replicas. The transport implements it (in the root
/// package), and so does the simulator; the sender a message is delivered with must be the
/// authenticated peer.
pub trait Network: Send + 'static {
    /// Sends to one replica, best effort (a full queue drops; the protocol retransmits).
    fn send(&self, to: NodeId, message: Bytes);

    /// Sends to every other replica, best effort.
    fn broadcast(&self, message: Bytes);

    /// The next message and its authenticated sender; `None` when the network is closed.
    fn recv(&mut self) -> impl Future<Output = Option<(NodeId, Bytes)>> + Send;

    /// A message that is already waiting, if any (for batch verification).
    fn try_recv(&mut self) -> Option<(NodeId, Bytes)>;
}

/// Why the engine refused something.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PbftError {
    /// The driver task has stopped.
    #[error("the consensus driver has stopped")]
    Stopped,
    /// The request queue is full.
    #[error("request queue full")]
    Busy,
    /// The reconfiguration was refused.
    #[error(transparent)]
    Reconfigure(#[from] ReconfigureError),
}

enum Control {
    /// The application's snapshot at a checkpoint, or `None`: its state is lost.
    Snapshot(Seq, Option<Bytes>),
    Keys(Vec<Member>),
    Reconfigure(
        Vec<Member>,
        Seq,
        oneshot::Sender<Result<Seq, ReconfigureError>>,
    ),
}

/// The PBFT engine as an [`Ordering`]: a handle to a driver task.
#[derive(Debug)]
pub struct Pbft {
    requests: mpsc::Sender<(Request, Submitted)>,
    low: std::sync::Arc<std::sync::atomic::AtomicU64>,
    control: mpsc::UnboundedSender<Control>,
    events: mpsc::Receiver<Event>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Control")
    }
}

impl Pbft {
    /// Starts a driver task for `replica` over `network`, verifying with `ring`.
    pub fn spawn<N: Network>(
        replica: Replica,
        ring: KeyRing,
        network: N,
        limits: Limits,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        Self::spawn_durable(replica, ring, network, limits, None)
    }

    /// Like [`Pbft::spawn`], writing the core's records to `journal` (write-ahead: a record
    /// for which [`crate::journal::Record::needs_sync`] holds is synced before any later
    /// message goes out or batch reaches the application; see [`crate::journal`]). A journal
    /// that fails stops the driver: a replica that cannot remember its votes must not vote.
    pub fn spawn_durable<N: Network>(
        replica: Replica,
        ring: KeyRing,
        network: N,
        limits: Limits,
        journal: Option<Box<dyn Journal>>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (requests, requests_rx) = mpsc::channel(4096);
        let (control, control_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::channel(1024);
        let low = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = tokio::spawn(
            Driver {
                replica,
                ring,
                network,
                limits,
                start: Instant::now(),
                events: events_tx,
                journal,
                unsynced: false,
                seen_view: (0, true),
                seen_lost: false,
                last_summary: Instant::now(),
                low: std::sync::Arc::clone(&low),
            }
            .run(requests_rx, control_rx),
        );
        (
            Self {
                requests,
                low,
                control,
                events,
            },
            task,
        )
    }
}

/// A cloneable handle that submits requests to a [`Pbft`] engine while the application task
/// owns the engine (for example inside [`crate::service::serve`]).
#[derive(Clone, Debug)]
pub struct Submitter(mpsc::Sender<(Request, Submitted)>);

/// How a request reached the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Submitted {
    /// From a client.
    Client,
    /// From a client, over its authenticated channel
    /// ([`crate::replica::Replica::handle_authenticated_request`]).
    Authenticated,
    /// Made by the node itself: forwarded to the others too.
    Forward,
}

impl Submitter {
    /// Submits a client request.
    ///
    /// # Errors
    /// [`PbftError::Busy`] when the queue is full, [`PbftError::Stopped`] after shutdown.
    pub fn submit(&self, request: Request) -> Result<(), PbftError> {
        self.send(request, Submitted::Client)
    }

    /// Submits a client request that arrived over its client's own authenticated channel,
    /// exactly these bytes: the core checks it with
    /// [`crate::replica::Config::request_check`] only when it proposes it, its timer expires or
    /// it forwards it at once to a leaving primary
    /// ([`crate::replica::Replica::handle_authenticated_request`]).
    ///
    /// # Errors
    /// As [`Submitter::submit`].
    pub fn submit_authenticated(&self, request: Request) -> Result<(), PbftError> {
        self.send(request, Submitted::Authenticated)
    }

    /// Submits a request that reached only this replica (one the node makes itself): it is
    /// forwarded to the other replicas as well, so that whoever is primary orders it.
    ///
    /// # Errors
    /// As [`Submitter::submit`].
    pub fn submit_and_forward(&self, request: Request) -> Result<(), PbftError> {
        self.send(request, Submitted::Forward)
    }

    fn send(&self, request: Request, how: Submitted) -> Result<(), PbftError> {
        self.0.try_send((request, how)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PbftError::Busy,
            mpsc::error::TrySendError::Closed(_) => PbftError::Stopped,
        })
    }
}

impl Pbft {
    /// A handle for submitting requests from other tasks.
    pub fn submitter(&self) -> Submitter {
        Submitter(self.requests.clone())
    }
}

impl Pbft {
    /// The replica's last stable checkpoint (low watermark): a quorum executed at least this
    /// far.
    pub fn low_watermark(&self) -> Seq {
        self.low.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes the keys of `members` known for verification (after a state transfer restored a
    /// group whose members this replica had not heard of).
    ///
    /// # Errors
    /// [`PbftError::Stopped`] after shutdown.
    pub fn add_keys(&self, members: Vec<Member>) -> Result<(), PbftError> {
        self.control
            .send(Control::Keys(members))
            .map_err(|_| PbftError::Stopped)
    }
}

impl Ordering for Pbft {
    type Error = PbftError;

    fn submit(&self, request: Request) -> Result<(), PbftError> {
        self.submitter().submit(request)
    }

    async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    fn snapshot_taken(&self, seq: Seq, snapshot: Bytes) -> Result<(), PbftError> {
        self.control
            .send(Control::Snapshot(seq, Some(snapshot)))
            .map_err(|_| PbftError::Stopped)
    }

    fn state_lost(&self, seq: Seq) -> Result<(), PbftError> {
        self.control
            .send(Control::Snapshot(seq, None))
            .map_err(|_| PbftError::Stopped)
    }

    async fn reconfigure(&self, members: Vec<Member>, executed_at: Seq) -> Result<Seq, PbftError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(Control::Reconfigure(members, executed_at, tx))
            .map_err(|_| PbftError::Stopped)?;
        Ok(rx.await.map_err(|_| PbftError::Stopped)??)
    }
}

struct Driver<N> {
    replica: Replica,
    ring: KeyRing,
    network: N,
    limits: Limits,
    start: Instant,
    events: mpsc::Sender<Event>,
    journal: Option<Box<dyn Journal>>,
    unsynced: bool,
    seen_view: (u64, bool),
    seen_lost: bool,
    last_summary: Instant,
    low: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Messages verified together at most.
const VERIFY_BATCH: usize = 64;

/// Counts and logs a journal failure; returns `false` (the driver stops: a replica that cannot
/// remember its votes must not vote).
fn journal_failed(operation: &'static str, e: &crate::journal::JournalError) -> bool {
    metrics::counter!("securesmart_consensus_journal_errors_total", "operation" => operation)
        .increment(1);
    tracing::error!(operation, error = %e, "journal failed; stopping this replica");
    false
}

fn dropped(reason: &'static str) {
    metrics::counter!("securesmart_consensus_dropped_total", "reason" => reason).increment(1);
}

fn ignored_reason(e: Ignored) -> &'static str {
    match e {
        Ignored::WrongView => "wrong_view",
        Ignored::OutOfWindow => "out_of_window",
        Ignored::NotPrimary => "not_primary",
        Ignored::PrepareFromPrimary => "prepare_from_primary",
        Ignored::Conflicting => "conflicting",
        Ignored::NotMember => "not_member",
        Ignored::Invalid => "invalid",
        Ignored::Stale => "stale",
        Ignored::Busy => "busy",
    }
}

impl<N: Network> Driver<N> {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    async fn run(
        mut self,
        mut requests: mpsc::Receiver<(Request, Submitted)>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        // A recovered core has outputs waiting (restore, re-execution, re-sent votes).
        if !self.flush().await {
            return;
        }
        loop {
            let deadline = self
                .replica
                .next_deadline()
                .map(|d| self.start + d)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                c = control.recv() => match c {
                    Some(Control::Snapshot(seq, Some(snapshot))) => {
                        self.replica.handle_checkpoint_state(seq, snapshot);
                    }
                    Some(Control::Snapshot(seq, None)) => self.replica.handle_state_lost(seq),
                    Some(Control::Keys(members)) => {
                        for m in &members {
                            self.ring.insert(m.id, m.key);
                        }
                    }
                    Some(Control::Reconfigure(members, at, reply)) => {
                        let ids = members.iter().map(|m| m.id).collect();
                        let result = self.replica.reconfigure(ids, at);
                        if result.is_ok() {
                            for m in &members {
                                self.ring.insert(m.id, m.key);
                            }
                        }
                        let _ = reply.send(result);
                    }
                    None => break,
                },
                m = self.network.recv() => match m {
                    Some(first) => self.receive(first),
                    None => break,
                },
                r = requests.recv() => match r {
                    Some((r, how)) => {
                        let now = self.now();
                        let result = match how {
                            Submitted::Forward => self.replica.handle_request_and_forward(r, now),
                            Submitted::Authenticated => self.replica.handle_authenticated_request(r, now),
                            Submitted::Client => self.replica.handle_request(r, now),
                        };
                        if let Err(e) = result {
                            metrics::counter!("securesmart_consensus_requests_refused_total",
                                "reason" => ignored_reason(e)).increment(1);
                        }
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => {
                    let now = self.now();
                    self.replica.handle_tick(now);
                }
            }
            self.watch();
            if !self.flush().await {
                break;
            }
        }
    }

    /// Logs view changes as they start, and the core's state now and then at debug level.
    fn watch(&mut self) {
        let low = self.replica.low_watermark();
        if self.low.swap(low, std::sync::atomic::Ordering::Relaxed) != low {
            metrics::gauge!("securesmart_consensus_stable_seq").set(low as f64);
        }
        let (view, active) = (self.replica.view(), self.replica.is_active());
        if (view, active) != self.seen_view {
            if !active {
                metrics::counter!("securesmart_consensus_view_changes_total").increment(1);
                tracing::info!(view, "changing view");
            }
            self.seen_view = (view, active);
        }
        let lost = self.replica.state_lost();
        if lost != self.seen_lost {
            metrics::gauge!("securesmart_consensus_state_lost").set(f64::from(u8::from(lost)));
            if lost {
                metrics::counter!("securesmart_consensus_state_lost_total").increment(1);
                tracing::warn!(
                    executed = self.replica.executed(),
                    "application state is not the agreed one: fetching it at the next stable checkpoint"
                );
            } else {
                tracing::info!(executed = self.replica.executed(), "agreed state restored");
            }
            self.seen_lost = lost;
        }
        if tracing::enabled!(tracing::Level::DEBUG)
            && self.last_summary.elapsed() >= Duration::from_secs(1)
        {
            self.last_summary = Instant::now();
            tracing::debug!(state = %self.replica.summary(), "consensus core");
        }
    }

    /// Decodes and verifies `first` and whatever else is waiting, then feeds the core.
    fn receive(&mut self, first: (NodeId, Bytes)) {
        let mut decoded = Vec::new();
        let mut next = Some(first);
        while let Some((from, bytes)) = next.take() {
            match Signed::decode(&bytes, &self.limits) {
                // Structure and sender before any signature (nested ones included).
                Ok(s) if s.sender == from => match self.replica.admissible(&s) {
                    Ok(()) => decoded.push(s),
                    Err(e) => {
                        dropped(ignored_reason(e));
                        tracing::debug!(peer = ?from, reason = %e, "consensus message refused before verification");
                    }
                },
                Ok(_) => {
                    dropped("sender_mismatch");
                    tracing::debug!(peer = ?from, "consensus message names another sender");
                }
                Err(e) => {
                    dropped("undecodable");
                    tracing::debug!(peer = ?from, error = %e, "undecodable consensus message");
                }
            }
            if decoded.len() < VERIFY_BATCH {
                next = self.network.try_recv();
            }
        }
        // Timers these messages start count from now, not from the last tick.
        let now = self.now();
        self.replica.advance_clock(now);
        for result in self.ring.verify_batch(decoded) {
            match result {
                Ok(v) => {
                    let (from, kind) = (v.sender(), v.message().context());
                    if let Err(e) = self.replica.handle_message(v) {
                        dropped(ignored_reason(e));
                        tracing::trace!(peer = ?from, kind, reason = %e, "consensus message ignored");
                    }
                }
                Err(e) => {
                    dropped(match e {
                        crate::message::VerifyError::UnknownSender => "unknown_sender",
                        crate::message::VerifyError::WrongDigest => "wrong_digest",
                        _ => "bad_signature",
                    });
                    tracing::debug!(error = %e, "consensus message failed verification");
                }
            }
        }
    }

    /// Makes appended records durable before an output that depends on one of them; `false` if
    /// the journal failed.
    fn sync(&mut self) -> bool {
        if !self.unsynced {
            return true;
        }
        self.unsynced = false;
        match self.journal.as_mut().map(|j| j.sync()) {
            Some(Err(e)) => journal_failed("sync", &e),
            _ => true,
        }
    }

    /// Carries out the core's outputs; `false` once the application has gone (or the journal
    /// failed).
    async fn flush(&mut self) -> bool {
        while let Some(out) = self.replica.poll_output() {
            if let Output::Persist(record) = &out {
                if let Some(journal) = self.journal.as_mut() {
                    if let Err(e) = journal.append(record) {
                        return journal_failed("append", &e);
                    }
                    // Pre-prepares and committed certificates ride on the next sync.
                    self.unsynced |= record.needs_sync();
                }
                continue;
            }
            if !self.sync() {
                return false;
            }
            let event = match out {
                Output::Persist(_) => continue,
                Output::Broadcast(s) => {
                    self.network.broadcast(Bytes::from(s.encode()));
                    continue;
                }
                Output::Send { to, message } => {
                    self.network.send(to, Bytes::from(message.encode()));
                    continue;
                }
                Output::ViewEntered { view, primary } => {
                    metrics::gauge!("securesmart_consensus_view").set(view as f64);
                    tracing::info!(view, primary = ?primary, "entered view");
                    continue;
                }
                Output::Execute { seq, batch, .. } => {
                    metrics::counter!("securesmart_consensus_executed_batches_total").increment(1);
                    metrics::gauge!("securesmart_consensus_executed_seq").set(seq as f64);
                    Event::Ordered { seq, batch }
                }
                Output::CheckpointDue { seq } => Event::SnapshotDue { seq },
                Output::Restore { seq, snapshot } => {
                    tracing::info!(seq, "state transfer: restoring");
                    metrics::gauge!("securesmart_consensus_executed_seq").set(seq as f64);
                    Event::Restore { seq, snapshot }
                }
            };
            if self.events.send(event).await.is_err() {
                return false;
            }
        }
        true
    }
}
