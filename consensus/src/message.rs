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
//! Encoding (version 2): `version u8 | sender [32] | signature [64] | tag u8 | fields`; integers
//! big-endian; a request is `client [32] | number u64 | payload (u32 len)`; a batch is a u32
//! count then requests; counts and sizes are checked against [`Limits`] and the decoder must
//! consume the whole input.

use std::collections::BTreeMap;

use bytes::Bytes;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use securesmart_base::NodeId;
use securesmart_base::wire::{Decode as _, Reader, WireError, Writer};

/// A view number.
pub type View = u64;
/// A sequence number.
pub type Seq = u64;

/// Domain-separation contexts (BLAKE3 `derive_key`), one per hashed or signed value: this
/// layer's part of the registry in [`securesmart_base::tags`] (its `ALL` list builds the
/// precomputed hashers, so a context registered there is precomputed here).
pub use securesmart_base::tags::consensus as domain;

/// A BLAKE3 hasher in `derive_key` mode for `context`, from a precomputed state (deriving the
/// context key costs a hash of its own, on every message otherwise). Gives exactly what
/// `blake3::Hasher::new_derive_key(context)` gives.
pub(crate) fn hasher(context: &'static str) -> blake3::Hasher {
    use std::sync::LazyLock;
    static HASHERS: LazyLock<Vec<(&'static str, blake3::Hasher)>> = LazyLock::new(|| {
        domain::ALL
            .iter()
            .copied()
            .map(|c| (c, blake3::Hasher::new_derive_key(c)))
            .collect()
    });
    HASHERS
        .iter()
        .find(|(c, _)| *c == context)
        .map(|(_, h)| h.clone())
        .unwrap_or_else(|| blake3::Hasher::new_derive_key(context))
}

/// `blake3::derive_key(context, input)`, from a precomputed state.
fn derive(context: &'static str, input: &[u8]) -> [u8; 32] {
    let mut h = hasher(context);
    h.update(input);
    *h.finalize().as_bytes()
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
        // The bytes of `encode_into`, hashed without a copy.
        let mut h = hasher(domain::REQUEST);
        h.update(self.client.as_bytes());
        h.update(&self.number.to_be_bytes());
        h.update(
            &u32::try_from(self.payload.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        h.update(&self.payload);
        Digest(*h.finalize().as_bytes())
    }
}

/// The digest of a batch: over the digests of its requests, in order.
pub fn batch_digest(batch: &[Request]) -> Digest {
    let mut h = hasher(domain::BATCH);
    h.update(&(batch.len() as u64).to_be_bytes());
    for r in batch {
        h.update(&r.digest().0);
    }
    Digest(*h.finalize().as_bytes())
}

/// A certificate: a signed pre-prepare and the signed votes (prepares or commits) that match it.
/// Which quorum it needs is checked by the replica, which knows the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certificate {
    /// The pre-prepare.
    pub proposal: Signed,
    /// Matching prepares (a prepared certificate) or commits (a committed certificate).
    pub votes: Vec<Signed>,
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
    /// The sender moves to `view` and reports what it knows.
    ViewChange {
        /// The new view.
        view: View,
        /// The sender's last stable checkpoint.
        stable: Seq,
        /// Its certificate (2f+1 signed checkpoints; empty for the genesis state at 0).
        checkpoint: Vec<Signed>,
        /// The highest-view prepared certificate of each slot above `stable`.
        prepared: Vec<Certificate>,
    },
    /// The primary of `view` starts it.
    NewView {
        /// The view.
        view: View,
        /// The 2f+1 (or more) view changes it is built from.
        view_changes: Vec<Signed>,
        /// Pre-prepares for `view` that re-propose what the view changes carry (null batches in
        /// the gaps); every replica recomputes and checks them.
        pre_prepares: Vec<Signed>,
    },
    /// Client requests the sender holds, for replicas that may not have them (the primary of
    /// a new view; every replica for a request that reached only the sender).
    Forward {
        /// The requests.
        requests: Vec<Request>,
    },
    /// The sender needs the state at checkpoint `seq` or later.
    FetchState {
        /// Sequence number.
        seq: Seq,
    },
    /// A stable checkpoint's state and the committed batches after it.
    State {
        /// The checkpoint's certificate (2f+1 matching signed checkpoints).
        checkpoint: Vec<Signed>,
        /// The digests of the snapshot's parts, which must hash to the certified state digest
        /// ([`crate::view_change::state_digest_of_parts`]); empty in a reply that only fills
        /// a gap above the checkpoint.
        parts: Vec<Digest>,
        /// The snapshot when it is one part; empty otherwise (the parts are fetched with
        /// [`Message::FetchPart`]).
        snapshot: Bytes,
        /// Committed certificates of the batches after the checkpoint, in order.
        committed: Vec<Certificate>,
    },
    /// The sender fetches part `index` of the snapshot at checkpoint `seq` whose digest is
    /// `state`.
    FetchPart {
        /// The checkpoint.
        seq: Seq,
        /// Its state digest.
        state: Digest,
        /// The part.
        index: u32,
    },
    /// Part `index` of the snapshot at checkpoint `seq` with digest `state` (checked by the
    /// receiver against the part digests that the certified state digest covers).
    Part {
        /// The checkpoint.
        seq: Seq,
        /// Its state digest.
        state: Digest,
        /// The part.
        index: u32,
        /// The part's bytes.
        bytes: Bytes,
    },
}

