//! Messages a replica holds for later: normal-case messages for a later view, or for the window
//! after the current one. They passed signature verification and the cheap checks of
//! [`crate::replica`] (sender in the group, a pre-prepare from its view's primary), but nothing
//! more, so one faulty replica must not be able to fill the hold for everybody.
//!
//! The hold is bounded per sender, in messages and in bytes, and keeps only each sender's
//! latest view: a correct replica is in one view at a time, so its messages for a view it has
//! left are of no use, and a faulty one that claims ever higher views only replaces its own.

use std::collections::BTreeMap;

use securesmart_base::NodeId;

use crate::message::{Message, Verified, View};

/// Bytes a held message counts for, beyond its requests' payloads (ids, numbers, signature,
/// framing; an estimate that errs high).
const MESSAGE_OVERHEAD: usize = 256;
/// Bytes each request of a held pre-prepare counts for beyond its payload.
const REQUEST_OVERHEAD: usize = 64;

/// The bytes `message` counts for in a hold.
pub(crate) fn held_bytes(message: &Message) -> usize {
    match message {
        Message::PrePrepare { batch, .. } => batch.iter().fold(MESSAGE_OVERHEAD, |n, r| {
            n.saturating_add(r.payload.len().saturating_add(REQUEST_OVERHEAD))
        }),
        _ => MESSAGE_OVERHEAD,
    }
}

/// Per-sender bounds of a [`Hold`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct HoldLimits {
    /// Messages per sender.
    pub(crate) messages: usize,
    /// Bytes per sender (see [`held_bytes`]).
    pub(crate) bytes: usize,
}

/// Why a message was not held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The sender showed a later view before: this one is of no use.
    Stale,
    /// The sender's share is full.
    Full,
}

#[derive(Debug, Default)]
struct SenderHold {
    view: View,
    bytes: usize,
    /// (arrival number, bytes, message), in arrival order.
    messages: Vec<(u64, usize, Verified)>,
}

/// Held messages, bounded per sender (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Hold {
    by_sender: BTreeMap<NodeId, SenderHold>,
    arrivals: u64,
    len: usize,
}

impl Hold {
    /// Holds `message` (a pre-prepare, prepare or commit) unless its sender's share is full
    /// or it is for an earlier view than the sender's last; one for a later view replaces
    /// what the sender had held.
    pub(crate) fn insert(&mut self, message: Verified, limits: HoldLimits) -> Result<(), Refused> {
        let view = message.message().view().unwrap_or_default();
        let bytes = held_bytes(message.message());
        let held = self.by_sender.entry(message.sender()).or_default();
        if view < held.view {
            return Err(Refused::Stale);
        }
        if view > held.view {
            self.len = self.len.saturating_sub(held.messages.len());
            *held = SenderHold {
                view,
                ..SenderHold::default()
            };
        }
        if held.messages.len() >= limits.messages || held.bytes.saturating_add(bytes) > limits.bytes
        {
            return Err(Refused::Full);
        }
        self.arrivals += 1;
        held.bytes += bytes;
        held.messages.push((self.arrivals, bytes, message));
        self.len += 1;
        Ok(())
    }

    /// Removes and returns the messages `take` selects, in arrival order.
    pub(crate) fn take(&mut self, take: impl Fn(&Verified) -> bool) -> Vec<Verified> {
        let mut out = Vec::new();
        for held in self.by_sender.values_mut() {
            let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut held.messages)
                .into_iter()
                .partition(|(_, _, m)| take(m));
            held.bytes = kept.iter().map(|(_, b, _)| *b).sum();
            held.messages = kept;
            out.extend(taken.into_iter().map(|(arrival, _, m)| (arrival, m)));
        }
        self.len = self.by_sender.values().map(|h| h.messages.len()).sum();
        self.by_sender.retain(|_, h| !h.messages.is_empty());
        out.sort_unstable_by_key(|(arrival, _)| *arrival);
        out.into_iter().map(|(_, m)| m).collect()
    }

    /// Drops the messages `drop` selects.
    pub(crate) fn discard(&mut self, drop: impl Fn(&Verified) -> bool) {
        let _ = self.take(drop);
    }

    /// The held messages (per sender, in arrival order).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Verified> {
        self.by_sender
            .values()
            .flat_map(|h| h.messages.iter().map(|(_, _, m)| m))
    }

    /// Messages held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes held by `sender`.
    #[cfg(test)]
    pub(crate) fn bytes_of(&self, sender: &NodeId) -> usize {
        self.by_sender.get(sender).map_or(0, |h| h.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Request, Signer, batch_digest};
    use bytes::Bytes;

    fn signers(n: usize) -> Vec<Signer> {
        (0..n).map(|i| Signer::named(&format!("r{i}"))).collect()
    }

    fn prepare(s: &Signer, view: View, seq: u64) -> Verified {
        Verified::trusted(s.sign(Message::Prepare {
            view,
            seq,
            digest: batch_digest(&[]),
        }))
    }

    #[test]
    fn each_sender_has_its_own_share_in_messages_and_bytes() {
        let s = signers(2);
        let limits = HoldLimits {
            messages: 3,
            bytes: 4096,
        };
        let mut hold = Hold::default();
        for seq in 1..=3 {
            assert_eq!(hold.insert(prepare(&s[0], 1, seq), limits), Ok(()));
        }
        assert_eq!(
            hold.insert(prepare(&s[0], 1, 4), limits),
            Err(Refused::Full)
        );
        // The flooder's share is full; the other sender's is untouched.
        assert_eq!(hold.insert(prepare(&s[1], 1, 1), limits), Ok(()));
        // A big pre-prepare counts by its bytes.
        let batch = vec![Request {
            client: NodeId::from_bytes([1; 32]),
            number: 1,
            payload: Bytes::from(vec![0; 8192]),
        }];
        let big = Verified::trusted(s[1].sign(Message::PrePrepare {
            view: 1,
            seq: 2,
            digest: batch_digest(&batch),
            batch,
        }));
        assert_eq!(hold.insert(big, limits), Err(Refused::Full));
        assert_eq!(hold.len(), 4);
        assert!(hold.bytes_of(&s[0].id()) <= limits.bytes);
    }

    #[test]
    fn only_each_senders_latest_view_is_kept() {
        let s = signers(1);
        let limits = HoldLimits {
            messages: 8,
            bytes: 1 << 20,
        };
        let mut hold = Hold::default();
        hold.insert(prepare(&s[0], 2, 1), limits).unwrap();
        hold.insert(prepare(&s[0], 2, 2), limits).unwrap();
        assert_eq!(
            hold.insert(prepare(&s[0], 1, 3), limits),
            Err(Refused::Stale)
        );
        // A later view replaces the sender's earlier messages.
        hold.insert(prepare(&s[0], 9, 1), limits).unwrap();
        assert_eq!(hold.len(), 1);
        let taken = hold.take(|m| m.message().view() == Some(9));
        assert_eq!(taken.len(), 1);
        assert_eq!(hold.len(), 0);
        assert_eq!(hold.bytes_of(&s[0].id()), 0);
    }
}
