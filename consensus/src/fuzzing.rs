//! Fuzz bodies shared by the `fuzz/` targets and the corpus-replay test. Not a stable API.

// invariant: these bodies run only under the fuzzer (`fuzz/`) and the corpus-replay test,
// never in a node, so no network or file input reaches their unwrap/expect calls; those
// either build fixtures from constants (a development CA) or are the oracle itself.
// Panicking is this module's job: a failed oracle is the fuzzer's finding.
#![allow(clippy::expect_used, clippy::indexing_slicing)]

use crate::message::{KeyRing, Limits, Signed};

thread_local! {
    /// A key ring with one replica (whose key the fuzzer does not have).
    // invariant: a fixture from constants; no fuzz input reaches these expect calls.
    static RING: KeyRing = {
        let node = crate::message::Signer::named("fuzz r0");
        KeyRing::new([(node.id(), node.public_key().expect("Ed25519"))])
    };
}

/// Decodes a consensus message: decoding is canonical (re-encoding gives the same bytes), and no
/// decoded message verifies (the fuzzer cannot sign), alone or in a batch.
pub fn consensus_message(data: &[u8]) {
    let Ok(signed) = Signed::decode(data, &Limits::default()) else {
        return;
    };
    assert_eq!(signed.encode(), data, "encoding is canonical");
    RING.with(|ring| {
        assert!(ring.verify(signed.clone()).is_err());
        assert!(ring.verify_batch(vec![signed]).iter().all(Result::is_err));
    });
}

/// The part size of the replica the fuzzer drives (small, so that states come in parts).
const PART_BYTES: usize = 16;

thread_local! {
    /// Four replica identities whose keys the fuzzer "holds" (it plays Byzantine replicas).
    // invariant: a fixture from constants; no fuzz input reaches these expect calls.
    static GROUP: (Vec<crate::message::Signer>, KeyRing, Vec<securesmart_base::NodeId>) = {
        let signers: Vec<_> =
            (0..4).map(|i| crate::message::Signer::named(&format!("fuzz r{i}"))).collect();
        let ring =
            KeyRing::new(signers.iter().map(|s| (s.id(), s.public_key().expect("key"))));
        let ids = signers.iter().map(crate::message::Signer::id).collect();
        (signers, ring, ids)
    };
}