securesmart_base::wire_tags! {
    /// The kind of a [`Message`]: its tag on the wire, the one table that encoding and
    /// decoding share.
    pub enum Kind: "message kind" {
        /// [`Message::PrePrepare`].
        PrePrepare = 1,
        /// [`Message::Prepare`].
        Prepare = 2,
        /// [`Message::Commit`].
        Commit = 3,
        /// [`Message::Checkpoint`].
        Checkpoint = 4,
        /// [`Message::ViewChange`].
        ViewChange = 5,
        /// [`Message::NewView`].
        NewView = 6,
        /// [`Message::FetchState`].
        FetchState = 7,
        /// [`Message::State`].
        State = 8,
        /// [`Message::Forward`].
        Forward = 9,
        /// [`Message::FetchPart`].
        FetchPart = 10,
        /// [`Message::Part`].
        Part = 11,
    }
}

impl Message {
    /// The message's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::PrePrepare { .. } => Kind::PrePrepare,
            Message::Prepare { .. } => Kind::Prepare,
            Message::Commit { .. } => Kind::Commit,
            Message::Checkpoint { .. } => Kind::Checkpoint,
            Message::ViewChange { .. } => Kind::ViewChange,
            Message::NewView { .. } => Kind::NewView,
            Message::FetchState { .. } => Kind::FetchState,
            Message::State { .. } => Kind::State,
            Message::Forward { .. } => Kind::Forward,
            Message::FetchPart { .. } => Kind::FetchPart,
            Message::Part { .. } => Kind::Part,
        }
    }

    /// The sequence number a message is about, for the slot-level kinds.
    pub fn seq(&self) -> Option<Seq> {
        match self {
            Message::PrePrepare { seq, .. }
            | Message::Prepare { seq, .. }
            | Message::Commit { seq, .. }
            | Message::Checkpoint { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    /// The view of a pre-prepare, prepare or commit.
    pub fn view(&self) -> Option<View> {
        match self {
            Message::PrePrepare { view, .. }
            | Message::Prepare { view, .. }
            | Message::Commit { view, .. } => Some(*view),
            _ => None,
        }
    }

    /// The batch digest of a pre-prepare, prepare or commit.
    pub fn digest(&self) -> Option<Digest> {
        match self {
            Message::PrePrepare { digest, .. }
            | Message::Prepare { digest, .. }
            | Message::Commit { digest, .. } => Some(*digest),
            _ => None,
        }
    }

    /// The signed messages carried inside this one (certificates).
    fn nested(&self) -> Vec<&Signed> {
        let mut out = Vec::new();
        match self {
            Message::ViewChange {
                checkpoint,
                prepared,
                ..
            } => {
                out.extend(checkpoint);
                for c in prepared {
                    out.push(&c.proposal);
                    out.extend(&c.votes);
                }
            }
            Message::NewView {
                view_changes,
                pre_prepares,
                ..
            } => {
                out.extend(view_changes);
                out.extend(pre_prepares);
            }
            Message::State {
                checkpoint,
                committed,
                ..
            } => {
                out.extend(checkpoint);
                for c in committed {
                    out.push(&c.proposal);
                    out.extend(&c.votes);
                }
            }
            _ => {}
        }
        out
    }

    /// The message's domain-separation tag (also a readable name of its kind).
    pub(crate) fn context(&self) -> &'static str {
        match self {
            Message::PrePrepare { .. } => domain::PRE_PREPARE,
            Message::Prepare { .. } => domain::PREPARE,
            Message::Commit { .. } => domain::COMMIT,
            Message::Checkpoint { .. } => domain::CHECKPOINT,
            Message::ViewChange { .. } => domain::VIEW_CHANGE,
            Message::NewView { .. } => domain::NEW_VIEW,
            Message::FetchState { .. } => domain::FETCH_STATE,
            Message::State { .. } => domain::STATE,
            Message::Forward { .. } => domain::FORWARD,
            Message::FetchPart { .. } => domain::FETCH_PART,
            Message::Part { .. } => domain::PART,
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
            Message::ViewChange {
                view,
                stable,
                checkpoint,
                prepared,
            } => {
                w.raw(&view.to_be_bytes()).raw(&stable.to_be_bytes());
                write_list(w, checkpoint);
                write_certs(w, prepared);
            }
            Message::NewView {
                view,
                view_changes,
                pre_prepares,
            } => {
                w.raw(&view.to_be_bytes());
                write_list(w, view_changes);
                write_list(w, pre_prepares);
            }
            Message::FetchState { seq } => {
                w.raw(&seq.to_be_bytes());
            }
            Message::Forward { requests } => {
                w.raw(&batch_digest(requests).0);
            }
            Message::State {
                checkpoint,
                parts,
                snapshot,
                committed,
            } => {
                write_list(w, checkpoint);
                w.u32(count(parts.len()));
                for part in parts {
                    w.raw(&part.0);
                }
                w.bytes(snapshot);
                write_certs(w, committed);
            }
            Message::FetchPart { seq, state, index } => {
                w.raw(&seq.to_be_bytes()).raw(&state.0).u32(*index);
            }
            Message::Part {
                seq,
                state,
                index,
                bytes,
            } => {
                w.raw(&seq.to_be_bytes()).raw(&state.0).u32(*index);
                w.bytes(bytes);
            }
        }
    }

    /// What `sender` signs: `derive_key(context of the kind, sender | header)`.
    pub fn signing_digest(&self, sender: &NodeId) -> [u8; 32] {
        let mut w = Writer::default();
        w.raw(sender.as_bytes());
        self.header(&mut w);
        derive(self.context(), &w.buf)
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

pub(crate) fn write_list(w: &mut Writer, list: &[Signed]) {
    w.u32(count(list.len()));
    for s in list {
        w.bytes(&s.encode());
    }
}

pub(crate) fn write_certs(w: &mut Writer, certs: &[Certificate]) {
    w.u32(count(certs.len()));
    for c in certs {
        w.bytes(&c.proposal.encode());
        write_list(w, &c.votes);
    }
}

/// Limits applied when decoding.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests per batch.
    pub max_batch: usize,
    /// Bytes per request payload.
    pub max_request_bytes: usize,
    /// Entries per list inside a message (signatures in a certificate, certificates in a view
    /// change, view changes in a new view, ...).
    pub max_list: usize,
    /// Bytes of a state snapshot.
    pub max_snapshot_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            max_request_bytes: 1024 * 1024,
            max_list: 4096,
            max_snapshot_bytes: 256 * 1024 * 1024,
        }
    }
}

