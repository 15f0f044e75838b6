//! The replicas' group key at one node: its MLS member ([`GroupMember`]), fed with the group
//! messages the order delivers.
//!
//! The ordering layer is MLS's delivery service: key packages and commits are ordered requests
//! ([`crate::protocol::Ordered`]), so every member applies the same commits in the same order,
//! and the replicated state settles each commit before it takes the next (`securesmart::state`,
//! "Group commits"). The group is not replicated state (each member's keys are its own); only
//! the messages, the replicas asking to be added (with their key packages) and the settled
//! epochs are.
//! - At genesis the replica with the smallest node id creates the group; every other replica
//!   that is a member of the membership but holds no group key orders its key package, again
//!   every few seconds until it has one (so a joiner, or a replica that missed commits while it
//!   was away, gets back in).
//! - The *committer* of an epoch is the one the replicated state designates
//!   ([`crate::state::GroupView::designated`]; others may commit after a backup window). It
//!   turns the key packages of the replicas asking to be added (from the replicated state) into
//!   Add commits (with the Welcome), removals from the membership
//!   into Remove commits once the group without the removed replica has taken over in the
//!   ordering engine (until then it still votes, and executes sealed requests), and rotates
//!   the key with an Update commit when the rotation policy says so (age of the epoch,
//!   payloads sealed) and a quorum acknowledged the current epoch (`securesmart::state`),
//!   one commit in flight at a time. Once the backup window is open, the member of rank r (by
//!   node id) steps in when the group has not moved for r x [`BACKUP_DELAY`] (the designated
//!   committer may be down), and whichever commit is
//!   ordered first wins.
//! - A member applies every ordered commit under the commit policy for the ordered
//!   membership. One made for its epoch that it cannot apply, it refuses through the order
//!   ([`Ordered::CommitRefused`]); the replicated state keeps the commit once enough
//!   of the epoch's holders acknowledge it, voids it once enough refuse it, or lets it expire (`securesmart::state`,
//!   "Group commits"), and a member that merged a voided commit
//!   goes back to its state from before. One made for a later epoch marks it stale, and so
//!   does a kept commit it refused; a stale member asks again with a fresh key package (the
//!   committer removes its old leaf and adds it anew in one commit). A removed member holds no
//!   key of the epochs after its removal. Committers skip replicas whose commit was voided,
//!   and commit nothing while a merged commit is unsettled.
//!
//! A commit made for an epoch older than the member's is skipped: it was merged before (the
//! journal is replayed after a restart; a checkpoint carries the last few commits, see
//! `securesmart::state`, so that a replica that caught up by state transfer does not miss any).
//!
//! The node's replicated state accepts one commit at a time, made for the current epoch (it
//! reads the epoch from the commit's framing), and settles it before the next: a joiner that
//! joins from a Welcome whose commit is voided goes back to having no group, so it cannot end
//! up in a fork of the group.
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
use securesmart_membership::{CommitOutcome, GroupError, GroupMember, Settled};
use securesmart_transport::NodeId;

