//! The replicas' group key at one node: its MLS member ([`GroupMember`]), fed with the group
//! messages the order delivers.
//!
//! The ordering layer is MLS's delivery service: key packages and commits are ordered requests
//! ([`crate::protocol::Ordered`]), so every member applies the same commits in the same order
//! and the first commit of an epoch wins everywhere. The group is not replicated state (each
//! member's keys are its own); only the messages are.
//! - At genesis the replica with the smallest node id creates the group; every other replica
//!   that is a member of the membership but holds no group key orders its key package, again
//!   every few seconds until it has one (so a joiner, or a replica that missed commits while it
//!   was away, gets back in).
//! - The *committer* is the group member with the smallest node id that is still a replica.
//!   It turns key packages into Add commits (with the Welcome), removals from the membership
//!   into Remove commits once the group without the removed replica has taken over in the
//!   ordering engine (until then it still votes, and executes sealed requests), and rotates
//!   the key with an Update commit when the rotation policy says so (age of the epoch,
//!   payloads sealed) and a quorum acknowledged the current epoch (`securesmart::state`),
//!   one commit in flight at a time. Every member
//!   keeps the same to-do list; the member of rank r (by node id) steps in when the group has
//!   not moved for r x [`BACKUP_DELAY`] (the committer may be down), and whichever commit is
//!   ordered first wins.
//! - A member applies every ordered commit; one it cannot apply (made for another epoch) marks
//!   it stale, and a stale member asks again with a fresh key package (the committer removes
//!   its old leaf and adds it anew). A removed member holds no key of the epochs after its
//!   removal.
//!
//! A commit made for an epoch older than the member's is skipped: it was merged before (the
//! journal is replayed after a restart; a checkpoint carries the last few commits, see
//! `securesmart::state`, so that a replica that caught up by state transfer does not miss any).
//!
//! The node's replicated state accepts only the first commit made for each epoch (it reads
//! the epoch from the commit's framing), so a Welcome is used only if its commit is the one
//! every member merges: a joiner cannot end up in a fork of the group.
//!
//! Known limits: convergence is eventual and slow under churn. A member that lost its key
//! (it missed commits, or was removed and re-added while key packages were in flight) can stay
//! out for several retry rounds, and while the committer of rank 0 is down the backups commit
//! only every few seconds. A member without the key of an epoch that confidential requests
//! were sealed in cannot execute them: its application state is lost until a state transfer
//! (see `securesmart::state`); replicas prefer an epoch every member acknowledged.
//!
//! The member's state (MLS secrets and payload keys) is in `data_dir/mls.state`, mode 0600,
//! written atomically after every change. Metrics: `securesmart_node_group_epoch`,
//! `securesmart_node_group_commits_total{kind}`, `securesmart_node_rekeys_total`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use securesmart_membership::{CommitOutcome, GroupError, GroupMember, Membership};
use securesmart_transport::NodeId;

use crate::protocol::Ordered;
use crate::state::GroupEvent;

/// How often a replica without a usable group key orders its key package again, and how long
/// the committer waits for its commit to be ordered before it tries again.
pub(crate) const GROUP_RETRY: Duration = Duration::from_secs(3);

/// How long a backup committer of rank 1 waits for the group to move before it commits.
pub(crate) const BACKUP_DELAY: Duration = Duration::from_secs(4);

/// Work for the committer.
#[derive(Debug)]
enum Work {
    Add(NodeId, Bytes),
    Remove(NodeId),
}

/// One node's view of the replicas' group key (see the module doc).
pub(crate) struct GroupKey {
    id: NodeId,
    member: GroupMember,
    started: Instant,
    todo: VecDeque<Work>,
    /// When our last commit was submitted (one in flight at a time).
    outstanding: Option<Instant>,
    /// Since when a commit could not be applied here.
    stale_since: Option<Instant>,
    last_key_package: Option<Instant>,
    /// When the group last moved to a new epoch here.
    last_advance: Instant,
    /// Members added lately, and when (a key package of theirs ordered before they got in is
    /// not a sign that they lost their key).
    recent_adds: std::collections::HashMap<NodeId, Instant>,
    /// An epoch whose key this member holds and has not acknowledged through the order yet.
    ack: Option<u64>,
}

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupKey")
            .field("epoch", &self.member.epoch())
            .finish_non_exhaustive()
    }
}

fn commit_counter(kind: &'static str) {
    metrics::counter!("securesmart_node_group_commits_total", "kind" => kind).increment(1);
}