pub(crate) fn read_list(
    r: &mut Reader<'_>,
    limits: &Limits,
    allowed: &[Kind],
) -> Result<Vec<Signed>, WireError> {
    let n = read_count(r, limits)?;
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let inner = r.bytes("nested message", usize::MAX)?;
        out.push(Signed::decode_kinds(inner, limits, allowed)?);
    }
    Ok(out)
}

fn read_count(r: &mut Reader<'_>, limits: &Limits) -> Result<usize, WireError> {
    read_bounded(r, "list", limits.max_list)
}

/// A u32 count of at most `max`.
fn read_bounded(r: &mut Reader<'_>, what: &'static str, max: usize) -> Result<usize, WireError> {
    let n = r.u32()? as usize;
    if n > max {
        return Err(WireError::TooLong { what, len: n, max });
    }
    Ok(n)
}

/// A counted list of requests (a pre-prepare's batch, forwarded requests).
fn read_batch(r: &mut Reader<'_>, limits: &Limits) -> Result<Vec<Request>, WireError> {
    let n = read_bounded(r, "batch", limits.max_batch)?;
    let mut batch = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        batch.push(Request {
            client: NodeId::from_bytes(r.array()?),
            number: r.array().map(u64::from_be_bytes)?,
            payload: Bytes::copy_from_slice(r.bytes("request", limits.max_request_bytes)?),
        });
    }
    Ok(batch)
}

