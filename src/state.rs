//! The node's replicated state: the membership (members, CRL, epoch), the administrators, and
//! the application, behind the [`Ordered`] envelope.
//!
//! Every replica executes the same ordered requests on a [`NodeState`], so all of them agree on
//! the membership at every log position. A membership command is applied with
//! `securesmart_membership::Membership::apply` at the time the submitter stamped on it. Who may
//! submit what (checked at execution, identically everywhere):
//! - `AddNode` and `RemoveNode`: an administrator; a replica may also remove itself (leave).
//! - `AddAdmin` and `RemoveAdmin`: an administrator. The administrators are replicated state:
//!   the genesis configuration names the first ones, ordered commands add and withdraw the
//!   others (a client certificate of our CA that no CRL revokes, valid at the ordered time;
//!   never the last working one). One whose certificate is revoked or expired authorizes
//!   nothing. Recovery: an `AddAdmin` ordered by a current replica is its vote; a quorum of the
//!   current replicas voting for the same certificate adds it (the node orders its vote from
//!   `recover_admin` in its configuration).
//! - `UpdateCrl`: anyone; the CRL must be signed by the CA and newer than the current one (the
//!   replicas submit the CRL file they watch), and it removes the members it revokes.
//!
//! What an applied command changed is kept in [`NodeState::take_changes`] for the node to carry
//! out after the batch (reconfigure the engine, admit or cut off peers). The snapshot holds the
//! administrators, the membership and the application's snapshot.
//!
//! # Group commits
//! The order is the MLS delivery service of the replicas' group key, and what it accepts must
//! be what every correct member can apply, decided from replicated data alone. MLS cannot be
//! judged from public data (a commit's path secrets are encrypted to each member, and its
//! confirmation tag needs the epoch's secrets; openmls's `PublicGroup` checks signatures and
//! proposals, not those), so the members judge and the replicated state counts their answers:
//! - A commit ([`Ordered::GroupCommit`]) is accepted only from the epoch's designated
//!   committer ([`GroupView::designated`]: the replicas neither cooling down nor asking to be
//!   added, in turn by epoch), or from any replica not cooling down once [`BACKUP_SEQS`]
//!   passed since the last settlement (the designated one may be down); made for the current
//!   epoch (the one the last settled commit made; 0 at genesis),
//!   and while no other commit is unsettled. It is *tentative*: the replicated epoch does not
//!   move yet.
//! - Every member that holds the epoch it was made for applies it under the commit policy for
//!   the ordered membership (`GroupMember::apply_commit_checked`: the committer is a replica,
//!   it adds only current replicas, removes no current replica except to add it again, keeps
//!   the committer's credential, carries no other proposal) and orders either a
//!   [`Ordered::KeyAck`] of the new epoch naming the commit's digest, or a
//!   [`Ordered::CommitRefused`] naming it. Each replica counts once, for its first answer.
//! - Call H the current replicas known to hold the epoch it was made for (those that
//!   acknowledged it, naming its commit; for epoch 0 only the group's creator). Acknowledgements
//!   from f + 1 replicas, among them all but f of H (at least one of H), keep it: the replicated
//!   epoch moves on (a faulty committer cannot keep a commit that joiners and it can open but
//!   the holders cannot). Refusals from enough of H that
//!   keeping it has become impossible void it (with more than f holders, at least one
//!   correct holder could not apply it, so the commit is bad):
//!   the members that merged it go back to the state from before, and the replica that
//!   ordered it may order no commit for [`COOLDOWN_SEQS`] sequence numbers (a cool-down, not a
//!   bar for good: a correct committer can be made to order a commit some members refuse).
//!   Each replica counts once, so both cannot happen; a commit that gets neither (too few
//!   replicas hold its epoch) expires [`SETTLE_DEADLINE`] sequence numbers after it was
//!   ordered ([`NodeState::begin_batch`]), and its orderer cools down as well. A correct
//!   member that refused a kept commit lost its key and asks to be added again
//!   ([`GroupEvent::Settled`]).
//! - Who may be added: a replica that ordered a key package and acknowledged no key since
//!   ([`GroupView::joining`]), with exactly that key package, so a faulty replica cannot swap
//!   an in-sync replica out of the group with an old key package of it; a replica asks again
//!   with a new key package at most once per [`KEY_PACKAGE_REFRESH_SEQS`].
//!
//! Known limit: the holders of the next epoch are those that applied the last commit, so a
//! faulty committer whose commit some correct holders cannot open shrinks the holders by up to
//! f, in an epoch it is designated for or once the backup window opened (at least one correct
//! holder keeps the key, and those left out ask to be re-added, which the next correct
//! committers do). The backup window counts sequence numbers: under load it opens within
//! milliseconds, and in an idle cluster whose designated committer is down it opens only as
//! group traffic (key packages every few seconds) is ordered.
//!
//! So a faulty replica can no longer move the replicated epoch to keys nobody holds (which
//! made confidential requests "busy" and checkpoints unsealable, for good), nor remove the
//! other replicas from the group; each commit of its that is voided or expires costs a
//! settlement round and cools it down.
//!
//! # Confidential requests
//! A confidential request is ordered as [`Ordered::ClientSealed`] (its client sealed it with the
//! key the replicas derive for it from the epoch's key, `PayloadKeys::client_key`) or as
//! [`Ordered::Sealed`] (a replica sealed it for the client with the group key), so the log,
//! every journal and every state transfer hold ciphertext. A client-sealed request follows the
//! rule below, except that its sender must be the request's client (checked before opening),
//! it carries no commitment (the client signed the ciphertext itself), and its epoch must be
//! the one [`NodeState::sealable_epoch`] names at execution, so that clients move off an old
//! epoch (one a removed replica holds) as soon as the replicas do (a client with an old key is
//! refused and fetches the new one). What a client makes up under its key does not open at any replica
//! holding the epoch: refused alike.
//! It is opened here, at execution, with this node's [`PayloadKeys`]. Whether it executes must
//! not depend on which keys a replica happens to hold, so the rule is a function of replicated
//! state only:
//! - it is refused (an empty reply, the same everywhere) unless it was sealed in the current
//!   group epoch or one of the [`SEALED_EPOCHS_ACCEPTED`] before it (the replicated epoch, which
//!   moves with every accepted group commit) and a quorum of the current replicas ordered a
//!   [`Ordered::KeyAck`] for that epoch (they hold its key), and, if some recent epoch was
//!   acknowledged by every current replica, in one of those (so that a faulty sealer cannot
//!   pick an epoch some correct replicas lack and make them lost); or if the replica that
//!   sealed it (it signed the ciphertext, and the engine checked that before ordering) is not
//!   a current replica (a client or a removed replica made it up); or if its ciphertext does
//!   not open under the epoch's key or is not what the client committed to (its sealer sealed
//!   garbage or another operation). The client signed the ciphertext, the sealer's signature
//!   and the commitment, so nobody else can put another ciphertext beside them; a refused one
//!   costs the client a request number, and it has another replica seal it. A replica seals
//!   in the newest recent epoch that every current replica acknowledged (a replica just
//!   added holds none of the earlier ones), or failing that in the newest one a quorum
//!   acknowledged ([`NodeState::sealable_epoch`]); during a
//!   rotation it keeps sealing with the previous key until the acknowledgements are in, and
//!   while no recent epoch has a quorum (the group forming at genesis) intake answers "busy"
//!   to confidential requests; other requests are not affected. The committer rotates only
//!   once a quorum acknowledged the current epoch.
//! - otherwise it executes. A replica that cannot open it (a joiner before its Welcome, a
//!   replica that fell behind in the group) cannot compute the agreed state:
//!   its application state is *lost* ([`StateMachine::state_known`] is false),
//!   it keeps executing the membership and group messages (which do not depend on the
//!   application), sends no application replies and no checkpoints, and the engine replaces
//!   its state by state transfer at the next stable checkpoint. Such a replica counts against
//!   the f faults the group tolerates until then.
//!
//! # Checkpoints
//! Once a sealed request has executed (a replicated flag), every checkpoint's state (the
//! application's snapshot and the reply cache, which holds the results of confidential reads)
//! is sealed with the group key before it is journaled or transferred
//! ([`StateMachine::seal_checkpoint`]): in the epoch [`NodeState::sealable_epoch`] names, or the
//! current one while none does, deterministically
//! ([`securesmart_membership::PayloadKeys::seal_shared`], bound to the sequence number), so that
//! every replica produces the same bytes and the checkpoint digests agree. What a replica
//! needs to follow the membership and the group stays in the clear beside it: the
//! administrators, the membership, the group epoch and acknowledgements, and the last
//! [`COMMIT_HISTORY`] group commits with their Welcomes. A replica restoring a checkpoint hands
//! those commits to its group member, which merges the ones it missed (or joins from a Welcome
//! meant for it), and then opens the state with the keys they gave. A replica that still cannot
//! open it takes the clear part and its application state is lost until a later checkpoint.
//! Before the first sealed request, checkpoints are in the clear. Members keep the keys that a
//! replay of their journal from the stable checkpoint needs (`GroupMember::pin_keys`), so a
//! whole-cluster restart opens its own journals.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use rustls::pki_types::UnixTime;
use securesmart_base::wire::{Reader, Writer};
use securesmart_consensus::message::{Request, Seq};
use securesmart_consensus::service::{RestoreError, StateMachine};
use securesmart_membership::{
    Applied, CREATION_DIGEST, GroupError, MAX_MLS_MESSAGE_BYTES, Membership, MembershipCommand,
    PayloadKeys,
};
use securesmart_transport::NodeId;

use crate::protocol::{NONCE_LEN, Ordered, Submission, confidential_context};
use crate::roster::{Roster, RosterLog};

/// Snapshot format (4: settled group commits; 5: administrators by certificate; 6: holders,
/// creator and cool-downs by sequence number, #13; 7: the roster log; 8: no exemption of
/// joiners from the epochs every replica must hold; 9: the replicas' votes for an
/// administrator; 10: cached replies to confidential requests carry the
/// `CONFIDENTIAL_EXECUTED` mark, which a version 9 cache lacks).
const VERSION: u8 = 10;
/// Group commits a snapshot carries (see the module doc, "Checkpoints").
pub const COMMIT_HISTORY: usize = 8;
/// A checkpoint whose state is in the clear.
const CHECKPOINT_CLEAR: u8 = 0;
/// Who sealed a confidential request.
enum SealedBy<'a> {
    /// A replica, for its client ([`Ordered::Sealed`]), with the client's commitment.
    Replica(&'a [u8; 32]),
    /// The client itself, with its sealing key ([`Ordered::ClientSealed`]).
    Client,
}

/// A checkpoint whose state is sealed with the group key.
const CHECKPOINT_SEALED: u8 = 1;
/// Domain tag of the context a checkpoint is sealed with.
pub const CHECKPOINT_TAG: &[u8] = securesmart_base::tags::service::SEALED_CHECKPOINT.as_bytes();

/// The context a checkpoint's state is sealed with: the domain tag and its sequence number.
fn checkpoint_context(seq: Seq) -> Vec<u8> {
    let mut c = Vec::with_capacity(CHECKPOINT_TAG.len() + 8);
    c.extend_from_slice(CHECKPOINT_TAG);
    c.extend_from_slice(&seq.to_be_bytes());
    c
}
/// An unsettled group commit expires once this many sequence numbers passed since it was
/// ordered (its holders did not answer: some are silent), and its orderer cools down.
pub const SETTLE_DEADLINE: Seq = 512;
/// A replica whose commit was voided or expired may order none for this many sequence numbers.
pub const COOLDOWN_SEQS: Seq = 256;
/// A replica that asked to be added asks again with a new key package at most once per this
/// many sequence numbers (the older one stays the one to add it with), so that it cannot make
/// every commit that adds it stale by ordering new key packages all the time.
pub const KEY_PACKAGE_REFRESH_SEQS: Seq = 64;
/// Each epoch has one designated committer (from replicated data); any other replica may
/// commit only once this many sequence numbers passed since the last commit was settled (the
/// designated one may be down), so that a faulty replica cannot win every race to commit.
pub const BACKUP_SEQS: Seq = 32;

/// Whether `id` may order no commit at `seq` (one of its commits was voided or expired lately).
fn cooling_down(barred: &BTreeMap<NodeId, Seq>, id: &NodeId, seq: Seq) -> bool {
    barred.get(id).is_some_and(|until| *until > seq)
}

/// What a node's group member needs of the replicated state to judge and make commits.
#[derive(Clone, Copy, Debug)]
pub struct GroupView<'a> {
    /// The membership.
    pub membership: &'a Membership,
    /// Replicas that asked to be added, with their key package's digest.
    pub joining: &'a BTreeMap<NodeId, [u8; 32]>,
    /// Their key packages: any committer adds them from here, whatever it saw ordered.
    pub key_packages: &'a BTreeMap<NodeId, Bytes>,
    barred: &'a BTreeMap<NodeId, Seq>,
    seq: Seq,
    epoch_commits: &'a BTreeMap<u64, [u8; 32]>,
    designated: Option<NodeId>,
    backups_open: bool,
}

