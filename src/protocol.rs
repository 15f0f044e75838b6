//! What clients and replicas say to each other on the client plane, and what the node orders.
//!
//! - [`ClientRequest`] (client to replica, version 3) and [`ClientReply`] (replica to client,
//!   version 2, naming the replica's roster): integers big-endian, byte strings with a u32 length; the decoder consumes the
//!   whole input and enforces [`MAX_PAYLOAD_BYTES`]. The client's identity is the authenticated
//!   peer of the connection (its certificate), never a field of the message.
//! - [`Ordered`]: the envelope of every request the node hands to the ordering engine, so that
//!   application requests and the node's own commands share one order. A replica that cannot
//!   decode an ordered payload (a faulty primary proposed it) refuses it with the same reply
//!   everywhere.
//!
//! # Signed requests
//! Every ordered request carries its submitter's signature ([`Auth`]): a client signs what it
//! sends, a replica signs its own requests (key packages, commits, key acknowledgements, CRL
//! updates). The signature is Ed25519 over a BLAKE3 digest with its own domain tag
//! ([`REQUEST_SIGNATURE_TAG`]) of the client id, the request number, the [`SignedKind`] and the
//! body (the client's payload; for a replica's own request the envelope's encoding). The public
//! key travels with it and must be the key of the request's client id. A replica takes a
//! client's request from the client's mutual-TLS connection without checking it (the
//! channel proves the bytes are the client's) and checks signatures where no channel vouches:
//! as primary before it proposes, as backup for what a pre-prepare carries that it does not
//! hold byte for byte, and when a held request times out, so a faulty replica cannot order a
//! request in anyone else's name, not even an administrator's. Every request-level signature
//! is checked by one rule, ZIP-215, alone and in batches alike. The ordered payload is a
//! [`Submission`]: `0xA1 | public key [32] | signature [64] | envelope`; the ordering engine
//! checks it before it orders anything (`securesmart_consensus::replica::Config::request_check`),
//! so a request that is not its client's takes no sequence number and uses up no request
//! number. A confidential operation is sealed by the client itself with its key of the epoch
//! ([`RequestKind::SealingKey`], answered with [`Outcome::SealingKey`]; the request is
//! [`RequestKind::ClientSealed`], ordered as [`Ordered::ClientSealed`], the client's signature
//! over the ciphertext), or by one replica for the client
//! ([`RequestKind::Seal`], answered with [`Outcome::Sealed`] and the sealer's signature on it,
//! [`SealerSignature`]); the client then signs the ciphertext and that signature together
//! with a commitment to the plaintext ([`commitment`]: BLAKE3 of a random
//! 32-byte nonce it puts in front of the operation, and the operation; a signature over the
//! plaintext itself would let anyone test guesses of it). So no replica can put another
//! ciphertext in its place, and at execution the opened plaintext must match the commitment,
//! so a sealer that sealed something else only gets the request refused.

use bytes::Bytes;
use ed25519_dalek::{Signer as _, SigningKey};
use securesmart_base::wire::{Reader, WireError, Writer};
use securesmart_membership::{ClientSealingKey, GroupError, SEALED_OVERHEAD};
use securesmart_transport::{Identity, NodeId};

/// Largest request or reply payload.
pub const MAX_PAYLOAD_BYTES: usize = 512 * 1024;
/// [`ClientRequest`] format version (3: a membership command carries the client's signed
/// time; 4: roster queries, and the client seals through a replica and signs the ciphertext;
/// 5: sealing-key queries and client-sealed requests).
const REQUEST_VERSION: u8 = 5;
/// Bytes of a confidential request's [`commitment`].
pub const COMMITMENT_LEN: usize = 32;
/// How far the signed time of a client's membership command may be from the clock of the
/// replica that takes it (seconds); beyond it the replica refuses to order the command.
pub const COMMAND_SKEW_SECS: u64 = 600;
/// [`ClientReply`] format version (2: the roster, roster answers; 3: sealing keys, and the
/// [`CONFIDENTIAL_EXECUTED`] mark in front of a confidential request's result, which a
/// client of version 2 would take for the result's first byte).
const VERSION: u8 = 3;
/// BLAKE3 `derive_key` context of the digest a request's submitter signs.
pub const REQUEST_SIGNATURE_TAG: &str = securesmart_base::tags::service::REQUEST_SIGNATURE;
/// First byte of a signed [`Submission`].
const SIGNED_TAG: u8 = 0xA1;
/// BLAKE3 `derive_key` context of a confidential request's [`commitment`].
pub const COMMITMENT_TAG: &str = securesmart_base::tags::service::CONFIDENTIAL_COMMITMENT;
/// Bytes of the nonce in front of a confidential request's operation.
pub const NONCE_LEN: usize = 32;

/// BLAKE3 `derive_key` context of what a replica signs when it seals an operation for a client.
pub const SEALER_SIGNATURE_TAG: &str = securesmart_base::tags::service::SEALER_SIGNATURE;

/// A replica's signature on what it sealed for a client's request: the client id, the request
/// number and the sealed bytes (whose header names the replica as sender), so that only a
/// replica can put a ciphertext in front of the others, and a faulty one that seals garbage
/// is named by its own signature.
#[derive(Debug)]
pub struct SealerSignature;

impl SealerSignature {
    fn digest(client: &NodeId, number: u64, sealed: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(SEALER_SIGNATURE_TAG);
        h.update(client.as_bytes())
            .update(&number.to_be_bytes())
            .update(sealed);
        *h.finalize().as_bytes()
    }

    /// `signer` (a replica) signs `sealed`, sealed for `client`'s request `number`.
    pub fn sign(signer: &RequestSigner, client: &NodeId, number: u64, sealed: &[u8]) -> Auth {
        let digest = Self::digest(client, number, sealed);
        Auth {
            public_key: signer.key.verifying_key().to_bytes(),
            signature: signer.key.sign(&digest).to_bytes(),
        }
    }

    /// The signer of `auth` on `sealed` for `client`'s request `number`: the node the sealed
    /// header names as its sender.
    ///
    /// # Errors
    /// [`AuthError::WrongKey`] if the key is not the sender's, [`AuthError::BadSignature`].
    pub fn verify(
        auth: &Auth,
        client: &NodeId,
        number: u64,
        sealed: &[u8],
    ) -> Result<NodeId, AuthError> {
        let (sender, digest) = Self::checked_digest(auth, client, number, sealed)?;
        zip215::verify(&auth.public_key, &digest, &auth.signature)?;
        Ok(sender)
    }

    /// The sender the sealed header names and the digest its signature covers, if `auth` is
    /// that sender's key.
    fn checked_digest(
        auth: &Auth,
        client: &NodeId,
        number: u64,
        sealed: &[u8],
    ) -> Result<(NodeId, [u8; 32]), AuthError> {
        let sender = securesmart_membership::sealed_header(sealed)
            .map(|(_, sender)| sender)
            .map_err(|_| AuthError::WrongKey)?;
        if NodeId::from_ed25519(&auth.public_key) != sender || !zip215::key_ok(&auth.public_key) {
            return Err(AuthError::WrongKey);
        }
        Ok((sender, Self::digest(client, number, sealed)))
    }
}

/// The commitment a client signs for a confidential request, over its payload (the nonce and
/// the operation): hiding (the nonce is random) and binding.
pub fn commitment(payload: &[u8]) -> [u8; 32] {
    blake3::derive_key(COMMITMENT_TAG, payload)
}

/// What a request's signature says its body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignedKind {
    /// A client's application operation.
    App = 0,
    /// A membership command.
    Command = 1,
    /// A client's confidential application operation: the commitment, the sealer's signature
    /// and the ciphertext (2 was the commitment alone, before the client signed the ciphertext).
    Sealed = 6,
    /// A replica's own request (key package, commit, key acknowledgement).
    Internal = 3,
    /// A client's query of the roster changes (answered, not ordered).
    Rosters = 4,
    /// A client's request that a replica seal a confidential operation for it (the signature
    /// covers the operation's commitment).
    Seal = 5,
    /// A client's request for its sealing key (answered, not ordered).
    SealingKey = 7,
    /// A client's confidential application operation that it sealed itself with its
    /// [`ClientSealingKey`]: the signature covers the ciphertext.
    ClientSealed = 8,
}

