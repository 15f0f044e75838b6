//! Consensus messages: what replicas send, how it is encoded, signed and verified.
//!
//! Every message is signed with the sender's Ed25519 key (the key of its certificate) over a
//! BLAKE3 digest with a distinct, versioned `derive_key` context per message kind
//! ([`domain`]): a signature on a Prepare can never pass for a Commit with the same fields, nor
//! for anything another layer signs. A pre-prepare signs its view, sequence number and batch
//! digest; the batch travels beside it and must hash to that digest.
//!
//! "Parse, don't validate": a [`Verified`] message can only be made by [`KeyRing::verify`] or
//! [`KeyRing::verify_batch`], so code that takes a `Verified` cannot forget a check.
//!
//! Encoding (version 1): `version u8 | sender [32] | signature [64] | tag u8 | fields`; integers
//! big-endian; a request is `client [32] | number u64 | payload (u32 len)`; a batch is a u32
//! count then requests; counts and sizes are checked against [`Limits`] and the decoder must
//! consume the whole input.

use std::collections::BTreeMap;

use bytes::Bytes;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use securesmart_transport::wire::{Reader, WireError, Writer};
use securesmart_transport::{Identity, NodeId};
use zeroize::Zeroizing;

/// A view number.
pub type View = u64;
/// A sequence number.
pub type Seq = u64;

/// Domain-separation contexts (BLAKE3 `derive_key`), one per hashed or signed value.
pub mod domain {
    /// Digest of a client request.
    pub const REQUEST: &str = "securesmart 2026-11-24 consensus request v1";
    /// Digest of a batch (over its request digests).
    pub const BATCH: &str = "securesmart 2026-11-24 consensus batch v1";
    /// Signed pre-prepare.
    pub const PRE_PREPARE: &str = "securesmart 2026-11-24 consensus pre-prepare v1";
    /// Signed prepare.
    pub const PREPARE: &str = "securesmart 2026-11-24 consensus prepare v1";
    /// Signed commit.
    pub const COMMIT: &str = "securesmart 2026-11-24 consensus commit v1";
    /// Signed checkpoint.
    pub const CHECKPOINT: &str = "securesmart 2026-11-24 consensus checkpoint v1";
}

/// A BLAKE3 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0.iter().take(6) {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A client request, referenced by digest everywhere after the pre-prepare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The client that sent it (authenticated by the transport).
    pub client: NodeId,
    /// The client's request number (for deduplication and exactly-once replies).
    pub number: u64,
    /// The operation, opaque to consensus.
    pub payload: Bytes,
}

impl Request {
    fn encode_into(&self, w: &mut Writer) {
        w.raw(self.client.as_bytes())
            .raw(&self.number.to_be_bytes())
            .bytes(&self.payload);
    }

    /// The request's digest.
    pub fn digest(&self) -> Digest {
        let mut w = Writer::default();
        self.encode_into(&mut w);
        Digest(blake3::derive_key(domain::REQUEST, &w.buf))
    }
}

/// The digest of a batch: over the digests of its requests, in order.
pub fn batch_digest(batch: &[Request]) -> Digest {
    let mut h = blake3::Hasher::new_derive_key(domain::BATCH);
    h.update(&(batch.len() as u64).to_be_bytes());
    for r in batch {
        h.update(&r.digest().0);
    }
    Digest(*h.finalize().as_bytes())
}

/// A consensus message (the signed part and, for a pre-prepare, the batch).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// The primary assigns `seq` to the batch with `digest` in `view`.
    PrePrepare {
        /// View.
        view: View,
        /// Sequence number.
        seq: Seq,
        /// Digest of `batch`.
        digest: Digest,
        /// The requests (bound to the signature by `digest`).
        batch: Vec<Request>,
    },
    /// A backup accepts the pre-prepare.
    Prepare {
        /// View.
        view: View,
        /// Sequence number.
        seq: Seq,
        /// Batch digest.
        digest: Digest,
    },
    /// A replica has a prepared certificate and commits.
    Commit {
        /// View.
        view: View,
        /// Sequence number.
        seq: Seq,
        /// Batch digest.
        digest: Digest,
    },
    /// The application state after executing up to `seq`.
    Checkpoint {
        /// Sequence number.
        seq: Seq,
        /// Digest of the state (snapshot).
        state: Digest,
    },
}