pub(crate) fn read_certs(
    r: &mut Reader<'_>,
    limits: &Limits,
    votes: &[Kind],
) -> Result<Vec<Certificate>, WireError> {
    let n = read_count(r, limits)?;
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let inner = r.bytes("nested message", usize::MAX)?;
        let proposal = Signed::decode_kinds(inner, limits, &[Kind::PrePrepare])?;
        let votes = read_list(r, limits, votes)?;
        out.push(Certificate { proposal, votes });
    }
    Ok(out)
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

/// Version 2: state replies carry their snapshot's part digests, and parts travel on their
/// own (`FetchPart`, `Part`).
const VERSION: u8 = 2;

impl Signed {
    /// Encodes the message (canonical: decoding and encoding again gives the same bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(VERSION)
            .raw(self.sender.as_bytes())
            .raw(&self.signature)
            .u8(self.message.kind().tag());
        self.message.header(&mut w);
        if let Message::PrePrepare { batch, .. } | Message::Forward { requests: batch } =
            &self.message
        {
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
        Self::decode_kinds(buf, limits, Kind::ALL)
    }

    /// Decodes a message whose kind tag is one of `allowed` (nested messages allow fewer kinds,
    /// which also bounds the nesting depth at two).
    fn decode_kinds(buf: &[u8], limits: &Limits, allowed: &[Kind]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        r.version(VERSION)?;
        let sender = NodeId::from_bytes(r.array()?);
        let signature = r.array()?;
        let kind = Kind::decode(&mut r)?;
        if !allowed.contains(&kind) {
            return Err(WireError::Unknown {
                what: "message kind here",
                value: kind.tag().into(),
            });
        }
        let u64_of = |r: &mut Reader<'_>| r.array().map(u64::from_be_bytes);
        let message = match kind {
            Kind::PrePrepare | Kind::Prepare | Kind::Commit => {
                let view = u64_of(&mut r)?;
                let seq = u64_of(&mut r)?;
                let digest = Digest(r.array()?);
                match kind {
                    Kind::PrePrepare => {
                        let batch = read_batch(&mut r, limits)?;
                        Message::PrePrepare {
                            view,
                            seq,
                            digest,
                            batch,
                        }
                    }
                    Kind::Prepare => Message::Prepare { view, seq, digest },
                    _ => Message::Commit { view, seq, digest },
                }
            }
            Kind::Checkpoint => Message::Checkpoint {
                seq: u64_of(&mut r)?,
                state: Digest(r.array()?),
            },
            Kind::ViewChange => Message::ViewChange {
                view: u64_of(&mut r)?,
                stable: u64_of(&mut r)?,
                checkpoint: read_list(&mut r, limits, &[Kind::Checkpoint])?,
                prepared: read_certs(&mut r, limits, &[Kind::Prepare])?,
            },
            Kind::NewView => Message::NewView {
                view: u64_of(&mut r)?,
                view_changes: read_list(&mut r, limits, &[Kind::ViewChange])?,
                pre_prepares: read_list(&mut r, limits, &[Kind::PrePrepare])?,
            },
            Kind::FetchState => Message::FetchState {
                seq: u64_of(&mut r)?,
            },
            Kind::Forward => {
                let digest = Digest(r.array()?);
                let requests = read_batch(&mut r, limits)?;
                if batch_digest(&requests) != digest {
                    return Err(WireError::Unknown {
                        what: "forward digest",
                        value: 0,
                    });
                }
                Message::Forward { requests }
            }
            Kind::State => Message::State {
                checkpoint: read_list(&mut r, limits, &[Kind::Checkpoint])?,
                parts: {
                    let n = read_bounded(&mut r, "parts", limits.max_list)?;
                    (0..n)
                        .map(|_| r.array().map(Digest))
                        .collect::<Result<_, _>>()?
                },
                snapshot: Bytes::copy_from_slice(r.bytes("snapshot", limits.max_snapshot_bytes)?),
                committed: read_certs(&mut r, limits, &[Kind::Commit])?,
            },
            Kind::FetchPart => Message::FetchPart {
                seq: u64_of(&mut r)?,
                state: Digest(r.array()?),
                index: r.u32()?,
            },
            Kind::Part => Message::Part {
                seq: u64_of(&mut r)?,
                state: Digest(r.array()?),
                index: r.u32()?,
                bytes: Bytes::copy_from_slice(r.bytes("part", limits.max_snapshot_bytes)?),
            },
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
    /// A message this replica has just signed with its own key, or one nested in a verified
    /// message (whose signatures [`KeyRing`] checked with the outer one).
    pub(crate) fn trusted(signed: Signed) -> Self {
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
    /// `None` only in the `insecure-unsigned` benchmark mode.
    key: Option<SigningKey>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer with the Ed25519 key of `seed` (the certificate key's seed, e.g. from the
    /// transport's `Identity::ed25519_seed`); its id is the key's [`NodeId::from_ed25519`],
    /// the id of a certificate with that key.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(seed);
        Self {
            id: NodeId::from_ed25519(key.verifying_key().as_bytes()),
            key: Some(key),
        }
    }

    /// A signer whose key derives from `name` alone: anyone who knows the name holds the key.
    /// For the simulator, tests and fuzz fixtures only.
    pub(crate) fn named(name: &str) -> Self {
        Self::from_seed(&blake3::derive_key(
            securesmart_base::tags::consensus::NAMED_TEST_KEY,
            name.as_bytes(),
        ))
    }

    /// The raw Ed25519 public key (for a [`KeyRing`]); `None` for an unsigned signer.
    pub fn public_key(&self) -> Option<[u8; 32]> {
        self.key.as_ref().map(|k| k.verifying_key().to_bytes())
    }

    /// A signer that does not sign (all-zero signatures), for measuring what signing costs.
    /// Only with the `insecure-unsigned` feature; never in a deployment.
    #[cfg(feature = "insecure-unsigned")]
    pub fn unsigned(id: NodeId) -> Self {
        Self { id, key: None }
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
        let signature = match &self.key {
            Some(key) => key.sign(&message.signing_digest(&self.id)).to_bytes(),
            None => [0; 64],
        };
        Signed {
            sender: self.id,
            signature,
            message,
        }
    }
}

/// The verifying keys of the members (from their certificates).
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: BTreeMap<NodeId, VerifyingKey>,
    /// Members accepted without signature checks (`insecure-unsigned` benchmark mode only).
    unsigned: std::collections::BTreeSet<NodeId>,
    /// The whole ring is in the unsigned benchmark mode: members added later are unsigned too.
    insecure: bool,
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
            unsigned: Default::default(),
            insecure: false,
        }
    }

