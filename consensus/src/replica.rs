//! The PBFT replica core: a deterministic state machine without I/O, clock or randomness.
//!
//! Inputs are `handle_*` calls (a client request, a verified message, the time); outputs are
//! drained with [`Replica::poll_output`] in the order they were produced, and
//! [`Replica::next_deadline`] says when the core next wants [`Replica::handle_tick`]. The same
//! inputs in the same order give the same outputs, which is what the simulator relies on.
//!
//! # Quorums
//! With n replicas, f = (n - 1) / 3 (at least 1 for n >= 2, so that a group shrunk below four
//! stays safe against one fault; see [`securesmart_base::quorum`]) and a quorum is
//! q = ceil((n + f + 1) / 2)
//! ([`Group::quorum`]): any two quorums share f + 1 replicas. Below, "2f + 1" means q and
//! "2f" means q - 1; they are equal when n = 3f + 1, and differ while members join and leave
//! (n = 5 has f = 1 and q = 4).
//!
//! # Normal case
//! The primary of view `v` is `members[v mod n]`; it batches requests (adaptively: at once
//! when no batch of its own is in flight, else when that one executes or a batch is full; or,
//! with [`Config::propose_when_idle`] off, by size or when the oldest has waited
//! `batch_delay`), assigns the next sequence number inside the watermarks and
//! broadcasts a signed pre-prepare. A backup accepts a pre-prepare from the primary of its
//! current view for a sequence number in `(low, low + window]` unless it accepted another digest
//! for that view and number, and broadcasts a prepare. A slot is *prepared* with the pre-prepare
//! and `2f` matching prepares from distinct backups (kept as a signed prepared certificate); the
//! replica then broadcasts a commit. It is *committed* with `2f + 1` matching commits, and
//! batches are executed strictly in sequence order.
//!
//! # Checkpoints
//! After executing every `checkpoint_interval`-th sequence number the core asks for the
//! application's snapshot ([`Output::CheckpointDue`], [`Replica::handle_checkpoint_state`]),
//! joins it with its own replicated state (the group schedule and the last executed request
//! number per client), and signs the digest of the whole. With `2f + 1` matching checkpoints the
//! checkpoint is stable: its certificate is kept, the low watermark moves up to it, and older
//! slots, checkpoint messages and snapshots are dropped, so memory stays bounded by the window.
//!
//! # View change
//! Every replica holds the client requests it has received and not yet executed (at most
//! `max_pending`), each with its own timer, started when it arrives: nothing else that
//! executes (other requests, empty batches) resets it, so a primary that orders everything but
//! one request is replaced like one that orders nothing (PBFT restarts one timer whenever a
//! batch executes, which lets such a primary censor forever). When a request's timer expires
//! it is sent to the primary (which may never have received it) and its timer starts again.
//! (While the primary's removal is ordered but not in effect yet, `f + 1` backups send it each
//! client request at once, and the next expiry changes views: the clients, which follow the
//! new roster, no longer send to it.)
//! When it expires a second time the replica moves to view `v + 1`: it stops taking part in
//! view `v` and broadcasts
//! a signed view change with its stable checkpoint certificate and, for every slot above it, the
//! prepared certificate of the highest view. A replica that sees `f + 1` view changes for higher
//! views joins the smallest of those (so one faulty replica cannot drag others along). Once it
//! holds `2f + 1` view changes for its new view, the timer runs again with twice the timeout
//! (exponential back-off), so that a view whose primary is faulty is left as well; the back-off
//! resets when a batch executes. In a new view every held request's timer starts again.
//!
//! The new primary, with `2f + 1` view changes, computes the new view's proposals
//! ([`crate::view_change::plan_new_view`]): for every slot between the highest stable checkpoint
//! and the highest prepared slot, the batch of the highest-view prepared certificate, or an empty
//! batch; it broadcasts a new view with the view changes and its signed pre-prepares. Every
//! backup checks the view changes, recomputes the plan, checks the pre-prepares against it, and
//! enters the view by preparing them. Committed batches survive: a committed batch was prepared
//! at `f + 1` correct replicas, and any `2f + 1` view changes include one of them.
//!
//! # State transfer
//! A replica that learns of a stable checkpoint it has not reached (from `2f + 1` checkpoint
//! messages that stay ahead of it for `state_transfer_delay`, at once if they are beyond its
//! window, or from a new view) adopts the certificate and asks for the state. Any replica at
//! that checkpoint or later replies with its certificate, the digests of its snapshot's parts
//! (the snapshot itself when it is one part; [`Config::state_part_bytes`]) and the committed
//! certificates (pre-prepare and `2f + 1` commits) of the batches it executed after it; the
//! lagging replica checks the part digests against the certified digest, fetches the parts
//! from every replica that sent the same digests, checking each ([`crate::transfer`]),
//! restores ([`Output::Restore`]) and executes the certified batches. Replies and parts are
//! rate-limited per requester, and a server keeps a snapshot while a replica fetches it.
//!
//! A replica whose *application* state is not the agreed one, though it executed the same
//! batches, fetches the state the same way: when its host says so at a checkpoint
//! ([`Replica::handle_state_lost`]: the application could not execute a request, e.g. it
//! lacked a key to open it), or when a stable certificate certifies another digest than its own
//! checkpoint. It then sends no checkpoint for its state, restores the certified snapshot even
//! though it executed past it, and executes the committed batches above it again.
//!
//! # Time
//! The core reads no clock: [`Replica::handle_tick`] and [`Replica::advance_clock`] tell it the
//! time. A host advances the clock before handing over messages, since timers that messages
//! start (the view-change back-off) count from the core's notion of now.
//!
//! # At-most-once execution
//! Request numbers grow per client, and a request whose number is at or below the client's
//! last executed one is a duplicate (a retransmission, or a request a faulty primary proposed
//! twice); the primary does not batch it, and execution drops it in sequence order at every
//! replica alike. The table is part of the checkpointed state. The reply cache (the last reply
//! per client, so a retransmission gets its answer again) sits with the application state, in
//! [`crate::service::Executor`].
//!
//! # Reconfiguration
//! [`Replica::reconfigure`], called when a membership command executes at sequence number `s`,
//! changes the group for sequence numbers above `e = s + window`, rounded up to a checkpoint.
//! No correct replica can have touched a slot above `s + window` before executing `s` (its
//! window ends there), so every correct replica judges every slot with the same group. The view
//! change uses the group of the slot after the replica's low watermark, and a new view is judged
//! by the group after *its* stable checkpoint (the highest one among its view changes): a
//! replica that joined, or moved its low watermark past a group change, after the others entered
//! the view accepts the same new view they did (the new primary re-sends it to a replica whose
//! view change comes late). A replica that is not a member yet keeps messages of later views
//! without acting on them; once a member, `f + 1` replicas in a later view take it there.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use securesmart_base::NodeId;

use crate::hold::{Hold, HoldLimits, Refused};
use crate::journal::Record;
use crate::message::{
    Certificate, Digest, Message, Request, Seq, Signed, Signer, Verified, View, batch_digest,
};
use crate::transfer::{Bucket, PIN_DELAYS, PINS_PER_MEMBER, PartRefused, Transfer, part_range};
use crate::view_change::{
    Group, NewViewPlan, Snapshot, part_digest, part_digests, plan_new_view, state_digest_of_parts,
    valid_view_change,
};

/// Configuration of the replica group, identical at every replica.
#[derive(Clone, Debug)]
pub struct Config {
    /// The initial replicas, in the agreed order.
    pub replicas: Vec<NodeId>,
    /// Requests per batch at most.
    pub max_batch: usize,
    /// How long the primary holds a non-full batch.
    pub batch_delay: Duration,
    /// Adaptive batching (on by default): when every batch it proposed has executed, the
    /// primary proposes what it holds at once, and while a batch is in flight it holds
    /// requests until that batch executes or `max_batch` fill one (not `batch_delay`). A lone
    /// client waits for no timer, and under load the batches grow with it. Off: batches are
    /// cut by `max_batch` and `batch_delay` alone.
    pub propose_when_idle: bool,
    /// Sequence numbers accepted above the low watermark (PBFT's L; typically 2K).
    pub window: Seq,
    /// A checkpoint every this many sequence numbers (PBFT's K).
    pub checkpoint_interval: Seq,
    /// The view-change timeout before back-off.
    pub view_change_timeout: Duration,
    /// Client requests a replica holds until they execute; more are refused.
    pub max_pending: usize,
    /// Of those, requests one client may have held at most (its fair share: one client cannot
    /// fill the hold for the others).
    pub max_pending_per_client: usize,
    /// Payload bytes of the requests one client may have held at most.
    pub max_pending_bytes_per_client: usize,
    /// Payload bytes of all held requests at most.
    pub max_pending_bytes: usize,
    /// Bytes of normal-case messages held for a later view, and again for the next window,
    /// per sending replica (each sender's latest view only): what one faulty replica can make another
    /// hold is bounded by this, not by the frame size times the message count.
    pub max_held_bytes: usize,
    /// How long a replica stays behind a stable checkpoint before fetching the state, and how
    /// often it asks again.
    pub state_transfer_delay: Duration,
    /// Snapshots are hashed and transferred in parts of this many bytes (see
    /// [`crate::transfer`]): a state larger than a transport frame is fetched a part at a
    /// time. Part of the state digest, so identical at every replica (a journal written with
    /// another size does not recover); keep it well below the transport's frame size, and
    /// large enough that a snapshot has at most `Limits::max_list` parts (4,096: 4 GiB with
    /// the default 1 MiB).
    pub state_part_bytes: usize,
    /// Emit [`Output::Persist`] records (see [`crate::journal`]); without them a restarted
    /// replica has lost its memory and counts as one of the f faulty ones.
    pub durable: bool,
    /// Which client requests are valid (e.g. carry their client's signature), checked in
    /// batches where it counts (see [`Replica::handle_authenticated_request`]): a request
    /// forwarded by a replica when it arrives; a request that arrived over its client's
    /// authenticated channel when this replica proposes it, or when its timer first expires;
    /// every request of a pre-prepare that this replica does not hold byte for byte, whose
    /// primary is ignored if one fails (so a faulty replica cannot order requests in a
    /// client's name, or use up its request numbers). `None`: every request is. Must give
    /// the same answer at every replica, for one request as within any batch.
    pub request_check: Option<RequestCheck>,
}

/// The verdicts of a [`RequestCheck`] on a batch, one per request in order.
type BatchCheck = dyn Fn(&[&Request]) -> Vec<bool> + Send + Sync;

/// A validity check of client requests ([`Config::request_check`]), of one request or of a
/// batch at once (e.g. one batch signature verification).
#[derive(Clone)]
pub struct RequestCheck(std::sync::Arc<BatchCheck>);

impl RequestCheck {
    /// A check that runs `valid` on each request.
    pub fn new(valid: impl Fn(&Request) -> bool + Send + Sync + 'static) -> Self {
        Self::batched(move |requests| requests.iter().map(|r| valid(r)).collect())
    }

    /// A check of a batch at once: `valid` returns one verdict per request, in order, and
    /// must give each request the verdict it gives it alone (a missing verdict counts as a
    /// refusal).
    pub fn batched(valid: impl Fn(&[&Request]) -> Vec<bool> + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(valid))
    }

    /// Whether `request` is valid.
    pub fn allows(&self, request: &Request) -> bool {
        self.allows_all(&[request]).first() == Some(&true)
    }

    /// Whether each of `requests` is valid, in order.
    pub fn allows_all(&self, requests: &[&Request]) -> Vec<bool> {
        let mut verdicts = (self.0)(requests);
        verdicts.resize(requests.len(), false);
        verdicts
    }
}

impl std::fmt::Debug for RequestCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestCheck")
    }
}

impl Config {
    /// Defaults for a deployment: batches of up to 256 requests or 1 ms, checkpoints every 64
    /// sequence numbers, a window of 128, a 500 ms view-change timeout; at most 100,000 held
    /// requests (1 GiB), 256 (16 MiB) of them from one client; 16 MiB of held messages per
    /// replica and buffer; snapshots in parts of 1 MiB.
    pub fn new(replicas: Vec<NodeId>) -> Self {
        Self {
            replicas,
            max_batch: 256,
            batch_delay: Duration::from_millis(1),
            propose_when_idle: true,
            window: 128,
            checkpoint_interval: 64,
            view_change_timeout: Duration::from_millis(500),
            max_pending: 100_000,
            max_pending_per_client: 256,
            max_pending_bytes_per_client: 16 * 1024 * 1024,
            max_pending_bytes: 1024 * 1024 * 1024,
            max_held_bytes: 16 * 1024 * 1024,
            state_transfer_delay: Duration::from_millis(200),
            state_part_bytes: 1024 * 1024,
            durable: false,
            request_check: None,
        }
    }

    /// Faults tolerated by the initial group ([`securesmart_base::quorum::faults`]).
    pub fn f(&self) -> usize {
        securesmart_base::quorum::faults(self.replicas.len())
    }
}

/// An output of the core, to be carried out by the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// Send to every other replica.
    Broadcast(Signed),
    /// Send to one replica.
    Send {
        /// The recipient.
        to: NodeId,
        /// The message.
        message: Signed,
    },
    /// Execute this batch: it is committed at `seq`, and every lower sequence number was
    /// executed (or restored) before. Requests already executed (same client, request number
    /// at or below the client's last executed one) are left out, identically at every replica;
    /// `digest` is the agreed batch's.
    Execute {
        /// Sequence number.
        seq: Seq,
        /// Batch digest.
        digest: Digest,
        /// The requests, in order.
        batch: Vec<Request>,
    },
    /// `seq` is a checkpoint: after executing it, hand the application's snapshot to
    /// [`Replica::handle_checkpoint_state`].
    CheckpointDue {
        /// Sequence number.
        seq: Seq,
    },
    /// State transfer: replace the application state with this snapshot, taken after `seq`.
    Restore {
        /// Sequence number.
        seq: Seq,
        /// The application's snapshot (as it gave it to `handle_checkpoint_state`).
        snapshot: Bytes,
    },
    /// Write this record to the journal; if it [`Record::needs_sync`], make it durable before
    /// carrying out any later output (only with [`Config::durable`]; see [`crate::journal`]).
    Persist(Record),
    /// The replica entered `view`.
    ViewEntered {
        /// The view.
        view: View,
        /// Its primary.
        primary: NodeId,
    },
}

/// Why an input was ignored. The caller counts these (they are the sender's doing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Ignored {
    /// For an earlier view.
    #[error("wrong view")]
    WrongView,
    /// Outside the watermarks.
    #[error("outside the watermarks")]
    OutOfWindow,
    /// A pre-prepare or new view from a replica that is not the primary.
    #[error("not from the primary")]
    NotPrimary,
    /// A prepare from the primary (the primary does not prepare).
    #[error("prepare from the primary")]
    PrepareFromPrimary,
    /// A second, different pre-prepare for a slot (equivocation).
    #[error("conflicting pre-prepare")]
    Conflicting,
    /// The sender is not in the group for this sequence number.
    #[error("sender not in the group")]
    NotMember,
    /// A malformed certificate, view change, new view or state.
    #[error("invalid certificate")]
    Invalid,
    /// Nothing new (a duplicate, a request already executed, nothing to serve).
    #[error("stale")]
    Stale,
    /// A bounded queue is full.
    #[error("busy")]
    Busy,
}

/// Why [`Replica::recover`] could not use a journal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecoverError {
    /// A record contradicts itself (a damaged journal).
    #[error("damaged journal: {0}")]
    Corrupt(String),
}

/// Why a reconfiguration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReconfigureError {
    /// The command's sequence number has not been executed here.
    #[error("sequence number {0} is not executed")]
    NotExecuted(Seq),
    /// The new group is empty or names a replica twice.
    #[error("the new group is empty or has duplicates")]
    BadGroup,
}

#[derive(Debug, Default)]
struct Slot {
    /// The accepted pre-prepare (its view is the slot's current view).
    pre_prepare: Option<Verified>,
    /// The latest prepare and commit of each sender.
    prepares: BTreeMap<NodeId, Verified>,
    commits: BTreeMap<NodeId, Verified>,
    /// The prepared certificate of the highest view (for view changes).
    prepared: Option<Certificate>,
    commit_sent: Option<View>,
    executed: bool,
}

impl Slot {
    fn proposal(&self) -> Option<(View, Digest)> {
        let m = self.pre_prepare.as_ref()?.message();
        Some((m.view()?, m.digest()?))
    }

    fn batch(&self) -> &[Request] {
        match self.pre_prepare.as_ref().map(Verified::message) {
            Some(Message::PrePrepare { batch, .. }) => batch,
            _ => &[],
        }
    }
}

/// A client request a replica holds until it executes, with its own timer.
#[derive(Debug)]
struct Held {
    /// Arrival number (the order requests arrived in).
    arrival: u64,
    /// When its timer started: when it arrived, or when it was forwarded to the primary.
    since: Duration,
    /// Its first timeout passed and it went to the primary (or it went at once, to a leaving
    /// primary); the next one changes views.
    forwarded: bool,
    /// It passed [`Config::request_check`] here (a request from its client's authenticated
    /// channel is checked only when it is proposed, times out, or goes at once to a leaving
    /// primary).
    checked: bool,
    request: Request,
}

/// How a request reaches [`Replica::take_request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Intake {
    /// Checked now ([`Config::request_check`]).
    Check,
    /// Already checked by the caller.
    Checked,
    /// From its client's authenticated channel: held unchecked (see
    /// [`Replica::handle_authenticated_request`]).
    Vouched,
}

/// When a member was last served state (see [`Replica::may_serve`]).
#[derive(Clone, Copy, Debug, Default)]
struct Served {
    any: Option<Duration>,
    snapshot: Option<Duration>,
    /// Its budget of parts.
    parts: Bucket,
}

/// Why a server keeps a snapshot for a member (see `Replica::pin`).
#[derive(Clone, Copy, Debug)]
enum Pin {
    /// A state reply named it.
    Told = 0,
    /// The member fetched a part of it.
    Fetched = 1,
}

/// One of this replica's own snapshots: its state digest, bytes and part digests.
#[derive(Clone, Debug)]
struct OwnSnapshot {
    digest: Digest,
    bytes: Bytes,
    parts: Vec<Digest>,
}

impl OwnSnapshot {
    fn new(seq: Seq, bytes: Bytes, part_bytes: usize) -> Self {
        let parts = part_digests(&bytes, part_bytes);
        Self {
            digest: state_digest_of_parts(seq, &parts),
            bytes,
            parts,
        }
    }
}

/// A member gets a state reply with a snapshot at most once per this many
/// `state_transfer_delay`s (and any state reply at most once per one).
const SNAPSHOT_SERVE_DELAYS: u32 = 4;

/// Votes in `votes` that match `(view, digest)`.
fn matching(
    votes: &BTreeMap<NodeId, Verified>,
    view: View,
    digest: Digest,
) -> impl Iterator<Item = &Verified> {
    votes
        .values()
        .filter(move |v| v.message().view() == Some(view) && v.message().digest() == Some(digest))
}

type CoreState = (BTreeMap<Seq, Vec<NodeId>>, BTreeMap<NodeId, u64>);

/// How many group changes a replica remembers (to judge older certificates).
const GROUPS_KEPT: usize = 16;

/// Batches of held requests a backup forwards to a new primary at most.
const FORWARD_BATCHES: usize = 4;

/// Certificates in a state reply may name up to this many replicas even if the receiver
/// knows a smaller group (it joined, and the group grew since).
const STATE_GROUP_BOUND: usize = 16;

/// How many of its own past view changes a replica keeps for retransmission.
const OWN_VIEW_CHANGES_KEPT: usize = 4;

/// One replica's protocol state (see the module doc).
#[derive(Debug)]
pub struct Replica {
    config: Config,
    /// The group for sequence numbers above each key.
    groups: BTreeMap<Seq, Vec<NodeId>>,
    signer: Signer,
    view: View,
    /// Whether the replica takes part in `view` (false while changing views).
    active: bool,
    low: Seq,
    next_seq: Seq,
    executed: Seq,
    now: Duration,
    /// Requests received and not executed.
    waiting: BTreeMap<(NodeId, u64), Held>,
    arrivals: u64,
    /// Every held request's timer: (started, arrival number, client, request number).
    timers: BTreeSet<(Duration, u64, NodeId, u64)>,
    /// No request timer counts from before this: when the view was entered, or when this
    /// replica last asked for batches it missed.
    timer_floor: Duration,
    /// The primary's requests not yet proposed, in arrival order.
    /// Held requests to propose, with their arrival numbers (an entry whose held copy gave way
    /// to another is stale and skipped).
    queue: VecDeque<((NodeId, u64), u64)>,
    oldest_queued: Option<Duration>,
    slots: BTreeMap<Seq, Slot>,
    /// Checkpoint messages above the low watermark, by sequence number and sender.
    checkpoints: BTreeMap<Seq, BTreeMap<NodeId, Verified>>,
    /// The certificate (2f+1 matching checkpoints) of the last stable checkpoint.
    stable: Vec<Verified>,
    stable_digest: Option<Digest>,
    /// This replica's own snapshots at checkpoints at or above the low watermark, and older
    /// ones that a replica is fetching (see `pins`).
    snapshots: BTreeMap<Seq, OwnSnapshot>,
    /// Per member, the checkpoint whose snapshot it was last told of (in a state reply) and
    /// the one it last fetched a part of, with when: kept [`PIN_DELAYS`] periods after that.
    pins: BTreeMap<NodeId, [Option<(Seq, Duration)>; PINS_PER_MEMBER]>,
    /// The state this replica fetches in parts.
    transfer: Option<Transfer>,
    /// Parts of the last transfer that gave way, by digest, for the next one.
    held_parts: BTreeMap<Digest, Bytes>,
    /// The core's replicated state at checkpoints whose application snapshot is pending.
    core_at: BTreeMap<Seq, CoreState>,
    /// Messages up to one window beyond the current one, replayed when the window moves.
    future: Hold,
    /// Messages for a later view (or for this one while entering it), replayed on entry.
    ahead: Hold,
    /// Held requests and their payload bytes, per client.
    pending_by_client: BTreeMap<NodeId, (usize, usize)>,
    /// Payload bytes of all held requests.
    pending_bytes: usize,
    /// The highest request number executed per client (replicated state).
    last_executed: BTreeMap<NodeId, u64>,
    vc_deadline: Option<Duration>,
    /// While changing views: whether 2f+1 replicas are changing to this view (the deadline
    /// then moves on to the next view; before, it only re-sends this replica's view change).
    vc_escalate: bool,
    /// The view-change timer found this replica missing batches the group committed, and it
    /// asked for them; reset when a batch executes or the view changes.
    gap_asked: bool,
    backoff: u32,
    /// The new view this replica started as primary (re-sent to replicas that missed it).
    new_view: Option<Signed>,
    /// This replica's own view changes for its last few views, re-sent to a replica still
    /// collecting view changes for one of them.
    own_view_changes: BTreeMap<View, Signed>,
    /// When this replica last re-sent a past view change to each member (rate limit).
    answered: BTreeMap<NodeId, Duration>,
    /// View changes for this view and later ones, by view and sender (at most
    /// `OWN_VIEW_CHANGES_KEPT` views per sender).
    view_changes: BTreeMap<View, BTreeMap<NodeId, Verified>>,
    behind_since: Option<Duration>,
    /// State transfer in progress: the checkpoint wanted and when it was last asked for.
    fetching: Option<(Seq, Duration)>,
    /// The application's state is not the agreed one (it could not execute something, or its
    /// checkpoint differed from the certified one): fetch the state at the next stable
    /// checkpoint even if executed past it.
    lost: bool,
    /// When each member was last sent a state reply, and one with a snapshot.
    served: BTreeMap<NodeId, Served>,
    /// The last state reply signed: (low watermark, first batch, last batch, with a
    /// snapshot) and the message, sent again as it is while those have not moved.
    state_reply: Option<((Seq, Seq, Seq, bool), Signed)>,
    /// The stable checkpoint last written to the journal.
    persisted_stable: Seq,
    /// The view this replica sends new pre-prepares and prepares in: the one whose
    /// `EnteredView` record it wrote in this run (view 0 for a replica that never ran). A
    /// replica recovered from a journal that may have lost records has none until it enters a
    /// view: it may have voted in its last view for slots whose records the crashed machine
    /// lost (see [`Replica::recover`]).
    voting_view: Option<View>,
    outputs: VecDeque<Output>,
}

