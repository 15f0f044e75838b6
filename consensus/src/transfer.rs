//! Fetching a snapshot in parts, so that a state of any size (up to
//! [`crate::message::Limits::max_snapshot_bytes`]) crosses a transport whose frames are smaller.
//!
//! A checkpoint signs the digest of the snapshot's part digests
//! ([`crate::view_change::state_digest`]). A replica that fetches the state learns the part
//! digests from a state reply whose certificate it checked, then asks for the parts, a few at a
//! time, from every replica that sent it those digests, and checks each part against its digest
//! as it arrives: a faulty replica can send a wrong part only once (it is then no source of
//! this transfer any more), and cannot make the fetcher hold more than the certified size.
//!
//! Pacing: the fetcher asks each source for at most [`PARTS_PER_DELAY`] parts per
//! `state_transfer_delay` and asks again, from another source, for a part not received within
//! one; a server serves one requester at that rate too (a bucket of twice as many, so that
//! periods that do not line up do not slow a correct fetcher), so a faulty requester costs each
//! replica at most 4 MiB per period of sending with the default 1 MiB parts. A server keeps the
//! snapshots a requester fetches ([`PINS_PER_MEMBER`]) for [`PIN_DELAYS`] periods after its
//! last request, even once its stable checkpoint moved on.
//!
//! Giving way: a transfer in progress is kept against a newer certified state only while more
//! than f of its sources in the current group are live (none of their asks went unanswered
//! since the last part they sent) and it received at least [`STALL_MIN_PARTS`] parts in the
//! last [`STALL_DELAYS`] periods; so
//! faulty replicas that alone offer an older state, or trickle its parts, hold a replica back
//! by a few periods at most. Parts held when a transfer gives way are kept, by digest, for the
//! next one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use securesmart_base::NodeId;

use crate::message::{Digest, Seq};
use crate::view_change::part_digest;

/// Parts a fetcher asks one source for per `state_transfer_delay`, and a replica serves one
/// requester per period in the long run.
pub const PARTS_PER_DELAY: u32 = 4;
/// Parts a replica serves one requester in a burst (its bucket's size).
pub const SERVED_PARTS_BURST: u32 = 2 * PARTS_PER_DELAY;
/// A server keeps a snapshot this many `state_transfer_delay`s after a requester last asked
/// for one of its parts (or got its part digests).
pub const PIN_DELAYS: u32 = 16;
/// Snapshots one member can have a server keep at once (the one it fetches and the newer one
/// it was told of meanwhile).
pub const PINS_PER_MEMBER: usize = 2;
/// The period, in `state_transfer_delay`s, over which a transfer's progress is judged.
pub const STALL_DELAYS: u32 = 4;
/// Parts a transfer must receive per [`STALL_DELAYS`] periods not to count as stalled.
pub const STALL_MIN_PARTS: usize = (STALL_DELAYS * PARTS_PER_DELAY / 2) as usize;

/// A server's budget for one requester's parts: [`PARTS_PER_DELAY`] per period, up to
/// [`SERVED_PARTS_BURST`] at once.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Bucket {
    /// The time the tokens were counted at, and the tokens.
    at: Option<(Duration, u32)>,
}

impl Bucket {
    /// Takes a token if there is one.
    pub(crate) fn take(&mut self, now: Duration, delay: Duration) -> bool {
        let per_token = (delay / PARTS_PER_DELAY).max(Duration::from_nanos(1));
        let (mut at, mut tokens) = self.at.unwrap_or((now, SERVED_PARTS_BURST));
        // A clock stepped back counts from now.
        at = at.min(now);
        let gained = now.saturating_sub(at).as_nanos() / per_token.as_nanos();
        if gained > 0 {
            let gained = u32::try_from(gained).unwrap_or(u32::MAX);
            tokens = tokens.saturating_add(gained).min(SERVED_PARTS_BURST);
            at = if tokens == SERVED_PARTS_BURST {
                now
            } else {
                at + per_token * gained
            };
        }
        let ok = tokens > 0;
        if ok {
            tokens -= 1;
        }
        self.at = Some((at, tokens));
        ok
    }
}