/// A submitter's signature on a request (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Auth {
    /// The submitter's Ed25519 public key: its id must be the request's client id.
    pub public_key: [u8; 32],
    /// The signature.
    pub signature: [u8; 64],
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("signer", &NodeId::from_ed25519(&self.public_key))
            .finish_non_exhaustive()
    }
}

/// Why a request's signature was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The public key is not the key of the request's client.
    #[error("the signing key is not the client's")]
    WrongKey,
    /// The signature does not verify.
    #[error("bad request signature")]
    BadSignature,
    /// The request carries no signature where one is needed.
    #[error("unsigned request")]
    Unsigned,
}

/// The digest a submitter signs.
fn signing_digest(client: &NodeId, number: u64, kind: SignedKind, body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(REQUEST_SIGNATURE_TAG);
    h.update(client.as_bytes())
        .update(&number.to_be_bytes())
        .update(&[kind as u8])
        .update(&(body.len() as u64).to_be_bytes())
        .update(body);
    *h.finalize().as_bytes()
}

impl Auth {
    /// Encoded length.
    pub const LEN: usize = 96;

    /// Checks that it is `client`'s signature on request `number` of `kind` with `body`.
    ///
    /// # Errors
    /// [`AuthError`] saying what is wrong.
    pub fn verify(
        &self,
        client: &NodeId,
        number: u64,
        kind: SignedKind,
        body: &[u8],
    ) -> Result<(), AuthError> {
        let digest = self.checked_digest(client, number, kind, body)?;
        zip215::verify(&self.public_key, &digest, &self.signature)
    }

    /// The digest `client`'s signature on request `number` covers, if this is `client`'s key
    /// (and a usable one: [`zip215::key_ok`]).
    fn checked_digest(
        &self,
        client: &NodeId,
        number: u64,
        kind: SignedKind,
        body: &[u8],
    ) -> Result<[u8; 32], AuthError> {
        if NodeId::from_ed25519(&self.public_key) != *client || !zip215::key_ok(&self.public_key) {
            return Err(AuthError::WrongKey);
        }
        Ok(signing_digest(client, number, kind, body))
    }

    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&self.signature);
    }

    pub(crate) fn read(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        Ok(Self {
            public_key: r.array()?,
            signature: r.array()?,
        })
    }
}

/// Signs requests in the name of one identity (a client or a replica). The key is erased when
/// it is dropped.
pub struct RequestSigner {
    id: NodeId,
    key: SigningKey,
    /// The bench's `baseline` mode: all-zero signatures, which only replicas with
    /// `[consensus] insecure_baseline` accept.
    insecure_unsigned: bool,
}

impl std::fmt::Debug for RequestSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestSigner")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl RequestSigner {
    /// A signer with `identity`'s key; `None` if it is not an Ed25519 key.
    pub fn new(identity: &Identity) -> Option<Self> {
        let seed = identity.ed25519_seed()?;
        Some(Self {
            id: identity.id(),
            key: SigningKey::from_bytes(&seed),
            insecure_unsigned: false,
        })
    }

    /// INSECURE, for the bench's `baseline` mode only: with `true` it signs nothing (all-zero
    /// signatures), which replicas refuse unless their configuration says
    /// `[consensus] insecure_baseline = true`.
    pub fn set_insecure_unsigned(&mut self, unsigned: bool) {
        self.insecure_unsigned = unsigned;
    }

    /// The id it signs as.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Signs request `number` of `kind` with `body`.
    pub fn sign(&self, number: u64, kind: SignedKind, body: &[u8]) -> Auth {
        let public_key = self.key.verifying_key().to_bytes();
        if self.insecure_unsigned {
            return Auth {
                public_key,
                signature: [0; 64],
            };
        }
        let digest = signing_digest(&self.id, number, kind, body);
        Auth {
            public_key,
            signature: self.key.sign(&digest).to_bytes(),
        }
    }

    /// Signs `ordered` as request `number` of this signer (see [`Submission::signed_part`]).
    pub fn submission(&self, number: u64, ordered: Ordered) -> Submission {
        let (kind, body) = Submission::signed_part(&ordered);
        Submission {
            auth: Some(self.sign(number, kind, &body)),
            ordered,
        }
    }
}

/// The ordered payload of a request: the envelope and its submitter's signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submission {
    /// The submitter's signature (`None` only in payloads that [`Submission::verify`] refuses).
    pub auth: Option<Auth>,
    /// The envelope.
    pub ordered: Ordered,
}

impl Submission {
    /// What the submitter's signature covers for `ordered`: the client's payload for an
    /// application operation or a membership command (the replica's clock on a command is not
    /// covered), the commitment of a confidential one, the envelope's encoding for a replica's
    /// own request.
    pub fn signed_part(ordered: &Ordered) -> (SignedKind, Bytes) {
        match ordered {
            Ordered::App(payload) => (SignedKind::App, payload.clone()),
            Ordered::Command { time, command } => {
                // The client signs the time it judges certificates and CRLs at, too, so that
                // no replica can choose it.
                let mut body = Vec::with_capacity(8 + command.len());
                body.extend_from_slice(&time.to_be_bytes());
                body.extend_from_slice(command);
                (SignedKind::Command, Bytes::from(body))
            }
            // The client signs the ciphertext, with the commitment and the sealer's signature:
            // nobody can put another next to them.
            sealed @ Ordered::Sealed { .. } => (SignedKind::Sealed, sealed.encode().slice(1..)),
            Ordered::ClientSealed(sealed) => (SignedKind::ClientSealed, sealed.clone()),
            other => (SignedKind::Internal, other.encode()),
        }
    }

    /// Checks that it is `client`'s signature on request `number`.
    ///
    /// # Errors
    /// [`AuthError`] saying what is wrong.
    pub fn verify(&self, client: &NodeId, number: u64) -> Result<(), AuthError> {
        let auth = self.auth.as_ref().ok_or(AuthError::Unsigned)?;
        let (kind, body) = Self::signed_part(&self.ordered);
        auth.verify(client, number, kind, &body)
    }

    /// The signatures [`Submission::verify_all`] checks, as (public key, digest, signature),
    /// after the checks that need no cryptography.
    fn signatures(&self, client: &NodeId, number: u64) -> Result<Vec<zip215::Item>, AuthError> {
        let auth = self.auth.as_ref().ok_or(AuthError::Unsigned)?;
        let (kind, body) = Self::signed_part(&self.ordered);
        let digest = auth.checked_digest(client, number, kind, &body)?;
        let mut out = vec![(auth.public_key, digest, auth.signature)];
        if let Ordered::Sealed { sealer, sealed, .. } = &self.ordered {
            let (_, digest) = SealerSignature::checked_digest(sealer, client, number, sealed)?;
            out.push((sealer.public_key, digest, sealer.signature));
        }
        Ok(out)
    }

    /// [`Submission::verify`], and for a sealed request also its sealer's signature (whether
    /// the sealer is a replica is for the replicated state to say): what the engine checks
    /// before it orders a request ([`request_check`]).
    ///
    /// # Errors
    /// [`AuthError`] saying what is wrong.
    pub fn verify_all(&self, client: &NodeId, number: u64) -> Result<(), AuthError> {
        self.signatures(client, number)?
            .iter()
            .try_for_each(|(key, digest, sig)| zip215::verify(key, digest, sig))
    }

    /// Encodes it.
    pub fn encode(&self) -> Bytes {
        let ordered = self.ordered.encode();
        match &self.auth {
            None => ordered,
            Some(auth) => {
                let mut out = Vec::with_capacity(1 + Auth::LEN + ordered.len());
                out.push(SIGNED_TAG);
                auth.write(&mut out);
                out.extend_from_slice(&ordered);
                Bytes::from(out)
            }
        }
    }

    /// Decodes it (zero-copy for the payload).
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn decode(buf: &Bytes) -> Result<Self, WireError> {
        if buf.first() != Some(&SIGNED_TAG) {
            return Ok(Self {
                auth: None,
                ordered: Ordered::decode(buf)?,
            });
        }
        let auth = Auth::read(buf.get(1..1 + Auth::LEN).ok_or(WireError::Truncated)?)?;
        Ok(Self {
            auth: Some(auth),
            ordered: Ordered::decode(&buf.slice(1 + Auth::LEN..))?,
        })
    }
}