impl GroupView<'_> {
    /// Whether commits of `id` are refused now (one of its commits was voided lately).
    pub fn is_barred(&self, id: &NodeId) -> bool {
        cooling_down(self.barred, id, self.seq)
    }

    /// The replica designated to commit in the current epoch: the replicas neither cooling
    /// down nor asking to be added, in id order, taken in turn epoch by epoch.
    pub fn designated(&self) -> Option<NodeId> {
        self.designated
    }

    /// Whether a commit ordered by `id` now would be accepted (see [`BACKUP_SEQS`]).
    pub fn may_commit(&self, id: &NodeId) -> bool {
        !self.is_barred(id) && (self.designated.is_none_or(|d| d == *id) || self.backups_open)
    }

    /// The digest of the commit that made `epoch`, if it is a recent settled one.
    pub fn epoch_commit(&self, epoch: u64) -> Option<[u8; 32]> {
        self.epoch_commits.get(&epoch).copied()
    }

    /// The commit policy at this log position.
    pub fn policy(&self) -> securesmart_membership::CommitPolicy<'_> {
        securesmart_membership::CommitPolicy {
            membership: self.membership,
            joining: self.joining,
        }
    }
}

/// The largest key package a replica may ask to be added with (ours are under 1 KiB): the
/// Welcome that adds it carries it, and a Welcome must fit in a snapshot.
pub const MAX_KEY_PACKAGE_BYTES: usize = 16 * 1024;

/// Administrators in a snapshot at most.
const MAX_ADMINS: usize = 1024;
/// Acknowledgements of one epoch's key in a snapshot at most (one per replica).
const MAX_ACKS: usize = 1024;
/// A sealed request executes if it was sealed in the current group epoch or in one of this
/// many before it (members keep the keys of three epochs).
pub const SEALED_EPOCHS_ACCEPTED: u64 = 2;

/// The replicated state of a node running application `S`.
#[derive(Debug)]
pub struct NodeState<S> {
    membership: Membership,
    /// The administrators, by node id, with their certificates (DER): one that the ordered CRL
    /// revokes authorizes nothing from then on.
    admins: BTreeMap<NodeId, Bytes>,
    /// Recovery of administrators by the replicas: each current replica's vote (the last
    /// `AddAdmin` it ordered, a certificate); a quorum of matching votes adds that
    /// administrator.
    admin_votes: BTreeMap<NodeId, Bytes>,
    app: S,
    changes: Vec<Applied>,
    group: Vec<GroupEvent>,
    /// The MLS epoch of the group's last settled commit (0: the epoch the group was created
    /// in): the next accepted group commit must be made for it.
    group_epoch: u64,
    /// The digest of the commit that made each recent epoch ([`CREATION_DIGEST`] for 0):
    /// an acknowledgement counts only for the commit it names.
    epoch_commits: BTreeMap<u64, [u8; 32]>,
    /// The group commit accepted and not yet settled (see the module doc, "Group commits").
    tentative: Option<Tentative>,
    /// Replicas that ordered a commit that was voided or expired, and the sequence number
    /// until which no commit of theirs is accepted.
    barred: BTreeMap<NodeId, Seq>,
    /// Replicas that asked to be added to the group (they ordered a key package and
    /// acknowledged no key since), with that key package's digest.
    joining: BTreeMap<NodeId, [u8; 32]>,
    /// When each entry of `joining` was ordered.
    joining_at: BTreeMap<NodeId, Seq>,
    /// The key package of each entry of `joining`.
    key_packages: BTreeMap<NodeId, Bytes>,
    /// The replica that creates the group at genesis (the smallest id): the only one that
    /// holds epoch 0.
    creator: Option<NodeId>,
    /// The sequence number at which the last commit was settled (kept, voided or expired).
    last_settled: Seq,
    /// The rosters clients follow, with the replicas' signatures on each change.
    rosters: RosterLog,
    /// The sequence number of the batch executing ([`NodeState::begin_batch`]).
    seq: Seq,
    /// Which current replicas acknowledged holding the key of each recent epoch.
    acks: BTreeMap<u64, BTreeSet<NodeId>>,

    /// This node's group keys, to open sealed requests (not replicated state).
    keys: Option<PayloadKeys>,
    /// The application's state is not the agreed one (see the module doc).
    lost: bool,
    /// A sealed request passed the rule (replicated): checkpoints are sealed from now on.
    confidential: bool,
    /// The last [`COMMIT_HISTORY`] accepted group commits with their Welcomes, oldest first.
    commits: VecDeque<(Bytes, Bytes)>,
}

/// A group commit the replicated state accepted and has not settled yet.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tentative {
    /// The epoch it was made for.
    made_for: u64,
    digest: [u8; 32],
    /// The replica that ordered it.
    from: NodeId,
    /// The sequence number it was ordered at (it expires [`SETTLE_DEADLINE`] after).
    at: Seq,
    commit: Bytes,
    welcome: Bytes,
    /// Replicas that applied it (acknowledged the epoch it made), and that could not.
    applied: BTreeSet<NodeId>,
    refused: BTreeSet<NodeId>,
}

/// An ordered message for the replicas' MLS group, from a current replica, for the node to
/// hand to its group member (the group key is each member's own state, not replicated state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupEvent {
    /// A replica's key package.
    KeyPackage {
        /// The replica.
        from: NodeId,
        /// Its key package.
        key_package: Bytes,
    },
    /// A commit, with its Welcome (empty if none).
    Commit {
        /// The commit.
        commit: Bytes,
        /// The Welcome.
        welcome: Bytes,
        /// Settled already (a commit of a snapshot's history); otherwise it is tentative until
        /// a [`GroupEvent::Settled`] for it.
        settled: bool,
    },
    /// The tentative commit with this digest was kept (f + 1 replicas applied it) or voided
    /// (f + 1 replicas holding the epoch it was made for could not apply it).
    Settled {
        /// Its digest ([`securesmart_membership::commit_digest`]).
        commit: [u8; 32],
        /// Kept, or voided.
        kept: bool,
    },
}

/// The reply to an ordered membership command: `ok epoch N` or `refused: why`.
pub fn command_reply(result: &Result<Applied, String>, epoch: u64) -> Bytes {
    Bytes::from(match result {
        Ok(_) => format!("ok epoch {epoch}"),
        Err(why) => format!("refused: {why}"),
    })
}

impl<S: StateMachine> NodeState<S> {
    /// The state at genesis.
    pub fn new(
        membership: Membership,
        admins: impl IntoIterator<Item = rustls::pki_types::CertificateDer<'static>>,
        app: S,
    ) -> Self {
        // (The node checked each administrator's certificate when it read its configuration;
        // one that does not parse names nobody.)
        let admins = admins
            .into_iter()
            .filter_map(|c| {
                let id = securesmart_transport::node_id(&c).ok()?;
                Some((id, Bytes::copy_from_slice(c.as_ref())))
            })
            .collect();
        let creator = membership.replica_ids().first().copied();
        let rosters = RosterLog::new(Roster::of(0, &membership));
        Self {
            rosters,
            membership,
            admins,
            admin_votes: BTreeMap::new(),
            app,
            changes: Vec::new(),
            group: Vec::new(),
            group_epoch: 0,
            epoch_commits: BTreeMap::from([(0, CREATION_DIGEST)]),
            tentative: None,
            barred: BTreeMap::new(),
            joining: BTreeMap::new(),
            joining_at: BTreeMap::new(),
            key_packages: BTreeMap::new(),
            creator,
            last_settled: 0,
            seq: 0,
            acks: BTreeMap::new(),

            keys: None,
            lost: false,
            confidential: false,
            commits: VecDeque::new(),
        }
    }

    /// Opens sealed (confidential) requests with `keys`; without them every sealed request
    /// leaves the state lost.
    #[must_use]
    pub fn with_payload_keys(mut self, keys: PayloadKeys) -> Self {
        self.keys = Some(keys);
        self
    }

    /// The current group epoch, as the replicated state knows it (that of the last settled
    /// commit).
    pub fn group_epoch(&self) -> u64 {
        self.group_epoch
    }

    /// The designated committer of the current epoch (see [`GroupView::designated`]).
    fn designated(&self) -> Option<NodeId> {
        let candidates: Vec<NodeId> = self
            .membership
            .replica_ids()
            .into_iter()
            .filter(|id| {
                !self.joining.contains_key(id) && !cooling_down(&self.barred, id, self.seq)
            })
            .collect();
        let len = u64::try_from(candidates.len()).ok().filter(|l| *l > 0)?;
        let index = usize::try_from(self.group_epoch % len).ok()?;
        candidates.get(index).copied()
    }