/// The byte range of part `index` in a snapshot of `len` bytes cut into `part_bytes`; `None`
/// past the end (an empty snapshot has one empty part).
pub(crate) fn part_range(
    len: usize,
    part_bytes: usize,
    index: u32,
) -> Option<std::ops::Range<usize>> {
    let part_bytes = part_bytes.max(1);
    let start = usize::try_from(index).ok()?.checked_mul(part_bytes)?;
    if start >= len && !(len == 0 && index == 0) {
        return None;
    }
    Some(start..start.saturating_add(part_bytes).min(len))
}

/// Why a part was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PartRefused {
    /// Held already, or the index is past the end.
    Stale,
    /// The bytes do not hash to the part's certified digest: the sender is faulty.
    Wrong,
}

/// A state transfer in progress: a certified snapshot's part digests and the parts held.
#[derive(Debug)]
pub(crate) struct Transfer {
    /// The checkpoint.
    pub(crate) seq: Seq,
    /// Its certified state digest.
    pub(crate) digest: Digest,
    /// The certificate (signed checkpoints) it came with.
    pub(crate) checkpoint: Vec<crate::message::Signed>,
    parts: Vec<Digest>,
    have: Vec<Option<Bytes>>,
    missing: usize,
    /// Replicas that sent these part digests, in the order heard, and when each last sent a
    /// part (or, until it does, the digests).
    sources: Vec<NodeId>,
    heard: BTreeMap<NodeId, Duration>,
    /// When an ask of each source last went unanswered for a period.
    missed: BTreeMap<NodeId, Duration>,
    /// When parts arrived, within the last [`STALL_DELAYS`] periods.
    arrivals: std::collections::VecDeque<Duration>,
    /// When the transfer started.
    started: Duration,
    /// Longest part (the configured part size).
    part_bytes: usize,
    /// Replicas that sent a wrong part: no sources of this transfer any more.
    banned: BTreeSet<NodeId>,
    /// Parts asked for and not received: by whom and when.
    asked: BTreeMap<u32, (NodeId, Duration)>,
    /// Per source: the start of its current period and the parts asked in it.
    budget: BTreeMap<NodeId, (Duration, u32)>,
    next_source: usize,
}