use crate::protocol::Ordered;
use crate::state::{GroupEvent, GroupView};

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
    /// A member that lost its key asks to be added again: its old leaf goes in the same commit.
    Readd(NodeId, Bytes),
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
    /// An unsettled commit this member holds the epoch of and could not apply: its refusal,
    /// to order.
    refusal: Option<[u8; 32]>,
    /// The unsettled commit this member refused, until it is settled (kept: this member lost
    /// its key and asks to be added again; voided: it was right).
    awaiting: Option<[u8; 32]>,
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
            refusal: None,
            awaiting: None,
            member,
        }
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// This member's rank among the group's members that are replicas (0: the committer);
    /// `None` without a usable key.
    fn rank(&self, view: &GroupView<'_>) -> Option<usize> {
        if self.member.epoch().is_none() || self.stale_since.is_some() || view.is_barred(&self.id) {
            return None;
        }
        let replicas = view.membership.replica_ids();
        let mut ids: Vec<NodeId> = self
            .member
            .members()
            .into_iter()
            .filter(|id| replicas.contains(id) && !view.is_barred(id))
            .collect();
        ids.sort();
        ids.iter().position(|id| *id == self.id)
    }

    /// Whether this member commits now: the committer always, a backup of rank r once the
    /// group has not moved for r x [`BACKUP_DELAY`].
    fn acting(&self, view: &GroupView<'_>) -> bool {
        // The replicated state takes a commit from this epoch's designated committer, or from
        // anyone once the backup window opened (`securesmart::state::BACKUP_SEQS`).
        if !view.may_commit(&self.id) {
            return false;
        }
        if view.designated() == Some(self.id) {
            return self.rank(view).is_some();
        }
        match self.rank(view) {
            Some(0) => true,
            Some(r) => self.last_advance.elapsed() >= BACKUP_DELAY.saturating_mul(r as u32),
            None => false,
        }
    }

    /// An ordered group message executed; `m` is the membership after it, `barred` the
    /// replicas whose commits the replicated state no longer accepts.
    pub(crate) fn on_event(&mut self, event: GroupEvent, view: &GroupView<'_>) {
        match event {
            GroupEvent::KeyPackage { from, key_package } => {
                let just_added = self
                    .recent_adds
                    .get(&from)
                    .is_some_and(|t| t.elapsed() < GROUP_RETRY.saturating_mul(2));
                if self.rank(view).is_some() && !just_added {
                    self.todo.retain(|w| match w {
                        Work::Add(id, _) | Work::Remove(id) | Work::Readd(id, _) => *id != from,
                    });
                    if self.member.members().contains(&from) {
                        self.todo.push_back(Work::Readd(from, key_package));
                    } else {
                        self.todo.push_back(Work::Add(from, key_package));
                    }
                }
            }
            GroupEvent::Commit {
                commit,
                welcome,
                settled,
            } => self.on_commit(&commit, &welcome, settled, view),
            GroupEvent::Settled { commit, kept } => {
                self.on_settled(commit, kept);
                self.check_fork(view);
            }
        }
    }

    /// A member whose epoch the replicated state settled with another commit than the one it
    /// holds is on a branch nobody else is (it restarted, or was restored, with a merge that
    /// was voided meanwhile): it asks to be added again.
    fn check_fork(&mut self, view: &GroupView<'_>) {
        if self.member.unsettled().is_some() || self.stale_since.is_some() {
            return;
        }
        if let Some(epoch) = self.member.epoch()
            && let Some(settled) = view.epoch_commit(epoch)
            && settled != self.member.entered_by()
        {
            tracing::warn!(
                epoch,
                "group key: this member's epoch is not the settled one; asking to be added again"
            );
            self.stale_since = Some(Instant::now());
        }
    }

    /// An ordered commit: tentative until settled, unless `settled` (a snapshot's history).
    fn on_commit(&mut self, commit: &[u8], welcome: &[u8], settled: bool, view: &GroupView<'_>) {
        let digest = securesmart_membership::commit_digest(commit);
        let made_for = securesmart_membership::commit_epoch(commit).ok();
        if let Some((unsettled_for, unsettled)) = self.member.unsettled()
            && unsettled != digest
            && unsettled_for.is_some()
            && unsettled_for == made_for
        {
            // Another commit for the epoch our unsettled merge was made for: the replicated
            // state takes one at a time, so ours was voided or expired (we missed the verdict,
            // e.g. across a state transfer).
            self.on_settled(unsettled, false);
        }
        if let (Some(e), Some(held)) = (made_for, self.member.epoch())
            && e < held
        {
            // Merged before: the journal is replayed after a restart, or batches are executed
            // again after a state transfer.
            if settled {
                self.settle(digest, true);
            }
            return;
        }
        if self.member.epoch().is_some() {
            let before = self.member.members();
            let held = self.member.epoch();
            // A settled commit (a snapshot's history) was kept by a quorum: it is applied as it
            // is, not judged again against today's membership.
            let applied = if settled {
                self.member.apply_commit(commit, self.now())
            } else {
                self.member
                    .apply_commit_checked(commit, &view.policy(), self.now())
            };
            match applied {
                Ok(CommitOutcome::Advanced(epoch)) => {
                    let now = Instant::now();
                    self.recent_adds
                        .retain(|_, t| now.duration_since(*t) < GROUP_RETRY.saturating_mul(2));
                    for id in self.member.members() {
                        if !before.contains(&id) {
                            self.recent_adds.insert(id, now);
                        }
                    }
                    metrics::gauge!("securesmart_node_group_epoch").set(epoch as f64);
                    tracing::info!(epoch, settled, "group key: new epoch");
                    self.outstanding = None;
                    self.stale_since = None;
                    self.last_advance = Instant::now();
                    self.ack = Some(epoch);
                    if settled {
                        self.settle(digest, true);
                    }
                    return;
                }
                Ok(CommitOutcome::Removed) => {
                    tracing::info!("group key: this replica was removed from the group");
                    self.outstanding = None;
                    if settled {
                        self.settle(digest, true);
                    }
                    // Removed and added again in one commit (it asked, with a key package):
                    // it joins with the Welcome below.
                }
                Ok(_) => return,
                Err(e @ (GroupError::CommitRefused(_) | GroupError::InvalidMessage(_))) => {
                    if held.is_some() && held == made_for && !settled {
                        // We hold the epoch it was made for and cannot apply it: say so. If
                        // f + 1 replicas do, the replicated state voids it; if it is kept
                        // instead, this member lost its key (and asks to be added again).
                        metrics::counter!("securesmart_node_group_commits_refused_total")
                            .increment(1);
                        tracing::warn!(error = %e, "group commit refused here");
                        self.refusal = Some(digest);
                        self.awaiting = Some(digest);
                        return;
                    }
                    // Made for another epoch than ours: this member fell behind.
                    tracing::debug!(error = %e, "group commit not applied here");
                    self.stale_since.get_or_insert_with(Instant::now);
                    self.outstanding = None;
                }
                Err(e) => tracing::debug!(error = %e, "group commit not applied here"),
            }
        }
        let wants_in = self.member.epoch().is_none() || self.stale_since.is_some();
        if wants_in
            && !welcome.is_empty()
            && self.member.join_from(welcome, digest, self.now()).is_ok()
        {
            let epoch = self.member.epoch().unwrap_or_default();
            metrics::gauge!("securesmart_node_group_epoch").set(epoch as f64);
            tracing::info!(epoch, settled, "group key: joined the replicas' group");
            self.ack = Some(epoch);
            self.stale_since = None;
            self.last_advance = Instant::now();
            if settled {
                self.settle(digest, true);
            }
        }
    }

    /// The replicated state settled the commit `commit`.
    fn on_settled(&mut self, commit: [u8; 32], kept: bool) {
        self.settle(commit, kept);
        if self.awaiting == Some(commit) {
            self.awaiting = None;
            self.refusal = None;
            if kept {
                // Kept without us: we hold no key of the new epoch.
                self.stale_since.get_or_insert_with(Instant::now);
            }
        }
    }

    fn settle(&mut self, commit: [u8; 32], kept: bool) {
        match self.member.settle(commit, kept) {
            Ok(Settled::RolledBack) => {
                metrics::counter!("securesmart_node_group_rollbacks_total").increment(1);
                let epoch = self.member.epoch();
                tracing::warn!(?epoch, "group key: a voided commit was undone");
                if let Some(e) = epoch {
                    metrics::gauge!("securesmart_node_group_epoch").set(e as f64);
                }
                self.ack = None;
                self.outstanding = None;
            }
            Ok(_) => {}
            Err(e) => {
                // Without the state from before, this member cannot follow: ask to be added
                // again.
                tracing::warn!(error = %e, "group key: cannot undo a voided commit");
                self.stale_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// A group commit the others must refuse (see `crate::fault`): a valid commit that
    /// removes another current replica, or, every other time, one with a flipped byte.
    #[cfg(feature = "fault-injection")]
    pub(crate) fn forge_commit(
        &mut self,
        m: &securesmart_membership::Membership,
        turn: u64,
    ) -> Option<Ordered> {
        let replicas = m.replica_ids();
        let victim = self
            .member
            .members()
            .into_iter()
            .find(|id| *id != self.id && replicas.contains(id))?;
        let mut commit = self.member.propose_remove(victim).ok()?.commit;
        if turn % 2 == 1
            && let Some(last) = commit.last_mut()
        {
            *last ^= 1;
        }
        Some(Ordered::GroupCommit {
            commit: Bytes::from(commit),
            welcome: Bytes::new(),
        })
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
            .map(|epoch| Ordered::KeyAck {
                epoch,
                commit: self.member.entered_by(),
            })
    }

    /// The acknowledgement from [`GroupKey::pending_ack`] was submitted.
    pub(crate) fn acknowledged(&mut self) {
        self.ack = None;
    }

    /// The refusal of an unsettled commit this member could not apply, to order. Call
    /// [`GroupKey::refused`] once it is submitted.
    pub(crate) fn pending_refusal(&self) -> Option<Ordered> {
        self.refusal.map(Ordered::CommitRefused)
    }

    /// The refusal from [`GroupKey::pending_refusal`] was submitted.
    pub(crate) fn refused(&mut self) {
        self.refusal = None;
    }

    /// Periodic work: create the group at genesis, ask to be added, commit what is due.
    /// `still_voting`: replicas removed from the membership whose group has not yet taken
    /// over (they stay in the group key until then, so that they can execute what they still
    /// vote on). `rotate`: a quorum acknowledged the current epoch (rotating earlier would gain
    /// nothing: confidential requests go on being sealed in an earlier epoch). Returns a request
    /// to order, if any.
    pub(crate) fn tick(
        &mut self,
        view: &GroupView<'_>,
        creator: bool,
        still_voting: &[NodeId],
        rotate: bool,
    ) -> Option<Ordered> {
        let m = view.membership;
        self.check_fork(view);
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
        if self.rank(view).is_none() {
            self.todo.clear();
            return None;
        }
        if !self.acting(view) || self.member.unsettled().is_some() {
            // (One commit at a time: the replicated state takes no other until ours, or the
            // one we merged, is settled.)
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
        // Replicas that asked to be added, from the replicated state (whatever this member saw
        // ordered: it may have been no member yet when they asked).
        for (id, kp) in view.key_packages {
            let queued = self.todo.iter().any(|w| match w {
                Work::Add(q, _) | Work::Readd(q, _) => q == id,
                Work::Remove(_) => false,
            });
            let just_added = self
                .recent_adds
                .get(id)
                .is_some_and(|t| t.elapsed() < GROUP_RETRY.saturating_mul(2));
            if !queued && !just_added && replicas.contains(id) {
                self.todo.push_back(if members.contains(id) {
                    Work::Readd(*id, kp.clone())
                } else {
                    Work::Add(*id, kp.clone())
                });
            }
        }
        // A commit is kept with f + 1 acknowledgements, and no other commit is taken while one
        // is unsettled: so an add commit waits until the holders and the added make more than
        // f. With f >= 2, a group that starts with its creator alone could not settle single
        // adds, and f faulty replicas added first would leave too few correct holders to
        // settle later ones: so while fewer than 2f + 1 replicas hold the key, the committer
        // waits for 2f + 1 of holders and joiners together and adds them in one commit (at
        // least f + 1 of them correct). Its members are drawn at random, as many as wait
        // first, and fewer while building fails (openmls refuses a batch with a duplicated
        // key, which a faulty replica can copy from another's key package), so that faulty key
        // packages cannot block it for good. Otherwise (f = 1: n = 4 to 6; or 2f + 1 holders)
        // one add per commit, so that a faulty replica's key package voids only its own. Key
        // packages that do not check out are left to the loop below (it drops them).
        let holders = members.iter().filter(|id| replicas.contains(id)).count();
        let settles = |added: usize| holders + added > m.f();
        let mut adds: Vec<(NodeId, Bytes, rustls::pki_types::CertificateDer<'static>)> = Vec::new();
        for work in &self.todo {
            if let Work::Add(id, kp) = work
                && !members.contains(id)
                && view.joining.get(id) == Some(&securesmart_membership::key_package_digest(kp))
                && let Some(cert) = m.members().get(id).map(|mem| mem.certificate.clone())
                && self.member.check_key_package(kp, &cert).is_ok()
            {
                adds.push((*id, kp.clone(), cert));
            }
        }
        let quorum = m.f().saturating_mul(2).saturating_add(1);
        if m.f() >= 2 && holders < quorum && !adds.is_empty() {
            use rand::seq::SliceRandom;
            let needed = quorum.saturating_sub(holders);
            if adds.len() < needed {
                return None;
            }
            adds.shuffle(&mut rand::rng());
            for take in (needed..=adds.len()).rev() {
                let joiners: Vec<(&[u8], &rustls::pki_types::CertificateDer<'_>)> = adds
                    .iter()
                    .take(take)
                    .map(|(_, kp, cert)| (kp.as_ref(), cert))
                    .collect();
                if let Ok(proposal) = self.member.propose_add_many(&joiners) {
                    for _ in &joiners {
                        commit_counter("add");
                    }
                    self.todo.retain(|w| {
                        !matches!(w, Work::Add(id, _) if adds.iter().take(take).any(|(a, _, _)| a == id))
                    });
                    return self.submit(Ok(proposal));
                }
            }
            tracing::warn!(
                waiting = adds.len(),
                "group key: no batch of the waiting replicas builds; trying other ones next time"
            );
            return None;
        }
        while let Some(work) = self.todo.pop_front() {
            // Only with the key package the replica is to be added with now (the commit policy
            // refuses any other, and the commit would be voided).
            if let Work::Add(id, kp) | Work::Readd(id, kp) = &work
                && view.joining.get(id) != Some(&securesmart_membership::key_package_digest(kp))
            {
                continue;
            }
            let proposal = match &work {
                Work::Add(id, kp) if !members.contains(id) && settles(1) => {
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
                Work::Readd(id, kp) if members.contains(id) => {
                    let Some(cert) = m.members().get(id).map(|mem| mem.certificate.clone()) else {
                        continue;
                    };
                    commit_counter("readd");
                    self.member.propose_readd(*id, kp, &cert)
                }
                Work::Readd(id, kp) if settles(1) => {
                    let Some(cert) = m.members().get(id).map(|mem| mem.certificate.clone()) else {
                        continue;
                    };
                    commit_counter("add");
                    self.member.propose_add(kp, &cert)
                }
                _ => continue,
            };
            return self.submit(proposal);
        }
        // A backup rotates only once the key is overdue by its delay as well.
        let rank = self.rank(view).unwrap_or(0);
        let overdue = rank == 0
            || view.designated() == Some(self.id)
            || self.member.needs_rotation(
                self.now()
                    .saturating_sub(BACKUP_DELAY.saturating_mul(rank as u32)),
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