    /// What the node's group member needs of the replicated state.
    pub fn group_view(&self) -> GroupView<'_> {
        GroupView {
            membership: &self.membership,
            joining: &self.joining,
            key_packages: &self.key_packages,
            barred: &self.barred,
            seq: self.seq,
            epoch_commits: &self.epoch_commits,
            designated: self.designated(),
            backups_open: self.seq >= self.last_settled.saturating_add(BACKUP_SEQS),
        }
    }

    /// The batch at sequence number `seq` begins executing (call it before its requests, at
    /// every replica alike): an unsettled group commit past its deadline is voided.
    pub fn begin_batch(&mut self, seq: Seq) {
        // (Assigned, not raised: a replica that restores a checkpoint and executes the batches
        // above it again must decide as it did, and as the others did, the first time.)
        self.seq = seq;
        if self
            .tentative
            .as_ref()
            .is_some_and(|t| self.seq > t.at.saturating_add(SETTLE_DEADLINE))
            && let Some(t) = self.tentative.take()
        {
            metrics::counter!("securesmart_node_group_commits_settled_total", "outcome" => "expired")
                .increment(1);
            tracing::info!(
                epoch = t.made_for,
                "group commit expired unsettled; its orderer waits"
            );
            self.barred
                .insert(t.from, self.seq.saturating_add(COOLDOWN_SEQS));
            self.last_settled = self.seq;
            self.group.push(GroupEvent::Settled {
                commit: t.digest,
                kept: false,
            });
        }
    }

    /// Whether a group commit awaits its settlement (no other is accepted meanwhile).
    pub fn commit_unsettled(&self) -> bool {
        self.tentative.is_some()
    }

    /// Whether every current replica acknowledged the key of `epoch` (a replica added after
    /// that epoch cannot hold it: until it acknowledges a later one, no epoch is held by all).
    pub fn acked_by_all(&self, epoch: u64) -> bool {
        let by = self.acks.get(&epoch);
        let replicas = self.membership.replica_ids();
        !replicas.is_empty()
            && replicas
                .iter()
                .all(|id| by.is_some_and(|by| by.contains(id)))
    }

    /// Whether a quorum of the current replicas acknowledged the key of `epoch`.
    pub fn acked_by_quorum(&self, epoch: u64) -> bool {
        let replicas = self.membership.replica_ids();
        let acked = self
            .acks
            .get(&epoch)
            .map_or(0, |by| replicas.iter().filter(|id| by.contains(id)).count());
        !replicas.is_empty() && acked >= self.membership.quorum()
    }

    /// Whether a request sealed in `epoch` executes (see the module doc): an epoch a quorum
    /// acknowledged, and one that every replica able to hold it acknowledged if some recent
    /// epoch is (a sealer that picks an epoch some correct replicas lack the key of would make
    /// their state lost).
    fn executes_sealed(&self, epoch: u64) -> bool {
        self.accepts_sealed(epoch)
            && (self.held_by_all(epoch) || !self.recent_epochs().any(|e| self.held_by_all(e)))
    }

    /// The current group epoch and the [`SEALED_EPOCHS_ACCEPTED`] before it.
    fn recent_epochs(&self) -> std::ops::RangeInclusive<u64> {
        let current = self.group_epoch();
        current.saturating_sub(SEALED_EPOCHS_ACCEPTED)..=current
    }

    /// Whether `epoch` is accepted for sealing and every current replica acknowledged it.
    fn held_by_all(&self, epoch: u64) -> bool {
        self.acked_by_all(epoch) && self.accepts_sealed(epoch)
    }

    /// Whether `epoch` is recent and a quorum acknowledged its key.
    fn accepts_sealed(&self, epoch: u64) -> bool {
        let current = self.group_epoch();
        epoch <= current && current - epoch <= SEALED_EPOCHS_ACCEPTED && self.acked_by_quorum(epoch)
    }

    /// The epoch a replica seals confidential requests in: the newest recent one every
    /// current replica that can hold it acknowledged, else the newest one a quorum did; `None`
    /// while there is none.
    pub fn sealable_epoch(&self) -> Option<u64> {
        self.recent_epochs()
            .rev()
            .find(|e| self.held_by_all(*e))
            .or_else(|| self.recent_epochs().rev().find(|e| self.accepts_sealed(*e)))
    }

    /// A replica holds the key of `epoch`, which the commit `commit` made: it counts for the
    /// unsettled commit, or for the sealing quorum of a recent settled epoch.
    fn key_ack(&mut self, client: NodeId, epoch: u64, commit: [u8; 32]) -> Bytes {
        if !self.membership.replica_ids().contains(&client) {
            return Bytes::from_static(b"refused: not a replica");
        }
        if let Some(t) = &mut self.tentative
            && t.digest == commit
            && t.made_for.checked_add(1) == Some(epoch)
        {
            if !t.refused.contains(&client) {
                t.applied.insert(client);
            }
            self.joining.remove(&client);
            self.joining_at.remove(&client);
            self.key_packages.remove(&client);
            self.settle_commit();
            return Bytes::from_static(b"ok");
        }
        let current = self.group_epoch();
        if epoch > current
            || current - epoch > SEALED_EPOCHS_ACCEPTED
            || self.epoch_commits.get(&epoch) != Some(&commit)
        {
            return Bytes::from_static(b"refused: not a recent epoch");
        }
        if epoch == 0 && Some(client) != self.creator {
            // Nobody but the creator holds the epoch the group was created in: another
            // replica claiming it would count as a holder it is not.
            return Bytes::from_static(b"refused: only the group's creator holds epoch 0");
        }
        self.joining.remove(&client);
        self.joining_at.remove(&client);
        self.key_packages.remove(&client);
        self.acks.entry(epoch).or_default().insert(client);
        Bytes::from_static(b"ok")
    }

    /// A replica that holds the epoch the unsettled commit `commit` was made for could not
    /// apply it (or its membership does not allow it).
    fn commit_refused(&mut self, client: NodeId, commit: [u8; 32]) -> Bytes {
        if !self.membership.replica_ids().contains(&client) {
            return Bytes::from_static(b"refused: not a replica");
        }
        match &mut self.tentative {
            Some(t) if t.digest == commit => {
                if !t.applied.contains(&client) {
                    t.refused.insert(client);
                }
                self.settle_commit();
                Bytes::from_static(b"ok")
            }
            _ => Bytes::from_static(b"refused: no such unsettled commit"),
        }
    }

    /// An ordered group commit (see the module doc, "Group commits").
    fn group_commit(&mut self, client: NodeId, commit: Bytes, welcome: Bytes) -> Bytes {
        if !self.membership.replica_ids().contains(&client) {
            return Bytes::from_static(b"refused: not a replica");
        }
        // Within what a snapshot holds: an oversized one would make every checkpoint taken
        // while it is pending, or in the history, impossible to restore.
        if commit.len() > MAX_MLS_MESSAGE_BYTES || welcome.len() > MAX_MLS_MESSAGE_BYTES {
            return Bytes::from_static(b"refused: too large");
        }
        if self.group_view().is_barred(&client) {
            return Bytes::from_static(b"refused: a commit of this replica was voided lately");
        }
        if !self.group_view().may_commit(&client) {
            return Bytes::from_static(b"refused: not this epoch's committer");
        }
        if self.tentative.is_some() {
            return Bytes::from_static(b"refused: another commit awaits its settlement");
        }
        match securesmart_membership::commit_epoch(&commit) {
            // (An epoch of u64::MAX could make no next epoch.)
            Ok(e) if e == self.group_epoch && e < u64::MAX => {
                let digest = securesmart_membership::commit_digest(&commit);
                self.group.push(GroupEvent::Commit {
                    commit: commit.clone(),
                    welcome: welcome.clone(),
                    settled: false,
                });
                self.tentative = Some(Tentative {
                    made_for: e,
                    digest,
                    from: client,
                    at: self.seq,
                    commit,
                    welcome,
                    applied: BTreeSet::new(),
                    refused: BTreeSet::new(),
                });
                Bytes::from_static(b"ok")
            }
            Ok(_) => Bytes::from_static(b"refused: not a commit for the current epoch"),
            Err(_) => Bytes::from_static(b"refused: not an MLS commit"),
        }
    }

    /// Keeps the unsettled commit once f + 1 current replicas applied it (at least one correct
    /// replica holds the new epoch) and all but f of those known to hold the epoch it was made
    /// for did (so a faulty committer cannot keep a commit that only it and one correct
    /// replica can open while the others lose the key); voids it once f + 1 that held that
    /// epoch could not (at least one correct replica could not: the commit is bad, and its
    /// orderer may order none for a while). Each replica counts once, for its first answer;
    /// when neither comes, the commit expires ([`NodeState::begin_batch`]).
    fn settle_commit(&mut self) {
        let replicas: BTreeSet<NodeId> = self.membership.replica_ids().into_iter().collect();
        let f = self.membership.f();
        let Some(t) = &self.tentative else {
            return;
        };
        let count = |set: &BTreeSet<NodeId>| set.intersection(&replicas).count();
        // The current replicas known to hold the epoch it was made for.
        let holders: BTreeSet<NodeId> = self
            .acks
            .get(&t.made_for)
            .map(|by| by.intersection(&replicas).copied().collect())
            .unwrap_or_default();
        let keep_at = 1.max(holders.len().saturating_sub(f));
        let applied_holders = t.applied.intersection(&holders).count();
        let refused_holders = t.refused.intersection(&holders).count();
        let kept = applied_holders >= keep_at && count(&t.applied) > f;
        // Voided once keeping it has become impossible.
        let voided = holders.len().saturating_sub(refused_holders) < keep_at;
        if !kept && !voided {
            return;
        }
        let Some(t) = self.tentative.take() else {
            return;
        };
        if kept {
            let epoch = t.made_for.saturating_add(1);
            self.group_epoch = epoch;
            let oldest = epoch.saturating_sub(SEALED_EPOCHS_ACCEPTED);
            self.epoch_commits.insert(epoch, t.digest);
            self.epoch_commits.retain(|e, _| *e >= oldest);
            self.acks.insert(epoch, t.applied);
            self.acks.retain(|e, _| *e >= oldest);
            self.commits.push_back((t.commit, t.welcome));
            while self.commits.len() > COMMIT_HISTORY {
                self.commits.pop_front();
            }
            metrics::counter!("securesmart_node_group_commits_settled_total", "outcome" => "kept")
                .increment(1);
            tracing::info!(epoch, "group commit kept");
        } else {
            metrics::counter!("securesmart_node_group_commits_settled_total", "outcome" => "voided")
                .increment(1);
            tracing::warn!(
                from = ?t.from,
                epoch = t.made_for,
                "group commit voided: replicas could not apply it; its orderer waits"
            );
            self.barred
                .insert(t.from, self.seq.saturating_add(COOLDOWN_SEQS));
        }
        self.last_settled = self.seq;
        self.group.push(GroupEvent::Settled {
            commit: t.digest,
            kept,
        });
    }

    /// Runs an application request, unless the application state is lost.
    fn app_execute(&mut self, request: &Request, payload: Bytes) -> Bytes {
        if self.lost {
            return Bytes::new();
        }
        self.app.execute(&Request {
            client: request.client,
            number: request.number,
            payload,
        })
    }

    /// A sealed request: see the module doc for the rule.
    fn sealed(&mut self, request: &Request, sealed: &[u8], by: SealedBy<'_>) -> Bytes {
        let refused = |why: &'static str| {
            metrics::counter!("securesmart_node_sealed_refused_total", "why" => why).increment(1);
            tracing::debug!(client = ?request.client, why, "sealed request refused");
            Bytes::new()
        };
        let Ok((epoch, sealer)) = securesmart_membership::sealed_header(sealed) else {
            return refused("malformed");
        };
        let sealer_ok = match by {
            // Only a current replica may seal for a client: a client, or a removed replica,
            // that made up a ciphertext in a replica's name is refused here, before anyone
            // tries to open it. (The sealer's signature, bound to the sender the header names,
            // is checked before ordering wherever no client channel vouches for the request; a
            // faulty primary that orders a faulty client's made-up ciphertext, held byte for
            // byte by the backups it sent it to, can name a correct sealer, which is no more
            // than it could do by sealing in its own name.)
            SealedBy::Replica(_) => self.membership.replica_ids().contains(&sealer),
            // A client seals in its own name only. What it makes up is refused alike at every
            // replica that holds the epoch (it does not open); one that lacks the epoch's key
            // loses its state, as it would for any confidential request of that epoch, which
            // the epoch rule below keeps to replicas that did not acknowledge it.
            SealedBy::Client => sealer == request.client,
        };
        if !sealer_ok {
            return refused("sealer");
        }
        // A client seals only in the epoch the replicas seal in now, so that clients leave an
        // old epoch (one a removed replica holds) when the replicas do: a client that kept an
        // old key is refused and fetches the new one.
        let epoch_ok = match by {
            SealedBy::Replica(_) => self.executes_sealed(epoch),
            // (The epoch `sealable_epoch` names always passes `executes_sealed`.)
            SealedBy::Client => self.sealable_epoch() == Some(epoch),
        };
        if !epoch_ok {
            return refused("epoch");
        }
        self.confidential = true;
        if self.lost {
            return Bytes::new();
        }
        let context = confidential_context(&request.client, request.number);
        let opened = match (&self.keys, &by) {
            (Some(keys), SealedBy::Replica(_)) => keys.open(sealed, &context),
            (Some(keys), SealedBy::Client) => {
                keys.open_from_client(sealed, &request.client, &context)
            }
            (None, _) => Err(GroupError::NotMember),
        };
        match opened {
            Ok(opened) => {
                let plaintext = Bytes::from(opened.plaintext);
                let operation = match by {
                    // The client signed a commitment to the nonce and operation; a faulty
                    // replica that sealed something else is caught here, alike at every
                    // replica.
                    SealedBy::Replica(commitment) => {
                        if crate::protocol::commitment(&plaintext) != *commitment {
                            return refused("commitment");
                        }
                        plaintext.slice(NONCE_LEN.min(plaintext.len())..)
                    }
                    // The client signed the ciphertext it sealed itself.
                    SealedBy::Client => plaintext,
                };
                metrics::counter!("securesmart_node_sealed_opened_total").increment(1);
                let result = self.app_execute(request, operation);
                // Marked, so that an empty result is not taken for a refusal (empty).
                let mut marked = Vec::with_capacity(1 + result.len());
                marked.push(crate::protocol::CONFIDENTIAL_EXECUTED);
                marked.extend_from_slice(&result);
                Bytes::from(marked)
            }
            Err(GroupError::Tampered) => refused("does_not_open"),
            Err(e) => {
                metrics::counter!("securesmart_node_state_lost_total").increment(1);
                tracing::warn!(
                    epoch,
                    error = %e,
                    "cannot open a sealed request: application state lost until state transfer"
                );
                self.lost = true;
                Bytes::new()
            }
        }
    }

    /// Writes the replicated state besides the application ([`Public`]).
    fn encode_public(&self, w: &mut Writer) {
        w.u8(VERSION);
        w.u32(u32::try_from(self.admins.len()).unwrap_or(u32::MAX));
        for cert in self.admins.values() {
            w.bytes(cert);
        }
        w.u32(u32::try_from(self.admin_votes.len()).unwrap_or(u32::MAX));
        for (voter, cert) in &self.admin_votes {
            w.raw(voter.as_bytes()).bytes(cert);
        }
        w.raw(&self.group_epoch.to_be_bytes());
        w.u32(u32::try_from(self.epoch_commits.len()).unwrap_or(u32::MAX));
        for (epoch, digest) in &self.epoch_commits {
            w.raw(&epoch.to_be_bytes()).raw(digest);
        }
        match &self.tentative {
            Some(t) => {
                w.u8(1)
                    .raw(&t.made_for.to_be_bytes())
                    .raw(t.from.as_bytes())
                    .raw(&t.at.to_be_bytes())
                    .bytes(&t.commit)
                    .bytes(&t.welcome);
                write_ids(w, &t.applied);
                write_ids(w, &t.refused);
            }
            None => {
                w.u8(0);
            }
        }
        w.u32(u32::try_from(self.barred.len()).unwrap_or(u32::MAX));
        for (id, until) in &self.barred {
            w.raw(id.as_bytes()).raw(&until.to_be_bytes());
        }
        w.u32(u32::try_from(self.joining.len()).unwrap_or(u32::MAX));
        for id in self.joining.keys() {
            let at = self.joining_at.get(id).copied().unwrap_or_default();
            let kp = self.key_packages.get(id).cloned().unwrap_or_default();
            w.raw(id.as_bytes()).raw(&at.to_be_bytes()).bytes(&kp);
        }
        match &self.creator {
            Some(id) => w.u8(1).raw(id.as_bytes()),
            None => w.u8(0),
        };
        w.raw(&self.last_settled.to_be_bytes());

        w.u32(u32::try_from(self.acks.len()).unwrap_or(u32::MAX));
        for (epoch, by) in &self.acks {
            w.raw(&epoch.to_be_bytes());
            write_ids(w, by);
        }
        w.u8(u8::from(self.confidential))
            .u32(u32::try_from(self.commits.len()).unwrap_or(u32::MAX));
        for (commit, welcome) in &self.commits {
            w.bytes(commit).bytes(welcome);
        }
        w.bytes(&self.membership.encode());
        self.rosters.write(w);
    }

    fn set_public(&mut self, p: Public) {
        self.membership = p.membership;
        self.rosters = p.rosters;
        self.admins = p.admins;
        self.admin_votes = p.admin_votes;
        self.group_epoch = p.group_epoch;
        self.epoch_commits = p.epoch_commits;
        self.barred = p.barred;
        self.joining = p.joining;
        self.joining_at = p.joining_at;
        self.key_packages = p.key_packages;
        self.creator = p.creator;
        self.last_settled = p.last_settled;
        self.acks = p.acks;

        self.confidential = p.confidential;
        self.changes.clear();
        // The commits again, for the node's group member to catch up on those it missed
        // (it skips those it merged).
        self.group = p
            .commits
            .iter()
            .map(|(commit, welcome)| GroupEvent::Commit {
                commit: commit.clone(),
                welcome: welcome.clone(),
                settled: true,
            })
            .collect();
        if let Some(t) = &p.tentative {
            self.group.push(GroupEvent::Commit {
                commit: t.commit.clone(),
                welcome: t.welcome.clone(),
                settled: false,
            });
        }
        self.tentative = p.tentative;
        self.commits = p.commits;
    }

    /// Whether a confidential request has executed: checkpoints are then sealed (see the
    /// module doc).
    pub fn confidential(&self) -> bool {
        self.confidential
    }

    /// Group messages executed since the last call, in order.
    pub fn take_group_events(&mut self) -> Vec<GroupEvent> {
        std::mem::take(&mut self.group)
    }

    fn group_message(&mut self, client: NodeId, event: GroupEvent) -> Bytes {
        if !self.membership.replica_ids().contains(&client) {
            return Bytes::from_static(b"refused: not a replica");
        }
        self.group.push(event);
        Bytes::from_static(b"ok")
    }

    /// The current membership.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The rosters clients follow (see `securesmart::roster`).
    pub fn rosters(&self) -> &RosterLog {
        &self.rosters
    }

    /// The application.
    pub fn app(&self) -> &S {
        &self.app
    }

    /// What executed commands changed since the last call.
    pub fn take_changes(&mut self) -> Vec<Applied> {
        std::mem::take(&mut self.changes)
    }

    /// The administrators' own commands (`AddAdmin`, `RemoveAdmin`, ordered by an
    /// administrator): applied here, to the replicated list, not to the membership. Returns
    /// the reply (`ok administrators N` or `refused: why`), or `None` for a membership command.
    fn admin_command(
        &mut self,
        client: NodeId,
        cmd: &MembershipCommand,
        time: u64,
    ) -> Option<String> {
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(time));
        let reply = match cmd {
            MembershipCommand::AddAdmin { certificate } => {
                match self.membership.admissible_admin(certificate, now) {
                    // A renewal of an administrator's certificate (the same key), ordered by a
                    // working administrator: only forward, as a replica's (a step back would
                    // dodge a CRL naming the newer serial).
                    Ok(id) if self.admins.contains_key(&id) => {
                        let later = self.admins.get(&id).is_some_and(|held| {
                            securesmart_membership::epoch::starts_later(certificate, held)
                                .unwrap_or(false)
                        });
                        if later && self.is_admin(&client, time) {
                            self.admins
                                .insert(id, Bytes::copy_from_slice(certificate));
                            tracing::info!(admin = ?id, "administrator certificate renewed");
                            format!("ok administrators {}", self.admins.len())
                        } else {
                            "refused: already an administrator".to_string()
                        }
                    }
                    Ok(_)
                        if !self.is_admin(&client, time)
                            && self.admins.keys().any(|a| self.is_admin(a, time)) =>
                    {
                        "refused: a working administrator exists (replicas vote only when none does)"
                            .to_string()
                    }
                    Ok(id) if !self.is_admin(&client, time) => {
                        // A replica's vote (recovery when no administrator works): a quorum
                        // of the current replicas naming the same certificate adds it.
                        let replicas = self.membership.replica_ids();
                        self.admin_votes.retain(|voter, _| replicas.contains(voter));
                        self.admin_votes
                            .insert(client, Bytes::copy_from_slice(certificate));
                        let votes = self
                            .admin_votes
                            .values()
                            .filter(|c| c.as_ref() == certificate.as_slice())
                            .count();
                        if votes < self.membership.quorum() {
                            format!("ok votes {votes} of {}", self.membership.quorum())
                        } else {
                            // Recovered: every vote is spent (a stale one must not count
                            // towards a later recovery).
                            self.admin_votes.clear();
                            self.admins
                                .insert(id, Bytes::copy_from_slice(certificate));
                            tracing::warn!(admin = ?id, "administrator added by a quorum of the replicas");
                            format!("ok administrators {}", self.admins.len())
                        }
                    }
                    Ok(id) => {
                        self.admin_votes.clear();
                        self.admins
                            .insert(id, Bytes::copy_from_slice(certificate));
                        tracing::info!(admin = ?id, "administrator added");
                        format!("ok administrators {}", self.admins.len())
                    }
                    Err(e) => format!("refused: {e}"),
                }
            }
            MembershipCommand::RemoveAdmin { id } => {
                // The working ones (not revoked, not expired) must not all go: a stolen
                // administrator key must not be able to remove the others before its own
                // revocation leaves nobody.
                let working_after = self
                    .admins
                    .keys()
                    .filter(|a| *a != id && self.is_admin(a, time))
                    .count();
                if !self.admins.contains_key(id) {
                    "refused: not an administrator".to_string()
                } else if working_after == 0 {
                    "refused: the last working administrator stays".to_string()
                } else {
                    self.admins.remove(id);
                    self.admin_votes.clear();
                    tracing::info!(admin = ?id, "administrator removed");
                    format!("ok administrators {}", self.admins.len())
                }
            }
            _ => return None,
        };
        Some(reply)
    }

    /// Whether `id` is a working administrator at `time`: listed, its certificate valid then,
    /// and revoked neither by the ordered CRL nor by an ordered `RevokeCertificates`.
    fn is_admin(&self, id: &NodeId, time: u64) -> bool {
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(time));
        self.admins.get(id).is_some_and(|cert| {
            !self.membership.revokes(cert)
                && !self.membership.is_revoked(id)
                && securesmart_membership::epoch::valid_at(cert, now)
        })
    }

    /// Whether `client` may order `cmd` (at the ordered `time`).
    fn allowed(&self, client: NodeId, time: u64, cmd: &MembershipCommand) -> bool {
        match cmd {
            // Anyone: the CRL and the certificates prove themselves.
            MembershipCommand::UpdateCrl { .. } | MembershipCommand::RevokeCertificates { .. } => {
                true
            }
            MembershipCommand::RemoveNode { id } if *id == client => true,
            // A replica renews its own certificate (the same key: the same id).
            MembershipCommand::RenewNode { certificate }
                if securesmart_transport::node_id(&rustls::pki_types::CertificateDer::from(
                    certificate.as_slice(),
                ))
                .is_ok_and(|id| id == client) =>
            {
                true
            }
            // A current replica: as a vote for recovering administrators.
            MembershipCommand::AddAdmin { .. }
                if self.membership.replica_ids().contains(&client) =>
            {
                true
            }
            // An administrator whose certificate is revoked or expired is one no more.
            _ => self.is_admin(&client, time),
        }
    }

    fn command(&mut self, client: NodeId, time: u64, command: &[u8]) -> Bytes {
        let decoded = MembershipCommand::decode(command);
        if let Ok(cmd) = &decoded
            && self.allowed(client, time, cmd)
            && let Some(reply) = self.admin_command(client, cmd, time)
        {
            metrics::counter!("securesmart_node_admin_commands_total").increment(1);
            return Bytes::from(reply);
        }
        let result = decoded
            .map_err(|e| format!("malformed command: {e}"))
            .and_then(|cmd| {
                if !self.allowed(client, time, &cmd) {
                    return Err("not an administrator (or revoked)".to_string());
                }
                self.membership
                    .apply(
                        &cmd,
                        UnixTime::since_unix_epoch(std::time::Duration::from_secs(time)),
                    )
                    .map_err(|e| e.to_string())
            });
        match &result {
            Ok(applied) => {
                metrics::counter!("securesmart_node_membership_changes_total").increment(1);
                tracing::info!(
                    epoch = self.membership.epoch(),
                    ?applied,
                    "membership changed"
                );
                let m = &self.membership;
                // A replica that leaves takes its vote with it (were it to rejoin, the old vote
                // must not count in the new membership).
                self.admin_votes
                    .retain(|id, _| m.members().contains_key(id));
                self.barred.retain(|id, _| m.members().contains_key(id));
                self.joining.retain(|id, _| m.members().contains_key(id));
                self.joining_at.retain(|id, _| m.members().contains_key(id));
                self.key_packages
                    .retain(|id, _| m.members().contains_key(id));
                self.changes.push(applied.clone());
                if self.rosters.observe(&self.membership) {
                    tracing::info!(
                        roster = self.rosters.current().number(),
                        "new roster: awaiting the previous roster's signatures"
                    );
                }
            }
            Err(why) => {
                metrics::counter!("securesmart_node_membership_refusals_total").increment(1);
                tracing::info!(%why, ?client, "membership command refused");
            }
        }
        command_reply(&result, self.membership.epoch())
    }
}