impl GroupKey {
    pub(crate) fn new(id: NodeId, member: GroupMember) -> Self {
        if let Some(e) = member.epoch() {
            metrics::gauge!("securesmart_node_group_epoch").set(e as f64);
        }
        Self {
            id,
            started: Instant::now(),
            todo: VecDeque::new(),
            outstanding: None,
            stale_since: None,
            last_key_package: None,
            last_advance: Instant::now(),
            recent_adds: std::collections::HashMap::new(),
            // A restarted member says again which key it holds.
            ack: member.epoch(),
            member,
        }
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// This member's rank among the group's members that are replicas (0: the committer);
    /// `None` without a usable key.
    fn rank(&self, m: &Membership) -> Option<usize> {
        if self.member.epoch().is_none() || self.stale_since.is_some() {
            return None;
        }
        let replicas = m.replica_ids();
        let mut ids: Vec<NodeId> = self
            .member
            .members()
            .into_iter()
            .filter(|id| replicas.contains(id))
            .collect();
        ids.sort();
        ids.iter().position(|id| *id == self.id)
    }

    /// Whether this member commits now: the committer always, a backup of rank r once the
    /// group has not moved for r x [`BACKUP_DELAY`].
    fn acting(&self, m: &Membership) -> bool {
        match self.rank(m) {
            Some(0) => true,
            Some(r) => self.last_advance.elapsed() >= BACKUP_DELAY.saturating_mul(r as u32),
            None => false,
        }
    }

    /// An ordered group message executed.
    pub(crate) fn on_event(&mut self, event: GroupEvent, m: &Membership) {
        match event {
            GroupEvent::KeyPackage { from, key_package } => {
                let just_added = self
                    .recent_adds
                    .get(&from)
                    .is_some_and(|t| t.elapsed() < GROUP_RETRY.saturating_mul(2));
                if self.rank(m).is_some() && !just_added {
                    self.todo.retain(|w| match w {
                        Work::Add(id, _) | Work::Remove(id) => *id != from,
                    });
                    if self.member.members().contains(&from) {
                        self.todo.push_back(Work::Remove(from));
                    }
                    self.todo.push_back(Work::Add(from, key_package));
                }
            }
            GroupEvent::Commit { commit, welcome } => {
                let made_for = securesmart_membership::commit_epoch(&commit).ok();
                if let (Some(e), Some(held)) = (made_for, self.member.epoch())
                    && e < held
                {
                    // Merged before: the journal is replayed after a restart, or batches are
                    // executed again after a state transfer.
                    return;
                }
                if self.member.epoch().is_some() {
                    let before = self.member.members();
                    match self.member.apply_commit(&commit, self.now()) {
                        Ok(CommitOutcome::Advanced(epoch)) => {
                            let now = Instant::now();
                            self.recent_adds.retain(|_, t| {
                                now.duration_since(*t) < GROUP_RETRY.saturating_mul(2)
                            });
                            for id in self.member.members() {
                                if !before.contains(&id) {
                                    self.recent_adds.insert(id, now);
                                }
                            }
                            metrics::gauge!("securesmart_node_group_epoch").set(epoch as f64);
                            tracing::info!(epoch, "group key: new epoch");
                            self.outstanding = None;
                            self.stale_since = None;
                            self.last_advance = Instant::now();
                            self.ack = Some(epoch);
                            return;
                        }
                        Ok(CommitOutcome::Removed) => {
                            tracing::info!("group key: this replica was removed from the group");
                            self.outstanding = None;
                            return;
                        }
                        Ok(_) => return,
                        Err(GroupError::CommitRefused(why)) => {
                            // Every ordered commit here is the first of its epoch (the node's
                            // replicated state lets no other through): one this member cannot
                            // apply means it fell behind.
                            tracing::debug!(%why, "group commit not applied here");
                            self.stale_since.get_or_insert_with(Instant::now);
                            self.outstanding = None;
                        }
                        Err(e) => tracing::debug!(error = %e, "group commit not applied here"),
                    }
                }
                let wants_in = self.member.epoch().is_none() || self.stale_since.is_some();
                if wants_in && !welcome.is_empty() && self.member.join(&welcome, self.now()).is_ok()
                {
                    let epoch = self.member.epoch().unwrap_or_default();
                    metrics::gauge!("securesmart_node_group_epoch").set(epoch as f64);
                    tracing::info!(epoch, "group key: joined the replicas' group");
                    self.ack = Some(epoch);
                    self.stale_since = None;
                    self.last_advance = Instant::now();
                }
            }
        }
    }

    /// Keeps the keys of `from` and later epochs (see [`GroupMember::pin_keys`]).
    pub(crate) fn pin_keys(&mut self, from: u64) {
        if let Err(e) = self.member.pin_keys(from) {
            tracing::warn!(error = %e, "group key: pinning keys failed");
        }
    }

    /// The acknowledgement of the newest key this member holds, to order (see
    /// `securesmart::state`: sealed requests of an epoch execute once a quorum acknowledged
    /// it). Call [`GroupKey::acknowledged`] once it is submitted.
    pub(crate) fn pending_ack(&self) -> Option<Ordered> {
        self.ack
            .filter(|e| self.member.epoch() == Some(*e) && self.stale_since.is_none())
            .map(Ordered::KeyAck)
    }

    /// The acknowledgement from [`GroupKey::pending_ack`] was submitted.
    pub(crate) fn acknowledged(&mut self) {
        self.ack = None;
    }

    /// Periodic work: create the group at genesis, ask to be added, commit what is due.
    /// `still_voting`: replicas removed from the membership whose group has not yet taken
    /// over (they stay in the group key until then, so that they can execute what they still
    /// vote on). `rotate`: a quorum acknowledged the current epoch (rotating earlier would gain
    /// nothing: confidential requests go on being sealed in an earlier epoch). Returns a request
    /// to order, if any.
    pub(crate) fn tick(
        &mut self,
        m: &Membership,
        creator: bool,
        still_voting: &[NodeId],
        rotate: bool,
    ) -> Option<Ordered> {
        let now = Instant::now();
        if self.member.epoch().is_none()
            && creator
            && self.last_key_package.is_none()
            && m.members().contains_key(&self.id)
        {
            match self.member.create(self.now()) {
                Ok(()) => {
                    tracing::info!("group key: created the replicas' group");
                    metrics::gauge!("securesmart_node_group_epoch").set(0.0);
                    self.ack = self.member.epoch();
                }
                Err(e) => tracing::warn!(error = %e, "group key: cannot create the group"),
            }
        }
        let lacks_key = self.member.epoch().is_none()
            || self
                .stale_since
                .is_some_and(|s| now.duration_since(s) >= GROUP_RETRY);
        if lacks_key && m.members().contains_key(&self.id) {
            if self
                .last_key_package
                .is_some_and(|t| now.duration_since(t) < GROUP_RETRY)
            {
                return None;
            }
            self.last_key_package = Some(now);
            return match self.member.key_package() {
                Ok(kp) => Some(Ordered::KeyPackage(Bytes::from(kp))),
                Err(e) => {
                    tracing::warn!(error = %e, "group key: no key package");
                    None
                }
            };
        }
        if self.rank(m).is_none() {
            self.todo.clear();
            return None;
        }
        if !self.acting(m) {
            return None;
        }
        if self
            .outstanding
            .is_some_and(|t| now.duration_since(t) < GROUP_RETRY)
        {
            return None;
        }
        self.outstanding = None;
        let members = self.member.members();
        // Group members that left the membership, once the group without them took over.
        let replicas = m.replica_ids();
        for id in &members {
            let queued = self
                .todo
                .iter()
                .any(|w| matches!(w, Work::Remove(r) if r == id));
            if !replicas.contains(id) && !still_voting.contains(id) && !queued {
                self.todo.push_back(Work::Remove(*id));
            }
        }
        while let Some(work) = self.todo.pop_front() {
            let proposal = match &work {
                Work::Add(id, kp) if !members.contains(id) => {
                    let Some(cert) = m.members().get(id).map(|mem| mem.certificate.clone()) else {
                        continue;
                    };
                    commit_counter("add");
                    self.member.propose_add(kp, &cert)
                }
                Work::Remove(id) if members.contains(id) => {
                    commit_counter("remove");
                    self.member.propose_remove(*id)
                }
                _ => continue,
            };
            return self.submit(proposal);
        }
        // A backup rotates only once the key is overdue by its delay as well.
        let overdue = self.rank(m).unwrap_or(0) == 0
            || self.member.needs_rotation(
                self.now()
                    .saturating_sub(BACKUP_DELAY.saturating_mul(self.rank(m).unwrap_or(0) as u32)),
            );
        if rotate && overdue && self.member.needs_rotation(self.now()) {
            commit_counter("update");
            metrics::counter!("securesmart_node_rekeys_total").increment(1);
            let proposal = self.member.propose_update();
            return self.submit(proposal);
        }
        None
    }

    fn submit(
        &mut self,
        proposal: Result<securesmart_membership::Proposal, GroupError>,
    ) -> Option<Ordered> {
        match proposal {
            Ok(p) => {
                self.outstanding = Some(Instant::now());
                Some(Ordered::GroupCommit {
                    commit: Bytes::from(p.commit),
                    welcome: p.welcome.map(Bytes::from).unwrap_or_default(),
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "group key: cannot build a commit");
                None
            }
        }
    }
}