/// The ordering engine's check of requests (see the module doc), a batch at a time: each
/// payload is a [`Submission`] signed by its client (and a sealed one by its sealer). All the
/// signatures of a batch are checked in one ZIP-215 batch verification; if it fails, each
/// alone by the same rule, so every request gets the verdict it gets alone. Refusals are
/// counted in `securesmart_node_unsigned_requests_total`.
pub fn request_check() -> securesmart_consensus::replica::RequestCheck {
    securesmart_consensus::replica::RequestCheck::batched(|requests| {
        let prechecked: Vec<_> = requests
            .iter()
            .map(|r| {
                Submission::decode(&r.payload)
                    .map_err(|_| AuthError::Unsigned)
                    .and_then(|s| s.signatures(&r.client, r.number))
            })
            .collect();
        let all: Vec<_> = prechecked.iter().flatten().flatten().copied().collect();
        let batch_good = all.len() > 1 && zip215::verify_batch(&all);
        requests
            .iter()
            .zip(prechecked)
            .map(|(r, checks)| {
                let verdict = checks.and_then(|sigs| {
                    if batch_good {
                        return Ok(());
                    }
                    sigs.iter()
                        .try_for_each(|(key, digest, sig)| zip215::verify(key, digest, sig))
                });
                if let Err(e) = &verdict {
                    metrics::counter!("securesmart_node_unsigned_requests_total").increment(1);
                    tracing::debug!(client = ?r.client, number = r.number, error = %e, "request refused before ordering");
                }
                verdict.is_ok()
            })
            .collect()
    })
}

/// One rule for every request-level signature (clients', sealers', replicas' own requests):
/// ZIP-215 (ed25519-zebra), which accepts exactly the same signatures alone and in a batch.
/// Strict single checks beside dalek's cofactored batch equation would let a crafted
/// signature pass at a replica that checks a batch and fail at one that checks it alone.
mod zip215 {
    use super::AuthError;

    /// A signature to check: public key, the 32-byte digest signed, signature.
    pub(super) type Item = ([u8; 32], [u8; 32], [u8; 64]);

    /// Whether `key` is a usable public key: a valid point of more than small order. ZIP-215
    /// alone accepts small-order keys, for which any signature verifies; certificates carry
    /// none, so refusing them changes no honest verdict.
    pub(super) fn key_ok(key: &[u8; 32]) -> bool {
        ed25519_dalek::VerifyingKey::from_bytes(key).is_ok_and(|k| !k.is_weak())
    }

    /// Checks one signature on a 32-byte digest (the key passed [`key_ok`] in the caller's
    /// `checked_digest`).
    pub(super) fn verify(
        key: &[u8; 32],
        digest: &[u8; 32],
        sig: &[u8; 64],
    ) -> Result<(), AuthError> {
        let key =
            ed25519_zebra::VerificationKey::try_from(*key).map_err(|_| AuthError::WrongKey)?;
        key.verify(&ed25519_zebra::Signature::from_bytes(sig), digest)
            .map_err(|_| AuthError::BadSignature)
    }

    /// Whether all `items` (key, digest, signature) pass one batch check.
    pub(super) fn verify_batch(items: &[Item]) -> bool {
        let mut batch = ed25519_zebra::batch::Verifier::new();
        for (key, digest, sig) in items {
            batch.queue((
                ed25519_zebra::VerificationKeyBytes::from(*key),
                ed25519_zebra::Signature::from_bytes(sig),
                digest,
            ));
        }
        batch.verify(rand_010::rng()).is_ok()
    }
}

/// A client's request to a replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRequest {
    /// The client's request number: it grows with every new request; a retransmission reuses it.
    pub number: u64,
    /// What the payload is.
    pub kind: RequestKind,
    /// The application operation, or an encoded membership command.
    pub payload: Bytes,
    /// The client's signature on it ([`ClientRequest::signed`]).
    pub auth: Auth,
}

securesmart_base::wire_tags! {
    /// What a [`ClientRequest`] carries (its tag on the wire, the one table that encoding
    /// and decoding share).
    pub enum RequestKind: "request kind" {
        /// An application operation.
        App = 0,
        /// A membership command (`securesmart_membership::MembershipCommand`), for administrators.
        Command = 1,
        /// An application operation the replicas keep sealed with the group key: in the log, in
        /// their journals and in state transfer it is ciphertext (see [`Ordered::Sealed`]).
        Confidential = 2,
        /// A query of the certified roster changes after the roster whose number is the payload
        /// (a big-endian u64): answered by the replica from its replicated state, not ordered
        /// (see `securesmart::roster`).
        Rosters = 3,
        /// Seal this confidential operation (nonce and operation) for the request number of the
        /// request: the replica answers with the ciphertext ([`Outcome::Sealed`]) and orders
        /// nothing; the client then sends a [`RequestKind::Confidential`] request with it.
        Seal = 4,
        /// Hand out the client's sealing key of the epoch the replica seals in (the payload is
        /// empty): answered with [`Outcome::SealingKey`] over the client's own link, not ordered.
        SealingKey = 5,
        /// An application operation the client sealed itself with its [`ClientSealingKey`] (the
        /// payload is the sealed operation; see [`Ordered::ClientSealed`]).
        ClientSealed = 6,
    }
}

/// A replica's reply to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientReply {
    /// The request number it answers.
    pub number: u64,
    /// The roster the replica was at when it answered (`securesmart::roster`).
    pub roster: u64,
    /// What it says.
    pub outcome: Outcome,
}

securesmart_base::wire_tags! {
    /// The kind of an [`Outcome`]: its tag on the wire, the one table that encoding and
    /// decoding share.
    pub enum OutcomeKind: "reply outcome" {
        /// [`Outcome::Executed`].
        Executed = 1,
        /// [`Outcome::Busy`].
        Busy = 2,
        /// [`Outcome::Rosters`].
        Rosters = 3,
        /// [`Outcome::Sealed`].
        Sealed = 4,
        /// [`Outcome::Lost`].
        Lost = 5,
        /// [`Outcome::SealingKey`].
        SealingKey = 6,
    }
}

/// The body of a [`ClientReply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The request executed; the application's reply.
    Executed(Bytes),
    /// The replica cannot take the request now (queue full, not a member); retry elsewhere or
    /// later. Never counted towards the matching replies.
    Busy,
    /// The answer to a roster query: certified roster changes
    /// (`securesmart::roster::RosterChange::encode_list`).
    Rosters(Bytes),
    /// The replica executed the request but cannot compute its result: its application state
    /// is lost until state transfer. It tells the client its roster (a client needs a quorum
    /// of answers at its roster), never a result.
    Lost,
    /// The answer to a [`RequestKind::Seal`] request: the operation sealed with the group key
    /// for the client and request number, and the sealer's signature on it.
    Sealed {
        /// The replica's signature ([`SealerSignature`]).
        sealer: Auth,
        /// The sealed operation.
        sealed: Bytes,
    },
    /// The answer to a [`RequestKind::SealingKey`] request: the client's key of the epoch the
    /// replica seals in (encoded as epoch, client id and key).
    SealingKey(ClientSealingKey),
}

impl RequestKind {
    /// What the signature says the body is.
    pub fn signed_kind(self) -> SignedKind {
        match self {
            RequestKind::App => SignedKind::App,
            RequestKind::Command => SignedKind::Command,
            RequestKind::Confidential => SignedKind::Sealed,
            RequestKind::Rosters => SignedKind::Rosters,
            RequestKind::Seal => SignedKind::Seal,
            RequestKind::SealingKey => SignedKind::SealingKey,
            RequestKind::ClientSealed => SignedKind::ClientSealed,
        }
    }
}