impl Message {
    fn tag(&self) -> u8 {
        match self {
            Message::PrePrepare { .. } => 1,
            Message::Prepare { .. } => 2,
            Message::Commit { .. } => 3,
            Message::Checkpoint { .. } => 4,
        }
    }

    fn context(&self) -> &'static str {
        match self {
            Message::PrePrepare { .. } => domain::PRE_PREPARE,
            Message::Prepare { .. } => domain::PREPARE,
            Message::Commit { .. } => domain::COMMIT,
            Message::Checkpoint { .. } => domain::CHECKPOINT,
        }
    }

    /// The fields the signature covers (a pre-prepare's batch is covered through its digest).
    fn header(&self, w: &mut Writer) {
        match self {
            Message::PrePrepare {
                view, seq, digest, ..
            }
            | Message::Prepare { view, seq, digest }
            | Message::Commit { view, seq, digest } => {
                w.raw(&view.to_be_bytes())
                    .raw(&seq.to_be_bytes())
                    .raw(&digest.0);
            }
            Message::Checkpoint { seq, state } => {
                w.raw(&seq.to_be_bytes()).raw(&state.0);
            }
        }
    }

    /// What `sender` signs: `derive_key(context of the kind, sender | header)`.
    pub fn signing_digest(&self, sender: &NodeId) -> [u8; 32] {
        let mut w = Writer::default();
        w.raw(sender.as_bytes());
        self.header(&mut w);
        blake3::derive_key(self.context(), &w.buf)
    }
}

/// Limits applied when decoding.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests per batch.
    pub max_batch: usize,
    /// Bytes per request payload.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            max_request_bytes: 1024 * 1024,
        }
    }
}

/// A message with its sender and signature, as received (not yet verified).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    /// The replica that claims to have sent it.
    pub sender: NodeId,
    /// The message.
    pub message: Message,
    /// Ed25519 signature over [`Message::signing_digest`].
    pub signature: [u8; 64],
}

const VERSION: u8 = 1;

impl Signed {
    /// Encodes the message (canonical: decoding and encoding again gives the same bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(VERSION)
            .raw(self.sender.as_bytes())
            .raw(&self.signature)
            .u8(self.message.tag());
        self.message.header(&mut w);
        if let Message::PrePrepare { batch, .. } = &self.message {
            w.u32(u32::try_from(batch.len()).unwrap_or(u32::MAX));
            for r in batch {
                r.encode_into(&mut w);
            }
        }
        w.buf
    }

    /// Decodes a message within `limits`.
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn decode(buf: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        r.version(VERSION)?;
        let sender = NodeId::from_bytes(r.array()?);
        let signature = r.array()?;
        let tag = r.u8()?;
        let u64_of = |r: &mut Reader<'_>| r.array().map(u64::from_be_bytes);
        let message = match tag {
            1..=3 => {
                let view = u64_of(&mut r)?;
                let seq = u64_of(&mut r)?;
                let digest = Digest(r.array()?);
                match tag {
                    1 => {
                        let n = r.u32()? as usize;
                        if n > limits.max_batch {
                            return Err(WireError::TooLong {
                                what: "batch",
                                len: n,
                                max: limits.max_batch,
                            });
                        }
                        let mut batch = Vec::with_capacity(n.min(64));
                        for _ in 0..n {
                            batch.push(Request {
                                client: NodeId::from_bytes(r.array()?),
                                number: u64_of(&mut r)?,
                                payload: Bytes::copy_from_slice(
                                    r.bytes("request", limits.max_request_bytes)?,
                                ),
                            });
                        }
                        Message::PrePrepare {
                            view,
                            seq,
                            digest,
                            batch,
                        }
                    }
                    2 => Message::Prepare { view, seq, digest },
                    _ => Message::Commit { view, seq, digest },
                }
            }
            4 => Message::Checkpoint {
                seq: u64_of(&mut r)?,
                state: Digest(r.array()?),
            },
            other => {
                return Err(WireError::Unknown {
                    what: "message kind",
                    value: other.into(),
                });
            }
        };
        r.finish()?;
        Ok(Self {
            sender,
            message,
            signature,
        })
    }
}

