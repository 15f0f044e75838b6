//! Certificates and the view-change computation, as pure functions of a [`Group`].
//!
//! The replica core calls these on messages whose signatures [`crate::message::KeyRing`] has
//! already checked (including every nested one); what is checked here is structure: kinds,
//! distinct senders that are members, matching fields and quorum sizes.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use securesmart_base::NodeId;

use crate::message::{
    Certificate, Digest, Message, Request, Seq, Signed, View, batch_digest, domain,
};

/// A replica group: its members in the agreed order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The replicas; the primary of view `v` is `members[v mod n]`.
    pub members: Vec<NodeId>,
}

impl Group {
    /// Faults tolerated ([`securesmart_base::quorum::faults`]: (n - 1) / 3, at least 1
    /// for n >= 2).
    pub fn f(&self) -> usize {
        securesmart_base::quorum::faults(self.members.len())
    }

    /// A quorum: ceil((n + f + 1) / 2), so that any two quorums share at least f + 1 replicas
    /// (one of them correct) and the n - f correct replicas form one. It is 2f + 1 when
    /// n = 3f + 1; for other sizes (n = 5, 6, ... while members join and leave) 2f + 1 would
    /// not intersect safely.
    pub fn quorum(&self) -> usize {
        securesmart_base::quorum::quorum(self.members.len())
    }

    /// Matching prepares (from distinct backups) that, with the pre-prepare, prepare a slot:
    /// a quorum less the primary.
    pub fn prepares_needed(&self) -> usize {
        self.quorum().saturating_sub(1)
    }

    /// The primary of `view`.
    pub fn primary(&self, view: View) -> Option<NodeId> {
        let n = self.members.len() as u64;
        if n == 0 {
            return None;
        }
        self.members.get((view % n) as usize).copied()
    }

    /// Whether `id` is a member.
    pub fn contains(&self, id: &NodeId) -> bool {
        self.members.contains(id)
    }

    /// Whether `signed` are at least `need` messages from distinct members, each accepted by
    /// `fits`.
    fn votes(&self, signed: &[Signed], need: usize, fits: impl Fn(&Message) -> bool) -> bool {
        let mut senders = BTreeSet::new();
        for s in signed {
            if !self.contains(&s.sender) || !fits(&s.message) || !senders.insert(s.sender) {
                return false;
            }
        }
        senders.len() >= need
    }

    /// The state digest a checkpoint certificate proves for `seq`, if it is one (2f+1 matching
    /// checkpoints from distinct members). Sequence number 0 is the genesis state and needs no
    /// certificate.
    pub fn checkpoint_cert(&self, seq: Seq, cert: &[Signed]) -> Option<Option<Digest>> {
        if seq == 0 {
            return cert.is_empty().then_some(None);
        }
        let Some(Message::Checkpoint { state, .. }) = cert.first().map(|s| &s.message) else {
            return None;
        };
        let state = *state;
        self.votes(
            cert,
            self.quorum(),
            |m| matches!(m, Message::Checkpoint { seq: s, state: d } if *s == seq && *d == state),
        )
        .then_some(Some(state))
    }

    /// `(view, seq, digest)` of a certificate whose votes are prepares (`commits == false`:
    /// [`Group::prepares_needed`] from distinct backups) or commits (`true`: 2f+1 from distinct members), matching a
    /// pre-prepare from the view's primary.
    pub fn certificate(&self, cert: &Certificate, commits: bool) -> Option<(View, Seq, Digest)> {
        let Message::PrePrepare {
            view, seq, digest, ..
        } = &cert.proposal.message
        else {
            return None;
        };
        let (view, seq, digest) = (*view, *seq, *digest);
        let primary = self.primary(view)?;
        if cert.proposal.sender != primary {
            return None;
        }
        let ok = if commits {
            self.votes(&cert.votes, self.quorum(), |m| {
                matches!(m, Message::Commit { view: v, seq: s, digest: d }
                    if (*v, *s, *d) == (view, seq, digest))
            })
        } else {
            cert.votes.iter().all(|v| v.sender != primary)
                && self.votes(&cert.votes, self.prepares_needed(), |m| {
                    matches!(m, Message::Prepare { view: v, seq: s, digest: d }
                        if (*v, *s, *d) == (view, seq, digest))
                })
        };
        ok.then_some((view, seq, digest))
    }
}