impl ClientRequest {
    /// A request signed by `signer` (the client). A confidential operation gets a random nonce
    /// in front, and the signature covers its [`commitment`]; a membership command gets the
    /// client's clock (unix seconds) in front, which the signature covers (the time at which
    /// the replicas judge the certificates and CRLs in it).
    pub fn signed(signer: &RequestSigner, number: u64, kind: RequestKind, payload: Bytes) -> Self {
        let prefixed = |prefix: &[u8]| {
            let mut out = Vec::with_capacity(prefix.len() + payload.len());
            out.extend_from_slice(prefix);
            out.extend_from_slice(&payload);
            Bytes::from(out)
        };
        let payload = match kind {
            RequestKind::Seal => prefixed(&rand::random::<[u8; NONCE_LEN]>()),
            RequestKind::Command => prefixed(&crate::node::unix_now().to_be_bytes()),
            RequestKind::App
            | RequestKind::Rosters
            | RequestKind::Confidential
            | RequestKind::SealingKey
            | RequestKind::ClientSealed => payload.clone(),
        };
        let auth = match kind {
            RequestKind::Seal => signer.sign(number, kind.signed_kind(), &commitment(&payload)),
            _ => signer.sign(number, kind.signed_kind(), &payload),
        };
        Self {
            number,
            kind,
            payload,
            auth,
        }
    }

    /// The time a membership command was signed at (unix seconds), `None` for other kinds.
    pub fn command_time(&self) -> Option<u64> {
        (self.kind == RequestKind::Command)
            .then(|| {
                self.payload
                    .get(..8)
                    .and_then(|t| <[u8; 8]>::try_from(t).ok())
            })
            .flatten()
            .map(u64::from_be_bytes)
    }

    /// Checks that it is `client`'s signature on it, by the rule the engine checks ordered
    /// requests with. (A node's intake does not: the client's mutual-TLS connection proves
    /// the request is the client's.)
    ///
    /// # Errors
    /// [`AuthError`] saying what is wrong.
    pub fn verify(&self, client: &NodeId) -> Result<(), AuthError> {
        let body = match self.kind {
            RequestKind::Seal => Bytes::copy_from_slice(&commitment(&self.payload)),
            RequestKind::App
            | RequestKind::Command
            | RequestKind::Rosters
            | RequestKind::Confidential
            | RequestKind::SealingKey
            | RequestKind::ClientSealed => self.payload.clone(),
        };
        self.auth
            .verify(client, self.number, self.kind.signed_kind(), &body)
    }

    /// A confidential request: `sealed` is what a replica answered to the client's
    /// [`RequestKind::Seal`] request `number` for `plaintext` (nonce and operation, as that
    /// request carried it); the signature covers the commitment and the ciphertext.
    pub fn confidential(
        signer: &RequestSigner,
        number: u64,
        plaintext: &[u8],
        sealer: &Auth,
        sealed: &[u8],
    ) -> Self {
        let envelope = Ordered::Sealed {
            commitment: commitment(plaintext),
            sealer: *sealer,
            sealed: Bytes::copy_from_slice(sealed),
        }
        .encode();
        Self::signed(
            signer,
            number,
            RequestKind::Confidential,
            envelope.slice(1..),
        )
    }

    /// A confidential request the client seals itself: `plaintext` sealed with `key` (the
    /// client's key of its epoch) for request `number` ([`confidential_context`]), and signed.
    ///
    /// # Errors
    /// [`GroupError`] if the cipher fails.
    pub fn client_sealed(
        signer: &RequestSigner,
        number: u64,
        key: &ClientSealingKey,
        plaintext: &[u8],
    ) -> Result<Self, GroupError> {
        let sealed = key.seal(&confidential_context(&key.client(), number), plaintext)?;
        Ok(Self::signed(
            signer,
            number,
            RequestKind::ClientSealed,
            Bytes::from(sealed),
        ))
    }

    /// The submission a replica orders for it, with the client's signature: a membership
    /// command with the time the client signed, a confidential operation as the ciphertext
    /// beside its commitment. The engine checks the signature ([`Submission::verify`]).
    /// `None` for the kinds a replica answers itself (roster queries, sealing).
    pub fn into_submission(self) -> Option<Submission> {
        let ordered = match self.kind {
            RequestKind::App => Ordered::App(self.payload),
            RequestKind::Command => Ordered::Command {
                // (`decode` refuses a command without its time; 0 is judged as the distant
                // past, and the signature does not cover it.)
                time: self.command_time().unwrap_or_default(),
                command: self.payload.slice(8.min(self.payload.len())..),
            },
            RequestKind::Confidential => {
                // The payload is the envelope's body (`decode` checked its length).
                let mut envelope = Vec::with_capacity(1 + self.payload.len());
                envelope.push(9);
                envelope.extend_from_slice(&self.payload);
                match Ordered::decode(&Bytes::from(envelope)) {
                    Ok(sealed @ Ordered::Sealed { .. }) => sealed,
                    _ => return None,
                }
            }
            RequestKind::ClientSealed => Ordered::ClientSealed(self.payload),
            RequestKind::Rosters | RequestKind::Seal | RequestKind::SealingKey => return None,
        };
        Some(Submission {
            auth: Some(self.auth),
            ordered,
        })
    }

    /// Encodes the request.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(REQUEST_VERSION)
            .raw(&self.number.to_be_bytes())
            .u8(self.kind.tag())
            .raw(&self.auth.public_key)
            .raw(&self.auth.signature)
            .bytes(&self.payload);
        w.buf
    }

    /// Decodes a request.
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        r.version(REQUEST_VERSION)?;
        let number = u64::from_be_bytes(r.array()?);
        let kind = RequestKind::from_tag(r.u8()?)?;
        let auth = Auth {
            public_key: r.array()?,
            signature: r.array()?,
        };
        let payload = Bytes::copy_from_slice(r.bytes("payload", MAX_PAYLOAD_BYTES)?);
        r.finish()?;
        if matches!(kind, RequestKind::Command | RequestKind::Rosters) && payload.len() < 8
            || kind == RequestKind::Confidential && payload.len() < COMMITMENT_LEN + Auth::LEN
            || kind == RequestKind::ClientSealed && payload.len() < SEALED_OVERHEAD
        {
            return Err(WireError::Truncated);
        }
        Ok(Self {
            number,
            kind,
            payload,
            auth,
        })
    }
}

impl Outcome {
    /// The outcome's kind (its tag on the wire).
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Executed(_) => OutcomeKind::Executed,
            Outcome::Busy => OutcomeKind::Busy,
            Outcome::Rosters(_) => OutcomeKind::Rosters,
            Outcome::Sealed { .. } => OutcomeKind::Sealed,
            Outcome::Lost => OutcomeKind::Lost,
            Outcome::SealingKey(_) => OutcomeKind::SealingKey,
        }
    }
}

impl ClientReply {
    /// Encodes the reply.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(VERSION)
            .u64(self.number)
            .u64(self.roster)
            .u8(self.outcome.kind().tag());
        match &self.outcome {
            Outcome::Executed(result) | Outcome::Rosters(result) => {
                w.bytes(result);
            }
            Outcome::Busy | Outcome::Lost => {}
            Outcome::Sealed { sealer, sealed } => {
                let mut auth = Vec::with_capacity(Auth::LEN);
                sealer.write(&mut auth);
                w.raw(&auth).bytes(sealed);
            }
            Outcome::SealingKey(key) => {
                w.u64(key.epoch())
                    .raw(key.client().as_bytes())
                    .raw(key.secret_bytes());
            }
        }
        w.buf
    }

    /// Decodes a reply.
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        r.version(VERSION)?;
        let number = r.u64()?;
        let roster = r.u64()?;
        let outcome = match OutcomeKind::from_tag(r.u8()?)? {
            OutcomeKind::Executed => Outcome::Executed(Bytes::copy_from_slice(
                r.bytes("result", MAX_PAYLOAD_BYTES)?,
            )),
            OutcomeKind::Busy => Outcome::Busy,
            OutcomeKind::Rosters => Outcome::Rosters(Bytes::copy_from_slice(
                r.bytes("roster changes", MAX_PAYLOAD_BYTES)?,
            )),
            OutcomeKind::Lost => Outcome::Lost,
            OutcomeKind::SealingKey => {
                let epoch = r.u64()?;
                let client = NodeId::from_bytes(r.array()?);
                Outcome::SealingKey(ClientSealingKey::from_bytes(epoch, client, r.array()?))
            }
            OutcomeKind::Sealed => Outcome::Sealed {
                sealer: Auth {
                    public_key: r.array()?,
                    signature: r.array()?,
                },
                sealed: Bytes::copy_from_slice(r.bytes("sealed operation", MAX_PAYLOAD_BYTES)?),
            },
        };
        r.finish()?;
        Ok(Self {
            number,
            roster,
            outcome,
        })
    }
}