impl Replica {
    /// A replica in view 0 with nothing executed.
    pub fn new(config: Config, signer: Signer) -> Self {
        let groups = BTreeMap::from([(0, config.replicas.clone())]);
        Self {
            config,
            groups,
            signer,
            view: 0,
            active: true,
            low: 0,
            next_seq: 0,
            executed: 0,
            now: Duration::ZERO,
            waiting: BTreeMap::new(),
            arrivals: 0,
            timers: BTreeSet::new(),
            timer_floor: Duration::ZERO,
            queue: VecDeque::new(),
            oldest_queued: None,
            slots: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            stable: Vec::new(),
            stable_digest: None,
            snapshots: BTreeMap::new(),
            pins: BTreeMap::new(),
            transfer: None,
            held_parts: BTreeMap::new(),
            core_at: BTreeMap::new(),
            future: Hold::default(),
            ahead: Hold::default(),
            pending_by_client: BTreeMap::new(),
            pending_bytes: 0,
            last_executed: BTreeMap::new(),
            vc_deadline: None,
            vc_escalate: false,
            gap_asked: false,
            backoff: 0,
            new_view: None,
            own_view_changes: BTreeMap::new(),
            answered: BTreeMap::new(),
            view_changes: BTreeMap::new(),
            behind_since: None,
            fetching: None,
            lost: false,
            served: BTreeMap::new(),
            state_reply: None,
            persisted_stable: 0,
            voting_view: Some(0),
            outputs: VecDeque::new(),
        }
    }

    /// A replica rebuilt from its journal (see [`crate::journal`]) after a crash: the last
    /// stable checkpoint (restored through [`Output::Restore`]), the committed batches after it
    /// (executed again through [`Output::Execute`]), the slots it accepted and prepared, and its
    /// view. It resumes where it stopped: in its view it re-sends its votes (the same ones: it
    /// never votes for two batches in one slot and view), and if it was changing views it
    /// changes views again.
    ///
    /// Records that do not [`Record::needs_sync`] may have been lost with a crashed machine,
    /// and with them votes it sent (see [`crate::journal`]). So in the last view it entered
    /// (view 0 if none) it sends no new pre-prepare or prepare: it still re-sends the votes
    /// its pre-prepare records show, commits what the others prepared, executes, and changes
    /// views with them; it votes again in the next view it enters. Call it for every journal
    /// that existed before, even one with no records; [`Replica::recover_intact`] for one
    /// known to have lost nothing; a replica that never ran starts with [`Replica::new`].
    ///
    /// # Errors
    /// [`RecoverError`] when a checkpoint's snapshot does not match its certificate or does not
    /// decode (the journal is damaged; the caller may start empty and fetch the state, as a
    /// replica that forgot its votes: one of the f faulty ones until the cluster left its
    /// views).
    pub fn recover(
        config: Config,
        signer: Signer,
        records: impl IntoIterator<Item = Record>,
    ) -> Result<Self, RecoverError> {
        Self::rebuild(config, signer, records, false)
    }

    /// [`Replica::recover`] from a journal that lost nothing (the process stopped, the machine
    /// did not: [`crate::journal::FileJournal::intact`]): it votes on in the view it was in
    /// (if it was changing views, from the view it enters next).
    ///
    /// # Errors
    /// As [`Replica::recover`].
    pub fn recover_intact(
        config: Config,
        signer: Signer,
        records: impl IntoIterator<Item = Record>,
    ) -> Result<Self, RecoverError> {
        Self::rebuild(config, signer, records, true)
    }

    fn rebuild(
        config: Config,
        signer: Signer,
        records: impl IntoIterator<Item = Record>,
        intact: bool,
    ) -> Result<Self, RecoverError> {
        let mut r = Self::new(config, signer);
        let mut restore = None;
        // The votes the records show: a pre-prepare record precedes every prepare (and, at a
        // primary, every pre-prepare) the replica sent.
        let mut voted: BTreeMap<Seq, (View, Digest)> = BTreeMap::new();
        for record in records {
            match record {
                Record::ViewChange(v) if v >= r.view => {
                    r.view = v;
                    r.active = false;
                }
                Record::EnteredView(v) if v >= r.view => {
                    r.view = v;
                    r.active = true;
                }
                Record::ViewChange(_) | Record::EnteredView(_) => {}
                Record::Stable {
                    checkpoint,
                    snapshot,
                } => {
                    let Some(&Message::Checkpoint { seq, state }) =
                        checkpoint.first().map(|s| &s.message)
                    else {
                        return Err(RecoverError::Corrupt("checkpoint without a message".into()));
                    };
                    let own = OwnSnapshot::new(seq, snapshot, r.config.state_part_bytes);
                    if own.digest != state {
                        return Err(RecoverError::Corrupt(format!(
                            "snapshot at {seq} does not match its certificate"
                        )));
                    }
                    let restored = Snapshot::decode(&own.bytes)
                        .map_err(|e| RecoverError::Corrupt(format!("snapshot at {seq}: {e}")))?;
                    if seq <= r.low {
                        continue;
                    }
                    r.executed = seq;
                    r.low = seq;
                    r.next_seq = r.next_seq.max(seq);
                    r.last_executed = restored.last_executed;
                    r.groups = restored.groups;
                    r.snapshots = BTreeMap::from([(seq, own)]);
                    r.stable = checkpoint.into_iter().map(Verified::trusted).collect();
                    r.stable_digest = Some(state);
                    r.persisted_stable = seq;
                    r.slots.retain(|s, _| *s > seq);
                    restore = Some((seq, restored.app));
                }
                Record::PrePrepare(pp) => {
                    if let (Some(seq), Some(view), Some(digest)) =
                        (pp.message.seq(), pp.message.view(), pp.message.digest())
                    {
                        voted.insert(seq, (view, digest));
                    }
                    r.recover_proposal(pp);
                }
                Record::Prepared(cert) => {
                    if let Some(slot) = r.recover_proposal(cert.proposal.clone()) {
                        for vote in &cert.votes {
                            slot.prepares
                                .insert(vote.sender, Verified::trusted(vote.clone()));
                        }
                        slot.prepared = Some(cert);
                    }
                }
                Record::Committed(cert) => {
                    if let Some(slot) = r.recover_proposal(cert.proposal) {
                        for vote in cert.votes {
                            slot.commits.insert(vote.sender, Verified::trusted(vote));
                        }
                    }
                }
            }
        }
        let view = r.view;
        // Active in a view: its entry is the latest view record (or it is view 0).
        r.voting_view = (intact && r.active).then_some(view);
        // The primary of this view proposed up to the highest slot it holds for the view.
        r.next_seq = r
            .slots
            .iter()
            .filter(|(_, slot)| slot.proposal().is_some_and(|(v, _)| v == view))
            .map(|(s, _)| *s)
            .fold(r.low.max(r.next_seq), Seq::max);
        if let Some((seq, snapshot)) = restore {
            r.outputs.push_back(Output::Restore { seq, snapshot });
        }
        r.execute_ready();
        if !r.active {
            r.start_view_change(view);
            return Ok(r);
        }
        let (me, primary) = (r.id(), r.primary());
        // Only the votes it sent: a slot it holds from a prepared or committed certificate
        // alone was prepared by the others.
        let slots: Vec<(Seq, Digest, Signed)> = r
            .slots
            .iter()
            .filter_map(|(s, slot)| {
                let (v, d) = slot.proposal()?;
                let pp = slot.pre_prepare.as_ref()?.signed().clone();
                (v == view && voted.get(s) == Some(&(v, d))).then_some((*s, d, pp))
            })
            .collect();
        for (seq, digest, pp) in slots {
            if primary == Some(me) {
                r.outputs.push_back(Output::Broadcast(pp));
            } else {
                let own = r.broadcast(Message::Prepare { view, seq, digest });
                r.slots.entry(seq).or_default().prepares.insert(me, own);
            }
            r.advance(seq);
        }
        Ok(r)
    }