impl<S: StateMachine> StateMachine for NodeState<S> {
    fn execute(&mut self, request: &Request) -> Bytes {
        // The submitter's signature was checked before ordering where no channel vouched for
        // the request (`protocol::request_check`); execution does not check it again.
        let submission = Submission::decode(&request.payload);
        if let Ok(Submission {
            auth: Some(auth),
            ordered: Ordered::RosterAck { roster, digest },
        }) = &submission
        {
            let before = self.rosters.certified().number();
            return match self
                .rosters
                .ack(request.client, request.number, *auth, *roster, digest)
            {
                Ok(()) => {
                    let certified = self.rosters.certified().number();
                    if certified != before {
                        metrics::gauge!("securesmart_node_roster").set(certified as f64);
                        tracing::info!(roster = certified, "roster certified");
                    }
                    Bytes::from_static(b"ok")
                }
                Err(why) => {
                    tracing::debug!(from = ?request.client, roster, %why, "roster acknowledgement refused");
                    Bytes::from(format!("refused: {why}"))
                }
            };
        }
        // A certificate the ordered CRL revokes (as an ordered `RevokeCertificates` proved)
        // authorizes nothing, whichever replica relays its signed requests.
        if self.membership.is_revoked(&request.client)
            && let Ok(Submission { ordered, .. }) = &submission
            && matches!(
                ordered,
                Ordered::App(_)
                    | Ordered::Sealed { .. }
                    | Ordered::ClientSealed(_)
                    | Ordered::Command { .. }
            )
        {
            metrics::counter!("securesmart_node_revoked_requests_total").increment(1);
            tracing::info!(client = ?request.client, "request of a revoked certificate refused");
            return if matches!(ordered, Ordered::Command { .. }) {
                Bytes::from_static(b"refused: revoked")
            } else {
                Bytes::new()
            };
        }
        match submission.map(|s| s.ordered) {
            Ok(Ordered::RosterAck { .. }) => Bytes::from_static(b"refused: unsigned"),
            Ok(Ordered::App(payload)) => self.app_execute(request, payload),
            Ok(Ordered::Sealed {
                commitment,
                sealer: _,
                sealed,
            }) => self.sealed(request, &sealed, SealedBy::Replica(&commitment)),
            Ok(Ordered::ClientSealed(sealed)) => self.sealed(request, &sealed, SealedBy::Client),
            Ok(Ordered::KeyAck { epoch, commit }) => self.key_ack(request.client, epoch, commit),
            Ok(Ordered::CommitRefused(commit)) => self.commit_refused(request.client, commit),
            Ok(Ordered::Command { time, command }) => self.command(request.client, time, &command),
            Ok(Ordered::KeyPackage(key_package)) if key_package.len() > MAX_KEY_PACKAGE_BYTES => {
                // (A Welcome carries the key packages it adds: a huge one would make it too
                // large for a snapshot.)
                Bytes::from_static(b"refused: key package too large")
            }
            Ok(Ordered::KeyPackage(key_package)) => {
                let digest = securesmart_membership::key_package_digest(&key_package);
                let kept_package = key_package.clone();
                if self
                    .joining_at
                    .get(&request.client)
                    .is_some_and(|at| self.seq < at.saturating_add(KEY_PACKAGE_REFRESH_SEQS))
                {
                    return Bytes::from_static(b"refused: it asked to be added lately");
                }
                let reply = self.group_message(
                    request.client,
                    GroupEvent::KeyPackage {
                        from: request.client,
                        key_package,
                    },
                );
                if reply.starts_with(b"ok") {
                    // It asks to be added with exactly this key package (the commit policy).
                    self.joining.insert(request.client, digest);
                    self.joining_at.insert(request.client, self.seq);
                    self.key_packages.insert(request.client, kept_package);
                }
                reply
            }
            Ok(Ordered::GroupCommit { commit, welcome }) => {
                self.group_commit(request.client, commit, welcome)
            }
            Err(e) => {
                metrics::counter!("securesmart_node_undecodable_ordered_total").increment(1);
                tracing::warn!(error = %e, client = ?request.client, "ordered request does not decode");
                Bytes::new()
            }
        }
    }

    fn state_known(&self) -> bool {
        !self.lost && self.app.state_known()
    }

    fn snapshot(&self) -> Bytes {
        let mut w = Writer::default();
        self.encode_public(&mut w);
        w.bytes(&self.app.snapshot());
        Bytes::from(w.buf)
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        let mut r = Reader::new(snapshot);
        let public = Public::decode(&mut r)?;
        let app = r.bytes("application", usize::MAX)?;
        r.finish()?;
        self.app.restore(app)?;
        self.set_public(public);
        self.lost = false;
        Ok(())
    }

    fn seal_checkpoint(&self, seq: Seq, state: Bytes) -> Option<Bytes> {
        if !self.confidential {
            let mut out = Vec::with_capacity(1 + state.len());
            out.push(CHECKPOINT_CLEAR);
            out.extend_from_slice(&state);
            return Some(Bytes::from(out));
        }
        let epoch = self.sealable_epoch().unwrap_or(self.group_epoch());
        let sealed = match &self.keys {
            Some(keys) => keys.seal_shared(epoch, &checkpoint_context(seq), &state),
            None => Err(GroupError::NotMember),
        };
        match sealed {
            Ok(sealed) => {
                metrics::counter!("securesmart_node_checkpoints_sealed_total").increment(1);
                let mut w = Writer::default();
                w.u8(CHECKPOINT_SEALED);
                self.encode_public(&mut w);
                w.bytes(&sealed);
                Some(Bytes::from(w.buf))
            }
            Err(e) => {
                metrics::counter!("securesmart_node_state_lost_total").increment(1);
                tracing::warn!(seq, epoch, error = %e, "cannot seal the checkpoint: state lost until state transfer");
                None
            }
        }
    }