    /// A key ring that checks membership and digests but no signatures, for measuring what
    /// signing costs. Only with the `insecure-unsigned` feature; never in a deployment.
    #[cfg(feature = "insecure-unsigned")]
    pub fn unsigned(members: impl IntoIterator<Item = NodeId>) -> Self {
        Self {
            keys: BTreeMap::new(),
            unsigned: members.into_iter().collect(),
            insecure: true,
        }
    }

    /// Adds (or replaces) a member's key; `false` if the key is invalid or weak. (A ring of
    /// the unsigned benchmark mode adds the member without its key.)
    pub fn insert(&mut self, id: NodeId, key: [u8; 32]) -> bool {
        if self.insecure {
            self.unsigned.insert(id);
            return true;
        }
        match VerifyingKey::from_bytes(&key) {
            Ok(k) if !k.is_weak() => {
                self.keys.insert(id, k);
                true
            }
            _ => false,
        }
    }

    /// Removes a member's key.
    pub fn remove(&mut self, id: &NodeId) {
        self.keys.remove(id);
        self.unsigned.remove(id);
    }

    /// Whether `id` is a member.
    pub fn contains(&self, id: &NodeId) -> bool {
        self.keys.contains_key(id) || self.unsigned.contains(id)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.keys.len() + self.unsigned.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cheap checks before cryptography: a known sender, a batch that matches its digest.
    /// `Ok(None)` for a member of the unsigned benchmark mode.
    fn precheck(&self, s: &Signed) -> Result<Option<VerifyingKey>, VerifyError> {
        let key = match self.keys.get(&s.sender) {
            Some(k) => Some(*k),
            None if self.unsigned.contains(&s.sender) => None,
            None => return Err(VerifyError::UnknownSender),
        };
        if let Message::PrePrepare { digest, batch, .. } = &s.message
            && batch_digest(batch) != *digest
        {
            return Err(VerifyError::WrongDigest);
        }
        Ok(key)
    }

    fn strict(s: &Signed, key: Option<&VerifyingKey>) -> Result<(), VerifyError> {
        let Some(key) = key else { return Ok(()) };
        let digest = s.message.signing_digest(&s.sender);
        key.verify_strict(&digest, &Signature::from_bytes(&s.signature))
            .map_err(|_| VerifyError::BadSignature)
    }

    /// Checks all of `items` (a message and everything nested in it): one batch verification
    /// when there are several and all are good, strict checks to find the bad one otherwise.
    fn check_all(&self, items: &[&Signed]) -> Result<(), VerifyError> {
        let keys: Vec<Option<VerifyingKey>> = items
            .iter()
            .map(|s| self.precheck(s))
            .collect::<Result<_, _>>()?;
        let signed: Vec<(&Signed, VerifyingKey)> = items
            .iter()
            .zip(&keys)
            .filter_map(|(s, k)| k.map(|k| (*s, k)))
            .collect();
        if signed.len() > 1 && Self::batch_ok(&signed) {
            return Ok(());
        }
        for (s, k) in items.iter().zip(&keys) {
            Self::strict(s, k.as_ref())?;
        }
        Ok(())
    }

    fn batch_ok(signed: &[(&Signed, VerifyingKey)]) -> bool {
        let digests: Vec<[u8; 32]> = signed
            .iter()
            .map(|(s, _)| s.message.signing_digest(&s.sender))
            .collect();
        let refs: Vec<&[u8]> = digests.iter().map(|d| d.as_slice()).collect();
        let sigs: Vec<Signature> = signed
            .iter()
            .map(|(s, _)| Signature::from_bytes(&s.signature))
            .collect();
        let keys: Vec<VerifyingKey> = signed.iter().map(|(_, k)| *k).collect();
        ed25519_dalek::verify_batch(&refs, &sigs, &keys).is_ok()
    }

    fn all_of(s: &Signed) -> Vec<&Signed> {
        let mut items = vec![s];
        for inner in s.message.nested() {
            items.push(inner);
            items.extend(inner.message.nested());
        }
        items
    }

    /// Verifies one message and every message nested in it (strict Ed25519: no malleable
    /// signatures, no small-order keys, unless several are batch-verified; see
    /// [`KeyRing::verify_batch`]).
    ///
    /// # Errors
    /// The [`VerifyError`] that applies first.
    pub fn verify(&self, s: Signed) -> Result<Verified, VerifyError> {
        self.check_all(&Self::all_of(&s))?;
        Ok(Verified(s))
    }

    /// Verifies several messages at once: one batch verification when all are good (about
    /// twice as fast per signature), and individual checks to name the bad ones otherwise.
    ///
    /// Batch verification checks the cofactored equation, so it can accept a signature with a
    /// small-order component that a strict check refuses. Only the holder of the key can make
    /// such a signature (weak keys are excluded), so the difference can only make correct
    /// replicas disagree about a faulty sender's own message, which is no more than that sender
    /// could do by sending it to some replicas and not others; PBFT tolerates both.
    pub fn verify_batch(&self, messages: Vec<Signed>) -> Vec<Result<Verified, VerifyError>> {
        let all: Vec<&Signed> = messages.iter().flat_map(Self::all_of).collect();
        let batch_good = all.len() > 1 && self.check_batch_quiet(&all);
        messages
            .into_iter()
            .map(|s| {
                if !batch_good {
                    self.check_all(&Self::all_of(&s))?;
                }
                Ok(Verified(s))
            })
            .collect()
    }

    /// Whether all `items` pass the prechecks and one batch verification.
    fn check_batch_quiet(&self, items: &[&Signed]) -> bool {
        let mut signed = Vec::with_capacity(items.len());
        for s in items {
            match self.precheck(s) {
                Ok(Some(k)) => signed.push((*s, k)),
                Ok(None) => {}
                Err(_) => return false,
            }
        }
        signed.is_empty() || Self::batch_ok(&signed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn setup(n: usize) -> (Vec<Signer>, KeyRing) {
        let signers: Vec<Signer> = (0..n).map(|i| Signer::named(&format!("r{i}"))).collect();
        let ring = KeyRing::new(signers.iter().map(|s| (s.id(), s.public_key().unwrap())));
        (signers, ring)
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
        let outsider = Signer::named("outsider");
        let stranger = outsider.sign(Message::Checkpoint {
            seq: 1,
            state: Digest([1; 32]),
        });
        assert_eq!(ring.verify(stranger), Err(VerifyError::UnknownSender));
    }

    #[test]
    fn a_request_digest_covers_its_encoding() {
        let r = request(3);
        let mut w = Writer::default();
        r.encode_into(&mut w);
        assert_eq!(r.digest().0, blake3::derive_key(domain::REQUEST, &w.buf));
    }

    #[test]
    fn precomputed_hashers_equal_derive_key() {
        for ctx in [
            domain::REQUEST,
            domain::COMMIT,
            domain::STATE_DIGEST,
            "unlisted context",
        ] {
            assert_eq!(derive(ctx, b"input"), blake3::derive_key(ctx, b"input"));
        }
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