impl Transfer {
    /// A transfer of the snapshot with `parts` (of at most `part_bytes` each) at `seq`, from
    /// `source`; `reuse` gives parts already held here by digest (e.g. unchanged since this
    /// replica's own last snapshot), which are checked like received ones.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        seq: Seq,
        digest: Digest,
        checkpoint: Vec<crate::message::Signed>,
        parts: Vec<Digest>,
        part_bytes: usize,
        source: NodeId,
        now: Duration,
        reuse: impl Fn(usize, &Digest) -> Option<Bytes>,
    ) -> Self {
        let have: Vec<Option<Bytes>> = parts
            .iter()
            .enumerate()
            .map(|(i, d)| reuse(i, d).filter(|b| part_digest(b) == *d))
            .collect();
        let missing = have.iter().filter(|p| p.is_none()).count();
        Self {
            seq,
            digest,
            checkpoint,
            parts,
            have,
            missing,
            sources: vec![source],
            heard: BTreeMap::from([(source, now)]),
            missed: BTreeMap::new(),
            arrivals: std::collections::VecDeque::new(),
            started: now,
            part_bytes: part_bytes.max(1),
            banned: BTreeSet::new(),
            asked: BTreeMap::new(),
            budget: BTreeMap::new(),
            next_source: 0,
        }
    }

    /// Whether this is the transfer of the state `digest` at `seq`.
    pub(crate) fn is_of(&self, seq: Seq, digest: Digest) -> bool {
        self.seq == seq && self.digest == digest
    }

    /// `id` sent the same part digests at `now`: it holds the snapshot too.
    pub(crate) fn add_source(&mut self, id: NodeId, now: Duration) {
        if self.banned.contains(&id) {
            return;
        }
        if !self.sources.contains(&id) {
            self.sources.push(id);
        }
        // Being told the digests again does not make a source live once it stopped sending
        // parts: only its first hearing counts until it sends one.
        self.heard.entry(id).or_insert(now);
    }

    /// Whether `id` is live: no ask of it went unanswered since it last sent a part (or was
    /// first heard from). A source that was not asked stays live.
    fn is_live(&self, id: &NodeId) -> bool {
        match (self.missed.get(id), self.heard.get(id)) {
            (Some(missed), Some(heard)) => missed < heard,
            (Some(_), None) => false,
            (None, _) => true,
        }
    }

    /// Live sources among those `counts` accepts (the current group's).
    pub(crate) fn live_sources(&self, counts: impl Fn(&NodeId) -> bool) -> usize {
        self.sources
            .iter()
            .filter(|s| counts(s) && self.is_live(s))
            .count()
    }

    /// Part `i`, if held.
    #[cfg(test)]
    fn part(&self, i: usize) -> Option<&Bytes> {
        self.have.get(i).and_then(Option::as_ref)
    }

    /// Whether every part is held.
    pub(crate) fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// Whether, over the last [`STALL_DELAYS`] periods (the transfer being that old), fewer
    /// than [`STALL_MIN_PARTS`] parts arrived.
    pub(crate) fn stalled(&self, now: Duration, delay: Duration) -> bool {
        let window = delay.saturating_mul(STALL_DELAYS);
        now.saturating_sub(self.started) >= window
            && self
                .arrivals
                .iter()
                .filter(|at| now.saturating_sub(**at) < window)
                .count()
                < STALL_MIN_PARTS
    }

    /// The part requests to send now: every part not held and not asked for within `delay`
    /// goes to the next source (round robin) that has budget left in its period.
    pub(crate) fn requests(&mut self, now: Duration, delay: Duration) -> Vec<(NodeId, u32)> {
        let mut out = Vec::new();
        if self.sources.is_empty() {
            return out;
        }
        // At most what the sources' budgets allow this period (so a tick costs little).
        let left: usize = self
            .sources
            .iter()
            .map(|s| match self.budget.get(s) {
                Some((start, used)) if now.saturating_sub(*start) < delay => {
                    PARTS_PER_DELAY.saturating_sub(*used) as usize
                }
                _ => PARTS_PER_DELAY as usize,
            })
            .sum();
        let wanted: Vec<u32> = (0..self.have.len())
            .filter(|i| self.have.get(*i).is_some_and(Option::is_none))
            .filter_map(|i| u32::try_from(i).ok())
            .filter(|i| {
                self.asked
                    .get(i)
                    .is_none_or(|(_, at)| now.saturating_sub(*at) >= delay)
            })
            .take(left)
            .collect();
        for index in wanted {
            let Some(source) = self.take_budget(now, delay) else {
                break;
            };
            if let Some((late, _)) = self.asked.insert(index, (source, now)) {
                // Asked a period ago and not answered.
                self.missed.insert(late, now);
            }
            out.push((source, index));
        }
        out
    }

    /// The next source, round robin, with budget left in its period (and spends one); live
    /// sources first, so that one that stopped answering is asked only when no other can be.
    fn take_budget(&mut self, now: Duration, delay: Duration) -> Option<NodeId> {
        let n = self.sources.len();
        for live in [true, false] {
            for k in 0..n {
                let source = *self.sources.get((self.next_source + k) % n)?;
                if self.is_live(&source) != live {
                    continue;
                }
                let (start, used) = self.budget.entry(source).or_insert((now, 0));
                if now.saturating_sub(*start) >= delay {
                    (*start, *used) = (now, 0);
                }
                if *used < PARTS_PER_DELAY {
                    *used += 1;
                    self.next_source = (self.next_source + k + 1) % n;
                    return Some(source);
                }
            }
        }
        None
    }

    /// Part `index` from `sender`. A wrong part bans its sender from this transfer, and the
    /// parts asked of it are asked again elsewhere.
    pub(crate) fn on_part(
        &mut self,
        sender: NodeId,
        index: u32,
        bytes: Bytes,
        now: Duration,
    ) -> Result<(), PartRefused> {
        let i = usize::try_from(index).map_err(|_| PartRefused::Stale)?;
        if self.banned.contains(&sender) {
            return Err(PartRefused::Stale);
        }
        let (Some(None), Some(digest)) = (self.have.get(i), self.parts.get(i)) else {
            return Err(PartRefused::Stale);
        };
        // Cheap before hashing: no correct part is longer than the part size.
        if bytes.len() > self.part_bytes || part_digest(&bytes) != *digest {
            self.banned.insert(sender);
            self.sources.retain(|s| *s != sender);
            self.asked.retain(|_, (s, _)| *s != sender);
            return Err(PartRefused::Wrong);
        }
        if self.sources.contains(&sender) {
            self.heard.insert(sender, now);
        }
        self.store(i, bytes, now);
        Ok(())
    }

    /// Holds `bytes` (checked) as missing part `i`, received at `now`.
    fn store(&mut self, i: usize, bytes: Bytes, now: Duration) {
        let Some(slot) = self.have.get_mut(i) else {
            return;
        };
        *slot = Some(bytes);
        self.missing = self.missing.saturating_sub(1);
        if let Ok(index) = u32::try_from(i) {
            self.asked.remove(&index);
        }
        self.arrivals.push_back(now);
        while self.arrivals.len() > STALL_MIN_PARTS {
            self.arrivals.pop_front();
        }
    }

    /// A part that arrived for another transfer (one this replaced): taken if its bytes are
    /// a missing part of this one.
    pub(crate) fn take_matching(&mut self, bytes: Bytes, now: Duration) -> bool {
        if bytes.len() > self.part_bytes {
            return false;
        }
        let digest = part_digest(&bytes);
        let Some(i) = self
            .parts
            .iter()
            .zip(&self.have)
            .position(|(d, held)| *d == digest && held.is_none())
        else {
            return false;
        };
        self.store(i, bytes, now);
        true
    }

    /// The parts held, by digest (for the transfer that replaces this one).
    pub(crate) fn into_held(self) -> BTreeMap<Digest, Bytes> {
        self.parts
            .into_iter()
            .zip(self.have)
            .filter_map(|(d, p)| p.map(|p| (d, p)))
            .collect()
    }

    /// The part digests and the whole snapshot (call once [`Transfer::is_complete`]).
    pub(crate) fn assemble(self) -> (Vec<Digest>, Bytes) {
        let len = self.have.iter().flatten().map(Bytes::len).sum();
        let mut out = BytesMut::with_capacity(len);
        for part in self.have.into_iter().flatten() {
            out.extend_from_slice(&part);
        }
        (self.parts, out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view_change::part_digests;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    const MS: Duration = Duration::from_millis(1);
    const DELAY: Duration = Duration::from_millis(200);

    fn snapshot(len: usize) -> Bytes {
        Bytes::from((0..len).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>())
    }

    fn transfer(snapshot: &Bytes, part_bytes: usize) -> Transfer {
        let parts = part_digests(snapshot, part_bytes);
        Transfer::new(
            7,
            Digest([1; 32]),
            Vec::new(),
            parts,
            part_bytes,
            id(1),
            MS,
            |_, _| None,
        )
    }

    fn part(snapshot: &Bytes, part_bytes: usize, index: u32) -> Bytes {
        let r = part_range(snapshot.len(), part_bytes, index).unwrap();
        snapshot.slice(r)
    }

    #[test]
    fn part_ranges_cover_the_snapshot_and_nothing_past_it() {
        assert_eq!(part_range(10, 4, 0), Some(0..4));
        assert_eq!(part_range(10, 4, 2), Some(8..10));
        assert_eq!(part_range(10, 4, 3), None);
        assert_eq!(part_range(0, 4, 0), Some(0..0));
        assert_eq!(part_range(0, 4, 1), None);
        assert_eq!(part_range(8, 4, u32::MAX), None);
        assert_eq!(part_digests(&[], 4).len(), 1);
        assert_eq!(part_digests(&[0; 10], 4).len(), 3);
    }

    #[test]
    fn parts_from_several_sources_assemble_the_snapshot() {
        let s = snapshot(700);
        let mut t = transfer(&s, 64);
        t.add_source(id(2), MS);
        t.add_source(id(3), MS);
        let asks = t.requests(MS, DELAY);
        // 11 parts, 4 per source per period: all asked, spread over the three sources.
        assert_eq!(asks.len(), 11);
        for source in [1, 2, 3] {
            assert!(asks.iter().any(|(s, _)| *s == id(source)), "{asks:?}");
        }
        assert!(t.requests(2 * MS, DELAY).is_empty(), "asked already");
        for (source, index) in asks {
            assert_eq!(
                t.on_part(source, index, part(&s, 64, index), 3 * MS),
                Ok(())
            );
        }
        assert!(t.is_complete());
        let (parts, got) = t.assemble();
        assert_eq!(got, s);
        assert_eq!(parts, part_digests(&s, 64));
    }

    #[test]
    fn a_wrong_part_bans_its_sender_and_the_part_is_asked_of_another() {
        let s = snapshot(256);
        let mut t = transfer(&s, 64);
        t.add_source(id(2), MS);
        let asks = t.requests(MS, DELAY);
        let (bad, index) = asks.iter().copied().find(|(s, _)| *s == id(2)).unwrap();
        assert_eq!(
            t.on_part(bad, index, Bytes::from_static(b"garbage"), 2 * MS),
            Err(PartRefused::Wrong)
        );
        // Asked again of the remaining source (in its next period: it has 4 asks out); the
        // banned one is not taken back, and its other parts are refused unhashed.
        t.add_source(id(2), 2 * MS);
        assert_eq!(
            t.on_part(bad, 3, part(&s, 64, 3), 2 * MS),
            Err(PartRefused::Stale)
        );
        let again = t.requests(MS + DELAY, DELAY);
        assert!(again.contains(&(id(1), index)), "{again:?}");
        assert!(again.iter().all(|(s, _)| *s == id(1)));
        assert_eq!(
            t.on_part(id(1), 0, Bytes::from(vec![0; 65]), 4 * MS),
            Err(PartRefused::Wrong),
            "longer than a part"
        );
        t.add_source(id(1), 4 * MS);
        assert_eq!(t.on_part(id(3), index, part(&s, 64, index), 4 * MS), Ok(()));
        assert_eq!(
            t.on_part(id(3), index, part(&s, 64, index), 4 * MS),
            Err(PartRefused::Stale),
            "held already"
        );
        assert_eq!(
            t.on_part(id(3), 99, Bytes::new(), 4 * MS),
            Err(PartRefused::Stale)
        );
    }

    #[test]
    fn each_source_is_asked_a_bounded_number_of_parts_per_period() {
        let s = snapshot(64 * 40);
        let mut t = transfer(&s, 64);
        assert_eq!(t.requests(MS, DELAY).len(), PARTS_PER_DELAY as usize);
        assert!(t.requests(DELAY / 2, DELAY).is_empty());
        // A new period: the unanswered parts and the next ones, within the budget again.
        let later = t.requests(MS + DELAY, DELAY);
        assert_eq!(later.len(), PARTS_PER_DELAY as usize);
        assert!(
            later.iter().any(|(_, i)| *i == 0),
            "unanswered part 0 asked again"
        );
        assert!(!t.stalled(MS + DELAY, DELAY));
        assert!(
            t.stalled(MS + DELAY * STALL_DELAYS, DELAY),
            "nothing arrived"
        );
    }

    /// A trickle of parts does not keep a transfer from counting as stalled; a source whose
    /// ask went unanswered for a period stops counting as live (being told the digests again
    /// does not revive it, a part does) and is asked only when the live ones have no budget.
    #[test]
    fn a_trickle_is_a_stall_and_a_silent_source_is_not_live() {
        let s = snapshot(64 * 40);
        let mut t = transfer(&s, 64);
        t.add_source(id(2), MS);
        let all = |_: &NodeId| true;
        assert_eq!(t.live_sources(all), 2, "not asked yet");
        let asks = t.requests(MS, DELAY);
        // Source 2 answers; source 1 stays silent.
        for (source, index) in &asks {
            if *source == id(2) {
                assert_eq!(
                    t.on_part(id(2), *index, part(&s, 64, *index), 2 * MS),
                    Ok(())
                );
            }
        }
        let again = t.requests(MS + DELAY, DELAY);
        assert_eq!(t.live_sources(all), 1, "source 1 left its asks unanswered");
        assert_eq!(
            t.live_sources(|id: &NodeId| *id != NodeId::from_bytes([2; 32])),
            0
        );
        t.add_source(id(1), MS + DELAY);
        assert_eq!(t.live_sources(all), 1, "told again, still not live");
        // Live first: source 2's budget, then source 1 for the rest.
        let to_2 = again.iter().filter(|(s, _)| *s == id(2)).count();
        assert_eq!(to_2, PARTS_PER_DELAY as usize, "{again:?}");
        assert!(again.iter().any(|(s, _)| *s == id(1)));
        let (_, index) = *again.iter().find(|(s, _)| *s == id(1)).unwrap();
        assert_eq!(
            t.on_part(id(1), index, part(&s, 64, index), MS + DELAY + MS),
            Ok(())
        );
        assert_eq!(t.live_sources(all), 2, "a part revives it");
        // One part a period from here on: a stall.
        let start = MS + DELAY * 2;
        let missing: Vec<u32> = (0..40).filter(|i| t.part(*i as usize).is_none()).collect();
        for (k, index) in missing.iter().take(6).enumerate() {
            let at = start + DELAY * k as u32;
            assert_eq!(t.on_part(id(2), *index, part(&s, 64, *index), at), Ok(()));
        }
        assert!(
            t.stalled(start + DELAY * 6, DELAY),
            "a trickle of one part a period"
        );
        // A full rate counts as progress.
        let now = start + DELAY * 6;
        for index in missing.iter().skip(6).take(STALL_MIN_PARTS) {
            assert_eq!(t.on_part(id(2), *index, part(&s, 64, *index), now), Ok(()));
        }
        assert!(!t.stalled(now + DELAY, DELAY));
    }

    /// A part that arrives for a transfer this one replaced is kept if this one lacks it.
    #[test]
    fn a_part_for_a_replaced_transfer_is_taken_if_it_is_missing_here() {
        let s = snapshot(256);
        let mut t = transfer(&s, 64);
        assert!(t.take_matching(part(&s, 64, 2), MS));
        assert!(!t.take_matching(part(&s, 64, 2), MS), "held already");
        assert!(!t.take_matching(Bytes::from_static(b"other"), MS));
        assert!(!t.take_matching(Bytes::from(vec![0; 65]), MS), "too long");
        let asks: Vec<u32> = t.requests(MS, DELAY).into_iter().map(|(_, i)| i).collect();
        assert_eq!(asks, vec![0, 1, 3]);
    }

    /// A server's bucket: a burst of twice the rate, then the rate.
    #[test]
    fn a_bucket_serves_a_burst_then_the_rate() {
        let mut b = Bucket::default();
        let burst = (0..100).filter(|_| b.take(MS, DELAY)).count();
        assert_eq!(burst, SERVED_PARTS_BURST as usize);
        let mut served = 0;
        for k in 1..=100u32 {
            served += usize::from(b.take(MS + DELAY * k / 10, DELAY));
        }
        // Ten periods at PARTS_PER_DELAY each, in 100 tries.
        assert_eq!(served, 10 * PARTS_PER_DELAY as usize);
    }

    #[test]
    fn parts_held_already_are_reused_only_if_they_match() {
        let s = snapshot(256);
        let parts = part_digests(&s, 64);
        let reuse = |i: usize, _: &Digest| {
            // Part 1 is right, part 2 is stale content under the same index.
            match i {
                1 => Some(part(&s, 64, 1)),
                2 => Some(Bytes::from_static(b"old")),
                _ => None,
            }
        };
        let mut t = Transfer::new(7, Digest([1; 32]), Vec::new(), parts, 64, id(1), MS, reuse);
        let asks: Vec<u32> = t.requests(MS, DELAY).into_iter().map(|(_, i)| i).collect();
        assert_eq!(asks, vec![0, 2, 3]);
    }
}