/// A request as the node orders it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ordered {
    /// An application operation, in the clear.
    App(Bytes),
    /// A membership command, with the submitter's clock (unix seconds) at which certificates
    /// and CRLs in it are judged (the same time at every replica).
    Command {
        /// Unix seconds.
        time: u64,
        /// The encoded `MembershipCommand`.
        command: Bytes,
    },
    /// A replica's MLS key package: it asks to be added to the replicas' group key.
    KeyPackage(Bytes),
    /// An MLS commit for the replicas' group (the ordering layer is MLS's delivery service),
    /// with the Welcome for the replicas it adds (empty if none).
    GroupCommit {
        /// The commit.
        commit: Bytes,
        /// The Welcome, or empty.
        welcome: Bytes,
    },
    /// A confidential application operation, sealed by the replica that received it with the
    /// group key of its current epoch, the context binding it to the client and request
    /// number ([`confidential_context`]). Opened only at execution; the plaintext (nonce and
    /// operation) must match the client's signed [`commitment`].
    Sealed {
        /// The client's commitment to the plaintext.
        commitment: [u8; 32],
        /// The signature of the replica that sealed it ([`SealerSignature`]).
        sealer: Auth,
        /// The sealed plaintext.
        sealed: Bytes,
    },
    /// A confidential application operation its client sealed itself, with its
    /// [`ClientSealingKey`] of the epoch the sealed header names, the context binding it to
    /// the client and request number ([`confidential_context`]); the client's signature covers
    /// the ciphertext. Opened only at execution (`securesmart::state`).
    ClientSealed(Bytes),
    /// A replica holds the group key of this epoch, made by the commit with this digest (it
    /// merged that commit, or joined with its Welcome). It settles an unsettled commit, and
    /// sealed requests of an epoch execute only once a quorum of the replicas said so (see
    /// `securesmart::state`).
    KeyAck {
        /// The epoch.
        epoch: u64,
        /// The digest of the commit that made it (`securesmart_membership::commit_digest`).
        commit: [u8; 32],
    },
    /// A replica that holds the epoch the unsettled commit with this digest was made for could
    /// not apply it (or the membership does not allow it): it votes to void it.
    CommitRefused([u8; 32]),
    /// A replica of the roster before roster `roster` signs that roster (its
    /// [`crate::roster::Roster::digest`]): a quorum of them certify the change for clients.
    RosterAck {
        /// The roster's number.
        roster: u64,
        /// Its digest.
        digest: [u8; 32],
    },
}

/// First byte of the reply to an executed confidential request, before the application's
/// result; a refused one is answered with nothing, so an empty result is not a refusal.
pub const CONFIDENTIAL_EXECUTED: u8 = 1;

/// First byte of an encoded [`Ordered::ClientSealed`].
const CLIENT_SEALED_TAG: u8 = 10;

/// Domain tag of the context a confidential request is sealed with.
pub const CONFIDENTIAL_TAG: &[u8] =
    securesmart_base::tags::service::CONFIDENTIAL_REQUEST.as_bytes();

/// The context a confidential request of `client` numbered `number` is sealed with: a sealed
/// payload copied into another client's request, or another request number, does not open.
pub fn confidential_context(client: &securesmart_transport::NodeId, number: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(CONFIDENTIAL_TAG.len() + 40);
    c.extend_from_slice(CONFIDENTIAL_TAG);
    c.extend_from_slice(client.as_bytes());
    c.extend_from_slice(&number.to_be_bytes());
    c
}

impl Ordered {
    /// Encodes the envelope.
    pub fn encode(&self) -> Bytes {
        match self {
            Ordered::App(payload) => {
                let mut out = Vec::with_capacity(1 + payload.len());
                out.push(0);
                out.extend_from_slice(payload);
                Bytes::from(out)
            }
            Ordered::Command { time, command } => {
                let mut out = Vec::with_capacity(9 + command.len());
                out.push(1);
                out.extend_from_slice(&time.to_be_bytes());
                out.extend_from_slice(command);
                Bytes::from(out)
            }
            Ordered::KeyPackage(kp) => {
                let mut out = Vec::with_capacity(1 + kp.len());
                out.push(2);
                out.extend_from_slice(kp);
                Bytes::from(out)
            }
            Ordered::GroupCommit { commit, welcome } => {
                let mut out = Vec::with_capacity(5 + commit.len() + welcome.len());
                out.push(3);
                out.extend_from_slice(
                    &u32::try_from(commit.len())
                        .unwrap_or(u32::MAX)
                        .to_be_bytes(),
                );
                out.extend_from_slice(commit);
                out.extend_from_slice(welcome);
                Bytes::from(out)
            }
            Ordered::Sealed {
                commitment,
                sealer,
                sealed,
            } => {
                let mut out = Vec::with_capacity(1 + COMMITMENT_LEN + Auth::LEN + sealed.len());
                out.push(9);
                out.extend_from_slice(commitment);
                sealer.write(&mut out);
                out.extend_from_slice(sealed);
                Bytes::from(out)
            }
            Ordered::ClientSealed(sealed) => {
                let mut out = Vec::with_capacity(1 + sealed.len());
                out.push(CLIENT_SEALED_TAG);
                out.extend_from_slice(sealed);
                Bytes::from(out)
            }
            Ordered::KeyAck { epoch, commit } => {
                let mut out = Vec::with_capacity(41);
                out.push(6);
                out.extend_from_slice(&epoch.to_be_bytes());
                out.extend_from_slice(commit);
                Bytes::from(out)
            }
            Ordered::CommitRefused(commit) => {
                let mut out = Vec::with_capacity(33);
                out.push(7);
                out.extend_from_slice(commit);
                Bytes::from(out)
            }
            Ordered::RosterAck { roster, digest } => {
                let mut out = Vec::with_capacity(41);
                out.push(8);
                out.extend_from_slice(&roster.to_be_bytes());
                out.extend_from_slice(digest);
                Bytes::from(out)
            }
        }
    }