    fn open_checkpoint(&mut self, seq: Seq, sealed: &Bytes) -> Result<Option<Bytes>, RestoreError> {
        let mut r = Reader::new(sealed);
        match r.u8()? {
            CHECKPOINT_CLEAR => return Ok(Some(sealed.slice(1..))),
            CHECKPOINT_SEALED => {}
            other => return Err(RestoreError::Malformed(format!("checkpoint tag {other}"))),
        }
        let public = Public::decode(&mut r)?;
        let ciphertext = r.bytes("sealed state", usize::MAX)?;
        r.finish()?;
        let epoch = securesmart_membership::sealed_epoch(ciphertext)
            .map_err(|e| RestoreError::Malformed(e.to_string()))?;
        let opened = match &self.keys {
            Some(keys) => keys.open(ciphertext, &checkpoint_context(seq)),
            None => Err(GroupError::NotMember),
        };
        match opened {
            Ok(opened) => Ok(Some(Bytes::from(opened.plaintext))),
            Err(e) => {
                // The membership and the group bookkeeping are in the clear: take them, so
                // that this replica follows membership and group messages; the application's
                // state waits for a checkpoint this replica can open.
                metrics::counter!("securesmart_node_state_lost_total").increment(1);
                tracing::warn!(seq, epoch, error = %e, "cannot open the sealed checkpoint: application state lost until a later one");
                self.set_public(public);
                self.lost = true;
                Ok(None)
            }
        }
    }
}

/// The replicated state besides the application: what a sealed checkpoint keeps in the clear.
struct Public {
    admins: BTreeMap<NodeId, Bytes>,
    admin_votes: BTreeMap<NodeId, Bytes>,
    group_epoch: u64,
    epoch_commits: BTreeMap<u64, [u8; 32]>,
    tentative: Option<Tentative>,
    barred: BTreeMap<NodeId, Seq>,
    joining: BTreeMap<NodeId, [u8; 32]>,
    joining_at: BTreeMap<NodeId, Seq>,
    key_packages: BTreeMap<NodeId, Bytes>,
    creator: Option<NodeId>,
    last_settled: Seq,

    acks: BTreeMap<u64, BTreeSet<NodeId>>,
    confidential: bool,
    commits: VecDeque<(Bytes, Bytes)>,
    membership: Membership,
    rosters: RosterLog,
}

/// Writes a count and the node ids ([`read_ids`] reads them).
fn write_ids(w: &mut Writer, ids: &BTreeSet<NodeId>) {
    w.u32(u32::try_from(ids.len()).unwrap_or(u32::MAX));
    for id in ids {
        w.raw(id.as_bytes());
    }
}

/// Reads a count and that many node ids, at most `max` (else `too_many`).
fn read_ids(
    r: &mut Reader<'_>,
    max: usize,
    too_many: &'static str,
) -> Result<BTreeSet<NodeId>, RestoreError> {
    let n = r.u32()? as usize;
    if n > max {
        return Err(RestoreError::Malformed(too_many.into()));
    }
    let mut ids = BTreeSet::new();
    for _ in 0..n {
        ids.insert(NodeId::from_bytes(r.array()?));
    }
    Ok(ids)
}