    /// Recovery: makes `pp` the slot's proposal unless the slot holds one of a later view.
    fn recover_proposal(&mut self, pp: Signed) -> Option<&mut Slot> {
        let (seq, view) = (pp.message.seq()?, pp.message.view()?);
        if seq <= self.low {
            return None;
        }
        let slot = self.slots.entry(seq).or_default();
        if slot.proposal().is_none_or(|(v, _)| v <= view) {
            slot.pre_prepare = Some(Verified::trusted(pp));
            Some(slot)
        } else {
            None
        }
    }

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.signer.id()
    }

    /// The current view.
    pub fn view(&self) -> View {
        self.view
    }

    /// Whether the replica takes part in its current view (false during a view change).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The highest sequence number executed (or restored).
    pub fn executed(&self) -> Seq {
        self.executed
    }

    /// The low watermark: the last stable checkpoint.
    pub fn low_watermark(&self) -> Seq {
        self.low
    }

    /// Whether a state transfer is in progress.
    pub fn is_fetching(&self) -> bool {
        self.fetching.is_some()
    }

    /// The certificate of the last stable checkpoint (2f+1 signed, matching checkpoints), which
    /// proves the state at the low watermark to third parties.
    pub fn stable_certificate(&self) -> &[Verified] {
        &self.stable
    }

    /// Log slots held (bounded by the window once checkpoints are stable).
    pub fn slots_held(&self) -> usize {
        self.slots.len()
    }

    /// Messages held for the next window or a later view.
    pub fn held_for_next_window(&self) -> usize {
        self.future.len() + self.ahead.len()
    }

    /// A one-line summary of the protocol state, for diagnosing a failed simulation.
    pub fn summary(&self) -> String {
        let vcs: Vec<(View, Vec<usize>)> = self
            .view_changes
            .iter()
            .map(|(view, by)| {
                let who = by
                    .keys()
                    .filter_map(|id| self.config.replicas.iter().position(|r| r == id))
                    .collect();
                (*view, who)
            })
            .collect();
        format!(
            "view {}{} exec {} low {} next {} pending {} vc_deadline {:?} escalate {} backoff {} \
             fetching {:?} view changes {:?}",
            self.view,
            if self.active { "" } else { " (changing)" },
            self.executed,
            self.low,
            self.next_seq,
            self.waiting.len(),
            self.vc_deadline,
            self.vc_escalate,
            self.backoff,
            self.fetching,
            vcs
        )
    }

    /// Client requests held until they execute.
    pub fn pending_requests(&self) -> usize {
        self.waiting.len()
    }

    /// The group that judges sequence number `seq`.
    pub fn group_at(&self, seq: Seq) -> Group {
        let members = self
            .groups
            .range(..seq.max(1))
            .next_back()
            .or_else(|| self.groups.iter().next())
            .map(|(_, m)| m.clone())
            .unwrap_or_default();
        Group { members }
    }

    /// The group that runs view changes (the one after the low watermark).
    pub fn group(&self) -> Group {
        self.group_at(self.low + 1)
    }

    /// The primary of the current view.
    pub fn primary(&self) -> Option<NodeId> {
        self.group().primary(self.view)
    }

    fn is_primary(&self) -> bool {
        self.primary() == Some(self.id())
    }

    /// Whether this replica sends the primary each client request as it arrives: the primary
    /// of the current view leaves the group in a change already ordered (the newest group
    /// lacks it) and still owns the next slot to execute here, and this replica is one of the
    /// `f + 1` backups after it in the group's order that stay in the newest group (the
    /// clients, which follow the new roster, send to those; one of them is correct, and all
    /// `n - 1` would send it `n - 1` copies of each request).
    fn forwards_eagerly(&self) -> bool {
        let (Some(primary), Some((_, newest))) = (self.primary(), self.groups.last_key_value())
        else {
            return false;
        };
        if newest.contains(&primary)
            || self.group_at(self.executed + 1).primary(self.view) != Some(primary)
        {
            return false;
        }
        let group = self.group();
        let n = group.members.len();
        let Some(p) = group.members.iter().position(|m| *m == primary) else {
            return false;
        };
        let me = self.id();
        group
            .members
            .iter()
            .cycle()
            .skip(p + 1)
            .take(n.saturating_sub(1))
            .filter(|m| newest.contains(m))
            .take(group.f() + 1)
            .any(|m| *m == me)
    }

    /// Whether this replica is in the group that runs view changes. A replica that has not
    /// joined yet (or has left) follows the log but starts no view changes.
    fn is_member(&self) -> bool {
        self.group().contains(&self.id())
    }

    fn in_window(&self, seq: Seq) -> bool {
        seq > self.low && seq <= self.low.saturating_add(self.config.window)
    }

    fn timeout(&self) -> Duration {
        self.config
            .view_change_timeout
            .saturating_mul(1 << self.backoff.min(16))
    }

    /// The next output, in production order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When the core next needs [`Replica::handle_tick`] (`None`: only on new input).
    pub fn next_deadline(&self) -> Option<Duration> {
        let batch = self
            .oldest_queued
            .filter(|_| self.active && self.is_primary())
            .map(|t| t + self.hold_delay());
        let fetch = self
            .fetching
            .map(|(_, asked)| asked + self.config.state_transfer_delay);
        let behind = self
            .behind_since
            .map(|t| t + self.config.state_transfer_delay);
        // (Only a member acts on its request timers: a joiner's would never be served.)
        let view_change = if !self.active {
            self.vc_deadline
        } else if self.is_member() {
            self.request_deadline()
        } else {
            None
        };
        [batch, view_change, fetch, behind]
            .into_iter()
            .flatten()
            .min()
    }

    /// Signs `message`, queues it for every other replica, and returns it as verified.
    fn broadcast(&mut self, message: Message) -> Verified {
        let signed = self.signer.sign(message);
        self.outputs.push_back(Output::Broadcast(signed.clone()));
        Verified::trusted(signed)
    }

    /// Whether this replica may send new pre-prepares and prepares in `view`: only in the view
    /// whose entry it journaled in this run (see [`Replica::recover`]).
    fn may_vote(&self, view: View) -> bool {
        self.voting_view == Some(view)
    }

    /// Journals that this replica entered `view`, and votes there from now on.
    fn record_entered(&mut self, view: View) {
        self.persist(|| Record::EnteredView(view));
        self.voting_view = Some(view);
    }

    /// Emits a journal record (durable replicas only); `record` is built only then.
    fn persist(&mut self, record: impl FnOnce() -> Record) {
        if self.config.durable {
            self.outputs.push_back(Output::Persist(record()));
        }
    }

    /// Journals the stable checkpoint once this replica holds its snapshot.
    fn persist_stable(&mut self) {
        if !self.config.durable || self.persisted_stable >= self.low {
            return;
        }
        let Some(own) = self.snapshots.get(&self.low) else {
            return;
        };
        if Some(own.digest) != self.stable_digest {
            return;
        }
        let record = Record::Stable {
            checkpoint: self.stable.iter().map(|v| v.signed().clone()).collect(),
            snapshot: own.bytes.clone(),
        };
        self.persisted_stable = self.low;
        self.outputs.push_back(Output::Persist(record));
    }

    /// Like [`Replica::handle_request`], and sends the request to every other replica as well
    /// (for a request that reaches only this replica, such as one the node submits itself).
    ///
    /// # Errors
    /// As [`Replica::handle_request`]; nothing is sent then.
    pub fn handle_request_and_forward(
        &mut self,
        request: Request,
        now: Duration,
    ) -> Result<(), Ignored> {
        self.handle_request(request.clone(), now)?;
        self.broadcast(Message::Forward {
            requests: vec![request],
        });
        Ok(())
    }

    /// A backup that enters a view sends the new primary the requests it holds (in arrival
    /// order, at most a few batches), so that a primary which never received them (its clients'
    /// connections were down, it restarted) can order them instead of timing out.
    fn forward_held(&mut self, primary: NodeId) {
        let max = self.config.max_batch.max(1);
        // What goes out is checked first (one batch): the new primary is not sent junk.
        let mut first: Vec<(u64, (NodeId, u64))> =
            self.waiting.iter().map(|(k, h)| (h.arrival, *k)).collect();
        first.sort_unstable();
        let keys: Vec<(NodeId, u64)> = first
            .into_iter()
            .take(max.saturating_mul(FORWARD_BATCHES))
            .map(|(_, k)| k)
            .collect();
        self.check_held(&keys);
        // (`keys` are in arrival order.)
        let requests: Vec<Request> = keys
            .iter()
            .filter_map(|k| self.waiting.get(k).map(|h| h.request.clone()))
            .collect();
        self.forward_to(primary, &requests);
    }

    /// Sends `requests` to `primary` in signed forwards of at most `max_batch` each.
    fn forward_to(&mut self, primary: NodeId, requests: &[Request]) {
        for chunk in requests.chunks(self.config.max_batch.max(1)) {
            let message = self.signer.sign(Message::Forward {
                requests: chunk.to_vec(),
            });
            self.outputs.push_back(Output::Send {
                to: primary,
                message,
            });
        }
    }

    /// A client request reached this replica at `now`. Every replica holds it until it
    /// executes (the view-change timer watches it); the primary batches it.
    ///
    /// # Errors
    /// [`Ignored::Stale`] for a request already executed or held, [`Ignored::Busy`] when
    /// `max_pending` requests are held, [`Ignored::Invalid`] for one the
    /// [`Config::request_check`] refuses.
    pub fn handle_request(&mut self, request: Request, now: Duration) -> Result<(), Ignored> {
        self.take_request(request, now, false, Intake::Check)
    }

    /// [`Replica::handle_request`] for a request that arrived over its client's own
    /// authenticated channel (mutual TLS: the channel proves that the client sent exactly
    /// these bytes). It is held without [`Config::request_check`]; the check runs, in a batch,
    /// only where no channel vouches for it to the others or where a refusal saves work: when
    /// this replica proposes it as primary (so a correct primary proposes only requests that
    /// every correct replica accepts, whether it holds them or checks them), when it goes at
    /// once to a leaving primary, and when its timer first expires (so a request that fails is
    /// dropped instead of being forwarded or changing views). A backup that holds it byte for
    /// byte prepares it without a check.
    ///
    /// # Errors
    /// As [`Replica::handle_request`], but never [`Ignored::Invalid`].
    pub fn handle_authenticated_request(
        &mut self,
        request: Request,
        now: Duration,
    ) -> Result<(), Ignored> {
        self.take_request(request, now, false, Intake::Vouched)
    }

    /// [`Replica::handle_request`] for a request from a client (`forwarded` false) or
    /// forwarded by another replica. A forwarded one may take twice the client's share: a
    /// client that keeps its share full at the primary must not make the primary refuse the
    /// request a backup's timer forwards to it, and so make that backup change views alone.
    fn take_request(
        &mut self,
        request: Request,
        now: Duration,
        forwarded: bool,
        intake: Intake,
    ) -> Result<(), Ignored> {
        self.now = self.now.max(now);
        // Under pressure (the hold half full) a request from a channel is checked on arrival:
        // requests that fail the check, which would sit unchecked until they time out, cannot
        // keep the hold full for others.
        let intake = if intake == Intake::Vouched
            && (self.waiting.len() >= self.config.max_pending.div_ceil(2)
                || self.pending_bytes >= self.config.max_pending_bytes.div_ceil(2))
        {
            Intake::Check
        } else {
            intake
        };
        // A primary whose removal is ordered but not in effect yet still orders, but the
        // clients that follow the new roster no longer send to it: f + 1 backups forward their
        // requests at once (checked first, as when a timer forwards them), or each would wait
        // for its timer. The next expiry of that timer changes views.
        let eager = !forwarded && self.active && self.forwards_eagerly();
        let intake = if eager { Intake::Check } else { intake };
        self.request_admissible(&request, forwarded, intake)?;
        if intake == Intake::Check && !self.request_valid(&request) {
            return Err(Ignored::Invalid);
        }
        let key = (request.client, request.number);
        let bytes = request.payload.len();
        let (count, client_bytes) = self.held_of(&request.client);
        self.pending_by_client
            .insert(request.client, (count + 1, client_bytes + bytes));
        self.pending_bytes += bytes;
        self.arrivals += 1;
        self.timers
            .insert((self.now, self.arrivals, request.client, request.number));
        if eager && let Some(primary) = self.primary() {
            metrics::counter!("securesmart_consensus_eager_forwards_total").increment(1);
            self.forward_to(primary, std::slice::from_ref(&request));
        }
        self.waiting.insert(
            key,
            Held {
                arrival: self.arrivals,
                since: self.now,
                forwarded: eager,
                checked: intake != Intake::Vouched,
                request,
            },
        );
        if self.active && self.is_primary() {
            self.queue.push_back((key, self.arrivals));
            self.oldest_queued.get_or_insert(self.now);
            // Adaptive batching: with nothing in flight a request goes out at once (a lone
            // client waits for no timer); under load batches fill while earlier ones are
            // ordered, up to `max_batch` or `batch_delay`.
            let idle = self.config.propose_when_idle && self.pipeline_idle();
            if idle || self.queue.len() >= self.config.max_batch {
                self.propose(idle);
            }
        }
        Ok(())
    }

    /// Whether every sequence number this primary proposed has executed here. (One batch in
    /// flight measured best on two cores: two in flight made more, smaller batches and cost
    /// 10 to 25 % under load.)
    fn pipeline_idle(&self) -> bool {
        self.next_seq <= self.executed
    }

    /// How long queued requests wait before they go out as a batch: `batch_delay`, or with
    /// adaptive batching while a batch is in flight, until it executes (the fewer, larger
    /// batches cost fewer signatures per request) but at most a quarter of the view-change
    /// timeout (a primary whose batch does not execute here, a lost commit say, goes on
    /// ordering instead of holding until the backups change views).
    fn hold_delay(&self) -> Duration {
        if !self.config.propose_when_idle || self.pipeline_idle() {
            self.config.batch_delay
        } else {
            (self.config.view_change_timeout / 4).max(self.config.batch_delay)
        }
    }

    /// Whether this replica holds `request` as it is (it was checked when it arrived).
    fn holds(&self, request: &Request) -> bool {
        self.waiting
            .get(&(request.client, request.number))
            .is_some_and(|held| held.request.payload == request.payload)
    }

    fn request_valid(&self, request: &Request) -> bool {
        self.requests_valid(&[request]).first() == Some(&true)
    }

    /// [`Config::request_check`] on `requests` at once, one verdict each.
    fn requests_valid(&self, requests: &[&Request]) -> Vec<bool> {
        match &self.config.request_check {
            Some(check) if !requests.is_empty() => check.allows_all(requests),
            _ => vec![true; requests.len()],
        }
    }

    /// Checks the held requests of `keys` that were not checked here yet, in one batch:
    /// those that fail are dropped (and counted), the rest marked checked. Returns how many
    /// failed.
    fn check_held(&mut self, keys: &[(NodeId, u64)]) -> usize {
        let unchecked: Vec<(NodeId, u64)> = keys
            .iter()
            .filter(|k| self.waiting.get(k).is_some_and(|h| !h.checked))
            .copied()
            .collect();
        if unchecked.is_empty() {
            return 0;
        }
        let verdicts = {
            let requests: Vec<&Request> = unchecked
                .iter()
                .filter_map(|k| self.waiting.get(k).map(|h| &h.request))
                .collect();
            self.requests_valid(&requests)
        };
        let mut failed = 0;
        for (key, ok) in unchecked.into_iter().zip(verdicts) {
            if ok {
                if let Some(held) = self.waiting.get_mut(&key) {
                    held.checked = true;
                }
            } else {
                self.unhold(key);
                failed += 1;
            }
        }
        if failed > 0 {
            metrics::counter!("securesmart_consensus_requests_refused_total", "reason" => "invalid_held")
                .increment(failed as u64);
            tracing::debug!(
                failed,
                "held requests failed the request check and were dropped"
            );
        }
        failed
    }

    /// Whether a quorum committed, in the current view, a slot above the next one this replica
    /// can execute: the group makes progress that this replica missed part of.
    fn missed_a_proposal(&self) -> bool {
        let group = self.group();
        let next = self.executed + 1;
        let stuck = self
            .slots
            .get(&next)
            .is_none_or(|slot| slot.pre_prepare.is_none());
        stuck
            && self.slots.range(next..).any(|(_, slot)| {
                let mut by_digest: BTreeMap<Digest, usize> = BTreeMap::new();
                for (sender, v) in &slot.commits {
                    if v.message().view() == Some(self.view)
                        && group.contains(sender)
                        && let Some(d) = v.message().digest()
                    {
                        *by_digest.entry(d).or_default() += 1;
                    }
                }
                by_digest.values().any(|n| *n >= group.quorum())
            })
    }

    /// The current time, without acting on expired timers: timers that the next messages
    /// start count from here. A host calls it before [`Replica::handle_message`] when time may
    /// have passed since its last tick (a timer started from a stale clock expires early).
    pub fn advance_clock(&mut self, now: Duration) {
        self.now = self.now.max(now);
    }

    /// Time passed: flush a batch that waited `batch_delay`, change views when the timer
    /// expires, and ask for state again when a state transfer is overdue.
    pub fn handle_tick(&mut self, now: Duration) {
        self.now = self.now.max(now);
        let now = self.now;
        if self.active
            && self.is_primary()
            && let Some(since) = self.oldest_queued
            && now.saturating_sub(since) >= self.hold_delay()
        {
            self.propose(true);
        }
        if self.active && self.is_member() {
            self.request_timeouts(now);
        } else if let Some(deadline) = self.vc_deadline
            && now >= deadline
            && self.is_member()
        {
            if self.vc_escalate {
                self.backoff = self.backoff.saturating_add(1);
                self.start_view_change(self.view + 1);
            } else if let Some(own) = self.own_view_changes.get(&self.view) {
                // Not enough replicas have joined yet: our view change may have been lost. Or
                // the others carry on in the old view without us: ask for what they committed
                // meanwhile, so that this replica at least keeps executing.
                let own = own.clone();
                self.outputs.push_back(Output::Broadcast(own));
                let next = self.executed + 1;
                self.broadcast(Message::FetchState { seq: next });
                self.vc_deadline = Some(now + self.timeout());
            }
        }
        self.advance_transfer();
        let delay = self.config.state_transfer_delay;
        if let Some((seq, asked)) = self.fetching {
            if now.saturating_sub(asked) >= delay {
                self.fetching = Some((seq, now));
                self.broadcast(Message::FetchState { seq });
            }
        } else if let Some(since) = self.behind_since
            && now.saturating_sub(since) >= delay
        {
            self.behind_since = None;
            let ahead = self
                .checkpoints
                .range(self.executed + 1..)
                .rev()
                .find_map(|(seq, _)| self.quorum_checkpoint(*seq).map(|c| (*seq, c)));
            if let Some((seq, (digest, cert))) = ahead {
                self.stabilize(seq, cert, digest);
            }
        }
    }

    /// When the oldest held request's timer expires (see [`Replica::request_timeouts`]).
    fn request_deadline(&self) -> Option<Duration> {
        self.timers
            .first()
            .map(|(since, ..)| (*since).max(self.timer_floor) + self.timeout())
    }

    /// PBFT's view-change timer, one per request, so that no other traffic resets it: a
    /// request held for a timeout goes to the primary (it may never have received it); one
    /// held for another timeout after that changes views, whatever else executed meanwhile.
    /// A primary that keeps ordering other requests, or empty batches, is replaced all the
    /// same.
    fn request_timeouts(&mut self, now: Duration) {
        let (timeout, floor) = (self.timeout(), self.timer_floor);
        let mut expired = Vec::new();
        let mut overdue = false;
        for (since, _, client, number) in &self.timers {
            if (*since).max(floor).saturating_add(timeout) > now {
                break;
            }
            match self.waiting.get(&(*client, *number)) {
                Some(held) if held.forwarded => {
                    overdue = true;
                    break;
                }
                Some(_) => expired.push((*client, *number)),
                None => {}
            }
        }
        if overdue {
            if !self.gap_asked && self.missed_a_proposal() {
                // The group commits batches this replica cannot execute (it missed a
                // pre-prepare, e.g. sent before it was connected): it is behind, and leaving
                // the view alone would strand it in a view nobody else joins. Ask the others
                // for the committed batches and wait once more; if that does not help, change
                // views after all.
                self.gap_asked = true;
                let next = self.executed + 1;
                self.broadcast(Message::FetchState { seq: next });
                self.timer_floor = now;
            } else {
                self.backoff = self.backoff.saturating_add(1);
                self.start_view_change(self.view + 1);
            }
            return;
        }
        if expired.is_empty() {
            return;
        }
        // A request that fails the check is dropped here, neither forwarded nor left to change
        // views: a client's bad signatures cost the group nothing beyond its own budget.
        self.check_held(&expired);
        let mut requests = Vec::with_capacity(expired.len());
        for key in expired {
            if let Some(held) = self.waiting.get_mut(&key) {
                self.timers
                    .remove(&(held.since, held.arrival, key.0, key.1));
                held.since = now;
                held.forwarded = true;
                self.timers.insert((now, held.arrival, key.0, key.1));
                requests.push(held.request.clone());
            }
        }
        if let Some(primary) = self.primary().filter(|p| *p != self.id()) {
            self.forward_to(primary, &requests);
        }
    }

    /// Drops the held requests of `client` that executed (its number is at or below the
    /// client's last executed one), with their timers.
    fn release(&mut self, client: NodeId) {
        let Some(last) = self.last_executed.get(&client).copied() else {
            return;
        };
        let done: Vec<(NodeId, u64)> = self
            .waiting
            .range((client, 0)..=(client, last))
            .map(|(k, _)| *k)
            .collect();
        for key in done {
            self.unhold(key);
        }
    }

    /// The checks of an arriving request that need no signature of it: it has not executed, it
    /// is not held as it is, and it fits the budgets. A different copy held unchecked (from the
    /// client's channel) gives way to a checked one if it fails the check itself: otherwise a
    /// client that sends a badly signed copy to the primary and a good one to the backups
    /// would make the primary refuse the good one the backups forward, and the backups change
    /// views. Each held copy is checked at most once this way.
    fn request_admissible(
        &mut self,
        request: &Request,
        forwarded: bool,
        intake: Intake,
    ) -> Result<(), Ignored> {
        self.request_fresh(request, intake)?;
        let bytes = request.payload.len();
        let (count, client_bytes) = self.held_of(&request.client);
        let share = if forwarded { 2 } else { 1 };
        if self.waiting.len() >= self.config.max_pending
            || count >= self.config.max_pending_per_client.saturating_mul(share)
            || client_bytes.saturating_add(bytes)
                > self
                    .config
                    .max_pending_bytes_per_client
                    .saturating_mul(share)
            || self.pending_bytes.saturating_add(bytes) > self.config.max_pending_bytes
        {
            return Err(Ignored::Busy);
        }
        Ok(())
    }

    /// Requests and payload bytes held for `client`.
    fn held_of(&self, client: &NodeId) -> (usize, usize) {
        self.pending_by_client
            .get(client)
            .copied()
            .unwrap_or_default()
    }

    /// [`Replica::request_admissible`] without the budgets: not executed, not held as it is.
    fn request_fresh(&mut self, request: &Request, intake: Intake) -> Result<(), Ignored> {
        let key = (request.client, request.number);
        if self
            .last_executed
            .get(&request.client)
            .is_some_and(|n| request.number <= *n)
        {
            return Err(Ignored::Stale);
        }
        match self.waiting.get(&key) {
            None => Ok(()),
            Some(held)
                if held.checked
                    || intake == Intake::Vouched
                    || held.request.payload == request.payload =>
            {
                Err(Ignored::Stale)
            }
            Some(_) => {
                if self.check_held(&[key]) == 0 {
                    Err(Ignored::Stale)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Drops one held request, with its timer and its share of the budgets.
    fn unhold(&mut self, key: (NodeId, u64)) {
        let Some(held) = self.waiting.remove(&key) else {
            return;
        };
        self.timers
            .remove(&(held.since, held.arrival, key.0, key.1));
        let bytes = held.request.payload.len();
        self.pending_bytes = self.pending_bytes.saturating_sub(bytes);
        if let Some((count, client_bytes)) = self.pending_by_client.get_mut(&key.0) {
            *count = count.saturating_sub(1);
            *client_bytes = client_bytes.saturating_sub(bytes);
            if *count == 0 {
                self.pending_by_client.remove(&key.0);
            }
        }
    }

    /// [`Replica::release`] for every client (after a state transfer).
    fn release_all(&mut self) {
        let clients: BTreeSet<NodeId> = self.waiting.keys().map(|(c, _)| *c).collect();
        for client in clients {
            self.release(client);
        }
    }

    /// The primary proposes batches from its queue: full ones, or also a partial one when
    /// `flush` (the batch delay passed).
    fn propose(&mut self, flush: bool) {
        if !self.active || !self.is_primary() || !self.may_vote(self.view) {
            return;
        }
        let max = self.config.max_batch.max(1);
        loop {
            self.queue
                .retain(|(k, arrival)| self.waiting.get(k).is_some_and(|h| h.arrival == *arrival));
            let seq = self.next_seq + 1;
            if self.queue.is_empty()
                || (self.queue.len() < max && !flush)
                || !self.in_window(seq)
                || self.group_at(seq).primary(self.view) != Some(self.id())
            {
                // (At a group change the next slot may belong to another primary.)
                break;
            }
            let take = self.queue.len().min(max);
            let keys: Vec<(NodeId, u64)> = self.queue.drain(..take).map(|(k, _)| k).collect();
            // Only what passes the check goes out: every correct backup accepts this batch,
            // whether it holds a request from the client or checks it itself.
            self.check_held(&keys);
            let batch: Vec<Request> = keys
                .iter()
                .filter_map(|k| self.waiting.get(k).map(|h| h.request.clone()))
                .collect();
            if batch.is_empty() {
                continue;
            }
            self.next_seq += 1;
            let (view, seq) = (self.view, self.next_seq);
            let digest = batch_digest(&batch);
            let pp = self.signer.sign(Message::PrePrepare {
                view,
                seq,
                digest,
                batch,
            });
            self.persist(|| Record::PrePrepare(pp.clone()));
            self.outputs.push_back(Output::Broadcast(pp.clone()));
            self.slots.entry(seq).or_default().pre_prepare = Some(Verified::trusted(pp));
        }
        if self.queue.is_empty() {
            self.oldest_queued = None;
        } else if self.oldest_queued.is_none() {
            self.oldest_queued = Some(self.now);
        }
    }

    /// What one sender may have held for the next window, and for a later view: three
    /// messages per sequence number of a window, and [`Config::max_held_bytes`].
    fn hold_limits(&self) -> HoldLimits {
        HoldLimits {
            messages: (self.config.window as usize).saturating_mul(3),
            bytes: self.config.max_held_bytes,
        }
    }

    /// The checks of a normal-case message that need no state beyond the group: a
    /// pre-prepare comes from its view's primary and carries a batch of at most `max_batch`
    /// distinct requests; a prepare does not come from the primary. They run before the
    /// message is held or acted on (and again when a held one is replayed).
    fn well_formed(&self, sender: NodeId, message: &Message) -> Result<(), Ignored> {
        let (Some(view), Some(seq)) = (message.view(), message.seq()) else {
            return Err(Ignored::Invalid);
        };
        let primary = self.group_at(seq).primary(view);
        match message {
            Message::PrePrepare { batch, .. } => {
                if primary != Some(sender) {
                    return Err(Ignored::NotPrimary);
                }
                let distinct: BTreeSet<(NodeId, u64)> =
                    batch.iter().map(|r| (r.client, r.number)).collect();
                if batch.len() > self.config.max_batch.max(1) || distinct.len() != batch.len() {
                    return Err(Ignored::Invalid);
                }
            }
            Message::Prepare { .. } if primary == Some(sender) => {
                return Err(Ignored::PrepareFromPrimary);
            }
            _ => {}
        }
        Ok(())
    }

    /// The checks of a message that need no signature: its sender is a replica of a group
    /// this replica knows, a new view comes from a primary of its view, and every list in it
    /// (view changes, certificates, votes, requests, batches) is no longer than the protocol
    /// ever makes it (n, the window, `max_batch`). A host runs it before verifying any
    /// signature, nested ones included, so that a message built to cost verification work
    /// (a new view with thousands of view changes, a certificate with thousands of votes) is
    /// refused for the price of reading it. [`Replica::handle_message`] checks the rest.
    ///
    /// # Errors
    /// [`Ignored`] saying why the message cannot be of use.
    pub fn admissible(&self, s: &Signed) -> Result<(), Ignored> {
        let n = self.groups.values().map(Vec::len).max().unwrap_or(0);
        let window = usize::try_from(self.config.window).unwrap_or(usize::MAX);
        let max_batch = self.config.max_batch.max(1);
        if !self.groups.values().any(|g| g.contains(&s.sender)) {
            return Err(Ignored::NotMember);
        }
        let short = |list_len: usize, max: usize| {
            if list_len <= max {
                Ok(())
            } else {
                Err(Ignored::Invalid)
            }
        };
        let certificate = |c: &Certificate| {
            short(c.votes.len(), n)?;
            match &c.proposal.message {
                Message::PrePrepare { batch, .. } => short(batch.len(), max_batch),
                _ => Err(Ignored::Invalid),
            }
        };
        let view_change = |m: &Message| match m {
            Message::ViewChange {
                checkpoint,
                prepared,
                ..
            } => {
                short(checkpoint.len(), n)?;
                short(prepared.len(), window)?;
                prepared.iter().try_for_each(certificate)
            }
            _ => Err(Ignored::Invalid),
        };
        match &s.message {
            Message::PrePrepare { batch, .. } => short(batch.len(), max_batch),
            Message::Forward { requests } => short(requests.len(), max_batch),
            Message::ViewChange { .. } => view_change(&s.message),
            Message::NewView {
                view,
                view_changes,
                pre_prepares,
            } => {
                let primary_somewhere = self
                    .groups
                    .values()
                    .any(|g| Group { members: g.clone() }.primary(*view) == Some(s.sender));
                if !primary_somewhere {
                    return Err(Ignored::NotPrimary);
                }
                short(view_changes.len(), n)?;
                short(pre_prepares.len(), window)?;
                view_changes
                    .iter()
                    .try_for_each(|vc| view_change(&vc.message))?;
                pre_prepares.iter().try_for_each(|pp| match &pp.message {
                    Message::PrePrepare { batch, .. } => short(batch.len(), max_batch),
                    _ => Err(Ignored::Invalid),
                })
            }
            Message::State {
                checkpoint,
                committed,
                ..
            } => {
                // A replica that joined knows only the group it started with, which may have
                // grown since: state replies may name up to STATE_GROUP_BOUND replicas.
                let n = n.max(STATE_GROUP_BOUND);
                short(checkpoint.len(), n)?;
                short(committed.len(), window)?;
                committed.iter().try_for_each(|c| {
                    short(c.votes.len(), n)?;
                    match &c.proposal.message {
                        Message::PrePrepare { batch, .. } => short(batch.len(), max_batch),
                        _ => Err(Ignored::Invalid),
                    }
                })
            }
            Message::Prepare { .. }
            | Message::Commit { .. }
            | Message::Checkpoint { .. }
            | Message::FetchState { .. }
            | Message::FetchPart { .. }
            | Message::Part { .. } => Ok(()),
        }
    }

    /// A verified message from another replica.
    ///
    /// # Errors
    /// [`Ignored`] saying why the message had no effect.
    pub fn handle_message(&mut self, message: Verified) -> Result<(), Ignored> {
        let sender = message.sender();
        if sender == self.id() {
            // Only a twin (a second instance with this identity) sends these.
            return Err(Ignored::Stale);
        }
        match message.message() {
            Message::PrePrepare { view, seq, .. }
            | Message::Prepare { view, seq, .. }
            | Message::Commit { view, seq, .. } => {
                let (view, seq) = (*view, *seq);
                if !self.group_at(seq).contains(&sender) {
                    return Err(Ignored::NotMember);
                }
                if view < self.view {
                    return Err(Ignored::WrongView);
                }
                if seq <= self.low {
                    return Err(Ignored::OutOfWindow);
                }
                self.well_formed(sender, message.message())?;
                if view > self.view || !self.active {
                    let limits = self.hold_limits();
                    let held = self.ahead.insert(message, limits);
                    // Even when the sender's share is full (e.g. filled while this replica was
                    // not yet a member, when it does not follow views), what is held may now
                    // tell it to catch up.
                    self.catch_up_view();
                    return match held {
                        Ok(()) => Ok(()),
                        Err(Refused::Full) => Err(Ignored::Busy),
                        Err(Refused::Stale) => Err(Ignored::Stale),
                    };
                }
                self.in_view(sender, view, seq, message)
            }
            Message::Checkpoint { seq, .. } => {
                let seq = *seq;
                self.on_checkpoint(sender, seq, message)
            }
            Message::ViewChange { .. } => self.on_view_change(sender, message),
            Message::NewView { .. } => self.on_new_view(sender, message),
            Message::FetchState { seq } => {
                let seq = *seq;
                self.on_fetch_state(sender, seq)
            }
            Message::State { .. } => self.on_state(message),
            Message::FetchPart { seq, state, index } => {
                let (seq, state, index) = (*seq, *state, *index);
                self.on_fetch_part(sender, seq, state, index)
            }
            Message::Part {
                seq,
                state,
                index,
                bytes,
            } => {
                let (seq, state, index, bytes) = (*seq, *state, *index, bytes.clone());
                self.on_part(sender, seq, state, index, bytes)
            }
            Message::Forward { requests } => {
                if !self.group().contains(&sender) {
                    return Err(Ignored::NotMember);
                }
                let now = self.now;
                // Cheap checks first, then the rest as one batch, on arrival: a faulty replica
                // that forwards a forged request under a client's number must not take that
                // number from the client.
                let fresh: Vec<&Request> = requests
                    .iter()
                    .filter(|r| self.request_admissible(r, true, Intake::Checked).is_ok())
                    .collect();
                let verdicts = self.requests_valid(&fresh);
                let taken = fresh
                    .into_iter()
                    .zip(verdicts)
                    .filter(|(r, ok)| {
                        *ok && self
                            .take_request((*r).clone(), now, true, Intake::Checked)
                            .is_ok()
                    })
                    .count();
                if taken == 0 {
                    return Err(Ignored::Stale);
                }
                Ok(())
            }
        }
    }

    /// A replica that missed a view change (it was partitioned, or restarted with an empty
    /// memory) hears normal-case messages for a later view: once f+1 distinct replicas (so at
    /// least one correct one) are in views above its own, it changes to the smallest view among
    /// the f+1 highest, and the view's primary re-sends its new view on that view change.
    fn catch_up_view(&mut self) {
        if !self.is_member() {
            return;
        }
        let mut highest: BTreeMap<NodeId, View> = BTreeMap::new();
        for m in self.ahead.iter() {
            if let Some(v) = m.message().view()
                && v > self.view
            {
                let e = highest.entry(m.sender()).or_insert(v);
                *e = (*e).max(v);
            }
        }
        let mut views: Vec<View> = highest.into_values().collect();
        views.sort_unstable_by(|a, b| b.cmp(a));
        if let Some(target) = views.get(self.group().f()).copied() {
            self.start_view_change(target);
        }
    }

    /// A pre-prepare, prepare or commit for the current view.
    fn in_view(
        &mut self,
        sender: NodeId,
        view: View,
        seq: Seq,
        message: Verified,
    ) -> Result<(), Ignored> {
        if seq <= self.low {
            return Err(Ignored::OutOfWindow);
        }
        let top = self.low.saturating_add(self.config.window);
        if seq > top {
            if seq > top.saturating_add(self.config.window) {
                return Err(Ignored::OutOfWindow);
            }
            let limits = self.hold_limits();
            return match self.future.insert(message, limits) {
                Ok(()) => Ok(()),
                Err(Refused::Full) => Err(Ignored::Busy),
                Err(Refused::Stale) => Err(Ignored::Stale),
            };
        }
        match message.message() {
            Message::PrePrepare { digest, batch, .. } => {
                let unheld: Vec<&Request> = batch.iter().filter(|r| !self.holds(r)).collect();
                if !self.requests_valid(&unheld).iter().all(|ok| *ok) {
                    // A faulty primary: no prepare from this replica, and the view-change timer
                    // runs on for the requests it holds.
                    return Err(Ignored::Invalid);
                }
                let digest = *digest;
                let slot = self.slots.entry(seq).or_default();
                match slot.proposal() {
                    Some((v, d)) if v == view && d != digest => return Err(Ignored::Conflicting),
                    Some((v, _)) if v == view => return Err(Ignored::Stale),
                    _ => {}
                }
                slot.pre_prepare = Some(message.clone());
                if self.may_vote(view) {
                    self.persist(|| Record::PrePrepare(message.signed().clone()));
                    let prepare = self.broadcast(Message::Prepare { view, seq, digest });
                    let me = self.id();
                    self.slots
                        .entry(seq)
                        .or_default()
                        .prepares
                        .insert(me, prepare);
                }
            }
            Message::Prepare { .. } => {
                self.slots
                    .entry(seq)
                    .or_default()
                    .prepares
                    .insert(sender, message);
            }
            _ => {
                self.slots
                    .entry(seq)
                    .or_default()
                    .commits
                    .insert(sender, message);
            }
        }
        self.advance(seq);
        Ok(())
    }

    /// Moves slot `seq` forward (prepared -> commit sent) and executes what is committed.
    fn advance(&mut self, seq: Seq) {
        let group = self.group_at(seq);
        let prepared_quorum = group.prepares_needed();
        let (view, me) = (self.view, self.id());
        let mut commit = None;
        if let Some(slot) = self.slots.get_mut(&seq)
            && let Some((pv, digest)) = slot.proposal()
            && pv == view
            && slot.commit_sent != Some(view)
        {
            let primary = group.primary(view);
            let votes: Vec<Signed> = matching(&slot.prepares, view, digest)
                .filter(|v| Some(v.sender()) != primary && group.contains(&v.sender()))
                .take(prepared_quorum)
                .map(|v| v.signed().clone())
                .collect();
            if votes.len() >= prepared_quorum
                && let Some(pp) = &slot.pre_prepare
            {
                let cert = Certificate {
                    proposal: pp.signed().clone(),
                    votes,
                };
                slot.prepared = Some(cert.clone());
                slot.commit_sent = Some(view);
                commit = Some((digest, cert));
            }
        }
        if let Some((digest, cert)) = commit {
            self.persist(|| Record::Prepared(cert));
            let own = self.broadcast(Message::Commit { view, seq, digest });
            if let Some(slot) = self.slots.get_mut(&seq) {
                slot.commits.insert(me, own);
            }
        }
        self.execute_ready();
    }

    /// Executes committed slots in sequence order; a primary whose pipeline drained then
    /// proposes what queued meanwhile.
    fn execute_ready(&mut self) {
        self.execute_committed();
        if self.config.propose_when_idle && !self.queue.is_empty() && self.pipeline_idle() {
            self.propose(true);
        }
    }

    fn execute_committed(&mut self) {
        loop {
            let seq = self.executed + 1;
            let group = self.group_at(seq);
            let Some(slot) = self.slots.get_mut(&seq) else {
                break;
            };
            let Some((pv, digest)) = slot.proposal() else {
                break;
            };
            let commits = matching(&slot.commits, pv, digest)
                .filter(|v| group.contains(&v.sender()))
                .count();
            if commits < group.quorum() || slot.executed {
                break;
            }
            slot.executed = true;
            let proof = match (&slot.pre_prepare, self.config.durable) {
                (Some(pp), true) => Some(Certificate {
                    proposal: pp.signed().clone(),
                    votes: matching(&slot.commits, pv, digest)
                        .filter(|v| group.contains(&v.sender()))
                        .take(group.quorum())
                        .map(|v| v.signed().clone())
                        .collect(),
                }),
                _ => None,
            };
            if let Some(cert) = proof {
                self.outputs
                    .push_back(Output::Persist(Record::Committed(cert)));
            }
            self.executed = seq;
            // At most once per (client, number): every replica filters the agreed batch the
            // same way, in sequence order, so they all execute the same requests.
            let mut fresh = Vec::new();
            for r in slot.batch() {
                if self
                    .last_executed
                    .get(&r.client)
                    .is_none_or(|n| r.number > *n)
                {
                    self.last_executed.insert(r.client, r.number);
                    fresh.push(r.clone());
                }
            }
            // The back-off resets once the request that waited longest executes, not on any
            // batch (under a long queue that would let view changes follow each other).
            let oldest = self.timers.first().map(|(_, _, c, n)| (*c, *n));
            for r in &fresh {
                self.release(r.client);
            }
            let oldest_done = oldest.is_none_or(|key| !self.waiting.contains_key(&key));
            self.outputs.push_back(Output::Execute {
                seq,
                digest,
                batch: fresh,
            });
            if seq.is_multiple_of(self.config.checkpoint_interval.max(1)) {
                self.core_at
                    .insert(seq, (self.groups.clone(), self.last_executed.clone()));
                self.outputs.push_back(Output::CheckpointDue { seq });
            }
            self.gap_asked = false;
            if self.active && oldest_done {
                self.backoff = 0;
            }
        }
    }

    /// The application's snapshot after executing checkpoint `seq` (see
    /// [`Output::CheckpointDue`]): joined with the core's state at `seq`, its digest is signed
    /// and broadcast as this replica's checkpoint.
    pub fn handle_checkpoint_state(&mut self, seq: Seq, app_snapshot: Bytes) {
        let Some((groups, last)) = self.core_at.remove(&seq) else {
            return;
        };
        let snapshot = Snapshot::join(&Snapshot::encode_core(&groups, &last), &app_snapshot);
        let own = OwnSnapshot::new(seq, snapshot, self.config.state_part_bytes);
        let state = own.digest;
        self.snapshots.insert(seq, own);
        self.persist_stable();
        if seq < self.low {
            return;
        }
        let me = self.id();
        let own = self.broadcast(Message::Checkpoint { seq, state });
        self.checkpoints.entry(seq).or_default().insert(me, own);
        self.try_stabilize(seq);
    }

    /// The application could not produce the agreed state at checkpoint `seq` (see
    /// [`crate::service::StateMachine::state_known`]): this replica sends no checkpoint and
    /// fetches the state at the next stable checkpoint, executing the batches above it again.
    pub fn handle_state_lost(&mut self, seq: Seq) {
        self.core_at.remove(&seq);
        self.lost = true;
    }

    /// Whether this replica waits for a state transfer because its application's state is not
    /// the agreed one.
    pub fn state_lost(&self) -> bool {
        self.lost
    }

    fn on_checkpoint(
        &mut self,
        sender: NodeId,
        seq: Seq,
        message: Verified,
    ) -> Result<(), Ignored> {
        if !self.group_at(seq).contains(&sender) {
            return Err(Ignored::NotMember);
        }
        if seq <= self.low {
            return Err(Ignored::OutOfWindow);
        }
        let top = self.low.saturating_add(self.config.window);
        if seq > top {
            // Far ahead: keep only each sender's newest, to learn that we are behind.
            let newer = self
                .checkpoints
                .range(seq..)
                .any(|(_, by)| by.contains_key(&sender));
            if newer {
                return Err(Ignored::Stale);
            }
            for (_, by) in self.checkpoints.range_mut(top + 1..seq) {
                by.remove(&sender);
            }
            self.checkpoints.retain(|_, by| !by.is_empty());
        }
        self.checkpoints
            .entry(seq)
            .or_default()
            .insert(sender, message);
        self.try_stabilize(seq);
        Ok(())
    }

    /// A quorum of matching checkpoints at `seq`: the state digest and the certificate.
    fn quorum_checkpoint(&self, seq: Seq) -> Option<(Digest, Vec<Verified>)> {
        let group = self.group_at(seq);
        let mut by_state: BTreeMap<Digest, Vec<Verified>> = BTreeMap::new();
        for (sender, v) in self.checkpoints.get(&seq)? {
            if let Message::Checkpoint { state, .. } = v.message()
                && group.contains(sender)
            {
                by_state.entry(*state).or_default().push(v.clone());
            }
        }
        by_state
            .into_iter()
            .find(|(_, v)| v.len() >= group.quorum())
    }

    fn try_stabilize(&mut self, seq: Seq) {
        if seq <= self.low {
            return;
        }
        let Some((digest, cert)) = self.quorum_checkpoint(seq) else {
            return;
        };
        if seq <= self.executed || seq > self.low.saturating_add(self.config.window) {
            self.stabilize(seq, cert, digest);
        } else {
            // Behind, but perhaps only a little: give the normal case a moment first.
            self.behind_since.get_or_insert(self.now);
        }
    }

    /// Makes `seq` the stable checkpoint: moves the low watermark, collects garbage, and
    /// fetches the state if this replica has not executed that far.
    fn stabilize(&mut self, seq: Seq, cert: Vec<Verified>, digest: Digest) {
        if seq <= self.low {
            return;
        }
        let primary_before = self.primary();
        let was_primary = primary_before == Some(self.id());
        if self
            .snapshots
            .get(&seq)
            .is_some_and(|own| own.digest != digest)
        {
            // Our state at `seq` is not the one a quorum certified.
            self.snapshots.remove(&seq);
            self.lost = true;
        }
        self.stable = cert;
        self.stable_digest = Some(digest);
        self.low = seq;
        self.slots.retain(|s, _| *s > seq);
        self.checkpoints.retain(|s, _| *s > seq);
        self.retain_snapshots();
        self.core_at.retain(|s, _| *s >= seq);
        // Older groups judge the checkpoint certificates that view changes and state transfers
        // carry, which may be older than ours: keep the last few (groups change rarely), and
        // always the one that judges `seq` and every later one.
        let current = self.groups.range(..seq).next_back().map(|(k, _)| *k);
        while self.groups.len() > GROUPS_KEPT
            && let Some(oldest) = self.groups.keys().next().copied()
            && current.is_some_and(|c| oldest < c)
        {
            self.groups.remove(&oldest);
        }
        self.next_seq = self.next_seq.max(seq);
        self.persist_stable();
        if self.primary() != primary_before {
            // A group change handed the view to another primary: as in a new view, every held
            // request's timer starts again from its first stage (what went to the leaving
            // primary at once must not change views when that primary's slots ran out).
            self.timer_floor = self.now;
            for held in self.waiting.values_mut() {
                held.forwarded = false;
            }
        }
        if self.active && self.is_primary() && !was_primary {
            // A group change made this replica the primary of the current view.
            self.rebuild_queue(&std::collections::BTreeSet::new());
        }
        if self.executed < seq || self.lost {
            self.fetching = Some((seq, self.now));
            self.behind_since = None;
            self.broadcast(Message::FetchState { seq });
        }
        self.propose(false);
        // Replay held messages that the new window admits (in sequence order).
        let top = self.low.saturating_add(self.config.window);
        let mut ready = self
            .future
            .take(|m| m.message().seq().is_some_and(|s| s <= top));
        ready.sort_by_key(|m| m.message().seq());
        for m in ready {
            let _ = self.handle_message(m);
        }
    }

    fn start_view_change(&mut self, view: View) {
        self.view = view;
        self.active = false;
        self.queue.clear();
        self.oldest_queued = None;
        self.vc_deadline = Some(self.now + self.timeout());
        self.vc_escalate = false;
        self.gap_asked = false;
        let low = self.low;
        let top = low.saturating_add(self.config.window);
        let prepared = self
            .slots
            .range(low + 1..=top)
            .filter_map(|(_, s)| s.prepared.clone())
            .collect();
        self.persist(|| Record::ViewChange(view));
        let own = self.broadcast(Message::ViewChange {
            view,
            stable: low,
            checkpoint: self.stable.iter().map(|v| v.signed().clone()).collect(),
            prepared,
        });
        let me = self.id();
        self.own_view_changes.insert(view, own.signed().clone());
        while self.own_view_changes.len() > OWN_VIEW_CHANGES_KEPT {
            self.own_view_changes.pop_first();
        }
        self.view_changes.retain(|v, _| *v >= view);
        self.view_changes.entry(view).or_default().insert(me, own);
        self.after_view_change();
    }

    /// While changing views: start the back-off timer once 2f+1 replicas are changing to this
    /// view, and build the new view if this replica is its primary.
    fn after_view_change(&mut self) {
        if self.active {
            return;
        }
        let group = self.group();
        let here = self.view_changes.get(&self.view).map_or(0, BTreeMap::len);
        if here >= group.quorum() && !self.vc_escalate {
            self.vc_escalate = true;
            self.vc_deadline = Some(self.now + self.timeout());
        }
        if here < group.quorum() || group.primary(self.view) != Some(self.id()) {
            return;
        }
        let mut vcs: Vec<Verified> = self
            .view_changes
            .get(&self.view)
            .map(|by| by.values().cloned().collect())
            .unwrap_or_default();
        // Receivers judge the new view by the group after its stable checkpoint
        // (`Replica::on_new_view`). Where a group change lies between this replica's low
        // watermark and that checkpoint, keep the view changes of that group only, and wait
        // if they are too few.
        let mut plan = plan_new_view(&vcs.iter().map(Verified::message).collect::<Vec<_>>());
        let mut judged_by = self.group_at(plan.stable.saturating_add(1));
        for _ in 0..3 {
            if vcs.iter().all(|v| judged_by.contains(&v.sender())) {
                break;
            }
            vcs.retain(|v| judged_by.contains(&v.sender()));
            plan = plan_new_view(&vcs.iter().map(Verified::message).collect::<Vec<_>>());
            judged_by = self.group_at(plan.stable.saturating_add(1));
        }
        if judged_by.primary(self.view) != Some(self.id())
            || vcs.len() < judged_by.quorum()
            || vcs.iter().any(|v| !judged_by.contains(&v.sender()))
        {
            return;
        }
        let view = self.view;
        let pre_prepares: Vec<Signed> = plan
            .proposals
            .iter()
            .map(|(seq, (digest, batch))| {
                self.signer.sign(Message::PrePrepare {
                    view,
                    seq: *seq,
                    digest: *digest,
                    batch: batch.clone(),
                })
            })
            .collect();
        self.record_entered(view);
        for pp in &pre_prepares {
            self.persist(|| Record::PrePrepare(pp.clone()));
        }
        let new_view = self.broadcast(Message::NewView {
            view,
            view_changes: vcs.iter().map(|v| v.signed().clone()).collect(),
            pre_prepares: pre_prepares.clone(),
        });
        self.new_view = Some(new_view.signed().clone());
        self.enter_view(view, plan, pre_prepares);
    }

    fn on_view_change(&mut self, sender: NodeId, message: Verified) -> Result<(), Ignored> {
        let Message::ViewChange { view, .. } = message.message() else {
            return Err(Ignored::Invalid);
        };
        let view = *view;
        let group = self.group();
        if !group.contains(&sender) {
            return Err(Ignored::NotMember);
        }
        if view == self.view
            && self.active
            && let Some(nv) = &self.new_view
            && matches!(nv.message, Message::NewView { view: v, .. } if v == view)
        {
            // The sender missed the new view this replica started.
            let message = nv.clone();
            self.outputs.push_back(Output::Send {
                to: sender,
                message,
            });
            return Err(Ignored::Stale);
        }
        if view < self.view || (view == self.view && self.active) {
            // The sender may still be collecting view changes for a view this replica has left
            // and have lost ours (its new primary needs 2f+1 of them). Not if it has shown us
            // a later view, and at most once per timeout per sender (no echo between two
            // replicas that have both moved on).
            let moved_on = self
                .view_changes
                .range(view + 1..)
                .any(|(_, by)| by.contains_key(&sender));
            let recently = self
                .answered
                .get(&sender)
                .is_some_and(|at| self.now.saturating_sub(*at) < self.config.view_change_timeout);
            if !moved_on
                && !recently
                && let Some(own) = self.own_view_changes.get(&view)
            {
                let message = own.clone();
                self.answered.insert(sender, self.now);
                self.outputs.push_back(Output::Send {
                    to: sender,
                    message,
                });
            }
            return Err(Ignored::WrongView);
        }
        if !valid_view_change(message.message(), self.config.window, |s| self.group_at(s)) {
            return Err(Ignored::Invalid);
        }
        if self
            .view_changes
            .get(&view)
            .is_some_and(|by| by.contains_key(&sender))
        {
            return Err(Ignored::Stale);
        }
        self.view_changes
            .entry(view)
            .or_default()
            .insert(sender, message);
        let views: Vec<View> = self
            .view_changes
            .iter()
            .filter(|(_, by)| by.contains_key(&sender))
            .map(|(v, _)| *v)
            .collect();
        if let Some(excess) = views.len().checked_sub(OWN_VIEW_CHANGES_KEPT) {
            for v in views.iter().take(excess) {
                if let Some(by) = self.view_changes.get_mut(v) {
                    by.remove(&sender);
                }
            }
            self.view_changes.retain(|_, by| !by.is_empty());
        }
        // f+1 replicas are in later views: at least one correct replica is, so join the
        // smallest view among the f+1 highest (each sender's highest counts).
        let mut highest: BTreeMap<NodeId, View> = BTreeMap::new();
        for (v, by) in self.view_changes.range(self.view + 1..) {
            for id in by.keys() {
                highest.insert(*id, *v);
            }
        }
        let mut later: Vec<View> = highest.into_values().collect();
        later.sort_unstable_by(|a, b| b.cmp(a));
        if let Some(target) = later.get(group.f()).copied() {
            self.start_view_change(target);
        } else {
            self.after_view_change();
        }
        Ok(())
    }

    fn on_new_view(&mut self, sender: NodeId, message: Verified) -> Result<(), Ignored> {
        let Message::NewView {
            view,
            view_changes,
            pre_prepares,
        } = message.message()
        else {
            return Err(Ignored::Invalid);
        };
        let view = *view;
        if view < self.view || (view == self.view && self.active) {
            return Err(Ignored::WrongView);
        }
        let mut senders = std::collections::BTreeSet::new();
        for vc in view_changes {
            let fits = matches!(vc.message, Message::ViewChange { view: v, .. } if v == view);
            if !fits
                || !senders.insert(vc.sender)
                || !valid_view_change(&vc.message, self.config.window, |s| self.group_at(s))
            {
                return Err(Ignored::Invalid);
            }
        }
        let plan = plan_new_view(&view_changes.iter().map(|s| &s.message).collect::<Vec<_>>());
        // The group that ran this view change: the one after the new view's stable checkpoint
        // (as `Replica::group` is after the low watermark). Not this replica's current group:
        // a replica that joined later (or moved its low watermark past a group change since)
        // must still accept the new view the others entered.
        let group = self.group_at(plan.stable.saturating_add(1));
        if group.primary(view) != Some(sender) {
            return Err(Ignored::NotPrimary);
        }
        if senders.len() < group.quorum() || !senders.iter().all(|id| group.contains(id)) {
            return Err(Ignored::Invalid);
        }
        let expected = plan.proposals.len() == pre_prepares.len()
            && plan
                .proposals
                .iter()
                .zip(pre_prepares)
                .all(|((seq, (digest, _)), pp)| {
                    pp.sender == sender
                        && matches!(&pp.message, Message::PrePrepare { view: v, seq: s, digest: d, .. }
                            if *v == view && s == seq && d == digest)
                });
        if !expected {
            return Err(Ignored::Invalid);
        }
        let pre_prepares = pre_prepares.clone();
        self.enter_view(view, plan, pre_prepares);
        Ok(())
    }

    /// Enters `view` with the new view's plan and pre-prepares (checked against the plan).
    fn enter_view(&mut self, view: View, plan: NewViewPlan, pre_prepares: Vec<Signed>) {
        self.view = view;
        self.active = true;
        self.vc_deadline = None;
        self.view_changes.retain(|w, _| *w > view);
        if plan.stable > self.low
            && let Some(Some(digest)) = self
                .group_at(plan.stable)
                .checkpoint_cert(plan.stable, &plan.checkpoint)
        {
            let cert = plan.checkpoint.into_iter().map(Verified::trusted).collect();
            self.stabilize(plan.stable, cert, digest);
        }
        let me = self.id();
        let primary = self.primary();
        // (The primary that built the new view journaled it already; a replica that finds
        // itself primary of a view another replica's new view started journals it here.)
        if self.voting_view != Some(view) {
            self.record_entered(view);
        }
        let mut proposed = std::collections::BTreeSet::new();
        let mut touched = Vec::new();
        for pp in pre_prepares {
            let Message::PrePrepare {
                seq, digest, batch, ..
            } = &pp.message
            else {
                continue;
            };
            let (seq, digest) = (*seq, *digest);
            proposed.extend(batch.iter().map(|r| (r.client, r.number)));
            self.next_seq = self.next_seq.max(seq);
            if !self.in_window(seq) {
                continue;
            }
            if primary != Some(me) {
                self.persist(|| Record::PrePrepare(pp.clone()));
            }
            self.slots.entry(seq).or_default().pre_prepare = Some(Verified::trusted(pp));
            if primary != Some(me) {
                let own = self.broadcast(Message::Prepare { view, seq, digest });
                self.slots.entry(seq).or_default().prepares.insert(me, own);
            }
            touched.push(seq);
        }
        self.next_seq = self.next_seq.max(self.low);
        if let Some(primary) = primary {
            self.outputs
                .push_back(Output::ViewEntered { view, primary });
            if primary != me && !self.waiting.is_empty() {
                self.forward_held(primary);
            }
        }
        // Every held request's timer starts again in the new view (its primary has not had
        // them for long), from its first stage: they go to the new primary once more.
        self.timer_floor = self.now;
        for held in self.waiting.values_mut() {
            held.forwarded = false;
        }
        if primary == Some(me) {
            self.rebuild_queue(&proposed);
        }
        for seq in touched {
            self.advance(seq);
        }
        // Held messages of earlier views can never be used; those of this view are replayed,
        // those of later views stay.
        let earlier = |m: &Verified| m.message().view().is_none_or(|v| v < view);
        self.ahead.discard(earlier);
        self.future.discard(earlier);
        for m in self.ahead.take(|m| m.message().view() == Some(view)) {
            let _ = self.handle_message(m);
        }
        self.propose(false);
    }

    /// A new primary queues the requests it holds, in arrival order, except `proposed`.
    fn rebuild_queue(&mut self, proposed: &std::collections::BTreeSet<(NodeId, u64)>) {
        let mut keys: Vec<(u64, (NodeId, u64))> = self
            .waiting
            .iter()
            .filter(|(k, _)| !proposed.contains(*k))
            .map(|(k, held)| (held.arrival, *k))
            .collect();
        keys.sort_unstable();
        self.queue = keys.into_iter().map(|(a, k)| (k, a)).collect();
        self.oldest_queued = (!self.queue.is_empty()).then_some(self.now);
    }

    fn on_fetch_state(&mut self, sender: NodeId, seq: Seq) -> Result<(), Ignored> {
        if !self.group().contains(&sender) {
            return Err(Ignored::NotMember);
        }
        if seq > self.low {
            return self.fill_gap(sender, seq);
        }
        if self.low == 0 || self.executed < self.low {
            return Err(Ignored::Stale);
        }
        let Some(own) = self.snapshots.get(&self.low) else {
            return Err(Ignored::Stale);
        };
        if Some(own.digest) != self.stable_digest {
            return Err(Ignored::Stale);
        }
        // A snapshot of one part travels in the reply; a larger one is fetched in parts,
        // paced on their own, and the reply carries only the part digests.
        let inline = own.parts.len() == 1;
        if !self.may_serve(sender, inline) {
            return Err(Ignored::Busy);
        }
        let (parts, snapshot) = (own.parts.clone(), own.bytes.clone());
        if !inline {
            self.pin(sender, self.low, Pin::Told);
        }
        self.send_state(sender, self.low + 1, Some((parts, snapshot, inline)));
        Ok(())
    }

    /// Sends `sender` our stable certificate with the snapshot's part digests (and the snapshot
    /// itself if `inline`), if any, and the committed certificates of the batches from `from`
    /// to what we executed, and notes when (see [`Replica::may_serve`]). The signed reply is
    /// kept and sent again as it is to whoever asks while nothing it holds has changed, so
    /// that many requests cost one signature.
    fn send_state(
        &mut self,
        sender: NodeId,
        from: Seq,
        snapshot: Option<(Vec<Digest>, Bytes, bool)>,
    ) {
        let served = self.served.entry(sender).or_default();
        served.any = Some(self.now);
        if snapshot.as_ref().is_some_and(|(_, _, inline)| *inline) {
            served.snapshot = Some(self.now);
        }
        let key = (self.low, from, self.executed, snapshot.is_some());
        let message = match &self.state_reply {
            Some((k, message)) if *k == key => message.clone(),
            _ => {
                let (parts, snapshot) = match snapshot {
                    Some((parts, bytes, inline)) => {
                        (parts, if inline { bytes } else { Bytes::new() })
                    }
                    None => (Vec::new(), Bytes::new()),
                };
                let message = self.signer.sign(Message::State {
                    checkpoint: self.stable.iter().map(|v| v.signed().clone()).collect(),
                    parts,
                    snapshot,
                    committed: self.committed_certificates(from),
                });
                self.state_reply = Some((key, message.clone()));
                message
            }
        };
        self.outputs.push_back(Output::Send {
            to: sender,
            message,
        });
    }

    /// Whether `sender` may be sent a state reply now: any reply at most once per
    /// `state_transfer_delay`, one with a snapshot at most once per
    /// [`SNAPSHOT_SERVE_DELAYS`] of them, whatever it asks for (so that alternating requests
    /// cannot bypass the limit). A lagging replica asks again every `state_transfer_delay`,
    /// and asks every replica, so it is served soon; a faulty one costs each replica at most
    /// one snapshot per period.
    fn may_serve(&self, sender: NodeId, snapshot: bool) -> bool {
        let delay = self.config.state_transfer_delay;
        let within = |at: Option<Duration>, period: Duration| {
            at.is_some_and(|at| self.now.saturating_sub(at) < period)
        };
        let served = self.served.get(&sender).copied().unwrap_or_default();
        !(within(served.any, delay)
            || (snapshot && within(served.snapshot, delay.saturating_mul(SNAPSHOT_SERVE_DELAYS))))
    }

    /// A member fetches part `index` of our snapshot at `seq` with digest `state` (see
    /// [`crate::transfer`]): served from any of our snapshots with that digest, within the
    /// member's [`Bucket`]; the snapshot is kept while it fetches.
    fn on_fetch_part(
        &mut self,
        sender: NodeId,
        seq: Seq,
        state: Digest,
        index: u32,
    ) -> Result<(), Ignored> {
        if !self.group().contains(&sender) {
            return Err(Ignored::NotMember);
        }
        let Some(own) = self.snapshots.get(&seq).filter(|own| own.digest == state) else {
            return Err(Ignored::Stale);
        };
        let Some(range) = part_range(own.bytes.len(), self.config.state_part_bytes, index) else {
            return Err(Ignored::Invalid);
        };
        let bytes = own.bytes.slice(range);
        let (now, delay) = (self.now, self.config.state_transfer_delay);
        if !self
            .served
            .entry(sender)
            .or_default()
            .parts
            .take(now, delay)
        {
            return Err(Ignored::Busy);
        }
        self.pin(sender, seq, Pin::Fetched);
        let message = self.signer.sign(Message::Part {
            seq,
            state,
            index,
            bytes,
        });
        self.outputs.push_back(Output::Send {
            to: sender,
            message,
        });
        Ok(())
    }

    /// Keeps our snapshot at `seq` for `member`: as the one it was told of, or the one it
    /// fetches (each kind replaces only its own, so being told of newer states never unpins
    /// the one being fetched).
    fn pin(&mut self, member: NodeId, seq: Seq, kind: Pin) {
        let now = self.now;
        let pins = self.pins.entry(member).or_default();
        if let Some(slot) = pins.get_mut(kind as usize) {
            *slot = Some((seq, now));
        }
    }

    /// Drops our snapshots below the low watermark, except those a member fetched from within
    /// the last [`PIN_DELAYS`] periods (at most [`PINS_PER_MEMBER`] per member).
    fn retain_snapshots(&mut self) {
        let keep = self.config.state_transfer_delay.saturating_mul(PIN_DELAYS);
        let now = self.now;
        for pins in self.pins.values_mut() {
            for slot in pins.iter_mut() {
                if slot.is_some_and(|(_, at)| now.saturating_sub(at) >= keep) {
                    *slot = None;
                }
            }
        }
        self.pins.retain(|_, pins| pins.iter().any(Option::is_some));
        let (low, pins) = (self.low, &self.pins);
        self.snapshots
            .retain(|s, _| *s >= low || pins.values().flatten().flatten().any(|(p, _)| p == s));
    }

    /// A replica asks for the batches from `seq` on, above our stable checkpoint (it missed a
    /// pre-prepare): our certificate without a snapshot, and the committed certificates from
    /// `seq` to what we executed.
    fn fill_gap(&mut self, sender: NodeId, seq: Seq) -> Result<(), Ignored> {
        if self.executed < seq {
            return Err(Ignored::Stale);
        }
        if !self.may_serve(sender, false) {
            return Err(Ignored::Busy);
        }
        // (`committed_certificates(seq)` would be empty.)
        let proposed = |slot: &Slot| slot.pre_prepare.is_some() && slot.proposal().is_some();
        if !self.slots.get(&seq).is_some_and(proposed) {
            return Err(Ignored::Stale);
        }
        self.send_state(sender, seq, None);
        Ok(())
    }

    /// Committed certificates (pre-prepare and a quorum of commits) of the batches executed
    /// here from `from` on, in order, as far as this replica holds them.
    fn committed_certificates(&self, from: Seq) -> Vec<Certificate> {
        let mut committed = Vec::new();
        for seq in from..=self.executed {
            let quorum = self.group_at(seq).quorum();
            let Some(slot) = self.slots.get(&seq) else {
                break;
            };
            let (Some(pp), Some((view, digest))) = (&slot.pre_prepare, slot.proposal()) else {
                break;
            };
            committed.push(Certificate {
                proposal: pp.signed().clone(),
                votes: matching(&slot.commits, view, digest)
                    .take(quorum)
                    .map(|v| v.signed().clone())
                    .collect(),
            });
        }
        committed
    }

    fn on_state(&mut self, message: Verified) -> Result<(), Ignored> {
        let sender = message.sender();
        let Message::State {
            checkpoint,
            parts,
            snapshot,
            committed,
        } = message.message()
        else {
            return Err(Ignored::Invalid);
        };
        // An empty certificate is the genesis state: a reply that fills a gap above it.
        let seq = match checkpoint.first().map(|s| &s.message) {
            Some(Message::Checkpoint { seq, .. }) => *seq,
            None => 0,
            Some(_) => return Err(Ignored::Invalid),
        };
        let digest = match self.group_at(seq).checkpoint_cert(seq, checkpoint) {
            Some(d) => d,
            None => return Err(Ignored::Invalid),
        };
        let mut progress = false;
        if let Some(digest) = digest
            && !parts.is_empty()
            && self.wants_state(seq)
        {
            if state_digest_of_parts(seq, parts) != digest {
                return Err(Ignored::Invalid);
            }
            if let [part] = parts.as_slice() {
                if part_digest(snapshot) != *part {
                    return Err(Ignored::Invalid);
                }
                // Not over a transfer of a newer state.
                if self.transfer.as_ref().is_some_and(|t| t.seq >= seq) {
                    return Err(Ignored::Stale);
                }
                self.restore(seq, digest, checkpoint, parts.clone(), snapshot.clone())?;
            } else {
                if !snapshot.is_empty() {
                    return Err(Ignored::Invalid);
                }
                if !self.may_source(&sender, seq) {
                    return Err(Ignored::NotMember);
                }
                self.begin_transfer(sender, seq, digest, checkpoint, parts);
            }
            progress = true;
        }
        if !self.lost && self.fetching.is_some_and(|(want, _)| want <= self.executed) {
            self.fetching = None;
        }
        for cert in committed {
            let Some((_, s, _)) = self
                .group_at(cert.proposal.message.seq().unwrap_or(0))
                .certificate(cert, true)
            else {
                break;
            };
            if s <= self.executed {
                continue;
            }
            if !self.in_window(s) {
                break;
            }
            let slot = self.slots.entry(s).or_default();
            slot.pre_prepare = Some(Verified::trusted(cert.proposal.clone()));
            for vote in &cert.votes {
                slot.commits
                    .insert(vote.sender, Verified::trusted(vote.clone()));
            }
            progress = true;
        }
        let before = self.executed;
        self.execute_ready();
        if progress || self.executed > before {
            Ok(())
        } else {
            Err(Ignored::Stale)
        }
    }

    /// Whether this replica takes the certified state at `seq`: it has not executed that far,
    /// or its own state is lost and `seq` is at or above its low watermark.
    fn wants_state(&self, seq: Seq) -> bool {
        seq >= self.low && self.still_wants(seq)
    }

    /// Whether a transfer already under way for `seq` is still worth finishing: the state is
    /// ahead of what this replica executed (or its own is lost). Finished below the low
    /// watermark, it is the base whose unchanged parts the next transfer reuses.
    fn still_wants(&self, seq: Seq) -> bool {
        seq > self.executed || self.lost
    }

    /// Whether `id` may serve this replica a state: a member of the current group or of the
    /// group at `seq`.
    fn may_source(&self, id: &NodeId, seq: Seq) -> bool {
        self.group().contains(id) || self.group_at(seq).contains(id)
    }

    /// Installs the certified state at `seq` (digest, certificate, part digests and snapshot).
    fn restore(
        &mut self,
        seq: Seq,
        digest: Digest,
        checkpoint: &[Signed],
        parts: Vec<Digest>,
        snapshot: Bytes,
    ) -> Result<(), Ignored> {
        let Ok(restored) = Snapshot::decode(&snapshot) else {
            return Err(Ignored::Invalid);
        };
        self.transfer = None;
        if self.lost {
            // Execute the committed batches above `seq` again, on the agreed state.
            for (_, slot) in self.slots.range_mut(seq + 1..) {
                slot.executed = false;
            }
            self.snapshots.retain(|s, _| *s < seq);
            self.core_at.retain(|s, _| *s < seq);
            self.lost = false;
        }
        self.executed = seq;
        self.last_executed = restored.last_executed;
        self.groups = restored.groups;
        self.release_all();
        self.snapshots.insert(
            seq,
            OwnSnapshot {
                digest,
                bytes: snapshot,
                parts,
            },
        );
        self.outputs.push_back(Output::Restore {
            seq,
            snapshot: restored.app,
        });
        let cert: Vec<Verified> = checkpoint.iter().cloned().map(Verified::trusted).collect();
        self.stabilize(seq, cert.clone(), digest);
        if seq == self.low {
            self.stable_digest = Some(digest);
            // This replica may have judged `seq` stable on a certificate sized for a group
            // it had not yet seen change (a joiner learns the change only from the state):
            // keep the transferred certificate if it holds under the restored groups, so
            // that the view changes it sends are valid for the others.
            if let Some(Some(d)) = self.group_at(seq).checkpoint_cert(seq, checkpoint)
                && d == digest
            {
                self.stable = cert;
            }
        }
        self.held_parts.clear();
        if !self.lost && self.fetching.is_some_and(|(want, _)| want <= self.executed) {
            self.fetching = None;
        }
        if self.executed < self.low {
            // Restored a transfer finished below the low watermark: it is the base of the next
            // one, whose unchanged parts need not travel (our snapshot below the watermark may
            // be dropped before the next state reply comes).
            if let Some(own) = self.snapshots.get(&seq) {
                let part_bytes = self.config.state_part_bytes;
                self.held_parts = own
                    .parts
                    .iter()
                    .enumerate()
                    .filter_map(|(i, d)| {
                        let range =
                            part_range(own.bytes.len(), part_bytes, u32::try_from(i).ok()?)?;
                        Some((*d, own.bytes.slice(range)))
                    })
                    .collect();
            }
        }
        if self.executed < self.low && self.fetching.is_none() {
            // Restored a transfer finished below the low watermark: on to the stable state.
            self.fetching = Some((self.low, self.now));
            self.broadcast(Message::FetchState { seq: self.low });
        }
        Ok(())
    }

    /// A state reply with `parts` (more than one) for the certified state at `seq`: fetch the
    /// parts from `sender` and every other replica that sends the same digests. A transfer
    /// in progress gives way to a newer state unless more than f of its sources are live (so
    /// a correct one) and it has not stalled (see [`crate::transfer`]): faulty replicas that
    /// alone offer an older certified state, or trickle its parts, cannot hold a replica back.
    fn begin_transfer(
        &mut self,
        sender: NodeId,
        seq: Seq,
        digest: Digest,
        checkpoint: &[Signed],
        parts: &[Digest],
    ) {
        let (now, delay) = (self.now, self.config.state_transfer_delay);
        let keep = self.transfer.as_ref().is_some_and(|t| {
            // Live sources of the current group only: removed replicas count for nothing.
            let group = self.group();
            let live = t.live_sources(|id| group.contains(id));
            self.still_wants(t.seq)
                && (seq <= t.seq || (live > group.f() && !t.stalled(now, delay)))
        });
        match &mut self.transfer {
            Some(t) if t.is_of(seq, digest) => t.add_source(sender, now),
            Some(_) if keep => {}
            _ => {
                if let Some(old) = self.transfer.take() {
                    self.held_parts.extend(old.into_held());
                }
                // Parts unchanged since our newest snapshot, or held by a transfer that gave
                // way, need not travel again (each is checked against its digest).
                let part_bytes = self.config.state_part_bytes;
                let own = self.snapshots.values().next_back();
                let own_parts: BTreeMap<&Digest, usize> = own
                    .map(|o| o.parts.iter().enumerate().map(|(i, d)| (d, i)).collect())
                    .unwrap_or_default();
                let held = &self.held_parts;
                let reuse = |_: usize, d: &Digest| {
                    if let Some(p) = held.get(d) {
                        return Some(p.clone());
                    }
                    let (own, i) = (own?, *own_parts.get(d)?);
                    let range = part_range(own.bytes.len(), part_bytes, u32::try_from(i).ok()?)?;
                    Some(own.bytes.slice(range))
                };
                let t = Transfer::new(
                    seq,
                    digest,
                    checkpoint.to_vec(),
                    parts.to_vec(),
                    part_bytes,
                    sender,
                    now,
                    reuse,
                );
                self.held_parts.clear();
                self.transfer = Some(t);
            }
        }
        self.advance_transfer();
    }

    /// Asks for the parts due now, or installs the state once every part is held.
    fn advance_transfer(&mut self) {
        let Some(seq) = self.transfer.as_ref().map(|t| t.seq) else {
            return;
        };
        if !self.still_wants(seq) {
            // Caught up otherwise: its parts are of a state behind us.
            self.transfer = None;
            self.held_parts.clear();
            return;
        }
        let Some(t) = &mut self.transfer else {
            return;
        };
        if t.is_complete() {
            let Some(t) = self.transfer.take() else {
                return;
            };
            let (seq, digest, checkpoint) = (t.seq, t.digest, t.checkpoint.clone());
            let (parts, snapshot) = t.assemble();
            if self
                .restore(seq, digest, &checkpoint, parts, snapshot)
                .is_err()
            {
                tracing::warn!(seq, "a certified state does not decode");
            }
            self.execute_ready();
            return;
        }
        let (seq, state) = (t.seq, t.digest);
        for (to, index) in t.requests(self.now, self.config.state_transfer_delay) {
            let message = self.signer.sign(Message::FetchPart { seq, state, index });
            self.outputs.push_back(Output::Send { to, message });
        }
    }

    /// Part `index` of the state `state` at `seq`, from `sender`.
    fn on_part(
        &mut self,
        sender: NodeId,
        seq: Seq,
        state: Digest,
        index: u32,
        bytes: Bytes,
    ) -> Result<(), Ignored> {
        let now = self.now;
        if !self.may_source(&sender, seq) {
            return Err(Ignored::NotMember);
        }
        let Some(t) = self.transfer.as_mut() else {
            return Err(Ignored::Stale);
        };
        if !t.is_of(seq, state) {
            // For a transfer this one replaced: still good if it is a part this one lacks.
            return if t.take_matching(bytes, now) {
                self.advance_transfer();
                Ok(())
            } else {
                Err(Ignored::Stale)
            };
        }
        match t.on_part(sender, index, bytes, now) {
            Ok(()) => {
                self.advance_transfer();
                Ok(())
            }
            Err(PartRefused::Stale) => Err(Ignored::Stale),
            Err(PartRefused::Wrong) => {
                self.advance_transfer();
                Err(Ignored::Invalid)
            }
        }
    }

    /// A membership command executed at `executed_at` replaces the group with `members` for
    /// sequence numbers above the returned one (`executed_at + window`, rounded up to a
    /// checkpoint). Call it, identically at every replica, when the command executes, before
    /// the next output.
    ///
    /// # Errors
    /// [`ReconfigureError`] if `executed_at` is not executed here or the group is malformed.
    pub fn reconfigure(
        &mut self,
        members: Vec<NodeId>,
        executed_at: Seq,
    ) -> Result<Seq, ReconfigureError> {
        if executed_at > self.executed || executed_at == 0 {
            return Err(ReconfigureError::NotExecuted(executed_at));
        }
        let distinct: std::collections::BTreeSet<_> = members.iter().collect();
        if members.is_empty() || distinct.len() != members.len() {
            return Err(ReconfigureError::BadGroup);
        }
        let interval = self.config.checkpoint_interval.max(1);
        let from = executed_at
            .saturating_add(self.config.window)
            .div_ceil(interval)
            .saturating_mul(interval);
        self.groups.insert(from, members.clone());
        // Checkpoints at or after the command, whose snapshot is still to be taken, include it.
        for (seq, (groups, _)) in self.core_at.iter_mut() {
            if *seq >= executed_at {
                groups.insert(from, members.clone());
            }
        }
        Ok(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{KeyRing, Limits};
    use crate::service::Executor;
    use crate::sim::Chain;

    type Filter = Box<dyn Fn(usize, usize, &Message) -> bool>;

    /// Replicas connected by a FIFO network through the real codec and key ring; `cut`
    /// decides which messages are lost.
    #[test]
    fn requests_the_check_refuses_are_neither_held_nor_prepared() {
        let mut c = Cluster::new(4, |cfg| {
            cfg.request_check = Some(RequestCheck::new(|r| &r.payload[..] != b"forged"));
        });
        let client = c.replicas[3].id();
        let request = |payload: &'static [u8]| Request {
            client,
            number: 1,
            payload: Bytes::from_static(payload),
        };
        assert_eq!(
            c.replicas[1].handle_request(request(b"forged"), Duration::ZERO),
            Err(Ignored::Invalid)
        );
        // A primary that proposes one: the backup does not prepare it.
        let propose = |c: &Cluster, seq: Seq, payload: &'static [u8]| {
            let batch = vec![request(payload)];
            c.signers[0].sign(Message::PrePrepare {
                view: 0,
                seq,
                digest: batch_digest(&batch),
                batch,
            })
        };
        let forged = propose(&c, 1, b"forged");
        assert_eq!(c.deliver(1, &forged.encode()), Err(Ignored::Invalid));
        assert!(
            c.journals[1].is_empty(),
            "nothing journaled, no prepare sent"
        );
        let fine = propose(&c, 1, b"put");
        assert_eq!(c.deliver(1, &fine.encode()), Ok(()));
        // A request from the client's own channel is held unchecked (the channel vouches
        // for it), but a primary checks it before it proposes it: the forged one never goes
        // out, the good one does.
        let mut vouched = request(b"forged");
        vouched.number = 2;
        assert_eq!(
            c.replicas[2].handle_authenticated_request(vouched.clone(), Duration::ZERO),
            Ok(())
        );
        while c.replicas[0].poll_output().is_some() {}
        assert_eq!(
            c.replicas[0].handle_authenticated_request(vouched, Duration::ZERO),
            Ok(())
        );
        let mut good = request(b"put");
        good.number = 3;
        assert_eq!(
            c.replicas[0].handle_authenticated_request(good, Duration::from_millis(5)),
            Ok(())
        );
        c.replicas[0].handle_tick(Duration::from_millis(50));
        let proposed: Vec<Vec<u8>> = proposed(&mut c.replicas[0])
            .into_iter()
            .map(|r| r.payload.to_vec())
            .collect();
        assert_eq!(
            proposed,
            vec![b"put".to_vec()],
            "only the request that passes"
        );
        // A forwarded request is checked when it arrives: a faulty replica that forwards a
        // forged one under a client's number does not take that number from the client.
        let mut forged = request(b"forged");
        forged.number = 9;
        let forward = c.signers[2].sign(Message::Forward {
            requests: vec![forged],
        });
        assert_eq!(c.deliver(1, &forward.encode()), Err(Ignored::Stale));
        let mut real = request(b"put");
        real.number = 9;
        assert_eq!(
            c.replicas[1].handle_authenticated_request(real, Duration::from_millis(60)),
            Ok(())
        );
    }

    /// The requests of the pre-prepares `r` put out since its outputs were last taken.
    fn proposed(r: &mut Replica) -> Vec<Request> {
        std::iter::from_fn(|| r.poll_output())
            .filter_map(|o| match o {
                Output::Broadcast(s) => match s.message {
                    Message::PrePrepare { batch, .. } => Some(batch),
                    _ => None,
                },
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn a_bad_copy_neither_keeps_a_good_request_out_nor_junk_fills_the_hold() {
        let mut c = Cluster::new(4, |cfg| {
            cfg.request_check = Some(RequestCheck::new(|r| &r.payload[..] != b"forged"));
            cfg.max_pending = 4;
        });
        let client = c.replicas[3].id();
        let request = |number: u64, payload: &'static [u8]| Request {
            client,
            number,
            payload: Bytes::from_static(payload),
        };
        // The client sends the primary a badly signed copy and the backups a good one; a
        // backup's timer forwards the good one. The primary checks its unchecked copy, drops
        // it and takes the good one (it used to answer Stale, and the backups changed views).
        assert_eq!(
            c.replicas[0].handle_authenticated_request(request(1, b"forged"), Duration::ZERO),
            Ok(())
        );
        let forward = c.signers[2].sign(Message::Forward {
            requests: vec![request(1, b"put")],
        });
        assert_eq!(c.deliver(0, &forward.encode()), Ok(()));
        // Forwarding it again, or the client's own copies, change nothing.
        assert_eq!(c.deliver(0, &forward.encode()), Err(Ignored::Stale));
        c.replicas[0].handle_tick(Duration::from_millis(50));
        let proposed: Vec<(u64, Vec<u8>)> = proposed(&mut c.replicas[0])
            .into_iter()
            .map(|r| (r.number, r.payload.to_vec()))
            .collect();
        assert_eq!(proposed, vec![(1, b"put".to_vec())], "once, the good copy");
        // Junk from a client's channel is held unchecked only while the hold is less than
        // half full; beyond, it is checked on arrival and refused, and good requests get in.
        let b = &mut c.replicas[1];
        for n in 10..12 {
            assert_eq!(
                b.handle_authenticated_request(request(n, b"forged"), Duration::ZERO),
                Ok(())
            );
        }
        assert_eq!(
            b.handle_authenticated_request(request(12, b"forged"), Duration::ZERO),
            Err(Ignored::Invalid)
        );
        assert_eq!(
            b.handle_authenticated_request(request(13, b"put"), Duration::ZERO),
            Ok(())
        );
        assert_eq!(b.pending_requests(), 3);
    }

    #[test]
    fn a_primary_that_orders_everything_but_one_request_is_replaced() {
        // Replica 0, the primary of view 0, never takes client 9's request (neither from the
        // client nor forwarded) and goes on ordering client 1's, a batch every 30 ms, well
        // within the 100 ms timeout.
        let mut c = Cluster::new(4, |_| {});
        c.cut = Box::new(|_, to, m| to == 0 && matches!(m, Message::Forward { .. }));
        let censored = Request {
            client: NodeId::from_bytes([9; 32]),
            number: 1,
            payload: Bytes::from_static(b"censored"),
        };
        let load = |c: &mut Cluster, numbers: std::ops::RangeInclusive<u64>| {
            for k in numbers {
                c.submit(1, k);
                c.run_for(Duration::from_millis(30));
            }
        };
        // The control: a primary that orders everything keeps its view under the same load.
        load(&mut c, 1..=10);
        assert!(c.replicas.iter().all(|r| r.view() == 0));
        for i in 1..4 {
            c.replicas[i]
                .handle_request(censored.clone(), c.now)
                .unwrap();
            c.drain(i);
        }
        load(&mut c, 11..=30);
        for (i, r) in c.replicas.iter().enumerate() {
            assert!(r.view() >= 1, "replica {i} left view 0");
            assert_eq!(
                r.last_executed.get(&censored.client),
                Some(&1),
                "replica {i}"
            );
            assert_eq!(r.pending_requests(), 0);
        }
        assert_eq!(
            c.replicas[1]
                .last_executed
                .get(&NodeId::from_bytes([1; 32])),
            Some(&30)
        );
        assert_agree(&c, &[0, 1, 2, 3]);
    }

    #[test]
    fn a_replica_flooding_later_views_fills_only_its_own_share() {
        let mut c = Cluster::new(4, |cfg| cfg.max_held_bytes = 1 << 20);
        // Replica 3 (the primary of view 3) sends big pre-prepares for view 3, and prepares
        // for ever higher views, to replica 1 in view 0. The payload is shared, so the test
        // itself stays small.
        let payload = Bytes::from(vec![7u8; 64 * 1024]);
        let big = |c: &Cluster, seq: Seq| {
            let batch: Vec<Request> = (0..4)
                .map(|k| Request {
                    client: NodeId::from_bytes([k; 32]),
                    number: seq,
                    payload: payload.clone(),
                })
                .collect();
            Verified::trusted(c.signers[3].sign(Message::PrePrepare {
                view: 3,
                seq,
                digest: batch_digest(&batch),
                batch,
            }))
        };
        let mut held = 0;
        for seq in 1..=64 {
            let m = big(&c, seq);
            if c.replicas[1].handle_message(m).is_ok() {
                held += 1;
            }
        }
        assert!(
            held <= 4,
            "1 MiB holds four 256 KiB pre-prepares, not {held}"
        );
        for view in 4..2000 {
            let m = c.signers[3].sign(Message::Prepare {
                view,
                seq: 1 + view % 64,
                digest: batch_digest(&[]),
            });
            let _ = c.replicas[1].handle_message(Verified::trusted(m));
        }
        // Only its latest view is kept, within its share; nothing made replica 1 move.
        assert!(c.replicas[1].held_for_next_window() <= c.replicas[1].hold_limits().messages);
        assert_eq!(c.replicas[1].view(), 0);
        // A pre-prepare for view 2 from replica 3, which is not its primary, is not held.
        let wrong = c.signers[3].sign(Message::PrePrepare {
            view: 2,
            seq: 1,
            digest: batch_digest(&[]),
            batch: vec![],
        });
        assert_eq!(
            c.replicas[1].handle_message(Verified::trusted(wrong)),
            Err(Ignored::NotPrimary)
        );
        // An honest replica's message for a later view is still held.
        let honest = c.signers[2].sign(Message::Prepare {
            view: 1,
            seq: 1,
            digest: batch_digest(&[]),
        });
        assert_eq!(
            c.replicas[1].handle_message(Verified::trusted(honest)),
            Ok(())
        );
    }

    #[test]
    fn a_pre_prepare_with_a_request_twice_or_too_many_is_refused() {
        let mut c = Cluster::new(4, |_| {});
        let request = |number| Request {
            client: NodeId::from_bytes([1; 32]),
            number,
            payload: Bytes::new(),
        };
        let propose = |c: &Cluster, batch: Vec<Request>| {
            c.signers[0].sign(Message::PrePrepare {
                view: 0,
                seq: 1,
                digest: batch_digest(&batch),
                batch,
            })
        };
        let twice = propose(&c, vec![request(1), request(1)]);
        assert_eq!(c.deliver(1, &twice.encode()), Err(Ignored::Invalid));
        let too_many = propose(&c, (1..=5).map(request).collect());
        assert_eq!(c.deliver(1, &too_many.encode()), Err(Ignored::Invalid));
        let fine = propose(&c, (1..=4).map(request).collect());
        assert_eq!(c.deliver(1, &fine.encode()), Ok(()));
    }

    #[test]
    fn messages_built_to_cost_verification_are_refused_before_it() {
        let c = Cluster::new(4, |_| {});
        let r = &c.replicas[2];
        let vc = |from: usize| {
            c.signers[from].sign(Message::ViewChange {
                view: 1,
                stable: 0,
                checkpoint: vec![],
                prepared: vec![],
            })
        };
        let new_view = |from: usize, count: usize| {
            c.signers[from].sign(Message::NewView {
                view: 1,
                view_changes: (0..count).map(|k| vc(k % 4)).collect(),
                pre_prepares: vec![],
            })
        };
        // The accepted case: the primary of view 1, with n view changes.
        assert_eq!(r.admissible(&new_view(1, 4)), Ok(()));
        // Thousands of nested view changes (each one more signature to check): refused unread.
        assert_eq!(r.admissible(&new_view(1, 4000)), Err(Ignored::Invalid));
        // From a replica that is no view's primary for view 1.
        assert_eq!(r.admissible(&new_view(3, 4)), Err(Ignored::NotPrimary));
        // A certificate with more votes than replicas, inside a view change.
        let pp = c.signers[0].sign(Message::PrePrepare {
            view: 0,
            seq: 1,
            digest: batch_digest(&[]),
            batch: vec![],
        });
        let vote = c.signers[1].sign(Message::Prepare {
            view: 0,
            seq: 1,
            digest: batch_digest(&[]),
        });
        let stuffed = c.signers[3].sign(Message::ViewChange {
            view: 1,
            stable: 0,
            checkpoint: vec![],
            prepared: vec![Certificate {
                proposal: pp.clone(),
                votes: vec![vote.clone(); 500],
            }],
        });
        assert_eq!(r.admissible(&stuffed), Err(Ignored::Invalid));
        let fine = c.signers[3].sign(Message::ViewChange {
            view: 1,
            stable: 0,
            checkpoint: vec![],
            prepared: vec![Certificate {
                proposal: pp,
                votes: vec![vote; 2],
            }],
        });
        assert_eq!(r.admissible(&fine), Ok(()));
        // From outside every known group.
        let outsider = Signer::named("outsider");
        let stranger = outsider.sign(Message::FetchState { seq: 1 });
        assert_eq!(r.admissible(&stranger), Err(Ignored::NotMember));
    }

    #[test]
    fn one_client_cannot_fill_the_hold_for_the_others() {
        let mut c = Cluster::new(4, |cfg| cfg.max_pending_per_client = 3);
        let request = |client, number| Request {
            client: NodeId::from_bytes([client; 32]),
            number,
            payload: Bytes::new(),
        };
        for n in 1..=3 {
            assert_eq!(c.replicas[1].handle_request(request(1, n), c.now), Ok(()));
        }
        assert_eq!(
            c.replicas[1].handle_request(request(1, 4), c.now),
            Err(Ignored::Busy)
        );
        assert_eq!(c.replicas[1].handle_request(request(2, 1), c.now), Ok(()));
        assert_eq!(c.replicas[1].pending_requests(), 4);
        // A request another replica forwards (its timer expired there) is taken beyond the
        // client's share, up to twice it: a client that keeps its share full here cannot make
        // this replica refuse what a backup forwards.
        let forward = |c: &Cluster, numbers: std::ops::RangeInclusive<u64>| {
            Verified::trusted(c.signers[2].sign(Message::Forward {
                requests: numbers.map(|n| request(1, n)).collect(),
            }))
        };
        let m = forward(&c, 4..=6);
        assert_eq!(c.replicas[1].handle_message(m), Ok(()));
        let m = forward(&c, 7..=7);
        assert_eq!(c.replicas[1].handle_message(m), Err(Ignored::Stale));
        assert_eq!(c.replicas[1].pending_requests(), 7);
    }

    #[test]
    fn a_replica_outside_the_group_sets_no_request_timer() {
        let c = Cluster::new(4, |_| {});
        let outsider = Signer::named("joiner");
        let mut joiner = Replica::new(c.replicas[0].config.clone(), outsider);
        let r = Request {
            client: NodeId::from_bytes([1; 32]),
            number: 1,
            payload: Bytes::new(),
        };
        assert_eq!(joiner.handle_request(r, Duration::ZERO), Ok(()));
        // It holds the request, but it is not a member: no deadline it would not act on (the
        // driver would spin on one in the past).
        assert_eq!(joiner.next_deadline(), None);
        let mut member = Replica::new(
            c.replicas[0].config.clone(),
            Signer::new_from(&c.signers[1]),
        );
        let r = Request {
            client: NodeId::from_bytes([1; 32]),
            number: 1,
            payload: Bytes::new(),
        };
        member.handle_request(r, Duration::ZERO).unwrap();
        assert!(member.next_deadline().is_some());
    }

    #[test]
    fn a_replica_with_a_full_buffer_of_later_views_still_catches_up() {
        let mut c = Cluster::new(4, |cfg| cfg.window = 4);
        let limits = c.replicas[3].hold_limits();
        // Replicas 1 and 2 (f+1) are in view 1; replica 3 buffered their messages while it
        // did not follow views (a replica not yet a member): their shares are full.
        let prepare = |c: &Cluster, from: usize, seq: Seq| {
            Verified::trusted(c.signers[from].sign(Message::Prepare {
                view: 1,
                seq,
                digest: batch_digest(&[]),
            }))
        };
        for k in 0..2 * limits.messages {
            let m = prepare(&c, 1 + k % 2, 1 + (k as Seq % 4));
            c.replicas[3].ahead.insert(m, limits).unwrap();
        }
        assert_eq!(c.replicas[3].view(), 0);
        let more = c.signers[1].sign(Message::Commit {
            view: 1,
            seq: 1,
            digest: batch_digest(&[]),
        });
        assert_eq!(c.deliver(3, &more.encode()), Err(Ignored::Busy));
        assert_eq!(
            c.replicas[3].view(),
            1,
            "it follows f+1 replicas into view 1"
        );
    }

    struct Cluster {
        replicas: Vec<Replica>,
        signers: Vec<Signer>,
        ring: KeyRing,
        inbox: VecDeque<(usize, Vec<u8>)>,
        log: Vec<Vec<(Seq, Digest)>>,
        apps: Vec<Executor<Chain>>,
        restores: usize,
        now: Duration,
        cut: Filter,
        journals: Vec<Vec<Record>>,
        /// Replica `i` does not execute the batch at `seq`; with `true` it knows and reports
        /// its state lost at the next checkpoint, with `false` its state silently diverges.
        skip: Option<(usize, Seq, bool)>,
        diverged: Vec<bool>,
    }

    fn config(replicas: Vec<NodeId>) -> Config {
        let mut c = Config::new(replicas);
        c.max_batch = 4;
        c.batch_delay = Duration::from_millis(5);
        // These tests cut batches by size and time; `a_lone_request_goes_out_at_once` covers
        // adaptive batching.
        c.propose_when_idle = false;
        c.window = 64;
        c.checkpoint_interval = 2;
        c.view_change_timeout = Duration::from_millis(100);
        c.state_transfer_delay = Duration::from_millis(50);
        c
    }

    impl Cluster {
        fn new(n: usize, tune: impl Fn(&mut Config)) -> Self {
            let signers: Vec<Signer> = (0..n).map(|i| Signer::named(&format!("r{i}"))).collect();
            let ring = KeyRing::new(signers.iter().map(|s| (s.id(), s.public_key().unwrap())));
            let mut cfg = config(signers.iter().map(Signer::id).collect());
            tune(&mut cfg);
            Cluster {
                replicas: signers
                    .iter()
                    .map(|s| Replica::new(cfg.clone(), Signer::new_from(s)))
                    .collect(),
                signers,
                ring,
                inbox: VecDeque::new(),
                log: vec![Vec::new(); n],
                apps: (0..n).map(|_| Executor::new(Chain::default())).collect(),
                restores: 0,
                now: Duration::ZERO,
                cut: Box::new(|_, _, _| false),
                journals: vec![Vec::new(); n],
                skip: None,
                diverged: vec![false; n],
            }
        }

        fn index(&self, id: NodeId) -> usize {
            self.replicas.iter().position(|r| r.id() == id).unwrap()
        }

        fn post(&mut self, from: usize, to: usize, s: &Signed) {
            if !(self.cut)(from, to, &s.message) {
                self.inbox.push_back((to, s.encode()));
            }
        }

        fn drain(&mut self, i: usize) {
            while let Some(out) = self.replicas[i].poll_output() {
                match out {
                    Output::Broadcast(s) => {
                        for to in (0..self.replicas.len()).filter(|t| *t != i) {
                            self.post(i, to, &s);
                        }
                    }
                    Output::Send { to, message } => {
                        let to = self.index(to);
                        self.post(i, to, &message);
                    }
                    Output::Execute { seq, digest, batch } => {
                        self.log[i].push((seq, digest));
                        if self.skip.is_some_and(|(r, s, _)| (r, s) == (i, seq)) {
                            self.diverged[i] = true;
                        } else {
                            self.apps[i].execute(&batch);
                        }
                    }
                    Output::CheckpointDue { seq } => {
                        if self.diverged[i] && self.skip.is_some_and(|(_, _, knows)| knows) {
                            self.replicas[i].handle_state_lost(seq);
                        } else {
                            let snap = self.apps[i].snapshot();
                            self.replicas[i].handle_checkpoint_state(seq, snap);
                        }
                    }
                    Output::Restore { snapshot, .. } => {
                        self.restores += 1;
                        self.diverged[i] = false;
                        self.apps[i].restore(&snapshot).unwrap();
                    }
                    Output::ViewEntered { .. } => {}
                    Output::Persist(r) => self.journals[i].push(r),
                }
            }
        }

        fn deliver(&mut self, to: usize, bytes: &[u8]) -> Result<(), Ignored> {
            let signed = Signed::decode(bytes, &Limits::default()).unwrap();
            let v = self.ring.verify(signed).unwrap();
            let r = self.replicas[to].handle_message(v);
            self.drain(to);
            r
        }

        fn settle(&mut self) {
            while let Some((to, bytes)) = self.inbox.pop_front() {
                let _ = self.deliver(to, &bytes);
            }
        }

        fn submit(&mut self, client: u8, number: u64) {
            let r = Request {
                client: NodeId::from_bytes([client; 32]),
                number,
                payload: Bytes::from(number.to_be_bytes().to_vec()),
            };
            for i in 0..self.replicas.len() {
                let _ = self.replicas[i].handle_request(r.clone(), self.now);
                self.drain(i);
            }
        }

        /// A client request that reaches the replicas `to` only, over the client's channel (as
        /// from a client that follows a roster without the others).
        fn request_to(&mut self, to: std::ops::Range<usize>) {
            let request = Request {
                client: NodeId::from_bytes([2; 32]),
                number: 1,
                payload: Bytes::from_static(b"put"),
            };
            for i in to {
                self.replicas[i]
                    .handle_authenticated_request(request.clone(), self.now)
                    .unwrap();
                self.drain(i);
            }
        }

        /// Advances time in 1 ms steps, delivering everything after each.
        fn run_for(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += Duration::from_millis(1);
                for i in 0..self.replicas.len() {
                    self.replicas[i].handle_tick(self.now);
                    self.drain(i);
                }
                self.settle();
            }
        }
    }

    /// No two replicas executed different batches at one sequence number.
    fn assert_agree(c: &Cluster, who: &[usize]) {
        let mut at = BTreeMap::new();
        for &i in who {
            for (seq, d) in &c.log[i] {
                assert_eq!(*at.entry(*seq).or_insert(*d), *d, "two batches at {seq}");
            }
        }
    }

    #[test]
    fn batches_are_cut_by_size_and_by_time() {
        let mut c = Cluster::new(4, |_| {});
        c.submit(1, 1);
        c.settle();
        assert!(
            c.log.iter().all(Vec::is_empty),
            "nothing before the batch delay"
        );
        c.run_for(Duration::from_millis(10));
        assert!(c.log.iter().all(|l| l.len() == 1));
        for k in 0..8 {
            c.submit(2, 10 + k); // two full batches at once
        }
        c.settle();
        assert!(c.log.iter().all(|l| l.len() == 3));
    }

    /// Adaptive batching: with nothing in flight the primary proposes a lone request at once
    /// (no batch delay); what arrives while a batch is in flight waits for it, and goes out
    /// together when it executes.
    #[test]
    fn a_lone_request_goes_out_at_once() {
        let mut c = Cluster::new(4, |cfg| cfg.propose_when_idle = true);
        c.submit(1, 1);
        c.settle();
        assert!(
            c.log.iter().all(|l| l.len() == 1),
            "ordered without waiting for the batch delay"
        );
        // Three requests in a row: the first goes out alone, the next two queue behind it
        // and form one batch when it executes.
        c.submit(2, 1);
        c.submit(3, 1);
        c.submit(4, 1);
        c.settle();
        assert!(c.log.iter().all(|l| l.len() == 3), "{:?}", c.log[0]);
        assert_agree(&c, &[0, 1, 2, 3]);
    }

    /// A primary whose batch in flight does not execute here (its commits for it are lost)
    /// holds what queued behind it for a quarter of the view-change timeout at most, and goes
    /// on ordering: the backups need no view change. (Held until the batch executes, the
    /// requests waited for the backups' timers.)
    #[test]
    fn a_primary_whose_batch_does_not_execute_here_goes_on_ordering() {
        let mut c = Cluster::new(4, |cfg| cfg.propose_when_idle = true);
        c.cut = Box::new(|_, to, m| to == 0 && matches!(m, Message::Commit { seq: 1, .. }));
        c.submit(1, 1);
        c.settle();
        assert!(
            c.log[0].is_empty(),
            "the primary lacks the commits of seq 1"
        );
        assert!(c.log[1..].iter().all(|l| l.len() == 1));
        c.submit(2, 1);
        // view_change_timeout is 100 ms in these tests: well before it, the request went out.
        c.run_for(Duration::from_millis(40));
        assert!(
            c.log[1..].iter().all(|l| l.len() == 2),
            "the second batch is ordered: {:?}",
            c.log.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert!(c.replicas.iter().all(|r| r.view() == 0), "no view change");
    }

    /// A cluster of `n` that executed one request and ordered the removal of its first
    /// `leaving` replicas (the primary among them), not in effect yet.
    fn leaving_cluster(n: usize, leaving: usize) -> Cluster {
        let mut c = Cluster::new(n, |cfg| cfg.propose_when_idle = true);
        c.submit(1, 1);
        c.settle();
        assert!(c.log.iter().all(|l| l.len() == 1));
        let staying: Vec<NodeId> = c.replicas[leaving..].iter().map(Replica::id).collect();
        for r in &mut c.replicas {
            r.reconfigure(staying.clone(), 1).unwrap();
        }
        c
    }

    /// The primary's removal is ordered but not in effect yet, and the clients, which follow
    /// the new roster, send to the backups only: a backup forwards each request to the
    /// primary at once, so that it is ordered long before a timer would have forwarded it
    /// (one closed-loop client crawled at one request per forward timer: the demo's read-back
    /// in CI timed out), and no view changes.
    #[test]
    fn a_leaving_primary_gets_the_requests_its_clients_no_longer_send_it() {
        let mut c = leaving_cluster(4, 1);
        assert_eq!(
            c.replicas[1].primary(),
            Some(c.replicas[0].id()),
            "still the primary"
        );
        let forwards = std::rc::Rc::new(std::cell::Cell::new([0usize; 3]));
        let seen = std::rc::Rc::clone(&forwards);
        c.cut = Box::new(move |from, _, m| {
            if matches!(m, Message::Forward { .. }) && (1..4).contains(&from) {
                let mut n = seen.get();
                n[from - 1] += 1;
                seen.set(n);
            }
            false
        });
        c.request_to(1..4);
        // view_change_timeout is 100 ms in these tests.
        c.run_for(Duration::from_millis(20));
        assert!(
            c.log.iter().all(|l| l.len() == 2),
            "ordered without waiting for a timer: {:?}",
            c.log.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert!(c.replicas.iter().all(|r| r.view() == 0), "no view change");
        assert_agree(&c, &[0, 1, 2, 3]);
        assert_eq!(
            forwards.get(),
            [1, 1, 0],
            "f + 1 backups forward, once each"
        );
    }

    /// Two replicas leave, the primary and the backup after it: the clients reach neither, so
    /// the forwarders are the f + 1 backups after the primary that stay. With one of them
    /// faulty (it forwards nothing) the other still brings each request to the primary at
    /// once. (Counted from the whole group, the leaving backup would be one of the two.)
    #[test]
    fn the_forwarders_to_a_leaving_primary_are_backups_the_clients_still_reach() {
        let mut c = leaving_cluster(5, 2);
        c.cut = Box::new(|from, _, m| from == 2 && matches!(m, Message::Forward { .. }));
        c.request_to(2..5);
        c.run_for(Duration::from_millis(20));
        assert!(
            c.log.iter().all(|l| l.len() == 2),
            "ordered at once: {:?}",
            c.log.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_agree(&c, &[0, 1, 2, 3, 4]);
    }

    /// A leaving primary that ignores the requests the backups send it at once is replaced
    /// after one timeout (a request from its own clients would have had two). With f = 1 the
    /// f + 1 forwarders' view changes take the others along; with a larger f, up to f - 1 of
    /// the forwarders may be faulty, and the others follow at their own second expiry.
    #[test]
    fn a_leaving_primary_that_ignores_forwarded_requests_is_replaced_after_one_timeout() {
        let mut c = leaving_cluster(4, 1);
        c.cut = Box::new(|_, to, m| to == 0 && matches!(m, Message::Forward { .. }));
        c.request_to(1..4);
        // view_change_timeout is 100 ms: two of them would be 200 ms.
        c.run_for(Duration::from_millis(160));
        assert!(
            c.replicas[1..].iter().all(|r| r.view() >= 1),
            "the backups left the leaving primary's view"
        );
        assert!(
            c.log[1..].iter().all(|l| l.len() == 2),
            "ordered in the next view: {:?}",
            c.log.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_agree(&c, &[0, 1, 2, 3]);
    }

    #[test]
    fn stable_checkpoints_move_the_window_and_bound_the_log() {
        let mut c = Cluster::new(4, |cfg| cfg.window = 4);
        for i in 1..=40 {
            c.submit(1, i); // ten batches of four, only four slots above the low watermark
        }
        c.run_for(Duration::from_millis(50));
        assert_agree(&c, &[0, 1, 2, 3]);
        for (i, r) in c.replicas.iter().enumerate() {
            assert_eq!(c.log[i].len(), 10, "ten batches need the window to move");
            assert_eq!(r.low_watermark(), 10);
            assert!(
                r.slots_held() <= 4,
                "slots above the last stable checkpoint only"
            );
            let cert = r.stable_certificate();
            assert!(cert.len() >= 3, "2f+1 signed checkpoints prove the state");
            let states: std::collections::BTreeSet<_> =
                cert.iter().map(|v| format!("{:?}", v.message())).collect();
            assert_eq!(states.len(), 1, "the certificate's checkpoints match");
        }
        assert_eq!(c.apps[0].app(), c.apps[3].app());
    }

    /// A replica whose application could not execute a batch (it says so, or its checkpoint
    /// simply differs) fetches the agreed state at the next stable checkpoint, executes the
    /// batches above it again, and ends with the same state as the others.
    #[test]
    fn a_replica_with_a_lost_or_diverged_state_fetches_the_agreed_one() {
        for knows in [true, false] {
            let mut c = Cluster::new(4, |_| {});
            c.skip = Some((3, 3, knows));
            for n in 1..=24 {
                c.submit(1, n);
                c.run_for(Duration::from_millis(10));
            }
            c.run_for(Duration::from_millis(200));
            assert_agree(&c, &[0, 1, 2, 3]);
            assert!(c.restores > 0, "knows={knows}: a state transfer");
            assert!(!c.diverged[3] && !c.replicas[3].state_lost());
            assert_eq!(c.apps[3].app(), c.apps[0].app(), "knows={knows}");
            assert_eq!(c.apps[3].app(), c.apps[1].app(), "knows={knows}");
        }
    }

    /// The stable checkpoint of replica `i`: its sequence number and state digest.
    fn stable_of(c: &Cluster, i: usize) -> (Seq, Digest) {
        match c.replicas[i]
            .stable_certificate()
            .first()
            .map(|v| v.message())
        {
            Some(Message::Checkpoint { seq, state }) => (*seq, *state),
            _ => panic!("no stable checkpoint"),
        }
    }

    /// A state larger than one part travels in parts (here 16 bytes), fetched from several
    /// replicas; a replica that sends a wrong part is dropped as a source and one that stays
    /// silent is asked again elsewhere, so the lagging replica still gets the agreed state.
    #[test]
    fn a_state_larger_than_a_part_is_fetched_in_parts_despite_a_faulty_source() {
        use std::cell::RefCell;
        use std::rc::Rc;
        let mut c = Cluster::new(4, |cfg| {
            cfg.window = 4;
            cfg.state_part_bytes = 16;
        });
        c.cut = Box::new(|from, to, _| from == 3 || to == 3);
        for i in 1..=30 {
            c.submit(1, i);
            c.run_for(Duration::from_millis(2));
        }
        c.run_for(Duration::from_millis(50));
        assert_eq!(c.replicas[3].executed(), 0);
        let (low, _) = stable_of(&c, 0);
        assert!(low > 4, "the others moved past replica 3's window");
        // Replica 0 is faulty as a source: its parts never arrive (and one forged part does).
        let seen: Rc<RefCell<(BTreeSet<usize>, usize)>> = Rc::default();
        let log = seen.clone();
        c.cut = Box::new(move |from, to, m| match m {
            Message::Part { .. } if to == 3 => {
                log.borrow_mut().0.insert(from);
                from == 0
            }
            Message::State { snapshot, .. } if to == 3 => {
                log.borrow_mut().1 += usize::from(!snapshot.is_empty());
                false
            }
            _ => false,
        });
        let mut forged = false;
        for _ in 0..400 {
            c.run_for(Duration::from_millis(1));
            if !forged && c.replicas[3].transfer.is_some() {
                let (seq, state) = stable_of(&c, 0);
                let wrong = c.signers[0].sign(Message::Part {
                    seq,
                    state,
                    index: 0,
                    bytes: Bytes::from_static(b"sixteen bytes!!!"),
                });
                assert_eq!(c.deliver(3, &wrong.encode()), Err(Ignored::Invalid));
                let t = c.replicas[3].transfer.as_ref().unwrap();
                assert!(t.is_of(seq, state));
                forged = true;
            }
        }
        assert!(forged, "replica 3 fetched in parts");
        let (sources, inline) = seen.borrow().clone();
        assert_eq!(inline, 0, "no state reply carried the whole snapshot");
        assert!(sources.contains(&1) && sources.contains(&2), "{sources:?}");
        assert!(c.replicas[3].executed() >= low);
        assert_eq!(c.apps[3].app(), c.apps[1].app(), "the agreed state");
        assert_agree(&c, &[0, 1, 2, 3]);
    }

    /// A faulty replica that alone offers an older certified state and then serves no parts
    /// cannot hold a replica back: a newer state from the others replaces the transfer long
    /// before it would count as stalled.
    #[test]
    fn a_transfer_with_one_source_gives_way_to_a_newer_state() {
        use std::cell::RefCell;
        use std::rc::Rc;
        let mut c = Cluster::new(4, |cfg| {
            cfg.window = 4;
            cfg.state_part_bytes = 16;
        });
        let old: Rc<RefCell<Option<Signed>>> = Rc::default();
        let keep = old.clone();
        c.cut = Box::new(|from, to, _| from == 3 || to == 3);
        for i in 1..=12 {
            c.submit(1, i);
            c.run_for(Duration::from_millis(2));
        }
        c.run_for(Duration::from_millis(20));
        let (s1, _) = stable_of(&c, 0);
        // Replica 0's state reply at s1, as a faulty replica would keep it for later.
        let ask = c.signers[3].sign(Message::FetchState { seq: s1 });
        let _ = c.replicas[0].handle_message(Verified::trusted(ask));
        while let Some(out) = c.replicas[0].poll_output() {
            if let Output::Send { message, .. } = out
                && matches!(message.message, Message::State { .. })
            {
                *keep.borrow_mut() = Some(message);
            }
        }
        for i in 13..=30 {
            c.submit(1, i);
            c.run_for(Duration::from_millis(2));
        }
        c.run_for(Duration::from_millis(20));
        let (s2, _) = stable_of(&c, 1);
        assert!(s2 > s1);
        // Replica 0 now serves replica 3 no state and no parts; the others answer.
        c.cut = Box::new(|from, to, m| {
            from == 0 && to == 3 && matches!(m, Message::State { .. } | Message::Part { .. })
        });
        let stale = old.borrow().clone().unwrap();
        assert_eq!(c.deliver(3, &stale.encode()), Ok(()));
        assert_eq!(c.replicas[3].transfer.as_ref().map(|t| t.seq), Some(s1));
        let delay = c.replicas[3].config.state_transfer_delay;
        let start = c.now;
        let mut n = 30;
        while c.replicas[3].executed() < s2 {
            assert!(
                c.now - start < delay * crate::transfer::STALL_DELAYS,
                "still on the faulty replica's old state"
            );
            n += 1;
            c.submit(1, n);
            c.run_for(Duration::from_millis(1));
        }
        c.run_for(Duration::from_millis(300));
        assert_eq!(c.replicas[3].executed(), c.replicas[1].executed());
        assert_eq!(c.apps[3].app(), c.apps[1].app());
    }

    /// A replica outside the group (removed, its key still in the ring) can neither start a
    /// transfer nor become one of its sources, nor have its parts hashed.
    #[test]
    fn a_replica_outside_the_group_is_no_state_source() {
        let mut c = Cluster::new(5, |cfg| {
            cfg.replicas.truncate(4);
            cfg.window = 4;
            cfg.state_part_bytes = 16;
        });
        c.cut = Box::new(|from, to, _| from == 3 || to == 3 || from == 4 || to == 4);
        for i in 1..=12 {
            c.submit(1, i);
            c.run_for(Duration::from_millis(2));
        }
        c.run_for(Duration::from_millis(20));
        let ask = c.signers[3].sign(Message::FetchState { seq: 1 });
        let _ = c.replicas[0].handle_message(Verified::trusted(ask));
        let mut reply = None;
        while let Some(out) = c.replicas[0].poll_output() {
            if let Output::Send { message, .. } = out
                && matches!(message.message, Message::State { .. })
            {
                reply = Some(message.message);
            }
        }
        let outsider = c.signers[4].sign(reply.unwrap());
        assert_eq!(c.deliver(3, &outsider.encode()), Err(Ignored::NotMember));
        assert!(c.replicas[3].transfer.is_none());
        let (seq, state) = stable_of(&c, 0);
        let part = c.signers[4].sign(Message::Part {
            seq,
            state,
            index: 0,
            bytes: Bytes::new(),
        });
        assert_eq!(c.deliver(3, &part.encode()), Err(Ignored::NotMember));
    }

    /// What a faulty requester can get: parts only of snapshots this replica holds, at most
    /// a burst of `SERVED_PARTS_BURST` and then `PARTS_PER_DELAY` per period, and a snapshot it
    /// fetches stays servable after the stable checkpoint moved on (even while it is told of
    /// newer ones), until it stops asking for `PIN_DELAYS` periods.
    #[test]
    fn parts_are_served_within_a_budget_and_a_fetched_snapshot_is_kept_a_while() {
        let mut c = Cluster::new(4, |cfg| {
            cfg.window = 4;
            cfg.state_part_bytes = 8;
        });
        for i in 1..=12 {
            c.submit(1, i);
        }
        c.run_for(Duration::from_millis(30));
        let (seq, state) = stable_of(&c, 0);
        let ask = |c: &mut Cluster, state: Digest, index: u32| {
            let m = c.signers[3].sign(Message::FetchPart { seq, state, index });
            let r = c.replicas[0].handle_message(Verified::trusted(m));
            let mut parts = 0;
            while let Some(out) = c.replicas[0].poll_output() {
                if let Output::Send { message, .. } = out
                    && matches!(message.message, Message::Part { .. })
                {
                    parts += 1;
                }
            }
            (r, parts)
        };
        assert_eq!(ask(&mut c, Digest([9; 32]), 0), (Err(Ignored::Stale), 0));
        assert_eq!(ask(&mut c, state, u32::MAX), (Err(Ignored::Invalid), 0));
        let served: usize = (0..100).map(|_| ask(&mut c, state, 1).1).sum();
        assert_eq!(
            served,
            crate::transfer::SERVED_PARTS_BURST as usize,
            "one period's budget"
        );
        // The others move on; the snapshot replica 3 fetches is still served.
        c.now += c.replicas[0].config.state_transfer_delay;
        for i in 13..=24 {
            c.submit(1, i);
        }
        c.run_for(Duration::from_millis(30));
        assert!(stable_of(&c, 0).0 > seq);
        assert_eq!(ask(&mut c, state, 0), (Ok(()), 1), "pinned while fetched");
        // Told of newer states twice meanwhile (which pins those too), it can still finish
        // the one it fetches after the others move on again.
        let mut number = 24;
        for _ in 0..2 {
            let (newer, _) = stable_of(&c, 0);
            c.now += c.replicas[0].config.state_transfer_delay;
            let m = c.signers[3].sign(Message::FetchState { seq: newer });
            assert_eq!(c.replicas[0].handle_message(Verified::trusted(m)), Ok(()));
            while c.replicas[0].poll_output().is_some() {}
            for _ in 0..12 {
                number += 1;
                c.submit(1, number);
            }
            c.run_for(Duration::from_millis(30));
            assert!(stable_of(&c, 0).0 > newer);
        }
        assert_eq!(ask(&mut c, state, 0), (Ok(()), 1), "still pinned");
        // Once it stops asking, the pin expires at the next stable checkpoint.
        c.now += c.replicas[0].config.state_transfer_delay * PIN_DELAYS;
        for _ in 0..12 {
            number += 1;
            c.submit(1, number);
        }
        c.run_for(Duration::from_millis(30));
        assert_eq!(ask(&mut c, state, 0), (Err(Ignored::Stale), 0));
    }

    /// A timer that a message starts counts from when the message arrived, not from the
    /// replica's last tick: a quorum of view changes arriving after a long quiet spell must not
    /// make the replica escalate to the next view at once.
    #[test]
    fn timers_started_by_messages_count_from_their_arrival() {
        let mut c = Cluster::new(4, |_| {});
        let quiet = Duration::from_secs(10);
        c.replicas[3].advance_clock(quiet);
        for i in 0..3 {
            let vc = c.signers[i].sign(Message::ViewChange {
                view: 1,
                stable: 0,
                checkpoint: Vec::new(),
                prepared: Vec::new(),
            });
            let v = c.ring.verify(vc).unwrap();
            let _ = c.replicas[3].handle_message(v);
        }
        assert_eq!(c.replicas[3].view(), 1);
        c.replicas[3].handle_tick(quiet + Duration::from_millis(1));
        assert_eq!(
            c.replicas[3].view(),
            1,
            "the back-off timer started when the view changes arrived"
        );
        c.replicas[3].handle_tick(quiet + Duration::from_secs(5));
        assert_eq!(c.replicas[3].view(), 2, "and it does expire");
    }

    /// A backup that missed a pre-prepare (it was not connected yet) while the others go on
    /// does not leave the view alone, where it would sit in a view nobody else joins: it asks
    /// for the committed batches and catches up.
    #[test]
    fn a_backup_that_missed_a_proposal_catches_up_instead_of_leaving_alone() {
        let mut c = Cluster::new(4, |cfg| cfg.checkpoint_interval = 8);
        c.cut = Box::new(|_, to, m| to == 3 && matches!(m, Message::PrePrepare { seq: 1, .. }));
        for n in 1..=4 {
            c.submit(5, n);
        }
        c.run_for(Duration::from_millis(50));
        assert!(
            c.log[3].is_empty() && !c.log[0].is_empty(),
            "it missed seq 1"
        );
        c.run_for(Duration::from_millis(300));
        assert_agree(&c, &[0, 1, 2, 3]);
        assert_eq!(c.replicas[3].view(), 0, "it stayed in the view");
        assert!(c.replicas[3].is_active());
        assert_eq!(c.log[3], c.log[0], "it caught up");
    }

    /// A replica that left the view alone (the others carry on without it) still executes
    /// what they commit: it asks for the committed batches while it waits for a new view.
    #[test]
    fn a_replica_alone_in_a_later_view_keeps_executing() {
        // No checkpoint in the run: no state transfer to catch up with.
        let mut c = Cluster::new(4, |cfg| cfg.checkpoint_interval = 64);
        c.replicas[3].start_view_change(1);
        c.drain(3);
        for n in 1..=8 {
            c.submit(5, n);
            c.run_for(Duration::from_millis(5));
        }
        c.run_for(Duration::from_millis(500));
        assert_eq!(c.replicas[0].view(), 0, "the others stayed");
        assert!(
            !c.replicas[3].is_active(),
            "replica 3 is still changing views"
        );
        assert!(!c.log[0].is_empty());
        assert_eq!(c.log[3], c.log[0], "yet it executed what they committed");
    }

    #[test]
    fn a_view_change_keeps_a_prepared_batch() {
        let mut c = Cluster::new(4, |_| {});
        // Commits are lost: every replica prepares seq 1 in view 0, none executes it.
        c.cut = Box::new(|_, _, m| matches!(m, Message::Commit { .. }));
        for n in 1..=4 {
            c.submit(5, n);
        }
        c.settle();
        assert!(c.log.iter().all(Vec::is_empty));
        let prepared = c.replicas[2]
            .slots
            .get(&1)
            .and_then(Slot::proposal)
            .unwrap();
        c.cut = Box::new(|_, _, _| false);
        // The timers expire twice (the requests go to the primary, then the view changes):
        // view 1, whose primary re-proposes the prepared batch.
        c.run_for(Duration::from_millis(250));
        for (i, r) in c.replicas.iter().enumerate() {
            assert_eq!(r.view(), 1, "replica {i}");
            assert!(r.is_active());
            assert_eq!(c.log[i], vec![(1, prepared.1)], "replica {i}");
        }
    }

    #[test]
    fn a_new_view_that_changes_a_prepared_batch_is_refused() {
        let mut c = Cluster::new(4, |_| {});
        c.cut = Box::new(|from, to, m| {
            matches!(m, Message::Commit { .. })
                || (from == 1 && to == 2 && matches!(m, Message::NewView { .. }))
        });
        for n in 1..=4 {
            c.submit(5, n);
        }
        c.run_for(Duration::from_millis(250));
        assert_eq!(c.replicas[1].view(), 1);
        let real = c.replicas[1].new_view.clone().unwrap();
        assert!(!c.replicas[2].is_active(), "replica 2 missed the new view");
        // The new primary (Byzantine) proposes another batch at seq 1 instead.
        let Message::NewView {
            view, view_changes, ..
        } = real.message.clone()
        else {
            panic!()
        };
        let other = vec![Request {
            client: NodeId::from_bytes([9; 32]),
            number: 1,
            payload: Bytes::new(),
        }];
        let pp = c.signers[1].sign(Message::PrePrepare {
            view,
            seq: 1,
            digest: batch_digest(&other),
            batch: other,
        });
        let forged = c.signers[1].sign(Message::NewView {
            view,
            view_changes: view_changes.clone(),
            pre_prepares: vec![pp],
        });
        assert_eq!(c.deliver(2, &forged.encode()), Err(Ignored::Invalid));
        // Too few view changes.
        let thin = c.signers[1].sign(Message::NewView {
            view,
            view_changes: view_changes[..1].to_vec(),
            pre_prepares: vec![],
        });
        assert_eq!(c.deliver(2, &thin.encode()), Err(Ignored::Invalid));
        // From a replica that is not the new primary.
        let stranger = c.signers[3].sign(real.message.clone());
        assert_eq!(c.deliver(2, &stranger.encode()), Err(Ignored::NotPrimary));
        assert_eq!(c.deliver(2, &real.encode()), Ok(()));
        assert!(c.replicas[2].is_active());
    }

    #[test]
    fn a_view_change_with_a_forged_certificate_is_refused() {
        let mut c = Cluster::new(4, |_| {});
        let d = Digest([4; 32]);
        let pp = c.signers[0].sign(Message::PrePrepare {
            view: 0,
            seq: 1,
            digest: batch_digest(&[]),
            batch: vec![],
        });
        let one_prepare = c.signers[2].sign(Message::Prepare {
            view: 0,
            seq: 1,
            digest: batch_digest(&[]),
        });
        let vc = |prepared, stable, checkpoint| Message::ViewChange {
            view: 1,
            stable,
            checkpoint,
            prepared,
        };
        // A prepared certificate with one prepare, not 2f.
        let thin = c.signers[3].sign(vc(
            vec![Certificate {
                proposal: pp.clone(),
                votes: vec![one_prepare.clone()],
            }],
            0,
            vec![],
        ));
        assert_eq!(c.deliver(1, &thin.encode()), Err(Ignored::Invalid));
        // The same prepare twice does not make two.
        let twice = c.signers[3].sign(vc(
            vec![Certificate {
                proposal: pp,
                votes: vec![one_prepare.clone(), one_prepare],
            }],
            0,
            vec![],
        ));
        assert_eq!(c.deliver(1, &twice.encode()), Err(Ignored::Invalid));
        // A stable checkpoint claimed without a certificate.
        let claim = c.signers[3].sign(vc(
            vec![],
            8,
            vec![c.signers[3].sign(Message::Checkpoint { seq: 8, state: d })],
        ));
        assert_eq!(c.deliver(1, &claim.encode()), Err(Ignored::Invalid));
        // A well-formed one counts.
        let fine = c.signers[3].sign(vc(vec![], 0, vec![]));
        assert_eq!(c.deliver(1, &fine.encode()), Ok(()));
        assert_eq!(
            c.replicas[1].view(),
            0,
            "one replica cannot start a view change"
        );
    }

    #[test]
    fn state_transfer_brings_a_lagging_replica_up() {
        let mut c = Cluster::new(4, |cfg| cfg.window = 4);
        c.cut = Box::new(|from, to, _| from == 3 || to == 3);
        for i in 1..=40 {
            c.submit(1, i);
        }
        c.run_for(Duration::from_millis(30));
        assert_eq!(c.replicas[0].executed(), 10);
        assert_eq!(c.replicas[3].executed(), 0);
        c.cut = Box::new(|_, _, _| false);
        for i in 41..=48 {
            c.submit(1, i);
        }
        c.run_for(Duration::from_millis(200));
        assert!(c.restores >= 1, "replica 3 restored a snapshot");
        assert_agree(&c, &[0, 1, 2, 3]);
        for r in &c.replicas {
            assert_eq!(r.executed(), 12);
        }
        assert_eq!(
            c.apps[3].app(),
            c.apps[0].app(),
            "the same application state"
        );
        assert!(
            c.apps[3].cached(&NodeId::from_bytes([1; 32]), 48).is_some(),
            "reply cache"
        );
    }

    #[test]
    fn alternating_state_requests_get_one_snapshot_per_period() {
        let mut c = Cluster::new(4, |cfg| cfg.window = 4);
        for i in 1..=26 {
            c.submit(1, i);
        }
        c.run_for(Duration::from_millis(30));
        let low = c.replicas[0].low_watermark();
        assert!(low > 0 && c.replicas[0].executed() > low);
        // Replica 3 asks replica 0 for the whole state and for the batches above it, in
        // turn, every millisecond for 400 ms.
        let (mut replies, mut snapshots) = (0, 0);
        for k in 0..400u64 {
            c.now += Duration::from_millis(1);
            c.replicas[0].advance_clock(c.now);
            let seq = if k % 2 == 0 { low } else { low + 1 };
            let ask = c.signers[3].sign(Message::FetchState { seq });
            let _ = c.replicas[0].handle_message(Verified::trusted(ask));
            while let Some(out) = c.replicas[0].poll_output() {
                if let Output::Send { message, .. } = out
                    && let Message::State { snapshot, .. } = &message.message
                {
                    replies += 1;
                    snapshots += usize::from(!snapshot.is_empty());
                }
            }
        }
        // state_transfer_delay is 50 ms: at most one reply per 50 ms, one snapshot per 200 ms.
        assert!(replies <= 8, "{replies} replies");
        assert!((1..=2).contains(&snapshots), "{snapshots} snapshots");
    }

    /// Four durable replicas order ten requests; then replica 1 accepts one more pre-prepare
    /// and sends its prepare, but hears no prepares (it is about to crash). Returns what it
    /// executed; the slot is the next one.
    fn one_pre_prepare_before_a_crash() -> (Cluster, Seq) {
        let mut c = Cluster::new(4, |cfg| {
            cfg.durable = true;
            cfg.window = 8;
            cfg.checkpoint_interval = 4;
        });
        for i in 1..=10 {
            c.submit(1, i);
        }
        c.run_for(Duration::from_millis(50));
        let executed = c.replicas[1].executed();
        assert!(executed >= 3, "{executed}");
        c.cut = Box::new(|from, to, _| from == 1 || (to == 1 && from != 0));
        c.submit(1, 11);
        c.run_for(Duration::from_millis(20));
        assert_eq!(c.replicas[1].executed(), executed);
        (c, executed)
    }

    /// Replica `i` restarts from `journal` with an empty application, by
    /// [`Replica::recover`], or [`Replica::recover_intact`] if `intact`.
    fn restart_from(c: &mut Cluster, i: usize, journal: Vec<Record>, intact: bool) {
        let config = c.replicas[i].config.clone();
        let signer = Signer::new_from(&c.signers[i]);
        c.journals[i] = journal.clone();
        c.replicas[i] = if intact {
            Replica::recover_intact(config, signer, journal)
        } else {
            Replica::recover(config, signer, journal)
        }
        .unwrap();
        c.apps[i] = Executor::new(Chain::default());
        c.log[i].clear();
    }

    /// The primary's second pre-prepare for `seq` in view 0, with another batch.
    fn second_pre_prepare(c: &Cluster, seq: Seq) -> Verified {
        let other = vec![Request {
            client: NodeId::from_bytes([2; 32]),
            number: 1,
            payload: Bytes::from_static(b"other"),
        }];
        let forged = c.signers[0].sign(Message::PrePrepare {
            view: 0,
            seq,
            digest: batch_digest(&other),
            batch: other,
        });
        c.ring.verify(forged).unwrap()
    }

    /// Heals the network, orders more requests, and checks that every replica executed the
    /// same batches (at least `at_least`) to the same state.
    fn heal_and_agree(c: &mut Cluster, at_least: Seq) {
        c.cut = Box::new(|_, _, _| false);
        for i in 12..=30 {
            c.submit(1, i);
        }
        c.run_for(Duration::from_millis(300));
        assert_agree(c, &[0, 1, 2, 3]);
        let top = c.replicas[0].executed();
        assert!(top >= at_least, "{top}");
        assert!(c.replicas.iter().all(|r| r.executed() == top));
        assert_eq!(c.apps[1].app(), c.apps[0].app());
    }

    #[test]
    fn a_recovered_replica_resumes_and_does_not_contradict_its_journal() {
        let (mut c, executed) = one_pre_prepare_before_a_crash();
        let app_before = c.apps[1].app().clone();
        let journal = c.journals[1].clone();
        restart_from(&mut c, 1, journal, false);
        c.drain(1);
        assert_eq!(c.replicas[1].executed(), executed, "recovered from disk");
        assert_eq!(c.apps[1].app(), &app_before, "the same application state");
        // The primary's second pre-prepare for the slot it accepted is refused.
        let forged = second_pre_prepare(&c, executed + 1);
        assert_eq!(
            c.replicas[1].handle_message(forged),
            Err(Ignored::Conflicting)
        );
        // Healed, it catches up and agrees with the others.
        heal_and_agree(&mut c, executed + 1);
    }

    /// What a crashed machine leaves of a journal: the records up to the last one that needed
    /// a sync (the driver syncs it before anything after it happens).
    fn after_power_loss(journal: &[Record]) -> Vec<Record> {
        let durable = journal
            .iter()
            .rposition(Record::needs_sync)
            .map_or(0, |i| i + 1);
        journal[..durable].to_vec()
    }

    #[test]
    fn a_replica_whose_machine_lost_its_last_votes_casts_no_new_ones_in_that_view() {
        // The machine crashes before anything synced the last pre-prepare's record.
        let (mut c, executed) = one_pre_prepare_before_a_crash();
        let seq = executed + 1;
        let recorded = |j: &[Record]| {
            j.iter()
                .any(|r| matches!(r, Record::PrePrepare(pp) if pp.message.seq() == Some(seq)))
        };
        assert!(recorded(&c.journals[1]), "written");
        let journal = after_power_loss(&c.journals[1]);
        assert!(!recorded(&journal), "and lost");
        restart_from(&mut c, 1, journal, false);
        c.drain(1);
        // A faulty primary offers it another batch for that slot: it does not prepare it (it
        // may have prepared the first one; two prepares from it would let the primary and f
        // faulty replicas make two prepared certificates in one view).
        let forged = second_pre_prepare(&c, seq);
        let _ = c.replicas[1].handle_message(forged);
        let mut prepares = 0;
        while let Some(out) = c.replicas[1].poll_output() {
            if let Output::Broadcast(s) = out
                && matches!(s.message, Message::Prepare { .. })
            {
                prepares += 1;
            }
        }
        assert_eq!(prepares, 0, "a second prepare for one slot and view");
        // Healed, the others order on without its prepares; it commits and executes with them
        // (fetching the state past the slot it holds the forged batch for) and agrees.
        heal_and_agree(&mut c, seq + 4);
        // Restarted once more, it re-sends only the votes its records show, not prepares for
        // the slots it holds from the others' certificates (prepared without it).
        let journal = c.journals[1].clone();
        let voted: BTreeSet<(Seq, Digest)> = journal
            .iter()
            .filter_map(|r| match r {
                Record::PrePrepare(pp) => Some((pp.message.seq()?, pp.message.digest()?)),
                _ => None,
            })
            .collect();
        let stable = journal
            .iter()
            .filter(|r| matches!(r, Record::Stable { .. }))
            .filter_map(Record::seq)
            .max()
            .unwrap_or(0);
        let from_certificates = journal
            .iter()
            .filter_map(|r| match r {
                Record::Prepared(cert) | Record::Committed(cert) => Some(&cert.proposal.message),
                _ => None,
            })
            .filter(|m| m.seq() > Some(stable))
            .filter(|m| !voted.contains(&(m.seq().unwrap(), m.digest().unwrap())))
            .count();
        assert!(from_certificates > 0, "slots held from certificates alone");
        restart_from(&mut c, 1, journal, false);
        let mut resent = Vec::new();
        while let Some(out) = c.replicas[1].poll_output() {
            if let Output::Broadcast(s) = out
                && let Message::Prepare { seq, digest, .. } = s.message
            {
                resent.push((seq, digest));
            }
        }
        assert!(
            resent.iter().all(|v| voted.contains(v)),
            "prepares it never sent: {resent:?}"
        );
    }

    #[test]
    fn a_restarted_primary_proposes_again_at_once_only_if_nothing_was_lost() {
        for intact in [false, true] {
            let mut c = Cluster::new(4, |cfg| cfg.durable = true);
            for i in 1..=8 {
                c.submit(1, i);
            }
            c.run_for(Duration::from_millis(30));
            let executed = c.replicas[0].executed();
            assert!(executed >= 2, "{executed}");
            let journal = c.journals[0].clone();
            restart_from(&mut c, 0, journal, intact);
            c.drain(0);
            for i in 9..=12 {
                c.submit(1, i);
            }
            c.run_for(Duration::from_millis(400));
            assert_agree(&c, &[0, 1, 2, 3]);
            let top = c.replicas[1].executed();
            assert!(top > executed, "ordered on ({intact})");
            // Its machine restarted: it proposes nothing in view 0, and the others change
            // views to order. Only its process stopped: it goes on in view 0.
            let view = c.replicas[1].view();
            assert_eq!(view == 0, intact, "view {view} ({intact})");
        }
    }

    #[test]
    fn a_state_that_does_not_match_its_certificate_is_refused() {
        let mut c = Cluster::new(4, |cfg| cfg.window = 4);
        for i in 1..=16 {
            c.submit(1, i);
        }
        c.settle();
        let cert: Vec<Signed> = c.replicas[0]
            .stable_certificate()
            .iter()
            .map(|v| v.signed().clone())
            .collect();
        assert!(!cert.is_empty());
        let lagging = Replica::new(
            c.replicas[0].config.clone(),
            Signer::new_from(&c.signers[3]),
        );
        c.replicas[3] = lagging;
        let garbage = Bytes::from_static(b"not the certified state");
        let forged = c.signers[0].sign(Message::State {
            checkpoint: cert.clone(),
            parts: part_digests(&garbage, c.replicas[0].config.state_part_bytes),
            snapshot: garbage,
            committed: vec![],
        });
        assert_eq!(c.deliver(3, &forged.encode()), Err(Ignored::Invalid));
        let uncertified = c.signers[0].sign(Message::State {
            checkpoint: cert[..1].to_vec(),
            parts: vec![],
            snapshot: Bytes::new(),
            committed: vec![],
        });
        assert_eq!(c.deliver(3, &uncertified.encode()), Err(Ignored::Invalid));
        assert_eq!(c.replicas[3].executed(), 0);
    }

    #[test]
    fn a_request_executes_at_most_once() {
        let mut c = Cluster::new(4, |_| {});
        for _ in 0..3 {
            c.submit(7, 1); // the same request, retransmitted
        }
        c.submit(7, 2);
        c.run_for(Duration::from_millis(20));
        c.submit(7, 1); // long after it executed
        c.submit(7, 2);
        c.run_for(Duration::from_millis(20));
        // A faulty primary proposing an executed request again: execution drops it.
        let again = vec![Request {
            client: NodeId::from_bytes([7; 32]),
            number: 2,
            payload: Bytes::new(),
        }];
        let next = c.replicas[0].next_seq + 1;
        let pp = c.signers[0].sign(Message::PrePrepare {
            view: 0,
            seq: next,
            digest: batch_digest(&again),
            batch: again,
        });
        for to in 1..4 {
            c.post(0, to, &pp);
        }
        c.run_for(Duration::from_millis(20));
        assert_agree(&c, &[0, 1, 2, 3]);
        for app in &c.apps {
            assert_eq!(app.app(), c.apps[0].app());
        }
        let client = NodeId::from_bytes([7; 32]);
        assert_eq!(c.replicas[1].last_executed.get(&client), Some(&2));
        assert_eq!(
            c.replicas[1].executed(),
            next,
            "the duplicate's slot executed, empty"
        );
    }

    #[test]
    fn messages_outside_the_view_window_or_group_are_ignored() {
        let c = Cluster::new(4, |_| {});
        let outsider = Signer::named("x");
        let mut r = Replica::new(
            c.replicas[0].config.clone(),
            Signer::new_from(&c.signers[2]),
        );
        let d = Digest([1; 32]);
        let prepare = |view, seq| Message::Prepare {
            view,
            seq,
            digest: d,
        };
        let v = |m: Message, s: &Signer| Verified::trusted(s.sign(m));
        assert_eq!(
            r.handle_message(v(prepare(0, 129), &c.signers[1])),
            Err(Ignored::OutOfWindow)
        );
        // Just above the window: held for the next one (the others may be ahead of us).
        assert_eq!(r.handle_message(v(prepare(0, 65), &c.signers[1])), Ok(()));
        // A later view: held until this replica enters it (not a prepare from that view's
        // primary, which is refused before it is held).
        assert_eq!(
            r.handle_message(v(prepare(1, 1), &c.signers[1])),
            Err(Ignored::PrepareFromPrimary)
        );
        assert_eq!(r.handle_message(v(prepare(1, 1), &c.signers[3])), Ok(()));
        assert_eq!(r.held_for_next_window(), 2);
        assert_eq!(
            r.handle_message(v(prepare(0, 0), &c.signers[1])),
            Err(Ignored::OutOfWindow)
        );
        assert_eq!(
            r.handle_message(v(prepare(0, 1), &c.signers[0])),
            Err(Ignored::PrepareFromPrimary)
        );
        assert_eq!(
            r.handle_message(v(prepare(0, 1), &outsider)),
            Err(Ignored::NotMember)
        );
        let pp = Message::PrePrepare {
            view: 0,
            seq: 1,
            digest: batch_digest(&[]),
            batch: vec![],
        };
        assert_eq!(
            r.handle_message(v(pp.clone(), &c.signers[1])),
            Err(Ignored::NotPrimary)
        );
        assert_eq!(r.handle_message(v(pp, &c.signers[0])), Ok(()));
        let other = vec![Request {
            client: NodeId::from_bytes([1; 32]),
            number: 1,
            payload: Bytes::new(),
        }];
        let conflicting = Message::PrePrepare {
            view: 0,
            seq: 1,
            digest: batch_digest(&other),
            batch: other,
        };
        assert_eq!(
            r.handle_message(v(conflicting, &c.signers[0])),
            Err(Ignored::Conflicting)
        );
        // Requests: bounded and deduplicated.
        let mut small = Replica::new(
            {
                let mut cfg = c.replicas[0].config.clone();
                cfg.max_pending = 1;
                cfg
            },
            Signer::new_from(&c.signers[3]),
        );
        let req = |n| Request {
            client: NodeId::from_bytes([2; 32]),
            number: n,
            payload: Bytes::new(),
        };
        assert_eq!(small.handle_request(req(1), Duration::ZERO), Ok(()));
        assert_eq!(
            small.handle_request(req(1), Duration::ZERO),
            Err(Ignored::Stale)
        );
        assert_eq!(
            small.handle_request(req(2), Duration::ZERO),
            Err(Ignored::Busy)
        );
    }

    #[test]
    fn a_reconfiguration_takes_effect_a_window_later_at_a_checkpoint() {
        let mut c = Cluster::new(4, |cfg| cfg.window = 6);
        for i in 1..=8 {
            c.submit(1, i);
        }
        c.settle();
        let r = &mut c.replicas[0];
        assert_eq!(r.executed(), 2);
        let old = r.group_at(1);
        let mut members = old.members.clone();
        members.pop();
        members.push(NodeId::from_bytes([42; 32])); // replica 3 replaced by a newcomer
        assert_eq!(
            r.reconfigure(members.clone(), 5),
            Err(ReconfigureError::NotExecuted(5))
        );
        assert_eq!(r.reconfigure(vec![], 2), Err(ReconfigureError::BadGroup));
        // Executed at 2, window 6: from 8 (a checkpoint every 2).
        assert_eq!(r.reconfigure(members.clone(), 2), Ok(8));
        assert_eq!(r.group_at(8), old);
        assert_eq!(r.group_at(9).members, members);
        assert_eq!(r.group_at(9).quorum(), 3);
        // A sender that left is no member for slots in the new group.
        let gone = c.signers[3].sign(Message::Prepare {
            view: 0,
            seq: 9,
            digest: Digest([0; 32]),
        });
        assert_eq!(
            c.replicas[0].handle_message(Verified::trusted(gone)),
            Err(Ignored::NotMember)
        );
    }
}