    /// Decodes an envelope (zero-copy for the payload).
    ///
    /// # Errors
    /// [`WireError`] for an empty payload or an unknown kind.
    pub fn decode(buf: &Bytes) -> Result<Self, WireError> {
        match buf.first() {
            Some(0) => Ok(Ordered::App(buf.slice(1..))),
            Some(1) => {
                let time = buf
                    .get(1..9)
                    .and_then(|t| <[u8; 8]>::try_from(t).ok())
                    .ok_or(WireError::Truncated)?;
                Ok(Ordered::Command {
                    time: u64::from_be_bytes(time),
                    command: buf.slice(9..),
                })
            }
            Some(2) => Ok(Ordered::KeyPackage(buf.slice(1..))),
            Some(3) => {
                let len = buf
                    .get(1..5)
                    .and_then(|t| <[u8; 4]>::try_from(t).ok())
                    .ok_or(WireError::Truncated)?;
                let end = 5usize.saturating_add(u32::from_be_bytes(len) as usize);
                if end > buf.len() {
                    return Err(WireError::Truncated);
                }
                Ok(Ordered::GroupCommit {
                    commit: buf.slice(5..end),
                    welcome: buf.slice(end..),
                })
            }
            Some(4) => Err(WireError::Unknown {
                what: "ordered request kind (a sealed request of the format before the client signed the ciphertext)",
                value: 4,
            }),
            Some(9) => {
                let body = 1 + COMMITMENT_LEN;
                let commitment = buf
                    .get(1..body)
                    .and_then(|t| <[u8; COMMITMENT_LEN]>::try_from(t).ok())
                    .ok_or(WireError::Truncated)?;
                let sealer = Auth::read(
                    buf.get(body..body + Auth::LEN)
                        .ok_or(WireError::Truncated)?,
                )?;
                Ok(Ordered::Sealed {
                    commitment,
                    sealer,
                    sealed: buf.slice(body + Auth::LEN..),
                })
            }
            Some(5) => Err(WireError::Unknown {
                what: "ordered request kind (a key acknowledgement of the format before settled commits)",
                value: 5,
            }),
            Some(6) => {
                let body = buf
                    .get(1..)
                    .and_then(|t| <[u8; 40]>::try_from(t).ok())
                    .ok_or(WireError::Truncated)?;
                let (epoch, commit) = body.split_at(8);
                Ok(Ordered::KeyAck {
                    epoch: u64::from_be_bytes(epoch.try_into().map_err(|_| WireError::Truncated)?),
                    commit: commit.try_into().map_err(|_| WireError::Truncated)?,
                })
            }
            Some(7) => {
                let commit = buf
                    .get(1..)
                    .and_then(|t| <[u8; 32]>::try_from(t).ok())
                    .ok_or(WireError::Truncated)?;
                Ok(Ordered::CommitRefused(commit))
            }
            Some(8) => {
                let body = buf
                    .get(1..)
                    .and_then(|t| <[u8; 40]>::try_from(t).ok())
                    .ok_or(WireError::Truncated)?;
                let (roster, digest) = body.split_at(8);
                Ok(Ordered::RosterAck {
                    roster: u64::from_be_bytes(
                        roster.try_into().map_err(|_| WireError::Truncated)?,
                    ),
                    digest: digest.try_into().map_err(|_| WireError::Truncated)?,
                })
            }
            Some(&CLIENT_SEALED_TAG) => Ok(Ordered::ClientSealed(buf.slice(1..))),
            Some(other) => Err(WireError::Unknown {
                what: "ordered request kind",
                value: (*other).into(),
            }),
            None => Err(WireError::Unknown {
                what: "ordered request kind",
                value: 0,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use securesmart_transport::Role;
    use securesmart_transport::pki::DevCa;

    fn signers() -> (RequestSigner, RequestSigner) {
        let ca = DevCa::new("protocol ca").unwrap();
        let signer =
            |name: &str| RequestSigner::new(&ca.issue_role(name, Role::Client).unwrap()).unwrap();
        (signer("alice"), signer("mallory"))
    }

    #[test]
    fn requests_verify_only_as_their_clients_and_unchanged() {
        let (alice, mallory) = signers();
        // As a replica orders it (the sealing is beside the point here), checked as the
        // engine checks it.
        let verify = |r: &ClientRequest, client: &RequestSigner| {
            r.clone()
                .into_submission()
                .unwrap()
                .verify(&client.id(), r.number)
        };
        let op = Bytes::from(format!(
            "put k v {}",
            "-".repeat(COMMITMENT_LEN + Auth::LEN)
        ));
        for kind in [
            RequestKind::App,
            RequestKind::Command,
            RequestKind::Confidential,
        ] {
            let req = ClientRequest::signed(&alice, 5, kind, op.clone());
            assert_eq!(verify(&req, &alice), Ok(()), "{kind:?}");
            assert_eq!(verify(&req, &mallory), Err(AuthError::WrongKey));
            let decoded = ClientRequest::decode(&req.encode()).unwrap();
            assert_eq!(verify(&decoded, &alice), Ok(()));
            let mut changed = req.clone();
            changed.number = 6;
            assert_eq!(verify(&changed, &alice), Err(AuthError::BadSignature));
            let mut changed = req.clone();
            changed.payload = Bytes::from(format!(
                "put k w {}",
                "-".repeat(COMMITMENT_LEN + Auth::LEN)
            ));
            assert_eq!(verify(&changed, &alice), Err(AuthError::BadSignature));
            // Mallory's own key in Alice's name: not Alice's key.
            let mut forged = ClientRequest::signed(&mallory, 5, kind, req.payload.clone());
            assert_eq!(verify(&forged, &alice), Err(AuthError::WrongKey));
            forged.auth.public_key = req.auth.public_key;
            assert_eq!(verify(&forged, &alice), Err(AuthError::BadSignature));
        }
        // The time of a membership command is the client's, and signed: a replica that
        // changes it (to admit an expired certificate, or refuse a CRL) breaks the signature.
        let cmd =
            ClientRequest::signed(&alice, 8, RequestKind::Command, Bytes::from_static(b"cmd"));
        let now = crate::node::unix_now();
        assert!(cmd.command_time().is_some_and(|t| t.abs_diff(now) < 5));
        assert_eq!(cmd.verify(&alice.id()), Ok(()));
        let mut submission = cmd.clone().into_submission().unwrap();
        let Ordered::Command { time, command } = submission.ordered.clone() else {
            panic!("a command")
        };
        assert_eq!(&command[..], b"cmd");
        assert_eq!(submission.verify(&alice.id(), 8), Ok(()));
        submission.ordered = Ordered::Command {
            time: time - 400 * 86_400,
            command,
        };
        assert_eq!(
            submission.verify(&alice.id(), 8),
            Err(AuthError::BadSignature)
        );
        // The intake check refuses a request to seal that is not its client's before sealing
        // anything; such a request is answered, never ordered.
        let mut bad = ClientRequest::signed(&alice, 9, RequestKind::Seal, Bytes::from_static(b"x"));
        assert!(bad.clone().into_submission().is_none());
        assert_eq!(bad.verify(&alice.id()), Ok(()));
        assert_eq!(bad.verify(&mallory.id()), Err(AuthError::WrongKey));
        bad.payload = Bytes::from_static(b"0123456789abcdef-junk");
        assert_eq!(bad.verify(&alice.id()), Err(AuthError::BadSignature));
        // A command without its time does not decode.
        let mut short = cmd.clone();
        short.payload = Bytes::from_static(b"cmd");
        assert!(ClientRequest::decode(&short.encode()).is_err());
        assert!(ClientRequest::decode(&cmd.encode()).is_ok());
        // An operation to seal gets a nonce in front; the signature covers its commitment.
        let a = ClientRequest::signed(&alice, 1, RequestKind::Seal, Bytes::from_static(b"x"));
        let b = ClientRequest::signed(&alice, 1, RequestKind::Seal, Bytes::from_static(b"x"));
        assert_eq!(a.payload.len(), NONCE_LEN + 1);
        assert_ne!(a.payload, b.payload, "a fresh nonce each time");
    }

    /// A replica (a group of one) that seals `plaintext` for `client`'s request `number`, and
    /// its signature on it.
    fn sealed_by_replica(client: &NodeId, number: u64, plaintext: &[u8]) -> (Auth, Bytes) {
        let ca = DevCa::new("sealer ca").unwrap();
        let replica = ca.issue_role("sealer", Role::Replica).unwrap();
        let mut member = securesmart_membership::GroupMember::new(
            &replica,
            securesmart_membership::GroupConfig::default(),
        )
        .unwrap();
        member.create(std::time::Duration::ZERO).unwrap();
        let sealed = member
            .payload_keys()
            .seal(&confidential_context(client, number), plaintext)
            .unwrap();
        let signer = RequestSigner::new(&replica).unwrap();
        (
            SealerSignature::sign(&signer, client, number, &sealed),
            Bytes::from(sealed),
        )
    }

    #[test]
    fn a_request_its_client_sealed_carries_one_signature_over_the_ciphertext() {
        let (alice, mallory) = signers();
        let key = ClientSealingKey::from_bytes(3, alice.id(), [7; 32]);
        let request = ClientRequest::client_sealed(&alice, 11, &key, b"secret op").unwrap();
        assert_eq!(
            request.payload.len(),
            b"secret op".len() + SEALED_OVERHEAD,
            "ciphertext, no nonce or commitment"
        );
        assert!(!request.payload.windows(9).any(|w| w == b"secret op"));
        assert_eq!(ClientRequest::decode(&request.encode()).unwrap(), request);
        let submission = request.clone().into_submission().unwrap();
        let Ordered::ClientSealed(sealed) = &submission.ordered else {
            panic!("a client-sealed request")
        };
        assert_eq!(
            key.open(sealed, &confidential_context(&alice.id(), 11))
                .unwrap()
                .plaintext,
            b"secret op"
        );
        assert_eq!(
            Ordered::decode(&submission.ordered.encode()).unwrap(),
            submission.ordered
        );
        assert_eq!(submission.signatures(&alice.id(), 11).unwrap().len(), 1);
        let check = request_check();
        let ordered = |s: &Submission, client: NodeId| securesmart_consensus::message::Request {
            client,
            number: 11,
            payload: s.encode(),
        };
        assert!(check.allows(&ordered(&submission, alice.id())));
        // A faulty primary or forwarder swaps the ciphertext, or orders it in another name:
        // refused before ordering.
        let mut swapped = submission.clone();
        let other = ClientRequest::client_sealed(&alice, 11, &key, b"other op").unwrap();
        swapped.ordered = Ordered::ClientSealed(other.payload);
        assert_eq!(
            swapped.verify(&alice.id(), 11),
            Err(AuthError::BadSignature)
        );
        assert!(!check.allows(&ordered(&swapped, alice.id())));
        assert!(!check.allows(&ordered(&submission, mallory.id())));
        // The same signature on the same ciphertext does not make it an application operation
        // in the clear (the signature names what it signs).
        let mut as_app = submission.clone();
        as_app.ordered = Ordered::App(sealed.clone());
        assert_eq!(as_app.verify(&alice.id(), 11), Err(AuthError::BadSignature));
        assert!(!check.allows(&ordered(&as_app, alice.id())));
        // Too short to be sealed: does not decode.
        let mut short = request.clone();
        short.payload = Bytes::from_static(b"x");
        assert!(ClientRequest::decode(&short.encode()).is_err());
        // The key travels to its client in a reply, and its Debug hides it.
        let reply = ClientReply {
            number: 5,
            roster: 1,
            outcome: Outcome::SealingKey(key.clone()),
        };
        assert_eq!(ClientReply::decode(&reply.encode()).unwrap(), reply);
        assert!(!format!("{reply:?}").contains("7, 7"));
        let ask = ClientRequest::signed(&alice, 12, RequestKind::SealingKey, Bytes::new());
        assert_eq!(ClientRequest::decode(&ask.encode()).unwrap(), ask);
        assert!(ask.into_submission().is_none(), "answered, not ordered");
    }

    #[test]
    fn no_replica_can_put_another_ciphertext_beside_a_confidential_request() {
        let (alice, mallory) = signers();
        let ask = ClientRequest::signed(&alice, 4, RequestKind::Seal, Bytes::from_static(b"op"));
        let (sealer, sealed) = sealed_by_replica(&alice.id(), 4, &ask.payload);
        let request = ClientRequest::confidential(&alice, 4, &ask.payload, &sealer, &sealed);
        let submission = request.clone().into_submission().unwrap();
        let Ordered::Sealed {
            commitment,
            sealed: ordered_sealed,
            ..
        } = submission.ordered.clone()
        else {
            panic!("a sealed request")
        };
        assert_eq!(commitment, super::commitment(&ask.payload));
        assert_eq!(ordered_sealed, sealed);
        let check = request_check();
        let ordered = |s: &Submission| securesmart_consensus::message::Request {
            client: alice.id(),
            number: 4,
            payload: s.encode(),
        };
        assert!(check.allows(&ordered(&submission)));
        // A faulty primary or forwarder swaps the ciphertext, or the commitment: the engine
        // refuses it before ordering, so it neither executes nor uses up the number.
        let mut swapped = submission.clone();
        let (other_sealer, other) = sealed_by_replica(&alice.id(), 4, b"another operation");
        swapped.ordered = Ordered::Sealed {
            commitment,
            sealer: other_sealer,
            sealed: other,
        };
        assert_eq!(swapped.verify(&alice.id(), 4), Err(AuthError::BadSignature));
        assert!(!check.allows(&ordered(&swapped)));
        swapped.ordered = Ordered::Sealed {
            commitment: [9; 32],
            sealer,
            sealed: sealed.clone(),
        };
        assert!(!check.allows(&ordered(&swapped)));
        // A client cannot make up a ciphertext either: it needs a sealer's signature on it, and
        // the sealer must be the sender its header names (whether it is a current replica, the
        // replicated state decides before opening anything).
        let mut forged_sealer = sealer;
        forged_sealer.signature[0] ^= 1;
        let made_up = ClientRequest::confidential(&alice, 4, &ask.payload, &forged_sealer, &sealed);
        assert!(!check.allows(&ordered(&made_up.clone().into_submission().unwrap())));
        // The client's own signature on it is not enough: the submission's check covers the
        // sealer's too.
        assert_eq!(made_up.verify(&alice.id()), Ok(()));
        assert_eq!(
            made_up
                .into_submission()
                .unwrap()
                .verify_all(&alice.id(), 4),
            Err(AuthError::BadSignature)
        );
        assert!(
            request
                .clone()
                .into_submission()
                .unwrap()
                .verify_all(&alice.id(), 4)
                .is_ok()
        );
        let not_the_sender = SealerSignature::sign(&mallory, &alice.id(), 4, &sealed);
        assert_eq!(
            SealerSignature::verify(&not_the_sender, &alice.id(), 4, &sealed),
            Err(AuthError::WrongKey)
        );
        // Signed for another client or number, it does not verify.
        assert!(SealerSignature::verify(&sealer, &mallory.id(), 4, &sealed).is_err());
        assert!(SealerSignature::verify(&sealer, &alice.id(), 5, &sealed).is_err());
        // A confidential request too short to carry a commitment does not decode.
        let mut short = request;
        short.payload = Bytes::from_static(b"short");
        assert!(ClientRequest::decode(&short.encode()).is_err());
    }

    #[test]
    fn submissions_verify_in_their_clients_name_only() {
        let (alice, mallory) = signers();
        let ordered = [
            Ordered::App(Bytes::from_static(b"op")),
            Ordered::Command {
                time: 9,
                command: Bytes::from_static(b"add"),
            },
            Ordered::KeyAck {
                epoch: 3,
                commit: [3; 32],
            },
            Ordered::CommitRefused([4; 32]),
            Ordered::Sealed {
                commitment: [4; 32],
                sealer: Auth {
                    public_key: [5; 32],
                    signature: [6; 64],
                },
                sealed: Bytes::from_static(b"ciphertext"),
            },
        ];
        for o in ordered {
            let s = alice.submission(11, o.clone());
            let decoded = Submission::decode(&s.encode()).unwrap();
            assert_eq!(decoded, s);
            assert_eq!(decoded.verify(&alice.id(), 11), Ok(()), "{o:?}");
            assert!(decoded.verify(&alice.id(), 12).is_err());
            assert!(decoded.verify(&mallory.id(), 11).is_err());
            let forged = Submission {
                auth: mallory.submission(11, o.clone()).auth,
                ordered: o.clone(),
            };
            assert_eq!(forged.verify(&alice.id(), 11), Err(AuthError::WrongKey));
            let unsigned = Submission::decode(&o.encode()).unwrap();
            assert_eq!(unsigned.verify(&alice.id(), 11), Err(AuthError::Unsigned));
        }
        // The engine's check: only signed requests of their own client.
        let check = request_check();
        let request = |client: NodeId, payload: Bytes| securesmart_consensus::message::Request {
            client,
            number: 11,
            payload,
        };
        let signed = alice
            .submission(11, Ordered::App(Bytes::from_static(b"op")))
            .encode();
        assert!(check.allows(&request(alice.id(), signed.clone())));
        assert!(!check.allows(&request(mallory.id(), signed)));
        assert!(!check.allows(&request(alice.id(), Ordered::App(Bytes::new()).encode())));
        assert!(!check.allows(&request(alice.id(), Bytes::from_static(&[0xA1, 1]))));
    }

    /// A request signed by its own (fresh) key with R = rB + T for an 8-torsion point T, and
    /// whether ed25519-dalek's strict check refuses it.
    fn torsioned_request() -> (securesmart_consensus::message::Request, bool) {
        use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT as B, EIGHT_TORSION};
        use curve25519_dalek::scalar::Scalar;
        use sha2::Digest as _;
        let a = Scalar::from_bytes_mod_order(rand::random());
        let r = Scalar::from_bytes_mod_order(rand::random());
        let public = (a * B).compress().to_bytes();
        let big_r = (r * B + EIGHT_TORSION[1]).compress().to_bytes();
        let client = NodeId::from_ed25519(&public);
        let ordered = Ordered::App(Bytes::from_static(b"op"));
        let (kind, body) = Submission::signed_part(&ordered);
        let digest = signing_digest(&client, 1, kind, &body);
        let k = Scalar::from_hash(
            sha2::Sha512::new()
                .chain_update(big_r)
                .chain_update(public)
                .chain_update(digest),
        );
        let mut signature = [0u8; 64];
        signature[..32].copy_from_slice(&big_r);
        signature[32..].copy_from_slice((r + k * a).as_bytes());
        let strict_refuses = ed25519_dalek::VerifyingKey::from_bytes(&public)
            .unwrap()
            .verify_strict(&digest, &ed25519_dalek::Signature::from_bytes(&signature))
            .is_err();
        let request = securesmart_consensus::message::Request {
            client,
            number: 1,
            payload: Submission {
                auth: Some(Auth {
                    public_key: public,
                    signature,
                }),
                ordered,
            }
            .encode(),
        };
        (request, strict_refuses)
    }

    #[test]
    fn a_batch_check_gives_each_request_its_own_verdict() {
        // The engine checks what a pre-prepare carries, or what a primary proposes, as one
        // batch: each request must get the verdict it gets alone, whatever else is in it.
        let (mut alice, mallory) = signers();
        let id = alice.id();
        let request = |number: u64, payload: Bytes| securesmart_consensus::message::Request {
            client: id,
            number,
            payload,
        };
        let app = |signer: &RequestSigner, n: u64| {
            request(
                n,
                signer
                    .submission(n, Ordered::App(Bytes::from_static(b"op")))
                    .encode(),
            )
        };
        let mut flipped = alice.submission(3, Ordered::App(Bytes::from_static(b"op")));
        if let Some(a) = flipped.auth.as_mut() {
            a.signature[5] ^= 1;
        }
        let ask = ClientRequest::signed(&alice, 5, RequestKind::Seal, Bytes::from_static(b"x"));
        let (sealer, sealed) = sealed_by_replica(&alice.id(), 5, &ask.payload);
        let good_sealed = ClientRequest::confidential(&alice, 5, &ask.payload, &sealer, &sealed);
        let mut bad_sealer = sealer;
        bad_sealer.signature[0] ^= 1;
        let bad_sealed = ClientRequest::confidential(&alice, 6, &ask.payload, &bad_sealer, &sealed);
        let sealed_request =
            |r: ClientRequest| request(r.number, r.into_submission().unwrap().encode());
        alice.set_insecure_unsigned(true);
        let unsigned = app(&alice, 7);
        alice.set_insecure_unsigned(false);
        let cases = [
            (app(&alice, 1), true),
            (app(&mallory, 2), false),
            (request(3, flipped.encode()), false),
            (request(4, Bytes::from_static(&[0xA1, 1, 2])), false),
            (sealed_request(good_sealed), true),
            (sealed_request(bad_sealed), false),
            (unsigned, false),
            (app(&alice, 8), true),
        ];
        let check = request_check();
        let all: Vec<&securesmart_consensus::message::Request> =
            cases.iter().map(|(r, _)| r).collect();
        let expected: Vec<bool> = cases.iter().map(|(_, ok)| *ok).collect();
        assert_eq!(check.allows_all(&all), expected);
        for (r, ok) in &cases {
            assert_eq!(check.allows(r), *ok, "request {}", r.number);
        }
        // A small-order key (here the identity point) verifies any message under ZIP-215
        // alone; it is refused as a key, alone and in a batch.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        let mut any = [0u8; 64];
        any[0] = 1;
        assert!(
            ed25519_zebra::VerificationKey::try_from(weak)
                .unwrap()
                .verify(&ed25519_zebra::Signature::from_bytes(&any), b"anything")
                .is_ok(),
            "ZIP-215 alone takes it"
        );
        let weak_id = NodeId::from_ed25519(&weak);
        let weak_request = securesmart_consensus::message::Request {
            client: weak_id,
            number: 1,
            payload: Submission {
                auth: Some(Auth {
                    public_key: weak,
                    signature: any,
                }),
                ordered: Ordered::App(Bytes::from_static(b"op")),
            }
            .encode(),
        };
        assert!(!check.allows(&weak_request));
        assert_eq!(
            check.allows_all(&[&weak_request, &cases[0].0]),
            vec![false, true]
        );
        // A key holder can add a small-order component to R: the cofactorless (strict) check
        // refuses such a signature, the cofactored one takes it. ZIP-215 is cofactored alone
        // and in batches, so every replica gives it the same verdict however it checks.
        let (torsioned, strict_refuses) = torsioned_request();
        assert!(strict_refuses, "dalek's strict check refuses it");
        assert!(check.allows(&torsioned));
        assert_eq!(
            check.allows_all(&[&cases[0].0, &torsioned, &cases[1].0]),
            vec![true, true, false]
        );
        assert_eq!(
            check.allows_all(&[&cases[0].0, &torsioned]),
            vec![true, true]
        );
        // Only good ones: the batch equation decides for all at once.
        let good: Vec<_> = cases.iter().filter(|(_, ok)| *ok).map(|(r, _)| r).collect();
        assert!(check.allows_all(&good).iter().all(|ok| *ok));
        assert!(check.allows_all(&[]).is_empty());
    }

    #[test]
    fn messages_round_trip_and_bad_ones_are_errors() {
        // The request kinds' wire numbers, which clients of every version send: pinned.
        let tags: Vec<u8> = RequestKind::ALL.iter().map(|k| k.tag()).collect();
        assert_eq!(tags, (0..7).collect::<Vec<u8>>());
        assert!(RequestKind::from_tag(7).is_err());
        let tags: Vec<u8> = OutcomeKind::ALL.iter().map(|k| k.tag()).collect();
        assert_eq!(tags, (1..=6).collect::<Vec<u8>>());
        let (alice, _) = signers();
        let req = ClientRequest::signed(&alice, 7, RequestKind::Command, Bytes::from_static(b"op"));
        assert_eq!(ClientRequest::decode(&req.encode()), Ok(req.clone()));
        let mut trailing = req.encode();
        trailing.push(0);
        assert!(ClientRequest::decode(&trailing).is_err());
        for outcome in [
            Outcome::Executed(Bytes::from_static(b"r")),
            Outcome::Busy,
            Outcome::Rosters(Bytes::from_static(b"changes")),
            Outcome::Lost,
        ] {
            let reply = ClientReply {
                number: 9,
                roster: 2,
                outcome,
            };
            assert_eq!(ClientReply::decode(&reply.encode()), Ok(reply.clone()));
            let bytes = reply.encode();
            // After the version, the number and the roster.
            assert_eq!(bytes.get(17), Some(&reply.outcome.kind().tag()));
            for cut in 0..bytes.len() {
                assert!(ClientReply::decode(&bytes[..cut]).is_err());
            }
        }
        let mut bad_outcome = vec![VERSION];
        bad_outcome.extend_from_slice(&[0; 16]);
        bad_outcome.push(9);
        assert!(ClientReply::decode(&bad_outcome).is_err());
        // A reply of the format before rosters gets an error, not a misreading.
        assert!(ClientReply::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 1, 2]).is_err());
        let app = Ordered::App(Bytes::from_static(b"x"));
        assert_eq!(Ordered::decode(&app.encode()), Ok(app));
        let cmd = Ordered::Command {
            time: 99,
            command: Bytes::from_static(b"cmd"),
        };
        assert_eq!(Ordered::decode(&cmd.encode()), Ok(cmd));
        assert!(Ordered::decode(&Bytes::from_static(&[1, 0, 0])).is_err());
        for o in [
            Ordered::KeyPackage(Bytes::from_static(b"kp")),
            Ordered::Sealed {
                commitment: [1; 32],
                sealer: Auth {
                    public_key: [2; 32],
                    signature: [3; 64],
                },
                sealed: Bytes::from_static(b"sealed"),
            },
            Ordered::KeyAck {
                epoch: 7,
                commit: [7; 32],
            },
            Ordered::GroupCommit {
                commit: Bytes::from_static(b"commit"),
                welcome: Bytes::from_static(b"welcome"),
            },
            Ordered::RosterAck {
                roster: 3,
                digest: [3; 32],
            },
        ] {
            assert_eq!(Ordered::decode(&o.encode()), Ok(o));
        }
        assert!(Ordered::decode(&Bytes::from_static(&[8, 0, 0, 0, 0, 0, 0, 0, 3])).is_err());
        assert!(Ordered::decode(&Bytes::from_static(&[3, 0, 0, 0, 9, 1])).is_err());
        assert!(Ordered::decode(&Bytes::new()).is_err());
        assert!(Ordered::decode(&Bytes::from_static(&[5, 0, 0, 0, 0, 0, 0, 0, 7, 0])).is_err());
        assert!(Ordered::decode(&Bytes::from_static(&[200])).is_err());
    }
}