/// Feeds a sequence of operations, four bytes each, to a backup replica core: client requests,
/// ticks (which fire view changes), and pre-prepares, prepares, commits, checkpoints and view
/// changes, state requests, certified state replies (in one part or several) and their parts,
/// signed by any of the four replicas (the fuzzer may play all of them, so it can also equivocate). Oracles, independent
/// of the core: execution is gap-free and in order, never two batches at one sequence number,
/// the low watermark never passes execution, and held state stays within its bounds.
pub fn replica_ops(data: &[u8]) {
    use crate::message::{Digest, Message, Request, batch_digest};
    use crate::replica::{Config, Output, Replica};
    use std::time::Duration;
    GROUP.with(|(signers, ring, ids)| {
        let mut config = Config::new(ids.clone());
        config.max_batch = 2;
        config.batch_delay = Duration::from_millis(1);
        config.window = 8;
        config.checkpoint_interval = 2;
        config.view_change_timeout = Duration::from_millis(20);
        config.max_pending = 16;
        config.state_part_bytes = PART_BYTES;
        // The last batch's requests are "unsigned": a pre-prepare carrying them is refused.
        config.request_check = Some(crate::replica::RequestCheck::new(|r| {
            r.payload.first() != Some(&2)
        }));
        let me = 1usize;
        let mut replica = Replica::new(config, crate::message::Signer::new_from(&signers[me]));
        let batches: Vec<Vec<Request>> = (0..3u64)
            .map(|k| {
                (0..k)
                    .map(|i| Request {
                        client: ids[0],
                        number: i,
                        payload: bytes::Bytes::from(vec![k as u8; 3]),
                    })
                    .collect()
            })
            .collect();
        let mut executed: std::collections::BTreeMap<u64, Digest> = Default::default();
        let mut next = 1u64;
        let mut now = Duration::ZERO;
        for op in data.chunks_exact(4) {
            let [kind, a, b, c] = [op[0], op[1], op[2], op[3]];
            let sender = usize::from(a % 4);
            let view = u64::from(b % 2);
            let seq = u64::from(c % 20);
            let batch = batches[usize::from(b / 2 % 3)].clone();
            let digest = batch_digest(&batch);
            // A state at `seq` certified by three of the four (the fuzzer holds their keys) over a
            // well-formed or a garbage snapshot: its snapshot, part digests and certificate.
            let certified = |seq: u64, a: u8, b: u8, c: u8| {
                let snapshot = if b.is_multiple_of(2) {
                    crate::view_change::Snapshot::join(
                        &crate::view_change::Snapshot::encode_core(
                            &std::collections::BTreeMap::from([(0, ids.clone())]),
                            &std::collections::BTreeMap::from([(ids[0], u64::from(a))]),
                        ),
                        &vec![a; usize::from(b % 4) * PART_BYTES],
                    )
                } else {
                    bytes::Bytes::from(vec![a, b, c])
                };
                let parts = crate::view_change::part_digests(&snapshot, PART_BYTES);
                let state = crate::view_change::state_digest_of_parts(seq, &parts);
                let checkpoint: Vec<Signed> = (0..3)
                    .map(|i| {
                        signers[(usize::from(a) + i) % 4].sign(Message::Checkpoint { seq, state })
                    })
                    .collect();
                (snapshot, parts, state, checkpoint)
            };
            let message = match kind % 11 {
                0 => {
                    let _ = replica.handle_request(
                        batch.first().cloned().unwrap_or(Request {
                            client: ids[2],
                            number: u64::from(c),
                            payload: bytes::Bytes::new(),
                        }),
                        now,
                    );
                    None
                }
                1 => Some(Message::PrePrepare {
                    view,
                    seq,
                    digest,
                    batch,
                }),
                2 => Some(Message::Prepare { view, seq, digest }),
                3 => Some(Message::Commit { view, seq, digest }),
                4 => Some(Message::Checkpoint {
                    seq,
                    state: Digest([a; 32]),
                }),
                5 => Some(Message::ViewChange {
                    view: u64::from(b % 4),
                    stable: 0,
                    checkpoint: Vec::new(),
                    prepared: Vec::new(),
                }),
                6 => Some(Message::FetchState { seq }),
                7 => {
                    // A state reply: the snapshot itself when it is one part, its part digests
                    // otherwise.
                    let (snapshot, parts, _, checkpoint) = certified(seq, a, b, c);
                    let snapshot = if parts.len() == 1 {
                        snapshot
                    } else {
                        bytes::Bytes::new()
                    };
                    Some(Message::State {
                        checkpoint,
                        parts,
                        snapshot,
                        committed: Vec::new(),
                    })
                }
                8 => {
                    // A part of such a state: right (for the state the same bytes name), or
                    // taken from the wrong place when `c` is odd.
                    let (snapshot, _, state, _) = certified(seq, a, b, 0);
                    let index = u32::from(c % 4);
                    let range = crate::transfer::part_range(snapshot.len(), PART_BYTES, index)
                        .unwrap_or(0..0);
                    let range = if c % 2 == 1 { 0..range.len() } else { range };
                    Some(Message::Part {
                        seq,
                        state,
                        index,
                        bytes: snapshot.slice(range),
                    })
                }
                9 => Some(Message::FetchPart {
                    seq,
                    state: Digest([a; 32]),
                    index: u32::from(c % 4),
                }),
                _ => {
                    now += Duration::from_millis(u64::from(c));
                    replica.handle_tick(now);
                    None
                }
            };
            if let Some(m) = message {
                // invariant: signed here by a member whose key is in the ring, so it verifies.
                let verified = ring
                    .verify(signers[sender].sign(m))
                    .expect("signed by a member");
                let _ = replica.handle_message(verified);
            }
            while let Some(out) = replica.poll_output() {
                match out {
                    Output::Execute { seq, digest, .. } => {
                        assert_eq!(seq, next, "gap-free, in order");
                        next += 1;
                        assert!(
                            executed.insert(seq, digest).is_none_or(|d| d == digest),
                            "never two batches at one sequence number"
                        );
                    }
                    Output::Restore { seq, .. } => {
                        // Forward, or back to the stable checkpoint when this replica's state
                        // was lost (the batches above it then execute again).
                        assert!(
                            seq >= next || seq == replica.low_watermark(),
                            "a restore moves forward or to the stable checkpoint"
                        );
                        next = seq + 1;
                    }
                    Output::CheckpointDue { seq } if b >= 0xf0 => replica.handle_state_lost(seq),
                    Output::CheckpointDue { seq } => {
                        replica.handle_checkpoint_state(seq, bytes::Bytes::from(vec![seq as u8]));
                    }
                    _ => {}
                }
            }
            assert!(replica.low_watermark() <= replica.executed() || replica.is_fetching());
            assert!(replica.slots_held() <= 2 * 8 + 20);
            assert!(replica.held_for_next_window() <= 2 * 8 * 4 * 3);
        }
    });
}

/// Reads a journal file (frames of records, as [`crate::journal::FileJournal`] writes them) and
/// recovers a replica core from whatever records it holds. Oracles: record encoding is
/// canonical, the valid prefix is within the input, and recovery either refuses the journal
/// with an error or yields a core whose execution never passes its own records' bounds.
pub fn journal(data: &[u8]) {
    use crate::journal::{Record, read_frames};
    use crate::replica::{Config, Output, Replica};
    let limits = Limits::default();
    if let Ok(record) = Record::decode(data, &limits) {
        assert_eq!(record.encode(), data, "record encoding is canonical");
    }
    let (records, valid) = read_frames(data, &limits);
    assert!(valid <= data.len());
    for r in &records {
        assert_eq!(
            Record::decode(&r.encode(), &limits).as_ref(),
            Ok(r),
            "records round-trip"
        );
    }
    GROUP.with(|(signers, _, ids)| {
        let mut config = Config::new(ids.clone());
        config.durable = true;
        config.window = 8;
        config.checkpoint_interval = 2;
        let signer = crate::message::Signer::new_from(&signers[1]);
        let Ok(mut core) = Replica::recover(config, signer, records) else {
            return;
        };
        let mut last = core.low_watermark();
        while let Some(out) = core.poll_output() {
            if let Output::Execute { seq, .. } = out {
                assert_eq!(seq, last + 1, "execution is gap-free");
                last = seq;
            }
        }
        assert!(core.low_watermark() <= core.executed());
    });
}