/// Whether a view-change message is well formed: its checkpoint certificate proves `stable`,
/// and each prepared certificate is valid, for an earlier view, for a distinct slot in
/// `(stable, stable + window]`. Each certificate is judged by the group of its own sequence
/// number (`group_at`), which differs from the current one across a group change.
pub fn valid_view_change(message: &Message, window: Seq, group_at: impl Fn(Seq) -> Group) -> bool {
    let Message::ViewChange {
        view,
        stable,
        checkpoint,
        prepared,
    } = message
    else {
        return false;
    };
    if group_at(*stable)
        .checkpoint_cert(*stable, checkpoint)
        .is_none()
    {
        return false;
    }
    let mut slots = BTreeSet::new();
    prepared.iter().all(|c| {
        let seq = c.proposal.message.seq().unwrap_or(0);
        group_at(seq)
            .certificate(c, false)
            .is_some_and(|(v, s, _)| {
                v < *view && s > *stable && s <= stable.saturating_add(window) && slots.insert(s)
            })
    })
}

/// What a new view must re-propose, computed from its view changes alike by the new primary
/// and by every backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewViewPlan {
    /// The highest stable checkpoint among the view changes.
    pub stable: Seq,
    /// Its certificate.
    pub checkpoint: Vec<Signed>,
    /// For each slot in `(stable, max prepared]`: the digest and batch to propose (the prepared
    /// certificate of the highest view, or an empty batch where there is none).
    pub proposals: BTreeMap<Seq, (Digest, Vec<Request>)>,
}

/// Plans a new view from view-change messages (already checked with
/// [`valid_view_change`]).
pub fn plan_new_view(view_changes: &[&Message]) -> NewViewPlan {
    let mut stable = 0;
    let mut checkpoint = Vec::new();
    let mut best: BTreeMap<Seq, (View, Digest, Vec<Request>)> = BTreeMap::new();
    for m in view_changes {
        let Message::ViewChange {
            stable: s,
            checkpoint: c,
            prepared,
            ..
        } = m
        else {
            continue;
        };
        if *s > stable || (checkpoint.is_empty() && *s == stable) {
            stable = *s;
            checkpoint = c.clone();
        }
        for cert in prepared {
            if let Message::PrePrepare {
                view,
                seq,
                digest,
                batch,
            } = &cert.proposal.message
                && best.get(seq).is_none_or(|(v, _, _)| view > v)
            {
                best.insert(*seq, (*view, *digest, batch.clone()));
            }
        }
    }
    let top = best
        .keys()
        .next_back()
        .copied()
        .unwrap_or(stable)
        .max(stable);
    let proposals = (stable + 1..=top)
        .map(|seq| match best.remove(&seq) {
            Some((_, digest, batch)) => (seq, (digest, batch)),
            None => (seq, (batch_digest(&[]), Vec::new())),
        })
        .collect();
    NewViewPlan {
        stable,
        checkpoint,
        proposals,
    }
}

/// The digest a checkpoint signs: over the sequence number and the digests of the replica's
/// full snapshot cut into parts of `part_bytes` ([`part_digests`]), so that a replica that
/// fetches the state can check each part on its own, from whichever replica sent it.
pub fn state_digest(seq: Seq, snapshot: &[u8], part_bytes: usize) -> Digest {
    state_digest_of_parts(seq, &part_digests(snapshot, part_bytes))
}

/// [`state_digest`] from the parts' digests.
pub fn state_digest_of_parts(seq: Seq, parts: &[Digest]) -> Digest {
    let mut h = crate::message::hasher(domain::STATE_DIGEST);
    h.update(&seq.to_be_bytes());
    h.update(&(parts.len() as u64).to_be_bytes());
    for part in parts {
        h.update(&part.0);
    }
    Digest(*h.finalize().as_bytes())
}

/// The digests of `snapshot` cut into parts of `part_bytes` (at least 1; the last part may be
/// shorter). An empty snapshot is one empty part.
pub fn part_digests(snapshot: &[u8], part_bytes: usize) -> Vec<Digest> {
    if snapshot.is_empty() {
        return vec![part_digest(&[])];
    }
    snapshot
        .chunks(part_bytes.max(1))
        .map(part_digest)
        .collect()
}

/// The digest of one part of a snapshot (content only, so that an unchanged part keeps it).
pub fn part_digest(part: &[u8]) -> Digest {
    let mut h = crate::message::hasher(domain::STATE_PART);
    h.update(part);
    Digest(*h.finalize().as_bytes())
}