impl Public {
    fn decode(r: &mut Reader<'_>) -> Result<Self, RestoreError> {
        r.version(VERSION)?;
        let n = r.u32()? as usize;
        if n > MAX_ADMINS {
            return Err(RestoreError::Malformed("too many administrators".into()));
        }
        let mut admins = BTreeMap::new();
        for _ in 0..n {
            let cert = r.bytes(
                "administrator",
                securesmart_membership::epoch::MAX_CERT_BYTES,
            )?;
            let id = securesmart_transport::node_id(&rustls::pki_types::CertificateDer::from(cert))
                .map_err(|e| RestoreError::Malformed(format!("administrator: {e}")))?;
            admins.insert(id, Bytes::copy_from_slice(cert));
        }
        let n = r.u32()? as usize;
        if n > MAX_ACKS {
            return Err(RestoreError::Malformed(
                "too many administrator votes".into(),
            ));
        }
        let mut admin_votes = BTreeMap::new();
        for _ in 0..n {
            let voter = NodeId::from_bytes(r.array()?);
            let cert = r.bytes(
                "administrator vote",
                securesmart_membership::epoch::MAX_CERT_BYTES,
            )?;
            admin_votes.insert(voter, Bytes::copy_from_slice(cert));
        }
        let group_epoch = u64::from_be_bytes(r.array()?);
        let n = r.u32()? as usize;
        if n > SEALED_EPOCHS_ACCEPTED as usize + 1 {
            return Err(RestoreError::Malformed("too many epoch commits".into()));
        }
        let mut epoch_commits = BTreeMap::new();
        for _ in 0..n {
            let epoch = u64::from_be_bytes(r.array()?);
            epoch_commits.insert(epoch, r.array()?);
        }
        let tentative = match r.u8()? {
            0 => None,
            1 => {
                let made_for = u64::from_be_bytes(r.array()?);
                let from = NodeId::from_bytes(r.array()?);
                let at = u64::from_be_bytes(r.array()?);
                let commit =
                    Bytes::copy_from_slice(r.bytes("group commit", MAX_MLS_MESSAGE_BYTES)?);
                let welcome = Bytes::copy_from_slice(r.bytes("welcome", MAX_MLS_MESSAGE_BYTES)?);
                let applied = read_ids(r, MAX_ACKS, "too many acknowledgements")?;
                let refused = read_ids(r, MAX_ACKS, "too many refusals")?;
                Some(Tentative {
                    made_for,
                    digest: securesmart_membership::commit_digest(&commit),
                    from,
                    at,
                    commit,
                    welcome,
                    applied,
                    refused,
                })
            }
            other => {
                return Err(RestoreError::Malformed(format!(
                    "tentative commit tag {other}"
                )));
            }
        };
        let n = r.u32()? as usize;
        if n > MAX_ACKS {
            return Err(RestoreError::Malformed("too many barred replicas".into()));
        }
        let mut barred = BTreeMap::new();
        for _ in 0..n {
            let id = NodeId::from_bytes(r.array()?);
            barred.insert(id, u64::from_be_bytes(r.array()?));
        }
        let n = r.u32()? as usize;
        if n > MAX_ACKS {
            return Err(RestoreError::Malformed("too many joining replicas".into()));
        }
        let (mut joining, mut joining_at, mut key_packages) =
            (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        for _ in 0..n {
            let id = NodeId::from_bytes(r.array()?);
            joining_at.insert(id, u64::from_be_bytes(r.array()?));
            let kp = Bytes::copy_from_slice(r.bytes("key package", MAX_MLS_MESSAGE_BYTES)?);
            joining.insert(id, securesmart_membership::key_package_digest(&kp));
            key_packages.insert(id, kp);
        }
        let creator = match r.u8()? {
            0 => None,
            1 => Some(NodeId::from_bytes(r.array()?)),
            other => return Err(RestoreError::Malformed(format!("creator tag {other}"))),
        };
        let last_settled = u64::from_be_bytes(r.array()?);

        let epochs = r.u32()? as usize;
        if epochs > SEALED_EPOCHS_ACCEPTED as usize + 1 {
            return Err(RestoreError::Malformed(
                "too many acknowledged epochs".into(),
            ));
        }
        let mut acks = BTreeMap::new();
        for _ in 0..epochs {
            let epoch = u64::from_be_bytes(r.array()?);
            acks.insert(epoch, read_ids(r, MAX_ACKS, "too many acknowledgements")?);
        }
        let confidential = match r.u8()? {
            0 => false,
            1 => true,
            other => {
                return Err(RestoreError::Malformed(format!(
                    "confidential flag {other}"
                )));
            }
        };
        let n = r.u32()? as usize;
        if n > COMMIT_HISTORY {
            return Err(RestoreError::Malformed("too many group commits".into()));
        }
        let mut commits = VecDeque::with_capacity(n);
        for _ in 0..n {
            let commit = r.bytes("group commit", MAX_MLS_MESSAGE_BYTES)?;
            let welcome = r.bytes("welcome", MAX_MLS_MESSAGE_BYTES)?;
            commits.push_back((
                Bytes::copy_from_slice(commit),
                Bytes::copy_from_slice(welcome),
            ));
        }
        let membership = Membership::decode(r.bytes("membership", usize::MAX)?)?;
        let rosters = RosterLog::read(r)?;
        if rosters.current().replicas() != Roster::of(0, &membership).replicas() {
            return Err(RestoreError::Malformed(
                "the roster is not the membership's replicas".into(),
            ));
        }
        Ok(Self {
            admins,
            admin_votes,
            group_epoch,
            epoch_commits,
            tentative,
            barred,
            joining,
            joining_at,
            key_packages,
            creator,
            last_settled,

            acks,
            confidential,
            commits,
            membership,
            rosters,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvOp, KvReply, KvStore};
    use crate::protocol::confidential_context;
    use securesmart_membership::{GroupConfig, GroupMember};
    use securesmart_transport::Role;
    use securesmart_transport::pki::DevCa;
    use std::time::Duration;

    thread_local! {
        /// Four replicas (their identities) and their genesis membership: replica 0 seals in
        /// the tests' groups of one.
        static FOUR: (Vec<securesmart_transport::Identity>, Membership) = {
            let ca = DevCa::new("state fixture ca").unwrap();
            let (ids, members) = replicas_of(&ca, 4);
            let m = Membership::genesis(ca.certificate(), members, UnixTime::now()).unwrap();
            (ids, m)
        };
    }

    fn four_replicas() -> Membership {
        FOUR.with(|f| f.1.clone())
    }

    /// A state with four replicas that all acknowledged the key of epoch 0.
    fn state() -> NodeState<KvStore> {
        let m = four_replicas();
        let ids = m.replica_ids();
        let mut s = NodeState::new(m, Vec::new(), KvStore::default());
        let ack = |id: NodeId| Request {
            client: id,
            number: 1,
            payload: Ordered::KeyAck {
                epoch: 0,
                commit: CREATION_DIGEST,
            }
            .encode(),
        };
        // Only the creator (the smallest id) holds epoch 0: another replica's claim is refused.
        assert_eq!(&s.execute(&ack(ids[0]))[..], b"ok");
        assert!(s.execute(&ack(ids[1])).starts_with(b"refused"));
        // The tests seal in epoch 0 as if all four held it (in a cluster the others join in
        // later epochs).
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(s.sealable_epoch(), (i >= 3).then_some(0), "quorum of 3");
            s.acks.entry(0).or_default().insert(*id);
        }
        s
    }

    /// A confidential request as intake orders it: nonce and operation sealed, with the
    /// commitment beside (unsigned: the engine checks signatures, not the state).
    fn sealed_op(keys: &PayloadKeys, client: NodeId, number: u64, op: &KvOp) -> Request {
        let mut plaintext = vec![7u8; NONCE_LEN];
        plaintext.extend_from_slice(&op.encode());
        let sealed = keys
            .seal(&confidential_context(&client, number), &plaintext)
            .unwrap();
        Request {
            client,
            number,
            payload: Ordered::Sealed {
                commitment: crate::protocol::commitment(&plaintext),
                // (The engine checks the sealer's signature; the state, that the sealer the
                // header names is a replica.)
                sealer: crate::protocol::Auth {
                    public_key: [0; 32],
                    signature: [0; 64],
                },
                sealed: Bytes::from(sealed),
            }
            .encode(),
        }
    }

    /// The key-value reply of an executed confidential request (marked as executed).
    fn confidential_result(reply: &[u8]) -> KvReply {
        let Some((&crate::protocol::CONFIDENTIAL_EXECUTED, result)) = reply.split_first() else {
            panic!("not an executed confidential request: {reply:?}")
        };
        KvReply::decode(result).unwrap()
    }

    fn sealed_put(keys: &PayloadKeys, client: NodeId, number: u64, value: &str) -> Request {
        let op = KvOp::Put {
            key: Bytes::from_static(b"k"),
            value: Bytes::from(value.to_owned()),
        };
        sealed_op(keys, client, number, &op)
    }

    /// A CA for clients, a group of one member (replica 0 of [`state`]) with its keys, and a
    /// client id.
    fn group_of_one() -> (DevCa, GroupMember, PayloadKeys, NodeId) {
        let ca = DevCa::new("state ca").unwrap();
        let identity = FOUR.with(|f| f.0[0].clone());
        let mut member = GroupMember::new(&identity, GroupConfig::default()).unwrap();
        member.create(Duration::ZERO).unwrap();
        let keys = member.payload_keys();
        let client = ca.issue_role("c", Role::Client).unwrap().id();
        (ca, member, keys, client)
    }

    #[test]
    fn a_ciphertext_made_up_by_a_client_or_a_removed_replica_makes_nobody_lost() {
        // Someone who is not a current replica (a client, a removed replica with old keys)
        // seals in a group of its own, names itself as the sender and signs it: the engine's
        // check passes, but the state refuses it before opening, so a replica without the key
        // does not lose its state.
        let ca = DevCa::new("outsider ca").unwrap();
        let outsider = ca.issue_role("outsider", Role::Replica).unwrap();
        let mut member = GroupMember::new(&outsider, GroupConfig::default()).unwrap();
        member.create(Duration::ZERO).unwrap();
        let client = ca.issue_role("c", Role::Client).unwrap().id();
        let made_up = sealed_put(&member.payload_keys(), client, 1, "v");
        let mut keyless = state();
        assert!(keyless.execute(&made_up).is_empty());
        assert!(keyless.state_known(), "refused, not lost");
        // The same sealed by a current replica executes where the key is.
        let (_ca, _member, keys, client) = group_of_one();
        let mut holder = state().with_payload_keys(keys.clone());
        let honest = sealed_put(&keys, client, 1, "v");
        assert_eq!(
            confidential_result(&holder.execute(&honest)),
            KvReply::Value(None)
        );
    }

    #[test]
    fn a_sealer_cannot_pick_an_epoch_some_correct_replicas_lack_and_make_them_lost() {
        let (_ca, mut member, keys, client) = group_of_one();
        // Epoch 1: a quorum (3 of 4) acknowledged it; epoch 0 every replica did.
        let p = member.propose_update().unwrap();
        member.apply_commit(&p.commit, Duration::ZERO).unwrap();
        assert_eq!(keys.current(), Some(1));
        let at_epoch_1 = |s: &mut NodeState<KvStore>| {
            let ids = s.membership().replica_ids();
            s.group_epoch = 1;
            s.epoch_commits.insert(1, [1; 32]);
            s.acks.insert(1, ids[..3].iter().copied().collect());
        };
        // A faulty sealer seals in epoch 1 while epoch 0 is held by all: the fourth replica,
        // correct but without the key of epoch 1, would lose its state; it is refused
        // everywhere instead, and nobody's state is lost.
        let in_1 = sealed_put(&keys, client, 1, "v");
        let mut lacking = state();
        at_epoch_1(&mut lacking);
        assert!(lacking.execute(&in_1).is_empty());
        assert!(lacking.state_known(), "refused, not lost");
        let mut holding = state().with_payload_keys(keys.clone());
        at_epoch_1(&mut holding);
        assert!(
            holding.execute(&in_1).is_empty(),
            "the same verdict everywhere"
        );
        assert_eq!(holding.sealable_epoch(), Some(0));
        // Once all acknowledged epoch 1, it executes.
        let ids = holding.membership().replica_ids();
        holding.acks.insert(1, ids.iter().copied().collect());
        let again = sealed_put(&keys, client, 2, "v");
        assert_eq!(
            confidential_result(&holding.execute(&again)),
            KvReply::Value(None)
        );
    }

    #[test]
    fn sealed_requests_execute_with_the_key_and_are_refused_or_lose_the_state_without() {
        let (ca, mut member, keys, client) = group_of_one();
        let other = ca.issue_role("c2", Role::Client).unwrap().id();

        // Until a quorum of replicas acknowledged the key, a sealed request is refused: not
        // executed anywhere, and nobody's state is lost.
        let mut forming = state();
        forming.acks.clear();
        let early = sealed_put(&keys, client, 9, "early");
        assert!(forming.execute(&early).is_empty());
        assert!(forming.state_known());

        // A member with the key executes it; the log holds no plaintext.
        let mut with_key = state().with_payload_keys(keys.clone());
        let put = sealed_put(&keys, client, 1, "secret-value");
        assert!(
            !put.payload
                .windows(b"secret-value".len())
                .any(|w| w == b"secret-value")
        );
        assert_eq!(
            confidential_result(&with_key.execute(&put)),
            KvReply::Value(None)
        );
        assert!(with_key.state_known());

        // Copied into another client's request it does not open: refused, not executed.
        let mut stolen = put.clone();
        stolen.client = other;
        assert!(with_key.execute(&stolen).is_empty());
        // Sealed by a faulty replica as something other than what the client committed to:
        // refused, alike everywhere.
        let mut swapped = sealed_put(&keys, client, 4, "swapped");
        let honest = sealed_put(&keys, client, 4, "what-the-client-signed");
        let (Ok(Ordered::Sealed { sealed, .. }), Ok(Ordered::Sealed { commitment, .. })) = (
            Ordered::decode(&swapped.payload),
            Ordered::decode(&honest.payload),
        ) else {
            panic!("sealed requests")
        };
        swapped.payload = Ordered::Sealed {
            commitment,
            sealer: crate::protocol::Auth {
                public_key: [0; 32],
                signature: [0; 64],
            },
            sealed,
        }
        .encode();
        assert!(with_key.execute(&swapped).is_empty());
        assert!(with_key.state_known());
        assert!(with_key.state_known());

        // A replica without the key cannot compute the state: lost until restored.
        let mut without = state();
        let snapshot = without.snapshot();
        assert!(without.execute(&put).is_empty());
        assert!(!without.state_known());
        // It keeps executing membership commands; application requests are not run.
        let plain = Request {
            client,
            number: 2,
            payload: Ordered::App(Bytes::from(KvOp::Get { key: "k".into() }.encode())).encode(),
        };
        assert!(without.execute(&plain).is_empty());
        without.restore(&with_key.snapshot()).unwrap();
        assert!(without.state_known());
        assert_ne!(without.snapshot(), snapshot);

        // Sealed in an epoch the replicated state does not accept (ahead of it): refused
        // everywhere alike, keys or not.
        let mut behind = state().with_payload_keys(keys.clone());
        behind.group_epoch = 0;
        let ahead = {
            // Move the member two epochs on: its payload is sealed in epoch 2.
            for _ in 0..2 {
                let p = member.propose_update().unwrap();
                member.apply_commit(&p.commit, Duration::ZERO).unwrap();
            }
            sealed_put(&keys, client, 3, "later")
        };
        assert!(behind.execute(&ahead).is_empty());
        assert!(behind.state_known());
    }

    /// A confidential request `client` sealed itself with its key of `epoch` (unsigned: the
    /// engine checks signatures, not the state).
    fn client_sealed_put(
        keys: &PayloadKeys,
        epoch: u64,
        client: NodeId,
        number: u64,
        value: &str,
    ) -> Request {
        let op = KvOp::Put {
            key: Bytes::from_static(b"k"),
            value: Bytes::from(value.to_owned()),
        };
        let key = keys.client_key(epoch, &client).unwrap();
        let sealed = key
            .seal(&confidential_context(&client, number), &op.encode())
            .unwrap();
        ordered(client, number, Ordered::ClientSealed(Bytes::from(sealed)))
    }

    /// An application whose every result is empty, counting what it executed.
    #[derive(Default)]
    struct Silent(u64);

    impl StateMachine for Silent {
        fn execute(&mut self, _: &Request) -> Bytes {
            self.0 += 1;
            Bytes::new()
        }
        fn snapshot(&self) -> Bytes {
            Bytes::copy_from_slice(&self.0.to_be_bytes())
        }
        fn restore(
            &mut self,
            _: &[u8],
        ) -> Result<(), securesmart_consensus::service::RestoreError> {
            Ok(())
        }
    }

    #[test]
    fn an_empty_result_of_a_confidential_request_is_not_taken_for_a_refusal() {
        // A client reads an empty reply as the replicas' refusal and orders the operation
        // again under a new number: for an application whose results are empty, an executed
        // operation must not look like that, or it would execute several times.
        let (_ca, _member, keys, client) = group_of_one();
        let mut s = NodeState::new(four_replicas(), Vec::new(), Silent::default());
        s.acks = state().acks;
        let mut s = s.with_payload_keys(keys.clone());
        let sealed = keys
            .client_key(0, &client)
            .unwrap()
            .seal(&confidential_context(&client, 1), b"op")
            .unwrap();
        let reply = s.execute(&ordered(
            client,
            1,
            Ordered::ClientSealed(Bytes::from(sealed)),
        ));
        assert_eq!(&reply[..], &[crate::protocol::CONFIDENTIAL_EXECUTED]);
        assert_eq!(s.app.0, 1);
        let mut renumbered = client_sealed_put(&keys, 0, client, 2, "v");
        renumbered.number = 3;
        assert!(s.execute(&renumbered).is_empty(), "a refusal is empty");
        assert_eq!(s.app.0, 1);
    }

    #[test]
    fn requests_clients_sealed_execute_and_made_up_ones_are_refused_alike() {
        let (ca, mut member, keys, client) = group_of_one();
        let mallory = ca.issue_role("mallory", Role::Client).unwrap().id();
        let mut with_key = state().with_payload_keys(keys.clone());
        let put = client_sealed_put(&keys, 0, client, 1, "secret-value");
        assert!(
            !put.payload
                .windows(b"secret-value".len())
                .any(|w| w == b"secret-value"),
            "ciphertext in the log"
        );
        assert_eq!(
            confidential_result(&with_key.execute(&put)),
            KvReply::Value(None)
        );
        assert!(with_key.confidential, "checkpoints are sealed from now on");
        let get = |s: &mut NodeState<KvStore>, number| {
            let op = KvOp::Get { key: "k".into() };
            s.execute(&ordered(
                client,
                number,
                Ordered::App(Bytes::from(op.encode())),
            ))
        };
        assert_eq!(
            KvReply::decode(&get(&mut with_key, 2)).unwrap(),
            KvReply::Value(Some(Bytes::from_static(b"secret-value")))
        );

        // Made up by the client (random bytes in a valid header), copied into Mallory's
        // request, sealed by Mallory in the client's name with her own key, or sealed for
        // another number: refused at every replica holding the key, and nobody loses state.
        let mut made_up = client_sealed_put(&keys, 0, client, 3, "v");
        let Ok(Ordered::ClientSealed(sealed)) = Ordered::decode(&made_up.payload) else {
            panic!("a client-sealed request")
        };
        let mut junk = sealed.to_vec();
        if let Some(last) = junk.last_mut() {
            *last ^= 1;
        }
        made_up.payload = Ordered::ClientSealed(Bytes::from(junk)).encode();
        let mut stolen = client_sealed_put(&keys, 0, client, 4, "v");
        stolen.client = mallory;
        let in_clients_name = {
            let mallorys = keys.client_key(0, &mallory).unwrap();
            let forged = securesmart_membership::ClientSealingKey::from_bytes(
                0,
                client,
                *mallorys.secret_bytes(),
            );
            let sealed = forged
                .seal(&confidential_context(&client, 5), b"\x00junk")
                .unwrap();
            ordered(client, 5, Ordered::ClientSealed(Bytes::from(sealed)))
        };
        // In another client's name it is refused before anyone tries to open it: a replica
        // without the key does not lose its state over it.
        let mut keyless = state();
        assert!(keyless.execute(&stolen).is_empty());
        assert!(keyless.state_known(), "refused, not lost");
        let mut renumbered = client_sealed_put(&keys, 0, client, 6, "v");
        renumbered.number = 7;
        for bad in [&made_up, &stolen, &in_clients_name, &renumbered] {
            let before = with_key.snapshot();
            assert!(with_key.execute(bad).is_empty(), "refused");
            assert!(with_key.state_known(), "not lost");
            assert_eq!(with_key.snapshot(), before, "no effect");
        }

        // In an epoch the replicas no longer seal in: refused, keys or not (a replica removed
        // since holds the old key). Epoch 1 is accepted for the replicas' own sealing, but
        // once every replica holds epoch 2, clients must seal in 2.
        for _ in 0..2 {
            let p = member.propose_update().unwrap();
            member.apply_commit(&p.commit, Duration::ZERO).unwrap();
        }
        let ids = with_key.membership().replica_ids();
        with_key.group_epoch = 2;
        for e in 1..=2 {
            with_key.epoch_commits.insert(e, [e as u8; 32]);
            with_key.acks.insert(e, ids.iter().copied().collect());
        }
        assert_eq!(with_key.sealable_epoch(), Some(2));
        let old = client_sealed_put(&keys, 1, client, 8, "old epoch");
        assert!(with_key.execute(&old).is_empty());
        let mut keyless = state();
        keyless.group_epoch = 2;
        keyless.epoch_commits = with_key.epoch_commits.clone();
        keyless.acks = with_key.acks.clone();
        assert!(
            keyless.execute(&old).is_empty(),
            "the same verdict everywhere"
        );
        assert!(keyless.state_known());
        let current = client_sealed_put(&keys, 2, client, 9, "new epoch");
        assert_eq!(
            confidential_result(&with_key.execute(&current)),
            KvReply::Value(Some(Bytes::from_static(b"secret-value")))
        );
        // A replica without the key of the epoch it executes in cannot compute the state.
        assert!(keyless.execute(&current).is_empty());
        assert!(!keyless.state_known());
    }

    /// An ordered request of `client` with `ordered` as its payload.
    /// `c` as an ordered command stamped with the time now.
    fn command_now(c: MembershipCommand) -> Ordered {
        Ordered::Command {
            time: crate::node::unix_now(),
            command: Bytes::from(c.encode()),
        }
    }

    fn ordered(client: NodeId, number: u64, ordered: Ordered) -> Request {
        Request {
            client,
            number,
            payload: ordered.encode(),
        }
    }

    /// A faulty replica cannot make a Welcome too large for a snapshot: an oversized key
    /// package, or an oversized commit or Welcome, is refused at execution.
    #[test]
    fn oversized_key_packages_and_welcomes_are_refused() {
        let mut s = state();
        let ids = four_replicas().replica_ids();
        let huge = Ordered::KeyPackage(Bytes::from(vec![0u8; MAX_KEY_PACKAGE_BYTES + 1]));
        let r = s.execute(&ordered(ids[1], 10, huge));
        assert_eq!(&r[..], b"refused: key package too large");
        let commit = Ordered::GroupCommit {
            commit: Bytes::from_static(b"c"),
            welcome: Bytes::from(vec![0u8; MAX_MLS_MESSAGE_BYTES + 1]),
        };
        let r = s.execute(&ordered(ids[0], 11, commit));
        assert_eq!(&r[..], b"refused: too large");
        // The state went on: the snapshot still restores.
        let mut copy = NodeState::new(four_replicas(), Vec::new(), KvStore::default());
        copy.restore(&s.snapshot()).unwrap();
    }

    /// A valid MLS commit made for epoch 0 of some group of one (the test does not need the
    /// replicas' own group: the replicated state reads only the framing).
    fn commit_for_epoch_0(name: &str) -> Bytes {
        let ca = DevCa::new("commit ca").unwrap();
        let identity = ca.issue_role(name, Role::Replica).unwrap();
        let mut member = GroupMember::new(&identity, GroupConfig::default()).unwrap();
        member.create(Duration::ZERO).unwrap();
        Bytes::from(member.propose_update().unwrap().commit)
    }

    #[test]
    fn a_commit_replicas_cannot_apply_is_voided_and_its_orderer_barred() {
        let mut s = state();
        let ids = s.membership().replica_ids();
        let faulty = ids[3];
        let forged = commit_for_epoch_0("forger");
        let digest = securesmart_membership::commit_digest(&forged);
        let commit = |c: &Bytes| Ordered::GroupCommit {
            commit: c.clone(),
            welcome: Bytes::new(),
        };
        let ack = |epoch, commit| Ordered::KeyAck { epoch, commit };
        let ok = |r: Bytes| assert_eq!(&r[..], b"ok");
        let refused = |r: Bytes| assert!(r.starts_with(b"refused"), "{r:?}");
        // Epoch 0's designated committer is the first replica; the faulty one may commit only
        // once the backup window opened.
        assert_eq!(s.group_view().designated(), Some(ids[0]));
        refused(s.execute(&ordered(faulty, 1, commit(&forged))));
        s.begin_batch(BACKUP_SEQS);
        ok(s.execute(&ordered(faulty, 1, commit(&forged))));
        // Accepted, but the replicated epoch does not move on one replica's say-so (on
        // 49586d0 it moved at once, to keys nobody held).
        assert_eq!(s.group_epoch(), 0);
        assert!(s.commit_unsettled());
        assert_eq!(s.sealable_epoch(), Some(0));
        // The faulty replica acknowledges it and refuses it too: it counts once.
        ok(s.execute(&ordered(faulty, 2, ack(1, digest))));
        ok(s.execute(&ordered(faulty, 3, Ordered::CommitRefused(digest))));
        assert!(s.commit_unsettled());
        // While it is unsettled, no other commit is taken.
        let honest = commit_for_epoch_0("honest");
        refused(s.execute(&ordered(ids[0], 4, commit(&honest))));
        // Two correct replicas (f + 1) that hold epoch 0 cannot apply it: voided.
        s.take_group_events();
        ok(s.execute(&ordered(ids[0], 5, Ordered::CommitRefused(digest))));
        ok(s.execute(&ordered(ids[1], 6, Ordered::CommitRefused(digest))));
        assert!(!s.commit_unsettled());
        assert_eq!(s.group_epoch(), 0);
        assert!(s.group_view().is_barred(&faulty));
        let voided = GroupEvent::Settled {
            commit: digest,
            kept: false,
        };
        assert_eq!(s.take_group_events(), vec![voided]);
        // Its next commit is refused (it cools down); a correct replica's is taken and kept
        // once a quorum acknowledges the epoch it made (an acknowledgement naming another
        // commit does not count, and f + 1, the faulty one among them, are not enough).
        refused(s.execute(&ordered(faulty, 9, commit(&commit_for_epoch_0("again")))));
        ok(s.execute(&ordered(ids[0], 10, commit(&honest))));
        let good = securesmart_membership::commit_digest(&honest);
        refused(s.execute(&ordered(ids[1], 11, ack(1, digest))));
        ok(s.execute(&ordered(ids[0], 12, ack(1, good))));
        ok(s.execute(&ordered(faulty, 13, ack(1, good))));
        assert!(
            s.commit_unsettled(),
            "f + 1 acknowledgements do not keep it"
        );
        let snapshot = s.snapshot();
        ok(s.execute(&ordered(ids[1], 14, ack(1, good))));
        assert_eq!(s.group_epoch(), 1);
        assert!(!s.commit_unsettled());
        // The unsettled commit and the cool-down survive a snapshot.
        let mut restored = NodeState::new(four_replicas(), Vec::new(), KvStore::default());
        restored.restore(&snapshot).unwrap();
        // (The node tells it the batch's sequence number, as the others were told.)
        restored.begin_batch(BACKUP_SEQS);
        assert!(restored.commit_unsettled());
        assert!(restored.group_view().is_barred(&faulty));
        ok(restored.execute(&ordered(ids[1], 14, ack(1, good))));
        assert_eq!(restored.snapshot(), s.snapshot());
    }

    #[test]
    fn a_commit_too_few_replicas_answer_expires_and_its_orderer_cools_down() {
        let mut s = state();
        let ids = s.membership().replica_ids();
        let stuck = commit_for_epoch_0("stuck");
        s.begin_batch(100);
        let r = s.execute(&ordered(
            ids[2],
            1,
            Ordered::GroupCommit {
                commit: stuck.clone(),
                welcome: Bytes::new(),
            },
        ));
        assert_eq!(&r[..], b"ok");
        s.take_group_events();
        s.begin_batch(100 + SETTLE_DEADLINE);
        assert!(s.commit_unsettled(), "not yet");
        s.begin_batch(101 + SETTLE_DEADLINE);
        assert!(!s.commit_unsettled());
        // Its orderer cools down, for a while.
        assert!(s.group_view().is_barred(&ids[2]));
        s.begin_batch(101 + SETTLE_DEADLINE + COOLDOWN_SEQS);
        assert!(!s.group_view().is_barred(&ids[2]));
        assert_eq!(
            s.take_group_events(),
            vec![GroupEvent::Settled {
                commit: securesmart_membership::commit_digest(&stuck),
                kept: false
            }]
        );
    }

    /// Five replicas of `ca` (their identities) and their genesis members.
    fn five_replicas(
        ca: &DevCa,
    ) -> (
        Vec<securesmart_transport::Identity>,
        Vec<securesmart_membership::Member>,
    ) {
        replicas_of(ca, 5)
    }

    /// `n` replicas of `ca` (their identities) and their genesis members.
    fn replicas_of(
        ca: &DevCa,
        n: usize,
    ) -> (
        Vec<securesmart_transport::Identity>,
        Vec<securesmart_membership::Member>,
    ) {
        let replicas: Vec<_> = (0..n)
            .map(|i| ca.issue_role(&format!("r{i}"), Role::Replica).unwrap())
            .collect();
        let members = replicas
            .iter()
            .zip(0u16..)
            .map(|(r, i)| securesmart_membership::Member {
                certificate: r.chain()[0].clone(),
                replica_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
                client_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9100 + i)),
                role: Role::Replica,
                key_package: vec![],
            })
            .collect();
        (replicas, members)
    }