/// Why a message was not accepted. All are the sender's fault (drop and count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The sender is not a member.
    #[error("sender is not a member")]
    UnknownSender,
    /// A pre-prepare's batch does not hash to its digest.
    #[error("batch does not match its digest")]
    WrongDigest,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
}

/// A message whose sender is a member, whose signature verifies and whose batch (if any)
/// matches its digest. Only [`KeyRing`] makes these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified(Signed);

impl Verified {
    /// A message this replica has just signed with its own key.
    pub(crate) fn own(signed: Signed) -> Self {
        Self(signed)
    }

    /// The verified message.
    pub fn signed(&self) -> &Signed {
        &self.0
    }

    /// The sender.
    pub fn sender(&self) -> NodeId {
        self.0.sender
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.0.message
    }
}

/// Signs with a node's certificate key.
pub struct Signer {
    id: NodeId,
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer with the identity's Ed25519 key; `None` if the key is not Ed25519.
    pub fn new(identity: &Identity) -> Option<Self> {
        let seed: Zeroizing<[u8; 32]> = identity.ed25519_seed()?;
        Some(Self {
            id: identity.id(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Another signer with the same key (for harnesses that run one node's core while also
    /// signing as it).
    pub fn new_from(other: &Signer) -> Self {
        Self {
            id: other.id,
            key: other.key.clone(),
        }
    }

    /// This signer's node id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Signs `message` as this node.
    pub fn sign(&self, message: Message) -> Signed {
        let digest = message.signing_digest(&self.id);
        Signed {
            sender: self.id,
            signature: self.key.sign(&digest).to_bytes(),
            message,
        }
    }
}

/// The verifying keys of the members (from their certificates).
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: BTreeMap<NodeId, VerifyingKey>,
}

impl KeyRing {
    /// A key ring of `members` (node id and raw Ed25519 public key); keys that are not valid
    /// Ed25519 points, or are weak (small order), are left out.
    pub fn new(members: impl IntoIterator<Item = (NodeId, [u8; 32])>) -> Self {
        Self {
            keys: members
                .into_iter()
                .filter_map(|(id, k)| VerifyingKey::from_bytes(&k).ok().map(|k| (id, k)))
                .filter(|(_, k)| !k.is_weak())
                .collect(),
        }
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Cheap checks before cryptography: a known sender, a batch that matches its digest.
    fn precheck(&self, s: &Signed) -> Result<&VerifyingKey, VerifyError> {
        let key = self.keys.get(&s.sender).ok_or(VerifyError::UnknownSender)?;
        if let Message::PrePrepare { digest, batch, .. } = &s.message
            && batch_digest(batch) != *digest
        {
            return Err(VerifyError::WrongDigest);
        }
        Ok(key)
    }

    /// Verifies one message (strict Ed25519: no malleable signatures, no small-order keys).
    ///
    /// # Errors
    /// The [`VerifyError`] that applies first.
    pub fn verify(&self, s: Signed) -> Result<Verified, VerifyError> {
        let key = self.precheck(&s)?;
        let digest = s.message.signing_digest(&s.sender);
        key.verify_strict(&digest, &Signature::from_bytes(&s.signature))
            .map_err(|_| VerifyError::BadSignature)?;
        Ok(Verified(s))
    }

    /// Verifies several messages at once: one batch verification when all are good (about
    /// twice as fast per signature), and individual strict checks to name the bad ones
    /// otherwise.
    ///
    /// Batch verification checks the cofactored equation, so it can accept a signature with a
    /// small-order component that [`KeyRing::verify`] refuses. Only the holder of the key can
    /// make such a signature (weak keys are excluded), so the difference can only make correct
    /// replicas disagree about a faulty sender's own message, which is no more than that sender
    /// could do by sending it to some replicas and not others; PBFT tolerates both.
    pub fn verify_batch(&self, messages: Vec<Signed>) -> Vec<Result<Verified, VerifyError>> {
        let checked: Vec<Result<(Signed, VerifyingKey), VerifyError>> = messages
            .into_iter()
            .map(|s| self.precheck(&s).copied().map(|k| (s, k)))
            .collect();
        let candidates: Vec<&(Signed, VerifyingKey)> =
            checked.iter().filter_map(|c| c.as_ref().ok()).collect();
        let digests: Vec<[u8; 32]> = candidates
            .iter()
            .map(|(s, _)| s.message.signing_digest(&s.sender))
            .collect();
        let refs: Vec<&[u8]> = digests.iter().map(|d| d.as_slice()).collect();
        let sigs: Vec<Signature> = candidates
            .iter()
            .map(|(s, _)| Signature::from_bytes(&s.signature))
            .collect();
        let keys: Vec<VerifyingKey> = candidates.iter().map(|(_, k)| *k).collect();
        let all_good =
            !candidates.is_empty() && ed25519_dalek::verify_batch(&refs, &sigs, &keys).is_ok();
        checked
            .into_iter()
            .map(|c| {
                let (s, key) = c?;
                if !all_good {
                    let digest = s.message.signing_digest(&s.sender);
                    key.verify_strict(&digest, &Signature::from_bytes(&s.signature))
                        .map_err(|_| VerifyError::BadSignature)?;
                }
                Ok(Verified(s))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use securesmart_transport::Role;
    use securesmart_transport::pki::DevCa;

    fn setup(n: usize) -> (Vec<Signer>, KeyRing) {
        let ca = DevCa::new("msg CA").unwrap();
        let ids: Vec<Identity> = (0..n)
            .map(|i| ca.issue_role(&format!("r{i}"), Role::Replica).unwrap())
            .collect();
        let ring = KeyRing::new(ids.iter().map(|i| (i.id(), i.ed25519_public().unwrap())));
        (ids.iter().map(|i| Signer::new(i).unwrap()).collect(), ring)
    }

    fn request(n: u64) -> Request {
        Request {
            client: NodeId::from_bytes([9; 32]),
            number: n,
            payload: Bytes::from(vec![n as u8; 10]),
        }
    }

    #[test]
    fn signed_messages_verify_and_tampering_is_refused() {
        let (signers, ring) = setup(2);
        let batch = vec![request(1), request(2)];
        let pp = Message::PrePrepare {
            view: 3,
            seq: 9,
            digest: batch_digest(&batch),
            batch,
        };
        let signed = signers[0].sign(pp);
        let v = ring.verify(signed.clone()).unwrap();
        assert_eq!(v.sender(), signers[0].id());

        // Another sender's name on the same signature.
        let mut other = signed.clone();
        other.sender = signers[1].id();
        assert_eq!(ring.verify(other), Err(VerifyError::BadSignature));
        // A request swapped in the batch: the digest no longer matches.
        let mut swapped = signed.clone();
        if let Message::PrePrepare { batch, .. } = &mut swapped.message {
            batch[1] = request(3);
        }
        assert_eq!(ring.verify(swapped), Err(VerifyError::WrongDigest));
        // Batch and digest replaced together: the signature covers the digest.
        let mut replaced = signed.clone();
        if let Message::PrePrepare { batch, digest, .. } = &mut replaced.message {
            *batch = vec![request(4)];
            *digest = batch_digest(batch);
        }
        assert_eq!(ring.verify(replaced), Err(VerifyError::BadSignature));
        let mut bad_sig = signed;
        bad_sig.signature[5] ^= 1;
        assert_eq!(ring.verify(bad_sig), Err(VerifyError::BadSignature));
        let outsider = setup(1).0.remove(0);
        let stranger = outsider.sign(Message::Checkpoint {
            seq: 1,
            state: Digest([1; 32]),
        });
        assert_eq!(ring.verify(stranger), Err(VerifyError::UnknownSender));
    }

    #[test]
    fn signatures_are_domain_separated_by_kind() {
        let (signers, ring) = setup(1);
        let prepare = signers[0].sign(Message::Prepare {
            view: 1,
            seq: 2,
            digest: Digest([3; 32]),
        });
        let as_commit = Signed {
            message: Message::Commit {
                view: 1,
                seq: 2,
                digest: Digest([3; 32]),
            },
            ..prepare.clone()
        };
        assert!(ring.verify(prepare).is_ok());
        assert_eq!(ring.verify(as_commit), Err(VerifyError::BadSignature));
    }

    #[test]
    fn batch_verification_names_the_bad_ones() {
        let (signers, ring) = setup(4);
        let mut msgs: Vec<Signed> = (0..12u64)
            .map(|i| {
                signers[(i % 4) as usize].sign(Message::Commit {
                    view: 0,
                    seq: i,
                    digest: Digest([i as u8; 32]),
                })
            })
            .collect();
        assert!(ring.verify_batch(msgs.clone()).iter().all(Result::is_ok));
        msgs[4].signature[0] ^= 1;
        msgs[7].sender = NodeId::from_bytes([1; 32]);
        let out = ring.verify_batch(msgs);
        for (i, r) in out.iter().enumerate() {
            match i {
                4 => assert_eq!(r, &Err(VerifyError::BadSignature)),
                7 => assert_eq!(r, &Err(VerifyError::UnknownSender)),
                _ => assert!(r.is_ok(), "{i}"),
            }
        }
        assert!(ring.verify_batch(vec![]).is_empty());
    }

    #[test]
    fn decoding_enforces_limits_and_consumes_everything() {
        let (signers, _) = setup(1);
        let batch: Vec<Request> = (0..3).map(request).collect();
        let pp = signers[0].sign(Message::PrePrepare {
            view: 0,
            seq: 1,
            digest: batch_digest(&batch),
            batch,
        });
        let bytes = pp.encode();
        let limits = Limits::default();
        assert_eq!(Signed::decode(&bytes, &limits), Ok(pp));
        let tight = Limits {
            max_batch: 2,
            ..limits
        };
        assert!(matches!(
            Signed::decode(&bytes, &tight),
            Err(WireError::TooLong { .. })
        ));
        let small = Limits {
            max_request_bytes: 5,
            ..limits
        };
        assert!(matches!(
            Signed::decode(&bytes, &small),
            Err(WireError::TooLong { .. })
        ));
        for cut in 0..bytes.len() {
            assert!(Signed::decode(&bytes[..cut], &limits).is_err());
        }
        let mut long = bytes;
        long.push(0);
        assert_eq!(Signed::decode(&long, &limits), Err(WireError::Trailing(1)));
    }

    proptest! {
        #[test]
        fn encoding_round_trips(view in any::<u64>(), seq in any::<u64>(), d in any::<[u8; 32]>(),
                                 sig in proptest::collection::vec(any::<u8>(), 64), kind in 0u8..4,
                                 payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..5)) {
            let digest = Digest(d);
            let message = match kind {
                0 => Message::PrePrepare { view, seq, digest, batch: payloads.into_iter().enumerate()
                    .map(|(i, p)| Request { client: NodeId::from_bytes(d), number: i as u64, payload: Bytes::from(p) }).collect() },
                1 => Message::Prepare { view, seq, digest },
                2 => Message::Commit { view, seq, digest },
                _ => Message::Checkpoint { seq, state: digest },
            };
            let signed = Signed { sender: NodeId::from_bytes(d), message, signature: sig.try_into().unwrap() };
            let bytes = signed.encode();
            prop_assert_eq!(Signed::decode(&bytes, &Limits::default()), Ok(signed));
        }
    }
}