/// A replica snapshot: the core's replicated state (the group schedule and the last executed
/// request number per client) and the application's snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) groups: BTreeMap<Seq, Vec<NodeId>>,
    pub(crate) last_executed: BTreeMap<NodeId, u64>,
    pub(crate) app: Bytes,
}

const SNAPSHOT_VERSION: u8 = 1;

impl Snapshot {
    pub(crate) fn encode_core(
        groups: &BTreeMap<Seq, Vec<NodeId>>,
        last_executed: &BTreeMap<NodeId, u64>,
    ) -> Vec<u8> {
        let mut w = securesmart_base::wire::Writer::default();
        w.u8(SNAPSHOT_VERSION);
        w.u32(u32::try_from(groups.len()).unwrap_or(u32::MAX));
        for (from, members) in groups {
            w.raw(&from.to_be_bytes());
            w.u32(u32::try_from(members.len()).unwrap_or(u32::MAX));
            for m in members {
                w.raw(m.as_bytes());
            }
        }
        w.u32(u32::try_from(last_executed.len()).unwrap_or(u32::MAX));
        for (client, n) in last_executed {
            w.raw(client.as_bytes()).raw(&n.to_be_bytes());
        }
        w.buf
    }

    /// The full snapshot: the core part, then the application's bytes (length-prefixed).
    pub(crate) fn join(core: &[u8], app: &[u8]) -> Bytes {
        let mut w = securesmart_base::wire::Writer::default();
        w.raw(core).bytes(app);
        Bytes::from(w.buf)
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self, securesmart_base::wire::WireError> {
        use securesmart_base::wire::{Reader, WireError};
        let mut r = Reader::new(buf);
        r.version(SNAPSHOT_VERSION)?;
        let u64_of = |r: &mut Reader<'_>| r.array().map(u64::from_be_bytes);
        let n = r.u32()? as usize;
        let mut groups = BTreeMap::new();
        for _ in 0..n.min(buf.len()) {
            let from = u64_of(&mut r)?;
            let k = r.u32()? as usize;
            let mut members = Vec::with_capacity(k.min(256));
            for _ in 0..k {
                members.push(NodeId::from_bytes(r.array()?));
            }
            groups.insert(from, members);
        }
        if groups.len() != n {
            return Err(WireError::Invalid("group schedule"));
        }
        let n = r.u32()? as usize;
        let mut last_executed = BTreeMap::new();
        for _ in 0..n.min(buf.len()) {
            last_executed.insert(NodeId::from_bytes(r.array()?), u64_of(&mut r)?);
        }
        if last_executed.len() != n {
            return Err(WireError::Invalid("client table"));
        }
        let app = Bytes::copy_from_slice(r.bytes("application snapshot", usize::MAX)?);
        r.finish()?;
        Ok(Self {
            groups,
            last_executed,
            app,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorums_intersect_in_f_plus_one_for_every_group_size() {
        for n in 1..=40usize {
            let g = Group {
                members: (0..n).map(|i| NodeId::from_bytes([i as u8; 32])).collect(),
            };
            let (q, f) = (g.quorum(), g.f());
            assert!(2 * q - n > f, "n={n}: two quorums share f+1");
            if n >= 4 {
                assert!(q <= n - f, "n={n}: the correct replicas form a quorum");
            }
            if n % 3 == 1 {
                assert_eq!(q, 2 * f + 1, "n={n}: the classic 2f+1");
            }
        }
        let five = Group {
            members: (0..5).map(|i| NodeId::from_bytes([i; 32])).collect(),
        };
        assert_eq!((five.f(), five.quorum(), five.prepares_needed()), (1, 4, 3));
    }

    #[test]
    fn snapshots_round_trip_and_refuse_garbage() {
        let groups = BTreeMap::from([(0, vec![NodeId::from_bytes([1; 32])])]);
        let last = BTreeMap::from([(NodeId::from_bytes([2; 32]), 7)]);
        let full = Snapshot::join(&Snapshot::encode_core(&groups, &last), b"app");
        let back = Snapshot::decode(&full).unwrap();
        assert_eq!(
            (back.groups, back.last_executed, &back.app[..]),
            (groups, last, &b"app"[..])
        );
        for cut in 0..full.len() {
            assert!(Snapshot::decode(&full[..cut]).is_err());
        }
    }
}