    #[test]
    fn an_administrator_the_ordered_crl_revokes_authorizes_nothing() {
        let mut ca = DevCa::new("admin ca").unwrap();
        let (_, members) = five_replicas(&ca);
        let admin = ca.issue_role("admin", Role::Client).unwrap();
        let admin_cert = admin.chain()[0].clone();
        let genesis = Membership::genesis(ca.certificate(), members, UnixTime::now()).unwrap();
        let victim = genesis.replica_ids()[4];
        let command = command_now;
        let remove = command(MembershipCommand::RemoveNode { id: victim });
        let crl = command(MembershipCommand::UpdateCrl {
            crl: ca.crl(&[&admin_cert]).unwrap().to_vec(),
        });
        let reporter = genesis.replica_ids()[0];
        // The control: the administrator removes a replica.
        let mut s = NodeState::new(
            genesis.clone(),
            vec![admin_cert.clone()],
            KvStore::default(),
        );
        let r = s.execute(&ordered(admin.id(), 1, remove.clone()));
        assert!(r.starts_with(b"ok"), "{r:?}");
        // Once the ordered CRL revokes its certificate (relayed by any replica), the same
        // command, validly signed, is refused: alike at every replica.
        let mut s = NodeState::new(genesis, vec![admin_cert], KvStore::default());
        let r = s.execute(&ordered(reporter, 1, crl));
        assert!(r.starts_with(b"ok"), "{r:?}");
        let r = s.execute(&ordered(admin.id(), 1, remove));
        assert!(r.starts_with(b"refused: not an administrator"), "{r:?}");
        assert_eq!(s.membership().replicas(), 5);
    }

    /// Administrators are replicated state: one adds another by an ordered command, the new
    /// one then removes a replica; a non-administrator cannot add itself; a replica's or a
    /// revoked certificate cannot become an administrator; the last one cannot be removed.
    /// The list survives a snapshot.
    #[test]
    fn administrators_are_added_and_removed_by_ordered_commands() {
        let mut ca = DevCa::new("admins ca").unwrap();
        let (_, members) = five_replicas(&ca);
        let first = ca.issue_role("first", Role::Client).unwrap();
        let second = ca.issue_role("second", Role::Client).unwrap();
        let stranger = ca.issue_role("stranger", Role::Client).unwrap();
        let revoked = ca.issue_role("revoked", Role::Client).unwrap();
        let genesis = Membership::genesis(ca.certificate(), members, UnixTime::now()).unwrap();
        let replica = genesis.replica_ids()[4];
        let command = command_now;
        let add = |cert: &rustls::pki_types::CertificateDer<'_>| {
            command(MembershipCommand::AddAdmin {
                certificate: cert.to_vec(),
            })
        };
        let mut s = NodeState::new(
            genesis.clone(),
            vec![first.chain()[0].clone()],
            KvStore::default(),
        );
        let mut n = 0;
        let mut run = |s: &mut NodeState<KvStore>, who: NodeId, o: Ordered| {
            n += 1;
            s.execute(&ordered(who, n, o))
        };
        let r = run(&mut s, stranger.id(), add(&stranger.chain()[0]));
        assert!(r.starts_with(b"refused: not an administrator"), "{r:?}");
        let r = run(&mut s, first.id(), add(&second.chain()[0]));
        assert_eq!(r, Bytes::from("ok administrators 2"));
        let replica_cert = genesis.members()[&replica].certificate.clone();
        let r = run(&mut s, first.id(), add(&replica_cert));
        assert!(r.starts_with(b"refused: certificate refused"), "{r:?}");
        let crl = command(MembershipCommand::UpdateCrl {
            crl: ca.crl(&[&revoked.chain()[0]]).unwrap().to_vec(),
        });
        assert!(run(&mut s, replica, crl).starts_with(b"ok"));
        let r = run(&mut s, first.id(), add(&revoked.chain()[0]));
        assert!(
            r.starts_with(b"refused: certificate refused: revoked"),
            "{r:?}"
        );
        let expired = ca
            .issue(&securesmart_transport::pki::CertRequest::new("old", Role::Client).expired())
            .unwrap();
        let r = run(&mut s, first.id(), add(&expired.chain()[0]));
        assert!(
            r.starts_with(b"refused: certificate refused: not valid"),
            "{r:?}"
        );
        // The new administrator acts; the first one is withdrawn; the last one stays.
        let remove = command(MembershipCommand::RemoveNode { id: replica });
        assert!(run(&mut s, second.id(), remove).starts_with(b"ok epoch"));
        let withdraw = |id| command(MembershipCommand::RemoveAdmin { id });
        assert_eq!(
            run(&mut s, second.id(), withdraw(first.id())),
            Bytes::from("ok administrators 1")
        );
        let r = run(&mut s, second.id(), withdraw(second.id()));
        assert!(
            r.starts_with(b"refused: the last working administrator stays"),
            "{r:?}"
        );
        let r = run(&mut s, first.id(), add(&first.chain()[0]));
        assert!(r.starts_with(b"refused: not an administrator"), "{r:?}");
        // Replicated: a replica restored from the snapshot knows the same administrators.
        let mut restored = NodeState::new(genesis, Vec::new(), KvStore::default());
        restored.restore(&s.snapshot()).unwrap();
        let r = run(&mut restored, second.id(), add(&stranger.chain()[0]));
        assert_eq!(r, Bytes::from("ok administrators 2"));

        // Renewal: the same key with a later certificate replaces the administrator's, and
        // the renewed certificate works; a step back to an older one is refused.
        let mut later = securesmart_transport::pki::CertRequest::new("second", Role::Client);
        later.not_before_offset = -time::Duration::MINUTE;
        let renewed = ca.renew(&second, &later).unwrap();
        let r = run(&mut restored, second.id(), add(&renewed.chain()[0]));
        assert_eq!(r, Bytes::from("ok administrators 2"));
        let r = run(&mut restored, second.id(), add(&second.chain()[0]));
        assert!(r.starts_with(b"refused: already an administrator"), "{r:?}");
        // Only an administrator renews one.
        let mut stranger_later =
            securesmart_transport::pki::CertRequest::new("stranger", Role::Client);
        stranger_later.not_before_offset = -time::Duration::MINUTE;
        let r = run(
            &mut restored,
            first.id(),
            add(&ca.renew(&stranger, &stranger_later).unwrap().chain()[0]),
        );
        assert!(r.starts_with(b"refused: not an administrator"), "{r:?}");
    }

    /// Recovery: once no administrator works (the only one is revoked), a quorum of the
    /// current replicas voting for the same client certificate makes it an administrator;
    /// fewer votes, or votes split between certificates, do not; a client cannot vote; the
    /// votes are replicated state.
    #[test]
    fn a_quorum_of_replicas_recovers_an_administrator() {
        let mut ca = DevCa::new("recovery ca").unwrap();
        let (_, members) = five_replicas(&ca);
        let lost = ca.issue_role("lost", Role::Client).unwrap();
        let new = ca.issue_role("new", Role::Client).unwrap();
        let other = ca.issue_role("other", Role::Client).unwrap();
        let genesis = Membership::genesis(ca.certificate(), members, UnixTime::now()).unwrap();
        let replicas = genesis.replica_ids();
        let command = command_now;
        let vote = |cert: &rustls::pki_types::CertificateDer<'_>| {
            command(MembershipCommand::AddAdmin {
                certificate: cert.to_vec(),
            })
        };
        let mut s = NodeState::new(genesis, vec![lost.chain()[0].clone()], KvStore::default());
        let mut n = 0;
        let mut run = |s: &mut NodeState<KvStore>, who: NodeId, o: Ordered| {
            n += 1;
            s.execute(&ordered(who, n, o))
        };
        // While an administrator works, the replicas do not vote.
        let r = run(&mut s, replicas[0], vote(&new.chain()[0]));
        assert!(
            r.starts_with(b"refused: a working administrator exists"),
            "{r:?}"
        );
        let crl = command(MembershipCommand::UpdateCrl {
            crl: ca.crl(&[&lost.chain()[0]]).unwrap().to_vec(),
        });
        assert!(run(&mut s, replicas[0], crl).starts_with(b"ok"));
        let remove = command(MembershipCommand::RemoveNode { id: replicas[4] });
        assert!(run(&mut s, lost.id(), remove.clone()).starts_with(b"refused"));
        // A client cannot vote; split votes add nobody.
        let r = run(&mut s, other.id(), vote(&other.chain()[0]));
        assert!(r.starts_with(b"refused: not an administrator"), "{r:?}");
        for r in &replicas[..3] {
            let reply = run(&mut s, *r, vote(&new.chain()[0]));
            assert!(reply.starts_with(b"ok votes"), "{reply:?}");
        }
        let r = run(&mut s, replicas[3], vote(&other.chain()[0]));
        assert!(r.starts_with(b"ok votes 1 of 4"), "{r:?}");
        // The votes are replicated: a restored replica counts them too.
        let mut restored = NodeState::new(
            Membership::decode(&s.membership().encode()).unwrap(),
            Vec::new(),
            KvStore::default(),
        );
        restored.restore(&s.snapshot()).unwrap();
        // The fourth replica changes its vote: a quorum (4 of 5) names `new`.
        for state in [&mut s, &mut restored] {
            let r = run(state, replicas[3], vote(&new.chain()[0]));
            assert_eq!(r, Bytes::from("ok administrators 2"));
            let r = run(state, new.id(), remove.clone());
            assert!(r.starts_with(b"ok epoch"), "{r:?}");
        }
    }

    #[test]
    fn a_revoked_clients_signed_requests_are_refused_whoever_relays_them() {
        let mut ca = DevCa::new("revoking ca").unwrap();
        let (_, members) = five_replicas(&ca);
        let genesis = Membership::genesis(ca.certificate(), members, UnixTime::now()).unwrap();
        let relay = genesis.replica_ids()[0];
        let mut s = NodeState::new(genesis, Vec::new(), KvStore::default());
        let mallory = ca.issue_role("mallory", Role::Client).unwrap();
        let put = |number: u64| {
            ordered(
                mallory.id(),
                number,
                Ordered::App(Bytes::from(
                    KvOp::Put {
                        key: "k".into(),
                        value: "v".into(),
                    }
                    .encode(),
                )),
            )
        };
        assert!(
            KvReply::decode(&s.execute(&put(1))).is_ok(),
            "executes before"
        );
        let now = crate::node::unix_now();
        let command = |c: MembershipCommand| Ordered::Command {
            time: now,
            command: Bytes::from(c.encode()),
        };
        let crl = ca.crl(&[&mallory.chain()[0]]).unwrap().to_vec();
        let r = s.execute(&ordered(
            relay,
            1,
            command(MembershipCommand::UpdateCrl { crl }),
        ));
        assert!(r.starts_with(b"ok"), "{r:?}");
        // The CRL names a serial; the replicas cannot tell whose it is until its certificate is
        // ordered (any replica's watcher, or anyone, may order it).
        let revoke = MembershipCommand::RevokeCertificates {
            certificates: vec![mallory.chain()[0].to_vec()],
        };
        let r = s.execute(&ordered(relay, 2, command(revoke)));
        assert!(r.starts_with(b"ok"), "{r:?}");
        // Mallory's validly signed requests, relayed by a faulty replica (correct ones refuse
        // its TLS), execute nowhere.
        assert!(s.execute(&put(2)).is_empty());
        let own_command = command(MembershipCommand::RemoveNode { id: mallory.id() });
        assert_eq!(
            &s.execute(&ordered(mallory.id(), 3, own_command))[..],
            b"refused: revoked"
        );
        assert_eq!(
            KvReply::decode(&s.execute(&ordered(
                relay,
                3,
                Ordered::App(Bytes::from(KvOp::Get { key: "k".into() }.encode()))
            )))
            .unwrap(),
            KvReply::Value(Some(Bytes::from_static(b"v"))),
            "its second put did not execute"
        );
    }

    #[test]
    fn a_removal_opens_a_roster_that_the_old_replicas_certify_for_clients() {
        use crate::protocol::RequestSigner;
        let ca = DevCa::new("roster state ca").unwrap();
        let (replicas, members) = five_replicas(&ca);
        let admin = ca.issue_role("admin", Role::Client).unwrap();
        let genesis = Membership::genesis(ca.certificate(), members, UnixTime::now()).unwrap();
        let mut s = NodeState::new(genesis, vec![admin.chain()[0].clone()], KvStore::default());
        let trusted = s.rosters().current().clone();
        let now = crate::node::unix_now();
        let remove = Ordered::Command {
            time: now,
            command: Bytes::from(
                MembershipCommand::RemoveNode {
                    id: replicas[4].id(),
                }
                .encode(),
            ),
        };
        assert!(
            s.execute(&ordered(admin.id(), 1, remove))
                .starts_with(b"ok")
        );
        let roster = s.rosters().current().clone();
        assert_eq!((roster.number(), roster.replicas().len()), (1, 4));
        // Each replica of roster 0 (the removed one too) signs roster 1 as its own request.
        let signed_ack = |i: usize, number: u64| {
            let signer = RequestSigner::new(&replicas[i]).unwrap();
            let ack = Ordered::RosterAck {
                roster: 1,
                digest: roster.digest(),
            };
            Request {
                client: replicas[i].id(),
                number,
                payload: signer.submission(number, ack).encode(),
            }
        };
        // Unsigned, it counts for nothing.
        let unsigned = ordered(
            replicas[0].id(),
            2,
            Ordered::RosterAck {
                roster: 1,
                digest: roster.digest(),
            },
        );
        assert!(s.execute(&unsigned).starts_with(b"refused"));
        for (i, number) in [(4, 7), (0, 8), (1, 9)] {
            assert_eq!(&s.execute(&signed_ack(i, number))[..], b"ok");
            assert_eq!(
                s.rosters().certified().number(),
                0,
                "not a quorum of five yet"
            );
        }
        assert_eq!(&s.execute(&signed_ack(2, 10))[..], b"ok");
        assert_eq!(s.rosters().certified().number(), 1);
        // A client that trusts roster 0 follows what any replica hands out, and so does a
        // replica that restores the snapshot.
        let changes = s.rosters().since(0);
        assert_eq!(crate::roster::follow(&trusted, &changes).unwrap(), roster);
        let mut restored = NodeState::new(four_replicas(), Vec::new(), KvStore::default());
        restored.restore(&s.snapshot()).unwrap();
        assert_eq!(restored.rosters(), s.rosters());
    }

    #[test]
    fn only_a_replica_that_asked_is_added_and_only_with_its_key_package() {
        let mut s = state();
        let ids = s.membership().replica_ids();
        let kp = Bytes::from_static(b"a key package");
        assert!(s.group_view().joining.is_empty());
        let r = s.execute(&ordered(ids[2], 1, Ordered::KeyPackage(kp.clone())));
        assert_eq!(&r[..], b"ok");
        assert_eq!(
            s.group_view().joining.get(&ids[2]),
            Some(&securesmart_membership::key_package_digest(&kp))
        );
        // A new key package soon after is refused (it would make every commit that adds it
        // with the first one stale); later it replaces the first.
        let newer = Bytes::from_static(b"a newer key package");
        let r = s.execute(&ordered(ids[2], 3, Ordered::KeyPackage(newer.clone())));
        assert!(r.starts_with(b"refused"), "{r:?}");
        s.begin_batch(KEY_PACKAGE_REFRESH_SEQS);
        let r = s.execute(&ordered(ids[2], 4, Ordered::KeyPackage(newer.clone())));
        assert_eq!(&r[..], b"ok");
        assert_eq!(
            s.group_view().joining.get(&ids[2]),
            Some(&securesmart_membership::key_package_digest(&newer))
        );
        // Once it acknowledges a key, it no longer asks.
        s.acks.clear();
        s.epoch_commits.insert(1, [1; 32]);
        s.group_epoch = 1;
        let ack = Ordered::KeyAck {
            epoch: 1,
            commit: [1; 32],
        };
        assert_eq!(&s.execute(&ordered(ids[2], 5, ack))[..], b"ok");
        assert!(s.group_view().joining.is_empty());
    }

    #[test]
    fn an_old_snapshot_or_key_acknowledgement_is_a_clear_error() {
        let mut s = state();
        let mut old = s.snapshot().to_vec();
        old[0] = 3;
        let e = s.restore(&old).unwrap_err();
        assert!(e.to_string().contains("version"), "{e}");
        // A key acknowledgement of the format before settled commits.
        let old_ack = Bytes::from_static(&[5, 0, 0, 0, 0, 0, 0, 0, 0]);
        let e = Ordered::decode(&old_ack).unwrap_err();
        assert!(e.to_string().contains("before settled commits"), "{e}");
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn checkpoints_are_sealed_once_a_confidential_request_executed() {
        use securesmart_consensus::service::Executor;
        let (_ca, _member, keys, client) = group_of_one();
        let replica = || Executor::new(state().with_payload_keys(keys.clone()));
        let plain_put = Request {
            client,
            number: 1,
            payload: Ordered::App(
                KvOp::Put {
                    key: Bytes::from_static(b"p"),
                    value: Bytes::from_static(b"public-value"),
                }
                .encode()
                .into(),
            )
            .encode(),
        };
        let sealed_get = sealed_op(&keys, client, 3, &KvOp::Get { key: "k".into() });

        // Before any confidential request the checkpoint is in the clear (the control).
        let (mut a, mut b) = (replica(), replica());
        for r in [&mut a, &mut b] {
            r.execute(std::slice::from_ref(&plain_put));
        }
        let clear = a.due_snapshot(64).unwrap();
        assert!(contains(&clear, b"public-value"));
        assert!(!a.app().confidential());

        // After one, the application state and the reply cache (a confidential read's result)
        // are sealed, identically at every replica.
        let batch = [sealed_put(&keys, client, 2, "secret-value"), sealed_get];
        for r in [&mut a, &mut b] {
            let replies = r.execute(&batch);
            assert!(contains(&replies[1].result, b"secret-value"));
        }
        let sealed = a.due_snapshot(128).unwrap();
        assert_eq!(Some(&sealed), b.due_snapshot(128).as_ref(), "deterministic");
        for secret in [&b"secret-value"[..], b"public-value"] {
            assert!(!contains(&sealed, secret));
        }

        // A replica with the key restores it.
        let mut fresh = replica();
        fresh.restore_checkpoint(128, &sealed).unwrap();
        assert!(fresh.app().state_known());
        assert_eq!(fresh.snapshot(), a.snapshot());

        // Bound to its checkpoint: under another sequence number it does not open.
        let mut moved = replica();
        moved.restore_checkpoint(192, &sealed).unwrap();
        assert!(!moved.app().state_known());

        // A replica without the key takes the membership and group bookkeeping, and its
        // application state is lost until a checkpoint it can open.
        let mut keyless = Executor::new(state());
        keyless.restore_checkpoint(128, &sealed).unwrap();
        assert!(!keyless.app().state_known());
        assert!(keyless.app().confidential());
        assert!(keyless.due_snapshot(192).is_none());
        keyless.restore_checkpoint(64, &clear).unwrap();
        assert!(keyless.app().state_known());
    }
}
